//! Which ranks share a host.
//!
//! Ranks are on one host when they share the kernel's boot id and network namespace (so two
//! containers on one machine with separate network stacks count as two hosts, like two
//! machines), unless `MR_HOST_ID` says otherwise: ranks with equal `MR_HOST_ID` values are one
//! host whatever the kernel says (containers, and tests that emulate several hosts on one).
//!
//! At init every rank contributes a 64-bit key for its host and the ranks all-gather them
//! ([`crate::comm::Comm::init`]); [`Layout::from_keys`] then numbers hosts in the order of
//! their lowest rank and ranks within a host by global rank. Every rank computes the same
//! layout from the same keys.

use crate::error::{Error, Result};

/// Where every rank runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Host index of each rank.
    host_of: Vec<usize>,
    /// Global ranks on each host, ascending.
    ranks_on: Vec<Vec<usize>>,
    rank: usize,
}

impl Layout {
    /// The layout of a job whose rank `r` reported `keys[r]`, as seen by `rank`.
    pub fn from_keys(keys: &[u64], rank: usize) -> Layout {
        let mut hosts: Vec<u64> = Vec::new();
        let mut ranks_on: Vec<Vec<usize>> = Vec::new();
        let host_of = keys
            .iter()
            .enumerate()
            .map(|(r, k)| {
                let h = match hosts.iter().position(|x| x == k) {
                    Some(h) => h,
                    None => {
                        hosts.push(*k);
                        ranks_on.push(Vec::new());
                        hosts.len() - 1
                    }
                };
                ranks_on[h].push(r);
                h
            })
            .collect();
        Layout {
            host_of,
            ranks_on,
            rank,
        }
    }

    /// One host holding every rank (what a single-rank job is).
    pub fn single(size: usize, rank: usize) -> Layout {
        Layout::from_keys(&vec![0; size], rank)
    }

    /// Number of hosts.
    pub fn hosts(&self) -> usize {
        self.ranks_on.len()
    }

    /// This rank's host index (hosts are numbered in the order of their lowest rank).
    pub fn host(&self) -> usize {
        self.host_of[self.rank]
    }

    /// The host index of `rank`.
    pub fn host_of(&self, rank: usize) -> usize {
        self.host_of[rank]
    }

    /// This rank's position among the ranks of its host.
    pub fn local_rank(&self) -> usize {
        let mine = &self.ranks_on[self.host()];
        mine.iter()
            .position(|&r| r == self.rank)
            .expect("a rank is on its own host")
    }

    /// Number of ranks on this rank's host.
    pub fn local_size(&self) -> usize {
        self.ranks_on[self.host()].len()
    }

    /// Global ranks on host `h`, ascending.
    pub fn ranks_on(&self, h: usize) -> &[usize] {
        &self.ranks_on[h]
    }

    /// Whether collectives have a host level: more than one host and more than one rank on
    /// some host.
    pub fn is_hierarchical(&self) -> bool {
        self.hosts() > 1 && self.ranks_on.iter().any(|r| r.len() > 1)
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rank(s) on {} host(s):",
            self.host_of.len(),
            self.hosts()
        )?;
        for (h, ranks) in self.ranks_on.iter().enumerate() {
            write!(f, " host {h} = ranks {ranks:?}")?;
            if h + 1 < self.hosts() {
                f.write_str(";")?;
            }
        }
        Ok(())
    }
}

/// This process's host key: from `MR_HOST_ID` when given, else from the kernel's boot id and
/// this process's network namespace.
pub fn host_key(host_id: Option<&str>) -> Result<u64> {
    let material = match host_id {
        Some(id) => format!("MR_HOST_ID {id}"),
        None => {
            let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map_err(|e| Error::io("reading the boot id to find this host", e))?;
            let netns = std::fs::read_link("/proc/self/ns/net")
                .map_err(|e| Error::io("reading this process's network namespace", e))?;
            format!("boot {} netns {}", boot.trim(), netns.display())
        }
    };
    let hash = blake3::derive_key("mapreduce host key v1", material.as_bytes());
    Ok(u64::from_le_bytes(hash[..8].try_into().unwrap()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(sizes: &[usize], rank: usize) -> Layout {
        // Hosts interleaved in rank order would also work; build them contiguous here and
        // check interleaving separately.
        let keys: Vec<u64> = sizes
            .iter()
            .enumerate()
            .flat_map(|(h, &n)| std::iter::repeat_n(100 + h as u64, n))
            .collect();
        Layout::from_keys(&keys, rank)
    }

    #[test]
    fn contiguous_layouts() {
        for sizes in [
            vec![2, 2],
            vec![1, 3],
            vec![3, 1],
            vec![2, 1, 1],
            vec![2, 2, 2],
        ] {
            let world: usize = sizes.iter().sum();
            let mut next = 0;
            for (h, &n) in sizes.iter().enumerate() {
                for l in 0..n {
                    let lay = layout(&sizes, next);
                    assert_eq!(lay.hosts(), sizes.len());
                    assert_eq!(lay.host(), h);
                    assert_eq!(lay.local_rank(), l);
                    assert_eq!(lay.local_size(), n);
                    assert!(lay.is_hierarchical());
                    next += 1;
                }
            }
            assert_eq!(next, world);
        }
        assert!(!layout(&[4], 0).is_hierarchical());
        assert!(!layout(&[1, 1, 1], 2).is_hierarchical());
    }

    #[test]
    fn interleaved_hosts_are_numbered_by_lowest_rank() {
        let keys = [7, 9, 7, 9, 5];
        let lay = Layout::from_keys(&keys, 3);
        assert_eq!(lay.hosts(), 3);
        assert_eq!(lay.host(), 1);
        assert_eq!(lay.ranks_on(0), &[0, 2]);
        assert_eq!(lay.ranks_on(1), &[1, 3]);
        assert_eq!(lay.ranks_on(2), &[4]);
        assert_eq!(lay.local_rank(), 1);
        assert_eq!(lay.host_of(4), 2);
        assert_eq!(
            lay.to_string(),
            "5 rank(s) on 3 host(s): host 0 = ranks [0, 2]; host 1 = ranks [1, 3]; host 2 = ranks [4]"
        );
    }

    #[test]
    fn host_keys() {
        let a = host_key(None).unwrap();
        assert_eq!(a, host_key(None).unwrap());
        assert_eq!(host_key(Some("n1")).unwrap(), host_key(Some("n1")).unwrap());
        assert_ne!(host_key(Some("n1")).unwrap(), host_key(Some("n2")).unwrap());
        assert_ne!(host_key(Some("n1")).unwrap(), a);
    }
}

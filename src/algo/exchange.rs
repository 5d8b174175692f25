//! Direct exchanges: gather, scatter, all-to-all and all-to-all-v.
//!
//! Every rank already holds a connection to every other rank, so these collectives need no
//! ring: each rank sends each peer its share straight from the caller's input and receives each
//! peer's share straight into the caller's output. An [`ExchangePlan`] says, per peer, which
//! bytes of the input go there (a *send*) and which bytes of the output come from there (a
//! *recv*); [`Exchange`] runs any plan. This module never touches a socket or a clock.
//!
//! Vocabulary: a **transfer** is everything one rank sends one peer in one op (possibly zero
//! bytes); it travels as one or more frames of at most `chunk_bytes` (whole elements). Each
//! frame's header carries the transfer's element count in `count`, the byte offset within the
//! transfer in `offset`, and the root in `aux` (gather, scatter), so the receiver checks the
//! sender's view of the call against its own before it writes anything. A transfer of zero
//! elements still sends one empty frame: the receiver learns the sender's count (a mismatch is
//! reported by name instead of a wait until the timeout) and completes only once every peer it
//! expects has spoken.

use crate::algo::span::chunks;
use crate::algo::{Collective, Endpoint, OpDesc, Schedule, Transmit};
use crate::buffer::{OpMemory, Region};
use crate::error::{Error, Result};
use crate::wire::FrameHeader;
use std::collections::VecDeque;
use std::ops::Range;

/// One peer's share of an op, in bytes of the caller's input (sends) or output (recvs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub peer: usize,
    pub bytes: Range<usize>,
}

/// What one rank sends and receives in a direct exchange.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExchangePlan {
    /// Ranges of the input (`mem.input`) sent to each peer.
    pub sends: Vec<Transfer>,
    /// Ranges of the output (`mem.user`) filled by each peer.
    pub recvs: Vec<Transfer>,
    /// This rank's own share: copied from the input range to the output range at the start.
    pub local: Option<(Range<usize>, Range<usize>)>,
}

impl ExchangePlan {
    /// Gather of `bytes` per rank to `root`: the root's output holds every rank's input in rank
    /// order; other ranks only send.
    pub fn gather(rank: usize, n: usize, bytes: usize, root: usize) -> ExchangePlan {
        let slot = |r: usize| r * bytes..(r + 1) * bytes;
        if rank == root {
            ExchangePlan {
                sends: Vec::new(),
                recvs: (0..n)
                    .filter(|&p| p != rank)
                    .map(|p| Transfer {
                        peer: p,
                        bytes: slot(p),
                    })
                    .collect(),
                local: Some((0..bytes, slot(rank))),
            }
        } else {
            ExchangePlan {
                sends: vec![Transfer {
                    peer: root,
                    bytes: 0..bytes,
                }],
                recvs: Vec::new(),
                local: None,
            }
        }
    }

    /// Scatter of `bytes` per rank from `root`: rank r's output gets block r of the root's input.
    pub fn scatter(rank: usize, n: usize, bytes: usize, root: usize) -> ExchangePlan {
        let slot = |r: usize| r * bytes..(r + 1) * bytes;
        if rank == root {
            ExchangePlan {
                sends: (0..n)
                    .filter(|&p| p != rank)
                    .map(|p| Transfer {
                        peer: p,
                        bytes: slot(p),
                    })
                    .collect(),
                recvs: Vec::new(),
                local: Some((slot(rank), 0..bytes)),
            }
        } else {
            ExchangePlan {
                sends: Vec::new(),
                recvs: vec![Transfer {
                    peer: root,
                    bytes: 0..bytes,
                }],
                local: None,
            }
        }
    }

    /// All-to-all-v with per-peer element counts and displacements (in elements of `elem`
    /// bytes), as MPI and NCCL take them. All-to-all is the case of equal counts.
    /// The caller has checked that every range lies inside its buffer.
    pub fn alltoallv(
        rank: usize,
        n: usize,
        elem: usize,
        send_counts: &[usize],
        send_displs: &[usize],
        recv_counts: &[usize],
        recv_displs: &[usize],
    ) -> ExchangePlan {
        // Empty shares are 0..0 whatever their displacement, so they never index a buffer.
        let range = |displ: usize, count: usize| {
            if count == 0 {
                0..0
            } else {
                displ * elem..(displ + count) * elem
            }
        };
        ExchangePlan {
            sends: (0..n)
                .filter(|&p| p != rank)
                .map(|p| Transfer {
                    peer: p,
                    bytes: range(send_displs[p], send_counts[p]),
                })
                .collect(),
            recvs: (0..n)
                .filter(|&p| p != rank)
                .map(|p| Transfer {
                    peer: p,
                    bytes: range(recv_displs[p], recv_counts[p]),
                })
                .collect(),
            local: Some((
                range(send_displs[rank], send_counts[rank]),
                range(recv_displs[rank], recv_counts[rank]),
            )),
        }
    }
}

/// Progress of one incoming transfer.
#[derive(Debug)]
struct Incoming {
    peer: usize,
    bytes: Range<usize>,
    received: usize,
    /// At least one frame arrived (a zero-byte transfer is one empty frame).
    heard: bool,
}

impl Incoming {
    fn done(&self) -> bool {
        self.heard && self.received == self.bytes.len()
    }
}

/// Runs an [`ExchangePlan`]. Poll order as for every schedule: `poll_transmit` until `None`,
/// then `is_complete`. All sends are queued at once; the driver spreads them over the peers'
/// connections and writes as the sockets allow.
pub struct Exchange {
    desc: OpDesc,
    queue: VecDeque<Transmit>,
    /// Frames handed out and not yet reported sent.
    unsent_frames: usize,
    incoming: Vec<Incoming>,
}

impl Exchange {
    /// `mem.input` holds what this rank sends, `mem.user` what it receives; the local share is
    /// copied here, so the op's memory must be the op's from now on.
    pub fn new(
        desc: OpDesc,
        chunk_bytes: usize,
        plan: ExchangePlan,
        mem: &mut OpMemory,
    ) -> Exchange {
        if let Some((from, to)) = &plan.local {
            let src = &mem.input.as_slice()[from.clone()];
            let dst = &mem.user.as_slice()[to.clone()];
            // Gather's root may pass its own slot of the output as input, scatter's root its
            // own slot of the input as output: nothing to copy then.
            if src.as_ptr() != dst.as_ptr() {
                let src = src.to_vec();
                mem.user.as_mut_slice()[to.clone()].copy_from_slice(&src);
            }
        }
        let elem = desc.dtype.size();
        let mut queue = VecDeque::new();
        for t in &plan.sends {
            let count = (t.bytes.len() / elem) as u64;
            let mut frame = |offset: usize, len: usize| {
                let mut header = desc.header(desc.root as u32, offset, len);
                header.count = count;
                queue.push_back(Transmit {
                    to: Endpoint::Rank(t.peer),
                    header,
                    region: Region::Input {
                        offset: t.bytes.start + offset,
                        len,
                    },
                    forward: false,
                });
            };
            if t.bytes.is_empty() {
                frame(0, 0);
            }
            for c in chunks(0..t.bytes.len(), elem, chunk_bytes) {
                frame(c.start, c.len());
            }
        }
        let incoming = plan
            .recvs
            .into_iter()
            .map(|t| Incoming {
                peer: t.peer,
                bytes: t.bytes,
                received: 0,
                heard: false,
            })
            .collect();
        Exchange {
            desc,
            unsent_frames: queue.len(),
            queue,
            incoming,
        }
    }

    /// Check a frame against the call this rank made; the output range it fills and the index
    /// of its transfer.
    fn target(&self, from: Endpoint, h: &FrameHeader) -> Result<(usize, Range<usize>)> {
        let d = &self.desc;
        let peer = match from {
            Endpoint::Rank(p) => p,
            Endpoint::Relay(_) => {
                return Err(Error::remote(format!("{d}: unexpected data from {from}")));
            }
        };
        let Some(k) = self.incoming.iter().position(|t| t.peer == peer) else {
            return Err(Error::remote(format!(
                "{d}: unexpected data from {from}, which sends nothing to this rank in this op \
                 (mismatched roots or calls?)"
            )));
        };
        if h.coll != d.coll as u8 || h.dtype != d.dtype as u8 {
            // Same wording as the other schedules' mismatch reports.
            d.check_matches(from, h)?;
        }
        let rooted = matches!(d.coll, Collective::Gather | Collective::Scatter);
        if rooted && h.aux as usize != d.root {
            return Err(Error::invalid(format!(
                "mismatched collective calls: {from} called {} with root {} but this rank called {d}",
                d.coll.name(),
                h.aux
            )));
        }
        let t = &self.incoming[k];
        let elem = d.dtype.size();
        let expected = (t.bytes.len() / elem) as u64;
        if h.count != expected {
            return Err(Error::invalid(format!(
                "mismatched collective calls: {from} sends {} x {} to this rank in {d}, but this \
                 rank expects {expected}",
                h.count, d.dtype
            )));
        }
        let start = h.offset as usize;
        let len = h.len as usize;
        let end = start.saturating_add(len);
        if h.offset > usize::MAX as u64
            || end > t.bytes.len()
            || start % elem != 0
            || len % elem != 0
            || t.received + len > t.bytes.len()
        {
            return Err(Error::remote(format!(
                "{d}: {from} sent {len} bytes at offset {} of a {}-byte transfer ({} already \
                 received)",
                h.offset,
                t.bytes.len(),
                t.received
            )));
        }
        Ok((k, t.bytes.start + start..t.bytes.start + end))
    }

    fn landed(&mut self, k: usize, len: usize) {
        let t = &mut self.incoming[k];
        t.received += len;
        t.heard = true;
    }
}

impl Schedule for Exchange {
    fn desc(&self) -> &OpDesc {
        &self.desc
    }

    fn poll_transmit(&mut self, _mem: &mut OpMemory) -> Option<Transmit> {
        self.queue.pop_front()
    }

    fn handle_sent(&mut self, _t: &Transmit) {
        self.unsent_frames -= 1;
    }

    fn handle_frame(
        &mut self,
        mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
        payload: &[u8],
    ) -> Result<()> {
        let (k, r) = self.target(from, h)?;
        mem.user.as_mut_slice()[r].copy_from_slice(payload);
        self.landed(k, payload.len());
        Ok(())
    }

    fn recv_in_place(&mut self, from: Endpoint, h: &FrameHeader) -> Result<Option<Region>> {
        let (_, r) = self.target(from, h)?;
        Ok(Some(Region::User {
            offset: r.start,
            len: r.len(),
        }))
    }

    fn handle_frame_in_place(
        &mut self,
        _mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
    ) -> Result<()> {
        let (k, _) = self.target(from, h)?;
        self.landed(k, h.len as usize);
        Ok(())
    }

    fn is_complete(&self) -> bool {
        self.queue.is_empty() && self.unsent_frames == 0 && self.incoming.iter().all(Incoming::done)
    }

    fn waiting_for(&self) -> String {
        let missing: Vec<String> = self
            .incoming
            .iter()
            .filter(|t| !t.done())
            .map(|t| {
                format!(
                    "rank {} ({} of {} bytes)",
                    t.peer,
                    t.received,
                    t.bytes.len()
                )
            })
            .collect();
        format!(
            "data from {}; {} frames unsent",
            if missing.is_empty() {
                "nobody".to_string()
            } else {
                missing.join(", ")
            },
            self.unsent_frames
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cover_every_peer_once() {
        for n in 1..6 {
            for root in 0..n {
                for rank in 0..n {
                    let g = ExchangePlan::gather(rank, n, 8, root);
                    let s = ExchangePlan::scatter(rank, n, 8, root);
                    if rank == root {
                        assert_eq!(g.recvs.len(), n - 1);
                        assert_eq!(s.sends.len(), n - 1);
                        assert_eq!(g.local, Some((0..8, rank * 8..rank * 8 + 8)));
                        assert_eq!(s.local, Some((rank * 8..rank * 8 + 8, 0..8)));
                    } else {
                        assert_eq!(
                            g.sends,
                            vec![Transfer {
                                peer: root,
                                bytes: 0..8
                            }]
                        );
                        assert_eq!(
                            s.recvs,
                            vec![Transfer {
                                peer: root,
                                bytes: 0..8
                            }]
                        );
                    }
                }
            }
        }
        let p = ExchangePlan::alltoallv(1, 3, 4, &[1, 2, 3], &[0, 1, 3], &[3, 0, 1], &[1, 0, 4]);
        assert_eq!(
            p.sends,
            vec![
                Transfer {
                    peer: 0,
                    bytes: 0..4
                },
                Transfer {
                    peer: 2,
                    bytes: 12..24
                }
            ]
        );
        assert_eq!(
            p.recvs,
            vec![
                Transfer {
                    peer: 0,
                    bytes: 4..16
                },
                Transfer {
                    peer: 2,
                    bytes: 16..20
                }
            ]
        );
        assert_eq!(p.local, Some((4..12, 0..0)));
        // Empty shares never point into a buffer.
        let p = ExchangePlan::alltoallv(0, 2, 4, &[0, 0], &[9, 9], &[0, 0], &[7, 7]);
        assert!(p.sends.iter().chain(&p.recvs).all(|t| t.bytes == (0..0)));
    }
}

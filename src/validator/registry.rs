//! The validator's state: registered relays (pinned keys, liveness, scores) and the jobs it
//! assigned. Pure bookkeeping: no sockets, time passed in.
//!
//! Score of a relay (documented in docs/operators.md):
//! `raw = correctness × availability × (1 + throughput MB/s) × (1 + ln(1 + verified ops))
//!        × (1 + ln(1 + capacity GiB))`,
//! split evenly among relays that share one IP address, then normalised so the weights of all
//! relays sum to 1. `correctness` drops to 0 for good after one failed verification.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The persistent part of a relay's record, as written to the scores file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RelayScore {
    pub id: String,
    pub addr: String,
    pub ip: String,
    /// Measured throughput, MB/s (exponentially weighted).
    pub throughput_mbps: f64,
    /// Memory the relay offers jobs, bytes.
    pub capacity: u64,
    /// Fraction of recent liveness checks the relay passed.
    pub availability: f64,
    /// 1 until a verification fails, then 0 for good.
    pub correctness: f64,
    pub verified_ops: u64,
    pub failed_ops: u64,
    pub excluded: bool,
    /// Why the relay was excluded.
    #[serde(default)]
    pub evidence: Vec<String>,
    /// Raw score after the IP split.
    pub score: f64,
    /// Normalised weight; the weights of all relays sum to 1.
    pub weight: f64,
}

/// The scores file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScoresFile {
    pub relays: Vec<RelayScore>,
}

/// A registered relay.
pub struct RelayEntry {
    pub score: RelayScore,
    pub key: [u8; 32],
    pub free_memory: u64,
    pub last_seen: Option<Instant>,
    /// Connection generation: bumped on each registration so a stale connection's end does
    /// not mark a re-registered relay unavailable.
    pub generation: u64,
}

impl RelayEntry {
    pub fn available(&self, now: Instant, timeout: Duration) -> bool {
        !self.score.excluded
            && self
                .last_seen
                .is_some_and(|t| now.duration_since(t) <= timeout)
    }
}

/// What the validator knows.
#[derive(Default)]
pub struct Registry {
    pub relays: HashMap<String, RelayEntry>,
}

/// What a registering relay offers.
#[derive(Clone, Copy, Debug)]
pub struct Offer<'a> {
    /// Address peers connect to.
    pub addr: &'a str,
    /// Memory jobs may reserve, bytes.
    pub capacity: u64,
    /// Memory available now, bytes.
    pub free_memory: u64,
}

/// Outcome of a registration attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Known relay (or newly enrolled); the connection generation.
    Admitted(u64),
    /// The relay id is unknown and no key was offered.
    Unknown,
}

impl Registry {
    /// Load scores and pinned keys written by [`Registry::save`].
    pub fn load(scores: &Path) -> crate::Result<Registry> {
        let mut reg = Registry::default();
        if !scores.exists() {
            return Ok(reg);
        }
        let read = |p: &Path| {
            std::fs::read(p)
                .map_err(|e| crate::Error::io(format!("cannot read {}", p.display()), e))
        };
        let file: ScoresFile = serde_json::from_slice(&read(scores)?).map_err(|e| {
            crate::Error::invalid(format!("{} is not a scores file: {e}", scores.display()))
        })?;
        let keys_path = keys_path(scores);
        let keys: HashMap<String, String> = if keys_path.exists() {
            serde_json::from_slice(&read(&keys_path)?).map_err(|e| {
                crate::Error::invalid(format!("{} is malformed: {e}", keys_path.display()))
            })?
        } else {
            HashMap::new()
        };
        for s in file.relays {
            let Some(key) = keys
                .get(&s.id)
                .and_then(|k| crate::config::parse_hex("key", k).ok())
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
            else {
                log::warn!(
                    "relay {}: no pinned key in {}; it must enroll again",
                    s.id,
                    keys_path.display()
                );
                continue;
            };
            reg.relays.insert(
                s.id.clone(),
                RelayEntry {
                    score: s,
                    key,
                    free_memory: 0,
                    last_seen: None,
                    generation: 0,
                },
            );
        }
        Ok(reg)
    }

    /// Write the scores file and, next to it, the pinned keys (each atomically: tmp + rename).
    pub fn save(&self, scores: &Path) -> crate::Result<()> {
        let mut file = ScoresFile {
            relays: self.relays.values().map(|e| e.score.clone()).collect(),
        };
        file.relays.sort_by(|a, b| a.id.cmp(&b.id));
        let keys: HashMap<&String, String> = self
            .relays
            .iter()
            .map(|(id, e)| (id, crate::config::to_hex(&e.key)))
            .collect();
        write_atomic(
            &keys_path(scores),
            &serde_json::to_vec_pretty(&keys).expect("json"),
        )?;
        write_atomic(scores, &serde_json::to_vec_pretty(&file).expect("json"))
    }

    /// Admit relay `id` (offering `offer`) proving `key_ok(pinned key)`; an unknown id enrolls with `enroll`.
    /// Returns `Err` with the reason when the proof fails.
    pub fn admit(
        &mut self,
        id: &str,
        offer: Offer<'_>,
        enroll: Option<[u8; 32]>,
        key_ok: impl Fn(&[u8; 32]) -> bool,
        now: Instant,
    ) -> Result<Admission, String> {
        let entry = match self.relays.get_mut(id) {
            Some(e) => {
                if !key_ok(&e.key) {
                    return Err(format!(
                        "relay {id}: authentication failed (the key does not match the one pinned at first registration)"
                    ));
                }
                e
            }
            None => {
                let Some(key) = enroll else {
                    return Ok(Admission::Unknown);
                };
                if !key_ok(&key) {
                    return Err(format!(
                        "relay {id}: enrollment proof does not match the key offered"
                    ));
                }
                if relay_id(&key) != id {
                    return Err(format!(
                        "relay {id}: the id is not derived from the key offered"
                    ));
                }
                log::info!("relay {id} at {}: enrolled (key pinned)", offer.addr);
                self.relays.entry(id.to_string()).or_insert(RelayEntry {
                    score: RelayScore {
                        id: id.to_string(),
                        correctness: 1.0,
                        availability: 1.0,
                        ..RelayScore::default()
                    },
                    key,
                    free_memory: 0,
                    last_seen: None,
                    generation: 0,
                })
            }
        };
        entry.score.addr = offer.addr.to_string();
        entry.score.ip = ip_of(offer.addr);
        entry.score.capacity = offer.capacity;
        entry.free_memory = offer.free_memory;
        entry.last_seen = Some(now);
        entry.generation += 1;
        let generation = entry.generation;
        self.rescore();
        Ok(Admission::Admitted(generation))
    }

    pub fn heartbeat(&mut self, id: &str, generation: u64, free_memory: u64, now: Instant) {
        if let Some(e) = self.relays.get_mut(id) {
            if e.generation == generation {
                e.free_memory = free_memory;
                e.last_seen = Some(now);
            }
        }
    }

    /// The relay's connection `generation` ended.
    pub fn disconnected(&mut self, id: &str, generation: u64) {
        if let Some(e) = self.relays.get_mut(id) {
            if e.generation == generation {
                e.last_seen = None;
            }
        }
    }

    /// Relays that can take a job needing `memory` bytes each, best first.
    pub fn candidates(&self, memory: u64, now: Instant, timeout: Duration) -> Vec<String> {
        let mut c: Vec<&RelayEntry> = self
            .relays
            .values()
            .filter(|e| e.available(now, timeout) && e.free_memory.min(e.score.capacity) >= memory)
            .collect();
        c.sort_by(|a, b| {
            b.score
                .weight
                .total_cmp(&a.score.weight)
                .then(b.free_memory.cmp(&a.free_memory))
                .then(a.score.id.cmp(&b.score.id))
        });
        c.into_iter().map(|e| e.score.id.clone()).collect()
    }

    /// Relay `id` failed verification: exclude it for good, score zero, keep the evidence.
    pub fn convict(&mut self, id: &str, evidence: &str) {
        if let Some(e) = self.relays.get_mut(id) {
            log::error!(
                "relay {id} at {}: verification failed, excluded: {evidence}",
                e.score.addr
            );
            e.score.correctness = 0.0;
            e.score.excluded = true;
            e.score.failed_ops += 1;
            if e.score.evidence.len() < 16 {
                e.score.evidence.push(evidence.to_string());
            }
        }
    }

    /// Relay `id` passed a verified op moving `mbps` MB/s (if measured).
    pub fn credit(&mut self, id: &str, mbps: Option<f64>) {
        if let Some(e) = self.relays.get_mut(id).filter(|e| !e.score.excluded) {
            e.score.verified_ops += 1;
            if let Some(m) = mbps {
                self.note_throughput(id, m);
            }
        }
    }

    pub fn note_throughput(&mut self, id: &str, mbps: f64) {
        if let Some(e) = self.relays.get_mut(id) {
            let t = &mut e.score.throughput_mbps;
            *t = if *t == 0.0 {
                mbps
            } else {
                0.7 * *t + 0.3 * mbps
            };
        }
    }

    /// One liveness sample per relay, then recompute scores and weights.
    pub fn tick(&mut self, now: Instant, timeout: Duration) {
        for e in self.relays.values_mut() {
            let up = if e.available(now, timeout) { 1.0 } else { 0.0 };
            e.score.availability = 0.9 * e.score.availability + 0.1 * up;
        }
        self.rescore();
    }

    /// Recompute raw scores (with the IP split) and normalised weights.
    pub fn rescore(&mut self) {
        let mut per_ip: HashMap<String, usize> = HashMap::new();
        for e in self.relays.values() {
            *per_ip.entry(e.score.ip.clone()).or_default() += 1;
        }
        for e in self.relays.values_mut() {
            let s = &e.score;
            let gib = s.capacity as f64 / (1u64 << 30) as f64;
            let raw = s.correctness
                * s.availability
                * (1.0 + s.throughput_mbps)
                * (1.0 + (1.0 + s.verified_ops as f64).ln())
                * (1.0 + gib.ln_1p());
            e.score.score = raw / per_ip[&e.score.ip] as f64;
        }
        let total: f64 = self.relays.values().map(|e| e.score.score).sum();
        for e in self.relays.values_mut() {
            e.score.weight = if total > 0.0 {
                e.score.score / total
            } else {
                0.0
            };
        }
    }
}

/// Stable relay id derived from its key (so an id cannot be claimed with another key).
pub fn relay_id(key: &[u8]) -> String {
    crate::config::to_hex(&blake3::derive_key("mapreduce relay id v1", key)[..8])
}

/// The IP part of `host:port`.
pub fn ip_of(addr: &str) -> String {
    addr.parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_string())
}

/// Where the pinned relay keys live, next to the scores file.
pub fn keys_path(scores: &Path) -> PathBuf {
    let mut s = scores.as_os_str().to_owned();
    s.push(".keys");
    PathBuf::from(s)
}

/// Write `data` to `path` via a temporary file and a rename, so readers never see half a file.
pub fn write_atomic(path: &Path, data: &[u8]) -> crate::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, data)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| crate::Error::io(format!("cannot write {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enroll(reg: &mut Registry, key: [u8; 32], addr: &str, now: Instant) -> String {
        let id = relay_id(&key);
        let a = reg.admit(
            &id,
            Offer {
                addr,
                capacity: 1 << 30,
                free_memory: 1 << 30,
            },
            Some(key),
            |k| k == &key,
            now,
        );
        assert!(matches!(a, Ok(Admission::Admitted(_))));
        id
    }

    #[test]
    fn pinned_key_is_required_after_first_registration() {
        let mut reg = Registry::default();
        let now = Instant::now();
        let key = [1u8; 32];
        let id = relay_id(&key);
        assert_eq!(
            reg.admit(
                &id,
                Offer {
                    addr: "127.0.0.1:1",
                    capacity: 0,
                    free_memory: 0
                },
                None,
                |_| true,
                now
            ),
            Ok(Admission::Unknown)
        );
        enroll(&mut reg, key, "127.0.0.1:1", now);
        let other = [2u8; 32];
        assert!(reg
            .admit(
                &id,
                Offer {
                    addr: "127.0.0.1:1",
                    capacity: 0,
                    free_memory: 0
                },
                Some(other),
                |k| k == &other,
                now
            )
            .is_err());
        // An id that is not derived from the offered key cannot enroll.
        assert!(reg
            .admit(
                "feedbeef",
                Offer {
                    addr: "x:1",
                    capacity: 0,
                    free_memory: 0
                },
                Some(other),
                |k| k == &other,
                now
            )
            .is_err());
    }

    #[test]
    fn weights_split_by_ip_and_sum_to_one() {
        let mut reg = Registry::default();
        let now = Instant::now();
        let a = enroll(&mut reg, [1; 32], "10.0.0.1:1", now);
        let b = enroll(&mut reg, [2; 32], "10.0.0.2:1", now);
        let c = enroll(&mut reg, [3; 32], "10.0.0.2:2", now);
        reg.rescore();
        let w = |id: &str| reg.relays[id].score.weight;
        assert!((w(&a) + w(&b) + w(&c) - 1.0).abs() < 1e-9);
        assert!((w(&a) - 2.0 * w(&b)).abs() < 1e-9);
        reg.convict(&a, "test");
        reg.rescore();
        assert_eq!(reg.relays[&a].score.weight, 0.0);
        assert!(reg
            .candidates(0, now, Duration::from_secs(5))
            .iter()
            .all(|id| id != &a));
    }
}

//! The validator's state: registered relays (pinned keys, liveness, scores) and the jobs it
//! assigned. Pure bookkeeping: no sockets, time passed in.
//!
//! Score of a relay (documented in docs/operators.md):
//! `raw = address proven × correctness × availability × (1 + throughput MB/s)
//!        × (1 + ln(1 + verified ops)) × (1 + ln(1 + capacity GiB))`,
//! split evenly among relays that share one IP address, then normalised so the weights of all
//! relays sum to 1. `correctness` drops to 0 for good after one failed verification.
//! Nothing a relay says about itself counts unmeasured: throughput comes from the benchmark
//! bots only, capacity is capped by what the bots exercised, the IP is the one the validator
//! sees, and a relay scores (and is assigned) only after proving its key at its advertised
//! address.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
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
    /// The relay proved its key at `addr` (checked on every registration).
    #[serde(default)]
    pub addr_verified: bool,
    /// Most memory a benchmark job reserved on the relay and verified, bytes; the capacity
    /// scores count is capped by it.
    #[serde(default)]
    pub bench_capacity: u64,
    /// Why the relay was excluded: `"<evidence id>: <evidence>"`, the id being the first 12
    /// hex digits of the evidence's blake3 (as logged when the relay was excluded).
    #[serde(default)]
    pub evidence: Vec<String>,
    /// Time of the first exclusion, seconds since the Unix epoch (0: never excluded).
    #[serde(default)]
    pub excluded_at: u64,
    /// Raw score after the IP split.
    pub score: f64,
    /// Normalised weight; the weights of all relays sum to 1.
    pub weight: f64,
}

/// The scores file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScoresFile {
    pub relays: Vec<RelayScore>,
    /// Clients whose reports did not check out (older files have none).
    #[serde(default)]
    pub flagged_clients: Vec<FlaggedClient>,
}

/// A client whose reports did not check out against the relays' signatures.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlaggedClient {
    pub client: String,
    /// Reports that did not check out.
    pub reports: u64,
    /// `"<evidence id>: <evidence>"` of the last one.
    pub last_evidence: String,
}

/// A registered relay.
pub struct RelayEntry {
    pub score: RelayScore,
    /// The relay's identity: its sr25519 public key (its id is this in hex).
    pub key: [u8; 32],
    pub free_memory: u64,
    /// Last heartbeat of the live connection; `None` while disconnected.
    pub last_seen: Option<Instant>,
    /// Last time the relay was heard from at all (for pruning stale relays).
    pub last_contact: Instant,
    /// Connection generation: bumped on each registration so a stale connection's end does
    /// not mark a re-registered relay unavailable.
    pub generation: u64,
}

impl RelayEntry {
    pub fn available(&self, now: Instant, timeout: Duration) -> bool {
        !self.score.excluded
            && self.score.addr_verified
            && self
                .last_seen
                .is_some_and(|t| now.duration_since(t) <= timeout)
    }
}

/// Limits on what strangers can add to the registry.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most relays registered at once.
    pub max_relays: usize,
    /// New relays one IP address may enroll per minute (burst of as many).
    pub enroll_per_minute: u32,
    /// A relay that never passed a verified op and has not been heard from for this long
    /// is forgotten.
    pub stale_after: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_relays: 10_000,
            enroll_per_minute: 10,
            stale_after: Duration::from_secs(600),
        }
    }
}

/// Enrollment budget of one IP address: a token bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// What the validator knows.
#[derive(Default)]
pub struct Registry {
    pub relays: HashMap<String, RelayEntry>,
    pub limits: Limits,
    buckets: HashMap<String, Bucket>,
    /// Enrollments refused by the rate limit (for the log and tests).
    pub refused_enrollments: u64,
    /// Clients whose reports did not check out, by client (the entries' `client` is unused).
    pub flagged: HashMap<String, FlaggedClient>,
    /// With a chain file (`mr-validator --chain`): the relays the subnet lets serve. `None`
    /// without one; `Some` with no relays until the file was first read.
    pub chain: Option<crate::validator::chain::ChainView>,
}

/// Most IP addresses whose enrollment budget is tracked; full buckets are dropped first.
const MAX_BUCKETS: usize = 4096;

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
        let now = Instant::now();
        for f in file.flagged_clients {
            reg.flagged.insert(f.client.clone(), f);
        }
        for s in file.relays {
            let Ok(key) = crate::validator::identity::parse_public("relay id", &s.id) else {
                log::warn!(
                    "relay {}: not a public key (a scores file of an older version); it must enroll again",
                    s.id
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
                    last_contact: now,
                    generation: 0,
                },
            );
        }
        Ok(reg)
    }

    /// The scores file's contents.
    pub fn encode(&self) -> Vec<u8> {
        let mut file = ScoresFile {
            relays: self.relays.values().map(|e| e.score.clone()).collect(),
            flagged_clients: self
                .flagged
                .iter()
                .map(|(k, f)| FlaggedClient {
                    client: k.clone(),
                    ..f.clone()
                })
                .collect(),
        };
        file.relays.sort_by(|a, b| a.id.cmp(&b.id));
        file.flagged_clients.sort_by(|a, b| a.client.cmp(&b.client));
        serde_json::to_vec_pretty(&file).expect("json")
    }

    /// Write the scores file (atomically: tmp + rename). Relay ids are their public keys, so
    /// the file pins every relay's key too.
    pub fn save(&self, scores: &Path) -> crate::Result<()> {
        write_atomic(scores, &self.encode())
    }

    /// Admit the relay whose identity is `key` (it proved it), registering from `seen` (the
    /// address the validator sees) and offering `offer`. A relay the validator does not know
    /// yet enrolls, within the per-IP rate limit and the registry's cap. Returns the
    /// connection generation, or why the relay is refused.
    pub fn admit(
        &mut self,
        key: [u8; 32],
        offer: Offer<'_>,
        seen: std::net::IpAddr,
        now: Instant,
    ) -> Result<u64, String> {
        let id = relay_id(&key);
        let ip = seen.to_string();
        if !self.relays.contains_key(&id) {
            if self.relays.len() >= self.limits.max_relays {
                self.prune(now);
            }
            if self.relays.len() >= self.limits.max_relays {
                self.refused_enrollments += 1;
                return Err(format!(
                    "relay {id}: the validator is full ({} relays)",
                    self.relays.len()
                ));
            }
            if !self.take_enrollment(&ip, now) {
                self.refused_enrollments += 1;
                return Err(format!(
                    "relay {id}: too many enrollments from {ip}; try again in a minute"
                ));
            }
            log::info!("relay {id} at {} (from {ip}): enrolled", offer.addr);
            self.relays.insert(
                id.clone(),
                RelayEntry {
                    score: RelayScore {
                        id: id.clone(),
                        correctness: 1.0,
                        availability: 1.0,
                        ..RelayScore::default()
                    },
                    key,
                    free_memory: 0,
                    last_seen: None,
                    last_contact: now,
                    generation: 0,
                },
            );
        }
        let entry = self.relays.get_mut(&id).expect("admitted");
        // Proven again on every registration, before the relay is assigned.
        entry.score.addr_verified = false;
        entry.score.addr = offer.addr.to_string();
        entry.score.ip = ip;
        entry.score.capacity = offer.capacity;
        entry.free_memory = offer.free_memory;
        entry.last_seen = Some(now);
        entry.last_contact = now;
        entry.generation += 1;
        let generation = entry.generation;
        self.rescore();
        Ok(generation)
    }

    /// Spend one enrollment of `ip`'s budget, if it has one left.
    fn take_enrollment(&mut self, ip: &str, now: Instant) -> bool {
        let per_minute = f64::from(self.limits.enroll_per_minute.max(1));
        let refill = |b: &Bucket| {
            (b.tokens + now.duration_since(b.at).as_secs_f64() * per_minute / 60.0).min(per_minute)
        };
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(ip) {
            self.buckets.retain(|_, b| refill(b) < per_minute);
            if self.buckets.len() >= MAX_BUCKETS {
                return false;
            }
        }
        let b = self.buckets.entry(ip.to_string()).or_insert(Bucket {
            tokens: per_minute,
            at: now,
        });
        b.tokens = refill(b);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the registration `generation` of relay `id` is still the current one.
    pub fn is_current(&self, id: &str, generation: u64) -> bool {
        self.relays
            .get(id)
            .is_some_and(|e| e.generation == generation)
    }

    /// The relay proved (or failed to prove) its key at its advertised address `addr`.
    pub fn address_checked(&mut self, id: &str, generation: u64, addr: &str, ok: bool) {
        if let Some(e) = self.relays.get_mut(id) {
            if e.generation == generation && e.score.addr == addr {
                e.score.addr_verified = ok;
                self.rescore();
            }
        }
    }

    /// A benchmark job reserving `bytes` on relay `id` completed and checked out.
    pub fn note_bench_capacity(&mut self, id: &str, bytes: u64) {
        if let Some(e) = self.relays.get_mut(id) {
            e.score.bench_capacity = e.score.bench_capacity.max(bytes);
        }
    }

    /// Forget relays that are not connected, never passed a verified op, are not excluded
    /// (exclusions and their evidence are kept) and were last heard from `stale_after` ago.
    pub fn prune(&mut self, now: Instant) -> usize {
        let stale = self.limits.stale_after;
        let before = self.relays.len();
        self.relays.retain(|_, e| {
            e.last_seen.is_some()
                || e.score.excluded
                || e.score.verified_ops > 0
                || now.duration_since(e.last_contact) < stale
        });
        let pruned = before - self.relays.len();
        if pruned > 0 {
            log::info!("forgot {pruned} stale relays");
            self.rescore();
        }
        pruned
    }

    pub fn heartbeat(&mut self, id: &str, generation: u64, free_memory: u64, now: Instant) {
        if let Some(e) = self.relays.get_mut(id) {
            if e.generation == generation {
                e.free_memory = free_memory;
                e.last_seen = Some(now);
                e.last_contact = now;
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
            .filter(|e| {
                e.available(now, timeout)
                    && self.on_chain(e)
                    && e.free_memory.min(e.score.capacity) >= memory
            })
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
    /// Returns the evidence id.
    pub fn convict(&mut self, id: &str, evidence: &str) -> String {
        let eid = evidence_id(evidence);
        if let Some(e) = self.relays.get_mut(id) {
            log::error!(
                "relay {id} at {}: verification failed, excluded; evidence {eid}: {evidence}",
                e.score.addr
            );
            e.score.correctness = 0.0;
            if !e.score.excluded {
                e.score.excluded_at = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
            }
            e.score.excluded = true;
            e.score.failed_ops += 1;
            if e.score.evidence.len() < 16 {
                e.score.evidence.push(format!("{eid}: {evidence}"));
            }
        }
        eid
    }

    /// Relay `id` passed a verified op. (Throughput reported by peers is not counted: only
    /// the benchmark bots measure it.)
    pub fn credit(&mut self, id: &str) {
        if let Some(e) = self.relays.get_mut(id).filter(|e| !e.score.excluded) {
            e.score.verified_ops += 1;
        }
    }

    /// The benchmark bots measured `mbps` MB/s through relay `id`.
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

    /// Whether the subnet lets relay `e` serve: always without a chain file; with one, when
    /// its hotkey serves the address the relay registered with.
    pub fn on_chain(&self, e: &RelayEntry) -> bool {
        self.chain.as_ref().map_or(true, |c| {
            c.refuse_relay(&e.score.id, &e.score.addr).is_none()
        })
    }

    /// Why the subnet does not let relay `id` serve, if it does not.
    pub fn chain_refusal(&self, id: &str) -> Option<String> {
        let e = self.relays.get(id)?;
        self.chain
            .as_ref()
            .and_then(|c| c.refuse_relay(&e.score.id, &e.score.addr))
    }

    /// Recompute raw scores (with the IP split) and normalised weights. Relays the subnet
    /// does not let serve score zero and do not count in the split.
    pub fn rescore(&mut self) {
        let mut per_ip: HashMap<String, usize> = HashMap::new();
        let eligible: HashSet<String> = self
            .relays
            .values()
            .filter(|e| self.on_chain(e))
            .map(|e| e.score.id.clone())
            .collect();
        for e in self.relays.values() {
            if eligible.contains(&e.score.id) {
                *per_ip.entry(e.score.ip.clone()).or_default() += 1;
            }
        }
        for e in self.relays.values_mut() {
            if !eligible.contains(&e.score.id) {
                e.score.score = 0.0;
                continue;
            }
            let s = &e.score;
            let gib = s.capacity.min(s.bench_capacity) as f64 / (1u64 << 30) as f64;
            let proven = if s.addr_verified { 1.0 } else { 0.0 };
            let raw = proven
                * s.correctness
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

/// The id of a piece of evidence: the first 12 hex digits of its blake3.
pub fn evidence_id(evidence: &str) -> String {
    blake3::hash(evidence.as_bytes()).to_hex()[..12].to_string()
}

/// A relay's id: its public key in hex (so an id cannot be claimed with another key).
pub fn relay_id(key: &[u8]) -> String {
    crate::config::to_hex(key)
}

/// The IP part of `host:port`.
pub fn ip_of(addr: &str) -> String {
    addr.parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_string())
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
    use std::net::IpAddr;

    fn offer(addr: &str) -> Offer<'_> {
        Offer {
            addr,
            capacity: 1 << 30,
            free_memory: 1 << 30,
        }
    }

    fn enroll(reg: &mut Registry, seed: u8, addr: &str, now: Instant) -> String {
        let key = [seed; 32];
        let ip: IpAddr = ip_of(addr).parse().unwrap();
        let g = reg.admit(key, offer(addr), ip, now).unwrap();
        let id = relay_id(&key);
        reg.address_checked(&id, g, addr, true);
        id
    }

    #[test]
    fn a_relay_scores_and_is_assigned_only_after_proving_its_address() {
        let mut reg = Registry::default();
        let now = Instant::now();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let g = reg.admit([1; 32], offer("10.0.0.1:1"), ip, now).unwrap();
        let id = relay_id(&[1; 32]);
        let t = Duration::from_secs(5);
        assert!(reg.candidates(0, now, t).is_empty());
        assert_eq!(reg.relays[&id].score.weight, 0.0);
        reg.address_checked(&id, g, "10.0.0.1:1", true);
        assert_eq!(reg.candidates(0, now, t), vec![id.clone()]);
        // Every registration needs a new proof.
        reg.admit([1; 32], offer("10.0.0.1:1"), ip, now).unwrap();
        assert!(reg.candidates(0, now, t).is_empty());
    }

    #[test]
    fn enrollment_is_rate_limited_per_ip_and_capped() {
        let mut reg = Registry {
            limits: Limits {
                max_relays: 50,
                enroll_per_minute: 5,
                stale_after: Duration::from_secs(60),
            },
            ..Registry::default()
        };
        let now = Instant::now();
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let admitted = (0..1000u32)
            .filter(|i| {
                let mut key = [0u8; 32];
                key[..4].copy_from_slice(&i.to_le_bytes());
                reg.admit(key, offer("10.0.0.9:1"), ip, now).is_ok()
            })
            .count();
        assert_eq!(admitted, 5);
        // A minute later, five more; other addresses have their own budget, up to the cap.
        let later = now + Duration::from_secs(60);
        let more = (1000..1100u32)
            .filter(|i| {
                let mut key = [0u8; 32];
                key[..4].copy_from_slice(&i.to_le_bytes());
                let ip: IpAddr = format!("10.1.{}.{}", i / 256, i % 256).parse().unwrap();
                reg.admit(key, offer("10.0.0.9:1"), ip, later).is_ok()
            })
            .count();
        assert_eq!(more, 45);
        assert_eq!(reg.relays.len(), 50);
        // Disconnected, never verified relays are pruned once stale.
        for e in reg.relays.values_mut() {
            e.last_seen = None;
        }
        assert_eq!(reg.prune(later + Duration::from_secs(61)), 50);
    }

    #[test]
    fn flagged_clients_survive_a_reload() {
        let mut reg = Registry::default();
        reg.flagged.insert(
            "ab".repeat(32),
            FlaggedClient {
                client: String::new(),
                reports: 3,
                last_evidence: "e1: job x: forged".into(),
            },
        );
        let dir = std::env::temp_dir().join(format!("mr-flags-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("scores.json");
        reg.save(&path).unwrap();
        let back = Registry::load(&path).unwrap();
        let f = &back.flagged[&"ab".repeat(32)];
        assert_eq!(
            (f.reports, f.last_evidence.as_str()),
            (3, "e1: job x: forged")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn weights_split_by_ip_and_sum_to_one() {
        let mut reg = Registry::default();
        let now = Instant::now();
        let a = enroll(&mut reg, 1, "10.0.0.1:1", now);
        let b = enroll(&mut reg, 2, "10.0.0.2:1", now);
        let c = enroll(&mut reg, 3, "10.0.0.2:2", now);
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

    #[test]
    fn claimed_capacity_counts_only_as_far_as_benchmarks_exercised_it() {
        let mut reg = Registry::default();
        let now = Instant::now();
        let a = enroll(&mut reg, 1, "10.0.0.1:1", now);
        let b = enroll(&mut reg, 2, "10.0.0.2:1", now);
        reg.relays.get_mut(&a).unwrap().score.capacity = 1 << 40;
        reg.rescore();
        assert_eq!(reg.relays[&a].score.score, reg.relays[&b].score.score);
        reg.note_bench_capacity(&b, 1 << 30);
        reg.rescore();
        assert!(reg.relays[&b].score.score > reg.relays[&a].score.score);
    }
}

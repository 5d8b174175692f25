//! A relay's registration with a validator (`mr-relayd --validator`): authenticate with the
//! relay's identity key (created on first start; the relay's id is its public key), send
//! heartbeats, install the jobs the validator assigns so the event loop accepts their peers,
//! and prove the key to whoever asks at the relay's own address ([`Grants::prove`]), which is
//! how the validator checks an advertised address. Reconnects after any failure, so restarts
//! on either side heal.

use crate::error::{Error, Result};
use crate::relay::receipts::{Entry, Ledger, Receipt, Reduction, MAX_LEDGERS};
use crate::validator::channel::{self, ChannelWriter, Credential};
use crate::validator::identity::Identity;
use crate::validator::proto::{Intro, RelayMsg};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most jobs remembered; past it the oldest grant is forgotten first.
const MAX_GRANTS: usize = 4096;

/// Hello body prefix of an address proof request (followed by the asker's 32-byte nonce).
pub const PROOF_REQUEST: &[u8] = b"mapreduce address proof v1";

/// What the relay signs to prove its key at its address: the asker's nonce and the relay's
/// challenge nonce of that connection.
pub fn proof_message(asker: &[u8; 32], challenge: &[u8; 32]) -> Vec<u8> {
    [PROOF_REQUEST, &asker[..], &challenge[..]].concat()
}

/// The asker's nonce, if `body` is an address proof request.
pub fn proof_request(body: &[u8]) -> Option<[u8; 32]> {
    body.strip_prefix(PROOF_REQUEST)?.try_into().ok()
}

struct Grant {
    key: [u8; 32],
    expires: Instant,
}

#[derive(Default)]
struct GrantTable {
    by_job: HashMap<[u8; 16], Grant>,
    /// Jobs in the order granted, to forget the oldest first.
    order: VecDeque<[u8; 16]>,
}

/// Jobs granted by the validator (job id → the MAC key its peers must prove), each for a
/// limited time, and the relay's identity for address proofs.
pub struct Grants {
    table: Mutex<GrantTable>,
    identity: Option<Arc<Identity>>,
    /// Receipts of granted jobs (kept only by a relay with an identity to sign them).
    ledgers: Mutex<Ledgers>,
}

/// Ledgers of recent jobs, least recently used dropped first.
#[derive(Default)]
struct Ledgers {
    by_job: HashMap<[u8; 16], (Ledger, u64)>,
    clock: u64,
}

impl std::fmt::Debug for Grants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Grants({} jobs, {:?})", self.len(), self.identity)
    }
}

/// Shared by the registration thread and the relay's event loop.
pub type JobGrants = Arc<Grants>;

impl Grants {
    pub fn new(identity: Option<Arc<Identity>>) -> JobGrants {
        Arc::new(Grants {
            table: Mutex::new(GrantTable::default()),
            identity,
            ledgers: Mutex::new(Ledgers::default()),
        })
    }

    /// The MAC key of `job`'s peers, while its grant lasts.
    pub fn key(&self, job: &[u8; 16]) -> Option<[u8; 32]> {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.by_job
            .get(job)
            .filter(|g| g.expires > Instant::now())
            .map(|g| g.key)
    }

    /// Grant `job` (peers prove `token`) for `ttl`; expired grants and, past
    /// [`MAX_GRANTS`], the oldest ones are forgotten one by one.
    pub fn grant(&self, job: [u8; 16], token: &[u8], ttl: Duration, now: Instant) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(oldest) = t.order.front().copied() {
            let expired = t.by_job.get(&oldest).map_or(true, |g| g.expires <= now);
            if !expired && t.by_job.len() < MAX_GRANTS {
                break;
            }
            t.order.pop_front();
            t.by_job.remove(&oldest);
        }
        let fresh = Grant {
            key: crate::wire::mac_key(token),
            expires: now + ttl,
        };
        if t.by_job.insert(job, fresh).is_none() {
            t.order.push_back(job);
        }
    }

    pub fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_job
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the relay keeps receipts (it has an identity to sign them with).
    pub fn keeps_receipts(&self) -> bool {
        self.identity.is_some()
    }

    /// Record a chunk of op `seq` of `job`, which the relay reduced as `reduction` (see
    /// [`Ledger::note`]).
    pub fn note(&self, job: &[u8; 16], seq: u64, reduction: Reduction, entry: Entry) {
        if !self.keeps_receipts() {
            return;
        }
        let mut l = self.ledgers.lock().unwrap_or_else(|e| e.into_inner());
        l.clock += 1;
        let clock = l.clock;
        if !l.by_job.contains_key(job) && l.by_job.len() >= MAX_LEDGERS {
            if let Some(oldest) = l.by_job.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| *k) {
                l.by_job.remove(&oldest);
            }
        }
        let (ledger, used) = l.by_job.entry(*job).or_default();
        *used = clock;
        ledger.note(seq, reduction, entry);
    }

    /// Op `seq` of `job` failed at the relay: it signs nothing for it (see [`Ledger::fail`]).
    pub fn fail(&self, job: &[u8; 16], seq: u64) {
        if !self.keeps_receipts() {
            return;
        }
        let mut l = self.ledgers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((ledger, _)) = l.by_job.get_mut(job) {
            ledger.fail(seq);
        }
    }

    /// The signed receipt of op `seq` of `job` covering byte `positions`: public key (32),
    /// signature (64), then [`Receipt::message`]. `None` without an identity.
    pub fn signed_receipt(&self, job: &[u8; 16], seq: u64, positions: &[u64]) -> Option<Vec<u8>> {
        let id = self.identity.as_ref()?;
        let receipt = {
            let l = self.ledgers.lock().unwrap_or_else(|e| e.into_inner());
            match l.by_job.get(job) {
                Some((ledger, _)) => ledger.receipt(*job, seq, positions),
                None => Receipt {
                    job: *job,
                    seq,
                    reduction: None,
                    entries: Vec::new(),
                },
            }
        };
        let msg = receipt.message();
        let mut p = id.public().to_vec();
        p.extend_from_slice(&id.sign(&msg));
        p.extend_from_slice(&msg);
        Some(p)
    }

    /// Answer an address proof request: the relay's public key and its signature of
    /// [`proof_message`]. `None` without an identity.
    pub fn prove(&self, asker: &[u8; 32], challenge: &[u8; 32]) -> Option<Vec<u8>> {
        let id = self.identity.as_ref()?;
        let mut p = id.public().to_vec();
        p.extend_from_slice(&id.sign(&proof_message(asker, challenge)));
        Some(p)
    }
}

/// How to register.
#[derive(Clone)]
pub struct Registration {
    pub validator: String,
    /// The validator's public key, when the operator pinned it.
    pub validator_key: Option<[u8; 32]>,
    pub identity: Arc<Identity>,
    /// Address peers connect to.
    pub advertise: String,
    /// Local address to register from (the relay's own listening IP, so that the validator
    /// sees the address the relay serves on); `None`: the system's choice.
    pub bind: Option<std::net::IpAddr>,
    pub capacity: u64,
    pub heartbeat: Duration,
    pub grants: JobGrants,
}

impl Registration {
    pub fn id(&self) -> String {
        self.identity.id()
    }

    /// Keep registered in a background thread.
    pub fn spawn(self) {
        std::thread::Builder::new()
            .name("mr-registration".into())
            .spawn(move || loop {
                if let Err(e) = self.session() {
                    log::warn!("validator {}: {e}; retrying", self.validator);
                }
                std::thread::sleep(Duration::from_millis(500));
            })
            .expect("spawn registration thread");
    }

    fn session(&self) -> Result<()> {
        let intro = Intro::Relay {
            addr: self.advertise.clone(),
            capacity: self.capacity,
            free_memory: free_memory().min(self.capacity),
        };
        let ch = channel::connect_from(
            &self.validator,
            self.bind,
            &intro,
            Credential::Identity(&self.identity),
            self.validator_key.as_ref(),
            Duration::from_secs(10),
        )?;
        log::info!(
            "registered with validator {} as relay {}",
            self.validator,
            self.id()
        );
        let mut reader = ch.reader;
        let writer = Arc::new(Mutex::new(ch.writer));
        let hb_writer = writer.clone();
        let period = self.heartbeat;
        let capacity = self.capacity;
        let grants = self.grants.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hb_stop = stop.clone();
        let hb = std::thread::spawn(move || {
            while !hb_stop.load(std::sync::atomic::Ordering::SeqCst) {
                let msg = RelayMsg::Heartbeat {
                    free_memory: free_memory().min(capacity),
                    jobs: grants.len(),
                };
                if send(&hb_writer, &msg).is_err() {
                    hb_writer
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .shutdown();
                    return;
                }
                std::thread::sleep(period);
            }
        });
        let result = self.serve(&mut reader, &writer);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        writer.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
        let _ = hb.join();
        result
    }

    fn serve(
        &self,
        reader: &mut channel::ChannelReader,
        writer: &Arc<Mutex<ChannelWriter>>,
    ) -> Result<()> {
        loop {
            let msg: RelayMsg = reader.recv(Duration::from_secs(24 * 3600))?;
            match msg {
                RelayMsg::Job {
                    job,
                    token,
                    world,
                    ttl_secs,
                } => {
                    let id: [u8; 16] = crate::config::parse_hex("job id", &job)?
                        .try_into()
                        .map_err(|_| Error::remote("job id is not 16 bytes"))?;
                    let token = crate::config::parse_hex("job token", &token)?;
                    self.grants.grant(
                        id,
                        &token,
                        Duration::from_secs(ttl_secs.clamp(1, 7 * 24 * 3600)),
                        Instant::now(),
                    );
                    log::info!(
                        "job {}: assigned by the validator ({world} peers)",
                        &job[..8.min(job.len())]
                    );
                    send(writer, &RelayMsg::JobAck { job })?;
                }
                other => return Err(Error::remote(format!("unexpected message {other:?}"))),
            }
        }
    }
}

fn send(writer: &Arc<Mutex<ChannelWriter>>, msg: &RelayMsg) -> Result<()> {
    writer
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(msg, Duration::from_secs(5))
}

/// Memory available on this machine (`MemAvailable`), bytes; `u64::MAX` when unknown.
pub fn free_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_expire_one_by_one() {
        let g = Grants::new(None);
        let now = Instant::now();
        let job = |i: u32| {
            let mut j = [0u8; 16];
            j[..4].copy_from_slice(&i.to_le_bytes());
            j
        };
        for i in 0..MAX_GRANTS as u32 + 10 {
            g.grant(job(i), b"t", Duration::from_secs(3600), now);
        }
        // Past the cap, only the oldest were forgotten.
        assert_eq!(g.len(), MAX_GRANTS);
        assert!(g.key(&job(9)).is_none());
        assert!(g.key(&job(10)).is_some());
        assert!(g.key(&job(MAX_GRANTS as u32 + 9)).is_some());
        // A short grant expires on its own; the next grant sweeps it out.
        let short = Grants::new(None);
        short.grant(job(1), b"t", Duration::from_millis(1), now);
        short.grant(job(2), b"t", Duration::from_secs(60), now);
        std::thread::sleep(Duration::from_millis(5));
        assert!(short.key(&job(1)).is_none());
        assert!(short.key(&job(2)).is_some());
        short.grant(job(3), b"t", Duration::from_secs(60), Instant::now());
        assert_eq!(short.len(), 2);
    }

    #[test]
    fn address_proofs_verify_against_the_relay_key() {
        let id = Arc::new(Identity::generate());
        let g = Grants::new(Some(id.clone()));
        let (asker, challenge) = ([1u8; 32], [2u8; 32]);
        let p = g.prove(&asker, &challenge).unwrap();
        assert_eq!(p[..32], id.public());
        let msg = proof_message(&asker, &challenge);
        assert!(crate::validator::identity::verify(&p[..32], &msg, &p[32..]));
        assert!(Grants::new(None).prove(&asker, &challenge).is_none());
        let mut body = PROOF_REQUEST.to_vec();
        body.extend_from_slice(&asker);
        assert_eq!(proof_request(&body), Some(asker));
        assert_eq!(proof_request(b"something else"), None);
    }
}

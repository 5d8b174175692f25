//! The validator daemon: one event loop holds every connection ([`crate::validator::hub`]) and
//! a fixed pool of workers serves what they ask (this module): relay registration, job
//! assignment, report judging, status pages. Connections still in the handshake have their own
//! cap; when it is full the oldest one is dropped for the newcomer, so idle sockets cannot lock
//! honest clients out.
//!
//! Never does: forward data, send a secret outside a sealed channel, or send a job's
//! verification secret to a relay.

use crate::error::{Error, ErrorKind, Result};
use crate::validator::chain::{ChainFile, ChainView};
use crate::validator::channel::{self, Channel, ChannelWriter};
use crate::validator::hub::{Hub, Kind, Note, Notes, Task};
use crate::validator::identity::Identity;
use crate::validator::proto::{
    self, AssignedRelay, Assignment, Intro, JobRequest, Refusal, RelayEvidence, RelayMsg,
    ReportMsg, StatusPage, StatusQuery, STATUS_PAGE,
};
use crate::validator::registry::{Limits, Offer, Registry};
use crate::validator::verify::{self, OpRecord};
use crate::wire;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Benchmark bots (validator.config.json `bench`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct BenchConfig {
    /// Seconds between benchmark rounds; 0 disables the bots.
    pub interval_secs: f64,
    /// Bytes all-reduced per benchmark op.
    pub bytes: usize,
    /// Bot peers per benchmark job.
    pub bots: usize,
    /// Relays benchmarked at the same time.
    pub concurrency: usize,
    /// Most bytes per second the bots may move in total (0: unlimited).
    pub max_bandwidth: u64,
    /// Client identities (public keys, hex) the bots' benchmark jobs are requested under, in
    /// turn: the subnet's `benchmark_hotkeys`. Empty: the validator's own.
    #[serde(default)]
    pub hotkeys: Vec<String>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            interval_secs: 300.0,
            bytes: 8 << 20,
            bots: 2,
            concurrency: 1,
            max_bandwidth: 0,
            hotkeys: Vec::new(),
        }
    }
}

/// validator.config.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct ValidatorConfig {
    pub listen: Option<String>,
    /// A relay that sends no heartbeat for this long is unavailable.
    pub heartbeat_timeout_ms: u64,
    /// Relays per job when the request leaves the number open (at most this many).
    pub default_relays: usize,
    /// Fraction of relay ops peers report for verification.
    pub report_fraction: f64,
    /// Sample positions per reported op.
    pub samples: usize,
    pub bench: BenchConfig,
    /// Public keys (hex) of the clients admitted to request jobs (a job's rank 0 proves one).
    pub clients: Vec<String>,
    /// Most connections served at once (relays, reports, requests): each registered relay
    /// holds one, so this also bounds the relays connected at once.
    pub max_connections: usize,
    /// Worker threads (checking handshakes, assigning jobs, judging reports, answering status
    /// queries); open connections cost no thread.
    pub workers: usize,
    /// Most bytes of unfinished messages all sessions may hold together (reports with chunk
    /// evidence span many frames); a session that would pass it is closed.
    pub max_assembling: usize,
    /// Most connections in the handshake at once; past it the oldest is dropped.
    pub max_handshakes: usize,
    /// Seconds a job (its secrets and pending reports) is kept, and relays keep its grant.
    pub job_ttl_secs: u64,
    /// Most jobs kept at once.
    pub max_jobs: usize,
    /// Most relays registered at once.
    pub max_relays: usize,
    /// New relays one IP address may enroll per minute.
    pub enroll_per_minute: u32,
    /// Seconds after which a disconnected relay that never passed a verified op is forgotten.
    pub stale_relay_secs: u64,
    /// Least seconds between two writes of the scores file.
    pub save_interval_secs: f64,
    /// A client whose reports failed to check out against the relays' signatures this many
    /// times gets no more jobs (0: never refused).
    pub client_flag_limit: u64,
}

impl Default for ValidatorConfig {
    fn default() -> Self {
        ValidatorConfig {
            listen: None,
            heartbeat_timeout_ms: 6000,
            default_relays: 4,
            report_fraction: 0.1,
            samples: verify::DEFAULT_SAMPLES,
            bench: BenchConfig::default(),
            clients: Vec::new(),
            max_connections: 4096,
            workers: 16,
            max_assembling: 256 << 20,
            max_handshakes: 256,
            job_ttl_secs: 24 * 3600,
            max_jobs: 100_000,
            max_relays: 10_000,
            enroll_per_minute: 10,
            stale_relay_secs: 600,
            save_interval_secs: 3.0,
            client_flag_limit: 3,
        }
    }
}

impl ValidatorConfig {
    pub fn load(path: &std::path::Path) -> Result<ValidatorConfig> {
        let text = std::fs::read(path)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        serde_json::from_slice(&text)
            .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))
    }
}

/// A registered relay's live connection, for sending it jobs.
pub struct RelayLink {
    writer: Mutex<ChannelWriter>,
    acks: Mutex<HashSet<String>>,
    acked: Condvar,
}

/// Per rank: its record of one op, its evidence, and the relay ids it names.
type OpReports = Vec<Option<(OpRecord, Vec<RelayEvidence>, Vec<String>)>>;

/// A job the validator assigned.
struct Job {
    /// The client that asked for it (public key, hex); empty for benchmark jobs.
    client: String,
    created: Instant,
    secret: [u8; 32],
    relays: Vec<String>,
    world: usize,
    /// Records of sampled ops by seq, until every rank's arrived.
    pending: HashMap<u64, OpReports>,
}

/// Logs one kind of recurring warning at most once per interval, with a count of the rest.
pub struct RateLog {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLog {
    pub fn new(interval: Duration) -> RateLog {
        RateLog {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    pub fn warn(&mut self, msg: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.interval)
        {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            log::warn!("{msg} ({} more like it suppressed)", self.suppressed);
        } else {
            log::warn!("{msg}");
        }
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// When the scores file was last written, and what it held.
struct Saved {
    at: Option<Instant>,
    digest: [u8; 32],
}

/// Shared validator state.
pub struct State {
    pub config: ValidatorConfig,
    pub identity: Identity,
    clients: HashSet<[u8; 32]>,
    pub registry: Mutex<Registry>,
    links: Mutex<HashMap<String, Arc<RelayLink>>>,
    jobs: Mutex<HashMap<String, Job>>,
    scores: Option<PathBuf>,
    saved: Mutex<Saved>,
    /// Failed writes of the scores file, logged at most once per interval.
    save_errors: Mutex<RateLog>,
    /// Refused connections, logged at most once per interval.
    refusals: Mutex<RateLog>,
    /// The subnet's chain file, when the validator runs under one (`--chain`).
    chain: Mutex<Option<ChainFile>>,
    /// Failed reads of the chain file, logged at most once per interval.
    chain_errors: Mutex<RateLog>,
}

impl State {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.heartbeat_timeout_ms.max(100))
    }

    fn job_ttl(&self) -> Duration {
        Duration::from_secs(self.config.job_ttl_secs.max(1))
    }

    /// Write the scores file now if it changed.
    pub fn save(&self) {
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        self.save_locked(&reg, true);
    }

    /// Write the scores file if it changed, and (unless `now`) if the last write is at least
    /// `save_interval_secs` old.
    fn save_locked(&self, reg: &Registry, now: bool) {
        let Some(p) = &self.scores else { return };
        let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let interval = Duration::from_secs_f64(self.config.save_interval_secs.max(0.0));
        if !now && saved.at.is_some_and(|t| t.elapsed() < interval) {
            return;
        }
        let data = reg.encode();
        let digest = *blake3::hash(&data).as_bytes();
        if saved.at.is_some() && digest == saved.digest {
            return;
        }
        match crate::validator::registry::write_atomic(p, &data) {
            Ok(()) => {
                saved.at = Some(Instant::now());
                saved.digest = digest;
            }
            Err(e) => self
                .save_errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .warn(format_args!("{e}")),
        }
    }

    /// Forget expired jobs.
    fn expire_jobs(&self, now: Instant) {
        let ttl = self.job_ttl();
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let before = jobs.len();
        jobs.retain(|_, j| now.duration_since(j.created) < ttl);
        if jobs.len() < before {
            log::debug!("{} jobs expired", before - jobs.len());
        }
    }

    /// Jobs currently kept.
    pub fn job_count(&self) -> usize {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether `key` may request jobs: it is in `clients`, or, under a chain file, a hotkey
    /// registered on the subnet.
    pub fn client_admitted(&self, key: &[u8; 32]) -> bool {
        if self.clients.contains(key) {
            return true;
        }
        self.refresh_chain();
        let chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        chain
            .as_ref()
            .and_then(|c| c.view())
            .is_some_and(|v| v.clients.contains(key))
    }

    /// Run under the chain file at `path`: from now on only relays whose hotkeys serve their
    /// address on the subnet are assigned, and the subnet's hotkeys are admitted as clients.
    pub fn use_chain_file(&self, path: PathBuf) {
        log::info!(
            "relays and clients come from the chain file {}",
            path.display()
        );
        *self.chain.lock().unwrap_or_else(|e| e.into_inner()) = Some(ChainFile::new(path));
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .chain = Some(ChainView::default());
        self.refresh_chain();
    }

    /// Read the chain file again if it changed, and apply it.
    pub fn refresh_chain(&self) {
        let mut guard = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        let Some(file) = guard.as_mut() else { return };
        match file.refresh() {
            Ok(false) => {}
            Ok(true) => {
                let view = file.view().cloned().unwrap_or_default();
                drop(guard);
                log::info!(
                    "chain file: subnet {} at block {}: {} relays served, {} client hotkeys",
                    view.subnet(),
                    view.block.map_or_else(|| "?".into(), |b| b.to_string()),
                    view.relays.len(),
                    view.clients.len()
                );
                let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
                for id in reg.relays.keys() {
                    if let Some(why) = view.refuse_relay(id, &reg.relays[id].score.addr) {
                        log::info!("not assigned: {why}");
                    }
                }
                reg.chain = Some(view);
                reg.rescore();
            }
            Err(e) => self
                .chain_errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .warn(format_args!("{e}; keeping the last good reading")),
        }
    }

    /// The refusal for a client that is not admitted.
    fn client_refusal(&self, client: &str) -> String {
        let chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        match chain.as_ref() {
            Some(c) => format!(
                "client {client} is not admitted: its hotkey is not registered on subnet {} \
                 (per {}) and it is not in `clients` of validator.config.json",
                c.view().map_or_else(|| "?".into(), |v| v.subnet()),
                c.path().display()
            ),
            None => format!(
                "client {client} is not admitted by this validator (its operator adds the \
                 client's public key to `clients` in validator.config.json)"
            ),
        }
    }

    /// Tell relay `id` to accept `job`; wait for its acknowledgement.
    fn announce(&self, id: &str, job: &str, token: &str, world: usize) -> Result<()> {
        let link = self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Error::remote(format!("relay {id} is not connected")))?;
        // A relay that does not take a job in time has its connection dropped (it is
        // unavailable until it registers again): otherwise every job request would try it
        // again and spend a worker on its timeout.
        let drop_link = || {
            log::warn!("relay {id}: did not take job {job} in time; dropping its connection");
            link.writer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .shutdown();
        };
        let mut writer = link.writer.lock().unwrap_or_else(|e| e.into_inner());
        let sent = writer.send(
            &RelayMsg::Job {
                job: job.into(),
                token: token.into(),
                world,
                ttl_secs: self.config.job_ttl_secs,
            },
            Duration::from_secs(5),
        );
        if sent.is_err() {
            writer.shutdown();
        }
        drop(writer);
        sent.map_err(|e| e.context(format!("job announcement to relay {id}")))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut acks = link.acks.lock().unwrap_or_else(|e| e.into_inner());
        while !acks.remove(job) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(acks);
                drop_link();
                return Err(Error::timeout(format!(
                    "relay {id} did not acknowledge the job"
                )));
            }
            acks = link
                .acked
                .wait_timeout(acks, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Choose relays for a job of `client` (public key, hex), install it on them and mint its
    /// secrets.
    pub fn assign(&self, req: &JobRequest, client: &str) -> Result<Assignment> {
        if req.peers == 0 || req.peers > crate::relay::MAX_WORLD {
            return Err(Error::invalid(format!("a job of {} peers", req.peers)));
        }
        let job_bytes: [u8; 16] = crate::config::parse_hex("job id", &req.job)?
            .try_into()
            .map_err(|_| Error::invalid("job id is not 16 bytes"))?;
        let job = crate::config::to_hex(&job_bytes);
        {
            let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            if jobs.contains_key(&job) {
                return Err(Error::invalid(format!("job {job} was already assigned")));
            }
            if jobs.len() >= self.config.max_jobs {
                return Err(Error::remote(format!(
                    "the validator holds {} jobs, its limit; try again later",
                    jobs.len()
                )));
            }
        }
        self.refresh_chain();
        let candidates = self
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .candidates(req.relay_memory, Instant::now(), self.timeout());
        self.assign_among(req, job, candidates, client)
    }

    /// Assign a job of `client` to relay `id` alone (benchmarks).
    pub fn assign_to(&self, req: &JobRequest, id: &str, client: &str) -> Result<Assignment> {
        self.assign_among(req, req.job.clone(), vec![id.to_string()], client)
    }

    fn assign_among(
        &self,
        req: &JobRequest,
        job: String,
        candidates: Vec<String>,
        client: &str,
    ) -> Result<Assignment> {
        let want = if req.relays > 0 {
            req.relays
        } else {
            self.config
                .default_relays
                .max(1)
                .min(candidates.len().max(1))
        };
        let token = crate::config::to_hex(&wire::nonce());
        let secret = wire::nonce();
        let mut chosen = Vec::new();
        for id in &candidates {
            if chosen.len() == want {
                break;
            }
            match self.announce(id, &job, &token, req.peers) {
                Ok(()) => chosen.push(id.clone()),
                Err(e) => log::warn!("job {job}: skipping relay {id}: {e}"),
            }
        }
        if chosen.len() < want {
            return Err(Error::remote(format!(
                "not enough relays: the job wants {want} with {} bytes free each, {} available",
                req.relay_memory,
                chosen.len()
            )));
        }
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // A relay pruned meanwhile fails the request rather than the worker.
        let relays = chosen
            .iter()
            .map(|id| {
                let e = reg.relays.get(id).ok_or_else(|| {
                    Error::remote(format!("relay {id} left while job {job} was assigned"))
                })?;
                Ok(AssignedRelay {
                    id: id.clone(),
                    addr: e.score.addr.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        drop(reg);
        log::info!("job {job}: {} peers, relays {chosen:?}", req.peers);
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).insert(
            job.clone(),
            Job {
                client: client.to_string(),
                created: Instant::now(),
                secret,
                relays: chosen,
                world: req.peers,
                pending: HashMap::new(),
            },
        );
        Ok(Assignment {
            job,
            token,
            verify_secret: crate::config::to_hex(&secret),
            relays,
            report_fraction: self.config.report_fraction,
            samples: self.config.samples,
        })
    }

    /// Take one rank's record of a sampled op; once every rank's is in, verify the op.
    fn report(&self, job: &str, msg: ReportMsg) -> Result<()> {
        // Bytes and time are what a peer says; throughput is measured by the bots only.
        let ReportMsg::Op {
            record,
            world,
            relay_index,
            evidence,
            ..
        } = msg;
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let j = jobs
            .get_mut(job)
            .ok_or_else(|| Error::invalid(format!("unknown job {job}")))?;
        let client = j.client.clone();
        if world != j.world || record.rank >= j.world {
            return Err(Error::invalid("report of another world size"));
        }
        let ids: Vec<String> = relay_index
            .iter()
            .map(|&i| j.relays.get(i).cloned())
            .collect::<Option<_>>()
            .ok_or_else(|| Error::invalid("report names a relay the job was not given"))?;
        if ids.len() != record.relays {
            return Err(Error::invalid(
                "report's relay list does not match its record",
            ));
        }
        let seq = record.seq;
        let slot = j.pending.entry(seq).or_insert_with(|| vec![None; world]);
        let rank = record.rank;
        slot[rank] = Some((record, evidence, ids.clone()));
        if slot.iter().any(Option::is_none) {
            // Reports carry chunk bytes: keep few incomplete ops per job.
            while j.pending.len() > MAX_PENDING_OPS {
                let oldest = *j.pending.keys().min().expect("pending");
                j.pending.remove(&oldest);
            }
            return Ok(());
        }
        let done = j.pending.remove(&seq).expect("complete op");
        drop(jobs);
        let reports: Vec<(OpRecord, Vec<RelayEvidence>, Vec<String>)> =
            done.into_iter().map(|d| d.expect("complete")).collect();
        if reports.iter().any(|r| r.2 != ids) {
            self.flag_client(
                &client,
                job,
                &format!("op seq {seq}: ranks name different relays for one op"),
            );
            return Ok(());
        }
        let keys: Vec<[u8; 32]> = ids
            .iter()
            .map(|id| crate::validator::identity::parse_public("relay id", id))
            .collect::<Result<_>>()?;
        let job_id: [u8; 16] = crate::config::parse_hex("job id", job)?
            .try_into()
            .map_err(|_| Error::invalid("job id is not 16 bytes"))?;
        let pairs: Vec<(OpRecord, Vec<RelayEvidence>)> =
            reports.into_iter().map(|(r, e, _)| (r, e)).collect();
        let verdict = crate::validator::evidence::judge(&job_id, &pairs, &keys);
        for (rank, why) in &verdict.false_reports {
            self.flag_client(&client, job, &format!("op seq {seq}, rank {rank}: {why}"));
        }
        for (k, why) in &verdict.unaccountable {
            log::debug!("job {job}: op seq {seq}: relay {}: {why}", ids[*k]);
        }
        let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        for &k in &verdict.verified {
            reg.credit(&ids[k]);
        }
        if !verdict.convicted.is_empty() {
            for (k, e) in &verdict.convicted {
                reg.convict(
                    &ids[*k],
                    &format!("job {job} of client {client}, signed evidence: {e}"),
                );
            }
            reg.rescore();
            // An exclusion is persisted before the lock is released, so nobody can see one
            // that a crash right now would lose.
            self.save_locked(&reg, true);
            return Ok(());
        }
        reg.rescore();
        self.save_locked(&reg, false);
        Ok(())
    }

    /// A report of `client`'s job did not check out against the relays' own signatures.
    fn flag_client(&self, client: &str, job: &str, why: &str) {
        let evidence = format!("job {job}: {why}");
        let eid = crate::validator::registry::evidence_id(&evidence);
        log::warn!(
            "client {client} flagged: a report does not check out; evidence {eid}: {evidence}"
        );
        let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let f = &mut reg.flagged;
        if f.len() < MAX_FLAGGED || f.contains_key(client) {
            let e = f.entry(client.to_string()).or_default();
            e.reports += 1;
            e.last_evidence = format!("{eid}: {evidence}");
        }
        // Kept in the scores file, so a restart does not wipe the record.
        self.save_locked(&reg, true);
    }

    /// How many of `client`'s reports did not check out.
    pub fn flags_of(&self, client: &str) -> u64 {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flagged
            .get(client)
            .map_or(0, |f| f.reports)
    }

    /// Clients whose reports did not check out, with the count and the last evidence.
    pub fn flagged_clients(&self) -> Vec<FlaggedClient> {
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<FlaggedClient> = reg
            .flagged
            .iter()
            .map(|(k, e)| FlaggedClient {
                client: k.clone(),
                ..e.clone()
            })
            .collect();
        v.sort_by(|a, b| b.reports.cmp(&a.reports).then(a.client.cmp(&b.client)));
        v
    }
}

/// Incomplete reported ops kept per job.
const MAX_PENDING_OPS: usize = 8;
/// Flagged clients remembered.
const MAX_FLAGGED: usize = 10_000;

pub use crate::validator::registry::FlaggedClient;

/// The running validator.
pub struct Validator {
    listener: TcpListener,
    pub state: Arc<State>,
}

impl Validator {
    /// Bind `listen` as `identity`, with scores kept in (and reloaded from) `scores`.
    pub fn bind(
        listen: SocketAddr,
        config: ValidatorConfig,
        scores: Option<PathBuf>,
        identity: Identity,
    ) -> Result<Validator> {
        let mut registry = match &scores {
            Some(p) => Registry::load(p)?,
            None => Registry::default(),
        };
        registry.limits = Limits {
            max_relays: config.max_relays.max(1),
            enroll_per_minute: config.enroll_per_minute.max(1),
            stale_after: Duration::from_secs(config.stale_relay_secs),
        };
        if !registry.relays.is_empty() {
            log::info!("loaded {} relays' scores", registry.relays.len());
        }
        let clients = config
            .clients
            .iter()
            .map(|c| crate::validator::identity::parse_public("client key in `clients`", c))
            .collect::<Result<HashSet<_>>>()?;
        let listener = TcpListener::bind(listen)
            .map_err(|e| Error::io(format!("cannot listen on {listen}"), e))?;
        log::info!(
            "validator key {}; {} clients admitted",
            identity.id(),
            clients.len()
        );
        Ok(Validator {
            listener,
            state: Arc::new(State {
                config,
                identity,
                clients,
                registry: Mutex::new(registry),
                links: Mutex::new(HashMap::new()),
                jobs: Mutex::new(HashMap::new()),
                scores,
                saved: Mutex::new(Saved {
                    at: None,
                    digest: [0; 32],
                }),
                refusals: Mutex::new(RateLog::new(Duration::from_secs(5))),
                chain: Mutex::new(None),
                chain_errors: Mutex::new(RateLog::new(Duration::from_secs(60))),
                save_errors: Mutex::new(RateLog::new(Duration::from_secs(30))),
            }),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| Error::io("listener address", e))
    }

    /// Serve forever: accept connections (bounded), tick liveness, scores, expiry.
    pub fn run(self) -> Result<()> {
        let state = self.state.clone();
        std::thread::spawn(move || loop {
            let period = state.timeout() / 2;
            std::thread::sleep(period);
            let now = Instant::now();
            state.expire_jobs(now);
            state.refresh_chain();
            let mut reg = state.registry.lock().unwrap_or_else(|e| e.into_inner());
            reg.tick(now, state.timeout());
            reg.prune(now);
            state.save_locked(&reg, false);
        });
        if self.state.config.bench.interval_secs > 0.0 {
            crate::validator::bench::spawn(self.state.clone());
        }
        let (tasks, queue) = crossbeam_channel::unbounded();
        let (status_tasks, status_queue) = crossbeam_channel::unbounded();
        let hub = Hub::new(self.state.clone(), self.listener, tasks, status_tasks)?;
        let workers = self.state.config.workers.max(1);
        // A status reader that stops reading holds a status worker for up to a write timeout;
        // it never holds one of the workers that admit relays and clients.
        let status_workers = (workers / 4).clamp(1, 4);
        // Checking a relay's address may take the probe's whole timeout (an address that never
        // answers): it has threads of its own, so re-registering relays cannot hold the
        // workers that admit clients.
        let (probes, probe_queue) = crossbeam_channel::unbounded::<Probe>();
        for i in 0..status_workers {
            let (state, queue) = (self.state.clone(), probe_queue.clone());
            std::thread::Builder::new()
                .name(format!("mr-validator-probe-{i}"))
                .spawn(move || prove(&state, &queue))
                .map_err(|e| Error::io("cannot start the validator's workers", e))?;
        }
        let pools = [
            ("worker", workers, queue),
            ("status", status_workers, status_queue),
        ];
        for (name, n, queue) in pools {
            for i in 0..n {
                let (state, queue, notes) = (self.state.clone(), queue.clone(), hub.notes());
                let probes = probes.clone();
                std::thread::Builder::new()
                    .name(format!("mr-validator-{name}-{i}"))
                    .spawn(move || work(&state, &queue, &notes, &probes))
                    .map_err(|e| Error::io("cannot start the validator's workers", e))?;
            }
        }
        hub.run()
    }
}

/// A registered relay's address, to check.
struct Probe {
    id: String,
    key: [u8; 32],
    addr: String,
    generation: u64,
}

/// A prober: check relays' addresses until the workers are gone. A registration that a newer
/// one replaced is skipped (its result would be ignored anyway).
fn prove(state: &State, queue: &crossbeam_channel::Receiver<Probe>) {
    while let Ok(p) = queue.recv() {
        let current = state
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_current(&p.id, p.generation);
        if !current {
            continue;
        }
        let proven =
            crate::validator::probe::prove_address(&p.addr, &p.key, Duration::from_secs(5));
        let id = &p.id;
        if let Err(e) = &proven {
            log::warn!(
                "relay {id}: not assigned until it proves its key at {}: {e}",
                p.addr
            );
        } else {
            log::info!("relay {id}: proved its key at {}", p.addr);
        }
        let mut reg = state.registry.lock().unwrap_or_else(|e| e.into_inner());
        reg.address_checked(id, p.generation, &p.addr, proven.is_ok());
        if let Some(why) = reg.chain_refusal(id) {
            log::info!("not assigned: {why}");
        }
    }
}

/// A worker: take tasks until the loop is gone.
fn work(
    state: &Arc<State>,
    queue: &crossbeam_channel::Receiver<Task>,
    notes: &Notes,
    probes: &crossbeam_channel::Sender<Probe>,
) {
    while let Ok(task) = queue.recv() {
        // A task that panics must still give its connection back to the loop.
        let on_panic = match &task {
            Task::Hello { .. } => Note::Ended,
            Task::Report { token, .. } | Task::Status { token, .. } => Note::Close(*token),
        };
        let run = std::panic::AssertUnwindSafe(|| serve_task(state, task, notes, probes));
        if std::panic::catch_unwind(run).is_err() {
            log::error!("a validator worker's task panicked; its connection is closed");
            notes.send(on_panic);
        }
    }
}

/// One task of a worker.
fn serve_task(
    state: &Arc<State>,
    task: Task,
    notes: &Notes,
    probes: &crossbeam_channel::Sender<Probe>,
) {
    {
        match task {
            Task::Hello {
                stream,
                challenge,
                hello,
                peer,
            } => match on_hello(state, stream, &challenge, &hello, peer, probes) {
                Ok(Some((reader, kind))) => {
                    let (stream, opener) = reader.into_parts();
                    notes.send(Note::Session {
                        stream,
                        opener,
                        kind,
                        peer,
                    });
                }
                Ok(None) => notes.send(Note::Ended),
                Err(e) => {
                    if e.kind == ErrorKind::Auth {
                        state
                            .refusal_log()
                            .warn(format_args!("connection from {peer}: {e}"));
                    } else {
                        log::debug!("connection from {peer}: {e}");
                    }
                    notes.send(Note::Ended);
                }
            },
            Task::Report {
                token,
                job,
                body,
                peer,
            } => {
                let what = format!("report for job {job} from {peer}");
                match proto::parse::<ReportMsg>(&body, &what) {
                    Ok(msg) => {
                        if let Err(e) = state.report(&job, msg) {
                            log::warn!("{what}: {e}");
                        }
                        notes.send(Note::Done(token));
                    }
                    Err(e) => {
                        log::debug!("{e}");
                        notes.send(Note::Close(token));
                    }
                }
            }
            Task::Status {
                token,
                writer,
                body,
            } => {
                let answered = proto::parse::<StatusQuery>(&body, "status query").and_then(|q| {
                    let page = status_page(state, &q);
                    writer
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .send(&page, Duration::from_secs(30))
                });
                notes.send(match answered {
                    Ok(()) => Note::Done(token),
                    Err(_) => Note::Close(token),
                });
            }
        }
    }
}

impl State {
    /// How long a relay may stay silent.
    pub fn relay_timeout(&self) -> Duration {
        self.timeout()
    }

    /// The log of refused connections (rate-limited).
    pub fn refusal_log(&self) -> std::sync::MutexGuard<'_, RateLog> {
        self.refusals.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A registered relay's message (heartbeat, job acknowledgement).
    pub fn on_relay_message(
        &self,
        id: &str,
        generation: u64,
        link: &RelayLink,
        msg: RelayMsg,
    ) -> Result<()> {
        match msg {
            RelayMsg::Heartbeat { free_memory, .. } => {
                self.registry
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .heartbeat(id, generation, free_memory, Instant::now());
                Ok(())
            }
            RelayMsg::JobAck { job } => {
                let mut acks = link.acks.lock().unwrap_or_else(|e| e.into_inner());
                if acks.len() < 1024 {
                    acks.insert(job);
                }
                link.acked.notify_all();
                Ok(())
            }
            other => Err(Error::remote(format!(
                "relay {id}: unexpected message {other:?}"
            ))),
        }
    }

    /// Relay `id`'s connection `generation` ended: it is unavailable until it registers again.
    pub fn relay_lost(&self, id: &str, generation: u64, link: &Arc<RelayLink>) {
        log::warn!("relay {id}: lost; marked unavailable");
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .disconnected(id, generation);
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if links.get(id).is_some_and(|l| Arc::ptr_eq(l, link)) {
            links.remove(id);
        }
        drop(links);
        link.writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown();
    }
}

/// A connector's Hello: check it and serve what it asks. `Some` hands a session that stays
/// open (relay, reports, status) back to the event loop.
fn on_hello(
    state: &Arc<State>,
    stream: TcpStream,
    challenge: &channel::Challenge,
    hello: &[u8],
    peer: SocketAddr,
    probes: &crossbeam_channel::Sender<Probe>,
) -> Result<Option<(channel::ChannelReader, Kind)>> {
    // Workers' writes wait at most this long (the loop never writes).
    let pending = channel::Pending::from_hello(stream, challenge, &peer.to_string(), hello)?;
    let intro: Intro = proto::parse(&pending.intro, &format!("hello from {peer}"))?;
    match intro {
        Intro::Relay {
            addr,
            capacity,
            free_memory,
        } => {
            let Some(key) = pending.key.filter(|_| pending.signed()) else {
                return Err(pending.refuse(
                    ErrorKind::Auth,
                    "relay authentication failed: the handshake is not signed by the key offered",
                ));
            };
            let id = crate::validator::registry::relay_id(&key);
            let admitted = state
                .registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(
                    key,
                    Offer {
                        addr: &addr,
                        capacity,
                        free_memory,
                    },
                    peer.ip(),
                    Instant::now(),
                );
            let generation = match admitted {
                Ok(g) => g,
                Err(msg) => return Err(pending.refuse(ErrorKind::Auth, &msg)),
            };
            let Channel { reader, writer, .. } = pending.welcome(&state.identity, None)?;
            log::info!("relay {id} registered from {peer}, serving at {addr}");
            let link = Arc::new(RelayLink {
                writer: Mutex::new(writer),
                acks: Mutex::new(HashSet::new()),
                acked: Condvar::new(),
            });
            state
                .links
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone(), link.clone());
            // Not assigned until the check succeeds (`admit` cleared the address's proof).
            let _ = probes.send(Probe {
                id: id.clone(),
                key,
                addr,
                generation,
            });
            Ok(Some((
                reader,
                Kind::Relay {
                    id,
                    generation,
                    link,
                },
            )))
        }
        Intro::Job(req) => {
            let Some(key) = pending.key.filter(|_| pending.signed()) else {
                return Err(pending.refuse(
                    ErrorKind::Auth,
                    "client authentication failed: the handshake is not signed by the key offered",
                ));
            };
            let client = crate::config::to_hex(&key);
            if !state.client_admitted(&key) {
                return Err(pending.refuse(ErrorKind::Auth, &state.client_refusal(&client)));
            }
            let flags = state.flags_of(&client);
            let limit = state.config.client_flag_limit;
            if limit > 0 && flags >= limit {
                return Err(pending.refuse(
                    ErrorKind::Auth,
                    &format!(
                        "client {client} is refused: {flags} of its reports did not check out \
                         against the relays' signatures (see mr-validator status)"
                    ),
                ));
            }
            let mut ch = pending.welcome(&state.identity, None)?;
            match state.assign(&req, &client) {
                Ok(a) => ch.send(&a, Duration::from_secs(30))?,
                Err(e) => {
                    log::warn!("job request from client {client} at {peer}: {e}");
                    ch.send(&Refusal { error: e.message }, Duration::from_secs(30))?
                }
            }
            Ok(None)
        }
        Intro::Report { job } => {
            let secret = state
                .jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&job)
                .map(|j| j.secret);
            let Some(secret) = secret.filter(|s| pending.knows(s)) else {
                return Err(pending.refuse(ErrorKind::Auth, &format!("not a member of job {job}")));
            };
            let ch = pending.welcome(&state.identity, Some(&secret))?;
            Ok(Some((ch.reader, Kind::Report { job })))
        }
        Intro::Status => {
            let ch = pending.welcome(&state.identity, None)?;
            Ok(Some((
                ch.reader,
                Kind::Status {
                    writer: Arc::new(Mutex::new(ch.writer)),
                },
            )))
        }
    }
}

/// One page of the relay table.
fn status_page(state: &State, q: &StatusQuery) -> StatusPage<StatusRow> {
    let rows = status_rows(state);
    StatusPage {
        flagged_clients: if q.offset == 0 {
            state
                .flagged_clients()
                .into_iter()
                .take(STATUS_PAGE)
                .collect()
        } else {
            Vec::new()
        },
        total: rows.len(),
        rows: rows
            .into_iter()
            .skip(q.offset)
            .take(q.limit.clamp(1, STATUS_PAGE))
            .collect(),
    }
}

/// One line of `mr-validator status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusRow {
    #[serde(flatten)]
    pub score: crate::validator::registry::RelayScore,
    pub available: bool,
    pub free_memory: u64,
}

pub fn status_rows(state: &State) -> Vec<StatusRow> {
    let reg = state.registry.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    let mut rows: Vec<StatusRow> = reg
        .relays
        .values()
        .map(|e| StatusRow {
            score: e.score.clone(),
            available: e.available(now, state.timeout()),
            free_memory: e.free_memory,
        })
        .collect();
    rows.sort_by(|a, b| {
        b.score
            .weight
            .total_cmp(&a.score.weight)
            .then(a.score.id.cmp(&b.score.id))
    });
    rows
}

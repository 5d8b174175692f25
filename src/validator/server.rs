//! The validator daemon: a blocking server, one thread per connection (relays hold one
//! connection each; job requests, reports and status queries are short).
//!
//! Never does: forward data, or send a job's verification secret to a relay.

use crate::error::{Error, ErrorKind, Result};
use crate::net::bootstrap::FrameIo;
use crate::validator::proto::{
    self, AssignedRelay, Assignment, Intro, JobRequest, Refusal, RelayMsg, ReportMsg,
};
use crate::validator::registry::{Admission, Offer, Registry};
use crate::validator::verify::{self, OpRecord};
use crate::wire::{self, FrameKind, Hello};
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
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            interval_secs: 300.0,
            bytes: 8 << 20,
            bots: 2,
            concurrency: 1,
            max_bandwidth: 0,
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
struct RelayLink {
    writer: Mutex<TcpStream>,
    acks: Mutex<HashSet<String>>,
    acked: Condvar,
}

/// Per rank: its record of one op, the op's bytes and how long the rank saw it take (µs).
type OpReports = Vec<Option<(OpRecord, u64, u64)>>;

/// A job the validator assigned.
struct Job {
    secret: [u8; 32],
    relays: Vec<String>,
    world: usize,
    /// Records of sampled ops by seq, until every rank's arrived.
    pending: HashMap<u64, OpReports>,
}

/// Shared validator state.
pub struct State {
    pub config: ValidatorConfig,
    pub registry: Mutex<Registry>,
    links: Mutex<HashMap<String, Arc<RelayLink>>>,
    jobs: Mutex<HashMap<String, Job>>,
    scores: Option<PathBuf>,
}

impl State {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.heartbeat_timeout_ms.max(100))
    }

    pub fn save(&self) {
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        self.save_locked(&reg);
    }

    fn save_locked(&self, reg: &Registry) {
        if let Some(p) = &self.scores {
            if let Err(e) = reg.save(p) {
                log::warn!("{e}");
            }
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
        {
            let mut w = link.writer.lock().unwrap_or_else(|e| e.into_inner());
            proto::send_json(
                &mut FrameIo {
                    stream: &mut w,
                    deadline: Instant::now() + Duration::from_secs(5),
                    what: format!("job announcement to relay {id}"),
                },
                &RelayMsg::Job {
                    job: job.into(),
                    token: token.into(),
                    world,
                },
            )?;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut acks = link.acks.lock().unwrap_or_else(|e| e.into_inner());
        while !acks.remove(job) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
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

    /// Choose relays for a job, install it on them and mint its secrets.
    pub fn assign(&self, req: &JobRequest) -> Result<Assignment> {
        if req.peers == 0 || req.peers > crate::relay::MAX_WORLD {
            return Err(Error::invalid(format!("a job of {} peers", req.peers)));
        }
        let job_bytes: [u8; 16] = crate::config::parse_hex("job id", &req.job)?
            .try_into()
            .map_err(|_| Error::invalid("job id is not 16 bytes"))?;
        let job = crate::config::to_hex(&job_bytes);
        if self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&job)
        {
            return Err(Error::invalid(format!("job {job} was already assigned")));
        }
        let candidates = self
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .candidates(req.relay_memory, Instant::now(), self.timeout());
        self.assign_among(req, job, candidates)
    }

    /// Assign a job to relay `id` alone (benchmarks).
    pub fn assign_to(&self, req: &JobRequest, id: &str) -> Result<Assignment> {
        self.assign_among(req, req.job.clone(), vec![id.to_string()])
    }

    fn assign_among(
        &self,
        req: &JobRequest,
        job: String,
        candidates: Vec<String>,
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
        let relays = chosen
            .iter()
            .map(|id| AssignedRelay {
                id: id.clone(),
                addr: reg.relays[id].score.addr.clone(),
            })
            .collect();
        drop(reg);
        log::info!("job {job}: {} peers, relays {chosen:?}", req.peers);
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).insert(
            job.clone(),
            Job {
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
        let ReportMsg::Op {
            record,
            world,
            relay_index,
            bytes,
            micros,
        } = msg;
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let j = jobs
            .get_mut(job)
            .ok_or_else(|| Error::invalid(format!("unknown job {job}")))?;
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
        slot[rank] = Some((record, bytes, micros));
        if slot.iter().any(Option::is_none) {
            if j.pending.len() > 1024 {
                let oldest = *j.pending.keys().min().expect("pending");
                j.pending.remove(&oldest);
            }
            return Ok(());
        }
        let done = j.pending.remove(&seq).expect("complete op");
        drop(jobs);
        let records: Vec<OpRecord> = done.iter().map(|d| d.as_ref().unwrap().0.clone()).collect();
        let slowest = done
            .iter()
            .map(|d| d.as_ref().unwrap().2)
            .max()
            .unwrap_or(0);
        let bytes = done[0].as_ref().unwrap().1;
        let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        match verify::check(&records) {
            Ok(faults) if faults.is_empty() => {
                // Each relay moved its segment from and to every peer in `slowest` µs.
                let mbps = (slowest > 0).then(|| bytes as f64 / ids.len() as f64 / slowest as f64);
                for id in &ids {
                    reg.credit(id, mbps);
                }
                log::debug!("job {job}: op seq {seq} verified");
            }
            Ok(faults) => {
                for f in faults {
                    reg.convict(&ids[f.relay], &format!("job {job}: {}", f.evidence));
                }
            }
            Err(e) => log::warn!("job {job}: op seq {seq}: inconsistent reports: {e}"),
        }
        reg.rescore();
        // Persist before the lock is released, so nobody can see a score that a crash
        // right now would lose.
        self.save_locked(&reg);
        Ok(())
    }
}

/// The running validator.
pub struct Validator {
    listener: TcpListener,
    pub state: Arc<State>,
}

impl Validator {
    pub fn bind(
        listen: SocketAddr,
        config: ValidatorConfig,
        scores: Option<PathBuf>,
    ) -> Result<Validator> {
        let registry = match &scores {
            Some(p) => Registry::load(p)?,
            None => Registry::default(),
        };
        if !registry.relays.is_empty() {
            log::info!("loaded {} relays' scores", registry.relays.len());
        }
        let listener = TcpListener::bind(listen)
            .map_err(|e| Error::io(format!("cannot listen on {listen}"), e))?;
        Ok(Validator {
            listener,
            state: Arc::new(State {
                config,
                registry: Mutex::new(registry),
                links: Mutex::new(HashMap::new()),
                jobs: Mutex::new(HashMap::new()),
                scores,
            }),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| Error::io("listener address", e))
    }

    /// Serve forever: accept connections, tick liveness and scores.
    pub fn run(self) -> Result<()> {
        let state = self.state.clone();
        std::thread::spawn(move || loop {
            let period = state.timeout() / 2;
            std::thread::sleep(period);
            state
                .registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .tick(Instant::now(), state.timeout());
            state.save();
        });
        if self.state.config.bench.interval_secs > 0.0 {
            crate::validator::bench::spawn(self.state.clone());
        }
        for conn in self.listener.incoming() {
            match conn {
                Ok(s) => {
                    let state = self.state.clone();
                    std::thread::spawn(move || serve(state, s));
                }
                Err(e) => log::warn!("accept failed: {e}"),
            }
        }
        Ok(())
    }
}

fn serve(state: Arc<State>, mut stream: TcpStream) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let _ = stream.set_nodelay(true);
    if let Err(e) = serve_conn(&state, &mut stream, &peer) {
        if e.kind == ErrorKind::Auth {
            log::warn!("connection from {peer}: {e}");
        } else {
            log::debug!("connection from {peer}: {e}");
        }
    }
}

fn serve_conn(state: &Arc<State>, stream: &mut TcpStream, peer: &str) -> Result<()> {
    let mut io = FrameIo {
        stream,
        deadline: Instant::now() + Duration::from_secs(10),
        what: format!("validator connection from {peer}"),
    };
    let ns = wire::nonce();
    io.send(
        crate::wire::FrameHeader::new(FrameKind::Challenge, ns.len()),
        &ns,
    )?;
    let (_, p) = io.expect(FrameKind::Hello)?;
    let hello = Hello::decode(&p)?;
    let intro: Intro = proto::parse(hello.body, &io.what)?;
    let refuse = |io: &mut FrameIo<'_>, kind: ErrorKind, msg: String| -> Result<()> {
        io.reject(kind, &msg);
        Err(Error::new(kind, msg))
    };
    match intro {
        Intro::Relay {
            id,
            addr,
            capacity,
            free_memory,
            enroll,
        } => {
            let enroll_key = match enroll.map(|k| crate::config::parse_hex("enroll key", &k)) {
                Some(Ok(k)) if k.len() == 32 => Some(<[u8; 32]>::try_from(k).expect("32 bytes")),
                Some(_) => {
                    return refuse(
                        &mut io,
                        ErrorKind::InvalidArgument,
                        "malformed enroll key".into(),
                    )
                }
                None => None,
            };
            let admitted = state
                .registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(
                    &id,
                    Offer {
                        addr: &addr,
                        capacity,
                        free_memory,
                    },
                    enroll_key,
                    |k| hello.verify(&wire::mac_key(k), &ns),
                    Instant::now(),
                );
            let (generation, key) = match admitted {
                Ok(Admission::Admitted(g)) => {
                    let key = state
                        .registry
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .relays[&id]
                        .key;
                    (g, key)
                }
                Ok(Admission::Unknown) => {
                    return refuse(
                        &mut io,
                        ErrorKind::Auth,
                        format!("unknown relay {id}: enroll"),
                    )
                }
                Err(msg) => return refuse(&mut io, ErrorKind::Auth, msg),
            };
            io.welcome(&wire::mac_key(&key), &ns, &hello.nonce, &[])?;
            log::info!("relay {id} registered from {peer}, serving at {addr}");
            state.save();
            relay_session(state, io, &id, generation)
        }
        Intro::Job(req) => {
            let key = proto::open_key();
            if !hello.verify(&key, &ns) {
                return refuse(&mut io, ErrorKind::Auth, "authentication failed".into());
            }
            io.welcome(&key, &ns, &hello.nonce, &[])?;
            io.deadline = Instant::now() + Duration::from_secs(30);
            match state.assign(&req) {
                Ok(a) => proto::send_json(&mut io, &a),
                Err(e) => {
                    log::warn!("job request from {peer}: {e}");
                    proto::send_json(&mut io, &Refusal { error: e.message })
                }
            }
        }
        Intro::Report { job } => {
            let secret = state
                .jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&job)
                .map(|j| j.secret);
            let Some(secret) = secret.filter(|s| hello.verify(&wire::mac_key(s), &ns)) else {
                return refuse(
                    &mut io,
                    ErrorKind::Auth,
                    format!("not a member of job {job}"),
                );
            };
            io.welcome(&wire::mac_key(&secret), &ns, &hello.nonce, &[])?;
            loop {
                io.deadline = Instant::now() + Duration::from_secs(3600);
                let msg: ReportMsg = match proto::recv_json(&mut io) {
                    Ok(m) => m,
                    Err(_) => return Ok(()),
                };
                if let Err(e) = state.report(&job, msg) {
                    log::warn!("report for job {job} from {peer}: {e}");
                }
            }
        }
        Intro::Status => {
            let key = proto::open_key();
            if !hello.verify(&key, &ns) {
                return refuse(&mut io, ErrorKind::Auth, "authentication failed".into());
            }
            io.welcome(&key, &ns, &hello.nonce, &[])?;
            let rows = status_rows(state);
            proto::send_json(&mut io, &rows)
        }
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

/// A registered relay's connection: heartbeats and job acknowledgements in, jobs out.
fn relay_session(state: &Arc<State>, mut io: FrameIo<'_>, id: &str, generation: u64) -> Result<()> {
    let writer = io
        .stream
        .try_clone()
        .map_err(|e| Error::io("cloning the relay connection", e))?;
    let link = Arc::new(RelayLink {
        writer: Mutex::new(writer),
        acks: Mutex::new(HashSet::new()),
        acked: Condvar::new(),
    });
    state
        .links
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.to_string(), link.clone());
    let result = loop {
        io.deadline = Instant::now() + state.timeout();
        match proto::recv_json::<RelayMsg>(&mut io) {
            Ok(RelayMsg::Heartbeat { free_memory, .. }) => state
                .registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .heartbeat(id, generation, free_memory, Instant::now()),
            Ok(RelayMsg::JobAck { job }) => {
                link.acks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(job);
                link.acked.notify_all();
            }
            Ok(other) => break Err(Error::remote(format!("unexpected message {other:?}"))),
            Err(e) => break Err(e),
        }
    };
    log::warn!(
        "relay {id}: lost ({}); marked unavailable",
        result.as_ref().err().map_or("", |e| e.message.as_str())
    );
    state
        .registry
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .disconnected(id, generation);
    let mut links = state.links.lock().unwrap_or_else(|e| e.into_inner());
    if links.get(id).is_some_and(|l| Arc::ptr_eq(l, &link)) {
        links.remove(id);
    }
    result
}

//! Peer side of the validator protocol: rank 0 (the client) asks for relays, proving the
//! client's identity, and shares the assignment with the other ranks over the bootstrap mesh;
//! every rank reports sampled ops in the background, proving the job's verification secret.
//!
//! The client's key file is `MR_CLIENT_KEY_FILE` (default `~/.config/mapreduce/client.key`,
//! created with mode 0600 on first use); `MR_VALIDATOR_KEY` (hex), when set, pins the
//! validator's public key.

use crate::config::{Algo, Config};
use crate::error::{Error, Result};
use crate::net::bootstrap::{FrameIo, Mesh};
use crate::validator::channel::{self, Channel, Credential};
use crate::validator::identity::Identity;
use crate::validator::peer::EvidenceTask;
use crate::validator::proto::{
    Assignment, Intro, JobRequest, Refusal, ReportMsg, StatusPage, StatusQuery, STATUS_PAGE,
};
use crate::validator::server::StatusRow;
use crate::wire::{FrameHeader, FrameKind};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where the client's key lives: `MR_CLIENT_KEY_FILE`, or `~/.config/mapreduce/client.key`.
pub fn client_key_path() -> PathBuf {
    if let Some(p) = std::env::var_os("MR_CLIENT_KEY_FILE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".config/mapreduce/client.key")
}

/// The client's identity, created on first use.
pub fn client_identity() -> Result<Identity> {
    let p = client_key_path();
    if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    }
    Identity::load_or_create(&p, "client")
}

/// The validator's public key pinned by `MR_VALIDATOR_KEY`, if set.
pub fn pinned_validator_key() -> Result<Option<[u8; 32]>> {
    match std::env::var("MR_VALIDATOR_KEY") {
        Ok(v) if !v.trim().is_empty() => {
            crate::validator::identity::parse_public("MR_VALIDATOR_KEY", &v).map(Some)
        }
        _ => Ok(None),
    }
}

/// Ask the validator for relays as `client`.
pub fn request_as(
    addr: &str,
    client: &Identity,
    req: &JobRequest,
    timeout: Duration,
) -> Result<Assignment> {
    let mut ch = channel::connect(
        addr,
        &Intro::Job(req.clone()),
        Credential::Identity(client),
        pinned_validator_key()?.as_ref(),
        timeout,
    )?;
    let body: serde_json::Value = ch.recv(timeout.min(Duration::from_secs(60)))?;
    if let Ok(r) = serde_json::from_value::<Refusal>(body.clone()) {
        return Err(Error::remote(format!("validator {addr}: {}", r.error)));
    }
    serde_json::from_value(body)
        .map_err(|e| Error::remote(format!("validator {addr}: malformed assignment: {e}")))
}

/// Ask the validator for relays as this machine's client identity.
pub fn request(addr: &str, req: &JobRequest, timeout: Duration) -> Result<Assignment> {
    request_as(addr, &client_identity()?, req, timeout)
}

/// The relay table of `mr-validator status`, read page by page.
pub fn status(addr: &str, timeout: Duration) -> Result<Vec<StatusRow>> {
    Ok(status_full(addr, timeout)?.0)
}

/// The relay table and the flagged clients.
pub fn status_full(
    addr: &str,
    timeout: Duration,
) -> Result<(Vec<StatusRow>, Vec<crate::validator::server::FlaggedClient>)> {
    let mut ch: Channel = channel::connect(
        addr,
        &Intro::Status,
        Credential::None,
        pinned_validator_key()?.as_ref(),
        timeout,
    )?;
    let mut rows = Vec::new();
    let mut flagged = Vec::new();
    loop {
        ch.send(
            &StatusQuery {
                offset: rows.len(),
                limit: STATUS_PAGE,
            },
            timeout,
        )?;
        let page: StatusPage<StatusRow> = ch.recv(timeout)?;
        let got = page.rows.len();
        rows.extend(page.rows);
        flagged.extend(page.flagged_clients);
        if got == 0 || rows.len() >= page.total {
            return Ok((rows, flagged));
        }
    }
}

/// What rank 0 tells the others.
#[derive(Serialize, Deserialize)]
struct Shared {
    assignment: Option<Assignment>,
    error: Option<String>,
}

/// Relays per job asked for: `MR_RELAY_COUNT`, or 0 (the validator's default).
fn relay_count() -> Result<usize> {
    match std::env::var("MR_RELAY_COUNT") {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|_| Error::invalid(format!("MR_RELAY_COUNT={v:?} is not a number"))),
        _ => Ok(0),
    }
}

/// With `MR_VALIDATOR`: rank 0 asks the validator for relays and sends the answer to every
/// other rank over each of its bootstrap streams to that rank (one frame per stream, read
/// before the event loop starts, so no stream is left with a partial message). `Ok(None)`:
/// no relays, use the ring (`MR_ALGO=auto` only).
pub fn share_assignment(mesh: &mut Mesh, config: &Config) -> Result<Option<Assignment>> {
    let validator = config.validator.as_deref().expect("validator configured");
    let deadline = Instant::now() + config.timeout;
    if mesh.rank == 0 {
        let req = JobRequest {
            job: crate::config::to_hex(&mesh.job),
            peers: mesh.size,
            relays: relay_count()?,
            relay_memory: crate::relay::JobHello {
                job: mesh.job,
                rank: 0,
                world: mesh.size,
                stream: 0,
                streams: config.streams,
                chunk_bytes: config.relay_chunk_bytes,
                window: crate::algo::relay::max_window(config.relay_chunk_bytes),
            }
            .budget() as u64,
            max_message_bytes: 0,
        };
        let result = request(validator, &req, config.timeout);
        let shared = match &result {
            Ok(a) => Shared {
                assignment: Some(a.clone()),
                error: None,
            },
            Err(e) if config.algo == Algo::Auto => {
                log::warn!("rank 0: no relays from the validator, using the ring: {e}");
                Shared {
                    assignment: None,
                    error: None,
                }
            }
            Err(e) => Shared {
                assignment: None,
                error: Some(e.to_string()),
            },
        };
        let body = serde_json::to_vec(&shared).expect("json");
        for (ep, s) in mesh.conns.iter_mut() {
            FrameIo {
                stream: s,
                deadline,
                what: format!("relay assignment to {ep}"),
            }
            .send(FrameHeader::new(FrameKind::Control, body.len()), &body)?;
        }
        match (result, shared.assignment) {
            (Err(e), None) if shared.error.is_some() => Err(e),
            (_, a) => Ok(a),
        }
    } else {
        let mut got: Option<Shared> = None;
        for (ep, s) in mesh.conns.iter_mut() {
            if *ep != crate::algo::Endpoint::Rank(0) {
                continue;
            }
            let mut io = FrameIo {
                stream: s,
                deadline,
                what: format!("relay assignment from rank 0 (rank {})", mesh.rank),
            };
            got = Some(crate::validator::proto::recv_json(&mut io)?);
        }
        let shared = got.ok_or_else(|| Error::internal("no connection to rank 0"))?;
        if let Some(e) = shared.error {
            return Err(Error::remote(format!("rank 0: {e}")));
        }
        Ok(shared.assignment)
    }
}

/// Sends sampled-op records to the validator from a background thread, off the critical path.
pub struct Reporter {
    tx: Option<crossbeam_channel::Sender<(ReportMsg, Option<EvidenceTask>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reporter {
    pub fn start(validator: String, job: String, secret: [u8; 32], rank: usize) -> Reporter {
        let (tx, rx) = crossbeam_channel::unbounded::<(ReportMsg, Option<EvidenceTask>)>();
        let thread = std::thread::Builder::new()
            .name(format!("mr-report-{rank}"))
            .spawn(move || {
                let mut conn: Option<Channel> = None;
                for (mut msg, task) in rx {
                    if let (ReportMsg::Op { evidence, .. }, Some(t)) = (&mut msg, task) {
                        *evidence = t.gather();
                    }
                    for attempt in 0..2 {
                        if conn.is_none() {
                            let pinned = pinned_validator_key().ok().flatten();
                            match channel::connect(
                                &validator,
                                &Intro::Report { job: job.clone() },
                                Credential::Secret(&secret),
                                pinned.as_ref(),
                                Duration::from_secs(5),
                            ) {
                                Ok(c) => conn = Some(c),
                                Err(e) => {
                                    log::warn!("rank {rank}: cannot report to the validator: {e}");
                                    break;
                                }
                            }
                        }
                        let c = conn.as_mut().expect("connected");
                        match c.send(&msg, Duration::from_secs(5)) {
                            Ok(()) => break,
                            Err(e) => {
                                conn = None;
                                if attempt == 1 {
                                    log::warn!("rank {rank}: report lost: {e}");
                                }
                            }
                        }
                    }
                }
            })
            .expect("spawn reporter");
        Reporter {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// Queue `msg`; with `task`, gather the relays' receipts into it first.
    pub fn send(&self, msg: ReportMsg, task: Option<EvidenceTask>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((msg, task));
        }
    }
}

impl Drop for Reporter {
    /// Deliver what is queued, then stop.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

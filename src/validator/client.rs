//! Peer side of the validator protocol: rank 0 asks for relays and shares the assignment with
//! the other ranks over the bootstrap mesh; every rank reports sampled ops in the background.

use crate::config::{Algo, Config};
use crate::error::{Error, Result};
use crate::net::bootstrap::{FrameIo, Mesh};
use crate::validator::proto::{self, Assignment, Intro, JobRequest, Refusal, ReportMsg};
use crate::wire::{FrameHeader, FrameKind};
use serde::{Deserialize, Serialize};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Connect to the validator at `addr` and complete the handshake as `intro`, proving `key`.
pub fn connect(addr: &str, intro: &Intro, key: &[u8; 32], timeout: Duration) -> Result<TcpStream> {
    let sa = crate::config::resolve(addr)?;
    let mut s = TcpStream::connect_timeout(&sa, timeout.min(Duration::from_secs(10)))
        .map_err(|e| Error::io(format!("cannot connect to the validator at {addr}"), e))?;
    let _ = s.set_nodelay(true);
    let body = serde_json::to_vec(intro).expect("json");
    FrameIo {
        stream: &mut s,
        deadline: Instant::now() + timeout.min(Duration::from_secs(10)),
        what: format!("validator {addr}"),
    }
    .client_handshake(key, &body)?;
    Ok(s)
}

/// Ask the validator for relays.
pub fn request(addr: &str, req: &JobRequest, timeout: Duration) -> Result<Assignment> {
    let mut s = connect(addr, &Intro::Job(req.clone()), &proto::open_key(), timeout)?;
    let mut io = FrameIo {
        stream: &mut s,
        deadline: Instant::now() + timeout.min(Duration::from_secs(60)),
        what: format!("job request to validator {addr}"),
    };
    let (_, body) = io.expect(FrameKind::Control)?;
    if let Ok(r) = serde_json::from_slice::<Refusal>(&body) {
        return Err(Error::remote(format!("validator {addr}: {}", r.error)));
    }
    proto::parse(&body, &io.what)
}

/// The relay table of `mr-validator status`.
pub fn status(addr: &str, timeout: Duration) -> Result<Vec<crate::validator::server::StatusRow>> {
    let mut s = connect(addr, &Intro::Status, &proto::open_key(), timeout)?;
    proto::recv_json(&mut FrameIo {
        stream: &mut s,
        deadline: Instant::now() + timeout,
        what: format!("status from validator {addr}"),
    })
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
            got = Some(proto::recv_json(&mut io)?);
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
    tx: Option<crossbeam_channel::Sender<ReportMsg>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reporter {
    pub fn start(validator: String, job: String, secret: [u8; 32], rank: usize) -> Reporter {
        let (tx, rx) = crossbeam_channel::unbounded::<ReportMsg>();
        let thread = std::thread::Builder::new()
            .name(format!("mr-report-{rank}"))
            .spawn(move || {
                let key = crate::wire::mac_key(&secret);
                let mut conn: Option<TcpStream> = None;
                for msg in rx {
                    for attempt in 0..2 {
                        if conn.is_none() {
                            match connect(
                                &validator,
                                &Intro::Report { job: job.clone() },
                                &key,
                                Duration::from_secs(5),
                            ) {
                                Ok(s) => conn = Some(s),
                                Err(e) => {
                                    log::warn!("rank {rank}: cannot report to the validator: {e}");
                                    break;
                                }
                            }
                        }
                        let s = conn.as_mut().expect("connected");
                        let sent = proto::send_json(
                            &mut FrameIo {
                                stream: s,
                                deadline: Instant::now() + Duration::from_secs(5),
                                what: "report".into(),
                            },
                            &msg,
                        );
                        match sent {
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

    pub fn send(&self, msg: ReportMsg) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(msg);
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

//! Inbound handshakes on a bootstrap or data listener, run side by side.
//!
//! Anyone can connect to rank 0's bootstrap port or a rank's data port. Handled one at a time,
//! a connection that says nothing held up every real rank queued behind it until its deadline,
//! and a few of them failed the job. Here every accepted connection gets the challenge at once
//! and then has its own short deadline ([`HANDSHAKE_DEADLINE`]) to answer with a `Hello` that
//! proves the key; meanwhile the others proceed. Stray, silent and garbage connections are
//! dropped (logged at `info`), never reported to the job.
//!
//! Non-blocking and single-threaded: the caller calls [`Inbound::poll`] in its wait loop. The
//! caller answers the authenticated connections it returns (welcome or reject) itself.

use crate::error::{Error, Result};
use crate::wire::{self, FrameHeader, FrameKind, Hello, HEADER_LEN, NONCE_LEN};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// How long one inbound connection has from accept to a valid `Hello`.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Largest `Hello` payload read here, in bytes (bootstrap and mesh hellos take about 150).
const MAX_HELLO_BYTES: usize = 1024;
/// Most handshakes in progress at once; a new connection beyond it drops the oldest.
const MAX_PENDING: usize = 128;

/// A connection that proved the key: the caller inspects `body` and answers with
/// [`crate::net::bootstrap::FrameIo::welcome`] (challenge `ns`, client nonce `nc`).
pub struct Authenticated {
    /// In blocking mode again.
    pub stream: TcpStream,
    pub peer: String,
    pub body: Vec<u8>,
    pub ns: [u8; NONCE_LEN],
    pub nc: [u8; NONCE_LEN],
}

struct Pending {
    stream: TcpStream,
    peer: String,
    ns: [u8; NONCE_LEN],
    /// Header, then payload, as it arrives.
    buf: Vec<u8>,
    deadline: Instant,
}

/// What became of one pending handshake after reading what had arrived.
enum Step {
    Waiting,
    /// Proved the key: the hello's body and the client's nonce.
    Done(Vec<u8>, [u8; NONCE_LEN]),
    Dropped(String),
}

impl Pending {
    fn step(&mut self, key: &[u8; 32]) -> Step {
        loop {
            let header = if self.buf.len() < HEADER_LEN {
                None
            } else {
                match self.header() {
                    Ok(h) => Some(h),
                    Err(e) => return Step::Dropped(e.message),
                }
            };
            let want = header.map_or(HEADER_LEN, |h| HEADER_LEN + h.len as usize);
            if let Some(h) = header.filter(|_| self.buf.len() == want) {
                return self.finish(key, &h);
            }
            let mut chunk = [0u8; 256];
            let room = (want - self.buf.len()).min(chunk.len());
            match self.stream.read(&mut chunk[..room]) {
                Ok(0) => return Step::Dropped("closed before its hello".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Step::Waiting,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Step::Dropped(format!("receive failed: {e}")),
            }
        }
    }

    fn header(&self) -> Result<FrameHeader> {
        let h = FrameHeader::decode(self.buf[..HEADER_LEN].try_into().expect("header bytes"))?;
        if h.kind() != FrameKind::Hello {
            return Err(Error::remote(format!(
                "expected a Hello, got {:?}",
                h.kind()
            )));
        }
        if h.len == 0 || h.len as usize > MAX_HELLO_BYTES {
            return Err(Error::remote(format!(
                "Hello of {} bytes is outside 1..={MAX_HELLO_BYTES}",
                h.len
            )));
        }
        Ok(h)
    }

    /// Send a `Reject` with `reason` (best effort: the connection is dropped after it).
    fn reject(&mut self, kind: crate::error::ErrorKind, reason: &str) {
        let mut frame = FrameHeader::reject(kind, reason.len()).encode().to_vec();
        frame.extend_from_slice(reason.as_bytes());
        let _ = self.stream.write(&frame);
    }

    /// The whole hello has arrived (its header: `h`).
    fn finish(&mut self, key: &[u8; 32], h: &FrameHeader) -> Step {
        let hello = match Hello::decode(&self.buf[HEADER_LEN..]) {
            Ok(h) => h,
            Err(e) => return Step::Dropped(e.message),
        };
        if !hello.verify(key, &self.ns) {
            // Tell a rank started with the wrong secret why, rather than letting it time out.
            self.reject(
                crate::error::ErrorKind::Auth,
                "authentication failed: wrong job secret",
            );
            return Step::Dropped("failed authentication (wrong job secret)".into());
        }
        if let Some(msg) = wire::tag_format_mismatch(h.aux, "the connecting rank") {
            self.reject(crate::error::ErrorKind::Remote, &msg);
            return Step::Dropped(msg);
        }
        Step::Done(hello.body.to_vec(), hello.nonce)
    }
}

/// Handshakes in progress on one listener.
pub struct Inbound {
    key: [u8; 32],
    pending: VecDeque<Pending>,
    what: String,
}

impl Inbound {
    /// `what` names the listener in log lines ("rank 0: bootstrap").
    pub fn new(key: [u8; 32], what: impl Into<String>) -> Inbound {
        Inbound {
            key,
            pending: VecDeque::new(),
            what: what.into(),
        }
    }

    /// Accept what is queued on `listener` (which must be non-blocking), advance every
    /// handshake, and return the connections that proved the key. No connection gets longer
    /// than [`HANDSHAKE_DEADLINE`], nor past `deadline`.
    pub fn poll(&mut self, listener: &TcpListener, deadline: Instant) -> Vec<Authenticated> {
        let now = Instant::now();
        loop {
            match listener.accept() {
                Ok((stream, peer)) => self.start(stream, peer.to_string(), now, deadline),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // Out of descriptors or similar: the queue stays, the next poll retries.
                    log::info!("{}: accept failed: {e}", self.what);
                    break;
                }
            }
        }
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            let p = &mut self.pending[i];
            let step = if now >= p.deadline {
                Step::Dropped(format!(
                    "no valid hello within {} ms",
                    HANDSHAKE_DEADLINE.as_millis()
                ))
            } else {
                p.step(&self.key)
            };
            match step {
                Step::Waiting => i += 1,
                Step::Done(body, nc) => {
                    let p = self.pending.remove(i).expect("pending handshake");
                    match p.stream.set_nonblocking(false) {
                        Ok(()) => done.push(Authenticated {
                            stream: p.stream,
                            peer: p.peer,
                            body,
                            ns: p.ns,
                            nc,
                        }),
                        Err(e) => log::info!("{}: dropped {}: {e}", self.what, p.peer),
                    }
                }
                Step::Dropped(why) => {
                    let p = self.pending.remove(i).expect("pending handshake");
                    log::info!("{}: dropped connection from {}: {why}", self.what, p.peer);
                }
            }
        }
        done
    }

    fn start(&mut self, stream: TcpStream, peer: String, now: Instant, deadline: Instant) {
        if self.pending.len() >= MAX_PENDING {
            if let Some(old) = self.pending.pop_front() {
                log::info!(
                    "{}: dropped connection from {}: too many handshakes at once",
                    self.what,
                    old.peer
                );
            }
        }
        let ns = wire::nonce();
        let mut frame = FrameHeader::challenge(ns.len()).encode().to_vec();
        frame.extend_from_slice(&ns);
        // A fresh connection's send buffer takes the 72-byte challenge whole.
        let sent = stream
            .set_nonblocking(true)
            .and_then(|()| stream.set_nodelay(true))
            .and_then(|()| (&stream).write(&frame));
        match sent {
            Ok(n) if n == frame.len() => self.pending.push_back(Pending {
                stream,
                peer,
                ns,
                buf: Vec::new(),
                deadline: (now + HANDSHAKE_DEADLINE).min(deadline.max(now)),
            }),
            Ok(_) => log::info!("{}: dropped connection from {peer}: short write", self.what),
            Err(e) => log::info!("{}: dropped connection from {peer}: {e}", self.what),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::bootstrap::FrameIo;

    /// A non-blocking listener on loopback, its address and a job key.
    fn listen() -> (TcpListener, std::net::SocketAddr, [u8; 32]) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr, wire::mac_key(b"job secret"))
    }

    /// The connector's side of a test connection, with a 10 s deadline.
    fn io<'a>(stream: &'a mut TcpStream, what: &str) -> FrameIo<'a> {
        FrameIo {
            stream,
            deadline: Instant::now() + Duration::from_secs(10),
            what: what.into(),
        }
    }

    #[test]
    fn a_real_client_gets_through_strangers_that_stay() {
        let (listener, addr, key) = listen();
        // Strangers first: silent, garbage, a wrong key.
        let silent = TcpStream::connect(addr).unwrap();
        let mut garbage = TcpStream::connect(addr).unwrap();
        garbage.write_all(&[0xff; 64]).unwrap();
        let wrong = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            io(&mut s, "wrong key")
                .client_handshake(&wire::mac_key(b"another secret"), b"who")
                .unwrap_err()
        });
        let real = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            io(&mut s, "real").client_handshake(&key, b"rank 1")
        });
        let mut inbound = Inbound::new(key, "test");
        let started = Instant::now();
        let deadline = started + Duration::from_secs(10);
        let mut got = Vec::new();
        // Until the real client is through and the wrong one has been answered.
        while (got.is_empty() || !wrong.is_finished()) && Instant::now() < deadline {
            got.extend(inbound.poll(&listener, deadline));
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            started.elapsed() < HANDSHAKE_DEADLINE,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(got.len(), 1);
        let mut a = got.pop().unwrap();
        assert_eq!(a.body, b"rank 1");
        FrameIo {
            stream: &mut a.stream,
            deadline,
            what: "test".into(),
        }
        .welcome(&key, &a.ns, &a.nc, b"")
        .unwrap();
        real.join().unwrap().unwrap();
        assert_eq!(wrong.join().unwrap().kind, crate::error::ErrorKind::Auth);
        drop((silent, garbage));
    }

    /// A rank of a release with another frame-tag format (an older one sends 0 in its Hello)
    /// is told so by name and never joins.
    #[test]
    fn another_tag_format_is_refused_by_name() {
        let (listener, addr, key) = listen();
        let old = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let mut io = io(&mut s, "old rank");
            let (challenge, ns) = io.expect(FrameKind::Challenge).unwrap();
            assert_eq!(challenge.aux, wire::TAG_FORMAT);
            let hello = wire::Hello::sign(&key, &ns.try_into().unwrap(), b"rank 1").encode();
            io.send(FrameHeader::new(FrameKind::Hello, hello.len()), &hello)
                .unwrap();
            io.expect(FrameKind::Welcome).unwrap_err()
        });
        let mut inbound = Inbound::new(key, "test");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !old.is_finished() && Instant::now() < deadline {
            assert!(inbound.poll(&listener, deadline).is_empty());
            std::thread::sleep(Duration::from_millis(1));
        }
        let e = old.join().unwrap();
        assert!(
            e.message.contains("frame-tag format 0 (an older release"),
            "{e}"
        );
    }
}

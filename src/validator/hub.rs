//! The validator's connections: one event-loop thread holds every connection — those still in
//! the handshake and the authenticated sessions that stay open (relays, report streams, status
//! readers) — and a fixed pool of workers does what takes time: checking a Hello and answering
//! it, assigning jobs, judging reports, answering status pages (a pool of its own; relays'
//! addresses are probed by another). An open connection costs a buffer, never a thread.
//!
//! Sockets stay blocking, so the workers' writes keep their timeouts; the loop reads them with
//! `MSG_DONTWAIT` when epoll (mio) says they are readable. A session has at most one message at
//! a worker at a time and is not read meanwhile, so a sender faster than the workers is held
//! back by TCP, not buffered here.
//!
//! Bounds: `max_connections` in all (a connection past it is closed at once), `max_handshakes`
//! in the handshake (a newcomer evicts the oldest), a deadline for the handshake and an idle
//! deadline per session, one frame of buffer per connection (and one frame of message for relay
//! and status sessions; a report session assembles up to `MAX_MESSAGE`); accept errors (out of
//! descriptors) back off and are logged once per interval.
//!
//! Never does: block on a socket, or wait for a worker.

use crate::error::{Error, ErrorKind, Result};
use crate::validator::channel::{Challenge, ChannelWriter, Opener};
use crate::validator::server::{RateLog, RelayLink, State};
use crate::wire::{FrameHeader, FrameKind, HEADER_LEN, MAX_CONTROL_PAYLOAD};
use crossbeam_channel::{Receiver, Sender};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// A connection must finish the handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes buffered per connection: one whole frame.
const BUFFER: usize = HEADER_LEN + MAX_CONTROL_PAYLOAD;
/// How often deadlines are checked.
const SWEEP: Duration = Duration::from_millis(250);

/// An authenticated session the loop serves.
pub enum Kind {
    /// A registered relay: heartbeats and job acknowledgements, handled in the loop.
    Relay {
        id: String,
        generation: u64,
        link: Arc<RelayLink>,
    },
    /// A job member's reports, judged by workers.
    Report { job: String },
    /// A status reader, answered by workers.
    Status { writer: Arc<Mutex<ChannelWriter>> },
}

impl Kind {
    fn idle(&self, state: &State) -> Duration {
        match self {
            Kind::Relay { .. } => state.relay_timeout(),
            Kind::Report { .. } => Duration::from_secs(3600),
            Kind::Status { .. } => Duration::from_secs(30),
        }
    }

    /// Largest message the session may send. Relays send heartbeats and acknowledgements and
    /// status readers send queries, all far under one frame; only reports carry chunk bytes.
    /// (A status reader proves nothing: without this, each could make the loop assemble
    /// [`MAX_MESSAGE`](crate::validator::channel::MAX_MESSAGE) bytes.)
    fn max_message(&self) -> usize {
        match self {
            Kind::Report { .. } => crate::validator::channel::MAX_MESSAGE,
            Kind::Relay { .. } | Kind::Status { .. } => MAX_CONTROL_PAYLOAD,
        }
    }
}

/// Work for the pool.
pub enum Task {
    /// A connector's Hello arrived: check it, answer it, serve what it asked.
    Hello {
        stream: TcpStream,
        challenge: Challenge,
        hello: Vec<u8>,
        peer: SocketAddr,
    },
    /// One message of a report session.
    Report {
        token: Token,
        job: String,
        body: Vec<u8>,
        peer: SocketAddr,
    },
    /// One query of a status session.
    Status {
        token: Token,
        writer: Arc<Mutex<ChannelWriter>>,
        body: Vec<u8>,
    },
}

/// What workers tell the loop.
pub enum Note {
    /// Serve this authenticated connection from now on.
    Session {
        stream: TcpStream,
        opener: Opener,
        kind: Kind,
        peer: SocketAddr,
    },
    /// The session's message is handled: read it again.
    Done(Token),
    /// End the session.
    Close(Token),
    /// A connection a worker held has ended there.
    Ended,
}

/// The workers' way back to the loop.
#[derive(Clone)]
pub struct Notes {
    tx: Sender<Note>,
    waker: Arc<Waker>,
}

impl Notes {
    pub fn send(&self, note: Note) {
        if self.tx.send(note).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

enum Phase {
    Greeting(Challenge),
    Session {
        opener: Opener,
        kind: Kind,
        busy: bool,
    },
}

struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    buf: Vec<u8>,
    /// The other end closed; what is buffered is still acted on.
    eof: bool,
    deadline: Instant,
    phase: Phase,
}

/// What reading a connection came to.
enum Read {
    /// Nothing more to read now.
    Drained,
    /// The other end closed.
    Closed,
}

/// Read what is there without blocking, up to `BUFFER` bytes buffered, through `scratch` (so
/// a connection's buffer holds only bytes that arrived).
fn fill(conn: &mut Conn, scratch: &mut [u8]) -> std::io::Result<Read> {
    while conn.buf.len() < BUFFER {
        let want = (BUFFER - conn.buf.len()).min(scratch.len());
        // SAFETY: the pointer and length name `want` bytes of `scratch`, a live buffer of at
        // least that size; recv writes at most `want` bytes there and returns how many.
        let n = unsafe {
            libc::recv(
                conn.stream.as_raw_fd(),
                scratch.as_mut_ptr().cast(),
                want,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock => Ok(Read::Drained),
                std::io::ErrorKind::Interrupted => continue,
                _ => Err(e),
            };
        }
        if n == 0 {
            return Ok(Read::Closed);
        }
        conn.buf.extend_from_slice(&scratch[..n as usize]);
    }
    Ok(Read::Drained)
}

/// The first whole frame buffered: its header and its length with the header.
fn whole_frame(buf: &[u8], peer: &SocketAddr) -> Result<Option<(FrameHeader, usize)>> {
    let what = || format!("validator connection from {peer}");
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let head: &[u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().expect("header length");
    let h = FrameHeader::decode(head).map_err(|e| e.context(what()))?;
    if h.len > MAX_CONTROL_PAYLOAD as u64 {
        return Err(Error::remote(format!(
            "{}: {} byte control frame is too large",
            what(),
            h.len
        )));
    }
    let total = HEADER_LEN + h.len as usize;
    Ok((buf.len() >= total).then_some((h, total)))
}

/// The event loop.
pub struct Hub {
    state: Arc<State>,
    poll: Poll,
    listener: TcpListener,
    tasks: Sender<Task>,
    /// Status queries go to their own workers: writing a page may block on a reader that does
    /// not read, and must not hold the workers that check handshakes and judge reports.
    status_tasks: Sender<Task>,
    notes_rx: Receiver<Note>,
    notes: Notes,
    conns: HashMap<Token, Conn>,
    /// Greeting connections, oldest first (tokens of ended ones are skipped).
    greetings: VecDeque<Token>,
    greeting_count: usize,
    /// Status sessions, oldest first (tokens of ended ones are skipped): they need no
    /// credential, so they get at most a quarter of `max_connections`, the oldest making room.
    statuses: VecDeque<Token>,
    status_count: usize,
    /// Each relay's session and its registration's generation: a relay registering again
    /// ends its older session.
    relay_sessions: HashMap<String, (Token, u64)>,
    /// Connections at workers (their Hello being served).
    at_workers: usize,
    next_token: usize,
    accept_log: RateLog,
    cap_log: RateLog,
    backoff: Duration,
    accept_retry: Option<Instant>,
    /// Where reads land before they are appended to a connection's buffer.
    scratch: Vec<u8>,
    /// Bytes of messages being put together, over every session (reports span frames).
    assembling: usize,
}

impl Hub {
    /// A loop on `listener`, feeding `tasks` to the workers and status queries to
    /// `status_tasks`.
    pub fn new(
        state: Arc<State>,
        listener: TcpListener,
        tasks: Sender<Task>,
        status_tasks: Sender<Task>,
    ) -> Result<Hub> {
        let poll = Poll::new().map_err(|e| Error::io("validator event loop", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("validator listener", e))?;
        poll.registry()
            .register(
                &mut SourceFd(&listener.as_raw_fd()),
                LISTENER,
                Interest::READABLE,
            )
            .map_err(|e| Error::io("validator listener", e))?;
        let waker = Arc::new(
            Waker::new(poll.registry(), WAKER).map_err(|e| Error::io("validator waker", e))?,
        );
        let (tx, notes_rx) = crossbeam_channel::unbounded();
        Ok(Hub {
            state,
            poll,
            listener,
            tasks,
            status_tasks,
            notes_rx,
            notes: Notes { tx, waker },
            conns: HashMap::new(),
            greetings: VecDeque::new(),
            greeting_count: 0,
            statuses: VecDeque::new(),
            status_count: 0,
            relay_sessions: HashMap::new(),
            at_workers: 0,
            next_token: 2,
            accept_log: RateLog::new(Duration::from_secs(10)),
            cap_log: RateLog::new(Duration::from_secs(10)),
            backoff: Duration::from_millis(10),
            accept_retry: None,
            scratch: vec![0; BUFFER],
            assembling: 0,
        })
    }

    /// Where workers send their notes.
    pub fn notes(&self) -> Notes {
        self.notes.clone()
    }

    /// Connections held: in the loop and at workers.
    fn live(&self) -> usize {
        self.conns.len() + self.at_workers
    }

    /// Serve forever.
    pub fn run(mut self) -> Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut swept = Instant::now();
        loop {
            let timeout = match self.accept_retry {
                Some(t) => t.saturating_duration_since(Instant::now()).min(SWEEP),
                None => SWEEP,
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(Error::io("validator event loop", e));
                }
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    t => self.pump(t),
                }
            }
            while let Ok(note) = self.notes_rx.try_recv() {
                self.on_note(note);
            }
            if self.accept_retry.is_some_and(|t| Instant::now() >= t) {
                self.accept_retry = None;
                self.accept();
            }
            if swept.elapsed() >= SWEEP {
                swept = Instant::now();
                self.sweep();
            }
        }
    }

    fn accept(&mut self) {
        if self.accept_retry.is_some() {
            return;
        }
        loop {
            let (stream, peer) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors (EMFILE) and the like: the backlog waits until some
                    // connection ends; try again after a back-off instead of spinning.
                    self.accept_log.warn(format_args!(
                        "accept failed: {e}; retrying in {} ms",
                        self.backoff.as_millis()
                    ));
                    self.accept_retry = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
                    return;
                }
            };
            self.backoff = Duration::from_millis(10);
            let live = self.live();
            if live >= self.state.config.max_connections.max(1) {
                self.cap_log.warn(format_args!(
                    "{live} connections, the limit: refusing {peer}"
                ));
                continue;
            }
            self.greet(stream, peer);
        }
    }

    /// Send the Challenge and wait for the Hello.
    fn greet(&mut self, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let challenge = Challenge::new(&self.state.identity);
        // A fresh socket's send buffer is empty: the small Challenge never waits.
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        if let Err(e) = crate::net::conn::send_all(&stream, &challenge.frame()) {
            log::debug!("connection from {peer}: sending the challenge: {e}");
            return;
        }
        while self.greeting_count >= self.state.config.max_handshakes.max(1) {
            let Some(old) = self.greetings.pop_front() else {
                break;
            };
            if matches!(
                self.conns.get(&old).map(|c| &c.phase),
                Some(Phase::Greeting(_))
            ) {
                log::debug!("evicting the oldest connection in the handshake for {peer}");
                self.close(old);
            }
        }
        let token = match self.watch(&stream) {
            Ok(t) => t,
            Err(e) => {
                log::warn!("connection from {peer}: cannot watch it: {e}");
                return;
            }
        };
        self.conns.insert(
            token,
            Conn {
                stream,
                peer,
                buf: Vec::new(),
                eof: false,
                deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                phase: Phase::Greeting(challenge),
            },
        );
        self.greetings.push_back(token);
        self.greeting_count += 1;
        self.pump(token);
    }

    /// Watch `stream` for reads under a new token.
    fn watch(&mut self, stream: &TcpStream) -> std::io::Result<Token> {
        let token = self.token();
        self.poll.registry().register(
            &mut SourceFd(&stream.as_raw_fd()),
            token,
            Interest::READABLE,
        )?;
        Ok(token)
    }

    fn token(&mut self) -> Token {
        loop {
            self.next_token = self.next_token.wrapping_add(1).max(2);
            let t = Token(self.next_token);
            if !self.conns.contains_key(&t) {
                return t;
            }
        }
    }

    /// Read and act on what connection `token` sent, as far as it can go now.
    fn pump(&mut self, token: Token) {
        if let Err(e) = self.pump_inner(token) {
            if let Some(c) = self.conns.get(&token) {
                if e.kind == ErrorKind::Auth {
                    self.state
                        .refusal_log()
                        .warn(format_args!("connection from {}: {e}", c.peer));
                } else {
                    log::debug!("connection from {}: {e}", c.peer);
                }
            }
            self.close(token);
        }
    }

    fn pump_inner(&mut self, token: Token) -> Result<()> {
        loop {
            // Act on the whole frames buffered.
            loop {
                let Some(conn) = self.conns.get_mut(&token) else {
                    return Ok(());
                };
                if matches!(conn.phase, Phase::Session { busy: true, .. }) {
                    return Ok(());
                }
                let Some((h, total)) = whole_frame(&conn.buf, &conn.peer)? else {
                    break;
                };
                let what = || format!("validator connection from {}", conn.peer);
                match &mut conn.phase {
                    Phase::Greeting(_) => {
                        if h.kind() != FrameKind::Hello {
                            return Err(Error::remote(format!(
                                "{}: expected Hello, got {:?}",
                                what(),
                                h.kind()
                            )));
                        }
                        let hello = conn.buf[HEADER_LEN..total].to_vec();
                        return self.hand_hello(token, hello);
                    }
                    Phase::Session { opener, .. } => {
                        if h.kind() != FrameKind::Control {
                            return Err(Error::remote(format!(
                                "{}: expected Control, got {:?}",
                                what(),
                                h.kind()
                            )));
                        }
                        let before = opener.assembling();
                        let msg = opener.frame(&conn.buf[HEADER_LEN..total])?;
                        let after = opener.assembling();
                        conn.buf.drain(..total);
                        // What all sessions are putting together is bounded, so admitted
                        // clients' report streams cannot add up to gigabytes between them.
                        self.assembling = self.assembling + after - before;
                        let cap = self.state.config.max_assembling.max(MAX_CONTROL_PAYLOAD);
                        if self.assembling > cap {
                            return Err(Error::remote(format!(
                                "{}: sessions hold {} bytes of unfinished messages, more than \
                                 the {cap} byte limit (max_assembling)",
                                what(),
                                self.assembling
                            )));
                        }
                        if conn.buf.is_empty() && conn.buf.capacity() > 4096 {
                            // Idle sessions keep no large buffer.
                            conn.buf = Vec::new();
                        }
                        if let Some(body) = msg {
                            self.on_message(token, body)?;
                        }
                    }
                }
            }
            // Then read what is there; stop when nothing new makes a frame whole.
            let conn = self.conns.get_mut(&token).expect("connection");
            if conn.eof {
                if !conn.buf.is_empty() {
                    log::debug!(
                        "connection from {}: closed in the middle of a frame",
                        conn.peer
                    );
                }
                self.close(token);
                return Ok(());
            }
            let read = fill(conn, &mut self.scratch);
            let peer = conn.peer;
            match read.map_err(|e| Error::io(format!("connection from {peer}: receive"), e))? {
                // Frames read before the end are still acted on.
                Read::Closed => conn.eof = true,
                Read::Drained => {
                    if whole_frame(&conn.buf, &peer)?.is_none() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// A Hello is in: hand the connection to a worker.
    fn hand_hello(&mut self, token: Token, hello: Vec<u8>) -> Result<()> {
        let conn = self.remove(token).expect("connection");
        let Phase::Greeting(challenge) = conn.phase else {
            unreachable!("only greetings hand a hello")
        };
        self.at_workers += 1;
        if self
            .tasks
            .send(Task::Hello {
                stream: conn.stream,
                challenge,
                hello,
                peer: conn.peer,
            })
            .is_err()
        {
            self.at_workers -= 1;
        }
        Ok(())
    }

    /// A whole message of session `token`.
    fn on_message(&mut self, token: Token, body: Vec<u8>) -> Result<()> {
        let state = self.state.clone();
        let conn = self.conns.get_mut(&token).expect("connection");
        let Phase::Session { kind, busy, .. } = &mut conn.phase else {
            unreachable!("messages come from sessions")
        };
        conn.deadline = Instant::now() + kind.idle(&state);
        match kind {
            Kind::Relay {
                id,
                generation,
                link,
            } => {
                let what = format!("relay {id}");
                let msg = crate::validator::proto::parse(&body, &what)?;
                state.on_relay_message(id, *generation, link, msg)
            }
            Kind::Report { job } => {
                *busy = true;
                let _ = self.tasks.send(Task::Report {
                    token,
                    job: job.clone(),
                    body,
                    peer: conn.peer,
                });
                Ok(())
            }
            Kind::Status { writer } => {
                *busy = true;
                let _ = self.status_tasks.send(Task::Status {
                    token,
                    writer: writer.clone(),
                    body,
                });
                Ok(())
            }
        }
    }

    fn on_note(&mut self, note: Note) {
        match note {
            Note::Session {
                stream,
                mut opener,
                kind,
                peer,
            } => {
                self.at_workers = self.at_workers.saturating_sub(1);
                opener.limit_to(kind.max_message());
                let status = matches!(kind, Kind::Status { .. });
                if status && !self.room_for_status() {
                    log::debug!("status session with {peer}: no room; closing it");
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    return;
                }
                // A relay keeps one session: its newest registration's.
                let mut replaced = None;
                if let Kind::Relay { id, generation, .. } = &kind {
                    if let Some(&(old, g)) = self.relay_sessions.get(id) {
                        if g > *generation {
                            log::debug!("relay {id}: a newer registration's session is here");
                            let _ = stream.shutdown(std::net::Shutdown::Both);
                            self.ended(&kind);
                            return;
                        }
                        replaced = Some(old);
                    }
                }
                let token = match self.watch(&stream) {
                    Ok(t) => t,
                    Err(e) => {
                        log::warn!("session with {peer}: cannot watch it: {e}");
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                        self.ended(&kind);
                        return;
                    }
                };
                let deadline = Instant::now() + kind.idle(&self.state);
                if status {
                    self.statuses.push_back(token);
                    self.status_count += 1;
                }
                if let Kind::Relay { id, generation, .. } = &kind {
                    self.relay_sessions.insert(id.clone(), (token, *generation));
                    if let Some(old) = replaced {
                        log::debug!("relay {id} registered again: ending its older session");
                        self.close(old);
                    }
                }
                self.conns.insert(
                    token,
                    Conn {
                        stream,
                        peer,
                        buf: Vec::new(),
                        eof: false,
                        deadline,
                        phase: Phase::Session {
                            opener,
                            kind,
                            busy: false,
                        },
                    },
                );
                // Whatever arrived while a worker held it is read now.
                self.pump(token);
            }
            Note::Done(token) => {
                if let Some(Conn {
                    phase: Phase::Session { busy, .. },
                    ..
                }) = self.conns.get_mut(&token)
                {
                    *busy = false;
                }
                self.pump(token);
            }
            Note::Close(token) => self.close(token),
            Note::Ended => self.at_workers = self.at_workers.saturating_sub(1),
        }
    }

    /// Make room for one more status session by closing the oldest idle ones; false when
    /// there is none to close.
    fn room_for_status(&mut self) -> bool {
        let cap = (self.state.config.max_connections / 4).max(1);
        let mut tries = self.statuses.len();
        while self.status_count >= cap && tries > 0 {
            tries -= 1;
            let Some(old) = self.statuses.pop_front() else {
                break;
            };
            if let Some(Phase::Session {
                kind: Kind::Status { .. },
                busy,
                ..
            }) = self.conns.get(&old).map(|c| &c.phase)
            {
                if *busy {
                    // Its worker will send a note about it: keep it.
                    self.statuses.push_back(old);
                } else {
                    log::debug!("closing the oldest status session for a newer one");
                    self.close(old);
                }
            }
        }
        self.status_count < cap
    }

    /// Close connections past their deadlines.
    fn sweep(&mut self) {
        let now = Instant::now();
        let late: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.deadline <= now && !matches!(c.phase, Phase::Session { busy: true, .. })
            })
            .map(|(t, _)| *t)
            .collect();
        for t in late {
            if let Some(c) = self.conns.get(&t) {
                log::debug!("connection from {}: idle past its deadline", c.peer);
            }
            self.close(t);
        }
    }

    fn remove(&mut self, token: Token) -> Option<Conn> {
        let conn = self.conns.remove(&token)?;
        // What its unfinished messages held leaves the shared count with it, however it goes.
        if let Phase::Session { opener, .. } = &conn.phase {
            self.assembling -= opener.assembling();
        }
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&conn.stream.as_raw_fd()));
        if matches!(conn.phase, Phase::Greeting(_)) {
            self.greeting_count -= 1;
            if self.greetings.front() == Some(&token) {
                self.greetings.pop_front();
            }
        }
        match &conn.phase {
            Phase::Session {
                kind: Kind::Status { .. },
                ..
            } => self.status_count -= 1,
            Phase::Session {
                kind: Kind::Relay { id, .. },
                ..
            } if self.relay_sessions.get(id).is_some_and(|s| s.0 == token) => {
                self.relay_sessions.remove(id);
            }
            _ => {}
        }
        if self.statuses.len() > 2 * self.status_count + 64 {
            let live: VecDeque<Token> = self
                .statuses
                .iter()
                .copied()
                .filter(|t| {
                    matches!(
                        self.conns.get(t).map(|c| &c.phase),
                        Some(Phase::Session {
                            kind: Kind::Status { .. },
                            ..
                        })
                    )
                })
                .collect();
            self.statuses = live;
        }
        // Stale tokens at the front go as they come up; keep the queue from growing.
        while self.greetings.len() > 2 * self.greeting_count + 64 {
            let live: VecDeque<Token> = self
                .greetings
                .iter()
                .copied()
                .filter(|t| {
                    matches!(
                        self.conns.get(t).map(|c| &c.phase),
                        Some(Phase::Greeting(_))
                    )
                })
                .collect();
            self.greetings = live;
        }
        Some(conn)
    }

    fn close(&mut self, token: Token) {
        let Some(conn) = self.remove(token) else {
            return;
        };
        // The writer half (a relay's link, a status writer) may outlive this: make the close
        // reach the other end.
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        if let Phase::Session { kind, .. } = &conn.phase {
            self.ended(kind);
        }
    }

    fn ended(&self, kind: &Kind) {
        if let Kind::Relay {
            id,
            generation,
            link,
        } = kind
        {
            self.state.relay_lost(id, *generation, link);
        }
    }
}

//! The relay daemon's event loop: one mio `Poll` serving many jobs, isolated by job id.
//!
//! Each connection goes through `AwaitHello` (challenge sent, proof expected within the
//! handshake timeout) to `Ready` (a member of one job as one rank's stream). Every frame
//! header is checked before its payload is read: a `Hello` against [`MAX_HELLO_BYTES`],
//! data frames against the job's announced chunk size and the op's element count. A frame that
//! fails a check closes only its own connection, with the reason logged (rate-limited).
//!
//! What strangers can hold is bounded by [`Limits`]: at most `max_unauthenticated`
//! connections are waiting to authenticate (a new one evicts the oldest), every connection has
//! a deadline that progress resets, a job lives while data arrives and its reservation ends
//! with it. When the process runs out of descriptors, the loop evicts a waiting connection or
//! accepts and closes the newcomer with a spare descriptor, and retries accepting on a timer,
//! so queued connections are never stranded.

use crate::algo::Collective;
use crate::buffer::Scratch;
use crate::error::{Error, ErrorKind, Result};
use crate::net::conn::{self, FrameIn, FrameOut};
use crate::relay::admission::{self, Admission, KnownJob, Reservations};
use crate::relay::limits::{self, Activity, Limits, RejectLog, MAX_HELLO_BYTES};
use crate::relay::receipts::Kind;
use crate::relay::sums::{check_data_header, Fault, Sums};
use crate::relay::JobHello;
use crate::wire::{
    self, FrameHeader, FrameKind, Hello, SessionKeys, TagStream, HEADER_LEN, MAX_CONTROL_PAYLOAD,
};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{IoSliceMut, Read};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const FIRST_CONN: usize = 2;
/// How soon to try `accept` again after it failed for want of descriptors or memory.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How long a refused connection may take to receive its reason before it is closed.
const REFUSAL_FLUSH: Duration = Duration::from_secs(2);

/// How a relay runs.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub listen: SocketAddr,
    /// The static job token connections may prove knowledge of (empty: none, only jobs
    /// granted by a validator are served).
    pub token: Vec<u8>,
    /// Jobs granted by a validator (`--validator`): their peers prove the job's own token.
    pub grants: Option<crate::relay::registration::JobGrants>,
    /// Most memory all admitted jobs together may budget for.
    pub max_memory: usize,
    /// How often to log a status line.
    pub status_interval: Duration,
    /// Connection caps and deadlines.
    pub limits: Limits,
    /// Most bytes per second the relay sends, over all connections (`--max-rate`).
    pub max_rate: Option<u64>,
}

/// Payload of a queued frame.
enum Payload {
    None,
    Owned(Vec<u8>),
    Shared(Rc<Scratch>),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::None => &[],
            Payload::Owned(v) => v,
            Payload::Shared(s) => s.as_slice(),
        }
    }
}

/// A forwarded broadcast chunk: once every copy is written, the root gets an acknowledgement.
struct Fanout {
    remaining: Cell<usize>,
    root_conn: usize,
    ack: FrameHeader,
}

struct OutFrame {
    frame: FrameOut,
    payload: Payload,
    fanout: Option<Rc<Fanout>>,
}

enum State {
    AwaitHello {
        nonce: [u8; 32],
    },
    Ready {
        job: [u8; 16],
        rank: usize,
    },
    /// Refused: flush the reason, then close.
    Closing {
        since: Instant,
    },
}

enum ReadState {
    Header {
        buf: [u8; HEADER_LEN],
        got: usize,
    },
    /// Payload, then (after the handshake) tag: acted on only once the tag checked. Boxed:
    /// the running tag is large, and idle connections (in `Header`) should stay small.
    Payload {
        frame: Box<FrameIn>,
        buf: Scratch,
    },
}

struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    state: State,
    read: ReadState,
    out: VecDeque<OutFrame>,
    out_bytes: usize,
    /// Frame tags, from the Welcome on (before it, frames carry none).
    tagged: bool,
    tx: TagStream,
    rx: Option<TagStream>,
    /// Whether WRITABLE is registered (only while `out` is not empty).
    writable: bool,
    accepted: Instant,
    /// When bytes last arrived / left (progress resets the connection's deadlines).
    last_read: Instant,
    last_write: Instant,
}

impl Conn {
    fn activity(&self) -> Activity {
        Activity {
            authenticated: matches!(self.state, State::Ready { .. }),
            accepted: self.accepted,
            mid_frame: match &self.read {
                ReadState::Header { got, .. } => *got > 0,
                ReadState::Payload { .. } => true,
            },
            last_read: self.last_read,
            backlog: !self.out.is_empty(),
            last_write: self.last_write,
        }
    }
}

struct Job {
    hello: JobHello,
    /// Connection ids per rank.
    members: Vec<Vec<usize>>,
    sums: Sums,
    budget: usize,
    bytes_in: u64,
    /// When the job was admitted or its last data frame arrived.
    last_data: Instant,
}

#[derive(Default)]
struct Stats {
    bytes_in: u64,
    bytes_out: u64,
    last_in: u64,
    last_out: u64,
}

/// The relay daemon.
pub struct Relay {
    poll: Poll,
    listener: TcpListener,
    config: RelayConfig,
    key: [u8; 32],
    conns: HashMap<usize, Conn>,
    next_id: usize,
    jobs: HashMap<[u8; 16], Job>,
    reserved: usize,
    stats: Stats,
    signal_fd: Option<i32>,
    stop: bool,
    test_faults: TestFaults,
    /// The loop's clock, read once per wake-up.
    now: Instant,
    /// Connections not authenticated yet (waiting or being refused), and their ids in
    /// accept order (ids of connections that moved on are skipped lazily).
    unauthenticated: usize,
    unauthenticated_order: VecDeque<usize>,
    /// Held open so that, out of descriptors, the relay can still accept and close.
    spare_fd: Option<File>,
    /// When to try `accept` again after it failed.
    accept_retry: Option<Instant>,
    rejects: RejectLog,
    /// Rate cap on everything the relay sends, and the connections waiting for it.
    pacer: Option<crate::pace::TokenBucket>,
    pace_waiting: Vec<usize>,
    pace_wake: Option<Instant>,
}

/// Misbehaviour for testing verification (debug builds only): `MR_RELAY_TEST_CORRUPT=f`
/// perturbs every element of a fraction `f` of result chunks; `MR_RELAY_TEST_EQUIVOCATE=f`
/// sends other bytes to every rank but 0 for a fraction `f` of chunks;
/// `MR_RELAY_TEST_DELAY_US=n` sleeps `n` µs on every data frame, making a slow relay.
#[derive(Default)]
struct TestFaults {
    corrupt: f64,
    equivocate: f64,
    delay: Duration,
    rng: u64,
}

impl TestFaults {
    fn from_env() -> TestFaults {
        let mut t = TestFaults {
            rng: 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id()),
            ..TestFaults::default()
        };
        if cfg!(debug_assertions) {
            let f = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<f64>().ok());
            t.corrupt = f("MR_RELAY_TEST_CORRUPT").unwrap_or(0.0);
            t.equivocate = f("MR_RELAY_TEST_EQUIVOCATE").unwrap_or(0.0);
            t.delay = Duration::from_micros(f("MR_RELAY_TEST_DELAY_US").unwrap_or(0.0) as u64);
            if !t.delay.is_zero() {
                log::warn!("test faults enabled: {:?} delay per data frame", t.delay);
            }
            if t.corrupt > 0.0 || t.equivocate > 0.0 {
                log::warn!(
                    "test faults enabled: corrupting {} and equivocating {} of result chunks",
                    t.corrupt,
                    t.equivocate
                );
            }
        }
        t
    }

    fn hit(&mut self, fraction: f64) -> bool {
        if fraction <= 0.0 {
            return false;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64 <= fraction
    }

    /// A copy of `s` with the lowest bit of every `elem`-byte element flipped.
    fn perturbed(s: &Scratch, elem: usize) -> Result<Scratch> {
        let mut out = Scratch::zeroed(s.len())?;
        out.as_mut_slice().copy_from_slice(s.as_slice());
        out.as_mut_slice()
            .iter_mut()
            .step_by(elem.max(1))
            .for_each(|b| *b ^= 1);
        Ok(out)
    }
}

static SIGNAL_WRITE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_sig: libc::c_int) {
    let fd = SIGNAL_WRITE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = 1u8;
        // SAFETY: write(2) is async-signal-safe; fd is the non-blocking write end of our pipe
        // and `b` lives for the call.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

/// Route SIGINT and SIGTERM to a self-pipe; returns its read end.
fn install_signal_pipe() -> Result<i32> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(Error::io(
            "creating the signal pipe",
            std::io::Error::last_os_error(),
        ));
    }
    SIGNAL_WRITE_FD.store(fds[1], Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: on_signal only performs an async-signal-safe write.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
    Ok(fds[0])
}

impl Relay {
    /// Bind the listener (and, with `signals`, route SIGINT/SIGTERM to a clean shutdown).
    pub fn bind(config: RelayConfig, signals: bool) -> Result<Relay> {
        let poll = Poll::new().map_err(|e| Error::io("cannot create event loop", e))?;
        let mut listener = TcpListener::bind(config.listen)
            .map_err(|e| Error::io(format!("cannot listen on {}", config.listen), e))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(|e| Error::io("registering the listener", e))?;
        let signal_fd = if signals {
            let fd = install_signal_pipe()?;
            poll.registry()
                .register(&mut mio::unix::SourceFd(&fd), SIGNALS, Interest::READABLE)
                .map_err(|e| Error::io("registering the signal pipe", e))?;
            Some(fd)
        } else {
            None
        };
        let key = wire::mac_key(&config.token);
        let now = Instant::now();
        let rejects = RejectLog::new(config.limits.reject_log_interval, now);
        let max_rate = config.max_rate;
        Ok(Relay {
            poll,
            listener,
            config,
            key,
            conns: HashMap::new(),
            next_id: FIRST_CONN,
            jobs: HashMap::new(),
            reserved: 0,
            stats: Stats::default(),
            signal_fd,
            stop: false,
            test_faults: TestFaults::from_env(),
            now,
            unauthenticated: 0,
            unauthenticated_order: VecDeque::new(),
            spare_fd: File::open("/dev/null").ok(),
            accept_retry: None,
            rejects,
            pacer: max_rate.map(|rate| {
                crate::pace::TokenBucket::new(
                    rate,
                    crate::pace::TokenBucket::default_burst(rate),
                    now,
                )
            }),
            pace_waiting: Vec::new(),
            pace_wake: None,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| Error::io("listener address", e))
    }

    /// Serve until SIGINT/SIGTERM.
    pub fn run(&mut self) -> Result<()> {
        let mut events = Events::with_capacity(256);
        let mut last_status = Instant::now();
        while !self.stop {
            let wake = self.poll_timeout();
            let res = self.poll.poll(&mut events, Some(wake));
            self.now = Instant::now();
            if let Err(e) = res {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("event loop poll failed", e));
            }
            if self.pace_wake.is_some_and(|t| self.now >= t) {
                self.pace_wake = None;
                for id in std::mem::take(&mut self.pace_waiting) {
                    self.flush(id);
                }
            }
            if self.accept_retry.is_some_and(|t| self.now >= t) {
                self.accept_retry = None;
                self.accept();
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    SIGNALS => {
                        log::info!("signal received: shutting down");
                        self.stop = true;
                    }
                    Token(id) => {
                        if ev.is_writable() || ev.is_error() {
                            self.flush(id);
                        }
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.read_conn(id);
                        }
                    }
                }
            }
            self.sweep();
            if let Some(s) = self.rejects.poll_summary(self.now) {
                log::warn!("{s}");
            }
            if last_status.elapsed() >= self.config.status_interval {
                self.log_status(last_status.elapsed());
                last_status = Instant::now();
            }
        }
        self.shutdown();
        Ok(())
    }

    fn log_status(&mut self, dt: Duration) {
        let s = &mut self.stats;
        let secs = dt.as_secs_f64().max(1e-3);
        let held: usize = self.jobs.values().map(|j| j.sums.held()).sum();
        log::info!(
            "status: {} jobs, {} connections, in {:.1} MB ({:.1} MB/s), out {:.1} MB ({:.1} MB/s), holding {:.1} MB",
            self.jobs.len(),
            self.conns.len(),
            s.bytes_in as f64 / 1e6,
            (s.bytes_in - s.last_in) as f64 / 1e6 / secs,
            s.bytes_out as f64 / 1e6,
            (s.bytes_out - s.last_out) as f64 / 1e6 / secs,
            held as f64 / 1e6
        );
        s.last_in = s.bytes_in;
        s.last_out = s.bytes_out;
    }

    fn shutdown(&mut self) {
        let ids: Vec<usize> = self.conns.keys().copied().collect();
        for id in &ids {
            self.send_control(*id, FrameHeader::new(FrameKind::Goodbye, 0), Vec::new());
        }
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut events = Events::with_capacity(64);
        while Instant::now() < deadline && self.conns.values().any(|c| !c.out.is_empty()) {
            let _ = self.poll.poll(&mut events, Some(Duration::from_millis(10)));
            for id in &ids {
                self.flush(*id);
            }
        }
        for id in ids {
            self.close(id, "relay shutting down", false);
        }
        if let Some(fd) = self.signal_fd.take() {
            // SAFETY: fd is the pipe's read end, owned by us and closed once.
            unsafe { libc::close(fd) };
        }
        log::info!("relay stopped");
    }

    /// How long the loop may sleep: until the next retry, deadline or summary, at most 500 ms.
    fn poll_timeout(&self) -> Duration {
        let mut wake = self.now + Duration::from_millis(500);
        if let Some(t) = self.accept_retry {
            wake = wake.min(t);
        }
        if let Some(t) = self.rejects.next_summary() {
            wake = wake.min(t);
        }
        if let Some(t) = self.pace_wake {
            wake = wake.min(t);
        }
        wake.saturating_duration_since(self.now)
    }

    /// Accept every queued connection.
    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => self.admit_connection(stream, peer),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Out of descriptors. The listener will not report the queued connections
                    // again, so make room and keep going, and try again soon in any case.
                    self.accept_retry = Some(self.now + ACCEPT_RETRY);
                    if self.evict_oldest_unauthenticated("evicted: out of file descriptors") {
                        continue;
                    }
                    if !self.shed_one() {
                        return;
                    }
                }
                Err(e) => {
                    if self.rejects.record(self.now, "accept failed") {
                        log::warn!("accept failed: {e}");
                    }
                    self.accept_retry = Some(self.now + ACCEPT_RETRY);
                    return;
                }
            }
        }
    }

    /// Out of descriptors with nobody to evict: accept the next queued connection on the
    /// spare descriptor and close it at once, so its client hears no instead of waiting.
    /// Returns whether one was shed (the queue may hold more).
    fn shed_one(&mut self) -> bool {
        let Some(spare) = self.spare_fd.take() else {
            self.spare_fd = File::open("/dev/null").ok();
            return false;
        };
        drop(spare);
        let shed = match self.listener.accept() {
            Ok((stream, peer)) => {
                drop(stream);
                if self
                    .rejects
                    .record(self.now, "shed: out of file descriptors")
                {
                    log::warn!("closed connection from {peer}: out of file descriptors");
                }
                true
            }
            Err(_) => false,
        };
        self.spare_fd = File::open("/dev/null").ok();
        shed
    }

    /// Close the connection that has waited longest to authenticate; false if there is none.
    fn evict_oldest_unauthenticated(&mut self, reason: &'static str) -> bool {
        while let Some(id) = self.unauthenticated_order.pop_front() {
            if self
                .conns
                .get(&id)
                .is_some_and(|c| !matches!(c.state, State::Ready { .. }))
            {
                self.close_rejected(id, reason);
                return true;
            }
        }
        false
    }

    /// Register an accepted connection and challenge it.
    fn admit_connection(&mut self, mut stream: TcpStream, peer: SocketAddr) {
        if self.unauthenticated >= self.config.limits.max_unauthenticated {
            self.evict_oldest_unauthenticated("evicted: too many unauthenticated connections");
        }
        let _ = conn::tune(&stream);
        let id = self.next_id;
        self.next_id += 1;
        // WRITABLE is watched only while frames wait (see `flush`).
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(id), Interest::READABLE)
        {
            if self.rejects.record(self.now, "cannot register") {
                log::warn!("cannot register connection from {peer}: {e}");
            }
            return;
        }
        let nonce = wire::nonce();
        log::debug!("connection {id} from {peer}");
        self.conns.insert(
            id,
            Conn {
                stream,
                peer,
                state: State::AwaitHello { nonce },
                read: ReadState::Header {
                    buf: [0; HEADER_LEN],
                    got: 0,
                },
                out: VecDeque::new(),
                out_bytes: 0,
                tagged: false,
                tx: TagStream::new([0; 32]),
                rx: None,
                writable: false,
                accepted: self.now,
                last_read: self.now,
                last_write: self.now,
            },
        );
        self.unauthenticated += 1;
        self.unauthenticated_order.push_back(id);
        self.send_control(
            id,
            FrameHeader::new(FrameKind::Challenge, nonce.len()),
            nonce.to_vec(),
        );
    }

    /// Close connections past their deadline or whose refusal was delivered, end idle jobs,
    /// and give back the memory of tables that shrank.
    fn sweep(&mut self) {
        let now = self.now;
        let limits = &self.config.limits;
        let mut refused = Vec::new();
        let mut expired = Vec::new();
        for (&id, c) in &self.conns {
            if let State::Closing { since } = c.state {
                if c.out.is_empty() || now.saturating_duration_since(since) > REFUSAL_FLUSH {
                    refused.push(id);
                }
                continue;
            }
            if let Some((at, why)) = limits::connection_deadline(&c.activity(), limits) {
                if now >= at {
                    expired.push((id, why));
                }
            }
        }
        let idle_jobs: Vec<[u8; 16]> = self
            .jobs
            .iter()
            .filter(|(_, j)| limits::job_expired(j.last_data, now, limits))
            .map(|(k, _)| *k)
            .collect();
        for id in refused {
            self.close(id, "refused", false);
        }
        for (id, why) in expired {
            self.close_rejected(id, why);
        }
        for job in idle_jobs {
            self.end_job(&job, "no data within the idle timeout");
        }
        if self.conns.capacity() > 64 && self.conns.len() < self.conns.capacity() / 4 {
            self.conns.shrink_to_fit();
        }
        if self.unauthenticated_order.len() > 2 * self.unauthenticated + 64 {
            let conns = &self.conns;
            self.unauthenticated_order.retain(|id| {
                conns
                    .get(id)
                    .is_some_and(|c| !matches!(c.state, State::Ready { .. }))
            });
            self.unauthenticated_order.shrink_to_fit();
        }
    }

    /// Close every connection of `job` (which ends it and releases its reservation).
    fn end_job(&mut self, job: &[u8; 16], reason: &'static str) {
        let Some(j) = self.jobs.get(job) else {
            return;
        };
        log::info!(
            "job {}: closing its {} connections: {reason}",
            crate::config::to_hex(&job[..4]),
            j.members.iter().map(Vec::len).sum::<usize>()
        );
        let ids: Vec<usize> = j.members.iter().flatten().copied().collect();
        for id in ids {
            self.close(id, reason, false);
        }
    }

    /// Close connection `id` for `reason`, logged through the rejection rate limit.
    fn close_rejected(&mut self, id: usize, reason: &'static str) {
        self.close(id, reason, true);
    }

    /// Remove connection `id`; `warn` logs the reason as a warning.
    fn close(&mut self, id: usize, reason: &str, warn: bool) {
        let Some(mut c) = self.conns.remove(&id) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.stream);
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
        // A connection that never sent a byte (a port probe, a health check) is no news.
        let probe = matches!(c.state, State::AwaitHello { .. })
            && c.last_read == c.accepted
            && matches!(c.read, ReadState::Header { got: 0, .. });
        if warn && !probe && self.rejects.record(self.now, reject_class(reason)) {
            log::warn!("closed connection from {}: {reason}", c.peer);
        } else {
            log::debug!("closed connection from {}: {reason}", c.peer);
        }
        if !matches!(c.state, State::Ready { .. }) {
            self.unauthenticated -= 1;
        }
        if let State::Ready { job, rank } = c.state {
            let Some(j) = self.jobs.get_mut(&job) else {
                return;
            };
            j.members[rank].retain(|&m| m != id);
            if j.members.iter().all(|m| m.is_empty()) {
                let j = self.jobs.remove(&job).expect("job");
                self.reserved -= j.budget;
                log::info!(
                    "job {} ended ({} peers, {:.1} MB in, peak {:.1} MB held)",
                    crate::config::to_hex(&job[..4]),
                    j.hello.world,
                    j.bytes_in as f64 / 1e6,
                    j.sums.peak as f64 / 1e6
                );
            }
        }
    }

    fn send_control(&mut self, id: usize, header: FrameHeader, payload: Vec<u8>) {
        self.enqueue(id, header, Payload::Owned(payload), None);
    }

    fn enqueue(
        &mut self,
        id: usize,
        header: FrameHeader,
        payload: Payload,
        fanout: Option<Rc<Fanout>>,
    ) {
        self.enqueue_digest(id, header, payload, fanout, None);
    }

    /// As [`Self::enqueue`], with the payload's blake3 digest when it is already known (one
    /// payload fanned out to several peers is hashed once for all their tags).
    fn enqueue_digest(
        &mut self,
        id: usize,
        header: FrameHeader,
        payload: Payload,
        fanout: Option<Rc<Fanout>>,
        digest: Option<[u8; 32]>,
    ) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let frame = match digest {
            Some(d) => FrameOut::with_digest(&header, c.tagged, d),
            None => FrameOut::new(&header, c.tagged),
        };
        if c.out.is_empty() {
            // A backlog's deadline counts from when it began.
            c.last_write = self.now;
        }
        c.out_bytes += frame.total(payload.bytes().len());
        c.out.push_back(OutFrame {
            frame,
            payload,
            fanout,
        });
        self.flush(id);
    }

    /// Write queued frames until the socket is full.
    fn flush(&mut self, id: usize) {
        let mut acks = Vec::new();
        let mut spent = Vec::new();
        let result: std::io::Result<()> = {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            loop {
                let Some(f) = c.out.front_mut() else {
                    break Ok(());
                };
                let payload = f.payload.bytes();
                let total = f.frame.total(payload.len());
                let max = match self.pacer.as_mut() {
                    None => usize::MAX,
                    Some(p) => {
                        let left = total - f.frame.written;
                        match p.available(self.now, left) {
                            0 => {
                                let at =
                                    p.ready_at(self.now, left.min(crate::pace::MIN_BURST as usize));
                                self.pace_wake = Some(self.pace_wake.map_or(at, |w| w.min(at)));
                                if !self.pace_waiting.contains(&id) {
                                    self.pace_waiting.push(id);
                                }
                                break Ok(());
                            }
                            n => n,
                        }
                    }
                };
                match f.frame.write_at_most(&c.stream, payload, &mut c.tx, max) {
                    Ok(n) => {
                        if let Some(p) = self.pacer.as_mut() {
                            p.consume(n);
                        }
                        c.out_bytes -= n;
                        c.last_write = self.now;
                        self.stats.bytes_out += n as u64;
                        if f.frame.written == total {
                            let f = c.out.pop_front().expect("front frame");
                            if let Payload::Shared(p) = f.payload {
                                // The last copy written: the buffer can take another frame.
                                spent.extend(Rc::into_inner(p));
                            }
                            if let Some(fan) = f.fanout {
                                fan.remaining.set(fan.remaining.get() - 1);
                                if fan.remaining.get() == 0 {
                                    acks.push((fan.root_conn, fan.ack));
                                }
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(()),
                    Err(e) => break Err(e),
                }
            }
        };
        if let Some(c) = self.conns.get_mut(&id) {
            let queued = !c.out.is_empty();
            if let Err(e) = conn::watch_writable(
                self.poll.registry(),
                &mut c.stream,
                Token(id),
                queued,
                &mut c.writable,
            ) {
                log::warn!("cannot watch connection from {} for writing: {e}", c.peer);
            }
        }
        if !spent.is_empty() {
            if let Some(State::Ready { job, .. }) = self.conns.get(&id).map(|c| &c.state) {
                if let Some(j) = self.jobs.get_mut(job) {
                    for s in spent {
                        j.sums.pool.give(s);
                    }
                }
            }
        }
        for (root, ack) in acks {
            self.enqueue(root, ack, Payload::None, None);
        }
        if let Err(e) = result {
            self.close(id, &format!("send failed: {e}"), true);
        }
    }

    /// Read and handle frames from connection `id` until it would block.
    fn read_conn(&mut self, id: usize) {
        loop {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            if matches!(c.state, State::Closing { .. }) {
                // Refused: discard whatever it sends until the reason is flushed.
                let mut sink = [0u8; 4096];
                match c.stream.read(&mut sink) {
                    Ok(n) if n > 0 => continue,
                    _ => return,
                }
            }
            let mid = match &c.read {
                ReadState::Header { got, .. } => *got > 0,
                ReadState::Payload { .. } => true,
            };
            // Ok(true): the header, or the whole frame with its tag, is in.
            let step: std::io::Result<bool> = match &mut c.read {
                ReadState::Header { buf, got } => {
                    match conn::recv(&mut c.stream, &mut [IoSliceMut::new(&mut buf[*got..])]) {
                        Ok(0) => Err(std::io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => {
                            *got += n;
                            c.last_read = self.now;
                            self.stats.bytes_in += n as u64;
                            Ok(*got == HEADER_LEN)
                        }
                        Err(e) => Err(e),
                    }
                }
                ReadState::Payload { frame, buf } if !frame.is_whole() => {
                    let at = frame.got;
                    match frame.read(&mut c.stream, &mut buf.as_mut_slice()[at..]) {
                        Ok(n) => {
                            c.last_read = self.now;
                            self.stats.bytes_in += n as u64;
                            Ok(frame.is_whole())
                        }
                        Err(e) => Err(e),
                    }
                }
                ReadState::Payload { .. } => Ok(true),
            };
            match step {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    let reason = if mid {
                        "connection closed in the middle of a frame"
                    } else {
                        "connection closed by the peer"
                    };
                    self.close(id, reason, mid);
                    return;
                }
                Err(e) => {
                    self.close(id, &format!("receive failed: {e}"), true);
                    return;
                }
            }
            let state = std::mem::replace(
                &mut c.read,
                ReadState::Header {
                    buf: [0; HEADER_LEN],
                    got: 0,
                },
            );
            let res = match state {
                ReadState::Header { buf, .. } => self.on_header(id, &buf),
                ReadState::Payload { frame, .. } if !frame.verify() => {
                    let h = frame.header;
                    Err(Error::remote(format!(
                        "a {:?} frame (op seq {}, offset {}, {} bytes) failed its integrity \
                         check: corrupted or forged in transit",
                        h.kind(),
                        h.seq,
                        h.offset,
                        h.len
                    )))
                }
                ReadState::Payload { frame, buf } => {
                    let digest = frame.payload_digest();
                    self.on_frame(id, frame.header, buf, digest)
                }
            };
            if let Err(e) = res {
                self.close(id, &e.message, true);
                return;
            }
        }
    }

    /// A header arrived: check it and size its payload, or handle an empty frame.
    fn on_header(&mut self, id: usize, raw: &[u8; HEADER_LEN]) -> Result<()> {
        let h = FrameHeader::decode(raw)?;
        let c = self.conns.get_mut(&id).expect("connection");
        let mut data_of = None;
        let limit = match (&c.state, h.kind()) {
            (State::AwaitHello { .. }, FrameKind::Hello) => MAX_HELLO_BYTES,
            (State::AwaitHello { .. }, k) => {
                return Err(Error::remote(format!("expected a Hello frame, got {k:?}")))
            }
            (State::Ready { job, rank }, FrameKind::Data) => {
                let j = &self.jobs[job];
                check_data_header(&h, *rank, j.hello.world, j.hello.chunk_bytes)?;
                data_of = Some(*job);
                h.len as usize
            }
            (State::Ready { .. }, FrameKind::OpError | FrameKind::Goodbye) => MAX_CONTROL_PAYLOAD,
            (_, k) => return Err(Error::remote(format!("unexpected {k:?} frame"))),
        };
        if h.len as usize > limit {
            return Err(Error::remote(format!(
                "{:?} frame of {} bytes exceeds the limit of {limit} bytes",
                h.kind(),
                h.len
            )));
        }
        // Data payloads are received whole into the buffer, so a reused one needs no zeroing.
        let buf = match data_of.and_then(|job| self.jobs.get_mut(&job)) {
            Some(j) => j.sums.pool.take(h.len as usize)?,
            None => Scratch::zeroed(h.len as usize)?,
        };
        // Even an empty frame has its tag to read before it is acted on.
        let c = self.conns.get_mut(&id).expect("connection");
        c.read = ReadState::Payload {
            frame: Box::new(FrameIn::new(h, raw, c.rx.as_mut())),
            buf,
        };
        Ok(())
    }

    /// A whole frame; `digest`: its payload's blake3 digest when the tag check computed it.
    fn on_frame(
        &mut self,
        id: usize,
        h: FrameHeader,
        payload: Scratch,
        digest: Option<[u8; 32]>,
    ) -> Result<()> {
        let c = self.conns.get_mut(&id).expect("connection");
        match c.state {
            State::AwaitHello { nonce, .. } => self.on_hello(id, nonce, payload.as_slice()),
            State::Ready { job, rank } => match h.kind() {
                FrameKind::OpError => {
                    if let Some(j) = self.jobs.get_mut(&job) {
                        j.sums.drop_seq(h.seq);
                    }
                    Ok(())
                }
                FrameKind::Goodbye => {
                    self.close(id, "peer said goodbye", false);
                    Ok(())
                }
                _ => self.on_data(job, rank, id, h, payload, digest),
            },
            State::Closing { .. } => Ok(()),
        }
    }

    fn refuse(&mut self, id: usize, kind: ErrorKind, reason: &str) {
        let c = self.conns.get_mut(&id).expect("connection");
        if self.rejects.record(self.now, "refused") {
            log::warn!("rejected connection from {}: {reason}", c.peer);
        } else {
            log::debug!("rejected connection from {}: {reason}", c.peer);
        }
        c.state = State::Closing { since: self.now };
        let mut h = FrameHeader::new(FrameKind::Reject, reason.len());
        h.aux = kind as u32;
        self.send_control(id, h, reason.as_bytes().to_vec());
    }

    /// A member of a granted job asks for the relay's signed receipt of one op (see
    /// [`crate::relay::receipts`]): answer with a Welcome carrying it, then close.
    fn answer_receipt(
        &mut self,
        id: usize,
        hello: &Hello<'_>,
        challenge: &[u8; 32],
        req: Result<crate::relay::receipts::ReceiptRequest>,
    ) {
        let (job, seq, positions) = match req {
            Ok(r) => (r.job, r.seq, r.positions),
            Err(e) => return self.refuse(id, e.kind, &e.message),
        };
        let Some(g) = self.config.grants.clone() else {
            return self.refuse(id, ErrorKind::Auth, "this relay keeps no receipts");
        };
        if !g.key(&job).is_some_and(|k| hello.verify(&k, challenge)) {
            return self.refuse(id, ErrorKind::Auth, "authentication failed: unknown job");
        }
        let Some(p) = g.signed_receipt(&job, seq, &positions) else {
            return self.refuse(id, ErrorKind::Auth, "this relay keeps no receipts");
        };
        let c = self.conns.get_mut(&id).expect("connection");
        c.state = State::Closing {
            since: Instant::now(),
        };
        self.send_control(id, FrameHeader::new(FrameKind::Welcome, p.len()), p);
    }

    /// Someone (the validator) asks the relay to prove its key at this address: answer with a
    /// Welcome carrying the public key and signature, then close.
    fn prove_address(&mut self, id: usize, asker: &[u8; 32], challenge: &[u8; 32]) {
        let proof = self
            .config
            .grants
            .as_ref()
            .and_then(|g| g.prove(asker, challenge));
        let Some(p) = proof else {
            self.refuse(id, ErrorKind::Auth, "this relay has no identity to prove");
            return;
        };
        let c = self.conns.get_mut(&id).expect("connection");
        log::debug!("proved the relay's key to {}", c.peer);
        c.state = State::Closing {
            since: Instant::now(),
        };
        self.send_control(id, FrameHeader::new(FrameKind::Welcome, p.len()), p);
    }

    fn on_hello(&mut self, id: usize, nonce: [u8; 32], payload: &[u8]) -> Result<()> {
        let hello = Hello::decode(payload)?;
        if let Some(req) = crate::relay::receipts::parse_request(hello.body) {
            self.answer_receipt(id, &hello, &nonce, req);
            return Ok(());
        }
        if let Some(asker) = crate::relay::registration::proof_request(hello.body) {
            self.prove_address(id, &asker, &nonce);
            return Ok(());
        }
        // A job granted by the validator has its own token; others use the static one.
        let granted = JobHello::decode(hello.body).ok().and_then(|jh| {
            let g = self.config.grants.as_ref()?;
            g.key(&jh.job)
        });
        let key = match granted {
            Some(k) => k,
            None if !self.config.token.is_empty() => self.key,
            None => {
                self.refuse(id, ErrorKind::Auth, "authentication failed: unknown job");
                return Ok(());
            }
        };
        if !hello.verify(&key, &nonce) {
            self.refuse(
                id,
                ErrorKind::Auth,
                "authentication failed: wrong job token",
            );
            return Ok(());
        }
        let jh = match JobHello::decode(hello.body) {
            Ok(jh) => jh,
            Err(e) => {
                self.refuse(id, e.kind, &e.message);
                return Ok(());
            }
        };
        let tag = crate::config::to_hex(&jh.job[..4]);
        let known = self.jobs.get(&jh.job).map(|j| KnownJob {
            hello: &j.hello,
            rank_streams: j.members[jh.rank].len(),
        });
        let books = Reservations {
            reserved: self.reserved,
            max_memory: self.config.max_memory,
            max_job_memory: self.config.limits.max_job_memory,
        };
        match admission::decide(&jh, known, books) {
            Admission::Join => {}
            Admission::Refuse { kind, reason } => {
                self.refuse(id, kind, &reason);
                return Ok(());
            }
            Admission::NewJob { budget } => {
                self.reserved += budget;
                log::info!(
                    "job {tag}: new, {} peers, {} streams each, {}-byte chunks, window {}",
                    jh.world,
                    jh.streams,
                    jh.chunk_bytes,
                    jh.window
                );
                self.jobs.insert(
                    jh.job,
                    Job {
                        hello: jh.clone(),
                        members: vec![Vec::new(); jh.world],
                        sums: Sums::new(jh.world, budget / 4 * 3, budget),
                        budget,
                        bytes_in: 0,
                        last_data: self.now,
                    },
                );
            }
        }
        let j = self.jobs.get_mut(&jh.job).expect("job");
        j.members[jh.rank].push(id);
        let c = self.conns.get_mut(&id).expect("connection");
        log::debug!(
            "job {tag}: rank {} stream {} from {}",
            jh.rank,
            jh.stream,
            c.peer
        );
        c.state = State::Ready {
            job: jh.job,
            rank: jh.rank,
        };
        self.unauthenticated -= 1;
        let p = wire::welcome_mac(&key, &nonce, &hello.nonce, &[]).to_vec();
        self.send_control(id, FrameHeader::new(FrameKind::Welcome, p.len()), p);
        // Every later frame, both ways, carries a tag under this connection's keys.
        let keys = SessionKeys::derive(&key, &nonce, &hello.nonce, true);
        if let Some(c) = self.conns.get_mut(&id) {
            c.tagged = true;
            c.tx = TagStream::new(keys.send);
            c.rx = Some(TagStream::new(keys.recv));
        }
        Ok(())
    }

    /// The least-loaded connection of `rank` in `job`.
    fn stream_of(&self, job: &Job, rank: usize) -> Option<usize> {
        job.members[rank]
            .iter()
            .copied()
            .min_by_key(|id| self.conns.get(id).map_or(usize::MAX, |c| c.out_bytes))
    }

    fn on_data(
        &mut self,
        job: [u8; 16],
        rank: usize,
        id: usize,
        h: FrameHeader,
        payload: Scratch,
        digest: Option<[u8; 32]>,
    ) -> Result<()> {
        let Some(j) = self.jobs.get_mut(&job) else {
            return Err(Error::internal("connection of a job that ended"));
        };
        j.bytes_in += payload.len() as u64;
        j.last_data = self.now;
        if !self.test_faults.delay.is_zero() {
            std::thread::sleep(self.test_faults.delay);
        }
        let f = check_data_header(&h, rank, j.hello.world, j.hello.chunk_bytes)?;
        let world = j.hello.world;
        if !matches!(f.coll, Collective::Broadcast) {
            if let Some(g) = self.config.grants.as_ref().filter(|g| g.keeps_receipts()) {
                // The tag check hashed the payload as it arrived: the receipt reuses it.
                let d = digest.unwrap_or_else(|| *blake3::hash(payload.as_slice()).as_bytes());
                g.note(&job, h.seq, Kind::Input, rank, h.offset, payload.len(), d);
            }
        }
        match f.coll {
            Collective::Broadcast => {
                let targets: Vec<usize> = (0..world)
                    .filter(|&r| r != rank)
                    .filter_map(|r| self.stream_of(&self.jobs[&job], r))
                    .collect();
                let ack = FrameHeader { len: 0, ..h };
                if targets.is_empty() {
                    self.enqueue(id, ack, Payload::None, None);
                    return Ok(());
                }
                let fan = Rc::new(Fanout {
                    remaining: Cell::new(targets.len()),
                    root_conn: id,
                    ack,
                });
                // Forwarded unchanged: the digest its tag check computed serves every copy.
                let d = digest.unwrap_or_else(|| *blake3::hash(payload.as_slice()).as_bytes());
                let shared = Rc::new(payload);
                for t in targets {
                    let p = Payload::Shared(shared.clone());
                    self.enqueue_digest(t, h, p, Some(fan.clone()), Some(d));
                }
                Ok(())
            }
            _ => match j.sums.contribute(rank, &h, f, payload) {
                Ok(None) => Ok(()),
                Ok(Some((rh, result))) => {
                    let elem = f.dtype.size();
                    let result = if self.test_faults.hit(self.test_faults.corrupt) {
                        TestFaults::perturbed(&result, elem)?
                    } else {
                        result
                    };
                    let shared = Rc::new(result);
                    let others = if self.test_faults.hit(self.test_faults.equivocate) {
                        Rc::new(TestFaults::perturbed(&shared, elem)?)
                    } else {
                        shared.clone()
                    };
                    let targets: Vec<(usize, usize)> = (0..world)
                        .filter_map(|r| self.stream_of(&self.jobs[&job], r).map(|t| (r, t)))
                        .collect();
                    // One hash of the result serves every peer's tag and the receipts.
                    let first = *blake3::hash(shared.as_slice()).as_bytes();
                    let rest = if Rc::ptr_eq(&shared, &others) {
                        first
                    } else {
                        *blake3::hash(others.as_slice()).as_bytes()
                    };
                    if let Some(g) = self.config.grants.as_ref().filter(|g| g.keeps_receipts()) {
                        // What each rank is sent, as sent.
                        for &(r, _) in &targets {
                            let d = if r == 0 { first } else { rest };
                            g.note(&job, rh.seq, Kind::Result, r, rh.offset, shared.len(), d);
                        }
                    }
                    for (r, t) in targets {
                        let (p, d) = if r == 0 {
                            (&shared, first)
                        } else {
                            (&others, rest)
                        };
                        self.enqueue_digest(t, rh, Payload::Shared(p.clone()), None, Some(d));
                    }
                    Ok(())
                }
                Err(Fault::Conn(e)) => Err(e),
                Err(Fault::Op(seq, e)) => {
                    log::warn!(
                        "job {}: op seq {seq} failed: {}",
                        crate::config::to_hex(&job[..4]),
                        e.message
                    );
                    let targets: Vec<usize> = (0..world)
                        .filter_map(|r| self.stream_of(&self.jobs[&job], r))
                        .collect();
                    let msg = format!("relay: {}", e.message);
                    for t in targets {
                        self.send_control(
                            t,
                            FrameHeader::op_error(seq, e.kind, msg.len()),
                            msg.clone().into_bytes(),
                        );
                    }
                    Ok(())
                }
            },
        }
    }
}

/// The class a close reason is counted under in the rejection summary.
fn reject_class(reason: &str) -> &'static str {
    const CLASSES: [&str; 8] = [
        "no authentication within the handshake timeout",
        "stalled in the middle of a frame",
        "not reading the frames sent to it",
        "evicted: too many unauthenticated connections",
        "evicted: out of file descriptors",
        "connection closed in the middle of a frame",
        "send failed",
        "receive failed",
    ];
    CLASSES
        .iter()
        .find(|c| reason.starts_with(*c))
        .copied()
        .unwrap_or("malformed or unexpected frames")
}

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
//!
//! The loop is split by what each part decides:
//! * this file: the loop itself, accepting, the sweep of deadlines and closing connections;
//! * [`connection`]: one connection's state, and the bytes it reads and writes;
//! * [`protocol`]: what an arriving frame means (handshake, job membership, data, receipts);
//! * the decisions themselves are pure functions of what arrived and the time:
//!   [`crate::relay::admission`] (who joins which job) and [`crate::relay::limits`]
//!   (caps and deadlines); test faults live in [`crate::relay::faults`].
//!
//! [`MAX_HELLO_BYTES`]: crate::relay::limits::MAX_HELLO_BYTES

mod connection;
mod protocol;

use crate::error::{Error, Result};
use crate::relay::faults::TestFaults;
use crate::relay::limits::{self, Limits, RejectLog, Verdict};
use crate::relay::sums::Sums;
use crate::relay::JobHello;
use crate::wire::{self, FrameHeader, FrameKind};
use connection::{Conn, ReadState, State};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const FIRST_CONN: usize = 2;
/// How soon to try `accept` again after it failed for want of descriptors or memory.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

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
    /// SIGINT and SIGTERM, when the relay stops on them.
    signals: Option<Signals>,
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
    pacer: crate::pace::Pacer,
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
        let signals = if signals {
            let mut s = Signals::new([SIGINT, SIGTERM])
                .map_err(|e| Error::io("installing the SIGINT/SIGTERM handlers", e))?;
            poll.registry()
                .register(&mut s, SIGNALS, Interest::READABLE)
                .map_err(|e| Error::io("registering the signal pipe", e))?;
            Some(s)
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
            signals,
            stop: false,
            test_faults: TestFaults::from_env(),
            now,
            unauthenticated: 0,
            unauthenticated_order: VecDeque::new(),
            spare_fd: File::open("/dev/null").ok(),
            accept_retry: None,
            rejects,
            pacer: crate::pace::Pacer::new(max_rate, now),
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
            for id in self.pacer.due(self.now) {
                self.flush(id);
            }
            if self.accept_retry.is_some_and(|t| self.now >= t) {
                self.accept_retry = None;
                self.accept();
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    SIGNALS => {
                        // Drain the pipe; only SIGINT and SIGTERM are routed here.
                        if let Some(s) = self.signals.as_mut() {
                            s.pending().for_each(drop);
                        }
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
        if let Some(mut s) = self.signals.take() {
            let _ = self.poll.registry().deregister(&mut s);
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
        if let Some(t) = self.pacer.poll_timeout() {
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
        if limits::evicts_oldest(self.unauthenticated, &self.config.limits) {
            self.evict_oldest_unauthenticated("evicted: too many unauthenticated connections");
        }
        let _ = crate::net::conn::tune(&stream);
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
            Conn::new(stream, peer, State::AwaitHello { nonce }, self.now),
        );
        self.unauthenticated += 1;
        self.unauthenticated_order.push_back(id);
        self.send_control(id, FrameHeader::challenge(nonce.len()), nonce.to_vec());
    }

    /// Close connections past their deadline or whose refusal was delivered, end idle jobs,
    /// and give back the memory of tables that shrank.
    fn sweep(&mut self) {
        let now = self.now;
        let limits = &self.config.limits;
        let mut refused = Vec::new();
        let mut expired = Vec::new();
        for (&id, c) in &self.conns {
            let refused_at = match c.state {
                State::Closing { since } => Some(since),
                _ => None,
            };
            match limits::verdict(&c.activity(), refused_at, limits, now) {
                Verdict::Keep => {}
                Verdict::Refused => refused.push(id),
                Verdict::Expired(why) => expired.push((id, why)),
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

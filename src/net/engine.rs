//! The progress engine: one mio event-loop thread per communicator.
//!
//! The loop owns every socket. Callers hand it ops over a crossbeam channel and wake it with a
//! `mio::Waker`; it runs ops strictly one after another (so frames of consecutive ops never
//! interleave on a connection), moving bytes between sockets and the current op's schedule.
//!
//! Rules it keeps (see mio's "draining readiness"): reads and writes go until `WouldBlock`;
//! spurious wake-ups are normal; writes are tried inline first and resumed on `WRITABLE`.
//! Frames for an op that has not started here yet stay in the socket (the connection is
//! "parked"), so a fast rank is held back by TCP flow control instead of our memory.
//! Every wait is bounded: an op that makes no progress for `MR_TIMEOUT_MS` fails.
//!
//! Losing a relay is not fatal: the loop closes every stream to it, keeps it out of later ops
//! and lets the current schedule route around it ([`Schedule::handle_endpoint_lost`]). A relay
//! counts as lost when a stream to it breaks or it says goodbye, when the schedule stops using
//! it (another rank reported it lost), or when it stalls: the op waits on it but nothing
//! arrived from it for [`relay_stall`] while some other relay is not stalled (answering, or
//! owed nothing). When every relay waited on is silent the cause may as well be a slow peer,
//! so none is dropped and the op-level timeout applies.
//!
//! Relay throughput. During an op the loop counts the bytes that arrive from each relay and
//! when the last of them came; when the op succeeds it folds each relay's rate (bytes over
//! the time from the op's start to that relay's last byte) into [`RelayRates`], smoothed over
//! ops. The communicator turns those rates into segment weights (see [`crate::comm`]).

use crate::algo::p2p::PairRange;
use crate::algo::{Endpoint, OpDesc, Schedule, Transmit};
use crate::buffer::{OpMemory, Region};
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::net::bootstrap::Mesh;
use crate::net::conn::{self, FrameIn, FrameOut};
use crate::net::shm::{self, Segment};
use crate::wire::{FrameHeader, FrameKind, SessionKeys, TagStream, HEADER_LEN, TAG_LEN};
use crossbeam_channel::{Receiver, Sender};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const WAKER: Token = Token(usize::MAX);
/// Longest silence of a relay the op waits on before it is dropped as stalled.
const RELAY_STALL: Duration = Duration::from_secs(5);

/// How long a relay may stay silent while an op waits on it: [`RELAY_STALL`], or half of
/// `MR_TIMEOUT_MS` when that is shorter, so a stalled relay is dropped before the op times out.
pub fn relay_stall(timeout: Duration) -> Duration {
    RELAY_STALL.min(timeout / 2)
}

/// Measured throughput of each relay (indexed as in [`Endpoint::Relay`]) in bytes per second,
/// smoothed over the ops that received from it; 0 until measured. Written by the progress
/// thread after each op, read by the communicator.
pub type RelayRates = Arc<Mutex<Vec<u64>>>;

/// What the progress thread last saw of each relay's link (indexed as [`Endpoint::Relay`]),
/// for sizing relay windows: the last op's throughput sample and the kernel's minimum
/// round-trip time over that relay's TCP streams.
#[derive(Clone, Copy, Debug, Default)]
pub struct RelayLink {
    /// Bytes per second that arrived from the relay during the last op that used it.
    pub rate: u64,
    /// Smallest round trip the kernel measured on any stream to the relay (`TCP_INFO`
    /// `tcpi_min_rtt`), in microseconds; 0 when unknown.
    pub min_rtt_us: u32,
}

/// Shared view of [`RelayLink`]s: written by the progress thread, read by the communicator.
pub type RelayLinks = Arc<Mutex<Vec<RelayLink>>>;

/// Where an op's result is delivered; callers block on it or poll it.
#[derive(Default)]
pub struct Completion {
    result: Mutex<Option<Result<()>>>,
    cond: Condvar,
}

impl Completion {
    pub fn complete(&self, r: Result<()>) {
        let mut g = self.result.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(r);
            self.cond.notify_all();
        }
    }
    pub fn wait(&self) -> Result<()> {
        let mut g = self.result.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = self.cond.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
    pub fn try_get(&self) -> Option<Result<()>> {
        self.result
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// An op handed to the engine.
pub struct PendingOp {
    pub work: Work,
    pub mem: OpMemory,
    pub done: Arc<Completion>,
}

/// How the engine carries out an op.
pub enum Work {
    /// Frames over the connections, as the schedule directs.
    Schedule(Box<dyn Schedule>),
    /// Through the shared-memory segment ([`shm`]).
    SharedMemory(OpDesc),
}

impl PendingOp {
    pub fn desc(&self) -> &OpDesc {
        match &self.work {
            Work::Schedule(s) => s.desc(),
            Work::SharedMemory(d) => d,
        }
    }
}

/// An op the engine drives with frames.
struct NetOp {
    schedule: Box<dyn Schedule>,
    mem: OpMemory,
    done: Arc<Completion>,
}

enum Command {
    Op(PendingOp),
    Shm(Box<Segment>),
    Shutdown,
}

/// Handle to a communicator's progress thread.
pub struct Engine {
    tx: Sender<Command>,
    waker: Arc<Waker>,
    abort: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Take over `mesh` and start the progress thread, which records relay throughput in
    /// `rates`.
    pub fn start(
        mesh: Mesh,
        config: &Config,
        broken: Arc<AtomicBool>,
        rates: RelayRates,
        links: RelayLinks,
    ) -> Result<Engine> {
        let poll = Poll::new().map_err(|e| Error::io("cannot create event loop", e))?;
        let waker = Arc::new(
            Waker::new(poll.registry(), WAKER).map_err(|e| Error::io("cannot create waker", e))?,
        );
        let mut conns = Vec::with_capacity(mesh.conns.len());
        let mut by_endpoint: HashMap<Endpoint, Vec<usize>> = HashMap::new();
        if mesh.keys.len() != mesh.conns.len() {
            return Err(Error::internal("a connection without frame keys"));
        }
        for (i, ((ep, s), keys)) in mesh.conns.into_iter().zip(mesh.keys).enumerate() {
            conn::tune(&s).map_err(|e| Error::io(format!("configuring connection to {ep}"), e))?;
            s.set_nonblocking(true)
                .map_err(|e| Error::io("set_nonblocking", e))?;
            let mut stream = TcpStream::from_std(s);
            // WRITABLE is watched only while a connection has bytes queued.
            poll.registry()
                .register(&mut stream, Token(i), Interest::READABLE)
                .map_err(|e| Error::io("registering connection", e))?;
            by_endpoint.entry(ep).or_default().push(i);
            conns.push(Conn::new(ep, stream, keys));
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let abort = Arc::new(AtomicBool::new(false));
        let mut lp = Loop {
            rank: mesh.rank,
            poll,
            conns,
            by_endpoint,
            rx,
            abort: abort.clone(),
            broken,
            fatal: None,
            current: None,
            pending: VecDeque::new(),
            last_seq: 0,
            remote_failures: HashMap::new(),
            p2p_retired: HashMap::new(),
            p2p_failures: Vec::new(),
            timeout: config.timeout,
            dead_relays: BTreeSet::new(),
            relay_heard: HashMap::new(),
            relay_bytes: HashMap::new(),
            rates,
            links,
            shutting_down: false,
            scratch: vec![0u8; 64 << 10],
            pacer: config.max_rate.map(|rate| {
                crate::pace::TokenBucket::new(
                    rate,
                    crate::pace::TokenBucket::default_burst(rate),
                    Instant::now(),
                )
            }),
            pace_waiting: Vec::new(),
            pace_wake: None,
            shm: None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("mr-progress-{}", mesh.rank))
            .spawn(move || lp.run())
            .map_err(|e| Error::io("cannot start progress thread", e))?;
        Ok(Engine {
            tx,
            waker,
            abort,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Run later ops marked `shm` through `seg`; every rank attaches before the same op.
    pub fn attach_shm(&self, seg: Segment) -> Result<()> {
        self.tx.send(Command::Shm(Box::new(seg))).map_err(|_| {
            Error::aborted("communicator's progress thread has stopped (aborted or failed)")
        })?;
        let _ = self.waker.wake();
        Ok(())
    }

    pub fn submit(&self, op: PendingOp) -> Result<()> {
        self.tx.send(Command::Op(op)).map_err(|_| {
            Error::aborted("communicator's progress thread has stopped (aborted or failed)")
        })?;
        let _ = self.waker.wake();
        Ok(())
    }

    /// Fail everything with `Aborted` and close all connections. Any thread.
    pub fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }

    /// Finish queued ops, say goodbye and stop the thread.
    pub fn shutdown(&self) -> Result<()> {
        let _ = self.tx.send(Command::Shutdown);
        let _ = self.waker.wake();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            h.join()
                .map_err(|_| Error::internal("progress thread panicked"))?;
        }
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Whether rank `r` has gone away: every connection to it is closed here, or its end hung up
/// (a process that exits or dies has its sockets closed by the kernel).
fn rank_gone(conns: &[Conn], by_endpoint: &HashMap<Endpoint, Vec<usize>>, r: usize) -> bool {
    use std::os::unix::io::AsRawFd;
    let Some(ids) = by_endpoint.get(&Endpoint::Rank(r)) else {
        return false;
    };
    ids.iter().any(|&i| {
        let c = &conns[i];
        if c.closed {
            return true;
        }
        let mut fd = libc::pollfd {
            fd: c.stream.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout; poll only writes `revents`.
        let n = unsafe { libc::poll(&mut fd, 1, 0) };
        n > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    })
}

/// The kernel's minimum round-trip time on `stream` in microseconds (`TCP_INFO`).
fn tcp_min_rtt_us(stream: &TcpStream) -> Option<u32> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: tcp_info is plain old data, so all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd, and `info`/`len` describe a writable buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // Kernels older than the field leave it out (short `len`) or report 0.
    let have = std::mem::offset_of!(libc::tcp_info, tcpi_min_rtt) + 4 <= len as usize;
    (rc == 0 && have && info.tcpi_min_rtt > 0).then_some(info.tcpi_min_rtt)
}

/// Bytes a tagged frame with `payload` bytes puts on the wire.
fn wire_len(payload: usize) -> usize {
    HEADER_LEN + payload + TAG_LEN
}

/// A frame queued on a connection.
struct OutFrame {
    frame: FrameOut,
    /// Data frames: the transmit (payload read from the current op's memory).
    transmit: Option<Transmit>,
    /// Control frames, or the unsent rest of a data frame whose op ended mid-write.
    owned: Vec<u8>,
}

impl OutFrame {
    fn total(&self) -> usize {
        self.frame.total(
            self.transmit
                .as_ref()
                .map_or(self.owned.len(), |t| t.region.len()),
        )
    }
}

/// Where a payload being read goes.
#[derive(Clone, Debug)]
enum Sink {
    /// The connection's buffer, then `Schedule::handle_frame` (or an error report).
    Buffer,
    /// Straight into the current op's memory (zero-copy), then `handle_frame_in_place`.
    Direct(Region),
    /// Nowhere: a stale frame of an op that ended here.
    Discard,
}

/// Read state of a connection.
enum ReadState {
    Header {
        buf: [u8; HEADER_LEN],
        got: usize,
    },
    /// A header for an op that has not started here: wait before reading the payload.
    Parked(FrameIn),
    /// Payload and tag: the frame is acted on only once its tag checked.
    Payload {
        frame: FrameIn,
        sink: Sink,
    },
}

struct Conn {
    endpoint: Endpoint,
    stream: TcpStream,
    read: ReadState,
    /// Payload of the frame being read, 8-byte aligned for the kernels.
    payload: Vec<u64>,
    queue: VecDeque<OutFrame>,
    queued_bytes: usize,
    /// The peer said goodbye: it destroyed its communicator on purpose.
    goodbye: bool,
    closed: bool,
    /// Tags of the frames this side sends and checks of those it receives.
    tx: TagStream,
    rx: TagStream,
    /// Whether WRITABLE is registered (only while `queue` is not empty).
    writable: bool,
}

impl Conn {
    fn new(endpoint: Endpoint, stream: TcpStream, keys: SessionKeys) -> Conn {
        Conn {
            tx: TagStream::new(keys.send),
            rx: TagStream::new(keys.recv),
            writable: false,
            endpoint,
            stream,
            read: ReadState::Header {
                buf: [0; HEADER_LEN],
                got: 0,
            },
            payload: Vec::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            goodbye: false,
            closed: false,
        }
    }

    fn payload_bytes(&mut self, len: usize) -> &mut [u8] {
        payload_view(&mut self.payload, len)
    }
}

struct Active {
    op: NetOp,
    started: Instant,
    last_progress: Instant,
}

struct Loop {
    rank: usize,
    poll: Poll,
    conns: Vec<Conn>,
    by_endpoint: HashMap<Endpoint, Vec<usize>>,
    rx: Receiver<Command>,
    abort: Arc<AtomicBool>,
    broken: Arc<AtomicBool>,
    /// Set once the communicator is unusable; every later op fails with it.
    fatal: Option<Error>,
    current: Option<Active>,
    pending: VecDeque<PendingOp>,
    /// Sequence number of the last op that ended here.
    last_seq: u64,
    /// Ops that peers reported failed before they started here.
    remote_failures: HashMap<u64, Error>,
    /// Per peer and direction (sends to it: true), the pair sequence after the last
    /// point-to-point message of an op that has ended here. Frames of earlier messages from a
    /// peer (the rest of a message whose op failed) are read and dropped instead of parking
    /// the connection for good.
    p2p_retired: HashMap<(usize, bool), u64>,
    /// Point-to-point messages a peer reported failed before the op holding them started
    /// here, in this rank's terms: that op fails when it starts.
    p2p_failures: Vec<(PairRange, Error)>,
    timeout: Duration,
    /// Relays lost on this rank: later ops start without them.
    dead_relays: BTreeSet<usize>,
    /// When bytes last arrived from each relay during the current op.
    relay_heard: HashMap<usize, Instant>,
    /// Bytes (headers and payloads) that arrived from each relay during the current op.
    relay_bytes: HashMap<usize, u64>,
    rates: RelayRates,
    links: RelayLinks,
    shutting_down: bool,
    /// Rate cap on everything this rank sends (`MR_MAX_RATE`), shared by all connections.
    pacer: Option<crate::pace::TokenBucket>,
    /// Connections with frames queued that wait for the cap, and when to try them again.
    pace_waiting: Vec<usize>,
    pace_wake: Option<Instant>,
    /// Sink for payloads of frames we discard.
    scratch: Vec<u8>,
    /// Shared-memory segment, when every rank runs on this host.
    shm: Option<Box<Segment>>,
}

/// What reading a connection produced.
enum ReadEvent {
    /// Nothing more now.
    Idle,
    Closed(Error),
}

impl Loop {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            // Wake at least every quarter second during an op to look for stalled relays.
            let timeout = self.current.as_ref().map(|a| {
                ((a.last_progress + self.timeout).saturating_duration_since(Instant::now())
                    + Duration::from_millis(1))
                .min(Duration::from_millis(250))
            });
            // Connections held back by the rate cap are retried when it allows again.
            let timeout = match (timeout, self.pace_wake) {
                (t, Some(w)) => {
                    let until = w.saturating_duration_since(Instant::now());
                    Some(t.map_or(until, |t| t.min(until)))
                }
                (t, None) => t,
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                self.set_fatal(Error::io("event loop poll failed", e));
            }
            if self.abort.load(Ordering::SeqCst) {
                self.set_fatal(Error::aborted("communicator was aborted (mr_comm_abort)"));
                self.close_all();
                self.drain_commands();
                return;
            }
            self.drain_commands();
            if self.pace_wake.is_some_and(|w| w <= Instant::now()) {
                self.pace_wake = None;
                for i in std::mem::take(&mut self.pace_waiting) {
                    self.flush(i);
                }
            }
            for ev in events.iter() {
                let i = ev.token().0;
                if i == WAKER.0 || i >= self.conns.len() {
                    continue;
                }
                if ev.is_writable() || ev.is_error() {
                    self.flush(i);
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.read_conn(i);
                }
            }
            self.drive();
            self.check_timeout();
            // A relay dropped as stalled leaves the schedule with chunks to redo.
            self.drive();
            if self.shutting_down && self.current.is_none() && self.pending.is_empty() {
                self.say_goodbye();
                return;
            }
        }
    }

    fn drain_commands(&mut self) {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Command::Op(op) => {
                    if let Some(e) = &self.fatal {
                        op.done.complete(Err(e.clone()));
                    } else {
                        self.pending.push_back(op);
                    }
                }
                Command::Shm(seg) => self.shm = Some(seg),
                Command::Shutdown => self.shutting_down = true,
            }
        }
    }

    /// The communicator can no longer be used: fail everything with `err`.
    fn set_fatal(&mut self, err: Error) {
        if self.fatal.is_none() {
            log::warn!("rank {}: communicator failed: {err}", self.rank);
            self.fatal = Some(err.clone());
            self.broken.store(true, Ordering::SeqCst);
        }
        let err = self.fatal.clone().unwrap_or(err);
        if let Some(a) = self.current.take() {
            self.release(&a.op);
            a.op.done.complete(Err(err.clone()));
        }
        for op in self.pending.drain(..) {
            op.done.complete(Err(err.clone()));
        }
    }

    fn close_all(&mut self) {
        for c in &mut self.conns {
            if !c.closed {
                c.closed = true;
                let _ = self.poll.registry().deregister(&mut c.stream);
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Start ops and move their transmits onto connections until nothing more can happen now.
    fn drive(&mut self) {
        loop {
            if self.current.is_none() {
                if self.fatal.is_some() {
                    return;
                }
                let Some(op) = self.pending.pop_front() else {
                    return;
                };
                let seq = op.desc().seq;
                if let Some(err) = self.remote_failures.remove(&seq) {
                    self.last_seq = seq;
                    if let Work::Schedule(s) = &op.work {
                        self.retire_p2p(s.as_ref());
                    }
                    op.done.complete(Err(err));
                    continue;
                }
                if let Work::Schedule(s) = &op.work {
                    if let Some(err) = self.reported_p2p_failure(s.as_ref()) {
                        self.retire_p2p(s.as_ref());
                        op.done.complete(Err(err));
                        continue;
                    }
                }
                log::debug!("rank {}: starting {}", self.rank, op.desc());
                let PendingOp { work, mem, done } = op;
                let schedule = match work {
                    Work::Schedule(s) => s,
                    Work::SharedMemory(desc) => {
                        self.run_shm(&desc, mem, &done);
                        continue;
                    }
                };
                let now = Instant::now();
                self.current = Some(Active {
                    op: NetOp {
                        schedule,
                        mem,
                        done,
                    },
                    started: now,
                    last_progress: now,
                });
                self.relay_heard.clear();
                self.relay_bytes.clear();
                for ep in self.by_endpoint.keys() {
                    if let Endpoint::Relay(r) = *ep {
                        self.relay_heard.insert(r, now);
                    }
                }
                // Relays lost earlier: the schedule routes around them from the start.
                let dead: Vec<usize> = self.dead_relays.iter().copied().collect();
                for r in dead {
                    let a = self.current.as_mut().expect("current op");
                    let err = Error::remote(format!("relay {r} was lost in an earlier op"));
                    if let Err(e) =
                        a.op.schedule
                            .handle_endpoint_lost(&mut a.op.mem, Endpoint::Relay(r), err)
                    {
                        self.fail_current(e);
                        break;
                    }
                }
                if self.current.is_none() {
                    continue;
                }
                // Frames for this op may be waiting on parked connections.
                for i in 0..self.conns.len() {
                    if matches!(self.conns[i].read, ReadState::Parked(_)) {
                        self.read_conn(i);
                    }
                }
                if self.current.is_none() {
                    continue;
                }
            }
            // Hand out everything the schedule wants to send. Writing inline can complete
            // sends, which may let the schedule move on, so poll again until it is quiet.
            loop {
                let mut queued = Vec::new();
                let mut dropped = Vec::new();
                {
                    let Some(a) = self.current.as_mut() else {
                        break;
                    };
                    while let Some(ep) = a.op.schedule.poll_endpoint_dropped() {
                        dropped.push(ep);
                    }
                    while let Some(t) = a.op.schedule.poll_transmit(&mut a.op.mem) {
                        queued.push(t);
                    }
                }
                for ep in dropped {
                    if let Endpoint::Relay(r) = ep {
                        self.close_relay(r);
                    }
                }
                if queued.is_empty() {
                    break;
                }
                for t in queued {
                    // A relay lost while this batch was being queued: the schedule already
                    // routes its chunks elsewhere.
                    if let Endpoint::Relay(r) = t.to {
                        if self.dead_relays.contains(&r) {
                            continue;
                        }
                    }
                    if let Err(e) = self.enqueue(t) {
                        self.fail_current(e);
                        break;
                    }
                }
            }
            let Some(a) = self.current.as_ref() else {
                continue;
            };
            if a.op.schedule.is_complete() {
                let a = self.current.take().expect("current op");
                self.last_seq = a.op.schedule.desc().seq;
                self.retire_p2p(a.op.schedule.as_ref());
                self.fold_relay_rates(a.started);
                a.op.done.complete(Ok(()));
                continue;
            }
            return;
        }
    }

    /// Run `op` through the shared-memory segment, blocking this thread until it ends. Frames
    /// that arrive meanwhile wait in the sockets. A failure breaks the communicator: the
    /// segment's counters no longer agree between ranks.
    fn run_shm(&mut self, desc: &OpDesc, mut mem: OpMemory, done: &Completion) {
        let result = match self.shm.as_mut() {
            None => Err(Error::internal(format!(
                "{desc} was routed to shared memory, but no segment is attached"
            ))),
            Some(seg) => {
                let conns = &self.conns;
                let by_endpoint = &self.by_endpoint;
                let mut gone = |r: usize| rank_gone(conns, by_endpoint, r);
                let mut watch = shm::Watch {
                    abort: &self.abort,
                    timeout: self.timeout,
                    gone: &mut gone,
                };
                seg.run(desc, &mut mem, &mut watch)
            }
        };
        self.last_seq = desc.seq;
        match result {
            Ok(()) => done.complete(Ok(())),
            Err(e) => {
                log::warn!("rank {}: {desc} failed: {e}", self.rank);
                done.complete(Err(e.clone()));
                self.set_fatal(e);
            }
        }
    }

    /// Queue a data transmit on the least-loaded stream to its endpoint and try to write it.
    fn enqueue(&mut self, t: Transmit) -> Result<()> {
        let Some(streams) = self.by_endpoint.get(&t.to) else {
            return Err(Error::internal(format!("no connection to {}", t.to)));
        };
        let &i = streams
            .iter()
            .filter(|&&i| !self.conns[i].closed)
            .min_by_key(|&&i| self.conns[i].queued_bytes)
            .ok_or_else(|| {
                let left = streams.iter().any(|&i| self.conns[i].goodbye);
                Error::remote(if left {
                    format!("{} has left the job (destroyed its communicator)", t.to)
                } else {
                    format!("no open connection to {}", t.to)
                })
            })?;
        let c = &mut self.conns[i];
        c.queued_bytes += wire_len(t.region.len());
        c.queue.push_back(OutFrame {
            frame: FrameOut::new(&t.header, true),
            transmit: Some(t),
            owned: Vec::new(),
        });
        self.flush(i);
        Ok(())
    }

    fn enqueue_control(&mut self, i: usize, header: FrameHeader, payload: Vec<u8>) {
        let c = &mut self.conns[i];
        if c.closed {
            return;
        }
        c.queued_bytes += wire_len(payload.len());
        c.queue.push_back(OutFrame {
            frame: FrameOut::new(&header, true),
            transmit: None,
            owned: payload,
        });
        self.flush(i);
    }

    /// Write queued frames until the socket is full.
    fn flush(&mut self, i: usize) {
        let mut sent = Vec::new();
        let result = {
            let c = &mut self.conns[i];
            let mem = self.current.as_ref().map(|a| &a.op.mem);
            loop {
                if c.closed {
                    break Ok(());
                }
                let Some(f) = c.queue.front_mut() else {
                    break Ok(());
                };
                let total = f.total();
                let payload: &[u8] = match (&f.transmit, mem) {
                    (Some(t), Some(m)) => m.bytes(&t.region),
                    (Some(_), None) => {
                        break Err(Error::internal("data frame queued without an op"))
                    }
                    (None, _) => &f.owned,
                };
                let max = match self.pacer.as_mut() {
                    None => usize::MAX,
                    Some(p) => {
                        let now = Instant::now();
                        let left = total - f.frame.written;
                        match p.available(now, left) {
                            0 => {
                                let at = p.ready_at(now, left.min(crate::pace::MIN_BURST as usize));
                                self.pace_wake = Some(self.pace_wake.map_or(at, |w| w.min(at)));
                                if !self.pace_waiting.contains(&i) {
                                    self.pace_waiting.push(i);
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
                        c.queued_bytes -= n;
                        if f.frame.written == total {
                            let f = c.queue.pop_front().expect("front frame");
                            if let Some(t) = f.transmit {
                                sent.push(t);
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(()),
                    Err(e) => break Err(Error::io(format!("sending to {}", c.endpoint), e)),
                }
            }
        };
        let c = &mut self.conns[i];
        if !c.closed {
            if let Err(e) = conn::watch_writable(
                self.poll.registry(),
                &mut c.stream,
                Token(i),
                !c.queue.is_empty(),
                &mut c.writable,
            ) {
                log::warn!(
                    "rank {}: cannot watch {} for writing: {e}",
                    self.rank,
                    c.endpoint
                );
            }
        }
        if !sent.is_empty() {
            if let Some(a) = self.current.as_mut() {
                a.last_progress = Instant::now();
                for t in &sent {
                    a.op.schedule.handle_sent(t);
                }
            }
        }
        if let Err(e) = result {
            self.conn_failed(i, e);
        }
    }

    /// Read and dispatch frames from connection `i` until it would block or parks.
    fn read_conn(&mut self, i: usize) {
        loop {
            if self.conns[i].closed {
                return;
            }
            match self.read_step(i) {
                Ok(true) => continue,
                Ok(false) => return,
                Err(ReadEvent::Idle) => return,
                Err(ReadEvent::Closed(e)) => {
                    self.conn_failed(i, e);
                    return;
                }
            }
        }
    }

    /// One step of the read state machine. `Ok(true)`: call again.
    fn read_step(&mut self, i: usize) -> std::result::Result<bool, ReadEvent> {
        let ep = self.conns[i].endpoint;
        let state = std::mem::replace(
            &mut self.conns[i].read,
            ReadState::Header {
                buf: [0; HEADER_LEN],
                got: 0,
            },
        );
        match state {
            ReadState::Header { mut buf, mut got } => {
                match read_some(&mut self.conns[i].stream, &mut buf[got..], ep) {
                    Ok(n) => {
                        got += n;
                        if let (Endpoint::Relay(r), true) = (ep, self.current.is_some()) {
                            self.relay_heard.insert(r, Instant::now());
                            *self.relay_bytes.entry(r).or_default() += n as u64;
                        }
                    }
                    Err(e) => {
                        self.conns[i].read = ReadState::Header { buf, got };
                        return Err(e);
                    }
                }
                if got < HEADER_LEN {
                    self.conns[i].read = ReadState::Header { buf, got };
                    return Ok(true);
                }
                let h = FrameHeader::decode(&buf)
                    .map_err(|e| ReadEvent::Closed(e.context(format!("from {ep}"))))?;
                let frame = FrameIn::new(h, &buf, Some(&mut self.conns[i].rx));
                self.route_header(i, frame)
            }
            ReadState::Parked(frame) => self.route_header(i, frame),
            ReadState::Payload { mut frame, sink } => {
                if !frame.is_whole() {
                    let (len, got) = (frame.payload_len(), frame.got);
                    let res = match &sink {
                        Sink::Buffer => {
                            let c = &mut self.conns[i];
                            let buf = &mut payload_view(&mut c.payload, len)[got..];
                            frame.read(&mut c.stream, buf)
                        }
                        Sink::Direct(region) => match self.current.as_mut() {
                            Some(a) => {
                                let buf = &mut a.op.mem.bytes_mut(region)[got..];
                                frame.read(&mut self.conns[i].stream, buf)
                            }
                            None => {
                                return Err(ReadEvent::Closed(Error::internal(
                                    "in-place frame without an op",
                                )))
                            }
                        },
                        Sink::Discard => {
                            let want = (len - got).min(self.scratch.len());
                            frame.read(&mut self.conns[i].stream, &mut self.scratch[..want])
                        }
                    };
                    let n = match res {
                        Ok(n) => n,
                        Err(e) => {
                            self.conns[i].read = ReadState::Payload { frame, sink };
                            return Err(read_error(e, ep));
                        }
                    };
                    if let Some(a) = self.current.as_mut() {
                        a.last_progress = Instant::now();
                        if let Endpoint::Relay(r) = ep {
                            self.relay_heard.insert(r, a.last_progress);
                            *self.relay_bytes.entry(r).or_default() += n as u64;
                        }
                    }
                }
                if !frame.is_whole() {
                    self.conns[i].read = ReadState::Payload { frame, sink };
                    return Ok(true);
                }
                let h = frame.header;
                if !frame.verify() {
                    // Whatever this frame wrote in place is never reported: the link fails
                    // (a rank: the op fails; a relay: its chunks are redone elsewhere).
                    return Err(ReadEvent::Closed(Error::remote(format!(
                        "a {:?} frame from {ep} failed its integrity check (op seq {}, offset \
                         {}, {} bytes): corrupted or forged in transit",
                        h.kind(),
                        h.seq,
                        h.offset,
                        h.len
                    ))));
                }
                if h.kind() == FrameKind::Goodbye {
                    self.conns[i].goodbye = true;
                    return Err(ReadEvent::Closed(Error::remote(format!(
                        "{ep} has left the job (destroyed its communicator)"
                    ))));
                }
                match sink {
                    Sink::Buffer => self.deliver(i, &h),
                    Sink::Direct(_) => {
                        if let Some(a) = self.current.as_mut() {
                            if let Err(e) =
                                a.op.schedule.handle_frame_in_place(&mut a.op.mem, ep, &h)
                            {
                                self.fail_current(e);
                            }
                        }
                    }
                    Sink::Discard => {}
                }
                Ok(true)
            }
        }
    }

    /// Decide what to do with a frame whose header has arrived.
    fn route_header(&mut self, i: usize, frame: FrameIn) -> std::result::Result<bool, ReadEvent> {
        let ep = self.conns[i].endpoint;
        let h = frame.header;
        let current_seq = self.current.as_ref().map(|a| a.op.schedule.desc().seq);
        match h.kind() {
            FrameKind::Data | FrameKind::OpError => {
                let sink = if h.kind() == FrameKind::OpError
                    && h.coll == crate::algo::Collective::PointToPoint as u8
                {
                    // A point-to-point group failed at `ep`: only the op exchanging messages
                    // with it now is concerned (read in deliver); nothing waits for it later.
                    Sink::Buffer
                } else if h.kind() == FrameKind::OpError {
                    if Some(h.seq) != current_seq && h.seq > self.last_seq {
                        // A failure report for an op not started here: read it when it starts.
                        self.conns[i].read = ReadState::Parked(frame);
                        return Ok(false);
                    }
                    Sink::Buffer
                } else if h.coll == crate::algo::Collective::PointToPoint as u8 {
                    // Routed by its peer pair's own sequence (algo::p2p): deliver it to the
                    // current op if that op receives it, else leave it in the socket until the
                    // op that does starts; the rest of a message whose op ended is dropped.
                    let stale = self.p2p_stale(ep, &h);
                    match self.current.as_mut() {
                        Some(a) if a.op.schedule.accepts_p2p(ep, &h) => {
                            match a.op.schedule.recv_in_place(ep, &h) {
                                Ok(Some(region)) => Sink::Direct(region),
                                Ok(None) => Sink::Buffer,
                                Err(e) => {
                                    self.fail_current(e);
                                    Sink::Discard
                                }
                            }
                        }
                        _ if stale => Sink::Discard,
                        _ => {
                            self.conns[i].read = ReadState::Parked(frame);
                            return Ok(false);
                        }
                    }
                } else if Some(h.seq) == current_seq {
                    let a = self.current.as_mut().expect("current op");
                    match a.op.schedule.recv_in_place(ep, &h) {
                        Ok(Some(region)) => Sink::Direct(region),
                        Ok(None) => Sink::Buffer,
                        Err(e) => {
                            self.fail_current(e);
                            Sink::Discard
                        }
                    }
                } else if h.seq <= self.last_seq {
                    Sink::Discard // stale frame of an op that already ended (failed) here
                } else {
                    // Belongs to an op that has not started here: leave it in the socket.
                    log::trace!(
                        "rank {}: parking {ep} on seq {} (current {current_seq:?})",
                        self.rank,
                        h.seq
                    );
                    self.conns[i].read = ReadState::Parked(frame);
                    return Ok(false);
                };
                self.conns[i].read = ReadState::Payload { frame, sink };
                Ok(true)
            }
            FrameKind::Goodbye => {
                // Acted on once its tag checked.
                self.conns[i].read = ReadState::Payload {
                    frame,
                    sink: Sink::Buffer,
                };
                Ok(true)
            }
            other => Err(ReadEvent::Closed(Error::remote(format!(
                "unexpected {other:?} frame from {ep}"
            )))),
        }
    }

    /// A whole frame for the current op (or an error report) arrived on connection `i`.
    fn deliver(&mut self, i: usize, h: &FrameHeader) {
        let ep = self.conns[i].endpoint;
        let len = h.len as usize;
        if h.kind() == FrameKind::OpError {
            let msg = String::from_utf8_lossy(self.conns[i].payload_bytes(len)).into_owned();
            let err = Error::new(
                ErrorKind::from_u8(h.aux as u8),
                format!("{ep} reported: {msg}"),
            );
            if h.coll == crate::algo::Collective::PointToPoint as u8 {
                // `ep` was sending us (redop 1) or receiving from us (redop 0) messages
                // seq..=count; in this rank's terms:
                let Endpoint::Rank(peer) = ep else { return };
                let failed = PairRange {
                    peer,
                    sends: h.redop == 0,
                    lo: h.seq,
                    hi: h.count,
                };
                let concerned = self.current.as_ref().is_some_and(|a| {
                    a.op.schedule
                        .p2p_ranges()
                        .iter()
                        .any(|r| r.overlaps(failed.peer, failed.sends, failed.lo, failed.hi))
                });
                let retired = self
                    .p2p_retired
                    .get(&(failed.peer, failed.sends))
                    .copied()
                    .unwrap_or(0);
                log::debug!(
                    "rank {}: {ep} reports point-to-point messages {failed:?} failed \
                     (current op concerned: {concerned}, retired up to {retired}): {}",
                    self.rank,
                    err.message
                );
                if concerned {
                    self.end_current(Err(err), false);
                } else if failed.hi >= retired {
                    // Its op has not started here yet.
                    self.p2p_failures.push((failed, err));
                }
                return;
            }
            let current_seq = self.current.as_ref().map(|a| a.op.schedule.desc().seq);
            if Some(h.seq) == current_seq {
                self.end_current(Err(err), false);
            } else if h.seq > self.last_seq {
                self.remote_failures.insert(h.seq, err);
            }
            return;
        }
        let Some(a) = self.current.as_mut() else {
            return;
        };
        let c = &mut self.conns[i];
        let words = len.div_ceil(8);
        // SAFETY: `payload` holds at least `words` u64s (filled by payload_bytes(len)).
        let payload = unsafe {
            std::slice::from_raw_parts(c.payload.as_ptr().cast::<u8>(), len.min(words * 8))
        };
        a.last_progress = Instant::now();
        if let Err(e) = a.op.schedule.handle_frame(&mut a.op.mem, ep, h, payload) {
            self.fail_current(e);
        }
    }

    /// An op that started at `started` succeeded: fold the rate of every relay it received
    /// from into [`RelayRates`] (a quarter of the new sample, three quarters of the old rate).
    fn fold_relay_rates(&mut self, started: Instant) {
        if self.relay_bytes.is_empty() {
            return;
        }
        let mut rates = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        for (&r, &n) in &self.relay_bytes {
            let Some(heard) = self.relay_heard.get(&r) else {
                continue;
            };
            let nanos = heard.saturating_duration_since(started).as_nanos();
            if nanos == 0 || self.dead_relays.contains(&r) {
                continue;
            }
            let sample = (u128::from(n) * 1_000_000_000 / nanos).min(u128::from(u64::MAX)) as u64;
            if let Some(rate) = rates.get_mut(r) {
                *rate = if *rate == 0 {
                    sample
                } else {
                    ((u128::from(*rate) * 3 + u128::from(sample)) / 4) as u64
                };
            }
            if let Some(link) = links.get_mut(r) {
                link.rate = sample;
                link.min_rtt_us = self
                    .by_endpoint
                    .get(&Endpoint::Relay(r))
                    .into_iter()
                    .flatten()
                    .filter(|&&i| !self.conns[i].closed)
                    .filter_map(|&i| tcp_min_rtt_us(&self.conns[i].stream))
                    .min()
                    .unwrap_or(0);
            }
        }
        log::trace!(
            "rank {}: relay rates {:?} B/s, links {:?}",
            self.rank,
            *rates,
            *links
        );
    }

    /// The current op failed here: tell every peer (so nobody waits for us), end it.
    fn fail_current(&mut self, err: Error) {
        self.end_current(Err(err), true);
    }

    fn end_current(&mut self, result: Result<()>, tell_peers: bool) {
        let Some(a) = self.current.take() else { return };
        let seq = a.op.schedule.desc().seq;
        self.last_seq = seq;
        self.release(&a.op);
        self.retire_p2p(a.op.schedule.as_ref());
        if let (Err(e), true) = (&result, tell_peers) {
            log::warn!("rank {}: {} failed: {e}", self.rank, a.op.schedule.desc());
            let msg = format!("rank {}: {}", self.rank, e.message);
            let first_open = |conns: &[Conn], streams: &Vec<usize>| {
                streams.iter().copied().find(|&s| !conns[s].closed)
            };
            let mut notices: Vec<(usize, FrameHeader)> = Vec::new();
            if a.op.schedule.desc().coll == crate::algo::Collective::PointToPoint {
                // Only the ranks the group exchanges messages with, naming those messages, so
                // a notice never ends a collective, another pair's messages or later ones.
                for r in a.op.schedule.p2p_ranges() {
                    let Some(streams) = self.by_endpoint.get(&Endpoint::Rank(r.peer)) else {
                        continue;
                    };
                    if let Some(s) = first_open(&self.conns, streams) {
                        let mut header = FrameHeader::op_error(r.lo, e.kind, msg.len());
                        header.coll = crate::algo::Collective::PointToPoint as u8;
                        header.redop = u8::from(r.sends);
                        header.count = r.hi;
                        notices.push((s, header));
                    }
                }
            } else {
                for streams in self.by_endpoint.values() {
                    if let Some(s) = first_open(&self.conns, streams) {
                        notices.push((s, FrameHeader::op_error(seq, e.kind, msg.len())));
                    }
                }
            }
            for (s, header) in notices {
                self.enqueue_control(s, header, msg.clone().into_bytes());
            }
        }
        a.op.done.complete(result);
    }

    /// An op ended here: the point-to-point messages it received (or was to receive) are
    /// over, and what still arrives of them is stale.
    fn retire_p2p(&mut self, schedule: &dyn Schedule) {
        let ranges = schedule.p2p_ranges();
        if ranges.is_empty() {
            return;
        }
        for r in ranges {
            let next = self.p2p_retired.entry((r.peer, r.sends)).or_insert(0);
            *next = (*next).max(r.hi + 1);
        }
        let retired = &self.p2p_retired;
        self.p2p_failures
            .retain(|(f, _)| f.hi >= retired.get(&(f.peer, f.sends)).copied().unwrap_or(0));
    }

    /// Whether a point-to-point frame from `ep` belongs to a message whose op ended here.
    fn p2p_stale(&self, ep: Endpoint, h: &FrameHeader) -> bool {
        match ep {
            Endpoint::Rank(r) => self
                .p2p_retired
                .get(&(r, false))
                .is_some_and(|&next| h.seq < next),
            Endpoint::Relay(_) => false,
        }
    }

    /// A failure a peer reported for messages of this op before it started here.
    fn reported_p2p_failure(&self, schedule: &dyn Schedule) -> Option<Error> {
        let ranges = schedule.p2p_ranges();
        self.p2p_failures
            .iter()
            .find(|(f, _)| {
                ranges
                    .iter()
                    .any(|r| r.overlaps(f.peer, f.sends, f.lo, f.hi))
            })
            .map(|(_, e)| e.clone())
    }

    /// Before an op's memory goes back to the caller: drop its unsent frames, copy the rest of
    /// any half-written one and discard the rest of any half-read one, so the byte streams
    /// stay well-formed and the caller's memory is never touched again.
    fn release(&mut self, op: &NetOp) {
        for c in &mut self.conns {
            // A payload half-read into the op's memory: read the rest into nowhere.
            if let ReadState::Payload { sink, .. } = &mut c.read {
                if matches!(sink, Sink::Direct(_)) {
                    *sink = Sink::Discard;
                }
            }
            let mut keep = VecDeque::new();
            for mut f in c.queue.drain(..) {
                match f.transmit.take() {
                    None => keep.push_back(f),
                    // Numbered (tag taken) or half-written: it must still go out whole.
                    Some(t) if f.frame.is_numbered() => {
                        f.owned = op.mem.bytes(&t.region).to_vec();
                        keep.push_back(f);
                    }
                    Some(t) => c.queued_bytes -= wire_len(t.region.len()),
                }
            }
            c.queue = keep;
        }
    }

    /// Connection `i` broke: a peer that said goodbye only fails ops that still need it;
    /// anything else breaks the communicator.
    fn conn_failed(&mut self, i: usize, err: Error) {
        let c = &mut self.conns[i];
        if c.closed {
            return;
        }
        c.closed = true;
        let _ = self.poll.registry().deregister(&mut c.stream);
        let goodbye = c.goodbye;
        let ep = c.endpoint;
        if let (Endpoint::Relay(r), false) = (ep, self.shutting_down) {
            self.relay_lost(r, err);
            return;
        }
        if goodbye || self.shutting_down {
            log::debug!("rank {}: connection to {ep} closed: {err}", self.rank);
            return;
        }
        let desc = self
            .current
            .as_ref()
            .map(|a| a.op.schedule.desc().to_string());
        let err = match desc {
            Some(d) => Error::new(
                err.kind,
                format!("{d}: lost connection to {ep}: {}", err.message),
            ),
            None => Error::new(
                err.kind,
                format!("lost connection to {ep}: {}", err.message),
            ),
        };
        let err = if err.kind == ErrorKind::System {
            Error::remote(err.message)
        } else {
            err
        };
        self.set_fatal(err);
    }

    /// Close every stream to relay `r` and keep it out of later ops.
    fn close_relay(&mut self, r: usize) {
        if !self.dead_relays.insert(r) {
            return;
        }
        log::warn!("rank {}: no longer using relay {r}", self.rank);
        for &i in self
            .by_endpoint
            .get(&Endpoint::Relay(r))
            .into_iter()
            .flatten()
        {
            let c = &mut self.conns[i];
            if c.closed {
                continue;
            }
            c.closed = true;
            let _ = self.poll.registry().deregister(&mut c.stream);
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            // Frames that will never be written: their bytes are redone elsewhere.
            c.queue.clear();
            c.queued_bytes = 0;
        }
    }

    /// Relay `r` failed (`err`): drop it and let the current op route around it.
    fn relay_lost(&mut self, r: usize, err: Error) {
        if self.dead_relays.contains(&r) {
            return;
        }
        log::warn!("rank {}: lost relay {r}: {err}", self.rank);
        self.close_relay(r);
        let Some(a) = self.current.as_mut() else {
            return;
        };
        let err = Error::new(
            err.kind,
            format!("{}: lost relay {r}: {}", a.op.schedule.desc(), err.message),
        );
        if let Err(e) =
            a.op.schedule
                .handle_endpoint_lost(&mut a.op.mem, Endpoint::Relay(r), err)
        {
            let e = if e.kind == ErrorKind::System {
                Error::remote(e.message)
            } else {
                e
            };
            self.fail_current(e);
        }
    }

    /// Drop a relay the current op waits on but has not heard from for the stall bound,
    /// provided another relay is not stalled (see the module docs).
    fn check_stalled_relays(&mut self) {
        let Some(a) = self.current.as_ref() else {
            return;
        };
        let bound = relay_stall(self.timeout);
        let mut stalled = Vec::new();
        let mut healthy = false;
        for (&r, &heard) in &self.relay_heard {
            if self.dead_relays.contains(&r) {
                continue;
            }
            if a.op.schedule.waits_on(Endpoint::Relay(r)) && heard.elapsed() >= bound {
                stalled.push(r);
            } else {
                healthy = true;
            }
        }
        if !healthy {
            return;
        }
        stalled.sort_unstable();
        for r in stalled {
            let msg = format!(
                "relay {r} stalled: nothing arrived from it for {} ms",
                bound.as_millis()
            );
            self.relay_lost(r, Error::timeout(msg));
        }
    }

    fn check_timeout(&mut self) {
        self.check_stalled_relays();
        let Some(a) = self.current.as_ref() else {
            return;
        };
        if a.last_progress.elapsed() < self.timeout {
            return;
        }
        let msg = format!(
            "{} made no progress for {} ms: {}",
            a.op.schedule.desc(),
            self.timeout.as_millis(),
            a.op.schedule.waiting_for()
        );
        self.set_fatal(Error::timeout(msg));
    }

    fn say_goodbye(&mut self) {
        for i in 0..self.conns.len() {
            self.enqueue_control(i, FrameHeader::new(FrameKind::Goodbye, 0), Vec::new());
        }
        // Give queued frames a bounded moment to leave, then close.
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut events = Events::with_capacity(64);
        while Instant::now() < deadline
            && self.conns.iter().any(|c| !c.closed && !c.queue.is_empty())
        {
            let _ = self.poll.poll(&mut events, Some(Duration::from_millis(10)));
            for i in 0..self.conns.len() {
                self.flush(i);
            }
        }
        self.close_all();
    }
}

/// The first `len` bytes of an 8-byte-aligned buffer, grown as needed.
fn payload_view(v: &mut Vec<u64>, len: usize) -> &mut [u8] {
    let words = len.div_ceil(8);
    if v.len() < words {
        v.resize(words, 0);
    }
    // SAFETY: u64 storage viewed as bytes; len <= 8 * words, and the borrow of `v` is carried.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), len) }
}

fn read_some(
    stream: &mut TcpStream,
    buf: &mut [u8],
    ep: Endpoint,
) -> std::result::Result<usize, ReadEvent> {
    match conn::recv(stream, &mut [std::io::IoSliceMut::new(buf)]) {
        Ok(0) => Err(read_error(std::io::ErrorKind::UnexpectedEof.into(), ep)),
        Ok(n) => Ok(n),
        Err(e) => Err(read_error(e, ep)),
    }
}

/// What a failed read from `ep` means for the loop.
fn read_error(e: std::io::Error, ep: Endpoint) -> ReadEvent {
    match e.kind() {
        std::io::ErrorKind::WouldBlock => ReadEvent::Idle,
        std::io::ErrorKind::UnexpectedEof => ReadEvent::Closed(Error::remote(format!(
            "connection closed by {ep} (process exited or failed?)"
        ))),
        _ => ReadEvent::Closed(Error::io(format!("receiving from {ep}"), e)),
    }
}

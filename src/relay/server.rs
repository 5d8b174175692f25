//! The relay daemon's event loop: one mio `Poll` serving many jobs, isolated by job id.
//!
//! Each connection goes through `AwaitHello` (challenge sent, proof expected within
//! [`HANDSHAKE_TIMEOUT`]) to `Ready` (a member of one job as one rank's stream). Every frame
//! header is checked before its payload is read: handshake frames against the control limit,
//! data frames against the job's announced chunk size and the op's element count. A frame that
//! fails a check closes only its own connection, with the reason logged.

use crate::algo::Collective;
use crate::buffer::Scratch;
use crate::error::{Error, ErrorKind, Result};
use crate::relay::receipts::Kind;
use crate::relay::sums::{check_data_header, Fault, Sums};
use crate::relay::JobHello;
use crate::wire::{self, FrameHeader, FrameKind, Hello, HEADER_LEN, MAX_CONTROL_PAYLOAD};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::io::{IoSlice, Read, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const FIRST_CONN: usize = 2;
/// A connection must authenticate within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const SOCKET_BUFFER: usize = 4 << 20;

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
    header: [u8; HEADER_LEN],
    payload: Payload,
    written: usize,
    fanout: Option<Rc<Fanout>>,
}

enum State {
    AwaitHello {
        nonce: [u8; 32],
        since: Instant,
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
    Payload {
        header: FrameHeader,
        buf: Scratch,
        got: usize,
    },
}

struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    state: State,
    read: ReadState,
    out: VecDeque<OutFrame>,
    out_bytes: usize,
}

struct Job {
    hello: JobHello,
    /// Connection ids per rank.
    members: Vec<Vec<usize>>,
    sums: Sums,
    budget: usize,
    bytes_in: u64,
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
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(Duration::from_millis(500)))
            {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("event loop poll failed", e));
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

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let sock = socket2::SockRef::from(&stream);
                    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
                    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
                    let id = self.next_id;
                    self.next_id += 1;
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(id),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        log::warn!("cannot register connection from {peer}: {e}");
                        continue;
                    }
                    let nonce = wire::nonce();
                    log::debug!("connection {id} from {peer}");
                    self.conns.insert(
                        id,
                        Conn {
                            stream,
                            peer,
                            state: State::AwaitHello {
                                nonce,
                                since: Instant::now(),
                            },
                            read: ReadState::Header {
                                buf: [0; HEADER_LEN],
                                got: 0,
                            },
                            out: VecDeque::new(),
                            out_bytes: 0,
                        },
                    );
                    self.send_control(
                        id,
                        FrameHeader::new(FrameKind::Challenge, nonce.len()),
                        nonce.to_vec(),
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Close connections that did not authenticate in time, or whose refusal was delivered.
    fn sweep(&mut self) {
        let now = Instant::now();
        let stale: Vec<(usize, &'static str)> = self
            .conns
            .iter()
            .filter_map(|(&id, c)| match c.state {
                State::AwaitHello { since, .. } if now - since > HANDSHAKE_TIMEOUT => {
                    Some((id, "no authentication within the handshake timeout"))
                }
                State::Closing { since }
                    if c.out.is_empty() || now - since > Duration::from_secs(2) =>
                {
                    Some((id, "refused"))
                }
                _ => None,
            })
            .collect();
        for (id, why) in stale {
            self.close(id, why, why != "refused");
        }
    }

    /// Remove connection `id`; `warn` logs the reason as a warning.
    fn close(&mut self, id: usize, reason: &str, warn: bool) {
        let Some(mut c) = self.conns.remove(&id) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.stream);
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
        if warn {
            log::warn!("closed connection from {}: {reason}", c.peer);
        } else {
            log::debug!("closed connection from {}: {reason}", c.peer);
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
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        c.out_bytes += HEADER_LEN + payload.bytes().len();
        c.out.push_back(OutFrame {
            header: header.encode(),
            payload,
            written: 0,
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
                let total = HEADER_LEN + payload.len();
                let res = if f.written < HEADER_LEN {
                    c.stream.write_vectored(&[
                        IoSlice::new(&f.header[f.written..]),
                        IoSlice::new(payload),
                    ])
                } else {
                    c.stream.write(&payload[f.written - HEADER_LEN..])
                };
                match res {
                    Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        f.written += n;
                        c.out_bytes -= n;
                        self.stats.bytes_out += n as u64;
                        if f.written == total {
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
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => break Err(e),
                }
            }
        };
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
            let (buf, got) = match &mut c.read {
                ReadState::Header { buf, got } => (&mut buf[..], got),
                ReadState::Payload { buf, got, .. } => (buf.as_mut_slice(), got),
            };
            if *got < buf.len() {
                match c.stream.read(&mut buf[*got..]) {
                    Ok(0) => {
                        let mid = *got > 0 || matches!(c.read, ReadState::Payload { .. });
                        let reason = if mid {
                            "connection closed in the middle of a frame"
                        } else {
                            "connection closed by the peer"
                        };
                        self.close(id, reason, mid);
                        return;
                    }
                    Ok(n) => {
                        *got += n;
                        self.stats.bytes_in += n as u64;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.close(id, &format!("receive failed: {e}"), true);
                        return;
                    }
                }
                if *got < buf.len() {
                    continue;
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
                ReadState::Payload { header, buf, .. } => self.on_frame(id, header, buf),
            };
            if let Err(e) = res {
                self.close(id, &e.message, true);
                return;
            }
        }
    }

    /// A header arrived: check it and size its payload, or handle an empty frame.
    fn on_header(&mut self, id: usize, buf: &[u8; HEADER_LEN]) -> Result<()> {
        let h = FrameHeader::decode(buf)?;
        let c = self.conns.get_mut(&id).expect("connection");
        let mut data_of = None;
        let limit = match (&c.state, h.kind()) {
            (State::AwaitHello { .. }, FrameKind::Hello) => MAX_CONTROL_PAYLOAD,
            (State::AwaitHello { .. }, k) => {
                return Err(Error::remote(format!("expected a Hello frame, got {k:?}")))
            }
            (State::Ready { job, rank }, FrameKind::Data) => {
                let j = &self.jobs[job];
                check_data_header(&h, *rank, j.hello.world, j.hello.chunk_bytes)?;
                data_of = Some(*job);
                h.len as usize
            }
            (State::Ready { .. }, FrameKind::OpError) => MAX_CONTROL_PAYLOAD,
            (State::Ready { .. }, FrameKind::Goodbye) => {
                self.close(id, "peer said goodbye", false);
                return Ok(());
            }
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
        if h.len == 0 {
            return self.on_frame(id, h, buf);
        }
        let c = self.conns.get_mut(&id).expect("connection");
        c.read = ReadState::Payload {
            header: h,
            buf,
            got: 0,
        };
        Ok(())
    }

    fn on_frame(&mut self, id: usize, h: FrameHeader, payload: Scratch) -> Result<()> {
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
                _ => self.on_data(job, rank, id, h, payload),
            },
            State::Closing { .. } => Ok(()),
        }
    }

    fn refuse(&mut self, id: usize, kind: ErrorKind, reason: &str) {
        let c = self.conns.get_mut(&id).expect("connection");
        log::warn!("rejected connection from {}: {reason}", c.peer);
        c.state = State::Closing {
            since: Instant::now(),
        };
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
        if let Some(j) = self.jobs.get(&jh.job) {
            let same = JobHello {
                rank: jh.rank,
                stream: jh.stream,
                ..j.hello.clone()
            };
            if same != jh {
                let msg = format!(
                    "job {tag}: rank {} announced world {}, {} streams, {}-byte chunks, window {}, \
                     but the job has world {}, {} streams, {}-byte chunks, window {}",
                    jh.rank, jh.world, jh.streams, jh.chunk_bytes, jh.window,
                    j.hello.world, j.hello.streams, j.hello.chunk_bytes, j.hello.window
                );
                self.refuse(id, ErrorKind::InvalidArgument, &msg);
                return Ok(());
            }
            if j.members[jh.rank].len() >= jh.streams {
                let msg = format!(
                    "job {tag}: rank {} connected more than {} streams",
                    jh.rank, jh.streams
                );
                self.refuse(id, ErrorKind::InvalidArgument, &msg);
                return Ok(());
            }
        } else {
            let budget = jh.budget();
            if self.reserved.saturating_add(budget) > self.config.max_memory {
                let msg = format!(
                    "relay is full: job {tag} needs up to {budget} bytes, {} of {} bytes are reserved",
                    self.reserved, self.config.max_memory
                );
                self.refuse(id, ErrorKind::Remote, &msg);
                return Ok(());
            }
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
                },
            );
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
        let mut p = wire::welcome_mac(&key, &nonce, &hello.nonce, &[]).to_vec();
        p.extend_from_slice(&[]);
        self.send_control(id, FrameHeader::new(FrameKind::Welcome, p.len()), p);
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
    ) -> Result<()> {
        let Some(j) = self.jobs.get_mut(&job) else {
            return Err(Error::internal("connection of a job that ended"));
        };
        j.bytes_in += payload.len() as u64;
        if !self.test_faults.delay.is_zero() {
            std::thread::sleep(self.test_faults.delay);
        }
        let f = check_data_header(&h, rank, j.hello.world, j.hello.chunk_bytes)?;
        let world = j.hello.world;
        if !matches!(f.coll, Collective::Broadcast) {
            if let Some(g) = self.config.grants.as_ref().filter(|g| g.keeps_receipts()) {
                let d = *blake3::hash(payload.as_slice()).as_bytes();
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
                let shared = Rc::new(payload);
                for t in targets {
                    self.enqueue(t, h, Payload::Shared(shared.clone()), Some(fan.clone()));
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
                    if let Some(g) = self.config.grants.as_ref().filter(|g| g.keeps_receipts()) {
                        // What each rank is sent, as sent.
                        let first = *blake3::hash(shared.as_slice()).as_bytes();
                        let rest = if Rc::ptr_eq(&shared, &others) {
                            first
                        } else {
                            *blake3::hash(others.as_slice()).as_bytes()
                        };
                        for &(r, _) in &targets {
                            let d = if r == 0 { first } else { rest };
                            g.note(&job, rh.seq, Kind::Result, r, rh.offset, shared.len(), d);
                        }
                    }
                    for (r, t) in targets {
                        let p = if r == 0 { &shared } else { &others };
                        self.enqueue(t, rh, Payload::Shared(p.clone()), None);
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

//! Bootstrap: unique ids, rendezvous through rank 0, and the authenticated connection mesh.
//!
//! 1. Rank 0 opens a bootstrap listener ([`UniqueId::new`]); the id carries its address, a
//!    fresh random job secret and a job id.
//! 2. Every other rank opens its own data listener, connects to rank 0, authenticates with the
//!    secret (wire handshake) and announces its rank, world size and data address. Rank 0
//!    checks them (world size agrees, rank in range, no duplicates) and, once all have
//!    joined, sends everyone the address table — or a `Reject` naming the problem (a missing
//!    rank after `MR_TIMEOUT_MS`, a duplicate, a world-size mismatch).
//! 3. Every rank connects to each lower rank (several streams to ring neighbours, one to the
//!    others) and accepts from the higher ones; each connection authenticates again.
//!
//! Everything here is blocking with deadlines; the event loop takes over the finished mesh.

use crate::algo::Endpoint;
use crate::config::{self, Config};
use crate::error::{Error, ErrorKind, Result};
use crate::net::inbound::{Authenticated, Inbound};
use crate::wire::{self, BodyReader, BodyWriter, FrameHeader, FrameKind, Hello, SessionKeys};
use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const ID_MAGIC: &str = "mr1";
/// How often rank 0 and the data listeners look for new connections and handshake progress.
const ACCEPT_POLL: Duration = Duration::from_millis(2);
/// How long an answer (welcome, reject) to an authenticated connection may take to send.
const ANSWER_DEADLINE: Duration = Duration::from_secs(1);
/// Default secret for jobs started from the environment without `MR_TOKEN`: it keeps jobs
/// from accidentally talking to each other, not attackers out.
const ENV_DEFAULT_SECRET: &[u8] = b"mapreduce-env-bootstrap";

/// Opaque 256-byte job id: rank 0's bootstrap address, a random job secret and a job id.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct UniqueId(pub [u8; 256]);

/// A parsed [`UniqueId`].
#[derive(Clone, Debug)]
struct IdInfo {
    addr: SocketAddr,
    secret: Vec<u8>,
    job: [u8; 16],
}

/// Listeners opened by [`UniqueId::new`], waiting for rank 0's `Comm::init` in this process.
static BOOTSTRAP_LISTENERS: Mutex<Vec<([u8; 16], TcpListener)>> = Mutex::new(Vec::new());

impl UniqueId {
    /// Open rank 0's bootstrap listener and describe it. Call on rank 0, pass the id to every
    /// rank (rank 0 included) out of band.
    pub fn new(config: &Config) -> Result<UniqueId> {
        let ip = local_ip(config)?;
        let listener = TcpListener::bind((ip, 0))
            .map_err(|e| Error::io(format!("cannot open bootstrap listener on {ip}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("bootstrap listener address", e))?;
        let mut secret = [0u8; 32];
        let mut job = [0u8; 16];
        getrandom::getrandom(&mut secret)
            .map_err(|e| Error::internal(format!("OS random source: {e}")))?;
        getrandom::getrandom(&mut job)
            .map_err(|e| Error::internal(format!("OS random source: {e}")))?;
        BOOTSTRAP_LISTENERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((job, listener));
        log::debug!("bootstrap listener on {addr}");
        Ok(IdInfo {
            addr,
            secret: secret.to_vec(),
            job,
        }
        .encode())
    }

    pub fn as_bytes(&self) -> &[u8; 256] {
        &self.0
    }

    /// The bootstrap address this id points to.
    pub fn address(&self) -> Result<SocketAddr> {
        Ok(IdInfo::decode(self)?.addr)
    }
}

impl IdInfo {
    fn encode(&self) -> UniqueId {
        let text = format!(
            "{ID_MAGIC} {} {} {}",
            self.addr,
            config::to_hex(&self.secret),
            config::to_hex(&self.job)
        );
        let mut id = [0u8; 256];
        id[..text.len()].copy_from_slice(text.as_bytes());
        UniqueId(id)
    }

    fn decode(id: &UniqueId) -> Result<IdInfo> {
        let bad = || {
            Error::invalid(
                "unique id is malformed (not produced by mr_get_unique_id, or corrupted)",
            )
        };
        let end = id.0.iter().position(|&b| b == 0).unwrap_or(256);
        let text = std::str::from_utf8(&id.0[..end]).map_err(|_| bad())?;
        let mut parts = text.split(' ');
        if parts.next() != Some(ID_MAGIC) {
            return Err(bad());
        }
        let addr = parts.next().and_then(|a| a.parse().ok()).ok_or_else(bad)?;
        let secret =
            config::parse_hex("job secret", parts.next().ok_or_else(bad)?).map_err(|_| bad())?;
        let job: [u8; 16] = config::parse_hex("job id", parts.next().ok_or_else(bad)?)
            .ok()
            .and_then(|j| j.try_into().ok())
            .ok_or_else(bad)?;
        Ok(IdInfo { addr, secret, job })
    }
}

/// The address to bind and advertise: `MR_BIND_ADDR`, else `MR_IFNAME`'s IPv4 address, else
/// loopback (single-host jobs; multi-host jobs set one of the two, or use `init_env`, which
/// advertises the address that reaches rank 0).
fn local_ip(config: &Config) -> Result<IpAddr> {
    if let Some(ip) = config.bind_addr {
        return Ok(ip);
    }
    if let Some(name) = &config.ifname {
        return interface_ip(name);
    }
    Ok(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// The first IPv4 address of interface `name`, in the order the system lists them
/// (`getifaddrs`).
fn interface_ip(name: &str) -> Result<IpAddr> {
    let interfaces = if_addrs::get_if_addrs().map_err(|e| Error::io("getifaddrs", e))?;
    interfaces
        .into_iter()
        .filter(|i| i.name == name)
        .find_map(|i| match i.addr {
            if_addrs::IfAddr::V4(v4) => Some(IpAddr::V4(v4.ip)),
            if_addrs::IfAddr::V6(_) => None,
        })
        .ok_or_else(|| {
            Error::invalid(format!(
                "MR_IFNAME={name}: no such interface with an IPv4 address"
            ))
        })
}

/// Read the environment contract: `MR_RANK`/`MR_WORLD_SIZE`/`MR_BOOTSTRAP`, or torchrun's
/// `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT`. Rank 0 opens the listener at that address.
pub fn from_env(config: &Config) -> Result<(usize, usize, UniqueId)> {
    let get = |a: &str, b: &str| {
        std::env::var(a)
            .ok()
            .or_else(|| std::env::var(b).ok())
            .filter(|v| !v.is_empty())
    };
    let num = |name: &str, v: String| -> Result<usize> {
        v.trim()
            .parse()
            .map_err(|_| Error::invalid(format!("{name}={v:?} is not a number")))
    };
    let rank = num(
        "MR_RANK",
        get("MR_RANK", "RANK").ok_or_else(|| Error::invalid("MR_RANK (or RANK) is not set"))?,
    )?;
    let size = num(
        "MR_WORLD_SIZE",
        get("MR_WORLD_SIZE", "WORLD_SIZE")
            .ok_or_else(|| Error::invalid("MR_WORLD_SIZE (or WORLD_SIZE) is not set"))?,
    )?;
    let addr_text = match std::env::var("MR_BOOTSTRAP").ok().filter(|v| !v.is_empty()) {
        Some(a) => a,
        None => {
            let host = std::env::var("MASTER_ADDR")
                .map_err(|_| Error::invalid("neither MR_BOOTSTRAP nor MASTER_ADDR is set"))?;
            let port: u16 = std::env::var("MASTER_PORT")
                .map_err(|_| Error::invalid("MASTER_ADDR is set but MASTER_PORT is not"))?
                .trim()
                .parse()
                .map_err(|_| Error::invalid("MASTER_PORT is not a port number"))?;
            // torchrun's store owns MASTER_PORT; our bootstrap takes the next one.
            format!("{host}:{}", port.wrapping_add(1))
        }
    };
    let addr = config::resolve(&addr_text)?;
    let secret = config.token.as_deref().unwrap_or(ENV_DEFAULT_SECRET);
    Ok((
        rank,
        size,
        env_unique_id(rank, secret, addr, config.timeout)?,
    ))
}

/// The id of a job joined from the environment: rank 0's bootstrap address `addr` and the job
/// secret (`MR_TOKEN`), from which the job id follows. On rank 0 this opens the listener.
pub fn env_unique_id(
    rank: usize,
    secret: &[u8],
    addr: SocketAddr,
    timeout: Duration,
) -> Result<UniqueId> {
    let job = blake3::hash(&[secret, addr.to_string().as_bytes()].concat()).as_bytes()[..16]
        .try_into()
        .unwrap();
    let info = IdInfo {
        addr,
        secret: secret.to_vec(),
        job,
    };
    if rank == 0 {
        let listener = bind_with_retry(addr, timeout)?;
        BOOTSTRAP_LISTENERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((job, listener));
    }
    Ok(info.encode())
}

/// The secret `MR_VERIFY` draws sample positions from in jobs with static relays: derived from
/// the whole unique id, whose job secret only the ranks hold (relays get tokens derived
/// one-way from it, see [`wire::relay_token`]).
pub fn sample_secret(id: &UniqueId) -> [u8; 32] {
    blake3::derive_key("mapreduce verify secret v1", id.as_bytes())
}

fn bind_with_retry(addr: SocketAddr, timeout: Duration) -> Result<TcpListener> {
    let deadline = Instant::now() + timeout.min(Duration::from_secs(10));
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => {
                return Err(Error::io(
                    format!("cannot open bootstrap listener on {addr}"),
                    e,
                ))
            }
        }
    }
}

/// The authenticated connections of one rank, ready for the event loop.
pub struct Mesh {
    pub rank: usize,
    pub size: usize,
    pub job: [u8; 16],
    pub conns: Vec<(Endpoint, TcpStream)>,
    /// Frame keys of each connection, in the order of `conns`.
    pub keys: Vec<SessionKeys>,
    /// The address this rank advertised to the others (its data listener's), which they
    /// reach it on; `None` for a single-rank job.
    pub local_ip: Option<std::net::IpAddr>,
}

/// How many streams connect ranks `a` and `b`: `streams` between ring neighbours (they carry
/// the bulk data), one between the others (recursive doubling, errors).
pub fn streams_between(a: usize, b: usize, size: usize, streams: usize) -> usize {
    let d = a.abs_diff(b);
    if d == 1 || d == size - 1 {
        streams
    } else {
        1
    }
}

/// Blocking frame I/O with a deadline, for bootstrap and handshakes.
pub struct FrameIo<'a> {
    pub stream: &'a mut TcpStream,
    pub deadline: Instant,
    pub what: String,
}

impl FrameIo<'_> {
    fn remaining(&self) -> Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::timeout(format!("{}: timed out", self.what)));
        }
        Ok(left)
    }

    pub fn send(&mut self, header: FrameHeader, payload: &[u8]) -> Result<()> {
        let left = self.remaining()?;
        self.stream
            .set_write_timeout(Some(left))
            .map_err(|e| Error::io(&self.what, e))?;
        let mut buf = header.encode().to_vec();
        buf.extend_from_slice(payload);
        crate::net::conn::send_all(self.stream, &buf)
            .map_err(|e| Error::io(format!("{}: send", self.what), e))
    }

    pub fn recv(&mut self) -> Result<(FrameHeader, Vec<u8>)> {
        let mut hdr = [0u8; wire::HEADER_LEN];
        self.read_exact(&mut hdr)?;
        let h = FrameHeader::decode(&hdr).map_err(|e| e.context(&self.what))?;
        if h.len > wire::MAX_CONTROL_PAYLOAD as u64 {
            return Err(Error::remote(format!(
                "{}: {} byte control frame is too large",
                self.what, h.len
            )));
        }
        let mut payload = vec![0u8; h.len as usize];
        self.read_exact(&mut payload)?;
        Ok((h, payload))
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let left = self.remaining()?;
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| Error::io(&self.what, e))?;
            match self.stream.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(Error::remote(format!(
                        "{}: connection closed by the other side",
                        self.what
                    )))
                }
                Ok(n) => done += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(format!("{}: receive", self.what), e)),
            }
        }
        Ok(())
    }

    /// Expect a frame of `kind`; a `Reject` becomes the error it carries.
    pub fn expect(&mut self, kind: FrameKind) -> Result<(FrameHeader, Vec<u8>)> {
        let (h, p) = self.recv()?;
        if h.kind() == FrameKind::Reject {
            let msg = String::from_utf8_lossy(&p).into_owned();
            return Err(Error::new(ErrorKind::from_u8(h.aux as u8), msg));
        }
        if h.kind() != kind {
            return Err(Error::remote(format!(
                "{}: expected {kind:?}, got {:?}",
                self.what,
                h.kind()
            )));
        }
        Ok((h, p))
    }

    pub fn reject(&mut self, kind: ErrorKind, reason: &str) {
        let _ = self.send(FrameHeader::reject(kind, reason.len()), reason.as_bytes());
    }

    /// Connector side of the handshake: answer the challenge with `body`, check the acceptor's
    /// proof, return its Welcome body.
    pub fn client_handshake(&mut self, key: &[u8; 32], body: &[u8]) -> Result<Vec<u8>> {
        self.client_handshake_keys(key, body).map(|(body, _)| body)
    }

    /// As [`Self::client_handshake`], also returning the connection's frame keys: every frame
    /// after the handshake carries a tag (see [`crate::wire`]).
    pub fn client_handshake_keys(
        &mut self,
        key: &[u8; 32],
        body: &[u8],
    ) -> Result<(Vec<u8>, SessionKeys)> {
        let (challenge, ns) = self.expect(FrameKind::Challenge)?;
        if let Some(msg) = wire::tag_format_mismatch(challenge.aux, "the other side") {
            return Err(Error::remote(format!("{}: {msg}", self.what)));
        }
        let ns: [u8; wire::NONCE_LEN] = ns
            .try_into()
            .map_err(|_| Error::remote(format!("{}: malformed challenge", self.what)))?;
        let hello = Hello::sign(key, &ns, body);
        let enc = hello.encode();
        self.send(FrameHeader::hello(enc.len()), &enc)?;
        let (_, welcome) = self.expect(FrameKind::Welcome)?;
        if welcome.len() < wire::MAC_LEN {
            return Err(Error::remote(format!("{}: malformed welcome", self.what)));
        }
        let (mac, wbody) = welcome.split_at(wire::MAC_LEN);
        if !wire::mac_eq(mac, &wire::welcome_mac(key, &ns, &hello.nonce, wbody)) {
            return Err(Error::auth(format!(
                "{}: the other side does not know the job secret",
                self.what
            )));
        }
        let keys = SessionKeys::derive(key, &ns, &hello.nonce, false);
        Ok((wbody.to_vec(), keys))
    }

    pub fn welcome(
        &mut self,
        key: &[u8; 32],
        ns: &[u8; 32],
        nc: &[u8; 32],
        body: &[u8],
    ) -> Result<()> {
        let mut p = wire::welcome_mac(key, ns, nc, body).to_vec();
        p.extend_from_slice(body);
        self.send(FrameHeader::new(FrameKind::Welcome, p.len()), &p)
    }
}

fn connect_with_retry(addr: SocketAddr, deadline: Instant, what: &str) -> Result<TcpStream> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::timeout(format!(
                "{what}: could not connect to {addr} in time"
            )));
        }
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(5))) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                std::thread::sleep(Duration::from_millis(20).min(left))
            }
            Err(e) => return Err(Error::io(format!("{what}: connect to {addr}"), e)),
        }
    }
}

/// Join the job: rendezvous through rank 0, then build the authenticated mesh.
pub fn rendezvous(size: usize, id: &UniqueId, rank: usize, config: &Config) -> Result<Mesh> {
    let info = IdInfo::decode(id)?;
    let key = wire::mac_key(&[&info.secret[..], &info.job[..]].concat());
    let deadline = Instant::now() + config.timeout;
    if size == 1 {
        take_listener(&info.job);
        return Ok(Mesh {
            rank,
            size,
            job: info.job,
            conns: Vec::new(),
            keys: Vec::new(),
            local_ip: None,
        });
    }
    let (listener, addrs) = if rank == 0 {
        let boot = take_listener(&info.job).ok_or_else(|| {
            Error::invalid(
                "rank 0 must call mr_comm_init_rank in the process that created the unique id",
            )
        })?;
        let listener = TcpListener::bind((info.addr.ip(), 0))
            .map_err(|e| Error::io("cannot open data listener", e))?;
        let my_addr = listener
            .local_addr()
            .map_err(|e| Error::io("data listener address", e))?;
        let addrs = gather_ranks(&boot, size, my_addr, &key, &info, deadline)?;
        (listener, addrs)
    } else {
        join_rank0(size, rank, &key, &info, config, deadline)?
    };
    let local_ip = listener.local_addr().ok().map(|a| a.ip());
    let (conns, keys) = connect_mesh(size, rank, &listener, &addrs, &key, &info, config, deadline)?
        .into_iter()
        .unzip();
    Ok(Mesh {
        rank,
        size,
        job: info.job,
        conns,
        keys,
        local_ip,
    })
}

fn take_listener(job: &[u8; 16]) -> Option<TcpListener> {
    let mut l = BOOTSTRAP_LISTENERS
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let i = l.iter().position(|(j, _)| j == job)?;
    Some(l.swap_remove(i).1)
}

/// Rank 0: admit every other rank, then publish the address table.
fn gather_ranks(
    boot: &TcpListener,
    size: usize,
    my_addr: SocketAddr,
    key: &[u8; 32],
    info: &IdInfo,
    deadline: Instant,
) -> Result<Vec<SocketAddr>> {
    let mut joined: HashMap<usize, (TcpStream, SocketAddr)> = HashMap::new();
    let mut inbound = Inbound::new(*key, "rank 0: bootstrap");
    boot.set_nonblocking(true)
        .map_err(|e| Error::io("bootstrap listener", e))?;
    let mut ready = Vec::new();
    while joined.len() < size - 1 {
        if ready.is_empty() {
            if Instant::now() >= deadline {
                let missing: Vec<String> = (1..size)
                    .filter(|r| !joined.contains_key(r))
                    .map(|r| r.to_string())
                    .collect();
                let msg = format!(
                    "bootstrap: rank(s) {} of {size} did not join within the timeout ({} joined)",
                    missing.join(", "),
                    joined.len() + 1
                );
                for (s, _) in joined.values_mut() {
                    FrameIo {
                        stream: s,
                        deadline: Instant::now() + Duration::from_secs(1),
                        what: "bootstrap".into(),
                    }
                    .reject(ErrorKind::Timeout, &msg);
                }
                return Err(Error::timeout(msg));
            }
            ready = inbound.poll(boot, deadline);
            if ready.is_empty() {
                std::thread::sleep(ACCEPT_POLL);
            }
            continue;
        }
        let Authenticated {
            mut stream,
            peer,
            body,
            ns,
            nc,
        } = ready.remove(0);
        let mut io = FrameIo {
            stream: &mut stream,
            deadline: Instant::now() + ANSWER_DEADLINE,
            what: format!("bootstrap connection from {peer}"),
        };
        let parsed = (|| {
            let mut r = BodyReader::new(&body, "bootstrap hello");
            let job = r.bytes()?.to_vec();
            let rank = r.u32()? as usize;
            let world = r.u32()? as usize;
            let addr: SocketAddr = r
                .string()?
                .parse()
                .map_err(|_| Error::remote("bootstrap hello: bad address"))?;
            Ok::<_, Error>((job, rank, world, addr))
        })();
        let (job, r, world, addr) = match parsed {
            Ok(x) => x,
            Err(e) => {
                io.reject(ErrorKind::Remote, &e.message);
                log::warn!("bootstrap: {e}");
                continue;
            }
        };
        let problem = if job != info.job {
            Some((
                ErrorKind::InvalidArgument,
                "bootstrap: the unique id belongs to another job".to_string(),
            ))
        } else if world != size {
            Some((ErrorKind::InvalidArgument, format!("bootstrap: rank {r} was started with world size {world}, but rank 0 has world size {size}")))
        } else if r == 0 || r >= size {
            Some((
                ErrorKind::InvalidArgument,
                format!("bootstrap: rank {r} is out of range for world size {size}"),
            ))
        } else if joined.contains_key(&r) {
            Some((
                ErrorKind::InvalidArgument,
                format!("bootstrap: rank {r} joined twice (duplicate rank)"),
            ))
        } else {
            None
        };
        if let Some((kind, msg)) = problem {
            log::warn!("{msg}");
            io.reject(kind, &msg);
            if world != size {
                // A world-size disagreement dooms the job: tell everyone who joined already.
                for (s, _) in joined.values_mut() {
                    FrameIo {
                        stream: s,
                        deadline: Instant::now() + Duration::from_secs(1),
                        what: "bootstrap".into(),
                    }
                    .reject(kind, &msg);
                }
                return Err(Error::new(kind, msg));
            }
            continue;
        }
        if let Err(e) = io.welcome(key, &ns, &nc, &[]) {
            log::warn!("bootstrap: rank {r} left during its handshake: {e}");
            continue;
        }
        joined.insert(r, (stream, addr));
    }
    let mut addrs = vec![my_addr; size];
    for (r, (_, a)) in &joined {
        addrs[*r] = *a;
    }
    let mut table = BodyWriter::default().u32(size as u32);
    for a in &addrs {
        table = table.bytes(a.to_string().as_bytes());
    }
    let table = table.finish();
    for (r, (s, _)) in joined.iter_mut() {
        FrameIo {
            stream: s,
            deadline,
            what: format!("bootstrap table to rank {r}"),
        }
        .send(FrameHeader::new(FrameKind::Control, table.len()), &table)?;
    }
    Ok(addrs)
}

/// Ranks other than 0: open a data listener, join through rank 0, receive the table.
fn join_rank0(
    size: usize,
    rank: usize,
    key: &[u8; 32],
    info: &IdInfo,
    config: &Config,
    deadline: Instant,
) -> Result<(TcpListener, Vec<SocketAddr>)> {
    let what = format!("rank {rank}: bootstrap via {}", info.addr);
    let mut stream = connect_with_retry(info.addr, deadline, &what)?;
    // Advertise the address that reaches rank 0, unless told otherwise.
    let ip = match (config.bind_addr, &config.ifname) {
        (None, None) => stream.local_addr().map_err(|e| Error::io(&what, e))?.ip(),
        _ => local_ip(config)?,
    };
    let listener = TcpListener::bind((ip, 0))
        .map_err(|e| Error::io(format!("cannot open data listener on {ip}"), e))?;
    let my_addr = listener
        .local_addr()
        .map_err(|e| Error::io("data listener address", e))?;
    let body = BodyWriter::default()
        .bytes(&info.job)
        .u32(rank as u32)
        .u32(size as u32)
        .bytes(my_addr.to_string().as_bytes())
        .finish();
    let mut io = FrameIo {
        stream: &mut stream,
        deadline,
        what: what.clone(),
    };
    io.client_handshake(key, &body)?;
    // Wait for the table (rank 0 sends it once everyone has joined).
    let (_, table) = io.expect(FrameKind::Control).map_err(|e| match e.kind {
        ErrorKind::Timeout => {
            Error::timeout(format!("{what}: not every rank joined within the timeout"))
        }
        _ => e,
    })?;
    let mut r = BodyReader::new(&table, "bootstrap table");
    let n = r.u32()? as usize;
    if n != size {
        return Err(Error::remote(format!(
            "{what}: table has {n} ranks, expected {size}"
        )));
    }
    let addrs = (0..n)
        .map(|_| {
            r.string()?
                .parse()
                .map_err(|_| Error::remote(format!("{what}: bad address in table")))
        })
        .collect::<Result<Vec<SocketAddr>>>()?;
    Ok((listener, addrs))
}

#[allow(clippy::too_many_arguments)]
fn connect_mesh(
    size: usize,
    rank: usize,
    listener: &TcpListener,
    addrs: &[SocketAddr],
    key: &[u8; 32],
    info: &IdInfo,
    config: &Config,
    deadline: Instant,
) -> Result<Vec<((Endpoint, TcpStream), SessionKeys)>> {
    let mut conns = Vec::new();
    // Connect to every lower rank; they accept in turn, so this cannot deadlock.
    for (peer, &addr) in addrs.iter().enumerate().take(rank) {
        for stream_index in 0..streams_between(rank, peer, size, config.streams) {
            let what = format!("rank {rank}: connection {stream_index} to rank {peer} at {addr}");
            let mut s = connect_with_retry(addr, deadline, &what)?;
            let body = BodyWriter::default()
                .bytes(&info.job)
                .u32(rank as u32)
                .u32(stream_index as u32)
                .finish();
            let (_, keys) = FrameIo {
                stream: &mut s,
                deadline,
                what,
            }
            .client_handshake_keys(key, &body)?;
            conns.push(((Endpoint::Rank(peer), s), keys));
        }
    }
    let expected: usize = (rank + 1..size)
        .map(|p| streams_between(rank, p, size, config.streams))
        .sum();
    let mut seen: HashMap<(usize, usize), ()> = HashMap::new();
    let what = format!("rank {rank}: data listener");
    let mut inbound = Inbound::new(*key, what.clone());
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io(&what, e))?;
    let mut ready = Vec::new();
    while seen.len() < expected {
        if ready.is_empty() {
            if Instant::now() >= deadline {
                return Err(Error::timeout(format!(
                    "rank {rank}: waiting for connections from higher ranks: timed out \
                     ({} of {expected} connections arrived)",
                    seen.len()
                )));
            }
            ready = inbound.poll(listener, deadline);
            if ready.is_empty() {
                std::thread::sleep(ACCEPT_POLL);
            }
            continue;
        }
        let Authenticated {
            stream: mut s,
            body,
            ns,
            nc,
            ..
        } = ready.remove(0);
        let mut io = FrameIo {
            stream: &mut s,
            deadline: Instant::now() + ANSWER_DEADLINE,
            what: format!("rank {rank}: incoming connection"),
        };
        let mut r = BodyReader::new(&body, "mesh hello");
        let (job, peer, idx) = (r.bytes()?.to_vec(), r.u32()? as usize, r.u32()? as usize);
        if job != info.job
            || peer <= rank
            || peer >= size
            || idx >= streams_between(rank, peer, size, config.streams)
            || seen.contains_key(&(peer, idx))
        {
            io.reject(ErrorKind::InvalidArgument, "unexpected mesh connection");
            log::warn!(
                "rank {rank}: rejected unexpected mesh connection (rank {peer}, stream {idx})"
            );
            continue;
        }
        io.welcome(key, &ns, &nc, &[])?;
        seen.insert((peer, idx), ());
        conns.push((
            (Endpoint::Rank(peer), s),
            SessionKeys::derive(key, &ns, &nc, true),
        ));
    }
    Ok(conns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_ip_names_the_loopback_address() {
        assert_eq!(interface_ip("lo").unwrap(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn interface_ip_refuses_an_unknown_interface() {
        let e = interface_ip("no-such-if0").unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(
            e.message
                .contains("MR_IFNAME=no-such-if0: no such interface"),
            "{}",
            e.message
        );
    }
}

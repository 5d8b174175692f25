//! Configuration from `MR_*` environment variables (DESIGN §4), overridable in code.

use crate::error::{Error, Result};
use std::net::SocketAddr;
use std::time::Duration;

/// Which data path collectives take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    /// Relays when configured and the message is large enough to gain, else the ring.
    Auto,
    Ring,
    Relay,
}

/// Default pipeline chunk: large enough that per-frame costs vanish, small enough that
/// receive, reduce and send overlap well within one op.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// Default chunk of relay ops. A relay answers a chunk only once every peer's copy of it has
/// arrived, and small chunks keep the peers' streams in step: on a shaped 200 Mbit/s network
/// (`bench/netns.sh -R 200`, 4 peers, 4 relays) a 256 MiB all-reduce reached 79% of its bound
/// with 1 MiB chunks, 89% with 256 KiB and 94% with 64 KiB. Long links want more bytes in
/// flight (`MR_CHUNK_BYTES` × 4 per relay): setting `MR_CHUNK_BYTES` sets this too.
pub const DEFAULT_RELAY_CHUNK_BYTES: usize = 64 << 10;
/// Default TCP connections per neighbour link.
pub const DEFAULT_STREAMS: usize = 2;
/// Below this many bytes all-reduce uses recursive doubling instead of the ring.
pub const DEFAULT_SMALL_BYTES: usize = 64 << 10;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(300_000);

/// Communicator configuration. [`Config::from_env`] reads the `MR_*` variables.
#[derive(Clone, Debug)]
pub struct Config {
    pub algo: Algo,
    /// Static relays (`MR_RELAYS`).
    pub relays: Vec<String>,
    /// Validator that assigns relays (`MR_VALIDATOR`).
    pub validator: Option<String>,
    /// The job's secret (`MR_TOKEN`, hex). Jobs joined from the environment authenticate the
    /// bootstrap and rank links with it; every job derives its static relays' tokens from it
    /// ([`crate::wire::relay_token`]). Never sent to a relay.
    pub token: Option<Vec<u8>>,
    /// A token a validator issued for the relays it assigned (used as is, for each of them).
    pub granted_token: Option<Vec<u8>>,
    /// How long any op may wait for a remote before failing (`MR_TIMEOUT_MS`).
    pub timeout: Duration,
    /// Pipeline chunk size in bytes (`MR_CHUNK_BYTES`).
    pub chunk_bytes: usize,
    /// Chunk size of relay ops (`MR_CHUNK_BYTES` when set, else
    /// [`DEFAULT_RELAY_CHUNK_BYTES`]).
    pub relay_chunk_bytes: usize,
    /// TCP connections per neighbour link (`MR_STREAMS`).
    pub streams: usize,
    /// All-reduce messages below this many bytes take the latency-optimised path.
    pub small_bytes: usize,
    /// Local address to bind and advertise (`MR_BIND_ADDR`).
    pub bind_addr: Option<std::net::IpAddr>,
    /// Interface whose address to bind and advertise (`MR_IFNAME`).
    pub ifname: Option<String>,
    /// Peers check relay results among themselves (`MR_VERIFY=1`).
    pub verify: bool,
    /// Use a shared-memory segment when every rank runs on this host (`MR_SHM_DISABLE=1`
    /// turns it off).
    pub shm: bool,
    /// Wire format of float all-reduces over the ring (`MR_COMPRESS`).
    pub compress: crate::compress::Compression,
    /// Ranks with equal values count as one host (`MR_HOST_ID`); `None`: the kernel's boot id
    /// and network namespace decide.
    pub host_id: Option<String>,
    /// Collectives may use the host level of the layout (`MR_HIERARCHY`, default on).
    pub hierarchy: bool,
    /// Most bytes per second this rank sends, over all its connections (`MR_MAX_RATE`, e.g.
    /// `125M` or `1gbit`); `None`: no cap.
    pub max_rate: Option<u64>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            algo: Algo::Auto,
            relays: Vec::new(),
            validator: None,
            token: None,
            granted_token: None,
            timeout: DEFAULT_TIMEOUT,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            relay_chunk_bytes: DEFAULT_RELAY_CHUNK_BYTES,
            streams: DEFAULT_STREAMS,
            small_bytes: DEFAULT_SMALL_BYTES,
            bind_addr: None,
            ifname: None,
            verify: false,
            shm: true,
            compress: crate::compress::Compression::None,
            host_id: None,
            hierarchy: true,
            max_rate: None,
        }
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parse_num<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value
        .trim()
        .parse()
        .map_err(|_| Error::invalid(format!("{name}={value:?} is not a valid number")))
}

/// Decode a hex string (even length, 0-9a-fA-F).
pub fn parse_hex(what: &str, s: &str) -> Result<Vec<u8>> {
    let s = s.trim();
    if s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid(format!(
            "{what} must be an even number of hex digits"
        )));
    }
    Ok((0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("checked hex"))
        .collect())
}

/// Encode bytes as lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Config {
    /// Read every `MR_*` variable; unset ones keep their defaults. Malformed values are errors.
    pub fn from_env() -> Result<Config> {
        let mut c = Config::default();
        if let Some(v) = var("MR_ALGO") {
            c.algo = match v.trim().to_ascii_lowercase().as_str() {
                "auto" => Algo::Auto,
                "ring" => Algo::Ring,
                "relay" => Algo::Relay,
                other => {
                    return Err(Error::invalid(format!(
                        "MR_ALGO={other:?}: expected auto, ring or relay"
                    )))
                }
            };
        }
        if let Some(v) = var("MR_RELAYS") {
            c.relays = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
        }
        c.validator = var("MR_VALIDATOR");
        if let Some(v) = var("MR_TOKEN") {
            c.token = Some(parse_hex("MR_TOKEN", &v)?);
        }
        if let Some(v) = var("MR_TIMEOUT_MS") {
            let ms: u64 = parse_num("MR_TIMEOUT_MS", &v)?;
            if ms == 0 {
                return Err(Error::invalid("MR_TIMEOUT_MS must be positive"));
            }
            c.timeout = Duration::from_millis(ms);
        }
        if let Some(v) = var("MR_CHUNK_BYTES") {
            c.chunk_bytes = parse_num("MR_CHUNK_BYTES", &v)?;
            c.relay_chunk_bytes = c.chunk_bytes;
        }
        if let Some(v) = var("MR_STREAMS") {
            c.streams = parse_num("MR_STREAMS", &v)?;
        }
        if let Some(v) = var("MR_SMALL_BYTES") {
            c.small_bytes = parse_num("MR_SMALL_BYTES", &v)?;
        }
        if let Some(v) = var("MR_BIND_ADDR") {
            c.bind_addr =
                Some(v.trim().parse().map_err(|_| {
                    Error::invalid(format!("MR_BIND_ADDR={v:?} is not an IP address"))
                })?);
        }
        c.ifname = var("MR_IFNAME");
        c.verify = matches!(var("MR_VERIFY").as_deref(), Some("1") | Some("true"));
        c.shm = !matches!(var("MR_SHM_DISABLE").as_deref(), Some("1") | Some("true"));
        c.host_id = var("MR_HOST_ID").filter(|v| !v.trim().is_empty());
        c.hierarchy = !matches!(var("MR_HIERARCHY").as_deref().map(str::trim), Some("0"));
        if let Some(v) = var("MR_MAX_RATE") {
            c.max_rate = Some(crate::pace::parse_rate(&v).ok_or_else(|| {
                Error::invalid(format!(
                    "MR_MAX_RATE={v:?}: expected bytes per second, e.g. 125000000, 125M or 1gbit"
                ))
            })?);
        }
        if let Some(v) = var("MR_COMPRESS") {
            c.compress =
                crate::compress::Compression::parse(&v).map_err(|e| e.context("MR_COMPRESS"))?;
        }
        c.validate()?;
        Ok(c)
    }

    /// Check ranges; called by `from_env` and by communicator init.
    pub fn validate(&self) -> Result<()> {
        for chunk in [self.chunk_bytes, self.relay_chunk_bytes] {
            if !(64..=crate::wire::MAX_PAYLOAD).contains(&chunk) {
                return Err(Error::invalid(format!(
                    "chunk size {chunk} bytes is outside 64..={} bytes",
                    crate::wire::MAX_PAYLOAD
                )));
            }
        }
        if !(1..=64).contains(&self.streams) {
            return Err(Error::invalid(format!(
                "stream count {} is outside 1..=64",
                self.streams
            )));
        }
        if self.algo == Algo::Relay && self.relays.is_empty() && self.validator.is_none() {
            return Err(Error::invalid(
                "MR_ALGO=relay needs MR_RELAYS or MR_VALIDATOR",
            ));
        }
        Ok(())
    }

    /// Parse `MR_RELAYS`-style entries into socket addresses (host names resolved).
    pub fn relay_addrs(&self) -> Result<Vec<SocketAddr>> {
        self.relays.iter().map(|r| resolve(r)).collect()
    }
}

/// Resolve `host:port` to the first address it names.
pub fn resolve(s: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| Error::invalid(format!("cannot resolve {s:?}: {e}")))?
        .next()
        .ok_or_else(|| Error::invalid(format!("{s:?} resolves to no address")))
}

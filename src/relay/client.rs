//! Peer side of the relay protocol: connect `MR_STREAMS` authenticated streams to each relay of
//! `MR_RELAYS` and hand them to the engine as [`Endpoint::Relay`] connections.

use crate::algo::relay::max_window;
use crate::algo::Endpoint;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::net::bootstrap::{FrameIo, Mesh};
use crate::relay::JobHello;
use crate::wire::{self, SessionKeys};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// How long to keep retrying a refused connection to a relay before skipping it.
const CONNECT_RETRY: Duration = Duration::from_secs(1);

/// The key peers prove to relay `name` (as written in `MR_RELAYS`): the validator's token for
/// assigned relays, else the relay's own token derived from the job secret.
pub fn relay_key(config: &Config, name: &str) -> Result<[u8; 32]> {
    if let Some(t) = &config.granted_token {
        return Ok(wire::mac_key(t));
    }
    let secret = config.token.as_ref().ok_or_else(|| {
        Error::invalid("relays are configured (MR_RELAYS) but no job secret (MR_TOKEN) is set")
    })?;
    Ok(wire::mac_key(&wire::relay_token(secret, name)))
}

/// Connect to every relay in `config.relays`, appending the streams to `mesh.conns`. Returns,
/// per relay, whether it is connected. An unreachable relay is skipped with a warning; a
/// relay that refuses the job token fails the whole call with [`ErrorKind::Auth`].
pub fn attach(mesh: &mut Mesh, config: &Config) -> Result<Vec<bool>> {
    let mut connected = Vec::with_capacity(config.relays.len());
    for (i, name) in config.relays.iter().enumerate() {
        let key = relay_key(config, name)?;
        let addr = match crate::config::resolve(name) {
            Ok(a) => a,
            Err(e) => {
                log::warn!("rank {}: skipping relay {i}: {e}", mesh.rank);
                connected.push(false);
                continue;
            }
        };
        match connect_relay(mesh, config, &key, addr) {
            Ok(streams) => {
                log::debug!(
                    "rank {}: connected {} streams to relay {i} at {addr}",
                    mesh.rank,
                    streams.len()
                );
                for (s, keys) in streams {
                    mesh.conns.push((Endpoint::Relay(i), s));
                    mesh.keys.push(keys);
                }
                connected.push(true);
            }
            Err(e) if e.kind == ErrorKind::Auth => {
                return Err(e.context(format!("relay {i} at {addr}")));
            }
            Err(e) => {
                log::warn!("rank {}: skipping relay {i} at {addr}: {e}", mesh.rank);
                connected.push(false);
            }
        }
    }
    Ok(connected)
}

fn connect_relay(
    mesh: &Mesh,
    config: &Config,
    key: &[u8; 32],
    addr: SocketAddr,
) -> Result<Vec<(TcpStream, SessionKeys)>> {
    let deadline = Instant::now() + config.timeout.min(Duration::from_secs(10));
    let mut streams = Vec::with_capacity(config.streams);
    for stream in 0..config.streams {
        let what = format!("rank {}: relay connection {stream} to {addr}", mesh.rank);
        let mut s = connect(addr, config.timeout, &what)?;
        let body = JobHello {
            job: mesh.job,
            rank: mesh.rank,
            world: mesh.size,
            stream,
            streams: config.streams,
            chunk_bytes: config.relay_chunk_bytes,
            window: max_window(config.relay_chunk_bytes),
        }
        .encode();
        let (_, keys) = FrameIo {
            stream: &mut s,
            deadline,
            what,
        }
        .client_handshake_keys(key, &body)?;
        streams.push((s, keys));
    }
    Ok(streams)
}

fn connect(addr: SocketAddr, timeout: Duration, what: &str) -> Result<TcpStream> {
    let start = Instant::now();
    loop {
        match TcpStream::connect_timeout(&addr, timeout.min(Duration::from_secs(5))) {
            Ok(s) => return Ok(s),
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && start.elapsed() < CONNECT_RETRY =>
            {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(Error::io(format!("{what}: connect"), e)),
        }
    }
}

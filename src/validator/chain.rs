//! The subnet's word on who may serve and who may ask: a JSON file written by the chain layer
//! (the `mapreduce_subnet` validator syncs the metagraph and rewrites it every epoch) and read
//! by `mr-validator --chain FILE`.
//!
//! ```json
//! {"netuid": 10, "block": 1234,
//!  "relays":  [{"id": "<hotkey public key, hex>", "addr": "203.0.113.7:7000", "uid": 3}],
//!  "clients": ["<hotkey public key, hex>", ...]}
//! ```
//!
//! With a chain file, a relay is assigned (to jobs and to the benchmark bots) only when its id
//! is a hotkey registered on the subnet, the address it registered with is the one served on
//! the chain for that hotkey, and it proved its key at that address; a client is admitted when
//! its key is a hotkey registered on the subnet or is in `clients` of validator.config.json.
//! Until the file has been read once, no relay is eligible. No I/O here beyond reading the file.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Largest chain file read (a subnet has at most a few thousand neurons).
pub const MAX_CHAIN_FILE: u64 = 16 << 20;

#[derive(Deserialize)]
struct RelayRow {
    id: String,
    addr: String,
    #[serde(default)]
    uid: Option<u64>,
}

#[derive(Deserialize)]
struct FileBody {
    #[serde(default)]
    netuid: Option<u64>,
    #[serde(default)]
    block: Option<u64>,
    #[serde(default)]
    relays: Vec<RelayRow>,
    #[serde(default)]
    clients: Vec<String>,
}

/// One reading of the chain file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChainView {
    pub netuid: Option<u64>,
    pub block: Option<u64>,
    /// Relay id (hex public key) → the address served on the chain for it.
    pub relays: HashMap<String, String>,
    /// Relay id → uid.
    pub uids: HashMap<String, u64>,
    /// Registered hotkeys (public keys) admitted as clients.
    pub clients: HashSet<[u8; 32]>,
}

impl ChainView {
    /// Parse a chain file's contents; `what` names it in errors.
    pub fn parse(text: &[u8], what: &str) -> Result<ChainView> {
        let body: FileBody = serde_json::from_slice(text)
            .map_err(|e| Error::invalid(format!("chain file {what}: {e}")))?;
        let mut view = ChainView {
            netuid: body.netuid,
            block: body.block,
            ..ChainView::default()
        };
        for r in body.relays {
            let key = crate::validator::identity::parse_public(
                &format!("chain file {what}: relay id"),
                &r.id,
            )?;
            let id = crate::validator::registry::relay_id(&key);
            if let Some(uid) = r.uid {
                view.uids.insert(id.clone(), uid);
            }
            view.relays.insert(id, r.addr.trim().to_string());
        }
        for c in body.clients {
            view.clients
                .insert(crate::validator::identity::parse_public(
                    &format!("chain file {what}: client key"),
                    &c,
                )?);
        }
        Ok(view)
    }

    /// Why relay `id`, registered at `addr`, may not be assigned; `None` when it may.
    pub fn refuse_relay(&self, id: &str, addr: &str) -> Option<String> {
        match self.relays.get(id) {
            None => Some(format!(
                "relay {id} is not a hotkey with a served address on subnet {}",
                self.subnet()
            )),
            Some(served) if !same_endpoint(served, addr) => Some(format!(
                "relay {id} registered at {addr} but its hotkey serves {served} on subnet {}",
                self.subnet()
            )),
            Some(_) => None,
        }
    }

    /// The subnet's number as text, for messages.
    pub fn subnet(&self) -> String {
        self.netuid.map_or_else(|| "?".into(), |n| n.to_string())
    }
}

/// Whether two `host:port` strings name the same endpoint (IPs compared as addresses).
pub fn same_endpoint(a: &str, b: &str) -> bool {
    match (
        a.parse::<std::net::SocketAddr>(),
        b.parse::<std::net::SocketAddr>(),
    ) {
        (Ok(x), Ok(y)) => x == y,
        _ => a.eq_ignore_ascii_case(b),
    }
}

/// The chain file and the last good reading of it.
pub struct ChainFile {
    path: PathBuf,
    stamp: Option<(SystemTime, u64)>,
    view: Option<ChainView>,
}

impl ChainFile {
    pub fn new(path: PathBuf) -> ChainFile {
        ChainFile {
            path,
            stamp: None,
            view: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last good reading, if any.
    pub fn view(&self) -> Option<&ChainView> {
        self.view.as_ref()
    }

    /// Read the file again if it changed (modification time or size). `Ok(true)` when a new
    /// view was taken; a file that cannot be read or parsed leaves the last good view in place
    /// and is reported as the error.
    pub fn refresh(&mut self) -> Result<bool> {
        let what = self.path.display().to_string();
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.view.is_none() => {
                return Ok(false)
            }
            Err(e) => return Err(Error::io(format!("chain file {what}"), e)),
        };
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        if self.stamp == Some(stamp) {
            return Ok(false);
        }
        if meta.len() > MAX_CHAIN_FILE {
            self.stamp = Some(stamp);
            return Err(Error::invalid(format!(
                "chain file {what} holds {} bytes, more than the {MAX_CHAIN_FILE} read",
                meta.len()
            )));
        }
        let text =
            std::fs::read(&self.path).map_err(|e| Error::io(format!("chain file {what}"), e))?;
        self.stamp = Some(stamp);
        let view = ChainView::parse(&text, &what)?;
        let changed = self.view.as_ref() != Some(&view);
        self.view = Some(view);
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: u8) -> String {
        crate::config::to_hex(&[b; 32])
    }

    #[test]
    fn a_relay_is_refused_unless_registered_at_its_served_address() {
        let text = format!(
            r#"{{"netuid": 7, "relays": [{{"id": "{}", "addr": "127.0.0.2:7000", "uid": 4}}],
                "clients": ["{}"]}}"#,
            hex(1),
            hex(9)
        );
        let v = ChainView::parse(text.as_bytes(), "t").unwrap();
        assert_eq!(v.refuse_relay(&hex(1), "127.0.0.2:7000"), None);
        let moved = v.refuse_relay(&hex(1), "127.0.0.3:7000").unwrap();
        assert!(moved.contains("serves 127.0.0.2:7000"), "{moved}");
        let unknown = v.refuse_relay(&hex(2), "127.0.0.2:7000").unwrap();
        assert!(unknown.contains("not a hotkey"), "{unknown}");
        assert!(v.clients.contains(&[9; 32]));
        assert_eq!(v.uids[&hex(1)], 4);
    }

    #[test]
    fn bad_files_are_errors_that_keep_the_last_good_view() {
        let dir = std::env::temp_dir().join(format!("mr-chain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chain.json");
        let mut f = ChainFile::new(path.clone());
        assert!(
            !f.refresh().unwrap(),
            "a missing file before the first read is no view"
        );
        std::fs::write(&path, format!(r#"{{"clients": ["{}"]}}"#, hex(3))).unwrap();
        assert!(f.refresh().unwrap());
        std::fs::write(&path, r#"{"clients": ["zz"]}"#).unwrap();
        let e = f.refresh().unwrap_err().to_string();
        assert!(e.contains("chain file"), "{e}");
        assert!(f.view().unwrap().clients.contains(&[3; 32]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn endpoints_compare_as_addresses() {
        assert!(same_endpoint("127.0.0.1:80", "127.0.0.1:80"));
        assert!(!same_endpoint("127.0.0.1:80", "127.0.0.1:81"));
        assert!(same_endpoint("[::1]:80", "[0:0::1]:80"));
        assert!(same_endpoint("Relay.example:80", "relay.example:80"));
    }
}

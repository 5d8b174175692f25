//! Checking a relay's advertised address: connect to it as a peer would and ask the relay to
//! sign a fresh nonce with its identity key ([`crate::relay::registration::PROOF_REQUEST`]).
//! A relay is assigned only after this succeeds, so an address it does not serve, or one
//! served by somebody else, never reaches a job.

use crate::error::{Error, Result};
use crate::net::bootstrap::FrameIo;
use crate::relay::registration::{proof_message, PROOF_REQUEST};
use crate::validator::identity;
use crate::wire::{FrameHeader, FrameKind, Hello};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Ask the relay at `addr` to prove `key`; `Ok` when it did.
pub fn prove_address(addr: &str, key: &[u8; 32], timeout: Duration) -> Result<()> {
    let what = format!("address check of relay at {addr}");
    let sa = crate::config::resolve(addr)?;
    let mut s = TcpStream::connect_timeout(&sa, timeout)
        .map_err(|e| Error::io(format!("{what}: connect"), e))?;
    let mut io = FrameIo {
        stream: &mut s,
        deadline: Instant::now() + timeout,
        what: what.clone(),
    };
    let (_, ns) = io.expect(FrameKind::Challenge)?;
    let ns: [u8; 32] = ns
        .try_into()
        .map_err(|_| Error::remote(format!("{what}: malformed challenge")))?;
    let asker = crate::wire::nonce();
    let body = [PROOF_REQUEST, &asker[..]].concat();
    // The MAC proves nothing here (the relay does not check it for a proof request); the
    // signature that comes back does.
    let hello = Hello::sign(&crate::wire::mac_key(PROOF_REQUEST), &ns, &body).encode();
    io.send(FrameHeader::new(FrameKind::Hello, hello.len()), &hello)?;
    let (_, p) = io.expect(FrameKind::Welcome)?;
    if p.len() != identity::PUBLIC_LEN + identity::SIGNATURE_LEN {
        return Err(Error::auth(format!("{what}: no key proof in the answer")));
    }
    let (public, sig) = p.split_at(identity::PUBLIC_LEN);
    if public != key {
        return Err(Error::auth(format!(
            "{what}: served by relay {}, not {}",
            crate::config::to_hex(public),
            crate::config::to_hex(key)
        )));
    }
    if !identity::verify(key, &proof_message(&asker, &ns), sig) {
        return Err(Error::auth(format!(
            "{what}: the key proof does not verify"
        )));
    }
    Ok(())
}

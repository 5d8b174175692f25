//! The validator's secure channel: a handshake that authenticates both ends and agrees on a
//! session key, then sealed control messages.
//!
//! Handshake (frames of [`crate::wire`]):
//! 1. validator → connector: `Challenge` = `ns` (32-byte nonce) ‖ `VE` (ephemeral Ristretto
//!    point) ‖ `V` (the validator's sr25519 public key);
//! 2. connector → validator: `Hello` = intro (JSON [`Intro`]) ‖ `CE` (ephemeral point) ‖ `nc` ‖
//!    the connector's public key (relays and clients; empty otherwise) ‖ proof, where the
//!    transcript `T = blake3(ns, VE, V, CE, nc, key, intro)` and the proof is the connector's
//!    signature of `T` (relays, clients), or a keyed-blake3 MAC of `T` under the job's
//!    verification secret (reports), or nothing (status);
//! 3. both derive `k = blake3::derive_key("mapreduce validator session v2",
//!    DH(ce, VE) ‖ T ‖ psk)` (psk: the verification secret for reports, zeros otherwise) and one
//!    ChaCha20-Poly1305 key per direction from it;
//! 4. validator → connector: `Welcome` = sealed(the validator's signature of `T`), so the
//!    connector knows whom it talks to (and can pin `V`).
//!
//! Every later message is one or more `Control` frames (a leading byte says whether more of the
//! message follows; at most [`MAX_MESSAGE`] bytes in all), each sealed with the sender's
//! direction key and a per-direction sequence number as nonce: encrypted, authenticated, and
//! impossible to replay, reorder, truncate or move to another connection. A frame that fails to open ends the
//! connection. Secrets (job tokens, verification secrets) only ever travel inside sealed frames.
//!
//! Never does: send a secret in a frame that is not sealed, or accept a message that is not.

use crate::error::{Error, ErrorKind, Result};
use crate::net::bootstrap::FrameIo;
use crate::validator::identity::{self, Identity, PUBLIC_LEN, SIGNATURE_LEN};
use crate::wire::{BodyReader, BodyWriter, FrameHeader, FrameKind};
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::Scalar;
use serde::{de::DeserializeOwned, Serialize};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Bytes the seal adds to a frame.
pub const TAG_LEN: usize = 16;
/// Message bytes per sealed frame (one byte of each frame says whether more follow).
const FRAGMENT: usize = crate::wire::MAX_CONTROL_PAYLOAD - TAG_LEN - 1;
/// Largest message, bytes (reports with chunk evidence span several frames).
pub const MAX_MESSAGE: usize = 16 << 20;

/// What a connector proves.
#[derive(Clone, Copy)]
pub enum Credential<'a> {
    /// Its identity (relays, clients).
    Identity(&'a Identity),
    /// Knowledge of a job's verification secret (reports).
    Secret(&'a [u8; 32]),
    /// Nothing (status queries).
    None,
}

fn ephemeral() -> (Scalar, [u8; 32]) {
    let mut wide = [0u8; 64];
    getrandom::getrandom(&mut wide).expect("OS randomness");
    let s = Scalar::from_bytes_mod_order_wide(&wide);
    let p = RistrettoPoint::mul_base(&s).compress().to_bytes();
    (s, p)
}

fn shared(s: &Scalar, point: &[u8]) -> Result<[u8; 32]> {
    let p = CompressedRistretto::from_slice(point)
        .ok()
        .and_then(|c| c.decompress())
        .ok_or_else(|| Error::auth("handshake: malformed ephemeral key"))?;
    Ok((s * p).compress().to_bytes())
}

#[allow(clippy::too_many_arguments)]
fn transcript(
    ns: &[u8],
    ve: &[u8],
    v: &[u8],
    ce: &[u8],
    nc: &[u8],
    key: &[u8],
    intro: &[u8],
) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("mapreduce validator handshake v2");
    for part in [ns, ve, v, ce, nc, key, intro] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    *h.finalize().as_bytes()
}

fn psk_mac(secret: &[u8; 32], t: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(secret);
    h.update(b"mapreduce report proof v2");
    h.update(t);
    *h.finalize().as_bytes()
}

/// (connector → validator, validator → connector) keys.
fn session_keys(dh: &[u8; 32], t: &[u8; 32], psk: Option<&[u8; 32]>) -> ([u8; 32], [u8; 32]) {
    let mut h = blake3::Hasher::new_derive_key("mapreduce validator session v2");
    h.update(dh);
    h.update(t);
    h.update(psk.unwrap_or(&[0u8; 32]));
    let k = h.finalize();
    (
        *blake3::keyed_hash(k.as_bytes(), b"connector to validator").as_bytes(),
        *blake3::keyed_hash(k.as_bytes(), b"validator to connector").as_bytes(),
    )
}

/// One direction of a channel.
struct Seal {
    cipher: ChaCha20Poly1305,
    seq: u64,
}

impl Seal {
    fn new(key: &[u8; 32]) -> Seal {
        Seal {
            cipher: ChaCha20Poly1305::new(key.into()),
            seq: 0,
        }
    }

    fn nonce(&mut self) -> Nonce {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&self.seq.to_le_bytes());
        self.seq += 1;
        n.into()
    }

    fn seal(&mut self, msg: &[u8]) -> Vec<u8> {
        let n = self.nonce();
        self.cipher.encrypt(&n, msg).expect("sealing cannot fail")
    }

    fn open(&mut self, sealed: &[u8], what: &str) -> Result<Vec<u8>> {
        let n = self.nonce();
        self.cipher.decrypt(&n, sealed).map_err(|_| {
            Error::auth(format!(
                "{what}: a message failed authentication (tampered, replayed or reordered)"
            ))
        })
    }
}

/// Sending half of a channel.
pub struct ChannelWriter {
    stream: TcpStream,
    seal: Seal,
    pub what: String,
}

/// Receiving half of a channel.
pub struct ChannelReader {
    stream: TcpStream,
    opener: Opener,
    pub what: String,
}

/// Opens a channel's sealed frames in order and joins them into messages; no I/O, so a
/// blocking reader and the validator's event loop share it.
pub struct Opener {
    open: Seal,
    body: Vec<u8>,
    what: String,
    /// Largest message taken ([`MAX_MESSAGE`] unless lowered).
    limit: usize,
}

impl Opener {
    /// Take the payload of one `Control` frame; the whole message once its last fragment is in.
    pub fn frame(&mut self, sealed: &[u8]) -> Result<Option<Vec<u8>>> {
        let frame = self.open.open(sealed, &self.what)?;
        let (&more, part) = frame
            .split_first()
            .ok_or_else(|| Error::remote(format!("{}: empty frame", self.what)))?;
        if self.body.len() + part.len() > self.limit {
            return Err(Error::remote(format!(
                "{}: a message over the {} byte limit",
                self.what, self.limit
            )));
        }
        self.body.extend_from_slice(part);
        Ok((more == 0).then(|| std::mem::take(&mut self.body)))
    }

    pub fn what(&self) -> &str {
        &self.what
    }

    /// Bytes of the message being put together (fragments in, the last one not yet).
    pub fn assembling(&self) -> usize {
        self.body.len()
    }

    /// Take messages of at most `bytes` from now on (sessions whose messages are small, so a
    /// peer cannot make this assemble megabytes).
    pub fn limit_to(&mut self, bytes: usize) {
        self.limit = bytes.min(MAX_MESSAGE);
    }
}

impl ChannelWriter {
    pub fn send<T: Serialize>(&mut self, v: &T, timeout: Duration) -> Result<()> {
        let body = serde_json::to_vec(v).map_err(|e| Error::internal(format!("encoding: {e}")))?;
        if body.len() > MAX_MESSAGE {
            return Err(Error::internal(format!(
                "{}: a {} byte message exceeds the {MAX_MESSAGE} byte limit",
                self.what,
                body.len()
            )));
        }
        let deadline = Instant::now() + timeout;
        // JSON is never empty, so a message is at least one frame.
        let parts: Vec<&[u8]> = body.chunks(FRAGMENT).collect();
        for (i, part) in parts.iter().enumerate() {
            let mut frame = Vec::with_capacity(part.len() + 1);
            frame.push(u8::from(i + 1 < parts.len()));
            frame.extend_from_slice(part);
            let sealed = self.seal.seal(&frame);
            FrameIo {
                stream: &mut self.stream,
                deadline,
                what: self.what.clone(),
            }
            .send(FrameHeader::new(FrameKind::Control, sealed.len()), &sealed)?;
        }
        Ok(())
    }

    /// Close both directions (wakes a reader blocked on the other half).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

impl ChannelReader {
    pub fn recv<T: DeserializeOwned>(&mut self, timeout: Duration) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, sealed) = FrameIo {
                stream: &mut self.stream,
                deadline,
                what: self.what.clone(),
            }
            .expect(FrameKind::Control)?;
            if let Some(body) = self.opener.frame(&sealed)? {
                return crate::validator::proto::parse(&body, &self.what);
            }
        }
    }

    /// The connection and the opener, for reading without blocking elsewhere.
    pub fn into_parts(self) -> (TcpStream, Opener) {
        (self.stream, self.opener)
    }
}

/// Both halves of an authenticated connection.
pub struct Channel {
    pub reader: ChannelReader,
    pub writer: ChannelWriter,
    /// The other end's identity (its public key), when it proved one.
    pub peer_key: Option<[u8; PUBLIC_LEN]>,
}

impl Channel {
    fn new(
        stream: TcpStream,
        send: &[u8; 32],
        recv: &[u8; 32],
        what: String,
        peer_key: Option<[u8; PUBLIC_LEN]>,
    ) -> Result<Channel> {
        let other = stream
            .try_clone()
            .map_err(|e| Error::io(format!("{what}: cloning the connection"), e))?;
        Ok(Channel {
            reader: ChannelReader {
                stream: other,
                opener: Opener {
                    open: Seal::new(recv),
                    body: Vec::new(),
                    what: what.clone(),
                    limit: MAX_MESSAGE,
                },
                what: what.clone(),
            },
            writer: ChannelWriter {
                stream,
                seal: Seal::new(send),
                what,
            },
            peer_key,
        })
    }

    pub fn send<T: Serialize>(&mut self, v: &T, timeout: Duration) -> Result<()> {
        self.writer.send(v, timeout)
    }

    pub fn recv<T: DeserializeOwned>(&mut self, timeout: Duration) -> Result<T> {
        self.reader.recv(timeout)
    }
}

/// Connect to the validator at `addr` as `intro`, proving `cred`; with `validator_key`, the
/// validator must prove that identity.
pub fn connect<I: Serialize>(
    addr: &str,
    intro: &I,
    cred: Credential<'_>,
    validator_key: Option<&[u8; PUBLIC_LEN]>,
    timeout: Duration,
) -> Result<Channel> {
    connect_from(addr, None, intro, cred, validator_key, timeout)
}

/// [`connect`] from local address `bind` (any port).
pub fn connect_from<I: Serialize>(
    addr: &str,
    bind: Option<std::net::IpAddr>,
    intro: &I,
    cred: Credential<'_>,
    validator_key: Option<&[u8; PUBLIC_LEN]>,
    timeout: Duration,
) -> Result<Channel> {
    let timeout = timeout.min(Duration::from_secs(10));
    let sa = crate::config::resolve(addr)?;
    let mut stream = tcp_connect(sa, bind, timeout)
        .map_err(|e| Error::io(format!("cannot connect to the validator at {addr}"), e))?;
    let _ = stream.set_nodelay(true);
    let what = format!("validator {addr}");
    let mut io = FrameIo {
        stream: &mut stream,
        deadline: Instant::now() + timeout,
        what: what.clone(),
    };
    let (_, ch) = io.expect(FrameKind::Challenge)?;
    if ch.len() != 96 {
        return Err(Error::remote(format!(
            "{what}: malformed challenge ({} bytes; an older validator?)",
            ch.len()
        )));
    }
    let (ns, ve, v) = (&ch[..32], &ch[32..64], &ch[64..96]);
    if let Some(want) = validator_key {
        if want[..] != *v {
            return Err(Error::auth(format!(
                "{what}: the validator's key is {}, expected {}",
                crate::config::to_hex(v),
                crate::config::to_hex(want)
            )));
        }
    }
    let (ce_secret, ce) = ephemeral();
    let nc = crate::wire::nonce();
    let intro = serde_json::to_vec(intro).expect("json");
    let key: Vec<u8> = match &cred {
        Credential::Identity(id) => id.public().to_vec(),
        _ => Vec::new(),
    };
    let t = transcript(ns, ve, v, &ce, &nc, &key, &intro);
    let (proof, psk): (Vec<u8>, Option<&[u8; 32]>) = match cred {
        Credential::Identity(id) => (id.sign(&t).to_vec(), None),
        Credential::Secret(s) => (psk_mac(s, &t).to_vec(), Some(s)),
        Credential::None => (Vec::new(), None),
    };
    let hello = BodyWriter::default()
        .bytes(&intro)
        .bytes(&ce)
        .bytes(&nc)
        .bytes(&key)
        .bytes(&proof)
        .finish();
    io.send(FrameHeader::new(FrameKind::Hello, hello.len()), &hello)?;
    let (_, welcome) = io.expect(FrameKind::Welcome)?;
    let (c2v, v2c) = session_keys(&shared(&ce_secret, ve)?, &t, psk);
    let sig = Seal::new(&v2c).open(&welcome, &what)?;
    if sig.len() != SIGNATURE_LEN || !identity::verify(v, &t, &sig) {
        return Err(Error::auth(format!(
            "{what}: the validator did not prove its key"
        )));
    }
    let mut ch = Channel::new(stream, &c2v, &v2c, what, Some(v.try_into().expect("32")))?;
    // The welcome used sequence number 0 of the validator's direction.
    ch.reader.opener.open.seq = 1;
    Ok(ch)
}

fn tcp_connect(
    to: std::net::SocketAddr,
    bind: Option<std::net::IpAddr>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let Some(ip) = bind.filter(|ip| !ip.is_unspecified() && ip.is_ipv4() == to.is_ipv4()) else {
        return TcpStream::connect_timeout(&to, timeout);
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    s.bind(&std::net::SocketAddr::new(ip, 0).into())?;
    s.connect_timeout(&to.into(), timeout)?;
    Ok(s.into())
}

/// A connector's Hello, checked for form but not yet for its proof.
pub struct Pending {
    stream: TcpStream,
    pub peer: String,
    /// The intro, JSON.
    pub intro: Vec<u8>,
    /// The connector's claimed public key.
    pub key: Option<[u8; PUBLIC_LEN]>,
    proof: Vec<u8>,
    t: [u8; 32],
    dh: [u8; 32],
}

/// The validator's opening of a handshake: what it sends, and what it keeps to check the answer.
pub struct Challenge {
    ns: [u8; 32],
    ve: [u8; 32],
    ve_secret: Scalar,
    v: [u8; PUBLIC_LEN],
}

impl Challenge {
    pub fn new(me: &Identity) -> Challenge {
        let (ve_secret, ve) = ephemeral();
        Challenge {
            ns: crate::wire::nonce(),
            ve,
            ve_secret,
            v: me.public(),
        }
    }

    /// The whole Challenge frame, header included.
    pub fn frame(&self) -> Vec<u8> {
        let mut body = self.ns.to_vec();
        body.extend_from_slice(&self.ve);
        body.extend_from_slice(&self.v);
        let mut out = FrameHeader::new(FrameKind::Challenge, body.len())
            .encode()
            .to_vec();
        out.extend_from_slice(&body);
        out
    }
}

/// Run the validator's half of the handshake up to the connector's Hello (within `timeout`).
pub fn accept(
    mut stream: TcpStream,
    me: &Identity,
    peer: &str,
    timeout: Duration,
) -> Result<Pending> {
    let challenge = Challenge::new(me);
    let mut io = FrameIo {
        stream: &mut stream,
        deadline: Instant::now() + timeout,
        what: format!("validator connection from {peer}"),
    };
    crate::net::conn::send_all(io.stream, &challenge.frame())
        .map_err(|e| Error::io(format!("{}: send", io.what), e))?;
    let (_, hello) = io.expect(FrameKind::Hello)?;
    Pending::from_hello(stream, &challenge, peer, &hello)
}

impl Pending {
    /// Check the form of a connector's Hello (the payload of its Hello frame) against the
    /// `challenge` sent on `stream`.
    pub fn from_hello(
        stream: TcpStream,
        challenge: &Challenge,
        peer: &str,
        hello: &[u8],
    ) -> Result<Pending> {
        let (ns, ve, v) = (&challenge.ns, &challenge.ve, &challenge.v);
        let mut r = BodyReader::new(hello, "validator hello");
        let intro = r.bytes()?.to_vec();
        let ce = r.bytes()?;
        let nc = r.bytes()?;
        let key = r.bytes()?;
        let proof = r.bytes()?.to_vec();
        let key = match key.len() {
            0 => None,
            PUBLIC_LEN => Some(key.try_into().expect("32")),
            n => return Err(Error::auth(format!("a {n}-byte public key"))),
        };
        let t = transcript(
            ns,
            ve,
            v,
            ce,
            nc,
            key.as_ref().map_or(&[][..], |k: &[u8; 32]| &k[..]),
            &intro,
        );
        let dh = shared(&challenge.ve_secret, ce)?;
        Ok(Pending {
            stream,
            peer: peer.to_string(),
            intro,
            key,
            proof,
            t,
            dh,
        })
    }
}

impl Pending {
    /// Whether the connector signed the transcript with the key it claims.
    pub fn signed(&self) -> bool {
        self.key
            .is_some_and(|k| identity::verify(&k, &self.t, &self.proof))
    }

    /// Whether the connector proved knowledge of `secret`.
    pub fn knows(&self, secret: &[u8; 32]) -> bool {
        crate::wire::mac_eq(&psk_mac(secret, &self.t), &self.proof)
    }

    /// Refuse in clear (nothing secret is said) and end the connection.
    pub fn refuse(mut self, kind: ErrorKind, reason: &str) -> Error {
        FrameIo {
            stream: &mut self.stream,
            deadline: Instant::now() + Duration::from_secs(2),
            what: format!("validator connection from {}", self.peer),
        }
        .reject(kind, reason);
        Error::new(kind, reason.to_string())
    }

    /// Accept: answer with the sealed Welcome and open the channel (`psk`: the secret the
    /// connector proved, for reports).
    pub fn welcome(mut self, me: &Identity, psk: Option<&[u8; 32]>) -> Result<Channel> {
        let (c2v, v2c) = session_keys(&self.dh, &self.t, psk);
        let what = format!("validator connection from {}", self.peer);
        let mut seal = Seal::new(&v2c);
        let w = seal.seal(&me.sign(&self.t));
        FrameIo {
            stream: &mut self.stream,
            deadline: Instant::now() + Duration::from_secs(10),
            what: what.clone(),
        }
        .send(FrameHeader::new(FrameKind::Welcome, w.len()), &w)?;
        let key = if self.signed() { self.key } else { None };
        let mut ch = Channel::new(self.stream, &v2c, &c2v, what, key)?;
        ch.writer.seal.seq = 1;
        Ok(ch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_messages_open_once_in_order_and_only_untouched() {
        let key = [5u8; 32];
        let (mut tx, mut rx) = (Seal::new(&key), Seal::new(&key));
        let a = tx.seal(b"first");
        let b = tx.seal(b"second");
        assert!(!a.windows(5).any(|w| w == b"first"), "sent in clear");
        // Out of order (or replayed) fails.
        assert!(Seal::new(&key).open(&b, "test").is_err());
        assert_eq!(rx.open(&a, "test").unwrap(), b"first");
        let mut flipped = b.clone();
        flipped[0] ^= 1;
        let mut rx2 = Seal::new(&key);
        rx2.seq = 1;
        assert!(rx2.open(&flipped, "test").is_err());
        assert_eq!(rx.open(&b, "test").unwrap(), b"second");
        assert!(Seal::new(&[6u8; 32]).open(&a, "test").is_err());
    }

    #[test]
    fn both_ends_derive_the_same_keys_and_the_psk_matters() {
        let (cs, cp) = ephemeral();
        let (vs, vp) = ephemeral();
        let t = transcript(b"ns", &vp, b"v", &cp, b"nc", b"", b"intro");
        let c = shared(&cs, &vp).unwrap();
        let v = shared(&vs, &cp).unwrap();
        assert_eq!(c, v);
        assert_eq!(session_keys(&c, &t, None), session_keys(&v, &t, None));
        assert_ne!(
            session_keys(&c, &t, Some(&[1; 32])),
            session_keys(&v, &t, Some(&[2; 32]))
        );
        assert!(shared(&cs, &[0xff; 32]).is_err());
    }
}

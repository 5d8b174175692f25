//! Frame format, handshake and keyed-blake3 authentication.
//!
//! Every message on every connection (rank↔rank, peer↔relay, relay↔validator) is a frame: a
//! fixed 40-byte little-endian [`FrameHeader`] followed by `len` payload bytes. Decoding never
//! trusts a length: [`FrameHeader::decode`] rejects unknown kinds and payloads over
//! [`MAX_PAYLOAD`], and each consumer checks `offset`/`len` against the op it expects before
//! touching memory.
//!
//! Handshake (the accepting side speaks first, so a connector can never be replayed):
//! 1. acceptor → connector: `Challenge` with a fresh 32-byte nonce `ns` (and, in `aux`, the
//!    frame-tag format it speaks, [`TAG_FORMAT`]);
//! 2. connector → acceptor: `Hello` with its own nonce `nc`, a MAC over
//!    (`"client"`, `ns`, `nc`, body) keyed by the shared secret, and the body (who it is);
//!    a connector of a tagged connection puts its tag format in `aux`;
//! 3. acceptor → connector: `Welcome` with a MAC over (`"server"`, `nc`, `ns`, body) and its
//!    own body, or `Reject` with a reason.
//!
//! The secret itself never crosses the wire.
//!
//! After the handshake every frame in both directions carries a [`TAG_LEN`]-byte trailer right
//! after its payload: a keyed-blake3 tag ([`FrameTag`]) over an implicit frame counter, the
//! header and a universal hash of the payload (`tag = blake3_keyed(key, counter ‖ header ‖
//! hash(payload))`, truncated, the hash being NH then POLYVAL; see [`payload_hash`] for why a
//! forgery succeeds per try with probability about 2^-64 at most, and why this is several
//! times cheaper than blake3 over the payload). The hash's keys are secret, derived from the
//! handshake key alone, so every connection opened with one secret shares them: a payload a
//! relay fans out to several peers, or a chunk a rank forwards, is hashed once for all the
//! tags it goes out under. Each
//! direction of each connection has its own tag key
//! ([`SessionKeys`]), derived from the handshake key and both nonces, and its own counter
//! (0 for the first frame after the handshake, +1 per frame), so a flipped bit, a replayed,
//! dropped or reordered frame, or a frame reflected back to its sender fails its tag. The
//! handshake frames themselves (`Challenge`, `Hello`, `Welcome`, `Reject`) carry no tag: their
//! MACs authenticate them. `len` in the header counts the payload only.
//!
//! Secrets: the job secret (bootstrap, rank↔rank links, `MR_VERIFY` sample positions) never
//! leaves the ranks. A static relay knows only its [`relay_token`], derived one-way from the
//! job secret and the relay's address as the job names it (`MR_RELAYS`), so a relay's token
//! opens neither the bootstrap nor another relay.

pub mod payload_hash;

use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use payload_hash::{PayloadHasher, PayloadKey};

/// Size of an encoded [`FrameHeader`].
pub const HEADER_LEN: usize = 40;
/// Largest payload any frame may carry, in bytes.
pub const MAX_PAYLOAD: usize = 64 << 20;
/// Largest handshake or control payload, in bytes.
pub const MAX_CONTROL_PAYLOAD: usize = 64 << 10;
/// Length of nonces and MACs.
pub const NONCE_LEN: usize = 32;
pub const MAC_LEN: usize = 32;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Op data: `seq` names the op, `offset`/`len` the bytes, `aux` the step or root (see
    /// [`FrameHeader`] for every use). Also, with no payload, the relay-mode notices between
    /// ranks (`aux` ≥ [`crate::algo::relay::AUX_LOST`]) and a relay's acknowledgement of a
    /// broadcast root's chunk.
    Data = 1,
    /// The op `seq` failed at the sender (a rank, or a relay for every rank of its job);
    /// payload is the UTF-8 message, `aux` the [`ErrorKind`] code. For a point-to-point group
    /// (`coll` = [`crate::algo::Collective::PointToPoint`]) it names the failed messages
    /// instead of an op: those of the sender's pair sequence `seq..=count`, which the sender
    /// was sending (`redop` 1) or receiving (`redop` 0).
    OpError = 2,
    /// Handshake step 1: payload is the acceptor's nonce.
    Challenge = 3,
    /// Handshake step 2: payload is nonce, MAC, body.
    Hello = 4,
    /// Handshake step 3: payload is MAC, body.
    Welcome = 5,
    /// Handshake refused (by a rank, a relay or the validator), or a bootstrap error: payload
    /// is the UTF-8 reason, `aux` the [`ErrorKind`] code.
    Reject = 6,
    /// Orderly close of a rank↔rank or peer↔relay connection (a rank destroying its
    /// communicator, a relay shutting down); no payload. A rank whose peer said goodbye fails
    /// only the ops that still need that peer instead of breaking the communicator; a relay's
    /// goodbye counts as the relay lost (its chunks go to the others).
    Goodbye = 7,
    /// Set-up and control messages outside any op (every header field but `kind` and `len`
    /// is 0). The payload is one of:
    /// * the bootstrap rank table, rank 0 → every rank: the world size (u32) and each rank's
    ///   listen address as a length-prefixed UTF-8 string ([`BodyWriter`] encoding;
    ///   [`crate::net::bootstrap`]);
    /// * the relay assignment rank 0 got from the validator, rank 0 → every other rank, as
    ///   JSON, one frame per bootstrap stream ([`crate::validator::client::share_assignment`]);
    /// * one JSON message of the validator protocol ([`crate::validator::proto`]): plain in one
    ///   frame ([`crate::validator::proto::send_json`]), or, in a sealed validator session
    ///   ([`crate::validator::channel`]), a fragment of one, each frame a one-byte "more
    ///   follows" flag and the fragment, sealed.
    Control = 8,
}

impl FrameKind {
    pub fn from_u8(v: u8) -> Option<FrameKind> {
        Some(match v {
            1 => FrameKind::Data,
            2 => FrameKind::OpError,
            3 => FrameKind::Challenge,
            4 => FrameKind::Hello,
            5 => FrameKind::Welcome,
            6 => FrameKind::Reject,
            7 => FrameKind::Goodbye,
            8 => FrameKind::Control,
            _ => return None,
        })
    }

    /// Largest payload this kind may carry.
    pub fn max_payload(self) -> usize {
        match self {
            FrameKind::Data => MAX_PAYLOAD,
            _ => MAX_CONTROL_PAYLOAD,
        }
    }
}

/// Fixed frame header, 40 bytes little-endian in field order. What the fields beyond `kind`
/// and `len` mean depends on the kind and, for `Data`, on the schedule; a field a kind does
/// not use is 0. For `Data`, `coll`/`dtype`/`redop`/`count` describe the op as the sender
/// called it, so a receiver catches mismatched calls ([`crate::algo::OpDesc::check_matches`])
/// before it writes anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FrameHeader {
    /// A [`FrameKind`].
    pub kind: u8,
    /// `Data`: the op's [`crate::algo::Collective`]. `OpError`: `PointToPoint` when a
    /// point-to-point group failed, else 0.
    pub coll: u8,
    /// `Data`: the op's (point-to-point: the message's) [`crate::types::DType`].
    pub dtype: u8,
    /// `Data`: the [`crate::types::ReduceOp`] in the low nibble, the wire
    /// [`crate::compress::Compression`] in the high one
    /// ([`crate::algo::OpDesc::redop_byte`]); 0 in point-to-point frames. `OpError` of a
    /// point-to-point group: 1 if the sender was sending the failed messages, 0 if receiving.
    pub redop: u8,
    /// Depends on the kind and the schedule:
    /// * `Data` between ranks, ring ([`crate::algo::ring`], compressed ring
    ///   [`crate::algo::compressed`]): the schedule step — reduce-scatter steps 0..n−1, then
    ///   all-gather steps n−1..2(n−1) in an all-reduce; a lone all-gather counts from 0;
    /// * `Data`, recursive doubling and barrier ([`crate::algo::doubling`]): 0 for a folded
    ///   rank's data, 1..=log2 p for the exchange steps, log2 p + 1 for the result sent back to
    ///   the folded rank;
    /// * `Data`, broadcast (chain or tree, [`crate::algo::broadcast`]; through relays): the
    ///   root rank, also in a relay's forwarded copies and its empty acknowledgement to the root;
    /// * `Data`, direct exchanges ([`crate::algo::exchange`]): the root for gather and
    ///   scatter; the (unused) root field of the call, 0, for all-to-all and all-to-all-v;
    /// * `Data`, all-reduce through relays ([`crate::algo::relay`]): 0, rank → relay and the
    ///   relay's result relay → rank;
    /// * `Data` between ranks in relay mode, no payload: a notice — `AUX_DONE` (the sender has
    ///   every result), `AUX_FALLBACK` (the sender runs the op through the ring; join it) or
    ///   `AUX_LOST` (the sender lost the relay named in `offset`), the top three `u32` values
    ///   ([`crate::algo::relay::AUX_LOST`] and above), so they never collide with a ring step
    ///   of the fallback;
    /// * `Data`, point-to-point ([`crate::algo::p2p`]): the message's tag;
    /// * `OpError`, `Reject`: the [`ErrorKind`] code;
    /// * other kinds: 0.
    pub aux: u32,
    /// `Data`, `OpError`: the op's position in the communicator's sequence (from 1).
    /// Point-to-point `Data`: the message's sequence number within its peer pair and direction;
    /// point-to-point `OpError`: the first failed message's.
    pub seq: u64,
    /// `Data`: the op's element count as the sender sees it ([`crate::algo::OpDesc::count`]);
    /// direct exchanges: this transfer's element count; point-to-point: the message's.
    /// Point-to-point `OpError`: the last failed message's sequence number.
    pub count: u64,
    /// `Data`: where the payload goes, in bytes, counted as the schedule says:
    /// * ring reduce-scatter frames: in accumulator units (f32 for f16/bf16 data) of the
    ///   buffer being reduced (the caller's input for a reduce-scatter, all n blocks); ring
    ///   all-gather, broadcast and relay frames: in the caller's buffer; recursive doubling:
    ///   always 0 (each frame carries the whole buffer);
    /// * compressed ops (`redop` high nibble ≠ 0): in the encoded image of the buffer;
    /// * direct exchanges: within this rank's transfer to the receiver; point-to-point:
    ///   within the message;
    /// * relay-mode notices: the lost relay's index ([`crate::algo::Endpoint::Relay`]) in
    ///   `AUX_LOST`, 0 in the others.
    ///
    /// Relays key a chunk by (`seq`, `offset`). Other kinds: 0.
    pub offset: u64,
    /// Payload bytes that follow the header (not counting the integrity tag).
    pub len: u64,
}

impl FrameHeader {
    pub fn new(kind: FrameKind, len: usize) -> FrameHeader {
        FrameHeader {
            kind: kind as u8,
            len: len as u64,
            ..FrameHeader::default()
        }
    }

    pub fn kind(&self) -> FrameKind {
        FrameKind::from_u8(self.kind).expect("decoded headers have valid kinds")
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind;
        b[1] = self.coll;
        b[2] = self.dtype;
        b[3] = self.redop;
        b[4..8].copy_from_slice(&self.aux.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.count.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decode and validate a header: the kind must be known and the length within that
    /// kind's limit. The error says which check failed.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<FrameHeader> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let h = FrameHeader {
            kind: b[0],
            coll: b[1],
            dtype: b[2],
            redop: b[3],
            aux: u32_at(4),
            seq: u64_at(8),
            count: u64_at(16),
            offset: u64_at(24),
            len: u64_at(32),
        };
        let kind = FrameKind::from_u8(h.kind)
            .ok_or_else(|| Error::remote(format!("malformed frame: unknown kind {}", h.kind)))?;
        if h.len > kind.max_payload() as u64 {
            return Err(Error::remote(format!(
                "malformed frame: {kind:?} payload of {} bytes exceeds the limit of {} bytes",
                h.len,
                kind.max_payload()
            )));
        }
        Ok(h)
    }

    /// A `Challenge` header for a `len`-byte nonce, naming the frame-tag format this side
    /// speaks ([`TAG_FORMAT`]).
    pub fn challenge(len: usize) -> FrameHeader {
        FrameHeader {
            aux: TAG_FORMAT,
            ..FrameHeader::new(FrameKind::Challenge, len)
        }
    }

    /// A `Hello` header for a `len`-byte payload on a tagged connection, naming the frame-tag
    /// format this side speaks ([`TAG_FORMAT`]).
    pub fn hello(len: usize) -> FrameHeader {
        FrameHeader {
            aux: TAG_FORMAT,
            ..FrameHeader::new(FrameKind::Hello, len)
        }
    }

    /// A `Reject` header for a `reason_len`-byte reason of `kind`.
    pub fn reject(kind: ErrorKind, reason_len: usize) -> FrameHeader {
        FrameHeader {
            aux: kind as u32,
            ..FrameHeader::new(FrameKind::Reject, reason_len)
        }
    }

    /// An `OpError` frame header for op `seq`; the payload is the message.
    pub fn op_error(seq: u64, kind: ErrorKind, msg_len: usize) -> FrameHeader {
        FrameHeader {
            aux: kind as u32,
            seq,
            ..FrameHeader::new(FrameKind::OpError, msg_len)
        }
    }
}

/// A fresh random nonce.
pub fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n).expect("the OS random source failed");
    n
}

/// Derive a 32-byte MAC key from a secret of any length.
pub fn mac_key(secret: &[u8]) -> [u8; 32] {
    blake3::derive_key("mapreduce 2026 handshake mac key v1", secret)
}

/// Keyed-blake3 MAC over a role label, two nonces and a body.
pub fn mac(key: &[u8; 32], role: &[u8], first: &[u8], second: &[u8], body: &[u8]) -> [u8; MAC_LEN] {
    let mut h = blake3::Hasher::new_keyed(key);
    for part in [role, first, second, body] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    *h.finalize().as_bytes()
}

/// Length of the integrity tag that follows every frame's payload after the handshake.
pub const TAG_LEN: usize = 16;

/// The frame-tag format this release speaks: 3, keyed blake3 over NH then POLYVAL of the
/// payload ([`payload_hash`]). Acceptors send it in their `Challenge`'s `aux`, connectors of
/// tagged connections (rank↔rank, peer→relay) in their `Hello`'s `aux`, and either side
/// refuses a different one by name ([`tag_format_mismatch`]) rather than failing every frame's
/// tag after the handshake. Releases before the format was numbered send 0 (their tags were
/// blake3 over the payload, or over `POLYVAL_H(payload)`).
pub const TAG_FORMAT: u32 = 3;

/// The error for a handshake whose other side (`who`) speaks frame-tag format `theirs`, or
/// `None` when it is [`TAG_FORMAT`].
pub fn tag_format_mismatch(theirs: u32, who: &str) -> Option<String> {
    (theirs != TAG_FORMAT).then(|| {
        let release = if theirs == 0 {
            "an older release, before tag formats were numbered"
        } else if theirs < TAG_FORMAT {
            "an older release"
        } else {
            "a newer release"
        };
        format!(
            "{who} speaks frame-tag format {theirs} ({release}), this side format {TAG_FORMAT}: \
             ranks and relays must run releases with the same tag format"
        )
    })
}

/// The token a static relay at `relay` (its address exactly as written in `MR_RELAYS`) holds
/// for jobs whose secret is `job_secret`. One-way: the token reveals neither the job secret
/// nor any other relay's token.
pub fn relay_token(job_secret: &[u8], relay: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("mapreduce 2026 relay token v1");
    h.update(&(job_secret.len() as u64).to_le_bytes());
    h.update(job_secret);
    h.update(relay.as_bytes());
    *h.finalize().as_bytes()
}

/// The two per-direction frame keys of one connection, and the payload hash key. Its `Debug`
/// hides the keys.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    /// Tags frames this side sends.
    pub send: [u8; 32],
    /// Checks frames this side receives.
    pub recv: [u8; 32],
    /// The keys of the payload hash under both directions' tags.
    pub payload: Arc<PayloadKey>,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

impl SessionKeys {
    /// Keys for the side that accepted (`acceptor`) or connected, from the handshake key and
    /// the acceptor's (`ns`) and connector's (`nc`) nonces. Both sides derive the same pair,
    /// mirrored. The payload hash key depends on the handshake key only: it is the same on
    /// every connection opened with one secret, so one payload hash serves all of them (an
    /// insider who knows the secret could derive every connection's keys anyway; an outsider
    /// never sees a hash value, only tags that the per-connection keys make unpredictable).
    pub fn derive(
        key: &[u8; 32],
        ns: &[u8; NONCE_LEN],
        nc: &[u8; NONCE_LEN],
        acceptor: bool,
    ) -> Self {
        let to_connector = mac(key, b"frames acceptor to connector", ns, nc, &[]);
        let to_acceptor = mac(key, b"frames connector to acceptor", ns, nc, &[]);
        let (send, recv) = if acceptor {
            (to_connector, to_acceptor)
        } else {
            (to_acceptor, to_connector)
        };
        SessionKeys {
            send,
            recv,
            payload: payload_key(key),
        }
    }

    /// The sending and the receiving direction's tag streams.
    pub fn streams(&self) -> (TagStream, TagStream) {
        (
            TagStream::new(self.send, self.payload.clone()),
            TagStream::new(self.recv, self.payload.clone()),
        )
    }
}

/// The payload hash key of every connection opened with the handshake key `key`.
fn payload_key(key: &[u8; 32]) -> Arc<PayloadKey> {
    PayloadKey::derive(&mac(key, b"frame payload hash", &[], &[], &[]))
}

/// A payload's hash under one payload key: it finishes the tag of that payload on every
/// connection with the same key. Not a content identifier (payloads of different lengths
/// can share it), and secret: its `Debug` hides the value.
#[derive(Clone)]
pub struct PayloadDigest {
    key: Arc<PayloadKey>,
    value: payload_hash::Digest,
}

impl std::fmt::Debug for PayloadDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PayloadDigest(..)")
    }
}

/// One direction of a tagged connection: its key, the counter of the next frame and the
/// payload hash key.
#[derive(Clone)]
pub struct TagStream {
    key: [u8; 32],
    next: u64,
    payload: Arc<PayloadKey>,
}

impl TagStream {
    pub fn new(key: [u8; 32], payload: Arc<PayloadKey>) -> TagStream {
        TagStream {
            key,
            next: 0,
            payload,
        }
    }

    /// A stream for a connection that tags nothing yet (its keys come with the handshake).
    pub fn placeholder() -> TagStream {
        static NONE: std::sync::OnceLock<Arc<PayloadKey>> = std::sync::OnceLock::new();
        TagStream::new(
            [0; 32],
            NONE.get_or_init(|| PayloadKey::derive(&[0; 32])).clone(),
        )
    }

    /// Start the tag of the next frame in this direction, whose header is `header`.
    pub fn begin(&mut self, header: &[u8; HEADER_LEN]) -> FrameTag {
        let mut mac = blake3::Hasher::new_keyed(&self.key);
        mac.update(&self.next.to_le_bytes());
        mac.update(header);
        self.next += 1;
        FrameTag {
            mac,
            body: PayloadHasher::new(self.payload.clone()),
        }
    }

    /// The whole tag of the next frame (header and payload at hand).
    pub fn tag(&mut self, header: &[u8; HEADER_LEN], payload: &[u8]) -> [u8; TAG_LEN] {
        let mut t = self.begin(header);
        t.update(payload);
        t.finish()
    }

    /// The hash of `payload` as this direction's tags take it (compute once for a payload
    /// sent on several connections).
    pub fn digest(&self, payload: &[u8]) -> PayloadDigest {
        PayloadDigest {
            key: self.payload.clone(),
            value: payload_hash::digest(&self.payload, payload),
        }
    }

    /// The tag of the next frame, whose payload is `payload` and was hashed into `digest`
    /// (under this connection's payload key, or the payload is hashed again).
    pub fn tag_digest(
        &mut self,
        header: &[u8; HEADER_LEN],
        digest: &PayloadDigest,
        payload: &[u8],
    ) -> [u8; TAG_LEN] {
        if digest.key == self.payload {
            self.begin(header).finish_with(&digest.value)
        } else {
            self.tag(header, payload)
        }
    }
}

/// The running tag of one frame: fed the payload as it moves, finished after its last byte.
#[derive(Clone)]
pub struct FrameTag {
    /// Keyed, over the counter and the header so far; the payload hash closes it.
    mac: blake3::Hasher,
    /// Under the payload hash's keys, over the payload.
    body: PayloadHasher,
}

impl FrameTag {
    pub fn update(&mut self, bytes: &[u8]) {
        self.body.update(bytes);
    }

    /// The hash of the payload fed so far.
    pub fn digest(&self) -> PayloadDigest {
        PayloadDigest {
            key: self.body.key().clone(),
            value: self.body.finish(),
        }
    }

    pub fn finish(&self) -> [u8; TAG_LEN] {
        self.finish_with(&self.body.finish())
    }

    fn finish_with(&self, digest: &payload_hash::Digest) -> [u8; TAG_LEN] {
        let mut mac = self.mac.clone();
        mac.update(digest);
        mac.finalize().as_bytes()[..TAG_LEN]
            .try_into()
            .expect("blake3 output is 32 bytes")
    }

    /// Whether `tag` (as received) matches, in constant time.
    pub fn verify(&self, tag: &[u8]) -> bool {
        mac_eq(&self.finish(), tag)
    }
}

/// Constant-time comparison of two MACs.
pub fn mac_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A `Hello` payload: connector nonce, MAC, body.
pub struct Hello<'a> {
    pub nonce: [u8; NONCE_LEN],
    pub mac: [u8; MAC_LEN],
    pub body: &'a [u8],
}

impl<'a> Hello<'a> {
    /// Build a Hello answering challenge `ns`, proving knowledge of `key`.
    pub fn sign(key: &[u8; 32], ns: &[u8; NONCE_LEN], body: &'a [u8]) -> Hello<'a> {
        let nc = nonce();
        Hello {
            nonce: nc,
            mac: mac(key, b"client", ns, &nc, body),
            body,
        }
    }
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(NONCE_LEN + MAC_LEN + self.body.len());
        v.extend_from_slice(&self.nonce);
        v.extend_from_slice(&self.mac);
        v.extend_from_slice(self.body);
        v
    }
    pub fn decode(p: &'a [u8]) -> Result<Hello<'a>> {
        if p.len() < NONCE_LEN + MAC_LEN {
            return Err(Error::remote(format!(
                "malformed hello: {} bytes, need at least {}",
                p.len(),
                NONCE_LEN + MAC_LEN
            )));
        }
        Ok(Hello {
            nonce: p[..NONCE_LEN].try_into().unwrap(),
            mac: p[NONCE_LEN..NONCE_LEN + MAC_LEN].try_into().unwrap(),
            body: &p[NONCE_LEN + MAC_LEN..],
        })
    }
    /// Check the MAC against challenge `ns` with `key`.
    pub fn verify(&self, key: &[u8; 32], ns: &[u8; NONCE_LEN]) -> bool {
        mac_eq(&mac(key, b"client", ns, &self.nonce, self.body), &self.mac)
    }
}

/// The acceptor's answer MAC for a verified Hello.
pub fn welcome_mac(
    key: &[u8; 32],
    ns: &[u8; NONCE_LEN],
    nc: &[u8; NONCE_LEN],
    body: &[u8],
) -> [u8; MAC_LEN] {
    mac(key, b"server", nc, ns, body)
}

/// Little helpers to build and parse handshake bodies: fixed-width little-endian integers
/// and length-prefixed byte strings.
#[derive(Default)]
pub struct BodyWriter(pub Vec<u8>);

impl BodyWriter {
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self = self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

pub struct BodyReader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> BodyReader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        BodyReader { buf, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::remote(format!(
                "malformed {}: truncated ({} bytes left, need {n})",
                self.what,
                self.buf.len()
            )));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub fn string(&mut self) -> Result<String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::remote(format!("malformed {}: string is not UTF-8", self.what)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = FrameHeader {
            kind: FrameKind::Data as u8,
            coll: 1,
            dtype: 2,
            redop: 3,
            aux: 7,
            seq: 1 << 40,
            count: 12345,
            offset: 1 << 33,
            len: 4096,
        };
        assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn header_rejects_unknown_kind_and_oversize() {
        let mut b = FrameHeader::new(FrameKind::Data, 16).encode();
        b[0] = 99;
        assert!(FrameHeader::decode(&b)
            .unwrap_err()
            .message
            .contains("unknown kind"));
        let b = FrameHeader::new(FrameKind::Data, MAX_PAYLOAD + 1).encode();
        assert!(FrameHeader::decode(&b)
            .unwrap_err()
            .message
            .contains("exceeds"));
        let b = FrameHeader::new(FrameKind::Hello, MAX_CONTROL_PAYLOAD + 1).encode();
        assert!(FrameHeader::decode(&b).is_err());
    }

    #[test]
    fn hello_mac_binds_key_nonce_and_body() {
        let key = mac_key(b"secret");
        let ns = nonce();
        let body = BodyWriter::default().u32(3).bytes(b"addr").finish();
        let hello = Hello::sign(&key, &ns, &body);
        let enc = hello.encode();
        let dec = Hello::decode(&enc).unwrap();
        assert!(dec.verify(&key, &ns));
        assert!(!dec.verify(&mac_key(b"other"), &ns));
        assert!(!dec.verify(&key, &nonce()));
        let mut tampered = enc.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(!Hello::decode(&tampered).unwrap().verify(&key, &ns));
    }

    fn session_pair() -> (SessionKeys, SessionKeys) {
        let key = mac_key(b"job secret");
        let (ns, nc) = (nonce(), nonce());
        (
            SessionKeys::derive(&key, &ns, &nc, true),
            SessionKeys::derive(&key, &ns, &nc, false),
        )
    }

    #[test]
    fn session_keys_mirror_and_depend_on_both_nonces_and_key() {
        let key = mac_key(b"job secret");
        let (ns, nc) = (nonce(), nonce());
        let a = SessionKeys::derive(&key, &ns, &nc, true);
        let c = SessionKeys::derive(&key, &ns, &nc, false);
        assert_eq!(a.send, c.recv);
        assert_eq!(a.recv, c.send);
        assert_ne!(a.send, a.recv, "each direction has its own key");
        assert_ne!(SessionKeys::derive(&key, &nonce(), &nc, true), a);
        assert_ne!(SessionKeys::derive(&key, &ns, &nonce(), true), a);
        assert_ne!(SessionKeys::derive(&mac_key(b"other"), &ns, &nc, true), a);
    }

    #[test]
    fn a_tag_from_the_payload_digest_equals_the_tag_from_the_payload() {
        let (acceptor, connector) = session_pair();
        let (mut a, _) = connector.streams();
        let (mut b, _) = connector.streams();
        let h = FrameHeader::new(FrameKind::Data, 5).encode();
        let d = a.clone().digest(b"hello");
        assert_eq!(a.tag(&h, b"hello"), b.clone().tag_digest(&h, &d, b"hello"));
        // A digest of other bytes makes another tag.
        let other = b.digest(b"hellp");
        assert_ne!(
            a.clone().tag(&h, b"hello"),
            b.tag_digest(&h, &other, b"hello")
        );
        // The acceptor's side of the same connection hashes payloads alike.
        let (_, rx) = acceptor.streams();
        let mut t = rx.clone().begin(&h);
        t.update(b"hel");
        t.update(b"lo");
        assert_eq!(t.digest().value, d.value);
        // A digest under another payload key is not trusted: the payload is hashed again.
        let foreign = SessionKeys::derive(&mac_key(b"another"), &nonce(), &nonce(), true);
        let (f, _) = foreign.streams();
        let wrong = f.digest(b"xxxxx");
        let (mut c, _) = connector.streams();
        assert_eq!(
            c.tag_digest(&h, &wrong, b"hello"),
            connector.streams().0.tag(&h, b"hello")
        );
    }

    #[test]
    fn connections_under_one_secret_share_the_payload_key_only() {
        let key = mac_key(b"job secret");
        let a = SessionKeys::derive(&key, &nonce(), &nonce(), true);
        let b = SessionKeys::derive(&key, &nonce(), &nonce(), false);
        assert_eq!(a.payload, b.payload);
        assert_ne!(a.send, b.send);
        let c = SessionKeys::derive(&mac_key(b"other"), &nonce(), &nonce(), true);
        assert_ne!(a.payload, c.payload);
    }

    #[test]
    fn tags_catch_tampering_replay_reorder_and_reflection() {
        let (acceptor, connector) = session_pair();
        let (mut tx, _) = connector.streams();
        let h0 = FrameHeader::new(FrameKind::Data, 4).encode();
        let h1 = FrameHeader {
            seq: 2,
            ..FrameHeader::new(FrameKind::Data, 4)
        }
        .encode();
        let t0 = tx.tag(&h0, b"abcd");
        let t1 = tx.tag(&h1, b"efgh");
        let check = |rx: &mut TagStream, h: &[u8; HEADER_LEN], p: &[u8], t: &[u8]| {
            let mut f = rx.begin(h);
            // Fed in pieces, as bytes arrive.
            for piece in p.chunks(3) {
                f.update(piece);
            }
            f.verify(t)
        };
        // In order: both check.
        let mut rx = acceptor.streams().1;
        assert!(check(&mut rx, &h0, b"abcd", &t0));
        assert!(check(&mut rx, &h1, b"efgh", &t1));
        // Tampered payload, tampered header, tampered tag.
        let mut rx = acceptor.streams().1;
        assert!(!check(&mut rx, &h0, b"abce", &t0));
        let mut rx = acceptor.streams().1;
        let mut bad = h0;
        bad[24] ^= 1;
        assert!(!check(&mut rx, &bad, b"abcd", &t0));
        let mut rx = acceptor.streams().1;
        let mut bad_tag = t0;
        bad_tag[0] ^= 0x80;
        assert!(!check(&mut rx, &h0, b"abcd", &bad_tag));
        // Replay: frame 0 again in place of frame 1.
        let mut rx = acceptor.streams().1;
        assert!(check(&mut rx, &h0, b"abcd", &t0));
        assert!(!check(&mut rx, &h0, b"abcd", &t0));
        // Reorder / drop: frame 1 first.
        let mut rx = acceptor.streams().1;
        assert!(!check(&mut rx, &h1, b"efgh", &t1));
        // Wrong direction: a frame reflected back to its sender.
        let mut reflected = connector.streams().1;
        assert!(!check(&mut reflected, &h0, b"abcd", &t0));
    }

    #[test]
    fn relay_tokens_are_per_relay_and_not_the_secret() {
        let s = b"job secret of thirty-two bytes!!";
        let a = relay_token(s, "10.0.0.1:7000");
        let b = relay_token(s, "10.0.0.2:7000");
        assert_ne!(a, b);
        assert_ne!(&a[..], &s[..]);
        assert_eq!(a, relay_token(s, "10.0.0.1:7000"));
        assert_ne!(a, relay_token(b"another job secret", "10.0.0.1:7000"));
    }

    #[test]
    fn body_reader_reports_truncation() {
        let body = BodyWriter::default().u32(1).finish();
        let mut r = BodyReader::new(&body, "hello");
        assert_eq!(r.u32().unwrap(), 1);
        assert!(r.u64().unwrap_err().message.contains("truncated"));
    }
}

//! One connection's bytes, for both the progress engine and `mr-relayd`: socket tuning, sends
//! that can never raise SIGPIPE, resumable vectored frame writes and resumable payload reads
//! that check each frame's integrity tag (see [`crate::wire`]) as the bytes arrive.
//!
//! Never decides what a frame means or where its payload goes: the caller passes the
//! destination and learns, once the frame is whole, whether its tag checked.
//!
//! Every socket write in the library and the daemons goes through [`send_vectored`], which
//! uses `sendmsg(MSG_NOSIGNAL)`: a peer that vanished becomes `EPIPE` here, never a signal
//! that would kill a host program with the default SIGPIPE disposition. A library must not
//! change its host's signal handling, so this is the only defence.

use crate::wire::{FrameHeader, FrameTag, PayloadDigest, TagStream, HEADER_LEN, TAG_LEN};
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::os::unix::io::AsRawFd;

/// Kernel socket buffer size requested for data connections (both directions), in bytes.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Tune a data connection: no Nagle delay (frames are written whole) and large buffers.
pub fn tune(s: &impl std::os::fd::AsFd) -> io::Result<()> {
    let sock = socket2::SockRef::from(s);
    sock.set_nodelay(true)?;
    sock.set_send_buffer_size(SOCKET_BUFFER)?;
    sock.set_recv_buffer_size(SOCKET_BUFFER)?;
    Ok(())
}

/// `sendmsg(2)` of `bufs` with `MSG_NOSIGNAL`, retried on `EINTR`. Same results as
/// `Write::write_vectored`, except that a closed peer is always `EPIPE`, never SIGPIPE.
pub fn send_vectored(fd: &impl AsRawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let bufs = &bufs[..bufs.len().min(libc::UIO_MAXIOV as usize)];
    loop {
        // SAFETY: msghdr is plain old data; all-zero is a valid empty message.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // IoSlice is guaranteed ABI-compatible with `struct iovec`; sendmsg only reads them.
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len() as _;
        // SAFETY: `msg` points at `bufs.len()` valid iovecs that outlive the call, and the
        // descriptor is a socket owned by the caller.
        let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Blocking send of all of `buf` on a blocking socket (handshakes, bootstrap). A send timeout
/// set on the socket surfaces as [`io::ErrorKind::TimedOut`].
pub fn send_all(fd: &impl AsRawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match send_vectored(fd, &[IoSlice::new(buf)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "send timed out"))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `read(2)`/`readv(2)` retried on `EINTR`; `Ok(0)` means the other side closed.
pub fn recv(stream: &mut impl Read, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
    loop {
        match stream.read_vectored(bufs) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// A frame on its way out: its encoded header, its tag once computed, and how many of its
/// bytes (header, payload, tag) the socket has taken. The payload stays with the caller (an
/// op's memory, a relay's shared result) and must not change while the frame is queued.
pub struct FrameOut {
    pub header: [u8; HEADER_LEN],
    /// Whether this frame carries a tag (every frame after the handshake does).
    tagged: bool,
    /// Whether the frame took its number in the direction's tag sequence (at its first
    /// write): from then on it must go out whole, or the connection is done.
    numbered: bool,
    /// The tag, once the whole payload is hashed.
    tag: Option<[u8; TAG_LEN]>,
    /// The tag while the payload is hashed, a stretch ahead of what the kernel copies.
    running: Option<FrameTag>,
    /// Payload bytes fed to `running` (or covered by the tag).
    hashed: usize,
    /// The payload's hash when the sender has it already (one payload fanned out to several
    /// connections is hashed once).
    digest: Option<PayloadDigest>,
    pub written: usize,
}

impl FrameOut {
    pub fn new(header: &FrameHeader, tagged: bool) -> FrameOut {
        FrameOut {
            header: header.encode(),
            tagged,
            numbered: false,
            tag: None,
            running: None,
            hashed: 0,
            digest: None,
            written: 0,
        }
    }

    /// As [`FrameOut::new`], for a payload whose hash is `digest`.
    pub fn with_digest(header: &FrameHeader, tagged: bool, digest: PayloadDigest) -> FrameOut {
        FrameOut {
            digest: Some(digest),
            ..FrameOut::new(header, tagged)
        }
    }

    /// Whether the frame has taken its frame number (its tag is begun): it can no longer
    /// be dropped without breaking every later tag on the connection.
    pub fn is_numbered(&self) -> bool {
        self.numbered || self.written > 0
    }

    /// Bytes this frame puts on the wire with a payload of `payload_len` bytes.
    pub fn total(&self, payload_len: usize) -> usize {
        HEADER_LEN + payload_len + if self.tagged { TAG_LEN } else { 0 }
    }

    /// Write as much of the frame as the socket takes in one `sendmsg` of header, payload
    /// and tag, tagged with `tx` (the connection's sending direction). The payload is hashed
    /// at most [`HASH_STEP`] bytes ahead of what has left, right before the kernel copies
    /// those bytes (so they are in cache for the copy, and a large frame's first bytes leave
    /// without waiting for its last to be hashed); the tag follows the payload's last byte,
    /// in the same call when it fits. Returns the bytes written (the frame is done when
    /// `written == total`).
    pub fn write(
        &mut self,
        fd: &impl AsRawFd,
        payload: &[u8],
        tx: &mut TagStream,
    ) -> io::Result<usize> {
        self.write_at_most(fd, payload, tx, usize::MAX)
    }

    /// As [`FrameOut::write`], putting at most `max` bytes (at least one) on the wire: what a
    /// rate cap allows right now.
    pub fn write_at_most(
        &mut self,
        fd: &impl AsRawFd,
        payload: &[u8],
        tx: &mut TagStream,
        max: usize,
    ) -> io::Result<usize> {
        // Bytes of the frame that may leave now: all of it untagged; tagged, the header and
        // the hashed payload, and the tag once the payload is all hashed.
        let ready = if self.tagged {
            if !self.numbered {
                match &self.digest {
                    Some(d) => {
                        self.tag = Some(tx.tag_digest(&self.header, d, payload));
                        self.hashed = payload.len();
                    }
                    None => self.running = Some(tx.begin(&self.header)),
                }
                self.numbered = true;
            }
            if let Some(t) = self.running.as_mut() {
                let left = self.written.saturating_sub(HEADER_LEN).min(payload.len());
                let end = (left + HASH_STEP).min(payload.len());
                if self.hashed < end {
                    t.update(&payload[self.hashed..end]);
                    self.hashed = end;
                }
                if self.hashed == payload.len() {
                    self.tag = Some(t.finish());
                    self.running = None;
                }
            }
            HEADER_LEN + self.hashed + if self.tag.is_some() { TAG_LEN } else { 0 }
        } else {
            self.total(payload.len())
        };
        let tag: &[u8] = match &self.tag {
            Some(t) => t,
            None => &[],
        };
        let (mut h, mut p, mut t) = (&self.header[..], payload, tag);
        let mut skip = self.written;
        for part in [&mut h, &mut p, &mut t] {
            let k = skip.min(part.len());
            *part = &part[k..];
            skip -= k;
        }
        let mut room = max.max(1).min(ready - self.written);
        for part in [&mut h, &mut p, &mut t] {
            let k = room.min(part.len());
            *part = &part[..k];
            room -= k;
        }
        let n = send_vectored(fd, &[IoSlice::new(h), IoSlice::new(p), IoSlice::new(t)])?;
        if n == 0 && h.len() + p.len() + t.len() > 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.written += n;
        Ok(n)
    }
}

/// Payload bytes hashed per step on a tagged connection: a sender hashes at most this far
/// ahead of the bytes already sent, a receiver reads at most this much per call and hashes it
/// at once. Small enough that the bytes are still in cache when the kernel copies them (send)
/// or the hash reads them (receive), large enough that one system call moves a lot: with
/// hashing switched off in a benchmark build, 128 KiB steps took a 2-rank loopback ring
/// all-reduce to 1.36× its untagged time against 1.03× with no step limit, and 256 KiB to
/// 1 MiB steps measured alike with hashing on (BENCHMARKS.md §8).
pub const HASH_STEP: usize = 512 << 10;

/// The rest of a frame whose header has arrived: its payload, then (on tagged connections)
/// its tag, with the tag computed over the payload as it is read.
pub struct FrameIn {
    pub header: FrameHeader,
    /// Payload bytes read so far.
    pub got: usize,
    tag: Option<FrameTag>,
    trailer: [u8; TAG_LEN],
    trailer_got: usize,
}

impl FrameIn {
    /// Start reading the frame whose raw header is `raw` (decoded: `header`); `rx` is the
    /// connection's receiving direction, `None` before the handshake completes.
    pub fn new(header: FrameHeader, raw: &[u8; HEADER_LEN], rx: Option<&mut TagStream>) -> Self {
        FrameIn {
            header,
            got: 0,
            tag: rx.map(|rx| rx.begin(raw)),
            trailer: [0; TAG_LEN],
            trailer_got: 0,
        }
    }

    /// Payload bytes of the frame.
    pub fn payload_len(&self) -> usize {
        self.header.len as usize
    }

    /// Payload bytes not read yet.
    pub fn payload_left(&self) -> usize {
        self.payload_len() - self.got
    }

    /// Whether the payload and the tag have all arrived.
    pub fn is_whole(&self) -> bool {
        self.got == self.payload_len() && (self.tag.is_none() || self.trailer_got == TAG_LEN)
    }

    /// Read the payload's next bytes into `dst` (at most [`Self::payload_left`] bytes; when
    /// `dst` reaches the payload's end, the tag is read in the same call), feeding them to the
    /// tag. Returns the payload bytes read; `Ok(0)` with bytes still expected means the other
    /// side closed.
    pub fn read(&mut self, stream: &mut impl Read, dst: &mut [u8]) -> io::Result<usize> {
        debug_assert!(dst.len() <= self.payload_left());
        // Tagged, at most one hash step per call: the bytes are hashed right after the
        // kernel copied them, while they are still in cache.
        let dst = match &self.tag {
            Some(_) if dst.len() > HASH_STEP => &mut dst[..HASH_STEP],
            _ => dst,
        };
        let to_end = dst.len() == self.payload_left();
        let trailer: &mut [u8] = match (&self.tag, to_end) {
            (Some(_), true) => &mut self.trailer[self.trailer_got..],
            _ => &mut [],
        };
        let want = dst.len() + trailer.len();
        if want == 0 {
            return Ok(0);
        }
        let n = recv(
            stream,
            &mut [IoSliceMut::new(dst), IoSliceMut::new(trailer)],
        )?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let payload = n.min(dst.len());
        if let Some(t) = self.tag.as_mut() {
            t.update(&dst[..payload]);
        }
        self.got += payload;
        self.trailer_got += n - payload;
        Ok(payload)
    }

    /// After [`Self::is_whole`]: whether the frame is intact (always true untagged).
    pub fn verify(&self) -> bool {
        self.tag.as_ref().map_or(true, |t| t.verify(&self.trailer))
    }

    /// After [`Self::is_whole`] on a tagged connection: the payload's hash, computed as it
    /// arrived.
    pub fn payload_digest(&self) -> Option<PayloadDigest> {
        self.tag.as_ref().map(FrameTag::digest)
    }
}

/// Watch WRITABLE on a connection only while it has bytes queued: `queued` says whether it
/// has, `*watching` whether WRITABLE is registered now; re-registers when they differ.
pub fn watch_writable(
    registry: &mio::Registry,
    stream: &mut mio::net::TcpStream,
    token: mio::Token,
    queued: bool,
    watching: &mut bool,
) -> io::Result<()> {
    if queued == *watching {
        return Ok(());
    }
    let interest = if queued {
        mio::Interest::READABLE | mio::Interest::WRITABLE
    } else {
        mio::Interest::READABLE
    };
    registry.reregister(stream, token, interest)?;
    *watching = queued;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FrameKind, SessionKeys};

    /// A reader that hands out at most `step` bytes per call, to exercise resumption.
    struct Trickle<'a>(&'a [u8], usize);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.1).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn frame_bytes(tx: &mut TagStream, h: &FrameHeader, payload: &[u8]) -> Vec<u8> {
        let raw = h.encode();
        let mut v = raw.to_vec();
        v.extend_from_slice(payload);
        v.extend_from_slice(&tx.tag(&raw, payload));
        v
    }

    fn read_frame(rx: &mut TagStream, wire: &[u8], step: usize) -> (Vec<u8>, bool) {
        let mut r = Trickle(wire, step);
        let mut raw = [0u8; HEADER_LEN];
        r.read_exact(&mut raw).unwrap();
        let h = FrameHeader::decode(&raw).unwrap();
        let mut f = FrameIn::new(h, &raw, Some(rx));
        let mut out = vec![0u8; f.payload_len()];
        while !f.is_whole() {
            let at = f.got;
            f.read(&mut r, &mut out[at..]).unwrap();
        }
        (out, f.verify())
    }

    #[test]
    fn tagged_frames_round_trip_in_pieces_and_fail_when_flipped() {
        let keys = SessionKeys::derive(&[7; 32], &[1; 32], &[2; 32], true);
        let peer = SessionKeys::derive(&[7; 32], &[1; 32], &[2; 32], false);
        let payload: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let h = FrameHeader::new(FrameKind::Data, payload.len());
        let mut tx = keys.streams().0;
        let good = frame_bytes(&mut tx, &h, &payload);
        for step in [1, 7, 40, 4096] {
            let mut rx = peer.streams().1;
            let (got, ok) = read_frame(&mut rx, &good, step);
            assert!(ok, "step {step}");
            assert_eq!(got, payload);
        }
        for at in [0usize, 39, 40, 500, good.len() - 1] {
            if at < 4 {
                continue; // kind byte: would not decode
            }
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            let mut rx = peer.streams().1;
            let Ok(h) = FrameHeader::decode(bad[..HEADER_LEN].try_into().unwrap()) else {
                continue;
            };
            if h.len != payload.len() as u64 {
                continue;
            }
            assert!(
                !read_frame(&mut rx, &bad, 64).1,
                "flip at byte {at} went unnoticed"
            );
        }
    }

    #[test]
    fn frame_out_writes_header_payload_and_tag_resumably() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let keys = SessionKeys::derive(&[3; 32], &[4; 32], &[5; 32], false);
        let peer = SessionKeys::derive(&[3; 32], &[4; 32], &[5; 32], true);
        let payload = vec![9u8; 3000];
        let h = FrameHeader::new(FrameKind::Data, payload.len());
        let mut f = FrameOut::new(&h, true);
        let mut tx = keys.streams().0;
        while f.written < f.total(payload.len()) {
            f.write(&a, &payload, &mut tx).unwrap();
        }
        drop(a);
        let mut wire = Vec::new();
        (&b).read_to_end(&mut wire).unwrap();
        assert_eq!(wire.len(), HEADER_LEN + payload.len() + TAG_LEN);
        let (got, ok) = read_frame(&mut peer.streams().1, &wire, 100);
        assert!(ok);
        assert_eq!(got, payload);
    }

    /// A payload several hash-ahead stretches long, written in uneven pieces (a rate cap's
    /// allowances), then a frame tagged from a digest: both arrive intact, so the tag of a
    /// frame hashed stretch by stretch equals the tag over its whole payload.
    #[test]
    fn a_long_frame_hashed_as_it_leaves_and_a_digest_tagged_frame_check() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let keys = SessionKeys::derive(&[3; 32], &[4; 32], &[5; 32], false);
        let peer = SessionKeys::derive(&[3; 32], &[4; 32], &[5; 32], true);
        let long: Vec<u8> = (0..2 * HASH_STEP + 12_345)
            .map(|i| (i * 13) as u8)
            .collect();
        let short = b"fanned out".to_vec();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            (&b).read_to_end(&mut all).unwrap();
            all
        });
        let mut tx = keys.streams().0;
        let h = FrameHeader::new(FrameKind::Data, long.len());
        let mut f = FrameOut::new(&h, true);
        let mut pieces = [1usize, 39, 100_003, 1, HASH_STEP, 7].iter().cycle();
        while f.written < f.total(long.len()) {
            let n = f
                .write_at_most(&a, &long, &mut tx, *pieces.next().unwrap())
                .unwrap();
            assert!(f.written <= HEADER_LEN + f.hashed + TAG_LEN && n > 0);
        }
        let h2 = FrameHeader::new(FrameKind::Data, short.len());
        let d = tx.digest(&short);
        let mut g = FrameOut::with_digest(&h2, true, d);
        while g.written < g.total(short.len()) {
            g.write(&a, &short, &mut tx).unwrap();
        }
        drop(a);
        let all = reader.join().unwrap();
        let mut rx = peer.streams().1;
        let first = HEADER_LEN + long.len() + TAG_LEN;
        for step in [65_536, 1 << 20] {
            // Read as it comes, and with more at hand than one hash step.
            let (got, ok) = read_frame(&mut peer.streams().1, &all[..first], step);
            assert!(ok, "the long frame's tag, read {step} bytes at a time");
            assert_eq!(got, long);
        }
        let (_, ok) = read_frame(&mut rx, &all[..first], 1 << 20);
        assert!(ok);
        let (got, ok) = read_frame(&mut rx, &all[first..], 3);
        assert!(ok, "the digest-tagged frame's tag");
        assert_eq!(got, short);
    }

    #[test]
    fn a_frame_retried_after_would_block_keeps_its_number() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let keys = SessionKeys::derive(&[3; 32], &[4; 32], &[5; 32], false);
        let peer = SessionKeys::derive(&[3; 32], &[4; 32], &[5; 32], true);
        let mut tx = keys.streams().0;
        // Fill the socket so the frame's first attempts would block.
        let filler = vec![0u8; 1 << 16];
        let mut stuffed = 0usize;
        while let Ok(n) = send_vectored(&a, &[IoSlice::new(&filler)]) {
            stuffed += n;
        }
        let payload = vec![5u8; 1000];
        let h = FrameHeader::new(FrameKind::Data, payload.len());
        let mut f = FrameOut::new(&h, true);
        for _ in 0..3 {
            let e = f.write(&a, &payload, &mut tx).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        }
        assert!(f.is_numbered());
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            (&b).read_to_end(&mut all).unwrap();
            all
        });
        while f.written < f.total(payload.len()) {
            match f.write(&a, &payload, &mut tx) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        drop(a);
        let all = reader.join().unwrap();
        let (got, ok) = read_frame(&mut peer.streams().1, &all[stuffed..], 4096);
        assert!(ok, "the retried frame's tag must use frame number 0");
        assert_eq!(got, payload);
    }

    #[test]
    fn send_to_a_closed_peer_is_epipe_not_sigpipe() {
        // (Rust test binaries ignore SIGPIPE; the C examples check the signal side.)
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(b);
        let e = send_vectored(&a, &[IoSlice::new(b"x")]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}

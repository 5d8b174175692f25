//! One connection of the relay: its handshake state, the frame it is reading, the frames
//! queued for it, and the loop's reads and writes on it (framed non-blocking reads, vectored
//! resumable writes through [`crate::net::conn`], paced by the relay's rate cap). WRITABLE is
//! registered only while something is queued.

use super::Relay;
use crate::buffer::Scratch;
use crate::error::Error;
use crate::net::conn::{self, FrameIn, FrameOut};
use crate::relay::limits::Activity;
use crate::wire::{FrameHeader, PayloadDigest, TagStream, HEADER_LEN};
use mio::net::TcpStream;
use mio::Token;
use std::cell::Cell;
use std::collections::VecDeque;
use std::io::{IoSliceMut, Read};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

/// Payload of a queued frame: none, its own bytes, or bytes shared by several connections
/// (a result or a forwarded broadcast chunk, returned to the job's pool after the last copy).
pub(super) enum Payload {
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
pub(super) struct Fanout {
    pub(super) remaining: Cell<usize>,
    pub(super) root_conn: usize,
    pub(super) ack: FrameHeader,
}

/// A frame queued for a connection: its header and tag state (how much is written), its
/// payload, and the broadcast it completes, if any.
pub(super) struct OutFrame {
    frame: FrameOut,
    payload: Payload,
    fanout: Option<Rc<Fanout>>,
}

/// Where a connection is in its life.
pub(super) enum State {
    AwaitHello {
        nonce: [u8; 32],
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

/// The frame being read.
pub(super) enum ReadState {
    Header {
        buf: [u8; HEADER_LEN],
        got: usize,
    },
    /// Payload, then (after the handshake) tag: acted on only once the tag checked. Boxed:
    /// the running tag is large, and idle connections (in `Header`) should stay small.
    Payload {
        frame: Box<FrameIn>,
        buf: Scratch,
    },
}

/// One accepted connection.
pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) state: State,
    pub(super) read: ReadState,
    pub(super) out: VecDeque<OutFrame>,
    pub(super) out_bytes: usize,
    /// Frame tags, from the Welcome on (before it, frames carry none).
    pub(super) tagged: bool,
    pub(super) tx: TagStream,
    pub(super) rx: Option<TagStream>,
    /// Whether WRITABLE is registered (only while `out` is not empty).
    pub(super) writable: bool,
    pub(super) accepted: Instant,
    /// When bytes last arrived / left (progress resets the connection's deadlines).
    pub(super) last_read: Instant,
    pub(super) last_write: Instant,
}

impl Conn {
    /// A connection accepted at `now`, in `state`, with nothing read or queued.
    pub(super) fn new(stream: TcpStream, peer: SocketAddr, state: State, now: Instant) -> Conn {
        Conn {
            stream,
            peer,
            state,
            read: ReadState::Header {
                buf: [0; HEADER_LEN],
                got: 0,
            },
            out: VecDeque::new(),
            out_bytes: 0,
            tagged: false,
            tx: TagStream::placeholder(),
            rx: None,
            writable: false,
            accepted: now,
            last_read: now,
            last_write: now,
        }
    }

    /// What the connection is doing, for its deadlines.
    pub(super) fn activity(&self) -> Activity {
        Activity {
            authenticated: matches!(self.state, State::Ready { .. }),
            accepted: self.accepted,
            mid_frame: match &self.read {
                ReadState::Header { got, .. } => *got > 0,
                ReadState::Payload { .. } => true,
            },
            last_read: self.last_read,
            backlog: !self.out.is_empty(),
            last_write: self.last_write,
        }
    }
}

impl Relay {
    pub(super) fn send_control(&mut self, id: usize, header: FrameHeader, payload: Vec<u8>) {
        self.enqueue(id, header, Payload::Owned(payload), None);
    }

    pub(super) fn enqueue(
        &mut self,
        id: usize,
        header: FrameHeader,
        payload: Payload,
        fanout: Option<Rc<Fanout>>,
    ) {
        self.enqueue_digest(id, header, payload, fanout, None);
    }

    /// As [`Self::enqueue`], with the payload's hash when it is already known (one payload
    /// fanned out to several peers is hashed once for all their tags).
    pub(super) fn enqueue_digest(
        &mut self,
        id: usize,
        header: FrameHeader,
        payload: Payload,
        fanout: Option<Rc<Fanout>>,
        digest: Option<PayloadDigest>,
    ) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let frame = match digest {
            Some(d) => FrameOut::with_digest(&header, c.tagged, d),
            None => FrameOut::new(&header, c.tagged),
        };
        if c.out.is_empty() {
            // A backlog's deadline counts from when it began.
            c.last_write = self.now;
        }
        c.out_bytes += frame.total(payload.bytes().len());
        c.out.push_back(OutFrame {
            frame,
            payload,
            fanout,
        });
        self.flush(id);
    }

    /// Write queued frames until the socket is full.
    pub(super) fn flush(&mut self, id: usize) {
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
                let total = f.frame.total(payload.len());
                let left = total - f.frame.written;
                let Some(max) = self.pacer.allowance(id, self.now, left) else {
                    break Ok(());
                };
                match f.frame.write_at_most(&c.stream, payload, &mut c.tx, max) {
                    Ok(n) => {
                        self.pacer.consume(n);
                        c.out_bytes -= n;
                        c.last_write = self.now;
                        self.stats.bytes_out += n as u64;
                        if f.frame.written == total {
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
                    Err(e) => break Err(e),
                }
            }
        };
        if let Some(c) = self.conns.get_mut(&id) {
            let queued = !c.out.is_empty();
            if let Err(e) = conn::watch_writable(
                self.poll.registry(),
                &mut c.stream,
                Token(id),
                queued,
                &mut c.writable,
            ) {
                log::warn!("cannot watch connection from {} for writing: {e}", c.peer);
            }
        }
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
    pub(super) fn read_conn(&mut self, id: usize) {
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
            let mid = match &c.read {
                ReadState::Header { got, .. } => *got > 0,
                ReadState::Payload { .. } => true,
            };
            // Ok(true): the header, or the whole frame with its tag, is in.
            let step: std::io::Result<bool> = match &mut c.read {
                ReadState::Header { buf, got } => {
                    match conn::recv(&mut c.stream, &mut [IoSliceMut::new(&mut buf[*got..])]) {
                        Ok(0) => Err(std::io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => {
                            *got += n;
                            c.last_read = self.now;
                            self.stats.bytes_in += n as u64;
                            Ok(*got == HEADER_LEN)
                        }
                        Err(e) => Err(e),
                    }
                }
                ReadState::Payload { frame, buf } if !frame.is_whole() => {
                    let at = frame.got;
                    match frame.read(&mut c.stream, &mut buf.as_mut_slice()[at..]) {
                        Ok(n) => {
                            c.last_read = self.now;
                            self.stats.bytes_in += n as u64;
                            Ok(frame.is_whole())
                        }
                        Err(e) => Err(e),
                    }
                }
                ReadState::Payload { .. } => Ok(true),
            };
            match step {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    let reason = if mid {
                        "connection closed in the middle of a frame"
                    } else {
                        "connection closed by the peer"
                    };
                    self.close(id, reason, mid);
                    return;
                }
                Err(e) => {
                    self.close(id, &format!("receive failed: {e}"), true);
                    return;
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
                ReadState::Payload { frame, .. } if !frame.verify() => {
                    let h = frame.header;
                    Err(Error::remote(format!(
                        "a {:?} frame (op seq {}, offset {}, {} bytes) failed its integrity \
                         check: corrupted or forged in transit",
                        h.kind(),
                        h.seq,
                        h.offset,
                        h.len
                    )))
                }
                ReadState::Payload { frame, buf } => {
                    let digest = frame.payload_digest();
                    self.on_frame(id, frame.header, buf, digest)
                }
            };
            if let Err(e) = res {
                self.close(id, &e.message, true);
                return;
            }
        }
    }
}

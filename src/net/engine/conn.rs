//! One connection of the progress loop: its socket, the frame it is reading, the frames
//! queued to write, and the tag streams of both directions. The loop decides what the frames
//! mean; this file only holds their bytes and moves them with [`crate::net::conn`].

use crate::algo::{Endpoint, Transmit};
use crate::buffer::Region;
use crate::error::Error;
use crate::net::conn::{self, FrameIn, FrameOut};
use crate::wire::{SessionKeys, TagStream, HEADER_LEN, TAG_LEN};
use mio::net::TcpStream;
use std::collections::{HashMap, VecDeque};

/// A frame queued on a connection.
pub(super) struct OutFrame {
    pub frame: FrameOut,
    /// Data frames: the transmit (payload read from the current op's memory).
    pub transmit: Option<Transmit>,
    /// Control frames, or the unsent rest of a data frame whose op ended mid-write.
    pub owned: Vec<u8>,
}

impl OutFrame {
    /// Bytes this frame puts on the wire, tag included.
    pub fn total(&self) -> usize {
        self.frame.total(
            self.transmit
                .as_ref()
                .map_or(self.owned.len(), |t| t.region.len()),
        )
    }
}

/// Where a payload being read goes.
#[derive(Clone, Debug)]
pub(super) enum Sink {
    /// The connection's buffer, then `Schedule::handle_frame` (or a failure report).
    Buffer,
    /// Straight into the current op's memory (zero-copy), then `handle_frame_in_place`.
    Direct(Region),
    /// Nowhere: a stale frame of an op that ended here.
    Discard,
}

/// Read state of a connection.
pub(super) enum ReadState {
    Header {
        buf: [u8; HEADER_LEN],
        got: usize,
    },
    /// A header for an op that has not started here: wait before reading the payload.
    Parked(FrameIn),
    /// Payload and tag: the frame is acted on only once its tag checked.
    Payload {
        frame: FrameIn,
        sink: Sink,
    },
}

impl ReadState {
    pub fn header() -> ReadState {
        ReadState::Header {
            buf: [0; HEADER_LEN],
            got: 0,
        }
    }
}

pub(super) struct Conn {
    pub endpoint: Endpoint,
    pub stream: TcpStream,
    pub read: ReadState,
    /// Payload of the frame being read, 8-byte aligned for the kernels.
    payload: Vec<u64>,
    pub queue: VecDeque<OutFrame>,
    /// Wire bytes of the frames in `queue` not yet written.
    pub queued_bytes: usize,
    /// The peer said goodbye: it destroyed its communicator on purpose.
    pub goodbye: bool,
    pub closed: bool,
    /// Tags of the frames this side sends and checks of those it receives.
    pub tx: TagStream,
    pub rx: TagStream,
    /// Whether WRITABLE is registered (only while `queue` is not empty).
    pub writable: bool,
}

impl Conn {
    pub fn new(endpoint: Endpoint, stream: TcpStream, keys: SessionKeys) -> Conn {
        let (tx, rx) = keys.streams();
        Conn {
            tx,
            rx,
            writable: false,
            endpoint,
            stream,
            read: ReadState::header(),
            payload: Vec::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            goodbye: false,
            closed: false,
        }
    }

    /// Read more of `frame`'s payload (which is `len` bytes, `got` of them read) into the
    /// payload buffer.
    pub fn read_payload(
        &mut self,
        frame: &mut FrameIn,
        len: usize,
        got: usize,
    ) -> std::io::Result<usize> {
        let words = len.div_ceil(8);
        if self.payload.len() < words {
            self.payload.resize(words, 0);
        }
        let buf = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut self.payload)[got..len];
        frame.read(&mut self.stream, buf)
    }

    /// The first `len` bytes of the payload buffer, as filled by [`Conn::read_payload`].
    pub fn payload(&self, len: usize) -> &[u8] {
        let bytes: &[u8] = bytemuck::cast_slice(&self.payload);
        &bytes[..len.min(bytes.len())]
    }

    /// Stop using the connection: deregister it and, if `shutdown`, close both directions.
    pub fn close(&mut self, registry: &mio::Registry, shutdown: bool) {
        if self.closed {
            return;
        }
        self.closed = true;
        let _ = registry.deregister(&mut self.stream);
        if shutdown {
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// What reading a connection produced, besides frames.
pub(super) enum ReadEvent {
    /// Nothing more now.
    Idle,
    Closed(Error),
}

pub(super) fn read_some(
    stream: &mut TcpStream,
    buf: &mut [u8],
    ep: Endpoint,
) -> std::result::Result<usize, ReadEvent> {
    match conn::recv(stream, &mut [std::io::IoSliceMut::new(buf)]) {
        Ok(0) => Err(read_error(std::io::ErrorKind::UnexpectedEof.into(), ep)),
        Ok(n) => Ok(n),
        Err(e) => Err(read_error(e, ep)),
    }
}

/// What a failed read from `ep` means for the loop.
pub(super) fn read_error(e: std::io::Error, ep: Endpoint) -> ReadEvent {
    match e.kind() {
        std::io::ErrorKind::WouldBlock => ReadEvent::Idle,
        std::io::ErrorKind::UnexpectedEof => ReadEvent::Closed(Error::remote(format!(
            "connection closed by {ep} (process exited or failed?)"
        ))),
        _ => ReadEvent::Closed(Error::io(format!("receiving from {ep}"), e)),
    }
}

/// Bytes a tagged frame with `payload` bytes puts on the wire.
pub(super) fn wire_len(payload: usize) -> usize {
    HEADER_LEN + payload + TAG_LEN
}

/// Whether rank `r` has gone away: every connection to it is closed here, or its end hung up
/// (a process that exits or dies has its sockets closed by the kernel).
pub(super) fn rank_gone(
    conns: &[Conn],
    by_endpoint: &HashMap<Endpoint, Vec<usize>>,
    r: usize,
) -> bool {
    use std::os::unix::io::AsRawFd;
    let Some(ids) = by_endpoint.get(&Endpoint::Rank(r)) else {
        return false;
    };
    ids.iter().any(|&i| {
        let c = &conns[i];
        if c.closed {
            return true;
        }
        let mut fd = libc::pollfd {
            fd: c.stream.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout; poll only writes `revents`.
        let n = unsafe { libc::poll(&mut fd, 1, 0) };
        n > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    })
}

/// The kernel's minimum round-trip time on `stream` in microseconds (`TCP_INFO`).
pub(super) fn tcp_min_rtt_us(stream: &TcpStream) -> Option<u32> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: tcp_info is plain old data, so all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd, and `info`/`len` describe a writable buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // Kernels older than the field leave it out (short `len`) or report 0.
    let have = std::mem::offset_of!(libc::tcp_info, tcpi_min_rtt) + 4 <= len as usize;
    (rc == 0 && have && info.tcpi_min_rtt > 0).then_some(info.tcpi_min_rtt)
}

//! Collective schedules as sans-IO state machines.
//!
//! A schedule owns no socket, thread or clock. The driver (the event loop in [`crate::net`],
//! or the simulator in tests) feeds it events and asks it what to do next:
//!
//! * [`Schedule::poll_transmit`] — the next frame to send, to whom, and from which region of
//!   the op's memory. The driver keeps the region untouched until it reports
//!   [`Schedule::handle_sent`]; schedules bound how many bytes they have in flight themselves.
//! * [`Schedule::handle_frame`] — a whole data frame arrived from an endpoint.
//! * [`Schedule::handle_sent`] — a transmit was fully written.
//! * [`Schedule::is_complete`] — every expected frame arrived and every transmit was sent.
//!
//! Poll order for a driver: after every batch of events, call `poll_transmit` until it returns
//! `None`, then check `is_complete`. Frames may arrive in any order (data can spread across
//! several TCP streams); every schedule accepts them so.

pub mod broadcast;
pub(crate) mod check;
pub mod compressed;
pub mod doubling;
pub mod exchange;
#[cfg(test)]
mod golden;
pub mod p2p;
pub mod plan;
pub mod relay;
pub mod ring;
#[cfg(test)]
pub mod sim;
pub mod span;
pub(crate) mod tally;

use crate::buffer::{OpMemory, Region};
use crate::compress::Compression;
use crate::error::{Error, Result};
use crate::types::{DType, ReduceOp};
use crate::wire::FrameHeader;

/// Who a frame goes to or comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    Rank(usize),
    Relay(usize),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Rank(r) => write!(f, "rank {r}"),
            Endpoint::Relay(r) => write!(f, "relay {r}"),
        }
    }
}

/// Which collective an op is; the discriminant travels in [`FrameHeader::coll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Collective {
    AllReduce = 1,
    Broadcast = 2,
    AllGather = 3,
    ReduceScatter = 4,
    Barrier = 5,
    Gather = 6,
    Scatter = 7,
    AllToAll = 8,
    AllToAllV = 9,
    /// A group of sends and receives ([`p2p`]); its frames carry their peer pair's own
    /// sequence, not the communicator's.
    PointToPoint = 10,
}

impl Collective {
    pub const ALL: [Collective; 10] = [
        Collective::AllReduce,
        Collective::Broadcast,
        Collective::AllGather,
        Collective::ReduceScatter,
        Collective::Barrier,
        Collective::Gather,
        Collective::Scatter,
        Collective::AllToAll,
        Collective::AllToAllV,
        Collective::PointToPoint,
    ];

    /// The collective a wire or shared-memory code names, if any.
    pub fn from_raw(v: u64) -> Option<Collective> {
        Collective::ALL.into_iter().find(|c| *c as u64 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Collective::AllReduce => "allreduce",
            Collective::Broadcast => "broadcast",
            Collective::AllGather => "allgather",
            Collective::ReduceScatter => "reduce_scatter",
            Collective::Barrier => "barrier",
            Collective::Gather => "gather",
            Collective::Scatter => "scatter",
            Collective::AllToAll => "alltoall",
            Collective::AllToAllV => "alltoallv",
            Collective::PointToPoint => "send/recv",
        }
    }
}

/// Everything that identifies one op, as the calling rank sees it. Peers compare the fields
/// carried in each data frame against their own to catch mismatched calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpDesc {
    pub coll: Collective,
    /// Position of the op in the communicator's sequence (starts at 1).
    pub seq: u64,
    pub dtype: DType,
    pub op: ReduceOp,
    /// Elements in the caller's in/out buffer for all-reduce and broadcast; elements per rank
    /// for all-gather, reduce-scatter, gather, scatter and all-to-all; 0 for all-to-all-v,
    /// whose frames carry each transfer's own count.
    pub count: usize,
    /// Broadcast, gather and scatter root.
    pub root: usize,
    /// Wire format of the op's float data ([`Compression::None`] for every op but a
    /// compressed float all-reduce, all-gather or broadcast). Travels in the high nibble of
    /// [`FrameHeader::redop`].
    pub compress: Compression,
}

impl std::fmt::Display for OpDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.coll {
            Collective::AllReduce | Collective::ReduceScatter => {
                write!(
                    f,
                    "{}(seq {}, {} x {}, {}",
                    self.coll.name(),
                    self.seq,
                    self.count,
                    self.dtype,
                    self.op
                )?;
                if self.compress != Compression::None {
                    write!(f, ", {} on the wire", self.compress)?;
                }
                f.write_str(")")
            }
            Collective::Broadcast | Collective::AllGather => {
                match self.coll {
                    Collective::Broadcast => write!(
                        f,
                        "broadcast(seq {}, {} x {}, root {}",
                        self.seq, self.count, self.dtype, self.root
                    )?,
                    _ => write!(
                        f,
                        "allgather(seq {}, {} x {}",
                        self.seq, self.count, self.dtype
                    )?,
                }
                if self.compress != Compression::None {
                    write!(f, ", {} on the wire", self.compress)?;
                }
                f.write_str(")")
            }
            Collective::Barrier => write!(f, "barrier(seq {})", self.seq),
            Collective::Gather | Collective::Scatter => write!(
                f,
                "{}(seq {}, {} x {} per rank, root {})",
                self.coll.name(),
                self.seq,
                self.count,
                self.dtype,
                self.root
            ),
            Collective::AllToAll => write!(
                f,
                "alltoall(seq {}, {} x {} per rank)",
                self.seq, self.count, self.dtype
            ),
            Collective::AllToAllV => {
                write!(f, "alltoallv(seq {}, {})", self.seq, self.dtype)
            }
            Collective::PointToPoint => write!(f, "send/recv group of {} ops", self.count),
        }
    }
}

impl OpDesc {
    /// A descriptor with no compression.
    pub fn new(
        coll: Collective,
        seq: u64,
        dtype: DType,
        op: ReduceOp,
        count: usize,
        root: usize,
    ) -> OpDesc {
        OpDesc {
            coll,
            seq,
            dtype,
            op,
            count,
            root,
            compress: Compression::None,
        }
    }

    /// The `redop` byte of this op's frames: the reduction in the low nibble, the wire
    /// format in the high one.
    pub fn redop_byte(&self) -> u8 {
        self.op as u8 | (self.compress as u8) << 4
    }

    /// A data frame header for this op.
    pub fn header(&self, step: u32, offset: usize, len: usize) -> FrameHeader {
        FrameHeader {
            kind: crate::wire::FrameKind::Data as u8,
            coll: self.coll as u8,
            dtype: self.dtype as u8,
            redop: self.redop_byte(),
            aux: step,
            seq: self.seq,
            count: self.count as u64,
            offset: offset as u64,
            len: len as u64,
        }
    }

    /// Check that a data frame belongs to an op called the same way as ours.
    pub fn check_matches(&self, from: Endpoint, h: &FrameHeader) -> Result<()> {
        let same = h.coll == self.coll as u8
            && h.dtype == self.dtype as u8
            && h.redop == self.redop_byte()
            && h.count == self.count as u64;
        if same {
            return Ok(());
        }
        let theirs = (|| {
            let coll = Collective::from_raw(u64::from(h.coll))?;
            Some(OpDesc {
                coll,
                seq: h.seq,
                dtype: DType::from_raw(h.dtype as u32).ok()?,
                op: ReduceOp::from_raw(u32::from(h.redop & 0x0f)).ok()?,
                count: h.count as usize,
                root: self.root,
                compress: Compression::from_u8(h.redop >> 4)?,
            })
        })();
        Err(Error::invalid(match theirs {
            Some(t) => format!(
                "mismatched collective calls: {from} called {t} but this rank called {self}"
            ),
            None => format!(
                "mismatched collective calls: {from} sent an unrecognisable op header for seq {}",
                h.seq
            ),
        }))
    }
}

/// A frame to send.
#[derive(Clone, Debug)]
pub struct Transmit {
    pub to: Endpoint,
    pub header: FrameHeader,
    pub region: Region,
    /// The payload is exactly the bytes a frame of this op landed in place in this region
    /// ([`Region::User`] or [`Region::Acc`], same offset and length), unchanged since (a chunk
    /// passed on along a ring or a broadcast chain): the driver may tag it with the payload
    /// digest it computed on arrival instead of hashing the bytes again.
    pub forward: bool,
}

/// A collective schedule; see the module docs for the driving protocol.
pub trait Schedule: Send {
    fn desc(&self) -> &OpDesc;

    /// Called once by the driver with the op's memory before the first `poll_transmit`
    /// (after the driver handed the op a spare [`OpMemory::backup`]): room the schedule needs
    /// for the whole op is taken here, where a failure can still fail the op cleanly.
    fn start(&mut self, _mem: &mut OpMemory) -> Result<()> {
        Ok(())
    }

    /// The next frame to send, if any is ready. May write into `mem` (e.g. to convert the
    /// caller's f16 data into the f32 accumulator before sending it).
    #[must_use]
    fn poll_transmit(&mut self, mem: &mut OpMemory) -> Option<Transmit>;

    /// A transmit returned by `poll_transmit` has been completely written.
    fn handle_sent(&mut self, t: &Transmit);

    /// A data frame for this op arrived. An error fails the op.
    fn handle_frame(
        &mut self,
        mem: &mut OpMemory,
        from: Endpoint,
        header: &FrameHeader,
        payload: &[u8],
    ) -> Result<()>;

    /// Zero-copy receive: if this frame's payload can be read straight into the op's memory,
    /// the (validated) region to read it into; the driver then calls
    /// [`Schedule::handle_frame_in_place`] instead of `handle_frame`. `None`: deliver through
    /// `handle_frame`. An error fails the op before any byte is written.
    fn recv_in_place(&mut self, _from: Endpoint, _header: &FrameHeader) -> Result<Option<Region>> {
        Ok(None)
    }

    /// The payload of a frame accepted by `recv_in_place` is now in its region.
    fn handle_frame_in_place(
        &mut self,
        _mem: &mut OpMemory,
        from: Endpoint,
        header: &FrameHeader,
    ) -> Result<()> {
        Err(Error::internal(format!(
            "{from}: in-place frame for step {} not expected",
            header.aux
        )))
    }

    /// Every frame arrived and every transmit was sent: the result is in place.
    fn is_complete(&self) -> bool;

    /// An endpoint became unusable. Schedules that can route around it (relay mode) return
    /// `Ok`. The default fails the op with `err` when a rank is lost and ignores a lost relay,
    /// which a schedule that never sends to relays does not need; schedules that do send to
    /// relays override this.
    fn handle_endpoint_lost(
        &mut self,
        _mem: &mut OpMemory,
        ep: Endpoint,
        err: Error,
    ) -> Result<()> {
        match ep {
            Endpoint::Rank(_) => Err(err),
            Endpoint::Relay(_) => Ok(()),
        }
    }

    /// Whether the op is waiting for frames from `ep` now (it has unanswered chunks there).
    /// The driver uses it to notice a relay that stopped answering.
    fn waits_on(&self, _ep: Endpoint) -> bool {
        false
    }

    /// An endpoint the schedule stopped using on its own (e.g. another rank reported the
    /// relay lost); the driver closes its connections and keeps it out of later ops.
    #[must_use]
    fn poll_endpoint_dropped(&mut self) -> Option<Endpoint> {
        None
    }

    /// Human-readable summary of what the schedule still waits for (used in timeout errors).
    fn waiting_for(&self) -> String;

    /// Whether a point-to-point frame ([`Collective::PointToPoint`], routed by its pair
    /// sequence rather than the op's) belongs to this op. Only point-to-point schedules take
    /// any.
    fn accepts_p2p(&self, _from: Endpoint, _header: &FrameHeader) -> bool {
        false
    }

    /// The point-to-point messages of this op, per peer and direction (empty for
    /// collectives). Its failure notices go to those peers and name these messages; once it
    /// ended here, frames of the messages it received are stale.
    fn p2p_ranges(&self) -> Vec<p2p::PairRange> {
        Vec::new()
    }
}

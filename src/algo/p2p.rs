//! Point-to-point: a group of sends and receives that run as one op.
//!
//! Only the two ranks of a pair call a send and its receive, so point-to-point ops must not
//! consume the communicator-wide op sequence that matches collective frames (the other ranks
//! would fall out of step). Instead every ordered pair of ranks numbers its messages: a rank's
//! k-th send to peer p is message k from it to p, and p's k-th receive from it is that same
//! message. Frames carry that **pair sequence** in `seq`, the caller's tag in `aux`, the
//! message's element count in `count` and the byte offset within the message in `offset`; the
//! engine routes them by [`Schedule::accepts_p2p`] rather than by op sequence. A receive whose
//! tag, dtype or count differ from the matching send fails naming both.
//!
//! A group ([`crate::comm::Comm::submit_p2p`], `mr_group_start`/`mr_group_end` in the C ABI)
//! runs all its sends and receives at once, so rings and exchanges of any size cannot deadlock
//! on each other. A message of zero elements is one empty frame. This module never touches a
//! socket or a clock.

use crate::algo::span::chunks;
use crate::algo::{Collective, Endpoint, OpDesc, Schedule, Transmit};
use crate::buffer::{OpMemory, Region};
use crate::error::{Error, Result};
use crate::types::DType;
use crate::wire::{FrameHeader, FrameKind};
use std::collections::VecDeque;

/// One send or receive of a group. Its bytes are the whole of `OpMemory::buffers[buffer]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub peer: usize,
    pub tag: u32,
    /// Pair sequence: the n-th message between this rank and `peer` in this direction.
    pub seq: u64,
    pub dtype: DType,
    /// Elements.
    pub count: usize,
    /// Index into `OpMemory::buffers`.
    pub buffer: usize,
}

#[derive(Debug)]
struct Incoming {
    msg: Message,
    received: usize,
    heard: bool,
}

impl Incoming {
    fn bytes(&self) -> usize {
        self.msg.count * self.msg.dtype.size()
    }
    fn done(&self) -> bool {
        self.heard && self.received == self.bytes()
    }
}

/// The messages a group exchanges with one peer in one direction: pair sequences `lo..=hi`
/// (a group's messages to or from one peer are numbered consecutively).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairRange {
    pub peer: usize,
    /// Messages this rank sends to `peer` (else receives from it).
    pub sends: bool,
    pub lo: u64,
    pub hi: u64,
}

impl PairRange {
    /// Whether this range and `other`'s messages overlap: the same peer and direction and
    /// a common pair sequence.
    pub fn overlaps(&self, peer: usize, sends: bool, lo: u64, hi: u64) -> bool {
        self.peer == peer && self.sends == sends && self.lo <= hi && lo <= self.hi
    }
}

fn ranges(msgs: &[Message], sends: bool) -> Vec<PairRange> {
    let mut out: Vec<PairRange> = Vec::new();
    for m in msgs {
        match out.iter_mut().find(|r| r.peer == m.peer) {
            Some(r) => {
                r.lo = r.lo.min(m.seq);
                r.hi = r.hi.max(m.seq);
            }
            None => out.push(PairRange {
                peer: m.peer,
                sends,
                lo: m.seq,
                hi: m.seq,
            }),
        }
    }
    out
}

/// Runs a group of sends and receives. Poll order as for every schedule.
pub struct PointToPoint {
    desc: OpDesc,
    ranges: Vec<PairRange>,
    queue: VecDeque<Transmit>,
    unsent_frames: usize,
    incoming: Vec<Incoming>,
}

impl PointToPoint {
    /// `desc.coll` is [`Collective::PointToPoint`]; `desc.seq` is the communicator's last op
    /// sequence (the group takes none of its own).
    pub fn new(desc: OpDesc, chunk_bytes: usize, sends: Vec<Message>, recvs: Vec<Message>) -> Self {
        debug_assert_eq!(desc.coll, Collective::PointToPoint);
        let mut pair_ranges = ranges(&sends, true);
        pair_ranges.extend(ranges(&recvs, false));
        let mut queue = VecDeque::new();
        for m in &sends {
            let elem = m.dtype.size();
            let bytes = m.count * elem;
            let mut frame = |offset: usize, len: usize| {
                let header = FrameHeader {
                    kind: FrameKind::Data as u8,
                    coll: Collective::PointToPoint as u8,
                    dtype: m.dtype as u8,
                    redop: 0,
                    aux: m.tag,
                    seq: m.seq,
                    count: m.count as u64,
                    offset: offset as u64,
                    len: len as u64,
                };
                queue.push_back(Transmit {
                    to: Endpoint::Rank(m.peer),
                    header,
                    region: Region::Buffer {
                        index: m.buffer,
                        offset,
                        len,
                    },
                    forward: false,
                });
            };
            if bytes == 0 {
                frame(0, 0);
            }
            for c in chunks(0..bytes, elem, chunk_bytes) {
                frame(c.start, c.len());
            }
        }
        PointToPoint {
            desc,
            ranges: pair_ranges,
            unsent_frames: queue.len(),
            queue,
            incoming: recvs
                .into_iter()
                .map(|msg| Incoming {
                    msg,
                    received: 0,
                    heard: false,
                })
                .collect(),
        }
    }

    fn find(&self, from: Endpoint, h: &FrameHeader) -> Option<usize> {
        let Endpoint::Rank(p) = from else {
            return None;
        };
        self.incoming
            .iter()
            .position(|t| t.msg.peer == p && t.msg.seq == h.seq)
    }

    /// Check a frame against the receive it matches; (receive index, region to fill).
    fn target(&self, from: Endpoint, h: &FrameHeader) -> Result<(usize, Region)> {
        let k = self.find(from, h).ok_or_else(|| {
            Error::internal(format!(
                "{from}: point-to-point message {} routed to a group that does not receive it",
                h.seq
            ))
        })?;
        let t = &self.incoming[k];
        let m = &t.msg;
        if h.aux != m.tag || h.dtype != m.dtype as u8 || h.count != m.count as u64 {
            let theirs = DType::from_raw(u32::from(h.dtype))
                .map_or_else(|_| format!("dtype code {}", h.dtype), |d| d.to_string());
            return Err(Error::invalid(format!(
                "mismatched send/recv: {from} sent {} x {theirs} with tag {} (its send #{} to \
                 this rank), but the matching recv here expects {} x {} with tag {}",
                h.count, h.aux, h.seq, m.count, m.dtype, m.tag
            )));
        }
        let elem = m.dtype.size();
        let (start, len) = (h.offset as usize, h.len as usize);
        if h.offset > usize::MAX as u64
            || start.saturating_add(len) > t.bytes()
            || start % elem != 0
            || len % elem != 0
            || t.received + len > t.bytes()
        {
            return Err(Error::remote(format!(
                "{from} sent {len} bytes at offset {} of a {}-byte message (send #{}, {} bytes \
                 already received)",
                h.offset,
                t.bytes(),
                h.seq,
                t.received
            )));
        }
        Ok((
            k,
            Region::Buffer {
                index: m.buffer,
                offset: start,
                len,
            },
        ))
    }

    fn landed(&mut self, k: usize, len: usize) {
        self.incoming[k].received += len;
        self.incoming[k].heard = true;
    }
}

impl Schedule for PointToPoint {
    fn desc(&self) -> &OpDesc {
        &self.desc
    }

    fn poll_transmit(&mut self, _mem: &mut OpMemory) -> Option<Transmit> {
        self.queue.pop_front()
    }

    fn handle_sent(&mut self, _t: &Transmit) {
        self.unsent_frames -= 1;
    }

    fn handle_frame(
        &mut self,
        mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
        payload: &[u8],
    ) -> Result<()> {
        let (k, region) = self.target(from, h)?;
        mem.bytes_mut(&region).copy_from_slice(payload);
        self.landed(k, payload.len());
        Ok(())
    }

    fn recv_in_place(&mut self, from: Endpoint, h: &FrameHeader) -> Result<Option<Region>> {
        Ok(Some(self.target(from, h)?.1))
    }

    fn handle_frame_in_place(
        &mut self,
        _mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
    ) -> Result<()> {
        let (k, _) = self.target(from, h)?;
        self.landed(k, h.len as usize);
        Ok(())
    }

    fn is_complete(&self) -> bool {
        self.queue.is_empty() && self.unsent_frames == 0 && self.incoming.iter().all(Incoming::done)
    }

    fn waiting_for(&self) -> String {
        let missing: Vec<String> = self
            .incoming
            .iter()
            .filter(|t| !t.done())
            .map(|t| {
                format!(
                    "message #{} from rank {} (tag {}, {} of {} bytes)",
                    t.msg.seq,
                    t.msg.peer,
                    t.msg.tag,
                    t.received,
                    t.bytes()
                )
            })
            .collect();
        format!(
            "{}; {} frames unsent",
            if missing.is_empty() {
                "nothing to receive".to_string()
            } else {
                missing.join(", ")
            },
            self.unsent_frames
        )
    }

    fn accepts_p2p(&self, from: Endpoint, h: &FrameHeader) -> bool {
        self.find(from, h).is_some()
    }

    fn p2p_ranges(&self) -> Vec<PairRange> {
        self.ranges.clone()
    }
}

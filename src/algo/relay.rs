//! Relay schedules (peer side): the buffer is cut into one segment per relay; every peer sends
//! segment k to relay k in chunks of at most `chunk_bytes`, and the relay answers each chunk
//! with the rank-ordered reduction (all-reduce) or forwards the root's chunk to the others
//! (broadcast). Results land directly in the caller's buffer.
//!
//! Flow control: at most `window` chunks per relay are unanswered at a time (a result for
//! all-reduce, an empty acknowledgement for the broadcast root), so a relay holds at most
//! `peers × window` chunks of a job whatever the tensor size.

use crate::algo::plan::{block, bytes, segments};
use crate::algo::{Collective, Endpoint, OpDesc, Schedule, Transmit};
use crate::buffer::{OpMemory, Region};
use crate::error::{Error, Result};
use crate::wire::FrameHeader;
use std::ops::Range;

/// Chunks in flight per relay.
pub const DEFAULT_WINDOW: usize = 4;

/// What this rank does in the op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Send every chunk, receive every result.
    AllReduce,
    /// Send every chunk, receive an acknowledgement for each.
    Root,
    /// Send nothing, receive every chunk.
    Receiver,
}

/// One relay's segment of the buffer.
struct Lane {
    relay: usize,
    /// Byte start of the segment and the chunk stride.
    start: usize,
    stride: usize,
    chunks: Vec<Range<usize>>,
    next_send: usize,
    in_flight: usize,
    answered: Vec<bool>,
    answered_count: usize,
}

/// All-reduce or broadcast through relays.
pub struct RelaySchedule {
    desc: OpDesc,
    role: Role,
    window: usize,
    lanes: Vec<Lane>,
    /// Lane to try first in the next `poll_transmit` (round robin).
    turn: usize,
    send_expected: usize,
    sent: usize,
}

impl RelaySchedule {
    /// `relays`: the relay indices (as in [`Endpoint::Relay`]) every rank agreed to use.
    pub fn new(
        desc: OpDesc,
        rank: usize,
        relays: &[usize],
        chunk_bytes: usize,
        window: usize,
    ) -> RelaySchedule {
        assert!(!relays.is_empty(), "relay schedule without relays");
        let size = desc.dtype.size();
        let role = match desc.coll {
            Collective::AllReduce => Role::AllReduce,
            Collective::Broadcast if desc.root == rank => Role::Root,
            Collective::Broadcast => Role::Receiver,
            other => panic!("relays do not serve {}", other.name()),
        };
        let stride = (chunk_bytes / size).max(1) * size;
        let lanes: Vec<Lane> = relays
            .iter()
            .enumerate()
            .map(|(k, &relay)| {
                let seg = bytes(&block(desc.count, relays.len(), k), size);
                let chunks: Vec<_> = segments(seg.clone(), size, chunk_bytes).collect();
                Lane {
                    relay,
                    start: seg.start,
                    stride,
                    answered: vec![false; chunks.len()],
                    chunks,
                    next_send: 0,
                    in_flight: 0,
                    answered_count: 0,
                }
            })
            .collect();
        let send_expected = if role == Role::Receiver {
            0
        } else {
            desc.count * size
        };
        RelaySchedule {
            desc,
            role,
            window: window.max(1),
            lanes,
            turn: 0,
            send_expected,
            sent: 0,
        }
    }

    fn aux(&self) -> u32 {
        match self.desc.coll {
            Collective::Broadcast => self.desc.root as u32,
            _ => 0,
        }
    }
}

impl Schedule for RelaySchedule {
    fn desc(&self) -> &OpDesc {
        &self.desc
    }

    fn poll_transmit(&mut self, _mem: &mut OpMemory) -> Option<Transmit> {
        if self.role == Role::Receiver {
            return None;
        }
        let n = self.lanes.len();
        let aux = self.aux();
        for i in 0..n {
            let k = (self.turn + i) % n;
            let lane = &mut self.lanes[k];
            if lane.next_send < lane.chunks.len() && lane.in_flight < self.window {
                let r = lane.chunks[lane.next_send].clone();
                lane.next_send += 1;
                lane.in_flight += 1;
                self.turn = (k + 1) % n;
                let mut header = self.desc.header(0, r.start, r.len());
                header.aux = aux;
                return Some(Transmit {
                    to: Endpoint::Relay(lane.relay),
                    header,
                    region: Region::User {
                        offset: r.start,
                        len: r.len(),
                    },
                });
            }
        }
        None
    }

    fn handle_sent(&mut self, t: &Transmit) {
        self.sent += t.region.len();
    }

    fn handle_frame(
        &mut self,
        mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
        payload: &[u8],
    ) -> Result<()> {
        self.desc.check_matches(from, h)?;
        let desc = self.desc;
        let aux = self.aux();
        let bad = |what: String| Err(Error::remote(format!("{desc}: {from} {what}")));
        if h.aux != aux {
            return bad(format!(
                "sent a frame for root {}, expected root {aux}",
                h.aux
            ));
        }
        let Endpoint::Relay(relay) = from else {
            return bad("sent relay-mode data, but only relays do".into());
        };
        let Some(lane) = self.lanes.iter_mut().find(|l| l.relay == relay) else {
            return bad("is not one of this op's relays".into());
        };
        let off = h.offset as usize;
        let idx = match off.checked_sub(lane.start) {
            Some(d) if h.offset <= usize::MAX as u64 && d % lane.stride == 0 => d / lane.stride,
            _ => usize::MAX,
        };
        let Some(r) = lane.chunks.get(idx).cloned() else {
            return bad(format!(
                "answered offset {off}, which is not a chunk of its segment"
            ));
        };
        if lane.answered[idx] {
            return bad(format!("answered bytes {}..{} twice", r.start, r.end));
        }
        let expect_len = if self.role == Role::Root { 0 } else { r.len() };
        if payload.len() != expect_len {
            return bad(format!(
                "answered bytes {}..{} with {} bytes, expected {expect_len}",
                r.start,
                r.end,
                payload.len()
            ));
        }
        if self.role != Role::Receiver && idx >= lane.next_send {
            return bad(format!(
                "answered bytes {}..{} before they were sent",
                r.start, r.end
            ));
        }
        if self.role != Role::Root {
            mem.user.as_mut_slice()[r].copy_from_slice(payload);
        }
        lane.answered[idx] = true;
        lane.answered_count += 1;
        lane.in_flight = lane.in_flight.saturating_sub(1);
        Ok(())
    }

    fn is_complete(&self) -> bool {
        self.sent == self.send_expected
            && self
                .lanes
                .iter()
                .all(|l| l.answered_count == l.chunks.len())
    }

    fn waiting_for(&self) -> String {
        let missing: Vec<String> = self
            .lanes
            .iter()
            .filter(|l| l.answered_count < l.chunks.len())
            .map(|l| {
                format!(
                    "relay {}: {} of {} chunks answered, {} sent",
                    l.relay,
                    l.answered_count,
                    l.chunks.len(),
                    l.next_send
                )
            })
            .collect();
        format!(
            "{}; sent {} of {} bytes",
            if missing.is_empty() {
                "all chunks answered".into()
            } else {
                missing.join(", ")
            },
            self.sent,
            self.send_expected
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::RawBuf;
    use crate::types::{DType, ReduceOp};

    fn desc(coll: Collective, count: usize, root: usize) -> OpDesc {
        OpDesc {
            coll,
            seq: 1,
            dtype: DType::I32,
            op: ReduceOp::Sum,
            count,
            root,
        }
    }

    #[test]
    fn allreduce_keeps_a_window_per_relay_and_writes_results() {
        let d = desc(Collective::AllReduce, 103, 0);
        let mut buf = vec![0u8; 103 * 4];
        // SAFETY: `buf` outlives `mem` and is only used through it.
        let mut mem = OpMemory::new(unsafe { RawBuf::new(buf.as_mut_ptr(), buf.len()) });
        let mut s = RelaySchedule::new(d, 0, &[0, 2], 64, 2);
        let mut out = Vec::new();
        while let Some(t) = s.poll_transmit(&mut mem) {
            out.push(t);
        }
        // Two relays, two chunks in flight each.
        assert_eq!(out.len(), 4);
        assert_eq!(out.iter().filter(|t| t.to == Endpoint::Relay(2)).count(), 2);
        for t in &out {
            s.handle_sent(t);
        }
        // A result for a chunk that was never sent, a wrong length, a stranger: errors.
        let t = &out[0];
        let mut late = t.header;
        late.offset += 3 * 64;
        assert!(s.handle_frame(&mut mem, t.to, &late, &[0; 64]).is_err());
        assert!(s.handle_frame(&mut mem, t.to, &t.header, &[0; 8]).is_err());
        assert!(s
            .handle_frame(&mut mem, Endpoint::Relay(1), &t.header, &[7; 64])
            .is_err());
        s.handle_frame(&mut mem, t.to, &t.header, &[7; 64]).unwrap();
        assert!(s.handle_frame(&mut mem, t.to, &t.header, &[7; 64]).is_err());
        // The answer freed one slot on that relay.
        let next = s.poll_transmit(&mut mem).unwrap();
        assert_eq!(next.to, t.to);
        assert!(s.poll_transmit(&mut mem).is_none());
        assert!(!s.is_complete());
        assert!(buf[..64].iter().all(|&b| b == 7));
    }

    #[test]
    fn broadcast_root_waits_for_acks_and_receivers_send_nothing() {
        let d = desc(Collective::Broadcast, 40, 1);
        let mut buf = vec![0u8; 160];
        // SAFETY: `buf` outlives `mem` and is only used through it.
        let mut mem = OpMemory::new(unsafe { RawBuf::new(buf.as_mut_ptr(), buf.len()) });
        let mut root = RelaySchedule::new(d, 1, &[0], 64, 4);
        let sent: Vec<_> = std::iter::from_fn(|| root.poll_transmit(&mut mem)).collect();
        assert_eq!(sent.len(), 3);
        for t in &sent {
            assert_eq!(t.header.aux, 1);
            root.handle_sent(t);
            assert!(!root.is_complete());
            let ack = FrameHeader { len: 0, ..t.header };
            root.handle_frame(&mut mem, t.to, &ack, &[]).unwrap();
        }
        assert!(root.is_complete());
        let mut recv = RelaySchedule::new(d, 0, &[0], 64, 4);
        assert!(recv.poll_transmit(&mut mem).is_none());
        for t in &sent {
            recv.handle_frame(&mut mem, t.to, &t.header, &vec![5; t.region.len()])
                .unwrap();
        }
        assert!(recv.is_complete());
        let empty = RelaySchedule::new(desc(Collective::AllReduce, 0, 0), 0, &[0, 1, 2], 64, 4);
        assert!(empty.is_complete());
    }
}

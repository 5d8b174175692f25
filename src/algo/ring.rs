//! The pipelined ring among the ranks: reduce-scatter, all-gather, and the two in a row
//! (all-reduce).
//!
//! Ring vocabulary (n ranks, this rank r, `next` = r+1, `prev` = r−1, all mod n):
//! * the buffer is cut into n **blocks**; rank r ends the reduce-scatter owning block r;
//! * reduce-scatter step s (0..n−1): r sends block r−s−1 to `next` and receives block r−s−2
//!   from `prev`, combining it with its own contribution; the block received at step s is
//!   the one sent at step s+1, and the one received at step n−2 is block r, now final;
//! * all-gather step t (0..n−1): r sends block r−t and receives block r−t−1, forwarding it
//!   at step t+1;
//! * every block travels as **chunks** of at most `chunk_bytes` ([`crate::algo::span`]), each
//!   chunk moving on as soon as it arrives, so receiving, reducing and sending overlap.
//!
//! Reduce-scatter partials travel in the accumulator dtype (f32 for f16/bf16, rounded once when
//! final). Each block is reduced by exactly one chain of ranks and then copied, so every rank
//! ends with the same bytes. Frame offsets are byte offsets: in accumulator units for
//! reduce-scatter frames, in the caller's dtype for all-gather frames.

use crate::algo::check::{check_range, check_ring_frame};
use crate::algo::span::{block, byte_range, chunks, ring_index};
use crate::algo::tally::Tally;
use crate::algo::{Endpoint, OpDesc, Schedule, Transmit};
use crate::buffer::{OpMemory, Region};
use crate::error::{Error, Result};
use crate::reduce;
use crate::types::ReduceOp;
use crate::wire::FrameHeader;
use std::ops::Range;

/// Pipelined ring reduce-scatter, optionally followed by the ring all-gather (= all-reduce).
pub struct RingReduce {
    desc: OpDesc,
    rank: usize,
    n: usize,
    /// Most bytes of one frame (`chunk_bytes`).
    chunk: usize,
    /// All-reduce: own data and result in `mem.user`, and the all-gather phase runs once
    /// block r is final (its steps follow the reduce-scatter's, from n − 1).
    /// Reduce-scatter (`None`): own data in `mem.input`, block r's result to `mem.user`.
    gather: Option<GatherPhase>,
    /// Partials accumulate in the caller's buffer (all-reduce of a non-16-bit dtype).
    in_place: bool,
    /// Element range of each block.
    blocks: Vec<Range<usize>>,
    started: bool,
    tally: Tally,
}

impl RingReduce {
    pub fn new(
        desc: OpDesc,
        rank: usize,
        n: usize,
        chunk: usize,
        allreduce: bool,
        mem: &mut OpMemory,
    ) -> RingReduce {
        let in_place = allreduce && desc.dtype.accumulator() == desc.dtype;
        let blocks = (0..n)
            .map(|b| {
                if allreduce {
                    block(desc.count, n, b)
                } else {
                    b * desc.count..(b + 1) * desc.count
                }
            })
            .collect::<Vec<_>>();
        let acc = desc.dtype.accumulator().size();
        let size = desc.dtype.size();
        let gather = allreduce.then(|| {
            let user_blocks = blocks.iter().map(|b| byte_range(b, size)).collect();
            GatherPhase::new(desc, rank, n, user_blocks, n.saturating_sub(1))
        });
        let mut s = RingReduce {
            desc,
            rank,
            n,
            chunk,
            gather,
            in_place,
            blocks,
            started: false,
            tally: Tally::default(),
        };
        if n == 1 {
            // One contributor: the reduction is the input itself (AVG divides by one).
            if !allreduce {
                let bytes = desc.count * size;
                mem.user
                    .as_mut_slice()
                    .copy_from_slice(&mem.input.as_slice()[..bytes]);
            }
            return s;
        }
        for step in 0..n - 1 {
            s.tally.send_expected += s.blocks[s.rs_send_block(step)].len() * acc;
            s.tally.recv_expected += s.blocks[s.rs_recv_block(step)].len() * acc;
        }
        if let Some(g) = &s.gather {
            let (send, recv) = g.expected();
            s.tally.send_expected += send;
            s.tally.recv_expected += recv;
        }
        s
    }

    /// All-reduce (the all-gather phase follows), rather than reduce-scatter.
    fn allreduce(&self) -> bool {
        self.gather.is_some()
    }

    fn rs_send_block(&self, step: usize) -> usize {
        ring_index(self.rank as isize - step as isize - 1, self.n)
    }
    fn rs_recv_block(&self, step: usize) -> usize {
        ring_index(self.rank as isize - step as isize - 2, self.n)
    }
    fn next(&self) -> Endpoint {
        Endpoint::Rank((self.rank + 1) % self.n)
    }
    fn prev(&self) -> Endpoint {
        Endpoint::Rank((self.rank + self.n - 1) % self.n)
    }

    /// Region holding the partial for accumulator byte range `r`.
    fn partial_region(&self, r: Range<usize>) -> Region {
        if self.in_place {
            Region::User {
                offset: r.start,
                len: r.len(),
            }
        } else {
            Region::Acc {
                offset: r.start,
                len: r.len(),
            }
        }
    }

    /// Queue this rank's own contribution to block `rs_send_block(0)`.
    fn start(&mut self, mem: &mut OpMemory) {
        let dtype = self.desc.dtype;
        let acc_size = dtype.accumulator().size();
        let blk = self.blocks[self.rs_send_block(0)].clone();
        for c in chunks(byte_range(&blk, acc_size), acc_size, self.chunk) {
            let region = if self.in_place {
                Region::User {
                    offset: c.start,
                    len: c.len(),
                }
            } else if dtype.accumulator() == dtype {
                Region::Input {
                    offset: c.start,
                    len: c.len(),
                }
            } else {
                let elems = c.start / acc_size..c.end / acc_size;
                let own = if self.allreduce() {
                    mem.user.as_slice()
                } else {
                    mem.input.as_slice()
                };
                let acc = mem
                    .acc
                    .as_mut()
                    .expect("16-bit reductions have an accumulator")
                    .as_mut_slice();
                reduce::widen(
                    dtype,
                    &mut acc[c.clone()],
                    &own[byte_range(&elems, dtype.size())],
                );
                Region::Acc {
                    offset: c.start,
                    len: c.len(),
                }
            };
            let header = self.desc.header(0, c.start, c.len());
            self.tally.push(Transmit {
                to: self.next(),
                header,
                region,
                forward: false,
            });
        }
    }

    fn on_reduce_frame(
        &mut self,
        mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
        payload: &[u8],
        step: usize,
    ) -> Result<()> {
        let dtype = self.desc.dtype;
        let op = self.desc.op;
        let acc_dtype = dtype.accumulator();
        let acc_size = acc_dtype.size();
        let blk_index = self.rs_recv_block(step);
        let blk = self.blocks[blk_index].clone();
        let r = check_range(
            &self.desc,
            from,
            h,
            payload.len(),
            &byte_range(&blk, acc_size),
            acc_size,
        )?;
        let elems = r.start / acc_size..r.end / acc_size;
        let own_bytes = byte_range(&elems, dtype.size());
        if self.in_place {
            reduce::reduce(dtype, op, &mut mem.user.as_mut_slice()[r.clone()], payload);
        } else {
            let own = if self.allreduce() {
                mem.user.as_slice()
            } else {
                mem.input.as_slice()
            };
            let acc = &mut mem.acc.as_mut().expect("accumulator").as_mut_slice()[r.clone()];
            acc.copy_from_slice(payload);
            if acc_dtype == dtype {
                reduce::reduce(dtype, op, acc, &own[own_bytes.clone()]);
            } else {
                reduce::reduce_widen(dtype, op, acc, &own[own_bytes.clone()]);
            }
        }
        if step + 2 < self.n {
            let header = self.desc.header(step as u32 + 1, r.start, r.len());
            let region = self.partial_region(r);
            self.tally.push(Transmit {
                to: self.next(),
                header,
                region,
                forward: false,
            });
            return Ok(());
        }
        // Block r is final here: finish AVG, round 16-bit types once, deliver.
        debug_assert_eq!(blk_index, self.rank);
        if self.in_place {
            if op == ReduceOp::Avg {
                reduce::divide(dtype, &mut mem.user.as_mut_slice()[r.clone()], self.n);
            }
        } else {
            let acc = &mut mem.acc.as_mut().expect("accumulator").as_mut_slice()[r.clone()];
            if op == ReduceOp::Avg {
                reduce::divide(acc_dtype, acc, self.n);
            }
            let dst_bytes = if self.allreduce() {
                own_bytes.clone()
            } else {
                let base = self.blocks[self.rank].start;
                byte_range(&(elems.start - base..elems.end - base), dtype.size())
            };
            let dst = &mut mem.user.as_mut_slice()[dst_bytes];
            if acc_dtype == dtype {
                dst.copy_from_slice(acc);
            } else {
                reduce::narrow(dtype, dst, acc);
            }
        }
        if let Some(g) = &self.gather {
            g.send_own(&mut self.tally, own_bytes);
        }
        Ok(())
    }

    /// Checks shared by both receive paths; the step.
    fn check_frame(&self, from: Endpoint, h: &FrameHeader) -> Result<usize> {
        let steps = match self.gather {
            Some(_) => 2 * (self.n - 1),
            None => self.n - 1,
        };
        check_ring_frame(&self.desc, from, self.prev(), h, steps)
    }
}

impl Schedule for RingReduce {
    fn desc(&self) -> &OpDesc {
        &self.desc
    }

    fn poll_transmit(&mut self, mem: &mut OpMemory) -> Option<Transmit> {
        if !self.started {
            self.started = true;
            if self.n > 1 {
                self.start(mem);
            }
        }
        self.tally.pop()
    }

    fn handle_sent(&mut self, t: &Transmit) {
        self.tally.sent(t);
    }

    fn handle_frame(
        &mut self,
        mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
        payload: &[u8],
    ) -> Result<()> {
        let step = self.check_frame(from, h)?;
        if !self.started {
            // Our own contribution must be queued before partials that depend on it move on.
            self.started = true;
            self.start(mem);
        }
        match &self.gather {
            Some(g) if step >= self.n - 1 => g.handle_frame(&mut self.tally, mem, from, h, payload),
            _ => {
                self.tally.received += payload.len();
                self.on_reduce_frame(mem, from, h, payload, step)
            }
        }
    }

    fn recv_in_place(&mut self, from: Endpoint, h: &FrameHeader) -> Result<Option<Region>> {
        let step = self.check_frame(from, h)?;
        match &self.gather {
            Some(g) if step >= self.n - 1 && self.started => g.recv_in_place(from, h),
            _ => Ok(None),
        }
    }

    fn handle_frame_in_place(
        &mut self,
        _mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
    ) -> Result<()> {
        match &self.gather {
            Some(g) => g.handle_frame_in_place(&mut self.tally, from, h),
            None => Err(Error::internal(format!(
                "{}: {from}: in-place frame for reduce-scatter step {} not expected",
                self.desc, h.aux
            ))),
        }
    }

    fn is_complete(&self) -> bool {
        (self.n == 1 || self.started) && self.tally.complete()
    }

    fn waiting_for(&self) -> String {
        format!(
            "{} (ring: from {}, to {})",
            self.tally.describe(),
            self.prev(),
            self.next()
        )
    }
}

/// Ring all-gather: block b of `mem.user` is rank b's `count` elements.
pub struct RingGather {
    desc: OpDesc,
    rank: usize,
    n: usize,
    chunk: usize,
    phase: GatherPhase,
    started: bool,
    tally: Tally,
}

impl RingGather {
    pub fn new(
        desc: OpDesc,
        rank: usize,
        n: usize,
        chunk: usize,
        mem: &mut OpMemory,
    ) -> RingGather {
        let bytes = desc.count * desc.dtype.size();
        let own = rank * bytes..(rank + 1) * bytes;
        let input = mem.input;
        let user = mem.user.as_mut_slice();
        if input.as_slice().as_ptr() != user[own.clone()].as_ptr() {
            user[own].copy_from_slice(input.as_slice());
        }
        let blocks = (0..n).map(|b| b * bytes..(b + 1) * bytes).collect();
        let phase = GatherPhase::new(desc, rank, n, blocks, 0);
        let (send, recv) = phase.expected();
        RingGather {
            desc,
            rank,
            n,
            chunk,
            phase,
            started: false,
            tally: Tally::expecting(send, recv),
        }
    }

    fn next(&self) -> Endpoint {
        Endpoint::Rank((self.rank + 1) % self.n)
    }
    fn prev(&self) -> Endpoint {
        Endpoint::Rank((self.rank + self.n - 1) % self.n)
    }

    /// Checks every received frame passes; queues our own block first, so that it leaves
    /// before the blocks we forward.
    fn check_frame(&mut self, from: Endpoint, h: &FrameHeader) -> Result<()> {
        check_ring_frame(&self.desc, from, self.prev(), h, self.n - 1)?;
        if !self.started {
            self.start();
        }
        Ok(())
    }

    /// Queue this rank's own block, chunk by chunk.
    fn start(&mut self) {
        self.started = true;
        if self.n == 1 {
            return;
        }
        let own = self.phase.blocks[self.rank].clone();
        for c in chunks(own, self.desc.dtype.size(), self.chunk) {
            self.phase.send_own(&mut self.tally, c);
        }
    }
}

impl Schedule for RingGather {
    fn desc(&self) -> &OpDesc {
        &self.desc
    }
    fn poll_transmit(&mut self, _mem: &mut OpMemory) -> Option<Transmit> {
        if !self.started {
            self.start();
        }
        self.tally.pop()
    }
    fn handle_sent(&mut self, t: &Transmit) {
        self.tally.sent(t);
    }
    fn handle_frame(
        &mut self,
        mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
        payload: &[u8],
    ) -> Result<()> {
        self.check_frame(from, h)?;
        self.phase
            .handle_frame(&mut self.tally, mem, from, h, payload)
    }
    fn recv_in_place(&mut self, from: Endpoint, h: &FrameHeader) -> Result<Option<Region>> {
        self.check_frame(from, h)?;
        self.phase.recv_in_place(from, h)
    }
    fn handle_frame_in_place(
        &mut self,
        _mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
    ) -> Result<()> {
        self.check_frame(from, h)?;
        self.phase.handle_frame_in_place(&mut self.tally, from, h)
    }
    fn is_complete(&self) -> bool {
        self.started && self.tally.complete()
    }
    fn waiting_for(&self) -> String {
        format!(
            "{} (ring: from {}, to {})",
            self.tally.describe(),
            self.prev(),
            self.next()
        )
    }
}

/// The ring all-gather as a phase: [`RingGather`] runs it alone, [`RingReduce`] after its
/// reduce-scatter for an all-reduce, so both put the same frames on the wire.
///
/// Every rank starts with its own block of `mem.user` final (or has it become final chunk by
/// chunk, [`GatherPhase::send_own`]) and ends with all n. At phase step t (0..n−1) rank r
/// sends block r−t to `next` and receives block r−t−1 from `prev`, forwarding each chunk at
/// step t+1 the moment it lands, so a chunk is never cut again on its way round. A frame
/// carries its schedule step, `first_step + t`, in `aux` and its byte offset in `mem.user` in
/// `offset`. The owner keeps the [`Tally`] (one for the whole op, so sends leave in the order
/// they were queued) and checks the op, sender and step ([`check_ring_frame`]) before handing
/// a frame here.
struct GatherPhase {
    desc: OpDesc,
    rank: usize,
    n: usize,
    /// Byte range of each rank's block in `mem.user`.
    blocks: Vec<Range<usize>>,
    /// Schedule step of the phase's step 0: 0 for an all-gather, n − 1 after a reduce-scatter.
    first_step: usize,
}

impl GatherPhase {
    fn new(
        desc: OpDesc,
        rank: usize,
        n: usize,
        blocks: Vec<Range<usize>>,
        first_step: usize,
    ) -> GatherPhase {
        debug_assert_eq!(blocks.len(), n);
        GatherPhase {
            desc,
            rank,
            n,
            blocks,
            first_step,
        }
    }

    fn send_block(&self, t: usize) -> usize {
        ring_index(self.rank as isize - t as isize, self.n)
    }
    fn recv_block(&self, t: usize) -> usize {
        ring_index(self.rank as isize - t as isize - 1, self.n)
    }
    fn next(&self) -> Endpoint {
        Endpoint::Rank((self.rank + 1) % self.n)
    }

    /// Bytes this rank sends and receives over the phase.
    fn expected(&self) -> (usize, usize) {
        let steps = 0..self.n.saturating_sub(1);
        let send = steps.clone().map(|t| self.blocks[self.send_block(t)].len());
        let recv = steps.map(|t| self.blocks[self.recv_block(t)].len());
        (send.sum(), recv.sum())
    }

    /// Queue bytes `r` of this rank's own block (final in `mem.user`) to `next`, as one frame
    /// of phase step 0.
    fn send_own(&self, tally: &mut Tally, r: Range<usize>) {
        self.push(tally, 0, r);
    }

    fn push(&self, tally: &mut Tally, t: usize, r: Range<usize>) {
        let header = self
            .desc
            .header((self.first_step + t) as u32, r.start, r.len());
        tally.push(Transmit {
            to: self.next(),
            header,
            region: Region::User {
                offset: r.start,
                len: r.len(),
            },
            forward: t > 0,
        });
    }

    /// The byte range of `mem.user` a frame of this phase fills, checked to lie in the block
    /// its step carries.
    fn target(&self, from: Endpoint, h: &FrameHeader) -> Result<Range<usize>> {
        let t = h.aux as usize - self.first_step;
        let size = self.desc.dtype.size();
        check_range(
            &self.desc,
            from,
            h,
            h.len as usize,
            &self.blocks[self.recv_block(t)],
            size,
        )
    }

    /// A frame's payload is in `mem.user[r]`: count it and pass it on, unless `next` is the
    /// block's owner.
    fn landed(&self, tally: &mut Tally, h: &FrameHeader, r: Range<usize>) {
        let t = h.aux as usize - self.first_step;
        tally.received += r.len();
        if t + 2 < self.n {
            self.push(tally, t + 1, r);
        }
    }

    fn handle_frame(
        &self,
        tally: &mut Tally,
        mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
        payload: &[u8],
    ) -> Result<()> {
        let r = self.target(from, h)?;
        mem.user.as_mut_slice()[r.clone()].copy_from_slice(payload);
        self.landed(tally, h, r);
        Ok(())
    }

    fn recv_in_place(&self, from: Endpoint, h: &FrameHeader) -> Result<Option<Region>> {
        let r = self.target(from, h)?;
        Ok(Some(Region::User {
            offset: r.start,
            len: r.len(),
        }))
    }

    fn handle_frame_in_place(
        &self,
        tally: &mut Tally,
        from: Endpoint,
        h: &FrameHeader,
    ) -> Result<()> {
        let r = self.target(from, h)?;
        self.landed(tally, h, r);
        Ok(())
    }
}

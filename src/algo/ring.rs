//! Schedules among the ranks themselves: the pipelined ring (all-reduce, reduce-scatter,
//! all-gather), the chain broadcast, and recursive doubling for small all-reduces and barriers.
//!
//! Ring vocabulary (n ranks, this rank r, `next` = r+1, `prev` = r−1, all mod n):
//! * the buffer is cut into n **blocks**; rank r ends the reduce-scatter owning block r;
//! * reduce-scatter step s (0..n−1): r sends block r−s−1 to `next` and receives block r−s−2
//!   from `prev`, combining it with its own contribution; the block received at step s is
//!   the one sent at step s+1, and the one received at step n−2 is block r, now final;
//! * all-gather step t (0..n−1): r sends block r−t and receives block r−t−1, forwarding it
//!   at step t+1;
//! * every block travels as **segments** of at most `chunk_bytes`, each segment moving on as
//!   soon as it arrives, so receiving, reducing and sending overlap.
//!
//! Reduce-scatter partials travel in the accumulator dtype (f32 for f16/bf16, rounded once when
//! final). Each block is reduced by exactly one chain of ranks and then copied, so every rank
//! ends with the same bytes. Frame offsets are byte offsets: in accumulator units for
//! reduce-scatter frames, in the caller's dtype for all-gather and broadcast frames.

use crate::algo::span::{block, byte_range, chunks, ring_index};
use crate::algo::{Endpoint, OpDesc, Schedule, Transmit};
use crate::buffer::{OpMemory, Region};
use crate::error::{Error, Result};
use crate::reduce;
use crate::types::{DType, ReduceOp};
use crate::wire::FrameHeader;
use std::collections::VecDeque;
use std::ops::Range;

/// Byte counters shared by every schedule: a schedule is complete when both sides balance.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    queue: VecDeque<Transmit>,
    pub(crate) send_expected: usize,
    handed_out: usize,
    sent: usize,
    pub(crate) recv_expected: usize,
    pub(crate) received: usize,
}

impl Tally {
    pub(crate) fn push(&mut self, t: Transmit) {
        self.queue.push_back(t);
    }
    pub(crate) fn pop(&mut self) -> Option<Transmit> {
        let t = self.queue.pop_front()?;
        self.handed_out += 1;
        Some(t)
    }
    pub(crate) fn sent(&mut self, t: &Transmit) {
        self.sent += t.region.len();
    }
    pub(crate) fn complete(&self) -> bool {
        self.queue.is_empty()
            && self.sent == self.send_expected
            && self.received == self.recv_expected
    }
    pub(crate) fn describe(&self) -> String {
        format!(
            "received {} of {} bytes, sent {} of {} bytes",
            self.received, self.recv_expected, self.sent, self.send_expected
        )
    }
}

/// Checks every ring frame passes: the op matches ours, it comes from our ring predecessor,
/// and its step is one of the op's `steps`. Returns the step.
pub(crate) fn check_ring_frame(
    desc: &OpDesc,
    from: Endpoint,
    prev: Endpoint,
    h: &FrameHeader,
    steps: usize,
) -> Result<usize> {
    desc.check_matches(from, h)?;
    if from != prev {
        return Err(Error::remote(format!(
            "{desc}: unexpected data from {from} (the ring expects {prev})"
        )));
    }
    let step = h.aux as usize;
    if step >= steps {
        return Err(Error::remote(format!(
            "{desc}: {from} sent data for step {step}, which this op does not have"
        )));
    }
    Ok(step)
}

/// Check that a data frame's byte range lies inside `within` and is whole elements.
fn check_range(
    desc: &OpDesc,
    from: Endpoint,
    h: &FrameHeader,
    len: usize,
    within: &Range<usize>,
    elem: usize,
) -> Result<Range<usize>> {
    let start = h.offset as usize;
    let end = start.saturating_add(len);
    if h.offset > usize::MAX as u64
        || start < within.start
        || end > within.end
        || start % elem != 0
        || len % elem != 0
    {
        return Err(Error::remote(format!(
            "{desc}: {from} sent {len} bytes at offset {} for step {}, outside the expected range {}..{} \
             (mismatched counts or chunking across ranks?)",
            h.offset, h.aux, within.start, within.end
        )));
    }
    Ok(start..end)
}

/// Pipelined ring reduce-scatter, optionally followed by the ring all-gather (= all-reduce).
pub struct RingReduce {
    desc: OpDesc,
    rank: usize,
    n: usize,
    chunk: usize,
    /// All-reduce: run the all-gather phase, own data and result in `mem.user`.
    /// Reduce-scatter: own data in `mem.input`, block r's result to `mem.user`.
    allreduce: bool,
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
        let mut s = RingReduce {
            desc,
            rank,
            n,
            chunk,
            allreduce,
            in_place,
            blocks,
            started: false,
            tally: Tally::default(),
        };
        let acc = desc.dtype.accumulator().size();
        let size = desc.dtype.size();
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
            if allreduce {
                s.tally.send_expected += s.blocks[s.ag_send_block(step)].len() * size;
                s.tally.recv_expected += s.blocks[s.ag_recv_block(step)].len() * size;
            }
        }
        s
    }

    fn rs_send_block(&self, step: usize) -> usize {
        ring_index(self.rank as isize - step as isize - 1, self.n)
    }
    fn rs_recv_block(&self, step: usize) -> usize {
        ring_index(self.rank as isize - step as isize - 2, self.n)
    }
    fn ag_send_block(&self, step: usize) -> usize {
        ring_index(self.rank as isize - step as isize, self.n)
    }
    fn ag_recv_block(&self, step: usize) -> usize {
        ring_index(self.rank as isize - step as isize - 1, self.n)
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
        for seg in chunks(byte_range(&blk, acc_size), acc_size, self.chunk) {
            let region = if self.in_place {
                Region::User {
                    offset: seg.start,
                    len: seg.len(),
                }
            } else if dtype.accumulator() == dtype {
                Region::Input {
                    offset: seg.start,
                    len: seg.len(),
                }
            } else {
                let elems = seg.start / acc_size..seg.end / acc_size;
                let own = if self.allreduce {
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
                    &mut acc[seg.clone()],
                    &own[byte_range(&elems, dtype.size())],
                );
                Region::Acc {
                    offset: seg.start,
                    len: seg.len(),
                }
            };
            let header = self.desc.header(0, seg.start, seg.len());
            self.tally.push(Transmit {
                to: self.next(),
                header,
                region,
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
            let own = if self.allreduce {
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
            let dst_bytes = if self.allreduce {
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
        if self.allreduce {
            let header = self
                .desc
                .header(self.n as u32 - 1, own_bytes.start, own_bytes.len());
            let region = Region::User {
                offset: own_bytes.start,
                len: own_bytes.len(),
            };
            self.tally.push(Transmit {
                to: self.next(),
                header,
                region,
            });
        }
        Ok(())
    }

    /// Validate an all-gather frame; the byte range of `mem.user` it fills.
    fn gather_target(&self, from: Endpoint, h: &FrameHeader) -> Result<Range<usize>> {
        let step = h.aux as usize - (self.n - 1);
        let size = self.desc.dtype.size();
        let blk = self.blocks[self.ag_recv_block(step)].clone();
        check_range(
            &self.desc,
            from,
            h,
            h.len as usize,
            &byte_range(&blk, size),
            size,
        )
    }

    /// An all-gather frame's payload is in `mem.user[r]`: count it and pass it on.
    fn gather_landed(&mut self, h: &FrameHeader, r: Range<usize>) {
        let step = h.aux as usize - (self.n - 1);
        self.tally.received += r.len();
        if step + 2 < self.n {
            let header = self.desc.header((self.n + step) as u32, r.start, r.len());
            let region = Region::User {
                offset: r.start,
                len: r.len(),
            };
            self.tally.push(Transmit {
                to: self.next(),
                header,
                region,
            });
        }
    }

    /// Checks shared by both receive paths; the step.
    fn check_frame(&self, from: Endpoint, h: &FrameHeader) -> Result<usize> {
        let steps = if self.allreduce {
            2 * (self.n - 1)
        } else {
            self.n - 1
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
        if step < self.n - 1 {
            self.tally.received += payload.len();
            self.on_reduce_frame(mem, from, h, payload, step)
        } else {
            let r = self.gather_target(from, h)?;
            mem.user.as_mut_slice()[r.clone()].copy_from_slice(payload);
            self.gather_landed(h, r);
            Ok(())
        }
    }

    fn recv_in_place(&mut self, from: Endpoint, h: &FrameHeader) -> Result<Option<Region>> {
        let step = self.check_frame(from, h)?;
        if step < self.n - 1 || !self.started {
            return Ok(None);
        }
        let r = self.gather_target(from, h)?;
        Ok(Some(Region::User {
            offset: r.start,
            len: r.len(),
        }))
    }

    fn handle_frame_in_place(
        &mut self,
        _mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
    ) -> Result<()> {
        let r = self.gather_target(from, h)?;
        self.gather_landed(h, r);
        Ok(())
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
        let tally = Tally {
            send_expected: (n - 1) * bytes,
            recv_expected: (n - 1) * bytes,
            ..Tally::default()
        };
        RingGather {
            desc,
            rank,
            n,
            chunk,
            started: false,
            tally,
        }
    }

    fn block_bytes(&self, b: usize) -> Range<usize> {
        let bytes = self.desc.count * self.desc.dtype.size();
        b * bytes..(b + 1) * bytes
    }
    fn next(&self) -> Endpoint {
        Endpoint::Rank((self.rank + 1) % self.n)
    }
    fn prev(&self) -> Endpoint {
        Endpoint::Rank((self.rank + self.n - 1) % self.n)
    }
    /// Validate a frame; the byte range of `mem.user` it fills.
    fn target(&mut self, from: Endpoint, h: &FrameHeader) -> Result<Range<usize>> {
        let step = check_ring_frame(&self.desc, from, self.prev(), h, self.n - 1)?;
        if !self.started {
            self.start();
        }
        let blk = ring_index(self.rank as isize - step as isize - 1, self.n);
        check_range(
            &self.desc,
            from,
            h,
            h.len as usize,
            &self.block_bytes(blk),
            self.desc.dtype.size(),
        )
    }

    /// A frame's payload is in `mem.user[r]`: count it and pass it on.
    fn landed(&mut self, h: &FrameHeader, r: Range<usize>) {
        self.tally.received += r.len();
        let step = h.aux as usize;
        if step + 2 < self.n {
            let header = self.desc.header(step as u32 + 1, r.start, r.len());
            let region = Region::User {
                offset: r.start,
                len: r.len(),
            };
            self.tally.push(Transmit {
                to: self.next(),
                header,
                region,
            });
        }
    }

    fn start(&mut self) {
        self.started = true;
        if self.n == 1 {
            return;
        }
        let size = self.desc.dtype.size();
        for seg in chunks(self.block_bytes(self.rank), size, self.chunk) {
            let header = self.desc.header(0, seg.start, seg.len());
            self.tally.push(Transmit {
                to: self.next(),
                header,
                region: Region::User {
                    offset: seg.start,
                    len: seg.len(),
                },
            });
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
        let r = self.target(from, h)?;
        mem.user.as_mut_slice()[r.clone()].copy_from_slice(payload);
        self.landed(h, r);
        Ok(())
    }
    fn recv_in_place(&mut self, from: Endpoint, h: &FrameHeader) -> Result<Option<Region>> {
        let r = self.target(from, h)?;
        Ok(Some(Region::User {
            offset: r.start,
            len: r.len(),
        }))
    }
    fn handle_frame_in_place(
        &mut self,
        _mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
    ) -> Result<()> {
        let r = self.target(from, h)?;
        self.landed(h, r);
        Ok(())
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

/// Broadcast from the root. Large messages take a pipelined chain along the ring (each segment
/// forwarded the moment it arrives, so every link carries the buffer once); small ones a
/// binomial tree: with v = (rank − root) mod n, rank v receives from v − 2^⌊log2 v⌋ and passes
/// on to v + 2^j for every 2^j > v, largest subtree first, so the last rank has the data after
/// ⌈log2 n⌉ hops instead of n − 1.
pub struct Broadcast {
    desc: OpDesc,
    rank: usize,
    n: usize,
    chunk: usize,
    /// Distance from the root along the ring.
    v: usize,
    tree: bool,
    started: bool,
    tally: Tally,
}

impl Broadcast {
    /// The pipelined chain.
    pub fn chain(desc: OpDesc, rank: usize, n: usize, chunk: usize) -> Broadcast {
        Broadcast::new(desc, rank, n, chunk, false)
    }

    /// The binomial tree.
    pub fn tree(desc: OpDesc, rank: usize, n: usize, chunk: usize) -> Broadcast {
        Broadcast::new(desc, rank, n, chunk, true)
    }

    fn new(desc: OpDesc, rank: usize, n: usize, chunk: usize, tree: bool) -> Broadcast {
        let bytes = desc.count * desc.dtype.size();
        let v = ring_index(rank as isize - desc.root as isize, n);
        let mut s = Broadcast {
            desc,
            rank,
            n,
            chunk,
            v,
            tree,
            started: false,
            tally: Tally::default(),
        };
        s.tally.send_expected = s.children().len() * bytes;
        s.tally.recv_expected = if v > 0 { bytes } else { 0 };
        s
    }

    fn to_rank(&self, v: usize) -> usize {
        (v + self.desc.root) % self.n
    }

    /// Ranks this one passes data on to (tree: largest subtree first).
    fn children(&self) -> Vec<usize> {
        if !self.tree {
            return if self.v + 1 < self.n {
                vec![self.to_rank(self.v + 1)]
            } else {
                Vec::new()
            };
        }
        let first = usize::BITS - self.v.leading_zeros();
        let mut c: Vec<usize> = (first..usize::BITS)
            .map(|j| 1usize << j)
            .take_while(|&d| self.v + d < self.n)
            .map(|d| self.to_rank(self.v + d))
            .collect();
        c.reverse();
        c
    }

    /// The rank data comes from (not called on the root).
    fn parent(&self) -> Endpoint {
        let up = if self.tree {
            1usize << (usize::BITS - 1 - self.v.leading_zeros())
        } else {
            1
        };
        Endpoint::Rank(self.to_rank(self.v - up))
    }

    /// Queue `range` (bytes of `mem.user`) to every child.
    fn forward(&mut self, range: Range<usize>) {
        for child in self.children() {
            let header = self
                .desc
                .header(self.desc.root as u32, range.start, range.len());
            let region = Region::User {
                offset: range.start,
                len: range.len(),
            };
            self.tally.push(Transmit {
                to: Endpoint::Rank(child),
                header,
                region,
            });
        }
    }

    /// Validate a frame; the byte range of `mem.user` it fills.
    fn target(&self, from: Endpoint, h: &FrameHeader) -> Result<Range<usize>> {
        self.desc.check_matches(from, h)?;
        if h.aux as usize != self.desc.root {
            return Err(Error::invalid(format!(
                "mismatched collective calls: {from} broadcasts from root {} but this rank called {}",
                h.aux, self.desc
            )));
        }
        if self.v == 0 || from != self.parent() {
            return Err(Error::remote(format!(
                "{}: unexpected data from {from}",
                self.desc
            )));
        }
        let size = self.desc.dtype.size();
        check_range(
            &self.desc,
            from,
            h,
            h.len as usize,
            &(0..self.desc.count * size),
            size,
        )
    }

    /// A frame's payload is in `mem.user[r]`: count it and pass it on.
    fn landed(&mut self, r: Range<usize>) {
        self.tally.received += r.len();
        self.forward(r);
    }
}

impl Schedule for Broadcast {
    fn desc(&self) -> &OpDesc {
        &self.desc
    }
    fn poll_transmit(&mut self, _mem: &mut OpMemory) -> Option<Transmit> {
        if !self.started {
            self.started = true;
            if self.v == 0 {
                let size = self.desc.dtype.size();
                for seg in chunks(0..self.desc.count * size, size, self.chunk) {
                    self.forward(seg);
                }
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
        let r = self.target(from, h)?;
        mem.user.as_mut_slice()[r.clone()].copy_from_slice(payload);
        self.landed(r);
        Ok(())
    }
    fn recv_in_place(&mut self, from: Endpoint, h: &FrameHeader) -> Result<Option<Region>> {
        let r = self.target(from, h)?;
        Ok(Some(Region::User {
            offset: r.start,
            len: r.len(),
        }))
    }
    fn handle_frame_in_place(
        &mut self,
        _mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
    ) -> Result<()> {
        let r = self.target(from, h)?;
        self.landed(r);
        Ok(())
    }
    fn is_complete(&self) -> bool {
        self.started && self.tally.complete()
    }
    fn waiting_for(&self) -> String {
        let from = if self.v == 0 {
            "nobody".to_string()
        } else {
            self.parent().to_string()
        };
        format!(
            "{} ({} from root {}: rank {} waits on {from})",
            self.tally.describe(),
            if self.tree { "tree" } else { "chain" },
            self.desc.root,
            self.rank
        )
    }
}

/// Recursive doubling over the largest power of two p ≤ n ranks; the n − p extra ranks first
/// fold their data into a neighbour and get the result back at the end. Partners combine in
/// rank order (lower group on the left), so every rank computes the same bits. Used for small
/// all-reduces (latency ⌈log2 n⌉ + 2 steps instead of 2(n−1)) and, with empty payloads, for
/// barriers.
pub struct RecursiveDoubling {
    desc: OpDesc,
    n: usize,
    role: Role,
    /// Exchange steps among the participants (log2 p).
    steps: usize,
    /// Next exchange step to run.
    step: usize,
    /// Our frame of the current step has been written.
    step_sent: bool,
    step_queued: bool,
    /// The folded partner's data has been combined (true when there is none).
    folded_in: bool,
    /// The caller's data has been loaded into the accumulator.
    loaded: bool,
    /// Frames sent and received so far, and how many there will be. Counted in frames, not
    /// bytes: barriers exchange empty frames.
    frames_sent: usize,
    frames_received: usize,
    frames_expected: usize,
    /// Partner data that arrived early, by step (0 = fold-in).
    stash: Vec<Option<Vec<u8>>>,
    finished: bool,
    tally: Tally,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Sends its data to `partner`, receives the result.
    Folded { partner: usize },
    /// Takes part in the exchange as `id`, with an optional folded partner.
    Participant { id: usize, folded: Option<usize> },
}

const FOLD_IN: u32 = 0;

impl RecursiveDoubling {
    pub fn new(desc: OpDesc, rank: usize, n: usize) -> RecursiveDoubling {
        let p = if n == 0 {
            1
        } else {
            1usize << (usize::BITS - 1 - n.leading_zeros())
        };
        let extra = n - p;
        let role = if rank < 2 * extra {
            if rank % 2 == 0 {
                Role::Folded { partner: rank + 1 }
            } else {
                Role::Participant {
                    id: rank / 2,
                    folded: Some(rank - 1),
                }
            }
        } else {
            Role::Participant {
                id: rank - extra,
                folded: None,
            }
        };
        let steps = p.trailing_zeros() as usize;
        let acc_bytes = desc.count * desc.dtype.accumulator().size();
        let user_bytes = desc.count * desc.dtype.size();
        let mut tally = Tally::default();
        match role {
            Role::Folded { .. } => {
                tally.send_expected = acc_bytes;
                tally.recv_expected = user_bytes;
            }
            Role::Participant { folded, .. } => {
                tally.send_expected = steps * acc_bytes;
                tally.recv_expected = steps * acc_bytes;
                if folded.is_some() {
                    tally.send_expected += user_bytes;
                    tally.recv_expected += acc_bytes;
                }
            }
        }
        RecursiveDoubling {
            desc,
            n,
            role,
            steps,
            step: 0,
            step_sent: false,
            step_queued: false,
            folded_in: !matches!(
                role,
                Role::Participant {
                    folded: Some(_),
                    ..
                }
            ),
            loaded: false,
            frames_sent: 0,
            frames_received: 0,
            frames_expected: match role {
                Role::Folded { .. } => 1,
                Role::Participant { folded, .. } => steps + usize::from(folded.is_some()),
            },
            stash: vec![None; steps + 1],
            finished: false,
            tally,
        }
    }

    fn id_to_rank(&self, id: usize) -> usize {
        let p = 1usize << self.steps;
        let extra = self.n - p;
        if id < extra {
            2 * id + 1
        } else {
            id + extra
        }
    }

    /// On the first event: load the caller's data; a folded rank hands it to its partner.
    fn ensure_loaded(&mut self, mem: &mut OpMemory) {
        if self.loaded {
            return;
        }
        self.loaded = true;
        self.load(mem);
        if let Role::Folded { partner } = self.role {
            let len = mem.acc().len();
            let header = self.desc.header(FOLD_IN, 0, len);
            self.tally.push(Transmit {
                to: Endpoint::Rank(partner),
                header,
                region: Region::Acc { offset: 0, len },
            });
            self.finished = true;
        }
    }

    fn fold_out_step(&self) -> u32 {
        self.steps as u32 + 1
    }

    /// Load the caller's data into the accumulator.
    fn load(&self, mem: &mut OpMemory) {
        let dtype = self.desc.dtype;
        let user = mem.user.as_slice();
        let acc = mem
            .acc
            .as_mut()
            .expect("recursive doubling has an accumulator")
            .as_mut_slice();
        if dtype.accumulator() == dtype {
            acc.copy_from_slice(user);
        } else {
            reduce::widen(dtype, acc, user);
        }
    }

    /// `acc = op(left, right)` where one side is `acc` and the other `other`.
    fn combine(&self, mem: &mut OpMemory, other: &[u8], other_is_left: bool) {
        let acc_dtype = self.desc.dtype.accumulator();
        let op = self.desc.op;
        let acc = mem.acc_mut();
        if other_is_left {
            let mut left = other.to_vec();
            reduce::reduce(acc_dtype, op, &mut left, acc);
            acc.copy_from_slice(&left);
        } else {
            reduce::reduce(acc_dtype, op, acc, other);
        }
    }

    /// Run every step whose inputs are present; queue the sends they allow.
    fn advance(&mut self, mem: &mut OpMemory) {
        let Role::Participant { id, folded } = self.role else {
            return;
        };
        if !self.folded_in {
            // The folded partner (always the lower rank) goes first.
            let Some(data) = self.stash[0].take() else {
                return;
            };
            self.combine(mem, &data, true);
            self.folded_in = true;
        }
        loop {
            if self.step == self.steps {
                if !self.finished {
                    self.finish(mem, folded);
                }
                return;
            }
            let partner_id = id ^ (1 << self.step);
            if !self.step_queued {
                let len = mem.acc().len();
                let header = self.desc.header(self.step as u32 + 1, 0, len);
                let to = Endpoint::Rank(self.id_to_rank(partner_id));
                self.tally.push(Transmit {
                    to,
                    header,
                    region: Region::Acc { offset: 0, len },
                });
                self.step_queued = true;
                self.step_sent = false;
                return;
            }
            if !self.step_sent {
                return;
            }
            let Some(data) = self.stash[self.step + 1].take() else {
                return;
            };
            self.combine(mem, &data, partner_id < id);
            self.step += 1;
            self.step_queued = false;
        }
    }

    fn finish(&mut self, mem: &mut OpMemory, folded: Option<usize>) {
        self.finished = true;
        let dtype = self.desc.dtype;
        if self.desc.op == ReduceOp::Avg {
            reduce::divide(dtype.accumulator(), mem.acc_mut(), self.n);
        }
        write_result(dtype, mem);
        if let Some(partner) = folded {
            let len = mem.user.len();
            let header = self.desc.header(self.fold_out_step(), 0, len);
            self.tally.push(Transmit {
                to: Endpoint::Rank(partner),
                header,
                region: Region::User { offset: 0, len },
            });
        }
    }
}

/// Copy (or round) the accumulator into the caller's buffer.
fn write_result(dtype: DType, mem: &mut OpMemory) {
    let acc = mem.acc.as_ref().expect("accumulator").as_slice();
    let user = mem.user.as_mut_slice();
    if dtype.accumulator() == dtype {
        user.copy_from_slice(acc);
    } else {
        reduce::narrow(dtype, user, acc);
    }
}

impl Schedule for RecursiveDoubling {
    fn desc(&self) -> &OpDesc {
        &self.desc
    }

    fn poll_transmit(&mut self, mem: &mut OpMemory) -> Option<Transmit> {
        self.ensure_loaded(mem);
        self.advance(mem);
        self.tally.pop()
    }

    fn handle_sent(&mut self, t: &Transmit) {
        self.tally.sent(t);
        self.frames_sent += 1;
        if let Role::Participant { .. } = self.role {
            if t.header.aux == self.step as u32 + 1 {
                self.step_sent = true;
            }
        }
    }

    fn handle_frame(
        &mut self,
        mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
        payload: &[u8],
    ) -> Result<()> {
        self.desc.check_matches(from, h)?;
        let acc_len = self.desc.count * self.desc.dtype.accumulator().size();
        let desc = self.desc;
        let bad = |what: &str| {
            Error::remote(format!(
                "{desc}: {from} sent {} bytes for step {}: {what}",
                payload.len(),
                h.aux
            ))
        };
        if h.offset != 0 {
            return Err(bad("nonzero offset"));
        }
        self.ensure_loaded(mem);
        match self.role {
            Role::Folded { partner } => {
                if from != Endpoint::Rank(partner)
                    || h.aux != self.fold_out_step()
                    || payload.len() != mem.user.len()
                {
                    return Err(bad("unexpected for a folded rank"));
                }
                self.tally.received += payload.len();
                self.frames_received += 1;
                mem.user.as_mut_slice().copy_from_slice(payload);
            }
            Role::Participant { id, folded } => {
                let step = h.aux as usize;
                let expected_from = if step == 0 {
                    folded
                } else if step <= self.steps {
                    Some(self.id_to_rank(id ^ (1 << (step - 1))))
                } else {
                    None
                };
                if expected_from.map(Endpoint::Rank) != Some(from)
                    || payload.len() != acc_len
                    || self.stash[step].is_some()
                {
                    return Err(bad("unexpected step, sender or size"));
                }
                if step > 0 && step <= self.step {
                    return Err(bad("duplicate step"));
                }
                self.tally.received += payload.len();
                self.frames_received += 1;
                self.stash[step] = Some(payload.to_vec());
                self.advance(mem);
            }
        }
        Ok(())
    }

    fn is_complete(&self) -> bool {
        self.finished
            && self.tally.complete()
            && self.frames_sent == self.frames_expected
            && self.frames_received == self.frames_expected
    }

    fn waiting_for(&self) -> String {
        format!(
            "{} (recursive doubling, role {:?}, step {} of {})",
            self.tally.describe(),
            self.role,
            self.step,
            self.steps
        )
    }
}

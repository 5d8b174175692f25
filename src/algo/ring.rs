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
use crate::error::Result;
use crate::reduce;
use crate::types::ReduceOp;
use crate::wire::FrameHeader;
use std::ops::Range;

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
        let tally = Tally::expecting((n - 1) * bytes, (n - 1) * bytes);
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

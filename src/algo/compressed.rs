//! Ring all-reduce with float data compressed on the wire (`MR_COMPRESS`,
//! `mr_allreduce_compressed`).
//!
//! The same ring as [`crate::algo::ring::RingReduce`] — reduce-scatter, then all-gather, each
//! block moving as pipelined chunks — but every frame carries its data in a
//! [`Compression`] format instead of the caller's dtype:
//!
//! * partial sums are kept in f32 (an f32 view of the caller's buffer, or an f32 scratch copy
//!   for float64 data and misaligned buffers); a rank decodes what it receives, combines it
//!   with its own contribution in f32, and encodes the new partial for the next rank;
//! * the rank that completes a block encodes the result once, and every rank — that one
//!   included — decodes those same bytes, so all ranks end with identical bits;
//! * blocks and chunks are cut on multiples of [`INT8_BLOCK`] elements, so each chunk is
//!   a whole number of int8 blocks and a chunk's wire bytes start where the encoded length
//!   of the elements before it ends.
//!
//! Error: an element is encoded n times on its way (once per reduce-scatter hop, n − 1, and
//! once as a final result), so it is off by at most the sum of n one-encoding bounds
//! ([`Compression::error_bound`]), each for the block of partial sums it was in at that hop.
//!
//! Frame offsets and lengths are in wire bytes: `offset` is where the chunk starts in the
//! encoded image of the whole buffer. The format travels in the high nibble of `redop`
//! ([`OpDesc::redop_byte`]), so ranks that asked for different formats get a mismatch error.

use crate::algo::broadcast::Broadcast;
use crate::algo::check::check_ring_frame;
use crate::algo::ring::RingGather;
use crate::algo::span::{block, ring_index};
use crate::algo::tally::Tally;
use crate::algo::{Collective, Endpoint, OpDesc, Schedule, Transmit};
use crate::buffer::{OpMemory, RawBuf, Region, Scratch};
use crate::compress::{Compression, INT8_BLOCK};
use crate::error::{Error, Result};
use crate::reduce;
use crate::types::{DType, ReduceOp};
use crate::wire::FrameHeader;
use std::ops::Range;

/// One chunk (one frame's worth): its elements in the caller's buffer and its bytes in the wire image.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Chunk {
    elems: Range<usize>,
    wire: Range<usize>,
}

/// Compressed ring all-reduce (or reduce-scatter) of float32 or float64 data.
///
/// Reduce-scatter runs the first half only: block b is rank b's `count` elements of the
/// input (`n × count`), chunks cut on 256-element boundaries from the block's start, each
/// block's wire image at `b × encoded_len(count)`. The rank whose block it is keeps its f32
/// result without a last encoding (so n − 1 encodings: every hop's partial sum); ranks hold
/// different blocks, so there are no bits to share.
pub struct CompressedRing {
    desc: OpDesc,
    rank: usize,
    n: usize,
    z: Compression,
    /// Reduce-scatter: the op ends with the reduce-scatter half.
    scatter: bool,
    /// Elements of f32 partial sums (the input's elements).
    total: usize,
    /// Chunks of each block, in order.
    chunks: Vec<Vec<Chunk>>,
    /// Scratch offset of the wire image that reduce-scatter frames are encoded into.
    rs_base: usize,
    /// Scratch offset of the wire image holding final (all-gather) data.
    ag_base: usize,
    /// Scratch offset of the f32 partial sums, when they cannot live in the caller's buffer.
    acc_base: Option<usize>,
    /// Decoded frame, for reductions other than a sum.
    stage: Vec<f32>,
    started: bool,
    tally: Tally,
}

impl CompressedRing {
    /// Plan the op and allocate its scratch into `mem.acc`. `chunk` bounds a chunk's
    /// float32 bytes (at least one int8 block).
    pub fn new(
        desc: OpDesc,
        rank: usize,
        n: usize,
        chunk: usize,
        mem: &mut OpMemory,
    ) -> Result<CompressedRing> {
        let z = desc.compress;
        if !matches!(desc.dtype, DType::F32 | DType::F64) || z == Compression::None {
            return Err(Error::internal(format!(
                "{desc}: the compressed ring needs float data and a compression"
            )));
        }
        let scatter = desc.coll == Collective::ReduceScatter;
        let count = desc.count;
        let total = if scatter { count * n } else { count };
        let units = count.div_ceil(INT8_BLOCK);
        let chunk_elems = (chunk / 4 / INT8_BLOCK).max(1) * INT8_BLOCK;
        let chunks: Vec<Vec<Chunk>> = (0..n)
            .map(|b| {
                // Elements of the block, where they start, and where its wire image starts.
                let (lo, hi, base, wire0) = if scatter {
                    let lo = b * count;
                    (lo, lo + count, lo, b * z.encoded_len(count))
                } else {
                    let u = block(units, n, b);
                    let lo = (u.start * INT8_BLOCK).min(count);
                    (lo, (u.end * INT8_BLOCK).min(count), 0, 0)
                };
                (lo..hi)
                    .step_by(chunk_elems)
                    .map(|s| {
                        let e = s..(s + chunk_elems).min(hi);
                        Chunk {
                            wire: wire0 + z.encoded_len(e.start - base)
                                ..wire0 + z.encoded_len(e.end - base),
                            elems: e,
                        }
                    })
                    .collect()
            })
            .collect();
        let wire_len = (if scatter { n } else { 1 } * z.encoded_len(count)).next_multiple_of(8);
        let in_user = !scatter
            && desc.dtype == DType::F32
            && bytemuck::try_cast_slice::<u8, f32>(mem.user.as_slice()).is_ok();
        let acc_base = (!in_user).then_some(2 * wire_len);
        let scratch = 2 * wire_len + if in_user { 0 } else { total * 4 };
        mem.acc = Some(Scratch::zeroed(scratch)?);
        let mut s = CompressedRing {
            desc,
            rank,
            n,
            z,
            scatter,
            total,
            chunks,
            rs_base: 0,
            ag_base: wire_len,
            acc_base,
            stage: Vec::new(),
            started: false,
            tally: Tally::default(),
        };
        if n > 1 {
            let wire = |b: usize| s.chunks[b].iter().map(|g| g.wire.len()).sum::<usize>();
            let (mut send, mut recv) = (0, 0);
            for step in 0..n - 1 {
                send += wire(s.rs_send_block(step));
                recv += wire(s.rs_recv_block(step));
                if !scatter {
                    send += wire(s.ag_send_block(step));
                    recv += wire(s.ag_recv_block(step));
                }
            }
            s.tally.send_expected = send;
            s.tally.recv_expected = recv;
        }
        Ok(s)
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

    /// The f32 partial sums of `elems` and the scratch, borrowed together.
    fn split<'a>(
        &self,
        mem: &'a mut OpMemory,
        elems: &Range<usize>,
    ) -> (&'a mut [f32], &'a mut [u8]) {
        let scratch = mem
            .acc
            .as_mut()
            .expect("compressed ops have scratch")
            .as_mut_slice();
        match self.acc_base {
            None => {
                let user: &mut [f32] = bytemuck::cast_slice_mut(mem.user.as_mut_slice());
                (&mut user[elems.clone()], scratch)
            }
            Some(base) => {
                let (wire, acc) = scratch.split_at_mut(base);
                let acc: &mut [f32] = bytemuck::cast_slice_mut(&mut acc[..self.total * 4]);
                (&mut acc[elems.clone()], wire)
            }
        }
    }

    /// Write decoded f32 results of `elems` into the caller's buffer, when the partial sums
    /// do not live there (a reduce-scatter's own block goes to the start of it).
    fn store(&self, mem: &mut OpMemory, elems: &Range<usize>) {
        let Some(base) = self.acc_base else { return };
        let scratch = mem
            .acc
            .as_ref()
            .expect("compressed ops have scratch")
            .as_slice();
        let acc: &[f32] = bytemuck::cast_slice(&scratch[base..base + self.total * 4]);
        let vals = &acc[elems.clone()];
        let size = self.desc.dtype.size();
        let shift = if self.scatter {
            self.rank * self.desc.count
        } else {
            0
        };
        let user =
            &mut mem.user.as_mut_slice()[(elems.start - shift) * size..(elems.end - shift) * size];
        match self.desc.dtype {
            DType::F64 => {
                for (d, v) in user.chunks_exact_mut(8).zip(vals) {
                    d.copy_from_slice(&f64::from(*v).to_le_bytes());
                }
            }
            _ => user.copy_from_slice(bytemuck::cast_slice(vals)),
        }
    }

    /// Queue this rank's own contribution to the first reduce-scatter block.
    fn start(&mut self, mem: &mut OpMemory) {
        self.started = true;
        if self.n == 1 {
            return;
        }
        if let Some(base) = self.acc_base {
            let count = self.total;
            let user = if self.scatter {
                mem.input.as_slice()
            } else {
                mem.user.as_slice()
            };
            let scratch = mem
                .acc
                .as_mut()
                .expect("compressed ops have scratch")
                .as_mut_slice();
            let acc = &mut scratch[base..base + count * 4];
            match self.desc.dtype {
                DType::F64 => {
                    for (a, u) in acc.chunks_exact_mut(4).zip(user.chunks_exact(8)) {
                        let v = f64::from_le_bytes(u.try_into().unwrap()) as f32;
                        a.copy_from_slice(&v.to_le_bytes());
                    }
                }
                _ => acc.copy_from_slice(&user[..count * 4]),
            }
        }
        let b = self.rs_send_block(0);
        for ch in self.chunks[b].clone() {
            let (acc, scratch) = self.split(mem, &ch.elems);
            let at = self.rs_base + ch.wire.start;
            self.z.encode(acc, &mut scratch[at..at + ch.wire.len()]);
            self.push(0, &ch, self.rs_base, false);
        }
    }

    /// Queue chunk `ch` of the image at `base` for `next`; `forward`: the bytes are a
    /// frame's as it landed ([`Transmit::forward`]).
    fn push(&mut self, step: usize, ch: &Chunk, base: usize, forward: bool) {
        let header = self.desc.header(step as u32, ch.wire.start, ch.wire.len());
        self.tally.push(Transmit {
            to: self.next(),
            header,
            region: Region::Acc {
                offset: base + ch.wire.start,
                len: ch.wire.len(),
            },
            forward,
        });
    }

    /// The chunk of block `b` a frame names, checked against the plan.
    fn chunk_for(&self, from: Endpoint, h: &FrameHeader, b: usize) -> Result<Chunk> {
        let chunks = &self.chunks[b];
        let found = chunks
            .binary_search_by_key(&h.offset, |g| g.wire.start as u64)
            .ok()
            .map(|i| chunks[i].clone())
            .filter(|g| g.wire.len() as u64 == h.len);
        found.ok_or_else(|| {
            Error::remote(format!(
                "{}: {from} sent {} wire bytes at offset {} for step {}, which is no chunk of \
                 block {b} (mismatched counts, chunking or compression across ranks?)",
                self.desc, h.len, h.offset, h.aux
            ))
        })
    }

    fn check_frame(&self, from: Endpoint, h: &FrameHeader) -> Result<usize> {
        let steps = if self.scatter { 1 } else { 2 } * (self.n - 1);
        check_ring_frame(&self.desc, from, self.prev(), h, steps)
    }

    /// A reduce-scatter frame: combine, then pass the partial on or finish the block.
    fn on_partial(&mut self, mem: &mut OpMemory, ch: Chunk, step: usize, payload: &[u8]) {
        let (z, op, n) = (self.z, self.desc.op, self.n);
        let mut stage = std::mem::take(&mut self.stage);
        {
            let (acc, scratch) = self.split(mem, &ch.elems);
            crate::compress::fold_encoded(z, op, acc, payload, &mut stage);
            if step + 2 < n {
                let at = self.rs_base + ch.wire.start;
                z.encode(acc, &mut scratch[at..at + ch.wire.len()]);
            } else if self.scatter {
                // Our block of a reduce-scatter: kept in f32, nobody else needs its bits.
                if op == ReduceOp::Avg {
                    reduce::divide(DType::F32, bytemuck::cast_slice_mut(acc), n);
                }
            } else {
                // Our block is final: average, encode once, and keep what everyone decodes.
                if op == ReduceOp::Avg {
                    reduce::divide(DType::F32, bytemuck::cast_slice_mut(acc), n);
                }
                let at = self.ag_base + ch.wire.start;
                let wire = &mut scratch[at..at + ch.wire.len()];
                z.encode(acc, wire);
                z.decode(wire, acc);
            }
        }
        self.stage = stage;
        if step + 2 < n {
            self.push(step + 1, &ch, self.rs_base, false);
        } else if self.scatter {
            self.store(mem, &ch.elems);
        } else {
            self.store(mem, &ch.elems);
            self.push(n - 1, &ch, self.ag_base, false);
        }
    }

    /// An all-gather frame's bytes are in the final wire image: decode and pass them on.
    fn on_final(&mut self, mem: &mut OpMemory, ch: Chunk, step: usize) {
        {
            let (acc, scratch) = self.split(mem, &ch.elems);
            let at = self.ag_base + ch.wire.start;
            self.z.decode(&scratch[at..at + ch.wire.len()], acc);
        }
        self.store(mem, &ch.elems);
        self.tally.received += ch.wire.len();
        let t = step - (self.n - 1);
        if t + 2 < self.n {
            // The wire image is passed on as it landed.
            self.push(self.n + t, &ch, self.ag_base, true);
        }
    }
}

impl Schedule for CompressedRing {
    fn desc(&self) -> &OpDesc {
        &self.desc
    }

    fn poll_transmit(&mut self, mem: &mut OpMemory) -> Option<Transmit> {
        if !self.started {
            self.start(mem);
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
            // Our own contribution goes out before partials that depend on it.
            self.start(mem);
        }
        if step < self.n - 1 {
            let ch = self.chunk_for(from, h, self.rs_recv_block(step))?;
            self.tally.received += payload.len();
            self.on_partial(mem, ch, step, payload);
        } else {
            let ch = self.chunk_for(from, h, self.ag_recv_block(step - (self.n - 1)))?;
            let scratch = mem
                .acc
                .as_mut()
                .expect("compressed ops have scratch")
                .as_mut_slice();
            let at = self.ag_base + ch.wire.start;
            scratch[at..at + ch.wire.len()].copy_from_slice(payload);
            self.on_final(mem, ch, step);
        }
        Ok(())
    }

    fn recv_in_place(&mut self, from: Endpoint, h: &FrameHeader) -> Result<Option<Region>> {
        let step = self.check_frame(from, h)?;
        if step < self.n - 1 || !self.started {
            return Ok(None);
        }
        let ch = self.chunk_for(from, h, self.ag_recv_block(step - (self.n - 1)))?;
        Ok(Some(Region::Acc {
            offset: self.ag_base + ch.wire.start,
            len: ch.wire.len(),
        }))
    }

    fn handle_frame_in_place(
        &mut self,
        mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
    ) -> Result<()> {
        let step = self.check_frame(from, h)?;
        let ch = self.chunk_for(from, h, self.ag_recv_block(step - (self.n - 1)))?;
        self.on_final(mem, ch, step);
        Ok(())
    }

    fn is_complete(&self) -> bool {
        self.started && self.tally.complete()
    }

    fn waiting_for(&self) -> String {
        format!(
            "{} of {} wire data (compressed ring: from {}, to {})",
            self.tally.describe(),
            self.z,
            self.prev(),
            self.next()
        )
    }
}

/// All-gather or broadcast of float32/float64 data in a wire format (`MR_COMPRESS`): the
/// data is encoded once by the rank that owns it (every rank its own block for an all-gather,
/// the root the whole buffer for a broadcast), the encoded bytes travel along the usual ring
/// schedule ([`RingGather`], or the chain or tree of [`Broadcast`]) unchanged, and every rank —
/// the owner included — decodes those same bytes, chunk by chunk as they land. So every
/// rank ends with identical bits: the values after one encoding (float64 as float32 widened).
///
/// The inner schedule runs over the encoded image of the output in the op's scratch
/// (`mem.acc`), as an op of `uint8` data whose count is the wire bytes per block; its frames
/// carry the format in the high nibble of `redop`, so ranks that asked for different formats
/// fail with a mismatch. Segments are whole int8 blocks (or 16-bit elements) of each block's
/// image, so each decodes on its own.
pub struct EncodedCopy {
    desc: OpDesc,
    z: Compression,
    inner: Box<dyn Schedule>,
    /// The inner schedule's view: `user` is the encoded image (the same memory as `mem.acc`).
    inner_mem: OpMemory,
    /// Wire bytes and elements of one block (a rank's share for an all-gather, the whole
    /// buffer for a broadcast).
    wire_block: usize,
}

impl EncodedCopy {
    /// Plan the op and allocate the encoded image into `mem.acc`. `chunk` bounds a chunk's
    /// float32 bytes (at least one int8 block); `tree` picks the broadcast tree over the chain.
    pub fn new(
        desc: OpDesc,
        rank: usize,
        n: usize,
        chunk: usize,
        tree: bool,
        mem: &mut OpMemory,
    ) -> Result<EncodedCopy> {
        let z = desc.compress;
        if !matches!(desc.dtype, DType::F32 | DType::F64) || z == Compression::None {
            return Err(Error::internal(format!(
                "{desc}: an encoded copy needs float data and a compression"
            )));
        }
        let (count, size) = (desc.count, desc.dtype.size());
        let wire_block = z.encoded_len(count);
        let blocks = match desc.coll {
            Collective::AllGather => n,
            Collective::Broadcast => 1,
            other => {
                return Err(Error::internal(format!(
                    "{desc}: {} does not travel as an encoded copy",
                    other.name()
                )))
            }
        };
        let mut image = Scratch::zeroed(wire_block * blocks)?;
        let inner_desc = OpDesc {
            dtype: DType::U8,
            count: wire_block,
            ..desc
        };
        // Whole int8 blocks (or 16-bit elements) per chunk.
        let wire_chunk =
            z.encoded_len(crate::relay::compressed_chunk_bytes(chunk, Compression::None) / 4);
        let img = image.as_mut_slice();
        // SAFETY: the image is heap or mapped memory owned by `mem.acc` below, which outlives
        // the schedule and never moves or reallocates; the schedule reaches it only through
        // `inner_mem` or `mem.acc`, never both at once.
        let mut inner_mem = OpMemory::new(unsafe { RawBuf::new(img.as_mut_ptr(), img.len()) });
        let inner: Box<dyn Schedule> = match desc.coll {
            Collective::AllGather => {
                let own = rank * wire_block..(rank + 1) * wire_block;
                z.encode_bytes(desc.dtype, mem.input.as_slice(), &mut img[own.clone()]);
                let user = mem.user.as_mut_slice();
                z.decode_bytes(
                    desc.dtype,
                    &img[own.clone()],
                    &mut user[rank * count * size..(rank + 1) * count * size],
                );
                // SAFETY: as above; the gather sees its own block already in place.
                inner_mem.input = unsafe { RawBuf::new(img[own.clone()].as_mut_ptr(), own.len()) };
                Box::new(RingGather::new(
                    inner_desc,
                    rank,
                    n,
                    wire_chunk,
                    &mut inner_mem,
                ))
            }
            _ => {
                if rank == desc.root {
                    let user = mem.user.as_mut_slice();
                    z.encode_bytes(desc.dtype, user, img);
                    z.decode_bytes(desc.dtype, img, user);
                }
                Box::new(if tree {
                    Broadcast::tree(inner_desc, rank, n, wire_chunk)
                } else {
                    Broadcast::chain(inner_desc, rank, n, wire_chunk)
                })
            }
        };
        mem.acc = Some(image);
        Ok(EncodedCopy {
            desc,
            z,
            inner,
            inner_mem,
            wire_block,
        })
    }

    /// Decode the chunk a frame brought (its bytes are in the image).
    fn landed(&self, mem: &mut OpMemory, from: Endpoint, h: &FrameHeader) -> Result<()> {
        let (z, count, size) = (self.z, self.desc.count, self.desc.dtype.size());
        let (offset, len) = (h.offset as usize, h.len as usize);
        let b = offset / self.wire_block.max(1);
        let within = offset - b * self.wire_block;
        let elems = match (z.elems_before(within), z.decoded_len(len)) {
            (Some(s), Some(e)) if e % INT8_BLOCK == 0 || within + len == self.wire_block => {
                (b * count + s)..(b * count + s + e)
            }
            _ => {
                return Err(Error::remote(format!(
                    "{}: {from} sent {len} wire bytes at offset {offset}, which are not whole {z} \
                     blocks (mismatched chunking or compression across ranks?)",
                    self.desc
                )))
            }
        };
        let image = mem.acc.as_ref().expect("encoded copies have an image");
        let wire = &image.as_slice()[offset..offset + len];
        let user = &mut mem.user.as_mut_slice()[elems.start * size..elems.end * size];
        z.decode_bytes(self.desc.dtype, wire, user);
        Ok(())
    }
}

/// The outer op's region for an inner schedule's: the image lives in `mem.acc`.
fn to_image(r: Region) -> Region {
    match r {
        Region::User { offset, len } | Region::Input { offset, len } => Region::Acc { offset, len },
        other => other,
    }
}

impl Schedule for EncodedCopy {
    fn desc(&self) -> &OpDesc {
        &self.desc
    }

    fn poll_transmit(&mut self, _mem: &mut OpMemory) -> Option<Transmit> {
        let t = self.inner.poll_transmit(&mut self.inner_mem)?;
        Some(Transmit {
            region: to_image(t.region.clone()),
            ..t
        })
    }

    fn handle_sent(&mut self, t: &Transmit) {
        // The inner schedule only counts the bytes; the region's kind does not matter to it.
        self.inner.handle_sent(t);
    }

    fn handle_frame(
        &mut self,
        mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
        payload: &[u8],
    ) -> Result<()> {
        self.inner
            .handle_frame(&mut self.inner_mem, from, h, payload)?;
        self.landed(mem, from, h)
    }

    fn recv_in_place(&mut self, from: Endpoint, h: &FrameHeader) -> Result<Option<Region>> {
        Ok(self.inner.recv_in_place(from, h)?.map(to_image))
    }

    fn handle_frame_in_place(
        &mut self,
        mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
    ) -> Result<()> {
        self.inner
            .handle_frame_in_place(&mut self.inner_mem, from, h)?;
        self.landed(mem, from, h)
    }

    fn is_complete(&self) -> bool {
        self.inner.is_complete()
    }

    fn waiting_for(&self) -> String {
        format!("{} ({} on the wire)", self.inner.waiting_for(), self.z)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::sim::Sim;
    use crate::algo::Collective;
    use crate::config::Config;

    #[allow(clippy::too_many_arguments)]
    fn run(
        n: usize,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        z: Compression,
        chunk: usize,
        seed: u64,
        data: &dyn Fn(usize, usize) -> f64,
    ) -> Vec<Vec<f64>> {
        let mut d = OpDesc::new(Collective::AllReduce, 1, dtype, op, count, 0);
        d.compress = z;
        let config = Config {
            chunk_bytes: chunk,
            small_bytes: 0,
            ..Config::default()
        };
        let user: Vec<Vec<u8>> = (0..n)
            .map(|r| {
                (0..count)
                    .flat_map(|i| match dtype {
                        DType::F64 => data(r, i).to_le_bytes().to_vec(),
                        _ => (data(r, i) as f32).to_le_bytes().to_vec(),
                    })
                    .collect()
            })
            .collect();
        let mut sim = Sim::new(d, &config, user, vec![Vec::new(); n], seed);
        sim.drive_bounded(1_000_000)
            .unwrap_or_else(|e| panic!("{d} n={n}: {e}"));
        sim.ranks
            .iter()
            .map(|k| {
                assert!(k.error.is_none(), "{:?}", k.error);
                match dtype {
                    DType::F64 => k
                        .user
                        .chunks_exact(8)
                        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                    _ => k
                        .user
                        .chunks_exact(4)
                        .map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap())))
                        .collect(),
                }
            })
            .collect()
    }

    fn smooth(r: usize, i: usize) -> f64 {
        ((i as f64 * 0.37 + r as f64).sin() * 10.0 + r as f64).round() / 4.0
    }

    /// Bitwise identical on every rank, and within `n` encodings' bound of the exact sum.
    #[test]
    fn identical_everywhere_and_within_bound() {
        for n in 1usize..=5 {
            for count in [0, 1, n.saturating_sub(1), 255, 256, 257, 1000, 3 * 256 + 17] {
                for z in [Compression::Bf16, Compression::Fp16, Compression::Int8] {
                    for dtype in [DType::F32, DType::F64] {
                        let out = run(
                            n,
                            count,
                            dtype,
                            ReduceOp::Sum,
                            z,
                            1024,
                            3 + n as u64,
                            &smooth,
                        );
                        for (r, o) in out.iter().enumerate() {
                            assert_eq!(
                                o.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                out[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                "{z} {dtype} n={n} count={count}: rank {r} differs from rank 0"
                            );
                        }
                        // Bound: n encodings, each at most half a step of a block whose values
                        // are partial sums bounded by n * 3.5 in magnitude.
                        let mag = n as f64 * 3.5;
                        let per = match z {
                            Compression::Int8 => 2.0 * mag / 255.0 / 2.0 * 1.0001,
                            Compression::Bf16 => mag / 256.0,
                            _ => mag / 2048.0,
                        };
                        for (i, v) in out[0].iter().enumerate() {
                            let exact: f64 = (0..n).map(|r| smooth(r, i)).sum();
                            let bound = if n == 1 { 0.0 } else { per * n as f64 };
                            assert!(
                                (v - exact).abs() <= bound,
                                "{z} {dtype} n={n} count={count} element {i}: {v} vs {exact} (bound {bound})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Reduce-scatter: each rank's block within n − 1 encodings of partial sums of the exact
    /// reduction, for every format, dtype and count (including counts that are no multiple of
    /// an int8 block, so blocks start inside int8 blocks of the input).
    #[test]
    fn compressed_reduce_scatter_within_bound() {
        let data =
            |r: usize, i: usize| ((i as f64 * 0.53 + r as f64).cos() * 3.0 * 64.0).round() / 64.0;
        let mut seed = 0;
        for n in 2usize..=5 {
            for count in [0, 1, 255, 256, 257, 1000] {
                for z in [Compression::Bf16, Compression::Fp16, Compression::Int8] {
                    for dtype in [DType::F32, DType::F64] {
                        for op in [ReduceOp::Sum, ReduceOp::Avg] {
                            seed += 1;
                            let mut d =
                                OpDesc::new(Collective::ReduceScatter, 1, dtype, op, count, 0);
                            d.compress = z;
                            let config = Config {
                                chunk_bytes: 1024,
                                ..Config::default()
                            };
                            let size = dtype.size();
                            let input: Vec<Vec<u8>> = (0..n)
                                .map(|r| {
                                    (0..n * count)
                                        .flat_map(|i| match dtype {
                                            DType::F64 => data(r, i).to_le_bytes().to_vec(),
                                            _ => (data(r, i) as f32).to_le_bytes().to_vec(),
                                        })
                                        .collect()
                                })
                                .collect();
                            let user = vec![vec![0u8; count * size]; n];
                            let mut sim = Sim::new(d, &config, user, input, seed);
                            sim.drive_bounded(1_000_000)
                                .unwrap_or_else(|e| panic!("{d} n={n}: {e}"));
                            // n − 1 encodings of partial sums of magnitude up to 3n.
                            let mag = 3.0 * n as f64;
                            let per = match z {
                                Compression::Int8 => mag / 255.0 * 1.001,
                                Compression::Bf16 => mag / 256.0,
                                _ => mag / 2048.0,
                            };
                            let bound = (n - 1) as f64 * per + 1e-5;
                            for (r, k) in sim.ranks.iter().enumerate() {
                                assert!(k.error.is_none(), "{d}: {:?}", k.error);
                                for (j, e) in k.user.chunks_exact(size).enumerate() {
                                    let v = match dtype {
                                        DType::F64 => f64::from_le_bytes(e.try_into().unwrap()),
                                        _ => f64::from(f32::from_le_bytes(e.try_into().unwrap())),
                                    };
                                    let i = r * count + j;
                                    let mut exact: f64 = (0..n).map(|q| data(q, i)).sum();
                                    if op == ReduceOp::Avg {
                                        exact /= n as f64;
                                    }
                                    assert!(
                                        (v - exact).abs() <= bound,
                                        "{d} n={n} rank {r} [{j}]: {v} vs {exact} (bound {bound})"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// All-gather and broadcast: every rank (the owner too) holds the owner's data after one
    /// encoding, bit for bit the same; one rank alone keeps its data exact.
    #[test]
    fn encoded_allgather_and_broadcast_decode_the_same_bytes_everywhere() {
        let data = |r: usize, i: usize| ((i as f64 * 0.37 + r as f64).sin() * 7.3) + r as f64;
        let bytes_of = |dtype: DType, r: usize, count: usize| -> Vec<u8> {
            (0..count)
                .flat_map(|i| match dtype {
                    DType::F64 => data(r, i).to_le_bytes().to_vec(),
                    _ => (data(r, i) as f32).to_le_bytes().to_vec(),
                })
                .collect()
        };
        let mut seed = 0;
        for n in 1usize..=5 {
            for count in [0, 1, 255, 256, 257, 1000, 3 * 256 + 17] {
                for z in [Compression::Bf16, Compression::Fp16, Compression::Int8] {
                    for dtype in [DType::F32, DType::F64] {
                        for coll in [Collective::AllGather, Collective::Broadcast] {
                            seed += 1;
                            let root = n - 1;
                            let mut d = OpDesc::new(coll, 1, dtype, ReduceOp::Sum, count, root);
                            d.compress = z;
                            let config = Config {
                                chunk_bytes: 1024,
                                // Broadcasts alternate between the tree and the chain.
                                small_bytes: if seed % 2 == 0 { 1 << 30 } else { 0 },
                                ..Config::default()
                            };
                            let size = dtype.size();
                            let (user, input): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (0..n)
                                .map(|r| match coll {
                                    Collective::AllGather => {
                                        (vec![0u8; n * count * size], bytes_of(dtype, r, count))
                                    }
                                    _ if r == root => (bytes_of(dtype, r, count), Vec::new()),
                                    _ => (vec![0u8; count * size], Vec::new()),
                                })
                                .unzip();
                            let mut sim = Sim::new(d, &config, user, input, seed);
                            sim.drive_bounded(1_000_000)
                                .unwrap_or_else(|e| panic!("{d} n={n}: {e}"));
                            let owners: Vec<usize> = match coll {
                                Collective::AllGather => (0..n).collect(),
                                _ => vec![root],
                            };
                            let want: Vec<u8> = owners
                                .iter()
                                .flat_map(|&r| {
                                    let exact = bytes_of(dtype, r, count);
                                    if n == 1 {
                                        return exact;
                                    }
                                    let mut wire = vec![0u8; z.encoded_len(count)];
                                    z.encode_bytes(dtype, &exact, &mut wire);
                                    let mut back = vec![0u8; exact.len()];
                                    z.decode_bytes(dtype, &wire, &mut back);
                                    back
                                })
                                .collect();
                            for (r, k) in sim.ranks.iter().enumerate() {
                                assert!(k.error.is_none(), "{d} n={n}: {:?}", k.error);
                                assert!(k.user == want, "{d} n={n}: rank {r} holds other bits");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn other_reductions_and_average() {
        let ints = |r: usize, i: usize| ((r * 7 + i * 3) % 11) as f64 - 3.0;
        for n in [2, 3, 4] {
            for op in [ReduceOp::Max, ReduceOp::Min, ReduceOp::Avg, ReduceOp::Prod] {
                // Small integers survive bf16 and fp16 exactly, and int8 blocks of them
                // exactly too while their range is at most 255 steps of 1.
                for z in [Compression::Bf16, Compression::Fp16] {
                    let out = run(n, 600, DType::F32, op, z, 512, 9, &ints);
                    for i in 0..600 {
                        let vals: Vec<f64> = (0..n).map(|r| ints(r, i)).collect();
                        let want = match op {
                            ReduceOp::Max => vals.iter().cloned().fold(f64::MIN, f64::max),
                            ReduceOp::Min => vals.iter().cloned().fold(f64::MAX, f64::min),
                            ReduceOp::Prod => vals.iter().product(),
                            _ => vals.iter().sum::<f64>() / n as f64,
                        };
                        // Max and min of small integers are exact in both formats; sums and
                        // products may round at each of the n encodings.
                        let tol = match op {
                            ReduceOp::Max | ReduceOp::Min => 0.0,
                            _ => want.abs() * n as f64 / 256.0,
                        };
                        for o in &out {
                            assert!(
                                (o[i] - want).abs() <= tol,
                                "{z} {op:?} n={n}: {} vs {want}",
                                o[i]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn non_finite_values_stay_non_finite() {
        let data = |r: usize, i: usize| if r == 1 && i == 5 { f64::NAN } else { i as f64 };
        for z in [Compression::Bf16, Compression::Fp16, Compression::Int8] {
            let out = run(3, 700, DType::F32, ReduceOp::Sum, z, 1024, 1, &data);
            for o in &out {
                assert!(o[5].is_nan(), "{z}");
                assert!(o[600].is_finite(), "{z}");
            }
        }
    }

    #[test]
    fn mismatched_compression_is_named() {
        let mut a = OpDesc::new(Collective::AllReduce, 4, DType::F32, ReduceOp::Sum, 10, 0);
        let mut b = a;
        a.compress = Compression::Int8;
        b.compress = Compression::Bf16;
        let err = a
            .check_matches(Endpoint::Rank(1), &b.header(0, 0, 8))
            .unwrap_err();
        assert!(err.message.contains("bf16 on the wire"), "{}", err.message);
        assert!(err.message.contains("int8 on the wire"), "{}", err.message);
    }
}

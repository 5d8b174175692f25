//! The relay's arithmetic for one job, sans-IO: checks data headers against the job before
//! any allocation, and folds each chunk's contributions strictly in rank order
//! (`x0 op x1 op x2 …`), staging contributions that arrive early, so a verifier can recompute
//! every result bit-exactly.

use crate::algo::Collective;
use crate::buffer::Scratch;
use crate::compress::{self, Compression, INT8_BLOCK};
use crate::error::{Error, Result};
use crate::reduce;
use crate::types::{DType, ReduceOp};
use crate::wire::FrameHeader;
use std::collections::HashMap;

/// Why a frame could not be used.
#[derive(Debug)]
pub enum Fault {
    /// The peers disagree about an op (mismatched calls): fail op `seq` on every peer.
    Op(u64, Error),
    /// This connection broke the protocol: close it.
    Conn(Error),
}

/// A data header that passed [`check_data_header`].
#[derive(Clone, Copy, Debug)]
pub struct DataFrame {
    pub coll: Collective,
    pub dtype: DType,
    pub op: ReduceOp,
    /// Wire format of the payload (from the high nibble of the header's `redop`).
    pub compress: Compression,
    /// Elements the payload carries.
    pub elems: usize,
}

/// How a frame header describes its op, for mismatch errors.
fn describe(h: &FrameHeader) -> String {
    let dtype =
        DType::from_raw(u32::from(h.dtype)).map_or(format!("dtype {}", h.dtype), |d| d.to_string());
    let op = ReduceOp::from_raw(u32::from(h.redop & 0x0f))
        .map_or(format!("op {}", h.redop & 0x0f), |o| o.to_string());
    let z =
        Compression::from_u8(h.redop >> 4).map_or(format!("wire format {}", h.redop >> 4), |z| {
            match z {
                Compression::None => "exact".to_string(),
                z => format!("{z} on the wire"),
            }
        });
    format!("{} x {dtype} {op}, {z}", h.count)
}

/// Check a data header from `rank` against the job's announced sizes, before its payload is
/// read. `chunk_bytes` is the job's announced chunk size.
///
/// A compressed all-reduce frame ([`Compression`] in the high nibble of `redop`) carries
/// whole int8 blocks (or 16-bit elements) of the encoded image of the op's buffer: its
/// `offset` is where a block starts in that image, its `len` encodes whole blocks (only the
/// op's last chunk may end in a short block), and its elements take at most
/// [`super::compressed_chunk_bytes`]`(chunk_bytes, z)` as float32 — what the relay allocates to
/// sum them.
pub fn check_data_header(
    h: &FrameHeader,
    rank: usize,
    world: usize,
    chunk_bytes: usize,
) -> Result<DataFrame> {
    let coll = match h.coll {
        c if c == Collective::AllReduce as u8 => Collective::AllReduce,
        c if c == Collective::Broadcast as u8 => Collective::Broadcast,
        c => {
            return Err(Error::remote(format!(
                "data frame for collective {c}, which relays do not serve"
            )))
        }
    };
    let dtype = DType::from_raw(h.dtype as u32)?;
    let op = ReduceOp::from_raw(u32::from(h.redop & 0x0f))?;
    let compress = Compression::from_u8(h.redop >> 4).ok_or_else(|| {
        Error::remote(format!(
            "rank {rank}: data frame in wire format {}, which this relay does not know",
            h.redop >> 4
        ))
    })?;
    if compress != Compression::None {
        return check_compressed(h, rank, coll, dtype, op, compress, chunk_bytes);
    }
    let size = dtype.size() as u64;
    let total = h
        .count
        .checked_mul(size)
        .ok_or_else(|| Error::remote(format!("element count {} overflows", h.count)))?;
    let end = h.offset.saturating_add(h.len);
    if h.len == 0 || h.len > chunk_bytes as u64 {
        return Err(Error::remote(format!(
            "data frame of {} bytes, the job announced chunks of at most {chunk_bytes} bytes",
            h.len
        )));
    }
    if h.len % size != 0 || h.offset % size != 0 || end > total {
        return Err(Error::remote(format!(
            "data frame range {}..{end} is not whole {dtype} elements inside the op's {total} bytes",
            h.offset
        )));
    }
    if coll == Collective::Broadcast && (h.aux as usize != rank || rank >= world) {
        return Err(Error::remote(format!(
            "broadcast data from rank {rank}, but the frame names root {}",
            h.aux
        )));
    }
    Ok(DataFrame {
        coll,
        dtype,
        op,
        compress,
        elems: (h.len / size) as usize,
    })
}

/// [`check_data_header`] for a frame in a compressed wire format.
fn check_compressed(
    h: &FrameHeader,
    rank: usize,
    coll: Collective,
    dtype: DType,
    op: ReduceOp,
    z: Compression,
    chunk_bytes: usize,
) -> Result<DataFrame> {
    let bad = |what: String| Err(Error::remote(format!("rank {rank}: {z} data frame {what}")));
    if coll != Collective::AllReduce {
        return bad(format!(
            "for a {}: only all-reduce data travels compressed",
            coll.name()
        ));
    }
    if !z.applies_to(dtype) {
        return bad(format!(
            "for {dtype} data: only float32 and float64 compress"
        ));
    }
    // Element counts whose float32 image could not be addressed are refused before any
    // size is computed from them.
    let count = usize::try_from(h.count)
        .ok()
        .filter(|c| c.checked_mul(8).is_some())
        .ok_or_else(|| {
            Error::remote(format!("rank {rank}: element count {} overflows", h.count))
        })?;
    let total = z.encoded_len(count) as u64;
    let end = h.offset.saturating_add(h.len);
    let max = super::compressed_chunk_bytes(chunk_bytes, z);
    if h.len == 0 || end > total {
        return bad(format!(
            "of {} bytes at {}: outside the op's {total} wire bytes ({count} elements)",
            h.len, h.offset
        ));
    }
    let (offset, len) = (h.offset as usize, h.len as usize);
    let Some(start) = z.elems_before(offset) else {
        return bad(format!(
            "at wire offset {offset}, where no {z} block starts"
        ));
    };
    let elems = match z.decoded_len(len) {
        Some(e) if e * 4 > max => {
            return bad(format!(
                "of {e} elements: the job announced chunks of at most {} float32 elements",
                max / 4
            ))
        }
        // Only the op's last chunk may end in a short int8 block.
        Some(e) if z == Compression::Int8 && e % INT8_BLOCK != 0 && start + e != count => None,
        e => e,
    };
    let Some(elems) = elems else {
        return bad(format!(
            "of {len} bytes at wire offset {offset}: not whole {z} blocks of the op's {count} elements"
        ));
    };
    Ok(DataFrame {
        coll,
        dtype,
        op,
        compress: z,
        elems,
    })
}

/// One chunk being summed.
struct Chunk {
    header: FrameHeader,
    dtype: DType,
    op: ReduceOp,
    /// Wire format of the contributions and the result; compressed ones are staged encoded
    /// and summed into an f32 accumulator of `elems` elements.
    z: Compression,
    elems: usize,
    /// Running fold of ranks `0..next`, in the accumulator dtype.
    acc: Option<Scratch>,
    next: usize,
    /// Contributions that arrived before their turn.
    staged: Vec<Option<Scratch>>,
    seen: Vec<bool>,
    held: usize,
}

/// Buffers of one job that are free again, kept for the next frames of the same sizes.
///
/// A fresh chunk-sized buffer is an anonymous mapping: an `mmap`, a page fault per page as the
/// payload is received into it, and an `munmap` once the result is written — several times the
/// cost of receiving the bytes. Reusing buffers keeps those pages resident instead. The pool
/// only holds buffers the job had in use at once before, and at most `limit` bytes, so it does
/// not raise the job's peak memory; it goes away with the job.
pub struct Pool {
    free: HashMap<usize, Vec<Scratch>>,
    bytes: usize,
    limit: usize,
    /// Decoded contributions of compressed max/min/prod chunks, reused from chunk to chunk
    /// (at most one chunk's float32 image).
    stage: Vec<f32>,
}

impl Pool {
    pub fn new(limit: usize) -> Pool {
        Pool {
            free: HashMap::new(),
            bytes: 0,
            limit,
            stage: Vec::new(),
        }
    }

    /// A buffer of `len` bytes with unspecified contents (zeroed when freshly allocated).
    pub fn take(&mut self, len: usize) -> Result<Scratch> {
        match self.free.get_mut(&len).and_then(Vec::pop) {
            Some(s) => {
                self.bytes -= len;
                Ok(s)
            }
            None => Scratch::zeroed(len),
        }
    }

    /// Return a buffer for reuse (dropped when the pool is full).
    pub fn give(&mut self, s: Scratch) {
        let len = s.len();
        if len == 0 || self.bytes + len > self.limit {
            return;
        }
        self.bytes += len;
        self.free.entry(len).or_default().push(s);
    }

    /// Bytes held for reuse.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Streaming rank-order sums of one job.
pub struct Sums {
    world: usize,
    /// Most bytes of accumulators and staged contributions this job may hold.
    limit: usize,
    chunks: HashMap<(u64, u64), Chunk>,
    /// Per op, the first rank that sent a frame of it and that frame's header: every later
    /// frame of the op must describe it the same way (count, dtype, reduction, wire format).
    ops: HashMap<u64, (usize, FrameHeader)>,
    held: usize,
    /// High-water mark of `held`.
    pub peak: usize,
    /// Buffers for payloads, accumulators and results; folded contributions return here.
    pub pool: Pool,
}

impl Sums {
    /// `pool_limit`: most bytes of free buffers kept for reuse.
    pub fn new(world: usize, limit: usize, pool_limit: usize) -> Sums {
        Sums {
            world,
            limit,
            chunks: HashMap::new(),
            ops: HashMap::new(),
            held: 0,
            peak: 0,
            pool: Pool::new(pool_limit),
        }
    }

    /// Bytes currently held.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Chunks with some but not all contributions.
    pub fn open_chunks(&self) -> usize {
        self.chunks.len()
    }

    /// Add `rank`'s contribution (a checked all-reduce frame); returns the finished chunk
    /// (header to send to every peer, payload in the op's dtype) once all ranks are in.
    pub fn contribute(
        &mut self,
        rank: usize,
        h: &FrameHeader,
        f: DataFrame,
        payload: Scratch,
    ) -> std::result::Result<Option<(FrameHeader, Scratch)>, Fault> {
        let key = (h.seq, h.offset);
        let world = self.world;
        let header = FrameHeader { aux: 0, ..*h };
        if let Err(e) = self.check_op(rank, h) {
            self.drop_seq(h.seq);
            return Err(Fault::Op(h.seq, e));
        }
        let chunk = self.chunks.entry(key).or_insert_with(|| Chunk {
            header,
            dtype: f.dtype,
            op: f.op,
            z: f.compress,
            elems: f.elems,
            acc: None,
            next: 0,
            staged: (0..world).map(|_| None).collect(),
            seen: vec![false; world],
            held: 0,
        });
        if chunk.header != header {
            let msg = format!(
                "mismatched collective calls: rank {rank} sent {} bytes at offset {} of op seq {} ({}) \
                 but another rank sent {} bytes there",
                h.len,
                h.offset,
                h.seq,
                describe(h),
                chunk.header.len
            );
            self.drop_seq(h.seq);
            return Err(Fault::Op(h.seq, Error::invalid(msg)));
        }
        if chunk.seen[rank] {
            return Err(Fault::Conn(Error::remote(format!(
                "rank {rank} sent bytes {}..{} of op seq {} twice",
                h.offset,
                h.offset + h.len,
                h.seq
            ))));
        }
        let added = payload.len();
        // A compressed chunk's f32 accumulator is allocated with its first fold: count it now.
        let acc_to_come = if chunk.z != Compression::None && chunk.acc.is_none() {
            chunk.elems * 4
        } else {
            0
        };
        if self.held + added + acc_to_come > self.limit {
            return Err(Fault::Conn(Error::remote(format!(
                "rank {rank} exceeded the job's memory budget of {} bytes (more chunks in flight than its window allows)",
                self.limit
            ))));
        }
        chunk.seen[rank] = true;
        if rank != chunk.next {
            chunk.staged[rank] = Some(payload);
            chunk.held += added;
            self.held += added;
        } else {
            let before = chunk.held;
            fold(chunk, payload, &mut self.pool).map_err(Fault::Conn)?;
            while chunk.next < world {
                let Some(p) = chunk.staged[chunk.next].take() else {
                    break;
                };
                chunk.held -= p.len();
                fold(chunk, p, &mut self.pool).map_err(Fault::Conn)?;
            }
            self.held = self.held + chunk.held - before;
        }
        self.peak = self.peak.max(self.held);
        if chunk.next < world {
            return Ok(None);
        }
        let chunk = self.chunks.remove(&key).expect("finished chunk");
        self.held -= chunk.held;
        let header = chunk.header;
        let out = finish(chunk, world, &mut self.pool).map_err(Fault::Conn)?;
        Ok(Some((header, out)))
    }

    /// Check that `h` describes its op as the op's first frame did; remember that frame.
    fn check_op(&mut self, rank: usize, h: &FrameHeader) -> Result<()> {
        let same = |a: &FrameHeader| {
            (a.coll, a.dtype, a.redop, a.count) == (h.coll, h.dtype, h.redop, h.count)
        };
        match self.ops.get(&h.seq) {
            Some((_, first)) if same(first) => Ok(()),
            Some((first_rank, first)) => {
                let (zf, zh) = (first.redop >> 4, h.redop >> 4);
                let what = if zf != zh {
                    let name = |v: u8| Compression::from_u8(v).map_or("unknown", |z| z.name());
                    format!(
                        "rank {rank} sends op seq {} in wire format {} but rank {first_rank} sent it in {}",
                        h.seq,
                        name(zh),
                        name(zf)
                    )
                } else {
                    format!(
                        "rank {rank} sent op seq {} as ({}) but rank {first_rank} sent it as ({})",
                        h.seq,
                        describe(h),
                        describe(first)
                    )
                };
                Err(Error::invalid(format!(
                    "mismatched collective calls: {what}"
                )))
            }
            None => {
                // Sequence numbers only grow: ops far behind the newest are over.
                if self.ops.len() >= 64 {
                    let newest = self.ops.keys().copied().max().unwrap_or(0).max(h.seq);
                    self.ops.retain(|&seq, _| seq.saturating_add(32) > newest);
                }
                self.ops.insert(h.seq, (rank, *h));
                Ok(())
            }
        }
    }

    /// Forget every chunk of op `seq` (the op failed).
    pub fn drop_seq(&mut self, seq: u64) {
        let mut freed = 0;
        let mut dropped = Vec::new();
        self.chunks.retain(|k, c| {
            if k.0 == seq {
                freed += c.held;
                dropped.extend(c.acc.take());
                dropped.extend(c.staged.iter_mut().filter_map(Option::take));
                false
            } else {
                true
            }
        });
        self.held -= freed;
        for s in dropped {
            self.pool.give(s);
        }
    }
}

/// Fold the contribution of rank `chunk.next` into the accumulator; spent buffers go to `pool`.
fn fold(chunk: &mut Chunk, payload: Scratch, pool: &mut Pool) -> Result<()> {
    if chunk.z != Compression::None {
        match chunk.acc.as_mut() {
            None => {
                // `decode` writes every element, so a reused buffer needs no zeroing.
                let mut acc = pool.take(chunk.elems * 4)?;
                chunk.z.decode(
                    payload.as_slice(),
                    bytemuck::cast_slice_mut(acc.as_mut_slice()),
                );
                chunk.held += acc.len();
                chunk.acc = Some(acc);
            }
            Some(acc) => compress::fold_encoded(
                chunk.z,
                chunk.op,
                bytemuck::cast_slice_mut(acc.as_mut_slice()),
                payload.as_slice(),
                &mut pool.stage,
            ),
        }
        pool.give(payload);
        chunk.next += 1;
        return Ok(());
    }
    let widened = chunk.dtype.accumulator() != chunk.dtype;
    match chunk.acc.as_mut() {
        None if !widened => {
            chunk.held += payload.len();
            chunk.acc = Some(payload);
            chunk.next += 1;
            return Ok(());
        }
        None => {
            // `widen` writes every element, so a reused buffer needs no zeroing.
            let mut acc = pool.take(payload.len() * 2)?;
            reduce::widen(chunk.dtype, acc.as_mut_slice(), payload.as_slice());
            chunk.held += acc.len();
            chunk.acc = Some(acc);
        }
        Some(acc) if widened => reduce::reduce_widen(
            chunk.dtype,
            chunk.op,
            acc.as_mut_slice(),
            payload.as_slice(),
        ),
        Some(acc) => reduce::reduce(
            chunk.dtype,
            chunk.op,
            acc.as_mut_slice(),
            payload.as_slice(),
        ),
    }
    pool.give(payload);
    chunk.next += 1;
    Ok(())
}

/// The finished chunk in the op's dtype: AVG divided by the world size, 16-bit floats rounded
/// once from f32.
fn finish(chunk: Chunk, world: usize, pool: &mut Pool) -> Result<Scratch> {
    let mut acc = chunk.acc.expect("a finished chunk has an accumulator");
    if chunk.z != Compression::None {
        // Summed in f32 from the decoded contributions; encoded once, for every peer.
        if chunk.op == ReduceOp::Avg {
            reduce::divide(DType::F32, acc.as_mut_slice(), world);
        }
        // `encode` writes every byte, so a reused buffer needs no zeroing.
        let mut out = pool.take(chunk.z.encoded_len(chunk.elems))?;
        chunk
            .z
            .encode(bytemuck::cast_slice(acc.as_slice()), out.as_mut_slice());
        pool.give(acc);
        return Ok(out);
    }
    let acc_dtype = chunk.dtype.accumulator();
    if chunk.op == ReduceOp::Avg {
        reduce::divide(acc_dtype, acc.as_mut_slice(), world);
    }
    if acc_dtype == chunk.dtype {
        return Ok(acc);
    }
    // `narrow` writes every element, so a reused buffer needs no zeroing.
    let mut out = pool.take(acc.len() / 2)?;
    reduce::narrow(chunk.dtype, out.as_mut_slice(), acc.as_slice());
    pool.give(acc);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::{Collective, OpDesc};

    fn scratch(b: &[u8]) -> Scratch {
        let mut s = Scratch::zeroed(b.len()).unwrap();
        s.as_mut_slice().copy_from_slice(b);
        s
    }

    fn desc(dtype: DType, op: ReduceOp, count: usize) -> OpDesc {
        OpDesc {
            coll: Collective::AllReduce,
            seq: 1,
            dtype,
            op,
            count,
            root: 0,
            compress: crate::compress::Compression::None,
        }
    }

    /// Contributions in any arrival order give the left fold in rank order, bit for bit.
    #[test]
    fn folds_in_rank_order_whatever_the_arrival_order() {
        let world = 4;
        // Values whose f32 sum depends on the order of additions.
        let vals: [f32; 4] = [1e8, 1.0, -1e8, 0.5];
        let expect = ((vals[0] + vals[1]) + vals[2]) + vals[3];
        for order in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]] {
            let d = desc(DType::F32, ReduceOp::Sum, 1);
            let h = d.header(0, 0, 4);
            let f = check_data_header(&h, 0, world, 64).unwrap();
            let mut sums = Sums::new(world, 1 << 20, 1 << 20);
            let mut out = None;
            for &r in &order {
                let res = sums
                    .contribute(r, &h, f, scratch(&vals[r].to_le_bytes()))
                    .unwrap();
                assert_eq!(res.is_some(), out.is_none() && r == order[3]);
                out = out.or(res);
            }
            let (_, buf) = out.unwrap();
            assert_eq!(buf.as_slice(), &expect.to_le_bytes());
            assert_eq!(sums.held(), 0);
            assert_eq!(sums.open_chunks(), 0);
        }
    }

    #[test]
    fn half_precision_sums_in_f32_and_rounds_once_and_avg_divides() {
        let world = 3;
        let x = [
            half::f16::from_f32(0.1),
            half::f16::from_f32(0.2),
            half::f16::from_f32(0.3),
        ];
        let d = desc(DType::F16, ReduceOp::Avg, 1);
        let h = d.header(0, 0, 2);
        let f = check_data_header(&h, 0, world, 64).unwrap();
        let mut sums = Sums::new(world, 1 << 20, 1 << 20);
        let mut out = None;
        for r in [2, 0, 1] {
            out = sums
                .contribute(r, &h, f, scratch(&x[r].to_bits().to_le_bytes()))
                .unwrap()
                .or(out);
        }
        let sum = (x[0].to_f32() + x[1].to_f32()) + x[2].to_f32();
        let expect = half::f16::from_f32(sum / 3.0);
        assert_eq!(out.unwrap().1.as_slice(), &expect.to_bits().to_le_bytes());
    }

    fn encoded(z: Compression, x: &[f32]) -> Vec<u8> {
        let mut w = vec![0u8; z.encoded_len(x.len())];
        z.encode(x, &mut w);
        w
    }

    /// Compressed chunks: decoded, folded in rank order in f32 whatever the arrival order,
    /// encoded once; the same bytes a verifier recomputes with `reduce_encoded`.
    #[test]
    fn compressed_chunks_fold_decoded_in_rank_order_and_encode_once() {
        let world = 3;
        let count = 2 * INT8_BLOCK + 7;
        for z in [Compression::Bf16, Compression::Fp16, Compression::Int8] {
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
                let mut d = desc(DType::F64, op, count);
                d.compress = z;
                let xs: Vec<Vec<f32>> = (0..world)
                    .map(|r| {
                        (0..count)
                            .map(|i| ((i * 13 + r * 7) % 97) as f32 * 0.37 - 11.0)
                            .collect()
                    })
                    .collect();
                // The last chunk: the op's short tail block.
                let start = 2 * INT8_BLOCK;
                let wires: Vec<Vec<u8>> = xs.iter().map(|x| encoded(z, &x[start..])).collect();
                let h = d.header(0, z.encoded_len(start), wires[0].len());
                let f = check_data_header(&h, 0, world, 4096).unwrap();
                assert_eq!((f.compress, f.elems), (z, 7));
                let refs: Vec<&[u8]> = wires.iter().map(Vec::as_slice).collect();
                let want = crate::compress::reduce_encoded(z, op, &refs).unwrap();
                let mut sums = Sums::new(world, 1 << 20, 1 << 20);
                let mut out = None;
                for r in [2, 0, 1] {
                    out = sums
                        .contribute(r, &h, f, scratch(&wires[r]))
                        .unwrap()
                        .or(out);
                }
                let (rh, res) = out.unwrap();
                assert_eq!(rh.len, h.len);
                assert_eq!(res.as_slice(), &want[..], "{z} {op}");
                assert_eq!(sums.held(), 0);
            }
        }
    }

    #[test]
    fn compressed_headers_are_checked_against_the_op_before_any_allocation() {
        let mut d = desc(DType::F32, ReduceOp::Sum, 3 * INT8_BLOCK + 5);
        d.compress = Compression::Int8;
        let ok = |off: usize, len: usize| check_data_header(&d.header(0, off, len), 1, 2, 1024);
        // One whole block, the short tail block, and both.
        assert_eq!(ok(0, 264).unwrap().elems, 256);
        assert_eq!(ok(3 * 264, 13).unwrap().elems, 5);
        assert!(ok(3 * 264, 12).is_err(), "tail of the wrong length");
        // Not at a block boundary; a short block that is not the op's last; past the end.
        assert!(ok(8, 264)
            .unwrap_err()
            .message
            .contains("no int8 block starts"));
        assert!(ok(0, 100).is_err());
        assert!(ok(2 * 264, 264 + 13 + 264).is_err());
        // More elements than the job's chunks hold (1024 wire bytes: three int8 blocks).
        assert_eq!(ok(0, 3 * 264).unwrap().elems, 768);
        let e = ok(0, 3 * 264 + 13).unwrap_err();
        assert!(e.message.contains("at most 768 float32"), "{}", e.message);
        // Tiny announced chunks still take one whole block.
        assert!(check_data_header(&d.header(0, 0, 264), 1, 2, 64).is_ok());
        // Only float all-reduce compresses; unknown formats are named.
        let mut b = d;
        b.coll = Collective::Broadcast;
        assert!(check_data_header(&b.header(1, 0, 264), 1, 2, 1024).is_err());
        let mut i = d;
        i.dtype = DType::I32;
        assert!(check_data_header(&i.header(0, 0, 264), 1, 2, 1024).is_err());
        let mut h = d.header(0, 0, 264);
        h.redop |= 0x70;
        let e = check_data_header(&h, 1, 2, 1024).unwrap_err();
        assert!(e.message.contains("wire format 7"), "{}", e.message);
        let mut h = d.header(0, 0, 264);
        h.count = u64::MAX;
        assert!(check_data_header(&h, 1, 2, 1024).is_err());
    }

    #[test]
    fn a_format_mismatch_names_the_ranks_and_formats_and_memory_counts_accumulators() {
        let mut a = desc(DType::F32, ReduceOp::Sum, 4 * INT8_BLOCK);
        a.compress = Compression::Int8;
        let mut b = a;
        b.compress = Compression::Bf16;
        let mut sums = Sums::new(3, 1 << 20, 0);
        let ha = a.header(0, 0, 264);
        let fa = check_data_header(&ha, 0, 3, 1024).unwrap();
        sums.contribute(0, &ha, fa, scratch(&[0; 264])).unwrap();
        // Rank 0's chunk holds its f32 accumulator (1024 bytes) besides nothing staged.
        assert_eq!(sums.held(), 1024);
        // Another chunk of the op in another format, at an offset no int8 chunk uses.
        let hb = b.header(0, 512, 512);
        let fb = check_data_header(&hb, 2, 3, 1024).unwrap();
        match sums.contribute(2, &hb, fb, scratch(&[0; 512])) {
            Err(Fault::Op(1, e)) => {
                assert!(
                    e.message
                        .contains("rank 2 sends op seq 1 in wire format bf16")
                        && e.message.contains("rank 0 sent it in int8"),
                    "{}",
                    e.message
                );
            }
            other => panic!("{:?}", other.map(|o| o.is_some())),
        }
        assert_eq!(sums.held(), 0);
        // A budget too small for the accumulator a first contribution brings.
        let mut tight = Sums::new(3, 264 + 1000, 0);
        let mut c = a;
        c.seq = 2;
        let hc = c.header(0, 0, 264);
        let fc = check_data_header(&hc, 0, 3, 1024).unwrap();
        assert!(matches!(
            tight.contribute(1, &hc, fc, scratch(&[0; 264])),
            Err(Fault::Conn(_))
        ));
    }

    /// A relay that took over a lost relay's lane holds up to two windows of one peer's
    /// chunks: the job's reservation (three quarters of which `Sums` may hold, as the relay
    /// sets it) must take two windows of full int8 chunks, each with its float32 accumulator,
    /// for any world size.
    #[test]
    fn the_reservation_holds_two_windows_of_int8_chunks() {
        for (world, chunk) in [(2, 1 << 20), (3, 1 << 20), (4, 64 << 10), (2, 64 << 10)] {
            let hello = crate::relay::JobHello {
                job: [1; 16],
                rank: 0,
                world,
                stream: 0,
                streams: 1,
                chunk_bytes: chunk,
                window: crate::algo::relay::max_window(chunk),
            };
            let budget = hello.budget();
            let mut sums = Sums::new(world, budget / 4 * 3, budget);
            let per = crate::relay::compressed_chunk_bytes(chunk, Compression::Int8) / 4;
            let chunks = 2 * hello.window;
            let mut d = desc(DType::F32, ReduceOp::Sum, per * chunks);
            d.compress = Compression::Int8;
            let wire = Compression::Int8.encoded_len(per);
            let payload = encoded(Compression::Int8, &vec![1.5f32; per]);
            // Every peer but the last contributes every chunk: all of them stay open.
            for r in 0..world - 1 {
                for k in 0..chunks {
                    let h = d.header(0, k * wire, wire);
                    let f = check_data_header(&h, r, world, chunk).unwrap();
                    let got = sums.contribute(r, &h, f, scratch(&payload));
                    assert!(
                        matches!(got, Ok(None)),
                        "world {world}, chunk {chunk}: rank {r}'s chunk {k} of {chunks} refused \
                         ({} bytes held, budget {budget})",
                        sums.held()
                    );
                }
            }
        }
    }

    #[test]
    fn rejects_bad_headers_duplicates_mismatches_and_overuse() {
        let d = desc(DType::I32, ReduceOp::Sum, 100);
        // Longer than the announced chunk, outside the op, not whole elements.
        assert!(check_data_header(&d.header(0, 0, 128), 0, 2, 64).is_err());
        assert!(check_data_header(&d.header(0, 392, 16), 0, 2, 64).is_err());
        assert!(check_data_header(&d.header(0, 2, 4), 0, 2, 64).is_err());
        assert!(check_data_header(&d.header(0, 0, 0), 0, 2, 64).is_err());
        let mut b = d.header(0, 0, 8);
        b.coll = Collective::AllGather as u8;
        assert!(check_data_header(&b, 0, 2, 64).is_err());
        let h = d.header(0, 0, 8);
        let f = check_data_header(&h, 0, 2, 64).unwrap();
        let mut sums = Sums::new(3, 16, 0);
        sums.contribute(1, &h, f, scratch(&[0; 8])).unwrap();
        assert!(matches!(
            sums.contribute(1, &h, f, scratch(&[0; 8])),
            Err(Fault::Conn(_))
        ));
        // Budget: 16 bytes, 8 held.
        let h2 = d.header(0, 8, 16);
        assert!(matches!(
            sums.contribute(2, &h2, f, scratch(&[0; 16])),
            Err(Fault::Conn(_))
        ));
        let mut other = h;
        other.count = 99;
        assert!(matches!(
            sums.contribute(0, &other, f, scratch(&[0; 8])),
            Err(Fault::Op(1, _))
        ));
        assert_eq!(sums.held(), 0);
    }

    /// A job member's sequence numbers are its own claim: one near `u64::MAX` must neither
    /// overflow the bookkeeping of recent ops nor panic the relay.
    #[test]
    fn a_huge_sequence_number_is_not_an_overflow() {
        let mut sums = Sums::new(2, 1 << 20, 1 << 20);
        let d = desc(DType::F32, ReduceOp::Sum, 1);
        for seq in (0..70).chain(u64::MAX - 70..=u64::MAX) {
            let h = FrameHeader {
                seq,
                ..d.header(0, 0, 4)
            };
            let f = check_data_header(&h, 0, 2, 64).unwrap();
            assert!(sums
                .contribute(0, &h, f, scratch(&1f32.to_le_bytes()))
                .is_ok());
        }
    }
}

//! The relay's arithmetic for one job, sans-IO: checks data headers against the job before
//! any allocation, and folds each chunk's contributions strictly in rank order
//! (`x0 op x1 op x2 …`), staging contributions that arrive early, so a verifier can recompute
//! every result bit-exactly.

use crate::algo::Collective;
use crate::buffer::Scratch;
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
}

/// Check a data header from `rank` against the job's announced sizes, before its payload is
/// read. `chunk_bytes` is the job's announced chunk size.
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
    let op = ReduceOp::from_raw(h.redop as u32)?;
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
    Ok(DataFrame { coll, dtype, op })
}

/// One chunk being summed.
struct Chunk {
    header: FrameHeader,
    dtype: DType,
    op: ReduceOp,
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
}

impl Pool {
    pub fn new(limit: usize) -> Pool {
        Pool {
            free: HashMap::new(),
            bytes: 0,
            limit,
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
        let chunk = self.chunks.entry(key).or_insert_with(|| Chunk {
            header,
            dtype: f.dtype,
            op: f.op,
            acc: None,
            next: 0,
            staged: (0..world).map(|_| None).collect(),
            seen: vec![false; world],
            held: 0,
        });
        if chunk.header != header {
            let msg = format!(
                "mismatched collective calls: rank {rank} sent op seq {} ({}x dtype {} op {}, {} bytes at {}) \
                 but another rank sent ({}x dtype {} op {}, {} bytes)",
                h.seq, h.count, h.dtype, h.redop, h.len, h.offset,
                chunk.header.count, chunk.header.dtype, chunk.header.redop, chunk.header.len
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
        if self.held + added > self.limit {
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
}

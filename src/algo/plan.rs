//! Choosing a schedule for an op, and the segment arithmetic schedules share.
//!
//! Vocabulary used by every schedule:
//! * a **block** is one rank's share of a buffer: `count` elements split into `parts` nearly
//!   equal runs, the first `count % parts` one element longer ([`block`]);
//! * a **segment** is the unit of pipelining: at most `chunk_bytes` of one block, in whole
//!   elements ([`segments`]). Each segment travels as one data frame.

use crate::algo::compressed::{CompressedRing, EncodedCopy};
use crate::algo::relay::{RelaySchedule, DEFAULT_WINDOW};
use crate::algo::ring::{Broadcast, RecursiveDoubling, RingGather, RingReduce};
use crate::algo::{Collective, OpDesc, Schedule};
use crate::buffer::{OpMemory, Scratch};
use crate::compress::Compression;
use crate::config::{Algo, Config};
use crate::error::Result;
use std::ops::Range;

/// Elements of block `b` when `count` elements are split into `parts` blocks.
pub fn block(count: usize, parts: usize, b: usize) -> Range<usize> {
    debug_assert!(parts > 0 && b < parts);
    let base = count / parts;
    let extra = count % parts;
    let start = b * base + b.min(extra);
    let len = base + usize::from(b < extra);
    start..start + len
}

/// Split the byte range `range` (whole `elem`-byte elements) into segments of at most
/// `chunk_bytes` (rounded down to whole elements, at least one element).
pub fn segments(
    range: Range<usize>,
    elem: usize,
    chunk_bytes: usize,
) -> impl Iterator<Item = Range<usize>> {
    let step = (chunk_bytes / elem).max(1) * elem;
    let end = range.end;
    (range.start..end)
        .step_by(step)
        .map(move |s| s..(s + step).min(end))
}

/// Convert an element range to a byte range for elements of `size` bytes.
pub fn bytes(r: &Range<usize>, size: usize) -> Range<usize> {
    r.start * size..r.end * size
}

/// With `MR_ALGO=auto`, all-reduces and broadcasts of at least this many bytes go through the
/// relays when some are connected.
pub const RELAY_AUTO_MIN_BYTES: usize = 1 << 20;

/// Build the schedule for `desc` on `rank` of `size`, allocating any scratch it needs into
/// `mem`.
pub fn build(
    desc: &OpDesc,
    rank: usize,
    size: usize,
    config: &Config,
    mem: &mut OpMemory,
) -> Result<Box<dyn Schedule>> {
    build_with_relays(desc, rank, size, config, &[], &[], DEFAULT_WINDOW, mem)
}

/// Whether `desc` goes through `relays` (the relay indices every rank is connected to):
/// all-reduce and broadcast do when `MR_ALGO=relay`, or `auto` and the message is at least
/// [`RELAY_AUTO_MIN_BYTES`]. Depends only on what every rank passes alike.
pub fn uses_relays(desc: &OpDesc, config: &Config, relays: &[usize]) -> bool {
    !relays.is_empty()
        && matches!(desc.coll, Collective::AllReduce | Collective::Broadcast)
        && match config.algo {
            Algo::Relay => true,
            Algo::Auto => desc.count * desc.dtype.size() >= RELAY_AUTO_MIN_BYTES,
            Algo::Ring => false,
        }
}

/// As [`build`], through `relays` when [`uses_relays`] says so, their segments sized by
/// `weights` (one per relay, as for [`crate::algo::relay::segment_ranges`]; empty: equal), at
/// most `window` chunks in flight per lane.
#[allow(clippy::too_many_arguments)]
pub fn build_with_relays(
    desc: &OpDesc,
    rank: usize,
    size: usize,
    config: &Config,
    relays: &[usize],
    weights: &[u64],
    window: usize,
    mem: &mut OpMemory,
) -> Result<Box<dyn Schedule>> {
    if uses_relays(desc, config, relays) {
        return Ok(Box::new(RelaySchedule::new(
            *desc,
            rank,
            size,
            relays,
            weights,
            config.relay_chunk_bytes,
            window,
        )));
    }
    let chunk = config.chunk_bytes;
    let acc_size = desc.dtype.accumulator().size();
    Ok(match desc.coll {
        Collective::AllReduce => {
            let bytes = desc.count * desc.dtype.size();
            if desc.compress != Compression::None && size > 1 && bytes >= config.small_bytes {
                Box::new(CompressedRing::new(*desc, rank, size, chunk, mem)?)
            } else if size > 1 && bytes < config.small_bytes {
                mem.acc = Some(Scratch::zeroed(desc.count * acc_size)?);
                Box::new(RecursiveDoubling::new(*desc, rank, size))
            } else {
                if desc.dtype.accumulator() != desc.dtype {
                    mem.acc = Some(Scratch::zeroed(desc.count * acc_size)?);
                }
                Box::new(RingReduce::new(*desc, rank, size, chunk, true, mem))
            }
        }
        Collective::ReduceScatter if desc.compress != Compression::None && size > 1 => {
            Box::new(CompressedRing::new(*desc, rank, size, chunk, mem)?)
        }
        Collective::ReduceScatter => {
            mem.acc = Some(Scratch::zeroed(desc.count * size * acc_size)?);
            Box::new(RingReduce::new(*desc, rank, size, chunk, false, mem))
        }
        Collective::AllGather if desc.compress != Compression::None && size > 1 => {
            Box::new(EncodedCopy::new(*desc, rank, size, chunk, false, mem)?)
        }
        Collective::AllGather => Box::new(RingGather::new(*desc, rank, size, chunk, mem)),
        Collective::Broadcast if desc.compress != Compression::None && size > 1 => {
            let tree = desc.count * desc.dtype.size() < config.small_bytes;
            Box::new(EncodedCopy::new(*desc, rank, size, chunk, tree, mem)?)
        }
        Collective::Broadcast => {
            if desc.count * desc.dtype.size() < config.small_bytes {
                Box::new(Broadcast::tree(*desc, rank, size, chunk))
            } else {
                Box::new(Broadcast::chain(*desc, rank, size, chunk))
            }
        }
        Collective::Barrier => {
            mem.acc = Some(Scratch::zeroed(0)?);
            Box::new(RecursiveDoubling::new(*desc, rank, size))
        }
        Collective::Gather
        | Collective::Scatter
        | Collective::AllToAll
        | Collective::AllToAllV
        | Collective::PointToPoint => {
            return Err(crate::error::Error::internal(format!(
                "{desc} is a direct exchange: its plan comes with the call (algo::exchange)"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_partition_exactly() {
        for count in 0..40 {
            for parts in 1..10 {
                let mut next = 0;
                for b in 0..parts {
                    let r = block(count, parts, b);
                    assert_eq!(r.start, next);
                    assert!(r.len() == count / parts || r.len() == count / parts + 1);
                    next = r.end;
                }
                assert_eq!(next, count);
            }
        }
    }

    #[test]
    fn segments_cover_in_whole_elements() {
        let segs: Vec<_> = segments(8..48, 4, 10).collect();
        assert_eq!(segs, vec![8..16, 16..24, 24..32, 32..40, 40..48]);
        let segs: Vec<_> = segments(0..6, 2, 1).collect();
        assert_eq!(segs, vec![0..2, 2..4, 4..6]);
        assert_eq!(segments(5..5, 4, 64).count(), 0);
    }
}

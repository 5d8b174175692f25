//! Choosing a schedule for an op: which algorithm runs it (ring, tree, recursive doubling,
//! relays, compressed ring) given its size, the configuration and the relays in use. The
//! arithmetic that cuts buffers into blocks and chunks is in [`crate::algo::span`].

use crate::algo::broadcast::Broadcast;
use crate::algo::compressed::{CompressedRing, EncodedCopy};
use crate::algo::doubling::RecursiveDoubling;
use crate::algo::relay::{RelaySchedule, DEFAULT_WINDOW};
use crate::algo::ring::{RingGather, RingReduce};
use crate::algo::{Collective, OpDesc, Schedule};
use crate::buffer::{OpMemory, Scratch};
use crate::compress::Compression;
use crate::config::{Algo, Config};
use crate::error::Result;

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

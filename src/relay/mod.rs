//! Relay mode: the daemon side (`mr-relayd`) and the peer side of the peer↔relay protocol.
//!
//! Protocol, on top of the frames of [`crate::wire`]:
//! 1. the relay accepts a TCP connection and sends a `Challenge`;
//! 2. the peer answers with a `Hello` whose MAC is keyed by the job token
//!    ([`crate::wire::mac_key`]) and whose body is a [`JobHello`]: job id, rank, world size,
//!    stream index, streams per peer, chunk size and window;
//! 3. the relay answers `Welcome` (MAC over its nonce) or `Reject` (`aux` = error kind);
//! 4. data: each peer sends the chunks of its segment as `Data` frames whose header describes
//!    the op exactly as on the ring (`seq`, `coll`, `dtype`, `redop`, `count`, byte `offset` in
//!    the caller's buffer). For an all-reduce the relay folds the contributions of one chunk in
//!    rank order and sends the finished chunk (same header) to every peer. For a broadcast
//!    (`aux` = root) it forwards the root's chunk to every other peer and, once the copies are
//!    written, acknowledges the chunk to the root with an empty frame (same header, `len` 0).
//!
//! A compressed all-reduce ([`crate::compress`]; the format in the high nibble of `redop`)
//! goes the same way, with `offset` and `len` in the encoded image of the buffer: each peer
//! sends its chunk encoded; the relay decodes each rank's chunk, folds them in rank order in
//! f32, encodes the result once and sends those same bytes to every peer, which all decode
//! them alike ([`sums`]).
//!
//! A peer keeps at most `window` chunks per relay unanswered, so a relay holds at most
//! `world × window` chunks per job: memory is bounded independently of the tensor size.

pub mod admission;
pub mod client;
pub(crate) mod faults;
pub mod limits;
pub mod receipts;
pub mod registration;
pub mod server;
pub mod sums;

use crate::compress::Compression;
use crate::error::{Error, Result};
use crate::wire::{BodyReader, BodyWriter};

/// Largest world size a relay accepts.
pub const MAX_WORLD: usize = 1 << 16;
/// Largest window (chunks in flight per peer and relay) a relay accepts.
pub const MAX_WINDOW: usize = 64;

/// Most float32 bytes of one all-reduce chunk in format `z` in a job that announced
/// `chunk_bytes`: whole int8 blocks whose encoding takes at most `chunk_bytes`, and at least
/// one block. A compressed chunk so puts about as many bytes on the wire as an exact one
/// (an int8 chunk of a 64 KiB job carries 248 blocks: 248 KiB of float32 in 65,472 wire
/// bytes), and costs as much per byte in frames, syscalls and tags. Peers cut compressed
/// chunks this way, and relays size (and refuse) them by it. A relay's float32 accumulator
/// for such a chunk is up to 3.9 times the job's chunk, which the job's budget
/// ([`JobHello::budget`]) counts. With [`Compression::None`]: whole blocks of at most
/// `chunk_bytes`.
pub fn compressed_chunk_bytes(chunk_bytes: usize, z: Compression) -> usize {
    use crate::compress::INT8_BLOCK;
    (chunk_bytes / z.encoded_len(INT8_BLOCK)).max(1) * INT8_BLOCK * 4
}

/// What a peer announces about itself and its job when it connects to a relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobHello {
    pub job: [u8; 16],
    pub rank: usize,
    pub world: usize,
    pub stream: usize,
    pub streams: usize,
    pub chunk_bytes: usize,
    pub window: usize,
}

impl JobHello {
    pub fn encode(&self) -> Vec<u8> {
        BodyWriter::default()
            .bytes(&self.job)
            .u32(self.rank as u32)
            .u32(self.world as u32)
            .u32(self.stream as u32)
            .u32(self.streams as u32)
            .u64(self.chunk_bytes as u64)
            .u32(self.window as u32)
            .finish()
    }

    /// Parse and range-check a hello body.
    pub fn decode(body: &[u8]) -> Result<JobHello> {
        let mut r = BodyReader::new(body, "relay hello");
        let job: [u8; 16] = r
            .bytes()?
            .try_into()
            .map_err(|_| Error::remote("malformed relay hello: job id is not 16 bytes"))?;
        let h = JobHello {
            job,
            rank: r.u32()? as usize,
            world: r.u32()? as usize,
            stream: r.u32()? as usize,
            streams: r.u32()? as usize,
            chunk_bytes: r.u64()?.min(usize::MAX as u64) as usize,
            window: r.u32()? as usize,
        };
        let bad = |what: String| Err(Error::invalid(format!("relay hello: {what}")));
        if h.world == 0 || h.world > MAX_WORLD {
            return bad(format!("world size {} is outside 1..={MAX_WORLD}", h.world));
        }
        if h.rank >= h.world {
            return bad(format!(
                "rank {} is out of range for world size {}",
                h.rank, h.world
            ));
        }
        if h.streams == 0 || h.streams > 64 || h.stream >= h.streams {
            return bad(format!(
                "stream {} of {} is out of range",
                h.stream, h.streams
            ));
        }
        if !(64..=crate::wire::MAX_PAYLOAD).contains(&h.chunk_bytes) {
            return bad(format!("chunk size {} is out of range", h.chunk_bytes));
        }
        if h.window == 0 || h.window > MAX_WINDOW {
            return bad(format!("window {} is outside 1..={MAX_WINDOW}", h.window));
        }
        Ok(h)
    }

    /// The most memory the relay may need for this job. Per slot of the announced window:
    /// four of every peer's chunks (staged contributions, an accumulator, results queued;
    /// twice the wire size for 16-bit floats' accumulators), and at least three times every
    /// peer's chunk plus the largest compressed accumulator ([`compressed_chunk_bytes`] in
    /// int8: whole int8 blocks whose encoding fits the chunk, up to 3.9 chunks of float32).
    /// The relay's sums may hold three quarters of it: enough for two windows of open
    /// chunks from every peer, each with its accumulator — what a relay holds once it also
    /// serves the lane of a relay the peers lost. Chunks are never counted below one int8
    /// block of float32, even when announced tiny.
    pub fn budget(&self) -> usize {
        let chunk = self
            .chunk_bytes
            .max(compressed_chunk_bytes(self.chunk_bytes, Compression::None));
        let acc = compressed_chunk_bytes(self.chunk_bytes, Compression::Int8);
        let staged = self.world.saturating_mul(chunk);
        let slot = staged
            .saturating_mul(4)
            .max(staged.saturating_add(acc).saturating_mul(3));
        self.window.saturating_mul(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trip_and_checks() {
        let h = JobHello {
            job: [7; 16],
            rank: 2,
            world: 3,
            stream: 1,
            streams: 2,
            chunk_bytes: 1 << 20,
            window: 4,
        };
        assert_eq!(JobHello::decode(&h.encode()).unwrap(), h);
        let bad = JobHello {
            rank: 3,
            ..h.clone()
        };
        assert!(JobHello::decode(&bad.encode())
            .unwrap_err()
            .message
            .contains("out of range"));
        let bad = JobHello {
            window: 0,
            ..h.clone()
        };
        assert!(JobHello::decode(&bad.encode()).is_err());
        assert!(JobHello::decode(&h.encode()[..10]).is_err());
    }

    /// A compressed chunk holds at least one int8 block of float32, so tiny announced chunks
    /// reserve that much; larger ones are unchanged.
    #[test]
    fn the_reservation_covers_compressed_chunks() {
        let z = Compression::None;
        assert_eq!(compressed_chunk_bytes(64, z), 1024);
        assert_eq!(compressed_chunk_bytes(4096, z), 4096);
        assert_eq!(compressed_chunk_bytes(5000, z), 4096);
        // Compressed chunks take at most the job's chunk on the wire (at least one block).
        assert_eq!(compressed_chunk_bytes(64, Compression::Int8), 1024);
        assert_eq!(
            compressed_chunk_bytes(64 << 10, Compression::Int8),
            248 << 10
        );
        assert_eq!(
            compressed_chunk_bytes(64 << 10, Compression::Bf16),
            128 << 10
        );
        assert_eq!(
            compressed_chunk_bytes(64 << 10, Compression::Fp16),
            128 << 10
        );
        for z in Compression::ALL {
            let f32_bytes = compressed_chunk_bytes(64 << 10, z);
            assert!(z.encoded_len(f32_bytes / 4) <= 64 << 10, "{z}");
        }
        let h = JobHello {
            job: [7; 16],
            rank: 0,
            world: 3,
            stream: 0,
            streams: 1,
            chunk_bytes: 64,
            window: 4,
        };
        assert_eq!(h.budget(), 3 * 4 * 1024 * 4);
        let big = JobHello {
            chunk_bytes: 1 << 20,
            ..h
        };
        // Small worlds: three times every peer's chunk plus an int8 accumulator of 3,971
        // blocks (the most whose encoding fits 1 MiB) per window slot.
        assert_eq!(big.budget(), 4 * 3 * (3 * (1 << 20) + 3971 * 1024));
        // Large worlds: four of every peer's chunks per slot, as for exact chunks.
        let wide = JobHello { world: 16, ..big };
        assert_eq!(wide.budget(), 4 * 4 * 16 * (1 << 20));
    }
}

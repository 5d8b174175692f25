//! Receipts: what a relay did, signed. While it moves the bytes of a reduction the relay keeps a
//! blake3 digest of every input chunk it received (rank, byte offset, length) and of every
//! result chunk it sent to each rank; a job member may ask for the entries of one op that cover
//! some byte positions, and gets them with one signature over the whole answer
//! ([`Receipt::message`]). A verifier that holds such a receipt and the chunk bytes can
//! recompute the rank-ordered reduction from inputs the relay signed for and compare it with the
//! results the relay signed for: a relay is punished only on its own signature.
//!
//! Bounded: per job the entries of the last [`MAX_OPS`] ops and at most [`MAX_ENTRIES`] entries;
//! they end with the job.

use crate::error::{Error, Result};
use crate::wire::{BodyReader, BodyWriter};
use std::collections::BTreeMap;

/// Ops per job whose entries are kept.
pub const MAX_OPS: usize = 64;
/// Entries per job kept at most (oldest ops dropped first).
pub const MAX_ENTRIES: usize = 1 << 14;
/// Jobs whose ledgers a relay keeps at most (the least recently used is dropped first).
pub const MAX_LEDGERS: usize = 64;
/// Most entries one signed answer carries (it must fit one control frame).
pub const MAX_ANSWER_ENTRIES: usize = 1024;
/// Byte positions one receipt request may name.
pub const MAX_POSITIONS: usize = 256;
/// Hello body prefix of a receipt request: then job id (16), seq (u64), positions (u32 count,
/// u64 each), all little-endian.
pub const RECEIPT_REQUEST: &[u8] = b"mapreduce receipt request v1";

/// What an entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// An input chunk received from `rank`.
    Input = 0,
    /// A result chunk sent to `rank`.
    Result = 1,
}

/// One chunk the relay received or sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub rank: u32,
    /// Byte offset in the op's buffer.
    pub offset: u64,
    /// Bytes.
    pub len: u32,
    pub digest: [u8; 32],
}

impl Entry {
    fn covers(&self, pos: u64) -> bool {
        (self.offset..self.offset + u64::from(self.len)).contains(&pos)
    }
}

/// A relay's signed account of part of one op.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub job: [u8; 16],
    pub seq: u64,
    pub entries: Vec<Entry>,
}

impl Receipt {
    /// The bytes the relay signs.
    pub fn message(&self) -> Vec<u8> {
        let mut w = BodyWriter::default()
            .bytes(b"mapreduce relay receipt v1")
            .bytes(&self.job)
            .u64(self.seq)
            .u32(self.entries.len() as u32);
        for e in &self.entries {
            w = w
                .u32(e.kind as u32)
                .u32(e.rank)
                .u64(e.offset)
                .u32(e.len)
                .bytes(&e.digest);
        }
        w.finish()
    }

    pub fn decode(msg: &[u8]) -> Result<Receipt> {
        let mut r = BodyReader::new(msg, "relay receipt");
        if r.bytes()? != b"mapreduce relay receipt v1" {
            return Err(Error::remote("not a relay receipt"));
        }
        let job = r
            .bytes()?
            .try_into()
            .map_err(|_| Error::remote("receipt: job id is not 16 bytes"))?;
        let seq = r.u64()?;
        let n = r.u32()? as usize;
        if n > MAX_ENTRIES {
            return Err(Error::remote(format!("receipt of {n} entries")));
        }
        let mut entries = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let kind = match r.u32()? {
                0 => Kind::Input,
                1 => Kind::Result,
                k => return Err(Error::remote(format!("receipt: entry kind {k}"))),
            };
            entries.push(Entry {
                kind,
                rank: r.u32()?,
                offset: r.u64()?,
                len: r.u32()?,
                digest: r
                    .bytes()?
                    .try_into()
                    .map_err(|_| Error::remote("receipt: digest is not 32 bytes"))?,
            });
        }
        Ok(Receipt { job, seq, entries })
    }
}

/// Encode a receipt request body.
pub fn request(job: &[u8; 16], seq: u64, positions: &[u64]) -> Vec<u8> {
    let mut w = BodyWriter(RECEIPT_REQUEST.to_vec())
        .bytes(job)
        .u64(seq)
        .u32(positions.len() as u32);
    for &p in positions {
        w = w.u64(p);
    }
    w.finish()
}

/// A parsed receipt request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiptRequest {
    pub job: [u8; 16],
    pub seq: u64,
    /// Byte positions in the op's buffer.
    pub positions: Vec<u64>,
}

/// Parse a receipt request body. `None`: not a receipt request.
pub fn parse_request(body: &[u8]) -> Option<Result<ReceiptRequest>> {
    let rest = body.strip_prefix(RECEIPT_REQUEST)?;
    let parse = || -> Result<ReceiptRequest> {
        let mut r = BodyReader::new(rest, "receipt request");
        let job = r
            .bytes()?
            .try_into()
            .map_err(|_| Error::remote("receipt request: job id is not 16 bytes"))?;
        let seq = r.u64()?;
        let n = r.u32()? as usize;
        if n > MAX_POSITIONS {
            return Err(Error::invalid(format!(
                "receipt request names {n} positions (at most {MAX_POSITIONS})"
            )));
        }
        let positions = (0..n).map(|_| r.u64()).collect::<Result<_>>()?;
        Ok(ReceiptRequest {
            job,
            seq,
            positions,
        })
    };
    Some(parse())
}

/// The entries one job's ops left on the relay.
#[derive(Default)]
pub struct Ledger {
    ops: BTreeMap<u64, Vec<Entry>>,
    entries: usize,
}

impl Ledger {
    /// Record that the relay received (`Input`) or sent (`Result`) `bytes` at `offset` of op
    /// `seq`, from or to `rank`.
    pub fn note(&mut self, seq: u64, kind: Kind, rank: usize, offset: u64, bytes: &[u8]) {
        self.note_digest(
            seq,
            kind,
            rank,
            offset,
            bytes.len(),
            *blake3::hash(bytes).as_bytes(),
        );
    }

    /// As [`Ledger::note`], with the digest already computed.
    pub fn note_digest(
        &mut self,
        seq: u64,
        kind: Kind,
        rank: usize,
        offset: u64,
        len: usize,
        digest: [u8; 32],
    ) {
        self.ops.entry(seq).or_default().push(Entry {
            kind,
            rank: rank as u32,
            offset,
            len: len as u32,
            digest,
        });
        self.entries += 1;
        while self.ops.len() > MAX_OPS || self.entries > MAX_ENTRIES {
            let Some((_, old)) = self.ops.pop_first() else {
                break;
            };
            self.entries -= old.len();
        }
    }

    /// The entries of op `seq` covering any of `positions` (bytes).
    pub fn receipt(&self, job: [u8; 16], seq: u64, positions: &[u64]) -> Receipt {
        let entries = self
            .ops
            .get(&seq)
            .map(|v| {
                v.iter()
                    .filter(|e| positions.iter().any(|&p| e.covers(p)))
                    .take(MAX_ANSWER_ENTRIES)
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        Receipt { job, seq, entries }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_cover_positions_round_trip_and_stay_bounded() {
        let mut l = Ledger::default();
        l.note(1, Kind::Input, 0, 0, &[1; 100]);
        l.note(1, Kind::Input, 1, 0, &[2; 100]);
        l.note(1, Kind::Input, 0, 100, &[3; 50]);
        l.note(1, Kind::Result, 0, 0, &[3; 100]);
        let r = l.receipt([7; 16], 1, &[99]);
        assert_eq!(r.entries.len(), 3);
        assert!(r.entries.iter().all(|e| e.offset == 0));
        assert_eq!(Receipt::decode(&r.message()).unwrap(), r);
        assert!(l.receipt([7; 16], 2, &[0]).entries.is_empty());
        for seq in 0..MAX_OPS as u64 + 10 {
            l.note(seq + 10, Kind::Input, 0, 0, &[0; 4]);
        }
        assert!(l.ops.len() <= MAX_OPS);
        let body = request(&[7; 16], 5, &[1, 2, 3]);
        let r = parse_request(&body).unwrap().unwrap();
        assert_eq!((r.job, r.seq, r.positions), ([7; 16], 5, vec![1, 2, 3]));
        assert!(parse_request(b"other").is_none());
    }
}

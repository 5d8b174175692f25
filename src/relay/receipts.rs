//! Receipts: what a relay did, signed. While it moves the bytes of a reduction the relay keeps a
//! blake3 digest of every input chunk it received (rank, byte offset, length) and of every
//! result chunk it sent to each rank, and how it reduced the op ([`Reduction`]: the element
//! type, reduction and wire format its data frames carried, and how many ranks it folded); a job
//! member may ask for the entries of one op that cover some byte positions, and gets them with
//! the op's reduction under one signature over the whole answer ([`Receipt::message`]). A
//! verifier that holds such a receipt and the chunk bytes can recompute the rank-ordered
//! reduction, as the relay says it reduced the op, from inputs the relay signed for and compare
//! it with the results the relay signed for: a relay is punished only on its own signature, and
//! never on how the job describes its op.
//!
//! Bounded: per job the entries of the last [`MAX_OPS`] ops and at most [`MAX_ENTRIES`] entries;
//! they end with the job.

use crate::compress::Compression;
use crate::error::{Error, Result};
use crate::types::{DType, ReduceOp};
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
/// What a signed receipt starts with. v2 added the op's [`Reduction`]; a v1 receipt is refused
/// by name, never read as a v2 one.
pub const RECEIPT_FORMAT: &[u8] = b"mapreduce relay receipt v2";

/// How a relay reduced one op: what every data frame of the op said (the header's `dtype`, the
/// reduction in the low nibble of `redop` and the wire format in its high nibble) and how many
/// ranks' contributions it folded per chunk (the job's world).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reduction {
    pub dtype: DType,
    pub op: ReduceOp,
    pub wire: Compression,
    pub world: u32,
}

impl std::fmt::Display for Reduction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} of {} ranks, wire format {}",
            self.dtype, self.op, self.world, self.wire
        )
    }
}

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
    /// An entry of `bytes` at `offset`, digested.
    pub fn of(kind: Kind, rank: usize, offset: u64, bytes: &[u8]) -> Entry {
        Entry::digested(
            kind,
            rank,
            offset,
            bytes.len(),
            *blake3::hash(bytes).as_bytes(),
        )
    }

    /// An entry of `len` bytes at `offset` whose digest is already computed.
    pub fn digested(kind: Kind, rank: usize, offset: u64, len: usize, digest: [u8; 32]) -> Entry {
        Entry {
            kind,
            rank: rank as u32,
            offset,
            len: len as u32,
            digest,
        }
    }

    fn covers(&self, pos: u64) -> bool {
        (self.offset..self.offset.saturating_add(u64::from(self.len))).contains(&pos)
    }
}

/// A relay's signed account of part of one op.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub job: [u8; 16],
    pub seq: u64,
    /// How the relay reduced the op; `None` when it holds no entries of the op (it never saw
    /// the op, forgot it, or its frames described it in different ways and it failed).
    pub reduction: Option<Reduction>,
    pub entries: Vec<Entry>,
}

impl Receipt {
    /// The bytes the relay signs: [`RECEIPT_FORMAT`], job, seq, the reduction (u32 1, then
    /// dtype, op, wire format and world as u32; or u32 0 for none), the entries.
    pub fn message(&self) -> Vec<u8> {
        let mut w = BodyWriter::default()
            .bytes(RECEIPT_FORMAT)
            .bytes(&self.job)
            .u64(self.seq);
        w = match &self.reduction {
            Some(r) => w
                .u32(1)
                .u32(r.dtype as u32)
                .u32(r.op as u32)
                .u32(r.wire as u32)
                .u32(r.world),
            None => w.u32(0),
        };
        w = w.u32(self.entries.len() as u32);
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

    /// Parse a signed receipt. Every field is checked: a known format, element type, reduction
    /// and wire format, a world of 1..=[`crate::relay::MAX_WORLD`] ranks with every entry's
    /// rank inside it, entries only with a reduction, and no bytes after the last entry.
    pub fn decode(msg: &[u8]) -> Result<Receipt> {
        let mut r = BodyReader::new(msg, "relay receipt");
        let format = r.bytes()?;
        if format != RECEIPT_FORMAT {
            return Err(Error::remote(
                if format.starts_with(b"mapreduce relay receipt") {
                    format!(
                        "a relay receipt in format \"{}\" (this build reads \"{}\")",
                        String::from_utf8_lossy(&format[..format.len().min(40)]),
                        String::from_utf8_lossy(RECEIPT_FORMAT)
                    )
                } else {
                    "not a relay receipt".to_string()
                },
            ));
        }
        let job = r
            .bytes()?
            .try_into()
            .map_err(|_| Error::remote("receipt: job id is not 16 bytes"))?;
        let seq = r.u64()?;
        let reduction = match r.u32()? {
            0 => None,
            1 => {
                let dtype = DType::from_raw(r.u32()?)
                    .map_err(|e| Error::remote(format!("receipt: {}", e.message)))?;
                let op = ReduceOp::from_raw(r.u32()?)
                    .map_err(|e| Error::remote(format!("receipt: {}", e.message)))?;
                let z = r.u32()?;
                let wire = u8::try_from(z)
                    .ok()
                    .and_then(Compression::from_u8)
                    .ok_or_else(|| Error::remote(format!("receipt: wire format {z}")))?;
                let world = r.u32()?;
                if world == 0 || world as usize > crate::relay::MAX_WORLD {
                    return Err(Error::remote(format!("receipt: world of {world} ranks")));
                }
                Some(Reduction {
                    dtype,
                    op,
                    wire,
                    world,
                })
            }
            t => return Err(Error::remote(format!("receipt: reduction tag {t}"))),
        };
        let n = r.u32()? as usize;
        if n > MAX_ENTRIES {
            return Err(Error::remote(format!("receipt of {n} entries")));
        }
        let world = match (&reduction, n) {
            (Some(red), _) => red.world,
            (None, 0) => 0,
            (None, n) => {
                return Err(Error::remote(format!(
                    "receipt: {n} entries of an op without a reduction"
                )))
            }
        };
        let mut entries = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let kind = match r.u32()? {
                0 => Kind::Input,
                1 => Kind::Result,
                k => return Err(Error::remote(format!("receipt: entry kind {k}"))),
            };
            let rank = r.u32()?;
            if rank >= world {
                return Err(Error::remote(format!(
                    "receipt: an entry of rank {rank} in an op of {world} ranks"
                )));
            }
            entries.push(Entry {
                kind,
                rank,
                offset: r.u64()?,
                len: r.u32()?,
                digest: r
                    .bytes()?
                    .try_into()
                    .map_err(|_| Error::remote("receipt: digest is not 32 bytes"))?,
            });
        }
        if r.remaining() != 0 {
            return Err(Error::remote(format!(
                "receipt: {} bytes after its last entry",
                r.remaining()
            )));
        }
        Ok(Receipt {
            job,
            seq,
            reduction,
            entries,
        })
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

/// What one op left on the relay.
#[derive(Default)]
struct OpLedger {
    /// How the relay reduced the op; `None` once its frames described it in different ways
    /// (the op failed at the relay, and its entries were dropped).
    reduction: Option<Reduction>,
    /// (kind, rank, byte offset) -> (bytes, digest): one entry per chunk, the first recorded.
    entries: BTreeMap<(Kind, u32, u64), (u32, [u8; 32])>,
}

/// The entries one job's ops left on the relay.
#[derive(Default)]
pub struct Ledger {
    ops: BTreeMap<u64, OpLedger>,
    entries: usize,
    /// Ops below this seq were forgotten and are not recorded again.
    floor: u64,
}

impl Ledger {
    /// Record `entry` of op `seq`, which the relay reduced as `reduction`.
    ///
    /// What the relay signs for one op never contradicts itself, whatever the ranks send:
    /// * the first entry of an op sets its reduction; an entry that says otherwise (frames of
    ///   one op describing it in different ways, which fails the op) drops the op's entries;
    /// * a chunk keeps its first entry (a rank sending a chunk again gets nothing signed);
    /// * an op once forgotten (the oldest go first when the job holds [`MAX_OPS`] ops or
    ///   [`MAX_ENTRIES`] entries) is not recorded again, and an op that alone holds
    ///   [`MAX_ENTRIES`] entries keeps its first ones.
    pub fn note(&mut self, seq: u64, reduction: Reduction, entry: Entry) {
        if seq < self.floor {
            return;
        }
        let op = self.ops.entry(seq).or_insert_with(|| OpLedger {
            reduction: Some(reduction),
            entries: BTreeMap::new(),
        });
        if op.reduction != Some(reduction) {
            if let Some(was) = op.reduction {
                log::debug!(
                    "op seq {seq}: frames described as {was} and as {reduction}: no receipts for it"
                );
            }
            self.entries -= op.entries.len();
            op.entries = BTreeMap::new();
            op.reduction = None;
            return;
        }
        let key = (entry.kind, entry.rank, entry.offset);
        if op.entries.contains_key(&key) {
            return;
        }
        loop {
            let over_ops = self.ops.len() > MAX_OPS;
            if !over_ops && self.entries < MAX_ENTRIES {
                break;
            }
            let oldest = *self.ops.keys().next().expect("an op");
            if oldest == seq && !over_ops {
                return;
            }
            let old = self.ops.remove(&oldest).expect("the oldest op");
            self.entries -= old.entries.len();
            self.floor = self.floor.max(oldest + 1);
            if oldest == seq {
                return;
            }
        }
        let op = self.ops.get_mut(&seq).expect("this op");
        op.entries.insert(key, (entry.len, entry.digest));
        self.entries += 1;
    }

    /// Op `seq` failed at the relay (a frame its sums refused: another count, a chunk that
    /// disagrees with the one in progress, ...), which drops whatever the sums held of it while
    /// later frames may start the op's chunks afresh: the relay signs nothing for it from now
    /// on, so its receipts never pair inputs it dropped with results of inputs it took later.
    pub fn fail(&mut self, seq: u64) {
        if seq < self.floor {
            return;
        }
        if let Some(op) = self.ops.get_mut(&seq) {
            self.entries -= op.entries.len();
            op.entries = BTreeMap::new();
            op.reduction = None;
        }
    }

    /// The entries of op `seq` covering any of `positions` (bytes), with its reduction.
    pub fn receipt(&self, job: [u8; 16], seq: u64, positions: &[u64]) -> Receipt {
        let Some(op) = self.ops.get(&seq).filter(|op| op.reduction.is_some()) else {
            return Receipt {
                job,
                seq,
                reduction: None,
                entries: Vec::new(),
            };
        };
        let entries = op
            .entries
            .iter()
            .map(|(&(kind, rank, offset), &(len, digest))| Entry {
                kind,
                rank,
                offset,
                len,
                digest,
            })
            .filter(|e| positions.iter().any(|&p| e.covers(p)))
            .take(MAX_ANSWER_ENTRIES)
            .collect();
        Receipt {
            job,
            seq,
            reduction: op.reduction,
            entries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUM: Reduction = Reduction {
        dtype: DType::F32,
        op: ReduceOp::Sum,
        wire: Compression::None,
        world: 2,
    };

    fn note(l: &mut Ledger, seq: u64, kind: Kind, rank: usize, offset: u64, bytes: &[u8]) {
        l.note(seq, SUM, Entry::of(kind, rank, offset, bytes));
    }

    #[test]
    fn receipts_cover_positions_round_trip_and_stay_bounded() {
        let mut l = Ledger::default();
        note(&mut l, 1, Kind::Input, 0, 0, &[1; 100]);
        note(&mut l, 1, Kind::Input, 1, 0, &[2; 100]);
        note(&mut l, 1, Kind::Input, 0, 100, &[3; 50]);
        note(&mut l, 1, Kind::Result, 0, 0, &[3; 100]);
        let r = l.receipt([7; 16], 1, &[99]);
        assert_eq!(r.entries.len(), 3);
        assert_eq!(r.reduction, Some(SUM));
        assert!(r.entries.iter().all(|e| e.offset == 0));
        assert_eq!(Receipt::decode(&r.message()).unwrap(), r);
        let none = l.receipt([7; 16], 2, &[0]);
        assert!(none.entries.is_empty() && none.reduction.is_none());
        assert_eq!(Receipt::decode(&none.message()).unwrap(), none);
        for seq in 0..MAX_OPS as u64 + 10 {
            note(&mut l, seq + 10, Kind::Input, 0, 0, &[0; 4]);
        }
        assert!(l.ops.len() <= MAX_OPS);
        let body = request(&[7; 16], 5, &[1, 2, 3]);
        let r = parse_request(&body).unwrap().unwrap();
        assert_eq!((r.job, r.seq, r.positions), ([7; 16], 5, vec![1, 2, 3]));
        assert!(parse_request(b"other").is_none());
    }

    /// Each op's receipt signs the reduction the relay used for it; frames of one op that
    /// describe it in different ways leave no receipt of it.
    #[test]
    fn receipts_sign_each_ops_reduction_and_mixed_ops_sign_nothing() {
        let int8_max = Reduction {
            op: ReduceOp::Max,
            wire: Compression::Int8,
            ..SUM
        };
        let mut l = Ledger::default();
        note(&mut l, 1, Kind::Input, 0, 0, &[1; 8]);
        l.note(2, int8_max, Entry::of(Kind::Input, 0, 0, &[1; 8]));
        l.note(2, int8_max, Entry::of(Kind::Input, 1, 0, &[2; 8]));
        assert_eq!(l.receipt([7; 16], 1, &[0]).reduction, Some(SUM));
        let r = l.receipt([7; 16], 2, &[0]);
        assert_eq!((r.reduction, r.entries.len()), (Some(int8_max), 2));
        assert_eq!(Receipt::decode(&r.message()).unwrap(), r);
        // Rank 1 sends a frame of op 1 saying max: the op fails, and its entries go.
        l.note(1, int8_max, Entry::of(Kind::Input, 1, 0, &[2; 8]));
        note(&mut l, 1, Kind::Result, 0, 0, &[3; 8]);
        let r = l.receipt([7; 16], 1, &[0]);
        assert!(r.reduction.is_none() && r.entries.is_empty(), "{r:?}");
        assert_eq!(l.entries, 2);
    }

    /// A rank may send a chunk again once its sum is done (the relay then starts a new sum of
    /// it that never completes): the relay signs only the first bytes it received there, or
    /// the validator would read two signed digests for one chunk as the relay's equivocation.
    #[test]
    fn a_chunk_received_again_is_signed_once() {
        let mut l = Ledger::default();
        note(&mut l, 1, Kind::Input, 0, 0, &[1; 8]);
        note(&mut l, 1, Kind::Input, 1, 0, &[2; 8]);
        note(&mut l, 1, Kind::Result, 0, 0, &[3; 8]);
        note(&mut l, 1, Kind::Input, 0, 0, &[9; 8]);
        let r = l.receipt([7; 16], 1, &[0]);
        let mine: Vec<&Entry> = r
            .entries
            .iter()
            .filter(|e| (e.kind, e.rank) == (Kind::Input, 0))
            .collect();
        assert_eq!(mine.len(), 1, "{r:?}");
        assert_eq!(mine[0].digest, *blake3::hash(&[1; 8]).as_bytes());
        assert_eq!(l.entries, 3);
    }

    /// An op whose frames the relay's sums refused (another count, a chunk that disagrees
    /// with the one in progress) signs nothing: the sums dropped the inputs recorded so far and
    /// may sum chunks sent afterwards, so a receipt pairing the first inputs with the later
    /// results would convict an honest relay.
    #[test]
    fn an_op_the_sums_refused_signs_nothing() {
        let mut l = Ledger::default();
        note(&mut l, 5, Kind::Input, 0, 0, &[1; 8]);
        note(&mut l, 5, Kind::Input, 0, 8, &[4; 8]);
        l.fail(5);
        // Rank 0 sends chunk 0 anew, rank 1 its own; the relay sums and sends the result.
        note(&mut l, 5, Kind::Input, 0, 0, &[9; 8]);
        note(&mut l, 5, Kind::Input, 1, 0, &[2; 8]);
        note(&mut l, 5, Kind::Result, 0, 0, &[11; 8]);
        let r = l.receipt([7; 16], 5, &[0]);
        assert!(r.reduction.is_none() && r.entries.is_empty(), "{r:?}");
        assert_eq!(l.entries, 0);
        // Other ops are untouched, and failing an op never seen records nothing.
        note(&mut l, 6, Kind::Input, 0, 0, &[1; 8]);
        l.fail(7);
        assert_eq!(l.receipt([7; 16], 6, &[0]).entries.len(), 1);
        assert_eq!(l.ops.len(), 2);
    }

    /// An op the ledger forgot is never recorded again: a receipt signed before it was
    /// forgotten and one signed after could otherwise hold different digests for one chunk.
    #[test]
    fn a_forgotten_op_is_not_recorded_again() {
        // Op 0 fills the ledger; op 1 pushes it out.
        let mut l = Ledger::default();
        for i in 0..MAX_ENTRIES as u64 {
            note(&mut l, 0, Kind::Input, 0, i * 8, &[1; 8]);
        }
        assert_eq!(l.receipt([7; 16], 0, &[0]).entries.len(), 1);
        note(&mut l, 1, Kind::Input, 0, 0, &[0; 8]);
        assert!(l.receipt([7; 16], 0, &[0]).entries.is_empty());
        note(&mut l, 0, Kind::Input, 0, 0, &[2; 8]);
        assert!(l.receipt([7; 16], 0, &[0]).entries.is_empty());
        assert_eq!(l.receipt([7; 16], 1, &[0]).entries.len(), 1);
        // The same when the number of ops pushes it out.
        let mut l = Ledger::default();
        note(&mut l, 0, Kind::Input, 0, 0, &[1; 8]);
        for seq in 1..=MAX_OPS as u64 {
            note(&mut l, seq, Kind::Input, 0, 0, &[0; 8]);
        }
        note(&mut l, 0, Kind::Input, 0, 0, &[2; 8]);
        assert!(l.receipt([7; 16], 0, &[0]).entries.is_empty());
        assert_eq!(l.ops.len(), MAX_OPS);
        // One op of more chunks than the ledger holds keeps its first ones, and the ledger
        // stays bounded.
        let mut l = Ledger::default();
        for i in 0..MAX_ENTRIES as u64 + 10 {
            note(&mut l, 5, Kind::Input, 0, i * 8, &[1; 8]);
        }
        assert_eq!(l.entries, MAX_ENTRIES);
        assert_eq!(l.receipt([7; 16], 5, &[0]).entries.len(), 1);
        assert!(l
            .receipt([7; 16], 5, &[MAX_ENTRIES as u64 * 8 + 8])
            .entries
            .is_empty());
    }

    /// A receipt is read field by field, trusting none: truncations, unknown values, ranks
    /// outside the signed world, entries without a reduction, trailing bytes and the previous
    /// format are all refused.
    #[test]
    fn decoding_refuses_malformed_and_old_receipts() {
        let r = Receipt {
            job: [3; 16],
            seq: 9,
            reduction: Some(SUM),
            entries: vec![Entry::of(Kind::Input, 1, 64, &[5; 16])],
        };
        let msg = r.message();
        assert_eq!(Receipt::decode(&msg).unwrap(), r);
        for n in 0..msg.len() {
            assert!(Receipt::decode(&msg[..n]).is_err(), "{n}-byte prefix");
        }
        let mut long = msg.clone();
        long.push(0);
        assert!(Receipt::decode(&long).is_err());
        let with = |f: &dyn Fn(&mut Receipt)| {
            let mut r = r.clone();
            f(&mut r);
            r.message()
        };
        // The reduction's fields follow the format (4 + 26), job (4 + 16), seq (8), tag (4).
        let at = 4 + RECEIPT_FORMAT.len() + 4 + 16 + 8 + 4;
        for (field, bad) in [
            (0, 8u32),
            (1, 5),
            (2, 4),
            (2, 256 + 1),
            (3, 0),
            (3, 1 << 20),
        ] {
            let mut m = msg.clone();
            m[at + 4 * field..at + 4 * field + 4].copy_from_slice(&bad.to_le_bytes());
            let e = Receipt::decode(&m).unwrap_err();
            assert!(e.message.starts_with("receipt"), "{field} = {bad}: {e}");
        }
        let mut m = msg.clone();
        m[at - 4..at].copy_from_slice(&2u32.to_le_bytes());
        assert!(Receipt::decode(&m).is_err(), "reduction tag 2");
        let outside = with(&|r| r.entries[0].rank = 2);
        assert!(Receipt::decode(&outside)
            .unwrap_err()
            .message
            .contains("rank 2"));
        let unreduced = with(&|r| r.reduction = None);
        assert!(Receipt::decode(&unreduced)
            .unwrap_err()
            .message
            .contains("without a reduction"));
        // A receipt of the format before reductions were signed is named, not misread.
        let mut v1 = BodyWriter::default()
            .bytes(b"mapreduce relay receipt v1")
            .finish();
        v1.extend_from_slice(&msg[4 + RECEIPT_FORMAT.len()..]);
        let e = Receipt::decode(&v1).unwrap_err();
        assert!(e.message.contains("receipt v1"), "{e}");
    }
}

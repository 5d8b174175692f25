//! Verification by sampling (DESIGN §7), shared by the validator and by peers with
//! `MR_VERIFY=1`.
//!
//! Sample positions and the choice of reported ops come from a per-job secret that only the
//! peers and the validator hold (relays never see it), so a relay cannot tell which elements
//! or ops will be checked. Each peer records its inputs at the sample positions before the op,
//! and its results plus a blake3 digest of every relay's result segment after it. From the
//! records of all peers a verifier recomputes the rank-ordered reduction at each position
//! bit-exactly with the same kernels the relays use ([`crate::reduce`]) and checks that every
//! peer received identical segments. This module does no I/O.
//!
//! Compressed ops ([`Compression`]): a relay's result depends on whole int8 blocks (their
//! extremes set every element's step), so a peer records its inputs over the whole block
//! around each sample position ([`input_span`]); the verifier encodes each rank's block as
//! the peer did, decodes, folds in rank order in f32, encodes the result once
//! ([`crate::compress::reduce_encoded`]) and compares what that decodes to with every rank's
//! result at the position. For bf16 and fp16 the span is the element itself.

use crate::algo::span::byte_range;
use crate::compress::{Compression, INT8_BLOCK};
use crate::reduce;
use crate::types::{DType, ReduceOp};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Sample positions per sampled op unless configured otherwise.
pub const DEFAULT_SAMPLES: usize = 16;

/// One peer's record of one sampled op.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OpRecord {
    pub rank: usize,
    pub seq: u64,
    pub dtype: u32,
    pub op: u32,
    /// Elements in the op.
    pub count: u64,
    /// Number of relays the buffer was cut across.
    pub relays: usize,
    /// Element indices sampled.
    pub positions: Vec<u64>,
    /// This rank's input elements at `positions`, concatenated, hex.
    pub inputs: String,
    /// This rank's result elements at `positions`, concatenated, hex.
    pub results: String,
    /// blake3 of each relay's result segment, hex.
    pub digests: Vec<String>,
    /// Wire format of the op ([`Compression`] as a number; 0, exact, when absent).
    #[serde(default)]
    pub compress: u32,
    /// Segment weights the op cut its buffer by (one per relay, as every rank passed them to
    /// the relay schedule); empty: equal segments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<u64>,
}

/// Elements of the input recorded for sample position `pos` of an op of `count` elements in
/// wire format `z`: the whole int8 block holding it, or the element itself.
pub fn input_span(z: Compression, count: usize, pos: usize) -> Range<usize> {
    match z {
        Compression::Int8 => {
            let start = pos / INT8_BLOCK * INT8_BLOCK;
            start..(start + INT8_BLOCK).min(count)
        }
        _ => pos..pos + 1,
    }
}

/// This rank's input bytes over the spans of `positions` ([`input_span`]), concatenated.
pub fn gather_inputs(
    buf: &[u8],
    elem: usize,
    z: Compression,
    count: usize,
    positions: &[u64],
) -> Vec<u8> {
    let mut out = Vec::new();
    for &p in positions {
        out.extend_from_slice(&buf[byte_range(&input_span(z, count, p as usize), elem)]);
    }
    out
}

/// Bytes of a record's `inputs` (every rank's alike).
pub fn inputs_len(rec: &OpRecord, elem: usize) -> usize {
    let z = u8::try_from(rec.compress)
        .ok()
        .and_then(Compression::from_u8)
        .unwrap_or_default();
    rec.positions
        .iter()
        .map(|&p| input_span(z, rec.count as usize, p as usize).len() * elem)
        .sum()
}

/// A relay found at fault, with the evidence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Index of the relay in the job's relay list.
    pub relay: usize,
    pub evidence: String,
}

fn prf(secret: &[u8; 32], label: &str, seq: u64) -> blake3::OutputReader {
    let mut h = blake3::Hasher::new_keyed(secret);
    h.update(label.as_bytes());
    h.update(&seq.to_le_bytes());
    h.finalize_xof()
}

/// Whether op `seq` is reported to the validator when a `fraction` (0..=1) of ops is.
pub fn is_sampled(secret: &[u8; 32], seq: u64, fraction: f64) -> bool {
    if fraction >= 1.0 {
        return true;
    }
    let mut b = [0u8; 8];
    prf(secret, "mapreduce sampled op", seq).fill(&mut b);
    (u64::from_le_bytes(b) as f64 / u64::MAX as f64) < fraction
}

/// `k` element positions of op `seq` (of `count` elements), sorted, possibly repeated.
pub fn positions(secret: &[u8; 32], seq: u64, count: usize, k: usize) -> Vec<u64> {
    if count == 0 {
        return Vec::new();
    }
    let mut xof = prf(secret, "mapreduce sample positions", seq);
    let mut out: Vec<u64> = (0..k)
        .map(|_| {
            let mut b = [0u8; 8];
            xof.fill(&mut b);
            u64::from_le_bytes(b) % count as u64
        })
        .collect();
    out.sort_unstable();
    out
}

/// The elements of `buf` (elements of `elem` bytes) at `positions`, concatenated.
pub fn gather(buf: &[u8], elem: usize, positions: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(positions.len() * elem);
    for &p in positions {
        let s = p as usize * elem;
        out.extend_from_slice(&buf[s..s + elem]);
    }
    out
}

/// Elements of relay `k`'s segment when `count` elements are cut across `relays` relays by
/// `weights` in wire format `z`: the same cut as the relay schedule
/// ([`crate::algo::relay::route::segment_elems`]).
pub fn segment_elems(
    count: usize,
    z: Compression,
    relays: usize,
    weights: &[u64],
    k: usize,
) -> Range<usize> {
    crate::algo::relay::route::segment_elems(count, z, relays, weights)
        .get(k)
        .cloned()
        .unwrap_or(0..0)
}

/// Byte range of relay `k`'s segment (see [`segment_elems`]) for elements of `elem` bytes.
pub fn segment(
    count: usize,
    elem: usize,
    z: Compression,
    relays: usize,
    weights: &[u64],
    k: usize,
) -> Range<usize> {
    byte_range(&segment_elems(count, z, relays, weights, k), elem)
}

/// Which relay's segment holds element `pos`.
pub fn relay_of(count: usize, z: Compression, relays: usize, weights: &[u64], pos: usize) -> usize {
    crate::algo::relay::route::segment_elems(count, z, relays, weights)
        .iter()
        .position(|s| s.contains(&pos))
        .unwrap_or(0)
}

/// blake3 of each relay's segment of `buf`, hex.
pub fn digests(
    buf: &[u8],
    count: usize,
    elem: usize,
    z: Compression,
    relays: usize,
    weights: &[u64],
) -> Vec<String> {
    crate::algo::relay::route::segment_elems(count, z, relays, weights)
        .iter()
        .map(|s| blake3::hash(&buf[byte_range(s, elem)]).to_hex().to_string())
        .collect()
}

/// A relay's result for sample position `pos` of a compressed op, from every rank's input
/// span around it ([`input_span`], in `dtype`): the element of the rank-ordered reduction of
/// the encoded spans, decoded, in `dtype`. `None` for malformed spans.
pub fn reduce_element_compressed(
    z: Compression,
    dtype: DType,
    op: ReduceOp,
    span: &Range<usize>,
    pos: usize,
    inputs: &[&[u8]],
) -> Option<Vec<u8>> {
    let elem = dtype.size();
    if !matches!(dtype, DType::F32 | DType::F64)
        || inputs.iter().any(|x| x.len() != span.len() * elem)
    {
        return None;
    }
    let wires: Vec<Vec<u8>> = inputs
        .iter()
        .map(|x| {
            let mut w = vec![0u8; z.encoded_len(span.len())];
            z.encode_bytes(dtype, x, &mut w);
            w
        })
        .collect();
    let refs: Vec<&[u8]> = wires.iter().map(Vec::as_slice).collect();
    let sum = crate::compress::reduce_encoded(z, op, &refs)?;
    let mut out = vec![0u8; span.len() * elem];
    z.decode_bytes(dtype, &sum, &mut out);
    let at = (pos - span.start) * elem;
    Some(out[at..at + elem].to_vec())
}

/// The rank-ordered reduction of one element, exactly as a relay computes it: fold
/// `x0 op x1 op …` in the accumulator dtype, divide for AVG, round 16-bit floats once.
pub fn reduce_element(dtype: DType, op: ReduceOp, inputs: &[&[u8]]) -> Vec<u8> {
    let acc_dtype = dtype.accumulator();
    let widened = acc_dtype != dtype;
    let mut acc = if widened {
        let mut a = vec![0u8; 4];
        reduce::widen(dtype, &mut a, inputs[0]);
        a
    } else {
        inputs[0].to_vec()
    };
    for x in &inputs[1..] {
        if widened {
            reduce::reduce_widen(dtype, op, &mut acc, x);
        } else {
            reduce::reduce(dtype, op, &mut acc, x);
        }
    }
    if op == ReduceOp::Avg {
        reduce::divide(acc_dtype, &mut acc, inputs.len());
    }
    if widened {
        let mut out = vec![0u8; 2];
        reduce::narrow(dtype, &mut out, &acc);
        out
    } else {
        acc
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    crate::config::parse_hex("sample", s).ok()
}

/// Check the records of every rank of one op. Returns the relays at fault (empty when the op
/// checks out) or an error when the records themselves are inconsistent (missing ranks,
/// different positions), which says nothing about the relays.
pub fn check(records: &[OpRecord]) -> std::result::Result<Vec<Fault>, String> {
    let world = records.len();
    let first = records.first().ok_or("no records")?;
    let dtype = DType::from_raw(first.dtype).map_err(|e| e.message)?;
    let op = ReduceOp::from_raw(first.op).map_err(|e| e.message)?;
    let elem = dtype.size();
    let k = first.positions.len();
    let relays = first.relays.max(1);
    let z = u8::try_from(first.compress)
        .ok()
        .and_then(Compression::from_u8)
        .filter(|z| z.applies_to(dtype))
        .ok_or_else(|| {
            format!(
                "op seq {}: unknown wire format {}",
                first.seq, first.compress
            )
        })?;
    let in_len = inputs_len(first, elem);
    let mut inputs = Vec::with_capacity(world);
    let mut results = Vec::with_capacity(world);
    for (r, rec) in records.iter().enumerate() {
        if rec.rank != r
            || rec.seq != first.seq
            || rec.count != first.count
            || rec.dtype != first.dtype
            || rec.op != first.op
            || rec.relays != first.relays
            || rec.positions != first.positions
            || rec.compress != first.compress
            || rec.weights != first.weights
            || rec.digests.len() != relays
        {
            return Err(format!(
                "records of op seq {} disagree about the op (rank {r})",
                first.seq
            ));
        }
        let i = unhex(&rec.inputs).filter(|v| v.len() == in_len);
        let o = unhex(&rec.results).filter(|v| v.len() == k * elem);
        match (i, o) {
            (Some(i), Some(o)) => {
                inputs.push(i);
                results.push(o);
            }
            _ => return Err(format!("rank {r}: malformed samples")),
        }
    }
    let mut faults: Vec<Fault> = Vec::new();
    let mut blame = |relay: usize, evidence: String| {
        if !faults.iter().any(|f| f.relay == relay) {
            faults.push(Fault { relay, evidence });
        }
    };
    for relay in 0..relays {
        let d0 = &first.digests[relay];
        if let Some(rec) = records.iter().find(|rec| &rec.digests[relay] != d0) {
            blame(
                relay,
                format!(
                    "op seq {}: ranks 0 and {} received different bytes for relay {relay}'s segment (blake3 {} vs {})",
                    first.seq, rec.rank, d0, rec.digests[relay]
                ),
            );
        }
    }
    let mut in_at = 0;
    for (j, &pos) in first.positions.iter().enumerate() {
        let at = j * elem..(j + 1) * elem;
        let span = input_span(z, first.count as usize, pos as usize);
        let ins = in_at..in_at + span.len() * elem;
        in_at = ins.end;
        let xs: Vec<&[u8]> = inputs.iter().map(|v| &v[ins.clone()]).collect();
        let want = match z {
            Compression::None => reduce_element(dtype, op, &xs),
            z => reduce_element_compressed(z, dtype, op, &span, pos as usize, &xs)
                .ok_or_else(|| format!("op seq {}: malformed {z} samples", first.seq))?,
        };
        for (r, res) in results.iter().enumerate() {
            if res[at.clone()] != want[..] {
                let relay = relay_of(
                    first.count as usize,
                    z,
                    relays,
                    &first.weights,
                    pos as usize,
                );
                blame(
                    relay,
                    format!(
                        "op seq {}: element {pos} ({dtype}{}) on rank {r} is {} but the rank-ordered reduction of the inputs is {}",
                        first.seq,
                        match z {
                            Compression::None => String::new(),
                            z => format!(", {z} on the wire"),
                        },
                        crate::config::to_hex(&res[at.clone()]),
                        crate::config::to_hex(&want)
                    ),
                );
            }
        }
    }
    Ok(faults)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(rank: usize, input: &[f32], result: &[f32], pos: &[u64], relays: usize) -> OpRecord {
        let ib: Vec<u8> = input.iter().flat_map(|x| x.to_le_bytes()).collect();
        let rb: Vec<u8> = result.iter().flat_map(|x| x.to_le_bytes()).collect();
        OpRecord {
            rank,
            seq: 3,
            dtype: DType::F32 as u32,
            op: ReduceOp::Sum as u32,
            count: input.len() as u64,
            relays,
            positions: pos.to_vec(),
            inputs: crate::config::to_hex(&gather(&ib, 4, pos)),
            results: crate::config::to_hex(&gather(&rb, 4, pos)),
            digests: digests(&rb, input.len(), 4, Compression::None, relays, &[]),
            compress: 0,
            weights: Vec::new(),
        }
    }

    #[test]
    fn positions_are_deterministic_and_in_range() {
        let s = [9u8; 32];
        let a = positions(&s, 5, 1000, 20);
        assert_eq!(a, positions(&s, 5, 1000, 20));
        assert_ne!(a, positions(&s, 6, 1000, 20));
        assert!(a.iter().all(|&p| p < 1000));
        assert!(positions(&s, 5, 0, 20).is_empty());
        let picked = (0..1000).filter(|&q| is_sampled(&s, q, 0.25)).count();
        assert!((150..350).contains(&picked), "{picked}");
    }

    #[test]
    fn honest_op_checks_out_and_faults_are_attributed() {
        let a: Vec<f32> = (0..10).map(|i| i as f32 * 0.1).collect();
        let b: Vec<f32> = (0..10).map(|i| 1.0 / (i as f32 + 1.0)).collect();
        let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        let pos: Vec<u64> = (0..10).collect();
        let good = [record(0, &a, &sum, &pos, 2), record(1, &b, &sum, &pos, 2)];
        assert_eq!(check(&good).unwrap(), vec![]);
        // A wrong element in the second relay's half.
        let mut bad = sum.clone();
        bad[7] += 1.0;
        let recs = [record(0, &a, &bad, &pos, 2), record(1, &b, &bad, &pos, 2)];
        let f = check(&recs).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].relay, 1);
        // Different bytes to different peers in the first relay's half.
        let mut other = sum.clone();
        other[1] = 42.0;
        let recs = [record(0, &a, &sum, &[9], 2), record(1, &b, &other, &[9], 2)];
        let f = check(&recs).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].relay, 0);
        assert!(f[0].evidence.contains("different bytes"));
    }

    /// With segment weights (relays measured at different speeds), an element belongs to the
    /// relay whose weighted segment holds it, not to the one an equal cut would give it.
    #[test]
    fn faults_are_attributed_by_the_weighted_segments() {
        let a: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..16).map(|i| 100.0 + i as f32).collect();
        let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        let pos: Vec<u64> = (0..16).collect();
        // Weights 3:1: relay 0 sums 0..12, relay 1 sums 12..16 (an equal cut: 0..8, 8..16).
        let weights = vec![3u64, 1];
        let weighted = |rank: usize, input: &[f32], result: &[f32]| {
            let mut r = record(rank, input, result, &pos, 2);
            let rb: Vec<u8> = result.iter().flat_map(|x| x.to_le_bytes()).collect();
            r.digests = digests(&rb, 16, 4, Compression::None, 2, &weights);
            r.weights = weights.clone();
            r
        };
        assert_eq!(relay_of(16, Compression::None, 2, &weights, 10), 0);
        assert_eq!(relay_of(16, Compression::None, 2, &[], 10), 1);
        assert_eq!(segment(16, 4, Compression::None, 2, &weights, 1), 48..64);
        let mut bad = sum.clone();
        bad[10] += 1.0;
        let recs = [weighted(0, &a, &bad), weighted(1, &b, &bad)];
        let f = check(&recs).unwrap();
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].relay, 0, "{}", f[0].evidence);
        // Ranks that disagree about the weights disagree about the op.
        let mut other = weighted(1, &b, &sum);
        other.weights = vec![1, 1];
        assert!(check(&[weighted(0, &a, &sum), other]).is_err());
        // Weights that do not fit the relays fall back to the equal cut, never a panic.
        assert_eq!(relay_of(16, Compression::None, 2, &[5, 1, 1], 10), 1);
    }

    #[test]
    fn reduce_element_matches_kernels_for_16_bit_avg() {
        let x = half::f16::from_f32(1.5).to_bits().to_le_bytes();
        let y = half::f16::from_f32(2.25).to_bits().to_le_bytes();
        let z = reduce_element(DType::F16, ReduceOp::Avg, &[&x, &y]);
        let v = half::f16::from_bits(u16::from_le_bytes([z[0], z[1]]));
        assert_eq!(v.to_f32(), 1.875);
    }
}

//! Judging a reported op on signed evidence (no I/O). Every rank of a job reports, per relay,
//! the relay's signed receipt (digests of the input chunks it received from each rank and of the
//! result chunks it sent to each rank, see [`crate::relay::receipts`]) and its own chunk bytes.
//! Each receipt also signs how the relay reduced the op (element type, reduction, wire format,
//! ranks folded: [`Reduction`]); the validator recomputes with that, never with how the job's
//! reports describe the op, which every rank of a lying job can misstate alike.
//! From these the validator
//! * convicts a relay only on its own signatures: it signed two different digests for one
//!   chunk or two different reductions for one op, signed that it sent different results for
//!   one chunk to different ranks, or signed inputs whose rank-ordered reduction, as it signed
//!   that it reduced them, differs from the result it signed for;
//! * blames a report that does not check out against the relay's signatures (a receipt the
//!   relay did not sign, chunk bytes that do not hash to what the relay signed for, a
//!   description of the op other than the relay's signed reduction) on the rank that sent it,
//!   never on the relay;
//! * credits a relay when at least one chunk was recomputed and matched and the reports
//!   describe the op as the relay signed it.
//!
//! Chunks of a compressed op are the encoded bytes on the wire: each rank's input chunk is
//! decoded, the chunks are folded in rank order in f32 and the result encoded once
//! ([`crate::compress::reduce_encoded`]), exactly as the relay must have done.

use crate::compress::Compression;
use crate::relay::receipts::{Kind, Receipt, Reduction};
use crate::types::{DType, ReduceOp};
use crate::validator::identity;
use crate::validator::proto::RelayEvidence;
use crate::validator::verify::OpRecord;
use std::collections::{BTreeMap, BTreeSet};

/// What one op's reports show.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Judgement {
    /// Relay positions with at least one chunk recomputed and matched, and no conviction.
    pub verified: Vec<usize>,
    /// (relay position, evidence): the relay's own signatures contradict an honest reduction.
    pub convicted: Vec<(usize, String)>,
    /// (rank, why): that rank's report does not check out against the relays' signatures.
    pub false_reports: Vec<(usize, String)>,
    /// (relay position, why): no usable signed evidence for that relay.
    pub unaccountable: Vec<(usize, String)>,
}

type Key = (Kind, u32, u64);

/// Reduce whole chunks exactly as a relay does: fold in rank order in the accumulator dtype,
/// divide for AVG, round 16-bit floats once.
pub fn reduce_chunk(dtype: DType, op: ReduceOp, inputs: &[&[u8]]) -> Vec<u8> {
    let elem = dtype.size();
    let n = inputs[0].len() / elem;
    let mut out = Vec::with_capacity(inputs[0].len());
    for i in 0..n {
        let xs: Vec<&[u8]> = inputs
            .iter()
            .map(|x| &x[i * elem..(i + 1) * elem])
            .collect();
        out.extend(crate::validator::verify::reduce_element(dtype, op, &xs));
    }
    out
}

fn hex(b: &[u8]) -> String {
    crate::config::to_hex(b)
}

/// Judge one op of `job` from every rank's record and evidence (`reports[r]` is rank r's).
/// `relay_keys[k]` is the public key of the relay at position k of the op.
pub fn judge(
    job: &[u8; 16],
    reports: &[(OpRecord, Vec<RelayEvidence>)],
    relay_keys: &[[u8; 32]],
) -> Judgement {
    let mut j = Judgement::default();
    let Some((first, _)) = reports.first() else {
        return j;
    };
    let world = reports.len();
    let seq = first.seq;
    // How the job describes the op. Each relay is judged on how it signed that it reduced the
    // op, never on this; the description only tells whether the reports are true.
    let describes = |r: &OpRecord| (r.dtype, r.op, r.compress);
    if let Some(rank) = reports
        .iter()
        .position(|(r, _)| describes(r) != describes(first))
    {
        j.false_reports.push((
            rank,
            format!(
                "op seq {seq}: describes the op as (dtype {}, op {}, wire format {}) where rank 0 \
                 says (dtype {}, op {}, wire format {}); no relay is judged",
                reports[rank].0.dtype,
                reports[rank].0.op,
                reports[rank].0.compress,
                first.dtype,
                first.op,
                first.compress
            ),
        ));
        return j;
    }
    let mut misdescribed = false;
    for (k, key) in relay_keys.iter().enumerate() {
        // What the relay signed, merged over every rank's copy.
        let mut signed: BTreeMap<Key, (u32, [u8; 32])> = BTreeMap::new();
        let mut reduction: Option<Reduction> = None;
        let mut receipts = 0;
        let mut conviction: Option<String> = None;
        let mut bytes: BTreeMap<Key, Vec<u8>> = BTreeMap::new();
        for (rank, (_, evidence)) in reports.iter().enumerate() {
            let Some(ev) = evidence.iter().find(|e| e.relay == k) else {
                continue;
            };
            let raw = match crate::config::parse_hex("receipt", &ev.receipt) {
                Ok(r) if r.len() > 96 => r,
                _ => {
                    j.false_reports
                        .push((rank, format!("relay {k}: malformed receipt")));
                    continue;
                }
            };
            let (public, rest) = raw.split_at(32);
            let (sig, msg) = rest.split_at(64);
            if public != key || !identity::verify(key, msg, sig) {
                j.false_reports
                    .push((rank, format!("relay {k}: a receipt the relay did not sign")));
                continue;
            }
            let receipt = match Receipt::decode(msg) {
                Ok(r) if &r.job == job && r.seq == seq => r,
                Ok(_) => {
                    j.false_reports.push((
                        rank,
                        format!(
                            "relay {k}: a receipt of another op (signed by the relay, replayed)"
                        ),
                    ));
                    continue;
                }
                Err(e) => {
                    j.false_reports.push((
                        rank,
                        format!("relay {k}: a receipt this validator cannot read: {e}"),
                    ));
                    continue;
                }
            };
            receipts += 1;
            match (reduction, receipt.reduction) {
                (None, r) => reduction = r,
                (Some(a), Some(b)) if a != b => {
                    conviction.get_or_insert_with(|| {
                        format!(
                            "op seq {seq}: relay signed that it reduced the op as {a} and as {b}"
                        )
                    });
                }
                _ => {}
            }
            for e in &receipt.entries {
                let key = (e.kind, e.rank, e.offset);
                match signed.get(&key) {
                    Some(&(len, d)) if (len, d) != (e.len, e.digest) => {
                        conviction.get_or_insert_with(|| {
                            format!(
                                "op seq {seq}: relay signed two different digests for the {:?} chunk of rank {} at offset {} ({} and {})",
                                e.kind, e.rank, e.offset, hex(&d), hex(&e.digest)
                            )
                        });
                    }
                    _ => {
                        signed.insert(key, (e.len, e.digest));
                    }
                }
            }
            for c in &ev.chunks {
                let kind = if c.kind == 0 {
                    Kind::Input
                } else {
                    Kind::Result
                };
                let key = (kind, rank as u32, c.offset);
                let Ok(b) = crate::config::parse_hex("chunk", &c.bytes) else {
                    j.false_reports.push((rank, "malformed chunk bytes".into()));
                    continue;
                };
                match signed.get(&key) {
                    Some(&(len, d)) if len as usize == b.len() && *blake3::hash(&b).as_bytes() == d => {
                        bytes.insert(key, b);
                    }
                    _ => j.false_reports.push((
                        rank,
                        format!(
                            "relay {k}: its {kind:?} chunk at offset {} does not match what the relay signed for",
                            c.offset
                        ),
                    )),
                }
            }
        }
        if receipts == 0 {
            j.unaccountable
                .push((k, "no rank brought a receipt signed by the relay".into()));
            continue;
        }
        let Some(red) = reduction else {
            // Receipts without a reduction hold no entries: nothing signed to judge.
            j.unaccountable
                .push((k, "the relay's receipts hold no entry of the op".into()));
            continue;
        };
        // Whether the job's reports describe the op as the relay signed that it reduced it.
        let as_reported = describes(first) == (red.dtype as u32, red.op as u32, red.wire as u32)
            && red.world as usize == world;
        let dtype = red.dtype;
        let op = red.op;
        let ranks = red.world;
        // Different results for one chunk to different ranks, by the relay's own account.
        let offsets: BTreeSet<u64> = signed.keys().map(|&(_, _, o)| o).collect();
        for &o in &offsets {
            let results: Vec<(u32, [u8; 32])> = signed
                .range((Kind::Result, 0, o)..=(Kind::Result, u32::MAX, o))
                .filter(|(&(_, _, off), _)| off == o)
                .map(|(&(_, r, _), &(_, d))| (r, d))
                .collect();
            if let Some(w) = results.windows(2).find(|w| w[0].1 != w[1].1) {
                conviction.get_or_insert_with(|| {
                    format!(
                        "op seq {seq}: relay signed that it sent different results for the chunk at offset {o}: to rank {} (blake3 {}) and to rank {} (blake3 {})",
                        w[0].0, hex(&w[0].1), w[1].0, hex(&w[1].1)
                    )
                });
            }
        }
        // Recompute the chunks for which every rank the relay folded brought its input, as
        // the relay signed that it reduced them.
        let mut matched = 0;
        for &o in &offsets {
            let inputs: Option<Vec<&[u8]>> = (0..ranks)
                .map(|r| bytes.get(&(Kind::Input, r, o)).map(Vec::as_slice))
                .collect();
            let Some(inputs) = inputs else { continue };
            let reduced = match red.wire {
                Compression::None => {
                    if inputs
                        .iter()
                        .any(|x| x.len() != inputs[0].len() || x.len() % dtype.size() != 0)
                    {
                        continue;
                    }
                    reduce_chunk(dtype, op, &inputs)
                }
                z => match crate::compress::reduce_encoded(z, op, &inputs) {
                    Some(r) => r,
                    None => continue,
                },
            };
            let sum = *blake3::hash(&reduced).as_bytes();
            let mut any = false;
            for r in 0..ranks {
                if let Some(&(_, d)) = signed.get(&(Kind::Result, r, o)) {
                    any = true;
                    if d != sum {
                        conviction.get_or_insert_with(|| {
                            format!(
                                "op seq {seq}: chunk at offset {o}: reduced as the relay signed that it reduced the op ({red}), the inputs it signed for (ranks 0..{ranks}) reduce to blake3 {}, but it signed that it sent rank {r} blake3 {}",
                                hex(&sum), hex(&d)
                            )
                        });
                    }
                }
            }
            matched += usize::from(any);
        }
        match conviction {
            Some(e) => j.convicted.push((k, e)),
            None if !as_reported => {
                // The relay's own account holds together, and the reports describe another
                // op: they are not true to what the relay did.
                if !misdescribed {
                    misdescribed = true;
                    j.false_reports.push((
                        0,
                        format!(
                            "op seq {seq}: every rank describes the op as (dtype {}, op {}, wire \
                             format {}) of {world} ranks, but relay {k} signed that it reduced it \
                             as {red}",
                            first.dtype, first.op, first.compress
                        ),
                    ));
                }
                j.unaccountable.push((
                    k,
                    format!(
                        "the job's reports do not describe the op as the relay signed it ({red})"
                    ),
                ))
            }
            None if matched > 0 => j.verified.push(k),
            None => j
                .unaccountable
                .push((k, "no chunk with every rank's signed input".into())),
        }
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::receipts::Entry;
    use crate::validator::identity::Identity;
    use crate::validator::proto::ChunkBytes;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Two ranks, one relay, one chunk of 2 f32 at offset 8; the relay signs `results`.
    fn reports(
        relay: &Identity,
        results: [&[u8]; 2],
        claimed: [&[u8]; 2],
    ) -> Vec<(OpRecord, Vec<RelayEvidence>)> {
        let inputs = [f32s(&[1.0, 2.0]), f32s(&[3.0, 4.0])];
        reports_of(relay, &inputs, results, claimed, 0)
    }

    /// As [`reports`], with the ranks' input chunks (as on the wire) and the op's format; the
    /// ranks report, and the relay signs, a float32 sum in wire format `compress`.
    fn reports_of(
        relay: &Identity,
        inputs: &[Vec<u8>; 2],
        results: [&[u8]; 2],
        claimed: [&[u8]; 2],
        compress: u32,
    ) -> Vec<(OpRecord, Vec<RelayEvidence>)> {
        let red = Reduction {
            dtype: DType::F32,
            op: ReduceOp::Sum,
            wire: Compression::from_u8(compress as u8).unwrap(),
            world: 2,
        };
        let mut r = signed_as(relay, red, inputs, results, claimed);
        for (rec, _) in &mut r {
            rec.compress = compress;
        }
        r
    }

    /// The relay's answer to a receipt request (public key, signature, receipt), hex.
    fn signed(relay: &Identity, receipt: &Receipt) -> String {
        let msg = receipt.message();
        let mut raw = relay.public().to_vec();
        raw.extend_from_slice(&relay.sign(&msg));
        raw.extend_from_slice(&msg);
        hex(&raw)
    }

    /// Two ranks' reports of one chunk at offset 8, each describing the op as the relay signed
    /// that it reduced it (`red`).
    fn signed_as(
        relay: &Identity,
        red: Reduction,
        inputs: &[Vec<u8>; 2],
        results: [&[u8]; 2],
        claimed: [&[u8]; 2],
    ) -> Vec<(OpRecord, Vec<RelayEvidence>)> {
        let e = |kind, rank: u32, b: &[u8]| Entry {
            kind,
            rank,
            offset: 8,
            len: b.len() as u32,
            digest: *blake3::hash(b).as_bytes(),
        };
        let receipt = Receipt {
            job: [1; 16],
            seq: 7,
            reduction: Some(red),
            entries: vec![
                e(Kind::Input, 0, &inputs[0]),
                e(Kind::Input, 1, &inputs[1]),
                e(Kind::Result, 0, results[0]),
                e(Kind::Result, 1, results[1]),
            ],
        };
        let raw = signed(relay, &receipt);
        (0..2)
            .map(|r| {
                let rec = OpRecord {
                    rank: r,
                    seq: 7,
                    dtype: red.dtype as u32,
                    op: red.op as u32,
                    count: 8,
                    relays: 1,
                    positions: vec![2],
                    inputs: String::new(),
                    results: String::new(),
                    digests: vec![],
                    compress: red.wire as u32,
                    weights: Vec::new(),
                };
                let chunks = vec![
                    ChunkBytes {
                        kind: 0,
                        offset: 8,
                        bytes: hex(&inputs[r]),
                    },
                    ChunkBytes {
                        kind: 1,
                        offset: 8,
                        bytes: hex(claimed[r]),
                    },
                ];
                let ev = RelayEvidence {
                    relay: 0,
                    receipt: raw.clone(),
                    chunks,
                };
                (rec, vec![ev])
            })
            .collect()
    }

    /// Compressed chunks: the validator decodes the signed inputs, folds them in f32 and
    /// encodes once, as the relay must; the relay's encoded sum checks out, bytes that decode
    /// differently convict it.
    #[test]
    fn compressed_chunks_are_recomputed_in_wire_terms() {
        let relay = Identity::generate();
        let key = [relay.public()];
        for z in [Compression::Bf16, Compression::Int8] {
            let (inputs, sum) = encoded_pair(z);
            let mut wrong = sum.clone();
            wrong[9] ^= 1;
            let r = reports_of(&relay, &inputs, [&sum, &sum], [&sum, &sum], z as u32);
            let j = judge(&[1; 16], &r, &key);
            assert_eq!(j.verified, vec![0], "{z}: {j:?}");
            assert!(
                j.convicted.is_empty() && j.false_reports.is_empty(),
                "{z}: {j:?}"
            );
            let r = reports_of(
                &relay,
                &inputs,
                [&wrong, &wrong],
                [&wrong, &wrong],
                z as u32,
            );
            let j = judge(&[1; 16], &r, &key);
            assert_eq!(j.convicted.len(), 1, "{z}: {j:?}");
            // Rank 0 describing the op as exact float32 data (where the honest chunk would not
            // check out) gets the job's reports blamed, not the relay.
            let mut r = reports_of(&relay, &inputs, [&sum, &sum], [&sum, &sum], z as u32);
            r[0].0.compress = 0;
            let j = judge(&[1; 16], &r, &key);
            assert!(j.convicted.is_empty(), "{z}: {j:?}");
            assert_eq!(j.false_reports.len(), 1, "{z}: {j:?}");
            // A wire format number that does not fit a byte is no format (not 257 -> bf16).
            let mut r = reports_of(&relay, &inputs, [&sum, &sum], [&sum, &sum], z as u32 + 256);
            r[1].0.compress = z as u32 + 256;
            let j = judge(&[1; 16], &r, &key);
            assert!(
                j.convicted.is_empty() && j.verified.is_empty(),
                "{z}: {j:?}"
            );
        }
    }

    /// Two ranks' inputs of 300 elements encoded in `z`, and their sum as a relay computes it.
    fn encoded_pair(z: Compression) -> ([Vec<u8>; 2], Vec<u8>) {
        let enc = |x: Vec<f32>| {
            let mut w = vec![0u8; z.encoded_len(x.len())];
            z.encode(&x, &mut w);
            w
        };
        let inputs = [
            enc((0..300).map(|i| (i % 17) as f32 * 0.3).collect()),
            enc((0..300).map(|i| (i % 5) as f32 - 1.5).collect()),
        ];
        let refs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
        let sum = crate::compress::reduce_encoded(z, ReduceOp::Sum, &refs).unwrap();
        (inputs, sum)
    }

    /// Every rank describes the op alike, but not as the relay reduced it (a sum reported as
    /// a max). The relay signed what it did; its signed inputs reduce to its signed results,
    /// so it is not convicted, and the reports are blamed.
    #[test]
    fn reports_calling_a_sum_a_max_do_not_convict_an_honest_relay() {
        let relay = Identity::generate();
        let key = [relay.public()];
        let sum = f32s(&[4.0, 6.0]);
        let mut r = reports(&relay, [&sum, &sum], [&sum, &sum]);
        for (rec, _) in &mut r {
            rec.op = ReduceOp::Max as u32;
        }
        let j = judge(&[1; 16], &r, &key);
        assert!(j.convicted.is_empty(), "{j:?}");
        assert!(!j.false_reports.is_empty(), "{j:?}");
    }

    /// As above, for an int8 op that every rank reports as exact float32 data.
    #[test]
    fn reports_calling_an_int8_op_exact_do_not_convict_an_honest_relay() {
        let relay = Identity::generate();
        let key = [relay.public()];
        let z = Compression::Int8;
        let (inputs, sum) = encoded_pair(z);
        let mut r = reports_of(&relay, &inputs, [&sum, &sum], [&sum, &sum], z as u32);
        for (rec, _) in &mut r {
            rec.compress = Compression::None as u32;
        }
        let j = judge(&[1; 16], &r, &key);
        assert!(j.convicted.is_empty(), "{j:?}");
        assert!(!j.false_reports.is_empty(), "{j:?}");
    }

    /// A relay that signs another reduction than the one its signed results come from is
    /// convicted on its own signatures, whatever the reports say: here it summed, but signed
    /// that it took the maximum.
    #[test]
    fn a_relay_signing_another_reduction_than_it_ran_is_convicted() {
        let relay = Identity::generate();
        let key = [relay.public()];
        let inputs = [f32s(&[1.0, 2.0]), f32s(&[3.0, 4.0])];
        let sum = f32s(&[4.0, 6.0]);
        let max = Reduction {
            dtype: DType::F32,
            op: ReduceOp::Max,
            wire: Compression::None,
            world: 2,
        };
        // The ranks report the op as the relay signed it.
        let r = signed_as(&relay, max, &inputs, [&sum, &sum], [&sum, &sum]);
        let j = judge(&[1; 16], &r, &key);
        assert_eq!(j.convicted.len(), 1, "{j:?}");
        assert!(j.convicted[0].1.contains("max"), "{j:?}");
        assert!(j.false_reports.is_empty(), "{j:?}");
        // The ranks report the sum they ran: still convicted, and the reports disagree with
        // the relay's signature.
        let mut r = signed_as(&relay, max, &inputs, [&sum, &sum], [&sum, &sum]);
        for (rec, _) in &mut r {
            rec.op = ReduceOp::Sum as u32;
        }
        let j = judge(&[1; 16], &r, &key);
        assert_eq!(j.convicted.len(), 1, "{j:?}");
        assert!(j.verified.is_empty(), "{j:?}");
        // The relay's own signatures explain the difference: the reports are not blamed.
        assert!(j.false_reports.is_empty(), "{j:?}");
        // Honest under its own signature: the maximum it signed for checks out.
        let top = f32s(&[3.0, 4.0]);
        let j = judge(
            &[1; 16],
            &signed_as(&relay, max, &inputs, [&top, &top], [&top, &top]),
            &key,
        );
        assert_eq!(j.verified, vec![0], "{j:?}");
    }

    /// The relay signed two different reductions of one op (to two ranks): convicted.
    #[test]
    fn a_relay_signing_two_reductions_of_one_op_is_convicted() {
        let relay = Identity::generate();
        let key = [relay.public()];
        let inputs = [f32s(&[1.0, 2.0]), f32s(&[3.0, 4.0])];
        let sum = f32s(&[4.0, 6.0]);
        let red = Reduction {
            dtype: DType::F32,
            op: ReduceOp::Sum,
            wire: Compression::None,
            world: 2,
        };
        let mut r = signed_as(&relay, red, &inputs, [&sum, &sum], [&sum, &sum]);
        let mut other = Receipt::decode(
            &crate::config::parse_hex("receipt", &r[1].1[0].receipt).unwrap()[96..],
        )
        .unwrap();
        other.reduction = Some(Reduction {
            op: ReduceOp::Max,
            ..red
        });
        r[1].1[0].receipt = signed(&relay, &other);
        let j = judge(&[1; 16], &r, &key);
        assert_eq!(j.convicted.len(), 1, "{j:?}");
        assert!(j.convicted[0].1.contains("and as"), "{j:?}");
    }

    /// Reports of a world other than the relay signed it folded (a client running more ranks
    /// through the relay than it told the validator) do not convict the relay: the missing
    /// ranks' inputs leave nothing to recompute, and the reports are blamed.
    #[test]
    fn reports_of_another_world_do_not_convict_an_honest_relay() {
        let relay = Identity::generate();
        let key = [relay.public()];
        let inputs = [f32s(&[1.0, 2.0]), f32s(&[3.0, 4.0])];
        // With a third rank's [1, 1], the relay's honest sum.
        let sum = f32s(&[5.0, 7.0]);
        let three = Reduction {
            dtype: DType::F32,
            op: ReduceOp::Sum,
            wire: Compression::None,
            world: 3,
        };
        let j = judge(
            &[1; 16],
            &signed_as(&relay, three, &inputs, [&sum, &sum], [&sum, &sum]),
            &key,
        );
        assert!(j.convicted.is_empty() && j.verified.is_empty(), "{j:?}");
        assert_eq!(j.false_reports.len(), 1, "{j:?}");
    }

    #[test]
    fn honest_ops_verify_wrong_sums_convict_and_false_chunks_blame_the_reporter() {
        let relay = Identity::generate();
        let key = [relay.public()];
        let sum = f32s(&[4.0, 6.0]);
        let wrong = f32s(&[4.0, 7.0]);
        let j = judge(&[1; 16], &reports(&relay, [&sum, &sum], [&sum, &sum]), &key);
        assert_eq!(j.verified, vec![0]);
        assert!(
            j.convicted.is_empty() && j.false_reports.is_empty(),
            "{j:?}"
        );
        // The relay signed a wrong sum for both ranks.
        let j = judge(
            &[1; 16],
            &reports(&relay, [&wrong, &wrong], [&wrong, &wrong]),
            &key,
        );
        assert_eq!(j.convicted.len(), 1, "{j:?}");
        assert!(j.convicted[0].1.contains("reduce to"), "{j:?}");
        // It signed different results for the two ranks.
        let j = judge(
            &[1; 16],
            &reports(&relay, [&sum, &wrong], [&sum, &wrong]),
            &key,
        );
        assert!(j.convicted[0].1.contains("different results"), "{j:?}");
        // Rank 1 claims it got other bytes than the relay signed for: its report is false.
        let j = judge(
            &[1; 16],
            &reports(&relay, [&sum, &sum], [&sum, &wrong]),
            &key,
        );
        assert!(j.convicted.is_empty(), "{j:?}");
        assert_eq!(j.false_reports.len(), 1);
        assert_eq!(j.false_reports[0].0, 1);
        // A receipt signed by someone else proves nothing against the relay.
        let other = [Identity::generate().public()];
        let j = judge(
            &[1; 16],
            &reports(&relay, [&wrong, &wrong], [&wrong, &wrong]),
            &other,
        );
        assert!(
            j.convicted.is_empty() && j.false_reports.len() == 2,
            "{j:?}"
        );
        // A receipt of another job is a replay.
        let j = judge(&[2; 16], &reports(&relay, [&sum, &sum], [&sum, &sum]), &key);
        assert!(j.verified.is_empty() && j.false_reports.len() == 2, "{j:?}");
    }
}

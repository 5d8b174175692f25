//! A peer's part in verification: record inputs at the sample positions before a relay
//! all-reduce is submitted, record results and segment digests after it completes, and hand
//! the record to the validator (in the background) or to the other peers (`MR_VERIFY=1`).
//!
//! For the validator, a sampled op also keeps this rank's bytes around each sample position
//! (one relay chunk either side, inputs before the op, results after it); the reporter thread
//! then asks each relay for its signed receipt of the op at those positions and sends the
//! receipts with the chunks they cover ([`EvidenceTask`]). A receipt that does not match what
//! this rank sent or received, or that signs another reduction of the op than this rank ran
//! (element type, reduction, wire format, ranks), is not reported (it would count against this
//! rank) but logged.
//!
//! A compressed op's relays signed what was on the wire, so its evidence is kept in wire
//! terms: the encoded image of this rank's input around each sample (encoding is
//! deterministic, so it is exactly what this rank sent), at wire positions. The encoded
//! results are not kept (this rank holds only what they decode to), so its evidence carries
//! input chunks only: the validator recomputes the encoded result from every rank's inputs
//! and compares it with the result digests the relay signed.

use crate::compress::Compression;
use crate::error::{Error, Result};
use crate::net::bootstrap::FrameIo;
use crate::relay::receipts::{self, Kind, Receipt, Reduction};
use crate::types::{DType, ReduceOp};
use crate::validator::client::Reporter;
use crate::validator::proto::{Assignment, ChunkBytes, RelayEvidence, ReportMsg};
use crate::validator::verify::{self, OpRecord};
use crate::wire::{FrameHeader, FrameKind, Hello};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes of this rank's buffer kept for evidence: (byte offset, bytes).
type Windows = Vec<(usize, Vec<u8>)>;

/// Copies of `buf` around each sample position: `reach` bytes either side.
fn windows(buf: &[u8], elem: usize, positions: &[u64], reach: usize) -> Windows {
    let mut out: Windows = Vec::new();
    for &p in positions {
        let at = p as usize * elem;
        let (start, end) = (at.saturating_sub(reach), (at + elem + reach).min(buf.len()));
        match out.last_mut() {
            Some((s, w)) if *s + w.len() >= start => {
                let from = *s + w.len();
                if end > from {
                    w.extend_from_slice(&buf[from..end]);
                }
            }
            _ => out.push((start, buf[start..end].to_vec())),
        }
    }
    out
}

/// Where elements `positions` lie in the encoded image of a buffer in format `z`.
fn wire_positions(z: Compression, positions: &[u64]) -> Vec<u64> {
    positions
        .iter()
        .map(|&p| z.encoded_len(p as usize) as u64)
        .collect()
}

/// `len` bytes at `offset`, if one window holds them all.
fn cut(w: &Windows, offset: usize, len: usize) -> Option<&[u8]> {
    w.iter()
        .find(|(s, b)| *s <= offset && offset + len <= *s + b.len())
        .map(|(s, b)| &b[offset - s..offset - s + len])
}

/// What the reporter needs to gather one op's evidence.
pub struct EvidenceTask {
    job: [u8; 16],
    seq: u64,
    rank: usize,
    token: Vec<u8>,
    /// (position in the op's relay list, address).
    relays: Vec<(usize, String)>,
    /// How this rank ran the op: a receipt signing another reduction is not reported.
    reduction: Reduction,
    /// Byte positions sampled.
    positions: Vec<u64>,
    inputs: Windows,
    results: Windows,
}

/// Ask the relay at `addr` for its signed receipt of op `seq` of `job` at byte `positions`,
/// proving the job `token`. Returns the relay's answer (public key, signature, receipt).
pub fn fetch_receipt(
    addr: &str,
    token: &[u8],
    job: &[u8; 16],
    seq: u64,
    positions: &[u64],
) -> Result<Vec<u8>> {
    let what = format!("receipt of op {seq} from relay {addr}");
    let sa = crate::config::resolve(addr)?;
    let mut s = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(5))
        .map_err(|e| Error::io(format!("{what}: connect"), e))?;
    let mut io = FrameIo {
        stream: &mut s,
        deadline: Instant::now() + Duration::from_secs(10),
        what: what.clone(),
    };
    let (_, ns) = io.expect(FrameKind::Challenge)?;
    let ns: [u8; 32] = ns
        .try_into()
        .map_err(|_| Error::remote(format!("{what}: malformed challenge")))?;
    let body = receipts::request(job, seq, positions);
    let hello = Hello::sign(&crate::wire::mac_key(token), &ns, &body).encode();
    io.send(FrameHeader::new(FrameKind::Hello, hello.len()), &hello)?;
    Ok(io.expect(FrameKind::Welcome)?.1)
}

impl EvidenceTask {
    /// Fetch every relay's receipt and pick this rank's chunks it covers.
    pub fn gather(&self) -> Vec<RelayEvidence> {
        let mut out = Vec::new();
        for (k, addr) in &self.relays {
            let raw = match fetch_receipt(addr, &self.token, &self.job, self.seq, &self.positions) {
                Ok(r) if r.len() > 96 => r,
                Ok(_) => continue,
                Err(e) => {
                    log::warn!("rank {}: no receipt from relay {addr}: {e}", self.rank);
                    continue;
                }
            };
            let receipt = match Receipt::decode(&raw[96..]) {
                Ok(r) => r,
                Err(e) => {
                    log::warn!(
                        "rank {}: relay {addr} sent a malformed receipt of op {}: {e}",
                        self.rank,
                        self.seq
                    );
                    continue;
                }
            };
            // The validator judges the relay as it signed that it reduced the op; a receipt
            // saying otherwise than this rank ran it would count against this rank.
            if let Some(r) = receipt.reduction.filter(|r| *r != self.reduction) {
                log::warn!(
                    "rank {}: relay {addr} signed that it reduced op {} as {r}, but this rank ran it as {}; its receipt is not reported",
                    self.rank,
                    self.seq,
                    self.reduction
                );
                continue;
            }
            let mut chunks = Vec::new();
            let mut consistent = true;
            for e in receipt
                .entries
                .iter()
                .filter(|e| e.rank as usize == self.rank)
            {
                let w = if e.kind == Kind::Input {
                    &self.inputs
                } else {
                    &self.results
                };
                let Some(b) = cut(w, e.offset as usize, e.len as usize) else {
                    continue;
                };
                if *blake3::hash(b).as_bytes() != e.digest {
                    consistent = false;
                    log::warn!(
                        "rank {}: relay {addr}'s receipt of op {} does not match the {:?} chunk at offset {} this rank has",
                        self.rank, self.seq, e.kind, e.offset
                    );
                    continue;
                }
                chunks.push(ChunkBytes {
                    kind: e.kind as u32,
                    offset: e.offset,
                    bytes: crate::config::to_hex(b),
                });
            }
            if consistent {
                out.push(RelayEvidence {
                    relay: *k,
                    receipt: crate::config::to_hex(&raw),
                    chunks,
                });
            }
        }
        out
    }
}

/// Debug builds only, for tests of the validator: `MR_TEST_REPORT_OP=n` and
/// `MR_TEST_REPORT_COMPRESS=n` make this process describe every op it reports to the validator
/// with reduction `n` and wire format `n` instead of what it ran, as a job whose ranks all
/// lie alike would. A release build reads neither variable.
fn misreport_for_test(record: &mut OpRecord) {
    if !cfg!(debug_assertions) {
        return;
    }
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    if let Some(op) = var("MR_TEST_REPORT_OP") {
        record.op = op;
    }
    if let Some(z) = var("MR_TEST_REPORT_COMPRESS") {
        record.compress = z;
    }
}

/// Verification set-up of one communicator in a validator-assigned job.
pub struct JobVerify {
    pub secret: [u8; 32],
    pub fraction: f64,
    pub samples: usize,
    /// Relays in use, as indices into the assignment's list.
    pub relay_index: Vec<usize>,
    pub world: usize,
    /// Peers check every relay op among themselves (`MR_VERIFY=1`).
    pub peer_check: bool,
    pub reporter: Option<Reporter>,
    /// Bytes per relay chunk (`Config::relay_chunk_bytes`): how far around a sample the
    /// evidence windows reach.
    pub chunk_bytes: usize,
    job: [u8; 16],
    token: Vec<u8>,
    relay_addrs: Vec<String>,
    /// Evidence windows of sampled ops, by seq, from completion to report.
    kept: Mutex<HashMap<u64, (Windows, Windows)>>,
}

/// Inputs recorded before an op.
pub struct Recorded {
    pub seq: u64,
    pub dtype: DType,
    pub op: ReduceOp,
    pub count: usize,
    /// Wire format of the op.
    pub z: Compression,
    pub positions: Vec<u64>,
    pub inputs: Vec<u8>,
    pub started: Instant,
    /// This rank's input bytes around the samples (ops reported to the validator), in wire
    /// terms for a compressed op.
    pub windows: Windows,
    /// Segment weights the op's relay schedule cut the buffer by (empty: equal).
    pub weights: Vec<u64>,
}

impl JobVerify {
    pub fn new(
        a: &Assignment,
        validator: Option<&str>,
        rank: usize,
        world: usize,
        peer_check: bool,
    ) -> crate::Result<JobVerify> {
        let secret: [u8; 32] = crate::config::parse_hex("verify secret", &a.verify_secret)?
            .try_into()
            .map_err(|_| crate::Error::remote("the validator's verify secret is not 32 bytes"))?;
        Ok(JobVerify {
            secret,
            fraction: a.report_fraction.clamp(0.0, 1.0),
            samples: a.samples.clamp(1, 4096),
            relay_index: Vec::new(),
            world,
            peer_check,
            reporter: validator
                .map(|v| Reporter::start(v.to_string(), a.job.clone(), secret, rank)),
            chunk_bytes: 64 << 10,
            job: crate::config::parse_hex("job id", &a.job)?
                .try_into()
                .map_err(|_| crate::Error::remote("the validator's job id is not 16 bytes"))?,
            token: crate::config::parse_hex("job token", &a.token)?,
            relay_addrs: a.relays.iter().map(|r| r.addr.clone()).collect(),
            kept: Mutex::new(HashMap::new()),
        })
    }

    /// `MR_VERIFY=1` with static relays: every relay op is checked by the peers.
    pub fn for_static_relays(secret: [u8; 32], world: usize) -> JobVerify {
        JobVerify {
            secret,
            fraction: 1.0,
            samples: verify::DEFAULT_SAMPLES,
            relay_index: Vec::new(),
            world,
            peer_check: true,
            reporter: None,
            chunk_bytes: 0,
            job: [0; 16],
            token: Vec::new(),
            relay_addrs: Vec::new(),
            kept: Mutex::new(HashMap::new()),
        }
    }

    /// Whether op `seq` is reported to the validator (with evidence).
    fn reported(&self, seq: u64) -> bool {
        self.reporter.is_some() && verify::is_sampled(&self.secret, seq, self.fraction)
    }

    /// Whether op `seq` is checked at all.
    pub fn wants(&self, seq: u64) -> bool {
        self.peer_check
            || (self.reporter.is_some() && verify::is_sampled(&self.secret, seq, self.fraction))
    }

    /// Record the inputs of op `seq` from `buf` (the caller's buffer before the op).
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        seq: u64,
        buf: &[u8],
        count: usize,
        dtype: DType,
        op: ReduceOp,
        z: Compression,
        weights: &[u64],
    ) -> Recorded {
        let positions = verify::positions(&self.secret, seq, count, self.samples);
        let windows = match (self.reported(seq), z) {
            (false, _) => Vec::new(),
            (true, Compression::None) => windows(buf, dtype.size(), &positions, self.chunk_bytes),
            (true, z) => {
                let mut wire = vec![0u8; z.encoded_len(count)];
                z.encode_bytes(dtype, buf, &mut wire);
                // The most wire bytes a compressed chunk takes.
                let reach =
                    z.encoded_len(crate::relay::compressed_chunk_bytes(self.chunk_bytes, z) / 4);
                windows(&wire, 1, &wire_positions(z, &positions), reach)
            }
        };
        Recorded {
            seq,
            dtype,
            op,
            count,
            z,
            inputs: verify::gather_inputs(buf, dtype.size(), z, count, &positions),
            positions,
            started: Instant::now(),
            windows,
            weights: weights.to_vec(),
        }
    }

    /// Complete the record from `buf` (the result).
    pub fn complete(&self, rank: usize, r: &Recorded, buf: &[u8]) -> OpRecord {
        let elem = r.dtype.size();
        if !r.windows.is_empty() {
            let results = match r.z {
                Compression::None => windows(buf, elem, &r.positions, self.chunk_bytes),
                _ => Vec::new(),
            };
            let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            // Bounded: reports are sent in order, so only a stalled reporter leaves these.
            if kept.len() >= 64 {
                kept.clear();
            }
            kept.insert(r.seq, (r.windows.clone(), results));
        }
        let relays = self.relay_index.len().max(1);
        OpRecord {
            rank,
            seq: r.seq,
            dtype: r.dtype as u32,
            op: r.op as u32,
            count: r.count as u64,
            relays,
            inputs: crate::config::to_hex(&r.inputs),
            results: crate::config::to_hex(&verify::gather(buf, elem, &r.positions)),
            positions: r.positions.clone(),
            digests: verify::digests(buf, r.count, elem, r.z, relays, &r.weights),
            compress: r.z as u32,
            weights: r.weights.clone(),
        }
    }

    /// Queue `record` for the validator, if there is one.
    pub fn report(&self, mut record: OpRecord, started: Instant) {
        if let Some(rep) = &self.reporter {
            let reduction = self.reduction_of(&record);
            let elem = DType::from_raw(record.dtype).map_or(1, |d| d.size() as u64);
            let bytes = record.count * elem;
            let kept = self
                .kept
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&record.seq);
            let task = kept
                .zip(reduction)
                .map(|((inputs, results), reduction)| EvidenceTask {
                    job: self.job,
                    seq: record.seq,
                    rank: record.rank,
                    token: self.token.clone(),
                    relays: self
                        .relay_index
                        .iter()
                        .enumerate()
                        .filter_map(|(k, &i)| self.relay_addrs.get(i).map(|a| (k, a.clone())))
                        .collect(),
                    reduction,
                    positions: match Compression::from_u8(record.compress as u8) {
                        Some(z) if z != Compression::None => wire_positions(z, &record.positions),
                        _ => record.positions.iter().map(|&p| p * elem).collect(),
                    },
                    inputs,
                    results,
                });
            misreport_for_test(&mut record);
            rep.send(
                ReportMsg::Op {
                    record,
                    world: self.world,
                    relay_index: self.relay_index.clone(),
                    bytes,
                    micros: started.elapsed().as_micros() as u64,
                    evidence: Vec::new(),
                },
                task,
            );
        }
    }

    /// How this rank ran the op of `record`, as a relay's receipt signs it.
    fn reduction_of(&self, record: &OpRecord) -> Option<Reduction> {
        Some(Reduction {
            dtype: DType::from_raw(record.dtype).ok()?,
            op: ReduceOp::from_raw(record.op).ok()?,
            wire: u8::try_from(record.compress)
                .ok()
                .and_then(Compression::from_u8)?,
            world: u32::try_from(self.world).ok()?,
        })
    }

    /// Fixed-size encoding of a record's samples and digests, for the peers' exchange.
    pub fn pack(&self, rec: &OpRecord) -> Vec<u8> {
        let mut v = crate::config::parse_hex("inputs", &rec.inputs).unwrap_or_default();
        v.extend(crate::config::parse_hex("results", &rec.results).unwrap_or_default());
        for d in &rec.digests {
            v.extend(crate::config::parse_hex("digest", d).unwrap_or_default());
        }
        v
    }

    /// Rebuild rank `rank`'s record from its packed form, given this rank's `mine`.
    pub fn unpack(&self, mine: &OpRecord, rank: usize, packed: &[u8]) -> OpRecord {
        let elem = DType::from_raw(mine.dtype).map_or(1, |d| d.size());
        let (i, n) = (verify::inputs_len(mine, elem), mine.positions.len() * elem);
        let hex = crate::config::to_hex;
        OpRecord {
            rank,
            inputs: hex(&packed[..i]),
            results: hex(&packed[i..i + n]),
            digests: packed[i + n..].chunks(32).map(hex).collect(),
            ..mine.clone()
        }
    }
}

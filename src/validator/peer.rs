//! A peer's part in verification: record inputs at the sample positions before a relay
//! all-reduce is submitted, record results and segment digests after it completes, and hand
//! the record to the validator (in the background) or to the other peers (`MR_VERIFY=1`).

use crate::types::{DType, ReduceOp};
use crate::validator::client::Reporter;
use crate::validator::proto::{Assignment, ReportMsg};
use crate::validator::verify::{self, OpRecord};
use std::time::Instant;

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
}

/// Inputs recorded before an op.
pub struct Recorded {
    pub seq: u64,
    pub dtype: DType,
    pub op: ReduceOp,
    pub count: usize,
    pub positions: Vec<u64>,
    pub inputs: Vec<u8>,
    pub started: Instant,
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
        }
    }

    /// Whether op `seq` is checked at all.
    pub fn wants(&self, seq: u64) -> bool {
        self.peer_check
            || (self.reporter.is_some() && verify::is_sampled(&self.secret, seq, self.fraction))
    }

    /// Record the inputs of op `seq` from `buf` (the caller's buffer before the op).
    pub fn record(
        &self,
        seq: u64,
        buf: &[u8],
        count: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> Recorded {
        let positions = verify::positions(&self.secret, seq, count, self.samples);
        Recorded {
            seq,
            dtype,
            op,
            count,
            inputs: verify::gather(buf, dtype.size(), &positions),
            positions,
            started: Instant::now(),
        }
    }

    /// Complete the record from `buf` (the result).
    pub fn complete(&self, rank: usize, r: &Recorded, buf: &[u8]) -> OpRecord {
        let elem = r.dtype.size();
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
            digests: verify::digests(buf, r.count, elem, relays),
        }
    }

    /// Queue `record` for the validator, if there is one.
    pub fn report(&self, record: OpRecord, started: Instant) {
        if let Some(rep) = &self.reporter {
            let bytes = record.count * DType::from_raw(record.dtype).map_or(1, |d| d.size() as u64);
            rep.send(ReportMsg::Op {
                record,
                world: self.world,
                relay_index: self.relay_index.clone(),
                bytes,
                micros: started.elapsed().as_micros() as u64,
            });
        }
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
        let n = mine.positions.len() * DType::from_raw(mine.dtype).map_or(1, |d| d.size());
        let hex = crate::config::to_hex;
        OpRecord {
            rank,
            inputs: hex(&packed[..n]),
            results: hex(&packed[n..2 * n]),
            digests: packed[2 * n..].chunks(32).map(hex).collect(),
            ..mine.clone()
        }
    }
}

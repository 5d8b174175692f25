//! The validator's wire protocol: JSON messages, each sealed in one [`FrameKind::Control`]
//! frame of a [`crate::validator::channel`] session.
//!
//! The Hello carries an [`Intro`] (JSON) saying who connects and what it proves:
//! * a **relay** signs the handshake with its identity key; its id is its public key, so the
//!   validator pins it by construction and nobody else can speak for that id;
//! * a **job** request (a job's rank 0, the client) signs with the client's identity key,
//!   which must be admitted by the validator (`clients` in validator.config.json);
//! * a **report** connection (a peer reporting samples) proves the job's verification secret;
//! * a **status** query proves nothing: anyone may read the relay table.

use crate::error::{Error, ErrorKind, Result};
use crate::net::bootstrap::FrameIo;
use crate::validator::verify::OpRecord;
use crate::wire::{FrameHeader, FrameKind};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Hello body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Intro {
    Relay {
        /// Address peers should connect to; the validator checks that the relay proves its key
        /// there before assigning it.
        addr: String,
        /// Most memory the relay lets jobs reserve, bytes (a claim: scores count only what the
        /// benchmark bots exercised).
        capacity: u64,
        /// Memory available now, bytes.
        free_memory: u64,
    },
    Job(JobRequest),
    Report {
        /// Job id, hex.
        job: String,
    },
    Status,
}

/// Rank 0 asks for relays.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRequest {
    /// Job id (hex, 16 bytes), the id peers announce to relays.
    pub job: String,
    pub peers: usize,
    /// Relays wanted; 0 lets the validator choose.
    pub relays: usize,
    /// Most memory each relay must reserve for the job, bytes.
    pub relay_memory: u64,
    /// Largest message the job will all-reduce, bytes (informational).
    pub max_message_bytes: u64,
}

/// A relay chosen for a job.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AssignedRelay {
    pub id: String,
    pub addr: String,
}

/// The validator's answer to a [`JobRequest`], shared by rank 0 with every rank.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Assignment {
    pub job: String,
    /// Job token (hex) the relays accept for this job.
    pub token: String,
    /// Verification secret (hex, 32 bytes); never sent to relays.
    pub verify_secret: String,
    pub relays: Vec<AssignedRelay>,
    /// Fraction of relay ops peers report.
    pub report_fraction: f64,
    /// Sample positions per reported op.
    pub samples: usize,
}

/// `status` connection: the client asks for one page of the relay table at a time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusQuery {
    /// First row wanted.
    pub offset: usize,
    /// Rows wanted (the validator sends at most [`STATUS_PAGE`]).
    pub limit: usize,
}

/// Rows per status page: a page stays well under the control frame limit.
pub const STATUS_PAGE: usize = 64;

/// One page of the relay table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusPage<Row> {
    /// Rows in the whole table.
    pub total: usize,
    pub rows: Vec<Row>,
    /// On the first page: the clients most often flagged for reports that did not check out.
    #[serde(default)]
    pub flagged_clients: Vec<crate::validator::server::FlaggedClient>,
}

/// Validator ↔ relay messages after registration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RelayMsg {
    /// relay → validator, every heartbeat interval.
    Heartbeat { free_memory: u64, jobs: usize },
    /// validator → relay: accept peers proving `token` for `job` (both hex).
    Job {
        job: String,
        token: String,
        world: usize,
        /// Seconds the relay keeps the grant.
        #[serde(default = "default_grant_secs")]
        ttl_secs: u64,
    },
    /// relay → validator: the job is installed.
    JobAck { job: String },
}

fn default_grant_secs() -> u64 {
    24 * 3600
}

/// Peer → validator on a report connection.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReportMsg {
    /// One rank's samples of one op.
    Op {
        record: OpRecord,
        /// World size of the job.
        world: usize,
        /// The relays the op was cut across, as indices into the assignment's list.
        relay_index: Vec<usize>,
        /// Bytes of the op and how long this rank saw it take (informational: throughput
        /// scores come from the benchmark bots only).
        bytes: u64,
        micros: u64,
        /// Per relay, its signed receipt and this rank's chunk bytes that it covers.
        #[serde(default)]
        evidence: Vec<RelayEvidence>,
    },
}

/// One relay's signed account of a reported op, and the reporting rank's chunks it covers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayEvidence {
    /// Position of the relay in the op's relay list (as `relay_index`).
    pub relay: usize,
    /// The relay's answer to the receipt request, hex: public key, signature, receipt
    /// ([`crate::relay::receipts`]).
    pub receipt: String,
    /// This rank's input chunks it sent and result chunks it received, as covered by the
    /// receipt.
    pub chunks: Vec<ChunkBytes>,
}

/// The bytes of one chunk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkBytes {
    /// 0: an input this rank sent; 1: a result this rank received.
    pub kind: u32,
    /// Byte offset in the op's buffer.
    pub offset: u64,
    /// The bytes, hex.
    pub bytes: String,
}

/// Validator → any: an error reply.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Refusal {
    pub error: String,
}

/// Send `v` as one Control frame.
pub fn send_json<T: Serialize>(io: &mut FrameIo<'_>, v: &T) -> Result<()> {
    let body = serde_json::to_vec(v).map_err(|e| Error::internal(format!("encoding: {e}")))?;
    io.send(FrameHeader::new(FrameKind::Control, body.len()), &body)
}

/// Receive one Control frame as `T`; a Reject becomes its error.
pub fn recv_json<T: DeserializeOwned>(io: &mut FrameIo<'_>) -> Result<T> {
    let (_, body) = io.expect(FrameKind::Control)?;
    parse(&body, &io.what)
}

pub fn parse<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| {
        Error::new(
            ErrorKind::Remote,
            format!("{what}: malformed control message: {e}"),
        )
    })
}

//! The validator's wire protocol: JSON messages in [`FrameKind::Control`] frames, after the
//! usual challenge/Hello/Welcome handshake of [`crate::wire`].
//!
//! The Hello body is an [`Intro`] (JSON) saying who connects; the key its MAC is checked with
//! depends on the role:
//! * a **relay** proves its own key (pinned by the validator on first registration, trust on
//!   first use); a relay the validator does not know yet sends the key once in `enroll`;
//! * a **report** connection (a peer reporting samples) proves the job's verification secret;
//! * **job** requests and **status** queries use [`OPEN_KEY`]: anyone may ask.

use crate::error::{Error, ErrorKind, Result};
use crate::net::bootstrap::FrameIo;
use crate::validator::verify::OpRecord;
use crate::wire::{FrameHeader, FrameKind};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// MAC key of the roles anyone may take.
pub fn open_key() -> [u8; 32] {
    crate::wire::mac_key(b"mapreduce validator open access")
}

/// Hello body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Intro {
    Relay {
        /// Stable relay id (derived from its key).
        id: String,
        /// Address peers should connect to.
        addr: String,
        /// Most memory the relay lets jobs reserve, bytes.
        capacity: u64,
        /// Memory available now, bytes.
        free_memory: u64,
        /// The relay's key (hex), sent only to enroll with a validator that does not know it.
        #[serde(default)]
        enroll: Option<String>,
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
    },
    /// relay → validator: the job is installed.
    JobAck { job: String },
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
        /// Bytes of the op and how long this rank saw it take, for throughput scores.
        bytes: u64,
        micros: u64,
    },
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

//! The validator (`mr-validator`): a registry of relays, job assignment, verification of relay
//! sums by sampling, benchmark bots and scores.
//!
//! * [`identity`] — sr25519 key pairs of relays, clients and the validator;
//! * [`chain`] — the subnet's word on which relays may serve and which clients may ask;
//! * [`channel`] — the handshake and the sealed messages after it;
//! * [`proto`] — the JSON control messages and who proves which key;
//! * [`probe`] — checking that a relay serves its advertised address;
//! * [`registry`] — relays, pinned keys, liveness and scores (no I/O);
//! * [`verify`] — sample positions and the bit-exact recomputation (no I/O);
//! * [`evidence`] — judging a reported op on the relays' signed receipts (no I/O);
//! * [`hub`] — the event loop holding every connection; [`server`] — the daemon and its
//!   workers; [`bench`] — its benchmark bots;
//! * [`client`], [`peer`] — the peers' side: asking for relays, recording and reporting samples.
//!
//! The validator never forwards data and never tells a relay a job's verification secret.

pub mod bench;
pub mod chain;
pub mod channel;
pub mod client;
pub mod evidence;
pub mod hub;
pub mod identity;
pub mod peer;
pub mod probe;
pub mod proto;
pub mod registry;
pub mod server;
pub mod verify;

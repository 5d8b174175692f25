//! Networking: the per-communicator event loop that moves bytes ([`engine`]), framed
//! non-blocking connections ([`conn`]), and bootstrap/rendezvous ([`bootstrap`]).
//!
//! Nothing here knows collective semantics; that lives in [`crate::algo`].

pub mod bootstrap;
pub mod conn;
pub mod engine;
pub mod shm;

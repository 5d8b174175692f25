//! Networking: the per-communicator event loop that moves bytes ([`engine`]), framed
//! non-blocking connections ([`conn`]), bootstrap/rendezvous ([`bootstrap`]) and the inbound
//! handshakes it runs side by side ([`inbound`]).
//!
//! Nothing here knows collective semantics; that lives in [`crate::algo`].

pub mod bootstrap;
pub mod conn;
pub mod engine;
pub mod inbound;
pub mod shm;

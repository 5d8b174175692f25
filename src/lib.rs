//! mapreduce — collective communication for training across machines whose links are the
//! bottleneck.
//!
//! Two data paths share one communicator:
//! * **ring**: pipelined reduce-scatter + all-gather among the peers (like gloo and NCCL);
//! * **relay**: bipartite all-reduce through relay daemons (`mr-relayd`) that each sum one
//!   segment from every peer, so each peer uploads and downloads the tensor once.
//!
//! Layering (each layer only knows the ones below it):
//! * [`reduce`] — element-wise kernels over byte slices, per dtype and op;
//! * [`algo`] — collective schedules as sans-IO state machines (no sockets, threads or clocks);
//! * [`wire`] — frame format, handshake and keyed-blake3 authentication;
//! * [`net`] — the mio event loop that moves bytes for a communicator, and bootstrap;
//! * [`comm`] — the public Rust API ([`Comm`]) on top of the loop;
//! * [`ffi`] — the C ABI (`include/mapreduce.h`), a thin panic-safe wrapper over [`comm`].

pub mod algo;
pub mod buffer;
pub mod comm;
pub mod compress;
pub mod config;
pub mod error;
pub mod ffi;
pub mod hier;
pub mod layout;
pub mod net;
pub mod pace;
pub mod policy;
pub mod reduce;
pub mod relay;
pub mod types;
pub mod validator;
pub mod wire;

pub use comm::{Comm, Request, UniqueId};
pub use config::{Algo, Config};
pub use error::{Error, ErrorKind, Result};
pub use types::{DType, Element, ReduceOp};

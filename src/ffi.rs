//! The C ABI (`include/mapreduce.h`): thin wrappers over [`crate::comm`].
//!
//! Every export here does the same four things and nothing else: check its arguments (NULL
//! pointers, out-of-range enum values and ranks), call into [`Comm`]/[`Request`], map the
//! [`Error`] to an [`mr_result`] code, and keep the detailed message for `mr_last_error()`.
//! No export ever lets a panic unwind into C: each body runs inside [`ffi_boundary!`], which
//! turns a panic into `MR_ERR_INTERNAL`. `tests/ffi_boundary.rs` fails the build when an export
//! forgets the macro.
//!
//! Conventions (those of rustls-ffi): the handle comes first, then inputs, then outputs; a
//! buffer is followed by its length in elements; outputs are written only on success.
//!
//! Enum parameters (`mr_dtype`, `mr_op`, `mr_result`) are declared with their C enum types in
//! the header, but read here as plain `u32`s ([`mr_dtype_arg`] and friends): C lets a caller pass
//! any integer in an enum parameter, and a Rust enum holding an undeclared value would be
//! undefined behaviour. A C enum whose enumerators are all non-negative and fit in `int` is
//! passed exactly like `unsigned int` on every ABI we build for, so the two declarations agree.
//! cbindgen prints the `_arg` aliases under the enum names (see `cbindgen.toml`).
//!
//! Header text comes from the doc comments below; run `make header` after changing them.
//!
//! # Safety
//!
//! One contract covers every `unsafe` export, so it is stated here once rather than in each
//! doc comment (which would repeat it in every header entry): each pointer argument is either
//! NULL, which the export reports as `MR_ERR_INVALID_ARGUMENT` unless documented otherwise,
//! or valid for the reads and writes its documentation describes (a buffer for its count of
//! elements, an output for one value); a handle is one returned by this library and not yet
//! freed (`mr_comm_destroy`, `mr_wait`); buffers of a non-blocking op stay untouched until
//! its `mr_wait` returns.

#![deny(unsafe_op_in_unsafe_fn)]
// The shared contract is in the module's "Safety" section above.
#![allow(clippy::missing_safety_doc)]
// The C names are part of the contract (DESIGN §3).
#![allow(non_camel_case_types)]

use crate::comm::{Comm, P2pCall, Request, UniqueId};
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::net::engine::Completion;
use crate::types::{DType, ReduceOp};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Arc;

/// Result of every `mr_*` call. `MR_OK` is 0; on any other value `mr_last_error()` describes
/// what happened.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum mr_result {
    /// Success.
    MR_OK = 0,
    /// An argument was NULL, out of range, or inconsistent with the communicator.
    MR_ERR_INVALID_ARGUMENT = 1,
    /// The operating system refused something (sockets, memory, threads).
    MR_ERR_SYSTEM = 2,
    /// A remote rank or relay did not answer within `MR_TIMEOUT_MS`.
    MR_ERR_TIMEOUT = 3,
    /// A remote rank or relay failed, disconnected, or reported an error.
    MR_ERR_REMOTE = 4,
    /// A connection could not prove knowledge of the job secret.
    MR_ERR_AUTH = 5,
    /// The communicator was aborted (`mr_comm_abort`) or broken by an earlier failure.
    MR_ERR_ABORTED = 6,
    /// A relay's result failed verification (`MR_VERIFY=1`).
    MR_ERR_VERIFY = 7,
    /// A bug in the library (including a caught panic); the message says where.
    MR_ERR_INTERNAL = 8,
}

/// Element type of a buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum mr_dtype {
    MR_FLOAT32 = 0,
    MR_FLOAT64 = 1,
    /// IEEE 754 binary16; reduced in float32 and rounded once.
    MR_FLOAT16 = 2,
    /// bfloat16; reduced in float32 and rounded once.
    MR_BFLOAT16 = 3,
    MR_INT8 = 4,
    MR_UINT8 = 5,
    MR_INT32 = 6,
    MR_INT64 = 7,
}

/// Reduction operator.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum mr_op {
    MR_SUM = 0,
    /// The sum divided by the number of ranks (integer types truncate toward zero).
    MR_AVG = 1,
    MR_MAX = 2,
    MR_MIN = 3,
    MR_PROD = 4,
}

/// Wire format of float data (`mr_allreduce_compressed`): exact, or fewer bytes per element
/// within a documented error bound. Only float32 and float64 data compress.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum mr_compress {
    /// Exact: the data's own bytes.
    MR_COMPRESS_NONE = 0,
    /// bfloat16 on the wire (2 bytes per element), rounded to nearest even.
    MR_COMPRESS_BF16 = 1,
    /// IEEE half precision on the wire (2 bytes per element), rounded to nearest even.
    MR_COMPRESS_FP16 = 2,
    /// 8-bit codes in blocks of 256 elements with a per-block midpoint and step
    /// (1.03 bytes per element); off by at most half a step per encoding.
    MR_COMPRESS_INT8 = 3,
}

/// An `mr_compress` as received from C: any 32-bit value, validated before use.
pub type mr_compress_arg = u32;
/// An `mr_dtype` as received from C: any 32-bit value, validated before use.
pub type mr_dtype_arg = u32;
/// An `mr_op` as received from C: any 32-bit value, validated before use.
pub type mr_op_arg = u32;
/// An `mr_result` as received from C: any 32-bit value.
pub type mr_result_arg = u32;

/// Compile-time checks that the C and Rust views of the ABI cannot drift.
/// cbindgen:ignore
mod abi_checks {
    use super::{mr_compress, mr_dtype, mr_op, mr_result, mr_unique_id};
    use crate::comm::{Comm, Request, UniqueId};
    use crate::compress::Compression;
    use crate::error::ErrorKind;
    use crate::types::{DType, ReduceOp};

    // The codes are the discriminants of the Rust enums, so the C and Rust views cannot drift.
    const _: () = {
        assert!(ErrorKind::InvalidArgument as u32 == mr_result::MR_ERR_INVALID_ARGUMENT as u32);
        assert!(ErrorKind::System as u32 == mr_result::MR_ERR_SYSTEM as u32);
        assert!(ErrorKind::Timeout as u32 == mr_result::MR_ERR_TIMEOUT as u32);
        assert!(ErrorKind::Remote as u32 == mr_result::MR_ERR_REMOTE as u32);
        assert!(ErrorKind::Auth as u32 == mr_result::MR_ERR_AUTH as u32);
        assert!(ErrorKind::Aborted as u32 == mr_result::MR_ERR_ABORTED as u32);
        assert!(ErrorKind::Verify as u32 == mr_result::MR_ERR_VERIFY as u32);
        assert!(ErrorKind::Internal as u32 == mr_result::MR_ERR_INTERNAL as u32);

        assert!(DType::F32 as u32 == mr_dtype::MR_FLOAT32 as u32);
        assert!(DType::F64 as u32 == mr_dtype::MR_FLOAT64 as u32);
        assert!(DType::F16 as u32 == mr_dtype::MR_FLOAT16 as u32);
        assert!(DType::BF16 as u32 == mr_dtype::MR_BFLOAT16 as u32);
        assert!(DType::I8 as u32 == mr_dtype::MR_INT8 as u32);
        assert!(DType::U8 as u32 == mr_dtype::MR_UINT8 as u32);
        assert!(DType::I32 as u32 == mr_dtype::MR_INT32 as u32);
        assert!(DType::I64 as u32 == mr_dtype::MR_INT64 as u32);

        assert!(ReduceOp::Sum as u32 == mr_op::MR_SUM as u32);
        assert!(ReduceOp::Avg as u32 == mr_op::MR_AVG as u32);
        assert!(ReduceOp::Max as u32 == mr_op::MR_MAX as u32);
        assert!(ReduceOp::Min as u32 == mr_op::MR_MIN as u32);
        assert!(ReduceOp::Prod as u32 == mr_op::MR_PROD as u32);

        assert!(Compression::None as u32 == mr_compress::MR_COMPRESS_NONE as u32);
        assert!(Compression::Bf16 as u32 == mr_compress::MR_COMPRESS_BF16 as u32);
        assert!(Compression::Fp16 as u32 == mr_compress::MR_COMPRESS_FP16 as u32);
        assert!(Compression::Int8 as u32 == mr_compress::MR_COMPRESS_INT8 as u32);

        // The C struct and the Rust id must be the same 256 bytes.
        assert!(std::mem::size_of::<mr_unique_id>() == std::mem::size_of::<UniqueId>());
    };

    // `mr_comm_abort` may run on one thread while another is blocked in an op on the same
    // communicator, and a request may be waited on from any thread.
    const _: fn() = || {
        fn shared_across_threads<T: Send + Sync>() {}
        fn sent_across_threads<T: Send>() {}
        shared_across_threads::<Comm>();
        sent_across_threads::<Request>();
    };
}

impl mr_result {
    /// The one map from library errors to C codes.
    pub fn from_kind(kind: ErrorKind) -> mr_result {
        match kind {
            ErrorKind::InvalidArgument => mr_result::MR_ERR_INVALID_ARGUMENT,
            ErrorKind::System => mr_result::MR_ERR_SYSTEM,
            ErrorKind::Timeout => mr_result::MR_ERR_TIMEOUT,
            ErrorKind::Remote => mr_result::MR_ERR_REMOTE,
            ErrorKind::Auth => mr_result::MR_ERR_AUTH,
            ErrorKind::Aborted => mr_result::MR_ERR_ABORTED,
            ErrorKind::Verify => mr_result::MR_ERR_VERIFY,
            ErrorKind::Internal => mr_result::MR_ERR_INTERNAL,
        }
    }

    /// The code for a raw value from C, if it names one.
    pub fn from_raw(raw: u32) -> Option<mr_result> {
        const ALL: [mr_result; 9] = [
            mr_result::MR_OK,
            mr_result::MR_ERR_INVALID_ARGUMENT,
            mr_result::MR_ERR_SYSTEM,
            mr_result::MR_ERR_TIMEOUT,
            mr_result::MR_ERR_REMOTE,
            mr_result::MR_ERR_AUTH,
            mr_result::MR_ERR_ABORTED,
            mr_result::MR_ERR_VERIFY,
            mr_result::MR_ERR_INTERNAL,
        ];
        ALL.get(raw as usize).copied()
    }

    /// Short fixed description, NUL-terminated for C.
    const fn description(self) -> &'static CStr {
        match self {
            mr_result::MR_OK => c"success",
            mr_result::MR_ERR_INVALID_ARGUMENT => c"invalid argument",
            mr_result::MR_ERR_SYSTEM => c"system error",
            mr_result::MR_ERR_TIMEOUT => c"timed out",
            mr_result::MR_ERR_REMOTE => c"remote error",
            mr_result::MR_ERR_AUTH => c"authentication failed",
            mr_result::MR_ERR_ABORTED => c"aborted",
            mr_result::MR_ERR_VERIFY => c"verification failed",
            mr_result::MR_ERR_INTERNAL => c"internal error",
        }
    }
}

/// Opaque communicator handle: this process's membership in one job.
pub struct mr_comm {
    inner: Comm,
}

/// Opaque handle of a non-blocking operation in flight; freed by `mr_wait`.
pub struct mr_request {
    inner: Request,
}

/// Job id that rank 0 creates with `mr_get_unique_id` and passes to every other rank out of
/// band (a file, a key-value store, an inherited variable). Treat it as opaque bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct mr_unique_id {
    pub internal: [c_char; 256],
}

impl mr_unique_id {
    fn from_id(id: &UniqueId) -> mr_unique_id {
        mr_unique_id {
            internal: id.0.map(|b| b as c_char),
        }
    }

    fn to_id(self) -> UniqueId {
        UniqueId(self.internal.map(|c| c as u8))
    }
}

// ---------------------------------------------------------------------------------------------
// Panic boundary and error reporting.

/// The panic boundary and the thread-local error message behind `mr_last_error`.
/// cbindgen:ignore
mod boundary {
    use super::mr_result;
    use crate::error::Result;
    use std::cell::RefCell;
    use std::ffi::{c_char, CString};
    use std::panic::{catch_unwind, AssertUnwindSafe};

    thread_local! {
        /// This thread's detailed message for the last failed call; empty after a success.
        pub(super) static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
    }

    fn set_last_error(message: String) {
        // An interior NUL would cut the message short in C; show it instead.
        let message = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
        LAST_ERROR.with(|m| *m.borrow_mut() = message);
    }

    fn clear_last_error() {
        LAST_ERROR.with(|m| {
            let mut m = m.borrow_mut();
            if !m.as_bytes().is_empty() {
                *m = CString::default();
            }
        });
    }

    /// The text of a panic payload (what `panic!` was given), if it is a string.
    fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
        if let Some(s) = payload.downcast_ref::<&str>() {
            s
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s
        } else {
            "(non-string panic payload)"
        }
    }

    /// What an export returns: how a body's value becomes the C return value, and what to return
    /// when the body panicked.
    pub trait ExportReturn: Sized {
        /// What the body of the export evaluates to.
        type Body;
        /// Whether the export reports through `mr_last_error` (and so resets it on entry).
        /// `mr_result_string`, `mr_last_error` and `mr_version` must not, so that they can be
        /// called in any order while reporting a failure.
        const REPORTS_ERRORS: bool;
        fn finish(export: &'static str, body: Self::Body) -> Self;
        fn panicked(export: &'static str, message: &str) -> Self;
    }

    impl ExportReturn for mr_result {
        type Body = Result<()>;
        const REPORTS_ERRORS: bool = true;

        fn finish(export: &'static str, body: Result<()>) -> mr_result {
            match body {
                Ok(()) => mr_result::MR_OK,
                Err(e) => {
                    log::debug!("{export}: {e}");
                    set_last_error(format!("{export}: {}", e.message));
                    mr_result::from_kind(e.kind)
                }
            }
        }

        fn panicked(export: &'static str, message: &str) -> mr_result {
            set_last_error(format!("{export}: panicked: {message}"));
            mr_result::MR_ERR_INTERNAL
        }
    }

    impl ExportReturn for *const c_char {
        type Body = *const c_char;
        const REPORTS_ERRORS: bool = false;

        fn finish(_export: &'static str, body: *const c_char) -> *const c_char {
            body
        }

        fn panicked(_export: &'static str, _message: &str) -> *const c_char {
            c"".as_ptr()
        }
    }

    /// Run an export's body with the panic boundary; used through [`ffi_boundary!`].
    #[doc(hidden)]
    pub fn run_boundary<R: ExportReturn>(
        export: &'static str,
        body: impl FnOnce() -> R::Body,
    ) -> R {
        if R::REPORTS_ERRORS {
            clear_last_error();
        }
        // Unwind safety: after a caught panic the caller gets MR_ERR_INTERNAL and the only state
        // the body could have left half-updated lives behind the communicator's poison-tolerant
        // locks, where the next op sees it as a broken communicator at worst.
        match catch_unwind(AssertUnwindSafe(body)) {
            Ok(value) => R::finish(export, value),
            Err(payload) => {
                let message = panic_message(payload.as_ref());
                log::error!("{export}: panicked: {message}");
                R::panicked(export, message)
            }
        }
    }
}

#[doc(hidden)]
pub use boundary::run_boundary;
use boundary::LAST_ERROR;

/// The body of every `extern "C"` function: `ffi_boundary!("mr_name", { ... })`.
///
/// The body runs inside `catch_unwind`; for `mr_result` exports it evaluates to
/// `Result<()>`, and an `Err` becomes its code plus the `mr_last_error` message prefixed with
/// the export's name.
macro_rules! ffi_boundary {
    ($export:literal, $body:block) => {
        $crate::ffi::run_boundary($export, move || $body)
    };
}

// ---------------------------------------------------------------------------------------------
// Argument checks. Each export checks everything it can without its communicator first, then
// the communicator, so a bad argument is reported the same way whatever the handle.

/// `ptr` must not be NULL (an output or a handle).
fn non_null<T>(what: &str, ptr: *const T) -> Result<()> {
    if ptr.is_null() {
        return Err(Error::invalid(format!("{what} is NULL")));
    }
    Ok(())
}

/// A buffer may be NULL only when it holds no elements.
fn buffer(what: &str, ptr: *const c_void, count: usize) -> Result<()> {
    if count > 0 && ptr.is_null() {
        return Err(Error::invalid(format!(
            "{what} is NULL but count is {count}"
        )));
    }
    Ok(())
}

fn dtype(raw: mr_dtype_arg) -> Result<DType> {
    DType::from_raw(raw).map_err(|e| e.context("mr_dtype"))
}

fn op(raw: mr_op_arg) -> Result<ReduceOp> {
    ReduceOp::from_raw(raw).map_err(|e| e.context("mr_op"))
}

fn compression(raw: mr_compress_arg) -> Result<crate::compress::Compression> {
    u8::try_from(raw)
        .ok()
        .and_then(crate::compress::Compression::from_u8)
        .ok_or_else(|| Error::invalid(format!("mr_compress: {raw} is not a compression")))
}

fn non_negative(what: &str, v: c_int) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::invalid(format!("{what} {v} is negative")))
}

/// Write `get(comm)` to the `int` at `out` (named `what` in errors): the shape of every
/// `mr_comm_*` query.
///
/// # Safety
/// As for [`comm_ref`]; `out` is NULL or valid for writing one `int`.
unsafe fn write_comm_int(
    comm: *const mr_comm,
    what: &str,
    out: *mut c_int,
    get: fn(&Comm) -> usize,
) -> Result<()> {
    non_null(&format!("{what} (output)"), out)?;
    // SAFETY: the caller's contract makes a non-NULL handle a live one.
    let c = unsafe { comm_ref(comm) }?;
    let value =
        c_int::try_from(get(c)).map_err(|_| Error::internal(format!("{what} exceeds int")))?;
    // SAFETY: non-NULL (checked above) and valid for one int by the caller's contract.
    unsafe { out.write(value) };
    Ok(())
}

/// Borrow the communicator behind a handle.
///
/// # Safety
/// `comm` is NULL or a handle from `mr_comm_init_*` not yet passed to `mr_comm_destroy`.
unsafe fn comm_ref<'a>(comm: *const mr_comm) -> Result<&'a Comm> {
    non_null("comm", comm)?;
    // SAFETY: non-NULL, and by this function's contract a live handle; only shared access is
    // taken, so an abort on another thread may hold one at the same time.
    Ok(unsafe { &(*comm).inner })
}

/// Hand a started request to C.
///
/// # Safety
/// `out` is non-NULL and valid for a write of one pointer.
unsafe fn give_request(out: *mut *mut mr_request, request: Request) {
    let handle = Box::into_raw(Box::new(mr_request { inner: request }));
    // SAFETY: by this function's contract.
    unsafe { out.write(handle) };
}

// ---------------------------------------------------------------------------------------------
// Exports.

/// A short, static description of a result code ("invalid argument"). Never NULL; an
/// unknown code gives "unknown result code".
#[no_mangle]
pub extern "C" fn mr_result_string(r: mr_result_arg) -> *const c_char {
    ffi_boundary!("mr_result_string", {
        match mr_result::from_raw(r) {
            Some(code) => code.description().as_ptr(),
            None => c"unknown result code".as_ptr(),
        }
    })
}

/// This thread's detailed message for the last failed `mr_*` call, such as
/// "mr_allreduce: buf is NULL but count is 4"; "" after a successful call. Never NULL. The
/// string stays valid until the next `mr_*` call on this thread other than
/// `mr_result_string`, `mr_last_error` and `mr_version`.
#[no_mangle]
pub extern "C" fn mr_last_error() -> *const c_char {
    ffi_boundary!("mr_last_error", {
        // The CString's heap buffer outlives this borrow: it is only replaced by the next
        // call that reports errors, which the contract above allows to invalidate it.
        LAST_ERROR.with(|m| m.borrow().as_ptr())
    })
}

/// The library's version, such as "0.1.0". Static; never NULL.
#[no_mangle]
pub extern "C" fn mr_version() -> *const c_char {
    ffi_boundary!("mr_version", {
        const VERSION: &CStr =
            match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
                Ok(v) => v,
                Err(_) => panic!("the package version contains a NUL"),
            };
        VERSION.as_ptr()
    })
}

/// Create a new job id. Call on rank 0 only: it opens the bootstrap listener that the other
/// ranks connect to, and must be followed by `mr_comm_init_rank` in this process. Reads the
/// `MR_*` environment variables (`MR_BIND_ADDR`, `MR_IFNAME` choose the address it
/// advertises).
#[no_mangle]
pub unsafe extern "C" fn mr_get_unique_id(id: *mut mr_unique_id) -> mr_result {
    ffi_boundary!("mr_get_unique_id", {
        non_null("id", id)?;
        let config = Config::from_env()?;
        let fresh = UniqueId::new(&config)?;
        // SAFETY: non-NULL and, by the C contract, valid for writing one id.
        unsafe { id.write(mr_unique_id::from_id(&fresh)) };
        Ok(())
    })
}

/// Join a job of `nranks` ranks as `rank` (0-based), rendezvousing through `id` (from
/// `mr_get_unique_id` on rank 0). Blocks until every rank has joined or `MR_TIMEOUT_MS`
/// passes. Reads the `MR_*` environment variables. On success `*comm` is a new handle to be
/// released with `mr_comm_destroy`; on failure `*comm` is left untouched.
#[no_mangle]
pub unsafe extern "C" fn mr_comm_init_rank(
    comm: *mut *mut mr_comm,
    nranks: c_int,
    id: *const mr_unique_id,
    rank: c_int,
) -> mr_result {
    ffi_boundary!("mr_comm_init_rank", {
        non_null("comm (output)", comm)?;
        non_null("id", id)?;
        let size = non_negative("nranks", nranks)?;
        let rank = non_negative("rank", rank)?;
        if size == 0 {
            return Err(Error::invalid("nranks must be at least 1"));
        }
        if rank >= size {
            return Err(Error::invalid(format!(
                "rank {rank} is out of range for nranks {size}"
            )));
        }
        // SAFETY: non-NULL and, by the C contract, valid for reading one id.
        let id = unsafe { id.read() }.to_id();
        let config = Config::from_env()?;
        let inner = Comm::init(size, &id, rank, config)?;
        let handle = Box::into_raw(Box::new(mr_comm { inner }));
        // SAFETY: non-NULL and, by the C contract, valid for writing one pointer.
        unsafe { comm.write(handle) };
        Ok(())
    })
}

/// Join a job described by the environment: `MR_RANK`, `MR_WORLD_SIZE` and `MR_BOOTSTRAP`
/// (`host:port` of rank 0's bootstrap listener), or torchrun's `RANK`, `WORLD_SIZE`,
/// `MASTER_ADDR` and `MASTER_PORT`. Otherwise as `mr_comm_init_rank`.
#[no_mangle]
pub unsafe extern "C" fn mr_comm_init_env(comm: *mut *mut mr_comm) -> mr_result {
    ffi_boundary!("mr_comm_init_env", {
        non_null("comm (output)", comm)?;
        let inner = Comm::init_env()?;
        let handle = Box::into_raw(Box::new(mr_comm { inner }));
        // SAFETY: non-NULL and, by the C contract, valid for writing one pointer.
        unsafe { comm.write(handle) };
        Ok(())
    })
}

/// This process's rank in the communicator (0-based).
#[no_mangle]
pub unsafe extern "C" fn mr_comm_rank(comm: *const mr_comm, rank: *mut c_int) -> mr_result {
    ffi_boundary!("mr_comm_rank", {
        // SAFETY: forwarded from this function's C contract.
        unsafe { write_comm_int(comm, "rank", rank, Comm::rank) }
    })
}

/// The number of ranks in the communicator.
#[no_mangle]
pub unsafe extern "C" fn mr_comm_size(comm: *const mr_comm, size: *mut c_int) -> mr_result {
    ffi_boundary!("mr_comm_size", {
        // SAFETY: forwarded from this function's C contract.
        unsafe { write_comm_int(comm, "size", size, Comm::size) }
    })
}

/// This rank's position among the ranks on its host (0-based). Ranks are on one host when
/// they share the kernel's boot id and network namespace, or have equal `MR_HOST_ID` values.
#[no_mangle]
pub unsafe extern "C" fn mr_comm_local_rank(
    comm: *const mr_comm,
    local_rank: *mut c_int,
) -> mr_result {
    ffi_boundary!("mr_comm_local_rank", {
        // SAFETY: forwarded from this function's C contract.
        unsafe { write_comm_int(comm, "local_rank", local_rank, Comm::local_rank) }
    })
}

/// The number of ranks on this rank's host.
#[no_mangle]
pub unsafe extern "C" fn mr_comm_local_size(
    comm: *const mr_comm,
    local_size: *mut c_int,
) -> mr_result {
    ffi_boundary!("mr_comm_local_size", {
        // SAFETY: forwarded from this function's C contract.
        unsafe { write_comm_int(comm, "local_size", local_size, Comm::local_size) }
    })
}

/// The number of hosts the communicator's ranks run on.
#[no_mangle]
pub unsafe extern "C" fn mr_comm_host_count(comm: *const mr_comm, hosts: *mut c_int) -> mr_result {
    ffi_boundary!("mr_comm_host_count", {
        // SAFETY: forwarded from this function's C contract.
        unsafe { write_comm_int(comm, "hosts", hosts, Comm::host_count) }
    })
}

/// Finish pending operations, leave the job gracefully and free the communicator. The handle
/// is invalid afterwards, also when this returns an error. NULL is accepted and does nothing.
/// Must not run while another thread still uses the handle.
#[no_mangle]
pub unsafe extern "C" fn mr_comm_destroy(comm: *mut mr_comm) -> mr_result {
    ffi_boundary!("mr_comm_destroy", {
        if comm.is_null() {
            return Ok(());
        }
        // SAFETY: a live handle from Box::into_raw in mr_comm_init_*; the C contract says no
        // other thread uses it any more, and it is never used again after this.
        let owned = unsafe { Box::from_raw(comm) };
        owned.inner.destroy()
    })
}

/// End every pending and future operation on the communicator with `MR_ERR_ABORTED` and
/// close its connections. Callable from any thread, also while another thread is blocked in
/// an operation on the same communicator. The handle stays valid: release it with
/// `mr_comm_destroy` once no thread uses it.
#[no_mangle]
pub unsafe extern "C" fn mr_comm_abort(comm: *mut mr_comm) -> mr_result {
    ffi_boundary!("mr_comm_abort", {
        // SAFETY: the C contract makes a non-NULL handle a live one.
        let c = unsafe { comm_ref(comm) }?;
        c.abort();
        Ok(())
    })
}

/// In-place all-reduce of `count` elements of type `t` at `buf` with `op`: afterwards `buf`
/// holds the same bits on every rank. Blocks until done.
#[no_mangle]
pub unsafe extern "C" fn mr_allreduce(
    comm: *mut mr_comm,
    buf: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    op: mr_op_arg,
) -> mr_result {
    ffi_boundary!("mr_allreduce", {
        let (t, reduce) = (dtype(t)?, self::op(op)?);
        buffer("buf", buf, count)?;
        // SAFETY: the C contract makes a non-NULL handle a live one.
        let c = unsafe { comm_ref(comm) }?;
        // SAFETY: by the C contract buf holds count elements of t, and nothing else touches
        // it while this call blocks.
        let request = unsafe { c.iallreduce_raw(buf.cast(), count, t, reduce) }?;
        request.wait()
    })
}

/// Copy `count` elements of type `t` from rank `root`'s `buf` into every other rank's `buf`.
/// Blocks until done.
#[no_mangle]
pub unsafe extern "C" fn mr_broadcast(
    comm: *mut mr_comm,
    buf: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    root: c_int,
) -> mr_result {
    ffi_boundary!("mr_broadcast", {
        let t = dtype(t)?;
        buffer("buf", buf, count)?;
        let root = non_negative("root", root)?;
        // SAFETY: the C contract makes a non-NULL handle a live one.
        let c = unsafe { comm_ref(comm) }?;
        // SAFETY: as in mr_allreduce.
        let request = unsafe { c.ibroadcast_raw(buf.cast(), count, t, root) }?;
        request.wait()
    })
}

/// Gather `count` elements of type `t` from every rank's `send` into every rank's `recv`,
/// which holds `count × size` elements in rank order. `send` may be this rank's slot of
/// `recv`. Blocks until done.
#[no_mangle]
pub unsafe extern "C" fn mr_allgather(
    comm: *mut mr_comm,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
) -> mr_result {
    ffi_boundary!("mr_allgather", {
        let t = dtype(t)?;
        buffer("send", send, count)?;
        buffer("recv", recv, count)?;
        // SAFETY: the C contract makes a non-NULL handle a live one.
        let c = unsafe { comm_ref(comm) }?;
        // SAFETY: by the C contract send holds count and recv count × size elements of t,
        // untouched by anything else while this call blocks.
        let request = unsafe { c.iallgather_raw(send.cast(), recv.cast(), count, t) }?;
        request.wait()
    })
}

/// Reduce every rank's `send` (`recv_count × size` elements of type `t`) with `op`; rank r's
/// `recv` gets block r of the result (`recv_count` elements). Blocks until done.
#[no_mangle]
pub unsafe extern "C" fn mr_reduce_scatter(
    comm: *mut mr_comm,
    send: *const c_void,
    recv: *mut c_void,
    recv_count: usize,
    t: mr_dtype_arg,
    op: mr_op_arg,
) -> mr_result {
    ffi_boundary!("mr_reduce_scatter", {
        let (t, reduce) = (dtype(t)?, self::op(op)?);
        buffer("send", send, recv_count)?;
        buffer("recv", recv, recv_count)?;
        // SAFETY: the C contract makes a non-NULL handle a live one.
        let c = unsafe { comm_ref(comm) }?;
        // SAFETY: by the C contract send holds recv_count × size and recv recv_count
        // elements of t, untouched by anything else while this call blocks.
        let request =
            unsafe { c.ireduce_scatter_raw(send.cast(), recv.cast(), recv_count, t, reduce) }?;
        request.wait()
    })
}

/// Block until every rank has entered the barrier.
#[no_mangle]
pub unsafe extern "C" fn mr_barrier(comm: *mut mr_comm) -> mr_result {
    ffi_boundary!("mr_barrier", {
        // SAFETY: the C contract makes a non-NULL handle a live one.
        let c = unsafe { comm_ref(comm) }?;
        c.ibarrier()?.wait()
    })
}

/// Start `mr_allreduce` and return at once. On success `*req` is a request to finish with
/// `mr_wait`; `buf` must stay untouched until then. Operations on one communicator complete
/// in the order they were started.
#[no_mangle]
pub unsafe extern "C" fn mr_iallreduce(
    comm: *mut mr_comm,
    buf: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    op: mr_op_arg,
    req: *mut *mut mr_request,
) -> mr_result {
    ffi_boundary!("mr_iallreduce", {
        let (t, reduce) = (dtype(t)?, self::op(op)?);
        buffer("buf", buf, count)?;
        non_null("req (output)", req)?;
        // SAFETY: the C contract makes a non-NULL handle a live one.
        let c = unsafe { comm_ref(comm) }?;
        // SAFETY: by the C contract buf holds count elements of t and stays untouched by
        // anything else until mr_wait returns.
        let request = unsafe { c.iallreduce_raw(buf.cast(), count, t, reduce) }?;
        // SAFETY: req checked non-NULL above; valid for one write by the C contract.
        unsafe { give_request(req, request) };
        Ok(())
    })
}

/// `mr_allreduce` with float data travelling in wire format `z` (the same on every rank):
/// afterwards `buf` holds the same bits on every rank, within the format's error bound of the
/// exact result (see README). Only float32 and float64 data compress; other types are an
/// error unless `z` is `MR_COMPRESS_NONE`. Ops that run over shared memory stay exact; through
/// relays each rank's input and the sum are encoded once. Blocks until done.
#[no_mangle]
pub unsafe extern "C" fn mr_allreduce_compressed(
    comm: *mut mr_comm,
    buf: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    op: mr_op_arg,
    z: mr_compress_arg,
) -> mr_result {
    ffi_boundary!("mr_allreduce_compressed", {
        let (t, reduce, z) = (dtype(t)?, self::op(op)?, compression(z)?);
        buffer("buf", buf, count)?;
        // SAFETY: the C contract makes a non-NULL handle a live one.
        let c = unsafe { comm_ref(comm) }?;
        // SAFETY: by the C contract buf holds count elements of t, and nothing else touches
        // it while this call blocks.
        let request = unsafe { c.iallreduce_compressed_raw(buf.cast(), count, t, reduce, z) }?;
        request.wait()
    })
}

/// Start `mr_allreduce_compressed` and return at once; finish with `mr_wait` as for
/// `mr_iallreduce`.
#[no_mangle]
pub unsafe extern "C" fn mr_iallreduce_compressed(
    comm: *mut mr_comm,
    buf: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    op: mr_op_arg,
    z: mr_compress_arg,
    req: *mut *mut mr_request,
) -> mr_result {
    ffi_boundary!("mr_iallreduce_compressed", {
        let (t, reduce, z) = (dtype(t)?, self::op(op)?, compression(z)?);
        buffer("buf", buf, count)?;
        non_null("req (output)", req)?;
        // SAFETY: the C contract makes a non-NULL handle a live one.
        let c = unsafe { comm_ref(comm) }?;
        // SAFETY: by the C contract buf holds count elements of t and stays untouched by
        // anything else until mr_wait returns.
        let request = unsafe { c.iallreduce_compressed_raw(buf.cast(), count, t, reduce, z) }?;
        // SAFETY: req checked non-NULL above; valid for one write by the C contract.
        unsafe { give_request(req, request) };
        Ok(())
    })
}

/// Start `mr_broadcast` and return at once; finish with `mr_wait` as for `mr_iallreduce`.
#[no_mangle]
pub unsafe extern "C" fn mr_ibroadcast(
    comm: *mut mr_comm,
    buf: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    root: c_int,
    req: *mut *mut mr_request,
) -> mr_result {
    ffi_boundary!("mr_ibroadcast", {
        let t = dtype(t)?;
        buffer("buf", buf, count)?;
        let root = non_negative("root", root)?;
        non_null("req (output)", req)?;
        // SAFETY: the C contract makes a non-NULL handle a live one.
        let c = unsafe { comm_ref(comm) }?;
        // SAFETY: as in mr_iallreduce.
        let request = unsafe { c.ibroadcast_raw(buf.cast(), count, t, root) }?;
        // SAFETY: req checked non-NULL above; valid for one write by the C contract.
        unsafe { give_request(req, request) };
        Ok(())
    })
}

/// Start `mr_allgather` and return at once; finish with `mr_wait` as for `mr_iallreduce`.
#[no_mangle]
pub unsafe extern "C" fn mr_iallgather(
    comm: *mut mr_comm,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    req: *mut *mut mr_request,
) -> mr_result {
    ffi_boundary!("mr_iallgather", {
        let t = dtype(t)?;
        buffer("send", send, count)?;
        buffer("recv", recv, count)?;
        non_null("req (output)", req)?;
        // SAFETY: the C contract makes a non-NULL handle a live one.
        let c = unsafe { comm_ref(comm) }?;
        // SAFETY: as in mr_allgather, with the buffers untouched until mr_wait returns.
        let request = unsafe { c.iallgather_raw(send.cast(), recv.cast(), count, t) }?;
        // SAFETY: req checked non-NULL above; valid for one write by the C contract.
        unsafe { give_request(req, request) };
        Ok(())
    })
}

/// Start `mr_reduce_scatter` and return at once; finish with `mr_wait` as for
/// `mr_iallreduce`.
#[no_mangle]
pub unsafe extern "C" fn mr_ireduce_scatter(
    comm: *mut mr_comm,
    send: *const c_void,
    recv: *mut c_void,
    recv_count: usize,
    t: mr_dtype_arg,
    op: mr_op_arg,
    req: *mut *mut mr_request,
) -> mr_result {
    ffi_boundary!("mr_ireduce_scatter", {
        let (t, reduce) = (dtype(t)?, self::op(op)?);
        buffer("send", send, recv_count)?;
        buffer("recv", recv, recv_count)?;
        non_null("req (output)", req)?;
        // SAFETY: the C contract makes a non-NULL handle a live one.
        let c = unsafe { comm_ref(comm) }?;
        // SAFETY: as in mr_reduce_scatter, with the buffers untouched until mr_wait returns.
        let request =
            unsafe { c.ireduce_scatter_raw(send.cast(), recv.cast(), recv_count, t, reduce) }?;
        // SAFETY: req checked non-NULL above; valid for one write by the C contract.
        unsafe { give_request(req, request) };
        Ok(())
    })
}

/// Start `mr_barrier` and return at once; finish with `mr_wait`.
#[no_mangle]
pub unsafe extern "C" fn mr_ibarrier(comm: *mut mr_comm, req: *mut *mut mr_request) -> mr_result {
    ffi_boundary!("mr_ibarrier", {
        non_null("req (output)", req)?;
        // SAFETY: the C contract makes a non-NULL handle a live one.
        let c = unsafe { comm_ref(comm) }?;
        let request = c.ibarrier()?;
        // SAFETY: req checked non-NULL above; valid for one write by the C contract.
        unsafe { give_request(req, request) };
        Ok(())
    })
}

// Rooted collectives and all-to-all. Each start_* checks the arguments and starts the op; the
// blocking export waits for it, the mr_i* export hands the request to C.

/// # Safety
/// The C contract of `mr_reduce`.
unsafe fn start_reduce(
    comm: *mut mr_comm,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    op: mr_op_arg,
    root: c_int,
) -> Result<Request> {
    let (t, reduce) = (dtype(t)?, self::op(op)?);
    buffer("send", send, count)?;
    let root = non_negative("root", root)?;
    // SAFETY: the C contract makes a non-NULL handle a live one.
    let c = unsafe { comm_ref(comm) }?;
    // SAFETY: by the C contract send holds count elements of t, and on the root recv too,
    // untouched by anything else until the op ends (the Comm checks recv on the root).
    unsafe { c.ireduce_raw(send.cast(), recv.cast(), count, t, reduce, root) }
}

/// Reduce every rank's `send` (`count` elements of type `t`) with `op` into `root`'s `recv`
/// (`count` elements; `recv` may equal `send`). Other ranks' `recv` is not used and may be
/// NULL. Runs as an all-reduce, so it uses relays when an all-reduce would. Blocks until done.
#[no_mangle]
pub unsafe extern "C" fn mr_reduce(
    comm: *mut mr_comm,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    op: mr_op_arg,
    root: c_int,
) -> mr_result {
    ffi_boundary!("mr_reduce", {
        // SAFETY: forwarded from this export's C contract.
        unsafe { start_reduce(comm, send, recv, count, t, op, root) }?.wait()
    })
}

/// Start `mr_reduce` and return at once; finish with `mr_wait` as for `mr_iallreduce`.
#[no_mangle]
pub unsafe extern "C" fn mr_ireduce(
    comm: *mut mr_comm,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    op: mr_op_arg,
    root: c_int,
    req: *mut *mut mr_request,
) -> mr_result {
    ffi_boundary!("mr_ireduce", {
        non_null("req (output)", req)?;
        // SAFETY: forwarded from this export's C contract.
        let request = unsafe { start_reduce(comm, send, recv, count, t, op, root) }?;
        // SAFETY: req checked non-NULL above; valid for one write by the C contract.
        unsafe { give_request(req, request) };
        Ok(())
    })
}

/// Which of gather and scatter a start_rooted call starts.
#[derive(Clone, Copy)]
enum Rooted {
    Gather,
    Scatter,
}

/// # Safety
/// The C contract of `mr_gather` or `mr_scatter`.
unsafe fn start_rooted(
    which: Rooted,
    comm: *mut mr_comm,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    root: c_int,
) -> Result<Request> {
    let t = dtype(t)?;
    let root = non_negative("root", root)?;
    // SAFETY: the C contract makes a non-NULL handle a live one.
    let c = unsafe { comm_ref(comm) }?;
    // The Comm checks the buffers the root needs, once it knows whether this rank is the root.
    match which {
        Rooted::Gather => {
            buffer("send", send, count)?;
            // SAFETY: by the C contract the buffers hold what mr_gather says, untouched by
            // anything else until the op ends.
            unsafe { c.igather_raw(send.cast(), recv.cast(), count, t, root) }
        }
        Rooted::Scatter => {
            buffer("recv", recv, count)?;
            // SAFETY: as above, for mr_scatter.
            unsafe { c.iscatter_raw(send.cast(), recv.cast(), count, t, root) }
        }
    }
}

/// Gather `count` elements of type `t` from every rank's `send` into `root`'s `recv`, which
/// holds `count × size` elements in rank order (the root's `send` may be its own slot of
/// `recv`). Other ranks' `recv` is not used and may be NULL. Blocks until done.
#[no_mangle]
pub unsafe extern "C" fn mr_gather(
    comm: *mut mr_comm,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    root: c_int,
) -> mr_result {
    ffi_boundary!("mr_gather", {
        // SAFETY: forwarded from this export's C contract.
        unsafe { start_rooted(Rooted::Gather, comm, send, recv, count, t, root) }?.wait()
    })
}

/// Start `mr_gather` and return at once; finish with `mr_wait` as for `mr_iallreduce`.
#[no_mangle]
pub unsafe extern "C" fn mr_igather(
    comm: *mut mr_comm,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    root: c_int,
    req: *mut *mut mr_request,
) -> mr_result {
    ffi_boundary!("mr_igather", {
        non_null("req (output)", req)?;
        // SAFETY: forwarded from this export's C contract.
        let request = unsafe { start_rooted(Rooted::Gather, comm, send, recv, count, t, root) }?;
        // SAFETY: req checked non-NULL above; valid for one write by the C contract.
        unsafe { give_request(req, request) };
        Ok(())
    })
}

/// Scatter `root`'s `send` (`count × size` elements of type `t`): rank r's `recv` gets block
/// r (`count` elements; the root's `recv` may be its own block of `send`). Other ranks' `send`
/// is not used and may be NULL. Blocks until done.
#[no_mangle]
pub unsafe extern "C" fn mr_scatter(
    comm: *mut mr_comm,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    root: c_int,
) -> mr_result {
    ffi_boundary!("mr_scatter", {
        // SAFETY: forwarded from this export's C contract.
        unsafe { start_rooted(Rooted::Scatter, comm, send, recv, count, t, root) }?.wait()
    })
}

/// Start `mr_scatter` and return at once; finish with `mr_wait` as for `mr_iallreduce`.
#[no_mangle]
pub unsafe extern "C" fn mr_iscatter(
    comm: *mut mr_comm,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    root: c_int,
    req: *mut *mut mr_request,
) -> mr_result {
    ffi_boundary!("mr_iscatter", {
        non_null("req (output)", req)?;
        // SAFETY: forwarded from this export's C contract.
        let request = unsafe { start_rooted(Rooted::Scatter, comm, send, recv, count, t, root) }?;
        // SAFETY: req checked non-NULL above; valid for one write by the C contract.
        unsafe { give_request(req, request) };
        Ok(())
    })
}

/// # Safety
/// The C contract of `mr_alltoall`.
unsafe fn start_alltoall(
    comm: *mut mr_comm,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
) -> Result<Request> {
    let t = dtype(t)?;
    buffer("send", send, count)?;
    buffer("recv", recv, count)?;
    // SAFETY: the C contract makes a non-NULL handle a live one.
    let c = unsafe { comm_ref(comm) }?;
    // SAFETY: by the C contract both hold count × size elements of t, do not overlap, and
    // stay untouched by anything else until the op ends.
    unsafe { c.ialltoall_raw(send.cast(), recv.cast(), count, t) }
}

/// Every rank sends block p (`count` elements of type `t`) of its `send` to rank p, which
/// stores the block from rank r as block r of its `recv`; both hold `count × size` elements
/// and must not overlap. Blocks until done.
#[no_mangle]
pub unsafe extern "C" fn mr_alltoall(
    comm: *mut mr_comm,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
) -> mr_result {
    ffi_boundary!("mr_alltoall", {
        // SAFETY: forwarded from this export's C contract.
        unsafe { start_alltoall(comm, send, recv, count, t) }?.wait()
    })
}

/// Start `mr_alltoall` and return at once; finish with `mr_wait` as for `mr_iallreduce`.
#[no_mangle]
pub unsafe extern "C" fn mr_ialltoall(
    comm: *mut mr_comm,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    req: *mut *mut mr_request,
) -> mr_result {
    ffi_boundary!("mr_ialltoall", {
        non_null("req (output)", req)?;
        // SAFETY: forwarded from this export's C contract.
        let request = unsafe { start_alltoall(comm, send, recv, count, t) }?;
        // SAFETY: req checked non-NULL above; valid for one write by the C contract.
        unsafe { give_request(req, request) };
        Ok(())
    })
}

/// # Safety
/// The C contract of `mr_alltoallv`.
#[allow(clippy::too_many_arguments)]
unsafe fn start_alltoallv(
    comm: *mut mr_comm,
    send: *const c_void,
    send_counts: *const usize,
    send_displs: *const usize,
    recv: *mut c_void,
    recv_counts: *const usize,
    recv_displs: *const usize,
    t: mr_dtype_arg,
) -> Result<Request> {
    let t = dtype(t)?;
    non_null("send_counts", send_counts)?;
    non_null("send_displs", send_displs)?;
    non_null("recv_counts", recv_counts)?;
    non_null("recv_displs", recv_displs)?;
    // SAFETY: the C contract makes a non-NULL handle a live one.
    let c = unsafe { comm_ref(comm) }?;
    let n = c.size();
    // SAFETY: non-NULL, and by the C contract each array holds one entry per rank.
    let (sc, sd, rc, rd) = unsafe {
        (
            std::slice::from_raw_parts(send_counts, n),
            std::slice::from_raw_parts(send_displs, n),
            std::slice::from_raw_parts(recv_counts, n),
            std::slice::from_raw_parts(recv_displs, n),
        )
    };
    // SAFETY: by the C contract the buffers hold the ranges the arrays name, untouched by
    // anything else until the op ends; the Comm checks NULL against those ranges.
    unsafe { c.ialltoallv_raw(send.cast(), sc, sd, recv.cast(), rc, rd, t) }
}

/// All-to-all with per-rank counts: `send_counts[p]` elements of type `t` at element offset
/// `send_displs[p]` of `send` go to rank p, and `recv_counts[p]` elements from rank p land at
/// `recv_displs[p]` of `recv` (each array has one entry per rank). Rank p's `send_counts[r]`
/// must equal rank r's `recv_counts[p]`: a mismatch fails the op on both ranks with
/// `MR_ERR_INVALID_ARGUMENT`. Ranges of `recv` must not overlap each other or `send`. Blocks
/// until done.
#[no_mangle]
pub unsafe extern "C" fn mr_alltoallv(
    comm: *mut mr_comm,
    send: *const c_void,
    send_counts: *const usize,
    send_displs: *const usize,
    recv: *mut c_void,
    recv_counts: *const usize,
    recv_displs: *const usize,
    t: mr_dtype_arg,
) -> mr_result {
    ffi_boundary!("mr_alltoallv", {
        // SAFETY: forwarded from this export's C contract.
        unsafe {
            start_alltoallv(
                comm,
                send,
                send_counts,
                send_displs,
                recv,
                recv_counts,
                recv_displs,
                t,
            )
        }?
        .wait()
    })
}

/// Start `mr_alltoallv` and return at once; finish with `mr_wait` as for `mr_iallreduce`. The
/// count and displacement arrays are read before this returns.
#[no_mangle]
pub unsafe extern "C" fn mr_ialltoallv(
    comm: *mut mr_comm,
    send: *const c_void,
    send_counts: *const usize,
    send_displs: *const usize,
    recv: *mut c_void,
    recv_counts: *const usize,
    recv_displs: *const usize,
    t: mr_dtype_arg,
    req: *mut *mut mr_request,
) -> mr_result {
    ffi_boundary!("mr_ialltoallv", {
        non_null("req (output)", req)?;
        // SAFETY: forwarded from this export's C contract.
        let request = unsafe {
            start_alltoallv(
                comm,
                send,
                send_counts,
                send_displs,
                recv,
                recv_counts,
                recv_displs,
                t,
            )
        }?;
        // SAFETY: req checked non-NULL above; valid for one write by the C contract.
        unsafe { give_request(req, request) };
        Ok(())
    })
}

// Point-to-point and groups. A group is per thread, as with ncclGroupStart/ncclGroupEnd:
// sends and receives issued between mr_group_start and the outermost mr_group_end are recorded
// (after their arguments are checked) and go out at mr_group_end as one op per communicator.

/// A send or receive recorded in the open group.
struct Grouped {
    comm: *mut mr_comm,
    call: P2pCall,
    /// Shared by every call of this communicator in the group: their requests end together.
    done: Arc<Completion>,
    /// Issued with the blocking form: mr_group_end waits for it.
    blocking: bool,
}

#[derive(Default)]
struct Group {
    depth: usize,
    calls: Vec<Grouped>,
}

thread_local! {
    static GROUP: RefCell<Group> = RefCell::new(Group::default());
}

/// Check and then start (outside a group) or record (inside one) a send or receive. Returns
/// the request to hand out; `None` when the call was recorded with the blocking form.
///
/// # Safety
/// The C contract of `mr_send`/`mr_recv`.
#[allow(clippy::too_many_arguments)]
unsafe fn start_p2p(
    comm: *mut mr_comm,
    send: bool,
    buf: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    peer: c_int,
    tag: c_int,
    blocking: bool,
) -> Result<Option<Request>> {
    let dtype = dtype(t)?;
    buffer("buf", buf, count)?;
    let peer = non_negative("peer", peer)?;
    let tag = u32::try_from(non_negative("tag", tag)?).expect("c_int fits u32");
    // SAFETY: the C contract makes a non-NULL handle a live one.
    let c = unsafe { comm_ref(comm) }?;
    let call = P2pCall {
        send,
        peer,
        tag,
        buf: buf.cast(),
        count,
        dtype,
    };
    c.check_p2p(&call)?;
    let grouped = GROUP.with(|g| {
        let mut g = g.borrow_mut();
        if g.depth == 0 {
            return None;
        }
        let done = g
            .calls
            .iter()
            .find(|e| e.comm == comm)
            .map_or_else(|| Arc::new(Completion::default()), |e| e.done.clone());
        g.calls.push(Grouped {
            comm,
            call,
            done: done.clone(),
            blocking,
        });
        Some(done)
    });
    match grouped {
        Some(done) if blocking => {
            drop(done);
            Ok(None)
        }
        Some(done) => Ok(Some(Request::new(done))),
        // SAFETY: by the C contract buf holds count elements of t, untouched by anything else
        // until the op ends.
        None => unsafe { c.submit_p2p(&[call], Arc::new(Completion::default())) }.map(Some),
    }
}

/// Send `count` elements of type `t` from `buf` to rank `peer` with tag `tag` (non-negative).
/// The matching `mr_recv` on `peer` must name this rank and the same tag, count and type:
/// messages between two ranks are matched in the order they are called, and a receive that
/// disagrees fails naming both sides. Blocks until sent, except inside a group
/// (`mr_group_start`), where it is sent by `mr_group_end`. Point-to-point calls do not affect
/// the order in which collectives are matched.
#[no_mangle]
pub unsafe extern "C" fn mr_send(
    comm: *mut mr_comm,
    buf: *const c_void,
    count: usize,
    t: mr_dtype_arg,
    peer: c_int,
    tag: c_int,
) -> mr_result {
    ffi_boundary!("mr_send", {
        // SAFETY: forwarded from this export's C contract; a send only reads buf.
        match unsafe { start_p2p(comm, true, buf as *mut c_void, count, t, peer, tag, true) }? {
            Some(request) => request.wait(),
            None => Ok(()),
        }
    })
}

/// Receive `count` elements of type `t` into `buf` from rank `peer`, sent with tag `tag`.
/// Blocks until received, except inside a group, where `mr_group_end` receives it.
#[no_mangle]
pub unsafe extern "C" fn mr_recv(
    comm: *mut mr_comm,
    buf: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    peer: c_int,
    tag: c_int,
) -> mr_result {
    ffi_boundary!("mr_recv", {
        // SAFETY: forwarded from this export's C contract.
        match unsafe { start_p2p(comm, false, buf, count, t, peer, tag, true) }? {
            Some(request) => request.wait(),
            None => Ok(()),
        }
    })
}

/// Start `mr_send` and return at once; finish with `mr_wait`. Inside a group the request
/// ends with the group's op, which starts at `mr_group_end`.
#[no_mangle]
pub unsafe extern "C" fn mr_isend(
    comm: *mut mr_comm,
    buf: *const c_void,
    count: usize,
    t: mr_dtype_arg,
    peer: c_int,
    tag: c_int,
    req: *mut *mut mr_request,
) -> mr_result {
    ffi_boundary!("mr_isend", {
        non_null("req (output)", req)?;
        // SAFETY: forwarded from this export's C contract; a send only reads buf.
        let request =
            unsafe { start_p2p(comm, true, buf as *mut c_void, count, t, peer, tag, false) }?
                .ok_or_else(|| Error::internal("mr_isend recorded without a request"))?;
        // SAFETY: req checked non-NULL above; valid for one write by the C contract.
        unsafe { give_request(req, request) };
        Ok(())
    })
}

/// Start `mr_recv` and return at once; finish with `mr_wait`, as for `mr_isend`.
#[no_mangle]
pub unsafe extern "C" fn mr_irecv(
    comm: *mut mr_comm,
    buf: *mut c_void,
    count: usize,
    t: mr_dtype_arg,
    peer: c_int,
    tag: c_int,
    req: *mut *mut mr_request,
) -> mr_result {
    ffi_boundary!("mr_irecv", {
        non_null("req (output)", req)?;
        // SAFETY: forwarded from this export's C contract.
        let request = unsafe { start_p2p(comm, false, buf, count, t, peer, tag, false) }?
            .ok_or_else(|| Error::internal("mr_irecv recorded without a request"))?;
        // SAFETY: req checked non-NULL above; valid for one write by the C contract.
        unsafe { give_request(req, request) };
        Ok(())
    })
}

/// Open a group on this thread: sends and receives issued until the matching `mr_group_end`
/// go out together, as one op per communicator, so a ring or any exchange of messages cannot
/// deadlock. Groups nest; only the outermost `mr_group_end` sends. Collectives issued inside
/// a group run as usual.
#[no_mangle]
pub extern "C" fn mr_group_start() -> mr_result {
    ffi_boundary!("mr_group_start", {
        GROUP.with(|g| g.borrow_mut().depth += 1);
        Ok(())
    })
}

/// Close the group opened by `mr_group_start`. The outermost one starts the recorded sends and
/// receives and, if any was issued with the blocking `mr_send`/`mr_recv`, waits for them; the
/// requests of `mr_isend`/`mr_irecv` end with their communicator's group. On error the calls
/// that could not start fail their requests too.
#[no_mangle]
pub extern "C" fn mr_group_end() -> mr_result {
    ffi_boundary!("mr_group_end", {
        let calls = GROUP.with(|g| {
            let mut g = g.borrow_mut();
            if g.depth == 0 {
                return Err(Error::invalid("mr_group_end without mr_group_start"));
            }
            g.depth -= 1;
            Ok(if g.depth == 0 {
                std::mem::take(&mut g.calls)
            } else {
                Vec::new()
            })
        })?;
        // One op per communicator, in the order the communicators first appear.
        let mut comms: Vec<*mut mr_comm> = Vec::new();
        for e in &calls {
            if !comms.contains(&e.comm) {
                comms.push(e.comm);
            }
        }
        let mut first_error = None;
        let mut waits = Vec::new();
        for comm in comms {
            let mine: Vec<&Grouped> = calls.iter().filter(|e| e.comm == comm).collect();
            let done = mine[0].done.clone();
            let list: Vec<P2pCall> = mine.iter().map(|e| e.call).collect();
            // SAFETY: the handle was live when recorded and, by the C contract, still is; the
            // buffers stay untouched until the group's requests end.
            let started = unsafe { comm_ref(comm) }
                .and_then(|c| unsafe { c.submit_p2p(&list, done.clone()) });
            match started {
                Ok(request) => {
                    if mine.iter().any(|e| e.blocking) {
                        waits.push(request);
                    }
                }
                Err(e) => {
                    done.complete(Err(e.clone()));
                    first_error.get_or_insert(e);
                }
            }
        }
        for request in waits {
            if let Err(e) = request.wait() {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })
}

/// Block until the request's operation completes, free the request (also when the operation
/// failed) and return the operation's result.
#[no_mangle]
pub unsafe extern "C" fn mr_wait(req: *mut mr_request) -> mr_result {
    ffi_boundary!("mr_wait", {
        non_null("req", req)?;
        // SAFETY: a live request from Box::into_raw in give_request; the C contract says it is
        // waited on once, so ownership comes back here and the box is dropped on return.
        let owned = unsafe { Box::from_raw(req) };
        owned.inner.wait()
    })
}

/// Poll a request without blocking: `*done` becomes 1 when its operation completed
/// successfully, 0 while it runs. When the operation failed, returns its error and leaves
/// `*done` untouched. The request stays valid either way; free it with `mr_wait`.
#[no_mangle]
pub unsafe extern "C" fn mr_test(req: *mut mr_request, done: *mut c_int) -> mr_result {
    ffi_boundary!("mr_test", {
        non_null("req", req)?;
        non_null("done (output)", done)?;
        // SAFETY: a live request by the C contract; only shared access is taken.
        let request = unsafe { &(*req).inner };
        let finished = request.test()?;
        // SAFETY: non-NULL and, by the C contract, valid for writing one int.
        unsafe { done.write(c_int::from(finished)) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_maps_to_its_own_code() {
        for raw in 1u8..=8 {
            let kind = ErrorKind::from_u8(raw);
            assert_eq!(mr_result::from_kind(kind) as u32, u32::from(raw));
        }
    }

    #[test]
    fn a_panic_becomes_an_internal_error_with_its_message() {
        let r: mr_result = run_boundary("mr_test_panic", || -> Result<()> {
            panic!("kernel index {} out of range", 7)
        });
        assert_eq!(r, mr_result::MR_ERR_INTERNAL);
        let msg = LAST_ERROR.with(|m| m.borrow().to_string_lossy().into_owned());
        assert_eq!(msg, "mr_test_panic: panicked: kernel index 7 out of range");
    }

    #[test]
    fn a_panic_in_a_string_export_returns_an_empty_string() {
        let p: *const c_char = run_boundary("mr_version", || -> *const c_char { panic!("boom") });
        // SAFETY: run_boundary returned a pointer to a static C string.
        assert_eq!(unsafe { CStr::from_ptr(p) }.to_bytes(), b"");
    }

    #[test]
    fn interior_nul_in_a_message_is_shown_not_truncating() {
        let r: mr_result = run_boundary("mr_x", || Err(Error::invalid("a\0b")));
        assert_eq!(r, mr_result::MR_ERR_INVALID_ARGUMENT);
        let msg = LAST_ERROR.with(|m| m.borrow().to_string_lossy().into_owned());
        assert_eq!(msg, "mr_x: a\\0b");
    }

    #[test]
    fn unique_id_bytes_round_trip() {
        let mut bytes = [0u8; 256];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = i as u8;
        }
        let back = mr_unique_id::from_id(&UniqueId(bytes)).to_id();
        assert_eq!(back.0, bytes);
    }
}

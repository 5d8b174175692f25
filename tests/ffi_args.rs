//! Argument checks of the C ABI that need no running communicator: every export rejects
//! NULL handles, NULL buffers with elements, NULL outputs and out-of-range enum values with
//! `MR_ERR_INVALID_ARGUMENT`, names the culprit in `mr_last_error()`, and writes no output.

use mapreduce::ffi::*;
use std::ffi::{c_int, c_void, CStr};
use std::ptr::{null, null_mut};

const INVALID: mr_result = mr_result::MR_ERR_INVALID_ARGUMENT;
const F32: u32 = mr_dtype::MR_FLOAT32 as u32;
const SUM: u32 = mr_op::MR_SUM as u32;

fn last_error() -> String {
    // SAFETY: mr_last_error never returns NULL and the string lives until the next call.
    unsafe { CStr::from_ptr(mr_last_error()) }
        .to_str()
        .expect("UTF-8")
        .to_owned()
}

fn result_string(raw: u32) -> String {
    // SAFETY: mr_result_string returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(mr_result_string(raw)) }
        .to_str()
        .expect("UTF-8")
        .to_owned()
}

/// Assert an invalid-argument failure whose message is exactly `message`.
#[track_caller]
fn assert_invalid(r: mr_result, message: &str) {
    assert_eq!(r, INVALID, "last error: {}", last_error());
    assert_eq!(last_error(), message);
}

fn some_buf() -> *mut c_void {
    // Only ever checked for NULL: every call below fails before touching memory.
    std::ptr::NonNull::<f32>::dangling().as_ptr().cast()
}

#[test]
fn null_comm_is_rejected_by_every_op() {
    let buf = some_buf();
    let mut req: *mut mr_request = null_mut();
    let mut v: c_int = -7;
    // SAFETY: every call gets a NULL communicator and fails before using any pointer.
    unsafe {
        assert_invalid(
            mr_allreduce(null_mut(), buf, 4, F32, SUM),
            "mr_allreduce: comm is NULL",
        );
        assert_invalid(
            mr_broadcast(null_mut(), buf, 4, F32, 0),
            "mr_broadcast: comm is NULL",
        );
        assert_invalid(
            mr_allgather(null_mut(), buf, buf, 4, F32),
            "mr_allgather: comm is NULL",
        );
        assert_invalid(
            mr_reduce_scatter(null_mut(), buf, buf, 4, F32, SUM),
            "mr_reduce_scatter: comm is NULL",
        );
        assert_invalid(mr_barrier(null_mut()), "mr_barrier: comm is NULL");
        assert_invalid(
            mr_iallreduce(null_mut(), buf, 4, F32, SUM, &mut req),
            "mr_iallreduce: comm is NULL",
        );
        assert_invalid(
            mr_ibroadcast(null_mut(), buf, 4, F32, 0, &mut req),
            "mr_ibroadcast: comm is NULL",
        );
        assert_invalid(
            mr_iallgather(null_mut(), buf, buf, 4, F32, &mut req),
            "mr_iallgather: comm is NULL",
        );
        assert_invalid(
            mr_ireduce_scatter(null_mut(), buf, buf, 4, F32, SUM, &mut req),
            "mr_ireduce_scatter: comm is NULL",
        );
        assert_invalid(
            mr_ibarrier(null_mut(), &mut req),
            "mr_ibarrier: comm is NULL",
        );
        let counts = [1usize; 2];
        let (c, d) = (counts.as_ptr(), counts.as_ptr());
        assert_invalid(
            mr_reduce(null_mut(), buf, buf, 4, F32, SUM, 0),
            "mr_reduce: comm is NULL",
        );
        assert_invalid(
            mr_gather(null_mut(), buf, buf, 4, F32, 0),
            "mr_gather: comm is NULL",
        );
        assert_invalid(
            mr_scatter(null_mut(), buf, buf, 4, F32, 0),
            "mr_scatter: comm is NULL",
        );
        assert_invalid(
            mr_alltoall(null_mut(), buf, buf, 4, F32),
            "mr_alltoall: comm is NULL",
        );
        assert_invalid(
            mr_ireduce(null_mut(), buf, buf, 4, F32, SUM, 0, &mut req),
            "mr_ireduce: comm is NULL",
        );
        assert_invalid(
            mr_igather(null_mut(), buf, buf, 4, F32, 0, &mut req),
            "mr_igather: comm is NULL",
        );
        assert_invalid(
            mr_iscatter(null_mut(), buf, buf, 4, F32, 0, &mut req),
            "mr_iscatter: comm is NULL",
        );
        assert_invalid(
            mr_ialltoall(null_mut(), buf, buf, 4, F32, &mut req),
            "mr_ialltoall: comm is NULL",
        );
        assert_invalid(
            mr_alltoallv(null_mut(), buf, c, d, buf, c, d, F32),
            "mr_alltoallv: comm is NULL",
        );
        assert_invalid(
            mr_ialltoallv(null_mut(), buf, c, d, buf, c, d, F32, &mut req),
            "mr_ialltoallv: comm is NULL",
        );
        assert_invalid(
            mr_send(null_mut(), buf, 4, F32, 1, 0),
            "mr_send: comm is NULL",
        );
        assert_invalid(
            mr_recv(null_mut(), buf, 4, F32, 1, 0),
            "mr_recv: comm is NULL",
        );
        assert_invalid(
            mr_isend(null_mut(), buf, 4, F32, 1, 0, &mut req),
            "mr_isend: comm is NULL",
        );
        assert_invalid(
            mr_irecv(null_mut(), buf, 4, F32, 1, 0, &mut req),
            "mr_irecv: comm is NULL",
        );
        assert_invalid(mr_comm_abort(null_mut()), "mr_comm_abort: comm is NULL");
        assert_invalid(mr_comm_rank(null(), &mut v), "mr_comm_rank: comm is NULL");
        assert_invalid(mr_comm_size(null(), &mut v), "mr_comm_size: comm is NULL");
    }
    assert!(req.is_null(), "a failed call wrote its request output");
    assert_eq!(v, -7, "a failed call wrote its output");
}

#[test]
fn null_buffer_with_elements_is_rejected() {
    let buf = some_buf();
    let mut req: *mut mr_request = null_mut();
    // SAFETY: every call fails on a NULL buffer before using any pointer.
    unsafe {
        assert_invalid(
            mr_allreduce(null_mut(), null_mut(), 3, F32, SUM),
            "mr_allreduce: buf is NULL but count is 3",
        );
        assert_invalid(
            mr_broadcast(null_mut(), null_mut(), 1, F32, 0),
            "mr_broadcast: buf is NULL but count is 1",
        );
        assert_invalid(
            mr_allgather(null_mut(), null(), buf, 5, F32),
            "mr_allgather: send is NULL but count is 5",
        );
        assert_invalid(
            mr_allgather(null_mut(), buf, null_mut(), 5, F32),
            "mr_allgather: recv is NULL but count is 5",
        );
        assert_invalid(
            mr_reduce_scatter(null_mut(), null(), buf, 2, F32, SUM),
            "mr_reduce_scatter: send is NULL but count is 2",
        );
        assert_invalid(
            mr_reduce_scatter(null_mut(), buf, null_mut(), 2, F32, SUM),
            "mr_reduce_scatter: recv is NULL but count is 2",
        );
        assert_invalid(
            mr_iallreduce(null_mut(), null_mut(), 8, F32, SUM, &mut req),
            "mr_iallreduce: buf is NULL but count is 8",
        );
        assert_invalid(
            mr_ibroadcast(null_mut(), null_mut(), 8, F32, 0, &mut req),
            "mr_ibroadcast: buf is NULL but count is 8",
        );
        assert_invalid(
            mr_iallgather(null_mut(), buf, null_mut(), 8, F32, &mut req),
            "mr_iallgather: recv is NULL but count is 8",
        );
        assert_invalid(
            mr_ireduce_scatter(null_mut(), null(), buf, 8, F32, SUM, &mut req),
            "mr_ireduce_scatter: send is NULL but count is 8",
        );
    }
    assert!(req.is_null());
}

#[test]
fn null_buffer_with_no_elements_passes_the_buffer_check() {
    // With count 0 a NULL buffer is fine, so the first problem found is the NULL handle.
    // SAFETY: fails on the NULL communicator without dereferencing anything.
    unsafe {
        assert_invalid(
            mr_allreduce(null_mut(), null_mut(), 0, F32, SUM),
            "mr_allreduce: comm is NULL",
        );
        assert_invalid(
            mr_allgather(null_mut(), null(), null_mut(), 0, F32),
            "mr_allgather: comm is NULL",
        );
    }
}

#[test]
fn out_of_range_dtype_and_op_are_rejected() {
    let buf = some_buf();
    let mut req: *mut mr_request = null_mut();
    // u32::MAX is what a C caller passing (mr_dtype)-1 produces.
    for bad in [8u32, 9, 255, 256, u32::MAX] {
        // SAFETY: every call fails on the enum value before using any pointer.
        unsafe {
            assert_invalid(
                mr_allreduce(null_mut(), buf, 4, bad, SUM),
                &format!("mr_allreduce: mr_dtype: dtype value {bad} is out of range (0..=7)"),
            );
            assert_invalid(
                mr_broadcast(null_mut(), buf, 4, bad, 0),
                &format!("mr_broadcast: mr_dtype: dtype value {bad} is out of range (0..=7)"),
            );
            assert_eq!(mr_allgather(null_mut(), buf, buf, 4, bad), INVALID);
            assert_eq!(
                mr_reduce_scatter(null_mut(), buf, buf, 4, bad, SUM),
                INVALID
            );
            assert_eq!(
                mr_iallreduce(null_mut(), buf, 4, bad, SUM, &mut req),
                INVALID
            );
            assert_eq!(mr_ibroadcast(null_mut(), buf, 4, bad, 0, &mut req), INVALID);
            assert_eq!(
                mr_iallgather(null_mut(), buf, buf, 4, bad, &mut req),
                INVALID
            );
            assert_eq!(
                mr_ireduce_scatter(null_mut(), buf, buf, 4, bad, SUM, &mut req),
                INVALID
            );
            assert!(last_error().contains("mr_dtype"), "{}", last_error());
        }
    }
    for bad in [5u32, 6, 1000, u32::MAX] {
        // SAFETY: as above.
        unsafe {
            assert_invalid(
                mr_allreduce(null_mut(), buf, 4, F32, bad),
                &format!("mr_allreduce: mr_op: reduction op value {bad} is out of range (0..=4)"),
            );
            assert_eq!(
                mr_reduce_scatter(null_mut(), buf, buf, 4, F32, bad),
                INVALID
            );
            assert_eq!(
                mr_iallreduce(null_mut(), buf, 4, F32, bad, &mut req),
                INVALID
            );
            assert_eq!(
                mr_ireduce_scatter(null_mut(), buf, buf, 4, F32, bad, &mut req),
                INVALID
            );
            assert!(last_error().contains("mr_op"), "{}", last_error());
        }
    }
    assert!(req.is_null());
}

#[test]
fn every_valid_dtype_and_op_passes_the_enum_check() {
    for t in 0..=7u32 {
        for op in 0..=4u32 {
            // SAFETY: fails on the NULL communicator without dereferencing anything.
            let r = unsafe { mr_allreduce(null_mut(), some_buf(), 1, t, op) };
            assert_invalid(r, "mr_allreduce: comm is NULL");
        }
    }
}

#[test]
fn negative_ranks_and_roots_are_rejected() {
    let buf = some_buf();
    let mut req: *mut mr_request = null_mut();
    // SAFETY: each call fails on the negative root before using any pointer.
    unsafe {
        assert_invalid(
            mr_broadcast(null_mut(), buf, 1, F32, -1),
            "mr_broadcast: root -1 is negative",
        );
        assert_invalid(
            mr_ibroadcast(null_mut(), buf, 1, F32, -3, &mut req),
            "mr_ibroadcast: root -3 is negative",
        );
    }
    assert!(req.is_null());
}

#[test]
fn null_outputs_are_rejected_before_anything_starts() {
    let buf = some_buf();
    // SAFETY: every call fails on the NULL output before using any other pointer.
    unsafe {
        assert_invalid(
            mr_iallreduce(null_mut(), buf, 1, F32, SUM, null_mut()),
            "mr_iallreduce: req (output) is NULL",
        );
        assert_invalid(
            mr_ibroadcast(null_mut(), buf, 1, F32, 0, null_mut()),
            "mr_ibroadcast: req (output) is NULL",
        );
        assert_invalid(
            mr_iallgather(null_mut(), buf, buf, 1, F32, null_mut()),
            "mr_iallgather: req (output) is NULL",
        );
        assert_invalid(
            mr_ireduce_scatter(null_mut(), buf, buf, 1, F32, SUM, null_mut()),
            "mr_ireduce_scatter: req (output) is NULL",
        );
        assert_invalid(
            mr_ibarrier(null_mut(), null_mut()),
            "mr_ibarrier: req (output) is NULL",
        );
        assert_invalid(
            mr_comm_rank(null(), null_mut()),
            "mr_comm_rank: rank (output) is NULL",
        );
        assert_invalid(
            mr_comm_size(null(), null_mut()),
            "mr_comm_size: size (output) is NULL",
        );
        assert_invalid(mr_get_unique_id(null_mut()), "mr_get_unique_id: id is NULL");
        assert_invalid(
            mr_comm_init_env(null_mut()),
            "mr_comm_init_env: comm (output) is NULL",
        );
    }
}

#[test]
fn requests_must_not_be_null() {
    let mut done: c_int = -1;
    // SAFETY: NULL requests are rejected before any dereference.
    unsafe {
        assert_invalid(mr_wait(null_mut()), "mr_wait: req is NULL");
        assert_invalid(mr_test(null_mut(), &mut done), "mr_test: req is NULL");
    }
    assert_eq!(done, -1);
}

#[test]
fn comm_init_rank_checks_its_arguments() {
    let id = mr_unique_id { internal: [0; 256] };
    let sentinel = std::ptr::NonNull::<mr_comm>::dangling().as_ptr();
    let mut comm = sentinel;
    // SAFETY: each call fails on its arguments before reading the id or writing the output.
    unsafe {
        assert_invalid(
            mr_comm_init_rank(null_mut(), 2, &id, 0),
            "mr_comm_init_rank: comm (output) is NULL",
        );
        assert_invalid(
            mr_comm_init_rank(&mut comm, 2, null(), 0),
            "mr_comm_init_rank: id is NULL",
        );
        assert_invalid(
            mr_comm_init_rank(&mut comm, 0, &id, 0),
            "mr_comm_init_rank: nranks must be at least 1",
        );
        assert_invalid(
            mr_comm_init_rank(&mut comm, -4, &id, 0),
            "mr_comm_init_rank: nranks -4 is negative",
        );
        assert_invalid(
            mr_comm_init_rank(&mut comm, 4, &id, -1),
            "mr_comm_init_rank: rank -1 is negative",
        );
        assert_invalid(
            mr_comm_init_rank(&mut comm, 4, &id, 4),
            "mr_comm_init_rank: rank 4 is out of range for nranks 4",
        );
    }
    assert_eq!(comm, sentinel, "a failed init wrote its output");
}

#[test]
fn destroying_null_is_a_no_op() {
    // SAFETY: NULL is documented as accepted.
    assert_eq!(unsafe { mr_comm_destroy(null_mut()) }, mr_result::MR_OK);
}

#[test]
fn result_strings_cover_every_code() {
    let expected = [
        (mr_result::MR_OK, "success"),
        (mr_result::MR_ERR_INVALID_ARGUMENT, "invalid argument"),
        (mr_result::MR_ERR_SYSTEM, "system error"),
        (mr_result::MR_ERR_TIMEOUT, "timed out"),
        (mr_result::MR_ERR_REMOTE, "remote error"),
        (mr_result::MR_ERR_AUTH, "authentication failed"),
        (mr_result::MR_ERR_ABORTED, "aborted"),
        (mr_result::MR_ERR_VERIFY, "verification failed"),
        (mr_result::MR_ERR_INTERNAL, "internal error"),
    ];
    for (i, (code, text)) in expected.iter().enumerate() {
        assert_eq!(*code as u32, i as u32, "codes are consecutive from 0");
        assert_eq!(result_string(*code as u32), *text);
    }
    for unknown in [9u32, 100, u32::MAX] {
        assert_eq!(result_string(unknown), "unknown result code");
    }
}

#[test]
fn error_kinds_and_result_codes_agree() {
    use mapreduce::ErrorKind;
    for raw in 1u8..=8 {
        let kind = ErrorKind::from_u8(raw);
        assert_eq!(mr_result::from_kind(kind) as u32, u32::from(raw));
        assert_eq!(
            result_string(u32::from(raw)),
            kind.name(),
            "C and Rust names agree"
        );
    }
}

#[test]
fn last_error_is_reset_by_a_successful_call_but_not_by_string_getters() {
    // SAFETY: fails on the NULL handle.
    assert_eq!(unsafe { mr_barrier(null_mut()) }, INVALID);
    assert_eq!(last_error(), "mr_barrier: comm is NULL");
    // Reading the code's name or the version in between keeps the message.
    assert_eq!(result_string(INVALID as u32), "invalid argument");
    // SAFETY: static string.
    let version = unsafe { CStr::from_ptr(mr_version()) };
    assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    assert_eq!(last_error(), "mr_barrier: comm is NULL");
    // A successful call clears it.
    // SAFETY: NULL is accepted.
    assert_eq!(unsafe { mr_comm_destroy(null_mut()) }, mr_result::MR_OK);
    assert_eq!(last_error(), "");
}

#[test]
fn last_error_is_per_thread() {
    // SAFETY: fails on the NULL handle.
    assert_eq!(unsafe { mr_barrier(null_mut()) }, INVALID);
    let other = std::thread::spawn(|| {
        let before = last_error();
        // SAFETY: fails on the NULL output.
        let r = unsafe { mr_get_unique_id(null_mut()) };
        (before, r, last_error())
    })
    .join()
    .unwrap();
    assert_eq!(
        other,
        (
            String::new(),
            INVALID,
            "mr_get_unique_id: id is NULL".to_string()
        )
    );
    assert_eq!(last_error(), "mr_barrier: comm is NULL");
}

#[test]
fn compressed_allreduce_checks_its_arguments() {
    let buf = some_buf();
    let mut req: *mut mr_request = null_mut();
    let int8 = mr_compress::MR_COMPRESS_INT8 as u32;
    // SAFETY: every call fails on an argument check before using any pointer.
    unsafe {
        for bad in [4u32, 16, u32::MAX] {
            assert_invalid(
                mr_allreduce_compressed(null_mut(), buf, 4, F32, SUM, bad),
                &format!("mr_allreduce_compressed: mr_compress: {bad} is not a compression"),
            );
            assert_eq!(
                mr_iallreduce_compressed(null_mut(), buf, 4, F32, SUM, bad, &mut req),
                INVALID
            );
        }
        assert_invalid(
            mr_allreduce_compressed(null_mut(), buf, 4, F32, SUM, int8),
            "mr_allreduce_compressed: comm is NULL",
        );
        assert_invalid(
            mr_iallreduce_compressed(null_mut(), null_mut(), 8, F32, SUM, int8, &mut req),
            "mr_iallreduce_compressed: buf is NULL but count is 8",
        );
        assert_invalid(
            mr_iallreduce_compressed(null_mut(), buf, 1, F32, SUM, int8, null_mut()),
            "mr_iallreduce_compressed: req (output) is NULL",
        );
        assert_eq!(
            mr_allreduce_compressed(null_mut(), buf, 4, 99, SUM, int8),
            INVALID
        );
    }
    assert!(req.is_null());
}

#[test]
fn layout_queries_check_their_arguments() {
    let mut v: c_int = -7;
    // SAFETY: every call fails on the NULL handle before writing.
    unsafe {
        assert_invalid(
            mr_comm_local_rank(null(), &mut v),
            "mr_comm_local_rank: comm is NULL",
        );
        assert_invalid(
            mr_comm_local_size(null(), &mut v),
            "mr_comm_local_size: comm is NULL",
        );
        assert_invalid(
            mr_comm_host_count(null(), &mut v),
            "mr_comm_host_count: comm is NULL",
        );
    }
    assert_eq!(v, -7);
}

//! The C ABI over live communicators on loopback, driven from Rust through the exported
//! functions: init, ops through the blocking and non-blocking entry points, argument checks
//! that need a communicator, and abort from another thread.

use mapreduce::ffi::*;
use std::ffi::{c_int, c_void, CStr};
use std::ptr::{null, null_mut};
use std::thread;

const OK: mr_result = mr_result::MR_OK;
const F32: u32 = mr_dtype::MR_FLOAT32 as u32;
const I32: u32 = mr_dtype::MR_INT32 as u32;
const SUM: u32 = mr_op::MR_SUM as u32;

fn last_error() -> String {
    // SAFETY: never NULL; valid until the next call on this thread.
    unsafe { CStr::from_ptr(mr_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[track_caller]
fn ok(r: mr_result) {
    assert_eq!(r, OK, "{}", last_error());
}

/// A communicator handle that may be shared with other threads, as C callers do.
#[derive(Clone, Copy)]
struct Handle(*mut mr_comm);
// SAFETY: mr_comm is Send + Sync (checked at compile time in src/ffi.rs); the tests below keep
// every handle alive until all threads using it are joined.
unsafe impl Send for Handle {}

impl Handle {
    /// The raw handle. A method, so that closures capture the whole `Send` wrapper rather
    /// than its raw-pointer field.
    fn ptr(self) -> *mut mr_comm {
        self.0
    }
}

fn unique_id() -> mr_unique_id {
    let mut id = mr_unique_id { internal: [0; 256] };
    // SAFETY: id is a valid output.
    ok(unsafe { mr_get_unique_id(&mut id) });
    id
}

/// Start `n` ranks of one job, each on its own thread; handles in rank order.
fn local_job(n: c_int) -> Vec<Handle> {
    let id = unique_id();
    let joiners: Vec<_> = (0..n)
        .map(|rank| {
            thread::spawn(move || {
                let mut comm = null_mut();
                // SAFETY: valid output and id.
                ok(unsafe { mr_comm_init_rank(&mut comm, n, &id, rank) });
                Handle(comm)
            })
        })
        .collect();
    joiners
        .into_iter()
        .map(|j| j.join().expect("init thread"))
        .collect()
}

fn destroy(handles: Vec<Handle>) {
    let joiners: Vec<_> = handles
        .into_iter()
        // SAFETY: each handle is live and used by no other thread any more.
        .map(|h| thread::spawn(move || unsafe { mr_comm_destroy(h.ptr()) }))
        .collect();
    for j in joiners {
        assert_eq!(j.join().expect("destroy thread"), OK);
    }
}

#[test]
fn a_single_rank_job_runs_every_op_through_the_c_abi() {
    let comm = local_job(1)[0].ptr();
    let (mut rank, mut size) = (-1, -1);
    // SAFETY: comm is live, every buffer below is valid for its count, and requests are
    // waited before their buffers go out of scope.
    unsafe {
        ok(mr_comm_rank(comm, &mut rank));
        ok(mr_comm_size(comm, &mut size));
        assert_eq!((rank, size), (0, 1));

        let mut buf = [1.5f32, -2.0, 3.25];
        ok(mr_allreduce(
            comm,
            buf.as_mut_ptr().cast(),
            buf.len(),
            F32,
            SUM,
        ));
        assert_eq!(buf, [1.5, -2.0, 3.25]);

        let mut req = null_mut();
        ok(mr_iallreduce(
            comm,
            buf.as_mut_ptr().cast(),
            buf.len(),
            F32,
            mr_op::MR_AVG as u32,
            &mut req,
        ));
        let mut done: c_int = 0;
        while done == 0 {
            ok(mr_test(req, &mut done));
        }
        assert_eq!(done, 1);
        ok(mr_wait(req));
        assert_eq!(buf, [1.5, -2.0, 3.25]);

        let send = [7i32, 8];
        let mut recv = [0i32; 2];
        ok(mr_allgather(
            comm,
            send.as_ptr().cast(),
            recv.as_mut_ptr().cast(),
            2,
            I32,
        ));
        assert_eq!(recv, send);
        recv = [0; 2];
        ok(mr_reduce_scatter(
            comm,
            send.as_ptr().cast(),
            recv.as_mut_ptr().cast(),
            2,
            I32,
            SUM,
        ));
        assert_eq!(recv, send);

        ok(mr_broadcast(
            comm,
            buf.as_mut_ptr().cast(),
            buf.len(),
            F32,
            0,
        ));
        ok(mr_barrier(comm));
        let mut req = null_mut();
        ok(mr_ibarrier(comm, &mut req));
        ok(mr_wait(req));
        // Zero elements with NULL buffers are valid.
        ok(mr_allreduce(comm, null_mut(), 0, F32, SUM));
        ok(mr_allgather(comm, null(), null_mut(), 0, F32));
    }
    destroy(vec![Handle(comm)]);
}

#[test]
fn arguments_inconsistent_with_the_communicator_are_rejected() {
    let comm = local_job(1)[0].ptr();
    let mut buf = [0f32; 4];
    let mut req = null_mut();
    // SAFETY: comm is live and buf valid; every call fails before starting an op.
    unsafe {
        assert_eq!(
            mr_broadcast(comm, buf.as_mut_ptr().cast(), 4, F32, 1),
            mr_result::MR_ERR_INVALID_ARGUMENT
        );
        assert!(
            last_error().starts_with("mr_broadcast: "),
            "{}",
            last_error()
        );
        assert!(last_error().contains("root 1"), "{}", last_error());
        assert_eq!(
            mr_ibroadcast(comm, buf.as_mut_ptr().cast(), 4, F32, 5, &mut req),
            mr_result::MR_ERR_INVALID_ARGUMENT
        );
        assert!(req.is_null());
        // The communicator is still usable after a rejected call.
        ok(mr_allreduce(comm, buf.as_mut_ptr().cast(), 4, F32, SUM));
    }
    destroy(vec![Handle(comm)]);
}

#[test]
fn ranks_on_threads_all_reduce_through_the_c_abi() {
    const N: c_int = 3;
    const COUNT: usize = 10_007;
    let handles = local_job(N);
    let workers: Vec<_> = handles
        .iter()
        .enumerate()
        .map(|(rank, &h)| {
            thread::spawn(move || {
                let mut buf: Vec<f32> = (0..COUNT)
                    .map(|i| ((rank + 1) * (i % 100)) as f32)
                    .collect();
                // SAFETY: h is live until every worker is joined; buf holds COUNT elements.
                let r = unsafe {
                    mr_allreduce(h.ptr(), buf.as_mut_ptr().cast::<c_void>(), COUNT, F32, SUM)
                };
                (r, last_error(), buf)
            })
        })
        .collect();
    for w in workers {
        let (r, message, buf) = w.join().expect("worker");
        assert_eq!(r, OK, "{message}");
        for (i, v) in buf.iter().enumerate() {
            assert_eq!(*v, (6 * (i % 100)) as f32, "element {i}");
        }
    }
    destroy(handles);
}

#[test]
fn ranks_on_threads_gather_and_scatter_through_the_non_blocking_abi() {
    const N: usize = 4;
    const COUNT: usize = 1_001;
    let handles = local_job(N as c_int);
    let workers: Vec<_> = handles
        .iter()
        .enumerate()
        .map(|(rank, &h)| {
            thread::spawn(move || -> Result<(), String> {
                // All-gather: rank r contributes r * 10_000 + i; everyone gets all blocks in
                // rank order.
                let send: Vec<i64> = (0..COUNT).map(|i| (rank * 10_000 + i) as i64).collect();
                let mut recv = vec![-1i64; COUNT * N];
                // Reduce-scatter: element j of rank r's input is r + j, so block b's sum at
                // offset i is N * (b * COUNT + i) + N (N - 1) / 2.
                let rs_send: Vec<i32> = (0..COUNT * N).map(|j| (rank + j) as i32).collect();
                let mut rs_recv = vec![-1i32; COUNT];
                let (mut gather, mut scatter) = (null_mut(), null_mut());
                // SAFETY: h stays live until every worker is joined; the buffers outlive the
                // requests, which are waited below.
                unsafe {
                    let i64t = mr_dtype::MR_INT64 as u32;
                    if mr_iallgather(
                        h.ptr(),
                        send.as_ptr().cast(),
                        recv.as_mut_ptr().cast(),
                        COUNT,
                        i64t,
                        &mut gather,
                    ) != OK
                        || mr_ireduce_scatter(
                            h.ptr(),
                            rs_send.as_ptr().cast(),
                            rs_recv.as_mut_ptr().cast(),
                            COUNT,
                            I32,
                            SUM,
                            &mut scatter,
                        ) != OK
                    {
                        return Err(last_error());
                    }
                    // Completed in the order started; wait in reverse to show that works too.
                    if mr_wait(scatter) != OK || mr_wait(gather) != OK {
                        return Err(last_error());
                    }
                }
                for (j, v) in recv.iter().enumerate() {
                    let (b, i) = (j / COUNT, j % COUNT);
                    if *v != (b * 10_000 + i) as i64 {
                        return Err(format!("allgather element {j} is {v}"));
                    }
                }
                for (i, v) in rs_recv.iter().enumerate() {
                    let want = N * (rank * COUNT + i) + N * (N - 1) / 2;
                    if *v != want as i32 {
                        return Err(format!("reduce_scatter element {i} is {v}, want {want}"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for (rank, w) in workers.into_iter().enumerate() {
        w.join()
            .expect("worker")
            .unwrap_or_else(|e| panic!("rank {rank}: {e}"));
    }
    destroy(handles);
}

#[test]
fn abort_from_another_thread_ends_a_blocked_op() {
    // Rank 1 joins but never takes part, so rank 0's all-reduce cannot finish on its own.
    let handles = local_job(2);
    let rank0 = handles[0];
    let blocked = thread::spawn(move || {
        let mut buf = vec![1f32; 1 << 16];
        // SAFETY: rank0 stays live until this thread is joined.
        let r = unsafe { mr_allreduce(rank0.ptr(), buf.as_mut_ptr().cast(), buf.len(), F32, SUM) };
        (r, last_error())
    });
    // Give the op a moment to block, so that abort usually meets it in flight; had it not
    // started yet, it must end as aborted all the same.
    thread::sleep(std::time::Duration::from_millis(100));
    // SAFETY: the handle is live; abort may run concurrently with an op.
    ok(unsafe { mr_comm_abort(rank0.ptr()) });
    let (r, message) = blocked.join().expect("blocked thread");
    assert_eq!(r, mr_result::MR_ERR_ABORTED, "{message}");
    // Later ops on the aborted communicator fail the same way.
    let mut x = 0f32;
    // SAFETY: live handle, valid one-element buffer.
    let r = unsafe { mr_allreduce(rank0.ptr(), (&mut x as *mut f32).cast(), 1, F32, SUM) };
    assert_eq!(r, mr_result::MR_ERR_ABORTED, "{}", last_error());
    // SAFETY: no thread uses the handles any more. Destroy reports how each rank ended; the
    // aborted one and its abandoned partner may report errors, but both must return.
    for h in handles {
        let _ = unsafe { mr_comm_destroy(h.ptr()) };
    }
}

#[test]
fn a_failed_request_reports_through_test_and_wait() {
    let handles = local_job(2);
    let rank0 = handles[0].ptr();
    let mut buf = vec![0i32; 1024];
    let mut req = null_mut();
    // SAFETY: live handle; buf outlives the request, which is waited below.
    unsafe {
        ok(mr_iallreduce(
            rank0,
            buf.as_mut_ptr().cast(),
            buf.len(),
            I32,
            SUM,
            &mut req,
        ));
        ok(mr_comm_abort(rank0));
        // The request fails: mr_test returns the error (leaving done alone) and mr_wait
        // returns it again while freeing the request.
        let mut done: c_int = -1;
        let mut r = OK;
        while r == OK && done != 1 {
            r = mr_test(req, &mut done);
        }
        assert_eq!(r, mr_result::MR_ERR_ABORTED, "{}", last_error());
        assert_ne!(done, 1);
        assert_eq!(mr_wait(req), mr_result::MR_ERR_ABORTED);
    }
    for h in handles {
        // SAFETY: no thread uses the handles any more.
        let _ = unsafe { mr_comm_destroy(h.ptr()) };
    }
}

#[test]
fn layout_of_a_one_host_job_through_the_c_abi() {
    let handles = local_job(3);
    for (rank, h) in handles.iter().enumerate() {
        let (mut local_rank, mut local_size, mut hosts) = (-1, -1, -1);
        // SAFETY: live handle, valid outputs.
        unsafe {
            ok(mr_comm_local_rank(h.ptr(), &mut local_rank));
            ok(mr_comm_local_size(h.ptr(), &mut local_size));
            ok(mr_comm_host_count(h.ptr(), &mut hosts));
        }
        assert_eq!((local_rank, local_size, hosts), (rank as c_int, 3, 1));
        // SAFETY: live handle; a NULL output is rejected before anything is written.
        let r = unsafe { mr_comm_local_rank(h.ptr(), null_mut()) };
        assert_eq!(r, mr_result::MR_ERR_INVALID_ARGUMENT);
        assert_eq!(
            last_error(),
            "mr_comm_local_rank: local_rank (output) is NULL"
        );
    }
    destroy(handles);
}

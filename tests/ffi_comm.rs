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

/// Run `body(rank, handle)` on every rank of a fresh `n`-rank job, each on its own thread;
/// their results in rank order.
fn on_ranks<T: Send + 'static>(
    n: c_int,
    body: impl Fn(usize, Handle) -> T + Send + Sync + Copy + 'static,
) -> Vec<T> {
    let handles = local_job(n);
    let workers: Vec<_> = handles
        .iter()
        .enumerate()
        .map(|(rank, &h)| thread::spawn(move || body(rank, h)))
        .collect();
    let out = workers
        .into_iter()
        .map(|w| w.join().expect("worker"))
        .collect();
    destroy(handles);
    out
}

#[test]
fn rooted_collectives_and_all_to_all_through_the_c_abi() {
    const COUNT: usize = 1000;
    for n in 1..=4usize {
        let results = on_ranks(n as c_int, move |rank, h| {
            let c = h.ptr();
            let v = |from: usize, to: usize, i: usize| (from * 10_000 + to * 1000 + i) as i32;
            let root = n - 1;
            // SAFETY: every buffer outlives its op; non-blocking ones are waited right away.
            unsafe {
                // reduce (non-roots pass no receive buffer)
                let send: Vec<i32> = (0..COUNT).map(|i| v(rank, 0, i)).collect();
                let mut sum = vec![0i32; COUNT];
                let recv = if rank == root {
                    sum.as_mut_ptr().cast()
                } else {
                    null_mut()
                };
                ok(mr_reduce(
                    c,
                    send.as_ptr().cast(),
                    recv,
                    COUNT,
                    I32,
                    SUM,
                    root as c_int,
                ));
                if rank == root {
                    for (i, s) in sum.iter().enumerate() {
                        assert_eq!(*s, (0..n).map(|r| v(r, 0, i)).sum::<i32>(), "reduce {i}");
                    }
                }
                // gather, non-blocking
                let send: Vec<i32> = (0..COUNT).map(|i| v(rank, root, i)).collect();
                let mut all = vec![0i32; COUNT * n];
                let mut req = null_mut();
                ok(mr_igather(
                    c,
                    send.as_ptr().cast(),
                    all.as_mut_ptr().cast(),
                    COUNT,
                    I32,
                    0,
                    &mut req,
                ));
                ok(mr_wait(req));
                if rank == 0 {
                    for r in 0..n {
                        assert_eq!(all[r * COUNT + 7], v(r, root, 7), "gather from {r}");
                    }
                }
                // scatter from the last rank
                let blocks: Vec<i32> = (0..n)
                    .flat_map(|p| (0..COUNT).map(move |i| v(root, p, i)))
                    .collect();
                let mut mine = vec![0i32; COUNT];
                ok(mr_scatter(
                    c,
                    blocks.as_ptr().cast(),
                    mine.as_mut_ptr().cast(),
                    COUNT,
                    I32,
                    root as c_int,
                ));
                assert_eq!(mine[COUNT - 1], v(root, rank, COUNT - 1));
                // alltoall, non-blocking
                let send: Vec<i32> = (0..n)
                    .flat_map(|p| (0..COUNT).map(move |i| v(rank, p, i)))
                    .collect();
                let mut recv = vec![0i32; COUNT * n];
                ok(mr_ialltoall(
                    c,
                    send.as_ptr().cast(),
                    recv.as_mut_ptr().cast(),
                    COUNT,
                    I32,
                    &mut req,
                ));
                ok(mr_wait(req));
                for p in 0..n {
                    assert_eq!(recv[p * COUNT + 3], v(p, rank, 3), "alltoall from {p}");
                }
                // alltoallv: rank a sends rank b (a + 2b) % 3 elements
                let split = |a: usize, b: usize| (a + 2 * b) % 3;
                let sc: Vec<usize> = (0..n).map(|p| split(rank, p)).collect();
                let rc: Vec<usize> = (0..n).map(|p| split(p, rank)).collect();
                let displs = |c: &[usize]| -> Vec<usize> {
                    c.iter()
                        .scan(0, |a, &x| {
                            let d = *a;
                            *a += x;
                            Some(d)
                        })
                        .collect()
                };
                let (sd, rd) = (displs(&sc), displs(&rc));
                let send: Vec<i32> = (0..n)
                    .flat_map(|p| (0..split(rank, p)).map(move |i| v(rank, p, i)))
                    .collect();
                let mut recv = vec![-1i32; rc.iter().sum()];
                ok(mr_alltoallv(
                    c,
                    send.as_ptr().cast(),
                    sc.as_ptr(),
                    sd.as_ptr(),
                    recv.as_mut_ptr().cast(),
                    rc.as_ptr(),
                    rd.as_ptr(),
                    I32,
                ));
                let want: Vec<i32> = (0..n)
                    .flat_map(|p| (0..split(p, rank)).map(move |i| v(p, rank, i)))
                    .collect();
                assert_eq!(recv, want, "alltoallv");
            }
            true
        });
        assert!(results.into_iter().all(|x| x), "world {n}");
    }
}

#[test]
fn bad_arguments_of_rooted_and_exchange_calls_leave_the_communicator_usable() {
    let results = on_ranks(3, |rank, h| {
        let c = h.ptr();
        let mut buf = vec![1i32; 12];
        let p = buf.as_mut_ptr().cast::<c_void>();
        let counts = [1usize; 3];
        let displs = [0usize, 1, 2];
        let mut req = null_mut();
        let mut messages = Vec::new();
        // SAFETY: live handle; every rejected call fails before starting an op; the others
        // use buffers that outlive them.
        unsafe {
            let expect_invalid = |r: mr_result, needle: &str| {
                assert_eq!(r, mr_result::MR_ERR_INVALID_ARGUMENT, "{}", last_error());
                assert!(last_error().contains(needle), "{needle}: {}", last_error());
            };
            expect_invalid(
                mr_reduce(c, p, p, 4, I32, SUM, 3),
                "reduce root 3 is out of range",
            );
            expect_invalid(
                mr_ireduce(c, p, p, 4, I32, SUM, -1, &mut req),
                "root -1 is negative",
            );
            expect_invalid(mr_gather(c, p, p, 4, I32, 7), "gather root 7");
            expect_invalid(mr_scatter(c, p, p, 4, I32, 3), "scatter root 3");
            expect_invalid(mr_gather(c, null(), p, 4, I32, 0), "send is NULL");
            expect_invalid(mr_alltoall(c, p, null_mut(), 4, I32), "recv is NULL");
            expect_invalid(
                mr_alltoallv(
                    c,
                    p,
                    null(),
                    displs.as_ptr(),
                    p,
                    counts.as_ptr(),
                    displs.as_ptr(),
                    I32,
                ),
                "send_counts is NULL",
            );
            // The root must pass a receive buffer, the others need not.
            if rank == 0 {
                expect_invalid(
                    mr_gather(c, p, null_mut(), 4, I32, 0),
                    "gather recv buffer is NULL",
                );
                expect_invalid(
                    mr_reduce(c, p, null_mut(), 4, I32, SUM, 0),
                    "reduce recv buffer is NULL",
                );
            }
            // This rank must send itself what it expects from itself.
            let mut rc = counts;
            rc[rank] = 2;
            expect_invalid(
                mr_alltoallv(
                    c,
                    p,
                    counts.as_ptr(),
                    displs.as_ptr(),
                    p,
                    rc.as_ptr(),
                    displs.as_ptr(),
                    I32,
                ),
                "sends itself 1 elements but expects 2",
            );
            assert!(req.is_null());
            // Counts that disagree across ranks fail the op on the ranks that see it, with
            // both views in the message, and the communicator stays usable.
            let mut sc = counts;
            if rank == 1 {
                sc[2] = 2;
            }
            let mut out = vec![0i32; 12];
            let r = mr_alltoallv(
                c,
                p,
                sc.as_ptr(),
                displs.as_ptr(),
                out.as_mut_ptr().cast(),
                counts.as_ptr(),
                [0usize, 1, 2].as_ptr(),
                I32,
            );
            messages.push((r, last_error()));
            let mut v = vec![rank as i32; 5];
            ok(mr_allreduce(c, v.as_mut_ptr().cast(), 5, I32, SUM));
            assert_eq!(v, vec![3; 5]);
        }
        messages
    });
    let rank2 = &results[2][0];
    assert_eq!(rank2.0, mr_result::MR_ERR_INVALID_ARGUMENT, "{}", rank2.1);
    assert!(
        rank2.1.contains("rank 1 sends 2 x int32 to this rank") && rank2.1.contains("expects 1"),
        "{}",
        rank2.1
    );
}

#[test]
fn send_recv_pairs_tags_and_group_rings_through_the_c_abi() {
    for n in 2..=5usize {
        let results = on_ranks(n as c_int, move |rank, h| {
            let c = h.ptr();
            let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
            // SAFETY: every buffer outlives its op; requests are waited before buffers drop.
            unsafe {
                // A ring in one group, non-blocking forms, a message larger than any socket
                // buffer so that nobody could finish sending before its neighbour receives.
                const BIG: usize = 1 << 20;
                let send: Vec<f32> = (0..BIG).map(|i| (rank * 7 + i % 13) as f32).collect();
                let mut recv = vec![0f32; BIG];
                let (mut rs, mut rr) = (null_mut(), null_mut());
                ok(mr_group_start());
                ok(mr_isend(
                    c,
                    send.as_ptr().cast(),
                    BIG,
                    F32,
                    next as c_int,
                    3,
                    &mut rs,
                ));
                ok(mr_irecv(
                    c,
                    recv.as_mut_ptr().cast(),
                    BIG,
                    F32,
                    prev as c_int,
                    3,
                    &mut rr,
                ));
                ok(mr_group_end());
                ok(mr_wait(rs));
                ok(mr_wait(rr));
                assert_eq!(recv[12], (prev * 7 + 12) as f32, "ring from {prev}");
                // The same ring with the blocking forms: mr_group_end waits.
                let mut back = vec![0f32; BIG];
                ok(mr_group_start());
                ok(mr_send(c, recv.as_ptr().cast(), BIG, F32, prev as c_int, 4));
                ok(mr_recv(
                    c,
                    back.as_mut_ptr().cast(),
                    BIG,
                    F32,
                    next as c_int,
                    4,
                ));
                ok(mr_group_end());
                assert_eq!(back, send, "ring back");
                // Rank 0 and rank 1 only: two messages with different tags and counts, in
                // order, then a collective that every rank calls; point-to-point took no
                // sequence number from it.
                if rank < 2 {
                    let other = 1 - rank as c_int;
                    let a = [rank as i32 + 10; 3];
                    let b = [rank as i32 + 20; 5];
                    let (mut ga, mut gb) = ([0i32; 3], [0i32; 5]);
                    ok(mr_group_start());
                    ok(mr_send(c, a.as_ptr().cast(), 3, I32, other, 1));
                    ok(mr_send(c, b.as_ptr().cast(), 5, I32, other, 2));
                    ok(mr_recv(c, ga.as_mut_ptr().cast(), 3, I32, other, 1));
                    ok(mr_recv(c, gb.as_mut_ptr().cast(), 5, I32, other, 2));
                    ok(mr_group_end());
                    assert_eq!(ga, [other + 10; 3]);
                    assert_eq!(gb, [other + 20; 5]);
                    // Outside a group: rank 0 sends first, rank 1 receives first.
                    let mut z = [0i32; 2];
                    if rank == 0 {
                        ok(mr_send(c, a.as_ptr().cast(), 2, I32, 1, 9));
                        ok(mr_recv(c, z.as_mut_ptr().cast(), 2, I32, 1, 9));
                    } else {
                        ok(mr_recv(c, z.as_mut_ptr().cast(), 2, I32, 0, 9));
                        ok(mr_send(c, a.as_ptr().cast(), 2, I32, 0, 9));
                    }
                    assert_eq!(z, [other + 10; 2]);
                }
                let mut v = vec![1i32; 7];
                ok(mr_allreduce(c, v.as_mut_ptr().cast(), 7, I32, SUM));
                assert_eq!(v, vec![n as i32; 7]);
            }
            true
        });
        assert!(results.into_iter().all(|x| x), "world {n}");
    }
}

#[test]
fn bad_point_to_point_calls_fail_clearly_and_leave_the_communicator_usable() {
    let results = on_ranks(2, |rank, h| {
        let c = h.ptr();
        let mut buf = [0i32; 4];
        let p = buf.as_mut_ptr().cast::<c_void>();
        let mut req = null_mut();
        // SAFETY: live handle; buffers outlive every op.
        unsafe {
            let expect_invalid = |r: mr_result, needle: &str| {
                assert_eq!(r, mr_result::MR_ERR_INVALID_ARGUMENT, "{}", last_error());
                assert!(last_error().contains(needle), "{needle}: {}", last_error());
            };
            expect_invalid(mr_send(c, p, 4, I32, 2, 0), "send peer 2 is out of range");
            expect_invalid(
                mr_irecv(c, p, 4, I32, rank as c_int, 0, &mut req),
                "is this rank",
            );
            expect_invalid(mr_send(c, p, 4, I32, -1, 0), "peer -1 is negative");
            expect_invalid(mr_recv(c, p, 4, I32, 0, -5), "tag -5 is negative");
            expect_invalid(
                mr_send(c, null(), 4, I32, 1 - rank as c_int, 0),
                "buf is NULL",
            );
            expect_invalid(
                mr_isend(c, p, 4, I32, 1, 0, null_mut()),
                "req (output) is NULL",
            );
            expect_invalid(mr_group_end(), "mr_group_end without mr_group_start");
            assert!(req.is_null());
            // A rejected call inside a group is not recorded; the group still works.
            let other = 1 - rank as c_int;
            let mine = [rank as i32; 4];
            ok(mr_group_start());
            expect_invalid(mr_send(c, p, 4, I32, 9, 0), "out of range");
            ok(mr_send(c, mine.as_ptr().cast(), 4, I32, other, 0));
            ok(mr_recv(c, p, 4, I32, other, 0));
            ok(mr_group_end());
            assert_eq!(buf, [other; 4]);
            // Tags that disagree: the receiver fails naming both sides.
            let message = if rank == 0 {
                let _ = mr_send(c, mine.as_ptr().cast(), 4, I32, 1, 5);
                None
            } else {
                let r = mr_recv(c, p, 4, I32, 0, 6);
                Some((r, last_error()))
            };
            let mut v = vec![1i32; 3];
            ok(mr_allreduce(c, v.as_mut_ptr().cast(), 3, I32, SUM));
            assert_eq!(v, vec![2; 3]);
            message
        }
    });
    let (r, message) = results[1].clone().expect("rank 1 reports");
    assert_eq!(r, mr_result::MR_ERR_INVALID_ARGUMENT, "{message}");
    assert!(
        message.contains("mismatched send/recv: rank 0 sent 4 x int32 with tag 5")
            && message.contains("expects 4 x int32 with tag 6"),
        "{message}"
    );
}

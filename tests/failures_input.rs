//! Bad input across processes: invalid arguments are rejected locally and leave the
//! communicator usable; calls that disagree across ranks end in an error that names the
//! problem; inconsistent joins (world size, duplicate rank) fail init clearly.

mod support;

use mapreduce::comm::P2pCall;
use mapreduce::net::engine::Completion;
use mapreduce::{DType, ReduceOp, Request};
use std::sync::Arc;
use std::time::Duration;
use support::{err, ok, report, say, Ctx, Job, RankSpec};

#[test]
#[ignore = "entry point of the child ranks the other tests spawn"]
fn rank_child() {
    support::child_entry(play);
}

fn play(ctx: Ctx) {
    match ctx.scenario.as_str() {
        "join" => support::join_and_check(ctx),
        "bad_args" => bad_args(ctx),
        "mismatch" => mismatch(ctx),
        "p2p_mismatch" => p2p_mismatch(ctx),
        "splits_mismatch" => splits_mismatch(ctx),
        s => panic!("unknown scenario {s}"),
    }
}

/// Steps of `bad_args` that must fail with `InvalidArgument`.
const INVALID_STEPS: &[&str] = &[
    "null_allreduce",
    "null_broadcast",
    "null_allgather_send",
    "null_allgather_recv",
    "null_reduce_scatter_send",
    "null_reduce_scatter_recv",
    "broadcast_root_size",
    "broadcast_root_max",
    "ibroadcast_root_size",
    "allgather_wrong_recv_len",
    "reduce_scatter_wrong_send_len",
    "count_overflow",
];

fn bad_args(mut ctx: Ctx) {
    let Ok(comm) = ctx.init() else { return };
    let n = comm.size();
    let null = std::ptr::null_mut::<u8>();
    let mut good = vec![0u8; 4096];
    let g = good.as_mut_ptr();
    let wait = |r: mapreduce::Result<Request>| r.and_then(Request::wait);
    // SAFETY: every call below is rejected by argument validation before any memory is
    // touched (a NULL pointer with a non-zero count, or an impossible size); the non-null
    // buffers are valid for the byte counts requested where a call could get that far.
    unsafe {
        report(
            "null_allreduce",
            &wait(comm.iallreduce_raw(null, 10, DType::F32, ReduceOp::Sum)),
        );
        report(
            "null_broadcast",
            &wait(comm.ibroadcast_raw(null, 10, DType::I32, 0)),
        );
        report(
            "null_allgather_send",
            &wait(comm.iallgather_raw(null, g, 1, DType::U8)),
        );
        report(
            "null_allgather_recv",
            &wait(comm.iallgather_raw(g, null, 1, DType::U8)),
        );
        report(
            "null_reduce_scatter_send",
            &wait(comm.ireduce_scatter_raw(null, g, 1, DType::F64, ReduceOp::Max)),
        );
        report(
            "null_reduce_scatter_recv",
            &wait(comm.ireduce_scatter_raw(g, null, 1, DType::F64, ReduceOp::Max)),
        );
        report(
            "ibroadcast_root_size",
            &wait(comm.ibroadcast_raw(g, 4, DType::U8, n)),
        );
        report(
            "count_overflow",
            &wait(comm.iallreduce_raw(g, usize::MAX / 4, DType::F64, ReduceOp::Sum)),
        );
    }
    let mut v = vec![1.0f32; 8];
    report("broadcast_root_size", &comm.broadcast(&mut v, n));
    report("broadcast_root_max", &comm.broadcast(&mut v, usize::MAX));
    let mut recv = vec![0i32; 3 * n + 1];
    report(
        "allgather_wrong_recv_len",
        &comm.allgather(&[1i32, 2, 3], &mut recv),
    );
    report(
        "reduce_scatter_wrong_send_len",
        &comm.reduce_scatter(&[1i32; 5], &mut [0i32; 2], ReduceOp::Sum),
    );
    // A NULL buffer with count 0 is a valid (empty) collective on every rank.
    // SAFETY: zero bytes are accessed.
    let empty = unsafe { comm.iallreduce_raw(null, 0, DType::F32, ReduceOp::Sum) };
    report("null_empty_allreduce", &wait(empty));
    // None of the rejected calls disturbed the communicator.
    support::check_allreduce(&comm, "allreduce_after");
    let mut b: Vec<i64> = if comm.rank() == n - 1 {
        (0..1000).collect()
    } else {
        vec![0; 1000]
    };
    match comm.broadcast(&mut b, n - 1) {
        Ok(()) if b.iter().enumerate().all(|(i, &x)| x == i as i64) => ok("broadcast_after", ""),
        Ok(()) => say("ERR broadcast_after WrongResult"),
        Err(e) => err("broadcast_after", &e),
    }
    report("destroy", &comm.destroy());
}

/// Rank r all-reduces `base + r` elements (`MRT_MISMATCH=count`), rank 0 uses another
/// dtype (`dtype`), names another gather root (`root`) or calls all-to-all where the others
/// gather (`coll`): calls that cannot match.
fn mismatch(mut ctx: Ctx) {
    let Ok(comm) = ctx.init() else { return };
    let r = comm.rank();
    let base: usize = std::env::var("MRT_BASE").unwrap().parse().unwrap();
    let res = match std::env::var("MRT_MISMATCH").unwrap().as_str() {
        "count" => {
            let mut v = vec![1.0f32; base + r];
            comm.allreduce(&mut v, ReduceOp::Sum)
        }
        "dtype" if r == 0 => {
            let mut v = vec![1i32; base];
            comm.allreduce(&mut v, ReduceOp::Sum)
        }
        "dtype" => {
            let mut v = vec![1.0f32; base];
            comm.allreduce(&mut v, ReduceOp::Sum)
        }
        "root" | "coll" => {
            let n = comm.size();
            let send = vec![r as f32; base];
            let mut recv = vec![0f32; base * n];
            let root = if r == 0 { 0 } else { 1 };
            if r == 0 && std::env::var("MRT_MISMATCH").unwrap() == "coll" {
                let send = vec![r as f32; base * n];
                comm.alltoall(&send, &mut recv)
            } else {
                let recv = (r == root).then_some(&mut recv[..]);
                comm.gather(&send, recv, root)
            }
        }
        m => panic!("unknown mismatch {m}"),
    };
    report("mismatched", &res);
    // Whether the communicator is still usable afterwards is not part of the contract;
    // report it for the record, but it must not crash or hang.
    support::check_allreduce(&comm, "allreduce_after");
    let _ = comm.destroy();
}

/// An all-to-all-v among 3 ranks in which rank 1 sends rank 2 two elements where rank 2
/// expects one; then the pair of ops after it (an all-to-all-v that agrees, an all-reduce).
fn splits_mismatch(mut ctx: Ctx) {
    let Ok(comm) = ctx.init() else { return };
    let r = comm.rank();
    ok("shm", comm.uses_shared_memory());
    let counts = [1usize; 3];
    let displs = [0usize, 1, 2];
    let mut sc = counts;
    if r == 1 {
        sc[2] = 2;
    }
    let send = [r as i32 * 10, r as i32 * 10 + 1, r as i32 * 10 + 2, 99];
    let mut recv = [0i32; 3];
    let mut exchange = |sc: &[usize]| {
        // SAFETY: `send` holds the 4 elements the widest send range names, `recv` the 3 of
        // the receive ranges; both outlive the request, which is waited for at once.
        unsafe {
            comm.ialltoallv_raw(
                send.as_ptr().cast(),
                sc,
                &displs,
                recv.as_mut_ptr().cast(),
                &counts,
                &displs,
                DType::I32,
            )
        }
        .and_then(Request::wait)
    };
    report("mismatched", &exchange(&sc));
    let res = exchange(&counts);
    match res {
        Ok(()) if recv == [r as i32, 10 + r as i32, 20 + r as i32] => ok("alltoallv_after", ""),
        Ok(()) => say(&format!("ERR alltoallv_after WrongResult {recv:?}")),
        Err(e) => err("alltoallv_after", &e),
    }
    support::check_allreduce(&comm, "allreduce_after");
    let _ = comm.destroy();
}

/// Ranks 0 and 1 exchange `MRT_BASE` f32 elements each way in one group (many frames); rank
/// 1's receive expects the wrong tag. Then the pair exchanges another message and both
/// all-reduce.
fn p2p_mismatch(mut ctx: Ctx) {
    let Ok(comm) = ctx.init() else { return };
    let base: usize = std::env::var("MRT_BASE").unwrap().parse().unwrap();
    let (r, other) = (comm.rank(), 1 - comm.rank());
    let out = vec![1.0f32; base];
    let mut v = vec![0.0f32; base];
    let started = std::time::Instant::now();
    // One group each way: a send with tag 5 and a receive expecting tag 5 (rank 0) or 6.
    let calls = [
        P2pCall {
            send: true,
            peer: other,
            tag: 5,
            buf: out.as_ptr().cast_mut().cast(),
            count: base,
            dtype: DType::F32,
        },
        P2pCall {
            send: false,
            peer: other,
            tag: if r == 0 { 5 } else { 6 },
            buf: v.as_mut_ptr().cast(),
            count: base,
            dtype: DType::F32,
        },
    ];
    // SAFETY: both buffers outlive the request, which is waited for at once; `out` is only
    // read.
    let res =
        unsafe { comm.submit_p2p(&calls, Arc::new(Completion::default())) }.and_then(Request::wait);
    report("mismatched", &res);
    ok("mismatched_ms", started.elapsed().as_millis());
    // The next message between the pair goes through (the rest of the failed one does not
    // stand in its way), then a collective.
    let mut w: Vec<f32> = (0..base).map(|i| (i % 251) as f32).collect();
    if comm.rank() == 1 {
        w.fill(0.0);
    }
    // SAFETY: `w` outlives the request, which is waited for at once.
    let res = unsafe {
        if comm.rank() == 0 {
            comm.isend_raw(w.as_ptr().cast(), base, DType::F32, 1, 7)
        } else {
            comm.irecv_raw(w.as_mut_ptr().cast(), base, DType::F32, 0, 7)
        }
    }
    .and_then(Request::wait);
    match res {
        Ok(()) if w.iter().enumerate().all(|(i, &x)| x == (i % 251) as f32) => ok("p2p_after", ""),
        Ok(()) => say("ERR p2p_after WrongResult"),
        Err(e) => err("p2p_after", &e),
    }
    support::check_allreduce(&comm, "allreduce_after");
    report("destroy", &comm.destroy());
}

// ---------------------------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------------------------

fn env() -> Vec<(&'static str, String)> {
    vec![("MR_TIMEOUT_MS", "10000".to_string())]
}

#[test]
fn invalid_arguments_are_rejected_and_the_communicator_stays_usable() {
    for n in [1, 3] {
        let out = support::run_job("bad_args", n, &env(), Duration::from_secs(60));
        for o in &out {
            assert!(o.done() && o.code == Some(0), "{}", o.story());
            for step in INVALID_STEPS {
                let (kind, msg) = o.err_of(step);
                assert_eq!(kind, "InvalidArgument", "{step}: {msg}\n{}", o.story());
                assert!(!msg.is_empty());
            }
            assert_eq!(
                o.errs().len(),
                INVALID_STEPS.len(),
                "only the invalid calls fail\n{}",
                o.story()
            );
            for step in [
                "null_empty_allreduce",
                "allreduce_after",
                "broadcast_after",
                "destroy",
            ] {
                o.ok_detail(step);
            }
        }
    }
}

fn run_mismatch(kind: &str, base: usize, small_bytes: usize, algo: &str) {
    let n = 3;
    let mut e = env();
    e.push(("MR_ALGO", algo.to_string()));
    e.push(("MRT_MISMATCH", kind.to_string()));
    e.push(("MRT_BASE", base.to_string()));
    e.push(("MR_CHUNK_BYTES", "4096".to_string()));
    e.push(("MR_SMALL_BYTES", small_bytes.to_string()));
    let out = support::run_job("mismatch", n, &e, Duration::from_secs(60));
    let mut named = 0;
    let mut notes = Vec::new();
    for o in &out {
        assert!(
            o.done() && o.code == Some(0),
            "no crash, no hang\n{}",
            o.story()
        );
        let (k, msg) = o.err_of("mismatched");
        if msg.contains("mismatched collective calls") {
            named += 1;
        }
        let after = o
            .errs()
            .into_iter()
            .find(|(s, _, _)| s == "allreduce_after")
            .map(|(_, k, m)| format!("{k}: {m}"))
            .unwrap_or_else(|| "ok".to_string());
        notes.push(format!("rank {}: {k}: {msg} | next op: {after}", o.rank));
    }
    eprintln!(
        "{kind} base {base} small_bytes {small_bytes}:\n{}",
        notes.join("\n")
    );
    assert!(
        named > 0,
        "some rank names the problem:\n{}",
        notes.join("\n")
    );
}

#[test]
fn mismatched_counts_on_the_ring_are_reported() {
    run_mismatch("count", 40_000, 0, "ring");
}

#[test]
fn mismatched_counts_over_shared_memory_are_reported() {
    run_mismatch("count", 40_000, 0, "auto");
}

#[test]
fn mismatched_gather_roots_over_shared_memory_are_reported() {
    run_mismatch("root", 40_000, 0, "auto");
}

#[test]
fn gather_against_alltoall_over_shared_memory_is_reported() {
    run_mismatch("coll", 1000, 0, "auto");
}

/// All-to-all-v counts that disagree between two ranks fail the op with a message naming both
/// sides (through shared memory: on every rank, which all read the same counts; over TCP: on
/// the ranks that see it), and the communicator carries the next ops.
fn run_splits_mismatch(algo: &str, shm: bool) {
    let mut e = env();
    e.push(("MR_ALGO", algo.to_string()));
    let out = support::run_job("splits_mismatch", 3, &e, Duration::from_secs(60));
    for o in &out {
        assert!(
            o.done() && o.code == Some(0),
            "no crash, no hang\n{}",
            o.story()
        );
        assert_eq!(o.ok_detail("shm"), shm.to_string(), "{}", o.story());
        assert_eq!(o.ok_detail("alltoallv_after"), "", "{}", o.story());
        assert_eq!(o.ok_detail("allreduce_after"), "", "{}", o.story());
        if shm || o.rank == 2 {
            let (kind, msg) = o.err_of("mismatched");
            assert_eq!(kind, "InvalidArgument", "{}", o.story());
            assert!(
                msg.contains("sends 2 x int32 to") && msg.contains("expects 1"),
                "{msg}"
            );
        }
    }
}

#[test]
fn mismatched_alltoallv_counts_over_shared_memory_fail_every_rank_and_leave_it_usable() {
    run_splits_mismatch("auto", true);
}

#[test]
fn mismatched_alltoallv_counts_over_tcp_are_reported_and_leave_it_usable() {
    run_splits_mismatch("ring", false);
}

#[test]
fn mismatched_dtypes_over_shared_memory_are_reported() {
    run_mismatch("dtype", 1000, 0, "auto");
}

#[test]
fn mismatched_counts_with_recursive_doubling_are_reported() {
    run_mismatch("count", 100, usize::MAX, "ring");
}

#[test]
fn mismatched_dtypes_are_reported() {
    run_mismatch("dtype", 1000, 0, "ring");
}

/// Two ranks exchange 64 MiB each way in one group (4 KiB frames, far more than the sockets
/// buffer); rank 1's receive expects another tag. Rank 1 fails at the first frame naming both
/// sides and stops sending; it tells rank 0, naming the messages, and rank 0's group (still
/// waiting for rank 1's message) fails with that report instead of waiting for
/// `MR_TIMEOUT_MS` (rank 0, whose send may have been handed to the network whole before the
/// rejection came back, fails only if it had not). The rest of rank 0's message is dropped at
/// rank 1, so the pair's next
/// message and the next collective go through: before, it stayed in the socket for good and
/// the next op between the pair waited for the timeout. The job's deadline is shorter than
/// `MR_TIMEOUT_MS`.
#[test]
fn mismatched_large_send_and_recv_fail_promptly_and_leave_the_pair_usable() {
    let e = vec![
        ("MR_TIMEOUT_MS", "60000".to_string()),
        ("MRT_BASE", (16usize << 20).to_string()),
        ("MR_CHUNK_BYTES", "4096".to_string()),
    ];
    let out = support::run_job("p2p_mismatch", 2, &e, Duration::from_secs(40));
    let named = "mismatched send/recv: rank 0 sent 16777216 x float32 with tag 5";
    for o in &out {
        assert!(
            o.done() && o.code == Some(0),
            "no crash, no hang\n{}",
            o.story()
        );
        // A send completes once its bytes are handed to the network: rank 0's group may end
        // before rank 1's rejection comes back (its message is then dropped at rank 1), or
        // fail with the rejection. The receiver that rejected always fails, naming it.
        let sent_whole = o.rank == 0 && !o.errs().iter().any(|(n, _, _)| n == "mismatched");
        if sent_whole {
            eprintln!(
                "rank 0 after {} ms: its group completed before the rejection came back",
                o.ok_detail("mismatched_ms")
            );
        } else {
            let (kind, msg) = o.err_of("mismatched");
            assert!(msg.contains(named), "rank {}: {kind}: {msg}", o.rank);
            if o.rank == 0 {
                assert!(msg.contains("rank 1 reported"), "{msg}");
            }
            eprintln!(
                "rank {} after {} ms: {kind}: {msg}",
                o.rank,
                o.ok_detail("mismatched_ms")
            );
        }
        o.ok_detail("p2p_after");
        o.ok_detail("allreduce_after");
        o.ok_detail("destroy");
    }
}

#[test]
fn world_size_mismatch_fails_init_clearly() {
    let mut job = Job::new("join", &env(), Duration::from_secs(30));
    job.spawn(RankSpec {
        rank: 0,
        size: 2,
        env: Vec::new(),
    });
    job.spawn(RankSpec {
        rank: 1,
        size: 3,
        env: Vec::new(),
    });
    for o in job.finish() {
        assert!(o.done(), "{}", o.story());
        let (kind, msg) = o.err_of("init");
        assert_eq!(kind, "InvalidArgument", "{msg}");
        assert!(msg.contains("world size"), "{msg}");
    }
}

#[test]
fn duplicate_rank_fails_init_clearly() {
    let mut job = Job::new("join", &env(), Duration::from_secs(40));
    let spec = |rank| RankSpec {
        rank,
        size: 3,
        env: Vec::new(),
    };
    job.spawn(spec(0));
    job.spawn(spec(1));
    job.spawn(spec(1));
    // Whichever rank-1 process joins second is turned away; rank 2 joins after that.
    let rejected = job.wait_line(|_, l| l.starts_with("ERR init"));
    assert!(rejected.is_some(), "a duplicate rank 1 was rejected");
    job.spawn(spec(2));
    let out = job.finish();
    let mut turned_away = 0;
    for o in &out {
        assert!(o.done(), "{}", o.story());
        match o.errs().first() {
            None => {
                for step in ["init", "allreduce", "barrier", "destroy"] {
                    o.ok_detail(step);
                }
            }
            Some((step, kind, msg)) => {
                assert_eq!(
                    (step.as_str(), kind.as_str()),
                    ("init", "InvalidArgument"),
                    "{msg}"
                );
                assert!(msg.contains("duplicate"), "{msg}");
                assert_eq!(o.rank, 1);
                turned_away += 1;
            }
        }
    }
    assert_eq!(turned_away, 1, "exactly one of the two rank-1 processes");
}

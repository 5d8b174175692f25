//! Failures of whole ranks across processes: a rank that never joins, a rank killed in the
//! middle of an all-reduce, and `Comm::abort` from another thread. Every outcome must be an
//! error of the right kind on every survivor — never a hang (children past their deadline are
//! killed and the test fails).

mod support;

use mapreduce::{ReduceOp, UniqueId};
use std::time::{Duration, Instant};
use support::{err, ok, report, say, Ctx, Job, RankSpec};

#[test]
#[ignore = "entry point of the child ranks the other tests spawn"]
fn rank_child() {
    support::child_entry(play);
}

fn play(ctx: Ctx) {
    match ctx.scenario.as_str() {
        "join" => support::join_and_check(ctx),
        "allreduce_loop" => allreduce_loop(ctx),
        "abort" => abort(ctx),
        "peer_exits" => peer_exits(ctx),
        "p2p_loop" => p2p_loop(ctx),
        s => panic!("unknown scenario {s}"),
    }
}

const BIG_COUNT: usize = 16 << 20; // 64 MiB of f32

/// All-reduce 64 MiB again and again until something fails; the victim rank announces
/// `STARTED` before its first op so the parent can kill it in flight.
fn allreduce_loop(mut ctx: Ctx) {
    let Ok(comm) = ctx.init() else { return };
    report("barrier", &comm.barrier());
    let mut v = vec![1.0f32; BIG_COUNT];
    say("STARTED");
    for k in 0..200 {
        if let Err(e) = comm.allreduce(&mut v, ReduceOp::Sum) {
            ok("completed_before_error", k);
            err("allreduce", &e);
            let started = Instant::now();
            report("destroy", &comm.destroy());
            ok("destroy_ms", started.elapsed().as_millis());
            return;
        }
        v.fill(1.0);
    }
    ok("all_completed", "");
}

/// Rank 0 sends 64 MiB to rank 1 again and again (each message many frames), rank 1 receives
/// them, until something fails; both announce `STARTED` before the first message.
fn p2p_loop(mut ctx: Ctx) {
    let Ok(comm) = ctx.init() else { return };
    report("barrier", &comm.barrier());
    let mut v = vec![1.0f32; BIG_COUNT];
    say("STARTED");
    for k in 0..200 {
        // SAFETY: `v` outlives the request, which is waited for at once, and nothing else
        // touches it meanwhile.
        let request = unsafe {
            if comm.rank() == 0 {
                comm.isend_raw(v.as_ptr().cast(), v.len(), mapreduce::DType::F32, 1, 7)
            } else {
                comm.irecv_raw(v.as_mut_ptr().cast(), v.len(), mapreduce::DType::F32, 0, 7)
            }
        };
        if let Err(e) = request.and_then(|r| r.wait()) {
            ok("completed_before_error", k);
            err("p2p", &e);
            let started = Instant::now();
            report("destroy", &comm.destroy());
            ok("destroy_ms", started.elapsed().as_millis());
            return;
        }
    }
    ok("all_completed", "");
}

/// Rank 0 blocks in an all-reduce rank 1 never joins; another thread aborts it. Afterwards
/// every op must fail with `Aborted`. Rank 1 waits for the parent's word, then tries a barrier.
fn abort(mut ctx: Ctx) {
    let Ok(comm) = ctx.init() else { return };
    if comm.rank() == 1 {
        support::wait_for_parent();
        report("barrier_after_peer_abort", &comm.barrier());
        report("destroy", &comm.destroy());
        return;
    }
    let mut v = vec![1.0f32; 1 << 20];
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            comm.abort();
        });
        report("blocked_allreduce", &comm.allreduce(&mut v, ReduceOp::Sum));
    });
    report("allreduce_after", &comm.allreduce(&mut v, ReduceOp::Sum));
    report("barrier_after", &comm.barrier());
    let mut b = vec![0u8; 16];
    report("broadcast_after", &comm.broadcast(&mut b, 0));
    // SAFETY: `v` outlives the request, which is waited for at once.
    let r = unsafe {
        comm.iallreduce_raw(
            v.as_mut_ptr().cast(),
            4,
            mapreduce::DType::F32,
            ReduceOp::Max,
        )
    }
    .and_then(|req| req.wait());
    report("iallreduce_after", &r);
    report("destroy", &comm.destroy());
}

/// Rank 1 leaves without a goodbye (process exit, no destroy); rank 0, told by the parent once
/// rank 1 is gone, starts a barrier, which must report the lost peer.
fn peer_exits(mut ctx: Ctx) {
    let Ok(comm) = ctx.init() else { return };
    report("barrier", &comm.barrier());
    if comm.rank() == 1 {
        say("DONE");
        std::process::exit(0);
    }
    support::wait_for_parent();
    report("barrier_after_peer_exit", &comm.barrier());
    report("destroy", &comm.destroy());
}

// ---------------------------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------------------------

fn short_timeout() -> Vec<(&'static str, String)> {
    vec![("MR_TIMEOUT_MS", "2000".to_string())]
}

fn assert_kind(o: &support::Outcome, step: &str, kinds: &[&str]) -> String {
    let (kind, message) = o.err_of(step);
    assert!(
        kinds.contains(&kind.as_str()),
        "{step}: expected {kinds:?}, got {kind}: {message}\n{}",
        o.story()
    );
    assert!(!o.timed_out, "{}", o.story());
    message
}

#[test]
fn rank_that_never_joins_times_out_init() {
    // World of 3 where rank 2 is never started.
    let mut job = Job::new("join", &short_timeout(), Duration::from_secs(30));
    for rank in 0..2 {
        job.spawn(RankSpec {
            rank,
            size: 3,
            env: Vec::new(),
        });
    }
    for o in job.finish() {
        let msg = assert_kind(&o, "init", &["Timeout"]);
        if o.rank == 0 {
            assert!(
                msg.contains("rank(s) 2 of 3"),
                "names the missing rank: {msg}"
            );
        }
        assert_eq!(o.code, Some(0), "{}", o.story());
    }
}

#[test]
fn rank_zero_that_never_joins_times_out_init() {
    // This process opens rank 0's bootstrap listener but never joins.
    let id = UniqueId::new(&mapreduce::Config::default()).unwrap();
    let mut job = Job::new("join", &short_timeout(), Duration::from_secs(30));
    job.set_id(&id);
    for rank in 1..3 {
        job.spawn(RankSpec {
            rank,
            size: 3,
            env: Vec::new(),
        });
    }
    for o in job.finish() {
        assert_kind(&o, "init", &["Timeout"]);
        assert_eq!(o.code, Some(0), "{}", o.story());
    }
}

/// Kill `victim` of a 4-rank job in the middle of a stream of 64 MiB all-reduces: every
/// survivor's op fails with Remote or Timeout, and its process ends before the job deadline
/// (which is shorter than `MR_TIMEOUT_MS`, so only prompt detection passes).
fn kill_mid_allreduce(victim: usize, algo: &str) {
    let n = 4;
    let env = vec![
        ("MR_TIMEOUT_MS", "60000".to_string()),
        ("MR_ALGO", algo.to_string()),
    ];
    let mut job = Job::new("allreduce_loop", &env, Duration::from_secs(45));
    job.spawn_all(n);
    let started = job.wait_line(|r, l| r == victim && l == "STARTED");
    assert!(started.is_some(), "victim never started");
    // Let a few ops run so the kill lands in flight.
    std::thread::sleep(Duration::from_millis(400));
    job.kill(victim);
    let out = job.finish();
    let mut detail = Vec::new();
    for o in &out {
        if o.rank == victim {
            assert!(o.killed && o.code.is_none(), "{}", o.story());
            continue;
        }
        let msg = assert_kind(o, "allreduce", &["Remote", "Timeout"]);
        assert!(o.done(), "survivor finished its scenario\n{}", o.story());
        detail.push(format!(
            "rank {}: after {} ops: {msg}",
            o.rank,
            o.ok_detail("completed_before_error")
        ));
    }
    eprintln!("{}", detail.join("\n"));
}

/// Kill one rank of a 2-rank job in the middle of a stream of 64 MiB sends from rank 0 to rank
/// 1: the survivor's send or receive fails with Remote or Timeout before the job deadline
/// (shorter than `MR_TIMEOUT_MS`), as a collective's would.
fn kill_mid_p2p(victim: usize) {
    let env = vec![("MR_TIMEOUT_MS", "60000".to_string())];
    let mut job = Job::new("p2p_loop", &env, Duration::from_secs(30));
    job.spawn_all(2);
    let started = job.wait_line(|r, l| r == victim && l == "STARTED");
    assert!(started.is_some(), "victim never started");
    std::thread::sleep(Duration::from_millis(400));
    let killed = Instant::now();
    job.kill(victim);
    let out = job.finish();
    for o in &out {
        if o.rank == victim {
            assert!(o.killed && o.code.is_none(), "{}", o.story());
            continue;
        }
        let msg = assert_kind(o, "p2p", &["Remote", "Timeout"]);
        assert!(o.done(), "survivor finished its scenario\n{}", o.story());
        eprintln!(
            "rank {} ({}) after {} messages, {} ms after the kill: {msg}",
            o.rank,
            if o.rank == 0 { "sender" } else { "receiver" },
            o.ok_detail("completed_before_error"),
            killed.elapsed().as_millis()
        );
    }
}

#[test]
fn killed_receiver_fails_the_sender_promptly() {
    kill_mid_p2p(1);
}

#[test]
fn killed_sender_fails_the_receiver_promptly() {
    kill_mid_p2p(0);
}

#[test]
fn killed_rank_fails_survivors_promptly() {
    kill_mid_allreduce(2, "ring");
}

/// As [`kill_mid_allreduce`] on a job laid out over emulated hosts (`MR_HOST_ID`), whose
/// collectives run in two levels: ranks 0 and 1 share host a, ranks 2 and 3 are alone.
fn kill_mid_hierarchical_allreduce(victim: usize) {
    let hosts = ["a", "a", "b", "c"];
    let env = vec![("MR_TIMEOUT_MS", "60000".to_string())];
    let mut job = Job::new("allreduce_loop", &env, Duration::from_secs(45));
    for (rank, host) in hosts.iter().enumerate() {
        job.spawn(RankSpec {
            rank,
            size: hosts.len(),
            env: vec![("MR_HOST_ID".to_string(), host.to_string())],
        });
    }
    let started = job.wait_line(|r, l| r == victim && l == "STARTED");
    assert!(started.is_some(), "victim never started");
    std::thread::sleep(Duration::from_millis(400));
    job.kill(victim);
    for o in job.finish() {
        if o.rank == victim {
            assert!(o.killed && o.code.is_none(), "{}", o.story());
            continue;
        }
        let msg = assert_kind(&o, "allreduce", &["Remote", "Timeout", "Aborted"]);
        assert!(o.done(), "survivor finished its scenario\n{}", o.story());
        eprintln!("rank {}: {msg}", o.rank);
    }
}

#[test]
fn killed_rank_with_a_host_partner_fails_a_hierarchical_job_promptly() {
    kill_mid_hierarchical_allreduce(1);
}

#[test]
fn killed_host_leader_fails_a_hierarchical_job_promptly() {
    kill_mid_hierarchical_allreduce(0);
}

#[test]
fn killed_rank_alone_on_its_host_fails_a_hierarchical_job_promptly() {
    kill_mid_hierarchical_allreduce(3);
}

#[test]
fn killed_rank_zero_fails_survivors_promptly() {
    kill_mid_allreduce(0, "ring");
}

#[test]
fn killed_rank_fails_survivors_promptly_over_shared_memory() {
    kill_mid_allreduce(2, "auto");
}

#[test]
fn killed_rank_zero_fails_survivors_promptly_over_shared_memory() {
    kill_mid_allreduce(0, "auto");
}

#[test]
fn abort_ends_a_blocked_op_and_every_later_one() {
    abort_ends_every_op("ring");
}

#[test]
fn abort_ends_a_blocked_op_and_every_later_one_over_shared_memory() {
    abort_ends_every_op("auto");
}

fn abort_ends_every_op(algo: &str) {
    let env = vec![
        ("MR_TIMEOUT_MS", "60000".to_string()),
        ("MR_ALGO", algo.to_string()),
    ];
    let mut job = Job::new("abort", &env, Duration::from_secs(30));
    job.spawn_all(2);
    let rank0 = job.wait_one(0);
    for step in [
        "blocked_allreduce",
        "allreduce_after",
        "barrier_after",
        "broadcast_after",
        "iallreduce_after",
    ] {
        assert_kind(rank0, step, &["Aborted"]);
    }
    assert!(rank0.done(), "{}", rank0.story());
    job.tell(1, "go");
    let out = job.finish();
    let rank1 = &out[1];
    assert!(rank1.done(), "{}", rank1.story());
    // The peer's abort closed its connections: rank 1's next op reports the lost peer.
    let msg = assert_kind(rank1, "barrier_after_peer_abort", &["Remote"]);
    assert!(msg.contains("rank 0"), "names the peer: {msg}");
}

/// An op started after the communicator broke reports why it broke (Remote, naming the lost
/// peer), not `Aborted`: nobody called abort.
#[test]
fn op_after_peer_exit_reports_the_lost_peer() {
    op_after_peer_exit("ring");
}

#[test]
fn op_after_peer_exit_reports_the_lost_peer_over_shared_memory() {
    op_after_peer_exit("auto");
}

fn op_after_peer_exit(algo: &str) {
    let env = vec![
        ("MR_TIMEOUT_MS", "60000".to_string()),
        ("MR_ALGO", algo.to_string()),
    ];
    let mut job = Job::new("peer_exits", &env, Duration::from_secs(30));
    job.spawn_all(2);
    let rank1 = job.wait_one(1);
    assert!(rank1.done() && rank1.code == Some(0), "{}", rank1.story());
    job.tell(0, "go");
    let out = job.finish();
    let msg = assert_kind(&out[0], "barrier_after_peer_exit", &["Remote"]);
    assert!(msg.contains("rank 1"), "names the peer: {msg}");
    assert!(out[0].done(), "{}", out[0].story());
}

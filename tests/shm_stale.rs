//! A run whose rank 0 was SIGKILLed right after creating its shared-memory segment leaves the
//! file behind; jobs started from the environment reuse their job id, so the next run must
//! still get shared memory rather than quietly falling back to TCP.

mod support;

use mapreduce::{Comm, ReduceOp, UniqueId};
use std::time::Duration;
use support::{err, ok, Job, RankSpec};

#[test]
#[ignore = "entry point of the child ranks the other tests spawn"]
fn rank_child() {
    support::child_entry(play);
}

fn play(ctx: support::Ctx) {
    assert_eq!(ctx.scenario, "env_join");
    let comm = match Comm::init_env() {
        Ok(c) => c,
        Err(e) => return err("init", &e),
    };
    ok("shared_memory", comm.uses_shared_memory());
    let mut v = vec![comm.rank() as f32 + 1.0; 100_000];
    match comm.allreduce(&mut v, ReduceOp::Sum) {
        Ok(()) if v.iter().all(|&x| x == 3.0) => ok("allreduce", ""),
        Ok(()) => say_wrong(),
        Err(e) => err("allreduce", &e),
    }
    let _ = comm.destroy();
}

fn say_wrong() {
    support::say("ERR allreduce Internal wrong sum");
}

const TOKEN: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";

/// A two-rank env job; `rank0_env` goes to rank 0 only.
fn run(port: u16, rank0_env: &[(&str, &str)]) -> Vec<support::Outcome> {
    let env = [
        ("MR_BOOTSTRAP", format!("127.0.0.1:{port}")),
        ("MR_WORLD_SIZE", "2".to_string()),
        ("MR_TOKEN", TOKEN.to_string()),
        ("MR_TIMEOUT_MS", "10000".to_string()),
    ];
    let mut job = Job::new("env_join", &env, Duration::from_secs(40));
    job.set_id(&UniqueId([0; 256]));
    for rank in 0..2 {
        let mut e = vec![("MR_RANK".to_string(), rank.to_string())];
        if rank == 0 {
            e.extend(
                rank0_env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            );
        }
        job.spawn(RankSpec {
            rank,
            size: 2,
            env: e,
        });
    }
    job.finish()
}

/// Segment files of this job (every run of it) under /dev/shm.
fn leftovers(port: u16) -> Vec<std::path::PathBuf> {
    let secret = mapreduce::config::parse_hex("token", TOKEN).unwrap();
    let addr = format!("127.0.0.1:{port}");
    let job = blake3::hash(&[&secret[..], addr.as_bytes()].concat());
    let prefix = format!(
        "mapreduce-{}",
        mapreduce::config::to_hex(&job.as_bytes()[..16])
    );
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_crashed_rank_zero_does_not_push_the_next_run_onto_tcp() {
    if !std::path::Path::new("/dev/shm").is_dir() {
        eprintln!("no /dev/shm here: nothing to test");
        return;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let _cleanup = RemoveLeftovers(port);
    let first = run(port, &[("MR_TEST_KILL_AFTER_SHM_CREATE", "1")]);
    assert_eq!(
        first[0].code,
        None,
        "rank 0 was not killed\n{}",
        first[0].story()
    );
    let stale = leftovers(port);
    assert!(!stale.is_empty(), "the crash left no segment behind");
    let second = run(port, &[]);
    for o in &second {
        o.assert_clean();
        assert_eq!(
            o.ok_detail("shared_memory"),
            "true",
            "rank {}: the next run fell back to TCP\n{}",
            o.rank,
            o.story()
        );
    }
}

/// Removes this test's segment files however the test ends.
struct RemoveLeftovers(u16);

impl Drop for RemoveLeftovers {
    fn drop(&mut self) {
        for f in leftovers(self.0) {
            let _ = std::fs::remove_file(f);
        }
    }
}

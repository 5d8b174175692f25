//! Hierarchical collectives through real `mr-relayd` relays: the hosts' rails carry the
//! inter-host traffic through the relays (one contribution per host), results are exact and
//! identical on every rank, and a relay killed in the middle of an op is replaced.

mod relay_util;
mod threaded;

use mapreduce::{Comm, Config, ReduceOp};
use relay_util::{relay_config, RelayProc, TOKEN};
use std::time::{Duration, Instant};

/// Run `f` on every rank of a job laid out as `hosts`, with `cfg` plus each rank's host id;
/// every rank must run hierarchically.
fn run<T: Send + 'static>(
    hosts: &[&str],
    cfg: Config,
    f: impl Fn(&Comm) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let config = |r: usize| Config {
        host_id: Some(hosts[r].to_string()),
        ..cfg.clone()
    };
    threaded::run_ranks(hosts.len(), config, move |comm| {
        assert!(comm.uses_hierarchy());
        f(comm)
    })
}

fn value(r: usize, i: usize) -> i64 {
    ((r * 7 + i * 3) % 11) as i64 - 3
}

#[test]
fn leaders_go_through_the_relays() {
    for (hosts, relays) in [
        (&["a", "a", "b", "b"][..], 2),
        (&["a", "a", "b", "c"][..], 3),
        (&["a", "a", "b", "b", "c", "c"][..], 2),
    ] {
        let procs: Vec<RelayProc> = (0..relays).map(|_| RelayProc::start(TOKEN)).collect();
        let n = hosts.len();
        let h = hosts
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let out = run(hosts, relay_config(&procs, TOKEN), move |comm| {
            let r = comm.rank();
            for count in [1usize, n - 1, 100_003, 1 << 20] {
                let mut a: Vec<i32> = (0..count).map(|i| value(r, i) as i32).collect();
                comm.allreduce(&mut a, ReduceOp::Sum).unwrap();
                for (i, x) in a.iter().enumerate() {
                    assert_eq!(i64::from(*x), (0..n).map(|q| value(q, i)).sum::<i64>());
                }
                for root in [0, n - 1] {
                    let mut b: Vec<f32> = if r == root {
                        (0..count).map(|i| i as f32).collect()
                    } else {
                        vec![0.0; count]
                    };
                    comm.broadcast(&mut b, root).unwrap();
                    assert!(b.iter().enumerate().all(|(i, x)| *x == i as f32));
                }
            }
            let mut x: Vec<f32> = (0..300_001)
                .map(|i| ((i as f32 * 0.3 + r as f32).sin() * 1e4).fract())
                .collect();
            comm.allreduce(&mut x, ReduceOp::Sum).unwrap();
            x.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        });
        for o in &out {
            assert_eq!(o, &out[0], "{hosts:?}: identical bits on every rank");
        }
        // Each relay saw a job of one peer per host, and data arrived for it.
        for p in &procs {
            assert!(
                p.wait_log(&format!("new, {h} peers")),
                "{hosts:?}: the relay never saw the leaders' job: {:?}",
                p.log.lock().unwrap()
            );
        }
    }
}

#[test]
fn killed_relay_mid_hierarchical_allreduce_is_replaced() {
    let mut procs: Vec<RelayProc> = (0..2).map(|_| RelayProc::start(TOKEN)).collect();
    let cfg = Config {
        timeout: Duration::from_secs(60),
        ..relay_config(&procs, TOKEN)
    };
    // Strike once the victim's status line shows data arriving between hosts (only the
    // rails' jobs send it any), so the kill lands in the ops between hosts.
    let victim = procs.remove(1);
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = killed.clone();
    let killer = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let flowing = victim
                .log
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("status:") && !l.contains("in 0.0 MB"));
            if flowing {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut v = victim;
        let _ = v.child.kill();
        let struck = Instant::now();
        let _ = v.child.wait();
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        struck
    });
    let n = 4;
    // All-reduces back to back (the relay's status line, which the killer waits for, comes
    // once a second, and one op may be shorter) until every rank knows the relay was killed,
    // then one more: every result exact, and ops ran across the kill.
    let out = run(&["a", "a", "b", "b"], cfg, move |comm| {
        let r = comm.rank();
        let count = 16 << 20;
        let tri = (n * (n + 1) / 2) as f32;
        let mut exact = true;
        let mut finished = Vec::new();
        let mut after = 0;
        for _ in 0..60 {
            let mut x: Vec<f32> = (0..count).map(|i| ((i % 1000) * (r + 1)) as f32).collect();
            comm.allreduce(&mut x, ReduceOp::Sum).unwrap();
            finished.push(Instant::now());
            exact &= x
                .iter()
                .enumerate()
                .all(|(i, v)| *v == (i % 1000) as f32 * tri);
            // Decide together whether the kill has happened.
            let mut seen = [i32::from(killed.load(std::sync::atomic::Ordering::SeqCst))];
            comm.allreduce(&mut seen, ReduceOp::Max).unwrap();
            if seen[0] == 1 {
                after += 1;
                if after == 2 {
                    break;
                }
            }
        }
        (exact, finished)
    });
    let struck = killer.join().unwrap();
    for (r, (exact, finished)) in out.iter().enumerate() {
        assert!(*exact, "rank {r}: exact results across the kill");
        assert!(
            finished.iter().any(|t| *t > struck),
            "rank {r}: no op finished after the relay was killed ({} ops)",
            finished.len()
        );
    }
}

/// A relay that perturbs a `fraction` of its result chunks, and a job configured to use it
/// alone with `MR_VERIFY=1` (kept running while the returned process lives).
fn corrupting_relay(fraction: &str) -> (RelayProc, Config) {
    let bad = RelayProc::start_with_env(TOKEN, &[], &[("MR_RELAY_TEST_CORRUPT", fraction)]);
    let cfg = Config {
        verify: true,
        timeout: Duration::from_secs(30),
        ..relay_config(std::slice::from_ref(&bad), TOKEN)
    };
    (bad, cfg)
}

/// `MR_VERIFY=1` in a hierarchical job with a relay that corrupts every chunk: every rank of
/// every host fails with `Verify` naming the relay and the level between hosts, and none
/// returns a wrong sum. The first exchange through the relays is already caught: the job's own
/// agreement on its relays at init, which runs hierarchically; so is any later all-reduce.
#[test]
fn verify_catches_a_corrupting_relay_in_a_hierarchical_job() {
    let (_bad, cfg) = corrupting_relay("1");
    let hosts = ["a", "a", "b", "b"];
    let n = hosts.len();
    let id = mapreduce::UniqueId::new(&cfg).unwrap();
    let ranks: Vec<_> = (0..n)
        .map(|r| {
            let cfg = Config {
                host_id: Some(hosts[r].to_string()),
                ..cfg.clone()
            };
            std::thread::spawn(move || {
                let comm = match Comm::init(n, &id, r, cfg) {
                    Ok(c) => c,
                    Err(e) => return (Err(e.kind), e.message),
                };
                assert!(comm.uses_hierarchy());
                let mut x: Vec<f32> = (0..100_000).map(|i| ((i % 100) * (r + 1)) as f32).collect();
                let got = match comm.allreduce(&mut x, ReduceOp::Sum) {
                    Ok(()) => {
                        let tri = (n * (n + 1) / 2) as f32;
                        let exact = x
                            .iter()
                            .enumerate()
                            .all(|(i, v)| *v == (i % 100) as f32 * tri);
                        (Ok(exact), String::new())
                    }
                    Err(e) => (Err(e.kind), e.message),
                };
                let _ = comm.destroy();
                got
            })
        })
        .collect();
    for (r, t) in ranks.into_iter().enumerate() {
        let (o, msg) = t.join().unwrap();
        assert_ne!(o, Ok(false), "rank {r} returned a wrong sum");
        assert_eq!(o, Err(mapreduce::ErrorKind::Verify), "rank {r}: {msg}");
        assert!(
            msg.contains("between hosts") && msg.contains("relay 0"),
            "rank {r}: {msg}"
        );
    }
}

/// A relay corrupting a fraction of its result chunks, caught by `MR_VERIFY` on some rails
/// and pieces of a pipelined all-reduce and not on others: every rank ends each op alike
/// (all with the verification error, or all with a result where sampling missed the
/// corruption), and the job stays usable — the ranks of a host stopped at the same op, so
/// the next all-reduce neither hangs nor meets a stray op of the last one ("mismatched
/// collective calls"). Which rail and piece fail is random; a version that let one rank of
/// a host issue one more local op than another failed this in most runs.
#[test]
fn a_verification_failure_on_one_rail_leaves_the_job_usable() {
    let (_bad, cfg) = corrupting_relay("0.005");
    let hosts = ["a", "a", "b", "b"];
    let outcomes = run(&hosts, cfg, move |comm| {
        let r = comm.rank();
        let mut seen = Vec::new();
        // 48 MiB of float32: four pieces, so a rail can fail two pieces before the last.
        let count = 12 << 20;
        for _ in 0..4 {
            let mut x: Vec<f32> = (0..count).map(|i| ((i % 100) * (r + 1)) as f32).collect();
            seen.push(
                comm.allreduce(&mut x, ReduceOp::Sum)
                    .map_err(|e| (e.kind, e.message)),
            );
            let mut y = vec![r as f32; 1000];
            seen.push(
                comm.allreduce(&mut y, ReduceOp::Sum)
                    .map_err(|e| (e.kind, e.message)),
            );
        }
        seen
    });
    for op in 0..outcomes[0].len() {
        for (r, seen) in outcomes.iter().enumerate() {
            if let Err((kind, msg)) = &seen[op] {
                assert_eq!(
                    *kind,
                    mapreduce::ErrorKind::Verify,
                    "rank {r}, op {op}: {msg}"
                );
            }
            assert_eq!(
                seen[op].is_ok(),
                outcomes[0][op].is_ok(),
                "op {op}: rank {r} and rank 0 ended it differently: {:?} / {:?}",
                seen[op],
                outcomes[0][op]
            );
        }
    }
}

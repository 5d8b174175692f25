//! All-reduce and broadcast through real `mr-relayd` processes, peers in threads.

mod relay_util;

use half::{bf16, f16};
use mapreduce::{Algo, Element, ReduceOp};
use relay_util::{relay_config, run_job, RelayProc, TOKEN};

/// Integer-valued input of rank `r` at index `i`: sums are exact in every dtype used.
fn val(r: usize, i: usize) -> i64 {
    ((i * 7 + r * 3) % 11) as i64 - 5
}

/// 0, 1, fewer than the relays, odd, and 64 MiB of f32.
fn counts(relays: usize) -> Vec<usize> {
    vec![0, 1, relays.saturating_sub(1).max(1), 1001, 16 << 20]
}

#[test]
fn allreduce_and_broadcast_for_every_peer_and_relay_count() {
    for r in [1, 2, 3, 5] {
        let relays: Vec<RelayProc> = (0..r).map(|_| RelayProc::start(TOKEN)).collect();
        for p in [1, 2, 3, 4, 8] {
            let cfg = relay_config(&relays, TOKEN);
            let res = run_job(p, cfg, move |comm| {
                assert_eq!(comm.relays().len(), r, "every relay is in use");
                let rank = comm.rank();
                let mut outs = Vec::new();
                for count in counts(r) {
                    let mut v: Vec<f32> = (0..count).map(|i| val(rank, i) as f32).collect();
                    comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
                    // val(_, i) repeats every 11 elements.
                    let want: Vec<i64> = (0..11).map(|i| (0..p).map(|q| val(q, i)).sum()).collect();
                    for (i, x) in v.iter().enumerate() {
                        assert_eq!(*x, want[i % 11] as f32, "p={p} r={r} count={count} i={i}");
                    }
                    let bits: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    outs.push(blake3::hash(&bits));
                }
                for root in 0..p {
                    let mut b: Vec<i32> = if rank == root {
                        (0..100_003).map(|i| (i * (root + 1)) as i32).collect()
                    } else {
                        vec![-1; 100_003]
                    };
                    comm.broadcast(&mut b, root).unwrap();
                    assert!(
                        b.iter()
                            .enumerate()
                            .all(|(i, x)| *x == (i * (root + 1)) as i32),
                        "broadcast from root {root}, p={p} r={r}"
                    );
                }
                comm.destroy().unwrap();
                outs
            });
            assert!(
                res.windows(2).all(|w| w[0] == w[1]),
                "identical on every rank"
            );
            for relay in &relays {
                assert!(
                    relay.wait_log(&format!("new, {p} peers")),
                    "relay served the job"
                );
            }
        }
    }
}

fn check_dtype<T: Element + PartialEq + std::fmt::Debug + Copy>(
    relays: &[RelayProc],
    p: usize,
    op: ReduceOp,
    from: fn(i64) -> T,
    count: usize,
) {
    let mut ring_cfg = relay_config(relays, TOKEN);
    ring_cfg.algo = Algo::Ring;
    let relay_cfg = relay_config(relays, TOKEN);
    let job = move |comm: mapreduce::Comm| {
        let mut v: Vec<T> = (0..count)
            .map(|i| from(val(comm.rank(), i).abs() % 4 + 1))
            .collect();
        comm.allreduce(&mut v, op).unwrap();
        comm.destroy().unwrap();
        v
    };
    let ring = run_job(p, ring_cfg, job);
    let relay = run_job(p, relay_cfg, job);
    for (r, got) in relay.iter().enumerate() {
        assert_eq!(
            got,
            &ring[0],
            "{op:?} {:?}: rank {r} differs from the ring",
            T::DTYPE
        );
    }
}

#[test]
fn dtypes_and_ops_match_the_ring() {
    let relays: Vec<RelayProc> = (0..2).map(|_| RelayProc::start(TOKEN)).collect();
    let count = 70_001;
    for op in [
        ReduceOp::Sum,
        ReduceOp::Max,
        ReduceOp::Min,
        ReduceOp::Prod,
        ReduceOp::Avg,
    ] {
        check_dtype(&relays, 3, op, |x| x as f64, count);
        check_dtype(&relays, 3, op, |x| x, count);
        check_dtype(&relays, 3, op, |x| x as i32, count);
        check_dtype(&relays, 2, op, |x| x as u8, count);
        check_dtype(&relays, 2, op, |x| x as i8, count);
        check_dtype(&relays, 3, op, |x| f16::from_f32(x as f32), count);
        check_dtype(&relays, 3, op, |x| bf16::from_f32(x as f32), count);
    }
}

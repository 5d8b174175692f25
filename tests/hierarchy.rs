//! Hierarchical collectives on emulated layouts (`MR_HOST_ID` per rank, here
//! `Config::host_id`): every collective, dtype and op on integer data equal to the closed
//! form; random data bitwise identical on every rank; uneven layouts; counts 0, 1, fewer than
//! the ranks, odd; `MR_HIERARCHY=0` stays flat.

mod threaded;

use mapreduce::{Comm, Config, ReduceOp};

const LAYOUTS: &[&[&str]] = &[
    &["a", "a", "b", "b"],
    &["a", "b", "b", "b"],
    &["a", "a", "a", "b"],
    &["a", "a", "b", "c"],
    &["a", "a", "b", "b", "c", "c"],
    // Hosts holding interleaved ranks.
    &["a", "b", "a", "b"],
];

fn config(host: &str, hierarchy: bool) -> Config {
    Config {
        timeout: std::time::Duration::from_secs(30),
        host_id: Some(host.to_string()),
        hierarchy,
        // Small pieces so modest counts cross several chunks on every path.
        chunk_bytes: 4096,
        ..Config::default()
    }
}

/// Run `f` on every rank of a job laid out as `hosts`; what each rank returned, in order.
fn run<T: Send + 'static>(
    hosts: &[&str],
    hierarchy: bool,
    f: impl Fn(&Comm) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    threaded::run_ranks(hosts.len(), |r| config(hosts[r], hierarchy), f)
}

fn value(r: usize, i: usize) -> i64 {
    ((r * 7 + i * 3) % 11) as i64 - 3
}

#[test]
fn every_collective_on_every_layout() {
    for hosts in LAYOUTS {
        let n = hosts.len();
        run(hosts, true, move |comm| {
            assert!(comm.uses_hierarchy(), "{hosts:?}");
            let r = comm.rank();
            for count in [0usize, 1, n - 1, 4097, 100_003] {
                // All-reduce: every op on integer data, exact in every dtype used here.
                for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
                    let mut a: Vec<i32> = (0..count).map(|i| value(r, i) as i32).collect();
                    comm.allreduce(&mut a, op).unwrap();
                    let mut f: Vec<f32> = (0..count).map(|i| value(r, i) as f32).collect();
                    comm.allreduce(&mut f, op).unwrap();
                    for i in 0..count {
                        let vals = (0..n).map(|q| value(q, i));
                        let want = match op {
                            ReduceOp::Sum => vals.sum(),
                            ReduceOp::Max => vals.max().unwrap(),
                            _ => vals.min().unwrap(),
                        };
                        assert_eq!(
                            i64::from(a[i]),
                            want,
                            "{hosts:?} {op:?} count {count} i {i}"
                        );
                        assert_eq!(f[i], want as f32, "{hosts:?} {op:?} f32 count {count}");
                    }
                }
                // AVG divides once, by the world size.
                let mut avg: Vec<f64> = (0..count).map(|i| (i * n * (r + 1)) as f64).collect();
                comm.allreduce(&mut avg, ReduceOp::Avg).unwrap();
                let tri = (n * (n + 1) / 2) as f64;
                assert!(avg.iter().enumerate().all(|(i, x)| *x == i as f64 * tri));
                // Broadcast from every root.
                for root in 0..n {
                    let mut b: Vec<i64> = if r == root {
                        (0..count as i64).map(|i| i * 3 + root as i64).collect()
                    } else {
                        vec![-1; count]
                    };
                    comm.broadcast(&mut b, root).unwrap();
                    assert!(
                        b.iter()
                            .enumerate()
                            .all(|(i, x)| *x == i as i64 * 3 + root as i64),
                        "{hosts:?} broadcast root {root} count {count}"
                    );
                }
                // All-gather: rank order, whatever the hosts.
                let mine: Vec<i64> = (0..count).map(|i| (r * 1000 + i) as i64).collect();
                let mut all = vec![0i64; count * n];
                comm.allgather(&mine, &mut all).unwrap();
                for q in 0..n {
                    for i in 0..count {
                        assert_eq!(
                            all[q * count + i],
                            (q * 1000 + i) as i64,
                            "{hosts:?} allgather"
                        );
                    }
                }
                // Reduce-scatter: block r of the sum.
                let send: Vec<i32> = (0..count * n).map(|i| value(r, i) as i32).collect();
                let mut recv = vec![0i32; count];
                comm.reduce_scatter(&send, &mut recv, ReduceOp::Sum)
                    .unwrap();
                for (i, got) in recv.iter().enumerate() {
                    let want: i64 = (0..n).map(|q| value(q, r * count + i)).sum();
                    assert_eq!(i64::from(*got), want, "{hosts:?} reduce_scatter");
                }
                // ... of the maximum, and of the average (divided once, by the world size).
                comm.reduce_scatter(&send, &mut recv, ReduceOp::Max)
                    .unwrap();
                for (i, got) in recv.iter().enumerate() {
                    let want = (0..n).map(|q| value(q, r * count + i)).max().unwrap();
                    assert_eq!(i64::from(*got), want, "{hosts:?} reduce_scatter max");
                }
                let send: Vec<f64> = (0..count * n).map(|i| (i * n * (r + 1)) as f64).collect();
                let mut recv = vec![0f64; count];
                comm.reduce_scatter(&send, &mut recv, ReduceOp::Avg)
                    .unwrap();
                for (i, got) in recv.iter().enumerate() {
                    let want = ((r * count + i) * n * (n + 1) / 2) as f64;
                    assert_eq!(*got, want, "{hosts:?} reduce_scatter avg");
                }
                comm.barrier().unwrap();
            }
        });
    }
}

#[test]
fn random_data_is_bitwise_identical_on_every_rank() {
    for hosts in LAYOUTS {
        let out = run(hosts, true, |comm| {
            let r = comm.rank() as f32;
            let mut x: Vec<f32> = (0..50_001)
                .map(|i| ((i as f32 * 0.618 + r * 1.37).sin() * 1e3).exp2().ln())
                .collect();
            comm.allreduce(&mut x, ReduceOp::Sum).unwrap();
            let mut h: Vec<half::bf16> = (0..5001)
                .map(|i| half::bf16::from_f32((i as f32 * 0.1 + r).cos()))
                .collect();
            comm.allreduce(&mut h, ReduceOp::Sum).unwrap();
            (
                x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                h.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            )
        });
        for o in &out {
            assert_eq!(o, &out[0], "{hosts:?}");
        }
    }
}

#[test]
fn large_all_reduce_and_flat_switch() {
    // 64 MiB of float32 on two hosts of two ranks, hierarchical and flat (MR_HIERARCHY=0).
    for hierarchy in [true, false] {
        run(&["a", "a", "b", "b"], hierarchy, move |comm| {
            assert_eq!(comm.uses_hierarchy(), hierarchy);
            let r = comm.rank();
            let count = 16 << 20;
            let mut x: Vec<f32> = (0..count).map(|i| ((i % 1000) * (r + 1)) as f32).collect();
            comm.allreduce(&mut x, ReduceOp::Sum).unwrap();
            assert!(x
                .iter()
                .enumerate()
                .all(|(i, v)| *v == ((i % 1000) * 10) as f32));
        });
    }
}

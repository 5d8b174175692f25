//! Whole communicators in threads of one process: a fast check of bootstrap + engine + ring.

use mapreduce::{Comm, Config, ReduceOp, UniqueId};

fn run<F>(n: usize, f: F)
where
    F: Fn(Comm) + Send + Sync + Clone + 'static,
{
    let cfg = Config {
        timeout: std::time::Duration::from_secs(3),
        ..Config::default()
    };
    let id = UniqueId::new(&cfg).unwrap();
    let handles: Vec<_> = (0..n)
        .map(|r| {
            let cfg = cfg.clone();
            let f = f.clone();
            std::thread::spawn(move || {
                let comm = Comm::init(n, &id, r, cfg).unwrap();
                f(comm);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn allreduce_sizes_in_threads() {
    for n in [1, 2, 3, 4] {
        run(n, move |comm| {
            for count in [0usize, 1, 5, 1000, 300_000] {
                let r = comm.rank() as f32;
                let mut v: Vec<f32> = (0..count).map(|i| r + i as f32).collect();
                comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
                let tri = (n * (n - 1) / 2) as f32;
                for (i, x) in v.iter().enumerate() {
                    assert_eq!(*x, tri + (n * i) as f32, "n={n} count={count} i={i}");
                }
            }
            let mut b: Vec<i64> = if comm.rank() == n - 1 {
                (0..100_000).collect()
            } else {
                vec![0; 100_000]
            };
            comm.broadcast(&mut b, n - 1).unwrap();
            assert!(b.iter().enumerate().all(|(i, x)| *x == i as i64));
            comm.barrier().unwrap();
            comm.destroy().unwrap();
        });
    }
}

//! Layouts of several ranks per host, emulated with `MR_HOST_ID` (here `Config::host_id`):
//! every rank learns the same host numbering, its local rank and size; shared memory is used
//! only when every rank is on one host; collectives stay exact on every layout.

mod threaded;

use mapreduce::{Config, ReduceOp};

/// (host index, local rank, local size, host count, uses shared memory) of every rank.
type Seen = (usize, usize, usize, usize, bool);

/// Run a job whose rank r is on host `hosts[r]` (an MR_HOST_ID value per rank).
fn run(hosts: &[&str]) -> Vec<Seen> {
    let n = hosts.len();
    let config = |r: usize| Config {
        timeout: std::time::Duration::from_secs(20),
        host_id: Some(hosts[r].to_string()),
        ..Config::default()
    };
    threaded::run_ranks(n, config, move |comm| {
        let r = comm.rank();
        // Collectives work on every layout.
        let mut v: Vec<i64> = (0..100_000).map(|i| i + r as i64).collect();
        comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
        let tri = (n * (n - 1) / 2) as i64;
        assert!(v
            .iter()
            .enumerate()
            .all(|(i, x)| *x == n as i64 * i as i64 + tri));
        (
            comm.layout().host(),
            comm.local_rank(),
            comm.local_size(),
            comm.host_count(),
            comm.uses_shared_memory(),
        )
    })
}

#[test]
fn every_layout_is_seen_alike_by_every_rank() {
    let cases: &[(&[&str], &[Seen])] = &[
        (
            &["a", "a", "b", "b"],
            &[
                (0, 0, 2, 2, false),
                (0, 1, 2, 2, false),
                (1, 0, 2, 2, false),
                (1, 1, 2, 2, false),
            ],
        ),
        (
            &["a", "b", "b", "b"],
            &[
                (0, 0, 1, 2, false),
                (1, 0, 3, 2, false),
                (1, 1, 3, 2, false),
                (1, 2, 3, 2, false),
            ],
        ),
        (
            &["a", "a", "a", "b"],
            &[
                (0, 0, 3, 2, false),
                (0, 1, 3, 2, false),
                (0, 2, 3, 2, false),
                (1, 0, 1, 2, false),
            ],
        ),
        (
            &["a", "a", "b", "c"],
            &[
                (0, 0, 2, 3, false),
                (0, 1, 2, 3, false),
                (1, 0, 1, 3, false),
                (2, 0, 1, 3, false),
            ],
        ),
        (
            // Hosts need not hold consecutive ranks; they are numbered by their lowest rank.
            &["x", "y", "z", "x", "y", "z"],
            &[
                (0, 0, 2, 3, false),
                (1, 0, 2, 3, false),
                (2, 0, 2, 3, false),
                (0, 1, 2, 3, false),
                (1, 1, 2, 3, false),
                (2, 1, 2, 3, false),
            ],
        ),
    ];
    for (hosts, want) in cases {
        assert_eq!(&run(hosts), want, "layout {hosts:?}");
    }
}

#[test]
fn one_host_uses_shared_memory() {
    let seen = run(&["same", "same", "same"]);
    for (r, s) in seen.iter().enumerate() {
        assert_eq!((s.0, s.1, s.2, s.3), (0, r, 3, 1));
    }
    // Where /dev/shm works, one host means shared memory for every rank alike.
    assert!(seen.iter().all(|s| s.4 == seen[0].4));
}

//! `MR_MAX_RATE` caps what a rank sends: a transfer never beats the cap (a lower bound on
//! time, which a loaded machine can only lengthen), and results stay exact.

mod relay_util;

use mapreduce::{Comm, Config, ReduceOp, UniqueId};
use relay_util::{relay_config, run_job, RelayProc, TOKEN};
use std::time::{Duration, Instant};

#[test]
fn a_capped_rank_sends_no_faster_than_its_cap() {
    let rate = 20_000_000u64; // 20 MB/s
    let bytes = 8usize << 20;
    let cfg = Config {
        timeout: Duration::from_secs(60),
        shm: false,
        max_rate: Some(rate),
        ..Config::default()
    };
    let id = UniqueId::new(&cfg).unwrap();
    let joins: Vec<_> = (0..2)
        .map(|r| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let comm = Comm::init(2, &id, r, cfg).unwrap();
                let mut b: Vec<u8> = if r == 0 {
                    (0..bytes).map(|i| (i % 251) as u8).collect()
                } else {
                    vec![0; bytes]
                };
                comm.barrier().unwrap();
                let t = Instant::now();
                comm.broadcast(&mut b, 0).unwrap();
                let took = t.elapsed();
                assert!(b.iter().enumerate().all(|(i, x)| *x == (i % 251) as u8));
                let mut v: Vec<f32> = vec![1.0; 1 << 20];
                comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
                assert!(v.iter().all(|x| *x == 2.0));
                comm.destroy().unwrap();
                took
            })
        })
        .collect();
    let took: Vec<Duration> = joins.into_iter().map(|j| j.join().unwrap()).collect();
    // The root's 8 MiB at 20 MB/s: at least 0.42 s, less one burst of credit (0.2 MB), less
    // 20 ms for the receiver leaving the barrier after the root started sending (its clock
    // starts late when it is scheduled late; an uncapped run takes ~10 ms in all).
    let floor = Duration::from_secs_f64((bytes as f64 - 262_144.0) / rate as f64)
        .saturating_sub(Duration::from_millis(20));
    assert!(
        took[1] >= floor,
        "received 8 MiB in {:?}, faster than the cap allows ({floor:?})",
        took[1]
    );
}

#[test]
fn max_rate_parses() {
    for (v, want) in [("125M", 125_000_000u64), ("1gbit", 125_000_000)] {
        std::env::set_var("MR_MAX_RATE", v);
        assert_eq!(Config::from_env().unwrap().max_rate, Some(want));
    }
    std::env::set_var("MR_MAX_RATE", "fast");
    let e = Config::from_env().unwrap_err();
    assert!(e.message.contains("MR_MAX_RATE"), "{e}");
    std::env::remove_var("MR_MAX_RATE");
}

#[test]
fn a_capped_relay_sends_no_faster_than_its_cap() {
    // One relay capped at 10 MB/s answers 2 peers: 2 x 4 MiB of results leave it.
    let rate = 10_000_000u64;
    let relay = RelayProc::start_with(TOKEN, &["--max-rate", "10M"]);
    let cfg = Config {
        timeout: Duration::from_secs(60),
        ..relay_config(std::slice::from_ref(&relay), TOKEN)
    };
    let count = 1usize << 20;
    let took = run_job(2, cfg, move |comm| {
        assert_eq!(comm.relays(), &[0]);
        let r = comm.rank();
        let mut v: Vec<i32> = (0..count as i32).map(|i| i + r as i32).collect();
        comm.barrier().unwrap();
        let t = Instant::now();
        comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
        let took = t.elapsed();
        assert!(v.iter().enumerate().all(|(i, x)| *x == 2 * i as i32 + 1));
        comm.destroy().unwrap();
        took
    });
    let floor = Duration::from_secs_f64((2.0 * 4.0 * 1048576.0 - 100_000.0) / rate as f64);
    for t in took {
        assert!(
            t >= floor,
            "8 MiB of results in {t:?}, faster than the relay's cap ({floor:?})"
        );
    }
}

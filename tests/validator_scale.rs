//! Measurements for BENCHMARKS.md (ignored by default; run in release):
//! `cargo test --release --test validator_scale -- --ignored --nocapture --test-threads 1`.
//! * the relay's CPU per GB received with receipts (validator-assigned jobs) and without
//!   (a static token);
//! * the validator's memory and CPU with 1000 registered relays sending heartbeats.

mod validator_util;
use mapreduce::validator::channel::{self, Credential};
use mapreduce::validator::identity::Identity;
use mapreduce::validator::proto::{Intro, RelayMsg};
use mapreduce::{Algo, Comm, Config, ReduceOp, UniqueId};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use validator_util::*;

/// CPU seconds (user + system) process `pid` has used.
fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
        .unwrap()
}

/// `ops` all-reduces of `count` f32 on 2 ranks with `cfg`.
fn run(cfg: Config, ops: usize, count: usize) {
    let id = UniqueId::new(&cfg).unwrap();
    let hs: Vec<_> = (0..2)
        .map(|r| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let comm = Comm::init(2, &id, r, cfg).unwrap();
                let mut buf = vec![1.0f32; count];
                for _ in 0..ops {
                    comm.allreduce(&mut buf, ReduceOp::Sum).unwrap();
                }
                comm.destroy().unwrap();
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}

#[test]
#[ignore]
fn relay_cpu_per_gb_with_and_without_receipts() {
    let (ops, count) = (16usize, 16usize << 20); // 64 MiB per rank and op
    let received_gb = (2 * ops * count * 4) as f64 / 1e9;
    let dir = tmpdir("scale-relay");
    // Without: a static relay.
    let token = "00112233445566778899aabbccddeeff";
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mr-relayd"));
    cmd.args(["--listen", "127.0.0.1:0", "--token", token]);
    let plain = Proc::spawn(cmd);
    let cfg = Config {
        algo: Algo::Relay,
        relays: vec![plain.addr.clone()],
        token: Some(mapreduce::config::parse_hex("t", token).unwrap()),
        timeout: Duration::from_secs(120),
        ..Config::default()
    };
    let c0 = cpu_secs(plain.child.id());
    let t = Instant::now();
    run(cfg, ops, count);
    let plain_cpu = cpu_secs(plain.child.id()) - c0;
    let plain_wall = t.elapsed().as_secs_f64();
    drop(plain);
    // With: a validator-assigned relay keeping receipts; 10% of ops reported with evidence.
    let v = validator(
        &dir,
        "127.0.0.1:0",
        r#"{"heartbeat_timeout_ms": 6000, "default_relays": 1, "report_fraction": 0.1, "bench": {"interval_secs": 0}}"#,
    );
    let r = relay(&v, &dir.join("r.key"), "127.0.0.1:0", &[]);
    wait_status(&v, "relay registered", |rows| up(rows) == 1);
    let cfg = Config {
        timeout: Duration::from_secs(120),
        ..job_config(&v, false)
    };
    let cfg = Config {
        chunk_bytes: Config::default().chunk_bytes,
        relay_chunk_bytes: Config::default().relay_chunk_bytes,
        ..cfg
    };
    let c0 = cpu_secs(r.child.id());
    let t = Instant::now();
    run(cfg, ops, count);
    let signed_cpu = cpu_secs(r.child.id()) - c0;
    let signed_wall = t.elapsed().as_secs_f64();
    println!(
        "relay CPU per GB received ({ops} all-reduces of {} MiB on 2 ranks, {received_gb:.2} GB in): \
         without receipts {:.3} s/GB ({plain_wall:.1} s wall), with signed receipts {:.3} s/GB ({signed_wall:.1} s wall)",
        (count * 4) >> 20,
        plain_cpu / received_gb,
        signed_cpu / received_gb
    );
}

#[test]
#[ignore]
fn validator_with_1000_relays() {
    let n = 1000;
    let dir = tmpdir("scale-1000");
    let v = validator(
        &dir,
        "127.0.0.1:0",
        r#"{"heartbeat_timeout_ms": 6000, "enroll_per_minute": 100000, "max_connections": 2048, "bench": {"interval_secs": 0}}"#,
    );
    let pid = v.child.id();
    let (rss0, cpu0) = (rss_kib(pid), cpu_secs(pid));
    let stop = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    let relays: Vec<_> = (0..n)
        .map(|i| {
            let addr = v.addr.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .stack_size(128 << 10)
                .spawn(move || {
                    let key = Identity::generate();
                    let intro = Intro::Relay {
                        addr: format!("127.0.0.1:{}", 1 + i % 1000),
                        capacity: 1 << 30,
                        free_memory: 1 << 30,
                    };
                    // Like mr-relayd, retry when the validator drops a handshake (a burst of
                    // 1000 connections overflows its handshake slots, oldest first).
                    let mut ch = None;
                    for _ in 0..50 {
                        match channel::connect(
                            &addr,
                            &intro,
                            Credential::Identity(&key),
                            None,
                            Duration::from_secs(30),
                        ) {
                            Ok(c) => {
                                ch = Some(c);
                                break;
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(200)),
                        }
                    }
                    let mut ch = ch.expect("registered");
                    while !stop.load(Ordering::SeqCst) {
                        let hb = RelayMsg::Heartbeat {
                            free_memory: 1 << 30,
                            jobs: 0,
                        };
                        if ch.send(&hb, Duration::from_secs(5)).is_err() {
                            return false;
                        }
                        std::thread::sleep(Duration::from_secs(2));
                    }
                    true
                })
                .unwrap()
        })
        .collect();
    wait_status(&v, "relays registered", |r| {
        r.len() == n && r.iter().all(|x| x.score.ip == "127.0.0.1")
    });
    let registered = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(5));
    let (rss1, cpu1) = (rss_kib(pid), cpu_secs(pid));
    let window = 30.0;
    std::thread::sleep(Duration::from_secs_f64(window));
    let (rss2, cpu2) = (rss_kib(pid), cpu_secs(pid));
    let t = Instant::now();
    let rows = status(&v);
    let status_ms = t.elapsed().as_secs_f64() * 1e3;
    let scores = std::fs::metadata(dir.join("scores.json")).map_or(0, |m| m.len());
    println!(
        "validator with {} relays (heartbeat every 2 s): registered in {registered:.1} s \
         (CPU {:.2} s); RSS {rss0} KiB before, {rss1} KiB after registration, {rss2} KiB after \
         {window} s more; CPU over those {window} s {:.2} s ({:.1}% of one core); status of {} rows \
         in {status_ms:.0} ms; scores file {scores} bytes",
        n,
        cpu1 - cpu0,
        cpu2 - cpu1,
        100.0 * (cpu2 - cpu1) / window,
        rows.len()
    );
    stop.store(true, Ordering::SeqCst);
    for r in relays {
        assert!(r.join().unwrap());
    }
}

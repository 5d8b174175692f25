#![allow(dead_code)]
//! Detection rate of verification by sampling, measured against 1-(1-f)^k. Helpers as in
//! validator_jobs.rs. Validator end to end with real `mr-validator` and `mr-relayd` processes on loopback:
//! registration, job assignment, verification by sampling, exclusion of dishonest relays,
//! heartbeat loss, restarts, IP-shared scores and authentication.

use mapreduce::validator::client;
use mapreduce::validator::server::StatusRow;
use mapreduce::{Algo, Comm, Config, ErrorKind, ReduceOp, UniqueId};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A daemon process; killed on drop.
struct Proc {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .env("MR_LOG", "debug")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if let Some(i) = line.find("listening on ") {
                    let addr = line[i + 13..].split(' ').next().unwrap().to_string();
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("daemon did not report its address");
        Proc { child, addr, log }
    }

    fn has_log(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mr-validator-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn validator(dir: &Path, listen: &str, config: &str) -> Proc {
    let cfg = dir.join("validator.config.json");
    std::fs::write(&cfg, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mr-validator"));
    cmd.args(["--listen", listen, "--config"])
        .arg(&cfg)
        .arg("--scores")
        .arg(dir.join("scores.json"));
    Proc::spawn(cmd)
}

const CONFIG: &str = r#"{"heartbeat_timeout_ms": 1500, "default_relays": 2, "report_fraction": 1.0,
    "samples": 8, "bench": {"interval_secs": 0}}"#;

fn relay(v: &Proc, key: &Path, listen: &str, env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mr-relayd"));
    cmd.args([
        "--listen",
        listen,
        "--validator",
        &v.addr,
        "--heartbeat-ms",
        "200",
    ])
    .arg("--key-file")
    .arg(key);
    for (k, val) in env {
        cmd.env(k, val);
    }
    Proc::spawn(cmd)
}

fn status(v: &Proc) -> Vec<StatusRow> {
    client::status(&v.addr, Duration::from_secs(5)).expect("status")
}

/// Wait until `cond(status)` holds.
fn wait_status(v: &Proc, what: &str, cond: impl Fn(&[StatusRow]) -> bool) -> Vec<StatusRow> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = status(v);
        if cond(&rows) {
            return rows;
        }
        assert!(Instant::now() < deadline, "{what}: {rows:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn up(rows: &[StatusRow]) -> usize {
    rows.iter().filter(|r| r.available).count()
}

fn job_config(v: &Proc, verify: bool) -> Config {
    Config {
        timeout: Duration::from_secs(20),
        algo: Algo::Relay,
        validator: Some(v.addr.clone()),
        chunk_bytes: 4 << 10,
        verify,
        ..Config::default()
    }
}

/// Run `ops` f32 all-reduces of `count` elements on `n` ranks; per rank, each op's result
/// (Ok(exact) / Err(kind)).
fn run_job(n: usize, cfg: Config, ops: usize, count: usize) -> Vec<Vec<Result<bool, ErrorKind>>> {
    let id = UniqueId::new(&cfg).unwrap();
    let handles: Vec<_> = (0..n)
        .map(|r| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let comm = Comm::init(n, &id, r, cfg).expect("comm init");
                assert!(!comm.relays().is_empty(), "the job got no relays");
                let mut out = Vec::new();
                for op in 0..ops {
                    let mut buf: Vec<f32> = (0..count)
                        .map(|i| ((i * 3 + r + op) % 512) as f32)
                        .collect();
                    let res = comm.allreduce(&mut buf, ReduceOp::Sum);
                    out.push(
                        res.map(|()| {
                            buf.iter().enumerate().all(|(i, &x)| {
                                x == (0..n).map(|q| ((i * 3 + q + op) % 512) as f32).sum::<f32>()
                            })
                        })
                        .map_err(|e| e.kind),
                    );
                    if matches!(out.last(), Some(Err(k)) if *k != ErrorKind::Verify) {
                        break;
                    }
                }
                comm.destroy().unwrap();
                out
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// A relay corrupts each chunk with probability f; peers check every op with k samples
/// (`MR_VERIFY=1`). With many small chunks, samples fall in independently corrupted chunks, so
/// an op is flagged with probability 1-(1-f)^k. Prints the measured rate; fails only when it
/// is more than five standard deviations off.
#[test]
fn detection_rate_matches_one_minus_one_minus_f_to_the_k() {
    let (f, k, ops) = (0.1f64, 4usize, 120usize);
    let dir = tmpdir("rate");
    let config = format!(
        r#"{{"heartbeat_timeout_ms": 3000, "report_fraction": 1.0, "samples": {k}, "bench": {{"interval_secs": 0}}}}"#
    );
    let v = validator(&dir, "127.0.0.1:0", &config);
    let _bad = relay(
        &v,
        &dir.join("bad.key"),
        "127.0.0.1:0",
        &[("MR_RELAY_TEST_CORRUPT", &f.to_string())],
    );
    wait_status(&v, "relay registered", |r| up(r) == 1);
    std::env::set_var("MR_RELAY_COUNT", "1");
    let cfg = Config {
        chunk_bytes: 256,
        ..job_config(&v, true)
    };
    // 256 chunks of 64 f32 per op.
    let results = run_job(2, cfg, ops, 64 * 256);
    std::env::remove_var("MR_RELAY_COUNT");
    let flagged = results[0]
        .iter()
        .filter(|o| **o == Err(ErrorKind::Verify))
        .count();
    assert_eq!(results[0].len(), ops, "{:?}", results[0]);
    let measured = flagged as f64 / ops as f64;
    let predicted = 1.0 - (1.0 - f).powi(k as i32);
    let sigma = (predicted * (1.0 - predicted) / ops as f64).sqrt();
    println!(
        "detection rate: f={f} k={k}: measured {measured:.3} over {ops} ops, predicted 1-(1-f)^k = {predicted:.3} (sigma {sigma:.3})"
    );
    eprintln!(
        "detection rate: f={f} k={k}: measured {measured:.3} over {ops} ops, predicted {predicted:.3}"
    );
    assert!(
        (measured - predicted).abs() <= 5.0 * sigma,
        "measured {measured}, predicted {predicted}"
    );
}

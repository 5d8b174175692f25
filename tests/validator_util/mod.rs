//! Shared helpers for the validator tests: real `mr-validator` and `mr-relayd` processes on
//! loopback, status polling, and jobs run through the validator.
#![allow(dead_code)]

#[path = "../support/daemon.rs"]
mod daemon;

use mapreduce::validator::client;
use mapreduce::validator::identity::Identity;
use mapreduce::validator::server::StatusRow;
use mapreduce::{Algo, Comm, Config, ErrorKind, ReduceOp, UniqueId};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A daemon process; killed on drop.
pub struct Proc {
    pub child: Child,
    pub addr: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(cmd: Command) -> Proc {
        let (child, addr, log) = daemon::spawn_logged(cmd);
        Proc { child, addr, log }
    }

    pub fn has_log(&self, needle: &str) -> bool {
        self.count_log(needle) > 0
    }

    /// Whether a log line containing `needle` arrives within 10 s.
    pub fn wait_log(&self, needle: &str) -> bool {
        daemon::wait_line(&self.log, needle)
    }

    /// Log lines so far that contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        daemon::count_lines(&self.log, needle)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mr-validator-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// This test process's client identity: its key file is created once and named by
/// `MR_CLIENT_KEY_FILE`, which every job of the process uses.
pub fn client_identity() -> Identity {
    static KEY: OnceLock<PathBuf> = OnceLock::new();
    let path = KEY.get_or_init(|| {
        let p =
            std::env::temp_dir().join(format!("mr-validator-client-{}.key", std::process::id()));
        let _ = std::fs::remove_file(&p);
        Identity::load_or_create(&p, "client").unwrap();
        std::env::set_var("MR_CLIENT_KEY_FILE", &p);
        p
    });
    Identity::load(path).unwrap()
}

/// Start a validator with `config`, admitting this process's client.
pub fn validator(dir: &Path, listen: &str, config: &str) -> Proc {
    let cfg = dir.join("validator.config.json");
    let mut json: serde_json::Value = serde_json::from_str(config).unwrap();
    json.as_object_mut()
        .unwrap()
        .entry("clients")
        .or_insert_with(|| serde_json::json!([client_identity().id()]));
    std::fs::write(&cfg, json.to_string()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mr-validator"));
    cmd.args(["--listen", listen, "--config"])
        .arg(&cfg)
        .arg("--scores")
        .arg(dir.join("scores.json"));
    Proc::spawn(cmd)
}

pub const CONFIG: &str = r#"{"heartbeat_timeout_ms": 1500, "default_relays": 2, "report_fraction": 1.0,
    "samples": 8, "bench": {"interval_secs": 0}}"#;

pub fn relay(v: &Proc, key: &Path, listen: &str, env: &[(&str, &str)]) -> Proc {
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

pub fn status(v: &Proc) -> Vec<StatusRow> {
    client::status(&v.addr, Duration::from_secs(5)).expect("status")
}

/// Wait until `cond(status)` holds.
pub fn wait_status(v: &Proc, what: &str, cond: impl Fn(&[StatusRow]) -> bool) -> Vec<StatusRow> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = status(v);
        if cond(&rows) {
            return rows;
        }
        if Instant::now() >= deadline {
            for l in v.log.lock().unwrap().iter().rev().take(15) {
                eprintln!("validator: {l}");
            }
            panic!("{what}: {rows:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn up(rows: &[StatusRow]) -> usize {
    rows.iter().filter(|r| r.available).count()
}

pub fn job_config(v: &Proc, verify: bool) -> Config {
    Config {
        timeout: Duration::from_secs(20),
        algo: Algo::Relay,
        validator: Some(v.addr.clone()),
        chunk_bytes: 4 << 10,
        relay_chunk_bytes: 4 << 10,
        verify,
        ..Config::default()
    }
}

/// Run `ops` f32 all-reduces of `count` elements on `n` ranks; per rank, each op's result
/// (Ok(exact) / Err(kind)).
pub fn run_job(
    n: usize,
    cfg: Config,
    ops: usize,
    count: usize,
) -> Vec<Vec<Result<bool, ErrorKind>>> {
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

//! Multi-process test jobs on 127.0.0.1.
//!
//! A test binary spawns itself once per rank, running only its ignored `rank_child` test with
//! the scenario to play in `MRT_SCENARIO`. Rank 0 creates the [`UniqueId`], prints it as hex
//! (`ID <hex>`); the parent hands it to the other ranks in `MRT_ID`. Children report on
//! stdout, one line each:
//!
//! * `OK <name> [<detail>]` — a step succeeded (detail: a result hash, a count, ...);
//! * `ERR <name> <kind> <message>` — a step ended with an error of that [`ErrorKind`];
//! * `DONE` — the scenario finished.
//!
//! Every child runs under a deadline: past it the parent kills it and records the timeout.

#![allow(dead_code)]

pub mod data;

use mapreduce::{Comm, Config, ErrorKind, UniqueId};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const SCENARIO: &str = "MRT_SCENARIO";
const RANK: &str = "MRT_RANK";
const SIZE: &str = "MRT_SIZE";
const ID: &str = "MRT_ID";

/// Name of the ignored test every child runs.
pub const CHILD_TEST: &str = "rank_child";

// ---------------------------------------------------------------------------------------
// Child side
// ---------------------------------------------------------------------------------------

/// What a child knows about itself.
pub struct Ctx {
    pub rank: usize,
    pub size: usize,
    pub scenario: String,
    id: Option<UniqueId>,
}

impl Ctx {
    /// Read the child's role from the environment; `None` in an ordinary test run.
    pub fn from_env() -> Option<Ctx> {
        let scenario = std::env::var(SCENARIO).ok()?;
        let rank = std::env::var(RANK).expect(RANK).parse().expect(RANK);
        let size = std::env::var(SIZE).expect(SIZE).parse().expect(SIZE);
        let id = std::env::var(ID).ok().map(|h| {
            let bytes = mapreduce::config::parse_hex("unique id", &h).expect("id hex");
            UniqueId(bytes.try_into().expect("256-byte id"))
        });
        Some(Ctx {
            rank,
            size,
            scenario,
            id,
        })
    }

    /// Configuration from the `MR_*` variables the parent set.
    pub fn config(&self) -> Config {
        Config::from_env().expect("child configuration")
    }

    /// The job's id: rank 0 creates and announces it, the others got it from the parent.
    pub fn unique_id(&mut self, config: &Config) -> UniqueId {
        if let Some(id) = self.id {
            return id;
        }
        let id = UniqueId::new(config).expect("UniqueId::new");
        say(&format!("ID {}", mapreduce::config::to_hex(id.as_bytes())));
        self.id = Some(id);
        id
    }

    /// Join the job; any error is reported as `ERR init ...` and returned.
    pub fn init(&mut self) -> mapreduce::Result<Comm> {
        let config = self.config();
        let id = self.unique_id(&config);
        let r = Comm::init(self.size, &id, self.rank, config);
        if let Err(e) = &r {
            err("init", e);
        }
        r
    }
}

/// Print one report line and flush it (the parent reads lines as they come).
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

pub fn ok(name: &str, detail: impl std::fmt::Display) {
    say(&format!("OK {name} {detail}"));
}

pub fn err(name: &str, e: &mapreduce::Error) {
    say(&format!(
        "ERR {name} {:?} {}",
        e.kind,
        e.message.replace('\n', " ")
    ));
}

/// Report `r` as `OK`/`ERR` under `name`.
pub fn report<T>(name: &str, r: &mapreduce::Result<T>) {
    match r {
        Ok(_) => ok(name, ""),
        Err(e) => err(name, e),
    }
}

/// Join, then prove the communicator works: an all-reduce of known values (checked), a
/// barrier and a clean destroy, each reported.
pub fn join_and_check(mut ctx: Ctx) {
    let started = Instant::now();
    let Ok(comm) = ctx.init() else {
        say(&format!(
            "OK init_failed_after_ms {}",
            started.elapsed().as_millis()
        ));
        return;
    };
    ok("init", "");
    check_allreduce(&comm, "allreduce");
    report("barrier", &comm.barrier());
    report("destroy", &comm.destroy());
}

/// All-reduce `[rank, rank + 1, ...]` over 1000 i64s and report `OK name` or an error.
pub fn check_allreduce(comm: &Comm, name: &str) {
    let (r, n) = (comm.rank() as i64, comm.size() as i64);
    let mut v: Vec<i64> = (0..1000).map(|i| r + i).collect();
    match comm.allreduce(&mut v, mapreduce::ReduceOp::Sum) {
        Ok(()) => {
            let good = v
                .iter()
                .enumerate()
                .all(|(i, &x)| x == n * (n - 1) / 2 + n * i as i64);
            if good {
                ok(name, "");
            } else {
                say(&format!("ERR {name} WrongResult {:?}", &v[..4]));
            }
        }
        Err(e) => err(name, &e),
    }
}

/// Block until the parent writes a line to this child's stdin (or closes it).
pub fn wait_for_parent() {
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

/// Run the child scenario if this process is a child, then exit without returning to the
/// test harness. Returns only in an ordinary test run.
pub fn child_entry(play: fn(Ctx)) {
    let Some(ctx) = Ctx::from_env() else { return };
    // End the test harness's "test rank_child ... " line so reports start on their own.
    say("");
    play(ctx);
    say("DONE");
    std::process::exit(0);
}

// ---------------------------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------------------------

/// One line a child reported.
#[derive(Clone, Debug)]
pub enum Line {
    Ok {
        name: String,
        detail: String,
    },
    Err {
        name: String,
        kind: String,
        message: String,
    },
    Other(String),
}

fn parse_line(l: &str) -> Line {
    let mut parts = l.splitn(2, ' ');
    match (parts.next(), parts.next()) {
        (Some("OK"), Some(rest)) => {
            let mut p = rest.splitn(2, ' ');
            Line::Ok {
                name: p.next().unwrap_or("").to_string(),
                detail: p.next().unwrap_or("").trim().to_string(),
            }
        }
        (Some("ERR"), Some(rest)) => {
            let mut p = rest.splitn(3, ' ');
            Line::Err {
                name: p.next().unwrap_or("").to_string(),
                kind: p.next().unwrap_or("").to_string(),
                message: p.next().unwrap_or("").to_string(),
            }
        }
        _ => Line::Other(l.to_string()),
    }
}

/// The whole story of one child once it has ended.
#[derive(Debug)]
pub struct Outcome {
    pub rank: usize,
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    /// The parent killed it at its deadline.
    pub timed_out: bool,
    /// Killed on purpose by the test.
    pub killed: bool,
    pub lines: Vec<String>,
    pub stderr: String,
}

impl Outcome {
    pub fn done(&self) -> bool {
        self.lines.iter().any(|l| l == "DONE")
    }

    fn parsed(&self) -> impl Iterator<Item = Line> + '_ {
        self.lines.iter().map(|l| parse_line(l))
    }

    /// `(name, detail)` of every `OK` line.
    pub fn oks(&self) -> Vec<(String, String)> {
        self.parsed()
            .filter_map(|l| match l {
                Line::Ok { name, detail } => Some((name, detail)),
                _ => None,
            })
            .collect()
    }

    /// `(name, kind, message)` of every `ERR` line.
    pub fn errs(&self) -> Vec<(String, String, String)> {
        self.parsed()
            .filter_map(|l| match l {
                Line::Err {
                    name,
                    kind,
                    message,
                } => Some((name, kind, message)),
                _ => None,
            })
            .collect()
    }

    /// The detail of `OK name`; panics with the child's story if it is missing.
    pub fn ok_detail(&self, name: &str) -> String {
        self.oks()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d)
            .unwrap_or_else(|| panic!("rank {}: no `OK {name}`\n{}", self.rank, self.story()))
    }

    /// `(kind, message)` of `ERR name`; panics with the child's story if it is missing.
    pub fn err_of(&self, name: &str) -> (String, String) {
        self.errs()
            .into_iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, k, m)| (k, m))
            .unwrap_or_else(|| panic!("rank {}: no `ERR {name}`\n{}", self.rank, self.story()))
    }

    /// Everything the child said, for failure messages.
    pub fn story(&self) -> String {
        format!(
            "rank {} exit={:?} timed_out={} killed={}\n--- stdout\n{}\n--- stderr\n{}",
            self.rank,
            self.code,
            self.timed_out,
            self.killed,
            self.lines.join("\n"),
            tail(&self.stderr, 4000)
        )
    }

    /// Assert the child ran its scenario to the end and exited cleanly.
    pub fn assert_clean(&self) {
        assert!(
            !self.timed_out && self.code == Some(0) && self.done(),
            "child did not finish cleanly\n{}",
            self.story()
        );
        assert!(
            self.errs().is_empty(),
            "child reported errors\n{}",
            self.story()
        );
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// How to start one rank.
#[derive(Clone, Debug, Default)]
pub struct RankSpec {
    pub rank: usize,
    /// World size this rank is told (normally the job's).
    pub size: usize,
    pub env: Vec<(String, String)>,
}

struct Running {
    rank: usize,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
    stdout_thread: Option<thread::JoinHandle<()>>,
    stderr_thread: Option<thread::JoinHandle<String>>,
    killed: bool,
    outcome: Option<Outcome>,
}

/// A job of child processes, all killed at their deadline or when the job is dropped.
pub struct Job {
    scenario: String,
    env: Vec<(String, String)>,
    deadline: Instant,
    id_hex: Option<String>,
    procs: Vec<Running>,
    /// Lines announced by any child, for [`Job::wait_line`].
    events: mpsc::Receiver<(usize, String)>,
    events_tx: mpsc::Sender<(usize, String)>,
}

impl Job {
    /// A job playing `scenario`, with `env` (the `MR_*` configuration) for every rank; every
    /// child is killed if it is still running `limit` from now.
    pub fn new(scenario: &str, env: &[(&str, String)], limit: Duration) -> Job {
        let (events_tx, events) = mpsc::channel();
        Job {
            scenario: scenario.to_string(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            deadline: Instant::now() + limit,
            id_hex: None,
            procs: Vec::new(),
            events,
            events_tx,
        }
    }

    /// Start one rank. Rank 0 must come first unless the id is already known; starting rank 0
    /// waits for its id.
    pub fn spawn(&mut self, spec: RankSpec) {
        let exe = std::env::current_exe().expect("test executable");
        let mut cmd = Command::new(exe);
        cmd.args([
            CHILD_TEST,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SCENARIO, &self.scenario)
        .env(RANK, spec.rank.to_string())
        .env(SIZE, spec.size.to_string())
        .env_remove(ID)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (k, v) in self.env.iter().chain(spec.env.iter()) {
            cmd.env(k, v);
        }
        if let Some(id) = &self.id_hex {
            cmd.env(ID, id);
        }
        let mut child = cmd.spawn().expect("spawn child rank");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("child stdout");
        let mut stderr = child.stderr.take().expect("child stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (l2, tx, rank) = (lines.clone(), self.events_tx.clone(), spec.rank);
        let stdout_thread = thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send((rank, line.clone()));
                l2.lock().unwrap().push(line);
            }
        });
        let stderr_thread = thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        self.procs.push(Running {
            rank: spec.rank,
            child,
            stdin,
            lines,
            stdout_thread: Some(stdout_thread),
            stderr_thread: Some(stderr_thread),
            killed: false,
            outcome: None,
        });
        if self.id_hex.is_none() {
            let (_, line) = self
                .wait_line(|r, l| r == spec.rank && l.starts_with("ID "))
                .unwrap_or_else(|| {
                    let o = self.finish();
                    panic!(
                        "rank {} never announced the unique id\n{}",
                        spec.rank,
                        o.iter().map(|o| o.story()).collect::<Vec<_>>().join("\n")
                    )
                });
            self.id_hex = Some(line[3..].to_string());
        }
    }

    /// Start ranks `0..size`, all with world size `size`.
    pub fn spawn_all(&mut self, size: usize) {
        for rank in 0..size {
            self.spawn(RankSpec {
                rank,
                size,
                env: Vec::new(),
            });
        }
    }

    /// Wait (until the job's deadline) for a line matching `pred(rank, line)`; returns it, or
    /// `None` at the deadline or once every child ended without saying it.
    pub fn wait_line(&mut self, pred: impl Fn(usize, &str) -> bool) -> Option<(usize, String)> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match self
                .events
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok((r, l)) if pred(r, &l) => return Some((r, l)),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self
                        .procs
                        .iter_mut()
                        .all(|p| matches!(p.child.try_wait(), Ok(Some(_))))
                    {
                        // Everyone exited; drain what is left before giving up.
                        while let Ok((r, l)) = self.events.try_recv() {
                            if pred(r, &l) {
                                return Some((r, l));
                            }
                        }
                        return None;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// SIGKILL the child started as `index` (spawn order).
    pub fn kill(&mut self, index: usize) {
        let p = &mut self.procs[index];
        p.killed = true;
        let _ = p.child.kill();
    }

    /// Write a line to the stdin of the child started as `index`.
    pub fn tell(&mut self, index: usize, line: &str) {
        if let Some(s) = self.procs[index].stdin.as_mut() {
            let _ = writeln!(s, "{line}");
            let _ = s.flush();
        }
    }

    /// Wait for the child started as `index` to end (killing it at the deadline).
    pub fn wait_one(&mut self, index: usize) -> &Outcome {
        let deadline = self.deadline;
        let p = &mut self.procs[index];
        if p.outcome.is_none() {
            p.outcome = Some(reap(p, deadline));
        }
        p.outcome.as_ref().unwrap()
    }

    /// Wait for every child (killing those past the deadline); outcomes in spawn order.
    pub fn finish(&mut self) -> Vec<Outcome> {
        let deadline = self.deadline;
        for p in &mut self.procs {
            if p.outcome.is_none() {
                p.outcome = Some(reap(p, deadline));
            }
        }
        self.procs
            .iter_mut()
            .map(|p| p.outcome.take().unwrap())
            .collect()
    }

    /// Use this unique id instead of waiting for rank 0 to announce one (for jobs whose rank 0
    /// is not a child).
    pub fn set_id(&mut self, id: &UniqueId) {
        self.id_hex = Some(mapreduce::config::to_hex(id.as_bytes()));
    }

    /// The unique id rank 0 announced.
    pub fn id_hex(&self) -> Option<&str> {
        self.id_hex.as_deref()
    }
}

fn reap(p: &mut Running, deadline: Instant) -> Outcome {
    let mut timed_out = false;
    let status = loop {
        match p.child.try_wait().expect("try_wait") {
            Some(s) => break s,
            None if Instant::now() >= deadline => {
                timed_out = true;
                let _ = p.child.kill();
                break p.child.wait().expect("wait after kill");
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    };
    p.stdin = None;
    if let Some(t) = p.stdout_thread.take() {
        let _ = t.join();
    }
    let stderr = p
        .stderr_thread
        .take()
        .map(|t| t.join().unwrap_or_default())
        .unwrap_or_default();
    Outcome {
        rank: p.rank,
        code: status.code(),
        timed_out,
        killed: p.killed,
        lines: p.lines.lock().unwrap().clone(),
        stderr,
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if p.outcome.is_none() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
    }
}

/// Run a whole job of `size` ranks playing `scenario`, each with the same `env`; every
/// outcome, in rank order.
pub fn run_job(
    scenario: &str,
    size: usize,
    env: &[(&str, String)],
    limit: Duration,
) -> Vec<Outcome> {
    let mut job = Job::new(scenario, env, limit);
    job.spawn_all(size);
    job.finish()
}

/// Assert every named `OK` detail is the same on every rank (e.g. result hashes).
pub fn assert_same_details(outcomes: &[Outcome], prefix: &str) -> usize {
    let mut by_name: HashMap<String, Vec<(usize, String)>> = HashMap::new();
    for o in outcomes {
        for (name, detail) in o.oks() {
            if name.starts_with(prefix) {
                by_name.entry(name).or_default().push((o.rank, detail));
            }
        }
    }
    for (name, v) in &by_name {
        assert_eq!(
            v.len(),
            outcomes.len(),
            "{name}: not every rank reported it"
        );
        assert!(
            v.iter().all(|(_, d)| *d == v[0].1),
            "{name} differs across ranks: {v:?}"
        );
    }
    by_name.len()
}

/// An error kind by its `Debug` name, as children print it.
pub fn kind_name(k: ErrorKind) -> String {
    format!("{k:?}")
}

//! The validator under hostile load, with real processes on loopback: thousands of idle
//! connections, descriptor exhaustion and mass enrollment leave it serving status and jobs
//! with bounded memory and a bounded log; jobs expire.

mod validator_util;
use mapreduce::validator::channel::{self, Credential};
use mapreduce::validator::client;
use mapreduce::validator::identity::Identity;
use mapreduce::validator::proto::{Intro, JobRequest};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};
use validator_util::*;

/// Resident memory of process `pid`, bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap()
        * 1024
}

fn job_request() -> JobRequest {
    JobRequest {
        job: mapreduce::config::to_hex(&mapreduce::wire::nonce()[..16]),
        peers: 2,
        relays: 0,
        relay_memory: 0,
        max_message_bytes: 0,
    }
}

/// Log lines above debug level (what an operator's log holds) since line `from`.
fn operator_lines(v: &Proc, from: usize) -> Vec<String> {
    v.log
        .lock()
        .unwrap()
        .iter()
        .skip(from)
        .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
        .cloned()
        .collect()
}

/// A validator (config JSON `config`) with one relay registered, in a fresh directory.
fn validator_with_relay(name: &str, config: &str) -> (Proc, Proc) {
    let dir = tmpdir(name);
    let v = validator(&dir, "127.0.0.1:0", config);
    let r = relay(&v, &dir.join("r.key"), "127.0.0.1:0", &[]);
    wait_status(&v, "relay registered", |r| up(r) == 1);
    (v, r)
}

/// A job request is answered; `why` says what would have stopped it.
/// Open up to `n` sessions introduced as `intro` and keep them open; give the validator a
/// moment to act on them.
fn hold_sessions(v: &Proc, n: usize, intro: &Intro, cred: Credential<'_>) -> Vec<channel::Channel> {
    let sessions: Vec<_> = (0..n)
        .filter_map(|_| channel::connect(&v.addr, intro, cred, None, Duration::from_secs(10)).ok())
        .collect();
    eprintln!("{} sessions opened as {intro:?}", sessions.len());
    std::thread::sleep(Duration::from_millis(500));
    sessions
}

fn job_request_works(v: &Proc, why: &str) {
    let a = client::request_as(
        &v.addr,
        &client_identity(),
        &job_request(),
        Duration::from_secs(10),
    );
    assert!(a.is_ok(), "{why}: {}", a.err().unwrap());
}

/// Status and a real job request both work.
fn serves(v: &Proc) {
    let rows = client::status(&v.addr, Duration::from_secs(10)).expect("status");
    assert!(!rows.is_empty());
    let a = client::request_as(
        &v.addr,
        &client_identity(),
        &job_request(),
        Duration::from_secs(10),
    )
    .expect("job request");
    assert_eq!(a.relays.len(), 1);
}

#[test]
fn idle_connections_do_not_lock_out_status_or_jobs() {
    let (v, _r) = validator_with_relay(
        "idle",
        r#"{"heartbeat_timeout_ms": 3000, "default_relays": 1, "bench": {"interval_secs": 0}}"#,
    );
    serves(&v);
    let before = rss(v.child.id());
    let lines_before = v.log.lock().unwrap().len();
    let sa: std::net::SocketAddr = v.addr.parse().unwrap();
    let idle: Vec<TcpStream> = (0..2000)
        .filter_map(|_| TcpStream::connect_timeout(&sa, Duration::from_secs(5)).ok())
        .collect();
    assert!(idle.len() >= 1900, "only {} connections", idle.len());
    for _ in 0..3 {
        serves(&v);
    }
    let after = rss(v.child.id());
    let lines = operator_lines(&v, lines_before).len();
    eprintln!(
        "{} idle connections: validator RSS {} -> {} KiB, {lines} log lines",
        idle.len(),
        before / 1024,
        after / 1024
    );
    assert!(after < before + (48 << 20), "RSS {before} -> {after}");
    assert!(lines < 200, "{lines} log lines");
    drop(idle);
}

#[test]
fn descriptor_exhaustion_backs_off_and_recovers() {
    let dir = tmpdir("emfile");
    let cfg = dir.join("validator.config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "heartbeat_timeout_ms": 3000,
            "default_relays": 1,
            "max_handshakes": 200,
            "bench": {"interval_secs": 0},
            "clients": [client_identity().id()],
        })
        .to_string(),
    )
    .unwrap();
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(r#"ulimit -n 64 && exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_mr-validator"))
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .arg("--scores")
        .arg(dir.join("scores.json"));
    let v = Proc::spawn(cmd);
    let _r = relay(&v, &dir.join("r.key"), "127.0.0.1:0", &[]);
    wait_status(&v, "relay registered", |r| up(r) == 1);
    let sa: std::net::SocketAddr = v.addr.parse().unwrap();
    let lines_before = v.log.lock().unwrap().len();
    let started = Instant::now();
    let held: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect_timeout(&sa, Duration::from_millis(300)).ok())
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let window = started.elapsed().as_secs_f64();
    let accept_lines = operator_lines(&v, lines_before)
        .iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    eprintln!(
        "{} connections against 64 descriptors: {accept_lines} 'accept failed' lines in {window:.1} s",
        held.len()
    );
    for l in operator_lines(&v, lines_before) {
        eprintln!("validator: {l}");
    }
    assert!(
        accept_lines >= 1 && accept_lines as f64 <= 1.0 + window / 10.0,
        "{accept_lines} accept warnings"
    );
    drop(held);
    // Descriptors come back as the idle connections end; the validator serves again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = client::status(&v.addr, Duration::from_secs(5));
        if got.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the validator did not recover: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    serves(&v);
    let lines = operator_lines(&v, lines_before).len();
    assert!(lines < 50, "{lines} log lines");
}

#[test]
fn mass_enrollment_from_one_address_is_rate_limited() {
    let dir = tmpdir("enroll");
    let v = validator(
        &dir,
        "127.0.0.1:0",
        r#"{"heartbeat_timeout_ms": 3000, "enroll_per_minute": 100, "bench": {"interval_secs": 0}}"#,
    );
    // Let it settle before measuring.
    wait_status(&v, "validator up", |_| true);
    let before = rss(v.child.id());
    let attempts = 10_000;
    let started = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let addr = v.addr.clone();
            std::thread::spawn(move || {
                let mut admitted = 0;
                for _ in 0..attempts / 4 {
                    let key = Identity::generate();
                    let intro = Intro::Relay {
                        addr: "127.0.0.1:1".into(),
                        capacity: 1 << 40,
                        free_memory: 1 << 40,
                    };
                    if channel::connect(
                        &addr,
                        &intro,
                        Credential::Identity(&key),
                        None,
                        Duration::from_secs(10),
                    )
                    .is_ok()
                    {
                        admitted += 1;
                    }
                }
                admitted
            })
        })
        .collect();
    let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let rows = client::status(&v.addr, Duration::from_secs(10)).unwrap();
    let after = rss(v.child.id());
    let lines = operator_lines(&v, 0).len();
    eprintln!(
        "{attempts} enrollments in {:.1} s: {admitted} admitted, {} listed, RSS {} -> {} KiB, {lines} log lines",
        started.elapsed().as_secs_f64(),
        rows.len(),
        before / 1024,
        after / 1024
    );
    // 100 per minute, plus what refilled while the attempts ran.
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    assert!(
        admitted as f64 <= 100.0 + 100.0 * minutes + 1.0,
        "{admitted} admitted"
    );
    assert!(admitted >= 100);
    // More rows than one status page: paging works.
    assert_eq!(rows.len(), admitted);
    assert!(after < before + (48 << 20), "RSS {before} -> {after}");
    // A few lines per admitted relay, none per refused attempt.
    assert!(lines < 10 * admitted + 50, "{lines} log lines");
}

#[test]
fn jobs_expire() {
    let (v, _r) = validator_with_relay(
        "expire",
        r#"{"heartbeat_timeout_ms": 400, "default_relays": 1, "job_ttl_secs": 1, "bench": {"interval_secs": 0}}"#,
    );
    let a = client::request_as(
        &v.addr,
        &client_identity(),
        &job_request(),
        Duration::from_secs(10),
    )
    .unwrap();
    let secret: [u8; 32] = mapreduce::config::parse_hex("s", &a.verify_secret)
        .unwrap()
        .try_into()
        .unwrap();
    let report = |job: &str| {
        channel::connect(
            &v.addr,
            &Intro::Report {
                job: job.to_string(),
            },
            Credential::Secret(&secret),
            None,
            Duration::from_secs(5),
        )
    };
    assert!(report(&a.job).is_ok(), "a member of a live job was refused");
    std::thread::sleep(Duration::from_millis(2500));
    let err = report(&a.job)
        .err()
        .expect("an expired job still accepts reports");
    assert!(err.message.contains("not a member"), "{err}");
}

/// Threads of process `pid`.
fn threads(pid: u32) -> usize {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("Threads:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap()
}

/// Authenticated sessions that stay open (status readers here; relays and report connections
/// alike) are served by a fixed set of threads: a thousand of them cost no thread each, and
/// the validator keeps answering status and jobs.
#[test]
fn open_sessions_do_not_each_hold_a_thread() {
    let (v, _r) = validator_with_relay(
        "sessions",
        r#"{"heartbeat_timeout_ms": 3000, "default_relays": 1, "bench": {"interval_secs": 0}}"#,
    );
    let idle_threads = threads(v.child.id());
    let per = 250;
    let openers: Vec<_> = (0..4)
        .map(|_| {
            let addr = v.addr.clone();
            std::thread::spawn(move || {
                (0..per)
                    .filter_map(|_| {
                        channel::connect(
                            &addr,
                            &Intro::Status,
                            Credential::None,
                            None,
                            Duration::from_secs(20),
                        )
                        .ok()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let sessions: Vec<_> = openers
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(
        sessions.len() >= 4 * per - 10,
        "only {} sessions",
        sessions.len()
    );
    serves(&v);
    let busy_threads = threads(v.child.id());
    eprintln!(
        "{} open sessions: validator threads {idle_threads} -> {busy_threads}",
        sessions.len()
    );
    assert!(
        busy_threads <= idle_threads + 8,
        "{} open sessions took the validator from {idle_threads} to {busy_threads} threads",
        sessions.len()
    );
    drop(sessions);
}

/// Peak resident memory of process `pid`, bytes.
fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// A status session needs no credential, so what one may make the validator hold must be
/// small: a status query of megabytes (a message split over many sealed frames) ends the
/// session instead of being assembled. Many such sessions at once leave the peak memory flat.
#[test]
fn unauthenticated_sessions_cannot_make_the_validator_buffer_megabytes() {
    #[derive(serde::Serialize)]
    struct Padded {
        offset: usize,
        limit: usize,
        pad: String,
    }
    let (v, _r) = validator_with_relay(
        "bigstatus",
        r#"{"heartbeat_timeout_ms": 3000, "default_relays": 1, "bench": {"interval_secs": 0}}"#,
    );
    serves(&v);
    let before = peak_rss(v.child.id());
    let sessions = 24;
    let big = 12 << 20;
    let senders: Vec<_> = (0..sessions)
        .map(|_| {
            let addr = v.addr.clone();
            std::thread::spawn(move || {
                let mut ch = channel::connect(
                    &addr,
                    &Intro::Status,
                    Credential::None,
                    None,
                    Duration::from_secs(20),
                )
                .expect("status session");
                let q = Padded {
                    offset: 0,
                    limit: 1,
                    pad: "x".repeat(big),
                };
                // Refused or not, the bytes go out; an answer means it was assembled.
                let sent = ch.send(&q, Duration::from_secs(60));
                let answered = sent.is_ok()
                    && ch
                        .recv::<serde_json::Value>(Duration::from_secs(30))
                        .is_ok();
                (ch, answered)
            })
        })
        .collect();
    let results: Vec<_> = senders.into_iter().map(|t| t.join().unwrap()).collect();
    let answered = results.iter().filter(|r| r.1).count();
    let after = peak_rss(v.child.id());
    eprintln!(
        "{sessions} status sessions sending {} MiB each: {answered} answered, validator peak RSS \
         {} -> {} MiB",
        big >> 20,
        before >> 20,
        after >> 20
    );
    assert_eq!(
        answered, 0,
        "a {big} byte status query was assembled and answered"
    );
    assert!(
        after < before + (64 << 20),
        "peak RSS {before} -> {after}: status sessions buffered their messages"
    );
    drop(results);
    serves(&v);
}

/// Status readers that ask and never read their pages: once the validator's writes to them
/// block, they must not take the workers that check handshakes and assign jobs.
#[test]
fn status_readers_that_never_read_do_not_stall_job_requests() {
    let (v, _r) = validator_with_relay(
        "stuckstatus",
        r#"{"heartbeat_timeout_ms": 3000, "default_relays": 1, "workers": 4,
            "bench": {"interval_secs": 0}}"#,
    );
    serves(&v);
    let stuck: Vec<_> = (0..8)
        .map(|_| {
            let addr = v.addr.clone();
            std::thread::spawn(move || {
                let ch = channel::connect(
                    &addr,
                    &Intro::Status,
                    Credential::None,
                    None,
                    Duration::from_secs(20),
                )
                .expect("status session");
                let channel::Channel {
                    reader, mut writer, ..
                } = ch;
                let (stream, _) = reader.into_parts();
                // A small receive buffer that is never read: the validator's writes block soon.
                let _ = socket2::SockRef::from(&stream).set_recv_buffer_size(4096);
                let q = mapreduce::validator::proto::StatusQuery {
                    offset: 0,
                    limit: 64,
                };
                // Ask until the validator stops reading (its worker is stuck writing to us).
                let mut asked = 0;
                while asked < 100_000 && writer.send(&q, Duration::from_secs(2)).is_ok() {
                    asked += 1;
                }
                (stream, writer, asked)
            })
        })
        .collect();
    let stuck: Vec<_> = stuck.into_iter().map(|t| t.join().unwrap()).collect();
    eprintln!(
        "queries sent before the validator stopped reading: {:?}",
        stuck.iter().map(|s| s.2).collect::<Vec<_>>()
    );
    // Let the pages already accepted go out, so every worker that will block has blocked.
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let a = client::request_as(
        &v.addr,
        &client_identity(),
        &job_request(),
        Duration::from_secs(10),
    );
    eprintln!("job request with 8 stuck status readers: {:?}", t.elapsed());
    assert!(
        a.is_ok(),
        "a job request failed while status readers held the workers: {}",
        a.err().unwrap()
    );
    drop(stuck);
}

/// A relay that takes no job (stopped here: its connection open and its heartbeats not yet
/// overdue) costs each job request that tries it the announcement's 5 s wait at a worker. It
/// must cost that once, not on every request: else a few requests hold every worker, and
/// registrations and other job requests wait behind them.
#[test]
fn a_relay_that_never_acknowledges_does_not_hold_the_workers() {
    let dir = tmpdir("noack");
    let v = validator(
        &dir,
        "127.0.0.1:0",
        r#"{"heartbeat_timeout_ms": 60000, "default_relays": 1, "workers": 2,
            "bench": {"interval_secs": 0}}"#,
    );
    let r1 = relay(&v, &dir.join("r1.key"), "127.0.0.1:0", &[]);
    let r2 = relay(&v, &dir.join("r2.key"), "127.0.0.1:0", &[]);
    wait_status(&v, "relays registered", |r| up(r) == 2);
    let first = client::request_as(
        &v.addr,
        &client_identity(),
        &job_request(),
        Duration::from_secs(10),
    )
    .expect("job request");
    // Candidates keep their order: the relay assigned first is tried first again.
    let chosen = &first.relays[0].addr;
    let stopped = [&r1, &r2]
        .into_iter()
        .find(|r| mapreduce::validator::chain::same_endpoint(&r.addr, chosen))
        .expect("the assigned relay is one of ours");
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(
        unsafe { libc::kill(stopped.child.id() as i32, libc::SIGSTOP) },
        0
    );
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let addr = v.addr.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                let a = client::request_as(
                    &addr,
                    &client_identity(),
                    &job_request(),
                    Duration::from_secs(10),
                );
                (a.map(|a| a.relays[0].addr.clone()), t.elapsed())
            })
        })
        .collect();
    let results: Vec<_> = requests.into_iter().map(|t| t.join().unwrap()).collect();
    // SAFETY: as above.
    unsafe { libc::kill(stopped.child.id() as i32, libc::SIGCONT) };
    eprintln!("8 job requests with a stopped relay first in line: {results:?}");
    let failed: Vec<_> = results.iter().filter(|r| r.0.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of 8 job requests failed behind a relay that takes no job: {failed:?}",
        failed.len()
    );
}

/// A registered relay's address is checked by connecting to it, which may take the probe's
/// whole timeout (an address that accepts and never answers). One relay key re-registering
/// over and over with such an address must not hold the workers that admit clients.
#[test]
fn relays_whose_address_never_answers_do_not_hold_the_workers() {
    let (v, _r) = validator_with_relay(
        "slowprobe",
        r#"{"heartbeat_timeout_ms": 3000, "default_relays": 1, "workers": 2,
            "bench": {"interval_secs": 0}}"#,
    );
    // Accepts connections and never says a word.
    let tarpit = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tarpit_addr = tarpit.local_addr().unwrap().to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attackers: Vec<_> = (0..4)
        .map(|_| {
            let (addr, tarpit_addr, stop) = (v.addr.clone(), tarpit_addr.clone(), stop.clone());
            std::thread::spawn(move || {
                // One relay key for every attacker: it enrolls once.
                let me = Identity::from_seed(&[7; 32]);
                let mut held = Vec::new();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 200 {
                    if let Ok(ch) = channel::connect(
                        &addr,
                        &Intro::Relay {
                            addr: tarpit_addr.clone(),
                            capacity: 1 << 30,
                            free_memory: 1 << 30,
                        },
                        Credential::Identity(&me),
                        None,
                        Duration::from_secs(10),
                    ) {
                        held.push(ch);
                    }
                    n += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    let a = client::request_as(
        &v.addr,
        &client_identity(),
        &job_request(),
        Duration::from_secs(10),
    );
    eprintln!(
        "job request while a relay key re-registers at a tarpit: {:?}",
        t.elapsed()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for a in attackers {
        let _ = a.join();
    }
    drop(tarpit);
    assert!(
        a.is_ok(),
        "a job request failed while address checks held the workers: {}",
        a.err().unwrap()
    );
}

/// Status sessions need no credential and stay open while they ask now and then: they must
/// not take every connection the validator serves, or relays and clients are refused.
#[test]
fn status_sessions_cannot_take_every_connection() {
    let (v, _r) = validator_with_relay(
        "statusslots",
        r#"{"heartbeat_timeout_ms": 3000, "default_relays": 1, "max_connections": 64,
            "bench": {"interval_secs": 0}}"#,
    );
    let sessions = hold_sessions(&v, 80, &Intro::Status, Credential::None);
    job_request_works(
        &v,
        "a job request was refused while status sessions held the connections",
    );
    assert_eq!(up(&status(&v)), 1, "the relay lost its place");
    drop(sessions);
}

/// A relay key registering again keeps one session: the sessions of its older registrations
/// end, so one enrolled key cannot hold every connection the validator serves.
#[test]
fn one_relay_key_holds_one_session() {
    let (v, _r) = validator_with_relay(
        "relaysessions",
        r#"{"heartbeat_timeout_ms": 60000, "default_relays": 1, "max_connections": 32,
            "bench": {"interval_secs": 0}}"#,
    );
    let me = Identity::from_seed(&[9; 32]);
    let intro = Intro::Relay {
        addr: "127.0.0.1:1".into(),
        capacity: 1 << 30,
        free_memory: 1 << 30,
    };
    let sessions = hold_sessions(&v, 40, &intro, Credential::Identity(&me));
    job_request_works(
        &v,
        "a job request was refused while one relay key held the connections",
    );
    drop(sessions);
}

/// Job members' report streams may carry messages of up to 16 MiB, but what all sessions hold
/// of unfinished messages together is capped (`max_assembling`): many members sending large
/// reports at once cannot add up to gigabytes in the validator.
#[test]
fn report_streams_together_hold_at_most_max_assembling() {
    #[derive(serde::Serialize)]
    struct Padded {
        pad: String,
    }
    let (v, _r) = validator_with_relay(
        "assembling",
        &format!(
            r#"{{"heartbeat_timeout_ms": 3000, "default_relays": 1, "bench": {{"interval_secs": 0}},
                "clients": ["{}"], "max_assembling": 4194304}}"#,
            client_identity().id()
        ),
    );
    let a = client::request_as(
        &v.addr,
        &client_identity(),
        &job_request(),
        Duration::from_secs(10),
    )
    .unwrap();
    let secret: [u8; 32] = mapreduce::config::parse_hex("s", &a.verify_secret)
        .unwrap()
        .try_into()
        .unwrap();
    let before = peak_rss(v.child.id());
    let lines_before = v.log.lock().unwrap().len();
    let senders: Vec<_> = (0..16)
        .map(|_| {
            let (addr, job) = (v.addr.clone(), a.job.clone());
            std::thread::spawn(move || {
                let mut ch = channel::connect(
                    &addr,
                    &Intro::Report { job },
                    Credential::Secret(&secret),
                    None,
                    Duration::from_secs(20),
                )
                .expect("report session");
                let _ = ch.send(
                    &Padded {
                        pad: "x".repeat(8 << 20),
                    },
                    Duration::from_secs(60),
                );
                ch
            })
        })
        .collect();
    let held: Vec<_> = senders.into_iter().map(|t| t.join().unwrap()).collect();
    std::thread::sleep(Duration::from_secs(1));
    let after = peak_rss(v.child.id());
    let capped = v
        .log
        .lock()
        .unwrap()
        .iter()
        .skip(lines_before)
        .any(|l| l.contains("max_assembling"));
    eprintln!(
        "16 report streams sending 8 MiB each: validator peak RSS {} -> {} MiB, cap hit: {capped}",
        before >> 20,
        after >> 20
    );
    assert!(capped, "no session was stopped at max_assembling");
    assert!(
        after < before + (32 << 20),
        "peak RSS {before} -> {after}: the report streams' messages added up"
    );
    drop(held);
    serves(&v);
}

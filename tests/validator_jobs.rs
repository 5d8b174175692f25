//! Validator end to end with real `mr-validator` and `mr-relayd` processes on loopback:
//! registration, job assignment, verification by sampling, exclusion of dishonest relays,
//! heartbeat loss, restarts, IP-shared scores and authentication.

mod validator_util;
use mapreduce::validator::channel::{self, Credential};
use mapreduce::validator::client;
use mapreduce::validator::identity::Identity;
use mapreduce::validator::proto::{Intro, JobRequest};
use mapreduce::{Config, ErrorKind};
use std::process::Command;
use std::time::Duration;
use validator_util::*;

#[test]
fn honest_relays_complete_a_verified_job_and_scores_rise() {
    let dir = tmpdir("honest");
    let v = validator(&dir, "127.0.0.1:0", CONFIG);
    let _a = relay(&v, &dir.join("a.key"), "127.0.0.1:0", &[]);
    let _b = relay(&v, &dir.join("b.key"), "127.0.0.1:0", &[]);
    let before = wait_status(&v, "two relays registered", |r| up(r) == 2);
    let results = run_job(3, job_config(&v, false), 4, 5000);
    for (r, ops) in results.iter().enumerate() {
        assert!(ops.iter().all(|o| *o == Ok(true)), "rank {r}: {ops:?}");
    }
    let after = wait_status(&v, "ops verified", |rows| {
        rows.iter().all(|r| r.score.verified_ops >= 4)
    });
    for a in &after {
        let b = before.iter().find(|b| b.score.id == a.score.id).unwrap();
        assert!(a.score.score > b.score.score, "{a:?} vs {b:?}");
        assert_eq!(a.score.correctness, 1.0);
    }
    let total: f64 = after.iter().map(|r| r.score.weight).sum();
    assert!((total - 1.0).abs() < 1e-9);
    let out = Command::new(env!("CARGO_BIN_EXE_mr-validator"))
        .args(["status", "--validator", &v.addr])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for a in &after {
        assert!(text.contains(&a.score.id), "{text}");
    }
}

/// Dishonest relays (test hooks of debug builds) next to an honest one: caught, excluded from
/// the next job and scored zero. Also prints the detection rate per op.
#[test]
fn dishonest_relays_are_detected_and_excluded() {
    for (hook, fraction) in [
        ("MR_RELAY_TEST_CORRUPT", "0.5"),
        ("MR_RELAY_TEST_EQUIVOCATE", "0.5"),
    ] {
        let dir = tmpdir(&format!("dishonest-{hook}"));
        let v = validator(&dir, "127.0.0.1:0", CONFIG);
        let bad = relay(&v, &dir.join("bad.key"), "127.0.0.1:0", &[(hook, fraction)]);
        let _good = relay(&v, &dir.join("good.key"), "127.0.0.1:0", &[]);
        wait_status(&v, "two relays registered", |r| up(r) == 2);
        // Each op cuts 4000 f32 across 2 relays: about 2 chunks of 4 KiB per relay.
        let results = run_job(2, job_config(&v, false), 10, 4000);
        let wrong = results[0].iter().filter(|o| **o == Ok(false)).count();
        let bad_id = Identity::load(&dir.join("bad.key")).unwrap().id();
        let rows = wait_status(&v, "dishonest relay excluded", |rows| {
            rows.iter()
                .any(|r| r.score.id == bad_id && r.score.excluded)
        });
        let b = rows.iter().find(|r| r.score.id == bad_id).unwrap();
        assert_eq!(b.score.correctness, 0.0);
        assert_eq!(b.score.weight, 0.0);
        assert!(!b.score.evidence.is_empty());
        assert!(
            b.score.evidence[0].contains("signed evidence"),
            "{}",
            b.score.evidence[0]
        );
        eprintln!(
            "{hook}={fraction}: {wrong} of 10 ops had wrong results; evidence: {}",
            b.score.evidence[0]
        );
        assert!(bad.has_log("test faults enabled"));
        // Operators see why: the status table and the log name the evidence by its id.
        let eid = b.score.evidence[0].split(':').next().unwrap().to_string();
        assert_eq!(eid.len(), 12, "{}", b.score.evidence[0]);
        assert!(v.wait_log(&format!("evidence {eid}")));
        let out = Command::new(env!("CARGO_BIN_EXE_mr-validator"))
            .args(["status", "--validator", &v.addr])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("EXCLUDED") && text.contains(&eid), "{text}");
        assert!(text.contains(&format!("relay {bad_id} excluded")), "{text}");
        // The next job runs on the honest relay only and is right.
        let next = run_job(
            2,
            Config {
                ..job_config(&v, false)
            },
            2,
            4000,
        );
        assert!(next.iter().flatten().all(|o| *o == Ok(true)), "{next:?}");
        let assigned = bad
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("assigned by the validator"))
            .count();
        assert_eq!(assigned, 1, "the excluded relay was given another job");
    }
}

/// A relay that corrupts every chunk: with `MR_VERIFY=1` every op fails with `Verify` (any
/// sample catches it), none returns a wrong sum. With partial corruption the per-op detection
/// probability is 1-(1-f)^k (see tests/validator_detection.rs).
#[test]
fn verify_mode_fails_the_op_instead_of_returning_a_wrong_result() {
    let dir = tmpdir("verify");
    let v = validator(&dir, "127.0.0.1:0", CONFIG);
    let _bad = relay(
        &v,
        &dir.join("bad.key"),
        "127.0.0.1:0",
        &[("MR_RELAY_TEST_CORRUPT", "1")],
    );
    wait_status(&v, "relay registered", |r| up(r) == 1);
    std::env::set_var("MR_RELAY_COUNT", "1");
    let results = run_job(2, job_config(&v, true), 8, 20000);
    std::env::remove_var("MR_RELAY_COUNT");
    for ops in &results {
        assert!(
            !ops.contains(&Ok(false)),
            "a wrong result was returned: {ops:?}"
        );
        assert!(ops.iter().all(|o| *o == Err(ErrorKind::Verify)), "{ops:?}");
    }
}

#[test]
fn heartbeat_loss_restart_and_validator_restart() {
    let dir = tmpdir("restart");
    let v = validator(&dir, "127.0.0.1:0", CONFIG);
    let key = dir.join("r.key");
    let mut r = relay(&v, &key, "127.0.0.1:0", &[]);
    let rows = wait_status(&v, "relay registered", |r| up(r) == 1);
    let id = rows[0].score.id.clone();
    // Freeze the relay: its connection stays open but heartbeats stop.
    let pid = r.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    wait_status(&v, "frozen relay unavailable", |r| {
        up(r) == 0 && r.len() == 1
    });
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    wait_status(&v, "thawed relay registered again", |r| up(r) == 1);
    // Kill it: the connection drops and it becomes unavailable.
    let _ = r.child.kill();
    let _ = r.child.wait();
    wait_status(&v, "relay unavailable", |r| up(r) == 0 && r.len() == 1);
    // Restarted with the same key: same id, available again.
    let _r2 = relay(&v, &key, "127.0.0.1:0", &[]);
    wait_status(&v, "relay re-registered", |r| {
        up(r) == 1 && r[0].score.id == id
    });
    let results = run_job(2, job_config(&v, false), 2, 3000);
    assert!(results.iter().flatten().all(|o| *o == Ok(true)));
    let before = wait_status(&v, "ops verified", |r| r[0].score.verified_ops >= 2);
    // The scores file is rewritten at most every few seconds: wait until it holds them.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let file: mapreduce::validator::registry::ScoresFile =
            serde_json::from_slice(&std::fs::read(dir.join("scores.json")).unwrap()).unwrap();
        if file.relays[0].verified_ops == before[0].score.verified_ops {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "scores never saved");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Restart the validator on the same port: scores are reloaded, the relay comes back.
    let addr = v.addr.clone();
    drop(v);
    let v2 = validator(&dir, &addr, CONFIG);
    let rows = status(&v2);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].score.verified_ops, before[0].score.verified_ops);
    wait_status(&v2, "relay back after validator restart", |r| up(r) == 1);
}

#[test]
fn relays_on_one_ip_split_their_score() {
    let dir = tmpdir("ip");
    let v = validator(&dir, "127.0.0.1:0", CONFIG);
    let _a = relay(&v, &dir.join("a.key"), "127.0.0.1:0", &[]);
    let _b = relay(&v, &dir.join("b.key"), "127.0.0.2:0", &[]);
    let _c = relay(&v, &dir.join("c.key"), "127.0.0.2:0", &[]);
    let rows = wait_status(&v, "three relays with equal records", |r| {
        up(r) == 3
            && r.iter()
                .all(|x| (x.score.availability - r[0].score.availability).abs() < 1e-12)
    });
    let w = |ip: &str| -> Vec<f64> {
        rows.iter()
            .filter(|r| r.score.ip == ip)
            .map(|r| r.score.weight)
            .collect()
    };
    let (one, two) = (w("127.0.0.1"), w("127.0.0.2"));
    assert_eq!((one.len(), two.len()), (1, 2));
    assert!((one[0] - 2.0 * two[0]).abs() < 1e-9, "{rows:#?}");
    assert!((one[0] + two[0] + two[1] - 1.0).abs() < 1e-9);
}

/// Someone registers a relay of its own at the address an honest relay serves: it is never
/// assigned (the address proves another key), and the honest relay's record is untouched.
#[test]
fn a_relay_advertising_an_address_it_does_not_serve_is_never_assigned() {
    let dir = tmpdir("addr");
    let v = validator(&dir, "127.0.0.1:0", CONFIG);
    let honest = relay(&v, &dir.join("r.key"), "127.0.0.1:0", &[]);
    let rows = wait_status(&v, "relay registered", |r| up(r) == 1);
    let id = rows[0].score.id.clone();
    let impostor = Identity::generate();
    let ch = channel::connect(
        &v.addr,
        &Intro::Relay {
            addr: honest.addr.clone(),
            capacity: 1 << 40,
            free_memory: 1 << 40,
        },
        Credential::Identity(&impostor),
        None,
        Duration::from_secs(5),
    )
    .expect("anyone may enroll a relay");
    let rows = wait_status(&v, "impostor's address checked", |r| {
        r.len() == 2 && v.has_log("not assigned until it proves its key")
    });
    let imp = rows.iter().find(|r| r.score.id == impostor.id()).unwrap();
    assert!(!imp.available && !imp.score.addr_verified && imp.score.weight == 0.0);
    let mine = rows.iter().find(|r| r.score.id == id).unwrap();
    assert!(mine.available && mine.score.addr_verified);
    // Jobs go to the honest relay only.
    for _ in 0..3 {
        let a = client::request_as(
            &v.addr,
            &client_identity(),
            &JobRequest {
                job: mapreduce::config::to_hex(&mapreduce::wire::nonce()[..16]),
                peers: 2,
                relays: 0,
                relay_memory: 0,
                max_message_bytes: 0,
            },
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(a.relays.len(), 1, "{a:?}");
        assert_eq!(a.relays[0].id, id);
    }
    drop(ch);
}

#[test]
fn unknown_clients_are_refused_with_a_clear_message() {
    let dir = tmpdir("clients");
    let v = validator(&dir, "127.0.0.1:0", CONFIG);
    let _r = relay(&v, &dir.join("r.key"), "127.0.0.1:0", &[]);
    wait_status(&v, "relay registered", |r| up(r) == 1);
    let stranger = Identity::generate();
    let err = client::request_as(
        &v.addr,
        &stranger,
        &JobRequest {
            job: mapreduce::config::to_hex(&mapreduce::wire::nonce()[..16]),
            peers: 2,
            relays: 0,
            relay_memory: 0,
            max_message_bytes: 0,
        },
        Duration::from_secs(10),
    )
    .expect_err("a stranger got a job");
    assert_eq!(err.kind, ErrorKind::Auth, "{err}");
    assert!(err.message.contains(&stranger.id()), "{err}");
    assert!(err.message.contains("clients"), "{err}");
    // Pinning the validator's key: a wrong pin fails before anything is sent.
    let wrong = Identity::generate().public();
    let err = channel::connect(
        &v.addr,
        &Intro::Status,
        Credential::None,
        Some(&wrong),
        Duration::from_secs(5),
    )
    .err()
    .expect("a wrong validator key was accepted");
    assert_eq!(err.kind, ErrorKind::Auth, "{err}");
}

#[test]
fn benchmark_bots_measure_throughput() {
    let dir = tmpdir("bench");
    let v = validator(
        &dir,
        "127.0.0.1:0",
        r#"{"heartbeat_timeout_ms": 3000, "bench": {"interval_secs": 0.3, "bytes": 1048576, "bots": 2}}"#,
    );
    let _r = relay(&v, &dir.join("r.key"), "127.0.0.1:0", &[]);
    let rows = wait_status(&v, "benchmarked", |r| {
        r.len() == 1 && r[0].score.throughput_mbps > 0.0
    });
    assert_eq!(rows[0].score.correctness, 1.0);
    assert!(v.wait_log("result verified"));
    drop(v);
}

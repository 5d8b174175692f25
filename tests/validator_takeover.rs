//! The takeover, tried as an attacker would with no credentials: enroll a fake relay that
//! claims 1 TiB at an address where nothing listens, ask for a job naming every relay, and
//! send fabricated reports that blame the honest relays and credit the fake one. None of it
//! may move a score or an exclusion, and the next real job must not get the fake relay.

mod validator_util;
use mapreduce::config::to_hex;
use mapreduce::validator::channel::{self, Credential};
use mapreduce::validator::client;
use mapreduce::validator::identity::Identity;
use mapreduce::validator::proto::{Intro, JobRequest, RelayMsg, ReportMsg};
use mapreduce::validator::verify::OpRecord;

use std::time::Duration;
use validator_util::*;

/// The attacker's fake relay: enrolled with a key of its own (anyone may run a relay),
/// acknowledging every job, serving nothing.
fn enroll_fake_relay(v: &Proc) -> Option<String> {
    let key = Identity::generate();
    let id = key.id();
    let intro = Intro::Relay {
        addr: "127.0.0.1:1".into(),
        capacity: 1 << 40,
        free_memory: 1 << 40,
    };
    let ch = channel::connect(
        &v.addr,
        &intro,
        Credential::Identity(&key),
        None,
        Duration::from_secs(5),
    )
    .map_err(|e| eprintln!("fake relay refused: {e}"))
    .ok()?;
    let (mut reader, writer) = (
        ch.reader,
        std::sync::Arc::new(std::sync::Mutex::new(ch.writer)),
    );
    let hb = writer.clone();
    std::thread::spawn(move || {
        for _ in 0..300 {
            let msg = RelayMsg::Heartbeat {
                free_memory: 1 << 40,
                jobs: 0,
            };
            if hb
                .lock()
                .unwrap()
                .send(&msg, Duration::from_secs(5))
                .is_err()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    std::thread::spawn(move || loop {
        match reader.recv::<RelayMsg>(Duration::from_secs(60)) {
            Ok(RelayMsg::Job { job, .. }) => {
                let _ = writer
                    .lock()
                    .unwrap()
                    .send(&RelayMsg::JobAck { job }, Duration::from_secs(5));
            }
            Ok(_) => {}
            Err(_) => return,
        }
    });
    Some(id)
}

fn record(rank: usize, seq: u64, relays: usize, digest: &str) -> OpRecord {
    OpRecord {
        rank,
        seq,
        dtype: 0,
        op: 0,
        count: 4,
        relays,
        positions: vec![0],
        inputs: to_hex(&1f32.to_le_bytes()),
        results: to_hex(&2f32.to_le_bytes()),
        digests: vec![digest.to_string(); relays],
        compress: 0,
        weights: Vec::new(),
    }
}

#[test]
fn an_unauthenticated_client_cannot_take_the_validator_over() {
    let dir = tmpdir("takeover");
    let v = validator(&dir, "127.0.0.1:0", CONFIG);
    let _a = relay(&v, &dir.join("a.key"), "127.0.0.1:0", &[]);
    let _b = relay(&v, &dir.join("b.key"), "127.0.0.1:0", &[]);
    let before = wait_status(&v, "two relays registered", |r| up(r) == 2);
    let honest: Vec<String> = before.iter().map(|r| r.score.id.clone()).collect();

    let fake = enroll_fake_relay(&v);
    // An open job request naming every relay, from a client nobody admitted.
    let attacker = Identity::generate();
    let job = to_hex(&mapreduce::wire::nonce()[..16]);
    let asked = client::request_as(
        &v.addr,
        &attacker,
        &JobRequest {
            job: job.clone(),
            peers: 2,
            relays: 3,
            relay_memory: 0,
            max_message_bytes: 0,
        },
        Duration::from_secs(10),
    );
    let secret = match &asked {
        Ok(a) => {
            eprintln!("attacker got job {} with relays {:?}", a.job, a.relays);
            mapreduce::config::parse_hex("secret", &a.verify_secret)
                .unwrap()
                .try_into()
                .unwrap()
        }
        Err(e) => {
            eprintln!("attacker's job request refused: {e}");
            assert!(e.message.contains("not admitted"), "{e}");
            // Without the secret, the attacker guesses one.
            mapreduce::wire::nonce()
        }
    };
    let relays = asked.as_ref().map_or(3, |a| a.relays.len());
    let report = channel::connect(
        &v.addr,
        &Intro::Report { job: job.clone() },
        Credential::Secret(&secret),
        None,
        Duration::from_secs(5),
    );
    match report {
        Ok(mut ch) => {
            let all: Vec<usize> = (0..relays).collect();
            let fake_index = asked
                .as_ref()
                .ok()
                .and_then(|a| a.relays.iter().position(|r| Some(&r.id) == fake.as_ref()));
            let mut ops = vec![
                // Ranks "saw" different bytes from every relay: blames them all.
                (record(0, 1, all.len(), "aa"), all.clone()),
                (record(1, 1, all.len(), "bb"), all.clone()),
            ];
            if let Some(f) = fake_index {
                // A clean op through the fake relay alone.
                ops.push((record(0, 2, 1, "cc"), vec![f]));
                ops.push((record(1, 2, 1, "cc"), vec![f]));
            }
            for (record, relay_index) in ops {
                let msg = ReportMsg::Op {
                    record,
                    world: 2,
                    relay_index,
                    // 1 GiB in 1 µs.
                    bytes: 1 << 30,
                    micros: 1,
                    evidence: Vec::new(),
                };
                ch.send(&msg, Duration::from_secs(5)).unwrap();
            }
        }
        Err(e) => eprintln!("attacker's report connection refused: {e}"),
    }
    // Let the validator act on whatever it accepted.
    std::thread::sleep(Duration::from_millis(1500));
    let rows = status(&v);
    for id in &honest {
        let r = rows
            .iter()
            .find(|r| &r.score.id == id)
            .expect("honest relay");
        assert!(!r.score.excluded, "an honest relay was excluded: {rows:#?}");
        assert_eq!(r.score.correctness, 1.0, "{rows:#?}");
        assert_eq!(r.score.failed_ops, 0, "{rows:#?}");
        assert!(r.score.weight > 0.0, "{rows:#?}");
    }
    if let Some(f) = &fake {
        if let Some(r) = rows.iter().find(|r| &r.score.id == f) {
            assert_eq!(r.score.weight, 0.0, "the fake relay got weight: {rows:#?}");
            assert_eq!(r.score.throughput_mbps, 0.0, "{rows:#?}");
        }
    }
    // The next real job gets honest relays only.
    let next = client::request_as(
        &v.addr,
        &client_identity(),
        &JobRequest {
            job: to_hex(&mapreduce::wire::nonce()[..16]),
            peers: 2,
            relays: 0,
            relay_memory: 0,
            max_message_bytes: 0,
        },
        Duration::from_secs(10),
    )
    .expect("a real client's job");
    if let Some(f) = &fake {
        let r = rows
            .iter()
            .find(|r| &r.score.id == f)
            .expect("fake relay listed");
        assert!(
            !r.available,
            "a relay that serves nothing is available: {r:?}"
        );
        assert!(!r.score.addr_verified);
    }
    let ids: Vec<&String> = next.relays.iter().map(|r| &r.id).collect();
    assert!(
        ids.iter().all(|id| honest.contains(id)) && !ids.is_empty(),
        "the next job got {ids:?}, honest relays are {honest:?}"
    );
    assert!(
        asked.is_err(),
        "an unauthenticated client got a job token and verification secret"
    );
}

/// An admitted client fabricates reports against an honest relay: a receipt the relay never
/// signed, chunk bytes that reduce to something else, and records claiming the relay sent
/// different bytes to different ranks. The relay keeps its record; the client is flagged.
#[test]
fn fabricated_reports_from_an_admitted_client_count_against_the_client() {
    use mapreduce::relay::receipts::{Entry, Kind, Receipt, Reduction};
    use mapreduce::validator::proto::{ChunkBytes, RelayEvidence};
    let dir = tmpdir("fabricated");
    let v = validator(
        &dir,
        "127.0.0.1:0",
        r#"{"heartbeat_timeout_ms": 1500, "default_relays": 1, "report_fraction": 1.0,
            "samples": 8, "client_flag_limit": 2, "bench": {"interval_secs": 0}}"#,
    );
    let _r = relay(&v, &dir.join("r.key"), "127.0.0.1:0", &[]);
    let before = wait_status(&v, "relay registered", |r| up(r) == 1);
    let client = client_identity();
    let a = client::request_as(
        &v.addr,
        &client,
        &JobRequest {
            job: to_hex(&mapreduce::wire::nonce()[..16]),
            peers: 2,
            relays: 1,
            relay_memory: 0,
            max_message_bytes: 0,
        },
        Duration::from_secs(10),
    )
    .expect("an admitted client's job");
    let secret: [u8; 32] = mapreduce::config::parse_hex("s", &a.verify_secret)
        .unwrap()
        .try_into()
        .unwrap();
    let job: [u8; 16] = mapreduce::config::parse_hex("job", &a.job)
        .unwrap()
        .try_into()
        .unwrap();
    let mut ch = channel::connect(
        &v.addr,
        &Intro::Report { job: a.job.clone() },
        Credential::Secret(&secret),
        None,
        Duration::from_secs(5),
    )
    .expect("report connection");
    // A receipt "from the relay", signed by somebody else: inputs 1 and 1, result 3.
    let forger = Identity::generate();
    let one = 1f32.to_le_bytes();
    let three = 3f32.to_le_bytes();
    let digest = |b: &[u8]| *blake3::hash(b).as_bytes();
    let entry = |kind, rank, b: &[u8]| Entry {
        kind,
        rank,
        offset: 0,
        len: 4,
        digest: digest(b),
    };
    let receipt = Receipt {
        job,
        seq: 1,
        reduction: Some(Reduction {
            dtype: mapreduce::DType::F32,
            op: mapreduce::ReduceOp::Sum,
            wire: mapreduce::compress::Compression::None,
            world: 2,
        }),
        entries: vec![
            entry(Kind::Input, 0, &one),
            entry(Kind::Input, 1, &one),
            entry(Kind::Result, 0, &three),
            entry(Kind::Result, 1, &three),
        ],
    };
    let msg = receipt.message();
    let mut raw = a.relays[0].id.clone();
    raw.push_str(&to_hex(&forger.sign(&msg)));
    raw.push_str(&to_hex(&msg));
    for (seq, with_receipt) in [(1u64, true), (2, false)] {
        for rank in 0..2 {
            let evidence = if with_receipt {
                vec![RelayEvidence {
                    relay: 0,
                    receipt: raw.clone(),
                    chunks: vec![
                        ChunkBytes {
                            kind: 0,
                            offset: 0,
                            bytes: to_hex(&one),
                        },
                        ChunkBytes {
                            kind: 1,
                            offset: 0,
                            bytes: to_hex(&three),
                        },
                    ],
                }]
            } else {
                Vec::new()
            };
            // Without a receipt: records claiming different bytes per rank.
            let digest = if rank == 0 { "aa" } else { "bb" };
            let mut rec = record(rank, seq, 1, digest);
            rec.count = 1;
            let msg = ReportMsg::Op {
                record: rec,
                world: 2,
                relay_index: vec![0],
                bytes: 4,
                micros: 1,
                evidence,
            };
            ch.send(&msg, Duration::from_secs(5)).unwrap();
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (rows, flagged) = loop {
        let (rows, flagged) = client::status_full(&v.addr, Duration::from_secs(5)).unwrap();
        if !flagged.is_empty() || std::time::Instant::now() > deadline {
            break (rows, flagged);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let r = &rows[0];
    assert!(!r.score.excluded, "the honest relay was excluded: {r:?}");
    assert_eq!(r.score.correctness, 1.0);
    assert_eq!(r.score.failed_ops, 0);
    assert_eq!(r.score.verified_ops, before[0].score.verified_ops);
    assert_eq!(flagged.len(), 1, "{flagged:?}");
    assert_eq!(flagged[0].client, client.id());
    assert!(
        flagged[0].last_evidence.contains("did not sign"),
        "{flagged:?}"
    );
    assert!(v.wait_log(&format!("client {} flagged", client.id())));
    // Flagged twice (both ranks' reports), the limit: no more jobs for this client.
    let again = client::request_as(
        &v.addr,
        &client,
        &JobRequest {
            job: to_hex(&mapreduce::wire::nonce()[..16]),
            peers: 2,
            relays: 1,
            relay_memory: 0,
            max_message_bytes: 0,
        },
        Duration::from_secs(10),
    )
    .expect_err("a flagged client got another job");
    assert!(again.message.contains("did not check out"), "{again}");
}

//! Detection rate of verification by sampling, measured against 1-(1-f)^k, with real
//! `mr-validator` and `mr-relayd` processes on loopback: by the peers among themselves
//! (`MR_VERIFY=1`) and by the validator on the relay's signed receipts.

mod validator_util;
use mapreduce::{Config, ErrorKind};
use validator_util::*;

/// `MR_RELAY_COUNT` is process-wide: one test at a time sets it.
static RELAY_COUNT: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn detection_rate_matches_one_minus_one_minus_f_to_the_k() {
    let _one = RELAY_COUNT.lock().unwrap_or_else(|e| e.into_inner());
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
        relay_chunk_bytes: 256,
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

/// The validator judges every op on the relay's signed receipts of the chunks around k sampled
/// positions; each op where a sampled chunk was corrupted convicts the relay again
/// (`failed_ops`), so `failed_ops / ops` is the per-op detection rate.
#[test]
fn signed_evidence_detection_rate_matches_one_minus_one_minus_f_to_the_k() {
    let _one = RELAY_COUNT.lock().unwrap_or_else(|e| e.into_inner());
    let (f, k, ops) = (0.1f64, 4usize, 120usize);
    let dir = tmpdir("rate-signed");
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
        relay_chunk_bytes: 256,
        ..job_config(&v, false)
    };
    // 256 chunks of 64 f32 per op.
    let results = run_job(2, cfg, ops, 64 * 256);
    std::env::remove_var("MR_RELAY_COUNT");
    assert_eq!(results[0].len(), ops);
    // Reports arrive in the background: wait until the count stops moving.
    let mut last = u64::MAX;
    let mut failed = 0;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        failed = status(&v)[0].score.failed_ops;
        if failed == last {
            break;
        }
        last = failed;
    }
    let measured = failed as f64 / ops as f64;
    let predicted = 1.0 - (1.0 - f).powi(k as i32);
    let sigma = (predicted * (1.0 - predicted) / ops as f64).sqrt();
    println!(
        "signed-evidence detection rate: f={f} k={k}: measured {measured:.3} over {ops} ops, predicted 1-(1-f)^k = {predicted:.3} (sigma {sigma:.3})"
    );
    assert!(
        (measured - predicted).abs() <= 5.0 * sigma,
        "measured {measured}, predicted {predicted}"
    );
}

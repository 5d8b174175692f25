//! The validator judging compressed relay all-reduces on the relays' signed receipts, with
//! real `mr-validator` and `mr-relayd` processes: the receipts digest the encoded bytes on the
//! wire, the peers bring their encoded input chunks, and the validator recomputes the relay's
//! encoded result. A relay that corrupts its results is convicted under bf16 and int8; an
//! honest one is credited and never convicted, and no client is flagged; ranks that all
//! describe their ops otherwise than the relay signed that it reduced them get the client
//! flagged, never the relay convicted.

mod validator_util;
use mapreduce::compress::Compression;
use mapreduce::Config;
use validator_util::*;

const CONFIG: &str = r#"{"heartbeat_timeout_ms": 3000, "report_fraction": 1.0, "samples": 4, "bench": {"interval_secs": 0}}"#;

/// `MR_RELAY_COUNT` is process-wide: one test at a time sets it.
static RELAY_COUNT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Run `ops` all-reduces in format `z` through one relay started with `env`; returns the
/// relay's (verified_ops, failed_ops) once the validator's counts stop moving, and whether it
/// flagged a client.
fn judged(name: &str, z: Compression, env: &[(&str, &str)], ops: usize) -> (u64, u64, bool) {
    let (verified, failed, flags) = judged_with(name, z, env, &[], ops);
    (verified, failed, !flags.is_empty())
}

/// As [`judged`], with `client_env` set in this process (where the ranks run) for the job;
/// returns the validator's log lines flagging the client.
fn judged_with(
    name: &str,
    z: Compression,
    env: &[(&str, &str)],
    client_env: &[(&str, &str)],
    ops: usize,
) -> (u64, u64, Vec<String>) {
    let _one = RELAY_COUNT.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir(name);
    let v = validator(&dir, "127.0.0.1:0", CONFIG);
    let _relay = relay(&v, &dir.join("r.key"), "127.0.0.1:0", env);
    wait_status(&v, "relay registered", |r| up(r) == 1);
    std::env::set_var("MR_RELAY_COUNT", "1");
    let cfg = Config {
        compress: z,
        ..job_config(&v, false)
    };
    // 8 chunks of 1024 float32 per op (4 KiB chunks), the last one ending in a short block.
    for (k, val) in client_env {
        std::env::set_var(k, val);
    }
    let results = run_job(2, cfg, ops, 8 * 1024 - 100);
    // Every report was queued when its op completed: the ranks are done with the variables.
    for (k, _) in client_env {
        std::env::remove_var(k);
    }
    std::env::remove_var("MR_RELAY_COUNT");
    for (r, res) in results.iter().enumerate() {
        assert_eq!(res.len(), ops, "rank {r}: {res:?}");
        assert!(res.iter().all(|o| o.is_ok()), "rank {r}: {res:?}");
    }
    // Reports arrive in the background: wait until the counts (and the client's flags)
    // stop moving, or for 5 s when nothing moves at all.
    let mut last = (u64::MAX, u64::MAX, usize::MAX);
    for poll in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let s = &status(&v)[0].score;
        let now = (s.verified_ops, s.failed_ops, v.count_log("flagged"));
        if now == last && (now != (0, 0, 0) || poll >= 16) {
            break;
        }
        last = now;
    }
    let flags = v
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("flagged"))
        .cloned()
        .collect();
    (last.0, last.1, flags)
}

#[test]
fn a_corrupting_relay_is_convicted_under_compression() {
    for z in [Compression::Bf16, Compression::Int8] {
        let (_, failed, flagged) = judged(
            &format!("corrupt-{z}"),
            z,
            &[("MR_RELAY_TEST_CORRUPT", "1")],
            6,
        );
        assert!(
            failed >= 5,
            "{z}: only {failed} of 6 ops convicted the relay"
        );
        assert!(!flagged, "{z}: a client was flagged for honest evidence");
    }
}

#[test]
fn an_honest_relay_under_compression_is_verified_and_never_convicted() {
    for z in [Compression::Bf16, Compression::Fp16, Compression::Int8] {
        let (verified, failed, flagged) = judged(&format!("honest-{z}"), z, &[], 6);
        assert_eq!(failed, 0, "{z}");
        assert!(verified >= 5, "{z}: only {verified} of 6 ops verified");
        assert!(!flagged, "{z}: a client was flagged");
    }
}

/// Every rank of a job reports its ops as something other than what it ran (an int8 sum as
/// exact float32 data, an exact sum as a max) and forwards the relay's real receipts. The
/// relay signed what it reduced, and its signed inputs reduce to its signed results under
/// that: it is never convicted; the reports are blamed on the client.
#[test]
fn ranks_misdescribing_their_ops_alike_never_convict_an_honest_relay() {
    for (name, z, var, val) in [
        (
            "as-exact",
            Compression::Int8,
            "MR_TEST_REPORT_COMPRESS",
            "0",
        ),
        ("as-max", Compression::None, "MR_TEST_REPORT_OP", "2"),
    ] {
        let (verified, failed, flags) =
            judged_with(&format!("misreported-{name}"), z, &[], &[(var, val)], 4);
        assert_eq!(failed, 0, "{name}: the honest relay was convicted");
        assert_eq!(verified, 0, "{name}: credited for ops the job misdescribed");
        // Flagged on the relay's signed reduction, which the reports do not match.
        assert!(
            !flags.is_empty(),
            "{name}: the misdescribing client was not flagged"
        );
        assert!(
            flags
                .iter()
                .all(|l| l.contains("signed that it reduced it as float32 sum of 2 ranks")),
            "{name}: {flags:#?}"
        );
    }
}

/// A relay whose receipts sign another reduction than the one it ran (a max for the sum it
/// computed honestly): the peers do not report receipts that contradict the op they ran (they
/// would count against them) and log them, so no client is flagged and the relay earns no
/// verified op. (The validator would convict such a receipt on the relay's own signatures;
/// honest peers cannot tell it from a relay that took the maximum and said so.)
#[test]
fn a_relay_signing_another_reduction_earns_nothing_and_flags_no_client() {
    for z in [Compression::None, Compression::Int8] {
        let (verified, failed, flags) = judged_with(
            &format!("misdescribing-relay-{z}"),
            z,
            &[("MR_RELAY_TEST_MISDESCRIBE", "1")],
            &[],
            4,
        );
        assert_eq!(
            verified, 0,
            "{z}: credited for receipts that misstate the op"
        );
        assert!(flags.is_empty(), "{z}: a client was flagged: {flags:#?}");
        println!("{z}: relay convicted on {failed} ops");
    }
}

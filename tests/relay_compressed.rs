//! Compressed all-reduce through real `mr-relayd` processes (peers in threads): every format,
//! 1..5 ranks, 1..3 relays; bitwise identical on every rank and within the relay path's
//! bound of the exact sum (one encoding per input plus one for the sum, see
//! `mapreduce::compress`); special blocks; a relay killed mid-op; mismatched formats named;
//! `MR_VERIFY=1` catching a relay that corrupts compressed results and never flagging an
//! honest one.

mod relay_util;

use mapreduce::compress::Compression;
use mapreduce::{Comm, ErrorKind, ReduceOp, UniqueId};
use relay_util::{relay_config, RelayProc, TOKEN};
use std::time::Duration;

const FORMATS: [Compression; 3] = [Compression::Bf16, Compression::Fp16, Compression::Int8];
const COUNTS: [usize; 8] = [0, 1, 3, 255, 256, 257, 1000, 20_001];

/// Rank r's contribution at element i: magnitude at most 3, varied within every int8 block.
fn value(r: usize, i: usize) -> f64 {
    ((i as f64 * 0.731 + r as f64 * 1.9).sin() * 3.0 * 64.0).round() / 64.0
}

/// What one encoding may lose for values of magnitude at most `mag`.
fn one_encoding(z: Compression, mag: f64) -> f64 {
    match z {
        Compression::None => 0.0,
        Compression::Bf16 => mag / 256.0,
        Compression::Fp16 => mag / 2048.0,
        Compression::Int8 => 2.0 * mag / 255.0 / 2.0 * 1.001,
    }
}

/// The relay path's bound for `n` ranks: each input encoded once (magnitude 3), the sum once
/// (magnitude 3n), plus f32 rounding of the sum.
fn relay_bound(z: Compression, n: usize) -> f64 {
    n as f64 * one_encoding(z, 3.0) + one_encoding(z, 3.0 * n as f64) + 1e-5
}

fn small_chunks(relays: &[RelayProc]) -> mapreduce::Config {
    mapreduce::Config {
        // Several chunks per relay even for the smaller counts: 1024 f32 per chunk.
        relay_chunk_bytes: 4096,
        ..relay_config(relays, TOKEN)
    }
}

fn bits32(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bits64(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn every_format_rank_and_relay_count() {
    let relays: Vec<RelayProc> = (0..3).map(|_| RelayProc::start(TOKEN)).collect();
    for nrelays in 1..=3 {
        for n in 1..=5usize {
            let cfg = small_chunks(&relays[..nrelays]);
            let results = relay_util::run_job(n, cfg, move |comm: Comm| {
                assert_eq!(comm.relays().len(), nrelays);
                let r = comm.rank();
                let mut out = Vec::new();
                for z in FORMATS {
                    for count in COUNTS {
                        let mut a: Vec<f32> = (0..count).map(|i| value(r, i) as f32).collect();
                        comm.allreduce_compressed(&mut a, ReduceOp::Sum, z)
                            .unwrap_or_else(|e| panic!("rank {r} {z} f32 x {count}: {e}"));
                        let mut b: Vec<f64> = (0..count).map(|i| value(r, i)).collect();
                        comm.allreduce_compressed(&mut b, ReduceOp::Sum, z)
                            .unwrap_or_else(|e| panic!("rank {r} {z} f64 x {count}: {e}"));
                        out.push((z, count, a, b));
                    }
                }
                comm.destroy().unwrap();
                out
            });
            for (k, (z, count, a0, b0)) in results[0].iter().enumerate() {
                let what = format!("{z} n={n} relays={nrelays} count={count}");
                for (r, res) in results.iter().enumerate() {
                    assert_eq!(
                        bits32(&res[k].2),
                        bits32(a0),
                        "{what}: rank {r} f32 differs"
                    );
                    assert_eq!(
                        bits64(&res[k].3),
                        bits64(b0),
                        "{what}: rank {r} f64 differs"
                    );
                }
                let bound = relay_bound(*z, n);
                for i in 0..*count {
                    let exact: f64 = (0..n).map(|r| value(r, i)).sum();
                    let (x, y) = (f64::from(a0[i]), b0[i]);
                    assert!(
                        (x - exact).abs() <= bound,
                        "{what} f32 [{i}]: {x} vs {exact}"
                    );
                    assert!(
                        (y - exact).abs() <= bound,
                        "{what} f64 [{i}]: {y} vs {exact}"
                    );
                }
                // The relays really carried the format: int8 loses bits on this data.
                if *z == Compression::Int8 && *count == 20_001 {
                    let exact = |i: usize| (0..n).map(|r| value(r, i) as f32).sum::<f32>();
                    assert!(
                        (0..*count).any(|i| a0[i] != exact(i)),
                        "{what}: an int8 relay all-reduce came back exact"
                    );
                }
            }
        }
    }
}

/// NaN and infinity poison (only) their own block under int8 and stay themselves under the
/// 16-bit formats; all-zero and constant blocks come back exact; other reductions and the
/// average go through the relay's f32 fold too.
#[test]
fn special_blocks_and_other_reductions() {
    let relays: Vec<RelayProc> = (0..2).map(|_| RelayProc::start(TOKEN)).collect();
    let n = 3;
    let cfg = small_chunks(&relays);
    let count = 4 * 256 + 10;
    // Block 0 all zero, block 1 constant, block 2 has a NaN on rank 1, block 3 an infinity
    // on rank 2, the tail block small integers.
    let input = |r: usize, i: usize| -> f32 {
        match i / 256 {
            0 => 0.0,
            1 => 2.5,
            2 if r == 1 && i == 600 => f32::NAN,
            3 if r == 2 && i == 800 => f32::INFINITY,
            _ => ((i + r) % 7) as f32,
        }
    };
    let results = relay_util::run_job(n, cfg, move |comm: Comm| {
        let r = comm.rank();
        let mut out = Vec::new();
        for z in FORMATS {
            let mut a: Vec<f32> = (0..count).map(|i| input(r, i)).collect();
            comm.allreduce_compressed(&mut a, ReduceOp::Sum, z).unwrap();
            out.push(a);
            // Max and average of small integers.
            let mut m: Vec<f32> = (0..count).map(|i| ((i * 3 + r) % 5) as f32).collect();
            comm.allreduce_compressed(&mut m, ReduceOp::Max, z).unwrap();
            out.push(m);
            let mut v: Vec<f32> = (0..count).map(|i| ((i + r) % 9) as f32).collect();
            comm.allreduce_compressed(&mut v, ReduceOp::Avg, z).unwrap();
            out.push(v);
        }
        comm.destroy().unwrap();
        out
    });
    for (k, z) in FORMATS.into_iter().enumerate() {
        for res in &results {
            for j in 0..3 {
                assert_eq!(
                    bits32(&res[3 * k + j]),
                    bits32(&results[0][3 * k + j]),
                    "{z}"
                );
            }
        }
        let (a, m, v) = (
            &results[0][3 * k],
            &results[0][3 * k + 1],
            &results[0][3 * k + 2],
        );
        assert!(a[..256].iter().all(|x| *x == 0.0), "{z}: zero block");
        assert!(a[256..512].iter().all(|x| *x == 7.5), "{z}: constant block");
        assert!(a[600].is_nan(), "{z}: NaN survives");
        match z {
            Compression::Int8 => {
                // A non-finite block decodes as NaN throughout; the others are unaffected.
                assert!(a[512..1024].iter().all(|x| x.is_nan()), "{z}");
            }
            _ => {
                assert_eq!(a[800], f32::INFINITY, "{z}");
                assert!(a[512..1024]
                    .iter()
                    .enumerate()
                    .all(|(j, x)| j + 512 == 600 || j + 512 == 800 || x.is_finite()));
            }
        }
        for i in 1024..count {
            let exact: f32 = (0..n).map(|r| input(r, i)).sum();
            assert!(
                (a[i] - exact).abs() <= relay_bound(z, n) as f32 * 2.0,
                "{z} [{i}]"
            );
            let mx = (0..n).map(|r| ((i * 3 + r) % 5) as f32).fold(0.0, f32::max);
            assert!(
                (m[i] - mx).abs() <= one_encoding(z, 4.0) as f32 * 2.0 + 1e-5,
                "{z} max [{i}]"
            );
            let avg = (0..n).map(|r| ((i + r) % 9) as f32).sum::<f32>() / n as f32;
            assert!(
                (v[i] - avg).abs() <= relay_bound(z, n) as f32 * 3.0,
                "{z} avg [{i}]"
            );
        }
    }
}

/// A relay killed while an int8 all-reduce runs: its chunks are redone through the others
/// (or the ring, when none is left), and every rank still ends with identical bits within
/// the bound.
#[test]
fn a_relay_killed_mid_op_under_int8() {
    for (nrelays, kill) in [(3usize, 1usize), (1, 1)] {
        let mut relays: Vec<RelayProc> = (0..nrelays).map(|_| RelayProc::start(TOKEN)).collect();
        let n = 4;
        let count = 3_000_000;
        let cfg = mapreduce::Config {
            compress: Compression::Int8,
            timeout: Duration::from_secs(60),
            // Paced ranks (3 MB of int8 each at 20 MB/s), so the kill lands while data flows.
            max_rate: Some(20_000_000),
            ..relay_config(&relays, TOKEN)
        };
        let id = UniqueId::new(&cfg).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let joins: Vec<_> = (0..n)
            .map(|r| {
                let (cfg, tx) = (cfg.clone(), tx.clone());
                std::thread::spawn(move || {
                    let comm = Comm::init(n, &id, r, cfg).unwrap();
                    let mut out = Vec::new();
                    let mut first_done = None;
                    for op in 0..3 {
                        let mut a: Vec<f32> = (0..count).map(|i| value(r + op, i) as f32).collect();
                        if op == 0 {
                            tx.send(()).unwrap();
                        }
                        comm.allreduce(&mut a, ReduceOp::Sum)
                            .unwrap_or_else(|e| panic!("rank {r} op {op}: {e}"));
                        first_done.get_or_insert_with(std::time::Instant::now);
                        out.push(a);
                    }
                    comm.destroy().unwrap();
                    (out, first_done.unwrap())
                })
            })
            .collect();
        for _ in 0..n {
            rx.recv().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
        let struck = std::time::Instant::now();
        relays[kill - 1].child.kill().unwrap();
        let (results, done): (Vec<Vec<Vec<f32>>>, Vec<std::time::Instant>) =
            joins.into_iter().map(|j| j.join().unwrap()).unzip();
        assert!(
            done.iter().all(|t| *t > struck),
            "relays={nrelays}: the kill came after the first op had ended on some rank"
        );
        // With the only relay gone the op finishes on the compressed ring, whose partial sums
        // are encoded at every hop: n encodings of magnitude up to 3n.
        let bound = relay_bound(Compression::Int8, n)
            .max(n as f64 * one_encoding(Compression::Int8, 3.0 * n as f64) + 1e-5);
        for op in 0..3 {
            for (r, res) in results.iter().enumerate() {
                assert_eq!(
                    bits32(&res[op]),
                    bits32(&results[0][op]),
                    "relays={nrelays} op {op}: rank {r} differs"
                );
            }
            for (i, x) in results[0][op].iter().enumerate() {
                let exact: f64 = (0..n).map(|r| value(r + op, i)).sum();
                assert!(
                    (f64::from(*x) - exact).abs() <= bound,
                    "relays={nrelays} op {op} [{i}]: {x} vs {exact}"
                );
            }
        }
    }
}

/// Ranks that ask for different formats fail the op with an error naming both, and the
/// communicator stays usable.
#[test]
fn mismatched_formats_through_relays_are_named() {
    let relays: Vec<RelayProc> = (0..2).map(|_| RelayProc::start(TOKEN)).collect();
    let cfg = small_chunks(&relays);
    let results = relay_util::run_job(2, cfg, |comm: Comm| {
        let z = [Compression::Int8, Compression::Bf16][comm.rank()];
        let mut a = vec![1.0f32; 100_000];
        let e = comm
            .allreduce_compressed(&mut a, ReduceOp::Sum, z)
            .unwrap_err();
        let mut b = vec![1.0f32; 1000];
        comm.allreduce_compressed(&mut b, ReduceOp::Sum, Compression::Int8)
            .unwrap();
        assert!(b.iter().all(|v| *v == 2.0));
        comm.destroy().unwrap();
        e
    });
    for e in results {
        assert!(
            e.message.contains("int8") && e.message.contains("bf16") && e.message.contains("rank"),
            "{e}"
        );
    }
}

/// Run `ops` compressed all-reduces with `MR_VERIFY=1` through one relay started with `env`;
/// per op on rank 0: whether it failed verification.
fn verified_job(z: Compression, env: &[(&str, &str)], ops: usize) -> Vec<bool> {
    let relay = RelayProc::start_with_env(TOKEN, &[], env);
    let cfg = mapreduce::Config {
        verify: true,
        compress: z,
        relay_chunk_bytes: 4096,
        ..relay_config(std::slice::from_ref(&relay), TOKEN)
    };
    let out = relay_util::run_job(3, cfg, move |comm: Comm| {
        let r = comm.rank();
        let mut flagged = Vec::new();
        for op in 0..ops {
            let mut a: Vec<f32> = (0..50_000).map(|i| value(r + op, i) as f32).collect();
            match comm.allreduce(&mut a, ReduceOp::Sum) {
                Ok(()) => flagged.push(false),
                Err(e) => {
                    assert_eq!(e.kind, ErrorKind::Verify, "rank {r} op {op}: {e}");
                    assert!(e.message.contains(z.name()), "{e}");
                    flagged.push(true);
                }
            }
        }
        comm.destroy().unwrap();
        flagged
    });
    for res in &out {
        assert_eq!(res, &out[0], "ranks disagree about verification");
    }
    out[0].clone()
}

#[test]
fn verification_catches_a_corrupting_relay_under_compression() {
    for z in [Compression::Bf16, Compression::Int8] {
        let flagged = verified_job(z, &[("MR_RELAY_TEST_CORRUPT", "1")], 4);
        assert!(flagged.iter().all(|f| *f), "{z}: {flagged:?}");
    }
}

#[test]
fn verification_never_flags_an_honest_relay_under_compression() {
    for z in FORMATS {
        let flagged = verified_job(z, &[], 6);
        assert!(flagged.iter().all(|f| !*f), "{z}: {flagged:?}");
    }
}

//! Compressed all-reduce over real TCP connections (communicators in threads of one process):
//! every format, 1..5 ranks, float32 and float64, bitwise identical on every rank and within
//! the documented bound of the exact sum; shared memory and integer data stay exact;
//! mismatched formats are named.

use mapreduce::compress::Compression;
mod threaded;

use mapreduce::{Config, ErrorKind, ReduceOp};

fn config(shm: bool, compress: Compression) -> Config {
    Config {
        timeout: std::time::Duration::from_secs(20),
        shm,
        compress,
        // Small chunks: every size below runs through several segments per block.
        chunk_bytes: 4096,
        ..Config::default()
    }
}

/// Rank r's contribution at element i: magnitude below 4, varied within every int8 block.
fn value(r: usize, i: usize) -> f64 {
    ((i as f64 * 0.731 + r as f64 * 1.9).sin() * 3.0 * 64.0).round() / 64.0
}

/// What one encoding may lose for partial sums of up to `n` contributions.
fn one_encoding(z: Compression, n: usize) -> f64 {
    let mag = 3.0 * n as f64;
    match z {
        Compression::None => 0.0,
        Compression::Bf16 => mag / 256.0,
        Compression::Fp16 => mag / 2048.0,
        Compression::Int8 => 2.0 * mag / 255.0 / 2.0 * 1.001,
    }
}

#[test]
fn every_format_and_world_size_over_tcp() {
    for n in 1..=5usize {
        for z in Compression::ALL {
            // The format comes from the communicator's configuration (MR_COMPRESS).
            let cfg = config(false, z);
            let results = threaded::run_ranks(
                n,
                move |_| cfg.clone(),
                move |comm| {
                    let r = comm.rank();
                    let mut out = Vec::new();
                    for count in [0usize, 1, 3, 1000, 30_001] {
                        let mut a: Vec<f32> = (0..count).map(|i| value(r, i) as f32).collect();
                        comm.allreduce(&mut a, ReduceOp::Sum).unwrap();
                        let mut b: Vec<f64> = (0..count).map(|i| value(r, i)).collect();
                        comm.allreduce(&mut b, ReduceOp::Sum).unwrap();
                        out.push((a, b));
                    }
                    out
                },
            );
            for (k, count) in [0usize, 1, 3, 1000, 30_001].into_iter().enumerate() {
                let (a0, b0) = &results[0][k];
                for (r, res) in results.iter().enumerate() {
                    let (a, b) = &res[k];
                    assert!(
                        a.iter().zip(a0).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{z} n={n} count={count}: rank {r}'s f32 result differs from rank 0's"
                    );
                    assert!(
                        b.iter().zip(b0).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{z} n={n} count={count}: rank {r}'s f64 result differs from rank 0's"
                    );
                }
                let bound = if n == 1 {
                    0.0
                } else {
                    n as f64 * one_encoding(z, n)
                };
                // Above MR_SMALL_BYTES the ring really carried the format: int8 loses bits.
                if z == Compression::Int8 && n > 1 && count == 30_001 {
                    let lossy = (0..count).any(|i| {
                        f64::from(a0[i]) != (0..n).map(|r| value(r, i) as f32).sum::<f32>() as f64
                    });
                    assert!(lossy, "n={n}: an int8 all-reduce came back exact");
                }
                for i in 0..count {
                    let exact: f64 = (0..n).map(|r| value(r, i)).sum();
                    assert!(
                        (f64::from(a0[i]) - exact).abs() <= bound + 1e-5,
                        "{z} n={n} f32 element {i}: {} vs {exact} (bound {bound})",
                        a0[i]
                    );
                    assert!(
                        (b0[i] - exact).abs() <= bound + 1e-5,
                        "{z} n={n} f64 element {i}: {} vs {exact} (bound {bound})",
                        b0[i]
                    );
                }
            }
        }
    }
}

#[test]
fn per_call_format_and_exact_paths() {
    let n = 3;
    let cfg = config(false, Compression::None);
    threaded::run_ranks(
        n,
        move |_| cfg.clone(),
        move |comm| {
            let r = comm.rank();
            // Per call: int8 through the ring is lossy but identical; integer data may not ask.
            let mut a: Vec<f32> = (0..5000).map(|i| value(r, i) as f32).collect();
            comm.allreduce_compressed(&mut a, ReduceOp::Avg, Compression::Int8)
                .unwrap();
            for (i, x) in a.iter().enumerate() {
                let exact: f64 = (0..n).map(|q| value(q, i)).sum::<f64>() / n as f64;
                assert!((f64::from(*x) - exact).abs() <= 3.0 * one_encoding(Compression::Int8, n));
            }
            let mut ints = vec![r as i32; 10];
            let e = comm
                .allreduce_compressed(&mut ints, ReduceOp::Sum, Compression::Int8)
                .unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument);
            assert!(e.message.contains("int32"), "{}", e.message);
            // MR_COMPRESS-style default with integer data: exact.
            comm.allreduce_compressed(&mut ints, ReduceOp::Sum, Compression::None)
                .unwrap();
            assert!(ints.iter().all(|v| *v == 3));
        },
    );
    // On shared memory nothing crosses a wire: compressed calls are exact.
    let cfg = config(true, Compression::Int8);
    threaded::run_ranks(
        n,
        move |_| cfg.clone(),
        move |comm| {
            let r = comm.rank();
            let mut a: Vec<f32> = (0..5000).map(|i| value(r, i) as f32).collect();
            comm.allreduce(&mut a, ReduceOp::Sum).unwrap();
            if comm.uses_shared_memory() {
                for (i, x) in a.iter().enumerate() {
                    let exact: f32 = (0..n).map(|q| value(q, i) as f32).sum();
                    assert_eq!(*x, exact);
                }
            }
        },
    );
}

#[test]
fn mismatched_formats_are_named_and_the_communicator_survives() {
    let n = 2;
    let results = threaded::run_ranks(
        n,
        move |r| {
            config(
                false,
                if r == 0 {
                    Compression::Int8
                } else {
                    Compression::Bf16
                },
            )
        },
        |comm| {
            let mut a = vec![1.0f32; 100_000];
            let e = comm.allreduce(&mut a, ReduceOp::Sum).unwrap_err();
            // The communicator is still usable for exact ops afterwards.
            let mut b = vec![1.0f32; 1000];
            comm.allreduce_compressed(&mut b, ReduceOp::Sum, Compression::None)
                .unwrap();
            assert!(b.iter().all(|v| *v == 2.0));
            e
        },
    );
    for e in results {
        assert!(
            e.message.contains("int8 on the wire") && e.message.contains("bf16 on the wire"),
            "{e}"
        );
    }
}

/// Under `MR_COMPRESS`, reduce-scatter, all-gather and broadcast of float data travel
/// compressed too, over TCP: all-gather and broadcast decode the same bytes on every rank
/// (the owner too: one encoding, identical bits everywhere), reduce-scatter keeps every block
/// within n − 1 encodings of its partial sums. Integer data stays exact.
#[test]
fn reduce_scatter_allgather_and_broadcast_compress_too() {
    for n in [1usize, 2, 3, 5] {
        for z in [Compression::Bf16, Compression::Fp16, Compression::Int8] {
            let cfg = config(false, z);
            let count = 3001;
            let results = threaded::run_ranks(
                n,
                move |_| cfg.clone(),
                move |comm| {
                    let r = comm.rank();
                    let send: Vec<f32> = (0..count).map(|i| value(r, i) as f32).collect();
                    let mut gathered = vec![0f32; count * n];
                    comm.allgather(&send, &mut gathered).unwrap();
                    let mut b: Vec<f64> = if r == n - 1 {
                        (0..count).map(|i| value(7, i)).collect()
                    } else {
                        vec![0.0; count]
                    };
                    comm.broadcast(&mut b, n - 1).unwrap();
                    let rs_send: Vec<f32> = (0..count * n).map(|i| value(r, i) as f32).collect();
                    let mut rs = vec![0f32; count];
                    comm.reduce_scatter(&rs_send, &mut rs, ReduceOp::Sum)
                        .unwrap();
                    let mut ints = vec![0i32; 4 * n];
                    comm.allgather(&[r as i32; 4], &mut ints).unwrap();
                    assert!((0..4 * n).all(|i| ints[i] == (i / 4) as i32));
                    (gathered, b, rs)
                },
            );
            let (g0, b0, _) = &results[0];
            // One encoding of values of magnitude up to 3.
            let one = one_encoding(z, 1) + 1e-6;
            for (r, (g, b, rs)) in results.iter().enumerate() {
                assert_eq!(
                    bits(g),
                    bits(g0),
                    "{z} n={n}: rank {r}'s all-gather differs"
                );
                assert!(
                    b.iter().zip(b0).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{z} n={n}: rank {r}'s broadcast differs"
                );
                for (i, x) in g.iter().enumerate() {
                    let exact = value(i / count, i % count);
                    let tol = if n == 1 { 0.0 } else { one };
                    assert!(
                        (f64::from(*x) - exact).abs() <= tol,
                        "{z} n={n} gather [{i}]"
                    );
                }
                for (i, x) in b.iter().enumerate() {
                    let tol = if n == 1 { 0.0 } else { one };
                    assert!((x - value(7, i)).abs() <= tol, "{z} n={n} broadcast [{i}]");
                }
                for (j, x) in rs.iter().enumerate() {
                    let i = r * count + j;
                    let exact: f64 = (0..n).map(|q| value(q, i)).sum();
                    let tol = n.saturating_sub(1) as f64 * one_encoding(z, n) + 1e-5;
                    assert!(
                        (f64::from(*x) - exact).abs() <= tol,
                        "{z} n={n} rank {r} rs [{j}]"
                    );
                }
            }
            // The formats really travelled: int8 all-gathers are lossy on this data.
            if z == Compression::Int8 && n > 1 {
                assert!((0..count).any(|i| f64::from(g0[i]) != value(0, i)));
            }
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

//! Reduction-kernel throughput for `mr-bench --kernels`, measured through the library's public
//! byte-slice API (`mapreduce::reduce`), exactly as the collectives call it.
//!
//! A benchmark, not a check: nothing here decides anything in the library.

use mapreduce::reduce::{narrow, reduce, reduce_widen, widen};
use mapreduce::{DType, ReduceOp};
use std::hint::black_box;
use std::time::Instant;

/// A measured case: name and what one run does to the buffers `(wide, wide2, half)`.
type Case = (&'static str, fn(&mut [u8], &mut [u8], &mut [u8]));

const CASES: [Case; 10] = [
    ("memcpy", |a, b, _| a.copy_from_slice(b)),
    ("f32 sum", |a, b, _| reduce(DType::F32, ReduceOp::Sum, a, b)),
    ("f64 sum", |a, b, _| reduce(DType::F64, ReduceOp::Sum, a, b)),
    ("i32 sum", |a, b, _| reduce(DType::I32, ReduceOp::Sum, a, b)),
    ("bf16 sum (f32 acc)", |a, _, h| {
        reduce_widen(DType::BF16, ReduceOp::Sum, a, h)
    }),
    ("f16 sum (f32 acc)", |a, _, h| {
        reduce_widen(DType::F16, ReduceOp::Sum, a, h)
    }),
    ("bf16 widen", |a, _, h| widen(DType::BF16, a, h)),
    ("f16 widen", |a, _, h| widen(DType::F16, a, h)),
    ("bf16 narrow", |a, _, h| narrow(DType::BF16, h, a)),
    ("f16 narrow", |a, _, h| narrow(DType::F16, h, a)),
];

/// Measures the kernels on buffers of `bytes` bytes (rounded down to a multiple of 16) and
/// returns `(name, GB/s)` pairs, GB = 1e9 bytes.
///
/// One untimed round runs every case (faulting the pages in), then `iters` timed rounds run
/// every case once each, interleaved so that all cases see the same machine conditions; the
/// fastest run of each case counts, as in STREAM, since on a shared machine slower runs
/// measure the neighbours rather than the kernel.
///
/// Bytes counted per run are always `bytes`: the size of the f32/f64/i32 buffer written or,
/// for conversions to half, read. Memory traffic differs per case:
/// * `memcpy`: `copy_from_slice` of `bytes` bytes: 1 read + 1 write stream;
/// * `f32 sum`, `f64 sum`, `i32 sum`: [`reduce`] `dst += src` over two `bytes`-byte buffers:
///   2 read + 1 write streams (3 x `bytes` moved);
/// * `bf16 sum (f32 acc)`, `f16 sum (f32 acc)`: [`reduce_widen`] of `bytes / 2` bytes of
///   half into a `bytes`-byte f32 accumulator (2.5 x `bytes` moved);
/// * `bf16 widen`, `f16 widen`: [`widen`] of `bytes / 2` bytes of half into `bytes` bytes of
///   f32;
/// * `bf16 narrow`, `f16 narrow`: [`narrow`] of `bytes` bytes of f32 into half.
pub fn measure_throughput(bytes: usize, iters: usize) -> Vec<(String, f64)> {
    let bytes = bytes / 16 * 16;
    // u64 backing keeps every view aligned, as buffers from the allocator are.
    let (mut a, mut b, mut h) = (
        vec![0u64; bytes / 8],
        vec![0u64; bytes / 8],
        vec![0u64; bytes / 16],
    );
    let (a, b, h): (&mut [u8], &mut [u8], &mut [u8]) = (
        bytemuck::cast_slice_mut(&mut a),
        bytemuck::cast_slice_mut(&mut b),
        bytemuck::cast_slice_mut(&mut h),
    );
    // Ones everywhere. Whatever the cases leave behind stays far from subnormal (which
    // would slow float kernels down) in every format they read it as.
    fill(a, &1f32.to_ne_bytes());
    fill(b, &1f32.to_ne_bytes());
    fill(h, &0x3f80u16.to_ne_bytes());

    let mut best = [f64::INFINITY; CASES.len()];
    for round in 0..=iters.max(1) {
        for ((_, run), best) in CASES.iter().zip(&mut best) {
            let t = Instant::now();
            run(black_box(&mut *a), black_box(&mut *b), black_box(&mut *h));
            let elapsed = t.elapsed().as_secs_f64();
            if round > 0 {
                *best = best.min(elapsed);
            }
        }
    }
    CASES
        .iter()
        .zip(best)
        .map(|((name, _), t)| (name.to_string(), bytes as f64 / t.max(1e-9) / 1e9))
        .collect()
}

fn fill(buf: &mut [u8], pattern: &[u8]) {
    for c in buf.chunks_exact_mut(pattern.len()) {
        c.copy_from_slice(pattern);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measure_throughput_reports_every_kernel() {
        let got = measure_throughput(64 << 10, 2);
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "memcpy",
            "f32 sum",
            "f64 sum",
            "bf16 sum (f32 acc)",
            "f16 narrow",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(
            got.iter().all(|(_, v)| v.is_finite() && *v > 0.0),
            "{got:?}"
        );
    }
}

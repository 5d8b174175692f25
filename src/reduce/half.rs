//! f16 and bf16: conversions to and from f32, and reducing them into an f32 accumulator.
//!
//! f16/bf16 never reduce in their own type: the widening reductions here convert each element
//! to f32 and combine in f32 (with f32's `Num` ops), and only narrowing rounds, to nearest with
//! ties to even. bf16 is the upper half of an f32, so its conversions are bit operations that
//! the compiler vectorises in `zip_map_best`; f16 uses F16C (eight elements per instruction)
//! when the CPU has it and `half`'s slice conversions otherwise.

use super::kernels::{zip_map_best, Num};
use super::STAGE;
use crate::types::{DType, ReduceOp};
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

/// bf16 bits to f32: bf16 is the upper half of an f32, so this is exact (NaN payloads kept).
#[inline(always)]
fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// f32 to bf16 bits, rounding to nearest with ties to even; NaN stays NaN (quieted, so that
/// truncating the payload cannot turn it into infinity). Branch-free so that it vectorises.
#[inline(always)]
fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    // Adding 0x7fff plus the lowest kept bit carries into the kept half exactly when the
    // dropped half is above one half, or equal to it with the kept half odd. Finite values
    // that round past the largest bf16 carry into the exponent and become infinity, as IEEE
    // rounding requires. Only NaN patterns can wrap, and their sum is discarded.
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    let quiet_nan = b | 0x0040_0000;
    let r = if b & 0x7fff_ffff > 0x7f80_0000 {
        quiet_nan
    } else {
        rounded
    };
    (r >> 16) as u16
}

/// `dst = f32(src)` for bf16 bits.
#[inline(never)]
fn widen_bf16(dst: &mut [f32], src: &[u16]) {
    zip_map_best(dst, src, |_, h| bf16_to_f32(h))
}

/// `dst = bf16(src)`, rounded to nearest even.
#[inline(never)]
fn narrow_bf16(dst: &mut [u16], src: &[f32]) {
    zip_map_best(dst, src, |_, x| f32_to_bf16(x))
}

/// `dst = f32(src)` for f16 bits.
#[inline(never)]
fn widen_f16(dst: &mut [f32], src: &[u16]) {
    #[cfg(target_arch = "x86_64")]
    if f16c::available() {
        // SAFETY: `f16c::widen` only requires AVX2 and F16C, which the CPU has (checked above).
        return unsafe { f16c::widen(dst, src) };
    }
    widen_f16_portable(dst, src)
}

fn widen_f16_portable(dst: &mut [f32], src: &[u16]) {
    src.reinterpret_cast::<f16>().convert_to_f32_slice(dst)
}

/// `dst = f16(src)`, rounded to nearest even.
#[inline(never)]
fn narrow_f16(dst: &mut [u16], src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if f16c::available() {
        // SAFETY: `f16c::narrow` only requires AVX2 and F16C, which the CPU has (checked above).
        return unsafe { f16c::narrow(dst, src) };
    }
    narrow_f16_portable(dst, src)
}

fn narrow_f16_portable(dst: &mut [u16], src: &[f32]) {
    dst.reinterpret_cast_mut::<f16>()
        .convert_from_f32_slice(src)
}

/// `acc = f(acc, f32(src))` for f16 `src` without F16C: widen a block into L1 with `half`
/// (which picks the best conversion the CPU has), then combine.
fn reduce_f16_portable(acc: &mut [f32], src: &[u16], f: impl Fn(f32, f32) -> f32 + Copy) {
    let mut wide = [0f32; STAGE];
    for (a, s) in acc.chunks_mut(STAGE).zip(src.chunks(STAGE)) {
        let w = &mut wide[..s.len()];
        widen_f16_portable(w, s);
        zip_map_best(a, w, f);
    }
}

macro_rules! widening_kernels {
    ($($bf16:ident, $f16:ident: $f:expr;)*) => {$(
        /// `acc = op(acc, f32(src))` for bf16 `src`, widening in registers.
        #[inline(never)]
        fn $bf16(acc: &mut [f32], src: &[u16]) {
            zip_map_best(acc, src, |a, h| $f(a, bf16_to_f32(h)))
        }

        /// `acc = op(acc, f32(src))` for f16 `src`.
        #[inline(never)]
        fn $f16(acc: &mut [f32], src: &[u16]) {
            #[cfg(target_arch = "x86_64")]
            if f16c::available() {
                // SAFETY: `f16c::reduce` only requires AVX2 and F16C, which the CPU has
                // (checked just above).
                return unsafe { f16c::reduce(acc, src, $f) };
            }
            reduce_f16_portable(acc, src, $f)
        }
    )*};
}
widening_kernels! {
    sum_bf16, sum_f16: <f32 as Num>::add;
    prod_bf16, prod_f16: <f32 as Num>::mul;
    max_bf16, max_f16: <f32 as Num>::max;
    min_bf16, min_f16: <f32 as Num>::min;
}

/// F16C conversions, eight elements per instruction, built for AVX2 so the surrounding loops
/// use 32-byte registers too. `half` also uses F16C, but through a call per eight elements that
/// cannot be inlined into code built for the x86-64 baseline.
#[cfg(target_arch = "x86_64")]
mod f16c {
    use std::arch::x86_64::{
        _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_storeu_ps, _mm_loadu_si128,
        _mm_storeu_si128, _MM_FROUND_TO_NEAREST_INT,
    };

    /// Whether the CPU has what every function below requires.
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
    }

    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn widen8(h: &[u16; 8]) -> [f32; 8] {
        let mut f = [0f32; 8];
        // SAFETY: reads the 16 bytes of `h` and writes the 32 bytes of `f`; the unaligned
        // load/store intrinsics accept any alignment; the features are the caller's contract.
        unsafe {
            _mm256_storeu_ps(
                f.as_mut_ptr(),
                _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().cast())),
            )
        };
        f
    }

    /// Rounds to nearest even: the immediate selects the rounding mode, MXCSR is not consulted.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn narrow8(f: &[f32; 8]) -> [u16; 8] {
        let mut h = [0u16; 8];
        // SAFETY: reads the 32 bytes of `f` and writes the 16 bytes of `h`; as in `widen8`.
        unsafe {
            let v = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(f.as_ptr()));
            _mm_storeu_si128(h.as_mut_ptr().cast(), v)
        };
        h
    }

    /// Calls `f` on each pair of 8-element chunks of `dst` and `src` (equal lengths); the last,
    /// partial chunk goes through zero-padded copies.
    #[inline(always)]
    fn by_eight<D: Copy + Default, S: Copy + Default>(
        dst: &mut [D],
        src: &[S],
        mut f: impl FnMut(&mut [D; 8], &[S; 8]),
    ) {
        assert_eq!(dst.len(), src.len());
        let mut d = dst.chunks_exact_mut(8);
        let mut s = src.chunks_exact(8);
        for (dc, sc) in (&mut d).zip(&mut s) {
            f(dc.try_into().unwrap(), sc.try_into().unwrap());
        }
        let (dr, sr) = (d.into_remainder(), s.remainder());
        if !sr.is_empty() {
            let (mut dp, mut sp) = ([D::default(); 8], [S::default(); 8]);
            dp[..dr.len()].copy_from_slice(dr);
            sp[..sr.len()].copy_from_slice(sr);
            f(&mut dp, &sp);
            dr.copy_from_slice(&dp[..dr.len()]);
        }
    }

    /// `dst = f32(src)` for f16 bits.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn widen(dst: &mut [f32], src: &[u16]) {
        // SAFETY: this function's own contract.
        by_eight(dst, src, |d, s| *d = unsafe { widen8(s) })
    }

    /// `dst = f16(src)`, rounded to nearest even.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn narrow(dst: &mut [u16], src: &[f32]) {
        // SAFETY: this function's own contract.
        by_eight(dst, src, |d, s| *d = unsafe { narrow8(s) })
    }

    /// `acc = f(acc, f32(src))` for f16 `src`, widening in registers.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn reduce(acc: &mut [f32], src: &[u16], f: impl Fn(f32, f32) -> f32) {
        by_eight(acc, src, |a, s| {
            // SAFETY: this function's own contract.
            let w = unsafe { widen8(s) };
            for (x, y) in a.iter_mut().zip(w) {
                *x = f(*x, y);
            }
        })
    }
}

/// The conversion to f32 from `dtype` (f16 or bf16); `what` names the caller in the panic.
#[track_caller]
pub(super) fn widen_kernel(what: &str, dtype: DType) -> fn(&mut [f32], &[u16]) {
    match dtype {
        DType::F16 => widen_f16,
        DType::BF16 => widen_bf16,
        _ => panic!("{what}: {dtype} is not a 16-bit float"),
    }
}

/// The conversion from f32 to `dtype` (f16 or bf16); `what` names the caller in the panic.
#[track_caller]
pub(super) fn narrow_kernel(what: &str, dtype: DType) -> fn(&mut [u16], &[f32]) {
    match dtype {
        DType::F16 => narrow_f16,
        DType::BF16 => narrow_bf16,
        _ => panic!("{what}: {dtype} is not a 16-bit float"),
    }
}

/// The kernel computing `acc = op(acc, f32(src))` for `src` in `src_dtype` (f16 or bf16); AVG
/// sums (the division comes at the end). `what` names the caller in the panic.
#[track_caller]
pub(super) fn reduce_widen_kernel(
    what: &str,
    src_dtype: DType,
    op: ReduceOp,
) -> fn(&mut [f32], &[u16]) {
    match (src_dtype, op) {
        (DType::BF16, ReduceOp::Sum | ReduceOp::Avg) => sum_bf16,
        (DType::BF16, ReduceOp::Prod) => prod_bf16,
        (DType::BF16, ReduceOp::Max) => max_bf16,
        (DType::BF16, ReduceOp::Min) => min_bf16,
        (DType::F16, ReduceOp::Sum | ReduceOp::Avg) => sum_f16,
        (DType::F16, ReduceOp::Prod) => prod_f16,
        (DType::F16, ReduceOp::Max) => max_f16,
        (DType::F16, ReduceOp::Min) => min_f16,
        _ => panic!("{what}: {src_dtype} is not a 16-bit float"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reduce::kernels::zip_map;
    use crate::reduce::test_support::*;
    use crate::reduce::{narrow, reduce_widen, widen};
    use half::bf16;

    /// Value of the non-negative f16 with magnitude bits `k`, with the exponent unbounded so
    /// that `0x7c00` (infinity) reads as 2^16, the next step after the largest finite value.
    fn f16_magnitude(k: u16) -> f64 {
        let (exp, mant) = (i32::from(k >> 10), f64::from(k & 0x3ff));
        if exp == 0 {
            mant * 2f64.powi(-24)
        } else {
            (1024.0 + mant) * 2f64.powi(exp - 25)
        }
    }

    /// As [`f16_magnitude`] for bf16: `0x7f80` reads as 2^128.
    fn bf16_magnitude(k: u16) -> f64 {
        let (exp, mant) = (i32::from(k >> 7), f64::from(k & 0x7f));
        if exp == 0 {
            mant * 2f64.powi(-133)
        } else {
            (128.0 + mant) * 2f64.powi(exp - 134)
        }
    }

    struct Format {
        dtype: DType,
        magnitude: fn(u16) -> f64,
        inf: u16,
    }

    const F16: Format = Format {
        dtype: DType::F16,
        magnitude: f16_magnitude,
        inf: 0x7c00,
    };
    const BF16: Format = Format {
        dtype: DType::BF16,
        magnitude: bf16_magnitude,
        inf: 0x7f80,
    };

    impl Format {
        /// Exact value of `h`; `None` for NaN.
        fn decode(&self, h: u16) -> Option<f64> {
            let k = h & 0x7fff;
            let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
            match k.cmp(&self.inf) {
                std::cmp::Ordering::Greater => None,
                std::cmp::Ordering::Equal => Some(sign * f64::INFINITY),
                std::cmp::Ordering::Less => Some(sign * (self.magnitude)(k)),
            }
        }

        /// Nearest value to finite or infinite `x`, ties to the even bit pattern; `None` for NaN.
        fn round(&self, x: f32) -> Option<u16> {
            if x.is_nan() {
                return None;
            }
            let sign = if x.is_sign_negative() { 0x8000 } else { 0 };
            let v = f64::from(x).abs();
            // Largest magnitude not above v, by bisection over the ordered patterns.
            let (mut lo, mut hi) = (0u16, self.inf);
            if v >= (self.magnitude)(self.inf) {
                lo = self.inf;
            } else {
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    if (self.magnitude)(mid) <= v {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
            }
            if lo == self.inf {
                return Some(sign | self.inf);
            }
            let (below, above) = (v - (self.magnitude)(lo), (self.magnitude)(lo + 1) - v);
            let k = if below < above || (below == above && lo % 2 == 0) {
                lo
            } else {
                lo + 1
            };
            Some(sign | k)
        }

        /// f32 inputs that probe rounding: every representable value, the midpoints between
        /// neighbours (ties) and the f32 values just either side of them, both signs, then
        /// random bit patterns (NaN, infinity and f32 subnormals included).
        fn narrowing_probes(&self) -> Vec<f32> {
            let mut out = Vec::new();
            for k in 0..self.inf {
                let (a, b) = ((self.magnitude)(k), (self.magnitude)(k + 1));
                let mid = ((a + b) / 2.0) as f32;
                assert_eq!(
                    f64::from(mid),
                    (a + b) / 2.0,
                    "midpoint must be exact in f32"
                );
                for x in [
                    a as f32,
                    mid,
                    f32::from_bits(mid.to_bits() - 1),
                    f32::from_bits(mid.to_bits() + 1),
                ] {
                    out.extend([x, -x]);
                }
            }
            let mut rng = Rng(99);
            out.extend((0..100_000).map(|_| f32::from_bits(rng.next() as u32)));
            out.extend([
                f32::MAX,
                f32::MIN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
                -f32::NAN,
            ]);
            out
        }
    }

    type Narrow = fn(&mut [u16], &[f32]);
    type Widen = fn(&mut [f32], &[u16]);

    /// Every implementation of each conversion the machine can run, by name.
    fn narrowers(dtype: DType) -> Vec<(&'static str, Narrow)> {
        let mut v: Vec<(&'static str, Narrow)> = vec![("dispatched", narrow_kernel("test", dtype))];
        if dtype == DType::F16 {
            v.push(("half", narrow_f16_portable));
            #[cfg(target_arch = "x86_64")]
            if f16c::available() {
                // SAFETY: AVX2 and F16C are present (checked just above).
                v.push(("f16c", |d, s| unsafe { f16c::narrow(d, s) }));
            }
        } else {
            v.push(("baseline", |d, s| zip_map(d, s, |_, x| f32_to_bf16(x))));
        }
        v
    }

    fn wideners(dtype: DType) -> Vec<(&'static str, Widen)> {
        let mut v: Vec<(&'static str, Widen)> = vec![("dispatched", widen_kernel("test", dtype))];
        if dtype == DType::F16 {
            v.push(("half", widen_f16_portable));
            #[cfg(target_arch = "x86_64")]
            if f16c::available() {
                // SAFETY: AVX2 and F16C are present (checked just above).
                v.push(("f16c", |d, s| unsafe { f16c::widen(d, s) }));
            }
        } else {
            v.push(("baseline", |d, s| zip_map(d, s, |_, h| bf16_to_f32(h))));
        }
        v
    }

    fn check_widen_exhaustive(format: &Format) {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        for (name, widen) in wideners(format.dtype) {
            let mut out = vec![0f32; all.len()];
            widen(&mut out, &all);
            for (&h, &x) in all.iter().zip(&out) {
                match format.decode(h) {
                    Some(want) => {
                        assert_eq!(f64::from(x), want, "{} {name}: {h:#06x}", format.dtype)
                    }
                    None => assert!(x.is_nan(), "{} {name}: {h:#06x} gave {x}", format.dtype),
                }
            }
        }
    }

    #[test]
    fn widen_is_exact_for_every_bit_pattern() {
        check_widen_exhaustive(&F16);
        check_widen_exhaustive(&BF16);
        // bf16 is the upper half of an f32: even NaN payloads carry over.
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let mut out = vec![0u8; 4 * all.len()];
        widen(DType::BF16, &mut out, &halves(&all));
        for (h, x) in all.iter().zip(f32::decode(&out)) {
            assert_eq!(x.to_bits(), u32::from(*h) << 16);
        }
    }

    fn check_narrow(format: &Format) {
        let probes = format.narrowing_probes();
        for (name, narrow) in narrowers(format.dtype) {
            let mut out = vec![0u16; probes.len()];
            narrow(&mut out, &probes);
            for (&x, &h) in probes.iter().zip(&out) {
                match format.round(x) {
                    Some(want) => assert_eq!(
                        h,
                        want,
                        "{} {name}: {x:e} ({:#010x}) gave {h:#06x}, want {want:#06x}",
                        format.dtype,
                        x.to_bits()
                    ),
                    None => assert!(
                        format.decode(h).is_none(),
                        "{} {name}: NaN {:#010x} gave {h:#06x}",
                        format.dtype,
                        x.to_bits()
                    ),
                }
            }
        }
    }

    #[test]
    fn narrow_rounds_to_nearest_even() {
        check_narrow(&F16);
        check_narrow(&BF16);
    }

    #[test]
    fn narrow_breaks_ties_to_even() {
        let cases: [(DType, f32, u16); 10] = [
            (DType::BF16, 1.0 + 2f32.powi(-8), 0x3f80), // halfway 1 and 1+2^-7: down to even
            (DType::BF16, 1.0 + 3.0 * 2f32.powi(-8), 0x3f82), // halfway odd and even: up
            (DType::BF16, -(1.0 + 2f32.powi(-8)), 0xbf80),
            (DType::BF16, f32::MAX, 0x7f80), // beyond the largest bf16's half step
            (DType::F16, 1.0 + 2f32.powi(-11), 0x3c00),
            (DType::F16, 1.0 + 3.0 * 2f32.powi(-11), 0x3c02),
            (DType::F16, 2049.0, 0x6800),  // 2048 (spacing 2 here)
            (DType::F16, 2051.0, 0x6802),  // 2052
            (DType::F16, 65520.0, 0x7c00), // halfway 65504 (odd) and 2^16: infinity
            (DType::F16, 65519.0, 0x7bff), // 65504
        ];
        for (dtype, x, want) in cases {
            let mut out = [0u8; 2];
            narrow(dtype, &mut out, &x.to_ne_bytes());
            assert_eq!(u16::from_ne_bytes(out), want, "{dtype} {x}");
        }
    }

    #[test]
    fn widen_then_narrow_round_trips_every_bit_pattern() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        for format in [&F16, &BF16] {
            let mut wide = vec![0u8; 4 * all.len()];
            let mut back = vec![0u8; 2 * all.len()];
            widen(format.dtype, &mut wide, &halves(&all));
            narrow(format.dtype, &mut back, &wide);
            for (&h, r) in all.iter().zip(unhalves(&back)) {
                if format.decode(h).is_some() {
                    assert_eq!(r, h, "{}", format.dtype);
                } else {
                    assert!(
                        format.decode(r).is_none(),
                        "{} NaN {h:#06x} became {r:#06x}",
                        format.dtype
                    );
                }
            }
        }
    }

    /// Scalar conversions from `half` as the reference for the byte-slice paths.
    fn half_to_f32(dtype: DType, h: u16) -> f32 {
        match dtype {
            DType::F16 => f16::from_bits(h).to_f32(),
            _ => bf16::from_bits(h).to_f32(),
        }
    }

    fn f32_to_half(dtype: DType, x: f32) -> u16 {
        match dtype {
            DType::F16 => f16::from_f32(x).to_bits(),
            _ => bf16::from_f32(x).to_bits(),
        }
    }

    #[test]
    fn half_paths_handle_every_length_and_offset() {
        let mut rng = Rng(21);
        for format in [&F16, &BF16] {
            let dtype = format.dtype;
            for len in lengths(16) {
                for wide_off in 0..4 {
                    for half_off in 0..2 {
                        // Integer values: exactly representable in both formats and in sums.
                        let ints: Vec<f32> =
                            (0..len).map(|_| rng.below(81) as f32 - 40.0).collect();
                        let mut hs: Vec<u16> =
                            ints.iter().map(|&x| f32_to_half(dtype, x)).collect();
                        if len > 3 {
                            hs[len / 2] = f32_to_half(dtype, f32::NAN);
                        }
                        let acc0: Vec<f32> =
                            (0..len).map(|_| rng.below(81) as f32 - 40.0).collect();
                        let src = Buf::new(&halves(&hs), half_off);
                        let ctx = format!("{dtype}, {len} elements, offsets {wide_off}/{half_off}");

                        let mut wide = Buf::zeroed(4 * len, wide_off);
                        widen(dtype, wide.bytes_mut(), src.bytes());
                        let want: Vec<f32> = hs.iter().map(|&h| half_to_f32(dtype, h)).collect();
                        assert!(
                            f32::decode(wide.bytes())
                                .iter()
                                .zip(&want)
                                .all(|(&a, &b)| f32::same(a, b)),
                            "widen {ctx}"
                        );
                        wide.assert_guards_intact();

                        for op in ReduceOp::ALL {
                            let mut acc = Buf::new(&f32::encode(&acc0), wide_off);
                            reduce_widen(dtype, op, acc.bytes_mut(), src.bytes());
                            let got = f32::decode(acc.bytes());
                            for i in 0..len {
                                let want = f32::reference(op, acc0[i], half_to_f32(dtype, hs[i]));
                                assert!(
                                    f32::same(got[i], want),
                                    "reduce_widen {op} {ctx} element {i}: {} gave {}, want {want}",
                                    acc0[i],
                                    got[i]
                                );
                            }
                            acc.assert_guards_intact();
                        }

                        let mut back = Buf::zeroed(2 * len, half_off);
                        let source = Buf::new(&f32::encode(&acc0), wide_off);
                        narrow(dtype, back.bytes_mut(), source.bytes());
                        let want: Vec<u16> = acc0.iter().map(|&x| f32_to_half(dtype, x)).collect();
                        assert_eq!(unhalves(back.bytes()), want, "narrow {ctx}");
                        back.assert_guards_intact();
                        src.assert_guards_intact();
                    }
                }
            }
        }
    }

    #[test]
    fn f16_reduce_without_f16c_agrees() {
        let mut rng = Rng(33);
        let hs: Vec<u16> = (0..1500).map(|_| rng.next() as u16).collect();
        let acc0: Vec<f32> = (0..1500).map(|_| rng.below(1000) as f32 - 500.0).collect();
        for (op, f) in [
            (ReduceOp::Sum, <f32 as Num>::add as fn(f32, f32) -> f32),
            (ReduceOp::Prod, <f32 as Num>::mul),
            (ReduceOp::Max, <f32 as Num>::max),
            (ReduceOp::Min, <f32 as Num>::min),
        ] {
            let mut fast = f32::encode(&acc0);
            reduce_widen(DType::F16, op, &mut fast, &halves(&hs));
            let mut portable = acc0.clone();
            reduce_f16_portable(&mut portable, &hs, f);
            let fast = f32::decode(&fast);
            assert!(
                fast.iter().zip(&portable).all(|(&a, &b)| f32::same(a, b)),
                "{op}"
            );
        }
    }
}

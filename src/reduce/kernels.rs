//! Element-wise kernels over typed slices for the types that reduce in their own type, and
//! the loop every kernel in `reduce` is built from.
//!
//! How the kernels are built:
//! * Every kernel is a safe, `#[inline(never)]` function over typed slices written as a plain
//!   loop (`zip_map`: over `chunks_exact`, one 64-byte line per step, plus the remainder); the
//!   compiler vectorises it because `&mut [T]` and `&[T]` cannot alias. Checked with
//!   `objdump -d` on the release rlib: `sum::<f32>` runs `addps` on 16-byte registers (the
//!   x86-64 baseline) and its AVX2 build `vaddps` on 32-byte registers; the other ops and
//!   types, and the bf16 conversions, are packed too.
//! * On x86-64 each kernel also has an AVX2 build of the same loop (`zip_map_best`), chosen at
//!   run time; the library itself stays runnable on any x86-64.
//!
//! Kernels see typed slices only: byte slices, their alignment and lengths are the caller's
//! (`reduce`'s entry points) business.

use crate::types::ReduceOp;
use bytemuck::Pod;
use std::mem::size_of;

/// `dst[i] = f(dst[i], src[i])` over equal-length slices.
///
/// Same-width element types go one 64-byte line per step (`chunks_exact`) and then the
/// remainder, which the compiler turns into whole vector registers. Conversions between widths
/// use a plain zipped loop: given line-sized chunks there, the compiler vectorised across chunks
/// with strided scalar loads and bf16 narrowing ran about 3x slower.
#[inline(always)]
pub(super) fn zip_map<D: Copy, S: Copy>(dst: &mut [D], src: &[S], f: impl Fn(D, S) -> D) {
    debug_assert_eq!(dst.len(), src.len());
    if size_of::<D>() != size_of::<S>() {
        for (x, y) in dst.iter_mut().zip(src) {
            *x = f(*x, *y);
        }
        return;
    }
    let lanes = 64 / size_of::<D>();
    let mut d = dst.chunks_exact_mut(lanes);
    let mut s = src.chunks_exact(lanes);
    for (dc, sc) in (&mut d).zip(&mut s) {
        for (x, y) in dc.iter_mut().zip(sc) {
            *x = f(*x, *y);
        }
    }
    for (x, y) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *x = f(*x, *y);
    }
}

/// [`zip_map`] compiled for AVX2 (32-byte registers instead of the baseline's 16).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn zip_map_avx2<D: Copy, S: Copy>(dst: &mut [D], src: &[S], f: impl Fn(D, S) -> D) {
    zip_map(dst, src, f)
}

/// [`zip_map`] in the widest build the CPU runs.
#[inline(always)]
pub(super) fn zip_map_best<D: Copy, S: Copy>(dst: &mut [D], src: &[S], f: impl Fn(D, S) -> D) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: `zip_map_avx2` only requires AVX2, which the CPU has (checked just above).
        return unsafe { zip_map_avx2(dst, src, f) };
    }
    zip_map(dst, src, f)
}

/// Element types that reduce in their own type.
pub(super) trait Num: Pod {
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn max(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    /// `self / n`, truncating toward zero for integers.
    fn div_n(self, n: usize) -> Self;
}

macro_rules! int_num {
    ($($t:ty),*) => {$(
        impl Num for $t {
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                self.wrapping_add(o)
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                self.wrapping_mul(o)
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                if o > self { o } else { self }
            }
            #[inline(always)]
            fn min(self, o: Self) -> Self {
                if o < self { o } else { self }
            }
            #[inline(always)]
            fn div_n(self, n: usize) -> Self {
                // In a wider type so that `n` beyond the element's range (256 ranks averaging
                // int8) divides exactly instead of wrapping; the quotient's magnitude is at most
                // `self`'s, so narrowing it back is exact.
                match i64::try_from(n) {
                    Ok(n) => (self as i64 / n) as $t,
                    Err(_) => (self as i128 / n as i128) as $t,
                }
            }
        }
    )*};
}
int_num!(i8, u8, i32, i64);

macro_rules! float_num {
    ($($t:ty),*) => {$(
        impl Num for $t {
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                self + o
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                self * o
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                if self.is_nan() || o.is_nan() { <$t>::NAN } else if o > self { o } else { self }
            }
            #[inline(always)]
            fn min(self, o: Self) -> Self {
                if self.is_nan() || o.is_nan() { <$t>::NAN } else if o < self { o } else { self }
            }
            #[inline(always)]
            fn div_n(self, n: usize) -> Self {
                self / (n as $t)
            }
        }
    )*};
}
float_num!(f32, f64);

/// `dst += src` (wrapping for integers).
///
/// Release build for f32, read with `objdump -d`: four `addps` (16-byte registers) per 64-byte
/// step, and `vaddps` on 32-byte registers in its AVX2 build.
#[inline(never)]
fn sum<T: Num>(dst: &mut [T], src: &[T]) {
    zip_map_best(dst, src, T::add)
}

/// `dst *= src` (wrapping for integers).
#[inline(never)]
fn prod<T: Num>(dst: &mut [T], src: &[T]) {
    zip_map_best(dst, src, T::mul)
}

/// `dst = max(dst, src)`, NaN-propagating for floats.
#[inline(never)]
fn max<T: Num>(dst: &mut [T], src: &[T]) {
    zip_map_best(dst, src, T::max)
}

/// `dst = min(dst, src)`, NaN-propagating for floats.
#[inline(never)]
fn min<T: Num>(dst: &mut [T], src: &[T]) {
    zip_map_best(dst, src, T::min)
}

/// The kernel computing `dst = op(dst, src)`; AVG sums (the division comes at the end).
pub(super) fn kernel_for<T: Num>(op: ReduceOp) -> fn(&mut [T], &[T]) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => sum::<T>,
        ReduceOp::Prod => prod::<T>,
        ReduceOp::Max => max::<T>,
        ReduceOp::Min => min::<T>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reduce::test_support::*;

    /// The reference matrix in `reduce`'s tests runs whatever build the test machine picks (AVX2
    /// on most); this runs the baseline build of the same loops on the same data and requires identical bits.
    fn check_baseline_build_agrees<T: Num + Elem>(seed: u64) {
        let mut rng = Rng(seed);
        let a: Vec<T> = (0..1000).map(|_| T::random(&mut rng)).collect();
        let b: Vec<T> = (0..1000).map(|_| T::random(&mut rng)).collect();
        type Combine<T> = fn(T, T) -> T;
        let baselines: [(ReduceOp, Combine<T>); 4] = [
            (ReduceOp::Sum, T::add),
            (ReduceOp::Prod, T::mul),
            (ReduceOp::Max, T::max),
            (ReduceOp::Min, T::min),
        ];
        for (op, f) in baselines {
            let (mut fast, mut base) = (a.clone(), a.clone());
            kernel_for::<T>(op)(&mut fast, &b);
            zip_map(&mut base, &b, f);
            assert_eq!(T::encode(&fast), T::encode(&base), "{} {op}", T::DTYPE);
        }
    }

    #[test]
    fn baseline_and_dispatched_builds_agree() {
        check_baseline_build_agrees::<f32>(7);
        check_baseline_build_agrees::<f64>(8);
        check_baseline_build_agrees::<i8>(9);
        check_baseline_build_agrees::<u8>(10);
        check_baseline_build_agrees::<i32>(11);
        check_baseline_build_agrees::<i64>(12);
    }
}

//! Element-wise reduction kernels over byte slices, per dtype and op.
//!
//! The byte-slice entry points ([`reduce`], [`reduce_widen`], [`widen`], [`narrow`], [`divide`])
//! check lengths, dispatch on dtype and op, and never allocate. Buffers hold elements in the
//! machine's native layout (what the caller's tensors hold); they may start at any byte offset.
//! f16/bf16 never reduce in their own type: partials accumulate in f32 ([`reduce_widen`],
//! [`widen`]) and are rounded once at the end ([`narrow`]).
//!
//! Semantics shared by every path (so ring, recursive doubling and relays agree bit for bit):
//! * integer SUM/PROD wrap; integer AVG truncates toward zero;
//! * float MAX/MIN propagate NaN (like `torch.maximum`); between equal values (`-0.0` and
//!   `0.0`) the left operand wins;
//! * `dst = op(dst, src)`: `dst` is the left operand;
//! * f32 -> f16/bf16 rounds to nearest, ties to even; NaN stays NaN.
//!
//! How the kernels are built:
//! * Every kernel is a safe, `#[inline(never)]` function over typed slices written as a plain
//!   loop (`zip_map`: over `chunks_exact`, one 64-byte line per step, plus the remainder); the
//!   compiler vectorises it because `&mut [T]` and `&[T]` cannot alias. Checked with
//!   `objdump -d` on the release rlib: `sum::<f32>` runs `addps` on 16-byte registers (the
//!   x86-64 baseline) and its AVX2 build `vaddps` on 32-byte registers; the other ops and
//!   types, and the bf16 conversions, are packed too.
//! * On x86-64 each kernel also has an AVX2 build of the same loop (`zip_map_best`), chosen at
//!   run time; the library itself stays runnable on any x86-64. f16 conversions use F16C when
//!   the CPU has it and fall back to `half`'s slice conversions otherwise.
//! * Byte slices are viewed as typed slices when aligned (the common case: buffers come from
//!   the allocator and segments start at element multiples). Otherwise blocks are copied
//!   through aligned stack buffers (`on_bytes`), so unaligned input costs two extra copies of
//!   L1-resident data rather than a slow scalar loop.

use crate::types::{DType, ReduceOp};
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use std::mem::size_of;

/// Plain-old-data element types that byte slices are viewed as.
///
/// # Safety
/// Implementors must be primitive types without padding for which every bit pattern is a valid
/// value, so that any bytes may be viewed as `Self` and any `Self` as bytes.
unsafe trait Pod: Copy + Default + 'static {}

// SAFETY: primitive integers and floats: no padding, every bit pattern valid.
unsafe impl Pod for i8 {}
// SAFETY: as above.
unsafe impl Pod for u8 {}
// SAFETY: as above.
unsafe impl Pod for u16 {}
// SAFETY: as above.
unsafe impl Pod for i32 {}
// SAFETY: as above.
unsafe impl Pod for i64 {}
// SAFETY: as above.
unsafe impl Pod for u64 {}
// SAFETY: as above.
unsafe impl Pod for f32 {}
// SAFETY: as above.
unsafe impl Pod for f64 {}

/// `b` viewed as `T`s, if it is aligned for `T` and a whole number of elements long.
fn typed<T: Pod>(b: &[u8]) -> Option<&[T]> {
    // SAFETY: `T: Pod`, so every bit pattern of the aligned middle part is a valid `T`.
    let (pre, mid, post) = unsafe { b.align_to::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

/// `b` viewed as `T`s, if it is aligned for `T` and a whole number of elements long.
fn typed_mut<T: Pod>(b: &mut [u8]) -> Option<&mut [T]> {
    // SAFETY: `T: Pod`, so every bit pattern of the middle part is a valid `T` and every `T`
    // written through it is valid bytes.
    let (pre, mid, post) = unsafe { b.align_to_mut::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

/// The bytes of `x`.
fn bytes_of<T: Pod>(x: &[T]) -> &[u8] {
    // SAFETY: `T: Pod` has no padding, so all `size_of_val(x)` bytes are initialised; u8 has
    // alignment 1.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), std::mem::size_of_val(x)) }
}

/// The bytes of `x`, writable.
fn bytes_of_mut<T: Pod>(x: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `bytes_of`; any bytes written are a valid `T` because `T: Pod`.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), std::mem::size_of_val(x)) }
}

/// Elements per block when unaligned data is staged through the stack (8 KiB for two f64
/// blocks; small enough for any thread stack, large enough to amortise the dispatch).
const STAGE: usize = 512;

/// Runs `kernel` on `dst` and `src` viewed as element slices of equal length (the callers
/// check). Aligned slices are passed through whole; otherwise blocks of [`STAGE`] elements are
/// copied through aligned stack buffers and the results copied back. `dst_is_input` says whether
/// the kernel reads `dst` (false for pure conversions, which saves a copy).
#[inline(always)]
fn on_bytes<D: Pod, S: Pod>(
    dst: &mut [u8],
    src: &[u8],
    dst_is_input: bool,
    mut kernel: impl FnMut(&mut [D], &[S]),
) {
    if let (Some(d), Some(s)) = (typed_mut::<D>(dst), typed::<S>(src)) {
        return kernel(d, s);
    }
    let mut dbuf = [D::default(); STAGE];
    let mut sbuf = [S::default(); STAGE];
    for (dc, sc) in dst
        .chunks_mut(STAGE * size_of::<D>())
        .zip(src.chunks(STAGE * size_of::<S>()))
    {
        let n = dc.len() / size_of::<D>();
        let (d, s) = (&mut dbuf[..n], &mut sbuf[..n]);
        bytes_of_mut(s).copy_from_slice(sc);
        if dst_is_input {
            bytes_of_mut(d).copy_from_slice(dc);
        }
        kernel(d, s);
        dc.copy_from_slice(bytes_of(d));
    }
}

/// `dst[i] = f(dst[i], src[i])` over equal-length slices.
///
/// Same-width element types go one 64-byte line per step (`chunks_exact`) and then the
/// remainder, which the compiler turns into whole vector registers. Conversions between widths
/// use a plain zipped loop: given line-sized chunks there, the compiler vectorised across chunks
/// with strided scalar loads and bf16 narrowing ran about 3x slower.
#[inline(always)]
fn zip_map<D: Copy, S: Copy>(dst: &mut [D], src: &[S], f: impl Fn(D, S) -> D) {
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
fn zip_map_best<D: Copy, S: Copy>(dst: &mut [D], src: &[S], f: impl Fn(D, S) -> D) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: `zip_map_avx2` only requires AVX2, which the CPU has (checked just above).
        return unsafe { zip_map_avx2(dst, src, f) };
    }
    zip_map(dst, src, f)
}

/// Element types that reduce in their own type.
trait Num: Pod {
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
fn kernel_for<T: Num>(op: ReduceOp) -> fn(&mut [T], &[T]) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => sum::<T>,
        ReduceOp::Prod => prod::<T>,
        ReduceOp::Max => max::<T>,
        ReduceOp::Min => min::<T>,
    }
}

fn reduce_t<T: Num>(op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    on_bytes(dst, src, true, kernel_for::<T>(op));
}

#[track_caller]
fn check(what: &str, dst_len: usize, dst_size: usize, src_len: usize, src_size: usize) {
    assert!(
        dst_len % dst_size == 0 && src_len % src_size == 0 && dst_len / dst_size == src_len / src_size,
        "{what}: mismatched slices ({dst_len} bytes of {dst_size}-byte elements vs {src_len} bytes of {src_size}-byte elements)"
    );
}

/// `dst = op(dst, src)` element-wise; both in `dtype` layout, `dst.len()` and `src.len()` in
/// bytes. AVG acts as SUM here (divide at the end with [`divide`]).
///
/// # Panics
/// If `dtype` is f16/bf16 (they accumulate in f32: use [`reduce_widen`]), or the slices are not
/// the same whole number of elements.
pub fn reduce(dtype: DType, op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    check("reduce", dst.len(), dtype.size(), src.len(), dtype.size());
    match dtype {
        DType::F32 => reduce_t::<f32>(op, dst, src),
        DType::F64 => reduce_t::<f64>(op, dst, src),
        DType::I8 => reduce_t::<i8>(op, dst, src),
        DType::U8 => reduce_t::<u8>(op, dst, src),
        DType::I32 => reduce_t::<i32>(op, dst, src),
        DType::I64 => reduce_t::<i64>(op, dst, src),
        DType::F16 | DType::BF16 => panic!("reduce: {dtype} accumulates in f32; use reduce_widen"),
    }
}

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

#[track_caller]
fn widen_kernel(what: &str, dtype: DType) -> fn(&mut [f32], &[u16]) {
    match dtype {
        DType::F16 => widen_f16,
        DType::BF16 => widen_bf16,
        _ => panic!("{what}: {dtype} is not a 16-bit float"),
    }
}

#[track_caller]
fn narrow_kernel(what: &str, dtype: DType) -> fn(&mut [u16], &[f32]) {
    match dtype {
        DType::F16 => narrow_f16,
        DType::BF16 => narrow_bf16,
        _ => panic!("{what}: {dtype} is not a 16-bit float"),
    }
}

/// `acc = op(acc, f32(src))` element-wise: `acc` holds f32, `src` holds f16 or bf16
/// (`src_dtype`); lengths in bytes. AVG acts as SUM.
///
/// # Panics
/// If `src_dtype` is not f16/bf16 or the slices hold different numbers of elements.
pub fn reduce_widen(src_dtype: DType, op: ReduceOp, acc: &mut [u8], src: &[u8]) {
    let kernel: fn(&mut [f32], &[u16]) = match (src_dtype, op) {
        (DType::BF16, ReduceOp::Sum | ReduceOp::Avg) => sum_bf16,
        (DType::BF16, ReduceOp::Prod) => prod_bf16,
        (DType::BF16, ReduceOp::Max) => max_bf16,
        (DType::BF16, ReduceOp::Min) => min_bf16,
        (DType::F16, ReduceOp::Sum | ReduceOp::Avg) => sum_f16,
        (DType::F16, ReduceOp::Prod) => prod_f16,
        (DType::F16, ReduceOp::Max) => max_f16,
        (DType::F16, ReduceOp::Min) => min_f16,
        _ => panic!("reduce_widen: {src_dtype} is not a 16-bit float"),
    };
    check("reduce_widen", acc.len(), 4, src.len(), 2);
    on_bytes(acc, src, true, kernel);
}

/// `dst = f32(src)`: `dst` holds f32, `src` holds f16 or bf16 (`src_dtype`); lengths in bytes.
///
/// # Panics
/// If `src_dtype` is not f16/bf16 or the slices hold different numbers of elements.
pub fn widen(src_dtype: DType, dst: &mut [u8], src: &[u8]) {
    let kernel = widen_kernel("widen", src_dtype);
    check("widen", dst.len(), 4, src.len(), 2);
    on_bytes(dst, src, false, kernel);
}

/// `dst = round(acc)`: `acc` holds f32, `dst` receives f16 or bf16 (`dst_dtype`), rounded to
/// nearest even; lengths in bytes. Values beyond the range become infinity; NaN stays NaN.
///
/// # Panics
/// If `dst_dtype` is not f16/bf16 or the slices hold different numbers of elements.
pub fn narrow(dst_dtype: DType, dst: &mut [u8], acc: &[u8]) {
    let kernel = narrow_kernel("narrow", dst_dtype);
    check("narrow", dst.len(), 2, acc.len(), 4);
    on_bytes(dst, acc, false, kernel);
}

fn divide_t<T: Num>(buf: &mut [u8], n: usize) {
    let divide = |x: &mut [T]| x.iter_mut().for_each(|v| *v = v.div_n(n));
    match typed_mut::<T>(buf) {
        Some(x) => divide(x),
        None => {
            let mut stage = [T::default(); STAGE];
            for chunk in buf.chunks_mut(STAGE * size_of::<T>()) {
                let x = &mut stage[..chunk.len() / size_of::<T>()];
                bytes_of_mut(x).copy_from_slice(chunk);
                divide(x);
                chunk.copy_from_slice(bytes_of(x));
            }
        }
    }
}

/// Finish an AVG: `buf /= n` element-wise, `buf` in `dtype` layout (an accumulator dtype: not
/// f16/bf16). Integers truncate toward zero.
///
/// # Panics
/// If `n` is 0, `dtype` is f16/bf16, or `buf` is not a whole number of elements.
pub fn divide(dtype: DType, buf: &mut [u8], n: usize) {
    assert!(n > 0, "divide: zero contributors");
    assert!(
        buf.len() % dtype.size() == 0,
        "divide: {} bytes is not a whole number of {dtype} elements",
        buf.len()
    );
    match dtype {
        DType::F32 => divide_t::<f32>(buf, n),
        DType::F64 => divide_t::<f64>(buf, n),
        DType::I8 => divide_t::<i8>(buf, n),
        DType::U8 => divide_t::<u8>(buf, n),
        DType::I32 => divide_t::<i32>(buf, n),
        DType::I64 => divide_t::<i64>(buf, n),
        DType::F16 | DType::BF16 => panic!("divide: {dtype} is finished in f32"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;
    use proptest::prelude::*;
    use std::fmt::Debug;

    /// splitmix64: deterministic values without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const SENTINEL: u8 = 0xa5;

    /// `len` bytes starting `offset` bytes past a 64-byte boundary, surrounded by sentinel bytes
    /// that must survive every kernel.
    struct Buf {
        raw: Vec<u8>,
        start: usize,
        len: usize,
    }

    impl Buf {
        fn new(bytes: &[u8], offset: usize) -> Buf {
            let mut raw = vec![SENTINEL; bytes.len() + 128 + offset];
            let start = raw.as_ptr().align_offset(64) + offset;
            raw[start..start + bytes.len()].copy_from_slice(bytes);
            Buf {
                raw,
                start,
                len: bytes.len(),
            }
        }
        fn zeroed(len: usize, offset: usize) -> Buf {
            Buf::new(&vec![0; len], offset)
        }
        fn bytes(&self) -> &[u8] {
            &self.raw[self.start..self.start + self.len]
        }
        fn bytes_mut(&mut self) -> &mut [u8] {
            &mut self.raw[self.start..self.start + self.len]
        }
        #[track_caller]
        fn assert_guards_intact(&self) {
            let outside = self.raw[..self.start]
                .iter()
                .chain(&self.raw[self.start + self.len..]);
            assert!(
                outside.into_iter().all(|&b| b == SENTINEL),
                "a kernel wrote outside its slice"
            );
        }
    }

    /// An element type as the reference model sees it: the documented semantics, computed in a
    /// wider type, with no code shared with the kernels.
    trait Elem: Copy + Debug + PartialEq {
        const DTYPE: DType;
        fn random(rng: &mut Rng) -> Self;
        fn reference(op: ReduceOp, a: Self, b: Self) -> Self;
        fn encode(xs: &[Self]) -> Vec<u8>;
        fn decode(b: &[u8]) -> Vec<Self>;
        /// Equal, counting every NaN as equal to every NaN.
        fn same(a: Self, b: Self) -> bool;
    }

    macro_rules! int_elem {
        ($($t:ty => $d:expr),*) => {$(
            impl Elem for $t {
                const DTYPE: DType = $d;
                fn random(rng: &mut Rng) -> Self {
                    // Extremes often, so that SUM and PROD wrap.
                    match rng.below(8) {
                        0 => <$t>::MAX,
                        1 => <$t>::MIN,
                        2 => 0,
                        _ => rng.next() as $t,
                    }
                }
                fn reference(op: ReduceOp, a: Self, b: Self) -> Self {
                    let (x, y) = (a as i128, b as i128);
                    // Truncating an i128 keeps the low bits: two's-complement wrapping.
                    (match op {
                        ReduceOp::Sum | ReduceOp::Avg => x + y,
                        ReduceOp::Prod => x * y,
                        ReduceOp::Max => x.max(y),
                        ReduceOp::Min => x.min(y),
                    }) as $t
                }
                fn encode(xs: &[Self]) -> Vec<u8> {
                    xs.iter().flat_map(|x| x.to_ne_bytes()).collect()
                }
                fn decode(b: &[u8]) -> Vec<Self> {
                    b.chunks_exact(size_of::<$t>()).map(|c| <$t>::from_ne_bytes(c.try_into().unwrap())).collect()
                }
                fn same(a: Self, b: Self) -> bool {
                    a == b
                }
            }
        )*};
    }
    int_elem!(i8 => DType::I8, u8 => DType::U8, i32 => DType::I32, i64 => DType::I64);

    macro_rules! float_elem {
        ($($t:ty => $d:expr),*) => {$(
            impl Elem for $t {
                const DTYPE: DType = $d;
                fn random(rng: &mut Rng) -> Self {
                    // Integer values so that every result is exact; NaN, infinity and -0.0 now
                    // and then.
                    match rng.below(16) {
                        0 => <$t>::NAN,
                        1 => <$t>::INFINITY,
                        2 => -0.0,
                        _ => rng.below(81) as $t - 40.0,
                    }
                }
                fn reference(op: ReduceOp, a: Self, b: Self) -> Self {
                    let (x, y) = (a as f64, b as f64);
                    (match op {
                        ReduceOp::Sum | ReduceOp::Avg => x + y,
                        ReduceOp::Prod => x * y,
                        _ if x.is_nan() || y.is_nan() => f64::NAN,
                        // The left operand wins unless the right one is strictly beyond it.
                        ReduceOp::Max => if y > x { y } else { x },
                        ReduceOp::Min => if y < x { y } else { x },
                    }) as $t
                }
                fn encode(xs: &[Self]) -> Vec<u8> {
                    xs.iter().flat_map(|x| x.to_ne_bytes()).collect()
                }
                fn decode(b: &[u8]) -> Vec<Self> {
                    b.chunks_exact(size_of::<$t>()).map(|c| <$t>::from_ne_bytes(c.try_into().unwrap())).collect()
                }
                fn same(a: Self, b: Self) -> bool {
                    (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
                }
            }
        )*};
    }
    float_elem!(f32 => DType::F32, f64 => DType::F64);

    /// Element counts that cover empty, every remainder of a 64-byte step (`lanes` elements), and
    /// several staging blocks with a partial last one.
    fn lengths(lanes: usize) -> impl Iterator<Item = usize> {
        (0..=3 * lanes + 1).chain([STAGE - 1, STAGE, 2 * STAGE + lanes + 3])
    }

    fn check_against_reference<T: Elem>(seed: u64) {
        let size = T::DTYPE.size();
        let mut rng = Rng(seed);
        for op in ReduceOp::ALL {
            for len in lengths(64 / size) {
                for dst_off in 0..size {
                    for src_off in 0..size {
                        let a: Vec<T> = (0..len).map(|_| T::random(&mut rng)).collect();
                        let b: Vec<T> = (0..len).map(|_| T::random(&mut rng)).collect();
                        let mut dst = Buf::new(&T::encode(&a), dst_off);
                        let src = Buf::new(&T::encode(&b), src_off);
                        reduce(T::DTYPE, op, dst.bytes_mut(), src.bytes());
                        let got = T::decode(dst.bytes());
                        for i in 0..len {
                            let want = T::reference(op, a[i], b[i]);
                            assert!(
                                T::same(got[i], want),
                                "{} {op}, {len} elements, dst/src byte offsets {dst_off}/{src_off}, \
                                 element {i}: {:?} op {:?} gave {:?}, want {want:?}",
                                T::DTYPE,
                                a[i],
                                b[i],
                                got[i]
                            );
                        }
                        assert_eq!(src.bytes(), T::encode(&b), "src was modified");
                        dst.assert_guards_intact();
                        src.assert_guards_intact();
                    }
                }
            }
        }
    }

    #[test]
    fn reduce_matches_reference_for_every_dtype_op_length_and_offset() {
        check_against_reference::<f32>(1);
        check_against_reference::<f64>(2);
        check_against_reference::<i8>(3);
        check_against_reference::<u8>(4);
        check_against_reference::<i32>(5);
        check_against_reference::<i64>(6);
    }

    /// The matrix above runs whatever build the test machine picks (AVX2 on most); this runs
    /// the baseline build of the same loops on the same data and requires identical bits.
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

    #[test]
    fn float_max_and_min_propagate_nan_from_either_side() {
        for op in [ReduceOp::Max, ReduceOp::Min] {
            let mut dst = f32::encode(&[f32::NAN, 1.0, f32::NAN, 2.0]);
            reduce(
                DType::F32,
                op,
                &mut dst,
                &f32::encode(&[1.0, f32::NAN, f32::NAN, 3.0]),
            );
            let got = f32::decode(&dst);
            assert!(got[..3].iter().all(|x| x.is_nan()), "{op}: {got:?}");
            assert_eq!(got[3], if op == ReduceOp::Max { 3.0 } else { 2.0 });

            let mut dst = f64::encode(&[f64::NAN, -1.0]);
            reduce(
                DType::F64,
                op,
                &mut dst,
                &f64::encode(&[f64::NEG_INFINITY, f64::NAN]),
            );
            assert!(f64::decode(&dst).iter().all(|x| x.is_nan()), "{op}");

            let mut acc = f32::encode(&[f32::NAN, 1.0]);
            let nan = f16::NAN.to_bits().to_ne_bytes();
            let one = f16::ONE.to_bits().to_ne_bytes();
            reduce_widen(DType::F16, op, &mut acc, &[one, nan].concat());
            assert!(
                f32::decode(&acc).iter().all(|x| x.is_nan()),
                "{op} widening"
            );
        }
    }

    #[test]
    fn integer_sum_and_prod_wrap() {
        let mut d = vec![127u8 as i8 as u8, 0x80];
        reduce(DType::I8, ReduceOp::Sum, &mut d, &[1, 0xff]); // 127 + 1, -128 + -1
        assert_eq!(d, [(-128i8) as u8, 127]);

        let mut d = vec![255u8, 16];
        reduce(DType::U8, ReduceOp::Sum, &mut d, &[1, 0]);
        reduce(DType::U8, ReduceOp::Prod, &mut d[1..], &[16]);
        assert_eq!(d, [0, 0]);

        let mut d = i32::encode(&[i32::MAX, i32::MIN]);
        reduce(DType::I32, ReduceOp::Sum, &mut d, &i32::encode(&[1, -1]));
        assert_eq!(i32::decode(&d), [i32::MIN, i32::MAX]);

        let mut d = i64::encode(&[i64::MAX, 1 << 62]);
        reduce(DType::I64, ReduceOp::Prod, &mut d, &i64::encode(&[2, 4]));
        assert_eq!(i64::decode(&d), [-2, 0]);
    }

    #[test]
    fn divide_truncates_toward_zero_and_handles_large_counts() {
        for off in 0..4 {
            let mut b = Buf::new(&i32::encode(&[-7, 7, -1, 1, -6, i32::MIN]), off);
            divide(DType::I32, b.bytes_mut(), 2);
            assert_eq!(i32::decode(b.bytes()), [-3, 3, 0, 0, -3, i32::MIN / 2]);
            b.assert_guards_intact();
        }
        let mut b = i8::encode(&[-128, 127, -128, 100]);
        divide(DType::I8, &mut b[..2], 128);
        divide(DType::I8, &mut b[2..], 200);
        assert_eq!(i8::decode(&b), [-1, 0, 0, 0]);
        let mut b = vec![255u8, 200];
        divide(DType::U8, &mut b, 256);
        assert_eq!(b, [0, 0]);
        let mut b = i64::encode(&[i64::MIN, -9, i64::MIN]);
        divide(DType::I64, &mut b[..16], 4);
        divide(DType::I64, &mut b[16..], 1 << 63);
        assert_eq!(i64::decode(&b), [i64::MIN / 4, -2, -1]);
        let mut b = Buf::new(&f32::encode(&[3.0, -1.0, f32::NAN]), 1);
        divide(DType::F32, b.bytes_mut(), 2);
        let got = f32::decode(b.bytes());
        assert_eq!(got[..2], [1.5, -0.5]);
        assert!(got[2].is_nan());
        let mut b = f64::encode(&[1.0]);
        divide(DType::F64, &mut b, 4);
        assert_eq!(f64::decode(&b), [0.25]);
    }

    #[test]
    #[should_panic(expected = "accumulates in f32")]
    fn reduce_rejects_half_types() {
        reduce(DType::BF16, ReduceOp::Sum, &mut [0; 4], &[0; 4]);
    }

    #[test]
    #[should_panic(expected = "mismatched slices")]
    fn reduce_rejects_mismatched_lengths() {
        reduce(DType::F32, ReduceOp::Sum, &mut [0; 8], &[0; 4]);
    }

    #[test]
    #[should_panic(expected = "is not a 16-bit float")]
    fn narrow_rejects_non_half_types() {
        narrow(DType::F32, &mut [0; 2], &[0; 4]);
    }

    // ---- f16 / bf16 ----

    fn halves(xs: &[u16]) -> Vec<u8> {
        xs.iter().flat_map(|x| x.to_ne_bytes()).collect()
    }

    fn unhalves(b: &[u8]) -> Vec<u16> {
        b.chunks_exact(2)
            .map(|c| u16::from_ne_bytes([c[0], c[1]]))
            .collect()
    }

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

    proptest! {
        #[test]
        fn f32_sum_is_elementwise_ieee_addition(
            pairs in proptest::collection::vec((any::<f32>(), any::<f32>()), 0..1200),
            dst_off in 0usize..4,
            src_off in 0usize..4,
        ) {
            let (a, b): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
            let mut dst = Buf::new(&f32::encode(&a), dst_off);
            let src = Buf::new(&f32::encode(&b), src_off);
            reduce(DType::F32, ReduceOp::Sum, dst.bytes_mut(), src.bytes());
            for ((x, y), got) in a.iter().zip(&b).zip(f32::decode(dst.bytes())) {
                prop_assert!(f32::same(got, x + y), "{x} + {y} gave {got}");
            }
            dst.assert_guards_intact();
        }

        #[test]
        fn i32_sum_wraps_elementwise(
            pairs in proptest::collection::vec((any::<i32>(), any::<i32>()), 0..1200),
            dst_off in 0usize..4,
            src_off in 0usize..4,
        ) {
            let (a, b): (Vec<i32>, Vec<i32>) = pairs.into_iter().unzip();
            let mut dst = Buf::new(&i32::encode(&a), dst_off);
            let src = Buf::new(&i32::encode(&b), src_off);
            reduce(DType::I32, ReduceOp::Sum, dst.bytes_mut(), src.bytes());
            let want: Vec<i32> = a.iter().zip(&b).map(|(x, y)| x.wrapping_add(*y)).collect();
            prop_assert_eq!(i32::decode(dst.bytes()), want);
            dst.assert_guards_intact();
        }
    }
}

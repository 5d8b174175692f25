//! Element-wise reduction over byte slices, per dtype and op: the entry points the collectives
//! call.
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
//! Where things are:
//! * this file: length checks, dispatch on dtype and op, and the byte-to-element views. Byte
//!   slices are viewed as typed slices when aligned (the common case: buffers come from the
//!   allocator and segments start at element multiples). Otherwise blocks are copied through
//!   aligned stack buffers (`on_bytes`), so unaligned input costs two extra copies of
//!   L1-resident data rather than a slow scalar loop.
//! * `kernels.rs`: the safe typed-slice kernels for types that reduce in their own type, and the
//!   loop (`zip_map`) with its run-time AVX2 choice that every kernel here is built from.
//! * `half.rs`: f16/bf16 conversions to and from f32, and reducing f16/bf16 into an f32
//!   accumulator (F16C when the CPU has it).
//!
//! Nothing here allocates, blocks or knows about collectives.

use crate::types::{DType, ReduceOp};
use bytemuck::{cast_slice, cast_slice_mut, Pod};
use kernels::{kernel_for, Num};
use std::mem::size_of;

mod half;
mod kernels;
#[cfg(test)]
mod test_support;

/// `b` viewed as `T`s, if it is aligned for `T` and a whole number of elements long.
fn typed<T: Pod>(b: &[u8]) -> Option<&[T]> {
    bytemuck::try_cast_slice(b).ok()
}

/// `b` viewed as `T`s, if it is aligned for `T` and a whole number of elements long.
fn typed_mut<T: Pod>(b: &mut [u8]) -> Option<&mut [T]> {
    bytemuck::try_cast_slice_mut(b).ok()
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
    let mut dbuf = [D::zeroed(); STAGE];
    let mut sbuf = [S::zeroed(); STAGE];
    for (dc, sc) in dst
        .chunks_mut(STAGE * size_of::<D>())
        .zip(src.chunks(STAGE * size_of::<S>()))
    {
        let n = dc.len() / size_of::<D>();
        let (d, s) = (&mut dbuf[..n], &mut sbuf[..n]);
        cast_slice_mut::<_, u8>(s).copy_from_slice(sc);
        if dst_is_input {
            cast_slice_mut::<_, u8>(d).copy_from_slice(dc);
        }
        kernel(d, s);
        dc.copy_from_slice(cast_slice::<_, u8>(d));
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

/// `acc = op(acc, f32(src))` element-wise: `acc` holds f32, `src` holds f16 or bf16
/// (`src_dtype`); lengths in bytes. AVG acts as SUM.
///
/// # Panics
/// If `src_dtype` is not f16/bf16 or the slices hold different numbers of elements.
pub fn reduce_widen(src_dtype: DType, op: ReduceOp, acc: &mut [u8], src: &[u8]) {
    let kernel = half::reduce_widen_kernel("reduce_widen", src_dtype, op);
    check("reduce_widen", acc.len(), 4, src.len(), 2);
    on_bytes(acc, src, true, kernel);
}

/// `dst = f32(src)`: `dst` holds f32, `src` holds f16 or bf16 (`src_dtype`); lengths in bytes.
///
/// # Panics
/// If `src_dtype` is not f16/bf16 or the slices hold different numbers of elements.
pub fn widen(src_dtype: DType, dst: &mut [u8], src: &[u8]) {
    let kernel = half::widen_kernel("widen", src_dtype);
    check("widen", dst.len(), 4, src.len(), 2);
    on_bytes(dst, src, false, kernel);
}

/// `dst = round(acc)`: `acc` holds f32, `dst` receives f16 or bf16 (`dst_dtype`), rounded to
/// nearest even; lengths in bytes. Values beyond the range become infinity; NaN stays NaN.
///
/// # Panics
/// If `dst_dtype` is not f16/bf16 or the slices hold different numbers of elements.
pub fn narrow(dst_dtype: DType, dst: &mut [u8], acc: &[u8]) {
    let kernel = half::narrow_kernel("narrow", dst_dtype);
    check("narrow", dst.len(), 2, acc.len(), 4);
    on_bytes(dst, acc, false, kernel);
}

fn divide_t<T: Num>(buf: &mut [u8], n: usize) {
    let divide = |x: &mut [T]| x.iter_mut().for_each(|v| *v = v.div_n(n));
    match typed_mut::<T>(buf) {
        Some(x) => divide(x),
        None => {
            let mut stage = [T::zeroed(); STAGE];
            for chunk in buf.chunks_mut(STAGE * size_of::<T>()) {
                let x = &mut stage[..chunk.len() / size_of::<T>()];
                cast_slice_mut::<_, u8>(x).copy_from_slice(chunk);
                divide(x);
                chunk.copy_from_slice(cast_slice::<_, u8>(x));
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
    use super::test_support::*;
    use super::*;
    use ::half::f16;
    use proptest::prelude::*;

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

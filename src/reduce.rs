//! Element-wise reduction kernels over byte slices, per dtype and op.
//!
//! Kernels are safe slice functions written as plain loops that the compiler vectorises. The
//! byte-slice entry points check lengths and dispatch on dtype; they never allocate.
//! f16/bf16 never reduce in their own type: partials accumulate in f32 ([`reduce_widen`],
//! [`widen`]) and are rounded once at the end ([`narrow`]).
//!
//! Semantics shared by every path (so ring, recursive doubling and relays agree):
//! * integer SUM/PROD wrap; integer AVG truncates toward zero;
//! * float MAX/MIN propagate NaN (like `torch.maximum`);
//! * `dst = op(dst, src)`: `dst` is the left operand.

use crate::types::{DType, ReduceOp};
use half::{bf16, f16};

trait Num: Copy {
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn max(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    fn div_n(self, n: usize) -> Self;
    fn from_le(b: &[u8]) -> Self;
    fn write_le(self, b: &mut [u8]);
}

macro_rules! int_num {
    ($($t:ty),*) => {$(
        impl Num for $t {
            #[inline(always)] fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            #[inline(always)] fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            #[inline(always)] fn max(self, o: Self) -> Self { if o > self { o } else { self } }
            #[inline(always)] fn min(self, o: Self) -> Self { if o < self { o } else { self } }
            #[inline(always)] fn div_n(self, n: usize) -> Self { self / (n as $t) }
            #[inline(always)] fn from_le(b: &[u8]) -> Self { <$t>::from_le_bytes(b.try_into().unwrap()) }
            #[inline(always)] fn write_le(self, b: &mut [u8]) { b.copy_from_slice(&self.to_le_bytes()) }
        }
    )*};
}
int_num!(i8, u8, i32, i64);

macro_rules! float_num {
    ($($t:ty),*) => {$(
        impl Num for $t {
            #[inline(always)] fn add(self, o: Self) -> Self { self + o }
            #[inline(always)] fn mul(self, o: Self) -> Self { self * o }
            #[inline(always)] fn max(self, o: Self) -> Self {
                if self.is_nan() || o.is_nan() { <$t>::NAN } else if o > self { o } else { self }
            }
            #[inline(always)] fn min(self, o: Self) -> Self {
                if self.is_nan() || o.is_nan() { <$t>::NAN } else if o < self { o } else { self }
            }
            #[inline(always)] fn div_n(self, n: usize) -> Self { self / (n as $t) }
            #[inline(always)] fn from_le(b: &[u8]) -> Self { <$t>::from_le_bytes(b.try_into().unwrap()) }
            #[inline(always)] fn write_le(self, b: &mut [u8]) { b.copy_from_slice(&self.to_le_bytes()) }
        }
    )*};
}
float_num!(f32, f64);

#[inline(always)]
fn apply<T: Num>(op: ReduceOp, a: T, b: T) -> T {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => a.add(b),
        ReduceOp::Prod => a.mul(b),
        ReduceOp::Max => a.max(b),
        ReduceOp::Min => a.min(b),
    }
}

/// Reinterpret aligned byte slices as `T` slices when both are aligned.
fn typed_mut<T>(b: &mut [u8]) -> Option<&mut [T]> {
    // SAFETY: only used with primitive numeric T, for which every bit pattern is valid;
    // align_to_mut returns the aligned middle part and we accept it only if it covers all.
    let (pre, mid, post) = unsafe { b.align_to_mut::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

fn typed<T>(b: &[u8]) -> Option<&[T]> {
    // SAFETY: as in `typed_mut`.
    let (pre, mid, post) = unsafe { b.align_to::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

const LANES: usize = 16;

#[inline(always)]
fn combine<T: Num>(dst: &mut [T], src: &[T], f: impl Fn(T, T) -> T) {
    let mut d = dst.chunks_exact_mut(LANES);
    let mut s = src.chunks_exact(LANES);
    for (dc, sc) in (&mut d).zip(&mut s) {
        for i in 0..LANES {
            dc[i] = f(dc[i], sc[i]);
        }
    }
    for (x, y) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *x = f(*x, *y);
    }
}

#[inline(never)]
fn reduce_t<T: Num>(op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    let size = std::mem::size_of::<T>();
    match (typed::<T>(src), typed_mut::<T>(dst)) {
        (Some(s), Some(d)) => match op {
            ReduceOp::Sum | ReduceOp::Avg => combine(d, s, |a, b| a.add(b)),
            ReduceOp::Prod => combine(d, s, |a, b| a.mul(b)),
            ReduceOp::Max => combine(d, s, |a, b| a.max(b)),
            ReduceOp::Min => combine(d, s, |a, b| a.min(b)),
        },
        _ => {
            for (d, s) in dst.chunks_exact_mut(size).zip(src.chunks_exact(size)) {
                apply(op, T::from_le(d), T::from_le(s)).write_le(d);
            }
        }
    }
}

fn check(what: &str, dst_len: usize, dst_size: usize, src_len: usize, src_size: usize) {
    assert!(
        dst_len % dst_size == 0 && src_len % src_size == 0 && dst_len / dst_size == src_len / src_size,
        "{what}: mismatched slices ({dst_len} bytes of {dst_size}-byte elements vs {src_len} bytes of {src_size}-byte elements)"
    );
}

/// `dst = op(dst, src)` element-wise; both in `dtype` layout. AVG acts as SUM here (divide at
/// the end with [`divide`]). `dtype` must not be f16/bf16, which accumulate in f32.
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

#[inline(always)]
fn half_to_f32(dtype: DType, b: &[u8]) -> f32 {
    let bits = u16::from_le_bytes([b[0], b[1]]);
    match dtype {
        DType::F16 => f16::from_bits(bits).to_f32(),
        _ => bf16::from_bits(bits).to_f32(),
    }
}

#[inline(always)]
fn f32_to_half(dtype: DType, v: f32) -> [u8; 2] {
    match dtype {
        DType::F16 => f16::from_f32(v).to_bits().to_le_bytes(),
        _ => bf16::from_f32(v).to_bits().to_le_bytes(),
    }
}

fn assert_half(what: &str, dtype: DType) {
    assert!(
        matches!(dtype, DType::F16 | DType::BF16),
        "{what}: {dtype} is not a 16-bit float"
    );
}

/// `acc = op(acc, f32(src))`: `acc` holds f32, `src` holds f16 or bf16 (`src_dtype`).
#[inline(never)]
pub fn reduce_widen(src_dtype: DType, op: ReduceOp, acc: &mut [u8], src: &[u8]) {
    assert_half("reduce_widen", src_dtype);
    check("reduce_widen", acc.len(), 4, src.len(), 2);
    if let Some(a) = typed_mut::<f32>(acc) {
        for (x, s) in a.iter_mut().zip(src.chunks_exact(2)) {
            *x = apply(op, *x, half_to_f32(src_dtype, s));
        }
        return;
    }
    for (d, s) in acc.chunks_exact_mut(4).zip(src.chunks_exact(2)) {
        apply(op, f32::from_le(d), half_to_f32(src_dtype, s)).write_le(d);
    }
}

/// `dst = f32(src)`: `dst` holds f32, `src` holds f16 or bf16 (`src_dtype`).
#[inline(never)]
pub fn widen(src_dtype: DType, dst: &mut [u8], src: &[u8]) {
    assert_half("widen", src_dtype);
    check("widen", dst.len(), 4, src.len(), 2);
    for (d, s) in dst.chunks_exact_mut(4).zip(src.chunks_exact(2)) {
        d.copy_from_slice(&half_to_f32(src_dtype, s).to_le_bytes());
    }
}

/// `dst = round(acc)`: `acc` holds f32, `dst` receives f16 or bf16 (`dst_dtype`), rounded to
/// nearest even.
#[inline(never)]
pub fn narrow(dst_dtype: DType, dst: &mut [u8], acc: &[u8]) {
    assert_half("narrow", dst_dtype);
    check("narrow", dst.len(), 2, acc.len(), 4);
    for (d, a) in dst.chunks_exact_mut(2).zip(acc.chunks_exact(4)) {
        d.copy_from_slice(&f32_to_half(dst_dtype, f32::from_le(a)));
    }
}

fn divide_t<T: Num>(buf: &mut [u8], n: usize) {
    let size = std::mem::size_of::<T>();
    for b in buf.chunks_exact_mut(size) {
        T::from_le(b).div_n(n).write_le(b);
    }
}

/// Finish an AVG: `buf /= n` element-wise, `buf` in `dtype` layout (an accumulator dtype:
/// not f16/bf16).
pub fn divide(dtype: DType, buf: &mut [u8], n: usize) {
    assert!(n > 0, "divide by zero contributors");
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

//! Test support for the reduction kernels: deterministic random values, guarded buffers at
//! chosen offsets, and a reference model of each element type that shares no code with the
//! kernels.

use super::STAGE;
use crate::types::{DType, ReduceOp};
use std::fmt::Debug;
use std::mem::size_of;

/// splitmix64: deterministic values without a dependency.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const SENTINEL: u8 = 0xa5;

/// `len` bytes starting `offset` bytes past a 64-byte boundary, surrounded by sentinel bytes
/// that must survive every kernel.
pub(super) struct Buf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Buf {
    pub(super) fn new(bytes: &[u8], offset: usize) -> Buf {
        let mut raw = vec![SENTINEL; bytes.len() + 128 + offset];
        let start = raw.as_ptr().align_offset(64) + offset;
        raw[start..start + bytes.len()].copy_from_slice(bytes);
        Buf {
            raw,
            start,
            len: bytes.len(),
        }
    }
    pub(super) fn zeroed(len: usize, offset: usize) -> Buf {
        Buf::new(&vec![0; len], offset)
    }
    pub(super) fn bytes(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
    #[track_caller]
    pub(super) fn assert_guards_intact(&self) {
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
pub(super) trait Elem: Copy + Debug + PartialEq {
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
pub(super) fn lengths(lanes: usize) -> impl Iterator<Item = usize> {
    (0..=3 * lanes + 1).chain([STAGE - 1, STAGE, 2 * STAGE + lanes + 3])
}

/// 16-bit patterns as native-endian bytes.
pub(super) fn halves(xs: &[u16]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

/// Native-endian bytes as 16-bit patterns.
pub(super) fn unhalves(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2)
        .map(|c| u16::from_ne_bytes([c[0], c[1]]))
        .collect()
}

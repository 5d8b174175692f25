//! Element types and reduction operators shared by every layer.

use crate::error::{Error, Result};

/// Element type of a buffer. Discriminants are the C ABI's `mr_dtype` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    F32 = 0,
    F64 = 1,
    F16 = 2,
    BF16 = 3,
    I8 = 4,
    U8 = 5,
    I32 = 6,
    I64 = 7,
}

impl DType {
    pub const ALL: [DType; 8] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I8,
        DType::U8,
        DType::I32,
        DType::I64,
    ];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    /// Type in which partial results travel and accumulate: f16/bf16 are summed in f32 and
    /// rounded once at the end; every other type accumulates in itself.
    pub const fn accumulator(self) -> DType {
        match self {
            DType::F16 | DType::BF16 => DType::F32,
            t => t,
        }
    }

    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }

    pub fn from_raw(v: u32) -> Result<DType> {
        DType::ALL
            .get(v as usize)
            .copied()
            .ok_or_else(|| Error::invalid(format!("dtype value {v} is out of range (0..=7)")))
    }

    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::I32 => "int32",
            DType::I64 => "int64",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Reduction operator. Discriminants are the C ABI's `mr_op` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReduceOp {
    Sum = 0,
    /// Sum, then divide by the number of contributors (integer types truncate toward zero).
    Avg = 1,
    Max = 2,
    Min = 3,
    Prod = 4,
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Avg,
        ReduceOp::Max,
        ReduceOp::Min,
        ReduceOp::Prod,
    ];

    pub fn from_raw(v: u32) -> Result<ReduceOp> {
        ReduceOp::ALL.get(v as usize).copied().ok_or_else(|| {
            Error::invalid(format!("reduction op value {v} is out of range (0..=4)"))
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
            ReduceOp::Prod => "prod",
        }
    }
}

impl std::fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust element type with a [`DType`]; lets the safe Rust API take typed slices.
///
/// A safe trait: `bytemuck::Pod` already promises what viewing a slice as bytes needs (no
/// padding, every bit pattern valid), and `dtype_of` checks at compile time that one `Self`
/// is exactly one `DTYPE` element, so an impl with the wrong `DTYPE` size does not build.
pub trait Element: bytemuck::Pod + Send + Sync {
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for f64 {
    const DTYPE: DType = DType::F64;
}
impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for i8 {
    const DTYPE: DType = DType::I8;
}
impl Element for u8 {
    const DTYPE: DType = DType::U8;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}
impl Element for i64 {
    const DTYPE: DType = DType::I64;
}

/// `T::DTYPE`, after checking at compile time that a `T` is exactly one element of it: the
/// typed API hands `len` elements of `T` to code that moves `len * DTYPE.size()` bytes.
pub(crate) const fn dtype_of<T: Element>() -> DType {
    const {
        assert!(
            std::mem::size_of::<T>() == T::DTYPE.size(),
            "an Element's size must be its DTYPE's size"
        )
    };
    T::DTYPE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_element_type_is_one_element_of_its_dtype() {
        fn bytes<T: Element>(x: T) -> (DType, usize) {
            (dtype_of::<T>(), bytemuck::bytes_of(&x).len())
        }
        let all = [
            bytes(1f32),
            bytes(1f64),
            bytes(half::f16::ONE),
            bytes(half::bf16::ONE),
            bytes(1i8),
            bytes(1u8),
            bytes(1i32),
            bytes(1i64),
        ];
        for (dtype, len) in all {
            assert_eq!(dtype.size(), len, "{dtype}");
        }
        let mut dtypes: Vec<DType> = all.iter().map(|(d, _)| *d).collect();
        dtypes.dedup();
        assert_eq!(dtypes, DType::ALL);
    }
}

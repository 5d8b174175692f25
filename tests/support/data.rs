//! Test data with closed-form results: small integers (and halves, for AVG) that every dtype
//! holds exactly, so expected results can be compared bit for bit.

#![allow(dead_code)]

use mapreduce::{DType, ReduceOp};

/// A byte buffer with 8-byte alignment (what a typed caller would pass).
pub struct Buf {
    words: Vec<u64>,
    len: usize,
}

impl Buf {
    pub fn zeroed(len: usize) -> Buf {
        Buf {
            words: vec![0; len.div_ceil(8)],
            len,
        }
    }

    pub fn filled(len: usize, byte: u8) -> Buf {
        let mut b = Buf::zeroed(len);
        b.bytes_mut().fill(byte);
        b
    }

    pub fn from_bytes(src: &[u8]) -> Buf {
        let mut b = Buf::zeroed(src.len());
        b.bytes_mut().copy_from_slice(src);
        b
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes; u8 has no alignment needs.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes the view exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.len) }
    }

    pub fn ptr(&mut self) -> *mut u8 {
        self.words.as_mut_ptr().cast()
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

fn signed(d: DType) -> bool {
    d != DType::U8
}

/// The value rank `r` contributes at element `i` for an `op` test in `dtype`.
pub fn value(r: usize, i: usize, dtype: DType, op: ReduceOp) -> f64 {
    let s = signed(dtype);
    match op {
        ReduceOp::Sum => ((r * 3 + i) % 7) as f64 - if s { 3.0 } else { 0.0 },
        // Non-negative, and the sum over ranks is n·c + n(n-1)/2: the float mean is a
        // half-integer (exact), the integer mean truncates.
        ReduceOp::Avg => ((i % 5) + r) as f64,
        ReduceOp::Max | ReduceOp::Min => ((r * 5 + i * 3) % 11) as f64 - if s { 5.0 } else { 0.0 },
        // At most ceil(n/4) twos per element: |product| <= 4 for n <= 8, safe in int8.
        ReduceOp::Prod => {
            let m = if (r + i) % 4 == 0 { 2.0 } else { 1.0 };
            if s && (r + 2 * i) % 3 == 0 {
                -m
            } else {
                m
            }
        }
    }
}

/// The reduction over ranks `0..n` of [`value`] at element `i`.
pub fn expected(n: usize, i: usize, dtype: DType, op: ReduceOp) -> f64 {
    let vals = (0..n).map(|r| value(r, i, dtype, op));
    match op {
        ReduceOp::Sum => vals.sum(),
        ReduceOp::Avg => {
            let mean = vals.sum::<f64>() / n as f64;
            if dtype.is_float() {
                mean
            } else {
                mean.trunc()
            }
        }
        ReduceOp::Max => vals.fold(f64::MIN, f64::max),
        ReduceOp::Min => vals.fold(f64::MAX, f64::min),
        ReduceOp::Prod => vals.product(),
    }
}

/// One value in `dtype`'s little-endian layout (the value must be exact in that type).
pub fn encode_one(dtype: DType, v: f64, out: &mut Vec<u8>) {
    match dtype {
        DType::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
        DType::F64 => out.extend_from_slice(&v.to_le_bytes()),
        DType::F16 => out.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
        DType::BF16 => out.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
        DType::I8 => out.extend_from_slice(&(v as i8).to_le_bytes()),
        DType::U8 => out.extend_from_slice(&(v as u8).to_le_bytes()),
        DType::I32 => out.extend_from_slice(&(v as i32).to_le_bytes()),
        DType::I64 => out.extend_from_slice(&(v as i64).to_le_bytes()),
    }
}

/// `count` elements starting at element `first`, from `f(i)`.
pub fn encode(dtype: DType, first: usize, count: usize, f: impl Fn(usize) -> f64) -> Buf {
    let mut out = Vec::with_capacity(count * dtype.size());
    for i in first..first + count {
        encode_one(dtype, f(i), &mut out);
    }
    Buf::from_bytes(&out)
}

/// The first element where `got` and `want` differ, as a readable note; `None` if equal.
pub fn first_diff(got: &[u8], want: &[u8], elem: usize) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("length {} != {}", got.len(), want.len()));
    }
    let i = got
        .chunks(elem)
        .zip(want.chunks(elem))
        .position(|(a, b)| a != b)?;
    Some(format!(
        "element {i}: got {:02x?}, want {:02x?}",
        &got[i * elem..(i + 1) * elem],
        &want[i * elem..(i + 1) * elem]
    ))
}

/// A small deterministic generator (xorshift64*) for random test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

/// `count` random values in [-1, 1) in `dtype` (a float type).
pub fn random(dtype: DType, count: usize, seed: u64) -> Buf {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(count * dtype.size());
    for _ in 0..count {
        encode_one(dtype, rng.unit(), &mut out);
    }
    Buf::from_bytes(&out)
}

//! Wire formats that send floating-point data in fewer bytes: bf16, fp16 and blockwise int8.
//!
//! On the links this library is built for the bytes are the time, so a float32 all-reduce can
//! trade precision for bandwidth. This module holds only the formats and their kernels: pure
//! functions from element slices to wire bytes and back. It never decides *when* to compress
//! (the schedules do) and never sees a socket.
//!
//! # Formats (all encode f32; f64 goes through f32 first)
//!
//! | format | bytes per element | what one encoding may lose |
//! |---|---|---|
//! | [`Compression::None`] | 4 | nothing |
//! | [`Compression::Bf16`] | 2 | rounding to 8 significant bits: at most 2^-8 of the value's magnitude |
//! | [`Compression::Fp16`] | 2 | rounding to 11 significant bits: at most 2^-11 of the value's magnitude within fp16's range; values beyond ±65504 become ±infinity |
//! | [`Compression::Int8`] | 1 + 8/256 | at most half a quantization step of the element's block |
//!
//! **int8 blocks.** Elements are taken in blocks of [`INT8_BLOCK`] (256); the last block of a
//! buffer may be shorter. A block is encoded as an 8-byte header — `mid` and `step`, both
//! little-endian f32 — followed by one code byte per element, so a block of 256 float32 values
//! (1024 bytes) takes 264 bytes. With `min` and `max` the block's extremes,
//! `step = max/255 − min/255` and `mid = min + (max/2 − min/2)` (each term on its own, so that
//! no intermediate overflows even when `max − min` exceeds the f32 range), element `x` gets the
//! code `q = ⌊(x − mid)/step + 128⌋` (clamped to 0..=255) and decodes as
//! `mid + (q − 127.5)·step`. So an element is off by at most `step/2` plus the rounding of
//! those few float operations, and a constant block (including all zeros) decodes exactly
//! (`step = 0`). A block that holds a NaN or an infinity is encoded with `mid = step = NaN`
//! and decodes as NaN in every element: the non-finite signal that loss scalers look for
//! survives, its value and position within the block do not.
//!
//! **Bit-exact everywhere.** Encoding and decoding use only IEEE additions, multiplications and
//! divisions in a fixed order (no fused multiply-add), and `-0.0` is normalised to `+0.0` in the
//! block header, so every build (AVX2 or baseline) and every host turns the same input into the
//! same bytes and the same bytes into the same values. That is what lets every rank end with
//! identical results and a verifier recompute a relay's encoded sum exactly.
//!
//! **Error on a path.** Each encoding adds at most its own bound; an element that is encoded k
//! times on its way (a ring's reduce-scatter re-encodes a partial sum at every hop) is off by at
//! most the sum of the k bounds, each taken for the block it was in at that hop.
//!
//! | path | encodings of an element | bound (besides f32 rounding of the sums) |
//! |---|---|---|
//! | ring, n ranks | n: n − 1 partial sums, one result | Σ over the hops of the bound for that hop's block of partial sums |
//! | relays, n ranks | n + 1: each rank's input once, the relay's sum once | Σ over the ranks of the bound for its input block, plus the bound for the block of sums |
//!
//! Through relays each rank's input block is encoded once by its owner and the sum once by
//! the relay ([`reduce_encoded`]); a verifier repeats exactly that arithmetic.

use crate::error::{Error, Result};
use crate::reduce;
use crate::types::{DType, ReduceOp};

/// Elements per int8 block.
pub const INT8_BLOCK: usize = 256;
/// Bytes of an int8 block's header: `mid` and `step`, little-endian f32.
pub const INT8_HEADER: usize = 8;
/// Wire bytes of a whole int8 block.
pub const INT8_WIRE_BLOCK: usize = INT8_BLOCK + INT8_HEADER;

/// How floating-point data travels on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Compression {
    /// Exact: the data's own bytes.
    #[default]
    None = 0,
    /// bfloat16, rounded to nearest even.
    Bf16 = 1,
    /// IEEE half precision, rounded to nearest even.
    Fp16 = 2,
    /// Blockwise 8-bit codes with a per-block minimum and step (see the module docs).
    Int8 = 3,
}

impl Compression {
    /// All formats, exact first.
    pub const ALL: [Compression; 4] = [
        Compression::None,
        Compression::Bf16,
        Compression::Fp16,
        Compression::Int8,
    ];

    /// Parse `none`, `bf16`, `fp16` or `int8` (the values of `MR_COMPRESS`).
    pub fn parse(s: &str) -> Result<Compression> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "none" => Ok(Compression::None),
            "bf16" => Ok(Compression::Bf16),
            "fp16" => Ok(Compression::Fp16),
            "int8" => Ok(Compression::Int8),
            other => Err(Error::invalid(format!(
                "unknown compression '{other}' (expected none, bf16, fp16 or int8)"
            ))),
        }
    }

    pub fn from_u8(v: u8) -> Option<Compression> {
        Compression::ALL.get(v as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Bf16 => "bf16",
            Compression::Fp16 => "fp16",
            Compression::Int8 => "int8",
        }
    }

    /// Whether data of `dtype` can travel in this format (only float32 and float64 compress).
    pub fn applies_to(self, dtype: DType) -> bool {
        self == Compression::None || matches!(dtype, DType::F32 | DType::F64)
    }

    /// Wire bytes for `elems` float32 elements in this format.
    pub fn encoded_len(self, elems: usize) -> usize {
        match self {
            Compression::None => elems * 4,
            Compression::Bf16 | Compression::Fp16 => elems * 2,
            Compression::Int8 => elems + elems.div_ceil(INT8_BLOCK) * INT8_HEADER,
        }
    }

    /// Elements in a run of `len` wire bytes that starts at a block boundary: the inverse of
    /// [`Self::encoded_len`]. `None` when no element count encodes to exactly `len` bytes (an
    /// int8 run whose last block has a header but no codes, or half a 16-bit element).
    pub fn decoded_len(self, len: usize) -> Option<usize> {
        match self {
            Compression::None => (len % 4 == 0).then_some(len / 4),
            Compression::Bf16 | Compression::Fp16 => (len % 2 == 0).then_some(len / 2),
            Compression::Int8 => {
                let (full, rem) = (len / INT8_WIRE_BLOCK, len % INT8_WIRE_BLOCK);
                match rem {
                    0 => Some(full * INT8_BLOCK),
                    r if r > INT8_HEADER => Some(full * INT8_BLOCK + r - INT8_HEADER),
                    _ => None,
                }
            }
        }
    }

    /// Elements before wire offset `offset` in the encoded image of a buffer, when `offset`
    /// is where an element (16-bit formats) or an int8 block starts; `None` otherwise.
    pub fn elems_before(self, offset: usize) -> Option<usize> {
        match self {
            Compression::Int8 => {
                (offset % INT8_WIRE_BLOCK == 0).then_some(offset / INT8_WIRE_BLOCK * INT8_BLOCK)
            }
            z => z.decoded_len(offset),
        }
    }

    /// Encode `src` into `dst`, which must be exactly [`Self::encoded_len`]`(src.len())` bytes.
    ///
    /// # Panics
    /// If `dst` has the wrong length.
    pub fn encode(self, src: &[f32], dst: &mut [u8]) {
        check_len("encode", self, src.len(), dst.len());
        match self {
            Compression::None => dst.copy_from_slice(bytemuck::cast_slice(src)),
            Compression::Bf16 => reduce::narrow(DType::BF16, dst, bytemuck::cast_slice(src)),
            Compression::Fp16 => reduce::narrow(DType::F16, dst, bytemuck::cast_slice(src)),
            Compression::Int8 => int8::encode(src, dst),
        }
    }

    /// Decode `src` (wire bytes for `dst.len()` elements) into `dst`.
    ///
    /// # Panics
    /// If `src` has the wrong length.
    pub fn decode(self, src: &[u8], dst: &mut [f32]) {
        check_len("decode", self, dst.len(), src.len());
        match self {
            Compression::None => bytemuck::cast_slice_mut(dst).copy_from_slice(src),
            Compression::Bf16 => reduce::widen(DType::BF16, bytemuck::cast_slice_mut(dst), src),
            Compression::Fp16 => reduce::widen(DType::F16, bytemuck::cast_slice_mut(dst), src),
            Compression::Int8 => int8::decode(src, dst, false),
        }
    }

    /// As [`Self::decode_bytes`], for a result written once into a large buffer that is not
    /// read back at once (a peer's relay results): int8 writes it with streaming stores
    /// where the destination's alignment allows, the same bits either way.
    pub fn decode_result_bytes(self, dtype: DType, src: &[u8], dst: &mut [u8]) {
        if let (Compression::Int8, 4) = (self, float_size(dtype)) {
            if let Ok(y) = bytemuck::try_cast_slice_mut::<u8, f32>(dst) {
                check_len("decode_result_bytes", self, y.len(), src.len());
                return int8::decode(src, y, true);
            }
        }
        self.decode_bytes(dtype, src, dst)
    }

    /// `acc[i] += decode(src)[i]`, in one pass. Bitwise equal to decoding into a temporary and
    /// adding it: the decoded value is rounded to f32 before the addition.
    ///
    /// # Panics
    /// If `src` has the wrong length.
    pub fn decode_add(self, src: &[u8], acc: &mut [f32]) {
        check_len("decode_add", self, acc.len(), src.len());
        match self {
            Compression::None => reduce::reduce(
                DType::F32,
                ReduceOp::Sum,
                bytemuck::cast_slice_mut(acc),
                src,
            ),
            Compression::Bf16 => reduce::reduce_widen(
                DType::BF16,
                ReduceOp::Sum,
                bytemuck::cast_slice_mut(acc),
                src,
            ),
            Compression::Fp16 => reduce::reduce_widen(
                DType::F16,
                ReduceOp::Sum,
                bytemuck::cast_slice_mut(acc),
                src,
            ),
            Compression::Int8 => int8::decode_add(src, acc),
        }
    }

    /// Encode float64 data: each element is rounded to f32 first, then encoded as f32.
    pub fn encode_f64(self, src: &[f64], dst: &mut [u8]) {
        check_len("encode_f64", self, src.len(), dst.len());
        let mut stage = [0f32; STAGE];
        let mut at = 0;
        for s in src.chunks(STAGE) {
            let st = &mut stage[..s.len()];
            for (d, x) in st.iter_mut().zip(s) {
                *d = *x as f32;
            }
            let n = self.encoded_len(s.len());
            self.encode(st, &mut dst[at..at + n]);
            at += n;
        }
    }

    /// Decode into float64 (the decoded f32 values, widened exactly).
    pub fn decode_f64(self, src: &[u8], dst: &mut [f64]) {
        check_len("decode_f64", self, dst.len(), src.len());
        let mut stage = [0f32; STAGE];
        let mut at = 0;
        for d in dst.chunks_mut(STAGE) {
            let st = &mut stage[..d.len()];
            let n = self.encoded_len(d.len());
            self.decode(&src[at..at + n], st);
            at += n;
            for (y, x) in d.iter_mut().zip(st.iter()) {
                *y = f64::from(*x);
            }
        }
    }

    /// Encode `src`, the little-endian bytes of float32 or float64 elements at any alignment
    /// (float64 rounded to f32 first, as [`Self::encode_f64`]).
    ///
    /// # Panics
    /// If `dtype` is neither float, or `dst` has the wrong length.
    pub fn encode_bytes(self, dtype: DType, src: &[u8], dst: &mut [u8]) {
        let size = float_size(dtype);
        let elems = src.len() / size;
        check_len("encode_bytes", self, elems, dst.len());
        if let (4, Ok(x)) = (size, bytemuck::try_cast_slice::<u8, f32>(src)) {
            return self.encode(x, dst);
        }
        let mut stage = [0f32; STAGE];
        let mut at = 0;
        for s in src.chunks(STAGE * size) {
            let st = &mut stage[..s.len() / size];
            for (d, x) in st.iter_mut().zip(s.chunks_exact(size)) {
                *d = match size {
                    8 => f64::from_le_bytes(x.try_into().unwrap()) as f32,
                    _ => f32::from_le_bytes(x.try_into().unwrap()),
                };
            }
            let n = self.encoded_len(st.len());
            self.encode(st, &mut dst[at..at + n]);
            at += n;
        }
    }

    /// Decode into `dst`, the little-endian bytes of float32 or float64 elements at any
    /// alignment (the decoded f32 values, widened exactly for float64).
    ///
    /// # Panics
    /// If `dtype` is neither float, or `src` has the wrong length.
    pub fn decode_bytes(self, dtype: DType, src: &[u8], dst: &mut [u8]) {
        let size = float_size(dtype);
        let elems = dst.len() / size;
        check_len("decode_bytes", self, elems, src.len());
        if size == 4 {
            if let Ok(y) = bytemuck::try_cast_slice_mut::<u8, f32>(dst) {
                return self.decode(src, y);
            }
        }
        let mut stage = [0f32; STAGE];
        let mut at = 0;
        for d in dst.chunks_mut(STAGE * size) {
            let st = &mut stage[..d.len() / size];
            let n = self.encoded_len(st.len());
            self.decode(&src[at..at + n], st);
            at += n;
            for (y, x) in d.chunks_exact_mut(size).zip(st.iter()) {
                match size {
                    8 => y.copy_from_slice(&f64::from(*x).to_le_bytes()),
                    _ => y.copy_from_slice(&x.to_le_bytes()),
                }
            }
        }
    }

    /// The most that one encoding may move each element of `block` (a whole int8 block, or
    /// any run of elements for the 16-bit formats), element by element. `None` for elements
    /// whose encoding is not bounded (non-finite values, fp16 overflow).
    pub fn error_bound(self, block: &[f32]) -> Vec<Option<f32>> {
        match self {
            Compression::None => vec![Some(0.0); block.len()],
            Compression::Bf16 => block
                .iter()
                .map(|x| x.is_finite().then(|| x.abs() * (1.0 / 256.0)))
                .collect(),
            Compression::Fp16 => block
                .iter()
                .map(|x| {
                    // Below fp16's normal range the absolute spacing is 2^-24.
                    (x.is_finite() && x.abs() <= 65504.0)
                        .then(|| x.abs() * (1.0 / 2048.0) + 2f32.powi(-25))
                })
                .collect(),
            Compression::Int8 => {
                if block.iter().any(|x| !x.is_finite()) {
                    return vec![None; block.len()];
                }
                let (min, max) = block
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
                        (lo.min(x), hi.max(x))
                    });
                let step = max / 255.0 - min / 255.0;
                // Half a step, plus the rounding of the few float operations on the way: a few
                // units in the last place of the block's largest magnitude (and of the
                // smallest subnormal, where a step rounds to zero).
                let slack = min.abs().max(max.abs()) * 2f32.powi(-21)
                    + step * 2f32.powi(-20)
                    + f32::from_bits(1) * 256.0;
                vec![Some(step / 2.0 + slack); block.len()]
            }
        }
    }
}

/// Fold one encoded contribution into the f32 partial results `acc` (`acc op decode(src)`),
/// exactly as a relay folds the ranks' chunks: a sum adds the decoded values
/// ([`Compression::decode_add`]); other reductions decode into `stage` first.
pub fn fold_encoded(
    z: Compression,
    op: ReduceOp,
    acc: &mut [f32],
    src: &[u8],
    stage: &mut Vec<f32>,
) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => z.decode_add(src, acc),
        _ => {
            stage.resize(acc.len(), 0.0);
            z.decode(src, stage);
            reduce::reduce(
                DType::F32,
                op,
                bytemuck::cast_slice_mut(acc),
                bytemuck::cast_slice(stage),
            );
        }
    }
}

/// A relay's result for one chunk from every rank's encoded contribution, in rank order:
/// decode rank 0's, fold the others in with [`fold_encoded`] in f32, divide for an average,
/// and encode once. Verifiers recompute a relay's result with this. `None` when the inputs
/// are not all the same whole number of elements in `z`.
pub fn reduce_encoded(z: Compression, op: ReduceOp, inputs: &[&[u8]]) -> Option<Vec<u8>> {
    let first = inputs.first()?;
    let elems = z.decoded_len(first.len())?;
    if inputs.iter().any(|x| x.len() != first.len()) {
        return None;
    }
    let mut acc = vec![0f32; elems];
    let mut stage = Vec::new();
    z.decode(first, &mut acc);
    for x in &inputs[1..] {
        fold_encoded(z, op, &mut acc, x, &mut stage);
    }
    if op == ReduceOp::Avg {
        reduce::divide(DType::F32, bytemuck::cast_slice_mut(&mut acc), inputs.len());
    }
    let mut out = vec![0u8; first.len()];
    z.encode(&acc, &mut out);
    Some(out)
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Elements staged per step when converting f64, a multiple of [`INT8_BLOCK`] so int8 blocks
/// line up with the stages.
const STAGE: usize = 16 * INT8_BLOCK;

/// Bytes of a float32 or float64 element.
#[track_caller]
fn float_size(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 4,
        DType::F64 => 8,
        other => panic!("compress: {other} data does not compress"),
    }
}

#[track_caller]
fn check_len(what: &str, z: Compression, elems: usize, bytes: usize) {
    let want = z.encoded_len(elems);
    assert_eq!(
        bytes, want,
        "compress::{what}: {elems} elements take {want} bytes as {z}, got {bytes}"
    );
}

/// The int8 kernels. Each block is handled in registers and L1: one pass for the extremes,
/// one for the codes.
mod int8 {
    use super::{INT8_BLOCK, INT8_HEADER};

    const LANES: usize = 8;

    /// Block header: `(mid, step)`.
    #[inline(always)]
    fn header(h: &[u8]) -> (f32, f32) {
        let mid = f32::from_le_bytes(h[0..4].try_into().unwrap());
        let step = f32::from_le_bytes(h[4..8].try_into().unwrap());
        (mid, step)
    }

    /// Minimum and maximum of a block, or `None` when it holds a NaN or an infinity.
    #[inline(always)]
    fn extremes(x: &[f32]) -> Option<(f32, f32)> {
        let mut lo = [f32::INFINITY; LANES];
        let mut hi = [f32::NEG_INFINITY; LANES];
        // `0 * x` is NaN exactly when x is NaN or infinite; the sum stays ±0 otherwise.
        let mut poison = [0f32; LANES];
        let mut c = x.chunks_exact(LANES);
        for v in &mut c {
            for j in 0..LANES {
                lo[j] = if v[j] < lo[j] { v[j] } else { lo[j] };
                hi[j] = if v[j] > hi[j] { v[j] } else { hi[j] };
                poison[j] += v[j] * 0.0;
            }
        }
        for (j, &v) in c.remainder().iter().enumerate() {
            lo[j] = if v < lo[j] { v } else { lo[j] };
            hi[j] = if v > hi[j] { v } else { hi[j] };
            poison[j] += v * 0.0;
        }
        if poison.iter().any(|p| p.is_nan()) {
            return None;
        }
        Some(fold_lanes(&lo, &hi))
    }

    /// The block's `(min, max)` from per-lane minima and maxima of finite values. Which zero
    /// a lane kept depends on the lane order; the header must not, so zeros come out `+0`.
    #[inline(always)]
    fn fold_lanes(lo: &[f32], hi: &[f32]) -> (f32, f32) {
        let min = lo
            .iter()
            .fold(f32::INFINITY, |a, &b| if b < a { b } else { a });
        let max = hi
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        (min + 0.0, max + 0.0)
    }

    /// A block holding a NaN or an infinity: NaN header, every code 0.
    #[inline(always)]
    fn encode_non_finite(out: &mut [u8]) {
        let (h, codes) = out.split_at_mut(INT8_HEADER);
        h[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        h[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        codes.fill(0);
    }

    /// Write a block's header from its extremes (`None`: it holds a NaN or an infinity).
    /// Returns `(mid, 1 / step)` and the codes still to write, or `None` when the header
    /// settles them.
    #[inline(always)]
    fn begin_block(extremes: Option<(f32, f32)>, out: &mut [u8]) -> Option<(f32, f32, &mut [u8])> {
        let Some((min, max)) = extremes else {
            encode_non_finite(out);
            return None;
        };
        // Each term separately: `max - min` can overflow where these cannot.
        let step = max / 255.0 - min / 255.0;
        let mid = min + (max / 2.0 - min / 2.0);
        let (h, codes) = out.split_at_mut(INT8_HEADER);
        h[0..4].copy_from_slice(&mid.to_le_bytes());
        h[4..8].copy_from_slice(&step.to_le_bytes());
        if step == 0.0 {
            // Constant (or a range below f32's resolution for a step): every code decodes
            // as `mid - 127.5 * 0`.
            codes.fill(0);
            return None;
        }
        Some((mid, 1.0 / step, codes))
    }

    #[inline(always)]
    fn encode_block(x: &[f32], out: &mut [u8]) {
        let Some((mid, inv, codes)) = begin_block(extremes(x), out) else {
            return;
        };
        // |x - mid| <= (max - min) / 2, so nothing overflows unless `step` is so small that
        // `inv` does (then the clamp below still holds: max/min turn NaN into 0).
        for (q, &v) in codes.iter_mut().zip(x) {
            // Not `clamp`: it keeps NaN, and NaN must not reach the conversion below.
            #[allow(clippy::manual_clamp)]
            let t = ((v - mid) * inv + 128.0).max(0.0).min(255.0);
            // SAFETY: `t` lies in 0.0..=255.0 (the clamp maps NaN to 0.0), which i32 holds.
            // The unchecked conversion vectorises; Rust's saturating `as` does not.
            *q = unsafe { t.to_int_unchecked::<i32>() } as u8;
        }
    }

    #[inline(always)]
    fn encode_generic(src: &[f32], dst: &mut [u8]) {
        for (x, out) in src
            .chunks(INT8_BLOCK)
            .zip(dst.chunks_mut(INT8_BLOCK + INT8_HEADER))
        {
            encode_block(x, out);
        }
    }

    #[inline(always)]
    fn decode_generic(src: &[u8], dst: &mut [f32]) {
        for (b, out) in src
            .chunks(INT8_BLOCK + INT8_HEADER)
            .zip(dst.chunks_mut(INT8_BLOCK))
        {
            let (mid, step) = header(b);
            for (y, &q) in out.iter_mut().zip(&b[INT8_HEADER..]) {
                *y = mid + (f32::from(q) - 127.5) * step;
            }
        }
    }

    #[inline(always)]
    fn decode_add_generic(src: &[u8], acc: &mut [f32]) {
        for (b, out) in src
            .chunks(INT8_BLOCK + INT8_HEADER)
            .zip(acc.chunks_mut(INT8_BLOCK))
        {
            let (mid, step) = header(b);
            for (y, &q) in out.iter_mut().zip(&b[INT8_HEADER..]) {
                *y += mid + (f32::from(q) - 127.5) * step;
            }
        }
    }

    macro_rules! dispatched {
        ($($name:ident, $avx2:ident, $generic:ident: ($s:ident: $S:ty, $d:ident: $D:ty);)*) => {$(
            /// # Safety
            /// The CPU must support AVX2.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            unsafe fn $avx2($s: $S, $d: $D) {
                $generic($s, $d)
            }

            #[inline(never)]
            pub(super) fn $name($s: $S, $d: $D) {
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the AVX2 build only requires AVX2, which the CPU has (checked
                    // just above).
                    return unsafe { $avx2($s, $d) };
                }
                $generic($s, $d)
            }
        )*};
    }

    #[inline(never)]
    pub(super) fn encode(src: &[f32], dst: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the AVX2 build only requires AVX2, which the CPU has (checked just
            // above).
            return unsafe { avx2::encode(src, dst) };
        }
        encode_generic(src, dst)
    }

    /// Decode; with `stream`, a large result nobody reads back at once (see
    /// [`avx2::decode`]).
    #[inline(never)]
    pub(super) fn decode(src: &[u8], dst: &mut [f32], stream: bool) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the AVX2 build only requires AVX2, which the CPU has (checked just
            // above).
            return unsafe { avx2::decode(src, dst, stream) };
        }
        let _ = stream;
        decode_generic(src, dst)
    }

    dispatched! {
        decode_add, decode_add_avx2, decode_add_generic: (src: &[u8], acc: &mut [f32]);
    }

    /// Hand-written AVX2 builds of the block kernels. The compiler's vectorisation of the
    /// portable code kept the non-finite check in scalar registers; these produce the same bits (the same operations in the same order per
    /// element; only the order of the min/max lanes differs, and the header drops the sign of
    /// a zero extreme) and are checked against the portable code in the tests.
    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use super::{INT8_BLOCK, INT8_HEADER};
        use std::arch::x86_64::*;

        /// Minimum and maximum of 256 elements, or `None` when one is NaN or infinite.
        ///
        /// # Safety
        /// The CPU must support AVX2; `x` holds [`INT8_BLOCK`] elements.
        #[target_feature(enable = "avx2")]
        unsafe fn extremes(x: &[f32]) -> Option<(f32, f32)> {
            debug_assert_eq!(x.len(), INT8_BLOCK);
            let p = x.as_ptr();
            let zero = _mm256_setzero_ps();
            let mut lo = [_mm256_set1_ps(f32::INFINITY); 4];
            let mut hi = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
            let mut bad = zero;
            for i in (0..INT8_BLOCK).step_by(32) {
                for k in 0..4 {
                    // SAFETY: i + 8k + 8 <= INT8_BLOCK = x.len().
                    let v = unsafe { _mm256_loadu_ps(p.add(i + 8 * k)) };
                    lo[k] = _mm256_min_ps(v, lo[k]);
                    hi[k] = _mm256_max_ps(v, hi[k]);
                    // `0 * v` is NaN exactly when v is NaN or infinite.
                    let z = _mm256_mul_ps(v, zero);
                    bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_UNORD_Q>(z, z));
                }
            }
            if _mm256_movemask_ps(bad) != 0 {
                return None;
            }
            let lo = _mm256_min_ps(_mm256_min_ps(lo[0], lo[1]), _mm256_min_ps(lo[2], lo[3]));
            let hi = _mm256_max_ps(_mm256_max_ps(hi[0], hi[1]), _mm256_max_ps(hi[2], hi[3]));
            let mut l = [0f32; 8];
            let mut h = [0f32; 8];
            // SAFETY: both arrays hold 8 f32.
            unsafe {
                _mm256_storeu_ps(l.as_mut_ptr(), lo);
                _mm256_storeu_ps(h.as_mut_ptr(), hi);
            }
            Some(super::fold_lanes(&l, &h))
        }

        /// # Safety
        /// The CPU must support AVX2; `x` holds [`INT8_BLOCK`] elements and `out`
        /// `INT8_HEADER + INT8_BLOCK` bytes.
        #[target_feature(enable = "avx2")]
        unsafe fn encode_full_block(x: &[f32], out: &mut [u8]) {
            debug_assert_eq!(out.len(), INT8_HEADER + INT8_BLOCK);
            // SAFETY: the caller's guarantees.
            let Some((mid, inv, codes)) = super::begin_block(unsafe { extremes(x) }, out) else {
                return;
            };
            let (vmid, vinv) = (_mm256_set1_ps(mid), _mm256_set1_ps(inv));
            let (c128, c255, zero) = (
                _mm256_set1_ps(128.0),
                _mm256_set1_ps(255.0),
                _mm256_setzero_ps(),
            );
            // packus interleaves the 128-bit halves; this puts the 32 codes back in order.
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            let (p, q) = (x.as_ptr(), codes.as_mut_ptr());
            for i in (0..INT8_BLOCK).step_by(32) {
                let mut w = [_mm256_setzero_si256(); 4];
                for (k, w) in w.iter_mut().enumerate() {
                    // SAFETY: i + 8k + 8 <= INT8_BLOCK = x.len().
                    let v = unsafe { _mm256_loadu_ps(p.add(i + 8 * k)) };
                    let t = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(v, vmid), vinv), c128);
                    // max(t, 0) gives 0 for a NaN t, as f32::max does.
                    let t = _mm256_min_ps(_mm256_max_ps(t, zero), c255);
                    *w = _mm256_cvttps_epi32(t);
                }
                let words = _mm256_packus_epi32(w[0], w[1]);
                let bytes = _mm256_packus_epi16(words, _mm256_packus_epi32(w[2], w[3]));
                let bytes = _mm256_permutevar8x32_epi32(bytes, order);
                // SAFETY: i + 32 <= INT8_BLOCK = codes.len().
                unsafe { _mm256_storeu_si256(q.add(i) as *mut __m256i, bytes) };
            }
        }

        /// Decode into `dst`; with `stream`, through non-temporal stores when `dst` is
        /// 16-byte aligned (whole blocks, 1 KiB each, then start aligned alike): the result
        /// is not read into the cache first, which halves the memory traffic of writing a
        /// large buffer that nobody reads back at once.
        ///
        /// # Safety
        /// The CPU must support AVX2.
        #[target_feature(enable = "avx2")]
        pub(in super::super) unsafe fn decode(src: &[u8], dst: &mut [f32], stream: bool) {
            let align = dst.as_ptr() as usize;
            // 0: plain stores; 1: two 16-byte streaming stores; 2: one 32-byte one.
            let stream = match (stream, align % 32, align % 16) {
                (true, 0, _) => 2,
                (true, _, 0) => 1,
                _ => 0,
            };
            let c = _mm256_set1_ps(127.5);
            for (b, out) in src
                .chunks(INT8_BLOCK + INT8_HEADER)
                .zip(dst.chunks_mut(INT8_BLOCK))
            {
                if out.len() < INT8_BLOCK {
                    super::decode_generic(b, out);
                    continue;
                }
                let (mid, step) = super::header(b);
                let (vmid, vstep) = (_mm256_set1_ps(mid), _mm256_set1_ps(step));
                let (q, y) = (b[INT8_HEADER..].as_ptr(), out.as_mut_ptr());
                for i in (0..INT8_BLOCK).step_by(8) {
                    // SAFETY: a whole block: i + 8 <= INT8_BLOCK codes and elements.
                    let codes = unsafe { _mm_loadl_epi64(q.add(i) as *const __m128i) };
                    let v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
                    // `mid + (q - 127.5) * step`, in the portable code's operand order.
                    let v = _mm256_add_ps(vmid, _mm256_mul_ps(_mm256_sub_ps(v, c), vstep));
                    // SAFETY: as above; a streaming store's address is aligned as it
                    // requires: `out` lies a whole number of 1 KiB blocks after `dst`.
                    unsafe {
                        match stream {
                            2 => _mm256_stream_ps(y.add(i), v),
                            1 => {
                                _mm_stream_ps(y.add(i), _mm256_castps256_ps128(v));
                                _mm_stream_ps(y.add(i + 4), _mm256_extractf128_ps::<1>(v));
                            }
                            _ => _mm256_storeu_ps(y.add(i), v),
                        }
                    }
                }
            }
            if stream != 0 {
                // Non-temporal stores are weakly ordered: make them visible before whatever
                // tells another thread the result is there.
                _mm_sfence();
            }
        }

        /// # Safety
        /// The CPU must support AVX2.
        #[target_feature(enable = "avx2")]
        pub(in super::super) unsafe fn encode(src: &[f32], dst: &mut [u8]) {
            for (x, out) in src
                .chunks(INT8_BLOCK)
                .zip(dst.chunks_mut(INT8_BLOCK + INT8_HEADER))
            {
                if x.len() == INT8_BLOCK {
                    // SAFETY: AVX2 (the caller's guarantee) and a whole block.
                    unsafe { encode_full_block(x, out) };
                } else {
                    super::encode_block(x, out);
                }
            }
        }
    }

    #[cfg(test)]
    type Kernels = (
        fn(&[f32], &mut [u8]),
        fn(&[u8], &mut [f32]),
        fn(&[u8], &mut [f32]),
    );

    /// The portable builds (encode, decode, decode-and-add), for tests that compare them with
    /// the dispatched ones.
    #[cfg(test)]
    pub(super) fn portable() -> Kernels {
        (
            |s, d| encode_generic(s, d),
            |s, d| decode_generic(s, d),
            |s, d| decode_add_generic(s, d),
        )
    }
}

/// Throughput of the encode and decode kernels on `bytes` of float32, in GB/s (GB = 1e9,
/// counted as the float32 bytes), best of `reps`, beside memcpy for scale.
pub fn measure_throughput(bytes: usize, reps: usize) -> Vec<(String, f64)> {
    use std::time::Instant;
    let n = bytes / 4;
    let src: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 10007) as f32 * 0.37 - 1500.0)
        .collect();
    let mut out = vec![0f32; n];
    let best = |f: &mut dyn FnMut()| {
        f();
        (0..reps.max(1))
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let gbps = |secs: f64| bytes as f64 / secs / 1e9;
    let mut rows = vec![(
        "memcpy f32".to_string(),
        gbps(best(&mut || {
            out.copy_from_slice(std::hint::black_box(&src))
        })),
    )];
    for z in [Compression::Bf16, Compression::Fp16, Compression::Int8] {
        let mut wire = vec![0u8; z.encoded_len(n)];
        let enc = best(&mut || z.encode(std::hint::black_box(&src), &mut wire));
        let dec = best(&mut || z.decode(std::hint::black_box(&wire), &mut out));
        let add = best(&mut || z.decode_add(std::hint::black_box(&wire), &mut out));
        rows.push((format!("encode {z}"), gbps(enc)));
        rows.push((format!("decode {z}"), gbps(dec)));
        rows.push((format!("decode+add {z}"), gbps(add)));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(z: Compression, x: &[f32]) -> Vec<f32> {
        let mut wire = vec![0u8; z.encoded_len(x.len())];
        z.encode(x, &mut wire);
        let mut y = vec![0f32; x.len()];
        z.decode(&wire, &mut y);
        y
    }

    fn assert_within_bound(z: Compression, x: &[f32]) {
        let y = round_trip(z, x);
        let block = if z == Compression::Int8 {
            INT8_BLOCK
        } else {
            x.len().max(1)
        };
        for (bi, (xb, yb)) in x.chunks(block).zip(y.chunks(block)).enumerate() {
            for (i, ((a, b), bound)) in xb.iter().zip(yb).zip(z.error_bound(xb)).enumerate() {
                if let Some(bound) = bound {
                    assert!(
                        (a - b).abs() <= bound,
                        "{z}: element {} of block {bi}: {a} decoded as {b}, off by {} > {bound}",
                        i,
                        (a - b).abs()
                    );
                }
            }
        }
    }

    #[test]
    fn lengths() {
        assert_eq!(Compression::Int8.encoded_len(0), 0);
        assert_eq!(Compression::Int8.encoded_len(1), 9);
        assert_eq!(Compression::Int8.encoded_len(256), 264);
        assert_eq!(Compression::Int8.encoded_len(257), 273);
        assert_eq!(Compression::Bf16.encoded_len(3), 6);
        assert_eq!(Compression::None.encoded_len(3), 12);
        for z in Compression::ALL {
            for n in [0, 1, 2, 255, 256, 257, 511, 512, 513, 1000] {
                assert_eq!(z.decoded_len(z.encoded_len(n)), Some(n), "{z} {n}");
            }
        }
        assert_eq!(Compression::Int8.decoded_len(264 + 8), None);
        assert_eq!(Compression::Int8.decoded_len(5), None);
        assert_eq!(Compression::Bf16.decoded_len(3), None);
        assert_eq!(Compression::Int8.elems_before(528), Some(512));
        assert_eq!(Compression::Int8.elems_before(9), None);
        assert_eq!(Compression::Fp16.elems_before(10), Some(5));
    }

    #[test]
    fn parse_names() {
        for z in Compression::ALL {
            assert_eq!(Compression::parse(z.name()).unwrap(), z);
            assert_eq!(Compression::from_u8(z as u8), Some(z));
        }
        assert_eq!(Compression::parse("INT8").unwrap(), Compression::Int8);
        assert!(Compression::parse("int4")
            .unwrap_err()
            .message
            .contains("int4"));
        assert!(Compression::Int8.applies_to(DType::F64));
        assert!(!Compression::Int8.applies_to(DType::F16));
        assert!(Compression::None.applies_to(DType::I8));
    }

    #[test]
    fn every_length_and_offset_within_bound() {
        let data: Vec<f32> = (0..3 * INT8_BLOCK + 9)
            .map(|i| ((i * 37) % 101) as f32 * 0.731 - 20.0)
            .collect();
        for z in Compression::ALL {
            for len in [0, 1, 7, 8, 9, 255, 256, 257, 511, 513, 3 * INT8_BLOCK + 1] {
                for off in [0, 1, 3] {
                    assert_within_bound(z, &data[off..off + len]);
                }
            }
        }
    }

    #[test]
    fn exact_cases() {
        // Constant and all-zero blocks, and values each format holds exactly.
        for z in Compression::ALL {
            for x in [vec![0.0f32; 300], vec![-3.5f32; 257], vec![1.0f32; 1]] {
                assert_eq!(round_trip(z, &x), x, "{z}");
            }
        }
        let ints: Vec<f32> = (0..256).map(|i| i as f32).collect();
        assert_eq!(round_trip(Compression::Int8, &ints), ints);
        let mut two = vec![-1.0f32; 256];
        two[100] = 1.0;
        assert_eq!(round_trip(Compression::Int8, &two), two);
        // Negative zero never changes the header, so both zeros encode the same bytes.
        let mut a = vec![0u8; 9];
        let mut b = vec![0u8; 9];
        Compression::Int8.encode(&[-0.0], &mut a);
        Compression::Int8.encode(&[0.0], &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn non_finite_blocks() {
        let mut x: Vec<f32> = (0..600).map(|i| i as f32).collect();
        x[10] = f32::NAN;
        x[300] = f32::INFINITY;
        let y = round_trip(Compression::Int8, &x);
        // Blocks 0 and 1 held a non-finite value and decode as NaN; block 2 is unaffected.
        assert!(y[..512].iter().all(|v| v.is_nan()));
        assert!(y[512..].iter().all(|v| v.is_finite()));
        assert_within_bound(Compression::Int8, &x[512..]);
        for z in [Compression::Bf16, Compression::Fp16] {
            let y = round_trip(z, &x);
            assert!(y[10].is_nan());
            assert_eq!(y[300], f32::INFINITY);
            assert_eq!(round_trip(z, &[f32::NEG_INFINITY]), [f32::NEG_INFINITY]);
        }
        // fp16 overflows to infinity beyond its range.
        assert_eq!(round_trip(Compression::Fp16, &[1e6]), [f32::INFINITY]);
    }

    #[test]
    fn extreme_ranges_do_not_overflow() {
        let x = [f32::MAX, -f32::MAX, 0.0, 1e38, -1e38];
        let y = round_trip(Compression::Int8, &x);
        assert!(y.iter().all(|v| v.is_finite()), "{y:?}");
        assert_within_bound(Compression::Int8, &x);
        let tiny = [
            f32::MIN_POSITIVE,
            0.0,
            f32::from_bits(1),
            -f32::from_bits(3),
        ];
        assert_within_bound(Compression::Int8, &tiny);
    }

    #[test]
    fn decode_add_is_decode_then_add() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.1).sin() * 50.0).collect();
        let base: Vec<f32> = (0..1000).map(|i| i as f32 * 0.01).collect();
        for z in Compression::ALL {
            let mut wire = vec![0u8; z.encoded_len(x.len())];
            z.encode(&x, &mut wire);
            let mut dec = vec![0f32; x.len()];
            z.decode(&wire, &mut dec);
            let mut acc = base.clone();
            z.decode_add(&wire, &mut acc);
            for ((a, b), d) in acc.iter().zip(&base).zip(&dec) {
                assert_eq!(a.to_bits(), (b + d).to_bits(), "{z}");
            }
        }
    }

    #[test]
    fn f64_goes_through_f32() {
        let x: Vec<f64> = (0..5000).map(|i| i as f64 * 1.000000001 - 77.0).collect();
        for z in Compression::ALL {
            let mut wire = vec![0u8; z.encoded_len(x.len())];
            z.encode_f64(&x, &mut wire);
            let as32: Vec<f32> = x.iter().map(|v| *v as f32).collect();
            let mut wire32 = vec![0u8; z.encoded_len(x.len())];
            z.encode(&as32, &mut wire32);
            assert_eq!(wire, wire32, "{z}");
            let mut back = vec![0f64; x.len()];
            z.decode_f64(&wire, &mut back);
            let mut back32 = vec![0f32; x.len()];
            z.decode(&wire, &mut back32);
            assert!(back.iter().zip(&back32).all(|(a, b)| *a == f64::from(*b)));
        }
    }

    #[test]
    fn byte_forms_match_the_typed_kernels_at_any_alignment() {
        let x: Vec<f64> = (0..5000).map(|i| (i as f64 * 0.013).cos() * 9.0).collect();
        let x32: Vec<f32> = x.iter().map(|v| *v as f32).collect();
        for z in Compression::ALL {
            let mut want = vec![0u8; z.encoded_len(x.len())];
            z.encode(&x32, &mut want);
            let mut back = vec![0f32; x.len()];
            z.decode(&want, &mut back);
            for (dtype, raw) in [
                (DType::F32, bytemuck::cast_slice::<f32, u8>(&x32).to_vec()),
                (DType::F64, bytemuck::cast_slice::<f64, u8>(&x).to_vec()),
            ] {
                // One byte off: never aligned for the direct path.
                let mut buf = vec![0u8; raw.len() + 1];
                buf[1..].copy_from_slice(&raw);
                let mut wire = vec![0u8; want.len()];
                z.encode_bytes(dtype, &buf[1..], &mut wire);
                assert_eq!(wire, want, "{z} {dtype}");
                z.decode_bytes(dtype, &wire, &mut buf[1..]);
                for (i, e) in buf[1..].chunks_exact(dtype.size()).enumerate() {
                    let v = match dtype {
                        DType::F64 => f64::from_le_bytes(e.try_into().unwrap()),
                        _ => f64::from(f32::from_le_bytes(e.try_into().unwrap())),
                    };
                    assert_eq!(v, f64::from(back[i]), "{z} {dtype} element {i}");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "take 273 bytes as int8")]
    fn wrong_length_panics() {
        Compression::Int8.encode(&[0.0; 257], &mut [0u8; 272]);
    }

    /// The dispatched int8 encoder (hand-written AVX2 on x86-64) writes the portable
    /// build's bits for blocks the random cases rarely hit: non-finite values anywhere in
    /// the block, zeros of both signs, constants, ranges too small or too large for a step.
    #[test]
    fn int8_builds_agree_on_special_blocks() {
        let (enc, dec, _) = int8::portable();
        let base: Vec<f32> = (0..INT8_BLOCK)
            .map(|i| ((i * 29) % 97) as f32 * 0.37 - 11.0)
            .collect();
        let mut cases: Vec<Vec<f32>> = vec![
            vec![0.0; INT8_BLOCK],
            vec![-0.0; INT8_BLOCK],
            vec![7.25; INT8_BLOCK],
            (0..INT8_BLOCK)
                .map(|i| if i % 2 == 0 { 0.0 } else { -0.0 })
                .collect(),
            (0..INT8_BLOCK)
                .map(|i| i as f32 * f32::MIN_POSITIVE)
                .collect(),
            (0..INT8_BLOCK)
                .map(|i| if i % 3 == 0 { f32::MAX } else { -f32::MAX })
                .collect(),
            (0..INT8_BLOCK)
                .map(|i| 1.0 + i as f32 * f32::EPSILON)
                .collect(),
            (0..INT8_BLOCK).map(|i| -(i as f32) * 1e-45).collect(),
        ];
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 1, 7, 8, 100, 248, 255] {
                let mut x = base.clone();
                x[at] = bad;
                cases.push(x);
            }
        }
        for (k, x) in cases.iter().enumerate() {
            // Whole blocks, a whole block and a tail, and a tail alone.
            for x in [
                x.clone(),
                [x.as_slice(), &x[..37]].concat(),
                x[..37].to_vec(),
            ] {
                let z = Compression::Int8;
                let mut a = vec![0u8; z.encoded_len(x.len())];
                let mut b = a.clone();
                z.encode(&x, &mut a);
                enc(&x, &mut b);
                assert_eq!(a, b, "case {k}, {} elements", x.len());
                let mut want = vec![0f32; x.len()];
                dec(&a, &mut want);
                let mut got = vec![0f32; x.len() + 4];
                for skip in [0, 1, 4] {
                    let y = &mut got[skip..skip + x.len()];
                    z.decode(&a, y);
                    assert!(y.iter().zip(&want).all(|(p, q)| p.to_bits() == q.to_bits()));
                    z.decode_result_bytes(DType::F32, &a, bytemuck::cast_slice_mut(y));
                    assert!(y.iter().zip(&want).all(|(p, q)| p.to_bits() == q.to_bits()));
                }
            }
        }
    }

    proptest! {
        #[test]
        fn int8_bound_and_builds_agree(
            x in proptest::collection::vec(-1e6f32..1e6f32, 0..700),
            scale in prop_oneof![Just(1.0f32), Just(1e-30f32), Just(1e30f32)],
        ) {
            let x: Vec<f32> = x.iter().map(|v| v * scale).collect();
            for z in Compression::ALL {
                assert_within_bound(z, &x);
            }
            // The dispatched (possibly AVX2) build and the portable one produce the same bits.
            let z = Compression::Int8;
            let (enc, dec, add) = int8::portable();
            let mut a = vec![0u8; z.encoded_len(x.len())];
            let mut b = a.clone();
            z.encode(&x, &mut a);
            enc(&x, &mut b);
            prop_assert_eq!(&a, &b);
            let mut ya = vec![0f32; x.len()];
            let mut yb = ya.clone();
            z.decode(&a, &mut ya);
            dec(&a, &mut yb);
            prop_assert!(ya.iter().zip(&yb).all(|(p, q)| p.to_bits() == q.to_bits()));
            // Streaming stores, at each alignment a float buffer can have.
            let mut big = vec![0f32; x.len() + 8];
            for skip in 0..8 {
                let y = &mut big[skip..skip + x.len()];
                z.decode_result_bytes(DType::F32, &a, bytemuck::cast_slice_mut(y));
                prop_assert!(y.iter().zip(&yb).all(|(p, q)| p.to_bits() == q.to_bits()));
            }
            z.decode_add(&a, &mut ya);
            add(&a, &mut yb);
            prop_assert!(ya.iter().zip(&yb).all(|(p, q)| p.to_bits() == q.to_bits()));
        }
    }
}

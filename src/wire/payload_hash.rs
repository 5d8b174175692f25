//! The universal hash under every frame tag: NH over 512-byte blocks, then POLYVAL (RFC 8452)
//! over NH's outputs.
//!
//! A tag is a keyed-blake3 PRF over the frame counter, the header and this hash of the payload
//! (the header in the PRF input carries the payload's length). The hash:
//!
//! 1. the payload is zero-padded to a multiple of 64 bytes and cut into blocks of 512 bytes
//!    (the last one shorter when the payload is), read as little-endian 32-bit words `m`;
//! 2. each block goes through NH twice, with the key `K` (130 words) and with `K` shifted by
//!    one pair of words (the Toeplitz construction), `NH_K(m) = Σ_i (m[2i] + K[2i]) ·
//!    (m[2i+1] + K[2i+1])` with the additions mod 2^32 and the sum mod 2^64; the two sums, as
//!    little-endian u64s, make one 16-byte value;
//! 3. the digest is `POLYVAL_H` over those values in order.
//!
//! This is the two-layer shape of UMAC and VMAC, with NH as the UMAC paper defines its Toeplitz
//! form (Black, Halevi, Krawczyk, Krovetz, Rogaway, "UMAC: fast and secure message
//! authentication", 1999: adjacent pairs, the key shifted by one pair per pass; RFC 4418's NH
//! pairs `m[i]` with `m[i+4]` and shifts by four words, so its vectors do not apply here). For
//! two different payloads of one length, NH applied twice collides on a block where they
//! differ with probability at most 2^-64 (NH is 2^-32-almost-universal on equal-length
//! inputs, 2^-64 for two Toeplitz passes); if the NH values differ, POLYVAL under an
//! independent `H` collides with probability at most `s / 2^128` for `s` values (at most
//! 2^17 for the largest frame, 64 MiB). The PRF hides every hash value it is given, so a forger
//! succeeds per try with at most about 2^-64 plus blake3's own ("hash, then PRF"); a failed
//! try closes the connection. A hash value is no content identifier and must never leave
//! the process: values of known payloads reveal key material.
//!
//! NH costs two 32×32→64-bit multiplies per 8 payload bytes and no carry-less products: its
//! SIMD kernels here (AVX-512 or AVX2, chosen at run time) run faster than the fastest POLYVAL
//! kernel on AVX-512 CPUs and several times faster than POLYVAL on CPUs without VPCLMULQDQ
//! (BENCHMARKS.md §8). POLYVAL then sees one 16-byte value per 512 payload bytes: a four-lane
//! carry-less kernel where the CPU has AVX-512 and VPCLMULQDQ, the `polyval` crate elsewhere.
//! The portable NH kernel is the definition the SIMD ones are tested against bit for bit, the
//! crate the POLYVAL kernel.

use std::sync::{Arc, OnceLock};

use polyval::universal_hash::UniversalHash;
use polyval::Polyval;

/// Bytes of a hash value.
pub const BLOCK: usize = 16;

/// A payload hash value.
pub type Digest = [u8; BLOCK];

/// Payload bytes per NH block.
const NH_BLOCK: usize = 512;
/// The payload is zero-padded to a multiple of this many bytes (one AVX-512 vector).
const PAD: usize = 64;
/// Words of the NH key: one block's worth and one pair more for the shifted second pass.
const NH_KEY_WORDS: usize = NH_BLOCK / 4 + 2;
/// Values the POLYVAL kernel folds per reduction.
const GROUP: usize = 64;
/// NH blocks hashed before their values go to POLYVAL together: one POLYVAL group.
const BATCH: usize = GROUP;

/// Which code computes NH.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Avx512,
    Avx2,
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    fn best() -> Kernel {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            if simd::has_avx512() {
                Kernel::Avx512
            } else if simd::has_avx2() {
                Kernel::Avx2
            } else {
                Kernel::Portable
            }
        })
    }

    /// Whether this CPU runs the kernel.
    fn available(self) -> bool {
        match self {
            Kernel::Avx512 => simd::has_avx512(),
            Kernel::Avx2 => simd::has_avx2(),
            Kernel::Portable => true,
        }
    }
}

/// The hash's keys: NH's words and POLYVAL's `H`.
pub struct PayloadKey {
    nh: [u32; NH_KEY_WORDS],
    h: [u8; BLOCK],
    kernel: Kernel,
    /// `H^GROUP, …, H^2, H^1` (powers in POLYVAL's product), one block each, where the
    /// POLYVAL kernel runs (with the AVX-512 NH kernel).
    powers: Option<Box<[u8; GROUP * BLOCK]>>,
}

impl std::fmt::Debug for PayloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PayloadKey(..)")
    }
}

impl PayloadKey {
    /// The keys expanded from a 32-byte secret (blake3 in key-derivation mode, extended
    /// output: `H`, then NH's words little-endian).
    pub fn derive(seed: &[u8; 32]) -> Arc<PayloadKey> {
        Self::with_kernel(seed, Kernel::best())
    }

    /// As [`PayloadKey::derive`], hashing with each kernel this CPU runs, fastest first (to
    /// compare them: every kernel computes the same function).
    pub fn derive_each_kernel(seed: &[u8; 32]) -> Vec<Arc<PayloadKey>> {
        [Kernel::Avx512, Kernel::Avx2, Kernel::Portable]
            .into_iter()
            .filter(|k| k.available())
            .map(|k| Self::with_kernel(seed, k))
            .collect()
    }

    fn with_kernel(seed: &[u8; 32], kernel: Kernel) -> Arc<PayloadKey> {
        let mut bytes = [0u8; BLOCK + 4 * NH_KEY_WORDS];
        blake3::Hasher::new_derive_key("mapreduce 2026 frame payload hash v2")
            .update(seed)
            .finalize_xof()
            .fill(&mut bytes);
        let (h, words) = bytes.split_at(BLOCK);
        let mut nh = [0u32; NH_KEY_WORDS];
        for (k, w) in nh.iter_mut().zip(words.chunks_exact(4)) {
            *k = u32::from_le_bytes(w.try_into().expect("4 bytes"));
        }
        let h: [u8; BLOCK] = h.try_into().expect("16 bytes");
        let powers = (kernel == Kernel::Avx512 && clmul::available()).then(|| {
            // SAFETY: `available` checked the CPU features the kernel is compiled for.
            Box::new(unsafe { clmul::powers(&h) })
        });
        Arc::new(PayloadKey {
            nh,
            h,
            kernel,
            powers,
        })
    }

    /// Which kernel hashes under this key.
    pub fn kernel(&self) -> &'static str {
        match self.kernel {
            Kernel::Avx512 if self.powers.is_some() => "nh-avx512+vpclmulqdq",
            Kernel::Avx512 => "nh-avx512",
            Kernel::Avx2 => "nh-avx2",
            Kernel::Portable => "nh-portable",
        }
    }

    /// NH's two sums of each block of `data` into `out` (16 bytes per block): every block
    /// 512 bytes but the last, which may be shorter (a multiple of [`PAD`]).
    fn nh(&self, data: &[u8], out: &mut [u8]) {
        debug_assert_eq!(data.len() % PAD, 0);
        debug_assert_eq!(out.len(), data.len().div_ceil(NH_BLOCK) * BLOCK);
        match self.kernel {
            // SAFETY: a key gets a SIMD kernel only where `Kernel::best` (or a test, through
            // `Kernel::available`) found the CPU features it is compiled for.
            Kernel::Avx512 => unsafe { simd::nh_avx512(&self.nh, data, out) },
            // SAFETY: as above.
            Kernel::Avx2 => unsafe { simd::nh_avx2(&self.nh, data, out) },
            Kernel::Portable => nh_portable(&self.nh, data, out),
        }
    }
}

/// Keys are equal when they hash alike (a digest computed under one serves the other).
impl PartialEq for PayloadKey {
    fn eq(&self, other: &PayloadKey) -> bool {
        self.h == other.h && self.nh == other.nh
    }
}

impl Eq for PayloadKey {}

/// NH, the definition: the two Toeplitz sums of each block, little-endian, into `out`.
fn nh_portable(key: &[u32; NH_KEY_WORDS], data: &[u8], out: &mut [u8]) {
    for (block, o) in data.chunks(NH_BLOCK).zip(out.chunks_exact_mut(BLOCK)) {
        let mut sums = [0u64; 2];
        for (i, pair) in block.chunks_exact(8).enumerate() {
            let a = u32::from_le_bytes(pair[..4].try_into().expect("4 bytes"));
            let b = u32::from_le_bytes(pair[4..].try_into().expect("4 bytes"));
            for (t, sum) in sums.iter_mut().enumerate() {
                let x = a.wrapping_add(key[2 * i + 2 * t]) as u64;
                let y = b.wrapping_add(key[2 * i + 1 + 2 * t]) as u64;
                *sum = sum.wrapping_add(x * y);
            }
        }
        o[..8].copy_from_slice(&sums[0].to_le_bytes());
        o[8..].copy_from_slice(&sums[1].to_le_bytes());
    }
}

/// The hash of the whole of `bytes`.
pub fn digest(key: &Arc<PayloadKey>, bytes: &[u8]) -> Digest {
    let mut h = PayloadHasher::new(key.clone());
    h.update(bytes);
    h.finish()
}

/// The hash over bytes fed in pieces of any size.
#[derive(Clone)]
pub struct PayloadHasher {
    key: Arc<PayloadKey>,
    /// POLYVAL over the NH values of the whole blocks so far.
    poly: Poly,
    /// Bytes of a block not yet whole.
    pending: [u8; NH_BLOCK],
    pending_len: usize,
}

impl PayloadHasher {
    pub fn new(key: Arc<PayloadKey>) -> PayloadHasher {
        PayloadHasher {
            poly: match key.powers {
                Some(_) => Poly::Fast([0; BLOCK]),
                None => Poly::Crate(Polyval::new(&key.h.into())),
            },
            key,
            pending: [0; NH_BLOCK],
            pending_len: 0,
        }
    }

    pub fn key(&self) -> &Arc<PayloadKey> {
        &self.key
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        if self.pending_len > 0 {
            let k = (NH_BLOCK - self.pending_len).min(bytes.len());
            self.pending[self.pending_len..self.pending_len + k].copy_from_slice(&bytes[..k]);
            self.pending_len += k;
            bytes = &bytes[k..];
            if self.pending_len < NH_BLOCK {
                return;
            }
            absorb(&self.key, &mut self.poly, &self.pending);
            self.pending_len = 0;
        }
        let whole = bytes.len() / NH_BLOCK * NH_BLOCK;
        absorb(&self.key, &mut self.poly, &bytes[..whole]);
        let rest = &bytes[whole..];
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// The hash of every byte fed so far (the last block zero-padded to a multiple of 64).
    pub fn finish(&self) -> Digest {
        let mut poly = self.poly.clone();
        if self.pending_len > 0 {
            let padded = self.pending_len.next_multiple_of(PAD);
            let mut block = [0u8; NH_BLOCK];
            block[..self.pending_len].copy_from_slice(&self.pending[..self.pending_len]);
            let mut value = [0u8; BLOCK];
            self.key.nh(&block[..padded], &mut value);
            poly.absorb(&self.key, &value);
        }
        match poly {
            Poly::Fast(acc) => acc,
            Poly::Crate(p) => p.finalize().into(),
        }
    }
}

/// Fold whole NH blocks into `poly`: NH in batches, then POLYVAL over each batch's values.
fn absorb(key: &PayloadKey, poly: &mut Poly, blocks: &[u8]) {
    debug_assert_eq!(blocks.len() % NH_BLOCK, 0);
    let mut values = [0u8; BATCH * BLOCK];
    for batch in blocks.chunks(BATCH * NH_BLOCK) {
        let out = &mut values[..batch.len() / NH_BLOCK * BLOCK];
        key.nh(batch, out);
        poly.absorb(key, out);
    }
}

/// POLYVAL's running state: the AVX-512 kernel's accumulator, or the crate's.
#[derive(Clone)]
enum Poly {
    Fast(Digest),
    Crate(Polyval),
}

impl Poly {
    /// Fold whole 16-byte values into the state.
    fn absorb(&mut self, key: &PayloadKey, values: &[u8]) {
        debug_assert_eq!(values.len() % BLOCK, 0);
        match self {
            Poly::Fast(acc) => {
                let powers = key.powers.as_ref().expect("fast state has powers");
                // SAFETY: a key has powers only where `clmul::available` found the features.
                *acc = unsafe { clmul::absorb(*acc, powers, values) };
            }
            Poly::Crate(p) => p.update_padded(values),
        }
    }
}

/// The AVX-512 + VPCLMULQDQ kernel of POLYVAL.
#[cfg(target_arch = "x86_64")]
mod clmul {
    use super::{Digest, OnceLock, BLOCK, GROUP};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        static YES: OnceLock<bool> = OnceLock::new();
        *YES.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("vpclmulqdq")
                && std::arch::is_x86_feature_detected!("pclmulqdq")
                && std::arch::is_x86_feature_detected!("avx2")
        })
    }

    /// The 256-bit carry-less product `(hi, lo)` of `a` and `b` reduced to POLYVAL's
    /// `a·b·x^-128 mod x^128 + x^127 + x^126 + x^121 + 1`.
    #[target_feature(enable = "pclmulqdq,sse2")]
    fn reduce(lo: __m128i, hi: __m128i) -> __m128i {
        // Two Montgomery folds of the low half by the field's constant (x^127+x^126+x^121
        // in the high word, in POLYVAL's bit order), each moving it up 64 bits.
        let poly = _mm_set_epi64x(0xc200_0000_0000_0000u64 as i64, 1);
        let t = _mm_clmulepi64_si128(lo, poly, 0x10);
        let lo = _mm_xor_si128(_mm_shuffle_epi32(lo, 0x4e), t);
        let t = _mm_clmulepi64_si128(lo, poly, 0x10);
        let lo = _mm_xor_si128(_mm_shuffle_epi32(lo, 0x4e), t);
        _mm_xor_si128(hi, lo)
    }

    /// `(lo, hi)` of the carry-less product, the middle terms folded in.
    #[target_feature(enable = "pclmulqdq,sse2")]
    fn product(a: __m128i, b: __m128i) -> (__m128i, __m128i) {
        let lo = _mm_clmulepi64_si128(a, b, 0x00);
        let hi = _mm_clmulepi64_si128(a, b, 0x11);
        let mid = _mm_xor_si128(
            _mm_clmulepi64_si128(a, b, 0x10),
            _mm_clmulepi64_si128(a, b, 0x01),
        );
        (
            _mm_xor_si128(lo, _mm_slli_si128(mid, 8)),
            _mm_xor_si128(hi, _mm_srli_si128(mid, 8)),
        )
    }

    #[target_feature(enable = "pclmulqdq,sse2")]
    fn dot(a: __m128i, b: __m128i) -> __m128i {
        let (lo, hi) = product(a, b);
        reduce(lo, hi)
    }

    #[target_feature(enable = "sse2")]
    fn load(b: &[u8]) -> __m128i {
        assert!(b.len() >= BLOCK);
        // SAFETY: 16 readable bytes (checked above); unaligned load.
        unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
    }

    #[target_feature(enable = "sse2")]
    fn store(v: __m128i) -> Digest {
        let mut out = [0u8; BLOCK];
        // SAFETY: `out` is 16 writable bytes; unaligned store.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), v) };
        out
    }

    /// `H^GROUP, …, H^1`.
    #[target_feature(enable = "pclmulqdq,sse2")]
    pub fn powers(h: &Digest) -> [u8; GROUP * BLOCK] {
        let h1 = load(h);
        let mut out = [0u8; GROUP * BLOCK];
        let mut p = h1;
        for i in (0..GROUP).rev() {
            out[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&store(p));
            p = dot(p, h1);
        }
        out
    }

    /// `reduce` on each 128-bit lane of `(lo, hi)`.
    #[target_feature(enable = "avx512f,vpclmulqdq")]
    fn reduce4(lo: __m512i, hi: __m512i) -> __m512i {
        let poly = _mm512_broadcast_i32x4(_mm_set_epi64x(0xc200_0000_0000_0000u64 as i64, 1));
        let t = _mm512_clmulepi64_epi128(lo, poly, 0x10);
        let lo = _mm512_xor_si512(_mm512_shuffle_epi32::<0x4e>(lo), t);
        let t = _mm512_clmulepi64_epi128(lo, poly, 0x10);
        let lo = _mm512_xor_si512(_mm512_shuffle_epi32::<0x4e>(lo), t);
        _mm512_xor_si512(hi, lo)
    }

    /// The state after absorbing whole `blocks` into `acc`.
    ///
    /// Four lane accumulators, one per 128-bit lane: lane `l` holds the blocks at positions
    /// `l mod 4` of every group, each weighted by the power of `H` that takes it to the end
    /// of the group absorbed last, so the hash so far is the XOR of the lanes. A group costs
    /// one multiply of the accumulators by `H^GROUP` and one four-lane reduction; only those
    /// lie on the chain from one group to the next, the products of the group's own blocks
    /// do not, and the lanes are folded together once per call.
    #[target_feature(enable = "avx512f,vpclmulqdq,pclmulqdq,avx2,sse2")]
    pub fn absorb(acc: Digest, powers: &[u8; GROUP * BLOCK], blocks: &[u8]) -> Digest {
        const V: usize = GROUP / 4;
        let mut groups = blocks.chunks_exact(GROUP * BLOCK);
        let mut s = load(&acc);
        if groups.len() > 0 {
            // SAFETY: `powers` is GROUP blocks, V unaligned 64-byte loads.
            let t: [__m512i; V] = std::array::from_fn(|i| unsafe {
                _mm512_loadu_si512(powers[i * 64..].as_ptr().cast())
            });
            // Each power's two halves XORed, for Karatsuba's middle product.
            let tx: [__m512i; V] =
                std::array::from_fn(|i| _mm512_xor_si512(t[i], _mm512_shuffle_epi32::<0x4e>(t[i])));
            let hg = _mm512_broadcast_i32x4(load(&powers[..BLOCK]));
            let mut a = _mm512_zextsi128_si512(s);
            for g in &mut groups {
                // Payloads are often read from memory (a send straight from the caller's
                // buffer): ask for the group after next while this one is folded.
                let ahead = g.as_ptr().wrapping_add(2 * GROUP * BLOCK);
                for k in 0..GROUP * BLOCK / 64 {
                    // A hint: never faults, even past the end of `blocks`.
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(k * 64).cast());
                }
                // SAFETY: `g` is GROUP blocks, V unaligned 64-byte loads.
                let xs: [__m512i; V] = std::array::from_fn(|i| unsafe {
                    _mm512_loadu_si512(g[i * 64..].as_ptr().cast())
                });
                // The group's own products, off the chain: block 4i+l times H^(GROUP-4i-l),
                // Karatsuba's three products each: lo, hi, and (x_lo^x_hi)(t_lo^t_hi), which
                // is mid ^ lo ^ hi.
                let mut lo = _mm512_setzero_si512();
                let mut hi = _mm512_setzero_si512();
                let mut mix = _mm512_setzero_si512();
                for i in 0..V {
                    let xx = _mm512_xor_si512(xs[i], _mm512_shuffle_epi32::<0x4e>(xs[i]));
                    lo = _mm512_xor_si512(lo, _mm512_clmulepi64_epi128(xs[i], t[i], 0x00));
                    hi = _mm512_xor_si512(hi, _mm512_clmulepi64_epi128(xs[i], t[i], 0x11));
                    mix = _mm512_xor_si512(mix, _mm512_clmulepi64_epi128(xx, tx[i], 0x00));
                }
                let mid = _mm512_xor_si512(mix, _mm512_xor_si512(lo, hi));
                // The chain: the accumulators times H^GROUP, then one reduction.
                let alo = _mm512_clmulepi64_epi128(a, hg, 0x00);
                let ahi = _mm512_clmulepi64_epi128(a, hg, 0x11);
                let amid = _mm512_xor_si512(
                    _mm512_clmulepi64_epi128(a, hg, 0x10),
                    _mm512_clmulepi64_epi128(a, hg, 0x01),
                );
                let mid = _mm512_xor_si512(mid, amid);
                let zero = _mm512_setzero_si512();
                // Per lane: mid << 64 into lo, mid >> 64 into hi.
                let lo =
                    _mm512_xor_si512(_mm512_xor_si512(lo, alo), _mm512_unpacklo_epi64(zero, mid));
                let hi =
                    _mm512_xor_si512(_mm512_xor_si512(hi, ahi), _mm512_unpackhi_epi64(mid, zero));
                a = reduce4(lo, hi);
            }
            s = lanes(a);
        }
        let h = load(&powers[(GROUP - 1) * BLOCK..]);
        for b in groups.remainder().chunks_exact(BLOCK) {
            s = dot(_mm_xor_si128(s, load(b)), h);
        }
        store(s)
    }

    /// The XOR of a vector's four 128-bit lanes.
    #[target_feature(enable = "avx512f,avx2,sse2")]
    fn lanes(v: __m512i) -> __m128i {
        let v = _mm256_xor_si256(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
        _mm_xor_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1))
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod clmul {
    use super::{Digest, BLOCK, GROUP};
    pub fn available() -> bool {
        false
    }
    pub unsafe fn powers(_: &Digest) -> [u8; GROUP * BLOCK] {
        unreachable!("no fast kernel on this architecture")
    }
    pub unsafe fn absorb(_: Digest, _: &[u8; GROUP * BLOCK], _: &[u8]) -> Digest {
        unreachable!("no fast kernel on this architecture")
    }
}

/// The SIMD kernels of NH (x86-64).
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{BLOCK, NH_BLOCK, NH_KEY_WORDS, PAD};
    use std::arch::x86_64::*;

    pub fn has_avx512() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    pub fn has_avx2() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
    }

    /// [`super::nh_portable`], 64 payload bytes per step: one vector holds eight pairs, each
    /// pair in a 64-bit lane (`m[2i]` low, `m[2i+1]` high), so adding the key words, shifting
    /// a copy down 32 bits and one unsigned 32×32→64 multiply give eight products.
    #[target_feature(enable = "avx512f")]
    pub fn nh_avx512(key: &[u32; NH_KEY_WORDS], data: &[u8], out: &mut [u8]) {
        debug_assert_eq!(data.len() % PAD, 0);
        const V: usize = NH_BLOCK / 64;
        // The key stays in registers: both passes' words for each vector of a block.
        // SAFETY: the key words 16v..16v+18 lie within the key (v < 8, 130 words); unaligned
        // loads.
        let k0: [__m512i; V] =
            std::array::from_fn(|v| unsafe { _mm512_loadu_si512(key.as_ptr().add(16 * v).cast()) });
        // SAFETY: as above.
        let k1: [__m512i; V] = std::array::from_fn(|v| unsafe {
            _mm512_loadu_si512(key.as_ptr().add(16 * v + 2).cast())
        });
        for (block, o) in data.chunks(NH_BLOCK).zip(out.chunks_exact_mut(BLOCK)) {
            let mut s0 = _mm512_setzero_si512();
            let mut s1 = _mm512_setzero_si512();
            for (v, m) in block.chunks_exact(64).enumerate() {
                // SAFETY: `m` is 64 bytes; unaligned load.
                let m = unsafe { _mm512_loadu_si512(m.as_ptr().cast()) };
                let x = _mm512_add_epi32(m, k0[v]);
                s0 = _mm512_add_epi64(s0, _mm512_mul_epu32(x, _mm512_srli_epi64::<32>(x)));
                let x = _mm512_add_epi32(m, k1[v]);
                s1 = _mm512_add_epi64(s1, _mm512_mul_epu32(x, _mm512_srli_epi64::<32>(x)));
            }
            o[..8].copy_from_slice(&(_mm512_reduce_add_epi64(s0) as u64).to_le_bytes());
            o[8..].copy_from_slice(&(_mm512_reduce_add_epi64(s1) as u64).to_le_bytes());
        }
    }

    /// As [`nh_avx512`] with 32-byte vectors.
    #[target_feature(enable = "avx2")]
    pub fn nh_avx2(key: &[u32; NH_KEY_WORDS], data: &[u8], out: &mut [u8]) {
        debug_assert_eq!(data.len() % PAD, 0);
        for (block, o) in data.chunks(NH_BLOCK).zip(out.chunks_exact_mut(BLOCK)) {
            let mut s0 = _mm256_setzero_si256();
            let mut s1 = _mm256_setzero_si256();
            for (v, m) in block.chunks_exact(32).enumerate() {
                // SAFETY: `m` is 32 bytes; the key words 8v..8v+10 lie within the key
                // (v < 16, 130 words); unaligned loads.
                let (m, k0, k1) = unsafe {
                    (
                        _mm256_loadu_si256(m.as_ptr().cast()),
                        _mm256_loadu_si256(key.as_ptr().add(8 * v).cast()),
                        _mm256_loadu_si256(key.as_ptr().add(8 * v + 2).cast()),
                    )
                };
                let x = _mm256_add_epi32(m, k0);
                s0 = _mm256_add_epi64(s0, _mm256_mul_epu32(x, _mm256_srli_epi64::<32>(x)));
                let x = _mm256_add_epi32(m, k1);
                s1 = _mm256_add_epi64(s1, _mm256_mul_epu32(x, _mm256_srli_epi64::<32>(x)));
            }
            o[..8].copy_from_slice(&sum4(s0).to_le_bytes());
            o[8..].copy_from_slice(&sum4(s1).to_le_bytes());
        }
    }

    /// The wrapping sum of a vector's four u64 lanes.
    #[target_feature(enable = "avx2")]
    fn sum4(v: __m256i) -> u64 {
        let v = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        (_mm_cvtsi128_si64(v) as u64).wrapping_add(_mm_extract_epi64::<1>(v) as u64)
    }
}

/// No SIMD kernels off x86-64: the portable one does the work.
#[cfg(not(target_arch = "x86_64"))]
mod simd {
    use super::NH_KEY_WORDS;
    pub fn has_avx512() -> bool {
        false
    }
    pub fn has_avx2() -> bool {
        false
    }
    pub unsafe fn nh_avx512(_: &[u32; NH_KEY_WORDS], _: &[u8], _: &mut [u8]) {
        unreachable!("no SIMD kernel on this architecture")
    }
    pub unsafe fn nh_avx2(_: &[u32; NH_KEY_WORDS], _: &[u8], _: &mut [u8]) {
        unreachable!("no SIMD kernel on this architecture")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The kernels this CPU runs; the others are named on stderr as not tested here.
    fn kernels() -> Vec<Kernel> {
        let (run, skip): (Vec<_>, Vec<_>) = [Kernel::Avx512, Kernel::Avx2, Kernel::Portable]
            .into_iter()
            .partition(|k| k.available());
        if !skip.is_empty() {
            eprintln!("payload hash kernels not tested on this CPU: {skip:?}");
        }
        run
    }

    /// The hash written out from its definition, one word at a time: NH over each 512-byte
    /// block of the zero-padded payload, twice with key offsets 0 and 2 words, then the
    /// `polyval` crate over the values.
    fn reference(seed: &[u8; 32], payload: &[u8]) -> Digest {
        let key = PayloadKey::with_kernel(seed, Kernel::Portable);
        let mut padded = payload.to_vec();
        padded.resize(payload.len().next_multiple_of(PAD), 0);
        let words: Vec<u32> = padded
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
            .collect();
        let mut poly = Polyval::new(&key.h.into());
        for block in words.chunks(NH_BLOCK / 4) {
            let mut value = Vec::new();
            for shift in [0, 2] {
                let mut sum = 0u64;
                for j in (0..block.len()).step_by(2) {
                    let x = block[j].wrapping_add(key.nh[j + shift]);
                    let y = block[j + 1].wrapping_add(key.nh[j + 1 + shift]);
                    sum = sum.wrapping_add(u64::from(x) * u64::from(y));
                }
                value.extend_from_slice(&sum.to_le_bytes());
            }
            poly.update_padded(&value);
        }
        poly.finalize().into()
    }

    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// A value pinned when the format was defined: the tag format is a wire contract, and any
    /// change to it must be a deliberate one.
    #[test]
    fn known_answer() {
        let seed: [u8; 32] = std::array::from_fn(|i| i as u8);
        let payload: Vec<u8> = (0..1500u32).map(|i| (i * 7 + 3) as u8).collect();
        let want = hex("c57b897711e1b3d2d95af5afd46bc3c4");
        for k in kernels() {
            let key = PayloadKey::with_kernel(&seed, k);
            assert_eq!(digest(&key, &payload).to_vec(), want, "{k:?}");
        }
        assert_eq!(reference(&seed, &payload).to_vec(), want);
    }

    /// Every length up to two blocks and a tail, on every kernel this CPU runs, matches the
    /// definition.
    #[test]
    fn every_length_matches_the_definition() {
        let seed = [0xa7u8; 32];
        let bytes: Vec<u8> = (0..(2 * NH_BLOCK + 200) as u32)
            .map(|i| (i * 151 + 13) as u8)
            .collect();
        let keys: Vec<_> = kernels()
            .into_iter()
            .map(|k| PayloadKey::with_kernel(&seed, k))
            .collect();
        for len in 0..=bytes.len() {
            let want = reference(&seed, &bytes[..len]);
            for key in &keys {
                assert_eq!(
                    digest(key, &bytes[..len]),
                    want,
                    "len {len}, {}",
                    key.kernel()
                );
            }
        }
    }

    /// All-ones words (under keys from three seeds) reach every carry: sums wrap mod 2^32 and
    /// mod 2^64 alike in every kernel.
    #[test]
    fn wrapping_matches_on_every_kernel() {
        let payload = vec![0xffu8; 3 * NH_BLOCK];
        for seed in [[0u8; 32], [0xff; 32], [0x80; 32]] {
            let want = reference(&seed, &payload);
            for k in kernels() {
                let key = PayloadKey::with_kernel(&seed, k);
                assert_eq!(digest(&key, &payload), want, "{k:?}");
            }
        }
    }

    /// Fed in pieces of every awkward size, the hash is the hash of the whole.
    #[test]
    fn any_pieces_give_the_whole_hash() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        for round in 0..24 {
            let seed: [u8; 32] = std::array::from_fn(|_| next() as u8);
            let len = match round {
                0 => 0,
                1 => 1,
                2 => NH_BLOCK,
                // Two whole POLYVAL groups of NH values, three more and a tail.
                3 => 2 * BATCH * NH_BLOCK + 3 * NH_BLOCK + 17,
                _ => (next() % 5000) as usize,
            };
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let want = reference(&seed, &bytes);
            for k in kernels() {
                let key = PayloadKey::with_kernel(&seed, k);
                assert_eq!(digest(&key, &bytes), want, "len {len}");
                for piece in [1, 7, 63, 64, 65, 511, 512, 513, 1000, 4097] {
                    let mut s = PayloadHasher::new(key.clone());
                    for c in bytes.chunks(piece) {
                        s.update(c);
                    }
                    assert_eq!(s.finish(), want, "len {len} in pieces of {piece}, {k:?}");
                }
            }
        }
    }

    #[test]
    fn differs_per_key_and_per_byte() {
        let a = PayloadKey::derive(&[1; 32]);
        let b = PayloadKey::derive(&[2; 32]);
        let mut bytes = vec![0x5au8; 1 << 16];
        let d = digest(&a, &bytes);
        assert_ne!(d, digest(&b, &bytes));
        for at in [0, 4, 40_000, (1 << 16) - 1] {
            bytes[at] ^= 1;
            assert_ne!(d, digest(&a, &bytes), "flip at {at}");
            bytes[at] ^= 1;
        }
        // Two blocks swapped.
        bytes[..NH_BLOCK].fill(1);
        let d = digest(&a, &bytes);
        bytes[..NH_BLOCK].fill(0x5a);
        bytes[NH_BLOCK..2 * NH_BLOCK].fill(1);
        assert_ne!(d, digest(&a, &bytes));
    }

    /// The POLYVAL kernel over every count of values up to two groups and a few more, from
    /// any starting state, gives the crate's value.
    #[test]
    fn polyval_kernel_matches_the_crate() {
        if !clmul::available() {
            eprintln!("the POLYVAL kernel is not tested on this CPU (no AVX-512 + VPCLMULQDQ)");
            return;
        }
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let h: [u8; BLOCK] = std::array::from_fn(|_| next() as u8);
        // SAFETY: `available` checked the CPU features.
        let powers = unsafe { clmul::powers(&h) };
        let values: Vec<u8> = (0..(2 * GROUP + 5) * BLOCK).map(|_| next() as u8).collect();
        for n in 0..=2 * GROUP + 5 {
            for split in [0, n / 2, n] {
                let (a, b) = values[..n * BLOCK].split_at(split * BLOCK);
                let mut want = Polyval::new(&h.into());
                want.update_padded(a);
                want.update_padded(b);
                // SAFETY: as above.
                let got =
                    unsafe { clmul::absorb(clmul::absorb([0; BLOCK], &powers, a), &powers, b) };
                assert_eq!(
                    got,
                    Digest::from(want.finalize()),
                    "{n} values split at {split}"
                );
            }
        }
    }

    #[test]
    fn keys_compare_by_value() {
        let a = PayloadKey::with_kernel(&[3; 32], Kernel::Portable);
        let b = PayloadKey::derive(&[3; 32]);
        assert!(*a == *b);
        assert!(*a != *PayloadKey::derive(&[4; 32]));
    }
}

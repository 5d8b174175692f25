//! POLYVAL (RFC 8452) over frame payloads, the universal hash under every frame tag.
//!
//! A tag is a keyed-blake3 PRF over the frame counter, the header and `POLYVAL_H(payload)`
//! (zero-padded to whole 16-byte blocks; the header in the PRF input carries the length).
//! With `H` secret, two different payloads of the same length `s` blocks collide with
//! probability at most `s / 2^128` (zero padding makes lengths indistinguishable to the hash
//! alone: the header's `len` separates them), and the PRF hides every hash value it is
//! given, so a forger succeeds per try with at most that probability plus blake3's own
//! ("hash, then PRF"). A hash value is no content identifier and must never leave the
//! process: one value of a known payload reveals `H`. The AVX-512 kernel runs at about five
//! times blake3's speed here (BENCHMARKS.md §8).
//!
//! The function is the one the `polyval` crate computes (and tests check bit for bit against
//! it); on x86-64 CPUs with AVX-512 and VPCLMULQDQ a four-lane carry-less kernel here folds
//! 64 blocks per reduction (Karatsuba's three products per block), elsewhere the crate does the
//! work.

use std::sync::{Arc, OnceLock};

use polyval::universal_hash::UniversalHash;

/// Blocks the fast kernel folds per reduction.
const GROUP: usize = 64;
use polyval::Polyval;

/// Bytes per POLYVAL block, and of a hash value.
pub const BLOCK: usize = 16;

/// A payload hash value.
pub type Digest = [u8; BLOCK];

/// One hash key `H` and what the fast kernel precomputes from it.
pub struct PayloadKey {
    h: [u8; BLOCK],
    /// `H^GROUP, …, H^2, H^1` (powers in POLYVAL's product), one block each, when the fast
    /// kernel is in use.
    powers: Option<Box<[u8; GROUP * BLOCK]>>,
}

impl std::fmt::Debug for PayloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PayloadKey(..)")
    }
}

impl PayloadKey {
    pub fn new(h: [u8; BLOCK]) -> Arc<PayloadKey> {
        Self::with_kernel(h, fast::available())
    }

    /// As [`PayloadKey::new`], choosing the kernel (`fast` only where it is available).
    fn with_kernel(h: [u8; BLOCK], fast: bool) -> Arc<PayloadKey> {
        let powers = (fast && fast::available()).then(|| {
            // SAFETY: `available` checked the CPU features the kernel is compiled for.
            Box::new(unsafe { fast::powers(&h) })
        });
        Arc::new(PayloadKey { h, powers })
    }

    /// Which kernel hashes under this key.
    pub fn kernel(&self) -> &'static str {
        if self.powers.is_some() {
            "avx512-vpclmulqdq"
        } else {
            "portable"
        }
    }
}

/// Keys are equal when their `H` is (a digest computed under one serves the other).
impl PartialEq for PayloadKey {
    fn eq(&self, other: &PayloadKey) -> bool {
        self.h == other.h
    }
}

impl Eq for PayloadKey {}

/// `POLYVAL_H` of the whole of `bytes`.
pub fn digest(key: &Arc<PayloadKey>, bytes: &[u8]) -> Digest {
    let mut h = PayloadHasher::new(key.clone());
    h.update(bytes);
    h.finish()
}

/// Streaming `POLYVAL_H` over bytes fed in pieces of any size.
#[derive(Clone)]
pub struct PayloadHasher {
    key: Arc<PayloadKey>,
    state: State,
    /// Bytes of a block not yet whole.
    pending: [u8; BLOCK],
    pending_len: usize,
}

#[derive(Clone)]
enum State {
    /// The fast kernel's accumulator.
    Fast(Digest),
    Crate(Polyval),
}

impl PayloadHasher {
    pub fn new(key: Arc<PayloadKey>) -> PayloadHasher {
        let state = match key.powers {
            Some(_) => State::Fast([0; BLOCK]),
            None => State::Crate(Polyval::new(&key.h.into())),
        };
        PayloadHasher {
            key,
            state,
            pending: [0; BLOCK],
            pending_len: 0,
        }
    }

    pub fn key(&self) -> &Arc<PayloadKey> {
        &self.key
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        if self.pending_len > 0 {
            let k = (BLOCK - self.pending_len).min(bytes.len());
            self.pending[self.pending_len..self.pending_len + k].copy_from_slice(&bytes[..k]);
            self.pending_len += k;
            bytes = &bytes[k..];
            if self.pending_len < BLOCK {
                return;
            }
            let block = self.pending;
            self.absorb(&block);
            self.pending_len = 0;
        }
        let whole = bytes.len() / BLOCK * BLOCK;
        self.absorb(&bytes[..whole]);
        let rest = &bytes[whole..];
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// The hash of every byte fed so far, the last block zero-padded.
    pub fn finish(&self) -> Digest {
        let mut last = self.clone();
        if last.pending_len > 0 {
            let mut block = [0; BLOCK];
            block[..last.pending_len].copy_from_slice(&last.pending[..last.pending_len]);
            last.absorb(&block);
        }
        match &last.state {
            State::Fast(acc) => *acc,
            State::Crate(p) => p.clone().finalize().into(),
        }
    }

    /// Fold whole blocks into the state.
    fn absorb(&mut self, blocks: &[u8]) {
        debug_assert_eq!(blocks.len() % BLOCK, 0);
        if blocks.is_empty() {
            return;
        }
        match &mut self.state {
            State::Fast(acc) => {
                let powers = self.key.powers.as_ref().expect("fast state has powers");
                // SAFETY: a key has powers only where `fast::available` found the features.
                *acc = unsafe { fast::absorb(*acc, powers, blocks) };
            }
            // Whole blocks: the padding adds nothing.
            State::Crate(p) => p.update_padded(blocks),
        }
    }
}

/// The AVX-512 + VPCLMULQDQ kernel.
#[cfg(target_arch = "x86_64")]
mod fast {
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
mod fast {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_polyval(h: &[u8; 16], bytes: &[u8]) -> Digest {
        let mut p = Polyval::new(&(*h).into());
        p.update_padded(bytes);
        p.finalize().into()
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn rfc_8452_vector() {
        // RFC 8452, Appendix A.
        let h: [u8; 16] = hex("25629347589242761d31f826ba4b757b").try_into().unwrap();
        let x = hex("4f4f95668c83dfb6401762bb2d01a262d1a24ddd2721d006bbe45f20d3c9f362");
        let want = hex("f7a3b47b846119fae5b7866cf5e5b77e");
        assert_eq!(digest(&PayloadKey::new(h), &x).to_vec(), want);
        assert_eq!(crate_polyval(&h, &x).to_vec(), want);
    }

    /// Every length up to a few groups, fed whole and in pieces of every awkward size, gives
    /// the crate's value bit for bit.
    #[test]
    fn matches_the_polyval_crate_in_any_pieces() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..40 {
            let h: [u8; 16] = std::array::from_fn(|_| next() as u8);
            let key = PayloadKey::with_kernel(h, fast::available() && round % 2 == 0);
            let len = match round {
                0 => 0,
                1 => 1,
                2 => 512,
                3 => 4096,
                _ => (next() % 5000) as usize,
            };
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let want = crate_polyval(&h, &bytes);
            assert_eq!(digest(&key, &bytes), want, "len {len}");
            for piece in [1, 7, 15, 16, 17, 255, 256, 257, 511, 512, 513, 1000] {
                let mut s = PayloadHasher::new(key.clone());
                for c in bytes.chunks(piece) {
                    s.update(c);
                }
                assert_eq!(s.finish(), want, "len {len} in pieces of {piece}");
            }
        }
    }

    /// Every length from 0 to two groups and a tail, on both kernels.
    #[test]
    fn every_short_length_matches_on_both_kernels() {
        let h = [0xa7u8; 16];
        let bytes: Vec<u8> = (0..(2 * GROUP * BLOCK + 100) as u32)
            .map(|i| (i * 151 + 13) as u8)
            .collect();
        for fast in [true, false] {
            let key = PayloadKey::with_kernel(h, fast);
            for len in 0..=bytes.len() {
                assert_eq!(
                    digest(&key, &bytes[..len]),
                    crate_polyval(&h, &bytes[..len]),
                    "len {len}"
                );
            }
        }
    }

    #[test]
    fn differs_per_key_and_per_byte() {
        let a = PayloadKey::new([1; 16]);
        let b = PayloadKey::new([2; 16]);
        let mut bytes = vec![0x5au8; 1 << 16];
        let d = digest(&a, &bytes);
        assert_ne!(d, digest(&b, &bytes));
        bytes[40_000] ^= 1;
        assert_ne!(d, digest(&a, &bytes));
    }
}

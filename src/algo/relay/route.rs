//! Where a relay op's bytes go: each relay's share of the buffer (its **segment**, sized by
//! the weights the ranks agreed on), the **chunks** (one frame's worth each) a segment is cut
//! into, segment weights from measured throughput, and the fail-over path of each chunk given
//! the set of lost relays. Pure integer arithmetic: every rank computes the same answers from
//! the same inputs.

use crate::algo::span::{block, chunks};
use crate::compress::{Compression, INT8_BLOCK};
use std::ops::Range;

/// Element ranges of the relays' segments: `count` elements split in proportion to
/// `weights` (one per relay; all equal, or an empty slice, gives the nearly equal split of
/// [`block`]). Pure integer arithmetic, so every rank computes the same split from the same
/// weights. Zero weights get empty segments unless every weight is zero.
pub fn segment_ranges(count: usize, parts: usize, weights: &[u64]) -> Vec<Range<usize>> {
    assert!(parts > 0, "segments need at least one relay");
    let total: u128 = weights.iter().map(|&w| w as u128).sum();
    let equal = weights.len() != parts || total == 0 || weights.iter().all(|&w| w == weights[0]);
    if equal {
        return (0..parts).map(|k| block(count, parts, k)).collect();
    }
    let mut out = Vec::with_capacity(parts);
    let mut acc: u128 = 0;
    let mut start = 0;
    for &w in weights {
        acc += w as u128;
        let end = (count as u128 * acc / total) as usize;
        out.push(start..end);
        start = end;
    }
    out
}

/// The chunks of each relay's segment, as element ranges. Exact data: the segments of
/// [`segment_ranges`] in chunks of at most `chunk_bytes` (elements of `elem` bytes, at least
/// one per chunk). Compressed data (`z`): segments and
/// chunks cut on whole int8 blocks ([`INT8_BLOCK`] elements, for every format, so every
/// relay checks frames the same way), each chunk at most
/// [`crate::relay::compressed_chunk_bytes`] as float32; only the buffer's last chunk may end
/// in a short block.
pub fn chunk_ranges(
    count: usize,
    z: Compression,
    parts: usize,
    weights: &[u64],
    elem: usize,
    chunk_bytes: usize,
) -> Vec<Vec<Range<usize>>> {
    if z == Compression::None {
        let per = (chunk_bytes / elem).max(1);
        return segment_ranges(count, parts, weights)
            .iter()
            .map(|seg| chunks(seg.clone(), 1, per).collect())
            .collect();
    }
    let per = crate::relay::compressed_chunk_bytes(chunk_bytes, z) / 4;
    segment_elems(count, z, parts, weights)
        .into_iter()
        .map(|seg| {
            seg.clone()
                .step_by(per)
                .map(|s| s..(s + per).min(seg.end))
                .collect()
        })
        .collect()
}

/// Element ranges of the relays' segments as the relay schedule cuts them: by `weights`
/// ([`segment_ranges`]), and for compressed data (`z`) on whole int8 blocks, only the
/// buffer's last segment ending in a short block. Verifiers attribute elements to relays
/// with it.
pub fn segment_elems(
    count: usize,
    z: Compression,
    parts: usize,
    weights: &[u64],
) -> Vec<Range<usize>> {
    if z == Compression::None {
        return segment_ranges(count, parts, weights);
    }
    segment_ranges(count.div_ceil(INT8_BLOCK), parts, weights)
        .into_iter()
        .map(|u| (u.start * INT8_BLOCK).min(count)..(u.end * INT8_BLOCK).min(count))
        .collect()
}

/// A relay's weight is never below the mean rate divided by this: a relay measured slow still
/// gets bytes, so its rate keeps being measured and it can win its share back.
pub const MIN_SHARE_DIVISOR: u64 = 8;

/// Segment weights from the relays' throughputs (one per relay, any unit, summed over the
/// ranks so every rank passes the same numbers): each rate, raised to the mean rate divided
/// by [`MIN_SHARE_DIVISOR`]. Empty, meaning an equal split, when nothing was measured.
pub fn weights_from_rates(rates: &[u64]) -> Vec<u64> {
    let n = rates.len() as u128;
    let total: u128 = rates.iter().map(|&r| u128::from(r)).sum();
    if total == 0 {
        return Vec::new();
    }
    // At most the largest rate over MIN_SHARE_DIVISOR, so it fits a u64.
    let floor = (total / (n * u128::from(MIN_SHARE_DIVISOR))).max(1) as u64;
    rates.iter().map(|&r| r.max(floor)).collect()
}

/// The order in which chunk `index` of segment `origin` prefers the `parts` positions: its own
/// segment's relay first, then the others ascending, rotated by `index` so that a lost relay's
/// chunks spread evenly over the rest.
pub fn preference(origin: usize, index: usize, parts: usize) -> Vec<usize> {
    let others: Vec<usize> = (0..parts).filter(|&p| p != origin).collect();
    let mut order = Vec::with_capacity(parts);
    order.push(origin);
    if !others.is_empty() {
        let rot = index % others.len();
        order.extend_from_slice(&others[rot..]);
        order.extend_from_slice(&others[..rot]);
    }
    order
}

/// The path of a chunk given the lost positions: its preferences up to the first live one;
/// `None` when every relay is lost.
pub(super) fn path_of(origin: usize, index: usize, dead: &[bool]) -> Option<Vec<usize>> {
    let pref = preference(origin, index, dead.len());
    let live = pref.iter().position(|&p| !dead[p])?;
    Some(pref[..=live].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_follow_weights_and_cover_the_buffer() {
        assert_eq!(segment_ranges(10, 3, &[]), vec![0..4, 4..7, 7..10]);
        assert_eq!(segment_ranges(10, 3, &[5, 5, 5]), vec![0..4, 4..7, 7..10]);
        assert_eq!(
            segment_ranges(100, 3, &[1, 2, 1]),
            vec![0..25, 25..75, 75..100]
        );
        assert_eq!(segment_ranges(7, 2, &[0, 9]), vec![0..0, 0..7]);
        for count in [0, 1, 5, 1001] {
            let s = segment_ranges(count, 4, &[3, 1, 7, 2]);
            assert_eq!(s[0].start, 0);
            assert_eq!(s[3].end, count);
            assert!(s.windows(2).all(|w| w[0].end == w[1].start));
        }
    }

    #[test]
    fn weights_follow_rates_with_a_floor() {
        assert_eq!(weights_from_rates(&[]), Vec::<u64>::new());
        assert_eq!(weights_from_rates(&[0, 0, 0]), Vec::<u64>::new());
        assert_eq!(weights_from_rates(&[300, 100, 200]), vec![300, 100, 200]);
        // Mean 400, floor 50: the slow and the unmeasured relay are raised to it.
        assert_eq!(weights_from_rates(&[1190, 10, 0]), vec![1190, 50, 50]);
        // Tiny totals still give every relay a non-zero weight.
        assert_eq!(weights_from_rates(&[3, 0]), vec![3, 1]);
        assert_eq!(
            weights_from_rates(&[u64::MAX, u64::MAX, 0]),
            vec![u64::MAX, u64::MAX, u64::MAX / 12]
        );
        // The floored relay's segment is about an eighth of an equal share, never empty.
        let w = weights_from_rates(&[1_000_000, 1]);
        let s = segment_ranges(1 << 20, 2, &w);
        assert!(s[1].len() >= (1 << 20) / 2 / 9, "{s:?}");
        assert!(s[1].len() < s[0].len());
    }

    #[test]
    fn a_chunks_path_depends_only_on_the_set_of_lost_relays() {
        assert_eq!(preference(1, 0, 4), vec![1, 0, 2, 3]);
        assert_eq!(preference(1, 1, 4), vec![1, 2, 3, 0]);
        assert_eq!(preference(0, 5, 1), vec![0]);
        // Lost relays spread evenly over the rest.
        let dead = [false, true, false, false];
        let mut per = [0; 4];
        for i in 0..30 {
            per[*path_of(1, i, &dead).unwrap().last().unwrap()] += 1;
        }
        assert_eq!(per, [10, 0, 10, 10]);
        assert_eq!(path_of(2, 3, &[true, true, true]), None);
        assert_eq!(path_of(0, 1, &[true, false, true]).unwrap(), vec![0, 2, 1]);
    }

    /// Verifiers cut segments with `segment_elems`; the schedule cuts chunks with
    /// `chunk_ranges`: the chunks of segment k tile exactly segment k.
    #[test]
    fn chunks_tile_the_segments_verifiers_see() {
        for z in [Compression::None, Compression::Bf16, Compression::Int8] {
            for count in [0, 1, 255, 256, 257, 5000, 70_001] {
                for weights in [vec![], vec![1, 1, 1], vec![7, 1, 2], vec![0, 5, 0]] {
                    let segs = segment_elems(count, z, 3, &weights);
                    let chunks = chunk_ranges(count, z, 3, &weights, 4, 4096);
                    for (k, seg) in segs.iter().enumerate() {
                        let mut at = seg.start;
                        for c in &chunks[k] {
                            assert_eq!(c.start, at, "{z:?} {count} {weights:?} segment {k}");
                            at = c.end;
                        }
                        assert_eq!(at, seg.end, "{z:?} {count} {weights:?} segment {k}");
                    }
                    assert_eq!(segs.last().map(|s| s.end), Some(count));
                }
            }
        }
    }
}

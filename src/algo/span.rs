//! The arithmetic every schedule uses to cut a buffer into the pieces that travel, and to walk
//! around the ring. Pure functions of their arguments, so every rank that passes the same
//! numbers gets the same pieces.
//!
//! Vocabulary used by every schedule:
//! * a **block** is one rank's share of a buffer: `count` elements split into `parts` nearly
//!   equal runs, the first `count % parts` one element longer ([`block`]);
//! * a **segment** is one relay's share of a buffer in relay mode (cut by the relays'
//!   weights, see [`crate::algo::relay`]); only relay schedules have segments;
//! * a **chunk** is one frame's worth, the unit of pipelining: at most `chunk_bytes` of a block
//!   or segment, in whole elements ([`chunks`]). Each chunk travels as one data frame.

use std::ops::Range;

/// Elements of block `b` when `count` elements are split into `parts` blocks.
pub fn block(count: usize, parts: usize, b: usize) -> Range<usize> {
    debug_assert!(parts > 0 && b < parts);
    let base = count / parts;
    let extra = count % parts;
    let start = b * base + b.min(extra);
    let len = base + usize::from(b < extra);
    start..start + len
}

/// Split the byte range `range` (whole `elem`-byte elements) into chunks of at most
/// `chunk_bytes` (rounded down to whole elements, at least one element), in order. An empty
/// range has no chunks.
pub fn chunks(
    range: Range<usize>,
    elem: usize,
    chunk_bytes: usize,
) -> impl Iterator<Item = Range<usize>> {
    let step = (chunk_bytes / elem).max(1) * elem;
    let end = range.end;
    (range.start..end)
        .step_by(step)
        .map(move |s| s..(s + step).min(end))
}

/// The byte range of the element range `elems` in a buffer of `elem_size`-byte elements:
/// `elems.start * elem_size .. elems.end * elem_size`.
pub fn byte_range(elems: &Range<usize>, elem_size: usize) -> Range<usize> {
    elems.start * elem_size..elems.end * elem_size
}

/// Position `x` taken around a ring of `n` positions: the index in `0..n` congruent to `x`
/// modulo `n`. `x` may be negative, as in "the block `rank − step − 1`", which is why it is
/// signed.
pub fn ring_index(x: isize, n: usize) -> usize {
    x.rem_euclid(n as isize) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_partition_exactly() {
        for count in 0..40 {
            for parts in 1..10 {
                let mut next = 0;
                for b in 0..parts {
                    let r = block(count, parts, b);
                    assert_eq!(r.start, next);
                    assert!(r.len() == count / parts || r.len() == count / parts + 1);
                    next = r.end;
                }
                assert_eq!(next, count);
            }
        }
    }

    #[test]
    fn chunks_cover_in_whole_elements() {
        let c: Vec<_> = chunks(8..48, 4, 10).collect();
        assert_eq!(c, vec![8..16, 16..24, 24..32, 32..40, 40..48]);
        let c: Vec<_> = chunks(0..6, 2, 1).collect();
        assert_eq!(c, vec![0..2, 2..4, 4..6]);
        assert_eq!(chunks(5..5, 4, 64).count(), 0);
    }

    #[test]
    fn byte_range_scales_both_ends() {
        assert_eq!(byte_range(&(3..7), 4), 12..28);
        assert_eq!(byte_range(&(5..5), 2), 10..10);
    }

    #[test]
    fn ring_index_wraps_both_ways() {
        assert_eq!(ring_index(-1, 4), 3);
        assert_eq!(ring_index(-5, 4), 3);
        assert_eq!(ring_index(4, 4), 0);
        assert_eq!(ring_index(2, 4), 2);
    }
}

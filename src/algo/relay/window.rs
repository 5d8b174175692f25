//! How many chunks a peer keeps in flight per lane: the window it announces to relays (which
//! bounds their memory) and the window it uses on each op (which follows the links'
//! bandwidth-delay product).

use crate::compress::Compression;

/// Fewest chunks in flight per lane (and all of them until links are measured).
pub const DEFAULT_WINDOW: usize = 4;
/// Most bytes a peer may keep in flight per lane: the window it announces to relays is
/// this many bytes of chunks (at least [`DEFAULT_WINDOW`] chunks), and bounds relay memory.
pub const MAX_WINDOW_BYTES: usize = 4 << 20;

/// The window a peer announces to relays (the most it will ever use) for `chunk_bytes`.
pub fn max_window(chunk_bytes: usize) -> usize {
    (MAX_WINDOW_BYTES / chunk_bytes.max(1)).clamp(DEFAULT_WINDOW, crate::relay::MAX_WINDOW)
}

/// Chunks in flight per lane for one relay op. Relays answer a chunk only when every peer's
/// copy arrived, so a window larger than the link needs lets the peers' streams drift apart
/// (on a shaped 200 Mbit/s network, 64 chunks of 64 KiB reached 81–88% of the bound where 4
/// reached 94%); one smaller than the bandwidth-delay product starves long links (4 chunks of
/// 64 KiB reached 74% at 40 ms round trip). So: [`DEFAULT_WINDOW`] chunks, plus three times
/// the bandwidth-delay product of the slowest-to-fill relay link — `rate` the bytes per second
/// it delivered on the last op, `min_rtt_us` the kernel's minimum round trip — capped at
/// [`max_window`]. Each rank sizes its own window; ranks need not agree.
pub fn relay_window(links: &[(u64, u32)], chunk_bytes: usize) -> usize {
    let bdp = links
        .iter()
        .map(|&(rate, rtt_us)| u128::from(rate) * u128::from(rtt_us) / 1_000_000)
        .max()
        .unwrap_or(0);
    let extra = (3 * bdp).div_ceil(chunk_bytes.max(1) as u128);
    (DEFAULT_WINDOW as u128 + extra).min(max_window(chunk_bytes) as u128) as usize
}

/// The window of a compressed all-reduce whose exact window would be `window` chunks of
/// `chunk_bytes`: as many elements in flight as the exact window, up to what peers announce
/// to relays ([`max_window`]). Compressed chunks take about `chunk_bytes` on the wire
/// ([`crate::relay::compressed_chunk_bytes`]) but carry more elements, and a relay's work
/// on a chunk (decode every contribution, sum, encode) follows its elements: with the exact
/// window's wire bytes in flight, relays sharing their cores with peers answered too late to
/// keep the links busy (shaped network, 4 peers and 4 relays on 2 cores, 256 MiB int8: 4
/// chunks of 64 KiB in flight 0.68 s, 15 chunks 0.62 s, 31 chunks 0.66 s, where peers' streams
/// drift apart). Relay memory stays within the job's reservation: an open compressed chunk
/// holds one float32 accumulator and encoded contributions.
pub fn compressed_window(window: usize, z: Compression, chunk_bytes: usize) -> usize {
    if z == Compression::None {
        return window;
    }
    let f32_bytes = crate::relay::compressed_chunk_bytes(chunk_bytes, z);
    let wire = z.encoded_len(f32_bytes / 4).max(1);
    (window * f32_bytes / wire).clamp(window, max_window(chunk_bytes).max(window))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_windows_keep_the_elements_in_flight() {
        let chunk = 64 << 10;
        // As many elements in flight as the exact window: 128 KiB of float32 per bf16
        // chunk, 248 KiB per int8 chunk.
        assert_eq!(compressed_window(4, Compression::None, chunk), 4);
        assert_eq!(compressed_window(4, Compression::Bf16, chunk), 8);
        assert_eq!(compressed_window(4, Compression::Int8, chunk), 15);
        // Never beyond the window announced to relays, never below the exact one.
        assert_eq!(compressed_window(40, Compression::Int8, chunk), 64);
        // Tiny chunks still carry a whole int8 block (the reservation counts one per slot).
        assert_eq!(compressed_window(4, Compression::Int8, 64), 15);
    }

    #[test]
    fn windows_cover_the_bandwidth_delay_product() {
        let chunk = 64 << 10;
        assert_eq!(max_window(chunk), 64);
        assert_eq!(max_window(1 << 20), DEFAULT_WINDOW);
        assert_eq!(max_window(1), crate::relay::MAX_WINDOW);
        // Nothing measured yet, or no delay: the minimum.
        assert_eq!(relay_window(&[], chunk), DEFAULT_WINDOW);
        assert_eq!(relay_window(&[(25_000_000, 0)], chunk), DEFAULT_WINDOW);
        // 6.25 MB/s at 40 ms: 250 kB in flight, three times that in 64 KiB chunks, plus 4.
        assert_eq!(relay_window(&[(6_250_000, 40_000)], chunk), 4 + 12);
        // The slowest-to-fill link decides.
        assert_eq!(
            relay_window(&[(6_250_000, 40_000), (1_000_000, 1_000)], chunk),
            16
        );
        // Capped at what peers announce to relays.
        assert_eq!(relay_window(&[(125_000_000, 40_000)], chunk), 64);
        assert_eq!(
            relay_window(&[(125_000_000, 40_000)], 1 << 20),
            DEFAULT_WINDOW
        );
    }
}

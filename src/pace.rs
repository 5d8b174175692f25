//! Pacing: a token bucket that caps how many bytes per second a sender may put on the wire
//! (`MR_MAX_RATE` for a rank, `mr-relayd --max-rate` for a relay).
//!
//! Sans-IO: the caller passes the time in and asks how many bytes it may send now, or when it
//! may send again; the bucket never reads a clock, sleeps or touches a socket. That keeps it
//! testable with a virtual clock and lets an event loop turn "not yet" into a poll timeout.
//!
//! The bucket holds at most `burst` bytes of credit and refills at `rate` bytes per second.
//! A sender that asks for more than it holds gets what it holds (possibly nothing) and the
//! instant at which the rest becomes available; over any interval of length t it sends at
//! most `burst + rate · t` bytes, so its long-run rate is `rate` whatever its write sizes.

use std::time::{Duration, Instant};

/// Smallest burst: enough for one full frame header plus a typical segment, so pacing never
/// splits a small write into byte-sized pieces.
pub const MIN_BURST: u64 = 64 << 10;

/// A token bucket.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    /// Bytes per second.
    rate: u64,
    /// Most credit the bucket holds, in bytes.
    burst: u64,
    /// Credit now, in bytes.
    tokens: u64,
    /// Nanoseconds of refill not yet worth a whole byte.
    carry_ns: u128,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilling at `rate` bytes per second (at least 1), holding at most
    /// `burst` bytes (at least [`MIN_BURST`]).
    pub fn new(rate: u64, burst: u64, now: Instant) -> TokenBucket {
        let burst = burst.max(MIN_BURST);
        TokenBucket {
            rate: rate.max(1),
            burst,
            tokens: burst,
            carry_ns: 0,
            last: now,
        }
    }

    /// The default burst for `rate`: 10 ms of traffic, at least [`MIN_BURST`].
    pub fn default_burst(rate: u64) -> u64 {
        (rate / 100).max(MIN_BURST)
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        let ns = elapsed.as_nanos() * u128::from(self.rate) + self.carry_ns;
        let whole = ns / 1_000_000_000;
        self.carry_ns = ns % 1_000_000_000;
        self.tokens = (u128::from(self.tokens) + whole).min(u128::from(self.burst)) as u64;
        if self.tokens == self.burst {
            self.carry_ns = 0;
        }
    }

    /// How many of `want` bytes may go out now (0 to `want`); the caller sends at most that
    /// and reports it with [`TokenBucket::consume`].
    pub fn available(&mut self, now: Instant, want: usize) -> usize {
        self.refill(now);
        (self.tokens.min(want as u64)) as usize
    }

    /// `sent` bytes went out.
    pub fn consume(&mut self, sent: usize) {
        self.tokens = self.tokens.saturating_sub(sent as u64);
    }

    /// When at least `want` bytes (capped at the burst) will be available; `now` if they are.
    #[must_use]
    pub fn ready_at(&mut self, now: Instant, want: usize) -> Instant {
        self.refill(now);
        let want = (want as u64).min(self.burst);
        if self.tokens >= want {
            return now;
        }
        let missing = u128::from(want - self.tokens);
        let ns = (missing * 1_000_000_000)
            .saturating_sub(self.carry_ns)
            .div_ceil(u128::from(self.rate));
        now + Duration::from_nanos(ns.min(u128::from(u64::MAX)) as u64)
    }
}

/// A send cap shared by every connection of one event loop (the engine's or the relay's),
/// with the connections that wait for it and when to try them again.
#[derive(Debug)]
pub struct Pacer {
    bucket: Option<TokenBucket>,
    waiting: Vec<usize>,
    wake: Option<Instant>,
}

impl Pacer {
    /// At most `rate` bytes per second with the default burst; `None`: no cap.
    pub fn new(rate: Option<u64>, now: Instant) -> Pacer {
        Pacer {
            bucket: rate.map(|r| TokenBucket::new(r, TokenBucket::default_burst(r), now)),
            waiting: Vec::new(),
            wake: None,
        }
    }

    /// How many of the `left` bytes connection `id` may write now. `None`: none; the
    /// connection waits and is handed back by [`Pacer::due`] once the cap allows again.
    pub fn allowance(&mut self, id: usize, now: Instant, left: usize) -> Option<usize> {
        let Some(bucket) = self.bucket.as_mut() else {
            return Some(usize::MAX);
        };
        match bucket.available(now, left) {
            0 => {
                let at = bucket.ready_at(now, left.min(MIN_BURST as usize));
                self.wake = Some(self.wake.map_or(at, |w| w.min(at)));
                if !self.waiting.contains(&id) {
                    self.waiting.push(id);
                }
                None
            }
            n => Some(n),
        }
    }

    /// `n` bytes went out.
    pub fn consume(&mut self, n: usize) {
        if let Some(b) = self.bucket.as_mut() {
            b.consume(n);
        }
    }

    /// When the loop must wake to retry waiting connections.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.wake
    }

    /// The connections to retry at `now` (empty before the wake time).
    pub fn due(&mut self, now: Instant) -> Vec<usize> {
        if self.wake.is_some_and(|w| w <= now) {
            self.wake = None;
            std::mem::take(&mut self.waiting)
        } else {
            Vec::new()
        }
    }
}

/// Parse a rate such as `125000000`, `125M`, `1G` or `1Gbit` into bytes per second
/// (`K`/`M`/`G` are powers of 1000; a `bit` or `b` suffix divides by eight).
pub fn parse_rate(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_lowercase();
    let (t, bits) = match t.strip_suffix("bit").or_else(|| t.strip_suffix("bps")) {
        Some(rest) => (rest.to_string(), true),
        None => (
            t.trim_end_matches("b/s").trim_end_matches("/s").to_string(),
            false,
        ),
    };
    let (num, mult) = match t.chars().last()? {
        'k' => (&t[..t.len() - 1], 1e3),
        'm' => (&t[..t.len() - 1], 1e6),
        'g' => (&t[..t.len() - 1], 1e9),
        _ => (&t[..], 1.0),
    };
    let v: f64 = num.trim().parse().ok()?;
    let bytes = v * mult / if bits { 8.0 } else { 1.0 };
    (bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_run_rate_is_the_rate_whatever_the_write_size() {
        let t0 = Instant::now();
        for write in [100usize, 1500, 64 << 10, 1 << 20] {
            let mut b = TokenBucket::new(10_000_000, MIN_BURST, t0);
            let mut now = t0;
            let mut sent = 0u64;
            // Simulate a sender that always has `write` bytes queued, for 2 virtual seconds.
            while now < t0 + Duration::from_secs(2) {
                let n = b.available(now, write);
                if n > 0 {
                    b.consume(n);
                    sent += n as u64;
                } else {
                    let next = b.ready_at(now, write);
                    assert!(next > now, "a waiting sender must be told a later time");
                    now = next;
                }
            }
            let limit = MIN_BURST + 10_000_000 * 2;
            assert!(
                sent <= limit + write as u64,
                "write {write}: {sent} > {limit}"
            );
            assert!(sent >= limit - 2 * (64 << 10), "write {write}: only {sent}");
        }
    }

    #[test]
    fn burst_caps_idle_credit() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000_000, 100_000, t0);
        assert_eq!(b.available(t0, usize::MAX), 100_000);
        b.consume(100_000);
        assert_eq!(b.available(t0, 10), 0);
        // An hour idle still gives only one burst.
        assert_eq!(
            b.available(t0 + Duration::from_secs(3600), usize::MAX),
            100_000
        );
    }

    #[test]
    fn ready_at_is_exact() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, MIN_BURST, t0);
        b.consume(MIN_BURST as usize);
        let at = b.ready_at(t0, 500);
        assert_eq!(at - t0, Duration::from_millis(500));
        assert_eq!(b.available(at, 500), 500);
        assert_eq!(b.available(at - Duration::from_millis(1), 500), 500);
        // More than a burst is never promised: the wait is for one burst.
        let mut b = TokenBucket::new(1000, MIN_BURST, t0);
        b.consume(MIN_BURST as usize);
        assert_eq!(
            b.ready_at(t0, usize::MAX) - t0,
            Duration::from_millis(MIN_BURST * 1000 / 1000)
        );
    }

    #[test]
    fn time_going_backwards_is_ignored() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(1000, MIN_BURST, t0);
        b.consume(MIN_BURST as usize);
        assert_eq!(b.available(t0 - Duration::from_secs(5), 10), 0);
        assert_eq!(b.available(t0 + Duration::from_millis(10), 100), 10);
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("125000000"), Some(125_000_000));
        assert_eq!(parse_rate("125M"), Some(125_000_000));
        assert_eq!(parse_rate("1gbit"), Some(125_000_000));
        assert_eq!(parse_rate("1Gbps"), Some(125_000_000));
        assert_eq!(parse_rate("200mbit"), Some(25_000_000));
        assert_eq!(parse_rate("2.5G"), Some(2_500_000_000));
        assert_eq!(parse_rate("0"), None);
        assert_eq!(parse_rate("fast"), None);
        assert_eq!(parse_rate(""), None);
    }

    #[test]
    fn a_pacer_parks_connections_until_the_cap_allows_again() {
        let t0 = Instant::now();
        let mut open = Pacer::new(None, t0);
        assert_eq!(open.allowance(3, t0, 10), Some(usize::MAX));
        assert_eq!(open.poll_timeout(), None);
        // 1 MB/s, burst 64 KiB: the first 64 KiB go at once, then connection 1 waits.
        let mut p = Pacer::new(Some(1_000_000), t0);
        assert_eq!(p.allowance(1, t0, 100 << 10), Some(64 << 10));
        p.consume(64 << 10);
        assert_eq!(p.allowance(1, t0, 36 << 10), None);
        assert_eq!(p.allowance(2, t0, 10), None);
        assert_eq!(p.allowance(1, t0, 36 << 10), None);
        let wake = p.poll_timeout().expect("a wake time");
        assert!(
            wake > t0 && wake <= t0 + Duration::from_millis(37),
            "{:?}",
            wake - t0
        );
        assert!(p.due(t0).is_empty());
        assert_eq!(p.due(wake), vec![1, 2]);
        assert_eq!(p.poll_timeout(), None);
        assert!(p.allowance(1, wake, 36 << 10).is_some());
    }
}

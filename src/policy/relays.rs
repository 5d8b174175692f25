//! Relay health as one rank sees it: which relays are lost, when each relay the current op
//! uses was last heard from, how many bytes it sent, and what that makes of its throughput.
//!
//! No I/O and no clock of its own: every call that depends on time takes `now`, and
//! [`RelayHealth::poll_timeout`] says when the caller must call [`RelayHealth::handle_timeout`]
//! next (in the manner of quinn-proto's `Connection`). The progress loop feeds it what it reads
//! and when; the simulator feeds it virtual time.
//!
//! Stall rule. A relay is stalled when the op waits on it (it holds unanswered chunks) and
//! nothing arrived from it for [`relay_stall`]. A stalled relay is dropped only while some
//! other relay of the op is not stalled (answering, or owed nothing): when every relay waited
//! on is silent the cause may as well be a slow peer, so none is dropped and the op-level
//! timeout applies.
//!
//! Op timeout. An op that makes no progress (no frame completed in either direction) for the
//! communicator's timeout fails.
//!
//! Throughput. When an op succeeds, each relay it heard from yields a sample: the bytes that
//! arrived from it over the time from the op's start to its last byte. [`smooth_rate`] folds
//! samples into a rate kept across ops, which the communicator turns into segment weights
//! ([`crate::algo::relay::weights_from_rates`]).

use crate::algo::Endpoint;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Longest silence of a relay the op waits on before it is dropped as stalled.
const RELAY_STALL: Duration = Duration::from_secs(5);

/// How long a relay may stay silent while an op waits on it: [`RELAY_STALL`], or half of
/// the op timeout (`MR_TIMEOUT_MS`) when that is shorter, so a stalled relay is dropped
/// before the op times out.
pub fn relay_stall(timeout: Duration) -> Duration {
    RELAY_STALL.min(timeout / 2)
}

/// `old` rate with a new `sample` folded in: a quarter of the sample, three quarters of the
/// old rate (the sample alone while nothing was measured).
pub fn smooth_rate(old: u64, sample: u64) -> u64 {
    if old == 0 {
        sample
    } else {
        ((u128::from(old) * 3 + u128::from(sample)) / 4) as u64
    }
}

/// What one relay did during the current op.
#[derive(Clone, Copy, Debug)]
struct Heard {
    /// When bytes last arrived from it (the op's start until then).
    at: Instant,
    /// Bytes (headers and payloads) that arrived from it.
    bytes: u64,
    /// Its stall deadline passed while it could not be dropped (not waited on, or no other
    /// relay was healthy): not a wake-up reason again until it is heard from.
    overdue: bool,
}

/// Timing of the op in progress.
#[derive(Clone, Debug)]
struct OpClock {
    started: Instant,
    last_progress: Instant,
    heard: BTreeMap<usize, Heard>,
}

/// What a timeout check found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// Relays to drop as stalled (ascending): each was silent for at least the stall bound.
    pub stalled: Vec<usize>,
    /// The op made no progress for the whole timeout.
    pub op_timed_out: bool,
}

/// One relay's throughput over a successful op, in bytes per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateSample {
    pub relay: usize,
    pub bytes_per_sec: u64,
}

/// Relay health and op timing of one rank (see the module docs).
#[derive(Debug)]
pub struct RelayHealth {
    timeout: Duration,
    stall: Duration,
    /// Relays lost on this rank: later ops start without them.
    lost: BTreeSet<usize>,
    op: Option<OpClock>,
}

impl RelayHealth {
    /// `timeout`: how long an op may make no progress (`MR_TIMEOUT_MS`).
    pub fn new(timeout: Duration) -> RelayHealth {
        RelayHealth {
            timeout,
            stall: relay_stall(timeout),
            lost: BTreeSet::new(),
            op: None,
        }
    }

    pub fn stall(&self) -> Duration {
        self.stall
    }

    /// An op starts at `now` with connections to `relays`. Returns the relays lost in
    /// earlier ops, which the op's schedule must route around from the start.
    pub fn start_op(
        &mut self,
        now: Instant,
        relays: impl IntoIterator<Item = usize>,
    ) -> Vec<usize> {
        let heard = relays
            .into_iter()
            .filter(|r| !self.lost.contains(r))
            .map(|r| {
                let h = Heard {
                    at: now,
                    bytes: 0,
                    overdue: false,
                };
                (r, h)
            })
            .collect();
        self.op = Some(OpClock {
            started: now,
            last_progress: now,
            heard,
        });
        self.lost.iter().copied().collect()
    }

    /// The op ended without success: nothing is learned from it.
    pub fn abandon_op(&mut self) {
        self.op = None;
    }

    /// The op succeeded: one throughput sample per relay it heard from and still uses.
    pub fn finish_op(&mut self) -> Vec<RateSample> {
        let Some(op) = self.op.take() else {
            return Vec::new();
        };
        op.heard
            .iter()
            .filter(|(r, h)| h.bytes > 0 && !self.lost.contains(r))
            .filter_map(|(&relay, h)| {
                let nanos = h.at.saturating_duration_since(op.started).as_nanos();
                (nanos > 0).then(|| RateSample {
                    relay,
                    bytes_per_sec: (u128::from(h.bytes) * 1_000_000_000 / nanos)
                        .min(u128::from(u64::MAX)) as u64,
                })
            })
            .collect()
    }

    /// The op moved forward at `now`: a frame was sent or received, or payload bytes arrived.
    pub fn progress(&mut self, now: Instant) {
        if let Some(op) = self.op.as_mut() {
            op.last_progress = now;
        }
    }

    /// `n` bytes arrived from relay `r` at `now` during the op.
    pub fn heard_from(&mut self, r: usize, n: usize, now: Instant) {
        let Some(op) = self.op.as_mut() else { return };
        let h = op.heard.entry(r).or_insert(Heard {
            at: now,
            bytes: 0,
            overdue: false,
        });
        h.at = now;
        h.bytes += n as u64;
        h.overdue = false;
    }

    /// Relay `r` is lost for good; false if it already was.
    pub fn lose(&mut self, r: usize) -> bool {
        self.lost.insert(r)
    }

    pub fn is_lost(&self, r: usize) -> bool {
        self.lost.contains(&r)
    }

    /// When [`RelayHealth::handle_timeout`] must run next: the op's progress deadline, or
    /// the first relay's stall deadline that has not passed yet. `None` between ops.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let op = self.op.as_ref()?;
        let progress = op.last_progress + self.timeout;
        let stall = op
            .heard
            .iter()
            .filter(|(r, h)| !h.overdue && !self.lost.contains(r))
            .map(|(_, h)| h.at + self.stall)
            .min();
        Some(stall.map_or(progress, |s| s.min(progress)))
    }

    /// Check the deadlines at `now`. `waits_on(r)`: whether the op waits for frames from
    /// relay `r`. Relays returned as stalled are not marked lost: the caller drops them
    /// (closing their streams, telling the schedule) and calls [`RelayHealth::lose`].
    pub fn handle_timeout(&mut self, now: Instant, waits_on: impl Fn(usize) -> bool) -> Expired {
        let mut out = Expired::default();
        let Some(op) = self.op.as_mut() else {
            return out;
        };
        let mut stalled = Vec::new();
        let mut healthy = false;
        for (&r, h) in op.heard.iter_mut() {
            if self.lost.contains(&r) {
                continue;
            }
            let silent = now.saturating_duration_since(h.at);
            if silent >= self.stall {
                h.overdue = true;
                if waits_on(r) {
                    stalled.push(r);
                    continue;
                }
            }
            healthy = true;
        }
        if healthy {
            out.stalled = stalled;
        }
        out.op_timed_out = now.saturating_duration_since(op.last_progress) >= self.timeout;
        out
    }
}

/// Relays among `eps`, in order.
pub fn relays_of<'a>(eps: impl IntoIterator<Item = &'a Endpoint>) -> Vec<usize> {
    let mut v: Vec<usize> = eps
        .into_iter()
        .filter_map(|ep| match ep {
            Endpoint::Relay(r) => Some(*r),
            Endpoint::Rank(_) => None,
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_stall_bound_is_five_seconds_or_half_the_timeout() {
        assert_eq!(relay_stall(Duration::from_secs(60)), Duration::from_secs(5));
        assert_eq!(relay_stall(Duration::from_secs(4)), Duration::from_secs(2));
    }

    #[test]
    fn rates_are_smoothed_over_ops() {
        assert_eq!(smooth_rate(0, 800), 800);
        assert_eq!(smooth_rate(800, 400), 700);
        assert_eq!(smooth_rate(u64::MAX, u64::MAX), u64::MAX);
    }

    #[test]
    fn a_silent_relay_is_dropped_only_while_another_answers() {
        let t0 = Instant::now();
        let mut h = RelayHealth::new(ms(10_000));
        assert!(h.start_op(t0, [0, 1]).is_empty());
        assert_eq!(h.poll_timeout(), Some(t0 + ms(5_000)));
        // Relay 1 keeps answering; relay 0 goes silent while the op waits on both.
        h.heard_from(1, 100, t0 + ms(3_000));
        h.progress(t0 + ms(3_000));
        assert_eq!(h.poll_timeout(), Some(t0 + ms(5_000)));
        let e = h.handle_timeout(t0 + ms(4_999), |_| true);
        assert_eq!(e, Expired::default());
        let e = h.handle_timeout(t0 + ms(5_000), |_| true);
        assert_eq!(e.stalled, vec![0]);
        assert!(!e.op_timed_out);
        // Its deadline is no wake-up reason any more; relay 1's is.
        assert_eq!(h.poll_timeout(), Some(t0 + ms(8_000)));
        assert!(h.lose(0));
        assert!(!h.lose(0));
    }

    #[test]
    fn when_every_relay_waited_on_is_silent_none_is_dropped_and_the_op_times_out() {
        let t0 = Instant::now();
        let mut h = RelayHealth::new(ms(10_000));
        h.start_op(t0, [0, 1]);
        let e = h.handle_timeout(t0 + ms(6_000), |_| true);
        assert!(e.stalled.is_empty());
        assert!(!e.op_timed_out);
        // Both overdue: the next wake-up is the op's deadline, not a busy loop.
        assert_eq!(h.poll_timeout(), Some(t0 + ms(10_000)));
        let e = h.handle_timeout(t0 + ms(10_000), |_| true);
        assert!(e.stalled.is_empty());
        assert!(e.op_timed_out);
    }

    #[test]
    fn a_silent_relay_owed_nothing_is_kept_until_the_op_waits_on_it() {
        let t0 = Instant::now();
        let mut h = RelayHealth::new(ms(10_000));
        h.start_op(t0, [0, 1]);
        h.heard_from(1, 10, t0 + ms(5_500));
        let e = h.handle_timeout(t0 + ms(6_000), |r| r == 1);
        assert!(e.stalled.is_empty());
        // Later the op hands relay 0 a chunk and relay 1 still answers: 0 is dropped.
        let e = h.handle_timeout(t0 + ms(6_100), |_| true);
        assert_eq!(e.stalled, vec![0]);
    }

    #[test]
    fn lost_relays_are_carried_into_later_ops_and_give_no_samples() {
        let t0 = Instant::now();
        let mut h = RelayHealth::new(ms(10_000));
        h.start_op(t0, [0, 1, 2]);
        h.heard_from(0, 4_000, t0 + ms(2));
        h.heard_from(2, 1_000, t0 + ms(1));
        h.heard_from(1, 9_000, t0 + ms(1));
        h.lose(1);
        let s = h.finish_op();
        assert_eq!(
            s,
            vec![
                RateSample {
                    relay: 0,
                    bytes_per_sec: 2_000_000
                },
                RateSample {
                    relay: 2,
                    bytes_per_sec: 1_000_000
                },
            ]
        );
        assert_eq!(h.poll_timeout(), None);
        assert_eq!(h.start_op(t0 + ms(5), [0, 1, 2]), vec![1]);
        // The lost relay is never a stall candidate again.
        let e = h.handle_timeout(t0 + ms(6_000), |_| true);
        assert!(e.stalled.is_empty());
    }
}

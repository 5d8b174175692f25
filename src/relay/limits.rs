//! What a relay lets strangers hold, and for how long: connection caps, per-connection and
//! per-job deadlines, and a rate limit on the log lines that refused connections cause.
//!
//! Everything here is a pure decision with the time passed in (`now`); the server loop
//! ([`crate::relay::server`]) applies them. Nothing here touches a socket or reads the clock.
//!
//! Deadlines, per connection, reset by progress:
//! * until it authenticates, a connection has [`Limits::handshake_timeout`] from its accept
//!   (a hard limit: a byte now and then does not extend it);
//! * once it has started a frame (part of a header or payload read), every
//!   [`Limits::frame_timeout`] some more of it must arrive;
//! * while frames to it are queued, every [`Limits::idle_timeout`] some must leave;
//! * otherwise it lives as long as its job: a job with no data frame for
//!   [`Limits::idle_timeout`] ends, its connections close and its reservation is released.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Largest `Hello` payload a relay reads, in bytes: nonce, MAC and a [`crate::relay::JobHello`]
/// body take about 120, so this leaves room for growth and none for hoarding memory.
pub const MAX_HELLO_BYTES: usize = 1024;

/// Refused connections logged one by one per [`Limits::reject_log_interval`]; the rest are
/// counted into one summary line at the end of the interval.
pub const DETAILED_REJECTS: usize = 5;

/// How long a refused connection may take to receive its reason before it is closed.
pub const REFUSAL_FLUSH: Duration = Duration::from_secs(2);

/// Caps and deadlines of one relay (the `mr-relayd` flags of the same names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most connections that have not authenticated yet; a new one beyond it evicts the oldest.
    pub max_unauthenticated: usize,
    /// Most memory one job may budget for, in bytes.
    pub max_job_memory: usize,
    /// Time from accept to a verified `Hello`.
    pub handshake_timeout: Duration,
    /// Longest pause inside a frame (authenticated connections too).
    pub frame_timeout: Duration,
    /// Longest time a job goes without a data frame, and a queued frame waits to be written.
    pub idle_timeout: Duration,
    /// How often suppressed rejections are summarised in the log.
    pub reject_log_interval: Duration,
}

impl Limits {
    /// Defaults for a relay with `max_memory` bytes: one job may take half of it.
    pub fn for_memory(max_memory: usize) -> Limits {
        Limits {
            max_unauthenticated: 256,
            max_job_memory: max_memory / 2,
            handshake_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(300),
            reject_log_interval: Duration::from_secs(10),
        }
    }
}

/// What one connection is doing, as far as its deadline is concerned.
#[derive(Clone, Copy, Debug)]
pub struct Activity {
    pub authenticated: bool,
    pub accepted: Instant,
    /// Part of a frame has been read.
    pub mid_frame: bool,
    pub last_read: Instant,
    /// Frames to it are queued.
    pub backlog: bool,
    pub last_write: Instant,
}

/// The connection's earliest deadline and why, or `None` when only its job's idle timeout
/// applies.
pub fn connection_deadline(a: &Activity, l: &Limits) -> Option<(Instant, &'static str)> {
    if !a.authenticated {
        return Some((
            a.accepted + l.handshake_timeout,
            "no authentication within the handshake timeout",
        ));
    }
    let frame = a.mid_frame.then(|| {
        (
            a.last_read + l.frame_timeout,
            "stalled in the middle of a frame",
        )
    });
    let backlog = a.backlog.then(|| {
        (
            a.last_write + l.idle_timeout,
            "not reading the frames sent to it",
        )
    });
    match (frame, backlog) {
        (Some(f), Some(b)) => Some(if f.0 <= b.0 { f } else { b }),
        (f, b) => f.or(b),
    }
}

/// Whether a new connection, arriving while `waiting` connections have not authenticated yet,
/// first evicts the oldest of them.
pub fn evicts_oldest(waiting: usize, l: &Limits) -> bool {
    waiting >= l.max_unauthenticated
}

/// What becomes of a connection at `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It lives on.
    Keep,
    /// Its refusal was delivered, or had [`REFUSAL_FLUSH`] to be: close it quietly.
    Refused,
    /// It missed a deadline ([`connection_deadline`]): close it for this reason.
    Expired(&'static str),
}

/// The verdict on a connection doing `a` at `now`; `refused_at`: when it was refused, if it
/// was (it then waits only for its reason to be flushed).
pub fn verdict(a: &Activity, refused_at: Option<Instant>, l: &Limits, now: Instant) -> Verdict {
    if let Some(since) = refused_at {
        return if !a.backlog || now.saturating_duration_since(since) > REFUSAL_FLUSH {
            Verdict::Refused
        } else {
            Verdict::Keep
        };
    }
    match connection_deadline(a, l) {
        Some((at, why)) if now >= at => Verdict::Expired(why),
        _ => Verdict::Keep,
    }
}

/// Whether a job whose last data frame arrived at `last_data` has expired.
pub fn job_expired(last_data: Instant, now: Instant, l: &Limits) -> bool {
    now.saturating_duration_since(last_data) >= l.idle_timeout
}

/// Rate limit for the log lines of refused and failed connections: the first
/// [`DETAILED_REJECTS`] of every interval are logged one by one, the rest are counted by
/// reason and summarised once the interval is over.
#[derive(Debug)]
pub struct RejectLog {
    interval: Duration,
    since: Instant,
    detailed: usize,
    suppressed: BTreeMap<&'static str, u64>,
}

impl RejectLog {
    pub fn new(interval: Duration, now: Instant) -> RejectLog {
        RejectLog {
            interval,
            since: now,
            detailed: 0,
            suppressed: BTreeMap::new(),
        }
    }

    /// Count one rejection of class `reason`; `true` when it should be logged in detail.
    #[must_use]
    pub fn record(&mut self, now: Instant, reason: &'static str) -> bool {
        self.roll(now);
        if self.detailed < DETAILED_REJECTS {
            self.detailed += 1;
            return true;
        }
        *self.suppressed.entry(reason).or_default() += 1;
        false
    }

    /// The summary of an interval that is over, if anything was suppressed in it.
    #[must_use]
    pub fn poll_summary(&mut self, now: Instant) -> Option<String> {
        if now.saturating_duration_since(self.since) < self.interval {
            return None;
        }
        let total: u64 = self.suppressed.values().sum();
        let summary = (total > 0).then(|| {
            let parts: Vec<String> = self
                .suppressed
                .iter()
                .map(|(r, n)| format!("{n} {r}"))
                .collect();
            format!(
                "{total} more connections refused or failed in the last {:.0} s: {}",
                now.saturating_duration_since(self.since).as_secs_f64(),
                parts.join(", ")
            )
        });
        self.since = now;
        self.detailed = 0;
        self.suppressed.clear();
        summary
    }

    /// When [`Self::poll_summary`] next has something to say.
    pub fn next_summary(&self) -> Option<Instant> {
        (!self.suppressed.is_empty()).then_some(self.since + self.interval)
    }

    fn roll(&mut self, now: Instant) {
        if self.suppressed.is_empty() && now.saturating_duration_since(self.since) >= self.interval
        {
            self.since = now;
            self.detailed = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::for_memory(1 << 30)
    }

    fn activity(t0: Instant) -> Activity {
        Activity {
            authenticated: true,
            accepted: t0,
            mid_frame: false,
            last_read: t0,
            backlog: false,
            last_write: t0,
        }
    }

    #[test]
    fn handshake_deadline_is_hard() {
        let t0 = Instant::now();
        let l = limits();
        let a = Activity {
            authenticated: false,
            last_read: t0 + Duration::from_secs(9),
            ..activity(t0)
        };
        let (at, why) = connection_deadline(&a, &l).unwrap();
        assert_eq!(at, t0 + l.handshake_timeout);
        assert!(why.contains("authentication"));
    }

    #[test]
    fn authenticated_connections_have_frame_and_backlog_deadlines() {
        let t0 = Instant::now();
        let l = limits();
        assert_eq!(connection_deadline(&activity(t0), &l), None);
        let mid = Activity {
            mid_frame: true,
            last_read: t0 + Duration::from_secs(3),
            ..activity(t0)
        };
        let (at, why) = connection_deadline(&mid, &l).unwrap();
        assert_eq!(at, t0 + Duration::from_secs(3) + l.frame_timeout);
        assert!(why.contains("middle of a frame"));
        let both = Activity {
            backlog: true,
            ..mid
        };
        assert_eq!(connection_deadline(&both, &l).unwrap().0, at);
        let backlog = Activity {
            backlog: true,
            ..activity(t0)
        };
        assert_eq!(
            connection_deadline(&backlog, &l).unwrap().0,
            t0 + l.idle_timeout
        );
    }

    #[test]
    fn verdicts_follow_the_deadlines() {
        let t0 = Instant::now();
        let l = limits();
        let waiting = Activity {
            authenticated: false,
            ..activity(t0)
        };
        let just_before = t0 + l.handshake_timeout - Duration::from_millis(1);
        assert_eq!(verdict(&waiting, None, &l, just_before), Verdict::Keep);
        assert_eq!(
            verdict(&waiting, None, &l, t0 + l.handshake_timeout),
            Verdict::Expired("no authentication within the handshake timeout")
        );
        // An authenticated connection with nothing pending lives as long as its job.
        let far = t0 + Duration::from_secs(100_000);
        assert_eq!(verdict(&activity(t0), None, &l, far), Verdict::Keep);
        let stuck = Activity {
            backlog: true,
            ..activity(t0)
        };
        assert_eq!(
            verdict(&stuck, None, &l, t0 + l.idle_timeout),
            Verdict::Expired("not reading the frames sent to it")
        );
    }

    #[test]
    fn a_refused_connection_closes_once_its_reason_is_out_or_late() {
        let t0 = Instant::now();
        let l = limits();
        let flushing = Activity {
            authenticated: false,
            backlog: true,
            ..activity(t0)
        };
        // Refusal, not the handshake deadline, decides: the reason gets its time to leave.
        let at = t0 + l.handshake_timeout;
        assert_eq!(verdict(&flushing, Some(at), &l, at), Verdict::Keep);
        assert_eq!(
            verdict(&flushing, Some(at), &l, at + REFUSAL_FLUSH),
            Verdict::Keep
        );
        let late = at + REFUSAL_FLUSH + Duration::from_millis(1);
        assert_eq!(verdict(&flushing, Some(at), &l, late), Verdict::Refused);
        let flushed = Activity {
            backlog: false,
            ..flushing
        };
        assert_eq!(verdict(&flushed, Some(at), &l, at), Verdict::Refused);
    }

    #[test]
    fn the_unauthenticated_cap_evicts_at_the_limit() {
        let l = Limits {
            max_unauthenticated: 3,
            ..limits()
        };
        assert!(!evicts_oldest(0, &l));
        assert!(!evicts_oldest(2, &l));
        assert!(evicts_oldest(3, &l));
        assert!(evicts_oldest(4, &l));
    }

    #[test]
    fn jobs_expire_after_the_idle_timeout() {
        let t0 = Instant::now();
        let l = limits();
        assert!(!job_expired(t0, t0 + l.idle_timeout / 2, &l));
        assert!(job_expired(t0, t0 + l.idle_timeout, &l));
        // A clock that seems to go backwards never expires a job.
        assert!(!job_expired(t0 + l.idle_timeout, t0, &l));
    }

    #[test]
    fn rejections_beyond_the_first_few_become_one_summary() {
        let t0 = Instant::now();
        let mut log = RejectLog::new(Duration::from_secs(10), t0);
        let detailed = (0..1000)
            .filter(|i| {
                let why = if i % 2 == 0 {
                    "handshake timeout"
                } else {
                    "evicted"
                };
                log.record(t0 + Duration::from_millis(*i), why)
            })
            .count();
        assert_eq!(detailed, DETAILED_REJECTS);
        assert_eq!(log.poll_summary(t0 + Duration::from_secs(5)), None);
        assert_eq!(log.next_summary(), Some(t0 + Duration::from_secs(10)));
        let s = log.poll_summary(t0 + Duration::from_secs(10)).unwrap();
        assert!(s.starts_with("995 more connections"), "{s}");
        assert!(
            s.contains("498 evicted") && s.contains("497 handshake timeout"),
            "{s}"
        );
        // A new interval logs in detail again, and a quiet one says nothing.
        assert!(log.record(t0 + Duration::from_secs(11), "evicted"));
        assert_eq!(log.poll_summary(t0 + Duration::from_secs(30)), None);
        assert_eq!(log.next_summary(), None);
    }
}

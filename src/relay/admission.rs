//! Whether a relay takes a peer into a job: pure decisions over what the peer sent, the keys
//! the relay holds, the job as the relay knows it, and the memory already reserved. Never does
//! I/O, never changes the relay's books; the server applies the answer.
//!
//! First [`authenticate`]: the peer's `Hello` must prove the key of the job it names (a job
//! granted by a validator has its own) or else the relay's static token. Then [`decide`].
//!
//! A new job reserves its worst case ([`JobHello::budget`]) for as long as it lives; it is
//! refused when that exceeds the per-job cap (so one announcement cannot take the whole relay)
//! or what is left under the relay's total.

use crate::error::ErrorKind;
use crate::relay::JobHello;
use crate::wire::{Hello, NONCE_LEN};

/// What the relay knows about a job the peer names.
#[derive(Clone, Copy, Debug)]
pub struct KnownJob<'a> {
    /// What the job's first peer announced.
    pub hello: &'a JobHello,
    /// Connections the announcing rank already has in the job.
    pub rank_streams: usize,
}

/// The relay's memory books.
#[derive(Clone, Copy, Debug)]
pub struct Reservations {
    /// Bytes reserved by the jobs that are running.
    pub reserved: usize,
    /// Most bytes all jobs together may reserve.
    pub max_memory: usize,
    /// Most bytes one job may reserve.
    pub max_job_memory: usize,
}

/// The answer to one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Another stream of a job that is running.
    Join,
    /// A new job, reserving `budget` bytes.
    NewJob { budget: usize },
    /// Refused: the reason goes to the peer (and the log), `kind` is its error kind.
    Refuse { kind: ErrorKind, reason: String },
}

/// Why a peer is turned away; the reason goes to the peer (and the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub kind: ErrorKind,
    pub reason: String,
}

/// Check `hello`, the answer to `challenge`: the key it proved and the job it announced, or
/// why it is refused. `granted` gives the key of a job a validator granted (by job id);
/// `fixed` is the key of the relay's static token, if it has one.
pub fn authenticate(
    hello: &Hello<'_>,
    challenge: &[u8; NONCE_LEN],
    granted: impl FnOnce(&[u8; 16]) -> Option<[u8; 32]>,
    fixed: Option<[u8; 32]>,
) -> Result<([u8; 32], JobHello), Refusal> {
    let refuse = |kind, reason: &str| Refusal {
        kind,
        reason: reason.to_string(),
    };
    // A job granted by the validator has its own token; others use the static one.
    let granted = JobHello::decode(hello.body)
        .ok()
        .and_then(|jh| granted(&jh.job));
    let Some(key) = granted.or(fixed) else {
        return Err(refuse(
            ErrorKind::Auth,
            "authentication failed: unknown job",
        ));
    };
    if !hello.verify(&key, challenge) {
        return Err(refuse(
            ErrorKind::Auth,
            "authentication failed: wrong job token",
        ));
    }
    match JobHello::decode(hello.body) {
        Ok(jh) => Ok((key, jh)),
        Err(e) => Err(Refusal {
            kind: e.kind,
            reason: e.message,
        }),
    }
}

/// Decide on `hello`, from a peer that proved the job's token.
pub fn decide(hello: &JobHello, known: Option<KnownJob<'_>>, books: Reservations) -> Admission {
    let tag = crate::config::to_hex(&hello.job[..4]);
    if let Some(k) = known {
        let j = k.hello;
        let same = JobHello {
            rank: hello.rank,
            stream: hello.stream,
            ..j.clone()
        };
        if same != *hello {
            return Admission::Refuse {
                kind: ErrorKind::InvalidArgument,
                reason: format!(
                    "job {tag}: rank {} announced world {}, {} streams, {}-byte chunks, window {}, \
                     but the job has world {}, {} streams, {}-byte chunks, window {}",
                    hello.rank,
                    hello.world,
                    hello.streams,
                    hello.chunk_bytes,
                    hello.window,
                    j.world,
                    j.streams,
                    j.chunk_bytes,
                    j.window
                ),
            };
        }
        if k.rank_streams >= hello.streams {
            return Admission::Refuse {
                kind: ErrorKind::InvalidArgument,
                reason: format!(
                    "job {tag}: rank {} connected more than {} streams",
                    hello.rank, hello.streams
                ),
            };
        }
        return Admission::Join;
    }
    let budget = hello.budget();
    if budget > books.max_job_memory {
        return Admission::Refuse {
            kind: ErrorKind::InvalidArgument,
            reason: format!(
                "job {tag} needs up to {budget} bytes ({} peers × window {} × {}-byte chunks), \
                 over this relay's limit of {} bytes per job",
                hello.world, hello.window, hello.chunk_bytes, books.max_job_memory
            ),
        };
    }
    if books.reserved.saturating_add(budget) > books.max_memory {
        return Admission::Refuse {
            kind: ErrorKind::Remote,
            reason: format!(
                "relay is full: job {tag} needs up to {budget} bytes, {} of {} bytes are reserved",
                books.reserved, books.max_memory
            ),
        };
    }
    Admission::NewJob { budget }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(chunk_bytes: usize, window: usize) -> JobHello {
        JobHello {
            job: [3; 16],
            rank: 0,
            world: 2,
            stream: 0,
            streams: 2,
            chunk_bytes,
            window,
        }
    }

    const GIB: usize = 1 << 30;

    fn books(reserved: usize) -> Reservations {
        Reservations {
            reserved,
            max_memory: 2 * GIB,
            max_job_memory: GIB / 2,
        }
    }

    #[test]
    fn a_granted_job_proves_its_own_key_and_others_the_static_one() {
        let challenge = [9; NONCE_LEN];
        let (job_key, static_key) = ([1; 32], [2; 32]);
        let h = hello(64 << 10, 8);
        let body = h.encode();
        let grants = |job: &[u8; 16]| (*job == h.job).then_some(job_key);
        let ok = Hello::sign(&job_key, &challenge, &body);
        assert_eq!(
            authenticate(&ok, &challenge, grants, Some(static_key)),
            Ok((job_key, h.clone()))
        );
        // The static token does not open a granted job.
        let other = Hello::sign(&static_key, &challenge, &body);
        let wrong = authenticate(&other, &challenge, grants, Some(static_key)).unwrap_err();
        assert_eq!(wrong.kind, ErrorKind::Auth);
        assert_eq!(wrong.reason, "authentication failed: wrong job token");
        // A job nobody granted proves the static token, if there is one.
        assert_eq!(
            authenticate(&other, &challenge, |_| None, Some(static_key)),
            Ok((static_key, h.clone()))
        );
        let unknown = authenticate(&other, &challenge, |_| None, None).unwrap_err();
        assert_eq!(unknown.reason, "authentication failed: unknown job");
        // A proof for another challenge (a replay) fails.
        let replay = authenticate(&other, &[8; NONCE_LEN], |_| None, Some(static_key));
        assert_eq!(
            replay.unwrap_err().reason,
            "authentication failed: wrong job token"
        );
    }

    #[test]
    fn a_proven_but_malformed_announcement_is_refused_with_its_fault() {
        let challenge = [9; NONCE_LEN];
        let key = [2; 32];
        let body = hello(64 << 10, 0).encode();
        let signed = Hello::sign(&key, &challenge, &body);
        let r = authenticate(&signed, &challenge, |_| None, Some(key)).unwrap_err();
        assert_eq!(r.kind, ErrorKind::InvalidArgument);
        assert!(r.reason.contains("window 0"), "{}", r.reason);
    }

    #[test]
    fn one_announcement_cannot_take_the_relay() {
        // 2 peers × 64 chunks of 4 MiB: more than the whole 2 GiB.
        let h = hello(4 << 20, 64);
        assert!(h.budget() >= 2 * GIB);
        match decide(&h, None, books(0)) {
            Admission::Refuse { kind, reason } => {
                assert_eq!(kind, ErrorKind::InvalidArgument);
                assert!(
                    reason.contains("limit of 536870912 bytes per job"),
                    "{reason}"
                );
            }
            a => panic!("admitted: {a:?}"),
        }
    }

    #[test]
    fn new_jobs_fit_under_the_total() {
        let h = hello(64 << 10, 64);
        let budget = h.budget();
        assert_eq!(decide(&h, None, books(0)), Admission::NewJob { budget });
        assert_eq!(
            decide(&h, None, books(2 * GIB - budget)),
            Admission::NewJob { budget }
        );
        match decide(&h, None, books(2 * GIB - budget + 1)) {
            Admission::Refuse { kind, reason } => {
                assert_eq!(kind, ErrorKind::Remote);
                assert!(reason.starts_with("relay is full"), "{reason}");
            }
            a => panic!("admitted: {a:?}"),
        }
    }

    #[test]
    fn known_jobs_take_matching_streams_only() {
        let first = hello(64 << 10, 8);
        let second = JobHello {
            rank: 1,
            stream: 1,
            ..first.clone()
        };
        let known = |rank_streams| {
            Some(KnownJob {
                hello: &first,
                rank_streams,
            })
        };
        // Joining needs no new reservation, even on a full relay.
        assert_eq!(decide(&second, known(1), books(2 * GIB)), Admission::Join);
        assert!(matches!(
            decide(&second, known(2), books(0)),
            Admission::Refuse { reason, .. } if reason.contains("more than 2 streams")
        ));
        let other = JobHello {
            window: 9,
            ..second
        };
        assert!(matches!(
            decide(&other, known(0), books(0)),
            Admission::Refuse { reason, .. } if reason.contains("window 9")
        ));
    }
}

//! Which op a frame belongs to, and what to do with it: one rank's record of the ops that
//! ended here and of failures peers reported for ops that have not started here.
//!
//! Ops run one after another on every rank, but ranks are not in step: a fast rank's frames
//! for op k+1 can arrive while this rank still runs op k. Such a frame is **parked**: the
//! progress loop leaves it (and everything behind it) in the socket until op k+1 starts, so
//! the fast rank is held back by TCP flow control instead of our memory. Frames of an op that
//! already ended here (it failed, and the sender did not know yet) are read and dropped.
//!
//! Point-to-point messages are routed by their peer pair's own sequence, not the op's
//! ([`crate::algo::p2p`]): a frame goes to the current op if that op receives it, is dropped
//! if it belongs to a message whose op ended here, and is parked otherwise.
//!
//! No I/O: the progress loop and the simulator ask [`Sequencer::route`] for each header and
//! tell it when ops end.

use crate::algo::p2p::PairRange;
use crate::algo::{Collective, Endpoint};
use crate::error::Error;
use crate::wire::{FrameHeader, FrameKind};
use std::collections::HashMap;

/// What to do with a frame whose header arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// A data frame of the current op: hand it to the op's schedule.
    ToCurrentOp,
    /// Read the payload into the connection's buffer and act on it there (a failure report
    /// or a goodbye).
    Control,
    /// It belongs to an op that has not started here: leave it where it is until one starts.
    Park,
    /// It belongs to an op that ended here: read it and drop it.
    Discard,
    /// No frame of this kind is expected after the handshake: the link is broken.
    Unexpected,
}

/// What a peer's failure report means here.
#[derive(Debug, PartialEq)]
pub enum Report {
    /// The op running here failed too, with this error.
    FailsCurrentOp(Error),
    /// It concerns an op that has not started here: remembered, and that op fails when it
    /// starts.
    Remembered,
    /// It concerns an op that already ended here.
    Ignored,
}

/// The current op, as far as routing is concerned.
#[derive(Clone, Copy, Debug)]
pub struct CurrentOp<'a> {
    pub seq: u64,
    /// Its point-to-point messages (empty for collectives).
    pub p2p: &'a [PairRange],
}

/// One rank's op bookkeeping (see the module docs).
#[derive(Debug, Default)]
pub struct Sequencer {
    /// Sequence number of the last op that ended here.
    last_seq: u64,
    /// Ops that peers reported failed before they started here.
    remote_failures: HashMap<u64, Error>,
    /// Per peer and direction (sends to it: true), the pair sequence after the last
    /// point-to-point message of an op that has ended here. Frames of earlier messages from
    /// a peer (the rest of a message whose op failed) are read and dropped instead of
    /// parking the connection for good.
    p2p_retired: HashMap<(usize, bool), u64>,
    /// Point-to-point messages a peer reported failed before the op holding them started
    /// here, in this rank's terms: that op fails when it starts.
    p2p_failures: Vec<(PairRange, Error)>,
}

impl Sequencer {
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Where the frame with header `h` from `ep` goes. `current`: the op running here, if
    /// any; `accepts_p2p`: whether that op receives this point-to-point frame (asked only
    /// for point-to-point frames).
    pub fn route(
        &self,
        ep: Endpoint,
        h: &FrameHeader,
        current: Option<u64>,
        accepts_p2p: impl FnOnce() -> bool,
    ) -> Route {
        let p2p = h.coll == Collective::PointToPoint as u8;
        match h.kind() {
            FrameKind::OpError if p2p => {
                // A point-to-point group failed at `ep`: only the op exchanging messages with
                // it now is concerned (see `report`); nothing waits for it later.
                Route::Control
            }
            FrameKind::OpError => {
                if Some(h.seq) != current && h.seq > self.last_seq {
                    Route::Park // read it when its op starts
                } else {
                    Route::Control
                }
            }
            FrameKind::Data if p2p => {
                if current.is_some() && accepts_p2p() {
                    Route::ToCurrentOp
                } else if self.p2p_stale(ep, h) {
                    Route::Discard
                } else {
                    Route::Park
                }
            }
            FrameKind::Data => {
                if Some(h.seq) == current {
                    Route::ToCurrentOp
                } else if h.seq <= self.last_seq {
                    Route::Discard
                } else {
                    Route::Park
                }
            }
            FrameKind::Goodbye => Route::Control, // acted on once its tag checked
            _ => Route::Unexpected,
        }
    }

    /// Op `seq` ended here (however it ended); `p2p`: its point-to-point messages, which
    /// are over now: what still arrives of them is stale.
    pub fn ended(&mut self, seq: u64, p2p: &[PairRange]) {
        self.last_seq = seq;
        self.retire_p2p(p2p);
    }

    /// An op that starts here was reported failed by a peer before it started: the error,
    /// and the op counts as ended.
    pub fn take_remote_failure(&mut self, seq: u64, p2p: &[PairRange]) -> Option<Error> {
        let err = self.remote_failures.remove(&seq)?;
        self.ended(seq, p2p);
        Some(err)
    }

    /// A failure a peer reported for point-to-point messages of an op that starts here.
    /// The op's messages count as over.
    pub fn take_p2p_failure(&mut self, p2p: &[PairRange]) -> Option<Error> {
        let err = self
            .p2p_failures
            .iter()
            .find(|(f, _)| p2p.iter().any(|r| r.overlaps(f.peer, f.sends, f.lo, f.hi)))
            .map(|(_, e)| e.clone())?;
        self.retire_p2p(p2p);
        Some(err)
    }

    /// Peer `ep` reported the failure `err` with header `h` (an [`FrameKind::OpError`]).
    pub fn report(
        &mut self,
        ep: Endpoint,
        h: &FrameHeader,
        err: Error,
        current: Option<CurrentOp<'_>>,
    ) -> Report {
        if h.coll == Collective::PointToPoint as u8 {
            // `ep` was sending us (redop 1) or receiving from us (redop 0) messages
            // seq..=count; in this rank's terms:
            let Endpoint::Rank(peer) = ep else {
                return Report::Ignored;
            };
            let failed = PairRange {
                peer,
                sends: h.redop == 0,
                lo: h.seq,
                hi: h.count,
            };
            let concerned = current.is_some_and(|c| {
                c.p2p
                    .iter()
                    .any(|r| r.overlaps(failed.peer, failed.sends, failed.lo, failed.hi))
            });
            let retired = self
                .p2p_retired
                .get(&(failed.peer, failed.sends))
                .copied()
                .unwrap_or(0);
            log::debug!(
                "{ep} reports point-to-point messages {failed:?} failed (current op \
                 concerned: {concerned}, retired up to {retired}): {}",
                err.message
            );
            return if concerned {
                Report::FailsCurrentOp(err)
            } else if failed.hi >= retired {
                self.p2p_failures.push((failed, err));
                Report::Remembered
            } else {
                Report::Ignored
            };
        }
        if current.is_some_and(|c| c.seq == h.seq) {
            Report::FailsCurrentOp(err)
        } else if h.seq > self.last_seq {
            self.remote_failures.insert(h.seq, err);
            Report::Remembered
        } else {
            Report::Ignored
        }
    }

    fn retire_p2p(&mut self, ranges: &[PairRange]) {
        if ranges.is_empty() {
            return;
        }
        for r in ranges {
            let next = self.p2p_retired.entry((r.peer, r.sends)).or_insert(0);
            *next = (*next).max(r.hi + 1);
        }
        let retired = &self.p2p_retired;
        self.p2p_failures
            .retain(|(f, _)| f.hi >= retired.get(&(f.peer, f.sends)).copied().unwrap_or(0));
    }

    /// Whether a point-to-point frame from `ep` belongs to a message whose op ended here.
    fn p2p_stale(&self, ep: Endpoint, h: &FrameHeader) -> bool {
        match ep {
            Endpoint::Rank(r) => self
                .p2p_retired
                .get(&(r, false))
                .is_some_and(|&next| h.seq < next),
            Endpoint::Relay(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(seq: u64) -> FrameHeader {
        let mut h = FrameHeader::new(FrameKind::Data, 0);
        h.seq = seq;
        h
    }

    #[test]
    fn frames_of_later_ops_park_and_frames_of_ended_ops_are_dropped() {
        let mut s = Sequencer::default();
        let ep = Endpoint::Rank(1);
        assert_eq!(s.route(ep, &data(1), Some(1), || false), Route::ToCurrentOp);
        assert_eq!(s.route(ep, &data(2), Some(1), || false), Route::Park);
        assert_eq!(s.route(ep, &data(2), None, || false), Route::Park);
        s.ended(1, &[]);
        assert_eq!(s.route(ep, &data(1), None, || false), Route::Discard);
        assert_eq!(s.route(ep, &data(2), Some(2), || false), Route::ToCurrentOp);
        let bye = FrameHeader::new(FrameKind::Goodbye, 0);
        assert_eq!(s.route(ep, &bye, Some(2), || false), Route::Control);
        let hello = FrameHeader::new(FrameKind::Hello, 0);
        assert_eq!(s.route(ep, &hello, Some(2), || false), Route::Unexpected);
    }

    #[test]
    fn a_failure_reported_early_fails_its_op_when_it_starts() {
        let mut s = Sequencer::default();
        let ep = Endpoint::Rank(2);
        let h = FrameHeader::op_error(3, crate::error::ErrorKind::Remote, 4);
        // Parked while op 3 has not started and op 1 runs...
        assert_eq!(s.route(ep, &h, Some(1), || false), Route::Park);
        // ...read once some op runs that is not earlier than it (here: its own).
        assert_eq!(s.route(ep, &h, Some(3), || false), Route::Control);
        let err = Error::remote("rank 2: boom");
        let cur = CurrentOp { seq: 2, p2p: &[] };
        assert_eq!(s.report(ep, &h, err.clone(), Some(cur)), Report::Remembered);
        assert_eq!(s.take_remote_failure(2, &[]), None);
        assert_eq!(s.take_remote_failure(3, &[]), Some(err.clone()));
        assert_eq!(s.last_seq(), 3);
        // A report for an op that ended here changes nothing.
        assert_eq!(s.report(ep, &h, err, None), Report::Ignored);
    }

    #[test]
    fn point_to_point_frames_follow_their_pair_sequence() {
        let mut s = Sequencer::default();
        let ep = Endpoint::Rank(1);
        let mut h = data(5);
        h.coll = Collective::PointToPoint as u8;
        assert_eq!(s.route(ep, &h, Some(9), || true), Route::ToCurrentOp);
        assert_eq!(s.route(ep, &h, Some(9), || false), Route::Park);
        let recv = PairRange {
            peer: 1,
            sends: false,
            lo: 4,
            hi: 5,
        };
        s.ended(9, &[recv]);
        assert_eq!(s.route(ep, &h, Some(10), || false), Route::Discard);
        h.seq = 6;
        assert_eq!(s.route(ep, &h, Some(10), || false), Route::Park);
        // A peer reports messages 6..=7 it sends us failed: the op receiving them fails
        // when it starts.
        let mut e = FrameHeader::op_error(6, crate::error::ErrorKind::Remote, 0);
        e.coll = Collective::PointToPoint as u8;
        e.redop = 1;
        e.count = 7;
        let err = Error::remote("rank 1: gone");
        assert_eq!(s.report(ep, &e, err.clone(), None), Report::Remembered);
        let later = PairRange {
            peer: 1,
            sends: false,
            lo: 6,
            hi: 6,
        };
        assert_eq!(s.take_p2p_failure(&[later]), Some(err));
        // Those messages are over: a second report about them is ignored.
        e.count = 6;
        assert_eq!(
            s.report(ep, &e, Error::remote("again"), None),
            Report::Ignored
        );
    }
}

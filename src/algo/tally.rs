//! The byte tally every rank-to-rank schedule keeps: what it queued, sent and received, and
//! how much of each it expects, so that "complete" is one comparison.

use crate::algo::Transmit;
use std::collections::VecDeque;

/// Byte counters shared by every schedule: a schedule is complete when both sides balance.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    queue: VecDeque<Transmit>,
    pub(crate) send_expected: usize,
    handed_out: usize,
    sent: usize,
    pub(crate) recv_expected: usize,
    pub(crate) received: usize,
}

impl Tally {
    /// A tally that expects `send` bytes out and `recv` bytes in.
    pub(crate) fn expecting(send: usize, recv: usize) -> Tally {
        Tally {
            send_expected: send,
            recv_expected: recv,
            ..Tally::default()
        }
    }
    pub(crate) fn push(&mut self, t: Transmit) {
        self.queue.push_back(t);
    }
    pub(crate) fn pop(&mut self) -> Option<Transmit> {
        let t = self.queue.pop_front()?;
        self.handed_out += 1;
        Some(t)
    }
    pub(crate) fn sent(&mut self, t: &Transmit) {
        self.sent += t.region.len();
    }
    pub(crate) fn complete(&self) -> bool {
        self.queue.is_empty()
            && self.sent == self.send_expected
            && self.received == self.recv_expected
    }
    pub(crate) fn describe(&self) -> String {
        format!(
            "received {} of {} bytes, sent {} of {} bytes",
            self.received, self.recv_expected, self.sent, self.send_expected
        )
    }
}

//! Recursive doubling among the ranks: small all-reduces, and barriers (the same exchange
//! with empty payloads). Frame `aux` is the exchange step (0: a folded rank's data, 1..=log2 p
//! the exchanges, log2 p + 1: the result back to the folded rank); offsets are always 0, each
//! frame carrying the whole buffer.

use crate::algo::tally::Tally;
use crate::algo::{Endpoint, OpDesc, Schedule, Transmit};
use crate::buffer::{OpMemory, Region};
use crate::error::{Error, Result};
use crate::reduce;
use crate::types::{DType, ReduceOp};
use crate::wire::FrameHeader;

/// Recursive doubling over the largest power of two p ≤ n ranks; the n − p extra ranks first
/// fold their data into a neighbour and get the result back at the end. Partners combine in
/// rank order (lower group on the left), so every rank computes the same bits. Used for small
/// all-reduces (latency ⌈log2 n⌉ + 2 steps instead of 2(n−1)) and, with empty payloads, for
/// barriers.
pub struct RecursiveDoubling {
    desc: OpDesc,
    n: usize,
    role: Role,
    /// Exchange steps among the participants (log2 p).
    steps: usize,
    /// Next exchange step to run.
    step: usize,
    /// Our frame of the current step has been written.
    step_sent: bool,
    step_queued: bool,
    /// The folded partner's data has been combined (true when there is none).
    folded_in: bool,
    /// The caller's data has been loaded into the accumulator.
    loaded: bool,
    /// Frames sent and received so far, and how many there will be. Counted in frames, not
    /// bytes: barriers exchange empty frames.
    frames_sent: usize,
    frames_received: usize,
    frames_expected: usize,
    /// Partner data that arrived early, by step (0 = fold-in).
    stash: Vec<Option<Vec<u8>>>,
    finished: bool,
    tally: Tally,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Sends its data to `partner`, receives the result.
    Folded { partner: usize },
    /// Takes part in the exchange as `id`, with an optional folded partner.
    Participant { id: usize, folded: Option<usize> },
}

const FOLD_IN: u32 = 0;

impl RecursiveDoubling {
    pub fn new(desc: OpDesc, rank: usize, n: usize) -> RecursiveDoubling {
        let p = if n == 0 {
            1
        } else {
            1usize << (usize::BITS - 1 - n.leading_zeros())
        };
        let extra = n - p;
        let role = if rank < 2 * extra {
            if rank % 2 == 0 {
                Role::Folded { partner: rank + 1 }
            } else {
                Role::Participant {
                    id: rank / 2,
                    folded: Some(rank - 1),
                }
            }
        } else {
            Role::Participant {
                id: rank - extra,
                folded: None,
            }
        };
        let steps = p.trailing_zeros() as usize;
        let acc_bytes = desc.count * desc.dtype.accumulator().size();
        let user_bytes = desc.count * desc.dtype.size();
        let mut tally = Tally::default();
        match role {
            Role::Folded { .. } => {
                tally.send_expected = acc_bytes;
                tally.recv_expected = user_bytes;
            }
            Role::Participant { folded, .. } => {
                tally.send_expected = steps * acc_bytes;
                tally.recv_expected = steps * acc_bytes;
                if folded.is_some() {
                    tally.send_expected += user_bytes;
                    tally.recv_expected += acc_bytes;
                }
            }
        }
        RecursiveDoubling {
            desc,
            n,
            role,
            steps,
            step: 0,
            step_sent: false,
            step_queued: false,
            folded_in: !matches!(
                role,
                Role::Participant {
                    folded: Some(_),
                    ..
                }
            ),
            loaded: false,
            frames_sent: 0,
            frames_received: 0,
            frames_expected: match role {
                Role::Folded { .. } => 1,
                Role::Participant { folded, .. } => steps + usize::from(folded.is_some()),
            },
            stash: vec![None; steps + 1],
            finished: false,
            tally,
        }
    }

    fn id_to_rank(&self, id: usize) -> usize {
        let p = 1usize << self.steps;
        let extra = self.n - p;
        if id < extra {
            2 * id + 1
        } else {
            id + extra
        }
    }

    /// On the first event: load the caller's data; a folded rank hands it to its partner.
    fn ensure_loaded(&mut self, mem: &mut OpMemory) {
        if self.loaded {
            return;
        }
        self.loaded = true;
        self.load(mem);
        if let Role::Folded { partner } = self.role {
            let len = mem.acc().len();
            let header = self.desc.header(FOLD_IN, 0, len);
            self.tally.push(Transmit {
                to: Endpoint::Rank(partner),
                header,
                region: Region::Acc { offset: 0, len },
                forward: false,
            });
            self.finished = true;
        }
    }

    fn fold_out_step(&self) -> u32 {
        self.steps as u32 + 1
    }

    /// Load the caller's data into the accumulator.
    fn load(&self, mem: &mut OpMemory) {
        let dtype = self.desc.dtype;
        let user = mem.user.as_slice();
        let acc = mem
            .acc
            .as_mut()
            .expect("recursive doubling has an accumulator")
            .as_mut_slice();
        if dtype.accumulator() == dtype {
            acc.copy_from_slice(user);
        } else {
            reduce::widen(dtype, acc, user);
        }
    }

    /// `acc = op(left, right)` where one side is `acc` and the other `other`.
    fn combine(&self, mem: &mut OpMemory, other: &[u8], other_is_left: bool) {
        let acc_dtype = self.desc.dtype.accumulator();
        let op = self.desc.op;
        let acc = mem.acc_mut();
        if other_is_left {
            let mut left = other.to_vec();
            reduce::reduce(acc_dtype, op, &mut left, acc);
            acc.copy_from_slice(&left);
        } else {
            reduce::reduce(acc_dtype, op, acc, other);
        }
    }

    /// Run every step whose inputs are present; queue the sends they allow.
    fn advance(&mut self, mem: &mut OpMemory) {
        let Role::Participant { id, folded } = self.role else {
            return;
        };
        if !self.folded_in {
            // The folded partner (always the lower rank) goes first.
            let Some(data) = self.stash[0].take() else {
                return;
            };
            self.combine(mem, &data, true);
            self.folded_in = true;
        }
        loop {
            if self.step == self.steps {
                if !self.finished {
                    self.finish(mem, folded);
                }
                return;
            }
            let partner_id = id ^ (1 << self.step);
            if !self.step_queued {
                let len = mem.acc().len();
                let header = self.desc.header(self.step as u32 + 1, 0, len);
                let to = Endpoint::Rank(self.id_to_rank(partner_id));
                self.tally.push(Transmit {
                    to,
                    header,
                    region: Region::Acc { offset: 0, len },
                    forward: false,
                });
                self.step_queued = true;
                self.step_sent = false;
                return;
            }
            if !self.step_sent {
                return;
            }
            let Some(data) = self.stash[self.step + 1].take() else {
                return;
            };
            self.combine(mem, &data, partner_id < id);
            self.step += 1;
            self.step_queued = false;
        }
    }

    fn finish(&mut self, mem: &mut OpMemory, folded: Option<usize>) {
        self.finished = true;
        let dtype = self.desc.dtype;
        if self.desc.op == ReduceOp::Avg {
            reduce::divide(dtype.accumulator(), mem.acc_mut(), self.n);
        }
        write_result(dtype, mem);
        if let Some(partner) = folded {
            let len = mem.user.len();
            let header = self.desc.header(self.fold_out_step(), 0, len);
            self.tally.push(Transmit {
                to: Endpoint::Rank(partner),
                header,
                region: Region::User { offset: 0, len },
                forward: false,
            });
        }
    }
}

/// Copy (or round) the accumulator into the caller's buffer.
fn write_result(dtype: DType, mem: &mut OpMemory) {
    let acc = mem.acc.as_ref().expect("accumulator").as_slice();
    let user = mem.user.as_mut_slice();
    if dtype.accumulator() == dtype {
        user.copy_from_slice(acc);
    } else {
        reduce::narrow(dtype, user, acc);
    }
}

impl Schedule for RecursiveDoubling {
    fn desc(&self) -> &OpDesc {
        &self.desc
    }

    fn poll_transmit(&mut self, mem: &mut OpMemory) -> Option<Transmit> {
        self.ensure_loaded(mem);
        self.advance(mem);
        self.tally.pop()
    }

    fn handle_sent(&mut self, t: &Transmit) {
        self.tally.sent(t);
        self.frames_sent += 1;
        if let Role::Participant { .. } = self.role {
            if t.header.aux == self.step as u32 + 1 {
                self.step_sent = true;
            }
        }
    }

    fn handle_frame(
        &mut self,
        mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
        payload: &[u8],
    ) -> Result<()> {
        self.desc.check_matches(from, h)?;
        let acc_len = self.desc.count * self.desc.dtype.accumulator().size();
        let desc = self.desc;
        let bad = |what: &str| {
            Error::remote(format!(
                "{desc}: {from} sent {} bytes for step {}: {what}",
                payload.len(),
                h.aux
            ))
        };
        if h.offset != 0 {
            return Err(bad("nonzero offset"));
        }
        self.ensure_loaded(mem);
        match self.role {
            Role::Folded { partner } => {
                if from != Endpoint::Rank(partner)
                    || h.aux != self.fold_out_step()
                    || payload.len() != mem.user.len()
                {
                    return Err(bad("unexpected for a folded rank"));
                }
                self.tally.received += payload.len();
                self.frames_received += 1;
                mem.user.as_mut_slice().copy_from_slice(payload);
            }
            Role::Participant { id, folded } => {
                let step = h.aux as usize;
                let expected_from = if step == 0 {
                    folded
                } else if step <= self.steps {
                    Some(self.id_to_rank(id ^ (1 << (step - 1))))
                } else {
                    None
                };
                if expected_from.map(Endpoint::Rank) != Some(from)
                    || payload.len() != acc_len
                    || self.stash[step].is_some()
                {
                    return Err(bad("unexpected step, sender or size"));
                }
                if step > 0 && step <= self.step {
                    return Err(bad("duplicate step"));
                }
                self.tally.received += payload.len();
                self.frames_received += 1;
                self.stash[step] = Some(payload.to_vec());
                self.advance(mem);
            }
        }
        Ok(())
    }

    fn is_complete(&self) -> bool {
        self.finished
            && self.tally.complete()
            && self.frames_sent == self.frames_expected
            && self.frames_received == self.frames_expected
    }

    fn waiting_for(&self) -> String {
        format!(
            "{} (recursive doubling, role {:?}, step {} of {})",
            self.tally.describe(),
            self.role,
            self.step,
            self.steps
        )
    }
}

//! Misbehaviour on demand, so that tests can check verification and fail-over against a real
//! `mr-relayd` (debug builds only; a release build reads none of these variables):
//!
//! * `MR_RELAY_TEST_CORRUPT=f` perturbs every element of a fraction `f` of result chunks;
//! * `MR_RELAY_TEST_EQUIVOCATE=f` sends other bytes to every rank but 0 for a fraction `f` of
//!   chunks;
//! * `MR_RELAY_TEST_DELAY_US=n` sleeps `n` µs on every data frame, making a slow relay;
//! * `MR_RELAY_TEST_MISDESCRIBE=1` signs receipts with another reduction than the one the relay
//!   ran (a max for a sum, a sum for anything else), its results staying honest.

use crate::buffer::Scratch;
use crate::error::Result;
use crate::relay::receipts::Reduction;
use crate::types::ReduceOp;
use std::rc::Rc;
use std::time::Duration;

/// The faults one relay injects, and the generator that picks the chunks they hit.
#[derive(Debug, Default)]
pub(crate) struct TestFaults {
    corrupt: f64,
    equivocate: f64,
    delay: Duration,
    misdescribe: bool,
    rng: u64,
}

impl TestFaults {
    /// The faults the environment asks for (none in a release build).
    pub(crate) fn from_env() -> TestFaults {
        let mut t = TestFaults::none();
        if cfg!(debug_assertions) {
            let f = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<f64>().ok());
            t.corrupt = f("MR_RELAY_TEST_CORRUPT").unwrap_or(0.0);
            t.equivocate = f("MR_RELAY_TEST_EQUIVOCATE").unwrap_or(0.0);
            t.delay = Duration::from_micros(f("MR_RELAY_TEST_DELAY_US").unwrap_or(0.0) as u64);
            t.misdescribe = f("MR_RELAY_TEST_MISDESCRIBE").is_some_and(|v| v != 0.0);
            if t.misdescribe {
                log::warn!("test faults enabled: receipts sign another reduction than ran");
            }
            if !t.delay.is_zero() {
                log::warn!("test faults enabled: {:?} delay per data frame", t.delay);
            }
            if t.corrupt > 0.0 || t.equivocate > 0.0 {
                log::warn!(
                    "test faults enabled: corrupting {} and equivocating {} of result chunks",
                    t.corrupt,
                    t.equivocate
                );
            }
        }
        t
    }

    /// No faults; the generator seeded per process.
    fn none() -> TestFaults {
        TestFaults {
            rng: 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id()),
            ..TestFaults::default()
        }
    }

    /// Called for every data frame: a slow relay sleeps here.
    pub(crate) fn on_data_frame(&self) {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
    }

    /// The reduction the relay's receipts sign for an op it reduced as `ran`.
    pub(crate) fn signed(&self, ran: Reduction) -> Reduction {
        if !self.misdescribe {
            return ran;
        }
        let op = match ran.op {
            ReduceOp::Sum => ReduceOp::Max,
            _ => ReduceOp::Sum,
        };
        Reduction { op, ..ran }
    }

    /// The result of a chunk as it goes to rank 0: `result`, or for a fraction `corrupt` of
    /// chunks a perturbed copy. `elem` is the element size in bytes.
    pub(crate) fn result(&mut self, result: Scratch, elem: usize) -> Result<Scratch> {
        if self.hit(self.corrupt) {
            perturbed(&result, elem)
        } else {
            Ok(result)
        }
    }

    /// What the ranks other than 0 get of `shared` (rank 0's result): the same bytes, or for a
    /// fraction `equivocate` of chunks a perturbed copy.
    pub(crate) fn for_others(&mut self, shared: &Rc<Scratch>, elem: usize) -> Result<Rc<Scratch>> {
        if self.hit(self.equivocate) {
            Ok(Rc::new(perturbed(shared, elem)?))
        } else {
            Ok(shared.clone())
        }
    }

    /// Whether this chunk is one of a fraction `fraction` (xorshift; never for 0).
    fn hit(&mut self, fraction: f64) -> bool {
        if fraction <= 0.0 {
            return false;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64 <= fraction
    }
}

/// A copy of `s` with the lowest bit of every `elem`-byte element flipped.
fn perturbed(s: &Scratch, elem: usize) -> Result<Scratch> {
    let mut out = Scratch::zeroed(s.len())?;
    out.as_mut_slice().copy_from_slice(s.as_slice());
    out.as_mut_slice()
        .iter_mut()
        .step_by(elem.max(1))
        .for_each(|b| *b ^= 1);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(bytes: &[u8]) -> Scratch {
        let mut s = Scratch::zeroed(bytes.len()).unwrap();
        s.as_mut_slice().copy_from_slice(bytes);
        s
    }

    #[test]
    fn no_faults_pass_results_through() {
        let mut t = TestFaults::none();
        let before = t.rng;
        let r = t.result(scratch(&[1, 2, 3, 4]), 4).unwrap();
        assert_eq!(r.as_slice(), &[1, 2, 3, 4]);
        let shared = Rc::new(r);
        assert!(Rc::ptr_eq(&t.for_others(&shared, 4).unwrap(), &shared));
        // A fault that is off draws nothing from the generator.
        assert_eq!(t.rng, before);
    }

    #[test]
    fn faults_that_always_hit_perturb_every_element() {
        let mut t = TestFaults {
            corrupt: 1.0,
            equivocate: 1.0,
            ..TestFaults::none()
        };
        let r = t.result(scratch(&[0, 0, 0, 0, 8, 8, 8, 8]), 4).unwrap();
        assert_eq!(r.as_slice(), &[1, 0, 0, 0, 9, 8, 8, 8]);
        let shared = Rc::new(r);
        let others = t.for_others(&shared, 2).unwrap();
        assert_eq!(others.as_slice(), &[0, 0, 1, 0, 8, 8, 9, 8]);
    }

    #[test]
    fn a_fraction_hits_about_that_share_of_chunks() {
        let mut t = TestFaults {
            rng: 12345,
            ..TestFaults::default()
        };
        let hits = (0..10_000).filter(|_| t.hit(0.25)).count();
        assert!((2_000..3_000).contains(&hits), "{hits} of 10000");
    }
}

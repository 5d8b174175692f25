//! Decisions the progress loop makes as frames arrive and time passes, kept free of I/O.
//!
//! The collective schedules ([`crate::algo`]) decide which bytes go where. What happens around
//! them lives here: which op a frame belongs to and whether it must wait ([`sequence`]), and
//! how relays are judged over time: stalls, the op timeout, throughput ([`relays`]). Nothing
//! here reads a clock or touches a socket: time comes in as `now`, and each state machine
//! says when it next needs to be woken. [`crate::net`] feeds them real events and time;
//! [`crate::algo::sim`] feeds them virtual time, so fail-over, weights and parking are tested
//! deterministically. Pacing ([`crate::pace`]) follows the same rule.

pub mod relays;
pub mod sequence;

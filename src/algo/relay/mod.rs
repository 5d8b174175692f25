//! Relay schedules (peer side): the buffer is cut into one segment per relay; every peer sends
//! segment k to relay k in chunks of at most `chunk_bytes` (`Config::relay_chunk_bytes`), and
//! the relay answers each chunk
//! with the rank-ordered reduction (all-reduce) or forwards the root's chunk to the others
//! (broadcast). Results land directly in the caller's buffer.
//!
//! Vocabulary:
//! * a **position** is an index into the op's relay list; `relays[pos]` is the relay's index
//!   as in [`Endpoint::Relay`];
//! * a **chunk** is one frame's worth of a segment; chunk ids follow byte offsets;
//! * a **lane** is an ordered list of chunks sent to one relay, named by its **path**: the
//!   positions the chunks went through, ending at the relay that serves them now.
//!
//! Segment sizes. Segment k's share of the buffer follows weight k ([`segment_ranges`]):
//! equal at first, later the relays' throughputs that the engine measured on earlier relay ops
//! and the ranks summed among themselves ([`weights_from_rates`]; the bookkeeping lives in
//! [`crate::comm`]). The schedule only needs every rank to pass the same weights, which the
//! integer arithmetic of the split then turns into the same segments everywhere.
//!
//! Compressed all-reduce (`desc.compress`): chunks are cut on whole int8 blocks
//! ([`chunk_ranges`]) and sent encoded, frame offsets and lengths in the encoded image of the
//! buffer; the relay answers with its encoded rank-order sum, which every peer decodes into
//! its buffer, so all peers hold the same bits. Inputs are encoded afresh at every send (from
//! the backup once a result overwrote them), and a fallback runs the compressed ring.
//!
//! Flow control: at most `window` chunks per lane are unanswered at a time (a result for
//! all-reduce, an empty acknowledgement for the broadcast root), so a relay holds at most
//! `peers × window` chunks of a lane whatever the tensor size.
//!
//! Relay failure. When a relay is lost (its connection broke, it stalled, or another peer
//! reported it lost), every chunk of every lane it served is sent again — all of them, answered
//! or not, because another peer may lack an answer this peer has. Where a chunk goes next
//! depends only on the chunk and the set of lost relays, never on the order in which a peer
//! learned of the losses: chunk `i` of segment `k` prefers position `k`, then the other
//! positions in ascending order rotated by `i` ([`preference`]), and goes to the first it
//! prefers that is still alive. Chunks that reach a relay along the same path form one lane,
//! whose members are fixed by the path alone and sent in id order with their own window, so
//! peers that learned of losses in different orders still send every relay the same chunks in
//! the same order and cannot deadlock each other's windows. To resend chunks whose input the
//! caller's buffer no longer holds, an all-reduce copies each input chunk aside before its
//! result overwrites it.
//!
//! A peer that loses a relay tells the other peers (`AUX_LOST`), so they drop it too even when
//! the relay only failed for some of them. A peer announces `AUX_DONE` to the others when it
//! has every result, and finishes only once every peer did: so no peer leaves an op that
//! another may still need it to redo.
//!
//! When no relay is left and results are missing, the op falls back to the ring among the
//! peers: the inputs are restored and the whole buffer goes through
//! [`crate::algo::ring::RingReduce`] (or the chain [`crate::algo::broadcast::Broadcast`]); the peer
//! tells the others (`AUX_FALLBACK`), and any peer that gets such a notice or a ring frame
//! joins. Frames from ranks carry either a ring step (small) or a notice (`aux` at the top of
//! the range), so the two cannot be confused.
//!
//! Files: [`route`] (segments, chunks, weights, fail-over paths), [`window`] (chunks in
//! flight), [`schedule`] (the state machine).

pub mod route;
pub mod schedule;
pub mod window;

pub use route::{chunk_ranges, preference, segment_ranges, weights_from_rates, MIN_SHARE_DIVISOR};
pub use schedule::{RelaySchedule, AUX_DONE, AUX_FALLBACK, AUX_LOST, MAX_SPARE_BACKUP};
pub use window::{compressed_window, max_window, relay_window, DEFAULT_WINDOW, MAX_WINDOW_BYTES};

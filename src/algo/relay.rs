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

use crate::algo::broadcast::Broadcast;
use crate::algo::compressed::CompressedRing;
use crate::algo::ring::RingReduce;
use crate::algo::span::{block, byte_range, chunks};
use crate::algo::{Collective, Endpoint, OpDesc, Schedule, Transmit};
use crate::buffer::{OpMemory, Region, Scratch};
use crate::compress::{Compression, INT8_BLOCK};
use crate::error::{Error, Result};
use crate::wire::FrameHeader;
use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

/// Fewest chunks in flight per lane (and all of them until links are measured).
pub const DEFAULT_WINDOW: usize = 4;
/// Most bytes a peer may keep in flight per lane: the window it announces to relays is
/// this many bytes of chunks (at least [`DEFAULT_WINDOW`] chunks), and bounds relay memory.
pub const MAX_WINDOW_BYTES: usize = 4 << 20;

/// The window a peer announces to relays (the most it will ever use) for `chunk_bytes`.
pub fn max_window(chunk_bytes: usize) -> usize {
    (MAX_WINDOW_BYTES / chunk_bytes.max(1)).clamp(DEFAULT_WINDOW, crate::relay::MAX_WINDOW)
}

/// Chunks in flight per lane for one relay op. Relays answer a chunk only when every peer's
/// copy arrived, so a window larger than the link needs lets the peers' streams drift apart
/// (on a shaped 200 Mbit/s network, 64 chunks of 64 KiB reached 81–88% of the bound where 4
/// reached 94%); one smaller than the bandwidth-delay product starves long links (4 chunks of
/// 64 KiB reached 74% at 40 ms round trip). So: [`DEFAULT_WINDOW`] chunks, plus three times
/// the bandwidth-delay product of the slowest-to-fill relay link — `rate` the bytes per second
/// it delivered on the last op, `min_rtt_us` the kernel's minimum round trip — capped at
/// [`max_window`]. Each rank sizes its own window; ranks need not agree.
pub fn relay_window(links: &[(u64, u32)], chunk_bytes: usize) -> usize {
    let bdp = links
        .iter()
        .map(|&(rate, rtt_us)| u128::from(rate) * u128::from(rtt_us) / 1_000_000)
        .max()
        .unwrap_or(0);
    let extra = (3 * bdp).div_ceil(chunk_bytes.max(1) as u128);
    (DEFAULT_WINDOW as u128 + extra).min(max_window(chunk_bytes) as u128) as usize
}

/// The window of a compressed all-reduce whose exact window would be `window` chunks of
/// `chunk_bytes`: compressed chunks carry as many elements as exact float32 chunks but fewer
/// wire bytes, so the window grows by the format's ratio (keeping the bytes in flight, which
/// the link's delay needs), up to what peers announce to relays ([`max_window`]). Relay
/// memory stays within the job's reservation: an open compressed chunk holds one float32
/// accumulator and encoded contributions.
pub fn compressed_window(window: usize, z: Compression, chunk_bytes: usize) -> usize {
    if z == Compression::None {
        return window;
    }
    let f32_bytes = crate::relay::compressed_chunk_bytes(chunk_bytes);
    let wire = z.encoded_len(f32_bytes / 4).max(1);
    (window * f32_bytes / wire).clamp(window, max_window(chunk_bytes).max(window))
}

/// Largest input backup kept for the next op (see [`SPARE_BACKUP`]).
pub const MAX_SPARE_BACKUP: usize = 256 << 20;

thread_local! {
    /// The input backup of the last all-reduce that ran on this thread (the communicator's
    /// progress thread), kept for the next one: a fresh backup is an anonymous mapping whose
    /// every page faults in while results arrive, which cost peers more than the copies
    /// themselves. Buffers above [`MAX_SPARE_BACKUP`] are not kept.
    static SPARE_BACKUP: std::cell::RefCell<Option<Scratch>> = const { std::cell::RefCell::new(None) };
}

/// A backup of at least `len` bytes (contents unspecified: only chunks copied in are read).
fn take_backup(len: usize) -> Result<Scratch> {
    let spare = SPARE_BACKUP.with(|s| s.borrow_mut().take());
    match spare {
        Some(b) if b.len() >= len => Ok(b),
        _ => Scratch::zeroed(len),
    }
}

/// Rank-to-rank notice: the sender has every result of the op.
pub const AUX_DONE: u32 = u32::MAX;
/// Rank-to-rank notice: the sender runs the op through the ring; join it.
pub const AUX_FALLBACK: u32 = u32::MAX - 1;
/// Rank-to-rank notice: the sender lost the relay whose index is in the header's `offset`.
pub const AUX_LOST: u32 = u32::MAX - 2;

/// What this rank does in the op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Send every chunk, receive every result.
    AllReduce,
    /// Send every chunk, receive an acknowledgement for each.
    Root,
    /// Send nothing, receive every chunk.
    Receiver,
}

/// Element ranges of the relays' segments: `count` elements split in proportion to
/// `weights` (one per relay; all equal, or an empty slice, gives the nearly equal split of
/// [`block`]). Pure integer arithmetic, so every rank computes the same split from the same
/// weights. Zero weights get empty segments unless every weight is zero.
pub fn segment_ranges(count: usize, parts: usize, weights: &[u64]) -> Vec<Range<usize>> {
    assert!(parts > 0, "segments need at least one relay");
    let total: u128 = weights.iter().map(|&w| w as u128).sum();
    let equal = weights.len() != parts || total == 0 || weights.iter().all(|&w| w == weights[0]);
    if equal {
        return (0..parts).map(|k| block(count, parts, k)).collect();
    }
    let mut out = Vec::with_capacity(parts);
    let mut acc: u128 = 0;
    let mut start = 0;
    for &w in weights {
        acc += w as u128;
        let end = (count as u128 * acc / total) as usize;
        out.push(start..end);
        start = end;
    }
    out
}

/// The chunks of each relay's segment, as element ranges. Exact data: the segments of
/// [`segment_ranges`] in chunks of at most `chunk_bytes` (elements of `elem` bytes, at least
/// one per chunk). Compressed data (`z`): segments and
/// chunks cut on whole int8 blocks ([`INT8_BLOCK`] elements, for every format, so every
/// relay checks frames the same way), each chunk at most
/// [`crate::relay::compressed_chunk_bytes`] as float32; only the buffer's last chunk may end
/// in a short block.
pub fn chunk_ranges(
    count: usize,
    z: Compression,
    parts: usize,
    weights: &[u64],
    elem: usize,
    chunk_bytes: usize,
) -> Vec<Vec<Range<usize>>> {
    if z == Compression::None {
        let per = (chunk_bytes / elem).max(1);
        return segment_ranges(count, parts, weights)
            .iter()
            .map(|seg| chunks(seg.clone(), 1, per).collect())
            .collect();
    }
    let per = crate::relay::compressed_chunk_bytes(chunk_bytes) / 4;
    segment_ranges(count.div_ceil(INT8_BLOCK), parts, weights)
        .iter()
        .map(|u| {
            let (lo, hi) = (
                (u.start * INT8_BLOCK).min(count),
                (u.end * INT8_BLOCK).min(count),
            );
            (lo..hi)
                .step_by(per)
                .map(|s| s..(s + per).min(hi))
                .collect()
        })
        .collect()
}

/// A relay's weight is never below the mean rate divided by this: a relay measured slow still
/// gets bytes, so its rate keeps being measured and it can win its share back.
pub const MIN_SHARE_DIVISOR: u64 = 8;

/// Segment weights from the relays' throughputs (one per relay, any unit, summed over the
/// ranks so every rank passes the same numbers): each rate, raised to the mean rate divided
/// by [`MIN_SHARE_DIVISOR`]. Empty, meaning an equal split, when nothing was measured.
pub fn weights_from_rates(rates: &[u64]) -> Vec<u64> {
    let n = rates.len() as u128;
    let total: u128 = rates.iter().map(|&r| u128::from(r)).sum();
    if total == 0 {
        return Vec::new();
    }
    // At most the largest rate over MIN_SHARE_DIVISOR, so it fits a u64.
    let floor = (total / (n * u128::from(MIN_SHARE_DIVISOR))).max(1) as u64;
    rates.iter().map(|&r| r.max(floor)).collect()
}

/// The order in which chunk `index` of segment `origin` prefers the `parts` positions: its own
/// segment's relay first, then the others ascending, rotated by `index` so that a lost relay's
/// chunks spread evenly over the rest.
pub fn preference(origin: usize, index: usize, parts: usize) -> Vec<usize> {
    let others: Vec<usize> = (0..parts).filter(|&p| p != origin).collect();
    let mut order = Vec::with_capacity(parts);
    order.push(origin);
    if !others.is_empty() {
        let rot = index % others.len();
        order.extend_from_slice(&others[rot..]);
        order.extend_from_slice(&others[..rot]);
    }
    order
}

/// The path of a chunk given the lost positions: its preferences up to the first live one;
/// `None` when every relay is lost.
fn path_of(origin: usize, index: usize, dead: &[bool]) -> Option<Vec<usize>> {
    let pref = preference(origin, index, dead.len());
    let live = pref.iter().position(|&p| !dead[p])?;
    Some(pref[..=live].to_vec())
}

struct Chunk {
    /// Bytes on the wire: the frame's `offset` and `len` (the caller's bytes, or their
    /// place in the encoded image of the buffer for a compressed all-reduce).
    range: Range<usize>,
    /// Bytes in the caller's buffer.
    user: Range<usize>,
    origin: usize,
    index: usize,
    /// Lane serving the chunk now, and its place in that lane.
    lane: usize,
    slot: usize,
    /// Result in place (all-reduce), acknowledged (root) or received (receiver).
    done: bool,
    /// The input was copied to the backup before its result overwrote it.
    saved: bool,
}

/// Chunks sent to one relay along one path.
struct Lane {
    path: Vec<usize>,
    members: Vec<usize>,
    next_send: usize,
    answered: Vec<bool>,
    in_flight: usize,
    dead: bool,
}

impl Lane {
    fn new(path: Vec<usize>, members: Vec<usize>) -> Lane {
        Lane {
            answered: vec![false; members.len()],
            path,
            members,
            next_send: 0,
            in_flight: 0,
            dead: false,
        }
    }

    fn target(&self) -> usize {
        *self.path.last().expect("a lane has a path")
    }
}

/// All-reduce or broadcast through relays, with failover; see the module docs.
///
/// Poll order: `poll_transmit` hands out notices first, then chunks (round robin over lanes),
/// or the ring's frames after a fallback. Relays the schedule stops using on a peer's report
/// come out of `poll_endpoint_dropped`.
pub struct RelaySchedule {
    desc: OpDesc,
    role: Role,
    rank: usize,
    world: usize,
    chunk_bytes: usize,
    window: usize,
    /// Wire format of the chunks and results ([`Compression::None`] but for a compressed
    /// float all-reduce).
    z: Compression,
    relays: Vec<usize>,
    dead: Vec<bool>,
    chunks: Vec<Chunk>,
    lanes: Vec<Lane>,
    /// Lane to try first in the next `poll_transmit` (round robin).
    turn: usize,
    done_count: usize,
    done_from: Vec<bool>,
    dones: usize,
    done_sent: bool,
    /// Notices to hand out, and those handed out but not yet written.
    notices: VecDeque<Transmit>,
    notices_unsent: usize,
    /// Inputs of chunks whose results arrived (all-reduce), at their own offsets.
    backup: Option<Scratch>,
    fallback: Option<Box<dyn Schedule>>,
    dropped: VecDeque<Endpoint>,
}

impl RelaySchedule {
    /// `relays`: the relay indices (as in [`Endpoint::Relay`]) every rank agreed to use;
    /// `weights`: their relative throughputs (empty: equal); `world`: ranks in the job.
    pub fn new(
        desc: OpDesc,
        rank: usize,
        world: usize,
        relays: &[usize],
        weights: &[u64],
        chunk_bytes: usize,
        window: usize,
    ) -> RelaySchedule {
        assert!(!relays.is_empty(), "relay schedule without relays");
        let size = desc.dtype.size();
        let role = match desc.coll {
            Collective::AllReduce => Role::AllReduce,
            Collective::Broadcast if desc.root == rank => Role::Root,
            Collective::Broadcast => Role::Receiver,
            other => panic!("relays do not serve {}", other.name()),
        };
        let z = match role {
            Role::AllReduce if desc.compress.applies_to(desc.dtype) => desc.compress,
            _ => Compression::None,
        };
        let mut chunks = Vec::new();
        let mut lanes = Vec::new();
        for (k, elems) in chunk_ranges(desc.count, z, relays.len(), weights, size, chunk_bytes)
            .into_iter()
            .enumerate()
        {
            let first = chunks.len();
            for (index, e) in elems.into_iter().enumerate() {
                let user = byte_range(&e, size);
                chunks.push(Chunk {
                    range: match z {
                        Compression::None => user.clone(),
                        z => z.encoded_len(e.start)..z.encoded_len(e.end),
                    },
                    user,
                    origin: k,
                    index,
                    lane: lanes.len(),
                    slot: index,
                    done: false,
                    saved: false,
                });
            }
            lanes.push(Lane::new(vec![k], (first..chunks.len()).collect()));
        }
        let mut s = RelaySchedule {
            desc,
            role,
            rank,
            world,
            chunk_bytes,
            window: window.max(1),
            z,
            dead: vec![false; relays.len()],
            relays: relays.to_vec(),
            chunks,
            lanes,
            turn: 0,
            done_count: 0,
            done_from: vec![false; world],
            dones: 0,
            done_sent: false,
            notices: VecDeque::new(),
            notices_unsent: 0,
            backup: None,
            fallback: None,
            dropped: VecDeque::new(),
        };
        s.done_from[rank] = true;
        if s.chunks.is_empty() || world == 1 {
            // Nothing can go missing: no round of notices.
            s.done_sent = true;
            s.dones = world - 1;
        }
        s
    }

    fn aux(&self) -> u32 {
        match self.desc.coll {
            Collective::Broadcast => self.desc.root as u32,
            _ => 0,
        }
    }

    /// Relays of this op that are lost, as in [`Endpoint::Relay`].
    pub fn lost_relays(&self) -> Vec<usize> {
        (0..self.relays.len())
            .filter(|&p| self.dead[p])
            .map(|p| self.relays[p])
            .collect()
    }

    /// Whether the op runs through the ring now.
    pub fn fell_back(&self) -> bool {
        self.fallback.is_some()
    }

    fn notify_all(&mut self, aux: u32, offset: usize) {
        for r in (0..self.world).filter(|&r| r != self.rank) {
            let mut header = self.desc.header(aux, offset, 0);
            header.offset = offset as u64;
            self.notices.push_back(Transmit {
                to: Endpoint::Rank(r),
                header,
                region: Region::Inline(Vec::new()),
            });
        }
    }

    fn maybe_announce_done(&mut self) {
        if !self.done_sent && self.fallback.is_none() && self.done_count == self.chunks.len() {
            self.done_sent = true;
            self.notify_all(AUX_DONE, 0);
        }
    }

    /// Stop using position `pos`: resend its lanes' chunks along their next paths, or fall
    /// back to the ring when no relay is left and results are missing.
    fn lose(&mut self, mem: &mut OpMemory, pos: usize) -> Result<()> {
        if self.dead[pos] {
            return Ok(());
        }
        // Every peer holds every result and said so: nobody needs the relay's chunks again,
        // and the other peers may already have left, so there is nobody to tell either.
        let finished = self.fallback.is_none()
            && self.done_count == self.chunks.len()
            && self.done_sent
            && self.dones == self.world - 1;
        self.dead[pos] = true;
        self.dropped.push_back(Endpoint::Relay(self.relays[pos]));
        if self.fallback.is_some() || finished {
            return Ok(());
        }
        self.notify_all(AUX_LOST, self.relays[pos]);
        let mut moved: BTreeMap<Vec<usize>, Vec<usize>> = BTreeMap::new();
        let mut stranded = false;
        for l in self
            .lanes
            .iter_mut()
            .filter(|l| !l.dead && l.target() == pos)
        {
            l.dead = true;
            for &c in &l.members {
                let ch = &self.chunks[c];
                match path_of(ch.origin, ch.index, &self.dead) {
                    Some(p) => moved.entry(p).or_default().push(c),
                    None => stranded = true,
                }
            }
        }
        if stranded || self.dead.iter().all(|&d| d) {
            if self.done_count < self.chunks.len() {
                return self.enter_fallback(mem);
            }
            // Every result is here: only the other peers' notices are awaited.
            return Ok(());
        }
        for (path, mut members) in moved {
            members.sort_unstable();
            let id = self.lanes.len();
            for (slot, &c) in members.iter().enumerate() {
                self.chunks[c].lane = id;
                self.chunks[c].slot = slot;
            }
            log::debug!(
                "{}: {} chunks move to relay {} along {path:?}",
                self.desc,
                members.len(),
                self.relays[*path.last().expect("path")]
            );
            self.lanes.push(Lane::new(path, members));
        }
        Ok(())
    }

    /// Restore the inputs and run the op through the ring among the peers.
    fn enter_fallback(&mut self, mem: &mut OpMemory) -> Result<()> {
        if self.fallback.is_some() {
            return Ok(());
        }
        log::warn!(
            "{}: rank {}: no relay left for the missing results; finishing through the ring",
            self.desc,
            self.rank
        );
        let desc = self.desc;
        let schedule: Box<dyn Schedule> = match self.role {
            Role::AllReduce => {
                if let Some(b) = &self.backup {
                    let user = mem.user.as_mut_slice();
                    for c in self.chunks.iter().filter(|c| c.saved) {
                        user[c.user.clone()].copy_from_slice(&b.as_slice()[c.user.clone()]);
                    }
                }
                if self.z != Compression::None {
                    // The same format over the ring: still identical bits on every rank.
                    Box::new(CompressedRing::new(
                        desc,
                        self.rank,
                        self.world,
                        self.chunk_bytes,
                        mem,
                    )?)
                } else {
                    if desc.dtype.accumulator() != desc.dtype {
                        mem.acc = Some(Scratch::zeroed(
                            desc.count * desc.dtype.accumulator().size(),
                        )?);
                    }
                    Box::new(RingReduce::new(
                        desc,
                        self.rank,
                        self.world,
                        self.chunk_bytes,
                        true,
                        mem,
                    ))
                }
            }
            Role::Root | Role::Receiver => Box::new(Broadcast::chain(
                desc,
                self.rank,
                self.world,
                self.chunk_bytes,
            )),
        };
        self.fallback = Some(schedule);
        self.notify_all(AUX_FALLBACK, 0);
        Ok(())
    }

    fn on_notice(&mut self, mem: &mut OpMemory, r: usize, h: &FrameHeader) -> Result<()> {
        match h.aux {
            AUX_DONE => {
                if !self.done_from[r] {
                    self.done_from[r] = true;
                    self.dones += 1;
                }
                Ok(())
            }
            AUX_FALLBACK => self.enter_fallback(mem),
            _ => {
                let relay = h.offset as usize;
                match self.relays.iter().position(|&x| x as u64 == h.offset) {
                    Some(pos) if !self.dead[pos] => {
                        log::warn!(
                            "{}: rank {r} lost relay {relay}; rank {} stops using it too",
                            self.desc,
                            self.rank
                        );
                        self.lose(mem, pos)
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// The chunk starting at byte `off`.
    fn chunk_at(&self, off: u64) -> Option<usize> {
        let i = self
            .chunks
            .partition_point(|c| (c.range.start as u64) < off);
        (i < self.chunks.len() && self.chunks[i].range.start as u64 == off).then_some(i)
    }

    fn on_relay_frame(
        &mut self,
        mem: &mut OpMemory,
        from: Endpoint,
        relay: usize,
        h: &FrameHeader,
        payload: &[u8],
    ) -> Result<()> {
        let desc = self.desc;
        let bad = |what: String| Err(Error::remote(format!("{desc}: {from} {what}")));
        if h.aux != self.aux() {
            return bad(format!(
                "sent a frame for root {}, expected root {}",
                h.aux,
                self.aux()
            ));
        }
        let Some(pos) = self.relays.iter().position(|&x| x == relay) else {
            return bad("is not one of this op's relays".into());
        };
        if self.dead[pos] {
            return Ok(()); // a lost relay's last words: its chunks are being redone
        }
        let Some(c) = self.chunk_at(h.offset) else {
            return bad(format!(
                "answered offset {}, which is not a chunk of the op",
                h.offset
            ));
        };
        let r = self.chunks[c].range.clone();
        let u = self.chunks[c].user.clone();
        let expect_len = if self.role == Role::Root { 0 } else { r.len() };
        if payload.len() != expect_len {
            return bad(format!(
                "answered bytes {}..{} with {} bytes, expected {expect_len}",
                r.start,
                r.end,
                payload.len()
            ));
        }
        if self.role == Role::Receiver {
            // The root chose the relay; any live one may forward any chunk.
            if !self.chunks[c].done {
                mem.user.as_mut_slice()[r].copy_from_slice(payload);
                self.chunks[c].done = true;
                self.done_count += 1;
            }
            return Ok(());
        }
        let (li, slot) = (self.chunks[c].lane, self.chunks[c].slot);
        let lane = &mut self.lanes[li];
        if lane.target() != pos || slot >= lane.next_send {
            return bad(format!(
                "answered bytes {}..{} before they were sent to it",
                r.start, r.end
            ));
        }
        if lane.answered[slot] {
            return bad(format!("answered bytes {}..{} twice", r.start, r.end));
        }
        lane.answered[slot] = true;
        lane.in_flight -= 1;
        if self.role == Role::Root {
            if !self.chunks[c].done {
                self.chunks[c].done = true;
                self.done_count += 1;
            }
            return Ok(());
        }
        let (z, dtype) = (self.z, self.desc.dtype);
        let user = mem.user.as_mut_slice();
        if self.chunks[c].done {
            // Redone after a loss: a relay sums in rank order, so the bytes must agree (for
            // compressed data, what they decode to).
            let same = match z {
                Compression::None => user[r.clone()] == *payload,
                z => {
                    let mut again = vec![0u8; u.len()];
                    z.decode_bytes(dtype, payload, &mut again);
                    user[u.clone()] == again[..]
                }
            };
            if !same {
                return bad(format!(
                    "answered bytes {}..{} differently from the relay that answered them first",
                    r.start, r.end
                ));
            }
            return Ok(());
        }
        if self.backup.is_none() {
            self.backup = Some(take_backup(user.len())?);
        }
        let backup = self.backup.as_mut().expect("backup").as_mut_slice();
        backup[u.clone()].copy_from_slice(&user[u.clone()]);
        match z {
            Compression::None => user[u].copy_from_slice(payload),
            z => z.decode_bytes(dtype, payload, &mut user[u]),
        }
        self.chunks[c].saved = true;
        self.chunks[c].done = true;
        self.done_count += 1;
        Ok(())
    }
}

impl Drop for RelaySchedule {
    fn drop(&mut self) {
        let Some(b) = self.backup.take() else {
            return;
        };
        if b.len() <= MAX_SPARE_BACKUP {
            SPARE_BACKUP.with(|s| {
                let mut s = s.borrow_mut();
                if s.as_ref().map_or(true, |old| old.len() <= b.len()) {
                    *s = Some(b);
                }
            });
        }
    }
}

impl Schedule for RelaySchedule {
    fn desc(&self) -> &OpDesc {
        &self.desc
    }

    fn poll_transmit(&mut self, mem: &mut OpMemory) -> Option<Transmit> {
        if let Some(t) = self.notices.pop_front() {
            self.notices_unsent += 1;
            return Some(t);
        }
        if let Some(f) = self.fallback.as_mut() {
            return f.poll_transmit(mem);
        }
        if self.role == Role::Receiver {
            return None;
        }
        let n = self.lanes.len();
        let aux = self.aux();
        for i in 0..n {
            let k = (self.turn + i) % n;
            let lane = &mut self.lanes[k];
            if lane.dead || lane.next_send >= lane.members.len() || lane.in_flight >= self.window {
                continue;
            }
            let ch = &self.chunks[lane.members[lane.next_send]];
            lane.next_send += 1;
            lane.in_flight += 1;
            self.turn = (k + 1) % n;
            let (r, u) = (ch.range.clone(), ch.user.clone());
            let mut header = self.desc.header(aux, r.start, r.len());
            header.aux = aux;
            let input = match (&self.backup, ch.saved) {
                (Some(b), true) => Some(&b.as_slice()[u.clone()]),
                _ => None,
            };
            let region = match (self.z, input) {
                (Compression::None, Some(b)) => Region::Inline(b.to_vec()),
                (Compression::None, None) => Region::User {
                    offset: u.start,
                    len: u.len(),
                },
                // Encoded afresh from the input each time it is sent: encoding is
                // deterministic, so a chunk redone through another relay carries the same bytes.
                (z, input) => {
                    let mut wire = vec![0u8; r.len()];
                    let src = input.unwrap_or(&mem.user.as_slice()[u]);
                    z.encode_bytes(self.desc.dtype, src, &mut wire);
                    Region::Inline(wire)
                }
            };
            return Some(Transmit {
                to: Endpoint::Relay(self.relays[lane.target()]),
                header,
                region,
            });
        }
        None
    }

    fn handle_sent(&mut self, t: &Transmit) {
        if let Endpoint::Rank(_) = t.to {
            if t.header.aux >= AUX_LOST {
                self.notices_unsent -= 1;
            } else if let Some(f) = self.fallback.as_mut() {
                f.handle_sent(t);
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
        let res = match from {
            Endpoint::Rank(r) if h.aux >= AUX_LOST => self.on_notice(mem, r, h),
            Endpoint::Rank(_) => {
                // A ring frame: its sender fell back; so do we.
                self.enter_fallback(mem)?;
                let f = self.fallback.as_mut().expect("fallback");
                f.handle_frame(mem, from, h, payload)
            }
            Endpoint::Relay(_) if self.fallback.is_some() => Ok(()),
            Endpoint::Relay(relay) => self.on_relay_frame(mem, from, relay, h, payload),
        };
        self.maybe_announce_done();
        res
    }

    fn recv_in_place(&mut self, from: Endpoint, h: &FrameHeader) -> Result<Option<Region>> {
        match (&mut self.fallback, from) {
            (Some(f), Endpoint::Rank(_)) if h.aux < AUX_LOST => f.recv_in_place(from, h),
            _ => Ok(None),
        }
    }

    fn handle_frame_in_place(
        &mut self,
        mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
    ) -> Result<()> {
        match self.fallback.as_mut() {
            Some(f) => f.handle_frame_in_place(mem, from, h),
            None => Err(Error::internal(format!(
                "{from}: in-place frame without a ring fallback"
            ))),
        }
    }

    fn is_complete(&self) -> bool {
        if !self.notices.is_empty() || self.notices_unsent > 0 {
            return false;
        }
        match &self.fallback {
            Some(f) => f.is_complete(),
            None => {
                self.done_count == self.chunks.len()
                    && self.done_sent
                    && self.dones == self.world - 1
            }
        }
    }

    fn handle_endpoint_lost(&mut self, mem: &mut OpMemory, ep: Endpoint, err: Error) -> Result<()> {
        let Endpoint::Relay(relay) = ep else {
            return Err(err);
        };
        let Some(pos) = self.relays.iter().position(|&x| x == relay) else {
            return Ok(());
        };
        if !self.dead[pos] {
            log::debug!(
                "{}: rank {}: dropping relay {relay}: {}",
                self.desc,
                self.rank,
                err.message
            );
        }
        let res = self.lose(mem, pos);
        self.maybe_announce_done();
        res
    }

    fn waits_on(&self, ep: Endpoint) -> bool {
        let Endpoint::Relay(relay) = ep else {
            return false;
        };
        let Some(pos) = self.relays.iter().position(|&x| x == relay) else {
            return false;
        };
        if self.dead[pos] || self.fallback.is_some() {
            return false;
        }
        match self.role {
            Role::Receiver => self
                .chunks
                .iter()
                .any(|c| !c.done && self.lanes[c.lane].target() == pos),
            _ => self
                .lanes
                .iter()
                .any(|l| !l.dead && l.target() == pos && l.in_flight > 0),
        }
    }

    fn poll_endpoint_dropped(&mut self) -> Option<Endpoint> {
        self.dropped.pop_front()
    }

    fn waiting_for(&self) -> String {
        if let Some(f) = &self.fallback {
            return format!("ring fallback: {}", f.waiting_for());
        }
        let missing: Vec<String> = self
            .lanes
            .iter()
            .filter(|l| !l.dead)
            .filter_map(|l| {
                let open = l.members.iter().filter(|&&c| !self.chunks[c].done).count();
                (open > 0).then(|| {
                    format!(
                        "relay {}: {open} of {} chunks missing, {} sent",
                        self.relays[l.target()],
                        l.members.len(),
                        l.next_send
                    )
                })
            })
            .collect();
        let peers: Vec<String> = (0..self.world)
            .filter(|&r| !self.done_from[r])
            .map(|r| r.to_string())
            .collect();
        format!(
            "{}; lost relays {:?}; done notices missing from ranks [{}]",
            if missing.is_empty() {
                "all chunks answered".into()
            } else {
                missing.join(", ")
            },
            self.lost_relays(),
            peers.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::sim::Rng;
    use crate::buffer::RawBuf;
    use crate::types::{DType, ReduceOp};
    use std::collections::HashMap;

    #[test]
    fn compressed_windows_keep_the_bytes_in_flight() {
        let chunk = 64 << 10;
        assert_eq!(compressed_window(4, Compression::None, chunk), 4);
        assert_eq!(compressed_window(4, Compression::Bf16, chunk), 8);
        assert_eq!(compressed_window(4, Compression::Int8, chunk), 15);
        assert_eq!(compressed_window(40, Compression::Int8, chunk), 64);
        // Never beyond the window announced to relays.
        assert_eq!(compressed_window(4, Compression::Int8, 1 << 20), 4);
    }

    #[test]
    fn windows_cover_the_bandwidth_delay_product() {
        let chunk = 64 << 10;
        assert_eq!(max_window(chunk), 64);
        assert_eq!(max_window(1 << 20), DEFAULT_WINDOW);
        assert_eq!(max_window(1), crate::relay::MAX_WINDOW);
        // Nothing measured yet, or no delay: the minimum.
        assert_eq!(relay_window(&[], chunk), DEFAULT_WINDOW);
        assert_eq!(relay_window(&[(25_000_000, 0)], chunk), DEFAULT_WINDOW);
        // 6.25 MB/s at 40 ms: 250 kB in flight, three times that in 64 KiB chunks, plus 4.
        assert_eq!(relay_window(&[(6_250_000, 40_000)], chunk), 4 + 12);
        // The slowest-to-fill link decides.
        assert_eq!(
            relay_window(&[(6_250_000, 40_000), (1_000_000, 1_000)], chunk),
            16
        );
        // Capped at what peers announce to relays.
        assert_eq!(relay_window(&[(125_000_000, 40_000)], chunk), 64);
        assert_eq!(
            relay_window(&[(125_000_000, 40_000)], 1 << 20),
            DEFAULT_WINDOW
        );
    }

    fn desc(coll: Collective, count: usize, root: usize) -> OpDesc {
        OpDesc {
            coll,
            seq: 1,
            dtype: DType::I32,
            op: ReduceOp::Sum,
            count,
            root,
            compress: crate::compress::Compression::None,
        }
    }

    #[test]
    fn segments_follow_weights_and_cover_the_buffer() {
        assert_eq!(segment_ranges(10, 3, &[]), vec![0..4, 4..7, 7..10]);
        assert_eq!(segment_ranges(10, 3, &[5, 5, 5]), vec![0..4, 4..7, 7..10]);
        assert_eq!(
            segment_ranges(100, 3, &[1, 2, 1]),
            vec![0..25, 25..75, 75..100]
        );
        assert_eq!(segment_ranges(7, 2, &[0, 9]), vec![0..0, 0..7]);
        for count in [0, 1, 5, 1001] {
            let s = segment_ranges(count, 4, &[3, 1, 7, 2]);
            assert_eq!(s[0].start, 0);
            assert_eq!(s[3].end, count);
            assert!(s.windows(2).all(|w| w[0].end == w[1].start));
        }
    }

    #[test]
    fn weights_follow_rates_with_a_floor() {
        assert_eq!(weights_from_rates(&[]), Vec::<u64>::new());
        assert_eq!(weights_from_rates(&[0, 0, 0]), Vec::<u64>::new());
        assert_eq!(weights_from_rates(&[300, 100, 200]), vec![300, 100, 200]);
        // Mean 400, floor 50: the slow and the unmeasured relay are raised to it.
        assert_eq!(weights_from_rates(&[1190, 10, 0]), vec![1190, 50, 50]);
        // Tiny totals still give every relay a non-zero weight.
        assert_eq!(weights_from_rates(&[3, 0]), vec![3, 1]);
        assert_eq!(
            weights_from_rates(&[u64::MAX, u64::MAX, 0]),
            vec![u64::MAX, u64::MAX, u64::MAX / 12]
        );
        // The floored relay's segment is about an eighth of an equal share, never empty.
        let w = weights_from_rates(&[1_000_000, 1]);
        let s = segment_ranges(1 << 20, 2, &w);
        assert!(s[1].len() >= (1 << 20) / 2 / 9, "{s:?}");
        assert!(s[1].len() < s[0].len());
    }

    #[test]
    fn a_chunks_path_depends_only_on_the_set_of_lost_relays() {
        assert_eq!(preference(1, 0, 4), vec![1, 0, 2, 3]);
        assert_eq!(preference(1, 1, 4), vec![1, 2, 3, 0]);
        assert_eq!(preference(0, 5, 1), vec![0]);
        // Lost relays spread evenly over the rest.
        let dead = [false, true, false, false];
        let mut per = [0; 4];
        for i in 0..30 {
            per[*path_of(1, i, &dead).unwrap().last().unwrap()] += 1;
        }
        assert_eq!(per, [10, 0, 10, 10]);
        assert_eq!(path_of(2, 3, &[true, true, true]), None);
        assert_eq!(path_of(0, 1, &[true, false, true]).unwrap(), vec![0, 2, 1]);
    }

    /// A simulated relay: all-reduce sums in rank order, broadcast forwards and acknowledges.
    #[derive(Default)]
    struct FakeRelay {
        dead: bool,
        parts: HashMap<u64, Vec<Option<Vec<u8>>>>,
    }

    enum Msg {
        ToRelay(usize, usize, FrameHeader, Vec<u8>),
        FromRelay(usize, usize, FrameHeader, Vec<u8>),
        Peer(usize, usize, FrameHeader, Vec<u8>),
    }

    struct Peer {
        s: RelaySchedule,
        mem: OpMemory,
        _buf: Vec<u8>,
        /// Relays this peer knows are lost (no more frames from them).
        lost: Vec<bool>,
    }

    struct RelaySim {
        world: usize,
        peers: Vec<Peer>,
        relays: Vec<FakeRelay>,
        net: Vec<Msg>,
        rng: Rng,
        /// Relays each peer will learn are lost, and at which step.
        notify: Vec<(usize, usize, usize)>,
    }

    impl RelaySim {
        fn new(d: OpDesc, world: usize, nrelays: usize, inputs: Vec<Vec<u8>>, seed: u64) -> Self {
            let ids: Vec<usize> = (0..nrelays).collect();
            let peers = inputs
                .into_iter()
                .enumerate()
                .map(|(r, mut buf)| {
                    // SAFETY: `buf` moves into the Peer beside `mem` and is never reallocated.
                    let mem = OpMemory::new(unsafe { RawBuf::new(buf.as_mut_ptr(), buf.len()) });
                    Peer {
                        s: RelaySchedule::new(d, r, world, &ids, &[], 64, 2),
                        mem,
                        _buf: buf,
                        lost: vec![false; nrelays],
                    }
                })
                .collect();
            RelaySim {
                world,
                peers,
                relays: (0..nrelays).map(|_| FakeRelay::default()).collect(),
                net: Vec::new(),
                rng: Rng::new(seed),
                notify: Vec::new(),
            }
        }

        /// Kill relay `k` now; every peer learns of it within `spread` steps. Its answers
        /// not yet delivered are lost or delivered at random.
        fn kill(&mut self, k: usize, step: usize, spread: usize) {
            self.relays[k].dead = true;
            for p in 0..self.world {
                let at = step + self.rng.below(spread);
                self.notify.push((at, p, k));
            }
        }

        fn lose(&mut self, p: usize, k: usize) {
            let peer = &mut self.peers[p];
            if !peer.lost[k] {
                peer.lost[k] = true;
                let err = Error::remote(format!("relay {k} closed"));
                if let Err(e) = peer
                    .s
                    .handle_endpoint_lost(&mut peer.mem, Endpoint::Relay(k), err)
                {
                    panic!("rank {p}: {e}");
                }
            }
        }

        fn relay_in(&mut self, k: usize, from: usize, h: FrameHeader, payload: Vec<u8>) {
            if self.relays[k].dead {
                return;
            }
            let world = self.world;
            if h.coll == Collective::Broadcast as u8 {
                for r in (0..world).filter(|&r| r != from) {
                    self.net.push(Msg::FromRelay(k, r, h, payload.clone()));
                }
                self.net.push(Msg::FromRelay(
                    k,
                    from,
                    FrameHeader { len: 0, ..h },
                    Vec::new(),
                ));
                return;
            }
            let parts = self.relays[k]
                .parts
                .entry(h.offset)
                .or_insert_with(|| vec![None; world]);
            assert!(
                parts[from].is_none(),
                "rank {from} sent {} to relay {k} twice",
                h.offset
            );
            parts[from] = Some(payload);
            if parts.iter().all(|p| p.is_some()) {
                let parts = self.relays[k].parts.remove(&h.offset).unwrap();
                if let Some(z) =
                    Compression::from_u8(h.redop >> 4).filter(|&z| z != Compression::None)
                {
                    let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_deref().unwrap()).collect();
                    let op = crate::types::ReduceOp::from_raw(u32::from(h.redop & 0x0f)).unwrap();
                    let bytes = crate::compress::reduce_encoded(z, op, &refs).unwrap();
                    for r in 0..world {
                        self.net.push(Msg::FromRelay(k, r, h, bytes.clone()));
                    }
                    return;
                }
                let mut sum = vec![0i32; h.len as usize / 4];
                for p in parts {
                    for (s, x) in sum.iter_mut().zip(p.unwrap().chunks_exact(4)) {
                        *s = s.wrapping_add(i32::from_le_bytes(x.try_into().unwrap()));
                    }
                }
                let bytes: Vec<u8> = sum.iter().flat_map(|x| x.to_le_bytes()).collect();
                for r in 0..world {
                    self.net.push(Msg::FromRelay(k, r, h, bytes.clone()));
                }
            }
        }

        fn step(&mut self, p: usize) {
            let peer = &mut self.peers[p];
            while let Some(k) = peer.s.poll_endpoint_dropped() {
                let Endpoint::Relay(k) = k else { panic!() };
                peer.lost[k] = true;
            }
            while let Some(t) = peer.s.poll_transmit(&mut peer.mem) {
                let payload = peer.mem.bytes(&t.region).to_vec();
                peer.s.handle_sent(&t);
                self.net.push(match t.to {
                    Endpoint::Relay(k) => Msg::ToRelay(k, p, t.header, payload),
                    Endpoint::Rank(r) => Msg::Peer(p, r, t.header, payload),
                });
            }
        }

        fn deliver(&mut self, m: Msg) {
            match m {
                Msg::ToRelay(k, from, h, pl) => self.relay_in(k, from, h, pl),
                Msg::FromRelay(k, to, h, pl) => {
                    let peer = &mut self.peers[to];
                    if peer.lost[k] {
                        return;
                    }
                    if let Err(e) = peer
                        .s
                        .handle_frame(&mut peer.mem, Endpoint::Relay(k), &h, &pl)
                    {
                        panic!("rank {to}: {e}");
                    }
                }
                Msg::Peer(from, to, h, pl) => {
                    let peer = &mut self.peers[to];
                    let ep = Endpoint::Rank(from);
                    let res = match peer.s.recv_in_place(ep, &h).unwrap() {
                        Some(region) => {
                            peer.mem.bytes_mut(&region).copy_from_slice(&pl);
                            peer.s.handle_frame_in_place(&mut peer.mem, ep, &h)
                        }
                        None => peer.s.handle_frame(&mut peer.mem, ep, &h, &pl),
                    };
                    if let Err(e) = res {
                        panic!("rank {to}: {e}");
                    }
                }
            }
        }

        /// Run until every peer completes; panics on livelock.
        fn drive(&mut self, mut kills: Vec<(usize, usize)>) {
            for step in 0..200_000 {
                kills.retain(|&(at, k)| {
                    if at == step {
                        self.relays[k].dead = true;
                    }
                    at != step
                });
                let due: Vec<(usize, usize)> = self
                    .notify
                    .iter()
                    .filter(|n| n.0 == step)
                    .map(|n| (n.1, n.2))
                    .collect();
                for (p, k) in due {
                    self.lose(p, k);
                }
                for p in 0..self.world {
                    self.step(p);
                }
                if self.peers.iter().all(|p| p.s.is_complete())
                    && self.notify.iter().all(|n| n.0 < step)
                {
                    return;
                }
                if self.net.is_empty() {
                    continue;
                }
                let m = self.net.swap_remove(self.rng.below(self.net.len()));
                // A dead relay's answers still in flight may or may not arrive.
                if let Msg::FromRelay(k, ..) = &m {
                    if self.relays[*k].dead && self.rng.below(2) == 0 {
                        continue;
                    }
                }
                self.deliver(m);
            }
            let why: Vec<String> = self.peers.iter().map(|p| p.s.waiting_for()).collect();
            panic!("no completion: {why:?}");
        }

        fn user(&self, p: usize) -> &[u8] {
            self.peers[p].mem.user.as_slice()
        }
    }

    fn inputs(world: usize, count: usize) -> Vec<Vec<u8>> {
        (0..world)
            .map(|r| {
                (0..count)
                    .flat_map(|i| ((i * 7 + r * 1000) as i32).to_le_bytes())
                    .collect()
            })
            .collect()
    }

    fn check_sum(sim: &RelaySim, count: usize) {
        let w = sim.world;
        let want: Vec<u8> = (0..count)
            .flat_map(|i| ((0..w).map(|r| (i * 7 + r * 1000) as i32).sum::<i32>()).to_le_bytes())
            .collect();
        for p in 0..w {
            assert_eq!(sim.user(p), &want[..], "rank {p}");
        }
    }

    /// (seed, world, relays, kills as (step, relay), notification spread)
    fn run_allreduce(
        seed: u64,
        world: usize,
        nrelays: usize,
        kills: &[(usize, usize)],
        spread: usize,
    ) -> bool {
        let count = 300;
        let d = desc(Collective::AllReduce, count, 0);
        let mut sim = RelaySim::new(d, world, nrelays, inputs(world, count), seed);
        for &(at, k) in kills {
            sim.kill(k, at, spread);
            sim.relays[k].dead = false; // dies at `at`, in drive
        }
        sim.drive(kills.to_vec());
        check_sum(&sim, count);
        sim.peers.iter().any(|p| p.s.fell_back())
    }

    /// A relay lost after every peer holds every result (and said so) changes nothing: the
    /// op stays complete and no notice goes out, since the other peers may have left already.
    /// (Chaos trials caught a peer failing with "rank 0 has left the job" here.)
    #[test]
    fn a_relay_lost_after_the_op_completed_sends_nothing() {
        let count = 300;
        let d = desc(Collective::AllReduce, count, 0);
        let mut sim = RelaySim::new(d, 3, 3, inputs(3, count), 5);
        sim.drive(Vec::new());
        check_sum(&sim, count);
        for p in 0..3 {
            sim.lose(p, 1);
            let peer = &mut sim.peers[p];
            assert!(peer.s.is_complete(), "rank {p} is no longer complete");
            assert!(
                peer.s.poll_transmit(&mut peer.mem).is_none(),
                "rank {p} sends after its op completed"
            );
        }
        check_sum(&sim, count);
    }

    /// A compressed all-reduce through relays lost at any moment (or all of them, then the
    /// compressed ring): every peer ends with the same bits, within the bound of the path.
    #[test]
    fn compressed_allreduce_survives_lost_relays_with_identical_bits() {
        let (world, count) = (3, 5 * INT8_BLOCK + 33);
        let val = |r: usize, i: usize| ((i * 7 + r * 5) % 23) as f32 * 0.25 - 2.0;
        for z in [Compression::Bf16, Compression::Int8] {
            for seed in 0..24u64 {
                let mut d = desc(Collective::AllReduce, count, 0);
                d.dtype = DType::F32;
                d.compress = z;
                let inputs: Vec<Vec<u8>> = (0..world)
                    .map(|r| (0..count).flat_map(|i| val(r, i).to_le_bytes()).collect())
                    .collect();
                let mut sim = RelaySim::new(d, world, 3, inputs, seed);
                let at = (seed as usize * 5) % 40;
                let kills: Vec<(usize, usize)> = match seed % 3 {
                    0 => vec![],
                    1 => vec![(at, 1)],
                    _ => vec![(at, 0), (at + 2, 1), (at + 4, 2)],
                };
                for &(at, k) in &kills {
                    sim.kill(k, at, 10);
                    sim.relays[k].dead = false;
                }
                sim.drive(kills);
                for p in 1..world {
                    assert_eq!(
                        sim.user(p),
                        sim.user(0),
                        "{z} seed {seed}: rank {p} differs"
                    );
                }
                // Relay path: 3 inputs and the sum encoded; ring: 3 partial sums.
                let tol = match z {
                    Compression::Int8 => 4.0 * 2.0 * 7.0 / 255.0 * 1.01,
                    _ => 4.0 * 7.0 / 256.0,
                };
                for (i, b) in sim.user(0).chunks_exact(4).enumerate() {
                    let x = f32::from_le_bytes(b.try_into().unwrap());
                    let exact: f32 = (0..world).map(|r| val(r, i)).sum();
                    assert!(
                        (x - exact).abs() <= tol,
                        "{z} seed {seed} [{i}]: {x} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn allreduce_without_failures() {
        for seed in 0..20 {
            assert!(!run_allreduce(seed, 3, 3, &[], 1));
        }
        run_allreduce(1, 1, 2, &[], 1);
    }

    #[test]
    fn allreduce_survives_a_relay_lost_at_any_moment() {
        for seed in 0..60 {
            let at = (seed as usize * 7) % 120;
            let fell = run_allreduce(
                seed,
                3,
                3,
                &[(at, (seed % 3) as usize)],
                1 + seed as usize % 40,
            );
            assert!(!fell, "two relays remain: no ring fallback");
        }
    }

    #[test]
    fn allreduce_survives_relays_lost_in_different_orders() {
        for seed in 0..60 {
            let a = (seed as usize * 5) % 100;
            let b = (seed as usize * 11) % 100;
            // Peers learn of the two losses over a long spread, so in differing orders.
            run_allreduce(seed, 4, 4, &[(a, 1), (b, 3)], 60);
        }
    }

    /// A backup left by an earlier op holds stale bytes: failover must only read what this
    /// op copied into it.
    #[test]
    fn a_reused_backup_never_leaks_stale_bytes() {
        for seed in 0..20 {
            let mut stale = Scratch::zeroed(4096).unwrap();
            stale.as_mut_slice().fill(0xA5);
            SPARE_BACKUP.with(|s| *s.borrow_mut() = Some(stale));
            let at = (seed as usize * 7) % 80;
            run_allreduce(seed, 3, 2, &[(at, 0), (at + 3, 1)], 10);
            let kept = SPARE_BACKUP.with(|s| s.borrow().as_ref().map(|b| b.len()));
            assert!(
                kept.is_some_and(|n| n >= 4096),
                "the backup is kept: {kept:?}"
            );
        }
    }

    #[test]
    fn allreduce_falls_back_to_the_ring_when_every_relay_is_lost() {
        let mut fell = 0;
        for seed in 0..40 {
            let at = (seed as usize * 3) % 60;
            if run_allreduce(seed, 3, 2, &[(at, 0), (at + seed as usize % 5, 1)], 30) {
                fell += 1;
            }
        }
        assert!(
            fell > 20,
            "most runs lose relays before all results arrive ({fell})"
        );
    }

    #[test]
    fn broadcast_survives_a_lost_relay_and_falls_back_when_none_is_left() {
        let count = 300;
        for seed in 0..40 {
            let world = 3;
            let root = seed as usize % world;
            let d = desc(Collective::Broadcast, count, root);
            let data: Vec<Vec<u8>> = (0..world)
                .map(|r| {
                    (0..count)
                        .flat_map(|i| (if r == root { i as i32 * 3 } else { -1 }).to_le_bytes())
                        .collect()
                })
                .collect();
            let mut sim = RelaySim::new(d, world, 2, data, seed);
            let at = (seed as usize * 7) % 50;
            let kills = if seed % 2 == 0 {
                vec![(at, 1)]
            } else {
                vec![(at, 0), (at + 3, 1)]
            };
            for &(at, k) in &kills {
                sim.kill(k, at, 20);
                sim.relays[k].dead = false;
            }
            sim.drive(kills);
            let want: Vec<u8> = (0..count)
                .flat_map(|i| (i as i32 * 3).to_le_bytes())
                .collect();
            for p in 0..world {
                assert_eq!(sim.user(p), &want[..], "seed {seed} rank {p}");
            }
        }
    }

    #[test]
    fn answers_are_checked() {
        let d = desc(Collective::AllReduce, 103, 0);
        let mut buf = vec![0u8; 103 * 4];
        // SAFETY: `buf` outlives `mem` and is only used through it.
        let mut mem = OpMemory::new(unsafe { RawBuf::new(buf.as_mut_ptr(), buf.len()) });
        let mut s = RelaySchedule::new(d, 0, 1, &[0, 2], &[], 64, 2);
        let out: Vec<_> = std::iter::from_fn(|| s.poll_transmit(&mut mem)).collect();
        // Two relays, two chunks in flight each.
        assert_eq!(out.len(), 4);
        assert_eq!(out.iter().filter(|t| t.to == Endpoint::Relay(2)).count(), 2);
        let t = &out[0];
        let mut late = t.header;
        late.offset += 3 * 64;
        assert!(s.handle_frame(&mut mem, t.to, &late, &[0; 64]).is_err());
        assert!(s.handle_frame(&mut mem, t.to, &t.header, &[0; 8]).is_err());
        assert!(s
            .handle_frame(&mut mem, Endpoint::Relay(1), &t.header, &[7; 64])
            .is_err());
        assert!(s
            .handle_frame(&mut mem, Endpoint::Relay(2), &t.header, &[7; 64])
            .is_err());
        s.handle_frame(&mut mem, t.to, &t.header, &[7; 64]).unwrap();
        assert!(s.handle_frame(&mut mem, t.to, &t.header, &[7; 64]).is_err());
        let next = s.poll_transmit(&mut mem).unwrap();
        assert_eq!(next.to, t.to);
        assert!(s.poll_transmit(&mut mem).is_none());
        assert!(buf[..64].iter().all(|&b| b == 7));
        // Relay 0 is lost: its chunks (the answered one too, from the saved input) go to 2.
        s.handle_endpoint_lost(&mut mem, Endpoint::Relay(0), Error::remote("gone"))
            .unwrap();
        assert_eq!(s.poll_endpoint_dropped(), Some(Endpoint::Relay(0)));
        let redo = s.poll_transmit(&mut mem).unwrap();
        assert_eq!(redo.to, Endpoint::Relay(2));
        assert_eq!(redo.header.offset, 0);
        assert_eq!(
            mem.bytes(&redo.region),
            &[0u8; 64][..],
            "the input, not the result"
        );
        assert!(!s.is_complete());
        let empty = RelaySchedule::new(
            desc(Collective::AllReduce, 0, 0),
            0,
            3,
            &[0, 1, 2],
            &[],
            64,
            4,
        );
        assert!(empty.is_complete());
    }
}

//! The relay schedule of one peer (see the [module docs](super) for the protocol).

use crate::algo::broadcast::Broadcast;
use crate::algo::compressed::CompressedRing;
use crate::algo::relay::route::{chunk_ranges, path_of};
use crate::algo::ring::RingReduce;
use crate::algo::span::byte_range;
use crate::algo::{Collective, Endpoint, OpDesc, Schedule, Transmit};
use crate::buffer::{OpMemory, Region, Scratch};
use crate::compress::Compression;
use crate::error::{Error, Result};
use crate::wire::FrameHeader;
use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

/// Largest input backup the progress loop keeps for the next op ([`OpMemory::backup`]): a
/// fresh backup is an anonymous mapping whose every page faults in while results arrive,
/// which cost peers more than the copies themselves.
pub const MAX_SPARE_BACKUP: usize = 256 << 20;

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
    /// The result overwrote the input, which is in the backup: copied there (exact), or
    /// encoded there before its first send (compressed).
    saved: bool,
    /// Compressed: the input's encoding is in the backup's image of the buffer.
    encoded: bool,
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
                    encoded: false,
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
                forward: false,
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
        let mut schedule: Box<dyn Schedule> = match self.role {
            Role::AllReduce => {
                if let Some(b) = &mem.backup {
                    let user = mem.user.as_mut_slice();
                    for c in self.chunks.iter().filter(|c| c.saved) {
                        match self.z {
                            Compression::None => {
                                user[c.user.clone()].copy_from_slice(&b.as_slice()[c.user.clone()])
                            }
                            // Only the input's encoding was kept: the ring starts from what
                            // it decodes to, one encoding more on these elements' path.
                            z => z.decode_bytes(
                                desc.dtype,
                                &b.as_slice()[c.range.clone()],
                                &mut user[c.user.clone()],
                            ),
                        }
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
        schedule.start(mem)?;
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
        match z {
            Compression::None => {
                let backup = backup_for(&mut mem.backup, user.len())?;
                backup[u.clone()].copy_from_slice(&user[u.clone()]);
                user[u].copy_from_slice(payload)
            }
            // The input's encoding stays in the image it was sent from.
            z => z.decode_result_bytes(dtype, payload, &mut user[u]),
        }
        self.chunks[c].saved = true;
        self.chunks[c].done = true;
        self.done_count += 1;
        Ok(())
    }
}

/// The op's input backup ([`OpMemory::backup`]) with room for `len` bytes: whatever an
/// earlier op left there, or a fresh one. Only chunks this op copied in are ever read.
fn backup_for(backup: &mut Option<Scratch>, len: usize) -> Result<&mut [u8]> {
    if backup.as_ref().map_or(true, |b| b.len() < len) {
        *backup = Some(Scratch::zeroed(len)?);
    }
    Ok(backup.as_mut().expect("backup").as_mut_slice())
}

impl Schedule for RelaySchedule {
    fn desc(&self) -> &OpDesc {
        &self.desc
    }

    /// A compressed all-reduce reserves the encoded image of its input in the backup: each
    /// chunk is encoded there once and sent from there, however often a lost relay makes it
    /// go again, and no float copy of the input is needed before a result overwrites it.
    fn start(&mut self, mem: &mut OpMemory) -> Result<()> {
        if self.z != Compression::None {
            if let Some(last) = self.chunks.last() {
                backup_for(&mut mem.backup, last.range.end)?;
            }
        }
        Ok(())
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
            let c = lane.members[lane.next_send];
            let ch = &mut self.chunks[c];
            lane.next_send += 1;
            lane.in_flight += 1;
            self.turn = (k + 1) % n;
            let (r, u) = (ch.range.clone(), ch.user.clone());
            let mut header = self.desc.header(aux, r.start, r.len());
            header.aux = aux;
            let region = match self.z {
                Compression::None => match (&mem.backup, ch.saved) {
                    (Some(b), true) => Region::Inline(b.as_slice()[u].to_vec()),
                    _ => Region::User {
                        offset: u.start,
                        len: u.len(),
                    },
                },
                // Encoded once, at the first send, into the image of the buffer that
                // `start` reserved; a chunk redone through another relay sends the same bytes.
                z => {
                    if !ch.encoded {
                        let image = mem
                            .backup
                            .as_mut()
                            .expect("start reserved the encoded image")
                            .as_mut_slice();
                        z.encode_bytes(
                            self.desc.dtype,
                            &mem.user.as_slice()[u],
                            &mut image[r.clone()],
                        );
                        ch.encoded = true;
                    }
                    Region::Backup {
                        offset: r.start,
                        len: r.len(),
                    }
                }
            };
            return Some(Transmit {
                to: Endpoint::Relay(self.relays[lane.target()]),
                header,
                region,
                forward: false,
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
    use crate::buffer::RawBuf;
    use crate::types::{DType, ReduceOp};

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

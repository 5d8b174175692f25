//! Broadcast among the ranks: a pipelined chain along the ring for large messages, a
//! binomial tree for small ones. Frame offsets are byte offsets in the caller's buffer; `aux`
//! carries the root, so ranks that named different roots get a mismatch error.

use crate::algo::check::check_range;
use crate::algo::span::{chunks, ring_index};
use crate::algo::tally::Tally;
use crate::algo::{Endpoint, OpDesc, Schedule, Transmit};
use crate::buffer::{OpMemory, Region};
use crate::error::{Error, Result};
use crate::wire::FrameHeader;
use std::ops::Range;

/// Broadcast from the root. Large messages take a pipelined chain along the ring (each chunk
/// forwarded the moment it arrives, so every link carries the buffer once); small ones a
/// binomial tree: with v = (rank − root) mod n, rank v receives from v − 2^⌊log2 v⌋ and passes
/// on to v + 2^j for every 2^j > v, largest subtree first, so the last rank has the data after
/// ⌈log2 n⌉ hops instead of n − 1.
pub struct Broadcast {
    desc: OpDesc,
    rank: usize,
    n: usize,
    chunk: usize,
    /// Distance from the root along the ring.
    v: usize,
    tree: bool,
    started: bool,
    tally: Tally,
}

impl Broadcast {
    /// The pipelined chain.
    pub fn chain(desc: OpDesc, rank: usize, n: usize, chunk: usize) -> Broadcast {
        Broadcast::new(desc, rank, n, chunk, false)
    }

    /// The binomial tree.
    pub fn tree(desc: OpDesc, rank: usize, n: usize, chunk: usize) -> Broadcast {
        Broadcast::new(desc, rank, n, chunk, true)
    }

    fn new(desc: OpDesc, rank: usize, n: usize, chunk: usize, tree: bool) -> Broadcast {
        let bytes = desc.count * desc.dtype.size();
        let v = ring_index(rank as isize - desc.root as isize, n);
        let mut s = Broadcast {
            desc,
            rank,
            n,
            chunk,
            v,
            tree,
            started: false,
            tally: Tally::default(),
        };
        s.tally.send_expected = s.children().len() * bytes;
        s.tally.recv_expected = if v > 0 { bytes } else { 0 };
        s
    }

    fn to_rank(&self, v: usize) -> usize {
        (v + self.desc.root) % self.n
    }

    /// Ranks this one passes data on to (tree: largest subtree first).
    fn children(&self) -> Vec<usize> {
        if !self.tree {
            return if self.v + 1 < self.n {
                vec![self.to_rank(self.v + 1)]
            } else {
                Vec::new()
            };
        }
        let first = usize::BITS - self.v.leading_zeros();
        let mut c: Vec<usize> = (first..usize::BITS)
            .map(|j| 1usize << j)
            .take_while(|&d| self.v + d < self.n)
            .map(|d| self.to_rank(self.v + d))
            .collect();
        c.reverse();
        c
    }

    /// The rank data comes from (not called on the root).
    fn parent(&self) -> Endpoint {
        let up = if self.tree {
            1usize << (usize::BITS - 1 - self.v.leading_zeros())
        } else {
            1
        };
        Endpoint::Rank(self.to_rank(self.v - up))
    }

    /// Queue `range` (bytes of `mem.user`) to every child.
    fn forward(&mut self, range: Range<usize>) {
        for child in self.children() {
            let header = self
                .desc
                .header(self.desc.root as u32, range.start, range.len());
            let region = Region::User {
                offset: range.start,
                len: range.len(),
            };
            self.tally.push(Transmit {
                to: Endpoint::Rank(child),
                header,
                region,
                forward: self.v != 0,
            });
        }
    }

    /// Validate a frame; the byte range of `mem.user` it fills.
    fn target(&self, from: Endpoint, h: &FrameHeader) -> Result<Range<usize>> {
        self.desc.check_matches(from, h)?;
        if h.aux as usize != self.desc.root {
            return Err(Error::invalid(format!(
                "mismatched collective calls: {from} broadcasts from root {} but this rank called {}",
                h.aux, self.desc
            )));
        }
        if self.v == 0 || from != self.parent() {
            return Err(Error::remote(format!(
                "{}: unexpected data from {from}",
                self.desc
            )));
        }
        let size = self.desc.dtype.size();
        check_range(
            &self.desc,
            from,
            h,
            h.len as usize,
            &(0..self.desc.count * size),
            size,
        )
    }

    /// A frame's payload is in `mem.user[r]`: count it and pass it on.
    fn landed(&mut self, r: Range<usize>) {
        self.tally.received += r.len();
        self.forward(r);
    }
}

impl Schedule for Broadcast {
    fn desc(&self) -> &OpDesc {
        &self.desc
    }
    fn poll_transmit(&mut self, _mem: &mut OpMemory) -> Option<Transmit> {
        if !self.started {
            self.started = true;
            if self.v == 0 {
                let size = self.desc.dtype.size();
                for c in chunks(0..self.desc.count * size, size, self.chunk) {
                    self.forward(c);
                }
            }
        }
        self.tally.pop()
    }
    fn handle_sent(&mut self, t: &Transmit) {
        self.tally.sent(t);
    }
    fn handle_frame(
        &mut self,
        mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
        payload: &[u8],
    ) -> Result<()> {
        let r = self.target(from, h)?;
        mem.user.as_mut_slice()[r.clone()].copy_from_slice(payload);
        self.landed(r);
        Ok(())
    }
    fn recv_in_place(&mut self, from: Endpoint, h: &FrameHeader) -> Result<Option<Region>> {
        let r = self.target(from, h)?;
        Ok(Some(Region::User {
            offset: r.start,
            len: r.len(),
        }))
    }
    fn handle_frame_in_place(
        &mut self,
        _mem: &mut OpMemory,
        from: Endpoint,
        h: &FrameHeader,
    ) -> Result<()> {
        let r = self.target(from, h)?;
        self.landed(r);
        Ok(())
    }
    fn is_complete(&self) -> bool {
        self.started && self.tally.complete()
    }
    fn waiting_for(&self) -> String {
        let from = if self.v == 0 {
            "nobody".to_string()
        } else {
            self.parent().to_string()
        };
        format!(
            "{} ({} from root {}: rank {} waits on {from})",
            self.tally.describe(),
            if self.tree { "tree" } else { "chain" },
            self.desc.root,
            self.rank
        )
    }
}

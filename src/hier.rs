//! Hierarchical collectives for jobs with several ranks on some of several hosts.
//!
//! A job whose [`Layout`] spans more than one host with more than one rank on some host runs
//! its collectives in two levels, like NCCL's and Horovod's hierarchical all-reduce:
//!
//! * a **local** communicator per host (its ranks in local-rank order), which goes through the
//!   host's shared-memory segment — or TCP among the host's ranks when that host's `/dev/shm`
//!   cannot be used (each local communicator decides for itself and logs why);
//! * **rails** between hosts, in the manner of NCCL's channels: with R the smallest number of
//!   ranks on any host, rail i is a communicator of local rank i of every host (ranks in host
//!   order), for i < R. The rails carry the inter-host traffic over the ring or through the
//!   relays, with the job's `MR_ALGO`, relays, compression and verification. Rail 0, of the
//!   hosts' local ranks 0, is the **leaders**' communicator.
//!
//! An all-reduce cuts each piece of the buffer into R shares; after the host has reduced the
//! piece, local rank i carries share i between hosts on rail i, and then hands its share to
//! the host. So a host's link carries each byte once per collective whatever its number of
//! ranks (in relay mode D up and D down, on the ring 2(H−1)/H · D each way), and that traffic
//! is spread over R of its ranks, their connections and their cores. Broadcast, all-gather
//! and barrier go between hosts through the leaders alone.
//!
//! **Summation order** (all-reduce): inside each host in local-rank order (shared memory
//! reduces slices over all ranks' data in rank order), then across hosts in the inter-host
//! path's order (a relay sums hosts in host order; the ring in its chain order). The rank that
//! carried a share then broadcasts the bytes it holds to its host, so every rank ends with
//! identical bits. `AVG` sums at both levels and the share's carrier divides by the world size
//! once, before broadcasting.
//!
//! The sub-communicators are created at init over the parent's authenticated links: each
//! host's leader mints the local id, local rank i of host 0 the id of rail i, and one
//! all-gather hands them out.
//! Ops run one after another on a worker thread, in the order they were started; each phase is
//! bounded by `MR_TIMEOUT_MS` in its communicator, and a failure in any phase aborts both
//! sub-communicators, so every rank of the job errors promptly instead of waiting out the
//! timeout.

use crate::comm::{Comm, Request, UniqueId};
use crate::config::{Algo, Config};
use crate::error::{Error, ErrorKind, Result};
use crate::layout::Layout;
use crate::net::engine::Completion;
use crate::reduce;
use crate::types::{DType, ReduceOp};
use crossbeam_channel::{Receiver, Sender};
use std::sync::Arc;

/// A collective as started by the caller; pointers stay valid until its completion fires (the
/// same contract as the flat raw entry points).
pub(crate) enum HierOp {
    AllReduce {
        buf: Ptr,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        compress: crate::compress::Compression,
    },
    Broadcast {
        buf: Ptr,
        count: usize,
        dtype: DType,
        root: usize,
    },
    AllGather {
        send: Ptr,
        recv: Ptr,
        count: usize,
        dtype: DType,
    },
    ReduceScatter {
        send: Ptr,
        recv: Ptr,
        count: usize,
        dtype: DType,
        op: ReduceOp,
    },
    Barrier,
}

/// A caller's buffer address handed to the worker thread.
#[derive(Clone, Copy)]
pub(crate) struct Ptr(pub *mut u8);

// SAFETY: the raw entry points' contract gives the op exclusive use of the memory until its
// completion fires, and only the worker thread touches it meanwhile.
unsafe impl Send for Ptr {}

struct Job {
    op: HierOp,
    done: Arc<Completion>,
}

/// The two levels and the worker that runs ops through them.
pub(crate) struct Hierarchy {
    tx: Option<Sender<Job>>,
    worker: Option<std::thread::JoinHandle<()>>,
    /// Shared with the worker; `None` once `shutdown` took it back.
    levels: Option<Arc<Levels>>,
}

struct Levels {
    layout: Layout,
    world: usize,
    local: Option<Comm>,
    /// This rank's rail between hosts (local ranks below `rails` have one).
    rail: Option<Comm>,
    /// Rails between hosts: the smallest number of ranks on any host.
    rails: usize,
}

impl Hierarchy {
    /// Create the local and leaders communicators for `parent`, whose layout is
    /// hierarchical. Every rank of the parent must call this.
    pub(crate) fn start(parent: &Comm) -> Result<Hierarchy> {
        let layout = parent.layout().clone();
        let (rank, size) = (parent.rank(), parent.size());
        let leader = layout.local_rank() == 0;
        let rails = (0..layout.hosts())
            .map(|h| layout.ranks_on(h).len())
            .min()
            .unwrap_or(1)
            .max(1);
        let on_rail = layout.local_rank() < rails;
        let mut base = parent.config().clone();
        // The sub-communicators' bootstrap listeners must be reachable where this rank is:
        // on the address the parent's ranks already reach it on, unless one was configured.
        if base.bind_addr.is_none() && base.ifname.is_none() {
            base.bind_addr = parent.local_ip();
        }
        // Inside a host: shared memory (TCP among the host's ranks if it cannot be had),
        // never relays.
        let local_cfg = Config {
            algo: Algo::Auto,
            relays: Vec::new(),
            validator: None,
            hierarchy: false,
            compress: crate::compress::Compression::None,
            ..base.clone()
        };
        // Between hosts: the job's path, never shared memory.
        let leaders_cfg = Config {
            shm: false,
            hierarchy: false,
            ..base
        };
        // Hand out the ids: each leader of a multi-rank host mints its host's, local rank i of
        // host 0 that of rail i; one all-gather of 2 x 256 bytes per rank.
        let mut mine = [0u8; 512];
        if leader && layout.local_size() > 1 {
            mine[..256].copy_from_slice(UniqueId::new(&local_cfg)?.as_bytes());
        }
        if layout.host() == 0 && on_rail {
            mine[256..].copy_from_slice(UniqueId::new(&leaders_cfg)?.as_bytes());
        }
        let mut all = vec![0u8; 512 * size];
        parent
            .allgather(&mine, &mut all)
            .map_err(|e| e.context("handing out the hierarchy's ids"))?;
        let id_at = |r: usize, half: usize| {
            let mut id = [0u8; 256];
            id.copy_from_slice(&all[512 * r + 256 * half..][..256]);
            UniqueId(id)
        };
        let local = if layout.local_size() > 1 {
            let host_leader = layout.ranks_on(layout.host())[0];
            let c = Comm::init(
                layout.local_size(),
                &id_at(host_leader, 0),
                layout.local_rank(),
                local_cfg,
            )
            .map_err(|e| e.context(format!("host {} communicator", layout.host())))?;
            Some(c)
        } else {
            None
        };
        let rail = if on_rail {
            let minter = layout.ranks_on(0)[layout.local_rank()];
            let c = Comm::init(
                layout.hosts(),
                &id_at(minter, 1),
                layout.host(),
                leaders_cfg,
            )
            .map_err(|e| e.context(format!("rail {} between hosts", layout.local_rank())))?;
            Some(c)
        } else {
            None
        };
        if rank == 0 {
            log::info!(
                "hierarchical collectives: {layout}; inside hosts: {}; between hosts: {}",
                match &local {
                    Some(c) if c.uses_shared_memory() => "shared memory",
                    Some(_) => "TCP",
                    None => "nothing to do",
                },
                match &rail {
                    Some(c) if !c.relays().is_empty() => format!("relays, {rails} rail(s)"),
                    _ => format!("ring, {rails} rail(s)"),
                }
            );
        }
        let levels = Arc::new(Levels {
            layout,
            world: size,
            local,
            rail,
            rails,
        });
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let worker_levels = levels.clone();
        let worker = std::thread::Builder::new()
            .name(format!("mr-hier-{rank}"))
            .spawn(move || run(&worker_levels, rx))
            .map_err(|e| Error::io("cannot start the hierarchy thread", e))?;
        Ok(Hierarchy {
            tx: Some(tx),
            worker: Some(worker),
            levels: Some(levels),
        })
    }

    /// Queue `op`; it runs after every op started before it.
    pub(crate) fn submit(&self, op: HierOp) -> Result<Request> {
        let done = Arc::new(Completion::default());
        self.tx
            .as_ref()
            .expect("running")
            .send(Job {
                op,
                done: done.clone(),
            })
            .map_err(|_| Error::new(ErrorKind::Aborted, "the hierarchy thread has stopped"))?;
        Ok(Request::from_completion(done))
    }

    /// End every pending and future op with an error; callable from any thread.
    pub(crate) fn abort(&self) {
        if let Some(l) = &self.levels {
            l.abort();
        }
    }

    /// Let the worker finish what is queued, then stop it.
    fn stop_worker(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }

    /// Finish queued ops and leave both levels gracefully.
    pub(crate) fn shutdown(mut self) -> Result<()> {
        self.stop_worker();
        // The worker held the only other reference, and it has ended.
        let levels = self
            .levels
            .take()
            .and_then(|l| Arc::try_unwrap(l).ok())
            .ok_or_else(|| Error::internal("hierarchy levels still shared at shutdown"))?;
        let mut first = Ok(());
        for c in [levels.rail, levels.local].into_iter().flatten() {
            let r = c.destroy();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl Drop for Hierarchy {
    /// Without [`Hierarchy::shutdown`] (the communicator was dropped, not destroyed): end
    /// whatever is still running rather than wait for it.
    fn drop(&mut self) {
        if self.tx.is_some() {
            self.abort();
        }
        self.stop_worker();
    }
}

impl Levels {
    fn abort(&self) {
        for c in [&self.local, &self.rail].into_iter().flatten() {
            c.abort();
        }
    }
}

fn run(levels: &Levels, rx: Receiver<Job>) {
    for job in rx {
        let r = run_op(levels, &job.op);
        if r.as_ref().is_err_and(|e| e.kind != ErrorKind::Verify) {
            // The other ranks may be waiting on us in either level: break both so they learn
            // at once instead of after their timeout. (A failed verification leaves both
            // levels in step: every rank learns it through the op itself.)
            levels.abort();
        }
        job.done.complete(r);
    }
}

/// Whole-buffer byte view of a caller's pointer.
///
/// # Safety
/// `p` must be valid for `len` bytes and used by nothing else while the slice lives.
unsafe fn bytes<'a>(p: Ptr, len: usize) -> &'a mut [u8] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: this function's contract.
    unsafe { std::slice::from_raw_parts_mut(p.0, len) }
}

fn run_op(lv: &Levels, op: &HierOp) -> Result<()> {
    match *op {
        HierOp::AllReduce {
            buf,
            count,
            dtype,
            op,
            compress,
        } => {
            // SAFETY: the op's contract (see `HierOp`).
            let data = unsafe { bytes(buf, count * dtype.size()) };
            allreduce(lv, data, count, dtype, op, compress)
        }
        HierOp::Broadcast {
            buf,
            count,
            dtype,
            root,
        } => {
            // SAFETY: the op's contract.
            let data = unsafe { bytes(buf, count * dtype.size()) };
            broadcast(lv, data, count, dtype, root)
        }
        HierOp::AllGather {
            send,
            recv,
            count,
            dtype,
        } => {
            let b = count * dtype.size();
            // SAFETY: the op's contract; send and recv do not overlap (checked by the caller
            // unless send is the rank's own block of recv, which we copy out first).
            let input = unsafe { bytes(send, b) }.to_vec();
            // SAFETY: as above.
            let out = unsafe { bytes(recv, b * lv.world) };
            allgather(lv, &input, out)
        }
        HierOp::ReduceScatter {
            send,
            recv,
            count,
            dtype,
            op,
        } => {
            let b = count * dtype.size();
            if lv.uniform() {
                // SAFETY: the op's contract (send holds every rank's block; recv ours).
                let (input, out) = unsafe { (bytes(send, b * lv.world), bytes(recv, b)) };
                return reduce_scatter_by_host(lv, input, out, count, dtype, op);
            }
            // Hosts of different sizes: the whole input, reduced hierarchically, then this
            // rank's block.
            // SAFETY: the op's contract.
            let mut all = unsafe { bytes(send, b * lv.world) }.to_vec();
            allreduce(
                lv,
                &mut all,
                count * lv.world,
                dtype,
                op,
                crate::compress::Compression::None,
            )?;
            let me = lv.layout_rank();
            // SAFETY: the op's contract.
            unsafe { bytes(recv, b) }.copy_from_slice(&all[me * b..(me + 1) * b]);
            Ok(())
        }
        HierOp::Barrier => {
            if let Some(l) = &lv.local {
                l.barrier()?;
            }
            if let Some(l) = lv.leaders() {
                l.barrier()?;
            }
            if let Some(l) = &lv.local {
                l.barrier()?;
            }
            Ok(())
        }
    }
}

/// Context for errors of the leaders' communicator, whose rank k is the leader of host k.
const BETWEEN: &str = "between hosts (there, rank k is the leader of host k)";

impl Levels {
    /// Context for errors of this host's communicator, whose ranks are local ranks.
    fn inside(&self) -> String {
        let h = self.layout.host();
        format!(
            "inside host {h} (ranks {:?}; there, rank k is local rank k)",
            self.layout.ranks_on(h)
        )
    }

    /// Whether every host holds the same number of ranks.
    fn uniform(&self) -> bool {
        let l = &self.layout;
        (0..l.hosts()).all(|h| l.ranks_on(h).len() == l.local_size())
    }

    /// The leaders' communicator (rail 0), on the hosts' local ranks 0.
    fn leaders(&self) -> Option<&Comm> {
        self.rail.as_ref().filter(|_| self.layout.local_rank() == 0)
    }

    /// Context for errors of this rank's rail.
    fn between(&self) -> String {
        match self.layout.local_rank() {
            0 => BETWEEN.to_string(),
            i => format!("between hosts on rail {i} (there, rank k is local rank {i} of host k)"),
        }
    }

    fn layout_rank(&self) -> usize {
        self.layout.ranks_on(self.layout.host())[self.layout.local_rank()]
    }
}

/// Bytes of one piece of a pipelined hierarchical all-reduce: large enough that per-op costs
/// stay small (each piece is R ops between hosts, one per rail), small enough that the phases
/// overlap over most of the buffer. 16 MiB measured best of 4, 16 and 32 MiB for 64 and
/// 256 MiB all-reduces on 2 hosts x 2 ranks (BENCHMARKS.md §12).
const PIECE_MIN: usize = 16 << 20;
/// The reduction each level runs for `op`: an average sums at both levels, and the rank that
/// holds the final sum divides once by the world size.
fn level_op(op: ReduceOp) -> ReduceOp {
    if op == ReduceOp::Avg {
        ReduceOp::Sum
    } else {
        op
    }
}

/// Most pieces an all-reduce is cut into, besides its two short end pieces.
const PIECES_MAX: usize = 8;

/// Element ranges of the pieces of an all-reduce of `count` elements of `size` bytes: a function
/// of the count and the type only, so every rank cuts the same pieces. Pieces are whole
/// compression blocks. Below 2 × [`PIECE_MIN`] one piece; above, n = bytes / [`PIECE_MIN`]
/// (at most [`PIECES_MAX`]) and the buffer is cut into a short first piece (a quarter of
/// count / n), n − 1 equal pieces, and a short last piece: the first reduction inside the host
/// and the last hand-out are the two phases nothing overlaps, so they get the least bytes
/// (BENCHMARKS.md §12: with the queued exchanges, 2 hosts x 2 ranks, 64 MiB relay
/// all-reduce at 90.9–92.7% of the bound against 90.3–90.9% with equal pieces).
fn pieces(count: usize, size: usize) -> Vec<std::ops::Range<usize>> {
    if count == 0 {
        // One empty piece: the ops still run (every rank issues the same sequence).
        return std::iter::once(0..0).collect();
    }
    let block = crate::compress::INT8_BLOCK;
    let n = (count * size / PIECE_MIN).min(PIECES_MAX);
    if n < 2 {
        return std::iter::once(0..count).collect();
    }
    let end = (count / n / 4).div_ceil(block) * block;
    // The last piece starts on a block, so that every piece but the last is whole blocks.
    let last = (count - end) / block * block;
    let per = (last - end).div_ceil(n - 1).div_ceil(block) * block;
    let mut out = Vec::with_capacity(n + 1);
    out.push(0..end);
    out.extend((end..last).step_by(per).map(|a| a..(a + per).min(last)));
    out.push(last..count);
    out
}

/// Share `i` of `rails` of the elements `r`: whole compression blocks, the last share takes
/// what is left (the shares of a short piece may be empty).
fn share(r: &std::ops::Range<usize>, rails: usize, i: usize) -> std::ops::Range<usize> {
    let block = crate::compress::INT8_BLOCK;
    let per = r.len().div_ceil(rails).div_ceil(block) * block;
    let a = r.start.saturating_add(i.saturating_mul(per)).min(r.end);
    a..a.saturating_add(per).min(r.end)
}

/// Sum (or reduce) inside the host, each share across hosts on its rail, then hand the shares
/// to the host; piece by piece, so that while the rails exchange piece k the host already
/// reduces piece k+1 and hands out piece k-1.
///
/// Every rank of a host issues the host's ops in one order: reduce 0, reduce 1, hand out 0,
/// reduce 2, hand out 1, ..., hand out the last, where "hand out k" is each rail's word (ok or
/// its error), then each rail's share of piece k, broadcast from the local rank that carried
/// it. A rank issues "hand out k" once its own rail's exchange of piece k ended; the host's
/// communicator runs it after "reduce k+1". A rail's exchange of piece k+1 is issued once
/// "reduce k+1" ended, while piece k's is still crossing, so the rail moves from one to the
/// next without waiting for this thread. The result of each piece is what the unpipelined
/// order gives for that piece.
fn allreduce(
    lv: &Levels,
    data: &mut [u8],
    count: usize,
    dtype: DType,
    op: ReduceOp,
    compress: crate::compress::Compression,
) -> Result<()> {
    let mut pending: Vec<(Request, Option<(usize, usize)>)> = Vec::new();
    // Boxed: requests write into them while the Vec grows.
    #[allow(clippy::vec_box)]
    let mut statuses: Vec<Box<[u8; STATUS_LEN]>> = Vec::new();
    // Exchanges between hosts issued and not yet waited for (all of them when the op ended
    // early: they may still write into `data`).
    let mut queued: Vec<Request> = Vec::new();
    let r = allreduce_pieces(
        lv,
        data,
        count,
        dtype,
        op,
        compress,
        &mut pending,
        &mut statuses,
        &mut queued,
    );
    if r.as_ref().is_err_and(|e| e.kind != ErrorKind::Verify) {
        // Requests still in flight write into `data` and `statuses`: end them before those
        // are given back. (After a failed verification every rank issued the same ops, which
        // all complete: both levels stay usable, as a flat communicator does.)
        lv.abort();
    }
    for (q, _) in pending {
        let _ = q.wait();
    }
    for q in queued {
        let _ = q.wait();
    }
    r
}

/// Bytes of the leader's word to its host before each hand-out: ok, or its error.
const STATUS_LEN: usize = 256;

/// The leader's word: byte 0 is 0 (ok) or 1 + the error's kind; then the message, truncated.
fn encode_status(r: &Result<()>) -> Box<[u8; STATUS_LEN]> {
    let mut s = Box::new([0u8; STATUS_LEN]);
    if let Err(e) = r {
        s[0] = 1 + e.kind as u8;
        let m = e.message.as_bytes();
        let n = m.len().min(STATUS_LEN - 3);
        s[1..3].copy_from_slice(&(n as u16).to_le_bytes());
        s[3..3 + n].copy_from_slice(&m[..n]);
    }
    s
}

/// The word of the rail carried by local rank `from`.
fn decode_status(s: &[u8; STATUS_LEN], from: usize) -> Result<()> {
    if s[0] == 0 {
        return Ok(());
    }
    let n = usize::from(u16::from_le_bytes([s[1], s[2]])).min(STATUS_LEN - 3);
    let who = match from {
        0 => "the host's leader".to_string(),
        i => format!("local rank {i} (rail {i} between hosts)"),
    };
    Err(Error::new(
        ErrorKind::from_u8(s[0] - 1),
        format!("{who} failed: {}", String::from_utf8_lossy(&s[3..3 + n])),
    ))
}

// The words are boxed so their bytes stay put while requests write them and the Vec grows.
#[allow(clippy::too_many_arguments, clippy::vec_box)]
fn allreduce_pieces(
    lv: &Levels,
    data: &mut [u8],
    count: usize,
    dtype: DType,
    op: ReduceOp,
    compress: crate::compress::Compression,
    pending: &mut Vec<(Request, Option<(usize, usize)>)>,
    statuses: &mut Vec<Box<[u8; STATUS_LEN]>>,
    queued: &mut Vec<Request>,
) -> Result<()> {
    let level_op = level_op(op);
    let size = dtype.size();
    let ranges = pieces(count, size);
    let rails = lv.rails;
    let me = lv.layout.local_rank();
    let base = data.as_mut_ptr();
    // SAFETY (for every `at`): the ranges lie inside `data`, which outlives every request
    // (the caller waits for all of them); pieces do not overlap, nor do the shares of a
    // piece, and each piece is used by one op at a time (reduce k, then the rails' exchanges of
    // its disjoint shares, then hand out k, each waited for before the next is issued on that
    // piece).
    let at = |r: &std::ops::Range<usize>| unsafe { base.add(r.start * size) };
    let reduce = |k: usize, pending: &mut Vec<(Request, Option<(usize, usize)>)>| -> Result<()> {
        if let Some(l) = &lv.local {
            let r = &ranges[k];
            // SAFETY: see `at`.
            pending.push((
                unsafe { l.iallreduce_raw(at(r), r.len(), dtype, level_op)? },
                None,
            ));
        }
        Ok(())
    };
    // Each rail's word (this rank's own is `word`), then each rail's share of piece k, from
    // the local rank that carried it.
    let hand_out = |k: usize,
                    word: Box<[u8; STATUS_LEN]>,
                    pending: &mut Vec<(Request, Option<(usize, usize)>)>,
                    statuses: &mut Vec<Box<[u8; STATUS_LEN]>>|
     -> Result<()> {
        if let Some(l) = &lv.local {
            for i in 0..rails {
                statuses.push(if i == me {
                    word.clone()
                } else {
                    Box::new([0u8; STATUS_LEN])
                });
                let at_word = statuses.len() - 1;
                let p = statuses[at_word].as_mut_ptr();
                // SAFETY: the box's heap bytes stay put while `statuses` grows and live until
                // the caller has waited for every request.
                pending.push((
                    unsafe { l.ibroadcast_raw(p, STATUS_LEN, DType::U8, i)? },
                    Some((at_word, i)),
                ));
            }
            for i in 0..rails {
                let r = share(&ranges[k], rails, i);
                // SAFETY: see `at`.
                pending.push((
                    unsafe { l.ibroadcast_raw(at(&r), r.len(), dtype, i)? },
                    None,
                ));
            }
        }
        Ok(())
    };
    // Local requests finish in issue order; wait for the oldest ones as needed. A word from
    // a rail that says it failed ends the op here with its error.
    let wait_local = |pending: &mut Vec<(Request, Option<(usize, usize)>)>,
                      statuses: &Vec<Box<[u8; STATUS_LEN]>>,
                      keep: usize|
     -> Result<()> {
        while pending.len() > keep {
            let (q, word) = pending.remove(0);
            q.wait().map_err(|e| e.context(lv.inside()))?;
            if let Some((i, from)) = word {
                decode_status(&statuses[i], from).map_err(|e| e.context(lv.inside()))?;
            }
        }
        Ok(())
    };
    // Piece k's exchange between hosts on this rank's rail, if it has one, queued behind
    // those in flight: they end in issue order.
    let exchange = |k: usize, queued: &mut Vec<Request>| -> Result<()> {
        if let Some(l) = &lv.rail {
            let mine = share(&ranges[k], rails, me);
            // SAFETY: see `at`.
            queued.push(unsafe {
                l.iallreduce_compressed_raw(at(&mine), mine.len(), dtype, level_op, compress)?
            });
        }
        Ok(())
    };
    reduce(0, pending)?;
    wait_local(pending, statuses, 0)?;
    exchange(0, queued)?;
    for k in 0..ranges.len() {
        if k > 0 {
            // Every rail's word on piece k-1 before any further local op: a rank whose rail
            // failed there issued nothing after "hand out k-1", so after a failed
            // verification (which leaves both levels usable) every rank of the host stops
            // at the same op.
            wait_local(pending, statuses, rails)?;
        }
        // Piece k+1 is reduced on this host while piece k crosses, and its exchange is
        // queued behind piece k's on the rail, which starts it the moment piece k's ends.
        if k + 1 < ranges.len() {
            reduce(k + 1, pending)?;
            wait_local(pending, statuses, 0)?;
            exchange(k + 1, queued)?;
        }
        if lv.rail.is_some() {
            let got = queued.remove(0).wait().map_err(|e| e.context(lv.between()));
            let mine = share(&ranges[k], rails, me);
            if got.is_ok() && op == ReduceOp::Avg {
                // SAFETY: see `at`; this share is in no request now.
                let piece = unsafe { std::slice::from_raw_parts_mut(at(&mine), mine.len() * size) };
                reduce::divide(dtype, piece, lv.world);
            }
            if let Err(e) = got {
                // Tell the host why before leaving, so its ranks fail with the reason.
                hand_out(k, encode_status(&Err(e.clone())), pending, statuses)?;
                let _ = wait_local(pending, statuses, 0);
                return Err(e);
            }
        }
        hand_out(k, encode_status(&Ok(())), pending, statuses)?;
    }
    wait_local(pending, statuses, 0)
}

/// Reduce-scatter when every host holds L ranks: each host reduces every block (in host
/// order, its ranks' blocks side by side), the leaders reduce-scatter those so that each ends
/// with its own host's L blocks (between hosts (H−1)/H of the buffer each way, half of what an
/// all-reduce moves), and the leader hands them to its host, each rank keeping its own.
fn reduce_scatter_by_host(
    lv: &Levels,
    input: &[u8],
    out: &mut [u8],
    count: usize,
    dtype: DType,
    op: ReduceOp,
) -> Result<()> {
    let lay = &lv.layout;
    let b = count * dtype.size();
    let per_host = lay.local_size() * b;
    let level_op = level_op(op);
    // The input's blocks in host order (a host's ranks need not be consecutive).
    let mut all = vec![0u8; input.len()];
    for h in 0..lay.hosts() {
        for (i, &r) in lay.ranks_on(h).iter().enumerate() {
            all[h * per_host + i * b..][..b].copy_from_slice(&input[r * b..][..b]);
        }
    }
    let local = lv
        .local
        .as_ref()
        .ok_or_else(|| Error::internal("a hierarchical reduce-scatter on a host of one rank"))?;
    let elems = count * lv.world;
    // SAFETY: `all` lives until the request is waited for, here.
    unsafe { local.iallreduce_raw(all.as_mut_ptr(), elems, dtype, level_op)? }
        .wait()
        .map_err(|e| e.context(lv.inside()))?;
    let mut host = vec![0u8; per_host];
    let word = match lv.leaders() {
        Some(l) => {
            let per = count * lay.local_size();
            // SAFETY: both buffers live until the request is waited for, here.
            let got = unsafe {
                l.ireduce_scatter_raw(all.as_ptr(), host.as_mut_ptr(), per, dtype, level_op)
            }
            .and_then(Request::wait)
            .map_err(|e| e.context(BETWEEN));
            if got.is_ok() && op == ReduceOp::Avg {
                reduce::divide(dtype, &mut host, lv.world);
            }
            got
        }
        None => Ok(()),
    };
    // The leader's word, then (if it is ok) the host's blocks.
    let mut status = encode_status(&word);
    local
        .broadcast(&mut status[..], 0)
        .map_err(|e| e.context(lv.inside()))?;
    word?;
    decode_status(&status, 0).map_err(|e| e.context(lv.inside()))?;
    local
        .broadcast(&mut host, 0)
        .map_err(|e| e.context(lv.inside()))?;
    out.copy_from_slice(&host[lay.local_rank() * b..][..b]);
    Ok(())
}

/// Root's host first (local broadcast from the root), then between leaders, then inside the
/// other hosts from their leader.
fn broadcast(lv: &Levels, data: &mut [u8], count: usize, dtype: DType, root: usize) -> Result<()> {
    let root_host = lv.layout.host_of(root);
    let root_local = lv
        .layout
        .ranks_on(root_host)
        .iter()
        .position(|&r| r == root)
        .expect("the root is on its host");
    let mine = lv.layout.host() == root_host;
    if mine {
        if let Some(l) = &lv.local {
            // SAFETY: `data` is borrowed for the whole call and the request is waited for.
            unsafe { l.ibroadcast_raw(data.as_mut_ptr(), count, dtype, root_local)? }
                .wait()
                .map_err(|e| e.context(lv.inside()))?;
        }
    }
    if let Some(l) = lv.leaders() {
        // SAFETY: as above.
        unsafe { l.ibroadcast_raw(data.as_mut_ptr(), count, dtype, root_host)? }
            .wait()
            .map_err(|e| e.context(BETWEEN))?;
    }
    if !mine {
        if let Some(l) = &lv.local {
            // SAFETY: as above.
            unsafe { l.ibroadcast_raw(data.as_mut_ptr(), count, dtype, 0)? }
                .wait()
                .map_err(|e| e.context(lv.inside()))?;
        }
    }
    Ok(())
}

/// Gather inside the host, exchange host blocks (padded to the largest host) between leaders,
/// hand everything to the host, and put each rank's block at its global position.
fn allgather(lv: &Levels, input: &[u8], out: &mut [u8]) -> Result<()> {
    let b = input.len();
    let lay = &lv.layout;
    let widest = (0..lay.hosts())
        .map(|h| lay.ranks_on(h).len())
        .max()
        .unwrap_or(1);
    let per_host = widest * b;
    let mut everything = vec![0u8; per_host * lay.hosts()];
    let mut host_block = vec![0u8; per_host];
    match &lv.local {
        Some(l) => l
            .allgather(input, &mut host_block[..lay.local_size() * b])
            .map_err(|e| e.context(lv.inside()))?,
        None => host_block[..b].copy_from_slice(input),
    }
    if let Some(l) = lv.leaders() {
        l.allgather(&host_block, &mut everything)
            .map_err(|e| e.context(BETWEEN))?;
    }
    if let Some(l) = &lv.local {
        l.broadcast(&mut everything, 0)
            .map_err(|e| e.context(lv.inside()))?;
    }
    for h in 0..lay.hosts() {
        for (i, &r) in lay.ranks_on(h).iter().enumerate() {
            out[r * b..(r + 1) * b].copy_from_slice(&everything[h * per_host + i * b..][..b]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_buffer_in_whole_blocks() {
        assert_eq!(pieces(0, 4).len(), 1);
        assert!(pieces(0, 4)[0].is_empty());
        assert_eq!(pieces(10, 4).len(), 1);
        assert_eq!(pieces(10, 4)[0].end, 10);
        // Below two pieces' worth: one piece.
        assert_eq!(pieces((31 << 20) / 4, 4).len(), 1);
        let n = (256 << 20) / 4;
        let p = pieces(n, 4);
        // 256 MiB: n = 8, an 8 MiB piece (a quarter of 32 MiB) at each end, 7 equal pieces
        // between.
        assert_eq!(p.len(), 9);
        assert_eq!(p[0].len() * 4, 8 << 20);
        assert_eq!(p[8].len() * 4, 8 << 20);
        assert_eq!(p[1].len() * 4, (240 << 20) / 7 / 1024 * 1024 + 1024);
        let q = pieces((64 << 20) / 4, 4);
        assert_eq!(q.len(), 5);
        assert_eq!(q[0].len() * 4, 4 << 20);
        for (p, count) in [
            (p, n),
            (q, (64 << 20) / 4),
            (pieces(3 * (16 << 20) / 8 + 77, 8), 3 * (16 << 20) / 8 + 77),
        ] {
            assert_eq!(p[0].start, 0);
            assert_eq!(p.last().unwrap().end, count);
            for w in p.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert_eq!(w[0].len() % crate::compress::INT8_BLOCK, 0);
                assert!(!w[1].is_empty());
            }
        }
        assert_eq!(pieces(3 * (16 << 20) / 8 + 77, 8).len(), 4);
    }

    #[test]
    fn shares_tile_a_piece_in_whole_blocks() {
        let block = crate::compress::INT8_BLOCK;
        for (r, rails) in [
            (0..0, 2),
            (0..1, 2),
            (5..5 + 3 * block + 7, 2),
            (1000..1000 + 10 * block, 3),
            (0..(64 << 20) / 4, 4),
        ] {
            let shares: Vec<_> = (0..rails).map(|i| share(&r, rails, i)).collect();
            assert_eq!(shares[0].start, r.start);
            assert_eq!(shares[rails - 1].end, r.end, "{r:?} / {rails}");
            for w in shares.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert!(w[0].is_empty() || w[0].len() % block == 0 || w[1].is_empty());
            }
        }
        // Two rails of a two-block piece: one block each.
        assert_eq!(share(&(0..2 * block), 2, 1), block..2 * block);
    }

    #[test]
    fn ptr_is_send() {
        fn send<T: Send>() {}
        send::<Ptr>();
        send::<Job>();
    }
}

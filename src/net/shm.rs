//! Shared-memory collectives for jobs whose ranks all run on one host.
//!
//! When every rank of a communicator can map the same file under `/dev/shm`, all-reduce (and
//! so reduce), broadcast, all-gather, reduce-scatter, gather, scatter, all-to-all and barrier
//! skip TCP: ranks copy their data into the segment once and read each other's data straight
//! out of it; so does all-to-all-v, whose per-pair counts the ranks publish in the segment and
//! check against each other. Point-to-point transfers stay on TCP. On a busy host this removes the kernel's two
//! copies per hop and the socket overhead, which is where a loopback ring spends its time.
//!
//! # Set-up
//! [`crate::comm::Comm::init`] agrees on the segment over TCP: rank 0 creates
//! `/dev/shm/mapreduce-<job id>-<run>` (mode 0600, space reserved with `posix_fallocate`, a
//! header carrying a tag derived from the job secret; `<run>` is random per run and reaches the
//! other ranks in the first all-reduce); after that all-reduce the others open it and
//! check owner, size and tag; a second all-reduce (minimum of "attached") decides for all
//! ranks at once, and rank 0 unlinks the file, so nothing is left behind even if the job
//! crashes later. Any failure on any rank (another host, no `/dev/shm`, too little space)
//! leaves every rank on TCP.
//!
//! # Layout
//! A header page; one 512-byte control block per rank (three 32-bit counters on their own
//! cache lines and the descriptor of the rank's current op); per rank and descriptor slot, the
//! element counts of an all-to-all-v (what it sends each rank, what it expects from each);
//! then, per rank, [`SLOTS`] staging slots of `chunk` bytes, and [`SLOTS`] shared result slots
//! of `chunk` bytes.
//!
//! # Protocol
//! An op is cut into chunks of at most `chunk` bytes per rank (at least one chunk, so even
//! an empty op synchronises and checks its descriptor). Chunks are numbered across ops — every
//! rank runs the same ops in the same order — and chunk `g` uses slot `g % SLOTS`. For each
//! chunk a rank
//!
//! 1. waits until every rank has finished chunk `g - SLOTS` (`gathered`), so the slots it is
//!    about to overwrite are no longer read;
//! 2. copies its contribution into its staging slot (reduce-scatter, all-to-all and the
//!    scatter root: piece k of every block, side by side; broadcast and scatter: the root
//!    only) and publishes `staged = g + 1`;
//! 3. waits for every rank's `staged` (on the first chunk it then compares every rank's op
//!    descriptor with its own: mismatched calls are reported, never summed; all-to-all-v also
//!    checks every pair's counts, the same check on every rank, and takes from them how many
//!    chunks the op has: the largest count over all pairs, in pieces); after the first
//!    chunk, broadcast and scatter wait only for the root, and gather only at the root;
//! 4. all-reduce only: reduces its slice of the chunk over every rank's staging slot **in rank
//!    order** into the result slot, publishes `reduced`, and waits for every rank's `reduced`
//!    (reduce-scatter: reduces its own block's piece over every rank's slot, in rank order,
//!    straight into its output);
//! 5. copies the result (all-reduce), the root's data (broadcast), its piece of the root's
//!    slot (scatter), every rank's data (all-gather, gather at the root) or its piece of
//!    every rank's slot (all-to-all) into its own buffer and publishes `gathered`.
//!
//! Each slice is reduced by exactly one rank and everybody copies the same bytes, so results
//! are bitwise identical on every rank. Counters are published with release stores and read
//! with acquire loads; waiting spins briefly and then sleeps on the counter's futex.
//!
//! # Failure
//! Every wait is bounded: it gives up when the communicator is aborted, when the rank it waits
//! for has closed its TCP connections (a dead process's sockets are closed by the kernel), or
//! when nothing moved for `MR_TIMEOUT_MS`. Such a failure leaves the counters inconsistent, so
//! it breaks the communicator. The one failure every rank meets at the same step — all-to-all-v
//! counts that disagree, which every rank reads from the same tables — ends the op alike
//! everywhere and leaves the segment usable ([`Segment::intact`]).

use crate::algo::{Collective, OpDesc};
use crate::buffer::OpMemory;
use crate::error::{Error, Result};
use crate::reduce;
use crate::types::{DType, ReduceOp};
use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Slots per rank: chunk `g` uses slot `g % SLOTS`, so ranks may run one chunk apart.
pub const SLOTS: u32 = 2;
const MAGIC: u64 = u64::from_le_bytes(*b"MRSHMv02");
const PAGE: usize = 4096;
const CTRL: usize = 512;
/// Smallest staging slot.
const MIN_CHUNK: usize = 4096;
/// Busy-wait iterations before sleeping on a futex.
const SPINS: u32 = 256;
/// Longest sleep between checks for abort, a lost rank or the timeout.
const POLL: Duration = Duration::from_millis(20);

/// Random bytes in a segment's name that set one run of a job apart from the others.
pub const RUN_LEN: usize = 8;

/// Where the segment of run `run` of job `job` lives. Jobs started from the environment reuse
/// their job id, so the run part keeps a file left by a crashed run from blocking the next.
pub fn segment_path(job: &[u8; 16], run: &[u8; RUN_LEN]) -> PathBuf {
    PathBuf::from(format!(
        "/dev/shm/mapreduce-{}-{}",
        crate::config::to_hex(job),
        crate::config::to_hex(run)
    ))
}

/// Remove segment files of job `job` that crashed runs left behind: ours, and older than
/// `age` (a live run's file exists only for the two all-reduces of its set-up, each bounded
/// by the op timeout). Returns how many were removed.
pub fn remove_stale(job: &[u8; 16], age: Duration) -> usize {
    let prefix = format!("mapreduce-{}", crate::config::to_hex(job));
    let Ok(dir) = std::fs::read_dir("/dev/shm") else {
        return 0;
    };
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let mut removed = 0;
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let old = meta
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|a| a > age);
        if meta.is_file() && meta.uid() == uid && old {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    log::info!("removed {}, left by a crashed run", entry.path().display());
                    removed += 1;
                }
                Err(e) => log::info!("cannot remove {}: {e}", entry.path().display()),
            }
        }
    }
    removed
}

/// Staging slot size for a configured pipeline chunk: at least 4 KiB, a multiple of 64 bytes.
pub fn slot_bytes(chunk_bytes: usize) -> usize {
    chunk_bytes.max(MIN_CHUNK).next_multiple_of(64)
}

/// The collectives the segment carries.
pub fn carries(coll: Collective) -> bool {
    matches!(
        coll,
        Collective::AllReduce
            | Collective::Broadcast
            | Collective::AllGather
            | Collective::ReduceScatter
            | Collective::Barrier
            | Collective::Gather
            | Collective::Scatter
            | Collective::AllToAll
            | Collective::AllToAllV
    )
}

/// The per-rank element counts and displacements of an all-to-all-v (one entry per rank), as
/// [`crate::comm::Comm::ialltoallv_raw`] takes them.
#[derive(Clone, Debug, Default)]
pub struct Splits {
    pub send_counts: Vec<usize>,
    pub send_displs: Vec<usize>,
    pub recv_counts: Vec<usize>,
    pub recv_displs: Vec<usize>,
}

#[repr(C)]
struct Header {
    magic: u64,
    size: u64,
    chunk: u64,
    slots: u64,
    tag: [u8; 32],
}

/// One rank's control block; only that rank writes it.
#[repr(C, align(512))]
struct Ctrl {
    staged: AtomicU32,
    _p0: [u8; 60],
    reduced: AtomicU32,
    _p1: [u8; 60],
    gathered: AtomicU32,
    _p2: [u8; 60],
    /// The rank's ops (coll, seq, dtype, op, count, root), indexed by the slot of the op's
    /// first chunk: a rank rewrites an entry only after every rank finished the chunk that
    /// last used that slot, so the others have compared it by then.
    desc: [[AtomicU64; 6]; SLOTS as usize],
}

const _: () = assert!(std::mem::size_of::<Ctrl>() == CTRL);
const _: () = assert!(std::mem::size_of::<Header>() <= PAGE);

#[derive(Clone, Copy, Debug)]
enum Counter {
    Staged,
    Reduced,
    Gathered,
}

/// Checks made while a wait sleeps (supplied by the progress engine).
pub struct Watch<'a> {
    pub abort: &'a AtomicBool,
    pub timeout: Duration,
    /// Whether rank `r` is gone: its connections are closed or its peer hung up.
    pub gone: &'a mut dyn FnMut(usize) -> bool,
}

/// A mapped segment shared by every rank of one communicator.
pub struct Segment {
    map: memmap2::MmapRaw,
    rank: usize,
    size: usize,
    chunk: usize,
    /// Chunks every rank has moved through the segment so far (the same on every rank).
    done: u32,
    /// f32 accumulator for 16-bit float slices.
    acc: Vec<u64>,
    /// Rank 0 removes the file once every rank has it mapped (or when set-up fails).
    unlink: Option<PathBuf>,
    /// Whether the counters agree between ranks: false from the start of an op until it ends
    /// well, or fails the same way on every rank at the same step.
    intact: bool,
}

/// Bytes of one rank's all-to-all-v counts for one descriptor slot: what it sends each rank,
/// then what it expects from each.
fn counts_bytes(size: usize) -> usize {
    2 * size * 8
}

/// Where the slots begin: after the header page, the control blocks and the count tables.
fn data_start(size: usize) -> usize {
    (PAGE + CTRL * size + counts_bytes(size) * SLOTS as usize * size).next_multiple_of(PAGE)
}

/// Bytes of a segment for `size` ranks and `chunk`-byte slots. Reduce-scatter stages one
/// piece per rank in a slot, so a slot holds at least 8 bytes per rank.
fn total_bytes(size: usize, chunk: usize) -> Result<usize> {
    if size.saturating_mul(8) > chunk {
        return Err(Error::invalid(format!(
            "{size} ranks need shared-memory slots of at least {} bytes, not {chunk}",
            size * 8
        )));
    }
    let data = data_start(size);
    chunk
        .checked_mul(SLOTS as usize)
        .and_then(|b| b.checked_mul(size + 1))
        .and_then(|b| b.checked_add(data))
        .ok_or_else(|| Error::invalid(format!("shared segment for {size} ranks overflows")))
}

impl Segment {
    /// Rank 0: create the segment file at `path` for `size` ranks and `chunk`-byte slots.
    pub fn create(path: &Path, size: usize, chunk: usize, tag: &[u8; 32]) -> Result<Segment> {
        let total = total_bytes(size, chunk)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        // Reserve the space (which also sizes the file), so a full /dev/shm fails here rather
        // than with SIGBUS on first touch.
        // SAFETY: fd is an open, writable file we own for the duration of the call.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, total as libc::off_t) };
        let mapped = if rc == 0 {
            map(&file, path, total)
        } else {
            Err(Error::io(
                format!("reserving {total} bytes for {}", path.display()),
                std::io::Error::from_raw_os_error(rc),
            ))
        };
        let map = mapped.inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })?;
        let seg = Segment {
            map,
            rank: 0,
            size,
            chunk,
            done: 0,
            acc: Vec::new(),
            unlink: Some(path.to_path_buf()),
            intact: true,
        };
        // SAFETY: the mapping is PAGE-aligned and at least PAGE bytes long; no other process
        // opens the file before rank 0 announces it, so nothing else accesses the header now.
        unsafe {
            seg.map.as_mut_ptr().cast::<Header>().write(Header {
                magic: MAGIC,
                size: size as u64,
                chunk: chunk as u64,
                slots: SLOTS as u64,
                tag: *tag,
            });
        }
        Ok(seg)
    }

    /// Other ranks: open rank 0's segment and check it belongs to this job.
    pub fn open(
        path: &Path,
        rank: usize,
        size: usize,
        chunk: usize,
        tag: &[u8; 32],
    ) -> Result<Segment> {
        let total = total_bytes(size, chunk)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("inspecting {}", path.display()), e))?;
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if meta.uid() != uid || meta.len() != total as u64 {
            return Err(Error::invalid(format!(
                "{} is not this job's segment (owner {}, {} bytes; expected owner {uid}, {total} bytes)",
                path.display(),
                meta.uid(),
                meta.len()
            )));
        }
        let seg = Segment {
            map: map(&file, path, total)?,
            rank,
            size,
            chunk,
            done: 0,
            acc: Vec::new(),
            unlink: None,
            intact: true,
        };
        // SAFETY: the mapping is PAGE-aligned and at least PAGE bytes; rank 0 wrote the
        // header before the all-reduce that let this rank open the file, and never again.
        let h = unsafe { &*seg.map.as_ptr().cast::<Header>() };
        if h.magic != MAGIC
            || h.size != size as u64
            || h.chunk != chunk as u64
            || h.slots != SLOTS as u64
            || h.tag != *tag
        {
            return Err(Error::invalid(format!(
                "{} does not carry this job's tag",
                path.display()
            )));
        }
        Ok(seg)
    }

    /// Whether the segment can carry further ops: its last op ended well, or failed alike on
    /// every rank (all-to-all-v counts that disagree) and left the counters in step.
    pub fn intact(&self) -> bool {
        self.intact
    }

    /// Remove the file (rank 0, once every rank has mapped it); the mapping stays.
    pub fn unlink(&mut self) {
        if let Some(p) = self.unlink.take() {
            if let Err(e) = std::fs::remove_file(&p) {
                log::warn!("cannot remove {}: {e}", p.display());
            }
        }
    }

    fn data_start(&self) -> usize {
        data_start(self.size)
    }

    /// Rank `r`'s all-to-all-v counts for descriptor slot `s`: 2 x size words.
    fn counts(&self, r: usize, s: usize) -> &[AtomicU64] {
        debug_assert!(r < self.size && s < SLOTS as usize);
        let n = self.size;
        let off = PAGE + CTRL * n + counts_bytes(n) * (r * SLOTS as usize + s);
        // SAFETY: the tables lie between the control blocks and data_start (within the
        // mapping), 8-byte aligned (PAGE and CTRL are multiples of 8); they are accessed only
        // atomically, and the mapping lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(off).cast::<AtomicU64>(), 2 * n) }
    }

    /// Publish our all-to-all-v counts in descriptor slot `s` (made visible by the `staged`
    /// store that follows).
    fn write_counts(&self, splits: &Splits, s: usize) {
        let words = self.counts(self.rank, s);
        let all = splits.send_counts.iter().chain(&splits.recv_counts);
        for (w, &c) in words.iter().zip(all) {
            w.store(c as u64, Ordering::Relaxed);
        }
    }

    /// After every rank's first `staged`: check that what each rank sends each other matches
    /// what that one expects (every rank runs the same check over the same table, so all fail
    /// alike), and return the largest count of any pair.
    fn check_counts(&self, d: &OpDesc, s: usize) -> Result<usize> {
        let n = self.size;
        let mut most = 0;
        for q in 0..n {
            for (p, sent) in self.counts(q, s).iter().take(n).enumerate() {
                let sends = sent.load(Ordering::Relaxed);
                let expects = self.counts(p, s)[n + q].load(Ordering::Relaxed);
                if sends != expects {
                    let who = |r: usize| match r == self.rank {
                        true => "this rank".to_string(),
                        false => format!("rank {r}"),
                    };
                    return Err(Error::invalid(format!(
                        "mismatched all-to-all-v counts over shared memory ({d}): {} sends {sends} \
                         x {} to {}, which expects {expects}",
                        who(q),
                        d.dtype,
                        who(p)
                    )));
                }
                most = most.max(sends);
            }
        }
        usize::try_from(most).map_err(|_| {
            Error::invalid(format!(
                "{d}: a count of {most} elements does not fit this host"
            ))
        })
    }

    fn ctrl(&self, r: usize) -> &Ctrl {
        debug_assert!(r < self.size);
        // SAFETY: control blocks lie inside the mapping (total_bytes), 512-byte aligned from a
        // page-aligned base; their fields are atomics, which other processes also access only
        // atomically, and the mapping lives as long as `self`.
        unsafe { &*self.map.as_ptr().add(PAGE + CTRL * r).cast::<Ctrl>() }
    }

    fn counter(&self, r: usize, c: Counter) -> &AtomicU32 {
        let b = self.ctrl(r);
        match c {
            Counter::Staged => &b.staged,
            Counter::Reduced => &b.reduced,
            Counter::Gathered => &b.gathered,
        }
    }

    fn publish(&self, c: Counter, value: u32) {
        let word = self.counter(self.rank, c);
        word.store(value, Ordering::Release);
        futex_wake(word);
    }

    /// Pointer to rank `r`'s staging slot `s`.
    fn staging(&self, r: usize, s: usize) -> *mut u8 {
        let off = self.data_start() + (r * SLOTS as usize + s) * self.chunk;
        // SAFETY: within the mapping by construction of total_bytes.
        unsafe { self.map.as_mut_ptr().add(off) }
    }

    /// Pointer to result slot `s`.
    fn result(&self, s: usize) -> *mut u8 {
        self.staging(self.size, s)
    }

    /// Wait until rank `r`'s counter `c` reaches `target` (wrapping order).
    fn wait(
        &self,
        w: &mut Watch,
        r: usize,
        c: Counter,
        target: u32,
        what: &dyn Fn() -> String,
    ) -> Result<()> {
        let word = self.counter(r, c);
        let mut seen = word.load(Ordering::Acquire);
        let mut spins = 0;
        let mut moved = Instant::now();
        loop {
            if reached(seen, target) {
                return Ok(());
            }
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
                seen = word.load(Ordering::Acquire);
                continue;
            }
            futex_wait(word, seen, POLL);
            let now = word.load(Ordering::Acquire);
            if now != seen {
                seen = now;
                moved = Instant::now();
                continue;
            }
            if w.abort.load(Ordering::SeqCst) {
                return Err(Error::aborted(format!(
                    "{}: communicator was aborted (mr_comm_abort)",
                    what()
                )));
            }
            if (w.gone)(r) {
                return Err(Error::remote(format!(
                    "{}: rank {r} left (its connections closed) while this rank waited for its {c:?} counter to reach {target}",
                    what()
                )));
            }
            if moved.elapsed() >= w.timeout {
                return Err(Error::timeout(format!(
                    "{}: rank {r} made no progress for {} ms (waiting for its {c:?} counter to reach {target}, at {seen})",
                    what(),
                    w.timeout.as_millis()
                )));
            }
        }
    }

    fn wait_all(
        &self,
        w: &mut Watch,
        c: Counter,
        target: u32,
        what: &dyn Fn() -> String,
    ) -> Result<()> {
        for r in (0..self.size).filter(|&r| r != self.rank) {
            self.wait(w, r, c, target, what)?;
        }
        Ok(())
    }

    fn write_desc(&self, d: &OpDesc, s: usize) {
        let b = self.ctrl(self.rank);
        for (slot, v) in b.desc[s].iter().zip(desc_words(d)) {
            slot.store(v, Ordering::Relaxed);
        }
    }

    /// Compare every rank's descriptor with ours (after their first `staged`).
    fn check_descs(&self, d: &OpDesc, s: usize) -> Result<()> {
        let mine = desc_words(d);
        for r in (0..self.size).filter(|&r| r != self.rank) {
            let theirs: Vec<u64> = self.ctrl(r).desc[s]
                .iter()
                .map(|x| x.load(Ordering::Relaxed))
                .collect();
            if theirs != mine {
                return Err(Error::invalid(format!(
                    "mismatched collective calls: rank {r} called {} but this rank called {d}",
                    describe(&theirs, d.root)
                )));
            }
        }
        Ok(())
    }

    /// Run one op through the segment.
    ///
    /// `splits` gives an all-to-all-v's counts and displacements (and is ignored otherwise).
    pub fn run(
        &mut self,
        d: &OpDesc,
        splits: Option<&Splits>,
        mem: &mut OpMemory,
        w: &mut Watch,
    ) -> Result<()> {
        debug_assert!(carries(d.coll));
        self.intact = false;
        let splits = match (d.coll, splits) {
            (Collective::AllToAllV, Some(sp))
                if [
                    &sp.send_counts,
                    &sp.send_displs,
                    &sp.recv_counts,
                    &sp.recv_displs,
                ]
                .iter()
                .all(|v| v.len() == self.size) =>
            {
                Some(sp)
            }
            (Collective::AllToAllV, _) => {
                return Err(Error::internal(format!(
                    "{d} reached shared memory without one count and displacement per rank"
                )))
            }
            _ => None,
        };
        let elem = d.dtype.size();
        let (me, n) = (self.rank, self.size);
        // Elements per chunk of the caller's buffer (reduce-scatter: of each rank's block; a
        // staging slot holds one such piece per block).
        let per_chunk = match d.coll {
            Collective::ReduceScatter
            | Collective::Scatter
            | Collective::AllToAll
            | Collective::AllToAllV => (self.chunk / elem / n).max(1),
            _ => (self.chunk / elem).max(1),
        };
        let count = if d.coll == Collective::Barrier {
            0
        } else {
            d.count
        };
        // An all-to-all-v learns its length from every rank's counts after its first chunk.
        let mut chunks = count.div_ceil(per_chunk).max(1);
        let first = self.done;
        // A broadcast stages only the root's data, so it may use every rank's staging slots
        // as one deep ring: the root runs up to n x SLOTS chunks ahead of its slowest reader
        // instead of SLOTS (with more ranks than cores, readers are often descheduled and a
        // shallow ring stalls the root). Slots of every rank are reused, so the op starts once
        // every earlier chunk is gathered everywhere, and ends once its own are.
        let deep = d.coll == Collective::Broadcast && n > 1;
        let ring = if deep { n as u32 * SLOTS } else { SLOTS };
        if deep {
            self.wait_all(w, Counter::Gathered, first, &|| {
                format!("{d} over shared memory, waiting for earlier ops to drain")
            })?;
        }
        let mut k = 0;
        while k < chunks {
            let g = first.wrapping_add(k as u32);
            let s = (g % SLOTS) as usize;
            // Where this chunk's data is staged: our slot `s`, or (deep broadcast) slot
            // `g mod n*SLOTS` of the whole staging area.
            let slot = if deep {
                let i = (g % ring) as usize;
                (i / SLOTS as usize, i % SLOTS as usize)
            } else {
                (me, s)
            };
            let lo = k * per_chunk * elem;
            let len = (count * elem).saturating_sub(lo).min(per_chunk * elem);
            // (An all-to-all-v's length is known after its first chunk.)
            let of = match (splits, k) {
                (Some(_), 0) => "?".to_string(),
                _ => chunks.to_string(),
            };
            let bytes = match splits {
                Some(_) => format!("up to {} bytes per pair", per_chunk * elem),
                None => format!("{len} bytes"),
            };
            let what = || format!("{d} over shared memory, chunk {} of {of} ({bytes})", k + 1);
            // The first chunk also rewrites our descriptor entry for slot `s`.
            let writes = k == 0
                || match d.coll {
                    Collective::Broadcast | Collective::Scatter => me == d.root,
                    Collective::Barrier => false,
                    _ => true,
                };
            if writes {
                let depth = if deep && me == d.root { ring } else { SLOTS };
                self.wait_all(
                    w,
                    Counter::Gathered,
                    g.wrapping_add(1).wrapping_sub(depth),
                    &what,
                )?;
            }
            if k == 0 {
                self.write_desc(d, s);
                if let Some(sp) = splits {
                    self.write_counts(sp, s);
                }
            }
            // Stage.
            let src: Option<&[u8]> = match d.coll {
                Collective::AllReduce => Some(&mem.user.as_slice()[lo..lo + len]),
                Collective::Broadcast if me == d.root => Some(&mem.user.as_slice()[lo..lo + len]),
                Collective::AllGather | Collective::Gather => {
                    Some(&mem.input.as_slice()[lo..lo + len])
                }
                _ => None,
            };
            if let Some(src) = src {
                // SAFETY: staging slot `slot` holds `chunk >= len` bytes; no rank reads it
                // until we publish `staged` below, and every rank finished reading its previous
                // contents (chunk g - SLOTS, or g - n*SLOTS for a deep broadcast, whose earlier
                // ops all drained) per the waits above.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), self.staging(slot.0, slot.1), len)
                };
            }
            let blocks = match d.coll {
                Collective::ReduceScatter | Collective::AllToAll => true,
                Collective::Scatter => me == d.root,
                _ => false,
            };
            if let Some(sp) = splits {
                // Piece k of the block for each rank p, at p * per_chunk elements.
                let input = mem.input.as_slice();
                for p in 0..n {
                    let (lo, len) = piece(sp.send_counts[p], k, per_chunk);
                    if len == 0 {
                        // An empty share's displacement may point anywhere (only non-empty
                        // ranges were checked against the buffer).
                        continue;
                    }
                    let src = &input[(sp.send_displs[p] + lo) * elem..][..len * elem];
                    // SAFETY: as above; n pieces of at most per_chunk elements fit the slot.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src.as_ptr(),
                            self.staging(me, s).add(p * per_chunk * elem),
                            len * elem,
                        )
                    };
                }
            }
            if blocks {
                // Piece k of every block b, side by side: block b at b * per_chunk elements.
                let input = mem.input.as_slice();
                for b in 0..n {
                    let src = &input[b * count * elem + lo..][..len];
                    // SAFETY: as above; n pieces of at most per_chunk elements fit the slot.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src.as_ptr(),
                            self.staging(me, s).add(b * per_chunk * elem),
                            len,
                        )
                    };
                }
            }
            self.publish(Counter::Staged, g.wrapping_add(1));
            // Every rank waits for every other on the first chunk (to compare descriptors);
            // after it, a rank waits only for the ranks whose data it reads.
            match d.coll {
                Collective::Broadcast | Collective::Scatter if k > 0 => {
                    if me != d.root {
                        self.wait(w, d.root, Counter::Staged, g.wrapping_add(1), &what)?;
                    }
                }
                Collective::Gather if k > 0 => {
                    if me == d.root {
                        self.wait_all(w, Counter::Staged, g.wrapping_add(1), &what)?;
                    }
                }
                _ => self.wait_all(w, Counter::Staged, g.wrapping_add(1), &what)?,
            }
            if k == 0 {
                self.check_descs(d, s)?;
                if splits.is_some() {
                    match self.check_counts(d, s) {
                        Ok(most) => chunks = most.div_ceil(per_chunk).max(1),
                        Err(e) => {
                            // Every rank read the same counts and fails here: end the op as
                            // a one-chunk op everywhere, so the counters stay in step.
                            self.publish(Counter::Gathered, g.wrapping_add(1));
                            self.done = first.wrapping_add(1);
                            self.intact = true;
                            return Err(e);
                        }
                    }
                }
            }
            // Reduce our slice.
            if d.coll == Collective::AllReduce {
                let elems = len / elem;
                let a = elems * me / n * elem;
                let b = elems * (me + 1) / n * elem;
                let out = self.result(s).wrapping_add(a);
                self.reduce_parts(d.dtype, d.op, s, a, b - a, out);
                self.publish(Counter::Reduced, g.wrapping_add(1));
                self.wait_all(w, Counter::Reduced, g.wrapping_add(1), &what)?;
            }
            if d.coll == Collective::ReduceScatter {
                // Our block's piece from every rank, straight into our output.
                let out = mem.user.as_mut_slice()[lo..lo + len].as_mut_ptr();
                self.reduce_parts(d.dtype, d.op, s, me * per_chunk * elem, len, out);
            }
            // Gather.
            match d.coll {
                Collective::AllReduce => {
                    let dst = &mut mem.user.as_mut_slice()[lo..lo + len];
                    // SAFETY: every rank published `reduced` for chunk g, so result slot `s`
                    // holds the whole chunk and nobody writes it until we publish `gathered`.
                    unsafe { std::ptr::copy_nonoverlapping(self.result(s), dst.as_mut_ptr(), len) };
                }
                Collective::Broadcast if me != d.root => {
                    let dst = &mut mem.user.as_mut_slice()[lo..lo + len];
                    // SAFETY: the root published `staged` for chunk g and does not rewrite the
                    // slot before we publish `gathered`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            self.staging(slot.0, slot.1),
                            dst.as_mut_ptr(),
                            len,
                        )
                    };
                }
                Collective::AllGather | Collective::Gather
                    if d.coll == Collective::AllGather || me == d.root =>
                {
                    self.copy_blocks(mem, s, count * elem, lo, len, |_| 0);
                }
                Collective::AllToAll => {
                    // Our piece of every rank's slot, into that rank's block of our output.
                    let at = me * per_chunk * elem;
                    self.copy_blocks(mem, s, count * elem, lo, len, |_| at);
                }
                Collective::AllToAllV => {
                    let sp = splits.expect("checked above");
                    for q in 0..n {
                        let (lo, len) = piece(sp.recv_counts[q], k, per_chunk);
                        if len == 0 {
                            continue;
                        }
                        let dst = &mut mem.user.as_mut_slice()[(sp.recv_displs[q] + lo) * elem..]
                            [..len * elem];
                        // SAFETY: rank q published `staged` for chunk g, its slot holds our
                        // piece at me * per_chunk elements (its count for us equals ours from
                        // it: check_counts), and it does not rewrite the slot before we
                        // publish `gathered`.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                self.staging(q, s).add(me * per_chunk * elem),
                                dst.as_mut_ptr(),
                                len * elem,
                            )
                        };
                    }
                }
                Collective::Scatter => {
                    let dst = &mut mem.user.as_mut_slice()[lo..lo + len];
                    // SAFETY: the root published `staged` for chunk g (its slot holds our
                    // piece at me * per_chunk elements, within the slot as staged above) and
                    // does not rewrite the slot before we publish `gathered`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            self.staging(d.root, s).add(me * per_chunk * elem),
                            dst.as_mut_ptr(),
                            len,
                        )
                    };
                }
                _ => {}
            }
            self.publish(Counter::Gathered, g.wrapping_add(1));
            k += 1;
        }
        self.done = first.wrapping_add(chunks as u32);
        if deep {
            // The next op writes slots by the shallow rule: nobody may still be reading ours.
            self.wait_all(w, Counter::Gathered, self.done, &|| {
                format!("{d} over shared memory, waiting for every rank to finish")
            })?;
        }
        self.intact = true;
        Ok(())
    }

    /// For every rank r: `len` bytes at `at(r)` of r's staging slot `s` into bytes
    /// `r * block + lo ..` of this rank's output (all-gather, gather at the root, all-to-all).
    /// Every rank has published `staged` for the chunk in slot `s` and none rewrites its slot
    /// before this rank publishes `gathered`.
    fn copy_blocks(
        &self,
        mem: &mut OpMemory,
        s: usize,
        block: usize,
        lo: usize,
        len: usize,
        at: impl Fn(usize) -> usize,
    ) {
        for r in 0..self.size {
            let dst = &mut mem.user.as_mut_slice()[r * block + lo..][..len];
            // SAFETY: as the doc says, rank r's slot `s` holds the chunk and is not rewritten
            // while we read; `at(r) + len` lies within the slot (a piece of a staged block or
            // the whole staged chunk); `dst` is our own buffer, which never overlaps the
            // segment.
            unsafe {
                std::ptr::copy_nonoverlapping(self.staging(r, s).add(at(r)), dst.as_mut_ptr(), len)
            };
        }
    }

    /// `out[..len] = x_0 op x_1 op … op x_{n-1}`, where x_r is bytes `at..at + len` of rank r's
    /// staging slot `s`, combined in rank order. `out` is this rank's slice of a result slot
    /// (all-reduce) or its own output buffer (reduce-scatter).
    fn reduce_parts(
        &mut self,
        dtype: DType,
        op: ReduceOp,
        s: usize,
        at: usize,
        len: usize,
        out: *mut u8,
    ) {
        if len == 0 {
            return;
        }
        let n = self.size;
        let mut acc_store = std::mem::take(&mut self.acc);
        // SAFETY (for the slices below): every rank published `staged` for this chunk, so
        // their staging slots hold it and stay unchanged until they see our `gathered`. `out`
        // is valid for `len` bytes that only this rank writes now: its slice of the result
        // slot (read by others only after we publish `reduced`) or its own output buffer; it
        // never overlaps a staging slot.
        let part =
            |r: usize| unsafe { std::slice::from_raw_parts(self.staging(r, s).add(at), len) };
        let out = unsafe { std::slice::from_raw_parts_mut(out, len) };
        if dtype.accumulator() == dtype {
            out.copy_from_slice(part(0));
            for r in 1..n {
                reduce::reduce(dtype, op, out, part(r));
            }
            if op == ReduceOp::Avg {
                reduce::divide(dtype, out, n);
            }
        } else {
            let acc_len = len / dtype.size() * 4;
            if acc_store.len() * 8 < acc_len {
                acc_store = vec![0u64; acc_len.div_ceil(8)];
            }
            // SAFETY: u64 storage viewed as bytes; acc_len fits in it.
            let acc = unsafe {
                std::slice::from_raw_parts_mut(acc_store.as_mut_ptr().cast::<u8>(), acc_len)
            };
            reduce::widen(dtype, acc, part(0));
            for r in 1..n {
                reduce::reduce_widen(dtype, op, acc, part(r));
            }
            if op == ReduceOp::Avg {
                reduce::divide(DType::F32, acc, n);
            }
            reduce::narrow(dtype, out, acc);
        }
        self.acc = acc_store;
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.unlink();
    }
}

/// Map the first `total` bytes of `file` (already that long), shared.
fn map(file: &File, path: &Path, total: usize) -> Result<memmap2::MmapRaw> {
    memmap2::MmapOptions::new()
        .len(total)
        .map_raw(file)
        .map_err(|e| Error::io(format!("mapping {}", path.display()), e))
}

/// Piece `k` of a block of `count` elements cut `per_chunk` at a time: (first element, length).
fn piece(count: usize, k: usize, per_chunk: usize) -> (usize, usize) {
    let lo = (k * per_chunk).min(count);
    (lo, (count - lo).min(per_chunk))
}

fn reached(value: u32, target: u32) -> bool {
    (value.wrapping_sub(target) as i32) >= 0
}

fn desc_words(d: &OpDesc) -> [u64; 6] {
    [
        d.coll as u64,
        d.seq,
        d.dtype as u64,
        d.op as u64,
        d.count as u64,
        d.root as u64,
    ]
}

fn describe(w: &[u64], root: usize) -> String {
    let d = (|| {
        Some(OpDesc {
            coll: Collective::from_raw(w[0])?,
            seq: w[1],
            dtype: DType::from_raw(u32::try_from(w[2]).ok()?).ok()?,
            op: ReduceOp::from_raw(u32::try_from(w[3]).ok()?).ok()?,
            count: usize::try_from(w[4]).ok()?,
            root: usize::try_from(w[5]).unwrap_or(root),
            compress: crate::compress::Compression::None,
        })
    })();
    match d {
        Some(d) => d.to_string(),
        None => format!("an unrecognisable op (seq {})", w[1]),
    }
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned 32-bit atomic in a shared mapping (hence no
    // FUTEX_PRIVATE_FLAG); the kernel only reads it and the timespec. Spurious returns are
    // handled by the caller's loop.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: as in futex_wait; FUTEX_WAKE only reads the address to find waiters.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_segments_of_the_job_are_removed_fresh_ones_kept() {
        if !Path::new("/dev/shm").is_dir() {
            return;
        }
        let mut job = [0u8; 16];
        getrandom::getrandom(&mut job).unwrap();
        let stale = segment_path(&job, &[1; RUN_LEN]);
        let fresh = segment_path(&job, &[2; RUN_LEN]);
        let other = segment_path(&[0xee; 16], &job[..RUN_LEN].try_into().unwrap());
        for p in [&stale, &fresh, &other] {
            std::fs::File::create(p).unwrap();
        }
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        for p in [&stale, &other] {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        assert_eq!(remove_stale(&job, Duration::from_secs(600)), 1);
        assert!(!stale.exists() && fresh.exists() && other.exists());
        for p in [&fresh, &other] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn wrapping_order() {
        assert!(reached(5, 5));
        assert!(reached(6, 5));
        assert!(!reached(4, 5));
        assert!(reached(1, u32::MAX));
        assert!(reached(0, u32::MAX.wrapping_add(1)));
        assert!(!reached(u32::MAX, 1));
    }

    #[test]
    fn layout_fits() {
        let t = total_bytes(8, slot_bytes(1 << 20)).unwrap();
        assert!(
            total_bytes(1024, 4096).is_err(),
            "slots too small for reduce-scatter"
        );
        // Header page; 8 control blocks (one page); 8 ranks' count tables for 2 slots
        // (8 x 2 x 128 bytes, rounded up to a page); 8 staging and 1 result slot pairs.
        assert_eq!(data_start(8), 3 * PAGE);
        assert_eq!(t, 3 * PAGE + 9 * 2 * (1 << 20));
        assert_eq!(slot_bytes(100), 4096);
        assert_eq!(slot_bytes(5000), 5056);
    }
}

//! The public Rust API: a communicator over one job's ranks.
//!
//! A [`Comm`] owns one progress thread (see [`crate::net::engine`]). Calls validate their
//! arguments here — a rejected call touches nothing and leaves the communicator usable — then
//! build the op's schedule and hand it to the progress thread. Ops complete in the order they
//! were issued.
//!
//! Relay segment sizes follow the relays' measured throughput. The progress thread measures
//! each relay's rate on every relay op ([`RelayRates`]). Before every
//! [`RELAY_RATE_PERIOD`]th relay op, each rank starts a non-blocking integer all-reduce (sum,
//! over the ring, never the relays) of its rates in KiB/s; before the relay op
//! [`RELAY_RATE_PERIOD`] relay ops later it waits for that sum and adopts
//! [`weights_from_rates`] of it. Collective calls are matched, so every rank counts the same
//! relay ops, exchanges at the same sequence numbers and receives the same integer sum
//! whatever the reduction order: the weights, hence the segments, agree on every rank. The
//! first relay ops split equally. A relay lost in fail-over keeps its weight; the schedule
//! routes its segment's chunks to the others.

use crate::algo::exchange::{Exchange, ExchangePlan};
use crate::algo::relay::weights_from_rates;
use crate::algo::{Collective, OpDesc};
use crate::buffer::{OpMemory, RawBuf, Scratch};
use crate::compress::Compression;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::hier::{HierOp, Hierarchy, Ptr};
use crate::layout::Layout;
use crate::net::engine::{
    Completion, Engine, RelayLink, RelayLinks, RelayRates, Submission, Transport,
};
use crate::types::{dtype_of, DType, Element, ReduceOp};
use crate::validator::peer::{JobVerify, Recorded};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::net::bootstrap::UniqueId;

/// A communicator: this process's membership in one job of `size` ranks.
pub struct Comm {
    rank: usize,
    size: usize,
    config: Config,
    engine: Engine,
    /// Next op sequence number; the lock also keeps submission order equal to seq order.
    next_seq: Mutex<u64>,
    /// Set by the progress thread when the communicator fails, and by [`Comm::abort`].
    broken: Arc<AtomicBool>,
    /// Set only by [`Comm::abort`]: later ops fail with `Aborted`. Ops after any other
    /// failure still go to the progress thread, which ends them with that failure's error
    /// (e.g. `Remote`, naming the lost peer) so callers learn why.
    aborted: AtomicBool,
    /// Relays (indices into `config.relays`) that every rank is connected to.
    relays: Vec<usize>,
    /// Verification of relay all-reduces (validator-assigned relays, or `MR_VERIFY=1`).
    verify: Option<Arc<JobVerify>>,
    /// Relay throughput measured by the progress thread, indexed like `config.relays`.
    relay_rates: RelayRates,
    /// Each relay link's last throughput and round trip, for sizing relay windows.
    relay_links: RelayLinks,
    /// Declared after `engine`: dropping the engine finishes the rate exchange that writes
    /// into this before its buffer is freed.
    relay_weights: Mutex<RelayWeights>,
    /// Next point-to-point pair sequence per peer: (sends to it, receives from it); see
    /// [`crate::algo::p2p`].
    p2p_seq: Mutex<Vec<(u64, u64)>>,
    /// Every rank mapped the job's shared-memory segment (all on one host): the collectives
    /// [`crate::net::shm::carries`] go through it unless they use relays.
    shm: bool,
    /// Ops submitted to the segment (see [`Comm::shared_memory_ops`]).
    shm_ops: AtomicU64,
    /// Which ranks share a host.
    layout: Layout,
    /// The address the other ranks reach this one on (see [`Comm::local_ip`]).
    local_ip: Option<std::net::IpAddr>,
    /// Host and inter-host communicators, when the layout is hierarchical (see
    /// [`crate::hier`]); every collective then runs through them.
    hier: Option<Hierarchy>,
}

/// One send or receive of a point-to-point group ([`Comm::submit_p2p`]).
#[derive(Clone, Copy, Debug)]
pub struct P2pCall {
    pub send: bool,
    pub peer: usize,
    pub tag: u32,
    /// `count` elements of `dtype`: read for a send, written for a receive.
    pub buf: *mut u8,
    pub count: usize,
    pub dtype: DType,
}

/// Relay ops between two exchanges of measured relay rates (see the module docs).
pub const RELAY_RATE_PERIOD: u64 = 8;

/// Segment weights of relay ops, the same on every rank (see the module docs).
#[derive(Default)]
struct RelayWeights {
    /// Relay ops submitted so far.
    ops: u64,
    /// One per relay in use; empty: equal segments.
    current: Vec<u64>,
    /// The rate exchange in flight and its buffer, which the engine writes until it completes.
    exchange: Option<(Request, Vec<i64>)>,
}

/// A non-blocking operation in flight. Its buffers must stay untouched until it completes.
pub struct Request {
    done: Arc<Completion>,
    /// Runs once when the op is seen to have succeeded (records a sampled op's results).
    after: Mutex<Option<AfterOp>>,
    /// Memory the op writes that the caller did not provide (a reduce's sum on ranks other
    /// than the root); freed only once the op has ended.
    owned: Option<Scratch>,
}

impl Drop for Request {
    fn drop(&mut self) {
        if self.owned.is_some() {
            // The engine may still be writing into `owned`.
            let _ = self.done.wait();
        }
    }
}

type AfterOp = Box<dyn FnOnce() + Send>;

impl Request {
    /// A request completed by whoever holds `done` (the hierarchy's worker).
    pub(crate) fn from_completion(done: Arc<Completion>) -> Request {
        Request::new(done)
    }

    /// A request that ends when `done` completes (point-to-point calls of one group share it).
    pub(crate) fn new(done: Arc<Completion>) -> Request {
        Request {
            done,
            after: Mutex::new(None),
            owned: None,
        }
    }

    fn finished(&self) {
        let after = self.after.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(f) = after {
            f();
        }
    }

    /// Block until the op completes; its result.
    pub fn wait(self) -> Result<()> {
        self.done.wait()?;
        self.finished();
        Ok(())
    }

    /// `Ok(true)` once the op completed successfully, `Ok(false)` while it runs, the op's
    /// error if it failed.
    pub fn test(&self) -> Result<bool> {
        match self.done.try_get() {
            None => Ok(false),
            Some(r) => {
                r?;
                self.finished();
                Ok(true)
            }
        }
    }
}

fn check_ptr(what: &str, ptr: *const u8, bytes: usize) -> Result<()> {
    if bytes > 0 && ptr.is_null() {
        return Err(Error::invalid(format!(
            "{what} buffer is NULL but {bytes} bytes were requested"
        )));
    }
    Ok(())
}

fn byte_len(count: usize, dtype: DType) -> Result<usize> {
    count
        .checked_mul(dtype.size())
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| {
            Error::invalid(format!(
                "count {count} of {dtype} overflows the address space"
            ))
        })
}

impl Comm {
    /// Join a job as `rank` of `size`, rendezvousing through `id` (from [`UniqueId::new`] on
    /// rank 0, passed to the other ranks out of band).
    pub fn init(size: usize, id: &UniqueId, rank: usize, config: Config) -> Result<Comm> {
        init_logging();
        config.validate()?;
        if size == 0 {
            return Err(Error::invalid("world size must be at least 1"));
        }
        if rank >= size {
            return Err(Error::invalid(format!(
                "rank {rank} is out of range for world size {size}"
            )));
        }
        let broken = Arc::new(AtomicBool::new(false));
        let mut mesh = crate::net::bootstrap::rendezvous(size, id, rank, &config)?;
        let job = mesh.job;
        let local_ip = mesh.local_ip;
        let mut config = config;
        let assignment = if config.validator.is_some()
            && config.relays.is_empty()
            && config.algo != crate::config::Algo::Ring
        {
            crate::validator::client::share_assignment(&mut mesh, &config)?
        } else {
            None
        };
        if let Some(a) = &assignment {
            config.relays = a.relays.iter().map(|r| r.addr.clone()).collect();
            config.granted_token = Some(crate::config::parse_hex("job token", &a.token)?);
        }
        let use_relays = !config.relays.is_empty() && config.algo != crate::config::Algo::Ring;
        let connected = if use_relays {
            crate::relay::client::attach(&mut mesh, &config)?
        } else {
            Vec::new()
        };
        let relay_rates: RelayRates = Arc::new(Mutex::new(vec![0; config.relays.len()]));
        let relay_links: RelayLinks =
            Arc::new(Mutex::new(vec![RelayLink::default(); config.relays.len()]));
        let engine = Engine::start(
            mesh,
            &config,
            broken.clone(),
            relay_rates.clone(),
            relay_links.clone(),
        )?;
        let mut comm = Comm {
            rank,
            size,
            config,
            engine,
            next_seq: Mutex::new(1),
            broken,
            aborted: AtomicBool::new(false),
            relays: Vec::new(),
            verify: None,
            relay_rates,
            relay_links,
            relay_weights: Mutex::new(RelayWeights::default()),
            p2p_seq: Mutex::new(vec![(1, 1); size]),
            shm: false,
            shm_ops: AtomicU64::new(0),
            layout: Layout::single(size, rank),
            local_ip,
            hier: None,
        };
        if size > 1 {
            comm.layout = comm.agree_on_layout()?;
            // Shared memory serves a job on one host; jobs across hosts stay on TCP.
            if comm.layout.hosts() == 1 {
                comm.shm = comm.attach_shared_memory(id, &job)?;
            }
            if comm.layout.is_hierarchical() && comm.config.hierarchy {
                comm.hier = Some(Hierarchy::start(&comm)?);
            }
        }
        if use_relays {
            // Every rank must cut buffers the same way: use the relays all of them reached.
            let mut mask: Vec<u8> = connected.iter().map(|&c| u8::from(c)).collect();
            comm.allreduce(&mut mask, ReduceOp::Min)?;
            comm.relays = (0..mask.len()).filter(|&i| mask[i] == 1).collect();
            if comm.relays.is_empty() {
                log::warn!("rank {rank}: no relay is reachable by every rank; using the ring");
            } else if comm.relays.len() < mask.len() {
                log::warn!(
                    "rank {rank}: using relays {:?} of {}; the others are unreachable from some rank",
                    comm.relays,
                    mask.len()
                );
            }
        }
        if !comm.relays.is_empty() {
            let mut v = match &assignment {
                Some(a) => Some(JobVerify::new(
                    a,
                    comm.config.validator.as_deref(),
                    rank,
                    size,
                    comm.config.verify,
                )?),
                // Static relays: the secret comes from the unique id, which relays never see.
                None if comm.config.verify => Some(JobVerify::for_static_relays(
                    crate::net::bootstrap::sample_secret(id),
                    size,
                )),
                None => None,
            };
            if let Some(v) = v.as_mut() {
                v.relay_index = comm.relays.clone();
                v.chunk_bytes = comm.config.relay_chunk_bytes;
            }
            comm.verify = v.map(Arc::new);
        }
        log::info!("rank {rank}/{size}: communicator ready");
        Ok(comm)
    }

    /// Learn which ranks share a host: every rank contributes its host key (see
    /// [`crate::layout`]) to one all-gather, so every rank computes the same layout.
    fn agree_on_layout(&self) -> Result<Layout> {
        let key = crate::layout::host_key(self.config.host_id.as_deref())? as i64;
        let mut keys = vec![0i64; self.size];
        self.allgather(&[key], &mut keys)?;
        let keys: Vec<u64> = keys.iter().map(|&k| k as u64).collect();
        let layout = Layout::from_keys(&keys, self.rank);
        if self.rank == 0 {
            log::info!("layout: {layout}");
        }
        Ok(layout)
    }

    /// Agree with every rank on a shared-memory segment (see [`crate::net::shm`]): rank 0
    /// creates it, the others open it, and it is used only if every rank attached. Runs two
    /// one-byte all-reduces on every rank whatever the outcome, so ranks that disagree about
    /// `MR_SHM_DISABLE` still make the same calls.
    fn attach_shared_memory(&self, id: &UniqueId, job: &[u8; 16]) -> Result<bool> {
        use crate::net::shm::{remove_stale, segment_path, slot_bytes, Segment, RUN_LEN};
        let wanted = self.config.shm && self.config.algo != crate::config::Algo::Ring;
        let tag = blake3::derive_key("mapreduce shm segment v1", id.as_bytes());
        let chunk = slot_bytes(self.config.chunk_bytes);
        let mut seg = None;
        // Rank 0 names the segment with a fresh run part, so a file a crashed run left under
        // the same job id (jobs from the environment reuse it) never stands in the way.
        let mut run = [0u8; RUN_LEN];
        if self.rank == 0 && wanted {
            remove_stale(job, 2 * self.config.timeout + Duration::from_secs(60));
            getrandom::getrandom(&mut run)
                .map_err(|e| Error::internal(format!("OS random source: {e}")))?;
            match Segment::create(&segment_path(job, &run), self.size, chunk, &tag) {
                Ok(s) => seg = Some(s),
                Err(e) => log::info!("rank 0: no shared-memory segment: {e}"),
            }
            crash_for_test("MR_TEST_KILL_AFTER_SHM_CREATE");
        }
        // One all-reduce (max) tells every rank whether some rank cannot take part (first
        // byte) and the run part of rank 0's name (the others contribute zeros). Rank 0
        // created the file before its contribution, so after this every rank may open it.
        let mut word = [0u8; 1 + RUN_LEN];
        word[0] = u8::from(!(wanted && (self.rank != 0 || seg.is_some())));
        if self.rank == 0 {
            word[1..].copy_from_slice(&run);
        }
        self.allreduce(&mut word, ReduceOp::Max)?;
        let run: [u8; RUN_LEN] = word[1..].try_into().expect("run part");
        let flag = [u8::from(word[0] == 0)];
        if flag[0] == 1 && self.rank != 0 {
            match Segment::open(&segment_path(job, &run), self.rank, self.size, chunk, &tag) {
                Ok(s) => seg = Some(s),
                Err(e) => log::info!(
                    "rank {}: cannot use rank 0's shared-memory segment (not on one host?): {e}",
                    self.rank
                ),
            }
        }
        let mut flag = [u8::from(flag[0] == 1 && seg.is_some())];
        self.allreduce(&mut flag, ReduceOp::Min)?;
        // Every rank that will use the file has it mapped: remove the name.
        if let Some(s) = seg.as_mut() {
            s.unlink();
        }
        match seg {
            Some(s) if flag[0] == 1 => {
                self.engine.attach_shm(s)?;
                log::info!("rank {}: collectives use shared memory", self.rank);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Join a job described by the environment: `MR_RANK`, `MR_WORLD_SIZE`, `MR_BOOTSTRAP`
    /// (`host:port` of rank 0's bootstrap listener), or torchrun's `RANK`, `WORLD_SIZE`,
    /// `MASTER_ADDR`, `MASTER_PORT`. Connections authenticate with `MR_TOKEN` when set.
    pub fn init_env() -> Result<Comm> {
        let config = Config::from_env()?;
        let (rank, size, id) = crate::net::bootstrap::from_env(&config)?;
        Comm::init(size, &id, rank, config)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Which ranks share a host (see [`crate::layout`]).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The address this rank advertised and the other ranks reach it on (`None` in a
    /// single-rank job).
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        self.local_ip
    }

    /// This rank's position among the ranks on its host.
    pub fn local_rank(&self) -> usize {
        self.layout.local_rank()
    }

    /// Number of ranks on this rank's host.
    pub fn local_size(&self) -> usize {
        self.layout.local_size()
    }

    /// Number of hosts the job runs on.
    pub fn host_count(&self) -> usize {
        self.layout.hosts()
    }

    /// Whether collectives run in two levels, inside each host and between hosts (see
    /// [`crate::hier`]): the layout is hierarchical and `MR_HIERARCHY` is not `0`.
    pub fn uses_hierarchy(&self) -> bool {
        self.hier.is_some()
    }

    /// Whether all-reduce, reduce, broadcast, all-gather, reduce-scatter, gather, scatter,
    /// all-to-all(-v) and barrier run through a shared-memory segment (every rank on this
    /// host; see [`crate::net::shm`]) when they do not use relays. Point-to-point transfers
    /// always travel over TCP.
    pub fn uses_shared_memory(&self) -> bool {
        self.shm
    }

    /// Collectives this communicator has submitted to its shared-memory segment so far (a
    /// diagnostic: which path the ops take).
    pub fn shared_memory_ops(&self) -> u64 {
        self.shm_ops.load(Ordering::Relaxed)
    }

    /// Relays in use (indices into `config().relays`): those every rank is connected to.
    pub fn relays(&self) -> &[usize] {
        &self.relays
    }

    /// Relative segment sizes of the next relay op, one per relay in [`Comm::relays`]: all
    /// equal until measured throughputs were exchanged (see the module docs). Every rank sees
    /// the same weights after the same calls.
    pub fn relay_weights(&self) -> Vec<u64> {
        let w = self.relay_weights.lock().unwrap_or_else(|e| e.into_inner());
        if w.current.is_empty() {
            vec![1; self.relays.len()]
        } else {
            w.current.clone()
        }
    }

    /// End every pending and future op with [`ErrorKind::Aborted`] and close all connections.
    /// Callable from any thread, also while another thread is blocked in an op.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        self.broken.store(true, Ordering::SeqCst);
        if let Some(h) = &self.hier {
            h.abort();
        }
        self.engine.abort();
    }

    fn submit(
        &self,
        coll: Collective,
        dtype: DType,
        op: ReduceOp,
        count: usize,
        root: usize,
        mem: OpMemory,
    ) -> Result<Request> {
        self.submit_with(
            coll,
            dtype,
            op,
            count,
            root,
            Compression::None,
            mem,
            &mut |_, _| {},
        )
    }

    /// As [`Comm::submit`]; `before(seq)` runs just before the op is handed to the engine.
    #[allow(clippy::too_many_arguments)]
    fn submit_with(
        &self,
        coll: Collective,
        dtype: DType,
        op: ReduceOp,
        count: usize,
        root: usize,
        compress: Compression,
        mem: OpMemory,
        before: &mut dyn FnMut(u64, &[u64]),
    ) -> Result<Request> {
        if self.aborted.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Aborted,
                "communicator was aborted; destroy it and create a new one",
            ));
        }
        let mut seq = self.next_seq.lock().unwrap_or_else(|e| e.into_inner());
        let mut desc = OpDesc {
            coll,
            seq: *seq,
            dtype,
            op,
            count,
            root,
            compress,
        };
        let weights = if crate::algo::plan::uses_relays(&desc, &self.config, &self.relays) {
            let w = self.weights_for_relay_op(&mut seq)?;
            desc.seq = *seq; // a rate exchange may have gone first
            w
        } else {
            Vec::new()
        };
        self.submit_locked(&mut seq, desc, &self.relays, &weights, mem, before)
    }

    /// Build `desc`'s schedule and hand it to the engine; `seq` is the locked next sequence
    /// number, equal to `desc.seq`.
    fn submit_locked(
        &self,
        seq: &mut u64,
        desc: OpDesc,
        relays: &[usize],
        weights: &[u64],
        mem: OpMemory,
        before: &mut dyn FnMut(u64, &[u64]),
    ) -> Result<Request> {
        debug_assert_eq!(desc.seq, *seq);
        let mut mem = mem;
        let shm = self.shm
            && crate::net::shm::carries(desc.coll)
            && !crate::algo::plan::uses_relays(&desc, &self.config, relays);
        let transport = if shm {
            self.shm_ops.fetch_add(1, Ordering::Relaxed);
            Transport::SharedMemory(desc, None)
        } else {
            let window = if relays.is_empty() {
                crate::algo::relay::DEFAULT_WINDOW
            } else {
                let links = self.relay_links.lock().unwrap_or_else(|e| e.into_inner());
                let used: Vec<(u64, u32)> = relays
                    .iter()
                    .filter_map(|&r| links.get(r))
                    .map(|l| (l.rate, l.min_rtt_us))
                    .collect();
                let chunk = self.config.relay_chunk_bytes;
                let window = crate::algo::relay::relay_window(&used, chunk);
                crate::algo::relay::compressed_window(window, desc.compress, chunk)
            };
            Transport::Frames(crate::algo::plan::build_with_relays(
                &desc,
                self.rank,
                self.size,
                &self.config,
                relays,
                weights,
                window,
                &mut mem,
            )?)
        };
        let done = Arc::new(Completion::default());
        before(*seq, weights);
        self.engine.submit(Submission {
            transport,
            mem,
            done: crate::net::engine::Done::new(done.clone()),
        })?;
        *seq += 1;
        Ok(Request::new(done))
    }

    /// Segment weights for the relay op about to be submitted; every
    /// [`RELAY_RATE_PERIOD`] relay ops, first adopt the last rate exchange's sum and start the
    /// next exchange (taking sequence numbers from `seq`).
    fn weights_for_relay_op(&self, seq: &mut u64) -> Result<Vec<u64>> {
        let mut w = self.relay_weights.lock().unwrap_or_else(|e| e.into_inner());
        if w.ops > 0 && w.ops % RELAY_RATE_PERIOD == 0 {
            if let Some((req, sums)) = w.exchange.take() {
                match req.wait() {
                    Ok(()) => {
                        let rates: Vec<u64> = sums.iter().map(|&s| s.max(0) as u64).collect();
                        w.current = weights_from_rates(&rates);
                        log::debug!(
                            "rank {}: relay rates {rates:?} KiB/s summed over ranks; segment weights {:?}",
                            self.rank,
                            w.current
                        );
                    }
                    // The exchange failed on every rank (failures are reported to the peers),
                    // so every rank keeps the weights it had.
                    Err(e) => log::warn!(
                        "rank {}: exchanging relay rates failed, segment weights stay {:?}: {e}",
                        self.rank,
                        w.current
                    ),
                }
            }
            w.exchange = Some(self.start_rate_exchange(seq)?);
        }
        w.ops += 1;
        Ok(w.current.clone())
    }

    /// Start summing every rank's measured relay rates (KiB/s, one per relay in use) over the
    /// ring; integers, so every rank gets the same bits whatever the reduction order.
    fn start_rate_exchange(&self, seq: &mut u64) -> Result<(Request, Vec<i64>)> {
        let rates = self
            .relay_rates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Bounded so the sum over all ranks cannot overflow.
        let most = i64::MAX as u64 / self.size as u64;
        let mut sums: Vec<i64> = self
            .relays
            .iter()
            .map(|&r| (rates.get(r).copied().unwrap_or(0) / 1024).min(most) as i64)
            .collect();
        let desc = OpDesc {
            coll: Collective::AllReduce,
            seq: *seq,
            dtype: DType::I64,
            op: ReduceOp::Sum,
            count: sums.len(),
            root: 0,
            compress: Compression::None,
        };
        // SAFETY: the caller keeps `sums` (whose heap block does not move with the Vec) and
        // reads it only after the request completed; the engine outlives it (field order).
        let mem = OpMemory::new(unsafe {
            RawBuf::new(sums.as_mut_ptr().cast(), sums.len() * DType::I64.size())
        });
        let req = self.submit_locked(seq, desc, &[], &[], mem, &mut |_, _| {})?;
        Ok((req, sums))
    }

    /// Whether an all-reduce of `bytes` goes through the relays (as the plan decides).
    fn relayed(&self, bytes: usize) -> bool {
        !self.relays.is_empty()
            && bytes > 0
            && match self.config.algo {
                crate::config::Algo::Relay => true,
                crate::config::Algo::Auto => bytes >= crate::algo::plan::RELAY_AUTO_MIN_BYTES,
                crate::config::Algo::Ring => false,
            }
    }

    /// A relay all-reduce under verification: record the inputs at the sample positions
    /// before submitting; afterwards report the record to the validator (when the request is
    /// seen to complete) or, with `MR_VERIFY=1`, check it with the other peers before
    /// returning.
    #[allow(clippy::too_many_arguments)]
    fn iallreduce_verified(
        &self,
        v: &Arc<JobVerify>,
        buf: *mut u8,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        z: Compression,
        mem: OpMemory,
    ) -> Result<Request> {
        let bytes = count * dtype.size();
        let mut recorded: Option<Recorded> = None;
        let req = self.submit_with(
            Collective::AllReduce,
            dtype,
            op,
            count,
            0,
            z,
            mem,
            &mut |seq, weights| {
                if v.wants(seq) {
                    // SAFETY: the caller's contract keeps `buf` valid for `bytes` bytes until
                    // the request completes; the engine has not been given the op yet.
                    let input = unsafe { std::slice::from_raw_parts(buf, bytes) };
                    recorded = Some(v.record(seq, input, count, dtype, op, z, weights));
                }
            },
        )?;
        let Some(rec) = recorded else {
            return Ok(req);
        };
        let rank = self.rank;
        if v.peer_check {
            let result = req.done.wait().and_then(|()| {
                // SAFETY: the op completed; `buf` is still the caller's per the contract.
                let out = unsafe { std::slice::from_raw_parts(buf, bytes) };
                self.check_with_peers(v, &rec, out)
            });
            let done = Arc::new(Completion::default());
            done.complete(result);
            return Ok(Request::new(done));
        }
        let v = v.clone();
        let addr = buf as usize;
        *req.after.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(move || {
            // SAFETY: runs when the caller observes completion, while the caller's contract
            // still keeps the buffer valid and untouched.
            let out = unsafe { std::slice::from_raw_parts(addr as *const u8, bytes) };
            let record = v.complete(rank, &rec, out);
            v.report(record, rec.started);
        }));
        Ok(req)
    }

    /// `MR_VERIFY=1`: exchange samples and digests over the ring and check them.
    fn check_with_peers(&self, v: &JobVerify, rec: &Recorded, out: &[u8]) -> Result<()> {
        let mine = v.complete(self.rank, rec, out);
        let packed = v.pack(&mine);
        let n = packed.len();
        let mut all = vec![0u8; n * self.size];
        self.allgather(&packed, &mut all)?;
        let records: Vec<_> = (0..self.size)
            .map(|r| v.unpack(&mine, r, &all[r * n..(r + 1) * n]))
            .collect();
        v.report(mine, rec.started);
        match crate::validator::verify::check(&records) {
            Ok(faults) if faults.is_empty() => Ok(()),
            Ok(faults) => {
                let what: Vec<String> = faults
                    .iter()
                    .map(|f| {
                        let addr = self
                            .relays
                            .get(f.relay)
                            .and_then(|&i| self.config.relays.get(i))
                            .map_or("?", String::as_str);
                        format!("relay {} ({addr}): {}", f.relay, f.evidence)
                    })
                    .collect();
                Err(Error::new(
                    ErrorKind::Verify,
                    format!("relay result failed verification: {}", what.join("; ")),
                ))
            }
            Err(e) => Err(Error::new(
                ErrorKind::Verify,
                format!("verification records disagree: {e}"),
            )),
        }
    }

    /// Start an in-place all-reduce of `count` elements at `buf`.
    ///
    /// # Safety
    /// `buf` must be valid for reads and writes of `count` elements of `dtype` and untouched
    /// by anything else until the request completes.
    pub unsafe fn iallreduce_raw(
        &self,
        buf: *mut u8,
        count: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<Request> {
        let bytes = byte_len(count, dtype)?;
        check_ptr("allreduce", buf, bytes)?;
        // SAFETY: forwarded from this function's contract.
        unsafe { self.iallreduce_with(buf, count, dtype, op, self.config.compress, "MR_COMPRESS") }
    }

    /// As [`Comm::iallreduce_raw`], with float data travelling in wire format `z` (see
    /// [`crate::compress`]): every rank ends with the same bits, within the format's error
    /// bound of the exact result. `z` must be the same on every rank. Only float32 and
    /// float64 compress; ops through relays or shared memory run exactly.
    ///
    /// # Safety
    /// As for [`Comm::iallreduce_raw`].
    pub unsafe fn iallreduce_compressed_raw(
        &self,
        buf: *mut u8,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        z: Compression,
    ) -> Result<Request> {
        if !z.applies_to(dtype) {
            return Err(Error::invalid(format!(
                "allreduce: {z} compression applies to float32 and float64 data, not {dtype}"
            )));
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { self.iallreduce_with(buf, count, dtype, op, z, "the compression argument") }
    }

    /// # Safety
    /// As for [`Comm::iallreduce_raw`].
    unsafe fn iallreduce_with(
        &self,
        buf: *mut u8,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        z: Compression,
        asked_by: &str,
    ) -> Result<Request> {
        let bytes = byte_len(count, dtype)?;
        check_ptr("allreduce", buf, bytes)?;
        if let Some(h) = &self.hier {
            let compress = if z.applies_to(dtype) {
                z
            } else {
                Compression::None
            };
            return h.submit(HierOp::AllReduce {
                buf: Ptr(buf),
                count,
                dtype,
                op,
                compress,
            });
        }
        // SAFETY: forwarded from this function's contract.
        let mem = OpMemory::new(unsafe { RawBuf::new(buf, bytes) });
        let z = self.wire_format(z, dtype, bytes, asked_by);
        if let Some(v) = self.verify.as_ref().filter(|_| self.relayed(bytes)) {
            return self.iallreduce_verified(v, buf, count, dtype, op, z, mem);
        }
        self.submit_with(
            Collective::AllReduce,
            dtype,
            op,
            count,
            0,
            z,
            mem,
            &mut |_, _| {},
        )
    }

    /// The wire format an all-reduce of `bytes` actually uses when `z` is asked for: exact
    /// for integer and 16-bit data and on shared memory (nothing crosses a wire); `z` over
    /// the ring and through relays. Depends only on what every rank has alike.
    fn wire_format(
        &self,
        z: Compression,
        dtype: DType,
        bytes: usize,
        asked_by: &str,
    ) -> Compression {
        if z == Compression::None || !z.applies_to(dtype) || (self.shm && !self.relayed(bytes)) {
            return Compression::None;
        }
        log::trace!("rank {}: {z} on the wire ({asked_by})", self.rank);
        z
    }

    /// Start a broadcast of `count` elements from `root`'s `buf` into every rank's `buf`.
    ///
    /// # Safety
    /// As for [`Comm::iallreduce_raw`].
    pub unsafe fn ibroadcast_raw(
        &self,
        buf: *mut u8,
        count: usize,
        dtype: DType,
        root: usize,
    ) -> Result<Request> {
        let bytes = byte_len(count, dtype)?;
        check_ptr("broadcast", buf, bytes)?;
        if root >= self.size {
            return Err(Error::invalid(format!(
                "broadcast root {root} is out of range for world size {}",
                self.size
            )));
        }
        if let Some(h) = &self.hier {
            return h.submit(HierOp::Broadcast {
                buf: Ptr(buf),
                count,
                dtype,
                root,
            });
        }
        // SAFETY: forwarded from this function's contract.
        let mem = OpMemory::new(unsafe { RawBuf::new(buf, bytes) });
        // Relays forward a broadcast's bytes as they are: exact.
        let z = match self.relayed(bytes) {
            true => Compression::None,
            false => self.wire_format(self.config.compress, dtype, bytes, "MR_COMPRESS"),
        };
        self.submit_with(
            Collective::Broadcast,
            dtype,
            ReduceOp::Sum,
            count,
            root,
            z,
            mem,
            &mut |_, _| {},
        )
    }

    /// Start an all-gather: `count` elements from every rank's `send` land, in rank order, in
    /// every rank's `recv` (`count × size` elements).
    ///
    /// # Safety
    /// `send` valid for reads of `count` elements, `recv` for writes of `count × size`
    /// elements, neither touched by anything else until the request completes; they may not
    /// overlap unless `send` is exactly this rank's slot of `recv`.
    pub unsafe fn iallgather_raw(
        &self,
        send: *const u8,
        recv: *mut u8,
        count: usize,
        dtype: DType,
    ) -> Result<Request> {
        let bytes = byte_len(count, dtype)?;
        let total = bytes.checked_mul(self.size).ok_or_else(|| {
            Error::invalid(format!("allgather of {count} x {dtype} per rank overflows"))
        })?;
        check_ptr("allgather send", send, bytes)?;
        check_ptr("allgather recv", recv, total)?;
        if let Some(h) = &self.hier {
            return h.submit(HierOp::AllGather {
                send: Ptr(send as *mut u8),
                recv: Ptr(recv),
                count,
                dtype,
            });
        }
        // SAFETY: forwarded from this function's contract: `recv` is valid for that many
        // writable bytes until the op completes.
        let mut mem = OpMemory::new(unsafe { RawBuf::new(recv, total) });
        // SAFETY: forwarded from this function's contract; the input is only read.
        mem.input = unsafe { RawBuf::new(send as *mut u8, bytes) };
        let z = self.wire_format(self.config.compress, dtype, total, "MR_COMPRESS");
        self.submit_with(
            Collective::AllGather,
            dtype,
            ReduceOp::Sum,
            count,
            0,
            z,
            mem,
            &mut |_, _| {},
        )
    }

    /// Start a reduce-scatter: every rank's `send` holds `recv_count × size` elements; rank r's
    /// `recv` gets the reduction of block r.
    ///
    /// # Safety
    /// As for [`Comm::iallgather_raw`], with the sizes swapped.
    pub unsafe fn ireduce_scatter_raw(
        &self,
        send: *const u8,
        recv: *mut u8,
        recv_count: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<Request> {
        let bytes = byte_len(recv_count, dtype)?;
        let total = bytes.checked_mul(self.size).ok_or_else(|| {
            Error::invalid(format!(
                "reduce_scatter of {recv_count} x {dtype} per rank overflows"
            ))
        })?;
        check_ptr("reduce_scatter send", send, total)?;
        check_ptr("reduce_scatter recv", recv, bytes)?;
        if let Some(h) = &self.hier {
            return h.submit(HierOp::ReduceScatter {
                send: Ptr(send as *mut u8),
                recv: Ptr(recv),
                count: recv_count,
                dtype,
                op,
            });
        }
        // SAFETY: forwarded from this function's contract: `recv` is valid for that many
        // writable bytes until the op completes.
        let mut mem = OpMemory::new(unsafe { RawBuf::new(recv, bytes) });
        // SAFETY: forwarded from this function's contract; the input is only read.
        mem.input = unsafe { RawBuf::new(send as *mut u8, total) };
        let z = self.wire_format(self.config.compress, dtype, total, "MR_COMPRESS");
        self.submit_with(
            Collective::ReduceScatter,
            dtype,
            op,
            recv_count,
            0,
            z,
            mem,
            &mut |_, _| {},
        )
    }

    /// Submit a direct exchange ([`crate::algo::exchange`]): through the shared-memory
    /// segment when the ranks share one (`splits`: an all-to-all-v's counts and
    /// displacements), else over the direct TCP connections.
    #[allow(clippy::too_many_arguments)]
    fn submit_exchange(
        &self,
        coll: Collective,
        dtype: DType,
        count: usize,
        root: usize,
        plan: impl FnOnce() -> ExchangePlan,
        splits: Option<crate::net::shm::Splits>,
        mem: OpMemory,
    ) -> Result<Request> {
        if self.aborted.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Aborted,
                "communicator was aborted; destroy it and create a new one",
            ));
        }
        let mut mem = mem;
        let mut seq = self.next_seq.lock().unwrap_or_else(|e| e.into_inner());
        let desc = OpDesc {
            coll,
            seq: *seq,
            dtype,
            op: ReduceOp::Sum,
            count,
            root,
            compress: Compression::None,
        };
        let transport = if self.shm && crate::net::shm::carries(coll) {
            self.shm_ops.fetch_add(1, Ordering::Relaxed);
            Transport::SharedMemory(desc, splits.map(Box::new))
        } else {
            Transport::Frames(Box::new(Exchange::new(
                desc,
                self.config.chunk_bytes,
                plan(),
                &mut mem,
            )))
        };
        let done = Arc::new(Completion::default());
        self.engine.submit(Submission {
            transport,
            mem,
            done: crate::net::engine::Done::new(done.clone()),
        })?;
        *seq += 1;
        Ok(Request::new(done))
    }

    /// Check a send or receive before it is recorded or submitted: a rejected call touches
    /// nothing.
    pub fn check_p2p(&self, call: &P2pCall) -> Result<()> {
        let what = if call.send { "send" } else { "recv" };
        if call.peer >= self.size {
            return Err(Error::invalid(format!(
                "{what} peer {} is out of range for world size {}",
                call.peer, self.size
            )));
        }
        if call.peer == self.rank {
            return Err(Error::invalid(format!(
                "{what} peer {} is this rank; point-to-point needs another rank",
                call.peer
            )));
        }
        let bytes = byte_len(call.count, call.dtype)?;
        check_ptr(what, call.buf, bytes)
    }

    /// Start a group of sends and receives as one op ([`crate::algo::p2p`]); it ends `done`.
    /// Messages to or from one peer are numbered in call order, so the two ranks of a pair
    /// must call their sends and receives in the same order.
    ///
    /// # Safety
    /// Each call's buffer is valid for `count` elements (read for sends, written for
    /// receives), and nothing else touches it until `done` completes; receive buffers do not
    /// overlap any other buffer of the group.
    pub unsafe fn submit_p2p(&self, calls: &[P2pCall], done: Arc<Completion>) -> Result<Request> {
        use crate::algo::p2p::{Message, PointToPoint};
        for c in calls {
            self.check_p2p(c)?;
        }
        if self.aborted.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Aborted,
                "communicator was aborted; destroy it and create a new one",
            ));
        }
        // Held while submitting, so the group takes its place among collectives in call order.
        let seq = self.next_seq.lock().unwrap_or_else(|e| e.into_inner());
        let mut pairs = self.p2p_seq.lock().unwrap_or_else(|e| e.into_inner());
        let mut mem = OpMemory::new(RawBuf::empty());
        let (mut sends, mut recvs) = (Vec::new(), Vec::new());
        let mut next = pairs.clone();
        for c in calls {
            let counter = &mut next[c.peer];
            let n = if c.send {
                &mut counter.0
            } else {
                &mut counter.1
            };
            let msg = Message {
                peer: c.peer,
                tag: c.tag,
                seq: *n,
                dtype: c.dtype,
                count: c.count,
                buffer: mem.buffers.len(),
            };
            *n += 1;
            // SAFETY: forwarded from this function's contract.
            mem.buffers
                .push(unsafe { RawBuf::new(c.buf, c.count * c.dtype.size()) });
            if c.send {
                sends.push(msg);
            } else {
                recvs.push(msg);
            }
        }
        let desc = OpDesc {
            coll: Collective::PointToPoint,
            // The last collective's: the group takes no communicator-wide sequence number.
            seq: *seq - 1,
            dtype: calls.first().map_or(DType::U8, |c| c.dtype),
            op: ReduceOp::Sum,
            count: calls.len(),
            root: 0,
            compress: Compression::None,
        };
        let schedule = PointToPoint::new(desc, self.config.chunk_bytes, sends, recvs);
        self.engine.submit(Submission {
            transport: Transport::Frames(Box::new(schedule)),
            mem,
            done: crate::net::engine::Done::new(done.clone()),
        })?;
        *pairs = next;
        Ok(Request::new(done))
    }

    /// Start one send of `count` elements at `buf` to `peer` (its own group).
    ///
    /// # Safety
    /// As for [`Comm::submit_p2p`].
    pub unsafe fn isend_raw(
        &self,
        buf: *const u8,
        count: usize,
        dtype: DType,
        peer: usize,
        tag: u32,
    ) -> Result<Request> {
        let call = P2pCall {
            send: true,
            peer,
            tag,
            buf: buf as *mut u8,
            count,
            dtype,
        };
        // SAFETY: forwarded from this function's contract.
        unsafe { self.submit_p2p(&[call], Arc::new(Completion::default())) }
    }

    /// Start one receive of `count` elements into `buf` from `peer` (its own group).
    ///
    /// # Safety
    /// As for [`Comm::submit_p2p`].
    pub unsafe fn irecv_raw(
        &self,
        buf: *mut u8,
        count: usize,
        dtype: DType,
        peer: usize,
        tag: u32,
    ) -> Result<Request> {
        let call = P2pCall {
            send: false,
            peer,
            tag,
            buf,
            count,
            dtype,
        };
        // SAFETY: forwarded from this function's contract.
        unsafe { self.submit_p2p(&[call], Arc::new(Completion::default())) }
    }

    fn check_root(&self, what: &str, root: usize) -> Result<()> {
        if root >= self.size {
            return Err(Error::invalid(format!(
                "{what} root {root} is out of range for world size {}",
                self.size
            )));
        }
        Ok(())
    }

    /// Bytes of `count` elements per rank, times the world size.
    fn per_rank_total(&self, what: &str, count: usize, dtype: DType) -> Result<(usize, usize)> {
        let bytes = byte_len(count, dtype)?;
        let total = bytes.checked_mul(self.size).ok_or_else(|| {
            Error::invalid(format!("{what} of {count} x {dtype} per rank overflows"))
        })?;
        Ok((bytes, total))
    }

    /// Start a reduce: `root`'s `recv` gets the reduction of every rank's `send` (`count`
    /// elements); other ranks' `recv` is not touched and may be NULL. It runs as an all-reduce
    /// (ring, recursive doubling, shared memory or relays, as for [`Comm::iallreduce_raw`])
    /// into the root's `recv` and, elsewhere, into memory the request owns.
    ///
    /// # Safety
    /// `send` valid for reads of `count` elements; on the root `recv` valid for writes of
    /// `count` elements; neither touched by anything else until the request completes. On the
    /// root they may be the same buffer (in place) but must not otherwise overlap.
    pub unsafe fn ireduce_raw(
        &self,
        send: *const u8,
        recv: *mut u8,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        root: usize,
    ) -> Result<Request> {
        let bytes = byte_len(count, dtype)?;
        check_ptr("reduce send", send, bytes)?;
        self.check_root("reduce", root)?;
        if self.rank == root {
            check_ptr("reduce recv", recv, bytes)?;
            if bytes > 0 && send != recv.cast_const() {
                // SAFETY: both valid for `bytes` by the contract and not overlapping unless equal.
                unsafe { std::ptr::copy_nonoverlapping(send, recv, bytes) };
            }
            // SAFETY: forwarded from this function's contract.
            return unsafe { self.iallreduce_raw(recv, count, dtype, op) };
        }
        let mut owned = Scratch::zeroed(bytes)?;
        // SAFETY: `send` is valid for `bytes` reads by the contract.
        owned
            .as_mut_slice()
            .copy_from_slice(unsafe { std::slice::from_raw_parts(send, bytes) });
        let ptr = owned.as_mut_slice().as_mut_ptr();
        // SAFETY: `owned` moves into the request, whose drop waits for the op to end; its
        // heap block or mapping does not move with it.
        let mut req = unsafe { self.iallreduce_raw(ptr, count, dtype, op)? };
        req.owned = Some(owned);
        Ok(req)
    }

    /// Start a gather: `root`'s `recv` (`count × size` elements) gets every rank's `send`
    /// (`count` elements) in rank order; other ranks' `recv` may be NULL.
    ///
    /// # Safety
    /// As for [`Comm::iallgather_raw`], on the root; elsewhere `recv` is unused.
    pub unsafe fn igather_raw(
        &self,
        send: *const u8,
        recv: *mut u8,
        count: usize,
        dtype: DType,
        root: usize,
    ) -> Result<Request> {
        let (bytes, total) = self.per_rank_total("gather", count, dtype)?;
        check_ptr("gather send", send, bytes)?;
        self.check_root("gather", root)?;
        let recv_bytes = if self.rank == root { total } else { 0 };
        check_ptr("gather recv", recv, recv_bytes)?;
        // SAFETY: forwarded from this function's contract; the input is only read.
        let mut mem = OpMemory::new(unsafe { RawBuf::new(recv, recv_bytes) });
        mem.input = unsafe { RawBuf::new(send as *mut u8, bytes) };
        let plan = || ExchangePlan::gather(self.rank, self.size, bytes, root);
        self.submit_exchange(Collective::Gather, dtype, count, root, plan, None, mem)
    }

    /// Start a scatter: rank r's `recv` (`count` elements) gets block r of `root`'s `send`
    /// (`count × size` elements); other ranks' `send` may be NULL.
    ///
    /// # Safety
    /// As for [`Comm::ireduce_scatter_raw`], on the root; elsewhere `send` is unused.
    pub unsafe fn iscatter_raw(
        &self,
        send: *const u8,
        recv: *mut u8,
        count: usize,
        dtype: DType,
        root: usize,
    ) -> Result<Request> {
        let (bytes, total) = self.per_rank_total("scatter", count, dtype)?;
        self.check_root("scatter", root)?;
        let send_bytes = if self.rank == root { total } else { 0 };
        check_ptr("scatter send", send, send_bytes)?;
        check_ptr("scatter recv", recv, bytes)?;
        // SAFETY: forwarded from this function's contract; the input is only read.
        let mut mem = OpMemory::new(unsafe { RawBuf::new(recv, bytes) });
        mem.input = unsafe { RawBuf::new(send as *mut u8, send_bytes) };
        let plan = || ExchangePlan::scatter(self.rank, self.size, bytes, root);
        self.submit_exchange(Collective::Scatter, dtype, count, root, plan, None, mem)
    }

    /// Start an all-to-all: block p (`count` elements) of every rank's `send` goes to rank p,
    /// which stores the block from rank r as block r of its `recv`. Both hold `count × size`
    /// elements.
    ///
    /// # Safety
    /// `send` valid for reads and `recv` for writes of `count × size` elements, not
    /// overlapping, neither touched by anything else until the request completes.
    pub unsafe fn ialltoall_raw(
        &self,
        send: *const u8,
        recv: *mut u8,
        count: usize,
        dtype: DType,
    ) -> Result<Request> {
        let (_, total) = self.per_rank_total("alltoall", count, dtype)?;
        check_ptr("alltoall send", send, total)?;
        check_ptr("alltoall recv", recv, total)?;
        // SAFETY: forwarded from this function's contract; the input is only read.
        let mut mem = OpMemory::new(unsafe { RawBuf::new(recv, total) });
        mem.input = unsafe { RawBuf::new(send as *mut u8, total) };
        let plan = || {
            let counts = vec![count; self.size];
            let displs: Vec<usize> = (0..self.size).map(|p| p * count).collect();
            ExchangePlan::alltoallv(
                self.rank,
                self.size,
                dtype.size(),
                &counts,
                &displs,
                &counts,
                &displs,
            )
        };
        self.submit_exchange(Collective::AllToAll, dtype, count, 0, plan, None, mem)
    }

    /// Start an all-to-all-v: `send_counts[p]` elements at `send_displs[p]` of `send` go to
    /// rank p; `recv_counts[p]` elements from rank p land at `recv_displs[p]` of `recv`
    /// (counts and displacements in elements, one per rank). Rank p's `send_counts[r]` must
    /// equal rank r's `recv_counts[p]`; a mismatch fails the op on both with a message naming it.
    ///
    /// # Safety
    /// `send` valid for reads of every range the send counts and displacements name, `recv`
    /// for writes of every range the receive ones name; the ranges of `recv` do not overlap
    /// each other or `send`; nothing else touches either until the request completes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn ialltoallv_raw(
        &self,
        send: *const u8,
        send_counts: &[usize],
        send_displs: &[usize],
        recv: *mut u8,
        recv_counts: &[usize],
        recv_displs: &[usize],
        dtype: DType,
    ) -> Result<Request> {
        let n = self.size;
        for (name, a) in [
            ("send_counts", send_counts),
            ("send_displs", send_displs),
            ("recv_counts", recv_counts),
            ("recv_displs", recv_displs),
        ] {
            if a.len() != n {
                return Err(Error::invalid(format!(
                    "alltoallv: {name} has {} entries, need one per rank ({n})",
                    a.len()
                )));
            }
        }
        // The bytes each buffer must hold: the end of its furthest non-empty range.
        let extent = |what: &str, counts: &[usize], displs: &[usize]| -> Result<usize> {
            let mut end = 0usize;
            for p in 0..n {
                if counts[p] == 0 {
                    continue;
                }
                let e = displs[p]
                    .checked_add(counts[p])
                    .and_then(|e| e.checked_mul(dtype.size()))
                    .filter(|&b| b <= isize::MAX as usize)
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "alltoallv: {what} range for rank {p} ({} x {dtype} at {}) overflows",
                            counts[p], displs[p]
                        ))
                    })?;
                end = end.max(e);
            }
            Ok(end)
        };
        let send_bytes = extent("send", send_counts, send_displs)?;
        let recv_bytes = extent("recv", recv_counts, recv_displs)?;
        check_ptr("alltoallv send", send, send_bytes)?;
        check_ptr("alltoallv recv", recv, recv_bytes)?;
        if send_counts[self.rank] != recv_counts[self.rank] {
            return Err(Error::invalid(format!(
                "alltoallv: this rank (rank {}) sends itself {} elements but expects {}",
                self.rank, send_counts[self.rank], recv_counts[self.rank]
            )));
        }
        // SAFETY: forwarded from this function's contract; the input is only read.
        let mut mem = OpMemory::new(unsafe { RawBuf::new(recv, recv_bytes) });
        mem.input = unsafe { RawBuf::new(send as *mut u8, send_bytes) };
        let plan = || {
            ExchangePlan::alltoallv(
                self.rank,
                n,
                dtype.size(),
                send_counts,
                send_displs,
                recv_counts,
                recv_displs,
            )
        };
        // The segment needs the counts themselves; frames carry them per transfer.
        let splits = self.shm.then(|| crate::net::shm::Splits {
            send_counts: send_counts.to_vec(),
            send_displs: send_displs.to_vec(),
            recv_counts: recv_counts.to_vec(),
            recv_displs: recv_displs.to_vec(),
        });
        self.submit_exchange(Collective::AllToAllV, dtype, 0, 0, plan, splits, mem)
    }

    /// Start a barrier: completes once every rank has entered it.
    pub fn ibarrier(&self) -> Result<Request> {
        if let Some(h) = &self.hier {
            return h.submit(HierOp::Barrier);
        }
        self.submit(
            Collective::Barrier,
            DType::U8,
            ReduceOp::Max,
            0,
            0,
            OpMemory::new(RawBuf::empty()),
        )
    }

    pub fn allreduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        // SAFETY: the exclusive borrow lasts until wait() returns; `dtype_of` makes the op's
        // bytes exactly the slice's.
        unsafe {
            self.iallreduce_raw(buf.as_mut_ptr().cast(), buf.len(), dtype_of::<T>(), op)?
                .wait()
        }
    }

    /// [`Comm::allreduce`] with float data travelling in wire format `z`; see
    /// [`Comm::iallreduce_compressed_raw`].
    pub fn allreduce_compressed<T: Element>(
        &self,
        buf: &mut [T],
        op: ReduceOp,
        z: Compression,
    ) -> Result<()> {
        // SAFETY: the exclusive borrow lasts until wait() returns; `dtype_of` makes the op's
        // bytes exactly the slice's.
        unsafe {
            self.iallreduce_compressed_raw(
                buf.as_mut_ptr().cast(),
                buf.len(),
                dtype_of::<T>(),
                op,
                z,
            )?
            .wait()
        }
    }

    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        // SAFETY: the exclusive borrow lasts until wait() returns; `dtype_of` makes the op's
        // bytes exactly the slice's.
        unsafe {
            self.ibroadcast_raw(buf.as_mut_ptr().cast(), buf.len(), dtype_of::<T>(), root)?
                .wait()
        }
    }

    pub fn allgather<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        if recv.len() != send.len() * self.size {
            return Err(Error::invalid(format!(
                "allgather: recv holds {} elements, need {} x {} ranks",
                recv.len(),
                send.len(),
                self.size
            )));
        }
        // SAFETY: the borrows last until wait() returns; &/&mut cannot overlap; `dtype_of`
        // makes the op's bytes exactly the slices'.
        unsafe {
            self.iallgather_raw(
                send.as_ptr().cast(),
                recv.as_mut_ptr().cast(),
                send.len(),
                dtype_of::<T>(),
            )?
            .wait()
        }
    }

    pub fn reduce_scatter<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        if send.len() != recv.len() * self.size {
            return Err(Error::invalid(format!(
                "reduce_scatter: send holds {} elements, need {} x {} ranks",
                send.len(),
                recv.len(),
                self.size
            )));
        }
        // SAFETY: the borrows last until wait() returns; &/&mut cannot overlap; `dtype_of`
        // makes the op's bytes exactly the slices'.
        unsafe {
            self.ireduce_scatter_raw(
                send.as_ptr().cast(),
                recv.as_mut_ptr().cast(),
                recv.len(),
                dtype_of::<T>(),
                op,
            )?
            .wait()
        }
    }

    /// Reduce to `root`: on the root `recv` gets the reduction of every rank's `send`; pass
    /// `None` elsewhere.
    pub fn reduce<T: Element>(
        &self,
        send: &[T],
        recv: Option<&mut [T]>,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        let recv_ptr = match recv {
            Some(r) if r.len() == send.len() => r.as_mut_ptr().cast(),
            Some(r) => {
                return Err(Error::invalid(format!(
                    "reduce: recv holds {} elements, send {}",
                    r.len(),
                    send.len()
                )))
            }
            None if self.rank == root => {
                return Err(Error::invalid("reduce: the root needs a recv buffer"))
            }
            None => std::ptr::null_mut(),
        };
        // SAFETY: the borrows last until wait() returns; &/&mut cannot overlap; `dtype_of`
        // makes the op's bytes exactly the slices'.
        unsafe {
            self.ireduce_raw(
                send.as_ptr().cast(),
                recv_ptr,
                send.len(),
                dtype_of::<T>(),
                op,
                root,
            )?
            .wait()
        }
    }

    /// Gather to `root`: the root's `recv` (`send.len() × size` elements) gets every rank's
    /// `send` in rank order; pass `None` elsewhere.
    pub fn gather<T: Element>(
        &self,
        send: &[T],
        recv: Option<&mut [T]>,
        root: usize,
    ) -> Result<()> {
        let recv_ptr = match recv {
            Some(r) if Some(r.len()) == send.len().checked_mul(self.size) => r.as_mut_ptr().cast(),
            Some(r) => {
                return Err(Error::invalid(format!(
                    "gather: recv holds {} elements, need {} x {} ranks",
                    r.len(),
                    send.len(),
                    self.size
                )))
            }
            None if self.rank == root => {
                return Err(Error::invalid("gather: the root needs a recv buffer"))
            }
            None => std::ptr::null_mut(),
        };
        // SAFETY: the borrows last until wait() returns; &/&mut cannot overlap; `dtype_of`
        // makes the op's bytes exactly the slices'.
        unsafe {
            self.igather_raw(
                send.as_ptr().cast(),
                recv_ptr,
                send.len(),
                dtype_of::<T>(),
                root,
            )?
            .wait()
        }
    }

    /// Scatter from `root`: rank r's `recv` gets block r (`recv.len()` elements) of the root's
    /// `send` (`recv.len() × size` elements); pass `None` elsewhere.
    pub fn scatter<T: Element>(
        &self,
        send: Option<&[T]>,
        recv: &mut [T],
        root: usize,
    ) -> Result<()> {
        let send_ptr = match send {
            Some(s) if Some(s.len()) == recv.len().checked_mul(self.size) => s.as_ptr().cast(),
            Some(s) => {
                return Err(Error::invalid(format!(
                    "scatter: send holds {} elements, need {} x {} ranks",
                    s.len(),
                    recv.len(),
                    self.size
                )))
            }
            None if self.rank == root => {
                return Err(Error::invalid("scatter: the root needs a send buffer"))
            }
            None => std::ptr::null(),
        };
        // SAFETY: the borrows last until wait() returns; &/&mut cannot overlap; `dtype_of`
        // makes the op's bytes exactly the slices'.
        unsafe {
            self.iscatter_raw(
                send_ptr,
                recv.as_mut_ptr().cast(),
                recv.len(),
                dtype_of::<T>(),
                root,
            )?
            .wait()
        }
    }

    /// All-to-all of `send.len() / size` elements per rank pair.
    pub fn alltoall<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        if send.len() != recv.len() || send.len() % self.size != 0 {
            return Err(Error::invalid(format!(
                "alltoall: send ({}) and recv ({}) must hold the same multiple of {} elements",
                send.len(),
                recv.len(),
                self.size
            )));
        }
        // SAFETY: the borrows last until wait() returns; &/&mut cannot overlap; `dtype_of`
        // makes the op's bytes exactly the slices'.
        unsafe {
            self.ialltoall_raw(
                send.as_ptr().cast(),
                recv.as_mut_ptr().cast(),
                send.len() / self.size,
                dtype_of::<T>(),
            )?
            .wait()
        }
    }

    pub fn barrier(&self) -> Result<()> {
        self.ibarrier()?.wait()
    }

    /// Finish pending ops, say goodbye to the peers and stop the progress thread.
    pub fn destroy(mut self) -> Result<()> {
        let hier = self.hier.take().map(Hierarchy::shutdown).unwrap_or(Ok(()));
        let r = self.engine.shutdown().and(hier);
        // Dropping the verifier delivers queued reports to the validator.
        drop(self.verify);
        r
    }
}

/// Route `log` records to stderr, filtered by `MR_LOG` (default `warn`); idempotent.
pub fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::new().filter_or("MR_LOG", "warn"))
        .try_init();
}

/// Test hook (builds with debug assertions only): SIGKILL this process when the variable
/// `name` is set, to leave behind what a crash at this point leaves.
fn crash_for_test(name: &str) {
    if cfg!(debug_assertions) && std::env::var_os(name).is_some() {
        log::warn!("{name} is set: killing this process");
        // SAFETY: raise(2) has no memory-safety preconditions.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}

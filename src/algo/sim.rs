//! Deterministic simulator for schedules and the policy around them: ranks and relays
//! exchanging frames through in-memory queues, with a seeded scheduler that reorders
//! deliveries and delays send completions, and a virtual clock. Nothing sleeps and nothing
//! reads the real clock; [`Sim::drive_bounded`] fails on livelock.
//!
//! Every rank runs the same sans-IO code as the progress loop ([`crate::net::engine`]): its
//! op's [`Schedule`], a [`Sequencer`] that decides whether a frame belongs to the running op,
//! must wait for a later one (parked: it stays in the queue) or is stale, and a
//! [`RelayHealth`] fed with virtual time that finds stalled relays and timed-out ops and
//! measures relay throughput. A rank may run several ops one after another
//! ([`SimRank::then`]); relay ops after the first split their segments by the rates the ranks
//! measured, as the communicator does.
//!
//! Relays ([`SimRelay`]) sum in rank order (all-reduce, plain or compressed) or forward
//! (broadcast). A relay can be killed (its connections break: every rank learns of it within
//! a chosen number of steps), stalled from a virtual time on (it takes frames and never
//! answers: only the policy's stall rule notices), or given a rate (it needs `bytes / rate`
//! of virtual time per answer).
//!
//! While something can be delivered now, time stands still; when nothing can, the clock jumps
//! to the next arrival or the earliest deadline a rank's policy names.

use crate::algo::relay::weights_from_rates;
use crate::algo::{Collective, Endpoint, OpDesc, Schedule, Transmit};
use crate::buffer::{OpMemory, RawBuf};
use crate::compress::Compression;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::policy::relays::{smooth_rate, RelayHealth};
use crate::policy::sequence::{Route, Sequencer};
use crate::wire::{FrameHeader, HEADER_LEN};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Chunk size simulated relay jobs announce (and the relay schedules in the tests use).
pub const SIM_RELAY_CHUNK: usize = 64;

/// Op timeout of simulated ranks unless a test sets another ([`Sim::set_timeout`]).
pub const SIM_TIMEOUT: Duration = Duration::from_secs(60);

/// Small deterministic PRNG (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Builds a later op of a rank once it starts: given the relay segment weights every rank
/// adopts for it and the op's memory.
pub type BuildOp = Box<dyn FnOnce(&[u64], &mut OpMemory) -> Box<dyn Schedule>>;

/// An op a rank runs after its current one.
pub struct LaterOp {
    build: BuildOp,
    user: Vec<u8>,
}

/// One simulated rank: its schedule, its memory (backed by owned vectors), the transmits
/// handed out but not yet reported as sent, and its policy.
pub struct SimRank {
    pub schedule: Box<dyn Schedule>,
    pub mem: OpMemory,
    pub user: Vec<u8>,
    pub input: Vec<u8>,
    pub in_flight: Vec<Transmit>,
    pub error: Option<crate::error::Error>,
    /// Further buffers behind `mem.buffers` (point-to-point groups).
    pub buffers: Vec<Vec<u8>>,
    /// Ops to run after this one, in order.
    pub later: VecDeque<LaterOp>,
    /// Result buffers of the ops that completed here, in order (the current one excluded).
    pub results: Vec<Vec<u8>>,
    /// Virtual start and end of each op that ended here.
    pub op_times: Vec<(Duration, Duration)>,
    /// Whether the current op started (false once the last op ended).
    pub running: bool,
    started_at: Duration,
    pub health: RelayHealth,
    pub sequencer: Sequencer,
    /// Smoothed relay throughput, bytes per second, as the engine keeps it.
    pub rates: Vec<u64>,
    /// When this rank dropped each relay, and why (its connection broke, it stalled, or another
    /// rank reported it lost), in the order it learned of them.
    pub relay_drops: Vec<(usize, Duration, String)>,
}

impl SimRank {
    pub fn new(
        schedule: Box<dyn Schedule>,
        mem: OpMemory,
        user: Vec<u8>,
        input: Vec<u8>,
    ) -> SimRank {
        SimRank {
            schedule,
            mem,
            user,
            input,
            in_flight: Vec::new(),
            error: None,
            buffers: Vec::new(),
            later: VecDeque::new(),
            results: Vec::new(),
            op_times: Vec::new(),
            running: false,
            started_at: Duration::ZERO,
            health: RelayHealth::new(SIM_TIMEOUT),
            sequencer: Sequencer::default(),
            rates: Vec::new(),
            relay_drops: Vec::new(),
        }
    }

    /// Run the op `build` makes on `user` after the ops queued so far.
    pub fn then(&mut self, user: Vec<u8>, build: BuildOp) {
        self.later.push_back(LaterOp { build, user });
    }

    fn done(&self) -> bool {
        !self.running && self.later.is_empty()
    }
}

/// A simulated relay: all-reduce goes through the relay daemon's own header checks and
/// rank-order sums ([`crate::relay::sums`]), broadcast forwards and acknowledges.
pub struct SimRelay {
    /// Killed: frames to it vanish, its connections are broken.
    pub dead: bool,
    /// From this virtual time on it takes frames and never answers.
    pub stall_from: Option<Duration>,
    /// Bytes per second it answers at (`None`: at once).
    pub rate: Option<u64>,
    busy_until: Duration,
    sums: crate::relay::sums::Sums,
    /// Chunk size the job announced (what the relay checks frames against).
    pub chunk_bytes: usize,
    /// Frames that reached it, per op sequence number.
    pub received: HashMap<u64, usize>,
}

impl SimRelay {
    fn new(world: usize) -> SimRelay {
        SimRelay {
            dead: false,
            stall_from: None,
            rate: None,
            busy_until: Duration::ZERO,
            sums: crate::relay::sums::Sums::new(world, 64 << 20, 1 << 20),
            chunk_bytes: SIM_RELAY_CHUNK,
            received: HashMap::new(),
        }
    }
}

struct Message {
    from: Endpoint,
    to: Endpoint,
    header: FrameHeader,
    payload: Vec<u8>,
    /// Earliest virtual time it can arrive.
    at: Duration,
}

pub struct Sim {
    pub ranks: Vec<SimRank>,
    pub relays: Vec<SimRelay>,
    net: Vec<Message>,
    rng: Rng,
    /// Ranks that stopped responding (their frames are dropped, they never send).
    pub dead: Vec<bool>,
    /// Virtual time since the start.
    pub now: Duration,
    base: Instant,
    /// One-way delay of every frame.
    pub latency: Duration,
    steps: usize,
    /// Relays to kill at a step: (step, relay).
    kills: Vec<(usize, usize)>,
    /// Ranks learning that a relay's connection broke: (step, rank, relay).
    notify: Vec<(usize, usize, usize)>,
    /// Deliveries that had to wait because their op had not started at the receiver.
    pub parked: usize,
    /// Every frame sent, in order: sender, receiver, header.
    pub sent: Vec<(Endpoint, Endpoint, FrameHeader)>,
    /// Segment weights of each later relay op, fixed when its first rank starts it.
    weights: HashMap<usize, Vec<u64>>,
}

impl Sim {
    /// Build schedules for `desc` on `n` ranks; `user[r]`/`input[r]` are each rank's buffers.
    pub fn new(
        desc: OpDesc,
        config: &Config,
        mut user: Vec<Vec<u8>>,
        mut input: Vec<Vec<u8>>,
        seed: u64,
    ) -> Sim {
        let n = user.len();
        let ranks = (0..n)
            .map(|r| {
                let mut u = std::mem::take(&mut user[r]);
                let mut i = std::mem::take(&mut input[r]);
                // SAFETY: the vectors live in the SimRank beside the RawBufs and are never
                // reallocated while the schedule runs.
                let mut mem = OpMemory::new(unsafe { RawBuf::new(u.as_mut_ptr(), u.len()) });
                // SAFETY: as above.
                mem.input = unsafe { RawBuf::new(i.as_mut_ptr(), i.len()) };
                let schedule = crate::algo::plan::build(&desc, r, n, config, &mut mem)
                    .expect("build schedule");
                SimRank::new(schedule, mem, u, i)
            })
            .collect();
        Sim::from_ranks(ranks, seed)
    }

    /// A simulation of ranks built by the caller (schedules that need more than an
    /// [`OpDesc`], such as direct exchanges or relay schedules, or ranks that called
    /// differently).
    pub fn from_ranks(ranks: Vec<SimRank>, seed: u64) -> Sim {
        let n = ranks.len();
        let mut sim = Sim {
            ranks,
            relays: Vec::new(),
            net: Vec::new(),
            rng: Rng::new(seed),
            dead: vec![false; n],
            now: Duration::ZERO,
            base: Instant::now(),
            latency: Duration::ZERO,
            steps: 0,
            kills: Vec::new(),
            notify: Vec::new(),
            parked: 0,
            sent: Vec::new(),
            weights: HashMap::new(),
        };
        for r in 0..n {
            sim.start_current(r);
        }
        sim
    }

    /// Add `n` relays, answering at once.
    pub fn with_relays(mut self, n: usize) -> Sim {
        let world = self.ranks.len();
        self.relays = (0..n).map(|_| SimRelay::new(world)).collect();
        for r in 0..self.ranks.len() {
            self.ranks[r].rates = vec![0; n];
            // The first op started before the relays existed: it knows them now.
            let now = self.instant();
            self.ranks[r].health.start_op(now, 0..n);
        }
        self
    }

    /// Every rank's op timeout (the relay stall bound follows from it).
    pub fn set_timeout(&mut self, timeout: Duration) {
        let now = self.instant();
        let n = self.relays.len();
        for k in &mut self.ranks {
            k.health = RelayHealth::new(timeout);
            k.health.start_op(now, 0..n);
        }
    }

    /// Kill relay `k` at scheduler step `step`; every rank learns of it within `spread`
    /// steps after that. Its answers not yet delivered are lost or delivered at random.
    pub fn kill_relay(&mut self, k: usize, step: usize, spread: usize) {
        self.kills.push((step, k));
        for p in 0..self.ranks.len() {
            let at = step + self.rng.below(spread.max(1));
            self.notify.push((at, p, k));
        }
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    /// The virtual instant `t` after the start.
    pub fn at(&self, t: Duration) -> Instant {
        self.base + t
    }

    /// The current op of rank `r` begins: the policy learns of it.
    fn start_current(&mut self, r: usize) {
        let now = self.instant();
        let k = &mut self.ranks[r];
        k.running = true;
        k.started_at = self.now;
        if let Err(e) = k.schedule.start(&mut k.mem) {
            k.error = Some(e);
            return;
        }
        let lost = k.health.start_op(now, 0..self.relays.len());
        for relay in lost {
            let err = Error::remote(format!("relay {relay} was lost in an earlier op"));
            if let Err(e) = k
                .schedule
                .handle_endpoint_lost(&mut k.mem, Endpoint::Relay(relay), err)
            {
                k.error = Some(e);
            }
        }
    }

    /// Rank `r`'s op completed: record it, start the next one if any.
    fn finish_current(&mut self, r: usize) {
        let now = self.now;
        let n_ops = self.ranks[r].op_times.len();
        let k = &mut self.ranks[r];
        k.running = false;
        k.op_times.push((k.started_at, now));
        let seq = k.schedule.desc().seq;
        let p2p = k.schedule.p2p_ranges();
        k.sequencer.ended(seq, &p2p);
        for s in k.health.finish_op() {
            if let Some(rate) = k.rates.get_mut(s.relay) {
                *rate = smooth_rate(*rate, s.bytes_per_sec);
            }
        }
        let Some(next) = k.later.pop_front() else {
            return;
        };
        // The weights every rank uses for this op: the rates the ranks hold when the first
        // of them starts it, summed in KiB/s (as the communicator's exchange does).
        let index = n_ops + 1;
        let weights = match self.weights.get(&index) {
            Some(w) => w.clone(),
            None => {
                let sums: Vec<u64> = (0..self.relays.len())
                    .map(|i| self.ranks.iter().map(|k| k.rates[i] / 1024).sum())
                    .collect();
                let w = weights_from_rates(&sums);
                self.weights.insert(index, w.clone());
                w
            }
        };
        let k = &mut self.ranks[r];
        let done = std::mem::replace(&mut k.user, next.user);
        k.results.push(done);
        // The input backup goes from op to op, as the progress loop hands it on.
        let backup = k.mem.backup.take();
        // SAFETY: the vector lives in the SimRank beside the RawBuf and is never reallocated
        // while the op runs.
        k.mem = OpMemory::new(unsafe { RawBuf::new(k.user.as_mut_ptr(), k.user.len()) });
        k.mem.backup = backup;
        k.schedule = (next.build)(&weights, &mut k.mem);
        self.start_current(r);
    }

    /// Rank `p` learns that relay `k` is gone (its connection broke, or it stalled).
    fn drop_relay(&mut self, p: usize, k: usize, err: Error) {
        let now = self.now;
        let rank = &mut self.ranks[p];
        if !rank.health.lose(k) {
            return;
        }
        rank.relay_drops.push((k, now, err.message.clone()));
        if !rank.running {
            return;
        }
        if let Err(e) = rank
            .schedule
            .handle_endpoint_lost(&mut rank.mem, Endpoint::Relay(k), err)
        {
            rank.error = Some(e);
        }
    }

    /// Let every rank's policy look at the clock.
    fn handle_timeouts(&mut self) {
        let now = self.instant();
        for p in 0..self.ranks.len() {
            if self.dead[p] || self.ranks[p].error.is_some() || !self.ranks[p].running {
                continue;
            }
            let k = &mut self.ranks[p];
            let schedule = &k.schedule;
            let expired = k
                .health
                .handle_timeout(now, |r| schedule.waits_on(Endpoint::Relay(r)));
            let bound = k.health.stall();
            for r in expired.stalled {
                let msg = format!(
                    "relay {r} stalled: nothing arrived from it for {} ms",
                    bound.as_millis()
                );
                self.drop_relay(p, r, Error::timeout(msg));
            }
            let k = &mut self.ranks[p];
            if expired.op_timed_out && k.error.is_none() {
                k.error = Some(Error::timeout(format!(
                    "{} made no progress: {}",
                    k.schedule.desc(),
                    k.schedule.waiting_for()
                )));
            }
        }
    }

    /// Whether message `m` must wait at its receiver for an op that has not started there.
    fn parks(&self, m: &Message) -> bool {
        let Endpoint::Rank(to) = m.to else {
            return false;
        };
        let k = &self.ranks[to];
        let current = k.running.then(|| k.schedule.desc().seq);
        let route = k.sequencer.route(m.from, &m.header, current, || {
            k.running && k.schedule.accepts_p2p(m.from, &m.header)
        });
        route == Route::Park
    }

    /// A frame reaches relay `k`.
    fn relay_in(&mut self, k: usize, from: Endpoint, h: FrameHeader, payload: Vec<u8>) {
        let world = self.ranks.len();
        let now = self.now;
        let latency = self.latency;
        let relay = &mut self.relays[k];
        if relay.dead {
            return;
        }
        *relay.received.entry(h.seq).or_default() += 1;
        if relay.stall_from.is_some_and(|t| now >= t) {
            return;
        }
        let Endpoint::Rank(from) = from else {
            panic!("relay {k} got a frame from {from}");
        };
        // When answers of `bytes` each to every rank leave.
        let mut answer_at = |bytes: usize| {
            let start = now.max(relay.busy_until);
            let busy = relay.rate.map_or(Duration::ZERO, |rate| {
                Duration::from_nanos((bytes * world) as u64 * 1_000_000_000 / rate.max(1))
            });
            relay.busy_until = start + busy;
            start + busy + latency
        };
        let src = Endpoint::Relay(k);
        if h.coll == Collective::Broadcast as u8 {
            let at = answer_at(payload.len());
            for r in (0..world).filter(|&r| r != from) {
                self.net.push(Message {
                    from: src,
                    to: Endpoint::Rank(r),
                    header: h,
                    payload: payload.clone(),
                    at,
                });
            }
            self.net.push(Message {
                from: src,
                to: Endpoint::Rank(from),
                header: FrameHeader { len: 0, ..h },
                payload: Vec::new(),
                at,
            });
            return;
        }
        let f = crate::relay::sums::check_data_header(&h, from, world, relay.chunk_bytes)
            .unwrap_or_else(|e| panic!("relay {k}: rank {from}: {e}"));
        let mut part = crate::buffer::Scratch::zeroed(payload.len()).expect("scratch");
        part.as_mut_slice().copy_from_slice(&payload);
        let (h, bytes) = match relay.sums.contribute(from, &h, f, part) {
            Ok(None) => return,
            Ok(Some((rh, sum))) => (rh, sum.as_slice()[..rh.len as usize].to_vec()),
            Err(e) => panic!("relay {k}: rank {from}: {e:?}"),
        };
        let at = answer_at(bytes.len());
        for r in 0..world {
            self.net.push(Message {
                from: src,
                to: Endpoint::Rank(r),
                header: h,
                payload: bytes.clone(),
                at,
            });
        }
    }

    /// A frame reaches rank `to`.
    fn rank_in(&mut self, to: usize, m: Message) {
        if self.dead[to] {
            return;
        }
        let now = self.instant();
        let in_place = self.rng.below(2) == 0;
        let k = &mut self.ranks[to];
        if k.error.is_some() {
            return;
        }
        if let Endpoint::Relay(r) = m.from {
            if k.health.is_lost(r) {
                return; // its connection is closed here
            }
        }
        let current = k.running.then(|| k.schedule.desc().seq);
        let route = k.sequencer.route(m.from, &m.header, current, || {
            k.running && k.schedule.accepts_p2p(m.from, &m.header)
        });
        match route {
            Route::ToCurrentOp => {}
            Route::Discard => return,
            Route::Park => unreachable!("parked frames are not picked"),
            Route::Control | Route::Unexpected => {
                k.error = Some(Error::internal(format!(
                    "unexpected {:?} frame from {}",
                    m.header.kind(),
                    m.from
                )));
                return;
            }
        }
        if let Endpoint::Relay(r) = m.from {
            k.health.heard_from(r, HEADER_LEN + m.payload.len(), now);
        }
        k.health.progress(now);
        // Take the zero-copy path for a random half of the frames that allow it.
        let result = if in_place {
            match k.schedule.recv_in_place(m.from, &m.header) {
                Ok(Some(region)) => {
                    k.mem.bytes_mut(&region).copy_from_slice(&m.payload);
                    k.schedule
                        .handle_frame_in_place(&mut k.mem, m.from, &m.header)
                }
                Ok(None) => k
                    .schedule
                    .handle_frame(&mut k.mem, m.from, &m.header, &m.payload),
                Err(e) => Err(e),
            }
        } else {
            k.schedule
                .handle_frame(&mut k.mem, m.from, &m.header, &m.payload)
        };
        if let Err(e) = result {
            k.error = Some(e);
        }
    }

    /// Kills and relay losses due at this step.
    fn step_events(&mut self) {
        let step = self.steps;
        for &(at, k) in &self.kills {
            if at == step {
                self.relays[k].dead = true;
            }
        }
        let due: Vec<(usize, usize)> = self
            .notify
            .iter()
            .filter(|n| n.0 == step)
            .map(|n| (n.1, n.2))
            .collect();
        for (p, k) in due {
            let err = Error::remote(format!("connection closed by relay {k}"));
            self.drop_relay(p, k, err);
        }
    }

    /// One scheduler move; returns whether anything happened.
    pub fn step(&mut self) -> bool {
        self.step_events();
        self.steps += 1;
        let n = self.ranks.len();
        let mut moved = false;
        // Let every live rank hand out what it wants to send; start its next op when the
        // current one completed.
        for r in 0..n {
            loop {
                if self.dead[r] || self.ranks[r].error.is_some() || !self.ranks[r].running {
                    break;
                }
                let rank = &mut self.ranks[r];
                while let Some(ep) = rank.schedule.poll_endpoint_dropped() {
                    if let Endpoint::Relay(k) = ep {
                        if rank.health.lose(k) {
                            let why = "reported lost by another rank".to_string();
                            rank.relay_drops.push((k, self.now, why));
                        }
                    }
                }
                while let Some(t) = rank.schedule.poll_transmit(&mut rank.mem) {
                    if let Endpoint::Relay(k) = t.to {
                        if rank.health.is_lost(k) {
                            continue;
                        }
                    }
                    rank.in_flight.push(t);
                    moved = true;
                }
                if !rank.schedule.is_complete() {
                    break;
                }
                self.finish_current(r);
                moved = true;
            }
        }
        self.handle_timeouts();
        // Pick a random event: complete a send (copying its bytes only now, so a schedule
        // that touches a region before handle_sent is caught) or deliver a frame that is due
        // and whose op has started at the receiver.
        let sends: usize = (0..n)
            .filter(|&r| !self.dead[r])
            .map(|r| self.ranks[r].in_flight.len())
            .sum();
        let mut due = Vec::new();
        for (i, m) in self.net.iter().enumerate() {
            if m.at > self.now {
                continue;
            }
            if self.parks(m) {
                self.parked += 1;
                continue;
            }
            due.push(i);
        }
        let total = sends + due.len();
        if total == 0 {
            // Broken connections are noticed within their steps, before any timer fires.
            if self.notify.iter().any(|n| n.0 >= self.steps) {
                return true;
            }
            return self.advance_clock() || moved;
        }
        let mut pick = self.rng.below(total);
        if pick < sends {
            for r in 0..n {
                if self.dead[r] {
                    continue;
                }
                let now = self.instant();
                let at = self.now + self.latency;
                let k = &mut self.ranks[r];
                if pick < k.in_flight.len() {
                    let t = k.in_flight.remove(pick);
                    let payload = k.mem.bytes(&t.region).to_vec();
                    k.schedule.handle_sent(&t);
                    k.health.progress(now);
                    self.sent.push((Endpoint::Rank(r), t.to, t.header));
                    self.net.push(Message {
                        from: Endpoint::Rank(r),
                        to: t.to,
                        header: t.header,
                        payload,
                        at,
                    });
                    return true;
                }
                pick -= k.in_flight.len();
            }
            unreachable!();
        }
        let m = self.net.swap_remove(due[pick - sends]);
        match m.to {
            Endpoint::Relay(k) => self.relay_in(k, m.from, m.header, m.payload),
            Endpoint::Rank(to) => {
                // A dead relay's answers still in flight may or may not arrive.
                if let Endpoint::Relay(k) = m.from {
                    if self.relays[k].dead && self.rng.below(2) == 0 {
                        return true;
                    }
                }
                self.rank_in(to, m);
            }
        }
        true
    }

    /// Nothing can move now: jump to the next arrival or policy deadline. False if there is
    /// none (deadlock).
    fn advance_clock(&mut self) -> bool {
        let arrival = self
            .net
            .iter()
            .map(|m| m.at)
            .filter(|&t| t > self.now)
            .min();
        let deadline = self
            .ranks
            .iter()
            .enumerate()
            .filter(|(r, k)| !self.dead[*r] && k.running && k.error.is_none())
            .filter_map(|(_, k)| k.health.poll_timeout())
            .map(|t| t.saturating_duration_since(self.base))
            .min();
        let next = match (arrival, deadline) {
            (Some(a), Some(d)) => a.min(d),
            (a, d) => match a.or(d) {
                Some(t) => t,
                None => return false,
            },
        };
        if next <= self.now {
            return false;
        }
        self.now = next;
        self.handle_timeouts();
        true
    }

    pub fn all_complete(&self) -> bool {
        self.ranks.iter().enumerate().all(|(r, k)| {
            self.dead[r] || k.done() || (k.later.is_empty() && k.schedule.is_complete())
        })
    }

    /// Run until every live rank completed all its ops, or fail after `max_steps` moves or
    /// when nothing can move (livelock/deadlock).
    pub fn drive_bounded(&mut self, max_steps: usize) -> Result<(), String> {
        for _ in 0..max_steps {
            let pending_kills = self.notify.iter().any(|n| n.0 >= self.steps);
            if self.all_complete() && !pending_kills {
                self.finish_all();
                return Ok(());
            }
            if !self.step() && !self.all_complete() && !pending_kills {
                let stuck: Vec<String> = self
                    .ranks
                    .iter()
                    .enumerate()
                    .filter(|(r, k)| !self.dead[*r] && !k.schedule.is_complete())
                    .map(|(r, k)| format!("rank {r}: {} {:?}", k.schedule.waiting_for(), k.error))
                    .collect();
                return Err(format!("no progress possible: {}", stuck.join("; ")));
            }
        }
        Err(format!("still running after {max_steps} steps"))
    }

    /// Record the end of every op that completed but was not yet seen to.
    fn finish_all(&mut self) {
        for r in 0..self.ranks.len() {
            if !self.dead[r] && self.ranks[r].running && self.ranks[r].schedule.is_complete() {
                self.finish_current(r);
            }
        }
    }

    /// Frames waiting in the network.
    pub fn in_network(&self) -> usize {
        self.net.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::Collective;
    use crate::types::{DType, ReduceOp};

    fn desc(coll: Collective, dtype: DType, op: ReduceOp, count: usize, root: usize) -> OpDesc {
        OpDesc {
            coll,
            seq: 1,
            dtype,
            op,
            count,
            root,
            compress: crate::compress::Compression::None,
        }
    }

    fn config(chunk: usize, small: usize) -> Config {
        Config {
            chunk_bytes: chunk,
            small_bytes: small,
            ..Config::default()
        }
    }

    /// Integer-valued contribution of rank r at element i, exact in every dtype.
    /// Never zero, so float products carry no signed zeros.
    fn value(r: usize, i: usize) -> i64 {
        match ((r * 7 + i * 3) % 11) as i64 - 3 {
            0 => 5,
            v => v,
        }
    }

    fn encode(dtype: DType, vals: &[i64]) -> Vec<u8> {
        let mut out = Vec::new();
        for &v in vals {
            match dtype {
                DType::F32 => out.extend((v as f32).to_le_bytes()),
                DType::F64 => out.extend((v as f64).to_le_bytes()),
                DType::F16 => out.extend(half::f16::from_f64(v as f64).to_bits().to_le_bytes()),
                DType::BF16 => out.extend(half::bf16::from_f64(v as f64).to_bits().to_le_bytes()),
                DType::I8 => out.extend((v as i8).to_le_bytes()),
                DType::U8 => out.extend((v as u8).to_le_bytes()),
                DType::I32 => out.extend((v as i32).to_le_bytes()),
                DType::I64 => out.extend(v.to_le_bytes()),
            }
        }
        out
    }

    fn expected(dtype: DType, op: ReduceOp, n: usize, i: usize) -> i64 {
        let vals: Vec<i64> = (0..n).map(|r| value(r, i)).collect();
        let wrap = |v: i64| match dtype {
            DType::U8 => v as u8 as i64,
            DType::I8 => v as i8 as i64,
            _ => v,
        };
        match op {
            ReduceOp::Sum => wrap(vals.iter().sum()),
            ReduceOp::Avg => {
                let s: i64 = wrap(vals.iter().sum());
                if dtype.is_float() {
                    // Exact only when divisible; tests use only such cases for floats.
                    s / n as i64
                } else {
                    match dtype {
                        DType::U8 => (s as u8 / n as u8) as i64,
                        _ => s / n as i64,
                    }
                }
            }
            ReduceOp::Max => vals.iter().map(|v| wrap(*v)).max().unwrap(),
            ReduceOp::Min => vals.iter().map(|v| wrap(*v)).min().unwrap(),
            ReduceOp::Prod => wrap(vals.iter().fold(1i64, |a, b| a.wrapping_mul(*b))),
        }
    }

    fn ops_for(dtype: DType, n: usize) -> Vec<ReduceOp> {
        ReduceOp::ALL
            .into_iter()
            // Float AVG of integer-valued data is exact only when n divides the sum; check
            // AVG for floats with n = 1, 2, 4 where our values make it exact enough below.
            .filter(|op| *op != ReduceOp::Avg || !dtype.is_float())
            // u8 of negative values wraps; products of many ranks overflow small floats.
            .filter(|op| *op != ReduceOp::Prod || n <= 4)
            .collect()
    }

    fn run_allreduce(
        n: usize,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        chunk: usize,
        small: usize,
        seed: u64,
    ) {
        let d = desc(Collective::AllReduce, dtype, op, count, 0);
        let user = (0..n)
            .map(|r| encode(dtype, &(0..count).map(|i| value(r, i)).collect::<Vec<_>>()))
            .collect();
        let mut sim = Sim::new(d, &config(chunk, small), user, vec![Vec::new(); n], seed);
        sim.drive_bounded(1_000_000)
            .unwrap_or_else(|e| panic!("{d} n={n}: {e}"));
        let want = encode(
            dtype,
            &(0..count)
                .map(|i| expected(dtype, op, n, i))
                .collect::<Vec<_>>(),
        );
        for (r, k) in sim.ranks.iter().enumerate() {
            assert!(k.error.is_none(), "rank {r}: {:?}", k.error);
            assert_eq!(
                k.user, want,
                "{d} n={n} chunk={chunk} small={small} rank {r}"
            );
        }
    }

    #[test]
    fn allreduce_ring_and_doubling_every_dtype_op_and_size() {
        for n in [1usize, 2, 3, 4, 5, 8] {
            for count in [0, 1, n.saturating_sub(1), 7, 33] {
                for dtype in DType::ALL {
                    for op in ops_for(dtype, n) {
                        // Ring with tiny chunks, and the small-message path.
                        run_allreduce(n, count, dtype, op, 8, 0, 7 + n as u64);
                        run_allreduce(n, count, dtype, op, 64, usize::MAX, 11 + count as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn allreduce_float_avg() {
        // Sums of these values are multiples of n for n = 2 and 4 by construction.
        for n in [2, 4] {
            for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
                let count = 13;
                let d = desc(Collective::AllReduce, dtype, ReduceOp::Avg, count, 0);
                let user: Vec<Vec<u8>> = (0..n)
                    .map(|r| {
                        encode(
                            dtype,
                            &(0..count)
                                .map(|i| (i as i64) * (r as i64 + 1) * 4)
                                .collect::<Vec<_>>(),
                        )
                    })
                    .collect();
                for small in [0, usize::MAX] {
                    let mut sim =
                        Sim::new(d, &config(8, small), user.clone(), vec![Vec::new(); n], 3);
                    sim.drive_bounded(100_000).unwrap();
                    let tri = (n * (n + 1) / 2) as i64;
                    let want = encode(
                        dtype,
                        &(0..count)
                            .map(|i| i as i64 * tri * 4 / n as i64)
                            .collect::<Vec<_>>(),
                    );
                    for k in &sim.ranks {
                        assert_eq!(k.user, want);
                    }
                }
            }
        }
    }

    #[test]
    fn reduce_scatter_every_dtype() {
        for n in [1, 2, 3, 5] {
            for count in [0, 1, 6] {
                for dtype in DType::ALL {
                    for op in ops_for(dtype, n) {
                        let d = desc(Collective::ReduceScatter, dtype, op, count, 0);
                        let input = (0..n)
                            .map(|r| {
                                encode(
                                    dtype,
                                    &(0..count * n).map(|i| value(r, i)).collect::<Vec<_>>(),
                                )
                            })
                            .collect();
                        let user = vec![vec![0u8; count * dtype.size()]; n];
                        let mut sim = Sim::new(d, &config(8, 0), user, input, 5);
                        sim.drive_bounded(100_000)
                            .unwrap_or_else(|e| panic!("{d}: {e}"));
                        for (r, k) in sim.ranks.iter().enumerate() {
                            let want = encode(
                                dtype,
                                &(r * count..(r + 1) * count)
                                    .map(|i| expected(dtype, op, n, i))
                                    .collect::<Vec<_>>(),
                            );
                            assert_eq!(k.user, want, "{d} n={n} rank {r}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn allgather_and_broadcast() {
        for n in [1, 2, 3, 4, 5, 7, 8, 9] {
            for count in [0, 1, 5, 40] {
                let d = desc(Collective::AllGather, DType::I32, ReduceOp::Sum, count, 0);
                let input: Vec<Vec<u8>> = (0..n)
                    .map(|r| {
                        encode(
                            DType::I32,
                            &(0..count).map(|i| value(r, i)).collect::<Vec<_>>(),
                        )
                    })
                    .collect();
                let want: Vec<u8> = input.concat();
                let user = vec![vec![0u8; count * 4 * n]; n];
                let mut sim = Sim::new(d, &config(12, 0), user, input, 9);
                sim.drive_bounded(100_000).unwrap();
                for k in &sim.ranks {
                    assert_eq!(k.user, want);
                }
                for root in 0..n {
                    let d = desc(
                        Collective::Broadcast,
                        DType::F64,
                        ReduceOp::Sum,
                        count,
                        root,
                    );
                    let data = encode(
                        DType::F64,
                        &(0..count).map(|i| value(root, i)).collect::<Vec<_>>(),
                    );
                    let user: Vec<Vec<u8>> = (0..n)
                        .map(|r| {
                            if r == root {
                                data.clone()
                            } else {
                                vec![0u8; data.len()]
                            }
                        })
                        .collect();
                    // The binomial tree (small messages) must agree with the chain.
                    let mut tree = Sim::new(
                        d,
                        &config(16, usize::MAX),
                        user.clone(),
                        vec![Vec::new(); n],
                        root as u64,
                    );
                    tree.drive_bounded(100_000).unwrap();
                    for k in &tree.ranks {
                        assert_eq!(
                            k.user, data,
                            "tree broadcast n={n} root={root} count={count}"
                        );
                    }
                    let mut sim =
                        Sim::new(d, &config(16, 0), user, vec![Vec::new(); n], root as u64);
                    sim.drive_bounded(100_000).unwrap();
                    for k in &sim.ranks {
                        assert_eq!(k.user, data);
                    }
                }
            }
        }
    }

    #[test]
    fn barrier_completes_for_every_size() {
        for n in 1..=9 {
            let d = desc(Collective::Barrier, DType::U8, ReduceOp::Max, 0, 0);
            let mut sim = Sim::new(
                d,
                &config(64, 0),
                vec![Vec::new(); n],
                vec![Vec::new(); n],
                n as u64,
            );
            sim.drive_bounded(10_000).unwrap();
        }
    }

    #[test]
    fn random_floats_are_bitwise_identical_across_ranks() {
        let mut rng = Rng::new(42);
        for n in [3, 5, 8] {
            for small in [0, usize::MAX] {
                for dtype in [DType::F32, DType::BF16, DType::F16] {
                    let count = 101;
                    let user: Vec<Vec<u8>> = (0..n)
                        .map(|_| {
                            let vals: Vec<f32> = (0..count)
                                .map(|_| (rng.next_u64() % 2_000_000) as f32 / 1e3 - 1e3)
                                .collect();
                            match dtype {
                                DType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
                                DType::BF16 => vals
                                    .iter()
                                    .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
                                    .collect(),
                                _ => vals
                                    .iter()
                                    .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
                                    .collect(),
                            }
                        })
                        .collect();
                    for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Prod] {
                        let d = desc(Collective::AllReduce, dtype, op, count, 0);
                        let mut sim = Sim::new(
                            d,
                            &config(16, small),
                            user.clone(),
                            vec![Vec::new(); n],
                            rng.next_u64(),
                        );
                        sim.drive_bounded(1_000_000).unwrap();
                        for k in &sim.ranks[1..] {
                            assert_eq!(k.user, sim.ranks[0].user, "{d} n={n}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dead_rank_stalls_without_livelock() {
        // A rank that never speaks: the others cannot finish, and the simulator reports the
        // stall (the engine turns such stalls into timeouts).
        let n = 4;
        let d = desc(Collective::AllReduce, DType::F32, ReduceOp::Sum, 64, 0);
        let user = (0..n)
            .map(|r| {
                encode(
                    DType::F32,
                    &(0..64).map(|i| value(r, i)).collect::<Vec<_>>(),
                )
            })
            .collect();
        let mut sim = Sim::new(d, &config(16, 0), user, vec![Vec::new(); n], 1);
        sim.dead[2] = true;
        let err = sim.drive_bounded(100_000).unwrap_err();
        assert!(err.contains("no progress possible"), "{err}");
        assert!(err.contains("rank 3"), "{err}");
    }

    #[test]
    fn mismatched_counts_are_reported() {
        let n = 3;
        let mut descs = Vec::new();
        for r in 0..n {
            descs.push(desc(
                Collective::AllReduce,
                DType::F32,
                ReduceOp::Sum,
                if r == 1 { 9 } else { 10 },
                0,
            ));
        }
        // Build each rank with its own desc by hand.
        let cfg = config(8, 0);
        let mut ranks = Vec::new();
        for (r, d) in descs.iter().enumerate() {
            let mut u = vec![0u8; d.count * 4];
            // SAFETY: `u` moves into the SimRank beside `mem` and is never reallocated.
            let mut mem = OpMemory::new(unsafe { RawBuf::new(u.as_mut_ptr(), u.len()) });
            let schedule = crate::algo::plan::build(d, r, n, &cfg, &mut mem).unwrap();
            ranks.push(SimRank::new(schedule, mem, u, Vec::new()));
        }
        let mut sim = Sim::from_ranks(ranks, 5);
        let _ = sim.drive_bounded(10_000);
        let msgs: Vec<String> = sim
            .ranks
            .iter()
            .filter_map(|k| k.error.as_ref().map(|e| e.message.clone()))
            .collect();
        assert!(
            msgs.iter()
                .any(|m| m.contains("mismatched collective calls") && m.contains("9 x float32")),
            "{msgs:?}"
        );
    }

    // -- direct exchanges ------------------------------------------------------------------

    use crate::algo::exchange::{Exchange, ExchangePlan};

    /// One rank of a direct exchange: `input` and an output of `out_len` bytes filled with 0xEE.
    fn exchange_rank(
        d: OpDesc,
        chunk: usize,
        plan: ExchangePlan,
        input: Vec<u8>,
        out_len: usize,
    ) -> SimRank {
        let mut u = vec![0xEEu8; out_len];
        let mut i = input;
        // SAFETY: the vectors live in the SimRank beside the RawBufs and are never reallocated.
        let mut mem = OpMemory::new(unsafe { RawBuf::new(u.as_mut_ptr(), u.len()) });
        mem.input = unsafe { RawBuf::new(i.as_mut_ptr(), i.len()) };
        let schedule = Box::new(Exchange::new(d, chunk, plan, &mut mem));
        SimRank::new(schedule, mem, u, i)
    }

    /// Element `i` of what rank `from` sends rank `to`: distinct per pair and position.
    fn pair_value(from: usize, to: usize, i: usize) -> i64 {
        (from * 100 + to * 10 + i) as i64 % 120
    }

    fn drive_ok(sim: &mut Sim, what: &str) {
        sim.drive_bounded(1_000_000)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        for (r, k) in sim.ranks.iter().enumerate() {
            assert!(k.error.is_none(), "{what}: rank {r}: {:?}", k.error);
        }
    }

    #[test]
    fn gather_and_scatter_every_root_and_size() {
        let t = DType::I32;
        for n in 1..=5 {
            for root in 0..n {
                for count in [0usize, 1, 5] {
                    for chunk in [4usize, 8, 1 << 16] {
                        let bytes = count * t.size();
                        let g = desc(Collective::Gather, t, ReduceOp::Sum, count, root);
                        let ranks = (0..n)
                            .map(|r| {
                                let input = encode(
                                    t,
                                    &(0..count)
                                        .map(|i| pair_value(r, root, i))
                                        .collect::<Vec<_>>(),
                                );
                                let out = if r == root { bytes * n } else { 0 };
                                exchange_rank(
                                    g,
                                    chunk,
                                    ExchangePlan::gather(r, n, bytes, root),
                                    input,
                                    out,
                                )
                            })
                            .collect();
                        let mut sim = Sim::from_ranks(ranks, (n * 31 + root * 7 + count) as u64);
                        let what = format!("gather n={n} root={root} count={count} chunk={chunk}");
                        drive_ok(&mut sim, &what);
                        let want: Vec<i64> = (0..n)
                            .flat_map(|r| (0..count).map(move |i| pair_value(r, root, i)))
                            .collect();
                        assert_eq!(sim.ranks[root].user, encode(t, &want), "{what}");

                        let sc = desc(Collective::Scatter, t, ReduceOp::Sum, count, root);
                        let ranks = (0..n)
                            .map(|r| {
                                let input = if r == root {
                                    encode(
                                        t,
                                        &(0..n)
                                            .flat_map(|p| {
                                                (0..count).map(move |i| pair_value(root, p, i))
                                            })
                                            .collect::<Vec<_>>(),
                                    )
                                } else {
                                    Vec::new()
                                };
                                exchange_rank(
                                    sc,
                                    chunk,
                                    ExchangePlan::scatter(r, n, bytes, root),
                                    input,
                                    bytes,
                                )
                            })
                            .collect();
                        let mut sim = Sim::from_ranks(ranks, (n * 17 + root + count) as u64);
                        let what = format!("scatter n={n} root={root} count={count} chunk={chunk}");
                        drive_ok(&mut sim, &what);
                        for r in 0..n {
                            let want: Vec<i64> =
                                (0..count).map(|i| pair_value(root, r, i)).collect();
                            assert_eq!(sim.ranks[r].user, encode(t, &want), "{what}: rank {r}");
                        }
                    }
                }
            }
        }
    }

    /// Uneven all-to-all-v splits (zeros included): rank r sends rank p `split(r, p)` elements.
    fn split(r: usize, p: usize) -> usize {
        (r * 3 + p * 2 + 1) % 5
    }

    fn packed_displs(counts: &[usize]) -> Vec<usize> {
        counts
            .iter()
            .scan(0, |acc, &c| {
                let d = *acc;
                *acc += c;
                Some(d)
            })
            .collect()
    }

    #[test]
    fn alltoall_and_alltoallv_uneven_splits() {
        for t in [DType::F32, DType::I64, DType::BF16, DType::U8] {
            for n in 1..=5 {
                for chunk in [2usize, 8, 1 << 16] {
                    // all-to-all-v with gaps between the receive ranges (displacements spread).
                    let d = desc(Collective::AllToAllV, t, ReduceOp::Sum, 0, 0);
                    let ranks = (0..n)
                        .map(|r| {
                            let sc: Vec<usize> = (0..n).map(|p| split(r, p)).collect();
                            let sd = packed_displs(&sc);
                            let rc: Vec<usize> = (0..n).map(|p| split(p, r)).collect();
                            let rd: Vec<usize> = packed_displs(&rc)
                                .iter()
                                .enumerate()
                                .map(|(p, &x)| x + p)
                                .collect();
                            let input: Vec<i64> = (0..n)
                                .flat_map(|p| (0..split(r, p)).map(move |i| pair_value(r, p, i)))
                                .collect();
                            let out = rd[n - 1] + rc[n - 1];
                            let plan = ExchangePlan::alltoallv(r, n, t.size(), &sc, &sd, &rc, &rd);
                            exchange_rank(d, chunk, plan, encode(t, &input), out * t.size())
                        })
                        .collect();
                    let mut sim = Sim::from_ranks(ranks, (n * 13 + chunk) as u64);
                    let what = format!("alltoallv {t} n={n} chunk={chunk}");
                    drive_ok(&mut sim, &what);
                    for r in 0..n {
                        let rc: Vec<usize> = (0..n).map(|p| split(p, r)).collect();
                        let rd: Vec<usize> = packed_displs(&rc)
                            .iter()
                            .enumerate()
                            .map(|(p, &x)| x + p)
                            .collect();
                        let e = t.size();
                        for p in 0..n {
                            let want = encode(
                                t,
                                &(0..rc[p]).map(|i| pair_value(p, r, i)).collect::<Vec<_>>(),
                            );
                            assert_eq!(
                                &sim.ranks[r].user[rd[p] * e..(rd[p] + rc[p]) * e],
                                &want[..],
                                "{what}: rank {r} from {p}"
                            );
                            // The gap after each range is untouched.
                            if rc[p] > 0 || p > 0 {
                                let gap = (rd[p] + rc[p]) * e;
                                if p + 1 < n {
                                    assert!(
                                        sim.ranks[r].user[gap..gap + e].iter().all(|&b| b == 0xEE),
                                        "{what}: gap"
                                    );
                                }
                            }
                        }
                    }
                    // all-to-all: equal blocks.
                    let count = 3;
                    let d = desc(Collective::AllToAll, t, ReduceOp::Sum, count, 0);
                    let counts = vec![count; n];
                    let displs: Vec<usize> = (0..n).map(|p| p * count).collect();
                    let ranks = (0..n)
                        .map(|r| {
                            let input: Vec<i64> = (0..n)
                                .flat_map(|p| (0..count).map(move |i| pair_value(r, p, i)))
                                .collect();
                            let plan = ExchangePlan::alltoallv(
                                r,
                                n,
                                t.size(),
                                &counts,
                                &displs,
                                &counts,
                                &displs,
                            );
                            exchange_rank(d, chunk, plan, encode(t, &input), n * count * t.size())
                        })
                        .collect();
                    let mut sim = Sim::from_ranks(ranks, (n + chunk) as u64);
                    drive_ok(&mut sim, &format!("alltoall {t} n={n}"));
                    for r in 0..n {
                        let want: Vec<i64> = (0..n)
                            .flat_map(|p| (0..count).map(move |i| pair_value(p, r, i)))
                            .collect();
                        assert_eq!(
                            sim.ranks[r].user,
                            encode(t, &want),
                            "alltoall {t} n={n} rank {r}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn exchange_mismatches_are_reported() {
        let t = DType::F32;
        let n = 3;
        // Rank 2 expects 4 elements from rank 0, which sends 3.
        let d = desc(Collective::AllToAllV, t, ReduceOp::Sum, 0, 0);
        let ranks = (0..n)
            .map(|r| {
                let sc = vec![3usize; n];
                let mut rc = vec![3usize; n];
                if r == 2 {
                    rc[0] = 4;
                }
                let sd = packed_displs(&sc);
                let rd = packed_displs(&rc);
                let plan = ExchangePlan::alltoallv(r, n, 4, &sc, &sd, &rc, &rd);
                exchange_rank(
                    d,
                    1 << 16,
                    plan,
                    vec![0; 9 * 4],
                    rc.iter().sum::<usize>() * 4,
                )
            })
            .collect();
        let mut sim = Sim::from_ranks(ranks, 3);
        let _ = sim.drive_bounded(100_000);
        let err = sim.ranks[2]
            .error
            .as_ref()
            .expect("rank 2 fails")
            .message
            .clone();
        assert!(
            err.contains("rank 0 sends 3 x float32") && err.contains("expects 4"),
            "{err}"
        );

        // Ranks 0 and 1 gather to root 1, rank 2 to root 0: rank 0 gets data it does not expect.
        // (Where no frame arrives at all, as when only the root disagrees, the op stalls and
        // the engine's timeout names the silent ranks.)
        let ranks = (0..n)
            .map(|r| {
                let root = usize::from(r != 2);
                let g = desc(Collective::Gather, t, ReduceOp::Sum, 2, root);
                let out = if r == root { 2 * 4 * n } else { 0 };
                exchange_rank(
                    g,
                    1 << 16,
                    ExchangePlan::gather(r, n, 8, root),
                    vec![0; 8],
                    out,
                )
            })
            .collect();
        let mut sim = Sim::from_ranks(ranks, 4);
        let _ = sim.drive_bounded(100_000);
        let msgs: Vec<String> = sim
            .ranks
            .iter()
            .filter_map(|k| k.error.as_ref().map(|e| e.message.clone()))
            .collect();
        assert!(
            msgs.iter()
                .any(|m| m.contains("root 1") || m.contains("unexpected data")),
            "{msgs:?}"
        );
    }

    // -- point-to-point groups -------------------------------------------------------------

    /// Every rank sends every other rank two messages (tags 1 and 2, different counts, one of
    /// them empty) in one group and receives theirs; `bad_tag` makes rank 1 expect another tag
    /// from rank 0.
    fn p2p_sim(n: usize, chunk: usize, bad_tag: bool, seed: u64) -> Sim {
        use crate::algo::p2p::{Message, PointToPoint};
        let t = DType::I32;
        let counts = |from: usize, to: usize| [(from + to) % 3, 2 * chunk / 4 + from + 1];
        let ranks = (0..n)
            .map(|r| {
                let mut mem = OpMemory::new(RawBuf::empty());
                let mut owned: Vec<Vec<u8>> = Vec::new();
                let (mut sends, mut recvs) = (Vec::new(), Vec::new());
                for p in (0..n).filter(|&p| p != r) {
                    for (k, tag) in [1u32, 2].into_iter().enumerate() {
                        let c = counts(r, p)[k];
                        let mut v = encode(
                            t,
                            &(0..c).map(|i| pair_value(r, p, i + k)).collect::<Vec<_>>(),
                        );
                        // SAFETY: `owned` keeps every vector alive (heap blocks do not move).
                        mem.buffers
                            .push(unsafe { RawBuf::new(v.as_mut_ptr(), v.len()) });
                        owned.push(v);
                        let seq = k as u64 + 1;
                        sends.push(Message {
                            peer: p,
                            tag,
                            seq,
                            dtype: t,
                            count: c,
                            buffer: mem.buffers.len() - 1,
                        });
                        let c = counts(p, r)[k];
                        let mut v = vec![0xEEu8; c * t.size()];
                        // SAFETY: `owned` keeps every vector alive (heap blocks do not move).
                        mem.buffers
                            .push(unsafe { RawBuf::new(v.as_mut_ptr(), v.len()) });
                        owned.push(v);
                        let tag = if bad_tag && r == 1 && p == 0 && tag == 2 {
                            9
                        } else {
                            tag
                        };
                        recvs.push(Message {
                            peer: p,
                            tag,
                            seq,
                            dtype: t,
                            count: c,
                            buffer: mem.buffers.len() - 1,
                        });
                    }
                }
                let d = desc(
                    Collective::PointToPoint,
                    t,
                    ReduceOp::Sum,
                    sends.len() + recvs.len(),
                    0,
                );
                let schedule = Box::new(PointToPoint::new(d, chunk, sends, recvs));
                // The vectors ride along in `input` storage: flatten ownership into one list.
                let keep: Vec<u8> = Vec::new();
                std::mem::forget(owned); // freed with the process; test-only
                SimRank::new(schedule, mem, keep, Vec::new())
            })
            .collect();
        Sim::from_ranks(ranks, seed)
    }

    #[test]
    fn point_to_point_groups_deliver_every_message() {
        for n in 2..=5 {
            for chunk in [4usize, 12, 1 << 16] {
                let mut sim = p2p_sim(n, chunk, false, (n * 7 + chunk) as u64);
                drive_ok(&mut sim, &format!("p2p n={n} chunk={chunk}"));
                for r in 0..n {
                    let mem = &sim.ranks[r].mem;
                    let mut b = 0;
                    for p in (0..n).filter(|&p| p != r) {
                        for k in 0..2 {
                            let c = [(p + r) % 3, 2 * chunk / 4 + p + 1][k];
                            let want = encode(
                                DType::I32,
                                &(0..c).map(|i| pair_value(p, r, i + k)).collect::<Vec<_>>(),
                            );
                            // Buffers alternate send, recv.
                            assert_eq!(
                                mem.buffers[b + 1].as_slice(),
                                &want[..],
                                "n={n} rank {r} from {p} msg {k}"
                            );
                            b += 2;
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn point_to_point_tag_mismatch_is_reported() {
        let mut sim = p2p_sim(3, 8, true, 11);
        let _ = sim.drive_bounded(100_000);
        let err = sim.ranks[1]
            .error
            .as_ref()
            .expect("rank 1 fails")
            .message
            .clone();
        assert!(
            err.contains("mismatched send/recv: rank 0 sent")
                && err.contains("with tag 2")
                && err.contains("with tag 9"),
            "{err}"
        );
    }

    // -- relays ----------------------------------------------------------------------------

    use crate::algo::relay::{RelaySchedule, AUX_LOST};
    use crate::buffer::Scratch;
    use crate::compress::INT8_BLOCK;

    fn relay_desc(coll: Collective, count: usize, root: usize, seq: u64) -> OpDesc {
        OpDesc {
            seq,
            ..desc(coll, DType::I32, ReduceOp::Sum, count, root)
        }
    }

    /// A relay schedule on `mem` (64-byte chunks, two in flight per lane).
    fn relay_schedule(
        d: OpDesc,
        r: usize,
        world: usize,
        nrelays: usize,
        weights: &[u64],
    ) -> Box<dyn Schedule> {
        let ids: Vec<usize> = (0..nrelays).collect();
        Box::new(RelaySchedule::new(
            d,
            r,
            world,
            &ids,
            weights,
            SIM_RELAY_CHUNK,
            2,
        ))
    }

    fn relay_rank(d: OpDesc, r: usize, world: usize, nrelays: usize, mut buf: Vec<u8>) -> SimRank {
        // SAFETY: `buf` moves into the SimRank beside `mem` and is never reallocated.
        let mem = OpMemory::new(unsafe { RawBuf::new(buf.as_mut_ptr(), buf.len()) });
        SimRank::new(
            relay_schedule(d, r, world, nrelays, &[]),
            mem,
            buf,
            Vec::new(),
        )
    }

    fn relay_sim(d: OpDesc, nrelays: usize, inputs: Vec<Vec<u8>>, seed: u64) -> Sim {
        let world = inputs.len();
        let ranks = inputs
            .into_iter()
            .enumerate()
            .map(|(r, buf)| relay_rank(d, r, world, nrelays, buf))
            .collect();
        Sim::from_ranks(ranks, seed).with_relays(nrelays)
    }

    fn int_input(r: usize, count: usize, op: usize) -> Vec<u8> {
        (0..count)
            .flat_map(|i| ((i * 7 + r * 1000 + op * 13) as i32).to_le_bytes())
            .collect()
    }

    fn int_sum(world: usize, count: usize, op: usize) -> Vec<u8> {
        (0..count)
            .flat_map(|i| {
                (0..world)
                    .map(|r| (i * 7 + r * 1000 + op * 13) as i32)
                    .sum::<i32>()
                    .to_le_bytes()
            })
            .collect()
    }

    fn int_inputs(world: usize, count: usize) -> Vec<Vec<u8>> {
        (0..world).map(|r| int_input(r, count, 0)).collect()
    }

    fn check_sum(sim: &Sim, count: usize) {
        let want = int_sum(sim.ranks.len(), count, 0);
        for (p, k) in sim.ranks.iter().enumerate() {
            assert!(k.error.is_none(), "rank {p}: {:?}", k.error);
            assert_eq!(k.user, want, "rank {p}");
        }
    }

    /// Whether any rank sent a ring frame to another (a relay op that fell back); notices
    /// carry `aux` at the top of the range.
    fn fell_back(sim: &Sim) -> bool {
        sim.sent.iter().any(|(from, to, h)| {
            matches!((from, to), (Endpoint::Rank(_), Endpoint::Rank(_))) && h.aux < AUX_LOST
        })
    }

    fn drive_relays(sim: &mut Sim) {
        if let Err(e) = sim.drive_bounded(400_000) {
            let errs: Vec<_> = sim.ranks.iter().map(|k| k.error.clone()).collect();
            panic!("{e}; errors {errs:?}");
        }
    }

    /// Drive a job whose relays only die (connections break, nothing stalls): no timer may
    /// be what finishes it, so the virtual clock never moves and no relay is dropped for
    /// silence. (A schedule that forgot a chunk would otherwise be rescued by the stall rule.)
    fn drive_relays_without_timers(sim: &mut Sim) {
        drive_relays(sim);
        assert_eq!(sim.now, Duration::ZERO, "a timer was needed to finish");
        for (p, k) in sim.ranks.iter().enumerate() {
            assert!(k.error.is_none(), "rank {p}: {:?}", k.error);
            for (relay, _, why) in &k.relay_drops {
                assert!(
                    why.contains("connection closed") || why.contains("reported lost"),
                    "rank {p} relay {relay}: {why}"
                );
            }
        }
    }

    /// (seed, world, relays, kills as (step, relay), notification spread): whether the op
    /// fell back to the ring.
    fn run_relay_allreduce(
        seed: u64,
        world: usize,
        nrelays: usize,
        kills: &[(usize, usize)],
        spread: usize,
    ) -> bool {
        let count = 300;
        let d = relay_desc(Collective::AllReduce, count, 0, 1);
        let mut sim = relay_sim(d, nrelays, int_inputs(world, count), seed);
        for &(at, k) in kills {
            sim.kill_relay(k, at, spread);
        }
        drive_relays_without_timers(&mut sim);
        check_sum(&sim, count);
        fell_back(&sim)
    }

    /// A relay lost after every peer holds every result (and said so) changes nothing: the
    /// op stays complete and no notice goes out, since the other peers may have left already.
    /// (Chaos trials caught a peer failing with "rank 0 has left the job" here.)
    #[test]
    fn a_relay_lost_after_the_op_completed_sends_nothing() {
        let count = 300;
        let d = relay_desc(Collective::AllReduce, count, 0, 1);
        let mut sim = relay_sim(d, 3, int_inputs(3, count), 5);
        drive_relays_without_timers(&mut sim);
        check_sum(&sim, count);
        for (p, k) in sim.ranks.iter_mut().enumerate() {
            k.schedule
                .handle_endpoint_lost(&mut k.mem, Endpoint::Relay(1), Error::remote("gone"))
                .unwrap();
            assert!(k.schedule.is_complete(), "rank {p} is no longer complete");
            assert!(
                k.schedule.poll_transmit(&mut k.mem).is_none(),
                "rank {p} sends after its op completed"
            );
        }
        check_sum(&sim, count);
    }

    /// A compressed all-reduce through relays lost at any moment (or all of them, then the
    /// compressed ring): every peer ends with the same bits, within the bound of the path.
    #[test]
    fn compressed_relay_allreduce_survives_lost_relays_with_identical_bits() {
        let (world, count) = (3, 5 * INT8_BLOCK + 33);
        let val = |r: usize, i: usize| ((i * 7 + r * 5) % 23) as f32 * 0.25 - 2.0;
        for z in [Compression::Bf16, Compression::Int8] {
            for seed in 0..24u64 {
                let mut d = relay_desc(Collective::AllReduce, count, 0, 1);
                d.dtype = DType::F32;
                d.compress = z;
                let inputs: Vec<Vec<u8>> = (0..world)
                    .map(|r| (0..count).flat_map(|i| val(r, i).to_le_bytes()).collect())
                    .collect();
                let mut sim = relay_sim(d, 3, inputs, seed);
                let at = (seed as usize * 5) % 40;
                let kills: Vec<(usize, usize)> = match seed % 3 {
                    0 => vec![],
                    1 => vec![(at, 1)],
                    _ => vec![(at, 0), (at + 2, 1), (at + 4, 2)],
                };
                for &(at, k) in &kills {
                    sim.kill_relay(k, at, 10);
                }
                drive_relays_without_timers(&mut sim);
                for p in 1..world {
                    assert_eq!(
                        sim.ranks[p].user, sim.ranks[0].user,
                        "{z} seed {seed}: rank {p} differs"
                    );
                }
                // Relay path: 3 inputs and the sum encoded; ring: 3 partial sums.
                let tol = match z {
                    Compression::Int8 => 4.0 * 2.0 * 7.0 / 255.0 * 1.01,
                    _ => 4.0 * 7.0 / 256.0,
                };
                for (i, b) in sim.ranks[0].user.chunks_exact(4).enumerate() {
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
    fn relay_allreduce_without_failures() {
        for seed in 0..20 {
            assert!(!run_relay_allreduce(seed, 3, 3, &[], 1));
        }
        // One rank: no peer to fall back with, and nothing to fall back from.
        assert!(!run_relay_allreduce(1, 1, 2, &[], 1));
    }

    #[test]
    fn relay_allreduce_survives_a_relay_lost_at_any_moment() {
        for seed in 0..60 {
            let at = (seed as usize * 7) % 120;
            let fell = run_relay_allreduce(
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
    fn relay_allreduce_survives_relays_lost_in_different_orders() {
        let count = 300;
        let mut differing = 0;
        for seed in 0..60 {
            let a = (seed as usize * 5) % 100;
            let b = 1 + (seed as usize * 11) % 100;
            let d = relay_desc(Collective::AllReduce, count, 0, 1);
            let mut sim = relay_sim(d, 4, int_inputs(4, count), seed);
            // Peers learn of the two losses over a long spread, so in differing orders.
            sim.kill_relay(1, a, 60);
            sim.kill_relay(3, b, 60);
            drive_relays_without_timers(&mut sim);
            check_sum(&sim, count);
            let orders: Vec<Vec<usize>> = sim
                .ranks
                .iter()
                .map(|k| k.relay_drops.iter().map(|d| d.0).collect())
                .collect();
            for (p, o) in orders.iter().enumerate() {
                let mut seen = o.clone();
                seen.sort_unstable();
                assert_eq!(seen, vec![1, 3], "seed {seed} rank {p}: {o:?}");
            }
            if orders.iter().any(|o| o != &orders[0]) {
                differing += 1;
            }
        }
        assert!(
            differing > 10,
            "ranks learned of the losses in one order ({differing} seeds)"
        );
    }

    /// A backup left in the op's memory by an earlier op holds stale bytes: fail-over must
    /// only read what this op copied into it, and the op uses that backup (no fresh one).
    #[test]
    fn a_reused_backup_never_leaks_stale_bytes() {
        let count = 300;
        let mut saved = 0;
        for seed in 0..20 {
            let d = relay_desc(Collective::AllReduce, count, 0, 1);
            let mut sim = relay_sim(d, 2, int_inputs(3, count), seed);
            let mut planted = Vec::new();
            for k in &mut sim.ranks {
                let mut stale = Scratch::zeroed(4096).unwrap();
                stale.as_mut_slice().fill(0xA5);
                planted.push(stale.as_slice().as_ptr());
                k.mem.backup = Some(stale);
            }
            let at = (seed as usize * 7) % 80;
            sim.kill_relay(0, at, 10);
            sim.kill_relay(1, at + 3, 10);
            drive_relays_without_timers(&mut sim);
            check_sum(&sim, count);
            for (k, &p) in sim.ranks.iter().zip(&planted) {
                let b = k
                    .mem
                    .backup
                    .as_ref()
                    .expect("the backup stays in the op's memory");
                assert_eq!(
                    b.as_slice().as_ptr(),
                    p,
                    "seed {seed}: a fresh backup was made"
                );
                // Whatever this op saved went into the planted buffer.
                if b.as_slice()[..count * 4].iter().any(|&x| x != 0xA5) {
                    saved += 1;
                }
            }
        }
        assert!(saved > 0, "no run saved an input into the backup");
    }

    /// The progress loop hands an op's backup to the next op: the buffer planted before op
    /// 1 is still the op's backup after op 2, and holds what op 2 saved (its own inputs).
    #[test]
    fn the_backup_is_handed_from_op_to_op() {
        let (world, count) = (3, 600);
        let mut sim = relay_job(world, 2, count, 2, 3);
        let mut planted = Vec::new();
        for k in &mut sim.ranks {
            let b = Scratch::zeroed(count * 4).unwrap();
            planted.push(b.as_slice().as_ptr());
            k.mem.backup = Some(b);
        }
        drive_relays(&mut sim);
        check_job(&sim, count, 2);
        for (r, k) in sim.ranks.iter().enumerate() {
            let b = k.mem.backup.as_ref().expect("the backup outlives the ops");
            assert_eq!(
                b.as_slice().as_ptr(),
                planted[r],
                "rank {r}: a fresh backup was made"
            );
            assert_eq!(
                &b.as_slice()[..count * 4],
                &int_input(r, count, 1)[..],
                "rank {r}"
            );
        }
    }

    #[test]
    fn relay_allreduce_falls_back_to_the_ring_when_every_relay_is_lost() {
        let mut fell = 0;
        for seed in 0..40 {
            let at = (seed as usize * 3) % 60;
            if run_relay_allreduce(seed, 3, 2, &[(at, 0), (at + seed as usize % 5, 1)], 30) {
                fell += 1;
            }
        }
        assert!(
            fell > 20,
            "most runs lose relays before all results arrive ({fell})"
        );
    }

    #[test]
    fn relay_broadcast_survives_a_lost_relay_and_falls_back_when_none_is_left() {
        let count = 300;
        for seed in 0..40 {
            let world = 3;
            let root = seed as usize % world;
            let d = relay_desc(Collective::Broadcast, count, root, 1);
            let data: Vec<Vec<u8>> = (0..world)
                .map(|r| {
                    (0..count)
                        .flat_map(|i| (if r == root { i as i32 * 3 } else { -1 }).to_le_bytes())
                        .collect()
                })
                .collect();
            let mut sim = relay_sim(d, 2, data, seed);
            let at = (seed as usize * 7) % 50;
            if seed % 2 == 0 {
                sim.kill_relay(1, at, 20);
            } else {
                sim.kill_relay(0, at, 20);
                sim.kill_relay(1, at + 3, 20);
            }
            drive_relays_without_timers(&mut sim);
            let want: Vec<u8> = (0..count)
                .flat_map(|i| (i as i32 * 3).to_le_bytes())
                .collect();
            for (p, k) in sim.ranks.iter().enumerate() {
                assert!(k.error.is_none(), "seed {seed} rank {p}: {:?}", k.error);
                assert_eq!(k.user, want, "seed {seed} rank {p}");
            }
        }
    }

    // -- time: stalls, timeouts, rates, ops in sequence ----------------------------------

    const MB: u64 = 1_000_000;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A relay that stops answering (its connection stays open) is dropped by every rank once
    /// it has been silent for the stall bound while another relay answers; its chunks are
    /// redone through the others and the op completes without the ring.
    #[test]
    fn a_stalled_relay_is_dropped_after_the_stall_bound_of_virtual_time() {
        let (world, count) = (3, 3000);
        for seed in 0..6 {
            let d = relay_desc(Collective::AllReduce, count, 0, 1);
            let mut sim = relay_sim(d, 3, int_inputs(world, count), seed);
            sim.set_timeout(Duration::from_secs(10));
            sim.latency = Duration::from_micros(100);
            for relay in &mut sim.relays {
                relay.rate = Some(10 * MB);
            }
            let stall_from = Duration::from_micros(700);
            sim.relays[1].stall_from = Some(stall_from);
            drive_relays(&mut sim);
            check_sum(&sim, count);
            assert!(!fell_back(&sim), "seed {seed}: two relays remain");
            let bound = crate::policy::relays::relay_stall(Duration::from_secs(10));
            assert_eq!(bound, Duration::from_secs(5));
            for (p, k) in sim.ranks.iter().enumerate() {
                let [(relay, at, why)] = k.relay_drops.as_slice() else {
                    panic!("seed {seed} rank {p}: drops {:?}", k.relay_drops);
                };
                assert_eq!(*relay, 1);
                assert!(why.contains("stalled"), "{why}");
                // Last heard before the stall (answers in flight may still arrive after it),
                // dropped exactly one stall bound later.
                assert!(
                    *at >= bound && *at <= stall_from + sim.latency * 2 + ms(2) + bound,
                    "seed {seed} rank {p}: dropped at {at:?}"
                );
                let (start, end) = k.op_times[0];
                assert_eq!(start, Duration::ZERO);
                assert!(end > *at, "the op ends after the drop");
            }
        }
    }

    /// When every relay the op waits on is silent the cause may as well be a slow peer: no
    /// relay is dropped, and the op times out after the op timeout.
    #[test]
    fn when_every_relay_stalls_none_is_dropped_and_the_op_times_out() {
        let (world, count) = (3, 600);
        let d = relay_desc(Collective::AllReduce, count, 0, 1);
        let mut sim = relay_sim(d, 2, int_inputs(world, count), 7);
        sim.set_timeout(Duration::from_secs(10));
        for relay in &mut sim.relays {
            relay.stall_from = Some(Duration::ZERO);
        }
        let err = sim.drive_bounded(100_000).unwrap_err();
        assert!(err.contains("no progress possible"), "{err}");
        for (p, k) in sim.ranks.iter().enumerate() {
            assert!(k.relay_drops.is_empty(), "rank {p}: {:?}", k.relay_drops);
            let e = k.error.as_ref().expect("timed out");
            assert_eq!(e.kind, crate::error::ErrorKind::Timeout, "rank {p}: {e}");
        }
        assert_eq!(sim.now, Duration::from_secs(10));
    }

    /// Ranks that run `ops` relay all-reduces of `count` elements one after another (op k
    /// sums inputs offset by k).
    fn relay_job(world: usize, nrelays: usize, count: usize, ops: usize, seed: u64) -> Sim {
        let d = relay_desc(Collective::AllReduce, count, 0, 1);
        let inputs = (0..world).map(|r| int_input(r, count, 0)).collect();
        let mut sim = relay_sim(d, nrelays, inputs, seed);
        for (r, k) in sim.ranks.iter_mut().enumerate() {
            for op in 1..ops {
                let d = relay_desc(Collective::AllReduce, count, 0, op as u64 + 1);
                k.then(
                    int_input(r, count, op),
                    Box::new(move |w: &[u64], _mem: &mut OpMemory| {
                        relay_schedule(d, r, world, nrelays, w)
                    }),
                );
            }
        }
        sim
    }

    fn check_job(sim: &Sim, count: usize, ops: usize) {
        let world = sim.ranks.len();
        for (p, k) in sim.ranks.iter().enumerate() {
            assert!(k.error.is_none(), "rank {p}: {:?}", k.error);
            assert_eq!(k.results.len(), ops - 1, "rank {p}");
            for (op, got) in k.results.iter().chain([&k.user]).enumerate() {
                assert_eq!(*got, int_sum(world, count, op), "rank {p} op {op}");
            }
        }
    }

    /// Relay frames sent in op `seq` to relay `k`.
    fn frames_to(sim: &Sim, k: usize, seq: u64) -> usize {
        sim.sent
            .iter()
            .filter(|(_, to, h)| *to == Endpoint::Relay(k) && h.seq == seq)
            .count()
    }

    /// The ranks measure each relay's throughput in virtual time; the next op splits the
    /// buffer by those rates, so a relay four times slower gets about a fifth of it, and the
    /// op takes less time than the evenly split one.
    #[test]
    fn a_slow_relay_gets_a_smaller_segment_in_later_ops() {
        let (world, count) = (2, 8192);
        let mut sim = relay_job(world, 2, count, 3, 11);
        // No delay on the links, so the relays' rates are what limits the op.
        sim.relays[0].rate = Some(40 * MB);
        sim.relays[1].rate = Some(10 * MB);
        drive_relays(&mut sim);
        check_job(&sim, count, 3);
        let w = sim.weights.get(&1).expect("weights of op 2").clone();
        assert_eq!(w.len(), 2);
        let ratio = w[0] as f64 / w[1] as f64;
        assert!((3.0..5.0).contains(&ratio), "weights {w:?}");
        assert_eq!(frames_to(&sim, 0, 1), frames_to(&sim, 1, 1));
        let (slow, fast) = (frames_to(&sim, 1, 2), frames_to(&sim, 0, 2));
        assert!(
            slow * 3 < fast,
            "op 2: {slow} frames to the slow relay, {fast} to the fast"
        );
        for k in &sim.ranks {
            let took = |op: usize| k.op_times[op].1 - k.op_times[op].0;
            assert!(
                took(1).as_secs_f64() < took(0).as_secs_f64() * 0.8,
                "{:?}",
                k.op_times
            );
            // Rates are kept per rank, smoothed over ops: the slow relay stays slow.
            assert!(k.rates[0] > 3 * k.rates[1], "rates {:?}", k.rates);
        }
    }

    /// A relay lost during op 1 is left out of op 2 from its start on every rank: nothing
    /// is sent to it, and op 2 completes through the others.
    #[test]
    fn a_relay_lost_in_one_op_is_left_out_of_the_next() {
        let (world, count) = (3, 600);
        for seed in 0..10 {
            let mut sim = relay_job(world, 3, count, 2, seed);
            sim.kill_relay(1, 20 + seed as usize * 3, 5);
            drive_relays(&mut sim);
            check_job(&sim, count, 2);
            assert!(frames_to(&sim, 1, 1) > 0);
            assert_eq!(
                frames_to(&sim, 1, 2),
                0,
                "seed {seed}: op 2 used the lost relay"
            );
            assert!(frames_to(&sim, 0, 2) > 0 && frames_to(&sim, 2, 2) > 0);
            assert!(!fell_back(&sim));
            for k in &sim.ranks {
                assert_eq!(k.relay_drops.len(), 1, "{:?}", k.relay_drops);
            }
        }
    }

    /// Ranks are not in step: frames of op 2 that reach a rank still in op 1 wait for op 2
    /// there (parked), and both ops complete with the right sums.
    #[test]
    fn frames_of_an_op_not_started_here_wait_for_it() {
        let (n, count) = (3, 200);
        let cfg = config(16, 0);
        let mut parked = 0;
        for seed in 0..20 {
            let d = desc(Collective::AllReduce, DType::I32, ReduceOp::Sum, count, 0);
            let user = (0..n).map(|r| int_input(r, count, 0)).collect();
            let mut sim = Sim::new(d, &cfg, user, vec![Vec::new(); n], seed);
            for (r, k) in sim.ranks.iter_mut().enumerate() {
                let d2 = OpDesc { seq: 2, ..d };
                let cfg = cfg.clone();
                k.then(
                    int_input(r, count, 1),
                    Box::new(move |_w: &[u64], mem: &mut OpMemory| {
                        crate::algo::plan::build(&d2, r, n, &cfg, mem).expect("build")
                    }),
                );
            }
            sim.drive_bounded(1_000_000).unwrap();
            check_job(&sim, count, 2);
            parked += sim.parked;
        }
        assert!(parked > 0, "no frame ever arrived ahead of its op");
    }
}

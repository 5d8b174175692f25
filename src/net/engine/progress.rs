//! The progress loop: one thread per communicator that owns every socket, moves bytes between
//! them and the current op's schedule, and feeds events and the time to the sans-IO policy
//! ([`crate::policy`]): which op a frame belongs to, when a relay has stalled, when an op has
//! timed out, what a relay's throughput was.
//!
//! Rules it keeps (see mio's "draining readiness"): reads and writes go until `WouldBlock`;
//! spurious wake-ups are normal; writes are tried inline first and resumed on `WRITABLE`,
//! which is watched only while frames are queued. It sleeps until the next event or the
//! earliest deadline the policy or the pacer names, never longer.

use super::conn::{
    rank_gone, read_error, read_some, tcp_min_rtt_us, wire_len, Conn, OutFrame, ReadEvent,
    ReadState, Sink,
};
use super::{Command, Completion, Done, RelayLinks, RelayRates, Submission, Transport};
use crate::algo::{Collective, Endpoint, OpDesc, Schedule, Transmit};
use crate::buffer::{OpMemory, Region};
use crate::error::{Error, ErrorKind, Result};
use crate::net::conn::{self, FrameIn, FrameOut};
use crate::net::shm::{self, Segment};
use crate::policy::relays::{relays_of, smooth_rate, RateSample, RelayHealth};
use crate::policy::sequence::{CurrentOp, Report, Route, Sequencer};
use crate::wire::{FrameHeader, FrameKind, PayloadDigest, HEADER_LEN};
use crossbeam_channel::Receiver;
use mio::{Events, Poll, Token};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) const WAKER: Token = Token(usize::MAX);

/// The op this rank is running now.
pub(super) struct RunningOp {
    pub schedule: Box<dyn Schedule>,
    pub mem: OpMemory,
    pub done: Done,
    /// Payload digests of the frames that landed in place, by region ([`landed_key`]): a
    /// [`Transmit::forward`] of the same bytes is tagged from its digest, not hashed again.
    pub landed: HashMap<(u8, usize, usize), PayloadDigest>,
}

/// The key of a region frames land in place in and are forwarded from.
fn landed_key(r: &Region) -> Option<(u8, usize, usize)> {
    match *r {
        Region::User { offset, len } => Some((0, offset, len)),
        Region::Acc { offset, len } => Some((1, offset, len)),
        _ => None,
    }
}

pub(super) struct ProgressLoop {
    pub rank: usize,
    pub poll: Poll,
    pub conns: Vec<Conn>,
    pub by_endpoint: HashMap<Endpoint, Vec<usize>>,
    pub rx: Receiver<Command>,
    pub abort: Arc<AtomicBool>,
    pub broken: Arc<AtomicBool>,
    /// Set once the communicator is unusable; every later op fails with it.
    pub fatal: Option<Error>,
    pub current: Option<RunningOp>,
    pub pending: VecDeque<Submission>,
    /// Op order, parked frames and failures reported ahead of their op.
    pub sequencer: Sequencer,
    /// Lost relays, relay stalls, the op timeout and relay throughput.
    pub health: RelayHealth,
    pub timeout: Duration,
    pub rates: RelayRates,
    pub links: RelayLinks,
    pub shutting_down: bool,
    /// Rate cap on everything this rank sends (`MR_MAX_RATE`), shared by all connections.
    pub pacer: crate::pace::Pacer,
    /// Sink for payloads of frames we discard.
    pub scratch: Vec<u8>,
    /// Shared-memory segment, when every rank runs on this host.
    pub shm: Option<Box<Segment>>,
    /// The input backup of the last op that made one, for the next ([`OpMemory::backup`]).
    pub spare_backup: Option<crate::buffer::Scratch>,
}

impl Drop for ProgressLoop {
    /// However the thread ends (a panic included), ops still queued for it end with an error
    /// (see [`Done`]) instead of waiting forever, and the communicator counts as broken.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.broken.store(true, Ordering::SeqCst);
        }
        while let Ok(cmd) = self.rx.try_recv() {
            drop(cmd);
        }
    }
}

impl ProgressLoop {
    pub fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            // Sleep until the policy's next deadline or the pacer lets a connection write.
            let wake = match (self.health.poll_timeout(), self.pacer.poll_timeout()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let timeout = wake.map(|w| w.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                self.set_fatal(Error::io("event loop poll failed", e));
            }
            if self.abort.load(Ordering::SeqCst) {
                self.set_fatal(Error::aborted("communicator was aborted (mr_comm_abort)"));
                self.close_all();
                self.drain_commands();
                return;
            }
            self.drain_commands();
            for i in self.pacer.due(Instant::now()) {
                self.flush(i);
            }
            for ev in events.iter() {
                let i = ev.token().0;
                if i == WAKER.0 || i >= self.conns.len() {
                    continue;
                }
                if ev.is_writable() || ev.is_error() {
                    self.flush(i);
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.read_conn(i);
                }
            }
            // The policy looks at the clock after every change the schedule may have made
            // (the last thing before sleeping), so a relay that became waited on is judged
            // now. A relay dropped as stalled leaves the schedule with chunks to redo.
            self.drive();
            while self.handle_timeout(Instant::now()) {
                self.drive();
            }
            if self.shutting_down && self.current.is_none() && self.pending.is_empty() {
                self.say_goodbye();
                return;
            }
        }
    }

    fn drain_commands(&mut self) {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Command::Op(op) => {
                    if let Some(e) = &self.fatal {
                        op.done.complete(Err(e.clone()));
                    } else {
                        self.pending.push_back(op);
                    }
                }
                Command::Shm(seg) => self.shm = Some(seg),
                Command::Shutdown => self.shutting_down = true,
            }
        }
    }

    /// The communicator can no longer be used: fail everything with `err`.
    fn set_fatal(&mut self, err: Error) {
        if self.fatal.is_none() {
            log::warn!("rank {}: communicator failed: {err}", self.rank);
            self.fatal = Some(err.clone());
            self.broken.store(true, Ordering::SeqCst);
        }
        let err = self.fatal.clone().unwrap_or(err);
        if let Some(mut op) = self.current.take() {
            self.health.abandon_op();
            self.release(&op);
            self.keep_backup(&mut op.mem);
            op.done.complete(Err(err.clone()));
        }
        for op in self.pending.drain(..) {
            op.done.complete(Err(err.clone()));
        }
    }

    fn close_all(&mut self) {
        for c in &mut self.conns {
            c.close(self.poll.registry(), true);
        }
    }

    /// Start ops and move their transmits onto connections until nothing more can happen now.
    fn drive(&mut self) {
        loop {
            if self.current.is_none() {
                if self.fatal.is_some() {
                    return;
                }
                let Some(op) = self.pending.pop_front() else {
                    return;
                };
                self.start(op);
                if self.current.is_none() {
                    continue;
                }
            }
            // Hand out everything the schedule wants to send. Writing inline can complete
            // sends, which may let the schedule move on, so poll again until it is quiet.
            loop {
                let mut queued = Vec::new();
                let mut dropped = Vec::new();
                {
                    let Some(op) = self.current.as_mut() else {
                        break;
                    };
                    while let Some(ep) = op.schedule.poll_endpoint_dropped() {
                        dropped.push(ep);
                    }
                    while let Some(t) = op.schedule.poll_transmit(&mut op.mem) {
                        queued.push(t);
                    }
                }
                for ep in dropped {
                    if let Endpoint::Relay(r) = ep {
                        self.close_relay(r);
                    }
                }
                if queued.is_empty() {
                    break;
                }
                for t in queued {
                    // A relay lost while this batch was being queued: the schedule already
                    // routes its chunks elsewhere.
                    if let Endpoint::Relay(r) = t.to {
                        if self.health.is_lost(r) {
                            continue;
                        }
                    }
                    if let Err(e) = self.enqueue(t) {
                        self.fail_current(e);
                        break;
                    }
                }
            }
            let Some(op) = self.current.as_ref() else {
                continue;
            };
            if op.schedule.is_complete() {
                let mut op = self.current.take().expect("current op");
                self.keep_backup(&mut op.mem);
                let desc = op.schedule.desc();
                self.sequencer.ended(desc.seq, &op.schedule.p2p_ranges());
                let samples = self.health.finish_op();
                self.record_rates(&samples);
                op.done.complete(Ok(()));
                continue;
            }
            return;
        }
    }

    /// Start `op`, or end it at once when a peer already reported it failed.
    fn start(&mut self, op: Submission) {
        let Submission {
            transport,
            mut mem,
            done,
        } = op;
        let schedule = match transport {
            Transport::SharedMemory(desc, splits) => {
                log::debug!("rank {}: starting {desc}", self.rank);
                self.run_shm(&desc, splits.as_deref(), mem, &done);
                return;
            }
            Transport::Frames(s) => s,
        };
        let desc = *schedule.desc();
        let p2p = schedule.p2p_ranges();
        if let Some(err) = self.sequencer.take_remote_failure(desc.seq, &p2p) {
            done.complete(Err(err));
            return;
        }
        if let Some(err) = self.sequencer.take_p2p_failure(&p2p) {
            done.complete(Err(err));
            return;
        }
        log::debug!("rank {}: starting {desc}", self.rank);
        let relays = relays_of(self.by_endpoint.keys());
        let lost = self.health.start_op(Instant::now(), relays);
        if mem.backup.is_none() {
            mem.backup = self.spare_backup.take();
        }
        self.current = Some(RunningOp {
            schedule,
            mem,
            done,
            landed: HashMap::new(),
        });
        let op = self.current.as_mut().expect("current op");
        if let Err(e) = op.schedule.start(&mut op.mem) {
            self.fail_current(e);
            return;
        }
        // Relays lost earlier: the schedule routes around them from the start.
        for r in lost {
            let op = self.current.as_mut().expect("current op");
            let err = Error::remote(format!("relay {r} was lost in an earlier op"));
            if let Err(e) = op
                .schedule
                .handle_endpoint_lost(&mut op.mem, Endpoint::Relay(r), err)
            {
                self.fail_current(e);
                return;
            }
        }
        // Frames for this op may be waiting on parked connections.
        for i in 0..self.conns.len() {
            if matches!(self.conns[i].read, ReadState::Parked(_)) {
                self.read_conn(i);
            }
        }
    }

    /// Run `op` through the shared-memory segment, blocking this thread until it ends. Frames
    /// that arrive meanwhile wait in the sockets. A failure breaks the communicator (the
    /// segment's counters no longer agree between ranks) unless the segment reports itself
    /// intact: the op failed alike on every rank.
    fn run_shm(
        &mut self,
        desc: &OpDesc,
        splits: Option<&shm::Splits>,
        mut mem: OpMemory,
        done: &Completion,
    ) {
        let result = match self.shm.as_mut() {
            None => Err(Error::internal(format!(
                "{desc} was routed to shared memory, but no segment is attached"
            ))),
            Some(seg) => {
                let conns = &self.conns;
                let by_endpoint = &self.by_endpoint;
                let mut gone = |r: usize| rank_gone(conns, by_endpoint, r);
                let mut watch = shm::Watch {
                    abort: &self.abort,
                    timeout: self.timeout,
                    gone: &mut gone,
                };
                seg.run(desc, splits, &mut mem, &mut watch)
            }
        };
        let intact = self.shm.as_ref().is_some_and(|s| s.intact());
        self.sequencer.ended(desc.seq, &[]);
        match result {
            Ok(()) => done.complete(Ok(())),
            Err(e) if intact => {
                log::warn!("rank {}: {desc} failed: {e}", self.rank);
                done.complete(Err(e));
            }
            Err(e) => {
                log::warn!("rank {}: {desc} failed: {e}", self.rank);
                done.complete(Err(e.clone()));
                self.set_fatal(e);
            }
        }
    }

    /// Queue a data transmit on the least-loaded stream to its endpoint and try to write it.
    fn enqueue(&mut self, t: Transmit) -> Result<()> {
        let Some(streams) = self.by_endpoint.get(&t.to) else {
            return Err(Error::internal(format!("no connection to {}", t.to)));
        };
        let &i = streams
            .iter()
            .filter(|&&i| !self.conns[i].closed)
            .min_by_key(|&&i| self.conns[i].queued_bytes)
            .ok_or_else(|| {
                let left = streams.iter().any(|&i| self.conns[i].goodbye);
                Error::remote(if left {
                    format!("{} has left the job (destroyed its communicator)", t.to)
                } else {
                    format!("no open connection to {}", t.to)
                })
            })?;
        let digest = match (t.forward, &self.current) {
            (true, Some(op)) => landed_key(&t.region).and_then(|k| op.landed.get(&k).cloned()),
            _ => None,
        };
        let frame = match digest {
            Some(d) => FrameOut::with_digest(&t.header, true, d),
            None => FrameOut::new(&t.header, true),
        };
        let c = &mut self.conns[i];
        c.queued_bytes += wire_len(t.region.len());
        c.queue.push_back(OutFrame {
            frame,
            transmit: Some(t),
            owned: Vec::new(),
        });
        self.flush(i);
        Ok(())
    }

    fn enqueue_control(&mut self, i: usize, header: FrameHeader, payload: Vec<u8>) {
        let c = &mut self.conns[i];
        if c.closed {
            return;
        }
        c.queued_bytes += wire_len(payload.len());
        c.queue.push_back(OutFrame {
            frame: FrameOut::new(&header, true),
            transmit: None,
            owned: payload,
        });
        self.flush(i);
    }

    /// Write queued frames until the socket is full.
    fn flush(&mut self, i: usize) {
        let mut sent = Vec::new();
        let result = {
            let c = &mut self.conns[i];
            let mem = self.current.as_ref().map(|op| &op.mem);
            loop {
                if c.closed {
                    break Ok(());
                }
                let Some(f) = c.queue.front_mut() else {
                    break Ok(());
                };
                let total = f.total();
                let payload: &[u8] = match (&f.transmit, mem) {
                    (Some(t), Some(m)) => m.bytes(&t.region),
                    (Some(_), None) => {
                        break Err(Error::internal("data frame queued without an op"))
                    }
                    (None, _) => &f.owned,
                };
                let left = total - f.frame.written;
                let Some(max) = self.pacer.allowance(i, Instant::now(), left) else {
                    break Ok(());
                };
                match f.frame.write_at_most(&c.stream, payload, &mut c.tx, max) {
                    Ok(n) => {
                        self.pacer.consume(n);
                        c.queued_bytes -= n;
                        if f.frame.written == total {
                            let f = c.queue.pop_front().expect("front frame");
                            if let Some(t) = f.transmit {
                                sent.push(t);
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(()),
                    Err(e) => break Err(Error::io(format!("sending to {}", c.endpoint), e)),
                }
            }
        };
        let c = &mut self.conns[i];
        if !c.closed {
            if let Err(e) = conn::watch_writable(
                self.poll.registry(),
                &mut c.stream,
                Token(i),
                !c.queue.is_empty(),
                &mut c.writable,
            ) {
                log::warn!(
                    "rank {}: cannot watch {} for writing: {e}",
                    self.rank,
                    c.endpoint
                );
            }
        }
        if !sent.is_empty() {
            if let Some(op) = self.current.as_mut() {
                self.health.progress(Instant::now());
                for t in &sent {
                    op.schedule.handle_sent(t);
                }
            }
        }
        if let Err(e) = result {
            self.conn_failed(i, e);
        }
    }

    /// Read and dispatch frames from connection `i` until it would block or parks.
    fn read_conn(&mut self, i: usize) {
        loop {
            if self.conns[i].closed {
                return;
            }
            match self.read_step(i) {
                Ok(true) => continue,
                Ok(false) => return,
                Err(ReadEvent::Idle) => return,
                Err(ReadEvent::Closed(e)) => {
                    self.conn_failed(i, e);
                    return;
                }
            }
        }
    }

    /// Bytes arrived from `ep` during an op: a relay was heard from.
    fn heard(&mut self, ep: Endpoint, n: usize, now: Instant) {
        if let (Endpoint::Relay(r), true) = (ep, self.current.is_some()) {
            self.health.heard_from(r, n, now);
        }
    }

    /// One step of the read state machine. `Ok(true)`: call again.
    fn read_step(&mut self, i: usize) -> std::result::Result<bool, ReadEvent> {
        let ep = self.conns[i].endpoint;
        let state = std::mem::replace(&mut self.conns[i].read, ReadState::header());
        match state {
            ReadState::Header { mut buf, mut got } => {
                match read_some(&mut self.conns[i].stream, &mut buf[got..], ep) {
                    Ok(n) => {
                        got += n;
                        self.heard(ep, n, Instant::now());
                    }
                    Err(e) => {
                        self.conns[i].read = ReadState::Header { buf, got };
                        return Err(e);
                    }
                }
                if got < HEADER_LEN {
                    self.conns[i].read = ReadState::Header { buf, got };
                    return Ok(true);
                }
                let h = FrameHeader::decode(&buf)
                    .map_err(|e| ReadEvent::Closed(e.context(format!("from {ep}"))))?;
                let frame = FrameIn::new(h, &buf, Some(&mut self.conns[i].rx));
                self.route_header(i, frame)
            }
            ReadState::Parked(frame) => self.route_header(i, frame),
            ReadState::Payload { mut frame, sink } => {
                if !frame.is_whole() {
                    let (len, got) = (frame.payload_len(), frame.got);
                    let res = match &sink {
                        Sink::Buffer => self.conns[i].read_payload(&mut frame, len, got),
                        Sink::Direct(region) => match self.current.as_mut() {
                            Some(op) => {
                                let buf = &mut op.mem.bytes_mut(region)[got..];
                                frame.read(&mut self.conns[i].stream, buf)
                            }
                            None => {
                                return Err(ReadEvent::Closed(Error::internal(
                                    "in-place frame without an op",
                                )))
                            }
                        },
                        Sink::Discard => {
                            let want = (len - got).min(self.scratch.len());
                            frame.read(&mut self.conns[i].stream, &mut self.scratch[..want])
                        }
                    };
                    let n = match res {
                        Ok(n) => n,
                        Err(e) => {
                            self.conns[i].read = ReadState::Payload { frame, sink };
                            return Err(read_error(e, ep));
                        }
                    };
                    if self.current.is_some() {
                        let now = Instant::now();
                        self.health.progress(now);
                        self.heard(ep, n, now);
                    }
                }
                if !frame.is_whole() {
                    self.conns[i].read = ReadState::Payload { frame, sink };
                    return Ok(true);
                }
                let h = frame.header;
                if !frame.verify() {
                    // Whatever this frame wrote in place is never reported: the link fails
                    // (a rank: the op fails; a relay: its chunks are redone elsewhere).
                    return Err(ReadEvent::Closed(Error::remote(format!(
                        "a {:?} frame from {ep} failed its integrity check (op seq {}, offset \
                         {}, {} bytes): corrupted or forged in transit",
                        h.kind(),
                        h.seq,
                        h.offset,
                        h.len
                    ))));
                }
                if h.kind() == FrameKind::Goodbye {
                    self.conns[i].goodbye = true;
                    return Err(ReadEvent::Closed(Error::remote(format!(
                        "{ep} has left the job (destroyed its communicator)"
                    ))));
                }
                match sink {
                    Sink::Buffer => self.deliver(i, &h),
                    Sink::Direct(region) => {
                        if let Some(op) = self.current.as_mut() {
                            if let (Some(k), Some(d)) =
                                (landed_key(&region), frame.payload_digest())
                            {
                                op.landed.insert(k, d);
                            }
                            if let Err(e) = op.schedule.handle_frame_in_place(&mut op.mem, ep, &h) {
                                self.fail_current(e);
                            }
                        }
                    }
                    Sink::Discard => {}
                }
                Ok(true)
            }
        }
    }

    /// Act on the [`Route`] the sequencer gives a frame whose header has arrived.
    fn route_header(&mut self, i: usize, frame: FrameIn) -> std::result::Result<bool, ReadEvent> {
        let ep = self.conns[i].endpoint;
        let h = frame.header;
        let current = self.current.as_ref();
        let current_seq = current.map(|op| op.schedule.desc().seq);
        let route = self.sequencer.route(ep, &h, current_seq, || {
            current.is_some_and(|op| op.schedule.accepts_p2p(ep, &h))
        });
        let sink = match route {
            Route::ToCurrentOp => {
                let op = self.current.as_mut().expect("current op");
                match op.schedule.recv_in_place(ep, &h) {
                    Ok(Some(region)) => Sink::Direct(region),
                    Ok(None) => Sink::Buffer,
                    Err(e) => {
                        self.fail_current(e);
                        Sink::Discard
                    }
                }
            }
            Route::Control => Sink::Buffer,
            Route::Discard => Sink::Discard,
            Route::Park => {
                log::trace!(
                    "rank {}: parking {ep} on seq {} (current {current_seq:?})",
                    self.rank,
                    h.seq
                );
                self.conns[i].read = ReadState::Parked(frame);
                return Ok(false);
            }
            Route::Unexpected => {
                return Err(ReadEvent::Closed(Error::remote(format!(
                    "unexpected {:?} frame from {ep}",
                    h.kind()
                ))))
            }
        };
        self.conns[i].read = ReadState::Payload { frame, sink };
        Ok(true)
    }

    /// A whole frame for the current op (or a failure report) arrived on connection `i`.
    fn deliver(&mut self, i: usize, h: &FrameHeader) {
        let ep = self.conns[i].endpoint;
        let len = h.len as usize;
        if h.kind() == FrameKind::OpError {
            let msg = String::from_utf8_lossy(self.conns[i].payload(len)).into_owned();
            let err = Error::new(
                ErrorKind::from_u8(h.aux as u8),
                format!("{ep} reported: {msg}"),
            );
            let p2p = self
                .current
                .as_ref()
                .map(|op| op.schedule.p2p_ranges())
                .unwrap_or_default();
            let current = self.current.as_ref().map(|op| CurrentOp {
                seq: op.schedule.desc().seq,
                p2p: &p2p,
            });
            if let Report::FailsCurrentOp(err) = self.sequencer.report(ep, h, err, current) {
                self.end_current(Err(err), false);
            }
            return;
        }
        let Some(op) = self.current.as_mut() else {
            return;
        };
        self.health.progress(Instant::now());
        let payload = self.conns[i].payload(len);
        if let Err(e) = op.schedule.handle_frame(&mut op.mem, ep, h, payload) {
            self.fail_current(e);
        }
    }

    /// Fold an op's relay throughput samples into [`RelayRates`] and [`RelayLinks`].
    fn record_rates(&mut self, samples: &[RateSample]) {
        if samples.is_empty() {
            return;
        }
        let mut rates = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        for s in samples {
            if let Some(rate) = rates.get_mut(s.relay) {
                *rate = smooth_rate(*rate, s.bytes_per_sec);
            }
            if let Some(link) = links.get_mut(s.relay) {
                link.rate = s.bytes_per_sec;
                link.min_rtt_us = self
                    .by_endpoint
                    .get(&Endpoint::Relay(s.relay))
                    .into_iter()
                    .flatten()
                    .filter(|&&i| !self.conns[i].closed)
                    .filter_map(|&i| tcp_min_rtt_us(&self.conns[i].stream))
                    .min()
                    .unwrap_or(0);
            }
        }
        log::trace!(
            "rank {}: relay rates {:?} B/s, links {:?}",
            self.rank,
            *rates,
            *links
        );
    }

    /// The current op failed here: tell every peer (so nobody waits for us), end it.
    fn fail_current(&mut self, err: Error) {
        self.end_current(Err(err), true);
    }

    fn end_current(&mut self, result: Result<()>, tell_peers: bool) {
        let Some(mut op) = self.current.take() else {
            return;
        };
        self.health.abandon_op();
        let desc = *op.schedule.desc();
        let p2p = op.schedule.p2p_ranges();
        self.sequencer.ended(desc.seq, &p2p);
        self.release(&op);
        self.keep_backup(&mut op.mem);
        if let (Err(e), true) = (&result, tell_peers) {
            log::warn!("rank {}: {desc} failed: {e}", self.rank);
            let msg = format!("rank {}: {}", self.rank, e.message);
            let first_open = |conns: &[Conn], streams: &Vec<usize>| {
                streams.iter().copied().find(|&s| !conns[s].closed)
            };
            let mut notices: Vec<(usize, FrameHeader)> = Vec::new();
            if desc.coll == Collective::PointToPoint {
                // Only the ranks the group exchanges messages with, naming those messages, so
                // a notice never ends a collective, another pair's messages or later ones.
                for r in &p2p {
                    let Some(streams) = self.by_endpoint.get(&Endpoint::Rank(r.peer)) else {
                        continue;
                    };
                    if let Some(s) = first_open(&self.conns, streams) {
                        let mut header = FrameHeader::op_error(r.lo, e.kind, msg.len());
                        header.coll = Collective::PointToPoint as u8;
                        header.redop = u8::from(r.sends);
                        header.count = r.hi;
                        notices.push((s, header));
                    }
                }
            } else {
                for streams in self.by_endpoint.values() {
                    if let Some(s) = first_open(&self.conns, streams) {
                        notices.push((s, FrameHeader::op_error(desc.seq, e.kind, msg.len())));
                    }
                }
            }
            for (s, header) in notices {
                self.enqueue_control(s, header, msg.clone().into_bytes());
            }
        }
        op.done.complete(result);
    }

    /// Before an op's memory goes back to the caller: drop its unsent frames, copy the rest of
    /// any half-written one and discard the rest of any half-read one, so the byte streams
    /// stay well-formed and the caller's memory is never touched again.
    fn release(&mut self, op: &RunningOp) {
        for c in &mut self.conns {
            // A payload half-read into the op's memory: read the rest into nowhere.
            if let ReadState::Payload { sink, .. } = &mut c.read {
                if matches!(sink, Sink::Direct(_)) {
                    *sink = Sink::Discard;
                }
            }
            let mut keep = VecDeque::new();
            for mut f in c.queue.drain(..) {
                match f.transmit.take() {
                    None => keep.push_back(f),
                    // Numbered (tag taken) or half-written: it must still go out whole.
                    Some(t) if f.frame.is_numbered() => {
                        f.owned = op.mem.bytes(&t.region).to_vec();
                        keep.push_back(f);
                    }
                    Some(t) => c.queued_bytes -= wire_len(t.region.len()),
                }
            }
            c.queue = keep;
        }
    }

    /// An op ended: keep its input backup for the next op, unless it is too large to hold
    /// on to.
    fn keep_backup(&mut self, mem: &mut OpMemory) {
        if let Some(b) = mem.backup.take() {
            if b.len() <= crate::algo::relay::MAX_SPARE_BACKUP
                && self
                    .spare_backup
                    .as_ref()
                    .map_or(true, |old| old.len() <= b.len())
            {
                self.spare_backup = Some(b);
            }
        }
    }

    /// Connection `i` broke: a peer that said goodbye only fails ops that still need it;
    /// anything else breaks the communicator.
    fn conn_failed(&mut self, i: usize, err: Error) {
        let c = &mut self.conns[i];
        if c.closed {
            return;
        }
        c.close(self.poll.registry(), false);
        let goodbye = c.goodbye;
        let ep = c.endpoint;
        if let (Endpoint::Relay(r), false) = (ep, self.shutting_down) {
            self.relay_lost(r, err);
            return;
        }
        if goodbye || self.shutting_down {
            log::debug!("rank {}: connection to {ep} closed: {err}", self.rank);
            return;
        }
        let desc = self
            .current
            .as_ref()
            .map(|op| op.schedule.desc().to_string());
        let err = match desc {
            Some(d) => Error::new(
                err.kind,
                format!("{d}: lost connection to {ep}: {}", err.message),
            ),
            None => Error::new(
                err.kind,
                format!("lost connection to {ep}: {}", err.message),
            ),
        };
        let err = if err.kind == ErrorKind::System {
            Error::remote(err.message)
        } else {
            err
        };
        self.set_fatal(err);
    }

    /// Close every stream to relay `r` and keep it out of later ops.
    fn close_relay(&mut self, r: usize) {
        if !self.health.lose(r) {
            return;
        }
        log::warn!("rank {}: no longer using relay {r}", self.rank);
        for &i in self
            .by_endpoint
            .get(&Endpoint::Relay(r))
            .into_iter()
            .flatten()
        {
            let c = &mut self.conns[i];
            if c.closed {
                continue;
            }
            c.close(self.poll.registry(), true);
            // Frames that will never be written: their bytes are redone elsewhere.
            c.queue.clear();
            c.queued_bytes = 0;
        }
    }

    /// Relay `r` failed (`err`): drop it and let the current op route around it.
    fn relay_lost(&mut self, r: usize, err: Error) {
        if self.health.is_lost(r) {
            return;
        }
        log::warn!("rank {}: lost relay {r}: {err}", self.rank);
        self.close_relay(r);
        let Some(op) = self.current.as_mut() else {
            return;
        };
        let err = Error::new(
            err.kind,
            format!("{}: lost relay {r}: {}", op.schedule.desc(), err.message),
        );
        if let Err(e) = op
            .schedule
            .handle_endpoint_lost(&mut op.mem, Endpoint::Relay(r), err)
        {
            let e = if e.kind == ErrorKind::System {
                Error::remote(e.message)
            } else {
                e
            };
            self.fail_current(e);
        }
    }

    /// Let the policy look at the clock: drop stalled relays, fail an op that made no
    /// progress for the timeout. Whether it dropped a relay (the schedule then has chunks to
    /// redo).
    fn handle_timeout(&mut self, now: Instant) -> bool {
        let Some(op) = self.current.as_ref() else {
            return false;
        };
        let expired = self
            .health
            .handle_timeout(now, |r| op.schedule.waits_on(Endpoint::Relay(r)));
        let bound = self.health.stall();
        let dropped = !expired.stalled.is_empty();
        for r in expired.stalled {
            let msg = format!(
                "relay {r} stalled: nothing arrived from it for {} ms",
                bound.as_millis()
            );
            self.relay_lost(r, Error::timeout(msg));
        }
        if !expired.op_timed_out {
            return dropped;
        }
        let Some(op) = self.current.as_ref() else {
            return dropped;
        };
        let msg = format!(
            "{} made no progress for {} ms: {}",
            op.schedule.desc(),
            self.timeout.as_millis(),
            op.schedule.waiting_for()
        );
        self.set_fatal(Error::timeout(msg));
        false
    }

    fn say_goodbye(&mut self) {
        for i in 0..self.conns.len() {
            self.enqueue_control(i, FrameHeader::new(FrameKind::Goodbye, 0), Vec::new());
        }
        // Give queued frames a bounded moment to leave, then close.
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut events = Events::with_capacity(64);
        while Instant::now() < deadline
            && self.conns.iter().any(|c| !c.closed && !c.queue.is_empty())
        {
            let _ = self.poll.poll(&mut events, Some(Duration::from_millis(10)));
            for i in 0..self.conns.len() {
                self.flush(i);
            }
        }
        self.close_all();
    }
}

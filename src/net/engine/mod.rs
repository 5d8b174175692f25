//! The progress engine: one event-loop thread per communicator ([`progress`]) and the handle
//! callers use to give it ops ([`Engine`]).
//!
//! Callers hand the loop ops over a crossbeam channel and wake it with a `mio::Waker`; it runs
//! ops strictly one after another (so frames of consecutive ops never interleave on a
//! connection), moving bytes between sockets and the current op's schedule. What the frames
//! mean and what passing time means is decided by sans-IO code the loop feeds:
//! the op's [`Schedule`](crate::algo::Schedule), the [`Sequencer`](crate::policy::sequence)
//! (frames of ops not started here stay in the socket: the connection is "parked", so a fast
//! rank is held back by TCP flow control instead of our memory) and
//! [`RelayHealth`](crate::policy::relays) (stalled relays, the op timeout `MR_TIMEOUT_MS`,
//! relay throughput).
//!
//! Losing a relay is not fatal: the loop closes every stream to it, keeps it out of later ops
//! and lets the current schedule route around it (`Schedule::handle_endpoint_lost`). A relay
//! counts as lost when a stream to it breaks or it says goodbye, when the schedule stops using
//! it (another rank reported it lost), or when the policy finds it stalled.
//!
//! Relay throughput. When an op succeeds the loop folds each relay's rate sample into
//! [`RelayRates`], smoothed over ops; the communicator turns those rates into segment weights
//! (see [`crate::comm`]).

mod conn;
mod progress;

use crate::algo::{OpDesc, Schedule};
use crate::buffer::OpMemory;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::net::bootstrap::Mesh;
use crate::net::conn as framing;
use crate::net::shm::Segment;
use crate::policy::relays::RelayHealth;
use crate::policy::sequence::Sequencer;
use conn::Conn;
use crossbeam_channel::Sender;
use mio::net::TcpStream;
use mio::{Interest, Poll, Token, Waker};
use progress::{ProgressLoop, WAKER};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Measured throughput of each relay (indexed as in [`Endpoint::Relay`]) in bytes per second,
/// smoothed over the ops that received from it; 0 until measured. Written by the progress
/// thread after each op, read by the communicator.
///
/// [`Endpoint::Relay`]: crate::algo::Endpoint::Relay
pub type RelayRates = Arc<Mutex<Vec<u64>>>;

/// What the progress thread last saw of each relay's link (indexed as
/// [`Endpoint::Relay`](crate::algo::Endpoint::Relay)), for sizing relay windows: the last
/// op's throughput sample and the kernel's minimum round-trip time over that relay's TCP
/// streams.
#[derive(Clone, Copy, Debug, Default)]
pub struct RelayLink {
    /// Bytes per second that arrived from the relay during the last op that used it.
    pub rate: u64,
    /// Smallest round trip the kernel measured on any stream to the relay (`TCP_INFO`
    /// `tcpi_min_rtt`), in microseconds; 0 when unknown.
    pub min_rtt_us: u32,
}

/// Shared view of [`RelayLink`]s: written by the progress thread, read by the communicator.
pub type RelayLinks = Arc<Mutex<Vec<RelayLink>>>;

/// Where an op's result is delivered; callers block on it or poll it.
#[derive(Default)]
pub struct Completion {
    result: Mutex<Option<Result<()>>>,
    cond: Condvar,
}

impl Completion {
    pub fn complete(&self, r: Result<()>) {
        let mut g = self.result.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(r);
            self.cond.notify_all();
        }
    }
    pub fn wait(&self) -> Result<()> {
        let mut g = self.result.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = self.cond.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
    pub fn try_get(&self) -> Option<Result<()>> {
        self.result
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The engine's hold on an op's [`Completion`]. Completing it is the progress thread's job;
/// should the thread let go of an op without doing so (it panicked, or stopped with the op
/// still queued), dropping this completes it with an error, so no caller waits forever.
pub struct Done(Arc<Completion>);

impl Done {
    pub fn new(c: Arc<Completion>) -> Done {
        Done(c)
    }
}

impl std::ops::Deref for Done {
    type Target = Completion;
    fn deref(&self) -> &Completion {
        &self.0
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        // No effect when the op was completed (the first result stays).
        self.0.complete(Err(Error::internal(
            "the communicator's progress thread let go of this op without finishing it \
             (it stopped or failed; see the log)",
        )));
    }
}

/// An op handed to the engine: how it travels, the memory it works on, where its result goes.
pub struct Submission {
    pub transport: Transport,
    pub mem: OpMemory,
    pub done: Done,
}

impl Submission {
    pub fn desc(&self) -> &OpDesc {
        match &self.transport {
            Transport::Frames(s) => s.desc(),
            Transport::SharedMemory(d, _) => d,
        }
    }
}

/// How the engine carries out an op.
pub enum Transport {
    /// Frames over the connections, as the schedule directs.
    Frames(Box<dyn Schedule>),
    /// Through the shared-memory segment ([`crate::net::shm`]); an all-to-all-v carries its
    /// counts and displacements.
    SharedMemory(OpDesc, Option<Box<crate::net::shm::Splits>>),
}

enum Command {
    Op(Submission),
    Shm(Box<Segment>),
    Shutdown,
}

/// Handle to a communicator's progress thread.
pub struct Engine {
    tx: Sender<Command>,
    waker: Arc<Waker>,
    abort: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Take over `mesh` and start the progress thread, which records relay throughput in
    /// `rates` and `links`.
    pub fn start(
        mesh: Mesh,
        config: &Config,
        broken: Arc<AtomicBool>,
        rates: RelayRates,
        links: RelayLinks,
    ) -> Result<Engine> {
        let poll = Poll::new().map_err(|e| Error::io("cannot create event loop", e))?;
        let waker = Arc::new(
            Waker::new(poll.registry(), WAKER).map_err(|e| Error::io("cannot create waker", e))?,
        );
        let mut conns = Vec::with_capacity(mesh.conns.len());
        let mut by_endpoint = HashMap::new();
        if mesh.keys.len() != mesh.conns.len() {
            return Err(Error::internal("a connection without frame keys"));
        }
        for (i, ((ep, s), keys)) in mesh.conns.into_iter().zip(mesh.keys).enumerate() {
            framing::tune(&s)
                .map_err(|e| Error::io(format!("configuring connection to {ep}"), e))?;
            s.set_nonblocking(true)
                .map_err(|e| Error::io("set_nonblocking", e))?;
            let mut stream = TcpStream::from_std(s);
            // WRITABLE is watched only while a connection has bytes queued.
            poll.registry()
                .register(&mut stream, Token(i), Interest::READABLE)
                .map_err(|e| Error::io("registering connection", e))?;
            by_endpoint.entry(ep).or_insert_with(Vec::new).push(i);
            conns.push(Conn::new(ep, stream, keys));
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let abort = Arc::new(AtomicBool::new(false));
        let mut lp = ProgressLoop {
            rank: mesh.rank,
            poll,
            conns,
            by_endpoint,
            rx,
            abort: abort.clone(),
            broken,
            fatal: None,
            current: None,
            pending: VecDeque::new(),
            sequencer: Sequencer::default(),
            health: RelayHealth::new(config.timeout),
            timeout: config.timeout,
            rates,
            links,
            shutting_down: false,
            scratch: vec![0u8; 64 << 10],
            pacer: crate::pace::Pacer::new(config.max_rate, Instant::now()),
            shm: None,
            spare_backup: None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("mr-progress-{}", mesh.rank))
            .spawn(move || lp.run())
            .map_err(|e| Error::io("cannot start progress thread", e))?;
        Ok(Engine {
            tx,
            waker,
            abort,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Run later ops marked `shm` through `seg`; every rank attaches before the same op.
    pub fn attach_shm(&self, seg: Segment) -> Result<()> {
        self.tx.send(Command::Shm(Box::new(seg))).map_err(|_| {
            Error::aborted("communicator's progress thread has stopped (aborted or failed)")
        })?;
        let _ = self.waker.wake();
        Ok(())
    }

    pub fn submit(&self, op: Submission) -> Result<()> {
        self.tx.send(Command::Op(op)).map_err(|_| {
            Error::aborted("communicator's progress thread has stopped (aborted or failed)")
        })?;
        let _ = self.waker.wake();
        Ok(())
    }

    /// Fail everything with `Aborted` and close all connections. Any thread.
    pub fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }

    /// Finish queued ops, say goodbye and stop the thread.
    pub fn shutdown(&self) -> Result<()> {
        let _ = self.tx.send(Command::Shutdown);
        let _ = self.waker.wake();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            h.join()
                .map_err(|_| Error::internal("progress thread panicked"))?;
        }
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_op_the_engine_lets_go_of_ends_with_an_error_not_a_hang() {
        let c = Arc::new(Completion::default());
        drop(Done::new(c.clone()));
        let e = c.wait().expect_err("dropped unfinished");
        assert!(e.message.contains("without finishing it"), "{e}");
        // A finished op keeps its result.
        let c = Arc::new(Completion::default());
        let d = Done::new(c.clone());
        d.complete(Ok(()));
        drop(d);
        assert!(c.wait().is_ok());
    }
}

//! The progress engine: one mio event-loop thread per communicator.

use crate::algo::Schedule;
use crate::buffer::OpMemory;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::net::bootstrap::Mesh;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};

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

/// An op handed to the engine.
pub struct PendingOp {
    pub schedule: Box<dyn Schedule>,
    pub mem: OpMemory,
    pub done: Arc<Completion>,
}

pub struct Engine;

impl Engine {
    pub fn start(_mesh: Mesh, _config: &Config, _broken: Arc<AtomicBool>) -> Result<Engine> {
        Err(Error::internal("not yet implemented"))
    }
    pub fn submit(&self, _op: PendingOp) -> Result<()> {
        Err(Error::internal("not yet implemented"))
    }
    pub fn abort(&self) {}
    pub fn shutdown(self) -> Result<()> {
        Ok(())
    }
}

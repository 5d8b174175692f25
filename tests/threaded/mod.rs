//! Whole jobs of communicators in threads of one process, each rank with its own
//! configuration (host ids, compression): shared by the tests that need per-rank settings.
#![allow(dead_code)]

use mapreduce::{Comm, Config, UniqueId};
use std::sync::{Arc, Mutex};

/// Run `f` on every rank of an `n`-rank job whose rank r uses `config(r)` (the unique id is
/// made with `config(0)`); destroys each communicator afterwards and returns what every rank
/// returned, in rank order.
pub fn run_ranks<T: Send + 'static>(
    n: usize,
    config: impl Fn(usize) -> Config,
    f: impl Fn(&Comm) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let id = UniqueId::new(&config(0)).unwrap();
    let out = Arc::new(Mutex::new((0..n).map(|_| None).collect::<Vec<Option<T>>>()));
    let joins: Vec<_> = (0..n)
        .map(|r| {
            let (cfg, f, out) = (config(r), f.clone(), out.clone());
            std::thread::spawn(move || {
                let comm = Comm::init(n, &id, r, cfg).unwrap();
                let v = f(&comm);
                comm.destroy().unwrap();
                out.lock().unwrap()[r] = Some(v);
            })
        })
        .collect();
    for j in joins {
        j.join().unwrap();
    }
    let mut out = out.lock().unwrap();
    out.iter_mut().map(|v| v.take().unwrap()).collect()
}

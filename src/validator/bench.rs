//! Benchmark bots: every `bench.interval_secs` the validator runs a small job through each
//! available relay with `bench.bots` in-process peers ([`crate::Comm`] with the relay as its
//! only relay), measures the all-reduce throughput and checks the result exactly. A wrong
//! result convicts the relay like a failed verification. `bench.max_bandwidth` caps the bots'
//! average rate: a batch of benchmarks that finished early waits before the next starts.

use crate::config::{Algo, Config};
use crate::validator::proto::JobRequest;
use crate::validator::server::State;
use crate::{Comm, ReduceOp, UniqueId};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn spawn(state: Arc<State>) {
    std::thread::Builder::new()
        .name("mr-bench-bots".into())
        .spawn(move || loop {
            let interval = Duration::from_secs_f64(state.config.bench.interval_secs.max(0.05));
            std::thread::sleep(interval);
            round(&state);
        })
        .expect("spawn benchmark bots");
}

/// One benchmark round over every available relay, `concurrency` relays at a time.
pub fn round(state: &Arc<State>) {
    let ids = {
        let reg = state.registry.lock().unwrap_or_else(|e| e.into_inner());
        reg.candidates(
            0,
            Instant::now(),
            Duration::from_millis(state.config.heartbeat_timeout_ms),
        )
    };
    for batch in ids.chunks(state.config.bench.concurrency.max(1)) {
        let started = Instant::now();
        let handles: Vec<_> = batch
            .iter()
            .map(|id| {
                let state = state.clone();
                let id = id.clone();
                std::thread::spawn(move || {
                    if let Err(e) = bench_relay(&state, &id) {
                        log::warn!("benchmark of relay {id}: {e}");
                    }
                })
            })
            .collect();
        for h in handles {
            let _ = h.join();
        }
        // Keep the bots' average rate under the cap: a batch that was faster waits.
        if let Some(min) = batch_min_duration(&state.config.bench, batch.len()) {
            if let Some(rest) = min.checked_sub(started.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    }
    state.save();
}

/// The shortest time a batch of `relays` benchmarks may take under `max_bandwidth`: every bot
/// uploads and downloads `bytes` through the validator host's link. `None` when uncapped.
pub fn batch_min_duration(
    cfg: &crate::validator::server::BenchConfig,
    relays: usize,
) -> Option<Duration> {
    if cfg.max_bandwidth == 0 {
        return None;
    }
    let moved = (relays * cfg.bots.max(2) * cfg.bytes * 2) as f64;
    Some(Duration::from_secs_f64(moved / cfg.max_bandwidth as f64))
}

fn bench_relay(state: &Arc<State>, id: &str) -> crate::Result<()> {
    let cfg = &state.config.bench;
    let bots = cfg.bots.max(2);
    let count = (cfg.bytes / 4).max(1);
    let chunk = 256 << 10;
    let mut config = Config {
        algo: Algo::Relay,
        chunk_bytes: chunk,
        relay_chunk_bytes: chunk,
        timeout: Duration::from_secs(30),
        bind_addr: Some("127.0.0.1".parse().expect("ip")),
        ..Config::default()
    };
    let uid = UniqueId::new(&config)?;
    // The relay admits peers of the job id they announce: the one in the unique id (its
    // text form ends with the job id in hex).
    let text = String::from_utf8_lossy(uid.as_bytes());
    let job = text
        .trim_end_matches('\0')
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    let relay_memory = (bots * crate::algo::relay::max_window(chunk) * chunk * 4) as u64;
    // The bots take turns at asking under the configured benchmark identities.
    static TURN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let client = match cfg.hotkeys.len() {
        0 => state.identity.id(),
        n => cfg.hotkeys[TURN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n].clone(),
    };
    let a = state.assign_to(
        &JobRequest {
            job,
            peers: bots,
            relays: 1,
            relay_memory,
            max_message_bytes: cfg.bytes as u64,
        },
        id,
        &client,
    )?;
    config.relays = a.relays.iter().map(|r| r.addr.clone()).collect();
    config.granted_token = Some(crate::config::parse_hex("token", &a.token)?);
    let handles: Vec<_> = (0..bots)
        .map(|r| {
            let config = config.clone();
            std::thread::spawn(move || -> crate::Result<(bool, Duration)> {
                let comm = Comm::init(bots, &uid, r, config)?;
                // Integer-valued floats: the sum is exact, so equality is the right check.
                let mut buf: Vec<f32> = (0..count).map(|i| ((i * 7 + r) % 1000) as f32).collect();
                let t = Instant::now();
                comm.allreduce(&mut buf, ReduceOp::Sum)?;
                let dt = t.elapsed();
                let ok = buf.iter().enumerate().all(|(i, &x)| {
                    x == (0..bots).map(|q| ((i * 7 + q) % 1000) as f32).sum::<f32>()
                });
                comm.destroy()?;
                Ok((ok, dt))
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    let mut correct = true;
    for h in handles {
        let (ok, dt) = h
            .join()
            .map_err(|_| crate::Error::internal("benchmark bot panicked"))??;
        correct &= ok;
        slowest = slowest.max(dt);
    }
    let mut reg = state.registry.lock().unwrap_or_else(|e| e.into_inner());
    if correct {
        let mbps = cfg.bytes as f64 / slowest.as_secs_f64().max(1e-6) / 1e6;
        log::info!("benchmark of relay {id}: {mbps:.1} MB/s, result verified");
        reg.note_throughput(id, mbps);
        reg.note_bench_capacity(id, relay_memory);
    } else {
        reg.convict(id, "benchmark all-reduce returned a wrong sum");
    }
    reg.rescore();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validator::server::BenchConfig;

    #[test]
    fn bandwidth_cap_spaces_batches() {
        let mut cfg = BenchConfig {
            bytes: 8 << 20,
            bots: 2,
            max_bandwidth: 0,
            ..BenchConfig::default()
        };
        assert_eq!(batch_min_duration(&cfg, 3), None);
        // 3 relays x 2 bots x 8 MiB x (up + down) at 10 MB/s.
        cfg.max_bandwidth = 10_000_000;
        let d = batch_min_duration(&cfg, 3).unwrap();
        assert!(
            (d.as_secs_f64() - 3.0 * 2.0 * 8388608.0 * 2.0 / 1e7).abs() < 1e-9,
            "{d:?}"
        );
    }
}

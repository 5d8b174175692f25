//! Relay segments sized by measured throughput, with real `mr-relayd` processes and peers in
//! threads: one relay is made slow, and after the warm-up ops it must get the smaller segment,
//! while every rank keeps using identical weights and gets exact results.

mod relay_util;

use mapreduce::comm::RELAY_RATE_PERIOD;
use mapreduce::ReduceOp;
use relay_util::{relay_config, run_job, RelayProc, TOKEN};

/// Input of rank `r` at index `i` in op `op`.
fn val(r: usize, i: usize, op: usize) -> i32 {
    ((i * 7 + r * 3 + op) % 13) as i32 - 6
}

#[test]
fn a_slow_relay_gets_a_smaller_segment_and_ranks_agree() {
    let peers = 3;
    let count = 256 << 10;
    // Relay 0 sleeps 2 ms on every chunk it receives; relay 1 runs at loopback speed.
    let relays = vec![
        RelayProc::start_with_env(TOKEN, &[], &[("MR_RELAY_TEST_DELAY_US", "2000")]),
        RelayProc::start(TOKEN),
    ];
    assert!(
        relays[0].wait_log("delay per data frame"),
        "the delay is on"
    );
    let mut cfg = relay_config(&relays, TOKEN);
    cfg.chunk_bytes = 16 << 10;
    cfg.relay_chunk_bytes = 16 << 10;
    let ops = 3 * RELAY_RATE_PERIOD as usize;
    let seen = run_job(peers, cfg, move |comm| {
        assert_eq!(comm.relays(), &[0, 1]);
        let rank = comm.rank();
        let mut weights = Vec::new();
        for op in 0..ops {
            let mut v: Vec<i32> = (0..count).map(|i| val(rank, i, op)).collect();
            comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
            for (i, x) in v.iter().enumerate() {
                let want: i32 = (0..peers).map(|q| val(q, i, op)).sum();
                assert_eq!(*x, want, "op {op} index {i}");
            }
            weights.push(comm.relay_weights());
            // Ops that do not use the relays must not upset the count of those that do.
            if op % 3 == 0 {
                comm.barrier().unwrap();
            }
        }
        // A broadcast is a relay op too and uses the same weights.
        let mut b: Vec<i32> = if rank == 1 {
            (0..count as i32).collect()
        } else {
            vec![0; count]
        };
        comm.broadcast(&mut b, 1).unwrap();
        assert!(b.iter().enumerate().all(|(i, &x)| x == i as i32));
        comm.destroy().unwrap();
        weights
    });
    for (r, w) in seen.iter().enumerate() {
        assert_eq!(w, &seen[0], "rank {r} used other weights than rank 0");
    }
    let w = &seen[0];
    let first_adopted = 2 * RELAY_RATE_PERIOD as usize;
    assert!(
        w[..first_adopted].iter().all(|x| x == &[1, 1]),
        "equal segments until the first exchange is adopted: {w:?}"
    );
    let last = w.last().unwrap();
    assert!(
        last[0] < last[1],
        "the slow relay 0 should get the smaller segment: {w:?}"
    );
}

/// `MR_VERIFY=1` with rate-weighted segments: relay 0 is slow (so it gets a small segment once
/// the weights are adopted) and relay 1 corrupts every result. Elements relay 1 summed that an
/// equal cut would give relay 0 must still be blamed on relay 1: the records carry the weights
/// the op was cut by.
#[test]
fn verification_blames_the_relay_whose_weighted_segment_was_wrong() {
    let peers = 2;
    let count = 64 << 10;
    let relays = vec![
        RelayProc::start_with_env(TOKEN, &[], &[("MR_RELAY_TEST_DELAY_US", "2000")]),
        RelayProc::start_with_env(TOKEN, &[], &[("MR_RELAY_TEST_CORRUPT", "1")]),
    ];
    assert!(
        relays[0].wait_log("delay per data frame"),
        "the delay is on"
    );
    let (slow, bad) = (relays[0].addr.clone(), relays[1].addr.clone());
    let mut cfg = relay_config(&relays, TOKEN);
    cfg.chunk_bytes = 16 << 10;
    cfg.relay_chunk_bytes = 16 << 10;
    cfg.verify = true;
    let ops = 3 * RELAY_RATE_PERIOD as usize;
    let seen = run_job(peers, cfg, move |comm| {
        let rank = comm.rank();
        let mut out = Vec::new();
        for op in 0..ops {
            let mut v: Vec<i32> = (0..count).map(|i| val(rank, i, op)).collect();
            let err = comm.allreduce(&mut v, ReduceOp::Sum).err();
            out.push((comm.relay_weights(), err.map(|e| (e.kind, e.message))));
        }
        comm.destroy().unwrap();
        out
    });
    let mut weighted_ops = 0;
    for (op, (w, err)) in seen[0].iter().enumerate() {
        let (kind, msg) = err
            .clone()
            .unwrap_or_else(|| panic!("op {op} passed verification"));
        assert_eq!(kind, mapreduce::ErrorKind::Verify, "op {op}: {msg}");
        assert!(
            msg.contains(&bad),
            "op {op} does not name the corrupting relay: {msg}"
        );
        assert!(
            !msg.contains(&slow),
            "op {op} (weights {w:?}) blames the honest relay: {msg}"
        );
        if w[0] < w[1] {
            weighted_ops += 1;
        }
    }
    assert!(
        weighted_ops > 0,
        "the weights never favoured relay 1: {:?}",
        seen[0]
    );
}

//! What a stranger, or a token holder, can make a relay hold: memory reservations, stalled
//! connections, hello buffers, log lines and file descriptors are all bounded, and a real job
//! still gets its relays afterwards.

mod relay_util;

use mapreduce::relay::JobHello;
use mapreduce::wire::{FrameHeader, FrameKind};
use mapreduce::{Comm, ReduceOp};
use relay_util::{closed_within, hello_to, relay_config, run_job, RelayProc, TOKEN};
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn hello(job: u8, chunk_bytes: usize, window: usize) -> JobHello {
    JobHello {
        job: [job; 16],
        rank: 0,
        world: 2,
        stream: 0,
        streams: 1,
        chunk_bytes,
        window,
    }
}

/// A 3-rank all-reduce through `relay`; panics unless every rank used the relay and got the
/// right sums.
fn job_uses_relay(relay: &RelayProc) {
    let cfg = relay_config(std::slice::from_ref(relay), TOKEN);
    let count = 200_003;
    run_job(3, cfg, move |comm: Comm| {
        assert_eq!(
            comm.relays(),
            &[0],
            "rank {}: the job fell back to the ring",
            comm.rank()
        );
        let r = comm.rank() as i64;
        let mut v: Vec<i64> = (0..count as i64).map(|i| i + r).collect();
        comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
        for (i, x) in v.iter().enumerate() {
            assert_eq!(*x, 3 * i as i64 + 3);
        }
        comm.destroy().unwrap();
    });
}

#[test]
fn reservations_are_capped_per_job_and_end_with_the_job() {
    let relay = RelayProc::start_with(TOKEN, &["--idle-timeout-secs", "3"]);
    // One hello announcing 4 MiB chunks × window 64 asks for more than the whole 2 GiB.
    let e = hello_to(&relay.addr, &hello(1, 4 << 20, 64)).unwrap_err();
    assert!(e.message.contains("per job"), "{e}");
    // Two that stay under the per-job cap (half of the relay's 2 GiB) fill the relay between
    // them, then go silent.
    const GIB: usize = 1 << 30;
    let (holder, small) = (hello(2, 1 << 20, 58), hello(4, 64 << 10, 4));
    assert!(holder.budget() <= GIB && 2 * holder.budget() + small.budget() > 2 * GIB);
    let mut holders: Vec<TcpStream> = [2u8, 3]
        .iter()
        .map(|&j| hello_to(&relay.addr, &hello(j, 1 << 20, 58)).expect("admitted"))
        .collect();
    let e = hello_to(&relay.addr, &hello(4, 64 << 10, 4)).unwrap_err();
    assert!(e.message.contains("relay is full"), "{e}");
    // Their jobs end after the idle timeout, and the reservations with them.
    for s in &mut holders {
        assert!(
            closed_within(s, Duration::from_secs(15)),
            "an idle job kept its connection"
        );
    }
    assert!(relay.wait_log("no data within the idle timeout"));
    job_uses_relay(&relay);
}

#[test]
fn stalled_authenticated_connections_are_closed() {
    let relay = RelayProc::start_with(TOKEN, &["--frame-timeout-secs", "2"]);
    let desc = mapreduce::algo::OpDesc {
        coll: mapreduce::algo::Collective::AllReduce,
        seq: 1,
        dtype: mapreduce::DType::F32,
        op: ReduceOp::Sum,
        count: 1 << 20,
        root: 0,
        compress: mapreduce::compress::Compression::None,
    };
    // Half a header, and a whole header with a fifth of its payload.
    let mut half_header = hello_to(&relay.addr, &hello(5, 64 << 10, 4)).unwrap();
    half_header
        .write_all(&desc.header(0, 0, 4096).encode()[..20])
        .unwrap();
    let mut half_payload = hello_to(&relay.addr, &hello(6, 64 << 10, 4)).unwrap();
    half_payload
        .write_all(&desc.header(0, 0, 4096).encode())
        .unwrap();
    half_payload.write_all(&[0u8; 800]).unwrap();
    let started = Instant::now();
    for s in [&mut half_header, &mut half_payload] {
        assert!(
            closed_within(s, Duration::from_secs(15)),
            "a connection stalled mid-frame stayed open"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(relay.wait_log("stalled in the middle of a frame"));
    job_uses_relay(&relay);
}

#[test]
fn stalled_hellos_do_not_hold_memory() {
    let relay = RelayProc::start(TOKEN);
    let before = relay.rss_kib();
    // 2000 connections, each announcing a 64 KiB hello (or, for half of them, the largest
    // the relay reads) and sending part of it, then stalling.
    let mut conns = Vec::new();
    for i in 0..2000 {
        let Ok(mut s) = TcpStream::connect(&relay.addr) else {
            continue;
        };
        let len = if i % 2 == 0 { 64 << 10 } else { 1000 };
        let _ = s.write_all(&FrameHeader::new(FrameKind::Hello, len).encode());
        let _ = s.write_all(&[0x5a; 512]);
        conns.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let during = relay.rss_kib();
    drop(conns);
    std::thread::sleep(Duration::from_secs(2));
    let after = relay.rss_kib();
    eprintln!(
        "relay RSS: {before} KiB before, {during} KiB with 2000 stalled hellos, {after} KiB after"
    );
    assert!(
        during < 16 << 10,
        "relay RSS {during} KiB with stalled hellos"
    );
    assert!(after < 16 << 10, "relay RSS {after} KiB after they closed");
    // A thousand stalled hellos are more than may wait at once: the oldest made way.
    assert!(relay.wait_log("evicted: too many unauthenticated connections"));
    job_uses_relay(&relay);
}

#[test]
fn refused_connections_are_logged_as_a_summary() {
    let relay = RelayProc::start_with(TOKEN, &["--reject-log-secs", "1"]);
    for _ in 0..200 {
        let mut s = TcpStream::connect(&relay.addr).unwrap();
        let _ = s.write_all(&[0xff; 64]);
        assert!(closed_within(&mut s, Duration::from_secs(5)));
    }
    assert!(relay.wait_log("more connections refused or failed"));
    let warns = relay
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("closed connection"))
        .count();
    assert!(warns <= 10, "{warns} warnings for 200 refused connections");
}

#[test]
fn accept_recovers_after_running_out_of_descriptors() {
    // 64 descriptors, 150 connections that never say a word: the relay runs out of
    // descriptors while more are queued, and a real job arrives behind them.
    let relay = RelayProc::start_with_nofile(TOKEN, &[], 64);
    let idle: Vec<TcpStream> = (0..150)
        .map(|_| TcpStream::connect(&relay.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    job_uses_relay(&relay);
    eprintln!(
        "job through a relay out of descriptors took {:?}",
        started.elapsed()
    );
    assert!(relay.wait_log("evicted: out of file descriptors"));
    drop(idle);
}

#[test]
fn out_of_descriptors_with_nobody_to_evict_a_newcomer_hears_at_once() {
    // Authenticated connections of one job take every descriptor the relay has.
    let relay = RelayProc::start_with_nofile(TOKEN, &[], 48);
    let member = |rank| JobHello {
        world: 64,
        rank,
        ..hello(7, 64 << 10, 4)
    };
    let mut members = Vec::new();
    let refused = loop {
        let rank = members.len();
        assert!(rank < 64, "the relay never ran out of descriptors");
        let started = Instant::now();
        match hello_to(&relay.addr, &member(rank)) {
            Ok(s) => members.push(s),
            Err(e) => break (e, started.elapsed()),
        }
    };
    // Shed on the spare descriptor: closed at once, not left waiting for a timeout.
    let (e, took) = refused;
    assert_ne!(e.kind, mapreduce::ErrorKind::Timeout, "{e}");
    assert!(took < Duration::from_secs(3), "refusal took {took:?}");
    assert!(
        members.len() >= 30,
        "only {} connections fit",
        members.len()
    );
    assert!(relay.wait_log("out of file descriptors"));
    // Room again: the next one is accepted and joins.
    let last = members.len() - 1;
    drop(members.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    let rejoined = loop {
        // The relay may not have seen the close yet.
        match hello_to(&relay.addr, &member(last)) {
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            r => break r,
        }
    };
    assert!(rejoined.is_ok(), "{:?}", rejoined.err());
}

#[test]
fn connections_that_never_send_a_byte_are_not_warnings() {
    // Port probes and readiness checks (the demo's) connect and go; a relay logged each as a
    // WARN "closed connection ... Connection reset by peer", in the middle of the demo's table.
    let relay = RelayProc::start(TOKEN);
    for _ in 0..3 {
        let s = std::net::TcpStream::connect(&relay.addr).unwrap();
        // SO_LINGER 0: the close is a reset, as a probe's often is.
        socket2::SockRef::from(&s)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(s);
    }
    // A real job afterwards, so the probes' closes have surely been handled.
    job_uses_relay(&relay);
    assert!(
        relay.wait_log("closed connection from"),
        "the closes were logged"
    );
    let warned: Vec<String> = relay
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("closed connection"))
        .cloned()
        .collect();
    assert!(
        warned.is_empty(),
        "probes were logged as warnings: {warned:?}"
    );
}

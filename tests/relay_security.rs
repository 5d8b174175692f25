//! The relay daemon's defences and lifecycle: authentication, malformed frames, concurrent
//! jobs, unreachable relays, clean shutdown on SIGTERM and SIGINT.

mod relay_util;

use mapreduce::algo::{Collective, OpDesc};
use mapreduce::net::bootstrap::FrameIo;
use mapreduce::relay::JobHello;
use mapreduce::wire::{self, FrameHeader, FrameKind};
use mapreduce::{Comm, DType, ErrorKind, ReduceOp, UniqueId};
use relay_util::{relay_config, run_job, RelayProc, TOKEN};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A quick all-reduce job of `p` ranks through `relays`; checks the result.
fn sum_job(relays: &[RelayProc], p: usize, count: usize, salt: i64) {
    let cfg = relay_config(relays, TOKEN);
    run_job(p, cfg, move |comm| {
        assert_eq!(comm.relays().len(), relays_len(&comm));
        let r = comm.rank() as i64;
        let mut v: Vec<i64> = (0..count as i64).map(|i| i * salt + r).collect();
        comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
        let ranks: i64 = (0..p as i64).sum();
        for (i, x) in v.iter().enumerate() {
            assert_eq!(*x, p as i64 * i as i64 * salt + ranks);
        }
        comm.destroy().unwrap();
    });
}

fn relays_len(comm: &Comm) -> usize {
    comm.config().relays.len()
}

/// Read until the relay closes the connection (EOF or reset), within a few seconds.
fn closed_by_relay(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(_) => return true,
        }
    }
    false
}

/// The relay's key for jobs of [`TOKEN`] and a job hello from rank 0 of 2 of job `job`.
fn job_hello(relay: &RelayProc, job: u8, chunk_bytes: usize) -> ([u8; 32], Vec<u8>) {
    let token = relay_util::relay_token(TOKEN, &relay.addr);
    let key = wire::mac_key(&mapreduce::config::parse_hex("t", &token).unwrap());
    let body = JobHello {
        job: [job; 16],
        rank: 0,
        world: 2,
        stream: 0,
        streams: 1,
        chunk_bytes,
        window: 4,
    }
    .encode();
    (key, body)
}

fn authenticated(relay: &RelayProc, chunk_bytes: usize) -> TcpStream {
    let mut s = TcpStream::connect(&relay.addr).unwrap();
    let (key, body) = job_hello(relay, 9, chunk_bytes);
    FrameIo {
        stream: &mut s,
        deadline: Instant::now() + Duration::from_secs(5),
        what: "test".into(),
    }
    .client_handshake(&key, &body)
    .expect("handshake with the right token");
    s
}

#[test]
fn wrong_token_is_an_auth_error_and_is_not_logged() {
    let relay = RelayProc::start(TOKEN);
    let wrong = "ffeeddccbbaa99887766554433221100";
    let cfg = relay_config(std::slice::from_ref(&relay), wrong);
    let id = UniqueId::new(&cfg).unwrap();
    let handles: Vec<_> = (0..2)
        .map(|r| {
            let cfg = cfg.clone();
            std::thread::spawn(move || Comm::init(2, &id, r, cfg).map(|_| ()).unwrap_err())
        })
        .collect();
    for h in handles {
        let e = h.join().unwrap();
        assert_eq!(e.kind, ErrorKind::Auth, "{e}");
    }
    assert!(relay.wait_log("rejected connection"));
    let log = relay.log.lock().unwrap().join("\n");
    assert!(
        !log.contains(wrong) && !log.contains(TOKEN),
        "token leaked into the log"
    );
}

#[test]
fn malformed_frames_close_only_their_connection() {
    let mut relay = RelayProc::start(TOKEN);
    // Garbage instead of a Hello.
    let mut s = TcpStream::connect(&relay.addr).unwrap();
    s.write_all(&[0xff; 64]).unwrap();
    assert!(closed_by_relay(&mut s));
    // A Hello header announcing a huge payload.
    let mut s = TcpStream::connect(&relay.addr).unwrap();
    let mut h = FrameHeader::new(FrameKind::Hello, 0);
    h.len = 1 << 40;
    s.write_all(&h.encode()).unwrap();
    assert!(closed_by_relay(&mut s));
    // After authenticating: a data frame longer than the announced chunk size, and one whose
    // length field exceeds any frame limit.
    let desc = OpDesc {
        coll: Collective::AllReduce,
        seq: 1,
        dtype: DType::F32,
        op: ReduceOp::Sum,
        count: 1 << 20,
        root: 0,
        compress: mapreduce::compress::Compression::None,
    };
    for len in [4096 + 4, 1u64 << 40] {
        let mut s = authenticated(&relay, 4096);
        let mut h = desc.header(0, 0, 4);
        h.len = len;
        s.write_all(&h.encode()).unwrap();
        let _ = s.write_all(&[0u8; 4100]);
        assert!(closed_by_relay(&mut s), "frame of {len} bytes");
    }
    // Data outside the op.
    let mut s = authenticated(&relay, 4096);
    s.write_all(&desc.header(0, 4 << 20, 4).encode()).unwrap();
    s.write_all(&[0u8; 4]).unwrap();
    assert!(closed_by_relay(&mut s));
    assert!(relay.wait_log("exceeds"));
    assert!(relay.wait_log("announced chunks of at most 4096"));
    assert!(relay.is_running());
    // The relay still serves a real job.
    sum_job(std::slice::from_ref(&relay), 3, 300_001, 3);
}

#[test]
fn two_jobs_share_relays_concurrently() {
    let relays: Vec<RelayProc> = (0..2).map(|_| RelayProc::start(TOKEN)).collect();
    let relays = std::sync::Arc::new(relays);
    let jobs: Vec<_> = [(3usize, 2i64), (2, 5)]
        .into_iter()
        .map(|(p, salt)| {
            let relays = relays.clone();
            std::thread::spawn(move || {
                for _ in 0..3 {
                    sum_job(&relays, p, 500_000, salt);
                }
            })
        })
        .collect();
    for j in jobs {
        j.join().unwrap();
    }
}

#[test]
fn unreachable_relay_is_skipped() {
    let relay = RelayProc::start(TOKEN);
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let mut cfg = relay_config(std::slice::from_ref(&relay), TOKEN);
    cfg.relays.insert(0, dead_addr);
    run_job(2, cfg, |comm| {
        assert_eq!(comm.relays(), &[1]);
        let mut v = vec![comm.rank() as i32 + 1; 10_000];
        comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
        assert!(v.iter().all(|&x| x == 3));
        comm.destroy().unwrap();
    });
}

/// Send `sig` to the relay and wait (bounded) for it to exit; it must exit 0 and say so.
fn stops_cleanly_on(relay: &mut RelayProc, sig: i32) {
    // SAFETY: kill(2) on the pid of our own child process.
    assert_eq!(unsafe { libc::kill(relay.child.id() as i32, sig) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = relay.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "relay did not stop on signal {sig}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(relay.wait_log("signal received: shutting down"));
    assert!(relay.wait_log("relay stopped"));
}

#[test]
fn relay_stops_cleanly_on_sigterm() {
    let mut relay = RelayProc::start(TOKEN);
    sum_job(std::slice::from_ref(&relay), 2, 1000, 1);
    assert!(relay.wait_log("status:"));
    stops_cleanly_on(&mut relay, libc::SIGTERM);
}

/// SIGINT stops the relay as SIGTERM does, closing the connections of a job in progress.
#[test]
fn relay_stops_cleanly_on_sigint_with_a_peer_connected() {
    let mut relay = RelayProc::start(TOKEN);
    let hello = JobHello {
        job: [5; 16],
        rank: 0,
        world: 2,
        stream: 0,
        streams: 1,
        chunk_bytes: 64 << 10,
        window: 4,
    };
    let mut peer = relay_util::hello_to(&relay.addr, &hello).expect("admitted");
    stops_cleanly_on(&mut relay, libc::SIGINT);
    assert!(
        closed_by_relay(&mut peer),
        "the peer's connection is still open"
    );
}

#[test]
fn killed_only_relay_leaves_the_job_on_the_ring() {
    let mut relay = RelayProc::start(TOKEN);
    let mut cfg = relay_config(std::slice::from_ref(&relay), TOKEN);
    cfg.timeout = Duration::from_secs(10);
    let id = UniqueId::new(&cfg).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let handles: Vec<_> = (0..2)
        .map(|r| {
            let cfg = cfg.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                let comm = Comm::init(2, &id, r, cfg).unwrap();
                for i in 0..20 {
                    if i == 1 {
                        let _ = tx.send(());
                    }
                    let mut v = vec![r as f32 + 1.0; 4 << 20];
                    comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
                    assert!(v.iter().all(|&x| x == 3.0), "rank {r} op {i}");
                }
                comm.destroy().unwrap();
            })
        })
        .collect();
    rx.recv().unwrap();
    relay.child.kill().unwrap();
    for h in handles {
        h.join().unwrap();
    }
}

/// Read one frame (header and payload) from `s`.
fn read_frame(s: &mut TcpStream) -> (FrameHeader, Vec<u8>) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut raw = [0u8; wire::HEADER_LEN];
    s.read_exact(&mut raw).unwrap();
    let h = FrameHeader::decode(&raw).unwrap();
    let mut p = vec![0u8; h.len as usize];
    s.read_exact(&mut p).unwrap();
    (h, p)
}

/// A peer of a release with another frame-tag format (an older one sends 0 in its Hello) is
/// refused by name at the handshake instead of joining and failing every frame's tag; a relay
/// of another format is named by the peer's handshake the same way.
#[test]
fn another_tag_format_is_refused_by_name_at_the_handshake() {
    let relay = RelayProc::start(TOKEN);
    let (key, body) = job_hello(&relay, 7, 4096);
    for theirs in [0, wire::TAG_FORMAT + 1] {
        let mut s = TcpStream::connect(&relay.addr).unwrap();
        let (challenge, ns) = read_frame(&mut s);
        assert_eq!(challenge.kind(), FrameKind::Challenge);
        assert_eq!(
            challenge.aux,
            wire::TAG_FORMAT,
            "the relay names its format"
        );
        let hello = wire::Hello::sign(&key, &ns.try_into().unwrap(), &body).encode();
        let mut h = FrameHeader::new(FrameKind::Hello, hello.len());
        h.aux = theirs;
        s.write_all(&h.encode()).unwrap();
        s.write_all(&hello).unwrap();
        let (answer, reason) = read_frame(&mut s);
        let reason = String::from_utf8_lossy(&reason);
        assert_eq!(
            answer.kind(),
            FrameKind::Reject,
            "format {theirs}: {reason}"
        );
        assert!(
            reason.contains(&format!("frame-tag format {theirs}")),
            "format {theirs}: {reason}"
        );
        assert!(closed_by_relay(&mut s));
    }
    // The same job hello with this release's format is welcome.
    drop(authenticated(&relay, 4096));

    // A "relay" of an older release: its challenge carries no format.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let old = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let ns = [5u8; wire::NONCE_LEN];
        s.write_all(&FrameHeader::new(FrameKind::Challenge, ns.len()).encode())
            .unwrap();
        s.write_all(&ns).unwrap();
        // Hold the connection until the peer gives up on it.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        rest
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let e = FrameIo {
        stream: &mut s,
        deadline: Instant::now() + Duration::from_secs(5),
        what: "relay 0".into(),
    }
    .client_handshake_keys(&key, &body)
    .unwrap_err();
    assert!(
        e.message.contains("frame-tag format 0 (an older release"),
        "{e}"
    );
    drop(s);
    assert!(
        old.join().unwrap().is_empty(),
        "no Hello went to the old relay"
    );
}

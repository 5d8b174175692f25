//! Strangers at the door during init: silent, garbage and wrong-secret connections to rank 0's
//! bootstrap port and to the ranks' data ports cost a job nothing beyond the per-connection
//! handshake deadline, and nothing about them reaches the real ranks.

use mapreduce::net::inbound::HANDSHAKE_DEADLINE;
use mapreduce::wire::{FrameHeader, FrameKind};
use mapreduce::{Comm, Config, ReduceOp, UniqueId};
use std::collections::HashSet;
use std::io::Write;
use std::net::TcpStream;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The tests look at this process's listening sockets: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const RANKS: usize = 4;

fn config() -> Config {
    Config {
        timeout: Duration::from_secs(30),
        shm: false,
        ..Config::default()
    }
}

/// Init, then an all-reduce whose result is checked; returns how long init took.
fn rank(id: UniqueId, r: usize) -> JoinHandle<Duration> {
    std::thread::spawn(move || {
        let started = Instant::now();
        let comm = Comm::init(RANKS, &id, r, config()).expect("init despite strangers");
        let took = started.elapsed();
        let mut v = vec![r as i64 + 1; 10_000];
        comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
        assert!(v.iter().all(|&x| x == 10), "rank {r}: wrong sum");
        comm.destroy().unwrap();
        took
    })
}

/// Connections that never complete a handshake: silent ones, garbage, a huge hello header,
/// and a hello with a wrong MAC. Kept open (returned) until the job is done.
fn strangers(port: u16) -> Vec<TcpStream> {
    let addr = ("127.0.0.1", port);
    let mut conns = Vec::new();
    for _ in 0..8 {
        conns.extend(TcpStream::connect(addr));
    }
    for _ in 0..3 {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(&[0xff; 64]);
            conns.push(s);
        }
    }
    if let Ok(mut s) = TcpStream::connect(addr) {
        let _ = s.write_all(&FrameHeader::new(FrameKind::Hello, 60_000).encode());
        conns.push(s);
    }
    if let Ok(mut s) = TcpStream::connect(addr) {
        let _ = s.write_all(&FrameHeader::new(FrameKind::Hello, 100).encode());
        let _ = s.write_all(&[7u8; 100]);
        conns.push(s);
    }
    conns
}

/// Ports of this process's listening TCP sockets on 127.0.0.1.
fn listening_ports() -> HashSet<u16> {
    let mine: HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    std::fs::read_to_string("/proc/self/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, state, inode) = (f[1], f[3], f[9]);
            let (ip, port) = local.split_once(':')?;
            (state == "0A" && ip == "0100007F" && mine.contains(inode))
                .then(|| u16::from_str_radix(port, 16).ok())?
        })
        .collect()
}

fn assert_quick(handles: Vec<JoinHandle<Duration>>) {
    // Per-connection deadline plus generous slack for a loaded machine; strangers handled
    // one by one cost a deadline each, 13 of them here per port.
    let bound = HANDSHAKE_DEADLINE + Duration::from_secs(5);
    for (r, h) in handles.into_iter().enumerate() {
        let took = h.join().unwrap();
        eprintln!("rank {r}: init took {took:?}");
        assert!(took < bound, "rank {r}: init took {took:?}");
    }
}

#[test]
fn strangers_at_the_bootstrap_port_do_not_delay_init() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let id = UniqueId::new(&config()).unwrap();
    let held = strangers(id.address().unwrap().port());
    let handles = (0..RANKS).map(|r| rank(id, r)).collect();
    assert_quick(handles);
    drop(held);
}

#[test]
fn strangers_at_the_data_ports_do_not_delay_init() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = listening_ports();
    let id = UniqueId::new(&config()).unwrap();
    // Ranks 0..2 open their data listeners and wait for the last rank.
    let mut handles: Vec<_> = (0..RANKS - 1).map(|r| rank(id, r)).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let ports = loop {
        let new: HashSet<u16> = listening_ports().difference(&before).copied().collect();
        // The bootstrap listener and three data listeners.
        if new.len() > RANKS - 1 || Instant::now() > deadline {
            break new;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(ports.len(), RANKS, "listeners found: {ports:?}");
    let held: Vec<TcpStream> = ports.iter().flat_map(|&p| strangers(p)).collect();
    handles.push(rank(id, RANKS - 1));
    assert_quick(handles);
    drop(held);
}

#[test]
fn a_rank_with_the_wrong_secret_is_told_and_the_job_goes_on() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = config();
    let id = UniqueId::new(&cfg).unwrap();
    // Same address and job id, another secret.
    let text = String::from_utf8_lossy(id.as_bytes())
        .trim_end_matches('\0')
        .to_string();
    let parts: Vec<&str> = text.split(' ').collect();
    let forged = format!("{} {} {} {}", parts[0], parts[1], "ab".repeat(32), parts[3]);
    let mut bytes = [0u8; 256];
    bytes[..forged.len()].copy_from_slice(forged.as_bytes());
    let wrong = UniqueId(bytes);
    let zero = {
        let cfg = cfg.clone();
        std::thread::spawn(move || Comm::init(2, &id, 0, cfg).map(|c| c.destroy()))
    };
    let e = Comm::init(2, &wrong, 1, cfg.clone())
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.kind, mapreduce::ErrorKind::Auth, "{e}");
    let one = Comm::init(2, &id, 1, cfg).expect("the real rank 1 joins");
    one.destroy().unwrap();
    zero.join().unwrap().unwrap().unwrap();
}

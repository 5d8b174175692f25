//! Integrity of every frame: a proxy that flips one byte between peers and a relay, or
//! between two ranks, never gets a wrong result returned as success. A flip costs a relay
//! (its chunks are redone through the others) or fails the op with an error naming the link.

mod relay_util;

use mapreduce::wire::{BodyReader, BodyWriter, FrameHeader, FrameKind, HEADER_LEN};
use mapreduce::{Algo, Comm, Config, ReduceOp, UniqueId};
use relay_util::{RelayProc, TOKEN};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Bytes of the handshake an acceptor sends before the first data frame: `Challenge` (header
/// and nonce), `Welcome` (header and MAC, empty body).
const HANDSHAKE_DOWN: u64 = 2 * (HEADER_LEN as u64 + 32);
/// Where in the acceptor→connector byte stream the flip lands: well inside the first 64 KiB
/// data frame after the handshake (and after the few small frames that may precede it).
const FLIP_AT: u64 = HANDSHAKE_DOWN + 20_000;

/// A TCP proxy in front of `target` that flips one byte (at `FLIP_AT` of the target→client
/// direction, or of the client→target one with `upstream`) in the connections `pick`
/// selects, by accept order.
struct FlipProxy {
    addr: String,
    flips: Arc<AtomicUsize>,
}

impl FlipProxy {
    /// Start the proxy; flips are counted in `flips`.
    fn start(
        target: String,
        pick: impl Fn(usize) -> bool + Send + 'static,
        flips: Arc<AtomicUsize>,
        upstream: bool,
    ) -> FlipProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let counter = flips.clone();
        std::thread::spawn(move || {
            for (k, client) in listener.incoming().enumerate() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let flip = pick(k).then_some(FLIP_AT);
                let (up, down) = if upstream { (flip, None) } else { (None, flip) };
                pump(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    up,
                    Some(counter.clone()),
                );
                pump(server, client, down, Some(counter.clone()));
            }
        });
        FlipProxy { addr, flips }
    }

    fn flips(&self) -> usize {
        self.flips.load(Ordering::SeqCst)
    }
}

/// Copy `from` → `to` in a thread, flipping the byte at stream offset `flip` (if any).
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    flip: Option<u64>,
    flips: Option<Arc<AtomicUsize>>,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut pos = 0u64;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(at) = flip {
                if (pos..pos + n as u64).contains(&at) {
                    buf[(at - pos) as usize] ^= 0x40;
                    if let Some(f) = &flips {
                        f.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            pos += n as u64;
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
    });
}

const COUNT: usize = 1 << 18; // 1 MiB of f32: 16 relay chunks of 64 KiB

fn input(rank: usize, i: usize) -> f32 {
    ((i * 7 + rank * 3) % 1001) as f32
}

fn want(world: usize, i: usize) -> f32 {
    (0..world).map(|r| input(r, i)).sum()
}

/// What one rank's all-reduce returned: `Ok(true)` right, `Ok(false)` wrong, or the error.
type Outcome = Result<bool, mapreduce::Error>;

fn run_allreduce(world: usize, cfg: Config, ids: Vec<UniqueId>) -> Vec<Outcome> {
    let handles: Vec<_> = (0..world)
        .map(|r| {
            let cfg = cfg.clone();
            let id = ids[r];
            std::thread::spawn(move || -> Outcome {
                let comm = Comm::init(world, &id, r, cfg)?;
                let mut v: Vec<f32> = (0..COUNT).map(|i| input(r, i)).collect();
                let res = comm.allreduce(&mut v, ReduceOp::Sum);
                let _ = comm.destroy();
                res?;
                Ok(v.iter()
                    .enumerate()
                    .all(|(i, &x)| x.to_bits() == want(world, i).to_bits()))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// A relay job of 3 ranks whose relay 0 sits behind a flipping proxy (the job names the
/// proxy's address, so that is what relay 0's token is bound to); relay 1 is direct. Returns
/// each rank's outcome and how many bytes the proxy flipped.
fn relay_job(pick: impl Fn(usize) -> bool + Send + 'static, verify: bool) -> (Vec<Outcome>, usize) {
    relay_job_flipping(pick, verify, false)
}

/// As [`relay_job`]; `upstream` flips the peers' uploads to relay 0 instead of its results.
fn relay_job_flipping(
    pick: impl Fn(usize) -> bool + Send + 'static,
    verify: bool,
    upstream: bool,
) -> (Vec<Outcome>, usize) {
    let world = 3;
    let listen = relay_util::free_addr();
    let counter = Arc::new(AtomicUsize::new(0));
    let proxy = FlipProxy::start(listen.clone(), pick, counter, upstream);
    let relay_a = RelayProc::start_named(TOKEN, &listen, &proxy.addr);
    let relay_b = RelayProc::start(TOKEN);
    let cfg = Config {
        timeout: Duration::from_secs(30),
        algo: Algo::Relay,
        relays: vec![proxy.addr.clone(), relay_b.addr.clone()],
        token: Some(mapreduce::config::parse_hex("token", TOKEN).unwrap()),
        chunk_bytes: 64 << 10,
        relay_chunk_bytes: 64 << 10,
        streams: 1,
        verify,
        shm: false,
        ..Config::default()
    };
    let id = UniqueId::new(&cfg).unwrap();
    let out = run_allreduce(world, cfg, vec![id; world]);
    drop((relay_a, relay_b));
    (out, proxy.flips())
}

/// Never `Ok(false)`: a wrong result reported as success.
fn assert_no_silent_corruption(what: &str, out: &[Outcome], flips: usize) {
    assert!(
        flips > 0,
        "{what}: the proxy flipped nothing; the test did not bite"
    );
    for (r, o) in out.iter().enumerate() {
        if let Ok(false) = o {
            panic!("{what}: rank {r} returned success with a wrong result ({out:?})");
        }
    }
}

/// With one relay left after the flip, every rank still completes with the right result.
fn assert_all_correct(what: &str, out: &[Outcome]) {
    for (r, o) in out.iter().enumerate() {
        assert!(
            matches!(o, Ok(true)),
            "{what}: rank {r} did not complete through the surviving relay: {o:?}"
        );
    }
}

#[test]
fn flip_in_one_ranks_copy_of_a_relay_result() {
    for verify in [false, true] {
        // The first connection accepted is one rank's only stream to relay 0.
        let (out, flips) = relay_job(|k| k == 0, verify);
        let what = format!("one rank's copy, MR_VERIFY={}", u8::from(verify));
        assert_no_silent_corruption(&what, &out, flips);
        assert_all_correct(&what, &out);
    }
}

#[test]
fn flip_in_every_ranks_copy_of_a_relay_result() {
    for verify in [false, true] {
        // Every rank's stream from relay 0 flipped at the same place: the same element of
        // the same result chunk is wrong for everyone, so comparing copies cannot catch it.
        let (out, flips) = relay_job(|_| true, verify);
        let what = format!("every rank's copy, MR_VERIFY={}", u8::from(verify));
        assert!(flips >= 3, "{what}: only {flips} of 3 streams flipped");
        assert_no_silent_corruption(&what, &out, flips);
        assert_all_correct(&what, &out);
    }
}

#[test]
fn flip_in_a_ranks_upload_to_a_relay() {
    // The relay sees the bad tag and closes that rank's stream; the rank drops the relay, the
    // others learn of it from that rank, and every rank redoes its chunks elsewhere.
    let (out, flips) = relay_job_flipping(|k| k == 1, false, true);
    assert_no_silent_corruption("upload to a relay", &out, flips);
    assert_all_correct("upload to a relay", &out);
}

/// Rank 0's bootstrap connection to rank 1, with the address table rewritten so that rank 1
/// reaches rank 0's data listener through a flipping proxy (what an on-path attacker can do).
fn bootstrap_redirect(boot: String) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let flips = Arc::new(AtomicUsize::new(0));
    let counter = flips.clone();
    std::thread::spawn(move || {
        let (client, _) = listener.accept().unwrap();
        let server = TcpStream::connect(&boot).unwrap();
        pump(
            client.try_clone().unwrap(),
            server.try_clone().unwrap(),
            None,
            None,
        );
        // Rank 0 → rank 1: pass frames through, rewriting rank 0's address in the table.
        let (mut from, mut to) = (server, client);
        loop {
            let mut raw = [0u8; HEADER_LEN];
            if from.read_exact(&mut raw).is_err() {
                break;
            }
            let mut h = FrameHeader::decode(&raw).unwrap();
            let mut payload = vec![0u8; h.len as usize];
            from.read_exact(&mut payload).unwrap();
            if h.kind() == FrameKind::Control {
                let mut r = BodyReader::new(&payload, "table");
                let n = r.u32().unwrap() as usize;
                let addrs: Vec<String> = (0..n).map(|_| r.string().unwrap()).collect();
                let proxy = FlipProxy::start(addrs[0].clone(), |k| k == 0, counter.clone(), false);
                let mut w = BodyWriter::default().u32(n as u32);
                w = w.bytes(proxy.addr.as_bytes());
                for a in &addrs[1..] {
                    w = w.bytes(a.as_bytes());
                }
                payload = w.finish();
                h.len = payload.len() as u64;
            }
            if to.write_all(&h.encode()).is_err() || to.write_all(&payload).is_err() {
                break;
            }
        }
    });
    (addr, flips)
}

#[test]
fn flip_on_a_rank_link_fails_the_op_naming_the_link() {
    let cfg = Config {
        timeout: Duration::from_secs(20),
        algo: Algo::Ring,
        chunk_bytes: 64 << 10,
        streams: 1,
        shm: false,
        ..Config::default()
    };
    let id0 = UniqueId::new(&cfg).unwrap();
    let boot = id0.address().unwrap().to_string();
    let (redirect, flips) = bootstrap_redirect(boot.clone());
    // Rank 1 reaches rank 0's bootstrap through the redirecting proxy.
    let text = String::from_utf8(id0.as_bytes().to_vec())
        .unwrap()
        .replace(&boot, &redirect);
    let mut id1 = UniqueId([0; 256]);
    let text = text.trim_end_matches('\0');
    id1.0[..text.len()].copy_from_slice(text.as_bytes());
    let out = run_allreduce(2, cfg, vec![id0, id1]);
    assert_no_silent_corruption("rank link", &out, flips.load(Ordering::SeqCst));
    // Rank 1 received the flipped frame: its op fails, and the error names rank 0 and says why.
    match &out[1] {
        Err(e) => assert!(
            e.message.contains("rank 0") && e.message.contains("integrity"),
            "rank 1's error does not name the link: {e}"
        ),
        Ok(ok) => panic!("rank 1 returned success (result right: {ok}) after a flipped frame"),
    }
}

//! Separate secrets: a static relay holds only its own token, derived one-way from the job
//! secret (`MR_TOKEN`) and its address. With that token nobody can join the job's bootstrap or
//! predict where `MR_VERIFY` samples.

mod relay_util;

use mapreduce::net::bootstrap::{env_unique_id, sample_secret};
use mapreduce::validator::verify::positions;
use mapreduce::wire::relay_token;
use mapreduce::{Algo, Comm, Config, ErrorKind, ReduceOp};
use relay_util::free_addr;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const SECRET: &[u8] = b"the job secret, kept by the ranks";
const RELAYS: [&str; 2] = ["127.0.0.1:7101", "relay-b.example:7000"];

fn env_config() -> Config {
    Config {
        timeout: Duration::from_secs(20),
        algo: Algo::Ring,
        token: Some(SECRET.to_vec()),
        shm: false,
        ..Config::default()
    }
}

#[test]
fn relay_token_holder_cannot_join_the_bootstrap() {
    let addr: SocketAddr = free_addr().parse().unwrap();
    let cfg = env_config();
    let id0 = env_unique_id(0, SECRET, addr, cfg.timeout).unwrap();
    let rank0 = {
        let cfg = cfg.clone();
        std::thread::spawn(move || -> mapreduce::Result<Vec<f32>> {
            let comm = Comm::init(2, &id0, 0, cfg)?;
            let mut v = vec![1.0f32; 1000];
            comm.allreduce(&mut v, ReduceOp::Sum)?;
            comm.destroy()?;
            Ok(v)
        })
    };
    // The operator of a relay knows its token and rank 0's address, and poses as rank 1 the
    // way a rank joins from the environment (`MR_TOKEN` = what it knows).
    for relay in RELAYS {
        let token = relay_token(SECRET, relay);
        let id = env_unique_id(1, &token, addr, cfg.timeout).unwrap();
        let started = Instant::now();
        let attacker = Config {
            token: Some(token.to_vec()),
            timeout: Duration::from_secs(5),
            ..cfg.clone()
        };
        let e = match Comm::init(2, &id, 1, attacker) {
            Ok(_) => panic!("the holder of relay {relay}'s token joined the job as rank 1"),
            Err(e) => e,
        };
        assert!(
            e.kind == ErrorKind::Auth || e.kind == ErrorKind::InvalidArgument,
            "refused for the wrong reason: {e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "refusal took {:?}",
            started.elapsed()
        );
    }
    // The real rank 1 is unaffected.
    let id1 = env_unique_id(1, SECRET, addr, cfg.timeout).unwrap();
    let comm = Comm::init(2, &id1, 1, cfg).expect("the real rank 1 joins");
    let mut v = vec![2.0f32; 1000];
    comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
    assert!(v.iter().all(|&x| x == 3.0));
    comm.destroy().unwrap();
    let v0 = rank0.join().unwrap().expect("rank 0");
    assert!(v0.iter().all(|&x| x == 3.0));
}

#[test]
fn sample_positions_do_not_follow_from_relay_tokens() {
    let addr: SocketAddr = "127.0.0.1:29500".parse().unwrap();
    let timeout = Duration::from_secs(1);
    // What every rank of the job draws its MR_VERIFY sample positions from.
    let real = sample_secret(&env_unique_id(1, SECRET, addr, timeout).unwrap());
    let real_positions = positions(&real, 7, 1 << 20, 16);
    for relay in RELAYS {
        let token = relay_token(SECRET, relay);
        assert_ne!(&token[..], SECRET, "a relay must not hold the job secret");
        // A relay that plugs its token in where the job uses its secret gets other positions.
        let guess = sample_secret(&env_unique_id(1, &token, addr, timeout).unwrap());
        assert_ne!(
            guess, real,
            "relay {relay}'s token predicts the sample secret"
        );
        assert_ne!(positions(&guess, 7, 1 << 20, 16), real_positions);
    }
    // And each relay's token is its own: one relay's token is no other relay's.
    assert_ne!(
        relay_token(SECRET, RELAYS[0]),
        relay_token(SECRET, RELAYS[1])
    );
}

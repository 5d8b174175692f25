//! Pinned wire traffic of the rank-to-rank schedules. Ranks built from different versions of
//! this code must still agree frame by frame, so a change to what any schedule sends (its
//! frames, their order on a link, their payloads) is a wire change, never a refactor. Each case
//! drives every rank of one op through a seeded in-memory network and hashes every frame as it
//! leaves (sender, receiver, encoded header, payload) and then every rank's result; the digests
//! below were recorded before the ring, broadcast and recursive-doubling schedules were split
//! into their own files. A deliberate wire change updates them (the failure prints the table).

use crate::algo::sim::Rng;
use crate::algo::{Collective, Endpoint, OpDesc, Transmit};
use crate::buffer::{OpMemory, RawBuf};
use crate::config::Config;
use crate::types::{DType, ReduceOp};
use crate::wire::FrameHeader;

struct Case {
    coll: Collective,
    dtype: DType,
    op: ReduceOp,
    n: usize,
    count: usize,
    root: usize,
    chunk: usize,
    small: usize,
}

fn encode(dtype: DType, v: i64) -> Vec<u8> {
    match dtype {
        DType::F32 => (v as f32).to_le_bytes().to_vec(),
        DType::F64 => (v as f64).to_le_bytes().to_vec(),
        DType::F16 => half::f16::from_f64(v as f64)
            .to_bits()
            .to_le_bytes()
            .to_vec(),
        DType::BF16 => half::bf16::from_f64(v as f64)
            .to_bits()
            .to_le_bytes()
            .to_vec(),
        DType::I8 => (v as i8).to_le_bytes().to_vec(),
        DType::U8 => (v as u8).to_le_bytes().to_vec(),
        DType::I32 => (v as i32).to_le_bytes().to_vec(),
        DType::I64 => v.to_le_bytes().to_vec(),
    }
}

/// Frames sent and the digest of the traffic and results of `c`, deliveries ordered by `seed`.
fn traffic(c: &Case, seed: u64) -> (usize, String) {
    let desc = OpDesc::new(c.coll, 1, c.dtype, c.op, c.count, c.root);
    let cfg = Config {
        chunk_bytes: c.chunk,
        small_bytes: c.small,
        ..Config::default()
    };
    let (n, count, size) = (c.n, c.count, c.dtype.size());
    let data = |r: usize, len: usize| -> Vec<u8> {
        (0..len)
            .flat_map(|i| encode(c.dtype, ((r * 7 + i * 3) % 11) as i64 - 3))
            .collect()
    };
    let (mut users, mut inputs): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (0..n)
        .map(|r| match c.coll {
            Collective::AllReduce => (data(r, count), Vec::new()),
            Collective::ReduceScatter => (vec![0; count * size], data(r, n * count)),
            Collective::AllGather => (vec![0; n * count * size], data(r, count)),
            Collective::Broadcast if r == c.root => (data(r, count), Vec::new()),
            Collective::Broadcast => (vec![0; count * size], Vec::new()),
            _ => (Vec::new(), Vec::new()),
        })
        .unzip();
    let mut ranks: Vec<_> = (0..n)
        .map(|r| {
            // SAFETY: the vectors outlive the schedules (dropped below, before the vectors
            // are read) and are never reallocated meanwhile.
            let mut mem =
                OpMemory::new(unsafe { RawBuf::new(users[r].as_mut_ptr(), users[r].len()) });
            mem.input = unsafe { RawBuf::new(inputs[r].as_mut_ptr(), inputs[r].len()) };
            let mut s = crate::algo::plan::build(&desc, r, n, &cfg, &mut mem).unwrap();
            s.start(&mut mem).unwrap();
            (s, mem, Vec::<Transmit>::new())
        })
        .collect();
    let mut net: Vec<(usize, usize, FrameHeader, Vec<u8>)> = Vec::new();
    let mut rng = Rng::new(seed);
    let mut digest = blake3::Hasher::new();
    let mut frames = 0;
    for _ in 0..1_000_000 {
        for (s, mem, in_flight) in ranks.iter_mut() {
            while let Some(t) = s.poll_transmit(mem) {
                in_flight.push(t);
            }
        }
        let sends: usize = ranks.iter().map(|k| k.2.len()).sum();
        let total = sends + net.len();
        if total == 0 {
            break;
        }
        let mut pick = rng.below(total);
        if pick < sends {
            for (r, k) in ranks.iter_mut().enumerate() {
                if pick < k.2.len() {
                    let t = k.2.remove(pick);
                    let payload = k.1.bytes(&t.region).to_vec();
                    k.0.handle_sent(&t);
                    let Endpoint::Rank(to) = t.to else {
                        panic!("no relays here")
                    };
                    digest.update(&(r as u64).to_le_bytes());
                    digest.update(&(to as u64).to_le_bytes());
                    digest.update(&t.header.encode());
                    digest.update(&payload);
                    frames += 1;
                    net.push((r, to, t.header, payload));
                    break;
                }
                pick -= k.2.len();
            }
            continue;
        }
        let (from, to, h, p) = net.swap_remove(pick - sends);
        let (s, mem, _) = &mut ranks[to];
        let from = Endpoint::Rank(from);
        if rng.below(2) == 0 {
            match s.recv_in_place(from, &h).unwrap() {
                Some(region) => {
                    mem.bytes_mut(&region).copy_from_slice(&p);
                    s.handle_frame_in_place(mem, from, &h).unwrap();
                }
                None => s.handle_frame(mem, from, &h, &p).unwrap(),
            }
        } else {
            s.handle_frame(mem, from, &h, &p).unwrap();
        }
    }
    assert!(
        ranks.iter().all(|k| k.0.is_complete()),
        "op did not complete"
    );
    drop(ranks);
    for u in &users {
        digest.update(u);
    }
    (frames, digest.finalize().to_hex()[..16].to_string())
}

#[test]
fn rank_to_rank_frames_match_the_pinned_digests() {
    use Collective::*;
    use DType::*;
    use ReduceOp::*;
    const BIG: usize = 1 << 20;
    let case = |coll, dtype, op, n, count, root, chunk, small| Case {
        coll,
        dtype,
        op,
        n,
        count,
        root,
        chunk,
        small,
    };
    // Ring (small 0), recursive doubling (small BIG), chain (small 0) and tree broadcasts.
    let cases = [
        (
            case(AllReduce, F32, Sum, 4, 300, 0, 64, 0),
            120,
            "48d66bcae90fe0e3",
        ),
        (
            case(AllReduce, F16, Avg, 3, 37, 0, 8, 0),
            76,
            "f162da935ce849e3",
        ),
        (
            case(AllReduce, BF16, Max, 5, 1000, 0, 64, 0),
            520,
            "a41490a61a02bfe4",
        ),
        (
            case(AllReduce, I32, Sum, 7, 5, 0, 8, 0),
            60,
            "4743b21566723e11",
        ),
        (
            case(AllReduce, F64, Prod, 2, 37, 0, BIG, 0),
            4,
            "723b9e9af69e78cd",
        ),
        (
            case(AllReduce, F32, Sum, 5, 37, 0, 64, BIG),
            10,
            "d3511dcdb29a1132",
        ),
        (
            case(AllReduce, F16, Min, 3, 37, 0, 64, BIG),
            4,
            "e7614fc52b9266a6",
        ),
        (
            case(ReduceScatter, F16, Sum, 4, 37, 0, 8, 0),
            228,
            "7c17eef62c77fca9",
        ),
        (
            case(ReduceScatter, I32, Max, 3, 300, 0, 64, 0),
            114,
            "408a5631d8b613b9",
        ),
        (
            case(AllGather, F32, Sum, 4, 37, 0, 8, 0),
            228,
            "07335d20c57764d0",
        ),
        (
            case(AllGather, U8, Sum, 5, 300, 0, 64, 0),
            100,
            "c158b3e7880ad6fb",
        ),
        (
            case(Broadcast, F32, Sum, 5, 300, 2, 64, 0),
            76,
            "fa8881691df45765",
        ),
        (
            case(Broadcast, F16, Sum, 7, 37, 3, 64, BIG),
            12,
            "3c1ad2ad47633e81",
        ),
        (
            case(Barrier, U8, Sum, 5, 0, 0, 64, BIG),
            10,
            "687e4f467c57f87c",
        ),
        (
            case(Barrier, U8, Sum, 6, 0, 0, 64, BIG),
            12,
            "0c81e6fd61ecc2fd",
        ),
    ];
    let mut table = String::new();
    let mut wrong = 0;
    for (i, (c, frames, digest)) in cases.iter().enumerate() {
        let got = traffic(c, 1000 + i as u64);
        let changed = (got.0, got.1.as_str()) != (*frames, *digest);
        wrong += usize::from(changed);
        let mark = if changed { "  <- changed" } else { "" };
        table.push_str(&format!("case {i}: {}, \"{}\"{mark}\n", got.0, got.1));
    }
    assert_eq!(
        wrong, 0,
        "frames changed; now (frames, digest) per case:\n{table}"
    );
}

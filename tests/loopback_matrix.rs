//! Every collective, dtype and reduction across real processes on 127.0.0.1.
//! Reduce takes the all-reduce path; gather, scatter and all-to-all(v) go through shared
//! memory where the other collectives do (checked with [`Comm::shared_memory_ops`]).
//!
//! Each world size runs three times: over TCP (`MR_ALGO=ring`) with `MR_SMALL_BYTES=0`
//! (all-reduce always takes the ring) and with `MR_SMALL_BYTES=max` (always recursive
//! doubling), and with the default `MR_ALGO=auto`, where ranks on one host share memory. A
//! small `MR_CHUNK_BYTES` makes the larger counts span several chunks per block (and many
//! shared-memory chunks). Each launch runs hundreds of ops in one
//! set of processes; children report failures as `ERR` lines and totals as `OK` lines.

mod support;

use mapreduce::{Comm, DType, ReduceOp, Request};
use std::time::Duration;
use support::data::{self, Buf};
use support::{ok, say, Ctx};

const CHUNK: usize = 4096;
/// Not a multiple of the chunk in any dtype, and more than one segment per block for 8 ranks.
const ODD_COUNT: usize = 40_003;
const BIG_COUNT: usize = 16 << 20; // 64 MiB of f32

#[test]
#[ignore = "entry point of the child ranks the other tests spawn"]
fn rank_child() {
    support::child_entry(play);
}

fn play(mut ctx: Ctx) {
    let comm = ctx.init().expect("init");
    ok("path", path(&comm));
    match ctx.scenario.as_str() {
        "matrix" => matrix(&comm),
        "big" => big(&comm),
        s => panic!("unknown scenario {s}"),
    }
    comm.destroy().expect("destroy");
}

fn counts(n: usize) -> Vec<usize> {
    let mut c = vec![0, 1, n - 1, ODD_COUNT];
    c.sort();
    c.dedup();
    c
}

fn path(comm: &Comm) -> &'static str {
    if comm.uses_shared_memory() {
        "shm"
    } else if comm.config().small_bytes == 0 {
        "ring"
    } else {
        "rd"
    }
}

/// Report a wrong result (the parent fails on any `ERR`).
fn check(name: &str, got: &[u8], want: &[u8], elem: usize) -> bool {
    match data::first_diff(got, want, elem) {
        None => true,
        Some(d) => {
            say(&format!("ERR {name} WrongResult {d}"));
            false
        }
    }
}

fn fail(name: &str, e: mapreduce::Error) {
    support::err(name, &e);
}

fn matrix(comm: &Comm) {
    let (r, n) = (comm.rank(), comm.size());
    let p = path(comm);
    let mut checked = 0usize;

    // All-reduce: every dtype x op x count.
    for &count in &counts(n) {
        for dtype in DType::ALL {
            for op in ReduceOp::ALL {
                let name = format!("allreduce/{p}/{dtype}/{op}/{count}");
                let mut buf = data::encode(dtype, 0, count, |i| data::value(r, i, dtype, op));
                let want = data::encode(dtype, 0, count, |i| data::expected(n, i, dtype, op));
                // SAFETY: `buf` outlives the request, which is waited for at once.
                let res = unsafe { comm.iallreduce_raw(buf.ptr(), count, dtype, op) }
                    .and_then(Request::wait);
                match res {
                    Ok(()) => {
                        checked += check(&name, buf.bytes(), want.bytes(), dtype.size()) as usize
                    }
                    Err(e) => fail(&name, e),
                }
            }
        }
    }
    ok("allreduce_checked", checked);

    // Reduce-scatter: every dtype x op x per-rank count.
    let mut checked = 0usize;
    for &rc in &counts(n) {
        for dtype in DType::ALL {
            for op in ReduceOp::ALL {
                let name = format!("reduce_scatter/{dtype}/{op}/{rc}");
                let send = data::encode(dtype, 0, rc * n, |i| data::value(r, i, dtype, op));
                let want = data::encode(dtype, r * rc, rc, |i| data::expected(n, i, dtype, op));
                let mut recv = Buf::filled(rc * dtype.size(), 0xa5);
                let mut send = send;
                // SAFETY: both buffers outlive the request, which is waited for at once.
                let res =
                    unsafe { comm.ireduce_scatter_raw(send.ptr(), recv.ptr(), rc, dtype, op) }
                        .and_then(Request::wait);
                match res {
                    Ok(()) => {
                        checked += check(&name, recv.bytes(), want.bytes(), dtype.size()) as usize
                    }
                    Err(e) => fail(&name, e),
                }
            }
        }
    }
    ok("reduce_scatter_checked", checked);

    // All-gather and broadcast (from several roots): every dtype x count.
    let mut roots = vec![0, n / 2, n - 1];
    roots.dedup();
    let mut gathered = 0usize;
    let mut broadcast = 0usize;
    for &count in &counts(n) {
        for dtype in DType::ALL {
            let name = format!("allgather/{dtype}/{count}");
            let pattern = |rank: usize, i: usize| ((rank * 37 + i * 11) % 100) as f64;
            let mut send = data::encode(dtype, 0, count, |i| pattern(r, i));
            let mut want = Vec::new();
            for q in 0..n {
                want.extend_from_slice(data::encode(dtype, 0, count, |i| pattern(q, i)).bytes());
            }
            let mut recv = Buf::filled(count * n * dtype.size(), 0x5a);
            // SAFETY: both buffers outlive the request, which is waited for at once.
            let res = unsafe { comm.iallgather_raw(send.ptr(), recv.ptr(), count, dtype) }
                .and_then(Request::wait);
            match res {
                Ok(()) => gathered += check(&name, recv.bytes(), &want, dtype.size()) as usize,
                Err(e) => fail(&name, e),
            }

            for &root in &roots {
                let name = format!("broadcast/{dtype}/{count}/root{root}");
                let want = data::encode(dtype, 0, count, |i| pattern(root + 1000, i));
                let mut buf = if r == root {
                    Buf::from_bytes(want.bytes())
                } else {
                    Buf::filled(want.len(), 0x5a)
                };
                // SAFETY: `buf` outlives the request, which is waited for at once.
                let res = unsafe { comm.ibroadcast_raw(buf.ptr(), count, dtype, root) }
                    .and_then(Request::wait);
                match res {
                    Ok(()) => {
                        broadcast += check(&name, buf.bytes(), want.bytes(), dtype.size()) as usize
                    }
                    Err(e) => fail(&name, e),
                }
            }
        }
    }
    ok("allgather_checked", gathered);
    ok("broadcast_checked", broadcast);

    let mut barriers = 0;
    for k in 0..3 {
        match comm.barrier() {
            Ok(()) => barriers += 1,
            Err(e) => fail(&format!("barrier/{k}"), e),
        }
    }
    ok("barrier_checked", barriers);

    rooted(comm);
    exchanges(comm);
    nonblocking(comm);
    hashes(comm);
}

/// Reduce (every dtype and op, several roots), gather and scatter (every root), every count.
fn rooted(comm: &Comm) {
    let (r, n) = (comm.rank(), comm.size());
    let mut roots = vec![0, n / 2, n - 1];
    roots.dedup();
    let mut reduced = 0usize;
    for &count in &counts(n) {
        for dtype in DType::ALL {
            for op in ReduceOp::ALL {
                for &root in &roots {
                    let name = format!("reduce/{dtype}/{op}/{count}/root{root}");
                    let mut send = data::encode(dtype, 0, count, |i| data::value(r, i, dtype, op));
                    let want = data::encode(dtype, 0, count, |i| data::expected(n, i, dtype, op));
                    let mut recv = Buf::filled(want.len(), 0x5a);
                    // Other ranks pass no receive buffer, as NCCL allows.
                    let recv_ptr = if r == root {
                        recv.ptr()
                    } else {
                        std::ptr::null_mut()
                    };
                    // SAFETY: both buffers outlive the request, which is waited for at once.
                    let res =
                        unsafe { comm.ireduce_raw(send.ptr(), recv_ptr, count, dtype, op, root) }
                            .and_then(Request::wait);
                    match res {
                        Ok(()) if r == root => {
                            reduced +=
                                check(&name, recv.bytes(), want.bytes(), dtype.size()) as usize
                        }
                        Ok(()) => reduced += 1,
                        Err(e) => fail(&name, e),
                    }
                }
            }
        }
    }
    ok("reduce_checked", reduced);

    let pattern = |from: usize, to: usize, i: usize| ((from * 37 + to * 13 + i * 11) % 100) as f64;
    let (mut gathered, mut scattered) = (0usize, 0usize);
    let shm_before = comm.shared_memory_ops();
    for &count in &counts(n) {
        for dtype in DType::ALL {
            for root in 0..n {
                let name = format!("gather/{dtype}/{count}/root{root}");
                let mut send = data::encode(dtype, 0, count, |i| pattern(r, root, i));
                let mut want = Vec::new();
                for q in 0..n {
                    want.extend_from_slice(
                        data::encode(dtype, 0, count, |i| pattern(q, root, i)).bytes(),
                    );
                }
                let mut recv = Buf::filled(if r == root { want.len() } else { 0 }, 0x5a);
                let recv_ptr = if r == root {
                    recv.ptr()
                } else {
                    std::ptr::null_mut()
                };
                // SAFETY: both buffers outlive the request, which is waited for at once.
                let res = unsafe { comm.igather_raw(send.ptr(), recv_ptr, count, dtype, root) }
                    .and_then(Request::wait);
                match res {
                    Ok(()) if r == root => {
                        gathered += check(&name, recv.bytes(), &want, dtype.size()) as usize
                    }
                    Ok(()) => gathered += 1,
                    Err(e) => fail(&name, e),
                }

                let name = format!("scatter/{dtype}/{count}/root{root}");
                let mut send = Buf::zeroed(0);
                if r == root {
                    let mut all = Vec::new();
                    for q in 0..n {
                        all.extend_from_slice(
                            data::encode(dtype, 0, count, |i| pattern(root, q, i)).bytes(),
                        );
                    }
                    send = Buf::from_bytes(&all);
                }
                let send_ptr = if r == root {
                    send.ptr()
                } else {
                    std::ptr::null_mut()
                };
                let want = data::encode(dtype, 0, count, |i| pattern(root, r, i));
                let mut recv = Buf::filled(want.len(), 0x5a);
                // SAFETY: both buffers outlive the request, which is waited for at once.
                let res = unsafe { comm.iscatter_raw(send_ptr, recv.ptr(), count, dtype, root) }
                    .and_then(Request::wait);
                match res {
                    Ok(()) => {
                        scattered += check(&name, recv.bytes(), want.bytes(), dtype.size()) as usize
                    }
                    Err(e) => fail(&name, e),
                }
            }
        }
    }
    ok("gather_checked", gathered);
    ok("scatter_checked", scattered);
    ok(
        "gather_scatter_shm_ops",
        comm.shared_memory_ops() - shm_before,
    );
}

/// All-to-all (every dtype and count) and all-to-all-v with uneven splits, zeros included.
fn exchanges(comm: &Comm) {
    let (r, n) = (comm.rank(), comm.size());
    let pattern = |from: usize, to: usize, i: usize| ((from * 31 + to * 7 + i * 3) % 100) as f64;
    let mut done = 0usize;
    let shm_before = comm.shared_memory_ops();
    for &count in &counts(n) {
        for dtype in DType::ALL {
            let name = format!("alltoall/{dtype}/{count}");
            let mut send_all = Vec::new();
            let mut want = Vec::new();
            for q in 0..n {
                send_all
                    .extend_from_slice(data::encode(dtype, 0, count, |i| pattern(r, q, i)).bytes());
                want.extend_from_slice(data::encode(dtype, 0, count, |i| pattern(q, r, i)).bytes());
            }
            let mut send = Buf::from_bytes(&send_all);
            let mut recv = Buf::filled(want.len(), 0x5a);
            // SAFETY: both buffers outlive the request, which is waited for at once.
            let res = unsafe { comm.ialltoall_raw(send.ptr(), recv.ptr(), count, dtype) }
                .and_then(Request::wait);
            match res {
                Ok(()) => done += check(&name, recv.bytes(), &want, dtype.size()) as usize,
                Err(e) => fail(&name, e),
            }
        }
    }
    ok("alltoall_checked", done);

    // Rank a sends rank b split(a, b) elements; some pairs send nothing, one sends more than a
    // chunk.
    let split = |a: usize, b: usize| match (a * 3 + b * 5) % 4 {
        0 => 0,
        1 => 1,
        2 => 17,
        _ => 3 * CHUNK + 5,
    };
    let packed = |c: &[usize]| -> Vec<usize> {
        c.iter()
            .scan(0, |acc, &x| {
                let d = *acc;
                *acc += x;
                Some(d)
            })
            .collect()
    };
    let mut done = 0usize;
    for dtype in DType::ALL {
        let name = format!("alltoallv/{dtype}");
        let sc: Vec<usize> = (0..n).map(|q| split(r, q)).collect();
        let rc: Vec<usize> = (0..n).map(|q| split(q, r)).collect();
        let (mut sd, mut rd) = (packed(&sc), packed(&rc));
        // An empty share's displacement is never used: point it anywhere, even where adding
        // to it would overflow.
        for (d, c) in sd.iter_mut().zip(&sc).chain(rd.iter_mut().zip(&rc)) {
            if *c == 0 {
                *d = usize::MAX - 3;
            }
        }
        let mut send_all = Vec::new();
        let mut want = Vec::new();
        for q in 0..n {
            send_all.extend_from_slice(data::encode(dtype, 0, sc[q], |i| pattern(r, q, i)).bytes());
            want.extend_from_slice(data::encode(dtype, 0, rc[q], |i| pattern(q, r, i)).bytes());
        }
        let mut send = Buf::from_bytes(&send_all);
        let mut recv = Buf::filled(want.len(), 0x5a);
        // SAFETY: both buffers outlive the request, which is waited for at once.
        let res = unsafe { comm.ialltoallv_raw(send.ptr(), &sc, &sd, recv.ptr(), &rc, &rd, dtype) }
            .and_then(Request::wait);
        match res {
            Ok(()) => done += check(&name, recv.bytes(), &want, dtype.size()) as usize,
            Err(e) => fail(&name, e),
        }
    }
    ok("alltoallv_checked", done);
    ok("alltoall_shm_ops", comm.shared_memory_ops() - shm_before);
}

/// Seven ops of every kind issued back to back, then waited for: the last one first (after
/// which every earlier one must already be complete: ops finish in issue order), then each
/// in order, with correct results.
fn nonblocking(comm: &Comm) {
    let (r, n) = (comm.rank(), comm.size());
    let (sum, avg, max) = (ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max);
    let (f32t, bf16t, i64t, u8t, i32t, f64t) = (
        DType::F32,
        DType::BF16,
        DType::I64,
        DType::U8,
        DType::I32,
        DType::F64,
    );
    let c_big = ODD_COUNT;
    let c_small = n.max(2) - 1;
    let mut a = data::encode(f32t, 0, c_big, |i| data::value(r, i, f32t, sum));
    let mut b = data::encode(bf16t, 0, c_small, |i| data::value(r, i, bf16t, max));
    let root = n - 1;
    let bc_want = data::encode(i64t, 0, c_big, |i| (i * 3) as f64 - 7.0);
    let mut c = if r == root {
        Buf::from_bytes(bc_want.bytes())
    } else {
        Buf::zeroed(bc_want.len())
    };
    let mut g_send = data::encode(u8t, 0, c_big, |i| ((r + i) % 256) as f64);
    let mut g_recv = Buf::zeroed(c_big * n);
    let mut rs_send = data::encode(i32t, 0, c_small * n, |i| data::value(r, i, i32t, max));
    let mut rs_recv = Buf::zeroed(c_small * 4);
    let mut e = data::encode(f64t, 0, c_big, |i| data::value(r, i, f64t, avg));

    // SAFETY: every buffer outlives its request; all requests are waited for below, and no
    // buffer is touched until then.
    let issued: mapreduce::Result<Vec<Request>> = unsafe {
        (|| {
            Ok(vec![
                comm.iallreduce_raw(a.ptr(), c_big, f32t, sum)?,
                comm.iallreduce_raw(b.ptr(), c_small, bf16t, max)?,
                comm.ibroadcast_raw(c.ptr(), c_big, i64t, root)?,
                comm.iallgather_raw(g_send.ptr(), g_recv.ptr(), c_big, u8t)?,
                comm.ireduce_scatter_raw(rs_send.ptr(), rs_recv.ptr(), c_small, i32t, max)?,
                comm.ibarrier()?,
                comm.iallreduce_raw(e.ptr(), c_big, f64t, avg)?,
            ])
        })()
    };
    let mut reqs = match issued {
        Ok(v) => v,
        Err(e) => return fail("nonblocking/issue", e),
    };
    let last = reqs.pop().expect("seven requests");
    if let Err(e) = last.wait() {
        return fail("nonblocking/last", e);
    }
    for (k, req) in reqs.iter().enumerate() {
        match req.test() {
            Ok(true) => {}
            Ok(false) => say(&format!(
                "ERR nonblocking/order OutOfOrder request {k} still running after the last one completed"
            )),
            Err(e) => fail(&format!("nonblocking/test{k}"), e),
        }
    }
    for (k, req) in reqs.into_iter().enumerate() {
        if let Err(e) = req.wait() {
            fail(&format!("nonblocking/wait{k}"), e);
        }
    }
    let mut good = 0;
    let want_a = data::encode(f32t, 0, c_big, |i| data::expected(n, i, f32t, sum));
    good += check("nonblocking/allreduce_f32", a.bytes(), want_a.bytes(), 4) as usize;
    let want_b = data::encode(bf16t, 0, c_small, |i| data::expected(n, i, bf16t, max));
    good += check("nonblocking/allreduce_bf16", b.bytes(), want_b.bytes(), 2) as usize;
    good += check("nonblocking/broadcast", c.bytes(), bc_want.bytes(), 8) as usize;
    let mut want_g = Vec::new();
    for q in 0..n {
        want_g.extend_from_slice(data::encode(u8t, 0, c_big, |i| ((q + i) % 256) as f64).bytes());
    }
    good += check("nonblocking/allgather", g_recv.bytes(), &want_g, 1) as usize;
    let want_rs = data::encode(i32t, r * c_small, c_small, |i| {
        data::expected(n, i, i32t, max)
    });
    good += check(
        "nonblocking/reduce_scatter",
        rs_recv.bytes(),
        want_rs.bytes(),
        4,
    ) as usize;
    let want_e = data::encode(f64t, 0, c_big, |i| data::expected(n, i, f64t, avg));
    good += check("nonblocking/allreduce_f64", e.bytes(), want_e.bytes(), 8) as usize;
    ok("nonblocking_checked", good);
}

/// All-reduce random (non-integer) float data; every rank reports a hash of its result, which
/// the parent requires to be identical everywhere.
fn hashes(comm: &Comm) {
    let (r, n) = (comm.rank(), comm.size());
    let p = path(comm);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for op in [ReduceOp::Sum, ReduceOp::Avg] {
            for count in [n.max(2) - 1, ODD_COUNT, 300_001] {
                let name = format!("hash/{p}/{dtype}/{op}/{count}");
                let mut buf = data::random(dtype, count, (r as u64 + 1) * 7919 + count as u64);
                // SAFETY: `buf` outlives the request, which is waited for at once.
                let res = unsafe { comm.iallreduce_raw(buf.ptr(), count, dtype, op) }
                    .and_then(Request::wait);
                match res {
                    Ok(()) => ok(&name, blake3::hash(buf.bytes()).to_hex()),
                    Err(e) => fail(&name, e),
                }
            }
        }
    }
}

/// 64 MiB of f32 through the ring, integer-valued so the sum is exact; plus a hash of a
/// random-data all-reduce of the same size.
fn big(comm: &Comm) {
    let (r, n) = (comm.rank(), comm.size());
    let mut v: Vec<f32> = (0..BIG_COUNT).map(|i| ((r + i) % 16) as f32).collect();
    match comm.allreduce(&mut v, ReduceOp::Sum) {
        Ok(()) => {
            let bad = (0..BIG_COUNT).find(|&i| {
                let want: usize = (0..n).map(|q| (q + i) % 16).sum();
                v[i] != want as f32
            });
            match bad {
                None => ok("big_sum", BIG_COUNT),
                Some(i) => say(&format!("ERR big_sum WrongResult element {i}: {}", v[i])),
            }
        }
        Err(e) => fail("big_sum", e),
    }
    drop(v);
    let mut buf = data::random(DType::F32, BIG_COUNT, r as u64 + 99);
    // SAFETY: `buf` outlives the request, which is waited for at once.
    let res = unsafe { comm.iallreduce_raw(buf.ptr(), BIG_COUNT, DType::F32, ReduceOp::Sum) }
        .and_then(Request::wait);
    match res {
        Ok(()) => ok("hash/big", blake3::hash(buf.bytes()).to_hex()),
        Err(e) => fail("hash/big", e),
    }
}

// ---------------------------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------------------------

const LIMIT: Duration = Duration::from_secs(150);

/// Whether this machine offers `/dev/shm` to this user; without it communicators must fall back
/// to TCP, and the shared-memory launches expect the ring instead.
fn shm_available() -> bool {
    let probe =
        std::path::Path::new("/dev/shm").join(format!("mapreduce-probe-{}", std::process::id()));
    let ok = std::fs::write(&probe, b"x").is_ok();
    let _ = std::fs::remove_file(&probe);
    if !ok {
        eprintln!("/dev/shm is not writable here: expecting the TCP fallback");
    }
    ok
}

/// The path ranks report when asked for `want` ("shm" only where shared memory can work: not
/// for one rank, which has nobody to share with).
fn expected_path(want: &'static str, n: usize) -> &'static str {
    if want == "shm" && (n == 1 || !shm_available()) {
        "ring"
    } else {
        want
    }
}

/// How a launch moves data: `(MR_ALGO, MR_SMALL_BYTES, path the ranks must report)`.
const PATHS: [(&str, usize, &str); 3] = [
    ("ring", 0, "ring"),
    ("ring", usize::MAX, "rd"),
    ("auto", 0, "shm"),
];

fn env(algo: &str, small_bytes: usize, chunk: usize) -> Vec<(&'static str, String)> {
    vec![
        ("MR_ALGO", algo.to_string()),
        ("MR_CHUNK_BYTES", chunk.to_string()),
        ("MR_SMALL_BYTES", small_bytes.to_string()),
        ("MR_TIMEOUT_MS", "60000".to_string()),
    ]
}

fn run_matrix(n: usize) {
    let per_count = DType::ALL.len() * ReduceOp::ALL.len();
    let ncounts = counts(n).len();
    let mut roots = vec![0, n / 2, n - 1];
    roots.dedup();
    for (algo, small, want_path) in PATHS {
        let out = support::run_job("matrix", n, &env(algo, small, CHUNK), LIMIT);
        for o in &out {
            o.assert_clean();
            assert_eq!(
                o.ok_detail("path"),
                expected_path(want_path, n),
                "{}",
                o.story()
            );
            let want = |name: &str, v: usize| {
                assert_eq!(o.ok_detail(name), v.to_string(), "{name}\n{}", o.story())
            };
            want("allreduce_checked", per_count * ncounts);
            want("reduce_scatter_checked", per_count * ncounts);
            want("allgather_checked", DType::ALL.len() * ncounts);
            want(
                "broadcast_checked",
                DType::ALL.len() * ncounts * roots.len(),
            );
            want("barrier_checked", 3);
            want("reduce_checked", per_count * ncounts * roots.len());
            want("gather_checked", DType::ALL.len() * ncounts * n);
            want("scatter_checked", DType::ALL.len() * ncounts * n);
            want("alltoall_checked", DType::ALL.len() * ncounts);
            want("alltoallv_checked", DType::ALL.len());
            // Gather, scatter and all-to-all(v) share the segment with the other collectives.
            let shm = expected_path(want_path, n) == "shm";
            want(
                "gather_scatter_shm_ops",
                if shm {
                    2 * DType::ALL.len() * ncounts * n
                } else {
                    0
                },
            );
            want(
                "alltoall_shm_ops",
                if shm {
                    DType::ALL.len() * (ncounts + 1)
                } else {
                    0
                },
            );
            want("nonblocking_checked", 6);
        }
        let hashes = support::assert_same_details(&out, "hash/");
        assert_eq!(hashes, 3 * 2 * 3, "every hash step reported");
    }
}

#[test]
fn matrix_world_1() {
    run_matrix(1);
}

#[test]
fn matrix_world_2() {
    run_matrix(2);
}

#[test]
fn matrix_world_3() {
    run_matrix(3);
}

#[test]
fn matrix_world_4() {
    run_matrix(4);
}

#[test]
fn matrix_world_5() {
    run_matrix(5);
}

#[test]
fn matrix_world_8() {
    run_matrix(8);
}

fn run_big(n: usize, algo: &str, want_path: &'static str) {
    // Default chunk size: the small-chunk paths are covered above.
    let out = support::run_job("big", n, &env(algo, 0, 1 << 20), LIMIT);
    for o in &out {
        o.assert_clean();
        assert_eq!(
            o.ok_detail("path"),
            expected_path(want_path, n),
            "{}",
            o.story()
        );
        assert_eq!(o.ok_detail("big_sum"), BIG_COUNT.to_string());
    }
    assert_eq!(support::assert_same_details(&out, "hash/"), 1);
}

#[test]
fn big_allreduce_64mib_world_2() {
    run_big(2, "ring", "ring");
}

#[test]
fn big_allreduce_64mib_world_5() {
    run_big(5, "ring", "ring");
}

#[test]
fn big_allreduce_64mib_world_5_shared_memory() {
    run_big(5, "auto", "shm");
}

//! mr-bench: nccl-tests-style throughput and correctness benchmark for mapreduce collectives.
//!
//! Every rank runs this program. Rank 0 prints one row per size:
//! `size count type redop root time_us algbw busbw #wrong` (GB = 1e9 bytes; busbw scales
//! algbw by 2(n−1)/n for all-reduce, (n−1)/n for all-gather and reduce-scatter, 1 for
//! broadcast). Timed iterations run back to back after warm-up; a separate, untimed op on
//! known integer-valued data verifies the result (`#wrong` counts wrong elements — for a
//! compressed all-reduce (`MR_COMPRESS`), those beyond the format's bound — summed over
//! ranks).
//!
//! `--spawn-local N` runs a whole job on loopback: this process is rank 0 and starts N−1
//! copies of itself; `--relays R` also starts R `mr-relayd` daemons and runs in relay mode.
//! Without `--spawn-local`, ranks come from the environment (`MR_RANK`/`MR_WORLD_SIZE`/
//! `MR_BOOTSTRAP`, or torchrun's variables).

use clap::{Parser, ValueEnum};
use mapreduce::{Comm, Config, DType, ReduceOp, UniqueId};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// A binary's root looks for modules beside it, in src/bin/; this one's own live in mr-bench/.
#[path = "mr-bench/kernels.rs"]
mod kernels;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Op {
    Allreduce,
    Broadcast,
    Allgather,
    ReduceScatter,
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "mr-bench",
    about = "nccl-tests-style benchmark for mapreduce collectives"
)]
struct Args {
    /// Collectives to run (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "allreduce")]
    op: Vec<Op>,
    /// Element type: f32, f64, f16, bf16, i8, u8, i32, i64.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Reduction: sum, avg, max, min, prod.
    #[arg(long, default_value = "sum")]
    redop: String,
    /// Smallest message in bytes (suffixes K, M, G allowed).
    #[arg(short = 'b', long, default_value = "8", value_parser = parse_size)]
    min_bytes: usize,
    /// Largest message in bytes (up to 1G).
    #[arg(short = 'e', long, default_value = "64M", value_parser = parse_size)]
    max_bytes: usize,
    /// Multiply the size by this factor between rows.
    #[arg(short = 'f', long, default_value_t = 2)]
    step_factor: usize,
    /// Warm-up iterations per size.
    #[arg(short = 'w', long, default_value_t = 3)]
    warmup: usize,
    /// Timed iterations per size.
    #[arg(short = 'n', long, default_value_t = 10)]
    iters: usize,
    /// Verify results (0 to skip).
    #[arg(short = 'c', long, default_value_t = 1)]
    check: u8,
    /// Broadcast root.
    #[arg(long, default_value_t = 0)]
    root: usize,
    /// Run a whole job of N ranks on loopback (this process is rank 0).
    #[arg(long)]
    spawn_local: Option<usize>,
    /// With --spawn-local: also start R relay daemons and use relay mode.
    #[arg(long, default_value_t = 0)]
    relays: usize,
    /// Print reduction-kernel throughput beside memcpy and exit.
    #[arg(long)]
    kernels: bool,
    /// The demo: a whole local job on loopback with every peer's sends capped at 1 Gbit/s;
    /// 256 MiB broadcast and all-reduce through relays and the TCP ring, compressed relay and
    /// ring all-reduces, and shared memory, verified, summarised in a table with their bounds.
    #[arg(long)]
    demo: bool,
    /// Peers for --demo.
    #[arg(long, default_value_t = 4)]
    demo_peers: usize,
    /// Message size for --demo.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    demo_bytes: usize,
    /// Internal: this process is rank R of a --spawn-local job.
    #[arg(long, hide = true)]
    child_rank: Option<usize>,
    /// Internal: world size of a --spawn-local job.
    #[arg(long, hide = true)]
    child_world: Option<usize>,
    /// Internal: the job's unique id, hex.
    #[arg(long, hide = true)]
    child_id: Option<String>,
    /// Internal: demo mode label for a child.
    #[arg(long, hide = true)]
    child_demo: bool,
}

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1usize << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .map(|n| n * mult)
        .map_err(|_| format!("bad size {s:?}"))
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" | "float" => DType::F32,
        "f64" | "float64" | "double" => DType::F64,
        "f16" | "float16" | "half" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        "i8" | "int8" => DType::I8,
        "u8" | "uint8" => DType::U8,
        "i32" | "int32" => DType::I32,
        "i64" | "int64" => DType::I64,
        _ => return Err(format!("unknown dtype {s:?}")),
    })
}

fn parse_redop(s: &str) -> Result<ReduceOp, String> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "sum" => ReduceOp::Sum,
        "avg" => ReduceOp::Avg,
        "max" => ReduceOp::Max,
        "min" => ReduceOp::Min,
        "prod" => ReduceOp::Prod,
        _ => return Err(format!("unknown reduction {s:?}")),
    })
}

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("mr-bench: {msg}");
    std::process::exit(1);
}

fn main() {
    mapreduce::comm::init_logging();
    let args = Args::parse();
    if args.kernels {
        print_kernels();
        return;
    }
    if args.demo {
        demo(&args);
        return;
    }
    if let (Some(rank), Some(world), Some(id)) =
        (args.child_rank, args.child_world, args.child_id.clone())
    {
        let id = decode_id(&id);
        let comm = Comm::init(
            world,
            &id,
            rank,
            Config::from_env().unwrap_or_else(|e| die(e)),
        )
        .unwrap_or_else(|e| die(e));
        let ok = if args.child_demo {
            demo_rank(&comm, args.demo_bytes / 4).is_ok()
        } else {
            run_table(&comm, &args)
        };
        let _ = comm.destroy();
        std::process::exit(if ok { 0 } else { 2 });
    }
    if let Some(n) = args.spawn_local {
        let ok = spawn_job(&args, n, args.relays, &[], |comm| run_table(comm, &args));
        std::process::exit(if ok { 0 } else { 1 });
    }
    let comm = Comm::init_env().unwrap_or_else(|e| die(e));
    let ok = run_table(&comm, &args);
    // Frames of the last op may still be queued on the progress thread: say goodbye properly
    // before the process ends.
    let ok = comm.destroy().is_ok() && ok;
    std::process::exit(if ok { 0 } else { 2 });
}

fn encode_id(id: &UniqueId) -> String {
    id.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_id(hex: &str) -> UniqueId {
    let bytes = mapreduce::config::parse_hex("unique id", hex).unwrap_or_else(|e| die(e));
    let mut id = [0u8; 256];
    if bytes.len() != 256 {
        die("unique id must be 256 bytes");
    }
    id.copy_from_slice(&bytes);
    UniqueId(id)
}

/// Relay daemons started for a local job; killed on drop.
struct Relays(Vec<Child>);

impl Drop for Relays {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| die(e))
}

/// Start `r` relays on loopback for jobs whose secret is `secret` (hex): each relay gets only
/// its own token, derived from the secret and its address.
fn start_relays(r: usize, secret: &str) -> (Relays, String) {
    let secret = mapreduce::config::parse_hex("job secret", secret).unwrap_or_else(|e| die(e));
    let exe = std::env::current_exe().unwrap_or_else(|e| die(e));
    let relayd = exe.with_file_name("mr-relayd");
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..r {
        let addr = format!("127.0.0.1:{}", free_port());
        let token = mapreduce::config::to_hex(&mapreduce::wire::relay_token(&secret, &addr));
        let mut cmd = Command::new(&relayd);
        cmd.args(["--listen", &addr, "--token", &token]);
        // A relay is a host of its own: under an emulated link rate it gets the same cap.
        if let Ok(rate) = std::env::var("MR_MAX_RATE") {
            cmd.args(["--max-rate", &rate]);
        }
        let child = cmd
            .env(
                "MR_LOG",
                std::env::var("MR_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| die(format!("cannot start {}: {e}", relayd.display())));
        children.push(child);
        addrs.push(addr);
    }
    // Wait until every relay accepts connections.
    let deadline = Instant::now() + Duration::from_secs(10);
    for a in &addrs {
        while std::net::TcpStream::connect(a).is_err() {
            if Instant::now() > deadline {
                die(format!("relay at {a} did not start"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    (Relays(children), addrs.join(","))
}

/// Run a local job: start relays (if any) and n−1 child ranks, run `body` as rank 0.
fn spawn_job(
    args: &Args,
    n: usize,
    relays: usize,
    extra_child_args: &[&str],
    body: impl FnOnce(&Comm) -> bool,
) -> bool {
    let token = mapreduce::config::to_hex(&mapreduce::wire::nonce());
    let (_relays, relay_list) = if relays > 0 {
        start_relays(relays, &token)
    } else {
        (Relays(Vec::new()), String::new())
    };
    if relays > 0 {
        std::env::set_var("MR_RELAYS", &relay_list);
        std::env::set_var("MR_TOKEN", &token);
        if std::env::var("MR_ALGO").is_err() {
            std::env::set_var("MR_ALGO", "relay");
        }
    }
    let config = Config::from_env().unwrap_or_else(|e| die(e));
    let id = UniqueId::new(&config).unwrap_or_else(|e| die(e));
    let exe = std::env::current_exe().unwrap_or_else(|e| die(e));
    // Children run the same table: pass the parsed options on explicitly.
    let ops: Vec<&str> = args.op.iter().map(|&o| op_name(o)).collect();
    let child_args: Vec<String> = if args.demo {
        Vec::new()
    } else {
        [
            "--op",
            &ops.join(",").replace("reduce_scatter", "reduce-scatter"),
            "--dtype",
            &args.dtype,
            "--redop",
            &args.redop,
            "--min-bytes",
            &args.min_bytes.to_string(),
            "--max-bytes",
            &args.max_bytes.to_string(),
            "--step-factor",
            &args.step_factor.to_string(),
            "--warmup",
            &args.warmup.to_string(),
            "--iters",
            &args.iters.to_string(),
            "--check",
            &args.check.to_string(),
            "--root",
            &args.root.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let mut children: Vec<Child> = (1..n)
        .map(|r| {
            Command::new(&exe)
                .args(&child_args)
                .args(extra_child_args)
                .args([
                    "--child-rank",
                    &r.to_string(),
                    "--child-world",
                    &n.to_string(),
                    "--child-id",
                    &encode_id(&id),
                ])
                .stdin(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| die(format!("cannot start rank {r}: {e}")))
        })
        .collect();
    let comm = match Comm::init(n, &id, 0, config) {
        Ok(c) => c,
        Err(e) => {
            for c in &mut children {
                let _ = c.kill();
            }
            die(e)
        }
    };
    let ok = body(&comm);
    let _ = comm.destroy();
    let mut all_ok = ok;
    for (i, c) in children.iter_mut().enumerate() {
        match c.wait() {
            Ok(s) if s.success() => {}
            Ok(s) => {
                eprintln!("mr-bench: rank {} exited with {s}", i + 1);
                all_ok = false;
            }
            Err(e) => {
                eprintln!("mr-bench: rank {}: {e}", i + 1);
                all_ok = false;
            }
        }
    }
    all_ok
}

fn bus_factor(op: Op, n: usize) -> f64 {
    let n = n as f64;
    match op {
        Op::Allreduce => 2.0 * (n - 1.0) / n,
        Op::Allgather | Op::ReduceScatter => (n - 1.0) / n,
        Op::Broadcast => 1.0,
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Allreduce => "allreduce",
        Op::Broadcast => "broadcast",
        Op::Allgather => "allgather",
        Op::ReduceScatter => "reduce_scatter",
    }
}

/// Integer-valued test value of rank r at element i: exact in every dtype for small worlds.
fn value(r: usize, i: usize) -> f64 {
    ((r + 1) * (i % 5 + 1)) as f64
}

fn write_values(dtype: DType, buf: &mut [u8], f: impl Fn(usize) -> f64) {
    let size = dtype.size();
    for (i, b) in buf.chunks_exact_mut(size).enumerate() {
        let v = f(i);
        match dtype {
            DType::F32 => b.copy_from_slice(&(v as f32).to_le_bytes()),
            DType::F64 => b.copy_from_slice(&v.to_le_bytes()),
            DType::F16 => b.copy_from_slice(&half::f16::from_f64(v).to_bits().to_le_bytes()),
            DType::BF16 => b.copy_from_slice(&half::bf16::from_f64(v).to_bits().to_le_bytes()),
            DType::I8 => b.copy_from_slice(&(v as i8).to_le_bytes()),
            DType::U8 => b.copy_from_slice(&(v as u8).to_le_bytes()),
            DType::I32 => b.copy_from_slice(&(v as i32).to_le_bytes()),
            DType::I64 => b.copy_from_slice(&(v as i64).to_le_bytes()),
        }
    }
}

fn count_wrong(dtype: DType, buf: &[u8], f: impl Fn(usize) -> f64) -> u64 {
    let mut want = vec![0u8; buf.len()];
    write_values(dtype, &mut want, f);
    buf.chunks_exact(dtype.size())
        .zip(want.chunks_exact(dtype.size()))
        .filter(|(a, b)| a != b)
        .count() as u64
}

/// As [`count_wrong`] for float data that travelled compressed: an element counts as wrong
/// only when it is more than `tol` away from its exact value.
fn count_beyond(dtype: DType, buf: &[u8], tol: f64, f: impl Fn(usize) -> f64) -> u64 {
    let get = |b: &[u8]| match dtype {
        DType::F64 => f64::from_le_bytes(b.try_into().unwrap()),
        _ => f64::from(f32::from_le_bytes(b.try_into().unwrap())),
    };
    buf.chunks_exact(dtype.size())
        .enumerate()
        .filter(|(i, b)| (get(b) - f(*i)).abs() > tol)
        .count() as u64
}

fn expected_reduce(redop: ReduceOp, n: usize, i: usize) -> f64 {
    let vals: Vec<f64> = (0..n).map(|r| value(r, i)).collect();
    match redop {
        ReduceOp::Sum => vals.iter().sum(),
        ReduceOp::Avg => (vals.iter().sum::<f64>() / n as f64).trunc(),
        ReduceOp::Max => vals.iter().cloned().fold(f64::MIN, f64::max),
        ReduceOp::Min => vals.iter().cloned().fold(f64::MAX, f64::min),
        ReduceOp::Prod => vals.iter().product(),
    }
}

struct Row {
    bytes: usize,
    time_us: f64,
    algbw: f64,
    busbw: f64,
    wrong: u64,
}

/// Time `iters` back-to-back ops; the max over ranks of the mean time per op, in µs.
fn measure(
    comm: &Comm,
    op: Op,
    dtype: DType,
    redop: ReduceOp,
    count: usize,
    args: &Args,
) -> Result<(f64, u64), mapreduce::Error> {
    let n = comm.size();
    let size = dtype.size();
    let root = args.root.min(n - 1);
    let (in_bytes, out_bytes) = match op {
        Op::Allreduce | Op::Broadcast => (count * size, count * size),
        Op::Allgather => (count * size, count * size * n),
        Op::ReduceScatter => (count * size * n, count * size),
    };
    let mut input = vec![0u8; in_bytes];
    let mut output = vec![0u8; out_bytes];
    let run = |input: &mut [u8], output: &mut [u8]| -> Result<(), mapreduce::Error> {
        // SAFETY: the buffers outlive the blocking wait below.
        unsafe {
            match op {
                Op::Allreduce => comm
                    .iallreduce_raw(input.as_mut_ptr(), count, dtype, redop)?
                    .wait(),
                Op::Broadcast => comm
                    .ibroadcast_raw(input.as_mut_ptr(), count, dtype, root)?
                    .wait(),
                Op::Allgather => comm
                    .iallgather_raw(input.as_ptr(), output.as_mut_ptr(), count, dtype)?
                    .wait(),
                Op::ReduceScatter => comm
                    .ireduce_scatter_raw(input.as_ptr(), output.as_mut_ptr(), count, dtype, redop)?
                    .wait(),
            }
        }
    };
    for _ in 0..args.warmup {
        run(&mut input, &mut output)?;
    }
    comm.barrier()?;
    let start = Instant::now();
    for _ in 0..args.iters {
        run(&mut input, &mut output)?;
    }
    let mut t = [start.elapsed().as_secs_f64() * 1e6 / args.iters.max(1) as f64];
    comm.allreduce(&mut t, ReduceOp::Max)?;
    let mut wrong = 0u64;
    if args.check != 0 {
        let r = comm.rank();
        match op {
            Op::Allreduce => {
                write_values(dtype, &mut input, |i| value(r, i));
                run(&mut input, &mut output)?;
                let z = comm.config().compress;
                wrong = if z != mapreduce::compress::Compression::None
                    && matches!(dtype, DType::F32 | DType::F64)
                {
                    // Lossy on the wire: within n encodings of the format's bound. Values are
                    // at most 5 per rank, so partial sums span at most 5n(n+1)/2.
                    let span = 5.0 * (n * (n + 1)) as f64 / 2.0;
                    let one = match z {
                        mapreduce::compress::Compression::Int8 => span / 510.0 * 1.01,
                        mapreduce::compress::Compression::Bf16 => span / 256.0,
                        _ => span / 2048.0,
                    };
                    count_beyond(dtype, &input, n as f64 * one, |i| {
                        expected_reduce(redop, n, i)
                    })
                } else {
                    count_wrong(dtype, &input, |i| expected_reduce(redop, n, i))
                };
            }
            Op::Broadcast => {
                write_values(dtype, &mut input, |i| {
                    if r == root {
                        value(root, i)
                    } else {
                        0.0
                    }
                });
                run(&mut input, &mut output)?;
                wrong = count_wrong(dtype, &input, |i| value(root, i));
            }
            Op::Allgather => {
                write_values(dtype, &mut input, |i| value(r, i));
                run(&mut input, &mut output)?;
                wrong = count_wrong(dtype, &output, |i| {
                    value(i / count.max(1), i % count.max(1))
                });
            }
            Op::ReduceScatter => {
                write_values(dtype, &mut input, |i| value(r, i));
                run(&mut input, &mut output)?;
                wrong = count_wrong(dtype, &output, |i| expected_reduce(redop, n, r * count + i));
            }
        }
        let mut w = [wrong as i64];
        comm.allreduce(&mut w, ReduceOp::Sum)?;
        wrong = w[0] as u64;
    }
    Ok((t[0], wrong))
}

fn run_table(comm: &Comm, args: &Args) -> bool {
    let dtype = parse_dtype(&args.dtype).unwrap_or_else(|e| die(e));
    let redop = parse_redop(&args.redop).unwrap_or_else(|e| die(e));
    let n = comm.size();
    let rank0 = comm.rank() == 0;
    let mut ok = true;
    if rank0 {
        let c = comm.config();
        println!(
            "# mr-bench: {n} ranks, algo {:?}, relays {}, chunk {} B, streams {}, warmup {}, iters {}",
            c.algo,
            c.relays.len(),
            c.chunk_bytes,
            c.streams,
            args.warmup,
            args.iters
        );
    }
    for &op in &args.op {
        if rank0 {
            println!("#\n# {}", op_name(op));
            println!(
                "# {:>12} {:>12} {:>8} {:>6} {:>5} {:>12} {:>8} {:>8} {:>7}",
                "size", "count", "type", "redop", "root", "time_us", "algbw", "busbw", "#wrong"
            );
        }
        let mut bytes = args.min_bytes.max(dtype.size());
        while bytes <= args.max_bytes {
            let count = bytes / dtype.size();
            let per_rank = matches!(op, Op::Allgather | Op::ReduceScatter);
            // For all-gather/reduce-scatter, `size` is the whole gathered buffer, as in nccl-tests.
            let op_count = if per_rank { (count / n).max(1) } else { count };
            let size_bytes = if per_rank {
                op_count * n * dtype.size()
            } else {
                count * dtype.size()
            };
            match measure(comm, op, dtype, redop, op_count, args) {
                Ok((time_us, wrong)) => {
                    let algbw = size_bytes as f64 / (time_us * 1e-6) / 1e9;
                    let row = Row {
                        bytes: size_bytes,
                        time_us,
                        algbw,
                        busbw: algbw * bus_factor(op, n),
                        wrong,
                    };
                    if row.wrong > 0 {
                        ok = false;
                    }
                    if rank0 {
                        let redop_name = if matches!(op, Op::Allreduce | Op::ReduceScatter) {
                            redop.name()
                        } else {
                            "none"
                        };
                        let root = if op == Op::Broadcast {
                            args.root.min(n - 1) as i64
                        } else {
                            -1
                        };
                        println!(
                            "  {:>12} {:>12} {:>8} {:>6} {:>5} {:>12.1} {:>8.3} {:>8.3} {:>7}",
                            row.bytes,
                            if per_rank { op_count * n } else { count },
                            dtype.name(),
                            redop_name,
                            root,
                            row.time_us,
                            row.algbw,
                            row.busbw,
                            if args.check != 0 {
                                row.wrong.to_string()
                            } else {
                                "N/A".into()
                            }
                        );
                    }
                }
                Err(e) => {
                    eprintln!(
                        "mr-bench: rank {}: {} of {bytes} bytes failed: {e}",
                        comm.rank(),
                        op_name(op)
                    );
                    return false;
                }
            }
            bytes = bytes.saturating_mul(args.step_factor.max(2));
        }
    }
    ok
}

fn print_kernels() {
    let bytes = 64 << 20;
    println!("# reduction kernels on {} MiB buffers (GB/s, GB = 1e9; bytes counted as the destination size)", bytes >> 20);
    for (name, gbps) in kernels::measure_throughput(bytes, 20) {
        println!("  {name:<24} {gbps:>8.2}");
    }
    println!(
        "# wire-format kernels on {} MiB of float32 (GB/s, bytes counted as float32)",
        bytes >> 20
    );
    for (name, gbps) in mapreduce::compress::measure_throughput(bytes, 20) {
        println!("  {name:<24} {gbps:>8.2}");
    }
    println!("# frame-tag hashes over 1 MiB payloads (GB/s)");
    for (name, gbps) in tag_hash_throughput(1 << 20, 2000) {
        println!("  {name:<36} {gbps:>8.2}");
    }
}

/// Throughput of the payload hash under frame tags (NH, then POLYVAL) with each kernel this
/// CPU runs (the first is the one in use), beside blake3 (what tags hashed before), on
/// `bytes`-byte payloads, `iters` passes each.
fn tag_hash_throughput(bytes: usize, iters: usize) -> Vec<(String, f64)> {
    use mapreduce::wire::payload_hash::{digest, PayloadKey};
    let payload: Vec<u8> = (0..bytes).map(|i| (i * 31 + 7) as u8).collect();
    let mut out = Vec::new();
    let mut sink = 0u8;
    let mut time = |f: &mut dyn FnMut() -> u8| {
        let t = Instant::now();
        for _ in 0..iters {
            sink ^= f();
        }
        (bytes * iters) as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    for key in PayloadKey::derive_each_kernel(&[0x5c; 32]) {
        let gbps = time(&mut || digest(&key, &payload)[0]);
        out.push((format!("payload hash ({})", key.kernel()), gbps));
    }
    let gbps = time(&mut || blake3::hash(&payload).as_bytes()[0]);
    out.push(("blake3".to_string(), gbps));
    std::hint::black_box(sink);
    out
}

/// The demo: 256 MiB broadcast and all-reduce through relays and through the TCP ring, with
/// every rank's sends capped at 1 Gbit/s to emulate the links relays are for; compressed
/// all-reduces (bf16, int8) through the relays and the ring beside them; then shared memory,
/// which needs no link at all.
fn demo(args: &Args) {
    let peers = args.demo_peers;
    let relays = 4;
    let count = args.demo_bytes / 4;
    let rate: u64 = 125_000_000;
    let d = args.demo_bytes as f64;
    println!(
        "mapreduce demo: {peers} peers and {relays} relays on loopback, {} MiB of float32, every result verified",
        args.demo_bytes >> 20
    );
    println!(
        "  emulated links: each peer's and relay's sends capped at 1 Gbit/s (MR_MAX_RATE=125M); \
         bound = the least time its bytes need at that rate (relay D/rate, ring 2(P-1)/P x D/rate, \
         times the wire bytes per float32: 1/2 for bf16, 264/1024 for int8)"
    );
    println!(
        "{:<11} {:<10} {:>6} {:>8} {:>8} {:>9} {:>8} {:>9}",
        "mode", "op", "size", "time_s", "bound_s", "of_bound", "busbw", "verified"
    );
    let ring_bound = 2.0 * (peers as f64 - 1.0) / peers as f64 * d / rate as f64;
    let modes: [(&str, usize, &str, &str, bool); 7] = [
        ("relay", relays, "relay", "none", true),
        ("relay+bf16", relays, "relay", "bf16", true),
        ("relay+int8", relays, "relay", "int8", true),
        ("ring", 0, "ring", "none", true),
        ("ring+bf16", 0, "ring", "bf16", true),
        ("ring+int8", 0, "ring", "int8", true),
        ("shm", 0, "auto", "none", false),
    ];
    let mut all_ok = true;
    for (mode, r, algo, compress, capped) in modes {
        std::env::set_var("MR_ALGO", algo);
        std::env::set_var("MR_COMPRESS", compress);
        if capped {
            std::env::set_var("MR_MAX_RATE", rate.to_string());
            std::env::set_var("MR_SHM_DISABLE", "1");
        } else {
            std::env::remove_var("MR_MAX_RATE");
            std::env::remove_var("MR_SHM_DISABLE");
        }
        if r == 0 {
            std::env::remove_var("MR_RELAYS");
            std::env::remove_var("MR_TOKEN");
        }
        let ok = spawn_job(
            args,
            peers,
            r,
            &["--child-demo", "--demo-bytes", &args.demo_bytes.to_string()],
            |comm| match demo_rank(comm, count) {
                Ok(rows) => {
                    for (op, secs, verified) in rows {
                        let algbw = d / secs / 1e9;
                        let busbw = algbw * bus_factor(op, peers);
                        // Exact bytes, scaled by the format's wire bytes per float32.
                        let bound = match (r, op) {
                            (_, Op::Broadcast) => d / rate as f64,
                            (0, _) => ring_bound,
                            _ => d / rate as f64,
                        } * match compress {
                            "bf16" => 0.5,
                            "int8" => (1.0 + 8.0 / 256.0) / 4.0,
                            _ => 1.0,
                        };
                        let (bound_s, of_bound) = if capped {
                            (
                                format!("{bound:.3}"),
                                format!("{:.0}%", 100.0 * bound / secs),
                            )
                        } else {
                            ("-".to_string(), "-".to_string())
                        };
                        println!(
                            "{:<11} {:<10} {:>6} {:>8.3} {:>8} {:>9} {:>8.3} {:>9}",
                            mode,
                            op_name(op),
                            format!("{}M", args.demo_bytes >> 20),
                            secs,
                            bound_s,
                            of_bound,
                            busbw,
                            if verified { "yes" } else { "NO" }
                        );
                    }
                    true
                }
                Err(e) => {
                    eprintln!("mr-bench: demo ({mode}) failed: {e}");
                    false
                }
            },
        );
        all_ok &= ok;
    }
    println!(
        "  relays' sends are capped alike (--max-rate); shm: one host, no link, not capped. \
         Compressed rows: bf16 and int8 on the wire, results within the format's bound \
         (relays: each input and the sum encoded once)."
    );
    std::process::exit(if all_ok { 0 } else { 1 });
}

/// One rank's part of the demo; returns (op, seconds, verified on every rank).
fn demo_rank(comm: &Comm, count: usize) -> Result<Vec<(Op, f64, bool)>, mapreduce::Error> {
    let n = comm.size();
    let r = comm.rank();
    let mut rows = Vec::new();
    // Receivers start from a sentinel no result holds, which also touches every page: the
    // first touch of a fresh allocation would otherwise be charged to the timed op.
    let mut buf: Vec<f32> = if r == 0 {
        (0..count).map(|i| (i % 1000) as f32).collect()
    } else {
        vec![-1.0; count]
    };
    let compress = comm.config().compress;
    if comm.uses_shared_memory() {
        // One untimed round through the segment, as mr-bench's -w does: each process's first
        // touch of the segment's pages would otherwise land on whichever op runs first (the
        // broadcast). The capped modes need none: their links, not page faults, set the pace.
        let mut warm = vec![0f32; count];
        comm.broadcast(&mut warm, 0)?;
        comm.allreduce(&mut warm, ReduceOp::Sum)?;
    }
    if compress == mapreduce::compress::Compression::None {
        comm.barrier()?;
        let t = Instant::now();
        comm.broadcast(&mut buf, 0)?;
        let mut secs = [t.elapsed().as_secs_f64()];
        comm.allreduce(&mut secs, ReduceOp::Max)?;
        let mut bad = [buf
            .iter()
            .enumerate()
            .filter(|(i, x)| **x != (i % 1000) as f32)
            .count() as i64];
        comm.allreduce(&mut bad, ReduceOp::Sum)?;
        rows.push((Op::Broadcast, secs[0], bad[0] == 0));
    }
    for (i, x) in buf.iter_mut().enumerate() {
        *x = ((r + 1) * (i % 7 + 1)) as f32;
    }
    comm.barrier()?;
    let t = Instant::now();
    comm.allreduce(&mut buf, ReduceOp::Sum)?;
    let mut secs = [t.elapsed().as_secs_f64()];
    comm.allreduce(&mut secs, ReduceOp::Max)?;
    let tri = (n * (n + 1) / 2) as f32;
    // Exact, or within n encodings of half an int8 step: partial sums span at most
    // tri * 7, so a block's step is at most that / 255. (Through relays: one encoding of each
    // rank's input, whose steps add up to at most tri * 6 / 255, and one of the sum.)
    let tol = match compress {
        mapreduce::compress::Compression::Int8 => n as f32 * tri * 7.0 / 255.0 / 2.0 * 1.01,
        _ => 0.0,
    };
    let mut bad = [buf
        .iter()
        .enumerate()
        .filter(|(i, x)| (**x - tri * (i % 7 + 1) as f32).abs() > tol)
        .count() as i64];
    comm.allreduce(&mut bad, ReduceOp::Sum)?;
    rows.push((Op::Allreduce, secs[0], bad[0] == 0));
    Ok(rows)
}

#!/usr/bin/env python3
"""Compare torch.distributed collectives over gloo and over mapreduce on this machine.

For each world size, spawns that many ranks on loopback and pushes the same tensors through
gloo and through the mapreduce backend (shm: the default on one host, where ranks share memory;
ring: TCP only, MR_ALGO=ring; and relay when MR_RELAYS is set), for all-reduce,
broadcast, all-gather, all-to-all (all_to_all_single, equal splits) and reduce (to rank 0) over
a range of sizes. Prints nccl-tests-style rows and writes an SVG
chart of bus bandwidth against size, one line per backend and mode.

    python bench/torch_collectives.py                       # 2 and 4 ranks, 1 MiB..256 MiB
    python bench/torch_collectives.py --ranks 2 --max-size 16M --ops allreduce
    MR_RELAYS=127.0.0.1:7001,127.0.0.1:7002 python bench/torch_collectives.py

Columns (GB = 1e9 bytes): size is the buffer in bytes (all-gather: the gathered output;
all-to-all: each rank's send buffer), count its elements (all-gather: each rank's share);
algbw = size / time; busbw = algbw x 2(n-1)/n for all-reduce, (n-1)/n for all-gather and
all-to-all, 1 for broadcast and reduce (as nccl-tests counts them); x_gloo = busbw of this row / busbw of gloo at the same size.
Each row is checked for correct results once after timing ("ok" / "WRONG").
"""

import argparse
import math
import multiprocessing
import os
import queue
import socket
import sys
import time
from datetime import timedelta

OPS = ("allreduce", "broadcast", "allgather", "alltoall", "reduce")
BUSBW_FACTOR = {
    "allreduce": lambda n: 2 * (n - 1) / n,
    "allgather": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "alltoall": lambda n: (n - 1) / n,
    "reduce": lambda n: 1.0,
}
GB = 1e9


def parse_size(text):
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = text[-1] if text and text[-1] in units else ""
    number = text[: len(text) - len(suffix)] if suffix else text
    return int(float(number) * units[suffix])


def human(nbytes):
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:g} {unit}"
    return f"{nbytes} B"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- ranks -------------------------------------------------------------------------------------


def rank_main(rank, world, port, config, results):
    try:
        rows = run_rank(rank, world, port, config)
        results.put((rank, None, rows))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        results.put((rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()}", None))


def new_mapreduce_group(dist, algo, **env):
    """A mapreduce process group whose communicator uses MR_ALGO=algo and the other MR_*
    variables given (None: unset while the group is created)."""
    env = {"MR_ALGO": algo, **env}
    previous = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        return dist.new_group(backend="mapreduce")
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_rank(rank, world, port, config):
    import torch
    import torch.distributed as dist

    import mapreduce_torch  # noqa: F401 - registers the backend

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=world,
        init_method=f"tcp://127.0.0.1:{port}",
        timeout=timedelta(seconds=config["timeout"]),
    )
    groups = [("gloo", None)]
    # The default (MR_ALGO=auto) without relays: ranks on one host share memory.
    groups.append(
        ("mapreduce-shm", new_mapreduce_group(dist, "auto", MR_RELAYS=None, MR_VALIDATOR=None))
    )
    groups.append(("mapreduce-ring", new_mapreduce_group(dist, "ring")))
    if config["relay"]:
        groups.append(("mapreduce-relay", new_mapreduce_group(dist, "relay")))

    dtype = getattr(torch, config["dtype"])
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []
    for op in config["ops"]:
        for size in config["sizes"]:
            count = max(1, size // elem)
            if op in ("allgather", "alltoall"):
                count -= count % world
                count = max(count, world)
            nbytes = count * elem
            # The same tensors go through every backend.
            send = recv = buf = None
            if op == "allgather":
                send = torch.zeros(count // world, dtype=dtype)
                recv = torch.zeros(count, dtype=dtype)
            elif op == "alltoall":
                send = torch.zeros(count, dtype=dtype)
                recv = torch.zeros(count, dtype=dtype)
            else:
                buf = torch.zeros(count, dtype=dtype)
            iters = config["iters"] or (5 if nbytes >= (64 << 20) else 10 if nbytes >= (8 << 20) else 20)
            for name, group in groups:

                def step():
                    if op == "allreduce":
                        dist.all_reduce(buf, group=group)
                    elif op == "broadcast":
                        dist.broadcast(buf, src=0, group=group)
                    elif op == "alltoall":
                        dist.all_to_all_single(recv, send, group=group)
                    elif op == "reduce":
                        dist.reduce(buf, dst=0, group=group)
                    else:
                        dist.all_gather_into_tensor(recv, send, group=group)

                for _ in range(config["warmup"]):
                    step()
                dist.barrier()
                start = time.perf_counter()
                for _ in range(iters):
                    step()
                elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64)
                # The slowest rank defines the op's time.
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                ok = verify(torch, dist, op, group, rank, world, count, dtype)
                seconds = elapsed.item()
                algbw = nbytes / seconds / GB
                rows.append(
                    {
                        "world": world,
                        "op": op,
                        "backend": name,
                        "size": nbytes,
                        # As nccl-tests: all-gather's count is what each rank contributes.
                        "count": count // world if op == "allgather" else count,
                        "type": config["dtype"],
                        "time_us": seconds * 1e6,
                        "algbw": algbw,
                        "busbw": algbw * BUSBW_FACTOR[op](world),
                        "ok": ok,
                    }
                )
            send = recv = buf = None  # noqa: F841 - free before the next size
    for name, group in groups:
        if group is not None:
            dist.destroy_process_group(group)
    dist.destroy_process_group()
    return rows if rank == 0 else None


def verify(torch, dist, op, group, rank, world, count, dtype):
    """One more op on known values; True when every rank got the right result."""
    n = min(count, 1 << 16)
    if op == "allreduce":
        t = torch.full((n,), rank + 1, dtype=dtype)
        dist.all_reduce(t, group=group)
        good = bool((t == world * (world + 1) // 2).all())
    elif op == "broadcast":
        t = torch.arange(n, dtype=dtype) if rank == 0 else torch.zeros(n, dtype=dtype)
        dist.broadcast(t, src=0, group=group)
        good = torch.equal(t, torch.arange(n, dtype=dtype))
    elif op == "alltoall":
        per = max(1, n // world)
        send = torch.arange(world, dtype=dtype).repeat_interleave(per) + rank * world
        out = torch.zeros(per * world, dtype=dtype)
        dist.all_to_all_single(out, send, group=group)
        want = (torch.arange(world, dtype=dtype) * world + rank).repeat_interleave(per)
        good = torch.equal(out, want)
    elif op == "reduce":
        t = torch.full((n,), rank + 1, dtype=dtype)
        dist.reduce(t, dst=0, group=group)
        good = rank != 0 or bool((t == world * (world + 1) // 2).all())
    else:
        per = max(1, n // world)
        out = torch.zeros(per * world, dtype=dtype)
        dist.all_gather_into_tensor(out, torch.full((per,), rank + 1, dtype=dtype), group=group)
        good = torch.equal(out, torch.arange(1, world + 1, dtype=dtype).repeat_interleave(per))
    flag = torch.tensor([0 if good else 1])
    dist.all_reduce(flag)  # over gloo: any rank's failure counts
    return int(flag) == 0


def run_world(world, config):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, config, results)) for r in range(world)]
    for p in procs:
        p.start()
    rows, errors = None, []
    deadline = time.monotonic() + config["job_timeout"]
    try:
        for _ in range(world):
            remaining = deadline - time.monotonic()
            try:
                rank, error, value = results.get(timeout=max(1.0, remaining))
            except queue.Empty:
                errors.append(f"world {world}: ranks did not finish within {config['job_timeout']} s")
                break
            if error:
                errors.append(f"world {world} rank {rank}: {error}")
            if rank == 0 and value is not None:
                rows = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise SystemExit("\n".join(errors))
    return rows


# -- report ------------------------------------------------------------------------------------


def print_table(rows, out=sys.stdout):
    gloo = {(r["world"], r["op"], r["size"]): r for r in rows if r["backend"] == "gloo"}
    key = None
    for r in rows:
        if (r["world"], r["op"]) != key:
            key = (r["world"], r["op"])
            print(f"\n# {r['op']}  ranks={r['world']}  busbw factor {BUSBW_FACTOR[r['op']](r['world']):.3f}", file=out)
            print(
                f"# {'size':>12} {'count':>11} {'type':>8} {'backend':>16} {'time_us':>11} "
                f"{'algbw':>7} {'busbw':>7} {'x_gloo':>7} {'check':>6}",
                file=out,
            )
        base = gloo.get((r["world"], r["op"], r["size"]))
        ratio = r["busbw"] / base["busbw"] if base and base["busbw"] > 0 else float("nan")
        print(
            f"  {r['size']:>12} {r['count']:>11} {r['type']:>8} {r['backend']:>16} {r['time_us']:>11.1f} "
            f"{r['algbw']:>7.3f} {r['busbw']:>7.3f} {ratio:>7.2f} {'ok' if r['ok'] else 'WRONG':>6}",
            file=out,
        )


COLORS = {
    "gloo": "#4e79a7",
    "mapreduce-shm": "#f28e2b",
    "mapreduce-ring": "#e15759",
    "mapreduce-relay": "#59a14f",
}


def svg_chart(rows):
    """Hand-written SVG: one panel per (op, ranks); busbw (GB/s) against size (log2 axis)."""
    panels = sorted({(r["op"], r["world"]) for r in rows}, key=lambda k: (OPS.index(k[0]), k[1]))
    cols = max(1, len({w for _, w in panels}))
    nrows = math.ceil(len(panels) / cols)
    pw, ph, margin = 420, 260, 60
    width, height = cols * (pw + margin) + margin, nrows * (ph + margin + 20) + margin + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{margin}" y="24" font-size="15">torch.distributed bus bandwidth: gloo vs mapreduce (loopback)</text>',
    ]
    backends = [b for b in COLORS if any(r["backend"] == b for r in rows)]
    for i, b in enumerate(backends):
        x = margin + i * 150
        y = 44
        out.append(f'<line x1="{x}" y1="{y}" x2="{x + 24}" y2="{y}" stroke="{COLORS[b]}" stroke-width="2.5"/>')
        out.append(f'<text x="{x + 30}" y="{y + 4}">{b}</text>')
    for idx, (op, world) in enumerate(panels):
        px = margin + (idx % cols) * (pw + margin)
        py = margin + 30 + (idx // cols) * (ph + margin + 20)
        data = [r for r in rows if r["op"] == op and r["world"] == world]
        sizes = sorted({r["size"] for r in data})
        lo, hi = math.log2(sizes[0]), math.log2(sizes[-1])
        ymax = max(r["busbw"] for r in data) * 1.15 or 1.0

        def sx(size, lo=lo, hi=hi, px=px):
            return px + (0 if hi == lo else (math.log2(size) - lo) / (hi - lo) * pw)

        def sy(v, py=py, ymax=ymax):
            return py + ph - v / ymax * ph

        out.append(f'<rect x="{px}" y="{py}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
        out.append(f'<text x="{px}" y="{py - 8}" font-size="13">{op}, {world} ranks</text>')
        for k in range(5):
            v = ymax * k / 4
            y = sy(v)
            out.append(f'<line x1="{px}" y1="{y:.1f}" x2="{px + pw}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{px - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.2f}</text>')
        for s in sizes:
            x = sx(s)
            out.append(f'<line x1="{x:.1f}" y1="{py + ph}" x2="{x:.1f}" y2="{py + ph + 4}" stroke="#888"/>')
            out.append(f'<text x="{x:.1f}" y="{py + ph + 16}" text-anchor="middle">{human(s).replace(" ", "")}</text>')
        out.append(f'<text x="{px + pw / 2}" y="{py + ph + 32}" text-anchor="middle">size</text>')
        out.append(
            f'<text x="{px - 44}" y="{py + ph / 2}" text-anchor="middle" '
            f'transform="rotate(-90 {px - 44} {py + ph / 2})">busbw (GB/s)</text>'
        )
        for b in backends:
            pts = sorted((r["size"], r["busbw"]) for r in data if r["backend"] == b)
            if not pts:
                continue
            path = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{COLORS[b]}" stroke-width="2"/>')
            for s, v in pts:
                out.append(f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="2.5" fill="{COLORS[b]}"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="2,4", help="comma-separated world sizes (default 2,4)")
    parser.add_argument("--min-size", default="1M", help="smallest buffer, e.g. 1M (default 1 MiB)")
    parser.add_argument("--max-size", default="256M", help="largest buffer, e.g. 256M (default 256 MiB)")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--iters", type=int, default=0, help="timed iterations per size (default: by size)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--svg", default="torch_collectives.svg", help="where to write the chart ('' to skip)")
    parser.add_argument("--timeout", type=float, default=300, help="process-group timeout in seconds")
    parser.add_argument("--job-timeout", type=float, default=3600, help="seconds before a world's job is killed")
    args = parser.parse_args()

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = set(ops) - set(OPS)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")
    lo, hi = parse_size(args.min_size), parse_size(args.max_size)
    if lo <= 0 or hi < lo:
        parser.error("need 0 < --min-size <= --max-size")
    sizes = []
    s = lo
    while s <= hi:
        sizes.append(s)
        s *= 2
    relay = bool(os.environ.get("MR_RELAYS") or os.environ.get("MR_VALIDATOR"))
    config = {
        "ops": ops,
        "sizes": sizes,
        "dtype": args.dtype,
        "iters": args.iters,
        "warmup": args.warmup,
        "relay": relay,
        "timeout": args.timeout,
        "job_timeout": args.job_timeout,
    }
    modes = "gloo, mapreduce-shm, mapreduce-ring" + (", mapreduce-relay" if relay else " (set MR_RELAYS for relay mode)")
    print(f"# torch_collectives: {modes}; sizes {human(lo)}..{human(hi)}; dtype {args.dtype}")
    rows = []
    for world in [int(w) for w in args.ranks.split(",") if w.strip()]:
        world_rows = run_world(world, config)
        print_table(world_rows)
        sys.stdout.flush()
        rows.extend(world_rows)
    if args.svg:
        with open(args.svg, "w") as f:
            f.write(svg_chart(rows))
        print(f"\n# chart: {args.svg}")
    if not all(r["ok"] for r in rows):
        print("# some results were WRONG", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

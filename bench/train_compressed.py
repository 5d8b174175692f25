#!/usr/bin/env python3
"""Train one small model on N ranks with uncompressed, bf16 and int8 (+ error feedback)
gradient all-reduce; print the final loss and wall time of each side by side.

Runs on loopback with every rank's sends capped (MR_MAX_RATE, default 125M = 1 Gbit/s) and
shared memory off, so gradients cross emulated slow links and compression matters:

    .venv/bin/python bench/train_compressed.py --ranks 4 --steps 200

With --rank/--world/--master it runs one rank of one format instead (bench/netns.sh -m train
starts one per emulated host, on shaped links, with --rate 0 and shared memory left to the
layout), and rank 0 prints `train FORMAT FINAL_LOSS WALL_S`.

The model (an MLP of about 3.7M parameters, 15 MB of float32 gradients per step) learns a
fixed random teacher network; every run starts from the same weights and sees the same data.
"""

import argparse
import multiprocessing
import os
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, world, port, fmt, steps, rate, out, master="127.0.0.1"):
    if rate and int(rate) > 0:
        os.environ["MR_SHM_DISABLE"] = "1"
        os.environ["MR_MAX_RATE"] = str(rate)
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import mapreduce_torch  # noqa: F401
    from mapreduce_torch import hooks

    torch.set_num_threads(1)
    dist.init_process_group("mapreduce", rank=rank, world_size=world, init_method=f"tcp://{master}:{port}")
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Tanh(), torch.nn.Linear(512, 16))
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1536), torch.nn.ReLU(), torch.nn.Linear(1536, 16)
    )
    ddp = DDP(model, bucket_cap_mb=4)
    if fmt != "none":
        ddp.register_comm_hook(hooks.CompressionState(fmt), hooks.compressed_allreduce_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.02, momentum=0.9)
    gen = torch.Generator().manual_seed(100 + rank)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        x = torch.randn(64, 256, generator=gen)
        with torch.no_grad():
            y = teacher(x)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
    wall = time.perf_counter() - t0
    xs = torch.randn(2048, 256, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(xs), teacher(xs)).item()
    dist.destroy_process_group()
    if rank == 0:
        if out is None:
            print(f"train {fmt} {final:.6f} {wall:.2f}", flush=True)
        else:
            out.put((fmt, final, wall))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rate", default="125000000", help="MR_MAX_RATE for every rank (bytes/s)")
    ap.add_argument("--formats", default="none,bf16,int8")
    ap.add_argument("--rank", type=int, help="run this one rank (with --world, --master, --formats F)")
    ap.add_argument("--world", type=int)
    ap.add_argument("--master", help="HOST:PORT of rank 0's rendezvous")
    args = ap.parse_args()
    if args.rank is not None:
        host, port = args.master.rsplit(":", 1)
        rank_main(args.rank, args.world, int(port), args.formats, args.steps, args.rate, None, host)
        return
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for fmt in args.formats.split(","):
        out = ctx.Queue()
        port = free_port()
        procs = [
            ctx.Process(target=rank_main, args=(r, args.ranks, port, fmt, args.steps, args.rate, out))
            for r in range(args.ranks)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=1800)
            if p.exitcode != 0:
                sys.exit(f"{fmt}: a rank exited with {p.exitcode}")
        rows.append(out.get(timeout=10))
    base = rows[0][1]
    print(f"# {args.ranks} ranks, {args.steps} steps, sends capped at {args.rate} B/s per rank, shared memory off")
    print(f"{'format':<8} {'final_loss':>12} {'vs_none':>8} {'wall_s':>8}")
    for fmt, final, wall in rows:
        print(f"{fmt:<8} {final:>12.6f} {100 * (final - base) / base:>+7.2f}% {wall:>8.2f}")


if __name__ == "__main__":
    main()

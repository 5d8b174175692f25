#!/usr/bin/env python3
"""Check the mapreduce backend on CUDA tensors against gloo, on a machine with a GPU.

Spawns N ranks on loopback (all on one GPU unless there are N). Each rank:
  * runs every collective the backend stages for CUDA (all_reduce, broadcast,
    all_gather_into_tensor, reduce_scatter_tensor, reduce, all_to_all_single, the coalesced
    forms through functional collectives) on CUDA tensors over mapreduce and over gloo, and
    requires equal results that stay on the GPU;
  * trains a small model with DDP on CUDA over each backend from the same seed and data and
    compares the parameters.

    python bench/gpu_check.py                 # 2 ranks
    python bench/gpu_check.py --ranks 4

Prints one line per check and exits non-zero on any failure. Without CUDA it says so and exits 2.
"""

import argparse
import multiprocessing
import os
import socket
import sys
import traceback
from datetime import timedelta


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collectives(rank, world, groups, torch, dist):
    """{name: max abs difference between mapreduce and gloo} for every staged collective."""
    import torch.distributed._functional_collectives as fc

    dev = torch.device("cuda", rank % torch.cuda.device_count())
    out = {}

    def values(n, salt=0):
        return ((torch.arange(n, device=dev) * 7 + rank * 3 + salt) % 11 - 5).float()

    def compare(name, fn):
        got = {}
        for label, g in groups.items():
            res = fn(g)
            for t in res:
                if t.device != dev:
                    raise AssertionError(f"{name} over {label}: result on {t.device}, not {dev}")
            got[label] = [t.cpu() for t in res]
        out[name] = max(
            ((a - b).abs().max().item() if a.numel() else 0.0)
            for a, b in zip(got["mapreduce"], got["gloo"])
        )

    def all_reduce(g):
        t = values(1031)
        dist.all_reduce(t, group=g)
        return [t]

    def broadcast(g):
        t = values(1031) if rank == world - 1 else torch.zeros(1031, device=dev)
        dist.broadcast(t, src=world - 1, group=g)
        return [t]

    def all_gather(g):
        o = torch.zeros(world * 100, device=dev)
        dist.all_gather_into_tensor(o, values(100), group=g)
        return [o]

    def reduce_scatter(g):
        o = torch.zeros(100, device=dev)
        dist.reduce_scatter_tensor(o, values(world * 100), group=g)
        return [o]

    def reduce(g):
        t = values(333)
        dist.reduce(t, dst=0, group=g)
        return [t] if rank == 0 else []

    def all_to_all(g):
        o = torch.zeros(world * 6, device=dev)
        dist.all_to_all_single(o, values(world * 6), group=g)
        return [o]

    def coalesced(g):
        return list(fc.all_gather_into_tensor_coalesced([values(6), values(10, 1)], g)) + list(
            fc.reduce_scatter_tensor_coalesced([values(world * 3), values(world * 5, 2)], "sum", [0, 0], g)
        )

    def async_then(g):
        t = values(4096)
        fut = dist.all_reduce(t, group=g, async_op=True).get_future().then(lambda f: f.value()[0] * 2)
        return [fut.wait()]

    for name, fn in [
        ("all_reduce", all_reduce),
        ("broadcast", broadcast),
        ("all_gather_into_tensor", all_gather),
        ("reduce_scatter_tensor", reduce_scatter),
        ("reduce", reduce),
        ("all_to_all_single", all_to_all),
        ("coalesced", coalesced),
        ("future_then", async_then),
    ]:
        compare(name, fn)
    return out


def ddp(rank, world, group, torch, steps=10):
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = torch.device("cuda", rank % torch.cuda.device_count())
    torch.manual_seed(rank)  # DDP's initial broadcast must make replicas equal
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).to(dev)
    ddp_model = DDP(model, device_ids=[dev.index], process_group=group, bucket_cap_mb=0.01)
    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(99)
    for _ in range(steps):
        x = torch.randn(world, 16, 32, generator=gen)[rank].to(dev)
        y = torch.randn(world, 16, 4, generator=gen)[rank].to(dev)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp_model(x), y).backward()
        opt.step()
    torch.cuda.synchronize()
    return [p.detach().cpu() for p in model.parameters()]


def rank_main(rank, world, port, results):
    try:
        import torch
        import torch.distributed as dist

        import mapreduce_torch  # noqa: F401 - registers the backend

        torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}", timeout=timedelta(seconds=120)
        )
        groups = {"mapreduce": dist.new_group(backend="mapreduce"), "gloo": dist.new_group(backend="gloo")}
        report = collectives(rank, world, groups, torch, dist)
        mr = ddp(rank, world, groups["mapreduce"], torch)
        gl = ddp(rank, world, groups["gloo"], torch)
        report["ddp_parameters"] = max((a - b).abs().max().item() for a, b in zip(mr, gl))
        dist.destroy_process_group()
        results.put((rank, None, report))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, traceback.format_exc(), None))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest allowed difference from gloo")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before the job is killed")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here; nothing checked")
        return 2
    os.environ.setdefault("MR_TIMEOUT_MS", "60000")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, args.ranks, port, results)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    failed = False
    reports = {}
    try:
        for _ in procs:
            rank, error, report = results.get(timeout=args.timeout)
            if error:
                print(f"rank {rank} failed:\n{error}")
                failed = True
            else:
                reports[rank] = report
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for rank in sorted(reports):
        for name, diff in reports[rank].items():
            ok = diff <= args.tolerance
            failed |= not ok
            print(f"rank {rank} {name:24s} max |mapreduce - gloo| = {diff:.3g}  {'ok' if ok else 'FAILED'}")
    print("gpu_check:", "FAILED" if failed else f"all checks passed on {args.ranks} ranks ({torch.cuda.get_device_name(0)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""DDP with the stock PowerSGD hook and several gradient buckets, over gloo and over mapreduce.

Each bucket's hook starts an all-reduce whose future callbacks issue two more (P and Q) while
backward goes on issuing the next buckets' all-reduces from the autograd thread. Collectives are
matched by the order each rank issues them, so a backend must give those issued from callbacks
the same place on every rank. mapreduce does (an op is held back while an earlier op of the same
thread still has callbacks to run); gloo runs callbacks inline or on its worker threads as timing
has it, so its ranks disagree and a collective times out.

    python bench/powersgd_buckets.py                          # gloo and mapreduce, 2 ranks
    python bench/powersgd_buckets.py --backends gloo --caps 0.02,0.015 --trials 3

Per backend and bucket cap: how many trials completed, how many buckets the model was cut into,
and whether every rank ended with the same parameters. Exits non-zero if a mapreduce trial failed.
"""

import argparse
import multiprocessing
import os
import queue
import socket
import sys
import time
from datetime import timedelta


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, world, port, backend, cap, steps, timeout_s, results):
    import torch
    import torch.distributed as dist

    buckets = set()
    try:
        # The model and training loop are the backend tests' own (a 32-64-64-4 MLP).
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "torch-extension", "tests"))
        from dist_workers import _deep_mlp, _train_powersgd

        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            init_method=f"tcp://127.0.0.1:{port}",
            timeout=timedelta(seconds=timeout_s),
        )
        params, _ = _train_powersgd(_deep_mlp(rank, 1), None, steps, rank, world, cap, buckets=buckets)
        flat = torch.cat([p.flatten() for p in params])
        results.put((rank, "ok", len(buckets), flat.double().sum().item()))
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - reported as the trial's outcome
        # The innermost error of callback chains ("...: RuntimeError: [file:line] what").
        text = str(e).splitlines()[0].split("Error: ")[-1]
        results.put((rank, "error", len(buckets), text.split("] ")[-1][:160]))
    # Flush the report, then leave without interpreter teardown (a failed group may hang it).
    results.close()
    results.join_thread()
    sys.stdout.flush()
    os._exit(0)


def trial(backend, world, cap, steps, timeout_s):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=rank_main, args=(r, world, port, backend, cap, steps, timeout_s, results), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    got = []
    deadline = time.monotonic() + timeout_s * 2 + 30
    while len(got) < world and time.monotonic() < deadline:
        try:
            got.append(results.get(timeout=1))
        except queue.Empty:
            pass
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    errors = [f"rank {r}: {m}" for r, status, _, m in got if status != "ok"]
    silent = sorted(set(range(world)) - {r for r, *_ in got})
    if silent:
        errors.append(f"ranks {silent} never returned (killed after {timeout_s * 2 + 30:g} s)")
    if errors:
        # Buckets seen before the failure, by the ranks that reported (0 if none did).
        return "failed", max((b for _, _, b, _ in got), default=0), "; ".join(errors)
    sums = {round(s, 9) for _, _, _, s in got}
    buckets = max(b for _, _, b, _ in got)
    if len(sums) != 1:
        return "diverged", buckets, f"parameter sums {sorted(sums)}"
    return "ok", buckets, ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="gloo,mapreduce")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--caps", default="0.02,0.015,0.001", help="bucket_cap_mb values")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=15, help="process-group timeout, seconds")
    args = parser.parse_args()
    mapreduce_failed = False
    print(f"{'backend':10} {'cap MB':>7} {'buckets':>7} {'completed':>9}  first failure")
    for backend in args.backends.split(","):
        for cap in [float(c) for c in args.caps.split(",")]:
            outcomes = [trial(backend, args.ranks, cap, args.steps, args.timeout) for _ in range(args.trials)]
            done = sum(1 for o in outcomes if o[0] == "ok")
            buckets = max(o[1] for o in outcomes) or "?"
            failure = next((f"{o[0]}: {o[2]}" for o in outcomes if o[0] != "ok"), "")
            print(f"{backend:10} {cap:7g} {buckets!s:>7} {done:>5}/{args.trials:<3}  {failure}", flush=True)
            mapreduce_failed |= backend == "mapreduce" and done < args.trials
    sys.exit(1 if mapreduce_failed else 0)


if __name__ == "__main__":
    main()

"""One rank of a gloo all-reduce timing run, for bench/netns.sh.

Rendezvous through torch's env:// (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE). Rank 0 prints
one line per size: `gloo allreduce SIZE_BYTES SECONDS` (mean over iterations, max over ranks).
"""
import os
import sys
import time

import torch
import torch.distributed as dist


def main() -> None:
    sizes = [int(s) for s in sys.argv[1].split(",")]
    iters = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    for size in sizes:
        t = torch.ones(size // 4, dtype=torch.float32)
        dist.all_reduce(t)  # warm-up
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(f"gloo allreduce {size} {elapsed.item():.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "eth0")
    main()

"""Launched by test_hierarchy.py: one torchrun per emulated node (MR_HOST_ID), DDP over
mapreduce (hierarchical: 2 nodes x 2 ranks) and over gloo from the same seeds and data."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_workers  # noqa: E402
import mapreduce_torch  # noqa: E402,F401 - registers the backend

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mapreduce_group = dist.new_group(backend="mapreduce")
mr = dist_workers._train(dist_workers._mlp(seed=rank), mapreduce_group, 10, rank, world)
gloo = dist_workers._train(dist_workers._mlp(seed=rank), None, 10, rank, world)
max_diff = max((a - b).abs().max().item() for a, b in zip(mr, gloo))
flat = torch.cat([p.flatten() for p in mr])
digests = [None] * world
dist.all_gather_object(digests, dist_workers.digest(flat))
assert len(set(digests)) == 1, f"replicas diverged under mapreduce: {digests}"
assert max_diff <= 1e-5, f"rank {rank}: {max_diff} away from gloo"
dist.destroy_process_group()
print(f"hier ddp rank {rank} ok max_diff={max_diff:.2e}", flush=True)

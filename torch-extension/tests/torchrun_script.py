"""Launched by test_launchers.py under torchrun: env:// rendezvous through torchrun's store."""

import os

import torch
import torch.distributed as dist

import mapreduce_torch  # noqa: F401 - registers the backend

dist.init_process_group("mapreduce")
rank, world = dist.get_rank(), dist.get_world_size()
assert world == int(os.environ["WORLD_SIZE"]) == 2

t = torch.full((1 << 16,), float(rank + 1))
dist.all_reduce(t)
assert torch.equal(t, torch.full_like(t, world * (world + 1) / 2)), t[:4]

# A second group of the same name after destroy must not pick up the first one's rendezvous.
dist.destroy_process_group()
dist.init_process_group("mapreduce")
gathered = torch.zeros(world, dtype=torch.int64)
dist.all_gather_into_tensor(gathered, torch.tensor([rank * 10]))
assert gathered.tolist() == [r * 10 for r in range(world)], gathered
dist.destroy_process_group()
print("torchrun rank ok", flush=True)

"""torch.distributed backend "mapreduce".

Importing this package registers the backend::

    import torch.distributed as dist
    import mapreduce_torch

    dist.init_process_group("mapreduce", rank=rank, world_size=world_size, init_method="env://")

Collectives run on CPU tensors through libmapreduce (ring, or relays when ``MR_RELAYS`` or
``MR_VALIDATOR`` is set). :class:`Peer` keeps the map-reduce subnet's 1-based peer API.
"""

from datetime import timedelta

import torch.distributed as dist

from . import _C
from .peer import Peer

__all__ = ["BACKEND_NAME", "Peer", "ProcessGroupMapReduce", "create_backend"]

BACKEND_NAME = "mapreduce"
ProcessGroupMapReduce = _C.ProcessGroupMapReduce


def create_backend(store, rank: int, world_size: int, timeout: timedelta):
    """Backend factory called by ``torch.distributed`` for each process group.

    Rank 0 publishes the communicator's unique id through ``store`` (the group's PrefixStore);
    the other ranks read it. ``timeout`` becomes the communicator's ``MR_TIMEOUT_MS`` unless the
    environment already sets that variable.
    """
    return _C.create_backend(store, rank, world_size, timeout)


dist.Backend.register_backend(BACKEND_NAME, create_backend, devices=["cpu"])

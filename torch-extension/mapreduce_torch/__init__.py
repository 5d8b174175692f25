"""torch.distributed backend "mapreduce".

Importing this package registers the backend::

    import torch.distributed as dist
    import mapreduce_torch

    dist.init_process_group("mapreduce", rank=rank, world_size=world_size, init_method="env://")

Collectives run on CPU tensors (CUDA tensors through pinned host copies) through libmapreduce (ring, or relays when ``MR_RELAYS`` or
``MR_VALIDATOR`` is set). :class:`Peer` keeps the map-reduce subnet's 1-based peer API.
"""

import functools
from datetime import timedelta

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

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


class _NamedProcessGroup(c10d.ProcessGroup):
    """A process group that reports its backend as "mapreduce".

    c10d's C++ ``ProcessGroup::getBackendName()`` (which DDP's logging data reads as
    ``backend_name``) names every third-party backend "custom"; a backend cannot change what its
    process group reports. A Python subclass overrides that virtual, so groups whose only backend
    is mapreduce are created as this class.
    """

    def getBackendName(self):  # noqa: N802 - the C++ virtual's name
        return BACKEND_NAME


def _only_mapreduce(backend) -> bool:
    """Whether a backend string such as "mapreduce" or "cpu:mapreduce,cuda:mapreduce" names
    this backend alone."""
    names = {part.split(":")[-1].strip().lower() for part in str(backend).split(",") if part.strip()}
    return names == {BACKEND_NAME}


def _install_group_naming():
    original = c10d._new_process_group_helper
    if getattr(original, "_mapreduce_named", False):
        return

    @functools.wraps(original)
    def helper(group_size, group_rank, global_ranks_in_group, backend, *args, **kwargs):
        if not _only_mapreduce(backend):
            return original(group_size, group_rank, global_ranks_in_group, backend, *args, **kwargs)
        # The helper constructs the group through the module-level name.
        c10d.ProcessGroup = _NamedProcessGroup
        try:
            return original(group_size, group_rank, global_ranks_in_group, backend, *args, **kwargs)
        finally:
            c10d.ProcessGroup = _NamedProcessGroup.__mro__[1]

    helper._mapreduce_named = True
    c10d._new_process_group_helper = helper


# CUDA tensors are staged through pinned host memory (not yet verified on GPU hardware).
dist.Backend.register_backend(BACKEND_NAME, create_backend, devices=["cpu", "cuda"])
_install_group_naming()

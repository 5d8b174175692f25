"""The map-reduce subnet's peer API on top of the "mapreduce" backend.

Peers are numbered 1..peer_count as in the subnet's scripts; torch.distributed ranks are the
peer rank minus one. Rank 1 hosts the rendezvous store at ``MASTER_ADDR:MASTER_PORT`` (or the
``bootstrap``/``master_addr``/``master_port`` arguments). The store lives as long as the Peer, so
the subnet's pattern of calling ``init_process_group()``/``destroy_process_group()`` around every
exchange works: each cycle rendezvouses under its own key prefix.

Relays and the validator are chosen by the ``MR_*`` environment variables; the constructor's
``relays``, ``validator``, ``token`` and ``algo`` arguments set those variables for this process.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

# Header broadcast before the data of Peer.broadcast: dtype code, number of dimensions, sizes.
_MAX_DIMS = 16
_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
]
# Number of dimensions announced when the sender refuses the tensor, so receivers fail too.
_REFUSED = -1


class Peer:
    """One trainer of a job of ``peer_count`` peers.

    Args:
        rank: this peer's rank, 1..peer_count. Rank 1 is the broadcast source and hosts the
            rendezvous store.
        peer_count: number of peers in the job.
        bandwidth: largest tensor, in bytes, that broadcast/all_reduce accept (None: no limit).
        master_addr, master_port: rendezvous address (default: ``MASTER_ADDR``/``MASTER_PORT``).
        bootstrap: ``"host:port"``, an alternative to master_addr/master_port.
        relays: relay addresses, ``"host:port,..."`` or a sequence; sets ``MR_RELAYS``.
        validator: ``"host:port"`` of a validator; sets ``MR_VALIDATOR``.
        token: job secret for static relays (hex); sets ``MR_TOKEN``.
        algo: ``"auto"``, ``"ring"`` or ``"relay"``; sets ``MR_ALGO``.
        timeout: rendezvous and collective timeout.
    """

    def __init__(
        self,
        rank: int,
        peer_count: int,
        bandwidth: Optional[int] = None,
        *,
        master_addr: Optional[str] = None,
        master_port: Optional[int] = None,
        bootstrap: Optional[str] = None,
        relays: Union[str, Sequence[str], None] = None,
        validator: Optional[str] = None,
        token: Optional[str] = None,
        algo: Optional[str] = None,
        timeout: timedelta = timedelta(seconds=60),
    ):
        if peer_count < 1:
            raise ValueError(f"peer_count must be at least 1, got {peer_count}")
        if not 1 <= rank <= peer_count:
            raise ValueError(f"rank must be between 1 and peer_count ({peer_count}), got {rank}")
        if bootstrap is not None:
            host, sep, port = bootstrap.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"bootstrap must be 'host:port', got {bootstrap!r}")
            master_addr, master_port = host, int(port)
        self.rank = rank
        self.peer_count = peer_count
        self.bandwidth = None if bandwidth is None else int(bandwidth)
        self.master_addr = master_addr
        self.master_port = None if master_port is None else int(master_port)
        self.timeout = timeout

        if relays is not None:
            os.environ["MR_RELAYS"] = relays if isinstance(relays, str) else ",".join(relays)
        if validator is not None:
            os.environ["MR_VALIDATOR"] = validator
        if token is not None:
            os.environ["MR_TOKEN"] = token
        if algo is not None:
            os.environ["MR_ALGO"] = algo

        self._store: Optional[dist.Store] = None
        self._generation = 0

    # -- process group ---------------------------------------------------------------------

    def _rendezvous_store(self) -> dist.Store:
        if self._store is None:
            addr = self.master_addr or os.environ.get("MASTER_ADDR")
            port = self.master_port or os.environ.get("MASTER_PORT")
            if not addr or not port:
                raise RuntimeError(
                    "Peer needs a rendezvous address: pass master_addr/master_port or bootstrap, "
                    "or set MASTER_ADDR and MASTER_PORT"
                )
            self._store = dist.TCPStore(
                addr,
                int(port),
                world_size=self.peer_count,
                is_master=self.rank == 1,
                timeout=self.timeout,
                wait_for_workers=False,
            )
        return self._store

    def init_process_group(self) -> None:
        """Join the job's process group (backend "mapreduce")."""
        if dist.is_initialized():
            raise RuntimeError("a process group is already initialized; call destroy_process_group() first")
        # Every peer calls init/destroy in lockstep, so generations agree across peers.
        self._generation += 1
        store = dist.PrefixStore(f"mapreduce-peer/{self._generation}", self._rendezvous_store())
        dist.init_process_group(
            "mapreduce",
            store=store,
            rank=self.rank - 1,
            world_size=self.peer_count,
            timeout=self.timeout,
        )

    def destroy_process_group(self) -> None:
        """Leave the process group once every peer has finished its collectives."""
        if not dist.is_initialized():
            return
        dist.barrier()
        dist.destroy_process_group()

    # -- collectives -----------------------------------------------------------------------

    def _check_size(self, tensor: torch.Tensor, what: str) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.bandwidth is not None and nbytes > self.bandwidth:
            raise ValueError(f"{what} of {nbytes} bytes exceeds the peer's bandwidth of {self.bandwidth} bytes")

    def broadcast(self, tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rank 1 sends ``tensor``; every other peer receives it and gets it back.

        Receivers may pass ``None`` (a new tensor is returned) or a tensor of the right shape and
        dtype to receive into. Rank 1 gets its own tensor back.
        """
        header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64)
        if self.rank == 1:
            if tensor is None:
                raise ValueError("rank 1 must pass the tensor to broadcast")
            refusal = None
            if tensor.dtype not in _DTYPES:
                refusal = ValueError(f"broadcast: dtype {tensor.dtype} is not supported")
            elif tensor.dim() > _MAX_DIMS:
                refusal = ValueError(f"broadcast: at most {_MAX_DIMS} dimensions are supported")
            else:
                try:
                    self._check_size(tensor, "broadcast")
                except ValueError as e:
                    refusal = e
            if refusal is not None:
                header[1] = _REFUSED
                dist.broadcast(header, src=0)
                raise refusal
            header[0] = _DTYPES.index(tensor.dtype)
            header[1] = tensor.dim()
            header[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
            dist.broadcast(header, src=0)
            dist.broadcast(tensor, src=0)
            return tensor

        dist.broadcast(header, src=0)
        ndim = int(header[1])
        if ndim == _REFUSED:
            raise RuntimeError("broadcast: rank 1 refused to send its tensor (see its error)")
        dtype = _DTYPES[int(header[0])]
        shape = tuple(int(s) for s in header[2 : 2 + ndim])
        if tensor is None or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            tensor = torch.empty(shape, dtype=dtype)
        dist.broadcast(tensor, src=0)
        return tensor

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average ``tensor`` over all peers, in place; returns it."""
        self._check_size(tensor, "all_reduce")
        dist.all_reduce(tensor, op=dist.ReduceOp.AVG)
        return tensor

"""DDP communication hooks that send gradients compressed, with error feedback.

On slow links the bytes are the time: ``MR_COMPRESS``-style wire formats (bf16, fp16, or
blockwise int8) cut a float32 all-reduce's bytes by 2x or 3.9x. Compression loses precision,
and training with a lossy all-reduce drifts unless what was lost is put back: each rank keeps,
per DDP bucket, the residual between its gradient and what its first encoding can carry, and
adds it to the next step's gradient (error feedback, as in 1-bit SGD, PowerSGD and BytePS).

Usage::

    import torch.distributed as dist
    from mapreduce_torch import hooks

    dist.init_process_group("mapreduce")
    state = hooks.CompressionState("int8")          # creates a compressed process group
    ddp.register_comm_hook(state, hooks.compressed_allreduce_hook)

The hook averages gradients like DDP's default. The all-reduce goes through a process group of
backend ``mapreduce`` whose communicator was created with ``MR_COMPRESS`` set to the chosen
format, so partial sums travel in that format between ranks (over the TCP ring or through
relays; ops over shared memory on one host stay exact — see the README). The group's
broadcasts, all-gathers and reduce-scatters of float data travel in the format too, so keep
exact traffic (such as DDP's initial parameter broadcast) on another group.
"""

import os
import threading

import torch
import torch.distributed as dist

FORMATS = ("bf16", "fp16", "int8")
INT8_BLOCK = 256

_env_lock = threading.Lock()


def new_compressed_group(fmt, ranks=None, timeout=None):
    """A ``mapreduce`` process group whose float all-reduces travel as ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"compression must be one of {FORMATS}, not {fmt!r}")
    with _env_lock:
        before = os.environ.get("MR_COMPRESS")
        os.environ["MR_COMPRESS"] = fmt
        try:
            kwargs = {"backend": "mapreduce"}
            if timeout is not None:
                kwargs["timeout"] = timeout
            return dist.new_group(ranks=ranks, **kwargs)
        finally:
            if before is None:
                os.environ.pop("MR_COMPRESS", None)
            else:
                os.environ["MR_COMPRESS"] = before


def quantize(t, fmt):
    """What one encoding of float32 ``t`` in ``fmt`` decodes to (a float32 tensor).

    bf16 and fp16 round to nearest even like the library; int8 follows the library's block
    rule (midpoint and step per 256 elements; a block holding a non-finite value becomes NaN).
    Used to estimate what compression loses; the library itself does the encoding on the wire.
    """
    if fmt == "bf16":
        return t.to(torch.bfloat16).to(t.dtype)
    if fmt == "fp16":
        return t.to(torch.float16).to(t.dtype)
    if fmt != "int8":
        raise ValueError(f"compression must be one of {FORMATS}, not {fmt!r}")
    flat = t.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    if n == 0:
        return t.clone()
    full = n - n % INT8_BLOCK
    parts = []
    if full:
        parts.append(_int8_blocks(flat[:full].view(-1, INT8_BLOCK)))
    if full < n:
        parts.append(_int8_blocks(flat[full:].view(1, -1)))
    out = parts[0] if len(parts) == 1 else torch.cat([p.reshape(-1) for p in parts])
    return out.reshape(-1).view_as(t).to(t.dtype)


def _int8_blocks(blocks):
    """One int8 encoding of each row of ``blocks`` (a block each), decoded: a new tensor.

    Written as few full-size passes as possible (most work is per block): this runs on every
    bucket of every step.
    """
    lo = blocks.amin(dim=1, keepdim=True)
    hi = blocks.amax(dim=1, keepdim=True)
    # A NaN anywhere makes lo or hi NaN, an infinity makes one of them infinite.
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    step = hi / 255.0 - lo / 255.0
    mid = lo + (hi / 2.0 - lo / 2.0)
    moves = step > 0
    safe = torch.where(moves, step, torch.ones_like(step))
    q = blocks - mid
    q.div_(safe).add_(128.0).floor_().clamp_(0.0, 255.0)
    # Constant blocks decode to their midpoint (code 0 times a zero step).
    q.mul_(moves.to(q.dtype))
    q.sub_(127.5).mul_(step).add_(mid)
    if not bool(finite.all()):
        q = torch.where(finite, q, torch.full_like(q, float("nan")))
    return q


class CompressionState:
    """Per-model state of :func:`compressed_allreduce_hook`: the format, the compressed process
    group, and each bucket's residual (what compression lost last step)."""

    def __init__(self, fmt="int8", group=None, error_feedback=True):
        if fmt not in FORMATS:
            raise ValueError(f"compression must be one of {FORMATS}, not {fmt!r}")
        self.fmt = fmt
        self.group = group if group is not None else new_compressed_group(fmt)
        self.error_feedback = error_feedback
        self.residuals = {}

    def residual_norm(self):
        """Total L2 norm of the residuals held (0 before the first step)."""
        if not self.residuals:
            return 0.0
        return float(torch.sqrt(sum((r.double() ** 2).sum() for r in self.residuals.values())))


def compressed_allreduce_hook(state, bucket):
    """DDP communication hook: average the bucket's gradients through ``state.group`` with the
    residual of the previous step added first (error feedback)."""
    grad = bucket.buffer()
    world = dist.get_world_size(state.group)
    if not grad.is_floating_point() or grad.dtype not in (torch.float32, torch.float64):
        # Only float32/float64 compress; others go exact through the same group.
        fut = dist.all_reduce(grad, group=state.group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0].div_(world))
    key = bucket.index()
    if state.error_feedback:
        residual = state.residuals.get(key)
        if residual is not None and residual.shape == grad.shape:
            grad.add_(residual)
        sent = quantize(grad, state.fmt)
        state.residuals[key] = grad - sent
        grad.copy_(sent)
    fut = dist.all_reduce(grad, group=state.group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0].div_(world))

"""Rank functions for test_compression.py (spawned processes import them by module)."""

import os
from datetime import timedelta

import torch
import torch.distributed as dist

import mapreduce_torch  # noqa: F401 - registers the backend
from mapreduce_torch import hooks


def _init(rank, world, port):
    # Over TCP, so the ring really carries the compressed format (shared memory is exact).
    os.environ["MR_SHM_DISABLE"] = "1"
    dist.init_process_group(
        "mapreduce",
        rank=rank,
        world_size=world,
        init_method=f"tcp://127.0.0.1:{port}",
        timeout=timedelta(seconds=60),
    )


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))


def _train(rank, world, fmt, error_feedback, steps):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_model(), bucket_cap_mb=0.05)
    state = None
    if fmt is not None:
        state = hooks.CompressionState(fmt, error_feedback=error_feedback)
        model.register_comm_hook(state, hooks.compressed_allreduce_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(7)
    w_true = torch.randn(64, 1, generator=gen)
    loss = None
    for _ in range(steps):
        x = torch.randn(world, 32, 64, generator=gen)
        y = torch.sin(x @ w_true)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[rank]), y[rank])
        loss.backward()
        opt.step()
    # The loss on fixed data every rank agrees on, and the parameters' bits.
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model.module(x), torch.sin(x @ w_true)).item()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return final, flat, (state.residual_norm() if state else 0.0)


def train_formats(rank, world, port, steps):
    _init(rank, world, port)
    out = {}
    for name, fmt, ef in [("none", None, False), ("bf16", "bf16", True), ("int8", "int8", True), ("int8-noef", "int8", False)]:
        final, flat, residual = _train(rank, world, fmt, ef, steps)
        digests = [None] * world
        dist.all_gather_object(digests, flat.numpy().tobytes().hex()[:64] + str(float(flat.double().sum())))
        out[name] = {"loss": final, "same_on_every_rank": len(set(digests)) == 1, "residual": residual}
    dist.destroy_process_group()
    return out


def _reference_int8(t):
    """The int8 block rule written plainly (NaN-padded blocks, masks): what hooks.quantize must
    match bit for bit."""
    flat = t.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    pad = (-n) % 256
    blocks = torch.nn.functional.pad(flat, (0, pad), value=float("nan")).view(-1, 256)
    valid = torch.arange(blocks.numel()).view_as(blocks) < n
    big = torch.finfo(torch.float32).max
    lo = torch.where(valid, blocks, torch.full_like(blocks, big)).amin(dim=1, keepdim=True)
    hi = torch.where(valid, blocks, torch.full_like(blocks, -big)).amax(dim=1, keepdim=True)
    finite = torch.where(valid, torch.isfinite(blocks), torch.ones_like(valid)).all(dim=1, keepdim=True)
    step = hi / 255.0 - lo / 255.0
    mid = lo + (hi / 2.0 - lo / 2.0)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.floor((blocks - mid) / safe + 128.0).clamp(0.0, 255.0)
    q = torch.where(step > 0, q, torch.zeros_like(q))
    out = mid + (q - 127.5) * step
    out = torch.where(finite, out, torch.full_like(out, float("nan")))
    return out.reshape(-1)[:n].view_as(t).to(t.dtype)


def _same_bits(a, b):
    kind = torch.int64 if a.dtype == torch.float64 else torch.int32
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(kind), b.reshape(-1).view(kind))


def quantize_cases(rank, world, port):
    """The hook's estimate of one int8 encoding: within half a step per block, NaN blocks."""
    x = torch.randn(1000, generator=torch.Generator().manual_seed(rank)) * 10
    q = hooks.quantize(x, "int8")
    worst = 0.0
    for b in range(0, 1000, 256):
        blk, qb = x[b : b + 256], q[b : b + 256]
        step = (blk.max() / 255 - blk.min() / 255).item()
        worst = max(worst, ((blk - qb).abs().max().item()) / (step / 2))
    y = x.clone()
    y[300] = float("nan")
    qn = hooks.quantize(y, "int8")
    return {
        "worst_over_half_step": worst,
        "nan_block": bool(torch.isnan(qn[256:512]).all()),
        "others_finite": bool(torch.isfinite(qn[:256]).all() and torch.isfinite(qn[512:]).all()),
        "constant_exact": bool(torch.equal(hooks.quantize(torch.full((300,), 3.25), "int8"), torch.full((300,), 3.25))),
        "bf16": bool(torch.equal(hooks.quantize(x, "bf16"), x.to(torch.bfloat16).float())),
        "matches_reference": all(_same_bits(hooks.quantize(c, "int8"), _reference_int8(c)) for c in _int8_cases()),
    }


def _int8_cases():
    g = torch.Generator().manual_seed(5)
    for n in (1, 255, 256, 257, 1000, 70001):
        x = torch.randn(n, generator=g) * 10
        yield x
        yield x.double()
        y = x.clone()
        y[n // 2] = float("nan")
        yield y
        z = x.clone()
        z[-1] = float("-inf")
        yield z
        yield torch.full((n,), -2.5)
        w = x.clone()
        w[: min(n, 300)] = 0.0
        yield w.view(1, -1)

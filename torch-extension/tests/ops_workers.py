"""Ranks for test_ops.py: every collective beyond the all-reduce family, run once through a
mapreduce group and once through a gloo group on the same inputs; the results must be equal."""

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import mapreduce_torch  # noqa: F401 - registers the backend
from dist_workers import check_equal, init, values

DTYPES = [torch.float32, torch.int64, torch.bfloat16, torch.uint8]
N = 1031


def cases(rank, world):
    """(name, fn(group) -> list of result tensors); each runs on both groups."""
    out = []

    def add(name):
        def register(fn):
            out.append((name, fn))
            return fn

        return register

    for dtype in DTYPES:
        dn = str(dtype).replace("torch.", "")
        for root in range(world):

            @add(f"reduce-{dn}-root{root}")
            def _(g, dtype=dtype, root=root):
                res = []
                for op in ("SUM", "MAX", "MIN"):
                    t = values(rank, N, dtype, op)
                    dist.reduce(t, dst=root, op=getattr(dist.ReduceOp, op), group=g)
                    if rank == root:
                        res.append(t)
                return res

            @add(f"gather-{dn}-root{root}")
            def _(g, dtype=dtype, root=root):
                outs = [torch.full((N,), 9, dtype=dtype) for _ in range(world)] if rank == root else None
                dist.gather(values(rank, N, dtype, salt=root), outs, dst=root, group=g)
                return outs or []

            @add(f"scatter-{dn}-root{root}")
            def _(g, dtype=dtype, root=root):
                ins = [values(p, N, dtype, salt=root) for p in range(world)] if rank == root else None
                t = torch.full((N,), 9, dtype=dtype)
                dist.scatter(t, ins, src=root, group=g)
                return [t]

        @add(f"all_to_all_single-equal-{dn}")
        def _(g, dtype=dtype):
            inp = values(rank, world * 6, dtype).reshape(world * 3, 2)
            out = torch.full_like(inp, 9)
            dist.all_to_all_single(out, inp, group=g)
            return [out]

        @add(f"all_to_all_single-unequal-{dn}")
        def _(g, dtype=dtype):
            split = lambda a, b: (a * 2 + b) % 3  # noqa: E731 - zeros included
            ins = [split(rank, p) for p in range(world)]
            outs = [split(p, rank) for p in range(world)]
            inp = values(rank, sum(ins) * 3, dtype, salt=1).reshape(sum(ins), 3)
            out = torch.full((sum(outs), 3), 9, dtype=dtype)
            dist.all_to_all_single(out, inp, output_split_sizes=outs, input_split_sizes=ins, group=g)
            return [out]

        @add(f"all_to_all-list-{dn}")
        def _(g, dtype=dtype):
            # gloo takes equal sizes only; unequal ones are covered by all_to_all_single.
            ins = [values(rank, 5, dtype, salt=p) for p in range(world)]
            outs = [torch.full((5,), 9, dtype=dtype) for p in range(world)]
            dist.all_to_all(outs, ins, group=g)
            return outs

    @add("send-recv-tags")
    def _(g):
        # Pairs (0,1), (2,3): the lower rank sends first, then receives.
        peer = rank ^ 1
        if peer >= world:
            return []
        res = []
        for tag, n in ((0, 7), (5, 1000)):
            mine = values(rank, n, torch.float32, salt=tag)
            got = torch.zeros(n)
            if rank < peer:
                dist.send(mine, dst=peer, group=g, tag=tag)
                dist.recv(got, src=peer, group=g, tag=tag)
            else:
                dist.recv(got, src=peer, group=g, tag=tag)
                dist.send(mine, dst=peer, group=g, tag=tag)
            res.append(got)
        got = torch.zeros(3, dtype=torch.int64)
        works = [dist.isend(values(rank, 3, torch.int64), dst=peer, group=g), dist.irecv(got, src=peer, group=g)]
        for w in works:
            w.wait()
        res.append(got)
        return res

    @add("batch_isend_irecv-ring")
    def _(g):
        # Larger than any socket buffer: every rank sends before anyone receives.
        n = 1 << 20
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        send = values(rank, n, torch.float32)
        recv = torch.zeros(n)
        ops = [dist.P2POp(dist.isend, send, nxt, group=g), dist.P2POp(dist.irecv, recv, prv, group=g)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        back = torch.zeros(n)
        ops = [dist.P2POp(dist.irecv, back, nxt, group=g, tag=1), dist.P2POp(dist.isend, recv, prv, group=g, tag=1)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        return [recv, back]

    @add("all_reduce_coalesced")
    def _(g):
        ts = [values(rank, n, torch.float32, salt=n) for n in (5, 1, 77)]
        dist.all_reduce_coalesced(ts, group=g)
        return ts

    @add("functional-collectives")
    def _(g):
        import torch.distributed._functional_collectives as fc

        res = []
        res.append(fc.all_reduce(values(rank, N, torch.float32), "sum", g))
        res.append(fc.all_gather_tensor(values(rank, 12, torch.float32).reshape(3, 4), 0, g))
        res.append(fc.reduce_scatter_tensor(values(rank, world * 8, torch.float32), "sum", 0, g))
        res.extend(
            fc.all_gather_into_tensor_coalesced([values(rank, 6, torch.float32), values(rank, 10, torch.float32, salt=2)], g)
        )
        res.extend(
            fc.reduce_scatter_tensor_coalesced(
                [values(rank, world * 3, torch.float32), values(rank, world * 5, torch.float32, salt=3)],
                "sum",
                [0, 0],
                g,
            )
        )
        ins = [(rank + p) % 3 for p in range(world)]
        outs = [(p + rank) % 3 for p in range(world)]
        res.append(fc.all_to_all_single(values(rank, sum(ins), torch.float32), outs, ins, g))
        return [torch.as_tensor(r) for r in res]

    @add("object-collectives")
    def _(g):
        gathered = [None] * world if rank == 0 else None
        dist.gather_object({"from": rank, "x": "y" * rank}, gathered, dst=0, group=g)
        got = [None]
        objects = [{"to": p, "n": p * 3} for p in range(world)] if rank == world - 1 else [None] * world
        dist.scatter_object_list(got, objects, src=world - 1, group=g)
        encoded = repr((gathered, got)).encode()
        return [torch.tensor(list(encoded), dtype=torch.uint8)]

    @add("dtensor")
    def _(g):
        from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor

        mesh = DeviceMesh.from_group(g, "cpu")
        full = torch.arange(world * 4 * 3, dtype=torch.float32).reshape(world * 4, 3)
        d = distribute_tensor(full, mesh, [Shard(0)])
        back = d.full_tensor()
        d2 = distribute_tensor(full * 2, mesh, [Replicate()]).redistribute(mesh, [Shard(1)])
        local = (d + d).to_local()
        return [back, d2.full_tensor(), local]

    @add("fsdp2-full-state-dict")
    def _(g):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DeviceMesh

        mesh = DeviceMesh.from_group(g, "cpu")
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(3):
            x = torch.randn(8, 16, generator=gen)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        return [sd[k] for k in sorted(sd)]

    return out


def case_names(world):
    return [name for name, _ in cases(0, world)]


def compare_with_gloo(rank, world, port, shm):
    """Run every case through mapreduce and gloo; {case: None or error}, plus the path."""
    if not shm:
        os.environ["MR_SHM_DISABLE"] = "1"
    init(rank, world, port, backend="gloo")
    mr = dist.new_group(backend="mapreduce")
    gloo = dist.new_group(backend="gloo")
    errors = {}
    for name, fn in cases(rank, world):
        try:
            got = fn(mr)
            want = fn(gloo)
            if len(got) != len(want):
                raise AssertionError(f"{len(got)} results, gloo gave {len(want)}")
            for k, (a, b) in enumerate(zip(got, want)):
                if name.startswith("fsdp2") and world > 2:
                    # Training sums gradients of more than two ranks, whose float order
                    # differs between the backends' reduce-scatters: equal up to rounding.
                    if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
                        raise AssertionError(f"result {k}: max difference {(a - b).abs().max().item()}")
                else:
                    check_equal(a, b, f"result {k}")
            errors[name] = None
        except Exception as e:  # noqa: BLE001 - reported per case
            errors[name] = f"{type(e).__name__}: {e}"
    dist.barrier()
    dist.destroy_process_group()
    return errors


def monitored_barrier_names_missing(rank, world, port, wait_all):
    """The last rank skips a monitored barrier; rank 0's error must name it."""
    init(rank, world, port)
    dist.monitored_barrier(timeout=timedelta(seconds=20))  # everyone arrives
    message = None
    if rank != world - 1:
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=2), wait_all_ranks=wait_all)
        except Exception as e:  # noqa: BLE001 - the point of the test
            message = str(e)
    else:
        time.sleep(3)
    # The communicator itself was never involved: it still works.
    t = torch.ones(4)
    dist.all_reduce(t)
    check_equal(t, torch.full((4,), float(world)), "all_reduce after a failed monitored barrier")
    dist.destroy_process_group()
    return message

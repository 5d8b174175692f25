"""What the spawned ranks of the tests run. Imported by the child processes, so keep it free of
pytest; every function here takes (rank, world, ...) and returns a picklable value."""

import hashlib
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import mapreduce_torch  # noqa: F401 - registers the backend

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
]
OPS = ["SUM", "AVG", "MAX", "MIN", "PRODUCT"]
# Not a multiple of 2 or 4 ranks, so segments and shards are uneven.
N = 1031


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def init(rank, world, port, method="tcp", backend="mapreduce", timeout_s=60):
    if method == "env":
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        init_method = "env://"
    else:
        init_method = f"tcp://127.0.0.1:{port}"
    dist.init_process_group(
        backend, rank=rank, world_size=world, init_method=init_method, timeout=timedelta(seconds=timeout_s)
    )


# -- closed-form inputs and expectations ------------------------------------------------------


def values(rank, n, dtype, op="SUM", salt=0):
    """Rank ``rank``'s input: small integers, exact in every dtype, whose reductions over up to
    4 ranks stay exact (no overflow in int8, no rounding in float16/bfloat16)."""
    i = torch.arange(n, dtype=torch.int64)
    if op == "PRODUCT":
        if dtype == torch.uint8:
            v = 1 + (i + rank + salt) % 2
        else:
            v = torch.tensor([1, 2, -1])[(i + rank + salt) % 3]
    else:
        v = (i * 7 + rank * 3 + salt * 5) % 11
        if dtype != torch.uint8:
            v = v - 5
    return v.to(dtype)


def expected(n, dtype, op, world, salt=0):
    stack = torch.stack([values(r, n, dtype, op, salt).to(torch.float64) for r in range(world)])
    if op == "SUM":
        out = stack.sum(0)
    elif op == "AVG":
        out = stack.sum(0) / world
        if not dtype.is_floating_point:
            out = torch.trunc(out)  # integer AVG truncates toward zero
    elif op == "MAX":
        out = stack.amax(0)
    elif op == "MIN":
        out = stack.amin(0)
    else:
        out = stack.prod(0)
    return out.to(dtype)


def check_equal(actual, want, what):
    if actual.dtype != want.dtype or actual.shape != want.shape or not torch.equal(actual, want):
        bad = (actual != want).nonzero()
        first = bad[0].tolist() if len(bad) else None
        raise AssertionError(
            f"{what}: {len(bad)} elements differ (first at {first}); got {actual.flatten()[:8].tolist()}, "
            f"want {want.flatten()[:8].tolist()}"
        )


def check_raises(fn, *needles):
    try:
        fn()
    except RuntimeError as e:
        text = str(e)
        missing = [n for n in needles if n not in text]
        if missing:
            raise AssertionError(f"error message lacks {missing}: {text}") from e
        return
    raise AssertionError(f"expected a RuntimeError mentioning {needles}")


# -- the collective matrix ---------------------------------------------------------------------


def matrix_cases(world):
    """(name, fn(rank)) pairs; every rank runs them in this order."""
    cases = []

    def add(name):
        def register(fn):
            cases.append((name, fn))
            return fn

        return register

    for dtype in DTYPES:
        dn = dtype_name(dtype)
        for op in OPS:

            @add(f"allreduce-{dn}-{op}")
            def _(rank, dtype=dtype, op=op):
                t = values(rank, N, dtype, op)
                dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
                check_equal(t, expected(N, dtype, op, world), "all_reduce")

            @add(f"reduce_scatter-{dn}-{op}")
            def _(rank, dtype=dtype, op=op):
                inputs = [values(rank, N, dtype, op, salt=j) for j in range(world)]
                out = torch.full((N,), 9, dtype=dtype)
                dist.reduce_scatter(out, inputs, op=getattr(dist.ReduceOp, op))
                check_equal(out, expected(N, dtype, op, world, salt=rank), "reduce_scatter")

            @add(f"reduce_scatter_tensor-{dn}-{op}")
            def _(rank, dtype=dtype, op=op):
                inp = torch.cat([values(rank, N, dtype, op, salt=j) for j in range(world)])
                out = torch.full((N,), 9, dtype=dtype)
                dist.reduce_scatter_tensor(out, inp, op=getattr(dist.ReduceOp, op))
                check_equal(out, expected(N, dtype, op, world, salt=rank), "reduce_scatter_tensor")

        @add(f"allreduce-noncontiguous-{dn}")
        def _(rank, dtype=dtype):
            base = values(rank, 31 * 37, dtype).reshape(31, 37)
            view = base.t()  # non-contiguous view: results must land in `base`
            dist.all_reduce(view)
            check_equal(base, expected(31 * 37, dtype, "SUM", world).reshape(31, 37), "all_reduce into a view")

        @add(f"broadcast-{dn}")
        def _(rank, dtype=dtype):
            root = world - 1
            t = values(root, N, dtype) if rank == root else torch.full((N,), 3, dtype=dtype)
            dist.broadcast(t, src=root)
            check_equal(t, values(root, N, dtype), "broadcast")

        @add(f"allgather-{dn}")
        def _(rank, dtype=dtype):
            outs = [torch.full((N,), 9, dtype=dtype) for _ in range(world)]
            dist.all_gather(outs, values(rank, N, dtype))
            for r in range(world):
                check_equal(outs[r], values(r, N, dtype), f"all_gather slot {r}")

        @add(f"all_gather_into_tensor-{dn}")
        def _(rank, dtype=dtype):
            out = torch.full((world * N,), 9, dtype=dtype)
            dist.all_gather_into_tensor(out, values(rank, N, dtype))
            for r in range(world):
                check_equal(out[r * N : (r + 1) * N], values(r, N, dtype), f"all_gather_into_tensor slot {r}")

    @add("broadcast-every-root")
    def _(rank):
        for root in range(world):
            t = values(root, N, torch.float32, salt=root) if rank == root else torch.zeros(N)
            dist.broadcast(t, src=root)
            check_equal(t, values(root, N, torch.float32, salt=root), f"broadcast from {root}")

    @add("broadcast-strided")
    def _(rank):
        buf = torch.full((2 * N,), 77.0)
        view = buf[::2]
        if rank == 0:
            view.copy_(values(0, N, torch.float32))
        dist.broadcast(view, src=0)
        check_equal(view, values(0, N, torch.float32), "strided broadcast")
        check_equal(buf[1::2], torch.full((N,), 77.0), "elements between the strided view")

    @add("allreduce-sizes")
    def _(rank):
        for n in [0, 1, world - 1, world + 1, (1 << 20) + 3]:
            t = values(rank, n, torch.float32)
            dist.all_reduce(t)
            check_equal(t, expected(n, torch.float32, "SUM", world), f"all_reduce of {n} elements")

    @add("allgather-noncontiguous")
    def _(rank):
        outs = [torch.full((37, 31), 9.0).t() for _ in range(world)]
        dist.all_gather(outs, values(rank, 31 * 37, torch.float32).reshape(31, 37))
        for r in range(world):
            check_equal(outs[r], values(r, 31 * 37, torch.float32).reshape(31, 37), f"slot {r}")

    @add("all_gather_into_tensor-noncontiguous")
    def _(rank):
        storage = torch.full((N, world), 9.0)
        out = storage.t()  # (world, N), non-contiguous
        dist.all_gather_into_tensor(out, values(rank, N, torch.float32))
        for r in range(world):
            check_equal(out[r], values(r, N, torch.float32), f"slot {r}")

    @add("all_gather_into_tensor-in-place")
    def _(rank):
        out = torch.full((world * N,), 9.0)
        mine = out[rank * N : (rank + 1) * N]
        mine.copy_(values(rank, N, torch.float32))
        dist.all_gather_into_tensor(out, mine)
        for r in range(world):
            check_equal(out[r * N : (r + 1) * N], values(r, N, torch.float32), f"slot {r}")

    @add("reduce_scatter-noncontiguous")
    def _(rank):
        inputs = [values(rank, 31 * 37, torch.float32, salt=j).reshape(37, 31).t() for j in range(world)]
        out = torch.full((37, 31), 9.0).t()
        dist.reduce_scatter(out, inputs)
        want = expected(31 * 37, torch.float32, "SUM", world, salt=rank).reshape(37, 31).t()
        check_equal(out, want, "reduce_scatter into a view")

    @add("reduce_scatter_tensor-noncontiguous-output")
    def _(rank):
        inp = torch.cat([values(rank, N, torch.float32, salt=j) for j in range(world)])
        storage = torch.full((2 * N,), 9.0)
        out = storage[::2]
        dist.reduce_scatter_tensor(out, inp)
        check_equal(out, expected(N, torch.float32, "SUM", world, salt=rank), "strided output")
        check_equal(storage[1::2], torch.full((N,), 9.0), "elements between the strided output")

    @add("barrier")
    def _(rank):
        for _ in range(3):
            dist.barrier()

    @add("async-futures")
    def _(rank):
        sizes = [1000 + k for k in range(6)]
        tensors = [values(rank, n, torch.float32) for n in sizes]
        works = [dist.all_reduce(t, async_op=True) for t in tensors]
        doubled = [w.get_future().then(lambda f: f.value()[0] * 2) for w in works]
        for k in reversed(range(len(works))):
            works[k].wait()
            if not works[k].is_completed() or works[k].exception() is not None:
                raise AssertionError(f"work {k} not complete and successful after wait()")
            check_equal(tensors[k], expected(sizes[k], torch.float32, "SUM", world), f"async all_reduce {k}")
        for k, fut in enumerate(doubled):
            check_equal(fut.wait(), expected(sizes[k], torch.float32, "SUM", world) * 2, f"future chain {k}")

        out = torch.zeros(world * N)
        work = dist.all_gather_into_tensor(out, values(rank, N, torch.float32), async_op=True)
        (value,) = work.get_future().wait()
        if value.data_ptr() != out.data_ptr():
            raise AssertionError("the future's value is not the output tensor")
        check_equal(out.view(world, N)[world - 1], values(world - 1, N, torch.float32), "async all_gather")

        work = dist.barrier(async_op=True)
        work.wait()
        if work.get_future().value() != []:
            raise AssertionError("a barrier's future should hold an empty list")

    @add("rejects-unsupported")
    def _(rank):
        check_raises(lambda: dist.all_reduce(torch.zeros(4, dtype=torch.bool)), "allreduce", "torch.bool")
        check_raises(lambda: dist.broadcast(torch.zeros(4, dtype=torch.int16), src=0), "broadcast", "torch.int16")
        check_raises(
            lambda: dist.all_gather_into_tensor(torch.zeros(4 * world, dtype=torch.int16), torch.zeros(4, dtype=torch.int16)),
            "all_gather_into_tensor",
            "torch.int16",
        )
        check_raises(lambda: dist.all_reduce(torch.zeros(4), op=dist.ReduceOp.BAND), "allreduce", "BAND", "torch.float32")
        check_raises(
            lambda: dist.reduce_scatter_tensor(torch.zeros(4), torch.zeros(4 * world), op=dist.ReduceOp.BXOR),
            "reduce_scatter_tensor",
            "BXOR",
        )
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))
        check_raises(lambda: backend.allreduce([torch.zeros(4, device="meta")]), "allreduce", "torch.float32", "CPU")
        # Per-rank tensor lists: one list, one tensor per rank, one dtype, equal sizes.
        check_raises(
            lambda: backend.allgather([[torch.zeros(4)] * (world + 1)], [torch.zeros(4)]),
            "allgather",
            f"expected {world} output tensors (one per rank), got {world + 1}",
        )
        check_raises(
            lambda: backend.allgather([[torch.zeros(5)] * world], [torch.zeros(4)]),
            "allgather",
            "every output tensor must have as many elements as the input (4), got 5",
        )
        check_raises(
            lambda: backend.reduce_scatter([torch.zeros(4)], [[torch.zeros(4, dtype=torch.float64)] * world]),
            "reduce_scatter",
            "one dtype",
        )
        check_raises(
            lambda: backend.reduce_scatter([torch.zeros(4)], [[torch.zeros(4)] * world] * 2),
            "reduce_scatter",
            "expected one list of input tensors, got 2",
        )
        # Rejected calls never reach the library: the communicator is still in step.
        t = values(rank, N, torch.float32)
        dist.all_reduce(t)
        check_equal(t, expected(N, torch.float32, "SUM", world), "all_reduce after rejected calls")

    @add("object-collectives")
    def _(rank):
        # Built by torch from uint8/int64 all_gather and broadcast.
        gathered = [None] * world
        dist.all_gather_object(gathered, {"rank": rank, "payload": "x" * (rank * 100)})
        if gathered != [{"rank": r, "payload": "x" * (r * 100)} for r in range(world)]:
            raise AssertionError(f"all_gather_object: {gathered}")
        objects = [("from", rank)]
        dist.broadcast_object_list(objects, src=world - 1)
        if objects != [("from", world - 1)]:
            raise AssertionError(f"broadcast_object_list: {objects}")

    @add("subgroup")
    def _(rank):
        members = [0, world - 1]
        group = dist.new_group(members, backend="mapreduce")
        if rank in members:
            t = values(rank, N, torch.float32)
            dist.all_reduce(t, group=group)
            want = (values(0, N, torch.float32).double() + values(world - 1, N, torch.float32).double()).float()
            check_equal(t, want, "all_reduce in a subgroup")
        dist.barrier()
        dist.destroy_process_group(group)

    return cases


def matrix_case_names(world):
    return [name for name, _ in matrix_cases(world)]


def digest(t):
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def run_matrix(rank, world, port, method):
    """Run every case; return {"cases": {name: None or error}, "digests": {...}}."""
    init(rank, world, port, method=method)
    errors = {}
    for name, fn in matrix_cases(world):
        try:
            fn(rank)
            errors[name] = None
        except Exception as e:  # noqa: BLE001 - reported per case
            errors[name] = f"{type(e).__name__}: {e}"

    # Random data: every rank must end with the same bits.
    digests = {}
    for dtype in [torch.float32, torch.float64, torch.float16, torch.bfloat16]:
        for op in ["SUM", "AVG"]:
            gen = torch.Generator().manual_seed(1000 + rank)
            t = torch.randn(100_003, generator=gen).to(dtype)
            dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
            every = torch.stack([torch.randn(100_003, generator=torch.Generator().manual_seed(1000 + r)).to(dtype).double() for r in range(world)])
            want = every.sum(0) / (world if op == "AVG" else 1)
            tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
            if not torch.allclose(t.double(), want, rtol=tol, atol=tol * 4):
                errors[f"random-{dtype_name(dtype)}-{op}"] = "result is not the sum of the inputs"
            digests[f"{dtype_name(dtype)}-{op}"] = digest(t)
    gen = torch.Generator().manual_seed(7 + rank)
    t = torch.randn(50_001, generator=gen)
    dist.broadcast(t, src=1 % world)
    digests["broadcast"] = digest(t)

    dist.destroy_process_group()
    return {"cases": errors, "digests": digests}


# -- DDP ---------------------------------------------------------------------------------------


def _train(model, group, steps, rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Small buckets: several all-reduces per step, overlapping with backward.
    ddp = DDP(model, process_group=group, bucket_cap_mb=0.01)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(99)
    for _ in range(steps):
        x = torch.randn(world, 16, 32, generator=gen)[rank]
        y = torch.randn(world, 16, 4, generator=gen)[rank]
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)
    )


def ddp_compare(rank, world, port, steps):
    """Train one MLP over mapreduce and one over gloo from the same seed and data."""
    init(rank, world, port, backend="gloo")
    mapreduce_group = dist.new_group(backend="mapreduce")
    # Different seeds per rank: DDP's initial broadcast must make the replicas equal.
    mr_params = _train(_mlp(seed=rank), mapreduce_group, steps, rank, world)
    gloo_params = _train(_mlp(seed=rank), None, steps, rank, world)
    max_diff = max((a - b).abs().max().item() for a, b in zip(mr_params, gloo_params))
    flat = torch.cat([p.flatten() for p in mr_params])
    dist.destroy_process_group()
    return {"max_diff_vs_gloo": max_diff, "digest": digest(flat), "numel": flat.numel()}


# -- init methods --------------------------------------------------------------------------------


def init_and_allreduce(rank, world, port, method):
    init(rank, world, port, method=method)
    t = values(rank, N, torch.int64)
    dist.all_reduce(t)
    check_equal(t, expected(N, torch.int64, "SUM", world), f"all_reduce after {method} init")
    dist.destroy_process_group()
    # A second group in the same process, on a fresh rendezvous.
    return True


# -- failures ----------------------------------------------------------------------------------


def dies_during_allreduce(rank, world, port, victim, algo):
    """``victim`` exits in the middle of a large all-reduce (over TCP with ``algo="ring"``,
    through shared memory with ``"auto"``); the others must raise."""
    os.environ["MR_ALGO"] = algo
    init(rank, world, port, timeout_s=15)
    t = torch.ones(N)
    dist.all_reduce(t)  # everyone is connected and in step
    big = torch.ones(64 << 20)  # 256 MiB: the op is still running when the victim dies
    if rank == victim:
        dist.all_reduce(big, async_op=True)
        time.sleep(0.005)
        os._exit(17)
    try:
        dist.all_reduce(big)
    except Exception as e:  # noqa: BLE001 - the point of the test
        message = f"{type(e).__name__}: {e}"
    else:
        return {"raised": False}
    # The communicator is broken: later ops fail at once instead of hanging.
    try:
        dist.all_reduce(torch.ones(4))
        later = None
    except Exception as e:  # noqa: BLE001
        later = str(e)
    return {"raised": True, "message": message, "later": later}


def absent_peer_times_out(rank, world, port, wait_timeout_ms):
    """Rank 1 never joins an all-reduce. With ``wait_timeout_ms`` rank 0 uses Work.wait(timeout);
    without, the process-group timeout (3 s, turned into MR_TIMEOUT_MS) must end the op."""
    os.environ.pop("MR_TIMEOUT_MS", None)
    init(rank, world, port, timeout_s=3)
    store = dist.distributed_c10d._get_default_store()
    if rank == 1:
        # Stay connected, silent, until rank 0 has seen its error.
        store.wait(["absent-peer-done"], timedelta(seconds=60))
        store.set("absent-peer-ack", "1")
        return None
    t = torch.ones(N)
    try:
        if wait_timeout_ms is None:
            dist.all_reduce(t)
        else:
            dist.all_reduce(t, async_op=True).wait(timedelta(milliseconds=wait_timeout_ms))
        message = None
    except Exception as e:  # noqa: BLE001 - the point of the test
        message = f"{type(e).__name__}: {e}"
    store.set("absent-peer-done", "1")
    # Rank 0 hosts the store: stay until rank 1 has seen the key.
    store.wait(["absent-peer-ack"], timedelta(seconds=60))
    return message


# -- world size 1 and relay mode -------------------------------------------------------------


def single_rank(rank, world, port):
    """A job of one rank: every collective is a copy (AVG divides by one)."""
    init(rank, world, port)
    t = values(0, N, torch.int32)
    for op in OPS:
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    dist.broadcast(t, src=0)
    check_equal(t, values(0, N, torch.int32), "collectives on one rank")
    out = torch.zeros(N, dtype=torch.int32)
    dist.all_gather_into_tensor(out, t)
    check_equal(out, t, "all_gather on one rank")
    dist.reduce_scatter_tensor(out, t)
    check_equal(out, t, "reduce_scatter on one rank")
    dist.barrier()
    dist.destroy_process_group()
    return True


def relay_collectives(rank, world, port, relays, token):
    """Collectives through relays: MR_RELAYS/MR_TOKEN/MR_ALGO reach the communicator."""
    os.environ.update({"MR_RELAYS": relays, "MR_TOKEN": token, "MR_ALGO": "relay"})
    init(rank, world, port)
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        for op in ("SUM", "AVG", "MAX"):
            t = values(rank, 100_003, dtype, op)
            dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
            check_equal(t, expected(100_003, dtype, op, world), f"relay all_reduce {dtype} {op}")
    t = values(world - 1, 100_003, torch.float32) if rank == world - 1 else torch.zeros(100_003)
    dist.broadcast(t, src=world - 1)
    check_equal(t, values(world - 1, 100_003, torch.float32), "relay broadcast")
    out = torch.zeros(world * N)
    dist.all_gather_into_tensor(out, values(rank, N, torch.float32))
    for r in range(world):
        check_equal(out[r * N : (r + 1) * N], values(r, N, torch.float32), f"relay all_gather slot {r}")
    dist.destroy_process_group()
    return True


def rank0_cannot_create_id(rank, world, port):
    """Rank 0's configuration is invalid: every rank must fail with its message, not time out."""
    if rank == 0:
        os.environ["MR_ALGO"] = "sideways"
    # A store that outlives the failed init_process_group, so rank 0 can stay until rank 1 has
    # read its error.
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=60))
    try:
        dist.init_process_group("mapreduce", store=store, rank=rank, world_size=world)
        message = None
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - the point of the test
        message = f"{type(e).__name__}: {e}"
    store.add("finished", 1)
    if rank == 0:
        # The store's host leaves last; the others are done with it once their add returned.
        deadline = time.monotonic() + 60
        while store.add("finished", 0) < world and time.monotonic() < deadline:
            time.sleep(0.05)
    return message


# -- future callbacks ----------------------------------------------------------------------------


def nested_collective_in_callback(rank, world, port):
    """A ``.then()`` callback of a pending all-reduce runs another all-reduce and waits for it
    (what DDP's PowerSGD hook does). The outer op is still pending when the callback is added:
    rank 0 joins it late."""
    init(rank, world, port, timeout_s=30)
    if rank == 0:
        time.sleep(0.5)
    outer = values(rank, N, torch.float32)
    work = dist.all_reduce(outer, async_op=True)

    def callback(fut):
        inner = values(rank, N, torch.float32, salt=1)
        dist.all_reduce(inner, async_op=True).get_future().wait()
        return fut.value()[0] + inner

    chained = work.get_future().then(callback)
    got = chained.wait()
    want = expected(N, torch.float32, "SUM", world) + expected(N, torch.float32, "SUM", world, salt=1)
    check_equal(got, want, "callback result")
    # Deeper: a callback chain three levels down, each issuing and waiting on a collective.
    t = torch.ones(N)

    def level(depth):
        def cb(fut):
            if depth == 0:
                return fut.value()[0]
            u = torch.ones(N)
            return dist.all_reduce(u, async_op=True).get_future().then(level(depth - 1)).wait()

        return cb

    out = dist.all_reduce(t, async_op=True).get_future().then(level(3)).wait()
    check_equal(out, torch.full((N,), float(world)), "nested chain")
    dist.destroy_process_group()
    return True


def _train_powersgd(model, group, steps, rank, world, bucket_cap_mb, synchronous=False, buckets=None):
    """DDP with PowerSGD. ``synchronous``: each bucket's hook waits for its own result before
    backward goes on (same arithmetic, but every rank issues the all-reduces in one order whatever
    the backend does with callbacks). ``buckets``: a set that collects the bucket indices seen."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powerSGD
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, process_group=group, bucket_cap_mb=bucket_cap_mb)
    state = powerSGD.PowerSGDState(
        process_group=group,
        matrix_approximation_rank=2,
        start_powerSGD_iter=2,
        min_compression_rate=0.5,
    )

    def hook(state, bucket):
        if buckets is not None:
            buckets.add(bucket.index())
        fut = powerSGD.powerSGD_hook(state, bucket)
        if synchronous:
            fut.wait()
        return fut

    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(99)
    for _ in range(steps):
        x = torch.randn(world, 16, 32, generator=gen)[rank]
        y = torch.randn(world, 16, 4, generator=gen)[rank]
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], ddp


def powersgd_compare(rank, world, port, steps, bucket_cap_mb):
    """DDP with the PowerSGD hook over mapreduce and over gloo, same seeds and data."""
    init(rank, world, port, backend="gloo", timeout_s=60)
    mapreduce_group = dist.new_group(backend="mapreduce", timeout=timedelta(seconds=60))
    mr_params, ddp = _train_powersgd(_mlp(seed=rank), mapreduce_group, steps, rank, world, bucket_cap_mb)
    backend_name = ddp._get_ddp_logging_data().get("backend_name")
    gloo_params, _ = _train_powersgd(_mlp(seed=rank), None, steps, rank, world, bucket_cap_mb)
    max_diff = max((a - b).abs().max().item() for a, b in zip(mr_params, gloo_params))
    flat = torch.cat([p.flatten() for p in mr_params])
    dist.destroy_process_group()
    return {"max_diff_vs_gloo": max_diff, "digest": digest(flat), "backend_name": backend_name}


def _deep_mlp(seed, layers):
    torch.manual_seed(seed)
    mods = [torch.nn.Linear(32, 64), torch.nn.ReLU()]
    for _ in range(layers):
        mods += [torch.nn.Linear(64, 64), torch.nn.ReLU()]
    mods.append(torch.nn.Linear(64, 4))
    return torch.nn.Sequential(*mods)


def powersgd_buckets_compare(rank, world, port, steps, bucket_cap_mb, layers):
    """DDP with the PowerSGD hook and several buckets over mapreduce, against gloo.

    Under mapreduce the stock (asynchronous) hook runs: bucket b's callbacks issue its P and Q
    all-reduces while backward issues the next buckets' all-reduces. gloo cannot run that (its
    callbacks run inline or on its worker threads as timing has it, so ranks issue the
    all-reduces in different orders and gloo times out; see the README), so its reference run
    waits for each bucket's hook: the same arithmetic in a fixed order."""
    init(rank, world, port, backend="gloo", timeout_s=60)
    mapreduce_group = dist.new_group(backend="mapreduce", timeout=timedelta(seconds=60))
    seen = set()
    mr_params, _ = _train_powersgd(
        _deep_mlp(rank, layers), mapreduce_group, steps, rank, world, bucket_cap_mb, buckets=seen
    )
    gloo_params, _ = _train_powersgd(
        _deep_mlp(rank, layers), None, steps, rank, world, bucket_cap_mb, synchronous=True
    )
    max_diff = max((a - b).abs().max().item() for a, b in zip(mr_params, gloo_params))
    flat = torch.cat([p.flatten() for p in mr_params])
    dist.destroy_process_group()
    return {"max_diff_vs_gloo": max_diff, "digest": digest(flat), "buckets": len(seen)}


def callback_waits_for_a_later_op(rank, world, port, timeout_s):
    """A callback of op A waits for op B, which the same thread issued after A: B starts only
    once A's callbacks ran, so they wait on each other. Rank 1 starts late, so A is still
    pending on rank 0 when the callback is added. The wait must end within the timeout (plus
    grace) with an error naming what B waited behind, not hang."""
    init(rank, world, port, timeout_s=timeout_s)
    if rank == 1:
        time.sleep(1.0)
    a = torch.ones(N)
    b = torch.ones(N)
    fa = dist.all_reduce(a, async_op=True).get_future()
    wb = dist.all_reduce(b, async_op=True)

    def callback(fut):
        wb.wait()
        return fut.value()[0]

    started = time.monotonic()
    chained = fa.then(callback)
    try:
        chained.wait()
        message = None
    except RuntimeError as e:
        message = str(e)
    elapsed = time.monotonic() - started
    dist.destroy_process_group()
    return {"message": message, "elapsed": elapsed}

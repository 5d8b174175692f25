"""Multi-process test harness: spawn N ranks, collect what each returns, never hang."""

import multiprocessing
import os
import queue
import socket
import sys
import time
import traceback

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
EXTENSION = os.path.dirname(HERE)

# Generous bound for one multi-process job on a loaded 2-core machine; only hit on a hang.
JOB_TIMEOUT_S = 120


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world, args, results):
    code = 0
    try:
        value = fn(rank, world, *args)
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        results.put((rank, False, traceback.format_exc()))
        code = 1
    # Flush the report, then leave without interpreter teardown: a rank's clean shutdown is
    # checked inside ``fn`` (destroy_process_group), not by process exit.
    results.close()
    results.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class RankFailure(AssertionError):
    pass


def run_ranks(fn, world, *args, timeout=JOB_TIMEOUT_S, allow_missing=()):
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes; return their values by rank.

    Ranks listed in ``allow_missing`` may die without reporting (failure tests); their entry is
    None. Any other rank that raises, dies or outlives ``timeout`` fails the test, and every
    process still alive is killed.
    """
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, args, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    values = {}
    errors = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) + len(errors) < world:
            expected = set(range(world)) - set(values) - set(errors)
            if expected <= set(allow_missing) and all(not procs[r].is_alive() for r in expected):
                break
            try:
                rank, ok, value = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r in expected if not procs[r].is_alive() and r not in allow_missing]
                if dead:
                    # Give a just-exited rank's message time to arrive before calling it dead.
                    try:
                        rank, ok, value = results.get(timeout=2)
                    except queue.Empty:
                        codes = {r: procs[r].exitcode for r in dead}
                        raise RankFailure(f"ranks died without reporting: exit codes {codes}")
                elif time.monotonic() > deadline:
                    raise RankFailure(f"ranks {sorted(expected)} did not finish within {timeout} s")
                else:
                    continue
            (values if ok else errors)[rank] = value
    finally:
        for p in procs:
            p.join(timeout=max(0.1, min(10.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise RankFailure(f"{len(errors)} rank(s) failed:\n{report}")
    return [values.get(r) for r in range(world)]


@pytest.fixture
def port():
    return free_port()

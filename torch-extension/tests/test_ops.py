"""Rooted collectives, all-to-all, coalesced and functional collectives, object collectives,
DTensor and FSDP2 over mapreduce, each equal to gloo's result on the same inputs; 2 and 4
ranks, over TCP and over shared memory. And monitored_barrier naming the missing rank."""

import pytest

import ops_workers
from conftest import free_port, run_ranks

_jobs = {}


def job(world, shm):
    key = (world, shm)
    if key not in _jobs:
        try:
            _jobs[key] = run_ranks(ops_workers.compare_with_gloo, world, free_port(), shm, timeout=300)
        except AssertionError as e:
            _jobs[key] = e
    if isinstance(_jobs[key], AssertionError):
        raise _jobs[key]
    return _jobs[key]


@pytest.mark.parametrize("shm", [False, True], ids=["tcp", "shm"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", ops_workers.case_names(4))
def test_matches_gloo(world, shm, case):
    if case not in ops_workers.case_names(world):
        pytest.skip(f"{case} needs 4 ranks")
    results = job(world, shm)
    failing = {rank: r.get(case, "case did not run") for rank, r in enumerate(results)}
    failing = {rank: err for rank, err in failing.items() if err}
    assert not failing, "\n".join(f"rank {rank}: {err}" for rank, err in failing.items())


@pytest.mark.parametrize("wait_all", [False, True])
def test_monitored_barrier_names_the_missing_rank(wait_all):
    results = run_ranks(ops_workers.monitored_barrier_names_missing, 3, free_port(), wait_all)
    assert results[2] is None
    assert results[0] is not None and "rank 2 did not arrive within 2000 ms" in results[0], results[0]
    # Rank 1 waited for a release that never came.
    assert results[1] is not None and "not released by rank 0" in results[1], results[1]

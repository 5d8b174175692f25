"""Every collective x dtype x op on 2 and 4 ranks against closed-form expectations.

Each world size runs as one multi-process job (spawning ranks costs more than all the ops
together); every case is reported as its own test."""

import pytest

import dist_workers
from conftest import free_port, run_ranks

WORLDS = [2, 4]
# World 2 rendezvouses with init_method="env://", world 4 with "tcp://...".
INIT_METHOD = {2: "env", 4: "tcp"}
_jobs = {}


def matrix(world):
    if world not in _jobs:
        try:
            _jobs[world] = run_ranks(dist_workers.run_matrix, world, free_port(), INIT_METHOD[world])
        except AssertionError as e:
            _jobs[world] = e
    if isinstance(_jobs[world], AssertionError):
        raise _jobs[world]
    return _jobs[world]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", dist_workers.matrix_case_names(2))
def test_collective(world, case):
    results = matrix(world)
    failing = {rank: r["cases"].get(case, "case did not run") for rank, r in enumerate(results)}
    failing = {rank: err for rank, err in failing.items() if err}
    assert not failing, "\n".join(f"rank {rank}: {err}" for rank, err in failing.items())


@pytest.mark.parametrize("world", WORLDS)
def test_random_data_bitwise_identical_across_ranks(world):
    results = matrix(world)
    wrong = {k: v for r in results for k, v in r["cases"].items() if k.startswith("random-") and v}
    assert not wrong
    first = results[0]["digests"]
    assert len(first) == 9
    for rank, r in enumerate(results[1:], start=1):
        assert r["digests"] == first, f"rank {rank} differs from rank 0"

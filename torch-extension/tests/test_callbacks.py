"""Future callbacks may issue collectives and wait for them: no deadlock, and PowerSGD works."""

import dist_workers
from conftest import free_port, run_ranks

# A deadlock shows up as a timeout of the whole job; keep it well under the default.
HANG_S = 90


def test_nested_collective_in_callback():
    assert run_ranks(dist_workers.nested_collective_in_callback, 2, free_port(), timeout=HANG_S) == [True, True]


def test_powersgd_ddp_matches_gloo():
    # One bucket. With several, each bucket's callback issues all-reduces while backward still
    # issues the next buckets' ones from another thread; collectives are matched by issue order,
    # so ranks can disagree (gloo shares the race; see the README).
    results = run_ranks(dist_workers.powersgd_compare, 2, free_port(), 8, 25, timeout=HANG_S)
    assert results[0]["digest"] == results[1]["digest"], "replicas diverged under mapreduce"
    for rank, r in enumerate(results):
        assert r["max_diff_vs_gloo"] <= 1e-5, f"rank {rank}: {r['max_diff_vs_gloo']} away from gloo"


def test_ddp_logs_backend_name():
    results = run_ranks(dist_workers.powersgd_compare, 2, free_port(), 1, 25, timeout=HANG_S)
    assert [r["backend_name"] for r in results] == ["mapreduce", "mapreduce"]

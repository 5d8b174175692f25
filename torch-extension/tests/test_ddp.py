"""DistributedDataParallel over the mapreduce backend matches gloo."""

import dist_workers
from conftest import free_port, run_ranks


def test_ddp_matches_gloo():
    results = run_ranks(dist_workers.ddp_compare, 2, free_port(), 20)
    assert results[0]["numel"] > 0
    assert results[0]["digest"] == results[1]["digest"], "replicas diverged under mapreduce"
    for rank, r in enumerate(results):
        assert r["max_diff_vs_gloo"] <= 1e-5, f"rank {rank}: {r['max_diff_vs_gloo']} away from gloo"

"""Compressed gradients through the DDP hook: error feedback keeps int8 training close to
uncompressed training, every rank stays identical, and the hook's encoding estimate is sound."""

import compression_workers
from conftest import free_port, run_ranks


def test_hook_error_feedback_trains_like_uncompressed():
    results = run_ranks(compression_workers.train_formats, 2, free_port(), 60)
    for rank, r in enumerate(results):
        for name, v in r.items():
            assert v["same_on_every_rank"], f"rank {rank}: replicas diverged with {name}"
        base = r["none"]["loss"]
        # bf16 and int8 with error feedback end within 2% of uncompressed training.
        for name in ("bf16", "int8"):
            assert abs(r[name]["loss"] - base) <= 0.02 * base, f"{name}: {r[name]['loss']} vs {base}"
        # Error feedback holds what compression lost; without it nothing is kept.
        assert r["int8"]["residual"] > 0
        assert r["int8-noef"]["residual"] == 0
    assert results[0]["none"]["loss"] == results[1]["none"]["loss"]


def test_quantize_estimate_follows_the_block_rule():
    results = run_ranks(compression_workers.quantize_cases, 1, free_port())
    r = results[0]
    assert r["worst_over_half_step"] <= 1.0001, r
    assert r["nan_block"] and r["others_finite"] and r["constant_exact"] and r["bf16"], r
    assert r["matches_reference"], r

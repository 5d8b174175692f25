"""CUDA tensors: staged through pinned host memory. These tests need a GPU and are skipped, with
the reason, where CUDA is unavailable; bench/gpu_check.py runs the same checks by hand."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mapreduce_torch

ROOT = Path(__file__).resolve().parents[2]


def test_backend_registers_for_cpu_and_cuda():
    devices = dist.Backend.backend_capability[mapreduce_torch.BACKEND_NAME]
    assert set(devices) >= {"cpu", "cuda"}, devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
@pytest.mark.parametrize("ranks", [2])
def test_gpu_check_passes(ranks):
    # Every staged collective on CUDA tensors and DDP on a CUDA model, against gloo.
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--ranks", str(ranks)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout + run.stderr

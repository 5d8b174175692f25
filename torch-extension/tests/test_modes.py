"""A one-rank job, and relay mode selected through MR_* variables."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import dist_workers
from conftest import EXTENSION, free_port, run_ranks

TOKEN = "6d6170726564756365" * 2 + "0011223344556677"


def test_single_rank_job():
    assert run_ranks(dist_workers.single_rank, 1, free_port()) == [True]


def relayd_binary():
    """mr-relayd from MAPREDUCE_RELAYD, the repository's Cargo target folder, or PATH."""
    explicit = os.environ.get("MAPREDUCE_RELAYD")
    if explicit:
        return explicit
    root = Path(os.environ.get("MAPREDUCE_ROOT", Path(EXTENSION).parent))
    target = Path(os.environ.get("CARGO_TARGET_DIR", root / "target"))
    for profile in ("release", "debug"):
        candidate = target / profile / "mr-relayd"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("mr-relayd")


@pytest.fixture
def relays():
    binary = relayd_binary()
    if binary is None:
        pytest.skip("mr-relayd is not built (cargo build --release)")
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    # The job keeps its secret (TOKEN, the ranks' MR_TOKEN); each relay gets only its own token.
    tokens = [
        subprocess.run(
            [binary, "token", "--job-token", TOKEN, "--relay", a], check=True, capture_output=True, text=True
        ).stdout.strip()
        for a in addrs
    ]
    procs = [
        subprocess.Popen([binary, "--listen", a, "--token", t], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for a, t in zip(addrs, tokens)
    ]
    try:
        # Wait until both relays accept connections.
        import socket

        deadline = time.monotonic() + 30
        for a in addrs:
            host, port = a.rsplit(":", 1)
            while True:
                try:
                    socket.create_connection((host, int(port)), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"relay {a} did not start")
                    time.sleep(0.1)
        yield ",".join(addrs)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_relay_mode(relays):
    assert run_ranks(dist_workers.relay_collectives, 3, free_port(), relays, TOKEN) == [True] * 3

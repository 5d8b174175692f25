"""The backend under torchrun, and the subnet's Peer tutorial."""

import os
import subprocess
import sys

from conftest import EXTENSION, HERE

TIMEOUT_S = 180


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=EXTENSION)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{output[-6000:]}"
    return output


def test_torchrun_two_processes():
    output = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "--max-restarts",
            "0",
            os.path.join(HERE, "torchrun_script.py"),
        ]
    )
    assert output.count("torchrun rank ok") == 2, output


def test_peer_tutorial():
    output = run([sys.executable, os.path.join(EXTENSION, "examples", "peer_tutorial.py"), "--peers", "3"])
    for rank in (1, 2, 3):
        assert f"peer {rank}: done" in output, output

"""Several ranks per host across hosts: two torchrun "nodes" on this machine, told apart by
MR_HOST_ID, each with two ranks; DDP over mapreduce runs hierarchically and matches gloo."""

import os
import subprocess
import sys

from conftest import EXTENSION, HERE, free_port

TIMEOUT_S = 240


def test_two_nodes_of_two_ranks_ddp_matches_gloo():
    port = free_port()
    procs = []
    for node in (0, 1):
        env = dict(os.environ, MR_HOST_ID=f"node{node}", MR_LOG="info")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "2",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "--max-restarts",
            "0",
            os.path.join(HERE, "hier_ddp_script.py"),
        ]
        procs.append(subprocess.Popen(cmd, cwd=EXTENSION, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outputs.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for code, out in outputs:
        assert code == 0, out[-6000:]
    everything = "".join(out for _, out in outputs)
    assert everything.count("hier ddp rank") == 4, everything[-6000:]
    # Rank 0 logs the two-level layout once per communicator (MR_LOG=info).
    assert "hierarchical collectives: 4 rank(s) on 2 host(s)" in everything, everything[-6000:]

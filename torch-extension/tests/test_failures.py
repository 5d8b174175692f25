"""No hang: a dead or silent peer becomes a Python exception carrying the library's message."""

import dist_workers
import pytest
from conftest import free_port, run_ranks


@pytest.mark.parametrize("algo", ["ring", "auto"])
def test_rank_exit_during_allreduce_raises_on_survivors(algo):
    victim = 1
    results = run_ranks(
        dist_workers.dies_during_allreduce, 3, free_port(), victim, algo, allow_missing=(victim,)
    )
    for rank in (0, 2):
        r = results[rank]
        assert r["raised"], f"rank {rank} finished an all-reduce with a dead peer"
        message = r["message"]
        # Our context, then the library's code and mr_last_error() detail.
        assert "mapreduce: allreduce of 67108864 x torch.float32 (SUM) failed (" in message, message
        # mr_last_error()'s detail names the broken link: the victim's, or that of a survivor
        # which failed first and closed its connections.
        detail = message.split("): ", 1)[1] if "): " in message else ""
        assert "rank" in detail, f"the library's detail is missing: {message}"
        assert r["later"] is not None, f"rank {rank}: an op on the broken communicator succeeded"


def test_work_wait_timeout_aborts():
    results = run_ranks(dist_workers.absent_peer_times_out, 2, free_port(), 500)
    message = results[0]
    assert message is not None, "Work.wait(timeout) returned although rank 1 never joined"
    assert "did not complete within 500 ms" in message, message


def test_process_group_timeout_reaches_the_library():
    results = run_ranks(dist_workers.absent_peer_times_out, 2, free_port(), None)
    message = results[0]
    assert message is not None, "all_reduce returned although rank 1 never joined"
    assert "mapreduce: allreduce of 1031 x torch.float32 (SUM) failed (" in message, message
    # The 3 s process-group timeout became the communicator's MR_TIMEOUT_MS.
    assert "3000" in message, message


def test_rank0_setup_error_reaches_every_rank():
    results = run_ranks(dist_workers.rank0_cannot_create_id, 2, free_port())
    for rank, message in enumerate(results):
        assert message is not None, f"rank {rank} created a process group from a bad configuration"
        assert "mr_get_unique_id on rank 0" in message and "sideways" in message, message

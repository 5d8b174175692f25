"""The map-reduce subnet's peer tutorial on the mapreduce backend.

Peer 1 broadcasts 100 MB of random weights to the other peers; then, for two epochs, every peer
all-reduces (averages) its gradients: ones everywhere, threes on peer 1. Each exchange runs in
its own init_process_group()/destroy_process_group() cycle, as in the subnet's script. The whole
job runs on this machine; every peer checks what it received and the script exits non-zero if
any check fails.

    python examples/peer_tutorial.py [--peers 3] [--mib 100]

Relays are used when MR_RELAYS (or MR_VALIDATOR) is set in the environment.
"""

import argparse
import socket
import sys

import torch
import torch.multiprocessing as mp

from mapreduce_torch import Peer

WEIGHTS_SEED = 2024


def random_weights(tensor_size):
    return torch.rand((tensor_size, 1), dtype=torch.float32, generator=torch.Generator().manual_seed(WEIGHTS_SEED))


def train(rank, peer_count, bandwidth, tensor_size, port):
    print(f"peer {rank}: starting", flush=True)
    peer = Peer(rank, peer_count, bandwidth, master_addr="127.0.0.1", master_port=port)

    # Initialize the process group, broadcast the initial weights from peer 1, leave the group.
    peer.init_process_group()
    weights = None
    if rank == 1:
        weights = random_weights(tensor_size)
        peer.broadcast(weights)
    else:
        weights = peer.broadcast(weights)
    peer.destroy_process_group()

    if rank != 1 and not torch.equal(weights, random_weights(tensor_size)):
        raise SystemExit(f"peer {rank}: received weights differ from peer 1's")
    print(f"peer {rank}: has the weights", flush=True)

    epochs = 2
    for epoch in range(epochs):
        # Stands in for a training step's gradients.
        gradients = torch.ones((tensor_size, 1), dtype=torch.float32)
        if rank == 1:
            gradients = torch.ones((tensor_size, 1), dtype=torch.float32) * 3

        peer.init_process_group()
        gradients = peer.all_reduce(gradients)  # average over the peers
        peer.destroy_process_group()

        want = torch.tensor(3.0 + (peer_count - 1)) / peer_count
        if not torch.equal(gradients, torch.full_like(gradients, want.item())):
            raise SystemExit(f"peer {rank}: epoch {epoch}: averaged gradients are not {want.item()}")
        print(f"peer {rank}: epoch {epoch}: gradients averaged to {gradients[0, 0].item():.6f}", flush=True)

    print(f"peer {rank}: done", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=3, help="number of peers")
    parser.add_argument("--mib", type=int, default=100, help="size of the weights in MiB")
    parser.add_argument("--timeout", type=float, default=150, help="seconds before the job is killed")
    args = parser.parse_args()

    tensor_size = args.mib * 1024 * 1024 // 4  # float32 elements
    bandwidth = tensor_size * 4
    port = free_port()

    ctx = mp.get_context("spawn")
    processes = [
        ctx.Process(target=train, args=(rank, args.peers, bandwidth, tensor_size, port))
        for rank in range(1, args.peers + 1)
    ]
    for p in processes:
        p.start()
    failed = False
    for p in processes:
        p.join(timeout=args.timeout)
        if p.is_alive():
            p.kill()
            p.join()
            failed = True
        elif p.exitcode != 0:
            failed = True
    if failed:
        print("tutorial failed: exit codes", [p.exitcode for p in processes], file=sys.stderr)
        sys.exit(1)
    print("all peers finished")


if __name__ == "__main__":
    main()

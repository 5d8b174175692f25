"""The mapreduce subnet on the chain: miner and validator entry points, and the original
subnet's ``Peer``.

* ``python -m mapreduce_subnet.miner`` — a relay (``mr-relayd``) under the wallet's hotkey,
  served on the chain and registered with the subnet's validators;
* ``python -m mapreduce_subnet.validator`` — ``mr-validator`` following the metagraph, setting
  weights from its scores;
* :class:`Peer` — ``Peer(rank, peer_count, bandwidth, wallet, validator_uid, netuid, network)``
  (needs torch and ``mapreduce_torch``; imported on first use).

``--subtensor.network fake:FILE`` runs any of them on a fake chain (see :mod:`.chain`).
"""

from .chain import Chain, ChainError, FakeChain, Neuron, RateLimited, open_chain, write_fake_chain
from .wallet import Wallet, WalletError

__all__ = [
    "Chain",
    "ChainError",
    "FakeChain",
    "Neuron",
    "Peer",
    "RateLimited",
    "Wallet",
    "WalletError",
    "open_chain",
    "write_fake_chain",
]


def __getattr__(name: str):
    if name == "Peer":
        from .peer import Peer

        return Peer
    raise AttributeError(name)

"""The original subnet's ``Peer``: a trainer that finds the validator on the chain by its uid and
identifies to it with its wallet's hotkey.

    peer = Peer(rank, peer_count, bandwidth, wallet, validator_uid, netuid, network)
    peer.init_process_group()
    weights = peer.broadcast(weights)      # rank 1 sends
    grads = peer.all_reduce(grads)         # average
    peer.destroy_process_group()

Ranks are 1-based. The validator's address is the one its uid serves on the subnet and its key
is pinned to that uid's hotkey (``MR_VALIDATOR``, ``MR_VALIDATOR_KEY``); the job's rank 1 asks
the validator for relays under the wallet's hotkey (``MR_CLIENT_KEY_FILE``), which the validator
admits when that hotkey is registered on the subnet. The job runs through the relays the
validator assigns, or fails with its reason (``algo="auto"`` lets it fall back to the ring
instead). Rendezvous is as in
:class:`mapreduce_torch.Peer` (``MASTER_ADDR``/``MASTER_PORT`` or the keyword arguments).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from mapreduce_torch import Peer as _TorchPeer

from . import ss58
from .chain import open_chain
from .wallet import as_wallet


class NotAdmitted(PermissionError):
    """The validator refused this peer's hotkey."""


class Peer(_TorchPeer):
    """One trainer of a job of ``peer_count`` peers, on the subnet ``netuid`` of ``network``.

    Args:
        rank: 1..peer_count; rank 1 asks the validator for relays and is the broadcast source.
        peer_count: number of peers.
        bandwidth: largest tensor in bytes that broadcast/all_reduce accept (None: no limit).
        wallet: a Bittensor wallet (``bittensor.Wallet`` or ``bittensor_wallet.Wallet``), a
            :class:`mapreduce_subnet.Wallet`, or ``"name/hotkey"``; its hotkey identifies the
            peer to the validator.
        validator_uid: the validator's uid on the subnet.
        netuid: the subnet.
        network: ``finney``, ``test``, ``local``, an endpoint, or ``fake:FILE``.
        **kwargs: rendezvous and timeout arguments of :class:`mapreduce_torch.Peer`.
    """

    def __init__(
        self,
        rank: int,
        peer_count: int,
        bandwidth: Optional[int],
        wallet: Any,
        validator_uid: int,
        netuid: int,
        network: str,
        **kwargs: Any,
    ):
        self.wallet = as_wallet(wallet)
        self.netuid = int(netuid)
        self.network = network
        self.validator_uid = int(validator_uid)
        chain = open_chain(network, self.netuid)
        neurons = chain.metagraph()
        validator = next((n for n in neurons if n.uid == self.validator_uid), None)
        if validator is None:
            raise ValueError(f"no uid {self.validator_uid} on subnet {self.netuid} of {network}")
        if not validator.axon:
            raise ValueError(
                f"validator uid {self.validator_uid} serves no address on subnet {self.netuid} of {network}"
            )
        self.hotkey = self.wallet.ss58_address
        self.registered = chain.neuron_of(self.hotkey, neurons) is not None
        os.environ["MR_CLIENT_KEY_FILE"] = str(self.wallet.hotkey_file)
        os.environ["MR_VALIDATOR_KEY"] = ss58.to_hex(validator.hotkey)
        # The subnet's relays or an error: a refused or relay-less job does not quietly fall
        # back to the ring unless the caller asks for it (algo="auto").
        kwargs.setdefault("algo", "relay")
        super().__init__(rank, peer_count, bandwidth, validator=validator.axon, **kwargs)

    def init_process_group(self) -> None:
        try:
            super().init_process_group()
        except Exception as e:
            text = str(e)
            if "not admitted" in text or "is refused" in text:
                where = "is not registered on" if not self.registered else "is registered on"
                raise NotAdmitted(
                    f"the validator (uid {self.validator_uid}) refused peer hotkey {self.hotkey} "
                    f"(wallet {self.wallet}), which {where} subnet {self.netuid} of {self.network}: "
                    f"{text}"
                ) from e
            raise

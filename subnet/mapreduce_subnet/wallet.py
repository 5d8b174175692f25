"""Bittensor wallets as the subnet layer needs them: the hotkey's key file and public key.

The Rust programs read a hotkey file directly (its ``secretSeed``), so a wallet here is only
where that file lives and which public key it holds. Wallets are laid out as the Bittensor SDK
lays them out: ``<path>/<name>/hotkeys/<hotkey>`` (default path ``~/.bittensor/wallets``).
Hotkey files must not be encrypted (miners and validators run unattended); the SDK writes them
unencrypted by default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import ss58

DEFAULT_PATH = "~/.bittensor/wallets"


class WalletError(Exception):
    """A wallet's hotkey cannot be used."""


@dataclass
class Wallet:
    """A wallet name, hotkey name and wallet directory (``--wallet.name/.hotkey/.path``)."""

    name: str = "default"
    hotkey: str = "default"
    path: str = DEFAULT_PATH

    @property
    def hotkey_file(self) -> Path:
        return Path(os.path.expanduser(self.path)) / self.name / "hotkeys" / self.hotkey

    def _read(self) -> dict:
        f = self.hotkey_file
        try:
            data = f.read_bytes()
        except OSError as e:
            raise WalletError(
                f"wallet {self.name}/{self.hotkey}: cannot read its hotkey file {f}: {e.strerror}"
            ) from None
        try:
            body = json.loads(data)
        except ValueError:
            raise WalletError(
                f"wallet {self.name}/{self.hotkey}: {f} is not an unencrypted hotkey file "
                "(an encrypted hotkey cannot be used by an unattended relay or validator)"
            ) from None
        if not isinstance(body, dict) or "secretSeed" not in body:
            raise WalletError(f"wallet {self.name}/{self.hotkey}: {f} has no secretSeed")
        return body

    @property
    def public_key(self) -> str:
        """The hotkey's public key, hex (as the Rust programs name identities)."""
        body = self._read()
        if body.get("publicKey"):
            return ss58.to_hex(body["publicKey"])
        if body.get("accountId"):
            return ss58.to_hex(body["accountId"])
        return ss58.to_hex(body["ss58Address"])

    @property
    def ss58_address(self) -> str:
        return ss58.encode(bytes.fromhex(self.public_key))

    def __str__(self) -> str:
        return f"{self.name}/{self.hotkey}"


def as_wallet(wallet: Any) -> Wallet:
    """A :class:`Wallet` from ours, from an SDK wallet (``bittensor.Wallet``, or the older
    ``bittensor_wallet.Wallet``), or from a ``"name/hotkey"`` string."""
    if isinstance(wallet, Wallet):
        return wallet
    if isinstance(wallet, str):
        name, _, hotkey = wallet.partition("/")
        return Wallet(name or "default", hotkey or "default")
    name = getattr(wallet, "name", None)
    hotkey = getattr(wallet, "hotkey_str", None)
    path = getattr(wallet, "path", None)
    if name is None or hotkey is None:
        raise WalletError(f"{wallet!r} is not a wallet (no name and hotkey_str)")
    return Wallet(str(name), str(hotkey), str(path or DEFAULT_PATH))


def create(name: str, hotkey: str, path: str) -> Wallet:
    """Create a wallet's hotkey with the Bittensor SDK (unencrypted), for tests and local runs."""
    import bittensor as bt

    w = bt.Wallet(name, hotkey, path=path)
    w.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
    return Wallet(name, hotkey, path)

"""The narrow chain interface the subnet layer uses, on the Bittensor SDK or on a fake chain.

Three things are asked of the chain: the subnet's neurons (uid, hotkey, served address,
validator permit, stake), serving this hotkey's address, and setting this validator's
weights. :class:`SdkChain` does them through the SDK (``bt.Subtensor``, ``Metagraph``,
``bt.ServeAxon``, ``bt.SetWeights``; the SDK conforms weights, handles commit-reveal and
preflights the rate limit). :class:`FakeChain` does them on a JSON file, for tests and for
trying the subnet locally without a chain::

    {"netuid": 10,
     "weights_rate_limit": 0,
     "neurons": [{"uid": 0, "hotkey": "5F...", "axon": "127.0.0.1:7700",
                  "validator_permit": true, "stake": 1000.0}, ...]}

It records every submitted weight vector in ``FILE.weights.jsonl`` beside it (one JSON object
per line: time, block, netuid, hotkey, uids, weights) and its ``block`` counts its changes.
``--subtensor.network fake:FILE`` selects it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .wallet import Wallet


class ChainError(Exception):
    """The chain refused or could not be reached."""


class RateLimited(ChainError):
    """Weights were set too recently; try again later."""


@dataclass
class Neuron:
    uid: int
    hotkey: str
    axon: Optional[str] = None
    validator_permit: bool = False
    stake: float = 0.0
    coldkey: str = ""


class Chain:
    """What the subnet layer asks of a chain."""

    network: str
    netuid: int

    def metagraph(self) -> list[Neuron]:
        raise NotImplementedError

    def serve_axon(self, wallet: Wallet, ip: str, port: int) -> None:
        raise NotImplementedError

    def set_weights(self, wallet: Wallet, uids: Sequence[int], weights: Sequence[float]) -> None:
        raise NotImplementedError

    def neuron_of(self, hotkey_ss58: str, neurons: Optional[list[Neuron]] = None) -> Optional[Neuron]:
        for n in neurons if neurons is not None else self.metagraph():
            if n.hotkey == hotkey_ss58:
                return n
        return None


def open_chain(network: str, netuid: int) -> Chain:
    """``fake:FILE`` → :class:`FakeChain`; anything else (``finney``, ``test``, ``local``, a
    ``ws(s)://`` endpoint) → :class:`SdkChain`."""
    if network.startswith("fake:"):
        return FakeChain(Path(network[len("fake:"):]), netuid)
    return SdkChain(network, netuid)


def split_endpoint(addr: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) → (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected host:port, got {addr!r}")
    return host.strip("[]"), int(port)


# --- the fake chain --------------------------------------------------------------------------


class FakeChain(Chain):
    """A chain held in a JSON file (see the module's doc). Safe for several processes at once:
    every change takes an exclusive lock on ``FILE.lock`` and replaces the file atomically."""

    def __init__(self, path: Path, netuid: int):
        self.path = Path(path)
        self.netuid = int(netuid)
        self.network = f"fake:{self.path}"
        if not self.path.exists():
            raise ChainError(f"fake chain {self.path} does not exist")
        body = self._load()
        if int(body.get("netuid", -1)) != self.netuid:
            raise ChainError(
                f"fake chain {self.path} holds subnet {body.get('netuid')}, not netuid {self.netuid}"
            )

    @property
    def weights_path(self) -> Path:
        return self.path.with_name(self.path.name + ".weights.jsonl")

    def _load(self) -> dict:
        try:
            body = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise ChainError(f"fake chain {self.path}: {e}") from None
        if not isinstance(body, dict) or not isinstance(body.get("neurons", []), list):
            raise ChainError(f"fake chain {self.path}: expected an object with a neurons list")
        return body

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        lock = self.path.with_name(self.path.name + ".lock")
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            body = self._load()
            yield body
            body["block"] = int(body.get("block", 0)) + 1
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(body, indent=2))
            os.replace(tmp, self.path)

    def metagraph(self) -> list[Neuron]:
        out = []
        for row in self._load().get("neurons", []):
            out.append(
                Neuron(
                    uid=int(row["uid"]),
                    hotkey=str(row["hotkey"]),
                    axon=row.get("axon") or None,
                    validator_permit=bool(row.get("validator_permit", False)),
                    stake=float(row.get("stake", 0.0)),
                    coldkey=str(row.get("coldkey", "")),
                )
            )
        return sorted(out, key=lambda n: n.uid)

    @property
    def block(self) -> int:
        return int(self._load().get("block", 0))

    def _row(self, body: dict, hotkey: str) -> dict:
        for row in body.get("neurons", []):
            if row.get("hotkey") == hotkey:
                return row
        raise ChainError(f"hotkey {hotkey} is not registered on subnet {self.netuid}")

    def serve_axon(self, wallet: Wallet, ip: str, port: int) -> None:
        with self._locked() as body:
            self._row(body, wallet.ss58_address)["axon"] = f"{ip}:{port}"

    def set_weights(self, wallet: Wallet, uids: Sequence[int], weights: Sequence[float]) -> None:
        hotkey = wallet.ss58_address
        with self._locked() as body:
            row = self._row(body, hotkey)
            if not row.get("validator_permit"):
                raise ChainError(f"hotkey {hotkey} holds no validator permit on subnet {self.netuid}")
            limit = float(body.get("weights_rate_limit", 0))
            last = body.setdefault("last_weights", {}).get(hotkey)
            now = time.time()
            if last is not None and now - float(last) < limit:
                raise RateLimited(
                    f"weights of {hotkey} were set {now - float(last):.1f} s ago; the subnet "
                    f"allows one setting per {limit:g} s"
                )
            body["last_weights"][hotkey] = now
            record = {
                "time": now,
                "block": int(body.get("block", 0)) + 1,
                "netuid": self.netuid,
                "hotkey": hotkey,
                "uids": [int(u) for u in uids],
                "weights": [float(w) for w in weights],
            }
            with open(self.weights_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def submitted(self) -> list[dict]:
        """Every weight vector submitted so far, oldest first."""
        if not self.weights_path.exists():
            return []
        return [json.loads(line) for line in self.weights_path.read_text().splitlines() if line]


def write_fake_chain(path: Path, netuid: int, neurons: Sequence[Neuron], weights_rate_limit: float = 0) -> FakeChain:
    """Create a fake chain file with these neurons."""
    body = {
        "netuid": int(netuid),
        "block": 0,
        "weights_rate_limit": weights_rate_limit,
        "neurons": [asdict(n) for n in neurons],
    }
    Path(path).write_text(json.dumps(body, indent=2))
    return FakeChain(Path(path), netuid)


# --- the real chain, through the SDK ---------------------------------------------------------


class SdkChain(Chain):
    """The chain through the Bittensor SDK (11.x). Kept thin: every call is one SDK call."""

    def __init__(self, network: str, netuid: int):
        try:
            import bittensor as bt
        except ImportError as e:  # pragma: no cover - the Makefile installs it
            raise ChainError(f"the Bittensor SDK is needed for network {network!r}: {e}") from None
        self._bt = bt
        self.network = network
        self.netuid = int(netuid)
        self._sub = bt.Subtensor(network)

    def metagraph(self) -> list[Neuron]:
        try:
            mg = self._sub.subnets.metagraph(self.netuid, commitments=False)
        except Exception as e:
            raise ChainError(f"metagraph of subnet {self.netuid} on {self.network}: {e}") from e
        if mg is None:
            raise ChainError(f"subnet {self.netuid} does not exist on {self.network}")
        return [neuron_from_sdk(n) for n in mg.neurons]

    def _wallet(self, wallet: Wallet):
        return self._bt.Wallet(wallet.name, wallet.hotkey, path=os.path.expanduser(wallet.path))

    def _execute(self, intent, wallet: Wallet, what: str) -> None:
        try:
            self._sub.execute(intent, self._wallet(wallet)).raise_for_failure()
        except self._bt.ChainError as e:
            text = str(e)
            if "rate" in text.lower() and "limit" in text.lower():
                raise RateLimited(f"{what}: {text}") from e
            raise ChainError(f"{what}: {text}") from e
        except Exception as e:
            # A dropped connection, a timeout: retried next epoch like any failure on the chain.
            raise ChainError(f"{what}: {type(e).__name__}: {e}") from e

    def serve_axon(self, wallet: Wallet, ip: str, port: int) -> None:
        self._execute(self.serve_axon_intent(ip, port), wallet, f"serve axon {ip}:{port}")

    def set_weights(self, wallet: Wallet, uids: Sequence[int], weights: Sequence[float]) -> None:
        self._execute(self.set_weights_intent(uids, weights), wallet, f"set weights on subnet {self.netuid}")

    def serve_axon_intent(self, ip: str, port: int):
        return self._bt.ServeAxon(netuid=self.netuid, ip=ip, port=int(port))

    def set_weights_intent(self, uids: Sequence[int], weights: Sequence[float]):
        return self._bt.SetWeights(
            netuid=self.netuid, uids=[int(u) for u in uids], weights=[float(w) for w in weights]
        )


def _amount(balance) -> float:
    """A balance as a number of its units (the SDK's ``Balance`` is not a float)."""
    if balance is None:
        return 0.0
    amount = getattr(balance, "amount", balance)
    return float(amount() if callable(amount) else amount)


def neuron_from_sdk(n) -> Neuron:
    """A :class:`Neuron` from the SDK's ``MetagraphNeuron``."""
    axon = n.axon
    if axon and (axon.startswith("0.0.0.0:") or axon.endswith(":0")):
        axon = None
    return Neuron(
        uid=int(n.uid),
        hotkey=str(n.hotkey),
        axon=axon or None,
        validator_permit=bool(n.validator_permit),
        stake=_amount(n.total_stake),
        coldkey=str(n.coldkey),
    )

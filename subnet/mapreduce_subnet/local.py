"""A whole subnet on this machine, on a fake chain: wallets in a temporary directory, one
validator, miners on loopback addresses, and a peer job through :class:`Peer`.

    python -m mapreduce_subnet.local [--miners 3] [--keep DIR]

prints the weights the validator sets on the fake chain. The tests build their adversarial
subnets from the same pieces (:class:`LocalSubnet`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import ss58
from .chain import FakeChain, Neuron, write_fake_chain
from .wallet import Wallet, create

NETUID = 10

PEER_SCRIPT = r"""
import sys, torch
from datetime import timedelta
from mapreduce_subnet import Peer, Wallet
rank, count, port, name, path, uid, network, n = sys.argv[1:9]
rank, count, n = int(rank), int(count), int(n)
peer = Peer(rank, count, None, Wallet(name, "default", path), int(uid), 10, network,
            master_addr="127.0.0.1", master_port=int(port), timeout=timedelta(seconds=60))
peer.init_process_group()
w = torch.arange(n, dtype=torch.float32) if rank == 1 else None
w = peer.broadcast(w)
assert torch.equal(w, torch.arange(n, dtype=torch.float32)), "broadcast differs"
g = torch.full((n,), float(rank))
g = peer.all_reduce(g)
want = sum(range(1, count + 1)) / count
assert torch.equal(g, torch.full((n,), want)), f"all_reduce: {g[:4]} != {want}"
peer.destroy_process_group()
print(f"peer {rank}: ok", flush=True)
"""


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], object], timeout: float, every: float = 0.25):
    """Poll `check` until it returns something truthy; AssertionError after `timeout` s."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class LocalSubnet:
    """Wallets, a fake chain and the subnet's processes under one directory."""

    def __init__(self, root: Path, python: str = sys.executable):
        self.root = Path(root)
        self.wallets = self.root / "wallets"
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.procs: dict[str, subprocess.Popen] = {}
        self.chain: Optional[FakeChain] = None
        self._uid = 0
        self._neurons: list[Neuron] = []

    # -- wallets and the chain --------------------------------------------------------------

    def wallet(self, name: str) -> Wallet:
        w = Wallet(name, "default", str(self.wallets))
        if not w.hotkey_file.exists():
            create(name, "default", str(self.wallets))
        return w

    def register(self, name: str, *, permit: bool = False, axon: Optional[str] = None) -> int:
        """Register wallet `name`'s hotkey on the subnet (before :meth:`make_chain`)."""
        uid = self._uid
        self._uid += 1
        self._neurons.append(
            Neuron(uid=uid, hotkey=self.wallet(name).ss58_address, axon=axon,
                   validator_permit=permit, stake=1000.0 if permit else 0.0)
        )
        return uid

    def make_chain(self) -> FakeChain:
        self.chain = write_fake_chain(self.root / "chain.json", NETUID, self._neurons)
        return self.chain

    @property
    def network(self) -> str:
        return f"fake:{self.root / 'chain.json'}"

    def common_flags(self, name: str) -> list[str]:
        return ["--netuid", str(NETUID), "--subtensor.network", self.network,
                "--wallet.name", name, "--wallet.hotkey", "default",
                "--wallet.path", str(self.wallets)]

    # -- processes ---------------------------------------------------------------------------

    def spawn(self, key: str, argv: Sequence[str], env: Optional[dict] = None) -> subprocess.Popen:
        log = open(self.logs / f"{key}.log", "ab")
        p = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                             env=dict(os.environ, **(env or {})), start_new_session=True)
        self.procs[key] = p
        return p

    def log(self, key: str) -> str:
        path = self.logs / f"{key}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_validator(self, name: str, config: dict, listen: str, state: str = "state",
                        extra: Sequence[str] = (), key: Optional[str] = None) -> subprocess.Popen:
        cfg = self.root / f"{key or name}.config.json"
        cfg.write_text(json.dumps(config, indent=1))
        return self.spawn(key or name, [self.python, "-m", "mapreduce_subnet.validator",
                                        *self.common_flags(name), "--config", str(cfg),
                                        "--validator.listen", listen,
                                        "--state_dir", str(self.root / state),
                                        "--run_secs", "900", *extra])

    def start_miner(self, name: str, listen: str, extra: Sequence[str] = (),
                    env: Optional[dict] = None) -> subprocess.Popen:
        return self.spawn(name, [self.python, "-m", "mapreduce_subnet.miner",
                                 *self.common_flags(name), "--relay.listen", listen,
                                 "--sync_secs", "1", "--relay.arg=--heartbeat-ms",
                                 "--relay.arg=500", "--run_secs", "900", *extra], env=env)

    def run_peers(self, name: str, count: int, validator_uid: int, elements: int = 1 << 18,
                  timeout: float = 120) -> list[subprocess.CompletedProcess]:
        """A job of `count` peers through :class:`Peer`, all under wallet `name`."""
        port = free_port("127.0.0.1")
        procs = [
            subprocess.Popen([self.python, "-c", PEER_SCRIPT, str(r), str(count), str(port), name,
                              str(self.wallets), str(validator_uid), self.network, str(elements)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in range(1, count + 1)
        ]
        out = []
        for p in procs:
            try:
                text, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                text, _ = p.communicate()
            out.append(subprocess.CompletedProcess(p.args, p.returncode, text))
        return out

    def stop(self, key: str, sig: int = signal.SIGTERM) -> None:
        p = self.procs.pop(key, None)
        if p is None or p.poll() is not None:
            return
        os.killpg(p.pid, sig)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=20)

    def stop_all(self) -> None:
        for key in list(self.procs):
            self.stop(key)

    # -- what happened -----------------------------------------------------------------------

    def weights(self) -> list[dict]:
        return self.chain.submitted() if self.chain else []

    def weight_of(self, record: dict, name: str) -> Optional[float]:
        """`name`'s weight in a submitted record (None when its uid is not in it)."""
        uid = self.uid_of(name)
        return dict(zip(record["uids"], record["weights"])).get(uid)

    def uid_of(self, name: str) -> int:
        hotkey = self.wallet(name).ss58_address
        return next(n.uid for n in self._neurons if n.hotkey == hotkey)

    def relay_id(self, name: str) -> str:
        return ss58.to_hex(self.wallet(name).ss58_address)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="a whole mapreduce subnet on this machine, on a fake chain")
    p.add_argument("--miners", type=int, default=3)
    p.add_argument("--keep", default=None, help="keep wallets, chain and logs in this directory")
    args = p.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mapreduce-subnet-"))
    net = LocalSubnet(root)
    v_uid = net.register("validator", permit=True)
    miners = [f"miner{i}" for i in range(1, args.miners + 1)]
    for m in miners:
        net.register(m)
    net.register("trainer")
    for b in ("bot1", "bot2"):
        net.wallet(b)
    net.make_chain()
    config = {
        "netuid": NETUID, "subtensor.network": net.network, "max_bandwidth": 0,
        "benchmark_hotkeys": [net.wallet("bot1").ss58_address, net.wallet("bot2").ss58_address],
        "report_fraction": 1.0, "heartbeat_timeout_ms": 3000,
        "bench": {"interval_secs": 2, "bytes": 1 << 20},
    }
    listen = f"127.0.0.1:{free_port('127.0.0.1')}"
    print(f"fake chain {net.network}; logs in {net.logs}", flush=True)
    try:
        net.start_validator("validator", config, listen, extra=["--epoch_secs", "2"])
        for i, m in enumerate(miners):
            host = f"127.0.0.{i + 2}"
            net.start_miner(m, f"{host}:{free_port(host)}")
        wait_for("the miners' first weights", lambda: [r for r in net.weights()
                 if all((net.weight_of(r, m) or 0) > 0 for m in miners)], 120)
        print("peer job: 2 peers through Peer(rank, 2, None, wallet, "
              f"{v_uid}, {NETUID}, {net.network!r})", flush=True)
        for r in net.run_peers("trainer", 2, v_uid):
            print(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else f"exit {r.returncode}")
            if r.returncode != 0:
                print(r.stdout, file=sys.stderr)
                return 1
        time.sleep(3)
        last = net.weights()[-1]
        print("weights set on the fake chain:")
        for m in miners:
            print(f"  {m:8} uid {net.uid_of(m)}  weight {net.weight_of(last, m):.4f}")
    finally:
        net.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())

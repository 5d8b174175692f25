"""What the miner and the validator share: the original subnet's flags, logging, finding the
Rust programs, and keeping a daemon running."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .chain import Chain, Neuron, open_chain
from .wallet import DEFAULT_PATH, Wallet

log = logging.getLogger("mapreduce_subnet")


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every entry point takes, spelled as the original subnet spells them."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--netuid", type=int, default=None, help="the subnet's uid (default 10)")
    p.add_argument(
        "--subtensor.network",
        default=None,
        help="finney, test, local, a ws(s):// endpoint, or fake:FILE for a fake chain "
        "(default finney)",
    )
    p.add_argument("--wallet.name", default=None, help="wallet name (default 'default')")
    p.add_argument("--wallet.hotkey", default=None, help="hotkey name (default 'default')")
    p.add_argument("--wallet.path", default=None, help=f"wallets directory (default {DEFAULT_PATH})")
    p.add_argument("--logging.debug", action="store_true", help="debug logging (daemons too)")
    p.add_argument("--logging.trace", action="store_true", help="trace logging (daemons too)")
    p.add_argument(
        "--run_secs",
        type=float,
        default=0,
        help="stop after this many seconds (0: run until SIGINT/SIGTERM)",
    )
    return p


def setting(args: argparse.Namespace, key: str, config: dict, default):
    """A flag's value, else the config file's (keys spelled like the flags), else `default`."""
    value = getattr(args, key, None)
    if value is None:
        value = config.get(key)
    return default if value is None else value


def setup_logging(args: argparse.Namespace) -> str:
    """Configure logging; returns the MR_LOG level for the daemons."""
    level = logging.INFO
    mr_log = os.environ.get("MR_LOG", "info")
    if getattr(args, "logging.trace"):
        level, mr_log = logging.DEBUG, "trace"
    elif getattr(args, "logging.debug"):
        level, mr_log = logging.DEBUG, "debug"
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return mr_log


def wallet_of(args: argparse.Namespace, config: Optional[dict] = None) -> Wallet:
    config = config or {}
    return Wallet(
        setting(args, "wallet.name", config, "default"),
        setting(args, "wallet.hotkey", config, "default"),
        setting(args, "wallet.path", config, DEFAULT_PATH),
    )


def chain_of(args: argparse.Namespace, config: Optional[dict] = None) -> Chain:
    config = config or {}
    return open_chain(
        setting(args, "subtensor.network", config, "finney"), int(setting(args, "netuid", config, 10))
    )


def registered(chain: Chain, wallet: Wallet, neurons: Sequence[Neuron], role: str) -> Neuron:
    """This wallet's neuron, or SystemExit with what to do about it."""
    me = chain.neuron_of(wallet.ss58_address, list(neurons))
    if me is None:
        raise SystemExit(
            f"{role}: hotkey {wallet.ss58_address} (wallet {wallet}) is not registered on subnet "
            f"{chain.netuid} of {chain.network}; register it first "
            f"(btcli subnets register --netuid {chain.netuid})"
        )
    return me


def find_program(name: str, override: Optional[str] = None) -> str:
    """A Rust program: the flag's path, ``$MR_BIN_DIR``, this source tree's ``target/release``,
    or ``PATH``."""
    candidates = []
    if override:
        candidates.append(Path(override))
    if os.environ.get("MR_BIN_DIR"):
        candidates.append(Path(os.environ["MR_BIN_DIR"]) / name)
    candidates.append(Path(__file__).resolve().parents[2] / "target" / "release" / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    raise SystemExit(f"cannot find {name}: build it with `make` (or put it on PATH, or set MR_BIN_DIR)")


def _die_with_parent(parent: int) -> None:
    """In a daemon's child process before exec: get SIGTERM when the supervisor dies, however
    it dies (Linux), so an orphan never keeps the daemon's port from the next supervisor's."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before the request took effect
            os._exit(1)


class Daemon:
    """A child program kept running: restarted when it exits, stopped with SIGTERM."""

    def __init__(self, name: str, env: Optional[dict] = None):
        self.name = name
        self.env = env
        self.argv: Optional[list[str]] = None
        self.proc: Optional[subprocess.Popen] = None
        self.restarts = 0
        self._next_start = 0.0

    def run(self, argv: list[str]) -> None:
        """Run `argv`, replacing the running one if its command line differs."""
        if self.proc is not None and self.proc.poll() is None and argv == self.argv:
            return
        if self.proc is not None and self.proc.poll() is None:
            log.info("%s: command line changed; restarting", self.name)
            self.stop()
        self.argv = list(argv)
        self._start()

    def _start(self) -> None:
        assert self.argv is not None
        log.info("starting %s: %s", self.name, " ".join(self.argv))
        self.proc = subprocess.Popen(self.argv, env=self.env, preexec_fn=functools.partial(_die_with_parent, os.getpid()))

    def check(self) -> None:
        """Restart the program if it exited (at most once per two seconds)."""
        if self.proc is None or self.proc.poll() is None:
            return
        now = time.monotonic()
        if now < self._next_start:
            return
        log.warning("%s exited with status %s; restarting it", self.name, self.proc.returncode)
        self.restarts += 1
        self._next_start = now + 2.0
        self._start()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


class Stop:
    """SIGINT/SIGTERM and --run_secs, checked by the entry points' loops."""

    def __init__(self, run_secs: float):
        self.deadline = time.monotonic() + run_secs if run_secs > 0 else None
        self.requested = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        log.info("signal %d: stopping", signum)
        self.requested = True

    @property
    def now(self) -> bool:
        return self.requested or (self.deadline is not None and time.monotonic() >= self.deadline)

    def sleep(self, secs: float, tick=None) -> None:
        """Sleep up to `secs`, waking early on a stop; calls `tick` every 0.5 s."""
        end = time.monotonic() + secs
        while not self.now and time.monotonic() < end:
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))
            if tick is not None and not self.now:
                tick()

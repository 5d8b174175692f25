"""The subnet's miner: runs ``mr-relayd`` under the wallet's hotkey, serves the relay's address
on the chain, and registers the relay with every validator the metagraph shows.

    python -m mapreduce_subnet.miner --netuid 10 --subtensor.network finney \\
        --wallet.name miner --wallet.hotkey default --relay.listen 0.0.0.0:7000 \\
        --relay.advertise 203.0.113.7:7000

The relay's identity is the hotkey itself (``mr-relayd --key-file`` reads the hotkey file), so
the validators pin the key the chain shows. Every ``--sync_secs`` the miner re-reads the
metagraph: when the validators (or their addresses) change, the relay is restarted with the new
list; when the relay dies, it is restarted. The validator's key is pinned from the chain too.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import Optional, Sequence

from . import ss58
from .chain import ChainError, Neuron, split_endpoint
from .common import Daemon, Stop, chain_of, find_program, log, parser, registered, setup_logging, wallet_of


def relay_argv(
    program: str,
    listen: str,
    advertise: str,
    key_file: str,
    validators: Sequence[Neuron],
    extra: Sequence[str],
) -> list[str]:
    argv = [program, "--listen", listen, "--advertise", advertise, "--key-file", key_file]
    for v in validators:
        argv += ["--validator", v.axon or "", "--validator-key", ss58.to_hex(v.hotkey)]
    return argv + list(extra)


def validators_of(neurons: Sequence[Neuron], me: str) -> list[Neuron]:
    """Neurons with a validator permit and a served address, other than this miner."""
    return sorted(
        (n for n in neurons if n.validator_permit and n.axon and n.hotkey != me),
        key=lambda n: n.uid,
    )


def advertised(listen: str, advertise: Optional[str]) -> str:
    if advertise:
        split_endpoint(advertise)
        return advertise
    host, _port = split_endpoint(listen)
    if ipaddress.ip_address(host).is_unspecified:
        raise SystemExit(
            f"miner: --relay.listen {listen} is not an address others can reach; pass "
            "--relay.advertise PUBLIC_IP:PORT (the address served on the chain)"
        )
    return listen


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser("mapreduce subnet miner: a relay (mr-relayd) serving the subnet's validators")
    p.add_argument("--relay.listen", default="0.0.0.0:7000", help="address mr-relayd listens on")
    p.add_argument(
        "--relay.advertise",
        default=None,
        help="public ip:port of the relay, served on the chain (default: --relay.listen)",
    )
    p.add_argument("--relay.max_memory", type=int, default=None, help="mr-relayd --max-memory")
    p.add_argument("--relay.max_rate", default=None, help="mr-relayd --max-rate")
    p.add_argument("--relay.bin", default=None, help="path of mr-relayd")
    p.add_argument(
        "--relay.arg", action="append", default=[], help="one more mr-relayd argument (repeatable)"
    )
    p.add_argument("--sync_secs", type=float, default=60, help="seconds between metagraph syncs")
    args = p.parse_args(argv)
    mr_log = setup_logging(args)

    wallet = wallet_of(args)
    chain = chain_of(args)
    listen = getattr(args, "relay.listen")
    advertise = advertised(listen, getattr(args, "relay.advertise"))
    extra = list(getattr(args, "relay.arg"))
    if getattr(args, "relay.max_memory") is not None:
        extra += ["--max-memory", str(getattr(args, "relay.max_memory"))]
    if getattr(args, "relay.max_rate") is not None:
        extra += ["--max-rate", str(getattr(args, "relay.max_rate"))]
    program = find_program("mr-relayd", getattr(args, "relay.bin"))
    key_file = str(wallet.hotkey_file)
    hotkey = wallet.ss58_address
    env = dict(os.environ, MR_LOG=mr_log)
    relay = Daemon("mr-relayd", env=env)
    stop = Stop(args.run_secs)
    log.info("miner %s (wallet %s) on subnet %d of %s", hotkey, wallet, chain.netuid, chain.network)
    try:
        while not stop.now:
            try:
                neurons = chain.metagraph()
            except ChainError as e:
                log.warning("metagraph sync failed: %s; keeping the last one", e)
                stop.sleep(args.sync_secs, relay.check)
                continue
            me = registered(chain, wallet, neurons, "miner")
            if me.axon != advertise:
                host, port = split_endpoint(advertise)
                try:
                    chain.serve_axon(wallet, host, port)
                    log.info("served %s on subnet %d for uid %d", advertise, chain.netuid, me.uid)
                except ChainError as e:
                    log.warning("serving %s failed: %s; retrying next sync", advertise, e)
            validators = validators_of(neurons, hotkey)
            if validators:
                relay.run(relay_argv(program, listen, advertise, key_file, validators, extra))
            else:
                log.warning("no validator serves an address on subnet %d yet; waiting", chain.netuid)
            stop.sleep(args.sync_secs, relay.check)
    finally:
        relay.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

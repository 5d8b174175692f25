"""The subnet's validator: runs ``mr-validator`` under the wallet's hotkey, tells it every epoch
which miners the metagraph shows, and sets weights on the chain from its scores.

    python -m mapreduce_subnet.validator --netuid 10 --subtensor.network finney \\
        --wallet.name validator --wallet.hotkey default --config validator.config.json \\
        --validator.listen 0.0.0.0:7700 --validator.advertise 203.0.113.9:7700

validator.config.json takes the original subnet's keys (``subtensor.network``, ``netuid``,
``wallet.name``, ``wallet.hotkey``, ``max_bandwidth`` in bits per second, ``benchmark_hotkeys``)
beside ``mr-validator``'s own (``bench``, ``clients``, ``report_fraction``, ...). Flags win over
the file. The benchmark bots (one per benchmark hotkey, at least two) run inside
``mr-validator`` and ask for their jobs under those hotkeys.

Every epoch (``--epoch_secs``): sync the metagraph; write the chain file ``mr-validator``
follows (relay candidates = neurons with a served address, each assigned only after its relay
proved the hotkey at that address; clients = every registered hotkey); read the scores and set
weights for the miners' uids (the SDK conforms them, handles commit-reveal and the rate limit;
a rate-limited setting is retried next epoch). With ``--dry-run`` nothing is submitted to the
chain (no weights, no served address): each epoch's weights are printed as one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import ss58
from .chain import ChainError, Neuron, RateLimited, split_endpoint
from .common import Daemon, Stop, chain_of, find_program, log, parser, registered, setup_logging, wallet_of

# validator.config.json keys read by this entry point, not by mr-validator.
SUBNET_KEYS = ("subtensor.network", "netuid", "wallet.name", "wallet.hotkey", "wallet.path",
               "max_bandwidth", "benchmark_hotkeys")


def load_config(path: Optional[str]) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"validator: config file {p} does not exist")
    try:
        body = json.loads(p.read_text())
    except ValueError as e:
        raise SystemExit(f"validator: {p} is not JSON: {e}")
    if not isinstance(body, dict):
        raise SystemExit(f"validator: {p} must hold a JSON object")
    return body


def mr_validator_config(config: dict, listen: str) -> dict:
    """mr-validator's config: its own keys from the file, plus the subnet's translated."""
    out = {k: v for k, v in config.items() if k not in SUBNET_KEYS}
    out["listen"] = listen
    bench = dict(out.get("bench") or {})
    hotkeys = [h for h in config.get("benchmark_hotkeys") or [] if h]
    if hotkeys:
        try:
            bench["hotkeys"] = [ss58.to_hex(h) for h in hotkeys]
        except ValueError as e:
            raise SystemExit(f"validator: benchmark_hotkeys: {e}")
        bench["bots"] = max(2, len(hotkeys))
    if config.get("max_bandwidth"):
        bench["max_bandwidth"] = int(config["max_bandwidth"]) // 8
    out["bench"] = bench
    try:
        out["clients"] = [ss58.to_hex(c) for c in out.get("clients") or []]
    except ValueError as e:
        raise SystemExit(f"validator: clients: {e}")
    return out


def chain_file_body(neurons: Sequence[Neuron], netuid: int, block: Optional[int], me: str) -> dict:
    return {
        "netuid": netuid,
        "block": block,
        "relays": [
            {"id": ss58.to_hex(n.hotkey), "addr": n.axon, "uid": n.uid}
            for n in neurons
            if n.axon and n.hotkey != me
        ],
        "clients": [ss58.to_hex(n.hotkey) for n in neurons],
    }


def write_atomic(path: Path, body: dict) -> bool:
    """Write `body` as JSON unless the file already holds it; True when written."""
    text = json.dumps(body, indent=1, sort_keys=True)
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


def read_scores(path: Path) -> list[dict]:
    """The relays' rows of mr-validator's scores file (empty before its first write)."""
    try:
        return list(json.loads(path.read_text()).get("relays", []))
    except FileNotFoundError:
        return []
    except ValueError as e:
        log.warning("scores file %s unreadable: %s", path, e)
        return []


def weights_from_scores(neurons: Sequence[Neuron], rows: Sequence[dict], me: str) -> tuple[list[int], list[float]]:
    """Uids of the miners (neurons serving an address, other than this validator) and their
    weights: the relay's weight in the scores (zero when excluded, not on the chain, or not
    yet scored), normalised to sum 1 when any is positive. Miners sharing an IP already split
    their score in mr-validator."""
    weight_of = {
        row.get("id"): (0.0 if row.get("excluded") else float(row.get("weight", 0.0)))
        for row in rows
    }
    uids, weights = [], []
    for n in sorted(neurons, key=lambda n: n.uid):
        if not n.axon or n.hotkey == me:
            continue
        uids.append(n.uid)
        weights.append(max(0.0, weight_of.get(ss58.to_hex(n.hotkey), 0.0)))
    total = sum(weights)
    if total > 0:
        weights = [w / total for w in weights]
    return uids, weights


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser("mapreduce subnet validator: mr-validator on the chain")
    p.add_argument("--config", default=None, help="validator.config.json (default: ./validator.config.json if present)")
    p.add_argument("--validator.listen", default=None, help="address mr-validator listens on (default: the config's listen, else 0.0.0.0:7700)")
    p.add_argument("--validator.advertise", default=None, help="public ip:port served on the chain (default: the listen address)")
    p.add_argument("--validator.bin", default=None, help="path of mr-validator")
    p.add_argument("--state_dir", default=None, help="scores, chain file and mr-validator's config (default ~/.mapreduce/validator-NETUID)")
    p.add_argument("--epoch_secs", type=float, default=360, help="seconds between metagraph syncs and weight settings")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print the weights as JSON; submit nothing to the chain")
    args = p.parse_args(argv)
    mr_log = setup_logging(args)

    config_path = args.config or ("validator.config.json" if Path("validator.config.json").exists() else None)
    config = load_config(config_path)
    wallet = wallet_of(args, config)
    chain = chain_of(args, config)
    netuid = chain.netuid
    listen = getattr(args, "validator.listen") or config.get("listen") or "0.0.0.0:7700"
    advertise = getattr(args, "validator.advertise") or listen
    host, port = split_endpoint(advertise)
    state = Path(os.path.expanduser(args.state_dir or f"~/.mapreduce/validator-{netuid}"))
    state.mkdir(parents=True, exist_ok=True)
    scores = state / "scores.json"
    chain_file = state / "chain.json"
    mr_config = state / "mr-validator.config.json"
    hotkey = wallet.ss58_address

    neurons = chain.metagraph()
    me = registered(chain, wallet, neurons, "validator")
    if not me.validator_permit and not args.dry_run:
        log.warning("uid %d holds no validator permit on subnet %d: setting weights will fail until it does", me.uid, netuid)
    write_atomic(mr_config, mr_validator_config(config, listen))
    write_atomic(chain_file, chain_file_body(neurons, netuid, getattr(chain, "block", None), hotkey))
    program = find_program("mr-validator", getattr(args, "validator.bin"))
    daemon = Daemon("mr-validator", env=dict(os.environ, MR_LOG=mr_log))
    daemon.run([program, "--listen", listen, "--config", str(mr_config), "--scores", str(scores),
                "--key-file", str(wallet.hotkey_file), "--chain", str(chain_file)])
    log.info("validator %s (uid %d) on subnet %d of %s; state in %s", hotkey, me.uid, netuid, chain.network, state)
    stop = Stop(args.run_secs)
    try:
        while not stop.now:
            if not args.dry_run and me.axon != advertise:
                try:
                    chain.serve_axon(wallet, host, port)
                    log.info("served %s on subnet %d for uid %d", advertise, netuid, me.uid)
                except ChainError as e:
                    log.warning("serving %s failed: %s; retrying next epoch", advertise, e)
            stop.sleep(args.epoch_secs, daemon.check)
            if stop.now:
                break
            try:
                neurons = chain.metagraph()
            except ChainError as e:
                log.warning("metagraph sync failed: %s; keeping the last one", e)
                continue
            me = registered(chain, wallet, neurons, "validator")
            if write_atomic(chain_file, chain_file_body(neurons, netuid, getattr(chain, "block", None), hotkey)):
                log.info("metagraph changed: chain file rewritten")
            uids, weights = weights_from_scores(neurons, read_scores(scores), hotkey)
            if args.dry_run:
                print(json.dumps({"netuid": netuid, "uids": uids, "weights": weights}), flush=True)
                continue
            if not any(w > 0 for w in weights):
                log.info("no miner has earned weight yet; nothing to set this epoch")
                continue
            try:
                chain.set_weights(wallet, uids, weights)
                log.info("set weights on subnet %d: %s", netuid, dict(zip(uids, [round(w, 4) for w in weights])))
            except RateLimited as e:
                log.info("weights not set this epoch: %s", e)
            except ChainError as e:
                log.warning("setting weights failed: %s", e)
    finally:
        daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

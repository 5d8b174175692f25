"""The subnet layer's pure parts: SS58, the fake chain, the config translation, weights, and
the SDK adapter's contract with the installed Bittensor SDK (no network)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mapreduce_subnet import ss58
from mapreduce_subnet.chain import ChainError, FakeChain, Neuron, RateLimited, SdkChain, neuron_from_sdk, write_fake_chain
from mapreduce_subnet.validator import chain_file_body, mr_validator_config, weights_from_scores
from mapreduce_subnet.wallet import Wallet, WalletError, as_wallet, create

bt = pytest.importorskip("bittensor")


def test_ss58_matches_the_sdk_both_ways(tmp_path):
    for i in range(5):
        w = create(f"w{i}", "default", str(tmp_path))
        kp = bt.Wallet(f"w{i}", "default", path=str(tmp_path)).hotkey
        assert ss58.encode(bytes(kp.public_key)) == kp.ss58_address
        assert ss58.decode(kp.ss58_address) == bytes(kp.public_key)
        assert w.public_key == bytes(kp.public_key).hex()
        assert w.ss58_address == kp.ss58_address
    good = w.ss58_address
    bad = good[:-1] + ("A" if good[-1] != "A" else "B")
    with pytest.raises(ValueError, match="checksum"):
        ss58.decode(bad)
    with pytest.raises(ValueError, match="base58"):
        ss58.decode("0OIl" + good[4:])
    assert ss58.to_hex("0x" + w.public_key) == w.public_key


def test_wallets_from_the_sdk_and_clear_errors(tmp_path):
    create("cold", "hot", str(tmp_path))
    sdk = bt.Wallet("cold", "hot", path=str(tmp_path))
    w = as_wallet(sdk)
    assert (w.name, w.hotkey, w.path) == ("cold", "hot", str(tmp_path))
    assert w.public_key == bytes(sdk.hotkey.public_key).hex()
    with pytest.raises(WalletError, match="cannot read its hotkey file"):
        Wallet("nobody", "default", str(tmp_path)).public_key
    enc = tmp_path / "cold" / "hotkeys" / "enc"
    enc.write_bytes(b"$NACL\x00\x01binary")
    with pytest.raises(WalletError, match="not an unencrypted hotkey file"):
        Wallet("cold", "enc", str(tmp_path)).public_key


def test_the_fake_chain_serves_records_and_rate_limits(tmp_path):
    v = create("v", "default", str(tmp_path))
    m = create("m", "default", str(tmp_path))
    stranger = create("s", "default", str(tmp_path))
    chain = write_fake_chain(tmp_path / "chain.json", 3, [
        Neuron(uid=0, hotkey=v.ss58_address, validator_permit=True),
        Neuron(uid=1, hotkey=m.ss58_address),
    ], weights_rate_limit=60)
    with pytest.raises(ChainError, match="holds subnet 3, not netuid 4"):
        FakeChain(tmp_path / "chain.json", 4)
    chain.serve_axon(m, "127.0.0.9", 7000)
    assert chain.metagraph()[1].axon == "127.0.0.9:7000"
    with pytest.raises(ChainError, match="not registered on subnet 3"):
        chain.serve_axon(stranger, "127.0.0.9", 7001)
    with pytest.raises(ChainError, match="no validator permit"):
        chain.set_weights(m, [1], [1.0])
    chain.set_weights(v, [1], [1.0])
    with pytest.raises(RateLimited):
        chain.set_weights(v, [1], [0.5])
    recs = chain.submitted()
    assert len(recs) == 1 and recs[0]["uids"] == [1] and recs[0]["hotkey"] == v.ss58_address
    assert chain.block >= 2


def test_config_in_the_original_format_is_translated():
    hk = ss58.encode(bytes(range(32)))
    cfg = {"subtensor.network": "local", "netuid": 10, "wallet.name": "v", "wallet.hotkey": "h",
           "max_bandwidth": 10737418240, "benchmark_hotkeys": [hk, "", ""],
           "clients": [hk], "bench": {"interval_secs": 60}, "samples": 8}
    out = mr_validator_config(cfg, "0.0.0.0:7700")
    assert out["listen"] == "0.0.0.0:7700" and out["samples"] == 8
    assert not {"subtensor.network", "netuid", "wallet.name", "benchmark_hotkeys"} & set(out)
    assert out["bench"] == {"interval_secs": 60, "hotkeys": [bytes(range(32)).hex()], "bots": 2,
                            "max_bandwidth": 10737418240 // 8}
    assert out["clients"] == [bytes(range(32)).hex()]


def test_weights_map_relay_ids_to_uids():
    keys = [bytes([i]) * 32 for i in range(5)]
    hot = [ss58.encode(k) for k in keys]
    neurons = [
        Neuron(0, hot[0], "127.0.0.1:1", True),   # the validator itself
        Neuron(1, hot[1], "127.0.0.2:1"),
        Neuron(2, hot[2], "127.0.0.3:1"),
        Neuron(3, hot[3], None),                   # serves nothing: not a miner
        Neuron(4, hot[4], "127.0.0.4:1"),          # never scored
    ]
    rows = [{"id": keys[1].hex(), "weight": 0.3}, {"id": keys[2].hex(), "weight": 0.1},
            {"id": keys[4].hex(), "weight": 0.9, "excluded": True}, {"id": "ff" * 32, "weight": 0.6}]
    uids, weights = weights_from_scores(neurons, rows, hot[0])
    assert uids == [1, 2, 4]
    assert weights == pytest.approx([0.75, 0.25, 0.0])
    body = chain_file_body(neurons, 10, 7, hot[0])
    assert [r["uid"] for r in body["relays"]] == [1, 2, 4]
    assert len(body["clients"]) == 5
    assert weights_from_scores(neurons, [], hot[0]) == ([1, 2, 4], [0.0, 0.0, 0.0])


def test_the_sdk_adapter_speaks_the_installed_sdk():
    """The real path: intents build with the fields the adapter passes, and a metagraph neuron
    has the fields it reads. Nothing connects (the Subtensor stays cold)."""
    chain = SdkChain("finney", 10)
    assert repr(chain._sub).startswith("Subtensor(") and "mode=cold" in repr(chain._sub)
    serve = chain.serve_axon_intent("203.0.113.7", 7000)
    assert isinstance(serve, bt.ServeAxon) and (serve.netuid, serve.ip, serve.port) == (10, "203.0.113.7", 7000)
    weights = chain.set_weights_intent([1, 2], [0.25, 0.75])
    assert isinstance(weights, bt.SetWeights) and weights.netuid == 10
    assert list(weights.uids) == [1, 2] and list(weights.weights) == [0.25, 0.75]
    assert callable(chain._sub.subnets.metagraph) and callable(chain._sub.execute)
    fields = {f.name for f in dataclasses.fields(bt.MetagraphNeuron)}
    assert {"uid", "hotkey", "coldkey", "axon", "validator_permit", "total_stake"} <= fields
    row = bt.MetagraphNeuron(**{f.name: _sample(f.name) for f in dataclasses.fields(bt.MetagraphNeuron)
                                if f.default is dataclasses.MISSING})
    n = neuron_from_sdk(row)
    assert (n.uid, n.axon, n.validator_permit, n.stake) == (3, "203.0.113.7:7000", True, 12.5)


def _sample(name):
    values = {"uid": 3, "hotkey": ss58.encode(b"\1" * 32), "coldkey": ss58.encode(b"\2" * 32),
              "axon": "203.0.113.7:7000", "validator_permit": True, "active": True,
              "identity": None, "commitment": None}
    if name in values:
        return values[name]
    if name.endswith("stake") or name == "emission":
        return bt.Balance.from_tao(12.5) if hasattr(bt.Balance, "from_tao") else bt.tao(12.5)
    return 0


def test_wallets_from_the_bittensor_wallet_package(tmp_path):
    """Hotkeys made by ``bittensor-wallet`` (the wallet package of the SDK 9-10 line) work too:
    same layout, and the Rust programs read the same ``secretSeed``."""
    bw = pytest.importorskip("bittensor_wallet")
    w = bw.Wallet(name="cold", hotkey="hot", path=str(tmp_path))
    w.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
    ours = as_wallet(w)
    assert ours.hotkey_file == tmp_path / "cold" / "hotkeys" / "hot"
    assert ours.ss58_address == w.hotkey.ss58_address
    assert ours.public_key == bytes(w.hotkey.public_key).hex()
    assert "secretSeed" in json.loads(ours.hotkey_file.read_text())


def test_a_transport_failure_setting_weights_is_a_chain_error():
    """The validator and the miner retry a ChainError next epoch; any other exception ends
    them (and their daemon). A dropped connection to the chain must be the former, as it is
    for the metagraph."""
    from types import SimpleNamespace

    class SdkError(Exception):
        pass

    def execute(intent, wallet):
        raise ConnectionError("websocket closed")

    chain = SdkChain.__new__(SdkChain)
    chain._bt = SimpleNamespace(
        ChainError=SdkError,
        Wallet=lambda *a, **k: object(),
        SetWeights=lambda **k: k,
        ServeAxon=lambda **k: k,
    )
    chain.network, chain.netuid = "finney", 10
    chain._sub = SimpleNamespace(execute=execute)
    wallet = Wallet("w", "h", "/nonexistent")
    with pytest.raises(ChainError, match="websocket closed"):
        chain.set_weights(wallet, [1], [1.0])
    with pytest.raises(ChainError, match="websocket closed"):
        chain.serve_axon(wallet, "127.0.0.1", 7000)


def test_a_daemon_does_not_outlive_its_supervisor(tmp_path):
    """The miner and the validator keep mr-relayd and mr-validator running. Killed outright
    (SIGKILL, the OOM killer), they cannot stop them; an orphan left holding the port makes
    every restart's daemon fail to bind, forever. The daemon must go with its supervisor."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import mapreduce_subnet

    pkg_root = str(Path(mapreduce_subnet.__file__).resolve().parents[1])
    code = (
        "import time\n"
        "from mapreduce_subnet.common import Daemon\n"
        "d = Daemon('sleeper')\n"
        "d.run(['sleep', '120'])\n"
        "print(d.proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    env = dict(os.environ, PYTHONPATH=pkg_root)
    sup = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
    try:
        child = int(sup.stdout.readline())
        sup.kill()
        sup.wait(timeout=10)
        deadline = time.monotonic() + 10
        alive = True
        while alive and time.monotonic() < deadline:
            try:
                os.kill(child, 0)
                with open(f"/proc/{child}/stat") as f:
                    alive = f.read().split(")")[-1].split()[0] != "Z"
            except (ProcessLookupError, FileNotFoundError):
                alive = False
            if alive:
                time.sleep(0.1)
        if alive:
            os.kill(child, signal.SIGKILL)
        assert not alive, "the daemon outlived its killed supervisor"
    finally:
        if sup.poll() is None:
            sup.kill()

"""The subnet on a fake chain: one validator with two benchmark bots, honest miners (two on one
IP), a dishonest miner, a relay whose served address is not its own, an impostor at another
hotkey's address, a peer job through Peer, an unregistered peer, a dry run and a restart.

Every process is real (Python entry points, mr-validator, mr-relayd, torch peers) and talks
TCP on loopback addresses 127.0.0.x; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from mapreduce_subnet.local import LocalSubnet, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
# The relay's fault-injection hooks exist only in builds with debug assertions.
DEBUG_RELAY = REPO / "target" / "debug" / "mr-relayd"
RELEASE_RELAY = REPO / "target" / "release" / "mr-relayd"

HONEST = ("honest_a", "honest_b", "honest_c")


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    if not DEBUG_RELAY.exists() or not RELEASE_RELAY.exists():
        pytest.fail("build the relays first: cargo build --bins && cargo build --release (make does)")
    net = LocalSubnet(tmp_path_factory.mktemp("subnet"))
    net.v_uid = net.register("validator", permit=True)
    net.register("validator2", permit=True)
    for m in HONEST + ("cheat",):
        net.register(m)
    moved_served = f"127.0.0.5:{free_port('127.0.0.5')}"
    net.register("moved", axon=moved_served)
    impostor_addr = f"127.0.0.6:{free_port('127.0.0.6')}"
    net.register("victim", axon=impostor_addr)
    net.register("trainer")
    net.wallet("stranger")
    bots = [net.wallet(b).ss58_address for b in ("bot1", "bot2")]
    net.make_chain()
    net.config = {
        "netuid": 10,
        "subtensor.network": net.network,
        "wallet.name": "validator",
        "wallet.hotkey": "default",
        "max_bandwidth": 0,
        "benchmark_hotkeys": bots,
        "report_fraction": 1.0,
        "heartbeat_timeout_ms": 3000,
        "default_relays": 3,
        "enroll_per_minute": 100,
        "save_interval_secs": 0.5,
        "bench": {"interval_secs": 2, "bytes": 1 << 20},
    }
    net.listen = f"127.0.0.1:{free_port('127.0.0.1')}"
    net.start_validator("validator", net.config, net.listen, extra=["--epoch_secs", "2"])
    # Rate-capped so that the honest relays measure about the same throughput.
    capped = ["--relay.max_rate", "8M"]
    for name, host in zip(HONEST, ("127.0.0.2", "127.0.0.3", "127.0.0.3")):
        net.start_miner(name, f"{host}:{free_port(host)}", capped)
    net.start_miner("cheat", f"127.0.0.4:{free_port('127.0.0.4')}",
                    ["--relay.bin", str(DEBUG_RELAY)], env={"MR_RELAY_TEST_CORRUPT": "1"})
    # A relay under its own hotkey, but not at the address that hotkey serves.
    moved = net.wallet("moved")
    net.spawn("moved-relay", [str(RELEASE_RELAY), "--listen", f"127.0.0.5:{free_port('127.0.0.5')}",
                              "--validator", net.listen, "--key-file", str(moved.hotkey_file),
                              "--heartbeat-ms", "500"])
    # A relay at the address another hotkey serves, without that hotkey's key.
    net.spawn("impostor-relay", [str(RELEASE_RELAY), "--listen", impostor_addr,
                                 "--validator", net.listen,
                                 "--key-file", str(net.root / "impostor.key"),
                                 "--heartbeat-ms", "500"])
    try:
        wait_for("weights with every honest miner above zero",
                 lambda: [r for r in net.weights()
                          if all((net.weight_of(r, m) or 0) > 0 for m in HONEST)], 150)
        yield net
    finally:
        net.stop_all()


def scores(net, state="state"):
    return {r["id"]: r for r in json.loads((net.root / state / "scores.json").read_text())["relays"]}


def job_lines(net, key="validator"):
    """Relay ids of every job mr-validator assigned, from its log."""
    return [re.findall(r"[0-9a-f]{64}", line)
            for line in net.log(key).splitlines() if re.search(r"job [0-9a-f]+: \d+ peers, relays", line)]


def test_peer_job_through_peer_completes_and_is_verified(net):
    results = net.run_peers("trainer", 2, net.v_uid)
    for r in results:
        assert r.returncode == 0, r.stdout
        assert r.stdout.strip().endswith("ok"), r.stdout
    honest = {net.relay_id(m) for m in HONEST}
    # The job went through the honest miners' relays, and the validator verified its ops.
    assert any(set(ids) == honest for ids in job_lines(net)), job_lines(net)
    wait_for("verified ops on the honest relays",
             lambda: all(scores(net).get(i, {}).get("verified_ops", 0) >= 1 for i in honest), 30)


def test_weights_go_to_the_honest_miners_and_the_dishonest_one_gets_zero(net):
    cheat = net.relay_id("cheat")
    row = wait_for("the dishonest relay's exclusion", lambda: scores(net).get(cheat, {}).get("excluded") and scores(net)[cheat], 60)
    assert row["evidence"], row
    # Zero at the next submission after its exclusion, and at every one after that.
    wait_for("a submission after the exclusion",
             lambda: [r for r in net.weights() if r["time"] > row["excluded_at"] + 1], 60)
    records = net.weights()
    assert all(r["hotkey"] == net.wallet("validator").ss58_address for r in records)
    after = [r for r in records if r["time"] > row["excluded_at"] + 1]
    assert all(net.weight_of(r, "cheat") == 0 for r in after), after
    last = records[-1]
    assert all(net.weight_of(last, m) > 0 for m in HONEST), last
    assert abs(sum(last["weights"]) - 1.0) < 1e-6


def test_miners_on_one_ip_split_their_weight(net):
    last = net.weights()[-1]
    a, b, c = (net.weight_of(last, m) for m in HONEST)
    # b and c share 127.0.0.3; their relays measure about what a's does.
    assert b < 0.75 * a and c < 0.75 * a, last
    assert 0.5 < (b + c) / a < 1.6, last


def test_a_relay_away_from_its_served_address_or_without_its_hotkey_is_never_assigned(net):
    moved, victim = net.relay_id("moved"), net.relay_id("victim")
    s = scores(net)
    # The moved relay registered (its key is its hotkey) but is never benchmarked or assigned.
    assert moved in s, "the relay at the wrong address never registered"
    assert s[moved]["throughput_mbps"] == 0 and s[moved]["verified_ops"] == 0, s[moved]
    assert "not assigned: relay " + moved in net.log("validator")
    # Nobody could register as the victim's hotkey: the impostor has another key.
    assert victim not in s
    impostor = [i for i, r in s.items() if r["addr"] == net.chain.metagraph()[net.uid_of("victim")].axon]
    assert impostor and all(s[i]["throughput_mbps"] == 0 for i in impostor), impostor
    for ids in job_lines(net):
        assert moved not in ids and victim not in ids and not set(impostor) & set(ids), ids
    last = net.weights()[-1]
    assert net.weight_of(last, "moved") == 0 and net.weight_of(last, "victim") == 0, last


def test_a_peer_whose_hotkey_is_not_registered_is_refused_clearly(net):
    results = net.run_peers("stranger", 2, net.v_uid, timeout=120)
    assert all(r.returncode != 0 for r in results), [r.stdout for r in results]
    first = results[0].stdout
    assert "refused peer hotkey " + net.wallet("stranger").ss58_address in first, first
    assert "is not registered on subnet 10" in first, first


def test_dry_run_prints_weights_and_submits_nothing(net):
    state = net.root / "state-dry"
    state.mkdir()
    shutil.copy(net.root / "state" / "scores.json", state / "scores.json")
    before = len(net.weights())
    cfg = dict(net.config, **{"wallet.name": "validator2"})
    p = net.start_validator("validator2", cfg, f"127.0.0.1:{free_port('127.0.0.1')}",
                            state="state-dry", extra=["--dry-run", "--epoch_secs", "1"], key="dry")
    wait_for("two dry-run epochs", lambda: net.log("dry").count('"uids"') >= 2, 60)
    net.stop("dry")
    lines = [json.loads(l) for l in net.log("dry").splitlines() if l.startswith("{")]
    last = lines[-1]
    assert last["netuid"] == 10
    assert net.weight_of(last, "cheat") == 0
    assert all(net.weight_of(last, m) > 0 for m in HONEST), last
    v2 = net.wallet("validator2").ss58_address
    assert not [r for r in net.weights()[before:] if r["hotkey"] == v2]
    assert net.chain.metagraph()[net.uid_of("validator2")].axon is None
    assert p.returncode == 0


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def test_a_miner_restarts_its_relay_when_it_dies(net):
    miner = net.procs["honest_a"]
    (relay,) = children(miner.pid)
    os.kill(relay, 9)
    wait_for("the miner to notice", lambda: "exited with status -9; restarting" in net.log("honest_a"), 30)
    new = wait_for("a new relay", lambda: [c for c in children(miner.pid) if c != relay], 30)
    assert len(new) == 1
    # The new relay registers again and is benchmarked again.
    i = net.relay_id("honest_a")
    seen = scores(net)[i]["throughput_mbps"]
    wait_for("a benchmark of the restarted relay",
             lambda: scores(net)[i]["throughput_mbps"] != seen and net.log("validator").count(f"relay {i} registered") >= 2, 60)


def test_the_validator_restarting_keeps_its_scores(net):
    before = scores(net)
    cheat = net.relay_id("cheat")
    net.stop("validator")
    count = len(net.weights())
    net.start_validator("validator", net.config, net.listen, extra=["--epoch_secs", "2"], key="validator-again")
    wait_for("the reloaded scores", lambda: "relays' scores" in net.log("validator-again"), 30)
    record = wait_for("a submission after the restart",
                      lambda: net.weights()[count:] and net.weights()[-1], 60)
    assert net.weight_of(record, "cheat") == 0, record
    assert all(net.weight_of(record, m) > 0 for m in HONEST), record
    after = scores(net)
    assert after[cheat]["excluded"] and after[cheat]["evidence"] == before[cheat]["evidence"]
    for m in HONEST:
        i = net.relay_id(m)
        assert after[i]["verified_ops"] >= before[i]["verified_ops"] >= 1, (before[i], after[i])

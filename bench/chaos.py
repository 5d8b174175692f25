#!/usr/bin/env python3
"""Chaos trials: relays SIGKILLed at random moments under a running job.

Each trial starts RELAYS `mr-relayd` daemons on loopback and a job of RANKS processes that
drive the C ABI (libmapreduce.so through ctypes) in relay mode: OPS float32 all-reduces of
COUNT elements, each on fresh integer-valued data whose sum is known exactly, every element of
every result checked. At a random moment (uniform over the length of an undisturbed trial,
measured first) one random relay is SIGKILLed. The trial then counts as

  ok     every rank finished every op with MR_OK and the right values;
  wrong  some rank got MR_OK with a wrong element (must never happen);
  error  some rank got an error code (MR_ERR_*) or its init failed, and every rank exited;
  crash  some rank died of a signal or exited abnormally (e.g. SIGPIPE, SIGSEGV);
  hang   some rank was still running at the trial's timeout (then killed).

A trial that is both wrong and something else counts as wrong. The ranks keep the default
SIGPIPE disposition of a C program unless --sigpipe ignore is given (Python itself ignores it).

    .venv/bin/python bench/chaos.py --trials 100            # after cargo build --release
"""

import argparse
import ctypes
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# Rank side
# --------------------------------------------------------------------------------------------

MR_FLOAT32 = 0
MR_SUM = 0


def expected_base(count, k):
    return ((np.arange(count, dtype=np.int64) + k) % 97 + 1).astype(np.float32)


def rank_main(args):
    if args.sigpipe == "default":
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    lib = ctypes.CDLL(args.lib)
    lib.mr_last_error.restype = ctypes.c_char_p
    lib.mr_result_string.restype = ctypes.c_char_p
    out = sys.stdout

    def say(line):
        out.write(line + "\n")
        out.flush()

    uid = ctypes.create_string_buffer(256)
    if args.rank == 0:
        r = lib.mr_get_unique_id(uid)
        if r != 0:
            say("INIT_ERR get_unique_id %s" % lib.mr_last_error().decode())
            return 0
        say("ID " + uid.raw.hex())
    else:
        uid = ctypes.create_string_buffer(bytes.fromhex(args.id), 256)
    comm = ctypes.c_void_p()
    r = lib.mr_comm_init_rank(ctypes.byref(comm), args.world, uid, args.rank)
    if r != 0:
        say("INIT_ERR %d %s" % (r, lib.mr_last_error().decode(errors="replace")))
        return 0
    say("READY")
    n = args.world
    buf = np.empty(args.count, dtype=np.float32)
    for k in range(args.ops):
        base = expected_base(args.count, k)
        buf[:] = base * np.float32(args.rank + 1)
        r = lib.mr_allreduce(comm, buf.ctypes.data_as(ctypes.c_void_p),
                             ctypes.c_size_t(args.count), MR_FLOAT32, MR_SUM)
        if r != 0:
            say("ERR %d %d %s" % (k, r, lib.mr_last_error().decode(errors="replace")))
            continue
        want = base * np.float32(n * (n + 1) // 2)
        bad = np.flatnonzero(buf != want)
        if bad.size:
            i = int(bad[0])
            say("WRONG %d %d elements, first at %d: %r, want %r"
                % (k, bad.size, i, float(buf[i]), float(want[i])))
        else:
            say("OK %d" % k)
    lib.mr_comm_destroy(comm)
    say("DONE")
    return 0


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------

def free_addr():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return "127.0.0.1:%d" % s.getsockname()[1]


def start_relay(relayd, secret, logdir, i):
    """A relay holding only its own token, derived from the job secret and its address."""
    log = open(os.path.join(logdir, "relay-%d.log" % i), "w+")
    addr = free_addr()
    token = subprocess.run([relayd, "token", "--job-token", secret, "--relay", addr],
                           check=True, capture_output=True, text=True).stdout.strip()
    p = subprocess.Popen([relayd, "--listen", addr, "--token", token],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                         env=dict(os.environ, MR_LOG="info"))
    deadline = time.time() + 10
    while time.time() < deadline:
        with open(log.name) as f:
            m = re.search(r"listening on (\S+)", f.read())
        if m:
            return p, m.group(1)
        if p.poll() is not None:
            break
        time.sleep(0.02)
    p.kill()
    p.wait()
    raise RuntimeError("relay %d did not start; log in %s" % (i, log.name))


def rank_cmd(args, rank, uid=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--rank", str(rank),
           "--world", str(args.ranks), "--count", str(args.count), "--ops", str(args.ops),
           "--lib", args.lib, "--sigpipe", args.sigpipe]
    if uid:
        cmd += ["--id", uid]
    return cmd


def classify(results):
    """results: list of (returncode or None when hung, stdout text)."""
    texts = [t for _, t in results]
    if any("WRONG" in t for t in texts):
        return "wrong"
    if any(rc is None for rc, _ in results):
        return "hang"
    if any(rc != 0 for rc, _ in results):
        return "crash"
    if any(("ERR" in t) or ("DONE" not in t) for t in texts):
        return "error"
    return "ok"


def run_trial(args, rng, kill_after, logdir):
    token = os.urandom(32).hex()
    relays = [start_relay(args.relayd, token, logdir, i) for i in range(args.relays)]
    env = dict(os.environ, MR_RELAYS=",".join(a for _, a in relays), MR_TOKEN=token,
               MR_ALGO="relay", MR_TIMEOUT_MS=str(args.op_timeout_ms),
               MR_LOG=os.environ.get("MR_LOG", "error"))
    ranks = []
    victim = None
    errs = [open(os.path.join(logdir, "rank-%d.err" % r), "w") for r in range(args.ranks)]
    try:
        p0 = subprocess.Popen(rank_cmd(args, 0), stdout=subprocess.PIPE, stderr=errs[0],
                              env=env, text=True)
        ranks.append(p0)
        first = p0.stdout.readline()
        if not first.startswith("ID "):
            p0.wait(timeout=args.timeout)
            return "error", None, [(p0.returncode, first + p0.stdout.read())]
        uid = first.split()[1]
        for r in range(1, args.ranks):
            ranks.append(subprocess.Popen(rank_cmd(args, r, uid), stdout=subprocess.PIPE,
                                          stderr=errs[r], env=env, text=True))
        started = time.time()
        if kill_after is not None:
            victim = rng.randrange(args.relays)
            time.sleep(kill_after)
            relays[victim][0].send_signal(signal.SIGKILL)
        results = []
        for p in ranks:
            left = max(0.1, started + args.timeout - time.time())
            try:
                text, _ = p.communicate(timeout=left)
                results.append((p.returncode, (first if p is p0 else "") + text))
            except subprocess.TimeoutExpired:
                p.kill()
                text, _ = p.communicate()
                results.append((None, text))
        return classify(results), victim, results
    finally:
        for f in errs:
            f.close()
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
        for p, _ in relays:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, _ in relays:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--relays", type=int, default=3)
    ap.add_argument("--count", type=int, default=1 << 20, help="float32 elements per op")
    ap.add_argument("--ops", type=int, default=20, help="all-reduces per trial")
    ap.add_argument("--timeout", type=float, default=60, help="seconds per trial")
    ap.add_argument("--op-timeout-ms", type=int, default=20000, help="MR_TIMEOUT_MS")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--sigpipe", choices=["default", "ignore"], default="default",
                    help="SIGPIPE disposition in the ranks (default: as in a C program)")
    ap.add_argument("--lib", default=os.path.join(ROOT, "target/release/libmapreduce.so"))
    ap.add_argument("--relayd", default=os.path.join(ROOT, "target/release/mr-relayd"))
    ap.add_argument("--keep-logs", action="store_true")
    # Internal: one rank of a trial.
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--id", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank is not None:
        return rank_main(args)

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    logdir = tempfile.mkdtemp(prefix="mr-chaos-")
    # An undisturbed trial sets the window in which the kill falls.
    t = time.time()
    outcome, _, results = run_trial(args, rng, None, logdir)
    length = time.time() - t
    if outcome != "ok":
        print("calibration trial failed (%s):" % outcome)
        for rc, text in results:
            print(rc, text)
        return 1
    print("# chaos: %d trials, %d ranks, %d relays, %d x %d float32 all-reduces, seed %d, "
          "undisturbed trial %.2f s, sigpipe %s"
          % (args.trials, args.ranks, args.relays, args.ops, args.count, seed, length,
             args.sigpipe), flush=True)
    counts = {k: 0 for k in ("ok", "wrong", "error", "crash", "hang")}
    for trial in range(args.trials):
        kill_after = rng.uniform(0, length)
        outcome, victim, results = run_trial(args, rng, kill_after, logdir)
        counts[outcome] += 1
        line = "trial %3d: relay %d killed at %.3f s: %s" % (trial, victim, kill_after, outcome)
        if outcome != "ok":
            detail = []
            for r, (rc, text) in enumerate(results):
                bad = [l for l in text.splitlines() if l.split(" ")[0] in
                       ("ERR", "WRONG", "INIT_ERR")]
                detail.append("rank %d rc=%s %s" % (r, rc, bad[:1]))
            line += " (" + "; ".join(detail) + ")"
        print(line, flush=True)
    print("trials %d  ok %d  wrong %d  errors %d  crashes %d  hangs %d"
          % (args.trials, counts["ok"], counts["wrong"], counts["error"], counts["crash"],
             counts["hang"]))
    if not args.keep_logs:
        subprocess.run(["rm", "-rf", logdir])
    else:
        print("logs in", logdir)
    return 1 if counts["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())

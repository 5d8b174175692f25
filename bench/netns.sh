#!/usr/bin/env bash
# Shaped-network benchmark: P peers and R relays, each on its own host (a network namespace)
# joined by veth pairs to a bridge, every host's link shaped with tbf to RATE in each
# direction. Runs mapreduce's ring and relay all-reduce (and gloo's, when the project's .venv
# has torch) and reports each time against its bound:
#   relay: D / rate          ring: 2(P-1)/P * D / rate
# (with -z, each scaled by the format's wire bytes per float32: 1/2 for bf16, 264/1024 for int8)
# Traffic stays inside the namespaces this script creates; it removes them on exit.
# Needs root, iproute2 and a release build (make build).
#
# usage: bench/netns.sh [-p PEERS] [-r RELAYS] [-R RATE_MBIT] [-s "64M 256M"] [-n ITERS] [-S STREAMS]
#                       [-m "ring relay gloo"]   (the modes to run; default all three; also
#                                                 "train": bench/train_compressed.py on the ring,
#                                                 uncompressed, bf16 and int8, -n steps)
#                       [-M MTU]                 (link MTU, default 1500)
#                       [-d RTT_MS]              (round-trip delay between any two hosts)
#                       [-l RANKS_PER_HOST]      (ranks sharing each peer host's namespace and link)
#                       [-z "bf16 int8"]         (also run the ring and the relays with these MR_COMPRESS formats)
#                       [-O OP]                  (mr-bench --op: allreduce by default; for another op
#                                                 the size is mr-bench's and no bound is given)
# With -l L > 1 every peer host runs L ranks (one job of PEERS x L ranks); the modes
# ring-flat and relay-flat run the same job with MR_HIERARCHY=0 for comparison. Bounds are
# per host link: relay D / rate, ring 2(H-1)/H * D / rate with H = PEERS hosts.
# Delay uses netem when the kernel has it, else bench/delayline.c (a user-space delay line
# between each host and the switch, built here with cc): RTT_MS/4 per hop and direction.
# (The netem branch has not run on the development machine, whose kernel lacks netem; the
# measured RTT printed in the header shows which delay took effect.)
# tbf counts every packet's headers, so at MTU 1500 TCP payload can reach at most
# 1448/1514 = 95.6% of RATE (TCP timestamps on); at MTU 9000, 99.3%.
set -euo pipefail
cd "$(dirname "$0")/.."

PEERS=4 RELAYS=4 RATE=1000 SIZES="64M 256M" ITERS=3 STREAMS=${MR_STREAMS:-2} MODES="ring relay gloo" MTU=1500 RTT=0 LOCAL=1 COMPRESS="" OP=allreduce
while getopts "p:r:R:s:n:S:m:M:d:l:z:O:" o; do
  case $o in
    p) PEERS=$OPTARG ;; r) RELAYS=$OPTARG ;; R) RATE=$OPTARG ;; s) SIZES=$OPTARG ;;
    n) ITERS=$OPTARG ;; S) STREAMS=$OPTARG ;; m) MODES=$OPTARG ;; M) MTU=$OPTARG ;; d) RTT=$OPTARG ;;
    l) LOCAL=$OPTARG ;; z) COMPRESS=$OPTARG ;; O) OP=$OPTARG ;; *) exit 2 ;;
  esac
done
WORLD=$((PEERS * LOCAL))
BENCH=$PWD/target/release/mr-bench
RELAYD=$PWD/target/release/mr-relayd
[ -x "$BENCH" ] || { echo "build first: make build" >&2; exit 1; }
HOSTS=$((PEERS + RELAYS))
NS=mrb$$
SUBNET=10.199.$((RANDOM % 200)).
ip_of() { echo "$SUBNET$(( $1 + 10 ))"; }
PIDS=()

cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for i in $(seq 0 $((HOSTS - 1))); do ip netns del "$NS-h$i" 2>/dev/null || true; done
  ip netns del "$NS-sw" 2>/dev/null || true
  ip netns del "$NS-dl" 2>/dev/null || true
}
trap cleanup EXIT

# The switch: a bridge in its own namespace, so the host's network is never touched.
ip netns add "$NS-sw"
ip -n "$NS-sw" link add br0 type bridge
ip -n "$NS-sw" link set br0 up
# tbf burst must cover a few timer ticks at this rate (BURST_MS, default 4 ms), at least 64 KiB;
# the queue holds QUEUE_MS worth of packets before tbf drops.
BURST_MS=${BURST_MS:-4} QUEUE_MS=${QUEUE_MS:-20}
BURST=$(( RATE * 1000 / 8 * BURST_MS / 1000 ))
[ "$BURST" -lt 65536 ] && BURST=65536
# Delay: netem on the shaped links when the kernel has it, else a delay line between each
# host and the switch.
NETEM=0 DELAYLINE=""
if [ "$RTT" != 0 ]; then
  ip netns add "$NS-dl"
  if ip netns exec "$NS-dl" tc qdisc add dev lo root netem delay 1ms 2>/dev/null; then
    NETEM=1
  else
    DELAYLINE=$PWD/target/delayline
    cc -O2 -Wall -Wextra -o "$DELAYLINE" bench/delayline.c
  fi
fi
DL_PAIRS=()
for i in $(seq 0 $((HOSTS - 1))); do
  h="$NS-h$i"
  ip netns add "$h"
  if [ -n "$DELAYLINE" ]; then
    # host eth0 <-> a$i [delay line] b$i <-> s$i on the bridge
    ip link add "h$i-$$" mtu "$MTU" type veth peer name "a$i-$$" mtu "$MTU"
    ip link add "b$i-$$" mtu "$MTU" type veth peer name "s$i-$$" mtu "$MTU"
    ip link set "a$i-$$" netns "$NS-dl"
    ip link set "b$i-$$" netns "$NS-dl"
    ip -n "$NS-dl" link set "a$i-$$" up
    ip -n "$NS-dl" link set "b$i-$$" up
    DL_PAIRS+=("a$i-$$" "b$i-$$")
  else
    ip link add "h$i-$$" mtu "$MTU" type veth peer name "s$i-$$" mtu "$MTU"
  fi
  ip link set "h$i-$$" netns "$h"
  ip link set "s$i-$$" netns "$NS-sw"
  ip -n "$h" link set lo up
  ip -n "$h" link set "h$i-$$" name eth0
  ip -n "$h" addr add "$(ip_of "$i")/24" dev eth0
  ip -n "$h" link set eth0 up
  ip -n "$NS-sw" link set "s$i-$$" master br0
  ip -n "$NS-sw" link set "s$i-$$" up
  # Upload (host -> switch) and download (switch -> host) each shaped to RATE.
  ip netns exec "$h" tc qdisc add dev eth0 root handle 1: tbf rate "${RATE}mbit" burst "$BURST" latency "${QUEUE_MS}ms"
  ip netns exec "$NS-sw" tc qdisc add dev "s$i-$$" root handle 1: tbf rate "${RATE}mbit" burst "$BURST" latency "${QUEUE_MS}ms"
  if [ "$NETEM" = 1 ]; then
    # RTT/4 on each shaped hop: any two hosts are two hops apart each way.
    ip netns exec "$h" tc qdisc add dev eth0 parent 1:1 handle 10: netem delay "$(awk -v r="$RTT" 'BEGIN{print r/4}')ms" limit 100000
    ip netns exec "$NS-sw" tc qdisc add dev "s$i-$$" parent 1:1 handle 10: netem delay "$(awk -v r="$RTT" 'BEGIN{print r/4}')ms" limit 100000
  fi
done
if [ -n "$DELAYLINE" ]; then
  ip netns exec "$NS-dl" "$DELAYLINE" $((RTT * 1000 / 4)) "${DL_PAIRS[@]}" &
  PIDS+=($!)
  sleep 0.2
fi
# Measured round trip between two hosts: a TCP connect to a closed port is refused after
# one round trip.
MEASURED_RTT=$(ip netns exec "$NS-h0" python3 -c '
import socket, sys, time
best = None
for _ in range(5):
    s = socket.socket(); t = time.perf_counter()
    try: s.connect((sys.argv[1], 9))
    except OSError: pass
    d = (time.perf_counter() - t) * 1000; best = d if best is None else min(best, d); s.close()
print(f"{best:.1f} ms")' "$(ip_of 1)" 2>/dev/null || echo unknown)

to_bytes() { numfmt --from=iec "$1"; }
SIZE_LIST=""
for s in $SIZES; do SIZE_LIST="$SIZE_LIST $(to_bytes "$s")"; done

# run_peers ALGO EXTRA_ENV...: runs mr-bench on every peer host (LOCAL ranks on each, ranks
# numbered host by host), prints rank 0's rows.
run_peers() {
  local algo=$1; shift
  local port=$((20000 + RANDOM % 20000)) out pids=() rank
  out=$(mktemp)
  for h in $(seq 0 $((PEERS - 1))); do
    for l in $(seq 0 $((LOCAL - 1))); do
    rank=$((h * LOCAL + l))
    ip netns exec "$NS-h$h" env MR_RANK="$rank" MR_WORLD_SIZE="$WORLD" MR_BOOTSTRAP="$(ip_of 0):$port" \
      MR_ALGO="$algo" MR_STREAMS="$STREAMS" MR_TIMEOUT_MS=120000 "$@" \
      timeout 900 "$BENCH" -b "$(echo $SIZE_LIST | awk '{print $1}')" -e "$(echo $SIZE_LIST | awk '{print $NF}')" \
      -f 4 -w 1 -n "$ITERS" --op "$OP" >"$out.$rank" 2>&1 &
    pids+=($!)
    done
  done
  local ok=0
  for p in "${pids[@]}"; do wait "$p" || ok=1; done
  if [ $ok -ne 0 ]; then echo "mr-bench failed:" >&2; cat "$out".* >&2; fi
  grep -v '^#' "$out.0" | awk -v algo="$algo" 'NF>=9 && $1 ~ /^[0-9]+$/ {print algo, $1, $6/1e6}'
  rm -f "$out".*
}

echo "# shaped network: $PEERS peer hosts x $LOCAL rank(s), $RELAYS relays, ${RATE} Mbit/s per direction per host, MTU $MTU, RTT ${RTT} ms$([ -n "$DELAYLINE" ] && echo ' (delay line)') (measured $MEASURED_RTT), MR_STREAMS=$STREAMS"
printf "%-12s %12s %10s %10s %8s\n" mode size time_s bound_s of_bound
report() { # mode size seconds
  if [ "$OP" != allreduce ]; then
    awk -v m="$1" -v s="$2" -v t="$3" 'BEGIN{printf "%-12s %12d %10.3f %10s %8s\n", m, s, t, "-", "-"}'
    return
  fi
  local bound wire=1
  case $1 in *-bf16|*-fp16) wire=0.5 ;; *-int8) wire=$(awk 'BEGIN{print 264/1024}') ;; esac
  local relayed=0
  case $1 in relay|relay-flat|relay-bf16|relay-fp16|relay-int8) relayed=1 ;; esac
  if [ "$relayed" = 1 ]; then bound=$(awk -v d="$2" -v r="$RATE" -v w="$wire" 'BEGIN{print w*d*8/(r*1e6)}')
  else bound=$(awk -v d="$2" -v r="$RATE" -v p="$PEERS" -v w="$wire" 'BEGIN{print w*2*(p-1)/p*d*8/(r*1e6)}'); fi
  awk -v m="$1" -v s="$2" -v t="$3" -v b="$bound" 'BEGIN{printf "%-12s %12d %10.3f %10.3f %7.1f%%\n", m, s, t, b, 100*b/t}'
}

want() { case " $MODES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if want ring; then
  run_peers ring | while read -r algo size secs; do report ring "$size" "$secs"; done
fi
for z in $COMPRESS; do
  run_peers ring MR_COMPRESS="$z" | while read -r algo size secs; do report "ring-$z" "$size" "$secs"; done
done
if want ring-flat && [ "$LOCAL" -gt 1 ]; then
  run_peers ring MR_HIERARCHY=0 | while read -r algo size secs; do report ring-flat "$size" "$secs"; done
fi

if { want relay || want relay-flat; } && [ "$RELAYS" -gt 0 ] && [ -x "$RELAYD" ]; then
  TOKEN=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  RELAY_LIST=""
  for j in $(seq 0 $((RELAYS - 1))); do
    h=$((PEERS + j)); addr="$(ip_of $h):7500"
    # Each relay gets only its own token, derived from the job secret and its address.
    relay_token=$("$RELAYD" token --job-token "$TOKEN" --relay "$addr")
    ip netns exec "$NS-h$h" "$RELAYD" --listen "$addr" --token "$relay_token" 2>/dev/null &
    PIDS+=($!)
    RELAY_LIST="$RELAY_LIST${RELAY_LIST:+,}$addr"
  done
  sleep 1
  if want relay; then
    run_peers relay MR_RELAYS="$RELAY_LIST" MR_TOKEN="$TOKEN" | while read -r algo size secs; do report relay "$size" "$secs"; done
    for z in $COMPRESS; do
      run_peers relay MR_RELAYS="$RELAY_LIST" MR_TOKEN="$TOKEN" MR_COMPRESS="$z" | while read -r algo size secs; do report "relay-$z" "$size" "$secs"; done
    done
  fi
  if want relay-flat && [ "$LOCAL" -gt 1 ]; then
    run_peers relay MR_RELAYS="$RELAY_LIST" MR_TOKEN="$TOKEN" MR_HIERARCHY=0 | while read -r algo size secs; do report relay-flat "$size" "$secs"; done
  fi
fi

if want train && [ -x .venv/bin/python ] && .venv/bin/python -c 'import mapreduce_torch' 2>/dev/null; then
  echo "# training (bench/train_compressed.py, $ITERS steps, DDP over the ring, error feedback for bf16/int8)"
  printf "%-12s %12s %10s\n" format final_loss wall_s
  for fmt in none bf16 int8; do
    port=$((20000 + RANDOM % 20000)) pids=() out=$(mktemp)
    for h in $(seq 0 $((PEERS - 1))); do
      for l in $(seq 0 $((LOCAL - 1))); do
      r=$((h * LOCAL + l))
      ip netns exec "$NS-h$h" env MR_ALGO=ring MR_IFNAME=eth0 MR_STREAMS="$STREAMS" MR_TIMEOUT_MS=120000 \
        timeout 1800 .venv/bin/python bench/train_compressed.py --rank "$r" --world "$WORLD" \
        --master "$(ip_of 0):$port" --formats "$fmt" --steps "$ITERS" --rate 0 >"$out.$r" 2>&1 &
      pids+=($!)
      done
    done
    ok=0
    for p in "${pids[@]}"; do wait "$p" || ok=1; done
    if [ $ok -ne 0 ]; then echo "training ($fmt) failed:" >&2; cat "$out".* >&2; fi
    awk '/^train / {printf "%-12s %12s %10s\n", $2, $3, $4}' "$out.0"
    rm -f "$out".*
  done
fi

if want gloo && [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch' 2>/dev/null; then
  port=$((20000 + RANDOM % 20000)) pids=() out=$(mktemp)
  for h in $(seq 0 $((PEERS - 1))); do
    for l in $(seq 0 $((LOCAL - 1))); do
    r=$((h * LOCAL + l))
    ip netns exec "$NS-h$h" env MASTER_ADDR="$(ip_of 0)" MASTER_PORT="$port" RANK="$r" WORLD_SIZE="$WORLD" \
      GLOO_SOCKET_IFNAME=eth0 timeout 900 .venv/bin/python bench/gloo_rank.py "$(echo $SIZE_LIST | tr ' ' ',')" "$ITERS" >"$out.$r" 2>&1 &
    pids+=($!)
    done
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  awk '/^gloo allreduce/ {print $3, $4}' "$out.0" | while read -r size secs; do report gloo-ring "$size" "$secs"; done
  rm -f "$out".*
fi

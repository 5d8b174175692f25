#!/usr/bin/env bash
# Run a command in relay mode: start RELAYS mr-relayd daemons on loopback, point the job at
# them (MR_RELAYS, MR_TOKEN, MR_ALGO=relay), run the command, stop the relays. The relays'
# logs are shown when the command fails. The job secret (MR_TOKEN) stays with the job: each
# relay gets only its own token (`mr-relayd token`). RELAY_PIDS lists the relays' process
# ids, for commands that test fail-over.
#
#   usage: c-examples/with-relays.sh RELAYS COMMAND [ARGS...]
#   env:   MR_RELAYD (default target/release/mr-relayd)
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 RELAYS COMMAND [ARGS...]" >&2
    exit 2
fi
relays=$1
shift
relayd=${MR_RELAYD:-target/release/mr-relayd}
[[ -x $relayd ]] || { echo "$0: $relayd not built (make build)" >&2; exit 2; }

token=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
logs=$(mktemp -d)
pids=()
stop_relays() {
    local status=$?
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ $status != 0 ]]; then
        for log in "$logs"/*.log; do
            echo "--- $log" >&2
            cat "$log" >&2
        done
    fi
    rm -rf "$logs"
    exit "$status"
}
trap stop_relays EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

addrs=()
for i in $(seq "$relays"); do
    port=$(free_port)
    relay_token=$("$relayd" token --job-token "$token" --relay "127.0.0.1:$port")
    MR_LOG=${MR_LOG:-info} "$relayd" --listen "127.0.0.1:$port" --token "$relay_token" \
        </dev/null 2>"$logs/relay-$i.log" &
    pids+=($!)
    addrs+=("127.0.0.1:$port")
done

# Wait (at most 10 s) until every relay says it is listening.
for i in $(seq "$relays"); do
    for attempt in $(seq 200); do
        grep -qs "listening on" "$logs/relay-$i.log" && break
        if [[ $attempt == 200 ]] || ! kill -0 "${pids[$((i - 1))]}" 2>/dev/null; then
            echo "$0: relay $i (${addrs[$((i - 1))]}) did not start" >&2
            exit 1
        fi
        sleep 0.05
    done
done

RELAY_PIDS="${pids[*]}" MR_RELAYS=$(IFS=,; echo "${addrs[*]}") MR_TOKEN=$token MR_ALGO=relay "$@"

#!/bin/bash
# Run the loopback benchmarks of BENCHMARKS.md §14 alternately from two release builds, so a
# change is compared with the code before it in the same session.
#   bash bench/compare_builds.sh OLD_BIN_DIR NEW_BIN_DIR [REPS]
# e.g. bash bench/compare_builds.sh ../old/target/release target/release 3
set -u
OLD=${1:?the old build bin dir}
NEW=${2:?the new build bin dir}
REPS=${3:-3}
for rep in $(seq 1 "$REPS"); do
  for v in old new; do
    if [ $v = old ]; then BIN=$OLD; else BIN=$NEW; fi
    echo "== rep $rep $v ring2"
    MR_ALGO=ring MR_SHM_DISABLE=1 timeout 300 "$BIN/mr-bench" --spawn-local 2 -b 256M -e 256M -w 1 -n 5 --op allreduce 2>&1 | tail -1
    echo "== rep $rep $v ring4"
    MR_ALGO=ring MR_SHM_DISABLE=1 timeout 300 "$BIN/mr-bench" --spawn-local 4 -b 256M -e 256M -w 1 -n 5 --op allreduce 2>&1 | tail -1
    echo "== rep $rep $v relay44"
    MR_SHM_DISABLE=1 timeout 300 "$BIN/mr-bench" --spawn-local 4 --relays 4 -b 256M -e 256M -w 1 -n 3 --op allreduce 2>&1 | tail -1
  done
done
for v in old new; do
  if [ $v = old ]; then BIN=$OLD; else BIN=$NEW; fi
  echo "== demo $v"
  timeout 600 "$BIN/mr-bench" --demo 2>&1 | tail -14
done

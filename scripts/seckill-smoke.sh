#!/usr/bin/env bash
# A short seckill run against the distributed system (scripts/with-distributed.sh), driven by
# the load harness, which fails on any invariant violation. Bounded: about 20 seconds of load.
# Called by scripts/test.sh after the test suite; expects the servers to be up.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/redpacket-target}"

# shellcheck disable=SC2016 # expanded by the inner shell, once the system is up
exec ./scripts/with-distributed.sh -- bash -c 'timeout 300 "$RP_BIN/loadtest" seckill \
  --host "$RP_GATEWAY_URL" --model open --rate 100 --ramp 2s --run-time 20s \
  --grabbers 2000 --packets 1500 --opens-in 3s \
  --summary "$CARGO_TARGET_DIR/loadtest/ci-seckill-summary.json"'

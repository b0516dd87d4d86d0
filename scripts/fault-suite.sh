#!/usr/bin/env bash
# The fault suite (cli/tests/faults), then its table for RELIABILITY.md from the rows each
# scenario wrote (`--table`: only the table, from the last run's rows). Other arguments go to
# nextest (say `-E 'test(=gateway_killed)'`);
# RP_FAULT_SEED replays a schedule, RP_FAULT_RUNS=N runs each scenario N times.
# Expects the servers to be up (scripts/test.sh starts them).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/redpacket-target}"
rows="$CARGO_TARGET_DIR/faults"
status=0
if [ "${1:-}" = "--table" ]; then
  # Only the table, from the rows of the last run (the suite also runs in scripts/test.sh).
  shift
else
  rm -rf "$rows"
  cargo nextest run -p redpacket --test faults --no-fail-fast "$@" || status=$?
fi
python3 - "$rows" <<'PY'
import json, pathlib, sys
rows = sorted((json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1]).glob("*.json")),
              key=lambda r: r["scenario"])
print("| scenario | runs | grabs answered 200 | faults injected | violations | drained after the load | settled after the last fault | first seed |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['scenario']} | {r['runs']} | {r['grabs_answered']} | {r['faults_injected']} "
          f"| {r['violations']} | {r['drain_ms'] / 1000:.1f} s | {r['converge_ms'] / 1000:.1f} s | {r['seed']} |")
PY
exit "$status"

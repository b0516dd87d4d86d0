#!/usr/bin/env bash
# A short seckill run against the distributed system: wallet, campaign service, saga worker and
# gateway as separate processes on the local PostgreSQL, Redis and RabbitMQ, driven by the load
# harness, which fails on any invariant violation. Bounded: about 20 seconds of load.
#
# Called by scripts/test.sh after the test suite; expects the servers to be up.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/redpacket-target}"
PG="${RP_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
REDIS="${RP_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
AMQP="${RP_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
RUN="smoke$$"
WORK="$(mktemp -d)"
BIN="$CARGO_TARGET_DIR/debug"

log() { printf '==> seckill smoke: %s\n' "$*" >&2; }

cargo build --quiet -p redpacket -p loadtest --bin redpacket --bin loadtest

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
db_url() { # name → URL of a scratch database on the test server
  printf '%s/rp_t_%s_%s' "${PG%/*}" "$RUN" "$1"
}

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for name in wallet campaign saga; do
    psql "$PG" -qc "DROP DATABASE IF EXISTS rp_t_${RUN}_${name} WITH (FORCE)" >/dev/null 2>&1 || true
  done
  redis-cli -h 127.0.0.1 --scan --pattern "rpt:${RUN}:*" 2>/dev/null | xargs -r -n 500 redis-cli -h 127.0.0.1 unlink >/dev/null 2>&1 || true
  if command -v rabbitmqctl >/dev/null; then
    for queue in $(rabbitmqctl -q list_queues name 2>/dev/null | grep "^rpt\.${RUN}\." || true); do
      rabbitmqctl -q delete_queue "$queue" >/dev/null 2>&1 || true
    done
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

for name in wallet campaign saga; do
  psql "$PG" -qc "CREATE DATABASE rp_t_${RUN}_${name}" >/dev/null
done

WALLET_PORT=$(free_port); CAMPAIGN_PORT=$(free_port); SAGA_PORT=$(free_port); GATEWAY_PORT=$(free_port)
SECRET="smoke-secret-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export RP_LOG=warn

start() { # name, then the command
  local name=$1; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  pids+=($!)
}

start wallet env RP_DATABASE_URL="$(db_url wallet)" RP_LISTEN="127.0.0.1:$WALLET_PORT" \
  "$BIN/redpacket" wallet --migrate
start campaign env RP_DATABASE_URL="$(db_url campaign)" RP_REDIS_URL="$REDIS" RP_WORKER_ID=901 \
  RP_REDIS_PREFIX="rpt:$RUN" RP_LISTEN="127.0.0.1:$CAMPAIGN_PORT" "$BIN/redpacket" campaign --migrate
start saga env RP_DATABASE_URL="$(db_url saga)" RP_REDIS_URL="$REDIS" RP_AMQP_URL="$AMQP" \
  RP_CAMPAIGN_URL="http://127.0.0.1:$CAMPAIGN_PORT" RP_WALLET_URL="http://127.0.0.1:$WALLET_PORT" \
  RP_WORKER_ID=902 RP_REDIS_PREFIX="rpt:$RUN" RP_AMQP_PREFIX="rpt.$RUN" \
  RP_LISTEN="127.0.0.1:$SAGA_PORT" "$BIN/redpacket" saga-worker --migrate
start gateway env RP_CAMPAIGN_URL="http://127.0.0.1:$CAMPAIGN_PORT" \
  RP_WALLET_URL="http://127.0.0.1:$WALLET_PORT" RP_SAGA_URL="http://127.0.0.1:$SAGA_PORT" \
  RP_AUTH_SECRET="$SECRET" RP_LISTEN="127.0.0.1:$GATEWAY_PORT" "$BIN/redpacket" gateway

for port in $WALLET_PORT $CAMPAIGN_PORT $SAGA_PORT $GATEWAY_PORT; do
  deadline=$((SECONDS + 60))
  until curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "a service on port $port did not become ready"; tail -n 20 "$WORK"/*.log >&2; exit 1
    fi
    sleep 0.5
  done
done

log "system up; grabbing"
status=0
RP_AUTH_SECRET="$SECRET" timeout 300 "$BIN/loadtest" seckill \
  --host "http://127.0.0.1:$GATEWAY_PORT" --model open --rate 100 --ramp 2s --run-time 20s \
  --grabbers 2000 --packets 1500 --opens-in 3s \
  --summary "$CARGO_TARGET_DIR/loadtest/ci-seckill-summary.json" || status=$?
if [ "$status" -ne 0 ]; then
  log "failed (exit $status)"; tail -n 20 "$WORK"/*.log >&2
fi
exit "$status"

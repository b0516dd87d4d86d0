#!/usr/bin/env bash
# Runs a command against the distributed system: wallet, campaign service, saga worker and
# gateway as separate processes on the local PostgreSQL, Redis and RabbitMQ, each on a free
# port with scratch databases, Redis keys and RabbitMQ queues that are removed afterwards.
#
#   scripts/with-distributed.sh [--release] -- COMMAND [ARGS...]
#
# The command sees RP_GATEWAY_URL, RP_AUTH_SECRET, RP_SERVICE_PIDS ("gateway=PID campaign=PID
# wallet=PID saga=PID", for RSS sampling) and RP_BIN (the directory of the binaries); its exit
# status is the script's. Expects the servers to be up (scripts/test.sh starts them).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=debug
if [ "${1:-}" = "--release" ]; then profile=release; shift; fi
[ "${1:-}" = "--" ] && shift
[ "$#" -gt 0 ] || { echo "usage: $0 [--release] -- COMMAND [ARGS...]" >&2; exit 64; }

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/redpacket-target}"
PG="${RP_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
REDIS="${RP_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
AMQP="${RP_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
RUN="dist$$"
WORK="$(mktemp -d)"
BIN="$CARGO_TARGET_DIR/$profile"

log() { printf '==> distributed: %s\n' "$*" >&2; }

if [ "$profile" = release ]; then
  cargo build --quiet --release -p redpacket -p loadtest --bin redpacket --bin loadtest
else
  cargo build --quiet -p redpacket -p loadtest --bin redpacket --bin loadtest
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
db_url() { printf '%s/rp_t_%s_%s' "${PG%/*}" "$RUN" "$1"; }

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
SECRET="dist-secret-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export RP_LOG="${RP_LOG:-warn}"

declare -A pid_of
start() { # name, then the command
  local name=$1; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  pids+=($!)
  pid_of[$name]=$!
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

export RP_GATEWAY_URL="http://127.0.0.1:$GATEWAY_PORT" RP_AUTH_SECRET="$SECRET" RP_BIN="$BIN"
export RP_SERVICE_PIDS="gateway=${pid_of[gateway]} campaign=${pid_of[campaign]} wallet=${pid_of[wallet]} saga=${pid_of[saga]}"
log "up at $RP_GATEWAY_URL ($profile build)"
status=0
"$@" || status=$?
if [ "$status" -ne 0 ]; then
  log "the command failed (exit $status); the services' last log lines:"; tail -n 20 "$WORK"/*.log >&2
fi
exit "$status"

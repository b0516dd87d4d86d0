#!/usr/bin/env bash
# The whole test suite against real servers: PostgreSQL, MariaDB, Redis and RabbitMQ.
# Starts any server that is down and installs (with apt) any that is missing, then runs every
# test with cargo-nextest. A test that needs a server fails when the server cannot be reached.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/redpacket-target}"
export RP_TEST_POSTGRES_URL="${RP_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export RP_TEST_MYSQL_URL="${RP_TEST_MYSQL_URL:-mysql://root@127.0.0.1:3306/mysql}"
export RP_TEST_REDIS_URL="${RP_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
amqp_given="${RP_TEST_AMQP_URL:-}"
export RP_TEST_AMQP_URL="${RP_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"

log() { printf '==> %s\n' "$*" >&2; }

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # name port seconds
  local deadline=$((SECONDS + $3))
  until port_open "$2"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "$1 did not come up on port $2 within $3 s"
      return 1
    fi
    sleep 1
  done
}

ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null; then
    log "installing PostgreSQL"
    apt_install postgresql postgresql-client
    local hba
    hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -n 1)
    # Tests connect over loopback without a password, as on the development machines.
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  if ! port_open 5432; then
    log "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
  fi
  wait_for PostgreSQL 5432 60
}

ensure_mariadb() {
  if [ ! -x /usr/sbin/mariadbd ]; then
    log "installing MariaDB"
    apt_install mariadb-server mariadb-client
    local fresh=1
  fi
  if ! port_open 3306; then
    log "starting MariaDB"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  fi
  wait_for MariaDB 3306 60
  if [ -n "${fresh:-}" ]; then
    # A fresh root authenticates by socket only; tests log in over TCP with no password.
    mariadb -uroot -e "ALTER USER root@localhost IDENTIFIED VIA mysql_native_password USING PASSWORD(''); FLUSH PRIVILEGES;" || true
  fi
}

ensure_redis() {
  if ! command -v redis-server >/dev/null; then
    log "installing Redis"
    apt_install redis-server
  fi
  if ! port_open 6379; then
    log "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
  fi
  wait_for Redis 6379 30
}

ensure_rabbitmq() {
  if ! command -v rabbitmq-server >/dev/null; then
    log "installing RabbitMQ"
    apt_install rabbitmq-server
  fi
  if ! port_open 5672; then
    log "starting RabbitMQ"
    rabbitmq-server -detached
  fi
  wait_for RabbitMQ 5672 120
}

ensure_nextest() {
  if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install cargo-nextest --locked
  fi
}

use_own_vhost() {
  # Each run's RabbitMQ names live in a vhost of its own, deleted at the end in one step (tests
  # that stop early leave their quorum queues behind otherwise); vhosts of runs that died are
  # deleted first. A given RP_TEST_AMQP_URL is used as it is.
  [ -z "$amqp_given" ] && command -v rabbitmqctl >/dev/null || return 0
  local leftover
  for leftover in $(rabbitmqctl -q list_vhosts name 2>/dev/null | grep '^rpt-' || true); do
    rabbitmqctl -q delete_vhost "$leftover" >/dev/null 2>&1 || true
  done
  vhost="rpt-$$-$(date +%s)"
  rabbitmqctl -q add_vhost "$vhost" >/dev/null
  rabbitmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*' >/dev/null
  export RP_TEST_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/$vhost"
  trap 'rabbitmqctl -q delete_vhost "$vhost" >/dev/null 2>&1 || true' EXIT
}

ensure_sdk_generator() {
  # The gateway's SDK test generates a Python client from openapi.json.
  if ! command -v openapi-python-client >/dev/null; then
    log "installing openapi-python-client"
    if ! command -v pip3 >/dev/null; then
      apt_install python3-pip python3-venv
    fi
    pip3 install --quiet openapi-python-client || pip3 install --quiet --break-system-packages openapi-python-client
  fi
}

drop_leftover_databases() {
  # Databases of earlier runs that failed before dropping their own.
  psql "$RP_TEST_POSTGRES_URL" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'rp\_t\_%'" 2>/dev/null |
    while read -r name; do
      psql "$RP_TEST_POSTGRES_URL" -qc "DROP DATABASE IF EXISTS $name WITH (FORCE)" >/dev/null 2>&1 || true
    done
  mariadb -h127.0.0.1 -uroot -N -e "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE 'rp\_t\_%'" 2>/dev/null |
    while read -r name; do
      mariadb -h127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS $name" >/dev/null 2>&1 || true
    done
  # Private servers of fault-suite runs that were killed before they could stop them.
  pkill -f 'redpacket-tests/faults-.*/pgdata' 2>/dev/null || true
  rm -rf "${TMPDIR:-/tmp}/redpacket-tests"
  # Redis keys of earlier runs: every test writes under its own `rpt:` prefix.
  redis-cli -h 127.0.0.1 --scan --pattern 'rpt:*' 2>/dev/null | xargs -r -n 500 redis-cli -h 127.0.0.1 unlink >/dev/null 2>&1 || true
}

ensure_postgres
ensure_mariadb
ensure_redis
ensure_rabbitmq
use_own_vhost
ensure_nextest
ensure_sdk_generator
drop_leftover_databases

log "running the test suite"
cargo nextest run --workspace --no-fail-fast "$@"

log "running a short seckill against the distributed system"
./scripts/seckill-smoke.sh

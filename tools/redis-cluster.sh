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
# no persistence, and fail over after --node-timeout (default 2000 ms); a dead master
# stops only its own slots (why: the comment on node_config).  Each node's settings
# are in DIR/PORT/redis.conf, which starts it again.  If anything fails, what was
# started is stopped again.  `down` stops the nodes and removes the files `up` made.
# redis-server is installed with apt-get when it is missing.
set -euo pipefail

log() { echo "redis-cluster: $*" >&2; }
die() { log "$*"; exit 1; }
usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[ $# -ge 2 ] || usage
cmd=$1 dir=$(realpath -m -- "$2")  # absolute: a node's config names its files by it
case $dir in
  *'"'* | *'\'* | *$'\n'*) die "DIR $2 must not hold a quote, backslash or newline (nodes' configs name it)" ;;
esac
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
      "$dir/$port/redis.conf" \
      "$dir/$port"/temp-*.rdb
    rmdir "$dir/$port" 2>/dev/null || true
  done
  rm -f "$dir/address" "$dir/create.log" "$dir/ports"
  rmdir "$dir" 2>/dev/null || true
}

# A node's settings, as a redis.conf (kept in DIR/PORT: `redis-server DIR/PORT/redis.conf`
# starts a stopped node again, and it rejoins the cluster its nodes.conf names).
#  - cluster-require-full-coverage no: a master that is down (its slots served by
#    nobody until a replica takes over, for good if none can) costs only its own
#    pages.  Redis's default, yes, makes every other master refuse every request
#    meanwhile: a master lost before its replica synced would stop the whole tier.
#  - cluster-allow-reads-when-down yes: a node that cannot see a majority of masters
#    still answers reads.  The store reads each page at the exact version it wrote,
#    so a node cut off answers right or not at all; writes there are refused.
#  - repl-diskless-sync-delay 0: a replica's first sync starts at once (Redis's default
#    waits 5 s for more replicas to share the transfer); until it is done, every page
#    on its master is one failure from lost, and the store refuses new ones there.
#  - cluster-replica-validity-factor 0: a replica takes over however long it was cut
#    off.  Nodes keep nothing on disk, so a dead master's pages are gone with it and
#    waiting for it gains nothing; a replica that never synced takes over empty, and
#    the store answers that master's pages missing (tier_lost) at once instead of
#    failing every read of them.
node_config() {
  cat <<EOF_CONF
port $1
bind 127.0.0.1
daemonize yes
dir "$dir/$1"
pidfile "$dir/$1/redis.pid"
logfile "$dir/$1/redis.log"
cluster-enabled yes
cluster-config-file nodes.conf
cluster-node-timeout $node_timeout
cluster-replica-validity-factor 0
cluster-require-full-coverage no
cluster-allow-reads-when-down yes
repl-diskless-sync-delay 0
maxmemory $maxmemory
maxmemory-policy noeviction
appendonly no
save ""
EOF_CONF
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
    node_config "$port" > "$dir/$port/redis.conf"
    redis-server "$dir/$port/redis.conf" >/dev/null
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
  # acknowledged by one (WAIT counts only replicas whose link is up), and every node
  # must know which nodes are replicas (gossip spreads it; a client that asks a node
  # that does not know yet would take a replica for a master).
  local synced=0 agreed=0
  for _ in $(seq 300); do
    synced=0 agreed=0
    for port in "${ports[@]}"; do
      redis-cli -p "$port" info replication | grep -q '^master_link_status:up' && synced=$((synced + 1))
      [ "$(redis-cli -p "$port" cluster nodes | awk '$3 ~ /slave/' | wc -l)" = 3 ] && agreed=$((agreed + 1))
    done
    [ "$synced" = 3 ] && [ "$agreed" = 6 ] && break
    sleep 0.1
  done
  [ "$synced" = 3 ] || die "only $synced of 3 replicas are in sync with their masters"
  [ "$agreed" = 6 ] || die "only $agreed of 6 nodes know all 3 replicas"
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

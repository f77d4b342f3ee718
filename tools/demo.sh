#!/usr/bin/env bash
# The whole thing on a fresh machine, as root: install what is missing, bring a
# 1G vswapfs swap device up on the embedded default (a local hoststore on a unix
# socket, capacity 64M), run a verifying 256M workload in a 64M memory cgroup,
# show where the pages went, and tear everything down again.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (FUSE mount, loop device, swapon)" >&2; exit 1; }
python=$("$top/tools/bootstrap.sh" | tail -n 1)
export VSWAPFS_STATE_DIR=${VSWAPFS_STATE_DIR:-/run/vswapfs-demo}
backing=${DEMO_BACKING:-/var/tmp/vswapfs-demo/backing}
# -I: nothing in the directory the demo is run from (as root) is imported.
vswapctl() { "$python" -I -m vswapctl "$@"; }
step() { printf '\n== %s\n' "$*"; }

# Remove the backing file afterwards if the demo created it.
created_backing=0; [ -e "$backing" ] || created_backing=1
cleanup() {
  step "vswapctl down"
  vswapctl down
  if [ "$created_backing" = 1 ] && [ -z "$(vswapctl status 2>/dev/null)" ]; then
    rm -f "$backing"; rmdir "$(dirname "$backing")" 2>/dev/null || true
  fi
}
trap cleanup EXIT
step "vswapctl up --size 1G --capacity 64M"
vswapctl up --size 1G --capacity 64M --backing "$backing"
step "cat /proc/swaps"
cat /proc/swaps
step "vswapctl workload --size 256M --limit 64M  (every page verified after swap-in)"
vswapctl workload --size 256M --limit 64M
step "vswapctl status  (the workload has exited: discard gave its pages back)"
vswapctl status
step "where the workload's pages went"
STATS=$(vswapctl stats --json) "$python" -I - <<'PY'
import json, os
fs = json.loads(os.environ["STATS"])["vswapfs"]
print("written to the host store: %(host_writes)d pages, to the backing file: %(backing_writes)d pages" % fs)
print("read back from the host: %(host_reads)d, from the backing file: %(backing_reads)d, errors: %(io_errors)d" % fs)
print("given back to the store by discard: %(discard_host_pages)d pages (backing blocks stay written)" % fs)
PY

step "vswapctl stats"
vswapctl stats

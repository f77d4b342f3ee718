#!/usr/bin/env bash
# In a throwaway VM started by tools/vmtest.sh: one scenario of swap under machine-wide
# memory pressure.  No cgroup: a verifying workload larger than the guest's RAM, and a
# bystander that keeps allocating and verifying beside it, push the whole machine into swap.
#
#   guest.sh SCENARIO WORKLOAD_SIZE BYSTANDER_SIZE DEVICE_SIZE PASSES [PAGE_CLUSTER|-]
#
# The guest's root is the host's, read-only; it writes only to its own disks (found by the
# label tools/vmtest.sh put on each) and to its own tmpfs.  What it found goes to the
# results disk as a tar, and one VMTEST-RESULT line (JSON) to the console.
set -uo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# All of it in one function, read whole before it runs: an edit of this file (over 9p, from the host)
# while a guest runs it cannot change what that guest does.
main() {
scenario=$1 workload=$2 bystander=$3 devsize=$4 passes=$5 page_cluster=${6:--}
py="$top/.venv/bin/python"
export PATH="$top/.venv/bin:$PATH"
out=/run/vmtest/out
disk=/run/vmtest/disk
state=/run/vmtest/state
mkdir -p "$out" "$disk"
say() { echo "VMTEST: $*"; }

# The kernel reports a task stuck for 20 s (not 120), every time, and an NMI from the host
# (tools/vm/vmrun.py sends one when the heartbeat stops) prints every task's stack and the
# memory state, then stops the guest.
sysctl -qw kernel.hung_task_timeout_secs=20 kernel.hung_task_warnings=-1 kernel.unknown_nmi_panic=1 \
  kernel.panic_print=0x43 kernel.panic=0
dmesg -n 7
[ "$page_cluster" = - ] || sysctl -qw vm.page-cluster="$page_cluster"
modprobe -a loop fuse zram xfs 2>/dev/null  # no udev here to load them on first use

# Each disk starts with a label written by the host: find ours by it, never by order.
labelled() {
  local dev
  for dev in /sys/block/vd*; do
    dev=/dev/$(basename "$dev")
    [ "$(head -c 16 "$dev" 2>/dev/null | tr -d '\0')" = "$1" ] && { echo "$dev"; return 0; }
  done
  return 1
}
data_dev=$(labelled VMTEST-DATA) || { say "no data disk"; exit 1; }
out_dev=$(labelled VMTEST-OUT) || { say "no results disk"; exit 1; }
spare_dev=$(labelled VMTEST-SPARE || true)

finish() {  # the results disk gets everything, whatever happened
  dmesg > "$out/dmesg.txt" 2>&1
  cp /proc/vmstat "$out/vmstat.txt"
  cp /proc/meminfo "$out/meminfo.txt"
  tar -cf "$out_dev" -C "$out" . && sync
}
trap finish EXIT

make_fs() {  # the data disk as $1, mounted with lazytime (see docs/pressure.md)
  case $1 in
    ext4) mkfs.ext4 -q -F "$data_dev" ;;
    xfs) mkfs.xfs -q -f "$data_dev" ;;
  esac || { say "mkfs.$1 failed"; exit 1; }
  mount -o lazytime "$data_dev" "$disk" || { say "mount failed"; exit 1; }
}

up() {  # vswapctl up with the backing file on the data disk, and whatever else is given
  vswapctl --state-dir "$state" up --size "$devsize" --mountpoint /run/vmtest/mnt --start-timeout 900 "$@" \
    > "$out/up.txt" 2>&1
  local rc=$?
  cat "$out/up.txt"
  [ $rc = 0 ] || { say "up failed"; exit 1; }
}

t0=$(date +%s)
case $scenario in
  loop)  # control: the kernel's own loop device over a file on ext4, written in full
    make_fs ext4
    dd if=/dev/zero of="$disk/swapfile" bs=1M count=$(( $(numfmt --from=iec "$devsize") >> 20 )) status=none
    loopdev=$(losetup --direct-io=on --find --show "$disk/swapfile") && mkswap "$loopdev" >/dev/null \
      && swapon "$loopdev" || { say "loop swap failed"; exit 1; } ;;
  zram)  # control: compressed RAM swap in the kernel
    modprobe zram && echo "$devsize" > /sys/block/zram0/disksize && mkswap /dev/zram0 >/dev/null \
      && swapon /dev/zram0 || { say "zram swap failed"; exit 1; } ;;
  hoststore) make_fs ext4; up --backing "$disk/backing" ;;
  inproc) make_fs ext4; up --backing "$disk/backing" --host inproc --capacity 256M ;;
  writethrough) make_fs ext4; up --backing "$disk/backing" --writethrough ;;
  refuse-all)
    make_fs ext4; up --backing "$disk/backing"
    vswapctl --state-dir "$state" policy refuse-all >> "$out/up.txt" 2>&1 || { say "policy failed"; exit 1; } ;;
  handback)  # the store takes pages while the guest has room, and hands them back as it fills up
    make_fs ext4; up --backing "$disk/backing"
    vswapctl --state-dir "$state" limits --high-watermark 97 --low-watermark 92 >> "$out/up.txt" 2>&1 \
      || { say "limits failed"; exit 1; } ;;
  xfs) make_fs xfs; up --backing "$disk/backing" ;;
  blockdev)  # the RFC's backing_swap: a disk of its own, no filesystem
    [ -n "$spare_dev" ] || { say "no spare disk"; exit 1; }
    up --backing "$spare_dev" ;;
  *) say "unknown scenario $scenario"; exit 2 ;;
esac
say "swap up after $(( $(date +%s) - t0 ))s"
cat /proc/swaps

daemons=$(pgrep -f -- "-I -c import runpy.* (hoststore|vswapfs) " | tr '\n' ' ')  # as vswapctl.launch starts them
python3 -I "$top/tools/vm/watch.py" $daemons &
watcher=$!

bystand() {  # allocates and verifies, round after round, until told to stop
  while [ ! -e "$out/stop" ]; do
    "$py" -I -m vswapctl.workload --size "$bystander" --passes 2 >> "$out/bystander.jsonl" 2>> "$out/bystander.err" \
      || echo '{"failed": true}' >> "$out/bystander.jsonl"
  done
}
bystand &
bystander_pid=$!
if [ "${VMTEST_PROFILE:-0}" != 0 ] && vswapfs_pid=$(pgrep -f -- "-I -c import runpy.* vswapfs "); then
  # Saved to the results disk as soon as it is done: the run may not end well.
  { "$VMTEST_HOME/venv/bin/py-spy" record --nonblocking --threads -r 20 -d "$VMTEST_PROFILE" -f raw \
      -o "$out/vswapfs-profile.txt" --pid "$vswapfs_pid" > "$out/py-spy.txt" 2>&1
    tar -cf "$out_dev" -C "$out" . && sync; } &
fi
start=$(date +%s)
data=incompressible
# zram keeps every page in the guest's RAM: 1.5 GiB that does not compress cannot fit in 1 GiB
# (the OOM killer ends it), so its workload is the compressible kind, which zram stores in a few bytes.
[ "$scenario" = zram ] && data=compressible
"$py" -I -m vswapctl.workload --size "$workload" --passes "$passes" --data "$data" > "$out/workload.json" 2> "$out/workload.err"
workload_rc=$?
seconds=$(( $(date +%s) - start ))
touch "$out/stop"
wait "$bystander_pid"
say "workload exited $workload_rc after ${seconds}s"

if [ "$scenario" != loop ] && [ "$scenario" != zram ]; then
  vswapctl --state-dir "$state" stats --json > "$out/stats.json" 2>&1
  vswapctl --state-dir "$state" status > "$out/status.txt" 2>&1
  vswapctl --state-dir "$state" down > "$out/down.txt" 2>&1 || say "down failed: $(tail -n 3 "$out/down.txt")"
  cp "$state"/*.log "$out/" 2>/dev/null
else
  swapoff -a
  [ -n "${loopdev:-}" ] && losetup -d "$loopdev"
fi
kill "$watcher" 2>/dev/null

python3 -I - "$scenario" "$seconds" "$workload_rc" "$out" <<'EOF'
import json, os, re, sys
scenario, seconds, rc, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def load(name, default=None):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default

def text(name):
    try:
        with open(os.path.join(out, name), errors="replace") as f:
            return f.read()
    except OSError:
        return ""

with open("/proc/vmstat") as f:
    vmstat = dict(line.split() for line in f)
work = load("workload.json", {})
rounds = [json.loads(line) for line in text("bystander.jsonl").splitlines() if line.strip()]
stats = load("stats.json", {})
fs = stats.get("vswapfs", {}) if isinstance(stats, dict) else {}
host = stats.get("hoststore", {}) if isinstance(stats, dict) else {}
fs = fs if isinstance(fs, dict) else {}
host = host if isinstance(host, dict) else {}
problems = []
if rc or work.get("bad_pages", 1):
    problems.append(f"workload exited {rc} with {work.get('bad_pages', '?')} bad pages")
bad_rounds = [r for r in rounds if r.get("failed") or r.get("bad_pages")]
if bad_rounds or not rounds:
    problems.append(f"bystander: {len(bad_rounds)} of {len(rounds)} rounds failed")
dmesg = os.popen("dmesg").read()
hung = len(re.findall(r"blocked for more than", dmesg))
if hung:
    problems.append(f"{hung} hung-task reports")
oom = int(vmstat.get("oom_kill", 0))
if oom:
    problems.append(f"{oom} OOM kills")
for name in ("checksum_errors", "pages_lost", "io_errors", "read_failures"):
    if fs.get(name):
        problems.append(f"vswapfs {name} = {fs[name]}")
result = {
    "scenario": scenario, "seconds": seconds, "pages_swapped_out": int(vmstat.get("pswpout", 0)),
    "pages_swapped_in": int(vmstat.get("pswpin", 0)), "bad_pages": work.get("bad_pages"),
    "bystander_rounds": len(rounds), "bystander_bad_pages": sum(r.get("bad_pages", 0) for r in rounds),
    "hung_tasks": hung, "oom_kills": oom, "pressure_risks": fs.get("pressure_risks"),
    "host_writes": fs.get("host_writes"), "backing_writes": fs.get("backing_writes"),
    "store_accepted": host.get("accepted"), "store_handed_back": host.get("handed_back_pressure"),
    "problems": problems, "ok": not problems,
}
with open(os.path.join(out, "result.json"), "w") as f:
    json.dump(result, f, indent=1)
print("VMTEST-RESULT " + json.dumps(result), flush=True)
EOF
}
main "$@"

#!/usr/bin/env bash
# Swap under machine-wide memory pressure, proven in throwaway VMs (docs/pressure.md).
#
#   tools/vmtest.sh [--all | SCENARIO...] [--memory SIZE] [--workload SIZE] [--passes N] [--timeout SECONDS]
#                   [--device SIZE] [--page-cluster N] [--profile SECONDS] [--out DIR]
#
# Each scenario boots a fresh guest (virtme-ng: this machine's kernel image from
# Debian's linux-image-amd64 and this machine's root, read-only over 9p) with disks
# of its own (sparse files), swaps a verifying workload larger than the guest's RAM
# plus a bystander that allocates and verifies too, with no cgroup, and reports:
# seconds, pages swapped, bad pages, hung-task reports, OOM kills.  A guest that
# stops making progress is sent an NMI (its kernel prints every task's stack), then
# killed: a hang is a failure with the stacks printed, never a stuck run.
#
# Without arguments: the quick scenario (vswapfs with a local hoststore, backing
# file on ext4), as CI runs it.  --all: every scenario; `--list` names them.
# --device SIZE: the swap device (default 4G: a swap device over half full frees
# the slot of every page read back, and each is written out again);
# --page-cluster N: the guest's vm.page-cluster, for every scenario alike (swap
# readahead of 2^N pages; default 5: vswapfs pays per request; - keeps the kernel's 3).
# --profile SECONDS: py-spy samples vswapfs that long once the workload starts
# (in the results: vswapfs-profile.txt, collapsed stacks).
set -euo pipefail
# One function, read whole before it runs: editing this file during a run changes nothing in it.
main() {
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
home=${VMTEST_HOME:-$top/.vmtest}
ALL=(loop zram hoststore inproc writethrough refuse-all handback xfs blockdev)
QUICK=(hoststore)
memory=1G workload=1536M bystander=64M device=4G passes=1 timeout=1500 stall=240 profile=0 out="" page_cluster=5
scenarios=()

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }
say() { echo "vmtest: $*" >&2; }
while [ $# -gt 0 ]; do
  case $1 in
    --all) scenarios=("${ALL[@]}"); shift ;;
    --list) printf '%s\n' "${ALL[@]}"; exit 0 ;;
    --memory|--workload|--bystander|--device|--passes|--timeout|--stall|--profile|--out|--page-cluster)
      [ $# -ge 2 ] || { say "$1 needs a value"; exit 2; }
      name=${1#--}; declare -g "${name//-/_}=$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) say "unknown option $1"; usage >&2; exit 2 ;;
    *) [[ " ${ALL[*]} " == *" $1 "* ]] || { say "unknown scenario $1 (--list names them)"; exit 2; }
       scenarios+=("$1"); shift ;;
  esac
done
[ ${#scenarios[@]} -gt 0 ] || scenarios=("${QUICK[@]}")
[ "$(id -u)" = 0 ] || { say "needs root (to install QEMU and a kernel, and for the guest's root)"; exit 1; }

# -- what it needs -----------------------------------------------------------------------
log=$(mktemp "${TMPDIR:-/tmp}/vswapfs-vmtest-install.XXXXXXXX")
trap 'rm -f "$log"' EXIT
quiet() { "$@" >>"$log" 2>&1 || { say "failed: $* (its output follows)"; tail -n 20 "$log" >&2; exit 1; }; }
python=$("$top/tools/bootstrap.sh" | tail -n 1)  # the project's venv, which the guest runs too
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
compgen -G "/boot/vmlinuz-*-amd64" >/dev/null || missing+=(linux-image-amd64)  # generic: the cloud kernel has no 9p
command -v busybox >/dev/null || missing+=(busybox-static)  # virtme-ng's initramfs
command -v mkfs.xfs >/dev/null || missing+=(xfsprogs)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  quiet apt-get update
  quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
if [ ! -x "$home/venv/bin/vng" ]; then
  say "installing virtme-ng into $home/venv"
  quiet python3 -I -m venv "$home/venv"
  quiet "$home/venv/bin/python" -I -m pip install -q virtme-ng
fi
if [ "$profile" != 0 ] && [ ! -x "$home/venv/bin/py-spy" ]; then
  say "installing py-spy into $home/venv (for --profile)"
  quiet "$home/venv/bin/python" -I -m pip install -q py-spy
fi
export PATH="$home/venv/bin:$PATH"
kernel=""
for image in $(ls -v /boot/vmlinuz-*-amd64); do  # the newest generic kernel with 9p, which the guest's root needs
  version=${image#/boot/vmlinuz-}
  [ -d "/lib/modules/$version/kernel/fs/9p" ] && kernel=$image
done
[ -n "$kernel" ] || { say "no /boot/vmlinuz-*-amd64 with 9p modules (install linux-image-amd64)"; exit 1; }

# KVM only where it really works: on these machines /dev/kvm exists and QEMU dies at its first MSR.
accel=(--disable-kvm)
if [ -w /dev/kvm ] && timeout 60 vng --run "$kernel" --force-9p --memory 256M --exec true >>"$log" 2>&1; then
  accel=()
fi
say "kernel $kernel, ${accel[*]:-KVM}; guest memory $memory, workload $workload, bystander $bystander, device $device, page-cluster ${page_cluster/-/default}"

# The guest sees this machine's root, but fresh tmpfs on /tmp, /var/tmp and /run: a checkout
# there is shared with it on its own (read-only, like the rest).
share=()
case $top/ in /tmp/*|/var/tmp/*|/run/*) share=(--rodir "$top") ;; esac

# -- the scenarios -----------------------------------------------------------------------
out=${out:-$home/results-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
label() { truncate -s "$2" "$1" && printf '%s' "$3" | dd of="$1" conv=notrunc status=none; }
failed=0
summary=()
for scenario in "${scenarios[@]}"; do
  dir="$out/$scenario"
  mkdir -p "$dir"
  label "$dir/data.img" 8G VMTEST-DATA  # sparse: only what the guest writes takes room
  label "$dir/results.img" 64M VMTEST-OUT
  disks=(--disk "$dir/data.img" --disk "$dir/results.img")
  [ "$scenario" = blockdev ] && label "$dir/spare.img" "$device" VMTEST-SPARE && disks+=(--disk "$dir/spare.img")
  say "$scenario: starting (console: $dir/console.log)"
  rc=0
  (cd / && "$python" -I "$top/tools/vm/vmrun.py" "$dir/console.log" "$stall" "$timeout" -- \
      vng --run "$kernel" "${accel[@]}" --force-9p --verbose --memory "$memory" --cpus 2 "${disks[@]}" "${share[@]}" \
      --exec "env VMTEST_PROFILE=$profile VMTEST_HOME=$home $top/tools/vm/guest.sh $scenario $workload $bystander $device $passes $page_cluster") || rc=$?
  tar -xf "$dir/results.img" -C "$dir" 2>/dev/null || true
  rm -f "$dir/data.img" "$dir/spare.img"
  result=$(grep -a '^VMTEST-RESULT ' "$dir/console.log" | tail -n 1 | cut -d' ' -f2- || true)
  if [ -z "$result" ] || [ $rc -ne 0 ] || ! grep -q '"ok": true' <<<"$result"; then
    failed=1
    say "$scenario: FAILED (exit $rc)"
    # What the kernel said about tasks that did not move, and the NMI's dump if one was sent.
    grep -a -A 45 -m 6 'blocked for more than' "$dir/console.log" | grep -av '^\s*$' | head -n 300 >&2 || true
    grep -a -B 2 -A 200 -m 1 'Kernel panic' "$dir/console.log" | head -n 250 >&2 || true
  fi
  [ -n "$result" ] || result=$(printf '{"scenario": "%s", "ok": false, "problems": ["no result (exit %s)"]}' \
                                  "$scenario" "$rc")
  summary+=("$result")
done

"$python" -I - "$out" "${summary[@]}" <<'EOF'
import json, sys
out, rows = sys.argv[1], [json.loads(r) for r in sys.argv[2:]]
print(f"\n{'scenario':<13} {'seconds':>7} {'swapped out':>11} {'swapped in':>10} {'bad':>4} {'bystander':>9} "
      f"{'hung':>4} {'oom':>3}  result")
for r in rows:
    g = lambda k: "-" if r.get(k) is None else r[k]
    print(f"{r['scenario']:<13} {g('seconds'):>7} {g('pages_swapped_out'):>11} {g('pages_swapped_in'):>10} "
          f"{g('bad_pages'):>4} {g('bystander_rounds'):>9} {g('hung_tasks'):>4} {g('oom_kills'):>3}  "
          + ("ok" if r.get("ok") else "FAILED: " + "; ".join(r.get("problems", []))))
with open(f"{out}/summary.json", "w") as f:
    json.dump(rows, f, indent=1)
print(f"\n(pages of 4 KiB; results and consoles in {out})")
EOF
exit $failed
}
main "$@"

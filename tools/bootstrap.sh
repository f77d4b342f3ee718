#!/usr/bin/env bash
# Install what vswapfs needs, skipping what is already there:
#   Debian packages (fuse3, libfuse3-dev, pkg-config, util-linux, redis-server) when missing,
#   and a virtualenv in .venv holding pyfuse3 (built from source, with our patches
#   patches/pyfuse3-*-{fallocate,splice}.patch applied) and this project.
# Safe to run again; prints the venv's python on the last line.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Nothing in the caller's directory may run (demo.sh and test.sh call this as root, from
# wherever they were started): every python below runs with -I (no current directory on
# sys.path, no PYTHON* variables), and from the checkout.
cd "$top"
venv="$top/.venv"
py=${PYTHON:-python3}

log() { echo "bootstrap: $*" >&2; }
# One line per step here; what the package managers print goes to this log,
# which is named (and its end shown) if a step fails, and removed if none does.
# A fresh file of our own (mktemp: mode 0600, a name nobody could have taken or
# linked beforehand), so that users who share a machine never share a log.
logfile=$(mktemp "${TMPDIR:-/tmp}/vswapfs-bootstrap.XXXXXXXX")
keep_log=0
trap '[ "$keep_log" = 1 ] || rm -f "$logfile"' EXIT
quiet() {
  "$@" >>"$logfile" 2>&1 || {
    keep_log=1
    log "failed: $* (its output: $logfile)"
    tail -n 15 "$logfile" | grep -v '^WARNING: Location' >&2 || true
    exit 1
  }
}

missing=()
command -v fusermount3 >/dev/null || missing+=(fuse3)
[ -e /usr/include/fuse3/fuse_lowlevel.h ] || missing+=(libfuse3-dev)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v losetup >/dev/null || missing+=(mount)
command -v mkswap >/dev/null || missing+=(util-linux)
command -v gcc >/dev/null || missing+=(gcc)
command -v patch >/dev/null || missing+=(patch)
"$py" -I -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
can_install=0
[ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null && can_install=1
# The page tier's local cluster (tools/redis-cluster.sh): wanted, not needed; its tests skip without it.
if ! command -v redis-server >/dev/null; then
  if [ $can_install = 1 ]; then missing+=(redis-server); else log "note: no redis-server (the page tier's tests will skip)"; fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ $can_install = 0 ]; then
    log "missing system packages: ${missing[*]} (install them as root)"; exit 1
  fi
  log "installing ${missing[*]} with apt-get"
  quiet apt-get update
  quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

"$py" -I -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { log "$("$py" -I --version) is too old: vswapfs needs Python 3.11 or newer"; exit 1; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  quiet "$py" -I -m venv "$venv"
fi

# Reinstall only when what we install from changed.
stamp="$venv/.vswapfs-stamp"
want=$(find "$top/setup.cfg" "$top/pyproject.toml" "$top/patches" "$top/tools/bootstrap.sh" -type f -print0 \
       | sort -z | xargs -0 cat | sha256sum | cut -d' ' -f1)
# pyfuse3 from its sdist with our patches, fallocate then splice (see each patch's header for why).
pyfuse3_version=3.5.0
install_patched_pyfuse3() {
  local work name
  work=$(mktemp -d)
  log "building pyfuse3 $pyfuse3_version with patches/pyfuse3-$pyfuse3_version-{fallocate,splice}.patch"
  quiet "$venv/bin/python" -I -m pip download -q --no-deps --no-binary :all: -d "$work" "pyfuse3==$pyfuse3_version"
  quiet tar -xzf "$work/pyfuse3-$pyfuse3_version.tar.gz" -C "$work"
  for name in fallocate splice; do
    quiet patch -s --batch -d "$work/pyfuse3-$pyfuse3_version" -p1 -i "$top/patches/pyfuse3-$pyfuse3_version-$name.patch"
  done
  quiet "$venv/bin/python" -I -m pip install -q --force-reinstall --no-deps "$work/pyfuse3-$pyfuse3_version"
  rm -rf "$work"
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing trio, then vswapfs and its dependencies into $venv"
  quiet "$venv/bin/python" -I -m pip install -q trio
  install_patched_pyfuse3
  quiet "$venv/bin/python" -I -m pip install -q -e "$top[test,chart]"  # chart: vswapctl bench --chart
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"

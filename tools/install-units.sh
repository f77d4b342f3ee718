#!/usr/bin/env bash
# Install the systemd units in systemd/ so that they run this checkout's console
# scripts: by default those of the .venv that tools/bootstrap.sh made, or those
# in --bindir DIR (where `pip install .` put them, e.g. /usr/local/bin).  Only the
# units' Exec lines change; the rest is installed as it is in systemd/.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
units=(hoststore.service vswap@.service)
scripts=(hoststore vswapctl)  # what the units run

usage() {
  cat <<EOF
usage: tools/install-units.sh [--bindir DIR] [--dir DIR]

Writes ${units[*]} into DIR (default /etc/systemd/system),
their ExecStart/ExecStop naming ${scripts[*]} in the --bindir
(default $top/.venv/bin, made by tools/bootstrap.sh).  Then:
  systemctl daemon-reload
  systemctl enable --now hoststore.service
  mkdir -p /etc/vswapfs
  echo 'VSWAP_UP_ARGS=--size 4G --host unix:/run/vswapfs-host/host.sock' > /etc/vswapfs/vm.env
  systemctl enable --now vswap@vm.service
Run it again after moving the checkout or making its .venv anew.
EOF
}

fail() { echo "install-units: $*" >&2; exit 1; }

bindir="$top/.venv/bin"
unitdir=/etc/systemd/system
while [ $# -gt 0 ]; do
  case "$1" in
    --bindir|--dir)
      [ $# -ge 2 ] && [ -n "$2" ] || { echo "install-units: $1 needs a directory" >&2; usage >&2; exit 2; }
      if [ "$1" = --bindir ]; then bindir=$2; else unitdir=$2; fi
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install-units: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

# The path goes into Exec lines as it is: systemd wants it absolute, and without
# characters that it (or this script's substitution) would read otherwise.
case "$bindir" in
  /*) ;;
  *) fail "--bindir $bindir: give an absolute path" ;;
esac
[[ "$bindir" =~ ^[A-Za-z0-9._/+@-]+$ ]] \
  || fail "--bindir $bindir: only letters, digits and ._/+@- can go into an Exec line as they are"
for script in "${scripts[@]}"; do
  [ -x "$bindir/$script" ] && [ -f "$bindir/$script" ] \
    || fail "no console script $bindir/$script: run tools/bootstrap.sh first (it makes $top/.venv), or give --bindir where 'pip install .' put it"
done
[ -d "$unitdir" ] || fail "no directory $unitdir to install the units into"

tmp=
trap 'rm -f "$tmp"' EXIT
for unit in "${units[@]}"; do
  tmp=$(mktemp "$unitdir/.$unit.XXXXXXXX")
  # Exec lines name /usr/local/bin in systemd/: that prefix, and nothing else, is replaced.
  sed -E "s#^(Exec[A-Za-z]*=[-@:+!]*)/usr/local/bin/#\1$bindir/#" "$top/systemd/$unit" > "$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$unitdir/$unit"
  echo "install-units: $unitdir/$unit runs $(sed -nE 's/^ExecStart=([^ ]+).*/\1/p' "$unitdir/$unit")"
done

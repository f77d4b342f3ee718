#!/usr/bin/env bash
# A fault run, as root: a store on a unix socket and a mounted vswapfs file (no
# swap), SIGKILL / SIGSTOP / SIGTERM / hostile connections injected into the
# store in write-back and write-through mode; prints pages verified, faults
# injected, pages lost (and whether that was expected) and wrong pages (must be 0).
# Arguments go to `vswapctl faults` (see --help).
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ "$(id -u)" -eq 0 ] || { echo "faults: run as root (FUSE mount)" >&2; exit 1; }
python=$("$top/tools/bootstrap.sh" | tail -n 1)
cd "$top"
exec "$python" -m vswapctl faults "$@"

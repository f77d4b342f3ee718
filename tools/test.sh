#!/usr/bin/env bash
# Install what is missing, then run the whole pytest suite (arguments go to pytest).
# As root with /dev/fuse, loop devices and a memory cgroup, every level runs;
# elsewhere the levels that cannot run skip and say why.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$("$top/tools/bootstrap.sh" | tail -n 1)
cd "$top"
[ $# -gt 0 ] || set -- tests examples  # the project's tests, and the plugin's example suite
exec "$python" -m pytest "$@"

"""A workload for the FS-cache: read every regular file under a directory, and say what was read.

``python -m vswapctl.treeread DIR`` reads each file whole (in name order, 128 KiB at a
time) and prints one JSON line: the sha256 of each file (by path relative to DIR), the
bytes read and the seconds it took.  It runs inside a memory cgroup (``cache bench``,
the live tests), so its page cache is what the cgroup's limit squeezes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

CHUNK = 128 << 10


def files(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        found += [os.path.join(dirpath, name) for name in sorted(filenames)
                  if os.path.isfile(os.path.join(dirpath, name))]
    return found


def digest(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def read_tree(root: str) -> dict[str, object]:
    start = time.monotonic()
    sums, total = {}, 0
    for path in files(root):
        sums[os.path.relpath(path, root)], n = digest(path)
        total += n
    return {"sha256": sums, "bytes": total, "seconds": round(time.monotonic() - start, 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vswapctl.treeread", description=__doc__.split("\n\n")[0])
    ap.add_argument("root", metavar="DIR")
    args = ap.parse_args(argv)
    print(json.dumps(read_tree(os.path.abspath(args.root))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``vswapctl``: bring a vswapfs swap device up and down, and look inside it.

The device's life (up, down, the rule that nothing serving swap pages is ever
stopped) lives in ``vswapctl.device``; this module is the command line, whose
commands live in ``vswapctl.commands``, one module per group.
"""

from __future__ import annotations

import argparse
import os
import sys

from .commands import admin, cache, lifecycle, measure, observe, offload
from .state import DEFAULT_STATE_DIR


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vswapctl",
        description="Bring a vswapfs swap device up and down, and look inside it.",
        epilog="typical use: vswapctl up --size 1G; vswapctl status; vswapctl stats; vswapctl down",
    )
    ap.add_argument("--state-dir", type=os.path.abspath,
                    default=os.environ.get("VSWAPFS_STATE_DIR", DEFAULT_STATE_DIR),
                    help=f"where up keeps its state, socket and logs (default {DEFAULT_STATE_DIR}, "
                         "or $VSWAPFS_STATE_DIR); one device per state dir")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for group in (lifecycle, cache, observe, admin, measure, offload):
        group.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

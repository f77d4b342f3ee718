"""One logging setup for every command: stderr, ``-v`` for debug."""

from __future__ import annotations

import logging
import sys


def setup_logging(verbose: bool, name: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"{name}[%(process)d] %(levelname)s %(message)s",
    )

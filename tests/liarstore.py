"""A hoststore that lies in its ``get`` answers, for fault tests: run as
``python -m tests.liarstore --listen unix:PATH --lie data|seq``.

It stores pages like the real one, but for every odd page number it returns
damaged bytes (``data``) or the wrong version (``seq``), in its ``get``
answers and in the memory it shares with the client.  vswapfs must answer
reads of those pages with EIO, and of the others with their data.
"""

from __future__ import annotations

import argparse
import logging
import sys
import trio

from pagewire.address import parse_address
from pagewire.messages import PageStatus
from hoststore.policy import Limits
from hoststore.pressure import Sampler
from hoststore.server import Server, open_listener
from hoststore.store import Store


class LyingStore(Store):
    def __init__(self, lie: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lie = lie

    async def put(self, client, first, seq, data) -> bytes:  # type: ignore[override]
        """Where the client reads pages from shared memory, lie there too: damaged
        bytes (at another offset than the get answer's), or a header naming the wrong version."""
        statuses = await super().put(client, first, seq, data)
        if client.shared is not None:
            for i, status in enumerate(statuses):
                page = first + i
                if page % 2 and status == PageStatus.STORED:
                    slot = client.index.get(page)
                    if self.lie == "data":
                        client.slab.view(slot)[77] ^= 0xFF
                    else:
                        client.slab.publish(slot, page, client.seq_of[slot] + 1)
        return statuses

    async def get(self, client, pages, statuses, seqs, data) -> None:  # type: ignore[override]
        """The store builds get answers in place: lie there, after the truth is written."""
        await super().get(client, pages, statuses, seqs, data)
        for i, page in enumerate(pages):
            if page % 2 and statuses[i] == PageStatus.STORED:
                if self.lie == "data":
                    data[i * 4096 + 123] ^= 0xFF
                else:
                    seqs[i] += 1


async def main(listen: str, lie: str) -> None:
    store = LyingStore(lie, Limits(capacity_pages=1 << 20), Sampler())
    listener = await open_listener(parse_address(listen))
    await Server(store).serve([listener])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--lie", choices=["data", "seq"], required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    trio.run(main, args.listen, args.lie)

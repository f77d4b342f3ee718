"""The store's notices: pages it hands back, and pages it no longer holds.

A page handed back is checked against the map and written to the backing file
if the map still wants that version; the map moves only where the version
matches, and the store frees a page only after the answer says so.
"""

from __future__ import annotations

import logging
import math

from pagewire.messages import PAGE_SIZE, HandBack, TakeStatus

from .integrity import checksum
from .pagemap import BACKING, HOST, HOST_WT, IN_STORE, LOST
from .pagercore import Part
from .pagercounters import PagerCounter

log = logging.getLogger("vswapfs.pager")


class TakeBack(Part):
    def pages_lost(self) -> None:
        """The store no longer holds our pages: those only it had are lost, cached ones
        are read from the backing file from now on.  A new store is offered pages at
        once: the pressure an old one reported was its own."""
        self.core.held_off_until = -math.inf
        self.map.replace_state(HOST_WT, BACKING)
        lost = self.map.replace_state(HOST, LOST)
        if lost:
            self.counters.add(PagerCounter.PAGES_LOST, lost)
            log.error("%d page(s) were only in the host store, which no longer has them: reads of them "
                      "fail (EIO) until they are rewritten", lost)

    async def take_back(self, handback: HandBack) -> bytes:
        """The store hands pages back: check each against the map, write the ones we
        still need to the backing file, and move the map to it.  One TakeStatus per page."""
        n = len(handback.pages)
        out = bytearray(n)  # TAKEN
        self.counters.add(PagerCounter.HANDBACK_REQUESTS)
        order = sorted(range(n), key=handback.pages.__getitem__)
        runs: list[list[int]] = []
        for i in order:
            page = handback.pages[i]
            if page >= self.core.npages:
                out[i] = TakeStatus.NOT_NEEDED
            elif runs and handback.pages[runs[-1][-1]] + 1 == page:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            first = handback.pages[run[0]]
            async with self.locks.exclusive(first, len(run)):
                await self._take_run(handback, run, out)
        c = self.counters
        c.add(PagerCounter.HANDBACK_TAKEN, out.count(TakeStatus.TAKEN))
        c.add(PagerCounter.HANDBACK_NOT_NEEDED, out.count(TakeStatus.NOT_NEEDED))
        c.add(PagerCounter.HANDBACK_FAILED, out.count(TakeStatus.FAILED))
        return bytes(out)

    async def _take_run(self, handback: HandBack, run: list[int], out: bytearray) -> None:
        states, seqs, sums = self.map.states, self.map.seqs, self.map.sums
        data = memoryview(handback.data)
        to_write: list[int] = []
        for i in run:
            page, seq = handback.pages[i], handback.seqs[i]
            state = states[page]
            if state not in IN_STORE or seqs[page] != seq:
                out[i] = TakeStatus.NOT_NEEDED
                continue
            if checksum(data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE], page, seq) != sums[page]:
                self.core.mismatch(1, "a hand-back")
                out[i] = TakeStatus.NOT_NEEDED  # the store's copy is bad: we do not want it
                if state == HOST_WT:
                    states[page] = BACKING
                else:
                    self.core.lose(page)
                continue
            if state == HOST_WT:
                states[page] = BACKING  # the backing file has it already
                continue
            to_write.append(i)
        if not to_write:
            return
        parts = [(handback.pages[i] * PAGE_SIZE, data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]) for i in to_write]
        try:
            await self.backing.write_many(parts)
        except OSError as exc:
            self.core.backing_failed(handback.pages[to_write[0]], len(to_write), exc)
            for i in to_write:
                out[i] = TakeStatus.FAILED
            return
        for i in to_write:
            states[handback.pages[i]] = BACKING
        self.counters.add(PagerCounter.BACKING_WRITES, len(to_write))

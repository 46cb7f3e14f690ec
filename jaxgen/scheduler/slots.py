"""Decode slots: which request holds each row of the device batch, and which page-table rows
changed since the last plan.

Knows slot numbers and the page lists of their holders; does not know the pool, queues or the
device. Lowest free slot first, so live rows stay packed at the front of the batch.
"""

from __future__ import annotations

import heapq

from jaxgen.scheduler.request import Request


class SlotTable:
    def __init__(self, num_slots: int):
        self._holders: list[Request | None] = [None] * num_slots
        self._free = list(range(num_slots))  # a heap
        self._changed: set[int] = set()
        self._released: set[int] = set()

    def __getitem__(self, slot: int) -> Request | None:
        return self._holders[slot]

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, request: Request) -> int:
        slot = heapq.heappop(self._free)
        self._holders[slot] = request
        self._changed.add(slot)
        return slot

    def release(self, slot: int) -> None:
        self._holders[slot] = None
        heapq.heappush(self._free, slot)
        self._changed.add(slot)
        self._released.add(slot)

    def pages_changed(self, slot: int) -> None:
        self._changed.add(slot)

    def flush(self, assigned: set[int]) -> tuple[dict[int, tuple[int, ...]], tuple[int, ...]]:
        """(page_table_updates, freed_slots) for the next plan; forgets them.

        A released slot's row is sent as () (all null pages), so stale rows never point at pages
        that now belong to someone else. A slot released and reassigned within one plan is not
        reported as freed: its assignment and new row replace everything about it."""
        rows = {s: tuple(self._holders[s].pages) if self._holders[s] else ()
                for s in sorted(self._changed)}
        freed = tuple(sorted(self._released - assigned))
        self._changed.clear()
        self._released.clear()
        return rows, freed

    def check(self) -> None:
        occupied = {s for s, r in enumerate(self._holders) if r is not None}
        for s in occupied:
            if self._holders[s].slot != s:
                raise AssertionError(f"slot {s} holds a request that thinks it is elsewhere")
        if occupied & set(self._free) or len(occupied) + len(self._free) != len(self._holders):
            raise AssertionError("slots are not exactly occupied or free")

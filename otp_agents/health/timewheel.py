"""A timer wheel: many deadlines served by one task, with one wake-up per time slot.

The heartbeat and the memory sampler each watch every child on its own period. A task (and a
timer) per child would wake the event loop once per child per period; instead each keeps its
children here, by the slot their next deadline falls in, and wakes once for all the children of
a slot. Adding and taking out cost O(log slots), not a scan of every child.
"""

from __future__ import annotations

import heapq
import math
from typing import Generic, TypeVar

T = TypeVar("T")


class TimeWheel(Generic[T]):
    def __init__(self, slot: float) -> None:
        self.slot = slot
        self._slots: dict[int, list[T]] = {}
        self._order: list[int] = []  # heap of the keys of _slots

    def __len__(self) -> int:
        return sum(len(v) for v in self._slots.values())

    def add(self, item: T, when: float) -> float:
        """File ``item`` under the slot ``when`` falls in (rounded up); returns that slot's time.
        An infinite ``when`` (an interval of ``inf``) is never due: nothing is filed."""
        if not math.isfinite(when):
            return math.inf
        key = math.ceil(when / self.slot)
        bucket = self._slots.get(key)
        if bucket is None:
            self._slots[key] = [item]
            heapq.heappush(self._order, key)
        else:
            bucket.append(item)
        return key * self.slot

    def next_time(self) -> float:
        """When the earliest slot is due (``math.inf`` when empty)."""
        return self._order[0] * self.slot if self._order else math.inf

    def take_due(self, now: float) -> list[T]:
        """Remove and return every item filed in a slot at or before ``now``."""
        out: list[T] = []
        while self._order and self._order[0] * self.slot <= now:
            out.extend(self._slots.pop(heapq.heappop(self._order)))
        return out

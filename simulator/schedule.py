"""Deliveries of one link direction by due time: a FIFO while they come in order, a heap else.

Shared by the UDP proxy and the packet bridge.  Entries are tuples whose first two items
are (due time, sequence number): the sequence number breaks ties, so entries due at the
same time leave in arrival order and the rest of the tuple is never compared.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Any, Generic, TypeVar

E = TypeVar("E", bound=tuple[Any, ...])


class DueSchedule(Generic[E]):
    """An entry due no earlier than the FIFO's tail is appended (O(1)); only one that would
    overtake it goes into the heap.  With a fixed delay, or jitter on one in-order link,
    the heap stays empty.
    """

    __slots__ = ("fifo", "heap")

    def __init__(self) -> None:
        self.fifo: deque[E] = deque()
        self.heap: list[E] = []

    def __len__(self) -> int:
        return len(self.fifo) + len(self.heap)

    def push(self, entry: E) -> None:
        """Schedule ``entry`` at its due time ``entry[0]``."""
        fifo = self.fifo
        if not fifo or entry[0] >= fifo[-1][0]:
            fifo.append(entry)
        else:  # overtakes the FIFO's tail (reordering): only then pay for the heap
            heapq.heappush(self.heap, entry)

    def next_due(self) -> float:
        """The earliest due time (inf when empty)."""
        fifo, heap = self.fifo, self.heap
        first: float = fifo[0][0] if fifo else math.inf
        return min(first, heap[0][0]) if heap else first

    def pop_due(self, now: float, out: list[E]) -> None:
        """Move every entry due at or before ``now`` to ``out``, in due order."""
        fifo, heap = self.fifo, self.heap
        if not heap:
            while fifo and fifo[0][0] <= now:
                out.append(fifo.popleft())
            return
        while True:
            if fifo and fifo[0][0] <= now and (not heap or fifo[0][:2] < heap[0][:2]):
                out.append(fifo.popleft())
            elif heap and heap[0][0] <= now:
                out.append(heapq.heappop(heap))
            else:
                return

    def clear(self) -> int:
        """Forget every entry; returns how many there were."""
        n = len(self)
        self.fifo.clear()
        self.heap.clear()
        return n

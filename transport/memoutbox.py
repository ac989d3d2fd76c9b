"""An in-memory Outbox (the spool interface the edge session reads), for tests and simulations."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from transport.batchcodec import Record
from transport.wire import LANES


@dataclass(slots=True)
class _LaneQueue:
    seqs: list[int] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    accepted_at: list[float] = field(default_factory=list)
    acked: int = 0


class MemoryOutbox:
    """Records per lane in seq order; trimmed on ack. Not durable: a crash loses it."""

    def __init__(self) -> None:
        self._lanes = {int(lane): _LaneQueue() for lane in LANES}

    def add(self, lane: int, record: Record, now: float) -> None:
        """Accept a record (seq must exceed every earlier one)."""
        q = self._lanes[lane]
        q.seqs.append(record.seq)
        q.records.append(record)
        q.accepted_at.append(now)

    def acked_mark(self, lane: int) -> int:
        """Highest seq acknowledged by the hub in ``lane``."""
        return self._lanes[lane].acked

    def pending_info(self, lane: int, after: int) -> tuple[int, float | None]:
        """(count, oldest accept time) of records after ``after``."""
        q = self._lanes[lane]
        i = bisect.bisect_right(q.seqs, after)
        n = len(q.seqs) - i
        return n, (q.accepted_at[i] if n else None)

    def pending(self, lane: int, after: int, limit: int) -> list[Record]:
        """Records after ``after``, at most ``limit``."""
        q = self._lanes[lane]
        i = bisect.bisect_right(q.seqs, after)
        return q.records[i : i + limit]

    def acked(self, lane: int, upto: int) -> None:
        """Trim everything up to ``upto``."""
        q = self._lanes[lane]
        i = bisect.bisect_right(q.seqs, upto)
        del q.seqs[:i], q.records[:i], q.accepted_at[:i]
        q.acked = max(q.acked, upto)

    def depth(self, lane: int) -> int:
        """Records not yet acknowledged."""
        return len(self._lanes[lane].seqs)

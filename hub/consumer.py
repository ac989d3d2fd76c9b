"""What every durable consumer shares: a selection (subject pattern + filter) and a log cursor.

A durable consumer (archive, syslog forwarder, alert rules, a durable subscription)
reads the log after the last offset it committed, writes what matches its selection
to its sink, then commits the offset of the last entry it *read* (matching or not),
so a consumer with a narrow selection does not hold retention back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hub.filters import Filter, compile_filter
from hub.log import Log, LogEntry
from hub.subjects import match_pattern, validate_pattern
from transport.wire import Lane

_LANE_NAMES = {int(lane): lane.name.lower() for lane in Lane}


def lane_name(lane: int) -> str:
    """``critical``, ``telemetry`` or ``bulk`` (the number as text for an unknown lane)."""
    return _LANE_NAMES.get(lane, str(lane))


def entry_message(e: LogEntry) -> dict[str, Any]:
    """The mapping a filter sees for one log entry (keys as in ``hub.filters.FIELDS``)."""
    return {
        "subject": e.subject,
        "tenant": e.tenant,
        "device": e.device,
        "lane": lane_name(e.lane),
        "seq": e.seq,
        "ts": e.ts,
        "offset": e.offset,
        "attrs": e.attrs,
        "body": e.body,
    }


@dataclass(frozen=True, slots=True)
class Selection:
    """A subject pattern (NATS wildcards) and an optional compiled filter."""

    pattern: str = ">"
    filter: Filter | None = None

    @classmethod
    def parse(cls, pattern: str = ">", filter_text: str = "") -> Selection:
        """Check the pattern and compile the filter; SubjectError / FilterError if bad."""
        validate_pattern(pattern)
        return cls(pattern, compile_filter(filter_text) if filter_text.strip() else None)

    def matches(self, e: LogEntry) -> bool:
        """True when ``e``'s subject matches the pattern and the filter passes."""
        if self.pattern != ">" and not match_pattern(self.pattern, e.subject):
            return False
        return self.filter is None or self.filter.matches(entry_message(e))


def skipped_by_cause(want: int, first: int, entries: Sequence[LogEntry]) -> tuple[int, int]:
    """(removed by retention, in corrupt batches): the offsets a read that wanted ``want`` on
    passed over to get ``entries`` (non-empty, in offset order) from a log with contiguous
    offsets whose first stored offset was ``first``.  Retention removes from the front, so
    what lies below ``first`` is its; a gap from there on is a batch ``Log.read`` skipped
    because it no longer decodes."""
    retention = min(entries[0].offset - want, max(0, first - want))
    return retention, entries[-1].offset - want + 1 - len(entries) - retention


@dataclass(slots=True)
class CursorStats:
    """What a cursor read."""

    read: int = 0
    matched: int = 0
    skipped_by_retention: int = 0  # entries retention removed before this consumer read them
    skipped_corrupt: int = 0  # entries of stored batches that no longer decode (Log.read skips)


@dataclass(slots=True)
class LogCursor:
    """A durable consumer's place in the log, kept in the log's ``consumers`` table."""

    log: Log
    name: str
    selection: Selection = field(default_factory=Selection)
    stats: CursorStats = field(default_factory=CursorStats)

    @property
    def committed(self) -> int:
        """The last offset this consumer committed (0: none yet; offsets start at 1)."""
        return self.log.consumer_offset(self.name)

    def read(self, after: int, max_records: int) -> tuple[list[LogEntry], int]:
        """Matching entries after offset ``after``, and the last offset read (else ``after``)."""
        # the first offset as of the read: retention running between the two would make
        # the rows it removed look like a corrupt batch's
        first, entries = self.log.read_with_first(after + 1, max_records)
        start = max(after + 1, first)
        if not entries:
            return [], after
        # a JetStream log view's offsets are not contiguous: a gap there is neither
        if getattr(self.log, "contiguous", True):
            retention, corrupt = skipped_by_cause(after + 1, start, entries)
            self.stats.skipped_by_retention += retention
            self.stats.skipped_corrupt += corrupt
        self.stats.read += len(entries)
        matched = [e for e in entries if self.selection.matches(e)]
        self.stats.matched += len(matched)
        return matched, entries[-1].offset

    def commit(self, last_read: int) -> None:
        """Durably record that everything up to ``last_read`` is done."""
        self.log.commit_consumer_offset(self.name, last_read)

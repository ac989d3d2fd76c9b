"""What every durable consumer shares: a selection (subject pattern + filter) and a log cursor.

A durable consumer (archive, syslog forwarder, alert rules, a durable subscription)
reads the log after the last offset it committed, writes what matches its selection
to its sink, then commits the offset of the last entry it *read* (matching or not),
so a consumer with a narrow selection does not hold retention back.
"""

from __future__ import annotations

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
        start = max(after + 1, self.log.first_offset())
        entries = self.log.read(start, max_records)
        if not entries:
            return [], after
        # A JetStream log view's offsets are not contiguous: a gap there is neither.  In the
        # SQLite log, retention removes from the front, so only what lies before its first
        # offset is retention's; a gap from there on is a batch the log skipped as corrupt.
        if getattr(self.log, "contiguous", True):
            self.stats.skipped_by_retention += start - after - 1
            gaps, prev = 0, start - 1
            for e in entries:
                gaps += e.offset - prev - 1
                prev = e.offset
            self.stats.skipped_corrupt += gaps
        self.stats.read += len(entries)
        matched = [e for e in entries if self.selection.matches(e)]
        self.stats.matched += len(matched)
        return matched, entries[-1].offset

    def commit(self, last_read: int) -> None:
        """Durably record that everything up to ``last_read`` is done."""
        self.log.commit_consumer_offset(self.name, last_read)

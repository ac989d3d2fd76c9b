"""A durable consumer that archives the log as JSON lines, one file per tenant, exactly once.

Each line carries its log offset.  The consumer appends, flushes and fsyncs a chunk, then
commits its offset in the log.  If it dies between the two, the next start reads the last
offset already in each file and skips what is there: a line is never written twice and
never skipped.  Files rotate by size; rotated files keep their offsets.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from hub.log import Log, LogEntry

_TAIL_BYTES = 1 << 16


@dataclass(slots=True)
class ArchiveStats:
    """What the archive consumer did."""

    written: int = 0
    skipped_present: int = 0  # lines found already written after a crash
    rotations: int = 0


class JsonArchive:
    """Reads the log from its committed offset and appends JSON lines per tenant."""

    def __init__(
        self,
        log: Log,
        directory: str | Path,
        *,
        name: str = "archive",
        rotate_bytes: int = 64 << 20,
    ):
        self.log = log
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.rotate_bytes = rotate_bytes
        self.stats = ArchiveStats()
        self._files: dict[str, TextIO] = {}
        self._last_written: dict[str, int] = {}

    def path_for(self, tenant: str) -> Path:
        """The current archive file of ``tenant``."""
        return self.dir / f"{tenant}.jsonl"

    def _last_offset_in(self, tenant: str) -> int:
        if tenant not in self._last_written:
            self._last_written[tenant] = _last_offset(self.path_for(tenant))
        return self._last_written[tenant]

    def _file(self, tenant: str) -> TextIO:
        f = self._files.get(tenant)
        if f is None:
            f = self._files[tenant] = self.path_for(tenant).open("a", encoding="utf-8")
        return f

    def poll(self, max_records: int = 5000) -> int:
        """Archive what the log has beyond the committed offset; returns records written."""
        start = self.log.consumer_offset(self.name) + 1
        start = max(start, self.log.first_offset())
        entries = self.log.read(start, max_records)
        if not entries:
            return 0
        touched: set[str] = set()
        written = 0
        for e in entries:
            if e.offset <= self._last_offset_in(e.tenant):
                self.stats.skipped_present += 1
                continue
            self._file(e.tenant).write(json.dumps(entry_json(e), separators=(",", ":")) + "\n")
            self._last_written[e.tenant] = e.offset
            touched.add(e.tenant)
            written += 1
        for tenant in touched:
            f = self._files[tenant]
            f.flush()
            os.fsync(f.fileno())
            self._maybe_rotate(tenant)
        self.log.commit_consumer_offset(self.name, entries[-1].offset)
        self.stats.written += written
        return written

    def _maybe_rotate(self, tenant: str) -> None:
        path = self.path_for(tenant)
        if path.stat().st_size < self.rotate_bytes:
            return
        self._files.pop(tenant).close()
        n = 1
        while path.with_suffix(f".{n}.jsonl").exists():
            n += 1
        path.rename(path.with_suffix(f".{n}.jsonl"))
        # the new file is empty: remember the last offset so nothing is rewritten
        (self.dir / f"{tenant}.last").write_text(str(self._last_written[tenant]))
        self.stats.rotations += 1

    def close(self) -> None:
        """Close the files."""
        for f in self._files.values():
            f.close()
        self._files.clear()


def entry_json(e: LogEntry) -> dict[str, Any]:
    """The archive form of one log entry."""
    body: Any = e.body
    if isinstance(body, bytes):
        body = {"base64": base64.b64encode(body).decode()}
    return {
        "offset": e.offset,
        "tenant": e.tenant,
        "device": e.device,
        "incarnation": e.incarnation,
        "seq": e.seq,
        "lane": e.lane,
        "subject": e.subject,
        "ts_us": e.ts,
        "received_us": e.received_us,
        "attrs": e.attrs,
        "body": body,
    }


def _last_offset(path: Path) -> int:
    """The offset of the last complete line of ``path`` (or of the rotation marker)."""
    marker = path.with_suffix(".last")
    best = int(marker.read_text()) if marker.exists() else 0
    if not path.exists():
        return best
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - _TAIL_BYTES))
        tail = f.read()
    lines = tail.split(b"\n")
    if tail and not tail.endswith(b"\n"):
        # a torn last line from a crash: cut it off so it is written again whole
        with path.open("r+b") as f:
            f.truncate(size - len(lines[-1]))
        lines = lines[:-1]
    for line in reversed(lines):
        if line.strip():
            try:
                return max(best, int(json.loads(line)["offset"]))
            except (ValueError, KeyError):
                continue
    return best

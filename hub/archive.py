"""A durable consumer that archives the log as JSON lines, one file per tenant, exactly once.

Each line carries its log offset.  The consumer appends, flushes and fsyncs a chunk, then
commits its offset in the log.  If it dies between the two, the next start reads the last
offset already in each file and skips what is there: a line is never written twice and
never skipped.

Rotation, by size (``rotate_bytes``) and by age (``rotate_age_s``, counted from the
first line written to the current file, on the injected clock ``now``): the current
file ``<tenant>.jsonl`` becomes ``<tenant>.<n>.jsonl`` (n = 1, 2, ...), lines keep their
offsets.  Crash safety: before the rename, ``<tenant>.last`` is written (atomically,
fsynced) with the last offset of the file; after a crash anywhere in between, the last
offset written is the larger of the marker and the current file's last line, so
nothing is rewritten.  ``<tenant>.since`` holds the time the current file was started,
so age survives restarts; it is written before the file's first line.  An idle file
past its age is rotated on the next poll even if nothing new arrived.

A selection (subject pattern + filter) archives a subset; the committed offset is the
last entry *read*, so entries it skips do not hold log retention back.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from hub.consumer import LogCursor, Selection
from hub.filters import FilterError
from hub.log import Log, LogEntry
from hub.subjects import SubjectError

_TAIL_BYTES = 1 << 16
_SUFFIX = ".jsonl"


@dataclass(slots=True)
class ArchiveSettings:
    """One JSON-lines archive in hub.yaml."""

    name: str = "archive"  # durable consumer name (its offset in the log)
    directory: str = "archive"
    subject: str = ">"  # subject pattern (NATS wildcards)
    filter: str = ""  # filter expression; empty: everything the pattern matches
    rotate_bytes: int = 64 << 20  # rotate the current file once it is at least this big
    rotate_age_s: float = 0.0  # rotate once its first line is this old; 0: never by age

    def validate(self) -> None:
        """Raise ValueError naming the first impossible value."""
        try:
            Selection.parse(self.subject, self.filter)
        except (SubjectError, FilterError) as exc:
            raise ValueError(str(exc)) from exc
        if self.rotate_bytes < 1:
            raise ValueError("rotate_bytes must be positive")
        if self.rotate_age_s < 0:
            raise ValueError("rotate_age_s must not be negative (0: no rotation by age)")
        if not self.name or not self.directory:
            raise ValueError("name and directory must not be empty")


@dataclass(slots=True)
class ArchiveStats:
    """What the archive consumer did."""

    written: int = 0
    skipped_present: int = 0  # lines found already written after a crash
    rotations: int = 0  # by size and by age
    rotations_by_age: int = 0


class JsonArchive:
    """Reads the log from its committed offset and appends JSON lines per tenant."""

    def __init__(
        self,
        log: Log,
        directory: str | Path,
        *,
        name: str = "archive",
        rotate_bytes: int = 64 << 20,
        rotate_age_s: float = 0.0,
        selection: Selection | None = None,
        now: Callable[[], float] = time.time,
    ):
        self.log = log
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.rotate_bytes = rotate_bytes
        self.rotate_age_s = rotate_age_s
        self.cursor = LogCursor(log, name, selection or Selection())
        self.stats = ArchiveStats()
        self._now = now
        self._files: dict[str, TextIO] = {}
        self._last_written: dict[str, int] = {}
        self._since: dict[str, float] = self._load_since()
        self._next_index: dict[str, int] = {}

    @classmethod
    def from_settings(
        cls, log: Log, settings: ArchiveSettings, *, now: Callable[[], float] = time.time
    ) -> JsonArchive:
        """An archive configured by a settings block."""
        settings.validate()
        return cls(
            log,
            settings.directory,
            name=settings.name,
            rotate_bytes=settings.rotate_bytes,
            rotate_age_s=settings.rotate_age_s,
            selection=Selection.parse(settings.subject, settings.filter),
            now=now,
        )

    def path_for(self, tenant: str) -> Path:
        """The current archive file of ``tenant``."""
        return self.dir / f"{tenant}{_SUFFIX}"

    def poll(self, max_records: int = 5000) -> int:
        """Archive what the log has beyond the committed offset; returns records written."""
        committed = self.cursor.committed
        entries, last_read = self.cursor.read(committed, max_records)
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
            if os.fstat(f.fileno()).st_size >= self.rotate_bytes:
                self._rotate(tenant)
        self._rotate_aged()
        if last_read > committed:
            self.cursor.commit(last_read)
        self.stats.written += written
        return written

    def close(self) -> None:
        """Close the files."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    # -- files ---------------------------------------------------------------------------

    def _last_offset_in(self, tenant: str) -> int:
        if tenant not in self._last_written:
            self._last_written[tenant] = _last_offset(self.path_for(tenant))
        return self._last_written[tenant]

    def _file(self, tenant: str) -> TextIO:
        f = self._files.get(tenant)
        if f is None:
            path = self.path_for(tenant)
            if tenant not in self._since or not _has_data(path):
                # the age of a file starts with its first line; recorded before it
                self._since[tenant] = self._now()
                _write_atomic(self._since_path(tenant), repr(self._since[tenant]))
            f = self._files[tenant] = path.open("a", encoding="utf-8")
        return f

    def _since_path(self, tenant: str) -> Path:
        return self.dir / f"{tenant}.since"

    def _load_since(self) -> dict[str, float]:
        """Start times of the current files left by an earlier run (now, if unknown)."""
        since: dict[str, float] = {}
        for path in self.dir.glob(f"*{_SUFFIX}"):
            tenant = path.name[: -len(_SUFFIX)]
            if not path.is_file() or not _has_data(path) or "." in tenant:
                continue  # "." in the stem: a rotated file (tenants are subject tokens)
            marker = self._since_path(tenant)
            try:
                since[tenant] = float(marker.read_text())
            except (OSError, ValueError):
                since[tenant] = self._now()  # an archive from before age rotation
                _write_atomic(marker, repr(since[tenant]))
        return since

    def _rotate_aged(self) -> None:
        if self.rotate_age_s <= 0:
            return
        now = self._now()
        for tenant, since in sorted(self._since.items()):
            if now - since >= self.rotate_age_s:
                self._rotate(tenant)
                self.stats.rotations_by_age += 1

    def _rotate(self, tenant: str) -> None:
        """Close the current file and rename it ``<tenant>.<n>.jsonl``; the marker goes first."""
        path = self.path_for(tenant)
        f = self._files.pop(tenant, None)
        if f is not None:
            f.close()
        self._since.pop(tenant, None)
        if not _has_data(path):
            return
        # the new file is empty: remember the last offset so nothing is rewritten
        last = max(self._last_offset_in(tenant), _last_offset(path))
        _write_atomic(self.dir / f"{tenant}.last", str(last))
        path.rename(self._rotated_path(tenant))
        self._since_path(tenant).unlink(missing_ok=True)
        _fsync_dir(self.dir)
        self.stats.rotations += 1

    def _rotated_path(self, tenant: str) -> Path:
        n = self._next_index.get(tenant, 1)
        while (self.dir / f"{tenant}.{n}{_SUFFIX}").exists():
            n += 1
        self._next_index[tenant] = n + 1
        return self.dir / f"{tenant}.{n}{_SUFFIX}"


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


def _has_data(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old or the new content."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` durable (a power cut, not just a killed process)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


__all__ = ["ArchiveSettings", "ArchiveStats", "JsonArchive", "entry_json"]

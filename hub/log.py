"""The hub's durable log: committed batches, dedup marks and consumer offsets in one SQLite file.

Storage is one row per *batch*, not per record, so ingest costs a row insert per
batch and the payload is stored as it came off the wire (re-encoded only when the
session had to trim duplicates out of it).  A record's log offset is its batch's
``base_offset`` plus its index in the batch; offsets start at 1, are strictly
increasing and never reused (``next_offset`` lives in ``meta`` and moves in the same
transaction as the rows).

The dedup and order state of every (tenant, device, incarnation, lane) -- the
highest committed seq -- is written in the same transaction as the batches, so
after a crash the marks ``load_ledgers`` returns are exactly what the log holds.
Marks are bounded: per device only the ``max_incarnations_per_device`` most recently
committed incarnations are remembered.  A device that flaps through more incarnations
than that and later replays a forgotten one (a restored spool) has those very old
records stored again.

Durability: WAL journal.  ``synchronous="normal"`` survives a killed process
(SIGKILL) but a power cut may lose the last commits; ``"full"`` fsyncs every commit.

Incarnation 0 is reserved for records the hub publishes itself (``append_local``:
presence).  The hub must refuse a device HELLO with incarnation 0; otherwise that
device's telemetry lane would share its seq space with the hub's records.

Thread safety: one connection guarded by one lock; any thread may call, one at a time.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from hub.subjects import SubjectError, validate_subject
from transport.batchcodec import Body, Record, Scalar, decode_batch, encode_batch
from transport.errors import NotReadyError, ProtocolError, SquallError
from transport.events import BatchAccepted
from transport.session import DeviceLedger, LaneLedger
from transport.wire import Lane

_log = logging.getLogger("squall.hub.log")

SCHEMA_VERSION = 1
LOCAL_INCARNATION = 0  # reserved for hub-published records (presence)
LOCAL_LANE = int(Lane.TELEMETRY)
MAX_CORRUPT_REPORTED = 1024  # undecodable rows reported and counted one by one per Log
DEFAULT_MAX_INCARNATIONS = 4  # per device; the least recently committed beyond it are forgotten
RETENTION_MAX_ROWS = 10_000  # batches one apply_retention call removes at most (bounded pause)
JOURNAL_SIZE_LIMIT = 64 << 20  # the WAL file is truncated back to this after a checkpoint

Synchronous = Literal["full", "normal"]
DeviceKey = tuple[str, str]  # (tenant, device)

_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    base_offset INTEGER PRIMARY KEY,
    count INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    incarnation INTEGER NOT NULL,
    lane INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    received_us INTEGER NOT NULL,
    codec INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS marks (
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    incarnation INTEGER NOT NULL,
    lane INTEGER NOT NULL,
    committed_seq INTEGER NOT NULL,
    updated_us INTEGER NOT NULL,
    PRIMARY KEY (tenant, device, incarnation, lane)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS consumers (
    name TEXT PRIMARY KEY,
    committed_offset INTEGER NOT NULL
) WITHOUT ROWID;
"""
# ``payload`` is the last column on purpose: SQLite reads columns in order, and a
# column stored after a large blob sits in its overflow pages; retention scans read
# only the small columns in front of it.

_INSERT_BATCH = "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_UPSERT_MARK = """
INSERT INTO marks VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (tenant, device, incarnation, lane)
DO UPDATE SET committed_seq = excluded.committed_seq, updated_us = excluded.updated_us
"""
_STALE_INCARNATIONS = """
SELECT incarnation FROM marks
WHERE tenant = ? AND device = ? AND incarnation NOT IN (?, ?)
GROUP BY incarnation ORDER BY max(updated_us) DESC, incarnation DESC LIMIT -1 OFFSET ?
"""
_FIRST_OFFSET = "SELECT min(base_offset) FROM batches"
_READ_FROM = """
SELECT base_offset, count, tenant, device, incarnation, lane, first_seq, received_us, codec,
       payload
FROM batches
WHERE base_offset >= coalesce((SELECT max(base_offset) FROM batches WHERE base_offset <= ?), 0)
ORDER BY base_offset
"""
_META_KEYS = ("next_offset", "rows", "records", "bytes")


class LogError(SquallError):
    """The durable log failed (SQLite error, corrupt content, misuse); nothing was half-written."""


@dataclass(frozen=True, slots=True)
class PendingBatch:
    """One batch waiting for the group commit.

    Either ``payload`` holds the batch as received (validated; stored as is, and
    ``records`` may be None), or ``payload`` is None and ``records`` are encoded here.
    """

    tenant: str
    device: str
    incarnation: int
    lane: int
    records: list[Record] | None  # strictly increasing seq, not empty, when given
    codec: int
    payload: bytes | None  # as received, or None when the session trimmed the batch
    received_us: int
    first_seq: int = 0  # derived from records when 0
    last_seq: int = 0
    count: int = 0

    def __post_init__(self) -> None:
        if self.count == 0 and self.records:
            object.__setattr__(self, "first_seq", self.records[0].seq)
            object.__setattr__(self, "last_seq", self.records[-1].seq)
            object.__setattr__(self, "count", len(self.records))

    def decoded(self) -> list[Record]:
        """The records (decoding the payload if they were not given)."""
        if self.records is not None:
            return self.records
        assert self.payload is not None
        return decode_batch(self.codec, self.payload, self.first_seq, self.count)

    @classmethod
    def from_accepted(
        cls, tenant: str, device: str, event: BatchAccepted, received_us: int
    ) -> PendingBatch:
        """The pending form of a session's ``BatchAccepted`` event."""
        return cls(
            tenant,
            device,
            event.incarnation,
            event.lane,
            event.records,
            event.codec,
            event.payload,
            received_us,
            event.first_seq,
            event.last_seq,
            event.count,
        )


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One record as consumers read it back, with its log offset and hub-side fields."""

    offset: int
    tenant: str
    device: str
    incarnation: int
    lane: int
    seq: int
    ts: int
    subject: str
    attrs: dict[str, Scalar]
    body: Body
    received_us: int


@dataclass(frozen=True, slots=True)
class LogStats:
    """Totals stored now (rows, records, bytes) and counters since this Log was opened."""

    rows: int
    records: int
    bytes: int  # payload bytes stored (the file is larger: row headers, free pages, WAL)
    next_offset: int
    commits: int
    commit_failures: int
    duplicates_skipped: int  # records a group held that the marks said were already stored
    incarnations_dropped: int  # (device, incarnation) marks forgotten past the per-device bound
    retention_rows_removed: int
    retention_records_removed: int
    retention_blocked: int  # retention calls that stopped at protect_from with work left
    dropped_unconsumed: int  # records at/after protect_from deleted by the hard size limit
    repaired_on_open: int  # 1 when next_offset in meta was behind the stored batches
    corrupt_batches: int  # stored batches that failed to decode on read: skipped by readers
    corrupt_records: int  # the records they held


@dataclass(slots=True)
class _Totals:
    """What ``meta`` holds besides the schema version; copied, changed, then adopted on commit."""

    next_offset: int = 1
    rows: int = 0
    records: int = 0
    bytes: int = 0

    def copy(self) -> _Totals:
        return _Totals(self.next_offset, self.rows, self.records, self.bytes)


@dataclass(slots=True)
class _Counters:
    commits: int = 0
    commit_failures: int = 0
    duplicates_skipped: int = 0
    incarnations_dropped: int = 0
    retention_rows_removed: int = 0
    retention_records_removed: int = 0
    retention_blocked: int = 0
    dropped_unconsumed: int = 0
    repaired_on_open: int = 0
    corrupt_batches: int = 0
    corrupt_records: int = 0


@dataclass(slots=True)
class _GroupState:
    """Scratch state of one group commit."""

    totals: _Totals
    marks: dict[tuple[str, str, int, int], int] = field(default_factory=dict)
    changed: set[tuple[str, str, int, int]] = field(default_factory=set)
    seen: set[tuple[str, str, int]] = field(default_factory=set)
    unknown: set[tuple[str, str, int]] = field(default_factory=set)  # device incarnations w/o marks
    rows: list[tuple[object, ...]] = field(default_factory=list)
    duplicates: int = 0
    dropped: list[tuple[str, str, int]] = field(default_factory=list)  # marks deleted (bound)


def _i64(u: int) -> int:
    """u64 (seq, incarnation) as the signed 64-bit integer SQLite stores."""
    return u - _U64 if u > _I64_MAX else u


def _u64(i: int) -> int:
    """Back from SQLite's signed 64-bit storage to u64."""
    return i + _U64 if i < 0 else i


class Log:
    """The hub's durable log (one SQLite file in WAL mode)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "normal",
        retention_max_age_s: float | None = None,
        retention_max_bytes: int | None = None,
        retention_hard_max_bytes: int | None = None,
        max_incarnations_per_device: int = DEFAULT_MAX_INCARNATIONS,
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise LogError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        if max_incarnations_per_device < 1:
            raise LogError("max_incarnations_per_device must be at least 1")
        soft, hard = retention_max_bytes, retention_hard_max_bytes
        if soft is not None and hard is not None and hard < soft:
            raise LogError("retention_hard_max_bytes must not be below retention_max_bytes")
        self.path = os.fspath(path)
        self.retention_max_age_s = retention_max_age_s
        self.retention_max_bytes = retention_max_bytes
        self.retention_hard_max_bytes = retention_hard_max_bytes
        self.max_incarnations_per_device = max_incarnations_per_device
        self._lock = threading.Lock()
        self._totals = _Totals()
        self._counters = _Counters()
        # The marks of the device incarnations this Log has read or committed: a copy of
        # rows of ``marks``, so a group commit needs no SELECT per device.  It is dropped
        # whenever another connection has written the file (PRAGMA data_version), and its
        # entries go with the rows (the per-device bound), so it is never larger than the
        # table -- about what the hub's ledgers hold in memory anyway.
        self._marks: dict[tuple[str, str, int], dict[int, int]] = {}
        self._corrupt_seen: set[int] = set()  # base offsets of undecodable rows reported
        self._corrupt_overflow = False
        self._data_version: int | None = None
        self._db: sqlite3.Connection | None = None
        try:
            # a fresh install's config points into a folder that does not exist yet
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._configure(self._db, synchronous)
            self._db.executescript(_SCHEMA)
            self._load_meta(self._db)
        except (sqlite3.Error, LogError, OSError) as exc:
            self.close()
            if isinstance(exc, LogError):
                raise
            raise LogError(f"cannot open log {self.path}: {exc}") from exc

    # -- opening ------------------------------------------------------------

    @staticmethod
    def _configure(db: sqlite3.Connection, synchronous: Synchronous) -> None:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode}, WAL is required")
        db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")

    def _load_meta(self, db: sqlite3.Connection) -> None:
        """Read or create ``meta``; repair ``next_offset`` if it is behind the stored batches."""
        with self._transaction(db):
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                meta = {"schema": SCHEMA_VERSION, **dict.fromkeys(_META_KEYS, 0), "next_offset": 1}
                db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            if meta.get("schema") != SCHEMA_VERSION:
                raise LogError(
                    f"{self.path}: schema {meta.get('schema')}, expected {SCHEMA_VERSION}"
                )
            if missing := set(_META_KEYS) - meta.keys():
                raise LogError(f"{self.path}: meta lacks {sorted(missing)}")
            self._totals = _Totals(*(int(meta[k]) for k in _META_KEYS))
            row = db.execute(
                "SELECT base_offset + count FROM batches ORDER BY base_offset DESC LIMIT 1"
            ).fetchone()
            if row is not None and row[0] > self._totals.next_offset:
                # Cannot happen through this class (same transaction); never reuse an offset.
                self._totals = self._recount(db, next_offset=int(row[0]))
                self._write_totals(db, self._totals)
                self._counters.repaired_on_open = 1

    @staticmethod
    def _recount(db: sqlite3.Connection, next_offset: int) -> _Totals:
        rows, records, nbytes = db.execute(
            "SELECT count(*), coalesce(sum(count), 0), coalesce(sum(bytes), 0) FROM batches"
        ).fetchone()
        return _Totals(next_offset, int(rows), int(records), int(nbytes))

    # -- plumbing -------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise NotReadyError(f"log {self.path} is closed")
        return self._db

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        """Run a read under the lock; SQLite errors surface as LogError."""
        with self._lock:
            db = self._conn()
            try:
                return db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise LogError(f"log {self.path}: {exc}") from exc

    @contextmanager
    def _transaction(self, db: sqlite3.Connection) -> Iterator[None]:
        """BEGIN IMMEDIATE .. COMMIT; any failure rolls back and surfaces as LogError."""
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                with suppress(sqlite3.Error):  # SQLite may have rolled back already (disk full)
                    db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error | OverflowError | ProtocolError):
                raise LogError(f"log {self.path}: {exc}") from exc
            raise

    @staticmethod
    def _write_totals(db: sqlite3.Connection, t: _Totals) -> None:
        db.executemany(
            "UPDATE meta SET value = ? WHERE key = ?",
            ((getattr(t, key), key) for key in _META_KEYS),
        )

    def close(self) -> None:
        """Checkpoint the WAL and close; later calls raise NotReadyError."""
        with self._lock:
            db, self._db = self._db, None
        if db is None:
            return
        try:
            with suppress(sqlite3.Error):  # the data is safe in the WAL either way
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------

    def append_group(self, items: Sequence[PendingBatch], now: float) -> list[tuple[int, int]]:
        """Store many devices' batches and their marks in ONE transaction; (base, count) each.

        A batch whose records the marks already hold is skipped (count 0) or trimmed
        (count smaller than ``len(records)``).  On failure nothing is stored and
        LogError is raised.
        """
        ready = [self._encoded(item) for item in items]  # outside the lock: ~10 us a record
        with self._lock:
            return self._commit_group(lambda: ready, now)

    @staticmethod
    def _encoded(item: PendingBatch) -> PendingBatch:
        if item.payload is not None or not item.records:
            return item
        try:
            codec, payload = encode_batch(item.records)
        except ProtocolError as exc:
            raise LogError(f"cannot encode a batch of {item.tenant}/{item.device}: {exc}") from exc
        return replace(item, codec=codec, payload=payload)

    def append_local(
        self,
        tenant: str,
        device: str,
        subject: str,
        body: Body,
        attrs: Mapping[str, Scalar],
        now: float,
    ) -> int:
        """Store one hub-published record (incarnation 0, telemetry lane, next local seq).

        ``subject`` is the full subject and must lie under ``<tenant>.<device>.``;
        returns the record's offset.
        """
        validate_subject(subject)
        prefix = f"{tenant}.{device}."
        if not subject.startswith(prefix):
            raise SubjectError(subject, f"a hub record for {tenant}/{device} must start {prefix}")
        now_us = int(now * 1e6)

        def build() -> list[PendingBatch]:
            db = self._conn()
            seq = self._committed_seq(db, (tenant, device, LOCAL_INCARNATION, LOCAL_LANE)) + 1
            record = Record(seq, now_us, subject, dict(attrs), body)
            codec, payload = encode_batch([record], compress=False)  # zstd only adds bytes here
            return [
                PendingBatch(
                    tenant, device, LOCAL_INCARNATION, LOCAL_LANE, [record], codec, payload, now_us
                )
            ]

        with self._lock:
            ((base, _),) = self._commit_group(build, now)
        return base

    def _commit_group(
        self, build: Callable[[], list[PendingBatch]], now: float
    ) -> list[tuple[int, int]]:
        db = self._conn()
        try:
            with self._transaction(db):
                self._check_marks_cache(db)
                state = _GroupState(self._totals.copy())
                result = [self._stage(db, state, item) for item in build()]
                self._flush_group(db, state, int(now * 1e6))
        except LogError:
            self._counters.commit_failures += 1
            self._marks.clear()
            raise
        self._totals = state.totals
        for tenant, device, inc, lane in state.changed:
            key = (tenant, device, inc)
            self._marks.setdefault(key, {})[lane] = state.marks[(*key, lane)]
        for key in state.dropped:
            self._marks.pop(key, None)
        self._counters.commits += 1
        self._counters.duplicates_skipped += state.duplicates
        self._counters.incarnations_dropped += len(state.dropped)
        return result

    def _check_marks_cache(self, db: sqlite3.Connection) -> None:
        """Forget the cached marks if another connection committed since the last group.

        Run inside the write transaction: nobody else can commit until it ends.
        """
        ((version,),) = db.execute("PRAGMA data_version").fetchall()
        if version != self._data_version:
            self._marks.clear()
            self._data_version = version

    def _stage(
        self, db: sqlite3.Connection, state: _GroupState, item: PendingBatch
    ) -> tuple[int, int]:
        """Check one batch against the marks and queue its row; (base_offset, stored count)."""
        inc_key = (item.tenant, item.device, item.incarnation)
        if inc_key not in state.seen:
            state.seen.add(inc_key)
            held = self._marks.get(inc_key)
            if held is None:
                held = self._marks_of(db, inc_key)
                if held:
                    self._marks[inc_key] = held
            if not held and item.incarnation != LOCAL_INCARNATION:
                state.unknown.add(inc_key)
            for lane, seq in held.items():
                state.marks[(*inc_key, lane)] = seq
        mark_key = (*inc_key, item.lane)
        mark = state.marks.get(mark_key, 0)
        codec, payload = item.codec, item.payload
        first, last, count = item.first_seq, item.last_seq, item.count
        base = state.totals.next_offset
        if count == 0 or last <= mark:
            state.duplicates += count
            return base, 0
        if first <= mark:  # the session should have trimmed; the log still refuses twice
            fresh = [r for r in item.decoded() if r.seq > mark]
            state.duplicates += count - len(fresh)
            codec, payload = encode_batch(fresh)
            first, count = fresh[0].seq, len(fresh)
        if payload is None:
            codec, payload = encode_batch(item.decoded())
        state.rows.append(
            (
                base,
                count,
                item.tenant,
                item.device,
                _i64(item.incarnation),
                item.lane,
                _i64(first),
                _i64(last),
                item.received_us,
                codec,
                len(payload),
                payload,
            )
        )
        state.marks[mark_key] = last
        state.changed.add(mark_key)
        t = state.totals
        t.next_offset += count
        t.rows += 1
        t.records += count
        t.bytes += len(payload)
        return base, count

    def _flush_group(self, db: sqlite3.Connection, state: _GroupState, now_us: int) -> None:
        db.executemany(_INSERT_BATCH, state.rows)
        db.executemany(
            _UPSERT_MARK,
            (
                (t, d, _i64(inc), lane, _i64(state.marks[(t, d, inc, lane)]), now_us)
                for t, d, inc, lane in state.changed
            ),
        )
        started = state.unknown & {(t, d, inc) for t, d, inc, _ in state.changed}
        for tenant, device, incarnation in sorted(started):
            for stale in self._bound_incarnations(db, tenant, device, incarnation):
                state.dropped.append((tenant, device, stale))
        self._write_totals(db, state.totals)

    def _bound_incarnations(
        self, db: sqlite3.Connection, tenant: str, device: str, keep: int
    ) -> list[int]:
        """Forget the least recently committed incarnations of a device beyond the bound.

        A device that starts more than ``max_incarnations_per_device`` incarnations
        and then replays an old, forgotten one (a restored spool) gets those records
        stored again: its marks are gone.  Returns the incarnations forgotten.
        """
        stale = db.execute(
            _STALE_INCARNATIONS,
            (tenant, device, _i64(keep), LOCAL_INCARNATION, self.max_incarnations_per_device - 1),
        ).fetchall()
        db.executemany(
            "DELETE FROM marks WHERE tenant = ? AND device = ? AND incarnation = ?",
            ((tenant, device, inc) for (inc,) in stale),
        )
        return [_u64(inc) for (inc,) in stale]

    @staticmethod
    def _marks_of(db: sqlite3.Connection, key: tuple[str, str, int]) -> dict[int, int]:
        rows = db.execute(
            "SELECT lane, committed_seq FROM marks "
            "WHERE tenant = ? AND device = ? AND incarnation = ?",
            (key[0], key[1], _i64(key[2])),
        ).fetchall()
        return {int(lane): _u64(seq) for lane, seq in rows}

    @staticmethod
    def _committed_seq(db: sqlite3.Connection, key: tuple[str, str, int, int]) -> int:
        row = db.execute(
            "SELECT committed_seq FROM marks "
            "WHERE tenant = ? AND device = ? AND incarnation = ? AND lane = ?",
            (key[0], key[1], _i64(key[2]), key[3]),
        ).fetchone()
        return 0 if row is None else _u64(row[0])

    # -- dedup state ------------------------------------------------------------

    def load_ledger(self, tenant: str, device: str, incarnation: int) -> DeviceLedger | None:
        """One device incarnation's ledger from its marks (None: the log has none)."""
        if incarnation == LOCAL_INCARNATION:
            return None
        with self._lock:
            try:
                marks = self._marks_of(self._conn(), (tenant, device, incarnation))
            except sqlite3.Error as exc:
                raise LogError(f"log {self.path}: {exc}") from exc
        if not marks:
            return None
        ledger = DeviceLedger(incarnation)
        for lane, committed in marks.items():
            ledger.lanes[lane] = LaneLedger(accepted=committed, committed=committed)
        return ledger

    def load_ledgers(self) -> dict[DeviceKey, dict[int, DeviceLedger]]:
        """Ledgers of every remembered (device, incarnation): accepted = committed = stored mark.

        Hub-published records (incarnation 0) are not a device's ledger and are left out.
        """
        rows = self._query(
            "SELECT tenant, device, incarnation, lane, committed_seq FROM marks "
            "WHERE incarnation != ?",
            (LOCAL_INCARNATION,),
        )
        out: dict[DeviceKey, dict[int, DeviceLedger]] = {}
        for tenant, device, inc, lane, seq in rows:
            incarnation = _u64(inc)
            per_device = out.setdefault((tenant, device), {})
            ledger = per_device.get(incarnation)
            if ledger is None:
                ledger = per_device[incarnation] = DeviceLedger(incarnation)
            committed = _u64(seq)
            ledger.lanes[int(lane)] = LaneLedger(accepted=committed, committed=committed)
        return out

    # -- reading ------------------------------------------------------------------

    def read(self, from_offset: int, max_records: int) -> list[LogEntry]:
        """Up to ``max_records`` records from ``from_offset`` on, in offset order.

        Records retention removed are skipped: the first entry's offset tells a
        consumer that it fell behind ``first_offset()``.
        """
        return self._read(from_offset, max_records, with_first=False)[1]

    def read_with_first(self, from_offset: int, max_records: int) -> tuple[int, list[LogEntry]]:
        """``first_offset()`` and ``read(from_offset, max_records)`` as of one moment.

        A reader tells retention's gaps (below the first offset) from a corrupt batch's
        (above it); asked one after the other, retention could run in between and its
        rows pass for corrupt ones.  Here both are read under the lock retention takes.
        (Past a corrupt batch the read goes on in a second query; only a retention that
        removed everything up to there in between could blur that, and the count of
        skipped offsets stays right either way.)
        """
        first, entries = self._read(from_offset, max_records, with_first=True)
        assert first is not None
        return first, entries

    def _read(
        self, from_offset: int, max_records: int, *, with_first: bool
    ) -> tuple[int | None, list[LogEntry]]:
        out: list[LogEntry] = []
        if max_records < 1:
            return (self.first_offset() if with_first else None), out
        start = from_offset
        first: int | None = None
        ask_first = with_first  # with the first fetch only: the snapshot that counts
        while len(out) < max_records:
            seen, rows = self._fetch(start, max_records - len(out), ask_first)
            if ask_first:
                first, ask_first = seen, False
            clean = True
            for row in rows:
                clean = self._decode_row(row, start, max_records, out) and clean
            if clean or not rows:
                break
            start = rows[-1][0] + rows[-1][1]  # a row was corrupt: read on past it
        return first, out

    def _fetch(
        self, from_offset: int, max_records: int, with_first: bool = False
    ) -> tuple[int | None, list[tuple[Any, ...]]]:
        """The rows holding ``max_records`` records from ``from_offset`` on, and with
        ``with_first`` the log's first offset, both in one read transaction (one snapshot,
        whoever else deletes: this process holds the lock, another process's retention
        commits before or after it)."""
        rows: list[tuple[Any, ...]] = []
        first: int | None = None
        with self._lock:  # only the fetch holds the lock; decoding (~10 us a record) does not
            db = self._conn()
            cur = db.cursor()
            began = False
            try:
                if with_first:
                    db.execute("BEGIN")  # deferred: a read, the snapshot of its first SELECT
                    began = True
                    first = self._first_of(cur.execute(_FIRST_OFFSET).fetchone()[0])
                cur.execute(_READ_FROM, (from_offset,))
                covered = 0
                for row in cur:
                    base, count = row[0], row[1]
                    if base + count > from_offset:
                        rows.append(row)
                        covered += base + count - max(base, from_offset)
                        if covered >= max_records:
                            break
            except sqlite3.Error as exc:
                raise LogError(f"log {self.path}: {exc}") from exc
            finally:
                cur.close()
                if began and db.in_transaction:  # it only read: nothing to keep
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
        return first, rows

    def _decode_row(
        self, row: tuple[Any, ...], from_offset: int, limit: int, out: list[LogEntry]
    ) -> bool:
        """Append the row's wanted entries to ``out``; False when the row is corrupt."""
        base, count, tenant, device, inc, lane, first_seq, received_us, codec, payload = row
        incarnation = _u64(inc)
        try:
            records = decode_batch(codec, payload, _u64(first_seq), count)
        except ProtocolError as exc:
            self._corrupt(base, count, f"{tenant}.{device}", incarnation, lane, exc)
            return False
        skip = max(0, from_offset - base)
        wanted = records[skip : skip + limit - len(out)]
        out.extend(
            LogEntry(
                base + skip + i,
                tenant,
                device,
                incarnation,
                lane,
                r.seq,
                r.ts,
                r.subject,
                r.attrs,
                r.body,
                received_us,
            )
            for i, r in enumerate(wanted)
        )
        return True

    def first_offset(self) -> int:
        """Offset of the oldest stored record (``next_offset`` when the log is empty)."""
        ((first,),) = self._query(_FIRST_OFFSET)
        return self._first_of(first)

    def _first_of(self, min_base: int | None) -> int:
        return self._totals.next_offset if min_base is None else int(min_base)

    @property
    def next_offset(self) -> int:
        """The offset the next stored record will get."""
        return self._totals.next_offset

    def size_bytes(self) -> int:
        """Payload bytes stored (what the size retention limits measure)."""
        return self._totals.bytes

    def stats(self) -> LogStats:
        """Totals and counters, for metrics."""
        t, c = self._totals, self._counters
        return LogStats(
            rows=t.rows,
            records=t.records,
            bytes=t.bytes,
            next_offset=t.next_offset,
            commits=c.commits,
            commit_failures=c.commit_failures,
            duplicates_skipped=c.duplicates_skipped,
            incarnations_dropped=c.incarnations_dropped,
            retention_rows_removed=c.retention_rows_removed,
            retention_records_removed=c.retention_records_removed,
            retention_blocked=c.retention_blocked,
            dropped_unconsumed=c.dropped_unconsumed,
            repaired_on_open=c.repaired_on_open,
            corrupt_batches=c.corrupt_batches,
            corrupt_records=c.corrupt_records,
        )

    def _corrupt(
        self, base: int, count: int, device: str, incarnation: int, lane: int, exc: Exception
    ) -> None:
        """A stored batch that no longer decodes (ingest validated it: the storage changed).

        Readers skip it, as they skip what retention removed: one bad row must not stop
        every consumer behind it.  The row stays for inspection (``verify`` lists it); it
        is reported once per Log (up to MAX_CORRUPT_REPORTED rows), and counted then.
        """
        if base in self._corrupt_seen:
            return
        if len(self._corrupt_seen) >= MAX_CORRUPT_REPORTED:
            if not self._corrupt_overflow:
                self._corrupt_overflow = True
                _log.error(
                    "log %s: over %d corrupt batches; more are skipped without a report each "
                    "(the file is damaged: Log.verify lists them)", self.path, MAX_CORRUPT_REPORTED,
                )  # fmt: skip
            return
        self._corrupt_seen.add(base)
        self._counters.corrupt_batches += 1
        self._counters.corrupt_records += count
        _log.error(
            "log %s: the batch at offsets %d..%d (%s, incarnation %d, lane %d, %d records) is "
            "corrupt and is skipped by every reader: %s",
            self.path, base, base + count - 1, device, incarnation, lane, count, exc,
        )  # fmt: skip

    # -- retention ------------------------------------------------------------------

    def apply_retention(
        self, now: float, *, protect_from: int | None = None, max_rows: int = RETENTION_MAX_ROWS
    ) -> int:
        """Delete whole oldest batches past the age or size limit; returns rows removed.

        Only the head of the log is removed, so the log stays one contiguous offset
        range.  Nothing at or after ``protect_from`` (the slowest durable consumer's
        committed offset) is removed by age or ``retention_max_bytes``: a stuck
        consumer blocks retention, counted in ``retention_blocked``.  Past
        ``retention_hard_max_bytes`` the oldest batches go anyway, and the records
        no consumer had read are counted in ``dropped_unconsumed``.  At most
        ``max_rows`` batches per call; call again while it returns ``max_rows``.
        """
        limits = (self.retention_max_age_s, self.retention_max_bytes, self.retention_hard_max_bytes)
        if all(limit is None for limit in limits):
            return 0
        cutoff_us = None
        if self.retention_max_age_s is not None:
            cutoff_us = int((now - self.retention_max_age_s) * 1e6)
        with self._lock:
            db = self._conn()
            with self._transaction(db):
                totals = self._totals.copy()
                end, records, unconsumed, blocked = self._retention_cut(
                    db, totals, cutoff_us, protect_from, max_rows
                )
                rows = 0
                if end is not None:
                    rows = db.execute("DELETE FROM batches WHERE base_offset < ?", (end,)).rowcount
                    self._write_totals(db, totals)
            self._totals = totals
            c = self._counters
            c.retention_rows_removed += rows
            c.retention_records_removed += records
            c.dropped_unconsumed += unconsumed
            c.retention_blocked += blocked
        return rows

    def _retention_cut(
        self,
        db: sqlite3.Connection,
        totals: _Totals,
        cutoff_us: int | None,
        protect_from: int | None,
        max_rows: int,
    ) -> tuple[int | None, int, int, int]:
        """Walk the head: (end offset to delete below, records, unconsumed records, blocked 0/1).

        ``totals`` is updated for the rows chosen.
        """
        soft, hard = self.retention_max_bytes, self.retention_hard_max_bytes
        end: int | None = None
        records = unconsumed = 0
        head = db.execute(
            "SELECT base_offset, count, received_us, bytes FROM batches "
            "ORDER BY base_offset LIMIT ?",
            (max_rows,),
        )
        try:
            for base, count, received_us, nbytes in head:
                over_hard = hard is not None and totals.bytes > hard
                over_soft = soft is not None and totals.bytes > soft
                too_old = cutoff_us is not None and received_us < cutoff_us
                if not (over_hard or over_soft or too_old):
                    break
                if protect_from is not None and base + count > protect_from:
                    if not over_hard:
                        return end, records, unconsumed, 1
                    unconsumed += base + count - max(base, protect_from)
                end = base + count
                records += count
                totals.rows -= 1
                totals.records -= count
                totals.bytes -= nbytes
        finally:
            head.close()
        return end, records, unconsumed, 0

    # -- durable consumers --------------------------------------------------------------

    def consumer_offset(self, name: str) -> int:
        """The last offset ``name`` committed as done (0 if it never did; offsets start at 1)."""
        rows = self._query("SELECT committed_offset FROM consumers WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else 0

    def commit_consumer_offset(self, name: str, offset: int) -> None:
        """Durably record that ``name`` has processed everything before ``offset``.

        Its own transaction, so output and offset can part in a crash: a sink that
        must write each message once also records offsets in its own output and
        skips what it already holds.  Moving an offset back (a replay) is allowed.
        """
        with self._lock:
            db = self._conn()
            with self._transaction(db):
                # next_offset from the file, not this object's copy: the log may be
                # written by another process (a hub) while this one is a consumer
                ((end,),) = db.execute("SELECT value FROM meta WHERE key = 'next_offset'")
                if not 0 <= offset <= max(int(end), self._totals.next_offset):
                    raise LogError(f"consumer {name!r}: offset {offset} is not in [0, next_offset]")
                db.execute(
                    "INSERT INTO consumers VALUES (?, ?) ON CONFLICT (name) "
                    "DO UPDATE SET committed_offset = excluded.committed_offset",
                    (name, offset),
                )

    def consumer_offsets(self) -> dict[str, int]:
        """Every durable consumer's committed offset (the minimum is retention's protect_from)."""
        rows = self._query("SELECT name, committed_offset FROM consumers")
        return {str(n): int(o) for n, o in rows}

    def remove_consumer(self, name: str) -> bool:
        """Forget a durable consumer so it no longer holds retention back."""
        with self._lock:
            db = self._conn()
            with self._transaction(db):
                n = db.execute("DELETE FROM consumers WHERE name = ?", (name,)).rowcount
        return n > 0

    # -- checking ------------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Full consistency check (O(size)): problems found, empty when the log is sound."""
        problems: list[str] = []
        with self._lock:
            db = self._conn()
            try:
                ok = db.execute("PRAGMA quick_check").fetchall()
                if ok != [("ok",)]:
                    problems.append(f"quick_check: {ok[:5]}")
                actual = self._recount(db, self._totals.next_offset)
                gaps = db.execute(
                    "SELECT count(*) FROM (SELECT base_offset, "
                    "lag(base_offset + count) OVER (ORDER BY base_offset) AS prev_end "
                    "FROM batches) WHERE prev_end IS NOT NULL AND prev_end != base_offset"
                ).fetchone()[0]
                end = db.execute(
                    "SELECT coalesce(max(base_offset + count), 1) FROM batches"
                ).fetchone()[0]
                corrupt = [
                    base
                    for base, count, codec, payload, first_seq in db.execute(
                        "SELECT base_offset, count, codec, payload, first_seq FROM batches"
                    )
                    if not _decodes(codec, payload, _u64(first_seq), count)
                ]
            except sqlite3.Error as exc:
                raise LogError(f"log {self.path}: {exc}") from exc
        if actual != self._totals:
            problems.append(f"meta totals {self._totals} but batches hold {actual}")
        if gaps:
            problems.append(f"{gaps} gaps between consecutive batches")
        if end > self._totals.next_offset:
            problems.append(f"batches reach offset {end} beyond next_offset")
        if corrupt:
            shown = ", ".join(str(b) for b in corrupt[:10])
            problems.append(f"{len(corrupt)} batches do not decode (at offsets {shown})")
        return problems


def _decodes(codec: int, payload: bytes, first_seq: int, count: int) -> bool:
    try:
        decode_batch(codec, payload, first_seq, count)
    except ProtocolError:
        return False
    return True


__all__ = [
    "DEFAULT_MAX_INCARNATIONS",
    "LOCAL_INCARNATION",
    "LOCAL_LANE",
    "Log",
    "LogEntry",
    "LogError",
    "LogStats",
    "PendingBatch",
]

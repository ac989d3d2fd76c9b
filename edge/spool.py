"""The edge agent's durable spool: accepted records on SQLite until the hub acknowledges them.

One SQLite file (stdlib ``sqlite3``) in WAL mode, opened with an exclusive lock so a
second agent on the same file fails at open instead of handing out the same seqs.
Each lane has its own table keyed by seq; a ``meta`` table holds the incarnation,
the seq high-water mark, the reserved seq block and the acknowledged mark of each
lane.  The hot-path reads of the edge session (``acked_mark``, ``pending_info``) come
from an in-memory index loaded at open; ``pending`` reads bodies with one range query.

The module is sans-I/O in the aioquic sense: no threads, no clock, no asyncio.  Every
call that needs time takes ``now`` (any clock, used consistently: the same one the
edge session gets, since ``pending_info`` hands accept times to it).

Accept and group commit
-----------------------
``append`` assigns the next seq and stages the record.  Seqs are strictly increasing
per device across all lanes and never reused, whatever crash happens: seqs are
handed out from a block (``SEQ_RESERVE_BLOCK``) whose end is written *synced*
before the first of them is used, so commits need no high-water mark of their own
(the ``seq_hwm`` key that older versions wrote with every commit is still read at
open).  After an unclean stop numbering resumes above the block (a gap; seqs are
u64); a clean ``close`` gives the unused rest back.

- ``durability="always"``: ``append`` commits before it returns, so a returned seq
  is on stable storage.
- ``durability="batch"``: ``append`` only stages; the record is *accepted* once
  ``commit(now)`` has run.  The shell arms one timer at ``next_commit_at()`` (or
  polls ``commit_due(now)``) and calls ``commit(now)``; ``await agent.publish()``
  returns after the group commit covering its record (``committed_seq`` >= its seq).
  Staged records are invisible to the sender until committed.

Acknowledgements and evictions change the in-memory index at once; their DELETEs
go into the next commit.  An eviction's is due ``group_commit_ms`` after it (it comes
with an append).  An acknowledgement's waits up to ``TRIM_DELAY_S`` (1 s) for a commit
to ride -- the next append's, usually -- so that a device sending a record a second
commits once per record, not twice.  If the process dies before that, the rows come
back on reopen and are sent again; the hub recognises them as duplicates.

What each mode risks (checked with strace: SQLite 3.40, ext4)
-------------------------------------------------------------
- ``always`` (``synchronous=FULL``): COMMIT writes the WAL frames and calls
  ``fdatasync`` on the WAL before returning (the directory is synced when the WAL
  file is created).  Every record whose ``append`` returned survives a process
  crash, an OS crash and a power loss, provided the storage honours flushes.  The
  price is one fsync per ``append`` (``append_many`` shares one).
- ``batch`` (``synchronous=NORMAL``): COMMIT hands the WAL frames to the OS with
  ``pwrite`` and does *not* sync them.  Hence:

  * process crash (SIGKILL, OOM kill, unhandled exception): nothing committed is
    lost, the OS has the bytes.  Only staged, not yet committed records go; their
    publishers were never told they were accepted.
  * OS crash or power loss: every commit since the WAL was last synced can be
    lost -- not only the last ``group_commit_ms`` window.  SQLite syncs the WAL
    only when it checkpoints (by itself every ~1000 pages, about 4 MiB of WAL).
    This spool also checkpoints (``fdatasync`` of the WAL, then of the database)
    in the first ``commit(now)`` at or after ``sync_interval_s`` (default 1 s)
    past an unsynced commit, and ``next_commit_at()`` includes that deadline; with
    a shell that calls ``commit`` at ``next_commit_at()`` a power cut takes at
    most the records accepted in the last ``sync_interval_s`` plus the group-commit
    delay, some of which may already have reached the hub.  What survives is a
    prefix of the commits (WAL frames carry cumulative checksums): the spool stays
    consistent and the reserved block keeps lost seqs from being reused.
    Without such a shell the window is open until the next commit or checkpoint.

Bounds and eviction
-------------------
``max_bytes`` bounds the sum of (encoded record + ``ROW_OVERHEAD_BYTES``) over all
lanes, staged records included.  A record that does not fit evicts the oldest
unprotected records: ``bulk`` may evict only ``bulk``; ``telemetry`` evicts ``bulk``
then ``telemetry``; ``critical`` evicts ``bulk`` then ``telemetry``.  ``critical`` is
never evicted.  Records at or below ``protect(lane, upto)`` (the sender's in-flight
mark) are not evicted.  When the evictable bytes cannot make room nothing is
evicted and ``SpoolFullError`` is raised.  Every eviction and refusal is counted
per lane and reason (``evicted``, ``refused``, ``drop_totals()``).
"""

from __future__ import annotations

import bisect
import os
import secrets
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import msgpack

from transport.batchcodec import Record, Scalar, pack
from transport.errors import (
    ConfigError,
    ErrorCode,
    LocalProtocolError,
    NotReadyError,
    SpoolFullError,
    SquallError,
)
from transport.limits import MAX_ATTR_KEY_BYTES, MAX_ATTR_VALUE_BYTES, MAX_ATTRS, MAX_SUBJECT_BYTES
from transport.wire import LANES, Lane

Durability = Literal["always", "batch"]
Entry = tuple[int, str, Any, Mapping[str, Scalar] | None, int]  # lane, subject, body, attrs, ts

ROW_OVERHEAD_BYTES: Final = 48  # per row beyond the encoded record: key, accept time, cell, slack
MAX_RECORD_BYTES: Final = 256 * 1024  # one encoded record (subject, ts, attrs, body)
MAX_STAGED_RECORDS: Final = 8192  # staged beyond this: append commits at once (bounds memory)
MAX_STAGED_BYTES: Final = 16 * 1024 * 1024
DEFAULT_SYNC_INTERVAL_S: Final = 1.0  # batch: longest an accepted record waits for an fsync
REASON_EVICTED: Final = "spool-full"  # an accepted record was evicted to make room
REASON_REFUSED: Final = "refused-spool-full"  # a new record was refused: no room
TRIM_DELAY_S: Final = 1.0  # acknowledged rows wait this long for a commit to ride
SEQ_RESERVE_BLOCK: Final = 50_000  # seqs reserved per synced meta write
SCHEMA_VERSION: Final = 1
_COMPACT_AT: Final = 1024  # dead index entries tolerated before the lists are compacted
# Per lane, the newest committed rows are also kept in memory (up to this many bytes of
# encoded records), so the sender's read of what was just accepted needs no SELECT.
RECENT_MAX_BYTES: Final = 64 * 1024
_JOURNAL_SIZE_LIMIT: Final = 16 * 1024 * 1024  # WAL file truncated to this after a checkpoint

# The lanes a new record may evict, in order (oldest first within each); critical is never one.
_VICTIMS: Final[dict[int, tuple[Lane, ...]]] = {
    Lane.CRITICAL: (Lane.BULK, Lane.TELEMETRY),
    Lane.TELEMETRY: (Lane.BULK, Lane.TELEMETRY),
    Lane.BULK: (Lane.BULK,),
}
_SYNCHRONOUS: Final = {"always": "FULL", "batch": "NORMAL"}
_NAME: Final[dict[int, str]] = {lane: lane.name.lower() for lane in LANES}
_TABLE: Final[dict[int, str]] = {lane: f"lane_{_NAME[lane]}" for lane in LANES}
_ACKED_KEY: Final[dict[int, str]] = {lane: f"acked_{_NAME[lane]}" for lane in LANES}
_INSERT: Final = {
    lane: f"INSERT INTO {t} (seq, accepted_at, data) VALUES (?, ?, ?)" for lane, t in _TABLE.items()
}
_DELETE_UPTO: Final = {lane: f"DELETE FROM {t} WHERE seq <= ?" for lane, t in _TABLE.items()}
_DELETE_RANGE: Final = {
    lane: f"DELETE FROM {t} WHERE seq BETWEEN ? AND ?" for lane, t in _TABLE.items()
}
_SELECT_RANGE: Final = {
    lane: f"SELECT seq, data FROM {t} WHERE seq BETWEEN ? AND ? ORDER BY seq"
    for lane, t in _TABLE.items()
}
# Every key exists from the spool's creation: UPDATE rewrites one value in place, where
# INSERT OR REPLACE would delete and re-insert the row and its index entry.
_UPDATE_META: Final = "UPDATE meta SET value = ? WHERE key = ?"


class RecordTooLargeError(SquallError):
    """A record exceeds a per-record limit (subject, attrs or encoded size); it is never stored."""


class SpoolStorageError(SquallError):
    """SQLite failed under the spool: file in use, not a spool, disk full, I/O error."""


# --- in-memory index -----------------------------------------------------------


@dataclass(slots=True)
class _Cut:
    """Entries removed from a lane index: what the database and the staging area must forget."""

    count: int = 0
    nbytes: int = 0
    disk: tuple[int, int] | None = None  # seq range of committed rows removed
    staged: list[int] = field(default_factory=list)  # seqs removed before their commit


@dataclass(slots=True)
class _LaneIndex:
    """seq, size and accept time of one lane's records in seq order.

    Entries before ``head`` are dead (trimmed or evicted; compacted lazily so removing
    from the front is O(1) amortised).  The last ``staged`` entries await their group
    commit and are invisible to the sender.  The first ``protected`` live entries have
    seq <= ``protect_mark`` and cannot be evicted.
    """

    seqs: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    head: int = 0
    staged: int = 0
    nbytes: int = 0
    acked: int = 0
    protect_mark: int = 0
    protected: int = 0
    protected_bytes: int = 0
    # seq -> encoded record of the newest committed rows, oldest first; a suffix of what
    # was committed since the spool opened, cut from the front (trim, RECENT_MAX_BYTES)
    recent: dict[int, bytes] = field(default_factory=dict)
    recent_bytes: int = 0

    @property
    def end(self) -> int:
        """Index one past the last committed (visible) entry."""
        return len(self.seqs) - self.staged

    @property
    def count(self) -> int:
        """Live entries, staged ones included."""
        return len(self.seqs) - self.head

    @property
    def evictable_bytes(self) -> int:
        """Bytes eviction could free in this lane."""
        return self.nbytes - self.protected_bytes

    def first_after(self, after: int) -> int:
        """Index of the first visible entry with seq > ``after``."""
        return bisect.bisect_right(self.seqs, after, self.head, self.end)

    def push(self, seq: int, size: int, at: float, *, staged: bool) -> None:
        """Add the newest entry."""
        self.seqs.append(seq)
        self.sizes.append(size)
        self.times.append(at)
        self.nbytes += size
        self.staged += staged
        if seq <= self.protect_mark:  # every earlier entry is protected too: the prefix grows
            self.protected += 1
            self.protected_bytes += size

    def pop_newest(self) -> None:
        """Remove the newest entry, which must be staged (an ``always`` commit failed)."""
        size = self.sizes.pop()
        self.seqs.pop()
        self.times.pop()
        self.nbytes -= size
        self.staged -= 1
        if self.protected > self.count:
            self.protected -= 1
            self.protected_bytes -= size

    def trim(self, upto: int) -> _Cut:
        """Remove every entry with seq <= ``upto`` (staged ones too)."""
        i = bisect.bisect_right(self.seqs, upto, self.head, len(self.seqs))
        k = i - self.head
        if k <= 0:
            return _Cut()
        cut = self._describe(self.head, i)
        if k >= self.protected:
            self.protected, self.protected_bytes = 0, 0
        else:
            self.protected -= k
            self.protected_bytes -= cut.nbytes
        self.head = i
        self._compact()
        return cut

    def evict(self, need: int) -> _Cut:
        """Remove the oldest unprotected entries until ``need`` bytes are freed (or none remain)."""
        p = self.head + self.protected
        j, freed, n = p, 0, len(self.seqs)
        while freed < need and j < n:
            freed += self.sizes[j]
            j += 1
        if j == p:
            return _Cut()
        cut = self._describe(p, j)
        h, m = self.head, j - p  # shift the protected prefix over the hole
        self.seqs[h + m : j] = self.seqs[h:p]
        self.sizes[h + m : j] = self.sizes[h:p]
        self.times[h + m : j] = self.times[h:p]
        self.head += m
        self._compact()
        return cut

    def set_protect(self, upto: int) -> None:
        """Entries with seq <= ``upto`` become unevictable (a lower mark releases them)."""
        self.protect_mark = upto
        n = bisect.bisect_right(self.seqs, upto, self.head, len(self.seqs)) - self.head
        h, old = self.head, self.protected
        if n > old:
            self.protected_bytes += sum(self.sizes[h + old : h + n])
        elif n < old:
            self.protected_bytes -= sum(self.sizes[h + n : h + old])
        self.protected = n

    def _describe(self, a: int, b: int) -> _Cut:
        """Account for removing entries [a, b) and say what they were; the caller moves head."""
        end = self.end
        nbytes = sum(self.sizes[a:b])
        disk = (self.seqs[a], self.seqs[min(b, end) - 1]) if a < end else None
        staged = self.seqs[max(a, end) : b]
        self.staged -= len(staged)
        self.nbytes -= nbytes
        return _Cut(b - a, nbytes, disk, staged)

    def remember(self, seq: int, data: bytes) -> None:
        """Keep a just-committed row in memory; the oldest go past RECENT_MAX_BYTES."""
        recent = self.recent
        recent[seq] = data
        self.recent_bytes += len(data)
        while self.recent_bytes > RECENT_MAX_BYTES:
            self.recent_bytes -= len(recent.pop(next(iter(recent))))

    def forget_upto(self, upto: int) -> None:
        """Drop remembered rows with seq <= ``upto`` (acknowledged)."""
        recent = self.recent
        while recent:
            first = next(iter(recent))
            if first > upto:
                return
            self.recent_bytes -= len(recent.pop(first))

    def _compact(self) -> None:
        if self.head > _COMPACT_AT and self.head * 2 > len(self.seqs):
            del self.seqs[: self.head], self.sizes[: self.head], self.times[: self.head]
            self.head = 0


# --- record encoding -----------------------------------------------------------


def encode_record(subject: str, body: Any, attrs: Mapping[str, Scalar] | None, ts: int) -> bytes:
    """The row payload of one record (msgpack); refuses what the hub would refuse."""
    if not isinstance(subject, str) or not subject:
        raise LocalProtocolError(ErrorCode.BAD_FIELD, "subject must be a non-empty string")
    n = len(_utf8(subject, "subject"))
    if n > MAX_SUBJECT_BYTES:
        raise RecordTooLargeError(f"subject is {n} bytes; the limit is {MAX_SUBJECT_BYTES}")
    if type(ts) is not int:
        raise LocalProtocolError(ErrorCode.BAD_FIELD, f"ts must be int microseconds, not {ts!r}")
    data = pack([subject, ts, _check_attrs(attrs), body])
    if len(data) > MAX_RECORD_BYTES:
        raise RecordTooLargeError(
            f"record encodes to {len(data)} bytes; the limit is {MAX_RECORD_BYTES}"
        )
    return data


def decode_record(seq: int, data: bytes) -> Record:
    """A stored row back into a Record."""
    try:
        subject, ts, attrs, body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise SpoolStorageError(f"spool row {seq} is corrupt: {exc}"[:200]) from exc
    return Record(seq, ts, subject, attrs or {}, body)


def _check_attrs(attrs: Mapping[str, Scalar] | None) -> dict[str, Scalar]:
    if not attrs:
        return {}
    if len(attrs) > MAX_ATTRS:
        raise RecordTooLargeError(f"{len(attrs)} attrs; the limit is {MAX_ATTRS}")
    for k, v in attrs.items():
        if not isinstance(k, str):
            raise LocalProtocolError(ErrorCode.BAD_FIELD, f"attr key {k!r} is not a string")
        if len(_utf8(k, "attr key")) > MAX_ATTR_KEY_BYTES:
            raise RecordTooLargeError(f"attr key {k[:40]!r} exceeds {MAX_ATTR_KEY_BYTES} bytes")
        if isinstance(v, str):
            if len(_utf8(v, "attr value")) > MAX_ATTR_VALUE_BYTES:
                raise RecordTooLargeError(f"attr {k!r} exceeds {MAX_ATTR_VALUE_BYTES} bytes")
        elif v is not None and not isinstance(v, int | float):  # bool is an int
            raise LocalProtocolError(ErrorCode.BAD_FIELD, f"attr {k!r} is not a scalar")
    return dict(attrs)


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(ErrorCode.BAD_FIELD, f"{what} is not valid UTF-8") from exc


def _lane(lane: int) -> Lane:
    try:
        return Lane(lane)
    except ValueError:
        raise LocalProtocolError(ErrorCode.BAD_FIELD, f"unknown lane {lane!r}") from None


# --- database ------------------------------------------------------------------


def _open_db(path: str, durability: Durability) -> sqlite3.Connection:
    """Connect, take the exclusive lock, set WAL and the sync level, create the schema."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=0.0)
    try:
        # Before WAL is first used: no shared-memory index, and the lock is held until close.
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SpoolStorageError(f"spool {path}: SQLite refused WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA journal_size_limit={_JOURNAL_SIZE_LIMIT}")
        conn.execute("PRAGMA synchronous=FULL")  # the new incarnation is synced in any mode
        _create_schema(conn, path)
        conn.execute(f"PRAGMA synchronous={_SYNCHRONOUS[durability]}")
    except BaseException:
        conn.close()
        raise
    return conn


def _create_schema(conn: sqlite3.Connection, path: str) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            for lane in LANES:
                conn.execute(
                    f"CREATE TABLE {_TABLE[lane]} "
                    "(seq INTEGER PRIMARY KEY, accepted_at REAL NOT NULL, data BLOB NOT NULL)"
                )
            meta = [("incarnation", secrets.randbits(63) or 1), ("seq_hwm", 0), ("seq_reserved", 0)]
            meta += [(f"acked_{_NAME[lane]}", 0) for lane in LANES]
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            raise SpoolStorageError(
                f"spool {path} has schema version {version}; this agent reads {SCHEMA_VERSION}"
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


# --- the spool -----------------------------------------------------------------


class Spool:
    """Durable, bounded, per-lane record store of one device; implements the session's Outbox.

    Not thread-safe: use it from one thread (the event loop's).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int,
        durability: Durability,
        group_commit_ms: float = 20,
        now: float,
        sync_interval_s: float = DEFAULT_SYNC_INTERVAL_S,
    ) -> None:
        self.path = os.fspath(path)
        _check_config(self.path, max_bytes, durability, group_commit_ms, sync_interval_s)
        self.max_bytes = max_bytes
        self.durability: Durability = durability
        self.group_commit_s = group_commit_ms / 1000
        self.sync_interval_s = sync_interval_s
        try:
            self._conn = _open_db(self.path, durability)
        except sqlite3.Error as exc:
            raise _storage_error(f"cannot open spool {self.path}", exc) from exc
        self._closed = False
        try:
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
            self._meta_saved: dict[str, int] = {str(k): int(v) for k, v in meta.items()}
            self.incarnation = int(meta["incarnation"])
            self._lanes: dict[int, _LaneIndex] = {
                lane: _LaneIndex(acked=int(meta[f"acked_{_NAME[lane]}"])) for lane in LANES
            }
            self._load_index(now)
        except (sqlite3.Error, KeyError, ValueError, TypeError) as exc:
            self._conn.close()  # release the lock: the caller may fix the file and retry
            raise SpoolStorageError(f"cannot read spool {self.path}: {exc!r}") from exc
        newest = max((q.seqs[-1] for q in self._lanes.values() if q.seqs), default=0)
        # After an unclean stop the whole reserved block counts as handed out.
        self._reserved = max(int(meta["seq_hwm"]), int(meta.get("seq_reserved", 0)), newest)
        self._last_seq = self._reserved
        self._committed_seq = self._last_seq
        self._staging: dict[int, tuple[int, int, float, bytes]] = {}  # seq -> lane, seq, at, data
        self._staged_bytes = 0
        self._staged_appends = 0
        self._deletes: list[tuple[int, int, int]] = []  # (lane, lo, hi) of evicted rows
        self._ack_deletes: dict[int, int] = {}  # lane -> delete rows <= this seq
        self._dirty_since: float | None = None
        self._trim_since: float | None = None  # acked rows to delete, nothing else dirty
        self.trim_delay_s = max(TRIM_DELAY_S, self.group_commit_s)
        self._sync_due: float | None = None
        self._clock = now  # latest ``now`` seen; dates changes made by calls without one
        self.accepted = 0
        self._evicted = {_NAME[lane]: {REASON_EVICTED: 0} for lane in LANES}
        self._refused = {_NAME[lane]: 0 for lane in LANES}
        self._drops: dict[str, dict[str, int]] = {}  # nonzero only, for heartbeats

    def _load_index(self, now: float) -> None:
        """Read seq, size and accept time of every row; times are clamped to ``now``.

        A clock that went back (reboot of a monotonic clock, wall clock step) must not make
        a stored record look younger than now, or the sender would linger on it.
        """
        for lane, q in self._lanes.items():
            sql = f"SELECT seq, accepted_at, length(data) FROM {_TABLE[lane]} ORDER BY seq"
            for seq, at, n in self._conn.execute(sql):
                q.push(seq, n + ROW_OVERHEAD_BYTES, min(at, now), staged=False)

    # -- accepting ---------------------------------------------------------------

    def append(
        self,
        lane: int,
        subject: str,
        body: Any,
        attrs: Mapping[str, Scalar] | None,
        ts: int,
        now: float,
    ) -> int:
        """Stage one record and return its seq; with ``always`` it is committed on return.

        Raises RecordTooLargeError or LocalProtocolError for a record that can never be
        stored, SpoolFullError when eviction cannot make room (nothing is evicted then).
        """
        self._check_open()
        lane_v = _lane(lane)
        data = encode_record(subject, body, attrs, ts)
        seq = self._stage(lane_v, data, now)
        self._settle([seq], now)
        return seq

    def append_many(self, entries: Iterable[Entry], now: float) -> list[int]:
        """Stage many (lane, subject, body, attrs, ts) in order; ``always`` commits them once.

        Every entry is checked before any is staged.  If one does not fit, the ones before
        it stay accepted (committed first with ``always``) and SpoolFullError says how many.
        """
        self._check_open()
        rows = [(_lane(e[0]), encode_record(e[1], e[2], e[3], e[4])) for e in entries]
        seqs: list[int] = []
        try:
            for lane, data in rows:
                seqs.append(self._stage(lane, data, now))
                if self.durability == "batch" and self._staging_full():
                    self.commit(now)
        except SquallError as exc:
            self._settle(seqs, now)  # the entries before the failing one are accepted
            if not isinstance(exc, SpoolFullError):
                raise
            done = f"seqs {seqs[0]}..{seqs[-1]}" if seqs else "none"
            raise SpoolFullError(f"{exc} (accepted {len(seqs)} of {len(rows)}: {done})") from exc
        self._settle(seqs, now)
        return seqs

    def _stage(self, lane: Lane, data: bytes, now: float) -> int:
        size = len(data) + ROW_OVERHEAD_BYTES
        if self._last_seq >= self._reserved:
            self._write_reserved(self._last_seq + SEQ_RESERVE_BLOCK)
        self._make_room(lane, size)
        self._last_seq += 1
        seq = self._last_seq
        self._lanes[lane].push(seq, size, now, staged=True)
        self._staging[seq] = (lane, seq, now, data)
        self._staged_bytes += size
        self._staged_appends += 1
        self._touch(now)
        return seq

    def _settle(self, seqs: list[int], now: float) -> None:
        """``always``: commit now, un-staging ``seqs`` if that fails; ``batch``: bound staging."""
        if self.durability == "batch":
            if self._staging_full():
                self.commit(now)
            return
        if not seqs:
            return
        try:
            self.commit(now)
        except SpoolStorageError:
            for seq in reversed(seqs):  # the caller is told these were not accepted
                entry = self._staging.get(seq)
                if entry is not None:
                    self._forget_staged(seq)
                    self._lanes[entry[0]].pop_newest()
                    self._staged_appends -= 1
            raise

    def _staging_full(self) -> bool:
        return len(self._staging) >= MAX_STAGED_RECORDS or self._staged_bytes >= MAX_STAGED_BYTES

    def _make_room(self, lane: Lane, size: int) -> None:
        over = self.used_bytes + size - self.max_bytes
        if over <= 0:
            return
        victims = _VICTIMS[lane]
        room = sum(self._lanes[v].evictable_bytes for v in victims)
        if room < over:
            self._refuse(lane, size, room)
        for victim in victims:
            cut = self._lanes[victim].evict(over)
            self._apply_cut(victim, cut)
            self._count_drop(_NAME[victim], REASON_EVICTED, cut.count)
            over -= cut.nbytes
            if over <= 0:
                return

    def _refuse(self, lane: Lane, size: int, room: int) -> None:
        name = _NAME[lane]
        self._refused[name] += 1
        self._count_drop(name, REASON_REFUSED, 1)
        lanes = ", ".join(
            f"{_NAME[k]} {q.count} records/{q.nbytes} B" for k, q in self._lanes.items()
        )
        evictable = "/".join(_NAME[v] for v in _VICTIMS[lane])
        raise SpoolFullError(
            f"spool full: a {name} record of {size} B does not fit: {self.used_bytes} of "
            f"{self.max_bytes} B used ({lanes}); only {room} B of {evictable} can be evicted"
            " (critical never is, records in flight are protected)"
        )

    def _apply_cut(self, lane: int, cut: _Cut) -> None:
        if cut.disk is not None:
            self._deletes.append((lane, *cut.disk))
            self._touch(self._clock)
        for seq in cut.staged:
            self._forget_staged(seq)

    def _forget_staged(self, seq: int) -> None:
        _, _, _, data = self._staging.pop(seq)
        self._staged_bytes -= len(data) + ROW_OVERHEAD_BYTES

    def _count_drop(self, lane: str, reason: str, n: int) -> None:
        if n:
            if reason == REASON_EVICTED:
                self._evicted[lane][reason] += n
            per_lane = self._drops.setdefault(lane, {})
            per_lane[reason] = per_lane.get(reason, 0) + n

    def _touch(self, now: float) -> None:
        self._clock = now
        if self._dirty_since is None:
            self._dirty_since = now

    # -- group commit ------------------------------------------------------------

    def commit(self, now: float) -> int:
        """Write all that is staged in one transaction, sync when due; return ``committed_seq``.

        On failure the transaction is rolled back, everything stays staged for the next
        try, and SpoolStorageError is raised.
        """
        self._check_open()
        self._clock = now
        trims_due = self._trim_since is not None and now >= self._trim_since + self.trim_delay_s
        if self._dirty_since is not None or trims_due:
            self._write()
            self._committed_seq = self._last_seq
            self.accepted += self._staged_appends
            self._staged_appends = 0
            self._dirty_since = self._trim_since = None
            if self.durability == "batch" and self._sync_due is None:
                self._sync_due = now + self.sync_interval_s
        if self._sync_due is not None and now >= self._sync_due:
            self._sync()
        return self._committed_seq

    def commit_due(self, now: float) -> bool:
        """True when ``commit(now)`` has work whose deadline has come."""
        at = self.next_commit_at()
        return at is not None and now >= at

    def next_commit_at(self) -> float | None:
        """When the shell should call ``commit``: the group-commit or sync deadline, or None."""
        sync = self._sync_due
        if self._dirty_since is not None:
            at = self._dirty_since + self.group_commit_s
        elif self._trim_since is not None:
            at = self._trim_since + self.trim_delay_s
        else:
            return sync
        return at if sync is None or at < sync else sync

    def _write(self) -> None:
        conn = self._conn
        by_lane: dict[int, list[tuple[int, float, bytes]]] = {}
        for lane, seq, at, data in self._staging.values():
            by_lane.setdefault(lane, []).append((seq, at, data))
        saved = self._meta_saved
        meta = [
            (q.acked, _ACKED_KEY[lane])
            for lane, q in self._lanes.items()
            if saved.get(_ACKED_KEY[lane]) != q.acked  # only what changed
        ]
        try:
            conn.execute("BEGIN")
            for lane, upto in self._ack_deletes.items():
                conn.execute(_DELETE_UPTO[lane], (upto,))
            for lane, lo, hi in self._deletes:
                conn.execute(_DELETE_RANGE[lane], (lo, hi))
            for lane, rows in by_lane.items():
                conn.executemany(_INSERT[lane], rows)
            if meta:
                conn.executemany(_UPDATE_META, meta)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise _storage_error("spool commit failed", exc) from exc
        saved.update((key, value) for value, key in meta)
        for lane, rows in by_lane.items():
            q = self._lanes[lane]
            for seq, _, data in rows:
                q.remember(seq, data)
        self._staging.clear()
        self._staged_bytes = 0
        self._deletes.clear()
        self._ack_deletes.clear()
        for q in self._lanes.values():
            q.staged = 0

    def _write_reserved(self, value: int) -> None:
        """Persist, synced in any mode, that seqs up to ``value`` may be handed out.

        A ``batch`` commit can be lost on power loss after its records were sent; seqs
        come from a durably reserved block so a restart never numbers a new record
        with a seq the hub may already hold.
        """
        conn = self._conn
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN")
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('seq_reserved', ?)", (value,)
            )
            conn.execute("COMMIT")
            conn.execute(f"PRAGMA synchronous={_SYNCHRONOUS[self.durability]}")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise _storage_error("spool cannot reserve seqs", exc) from exc
        self._reserved = value

    def _sync(self) -> None:
        """Checkpoint: fsync the WAL (making every commit so far durable), then the database."""
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            raise _storage_error("spool checkpoint failed", exc) from exc
        self._sync_due = None

    # -- the Outbox protocol (hot path: no SQL but in ``pending``) ---------------

    def acked_mark(self, lane: int) -> int:
        """Highest seq the hub is known to hold in ``lane`` (persisted)."""
        return self._lanes[lane].acked

    def pending_info(self, lane: int, after: int) -> tuple[int, float | None]:
        """(count, accept time of the oldest) of accepted ``lane`` records with seq > ``after``."""
        q = self._lanes[lane]
        i = q.first_after(after)
        n = q.end - i
        return (n, q.times[i]) if n > 0 else (0, None)

    def pending(self, lane: int, after: int, limit: int) -> list[Record]:
        """Up to ``limit`` accepted records of ``lane`` with seq > ``after``, in seq order."""
        self._check_open()
        q = self._lanes[lane]
        i = q.first_after(after)
        j = min(i + limit, q.end)
        if j <= i:
            return []
        want = q.seqs[i:j]
        recent = q.recent
        if want[0] in recent and want[-1] in recent:  # a suffix of the commits: all between too
            return [decode_record(seq, recent[seq]) for seq in want]
        try:
            rows = self._conn.execute(_SELECT_RANGE[lane], (want[0], want[-1])).fetchall()
        except sqlite3.Error as exc:
            raise _storage_error("spool read failed", exc) from exc
        if len(rows) != len(want):  # rows evicted in memory whose DELETE is not committed yet
            keep = set(want)
            rows = [r for r in rows if r[0] in keep]
            if len(rows) != len(want):
                raise SpoolStorageError(f"spool {self.path}: {_NAME[lane]} rows missing on disk")
        return [decode_record(seq, data) for seq, data in rows]

    def acked(self, lane: int, upto: int) -> None:
        """The hub holds ``lane`` up to ``upto``: trim (on disk with the next commit)."""
        q = self._lanes[lane]
        cut = q.trim(upto)
        q.forget_upto(upto)
        for seq in cut.staged:
            self._forget_staged(seq)
        changed = cut.disk is not None or upto > q.acked
        if cut.disk is not None:
            self._ack_deletes[lane] = max(self._ack_deletes.get(lane, 0), cut.disk[1])
        q.acked = max(q.acked, upto)
        if changed and self._trim_since is None:
            self._trim_since = self._clock  # rides the next commit, at the latest trim_delay_s on

    def protect(self, lane: int, upto: int) -> None:
        """Records of ``lane`` with seq <= ``upto`` (in flight) may not be evicted; 0 releases."""
        self._lanes[lane].set_protect(upto)

    # -- stats -------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """Highest seq possibly handed out (after an unclean stop: the reserved block's end)."""
        return self._last_seq

    @property
    def committed_seq(self) -> int:
        """Highest seq covered by a completed commit: every accepted record is at or below it."""
        return self._committed_seq

    @property
    def used_bytes(self) -> int:
        """Bytes counted against ``max_bytes`` (staged records included)."""
        return sum(q.nbytes for q in self._lanes.values())

    @property
    def evicted(self) -> dict[str, dict[str, int]]:
        """Cumulative evictions: lane name -> reason -> records."""
        return {lane: dict(reasons) for lane, reasons in self._evicted.items()}

    @property
    def refused(self) -> dict[str, int]:
        """Cumulative records refused with SpoolFullError, per lane name."""
        return dict(self._refused)

    def depth(self) -> dict[Lane, tuple[int, int]]:
        """(records, bytes) held per lane, staged records included."""
        return {lane: (self._lanes[lane].count, self._lanes[lane].nbytes) for lane in LANES}

    def oldest_unsent_age(self, now: float) -> dict[Lane, float | None]:
        """Age of the oldest accepted record per lane that is neither acked nor in flight.

        "In flight" is what ``protect`` was told; None when nothing waits.
        """
        out: dict[Lane, float | None] = {}
        for lane in LANES:
            q = self._lanes[lane]
            i = q.first_after(q.protect_mark)
            out[lane] = max(0.0, now - q.times[i]) if i < q.end else None
        return out

    def drop_totals(self) -> dict[str, dict[str, int]]:
        """Evictions and refusals since this spool was opened: lane name -> reason -> records.

        Cumulative on purpose: heartbeats are unreliable datagrams, so each one carries the
        totals and a lost heartbeat loses nothing (a delta report would vanish with it).
        """
        return {lane: dict(reasons) for lane, reasons in self._drops.items()}

    # -- lifecycle ---------------------------------------------------------------

    def close(self, now: float | None = None) -> None:
        """Commit what is staged, sync, and release the file (idempotent)."""
        if self._closed:
            return
        try:
            if self._trim_since is not None and self._dirty_since is None:
                self._dirty_since = self._trim_since  # the acknowledged rows go now
            self.commit(self._clock if now is None else now)
            self._write_reserved(self._last_seq)  # clean stop: the next start continues densely
            self._sync()
        finally:
            self._closed = True
            self._conn.close()

    def _check_open(self) -> None:
        if self._closed:
            raise NotReadyError(f"spool {self.path} is closed")


def _check_config(
    path: str, max_bytes: int, durability: str, group_commit_ms: float, sync_interval_s: float
) -> None:
    if durability not in ("always", "batch"):
        raise ConfigError(path, "durability", f"expected 'always' or 'batch', got {durability!r}")
    if type(max_bytes) is not int or max_bytes <= 0:
        raise ConfigError(path, "max_bytes", f"expected a positive byte count, got {max_bytes!r}")
    if not group_commit_ms >= 0:
        raise ConfigError(path, "group_commit_ms", f"expected >= 0, got {group_commit_ms!r}")
    if not sync_interval_s >= 0:
        raise ConfigError(path, "sync_interval_s", f"expected >= 0, got {sync_interval_s!r}")


def _storage_error(what: str, exc: sqlite3.Error) -> SpoolStorageError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        text += " (another agent has this spool open)"
    return SpoolStorageError(f"{what}: {text}")


if TYPE_CHECKING:
    from transport.session import Outbox

    def _is_outbox(spool: Spool) -> Outbox:  # mypy proves Spool implements the protocol
        return spool


__all__ = [
    "MAX_RECORD_BYTES",
    "REASON_EVICTED",
    "REASON_REFUSED",
    "ROW_OVERHEAD_BYTES",
    "Durability",
    "Entry",
    "RecordTooLargeError",
    "Spool",
    "SpoolStorageError",
    "decode_record",
    "encode_record",
]

"""The edge spool: durable across crashes, bounded with lane-ordered eviction, Outbox semantics."""

from __future__ import annotations

import copy
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.spool import (
    MAX_RECORD_BYTES,
    REASON_EVICTED,
    REASON_REFUSED,
    RECENT_MAX_BYTES,
    ROW_OVERHEAD_BYTES,
    TRIM_DELAY_S,
    RecordTooLargeError,
    Spool,
    SpoolStorageError,
    encode_record,
)
from transport.batchcodec import Record
from transport.errors import ConfigError, LocalProtocolError, NotReadyError, SpoolFullError
from transport.memoutbox import MemoryOutbox
from transport.wire import LANES, Lane

SUBJECT = "acme.truck-042.telemetry.gps"
BODY = b"0123456789"
ROW = len(encode_record(SUBJECT, BODY, None, 1)) + ROW_OVERHEAD_BYTES  # bytes one put() costs
C, T, B = Lane.CRITICAL, Lane.TELEMETRY, Lane.BULK


def open_spool(path: Path, **kw: Any) -> Spool:
    kw.setdefault("max_bytes", 1 << 24)
    kw.setdefault("durability", "always")
    kw.setdefault("now", 0.0)
    return Spool(path, **kw)


def put(spool: Spool, lane: int, n: int = 1, now: float = 1.0) -> list[int]:
    return [spool.append(lane, SUBJECT, BODY, None, 1, now) for _ in range(n)]


def crash(spool: Spool) -> None:
    """The process dies: the connection goes away, nothing staged is committed."""
    spool._conn.close()


def seqs(spool: Spool, lane: int) -> list[int]:
    return [r.seq for r in spool.pending(lane, 0, 10_000)]


# --- seq and incarnation ------------------------------------------------------------


@pytest.mark.parametrize("durability", ["always", "batch"])
def test_seq_increases_across_lanes_and_restarts(tmp_path: Path, durability: str) -> None:
    db = tmp_path / "spool.db"
    s = open_spool(db, durability=durability)
    first = [s.append(lane, SUBJECT, BODY, None, 1, 1.0) for lane in (C, T, B, T, C)]
    assert first == sorted(first) and len(set(first)) == 5
    s.commit(2.0)
    for lane in LANES:
        s.acked(lane, first[-1])  # trim everything: the high-water mark must still survive
    s.commit(3.0)
    crash(s)
    s = open_spool(db, durability=durability)
    assert s.last_seq >= first[-1]  # after a crash: the end of the reserved block
    assert all(s.pending_info(lane, 0) == (0, None) for lane in LANES)
    b = put(s, B)
    assert b[0] > first[-1]
    s.close()
    s = open_spool(db, durability=durability)
    assert s.last_seq == b[0]
    assert put(s, C) == [b[0] + 1]  # a clean stop gives the unused reservation back


def test_seqs_lost_to_a_power_cut_are_never_reused(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    s = open_spool(db, durability="batch")
    a = put(s, T)
    s.commit(1.0)
    snapshot = {f.name: f.read_bytes() for f in tmp_path.iterdir()}  # all the disk keeps
    b = put(s, T, 5)
    s.commit(1.0)  # accepted, maybe sent to the hub, never synced
    crash(s)
    for f in tmp_path.iterdir():
        f.unlink()
    for name, data in snapshot.items():
        (tmp_path / name).write_bytes(data)
    s = open_spool(db, durability="batch")
    assert seqs(s, T) == a
    assert put(s, T)[0] > b[-1]  # the hub may hold b: new records never take their seqs


def test_incarnation_is_stable_until_the_spool_is_wiped(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    s = open_spool(db)
    inc = s.incarnation
    assert 0 < inc < 1 << 63
    put(s, T)
    s.close()
    s = open_spool(db)
    assert s.incarnation == inc
    s.close()
    for f in tmp_path.iterdir():
        f.unlink()
    s = open_spool(db)
    assert s.incarnation != inc
    assert s.last_seq == 0


def test_a_second_agent_cannot_open_the_same_spool(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    s = open_spool(db)
    with pytest.raises(SpoolStorageError, match="another agent"):
        open_spool(db)
    s.close()
    open_spool(db).close()


def test_a_file_that_is_not_a_spool_is_a_typed_error(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    db.write_bytes(b"not a database at all" * 100)
    with pytest.raises(SpoolStorageError, match="cannot open spool"):
        open_spool(db)


def test_bad_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="durability"):
        open_spool(tmp_path / "a.db", durability="sometimes")
    with pytest.raises(ConfigError, match="max_bytes"):
        open_spool(tmp_path / "a.db", max_bytes=0)


# --- Outbox semantics: identical to MemoryOutbox --------------------------------------

_bodies = st.one_of(
    st.binary(max_size=20),
    st.text(max_size=10),
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.dictionaries(st.text(max_size=4), st.integers(0, 9) | st.text(max_size=4), max_size=3),
)
_attrs = st.dictionaries(
    st.text(max_size=5),
    st.none() | st.booleans() | st.integers(0, 99) | st.text(max_size=5),
    max_size=4,
)
_lanes = st.sampled_from(LANES)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), _lanes, _bodies, _attrs, st.integers(0, 2**40)),
        st.tuples(st.just("ack"), _lanes, st.integers(0, 6)),
        st.tuples(st.just("read"), _lanes, st.integers(-2, 30), st.integers(1, 5)),
        st.tuples(st.just("commit")),
        st.tuples(st.just("reopen")),
        st.tuples(st.just("crash")),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=_ops, durability=st.sampled_from(["always", "batch"]))
def test_outbox_semantics_match_memory_outbox(ops: list[tuple[Any, ...]], durability: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        _run_model(Path(d) / "spool.db", ops, durability)


def _run_model(db: Path, ops: list[tuple[Any, ...]], durability: str) -> None:
    """Drive a Spool and a MemoryOutbox (which holds only accepted records) side by side."""
    now = 1.0
    s = open_spool(db, durability=durability, now=now)
    model, durable = MemoryOutbox(), MemoryOutbox()  # durable: the model at the last commit
    staged: list[tuple[int, Record, float]] = []
    last = 0
    for op in ops:
        now += 1.0
        if op[0] == "add":
            _, lane, body, attrs, ts = op
            seq = s.append(lane, SUBJECT, body, attrs, ts, now)
            assert seq > last
            last = seq
            staged.append((lane, Record(seq, ts, SUBJECT, attrs, body), now))
        elif op[0] == "ack":
            lane, k = op[1], op[2]
            held = [r.seq for r in model.pending(lane, 0, 1000)]
            held += [r.seq for x, r, _ in staged if x == lane]  # acking staged ones: odd, legal
            upto = held[k] if k < len(held) else model.acked_mark(lane) + k % 2
            s.acked(lane, upto)
            model.acked(lane, upto)
            staged = [x for x in staged if not (x[0] == lane and x[1].seq <= upto)]
        elif op[0] in ("commit", "reopen"):
            if op[0] == "commit":
                s.commit(now)
            else:
                s.close(now)
                s = open_spool(db, durability=durability, now=now)
            for lane, rec, at in staged:
                model.add(lane, rec, at)
            staged.clear()
            durable = copy.deepcopy(model)
        elif op[0] == "crash":
            crash(s)
            s = open_spool(db, durability=durability, now=now)
            staged.clear()
            model = copy.deepcopy(durable)
            last = s.last_seq
        else:
            _, lane, after, limit = op
            after = max(0, model.acked_mark(lane) + after)
            assert s.pending(lane, after, limit) == model.pending(lane, after, limit)
        if durability == "always" and op[0] == "add":  # committed with everything before it
            for lane, rec, at in staged:
                model.add(lane, rec, at)
            staged.clear()
            durable = copy.deepcopy(model)
        for lane in LANES:
            assert s.acked_mark(lane) == model.acked_mark(lane)
            for after in (0, s.acked_mark(lane), last - 1):
                assert s.pending_info(lane, after) == model.pending_info(lane, after)
            assert s.pending(lane, 0, 1000) == model.pending(lane, 0, 1000)
    s.close()


# --- batch durability --------------------------------------------------------------


def test_batch_records_are_accepted_by_the_group_commit(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    s = open_spool(db, durability="batch", group_commit_ms=20, now=10.0)
    assert s.next_commit_at() is None
    a = put(s, T, 3, now=10.0)
    assert s.pending_info(T, 0) == (0, None)  # staged: the sender must not see it yet
    assert s.next_commit_at() == pytest.approx(10.02)
    assert not s.commit_due(10.01)
    assert s.commit_due(10.02)
    assert s.commit(10.02) == a[-1] == s.committed_seq
    assert s.accepted == 3
    assert s.pending_info(T, 0) == (3, 10.0)
    b = put(s, T, 2, now=10.03)
    assert s.committed_seq == a[-1] < b[0]
    crash(s)  # before the group commit of b
    s = open_spool(db, durability="batch", now=11.0)
    assert seqs(s, T) == a
    assert put(s, T)[0] > b[-1]


def test_batch_commit_schedules_a_sync_that_bounds_what_power_loss_takes(tmp_path: Path) -> None:
    s = open_spool(tmp_path / "spool.db", durability="batch", sync_interval_s=1.0, now=0.0)
    put(s, T, now=5.0)
    s.commit(5.02)
    assert s.next_commit_at() == pytest.approx(6.02)  # the WAL sync (checkpoint) deadline
    assert not s.commit_due(6.0)
    s.commit(6.02)
    assert s.next_commit_at() is None
    a = open_spool(tmp_path / "always.db", durability="always", now=0.0)
    put(a, T, now=5.0)
    assert a.next_commit_at() is None  # FULL syncs every commit: nothing left to do


def test_pending_reads_the_same_records_from_memory_as_from_disk(tmp_path: Path) -> None:
    """The sender's reads of just-committed rows come from memory; they must be exactly
    what a reopened spool reads from disk, across the memory bound, trims and evictions."""
    db = tmp_path / "spool.db"
    body_bytes = 900
    n = 3 * RECENT_MAX_BYTES // body_bytes  # far more than memory keeps
    row = len(encode_record(SUBJECT, b"x" * body_bytes, None, 1)) + ROW_OVERHEAD_BYTES
    s = open_spool(db, durability="batch", max_bytes=(n - 5) * row)
    s.protect(T, 0)
    got: list[int] = []
    for i in range(n):  # the last appends evict the oldest five
        body = bytes([i % 251]) * body_bytes
        got.append(s.append(T, SUBJECT, body, {"i": i}, i, 1.0))
        s.commit(1.0)
    s.acked(T, got[7])
    s.commit(1.0 + TRIM_DELAY_S)
    recent = s._lanes[T]
    assert 0 < recent.recent_bytes <= RECENT_MAX_BYTES
    assert sum(map(len, recent.recent.values())) == recent.recent_bytes
    assert min(recent.recent) > got[7]  # acknowledged rows left memory
    in_memory = s.pending(T, 0, 10_000)
    tail = s.pending(T, got[-3], 10_000)  # served from memory alone
    s.close()
    s = open_spool(db, durability="batch", max_bytes=(n - 5) * row)
    from_disk = s.pending(T, 0, 10_000)
    assert [r.seq for r in from_disk] == got[8:]  # 5 evicted lie below the acked mark
    assert in_memory == from_disk
    assert tail == from_disk[-2:]
    assert [r.attrs["i"] for r in tail] == [n - 2, n - 1]


def test_close_commits_what_is_staged(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    s = open_spool(db, durability="batch")
    a = put(s, C, 2)
    s.close()
    s.close()  # idempotent
    with pytest.raises(NotReadyError):
        put(s, C)
    assert seqs(open_spool(db, durability="batch"), C) == a


def test_acks_are_persisted_by_the_next_commit(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    s = open_spool(db, now=1.0)
    a = put(s, T, 5)
    s.acked(T, a[2])
    assert s.acked_mark(T) == a[2] and seqs(s, T) == a[3:]
    # an acknowledgement alone waits up to TRIM_DELAY_S for a commit to ride
    assert s.next_commit_at() == pytest.approx(1.0 + TRIM_DELAY_S)
    crash(s)  # the ack was not committed: the records come back (the hub dedups the resend)
    s = open_spool(db, now=2.0)
    assert s.acked_mark(T) == 0 and seqs(s, T) == a
    s.acked(T, a[2])
    s.commit(2.5)  # not due yet: nothing written
    crash(s)
    s = open_spool(db, now=3.0)
    assert s.acked_mark(T) == 0 and seqs(s, T) == a
    s.acked(T, a[2])
    s.commit(3.0 + TRIM_DELAY_S)  # due: written
    crash(s)
    s = open_spool(db, now=5.0)
    assert s.acked_mark(T) == a[2] and seqs(s, T) == a[3:]
    assert s.depth()[T] == (2, 2 * ROW)


@pytest.mark.parametrize("durability", ["always", "batch"])
def test_an_ack_rides_the_next_append_commit(tmp_path: Path, durability: str) -> None:
    db = tmp_path / "spool.db"
    s = open_spool(db, now=1.0, durability=durability)
    a = put(s, T, 5)
    s.commit(1.0)
    s.acked(T, a[2])
    b = put(s, T, 1, now=1.1)  # always: committed at once; batch: group_commit_ms later
    if durability == "batch":
        assert s.next_commit_at() == pytest.approx(1.1 + s.group_commit_s)
        s.commit(1.1 + s.group_commit_s)  # one transaction: the append and the trim
    crash(s)
    s = open_spool(db, now=3.0)
    assert s.acked_mark(T) == a[2] and seqs(s, T) == a[3:] + b


def test_a_clean_close_writes_pending_acks(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    s = open_spool(db, now=1.0)
    a = put(s, T, 5)
    s.acked(T, a[2])
    s.close(1.1)
    s = open_spool(db, now=2.0)
    assert s.acked_mark(T) == a[2] and seqs(s, T) == a[3:]


def test_a_failed_always_commit_refuses_the_record(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    s = open_spool(db)
    a = put(s, T)
    real = s._conn

    class FailingCommit:
        def execute(self, sql: str, *args: Any) -> Any:
            if sql == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error")
            return real.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    s._conn = FailingCommit()  # type: ignore[assignment]
    with pytest.raises(SpoolStorageError, match="disk I/O error"):
        put(s, T)
    assert s.depth()[T] == (1, ROW) and s.pending_info(T, 0) == (1, 1.0)
    s._conn = real
    b = put(s, T)
    assert b[0] > a[0] + 1  # the refused seq is not handed out again in this process
    crash(s)
    assert seqs(open_spool(db), T) == a + b


def test_accept_times_from_disk_are_clamped_to_open_time(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    s = open_spool(db, now=1000.0)
    put(s, T, now=1000.0)
    s.close()
    s = open_spool(db, now=5.0)  # the clock went back (reboot)
    assert s.pending_info(T, 0) == (1, 5.0)


# --- bounds and eviction -----------------------------------------------------------


def test_full_spool_evicts_bulk_first_then_telemetry_and_counts_it(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    s = open_spool(db, max_bytes=10 * ROW)
    tel = put(s, T, 4)
    bulk = put(s, B, 4)
    crit = put(s, C, 2)
    assert s.used_bytes == 10 * ROW
    tel += put(s, T)
    assert seqs(s, B) == bulk[1:]  # the oldest bulk made room
    crit += put(s, C, 3)
    assert seqs(s, B) == []
    assert seqs(s, T) == tel  # telemetry untouched while bulk remained
    crit += put(s, C)
    assert seqs(s, T) == tel[1:]  # then the oldest telemetry
    assert seqs(s, C) == crit
    assert s.evicted == {
        "critical": {REASON_EVICTED: 0},
        "telemetry": {REASON_EVICTED: 1},
        "bulk": {REASON_EVICTED: 4},
    }
    assert s.drop_totals() == {"bulk": {REASON_EVICTED: 4}, "telemetry": {REASON_EVICTED: 1}}
    assert s.drop_totals() == {"bulk": {REASON_EVICTED: 4}, "telemetry": {REASON_EVICTED: 1}}
    put(s, T)
    assert s.drop_totals() == {"bulk": {REASON_EVICTED: 4}, "telemetry": {REASON_EVICTED: 2}}
    assert s.evicted["telemetry"][REASON_EVICTED] == 2  # cumulative counters remain
    assert s.used_bytes <= s.max_bytes
    s.close()
    s = open_spool(db, max_bytes=10 * ROW)  # evictions reached the disk
    assert seqs(s, B) == [] and seqs(s, T) == [*tel[2:], s.last_seq] and seqs(s, C) == crit


def test_bulk_never_evicts_higher_lanes(tmp_path: Path) -> None:
    s = open_spool(tmp_path / "spool.db", max_bytes=4 * ROW)
    put(s, T, 2)
    put(s, C, 2)
    before = s.last_seq
    with pytest.raises(SpoolFullError, match="bulk record"):
        put(s, B)
    assert s.last_seq == before and s.depth()[B] == (0, 0)
    assert s.refused == {"critical": 0, "telemetry": 0, "bulk": 1}
    assert s.drop_totals() == {"bulk": {REASON_REFUSED: 1}}
    put(s, T)  # telemetry may evict telemetry
    assert s.depth()[T][0] == 2


def test_critical_is_never_evicted_and_is_refused_when_nothing_else_can_go(
    tmp_path: Path,
) -> None:
    s = open_spool(tmp_path / "spool.db", max_bytes=3 * ROW)
    crit = put(s, C, 2)
    put(s, B)
    crit += put(s, C)  # evicts the bulk record
    for lane in (C, T, B):
        with pytest.raises(SpoolFullError) as err:
            put(s, lane)
        assert f"{3 * ROW} of {3 * ROW} B used" in str(err.value)
    assert seqs(s, C) == crit
    assert s.evicted["critical"][REASON_EVICTED] == 0
    assert s.refused == {"critical": 1, "telemetry": 1, "bulk": 1}


def test_records_in_flight_are_protected(tmp_path: Path) -> None:
    s = open_spool(tmp_path / "spool.db", max_bytes=6 * ROW, durability="batch")
    bulk = put(s, B, 6)
    s.commit(1.0)
    s.protect(B, bulk[2])  # the sender has 1..3 on the wire
    b7 = put(s, B)
    assert seqs(s, B) == bulk[:3] + bulk[4:]  # the oldest *unprotected* went
    # before the eviction's DELETE is committed, reads skip the evicted row on disk
    assert [r.seq for r in s.pending(B, bulk[0], 4)] == [bulk[1], bulk[2], bulk[4], bulk[5]]
    s.commit(1.0)
    assert seqs(s, B) == bulk[:3] + bulk[4:] + b7
    s.protect(B, b7[0])  # everything is in flight
    with pytest.raises(SpoolFullError, match="0 B of bulk can be evicted"):
        put(s, B)
    s.acked(B, bulk[1])  # the hub got two: room for two
    b8 = put(s, B, 2)
    assert s.depth()[B] == (6, 6 * ROW)
    s.protect(B, 0)  # released (reconnect): the oldest goes first again
    b9 = put(s, B)
    s.commit(1.0)
    assert seqs(s, B) == [bulk[4], bulk[5], *b7, *b8, *b9]
    assert s.oldest_unsent_age(5.0)[B] == 4.0


def test_staged_records_count_against_the_limit_and_can_be_evicted(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    s = open_spool(db, max_bytes=3 * ROW, durability="batch")
    bulk = put(s, B, 3)
    t = put(s, T, 2)  # evicts two staged bulk records before they were ever committed
    s.commit(1.0)
    assert s.accepted == 5
    assert seqs(s, B) == bulk[2:] and seqs(s, T) == t
    crash(s)
    s = open_spool(db, max_bytes=3 * ROW, durability="batch")
    assert seqs(s, B) == bulk[2:] and seqs(s, T) == t


def test_record_limits(tmp_path: Path) -> None:
    s = open_spool(tmp_path / "spool.db", max_bytes=2000)
    with pytest.raises(RecordTooLargeError, match="subject"):
        s.append(T, "a." + "x" * 300, b"", None, 1, 1.0)
    with pytest.raises(RecordTooLargeError, match=str(MAX_RECORD_BYTES)):
        s.append(T, SUBJECT, b"x" * MAX_RECORD_BYTES, None, 1, 1.0)
    with pytest.raises(LocalProtocolError, match="scalar"):
        s.append(T, SUBJECT, b"", {"nested": {"a": 1}}, 1, 1.0)  # type: ignore[dict-item]
    with pytest.raises(LocalProtocolError, match="lane"):
        s.append(7, SUBJECT, b"", None, 1, 1.0)
    with pytest.raises(SpoolFullError, match="does not fit"):
        s.append(T, SUBJECT, b"x" * 3000, None, 1, 1.0)  # larger than the whole spool
    assert s.last_seq == 0 and s.used_bytes == 0


def test_append_many_commits_once_and_reports_partial_acceptance(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    s = open_spool(db, max_bytes=3 * ROW)
    got = s.append_many([(C, SUBJECT, BODY, None, 1), (B, SUBJECT, BODY, None, 1)], 1.0)
    assert got == [1, 2] and s.committed_seq == 2
    with pytest.raises(SpoolFullError, match="accepted 2 of 3"):
        s.append_many([(C, SUBJECT, BODY, None, 1)] * 3, 1.0)
    crash(s)
    s = open_spool(db, max_bytes=3 * ROW)
    assert seqs(s, C) == [1, 3, 4] and seqs(s, B) == []


def test_stats_for_heartbeats(tmp_path: Path) -> None:
    s = open_spool(tmp_path / "spool.db", durability="batch")
    put(s, T, 2, now=10.0)
    put(s, B, 1, now=12.0)
    s.commit(12.0)
    put(s, C, 1, now=13.0)  # staged
    assert s.depth() == {C: (1, ROW), T: (2, 2 * ROW), B: (1, ROW)}
    assert s.oldest_unsent_age(15.0) == {C: None, T: 5.0, B: 3.0}
    s.protect(T, 2)
    assert s.oldest_unsent_age(15.0)[T] is None
    assert s.last_seq == 4 and s.committed_seq == 3 and s.accepted == 3


# --- crash safety with a real SIGKILL ---------------------------------------------

_CHILD = """
import sys, time
from edge.spool import Spool
path, mode = sys.argv[1], sys.argv[2]
s = Spool(path, max_bytes=1 << 30, durability=mode, now=time.time())
print("start", s.last_seq, flush=True)
waiting, i = [], 0
while True:
    now = time.time()
    lane = i % 3
    seq = s.append(lane, "acme.truck-042.x", {"i": i}, None, i, now)
    waiting.append(f"{seq} {lane}")
    if i % 10 == 9:
        s.acked(lane, seq - 100)
    if mode == "always" or len(waiting) >= 25 or s.commit_due(now):
        s.commit(now)  # batch: accepted now; always: this only flushes acks
        print("\\n".join(waiting), flush=True)
        waiting.clear()
    i += 1
"""


def _run_and_kill(db: Path, durability: str, lines: int) -> tuple[int, list[tuple[int, int]]]:
    """Start a child appending in a loop, SIGKILL it once it printed ``lines`` accepted seqs."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db), durability],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    start = proc.stdout.readline().split()
    assert start and start[0] == "start", proc.communicate()[1]
    read: list[str] = []
    deadline = time.monotonic() + 10
    while len(read) < lines and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        read.append(line)
    os.kill(proc.pid, signal.SIGKILL)  # mid-loop: between any two instructions of the child
    proc.wait(timeout=10)
    # The rest through the same buffered readers (communicate() would read the raw pipes and
    # miss what readline() had already buffered).
    out = proc.stdout.read()
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, err
    assert len(read) >= lines, err
    accepted: list[tuple[int, int]] = []
    for line in "".join([*read, out]).split("\n")[:-1]:  # a line cut by the kill has no "\n"
        seq, lane = line.split()
        accepted.append((int(seq), int(lane)))
    return int(start[1]), accepted


@pytest.mark.parametrize("durability", ["always", "batch"])
def test_sigkill_loses_no_accepted_record_and_never_reuses_a_seq(
    tmp_path: Path, durability: str
) -> None:
    db = tmp_path / "spool.db"
    start1, run1 = _run_and_kill(db, durability, 300)
    start2, run2 = _run_and_kill(db, durability, 300)
    printed1 = [q for q, _ in run1]
    assert start1 == 0 and start2 >= max(printed1)  # the high-water mark never went back
    assert all(q > max(printed1) for q, _ in run2)
    s = open_spool(db, durability=durability)
    held = {lane: set(seqs(s, lane)) for lane in LANES}
    for seq, lane in run1 + run2:  # every accepted record is there unless acked
        assert seq in held[lane] or seq <= s.acked_mark(lane), (seq, lane)
    assert s.last_seq >= max(q for q, _ in run2)

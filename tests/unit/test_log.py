"""The hub's durable log: group commit, reads, marks, retention, consumer offsets, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.consumer import LogCursor
from hub.log import LOCAL_INCARNATION, Log, LogEntry, LogError, PendingBatch
from hub.subjects import SubjectError
from transport.batchcodec import CODEC_ZSTD, Record, encode_batch
from transport.errors import NotReadyError
from transport.events import BatchAccepted
from transport.wire import Lane

REPO = Path(__file__).resolve().parents[2]
S = 1_000_000  # microseconds per second


def recs(device: str, first: int, n: int, tenant: str = "acme") -> list[Record]:
    return [
        Record(
            seq,
            seq % 1_000_000 * 1000,
            f"{tenant}.{device}.telemetry.temp",
            {"n": seq, "unit": "C"},
            {"v": seq / 10, "ok": True},
        )
        for seq in range(first, first + n)
    ]


def batch(
    device: str,
    first: int,
    n: int,
    *,
    inc: int = 7,
    lane: int = Lane.TELEMETRY,
    at_s: float = 0.0,
    trimmed: bool = False,
    tenant: str = "acme",
) -> PendingBatch:
    records = recs(device, first, n, tenant)
    codec, payload = encode_batch(records)
    return PendingBatch(
        tenant, device, inc, lane, records, codec, None if trimmed else payload, int(at_s * S)
    )


def read_all(log: Log) -> list[LogEntry]:
    return log.read(0, 1_000_000)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "hub.db"


@pytest.fixture
def log(path: Path) -> Iterator[Log]:
    with Log(path) as lg:
        yield lg


# -- group commit and reading ---------------------------------------------------


def test_group_of_several_devices_gets_consecutive_offsets(log: Log) -> None:
    items = [batch("d1", 1, 3), batch("d2", 10, 5), batch("d3", 100, 2, lane=Lane.CRITICAL)]
    assert log.append_group(items, now=1.0) == [(1, 3), (4, 5), (9, 2)]
    assert log.next_offset == 11
    assert log.first_offset() == 1
    st = log.stats()
    assert (st.rows, st.records, st.commits) == (3, 10, 1)
    assert st.bytes == log.size_bytes() == sum(len(i.payload or b"") for i in items)
    assert log.append_group([batch("d1", 4, 2)], now=2.0) == [(11, 2)]


def test_read_returns_records_in_offset_order_with_their_fields(log: Log) -> None:
    log.append_group([batch("d1", 1, 3, at_s=5.0), batch("d2", 10, 5, inc=9, at_s=6.0)], 6.0)
    got = read_all(log)
    assert [e.offset for e in got] == list(range(1, 9))
    assert [(e.device, e.seq) for e in got] == [("d1", s) for s in (1, 2, 3)] + [
        ("d2", s) for s in range(10, 15)
    ]
    e = got[4]  # d2 seq 11
    assert e == LogEntry(
        offset=5,
        tenant="acme",
        device="d2",
        incarnation=9,
        lane=Lane.TELEMETRY,
        seq=11,
        ts=11_000,
        subject="acme.d2.telemetry.temp",
        attrs={"n": 11, "unit": "C"},
        body={"v": 1.1, "ok": True},
        received_us=6 * S,
    )
    assert got[0].received_us == 5 * S


def test_read_starts_inside_a_batch_and_stops_at_max_records(log: Log) -> None:
    log.append_group([batch("d1", 1, 3), batch("d2", 10, 5), batch("d3", 50, 2)], 1.0)
    assert [e.offset for e in log.read(5, 3)] == [5, 6, 7]  # inside d2's batch (4..8)
    assert [(e.offset, e.seq) for e in log.read(8, 3)] == [(8, 14), (9, 50), (10, 51)]
    assert [e.seq for e in log.read(3, 1)] == [3]
    assert log.read(11, 10) == []
    assert log.read(1, 0) == []


def test_trimmed_batch_is_stored_re_encoded(log: Log) -> None:
    item = batch("d1", 5, 4, trimmed=True)
    assert item.payload is None
    assert log.append_group([item], 1.0) == [(1, 4)]
    assert [(e.seq, e.body) for e in read_all(log)] == [(r.seq, r.body) for r in item.records]
    assert log.size_bytes() > 0


def test_pending_batch_from_a_session_event() -> None:
    records = recs("d1", 1, 2)
    last = records[-1].seq
    event = BatchAccepted(Lane.BULK, 3, 1, last, len(records), CODEC_ZSTD, None, records, 99)
    pending = PendingBatch.from_accepted("acme", "d1", event, received_us=42)
    assert pending == PendingBatch("acme", "d1", 3, Lane.BULK, records, CODEC_ZSTD, None, 42)


def test_u64_seq_and_incarnation_round_trip(path: Path) -> None:
    big = (1 << 64) - 10
    with Log(path) as log:
        log.append_group([batch("d1", big, 3, inc=big - 5)], 1.0)
        assert [(e.seq, e.incarnation) for e in read_all(log)] == [
            (big + i, big - 5) for i in range(3)
        ]
        assert log.append_group([batch("d1", big, 2, inc=big - 5)], 2.0) == [(4, 0)]
    with Log(path) as log:
        ledger = log.load_ledgers()[("acme", "d1")][big - 5]
        assert ledger.lanes[Lane.TELEMETRY].committed == big + 2


# -- marks and dedup ---------------------------------------------------------------


def test_marks_persist_and_rebuild_ledgers_after_reopen(path: Path) -> None:
    with Log(path) as log:
        log.append_group([batch("d1", 1, 3), batch("d1", 10, 2, lane=Lane.BULK)], 1.0)
        log.append_group([batch("d1", 4, 2), batch("d2", 1, 1, inc=3)], 2.0)
        log.append_local("acme", "d1", "acme.d1.presence", "online", {}, 2.5)
    with Log(path) as log:
        ledgers = log.load_ledgers()
    assert set(ledgers) == {("acme", "d1"), ("acme", "d2")}
    assert set(ledgers[("acme", "d1")]) == {7}  # the hub's own incarnation 0 is not a ledger
    d1 = ledgers[("acme", "d1")][7]
    assert d1.held() == {Lane.TELEMETRY: 5, Lane.BULK: 11}
    assert d1.lanes[Lane.TELEMETRY].accepted == 5
    assert d1.lanes[Lane.BULK].accepted == 11
    assert d1.lanes[Lane.CRITICAL].committed == 0
    assert ledgers[("acme", "d2")][3].held() == {Lane.TELEMETRY: 1}


def test_batches_the_marks_already_hold_are_skipped_or_trimmed(log: Log) -> None:
    log.append_group([batch("d1", 1, 5)], 1.0)
    # a whole repeat, an overlap (3..7 -> 6, 7), and a repeat inside the same group
    got = log.append_group([batch("d1", 1, 5), batch("d1", 3, 5), batch("d1", 7, 1)], 2.0)
    assert got == [(6, 0), (6, 2), (8, 0)]
    assert [e.seq for e in read_all(log)] == [1, 2, 3, 4, 5, 6, 7]
    assert log.stats().duplicates_skipped == 5 + 3 + 1
    assert log.append_group([batch("d1", 1, 5, inc=8)], 3.0) == [(8, 5)]  # new incarnation
    empty = PendingBatch("acme", "d9", 1, Lane.BULK, [], CODEC_ZSTD, None, 0)
    assert log.append_group([empty], 4.0) == [(13, 0)]
    assert ("acme", "d9") not in log.load_ledgers()


def test_marks_another_connection_wrote_are_honoured(path: Path) -> None:
    """The log keeps the marks it committed in memory; a write by anyone else must void that."""
    with Log(path) as log:
        assert log.append_group([batch("d1", 1, 5)], 1.0) == [(1, 5)]
        other = sqlite3.connect(path)
        try:
            other.execute("UPDATE marks SET committed_seq = 10 WHERE device = 'd1'")
            other.commit()
        finally:
            other.close()
        assert log.append_group([batch("d1", 6, 3)], 2.0) == [(6, 0)]  # 6..8 are held
        assert log.append_group([batch("d1", 9, 3)], 3.0) == [(6, 1)]  # 9, 10 held: 11 new
        assert [e.seq for e in read_all(log)] == [1, 2, 3, 4, 5, 11]


def test_incarnations_per_device_are_bounded_oldest_dropped(path: Path) -> None:
    with Log(path, max_incarnations_per_device=2) as log:
        for i, inc in enumerate((11, 12, 13), start=1):
            log.append_group([batch("d1", 1, 2, inc=inc), batch("d2", 1, 1, inc=inc)], float(i))
        log.append_group([batch("d1", 3, 1, inc=12)], 4.0)  # 12 is now the most recent
        log.append_group([batch("d1", 1, 1, inc=14)], 5.0)
        assert log.stats().incarnations_dropped == 3  # d1: 11, then 13; d2: 11
        assert set(log.load_ledgers()[("acme", "d1")]) == {12, 14}
        assert set(log.load_ledgers()[("acme", "d2")]) == {12, 13}
        # documented cost: a forgotten incarnation's old records are stored again
        assert log.append_group([batch("d1", 1, 2, inc=11)], 6.0)[0][1] == 2


# -- durability of offsets ----------------------------------------------------------


def test_offsets_are_never_reused_after_reopen(path: Path) -> None:
    with Log(path, retention_max_age_s=10.0) as log:
        log.append_group([batch("d1", 1, 4, at_s=0.0)], 0.0)
        assert log.apply_retention(now=100.0) == 1
        assert log.first_offset() == log.next_offset == 5
    with Log(path) as log:
        assert (log.first_offset(), log.next_offset) == (5, 5)
        assert log.append_group([batch("d1", 5, 1)], 101.0) == [(5, 1)]
        assert log.verify() == []


def test_open_repairs_a_next_offset_behind_the_stored_batches(path: Path) -> None:
    with Log(path) as log:
        log.append_group([batch("d1", 1, 4)], 0.0)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 2 WHERE key = 'next_offset'")
    with Log(path) as log:
        assert log.next_offset == 5
        assert log.stats().repaired_on_open == 1
        assert log.append_group([batch("d1", 5, 1)], 1.0) == [(5, 1)]


def test_failed_commit_rolls_back_everything(path: Path) -> None:
    with Log(path) as log:
        log.append_group([batch("d1", 1, 2)], 0.0)
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON batches WHEN NEW.device = 'bad' "
            "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
        )
    with Log(path) as log:
        with pytest.raises(LogError, match="disk says no"):
            log.append_group([batch("d1", 3, 2), batch("bad", 1, 1)], 1.0)
        assert log.next_offset == 3
        assert log.stats().commit_failures == 1
        assert [e.seq for e in read_all(log)] == [1, 2]
        assert log.load_ledgers()[("acme", "d1")][7].held() == {Lane.TELEMETRY: 2}
        assert log.append_group([batch("d1", 3, 2)], 2.0) == [(3, 2)]  # the log still works
        assert log.verify() == []


def test_open_refuses_a_file_that_is_not_a_log(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LogError, match="cannot open log"):
        Log(junk)


def test_closed_log_raises_not_ready(path: Path) -> None:
    log = Log(path)
    log.close()
    log.close()  # idempotent
    with pytest.raises(NotReadyError):
        log.append_group([batch("d1", 1, 1)], 0.0)


# -- retention ---------------------------------------------------------------------------


def three_batches(log: Log) -> None:
    """Offsets 1-4, 5-8, 9-12, received at 10 s, 20 s, 30 s."""
    for i, at in enumerate((10.0, 20.0, 30.0)):
        log.append_group([batch("d1", 1 + 4 * i, 4, at_s=at)], at)


def test_retention_by_age_removes_whole_oldest_batches(path: Path) -> None:
    with Log(path, retention_max_age_s=15.0) as log:
        three_batches(log)
        assert log.apply_retention(now=25.0) == 0  # cutoff 10 s: nothing is older
        assert log.apply_retention(now=31.0) == 1  # cutoff 16 s: the 10 s batch
        assert log.first_offset() == 5
        assert log.apply_retention(now=60.0) == 2
        assert log.first_offset() == log.next_offset == 13
        st = log.stats()
        assert (st.rows, st.records, st.bytes) == (0, 0, 0)
        assert (st.retention_rows_removed, st.retention_records_removed) == (3, 12)


def test_retention_by_size_keeps_the_newest_under_the_limit(path: Path) -> None:
    sizes = [len(batch("d1", 1 + 4 * i, 4).payload or b"") for i in range(3)]
    with Log(path, retention_max_bytes=sizes[1] + sizes[2]) as log:
        three_batches(log)
        assert log.size_bytes() == sum(sizes)
        assert log.apply_retention(now=30.0) == 1
        assert log.size_bytes() == sizes[1] + sizes[2]
        assert [e.offset for e in read_all(log)] == list(range(5, 13))
        assert log.apply_retention(now=30.0) == 0


def test_retention_never_removes_at_or_after_protect_from(path: Path) -> None:
    with Log(path, retention_max_age_s=1.0) as log:
        three_batches(log)
        # the consumer stands at offset 6: batch 5-8 holds unread records, stop before it
        assert log.apply_retention(now=100.0, protect_from=6) == 1
        assert log.first_offset() == 5
        assert log.stats().retention_blocked == 1
        assert log.apply_retention(now=100.0, protect_from=9) == 1
        assert log.apply_retention(now=100.0, protect_from=13) == 1
        assert log.stats().retention_blocked == 2
        assert log.stats().dropped_unconsumed == 0


def test_hard_size_limit_deletes_unconsumed_records_and_counts_them(path: Path) -> None:
    sizes = [len(batch("d1", 1 + 4 * i, 4).payload or b"") for i in range(3)]
    soft, hard = sizes[2], sizes[1] + sizes[2]
    with Log(path, retention_max_bytes=soft, retention_hard_max_bytes=hard) as log:
        three_batches(log)
        assert log.apply_retention(now=30.0, protect_from=3) == 1  # hard limit only
        st = log.stats()
        assert st.dropped_unconsumed == 2  # offsets 3 and 4 were never read
        assert st.retention_blocked == 1  # the soft limit still wants more gone
        assert log.first_offset() == 5


def test_retention_removes_at_most_max_rows_per_call(path: Path) -> None:
    with Log(path, retention_max_age_s=1.0) as log:
        three_batches(log)
        assert log.apply_retention(now=100.0, max_rows=2) == 2
        assert log.apply_retention(now=100.0, max_rows=2) == 1


def test_hard_limit_below_soft_limit_is_refused(path: Path) -> None:
    with pytest.raises(LogError):
        Log(path, retention_max_bytes=100, retention_hard_max_bytes=10)


# -- hub-published records ---------------------------------------------------------------


def test_append_local_seqs_persist_across_reopen(path: Path) -> None:
    with Log(path) as log:
        log.append_group([batch("d1", 1, 2)], 1.0)
        assert log.append_local("acme", "d1", "acme.d1.presence", "online", {"by": "hub"}, 2.0) == 3
        assert log.append_local("acme", "d1", "acme.d1.presence", "stale", {}, 3.0) == 4
        assert log.append_local("acme", "d2", "acme.d2.presence", "online", {}, 3.0) == 5
    with Log(path) as log:
        assert log.append_local("acme", "d1", "acme.d1.presence", "offline", {}, 4.0) == 6
        local = [e for e in read_all(log) if e.incarnation == LOCAL_INCARNATION]
    assert [(e.device, e.seq, e.body) for e in local] == [
        ("d1", 1, "online"),
        ("d1", 2, "stale"),
        ("d2", 1, "online"),
        ("d1", 3, "offline"),
    ]
    first = local[0]
    assert (first.lane, first.attrs, first.ts, first.received_us) == (
        Lane.TELEMETRY,
        {"by": "hub"},
        2 * S,
        2 * S,
    )


def test_append_local_refuses_a_subject_outside_the_device(log: Log) -> None:
    with pytest.raises(SubjectError):
        log.append_local("acme", "d1", "acme.d2.presence", "online", {}, 1.0)
    with pytest.raises(SubjectError):
        log.append_local("acme", "d1", "acme.d1.*", "online", {}, 1.0)
    assert log.next_offset == 1


# -- durable consumers ---------------------------------------------------------------------


def test_consumer_offsets_persist(path: Path) -> None:
    with Log(path) as log:
        log.append_group([batch("d1", 1, 5)], 1.0)
        assert log.consumer_offset("archive") == 0
        log.commit_consumer_offset("archive", 4)
        log.commit_consumer_offset("alerts", 6)
        with pytest.raises(LogError):
            log.commit_consumer_offset("archive", 7)  # beyond next_offset
    with Log(path) as log:
        assert log.consumer_offset("archive") == 4
        assert log.consumer_offsets() == {"archive": 4, "alerts": 6}
        log.commit_consumer_offset("archive", 2)  # a deliberate replay
        assert log.consumer_offset("archive") == 2
        assert log.remove_consumer("alerts") is True
        assert log.remove_consumer("alerts") is False
        assert log.consumer_offsets() == {"archive": 2}


# -- crash safety ----------------------------------------------------------------------------

CHILD = r"""
import json, sys
from hub.log import Log, PendingBatch
from transport.batchcodec import Record, encode_batch

log = Log(sys.argv[1])
devices = [f"d{i}" for i in range(6)]
seqs = dict.fromkeys(devices, 0)
group = 0
while True:
    items, sizes = [], []
    for i, dev in enumerate(devices):
        n = 1 + (group * 7 + i * 3) % 40
        records = [
            Record(seqs[dev] + 1 + k, k, f"acme.{dev}.t", {"g": group}, {"k": k, "pad": "x" * 50})
            for k in range(n)
        ]
        codec, payload = encode_batch(records)
        items.append(PendingBatch("acme", dev, 5, 1, records, codec, payload, group))
        sizes.append(n)
    result = log.append_group(items, float(group))
    for dev, n in zip(devices, sizes):
        seqs[dev] += n
    print(json.dumps([group, result]), flush=True)
    group += 1
"""


def test_sigkill_during_group_commits_leaves_a_consistent_log(path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    reported: dict[int, list[list[int]]] = {}
    try:
        for line in child.stdout:
            group, result = json.loads(line)
            reported[group] = result
            if len(reported) == 60:
                os.kill(child.pid, signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(timeout=10)
    # Read what is left through the same buffered reader: communicate() would read the raw
    # pipe and miss lines the iterator had already buffered.
    rest = child.stdout.read()
    for line in rest.splitlines():  # printed (so committed) before the kill landed
        group, result = json.loads(line)
        reported[group] = result
    assert child.returncode == -signal.SIGKILL
    assert len(reported) >= 60

    with Log(path) as log:
        assert log.verify() == []
        entries = read_all(log)
        ledgers = log.load_ledgers()
    assert [e.offset for e in entries] == list(range(1, log.next_offset))
    by_offset = {e.offset: e for e in entries}
    for group, result in reported.items():  # every reported group is there, where it was said
        for i, (base, count) in enumerate(result):
            got = [by_offset[o] for o in range(base, base + count)]
            assert {(e.device, e.attrs["g"]) for e in got} == {(f"d{i}", group)}
    groups = sorted({int(e.attrs["g"] or 0) for e in entries})
    assert groups == list(range(len(groups)))  # whole groups only, at most one unreported
    assert len(groups) - len(reported) in (0, 1)
    for i in range(6):  # each (device, seq) exactly once, in order; marks match the data
        seqs = [e.seq for e in entries if e.device == f"d{i}"]
        assert seqs == list(range(1, len(seqs) + 1))
        assert ledgers[("acme", f"d{i}")][5].held() == {Lane.TELEMETRY: len(seqs)}


def test_the_log_makes_its_folder(tmp_path: Path) -> None:
    """A fresh install's hub.yaml points into a folder that does not exist yet."""
    log = Log(tmp_path / "run" / "deeper" / "hub.db")
    try:
        assert (tmp_path / "run" / "deeper" / "hub.db").exists()
    finally:
        log.close()


def test_a_corrupt_batch_is_skipped_by_readers_counted_once_and_listed_by_verify(
    log: Log, path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ingest validated every batch; a row that no longer decodes is the storage's doing.
    One such row must not stop every consumer behind it: readers skip it as they skip what
    retention removed, it is reported once, and verify lists it."""
    log.append_group([batch("t1", 1, 3), batch("t2", 1, 4), batch("t3", 1, 2)], 1.0)
    with sqlite3.connect(path) as db:  # the storage flips bytes in the middle batch
        db.execute("UPDATE batches SET payload = ? WHERE base_offset = 4", (b"\xc1" * 40,))
    caplog.set_level("ERROR", logger="squall.hub.log")
    for _ in range(3):  # consumers re-read; each sees the same, it is reported once
        entries = read_all(log)
        assert [(e.device, e.seq) for e in entries] == [
            ("t1", 1), ("t1", 2), ("t1", 3), ("t3", 1), ("t3", 2)
        ]  # fmt: skip
        assert [e.offset for e in entries] == [1, 2, 3, 8, 9]
    assert [e.offset for e in log.read(4, 2)] == [8, 9]  # a read starting inside it
    stats = log.stats()
    assert (stats.corrupt_batches, stats.corrupt_records) == (1, 4)
    (report,) = [r.getMessage() for r in caplog.records]
    assert "offsets 4..7 (acme.t2, incarnation 7, lane 1, 4 records) is corrupt" in report
    (problem,) = log.verify()
    assert problem == "1 batches do not decode (at offsets 4)"


def test_a_durable_cursor_reads_past_a_corrupt_batch_in_small_steps(log: Log, path: Path) -> None:
    log.append_group([batch("t1", 1, 3), batch("t2", 1, 4), batch("t3", 1, 2)], 1.0)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE batches SET payload = ? WHERE base_offset = 4", (b"\xc1" * 40,))
    cursor = LogCursor(log, "archive")
    seen: list[int] = []
    after = 0
    for _ in range(10):
        entries, last = cursor.read(after, 2)  # steps smaller than the corrupt batch
        seen += [e.offset for e in entries]
        if last == after:
            break
        cursor.commit(last)
        after = last
    assert seen == [1, 2, 3, 8, 9]
    assert cursor.committed == 9
    assert (cursor.stats.skipped_corrupt, cursor.stats.skipped_by_retention) == (4, 0)


def test_a_cursor_tells_retention_from_corruption(path: Path) -> None:
    """What retention removed lies before the log's first offset; a gap after it is a batch
    the log skipped as corrupt, whether it leads the read or sits inside it."""
    with Log(path, retention_max_age_s=15.0) as log:
        three_batches(log)  # offsets 1-4, 5-8, 9-12
        log.append_group([batch("d1", 13, 4, at_s=40.0)], 40.0)  # 13-16
        with sqlite3.connect(path) as db:
            db.execute("UPDATE batches SET payload = ? WHERE base_offset = 5", (b"\xc1" * 40,))
            db.execute("UPDATE batches SET payload = ? WHERE base_offset = 13", (b"\xc1" * 40,))
        assert log.apply_retention(now=31.0) == 1  # the 10 s batch: offsets 1-4
        cursor = LogCursor(log, "archive")
        entries, last = cursor.read(0, 100)
        assert [e.offset for e in entries] == [9, 10, 11, 12]
        assert last == 12
        assert (cursor.stats.skipped_by_retention, cursor.stats.skipped_corrupt) == (4, 4)
        log.append_group([batch("d1", 17, 2, at_s=41.0)], 41.0)  # 17-18, past a corrupt 13-16
        entries, last = cursor.read(last, 100)
        assert [e.offset for e in entries] == [17, 18]
        assert (cursor.stats.skipped_by_retention, cursor.stats.skipped_corrupt) == (4, 8)
        assert cursor.stats.read == 6


def test_retention_between_a_readers_questions_is_not_taken_for_corruption(path: Path) -> None:
    """A reader learns the log's first offset and reads as of one moment: a retention pass
    that ran between two separate questions made the rows it removed look like a corrupt
    batch's (a gap past the first offset the reader had been told)."""
    with Log(path, retention_max_age_s=15.0) as log:
        three_batches(log)  # offsets 1-4 (at 10 s), 5-8, 9-12
        real_first = log.first_offset

        def first_then_retention() -> int:  # retention runs right after the answer
            first = real_first()
            log.apply_retention(now=31.0)
            return first

        log.first_offset = first_then_retention  # type: ignore[method-assign]
        cursor = LogCursor(log, "archive")
        entries, last = cursor.read(0, 100)
        assert [e.offset for e in entries] == list(range(1, 13)) and last == 12
        assert (cursor.stats.skipped_by_retention, cursor.stats.skipped_corrupt) == (0, 0)
        log.first_offset = real_first  # type: ignore[method-assign]
        assert log.apply_retention(now=31.0) == 1  # the reader asked once: nothing ran yet
        assert log.read_with_first(1, 100)[0] == 5
        entries, last = cursor.read(0, 100)  # from the start again: 1-4 are retention's
        assert [e.offset for e in entries] == list(range(5, 13)) and last == 12
        assert (cursor.stats.skipped_by_retention, cursor.stats.skipped_corrupt) == (4, 0)


def test_the_first_offset_and_the_rows_are_one_snapshot_across_processes(path: Path) -> None:
    """Another process's retention (another connection) deleting between the reader's two
    queries is not seen by the second: both read one snapshot."""
    with Log(path) as log:
        three_batches(log)  # offsets 1-4, 5-8, 9-12
        real_first_of = log._first_of

        def first_of_then_delete(min_base: int | None) -> int:
            with sqlite3.connect(path) as other:  # between the two queries
                other.execute("DELETE FROM batches WHERE base_offset = 1")
            return real_first_of(min_base)

        log._first_of = first_of_then_delete  # type: ignore[method-assign]
        first, entries = log.read_with_first(1, 100)
        assert first == 1 and [e.offset for e in entries] == list(range(1, 13))
        log._first_of = real_first_of  # type: ignore[method-assign]
        first, entries = log.read_with_first(1, 100)  # the delete, seen by the next read
        assert first == 5 and [e.offset for e in entries] == list(range(5, 13))

"""The hub's dedup ledgers are bounded per device (hub/ingest.py ``LedgerBook``).

A device that names incarnation after incarnation pushes out its own least recently used
ledgers, never another device's; an incarnation that comes back is read again from the
SQLite log's marks, so what the log holds is still refused a second time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.ingest import LedgerBook
from hub.log import Log, LogError, PendingBatch
from transport.batchcodec import CODEC_NONE, Record
from transport.session import DeviceLedger
from transport.wire import Lane

LANE = int(Lane.TELEMETRY)


def test_a_device_cycling_incarnations_keeps_only_its_newest() -> None:
    book = LedgerBook(per_device=4)
    other = book.get("acme", "steady", 1)
    other.lanes[LANE].committed = 7
    for inc in range(1, 1001):
        book.get("acme", "flapper", inc)
    assert book.incarnations("acme", "flapper") == [997, 998, 999, 1000]
    assert book.held == 5  # 4 of the flapper, 1 of the steady device
    assert book.evicted == 996
    assert book.get("acme", "steady", 1) is other  # untouched
    assert book.get("acme", "steady", 1).lanes[LANE].committed == 7


def test_a_used_incarnation_is_kept_over_older_ones() -> None:
    book = LedgerBook(per_device=3)
    first = book.get("acme", "truck", 1)
    book.get("acme", "truck", 2)
    book.get("acme", "truck", 3)
    assert book.get("acme", "truck", 1) is first  # used again: now the newest
    book.get("acme", "truck", 4)  # pushes out 2, the least recently used
    assert book.incarnations("acme", "truck") == [3, 1, 4]
    assert book.evicted == 1


def test_the_start_state_is_bounded_too() -> None:
    start = {("acme", "truck"): {i: DeviceLedger(i) for i in range(10)}}
    book = LedgerBook(start, per_device=4)
    assert book.held == 4 and book.evicted == 6
    assert book.incarnations("acme", "truck") == [6, 7, 8, 9]


def test_bound_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LedgerBook(per_device=0)


def _batch(device: str, incarnation: int, first: int, last: int) -> PendingBatch:
    records = [
        Record(seq, seq * 1000, f"acme.{device}.telemetry.x", {}, {"n": seq})
        for seq in range(first, last + 1)
    ]
    return PendingBatch("acme", device, incarnation, LANE, records, CODEC_NONE, None, 1)


def test_an_evicted_incarnation_comes_back_with_the_logs_marks(tmp_path: Path) -> None:
    log = Log(tmp_path / "hub.db")
    log.append_group([_batch("truck", 1, 1, 5)], 1.0)
    book = LedgerBook(log.load_ledgers(), per_device=2, load=log.load_ledger)
    assert book.get("acme", "truck", 1).lanes[LANE].committed == 5
    book.get("acme", "truck", 2)
    book.get("acme", "truck", 3)  # incarnation 1 is out of memory ...
    assert book.incarnations("acme", "truck") == [2, 3]
    back = book.get("acme", "truck", 1)  # ... and read again from the log
    assert (back.lanes[LANE].accepted, back.lanes[LANE].committed) == (5, 5)
    assert book.get("acme", "truck", 9).lanes[LANE].committed == 0  # never stored: empty
    assert log.load_ledger("acme", "truck", 9) is None
    # a resend of what the log holds is still stored once
    log.append_group([_batch("truck", 1, 1, 5)], 2.0)
    stats = log.stats()
    assert (stats.records, stats.duplicates_skipped) == (5, 5)
    log.close()


def test_a_load_that_fails_is_counted_and_the_ledger_starts_empty() -> None:
    def broken(tenant: str, device: str, incarnation: int) -> DeviceLedger | None:
        raise LogError("log hub.db: disk I/O error")

    book = LedgerBook(load=broken)
    ledger = book.get("acme", "truck", 3)
    assert ledger.incarnation == 3 and ledger.lanes[LANE].committed == 0
    assert book.load_failures == 1 and book.held == 1

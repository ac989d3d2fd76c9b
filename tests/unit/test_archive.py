"""JSON-lines archive: each log record written once, across crashes between write and commit."""

from __future__ import annotations

import json
from pathlib import Path

from hub.archive import JsonArchive
from hub.log import Log, PendingBatch
from transport.batchcodec import Record, encode_batch


def _fill(log: Log, device: str, first: int, n: int) -> None:
    recs = [Record(s, s, f"acme.{device}.x", {}, {"n": s}) for s in range(first, first + n)]
    codec, payload = encode_batch(recs)
    log.append_group([PendingBatch("acme", device, 1, 1, recs, codec, payload, 0)], 0.0)


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_crash_between_write_and_commit_writes_nothing_twice(tmp_path: Path) -> None:
    log = Log(str(tmp_path / "hub.db"))
    _fill(log, "t1", 1, 50)
    a = JsonArchive(log, tmp_path / "arch")
    assert a.poll() == 50
    _fill(log, "t1", 51, 50)
    # crash: lines written and synced, offset not committed
    real = log.commit_consumer_offset
    log.commit_consumer_offset = lambda name, off: None  # type: ignore[method-assign]
    a.poll()
    log.commit_consumer_offset = real  # type: ignore[method-assign]
    a.close()
    with (tmp_path / "arch" / "acme.jsonl").open("a") as f:
        f.write('{"offset": 999, "tor')  # a torn line from the crash
    b = JsonArchive(log, tmp_path / "arch")
    _fill(log, "t1", 101, 10)
    while b.poll():
        pass
    b.close()
    lines = _lines(tmp_path / "arch" / "acme.jsonl")
    seqs = [x["seq"] for x in lines]
    assert seqs == list(range(1, 111))
    assert b.stats.skipped_present == 50
    log.close()


def test_rotation_keeps_offsets(tmp_path: Path) -> None:
    log = Log(str(tmp_path / "hub.db"))
    _fill(log, "t1", 1, 200)
    a = JsonArchive(log, tmp_path / "arch", rotate_bytes=2000)
    while a.poll(40):
        pass
    a.close()
    files = sorted((tmp_path / "arch").glob("acme*.jsonl"))
    assert len(files) > 1 and a.stats.rotations >= 1
    seqs = sorted(x["seq"] for f in files for x in _lines(f))
    assert seqs == list(range(1, 201))
    log.close()

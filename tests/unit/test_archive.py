"""JSON-lines archive: each log record written once, across crashes between write and commit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hub.archive import ArchiveSettings, JsonArchive
from hub.log import Log, PendingBatch
from transport.batchcodec import Record, encode_batch
from transport.configload import build
from transport.errors import ConfigError


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


# --- rotation by age, with a manual clock ------------------------------------------------


class Clock:
    """A manual wall clock for the archive."""

    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _archived(d: Path) -> list[dict[str, Any]]:
    """Every line of acme's files, rotated ones first (acme.1, acme.2, ..., then acme)."""
    rotated = sorted(d.glob("acme.*.jsonl"), key=lambda p: int(p.name.split(".")[1]))
    current = [d / "acme.jsonl"] if (d / "acme.jsonl").exists() else []
    return [x for f in rotated + current for x in _lines(f)]


def test_rotation_by_age_counts_from_the_first_line(tmp_path: Path) -> None:
    log = Log(str(tmp_path / "hub.db"))
    clock = Clock()
    arch = tmp_path / "arch"
    a = JsonArchive(log, arch, rotate_age_s=60.0, now=clock)
    _fill(log, "t1", 1, 10)
    assert a.poll() == 10
    clock.t += 59.9
    _fill(log, "t1", 11, 5)
    assert a.poll() == 5
    assert a.stats.rotations == 0 and not (arch / "acme.1.jsonl").exists()
    clock.t += 0.1
    assert a.poll() == 0  # nothing new, yet the file is old enough: rotated while idle
    assert a.stats.rotations == a.stats.rotations_by_age == 1
    assert [x["seq"] for x in _lines(arch / "acme.1.jsonl")] == list(range(1, 16))
    assert not (arch / "acme.jsonl").exists()
    clock.t += 1000.0  # an idle tenant with no current file has nothing to rotate
    assert a.poll() == 0 and a.stats.rotations == 1
    _fill(log, "t1", 16, 5)
    assert a.poll() == 5  # the new file's age starts with its first line, now
    clock.t += 59.0
    a.poll()
    assert a.stats.rotations == 1
    clock.t += 1.0
    a.poll()
    assert a.stats.rotations == 2
    assert [x["seq"] for x in _lines(arch / "acme.2.jsonl")] == list(range(16, 21))
    a.close()
    log.close()


def test_age_survives_a_restart(tmp_path: Path) -> None:
    log = Log(str(tmp_path / "hub.db"))
    clock = Clock()
    arch = tmp_path / "arch"
    a = JsonArchive(log, arch, rotate_age_s=100.0, now=clock)
    _fill(log, "t1", 1, 3)
    a.poll()
    a.close()
    clock.t += 70.0  # restart: the file is 70 s old, not new
    b = JsonArchive(log, arch, rotate_age_s=100.0, now=clock)
    _fill(log, "t1", 4, 3)
    b.poll()
    assert b.stats.rotations == 0
    clock.t += 30.0
    b.poll()
    assert b.stats.rotations == 1
    assert [x["seq"] for x in _lines(arch / "acme.1.jsonl")] == list(range(1, 7))
    b.close()
    log.close()


def test_an_archive_from_before_age_rotation_starts_its_age_at_open(tmp_path: Path) -> None:
    log = Log(str(tmp_path / "hub.db"))
    arch = tmp_path / "arch"
    a = JsonArchive(log, arch)
    _fill(log, "t1", 1, 3)
    a.poll()
    a.close()
    for marker in arch.glob("*.since"):
        marker.unlink()
    clock = Clock(5_000.0)
    b = JsonArchive(log, arch, rotate_age_s=10.0, now=clock)
    b.poll()
    assert b.stats.rotations == 0
    clock.t += 10.0
    b.poll()
    assert b.stats.rotations == 1
    b.close()
    log.close()


def _crash_in_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, commit_too: bool) -> None:
    """Rotation dies at the rename (or just after it, before the commit); nothing is repeated."""
    log = Log(str(tmp_path / "hub.db"))
    clock = Clock()
    arch = tmp_path / "arch"
    a = JsonArchive(log, arch, rotate_age_s=10.0, now=clock)
    _fill(log, "t1", 1, 20)
    a.poll()
    _fill(log, "t1", 21, 20)
    clock.t += 10.0
    real_rename = Path.rename

    def failing_rename(self: Path, target: Path) -> Path:
        if commit_too:
            real_rename(self, target)
        raise OSError("killed")

    with monkeypatch.context() as m:
        m.setattr(Path, "rename", failing_rename)
        m.setattr(log, "commit_consumer_offset", lambda name, off: None)
        with pytest.raises(OSError, match="killed"):
            a.poll()  # writes 21..40, then rotation is cut short
    a.close()
    b = JsonArchive(log, arch, rotate_age_s=10.0, now=clock)
    _fill(log, "t1", 41, 5)
    while b.poll():
        pass
    clock.t += 10.0
    b.poll()
    b.close()
    seqs = [x["seq"] for x in _archived(arch)]
    assert sorted(seqs) == list(range(1, 46)) and len(seqs) == 45
    assert b.stats.skipped_present == 20
    log.close()


def test_crash_before_the_rename_writes_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _crash_in_rename(tmp_path, monkeypatch, commit_too=False)


def test_crash_after_the_rename_writes_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _crash_in_rename(tmp_path, monkeypatch, commit_too=True)


def test_size_and_age_together_keep_every_line_once(tmp_path: Path) -> None:
    log = Log(str(tmp_path / "hub.db"))
    clock = Clock()
    a = JsonArchive(log, tmp_path / "arch", rotate_bytes=3000, rotate_age_s=5.0, now=clock)
    for i in range(20):
        _fill(log, "t1", 1 + 10 * i, 10)
        clock.t += 6.0 if i % 5 == 4 else 0.5
        a.poll(7)
    while a.poll():
        pass
    a.close()
    seqs = [x["seq"] for x in _archived(tmp_path / "arch")]
    assert seqs == list(range(1, 201))
    assert a.stats.rotations_by_age >= 1 and a.stats.rotations > a.stats.rotations_by_age
    log.close()


# --- a selection archives a subset -------------------------------------------------------


def test_selection_archives_a_subset_and_commits_past_the_rest(tmp_path: Path) -> None:
    log = Log(str(tmp_path / "hub.db"))
    recs = [
        Record(s, s, "acme.t1.log.auth" if s % 2 else "acme.t1.telemetry.gps", {"sev": s % 5}, {})
        for s in range(1, 41)
    ]
    codec, payload = encode_batch(recs)
    log.append_group([PendingBatch("acme", "t1", 1, 1, recs, codec, payload, 0)], 0.0)
    settings = build(
        ArchiveSettings,
        {"directory": str(tmp_path / "arch"), "subject": "acme.*.log.>", "filter": "attrs.sev < 3"},
        path="hub.yaml",
        key="archives[0]",
    )
    a = JsonArchive.from_settings(log, settings)
    wanted = [s for s in range(1, 41) if s % 2 and s % 5 < 3]
    assert a.poll() == len(wanted)
    assert [x["seq"] for x in _lines(tmp_path / "arch" / "acme.jsonl")] == wanted
    assert log.consumer_offset("archive") == 40  # past the entries it does not want
    a.close()
    log.close()


def test_archive_settings_are_strict_and_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        build(ArchiveSettings, {"rotate_size": 1}, path="hub.yaml")
    for bad in ({"rotate_age_s": -1}, {"rotate_bytes": 0}, {"filter": "a =="}, {"subject": ""}):
        with pytest.raises(ConfigError):
            build(ArchiveSettings, bad, path="hub.yaml")

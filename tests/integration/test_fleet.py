"""`squall fleet` end to end on real sockets: a small fleet through the link proxy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from transport.cli import main

pytestmark = pytest.mark.integration


def test_small_fleet_with_an_outage_delivers_everything_once(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    code = main(
        [
            "fleet",
            "--devices", "8",
            "--rate", "5",
            "--duration", "8",
            "--profile", "3g-good",
            "--outage-at", "2",
            "--outage-s", "3",
            "--report", str(report),
            "--out", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    assert code == 0
    r = json.loads(report.read_text())
    assert r["sent"] > 200 and r["delivered"] == r["sent"]
    assert r["lost"] == 0 and r["duplicates"] == 0
    assert set(r["latency_ms"]) == {"p50", "p99", "max"}
    assert r["wire_bytes_per_record"] > 0
    assert r["profiles"]["3g-good"]["delivered"] == r["delivered"]
    assert (tmp_path / "out" / "archive" / "acme.jsonl").exists()


def test_fleet_refuses_nonsense(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "--devices", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err

"""`squall fleet` end to end on real sockets: a small fleet through the link proxy."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from transport.cli import main

pytestmark = pytest.mark.integration


@pytest.mark.timeout(150)
def test_fleet_of_20_on_3g_poor_with_an_outage_delivers_once_and_pages_once(
    tmp_path: Path,
) -> None:
    """20 devices, 30 s on 3g-poor, one 16 s outage: everything once, one offline page.

    A device may also drop out alone on 3g-poor (a long loss burst): that is its own
    per-device alert, which the test allows; the fleet in the tunnel must be one page.
    """
    report = tmp_path / "report.json"
    code = main(
        [
            "fleet",
            "--devices", "20",
            "--rate", "2",
            "--duration", "30",
            "--profile", "3g-poor",
            "--outage-at", "8",
            "--outage-s", "16",
            "--offline-after", "8",
            "--drain", "60",
            "--report", str(report),
            "--out", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    assert code == 0
    r = json.loads(report.read_text())
    assert r["sent"] > 1000 and r["delivered"] == r["sent"]
    assert r["lost"] == 0 and r["duplicates"] == 0
    assert set(r["latency_ms"]) == {"p50", "p99", "max"}
    assert r["wire_bytes_per_record"] > 0
    assert r["profiles"]["3g-poor"]["delivered"] == r["delivered"]
    assert (tmp_path / "out" / "archive" / "acme.jsonl").exists()
    # the fleet in the tunnel is one grouped page, fired during the outage, resolved after it
    ((start, end),) = r["outages_unix_s"]
    offline = [e for e in r["alerts"]["events"] if e["alertname"] == "device_offline"]
    group = [e for e in offline if e.get("scope") == "group"]
    fired = [e for e in group if e["status"] == "firing"]
    resolved = [e for e in group if e["status"] == "resolved"]
    assert len(fired) == 1, offline
    assert start < _unix(fired[0]["starts_at"]) < end + 1
    assert len(resolved) == 1 and _unix(resolved[0]["ends_at"]) > end
    # the log lines went on to a real rsyslogd; the plots were drawn
    assert r["where"]["rsyslog"]["lines"] > 0
    for png in r["plots"]:
        assert Path(png).read_bytes()[:4] == b"\x89PNG"


def _unix(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def test_fleet_refuses_nonsense(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "--devices", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err

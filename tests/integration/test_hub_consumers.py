"""The consumers configured in hub.yaml run inside the hub: archive, syslog forwarder, alerts.

A real hub (in-process) with every consumer on, real edge agents publishing telemetry and
sshd log lines, a real rsyslogd receiving the forwarded logs; the alert state is read
through the hub's own HTTP API and its metrics.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from edge.agent import Agent
from edge.config import load_edge_config
from hub.config import load_hub_config
from hub.http import start_http
from hub.server import Hub
from tests.integration.conftest import until
from tests.integration.realpeers import Rsyslog
from transport.errors import ConfigError
from transport.wire import Lane

from .conftest import free_port, write_edge_config, write_hub_config

pytestmark = pytest.mark.integration

RULES = {
    "rules": [
        {
            "name": "low_battery",
            "kind": "threshold",
            "subject": "*.*.telemetry.gps",
            "field": "body.battery_pct",
            "op": "<",
            "value": 10,
            "for": 0,
            "labels": {"severity": "warning"},
        },
        {
            "name": "auth_failure_burst",
            "kind": "rate",
            "subject": "*.*.log.*",
            "filter": 'body ~ "Failed password*"',
            "more_than": 20,
            "window": "60s",
            "for": 0,
        },
    ]
}


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 60))


def archived(directory: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(directory.glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def hub_config(tmp_path: Path, pki: Path, rsyslog_port: int) -> Path:
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(RULES))
    return write_hub_config(
        tmp_path,
        pki,
        archives=[{"name": "archive", "directory": "archive"}],
        syslog_forwarders=[
            {
                "name": "syslog",
                "target": f"127.0.0.1:{rsyslog_port}",
                "subject": "*.*.log.>",
                "confirm_s": 0.2,
            }
        ],
        alerts={"rules": "alerts.yaml", "poll_s": 0.1},
    )


@pytest.mark.timeout(90)
def test_every_configured_consumer_gets_what_it_selects(
    tmp_path: Path, pki: Path, rsyslog: Rsyslog
) -> None:
    cfg = load_hub_config(hub_config(tmp_path, pki, rsyslog.port))
    assert cfg.archives[0].directory == str(tmp_path / "archive")

    async def main() -> None:
        hub = Hub(cfg)
        await hub.start()
        runner, http_port = await start_http(hub)
        agents = [
            Agent(load_edge_config(write_edge_config(tmp_path, pki, name, [cfg.listen])))
            for name in ("t1", "t2")
        ]
        for a in agents:
            a.start()
        for i in range(60):
            for a in agents:
                await a.publish("telemetry.gps", {"i": i, "battery_pct": 50.0 - i})
        line = "Failed password for root from 203.0.113.7 port 22 ssh2"
        for _ in range(30):
            await agents[0].publish("log.auth", line, {"severity": 4, "app": "sshd"}, Lane.BULK)
        await agents[1].publish("log.auth", "session opened for user ubuntu", {"app": "sshd"})
        total = 2 * 60 + 31
        await until(lambda: sum(a.stats.acked for a in agents) >= total)
        await until(lambda: len(rsyslog.received()) >= 31)
        await until(lambda: len(hub.consumers.active_alerts()) >= 3)
        base = f"http://127.0.0.1:{http_port}"
        auth = {"Authorization": "Bearer s3cret"}
        async with aiohttp.ClientSession(headers=auth) as http:
            async with http.get(f"{base}/v1/alerts") as r:
                assert r.status == 200
                alerts = (await r.json())["alerts"]
            async with http.get(f"{base}/metrics") as r:
                text = await r.text()
        for a in agents:
            await a.stop()
        await hub.stop()
        await runner.cleanup()

        fired = Counter((a["labels"]["alertname"], a["labels"]["device"]) for a in alerts)
        assert fired == {
            ("low_battery", "t1"): 1,
            ("low_battery", "t2"): 1,
            ("auth_failure_burst", "t1"): 1,
        }
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }
        assert samples[("squall_syslogfwd_forwarded_total", (("consumer", "syslog"),))] >= 31
        assert samples[("squall_archive_written_total", (("consumer", "archive"),))] >= total

    run(main)
    # the archive holds every record of both devices once (plus presence and alert records)
    lines = archived(tmp_path / "archive")
    keys = Counter(
        (r["device"], r["seq"]) for r in lines if r["subject"].split(".")[2] != "presence"
    )
    device_keys = {k for k in keys if k[0] in ("t1", "t2")}
    assert all(n == 1 for n in keys.values())
    assert len([k for k in device_keys if k[0] == "t1"]) == 90
    assert len([k for k in device_keys if k[0] == "t2"]) == 61
    # rsyslog got exactly the log lines (subject *.*.log.>), with the device as hostname
    got = rsyslog.received()
    assert Counter(r["hostname"] for r in got) == {"t1": 30, "t2": 1}
    assert {r["app"] for r in got} == {"sshd"}
    assert sum("Failed password" in r["msg"] for r in got) == 30


def test_a_bad_alert_rule_stops_the_hub_config_from_loading(tmp_path: Path, pki: Path) -> None:
    rule = {"name": "x", "kind": "threshold", "subject": "*.*.gps", "field": "body.v", "op": "=~"}
    bad = {"rules": [rule]}
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(bad))
    path = write_hub_config(tmp_path, pki, alerts={"rules": "alerts.yaml"})
    with pytest.raises(ConfigError) as err:
        load_hub_config(path)
    assert "alerts.yaml" in str(err.value)


def test_two_consumers_with_one_name_are_refused(tmp_path: Path, pki: Path) -> None:
    port = free_port(socket.SOCK_STREAM)
    path = write_hub_config(
        tmp_path,
        pki,
        archives=[{"name": "out", "directory": "a"}],
        syslog_forwarders=[{"name": "out", "target": f"127.0.0.1:{port}"}],
    )
    with pytest.raises(ConfigError) as err:
        load_hub_config(path)
    assert "'out'" in str(err.value)

"""The alert consumer against a real Prometheus Alertmanager (and a webhook) on loopback.

The fixture starts /usr/bin/prometheus-alertmanager (Debian package; ``make system-deps``)
in tmp_path with clustering off.  Its route sends every notification, resolved ones
included, to a capture server in the test: Alertmanager 0.25 drops resolved alerts
from ``GET /api/v2/alerts`` at once (checked: even with active/silenced/... = false), so
the end time of a resolved alert is read from its resolved notification instead.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from hub.alerts import parse_rules
from hub.alertsinks import ALERTS_DEVICE, AlertConsumer, AlertSettings
from hub.log import Log
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

ALERTMANAGER = "/usr/bin/prometheus-alertmanager"


@dataclass
class Alertmanager:
    url: str
    hook_port: int  # where its webhook receiver posts notifications


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Alertmanager]:
    """A real Alertmanager on a free loopback port, notifying a capture server (see above)."""
    assert Path(ALERTMANAGER).exists(), "prometheus-alertmanager missing: run make system-deps"
    port, hook_port = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    config = tmp_path / "alertmanager.yml"
    config.write_text(
        "route:\n"
        "  receiver: capture\n"
        "  group_by: [alertname, tenant, device]\n"
        "  group_wait: 100ms\n"
        "  group_interval: 200ms\n"
        "  repeat_interval: 1h\n"
        "receivers:\n"
        "  - name: capture\n"
        "    webhook_configs:\n"
        f"      - url: http://127.0.0.1:{hook_port}/notify\n"
        "        send_resolved: true\n"
        '  - name: "null"\n'
    )
    out = (tmp_path / "alertmanager.log").open("wb")
    proc = subprocess.Popen(
        [
            ALERTMANAGER,
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, (tmp_path / "alertmanager.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "alertmanager did not become ready"
            time.sleep(0.05)
        yield Alertmanager(url, hook_port)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()


async def capture_server(
    port: int, status: Callable[[], int] = lambda: 200
) -> tuple[web.AppRunner, list[Any]]:
    """An aiohttp server on ``port`` that keeps every JSON body POSTed to it."""
    received: list[Any] = []

    async def take(request: web.Request) -> web.Response:
        code = status()
        if code < 300:
            received.append(await request.json())
        return web.Response(status=code)

    app = web.Application()
    app.router.add_post("/{path}", take)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, received


async def am_alerts(url: str) -> list[dict[str, Any]]:
    """GET /api/v2/alerts (in a thread: urllib blocks)."""

    def get() -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=5) as resp:
            data: list[dict[str, Any]] = json.loads(resp.read())
            return data

    return await asyncio.to_thread(get)


async def until(check: Callable[[], Awaitable[Any]], what: str, within: float = 15.0) -> Any:
    """Poll ``check`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.05)


def parse_time(text: str) -> float:
    """Seconds since the epoch from Alertmanager's RFC 3339 (up to nanoseconds)."""
    head, _, frac = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float(f"0.{frac or 0}")


LOW = {
    "name": "low_battery",
    "kind": "threshold",
    "subject": "*.*.telemetry.gps",
    "field": "body.battery_pct",
    "op": "<",
    "value": 10,
    "for": "300ms",
    "labels": {"severity": "warning"},
    "annotations": {"summary": "{device} battery at {value}%"},
}
OFFLINE = {
    "name": "device_offline",
    "kind": "absence",
    "for": "500ms",
    "group_by": ["tenant"],
    "group_min": 3,
    "group_wait": "2s",
}


def settings(tmp_path: Path, **kw: Any) -> AlertSettings:
    base: dict[str, Any] = {
        "name": "alerts",
        "resend_s": 1.0,
        "poll_s": 0.05,
        "commit_s": 0.2,
        "http_timeout_s": 2.0,
        "retry_base_s": 0.05,
        "retry_cap_s": 0.5,
        "state_path": str(tmp_path / "alerts.state.json"),
    }
    return AlertSettings(**(base | kw))


def telemetry(log: Log, device: str, pct: float) -> float:
    """Append a GPS record with battery_pct as the hub would; returns its received time."""
    now = time.time()
    log.append_local("acme", device, f"acme.{device}.telemetry.gps", {"battery_pct": pct}, {}, now)
    return now


def presence(log: Log, device: str, state: str) -> float:
    """Append a presence change as Hub.publish_presence does; returns its time."""
    now = time.time()
    body = {"state": state, "previous": "online", "heartbeat": {}}
    log.append_local("acme", device, f"acme.{device}.presence", body, {}, now)
    return now


def test_low_battery_fires_in_alertmanager_is_resent_and_resolves(
    tmp_path: Path, alertmanager: Alertmanager
) -> None:
    log = Log(tmp_path / "hub.db")
    cfg = settings(tmp_path, alertmanager_urls=[alertmanager.url])
    consumer = AlertConsumer(log, cfg, rules=parse_rules({"rules": [LOW]}))

    async def main() -> None:
        runner, notes = await capture_server(alertmanager.hook_port)
        task = asyncio.create_task(consumer.run())
        try:
            telemetry(log, "t2", 80.0)
            t_low = telemetry(log, "t1", 7.0)

            async def shown() -> list[dict[str, Any]]:
                return [a for a in await am_alerts(alertmanager.url) if a["labels"]]

            (alert,) = await until(shown, "the alert in GET /api/v2/alerts")
            assert alert["labels"] == {
                "alertname": "low_battery",
                "tenant": "acme",
                "device": "t1",
                "severity": "warning",
            }
            assert alert["annotations"]["summary"] == "t1 battery at 7%"
            assert alert["status"]["state"] == "active"
            starts = parse_time(alert["startsAt"])
            assert abs(starts - (t_low + 0.3)) < 0.002  # since + for, to the millisecond
            assert parse_time(alert["endsAt"]) > time.time()  # valid for a few resends

            async def resent() -> list[dict[str, Any]]:  # a resend moves updatedAt only
                again = await shown()
                return [a for a in again if a["updatedAt"] != alert["updatedAt"]]

            (again,) = await until(resent, "a resend")
            assert again["startsAt"] == alert["startsAt"]
            assert again["fingerprint"] == alert["fingerprint"]

            t_ok = telemetry(log, "t1", 60.0)

            async def gone() -> bool:
                return not await shown()

            await until(gone, "the resolved alert to leave GET /api/v2/alerts")

            async def resolved() -> list[Any]:
                return [n for n in notes if n["status"] == "resolved"]

            (note,) = await until(resolved, "the resolved notification")
            (ended,) = note["alerts"]
            assert ended["labels"]["device"] == "t1"
            assert abs(parse_time(ended["endsAt"]) - t_ok) < 0.002  # the clearing record
            assert abs(parse_time(ended["startsAt"]) - starts) < 0.002
            fired_notes = [n for n in notes if n["status"] == "firing"]
            assert len(fired_notes) == 1  # one page for the whole episode

            # The resolved alert went into the log as a record after the one that cleared
            # it; the consumer reads past it (its own output, not matched) on its next poll.
            async def caught_up() -> bool:
                return log.consumer_offset("alerts") == log.next_offset - 1

            await until(caught_up, "the consumer to read past its own resolved alert")
        finally:
            consumer.close()
            await asyncio.wait_for(task, 10)
            await runner.cleanup()

    asyncio.run(asyncio.wait_for(main(), 20))
    assert consumer.engine.stats.fired == 1 and consumer.engine.stats.resolved == 1
    am_sink = consumer.alertmanagers[0]
    assert am_sink.stats.errors == 0 and am_sink.pending == 0 and am_sink.stats.sent >= 3
    # the log sink wrote both events to acme._alerts.low_battery; the offset is committed
    mine = [e for e in log.read(1, 100) if e.device == ALERTS_DEVICE]
    assert [e.subject for e in mine] == ["acme._alerts.low_battery"] * 2
    assert [e.attrs["status"] for e in mine] == ["firing", "resolved"]
    assert log.consumer_offset("alerts") == log.next_offset - 1
    log.close()


def test_mass_offline_is_one_grouped_alert_in_alertmanager(
    tmp_path: Path, alertmanager: Alertmanager
) -> None:
    log = Log(tmp_path / "hub.db")
    cfg = settings(tmp_path, alertmanager_urls=[alertmanager.url], log_sink=False)
    consumer = AlertConsumer(log, cfg, rules=parse_rules({"rules": [OFFLINE]}))
    trucks = [f"truck-{i:02d}" for i in range(6)]

    async def main() -> None:
        runner, notes = await capture_server(alertmanager.hook_port)
        task = asyncio.create_task(consumer.run())
        try:
            for truck in trucks:  # a cell tower goes down
                presence(log, truck, "offline")
            t_last = time.time()

            async def past_group_wait() -> bool:
                # long enough for each device to have paged alone (for + group_wait),
                # and for a resend: only then does "exactly one" mean something
                return consumer.engine.now > t_last + 0.5 + 2.0 + 1.0

            await until(past_group_wait, "for + group_wait + a resend")

            async def shown() -> list[dict[str, Any]]:
                return [a for a in await am_alerts(alertmanager.url) if a["labels"]]

            (alert,) = await until(shown, "the group alert")
            assert alert["labels"] == {
                "alertname": "device_offline",
                "tenant": "acme",
                "scope": "group",
            }
            assert alert["annotations"]["device_count"] == "6"
            assert alert["annotations"]["devices"].startswith("truck-00, truck-01")
            assert alert["annotations"]["devices"].endswith("and 1 more")  # group_show: 5

            t_back = 0.0
            for truck in trucks:  # the tower is back
                t_back = presence(log, truck, "online")

            async def gone() -> bool:
                return not await shown()

            await until(gone, "the group alert to resolve")

            async def resolved() -> list[Any]:
                return [n for n in notes if n["status"] == "resolved"]

            (note,) = await until(resolved, "the resolved notification")
            (ended,) = note["alerts"]
            assert ended["labels"]["scope"] == "group"
            assert parse_time(ended["endsAt"]) >= t_back
            paged = {json.dumps(a["labels"], sort_keys=True) for n in notes for a in n["alerts"]}
            assert len(paged) == 1  # never a page per truck
        finally:
            consumer.close()
            await asyncio.wait_for(task, 10)
            await runner.cleanup()

    asyncio.run(asyncio.wait_for(main(), 20))
    assert consumer.engine.stats.fired == 1 and consumer.engine.stats.resolved == 1
    log.close()


def test_webhook_sink_retries_a_failing_receiver_and_drops_a_refusal(tmp_path: Path) -> None:
    log = Log(tmp_path / "hub.db")
    port = free_port(socket.SOCK_STREAM)
    url = f"http://127.0.0.1:{port}/alerts"
    cfg = settings(tmp_path, webhook_url=url, log_sink=False)
    rules = parse_rules({"rules": [LOW | {"for": 0}]})
    consumer = AlertConsumer(log, cfg, rules=rules)
    (webhook,) = consumer.sinks
    codes = iter([503, 503, 200, 200, 400, 200])  # twice down, then up; later one refusal

    async def main() -> None:
        runner, received = await capture_server(port, lambda: next(codes, 200))
        task = asyncio.create_task(consumer.run())
        try:
            t_low = telemetry(log, "t1", 4.0)

            def got(n: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    return len(received) >= n

                return check

            await until(got(1), "the firing alert after two 503s")
            (fired,) = received[0]["alerts"]
            assert received[0]["source"] == "alerts"
            assert fired["status"] == "firing" and fired["labels"]["device"] == "t1"
            assert fired["endsAt"] is None
            assert abs(parse_time(fired["startsAt"]) - t_low) < 0.002
            assert fired["id"].endswith("-firing")
            assert webhook.stats.errors == 2

            telemetry(log, "t1", 90.0)
            await until(got(2), "the resolved alert")
            (resolved,) = received[1]["alerts"]
            assert resolved["status"] == "resolved" and resolved["id"] != fired["id"]

            telemetry(log, "t3", 2.0)  # refused with 400: dropped, counted, not retried

            async def refused() -> bool:
                return webhook.stats.rejected == 1

            await until(refused, "the refusal")
            telemetry(log, "t4", 2.0)  # the sink goes on with the next alert
            await until(got(3), "the alert after the refusal")
            assert received[2]["alerts"][0]["labels"]["device"] == "t4"
        finally:
            consumer.close()
            await asyncio.wait_for(task, 10)
            await runner.cleanup()

    asyncio.run(asyncio.wait_for(main(), 20))
    assert webhook.stats.sent == 3 and webhook.stats.errors == 3 and webhook.pending == 0
    log.close()

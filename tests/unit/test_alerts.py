"""Alert rules with a manual clock: for, fire once, resolve, rate windows, grouping, bounds."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from hub.alerts import (
    TRANSITIONS,
    Alert,
    AlertEngine,
    AlertError,
    AlertState,
    AlertStatus,
    Rule,
    _Track,
    load_rules,
    parse_duration,
    parse_rules,
)
from hub.alertsinks import (
    ALERTS_DEVICE,
    AlertConsumer,
    AlertmanagerSink,
    AlertSettings,
    Sink,
    rfc3339,
)
from hub.log import Log, LogEntry
from transport.errors import ConfigError

CONFIG = Path(__file__).resolve().parents[2] / "config"
_offsets = itertools.count(1)


def entry(subject: str, body: Any, t: float, attrs: dict[str, Any] | None = None) -> LogEntry:
    """A log entry received at hub time ``t`` (tenant and device from the subject)."""
    tenant, device = subject.split(".")[:2]
    n = next(_offsets)
    return LogEntry(n, tenant, device, 1, 1, n, 0, subject, attrs or {}, body, int(t * 1e6))


def battery(device: str, pct: float, t: float, tenant: str = "acme") -> LogEntry:
    return entry(f"{tenant}.{device}.telemetry.gps", {"battery_pct": pct}, t)


def presence(device: str, state: str, t: float, tenant: str = "acme") -> LogEntry:
    return entry(f"{tenant}.{device}.presence", {"state": state, "previous": "x"}, t)


def authfail(device: str, t: float) -> LogEntry:
    return entry(f"acme.{device}.log.auth", "pam_unix(sshd:auth): authentication failure", t)


def rules(*items: dict[str, Any], **top: Any) -> tuple[Rule, ...]:
    return parse_rules({"rules": list(items), **top}, path="test.yaml").rules


def engine(*items: dict[str, Any], max_active: int = 10_000, **top: Any) -> AlertEngine:
    return AlertEngine(rules(*items, **top), max_active_alerts=max_active)


LOW: dict[str, Any] = {"name": "low_battery", "kind": "threshold", "subject": "*.*.telemetry.gps"}
LOW |= {"field": "body.battery_pct", "op": "<", "value": 10, "for": 30}
LOW |= {"labels": {"severity": "warning"}, "annotations": {"summary": "{device} at {value}%"}}
BURST: dict[str, Any] = {"name": "auth_burst", "kind": "rate", "subject": "*.*.log.*"}
BURST |= {"filter": 'body ~ "*authentication failure*"', "more_than": 50, "window": "60s"}
OFFLINE: dict[str, Any] = {"name": "offline", "kind": "absence", "for": "5m"}
GROUPED = OFFLINE | {"group_by": ["tenant"], "group_min": 3, "group_wait": 60, "group_show": 2}


def statuses(events: list[Alert]) -> list[tuple[str, str, str]]:
    return [(e.status.value, e.labels["alertname"], e.labels.get("device", "*")) for e in events]


# --- threshold -------------------------------------------------------------------------


def test_threshold_fires_after_for_once_and_resolves() -> None:
    e = engine(LOW)
    e.feed(battery("t1", 8.0, 1000.0))
    e.tick(1029.0)
    assert e.take_events() == []  # pending: not yet 30 s
    e.feed(battery("t1", 7.5, 1029.5))
    e.tick(1031.0)
    (fired,) = e.take_events()
    assert fired.status is AlertStatus.FIRING
    assert fired.starts_at == 1030.0  # since + for, not the tick that noticed it
    assert dict(fired.labels) == {
        "alertname": "low_battery",
        "tenant": "acme",
        "device": "t1",
        "severity": "warning",
    }
    assert fired.annotations["summary"] == "t1 at 7.5%"
    for i in range(20):  # the condition keeps holding: never a second fire
        e.feed(battery("t1", 5.0, 1040.0 + i))
        e.tick(1040.5 + i)
    assert e.take_events() == []
    (active,) = e.active()
    assert active.starts_at == 1030.0 and active.annotations["summary"] == "t1 at 5%"
    e.feed(battery("t1", 55.0, 1100.0))
    (resolved,) = e.take_events()
    assert resolved.status is AlertStatus.RESOLVED and resolved.ends_at == 1100.0
    assert resolved.starts_at == 1030.0 and resolved.fingerprint == fired.fingerprint
    assert e.active() == [] and e.active_count == 0
    assert (e.stats.fired, e.stats.resolved) == (1, 1)


def test_threshold_cleared_before_for_never_fires() -> None:
    e = engine(LOW)
    e.feed(battery("t1", 8.0, 0.0))
    e.tick(20.0)
    e.feed(battery("t1", 12.0, 25.0))
    e.tick(100.0)
    assert e.take_events() == [] and e.tracked() == {"low_battery": 0}


def test_threshold_per_device_and_ignores_non_numbers() -> None:
    e = engine(LOW | {"for": 0})
    e.feed(battery("t1", 5, 0.0))
    e.feed(battery("t2", 50, 0.0))
    e.feed(entry("acme.t3.telemetry.gps", {"battery_pct": "low"}, 0.0))
    e.feed(entry("acme.t4.telemetry.gps", {"battery_pct": True}, 0.0))
    e.feed(entry("acme.t5.telemetry.gps", {"speed": 3}, 0.0))
    e.feed(entry("acme.t6.telemetry.other", {"battery_pct": 1}, 0.0))  # subject not selected
    assert statuses(e.take_events()) == [("firing", "low_battery", "t1")]
    assert e.stats.ignored == 3 and e.stats.matched == 5


def test_replayed_backlog_is_evaluated_at_record_times() -> None:
    # a restart replays records without wall-clock ticks in between: feed() ticks itself
    e = engine(OFFLINE)
    e.feed(presence("t1", "offline", 0.0))
    e.feed(presence("t1", "online", 200.0))  # back before 5 min: nothing
    e.feed(presence("t1", "offline", 300.0))
    e.feed(presence("t2", "online", 700.0))  # time moves on: t1's 5 min passed at 600
    e.feed(presence("t1", "online", 900.0))
    events = e.take_events()
    assert statuses(events) == [("firing", "offline", "t1"), ("resolved", "offline", "t1")]
    assert (events[0].starts_at, events[1].ends_at) == (600.0, 900.0)


# --- rate ------------------------------------------------------------------------------


def test_rate_fires_above_the_count_and_resolves_when_the_window_slides() -> None:
    e = engine(BURST)
    for i in range(50):  # 50 in 50 s: not more than 50
        e.feed(authfail("t1", 100.0 + i))
    e.feed(entry("acme.t1.log.auth", "session opened for user ubuntu", 150.0))  # not matched
    assert e.take_events() == []
    e.feed(authfail("t1", 150.5))  # the 51st within 60 s
    (fired,) = e.take_events()
    assert fired.starts_at == 150.5 and "51 matching records" in fired.annotations["summary"]
    for i in range(30):  # more failures: still one alert
        e.feed(authfail("t1", 151.0 + i * 0.1))
    e.tick(180.0)  # 5 s buckets from [125, 130) on: 25 + 1 + 30 inside
    assert e.take_events() == []
    e.tick(200.0)  # from [145, 150) on: 5 + 1 + 30
    (resolved,) = e.take_events()
    assert resolved.status is AlertStatus.RESOLVED and resolved.ends_at == 200.0
    assert "36 matching records" in resolved.annotations["summary"]
    e.tick(400.0)
    assert e.tracked() == {"auth_burst": 0}  # empty windows are forgotten


def test_rate_counts_per_device() -> None:
    e = engine(BURST)
    for i in range(40):
        e.feed(authfail("t1", 10.0 + i * 0.5))
        e.feed(authfail("t2", 10.0 + i * 0.5))
    assert e.take_events() == [] and e.tracked() == {"auth_burst": 2}


def test_rate_window_is_exact_to_one_bucket() -> None:
    e = engine(BURST | {"more_than": 2, "window": 60, "buckets": 6})  # 10 s buckets
    e.feed(authfail("t1", 0.0))
    e.feed(authfail("t1", 1.0))
    e.feed(authfail("t1", 65.0))  # 0.0 and 1.0 are in bucket 0, out of a window ending at 6
    e.feed(authfail("t1", 66.0))
    assert e.take_events() == []
    e.feed(authfail("t1", 69.0))
    assert statuses(e.take_events()) == [("firing", "auth_burst", "t1")]


# --- absence and grouping --------------------------------------------------------------


def test_absence_fires_per_device_after_for() -> None:
    e = engine(OFFLINE | {"annotations": {"summary": "{device} gone {value} s"}})
    e.feed(presence("t1", "stale", 0.0))  # not in states
    e.feed(presence("t1", "offline", 10.0))
    e.tick(309.0)
    assert e.take_events() == []
    e.tick(311.0)
    (fired,) = e.take_events()
    assert fired.starts_at == 310.0 and fired.labels["device"] == "t1"
    assert fired.annotations["summary"] == "t1 gone 301 s"
    e.feed(presence("t1", "online", 400.0))
    assert statuses(e.take_events()) == [("resolved", "offline", "t1")]


def test_mass_offline_is_one_group_alert_until_the_last_device_is_back() -> None:
    e = engine(GROUPED)
    for i in range(8):  # a tunnel: eight trucks drop within 10 s
        e.feed(presence(f"t{i}", "offline", 100.0 + i))
    e.feed(presence("x1", "offline", 100.0, tenant="other"))  # another tenant: never joins
    e.tick(405.0)  # six are ripe (offline for 5 min), two are not yet
    (group,) = e.take_events()
    assert dict(group.labels) == {"alertname": "offline", "tenant": "acme", "scope": "group"}
    assert group.annotations["device_count"] == "6"
    assert group.annotations["devices"] == "t0, t1 and 4 more"  # group_show: 2
    assert group.annotations["summary"].startswith("6 devices of acme tripped offline")
    assert group.starts_at == 402.0  # when the third device had been offline for 5 min
    e.tick(420.0)  # the rest ripen and join: still one alert, no pages
    assert e.take_events() == []
    (active,) = [a for a in e.active() if a.tenant == "acme"]
    assert active.annotations["device_count"] == "8" and active.starts_at == 402.0
    for i in range(7):  # they come out of the tunnel; one is still missing
        e.feed(presence(f"t{i}", "online", 430.0 + i))
    e.tick(500.0)
    # acme's group still fires; the other tenant's lone device paged on its own
    # after for + group_wait
    (lone,) = e.take_events()
    assert lone.labels["device"] == "x1" and lone.starts_at == 460.0
    e.feed(presence("t7", "online", 510.0))
    e.tick(511.0)
    (resolved,) = e.take_events()
    assert resolved.status is AlertStatus.RESOLVED and resolved.ends_at == 511.0
    assert resolved.fingerprint == group.fingerprint
    assert resolved.annotations["device_count"] == "8"  # the resolve names what the incident took
    e.tick(400.0)  # time does not go back: ignored
    assert e.take_events() == []
    assert e.stats.fired == 2 and e.active_count == 1


def test_group_replaces_devices_already_firing_on_their_own() -> None:
    e = engine(GROUPED)
    e.feed(presence("a", "offline", 0.0))
    e.feed(presence("b", "offline", 0.0))
    e.tick(361.0)  # 5 min + 1 min group_wait: two pages
    assert statuses(e.take_events()) == [("firing", "offline", "a"), ("firing", "offline", "b")]
    e.feed(presence("c", "offline", 400.0))
    e.tick(701.0)
    events = e.take_events()
    assert statuses(events) == [
        ("firing", "offline", "*"),
        ("resolved", "offline", "a"),
        ("resolved", "offline", "b"),
    ]
    assert events[0].annotations["device_count"] == "3"
    assert e.active_count == 1


def test_devices_going_offline_one_by_one_wait_for_the_group() -> None:
    # staggered by 20 s: without group_wait the first two would page before the group forms
    e = engine(GROUPED)
    for i, t in enumerate((0.0, 20.0, 40.0)):
        e.feed(presence(f"t{i}", "offline", t))
    for now in range(300, 345, 1):
        e.tick(float(now))
    assert statuses(e.take_events()) == [("firing", "offline", "*")]


# --- bounds ----------------------------------------------------------------------------


def test_devices_beyond_max_devices_are_counted_not_tracked() -> None:
    e = engine(LOW | {"for": 0, "max_devices": 3})
    for i in range(5):
        e.feed(battery(f"t{i}", 1.0, 0.0))
    assert len(e.take_events()) == 3
    assert e.devices_dropped() == {"low_battery": 2} and e.stats.devices_dropped == 2
    e.feed(battery("t0", 50.0, 1.0))  # room again
    e.feed(battery("t4", 1.0, 2.0))
    assert statuses(e.take_events()) == [
        ("resolved", "low_battery", "t0"),
        ("firing", "low_battery", "t4"),
    ]


def test_fires_beyond_max_active_are_held_back_counted_once() -> None:
    e = engine(LOW | {"for": 0}, max_active=2)
    for i in range(3):
        e.feed(battery(f"t{i}", 1.0, 0.0))
    for now in (1.0, 2.0, 3.0):
        e.tick(now)
    assert len(e.take_events()) == 2 and e.active_count == 2
    assert e.stats.alerts_dropped == 1  # t2, once, however many ticks
    e.feed(battery("t0", 50.0, 4.0))
    e.tick(5.0)
    events = e.take_events()
    assert statuses(events) == [("resolved", "low_battery", "t0"), ("firing", "low_battery", "t2")]
    assert events[1].starts_at == 0.0  # since + for, though held back until 5.0


def test_transition_table_refuses_illegal_moves() -> None:
    track = _Track("acme", "t1")
    track.move(AlertState.PENDING)
    track.move(AlertState.FIRING)
    with pytest.raises(AlertError, match="firing -> pending"):
        track.move(AlertState.PENDING)
    assert AlertState.FIRING not in TRANSITIONS[AlertState.GROUPED]
    assert TRANSITIONS[AlertState.INACTIVE] == {AlertState.PENDING}


# --- persistence -----------------------------------------------------------------------


def test_snapshot_restore_keeps_firing_and_pending_state() -> None:
    e = engine(LOW, GROUPED, BURST)
    e.feed(battery("t1", 5.0, 0.0))
    e.tick(31.0)
    e.feed(presence("p1", "offline", 20.0))
    for i in range(10):
        e.feed(authfail("r1", 25.0 + i))
    assert statuses(e.take_events()) == [("firing", "low_battery", "t1")]
    data = json.loads(json.dumps(e.snapshot()))  # it is JSON
    f = engine(LOW, GROUPED, BURST)
    f.restore(data)
    f.tick(100.0)
    assert f.take_events() == []  # the firing alert is not fired again
    assert f.active() == e.active() and f.active_count == 1
    f.tick(381.0)  # p1's absence timer survived: 20 + 300 + 60
    assert statuses(f.take_events()) == [("firing", "offline", "p1")]
    for i in range(41):  # r1's window survived: 10 + 41 > 50
        f.feed(authfail("r1", 382.0 + i * 0.01))
    assert f.take_events() == []  # the first 10 are out of the window by now
    g = engine(LOW, BURST)
    g.restore(data)  # a rule that is gone is skipped; a kind change starts empty
    assert g.active_count == 1
    with pytest.raises(AlertError):
        g.restore({"version": 99})


# --- configuration ---------------------------------------------------------------------


def test_example_rules_file_loads() -> None:
    rs = load_rules(CONFIG / "alerts.yaml")
    by_name = {r.name: r for r in rs.rules}
    assert set(by_name) == {"low_battery", "auth_failure_burst", "device_offline"}
    assert by_name["low_battery"].field_path == ("body", "battery_pct")
    assert by_name["auth_failure_burst"].more_than == 50
    assert by_name["auth_failure_burst"].window_s == 60.0
    offline = by_name["device_offline"]
    assert offline.grouped and offline.for_s == 300.0 and offline.group_wait_s == 60.0
    assert rs.max_active_alerts == 10_000


@pytest.mark.parametrize(
    ("rule", "key", "text"),
    [
        (LOW | {"fields": "x"}, "rules[0].fields", "unknown key"),
        (LOW | {"for": "5 minutes"}, "rules[0].for", "duration"),
        (LOW | {"for": True}, "rules[0].for", "expected"),
        (LOW | {"for_": 3}, "rules[0].for_", "the key is 'for'"),
        (LOW | {"filter": "body.x >"}, "rules[0].filter", "position"),
        (LOW | {"subject": "a.>.b"}, "rules[0].subject", "last token"),
        (LOW | {"op": "=<"}, "rules[0].op", "expected one of"),
        (LOW | {"field": ""}, "rules[0].field", "needs a dotted field"),
        (LOW | {"field": "speed"}, "rules[0].field", "body.<key>"),
        (LOW | {"annotations": {"s": "{devise}"}}, "rules[0].annotations.s", "placeholder"),
        (LOW | {"annotations": {"s": "{value:d}"}}, "rules[0].annotations.s", "bad template"),
        (LOW | {"labels": {"device": "x"}}, "rules[0].labels.device", "reserved"),
        (LOW | {"name": "bad name"}, "rules[0].name", "letter"),
        ({"name": "r", "kind": "rate"}, "rules[0].subject", "needs a subject"),
        (BURST | {"window": 0}, "rules[0].window", "more than 0"),
        (OFFLINE | {"states": ["gone"]}, "rules[0].states", "non-empty list"),
        (OFFLINE | {"group_by": ["device"], "group_min": 3}, "rules[0].group_by", "tenant"),
        (OFFLINE | {"group_by": ["tenant"], "group_min": 1}, "rules[0].group_min", "at least 2"),
        (OFFLINE | {"group_min": 3}, "rules[0].group_by", "needs group_by"),
        ({"name": "x"}, "rules[0].kind", "missing"),
    ],
)
def test_bad_rules_name_the_file_and_key(rule: dict[str, Any], key: str, text: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_rules({"rules": [rule]}, path="alerts.yaml")
    assert exc.value.key == key and exc.value.path == "alerts.yaml"
    assert text in exc.value.message


def test_unknown_top_level_key_and_duplicate_names(tmp_path: Path) -> None:
    bad = tmp_path / "alerts.yaml"
    bad.write_text("rules: []\nmax_active: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_rules(bad)
    assert exc.value.key == "max_active" and str(bad) in str(exc.value)
    with pytest.raises(ConfigError, match="defined twice"):
        parse_rules({"rules": [LOW, LOW]})


def test_durations() -> None:
    assert [parse_duration(x) for x in (5, 2.5, "250ms", "90s", "5m", "1h")] == [
        5.0,
        2.5,
        0.25,
        90.0,
        300.0,
        3600.0,
    ]
    for bad in ("-1s", "5 m", "1d", -3, float("nan")):
        with pytest.raises(ValueError):
            parse_duration(bad)


# --- the shell's pure parts ------------------------------------------------------------


def _alert(device: str, starts: float, status: AlertStatus = AlertStatus.FIRING) -> Alert:
    labels = {"alertname": "r", "tenant": "acme", "device": device}
    ends = None if status is AlertStatus.FIRING else starts + 5
    return Alert(status, "r", "acme", labels, {}, starts, ends)


def test_sink_queue_is_bounded_and_drops_the_oldest() -> None:
    sink = Sink("s", max_pending=3)
    sink.offer([_alert(f"t{i}", 0.0) for i in range(5)])
    assert sink.pending == 3 and sink.stats.dropped == 2
    assert [a.labels["device"] for a in sink._queue.values()] == ["t2", "t3", "t4"]


def test_alertmanager_queue_coalesces_resends_and_keeps_a_resolve() -> None:
    am = AlertmanagerSink("http://127.0.0.1:9", resend_s=10.0, clock=lambda: 1000.0)
    am.offer([_alert("t1", 100.0)])
    am.offer([_alert("t1", 100.0)])  # a resend of the same alert: one entry
    am.offer([_alert("t1", 100.0, AlertStatus.RESOLVED)])  # replaces the queued fire
    am.offer([_alert("t1", 200.0)])  # a new occurrence: its own entry
    assert am.pending == 2
    resolved, firing = list(am._queue.values())
    assert am.payload(resolved, 1000.0)["endsAt"] == rfc3339(105.0)
    body = am.payload(firing, 1000.0)
    assert body["startsAt"] == "1970-01-01T00:03:20.000Z"
    assert body["endsAt"] == rfc3339(1040.0)  # valid for 4 resend periods


def test_alert_consumer_checkpoints_and_does_not_refire_after_restart(tmp_path: Path) -> None:
    clock = [1000.0]
    log = Log(tmp_path / "hub.db")
    settings = AlertSettings(name="alerts", poll_s=0.01, commit_s=0.0)
    ruleset = parse_rules({"rules": [LOW | {"for": 0}, OFFLINE]})

    async def run_until(consumer: AlertConsumer, done: Any) -> None:
        task = asyncio.create_task(consumer.run())
        for _ in range(500):
            await asyncio.sleep(0.01)
            if done():
                break
        consumer.close()
        await asyncio.wait_for(task, 10)

    def alert_records() -> list[dict[str, Any]]:
        return [
            e.body  # type: ignore[misc]
            for e in log.read(1, 1000)
            if e.device == ALERTS_DEVICE
        ]

    log.append_local("acme", "t1", "acme.t1.telemetry.gps", {"battery_pct": 3}, {}, 999.0)
    log.append_local("acme", "t2", "acme.t2.presence", {"state": "offline"}, {}, 999.0)
    first = AlertConsumer(log, settings, rules=ruleset, clock=lambda: clock[0])
    asyncio.run(run_until(first, lambda: len(alert_records()) >= 1))
    (fired,) = alert_records()
    assert fired["status"] == "firing" and fired["labels"]["device"] == "t1"
    assert log.consumer_offset("alerts") >= 2
    # a restart: the low-battery alert is restored, not fired again; t2's timer goes on
    clock[0] = 1000.0 + 301
    second = AlertConsumer(log, settings, rules=ruleset, clock=lambda: clock[0])
    asyncio.run(run_until(second, lambda: len(alert_records()) >= 2))
    records = alert_records()
    assert [(r["status"], r["labels"]["device"]) for r in records] == [
        ("firing", "t1"),
        ("firing", "t2"),
    ]
    assert records[1]["startsAt"] == rfc3339(999.0 + 300)
    assert {a.labels["device"] for a in second.active_alerts()} == {"t1", "t2"}
    assert second.stats.own_records_skipped >= 1 and second.stats.state_unusable == 0
    registry = CollectorRegistry(auto_describe=False)
    registry.register(second)
    text = generate_latest(registry).decode()
    assert "squall_alerts_fired_total 1.0" in text  # this run fired t2 only
    assert "squall_alerts_active 2.0" in text
    assert 'squall_alerts_sink_sent_total{sink="log"} 1.0' in text
    assert 'squall_alerts_events_pending{sink="log"} 0.0' in text
    log.close()


def test_a_failed_checkpoint_is_counted_and_the_offset_stays(tmp_path: Path) -> None:
    log = Log(tmp_path / "hub.db")
    log.append_local("acme", "t1", "acme.t1.telemetry.gps", {"battery_pct": 3}, {}, 10.0)
    settings = AlertSettings(
        poll_s=0.01, commit_s=0.0, log_sink=False, state_path=str(tmp_path / "no" / "state.json")
    )
    consumer = AlertConsumer(log, settings, rules=parse_rules({"rules": [LOW | {"for": 0}]}))

    async def main() -> None:
        task = asyncio.create_task(consumer.run())
        while consumer.stats.checkpoint_errors == 0:
            await asyncio.sleep(0.01)
        consumer.close()
        await asyncio.wait_for(task, 10)

    asyncio.run(asyncio.wait_for(main(), 10))
    assert consumer.offset == 1 and consumer.engine.stats.fired == 1
    assert log.consumer_offset("alerts") == 0  # a restart replays: nothing is skipped
    log.close()

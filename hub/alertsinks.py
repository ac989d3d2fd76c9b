"""The alert consumer's asyncio shell: read the log durably, drive hub.alerts, deliver to sinks.

One round: read entries after the consumer's offset (``hub.consumer.LogCursor``), feed
them to the ``AlertEngine``, tick it with the wall clock once caught up with the log,
hand the fire/resolve events to every sink, wait until each sink has delivered them
or is known to be failing, then checkpoint: the engine's state is written atomically
to ``state_path`` together with the offset it covers, and only then is the offset
committed in the log.  A restart takes the snapshot and the offset back, so a device
that went offline before the restart still alerts, and an alert that was firing is
not fired again.  Whatever happened after the last checkpoint is replayed: the same
events (same ids) may reach a sink twice; never zero times while that sink works.

Sinks, each a bounded queue (``max_pending``; the oldest are dropped beyond it,
counted) drained by its own task with timeouts, retries and jittered exponential
backoff.  A failing sink does not hold the others or the log back; what it has
queued is kept (in memory) until it works again.  An HTTP 4xx other than 408/429 is a
permanent refusal: that batch is dropped and counted as rejected.

- ``alertmanager``: ``POST <url>/api/v2/alerts`` (Prometheus Alertmanager API v2) to
  every URL given (an HA pair wants each alert from each client).  Firing alerts carry
  ``endsAt`` = now + 4 x ``resend_s`` and are re-sent every ``resend_s`` with their
  original ``startsAt``, so Alertmanager keeps them while this consumer lives and
  resolves them by itself if it dies; a resolve carries the real ``endsAt``.
- ``webhook``: ``POST`` of ``{"source": name, "alerts": [...]}`` with each alert's
  ``id`` (stable across replays, for receivers that deduplicate).
- ``log``: each event is appended to the hub's own log (``Log.append_local``) as a
  record on ``<tenant>._alerts.<rule>`` (device ``_alerts``, body = the alert JSON),
  where archives and subscribers see it.  The consumer skips these records itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hub.alerts import Alert, AlertEngine, AlertError, AlertStatus, RuleSet, load_rules
from hub.consumer import LogCursor
from hub.log import LOCAL_INCARNATION, Log, LogEntry, LogError
from transport.errors import SquallError

log = logging.getLogger("squall.alerts")

ALERTS_DEVICE = "_alerts"  # the log sink's records: <tenant>._alerts.<rule>
VALID_RESENDS = 4  # a firing alert's endsAt lies this many resend periods ahead


@dataclasses.dataclass(slots=True)
class AlertSettings:
    """The alert consumer's settings (a section of hub.yaml; config/alerts.yaml holds rules)."""

    rules: str = "alerts.yaml"  # the rules file
    name: str = "alerts"  # durable consumer name in the log; "source" in webhook payloads
    alertmanager_urls: list[str] = dataclasses.field(default_factory=list)  # base URLs
    webhook_url: str = ""  # "" = no webhook
    log_sink: bool = True  # append each event to <tenant>._alerts.<rule>
    resend_s: float = 60.0  # firing alerts go to Alertmanager again this often
    state_path: str = ""  # "" = <log path>.<name>.state.json
    poll_s: float = 0.5  # how often an idle consumer looks at the log and ticks the rules
    commit_s: float = 2.0  # checkpoint at most this often when no event happened
    batch_records: int = 1000  # log entries per round
    http_timeout_s: float = 10.0  # per request, connect included
    retry_base_s: float = 0.5  # first retry delay; doubles per failure, jittered
    retry_cap_s: float = 30.0
    max_pending: int = 10_000  # per sink; beyond it the oldest queued alerts are dropped
    generator_url: str = ""  # generatorURL of every alert (e.g. the hub's HTTP API)

    def validate(self) -> None:
        """Reject impossible values."""
        for name in ("resend_s", "poll_s", "http_timeout_s", "retry_base_s", "retry_cap_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"alerts.{name} must be more than 0")
        if self.commit_s < 0:
            raise ValueError("alerts.commit_s must be 0 or more")
        if self.batch_records < 1 or self.max_pending < 1:
            raise ValueError("alerts.batch_records and alerts.max_pending must be at least 1")
        if not self.name:
            raise ValueError("alerts.name must not be empty")
        for url in [*self.alertmanager_urls, self.webhook_url]:
            if url and not url.startswith(("http://", "https://")):
                raise ValueError(f"alerts: {url!r} is not an http(s) URL")


class SinkError(SquallError):
    """A sink could not deliver now (connection, timeout, 5xx): retried with backoff."""


class SinkRejected(SinkError):
    """The receiver refused the alerts for good (HTTP 4xx): the batch is dropped, counted."""


def rfc3339(t: float) -> str:
    """UTC time with milliseconds, as Alertmanager expects (``2026-01-02T03:04:05.678Z``)."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def alert_json(a: Alert, generator_url: str = "") -> dict[str, Any]:
    """The JSON form of an alert used by the webhook and log sinks."""
    return {
        "id": a.event_id,
        "status": a.status.value,
        "labels": dict(a.labels),
        "annotations": dict(a.annotations),
        "startsAt": rfc3339(a.starts_at),
        "endsAt": rfc3339(a.ends_at) if a.ends_at is not None else None,
        "generatorURL": generator_url,
    }


@dataclasses.dataclass(slots=True)
class SinkStats:
    """What one sink did."""

    sent: int = 0  # alerts delivered
    errors: int = 0  # failed attempts (each retried) and refusals
    rejected: int = 0  # alerts dropped because the receiver refused them
    dropped: int = 0  # alerts dropped because the queue was full


class Sink:
    """A bounded queue of alerts drained by ``run()`` with retries and backoff."""

    max_batch = 100

    def __init__(
        self,
        name: str,
        *,
        max_pending: int = 10_000,
        retry_base_s: float = 0.5,
        retry_cap_s: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.max_pending = max_pending
        self.retry_base_s = retry_base_s
        self.retry_cap_s = retry_cap_s
        self.stats = SinkStats()
        self.failing = False
        self._rng = rng or random.Random()
        self._failures = 0
        self._queue: OrderedDict[str, Alert] = OrderedDict()
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._settled.set()

    @property
    def pending(self) -> int:
        """Alerts waiting to be delivered."""
        return len(self._queue)

    def key_of(self, alert: Alert) -> str:
        """Queue key: a newer entry with the same key replaces a queued one."""
        return alert.event_id

    def offer(self, alerts: Iterable[Alert]) -> None:
        """Queue alerts for delivery; beyond ``max_pending`` the oldest go (counted)."""
        added = False
        for a in alerts:
            key = self.key_of(a)
            self._queue.pop(key, None)
            self._queue[key] = a
            added = True
        while len(self._queue) > self.max_pending:
            self._queue.popitem(last=False)
            self.stats.dropped += 1
        if added:
            self._wake.set()
            if not self.failing:
                self._settled.clear()

    async def settle(self) -> None:
        """Return once everything queued is delivered, or the sink is failing."""
        await self._settled.wait()

    async def deliver(self, alerts: list[Alert]) -> None:
        """Send one batch; SinkError to retry, SinkRejected to drop."""
        raise NotImplementedError

    async def run(self) -> None:
        """Drain the queue until cancelled."""
        while True:
            await self._wake.wait()
            batch = list(self._queue.items())[: self.max_batch]
            if not batch:
                self._wake.clear()
                self._settled.set()
                continue
            try:
                await self.deliver([a for _, a in batch])
            except SinkRejected as exc:
                log.warning("alert sink %s refused %d alerts: %s", self.name, len(batch), exc)
                self.stats.errors += 1
                self.stats.rejected += len(batch)
                self._forget(batch)
            except SinkError as exc:
                self.stats.errors += 1
                self._failures += 1
                self.failing = True
                self._settled.set()
                delay = self._backoff()
                log.warning("alert sink %s: %s; retry in %.1f s", self.name, exc, delay)
                await asyncio.sleep(delay)
            else:
                self.failing = False
                self._failures = 0
                self.stats.sent += len(batch)
                self._forget(batch)

    def _forget(self, batch: list[tuple[str, Alert]]) -> None:
        """Drop delivered entries, unless a newer one replaced them meanwhile."""
        for key, a in batch:
            if self._queue.get(key) is a:
                del self._queue[key]

    def _backoff(self) -> float:
        growth = 2.0 ** min(self._failures - 1, 30)
        ceiling = min(self.retry_cap_s, self.retry_base_s * growth)
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)


class HttpSink(Sink):
    """A sink that POSTs JSON; the session is set by the consumer before ``run``."""

    def __init__(self, name: str, url: str, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.url = url
        self.session: aiohttp.ClientSession | None = None

    async def post(self, payload: Any) -> None:
        """POST ``payload``; map every failure to SinkError / SinkRejected."""
        if self.session is None:
            raise SinkError("no HTTP session (the consumer is not running)")
        try:
            async with self.session.post(self.url, json=payload) as resp:
                if resp.status < 300:
                    return
                text = (await resp.text())[:200]
                reason = f"{self.url}: HTTP {resp.status} {text!r}"
                if 400 <= resp.status < 500 and resp.status not in (408, 429):
                    raise SinkRejected(reason)
                raise SinkError(reason)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SinkError(f"{self.url}: {type(exc).__name__} {exc}") from exc


class AlertmanagerSink(HttpSink):
    """Prometheus Alertmanager API v2; queued per alert instance so resends coalesce."""

    def __init__(
        self,
        base_url: str,
        *,
        resend_s: float,
        clock: Callable[[], float] = time.time,
        generator_url: str = "",
        **kw: Any,
    ) -> None:
        url = base_url.rstrip("/") + "/api/v2/alerts"
        super().__init__(f"alertmanager:{base_url}", url, **kw)
        self.resend_s = resend_s
        self.clock = clock
        self.generator_url = generator_url

    def key_of(self, alert: Alert) -> str:
        """One entry per alert instance: a resolve replaces its queued fire or resend."""
        return f"{alert.fingerprint}-{round(alert.starts_at * 1000)}"

    def payload(self, a: Alert, now: float) -> dict[str, Any]:
        """One postableAlert: a firing one is valid for VALID_RESENDS resend periods."""
        ends = a.ends_at if a.ends_at is not None else now + VALID_RESENDS * self.resend_s
        return {
            "labels": dict(a.labels),
            "annotations": dict(a.annotations),
            "startsAt": rfc3339(a.starts_at),
            "endsAt": rfc3339(ends),
            "generatorURL": self.generator_url,
        }

    async def deliver(self, alerts: list[Alert]) -> None:
        """POST the batch as one JSON list."""
        now = self.clock()
        await self.post([self.payload(a, now) for a in alerts])


class WebhookSink(HttpSink):
    """A generic webhook: ``{"source": ..., "alerts": [alert_json, ...]}``."""

    def __init__(self, url: str, *, source: str, generator_url: str = "", **kw: Any) -> None:
        super().__init__("webhook", url, **kw)
        self.source = source
        self.generator_url = generator_url

    async def deliver(self, alerts: list[Alert]) -> None:
        """POST the batch as one JSON object."""
        body = [alert_json(a, self.generator_url) for a in alerts]
        await self.post({"source": self.source, "alerts": body})


class LogSink(Sink):
    """Appends each event to the hub's log on ``<tenant>._alerts.<rule>``."""

    def __init__(self, hub_log: Log, *, clock: Callable[[], float] = time.time, **kw: Any) -> None:
        super().__init__("log", **kw)
        self.log = hub_log
        self.clock = clock

    async def deliver(self, alerts: list[Alert]) -> None:
        """Append in a worker thread (SQLite blocks)."""
        try:
            await asyncio.to_thread(self._append, alerts, self.clock())
        except LogError as exc:
            raise SinkError(str(exc)) from exc

    def _append(self, alerts: list[Alert], now: float) -> None:
        for a in alerts:
            subject = f"{a.tenant}.{ALERTS_DEVICE}.{a.rule}"
            attrs = {"status": a.status.value, "alertname": a.rule, "id": a.event_id}
            self.log.append_local(a.tenant, ALERTS_DEVICE, subject, alert_json(a), attrs, now)


@dataclasses.dataclass(slots=True)
class ConsumerStats:
    """What the consumer loop did."""

    rounds: int = 0
    checkpoints: int = 0
    checkpoint_errors: int = 0  # state file or offset commit failed (retried next time)
    own_records_skipped: int = 0  # the log sink's records read back
    state_unusable: int = 0  # 1 when the snapshot at start could not be used
    settle_timeouts: int = 0  # rounds that stopped waiting for a stuck sink


class AlertConsumer:
    """The durable alert consumer: ``await run()`` until cancelled or ``close()``."""

    def __init__(
        self,
        hub_log: Log,
        settings: AlertSettings,
        *,
        rules: RuleSet | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.log = hub_log
        self.settings = settings
        self.clock = clock
        self.engine = AlertEngine.from_ruleset(rules or load_rules(settings.rules))
        self.cursor = LogCursor(hub_log, settings.name)
        self.state_path = Path(settings.state_path or f"{hub_log.path}.{settings.name}.state.json")
        self.stats = ConsumerStats()
        common: dict[str, Any] = {
            "max_pending": settings.max_pending,
            "retry_base_s": settings.retry_base_s,
            "retry_cap_s": settings.retry_cap_s,
        }
        self.alertmanagers = [
            AlertmanagerSink(
                url,
                resend_s=settings.resend_s,
                clock=clock,
                generator_url=settings.generator_url,
                **common,
            )
            for url in settings.alertmanager_urls
        ]
        self.sinks: list[Sink] = list(self.alertmanagers)
        if settings.webhook_url:
            self.sinks.append(
                WebhookSink(
                    settings.webhook_url,
                    source=settings.name,
                    generator_url=settings.generator_url,
                    **common,
                )
            )
        if settings.log_sink:
            self.sinks.append(LogSink(hub_log, clock=clock, **common))
        self._offset = 0
        self._checkpointed = -1
        self._last_checkpoint = -float("inf")
        self._next_resend = -float("inf")
        self._stop = asyncio.Event()
        self._restored = False

    # -- public ---------------------------------------------------------------------------

    def active_alerts(self) -> list[Alert]:
        """The alerts firing now (per device and grouped), with current annotations."""
        return self.engine.active()

    @property
    def offset(self) -> int:
        """The last log offset the engine's state covers."""
        return self._offset

    async def run(self) -> None:
        """Consume the log and deliver alerts until cancelled or ``close()``."""
        if not self._restored:
            await asyncio.to_thread(self._restore)
        timeout = aiohttp.ClientTimeout(total=self.settings.http_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for sink in self.sinks:
                if isinstance(sink, HttpSink):
                    sink.session = session
            tasks = [asyncio.create_task(s.run(), name=f"alert-sink-{s.name}") for s in self.sinks]
            try:
                while not self._stop.is_set():
                    caught_up = await self._round()
                    if caught_up:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._stop.wait(), self.settings.poll_s)
                await self._checkpoint(self.clock())
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        """Stop ``run()`` after the current round and its checkpoint."""
        self._stop.set()

    # -- the loop -------------------------------------------------------------------------

    async def _round(self) -> bool:
        """Read, feed, tick, deliver, checkpoint; True when caught up with the log."""
        s = self.settings
        entries, last = await asyncio.to_thread(self.cursor.read, self._offset, s.batch_records)
        for e in entries:
            if _is_own(e):
                self.stats.own_records_skipped += 1
            else:
                self.engine.feed(e)
        self._offset = last
        caught_up = last + 1 >= self.log.next_offset
        now = self.clock()
        if caught_up:
            self.engine.tick(now)
        events = self.engine.take_events()
        for sink in self.sinks:
            sink.offer(events)
        if caught_up and now >= self._next_resend:
            active = self.engine.active()
            for am in self.alertmanagers:
                am.offer(active)
            self._next_resend = now + s.resend_s
        await self._settle()
        self.stats.rounds += 1
        moved = self._offset != self._checkpointed
        if events or (moved and now - self._last_checkpoint >= s.commit_s):
            await self._checkpoint(now)
        return caught_up

    async def _settle(self) -> None:
        """Wait for every sink to deliver or to be failing (bounded by the HTTP timeout)."""
        waits = [s.settle() for s in self.sinks]
        if not waits:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*waits), 2 * self.settings.http_timeout_s + 1)
        except TimeoutError:
            self.stats.settle_timeouts += 1

    async def _checkpoint(self, now: float) -> None:
        """Snapshot the engine with its offset, then commit the offset in the log.

        A failure is logged and counted; the offset stays where it was, so a restart
        replays from the last good checkpoint (at-least-once, never a gap).
        """
        data = {"consumer": self.settings.name, "offset": self._offset}
        data["engine"] = self.engine.snapshot()
        try:
            await asyncio.to_thread(_write_atomic, self.state_path, json.dumps(data))
            await asyncio.to_thread(self.cursor.commit, self._offset)
        except (OSError, LogError) as exc:
            log.error("alert checkpoint at offset %d failed: %s", self._offset, exc)
            self.stats.checkpoint_errors += 1
            self._last_checkpoint = now  # retried after commit_s, not in a tight loop
            return
        self._checkpointed = self._offset
        self._last_checkpoint = now
        self.stats.checkpoints += 1

    def _restore(self) -> None:
        """Take the snapshot and its offset back, or start from the committed offset."""
        self._restored = True
        committed = self.cursor.committed
        self._offset = committed
        if not self.state_path.exists():
            return
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
            offset = int(data["offset"])
            if not 0 <= offset < self.log.next_offset:
                raise AlertError(f"offset {offset} is beyond this log")
            self.engine.restore(data["engine"])
        except (OSError, ValueError, KeyError, TypeError, AlertError) as exc:
            log.error("alert state %s unusable (%s); starting empty", self.state_path, exc)
            self.stats.state_unusable = 1
            self.engine = AlertEngine(
                self.engine.rules,
                max_active_alerts=self.engine.max_active_alerts,
                resolution_s=self.engine.resolution_s,
            )
            return
        self._offset = offset  # may differ from committed after a crash between the two
        self._checkpointed = committed

    # -- metrics --------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """prometheus_client collector protocol: the squall_alerts_* families."""
        es = self.engine.stats

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"squall_alerts_{name}", doc, value=value)

        yield counter("records", "Log entries fed to the rules", es.records)
        yield counter("fired", "Alerts fired (per device and group)", es.fired)
        yield counter("resolved", "Alerts resolved", es.resolved)
        yield counter("ignored_records", "Matching entries without a usable value", es.ignored)
        yield counter("held_back", "Fires held back at max_active_alerts", es.alerts_dropped)
        failed = self.stats.checkpoint_errors
        yield counter("checkpoint_errors", "Failed state writes or offset commits", failed)
        yield GaugeMetricFamily(
            "squall_alerts_active", "Alerts firing now", value=self.engine.active_count
        )
        yield GaugeMetricFamily(
            "squall_alerts_lag_records",
            "Log entries not yet read",
            value=max(0, self.log.next_offset - 1 - self._offset),
        )
        dropped = CounterMetricFamily(
            "squall_alerts_devices_dropped", "Devices not tracked at max_devices", labels=["rule"]
        )
        tracked = GaugeMetricFamily(
            "squall_alerts_tracked_devices", "Devices tracked per rule", labels=["rule"]
        )
        for rule, n in self.engine.devices_dropped().items():
            dropped.add_metric([rule], n)
        for rule, n in self.engine.tracked().items():
            tracked.add_metric([rule], n)
        yield dropped
        yield tracked
        yield from self._sink_metrics()

    def _sink_metrics(self) -> Iterator[Metric]:
        families = {
            "sent": CounterMetricFamily(
                "squall_alerts_sink_sent", "Alerts delivered", labels=["sink"]
            ),
            "errors": CounterMetricFamily(
                "squall_alerts_sink_errors", "Failed delivery attempts", labels=["sink"]
            ),
            "rejected": CounterMetricFamily(
                "squall_alerts_sink_rejected", "Alerts the receiver refused", labels=["sink"]
            ),
            "dropped": CounterMetricFamily(
                "squall_alerts_sink_dropped", "Alerts dropped from a full queue", labels=["sink"]
            ),
        }
        pending = GaugeMetricFamily(
            "squall_alerts_events_pending", "Alerts queued for delivery", labels=["sink"]
        )
        for sink in self.sinks:
            for name, family in families.items():
                family.add_metric([sink.name], getattr(sink.stats, name))
            pending.add_metric([sink.name], sink.pending)
        yield from families.values()
        yield pending


def _is_own(e: LogEntry) -> bool:
    """A record the log sink appended (the hub's incarnation, device ``_alerts``)."""
    return e.incarnation == LOCAL_INCARNATION and e.device == ALERTS_DEVICE


def _write_atomic(path: Path, text: str) -> None:
    """Write, fsync and rename into place, so a crash leaves the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # the rename itself durable (not on every platform)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


__all__ = [
    "ALERTS_DEVICE",
    "AlertConsumer",
    "AlertSettings",
    "AlertStatus",
    "AlertmanagerSink",
    "LogSink",
    "Sink",
    "SinkError",
    "SinkRejected",
    "WebhookSink",
    "alert_json",
    "rfc3339",
]

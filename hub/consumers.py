"""The durable consumers: run inside the hub (hub.yaml) or by ``squall consume`` (JetStream).

JSON-lines archives (``archives:``), syslog forwarders (``syslog_forwarders:``) and the
alert consumer (``alerts:``).  Each reads a log from its own committed offset (its
name is its key in the log's consumer table, so retention keeps what it has not read)
and is woken when the log grows; between wake-ups each looks on its own every
``poll_s``.  A consumer that fails is logged, counted and restarted after a pause; it
never takes its process down, and it resumes from its committed offset.

The log is the hub's own ``hub.log.Log`` shared by all, or one log per consumer name
(``squall consume`` gives each its own ``hub.jslog.JetStreamLogView``: a JetStream
durable consumer of that name on the shared stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeAlias

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hub.alerts import Alert
from hub.alertsinks import AlertConsumer, AlertSettings
from hub.archive import ArchiveSettings, JsonArchive
from hub.log import Log
from hub.syslogfwd import SyslogForwarder, SyslogForwardSettings

log = logging.getLogger("squall.hub.consumers")

# the hub's log for every consumer, or a log per consumer name
LogSource: TypeAlias = Log | Callable[[str], Log]

ARCHIVE_BATCH = 5000
ARCHIVE_POLL_S = 0.5
RESTART_PAUSE_S = 2.0


@dataclass(slots=True)
class _Archive:
    archive: JsonArchive
    wake: asyncio.Event


class Consumers:
    """Starts, wakes, reports on and stops the configured durable consumers."""

    def __init__(
        self,
        source: LogSource,
        archives: list[ArchiveSettings],
        forwarders: list[SyslogForwardSettings],
        alerts: AlertSettings | None,
    ) -> None:
        log_for = source if callable(source) else (lambda _name: source)
        self.archives = [
            _Archive(JsonArchive.from_settings(log_for(s.name), s), asyncio.Event())
            for s in archives
        ]
        self.forwarders = [SyslogForwarder(log_for(s.name), s) for s in forwarders]
        self.alerts = AlertConsumer(log_for(alerts.name), alerts) if alerts is not None else None
        self.failures: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def names(self) -> list[str]:
        """Every configured consumer's name."""
        out = [a.archive.name for a in self.archives] + [f.settings.name for f in self.forwarders]
        return out + ([self.alerts.settings.name] if self.alerts else [])

    def start(self) -> None:
        """Start one task per consumer (in the running loop)."""
        loop = asyncio.get_running_loop()
        for a in self.archives:
            self._tasks.append(loop.create_task(self._guard(a.archive.name, self._archive_loop(a))))
        for f in self.forwarders:
            self._tasks.append(loop.create_task(self._guard(f.settings.name, f.run)))
        if self.alerts is not None:
            self._tasks.append(
                loop.create_task(self._guard(self.alerts.settings.name, self.alerts.run))
            )

    def on_log_advanced(self) -> None:
        """The log grew: wake every consumer."""
        for a in self.archives:
            a.wake.set()
        for f in self.forwarders:
            f.notify()

    async def stop(self, timeout: float = 10.0) -> None:
        """Let each consumer finish its round and checkpoint, then close the archives."""
        self._stopping = True
        for f in self.forwarders:
            f.close()
        if self.alerts is not None:
            self.alerts.close()
        for a in self.archives:
            a.wake.set()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=timeout)
            for t in late:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for a in self.archives:
            a.archive.close()

    def active_alerts(self) -> list[Alert]:
        """Alerts firing now (empty without an alert consumer)."""
        return self.alerts.active_alerts() if self.alerts is not None else []

    # -- loops ---------------------------------------------------------------------------

    def _archive_loop(self, a: _Archive) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            while True:  # on stop: until caught up (stop() bounds the time)
                before = a.archive.cursor.committed
                await asyncio.to_thread(a.archive.poll, ARCHIVE_BATCH)
                if a.archive.cursor.committed == before:  # caught up: wait for more
                    if self._stopping:
                        return
                    a.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(a.wake.wait(), ARCHIVE_POLL_S)

        return run

    async def _guard(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run a consumer; on an unexpected error log, count, pause and run it again."""
        while not self._stopping:
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.failures[name] = self.failures.get(name, 0) + 1
                log.exception("consumer %s failed; restarting in %.0f s", name, RESTART_PAUSE_S)
                await asyncio.sleep(RESTART_PAUSE_S)

    # -- metrics -------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """Prometheus metrics of every consumer (a prometheus-client collector)."""
        written = CounterMetricFamily(
            "squall_archive_written", "Records written to archive files", labels=["consumer"]
        )
        rotations = CounterMetricFamily(
            "squall_archive_rotations", "Archive files rotated", labels=["consumer", "reason"]
        )
        offset = GaugeMetricFamily(
            "squall_consumer_committed_offset",
            "Last log offset a durable consumer committed",
            labels=["consumer"],
        )
        failures = CounterMetricFamily(
            "squall_consumer_failures", "Consumer crashes (restarted)", labels=["consumer"]
        )
        for a in self.archives:
            arc = a.archive
            written.add_metric([arc.name], arc.stats.written)
            by_age = arc.stats.rotations_by_age
            rotations.add_metric([arc.name, "size"], arc.stats.rotations - by_age)
            rotations.add_metric([arc.name, "age"], by_age)
            offset.add_metric([arc.name], arc.cursor.committed)
        if self.alerts is not None:
            offset.add_metric([self.alerts.settings.name], self.alerts.offset)
        for name in self.names:
            failures.add_metric([name], self.failures.get(name, 0))
        yield from (written, rotations, offset, failures)
        for f in self.forwarders:
            yield from _families(f.metrics())
        if self.alerts is not None:
            yield from self.alerts.collect()


def _families(samples: list[tuple[str, dict[str, str], float]]) -> Iterator[Metric]:
    """(name, labels, value) tuples as metric families; ``_total`` names are counters."""
    by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
    for name, labels, value in samples:
        by_name.setdefault(name, []).append((labels, value))
    for name, rows in by_name.items():
        keys = sorted(rows[0][0])
        family: CounterMetricFamily | GaugeMetricFamily
        if name.endswith("_total"):
            family = CounterMetricFamily(name[: -len("_total")], name, labels=keys)
        else:
            family = GaugeMetricFamily(name, name, labels=keys)
        for labels, value in rows:
            family.add_metric([labels[k] for k in keys], value)
        yield family

"""``squall consume --config consume.yaml``: the durable consumers as their own process.

With ``log.backend: jetstream`` many hubs write one JetStream stream and run no
consumers themselves.  This process runs the same JSON-lines archives, syslog
forwarders and alert consumer as the embedded ones (``hub.consumers.Consumers``,
unchanged: same filters, exactly-once archive files, the same alert semantics), each
on its own JetStream durable consumer named after it (``hub.jslog.JetStreamLogView``).
Its position lives in JetStream, so a restarted process -- or one started on another
machine -- goes on where the last one committed.

Presence for absence alerts comes from the stream: every hub appends its devices'
presence changes as ``<tenant>.<device>.presence`` records (``hub.jspresence``), and
a late "offline" from a hub the device has left is refused there, so the alert
consumer sees every device of every hub in time order with the data.

SIGTERM / SIGINT: each consumer finishes its round and checkpoints, then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

from edge.config import parse_hostport
from hub.alerts import load_rules
from hub.alertsinks import AlertSettings
from hub.archive import ArchiveSettings
from hub.consumers import Consumers
from hub.jslog import JetStreamLogError, JetStreamLogView, JetStreamSettings
from hub.log import Log
from hub.syslogfwd import SyslogForwardSettings
from transport.cli import run_service
from transport.configload import build, load_yaml
from transport.errors import ConfigError

log = logging.getLogger("squall.consume")


@dataclass(slots=True)
class ConsumeConfig:
    """Everything ``squall consume`` reads from its YAML file (config/consume.yaml)."""

    jetstream: JetStreamSettings = field(default_factory=JetStreamSettings)
    archives: list[ArchiveSettings] = field(default_factory=list)
    syslog_forwarders: list[SyslogForwardSettings] = field(default_factory=list)
    alerts: AlertSettings | None = None
    ack_wait_s: float = 60.0  # a batch fetched and not acked by then is delivered again
    max_ack_pending: int = 1000  # batches one consumer holds unacked (its read-ahead)
    metrics_listen: str = ""  # host:port for /metrics and /healthz; "": none

    def validate(self) -> None:
        """At least one consumer; names are JetStream durable names, each used once."""
        names = [a.name for a in self.archives] + [f.name for f in self.syslog_forwarders]
        names += [self.alerts.name] if self.alerts else []
        if not names:
            raise ValueError("nothing to run: configure archives, syslog_forwarders or alerts")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"consumer name {dup[0]!r} is used twice")
        for n in names:
            if not n or any(c in n for c in ".*> \t"):
                raise ValueError(
                    f"consumer name {n!r}: a JetStream durable name has no . * > or spaces"
                )
        if self.ack_wait_s <= 0 or self.max_ack_pending < 1:
            raise ValueError("ack_wait_s must be positive and max_ack_pending at least 1")
        if self.metrics_listen:
            parse_hostport(self.metrics_listen)


def load_consume_config(path: str | Path) -> ConsumeConfig:
    """Load and check the config; relative paths are taken from the file's folder."""
    p = Path(path)
    cfg = build(ConsumeConfig, load_yaml(p), path=str(p))
    cfg.jetstream.validate()
    base = p.parent
    for arc in cfg.archives:
        arc.directory = _under(base, arc.directory)
    if cfg.alerts is not None:
        a = cfg.alerts
        a.rules = _under(base, a.rules)
        a.state_path = _under(base, a.state_path or f"{a.name}.state.json")
        if not Path(a.rules).is_file():
            raise ConfigError(str(p), "alerts.rules", f"file not found: {a.rules}")
        load_rules(a.rules)  # a bad rule fails now (ConfigError naming its file and key)
    return cfg


def _under(base: Path, value: str) -> str:
    return value if Path(value).is_absolute() else str(base / value)


def consumer_names(cfg: ConsumeConfig) -> list[str]:
    """Every configured consumer's name (its JetStream durable)."""
    names = [a.name for a in cfg.archives] + [f.name for f in cfg.syslog_forwarders]
    return names + ([cfg.alerts.name] if cfg.alerts else [])


def open_views(cfg: ConsumeConfig) -> dict[str, JetStreamLogView]:
    """One durable consumer per name (blocking: run it in a thread); all or none."""
    views: dict[str, JetStreamLogView] = {}
    try:
        for name in consumer_names(cfg):
            views[name] = JetStreamLogView(
                cfg.jetstream, name, ack_wait_s=cfg.ack_wait_s, max_ack_pending=cfg.max_ack_pending
            )
    except BaseException:
        close_views(views)
        raise
    return views


def close_views(views: dict[str, JetStreamLogView]) -> None:
    """Unbind every durable (their positions stay in JetStream)."""
    for view in views.values():
        with contextlib.suppress(Exception):
            view.close()


class ViewCollector:
    """squall_consume_* metrics: what each JetStream durable consumer fetched."""

    def __init__(self, views: dict[str, JetStreamLogView]) -> None:
        self.views = views

    def collect(self) -> Iterator[Metric]:
        """prometheus_client collector protocol."""
        fams = {
            "fetched": CounterMetricFamily(
                "squall_consume_batches_fetched", "Batches fetched", labels=["consumer"]
            ),
            "records": CounterMetricFamily(
                "squall_consume_records_fetched", "Records fetched", labels=["consumer"]
            ),
            "redelivered_ignored": CounterMetricFamily(
                "squall_consume_redelivered",
                "Batches delivered again and not passed on twice",
                labels=["consumer"],
            ),
            "resets": CounterMetricFamily(
                "squall_consume_resets",
                "Durables recreated at their first unacked batch",
                labels=["consumer"],
            ),
        }
        for name, view in self.views.items():
            for key, fam in fams.items():
                fam.add_metric([name], getattr(view.consumer.stats, key))
        yield from fams.values()


async def start_metrics(
    listen: str, consumers: Consumers, views: dict[str, JetStreamLogView]
) -> web.AppRunner:
    """Serve /metrics and /healthz on ``listen``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(consumers)
    registry.register(ViewCollector(views))

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = parse_hostport(listen)
    await web.TCPSite(runner, host, port).start()
    return runner


def cli_consume(argv: list[str]) -> int:
    """Entry point; exit 0 after a clean shutdown, 2 on a configuration error, 1 if NATS
    cannot be reached."""
    return run_service(argv, "consume", __doc__, load_consume_config, _run)


async def _run(cfg: ConsumeConfig) -> int:
    views = await asyncio.to_thread(open_views, cfg)
    consumers = Consumers(
        # the consumers are written against hub.log.Log; a view serves the calls they make
        lambda name: cast(Log, views[name]),
        cfg.archives,
        cfg.syslog_forwarders,
        cfg.alerts,
    )
    runner = None
    try:
        consumers.start()
        if cfg.metrics_listen:
            runner = await start_metrics(cfg.metrics_listen, consumers, views)
        print(
            f"squall consume: {', '.join(consumer_names(cfg))} on stream "
            f"{cfg.jetstream.stream} at {', '.join(cfg.jetstream.servers)}",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        await consumers.stop()
    finally:
        if runner is not None:
            await runner.cleanup()
        await asyncio.to_thread(close_views, views)
    print("squall consume: stopped cleanly", flush=True)
    return 0


__all__ = [
    "ConsumeConfig",
    "JetStreamLogError",
    "cli_consume",
    "consumer_names",
    "load_consume_config",
]

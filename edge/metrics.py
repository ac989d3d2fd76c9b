"""Prometheus metrics of one edge agent, read from its counters at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from edge.agent import Agent
from transport.wire import Lane


class AgentCollector:
    """squall_edge_* metrics (no per-record metric calls on the hot path)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        """prometheus_client collector protocol."""
        a = self.agent
        depth = a.spool.depth()
        records = GaugeMetricFamily(
            "squall_edge_spool_records", "Records in the spool", labels=["lane"]
        )
        size = GaugeMetricFamily("squall_edge_spool_bytes", "Bytes in the spool", labels=["lane"])
        for lane in Lane:
            n, b = depth.get(lane, (0, 0))
            records.add_metric([lane.name.lower()], n)
            size.add_metric([lane.name.lower()], b)
        yield records
        yield size
        yield CounterMetricFamily(
            "squall_edge_accepted", "Records accepted", value=a.stats.accepted
        )
        yield CounterMetricFamily("squall_edge_acked", "Records acknowledged", value=a.stats.acked)
        yield CounterMetricFamily(
            "squall_edge_retransmitted",
            "Records sent again",
            value=a.stats.retransmitted + (a.endpoint.session.retransmitted if a.endpoint else 0),
        )
        yield CounterMetricFamily(
            "squall_edge_small_batches_held",
            "Small batches that waited for an ACK (sender.small_batches_in_flight)",
            value=a.stats.held_small + (a.endpoint.session.held_small if a.endpoint else 0),
        )
        yield CounterMetricFamily("squall_edge_reconnects", "Reconnects", value=a.stats.reconnects)
        yield CounterMetricFamily(
            "squall_edge_stateless_resets",
            "Sessions a restarted hub ended with a stateless reset (reconnected at once)",
            value=a.stats.stateless_resets,
        )
        yield CounterMetricFamily(
            "squall_edge_failovers",
            "Moves to the next hub of the placement order",
            value=a.reconnector.failovers,
        )
        yield GaugeMetricFamily(
            "squall_edge_on_home_hub",
            "1 while the agent uses its home hub (first of its placement order)",
            value=int(a.reconnector.current == a.reconnector.home),
        )
        yield CounterMetricFamily(
            "squall_edge_early_data_sessions",
            "Sessions resumed with 0-RTT",
            value=a.stats.early_data_sessions,
        )
        evicted = CounterMetricFamily(
            "squall_edge_evicted", "Records dropped by spool policy", labels=["lane", "reason"]
        )
        for lane_name, reasons in sorted(a.spool.evicted.items()):
            for reason, n in sorted(reasons.items()):
                evicted.add_metric([lane_name, reason], n)
        yield evicted
        rtt = a.endpoint.rtt() if a.endpoint is not None else 0.0
        yield GaugeMetricFamily("squall_edge_rtt_seconds", "Smoothed RTT to the hub", value=rtt)
        yield GaugeMetricFamily(
            "squall_edge_connected",
            "1 while a session is established",
            value=int(a.connected.is_set()),
        )


async def start_metrics(agent: Agent, host: str, port: int) -> web.AppRunner:
    """Serve /metrics for ``agent`` on host:port."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner

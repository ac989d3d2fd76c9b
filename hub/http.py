"""The hub's HTTP API (aiohttp): health, readiness, metrics, devices, revocation, subscriptions.

With ``log.backend: jetstream`` there are no live subscriptions on the hub:
/v1/subscribe and /v1/subscriptions answer 501, naming ``squall consume``; and
``GET /v1/presence/shared`` lists every device of every hub from the shared bucket.

Bound to 127.0.0.1 by default.  Everything but /healthz and /readyz needs
``Authorization: Bearer <token>``: the admin token (``http.token``) opens every
endpoint; a tenant token (``http.tenant_tokens``) opens only /v1/subscribe and
/v1/subscriptions, for that tenant's subjects (403 elsewhere).  With no token
configured those endpoints refuse every request (401) rather than run open.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from hub.alertsinks import alert_json
from hub.jspresence import SharedPresenceStats
from hub.server import Hub
from hub.websub import TOKENS_KEY, Tokens, add_routes
from transport.errors import SquallError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    """One unlabelled counter."""
    return CounterMetricFamily(name, doc, value=value)


def counters_by(name: str, doc: str, label: str, values: dict[str, float]) -> CounterMetricFamily:
    """One counter family with a sample per ``label`` value."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


class HubCollector:
    """Reads the hub's plain counters at scrape time (no per-record metric calls)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        """prometheus_client collector protocol."""
        hub = self.hub
        c = hub.counters
        ep = hub.endpoint.counters

        yield GaugeMetricFamily(
            "squall_hub_sessions", "Live device sessions", value=len(hub.endpoint.connections)
        )
        yield counters_by(
            "squall_hub_handshakes",
            "Completed handshakes",
            "kind",
            {"fresh": c["handshakes_fresh"], "resumed": c["handshakes_resumed"]},
        )
        yield counter(
            "squall_hub_handshakes_early_data",
            "Resumed handshakes whose 0-RTT data was accepted (part of kind=resumed)",
            ep["early_data"],
        )
        yield counter("squall_hub_records_in", "Records accepted from devices", c["records_in"])
        yield counter("squall_hub_records_committed", "Records committed", c["records_committed"])
        yield counter("squall_hub_received_bytes", "DATA frame bytes received", c["received_bytes"])
        yield counter("squall_hub_duplicates", "Duplicate records not stored", c["duplicates"])
        driver = hub.driver
        if driver is not None:  # the UDP socket: every datagram, handshakes and junk included
            yield counters_by(
                "squall_hub_udp_datagrams",
                "UDP datagrams, hub socket",
                "direction",
                {"in": driver.received_datagrams, "out": driver.sent_datagrams},
            )
            yield counters_by(
                "squall_hub_udp_bytes",
                "UDP payload bytes, hub socket",
                "direction",
                {"in": driver.received_bytes, "out": driver.sent_bytes},
            )
        yield counter(
            "squall_hub_out_of_order_batches",
            "Batches past a gap, dropped for the edge to resend (counted as sessions end)",
            c["out_of_order"],
        )
        yield counter("squall_hub_commits", "Group commits", c["commits"])
        yield counter("squall_hub_junk_datagrams", "Datagrams that are not QUIC", ep["junk"])
        yield counter(
            "squall_hub_unknown_cid_datagrams", "Datagrams for no connection", ep["unknown_cid"]
        )
        yield counter(
            "squall_hub_stateless_resets",
            "Stateless resets sent for packets of unknown connections (a restarted hub's devices)",
            ep["stateless_resets"],
        )
        yield counter(
            "squall_hub_stateless_resets_limited",
            "Packets of unknown connections left unanswered: over limits.stateless_resets_per_s",
            ep["stateless_resets_limited"],
        )
        yield counter("squall_hub_busy_refused", "Connections refused as busy", ep["busy_refused"])
        yield counter("squall_hub_auth_failed", "Refused device authentications", ep["auth_failed"])
        yield counter(
            "squall_hub_handshake_timeouts",
            "Handshakes dropped unfinished",
            ep["handshake_timeouts"],
        )
        yield counter(
            "squall_hub_handshake_errors",
            "Handshakes ended by a QUIC protocol error (e.g. a late Initial with no CRYPTO frame)",
            ep["handshake_errors"],
        )
        yield counter(
            "squall_hub_tls_backlog_exceeded",
            "Connections closed for buffering too much TLS before auth",
            ep["tls_backlog_exceeded"],
        )
        yield counter(
            "squall_hub_revoked_closed", "Sessions closed by revocation", c["revoked_closed"]
        )
        yield counter(
            "squall_hub_behind", "Devices that had acked records this hub lacks", c["hub_behind"]
        )
        errors = CounterMetricFamily(
            "squall_hub_errors",
            "Session errors by code (QUIC_0x..: QUIC-level closes; EDGE_...: the device's close)",
            labels=["code"],
        )
        for code, n in sorted(hub.errors.items()):
            errors.add_metric([code], n)
        yield errors
        pres = GaugeMetricFamily(
            "squall_hub_presence_devices", "Devices by presence", labels=["state"]
        )
        for state, n in hub.presence.counts().items():
            pres.add_metric([state], n)
        yield pres
        yield counter(
            "squall_hub_presence_forgotten",
            "Devices forgotten beyond presence.max_devices",
            hub.presence.forgotten,
        )
        yield GaugeMetricFamily(
            "squall_hub_ledgers",
            "Device incarnations whose dedup marks the hub holds in memory",
            value=hub.ledgers.held,
        )
        yield counter(
            "squall_hub_ledgers_evicted",
            f"Dedup ledgers forgotten, least recently used first, past "
            f"{hub.ledgers.per_device} incarnations per device",
            hub.ledgers.evicted,
        )
        yield counter(
            "squall_hub_ledger_load_failures",
            "Dedup ledgers the log could not be read for (started empty; the log still dedups)",
            hub.ledgers.load_failures,
        )
        yield from ticket_metrics(hub)
        yield self._commit_histogram()
        yield from log_metrics(hub)
        if hub.subs is not None:
            yield from kernel_metrics(hub)
        yield from jetstream_metrics(hub)

    def _commit_histogram(self) -> HistogramMetricFamily:
        h = self.hub.commit_latency
        buckets = [(str(b), n) for b, n in zip(h.BOUNDS, h.counts, strict=True)]
        buckets.append(("+Inf", h.total))
        return HistogramMetricFamily(
            "squall_hub_commit_seconds", "Group commit latency", buckets=buckets, sum_value=h.sum
        )


def ticket_metrics(hub: Hub) -> Iterator[Metric]:
    """The resumption ticket store: held now, issued, refused, evicted at its bound."""
    t = hub.endpoint.tickets
    yield GaugeMetricFamily("squall_hub_tickets", "Resumption tickets held", value=len(t))
    yield CounterMetricFamily("squall_hub_tickets_issued", "Tickets issued", value=t.issued)
    yield CounterMetricFamily(
        "squall_hub_tickets_unknown",
        "Resumptions refused: ticket unknown, used or evicted (a full handshake follows)",
        value=t.unknown,
    )
    yield CounterMetricFamily(
        "squall_hub_tickets_evicted",
        "Tickets dropped, oldest first, beyond server.max_tickets",
        value=t.evicted,
    )


def log_metrics(hub: Hub) -> Iterator[Metric]:
    """The SQLite log: what it holds, what retention removed (nothing with jetstream)."""
    if hub.jslog is not None:
        return
    st = hub.log.stats()
    yield GaugeMetricFamily("squall_hub_log_stored_bytes", "Payload bytes in the log", st.bytes)
    yield GaugeMetricFamily("squall_hub_log_stored_records", "Records in the log", st.records)
    yield CounterMetricFamily(
        "squall_hub_log_retention_removed_records",
        "Records retention removed by age or size (unread ones also in dropped_unconsumed)",
        value=st.retention_records_removed,
    )
    yield CounterMetricFamily(
        "squall_hub_log_corrupt_batches",
        "Stored batches that failed to decode on read, skipped by every reader (damaged storage)",
        value=st.corrupt_batches,
    )
    yield CounterMetricFamily(
        "squall_hub_log_corrupt_records",
        "Records in those batches",
        value=st.corrupt_records,
    )
    yield CounterMetricFamily(
        "squall_hub_log_dropped_unconsumed_records",
        "Records removed past retention_hard_max_bytes before every durable consumer read them",
        value=st.dropped_unconsumed,
    )
    yield CounterMetricFamily(
        "squall_hub_log_retention_blocked",
        "Retention passes held back by a durable consumer that has not read the oldest records",
        value=st.retention_blocked,
    )
    passes = hub.counters["retention_passes"]
    yield CounterMetricFamily("squall_hub_log_retention_passes", "Retention passes", value=passes)
    yield CounterMetricFamily(
        "squall_hub_log_incarnations_dropped",
        "Device incarnations whose dedup marks were forgotten (beyond the per-device bound)",
        value=st.incarnations_dropped,
    )


def jetstream_metrics(hub: Hub) -> Iterator[Metric]:
    """The JetStream log's and shared presence's counters (nothing with the sqlite backend)."""
    if hub.jslog is None:
        return
    st = hub.jslog.stats

    yield counter(
        "squall_hub_jetstream_published", "Batches JetStream acknowledged as new", st.published
    )
    yield counters_by(
        "squall_hub_jetstream_duplicates",
        "Repeats not stored: whole batches by message id (window), records by range check",
        "kind",
        {"window": st.duplicates_window, "range": st.duplicates_skipped},
    )
    yield counter(
        "squall_hub_jetstream_commit_failures",
        "Group commits and hub records JetStream did not confirm (nothing ACKed)",
        st.commit_failures,
    )
    yield counter(
        "squall_hub_jetstream_mark_lookups", "Device marks read from the stream", st.mark_lookups
    )
    yield GaugeMetricFamily(
        "squall_hub_jetstream_connected",
        "1 while connected to NATS",
        value=int(hub.jslog.connection is not None and hub.jslog.connection.is_connected),
    )
    shared = hub.jspresence.stats if hub.jspresence is not None else SharedPresenceStats()
    yield counter(
        "squall_hub_presence_superseded",
        "Stale/offline reports dropped: the device is on another hub now",
        shared.superseded,
    )
    yield counter(
        "squall_hub_presence_shared",
        "Presence changes written to the shared bucket",
        shared.written,
    )
    yield counter(
        "squall_hub_presence_listings",
        "Shared presence listings answered (GET /v1/presence/shared)",
        shared.listings,
    )
    yield counter(
        "squall_hub_presence_list_failures",
        "Shared presence listings failed (HTTP 503: NATS down, over 10 s or 100,000 keys)",
        shared.list_failures,
    )
    yield GaugeMetricFamily(
        "squall_hub_presence_backlog",
        "Presence changes waiting to be shared",
        value=hub.presence_backlog,
    )
    yield counter(
        "squall_hub_presence_dropped",
        "Presence changes dropped unshared (backlog full)",
        hub.counters["presence_dropped"],
    )


def kernel_metrics(hub: Hub) -> Iterator[Metric]:
    """The kernel's counters and gauges (per-queue series only for queues that dropped)."""
    assert hub.subs is not None
    kernel = hub.subs.kernel
    k = kernel.counters

    yield counter("squall_kernel_routed", "Committed entries offered to the kernel", k.routed)
    yield counter("squall_kernel_matches", "Entries that matched a queue", k.matches)
    hits, misses = kernel.match_cache()
    yield counters_by(
        "squall_kernel_match_cache",
        "Subject match cache lookups",
        "result",
        {"hit": hits, "miss": misses},
    )
    yield counter("squall_kernel_delivered", "Entries handed to subscribers", k.delivered)
    yield counters_by(
        "squall_kernel_dropped",
        "Entries a queue lost, by reason",
        "reason",
        {
            "drop-oldest": k.dropped_overflow,
            "retention": k.skipped_retention,
            "corrupt": k.skipped_corrupt,
        },
    )
    per_queue = CounterMetricFamily(
        "squall_kernel_queue_dropped",
        "Entries a drop-oldest queue dropped",
        labels=["tenant", "queue", "policy"],
    )
    for (tenant, queue), policy, n in kernel.dropped_by_queue():
        per_queue.add_metric([tenant, queue, policy.value], n)
    yield per_queue
    yield counter("squall_kernel_blocked", "Times a block queue fell behind the log", k.blocked)
    yield counter(
        "squall_kernel_catchup_records", "Records read back by queues behind", k.catchup_records
    )
    yield counter("squall_kernel_redelivered", "Unacked durable entries requeued", k.redelivered)
    yield counter("squall_kernel_expired_queues", "Idle queues removed", k.expired_queues)
    g = kernel.gauges()
    queues = GaugeMetricFamily("squall_kernel_queues", "Queues by kind", labels=["kind"])
    for kind in ("named", "durable", "private"):
        queues.add_metric([kind], g[f"queues_{kind}"])
    yield queues
    yield GaugeMetricFamily(
        "squall_kernel_subscriptions", "Subscriptions", value=g["subscriptions"]
    )
    yield GaugeMetricFamily(
        "squall_kernel_subscribers", "Attached subscribers", value=g["subscribers"]
    )
    yield GaugeMetricFamily(
        "squall_kernel_pending", "Entries waiting in queues", value=g["pending"]
    )
    yield GaugeMetricFamily(
        "squall_kernel_unacked", "Durable entries awaiting ack", value=g["unacked"]
    )
    yield GaugeMetricFamily(
        "squall_kernel_behind_queues", "Queues reading the log", value=g["behind"]
    )
    errors = CounterMetricFamily(
        "squall_kernel_errors", "Subscription shell errors by kind", labels=["kind"]
    )
    for kind, n in sorted(hub.subs.errors.items()):
        errors.add_metric([kind], n)
    yield errors


_TENANT_PATHS = ("/v1/subscribe", "/v1/subscriptions")


def make_app(hub: Hub) -> web.Application:
    """The aiohttp application for ``hub``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(hub))
    if hub.consumers is not None:
        registry.register(hub.consumers)
    tokens = Tokens(hub.config.http.token, dict(hub.config.http.tenant_tokens))

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in ("/healthz", "/readyz"):
            return await handler(request)
        if not tokens.admin and not tokens.tenants:
            return _error(401, "no API token is configured on this hub (http.token)")
        known, tenant = tokens.caller(request.headers.get("Authorization", ""))
        if not known:
            return _error(401, "missing or wrong bearer token")
        if tenant is not None and not request.path.startswith(_TENANT_PATHS):
            return _error(403, "a tenant token opens only /v1/subscribe and /v1/subscriptions")
        return await handler(request)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        return web.Response(text="ready\n") if hub.ready else _error(503, "not ready")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    async def devices(request: web.Request) -> web.Response:
        return web.json_response({"devices": hub.device_list()})

    async def device(request: web.Request) -> web.Response:
        key = (request.match_info["tenant"], request.match_info["device"])
        info = hub.presence.devices.get(key)
        if info is None:
            return _error(404, f"no device {key[0]}/{key[1]}")
        return web.json_response(info.as_json(time.time()))

    async def alerts(request: web.Request) -> web.Response:
        consumers = hub.consumers
        active = [alert_json(a) for a in consumers.active_alerts()] if consumers else []
        return web.json_response({"alerts": active})

    async def shared_presence(request: web.Request) -> web.Response:
        if hub.jspresence is None:
            return _error(404, "shared presence needs log.backend: jetstream")
        try:
            current = await hub.jspresence.current()
        except SquallError as exc:
            return _error(503, f"shared presence unavailable: {exc}")
        rows = [
            {
                "tenant": p.tenant,
                "device": p.device,
                "presence": p.state.value,
                "hub": p.hub,
                "at": p.at,
            }
            for p in sorted(current.values(), key=lambda p: (p.tenant, p.device))
        ]
        return web.json_response({"devices": rows})

    async def no_subscriptions(request: web.Request) -> web.Response:
        return _error(
            501,
            "live subscriptions are off with log.backend: jetstream; read the shared log "
            "with `squall consume` or a JetStream consumer",
        )

    async def reload(request: web.Request) -> web.Response:
        n = hub.reload_deny_list()
        return web.json_response({"denied": n})

    app = web.Application(middlewares=[auth], client_max_size=64 * 1024)
    app[TOKENS_KEY] = tokens
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/devices", devices)
    app.router.add_get("/v1/devices/{tenant}/{device}", device)
    app.router.add_get("/v1/alerts", alerts)
    app.router.add_post("/v1/revocations/reload", reload)
    app.router.add_get("/v1/presence/shared", shared_presence)
    if hub.subs is not None:
        add_routes(app, hub.subs)
    else:
        app.router.add_route("*", "/v1/subscribe", no_subscriptions)
        app.router.add_route("*", "/v1/subscriptions", no_subscriptions)
        app.router.add_route("*", "/v1/subscriptions/{tail:.*}", no_subscriptions)
    return app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def start_http(hub: Hub) -> tuple[web.AppRunner, int]:
    """Serve the API on the configured address; returns the runner and the bound port."""
    host, _, port = hub.config.http.listen.rpartition(":")
    runner = web.AppRunner(make_app(hub), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]") or "127.0.0.1", int(port))
    await site.start()
    server: Any = site._server
    bound = int(server.sockets[0].getsockname()[1])
    return runner, bound

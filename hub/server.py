"""The hub's asyncio shell: QUIC endpoint, group commit to the durable log, presence, revocation.

The decisions live in sans-I/O cores (``transport.quic.HubEndpoint``, ``HubSession``,
``hub.ingest.GroupCommit``, ``hub.presence.Presence``, ``hub.kernel.Kernel``); this
module pumps them. Whatever reaches the log (a group commit, a presence record) is
then handed to the subscriptions (``hub.websub.SubscriptionService``).

Two log backends (``log.backend``):

- ``sqlite``: the hub's own log; a group commit is one synchronous transaction, and
  the in-hub consumers and live subscriptions read the log back.
- ``jetstream``: many hubs share one JetStream stream (``hub.jslog``).  One group
  commit is in flight at a time (per-device order in the stream) while the next group
  fills; sessions are ACKed only after JetStream acknowledged every publish, and a
  failed commit ACKs nothing (the sessions roll back and close, the edges resend).
  Presence goes to the shared bucket and the stream (``hub.jspresence``).  This hub
  runs no durable consumers and no live subscriptions: ``squall consume`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from hub.config import HubConfig
from hub.consumers import Consumers
from hub.ingest import (
    RETENTION_PASS_BYTES,
    RETENTION_PERIOD_S,
    Accepted,
    GroupCommit,
    LatencyHistogram,
    LedgerBook,
    endpoint_limits,
    make_session,
    retention_delay,
    retention_rows,
)
from hub.jslog import JetStreamLog
from hub.jspresence import JetStreamPresence
from hub.log import RETENTION_MAX_ROWS, Log, LogError, PendingBatch
from hub.presence import Presence, PresenceChange
from hub.websub import SubscriptionService
from transport import certs
from transport.aio import UdpDriver, open_driver
from transport.auth import TicketStore
from transport.certs import DeviceIdentity
from transport.errors import AuthError, ConfigError, ErrorCode
from transport.events import (
    BatchAccepted,
    DuplicatesSkipped,
    HeartbeatReceived,
    HelloReceived,
    SessionClosed,
)
from transport.quic import (
    DeviceConnected,
    DeviceDisconnected,
    DeviceEvent,
    HubConnection,
    HubEndpoint,
    HubTls,
)
from transport.session import HubSession

log = logging.getLogger("squall.hub")

# The kernel queue in front of the hub's one UDP socket.  The default (~208 KiB, ~90 full
# datagrams) overflows when a fleet reconnects at once (a hub restart, a cell outage ending):
# the dropped Initials come back in synchronised retransmission waves and devices wait tens
# of seconds.  The kernel caps the request at net.core.rmem_max (a warning says so).


def _parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


class Hub:
    """One hub process on one UDP port."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        c = config
        self.tls = HubTls(
            certs.load_cert(c.tls.cert),
            certs.load_key(c.tls.key),
            certs.load_certs(c.tls.device_ca),
        )
        self.jslog: JetStreamLog | None = None
        self.jspresence: JetStreamPresence | None = None
        self._log: Log | None = None
        self.ledgers = LedgerBook()
        if c.log.backend == "jetstream":
            # the stream is the truth: ledgers start empty and sessions take the edges'
            # acked marks (trust_edge_acks); the stream's range check refuses repeats
            self.jslog = JetStreamLog(c.jetstream)
        else:
            self._log = Log(
                c.log.path,
                synchronous=c.log.synchronous,
                retention_max_age_s=c.log.retention_max_age_s,
                retention_max_bytes=c.log.retention_max_bytes,
                retention_hard_max_bytes=c.log.retention_hard_max_bytes or None,
            )
            self.ledgers = LedgerBook(self._log.load_ledgers(), load=self._log.load_ledger)
        self.presence = Presence(
            c.presence.stale_after_s, c.presence.offline_after_s, c.presence.max_devices
        )
        self.group: GroupCommit[HubConnection] = GroupCommit(
            c.log.group_commit_ms / 1000, c.log.group_commit_records
        )
        limits = endpoint_limits(c.server, c.limits)
        self.endpoint = HubEndpoint(
            self.tls,
            self._make_session,
            self._authorize,
            limits,
            tickets=TicketStore(c.server.max_tickets),
        )
        self.denied: set[str] = set()  # deny-list entries as written (device ids match exactly)
        self._denied_serials: set[str] = set()  # the same, lowercased (hex serials in any case)
        # retention pacing (tests shorten or lengthen them): see hub.ingest.retention_delay
        self.retention_period_s = RETENTION_PERIOD_S
        self.retention_pass_bytes = RETENTION_PASS_BYTES
        self.live: dict[tuple[str, str], HubConnection] = {}
        self.counters: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.commit_latency = LatencyHistogram()
        self.subs: SubscriptionService | None = None
        self.consumers: Consumers | None = None
        if self._log is not None:
            self.subs = SubscriptionService(self._log, c.kernel, c.subscriptions)
            self.consumers = Consumers(self._log, c.archives, c.syslog_forwarders, c.alerts)
        self.driver: UdpDriver | None = None
        self._commit_timer: asyncio.TimerHandle | None = None
        self._commit_task: asyncio.Task[None] | None = None  # jetstream: the group in flight
        # jetstream: presence changes not yet in the shared bucket and stream (oldest first)
        self._presence_backlog: deque[PresenceChange] = deque()
        self._presence_task: asyncio.Task[None] | None = None
        self.hub_name = c.name
        self._tasks: list[asyncio.Task[None]] = []
        self.ready = False
        self.reload_deny_list()

    @property
    def log(self) -> Log:
        """The hub's own SQLite log (LogError with log.backend jetstream: there is none)."""
        if self._log is None:
            raise LogError("log.backend is jetstream: this hub has no local log")
        return self._log

    # -- sessions ------------------------------------------------------------------

    def _make_session(self, conn: HubConnection, now: float) -> HubSession:
        trust = self.jslog is not None  # shared log: another hub may have stored its records
        return make_session(conn, now, self.ledgers, self.config.limits, trust_edge_acks=trust)

    def _authorize(self, ident: DeviceIdentity) -> None:
        if ident.device in self.denied or _serial_keys(ident.serial) & self._denied_serials:
            raise AuthError(f"device {ident.tenant}/{ident.device} is revoked")

    def reload_deny_list(self) -> int:
        """Re-read the deny list; closes live sessions of newly revoked devices. Returns count."""
        path = self.config.deny_list
        entries: set[str] = set()
        if path:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                log.error("cannot read deny list %s: %s", path, exc)
                return len(self.denied)
            for line in text.splitlines():
                item = line.split("#", 1)[0].strip()
                if item:
                    entries.add(item)
        self.denied = entries
        self._denied_serials = {e.lower() for e in entries}
        for conn in list(self.endpoint.connections.values()):
            if conn.identity is None:
                continue
            try:
                self._authorize(conn.identity)
            except AuthError as exc:
                self.endpoint.close_connection(conn, ErrorCode.REVOKED, str(exc))
                self.counters["revoked_closed"] += 1
        self._flush()
        return len(self.denied)

    # -- event pump ------------------------------------------------------------------

    def _after(self) -> None:
        now = self._now()
        wall = time.time()
        while (ev := self.endpoint.next_event()) is not None:
            if isinstance(ev, DeviceEvent):
                self._on_session_event(ev.conn, ev.event, now, wall)
            elif isinstance(ev, DeviceConnected):
                self._on_connected(ev.conn, wall)
            elif isinstance(ev, DeviceDisconnected):
                self._on_disconnected(ev, wall)
        if self.group.due(now):
            self._commit()
        elif len(self.group) and self._commit_timer is None:
            at = self.group.deadline()
            assert at is not None
            self._commit_timer = asyncio.get_running_loop().call_at(at, self._commit_now)

    def _on_connected(self, conn: HubConnection, wall: float) -> None:
        ident = conn.identity
        assert ident is not None
        key = (ident.tenant, ident.device)
        old = self.live.get(key)
        if old is not None and old is not conn and not old.closed:
            self.endpoint.close_connection(old, ErrorCode.GOING_AWAY, "replaced by a newer session")
        self.live[key] = conn
        self.counters["handshakes_resumed" if conn.resumed else "handshakes_fresh"] += 1
        if self.jslog is not None:  # it may come from another hub: re-read its marks
            self.jslog.forget_device(ident.tenant, ident.device)
        addr = conn.peer_addr
        self.presence.connected(ident.tenant, ident.device, f"{addr[0]}:{addr[1]}", wall)

    def _on_disconnected(self, ev: DeviceDisconnected, wall: float) -> None:
        conn = ev.conn
        if ev.error:  # a close no session event reported (QUIC error, idle timeout, the edge's)
            self.errors[ev.error] += 1
        if conn.session is not None:
            self.counters["out_of_order"] += conn.session.out_of_order
        ident = conn.identity
        if ident is None or not conn.handshake_done:
            return
        key = (ident.tenant, ident.device)
        if self.live.get(key) is conn:
            del self.live[key]
        self.presence.disconnected(ident.tenant, ident.device, wall)

    def _on_session_event(self, conn: HubConnection, ev: Any, now: float, wall: float) -> None:
        session = conn.session
        assert session is not None and conn.identity is not None
        ident = conn.identity
        if isinstance(ev, BatchAccepted):
            assert session.ledger is not None
            self.group.add(
                Accepted(conn, ident.tenant, ident.device, session.ledger, ev, wall), now
            )
            self.counters["records_in"] += ev.count
            self.counters["received_bytes"] += ev.wire_bytes
            self.presence.heard(ident.tenant, ident.device, wall, ev.last_seq, ev.count)
        elif isinstance(ev, HelloReceived) and ev.behind:
            self.counters["hub_behind"] += 1
            log.error(
                "device %s/%s was told its records were committed but this hub lacks them "
                "(lane: edge mark, hub mark): %s — was the log restored or replaced?",
                ident.tenant,
                ident.device,
                ev.behind,
            )
        elif isinstance(ev, HeartbeatReceived):
            self.presence.heartbeat(ident.tenant, ident.device, ev.stats, wall)
        elif isinstance(ev, DuplicatesSkipped):
            self.counters["duplicates"] += ev.count
            self.presence.devices[(ident.tenant, ident.device)].duplicates += ev.count
        elif isinstance(ev, SessionClosed) and ev.code not in (ErrorCode.NO_ERROR,):
            self.errors[ev.code.name] += 1
            log.info(
                "session %s/%s closed: %s %s", ident.tenant, ident.device, ev.code.name, ev.reason
            )

    def _commit_now(self) -> None:
        self._commit_timer = None
        if len(self.group):
            self._commit()

    def _commit(self) -> None:
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        if self.jslog is not None:
            if self._commit_task is None:  # one group in flight: per-device order in the stream
                items = self.group.take()
                loop = asyncio.get_running_loop()
                self._commit_task = loop.create_task(self._commit_js(self.jslog, items))
            return  # else the group keeps filling; _commit_js commits it when done
        items = self.group.take()
        pending = [
            PendingBatch.from_accepted(it.tenant, it.device, it.batch, int(it.received_at * 1e6))
            for it in items
        ]
        t0 = time.perf_counter()
        try:
            self.log.append_group(pending, time.time())
        except LogError as exc:
            self._commit_failed(items, exc)
            return
        self._commit_done(items, sum(p.count for p in pending), time.perf_counter() - t0)

    async def _commit_js(self, jslog: JetStreamLog, items: list[Accepted[HubConnection]]) -> None:
        """Publish one group; ACK only once JetStream acknowledged all of it."""
        pending = [
            PendingBatch.from_accepted(it.tenant, it.device, it.batch, int(it.received_at * 1e6))
            for it in items
        ]
        t0 = time.perf_counter()
        try:
            stored = await jslog.append_group(pending, time.time())
        except Exception as exc:  # JetStreamLogError, or a bug: either way nothing is ACKed
            if not isinstance(exc, LogError):
                log.exception("commit to JetStream failed unexpectedly")
            self._commit_task = None
            self._commit_failed(items, exc)
        else:
            self._commit_task = None
            self._commit_done(items, sum(n for _, n in stored), time.perf_counter() - t0)
        if self.group.due(self._now()):
            self._commit()
        elif len(self.group) and self._commit_timer is None:
            at = self.group.deadline()
            assert at is not None
            self._commit_timer = asyncio.get_running_loop().call_at(at, self._commit_now)

    def _commit_failed(self, items: list[Accepted[HubConnection]], exc: Exception) -> None:
        """No ACK: the sessions roll back what they accepted and close; the edges resend."""
        log.error("commit failed: %s", exc)
        self.errors["COMMIT_FAILED"] += 1
        failed = GroupCommit.failed(items)
        if self.jslog is not None:
            failed = list(dict.fromkeys([*failed, *self._drop_followers(items)]))
        now = self._now()
        for conn in failed:
            if conn.session is not None:
                conn.session.on_commit_failed(str(exc))
                self.endpoint.touch(conn, now)
        self._flush()

    def _drop_followers(self, failed: list[Accepted[HubConnection]]) -> list[HubConnection]:
        """Take out of the open group what was accepted behind a failed batch.

        Stored after the gap the failure leaves, those records would move the stream's
        mark past records the edge must still send (and the range check would then
        refuse them): they go back to the edge with the failed ones.
        """
        keys = {(it.tenant, it.device, it.batch.incarnation, it.batch.lane) for it in failed}
        keep: list[Accepted[HubConnection]] = []
        drop: list[Accepted[HubConnection]] = []
        for it in self.group.take():
            key = (it.tenant, it.device, it.batch.incarnation, it.batch.lane)
            (drop if key in keys else keep).append(it)
        now = self._now()
        for it in keep:
            self.group.add(it, now)
        return GroupCommit.failed(drop)

    def _commit_done(
        self, items: list[Accepted[HubConnection]], stored: int, elapsed: float
    ) -> None:
        """The group is durable: ledgers advance, sessions ACK."""
        self.commit_latency.observe(elapsed)
        self.counters["commits"] += 1
        self.counters["records_committed"] += stored
        now = self._now()
        for conn in GroupCommit.committed(items, self.live):
            if conn.session is not None:
                conn.session.on_committed(now)
                self.endpoint.touch(conn, now)
        self._flush()
        self._after_log_grew()

    def _after_log_grew(self) -> None:
        """Hand what the log just committed to its readers (none with jetstream)."""
        if self.subs is not None:
            self.subs.on_log_advanced()
        if self.consumers is not None:
            self.consumers.on_log_advanced()

    def _flush(self) -> None:
        if self.driver is not None:
            self.driver.flush()

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def publish_presence(self, changes: list[PresenceChange]) -> None:
        """Each presence change becomes a record on <tenant>.<device>.presence.

        With jetstream the changes queue up (bounded by ``presence.max_devices``; the
        oldest go first, counted) for one task that writes them to the shared bucket
        and stream in order; what fails is tried again at the next tick.
        """
        if self.jslog is not None:
            self._queue_presence(changes)
            return
        for ch in changes:
            body = {"state": ch.new.value, "previous": ch.old.value, "heartbeat": ch.heartbeat}
            subject = f"{ch.tenant}.{ch.device}.presence"
            try:
                self.log.append_local(ch.tenant, ch.device, subject, body, {}, ch.at)
            except LogError as exc:
                log.error("cannot log presence change: %s", exc)
                self.errors["COMMIT_FAILED"] += 1
        if changes:
            self._after_log_grew()

    def _queue_presence(self, changes: list[PresenceChange]) -> None:
        bound = self.config.presence.max_devices
        for ch in changes:
            if len(self._presence_backlog) >= bound:
                self._presence_backlog.popleft()
                self.counters["presence_dropped"] += 1
            self._presence_backlog.append(ch)
        if self._presence_backlog and self._presence_task is None and self.jspresence is not None:
            loop = asyncio.get_running_loop()
            self._presence_task = loop.create_task(self._write_presence(self.jspresence))

    async def _write_presence(self, shared: JetStreamPresence) -> None:
        """Write the backlog in order; stop at the first failure (the next tick retries)."""
        try:
            while self._presence_backlog:
                ch = self._presence_backlog[0]
                await shared.publish([ch], self.jslog)
                self._presence_backlog.popleft()
        except LogError as exc:
            if not self.errors["PRESENCE_FAILED"]:
                log.error("cannot share presence changes (retried each second): %s", exc)
            self.errors["PRESENCE_FAILED"] += 1
        finally:
            self._presence_task = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the log, bind the UDP port and start the periodic work.

        With jetstream: JetStreamLogError if NATS cannot be reached, ConfigError if
        ``limits.max_frame_bytes`` is more than NATS takes in one message.
        """
        if self.jslog is not None:
            await self._open_jetstream(self.jslog)
        if self.subs is not None:
            self.subs.start(self._now())
        if self.consumers is not None:
            self.consumers.start()
        host, port = _parse_addr(self.config.listen)
        self.driver = await open_driver(self.endpoint, (host, port), self._after)
        _grow_recv_buffer(self.driver, self.config.server.udp_receive_buffer_bytes)
        self.hub_name = self.config.name or f"{socket.gethostname()}:{self.port}"
        if self.jslog is not None:
            self.jspresence = JetStreamPresence(self.config.jetstream, self.hub_name)
            await self.jspresence.open(self.jslog.connection)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._every(1.0, self._tick)))
        if self._log is not None:
            self._tasks.append(loop.create_task(self._retention_loop()))
        self.ready = True

    async def _open_jetstream(self, jslog: JetStreamLog) -> None:
        await jslog.open()
        room = jslog.max_batch_bytes
        if self.config.limits.max_frame_bytes > room:
            await jslog.close()
            raise ConfigError(
                "hub.yaml",
                "limits.max_frame_bytes",
                f"{self.config.limits.max_frame_bytes} is more than NATS takes in one message "
                f"({room} after Squall's envelope): raise max_payload in nats-server's "
                f"config (2MB) or lower limits.max_frame_bytes to {room} at most",
            )

    @property
    def port(self) -> int:
        """The UDP port the hub listens on."""
        assert self.driver is not None and self.driver.transport is not None
        return int(self.driver.transport.get_extra_info("sockname")[1])

    async def _every(self, period: float, fn: Any) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                fn()
            except Exception:  # a periodic job must not take the hub down; it is logged
                log.exception("periodic job failed")
                self.errors["INTERNAL"] += 1

    def _tick(self) -> None:
        self.presence.tick(time.time())
        self.publish_presence(self.presence.take_changes())

    async def _retention_loop(self) -> None:
        """Retention passes: one at start, then every ``retention_period_s``; while a pass
        hits its cap (a backlog: ingest outran it, or the hub was down) the next one comes
        soon, paced to a bounded share of the loop (hub.ingest.retention_delay)."""
        delay = 0.0
        while True:
            await asyncio.sleep(delay)
            t0 = time.perf_counter()
            try:
                removed, cap = self._retention()
            except Exception:  # a periodic job must not take the hub down; it is logged
                log.exception("retention pass failed")
                self.errors["INTERNAL"] += 1
                removed, cap = 0, 1
            elapsed = time.perf_counter() - t0
            delay = retention_delay(removed, cap, elapsed, self.retention_period_s)

    def _retention(self) -> tuple[int, int]:
        """One pass; returns (batches removed, the pass's cap)."""
        # never drop what a durable consumer has not read yet (unless the hard size limit says so)
        # (jetstream: the stream's own max_age_s / max_bytes apply; this is not scheduled)
        offsets = self.log.consumer_offsets()
        protect = min(offsets.values()) + 1 if offsets else None
        st = self.log.stats()
        cap = retention_rows(st.rows, st.bytes, self.retention_pass_bytes, RETENTION_MAX_ROWS)
        removed = self.log.apply_retention(time.time(), protect_from=protect, max_rows=cap)
        self.counters["retention_passes"] += 1
        return removed, cap

    async def stop(self) -> None:
        """Stop accepting, finish commits, close sessions with GOING_AWAY, close the log."""
        self.ready = False
        self.endpoint.accepting = False
        await self._finish_commits()
        for conn in list(self.endpoint.connections.values()):
            self.endpoint.close_connection(conn, ErrorCode.GOING_AWAY, "hub shutting down")
        self._flush()
        for task in self._tasks:
            task.cancel()
        await asyncio.sleep(0.05)
        self._flush()
        self.publish_presence(self.presence.take_changes())
        await self._finish_presence()
        if self.driver is not None:
            self.driver.close()
        if self.subs is not None:
            await self.subs.stop()
        if self.consumers is not None:
            await self.consumers.stop()
        if self._log is not None:
            self._log.close()
        if self.jslog is not None:
            await self.jslog.close()  # the presence bucket shares its connection

    async def _finish_commits(self) -> None:
        """Commit what is accepted (jetstream: wait for the group in flight, then the rest)."""
        for _ in range(2):
            task = self._commit_task
            if task is not None:
                await asyncio.wait([task])
            if len(self.group):
                self._commit()
        if self._commit_task is not None:
            await asyncio.wait([self._commit_task])

    async def _finish_presence(self) -> None:
        """Give the last presence changes a bounded time to reach the shared bucket."""
        if self.jspresence is None:
            return
        timeout = 2 * self.config.jetstream.publish_timeout_s
        end = asyncio.get_running_loop().time() + timeout
        while self._presence_backlog and asyncio.get_running_loop().time() < end:
            task = self._presence_task
            if task is None:
                self._queue_presence([])
                task = self._presence_task
                if task is None:
                    return
            await asyncio.wait([task], timeout=max(0.0, end - asyncio.get_running_loop().time()))
            if self._presence_task is None and self._presence_backlog:
                await asyncio.sleep(0.1)  # it failed: one more go within the bound
        if self._presence_backlog:
            log.warning("%d presence changes not shared at shutdown", len(self._presence_backlog))

    @property
    def presence_backlog(self) -> int:
        """Presence changes not yet shared (jetstream)."""
        return len(self._presence_backlog)

    def device_list(self) -> list[dict[str, Any]]:
        """Every known device, for the HTTP API."""
        now = time.time()
        return [info.as_json(now) for info in self.presence.devices.values()]


def _grow_recv_buffer(driver: UdpDriver, want: int) -> int:
    """Ask for a ``want``-byte UDP receive queue; returns what the kernel granted."""
    assert driver.transport is not None
    sock = driver.transport.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)
    got = int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))  # Linux: 2x, with overhead
    if got < want:
        log.warning("UDP receive buffer is %d bytes, not %d: raise net.core.rmem_max", got, want)
    return got


def _serial_keys(serial: int) -> set[str]:
    return {str(serial), format(serial, "x"), format(serial, "#x")}

"""The edge agent's asyncio shell: spool, one hub connection at a time, local inputs.

Policy lives in sans-I/O cores (``transport.session.EdgeSession``, ``edge.backoff``,
``edge.spool``); this module moves bytes and arms timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aioquic import tls

from edge.backoff import BackoffConfig, Reconnector
from edge.config import EdgeConfig, parse_hostport
from edge.spool import Spool
from transport import certs
from transport.aio import UdpDriver, open_driver
from transport.auth import decode_ticket, encode_ticket
from transport.errors import ErrorCode, SquallError
from transport.events import Acked, PeerError, Welcomed
from transport.quic import Connected, ConnectionLost, EdgeEndpoint, EdgeTls, edge_ack_delay
from transport.session import EdgeSession, SenderConfig
from transport.wire import LANES, Lane

log = logging.getLogger("squall.edge")

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_SUFFIX_TOKENS = 14


class PublishError(SquallError):
    """A record was refused before it reached the spool (bad subject, attrs or lane)."""


def check_suffix(suffix: str) -> None:
    """A subject suffix is dot-separated tokens of [A-Za-z0-9_-], no wildcards."""
    tokens = suffix.split(".")
    if not suffix or len(tokens) > MAX_SUFFIX_TOKENS or not all(_TOKEN.match(t) for t in tokens):
        raise PublishError(
            f"bad subject suffix {suffix[:80]!r}: dot-separated [A-Za-z0-9_-] tokens"
        )


@dataclass(slots=True)
class AgentStats:
    """Counters the agent exports (metrics and heartbeats)."""

    accepted: int = 0
    sent_batches: int = 0
    acked: int = 0
    reconnects: int = 0
    stateless_resets: int = 0  # sessions a restarted hub ended (it no longer knew them)
    sessions: int = 0
    early_data_sessions: int = 0
    refused: int = 0
    retransmitted: int = 0
    held_small: int = 0  # small batches that waited for an ACK (sender.small_batches_in_flight)


class Agent:
    """One device: ``await agent.publish(...)`` returns once the record is in the spool."""

    def __init__(self, config: EdgeConfig, *, seed: int | None = None) -> None:
        self.config = config
        cert = certs.load_cert(config.device.cert)
        self.tls = EdgeTls(
            certs.load_certs(config.device.ca),
            cert,
            certs.load_key(config.device.key),
            config.server_name,
        )
        self.tenant, self.device = _identity(cert)
        self.prefix = f"{self.tenant}.{self.device}"
        self.stats = AgentStats()
        self.spool = Spool(
            config.spool.path,
            max_bytes=config.spool.max_bytes,
            durability=config.spool.durability,
            group_commit_ms=config.spool.group_commit_ms,
            now=time.monotonic(),
        )
        b = config.backoff
        self.hub_order = config.hub_order(self.device)
        self.reconnector = Reconnector(
            self.hub_order,
            random.Random(seed),
            BackoffConfig(base_s=b.base_s, cap_s=b.cap_s, failover_after=b.failover_after),
        )
        self._ticket_path = Path(config.ticket_path or f"{config.spool.path}.ticket")
        self.endpoint: EdgeEndpoint | None = None
        self._driver: UdpDriver | None = None
        self._commit_waiters: list[asyncio.Future[None]] = []
        self._commit_handle: asyncio.TimerHandle | None = None
        self._commit_at = 0.0
        self._run_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._lost: asyncio.Event | None = None
        self.connected = asyncio.Event()

    # -- publishing ----------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        body: Any,
        attrs: dict[str, Any] | None = None,
        lane: str | Lane = "telemetry",
    ) -> int:
        """Accept one record into the spool; returns its seq once durable per config."""
        seq = self.publish_nowait(subject, body, attrs, lane)
        if self.config.spool.durability == "batch":
            fut = asyncio.get_running_loop().create_future()
            self._commit_waiters.append(fut)
            self._schedule_commit()
            await fut
        return seq

    def publish_nowait(
        self,
        subject: str,
        body: Any,
        attrs: dict[str, Any] | None = None,
        lane: str | Lane = "telemetry",
    ) -> int:
        """Stage a record (accepted at the next group commit, or now with ``always``)."""
        check_suffix(subject)
        lane_v = lane if isinstance(lane, Lane) else _lane(lane)
        ts = int(time.time() * 1e6)  # the record's device clock
        seq = self.spool.append(
            lane_v, f"{self.prefix}.{subject}", body, dict(attrs or {}), ts, self._now()
        )
        self.stats.accepted += 1
        if self.config.spool.durability == "batch":
            self._schedule_commit()
        else:
            self._after_commit()
        return seq

    def _schedule_commit(self) -> None:
        """Arm the one commit timer: the group commit, or the spool's own sync/ack deadline."""
        if self._stopping:  # stop() makes the last commit itself; the spool is closing
            return
        loop = asyncio.get_running_loop()
        at = self.spool.next_commit_at()
        if self._commit_waiters:
            group = self._now() + self.config.spool.group_commit_ms / 1000
            at = group if at is None else min(at, group)
        if at is None or (self._commit_handle is not None and self._commit_at <= at):
            return
        if self._commit_handle is not None:
            self._commit_handle.cancel()
        self._commit_at = at
        self._commit_handle = loop.call_at(at, self._group_commit)

    def _group_commit(self) -> None:
        self._commit_handle = None
        self.spool.commit(self._now())
        waiters, self._commit_waiters = self._commit_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        self._after_commit()
        self._schedule_commit()

    def _after_commit(self) -> None:
        endpoint, driver = self.endpoint, self._driver
        if endpoint is None or driver is None or endpoint.closed:
            return
        if endpoint.poll(self._now()):  # not when the records only joined a lingering batch
            driver.flush()

    # -- connection loop -----------------------------------------------------------

    def start(self) -> None:
        """Start the connection loop in the background."""
        self._run_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stopping:
            host, port = parse_hostport(self.reconnector.current)
            lost = await self._session(host, port)
            if self._stopping:
                break
            self.stats.reconnects += 1
            retry_s = lost.retry_after_ms / 1000 if lost else 0.0
            draining = lost is not None and lost.code == ErrorCode.GOING_AWAY
            if retry_s > 0 or draining:
                log.info("hub %s sent us on: %s", self.reconnector.current, lost)
            at = self.reconnector.on_failure(time.monotonic(), retry_s, draining=draining)
            await asyncio.sleep(max(0.0, at - time.monotonic()))

    async def _session(self, host: str, port: int) -> ConnectionLost | None:
        loop = asyncio.get_running_loop()
        s = self.config.sender
        cfg = SenderConfig(
            batch_max_records=s.batch_max_records,
            linger_s=s.linger_ms / 1000,
            window_records=s.window_records,
            small_batches_in_flight=s.small_batches_in_flight,
            heartbeat_s=s.heartbeat_s,
        )
        session = EdgeSession(
            self.spool, self.spool.incarnation, loop.time(), cfg, self._heartbeat_stats
        )
        ticket = self._load_ticket()
        try:
            addr = await _resolve(host, port)
        except OSError as exc:
            log.warning("cannot resolve hub %s: %s", host, exc)
            return None
        endpoint = EdgeEndpoint(
            self.tls,
            session,
            addr,
            loop.time(),
            ticket,
            self._save_ticket,
            s.idle_timeout_s,
            edge_ack_delay(s.linger_ms / 1000),
        )
        self._lost = asyncio.Event()
        lost_box: list[ConnectionLost] = []
        self.endpoint = endpoint
        self.stats.sessions += 1

        def after() -> None:
            self._on_events(endpoint, lost_box)
            session_protect(self.spool, session)
            self._schedule_commit()  # acks trim the spool; their deletes ride the next commit

        local = ("::", 0) if ":" in addr[0] else ("0.0.0.0", 0)
        self._driver = await open_driver(endpoint, local, after)
        self._driver.flush()
        try:
            await self._lost.wait()
        finally:
            self.stats.retransmitted += session.retransmitted
            self.stats.held_small += session.held_small
            self._driver.close()
            self.connected.clear()
            self.endpoint = None
        return lost_box[0] if lost_box else None

    def _on_events(self, endpoint: EdgeEndpoint, lost_box: list[ConnectionLost]) -> None:
        while (ev := endpoint.next_event()) is not None:
            if isinstance(ev, Connected):
                self.stats.early_data_sessions += int(ev.early_data)
            elif isinstance(ev, Welcomed):
                self.reconnector.on_connected()
                self.connected.set()
            elif isinstance(ev, Acked):
                self.stats.acked += ev.records
            elif isinstance(ev, PeerError):
                log.warning("hub error %s: %s", ev.code.name, ev.reason)
            elif isinstance(ev, ConnectionLost):
                if ev.code >= 0x100 and not ev.handshake_done:
                    self._ticket_path.unlink(missing_ok=True)  # refused: start afresh
                if endpoint.reset_by_hub:
                    self.stats.stateless_resets += 1
                    log.info("hub %s: %s", self.reconnector.current, ev.reason)
                lost_box.append(ev)
                if self._lost is not None:
                    self._lost.set()

    def _heartbeat_stats(self) -> dict[str, Any]:
        now = self._now()
        depth = self.spool.depth()
        ages = self.spool.oldest_unsent_age(now)
        stats: dict[str, Any] = {
            "d": {str(int(k)): [v[0], v[1]] for k, v in depth.items()},
            "age": {str(int(k)): round(v, 1) for k, v in ages.items() if v is not None},
            "seq": self.spool.last_seq,
            "drop": self.spool.drop_totals(),  # totals: a lost heartbeat loses no count
            "rtt_ms": round(self.endpoint.rtt() * 1000, 1) if self.endpoint else None,
            "loss": round(self.endpoint.loss_estimate(), 3) if self.endpoint else None,
            "rc": self.stats.reconnects,
        }
        return stats

    def _load_ticket(self) -> tls.SessionTicket | None:
        try:
            return decode_ticket(self._ticket_path.read_bytes())
        except OSError:
            return None

    def _save_ticket(self, ticket: tls.SessionTicket) -> None:
        tmp = self._ticket_path.with_suffix(".tmp")
        try:
            tmp.write_bytes(encode_ticket(ticket))
            tmp.chmod(0o600)
            tmp.replace(self._ticket_path)
        except OSError as exc:
            log.warning("cannot save session ticket: %s", exc)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def stop(self) -> None:
        """Clean shutdown: commit what was accepted, say GOING_AWAY, close the spool."""
        self._stopping = True
        if self._commit_handle is not None:
            self._commit_handle.cancel()
            self._group_commit()
        if self.endpoint is not None and self._driver is not None:
            self.endpoint.close(ErrorCode.GOING_AWAY, "agent shutting down")
            self._driver.flush()
        if self._lost is not None:
            self._lost.set()
        if self._run_task is not None:
            self._run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._run_task
        self.spool.close(self._now())


def session_protect(spool: Spool, session: EdgeSession) -> None:
    """Records on the wire must not be evicted from under the sender."""
    for lane in LANES:
        mark = session.inflight_mark(lane)
        if mark:
            spool.protect(lane, mark)


def _lane(name: str) -> Lane:
    try:
        return Lane.parse(name)
    except ValueError as exc:
        raise PublishError(str(exc)) from None


def _identity(cert: Any) -> tuple[str, str]:
    from cryptography.x509.oid import NameOID

    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if not cn or not org:
        raise PublishError("device certificate lacks CN (device) or O (tenant)")
    return str(org[0].value), str(cn[0].value)


async def _resolve(host: str, port: int) -> tuple[str, int]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=2)  # SOCK_DGRAM
    addr = infos[0][4]
    return str(addr[0]), int(addr[1])

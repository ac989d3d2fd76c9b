"""A virtual-time hub: the real QUIC endpoint, hub sessions, dedup ledgers, group commit,
SQLite log and presence of ``hub.server.Hub``, pumped by the simulator's clock.

It owns no socket and no timer: the runner feeds it datagrams with ``receive``, runs
``handle_timer`` at ``get_timer()``, and carries ``datagrams`` through the virtual
network.  Wall-clock fields (received-at, presence times, log commit times) read the
virtual epoch plus simulated time, so the log is the same on every run of a seed.

A crash (``crash``) drops memory state -- sessions, tickets, ledgers, presence and the
batches accepted but not yet group-committed -- and the next ``VirtualHub`` on the same
file reopens the log and reloads its dedup marks, as a restarted process does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from hub.config import DeviceLimits, LogSettings, PresenceSettings, ServerLimits
from hub.consumer import LogCursor
from hub.ingest import Accepted, GroupCommit, LedgerBook, endpoint_limits, make_session
from hub.log import Log, LogEntry, LogError, PendingBatch
from hub.presence import Presence
from simulator.vclock import wall_s
from simulator.vnet import Address
from transport.auth import TicketStore
from transport.certs import DeviceIdentity
from transport.errors import ErrorCode
from transport.events import (
    BatchAccepted,
    DuplicatesSkipped,
    HeartbeatReceived,
    SessionClosed,
    SessionEvent,
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

CONSUMER_NAME = "virtual-check"  # the durable consumer that checks delivery
PRESENCE_TICK_S = 1.0  # as the asyncio hub: presence is re-evaluated once a second


@dataclass(slots=True)
class HubSettings:
    """The hub YAML's sections that matter without sockets (the log lives in the work dir)."""

    limits: DeviceLimits = field(default_factory=DeviceLimits)
    server: ServerLimits = field(default_factory=ServerLimits)
    log: LogSettings = field(default_factory=LogSettings)
    presence: PresenceSettings = field(default_factory=PresenceSettings)


class VirtualHub:
    """One hub process in virtual time (see the module docstring)."""

    def __init__(
        self,
        credentials: HubTls,
        log_path: Path,
        settings: HubSettings,
        clock: Callable[[], datetime],
        now: float,
    ) -> None:
        c = settings
        self.settings = settings
        self.log = Log(log_path, synchronous=c.log.synchronous)
        self.ledgers = LedgerBook(self.log.load_ledgers(), load=self.log.load_ledger)
        self.presence = Presence(
            c.presence.stale_after_s, c.presence.offline_after_s, c.presence.max_devices
        )
        self.group: GroupCommit[HubConnection] = GroupCommit(
            c.log.group_commit_ms / 1000, c.log.group_commit_records
        )
        limits = endpoint_limits(c.server, c.limits)
        self.endpoint = HubEndpoint(
            credentials,
            self._make_session,
            _authorize,
            limits,
            clock=clock,
            tickets=TicketStore(c.server.max_tickets),
        )
        self.counters: Counter[str] = Counter()
        self._live: dict[tuple[str, str], HubConnection] = {}  # each device's newest session
        self._tick_at = now + PRESENCE_TICK_S

    # -- the shell's pump ------------------------------------------------------------

    def receive(self, data: bytes, addr: Address, now: float) -> None:
        """A datagram from ``addr``."""
        self.endpoint.receive_datagram(data, addr, now)
        self._after(now)

    def get_timer(self) -> float | None:
        """The one deadline: a connection's, the open group's, or the presence tick."""
        times = [self.endpoint.get_timer(), self.group.deadline(), self._tick_at]
        return min(t for t in times if t is not None)

    def handle_timer(self, now: float) -> None:
        """Run what is due at ``now``."""
        t = self.endpoint.get_timer()
        if t is not None and now >= t:
            self.endpoint.handle_timer(now)
        if now >= self._tick_at:
            self._tick_at = now + PRESENCE_TICK_S
            self.presence.tick(wall_s(now))
            self._publish_presence()
        self._after(now)

    def datagrams(self, now: float) -> list[tuple[bytes, Address]]:
        """Datagrams to send now, connection by connection in the order they were touched."""
        return self.endpoint.datagrams_to_send(now)  # insertion-ordered: the same every run

    # -- events ------------------------------------------------------------------------

    def _after(self, now: float) -> None:
        wall = wall_s(now)
        while (ev := self.endpoint.next_event()) is not None:
            if isinstance(ev, DeviceEvent):
                self._on_session_event(ev.conn, ev.event, now, wall)
            elif isinstance(ev, DeviceConnected):
                self._on_connected(ev.conn, wall)
            elif isinstance(ev, DeviceDisconnected):
                self._on_disconnected(ev.conn, wall)
        if self.group.due(now):
            self._commit(now)

    def _on_connected(self, conn: HubConnection, wall: float) -> None:
        ident = conn.identity
        assert ident is not None
        self.counters["sessions"] += 1
        self._live[(ident.tenant, ident.device)] = conn
        addr = conn.peer_addr
        self.presence.connected(ident.tenant, ident.device, f"{addr[0]}:{addr[1]}", wall)

    def _on_disconnected(self, conn: HubConnection, wall: float) -> None:
        ident = conn.identity
        if ident is not None and self._live.get((ident.tenant, ident.device)) is conn:
            del self._live[(ident.tenant, ident.device)]
        if ident is not None and conn.handshake_done:
            self.presence.disconnected(ident.tenant, ident.device, wall)

    def _on_session_event(
        self, conn: HubConnection, ev: SessionEvent, now: float, wall: float
    ) -> None:
        session = conn.session
        assert session is not None and conn.identity is not None
        tenant, device = conn.identity.tenant, conn.identity.device
        if isinstance(ev, BatchAccepted):
            assert session.ledger is not None
            self.group.add(Accepted(conn, tenant, device, session.ledger, ev, wall), now)
            self.counters["records_in"] += ev.count
            self.presence.heard(tenant, device, wall, ev.last_seq, ev.count)
        elif isinstance(ev, HeartbeatReceived):
            self.counters["heartbeats"] += 1
            self.presence.heartbeat(tenant, device, ev.stats, wall)
        elif isinstance(ev, DuplicatesSkipped):
            self.counters["duplicates_skipped"] += ev.count
        elif isinstance(ev, SessionClosed) and ev.code is not ErrorCode.NO_ERROR:
            self.counters[f"closed_{ev.code.name.lower()}"] += 1

    def _make_session(self, conn: HubConnection, now: float) -> HubSession:
        return make_session(conn, now, self.ledgers, self.settings.limits)

    # -- group commit ------------------------------------------------------------------

    def _commit(self, now: float) -> None:
        items = self.group.take()
        pending = [
            PendingBatch.from_accepted(it.tenant, it.device, it.batch, round(it.received_at * 1e6))
            for it in items
        ]
        try:
            self.log.append_group(pending, wall_s(now))
        except LogError:
            self.counters["commit_failures"] += 1
            for conn in GroupCommit.failed(items):  # in item order
                if conn.session is not None:
                    conn.session.on_commit_failed("log write failed")
                    self.endpoint.touch(conn, now)
            return
        self.counters["commits"] += 1
        self.counters["records_committed"] += sum(p.count for p in pending)
        for conn in GroupCommit.committed(items, self._live):  # in item order
            if conn.session is not None:
                conn.session.on_committed(now)
                self.endpoint.touch(conn, now)

    def _publish_presence(self) -> None:
        for ch in self.presence.take_changes():
            body = {"state": ch.new.value, "previous": ch.old.value}
            subject = f"{ch.tenant}.{ch.device}.presence"
            try:
                self.log.append_local(ch.tenant, ch.device, subject, body, {}, ch.at)
            except LogError:
                self.counters["commit_failures"] += 1
            else:
                self.counters["presence_records"] += 1

    # -- consumers and lifecycle -----------------------------------------------------

    def poll_consumer(self, sink: Callable[[LogEntry], None], batch: int = 10_000) -> int:
        """Hand every log entry past the checker's committed offset to ``sink``; commit."""
        cursor = LogCursor(self.log, CONSUMER_NAME)
        after = cursor.committed
        total = 0
        while True:
            entries, last = cursor.read(after, batch)
            if last == after:
                return total
            for entry in entries:
                sink(entry)
            cursor.commit(last)
            total += len(entries)
            after = last

    def crash(self) -> tuple[int, int]:
        """Kill the process; returns the (batches, records) accepted but never committed."""
        items = self.group.take()
        self.log.close()  # the committed data is in the WAL either way; nothing more is written
        return len(items), sum(it.batch.count for it in items)

    def commit_open_group(self, now: float) -> None:
        """Commit what sessions handed over without waiting for the group's deadline."""
        if len(self.group):
            self._commit(now)

    def close(self, now: float) -> None:
        """Clean stop: commit the open group, close the log."""
        self.commit_open_group(now)
        self.log.close()

    def totals(self) -> Counter[str]:
        """This process's counters with the endpoint's (handshakes, refusals, junk)."""
        out = Counter(self.counters)
        out.update({k: v for k, v in self.endpoint.counters.items() if v})
        return out


def _authorize(identity: DeviceIdentity) -> None:
    """Every device with a valid certificate may connect (no deny list in the simulator)."""

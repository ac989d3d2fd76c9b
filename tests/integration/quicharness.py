"""Loopback helpers: a hub endpoint that commits in memory and edge endpoints over real UDP."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from aioquic import tls

from transport import certs
from transport.aio import UdpDriver, open_driver
from transport.batchcodec import Record
from transport.certs import DeviceIdentity
from transport.errors import AuthError
from transport.events import BatchAccepted
from transport.memoutbox import MemoryOutbox
from transport.quic import (
    ConnectionLost,
    DeviceEvent,
    EdgeEndpoint,
    EdgeTls,
    HubConnection,
    HubEndpoint,
    HubTls,
)
from transport.session import DeviceLedger, EdgeSession, HubSession, SenderConfig


@dataclass
class MemoryHub:
    """A hub endpoint on 127.0.0.1 whose 'log' is a list; commits at once."""

    endpoint: HubEndpoint
    driver: UdpDriver | None = None
    ledgers: dict[tuple[str, str, int], DeviceLedger] = field(default_factory=dict)
    log: list[tuple[str, str, int, str]] = field(default_factory=list)  # tenant, device, seq, subj
    denied: set[str] = field(default_factory=set)
    sessions: list[HubConnection] = field(default_factory=list)

    @property
    def addr(self) -> tuple[str, int]:
        assert self.driver is not None and self.driver.transport is not None
        host, port = self.driver.transport.get_extra_info("sockname")[:2]
        return host, port

    def make_session(self, conn: HubConnection, now: float) -> HubSession:
        ident = conn.identity
        assert ident is not None
        self.sessions.append(conn)

        def ledger(inc: int) -> DeviceLedger:
            return self.ledgers.setdefault((ident.tenant, ident.device, inc), DeviceLedger(inc))

        return HubSession(ident.tenant, ident.device, ledger, now)

    def authorize(self, ident: DeviceIdentity) -> None:
        if ident.device in self.denied:
            raise AuthError(f"device {ident.device} is revoked")

    def after(self) -> None:
        loop_now = asyncio.get_running_loop().time()
        while (ev := self.endpoint.next_event()) is not None:
            if isinstance(ev, DeviceEvent) and isinstance(ev.event, BatchAccepted):
                b = ev.event
                session = ev.conn.session
                assert session is not None and session.ledger is not None
                for r in b.decoded():
                    self.log.append((session.tenant, session.device, r.seq, r.subject))
                session.ledger.lanes[b.lane].committed = b.last_seq
                session.on_committed(loop_now)
                self.endpoint.touch(ev.conn, loop_now)


async def start_hub(ca_dir: Path) -> MemoryHub:
    ca = certs.load_cert(ca_dir / "ca.pem")
    hub_tls = HubTls(certs.load_cert(ca_dir / "hub.pem"), certs.load_key(ca_dir / "hub.key"), [ca])
    box: dict[str, MemoryHub] = {}
    endpoint = HubEndpoint(
        hub_tls,
        lambda conn, now: box["h"].make_session(conn, now),
        lambda ident: box["h"].authorize(ident),
    )
    hub = MemoryHub(endpoint)
    box["h"] = hub
    hub.driver = await open_driver(endpoint, ("127.0.0.1", 0), hub.after)
    return hub


@dataclass
class Edge:
    """One edge connection with an in-memory outbox."""

    endpoint: EdgeEndpoint
    driver: UdpDriver
    outbox: MemoryOutbox
    events: list[object] = field(default_factory=list)
    tickets: list[tls.SessionTicket] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)

    def collect(self) -> None:
        while (ev := self.endpoint.next_event()) is not None:
            self.events.append(ev)

    def lost(self) -> ConnectionLost | None:
        return next((e for e in self.events if isinstance(e, ConnectionLost)), None)


def edge_tls(ca_dir: Path, tenant: str, device: str, *, key: bool = True) -> EdgeTls:
    cert_path, key_path = certs.issue_device(ca_dir, tenant, device)
    return EdgeTls(
        [certs.load_cert(ca_dir / "ca.pem")],
        certs.load_cert(cert_path),
        certs.load_key(key_path) if key else None,
    )


async def connect_edge(
    hub_addr: tuple[str, int],
    files: EdgeTls,
    outbox: MemoryOutbox | None = None,
    ticket: tls.SessionTicket | None = None,
    incarnation: int = 1,
    record: bool = False,
) -> Edge:
    loop = asyncio.get_running_loop()
    outbox = outbox or MemoryOutbox()
    session = EdgeSession(outbox, incarnation, loop.time(), SenderConfig(linger_s=0.0))
    tickets: list[tls.SessionTicket] = []
    endpoint = EdgeEndpoint(files, session, hub_addr, loop.time(), ticket, tickets.append)
    edge_box: dict[str, Edge] = {}

    def after() -> None:
        edge_box["e"].collect()

    driver = await open_driver(endpoint, ("127.0.0.1", 0), after)
    edge = Edge(endpoint, driver, outbox, tickets=tickets)
    edge_box["e"] = edge
    if record:
        transport = driver.transport
        assert transport is not None
        real = transport.sendto

        def sendto(data: bytes, addr: object = None) -> None:
            edge.sent.append(data)
            real(data, addr)

        transport.sendto = sendto  # type: ignore[method-assign]
    driver.flush()
    return edge


def add_records(outbox: MemoryOutbox, lane: int, first: int, n: int, prefix: str) -> None:
    for seq in range(first, first + n):
        outbox.add(lane, Record(seq, seq * 1000, f"{prefix}.telemetry.gps", {}, {"n": seq}), 0.0)


async def wait_for(cond: object, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)

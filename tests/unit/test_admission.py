"""Devices the hub turns away for want of a handshake slot come back paced, not in rounds
(transport/admission.py): the pacer alone, then a real HubEndpoint answering real edges'
Initials in memory, the hints read back the way an edge reads them."""

from __future__ import annotations

from typing import Any

import pytest

import transport.quic as tq
from transport import certs
from transport.admission import HandshakePacer
from transport.memoutbox import MemoryOutbox
from transport.quic import (
    Address,
    ConnectionLost,
    EdgeEndpoint,
    EdgeTls,
    HubConnection,
    HubEndpoint,
    HubLimits,
    HubTls,
)
from transport.session import DeviceLedger, EdgeSession, HubSession, SenderConfig

HUB: Address = ("10.0.0.1", 4433)

# -- the pacer ---------------------------------------------------------------------------


def test_a_storm_is_told_to_come_back_one_slot_interval_apart() -> None:
    # nothing finished yet: 1 s assumed per handshake, so 10 slots free one per 0.1 s
    pacer = HandshakePacer(10, 5.0)
    assert [pacer.hint(100.0) for _ in range(4)] == pytest.approx([0.05, 0.15, 0.25, 0.35])


def test_the_spacing_follows_how_long_handshakes_take() -> None:
    pacer = HandshakePacer(200, 5.0, window_s=5.0)
    for i in range(50):  # they took 0.5 s each: 200 slots take 400/s
        pacer.completed(100.0 + i * 0.01, 0.5)
    assert pacer.rate(101.0) == pytest.approx(400.0)
    assert [pacer.hint(101.0) for _ in range(3)] == pytest.approx([0.05, 0.0525, 0.055])
    for i in range(50):  # the hub got slower: 2 s each now, over the same window
        pacer.completed(102.0 + i * 0.01, 3.5)
    assert pacer.rate(103.0) == pytest.approx(100.0)
    assert pacer.rate(200.0) == pytest.approx(200.0)  # the window passed: 1 s assumed again


def test_past_the_longest_hint_devices_get_it_without_a_place() -> None:
    pacer = HandshakePacer(20, 0.2)  # 20/s assumed
    hints = [pacer.hint(100.0) for _ in range(6)]
    assert hints == pytest.approx([0.05, 0.10, 0.15, 0.20, 0.2, 0.2])
    # the places handed out are still taken: time passes, the queue moves on
    assert pacer.hint(100.1) == pytest.approx(0.15)  # after the place at 100.2
    assert pacer.hint(101.0) == pytest.approx(0.05)  # all passed: from now again


@pytest.mark.parametrize(
    "args",
    [(0, 1.0, {}), (10, 0.0, {}), (10, 1.0, {"assumed_s": 0.0}), (10, 1.0, {"min_s": 2.0})],
)
def test_impossible_bounds_are_refused(args: tuple[int, float, dict[str, Any]]) -> None:
    slots, max_s, kwargs = args
    with pytest.raises(ValueError):
        HandshakePacer(slots, max_s, **kwargs)


# -- a real hub endpoint -----------------------------------------------------------------


class Rig:
    """A HubEndpoint and edges that only ever send their first flight (nobody finishes)."""

    def __init__(self, **limits: Any) -> None:
        self.now = 1000.0
        self.ca, self.ca_key = certs.make_ca("test CA")
        hub_cert, hub_key = certs.make_hub_cert(self.ca, self.ca_key, ["localhost"])
        self.hub = HubEndpoint(
            HubTls(hub_cert, hub_key, [self.ca]), _session, _allow, HubLimits(**limits)
        )
        self.edges: list[tuple[EdgeEndpoint, Address]] = []

    def edge(self) -> tuple[EdgeEndpoint, Address]:
        n = len(self.edges)
        cert, key = certs.make_device_cert(self.ca, self.ca_key, "acme", f"truck-{n}")
        session = EdgeSession(MemoryOutbox(), 1, self.now, SenderConfig(), stats=lambda: {})
        edge = EdgeEndpoint(EdgeTls([self.ca], cert, key), session, HUB, self.now)
        self.edges.append((edge, (f"10.1.{n // 250}.{n % 250 + 1}", 5000)))
        return self.edges[-1]

    def knock(self, edge: EdgeEndpoint, addr: Address, *, again: bool = False) -> int | None:
        """The edge's first flight (or its retransmission) reaches the hub; returns the
        retry-after the edge hears back, None if it was let in."""
        sent = edge.datagrams_to_send(self.now)
        if again:
            sent = self._first_flight[addr]
        self._first_flight[addr] = sent
        for data, _ in sent:
            self.hub.receive_datagram(data, addr, self.now)
        for data, to in self.hub.datagrams_to_send(self.now):
            if to == addr:
                edge.receive_datagram(data, HUB, self.now)
        for _ in range(3):  # a close is reported once its draining period is over
            while (ev := edge.next_event()) is not None:
                if isinstance(ev, ConnectionLost):
                    return ev.retry_after_ms
            t = edge.get_timer()
            if t is None or t > self.now + 5.0:
                break
            edge.handle_timer(t)  # the edge's own clock; the hub's stays put
        return None

    def finish(self, edge: EdgeEndpoint, addr: Address) -> None:
        """Carry the handshake on both ways until the hub has finished it."""
        for _ in range(4):
            for data, to in self.hub.datagrams_to_send(self.now):
                if to == addr:
                    edge.receive_datagram(data, HUB, self.now)
            for data, _ in edge.datagrams_to_send(self.now):
                self.hub.receive_datagram(data, addr, self.now)

    @property
    def _first_flight(self) -> dict[Address, list[tuple[bytes, Address]]]:
        return self.__dict__.setdefault("_flights", {})


def _session(conn: HubConnection, now: float) -> HubSession:
    assert conn.identity is not None
    return HubSession(conn.identity.tenant, conn.identity.device, DeviceLedger, now)


def _allow(identity: Any) -> bool:
    return True


def test_the_hub_spaces_the_returns_of_devices_it_turns_away(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reasons: list[str] = []
    close = tq._initial_close

    def recording(header: Any, reason: str) -> bytes:
        reasons.append(reason)
        return close(header, reason)

    monkeypatch.setattr(tq, "_initial_close", recording)
    rig = Rig(max_handshakes=2, busy_retry_after_ms=5000)
    let_in = [rig.knock(*rig.edge()) for _ in range(2)]
    assert let_in == [None, None]  # two slots, two handshakes in progress
    turned_away = [rig.knock(*rig.edge()) for _ in range(4)]
    # none finished yet: 1 s assumed per handshake, so two slots free one per 0.5 s
    assert turned_away == [50, 550, 1050, 1550]
    assert rig.hub.counters["busy_refused"] == 4
    # a refused device's retransmitted Initial is refused with the hint it was given, and
    # takes no place in the queue of returns
    edge, addr = rig.edges[3]
    rig.knock(edge, addr, again=True)  # (the edge itself has gone: nothing to hear)
    assert rig.hub.counters["busy_refused"] == 5 and rig.hub.handshaking == 2
    assert reasons[-1] == "busy; retry-after-ms=550"
    assert rig.knock(*rig.edge()) == 2050
    rig.now += 10.0  # the places are in the past: a newcomer is first again
    assert rig.knock(*rig.edge()) == 50
    hints = (50, 550, 1050, 1550, 550, 2050, 50)
    assert reasons == [f"busy; retry-after-ms={ms}" for ms in hints]


def test_a_full_hub_or_a_draining_one_gives_the_configured_retry_after() -> None:
    rig = Rig(max_connections=1, max_handshakes=5, busy_retry_after_ms=3000)
    assert rig.knock(*rig.edge()) is None
    assert rig.knock(*rig.edge()) == 3000  # no connection to be had soon: not paced
    rig.hub.accepting = False
    assert rig.knock(*rig.edge()) == 3000


def test_the_hub_paces_by_how_long_its_handshakes_took() -> None:
    rig = Rig(max_handshakes=1, busy_retry_after_ms=5000)
    edge, addr = rig.edge()
    assert rig.knock(edge, addr) is None
    rig.now += 0.2
    rig.finish(edge, addr)  # it took 0.2 s: one slot takes 5 handshakes a second
    assert rig.hub.counters["handshakes"] == 1 and rig.hub.handshaking == 0
    assert rig.knock(*rig.edge()) is None  # the free slot
    assert [rig.knock(*rig.edge()) for _ in range(3)] == [50, 250, 450]

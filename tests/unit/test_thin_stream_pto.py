"""Probe timeouts on the edge's thin stream: the first LINEAR_PTOS keep the base period,
then it doubles up to MAX_PTO_BACKOFF times and at least MIN_CAPPED_PTO_S
(transport/quic.py); the hub keeps aioquic's doubling.

A real edge and hub endpoint finish their handshake through an in-memory link with a
manual clock; then one direction goes dark and the intervals between the sender's
probe timeouts are read off its loss-detection timer.  aioquic alone doubles every one
of them (1, 2, 4, 8, ...), which these tests would catch.
"""

from __future__ import annotations

from typing import Any

from aioquic.quic.recovery import QuicPacketRecovery

import transport.quic as tq
from transport import certs
from transport.batchcodec import Record
from transport.events import BatchAccepted
from transport.memoutbox import MemoryOutbox
from transport.quic import (
    Address,
    DeviceEvent,
    EdgeEndpoint,
    EdgeTls,
    HubConnection,
    HubEndpoint,
    HubTls,
)
from transport.session import DeviceLedger, EdgeSession, HubSession, SenderConfig
from transport.wire import Lane

HUB: Address = ("10.0.0.1", 4433)
EDGE: Address = ("10.1.0.1", 5000)
LANE = int(Lane.TELEMETRY)
DELAY = 0.02  # one way


class Pair:
    """One edge and one hub joined by a lossless link; either direction can go dark."""

    def __init__(
        self, sender: SenderConfig | None = None, ack_delay: float = 0.001, delay: float = DELAY
    ) -> None:
        self.now = 1000.0
        self.delay = delay  # one way
        ca, ca_key = certs.make_ca("test CA")
        hub_cert, hub_key = certs.make_hub_cert(ca, ca_key, ["localhost"])
        self.ledgers: dict[int, DeviceLedger] = {}
        self.ca, self.ca_key = ca, ca_key
        self.hub_tls = HubTls(hub_cert, hub_key, [ca])
        self.hub = HubEndpoint(self.hub_tls, self._session, _allow)
        cert, key = certs.make_device_cert(ca, ca_key, "acme", "truck-1")
        self.outbox = MemoryOutbox()
        self.seq = 0
        session = EdgeSession(
            self.outbox,
            1,
            self.now,
            sender or SenderConfig(linger_s=0.0),
            stats=lambda: {"sd": 0},
        )
        tls_files = EdgeTls([ca], cert, key)
        self.edge = EdgeEndpoint(tls_files, session, HUB, self.now, ack_delay=ack_delay)
        self.edge_addr = EDGE  # where the hub sees the edge's datagrams come from
        self.up_dark = False
        self.down_dark = False
        self._wire: list[tuple[float, bool, bytes]] = []  # (arrival, to_hub, data)

    def _session(self, conn: HubConnection, now: float) -> HubSession:
        assert conn.identity is not None

        def ledger(inc: int) -> DeviceLedger:
            return self.ledgers.setdefault(inc, DeviceLedger(inc))

        return HubSession(conn.identity.tenant, conn.identity.device, ledger, now)

    def publish(self, n: int = 1) -> None:
        for _ in range(n):
            self.seq += 1
            rec = Record(self.seq, self.seq, "acme.truck-1.t", {}, {"n": self.seq})
            self.outbox.add(LANE, rec, self.now)
        self.edge.poll(self.now)

    def _collect(self) -> None:
        while (ev := self.hub.next_event()) is not None:  # the hub shell's commit, at once
            if isinstance(ev, DeviceEvent) and isinstance(ev.event, BatchAccepted):
                session = ev.conn.session
                assert session is not None and session.ledger is not None
                session.ledger.lanes[ev.event.lane].committed = ev.event.last_seq
                session.on_committed(self.now)
                self.hub.touch(ev.conn, self.now)
        while self.edge.next_event() is not None:
            pass
        for data, _ in self.edge.datagrams_to_send(self.now):
            if not self.up_dark:
                self._wire.append((self.now + self.delay, True, data))
        for data, _ in self.hub.datagrams_to_send(self.now):
            if not self.down_dark:
                self._wire.append((self.now + self.delay, False, data))

    def run(self, until: float) -> None:
        """Deliver, fire timers and send, in time order, up to ``until``."""
        self._collect()
        while True:
            timers = [t for t in (self.edge.get_timer(), self.hub.get_timer()) if t is not None]
            arrivals = [a for a, _, _ in self._wire]
            at = min(timers + arrivals, default=until + 1)  # nothing pending: done
            if at > until:
                self.now = until
                return
            self.now = max(self.now, at)
            due = [w for w in self._wire if w[0] <= self.now]
            self._wire = [w for w in self._wire if w[0] > self.now]
            for _, to_hub, data in due:
                if to_hub:
                    self.hub.receive_datagram(data, self.edge_addr, self.now)
                else:
                    self.edge.receive_datagram(data, HUB, self.now)
            for ep in (self.edge, self.hub):
                t = ep.get_timer()
                if t is not None and t <= self.now:
                    ep.handle_timer(self.now)
            self._collect()


def _allow(identity: Any) -> bool:
    return True


def _probe_intervals(pair: Pair, quic: Any, count: int) -> list[float]:
    """Fire ``quic``'s probe timeouts one by one (the link stays dark): the gaps between."""
    loss = quic._loss
    gaps: list[float] = []
    pair.run(pair.now)  # what is written goes out (into the dark)
    for n in range(count):
        assert loss._pto_count == n
        at = loss.get_loss_detection_time(amplification_limited=False)
        assert at is not None and at > pair.now
        gaps.append(at - loss._time_of_last_sent_ack_eliciting_packet)
        pair.run(at)  # the timer fires, the probe goes out into the dark
    return gaps


def _assert_thin_stream_pace(gaps: list[float]) -> None:
    """Base period four times, then doubling, then flat at the cap (aioquic: 1, 2, 4, ...)."""
    base = gaps[0]
    want = [tq.pto_backoff(n, base) for n in range(len(gaps))]
    assert [round(g / base, 2) for g in gaps] == [float(m) for m in want]
    assert want[:5] == [1, 1, 1, 1, 2] and want[-1] == want[-2]  # it reached its cap
    assert gaps[-1] >= tq.MIN_CAPPED_PTO_S


def _established() -> Pair:
    pair = Pair()
    pair.publish(3)
    pair.run(pair.now + 2.0)
    assert pair.edge.handshake_done
    assert pair.ledgers[1].lanes[LANE].committed == 3  # the link works both ways
    return pair


def test_backoff_sequence() -> None:
    lin = tq.LINEAR_PTOS + 1
    # a slow link (base 1 s): three at the base, then 2x, then 4x for good
    seq = [tq.pto_backoff(n, 1.0) for n in range(lin + 6)]
    assert seq == [1] * lin + [2, 4, 4, 4, 4, 4]
    assert max(seq) == tq.MAX_PTO_BACKOFF
    # a LAN (base 40 ms): it doubles on until the period is at least MIN_CAPPED_PTO_S
    seq = [tq.pto_backoff(n, 0.04) for n in range(lin + 9)]
    assert seq == [1] * lin + [2, 4, 8, 16, 32, 64, 64, 64, 64]
    assert 64 * 0.04 >= tq.MIN_CAPPED_PTO_S > 32 * 0.04


def test_edge_probes_a_dark_uplink_at_the_thin_stream_pace() -> None:
    pair = _established()
    pair.up_dark = True
    pair.publish(1)  # a batch into the dark: only probe timeouts can recover it
    _assert_thin_stream_pace(_probe_intervals(pair, pair.edge.quic, 10))


def test_hub_keeps_aioquics_doubling() -> None:
    """The hub is the shared end: past saturation its own socket buffer delays the edges'
    ACKs, and early probes to every device made fleet trials collapse (BENCHMARKS.md)."""
    pair = _established()
    pair.down_dark = True
    pair.publish(1)  # the batch arrives; the hub's ACK of it goes into the dark
    pair.run(pair.now + 1.5 * DELAY)  # there, committed, acknowledged into the dark
    assert pair.ledgers[1].lanes[LANE].committed == 4
    (conn,) = pair.hub.connections.values()
    gaps = _probe_intervals(pair, conn.quic, 6)
    assert [round(g / gaps[0], 2) for g in gaps] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


def test_an_ack_starts_the_count_again() -> None:
    pair = _established()
    pair.up_dark = True
    pair.publish(1)
    _probe_intervals(pair, pair.edge.quic, 6)
    assert pair.edge.quic._loss._pto_count == 6
    pair.up_dark = False
    pair.run(pair.now + 30.0)  # the next probe gets through and is acknowledged
    assert pair.edge.quic._loss._pto_count == 0
    assert pair.ledgers[1].lanes[LANE].committed == 4


def test_the_edge_uses_it_and_the_hub_does_not() -> None:
    pair = _established()
    assert (
        type(pair.edge.quic._loss) is tq._ThinStreamRecovery
    )  # an aioquic upgrade must not drop it
    (conn,) = pair.hub.connections.values()
    assert type(conn.quic._loss) is QuicPacketRecovery

"""What an established hub connection keeps, and that it still works with only that.

The hub swaps aioquic state an idle connection no longer reads for shared or smaller
stand-ins (transport/quic.py: ``release_spent_state``, ``_HubQuic``).  These tests pin the
aioquic internals that rests on (they fail when aioquic changes them) and drive real
edge and hub endpoints through an in-memory network with a manual clock, after the swap:
late Initial/Handshake packets, key updates both ways, NAT rebinding and connection-ID
changes, 0-RTT resumption, a post-handshake TLS message, close, a long idle stretch.
No sockets, no sleeping.
"""

from __future__ import annotations

import gc
import heapq
import inspect
import itertools
import random
import re
import sys
import tracemalloc
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aioquic import tls
from aioquic.quic import connection as aioquic_connection
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.packet import QuicErrorCode
from aioquic.quic.recovery import QuicPacketNumberWindow

import transport.quic as tq
from transport import certs
from transport.auth import TicketStore
from transport.batchcodec import Record
from transport.certs import DeviceIdentity
from transport.errors import ErrorCode
from transport.events import Acked, BatchAccepted
from transport.memoutbox import MemoryOutbox
from transport.quic import (
    Address,
    Connected,
    ConnectionLost,
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
LANE = int(Lane.TELEMETRY)
ONE_RTT = tls.Epoch.ONE_RTT


# --- an in-memory network of one hub and its devices ---------------------------------------


@dataclass(eq=False)
class Device:
    """One edge endpoint with its outbox, its address and what it has seen."""

    name: str
    endpoint: EdgeEndpoint
    outbox: MemoryOutbox
    addr: Address
    tickets: list[tls.SessionTicket] = field(default_factory=list)
    events: list[object] = field(default_factory=list)
    next_seq: int = 1

    def lost(self) -> ConnectionLost | None:
        return next((e for e in self.events if isinstance(e, ConnectionLost)), None)


class Net:
    """Hub and devices joined by a lossless link with a fixed one-way delay, manual clock."""

    def __init__(self, delay: float = 0.01) -> None:
        self.now = 1000.0
        self.delay = delay
        self._queue: list[tuple[float, int, Address, Address, bytes]] = []
        self._seq = itertools.count()
        self.ca, self.ca_key = certs.make_ca("test CA")
        hub_cert, hub_key = certs.make_hub_cert(self.ca, self.ca_key, ["localhost"])
        self.ledgers: dict[tuple[str, int], DeviceLedger] = {}
        self.stored: list[tuple[str, int]] = []
        self.hub = HubEndpoint(HubTls(hub_cert, hub_key, [self.ca]), self._session, _allow)
        self.devices: dict[Address, Device] = {}
        self.to_hub: list[bytes] = []  # every datagram a device sent, in order

    def _session(self, conn: HubConnection, now: float) -> HubSession:
        ident = conn.identity
        assert ident is not None

        def ledger(inc: int) -> DeviceLedger:
            return self.ledgers.setdefault((ident.device, inc), DeviceLedger(inc))

        return HubSession(ident.tenant, ident.device, ledger, now)

    def device(
        self,
        name: str,
        ticket: tls.SessionTicket | None = None,
        records: int = 3,
        ack_delay: float = 0.001,
    ) -> Device:
        cert, key = certs.make_device_cert(self.ca, self.ca_key, "acme", name)
        outbox = MemoryOutbox()
        addr: Address = (f"10.1.0.{len(self.devices) + 1}", 5000 + len(self.devices))
        session = EdgeSession(
            outbox, 1, self.now, SenderConfig(linger_s=0.0), stats=lambda: {"sd": 0}
        )
        dev = Device(name, None, outbox, addr)  # type: ignore[arg-type]
        self.add_records(dev, records)
        dev.endpoint = EdgeEndpoint(
            EdgeTls([self.ca], cert, key),
            session,
            HUB,
            self.now,
            ticket,
            dev.tickets.append,
            ack_delay=ack_delay,
        )
        self.devices[addr] = dev
        return dev

    def add_records(self, dev: Device, n: int) -> None:
        for _ in range(n):
            seq = dev.next_seq
            dev.next_seq += 1
            dev.outbox.add(LANE, Record(seq, seq, f"acme.{dev.name}.t", {}, {"n": seq}), self.now)
        if dev.endpoint is not None:
            dev.endpoint.poll(self.now)

    def move(self, dev: Device, addr: Address) -> None:
        """The device's NAT mapping changes: it is reachable at ``addr`` only."""
        del self.devices[dev.addr]
        dev.addr = addr
        self.devices[addr] = dev

    def connection(self, dev: Device) -> HubConnection:
        return next(
            c for c in self.hub.connections.values() if c.identity and c.identity.device == dev.name
        )

    def inject(self, data: bytes, src: Address) -> None:
        """A datagram arrives at the hub now (a replay, say)."""
        self.hub.receive_datagram(data, src, self.now)
        self._collect()

    def _collect(self) -> None:
        while (ev := self.hub.next_event()) is not None:
            if isinstance(ev, DeviceEvent) and isinstance(ev.event, BatchAccepted):
                b, session = ev.event, ev.conn.session
                assert session is not None and session.ledger is not None
                self.stored.extend((session.device, r.seq) for r in b.decoded())
                session.ledger.lanes[b.lane].committed = b.last_seq
                session.on_committed(self.now)
                self.hub.touch(ev.conn, self.now)
        for dev in list(self.devices.values()):
            for data, _ in dev.endpoint.datagrams_to_send(self.now):
                self.to_hub.append(data)
                self._send(HUB, dev.addr, data)
            while (e := dev.endpoint.next_event()) is not None:
                dev.events.append(e)
        for data, addr in self.hub.datagrams_to_send(self.now):
            self._send(tuple(addr), HUB, data)

    def _send(self, dst: Address, src: Address, data: bytes) -> None:
        heapq.heappush(self._queue, (self.now + self.delay, next(self._seq), dst, src, data))

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            self._collect()
            times = [self.hub.get_timer(), *(d.endpoint.get_timer() for d in self.devices.values())]
            if self._queue:
                times.append(self._queue[0][0])
            due = min((t for t in times if t is not None), default=None)
            if due is None or due > end:
                self.now = end
                return
            self.now = max(self.now, due)
            while self._queue and self._queue[0][0] <= self.now:
                _, _, dst, src, data = heapq.heappop(self._queue)
                if dst == HUB:
                    self.hub.receive_datagram(data, src, self.now)
                elif dst in self.devices:
                    self.devices[dst].endpoint.receive_datagram(data, HUB, self.now)
            t = self.hub.get_timer()
            if t is not None and t <= self.now:
                self.hub.handle_timer(self.now)
            for dev in list(self.devices.values()):
                t = dev.endpoint.get_timer()
                if t is not None and t <= self.now:
                    dev.endpoint.handle_timer(self.now)


def _allow(identity: DeviceIdentity) -> None:
    return None


def acked(dev: Device) -> int:
    """Highest seq the hub has acknowledged to ``dev``."""
    return dev.outbox.acked_mark(LANE)


def established(net: Net, name: str, records: int = 3) -> tuple[Device, HubConnection]:
    dev = net.device(name, records=records)
    net.run(2.0)
    conn = net.connection(dev)
    assert conn.settled and acked(dev) == records, (conn.settled, acked(dev))
    return dev, conn


# --- the aioquic internals this relies on -------------------------------------------------


def test_aioquic_still_has_every_internal_the_lean_hub_connection_relies_on() -> None:
    assert tq.check_aioquic_internals() == []


def test_aioquic_reads_the_tls_context_and_its_buffers_only_where_reviewed() -> None:
    # After the handshake only _handle_crypto_frame can still reach these (the others run
    # during the handshake or on clients); a new reader means: review release_spent_state.
    def users(attr: str) -> set[str]:
        pattern = re.compile(re.escape(attr) + r"\b")
        return {
            name
            for name, fn in vars(QuicConnection).items()
            if inspect.isfunction(fn) and pattern.search(inspect.getsource(fn))
        }

    assert users("self.tls") == {
        "_alpn_handler",
        "_connect",
        "_handle_crypto_frame",
        "_initialize",
        "_update_traffic_key",
        "receive_datagram",
    }
    assert users("self._crypto_buffers") == {
        "__init__",
        "_connect",
        "_handle_crypto_frame",
        "_initialize",
        "_push_crypto_data",
    }
    assert users("self._remote_version_information") == {
        "__init__",
        "_alpn_handler",
        "_parse_transport_parameters",
    }
    assert users("self._session_ticket_fetcher") == {"__init__", "_initialize"}
    assert users("self._session_ticket_handler") == {
        "__init__",
        "_handle_session_ticket",
        "_initialize",
    }


def test_aioquic_uses_only_list_compatible_operations_on_its_small_queues() -> None:
    source = inspect.getsource(aioquic_connection)
    names = r"(_events|_datagrams_pending|local_challenges|remote_challenges)"
    used = set(re.findall(names + r"\.(\w+)\(", source))
    assert {method for _, method in used} <= {"append", "popleft", "clear"}, used
    queue = tq._SmallQueue(maxlen=2)
    for item in "abc":
        queue.append(item)
    assert list(queue) == ["b", "c"] and "c" in queue and queue[0] == "b"
    assert queue.popleft() == "b" and queue.popleft() == "c" and not queue
    with pytest.raises(IndexError):
        queue.popleft()


def test_aioquic_frame_dispatch_is_only_subscripted() -> None:
    source = inspect.getsource(QuicConnection)
    uses = re.findall(r"self\.__frame_handlers(.)", source)
    assert sorted(uses) == [" ", "["]  # built once, then only table[frame_type]


def test_connection_log_lines_keep_the_connection_id(caplog: pytest.LogCaptureFixture) -> None:
    net = Net()
    _, conn = established(net, "log")
    q: Any = conn.quic
    assert isinstance(q._logger, tq._ConnLog)
    with caplog.at_level("DEBUG", logger="quic"):
        q._logger.debug("Network path %s promoted", "x")
        q._logger.warning(ValueError("boom"))
    cid = aioquic_connection.dump_cid(q._original_destination_connection_id)
    assert [r.getMessage() for r in caplog.records if r.name == "quic"] == [
        f"[{cid}] Network path x promoted",
        f"[{cid}] boom",
    ]


def test_frame_handler_view_gives_what_aioquics_table_gives() -> None:
    net = Net()
    _, conn = established(net, "view")
    view = vars(conn.quic)["_QuicConnection__frame_handlers"]
    assert isinstance(view, tq._FrameHandlers)
    plain = QuicConnection(configuration=tq._base_config(True, 60.0))
    table = vars(plain)["_QuicConnection__frame_handlers"]
    for frame_type, (handler, epochs) in table.items():
        mine: Any
        mine, my_epochs = view[frame_type]
        assert mine.__func__ is handler.__func__ and mine.__self__ is conn.quic
        assert my_epochs == epochs
    with pytest.raises(KeyError):
        view[0x7F]  # unknown frame type: aioquic turns the KeyError into a close


def test_packet_window_answers_exactly_as_aioquics() -> None:
    rng = random.Random(4)
    for _ in range(200):
        theirs, mine = QuicPacketNumberWindow(), tq._PacketWindow()
        top = 0
        for _ in range(600):
            if rng.random() < 0.6:
                top += rng.choice((1, 1, 1, 2, 5, 300))
                pn = top
            else:
                pn = max(0, top - rng.randrange(400))
            assert (pn in theirs) == (pn in mine), pn
            theirs.add(pn)
            mine.add(pn)
            probe = rng.randrange(max(1, top + 10))
            assert (probe in theirs) == (probe in mine), probe


def test_aioquic_server_reads_only_what_the_ticket_store_keeps() -> None:
    source = inspect.getsource(tls.Context._server_handle_hello)
    read = set(re.findall(r"session_ticket\.(\w+)", source))
    assert read <= {"is_valid", "cipher_suite", "resumption_secret"}, read
    assert set(
        re.findall(r"self\.(\w+)", inspect.getsource(vars(tls.SessionTicket)["is_valid"].fget))
    ) == {
        "not_valid_before",
        "not_valid_after",
    }


# --- what a settled connection holds ----------------------------------------------------


def test_a_settled_connection_shares_or_drops_all_handshake_state() -> None:
    net = Net()
    dev, conn = established(net, "lean")
    q: Any = conn.quic
    assert isinstance(q.tls, tq._EstablishedTls) and not q.tls.session_resumed
    for epoch in (tls.Epoch.INITIAL, tls.Epoch.HANDSHAKE):
        assert q._spaces[epoch] is tq._SPENT_SPACE and q._cryptos[epoch] is tq._SPENT_PAIR
        assert q._crypto_streams[epoch] is tq._SPENT_STREAM
    assert q._crypto_streams[ONE_RTT] is tq._SPENT_ONE_RTT_STREAM  # the ticket was acked
    assert q._cryptos[tls.Epoch.ZERO_RTT] is tq._SPENT_PAIR
    assert set(q._cryptos_initial.values()) == {tq._SPENT_PAIR}
    assert q._crypto_buffers == {} and q._session_ticket_fetcher is None
    assert isinstance(q._logger, tq._ConnLog) and q._loss._logger is q._logger
    assert len(q._host_cids) == 2 and len(q._peer_cid_available) == 1
    assert len(conn.cids) == 3  # the client's Initial DCID and the hub's two
    assert len(vars(q)) <= 85  # fits a 128-slot dict (1.6 KB, not 3.3 KB)
    assert isinstance(q._events, tq._SmallQueue)
    assert isinstance(q._spaces[ONE_RTT].received_packets, tq._PacketWindow)
    assert net.hub.tickets.issued == 1 and dev.tickets


def _hub_bytes_per_connection(n: int) -> float:
    """Python memory the hub holds per settled connection (devices' memory left out)."""
    gc.collect()
    tracemalloc.start()
    try:
        net = Net()
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            net.device(f"m{i}")
        net.run(3.0)
        assert len(net.hub.connections) == n
        assert all(c.settled for c in net.hub.connections.values())
        net.devices.clear()
        gc.collect()
        return (tracemalloc.get_traced_memory()[0] - base) / n
    finally:
        tracemalloc.stop()


def test_a_settled_connection_holds_far_less_than_aioquic_keeps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lean = _hub_bytes_per_connection(8)
    monkeypatch.setattr(tq, "_LEAN", False)  # what aioquic keeps on its own
    fat = _hub_bytes_per_connection(8)
    print(f"\nhub Python memory per settled connection: {lean:.0f} B (aioquic alone {fat:.0f} B)")
    assert lean < fat / 3


# --- and everything still works -----------------------------------------------------------


def test_late_initial_and_handshake_packets_are_dropped_and_leave_shared_state_alone() -> None:
    net = Net()
    dev = net.device("late")
    net.run(2.0)
    conn = net.connection(dev)
    assert conn.settled
    handshake = list(net.to_hub[:4])  # the Initial and Handshake flights, whatever followed
    pristine = vars(tq._spent_space()).keys(), tq._SPENT_SPACE.expected_packet_number
    for data in handshake * 2:
        net.inject(data, dev.addr)
    assert conn.quic._state is QuicConnectionState.CONNECTED and not conn.closed
    assert len(net.hub.connections) == 1  # no second handshake from a replayed Initial
    space = tq._SPENT_SPACE
    assert (vars(space).keys(), space.expected_packet_number) == pristine
    assert not space.sent_packets and len(space.ack_queue) == 0
    assert space.largest_received_packet == -1
    assert not tq._SPENT_PAIR.recv.is_valid() and not tq._SPENT_PAIR.send.is_valid()
    net.add_records(dev, 5)
    net.run(1.0)
    assert acked(dev) == 8 and len(net.stored) == 8


def test_key_updates_from_either_side_after_the_handshake_state_is_gone() -> None:
    net = Net()
    dev, conn = established(net, "keys")
    edge_pair = dev.endpoint.quic._cryptos[ONE_RTT]
    hub_pair: Any = conn.quic._cryptos[ONE_RTT]
    assert hub_pair.recv.key_phase == 0
    dev.endpoint.quic.request_key_update()
    net.add_records(dev, 4)
    net.run(1.0)
    assert hub_pair.recv.key_phase == 1 and hub_pair.send.key_phase == 1
    assert acked(dev) == 7
    conn.quic.request_key_update()  # the hub's turn: its next packets use phase 0 again
    net.add_records(dev, 4)
    net.run(1.0)
    assert edge_pair.recv.key_phase == 0 and hub_pair.send.key_phase == 0
    assert acked(dev) == 11 and sorted(s for _, s in net.stored) == list(range(1, 12))


def test_nat_rebinding_and_connection_id_changes_keep_the_session() -> None:
    net = Net()
    dev, conn = established(net, "mobile")
    for step in range(3):
        net.move(dev, (f"10.2.0.{step + 1}", 7000 + step))  # NAT rebinding
        net.add_records(dev, 2)
        net.run(1.0)
        assert conn.peer_addr[:2] == dev.addr[:2] and acked(dev) == 5 + 2 * step
    paths: Any = conn.quic._network_paths
    assert len(paths) == 4 and all(isinstance(p.remote_challenges, tq._SmallQueue) for p in paths)
    for _ in range(3):  # the device switches to the hub's spare CID; the hub issues another
        before = set(conn.cids)
        dev.endpoint.quic.change_connection_id()
        net.add_records(dev, 2)
        net.run(1.0)
        assert conn.cids != before and len(conn.quic._host_cids) == 2
    assert acked(dev) == 15 and not conn.closed and len(net.hub.connections) == 1
    assert sorted(s for _, s in net.stored) == list(range(1, 16))


def test_a_tls_message_after_the_handshake_closes_with_unexpected_message() -> None:
    net = Net()
    dev, conn = established(net, "tls")
    quic: Any = dev.endpoint.quic
    quic._crypto_streams[ONE_RTT].sender.write(b"\x04\x00\x00\x00")  # a NewSessionTicket
    dev.endpoint.wrote_to_quic()
    net.run(1.0)
    lost = dev.lost()
    code = QuicErrorCode.CRYPTO_ERROR + tls.AlertDescription.unexpected_message
    assert lost is not None and lost.code == code, lost
    assert conn.closed


def test_resumed_session_with_early_data_settles_once_the_zero_rtt_keys_are_gone() -> None:
    net = Net()
    first, _ = established(net, "resume")
    assert first.tickets
    first.endpoint.close()
    net.run(5.0)
    assert not net.hub.connections
    again = net.device("resume", ticket=first.tickets[-1], records=0)
    again.next_seq = first.next_seq
    net.add_records(again, 3)  # spooled before the handshake: they ride the first flight
    net.run(2.0)
    conn = net.connection(again)
    connected = next(e for e in again.events if isinstance(e, Connected))
    assert connected.session_resumed and connected.early_data and conn.resumed
    assert conn.settled and conn.quic._cryptos[tls.Epoch.ZERO_RTT] is tq._SPENT_PAIR
    assert isinstance(conn.quic.tls, tq._EstablishedTls) and conn.quic.tls.session_resumed
    assert acked(again) == 6 and sorted(s for _, s in net.stored) == list(range(1, 7))
    assert net.hub.tickets.resumed == 1


def test_ticket_store_hands_back_what_the_server_reads() -> None:
    store = TicketStore()
    ident = DeviceIdentity("acme", "t1", 1, tq_now())
    ticket = tls.SessionTicket(
        age_add=5,
        cipher_suite=tls.CipherSuite.AES_128_GCM_SHA256,
        not_valid_after=tq_now().replace(year=2100),
        not_valid_before=tq_now(),
        resumption_secret=b"r" * 32,
        server_name="localhost",
        ticket=b"label",
        max_early_data_size=0xFFFFFFFF,
        other_extensions=[(0x39, b"transport parameters")],
    )
    store.add(ticket, ident)
    entry = store.take(b"label")
    assert entry is not None and entry[1] is ident
    back = entry[0]
    assert back.ticket == b"label" and back.is_valid
    assert back.cipher_suite == ticket.cipher_suite
    assert back.resumption_secret == ticket.resumption_secret
    assert back.not_valid_before == ticket.not_valid_before
    assert back.not_valid_after == ticket.not_valid_after


def tq_now() -> Any:
    """An hour ago, with microseconds (what the store must give back exactly)."""
    return datetime.now(UTC).replace(microsecond=123456) - timedelta(hours=1)


def test_close_from_the_hub_reaches_the_device_with_its_code() -> None:
    net = Net()
    dev, conn = established(net, "bye")
    net.hub.close_connection(conn, ErrorCode.GOING_AWAY, "shutting down")
    net.run(5.0)
    lost = dev.lost()
    assert lost is not None and lost.code == ErrorCode.GOING_AWAY and conn.closed
    assert not net.hub.connections and not net.hub._by_cid


def test_half_an_hour_of_heartbeats_holds_the_same_few_structures() -> None:
    net = Net()
    devs = [established(net, f"idle{i}")[0] for i in range(3)]
    conns = [net.connection(d) for d in devs]
    net.run(1800.0)  # 180 heartbeats each
    assert all(not c.closed and c.quic._state is QuicConnectionState.CONNECTED for c in conns)
    assert all(d.lost() is None for d in devs)
    assert len(net.hub._timers) <= 2 * len(net.hub.connections) + 64
    for c in conns:
        q: Any = c.quic
        window = q._spaces[ONE_RTT].received_packets
        assert isinstance(window, tq._PacketWindow) and window._lower > 0  # it slid
        # ACK-only packets (the hub acknowledging heartbeats) no longer pile up: a PING now
        # and then gets them acknowledged
        assert len(q._spaces[ONE_RTT].sent_packets) <= 16  # not 180
    net.add_records(devs[0], 2)
    net.run(1.0)
    assert acked(devs[0]) == 5


def test_a_burst_sized_sent_packets_table_is_given_back() -> None:
    net = Net()
    _, conn = established(net, "burst")
    q: Any = conn.quic
    packets = q._spaces[ONE_RTT].sent_packets
    real = len(packets)
    packets.update(dict.fromkeys(range(10_000, 10_200)))  # a burst in flight ...
    for pn in range(10_000, 10_200):
        del packets[pn]  # ... all acknowledged: the table stays burst-sized
    assert real < tq._FEW_PACKETS and sys.getsizeof(packets) > tq._FEW_PACKETS_DICT_BYTES
    tq.tend_idle(conn.quic)
    trimmed = q._spaces[ONE_RTT].sent_packets
    assert trimmed == packets and list(trimmed) == list(packets)  # same entries, same order
    assert sys.getsizeof(trimmed) <= tq._FEW_PACKETS_DICT_BYTES


def test_acks_keep_flowing_for_a_busy_device_after_settling() -> None:
    net = Net()
    dev, conn = established(net, "busy")
    assert conn.settled
    for _ in range(20):
        net.add_records(dev, 50)
        net.run(0.05)
    net.run(2.0)
    assert acked(dev) == 1003 and len(net.stored) == 1003
    assert any(isinstance(e, Acked) for e in dev.events)


def test_acks_ride_packets_sent_anyway_and_each_side_allows_for_the_others_delay() -> None:
    """The hub's QUIC ACK goes in the packet with its commit ACK; the device's ACK of that
    rides its next batch, or goes alone once its (advertised) ack delay is up."""
    net = Net()
    dev = net.device("t1", ack_delay=0.5)
    net.run(2.0)
    conn = net.connection(dev)
    assert acked(dev) == 3
    hub_loss: Any = conn.quic._loss
    dev_loss: Any = dev.endpoint.quic._loss
    assert hub_loss.max_ack_delay == pytest.approx(0.525)  # the device's 0.5 s + slack
    assert tq.HUB_ACK_DELAY_S < dev_loss.max_ack_delay == pytest.approx(0.025)
    down: list[Any] = []
    real = net.hub.datagrams_to_send

    def spy(now: float) -> list[Any]:
        out = real(now)
        down.extend(out)
        return out

    net.hub.datagrams_to_send = spy  # type: ignore[method-assign]
    up0 = len(net.to_hub)
    net.add_records(dev, 5)
    net.run(0.2)  # batch 1 is committed and acknowledged; the device holds its QUIC ACK
    net.add_records(dev, 5)
    net.run(3.0)  # batch 2 carries that ACK; the ACK of commit ACK 2 goes alone at 0.5 s
    assert acked(dev) == 13
    assert len(net.to_hub) - up0 == 3  # two batches and one ACK (was four)
    assert len(down) == 2  # two commit ACKs, each with the hub's QUIC ACK (was four)

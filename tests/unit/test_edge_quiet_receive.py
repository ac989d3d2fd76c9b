"""After a datagram from the hub, the edge asks aioquic for datagrams only when it may have
one that cannot wait (transport/quic.py ``_nothing_urgent``).

Most datagrams an edge receives are the hub's commit ACKs: they leave a QUIC ACK that the
edge holds for its next batch, and asking aioquic then finds nothing.  What it may have
after a datagram and must send at once -- a retransmission the hub's ACK frame revealed
as due, a PATH_RESPONSE to the hub's path challenge -- goes out at that very moment.  A
real edge and hub endpoint pair (tests/unit/test_thin_stream_pto) carries the traffic.
"""

from __future__ import annotations

from typing import Any

from tests.unit.test_thin_stream_pto import LANE, Pair
from transport.events import BatchAccepted
from transport.quic import Address, DeviceEvent, EdgeEndpoint
from transport.session import SenderConfig


class _Watch:
    """Records, per moment, what the edge's connection received and sent."""

    def __init__(self, edge: EdgeEndpoint) -> None:
        self.asks: list[tuple[float, int]] = []  # (now, datagrams aioquic gave)
        # (now, packets this datagram's ACK frame declared lost, path challenge pending)
        self.received: list[tuple[float, int, bool]] = []
        quic: Any = edge.quic
        send, receive = quic.datagrams_to_send, quic.receive_datagram

        def datagrams_to_send(now: float) -> list[tuple[bytes, Address]]:
            out = send(now=now)
            self.asks.append((now, len(out)))
            return out

        def receive_datagram(data: bytes, addr: Address, now: float) -> None:
            lost = edge.packets_lost
            receive(data, addr, now)
            challenged = any(p.remote_challenges for p in quic._network_paths)
            self.received.append((now, edge.packets_lost - lost, challenged))

        quic.datagrams_to_send, quic.receive_datagram = datagrams_to_send, receive_datagram

    def sent_at(self, now: float) -> int:
        return sum(n for t, n in self.asks if t == now)


def _established(sender: SenderConfig, ack_delay: float, delay: float = 0.02) -> Pair:
    pair = Pair(sender, ack_delay=ack_delay, delay=delay)
    pair.run(pair.now + 1.0)  # handshake and WELCOME
    assert pair.edge.handshake_done and pair.ledgers[1] is not None
    return pair


def _hub_quic(pair: Pair) -> Any:
    (conn,) = pair.hub.connections.values()
    return conn.quic


def test_a_commit_ack_leaves_aioquic_unasked_and_its_ack_rides_the_next_batch() -> None:
    pair = _established(SenderConfig(linger_s=1.0), ack_delay=1.0)
    watch = _Watch(pair.edge)
    for _ in range(3):  # a record a second, as the fleet's vehicles send
        pair.publish()
        pair.run(pair.now + 1.0)
    pair.run(pair.now + 0.1)  # the third batch (sent just now) is committed and ACKed
    assert pair.ledgers[1].lanes[LANE].committed == 3
    acks_in = [t for t, _, _ in watch.received]
    assert len(acks_in) >= 3  # a commit ACK per batch came in ...
    assert all(n > 0 for _, n in watch.asks)  # ... and aioquic was asked only when it had some
    assert len(watch.asks) == 3  # one packet per batch: each carried the ACK of the last ACK
    hub = _hub_quic(pair)
    assert hub._loss.bytes_in_flight > 0  # its last commit ACK is not acknowledged yet
    pair.run(pair.now + 1.1)  # nothing more to send: the held ACK goes out at its deadline
    assert hub._loss.bytes_in_flight == 0 and hub._loss._pto_count == 0


def test_a_loss_the_hubs_ack_reveals_is_resent_at_once() -> None:
    sender = SenderConfig(linger_s=0.0, small_batches_in_flight=0)
    # 100 ms each way: the time threshold (9/8 RTT) leaves the packet threshold room
    pair = _established(sender, ack_delay=1.0, delay=0.1)
    watch = _Watch(pair.edge)
    pair.up_dark = True
    pair.publish()  # the first batch's packet is lost on the way up
    pair.run(pair.now)
    pair.up_dark = False
    for _ in range(4):  # four more, a packet each: the hub's ACK of the last two declares
        pair.now += 0.002  # the first lost by packet threshold (RFC 9002 6.1.1)
        pair.publish()
        pair.run(pair.now)
    pair.run(pair.now + 0.5)  # well before any probe timeout
    revealed = [t for t, lost, _ in watch.received if lost > 0]
    assert revealed, "the hub's ACK did not reveal the lost packet"
    assert watch.sent_at(revealed[0]) > 0  # the retransmission left with that datagram
    assert pair.ledgers[1].lanes[LANE].committed == 5


def test_a_path_challenge_is_answered_at_once() -> None:
    pair = _established(SenderConfig(linger_s=1.0), ack_delay=1.0)
    watch = _Watch(pair.edge)
    pair.edge_addr = ("10.1.0.1", 6000)  # NAT rebinding: the hub sees a new port
    pair.publish()
    pair.run(pair.now + 1.2)
    challenged = [t for t, _, c in watch.received if c]
    assert challenged, "the hub did not challenge the new path"
    assert all(watch.sent_at(t) > 0 for t in challenged)  # the PATH_RESPONSE went at once
    (conn,) = pair.hub.connections.values()
    assert conn.quic._network_paths[0].addr == pair.edge_addr
    assert conn.quic._network_paths[0].is_validated
    assert pair.ledgers[1].lanes[LANE].committed == 1


def test_the_hub_arms_a_touched_connection_whose_datagrams_are_not_taken_yet() -> None:
    """The hub arms a connection's timer when it takes its datagrams; asked for its timer
    before that (a shell that reads the timer first), it arms the touched ones then."""
    pair = _established(SenderConfig(linger_s=0.0), ack_delay=1.0)
    pair.publish()
    (data, _), *_ = pair.edge.datagrams_to_send(pair.now)
    (conn,) = pair.hub.connections.values()
    pair.hub.receive_datagram(data, pair.edge_addr, pair.now)  # a batch
    armed = pair.hub.get_timer()  # its ACK held for the commit (HUB_ACK_DELAY_S)
    assert armed is not None and armed > pair.now
    while (ev := pair.hub.next_event()) is not None:  # the commit, as the hub shell does it
        if isinstance(ev, DeviceEvent) and isinstance(ev.event, BatchAccepted):
            conn.session.ledger.lanes[LANE].committed = ev.event.last_seq
            conn.session.on_committed(pair.now)
            pair.hub.touch(conn, pair.now)  # the commit ACK is written: due now
    due = conn.quic.get_timer()
    assert due is not None and due < armed
    assert pair.hub.get_timer() == due  # before datagrams_to_send
    pair.hub.handle_timer(due)
    assert pair.hub.datagrams_to_send(due)  # the commit ACK, with the QUIC ACK


def test_the_edges_cached_quic_timer_is_never_stale() -> None:
    """After every call that can change aioquic's deadline (a datagram in, datagrams out, a
    timer, records sent, probes into a dark link), the endpoint's cached timer is aioquic's."""
    pair = _established(SenderConfig(linger_s=0.2), ack_delay=1.0)
    edge: Any = pair.edge
    checked: list[str] = []

    def checking(name: str) -> None:
        call = getattr(edge, name)

        def wrapper(*args: Any) -> Any:
            out = call(*args)
            assert edge._quic_timer() == edge.quic.get_timer(), f"stale after {name}"
            checked.append(name)
            return out

        setattr(edge, name, wrapper)

    for name in ("receive_datagram", "datagrams_to_send", "handle_timer", "poll"):
        checking(name)
    for _ in range(3):
        pair.publish()
        pair.run(pair.now + 0.5)
    pair.down_dark = True  # ACKs lost: probe timeouts fire and retransmit
    for _ in range(2):
        pair.publish()
        pair.run(pair.now + 3.0)
    pair.down_dark = False
    pair.run(pair.now + 5.0)
    assert pair.ledgers[1].lanes[LANE].committed == 5
    assert {"receive_datagram", "datagrams_to_send", "handle_timer", "poll"} <= set(checked)

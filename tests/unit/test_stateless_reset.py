"""Stateless resets (RFC 9000 section 10.3, transport/quic.py): a restarted hub answers a
device's packet for a connection it no longer knows, and the device reconnects at once
instead of waiting out its hub-silence timeout.

A real edge and hub endpoint pair (tests/unit/test_thin_stream_pto) carries the traffic;
"restarting" the hub is a new HubEndpoint with the same TLS files.
"""

from __future__ import annotations

import os
from typing import Any

from tests.unit.test_thin_stream_pto import LANE, Pair, _allow
from transport import certs
from transport.quic import (
    HUB_CID_BYTES,
    RESET_MAX_BYTES,
    RESET_MIN_BYTES,
    HubEndpoint,
    HubLimits,
    HubTls,
    cid_is_ours,
    hub_cid,
    reset_key,
    reset_token,
)
from transport.session import EdgeState, SenderConfig

ADDR = ("10.9.0.1", 7000)


def _established() -> Pair:
    pair = Pair(SenderConfig(linger_s=0.0))
    pair.run(pair.now + 1.0)  # handshake and WELCOME
    pair.publish()
    pair.run(pair.now + 0.5)
    assert pair.ledgers[1].lanes[LANE].committed == 1
    return pair


def _restart_hub(pair: Pair, tls: HubTls | None = None) -> HubEndpoint:
    pair.hub = HubEndpoint(tls or pair.hub_tls, pair._session, _allow)
    return pair.hub


def test_a_restarted_hub_resets_and_the_edge_gives_the_connection_up_at_once() -> None:
    pair = _established()
    hub = _restart_hub(pair)
    sent_at = pair.now
    pair.publish()  # its packet reaches a hub that does not know the connection
    pair.run(sent_at + 2 * pair.delay + 0.001)  # one round trip
    assert hub.counters["unknown_cid"] >= 1 and hub.counters["stateless_resets"] >= 1
    assert pair.edge.reset_by_hub and pair.edge.closed
    assert pair.edge.session.state is EdgeState.CLOSED
    # silent from then on: nothing to send, no timer (the shell drops it and reconnects)
    assert pair.edge.datagrams_to_send(pair.now) == []
    pair.edge.wrote_to_quic()  # even with something written to aioquic
    assert pair.edge.datagrams_to_send(pair.now) == []
    assert pair.edge.get_timer() is None


def test_the_reset_ends_the_session_with_a_connection_lost_event() -> None:
    pair = _established()
    _restart_hub(pair)
    events: list[Any] = []
    pull = pair.edge.next_event

    def recording() -> Any:
        ev = pull()
        if ev is not None:
            events.append(ev)
        return ev

    pair.edge.next_event = recording  # type: ignore[method-assign]
    pair.publish()
    pair.run(pair.now + 2 * pair.delay + 0.001)
    lost = [ev for ev in events if type(ev).__name__ == "ConnectionLost"]
    assert len(lost) == 1 and "stateless reset" in lost[0].reason
    assert lost[0].handshake_done  # a session that was up: the agent reconnects, ticket kept


def test_a_hub_with_another_key_does_not_answer_and_a_forged_reset_is_not_believed() -> None:
    pair = _established()
    other_cert, other_key = certs.make_hub_cert(pair.ca, pair.ca_key, ["localhost"])
    hub = _restart_hub(pair, HubTls(other_cert, other_key, [pair.ca]))
    pair.publish()
    pair.run(pair.now + 2 * pair.delay + 0.001)
    assert hub.counters["unknown_cid"] >= 1  # not an ID this key made: no answer
    assert hub.counters["stateless_resets"] == 0
    forged = bytes([0x41]) + os.urandom(26) + os.urandom(16)  # the shape, not the token
    pair.edge.receive_datagram(forged, ("10.0.0.1", 4433), pair.now)
    assert not pair.edge.reset_by_hub and not pair.edge.closed


def test_every_connection_id_carries_the_derived_token() -> None:
    pair = _established()
    (conn,) = pair.hub.connections.values()
    key = reset_key(pair.hub_tls.key)
    hub_q: Any = conn.quic
    assert len(hub_q._host_cids) >= 2  # the first, and those NEW_CONNECTION_ID announced
    for c in hub_q._host_cids:
        assert cid_is_ours(key, c.cid)  # a restarted hub recognises the ID ...
        assert c.stateless_reset_token == reset_token(key, c.cid)  # ... and its token
    edge_q: Any = pair.edge.quic
    held = [edge_q._peer_cid, *edge_q._peer_cid_available]
    assert len(held) >= 2
    for c in held:  # what the edge recognises is what a restarted hub derives
        assert cid_is_ours(key, c.cid)
        assert c.stateless_reset_token == reset_token(key, c.cid)


def _short_header(cid: bytes, size: int) -> bytes:
    return bytes([0x40 | 0x01]) + cid + os.urandom(size - 1 - len(cid))


def test_resets_are_shorter_than_what_they_answer_and_look_like_short_headers() -> None:
    pair = Pair()
    hub = pair.hub
    key = reset_key(pair.hub_tls.key)
    for size, want in (
        (RESET_MIN_BYTES, None),
        (RESET_MIN_BYTES + 1, RESET_MIN_BYTES),
        (30, 29),
        (1200, RESET_MAX_BYTES),
    ):
        cid = hub_cid(key, HUB_CID_BYTES)
        hub.receive_datagram(_short_header(cid, size), ADDR, pair.now)
        out = hub.datagrams_to_send(pair.now)
        if want is None:
            assert out == []  # a reset must be shorter, and no shorter than 21 bytes
            continue
        ((reset, addr),) = out
        assert addr == ADDR and len(reset) == want < size
        assert reset[0] & 0xC0 == 0x40  # short header, fixed bit set
        assert reset[-16:] == reset_token(key, cid)


def test_junk_and_connection_ids_the_hub_never_issued_get_no_reset() -> None:
    """No reflection: only a packet carrying an ID made with this hub's key is answered."""
    pair = Pair()
    other = reset_key(certs.make_hub_cert(pair.ca, pair.ca_key, ["localhost"])[1])
    for cid in (os.urandom(HUB_CID_BYTES), hub_cid(other, HUB_CID_BYTES), bytes(HUB_CID_BYTES)):
        pair.hub.receive_datagram(_short_header(cid, 200), ADDR, pair.now)
    for _ in range(50):
        pair.hub.receive_datagram(bytes([0x40]) + os.urandom(99), ADDR, pair.now)  # random
    assert pair.hub.datagrams_to_send(pair.now) == []
    assert pair.hub.counters["stateless_resets"] == 0
    assert pair.hub.counters["unknown_cid"] == 53


def test_a_long_header_packet_for_no_connection_gets_no_reset() -> None:
    pair = Pair()
    data = bytes([0xE0]) + (1).to_bytes(4, "big") + bytes([8]) + os.urandom(8) + bytes([0])
    pair.hub.receive_datagram(data + os.urandom(100), ADDR, pair.now)  # a stray Handshake packet
    assert pair.hub.datagrams_to_send(pair.now) == []
    assert pair.hub.counters["stateless_resets"] == 0


def test_resets_are_rate_limited_and_counted() -> None:
    pair = Pair()
    hub = HubEndpoint(pair.hub_tls, pair._session, _allow, HubLimits(stateless_resets_per_s=5))
    key = reset_key(pair.hub_tls.key)
    for _ in range(8):
        hub.receive_datagram(_short_header(hub_cid(key, HUB_CID_BYTES), 60), ADDR, pair.now)
    assert len(hub.datagrams_to_send(pair.now)) == 5
    assert hub.counters["stateless_resets"] == 5
    assert hub.counters["stateless_resets_limited"] == 3
    hub.receive_datagram(
        _short_header(hub_cid(key, HUB_CID_BYTES), 60), ADDR, pair.now + 1.0
    )  # a new second
    assert len(hub.datagrams_to_send(pair.now + 1.0)) == 1


def test_a_device_that_switches_to_a_new_connection_id_at_once_is_not_reset() -> None:
    """An ID the hub has just announced routes to its connection before the hub next reads
    that connection's events: a device may use it in its very next packet (RFC 9000 5.1)."""
    pair = Pair(SenderConfig(linger_s=0.0))
    edge_q: Any = pair.edge.quic
    receive = edge_q.receive_datagram
    switched: list[bytes] = []

    def receive_and_switch(data: bytes, addr: Any, now: float) -> None:
        receive(data, addr, now)
        if not switched and edge_q._peer_cid_available:
            edge_q.change_connection_id()  # the moment a spare ID arrives
            switched.append(edge_q._peer_cid.cid)

    edge_q.receive_datagram = receive_and_switch
    pair.run(pair.now + 1.0)
    for _ in range(3):
        pair.publish()
        pair.run(pair.now + 0.5)
    assert switched and pair.hub.counters["stateless_resets"] == 0
    assert not pair.edge.reset_by_hub and not pair.edge.closed
    assert pair.ledgers[1].lanes[LANE].committed == 3

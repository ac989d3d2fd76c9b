"""The edge endpoint's poll says whether the shell has anything to do.

The agent polls after every group commit; at telemetry rates most commits only add a
record to a batch that lingers, and the shell then skips its flush (sending, re-arming the
timer, reading events).  A real edge and hub endpoint pair (tests/unit/test_thin_stream_pto)
carries the records, so a poll that wrongly said "nothing" would leave them unsent.
"""

from __future__ import annotations

from tests.unit.test_thin_stream_pto import EDGE, LANE, Pair
from transport.batchcodec import Record
from transport.session import SenderConfig
from transport.wire import Lane


def _add(pair: Pair, lane: int = LANE) -> None:
    pair.seq += 1
    pair.outbox.add(
        lane, Record(pair.seq, pair.seq, "acme.truck-1.t", {}, {"n": pair.seq}), pair.now
    )


def _established(linger_s: float, batch: int) -> Pair:
    pair = Pair(SenderConfig(linger_s=linger_s, batch_max_records=batch))
    pair.run(pair.now + 1.0)  # handshake and WELCOME
    assert pair.edge.handshake_done and not pair.edge.datagrams_to_send(pair.now)
    return pair


def test_records_joining_a_lingering_batch_need_no_flush() -> None:
    """Driven as the agent drives it: after a poll that says nothing, the endpoint is not
    asked for datagrams and its timer is not read again; the timer armed before still
    sends every record on time."""
    pair = _established(linger_s=1.0, batch=100)
    t0 = pair.now
    _add(pair)
    assert pair.edge.poll(pair.now)  # the first record sets the linger deadline
    assert pair.edge.session.linger_at == t0 + 1.0
    assert not pair.edge.datagrams_to_send(pair.now)  # it lingers: nothing to send yet
    armed = pair.edge.get_timer()  # what the shell's flush arms
    assert armed is not None and armed <= t0 + 1.0
    for _ in range(3):
        pair.now += 0.1
        _add(pair)
        assert not pair.edge.poll(pair.now)  # joined the batch: the shell does nothing
    while armed < t0 + 1.0:  # QUIC's own timers (ACKs) due before the linger, as armed
        pair.now = armed
        pair.edge.handle_timer(pair.now)
        assert not pair.edge.datagrams_to_send(pair.now)
        armed = pair.edge.get_timer()
        assert armed is not None
    pair.now = armed  # the timer armed before the silent polls fires
    pair.edge.handle_timer(pair.now)
    sent = pair.edge.datagrams_to_send(pair.now)
    assert sent
    for data, _ in sent:  # straight to the hub; the harness carries the rest
        pair.hub.receive_datagram(data, EDGE, pair.now)
    pair.run(pair.now + 1.0)
    assert pair.ledgers[1].lanes[LANE].committed == 4  # all four, in the one batch


def test_a_full_batch_is_news() -> None:
    pair = _established(linger_s=1.0, batch=4)
    _add(pair)
    assert pair.edge.poll(pair.now)
    for _ in range(2):
        pair.now += 0.1
        _add(pair)
        assert not pair.edge.poll(pair.now)
    pair.now += 0.1
    _add(pair)  # the fourth fills the batch: it goes now
    assert pair.edge.poll(pair.now)
    assert pair.edge.datagrams_to_send(pair.now)


def test_a_critical_record_or_a_lapsed_linger_is_always_news() -> None:
    pair = _established(linger_s=1.0, batch=100)
    _add(pair)
    assert pair.edge.poll(pair.now)
    pair.now += 0.2
    _add(pair, int(Lane.CRITICAL))  # the critical lane does not linger
    assert pair.edge.poll(pair.now)
    assert pair.edge.datagrams_to_send(pair.now)
    pair.run(pair.now + 2.0)  # the telemetry linger lapses on the timer: sent and committed
    assert pair.ledgers[1].lanes[LANE].committed == 1
    assert pair.ledgers[1].lanes[int(Lane.CRITICAL)].committed == 2

"""Edge and hub session cores paired through a seeded fake link (no sockets, no sleeping)."""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

import pytest

from transport.batchcodec import Record
from transport.errors import ErrorCode
from transport.events import (
    Acked,
    BatchAccepted,
    HeartbeatReceived,
    HelloReceived,
    PeerError,
    SessionClosed,
    Welcomed,
)
from transport.memoutbox import MemoryOutbox
from transport.session import (
    CONTROL,
    DeviceLedger,
    EdgeSession,
    EdgeState,
    HubSession,
    HubSessionConfig,
    HubState,
    SenderConfig,
)
from transport.wire import (
    LANES,
    Credit,
    Data,
    Error,
    Heartbeat,
    Lane,
    decode_datagram,
    decode_frame,
    encode_frame,
    encode_heartbeat,
)


@dataclass
class FakeLink:
    """Seeded: every frame's fate (drop, duplicate, delay) comes from ``rng``."""

    rng: random.Random
    loss: float = 0.0
    dup: float = 0.0
    delay: tuple[float, float] = (0.01, 0.01)
    queue: list[tuple[float, int, str, int, bytes]] = field(default_factory=list)
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def send(self, now: float, to: str, channel: int, data: bytes) -> None:
        if self.rng.random() < self.loss:
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            at = now + self.rng.uniform(*self.delay)  # uniform delay: reorders
            heapq.heappush(self.queue, (at, next(self.counter), to, channel, data))

    def next_time(self) -> float | None:
        return self.queue[0][0] if self.queue else None

    def pop(self) -> tuple[float, str, int, bytes]:
        at, _, to, channel, data = heapq.heappop(self.queue)
        return at, to, channel, data


class Harness:
    """One edge and one hub; the hub commits in groups after ``commit_delay``."""

    def __init__(self, seed: int, *, loss: float, dup: float, reconnect_every: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.link = FakeLink(random.Random(seed + 1), loss, dup, (0.005, 0.08))
        self.outbox = MemoryOutbox()
        self.ledgers: dict[int, DeviceLedger] = {}
        self.log: list[tuple[int, int]] = []  # (lane, seq) in commit order
        self.pending: list[tuple[BatchAccepted, HubSession]] = []
        self.now = 0.0
        self.seq = 0
        self.reconnect_every = reconnect_every
        self.cfg = SenderConfig(batch_max_records=20, linger_s=0.02, rto_s=0.5, heartbeat_s=0.3)
        self.accepted_by_lane: dict[int, list[int]] = {int(x): [] for x in LANES}
        self.sessions = 0
        self.misbehaviour = 0
        self._connect()

    def _ledger(self, inc: int) -> DeviceLedger:
        return self.ledgers.setdefault(inc, DeviceLedger(inc))

    def _connect(self) -> None:
        if self.sessions:  # keep what the previous session saw of the misbehaving link
            self.misbehaviour += self.hub.duplicates + self.edge.retransmitted
        self.sessions += 1
        self.generation = self.sessions
        self.edge = EdgeSession(self.outbox, 7, self.now, self.cfg, stats=lambda: {"depth": 1})
        self.hub = HubSession(
            "acme", "t1", self._ledger, self.now, HubSessionConfig(window_records=200)
        )
        self.next_reconnect = self.now + self.reconnect_every if self.reconnect_every else None

    def publish(self, n: int) -> None:
        for _ in range(n):
            self.seq += 1
            lane = self.rng.choice(LANES)
            rec = Record(
                self.seq, int(self.now * 1e6), f"acme.t1.lane{int(lane)}", {}, {"v": self.seq}
            )
            self.outbox.add(lane, rec, self.now)
            self.accepted_by_lane[int(lane)].append(self.seq)
        self.edge.poll(self.now)

    def pump(self) -> None:
        gen = self.generation
        for channel, data in self.edge.frames_to_send():
            self.link.send(self.now, f"hub{gen}", channel, data)
        for data in self.edge.datagrams_to_send():
            self.link.send(self.now, f"hub{gen}", -2, data)
        self.hub.flush(self.now)
        for channel, data in self.hub.frames_to_send():
            self.link.send(self.now, f"edge{gen}", channel, data)
        while (ev := self.hub.next_event()) is not None:
            if isinstance(ev, BatchAccepted):
                self.pending.append((ev, self.hub))
        while (ev := self.edge.next_event()) is not None:
            if isinstance(ev, SessionClosed):
                self._connect()

    def commit(self) -> None:
        for ev, session in self.pending:
            ledger = self.ledgers[ev.incarnation]
            for r in ev.decoded():
                self.log.append((ev.lane, r.seq))
            ledger.lanes[ev.lane].committed = ev.last_seq
            session.on_committed(self.now)
        self.pending.clear()

    def deliver(self, to: str, channel: int, data: bytes) -> None:
        if to != f"hub{self.generation}" and to != f"edge{self.generation}":
            return  # a frame of a connection that no longer exists
        if to.startswith("hub"):
            if channel == -2:
                self.hub.receive_heartbeat(decode_datagram(data))
            else:
                self.hub.receive_frame(decode_frame(data), self.now, len(data))
        else:
            self.edge.receive_frame(decode_frame(data), self.now)

    def run(self, until: float, publish_every: float = 0.05, per_tick: int = 7) -> None:
        next_pub, next_commit = 0.0, 0.01
        while self.now < until or self.link.queue or self.pending or self._unacked():
            times = [
                next_commit,
                self.link.next_time(),
                self.edge.get_timer(),
                self.hub.get_timer(),
            ]
            if self.now < until:
                times.append(next_pub)
            if self.next_reconnect is not None and self.now < until:
                times.append(self.next_reconnect)
            t = min(x for x in times if x is not None)
            assert t >= self.now - 1e-9
            self.now = max(t, self.now)
            assert self.now < until + 120, "did not converge"
            if self.now < until and self.now >= next_pub:
                self.publish(per_tick)
                next_pub += publish_every
            if self.next_reconnect is not None and self.now >= self.next_reconnect:
                self._connect()
            while self.link.queue and self.link.queue[0][0] <= self.now:
                _, to, channel, data = self.link.pop()
                self.deliver(to, channel, data)
            if (timer := self.edge.get_timer()) is not None and timer <= self.now:
                self.edge.handle_timer(self.now)
            if (timer := self.hub.get_timer()) is not None and timer <= self.now:
                self.hub.handle_timer(self.now)
            if self.now >= next_commit:
                self.commit()
                next_commit = self.now + 0.01
            self.pump()

    def _unacked(self) -> bool:
        return any(self.outbox.depth(lane) for lane in LANES)


@pytest.mark.parametrize("seed", range(8))
def test_every_record_arrives_once_in_order_per_lane(seed: int) -> None:
    h = Harness(seed, loss=0.1, dup=0.1)
    h.run(until=10.0)
    assert len(h.log) == h.seq > 1000
    assert len(set(h.log)) == len(h.log), "a record was stored twice"
    for lane in LANES:
        got = [seq for ln, seq in h.log if ln == lane]
        assert got == h.accepted_by_lane[int(lane)], f"lane {lane} out of order or incomplete"
    seen = h.misbehaviour + h.hub.duplicates + h.edge.retransmitted
    assert seen > 0  # the link really did misbehave


@pytest.mark.parametrize("seed", range(4))
def test_reconnects_resend_exactly_what_the_hub_lacks(seed: int) -> None:
    h = Harness(100 + seed, loss=0.05, dup=0.05, reconnect_every=0.7)
    h.run(until=8.0)
    assert h.sessions > 5
    assert sorted(h.log) == sorted(set(h.log))
    assert len(h.log) == h.seq
    for lane in LANES:
        assert [s for ln, s in h.log if ln == lane] == h.accepted_by_lane[int(lane)]


def _handshake(edge: EdgeSession, hub: HubSession, now: float = 0.0) -> None:
    for _ in range(3):
        for _, data in edge.frames_to_send():
            hub.receive_frame(decode_frame(data), now, len(data))
        hub.flush(now)
        for _, data in hub.frames_to_send():
            edge.receive_frame(decode_frame(data), now)


def test_welcome_tells_the_edge_what_to_drop() -> None:
    outbox = MemoryOutbox()
    for i in range(1, 11):
        outbox.add(Lane.TELEMETRY, Record(i, 0, "acme.t1.x"), 0.0)
    ledger = DeviceLedger(5)
    ledger.lanes[Lane.TELEMETRY].committed = ledger.lanes[Lane.TELEMETRY].accepted = 6
    hub = HubSession("acme", "t1", lambda inc: ledger, 0.0)
    edge = EdgeSession(outbox, 5, 0.0, SenderConfig(linger_s=0))
    # nothing sent yet but HELLO; WELCOME says the hub holds 1..6
    for _, data in edge.frames_to_send():
        hub.receive_frame(decode_frame(data), 0.0)
    for _, data in hub.frames_to_send():
        edge.receive_frame(decode_frame(data), 0.0)
    assert any(isinstance(e, Welcomed) for e in iter(edge.next_event, None))
    sent = [decode_frame(d) for _, d in edge.frames_to_send()]
    assert [(f.first_seq, f.count) for f in sent if isinstance(f, Data)] == [(7, 4)]
    assert outbox.depth(Lane.TELEMETRY) == 4


def test_subject_outside_prefix_is_refused_with_a_code() -> None:
    outbox = MemoryOutbox()
    outbox.add(Lane.BULK, Record(1, 0, "other.t9.log"), 0.0)
    hub = HubSession("acme", "t1", DeviceLedger, 0.0)
    edge = EdgeSession(outbox, 1, 0.0, SenderConfig(linger_s=0))
    _handshake(edge, hub)
    assert hub.state is HubState.CLOSED
    closed = [e for e in iter(hub.next_event, None) if isinstance(e, SessionClosed)]
    assert closed[0].code is ErrorCode.SUBJECT_FORBIDDEN
    errors = [e for e in iter(edge.next_event, None) if isinstance(e, PeerError)]
    assert errors and errors[0].code is ErrorCode.SUBJECT_FORBIDDEN


@dataclass
class Paced:
    """What a rate-limited device sent: (time, records, wire bytes, last seq) per DATA frame."""

    sent: list[tuple[float, int, int, int]]
    hub: HubSession
    edge: EdgeSession
    ledger: DeviceLedger
    closed: list[SessionClosed]

    def records(self, since: float = 0.0) -> int:
        return sum(n for t, n, _, _ in self.sent if t >= since)

    def wire_bytes(self, since: float = 0.0) -> int:
        return sum(b for t, _, b, _ in self.sent if t >= since)

    def assert_nothing_dropped(self) -> None:
        """Slowed, never refused: both sessions up, the hub accepted every seq sent."""
        assert self.closed == []
        assert self.hub.state is HubState.ESTABLISHED and self.edge.state is EdgeState.ESTABLISHED
        last_sent = max(last for _, _, _, last in self.sent)
        assert self.ledger.lanes[int(Lane.TELEMETRY)].accepted == last_sent
        assert self.hub.duplicates == 0 and self.hub.out_of_order == 0


def pace(cfg: HubSessionConfig, seconds: float, body_bytes: int = 0) -> Paced:
    """A device with 20,000 records spooled against a rate-limited hub, for ``seconds``."""
    rng = random.Random(5)
    outbox = MemoryOutbox()
    for i in range(1, 20_001):
        body = rng.randbytes(body_bytes) if body_bytes else None
        outbox.add(Lane.TELEMETRY, Record(i, 0, "acme.t1.x", {}, body), 0.0)
    ledger = DeviceLedger(1)
    hub = HubSession("acme", "t1", lambda inc: ledger, 0.0, cfg)
    edge = EdgeSession(outbox, 1, 0.0, SenderConfig(linger_s=0, window_records=5000))
    out = Paced([], hub, edge, ledger, [])
    now = 0.0
    while now < seconds:
        for _, data in edge.frames_to_send():
            f = decode_frame(data)
            if isinstance(f, Data):
                out.sent.append((now, f.count, len(data), f.last_seq))
            hub.receive_frame(f, now, len(data))
        for ev in iter(hub.next_event, None):
            if isinstance(ev, BatchAccepted):
                ledger.lanes[ev.lane].committed = ev.last_seq
            elif isinstance(ev, SessionClosed):
                out.closed.append(ev)
        hub.on_committed(now)
        for _, data in hub.frames_to_send():
            edge.receive_frame(decode_frame(data), now)
        now += 0.01
        if (t := hub.get_timer()) is not None and t <= now:
            hub.handle_timer(now)
        edge.poll(now)
    return out


def test_credit_withheld_by_rate_limit_then_granted() -> None:
    cfg = HubSessionConfig(window_records=500, records_per_s=1000, burst_s=1.0)
    paced = pace(cfg, 5.0)
    # 1,000 records/s, a 1 s burst, the initial 0-RTT credit: never beyond that
    assert paced.records() <= 1024 + 1000 + 5 * 1000
    # ... and paced rather than stopped: about the rate from t=2 s to t=5 s
    assert 2400 <= paced.records(since=2.0) <= 3600
    paced.assert_nothing_dropped()


def test_credit_withheld_by_byte_rate_limit_then_granted() -> None:
    rate, seconds, window = 20_000, 20.0, 100
    cfg = HubSessionConfig(window_records=window, bytes_per_s=rate, burst_s=1.0)
    paced = pace(cfg, seconds, body_bytes=100)
    per_record = paced.wire_bytes() / paced.records()
    # the initial 0-RTT credit, a 1 s burst, the rate, and one window granted into debt
    assert paced.wire_bytes() <= (1024 + window) * per_record + rate * (1 + seconds)
    # ... and paced rather than stopped: about the byte rate once the initial credit is used
    late = paced.wire_bytes(since=5.0)
    assert 0.8 * rate * (seconds - 5) <= late <= 1.2 * rate * (seconds - 5)
    paced.assert_nothing_dropped()


def test_edge_gives_up_without_welcome() -> None:
    edge = EdgeSession(MemoryOutbox(), 1, 0.0, SenderConfig(welcome_timeout_s=2.0))
    assert edge.get_timer() == 2.0
    edge.handle_timer(2.0)
    assert edge.state is EdgeState.CLOSED
    ev = [e for e in iter(edge.next_event, None) if isinstance(e, SessionClosed)]
    assert ev[0].code is ErrorCode.IDLE_TIMEOUT


def test_edge_sends_data_before_welcome_for_zero_rtt() -> None:
    outbox = MemoryOutbox()
    outbox.add(Lane.CRITICAL, Record(1, 0, "acme.t1.alarm"), 0.0)
    edge = EdgeSession(outbox, 1, 0.0, SenderConfig(linger_s=0))
    edge.poll(0.0)
    frames = [(c, decode_frame(d)) for c, d in edge.frames_to_send()]
    assert frames[0][0] == CONTROL
    assert any(isinstance(f, Data) for _, f in frames[1:])


def test_describe_says_what_the_sender_waits_for() -> None:
    outbox = MemoryOutbox()
    outbox.add(Lane.CRITICAL, Record(1, 0, "acme.t1.alarm"), 0.0)
    outbox.add(Lane.CRITICAL, Record(2, 0, "acme.t1.alarm"), 0.0)
    edge = EdgeSession(outbox, 1, 0.0, SenderConfig(linger_s=0))
    edge.poll(0.0)
    text = edge.describe()
    assert text.startswith("HELLO_SENT, credit 2/")
    assert "critical: sent up to 2, 2 in flight" in text
    assert "bulk: sent up to 0, 0 in flight" in text


def test_ack_trims_spool_and_reports() -> None:
    outbox = MemoryOutbox()
    outbox.add(Lane.BULK, Record(1, 0, "acme.t1.log"), 0.0)
    ledger = DeviceLedger(3)
    hub = HubSession("acme", "t1", lambda inc: ledger, 0.0)
    edge = EdgeSession(outbox, 3, 0.0, SenderConfig(linger_s=0))
    _handshake(edge, hub)
    accepted = [e for e in iter(hub.next_event, None) if isinstance(e, BatchAccepted)]
    assert accepted and accepted[0].decoded()[0].subject == "acme.t1.log"
    ledger.lanes[Lane.BULK].committed = 1
    hub.on_committed(0.1)
    for _, data in hub.frames_to_send():
        edge.receive_frame(decode_frame(data), 0.1)
    assert outbox.depth(Lane.BULK) == 0
    assert any(isinstance(e, Acked) for e in iter(edge.next_event, None))


def test_frame_encode_is_stable() -> None:
    # the same Data frame always encodes to the same bytes (retransmits reuse them)
    d = Data(1, 0, 1, 1, 1, 0, b"x")
    assert encode_frame(d) == encode_frame(d)


def test_hub_that_lost_acked_data_says_so_in_hello() -> None:
    outbox = MemoryOutbox()
    outbox.acked(Lane.TELEMETRY, 40)  # the edge was told 1..40 are committed
    edge = EdgeSession(outbox, 9, 0.0, SenderConfig(linger_s=0))
    ledger = DeviceLedger(9)
    ledger.lanes[Lane.TELEMETRY].committed = ledger.lanes[Lane.TELEMETRY].accepted = 25
    hub = HubSession("acme", "t1", lambda inc: ledger, 0.0)
    for _, data in edge.frames_to_send():
        hub.receive_frame(decode_frame(data), 0.0)
    hellos = [e for e in iter(hub.next_event, None) if isinstance(e, HelloReceived)]
    assert hellos[0].behind == {Lane.TELEMETRY: (40, 25)}


def _arrive_from_another_hub(trust: bool) -> tuple[HubSession, list[object], DeviceLedger]:
    """A device whose edge was told 1..40 are stored (by another hub) sends 41..50 here."""
    outbox = MemoryOutbox()
    for i in range(1, 51):
        outbox.add(Lane.TELEMETRY, Record(i, 0, "acme.t1.x"), 0.0)
    outbox.acked(Lane.TELEMETRY, 40)
    edge = EdgeSession(outbox, 9, 0.0, SenderConfig(linger_s=0))
    ledger = DeviceLedger(9)  # this hub has never seen the device
    hub = HubSession("acme", "t1", lambda inc: ledger, 0.0, HubSessionConfig(trust_edge_acks=trust))
    _handshake(edge, hub)
    return hub, list(iter(hub.next_event, None)), ledger


def test_a_hub_sharing_its_log_trusts_the_edges_acks() -> None:
    hub, events, ledger = _arrive_from_another_hub(trust=True)
    accepted = [e for e in events if isinstance(e, BatchAccepted)]
    assert [(b.first_seq, b.last_seq) for b in accepted] == [(41, 50)]
    (hello,) = [e for e in events if isinstance(e, HelloReceived)]
    assert hello.behind == {}  # no false "this hub lost acked data" alarm
    assert hub.out_of_order == 0
    assert ledger.lanes[Lane.TELEMETRY].committed == 40  # 41..50 wait for their commit


def test_without_trust_a_device_from_another_hub_raises_a_false_alarm() -> None:
    _, events, _ = _arrive_from_another_hub(trust=False)
    (hello,) = [e for e in events if isinstance(e, HelloReceived)]
    assert hello.behind == {Lane.TELEMETRY: (40, 0)}
    accepted = [e for e in events if isinstance(e, BatchAccepted)]
    assert [(b.first_seq, b.last_seq) for b in accepted] == [(41, 50)]


def test_what_is_half_due_rides_a_batch_that_goes_out_anyway() -> None:
    """A full telemetry batch leaves at once; the bulk lane's records, lingering for more
    than half their linger, and a heartbeat more than half due go with it (one packet, not
    three).  Records lingering for less than half stay for their own batch."""
    outbox = MemoryOutbox()
    cfg = SenderConfig(batch_max_records=5, linger_s=1.0, heartbeat_s=10.0)
    hub = HubSession("acme", "t1", DeviceLedger, 0.0)
    edge = EdgeSession(outbox, 1, 0.0, cfg, lambda: {"q": 0})
    _handshake(edge, hub)
    edge.handle_timer(0.0)  # the first heartbeat is due at once
    assert len(edge.datagrams_to_send()) == 1
    outbox.add(Lane.BULK, Record(1, 0, "acme.t1.log"), 6.0)
    edge.poll(6.0)
    assert [f for _, f in edge.frames_to_send()] == []  # bulk lingers: 1 record, not 5
    for seq in range(1, 6):
        outbox.add(Lane.TELEMETRY, Record(seq, 0, "acme.t1.gps"), 6.6)
    edge.poll(6.6)  # telemetry is full: it goes; bulk has lingered 0.6 s of 1 s
    sent = [decode_frame(d) for _, d in edge.frames_to_send()]
    assert sorted((f.lane, f.count) for f in sent if isinstance(f, Data)) == [
        (Lane.TELEMETRY, 5),
        (Lane.BULK, 1),
    ]
    assert len(edge.datagrams_to_send()) == 1  # the heartbeat due at 10 s, 6.6 s in
    outbox.add(Lane.BULK, Record(2, 0, "acme.t1.log"), 6.7)
    for seq in range(6, 11):
        outbox.add(Lane.TELEMETRY, Record(seq, 0, "acme.t1.gps"), 6.8)
    edge.poll(6.8)  # bulk has lingered 0.1 s: it waits; the heartbeat was just sent
    sent = [decode_frame(d) for _, d in edge.frames_to_send()]
    assert [(f.lane, f.count) for f in sent if isinstance(f, Data)] == [(Lane.TELEMETRY, 5)]
    assert edge.datagrams_to_send() == []
    assert edge.get_timer() == pytest.approx(7.7)  # bulk's own linger


def test_a_slow_hub_gets_fewer_fuller_batches() -> None:
    """Self-clocking: with two small batches unacknowledged, a third lingered-out one waits
    for an ACK and then goes with everything that came meanwhile (one packet, not four);
    a full batch and the critical lane never wait."""
    outbox = MemoryOutbox()
    cfg = SenderConfig(batch_max_records=5, linger_s=1.0, small_batches_in_flight=2)
    ledger = DeviceLedger(1)
    hub = HubSession("acme", "t1", lambda inc: ledger, 0.0)
    edge = EdgeSession(outbox, 1, 0.0, cfg)
    _handshake(edge, hub)

    def data_sent() -> list[tuple[int, int]]:
        return [
            (f.lane, f.count)
            for f in (decode_frame(d) for _, d in edge.frames_to_send())
            if isinstance(f, Data)
        ]

    for seq, t in ((1, 0.0), (2, 1.0)):  # one record a second, each lingers out alone
        outbox.add(Lane.TELEMETRY, Record(seq, 0, "acme.t1.gps"), t)
        edge.poll(t + 1.0)
        assert data_sent() == [(Lane.TELEMETRY, 1)]
    for seq in (3, 4, 5):  # the hub is slow: nothing acknowledged yet
        outbox.add(Lane.TELEMETRY, Record(seq, 0, "acme.t1.gps"), seq - 1.0)
        edge.poll(seq)
        assert data_sent() == []
        assert edge.get_timer() is None or edge.get_timer() >= 15.0  # no linger timer spin
    assert edge.held_small == 1  # one batch (3, 4, 5) held, however many polls
    outbox.add(Lane.CRITICAL, Record(6, 0, "acme.t1.alarm"), 5.0)
    edge.poll(5.0)
    assert data_sent() == [(Lane.CRITICAL, 1)]  # an alarm never waits
    for seq in range(7, 10):  # telemetry fills up (3, 4, 5, 7, 8): it goes without an ACK
        outbox.add(Lane.TELEMETRY, Record(seq, 0, "acme.t1.gps"), 5.0)
    edge.poll(5.0)
    assert data_sent() == [(Lane.TELEMETRY, 5)]
    outbox.add(Lane.TELEMETRY, Record(10, 0, "acme.t1.gps"), 5.0)
    edge.poll(6.5)
    assert data_sent() == []  # three batches in flight: 9 and 10, lingered out, wait
    assert edge.held_small == 2
    ledger.lanes[Lane.TELEMETRY].committed = 2  # the hub commits and acknowledges 1..2
    hub.on_committed(6.6)
    for _, data in hub.frames_to_send():
        edge.receive_frame(decode_frame(data), 6.6)  # the ACK polls the sender
    assert data_sent() == [(Lane.TELEMETRY, 2)]  # 9 and 10 in one batch


@pytest.mark.parametrize("ack_live_session", [True, False])
def test_a_device_that_reconnected_mid_commit_hears_the_ack_on_its_new_session(
    ack_live_session: bool,
) -> None:
    """Session 1 hands a batch to the group commit and dies; session 2 resends it (a
    duplicate of records not yet durable: nothing durable to ACK yet).  When the group
    commits, the device's current session is acknowledged too (GroupCommit.committed with
    the shell's live sessions); without that, the edge waits for its RTO."""
    from hub.ingest import Accepted, GroupCommit

    outbox = MemoryOutbox()
    for seq in (1, 2, 3):
        outbox.add(Lane.TELEMETRY, Record(seq, 0, "acme.t1.gps"), 0.0)
    ledger = DeviceLedger(1)
    group: GroupCommit[str] = GroupCommit()
    hubs: dict[str, HubSession] = {}

    def connect(name: str, now: float) -> EdgeSession:
        hubs[name] = HubSession("acme", "t1", lambda inc: ledger, now)
        edge = EdgeSession(outbox, 1, now, SenderConfig(linger_s=0))
        _handshake(edge, hubs[name], now)
        for ev in iter(hubs[name].next_event, None):
            if isinstance(ev, BatchAccepted):
                group.add(Accepted(name, "acme", "t1", ledger, ev, now), now)
        return edge

    connect("s1", 0.0)  # 1..3 accepted by session 1, its commit pending
    edge2 = connect("s2", 1.0)  # session 1 is gone; session 2 resent 1..3: duplicates
    assert len(group) == 1 and hubs["s2"].duplicates == 3
    live = {("acme", "t1"): "s2"} if ack_live_session else None
    keys = GroupCommit.committed(group.take(), live)
    assert keys == (["s1", "s2"] if ack_live_session else ["s1"])
    for key in keys:
        hubs[key].on_committed(2.0)
    for _, data in hubs["s2"].frames_to_send():
        edge2.receive_frame(decode_frame(data), 2.0)
    assert outbox.depth(Lane.TELEMETRY) == (0 if ack_live_session else 3)


def test_without_self_clocking_every_linger_sends() -> None:
    outbox = MemoryOutbox()
    cfg = SenderConfig(batch_max_records=5, linger_s=1.0, small_batches_in_flight=0)
    hub = HubSession("acme", "t1", DeviceLedger, 0.0)
    edge = EdgeSession(outbox, 1, 0.0, cfg)
    _handshake(edge, hub)
    sent = 0
    for seq in range(1, 6):
        outbox.add(Lane.TELEMETRY, Record(seq, 0, "acme.t1.gps"), seq - 1.0)
        edge.poll(float(seq))
        sent += sum(isinstance(decode_frame(d), Data) for _, d in edge.frames_to_send())
    assert sent == 5 and edge.held_small == 0


# what the edge agent's heartbeat holds (edge/agent.py _heartbeat_stats), credit-blocked
AGENT_HEARTBEAT = {
    "d": {"0": [0, 0], "1": [12, 3400], "2": [0, 0]},
    "age": {"1": 0.4},
    "seq": 1234,
    "drop": {"bulk": {"spool-full": 3}, "critical": {"refused-spool-full": 1}},
    "rtt_ms": 41.5,
    "loss": 0.012,
    "rc": 2,
    "cb": 1,
}


def _heartbeat_to_hub(stats: dict[object, object]) -> tuple[HubSession, list[object]]:
    """An established hub session given one heartbeat; its events after the handshake."""
    hub = HubSession("acme", "t1", DeviceLedger, 0.0)
    edge = EdgeSession(MemoryOutbox(), 1, 0.0, SenderConfig(linger_s=0))
    _handshake(edge, hub)
    list(iter(hub.next_event, None))
    hub.receive_heartbeat(decode_datagram(encode_heartbeat(Heartbeat(stats))))
    return hub, list(iter(hub.next_event, None))


def test_the_agents_heartbeat_is_taken() -> None:
    hub, events = _heartbeat_to_hub(dict(AGENT_HEARTBEAT))
    assert hub.state is HubState.ESTABLISHED
    assert events == [HeartbeatReceived(AGENT_HEARTBEAT)]
    assert any(isinstance(decode_frame(d), Credit) for _, d in hub.frames_to_send())  # "cb"


@pytest.mark.parametrize(
    ("stats", "why"),
    [
        ({"seq": b"\x00\x01"}, "a bytes value"),
        ({"d": {"1": [1, b"x"]}}, "a bytes value"),
        ({b"k": "bytes key"}, "a bytes key"),  # (int keys: the decoder refuses them itself)
        ({"d": {b"2": [0, 0]}}, "a bytes key"),
        ({"a": {"b": {"c": {"d": 1}}}}, "nested deeper than 3"),
        ({"a": [[[1]]]}, "nested deeper than 3"),
        ({"n": list(range(200))}, "more than 128 items"),
        ({"s": "x" * 300}, "a string of 300 characters"),
        ({"k" * 300: 1}, "a key of 300 characters"),
    ],
)
def test_a_malformed_heartbeat_fails_its_session_with_bad_field(
    stats: dict[object, object], why: str
) -> None:
    hub, events = _heartbeat_to_hub(stats)
    assert hub.state is HubState.CLOSED
    assert not any(isinstance(e, HeartbeatReceived) for e in events)
    (closed,) = [e for e in events if isinstance(e, SessionClosed)]
    assert closed.code is ErrorCode.BAD_FIELD and why in closed.reason
    errors = [decode_frame(d) for _, d in hub.frames_to_send()]
    assert [(e.code, e.reason) for e in errors if isinstance(e, Error)] == [
        (ErrorCode.BAD_FIELD, closed.reason)
    ]

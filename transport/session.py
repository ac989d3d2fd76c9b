"""Session state machines for both ends of a Squall connection (sans-I/O: frames and ``now`` in).

The edge core turns spooled records into DATA batches per lane (critical first),
keeps a window of unacknowledged batches, retransmits on timeout and trims the
spool only on ACK.  The hub core answers HELLO with what it holds (WELCOME), checks
and de-duplicates batches, hands new records to ingest and acknowledges only what
ingest reports committed; it paces the edge with cumulative CREDIT.

Lane order: each batch names the lane's previous seq (``after``).  The hub accepts a
batch only if it holds everything up to ``after``, so records reach the log in seq
order per lane even over a link that reorders; a batch past a gap is dropped and the
edge's retransmission fills the gap.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from transport.batchcodec import Record, decode_batch, encode_batch, validate_batch
from transport.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    WireError,
)
from transport.events import (
    Acked,
    BatchAccepted,
    DuplicatesSkipped,
    HeartbeatReceived,
    HelloReceived,
    PeerError,
    SessionClosed,
    SessionEvent,
    Welcomed,
)
from transport.limits import INITIAL_CREDIT, MAX_BATCH_RECORDS
from transport.wire import (
    LANES,
    Ack,
    Credit,
    Data,
    Error,
    Frame,
    Heartbeat,
    Hello,
    Lane,
    Welcome,
    encode_frame,
    encode_heartbeat,
)

CONTROL = -1  # channel id of the control stream; lanes use their Lane value


class Outbox(Protocol):
    """What the edge session needs from the spool."""

    def acked_mark(self, lane: int) -> int:
        """Highest seq the edge knows the hub holds in ``lane``."""

    def pending_info(self, lane: int, after: int) -> tuple[int, float | None]:
        """(count, accept time of the oldest) of records in ``lane`` with seq > ``after``."""

    def pending(self, lane: int, after: int, limit: int) -> list[Record]:
        """Up to ``limit`` records of ``lane`` with seq > ``after``, in seq order."""

    def acked(self, lane: int, upto: int) -> None:
        """The hub holds ``lane`` up to ``upto``: trim the spool."""


@dataclass(slots=True)
class SenderConfig:
    """Batching and windowing knobs of the edge session."""

    batch_max_records: int = 100
    linger_s: float = 0.05  # telemetry and bulk wait this long for a batch to fill
    critical_linger_s: float = 0.0  # an alarm goes out at once
    window_records: int = 2000  # unacknowledged records per lane
    # Self-clocked batching (after Nagle): a telemetry or bulk batch that is not full waits
    # while this many batches of its lane are unacknowledged, and goes when an ACK comes
    # back, with everything that arrived meanwhile.  A hub or link slower than the linger
    # so gets fewer, fuller batches instead of a packet per linger (at a hub's saturation,
    # packets, not records, are the cost).  Full batches and the critical lane never wait.
    # 0: off.
    small_batches_in_flight: int = 2
    rto_s: float = 15.0  # retransmit safety net; QUIC streams are reliable within a connection
    rto_max_s: float = 60.0
    heartbeat_s: float = 10.0
    welcome_timeout_s: float = 15.0  # no WELCOME by then: the session is dead, reconnect
    # Nothing at all from the hub for this long (it echoes CREDIT on every heartbeat): the
    # hub is gone (crashed, restarted, or the path died) — close and reconnect.  0: 3 heartbeats.
    hub_silence_s: float = 0.0
    compress: bool = True


@dataclass(slots=True)
class _Inflight:
    after: int
    first: int
    last: int
    count: int
    frame: bytes
    sent_at: float


@dataclass(slots=True)
class _EdgeLane:
    cursor: int  # last seq put on the wire (or the chain base)
    inflight: deque[_Inflight] = field(default_factory=deque)
    rto: float = 0.0
    inflight_records: int = 0  # sum of the batches' counts, kept with ``inflight``
    held: bool = False  # a lingered-out small batch waits for an ACK (self-clocking)


class EdgeState(Enum):
    """Edge session states."""

    HELLO_SENT = "hello-sent"
    ESTABLISHED = "established"
    CLOSED = "closed"


class _Core:
    """Output queues and the event queue shared by both session cores."""

    def __init__(self) -> None:
        self._frames: list[tuple[int, bytes]] = []
        self._datagrams: list[bytes] = []
        # a list, not a deque: it holds one or two events at a time, and an empty deque
        # costs ~760 bytes per idle session
        self._events: list[SessionEvent] = []

    def frames_to_send(self) -> list[tuple[int, bytes]]:
        """(channel, frame bytes) to write, in order; channel is CONTROL or a lane."""
        out, self._frames = self._frames, []
        return out

    def datagrams_to_send(self) -> list[bytes]:
        """Heartbeat datagrams to send (best effort)."""
        out, self._datagrams = self._datagrams, []
        return out

    def next_event(self) -> SessionEvent | None:
        """The next event for the shell, or None."""
        return self._events.pop(0) if self._events else None

    def _send(self, channel: int, frame: Frame) -> None:
        self._frames.append((channel, encode_frame(frame)))


class EdgeSession(_Core):
    """One connection's worth of sending from the spool to the hub."""

    def __init__(
        self,
        outbox: Outbox,
        incarnation: int,
        now: float,
        config: SenderConfig | None = None,
        stats: Callable[[], dict[str, Any]] | None = None,
        agent: str = "squall-edge",
    ) -> None:
        super().__init__()
        self.config = config or SenderConfig()
        self.state = EdgeState.HELLO_SENT
        self._outbox = outbox
        self._stats = stats
        self.incarnation = incarnation
        self._lanes = {lane: _EdgeLane(outbox.acked_mark(lane)) for lane in LANES}
        for lane in self._lanes.values():
            lane.rto = self.config.rto_s
        self._credit = INITIAL_CREDIT
        self._sent_new = 0
        self._linger_at: float | None = None
        self._next_heartbeat = now
        self._welcome_deadline = now + self.config.welcome_timeout_s
        self._last_heard = now
        self._silence_s = self.config.hub_silence_s or 3 * self.config.heartbeat_s
        self.retransmitted = 0
        self.held_small = 0  # small batches that waited for an ACK (self-clocking)
        acked = {int(k): v.cursor for k, v in self._lanes.items() if v.cursor}
        hb_ms = int(self.config.heartbeat_s * 1000)
        self._send(CONTROL, Hello(incarnation, agent, hb_ms, acked))

    # -- input ---------------------------------------------------------------

    def receive_frame(self, frame: Frame, now: float) -> None:
        """A frame from the hub on the control stream."""
        if self.state is EdgeState.CLOSED:
            return
        self._last_heard = now
        try:
            self._on_frame(frame, now)
        except ProtocolError as exc:
            self._fail(exc.code, exc.reason)

    def _on_frame(self, frame: Frame, now: float) -> None:
        if isinstance(frame, Welcome):
            self._on_welcome(frame, now)
        elif isinstance(frame, Ack):
            if self.state is EdgeState.ESTABLISHED:  # an ACK overtaking WELCOME is stale anyway
                for lane, upto in frame.held.items():
                    self._on_ack(lane, upto)
        elif isinstance(frame, Credit):
            self._credit = max(self._credit, frame.limit)
        elif isinstance(frame, Error):
            self._events.append(PeerError(frame.code, frame.reason, frame.retry_after_ms))
        else:
            raise RemoteProtocolError(
                ErrorCode.PROTOCOL_VIOLATION, f"hub sent {type(frame).__name__}"
            )
        self.poll(now)

    def _on_welcome(self, w: Welcome, now: float) -> None:
        if self.state is not EdgeState.HELLO_SENT:
            return  # the hub repeats WELCOME when it sees HELLO again; the first one counts
        if w.incarnation != self.incarnation:
            raise RemoteProtocolError(
                ErrorCode.PROTOCOL_VIOLATION, "WELCOME for another incarnation"
            )
        self.state = EdgeState.ESTABLISHED
        self._credit = w.credit
        for lane_id, lane in self._lanes.items():
            held = w.held.get(lane_id, 0)
            self._on_ack(lane_id, held)
            chain_start = lane.inflight[0].after if lane.inflight else lane.cursor
            if held < chain_start:
                # The hub holds less than we sent against (it lost data or is another
                # hub): restart this lane's chain from what it holds.
                lane.inflight.clear()
                lane.inflight_records = 0
                lane.cursor = held
        self._next_heartbeat = now
        self._events.append(Welcomed(dict(w.held), w.credit, w.hub_time_us))

    def _on_ack(self, lane_id: int, upto: int) -> None:
        lane = self._lanes.get(lane_id)  # type: ignore[call-overload]
        if lane is None:
            return
        acked = 0
        while lane.inflight and lane.inflight[0].last <= upto:
            done = lane.inflight.popleft().count
            lane.inflight_records -= done
            acked += done
            lane.rto = self.config.rto_s
        if upto > self._outbox.acked_mark(lane_id):
            self._outbox.acked(lane_id, upto)
            self._events.append(Acked(lane_id, upto, acked))
        if not lane.inflight:
            lane.cursor = max(lane.cursor, upto)

    # -- output --------------------------------------------------------------

    def poll(self, now: float) -> None:
        """Put whatever the window, credit and linger allow on the wire, critical lane first."""
        if self.state is EdgeState.CLOSED:
            return
        self._linger_at = None
        frames = len(self._frames)
        for lane_id in LANES:
            self._fill_lane(lane_id, self._lanes[lane_id], now)
        if len(self._frames) > frames:
            # A packet goes out anyway: what is at least half due rides it instead of
            # costing a packet of its own later -- other lanes' lingering records, and the
            # heartbeat.
            self._linger_at = None
            for lane_id in LANES:
                self._fill_lane(lane_id, self._lanes[lane_id], now, 0.5)
            if now >= self._next_heartbeat - self.config.heartbeat_s / 2:
                self._heartbeat(now)

    def _fill_lane(
        self, lane_id: int, lane: _EdgeLane, now: float, linger_share: float = 1.0
    ) -> None:
        cfg = self.config
        while True:
            room = min(
                cfg.window_records - lane.inflight_records,
                self._credit - self._sent_new,
                cfg.batch_max_records,
                MAX_BATCH_RECORDS,
            )
            if room <= 0:
                return
            count, oldest = self._outbox.pending_info(lane_id, lane.cursor)
            if count == 0 or oldest is None:
                return
            critical = lane_id == Lane.CRITICAL
            linger = cfg.critical_linger_s if critical else cfg.linger_s
            if count < min(room, cfg.batch_max_records):
                if now < oldest + linger * linger_share:
                    due = oldest + linger
                    self._linger_at = due if self._linger_at is None else min(self._linger_at, due)
                    return
                if (
                    not critical
                    and cfg.small_batches_in_flight
                    and len(lane.inflight) >= cfg.small_batches_in_flight
                ):
                    if not lane.held:  # counted once per batch, not per poll
                        self.held_small += 1
                        lane.held = True
                    return  # the next ACK polls again (and the lane's RTO covers a lost one)
            records = self._outbox.pending(lane_id, lane.cursor, room)
            if not records:
                return
            self._send_batch(lane_id, lane, records, now)

    def _send_batch(self, lane_id: int, lane: _EdgeLane, records: list[Record], now: float) -> None:
        try:
            codec, payload = encode_batch(records, compress=self.config.compress)
        except WireError as exc:
            if exc.code is not ErrorCode.LIMIT_EXCEEDED or len(records) == 1:
                raise
            half = len(records) // 2  # large records: split until a batch fits the limit
            self._send_batch(lane_id, lane, records[:half], now)
            self._send_batch(lane_id, lane, records[half:], now)
            return
        first, last = records[0].seq, records[-1].seq
        data = Data(lane_id, lane.cursor, first, last, len(records), codec, payload, self._sent_new)
        frame = encode_frame(data)
        lane.held = False
        lane.inflight.append(
            _Inflight(lane.cursor, records[0].seq, records[-1].seq, len(records), frame, now)
        )
        lane.inflight_records += len(records)
        lane.cursor = records[-1].seq
        self._sent_new += len(records)
        self._frames.append((lane_id, frame))

    # -- timers --------------------------------------------------------------

    @property
    def linger_at(self) -> float | None:
        """When the earliest lingering batch is due (set by ``poll``), or None."""
        return self._linger_at

    def get_timer(self) -> float | None:
        """The one deadline this core needs, or None."""
        if self.state is EdgeState.CLOSED:
            return None
        times = [b.inflight[0].sent_at + b.rto for b in self._lanes.values() if b.inflight]
        if self._linger_at is not None:
            times.append(self._linger_at)
        if self.state is EdgeState.ESTABLISHED and self._stats is not None:
            times.append(self._next_heartbeat)
        if self.state is EdgeState.HELLO_SENT:
            times.append(self._welcome_deadline)
        if self.state is EdgeState.ESTABLISHED and self._stats is not None:
            times.append(self._silence_deadline())
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Retransmit overdue batches, send a due heartbeat, flush lingering batches."""
        if self.state is EdgeState.CLOSED:
            return
        if self.state is EdgeState.HELLO_SENT and now >= self._welcome_deadline:
            self.close(ErrorCode.IDLE_TIMEOUT, "no WELCOME from the hub")
            return
        # the same expression as in get_timer, so a due timer always fires (float rounding)
        if self.state is EdgeState.ESTABLISHED and self._stats and now >= self._silence_deadline():
            silent = now - self._last_heard
            self.close(ErrorCode.IDLE_TIMEOUT, f"nothing from the hub for {silent:.0f} s")
            return
        for lane_id, lane in self._lanes.items():
            if lane.inflight and now >= lane.inflight[0].sent_at + lane.rto:
                self._retransmit(lane_id, lane, now)
        if now >= self._next_heartbeat:
            self._heartbeat(now)
        self.poll(now)

    def _heartbeat(self, now: float) -> None:
        if self.state is not EdgeState.ESTABLISHED or not self._stats:
            return
        stats = self._stats()
        if self.credit_blocked():
            stats["cb"] = 1
        self._datagrams.append(encode_heartbeat(Heartbeat(stats)))
        self._next_heartbeat = now + self.config.heartbeat_s

    def heard(self, now: float) -> None:
        """Any packet from the hub arrived (QUIC ACKs count): the hub is alive."""
        self._last_heard = max(self._last_heard, now)

    def credit_blocked(self) -> bool:
        """True when every record the credit allows is sent (the hub must grant more)."""
        return self._sent_new >= self._credit

    def _silence_deadline(self) -> float:
        return self._last_heard + self._silence_s

    def _retransmit(self, lane_id: int, lane: _EdgeLane, now: float) -> None:
        for batch in lane.inflight:
            batch.sent_at = now
            self._frames.append((lane_id, batch.frame))
            self.retransmitted += batch.count
        lane.rto = min(lane.rto * 2, self.config.rto_max_s)

    def inflight_mark(self, lane: int) -> int:
        """Highest seq of ``lane`` on the wire (the spool must not evict up to it), or 0."""
        q = self._lanes[lane]  # type: ignore[index]
        return q.inflight[-1].last if q.inflight else 0

    def unacked(self, lane: int) -> int:
        """Records of ``lane`` on the wire and not yet acknowledged."""
        return self._lanes[lane].inflight_records  # type: ignore[index]

    def describe(self) -> str:
        """What the sender is at and waiting for, in one line (for diagnostics)."""
        lanes = ", ".join(
            f"{Lane(i).name.lower()}: sent up to {q.cursor}, {q.inflight_records} in flight"
            for i, q in self._lanes.items()
        )
        return (
            f"{self.state.name}, credit {self._sent_new}/{self._credit}, "
            f"linger until {self._linger_at}; {lanes}"
        )

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """End the session locally."""
        if self.state is not EdgeState.CLOSED:
            self.state = EdgeState.CLOSED
            self._events.append(SessionClosed(code, reason))

    def _fail(self, code: ErrorCode, reason: str) -> None:
        self._send(CONTROL, Error(code, reason))
        self.close(code, reason)


# --- hub ---------------------------------------------------------------------


@dataclass(slots=True)
class LaneLedger:
    """The hub's authoritative order state of one (device, incarnation) lane."""

    accepted: int = 0  # highest seq handed to ingest (committed or in a pending commit)
    committed: int = 0  # highest seq durable in the log


@dataclass(slots=True)
class DeviceLedger:
    """Per (device, incarnation) state shared by all sessions of that device."""

    incarnation: int
    lanes: dict[int, LaneLedger] = field(
        default_factory=lambda: {int(x): LaneLedger() for x in LANES}
    )

    def held(self) -> dict[int, int]:
        """Committed mark per lane (what WELCOME and ACK report)."""
        return {k: v.committed for k, v in self.lanes.items() if v.committed}


@dataclass(slots=True)
class HubSessionConfig:
    """Per-device limits the hub applies to a session."""

    window_records: int = 8000  # credit granted beyond what the device has sent
    records_per_s: float = 0.0  # 0: unlimited
    bytes_per_s: float = 0.0
    burst_s: float = 2.0  # bucket depth in seconds of rate
    heartbeat_ms: int = 10_000
    max_early_frames: int = 64  # DATA frames held while waiting for HELLO
    # The edge's acked marks in HELLO are taken as committed (hubs sharing one log, e.g.
    # JetStream): a device arriving from another hub has records stored that this hub's
    # ledger never saw; without this every batch would look like a gap.  A device that
    # lies only skips its own records.
    trust_edge_acks: bool = False


# What a heartbeat may hold: what the hub shows in /v1/devices and presence records (JSON).
HEARTBEAT_MAX_DEPTH = 3  # e.g. {"drop": {"bulk": {"spool-full": 3}}}
HEARTBEAT_MAX_ITEMS = 128  # keys and list items, all levels together
HEARTBEAT_MAX_STR = 256  # characters in one key or string value
_HB_SCALARS = (bool, int, float, type(None))


def check_heartbeat(stats: dict[Any, Any]) -> None:
    """Refuse (RemoteProtocolError BAD_FIELD) a heartbeat that is not a small JSON-like map:
    str keys; int / float / str / bool / None values, or lists and maps of those, nested at
    most HEARTBEAT_MAX_DEPTH deep, HEARTBEAT_MAX_ITEMS items and HEARTBEAT_MAX_STR chars."""
    _check_heartbeat_value(stats, 0, HEARTBEAT_MAX_ITEMS)


def _check_heartbeat_value(value: Any, depth: int, budget: int) -> int:
    """Check one value; returns the item budget left."""
    if isinstance(value, str):
        if len(value) > HEARTBEAT_MAX_STR:
            raise _bad_heartbeat(f"a string of {len(value)} characters")
        return budget
    if isinstance(value, _HB_SCALARS):
        return budget
    if not isinstance(value, dict | list):
        raise _bad_heartbeat(f"a {type(value).__name__} value")
    if depth >= HEARTBEAT_MAX_DEPTH:
        raise _bad_heartbeat(f"nested deeper than {HEARTBEAT_MAX_DEPTH}")
    budget -= len(value)
    if budget < 0:
        raise _bad_heartbeat(f"more than {HEARTBEAT_MAX_ITEMS} items")
    if isinstance(value, list):
        for item in value:
            budget = _check_heartbeat_value(item, depth + 1, budget)
        return budget
    for key, item in value.items():
        if not isinstance(key, str):
            raise _bad_heartbeat(f"a {type(key).__name__} key")
        if len(key) > HEARTBEAT_MAX_STR:
            raise _bad_heartbeat(f"a key of {len(key)} characters")
        budget = _check_heartbeat_value(item, depth + 1, budget)
    return budget


def _bad_heartbeat(why: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.BAD_FIELD, f"heartbeat: {why}")


class HubState(Enum):
    """Hub session states."""

    AWAIT_HELLO = "await-hello"
    ESTABLISHED = "established"
    CLOSED = "closed"


class TokenBucket:
    """Classic token bucket with time passed in; may go negative to carry debt."""

    __slots__ = ("_at", "capacity", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(rate * burst, 1.0)
        self.tokens = self.capacity
        self._at = now

    def refill(self, now: float) -> float:
        """Tokens available at ``now``."""
        if self.rate > 0:
            self.tokens = min(self.capacity, self.tokens + (now - self._at) * self.rate)
        self._at = now
        return self.tokens

    def when(self, amount: float) -> float:
        """Seconds from the last refill until ``amount`` tokens are there."""
        return max(0.0, (amount - self.tokens) / self.rate) if self.rate > 0 else 0.0


class HubSession(_Core):
    """The hub's side of one device connection."""

    def __init__(
        self,
        tenant: str,
        device: str,
        ledger_for: Callable[[int], DeviceLedger],
        now: float,
        config: HubSessionConfig | None = None,
    ) -> None:
        super().__init__()
        self.tenant = tenant
        self.device = device
        self.prefix = f"{tenant}.{device}."
        self.config = config or HubSessionConfig()
        self.state = HubState.AWAIT_HELLO
        self._ledger_for = ledger_for
        self.ledger: DeviceLedger | None = None
        self._early: list[tuple[Data, int]] = []
        self._granted = INITIAL_CREDIT
        self._seen_new = 0  # credit the edge has used: highest DATA offset + count
        self._acked = {int(x): 0 for x in LANES}
        self._ack_due = False
        cfg = self.config
        self._records = TokenBucket(cfg.records_per_s, cfg.burst_s, now)
        self._bytes = TokenBucket(cfg.bytes_per_s, cfg.burst_s, now)
        self._credit_at: float | None = None
        self.duplicates = 0
        self.out_of_order = 0

    def receive_frame(self, frame: Frame, now: float, wire_bytes: int = 0) -> None:
        """A frame from the edge on any stream."""
        if self.state is HubState.CLOSED:
            return
        try:
            self._on_frame(frame, now, wire_bytes)
        except ProtocolError as exc:
            self.fail(exc.code, exc.reason)

    def receive_heartbeat(self, hb: Heartbeat) -> None:
        """A heartbeat datagram (ignored before HELLO); a malformed one fails the session."""
        if self.state is HubState.ESTABLISHED:
            try:
                check_heartbeat(hb.stats)
            except RemoteProtocolError as exc:
                self.fail(exc.code, exc.reason)
                return
            self._events.append(HeartbeatReceived(hb.stats))
            if hb.stats.get("cb"):  # the edge is out of credit: repeat the grant (cheap repair)
                self._send(CONTROL, Credit(self._granted))

    def _on_frame(self, frame: Frame, now: float, wire_bytes: int) -> None:
        if isinstance(frame, Hello):
            self._on_hello(frame, now)
        elif isinstance(frame, Data):
            if self.state is HubState.AWAIT_HELLO:
                if len(self._early) >= self.config.max_early_frames:
                    raise RemoteProtocolError(
                        ErrorCode.PROTOCOL_VIOLATION, "too much DATA before HELLO"
                    )
                self._early.append((frame, wire_bytes))
            else:
                self._on_data(frame, now, wire_bytes)
        elif isinstance(frame, Error):
            self._events.append(PeerError(frame.code, frame.reason, frame.retry_after_ms))
            self.close(frame.code, f"edge: {frame.reason}")
        else:
            raise RemoteProtocolError(
                ErrorCode.PROTOCOL_VIOLATION, f"edge sent {type(frame).__name__}"
            )

    def _on_hello(self, hello: Hello, now: float) -> None:
        if self.state is not HubState.AWAIT_HELLO:
            if self.ledger is None or hello.incarnation != self.ledger.incarnation:
                raise RemoteProtocolError(ErrorCode.PROTOCOL_VIOLATION, "second HELLO")
            self._send_welcome(now)  # a repeated HELLO is answered again, idempotently
            return
        if hello.incarnation == 0:  # reserved for records the hub itself publishes
            raise RemoteProtocolError(ErrorCode.BAD_FIELD, "incarnation 0 is reserved")
        self.ledger = self._ledger_for(hello.incarnation)
        if self.config.trust_edge_acks:
            self._adopt_edge_acks(hello.acked)
        self.state = HubState.ESTABLISHED
        held = self.ledger.held()
        self._acked.update(held)
        self._grant(now, force=True)
        self._send(
            CONTROL,
            Welcome(
                hello.incarnation, held, self._granted, self.config.heartbeat_ms, int(now * 1e6)
            ),
        )
        held = self.ledger.held()
        behind = {
            lane: (mark, held.get(lane, 0))
            for lane, mark in hello.acked.items()
            if mark > held.get(lane, 0)
        }
        self._events.append(HelloReceived(hello.incarnation, hello.agent, behind))
        early, self._early = self._early, []
        for data, wire_bytes in early:
            self._on_data(data, now, wire_bytes)

    def _adopt_edge_acks(self, acked: dict[int, int]) -> None:
        """Every ACK the edge holds was given after the shared log stored the records."""
        assert self.ledger is not None
        for lane, mark in acked.items():
            led = self.ledger.lanes.get(lane)
            if led is not None:
                led.accepted = max(led.accepted, mark)
                led.committed = max(led.committed, mark)

    def _send_welcome(self, now: float) -> None:
        assert self.ledger is not None
        held = self.ledger.held()
        self._acked.update(held)
        hb = self.config.heartbeat_ms
        welcome = Welcome(self.ledger.incarnation, held, self._granted, hb, int(now * 1e6))
        self._send(CONTROL, welcome)

    def _on_data(self, data: Data, now: float, wire_bytes: int) -> None:
        assert self.ledger is not None
        lane = self.ledger.lanes[data.lane]
        last = data.last_seq
        self._seen_new = max(self._seen_new, data.offset + data.count)
        if self._seen_new > self._granted:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_VIOLATION, "sent beyond CREDIT")
        self._bytes.refill(now)
        self._bytes.tokens -= wire_bytes
        if data.after > lane.accepted:
            self.out_of_order += 1  # a gap: the retransmission of what precedes fills it
            return
        if last <= lane.accepted:
            self._skip_duplicates(data.lane, data.count)
            return
        inc = self.ledger.incarnation
        if data.first_seq > lane.accepted:  # the common case: keep the batch whole
            self._check_subjects(
                validate_batch(data.codec, data.payload, data.first_seq, data.count, last)
            )
            lane.accepted = last
            self._events.append(
                BatchAccepted(
                    data.lane,
                    inc,
                    data.first_seq,
                    last,
                    data.count,
                    data.codec,
                    data.payload,
                    None,
                    wire_bytes,
                )
            )
            return
        records = decode_batch(data.codec, data.payload, data.first_seq, data.count)
        if records[-1].seq != last:
            raise RemoteProtocolError(ErrorCode.BAD_SEQUENCE, "last seq does not match the batch")
        self._check_subjects(sorted({r.subject for r in records}))
        fresh = [r for r in records if r.seq > lane.accepted]
        self._skip_duplicates(data.lane, len(records) - len(fresh))
        lane.accepted = fresh[-1].seq
        self._events.append(
            BatchAccepted(
                data.lane,
                inc,
                fresh[0].seq,
                fresh[-1].seq,
                len(fresh),
                data.codec,
                None,
                fresh,
                wire_bytes,
            )
        )

    def _skip_duplicates(self, lane: int, count: int) -> None:
        self.duplicates += count
        self._events.append(DuplicatesSkipped(lane, count))
        self._ack_due = True  # tell the edge again what we hold

    def _check_subjects(self, subjects: list[str]) -> None:
        prefix = self.prefix
        for subject in subjects:
            if not subject.startswith(prefix) or len(subject) == len(prefix):
                raise RemoteProtocolError(
                    ErrorCode.SUBJECT_FORBIDDEN, f"subject {subject[:80]!r} is outside {prefix}>"
                )
            tail = subject[len(prefix) :]
            if "*" in tail or ">" in tail or "" in tail.split(".") or " " in tail:
                raise RemoteProtocolError(
                    ErrorCode.SUBJECT_FORBIDDEN, f"bad subject {subject[:80]!r}"
                )

    # -- commit feedback and credit -----------------------------------------

    def on_committed(self, now: float) -> None:
        """Ingest made the ledger's ``committed`` marks durable: acknowledge and re-grant credit."""
        if self.state is not HubState.ESTABLISHED or self.ledger is None:
            return
        self._ack_due = True
        self.flush(now)

    def on_commit_failed(self, reason: str) -> None:
        """Ingest could not commit: roll back what was accepted and end the session."""
        if self.ledger is not None:
            for lane in self.ledger.lanes.values():
                lane.accepted = lane.committed
        self.fail(ErrorCode.INTERNAL, f"commit failed: {reason}")

    def flush(self, now: float) -> None:
        """Queue an ACK for what changed and any credit now due."""
        if self.state is not HubState.ESTABLISHED or self.ledger is None:
            return
        if self._ack_due:
            held = self.ledger.held()
            self._acked.update(held)
            self._send(CONTROL, Ack(held))
            self._ack_due = False
        self._grant(now)

    def _grant(self, now: float, force: bool = False) -> None:
        want = self._seen_new + self.config.window_records - self._granted
        if want <= 0:
            return
        if want < self.config.window_records // 4 and not force:
            return  # grant in chunks, not per record
        allowed = float(want)
        if self._records.rate > 0:
            allowed = min(allowed, max(0.0, self._records.refill(now)))
        if self._bytes.rate > 0 and self._bytes.refill(now) < 0:
            allowed = 0.0
        self._credit_at = None
        if allowed >= 1:
            self._records.tokens -= int(allowed)
            self._granted += int(allowed)
            if not force:
                self._send(CONTROL, Credit(self._granted))
        if self._granted < self._seen_new + self.config.window_records:
            self._credit_at = now + max(
                self._records.when(1.0), self._bytes.when(0.0) if self._bytes.rate else 0.0, 0.05
            )

    def get_timer(self) -> float | None:
        """The one deadline this core needs (a withheld credit grant), or None."""
        return self._credit_at if self.state is HubState.ESTABLISHED else None

    def handle_timer(self, now: float) -> None:
        """Grant credit that the rate limits now allow."""
        if self._credit_at is not None and now >= self._credit_at:
            self._credit_at = None
            self._grant(now)

    @property
    def granted(self) -> int:
        """Cumulative credit granted so far."""
        return self._granted

    def fail(self, code: ErrorCode, reason: str, retry_after_ms: int = 0) -> None:
        """Send ERROR and close (the shell closes the QUIC connection on SessionClosed)."""
        if self.state is HubState.CLOSED:
            return
        self._send(CONTROL, Error(code, reason, retry_after_ms))
        self.close(code, reason)

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """End the session locally."""
        if self.state is not HubState.CLOSED:
            self.state = HubState.CLOSED
            self._events.append(SessionClosed(code, reason))


__all__ = [
    "CONTROL",
    "DeviceLedger",
    "EdgeSession",
    "EdgeState",
    "HubSession",
    "HubSessionConfig",
    "HubState",
    "LaneLedger",
    "LocalProtocolError",
    "Outbox",
    "SenderConfig",
    "TokenBucket",
    "check_heartbeat",
]

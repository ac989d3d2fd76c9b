"""QUIC endpoints for both ends, sans-I/O: datagrams, addresses and ``now`` in; datagrams,
events and one deadline out.  They own aioquic ``QuicConnection`` objects and the session
cores; the asyncio shells (edge/, hub/) only own a UDP socket and one timer, and the
simulator's virtual-time harness drives this very code without sockets.

Streams: the edge opens the control stream first, then one stream per lane as it needs
it.  Heartbeats travel as QUIC DATAGRAM frames.  The hub routes datagrams to connections
by connection ID, so a device keeps its session across NAT rebinding.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import hmac
import itertools
import logging
import os
import re
import sys
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aioquic import tls
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic import connection as _aioquic_connection
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    QuicConnection,
    QuicConnectionError,
    QuicConnectionState,
    QuicNetworkPath,
)
from aioquic.quic.crypto import CryptoPair, NoCallback
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
    pull_quic_transport_parameters,
    push_quic_transport_parameters,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import MAX_ACK_RANGES, QuicPacketRecovery, QuicPacketSpace
from aioquic.quic.stream import QuicStream
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from transport.auth import Clock, TicketStore, require_client_certificate, wall_clock
from transport.certs import DeviceIdentity, PrivateKey
from transport.errors import ErrorCode, WireError
from transport.events import SessionClosed, SessionEvent
from transport.limits import ALPN, MAX_FRAME_BYTES, MAX_HEARTBEAT_BYTES
from transport.session import CONTROL, EdgeSession, HubSession, HubState
from transport.wire import FrameReader, decode_datagram

Address = tuple[Any, ...]

# aioquic builds ~33 identical frozensets per connection from EPOCHS("...") shortcuts
# (~7 KB of every idle session). They are immutable and the shortcuts are literals, so
# one shared set per shortcut is the same value: memoise the function process-wide.
_aioquic_connection.EPOCHS = functools.lru_cache(maxsize=64)(_aioquic_connection.EPOCHS)
# aioquic moves the streams that sent to the back of its service queue by iterating a set of
# them; hashed by identity (a memory address), that order -- and so which lane's data fills
# a packet first -- differed from run to run, and a virtual-time run with one seed was not
# always the same run.  Hashed by stream ID (unique within a connection), it is.


def _stream_hash(stream: QuicStream) -> int:
    return hash(stream.stream_id)


QuicStream.__hash__ = _stream_hash  # type: ignore[method-assign,assignment]
_MIN_INITIAL_DATAGRAM = 1200  # RFC 9000 section 14.1: a client's first datagram is at least this
_REFUSED_MEMORY = 8192  # refused Initial DCIDs remembered; beyond: the oldest are forgotten
# TLS bytes one connection may have buffered towards an unfinished handshake message.  A
# ClientHello or a device's certificate chain is a few KiB; aioquic by itself waits for
# whatever length the peer claims (up to 16 MiB), even before the peer has authenticated.
_MAX_TLS_BACKLOG = 64 * 1024
_RETRY_RE = re.compile(r"retry-after-ms=(\d+)")
DEFAULT_MAX_STREAMS = 4  # streams a device may open: control + three lanes

# ACKs (RFC 9000 section 13.2).  aioquic acknowledges every ack-eliciting packet 1 ms after
# it arrives, in a packet of its own, and adds a pending ACK to a data packet only once it
# is due.  At telemetry rates that doubles the packets: the hub's QUIC ACK goes out just
# before its commit ACK, and the edge's ACK of that commit ACK just before its next batch.
# So both ends let a pending ACK ride the next packet they send anyway, and wait for one:
# - the hub up to HUB_ACK_DELAY_S, under the 25 ms max_ack_delay aioquic advertises, which
#   the group commit (5 ms by default) fits in: one packet carries both ACKs;
# - the edge up to its ack delay (EdgeEndpoint's ``ack_delay``, the agent's linger up to
#   EDGE_ACK_DELAY_MAX_S), which it advertises as its max_ack_delay so the hub's loss
#   detection allows for it: the ACK rides the next batch or heartbeat.
# Either end acknowledges at once after ACK_EVERY ack-eliciting packets (bulk transfers keep
# their ACK clock) and whenever it sends anything else.
HUB_ACK_DELAY_S = 0.020
EDGE_ACK_DELAY_MAX_S = 1.0
ACK_EVERY = 2
_ADVERTISED_SLACK_MS = 25  # timer lateness allowed on top of the edge's ack delay


# Stateless resets (RFC 9000 section 10.3).  A restarted hub no longer knows the devices'
# connections: it dropped their packets, and each device noticed only once the hub had been
# silent for its hub_silence_s (30 s by default), its records waiting in the spool.  The hub
# answers a short-header packet for a connection ID it issued but no longer knows with a
# stateless reset, and the edge, recognising the token the hub gave it for that connection
# ID, reconnects at once.  Both rest on a key derived from the hub's TLS private key, so
# a restarted hub (same key) knows what the old one handed out, and nobody else can forge:
# - a hub connection ID is 8 random bytes and a MAC of them: the hub answers only packets
#   that carry one of its own IDs, never junk or a spoofed sender's random bytes (one who
#   connected and so learned IDs of this hub can have it answer, at the rate limit);
# - the reset token of a connection ID is an HMAC of it.
# A reset is shorter than the packet it answers (no loops between two endpoints), at most
# RESET_MAX_BYTES, and at most HubLimits.stateless_resets_per_s are sent (the rest are
# counted and dropped).
RESET_MIN_BYTES = 21  # a short header's first byte, 4 unpredictable bytes, the 16-byte token
RESET_MAX_BYTES = 43
_RESET_TOKEN_BYTES = 16
_RESET_KEY_LABEL = b"squall stateless reset key v1"
# A hub connection ID: 8 random bytes (among 10,000 devices' 20,000 live IDs, two alike once
# in ~2**37 draws) and a 4-byte MAC; 12 bytes in all, 4 more than aioquic's default
HUB_CID_BYTES = 12
_CID_RANDOM_BYTES = 8


def reset_key(key: PrivateKey) -> bytes:
    """The hub's stateless-reset key: a hash of its TLS private key (stable across restarts)."""
    der = key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
    return hashlib.sha256(_RESET_KEY_LABEL + der).digest()


def reset_token(key: bytes, cid: bytes) -> bytes:
    """The stateless reset token the hub gives out with connection ID ``cid``."""
    return hmac.new(key, b"token" + cid, hashlib.sha256).digest()[:_RESET_TOKEN_BYTES]


def hub_cid(key: bytes, length: int) -> bytes:
    """A new connection ID of ``length`` bytes that ``cid_is_ours`` recognises."""
    head = os.urandom(_CID_RANDOM_BYTES)
    return head + hmac.new(key, b"cid" + head, hashlib.sha256).digest()[: length - len(head)]


def cid_is_ours(key: bytes, cid: bytes) -> bool:
    """True when ``cid`` was made by ``hub_cid`` with this key (by chance: 2**-32 at most)."""
    head, tag = cid[:_CID_RANDOM_BYTES], cid[_CID_RANDOM_BYTES:]
    want = hmac.new(key, b"cid" + head, hashlib.sha256).digest()[: len(tag)]
    return len(tag) >= 4 and hmac.compare_digest(tag, want)


def _is_stateless_reset(quic: QuicConnection, data: bytes) -> bool:
    """True when ``data`` ends in a reset token the peer issued for this connection.

    A reset looks like a short-header packet; its last 16 bytes are the token (a real
    packet's last 16 bytes are its AEAD tag: matching one by chance is a 2**-128 event).
    """
    if len(data) < RESET_MIN_BYTES or data[0] & 0x80:
        return False
    # only the ID in use: RFC 9000 10.3.1 forbids checking tokens of IDs never used
    q: Any = quic
    token = q._peer_cid.stateless_reset_token
    return bool(token) and hmac.compare_digest(data[-_RESET_TOKEN_BYTES:], token)


def edge_ack_delay(linger_s: float) -> float:
    """How long an edge whose batches linger ``linger_s`` holds a QUIC ACK back."""
    return min(max(linger_s, 0.001), EDGE_ACK_DELAY_MAX_S)


def _ack_pending(quic: QuicConnection) -> float | None:
    """When the pending 1-RTT ACK is due (None: none is pending)."""
    space = quic._spaces.get(tls.Epoch.ONE_RTT)
    return None if space is None else space.ack_at


def _ack_with_next_packet(quic: QuicConnection, now: float) -> None:
    """A pending 1-RTT ACK goes out in the next packet instead of waiting for its timer."""
    space = quic._spaces.get(tls.Epoch.ONE_RTT)
    if space is not None and space.ack_at is not None and space.ack_at > now:
        space.ack_at = now


def _count_after_send(quic: QuicConnection, unacked: int) -> int:
    """After datagrams went out: none wait for an ACK any more if one of them carried it."""
    return unacked if unacked and _ack_pending(quic) is not None else 0


def _ack_held(quic: QuicConnection, now: float) -> bool:
    """True when a datagram just in left an ACK pending for later: nothing need go out now.

    Asking aioquic for datagrams costs ~100 us even when it has none, and after a batch
    comes in the hub has none until the commit (its ACK waits for the commit ACK).  What
    aioquic might still have -- a retransmission the datagram's ACK frame made due, a flow
    control update -- goes out with the ACK, at most HUB_ACK_DELAY_S later.
    """
    at = _ack_pending(quic)
    return at is not None and at > now and quic._state is QuicConnectionState.CONNECTED


def _nothing_urgent(quic: QuicConnection, now: float) -> bool:
    """After a datagram in, on a confirmed connection: True when aioquic has nothing to send
    that cannot wait for the next packet going out anyway (or the held ACK's deadline).

    On the edge, most datagrams in are the hub's commit ACKs: they leave only a QUIC ACK to
    send, which the edge holds for its next batch, and asking aioquic for datagrams finds
    none (~20 us).  Anything else it might have must go now: a retransmission the ACK
    frame made due (lost data goes back to its stream's pending ranges), data the
    congestion window or pacing held, a PATH_RESPONSE, a probe or PING, a close, a raised
    flow-control or stream limit, connection IDs, a RESET_STREAM or STOP_SENDING.  Each
    of those is checked here, so this answers False for them.  (Not checked, as a client
    of a hub that advertises no preferred address never has them: probing a new path.)
    """
    space = quic._spaces.get(tls.Epoch.ONE_RTT)
    q: Any = quic
    if (
        space is None
        or (space.ack_at is not None and space.ack_at <= now)
        or quic._state is not QuicConnectionState.CONNECTED
        or not q._handshake_confirmed
        or q._close_pending
        or q._probe_pending
        or q._ping_pending
        or q._datagrams_pending
        or q._retire_connection_ids
        or q._streams_blocked_pending
        or not q._crypto_streams[tls.Epoch.ONE_RTT].sender.buffer_is_empty
    ):
        return False
    max_data = q._local_max_data
    if max_data.used * 2 > max_data.value or max_data.value != max_data.sent:
        return False
    if any(lim.value != lim.sent for lim in (q._local_max_streams_bidi, q._local_max_streams_uni)):
        return False
    if any(not c.was_sent for c in q._host_cids):
        return False
    if any(path.remote_challenges for path in q._network_paths):
        return False
    for stream in q._streams.values():
        sender, receiver, window = stream.sender, stream.receiver, stream.max_stream_data_local
        if not sender.buffer_is_empty or sender.reset_pending or receiver.stop_pending:
            return False
        if window and (receiver.highest_offset * 2 > window):
            return False
        if stream.max_stream_data_local_sent != window:
            return False
    return True


def _count_for_ack(quic: QuicConnection, unacked: int, now: float) -> int:
    """After a datagram in: how many wait for an ACK (ACK_EVERY of them: acknowledge now)."""
    if _ack_pending(quic) is None:
        return 0
    unacked += 1
    if unacked >= ACK_EVERY:
        _ack_with_next_packet(quic, now)
    return unacked


# Probe timeouts (RFC 9002 6.2) on the edge's thin stream.  A device sends a packet or two a
# second, so after a loss nothing new arrives to trigger fast retransmit: only the PTO
# recovers it.  aioquic doubles the PTO at every expiry without limit; on a link that loses
# bursts of packets (3G, 2G) a few lost probes in a row put the next one tens of seconds
# out, and the edge, hearing nothing, gives the session up.  Like Linux's thin-stream linear
# timeouts (tcp_thin_linear_timeouts), the edge's first LINEAR_PTOS expiries keep the base
# period; then it doubles until it is MAX_PTO_BACKOFF times the base *and* at least
# MIN_CAPPED_PTO_S (on a LAN, a PTO of tens of ms, a stalled hub is not probed several
# times a second by every device).  The hub keeps aioquic's doubling: the same rule there
# halved the tail on lossy links again, but a hub past saturation, whose own socket buffer
# delays the edges' ACKs, then probed every device early and fleet trials collapsed
# (BENCHMARKS.md "Probe timeouts on thin streams").  A probe is one or two small packets;
# congestion control is untouched (persistent congestion still collapses the window).
LINEAR_PTOS = 3
MAX_PTO_BACKOFF = 4
MIN_CAPPED_PTO_S = 2.0


def pto_backoff(probes: int, base_s: float) -> int:
    """The PTO multiplier after ``probes`` consecutive probe timeouts of base period ``base_s``."""
    if probes <= LINEAR_PTOS:
        return 1
    cap = MAX_PTO_BACKOFF
    while cap * base_s < MIN_CAPPED_PTO_S and cap < 1 << 20:
        cap *= 2
    return min(1 << min(probes - LINEAR_PTOS, 20), cap)


class _ThinStreamRecovery(QuicPacketRecovery):
    """aioquic's recovery with the probe timeout backed off as ``pto_backoff`` says.

    aioquic keeps its count of consecutive PTOs (and resets it on an ACK); only the
    exponent its timer uses is swapped, for the length of the call.
    """

    def get_loss_detection_time(self, *, amplification_limited: bool) -> float | None:
        probes = self._pto_count
        if probes > LINEAR_PTOS:
            base = self.get_probe_timeout(include_max_ack_delay=self.handshake_confirmed)
            self._pto_count = pto_backoff(probes, base).bit_length() - 1
        else:
            self._pto_count = 0
        try:
            return super().get_loss_detection_time(amplification_limited=amplification_limited)
        finally:
            self._pto_count = probes


def _thin_stream_recovery(quic: QuicConnection) -> None:
    """Give ``quic`` the thin-stream probe timeout (aioquic's own if its recovery changed)."""
    loss: Any = quic._loss
    if type(loss) is QuicPacketRecovery and isinstance(vars(loss).get("_pto_count"), int):
        loss.__class__ = _ThinStreamRecovery


_PEER_ERROR = re.compile(r"^\[[0-9a-f]*\] Error: \d+, reason: ")


class _PeerErrorFilter(logging.Filter):
    """aioquic logs a peer's QUIC protocol violation at WARNING, as "[cid] Error: 10, reason:
    Packet contains no CRYPTO frame" -- e.g. a device's late Initial for a handshake the hub
    already dropped.  The connection is closed with that error and counted (the hub's
    ``handshake_errors``, ``errors_total{code="QUIC_0x.."}``; the edge's ConnectionLost):
    one peer's bad datagram is not an operator's warning.  Demoted to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not _PEER_ERROR.match(str(record.msg)):
            return True
        if not _aioquic_connection.logger.isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_aioquic_connection.logger.addFilter(_PeerErrorFilter())


class _EdgeQuic(QuicConnection):
    """aioquic's client connection, advertising the longer max_ack_delay the edge uses."""

    max_ack_delay_ms = 25

    def _serialize_transport_parameters(self) -> bytes:
        params = pull_quic_transport_parameters(
            Buffer(data=super()._serialize_transport_parameters())
        )
        params.max_ack_delay = self.max_ack_delay_ms
        buf = Buffer(capacity=4096)
        push_quic_transport_parameters(buf, params)
        return bytes(buf.data)


@dataclass(frozen=True, slots=True)
class Connected:
    """The QUIC handshake finished; ``early_data`` is true when 0-RTT data was accepted."""

    session_resumed: bool
    early_data: bool


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    """The connection ended; ``code`` is a Squall code, a QUIC/TLS code, or 0."""

    code: int
    reason: str
    retry_after_ms: int = 0
    handshake_done: bool = True


@dataclass(slots=True)
class EdgeTls:
    """What the edge needs to connect: the CA to trust, its device certificate and key."""

    roots: list[x509.Certificate]
    cert: x509.Certificate
    key: PrivateKey | None
    server_name: str = "localhost"


@dataclass
class _HubConfiguration(QuicConfiguration):
    """aioquic's configuration, shared by a hub's connections, with its reset key."""

    reset_key: bytes | None = None


def _base_config(
    is_client: bool, idle_timeout: float, kind: type[QuicConfiguration] = QuicConfiguration
) -> Any:
    return kind(
        is_client=is_client,
        alpn_protocols=[ALPN],
        max_datagram_frame_size=MAX_HEARTBEAT_BYTES + 100,
        idle_timeout=idle_timeout,
    )


def retry_after_from(reason: str) -> int:
    """The ``retry-after-ms=N`` hint a busy hub puts in its close reason (0 if none)."""
    m = _RETRY_RE.search(reason)
    return int(m.group(1)) if m else 0


class EdgeEndpoint:
    """One client connection to a hub carrying one EdgeSession."""

    def __init__(
        self,
        tls_files: EdgeTls,
        session: EdgeSession,
        addr: Address,
        now: float,
        ticket: tls.SessionTicket | None = None,
        on_ticket: Callable[[tls.SessionTicket], None] | None = None,
        idle_timeout: float = 60.0,
        ack_delay: float = 0.001,
    ) -> None:
        cfg = _base_config(True, idle_timeout)
        cfg.server_name = tls_files.server_name
        cfg.cadata = b"".join(c.public_bytes(Encoding.PEM) for c in tls_files.roots)
        cfg.certificate = tls_files.cert
        cfg.private_key = tls_files.key
        cfg.session_ticket = ticket
        self.session = session
        self.addr = addr
        quic = _EdgeQuic(configuration=cfg, session_ticket_handler=on_ticket)
        _thin_stream_recovery(quic)
        quic.max_ack_delay_ms = max(25, round(ack_delay * 1000) + _ADVERTISED_SLACK_MS)
        self.quic: QuicConnection = quic
        self._ack_delay = ack_delay  # in force once the handshake is done
        self._unacked = 0  # ack-eliciting packets (datagrams) received since our last ACK
        self.packets_sent = 0
        self.packets_lost = 0
        self._count_packets()
        self.quic.connect(addr, now)
        # Something may be due from aioquic: asking it costs ~100 us even when it has
        # nothing, and the agent polls after every spool commit, which mostly sends nothing.
        self._dirty = True
        # aioquic's get_timer, kept until the connection is touched (receive, send, timer,
        # anything written to it): the shells ask for the deadline after every event.
        self._quic_timer_stale = True
        self._quic_timer_at: float | None = None
        self._streams: dict[int, int] = {}  # channel -> stream id
        self._control_reader = FrameReader()
        self._events: deque[Connected | ConnectionLost | SessionEvent] = deque()
        self.handshake_done = False
        self.closed = False
        self.reset_by_hub = False  # a stateless reset ended the connection: silent from then
        self.session.poll(now)  # what is spooled rides the first flight, as 0-RTT data
        self._pump(now)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """A UDP datagram from the hub."""
        if self.reset_by_hub:
            return  # the connection is over; nothing more goes in or out
        confirmed, lost = self.handshake_done, self.packets_lost
        if confirmed and not self.closed and _is_stateless_reset(self.quic, data):
            self.reset_by_hub = True
            reason = "stateless reset: the hub no longer knows this connection (restarted?)"
            self._on_terminated(qe.ConnectionTerminated(0, None, reason))
            return
        self.quic.receive_datagram(data, addr, now)
        self._quic_timer_stale = True
        self._unacked = _count_for_ack(self.quic, self._unacked, now)
        # aioquic is asked for datagrams only if it may have one that cannot wait for the
        # next batch (see _nothing_urgent): the hub's commit ACKs leave none.
        if not (confirmed and lost == self.packets_lost and _nothing_urgent(self.quic, now)):
            self._dirty = True
        if addr[:2] == self.addr[:2]:
            self.session.heard(now)
        self._drain(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """UDP datagrams to send now.

        aioquic is asked only after something that can give it work: the connect, a
        datagram in, a timer, frames or a close written to it.  A poll that wrote
        nothing leaves it alone (its ACK and loss timers come through ``handle_timer``).
        """
        if not self._dirty or self.reset_by_hub:
            return []
        self._dirty = False
        self._quic_timer_stale = True
        out = [(d, a) for d, a in self.quic.datagrams_to_send(now)]
        if out:
            self._unacked = _count_after_send(self.quic, self._unacked)
        return out

    def get_timer(self) -> float | None:
        """The earliest deadline of the QUIC connection and the session."""
        if self.reset_by_hub:
            return None
        q, s = self._quic_timer(), self.session.get_timer()
        return s if q is None else q if s is None or q < s else s

    def _quic_timer(self) -> float | None:
        """aioquic's deadline, asked again only after something changed the connection."""
        if self._quic_timer_stale:
            self._quic_timer_at = self.quic.get_timer()
            self._quic_timer_stale = False
        return self._quic_timer_at

    def handle_timer(self, now: float) -> None:
        """Run whatever is due."""
        if self.reset_by_hub:
            return
        self._dirty = True
        t = self._quic_timer()
        if t is not None and now >= t:
            self.quic.handle_timer(now)
            self._quic_timer_stale = True
        t = self.session.get_timer()
        if t is not None and now >= t:
            self.session.handle_timer(now)
        self._drain(now)

    def poll(self, now: float) -> bool:
        """New records are in the spool: let the session send what it may.

        Returns whether the shell has anything to do now: datagrams to send, events, or a
        new deadline.  A poll that only added records to a lingering batch changed nothing
        (that is most of them: the agent polls after every group commit).
        """
        linger_at = self.session.linger_at
        self.session.poll(now)
        self._pump(now)
        return self._dirty or bool(self._events) or self.session.linger_at != linger_at

    def next_event(self) -> Connected | ConnectionLost | SessionEvent | None:
        """Next endpoint or session event."""
        return self._events.popleft() if self._events else None

    def wrote_to_quic(self) -> None:
        """Something was written to ``quic`` directly (tests, tools): send it next time."""
        self._dirty = self._quic_timer_stale = True

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Close the connection (GOING_AWAY on shutdown)."""
        if not self.closed:
            self.quic.close(error_code=int(code), reason_phrase=reason)
            self._dirty = self._quic_timer_stale = True

    def _count_packets(self) -> None:
        """Count sent and lost packets for the heartbeat's loss estimate (aioquic keeps no
        counters: its recovery object's two hooks are wrapped, per connection)."""
        loss: Any = self.quic._loss
        sent, lost = loss.on_packet_sent, loss._on_packets_lost

        def on_sent(**kw: Any) -> None:
            self.packets_sent += 1
            sent(**kw)

        def on_lost(**kw: Any) -> None:
            kw["packets"] = list(kw["packets"])
            self.packets_lost += len(kw["packets"])
            lost(**kw)

        loss.on_packet_sent, loss._on_packets_lost = on_sent, on_lost

    def loss_estimate(self) -> float:
        """Share of this connection's packets that QUIC declared lost."""
        return self.packets_lost / self.packets_sent if self.packets_sent else 0.0

    def describe(self, now: float) -> str:
        """QUIC loss recovery and the session in one line (for diagnostics)."""
        loss: Any = self.quic._loss
        timer = self.quic.get_timer()
        due = "none" if timer is None else f"in {timer - now:.1f} s"
        return (
            f"quic srtt {self.rtt() * 1000:.0f} ms, rttvar {loss._rtt_variance * 1000:.0f} ms, "
            f"{loss._pto_count} probe timeouts "
            f"(backoff x{pto_backoff(loss._pto_count, loss.get_probe_timeout())}), "
            f"{loss.bytes_in_flight} bytes in flight "
            f"(cwnd {loss.congestion_window}), lost {self.packets_lost}/{self.packets_sent} "
            f"packets, timer {due}; sender {self.session.describe()}"
        )

    def rtt(self) -> float:
        """Smoothed RTT estimate in seconds (aioquic's recovery state)."""
        loss: Any = self.quic._loss
        return float(loss._rtt_smoothed or loss._rtt_initial)

    def _drain(self, now: float) -> None:
        while (ev := self.quic.next_event()) is not None:
            self._on_quic_event(ev, now)
        self._pump(now)

    def _on_quic_event(self, ev: qe.QuicEvent, now: float) -> None:
        if isinstance(ev, qe.HandshakeCompleted):
            self.handshake_done = True
            q: Any = self.quic
            q._ack_delay = self._ack_delay
            self._events.append(Connected(ev.session_resumed, ev.early_data_accepted))
        elif isinstance(ev, qe.StreamDataReceived):
            if ev.stream_id != self._streams.get(CONTROL):
                return
            try:
                for frame in self._control_reader.feed(ev.data):
                    self.session.receive_frame(frame, now)
            except WireError as exc:
                self.session.close(exc.code, exc.reason)
                self.quic.close(error_code=int(exc.code), reason_phrase=exc.reason)
                self._dirty = self._quic_timer_stale = True
        elif isinstance(ev, qe.ConnectionTerminated):
            self._on_terminated(ev)

    def _on_terminated(self, ev: qe.ConnectionTerminated) -> None:
        if self.closed:
            return
        self.closed = True
        reason = ev.reason_phrase or ""
        self.session.close(ErrorCode.NO_ERROR, reason)
        lost = ConnectionLost(ev.error_code, reason, retry_after_from(reason), self.handshake_done)
        self._events.append(lost)

    def _pump(self, now: float) -> None:
        sending = False
        for channel, data in self.session.frames_to_send():
            self.quic.send_stream_data(self._stream_for(channel), data)
            sending = True
        for data in self.session.datagrams_to_send():
            self.quic.send_datagram_frame(data)
            sending = True
        if sending:
            _ack_with_next_packet(self.quic, now)
            self._dirty = self._quic_timer_stale = True
        while (ev := self.session.next_event()) is not None:
            self._events.append(ev)
            if isinstance(ev, SessionClosed) and not self.closed:
                # the session gave up (no WELCOME, hub silent, protocol error): so does QUIC
                self.quic.close(error_code=int(ev.code), reason_phrase=ev.reason)
                self._dirty = self._quic_timer_stale = True
                self.closed = True
                self._events.append(ConnectionLost(int(ev.code), ev.reason, 0, self.handshake_done))
        if self.quic._state is QuicConnectionState.TERMINATED and not self.closed:
            self._on_terminated(qe.ConnectionTerminated(0, None, "connection terminated"))

    def _stream_for(self, channel: int) -> int:
        sid = self._streams.get(channel)
        if sid is None:
            sid = self.quic.get_next_available_stream_id()
            self._streams[channel] = sid
        return sid


# --- hub -----------------------------------------------------------------------------


@dataclass(slots=True)
class HubTls:
    """The hub's certificate and key, and the CA(s) that sign device certificates."""

    cert: x509.Certificate
    key: PrivateKey
    device_roots: list[x509.Certificate]


@dataclass(slots=True)
class HubLimits:
    """Per-endpoint bounds; what happens at each is in the comment."""

    max_connections: int = 10_000  # beyond: new handshakes refused with BUSY + retry-after
    max_handshakes: int = 200  # handshakes in progress; beyond: BUSY + retry-after
    busy_retry_after_ms: int = 5_000
    max_frame_bytes: int = MAX_FRAME_BYTES  # a larger DATA frame: FRAME_TOO_LARGE, close
    idle_timeout_s: float = 90.0  # silent connections are dropped by QUIC
    max_pending_frames: int = 64  # frames held before the identity is known; beyond: close
    handshake_timeout_s: float = 10.0  # unfinished by then: dropped, its handshake slot freed
    max_streams: int = DEFAULT_MAX_STREAMS  # per device; one more: PROTOCOL_VIOLATION, close
    # stateless resets sent per second (packets for no connection: a restarted hub's
    # devices); beyond: dropped unanswered, counted (stateless_resets_limited)
    stateless_resets_per_s: int = 1000


@dataclass(eq=False, slots=True)
class HubConnection:
    """One device connection: the QUIC state, its session core, and who it is."""

    conn_id: int
    quic: QuicConnection
    addr: Address
    identity: DeviceIdentity | None = None  # set only once verified (certificate or resumption)
    ticket_identity: DeviceIdentity | None = None  # from the ticket, until PSK is accepted
    session: HubSession | None = None
    resumed: bool = False
    handshake_done: bool = False
    closed: bool = False
    readers: dict[int, FrameReader] = field(default_factory=dict)
    held: list[tuple[int, bytes]] = field(default_factory=list)
    cids: set[bytes] = field(default_factory=set)
    timer: float | None = None
    handshake_deadline: float | None = None  # until the handshake completes
    settled: bool = False  # aioquic's spent handshake state released (release_spent_state)
    unacked: int = 0  # datagrams waiting for our ACK (see ACK_EVERY)
    routed_cid_seq: int = 0  # aioquic's _host_cid_seq when its IDs were last routed (_take)

    @property
    def peer_addr(self) -> Address:
        """The address the connection is using now (changes on migration)."""
        paths = self.quic._network_paths
        return tuple(paths[0].addr) if paths else self.addr


@dataclass(frozen=True, slots=True)
class DeviceConnected:
    """Hub: a device finished its handshake."""

    conn: HubConnection


@dataclass(frozen=True, slots=True)
class DeviceDisconnected:
    """Hub: a device connection ended.

    ``error`` is the errors-by-code label of a close that no session event reported (a QUIC
    transport error, the idle timeout, the device's own application close after the
    handshake): ``QUIC_0x..``, ``QUIC_IDLE_TIMEOUT`` or ``EDGE_<code>``; "" for none.
    """

    conn: HubConnection
    code: int
    reason: str
    error: str = ""


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """Hub: a session event of one device connection."""

    conn: HubConnection
    event: SessionEvent


HubEvent = DeviceConnected | DeviceDisconnected | DeviceEvent


class HubEndpoint:
    """Every device connection of one hub UDP port, routed by connection ID."""

    def __init__(
        self,
        tls_files: HubTls,
        make_session: Callable[[HubConnection, float], HubSession],
        authorize: Callable[[DeviceIdentity], None],
        limits: HubLimits | None = None,
        clock: Clock = wall_clock,
        tickets: TicketStore | None = None,
    ) -> None:
        self.limits = limits or HubLimits()
        self._cfg: _HubConfiguration = _base_config(
            False, self.limits.idle_timeout_s, _HubConfiguration
        )
        self._cfg.connection_id_length = HUB_CID_BYTES
        self._cfg.reset_key = reset_key(tls_files.key)  # its connections read it here too
        self._cfg.certificate = tls_files.cert
        self._cfg.private_key = tls_files.key
        self._handshake_bytes = handshake_flight_bytes(tls_files.cert, self._cfg.certificate_chain)
        self._resets_window = (0.0, 0)  # (start of the current second, resets sent in it)
        self._roots = tls_files.device_roots
        self._make_session = make_session
        self._authorize = authorize
        self._clock = clock
        self.tickets = tickets or TicketStore()
        self._by_cid: dict[bytes, HubConnection] = {}
        self.connections: dict[int, HubConnection] = {}
        self._ids = itertools.count(1)
        # insertion-ordered (a dict, not a set hashed by identity): output order is the
        # order connections were touched, the same in every run
        self._dirty: dict[HubConnection, None] = {}
        self._timers: list[tuple[float, int]] = []
        self._events: deque[HubEvent] = deque()
        self._stateless: list[tuple[bytes, Address]] = []
        # Initial DCIDs refused as busy: their retransmitted Initials (sent before the refusal
        # arrived) are refused too, instead of taking a handshake slot for a client that
        # has already gone away to retry with a new connection.
        self._refused: OrderedDict[bytes, None] = OrderedDict()
        self._out: list[tuple[bytes, Address]] = []
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "junk",
                "unknown_cid",
                "busy_refused",
                "auth_failed",
                "handshakes",
                "resumed",
                "early_data",
                "handshake_timeouts",
                "handshake_errors",
                "tls_backlog_exceeded",
                "stateless_resets",
                "stateless_resets_limited",
            ),
            0,
        )
        self.accepting = True
        self._last_now = 0.0  # the latest ``now`` given: for closes from outside (no clock)
        self.handshaking = 0  # connections not yet past their handshake (kept, not scanned)

    # -- datagrams in ---------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """A UDP datagram from anyone: routed, or answered statelessly, or counted and dropped."""
        self._last_now = now
        try:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=self._cfg.connection_id_length
            )
        except ValueError:
            self.counters["junk"] += 1
            return
        if (
            header.packet_type != QuicPacketType.VERSION_NEGOTIATION
            and header.version is not None
            and header.version not in self._cfg.supported_versions
        ):
            self.counters["junk"] += 1
            if len(data) >= _MIN_INITIAL_DATAGRAM:  # RFC 9000 5.2.2: smaller ones are dropped
                vn = encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=self._cfg.supported_versions,
                )
                self._stateless.append((vn, addr))
            return
        conn = self._by_cid.get(header.destination_cid)
        fresh = conn is None
        if conn is None:
            if header.packet_type != QuicPacketType.INITIAL or len(data) < _MIN_INITIAL_DATAGRAM:
                self.counters["unknown_cid"] += 1
                if header.packet_type == QuicPacketType.ONE_RTT:
                    self._stateless_reset(header.destination_cid, len(data), addr, now)
                return
            conn = self._accept(header, data, addr, now)
            if conn is None:
                return
        conn.quic.receive_datagram(data, addr, now)
        if conn.handshake_done:
            conn.unacked = _count_for_ack(conn.quic, conn.unacked, now)
        if _tls_backlog(conn.quic) > _MAX_TLS_BACKLOG:
            self.counters["tls_backlog_exceeded"] += 1
            error = int(QuicErrorCode.CRYPTO_BUFFER_EXCEEDED)  # a transport error: CRYPTO frame
            self._drop(conn, now, error, "TLS message too large", QuicFrameType.CRYPTO)
            return
        if fresh and conn.quic._state is QuicConnectionState.FIRSTFLIGHT:
            # Nothing in it decrypted: an Initial-shaped datagram that is no client's Initial.
            # Keeping it would hold a handshake slot until the idle timeout (200 such
            # datagrams would lock every device out); forget it instead.
            self.counters["junk"] += 1
            self._forget(conn)
            return
        self._after_input(conn, now, received=True)

    def _stateless_reset(self, cid: bytes, size: int, addr: Address, now: float) -> None:
        """Answer a short-header packet for a connection this hub's key issued but that it
        does not know (see RESET_MIN_BYTES); anything else gets no answer."""
        key = self._cfg.reset_key
        length = min(size - 1, RESET_MAX_BYTES)
        if key is None or length < RESET_MIN_BYTES or not cid_is_ours(key, cid):
            return  # a reset must be shorter than what it answers, and no shorter than this
        start, sent = self._resets_window
        if now - start >= 1.0:
            start, sent = now, 0
        if sent >= self.limits.stateless_resets_per_s:
            self.counters["stateless_resets_limited"] += 1
            return
        self._resets_window = (start, sent + 1)
        self.counters["stateless_resets"] += 1
        head = os.urandom(length - _RESET_TOKEN_BYTES)  # looks like any short-header packet
        first = bytes([0x40 | (head[0] & 0x3F)])
        self._stateless.append((first + head[1:] + reset_token(key, cid), addr))

    def _accept(self, header: Any, data: bytes, addr: Address, now: float) -> HubConnection | None:
        handshaking = self.handshaking
        full = len(self.connections) >= self.limits.max_connections
        again = header.destination_cid in self._refused
        if again or not self.accepting or full or handshaking >= self.limits.max_handshakes:
            self.counters["busy_refused"] += 1
            self._refused[header.destination_cid] = None
            if len(self._refused) > _REFUSED_MEMORY:
                self._refused.popitem(last=False)
            code = ErrorCode.GOING_AWAY if not self.accepting else ErrorCode.BUSY
            reason = f"{code.name.lower()}; retry-after-ms={self.limits.busy_retry_after_ms}"
            self._stateless.append((_initial_close(header, reason), addr))
            return None
        conn_id = next(self._ids)
        box: dict[str, HubConnection] = {}
        quic = _HubQuic(
            handshake_bytes=self._handshake_bytes,
            configuration=self._cfg,
            original_destination_connection_id=header.destination_cid,
            session_ticket_fetcher=lambda label: self._fetch_ticket(box["c"], label),
            session_ticket_handler=lambda t: self._store_ticket(box["c"], t),
        )
        conn = HubConnection(conn_id, quic, addr)
        conn.handshake_deadline = now + self.limits.handshake_timeout_s
        box["c"] = conn
        quic.on_tls_ready = lambda ctx: require_client_certificate(
            ctx,
            self._roots,
            lambda ident: self._set_identity(conn, ident),
            self._authorize,
            self._clock,
        )
        self.connections[conn_id] = conn
        self.handshaking += 1
        self._register_cid(conn, header.destination_cid)
        self._register_cid(conn, quic.host_cid)
        return conn

    def _fetch_ticket(self, conn: HubConnection, label: bytes) -> tls.SessionTicket | None:
        entry = self.tickets.take(label)
        if entry is None:
            return None
        ticket, identity = entry
        try:
            self._authorize(identity)  # a revoked device cannot come back on an old ticket
        except Exception:
            return None
        # A PSK handshake has no Certificate message: stop asking for one.  The identity
        # counts only once aioquic has really accepted the PSK (tls.session_resumed).
        conn.quic.tls._request_client_certificate = False
        conn.ticket_identity = identity
        return ticket

    def _store_ticket(self, conn: HubConnection, ticket: tls.SessionTicket) -> None:
        if conn.identity is not None:
            self.tickets.add(ticket, conn.identity)

    def _set_identity(self, conn: HubConnection, identity: DeviceIdentity) -> None:
        conn.identity = identity

    # -- processing -------------------------------------------------------------

    def _after_input(self, conn: HubConnection, now: float, received: bool = False) -> None:
        if conn.identity is None and conn.ticket_identity is not None:
            tls_ctx = getattr(conn.quic, "tls", None)
            if tls_ctx is not None and tls_ctx.session_resumed:
                conn.identity, conn.resumed = conn.ticket_identity, True
        while (ev := conn.quic.next_event()) is not None:
            self._on_quic_event(conn, ev, now)
        if conn.settled:
            tend_idle(conn.quic)
        elif conn.handshake_done and not conn.closed:
            conn.settled = release_spent_state(conn.quic)  # the rest: 0-RTT over, ticket acked
        if conn.session is None and conn.identity is not None and not conn.closed:
            conn.session = self._make_session(conn, now)
            held, conn.held = conn.held, []
            for sid, data in held:
                self._on_stream_data(conn, sid, data, now)
        self._flush_session(conn, now, received)

    def _on_quic_event(self, conn: HubConnection, ev: qe.QuicEvent, now: float) -> None:
        if isinstance(ev, qe.StreamDataReceived):
            self._on_stream_data(conn, ev.stream_id, ev.data, now)
        elif isinstance(ev, qe.DatagramFrameReceived):
            self._on_datagram(conn, ev.data)
        elif isinstance(ev, qe.HandshakeCompleted):
            conn.handshake_done = True
            q: Any = conn.quic
            q._ack_delay = HUB_ACK_DELAY_S
            self.handshaking -= 1
            conn.handshake_deadline = None
            self.counters["handshakes"] += 1
            self.counters["resumed"] += int(ev.session_resumed)
            self.counters["early_data"] += int(ev.early_data_accepted)
            if conn.identity is not None:
                conn.settled = release_spent_state(conn.quic)
                self._events.append(DeviceConnected(conn))
            else:
                self.counters["auth_failed"] += 1
                reason = "no verified device identity"
                conn.quic.close(error_code=int(ErrorCode.AUTH_FAILED), reason_phrase=reason)
        elif isinstance(ev, qe.ConnectionIdIssued):
            self._register_cid(conn, ev.connection_id)
        elif isinstance(ev, qe.ConnectionIdRetired):
            self._by_cid.pop(ev.connection_id, None)
            conn.cids.discard(ev.connection_id)
        elif isinstance(ev, qe.ConnectionTerminated):
            self._terminated(conn, ev)

    def _on_stream_data(self, conn: HubConnection, sid: int, data: bytes, now: float) -> None:
        if conn.session is None:
            if len(conn.held) >= self.limits.max_pending_frames:
                conn.quic.close(int(ErrorCode.PROTOCOL_VIOLATION), reason_phrase="too early")
                return
            conn.held.append((sid, data))
            return
        reader = conn.readers.get(sid)
        if reader is None:
            if sid % 4 != 0 or len(conn.readers) >= self.limits.max_streams:
                conn.session.fail(ErrorCode.PROTOCOL_VIOLATION, f"unexpected stream {sid}")
                return
            reader = conn.readers[sid] = FrameReader(self.limits.max_frame_bytes)
        try:
            frames = reader.feed(data)
        except WireError as exc:
            conn.session.fail(exc.code, exc.reason)
            return
        for frame in frames:
            conn.session.receive_frame(frame, now, len(data) // max(len(frames), 1))

    def _on_datagram(self, conn: HubConnection, data: bytes) -> None:
        if conn.session is None:
            return
        try:
            conn.session.receive_heartbeat(decode_datagram(data))
        except WireError as exc:
            conn.session.fail(exc.code, exc.reason)

    def _flush_session(self, conn: HubConnection, now: float, received: bool = False) -> None:
        session = conn.session
        frames: list[tuple[int, bytes]] = []
        if session is not None:
            frames = session.frames_to_send()
            # Stream 0 is the device's: until it has opened it (its HELLO), aioquic refuses to
            # send on it.  Only an ERROR can be due then, and the close below carries it too.
            if 0 in conn.readers and frames:
                for _, data in frames:
                    conn.quic.send_stream_data(0, data)
                _ack_with_next_packet(conn.quic, now)
            closing: SessionClosed | None = None
            while (sev := session.next_event()) is not None:
                if isinstance(sev, SessionClosed):
                    closing = sev
                self._events.append(DeviceEvent(conn, sev))
            if closing is not None and not conn.closed:
                self._dirty[conn] = None
                self._out.extend(self._take(conn, now))  # the ERROR frame goes out first
                conn.quic.close(error_code=int(closing.code), reason_phrase=closing.reason)
        if not (received and not frames and conn.settled and _ack_held(conn.quic, now)):
            self._dirty[conn] = None
        if conn not in self._dirty:  # a dirty one: when its datagrams are taken (_take)
            self._arm(conn)

    def _arm(self, conn: HubConnection) -> None:
        times = [conn.quic.get_timer(), conn.handshake_deadline]
        if conn.session is not None:
            times.append(conn.session.get_timer())
        t = min((x for x in times if x is not None), default=None)
        conn.timer, before = t, conn.timer
        if t is not None and t != before:
            heapq.heappush(self._timers, (t, conn.conn_id))
            if len(self._timers) > 2 * len(self.connections) + 64:
                self._rebuild_timers()

    def _rebuild_timers(self) -> None:
        """Only the live deadline of each connection (the heap keeps superseded ones until
        they come up: an idle device's every heartbeat moves its deadline and leaves one)."""
        live = self.connections.values()
        self._timers = [(c.timer, c.conn_id) for c in live if c.timer is not None]
        heapq.heapify(self._timers)

    def _terminated(self, conn: HubConnection, ev: qe.ConnectionTerminated) -> None:
        if conn.closed:
            return
        conn.closed = True
        error = ""
        if conn.session is not None:
            if ev.error_code and conn.handshake_done and conn.session.state is not HubState.CLOSED:
                error = uncounted_close_label(ev)  # the session did not end it: say why
            conn.session.close(ErrorCode.NO_ERROR, ev.reason_phrase or "")
            while (sev := conn.session.next_event()) is not None:
                self._events.append(DeviceEvent(conn, sev))
        if not conn.handshake_done and ev.error_code >= QuicErrorCode.CRYPTO_ERROR:
            self.counters["auth_failed"] += 1
        elif not conn.handshake_done and ev.error_code:
            self.counters["handshake_errors"] += 1  # a QUIC protocol error mid-handshake
        reason = ev.reason_phrase or ""
        self._events.append(DeviceDisconnected(conn, ev.error_code, reason, error))

    def _register_cid(self, conn: HubConnection, cid: bytes) -> None:
        self._by_cid[cid] = conn
        conn.cids.add(cid)

    def _forget(self, conn: HubConnection) -> None:
        for cid in conn.cids:
            if self._by_cid.get(cid) is conn:
                del self._by_cid[cid]
        if self.connections.pop(conn.conn_id, None) is not None and not conn.handshake_done:
            self.handshaking -= 1
        self._dirty.pop(conn, None)

    # -- output and timers -------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Every datagram due now, from every connection touched since the last call."""
        self._last_now = now
        out, self._stateless = self._stateless, []
        out.extend(self._out)
        self._out = []
        dirty, self._dirty = self._dirty, {}
        for conn in dirty:
            out.extend(self._take(conn, now))
        return out

    def _take(self, conn: HubConnection, now: float) -> list[tuple[bytes, Address]]:
        out = [(d, a) for d, a in conn.quic.datagrams_to_send(now)]
        # IDs it announced just now route here at once (their ConnectionIdIssued events are
        # read with the next input): a device may switch to one in its very next packet, and
        # an ID of ours that routes nowhere is answered with a stateless reset
        q: Any = conn.quic
        if conn.routed_cid_seq != q._host_cid_seq:  # it made IDs: not a loop per datagram
            conn.routed_cid_seq = q._host_cid_seq
            for c in q._host_cids:
                if c.cid not in conn.cids:
                    self._register_cid(conn, c.cid)
        if out:
            conn.unacked = _count_after_send(conn.quic, conn.unacked)
        if conn.quic._state is QuicConnectionState.TERMINATED:
            if not conn.closed:
                self._terminated(conn, qe.ConnectionTerminated(0, None, "terminated"))
            self._forget(conn)
        else:
            self._arm(conn)
        return out

    def _arm_dirty(self) -> None:
        """Arm the connections touched since the last ``datagrams_to_send`` (which arms
        them as it takes their datagrams): the timer is asked for before it."""
        for conn in self._dirty:
            self._arm(conn)

    def get_timer(self) -> float | None:
        """The earliest deadline over all connections."""
        if self._dirty:
            self._arm_dirty()
        while self._timers:
            t, cid = self._timers[0]
            conn = self.connections.get(cid)
            if conn is not None and conn.timer == t:
                return t
            heapq.heappop(self._timers)
        return None

    def handle_timer(self, now: float) -> None:
        """Run every connection whose deadline has passed (each once per call)."""
        self._last_now = now
        if self._dirty:
            self._arm_dirty()
        due: list[HubConnection] = []
        while self._timers and self._timers[0][0] <= now:
            t, cid = heapq.heappop(self._timers)
            conn = self.connections.get(cid)
            if conn is not None and conn.timer == t:
                conn.timer = None
                due.append(conn)
        for conn in due:
            if conn.handshake_deadline is not None and now >= conn.handshake_deadline:
                self.counters["handshake_timeouts"] += 1
                self._drop(conn, now, int(ErrorCode.IDLE_TIMEOUT), "handshake timeout")
                continue
            qt = conn.quic.get_timer()
            if qt is not None and qt <= now:
                conn.quic.handle_timer(now)
            if conn.session is not None:
                st = conn.session.get_timer()
                if st is not None and st <= now:
                    conn.session.handle_timer(now)
            self._after_input(conn, now)

    def _drop(
        self,
        conn: HubConnection,
        now: float,
        code: int,
        reason: str,
        frame_type: QuicFrameType | None = None,
    ) -> None:
        """Close a connection, say so once, and hold nothing more for it at once.

        For handshakes that did not finish in time (the peer went away -- a device refused
        busy whose retransmitted Initial got in later, a dead link -- or stalls on purpose)
        and peers that make TLS buffer too much: neither may keep a handshake slot or
        memory for the few PTOs of a closing state.
        """
        conn.quic.close(error_code=code, frame_type=frame_type, reason_phrase=reason)
        self._out.extend(conn.quic.datagrams_to_send(now))
        self._terminated(conn, qe.ConnectionTerminated(code, None, reason))
        self._forget(conn)

    def touch(self, conn: HubConnection, now: float) -> None:
        """The shell changed a session from outside (a commit finished): flush its output."""
        self._last_now = now
        if not conn.closed:
            self._flush_session(conn, now)

    def close_connection(self, conn: HubConnection, code: ErrorCode, reason: str) -> None:
        """Close one device connection with a typed code (revocation, shutdown, replaced)."""
        if conn.closed:
            return
        if conn.session is not None:
            conn.session.fail(code, reason)
            self._flush_session(conn, self._last_now)
        else:
            conn.quic.close(error_code=int(code), reason_phrase=reason)
            self._dirty[conn] = None

    def next_event(self) -> HubEvent | None:
        """The next hub event."""
        return self._events.popleft() if self._events else None


def uncounted_close_label(ev: qe.ConnectionTerminated) -> str:
    """The errors-by-code label of a nonzero close that no Squall session reported.

    aioquic's events carry ``frame_type`` for transport closes (its own errors, the peer's
    TRANSPORT_CLOSE, the idle timeout) and None for application closes (the device's code).
    """
    if ev.frame_type is None:
        if ev.error_code == ErrorCode.GOING_AWAY:
            return ""  # the agent's goodbye (shutdown, a newer session): no error
        try:
            return f"EDGE_{ErrorCode(ev.error_code).name}"
        except ValueError:
            return f"EDGE_0x{ev.error_code:x}"
    if ev.reason_phrase == "Idle timeout" and ev.error_code == QuicErrorCode.INTERNAL_ERROR:
        return "QUIC_IDLE_TIMEOUT"  # aioquic's own silent close (no frame is sent)
    return f"QUIC_0x{ev.error_code:x}"


def _tls_backlog(quic: QuicConnection) -> int:
    """Bytes aioquic's TLS context holds towards a handshake message not yet complete."""
    return len(getattr(getattr(quic, "tls", None), "_receive_buffer", b""))


# --- what an established hub connection keeps ------------------------------------------
#
# aioquic keeps every piece of handshake state for a connection's whole life; a hub holds
# thousands of idle device connections.  Once a server connection's handshake is confirmed
# (its HANDSHAKE keys discarded, which aioquic does on the client's Finished, before the
# HandshakeCompleted event) the endpoint swaps what aioquic never reads again for shared or
# smaller stand-ins (``release_spent_state``), and a few per-connection structures are
# lighter from the start (``_HubQuic``).  Each replacement notes the aioquic 1.7.2 code that
# proves it is not read again; tests/unit/test_quic_memory.py pins those assumptions
# (``check_aioquic_internals`` and behaviour: late packets of discarded epochs, key
# update, migration, post-handshake TLS messages, close).

# Connection IDs each side keeps for the other.  RFC 9000 5.1.1: at least 2 (the one in use
# and one spare, which is what a new path or a CID change takes); aioquic issues up to 8,
# ~500 bytes per extra pair.  A NAT rebinding keeps the CID in use (RFC 9000 9.5), so one
# spare is enough; after a switch the old CID is retired and a new spare issued.
_HUB_ACTIVE_CIDS = 2

# What a server's TLS writes per epoch.  A ServerHello is at most ~250 bytes (32-byte echoed
# session id, one key share of at most 97 bytes, PSK and version extensions); a
# NewSessionTicket ~100 (aioquic's 64-byte label).  The HANDSHAKE flight is
# EncryptedExtensions (ALPN, transport parameters), CertificateRequest, the hub's
# certificate chain, CertificateVerify (a signature: <= 512 bytes up to RSA-4096) and
# Finished: the chain plus well under 2 KiB.  The margins are generous because an overflow
# would be an exception inside aioquic, not a TLS alert.
_SERVER_HELLO_BYTES = 2048
_SESSION_TICKET_BYTES = 2048
_HANDSHAKE_FLIGHT_MARGIN = 4096


def handshake_flight_bytes(cert: x509.Certificate, chain: list[x509.Certificate]) -> int:
    """TLS output buffer a server needs for its HANDSHAKE flight with this certificate chain."""
    der = sum(len(c.public_bytes(Encoding.DER)) for c in [cert, *chain])
    return der + _HANDSHAKE_FLIGHT_MARGIN


# aioquic 1.7.2 internals the above relies on, per object; check_aioquic_internals pins them.
_PINNED: dict[str, tuple[str, ...]] = {
    "QuicConnection": (
        "_QuicConnection__frame_handlers",
        "_crypto_buffers",
        "_crypto_streams",
        "_cryptos",
        "_cryptos_initial",
        "_datagrams_pending",
        "_events",
        "_handshake_confirmed",
        "_host_cid_seq",
        "_host_cids",
        "_is_client",
        "_local_active_connection_id_limit",
        "_local_initial_source_connection_id",
        "_logger",
        "_loss",
        "_network_paths",
        "_original_destination_connection_id",
        "_peer_cid",
        "_ping_pending",
        "_quic_logger",
        "_remote_active_connection_id_limit",
        "_remote_version_information",
        "_session_ticket_fetcher",
        "_session_ticket_handler",
        "_spaces",
        "_state",
    ),
    "QuicPacketRecovery": ("_logger", "spaces"),
    "QuicPacketSpace": (
        "ack_at",
        "ack_eliciting_in_flight",
        "discarded",
        "received_packets",
        "sent_packets",
    ),
    "QuicStreamSender": ("_buffer", "_buffer_start", "_buffer_stop", "_pending"),
    "QuicStreamReceiver": ("_buffer", "highest_offset"),
    "CryptoContext": ("_setup_cb", "_teardown_cb"),
    "QuicNetworkPath": ("local_challenges", "remote_challenges"),
}
_PINNED_METHODS = ("_initialize", "_replenish_connection_ids", "_push_crypto_data")


class _SmallQueue(list[Any]):
    """A list with deque's ``append``/``popleft`` (and ``maxlen``) for aioquic's tiny queues.

    An empty ``collections.deque`` holds a 64-slot block (~700 bytes); aioquic keeps four per
    connection (events, pending datagrams, a path's challenges sent and received), which
    hold a handful of items at most between two calls.  aioquic uses only append, popleft,
    clear, ``in``, ``len``, truth and ``[0]`` on them (pinned by the tests).
    """

    __slots__ = ("maxlen",)

    def __init__(self, items: Any = (), maxlen: int | None = None) -> None:
        super().__init__(items)
        self.maxlen = maxlen

    def append(self, item: Any) -> None:
        """Add at the right end; beyond ``maxlen`` the oldest item goes, as in a deque."""
        super().append(item)
        if self.maxlen is not None and len(self) > self.maxlen:
            del self[0]

    def popleft(self) -> Any:
        """Remove and return the leftmost item (IndexError when empty, as a deque)."""
        return self.pop(0)


def _small(queue: Any) -> _SmallQueue | Any:
    """``queue`` as a _SmallQueue (same items, same bound) unless it already is one."""
    if isinstance(queue, deque):
        return _SmallQueue(queue, queue.maxlen)
    return queue


class _PacketWindow:
    """aioquic's ``QuicPacketNumberWindow`` (duplicate detection) in one int bitmap.

    Same answers (the tests compare both on random sequences): packet numbers below the
    window count as received, the window is the last ``2 * MAX_ACK_RANGES`` numbers.  The
    original keeps a set of 128 to 256 ints once a connection has received a few hundred
    packets (a device idling on 10 s heartbeats for half an hour): 13-17 KB.  The bitmap is
    one 128-bit int.
    """

    __slots__ = ("_bits", "_lower")
    SIZE = 2 * MAX_ACK_RANGES

    def __init__(self) -> None:
        self._lower = 0
        self._bits = 0  # bit i: packet number _lower + i was received

    def add(self, packet_number: int) -> None:
        """Note a received packet number; the window slides so that it is the upper end."""
        if packet_number < self._lower:
            return
        lower = packet_number - self.SIZE + 1
        if lower > self._lower:
            self._bits >>= lower - self._lower
            self._lower = lower
        self._bits |= 1 << (packet_number - self._lower)

    def __contains__(self, packet_number: int) -> bool:
        offset = packet_number - self._lower
        return offset < 0 or (offset < self.SIZE and (self._bits >> offset) & 1 == 1)


class _FrameHandlers:
    """aioquic's frame dispatch table for one connection, without a per-connection copy.

    ``QuicConnection.__init__`` builds a 33-entry dict of (bound method, epochs) per
    connection (~6 KB); ``_payload_received`` only ever does ``table[frame_type]`` and
    treats KeyError as an unknown frame type.  This view keeps the method names once per
    process and binds on lookup.
    """

    __slots__ = ("_conn",)
    table: dict[int, tuple[str, frozenset[tls.Epoch]]] | None = None

    def __init__(self, conn: QuicConnection) -> None:
        self._conn = conn

    def __getitem__(self, frame_type: int) -> tuple[Callable[..., None], frozenset[tls.Epoch]]:
        assert _FrameHandlers.table is not None
        name, epochs = _FrameHandlers.table[frame_type]  # KeyError: unknown, as in aioquic
        handler: Callable[..., None] = getattr(self._conn, name)
        return handler, epochs

    @classmethod
    def install(cls, conn: QuicConnection) -> bool:
        """Replace ``conn``'s own table by a view, if it has the shape this relies on."""
        own = vars(conn).get("_QuicConnection__frame_handlers")
        if not isinstance(own, dict):
            return False
        if cls.table is None:
            table: dict[int, tuple[str, frozenset[tls.Epoch]]] = {}
            for frame_type, (handler, epochs) in own.items():
                name = getattr(handler, "__name__", "")
                if getattr(handler, "__self__", None) is not conn or not isinstance(
                    epochs, frozenset
                ):
                    return False
                if getattr(conn, name, None) != handler:
                    return False
                table[frame_type] = (name, epochs)
            cls.table = table
        elif own.keys() != cls.table.keys():
            return False
        vars(conn)["_QuicConnection__frame_handlers"] = cls(conn)
        return True


class _SpentStreamPart:
    """Receiver and sender of a crypto stream that is over: holds nothing, refuses input."""

    __slots__ = ("_code", "_reason")
    buffer_is_empty = True
    is_finished = True

    def __init__(self, code: int, reason: str) -> None:
        self._code = code
        self._reason = reason

    def starting_offset(self) -> int:
        """Offset the next CRYPTO data would start at (none is expected)."""
        return 0

    def handle_frame(self, frame: Any) -> None:
        """CRYPTO data: a connection error (aioquic closes the connection with it)."""
        raise QuicConnectionError(self._code, QuicFrameType.CRYPTO, self._reason)

    def write(self, data: bytes, end_stream: bool = False) -> None:
        """TLS output: there is none after the handshake (empty writes are accepted)."""
        if data or end_stream:
            raise QuicConnectionError(
                QuicErrorCode.INTERNAL_ERROR, QuicFrameType.CRYPTO, "TLS output after handshake"
            )


class _SpentCryptoStream:
    """Stands in for a crypto stream that is over, shared by every established connection."""

    __slots__ = ("receiver", "sender")

    def __init__(self, part: _SpentStreamPart) -> None:
        self.receiver = self.sender = part


class _EstablishedTls:
    """What is left of a server's TLS context once the handshake is confirmed.

    aioquic 1.7.2 reads ``QuicConnection.tls`` after that only in ``_handle_crypto_frame``
    (1-RTT CRYPTO data from the client) and there a server context in SERVER_POST_HANDSHAKE
    raises unexpected_message for whatever complete message comes (tls.py
    ``_handle_reassembled_message``).  In QUIC a client has nothing to send there (no
    KeyUpdate, RFC 9001 section 6; no EndOfEarlyData, 8.3; the hub never asks for
    post-handshake auth), so this refuses the first byte rather than buffering up to a
    message.  Key updates use the 1-RTT secrets in the CryptoPair, not the TLS key
    schedule.  What goes: the key schedule and its transcript hash, both certificate
    chains, extensions, the issued ticket and the callbacks (~10 KB with OpenSSL's part).
    """

    __slots__ = ("alpn_negotiated", "early_data_accepted", "session_resumed")
    state = tls.State.SERVER_POST_HANDSHAKE
    _receive_buffer = b""  # read by _tls_backlog

    def __init__(self, ctx: tls.Context) -> None:
        self.session_resumed = ctx.session_resumed
        self.early_data_accepted = ctx.early_data_accepted
        self.alpn_negotiated = ctx.alpn_negotiated

    def handle_message(self, input_data: bytes, output_buf: dict[tls.Epoch, Buffer]) -> None:
        """Post-handshake TLS data from a client: unexpected_message (closes with 0x10a)."""
        if input_data:
            raise tls.AlertUnexpectedMessage("no TLS message is expected after the handshake")


def _spent_space() -> QuicPacketSpace:
    space = QuicPacketSpace()
    space.discarded = True
    return space


# Shared by every established hub connection: nothing writes to them once their epoch is
# discarded (aioquic: a discarded epoch's packets fail to decrypt before its space or
# stream is touched; recovery only reads the spaces it has discarded; datagrams_to_send
# writes INITIAL/HANDSHAKE packets only before the handshake is confirmed).
_SPENT_PAIR = CryptoPair()
_SPENT_SPACE = _spent_space()
_SPENT_STREAM = _SpentCryptoStream(
    _SpentStreamPart(QuicErrorCode.INTERNAL_ERROR, "CRYPTO data in a discarded epoch")
)
# The 1-RTT crypto stream once the session ticket it carried is acknowledged: what a client
# might still send there, the TLS context would refuse (see _EstablishedTls).
_SPENT_ONE_RTT_STREAM = _SpentCryptoStream(
    _SpentStreamPart(
        QuicErrorCode.CRYPTO_ERROR + tls.AlertDescription.unexpected_message,
        "no TLS message is expected after the handshake",
    )
)
_SPENT_INITIAL_PAIRS: dict[tuple[int, ...], dict[int, CryptoPair]] = {}
_FEW_PACKETS = 8
_FEW_PACKETS_DICT_BYTES = 640  # a dict of < 8 entries takes <= 352 B; larger, it held more once
_ACK_ONLY_BACKLOG = 16  # unacknowledged ACK-only packets before the hub sends a PING


class _ConnLog:
    """aioquic's per-connection ``QuicConnectionAdapter`` (two dicts and a hex string, ~600
    bytes) as a view: the same "[odcid] message" lines, prefixed only when one is logged."""

    __slots__ = ("_quic",)

    def __init__(self, quic: QuicConnection) -> None:
        self._quic = quic

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log ``msg`` at ``level`` on aioquic's logger, with the connection's id."""
        if _aioquic_connection.logger.isEnabledFor(level):
            odcid: bytes = getattr(self._quic, "_original_destination_connection_id", b"")
            text = f"[{_aioquic_connection.dump_cid(odcid)}] {msg}"
            _aioquic_connection.logger.log(level, text, *args, **kwargs)

    def isEnabledFor(self, level: int) -> bool:
        """Whether aioquic's logger takes ``level``."""
        return _aioquic_connection.logger.isEnabledFor(level)

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """logging.DEBUG."""
        self.log(logging.DEBUG, msg, *args, **kwargs)

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """logging.INFO."""
        self.log(logging.INFO, msg, *args, **kwargs)

    def warning(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """logging.WARNING."""
        self.log(logging.WARNING, msg, *args, **kwargs)

    def error(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """logging.ERROR."""
        self.log(logging.ERROR, msg, *args, **kwargs)


def check_aioquic_internals() -> list[str]:
    """The aioquic internals the hub's lean connections rely on that are missing (none)."""
    conn = QuicConnection(configuration=QuicConfiguration(is_client=True))
    stream = QuicStream()
    samples: dict[str, object] = {
        "QuicConnection": conn,
        "QuicPacketRecovery": getattr(conn, "_loss", None),
        "QuicPacketSpace": QuicPacketSpace(),
        "QuicStreamSender": stream.sender,
        "QuicStreamReceiver": stream.receiver,
        "CryptoContext": CryptoPair().recv,
        "QuicNetworkPath": QuicNetworkPath(("127.0.0.1", 0)),
    }
    missing = [
        f"{kind}.{name}"
        for kind, names in _PINNED.items()
        for name in names
        if name not in getattr(samples[kind], "__dict__", {})
    ]
    missing += [f"QuicConnection.{m}" for m in _PINNED_METHODS if not hasattr(QuicConnection, m)]
    missing += [
        f"aioquic.quic.connection.{name}"
        for name in ("logger", "dump_cid")
        if not hasattr(_aioquic_connection, name)
    ]
    if not isinstance(vars(conn).get("_QuicConnection__frame_handlers"), dict):
        missing.append("QuicConnection.__frame_handlers (a dict)")
    return missing


def _lean_ok() -> bool:
    """Whether this aioquic has what the lean hub connection relies on (checked once)."""
    global _LEAN
    if _LEAN is None:
        missing = check_aioquic_internals()
        _LEAN = not missing
        if missing:
            logging.getLogger("squall.quic").warning(
                "aioquic changed (%s): hub connections keep aioquic's full state", missing
            )
    return _LEAN


_LEAN: bool | None = None


def release_spent_state(quic: QuicConnection) -> bool:
    """Drop what a confirmed server connection no longer reads; True once all is dropped.

    Idempotent.  Returns False while something is still in use -- 0-RTT keys (a resumed
    connection before the client's first 1-RTT packet, when aioquic discards them), the
    session ticket not yet acknowledged -- so the endpoint calls again on later input.
    """
    q: Any = quic
    if not _lean_ok() or q._is_client or q._state is not QuicConnectionState.CONNECTED:
        return True  # nothing to do (a closing connection goes away whole)
    if not q._handshake_confirmed:
        return False
    for epoch in (tls.Epoch.INITIAL, tls.Epoch.HANDSHAKE):
        _release_epoch(q, epoch)
    if isinstance(q.tls, tls.Context) and not _release_tls(q):
        return False
    for path in q._network_paths:
        path.local_challenges = _small(path.local_challenges)
        path.remote_challenges = _small(path.remote_challenges)
    done = _release_one_rtt_crypto_stream(q)
    zero_rtt = q._cryptos[tls.Epoch.ZERO_RTT]
    if zero_rtt is not _SPENT_PAIR:
        if zero_rtt.recv.is_valid() or zero_rtt.send.is_valid():
            return False  # aioquic tears them down at the first 1-RTT packet
        q._cryptos[tls.Epoch.ZERO_RTT] = _SPENT_PAIR
    if done:
        _repack(q)
    return done


def _release_epoch(q: Any, epoch: tls.Epoch) -> None:
    """A discarded INITIAL or HANDSHAKE epoch: its space, keys and crypto stream -> shared."""
    space = q._spaces[epoch]
    if space is _SPENT_SPACE or not space.discarded:
        return
    if space.sent_packets or space.ack_at is not None:
        return  # not what aioquic's discard_space leaves: keep it
    q._spaces[epoch] = _SPENT_SPACE
    q._loss.spaces = [_SPENT_SPACE if s is space else s for s in q._loss.spaces]
    q._cryptos[epoch] = _SPENT_PAIR
    q._crypto_streams[epoch] = _SPENT_STREAM
    if epoch is tls.Epoch.INITIAL:
        # read only as ``_cryptos_initial[version]`` for late Initial packets (which then
        # fail to decrypt); written only in _initialize: one dict per version set will do
        versions = tuple(q._cryptos_initial)
        q._cryptos_initial = _SPENT_INITIAL_PAIRS.setdefault(
            versions, dict.fromkeys(versions, _SPENT_PAIR)
        )


def _release_tls(q: Any) -> bool:
    """The TLS context -> _EstablishedTls, with everything only the handshake used."""
    ctx = q.tls
    if ctx.state is not tls.State.SERVER_POST_HANDSHAKE or ctx._receive_buffer:
        return False
    if any(b.tell() for b in q._crypto_buffers.values()):
        return False
    q.tls = _EstablishedTls(ctx)
    # The TLS output buffers: with the context gone nothing writes them, and aioquic reads
    # them only in _push_crypto_data, right after a TLS call.
    q._crypto_buffers = {}
    q._session_ticket_fetcher = q._session_ticket_handler = None
    q._remote_version_information = None  # read only while parsing transport parameters
    q._logger = q._loss._logger = _ConnLog(q)
    if q._quic_logger is None:  # the key-log callbacks write to the qlog only
        one_rtt = q._cryptos[tls.Epoch.ONE_RTT]
        for c in (one_rtt.recv, one_rtt.send):
            c._setup_cb = c._teardown_cb = NoCallback
    return True


def _release_one_rtt_crypto_stream(q: Any) -> bool:
    """The 1-RTT crypto stream -> shared, once the session ticket it carried is acknowledged
    (the stream is then empty: nothing pending, nothing in flight, nothing received)."""
    stream = q._crypto_streams[tls.Epoch.ONE_RTT]
    if stream is _SPENT_ONE_RTT_STREAM:
        return True
    sender, receiver = stream.sender, stream.receiver
    if len(sender._pending) or sender._buffer or sender._buffer_start != sender._buffer_stop:
        return False
    if receiver.highest_offset or receiver._buffer:
        return False
    q._crypto_streams[tls.Epoch.ONE_RTT] = _SPENT_ONE_RTT_STREAM
    return True


def _repack(q: Any) -> None:
    """Rebuild the connection's attribute dict without the hub's handshake-time attributes.

    aioquic 1.7.2 sets 85 attributes: the most a 128-slot dict holds.  One more (the hub's
    own, until now) and the dict doubles to 3.3 KB; deleting keys does not shrink it back.
    """
    attrs = vars(q)
    attrs.pop("on_tls_ready", None)
    attrs.pop("_handshake_bytes", None)
    q.__dict__ = {k: v for k, v in attrs.items()}


def tend_idle(quic: QuicConnection) -> None:
    """Keep a settled connection from collecting state while it idles (cheap: on any input).

    * A hub that only acknowledges (a device's heartbeats) sends ACK-only packets, which the
      device never acknowledges: aioquic keeps every one in ``sent_packets`` (~0.4 KB each,
      one per heartbeat: ~140 KB an hour).  RFC 9000 13.2.4: send an ack-eliciting frame
      now and then; the device's ACK of that PING covers all of them.  Once
      ``_ACK_ONLY_BACKLOG`` have piled up with nothing ack-eliciting in flight, the hub
      sends a PING: one ~60-byte datagram each way (IP and UDP included) per 16
      heartbeats, ~5% more idle traffic.
    * A dict keeps the table of its largest size: the ``sent_packets`` of a connection that
      once had many packets in flight is rebuilt small once only a few are left.
    * A path the device moved to (NAT rebinding) comes with aioquic's two deques.
    """
    q: Any = quic
    spaces = getattr(q, "_spaces", None) if _lean_ok() else None
    space = spaces.get(tls.Epoch.ONE_RTT) if spaces else None
    if space is None:
        return
    for path in q._network_paths:
        if type(path.remote_challenges) is deque:
            path.local_challenges = _small(path.local_challenges)
            path.remote_challenges = _small(path.remote_challenges)
    packets = space.sent_packets
    if len(packets) < _FEW_PACKETS and sys.getsizeof(packets) > _FEW_PACKETS_DICT_BYTES:
        space.sent_packets = {k: v for k, v in packets.items()}  # same order, small table
    elif (
        len(packets) >= _ACK_ONLY_BACKLOG
        and not space.ack_eliciting_in_flight
        and not q._ping_pending  # one PING at a time: aioquic sends it in the next packet
    ):
        quic.send_ping(0)


class _HubQuic(QuicConnection):
    """The hub's QuicConnection: arms device authentication once TLS exists, and keeps less.

    From the start: one shared frame-handler table, list-based event and datagram queues, a
    bitmap for duplicate detection, two connection IDs per side instead of eight.
    """

    on_tls_ready: Callable[[tls.Context], None] | None = None

    _handshake_bytes = 16384  # until _initialize: the HANDSHAKE flight's buffer

    def __init__(self, *, handshake_bytes: int = 16384, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        q: Any = self
        key = self._reset_key()
        if key is not None:
            # before any packet is built; the first ID's token travels in the transport
            # parameters, the others' in NEW_CONNECTION_ID frames (_derive_reset_tokens)
            first: Any = self._host_cids[0]
            first.cid = self.host_cid = hub_cid(key, len(first.cid))
            first.stateless_reset_token = reset_token(key, first.cid)
            q._local_initial_source_connection_id = first.cid  # what the client checks
        if not _lean_ok():
            return
        self._handshake_bytes = handshake_bytes
        _FrameHandlers.install(self)
        q._events = _small(q._events)
        q._datagrams_pending = _small(q._datagrams_pending)
        q._local_active_connection_id_limit = _HUB_ACTIVE_CIDS

    def _reset_key(self) -> bytes | None:
        """The hub's reset key, if its connection IDs are long enough to carry a MAC and
        this aioquic has the internals the IDs are set through."""
        if self._configuration.connection_id_length < _CID_RANDOM_BYTES + 4 or not _lean_ok():
            return None
        key: bytes | None = getattr(self._configuration, "reset_key", None)
        return key

    def _derive_reset_tokens(self) -> None:
        """Give connection IDs not yet announced the hub's kind of ID and derived reset
        token (aioquic draws random ones, which a restarted hub could not recognise)."""
        key = self._reset_key()
        if key is None:
            return
        q: Any = self
        for c in q._host_cids:
            if not c.was_sent and not cid_is_ours(key, c.cid):
                c.cid = hub_cid(key, len(c.cid))
                c.stateless_reset_token = reset_token(key, c.cid)

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if _lean_ok():
            self._lean_buffers()
        if self.on_tls_ready is not None:
            self.on_tls_ready(self.tls)

    def _lean_buffers(self) -> None:
        # aioquic gives each handshake three 16 KiB TLS output buffers; a server writes one
        # ServerHello (INITIAL), one flight ending in Finished (HANDSHAKE) and one
        # NewSessionTicket (1-RTT) into them.  Sized to that, a storm of handshakes in
        # progress holds ~8 KiB each instead of 48 (the hub's peak memory, which stays).
        q: Any = self
        q._crypto_buffers = {
            tls.Epoch.INITIAL: Buffer(capacity=_SERVER_HELLO_BYTES),
            tls.Epoch.HANDSHAKE: Buffer(capacity=self._handshake_bytes),
            tls.Epoch.ONE_RTT: Buffer(capacity=_SESSION_TICKET_BYTES),
        }
        for space in self._spaces.values():
            space.received_packets = _PacketWindow()  # type: ignore[assignment]

    def _replenish_connection_ids(self) -> None:
        # RFC 9000 5.1.1: an endpoint may issue fewer connection IDs than the peer's limit
        q: Any = self
        if _lean_ok():
            q._remote_active_connection_id_limit = min(
                q._remote_active_connection_id_limit, _HUB_ACTIVE_CIDS
            )
        super()._replenish_connection_ids()
        self._derive_reset_tokens()  # before NEW_CONNECTION_ID frames carry them


def _initial_close(header: Any, reason: str) -> bytes:
    """A stateless Initial packet closing a new connection (busy or draining) with a reason."""
    crypto = CryptoPair()
    crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
    builder = QuicPacketBuilder(
        host_cid=os.urandom(8),
        is_client=False,
        max_datagram_size=1200,
        peer_cid=header.source_cid,
        version=header.version,
    )
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    phrase = reason.encode()[:200]
    buf = builder.start_frame(QuicFrameType.TRANSPORT_CLOSE, capacity=16 + len(phrase))
    buf.push_uint_var(QuicErrorCode.CONNECTION_REFUSED)
    buf.push_uint_var(QuicFrameType.PADDING)
    buf.push_uint_var(len(phrase))
    buf.push_bytes(phrase)
    datagrams, _ = builder.flush()
    return bytes(datagrams[0])

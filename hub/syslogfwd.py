"""Syslog forwarder: a durable consumer sending selected log entries to a syslog server as
RFC 5424 messages over TCP with octet counting (RFC 6587 ``MSG-LEN SP SYSLOG-MSG``).

The formatter, the chunker and the delivery window are sans-I/O; ``SyslogForwarder`` is
the asyncio shell that reads the log, writes to the socket and commits offsets.

Delivery promise (at least once to the server):

Plain syslog over TCP has no application acknowledgement, and bytes a socket took are
not bytes the server kept: a server killed with data in its receive buffer or in its
in-memory queue loses that data silently.  So a chunk is *confirmed*, and its offset
committed in the log, only when all of the following hold:

1. it was written and drained into the kernel (the transport's buffer is empty);
2. the server's TCP stack acknowledged every byte of it (Linux ``SIOCOUTQ``; elsewhere
   step 1 stands in for this);
3. the connection then stayed up for ``confirm_s`` more seconds (no EOF, no reset).

On any connection loss, on an acknowledgement overdue for ``ack_timeout_s``, and on a
hub restart, the forwarder resends everything after the committed offset.

- **Never lost:** an entry matching the selection whose offset is at or below the
  committed offset was acknowledged by the server's TCP stack and the server was alive
  ``confirm_s`` later; everything after the committed offset is sent again until that
  holds.  The exceptions are outside this component, and counted: entries retention
  removed before they were read (``skipped_by_retention``), stored batches that no longer
  decode (``skipped_corrupt``, damaged storage), and a server that loses
  data it held for longer than ``confirm_s`` (use a disk-assisted queue there).
- **Can be duplicated:** only messages sent after the committed offset, on a
  connection that was then lost (or before a hub restart): at most ``max_inflight_bytes``
  of messages, those written in roughly the last ``confirm_s`` before the loss.  Each
  message carries its log offset in ``[squall@32473 ... offset="N"]``, so a receiver
  can drop a repeat exactly; ``resent`` counts the messages sent a second time by this
  process (after a hub restart, the repeats count as ``forwarded``).
- Cut messages: MSG is shortened to ``max_message_bytes`` (counted in ``truncated``);
  entries the selection does not match are never sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import functools
import json
import logging
import random
import re
import socket
import struct
import termios
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum, auto
from typing import Final

from edge.backoff import BackoffConfig, Reconnector
from edge.config import parse_hostport
from edge.syslog import FACILITY_NAMES, SEVERITY_NAMES
from hub.consumer import LogCursor, Selection
from hub.filters import FilterError
from hub.log import Log, LogEntry, LogError
from hub.subjects import SubjectError
from transport.batchcodec import Body, Scalar
from transport.wire import Lane

log = logging.getLogger("squall.hub.syslogfwd")

SD_ID: Final = "squall@32473"  # 32473: the IANA example enterprise number (RFC 5612)
MIN_MAX_MESSAGE_BYTES: Final = 2048  # RFC 5424 6.1: receivers SHOULD accept 2048 octets
MAX_MAX_MESSAGE_BYTES: Final = 1 << 20
MIN_CHUNK_BYTES: Final = 256 << 10  # one socket write carries at most this (or one message)
ACK_POLL_S: Final = 0.01  # how often the send queue is checked while bytes are unacknowledged

# RFC 5424 section 6: the header fields' maximum lengths in octets.
HOSTNAME_MAX: Final = 255
APP_NAME_MAX: Final = 48
PROCID_MAX: Final = 128
MSGID_MAX: Final = 32

_SEVERITY_ALIASES: Final = {
    "emergency": 0,
    "panic": 0,
    "critical": 2,
    "fatal": 2,
    "error": 3,
    "warn": 4,
    "information": 6,
    "informational": 6,
}
_CRITICAL_LANE_SEVERITY: Final = 2  # a record on the critical lane with no severity: crit
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x21-\x7e]")
_SD_NAME = r"[\x21\x23-\x3c\x3e-\x5c\x5e-\x7e]{1,32}"  # PRINTUSASCII but = SP ] "
_SD_ELEMENT = re.compile(
    r"\[(" + _SD_NAME + r")(?: " + _SD_NAME + r'="(?:[^"\\]|\\.)*")*\]', re.DOTALL
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ForwarderState(Enum):
    """Where the forwarder's connection is."""

    IDLE = auto()  # run() not started
    CONNECTING = auto()
    CONNECTED = auto()
    BACKOFF = auto()  # waiting before the next connection attempt
    CLOSED = auto()


# --- settings ------------------------------------------------------------------------


@dataclass(slots=True)
class SyslogForwardSettings:
    """One syslog forwarder in hub.yaml: where to send what, and its limits."""

    name: str = "syslog"  # durable consumer name (its offset in the log)
    target: str = "127.0.0.1:514"  # the syslog server, host:port (TCP)
    subject: str = ">"  # subject pattern (NATS wildcards)
    filter: str = ""  # filter expression; empty: everything the pattern matches
    facility: str = "local0"  # for records without a ``facility`` attr (name or 0-23)
    severity: str = "info"  # for records without a ``severity`` attr (name or 0-7)
    max_message_bytes: int = 8192  # one syslog message (MSG is cut to fit; counted)
    batch_records: int = 1000  # log entries read at a time
    max_inflight_bytes: int = 4 << 20  # sent, not confirmed; at the limit: wait
    confirm_s: float = 1.0  # a chunk the server acknowledged counts as kept this much later
    ack_timeout_s: float = 30.0  # unacknowledged bytes for this long: reconnect
    connect_timeout_s: float = 5.0
    backoff_base_s: float = 0.5  # reconnect: full jitter over base * 2^failures, capped
    backoff_cap_s: float = 30.0
    poll_s: float = 0.5  # how often the log is checked for new entries without a notify()

    def validate(self) -> None:
        """Raise ValueError naming the first impossible value."""
        parse_hostport(self.target)
        try:
            Selection.parse(self.subject, self.filter)
        except (SubjectError, FilterError) as exc:
            raise ValueError(str(exc)) from exc
        parse_facility(self.facility)
        parse_severity(self.severity)
        if not MIN_MAX_MESSAGE_BYTES <= self.max_message_bytes <= MAX_MAX_MESSAGE_BYTES:
            raise ValueError(
                f"max_message_bytes must be within {MIN_MAX_MESSAGE_BYTES}..{MAX_MAX_MESSAGE_BYTES}"
            )
        if self.max_inflight_bytes < frame_limit(self.max_message_bytes):
            raise ValueError("max_inflight_bytes must hold at least one framed message")
        if self.batch_records < 1:
            raise ValueError("batch_records must be at least 1")
        if self.confirm_s < 0:
            raise ValueError("confirm_s must not be negative")
        for key in ("ack_timeout_s", "connect_timeout_s", "backoff_base_s", "poll_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive")
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError("backoff_cap_s must not be below backoff_base_s")


def parse_facility(value: str | int) -> int:
    """A facility code 0-23 from its number or rsyslog name (``local0``, ``auth``)."""
    code = _code(value, FACILITY_NAMES, {})
    if code is None:
        raise ValueError(f"unknown syslog facility {value!r} (0-23 or {', '.join(FACILITY_NAMES)})")
    return code


def parse_severity(value: str | int) -> int:
    """A severity code 0-7 from its number or name (``err``, ``warning``, ``error``)."""
    code = _code(value, SEVERITY_NAMES, _SEVERITY_ALIASES)
    if code is None:
        raise ValueError(f"unknown syslog severity {value!r} (0-7 or {', '.join(SEVERITY_NAMES)})")
    return code


def _code(value: object, names: tuple[str, ...], aliases: Mapping[str, int]) -> int | None:
    """The index of ``value`` in ``names``, from an int, a digit string or a name; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if not text.isdigit():
            return names.index(text) if text in names else aliases.get(text)
        value = int(text)
    if isinstance(value, int) and 0 <= value < len(names):
        return value
    return None


# --- formatting (sans-I/O) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FormatOptions:
    """What the formatter needs besides the entry."""

    facility: int = 16  # local0
    severity: int = 6  # info
    max_message_bytes: int = 8192

    @classmethod
    def from_settings(cls, s: SyslogForwardSettings) -> FormatOptions:
        """The options a settings block asks for."""
        return cls(parse_facility(s.facility), parse_severity(s.severity), s.max_message_bytes)


@dataclass(frozen=True, slots=True)
class Formatted:
    """One RFC 5424 message (no framing); truncated: MSG was cut or the device's SD left out."""

    message: bytes
    truncated: bool


def format_entry(e: LogEntry, opts: FormatOptions) -> Formatted:
    """RFC 5424 bytes for one log entry, at most ``opts.max_message_bytes`` long."""
    pri = entry_facility(e, opts.facility) * 8 + entry_severity(e, opts.severity)
    header = " ".join(
        (
            f"<{pri}>1",
            rfc3339_utc(e.ts),
            header_field(e.device, HOSTNAME_MAX),
            header_field(_attr_text(e.attrs, "app") or subject_kind(e), APP_NAME_MAX),
            header_field(_attr_text(e.attrs, "procid"), PROCID_MAX),
            header_field(_attr_text(e.attrs, "msgid"), MSGID_MAX),
        )
    ).encode("ascii")
    # "replace": one odd record must never stop the forwarder (a poison pill)
    own = squall_sd(e).encode("utf-8", errors="replace")
    extra = forwarded_sd(e.attrs).encode("utf-8", errors="replace")
    text = message_text(e.body).encode("utf-8", errors="replace")
    limit = opts.max_message_bytes
    dropped = False
    if extra and len(header) + 1 + len(own) + len(extra) + 1 + len(text) > limit:
        extra, dropped = b"", True  # the device's own SD goes before any message text does
    head = header + b" " + own + extra
    if not text:
        # header fields and our SD are bounded (subjects <= 256 bytes) well below the minimum
        return Formatted(head[:limit], dropped)
    room = limit - len(head) - 1
    if len(text) <= room:
        return Formatted(head + b" " + text, dropped)
    cut = text[: max(0, room)].decode("utf-8", errors="ignore").encode("utf-8")
    return Formatted(head + b" " + cut, True)


def frame_octet_counted(message: bytes) -> bytes:
    """RFC 6587 3.4.1 octet-counting framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return b"%d %s" % (len(message), message)


def frame_limit(max_message_bytes: int) -> int:
    """The longest framed message a limit allows (length digits and the space included)."""
    return len(str(max_message_bytes)) + 1 + max_message_bytes


def rfc3339_utc(ts_us: int) -> str:
    """A record time (microseconds since the epoch) as RFC 3339 UTC; NILVALUE if unusable."""
    if ts_us < 0:
        return "-"
    seconds, micros = divmod(ts_us, 1_000_000)
    prefix = _rfc3339_seconds(seconds)
    return "-" if prefix is None else f"{prefix}.{micros:06d}Z"


@functools.lru_cache(maxsize=4096)
def _rfc3339_seconds(seconds: int) -> str | None:
    """``YYYY-MM-DDThh:mm:ss`` of a second (cached: a stream's records share seconds)."""
    try:
        t = _EPOCH + timedelta(seconds=seconds)
    except OverflowError:
        return None
    return t.strftime("%Y-%m-%dT%H:%M:%S")


def header_field(value: str | None, limit: int) -> str:
    """A HOSTNAME/APP-NAME/PROCID/MSGID: printable US-ASCII, at most ``limit``, else ``-``."""
    if not value:
        return "-"
    if not (value.isascii() and value.isprintable() and " " not in value):
        value = _NOT_PRINTABLE_ASCII.sub("_", value)
    return value[:limit]


def subject_kind(e: LogEntry) -> str:
    """The subject without its ``<tenant>.<device>.`` prefix (``log.auth``, ``telemetry.gps``)."""
    prefix = f"{e.tenant}.{e.device}."
    return e.subject[len(prefix) :] if e.subject.startswith(prefix) else e.subject


def sd_escape(value: str) -> str:
    """A PARAM-VALUE with ``"``, ``\\`` and ``]`` escaped (RFC 5424 6.3.3)."""
    if "\\" in value or '"' in value or "]" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
    return value


def squall_sd(e: LogEntry) -> str:
    """The ``[squall@32473 ...]`` element: where the message comes from and its log offset."""
    return (
        f'[{SD_ID} tenant="{sd_escape(e.tenant)}" device="{sd_escape(e.device)}" '
        f'incarnation="{e.incarnation}" seq="{e.seq}" offset="{e.offset}" '
        f'subject="{sd_escape(e.subject)}"]'
    )


def forwarded_sd(attrs: Mapping[str, Scalar]) -> str:
    """The device's own SD-ELEMENTs from the edge's syslog input, if whole and well formed.

    Elements claiming our SD-ID are dropped: a device must not forge its offset.
    """
    sd = attrs.get("structured_data")
    if not isinstance(sd, str) or attrs.get("structured_data_truncated"):
        return ""
    kept: list[str] = []
    pos = 0
    while (m := _SD_ELEMENT.match(sd, pos)) is not None:
        if m.group(1) != SD_ID:
            kept.append(m.group(0))
        pos = m.end()
    return "".join(kept) if pos == len(sd) else ""


def message_text(body: Body) -> str:
    """MSG: a text body, ``body.msg``, valid UTF-8 bytes, else compact JSON of the body."""
    if body is None:
        return ""
    if isinstance(body, str):
        return body
    if isinstance(body, bytes):
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(body).decode("ascii")
    if isinstance(body, dict) and isinstance(body.get("msg"), str):
        return str(body["msg"])
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def _json_default(value: object) -> str:
    if isinstance(value, bytes):
        return "base64:" + base64.b64encode(value).decode("ascii")
    return str(value)


def entry_severity(e: LogEntry, default: int) -> int:
    """Severity from attrs ``severity`` (0-7 or a name) or ``severity_name``; else by lane."""
    for key in ("severity", "severity_name"):
        value = e.attrs.get(key)
        if isinstance(value, str | int):
            code = _code(value, SEVERITY_NAMES, _SEVERITY_ALIASES)
            if code is not None:
                return code
    return _CRITICAL_LANE_SEVERITY if e.lane == int(Lane.CRITICAL) else default


def entry_facility(e: LogEntry, default: int) -> int:
    """Facility from attrs ``facility`` (0-23 or a name), else ``default``."""
    value = e.attrs.get("facility")
    if isinstance(value, str | int):
        code = _code(value, FACILITY_NAMES, {})
        if code is not None:
            return code
    return default


def _attr_text(attrs: Mapping[str, Scalar], key: str) -> str | None:
    value = attrs.get(key)
    if value is None or isinstance(value, bool):
        return None
    return str(value)


# --- chunking (sans-I/O) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chunk:
    """Framed messages for one socket write, and the offset to commit once they are kept."""

    data: bytes
    end_offset: int  # everything up to here is done when this chunk is confirmed
    messages: int
    resent: int  # messages at or below the high-water mark (sent before on a lost connection)
    truncated: int  # first sends whose MSG was cut


def build_chunk(
    entries: Iterable[LogEntry],
    last_read: int,
    position: int,
    room: int,
    opts: FormatOptions,
    high_water: int,
) -> Chunk:
    """Frame matching ``entries`` (read after ``position`` up to ``last_read``) into ``room``.

    When all fit, the chunk ends at ``last_read`` (entries the selection skipped are done
    too); otherwise at the last message that fit, and the rest is read again later.  If
    not even the first fits, the chunk is empty and ends at ``position``: wait for room.
    """
    parts: list[bytes] = []
    size = resent = truncated = 0
    end = position
    for e in entries:
        f = format_entry(e, opts)
        framed = frame_octet_counted(f.message)
        if size + len(framed) > room:
            return Chunk(b"".join(parts), end, len(parts), resent, truncated)
        parts.append(framed)
        size += len(framed)
        end = e.offset
        if e.offset <= high_water:
            resent += 1
        elif f.truncated:
            truncated += 1
    return Chunk(b"".join(parts), last_read, len(parts), resent, truncated)


# --- delivery window (sans-I/O) -----------------------------------------------------------


@dataclass(slots=True)
class _Sent:
    end_byte: int  # stream position just after this chunk
    nbytes: int  # 0: only skipped entries, done as soon as what precedes is
    end_offset: int
    messages: int
    acked_at: float | None = None


class DeliveryWindow:
    """What was sent on the current connection and is not confirmed yet.

    Time is the caller's (``now``, monotonic seconds); stream positions count from the
    connection's first byte.  ``on_acked`` is told how far the server's TCP stack has
    acknowledged; a chunk is confirmed ``confirm_s`` after its last byte was.
    """

    def __init__(self, max_inflight_bytes: int, confirm_s: float, ack_timeout_s: float) -> None:
        self.max_inflight_bytes = max_inflight_bytes
        self.confirm_s = confirm_s
        self.ack_timeout_s = ack_timeout_s
        self._unacked: deque[_Sent] = deque()  # oldest first
        self._acked_chunks: deque[_Sent] = deque()  # acknowledged, waiting out confirm_s
        self._sent = 0
        self._acked = 0
        self._confirmed = 0  # bytes
        self._ack_progress_at = 0.0  # last time the acknowledged position moved

    @property
    def sent_bytes(self) -> int:
        """Bytes written on this connection."""
        return self._sent

    @property
    def inflight_bytes(self) -> int:
        """Bytes sent and not confirmed."""
        return self._sent - self._confirmed

    @property
    def inflight_messages(self) -> int:
        """Messages sent and not confirmed (resent after a loss)."""
        return sum(c.messages for c in self._acked_chunks) + sum(c.messages for c in self._unacked)

    def room(self) -> int:
        """Bytes that may be sent now without passing ``max_inflight_bytes``."""
        return max(0, self.max_inflight_bytes - self.inflight_bytes)

    def reset(self) -> int:
        """A new connection: forget what is in flight; returns the messages that were."""
        lost = self.inflight_messages
        self._unacked.clear()
        self._acked_chunks.clear()
        self._sent = self._acked = self._confirmed = 0
        return lost

    def on_sent(self, nbytes: int, end_offset: int, messages: int, now: float) -> None:
        """A chunk was written; ``nbytes`` 0 only moves the commit point past skipped entries."""
        if self._acked == self._sent:
            self._ack_progress_at = now  # the ack clock starts with the first unacked byte
        self._sent += nbytes
        last = self._unacked or self._acked_chunks
        if nbytes == 0 and last:
            last[-1].end_offset = end_offset  # confirmed together with what precedes
            return
        self._unacked.append(_Sent(self._sent, nbytes, end_offset, messages))
        self.on_acked(self._acked, now)

    def on_acked(self, acked: int, now: float) -> None:
        """The server's TCP stack has acknowledged the first ``acked`` bytes."""
        acked = min(acked, self._sent)
        if acked > self._acked:
            self._acked = acked
            self._ack_progress_at = now
        while self._unacked and self._unacked[0].end_byte <= self._acked:
            c = self._unacked.popleft()
            c.acked_at = now
            self._acked_chunks.append(c)

    def pop_confirmed(self, now: float) -> tuple[int, int] | None:
        """(offset to commit, messages) for the chunks confirmed by ``now``; None if none."""
        end: int | None = None
        messages = 0
        while self._acked_chunks:
            c = self._acked_chunks[0]
            if c.nbytes and c.acked_at is not None and now < c.acked_at + self.confirm_s:
                break
            self._acked_chunks.popleft()
            self._confirmed = c.end_byte
            end = c.end_offset
            messages += c.messages
        return None if end is None else (end, messages)

    def ack_overdue(self, now: float) -> bool:
        """True when bytes have waited ``ack_timeout_s`` with no acknowledgement progress."""
        return self._acked < self._sent and now - self._ack_progress_at >= self.ack_timeout_s

    def deadline(self) -> float | None:
        """When something changes without new input: a confirmation or an ack check."""
        times: list[float] = []
        if self._acked_chunks and self._acked_chunks[0].acked_at is not None:
            times.append(self._acked_chunks[0].acked_at + self.confirm_s)
        if self._acked < self._sent:
            times.append(self._ack_progress_at + self.ack_timeout_s)
        return min(times) if times else None

    @property
    def unacked(self) -> bool:
        """True while some sent bytes are not acknowledged by the server's TCP stack."""
        return self._acked < self._sent


# --- stats ----------------------------------------------------------------------------------


@dataclass(slots=True)
class SyslogForwardStats:
    """What a forwarder did since it was created."""

    forwarded: int = 0  # messages sent for the first time
    resent: int = 0  # messages sent again after a connection loss (possible duplicates)
    confirmed: int = 0  # messages whose offset was committed
    bytes: int = 0  # octets written, framing included
    truncated: int = 0  # messages whose MSG was cut to max_message_bytes
    connects: int = 0  # connections established
    reconnects: int = 0  # connections lost, or attempts failed, before a new attempt
    errors: Counter[str] = field(default_factory=Counter)  # by reason
    resumed_from: int = 0  # the committed offset the last connection started from


# --- the asyncio shell ------------------------------------------------------------------------


class _ConnectionLost(Exception):
    """The current connection is unusable; the reason is a metrics label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SyslogForwarder:
    """Forwards the log entries a selection matches to one syslog server, at least once."""

    def __init__(
        self,
        log: Log,
        settings: SyslogForwardSettings,
        *,
        rng: random.Random | None = None,
    ) -> None:
        settings.validate()
        self.settings = settings
        self.host, self.port = parse_hostport(settings.target)
        self.cursor = LogCursor(
            log, settings.name, Selection.parse(settings.subject, settings.filter)
        )
        self.options = FormatOptions.from_settings(settings)
        self.window = DeliveryWindow(
            settings.max_inflight_bytes, settings.confirm_s, settings.ack_timeout_s
        )
        self.reconnector = Reconnector(
            [settings.target],
            rng or random.Random(),
            BackoffConfig(
                base_s=settings.backoff_base_s, cap_s=settings.backoff_cap_s, failover_after=1 << 30
            ),
        )
        self.stats = SyslogForwardStats()
        self.state = ForwarderState.IDLE
        self._chunk_limit = max(MIN_CHUNK_BYTES, frame_limit(settings.max_message_bytes))
        self._position = 0  # last offset handed to the current connection
        self._high_water = 0  # highest offset ever sent by this process
        self._wake = asyncio.Event()  # new entries (notify) or close
        self._stop = asyncio.Event()  # close only
        self._closing = False
        self._writer: asyncio.StreamWriter | None = None

    # -- public ------------------------------------------------------------------------

    @property
    def committed(self) -> int:
        """The last offset committed as kept by the server."""
        return self.cursor.committed

    def notify(self) -> None:
        """New entries are in the log: look now rather than at the next poll."""
        self._wake.set()

    def close(self) -> None:
        """Stop: ``run()`` returns soon; what is unconfirmed is resent by the next run."""
        self._closing = True
        self._wake.set()
        self._stop.set()
        if self._writer is not None:
            self._writer.transport.abort()

    async def run(self) -> None:
        """Connect, forward and reconnect until cancelled or closed."""
        loop = asyncio.get_running_loop()
        try:
            while not self._closing:
                self.state = ForwarderState.CONNECTING
                try:
                    reader, writer = await self._connect()
                except (OSError, TimeoutError) as exc:
                    self._count_loss("connect", exc)
                else:
                    try:
                        await self._serve(reader, writer)
                    except _ConnectionLost as exc:
                        if not self._closing:
                            self._count_loss(exc.reason, exc)
                    finally:
                        self._writer = None
                        writer.transport.abort()
                if self._closing:
                    break
                self.state = ForwarderState.BACKOFF
                at = self.reconnector.on_failure(loop.time())
                await self._sleep_until(at)
        finally:
            self.state = ForwarderState.CLOSED

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """(name, labels, value) for Prometheus; every series is labelled with the consumer."""
        s, c = self.stats, self.cursor.stats
        base = {"consumer": self.settings.name}
        out: list[tuple[str, dict[str, str], float]] = [
            ("squall_syslogfwd_forwarded_total", base, s.forwarded),
            ("squall_syslogfwd_resent_total", base, s.resent),
            ("squall_syslogfwd_confirmed_total", base, s.confirmed),
            ("squall_syslogfwd_sent_bytes_total", base, s.bytes),
            ("squall_syslogfwd_truncated_total", base, s.truncated),
            ("squall_syslogfwd_connects_total", base, s.connects),
            ("squall_syslogfwd_reconnects_total", base, s.reconnects),
            ("squall_syslogfwd_skipped_by_retention_total", base, c.skipped_by_retention),
            ("squall_syslogfwd_skipped_corrupt_total", base, c.skipped_corrupt),
            ("squall_syslogfwd_inflight_bytes", base, self.window.inflight_bytes),
            ("squall_syslogfwd_connected", base, float(self.state is ForwarderState.CONNECTED)),
            ("squall_syslogfwd_committed_offset", base, self.cursor.committed),
        ]
        out += [
            ("squall_syslogfwd_errors_total", {**base, "reason": r}, n)
            for r, n in sorted(s.errors.items())
        ]
        return out

    # -- connection ----------------------------------------------------------------------

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), self.settings.connect_timeout_s
        )
        # drain() then waits until every byte is in the kernel: "sent" means handed over
        writer.transport.set_write_buffer_limits(high=0)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a vanished peer
        self._writer = writer
        self.stats.connects += 1
        return reader, writer

    def _count_loss(self, reason: str, exc: BaseException) -> None:
        self.stats.errors[reason] += 1
        self.stats.reconnects += 1
        lost = self.window.reset()
        first = self.reconnector.failures == 0  # later failures of an outage: debug only
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "syslog forwarder %s: %s (%s); %d unconfirmed messages will be resent",
            self.settings.name,
            reason,
            exc,
            lost,
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Pump one connection until it is lost (raises _ConnectionLost) or we close."""
        self.window.reset()
        self._position = await asyncio.to_thread(lambda: self.cursor.committed)
        self.stats.resumed_from = self._position
        self.state = ForwarderState.CONNECTED
        watcher = asyncio.ensure_future(_watch_peer(reader))
        try:
            while not self._closing:
                if watcher.done():
                    raise _ConnectionLost(watcher.result())
                now = asyncio.get_running_loop().time()
                self.window.on_acked(self.window.sent_bytes - _unacked_bytes(writer), now)
                await self._commit_confirmed(now)
                if self.window.ack_overdue(now):
                    raise _ConnectionLost("ack_timeout")
                self._wake.clear()  # before reading: a notify() from now on is not missed
                if await self._send_some(writer, watcher):
                    continue
                await self._wait(watcher, self._next_wake(now))
        finally:
            watcher.cancel()

    async def _send_some(self, writer: asyncio.StreamWriter, watcher: asyncio.Future[str]) -> bool:
        """Read, frame and write one chunk; False when there is nothing to do right now."""
        room = min(self.window.room(), self._chunk_limit)
        if room <= 0:
            return False
        try:
            chunk = await asyncio.to_thread(self._next_chunk, room)
        except LogError as exc:  # a closed log (NotReadyError) ends run() instead
            self.stats.errors["log"] += 1
            log.warning("syslog forwarder %s: reading the log failed: %s", self.settings.name, exc)
            return False
        if chunk.end_offset == self._position:
            return False
        if chunk.data:
            writer.write(chunk.data)
            await self._drain(writer, watcher)
        now = asyncio.get_running_loop().time()
        self.window.on_sent(len(chunk.data), chunk.end_offset, chunk.messages, now)
        self._position = chunk.end_offset
        s = self.stats
        s.bytes += len(chunk.data)
        s.resent += chunk.resent
        s.forwarded += chunk.messages - chunk.resent
        s.truncated += chunk.truncated
        self._high_water = max(self._high_water, chunk.end_offset)
        return True

    def _next_chunk(self, room: int) -> Chunk:
        """Read after the position and frame what fits (runs in a worker thread)."""
        entries, last_read = self.cursor.read(self._position, self.settings.batch_records)
        return build_chunk(entries, last_read, self._position, room, self.options, self._high_water)

    async def _drain(self, writer: asyncio.StreamWriter, watcher: asyncio.Future[str]) -> None:
        drain = asyncio.ensure_future(writer.drain())
        try:
            done, _ = await asyncio.wait(
                (drain, watcher),
                timeout=self.settings.ack_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if not drain.done():
                drain.cancel()
        if drain in done:
            try:
                drain.result()
            except OSError as exc:
                raise _ConnectionLost("reset") from exc
            return
        if watcher in done:
            raise _ConnectionLost(watcher.result())
        raise _ConnectionLost("ack_timeout")

    async def _commit_confirmed(self, now: float) -> None:
        confirmed = self.window.pop_confirmed(now)
        if confirmed is None:
            return
        offset, messages = confirmed
        try:
            await asyncio.to_thread(self.cursor.commit, offset)
        except LogError as exc:
            # the next commit covers them (offsets are cumulative); a restart first resends them
            self.stats.errors["log"] += 1
            log.warning("syslog forwarder %s: commit failed: %s", self.settings.name, exc)
            return
        self.stats.confirmed += messages
        self.reconnector.on_connected()  # the server keeps what we send: reset the backoff

    def _next_wake(self, now: float) -> float:
        at = now + self.settings.poll_s
        deadline = self.window.deadline()
        if deadline is not None:
            at = min(at, deadline)
        if self.window.unacked:
            at = min(at, now + ACK_POLL_S)
        return at

    async def _wait(self, watcher: asyncio.Future[str], at: float) -> None:
        """Sleep until ``at``, a notify(), close() or the connection's end."""
        wake = asyncio.ensure_future(self._wake.wait())
        timeout = max(0.0, at - asyncio.get_running_loop().time())
        try:
            await asyncio.wait(
                (wake, watcher), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            wake.cancel()

    async def _sleep_until(self, at: float) -> None:
        """Back off until ``at`` unless close() is called (notify() does not cut it short)."""
        timeout = max(0.0, at - asyncio.get_running_loop().time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout)


async def _watch_peer(reader: asyncio.StreamReader) -> str:
    """Wait for the server to close or reset the connection; what it sends is discarded."""
    try:
        while await reader.read(65536):
            pass
    except OSError:
        return "reset"
    return "closed"


def _unacked_bytes(writer: asyncio.StreamWriter) -> int:
    """Bytes written but not acknowledged by the peer's TCP: transport buffer + send queue."""
    pending = writer.transport.get_write_buffer_size()
    sock = writer.get_extra_info("socket")
    if sock is None:
        return pending
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")  # SIOCOUTQ on Linux
    except (OSError, ValueError):  # ValueError: fileno -1, closed under us by a reset
        return pending  # no send-queue insight: handing bytes to the kernel must do
    return pending + int(struct.unpack("i", raw)[0])


__all__ = [
    "SD_ID",
    "Chunk",
    "DeliveryWindow",
    "FormatOptions",
    "Formatted",
    "ForwarderState",
    "SyslogForwardSettings",
    "SyslogForwardStats",
    "SyslogForwarder",
    "build_chunk",
    "format_entry",
    "frame_octet_counted",
    "parse_facility",
    "parse_severity",
    "rfc3339_utc",
    "sd_escape",
]

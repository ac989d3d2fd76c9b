"""Sans-I/O syslog input: parse RFC 5424 / RFC 3164 messages and split RFC 6587 TCP streams.

What util-linux ``logger`` 2.38 sends (captured on loopback, see tests/unit/test_syslog.py):

* ``--rfc5424`` (its default over the network)::

    <36>1 2026-11-27T18:47:20.772891+00:00 vm sshd - ID47 [timeQuality tzKnown="1" \
isSynced="0"][exampleSDID@32473 iut="3"] hello

* ``--rfc3164``: ``<36>Nov 27 18:47:02 vm sshd: hello``; with ``-i``: ``sshd[4074]: hello``.
* to a local socket (``-u PATH``, no format option): ``<36>Nov 27 18:47:21 sshd: hello``,
  without a hostname.
* UDP (``-d``): one message per datagram, no terminator.  TCP (``-T``): each message
  followed by ``\\n``.  TCP with ``--octet-count``: ``103 <13>1 ...``, no terminator.

Nothing here does I/O: the listener hands datagrams to ``parse_or_raw`` and TCP bytes to
a ``SyslogFramer`` per connection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final, Literal

from transport.errors import SquallError
from transport.limits import MAX_ATTR_VALUE_BYTES

SyslogFormat = Literal["rfc5424", "rfc3164", "raw"]
Scalar = str | int | float | bool | None

# Index = facility code.  12-15 have no glibc name; these are rsyslog's.
FACILITY_NAMES: Final[tuple[str, ...]] = (
    "kern",
    "user",
    "mail",
    "daemon",
    "auth",
    "syslog",
    "lpr",
    "news",
    "uucp",
    "cron",
    "authpriv",
    "ftp",
    "ntp",
    "audit",
    "alert",
    "clock",
    *(f"local{i}" for i in range(8)),
)
# Index = severity code (0 is the most severe).
SEVERITY_NAMES: Final[tuple[str, ...]] = (
    "emerg",
    "alert",
    "crit",
    "err",
    "warning",
    "notice",
    "info",
    "debug",
)

RAW_FACILITY: Final = 1  # user: what RFC 3164 (4.3.3) assumes for a message without PRI
RAW_SEVERITY: Final = 5  # notice, likewise

DEFAULT_MAX_MESSAGE_BYTES: Final = 8192  # per message on a TCP stream; longer is cut
MIN_MAX_MESSAGE_BYTES: Final = 64
MAX_LENGTH_DIGITS: Final = 10  # an octet count longer than this is malformed framing

_MAX_PRI = 191  # facility 23, severity 7
_BOM = b"\xef\xbb\xbf"
_TRAILER = b"\r\n\x00"  # stripped from the end of a message, as rsyslog does
_SHOWN = 40  # bytes of a bad field quoted in an error reason

# RFC 5424 section 6: field name and maximum length in octets.
_HEADER_FIELDS: Final = (("HOSTNAME", 255), ("APP-NAME", 48), ("PROCID", 128), ("MSGID", 32))

_PRI = re.compile(rb"<(\d{1,3})>")
_PRINTUSASCII = re.compile(rb"[\x21-\x7e]+")
_RFC3339 = rb"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:[Zz]|[+-]\d\d:\d\d)"
_TIMESTAMP_5424 = re.compile(_RFC3339)
_SD_NAME = rb'[^\x00-\x20\x7f-\xff="\]]{1,32}'
# A PARAM-VALUE may hold any octet; '"', '\' and ']' are escaped with '\'.  The
# alternatives start with different octets, so matching stays linear.
_SD_ELEMENT = re.compile(
    rb"\[" + _SD_NAME + rb"(?: " + _SD_NAME + rb'="(?:[^"\\]|\\.)*")*\]', re.DOTALL
)
_TIMESTAMP_3164 = re.compile(
    rb"((?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [ 0-3]?\d (?:\d{4} )?"
    rb"[0-2]\d:[0-5]\d:[0-6]\d(?:\.\d{1,9})?|" + _RFC3339 + rb")(?: |\Z)"
)
_TAG = re.compile(
    rb"([^\x00-\x20\x7f-\xff\[\]:]{1,48})(?:\[([^\x00-\x20\x7f-\xff\[\]]{1,128})\])?:(?: |\Z)"
)
_HOST_3164 = re.compile(rb"[A-Za-z0-9._:%-]{1,255}")


class SyslogParseError(SquallError):
    """A syslog message does not parse; ``reason`` says which part is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SyslogMessage:
    """One syslog message; header fields are None where absent or NILVALUE ("-")."""

    facility: int
    severity: int
    facility_name: str
    timestamp: str | None  # as received, not interpreted
    hostname: str | None
    app: str | None
    procid: str | None
    msgid: str | None
    structured_data: str | None  # the SD-ELEMENTs as received, escapes kept
    message: str
    format: SyslogFormat
    raw: bytes

    @property
    def severity_name(self) -> str:
        """Keyword of the severity ("err", "warning", ...)."""
        return SEVERITY_NAMES[self.severity]


def parse_syslog(data: bytes) -> SyslogMessage:
    """Parse one RFC 5424 or RFC 3164 message; raise SyslogParseError saying what is wrong."""
    text = data.rstrip(_TRAILER)
    if not text.startswith(b"<"):
        raise SyslogParseError(f"does not start with '<PRI>': {_show(text)}")
    m = _PRI.match(text)
    if m is None:
        raise SyslogParseError(f"PRI must be 1-3 digits between '<' and '>': {_show(text)}")
    pri = int(m.group(1))
    if pri > _MAX_PRI:
        raise SyslogParseError(f"PRI {pri} out of range 0-{_MAX_PRI}")
    pos = m.end()
    if text.startswith(b"1 ", pos):
        return _parse_5424(text, pos + 2, pri, data)
    return _parse_3164(text, pos, pri, data)


def raw_message(data: bytes) -> SyslogMessage:
    """Wrap bytes that are not syslog as a format="raw" message (user.notice, text decoded)."""
    return SyslogMessage(
        facility=RAW_FACILITY,
        severity=RAW_SEVERITY,
        facility_name=FACILITY_NAMES[RAW_FACILITY],
        timestamp=None,
        hostname=None,
        app=None,
        procid=None,
        msgid=None,
        structured_data=None,
        message=data.decode("utf-8", errors="replace"),
        format="raw",
        raw=bytes(data),
    )


def parse_or_raw(data: bytes) -> tuple[SyslogMessage, bool]:
    """Parse ``data`` or keep it as a raw message; never raises. The flag is True if malformed."""
    try:
        return parse_syslog(data), False
    except SyslogParseError:
        return raw_message(data), True


def to_record_fields(
    msg: SyslogMessage, *, default_host: str
) -> tuple[str, dict[str, Scalar], str]:
    """Subject suffix ``log.<facility>``, scalar attrs and body text for a Squall record."""
    attrs: dict[str, Scalar] = {
        "severity": msg.severity,
        "severity_name": SEVERITY_NAMES[msg.severity],
        "facility": msg.facility,
        "host": msg.hostname if msg.hostname is not None else default_host,
    }
    optional = (
        ("app", msg.app),
        ("procid", msg.procid),
        ("msgid", msg.msgid),
        ("timestamp", msg.timestamp),
    )
    for key, value in optional:
        if value is not None:
            attrs[key] = value
    if msg.structured_data is not None:
        # Attr values are bounded on the wire; a longer SD is cut and says so.
        attrs["structured_data"] = msg.structured_data[:MAX_ATTR_VALUE_BYTES]
        if len(msg.structured_data) > MAX_ATTR_VALUE_BYTES:
            attrs["structured_data_truncated"] = True
    attrs["format"] = msg.format
    return f"log.{msg.facility_name}", attrs, msg.message


# --- RFC 5424 ------------------------------------------------------------------


def _parse_5424(text: bytes, pos: int, pri: int, raw: bytes) -> SyslogMessage:
    """Parse what follows ``<PRI>1 ``: TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD [MSG]."""
    parts = text[pos:].split(b" ", 5)
    if len(parts) < 6:
        raise SyslogParseError(
            "RFC 5424 header truncated: expected TIMESTAMP HOSTNAME APP-NAME PROCID MSGID "
            "STRUCTURED-DATA"
        )
    stamp, *fields, tail = parts
    if stamp != b"-" and _TIMESTAMP_5424.fullmatch(stamp) is None:
        raise SyslogParseError(f"bad RFC 5424 TIMESTAMP {_show(stamp)}")
    host, app, procid, msgid = (
        _header_field(name, limit, value)
        for (name, limit), value in zip(_HEADER_FIELDS, fields, strict=True)
    )
    end = _structured_data_end(tail)
    if end < len(tail) and tail[end] != 0x20:
        raise SyslogParseError(f"expected SP after STRUCTURED-DATA, got {_show(tail[end:])}")
    message = tail[end + 1 :]
    if message.startswith(_BOM):
        message = message[len(_BOM) :]
    return _message(
        pri,
        timestamp=None if stamp == b"-" else stamp.decode("ascii"),
        hostname=host,
        app=app,
        procid=procid,
        msgid=msgid,
        structured_data=None if tail[:end] == b"-" else tail[:end].decode("utf-8", "replace"),
        message=message,
        fmt="rfc5424",
        raw=raw,
    )


def _header_field(name: str, limit: int, value: bytes) -> str | None:
    """One RFC 5424 header field: NILVALUE is None, else 1..limit printable ASCII octets."""
    if value == b"-":
        return None
    if not value:
        raise SyslogParseError(f"empty {name} (two spaces in the header)")
    if len(value) > limit:
        raise SyslogParseError(f"{name} longer than {limit} octets")
    if _PRINTUSASCII.fullmatch(value) is None:
        raise SyslogParseError(f"{name} must be printable ASCII: {_show(value)}")
    return value.decode("ascii")


def _structured_data_end(tail: bytes) -> int:
    """Index just past STRUCTURED-DATA at the start of ``tail`` (NILVALUE or SD-ELEMENTs)."""
    if tail.startswith(b"-"):
        return 1
    end = 0
    while (m := _SD_ELEMENT.match(tail, end)) is not None:
        end = m.end()
    if end == 0:
        raise SyslogParseError(f"STRUCTURED-DATA must be '-' or [SD-ELEMENT]: {_show(tail)}")
    return end


# --- RFC 3164 ------------------------------------------------------------------


def _parse_3164(text: bytes, pos: int, pri: int, raw: bytes) -> SyslogMessage:
    """Parse BSD syslog after PRI: ``Mmm dd hh:mm:ss [HOST] [TAG[PID]:] MSG``, all lenient."""
    stamp = _TIMESTAMP_3164.match(text, pos)
    if stamp is None:
        # RFC 3164 4.3.2: without a valid TIMESTAMP everything after PRI is content.
        rest, timestamp, host = text[pos:], None, None
    else:
        rest, timestamp = text[stamp.end() :], stamp.group(1).decode("ascii")
        host, rest = _split_hostname(rest)
    app = procid = None
    tag = _TAG.match(rest)
    if tag is not None:
        app = tag.group(1).decode("ascii")
        procid = None if tag.group(2) is None else tag.group(2).decode("ascii")
        rest = rest[tag.end() :]
    return _message(
        pri,
        timestamp=timestamp,
        hostname=host,
        app=app,
        procid=procid,
        msgid=None,
        structured_data=None,
        message=rest,
        fmt="rfc3164",
        raw=raw,
    )


def _split_hostname(rest: bytes) -> tuple[str | None, bytes]:
    """Take a leading HOSTNAME unless the first word is already a TAG (``logger -u`` omits it)."""
    if _TAG.match(rest) is not None:
        return None, rest
    space = rest.find(b" ")
    word = rest if space < 0 else rest[:space]
    if _HOST_3164.fullmatch(word) is None:
        return None, rest
    return word.decode("ascii"), rest[len(word) + 1 :]


# --- helpers -------------------------------------------------------------------


def _message(
    pri: int,
    *,
    timestamp: str | None,
    hostname: str | None,
    app: str | None,
    procid: str | None,
    msgid: str | None,
    structured_data: str | None,
    message: bytes,
    fmt: SyslogFormat,
    raw: bytes,
) -> SyslogMessage:
    """Build a SyslogMessage from a PRI value and parsed fields."""
    facility, severity = divmod(pri, 8)
    return SyslogMessage(
        facility=facility,
        severity=severity,
        facility_name=FACILITY_NAMES[facility],
        timestamp=timestamp,
        hostname=hostname,
        app=app,
        procid=procid,
        msgid=msgid,
        structured_data=structured_data,
        message=message.decode("utf-8", errors="replace"),
        format=fmt,
        raw=bytes(raw),
    )


def _show(value: bytes) -> str:
    """A bad field quoted for an error reason, cut to a few dozen octets."""
    return repr(value[:_SHOWN]) + ("..." if len(value) > _SHOWN else "")


# --- RFC 6587 framing ------------------------------------------------------------


class _FramerState(Enum):
    """Where the framer is in the byte stream."""

    FRAME_START = auto()  # between frames: skip blank lines, then pick the framing
    LENGTH = auto()  # reading the MSG-LEN digits of an octet-counted frame
    OCTETS = auto()  # reading the octets of a counted frame into the buffer
    SKIP = auto()  # discarding the octets of a counted frame beyond the limit
    LINE = auto()  # reading a newline- or NUL-terminated frame
    DISCARD = auto()  # discarding the rest of a line beyond the limit


_FRAME_GAP = re.compile(rb"[\r\n\x00]*")
_TERMINATOR = re.compile(rb"[\n\x00]")
_DIGITS = b"0123456789"


class SyslogFramer:
    """Splits one TCP connection's bytes into syslog messages (RFC 6587), bounded.

    Each frame is detected on its own: one starting with a digit is octet-counted
    (``LEN SP MSG``), anything else ends at LF, CRLF or NUL.  At the limit: a counted
    message keeps its first ``max_message_bytes`` octets and the rest is skipped; a
    longer line is cut the same way; both count in ``oversized``.  A bad length
    prefix counts in ``malformed`` and its line goes out as it is (a raw message), so
    the stream resynchronises at the next newline.  The buffer never holds more than
    ``max_message_bytes + 1`` bytes.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes < MIN_MAX_MESSAGE_BYTES:
            raise ValueError(f"max_message_bytes must be at least {MIN_MAX_MESSAGE_BYTES}")
        self._max = max_message_bytes
        self._state = _FramerState.FRAME_START
        self._buf = bytearray()
        self._need = 0  # octets of the counted frame still to read
        self._skip = 0  # octets of the counted frame beyond the limit, still to discard
        self._messages = 0
        self._oversized = 0
        self._malformed = 0

    @property
    def messages(self) -> int:
        """Messages returned so far (cut ones included)."""
        return self._messages

    @property
    def oversized(self) -> int:
        """Messages longer than the limit, cut to it."""
        return self._oversized

    @property
    def malformed(self) -> int:
        """Bad length prefixes, plus counted frames cut off by the end of the stream."""
        return self._malformed

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Take the next bytes of the stream; return the messages they complete, in order."""
        out: list[bytes] = []
        pos = 0
        while pos < len(data):
            pos = self._step(data, pos, out)
        return out

    def close(self) -> list[bytes]:
        """End of stream: return an unterminated last line; count a cut-off counted frame."""
        out: list[bytes] = []
        if self._state is _FramerState.LINE:
            self._end_line(out)
        elif self._state in (_FramerState.LENGTH, _FramerState.OCTETS):
            self._malformed += 1
        self._buf.clear()
        self._need = self._skip = 0
        self._state = _FramerState.FRAME_START
        return out

    def _step(self, data: bytes, pos: int, out: list[bytes]) -> int:
        """Consume bytes from ``pos`` in the current state; return the new position."""
        state = self._state
        if state is _FramerState.FRAME_START:
            return self._start_frame(data, pos)
        if state is _FramerState.LENGTH:
            return self._read_length(data, pos)
        if state is _FramerState.OCTETS:
            return self._read_octets(data, pos, out)
        if state is _FramerState.SKIP:
            return self._skip_octets(data, pos)
        if state is _FramerState.LINE:
            return self._read_line(data, pos, out)
        return self._discard_line(data, pos)

    def _start_frame(self, data: bytes, pos: int) -> int:
        """Skip blank lines and stray terminators, then choose the frame's framing."""
        m = _FRAME_GAP.match(data, pos)
        pos = m.end() if m is not None else pos
        if pos < len(data):
            digit = data[pos] in _DIGITS
            self._state = _FramerState.LENGTH if digit else _FramerState.LINE
        return pos

    def _read_length(self, data: bytes, pos: int) -> int:
        """Read MSG-LEN digits up to SP; anything else makes the frame a malformed line."""
        buf = self._buf
        while pos < len(data):
            octet = data[pos]
            if octet == 0x20 and buf[0] != 0x30:  # NONZERO-DIGIT *DIGIT SP
                self._begin_octets(int(buf))
                return pos + 1
            if octet not in _DIGITS or len(buf) >= MAX_LENGTH_DIGITS:
                # Keep what was read: the line goes out as it is and parses as raw.
                self._malformed += 1
                self._state = _FramerState.LINE
                return pos
            buf.append(octet)
            pos += 1
        return pos

    def _begin_octets(self, length: int) -> None:
        """Start reading a counted frame of ``length`` octets, cutting it at the limit."""
        self._buf.clear()
        if length > self._max:
            self._oversized += 1
            self._need, self._skip = self._max, length - self._max
        else:
            self._need, self._skip = length, 0
        self._state = _FramerState.OCTETS

    def _read_octets(self, data: bytes, pos: int, out: list[bytes]) -> int:
        """Buffer the counted frame's octets; emit it when complete."""
        take = min(self._need, len(data) - pos)
        self._buf += data[pos : pos + take]
        self._need -= take
        if self._need == 0:
            self._emit(bytes(self._buf), out)
            self._state = _FramerState.SKIP if self._skip else _FramerState.FRAME_START
        return pos + take

    def _skip_octets(self, data: bytes, pos: int) -> int:
        """Discard the counted frame's octets beyond the limit."""
        take = min(self._skip, len(data) - pos)
        self._skip -= take
        if self._skip == 0:
            self._state = _FramerState.FRAME_START
        return pos + take

    def _read_line(self, data: bytes, pos: int, out: list[bytes]) -> int:
        """Buffer a line up to its terminator, cutting it once it passes the limit."""
        m = _TERMINATOR.search(data, pos)
        stop = len(data) if m is None else m.start()
        room = self._max + 1 - len(self._buf)  # one octet more, for the CR of a CRLF
        if stop - pos > room:
            self._buf += data[pos : pos + room]
            self._oversized += 1
            self._emit(bytes(self._buf[: self._max]), out)
            self._state = _FramerState.DISCARD
            return pos + room
        self._buf += data[pos:stop]
        if m is None:
            return stop
        self._end_line(out)
        return stop + 1

    def _end_line(self, out: list[bytes]) -> None:
        """Emit the buffered line without its CR, cut to the limit."""
        line = bytes(self._buf)
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self._max:
            self._oversized += 1
            line = line[: self._max]
        self._state = _FramerState.FRAME_START
        self._buf.clear()
        if line:
            self._emit(line, out)

    def _discard_line(self, data: bytes, pos: int) -> int:
        """Drop bytes up to and including the next terminator."""
        m = _TERMINATOR.search(data, pos)
        if m is None:
            return len(data)
        self._state = _FramerState.FRAME_START
        return m.end()

    def _emit(self, message: bytes, out: list[bytes]) -> None:
        """Return one message to the caller and count it."""
        self._buf.clear()
        self._messages += 1
        out.append(message)

"""The one wire module: Squall frame types, their encoders and decoders, and a stream reader.

A frame on a QUIC stream is ``version u8 | type u8 | length u32 | payload``.
HEARTBEAT frames travel alone in QUIC DATAGRAM frames with the same header.
Every decode failure raises ``WireError`` with a code; nothing else escapes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from transport.batchcodec import pack, unpack_limited
from transport.errors import ErrorCode, WireError
from transport.limits import (
    FRAME_HEADER_BYTES,
    MAX_BATCH_RECORDS,
    MAX_CONTROL_FRAME_BYTES,
    MAX_FRAME_BYTES,
    MAX_HEARTBEAT_BYTES,
    MAX_LANES,
    MAX_REASON_BYTES,
    PROTOCOL_VERSION,
)


class FrameType(IntEnum):
    """Frame type byte."""

    HELLO = 1
    WELCOME = 2
    DATA = 3
    ACK = 4
    HEARTBEAT = 5
    CREDIT = 6
    ERROR = 7


class Lane(IntEnum):
    """Priority lanes; lower value is sent first and evicted last."""

    CRITICAL = 0
    TELEMETRY = 1
    BULK = 2

    @classmethod
    def parse(cls, name: str) -> Lane:
        """Lane from its lower-case name; ValueError names the valid ones."""
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown lane {name!r} (critical, telemetry, bulk)") from None


LANES = tuple(Lane)

_HEADER = struct.Struct("!BBI")
_DATA_HEAD = struct.Struct("!BQQQIQB")  # lane, after, first_seq, last_seq, count, offset, codec
_ACK_ITEM = struct.Struct("!BQ")
_CREDIT = struct.Struct("!Q")
_ERROR_HEAD = struct.Struct("!HI")  # code, retry_after_ms


@dataclass(frozen=True, slots=True)
class Hello:
    """Edge -> hub, first on the control stream: who I am (beyond the certificate) and my state."""

    incarnation: int
    agent: str = "squall-edge"
    heartbeat_ms: int = 10_000
    acked: dict[int, int] = field(default_factory=dict)  # lane -> what the edge believes is acked


@dataclass(frozen=True, slots=True)
class Welcome:
    """Hub -> edge: what the hub already holds for this incarnation, per lane, and the credit."""

    incarnation: int
    held: dict[int, int]  # lane -> highest seq committed in order
    credit: int  # cumulative records the edge may send this session
    heartbeat_ms: int
    hub_time_us: int


@dataclass(frozen=True, slots=True)
class Data:
    """A batch for one lane; ``after`` is the lane's previous seq (0: none); payload encoded.

    ``offset`` counts the new records the edge sent earlier in this session (retransmits keep
    theirs), so the hub knows exactly how much CREDIT is used however frames are reordered.
    Seqs of one lane are not contiguous (lanes share the device's seq space), so the header
    carries ``last_seq`` too: the hub drops a duplicate without opening the payload.
    """

    lane: int
    after: int
    first_seq: int
    last_seq: int
    count: int
    codec: int
    payload: bytes
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Ack:
    """Cumulative acknowledgement: everything up to ``held[lane]`` is committed."""

    held: dict[int, int]


@dataclass(frozen=True, slots=True)
class Credit:
    """Cumulative count of new records the edge may send in this session."""

    limit: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Edge health and spool state; sent as a QUIC DATAGRAM, small and best effort."""

    stats: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Error:
    """A typed error; fatal ones precede a close.  ``retry_after_ms`` is a hint for BUSY."""

    code: ErrorCode
    reason: str
    retry_after_ms: int = 0


Frame = Hello | Welcome | Data | Ack | Credit | Heartbeat | Error


# --- encoding ----------------------------------------------------------------


def _frame(ftype: FrameType, payload: bytes) -> bytes:
    return _HEADER.pack(PROTOCOL_VERSION, ftype, len(payload)) + payload


def _lane_map(m: dict[int, int]) -> list[list[int]]:
    return [[int(k), int(v)] for k, v in sorted(m.items())]


def encode_hello(f: Hello) -> bytes:
    """HELLO frame bytes."""
    body = [f.incarnation, f.agent, f.heartbeat_ms, _lane_map(f.acked)]
    return _frame(FrameType.HELLO, pack(body))


def encode_welcome(f: Welcome) -> bytes:
    """WELCOME frame bytes."""
    body = [f.incarnation, _lane_map(f.held), f.credit, f.heartbeat_ms, f.hub_time_us]
    return _frame(FrameType.WELCOME, pack(body))


def encode_data(f: Data) -> bytes:
    """DATA frame bytes (payload already produced by ``batchcodec.encode_batch``)."""
    head = _DATA_HEAD.pack(f.lane, f.after, f.first_seq, f.last_seq, f.count, f.offset, f.codec)
    return _frame(FrameType.DATA, head + f.payload)


def encode_ack(f: Ack) -> bytes:
    """ACK frame bytes."""
    items = b"".join(_ACK_ITEM.pack(k, v) for k, v in sorted(f.held.items()))
    return _frame(FrameType.ACK, bytes([len(f.held)]) + items)


def encode_credit(f: Credit) -> bytes:
    """CREDIT frame bytes."""
    return _frame(FrameType.CREDIT, _CREDIT.pack(f.limit))


def encode_heartbeat(f: Heartbeat) -> bytes:
    """HEARTBEAT frame bytes; refuses stats that would not fit one datagram."""
    out = _frame(FrameType.HEARTBEAT, pack(f.stats))
    if len(out) > MAX_HEARTBEAT_BYTES:
        raise WireError(ErrorCode.LIMIT_EXCEEDED, f"heartbeat of {len(out)} bytes")
    return out


def encode_error(f: Error) -> bytes:
    """ERROR frame bytes; the reason is cut to the limit."""
    reason = f.reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]
    return _frame(FrameType.ERROR, _ERROR_HEAD.pack(f.code, f.retry_after_ms) + reason)


def encode_frame(f: Frame) -> bytes:
    """Any frame to bytes."""
    if isinstance(f, Data):
        return encode_data(f)
    if isinstance(f, Ack):
        return encode_ack(f)
    if isinstance(f, Credit):
        return encode_credit(f)
    if isinstance(f, Hello):
        return encode_hello(f)
    if isinstance(f, Welcome):
        return encode_welcome(f)
    if isinstance(f, Heartbeat):
        return encode_heartbeat(f)
    return encode_error(f)


# --- decoding ----------------------------------------------------------------


def decode_header(buf: bytes | bytearray, max_frame: int = MAX_FRAME_BYTES) -> tuple[int, int]:
    """(type, payload length) from a 6-byte header; checks version, type and size."""
    version, ftype, length = _HEADER.unpack(buf[:FRAME_HEADER_BYTES])
    if version != PROTOCOL_VERSION:
        raise WireError(ErrorCode.BAD_VERSION, f"wire version {version}, expected 1")
    if ftype not in _DECODERS:
        raise WireError(ErrorCode.UNKNOWN_FRAME, f"unknown frame type {ftype}")
    limit = max_frame if ftype == FrameType.DATA else MAX_CONTROL_FRAME_BYTES
    if length > limit:
        raise WireError(ErrorCode.FRAME_TOO_LARGE, f"{FrameType(ftype).name} of {length} bytes")
    return ftype, length


def decode_frame(data: bytes, max_frame: int = MAX_FRAME_BYTES) -> Frame:
    """Decode exactly one whole frame."""
    if len(data) < FRAME_HEADER_BYTES:
        raise WireError(ErrorCode.TRUNCATED, "frame shorter than its header")
    ftype, length = decode_header(data, max_frame)
    if len(data) != FRAME_HEADER_BYTES + length:
        raise WireError(ErrorCode.TRUNCATED, "frame length does not match its header")
    return _DECODERS[ftype](data[FRAME_HEADER_BYTES:])


def decode_datagram(data: bytes) -> Heartbeat:
    """A DATAGRAM payload must be one HEARTBEAT frame."""
    if len(data) > MAX_HEARTBEAT_BYTES:
        raise WireError(ErrorCode.FRAME_TOO_LARGE, "datagram too large")
    frame = decode_frame(data)
    if not isinstance(frame, Heartbeat):
        raise WireError(ErrorCode.PROTOCOL_VIOLATION, "only HEARTBEAT may travel as a datagram")
    return frame


def _unpack_list(payload: bytes, n: int, name: str) -> list[Any]:
    doc = unpack_limited(payload, max_len=MAX_CONTROL_FRAME_BYTES)
    if not isinstance(doc, list) or len(doc) != n:
        raise WireError(ErrorCode.BAD_FIELD, f"{name} body malformed")
    return doc


def _int(v: Any, name: str, hi: int = 1 << 64) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < hi:
        raise WireError(ErrorCode.BAD_FIELD, f"{name} must be an integer in [0, {hi})")
    return v


def _lanes(v: Any, name: str) -> dict[int, int]:
    if not isinstance(v, list) or len(v) > MAX_LANES:
        raise WireError(ErrorCode.BAD_FIELD, f"{name} must list at most {MAX_LANES} lanes")
    out: dict[int, int] = {}
    for item in v:
        if not isinstance(item, list) or len(item) != 2:
            raise WireError(ErrorCode.BAD_FIELD, f"{name} entry malformed")
        out[_int(item[0], "lane", MAX_LANES)] = _int(item[1], "seq")
    return out


def _decode_hello(p: bytes) -> Hello:
    inc, agent, hb, acked = _unpack_list(p, 4, "HELLO")
    if not isinstance(agent, str) or len(agent) > 64:
        raise WireError(ErrorCode.BAD_FIELD, "agent must be a short string")
    return Hello(
        _int(inc, "incarnation"), agent, _int(hb, "heartbeat_ms", 1 << 32), _lanes(acked, "acked")
    )


def _decode_welcome(p: bytes) -> Welcome:
    inc, held, credit, hb, now = _unpack_list(p, 5, "WELCOME")
    return Welcome(
        _int(inc, "incarnation"),
        _lanes(held, "held"),
        _int(credit, "credit"),
        _int(hb, "heartbeat_ms", 1 << 32),
        _int(now, "hub_time_us"),
    )


def _decode_data(p: bytes) -> Data:
    if len(p) < _DATA_HEAD.size:
        raise WireError(ErrorCode.TRUNCATED, "DATA shorter than its header")
    lane, after, first, last, count, offset, codec = _DATA_HEAD.unpack_from(p)
    if lane >= MAX_LANES:
        raise WireError(ErrorCode.BAD_FIELD, f"unknown lane {lane}")
    if not 0 < count <= MAX_BATCH_RECORDS:
        raise WireError(ErrorCode.LIMIT_EXCEEDED, f"batch count {count}")
    if first == 0 or after >= first or last < first or last - first + 1 < count:
        raise WireError(ErrorCode.BAD_SEQUENCE, f"batch after={after} first={first} last={last}")
    if offset + count > 1 << 64:
        raise WireError(ErrorCode.BAD_FIELD, "DATA offset out of range")
    return Data(lane, after, first, last, count, codec, bytes(p[_DATA_HEAD.size :]), offset)


def _decode_ack(p: bytes) -> Ack:
    if not p or p[0] > MAX_LANES or len(p) != 1 + p[0] * _ACK_ITEM.size:
        raise WireError(ErrorCode.BAD_FIELD, "ACK malformed")
    held: dict[int, int] = {}
    for i in range(p[0]):
        lane, seq = _ACK_ITEM.unpack_from(p, 1 + i * _ACK_ITEM.size)
        held[_int(lane, "lane", MAX_LANES)] = seq
    return Ack(held)


def _decode_credit(p: bytes) -> Credit:
    if len(p) != _CREDIT.size:
        raise WireError(ErrorCode.BAD_FIELD, "CREDIT malformed")
    return Credit(_CREDIT.unpack(p)[0])


def _decode_heartbeat(p: bytes) -> Heartbeat:
    stats = unpack_limited(p, max_len=MAX_HEARTBEAT_BYTES)
    if not isinstance(stats, dict):
        raise WireError(ErrorCode.BAD_FIELD, "HEARTBEAT must be a map")
    return Heartbeat(stats)


def _decode_error(p: bytes) -> Error:
    if len(p) < _ERROR_HEAD.size:
        raise WireError(ErrorCode.TRUNCATED, "ERROR shorter than its header")
    code, retry = _ERROR_HEAD.unpack_from(p)
    try:
        ecode = ErrorCode(code)
    except ValueError:
        ecode = ErrorCode.INTERNAL
    reason = p[_ERROR_HEAD.size :][:MAX_REASON_BYTES].decode("utf-8", "replace")
    return Error(ecode, reason, retry)


_DECODERS: dict[int, Callable[[bytes], Frame]] = {
    FrameType.HELLO: _decode_hello,
    FrameType.WELCOME: _decode_welcome,
    FrameType.DATA: _decode_data,
    FrameType.ACK: _decode_ack,
    FrameType.CREDIT: _decode_credit,
    FrameType.HEARTBEAT: _decode_heartbeat,
    FrameType.ERROR: _decode_error,
}


class FrameReader:
    """Reassembles frames from stream bytes; buffered bytes never exceed one frame plus header."""

    __slots__ = ("_buf", "_max_frame", "_need")

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._need: int | None = None  # payload length of the frame being read
        self._max_frame = max_frame

    def feed(self, data: bytes) -> list[Frame]:
        """Add stream bytes; return the whole frames now complete (raises WireError)."""
        self._buf += data
        out: list[Frame] = []
        while True:
            if self._need is None:
                if len(self._buf) < FRAME_HEADER_BYTES:
                    return out
                _, self._need = decode_header(self._buf, self._max_frame)
            end = FRAME_HEADER_BYTES + self._need
            if len(self._buf) < end:
                return out
            frame = bytes(self._buf[:end])
            del self._buf[:end]
            self._need = None
            out.append(decode_frame(frame, self._max_frame))

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)

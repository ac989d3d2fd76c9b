"""Events the sans-I/O session cores and endpoints hand to their shells: plain frozen data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transport.batchcodec import Record, decode_batch
from transport.errors import ErrorCode


@dataclass(frozen=True, slots=True)
class Welcomed:
    """Edge: the hub answered HELLO; ``held`` is what it already has, per lane."""

    held: dict[int, int]
    credit: int
    hub_time_us: int


@dataclass(frozen=True, slots=True)
class Acked:
    """Edge: the hub committed everything in ``lane`` up to ``upto``."""

    lane: int
    upto: int
    records: int


@dataclass(frozen=True, slots=True)
class PeerError:
    """Either side: the peer sent ERROR; ``retry_after_ms`` is its hint (BUSY)."""

    code: ErrorCode
    reason: str
    retry_after_ms: int


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """Either side: this session is over; the shell closes the QUIC connection with ``code``."""

    code: ErrorCode
    reason: str


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """Hub: the edge said HELLO for ``incarnation``.

    ``behind`` lists lanes where the hub holds less than the edge was told it acknowledged
    (lane -> (edge's mark, hub's mark)): the hub lost committed data (a restored or
    replaced log).  Those records are gone from the edge too; the hub must say so loudly.
    """

    incarnation: int
    agent: str
    behind: dict[int, tuple[int, int]]


@dataclass(frozen=True, slots=True)
class BatchAccepted:
    """Hub: new records (duplicates removed) to commit.

    The common case keeps the batch as it came (``payload``, already validated, stored as
    is: no per-record work on the hub); a batch that overlapped what the hub held was
    decoded and trimmed, and then ``payload`` is None and ``records`` holds the new ones.
    """

    lane: int
    incarnation: int
    first_seq: int
    last_seq: int
    count: int
    codec: int
    payload: bytes | None
    records: list[Record] | None
    wire_bytes: int

    def decoded(self) -> list[Record]:
        """The records (decoding the payload when it was kept whole)."""
        if self.records is not None:
            return self.records
        assert self.payload is not None
        return decode_batch(self.codec, self.payload, self.first_seq, self.count)


@dataclass(frozen=True, slots=True)
class HeartbeatReceived:
    """Hub: a heartbeat's stats map as the edge sent it."""

    stats: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DuplicatesSkipped:
    """Hub: records already held arrived again (retransmit or replay) and were not stored."""

    lane: int
    count: int


SessionEvent = (
    Welcomed
    | Acked
    | PeerError
    | SessionClosed
    | HelloReceived
    | BatchAccepted
    | HeartbeatReceived
    | DuplicatesSkipped
)

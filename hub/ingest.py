"""Group commit (sans-I/O): many devices' accepted batches share one log transaction.

Sessions hand over ``BatchAccepted`` events; the shell asks ``due(now)`` / ``deadline()``
when to commit, takes the group, writes it to the log in one transaction, and reports
back with ``committed`` (ledgers advance, sessions ACK) or ``failed`` (sessions roll back
what they accepted and close; the edges resend).  Bounded: a group closes at
``max_records`` or after ``max_delay_s``, whichever comes first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from hub.log import DEFAULT_MAX_INCARNATIONS, LogError
from transport.events import BatchAccepted
from transport.quic import HubConnection, HubLimits
from transport.session import DeviceLedger, HubSession, HubSessionConfig

if TYPE_CHECKING:
    from hub.config import DeviceLimits, ServerLimits

Ledgers = dict[tuple[str, str], dict[int, DeviceLedger]]  # by (tenant, device), then incarnation

log = logging.getLogger("squall.hub.ingest")


class LedgerBook:
    """The hub's dedup ledgers: per device, the ``per_device`` most recently used incarnations.

    Every HELLO names an incarnation, and a new one gets a ledger: a device that keeps
    starting new incarnations (a spool wiped again and again, or a device that lies) would
    grow the hub's memory without end.  Past the bound its least recently used ledger is
    forgotten (``evicted``); an incarnation that comes back is read again through ``load``
    (the SQLite log's marks, which keep the most recently *committed* incarnations) or
    starts empty -- what the log still holds, it still refuses to store twice, and a
    ledger a session or a pending group still holds lives on in them.  A load that fails
    (LogError) is counted in ``load_failures`` and the ledger starts empty: the log's own
    marks still keep what it stored from being stored again.
    """

    def __init__(
        self,
        ledgers: Ledgers | None = None,
        per_device: int = DEFAULT_MAX_INCARNATIONS,
        load: Callable[[str, str, int], DeviceLedger | None] | None = None,
    ) -> None:
        if per_device < 1:
            raise ValueError("per_device must be at least 1")
        self.per_device = per_device
        self._ledgers: Ledgers = {}
        self._load = load
        self.held = 0  # incarnations held, every device
        self.evicted = 0
        self.load_failures = 0
        for (tenant, device), per in (ledgers or {}).items():
            for ledger in per.values():
                self._put(tenant, device, ledger)

    def get(self, tenant: str, device: str, incarnation: int) -> DeviceLedger:
        """The ledger of one device incarnation (now its most recently used)."""
        per = self._ledgers.get((tenant, device))
        ledger = None if per is None else per.pop(incarnation, None)
        if ledger is not None:
            assert per is not None
            per[incarnation] = ledger
            return ledger
        loaded = None
        if self._load is not None:
            try:
                loaded = self._load(tenant, device, incarnation)
            except LogError as exc:
                self.load_failures += 1
                log.warning(
                    "%s.%s incarnation %d: ledger not loaded: %s", tenant, device, incarnation, exc
                )
        ledger = loaded if loaded is not None else DeviceLedger(incarnation)
        self._put(tenant, device, ledger)
        return ledger

    def _put(self, tenant: str, device: str, ledger: DeviceLedger) -> None:
        per = self._ledgers.setdefault((tenant, device), {})
        while len(per) >= self.per_device:
            del per[next(iter(per))]
            self.held -= 1
            self.evicted += 1
        per[ledger.incarnation] = ledger
        self.held += 1

    def incarnations(self, tenant: str, device: str) -> list[int]:
        """The incarnations held for a device, least recently used first."""
        return list(self._ledgers.get((tenant, device), {}))


K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class Accepted(Generic[K]):
    """One batch waiting for its group commit."""

    key: K  # the shell's handle on the session (its connection)
    tenant: str
    device: str
    ledger: DeviceLedger
    batch: BatchAccepted
    received_at: float


class LatencyHistogram:
    """Fixed buckets (seconds), cumulative counts: constant memory however long the hub runs."""

    BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

    def __init__(self) -> None:
        self.counts = [0] * len(self.BOUNDS)  # observations <= each bound
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation."""
        self.total += 1
        self.sum += seconds
        for i, bound in enumerate(self.BOUNDS):
            if seconds <= bound:
                self.counts[i] += 1


class GroupCommit(Generic[K]):
    """Collects accepted batches; decides when a group is due."""

    def __init__(self, max_delay_s: float = 0.005, max_records: int = 20_000) -> None:
        self.max_delay_s = max_delay_s
        self.max_records = max_records
        self._items: list[Accepted[K]] = []
        self._records = 0
        self._opened_at: float | None = None

    def add(self, item: Accepted[K], now: float) -> None:
        """Queue one batch for the next group."""
        if not self._items:
            self._opened_at = now
        self._items.append(item)
        self._records += item.batch.count

    def deadline(self) -> float | None:
        """When the open group must be committed, or None if there is none."""
        return None if self._opened_at is None else self._opened_at + self.max_delay_s

    def due(self, now: float) -> bool:
        """True when the open group should be committed now."""
        if not self._items:
            return False
        assert self._opened_at is not None
        return self._records >= self.max_records or now >= self._opened_at + self.max_delay_s

    def take(self) -> list[Accepted[K]]:
        """Close the group and hand it over for writing."""
        items, self._items = self._items, []
        self._records = 0
        self._opened_at = None
        return items

    @staticmethod
    def committed(
        items: list[Accepted[K]], live: Mapping[tuple[str, str], K] | None = None
    ) -> list[K]:
        """The group is durable: advance the ledgers; returns the sessions to acknowledge.

        Those are the sessions that accepted the items and, with ``live`` (the shell's live
        session of each (tenant, device)), each device's session now: a device that
        reconnected while its batches were in this group resent them on its new session,
        where they were duplicates of records not yet durable -- it waits for this ACK
        there (without it, until its retransmission timer).
        """
        keys: list[K] = []
        for it in items:
            lane = it.ledger.lanes[it.batch.lane]
            lane.committed = max(lane.committed, it.batch.last_seq)
            keys.append(it.key)
            if live is not None and (now := live.get((it.tenant, it.device))) is not None:
                keys.append(now)
        return list(dict.fromkeys(keys))  # each once, in item order

    @staticmethod
    def failed(items: list[Accepted[K]]) -> list[K]:
        """The write failed: roll accepted marks back to what is durable."""
        for it in items:
            lane = it.ledger.lanes[it.batch.lane]
            lane.accepted = lane.committed
        return list(dict.fromkeys(it.key for it in items))  # each once, in item order

    def __len__(self) -> int:
        return len(self._items)


# -- what the hub shell and the virtual hub build alike from hub.yaml ---------------------


def endpoint_limits(server: ServerLimits, limits: DeviceLimits) -> HubLimits:
    """The QUIC endpoint's bounds from hub.yaml's ``server`` and ``limits``."""
    return HubLimits(
        max_connections=server.max_connections,
        max_handshakes=server.max_handshakes,
        busy_retry_after_ms=server.busy_retry_after_ms,
        max_frame_bytes=limits.max_frame_bytes,
        max_streams=limits.max_streams,
        idle_timeout_s=server.idle_timeout_s,
        handshake_timeout_s=server.handshake_timeout_s,
        stateless_resets_per_s=server.stateless_resets_per_s,
    )


def make_session(
    conn: HubConnection,
    now: float,
    ledgers: LedgerBook,
    limits: DeviceLimits,
    trust_edge_acks: bool = False,
) -> HubSession:
    """The session core of a device that just proved who it is, on its own ledgers (one
    per incarnation, from the book)."""
    ident = conn.identity
    assert ident is not None
    tenant, device = ident.tenant, ident.device

    def ledger_for(incarnation: int) -> DeviceLedger:
        return ledgers.get(tenant, device, incarnation)

    cfg = HubSessionConfig(
        window_records=limits.window_records,
        records_per_s=limits.records_per_s,
        bytes_per_s=limits.bytes_per_s,
        burst_s=limits.burst_s,
        trust_edge_acks=trust_edge_acks,
    )
    return HubSession(ident.tenant, ident.device, ledger_for, now, cfg)


# -- retention pacing (sans-I/O): how much one pass removes, and when the next one runs ----

RETENTION_PERIOD_S = 5.0  # between passes while the log is within its limits
RETENTION_PASS_BYTES = 8 << 20  # payload one pass aims to remove (~40 ms of SQLite work)
RETENTION_DUTY = 0.2  # while catching up, passes take at most this share of the hub's time
RETENTION_MIN_PAUSE_S = 0.01


def retention_rows(rows: int, stored_bytes: int, pass_bytes: int, max_rows: int) -> int:
    """Batches one retention pass may remove: about ``pass_bytes`` of payload at the log's
    average batch size, at least 1 and at most ``max_rows`` (a deletion's cost follows its
    bytes, and batches range from one record to a whole frame)."""
    if rows <= 0 or stored_bytes <= 0:
        return max_rows
    average = stored_bytes / rows
    return max(1, min(max_rows, int(pass_bytes / average)))


def retention_delay(removed: int, cap: int, elapsed_s: float, period_s: float) -> float:
    """Seconds until the next pass: soon while the last one hit its cap (a backlog is left),
    paced so that passes take at most RETENTION_DUTY of the time; else ``period_s``."""
    if removed < cap:
        return period_s
    pause = elapsed_s * (1 - RETENTION_DUTY) / RETENTION_DUTY
    return min(period_s, max(RETENTION_MIN_PAUSE_S, pause))

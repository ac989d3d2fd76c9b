"""What the virtual-time fleet reports: delivery checked record by record, in simulated time.

The durable consumer hands every log entry to a ``DeliverySink``; at the end each device's
accepted records -- (incarnation, seq) pairs, known to the edge shell the moment a group
commit covered them -- are compared with what the consumer saw.  Nothing in the report
reads a real clock except ``wall_s``, ``speedup`` and ``cpu_s_by_process``
(``WALL_CLOCK_KEYS``), so the rest is the same, byte for byte, for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, Final

from hub.log import LOCAL_INCARNATION, LogEntry
from simulator.linkmodel import DirectionStats

WALL_CLOCK_KEYS: Final = ("wall_s", "speedup", "cpu_s_by_process")


class DeliverySink:
    """Every copy of every record the durable consumer read, by device."""

    def __init__(self) -> None:
        self.copies: dict[str, dict[tuple[int, int], int]] = {}  # device -> (inc, seq) -> n
        self.latency_us: list[int] = []  # hub receive - device timestamp, first copies only
        self.presence = 0  # hub-published records (incarnation 0)
        self.entries = 0

    def take(self, entry: LogEntry) -> None:
        """The consumer's write of one log entry."""
        self.entries += 1
        if entry.incarnation == LOCAL_INCARNATION:
            self.presence += 1
            return
        per_device = self.copies.setdefault(entry.device, {})
        key = (entry.incarnation, entry.seq)
        n = per_device.get(key, 0)
        per_device[key] = n + 1
        if n == 0:
            self.latency_us.append(entry.received_us - entry.ts)


@dataclass(slots=True)
class DeviceOutcome:
    """One device's records, checked against the consumer."""

    device: str
    sent: int  # samples the vehicle produced while its agent ran
    accepted: int  # covered by a spool group commit
    delivered: int  # unique (incarnation, seq) the consumer wrote
    duplicates: int  # extra copies the consumer wrote
    lost: int  # accepted, not delivered, not evicted, not still in the spool
    still_spooled: int  # accepted, not yet delivered, still held by the spool at the end
    evicted: int  # dropped by spool policy (full spool)
    unexpected: int  # delivered but never accepted (must be 0)
    unaccepted_at_crash: int  # staged, not yet committed, when the agent was killed
    refused: int  # refused by a full spool
    sessions: int
    reconnects: int
    retransmitted: int
    crashes: int

    def as_json(self) -> dict[str, Any]:
        """The report's per-device entry."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_device(
    accepted: dict[int, list[int]],
    delivered: dict[tuple[int, int], int],
    held: set[tuple[int, int]],
    evicted: int,
) -> tuple[int, int, int, int, int, int]:
    """(accepted, delivered, duplicates, lost, still_spooled, unexpected) of one device."""
    wanted = {(inc, seq) for inc, seqs in accepted.items() for seq in seqs}
    missing = wanted.difference(delivered)
    still = len(missing & held)
    lost = max(0, len(missing) - still - evicted)
    unexpected = sum(1 for key in delivered if key not in wanted)
    duplicates = sum(n - 1 for n in delivered.values())
    return len(wanted), len(delivered), duplicates, lost, still, unexpected


def percentile_ms(sorted_us: list[int], q: float) -> float:
    """The ``q`` quantile (nearest rank) in milliseconds, 0.0 for no data."""
    if not sorted_us:
        return 0.0
    return round(sorted_us[min(len(sorted_us) - 1, int(q * len(sorted_us)))] / 1000, 3)


def latency_summary(latency_us: list[int]) -> dict[str, float]:
    """p50, p99 and max of accept -> hub latencies, in ms."""
    s = sorted(latency_us)
    return {
        "p50": percentile_ms(s, 0.5),
        "p99": percentile_ms(s, 0.99),
        "max": round(s[-1] / 1000, 3) if s else 0.0,
    }


def direction_totals(stats: Iterable[DirectionStats]) -> dict[str, Any]:
    """Link counters of one direction summed over every device."""
    dropped = {"loss": 0, "queue": 0, "mtu": 0, "outage": 0}
    packets = nbytes = passed = duplicated = corrupted = 0
    for s in stats:
        packets += s.submitted_packets
        nbytes += s.submitted_bytes
        passed += s.passed_packets
        for cause, n in s.dropped_by_cause().items():
            dropped[cause] += n
        duplicated += s.duplicated
        corrupted += s.corrupted
    return {
        "packets": packets,
        "bytes": nbytes,
        "passed": passed,
        "dropped": dropped,
        "duplicated": duplicated,
        "corrupted": corrupted,
    }


def deterministic_part(report: dict[str, Any]) -> dict[str, Any]:
    """The report without the fields that read the real clock."""
    return {k: v for k, v in report.items() if k not in WALL_CLOCK_KEYS}

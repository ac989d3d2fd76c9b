"""What bench/peers.py counts and how it adds up: receipts, tallies, runs and the JSON summary.

Pure code (no sockets, no clock): the subscriber processes fill a ``SeqTracker``, the
publishers say which seqs each device had acknowledged, and ``tally`` compares the two.
A record is *lost* when the system acknowledged it to its publisher and the subscriber
never received it; a *duplicate* is a second (or later) receipt of the same (device, seq).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_SEQ = 50_000_000  # per device: a bitmap of this many bits' worth of bytes is the bound


class HarnessError(Exception):
    """The harness received something it cannot account for (a seq out of range)."""


@dataclass(slots=True)
class SeqTracker:
    """Which (device, seq) a subscriber received, how often, and how late."""

    seen: dict[str, bytearray] = field(default_factory=dict)
    received: int = 0
    duplicates: int = 0
    first_recv: float = 0.0
    last_recv: float = 0.0
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    keep_latency: bool = True

    def add(self, device: str, seq: int, published_us: int, now: float) -> bool:
        """Count one receipt at wall time ``now`` (s); True when it is the first of its seq."""
        if not 0 < seq < MAX_SEQ:
            raise HarnessError(f"{device}: seq {seq} outside 1..{MAX_SEQ - 1}")
        bits = self.seen.get(device)
        if bits is None:
            bits = self.seen[device] = bytearray(max(1024, seq + 1))
        elif seq >= len(bits):
            bits.extend(bytes(max(len(bits), seq + 1 - len(bits))))
        self.received += 1
        if not self.first_recv:
            self.first_recv = now
        self.last_recv = now
        if self.keep_latency:
            self.latencies_ms.append(now * 1000.0 - published_us / 1000.0)
        if bits[seq]:
            self.duplicates += 1
            return False
        bits[seq] = 1
        return True

    @property
    def unique(self) -> int:
        """Distinct (device, seq) received."""
        return self.received - self.duplicates

    def report(self) -> dict[str, Any]:
        """What the subscriber process sends back (picklable)."""
        lat = sorted(self.latencies_ms)
        return {
            "seen": {d: bytes(b) for d, b in self.seen.items()},
            "received": self.received,
            "duplicates": self.duplicates,
            "first_recv": self.first_recv,
            "last_recv": self.last_recv,
            "latency_ms": {
                "p50": quantile(lat, 0.50),
                "p99": quantile(lat, 0.99),
                "max": lat[-1] if lat else None,
            },
        }


def quantile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile of already sorted values (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


@dataclass(frozen=True, slots=True)
class Tally:
    """Receipts against what the publishers had acknowledged."""

    expected: int  # records the system acknowledged to the publishers
    received: int  # receipts, duplicates included
    unique: int  # distinct (device, seq) received
    duplicates: int
    lost: int  # acknowledged, never received
    unexpected: int  # distinct receipts outside the acknowledged ranges (never acknowledged)


def tally(
    expected: Mapping[str, tuple[int, int]],
    seen: Mapping[str, bytes | bytearray],
    received: int,
    duplicates: int,
    unacked: Mapping[str, Iterable[int]] | None = None,
) -> Tally:
    """Compare receipts with the (first, last) seq range every device published.

    Seqs in ``unacked`` were published but never acknowledged: they are not expected
    (a receipt of one counts as unexpected, its absence as nothing).
    """
    lost = within = skipped = 0
    for device, (first, last) in expected.items():
        if last < first:
            continue
        bits = seen.get(device, b"")
        got = bytes(bits[first : last + 1]).count(1)
        skip = {s for s in (unacked or {}).get(device, ()) if first <= s <= last}
        skip_got = sum(1 for s in skip if s < len(bits) and bits[s])
        skipped += len(skip)
        within += got - skip_got
        lost += (last - first + 1 - len(skip)) - (got - skip_got)
    total_unique = sum(bytes(b).count(1) for b in seen.values())
    n_expected = sum(max(0, last - first + 1) for first, last in expected.values()) - skipped
    return Tally(
        expected=n_expected,
        received=received,
        unique=total_unique,
        duplicates=duplicates,
        lost=lost,
        unexpected=total_unique - within,
    )


@dataclass(slots=True)
class Run:
    """One system, one device count, one load shape: what was measured."""

    system: str
    devices: int
    mode: str  # "saturated", "rate" (fixed total records/s) or "slow" (slow subscriber)
    target_rate: float  # records/s over all devices (0: as fast as acknowledged)
    publish_s: float  # how long the publishers published
    published: int
    acked: int
    unacked: int  # handed to the client, never acknowledged (errors, or still pending)
    first_publish: float  # wall time, s
    tally: Tally
    last_recv: float
    server_cpu_s: float
    server_rss_max_kb: int
    wire_up_bytes: int
    wire_down_bytes: int
    wire_up_chunks: int
    wire_down_chunks: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    subscriber_cpu_s: float
    publisher_cpu_s: float
    publish_rate: float  # records/s the publishers achieved while publishing
    notes: list[str] = field(default_factory=list)

    @property
    def records_per_s(self) -> float | None:
        """End to end: distinct records received / (last receipt - first publish)."""
        span = self.last_recv - self.first_publish
        if self.tally.unique <= 0 or span <= 0:
            return None
        return self.tally.unique / span

    @property
    def server_cpu_s_per_100k(self) -> float | None:
        """Server CPU seconds per 100,000 records received."""
        if self.tally.unique <= 0:
            return None
        return self.server_cpu_s / self.tally.unique * 100_000

    def per_100k(self, cpu_s: float) -> float | None:
        """``cpu_s`` per 100,000 distinct records received."""
        if self.tally.unique <= 0:
            return None
        return cpu_s / self.tally.unique * 100_000

    @property
    def wire_bytes_per_record(self) -> float | None:
        """Device-facing bytes, both directions, per acknowledged record."""
        if self.acked <= 0:
            return None
        return (self.wire_up_bytes + self.wire_down_bytes) / self.acked

    def row(self) -> dict[str, Any]:
        """The run as a flat dict (the detailed results file)."""
        out = asdict(self)
        out["tally"] = asdict(self.tally)
        out["records_per_s"] = _round(self.records_per_s, 0)
        out["server_cpu_s_per_100k"] = _round(self.server_cpu_s_per_100k, 3)
        out["wire_bytes_per_record"] = _round(self.wire_bytes_per_record, 1)
        return out


def _round(value: float | None, digits: int) -> float | None:
    if value is None:
        return None
    return round(value, digits) if digits else float(round(value))


def find(runs: Iterable[Run], system: str, mode: str, devices: int) -> Run | None:
    """The run of ``system`` with this mode and device count, if it was made."""
    for r in runs:
        if r.system == system and r.mode == mode and r.devices == devices:
            return r
    return None


def system_summary(runs: Sequence[Run], system: str, top: int = 100) -> dict[str, Any]:
    """The ``--json`` object of one system (the contract keys first, then details).

    ``lost`` and ``duplicates`` add up every loopback run of the system at saturation
    and at the fixed rate; the slow-subscriber test is reported apart (``slow_*``).
    """
    sat = find(runs, system, "saturated", top)
    fixed = find(runs, system, "rate", top)
    mine = [r for r in runs if r.system == system and r.mode in ("saturated", "rate")]
    out: dict[str, Any] = {
        f"records_per_s_p{top}": _round(sat.records_per_s, 0) if sat else None,
        "server_cpu_s_per_100k": _round(sat.server_cpu_s_per_100k, 3) if sat else None,
        "server_cpu_s_per_100k_2k": _round(fixed.server_cpu_s_per_100k, 3) if fixed else None,
        "latency_p99_ms_2k": _round(fixed.latency_p99_ms, 1) if fixed else None,
        "wire_bytes_per_record": _round(sat.wire_bytes_per_record, 1) if sat else None,
        "lost": sum(r.tally.lost for r in mine) if mine else None,
        "duplicates": sum(r.tally.duplicates for r in mine) if mine else None,
    }
    if sat is not None:  # the client side, for the fairness caveats
        out["publisher_cpu_s_per_100k"] = _round(sat.per_100k(sat.publisher_cpu_s), 3)
        out["subscriber_cpu_s_per_100k"] = _round(sat.per_100k(sat.subscriber_cpu_s), 3)
    if fixed is not None:
        out["latency_p50_ms_2k"] = _round(fixed.latency_p50_ms, 1)
        out["wire_bytes_per_record_2k"] = _round(fixed.wire_bytes_per_record, 1)
    for r in sorted(mine, key=lambda r: (r.mode, r.devices)):
        if r.mode == "saturated":
            out[f"records_per_s_p{r.devices}"] = _round(r.records_per_s, 0)
            out[f"server_cpu_s_per_100k_p{r.devices}"] = _round(r.server_cpu_s_per_100k, 3)
            out[f"wire_bytes_per_record_p{r.devices}"] = _round(r.wire_bytes_per_record, 1)
        else:
            out[f"server_cpu_s_per_100k_2k_p{r.devices}"] = _round(r.server_cpu_s_per_100k, 3)
            out[f"latency_p50_ms_2k_p{r.devices}"] = _round(r.latency_p50_ms, 1)
            out[f"latency_p99_ms_2k_p{r.devices}"] = _round(r.latency_p99_ms, 1)
    slow = [r for r in runs if r.system == system and r.mode == "slow"]
    if slow:
        s = slow[0]
        out["slow_lost"] = s.tally.lost
        out["slow_duplicates"] = s.tally.duplicates
        out["slow_server_rss_max_mb"] = round(s.server_rss_max_kb / 1024, 1)
        out["slow_publish_rate"] = _round(s.publish_rate, 0)
        out["slow_publishers_slowed"] = publishers_slowed(s)
    bridged = [r for r in runs if r.system == system and r.mode == "bridge"]
    if bridged:
        r = bridged[0]
        out["bridge_records"] = r.acked
        out["bridge_delivered"] = r.tally.unique
        out["bridge_lost"] = r.tally.lost
        out["bridge_duplicates"] = r.tally.duplicates
        out["bridge_time_to_deliver_s"] = _round(bridge_seconds(r), 1)
        out["bridge_link_bytes_per_record"] = _round(r.wire_bytes_per_record, 1)
    return out


def bridge_seconds(run: Run) -> float | None:
    """First publish to last receipt, when every acknowledged record arrived (else None)."""
    if run.tally.lost or run.acked == 0 or run.unacked:
        return None
    return run.last_recv - run.first_publish


def publishers_slowed(run: Run, tolerance: float = 0.05) -> bool:
    """True when the publishers achieved less than (1 - tolerance) of the target rate."""
    return run.target_rate > 0 and run.publish_rate < (1 - tolerance) * run.target_rate


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def targets(summary: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, float | None, bool]]:
    """The issue's targets: (what, measured ratio, met) from the per-system summary."""
    sq = summary.get("squall", {})
    js = summary.get("jetstream", {})
    mq = summary.get("mqtt", {})
    rate = "records_per_s_p100"
    out: list[tuple[str, float | None, bool]] = []
    r = ratio(sq.get(rate), js.get(rate))
    out.append(("records/s P=100: Squall / JetStream >= 2", r, r is not None and r >= 2))
    r = ratio(sq.get(rate), mq.get(rate))
    out.append(("records/s P=100: Squall / Mosquitto QoS 1 >= 3", r, r is not None and r >= 3))
    for key, label in (
        ("server_cpu_s_per_100k", "saturated"),
        ("server_cpu_s_per_100k_2k", "2k/s"),
    ):
        for peer, name in ((js, "JetStream"), (mq, "Mosquitto")):
            r = ratio(sq.get(key), peer.get(key))
            out.append(
                (f"server CPU/100k {label}: Squall / {name} < 1", r, r is not None and r < 1)
            )
    r = ratio(sq.get("wire_bytes_per_record"), mq.get("wire_bytes_per_record"))
    out.append(("wire bytes/record: Squall / MQTT <= 0.25", r, r is not None and r <= 0.25))
    if "bridge_time_to_deliver_s" in sq:
        mine = sq["bridge_time_to_deliver_s"]
        others = [
            s.get("bridge_time_to_deliver_s")
            for name, s in summary.items()
            if name != "squall" and "bridge_records" in s
        ]
        finished = [t for t in others if t is not None]
        clean = mine is not None and sq.get("bridge_duplicates") == 0
        first = clean and all(mine < t for t in finished)
        r = ratio(mine, min(finished)) if finished else None
        out.append(("3g-poor: Squall complete, no duplicates, first (time / best peer)", r, first))
    return out

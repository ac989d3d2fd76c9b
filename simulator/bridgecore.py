"""Sans-I/O core of the packet-level bridge: Ethernet frames and ``now`` in, frames to send out.

The bridge (``squall link --bridge``, shell in :mod:`simulator.bridge`) joins side ``a``
and side ``b``. Frames from a to b go through the ``up`` direction of one seeded
:class:`~simulator.linkmodel.Link` (device = the bridge's name), frames from b to a
through its ``down`` direction, so ``down_rate_kbit`` is the b -> a rate.

What the model judges, and how:

- **Which frames.** IPv4 and IPv6 frames (802.1Q tags skipped). ARP, IPv6 neighbour
  discovery (ICMPv6 133-137) and every other frame pass *unimpaired*: at once, never
  dropped, delayed, duplicated or corrupted (losing ARP would turn loss into multi-second
  stalls that no real radio link has). They are counted as ``unimpaired``.
- **Sizes.** The model sees whole Ethernet frames (header included, no FCS), so the
  bandwidth cap counts the bytes a link really carries. A profile's ``mtu`` is the
  largest UDP payload over IPv4 (as for the UDP proxy); :func:`frame_params` turns it
  into a frame limit of ``mtu + 28 + 14`` bytes, and the shell gives the veths an IP MTU
  of ``mtu + 28``, so a frame the kernel builds always fits and ``mtu`` drops only show
  when an MTU is changed by hand.
- **Corruption.** The flipped bit is moved past the Ethernet header (a flipped MAC
  address would only turn into a silent drop): the receiver's IP, TCP or UDP checksum
  sees it, as on a real link.

Bounds: at most ``max_pending`` impaired frames in flight per direction; a frame the
model let through beyond that is dropped (``dropped_overflow``). The model's own
bandwidth queue (``queue_limit_bytes``) drops first (``dropped_queue``). Unimpaired
frames leave in the same pass as they came and are not held.
"""

from __future__ import annotations

import itertools
import math
import struct
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final

from simulator.linkmodel import DecisionHook, Direction, DropCause, Link, LinkParams, flip_bit
from simulator.proxy import DELAY_BUCKETS, DirectionTally, Tally
from simulator.schedule import DueSchedule

__all__ = [
    "BRIDGE_RESULTS",
    "ETH_HEADER",
    "FRAME_OVERHEAD",
    "BridgeCore",
    "BridgeStats",
    "Way",
    "corrupt_frame",
    "frame_params",
    "is_impaired",
    "mark_frame",
]

ETH_HEADER: Final = 14
FRAME_OVERHEAD: Final = ETH_HEADER + 28  # Ethernet + IPv4 + UDP headers around a UDP payload
_ETH_IPV4: Final = 0x0800
_ETH_IPV6: Final = 0x86DD
_ETH_VLAN: Final = (0x8100, 0x88A8)
_ICMPV6: Final = 58
_ND_TYPES: Final = range(133, 138)  # router/neighbour solicitation/advertisement, redirect

BRIDGE_RESULTS: Final = (
    "passed",
    "dropped_loss",
    "dropped_queue",
    "dropped_mtu",
    "dropped_outage",
    "dropped_overflow",
    "unimpaired",
    "duplicated",
    "corrupted",
)
"""Result labels of ``squall_bridge_frames_total``. Every frame read is counted once as
``passed``, one ``dropped_*`` (IP frames the model judged) or ``unimpaired`` (ARP and
other non-IP frames); ``duplicated`` and ``corrupted`` count passed frames that were also
sent twice / with a flipped bit."""

_DROP_RESULT: Final = {cause: f"dropped_{cause.value}" for cause in DropCause}


class Way(StrEnum):
    """Which way a frame crosses the bridge; the value is the metrics label."""

    A_TO_B = "a_to_b"
    B_TO_A = "b_to_a"

    @property
    def model_direction(self) -> Direction:
        """The link model direction: ``up`` is a -> b, ``down`` is b -> a."""
        return Direction.UP if self is Way.A_TO_B else Direction.DOWN


def _l3(frame: bytes) -> tuple[int, int]:
    """(EtherType, offset of the L3 header), 802.1Q / 802.1ad tags skipped; (-1, 0) if short."""
    if len(frame) < ETH_HEADER:
        return -1, 0
    etype, off = (frame[12] << 8) | frame[13], ETH_HEADER
    while etype in _ETH_VLAN and len(frame) >= off + 4:
        etype, off = (frame[off + 2] << 8) | frame[off + 3], off + 4
    return etype, off


def is_impaired(frame: bytes) -> bool:
    """True for frames the link model judges: IPv4, and IPv6 except neighbour discovery."""
    etype, off = _l3(frame)
    if etype == _ETH_IPV4:
        return True
    if etype != _ETH_IPV6:
        return False
    nd = len(frame) > off + 40 and frame[off + 6] == _ICMPV6 and frame[off + 40] in _ND_TYPES
    return not nd


def frame_params(params: LinkParams) -> LinkParams:
    """``params`` with ``mtu`` as a whole-frame limit (profile mtu + 42) and a queue to match."""
    mtu = params.mtu + FRAME_OVERHEAD
    return replace(params, mtu=mtu, queue_limit_bytes=max(params.queue_limit_bytes, mtu))


def corrupt_frame(frame: bytes, bit: int) -> bytes:
    """``frame`` with one bit flipped past the Ethernet header (``bit`` as the model chose it)."""
    body_bits = (len(frame) - ETH_HEADER) * 8
    if body_bits <= 0:
        return frame
    return flip_bit(frame, ETH_HEADER * 8 + bit % body_bits)


def _ipv4_checksum(header: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def mark_frame(frame: bytes, mark: int) -> bytes:
    """A copy of an IP frame with ``mark`` in its DSCP (as :mod:`simulator.pcap` marks).

    For captures only: the IPv4 header checksum is recomputed so that readers do not
    flag it; ECN bits are kept. Non-IP frames come back unchanged.
    """
    etype, off = _l3(frame)
    out = bytearray(frame)
    if etype == _ETH_IPV4 and len(frame) >= off + 20:
        ihl = (frame[off] & 0x0F) * 4
        if ihl < 20 or len(frame) < off + ihl:
            return frame
        out[off + 1] = ((mark << 2) & 0xFC) | (frame[off + 1] & 0x03)
        out[off + 10 : off + 12] = b"\x00\x00"
        checksum = _ipv4_checksum(bytes(out[off : off + ihl]))
        out[off + 10 : off + 12] = checksum.to_bytes(2, "big")
        return bytes(out)
    if etype == _ETH_IPV6 and len(frame) >= off + 40:
        word = int.from_bytes(frame[off : off + 4], "big")
        ecn = (word >> 20) & 0x03
        word = (word & ~(0xFF << 20)) | ((((mark << 2) & 0xFC) | ecn) << 20)
        out[off : off + 4] = word.to_bytes(4, "big")
        return bytes(out)
    return frame


@dataclass(frozen=True, slots=True)
class BridgeStats:
    """A snapshot of a bridge: both directions' tallies and the shell's counters."""

    name: str
    profile: str
    seed: int
    uptime_s: float
    a_to_b: DirectionTally
    b_to_a: DirectionTally
    pending: dict[str, int]
    send_errors: dict[str, int] = field(default_factory=lambda: {"a_to_b": 0, "b_to_a": 0})
    kernel_drops: dict[str, int] = field(default_factory=lambda: {"a": 0, "b": 0})
    pcap_records: int = 0
    pcap_skipped: int = 0
    decision_log_lines: int = 0
    decision_log_skipped: int = 0

    def way(self, way: Way | str) -> DirectionTally:
        """The tally of ``a_to_b`` or ``b_to_a``."""
        return self.a_to_b if Way(way) is Way.A_TO_B else self.b_to_a

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (what ``GET /status`` returns)."""
        return {
            "name": self.name,
            "profile": self.profile,
            "seed": self.seed,
            "uptime_s": round(self.uptime_s, 3),
            "a_to_b": self.a_to_b.as_dict(),
            "b_to_a": self.b_to_a.as_dict(),
            "pending": dict(self.pending),
            "send_errors": dict(self.send_errors),
            "kernel_drops": dict(self.kernel_drops),
            "pcap": {"records": self.pcap_records, "skipped": self.pcap_skipped},
            "decision_log": {
                "lines": self.decision_log_lines,
                "skipped": self.decision_log_skipped,
            },
        }

    def summary(self) -> str:
        """One line for the end of a run."""
        parts = []
        for way in Way:
            t = self.way(way)
            judged = t.packets["passed"] + t.dropped
            causes = ", ".join(
                f"{label.removeprefix('dropped_')} {n}"
                for label, n in t.packets.items()
                if label.startswith("dropped_") and n
            )
            parts.append(
                f"{way.value} {judged} IP frames, {t.packets['passed']} passed, "
                f"{t.dropped} dropped"
                + (f" ({causes})" if causes else "")
                + f", {t.packets['unimpaired']} unimpaired"
            )
        return (
            f"{self.uptime_s:.1f} s, bridge {self.name}, profile {self.profile}, seed "
            f"{self.seed}: " + "; ".join(parts)
        )


# A held frame: (due, tie-breaking seq, frame, offered at, corrupted).
_Held = tuple[float, int, bytes, float, bool]


class _Queue(DueSchedule[_Held]):
    """Held frames of one direction by due time, and unimpaired frames to send at once."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        super().__init__()
        self.now: deque[tuple[bytes, int]] = deque()  # unimpaired: (frame, size) to send now

    def clear(self) -> int:
        n = len(self.now)
        self.now.clear()
        return n + super().clear()


class BridgeCore:
    """Both directions of a bridge: frames offered with ``now``, frames due out, one deadline."""

    def __init__(
        self,
        params: LinkParams,
        *,
        name: str,
        seed: int = 0,
        profile: str = "custom",
        max_pending: int = 10_000,
        on_decision: DecisionHook | None = None,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending: must be >= 1, got {max_pending}")
        self.name = name
        self.seed = seed
        self.profile = profile
        self.max_pending = max_pending
        self.link = Link(frame_params(params), seed=seed, device=name, on_decision=on_decision)
        self._queues = {way: _Queue() for way in Way}
        self._tallies = {way: Tally(BRIDGE_RESULTS) for way in Way}
        self._seq = itertools.count()

    def offer(self, way: Way, frame: bytes, now: float) -> str:
        """Take a frame read on the ``way``'s source side at ``now``; returns its result label."""
        tally, queue = self._tallies[way], self._queues[way]
        size = len(frame)
        tally.bytes_in += size
        if not is_impaired(frame):
            queue.now.append((frame, size))
            tally.packets["unimpaired"] += 1
            return "unimpaired"
        fate = self.link.direction(way.model_direction).submit(now, size)
        if fate.drop_cause is not None:
            label = _DROP_RESULT[fate.drop_cause]
            tally.packets[label] += 1
            return label
        times = fate.deliver_at
        if len(queue) + len(times) > self.max_pending:
            tally.packets["dropped_overflow"] += 1
            return "dropped_overflow"
        corrupt = fate.corrupt_bit is not None
        if fate.corrupt_bit is not None:
            frame = corrupt_frame(frame, fate.corrupt_bit)
            tally.packets["corrupted"] += 1
        for due in times:
            queue.push((due, next(self._seq), frame, now, corrupt))
        tally.packets["passed"] += 1
        if len(times) > 1:
            tally.packets["duplicated"] += 1
        return "passed"

    def pop_due(self, now: float) -> list[tuple[Way, bytes, bool]]:
        """Every frame to send at ``now``: (way, frame, corrupted); unimpaired ones first."""
        out: list[tuple[Way, bytes, bool]] = []
        held: list[_Held] = []
        for way, queue in self._queues.items():
            tally = self._tallies[way]
            while queue.now:
                frame, size = queue.now.popleft()
                tally.bytes_out += size
                out.append((way, frame, False))
            queue.pop_due(now, held)
            for _, _, frame, offered, corrupt in held:
                delay = now - offered
                tally.delay_buckets[bisect_left(DELAY_BUCKETS, delay)] += 1
                tally.delay_sum += delay
                tally.bytes_out += len(frame)
                out.append((way, frame, corrupt))
            held.clear()
        return out

    def get_timer(self) -> float | None:
        """The next time a held frame is due, or None (unimpaired frames: the next pop_due)."""
        at = min(q.next_due() for q in self._queues.values())
        return None if at == math.inf else at

    def pending(self) -> dict[str, int]:
        """Frames held now, per way."""
        return {way.value: len(q) + len(q.now) for way, q in self._queues.items()}

    def force_outage(self, now: float, seconds: float) -> None:
        """Drop every IP frame, both ways, from ``now`` for ``seconds`` (ARP still passes)."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds: must be a finite number >= 0, got {seconds!r}")
        self.link.force_outage(now, seconds)

    def clear(self) -> int:
        """Discard every held frame (at shutdown); returns how many there were."""
        return sum(q.clear() for q in self._queues.values())

    def stats(self, now: float) -> BridgeStats:
        """A snapshot of the counters at ``now`` (shell counters left at zero)."""
        return BridgeStats(
            name=self.name,
            profile=self.profile,
            seed=self.seed,
            uptime_s=now,
            a_to_b=self._tallies[Way.A_TO_B].snapshot(),
            b_to_a=self._tallies[Way.B_TO_A].snapshot(),
            pending=self.pending(),
        )

"""Sans-I/O link model: decides each datagram's fate from seeded state and the caller's ``now``.

A packet offered to a direction goes through these stages, in this order, and its whole
fate is fixed at that moment (O(1) work, no timers, no per-packet state kept):

1. **mtu**: a payload larger than ``mtu`` bytes is dropped (cause ``"mtu"``).
2. **outage**: during a scheduled or forced outage every packet is dropped (``"outage"``).
3. **queue**: with ``rate_kbit > 0`` the packet joins a virtual FIFO in front of a
   serialiser of that rate. The FIFO is one number, the time the serialiser is busy
   until; the backlog in bytes is derived from it at ``now``. A packet that would push
   the backlog over ``queue_limit_bytes`` is dropped (``"queue"``). Otherwise it leaves
   the serialiser at ``busy_until`` -- queueing delay is how bufferbloat shows.
4. **loss**: the loss model (Bernoulli, Gilbert-Elliott or netem's 4-state Markov chain)
   drops it (``"loss"``). Loss comes after the queue on purpose: a packet lost on the
   radio still used its share of the link.
5. **delay**: one-way ``delay_ms`` plus jitter. Unless ``allow_reorder`` is set, a packet
   never arrives before the previous one of the same direction (like an in-order RLC
   link: a late packet holds the following ones back, so at packet spacings below the
   jitter the delay median rises). ``reorder_pct`` holds a share of packets back by an
   extra ``reorder_gap_ms`` so that later packets overtake them.
6. **duplicate** (``duplicate_pct``): the packet is delivered twice, back to back.
7. **corrupt** (``corrupt_pct``): one bit, chosen now and recorded in the fate, is flipped.

Randomness: each stage of each direction of each device draws from its own
``random.Random`` seeded by :func:`derive_seed` (blake2b of base seed, device, direction
and stage; never Python's ``hash()``). The same seed gives the same fate for every
packet, and changing one impairment (say, jitter) does not change which packets another
one (say, loss) picks, so runs stay comparable.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Literal

__all__ = [
    "Decision",
    "DecisionHook",
    "Direction",
    "DirectionStats",
    "DropCause",
    "Fate",
    "Link",
    "LinkDirection",
    "LinkParams",
    "LinkStats",
    "LossParams",
    "derive_seed",
    "flip_bit",
]

LossModelName = Literal["none", "random", "gemodel", "state"]
JitterDistribution = Literal["uniform", "normal"]

# Which LossParams fields each loss model reads; the others must keep their defaults.
_LOSS_FIELDS: dict[str, tuple[str, ...]] = {
    "none": (),
    "random": ("loss_pct",),
    "gemodel": ("p", "r", "h", "k"),
    "state": ("p13", "p31", "p32", "p23", "p14"),
}

# Gilbert-Elliott states.
_GOOD, _BAD = 0, 1
# 4-state model states, numbered as in Salsano et al. (NetemCLG) and netem's p13..p14.
_GAP_RX, _BURST_RX, _BURST_LOST, _GAP_LOST = 1, 2, 3, 4


class Direction(StrEnum):
    """Which way a packet travels on a device's link."""

    UP = "up"  # edge -> hub
    DOWN = "down"  # hub -> edge


class DropCause(StrEnum):
    """Why a packet was dropped; the string value is the metrics label."""

    LOSS = "loss"
    QUEUE = "queue"
    MTU = "mtu"
    OUTAGE = "outage"


def _check_pct(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 100.0):
        raise ValueError(f"{name}: must be a percentage between 0 and 100, got {value!r}")


def _check_nonneg(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class LossParams:
    """A loss model and its parameters, all in percent, named as in tc-netem(8).

    ``model``:

    - ``none``: no random loss.
    - ``random``: Bernoulli, each packet lost with ``loss_pct`` (netem ``loss random``).
    - ``gemodel``: Gilbert-Elliott (netem ``loss gemodel p r 1-h 1-k``). ``p`` is the
      chance per packet of going good -> bad, ``r`` of going bad -> good. ``h`` and ``k``
      are the classic Gilbert-Elliott *delivery* chances in the bad and good state, so
      netem's third and fourth arguments are ``100 - h`` (loss in the bad state) and
      ``100 - k`` (loss in the good state). Defaults ``h = 0, k = 100`` give netem's
      "Simple Gilbert" (bad loses everything, good nothing): netem ``gemodel 2% 25%
      100% 0%`` is ``p: 2, r: 25, h: 0, k: 100``. As in netem's kernel code, a packet
      meets the loss chance of the state it finds, then the state moves; so bursts
      last ``1/r`` packets on average and the long-run loss is ``p / (p + r)`` (for
      ``h = 0, k = 100``).
    - ``state``: netem's 4-state Markov chain (``loss state p13 p31 p32 p23 p14``):
      1 = received in a gap, 2 = received in a burst, 3 = lost in a burst, 4 = an
      isolated loss in a gap (always followed by state 1). ``pXY`` is the chance of
      going from state X to state Y; each packet first moves the chain, and is lost
      when the new state is 3 or 4 (as netem does).
    """

    model: LossModelName = "none"
    loss_pct: float = 0.0
    p: float = 0.0
    r: float = 0.0
    h: float = 0.0
    k: float = 100.0
    p13: float = 0.0
    p31: float = 0.0
    p32: float = 0.0
    p23: float = 0.0
    p14: float = 0.0

    @classmethod
    def bernoulli(cls, loss_pct: float) -> LossParams:
        """Independent loss of ``loss_pct`` percent of packets."""
        return cls(model="random", loss_pct=loss_pct)

    @classmethod
    def gilbert_elliott(cls, p: float, r: float, h: float = 0.0, k: float = 100.0) -> LossParams:
        """Bursty two-state loss; see the class docstring for what p, r, h and k mean."""
        return cls(model="gemodel", p=p, r=r, h=h, k=k)

    @classmethod
    def four_state(
        cls, p13: float, p31: float, p32: float = 0.0, p23: float = 0.0, p14: float = 0.0
    ) -> LossParams:
        """netem's 4-state Markov loss; see the class docstring for the states."""
        return cls(model="state", p13=p13, p31=p31, p32=p32, p23=p23, p14=p14)

    def validate(self) -> None:
        """Raise ValueError naming the field when the parameters make no sense."""
        if self.model not in _LOSS_FIELDS:
            raise ValueError(f"model: expected one of {sorted(_LOSS_FIELDS)}, got {self.model!r}")
        defaults = LossParams()
        for f in fields(self):
            if f.name == "model":
                continue
            value = getattr(self, f.name)
            _check_pct(f.name, value)
            if f.name not in _LOSS_FIELDS[self.model] and value != getattr(defaults, f.name):
                users = [m for m, names in _LOSS_FIELDS.items() if f.name in names]
                raise ValueError(
                    f"{f.name}: belongs to loss model {users[0]!r}, not {self.model!r}"
                )
        if self.model == "gemodel" and self.p > 0 and self.r <= 0:
            raise ValueError("r: must be > 0, or the bad state is never left")
        if self.model == "state":
            self._validate_four_state()

    def _validate_four_state(self) -> None:
        if self.p13 + self.p14 > 100:
            raise ValueError("p13 + p14: must not exceed 100")
        if self.p31 + self.p32 > 100:
            raise ValueError("p31 + p32: must not exceed 100")
        if self.p13 > 0 and self.p31 + self.p32 <= 0:
            raise ValueError("p31: p31 + p32 must be > 0, or a burst never ends")
        if self.p32 > 0 and self.p23 <= 0:
            raise ValueError("p23: must be > 0 when p32 > 0, or state 2 is never left")
        if self.p32 > 0 and self.p31 <= 0:
            raise ValueError("p31: must be > 0 when p32 > 0, or the gap is never reached again")


@dataclass(frozen=True, slots=True)
class LinkParams:
    """How a device's link behaves; the defaults are a perfect link.

    Times in the caller's clock: outages repeat every ``outage_every_s`` starting at
    ``outage_offset_s`` and last ``outage_duration_s``. ``rate_kbit`` (kilobit/s,
    0 = unlimited) applies to both directions unless ``down_rate_kbit`` sets the
    hub -> edge rate. ``mtu`` is the largest UDP payload (bytes) the link carries.
    ``rebind_every_s`` is the NAT rebinding period (0 = never).
    """

    loss: LossParams = field(default_factory=LossParams)
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    jitter_distribution: JitterDistribution = "uniform"
    delay_correlation_pct: float = 0.0
    allow_reorder: bool = False
    reorder_pct: float = 0.0
    reorder_gap_ms: float = 0.0
    duplicate_pct: float = 0.0
    corrupt_pct: float = 0.0
    rate_kbit: float = 0.0
    down_rate_kbit: float | None = None
    queue_limit_bytes: int = 65536
    mtu: int = 1472
    outage_every_s: float = 0.0
    outage_duration_s: float = 0.0
    outage_offset_s: float = 0.0
    rebind_every_s: float = 0.0

    def rate_kbit_for(self, direction: Direction) -> float:
        """The serialiser rate of one direction in kbit/s (0 = unlimited)."""
        if direction is Direction.DOWN and self.down_rate_kbit is not None:
            return self.down_rate_kbit
        return self.rate_kbit

    def validate(self) -> None:
        """Raise ValueError naming the field when the parameters make no sense."""
        try:
            self.loss.validate()
        except ValueError as exc:
            raise ValueError(f"loss.{exc}") from exc
        for name in ("delay_ms", "jitter_ms", "reorder_gap_ms", "rate_kbit", "rebind_every_s"):
            _check_nonneg(name, getattr(self, name))
        if self.down_rate_kbit is not None:
            _check_nonneg("down_rate_kbit", self.down_rate_kbit)
        for name in ("delay_correlation_pct", "reorder_pct", "duplicate_pct", "corrupt_pct"):
            _check_pct(name, getattr(self, name))
        if self.jitter_distribution not in ("uniform", "normal"):
            got = self.jitter_distribution
            raise ValueError(f"jitter_distribution: expected uniform or normal, got {got!r}")
        if self.reorder_pct > 0 and self.reorder_gap_ms <= 0:
            raise ValueError("reorder_gap_ms: must be > 0 when reorder_pct is set")
        if self.mtu < 1:
            raise ValueError(f"mtu: must be >= 1, got {self.mtu}")
        if self.queue_limit_bytes < self.mtu and (self.rate_kbit or self.down_rate_kbit):
            raise ValueError(
                f"queue_limit_bytes: must hold at least one mtu-sized packet ({self.mtu})"
            )
        self._validate_outages()

    def _validate_outages(self) -> None:
        for name in ("outage_every_s", "outage_duration_s", "outage_offset_s"):
            _check_nonneg(name, getattr(self, name))
        if self.outage_every_s == 0:
            if self.outage_duration_s or self.outage_offset_s:
                raise ValueError("outage_every_s: must be set for outage_duration_s/offset_s")
            return
        if not 0 < self.outage_duration_s < self.outage_every_s:
            raise ValueError("outage_duration_s: must be > 0 and shorter than outage_every_s")


def flip_bit(data: bytes, bit: int) -> bytes:
    """A copy of ``data`` with bit ``bit`` flipped (bit 0 is the top bit of byte 0)."""
    if not 0 <= bit < len(data) * 8:
        raise ValueError(f"bit {bit} outside a {len(data)}-byte payload")
    out = bytearray(data)
    out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Fate:
    """What happens to one packet: dropped (and why) or delivered at these times."""

    drop_cause: DropCause | None = None
    deliver_at: tuple[float, ...] = ()
    corrupt_bit: int | None = None
    reordered: bool = False

    @property
    def dropped(self) -> bool:
        """True when the packet never arrives."""
        return self.drop_cause is not None

    @property
    def corrupt(self) -> bool:
        """True when a bit of the payload is flipped in every delivered copy."""
        return self.corrupt_bit is not None

    @property
    def duplicated(self) -> bool:
        """True when the packet arrives twice."""
        return len(self.deliver_at) > 1

    def apply(self, data: bytes) -> bytes:
        """The bytes to deliver: ``data`` itself, or a copy with ``corrupt_bit`` flipped."""
        return data if self.corrupt_bit is None else flip_bit(data, self.corrupt_bit)


_DROPS = {cause: Fate(drop_cause=cause) for cause in DropCause}


@dataclass(frozen=True, slots=True)
class Decision:
    """One packet's fate with what is needed to explain it after the run."""

    now: float
    seed: int
    device: str
    direction: Direction
    seq: int
    size: int
    fate: Fate


DecisionHook = Callable[[Decision], None]


@dataclass(frozen=True, slots=True)
class DirectionStats:
    """Counters of one direction since it was created."""

    submitted_packets: int = 0
    submitted_bytes: int = 0
    passed_packets: int = 0
    passed_bytes: int = 0
    dropped_loss: int = 0
    dropped_queue: int = 0
    dropped_mtu: int = 0
    dropped_outage: int = 0
    duplicated: int = 0
    corrupted: int = 0
    reordered: int = 0
    delay_total_s: float = 0.0

    @property
    def dropped(self) -> int:
        """Packets dropped for any cause."""
        return self.dropped_loss + self.dropped_queue + self.dropped_mtu + self.dropped_outage

    def dropped_by_cause(self) -> dict[str, int]:
        """Dropped packets keyed by cause label (loss, queue, mtu, outage)."""
        return {cause.value: getattr(self, f"dropped_{cause.value}") for cause in DropCause}

    @property
    def mean_delay_s(self) -> float:
        """Mean time from submit to first delivery of the packets that passed."""
        return self.delay_total_s / self.passed_packets if self.passed_packets else 0.0


@dataclass(slots=True)
class _Counters:
    submitted_packets: int = 0
    submitted_bytes: int = 0
    passed_packets: int = 0
    passed_bytes: int = 0
    dropped_loss: int = 0
    dropped_queue: int = 0
    dropped_mtu: int = 0
    dropped_outage: int = 0
    duplicated: int = 0
    corrupted: int = 0
    reordered: int = 0
    delay_total_s: float = 0.0

    def count(self, now: float, size: int, fate: Fate) -> None:
        self.submitted_packets += 1
        self.submitted_bytes += size
        if fate.drop_cause is not None:
            name = f"dropped_{fate.drop_cause.value}"
            setattr(self, name, getattr(self, name) + 1)
            return
        self.passed_packets += 1
        self.passed_bytes += size
        self.delay_total_s += fate.deliver_at[0] - now
        self.duplicated += fate.duplicated
        self.corrupted += fate.corrupt
        self.reordered += fate.reordered

    def snapshot(self) -> DirectionStats:
        return DirectionStats(**{f.name: getattr(self, f.name) for f in fields(self)})


def derive_seed(seed: int, device: str, direction: str, stage: str) -> int:
    """A stable 64-bit seed for one random stream (blake2b; same inputs, same seed)."""
    digest = hashlib.blake2b(digest_size=8, person=b"squall-linkmodel")
    for part in (str(seed), device, str(direction), stage):
        raw = part.encode("utf-8")
        digest.update(len(raw).to_bytes(4, "big") + raw)
    return int.from_bytes(digest.digest(), "big")


class LinkDirection:
    """One direction of one device's link: decides each packet's fate in O(1)."""

    def __init__(
        self,
        params: LinkParams,
        *,
        seed: int,
        device: str,
        direction: Direction,
        on_decision: DecisionHook | None = None,
    ) -> None:
        params.validate()
        self.seed = seed
        self.device = device
        self.direction = Direction(direction)
        self._on_decision = on_decision
        self._rng = {
            stage: random.Random(derive_seed(seed, device, self.direction, stage))
            for stage in ("loss", "delay", "reorder", "duplicate", "corrupt")
        }
        self._params = params
        self._bytes_per_s = params.rate_kbit_for(self.direction) * 1000.0 / 8.0
        self._busy_until = -math.inf  # the serialiser's virtual FIFO drains at this time
        self._last_deliver = -math.inf  # latest in-order delivery so far
        self._forced_outage_from = self._forced_outage_until = -math.inf
        self._loss_state = self._initial_loss_state(params.loss)
        self._jitter_z: float | None = None  # AR(1) state of the correlated jitter
        self._seq = 0
        self._counters = _Counters()
        self._plain = self._is_plain(params)
        self._last_fate = Fate(None, (math.nan,))  # the fast path's latest fate

    @property
    def params(self) -> LinkParams:
        """The parameters in force."""
        return self._params

    def submit(self, now: float, size: int) -> Fate:
        """Decide the fate of a ``size``-byte datagram offered at ``now`` (seconds)."""
        if size < 0:
            raise ValueError(f"packet size must be >= 0, got {size}")
        p = self._params
        if (
            self._plain
            and size <= p.mtu
            and not self._forced_outage_from <= now < self._forced_outage_until
        ):
            # Fast path, same fate and random draws as _decide: only delay and jitter apply.
            deliver = max(now, now + (p.delay_ms + self._jitter_ms()) / 1000.0)
            if not p.allow_reorder and deliver < self._last_deliver:
                deliver = self._last_deliver
            if deliver > self._last_deliver:
                self._last_deliver = deliver
            fate = self._last_fate
            if fate.deliver_at[0] != deliver:  # a Fate is immutable: the same one serves again
                fate = self._last_fate = Fate(None, (deliver,))
            c = self._counters
            c.submitted_packets += 1
            c.submitted_bytes += size
            c.passed_packets += 1
            c.passed_bytes += size
            c.delay_total_s += deliver - now
        else:
            fate = self._decide(now, size)
            self._counters.count(now, size, fate)
        if self._on_decision is not None:
            self._on_decision(
                Decision(now, self.seed, self.device, self.direction, self._seq, size, fate)
            )
        self._seq += 1
        return fate

    def _is_plain(self, p: LinkParams) -> bool:
        """True when only delay and jitter act (and the mtu, and forced outages): no rate,
        loss, scheduled outage, reordering, duplication or corruption in this direction."""
        return (
            p.loss.model == "none"
            and p.rate_kbit_for(self.direction) == 0
            and p.outage_every_s <= 0
            and p.reorder_pct == 0
            and p.duplicate_pct == 0
            and p.corrupt_pct == 0
        )

    def set_params(self, params: LinkParams, now: float) -> None:
        """Switch parameters at ``now``; queued bytes stay queued and drain at the new rate."""
        params.validate()
        backlog = self.queue_bytes(now)
        if params.loss.model != self._params.loss.model:
            self._loss_state = self._initial_loss_state(params.loss)
        self._params = params
        self._plain = self._is_plain(params)
        self._bytes_per_s = params.rate_kbit_for(self.direction) * 1000.0 / 8.0
        if self._bytes_per_s > 0 and backlog > 0:
            self._busy_until = now + backlog / self._bytes_per_s
        else:
            self._busy_until = -math.inf

    def force_outage(self, now: float, duration: float) -> None:
        """Drop every packet from ``now`` for ``duration`` seconds (extends a forced outage)."""
        _check_nonneg("duration", duration)
        if self._forced_outage_from <= now <= self._forced_outage_until:
            self._forced_outage_until = max(self._forced_outage_until, now + duration)
        else:
            self._forced_outage_from, self._forced_outage_until = now, now + duration

    def in_outage(self, now: float) -> bool:
        """True when a packet offered at ``now`` would be dropped for an outage."""
        if self._forced_outage_from <= now < self._forced_outage_until:
            return True
        p = self._params
        if p.outage_every_s <= 0:
            return False
        since = now - p.outage_offset_s
        return since >= 0 and since % p.outage_every_s < p.outage_duration_s

    def queue_bytes(self, now: float) -> float:
        """Bytes waiting in front of the serialiser at ``now`` (0 when the rate is unlimited)."""
        if self._bytes_per_s <= 0:
            return 0.0
        return max(0.0, self._busy_until - now) * self._bytes_per_s

    def queue_delay(self, now: float) -> float:
        """Seconds a packet offered at ``now`` would wait before its serialisation starts."""
        return max(0.0, self._busy_until - now) if self._bytes_per_s > 0 else 0.0

    def stats(self) -> DirectionStats:
        """A snapshot of this direction's counters."""
        return self._counters.snapshot()

    # -- the stages -----------------------------------------------------------------

    def _decide(self, now: float, size: int) -> Fate:
        p = self._params
        if size > p.mtu:
            return _DROPS[DropCause.MTU]
        if self.in_outage(now):
            return _DROPS[DropCause.OUTAGE]
        departure = self._enqueue(now, size)
        if departure is None:
            return _DROPS[DropCause.QUEUE]
        if self._lost():
            return _DROPS[DropCause.LOSS]
        deliver, reordered = self._deliver_time(departure)
        times = (deliver, deliver) if self._chance("duplicate", p.duplicate_pct) else (deliver,)
        bit = None
        if size > 0 and self._chance("corrupt", p.corrupt_pct):
            bit = self._rng["corrupt"].randrange(size * 8)
        return Fate(deliver_at=times, corrupt_bit=bit, reordered=reordered)

    def _chance(self, stage: str, pct: float) -> bool:
        return pct > 0 and self._rng[stage].random() * 100.0 < pct

    def _enqueue(self, now: float, size: int) -> float | None:
        """The time the packet leaves the serialiser, or None when the queue is full."""
        if self._bytes_per_s <= 0:
            return now
        start = max(now, self._busy_until)
        backlog = (start - now) * self._bytes_per_s
        if backlog + size > self._params.queue_limit_bytes:
            return None
        self._busy_until = start + size / self._bytes_per_s
        return self._busy_until

    def _deliver_time(self, departure: float) -> tuple[float, bool]:
        p = self._params
        deliver = max(departure, departure + (p.delay_ms + self._jitter_ms()) / 1000.0)
        if not p.allow_reorder:
            deliver = max(deliver, self._last_deliver)
        if self._chance("reorder", p.reorder_pct):
            # Held back off the in-order track, so that later packets overtake it.
            return deliver + p.reorder_gap_ms / 1000.0, True
        self._last_deliver = max(self._last_deliver, deliver)
        return deliver, False

    def _jitter_ms(self) -> float:
        """Jitter from a Gaussian AR(1) series, mapped to the configured distribution.

        netem mixes uniform numbers (``u = (1 - rho) * rand + rho * last``), which narrows
        the jitter range as correlation grows; an AR(1) series ``z' = rho z + sqrt(1 -
        rho^2) e`` keeps each delay correlated with the last by about ``rho`` while every
        delay still follows the configured distribution and range.
        """
        p = self._params
        if p.jitter_ms <= 0:
            return 0.0
        rho = p.delay_correlation_pct / 100.0
        e = self._rng["delay"].gauss(0.0, 1.0)
        z = e if self._jitter_z is None else rho * self._jitter_z + math.sqrt(1 - rho * rho) * e
        self._jitter_z = z
        if p.jitter_distribution == "normal":
            return z * p.jitter_ms  # jitter_ms is the standard deviation, as in netem
        u = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))  # standard normal CDF: uniform in (0, 1)
        return (2.0 * u - 1.0) * p.jitter_ms

    @staticmethod
    def _initial_loss_state(loss: LossParams) -> int:
        return _GAP_RX if loss.model == "state" else _GOOD

    def _lost(self) -> bool:
        loss = self._params.loss
        if loss.model == "random":
            return self._chance("loss", loss.loss_pct)
        if loss.model == "gemodel":
            return self._lost_gilbert_elliott(loss)
        if loss.model == "state":
            return self._lost_four_state(loss)
        return False

    def _lost_gilbert_elliott(self, loss: LossParams) -> bool:
        rng = self._rng["loss"]
        bad = self._loss_state == _BAD
        lost = rng.random() * 100.0 >= (loss.h if bad else loss.k)
        if bad:
            if rng.random() * 100.0 < loss.r:
                self._loss_state = _GOOD
        elif rng.random() * 100.0 < loss.p:
            self._loss_state = _BAD
        return lost

    def _lost_four_state(self, loss: LossParams) -> bool:
        u = self._rng["loss"].random() * 100.0
        state = self._loss_state
        if state == _GAP_RX:
            if u < loss.p13:
                state = _BURST_LOST
            elif u < loss.p13 + loss.p14:
                state = _GAP_LOST
        elif state == _BURST_RX:
            if u < loss.p23:
                state = _BURST_LOST
        elif state == _BURST_LOST:
            if u < loss.p31:
                state = _GAP_RX
            elif u < loss.p31 + loss.p32:
                state = _BURST_RX
        else:
            state = _GAP_RX
        self._loss_state = state
        return state in (_BURST_LOST, _GAP_LOST)


@dataclass(frozen=True, slots=True)
class LinkStats:
    """Counters of both directions of one device's link."""

    up: DirectionStats
    down: DirectionStats


class Link:
    """One device's link: ``up`` (edge -> hub), ``down`` (hub -> edge) and its NAT binding."""

    def __init__(
        self,
        params: LinkParams,
        *,
        seed: int,
        device: str,
        on_decision: DecisionHook | None = None,
    ) -> None:
        self.seed = seed
        self.device = device
        self.up = LinkDirection(
            params, seed=seed, device=device, direction=Direction.UP, on_decision=on_decision
        )
        self.down = LinkDirection(
            params, seed=seed, device=device, direction=Direction.DOWN, on_decision=on_decision
        )
        self._params = params
        self._epoch_base = 0  # port epoch at _epoch_since; periodic rebinds count from there
        self._epoch_since = 0.0

    @property
    def params(self) -> LinkParams:
        """The parameters in force."""
        return self._params

    def direction(self, direction: Direction) -> LinkDirection:
        """The ``up`` or ``down`` direction."""
        return self.up if Direction(direction) is Direction.UP else self.down

    def set_params(self, params: LinkParams, now: float) -> None:
        """Switch both directions to ``params`` at ``now``; the port epoch never goes back."""
        params.validate()
        self._epoch_base = self.current_port_epoch(now)
        self._epoch_since = now
        self.up.set_params(params, now)
        self.down.set_params(params, now)
        self._params = params

    def current_port_epoch(self, now: float) -> int:
        """The NAT binding in force at ``now``: +1 every ``rebind_every_s`` and per rebind()."""
        period = self._params.rebind_every_s
        if period <= 0 or now <= self._epoch_since:
            return self._epoch_base
        return self._epoch_base + math.floor((now - self._epoch_since) / period)

    def rebind(self, now: float) -> int:
        """Force a NAT rebinding at ``now``; returns the new epoch (periods restart here)."""
        self._epoch_base = self.current_port_epoch(now) + 1
        self._epoch_since = now
        return self._epoch_base

    def force_outage(self, now: float, duration: float) -> None:
        """Take both directions down from ``now`` for ``duration`` seconds."""
        self.up.force_outage(now, duration)
        self.down.force_outage(now, duration)

    def in_outage(self, now: float) -> bool:
        """True when the link is down at ``now``."""
        return self.up.in_outage(now) or self.down.in_outage(now)

    def stats(self) -> LinkStats:
        """A snapshot of both directions' counters."""
        return LinkStats(up=self.up.stats(), down=self.down.stats())

"""The discrete-event clock of the virtual-time fleet: a heap of (time, seq, event), no sleeping.

Time is a float of simulated seconds from 0.  Events at the same time run in the order
they were scheduled (``seq`` breaks ties), so a run depends only on its inputs, never on
the machine's speed.  Wall-clock readings that cores need (record timestamps, the hub's
received-at time, certificate validity) come from ``VIRTUAL_EPOCH`` plus simulated time.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import Any, Final

# Simulated time 0 is this instant: fixed, so timestamps in the log are the same every run.
VIRTUAL_EPOCH: Final = datetime(2025, 1, 1, tzinfo=UTC)
EPOCH_S: Final = VIRTUAL_EPOCH.timestamp()


class Kind(IntEnum):
    """What a scheduled event does (the runner dispatches on it)."""

    PUBLISH = 0  # a vehicle produces its next sample
    TO_HUB = 1  # a datagram reaches the hub
    TO_EDGE = 2  # a datagram reaches a device
    EDGE_TIMER = 3  # a device's one deadline
    HUB_TIMER = 4  # the hub's one deadline
    FAULT = 5  # a scheduled crash or restart
    CONSUMER = 6  # the durable consumer reads the log


Event = tuple[float, int, Kind, Any, Any]  # time, seq, kind, target, payload


class EventQueue:
    """A heap of pending events and the current simulated time."""

    def __init__(self) -> None:
        self._heap: list[Event] = []
        self._seq = itertools.count()
        self.now = 0.0
        self.processed = 0

    def at(self, when: float, kind: Kind, target: Any = None, payload: Any = None) -> None:
        """Schedule an event; a time in the past runs at the current time."""
        t = when if when > self.now else self.now
        heapq.heappush(self._heap, (t, next(self._seq), kind, target, payload))

    def pop(self) -> Event | None:
        """The next event, advancing ``now`` to its time (None when nothing is left)."""
        if not self._heap:
            return None
        ev = heapq.heappop(self._heap)
        self.now = ev[0]
        self.processed += 1
        return ev

    def peek_time(self) -> float | None:
        """Time of the next event without taking it."""
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)


class TimerSlot:
    """The one pending timer event of one core, and a guard against zero-progress loops.

    A core whose deadline is ``now`` again after it ran at ``now`` (aioquic's loss timer
    can, by float rounding of ``sent_time + loss_delay``) would run forever in virtual
    time, where the clock never moves by itself.  After ``SPIN_LIMIT`` runs at one
    instant the slot arms ``NUDGE_S`` later, as real time would have moved on.
    """

    SPIN_LIMIT: Final = 3
    NUDGE_S: Final = 1e-6

    __slots__ = ("armed", "fired_at", "fired_same", "nudges")

    def __init__(self) -> None:
        self.armed: float | None = None
        self.fired_at = -1.0
        self.fired_same = 0
        self.nudges = 0

    def arm(self, queue: EventQueue, when: float | None, kind: Kind, target: Any) -> None:
        """Schedule the core's deadline ``when`` (None: no deadline) unless already pending."""
        if when is None:
            self.armed = None
            return
        now = queue.now
        if when <= now:
            when = now
            if self.fired_at == now and self.fired_same >= self.SPIN_LIMIT:
                when = now + self.NUDGE_S
                self.nudges += 1
        if self.armed != when:
            self.armed = when
            queue.at(when, kind, target)

    def fire(self, now: float) -> bool:
        """The slot's event came up at ``now``: True if it is still the pending one."""
        if self.armed != now:
            return False  # superseded by a later arming
        self.armed = None
        if self.fired_at == now:
            self.fired_same += 1
        else:
            self.fired_at, self.fired_same = now, 0
        return True


def wall_us(now: float) -> int:
    """Microseconds since the Unix epoch at simulated time ``now``."""
    return round((EPOCH_S + now) * 1e6)


def wall_s(now: float) -> float:
    """Seconds since the Unix epoch at simulated time ``now``."""
    return EPOCH_S + now


def datetime_clock(queue: EventQueue) -> Callable[[], datetime]:
    """A certificate-validity clock that reads simulated time."""

    def clock() -> datetime:
        return VIRTUAL_EPOCH + timedelta(seconds=queue.now)

    return clock

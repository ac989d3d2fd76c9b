"""When a device the hub turned away (every handshake slot taken) should come back (sans-I/O).

A hub takes at most ``max_handshakes`` handshakes at a time and answers the rest BUSY with
a retry-after hint.  A fixed hint turns a storm -- a fleet leaving a tunnel, or powering up
together -- into rounds: the hub finishes its slots' handshakes in a second or two, then
idles until the turned-away devices come back, all at once, a fixed time later.  (At 1,750
devices, ``max_handshakes`` 200 and a 5 s hint, about 20 handshakes a second completed on
a machine not yet busy.)

``HandshakePacer`` hands out return times instead, one slot interval apart, after the ones
it already gave, so a crowd comes back at the rate the hub can take it.  That rate is the
slots over the time a handshake takes (Little's law: with every slot busy, one frees every
``duration / slots``), the duration averaged over the handshakes finished in the last
``window_s`` (``assumed_s`` before any has); a hub that slows down under load thus
spaces its crowd out further.  The first place is ``min_s`` out, and no hint exceeds
``max_s``, the configured retry-after: past that the device gets ``max_s`` and no place,
and if the slots are taken again when it comes back, it is given a place then.
"""

from __future__ import annotations

from collections import deque

WINDOW_S = 5.0  # handshake durations averaged over those finished this recently
ASSUMED_S = 1.0  # the duration assumed before any handshake has finished
MIN_HINT_S = 0.05  # the first place: a slot frees a little after the device hears BUSY


class HandshakePacer:
    """Spaces the returns of devices turned away for want of a handshake slot."""

    def __init__(
        self,
        slots: int,
        max_s: float,
        *,
        window_s: float = WINDOW_S,
        assumed_s: float = ASSUMED_S,
        min_s: float = MIN_HINT_S,
    ) -> None:
        if slots < 1 or max_s <= 0 or window_s <= 0 or assumed_s <= 0:
            raise ValueError("pacer: slots, max_s, window_s and assumed_s must be positive")
        if not 0 <= min_s <= max_s:
            raise ValueError("pacer: min_s must be within 0..max_s")
        self.slots = slots
        self.max_s = max_s
        self.window_s = window_s
        self.assumed_s = assumed_s
        self.min_s = min_s
        self._done: deque[tuple[float, float]] = deque()  # (finished at, took) in the window
        self._took = 0.0  # sum of the window's durations
        self._next = float("-inf")  # the last return time handed out

    def completed(self, now: float, took: float) -> None:
        """A handshake that took ``took`` seconds finished (its slot is free)."""
        took = max(took, 0.0)
        self._done.append((now, took))
        self._took += took
        self._expire(now)

    def rate(self, now: float) -> float:
        """Handshakes per second the hub can take: its slots over a handshake's duration."""
        self._expire(now)
        mean = self._took / len(self._done) if self._done else self.assumed_s
        return self.slots / max(mean, 1e-3)

    def hint(self, now: float) -> float:
        """Seconds until the device turned away now should try again."""
        at = max(self._next + 1.0 / self.rate(now), now + self.min_s)
        if at - now > self.max_s:  # the queue of returns is full: the longest wait, no place
            return self.max_s
        self._next = at
        return at - now

    def _expire(self, now: float) -> None:
        done = self._done
        while done and done[0][0] <= now - self.window_s:
            self._took -= done.popleft()[1]
        if not done:
            self._took = 0.0  # no drift from float sums

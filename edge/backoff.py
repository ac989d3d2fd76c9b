"""Reconnect policy (sans-I/O): exponential backoff with full jitter, a cap, retry-after
hints from a busy hub, and failover across hub addresses in a fixed preference order.

The order is the device's placement order (``edge.placement``): the first hub is its
home.  The agent stays on the hub it reached until something goes wrong there:

- a hub that answers BUSY with a retry-after hint sends the device to the next hub,
  no sooner than the hint (plus jitter, so a crowd leaving a busy hub spreads out);
- a hub that is draining (GOING_AWAY: shutting down, or refusing new connections
  while it drains) sends the device to the next hub at once, with a short jitter --
  unless every hub has been tried since the last good session, when the normal
  backoff applies so a fleet-wide restart is not a busy loop;
- ``failover_after`` plain failures (timeouts, refused handshakes, lost links) on one
  hub move the device to the next one.

After the last hub comes the first again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(slots=True)
class BackoffConfig:
    """Knobs of the reconnect policy."""

    base_s: float = 0.5
    cap_s: float = 60.0
    multiplier: float = 2.0
    # after this many failures on one hub, try the next address in the list
    failover_after: int = 2


class Reconnector:
    """Decides when and where to reconnect; time and randomness come from the caller."""

    def __init__(self, hubs: list[str], rng: random.Random, config: BackoffConfig | None = None):
        if not hubs:
            raise ValueError("at least one hub address is needed")
        self.hubs = list(hubs)
        self.config = config or BackoffConfig()
        self._rng = rng
        self._index = 0
        self.failures = 0  # consecutive failures since the last good session
        self._on_this_hub = 0
        self._moves = 0  # hubs moved on from since the last good session
        self.failovers = 0  # total moves to another hub (a metric)

    @property
    def current(self) -> str:
        """The hub address to use for the next attempt."""
        return self.hubs[self._index]

    @property
    def home(self) -> str:
        """The first hub of the order (the device's home under rendezvous placement)."""
        return self.hubs[0]

    def delay(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * multiplier**failures)]."""
        c = self.config
        ceiling = min(c.cap_s, c.base_s * c.multiplier ** min(failures, 64))
        return self._rng.uniform(0.0, ceiling)

    def on_failure(self, now: float, retry_after_s: float = 0.0, draining: bool = False) -> float:
        """An attempt or a session failed: returns the time of the next attempt.

        ``retry_after_s`` is a busy hub's hint; ``draining`` says the hub is going
        away (GOING_AWAY) and the device should move on now.
        """
        self.failures += 1
        self._on_this_hub += 1
        tried_all = self._moves >= len(self.hubs)
        if draining or retry_after_s > 0 or self._on_this_hub >= self.config.failover_after:
            self._next_hub()
        if retry_after_s > 0:
            # a busy hub's hint is a floor; jitter on top spreads a crowd leaving a tunnel
            return now + retry_after_s + self._rng.uniform(0.0, retry_after_s)
        if draining and not tried_all:
            return now + self._rng.uniform(0.0, self.config.base_s)
        return now + self.delay(self.failures - 1)

    def on_connected(self) -> None:
        """A session reached WELCOME: reset the backoff (the hub stays the same)."""
        self.failures = 0
        self._on_this_hub = 0
        self._moves = 0

    def _next_hub(self) -> None:
        if len(self.hubs) > 1:
            self._index = (self._index + 1) % len(self.hubs)
            self._moves += 1
            self.failovers += 1
        self._on_this_hub = 0

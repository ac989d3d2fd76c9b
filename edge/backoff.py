"""Reconnect policy (sans-I/O): exponential backoff with full jitter, a cap, retry-after
hints from a busy hub, and failover across hub addresses in a fixed preference order."""

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

    @property
    def current(self) -> str:
        """The hub address to use for the next attempt."""
        return self.hubs[self._index]

    def delay(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * multiplier**failures)]."""
        c = self.config
        ceiling = min(c.cap_s, c.base_s * c.multiplier ** min(failures, 64))
        return self._rng.uniform(0.0, ceiling)

    def on_failure(self, now: float, retry_after_s: float = 0.0) -> float:
        """An attempt or a session failed: returns the time of the next attempt."""
        self.failures += 1
        self._on_this_hub += 1
        if retry_after_s > 0 or self._on_this_hub >= self.config.failover_after:
            self._next_hub()
        wait = self.delay(self.failures - 1)
        if retry_after_s > 0:
            # a busy hub's hint is a floor; jitter on top spreads a crowd leaving a tunnel
            wait = retry_after_s + self._rng.uniform(0.0, retry_after_s)
        return now + wait

    def on_connected(self) -> None:
        """A session reached WELCOME: reset the backoff (the hub stays the same)."""
        self.failures = 0
        self._on_this_hub = 0

    def _next_hub(self) -> None:
        if len(self.hubs) > 1:
            self._index = (self._index + 1) % len(self.hubs)
        self._on_this_hub = 0

"""Reconnect backoff: grows, is jittered, capped, honours retry-after, fails over."""

from __future__ import annotations

import random

import pytest

from edge.backoff import BackoffConfig, Reconnector


def test_delays_grow_jittered_and_capped() -> None:
    r = Reconnector(["a"], random.Random(1), BackoffConfig(base_s=1, cap_s=30))
    now, waits = 0.0, []
    for _ in range(12):
        nxt = r.on_failure(now)
        waits.append(nxt - now)
        now = nxt
    ceilings = [min(30, 2**i) for i in range(12)]
    assert all(0 <= w <= c for w, c in zip(waits, ceilings, strict=True))
    assert max(waits) <= 30
    assert len(set(waits)) == len(waits)  # jittered: no two alike
    # the ceiling grows: later waits are larger on average than early ones
    assert sum(waits[6:]) / 6 > sum(waits[:3]) / 3


def test_many_devices_do_not_stampede() -> None:
    # 1,000 devices failing at the same instant spread their retries over the window
    times = [Reconnector(["a"], random.Random(i)).on_failure(0.0) for i in range(1000)]
    buckets = [0] * 10
    for t in times:
        buckets[min(int(t / 0.05), 9)] += 1
    assert max(buckets) < 200


def test_retry_after_is_a_floor_and_moves_to_the_next_hub() -> None:
    r = Reconnector(["a", "b"], random.Random(3))
    nxt = r.on_failure(10.0, retry_after_s=5.0)
    assert 15.0 <= nxt <= 20.0
    assert r.current == "b"


def test_failover_after_repeated_failures_and_reset_on_success() -> None:
    r = Reconnector(["a", "b", "c"], random.Random(4), BackoffConfig(failover_after=2))
    r.on_failure(0)
    assert r.current == "a"
    r.on_failure(0)
    assert r.current == "b"
    r.on_connected()
    assert r.failures == 0 and r.current == "b"


def test_needs_a_hub() -> None:
    with pytest.raises(ValueError):
        Reconnector([], random.Random(0))

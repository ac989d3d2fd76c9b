"""The split virtual run's two pure decisions: the lookahead of a link, and who runs what."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from simulator.linkmodel import Link, LossParams
from simulator.profiles import DEFAULT_PROFILES_PATH, get_profile, load_profiles
from simulator.vclock import EventQueue
from simulator.vnet import VirtualNetwork
from simulator.vparallel import (
    RANK0_DEVICE_SHARE,
    CausalityError,
    assign_ranks,
    lookahead_s,
)


@pytest.mark.parametrize("name", sorted(load_profiles(DEFAULT_PROFILES_PATH)))
def test_no_datagram_arrives_sooner_than_the_lookahead(name: str) -> None:
    params = get_profile(name, DEFAULT_PROFILES_PATH)
    ahead = lookahead_s(params)
    assert ahead >= 0.0
    link = Link(params, seed=11, device="truck-001")
    now, earliest = 0.0, float("inf")
    for i in range(20_000):
        now += 0.002
        for direction in (link.up, link.down):
            fate = direction.submit(now, 200 + (i % 7) * 150)
            for t in fate.deliver_at:
                earliest = min(earliest, t - now)
    assert earliest >= ahead
    if params.jitter_ms == 0 or params.jitter_distribution == "uniform":
        # tight: the bound is the configured floor of the delay, not a guess below it
        assert ahead == pytest.approx(
            max(0.0, (params.delay_ms - params.jitter_ms) / 1000), abs=1e-8
        )


def test_unbounded_jitter_has_no_lookahead() -> None:
    params = replace(get_profile("3g-poor", DEFAULT_PROFILES_PATH), jitter_distribution="normal")
    assert lookahead_s(params) == 0.0
    still = replace(params, jitter_ms=0.0)
    assert lookahead_s(still) == pytest.approx(still.delay_ms / 1000)


def test_devices_are_dealt_out_evenly_and_the_same_every_time() -> None:
    assert assign_ranks(10, 1) == [0] * 10
    ranks = assign_ranks(1000, 3)
    assert ranks == assign_ranks(1000, 3)
    n = Counter(ranks)
    assert n[0] == round(1000 * RANK0_DEVICE_SHARE)
    assert abs(n[1] - n[2]) <= 1 and n[1] + n[2] == 1000 - n[0]
    # rank 0's devices are spread over the fleet, not a block at one end
    zeros = [i for i, r in enumerate(ranks) if r == 0]
    assert zeros[0] < 1000 // n[0] + 1 and zeros[-1] >= 1000 - 1000 // n[0] - 1


def test_an_arrival_inside_a_window_already_run_is_refused() -> None:
    lossy = get_profile("3g-poor", DEFAULT_PROFILES_PATH)
    params = replace(lossy, loss=LossParams.bernoulli(0.0))  # every datagram arrives
    net = VirtualNetwork(EventQueue(), lambda i, n: params, ["truck-000"], seed=1)
    path = net.paths[0]
    # sent at 10 s, the link delivers no sooner than 10.11 s: a window starting at 10.05 s
    # may take it, one starting at 10.5 s has run past it
    net.down_from_hub(path, b"x" * 100, (path.host, 20_000), 10.0, not_before=10.05)
    with pytest.raises(CausalityError, match="truck-000"):
        net.down_from_hub(path, b"x" * 100, (path.host, 20_000), 10.0, not_before=10.5)

"""The sans-I/O link model and its profiles, driven by a synthetic clock (no sleeping)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from simulator.linkmodel import (
    Decision,
    Direction,
    DropCause,
    Fate,
    Link,
    LinkDirection,
    LinkParams,
    LossParams,
    flip_bit,
)
from simulator.profiles import DEFAULT_PROFILES_PATH, get_profile, load_profiles
from transport.errors import ConfigError

N = 20_000
STEP = 0.001  # the synthetic clock advances 1 ms per packet


def direction(params: LinkParams, *, seed: int = 1, device: str = "truck-042") -> LinkDirection:
    return LinkDirection(params, seed=seed, device=device, direction=Direction.UP)


def drive(
    d: LinkDirection, n: int = N, *, step: float = STEP, size: int = 1000
) -> list[tuple[float, Fate]]:
    """Offer ``n`` packets ``step`` seconds apart; returns (submit time, fate) pairs."""
    return [(i * step, d.submit(i * step, size)) for i in range(n)]


def loss_share(fates: list[tuple[float, Fate]]) -> float:
    return sum(f.drop_cause == "loss" for _, f in fates) / len(fates)


def delays(fates: list[tuple[float, Fate]]) -> list[float]:
    return [f.deliver_at[0] - t for t, f in fates if not f.dropped]


def reordered_share(fates: list[tuple[float, Fate]]) -> float:
    """Share of delivered packets arriving after one submitted later (RFC 4737 reordering)."""
    arrivals = sorted((f.deliver_at[0], seq) for seq, (_, f) in enumerate(fates) if not f.dropped)
    highest = -1
    late = 0
    for _, seq in arrivals:
        if seq < highest:
            late += 1
        highest = max(highest, seq)
    return late / len(arrivals)


def burst_lengths(fates: list[tuple[float, Fate]]) -> list[int]:
    bursts: list[int] = []
    run = 0
    for _, f in fates:
        if f.drop_cause == "loss":
            run += 1
        elif run:
            bursts.append(run)
            run = 0
    return bursts


# -- loss models ---------------------------------------------------------------------


def test_bernoulli_loss_is_ten_percent() -> None:
    fates = drive(direction(LinkParams(loss=LossParams.bernoulli(10))))
    assert loss_share(fates) == pytest.approx(0.10, abs=0.01)


def test_gilbert_elliott_burst_length_is_one_over_r_and_loss_is_p_over_p_plus_r() -> None:
    # netem `gemodel 2% 25% 100% 0%`: 1-h = 100% loss in bad, 1-k = 0% loss in good.
    p, r = 2.0, 25.0
    fates = drive(direction(LinkParams(loss=LossParams.gilbert_elliott(p, r, h=0, k=100))))
    bursts = burst_lengths(fates)
    assert statistics.mean(bursts) == pytest.approx(100 / r, rel=0.15)
    assert loss_share(fates) == pytest.approx(p / (p + r), abs=0.015)
    assert max(bursts) > 8  # bursty, unlike Bernoulli at the same mean


def test_gilbert_elliott_good_state_loss_applies() -> None:
    # k = 90: 10% loss in the good state, no bad state ever entered (p = 0).
    fates = drive(direction(LinkParams(loss=LossParams.gilbert_elliott(0, 50, h=0, k=90))))
    assert loss_share(fates) == pytest.approx(0.10, abs=0.01)


def _four_state_stationary_loss(loss: LossParams) -> float:
    m = {
        1: {3: loss.p13, 4: loss.p14, 1: 100 - loss.p13 - loss.p14},
        2: {3: loss.p23, 2: 100 - loss.p23},
        3: {1: loss.p31, 2: loss.p32, 3: 100 - loss.p31 - loss.p32},
        4: {1: 100.0},
    }
    pi = {1: 1.0, 2: 0.0, 3: 0.0, 4: 0.0}
    for _ in range(5000):
        nxt = dict.fromkeys(pi, 0.0)
        for s, row in m.items():
            for t, pct in row.items():
                nxt[t] += pi[s] * pct / 100
        pi = nxt
    return pi[3] + pi[4]


def test_four_state_markov_loss_matches_its_stationary_distribution() -> None:
    loss = LossParams.four_state(p13=1.0, p31=30.0, p32=10.0, p23=20.0, p14=2.0)
    fates = drive(direction(LinkParams(loss=loss)))
    expected = _four_state_stationary_loss(loss)
    assert 0.03 < expected < 0.15
    assert loss_share(fates) == pytest.approx(expected, rel=0.15)


# -- delay, jitter, reordering -------------------------------------------------------


@pytest.mark.parametrize("dist", ["uniform", "normal"])
def test_delay_median_matches_configured_delay_with_jitter(dist: str) -> None:
    params = LinkParams(
        delay_ms=150,
        jitter_ms=40,
        jitter_distribution=dist,  # type: ignore[arg-type]
        allow_reorder=True,
    )
    ds = delays(drive(direction(params)))
    assert statistics.median(ds) == pytest.approx(0.150, abs=0.002)
    assert min(ds) >= 0
    if dist == "uniform":
        assert 0.110 <= min(ds) < 0.112 and 0.188 < max(ds) <= 0.190


def test_in_order_delay_median_is_configured_when_packets_are_spaced_wider_than_jitter() -> None:
    params = LinkParams(delay_ms=150, jitter_ms=40)
    ds = delays(drive(direction(params), step=0.1))
    assert statistics.median(ds) == pytest.approx(0.150, abs=0.002)


def test_jitter_without_permission_never_reorders() -> None:
    fates = drive(direction(LinkParams(delay_ms=150, jitter_ms=40, duplicate_pct=5)))
    times = [t for _, f in fates for t in f.deliver_at]
    assert times == sorted(times)
    # The same jitter with permission does reorder, so the check above can fail.
    allowed = drive(direction(LinkParams(delay_ms=150, jitter_ms=40, allow_reorder=True)))
    assert reordered_share(allowed) > 0.3


def test_reorder_pct_reorders_about_that_share() -> None:
    params = LinkParams(delay_ms=50, jitter_ms=5, reorder_pct=5, reorder_gap_ms=10)
    fates = drive(direction(params))
    assert reordered_share(fates) == pytest.approx(0.05, abs=0.01)
    assert sum(f.reordered for _, f in fates) == pytest.approx(0.05 * N, rel=0.1)


def test_delay_correlation_links_consecutive_delays_and_keeps_the_range() -> None:
    params = LinkParams(delay_ms=100, jitter_ms=20, delay_correlation_pct=50, allow_reorder=True)
    ds = delays(drive(direction(params)))
    lag1 = statistics.correlation(ds[:-1], ds[1:])
    assert lag1 == pytest.approx(0.5, abs=0.05)
    assert min(ds) < 0.082 and max(ds) > 0.118  # still spans 100 +- 20 ms
    uncorrelated = delays(
        drive(direction(LinkParams(delay_ms=100, jitter_ms=20, allow_reorder=True)))
    )
    assert abs(statistics.correlation(uncorrelated[:-1], uncorrelated[1:])) < 0.05


# -- bandwidth, queue, mtu -----------------------------------------------------------


def test_rate_cap_delivers_configured_rate_and_queue_shows_bufferbloat() -> None:
    rate_kbit, limit = 384.0, 65536
    params = LinkParams(rate_kbit=rate_kbit, queue_limit_bytes=limit, delay_ms=150)
    d = direction(params)
    fates = drive(d, size=1200)  # 9.6 Mbit/s offered, 25x the cap
    passed = [(t, f) for t, f in fates if not f.dropped]
    first, last = passed[0][1].deliver_at[0], passed[-1][1].deliver_at[0]
    delivered_kbit = (len(passed) - 1) * 1200 * 8 / (last - first) / 1000
    assert delivered_kbit == pytest.approx(rate_kbit, rel=0.05)
    assert {f.drop_cause for _, f in fates if f.dropped} == {DropCause.QUEUE}
    # Queueing delay grows to what a full buffer takes to drain (bufferbloat).
    full_drain = limit * 8 / (rate_kbit * 1000)
    assert max(delays(passed)) == pytest.approx(0.150 + full_drain, rel=0.05)
    assert d.queue_bytes(N * STEP) > limit - 2400


def test_queue_limit_drops_with_cause_queue() -> None:
    d = direction(LinkParams(rate_kbit=100, queue_limit_bytes=5000))
    fates = [d.submit(0.0, 1000) for _ in range(8)]  # a burst at one instant
    assert [f.drop_cause for f in fates] == [None] * 5 + [DropCause.QUEUE] * 3
    assert d.queue_bytes(0.0) == pytest.approx(5000)
    assert d.queue_bytes(0.2) == pytest.approx(2500)  # 100 kbit/s drains 12.5 kB/s
    assert not d.submit(0.2, 1000).dropped  # room again once it drained
    assert d.stats().dropped_queue == 3


def test_mtu_drops_bigger_payloads_only() -> None:
    d = direction(LinkParams(mtu=1200))
    assert not d.submit(0.0, 1200).dropped
    assert d.submit(0.0, 1201).drop_cause == "mtu"
    assert d.stats().dropped_by_cause() == {"loss": 0, "queue": 0, "mtu": 1, "outage": 0}


# -- outages -------------------------------------------------------------------------


def test_scheduled_outage_drops_everything_in_its_window_and_nothing_outside() -> None:
    params = LinkParams(outage_every_s=5, outage_duration_s=1.5, outage_offset_s=2)
    fates = drive(direction(params))
    in_window = [t >= 2 and (t - 2) % 5 < 1.5 for t, _ in fates]
    assert any(in_window) and not all(in_window)
    for (t, fate), inside in zip(fates, in_window, strict=True):
        assert (fate.drop_cause == "outage") is inside, t


def test_forced_outage_takes_both_directions_down_for_its_duration() -> None:
    link = Link(LinkParams(), seed=3, device="truck-042")
    link.force_outage(10.0, 45.0)
    assert not link.in_outage(9.999)
    for t in (10.0, 30.0, 54.999):
        assert link.up.submit(t, 100).drop_cause == "outage"
        assert link.down.submit(t, 100).drop_cause == "outage"
    assert not link.up.submit(55.0, 100).dropped


# -- duplication and corruption ------------------------------------------------------


def test_duplicate_pct_delivers_that_share_twice() -> None:
    fates = drive(direction(LinkParams(duplicate_pct=10, delay_ms=20)))
    assert sum(f.duplicated for _, f in fates) / N == pytest.approx(0.10, abs=0.01)
    assert all(len(f.deliver_at) in (1, 2) for _, f in fates)


def test_corruption_flips_exactly_one_bit_of_a_copy() -> None:
    d = direction(LinkParams(corrupt_pct=100))
    payload = bytes(range(200))
    for i in range(200):
        fate = d.submit(i * STEP, len(payload))
        assert fate.corrupt_bit is not None and 0 <= fate.corrupt_bit < len(payload) * 8
        damaged = fate.apply(payload)
        diff = int.from_bytes(damaged, "big") ^ int.from_bytes(payload, "big")
        assert bin(diff).count("1") == 1
    assert payload == bytes(range(200))  # the original is untouched
    assert flip_bit(b"\x00", 0) == b"\x80"
    assert d.stats().corrupted == 200


# -- determinism ---------------------------------------------------------------------

_BUSY = LinkParams(
    loss=LossParams.gilbert_elliott(2.5, 25),
    delay_ms=150,
    jitter_ms=40,
    delay_correlation_pct=25,
    reorder_pct=2,
    reorder_gap_ms=20,
    duplicate_pct=1,
    corrupt_pct=1,
    rate_kbit=384,
    queue_limit_bytes=65536,
)


def test_same_seed_gives_identical_fates() -> None:
    a = drive(direction(_BUSY, seed=7), n=5000, step=0.02)
    b = drive(direction(_BUSY, seed=7), n=5000, step=0.02)
    assert a == b


def test_different_device_keys_directions_and_seeds_give_different_fates() -> None:
    base = drive(direction(_BUSY, seed=7, device="truck-042"), n=2000, step=0.02)
    other_device = drive(direction(_BUSY, seed=7, device="truck-043"), n=2000, step=0.02)
    other_seed = drive(direction(_BUSY, seed=8, device="truck-042"), n=2000, step=0.02)
    link = Link(_BUSY, seed=7, device="truck-042")
    down = [(i * 0.02, link.down.submit(i * 0.02, 1000)) for i in range(2000)]
    assert base != other_device and base != other_seed and base != down


@pytest.mark.parametrize(
    "params",
    [
        LinkParams(),
        LinkParams(delay_ms=5, mtu=500),
        LinkParams(delay_ms=50, jitter_ms=20),
        LinkParams(delay_ms=50, jitter_ms=20, jitter_distribution="normal"),
        LinkParams(delay_ms=5, jitter_ms=10, delay_correlation_pct=60, allow_reorder=True),
    ],
)
def test_delay_only_fast_path_gives_the_fates_of_every_stage_in_turn(params: LinkParams) -> None:
    fast, general = direction(params, seed=3), direction(params, seed=3)
    assert fast._plain
    general._plain = False  # the path every other profile takes
    for d in (fast, general):
        d.force_outage(1.0, 0.5)
    for i in range(4000):
        now, size = i * 0.0005 * (i % 3), 100 * (i % 8)  # bursts at one time; some > mtu
        assert fast.submit(now, size) == general.submit(now, size)
    assert fast.stats() == general.stats()
    assert fast.stats().dropped_outage > 0


def test_changing_jitter_does_not_change_which_packets_are_lost() -> None:
    loss = LossParams.bernoulli(10)
    calm = drive(direction(LinkParams(loss=loss)), n=5000)
    jumpy = drive(direction(LinkParams(loss=loss, jitter_ms=50, delay_ms=100)), n=5000)
    assert [f.dropped for _, f in calm] == [f.dropped for _, f in jumpy]


# -- runtime changes, NAT rebinding, decision log, counters ---------------------------


def test_set_params_keeps_queued_bytes_and_drains_them_at_the_new_rate() -> None:
    d = direction(LinkParams(rate_kbit=80, queue_limit_bytes=20000))
    for _ in range(10):
        d.submit(0.0, 1000)
    assert d.queue_bytes(0.0) == pytest.approx(10000)
    d.set_params(LinkParams(rate_kbit=160, queue_limit_bytes=20000), now=0.5)
    assert d.queue_bytes(0.5) == pytest.approx(10000 - 5000)  # 80 kbit/s for 0.5 s
    assert d.queue_bytes(0.75) == pytest.approx(0)  # 5000 bytes at 20 kB/s
    d.set_params(LinkParams(), now=1.0)
    assert d.queue_bytes(1.0) == 0


def test_port_epoch_advances_every_rebind_period_and_never_goes_back() -> None:
    link = Link(LinkParams(rebind_every_s=30), seed=1, device="truck-042")
    assert [link.current_port_epoch(t) for t in (0, 29.9, 30, 61)] == [0, 0, 1, 2]
    link.set_params(LinkParams(rebind_every_s=100), now=61)
    assert link.current_port_epoch(61) == 2
    assert link.current_port_epoch(160) == 2 and link.current_port_epoch(161) == 3
    assert link.rebind(170) == 4 and link.current_port_epoch(269) == 4
    link.set_params(LinkParams(), now=300)
    assert link.current_port_epoch(10_000) == 5


def test_decision_log_records_every_packet_with_seed_and_time() -> None:
    log: list[Decision] = []
    link = Link(
        LinkParams(loss=LossParams.bernoulli(50)), seed=99, device="gw-1", on_decision=log.append
    )
    fates = [link.up.submit(1.0 + i, 100) for i in range(3)] + [link.down.submit(9.0, 50)]
    assert [(d.direction, d.seq, d.now, d.size) for d in log] == [
        ("up", 0, 1.0, 100),
        ("up", 1, 2.0, 100),
        ("up", 2, 3.0, 100),
        ("down", 0, 9.0, 50),
    ]
    assert [d.fate for d in log] == fates
    assert {(d.seed, d.device) for d in log} == {(99, "gw-1")}


def test_stats_count_every_outcome() -> None:
    params = LinkParams(loss=LossParams.bernoulli(20), duplicate_pct=10, delay_ms=10, mtu=1000)
    d = direction(params)
    fates = [*drive(d, n=5000, size=1000), (6.0, d.submit(6.0, 1001))]
    s = d.stats()
    assert s.submitted_packets == 5001 and s.submitted_bytes == 5000 * 1000 + 1001
    assert s.passed_packets == sum(not f.dropped for _, f in fates)
    assert s.passed_bytes == s.passed_packets * 1000
    assert s.dropped_loss == sum(f.drop_cause == "loss" for _, f in fates) and s.dropped_mtu == 1
    assert s.dropped == s.submitted_packets - s.passed_packets
    assert s.duplicated == sum(f.duplicated for _, f in fates) > 0
    assert s.mean_delay_s == pytest.approx(0.010)


def test_down_rate_applies_to_hub_to_edge_only() -> None:
    link = Link(LinkParams(rate_kbit=8, down_rate_kbit=80), seed=1, device="truck-042")
    assert link.up.submit(0.0, 1000).deliver_at[0] == pytest.approx(1.0)
    assert link.down.submit(0.0, 1000).deliver_at[0] == pytest.approx(0.1)


def test_invalid_params_are_refused() -> None:
    with pytest.raises(ValueError, match=r"loss\.r"):
        direction(LinkParams(loss=LossParams(model="gemodel", p=5)))
    with pytest.raises(ValueError, match="loss_pct: belongs to loss model 'random'"):
        LinkParams(loss=LossParams(model="gemodel", p=1, r=10, loss_pct=3)).validate()
    with pytest.raises(ValueError, match="outage_duration_s"):
        LinkParams(outage_every_s=10, outage_duration_s=10).validate()


# -- profiles ------------------------------------------------------------------------

EXPECTED_PROFILES = {"lan", "lte", "3g-good", "3g-poor", "2g-edge", "satellite", "tunnel"}


def test_packaged_profiles_load_and_every_profile_validates() -> None:
    assert DEFAULT_PROFILES_PATH.is_file()
    profiles = load_profiles()
    assert set(profiles) >= EXPECTED_PROFILES
    for name, params in profiles.items():
        params.validate()
        link = Link(params, seed=1, device=name)
        assert drive(link.up, n=200, size=1000)


def test_3g_poor_and_tunnel_profiles_have_the_documented_figures() -> None:
    poor = get_profile("3g-poor")
    assert (poor.delay_ms, poor.jitter_ms, poor.rate_kbit) == (150, 40, 384)
    assert poor.loss.model == "gemodel"
    assert 0.08 <= poor.loss.p / (poor.loss.p + poor.loss.r) <= 0.10
    tunnel = get_profile("tunnel")
    assert (tunnel.outage_every_s, tunnel.outage_duration_s) == (300, 45)
    assert tunnel.loss == poor.loss and tunnel.rate_kbit == poor.rate_kbit


def test_unknown_key_in_a_profile_is_a_config_error_naming_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "links.yaml"
    path.write_text("profiles:\n  slow:\n    delay_ms: 100\n    jiter_ms: 5\n")
    with pytest.raises(ConfigError) as err:
        load_profiles(path)
    assert err.value.key == "profiles.slow.jiter_ms"
    assert err.value.path == str(path)
    assert "jiter_ms" in str(err.value)


def test_bad_profile_values_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "links.yaml"
    path.write_text("profiles:\n  bad:\n    loss: {model: random, loss_pct: 150}\n")
    with pytest.raises(ConfigError, match="loss_pct"):
        load_profiles(path)
    path.write_text("profiles:\n  bad:\n    loss: {model: random, p: 3}\n")
    with pytest.raises(ConfigError, match="belongs to loss model 'gemodel'"):
        load_profiles(path)
    path.write_text("profilez: {}\n")
    with pytest.raises(ConfigError, match="profilez"):
        load_profiles(path)


def test_get_profile_names_the_known_profiles_when_one_is_missing() -> None:
    with pytest.raises(ConfigError) as err:
        get_profile("5g-mmwave")
    assert err.value.key == "profiles.5g-mmwave"
    for name in EXPECTED_PROFILES:
        assert name in err.value.message

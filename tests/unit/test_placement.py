"""Rendezvous placement: even spread, minimal movement, stable everywhere; the edge follows it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from edge.backoff import BackoffConfig, Reconnector
from edge.config import load_edge_config
from edge.placement import home_hub, placement_order, weight
from transport.errors import ConfigError

HUBS4 = [f"10.0.0.{i}:4433" for i in range(1, 5)]
DEVICES = [f"truck-{i:05d}" for i in range(10_000)]
ROOT = Path(__file__).resolve().parents[2]


def test_ten_thousand_devices_spread_within_ten_percent_over_four_hubs() -> None:
    homes = Counter(home_hub(HUBS4, d) for d in DEVICES)
    assert set(homes) == set(HUBS4)
    even = len(DEVICES) / len(HUBS4)
    for hub, n in homes.items():
        assert abs(n - even) <= 0.10 * even, (hub, n)


def test_failover_order_spreads_a_dead_hubs_devices_over_the_others() -> None:
    dead = HUBS4[0]
    orphans = [d for d in DEVICES if home_hub(HUBS4, d) == dead]
    second = Counter(placement_order(HUBS4, d)[1] for d in orphans)
    assert set(second) == set(HUBS4[1:])  # not all onto one neighbour
    even = len(orphans) / 3
    assert all(abs(n - even) <= 0.15 * even for n in second.values()), second


def test_adding_a_fifth_hub_moves_at_most_a_quarter_and_only_onto_it() -> None:
    hubs5 = [*HUBS4, "10.0.0.5:4433"]
    before = {d: home_hub(HUBS4, d) for d in DEVICES}
    after = {d: home_hub(hubs5, d) for d in DEVICES}
    moved = [d for d in DEVICES if before[d] != after[d]]
    assert len(moved) <= 0.25 * len(DEVICES)
    assert len(moved) >= 0.15 * len(DEVICES)  # the new hub does get its share (~1/5)
    assert {after[d] for d in moved} == {"10.0.0.5:4433"}


def test_removing_a_hub_moves_only_its_devices() -> None:
    before = {d: home_hub(HUBS4, d) for d in DEVICES}
    after = {d: home_hub(HUBS4[1:], d) for d in DEVICES}
    moved = {d for d in DEVICES if before[d] != after[d]}
    assert moved == {d for d in DEVICES if before[d] == HUBS4[0]}


def test_order_ignores_input_order_and_duplicates() -> None:
    rng = random.Random(7)
    for device in DEVICES[:200]:
        shuffled = HUBS4[:]
        rng.shuffle(shuffled)
        assert placement_order(shuffled + shuffled[:1], device) == placement_order(HUBS4, device)


def test_known_answer_never_changes_across_releases_or_machines() -> None:
    assert weight("10.0.0.1:4433", "truck-00000") == 0x1C139D724C59B024
    assert placement_order(HUBS4, "truck-00000") == [
        "10.0.0.3:4433",
        "10.0.0.2:4433",
        "10.0.0.4:4433",
        "10.0.0.1:4433",
    ]


def test_order_is_the_same_in_another_process_with_another_hash_seed() -> None:
    sample = DEVICES[:50]
    here = [placement_order(HUBS4, d) for d in sample]
    code = (
        "import json, sys\n"
        "from edge.placement import placement_order\n"
        "hubs, devices = json.loads(sys.stdin.read())\n"
        "print(json.dumps([placement_order(hubs, d) for d in devices]))\n"
    )
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps([HUBS4, sample]),
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env=env,
            timeout=60,
        )
        assert json.loads(out.stdout) == here


def test_home_hub_needs_a_hub() -> None:
    with pytest.raises(ValueError):
        home_hub([], "truck-1")


# -- the edge follows the order ------------------------------------------------------------


def test_busy_and_draining_hubs_send_the_device_on_in_placement_order() -> None:
    order = placement_order(HUBS4, "truck-00042")
    r = Reconnector(order, random.Random(1), BackoffConfig(base_s=0.5, failover_after=3))
    assert r.current == r.home == order[0]
    at = r.on_failure(100.0, draining=True)  # home is draining: next hub, almost at once
    assert r.current == order[1] and 100.0 <= at <= 100.5
    at = r.on_failure(200.0, retry_after_s=5.0)  # busy: next hub, not before the hint
    assert r.current == order[2] and 205.0 <= at <= 210.0
    r.on_connected()
    assert r.current == order[2]  # stays where it got in


def test_draining_everywhere_falls_back_to_backoff_not_a_busy_loop() -> None:
    r = Reconnector(["a", "b"], random.Random(2), BackoffConfig(base_s=1.0, cap_s=60.0))
    waits = []
    now = 0.0
    for _ in range(8):
        at = r.on_failure(now, draining=True)
        waits.append(at - now)
        now = at
    assert all(w <= 1.0 for w in waits[:2])  # each hub tried once quickly
    assert max(waits[2:]) > 1.0  # then the backoff grows
    assert r.failovers == 8


def test_plain_failures_walk_the_order_and_wrap_to_home() -> None:
    r = Reconnector(["h", "b", "c"], random.Random(3), BackoffConfig(failover_after=1))
    seen = []
    for _ in range(4):
        r.on_failure(0.0)
        seen.append(r.current)
    assert seen == ["b", "c", "h", "b"]


def _edge_yaml(tmp_path: Path, **extra: object) -> Path:
    from transport import certs

    pki = tmp_path / "certs"
    if not (pki / "ca.key").exists():
        certs.init_dir(pki)
    cert, key = certs.issue_device(pki, "acme", "truck-00042")
    cfg = {"device": {"cert": str(cert), "key": str(key), "ca": str(pki / "ca.pem")}, **extra}
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_edge_config_orders_hubs_by_placement_unless_listed(tmp_path: Path) -> None:
    cfg = load_edge_config(_edge_yaml(tmp_path, hubs=HUBS4))
    assert cfg.placement == "rendezvous"
    assert cfg.hub_order("truck-00042") == placement_order(HUBS4, "truck-00042")
    listed = load_edge_config(_edge_yaml(tmp_path, hubs=HUBS4, placement="listed"))
    assert listed.hub_order("truck-00042") == HUBS4


def test_edge_config_single_hub_and_defaults_still_work(tmp_path: Path) -> None:
    one = load_edge_config(_edge_yaml(tmp_path, hubs=["127.0.0.1:5000"]))
    assert one.hub_order("truck-00042") == ["127.0.0.1:5000"]
    default = load_edge_config(_edge_yaml(tmp_path))
    assert default.hub_order("truck-00042") == ["127.0.0.1:4433"]


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"placement": "random"}, "placement"),
        ({"hubs": ["a:1", "a:1"]}, "(top level)"),
        ({"hubs": []}, "(top level)"),
    ],
)
def test_edge_config_rejects_bad_placement(tmp_path: Path, extra: object, key: str) -> None:
    assert isinstance(extra, dict)
    with pytest.raises(ConfigError) as info:
        load_edge_config(_edge_yaml(tmp_path, **extra))
    assert info.value.key == key

"""Kernel matching benchmark: subject matches/s against 100 to 100,000 subscriptions, and filters.

Run: ``.venv/bin/python bench/kernel_match.py`` (``--json`` for one JSON object).

The subject stream is what a fleet produces: 10,000 devices, a dozen message kinds
at realistic relative rates (GPS and speed every second, logs and alarms rarely), so
subject popularity is skewed the way it is in production. The cache is warmed with
a million subjects, then each timed pass matches a new draw of 200,000 subjects (new
``str`` objects whose hashes are not yet computed, as when decoded off the wire), so
rare subjects miss the cache as they would in steady state.

Subscriptions: a fixed handful of fleet-wide services (archiver ``acme.>``, auth
monitor ``*.*.log.auth``, map ``acme.*.telemetry.gps``, ...) plus per-device
subscriptions (dashboards, investigations) with mixed shapes: exact subjects,
``acme.truck-00042.>``, ``acme.truck-00042.telemetry.*``, ``acme.truck-00042.log.*``
and ``*.truck-00042.>``. Growing the count adds watchers of devices, not more copies
of the fleet-wide services, which is how a kernel's subscriptions grow.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub.filters import compile_filter
from hub.subjects import DEFAULT_CACHE_SIZE, SubjectTrie

TENANT = "acme"
DEVICES = 10_000
# kind -> messages per device per minute
KIND_RATES = {
    "telemetry.gps": 60.0,
    "telemetry.speed": 60.0,
    "telemetry.engine": 12.0,
    "telemetry.battery": 6.0,
    "telemetry.temp": 6.0,
    "log.app": 10.0,
    "log.kernel": 2.0,
    "log.auth": 1.0,
    "status.heartbeat": 2.0,
    "status.config": 0.1,
    "alarm.fault": 0.2,
    "alarm.door": 0.5,
}
KINDS = list(KIND_RATES)
LANES = {"alarm": "critical", "log": "bulk"}
FLEET_WIDE = [
    f"{TENANT}.>",
    "*.*.log.auth",
    f"{TENANT}.*.telemetry.gps",
    f"{TENANT}.*.alarm.>",
    f"{TENANT}.*.log.*",
    "*.*.status.heartbeat",
    f"{TENANT}.*.telemetry.battery",
    "*.*.alarm.fault",
]
SIZES = (100, 10_000, 100_000)
STREAM_LEN = 200_000  # subjects per timed pass; every pass is a new draw
WARMUP_LEN = 1_000_000  # subjects matched before timing with the cache on

FILTERS = [
    'attrs.severity <= 3 and device ~ "truck-*"',
    "body.speed_kmh > 90",
    'lane in ["critical", "telemetry"]',
    "exists attrs.msgid",
    "not (body.battery_pct >= 10)",
    'subject ~ "acme.*.log.auth"',
]


def device_name(index: int) -> str:
    """Device id as the fleet names them."""
    return f"truck-{index:05d}"


def make_stream(rng: random.Random, length: int) -> list[str]:
    """Subjects in the proportions a fleet publishes them."""
    weights = [KIND_RATES[k] for k in KINDS]
    kinds = rng.choices(KINDS, weights=weights, k=length)
    return [f"{TENANT}.{device_name(rng.randrange(DEVICES))}.{kind}" for kind in kinds]


def make_patterns(rng: random.Random, count: int) -> list[str]:
    """``count`` subscription patterns: fleet-wide services, then per-device watchers."""
    patterns = FLEET_WIDE[: min(count, len(FLEET_WIDE))]
    while len(patterns) < count:
        device = device_name(rng.randrange(DEVICES))
        r = rng.random()
        if r < 0.30:
            patterns.append(f"{TENANT}.{device}.{rng.choice(KINDS)}")
        elif r < 0.60:
            patterns.append(f"{TENANT}.{device}.>")
        elif r < 0.75:
            patterns.append(f"{TENANT}.{device}.telemetry.*")
        elif r < 0.90:
            patterns.append(f"{TENANT}.{device}.log.*")
        else:
            patterns.append(f"*.{device}.>")
    return patterns


def time_matches(trie: SubjectTrie[int], rng: random.Random, seconds: float) -> float:
    """Matches per second over new stream passes (never seen before) for about ``seconds``."""
    match = trie.match
    done = 0
    elapsed = 0.0
    while elapsed < seconds:
        batch = make_stream(rng, STREAM_LEN)
        gc.collect()
        start = time.perf_counter()
        for subject in batch:
            match(subject)
        elapsed += time.perf_counter() - start
        done += len(batch)
    return done / elapsed


def bench_size(count: int, warmup: list[str], seconds: float, seed: int) -> dict[str, float]:
    """Figures for one subscription count: warm cache, cold (disabled) cache, build rate."""
    patterns = make_patterns(random.Random(seed), count)
    results: dict[str, float] = {}
    for label, cache_size in (("warm", DEFAULT_CACHE_SIZE), ("cold", 0)):
        trie: SubjectTrie[int] = SubjectTrie(cache_size=cache_size)
        start = time.perf_counter()
        for value, pattern in enumerate(patterns):
            trie.add(pattern, value)
        build = time.perf_counter() - start
        if label == "warm":
            for subject in warmup:  # the hub has been running a while
                trie.match(subject)
            trie.hits = trie.misses = 0
        rate = time_matches(trie, random.Random(seed + 1), seconds)
        results[f"{label}_matches_per_s"] = rate
        if label == "warm":
            results["cache_hit_rate"] = trie.hits / max(1, trie.hits + trie.misses)
            results["adds_per_s"] = count / build
    sample = warmup[:20_000]
    trie = SubjectTrie(cache_size=0)
    for value, pattern in enumerate(patterns):
        trie.add(pattern, value)
    results["mean_values_per_match"] = sum(len(trie.match(s)) for s in sample) / len(sample)
    return results


def make_messages(rng: random.Random, stream: list[str]) -> list[dict[str, Any]]:
    """Message mappings as the kernel hands them to filters."""
    messages = []
    for seq, subject in enumerate(stream):
        _, device, family, _kind = subject.split(".")
        attrs: dict[str, Any] = {"severity": rng.randrange(8)}
        if rng.random() < 0.5:
            attrs["msgid"] = f"m-{seq}"
        body = {"speed_kmh": rng.uniform(0, 130), "battery_pct": rng.uniform(0, 100)}
        messages.append(
            {
                "subject": subject,
                "tenant": TENANT,
                "device": device,
                "lane": LANES.get(family, "telemetry"),
                "seq": seq,
                "ts": 1_700_000_000_000_000 + seq,
                "offset": seq,
                "attrs": attrs,
                "body": body,
            }
        )
    return messages


def bench_filters(stream: list[str], seconds: float, seed: int) -> dict[str, float]:
    """Evaluations per second of each design example, and compiles per second."""
    messages = make_messages(random.Random(seed), stream[:50_000])
    results: dict[str, float] = {}
    total_done = 0
    total_elapsed = 0.0
    for index, text in enumerate(FILTERS):
        matches: Callable[[Any], bool] = compile_filter(text).matches
        done = 0
        elapsed = 0.0
        while elapsed < seconds / len(FILTERS):
            start = time.perf_counter()
            for message in messages:
                matches(message)
            elapsed += time.perf_counter() - start
            done += len(messages)
        results[f"filter_{index}_evals_per_s"] = done / elapsed
        total_done += done
        total_elapsed += elapsed
    results["filter_evals_per_s"] = total_done / total_elapsed
    start = time.perf_counter()
    rounds = 200
    for _ in range(rounds):
        for text in FILTERS:
            compile_filter(text)
    results["filter_compiles_per_s"] = rounds * len(FILTERS) / (time.perf_counter() - start)
    return results


def machine() -> dict[str, Any]:
    """Where the figures were measured."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def main(argv: list[str] | None = None) -> int:
    """Run every measurement and print a table, or one JSON object with ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    stream = make_stream(random.Random(args.seed), WARMUP_LEN)
    out: dict[str, Any] = {"machine": machine()}
    for count in SIZES:
        figures = bench_size(count, stream, args.seconds, args.seed)
        out[f"matches_per_s_{count}"] = round(figures["warm_matches_per_s"])
        for key, value in figures.items():
            out[f"{key}_{count}"] = round(value, 3) if value < 100 else round(value)
    out["ratio_100000_to_100"] = round(out["matches_per_s_100000"] / out["matches_per_s_100"], 3)
    out["ratio_cold_100000_to_100"] = round(
        out["cold_matches_per_s_100000"] / out["cold_matches_per_s_100"], 3
    )
    out.update({k: round(v) for k, v in bench_filters(stream, args.seconds, args.seed).items()})

    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    m = out["machine"]
    print(f"machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, {m['python']}")
    print(f"stream: {STREAM_LEN:,} subjects from {DEVICES:,} devices x {len(KINDS)} kinds")
    print(f"{'subs':>8} {'warm/s':>11} {'hit rate':>9} {'cold/s':>11} {'values':>7} {'adds/s':>9}")
    for count in SIZES:
        print(
            f"{count:>8,} {out[f'matches_per_s_{count}']:>11,} "
            f"{out[f'cache_hit_rate_{count}']:>9.1%} {out[f'cold_matches_per_s_{count}']:>11,} "
            f"{out[f'mean_values_per_match_{count}']:>7.2f} {out[f'adds_per_s_{count}']:>9,}"
        )
    print(
        f"100,000/100 ratio: warm {out['ratio_100000_to_100']:.2f}, "
        f"cold {out['ratio_cold_100000_to_100']:.2f}"
    )
    for index, text in enumerate(FILTERS):
        print(f"filter {out[f'filter_{index}_evals_per_s']:>11,}/s  {text}")
    print(f"filter all  {out['filter_evals_per_s']:>11,}/s evaluations")
    print(f"filter compiles {out['filter_compiles_per_s']:>7,}/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

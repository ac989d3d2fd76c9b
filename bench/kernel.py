"""Kernel benchmark: subject matches/s at 100 to 100,000 subscriptions, routing, and fanout.

Run: ``.venv/bin/python bench/kernel.py`` (``--json`` for one JSON object, ``--quick``
for a short run). Everything runs in this process against ``hub.kernel.Kernel``; no
sockets (the WebSocket shell's cost is measured by nothing here).

- ``matches_per_s_N``: subjects matched per second against N subscriptions, through
  the kernel's own trie and match cache (``Kernel.candidates``). The subscriptions are
  kernel queues made as a fleet's users make them (bench/kernel_match.py: fleet-wide
  services plus per-device watchers, exact / ``*`` / ``>`` shapes), a third of them
  with a filter from the design's examples. The cache is warmed with a million
  subjects, then every timed pass is a new draw of 200,000 subjects from 10,000
  devices x 12 kinds at realistic relative rates.
- ``route_per_s_N``: whole ``Kernel.route`` passes over committed entries: trie,
  tenant check, filter evaluation of each candidate, and the enqueue (drop-oldest
  queues of 10 with nobody reading, so every enqueue also drops one: the dearest
  path). Its cost grows with how many subscriptions each message matches
  (``matched_per_message_N``), which more subscriptions make larger, not with N.
- ``fanout_per_s_K``: entries delivered per second when every entry goes to K
  queues with one subscriber each: ``route`` then every subscriber's ``take``.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from kernel_match import FILTERS, STREAM_LEN, WARMUP_LEN, make_patterns, make_stream

from hub.config import KernelSettings
from hub.kernel import Kernel, Policy, QueueSpec
from hub.log import LogEntry

SIZES = (100, 10_000, 100_000)
FANOUTS = (1, 10, 100)
FILTERED_SHARE = 3  # every third subscription has a filter
ROUTE_ENTRIES = 100_000
FANOUT_BATCH = 1_000  # entries per route() call, as a group commit hands them over
LANES = {"alarm": 0, "log": 2}  # critical, bulk; the rest telemetry (1)


def machine() -> dict[str, Any]:
    """Where the figures were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def make_entries(rng: random.Random, subjects: list[str], first_offset: int) -> list[LogEntry]:
    """Committed log entries for ``subjects``, with the fields the design's filters read."""
    out = []
    for i, subject in enumerate(subjects):
        tenant, device, family, _kind = subject.split(".")
        attrs: dict[str, Any] = {"severity": rng.randrange(8)}
        if rng.random() < 0.5:
            attrs["msgid"] = f"m-{i}"
        body = {"speed_kmh": rng.uniform(0, 130), "battery_pct": rng.uniform(0, 100)}
        offset = first_offset + i
        out.append(
            LogEntry(
                offset,
                tenant,
                device,
                1,
                LANES.get(family, 1),
                offset,
                offset,
                subject,
                attrs,
                body,
                0,
            )
        )
    return out


def build_kernel(count: int, seed: int) -> tuple[Kernel, float]:
    """A kernel holding ``count`` drop-oldest queues; returns it and queues made per second."""
    settings = KernelSettings(
        max_pending=10, max_queues=count, max_queues_per_tenant=count, max_subscribers=1
    )
    kernel = Kernel(settings, head=1)
    patterns = make_patterns(random.Random(seed), count)
    start = time.perf_counter()
    for i, pattern in enumerate(patterns):
        flt = FILTERS[i % len(FILTERS)] if i % FILTERED_SHARE == 0 else ""
        spec = QueueSpec(pattern, flt, queue=f"q{i}", policy=Policy.DROP_OLDEST)
        kernel.create(spec, 0.0)
    return kernel, count / (time.perf_counter() - start)


def time_matches(kernel: Kernel, rng: random.Random, seconds: float) -> float:
    """Subject matches per second over new stream passes for about ``seconds``."""
    candidates = kernel.candidates
    done = 0
    elapsed = 0.0
    while elapsed < seconds:
        batch = make_stream(rng, STREAM_LEN)
        gc.collect()
        start = time.perf_counter()
        for subject in batch:
            candidates(subject)
        elapsed += time.perf_counter() - start
        done += len(batch)
    return done / elapsed


def time_route(kernel: Kernel, rng: random.Random, seconds: float) -> tuple[float, float]:
    """Entries routed per second, and queues each entry was enqueued to on average."""
    done = 0
    matched = 0
    elapsed = 0.0
    while elapsed < seconds:
        entries = make_entries(rng, make_stream(rng, ROUTE_ENTRIES), kernel.head)
        before = kernel.counters.matches
        gc.collect()
        start = time.perf_counter()
        kernel.route(entries)
        elapsed += time.perf_counter() - start
        done += len(entries)
        matched += kernel.counters.matches - before
    return done / elapsed, matched / done


def bench_size(count: int, warmup: list[str], seconds: float, seed: int) -> dict[str, float]:
    """Figures for one subscription count."""
    kernel, creates_per_s = build_kernel(count, seed)
    for subject in warmup:  # the hub has been running a while
        kernel.candidates(subject)
    hits0, misses0 = kernel.match_cache()
    matches = time_matches(kernel, random.Random(seed + 1), seconds)
    hits, misses = kernel.match_cache()
    hit_rate = (hits - hits0) / max(1, hits - hits0 + misses - misses0)
    route, per_message = time_route(kernel, random.Random(seed + 2), seconds)
    return {
        "matches_per_s": matches,
        "cache_hit_rate": hit_rate,
        "route_per_s": route,
        "matched_per_message": per_message,
        "creates_per_s": creates_per_s,
    }


def bench_fanout(subscribers: int, seconds: float, seed: int) -> float:
    """Entries delivered per second with every entry going to ``subscribers`` queues."""
    settings = KernelSettings(max_pending=FANOUT_BATCH * 2, subscriber_window=FANOUT_BATCH * 2)
    kernel = Kernel(settings, head=1)
    sids = [
        kernel.subscribe(QueueSpec("acme.>", queue=f"fan{i}"), 0.0).subscriber
        for i in range(subscribers)
    ]
    rng = random.Random(seed)
    delivered = 0
    elapsed = 0.0
    while elapsed < seconds:
        entries = make_entries(rng, make_stream(rng, 20 * FANOUT_BATCH), kernel.head)
        gc.collect()
        start = time.perf_counter()
        for i in range(0, len(entries), FANOUT_BATCH):
            kernel.route(entries[i : i + FANOUT_BATCH])
            for sid in sids:
                delivered += len(kernel.take(sid, 2 * FANOUT_BATCH).entries)
        elapsed += time.perf_counter() - start
    if kernel.counters.dropped_overflow or kernel.counters.blocked:
        raise SystemExit("fanout bench: the kernel dropped or blocked; the figure would lie")
    return delivered / elapsed


def main(argv: list[str] | None = None) -> int:
    """Run every measurement; print a table, or one JSON object with ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--quick", action="store_true", help="0.3 s per figure, short warmup")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    seconds = 0.3 if args.quick else args.seconds

    warmup = make_stream(random.Random(args.seed), WARMUP_LEN // (10 if args.quick else 1))
    out: dict[str, Any] = {"machine": machine()}
    for count in SIZES:
        figures = bench_size(count, warmup, seconds, args.seed)
        for key, value in figures.items():
            out[f"{key}_{count}"] = round(value, 3) if value < 100 else round(value)
        gc.collect()
    out["ratio_100000_to_100"] = round(out["matches_per_s_100000"] / out["matches_per_s_100"], 3)
    for k in FANOUTS:
        out[f"fanout_per_s_{k}"] = round(bench_fanout(k, seconds, args.seed))

    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    m = out["machine"]
    print(f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['platform']}, {m['python']}")
    print(f"subjects: fresh draws of {STREAM_LEN:,} from 10,000 devices x 12 kinds")
    print(f"{'subs':>8} {'matches/s':>11} {'hit rate':>9} {'route/s':>9} {'per msg':>8}")
    for count in SIZES:
        print(
            f"{count:>8,} {out[f'matches_per_s_{count}']:>11,} "
            f"{out[f'cache_hit_rate_{count}']:>9.1%} {out[f'route_per_s_{count}']:>9,} "
            f"{out[f'matched_per_message_{count}']:>8.2f}"
        )
    print(f"100,000/100 match rate ratio: {out['ratio_100000_to_100']:.2f}")
    for k in FANOUTS:
        print(f"fanout to {k:>3} subscribers: {out[f'fanout_per_s_{k}']:>10,} delivered/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Virtual-time fleet benchmark: simulated seconds per wall second.

Run: ``.venv/bin/python bench/virtual.py`` (``--json`` for one JSON object).

100 vehicles at 1 GPS sample per second on ``3g-poor`` (plus the faults and log lines
the fleet adds), simulated by ``squall fleet --virtual`` for ``--duration`` seconds in
one process: the real edge and hub cores, aioquic without sockets, SQLite spools and
log on tmpfs.  ``virtual_speedup`` is simulated seconds per wall second of the run
(PKI setup excluded); ``virtual_speedup_cpu`` divides by the process's CPU time
instead, the figure a dedicated core gives on a machine shared with other work.
``--host-check`` times a fixed loop on both CPUs at once before and after the run
(``host_loop_s``): this VM's speed moves by a third and more from minute to minute, and a
run's figure means something only next to it.
``--profile`` adds where the CPU went, by package (cProfile, which itself slows the
run by about half).

The cost is per packet, not per record: at 1 record/s and the fleet's 1 s linger each
vehicle sends about one batch a second, and each batch costs a packet up, the hub's
ACK down and a QUIC ACK up again, through aioquic on both ends.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from _common import host_loop_s, machine, machine_line  # also puts the repo first on sys.path

from edge.config import SenderSettings
from simulator.vedge import EdgeSettings
from simulator.virtual import VirtualFleet, VirtualFleetConfig, work_directory

TARGET_SPEEDUP = 20.0


def _group(filename: str, name: str) -> str:
    """The package a profiled function belongs to."""
    if "aioquic" in filename:
        return "aioquic (QUIC, TLS, packet crypto)"
    for part in ("transport", "edge", "hub", "simulator"):
        if f"/{part}/" in filename:
            return f"{part}/{Path(filename).name}"
    if "sqlite3" in name:
        return "sqlite3"
    return "builtins and stdlib"


def _profile_table(prof: cProfile.Profile) -> list[tuple[str, float]]:
    stats: Any = pstats.Stats(prof).stats
    groups: dict[str, float] = defaultdict(float)
    for (filename, _line, name), (_cc, _nc, tottime, _ct, _callers) in stats.items():
        groups[_group(filename, name)] += tottime
    total = sum(groups.values()) or 1.0
    ranked = sorted(groups.items(), key=lambda kv: -kv[1])
    return [(g, round(100 * t / total, 1)) for g, t in ranked[:12]]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One measured virtual run; returns the figures."""
    cfg = VirtualFleetConfig(
        devices=args.devices,
        rate=args.rate,
        duration_s=args.duration,
        drain_s=args.drain,
        profile=args.link,
        seed=args.seed,
        processes=args.processes,
    )
    if args.linger_ms is not None:
        cfg.edge = EdgeSettings(sender=SenderSettings(linger_ms=args.linger_ms, heartbeat_s=5.0))
    host_before = host_loop_s() if args.host_check else None
    prof = cProfile.Profile(time.process_time) if args.profile else None
    with work_directory(None) as workdir:
        fleet = VirtualFleet(cfg, workdir)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if prof is not None:
            prof.enable()
        report = fleet.run()
        if prof is not None:
            prof.disable()
        wall = time.perf_counter() - wall0
        # every process's CPU: rank 0's since the start, the workers' whole lives
        cpu = report["cpu_s_by_process"][0] - cpu0 + sum(report["cpu_s_by_process"][1:])
    simulated = report["simulated_s"]
    packets = report["link"]["up"]["packets"] + report["link"]["down"]["packets"]
    out: dict[str, Any] = {
        "virtual_speedup": round(simulated / wall, 1),
        "virtual_speedup_cpu": round(simulated / cpu, 1),
        "target": TARGET_SPEEDUP,
        "devices": cfg.devices,
        "rate_per_device": cfg.rate,
        "profile": cfg.profile,
        "processes": report["processes"],
        "cpu_s_by_process": report["cpu_s_by_process"],
        "linger_ms": cfg.edge.sender.linger_ms,
        "simulated_s": simulated,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "records": report["delivered"],
        "packets": packets,
        "packets_per_record": round(packets / max(report["delivered"], 1), 2),
        "cpu_us_per_packet": round(cpu * 1e6 / max(packets, 1), 1),
        "events": report["events"],
        "lost": report["lost"],
        "duplicates": report["duplicates"],
        "machine": machine(),
    }
    if host_before is not None:
        out["host_loop_s"] = {"before": host_before, "after": host_loop_s()}
    if prof is not None:
        out["cpu_by_package_pct"] = dict(_profile_table(prof))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--rate", type=float, default=1.0, help="GPS samples/s per vehicle")
    ap.add_argument("--duration", type=float, default=600.0, help="simulated seconds")
    ap.add_argument("--drain", type=float, default=300.0)
    ap.add_argument("--link", default="3g-poor", help="link profile")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--processes",
        type=int,
        default=2,
        help="processes to split the run over (default 2, this machine's cores; 1: serial)",
    )
    ap.add_argument("--linger-ms", type=int, help="sender linger (default: the fleet's 1000)")
    ap.add_argument("--profile", action="store_true", help="CPU by package (cProfile)")
    ap.add_argument(
        "--host-check",
        action="store_true",
        help="time a fixed loop on every CPU at once before and after the run (the host's speed)",
    )
    args = ap.parse_args()
    r = run(args)
    if args.json:
        print(json.dumps(r))
        return 0
    print(machine_line(r["machine"]))
    print(
        f"virtual fleet: {r['devices']} vehicles x {r['rate_per_device']} records/s on "
        f"{r['profile']} (linger {r['linger_ms']} ms), {r['simulated_s']:.0f} simulated s"
    )
    print(f"  wall {r['wall_s']} s, CPU {r['cpu_s']} s; {r['events']} events")
    print(
        f"  {r['records']} records, {r['packets']} packets ({r['packets_per_record']}/record), "
        f"{r['cpu_us_per_packet']} us CPU per packet; lost {r['lost']}, dup {r['duplicates']}"
    )
    verdict = "meets" if r["virtual_speedup"] >= TARGET_SPEEDUP else "misses"
    print(
        f"  virtual_speedup {r['virtual_speedup']}x wall, {r['virtual_speedup_cpu']}x CPU "
        f"({verdict} the {TARGET_SPEEDUP:.0f}x target)"
    )
    if "host_loop_s" in r:
        h = r["host_loop_s"]
        print(f"  host loop (s per CPU, all at once): before {h['before']}, after {h['after']}")
    for group, pct in r.get("cpu_by_package_pct", {}).items():
        print(f"    {pct:5.1f}%  {group}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

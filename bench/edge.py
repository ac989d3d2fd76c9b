"""Edge agent benchmark: RSS and CPU of one agent at 100 records/s, and accepts/s with group commit.

Run: ``.venv/bin/python bench/edge.py [--duration 60 | --quick] [--json]``.

**One agent at 100 records/s** (``rss_mb_at_100``, ``cpu_pct_at_100``): a hub
(``python -m transport.cli hub``, pinned to CPU 0, real SQLite log in a temp dir) and
one simulated vehicle (``python -m simulator.vehicle --rate 100``, pinned to the other
CPU): an edge agent with the shipped defaults (``durability: batch``, 20 ms group
commit, 100-record batches, 50 ms linger, 10 s heartbeats) publishing a drive's GPS
fixes (~200 bytes as JSON; ~5% auth-log lines and a few faults mixed in) over loopback
QUIC.  Its VmRSS is sampled from /proc every 0.5 s (max, end, and the kernel's VmHWM);
CPU is utime+stime over the steady window (after a warm-up, before the drive ends) as
a percentage of one core.  The hub's commit count is checked against what the agent
published.

**Accepts/s with group commit** (``accept_per_s_batch``): in this process, an Agent
whose hub is *unreachable* (a closed UDP port: the agent is started and keeps
retrying, so nothing is sent) is fed ``publish_nowait`` in a tight loop that yields to
the event loop every 256 records so the 20 ms group-commit timer runs.  The figure is
records covered by completed group commits (accepted in the DESIGN sense) per second
over ~5 s.  ``accept_per_s_batch_sending`` repeats it with the hub reachable, so the
same event loop also batches, compresses and sends what it accepts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BenchError,
    Child,
    Hub,
    cpu_busy_seconds,
    cpu_seconds,
    cpu_split,
    machine,
    machine_line,
    make_pki,
    pin,
    print_json,
    status_kb,
    watchdog,
    write_edge_config,
    write_hub_config,
)

from edge.agent import Agent
from edge.config import load_edge_config
from simulator.telemetry import Drive

TARGET_RSS_MB = 60
TARGET_CPU_PCT = 5.0
TARGET_ACCEPT = 20_000
SAMPLE_S = 0.5
YIELD_EVERY = 256


# --- one agent at a steady rate ---------------------------------------------------------


def run_vehicle(
    hub: Hub,
    tmp: Path,
    pki: Path,
    cpus: set[int],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Run one simulated vehicle against ``hub``; sample its RSS and CPU from /proc."""
    hubs = [f"127.0.0.1:{hub.files.udp_port}"]
    edge_cfg = write_edge_config(tmp, pki, "truck-001", hubs, **overrides(args.set))
    rate, duration = args.rate, args.duration
    before = hub.metrics().get("squall_hub_records_committed_total", 0.0)
    argv = [sys.executable, "-m", "simulator.vehicle", "--config", str(edge_cfg)]
    argv += ["--rate", str(rate), "--duration", str(duration), "--drain", "10"]
    vehicle = Child("vehicle", argv, cpus, tmp)
    try:
        started = time.monotonic()
        warmup = min(10.0, duration / 4)
        window_end = started + duration - 1.0
        rss: list[int] = []
        hwm = 0
        cpu0 = t0 = cpu1 = t1 = None
        busy0 = busy1 = 0.0
        while vehicle.alive() and time.monotonic() < window_end:
            now = time.monotonic()
            with contextlib.suppress(OSError):
                rss.append(status_kb(vehicle.pid, "VmRSS"))
                hwm = status_kb(vehicle.pid, "VmHWM")
                if cpu0 is None and now - started >= warmup:
                    cpu0, t0, busy0 = cpu_seconds(vehicle.pid), now, cpu_busy_seconds(cpus)
                if cpu0 is not None:
                    cpu1, t1, busy1 = cpu_seconds(vehicle.pid), now, cpu_busy_seconds(cpus)
            time.sleep(SAMPLE_S)
        vehicle.check_alive()
        line = vehicle.readline(timeout=30)  # "vehicle acme.truck-001: last_seq=N" at the end
        rc = vehicle.proc.wait(timeout=30)
        if rc != 0 or "last_seq=" not in line:
            raise BenchError(f"vehicle exited {rc}: {line.strip()!r}{vehicle.tail()}")
        published = int(line.rsplit("=", 1)[1])
    finally:
        vehicle.stop()
    committed = hub.metrics().get("squall_hub_records_committed_total", 0.0) - before
    if cpu0 is None or cpu1 is None or t0 is None or t1 is None or t1 - t0 < 1.0 or not rss:
        raise BenchError("vehicle: too short a run to measure (use --duration >= 8)")
    return {
        "rss_mb_max": max(rss) / 1024,
        "rss_mb_end": rss[-1] / 1024,
        "rss_mb_hwm": hwm / 1024,
        "cpu_pct": (cpu1 - cpu0) / (t1 - t0) * 100,
        "window_s": t1 - t0,
        "other_load": max(0.0, (busy1 - busy0) - (cpu1 - cpu0)) / (t1 - t0) if cpus else None,
        "published": published,
        "committed": int(committed),
    }


# --- accepts per second ------------------------------------------------------------------


async def accept_rate(config: Path, seconds: float, connect: bool) -> dict[str, Any]:
    """publish_nowait in a tight loop for ``seconds``; records accepted (group-committed)/s."""
    agent = Agent(load_edge_config(config), seed=1)
    drive = Drive(random.Random(7))
    bodies = [drive.step() for _ in range(1000)]
    attrs = {"unit": "si"}
    agent.start()
    try:
        if connect:
            await asyncio.wait_for(agent.connected.wait(), 15)
        spool = agent.spool
        base = spool.committed_seq
        i = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end:
            for _ in range(YIELD_EVERY):
                agent.publish_nowait("telemetry.gps", bodies[i % 1000], attrs)
                i += 1
            await asyncio.sleep(0)
        await agent.publish("telemetry.gps", bodies[0], attrs)  # waits for the group commit
        elapsed = time.perf_counter() - t0
        accepted = spool.committed_seq - base
        acked = agent.stats.acked
    finally:
        await agent.stop()
    return {"per_s": accepted / elapsed, "accepted": accepted, "seconds": elapsed, "acked": acked}


def overrides(settings: list[str]) -> dict[str, Any]:
    """``section.key=value`` flags as nested edge-config overrides (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in settings:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise BenchError(f"--set {item!r}: expected section.key=value")
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


# --- the run -----------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict[str, Any]:
    hub_cpus, edge_cpus = cpu_split()
    tmp = Path(tempfile.mkdtemp(prefix="squall-bench-edge-"))
    out: dict[str, Any] = {"machine": machine()}
    hub: Hub | None = None
    try:
        pki = make_pki(tmp / "certs")
        files = write_hub_config(tmp, pki)
        hub = Hub(files, hub_cpus, tmp)
        hub.wait_ready()
        v = run_vehicle(hub, tmp, pki, edge_cpus, args)
        if v["committed"] != v["published"]:
            raise BenchError(f"hub committed {v['committed']} of {v['published']} records")
        out["rss_mb_at_100"] = round(v["rss_mb_max"], 1)
        out["rss_mb_at_100_end"] = round(v["rss_mb_end"], 1)
        out["rss_mb_at_100_hwm"] = round(v["rss_mb_hwm"], 1)
        out["cpu_pct_at_100"] = round(v["cpu_pct"], 2)
        out["steady_window_s"] = round(v["window_s"], 1)
        out["agent_cpu_other_load"] = None if v["other_load"] is None else round(v["other_load"], 3)
        out["records_published"] = v["published"]
        out["records_committed_by_hub"] = v["committed"]
        out["edge_config_overrides"] = args.set

        pin(edge_cpus)  # the in-process agent gets the edge CPU to itself
        closed = write_edge_config(tmp, pki, "accept-offline", ["127.0.0.1:9"])
        r = asyncio.run(accept_rate(closed, args.accept_seconds, connect=False))
        out["accept_per_s_batch"] = round(r["per_s"])
        out["accept_hub"] = "unreachable"
        online = write_edge_config(tmp, pki, "accept-online", [f"127.0.0.1:{files.udp_port}"])
        r2 = asyncio.run(accept_rate(online, args.accept_seconds, connect=True))
        out["accept_per_s_batch_sending"] = round(r2["per_s"])
        out["accept_sending_acked"] = r2["acked"]
        hub.stop_clean()
        hub = None
    finally:
        if hub is not None:
            hub.stop()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def report(out: dict[str, Any], args: argparse.Namespace) -> None:
    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    print(machine_line(out["machine"]))
    print(
        f"one agent (python -m simulator.vehicle) at {args.rate:g} records/s for "
        f"{args.duration:g} s, hub on CPU 0, agent on the other"
        + (f", edge config {' '.join(args.set)}:" if args.set else ", shipped edge defaults:")
    )
    rss, cpu = out["rss_mb_at_100"], out["cpu_pct_at_100"]
    print(
        f"  RSS max {rss} MB (end {out['rss_mb_at_100_end']} MB, VmHWM "
        f"{out['rss_mb_at_100_hwm']} MB)   target <= {TARGET_RSS_MB} MB: "
        f"{mark(rss <= TARGET_RSS_MB)}"
    )
    print(
        f"  CPU {cpu}% of one core over {out['steady_window_s']} s steady   "
        f"target <= {TARGET_CPU_PCT:g}%: {mark(cpu <= TARGET_CPU_PCT)}"
    )
    other = out["agent_cpu_other_load"]
    if other is not None and other > 0.05:
        print(f"  note: other processes kept the agent's CPU {other:.0%} busy in the window")
    print(
        f"  published {out['records_published']:,} records, hub committed "
        f"{out['records_committed_by_hub']:,}"
    )
    acc = out["accept_per_s_batch"]
    print(
        f"accepted records/s, durability batch (20 ms group commit), in-process, ~"
        f"{args.accept_seconds:g} s:"
    )
    print(
        f"  hub unreachable: {acc:,}/s   target >= {TARGET_ACCEPT:,}: {mark(acc >= TARGET_ACCEPT)}"
    )
    print(
        f"  hub reachable (same loop also sends): {out['accept_per_s_batch_sending']:,}/s "
        f"({out['accept_sending_acked']:,} acked by the hub meanwhile)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0, help="steady-rate run, s (60)")
    ap.add_argument("--quick", action="store_true", help="a 15 s steady-rate run")
    ap.add_argument("--rate", type=float, default=100.0, help="records/s of the agent (100)")
    ap.add_argument("--accept-seconds", type=float, default=5.0, help="accept loop, s (5)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="edge config override for the vehicle, e.g. sender.linger_ms=1000 (repeatable)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()
    if args.quick:
        args.duration = 15.0
    bound = args.duration + 2 * args.accept_seconds + 120
    try:
        with watchdog(bound):
            out = bench(args)
    except BenchError as exc:
        print(f"bench/edge.py: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print_json(out)
    else:
        report(out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

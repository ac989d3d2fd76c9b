"""Fleet benchmark on real sockets: the largest fleet one machine simulates while the hub keeps
up, and the largest loss-free end-to-end records/s of a fleet.

Run: ``.venv/bin/python bench/fleet.py [--quick] [--json] [--only max|rate]``.

Every part is its own process, as in a deployment, all on this machine's cores together:
the hub (``squall hub``: SQLite log, ``durability: batch`` edges), one ``squall link`` proxy
(one upstream socket per vehicle, so every vehicle has its own link state) and vehicle
processes (``python -m simulator.vehicle``: many real edge agents per process, each with
its own on-disk spool, QUIC connection and device certificate, publishing GPS telemetry
with the occasional fault and log line), at niceness 5 (``--vehicle-nice``): the load
yields the CPU to the hub and the proxy, as it would by living elsewhere.

**Largest fleet** (``max_fleet_real``): vehicles at 1 record/s on ``lan``; the fleet size
doubles from ``--start`` until a size fails, then halves the gap a few times.  A size
*keeps up* when (1) the hub committed at least 95% of the offered rate over the steady
middle of the run (from its /metrics), (2) every vehicle drained its spool within the drain
time after publishing stopped, and (3) every accepted record is in the hub's log exactly
once.  The figure is the largest size that kept up.

**Records/s** (``fleet_records_per_s``): vehicles at 10 records/s over ``3g-good``; fleet
sizes rise the same way; the figure is the offered records/s of the largest loss-free
size that kept up (same three conditions; the hub's committed rate over the window, if
lower -- it can be higher while a backlog drains).

The result's exactness check reads the hub's log file directly (``batches`` rows: each
(device, incarnation, seq) is counted once; the hub's dedup guarantees that, this checks it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from _common import (
    REPO,
    BenchError,
    Child,
    Hub,
    HubFiles,
    cpu_seconds,
    free_port,
    machine,
    machine_line,
    make_pki,
    print_json,
    raise_fd_limit,
    watchdog,
    write_edge_config,
    write_hub_config,
)

ALL_CPUS = {0, 1}
VEHICLES_PER_PROCESS = 250
# The vehicles' spools live on tmpfs: each spool checkpoints (two fsyncs) once a second,
# on its vehicle's own storage in the field, but here 250 vehicles share one event loop
# and one disk, and those syncs would measure this machine's disk, not Squall.
DEFAULT_SPOOL_DIR = "/dev/shm" if Path("/dev/shm").is_dir() else ""
# The vehicle processes are the load, not the system under test, and there are seven of
# them at 1,750 vehicles against one hub and one proxy: the kernel's fair scheduler gave
# the hub one share in nine, so while the fleet started and connected, the hub got ~38%
# of a core, its socket queue filled and dropped, and the handshakes crawled (35-45/s).
# In a deployment the vehicles are elsewhere.  Niceness cannot make a size pass that the
# hub cannot take: it keeps up only by committing 95% of the nominal offered rate.
VEHICLE_NICE = 5


@dataclass(slots=True)
class Trial:
    """One fleet size's run."""

    devices: int
    rate: float
    profile: str
    offered_per_s: float
    committed_per_s: float
    accepted: int
    delivered: int
    undelivered: int  # accepted but not in the hub's log when the vehicles stopped (still spooled)
    duplicates: int
    drained: bool
    hub_cpu_s: float
    wall_s: float

    @property
    def kept_up(self) -> bool:
        """The three conditions of the module docstring."""
        return (
            self.drained
            and self.undelivered == 0
            and self.duplicates == 0
            and self.committed_per_s >= 0.95 * self.offered_per_s
        )


def _log_counts(db: Path) -> tuple[dict[str, int], int]:
    """Unique seqs per device in the hub log (incarnations apart) and extra copies.

    Reads every record back (a lane's batch holds that lane's seqs, which are not
    contiguous when a device uses several lanes, so batch rows alone cannot tell).
    """
    from hub.log import Log

    seen: dict[tuple[str, int], set[int]] = defaultdict(set)
    copies = 0
    log = Log(str(db))
    try:
        offset = log.first_offset()
        while entries := log.read(offset, 50_000):
            for e in entries:
                if e.incarnation == 0:  # the hub's own records (presence)
                    continue
                s = seen[(e.device, e.incarnation)]
                if e.seq in s:
                    copies += 1
                s.add(e.seq)
            offset = entries[-1].offset + 1
    finally:
        log.close()
    per_device: dict[str, int] = defaultdict(int)
    for (device, _), seqs in seen.items():
        per_device[device] += len(seqs)
    return per_device, copies


def _committed(hub: Hub) -> float:
    return hub.metrics().get("squall_hub_records_committed_total", 0.0)


def fleet_hub_config(work: Path, pki: Path, devices: int) -> HubFiles:
    """The fleet's hub.yaml: room for every vehicle.  max_handshakes stays at its default
    (200): a fleet connecting at once gets "busy; retry-after" answers and spreads out,
    as it would against a real hub."""
    return write_hub_config(
        work,
        pki,
        server={"max_connections": devices + 100},
        presence={"max_devices": devices + 100},
    )


def vehicle_configs(work: Path, pki: Path, spools: Path, devices: int, hub: str) -> list[Path]:
    """One edge.yaml per vehicle (``v00000``...), its spool under ``spools``: the fleet's
    1 s linger, 15 s heartbeats and a short reconnect backoff, sending to ``hub``."""
    return [
        write_edge_config(
            work,
            pki,
            f"v{i:05d}",
            [hub],
            spool={"path": str(spools / f"v{i:05d}.spool.db")},
            sender={"linger_ms": 1000, "heartbeat_s": 15},
            backoff={"base_s": 0.5, "cap_s": 5},
        )
        for i in range(devices)
    ]


def run_trial(
    devices: int,
    rate: float,
    profile: str,
    duration: float,
    drain: float,
    work: Path,
    spools: Path,
    vehicle_nice: int = VEHICLE_NICE,
) -> Trial:
    """Run one fleet of ``devices`` vehicles; every process is stopped before returning."""
    logs = work / "logs"
    logs.mkdir(parents=True)
    pki = make_pki(work / "pki")
    files = fleet_hub_config(work, pki, devices)
    link_port = free_port()
    children: list[Child] = []
    try:
        hub = Hub(files, ALL_CPUS, logs)
        children.append(hub)
        hub.wait_ready()
        link = Child(
            "link",
            [
                sys.executable,
                "-m",
                "transport.cli",
                "link",
                "--listen",
                f"127.0.0.1:{link_port}",
                "--upstream",
                f"127.0.0.1:{files.udp_port}",
                "--profile",
                profile,
                "--seed",
                "7",
                # every reconnect is a new client of the proxy (a new source port) until
                # it has been idle client_idle_s: room for a few per vehicle
                "--max-clients",
                str(4 * devices + 100),
            ],
            ALL_CPUS,
            logs,
        )
        children.append(link)
        link.readline(30)
        configs = vehicle_configs(work, pki, spools, devices, f"127.0.0.1:{link_port}")
        vehicles = []
        for k in range(0, devices, VEHICLES_PER_PROCESS):
            chunk = [str(c) for c in configs[k : k + VEHICLES_PER_PROCESS]]
            argv = [sys.executable, "-m", "simulator.vehicle", "--config", *chunk]
            argv += ["--rate", str(rate), "--duration", str(duration)]
            argv += ["--drain", str(drain), "--seed", str(k + 1)]
            vehicles.append(Child(f"vehicles-{k}", argv, ALL_CPUS, logs, nice=vehicle_nice))
        children.extend(vehicles)
        t0 = time.monotonic()
        hub_cpu0 = cpu_seconds(hub.pid)
        # the steady window: the middle half of the publishing time
        time.sleep(duration * 0.25)
        c0, w0 = _committed(hub), time.monotonic()
        time.sleep(duration * 0.5)
        c1, w1 = _committed(hub), time.monotonic()
        accepted: dict[str, int] = {}
        deadline = t0 + duration + drain + 60
        for v in vehicles:
            try:
                v.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise BenchError(f"{v.name} did not finish{v.tail()}") from exc
            assert v.proc.stdout is not None
            for line in v.proc.stdout.read().splitlines():
                # "vehicle acme.v00001: last_seq=123"
                if line.startswith("vehicle "):
                    device = line.split()[1].rstrip(":").split(".")[-1]
                    accepted[device] = int(line.rsplit("=", 1)[-1])
        wall = time.monotonic() - t0
        drained = wall <= duration + drain + 5
        # give the hub a moment to commit the last groups, then count
        time.sleep(1.0)
        hub_cpu = cpu_seconds(hub.pid) - hub_cpu0
        hub.stop_clean()
        per_device, copies = _log_counts(files.config.parent / "hub.db")
        undelivered = sum(max(0, last - per_device.get(dev, 0)) for dev, last in accepted.items())
        return Trial(
            devices=devices,
            rate=rate,
            profile=profile,
            offered_per_s=round(devices * rate, 1),
            committed_per_s=round((c1 - c0) / (w1 - w0), 1),
            accepted=sum(accepted.values()),
            delivered=sum(per_device.values()),
            undelivered=undelivered,
            duplicates=copies,
            drained=drained and len(accepted) == devices,
            hub_cpu_s=round(hub_cpu, 2),
            wall_s=round(wall, 1),
        )
    finally:
        for child in reversed(children):
            child.stop()


def search(
    rate: float,
    profile: str,
    start: int,
    cap: int,
    duration: float,
    drain: float,
    quiet: bool,
    spool_dir: str | None,
    vehicle_nice: int = VEHICLE_NICE,
) -> tuple[Trial | None, list[Trial]]:
    """Double the fleet until it fails (or reaches ``cap``), then bisect twice."""
    trials: list[Trial] = []
    best: Trial | None = None
    low, high = 0, 0
    n = start

    def attempt(size: int) -> Trial:
        with (
            TemporaryDirectory(prefix="squall-fleet-") as tmp,
            TemporaryDirectory(prefix="squall-fleet-spools-", dir=spool_dir) as spools,
        ):
            t = run_trial(
                size, rate, profile, duration, drain, Path(tmp), Path(spools), vehicle_nice
            )
        trials.append(t)
        if not quiet:
            verdict = "kept up" if t.kept_up else "did NOT keep up"
            print(
                f"  {size:5d} vehicles x {rate:g}/s on {profile}: offered {t.offered_per_s:8.0f}/s,"
                f" committed {t.committed_per_s:8.0f}/s, undelivered {t.undelivered},"
                f" dup {t.duplicates},"
                f" drained {t.drained}, hub CPU {t.hub_cpu_s:.0f} s -> {verdict}",
                flush=True,
            )
        return t

    while n <= cap:
        t = attempt(n)
        if not t.kept_up:
            high = n
            break
        best, low = t, n
        n *= 2
    if high:
        for _ in range(2):
            mid = (low + high) // 2
            if mid <= low or mid >= high:
                break
            t = attempt(mid)
            if t.kept_up:
                best, low = t, mid
            else:
                high = mid
    return best, trials


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Both searches; the figures and every trial."""
    raise_fd_limit()
    out: dict[str, Any] = {"machine": machine()}
    if args.only in ("", "max"):
        best, trials = search(
            1.0,
            "lan",
            args.start_max,
            args.cap_max,
            args.duration,
            args.drain,
            args.json,
            args.spool_dir or None,
            args.vehicle_nice,
        )
        out["max_fleet_real"] = best.devices if best else 0
        out["max_fleet_trials"] = [asdict(t) for t in trials]
    if args.only in ("", "rate"):
        best, trials = search(
            10.0,
            "3g-good",
            args.start_rate,
            args.cap_rate,
            args.duration,
            args.drain,
            args.json,
            args.spool_dir or None,
            args.vehicle_nice,
        )
        # what the fleet sustained: its offered rate, all of it delivered (the window's
        # committed rate can be higher while a backlog from the connection storm drains)
        out["fleet_records_per_s"] = min(best.committed_per_s, best.offered_per_s) if best else 0.0
        out["fleet_rate_devices"] = best.devices if best else 0
        out["fleet_rate_trials"] = [asdict(t) for t in trials]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=40.0, help="publishing time per trial, s")
    ap.add_argument("--drain", type=float, default=30.0, help="max s to empty spools after")
    ap.add_argument("--start-max", type=int, default=500, help="first fleet size at 1 record/s")
    ap.add_argument("--cap-max", type=int, default=8000)
    ap.add_argument("--start-rate", type=int, default=250, help="first fleet size at 10/s")
    ap.add_argument("--cap-rate", type=int, default=4000)
    ap.add_argument("--only", choices=["", "max", "rate"], default="")
    ap.add_argument(
        "--spool-dir",
        default=DEFAULT_SPOOL_DIR,
        help="where the vehicles' spools live (default: tmpfs, /dev/shm; '' for the temp dir)",
    )
    ap.add_argument(
        "--vehicle-nice",
        type=int,
        default=VEHICLE_NICE,
        help=f"niceness of the vehicle processes (default {VEHICLE_NICE}: the load yields to the "
        "hub and the proxy; 0: all equal)",
    )
    ap.add_argument("--quick", action="store_true", help="short trials, small caps (a smoke run)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.drain = 12.0, 20.0
        args.start_max, args.cap_max, args.start_rate, args.cap_rate = 50, 100, 20, 40
    if not args.json:
        print(machine_line(machine()))
    try:
        with watchdog(3600 * 3):
            out = bench(args)
    except BenchError as exc:
        print(f"bench/fleet.py: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print_json({k: v for k, v in out.items() if not k.endswith("_trials")} | out)
    else:
        print(f"max_fleet_real       {out.get('max_fleet_real', '-')} vehicles at 1 record/s")
        print(
            f"fleet_records_per_s  {out.get('fleet_records_per_s', '-')} records/s "
            f"({out.get('fleet_rate_devices', '-')} vehicles x 10/s on 3g-good)"
        )
        print(f"(rerun: cd {REPO} && .venv/bin/python bench/fleet.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

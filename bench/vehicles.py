"""Vehicle-process CPU per record: what the load side of ``bench/fleet.py`` costs.

Run: ``.venv/bin/python bench/vehicles.py [--devices 250] [--rate 10] [--json]``.

One vehicle process (``python -m simulator.vehicle``: ``--devices`` real edge agents,
each with its own on-disk spool on tmpfs, QUIC connection and certificate, configured as
in ``bench/fleet.py``) pinned to CPU 1, publishing ``--rate`` records/s each straight to
a ``squall hub`` (``bench/fleet.py``'s hub.yaml) pinned to CPU 0 (no proxy).  Over the
middle 60% of the run the vehicle process's CPU time (utime+stime) is divided by the
records the hub committed:
``vehicle_us_per_record``; ``hub_us_per_record`` likewise.

The host's speed moves by a third from minute to minute on these machines, so compare
two versions by running them *at the same time*, each from its own checkout (they share
CPU 1 and CPU 0 and see the same host): ``python A/bench/vehicles.py & python
B/bench/vehicles.py``.  Each run uses its own temporary directories.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from _common import (
    REPO,
    Child,
    Hub,
    cpu_seconds,
    machine,
    machine_line,
    make_pki,
    print_json,
    raise_fd_limit,
    watchdog,
)
from fleet import DEFAULT_SPOOL_DIR, fleet_hub_config, vehicle_configs


def _snapshot(vehicles: Child, hub: Hub) -> tuple[float, float, dict[str, float], float]:
    """(vehicle CPU s, hub CPU s, hub metrics, now)."""
    return cpu_seconds(vehicles.pid), cpu_seconds(hub.pid), hub.metrics(), time.monotonic()


def measure(devices: int, rate: float, duration: float) -> dict[str, Any]:
    """One run; the figures over the middle 60% of the publishing time."""
    with (
        TemporaryDirectory(prefix="squall-vehicles-") as tmp,
        TemporaryDirectory(prefix="squall-vehicles-spools-", dir=DEFAULT_SPOOL_DIR or None) as sp,
    ):
        work = Path(tmp)
        logs = work / "logs"
        logs.mkdir()
        pki = make_pki(work)
        files = fleet_hub_config(work, pki, devices)
        hub = Hub(files, {0}, logs)
        vehicles: Child | None = None
        try:
            hub.wait_ready()
            hub_addr = f"127.0.0.1:{files.udp_port}"
            configs = [str(c) for c in vehicle_configs(work, pki, Path(sp), devices, hub_addr)]
            argv = [sys.executable, "-m", "simulator.vehicle", "--config", *configs]
            argv += ["--rate", str(rate), "--duration", str(duration), "--drain", "20"]
            vehicles = Child("vehicles", argv, {1}, logs)
            time.sleep(duration * 0.3)
            v0, h0, m0, t0 = _snapshot(vehicles, hub)
            time.sleep(duration * 0.6)
            v1, h1, m1, t1 = _snapshot(vehicles, hub)
            vehicles.proc.wait(timeout=duration + 120)
            key = "squall_hub_records_committed_total"
            records = max(1.0, m1[key] - m0[key])
            return {
                "devices": devices,
                "rate": rate,
                "committed_per_s": round(records / (t1 - t0), 1),
                "vehicle_cpu_pct": round(100 * (v1 - v0) / (t1 - t0), 1),
                "vehicle_us_per_record": round(1e6 * (v1 - v0) / records, 1),
                "hub_us_per_record": round(1e6 * (h1 - h0) / records, 1),
            }
        finally:
            if vehicles is not None:
                vehicles.stop()
            hub.stop()


def main() -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=250)
    ap.add_argument("--rate", type=float, default=10.0, help="records/s per vehicle")
    ap.add_argument("--duration", type=float, default=40.0, help="publishing time, s")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    raise_fd_limit()
    with watchdog(args.duration + 300):
        out = {"machine": machine(), **measure(args.devices, args.rate, args.duration)}
    if args.json:
        print_json(out)
        return 0
    print(machine_line(out["machine"]))
    print(
        f"{out['devices']} vehicles x {out['rate']:g}/s from {REPO}: committed "
        f"{out['committed_per_s']:.0f}/s; vehicle process {out['vehicle_cpu_pct']:.0f}% of a core,"
        f" {out['vehicle_us_per_record']:.0f} us per record; hub {out['hub_us_per_record']:.0f} us"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

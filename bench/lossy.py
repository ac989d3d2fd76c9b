"""Delivery latency on lossy links, in virtual time (deterministic: same seed, same figures).

Run: ``.venv/bin/python bench/lossy.py`` (``--json`` for one JSON object, ``--quick`` for
two profiles).  Each case is ``squall fleet --virtual``: 50 vehicles at 2 records/s for
300 simulated seconds on one link profile, then the drain; and the demo's case, 60 s on
``3g-poor`` with a 25 s tunnel outage at 20 s; and two hub restarts (180 s on ``3g-good``, the
hub killed at 60 s and back 2 s or 10 s later: how soon the devices find the new hub).
Per case: accept -> hub latency p50 / p99
/ max, reconnects, records the edges sent again at their own retransmission timer, and
the packets both ways.  Wall time does not enter the figures: they are a property of the
code, so two commits compare exactly (BENCHMARKS.md, "Probe timeouts on thin streams").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import REPO, BenchError, machine, machine_line

PROFILES = ["lte", "3g-good", "3g-poor", "2g-edge", "satellite", "tunnel"]


def run_case(
    profile: str, duration: int, outage_s: int, seed: int, hub_crash: str = ""
) -> dict[str, Any]:
    """One virtual fleet run; its report's latency, reconnect and packet figures."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [
            sys.executable, "-m", "transport.cli", "fleet", "--virtual",
            "--devices", "50", "--rate", "2", "--duration", str(duration),
            "--profile", profile, "--outage-at", "20", "--outage-s", str(outage_s),
            "--drain", "200", "--seed", str(seed), "--report", str(report), "--quiet",
        ]  # fmt: skip
        if hub_crash:
            cmd += ["--hub-crash", hub_crash]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not report.exists():
            raise BenchError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-800:]}")
        r = json.loads(report.read_text())
    lat = r["latency_ms"]
    return {
        "profile": profile,
        "duration_s": duration,
        "outage_s": outage_s,
        "hub_crash": hub_crash,  # AT:DOWN_S, or "" for none
        "seed": seed,
        "p50_ms": round(lat["p50"]),
        "p99_ms": round(lat["p99"]),
        "max_ms": round(lat["max"]),
        "reconnects": r["edge"]["reconnects"],
        "retransmitted_records": r["edge"]["retransmitted_records"],
        "packets_up": r["link"]["up"]["packets"],
        "packets_down": r["link"]["down"]["packets"],
        "lost": r["lost"],
        "duplicates": r["duplicates"],
        "drained_at_s": r["simulated_s"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="3g-poor and lte only")
    ap.add_argument("--seed", type=int, default=2)
    args = ap.parse_args()
    profiles = ["lte", "3g-poor"] if args.quick else PROFILES
    cases: list[tuple[str, int, int, int, str]] = [(p, 300, 0, args.seed, "") for p in profiles]
    cases += [("3g-poor", 60, 25, args.seed, "")]
    cases += [("3g-good", 180, 0, args.seed, f"60:{down}") for down in (2, 10)]
    rows = []
    for case in cases:
        rows.append(run_case(*case))
        if not args.json:
            c = rows[-1]
            print(
                f"{c['profile']:>9} {c['duration_s']:>3} s, outage {c['outage_s']:>2} s"
                f"{', hub restart ' + c['hub_crash'] if c['hub_crash'] else ''}: "
                f"p50 {c['p50_ms']:>5} ms  p99 {c['p99_ms']:>6} ms  max {c['max_ms']:>6} ms  "
                f"reconnects {c['reconnects']:>3}  resent {c['retransmitted_records']:>3}  "
                f"packets {c['packets_up']}/{c['packets_down']}  lost {c['lost']} "
                f"dup {c['duplicates']}",
                flush=True,
            )
    if args.json:
        print(json.dumps({"machine": machine(), "cases": rows}, indent=1))
    else:
        print(machine_line(machine()))
    return 0 if all(c["lost"] == 0 and c["duplicates"] == 0 for c in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""A simulated vehicle: an edge agent publishing a drive's telemetry, faults and logs.

Usable as a program (one or several vehicles per process, for crash tests):
``python -m simulator.vehicle --config a.yaml [b.yaml ...] --rate 50 --duration 30``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from edge.agent import Agent
from edge.config import load_edge_config
from simulator.telemetry import Drive
from transport.errors import SquallError
from transport.wire import Lane

FAULT_CODES = ("P0A80", "P0AA6", "U0100", "B1342")


# The vehicles of one process publish from one timer, every TICK_S at most: a sleep per
# vehicle per record cost a timer, a future and a task step each (~20% of a vehicle's CPU at
# 10 records/s).  A record is due at its vehicle's own schedule, and published at the first
# tick at or after that (so up to TICK_S late, with its clock read then).
TICK_S = 0.01


@dataclass(slots=True)
class _Vehicle:
    agent: Agent
    rng: random.Random
    attacked: bool
    car: Drive
    n: int = 0  # records staged; the next is due at start + n * period
    running: bool = True


def _sample(v: _Vehicle) -> None:
    """One GPS fix, and sometimes a fault or a log line (every one for an attacked vehicle)."""
    agent, rng = v.agent, v.rng
    agent.publish_nowait("telemetry.gps", v.car.step(), {"unit": "si"}, Lane.TELEMETRY)
    v.n += 1
    roll = rng.random()
    if roll < 0.002:
        code = rng.choice(FAULT_CODES)
        agent.publish_nowait("fault", {"code": code}, {"severity": 2}, Lane.CRITICAL)
        v.n += 1
    elif roll < 0.05 or v.attacked:
        line = (
            f"Failed password for root from 203.0.113.{rng.randint(1, 254)} port 22 ssh2"
            if v.attacked
            else "session opened for user ubuntu"
        )
        agent.publish_nowait(
            "log.auth", line, {"severity": 4 if v.attacked else 6, "app": "sshd"}, Lane.BULK
        )
        v.n += 1


async def drive_fleet(
    fleet: Sequence[tuple[Agent, random.Random, bool]], rate: float, duration: float
) -> list[int]:
    """Each (agent, rng, attacked) publishes at ``rate`` records/s for ``duration`` s;
    returns how many records each staged.  A vehicle whose publish is refused stops there
    (the error is printed); the others go on."""
    vehicles = [_Vehicle(agent, rng, attacked, Drive(rng)) for agent, rng, attacked in fleet]
    period = 1.0 / rate
    start = time.monotonic()
    while (now := time.monotonic()) - start < duration:
        due_n = (now - start) / period  # records due so far, for every vehicle alike
        for v in vehicles:
            try:
                while v.running and v.n <= due_n:
                    _sample(v)
            except SquallError as exc:
                v.running = False
                print(f"vehicle {v.agent.prefix}: stopped publishing: {exc}", file=sys.stderr)
        running = [v.n for v in vehicles if v.running]
        if not running:
            break
        wake = max(start + min(running) * period, now + TICK_S)
        await asyncio.sleep(wake - time.monotonic())
    return [v.n for v in vehicles]


async def drive(
    agent: Agent, rate: float, duration: float, rng: random.Random, attacked: bool = False
) -> int:
    """Publish at ``rate`` records/s for ``duration`` s; returns how many were staged."""
    return (await drive_fleet([(agent, rng, attacked)], rate, duration))[0]


async def _main(args: argparse.Namespace) -> int:
    agents = [
        Agent(load_edge_config(path), seed=args.seed + i) for i, path in enumerate(args.config)
    ]
    for agent in agents:
        agent.start()
    # Hundreds of agents share this process: it allocates short-lived objects by the million
    # (records, frames, packets) and few cycles.  As in the virtual fleet, the cyclic
    # collector's youngest generation is collected every 20,000 allocations (Python's
    # default: 700) and what exists now (certificates, configs) is left out of its scans.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    fleet = [(a, random.Random(args.seed + i), False) for i, a in enumerate(agents)]
    driving = loop.create_task(drive_fleet(fleet, args.rate, args.duration))
    stopper = loop.create_task(stop.wait())
    await asyncio.wait([stopper, driving], return_when="FIRST_COMPLETED")
    driving.cancel()
    failed = driving.exception() if driving.done() and not driving.cancelled() else None
    if failed is not None:  # not a refused publish (that stops one vehicle): a bug
        print(f"vehicles: the drive failed: {failed!r}", file=sys.stderr, flush=True)
    if args.drain and not stop.is_set():
        deadline = time.monotonic() + args.drain
        while time.monotonic() < deadline and any(
            d[0] for a in agents for d in a.spool.depth().values()
        ):
            await asyncio.sleep(0.1)
    for agent in agents:
        depth = sum(d[0] for d in agent.spool.depth().values())
        if depth:  # say why a vehicle still holds records (the bench counts them)
            st = agent.stats
            print(
                f"vehicle {agent.prefix}: {depth} records still spooled; connected="
                f"{agent.connected.is_set()} sessions={st.sessions} reconnects={st.reconnects}"
                f" acked={st.acked} refused={st.refused}; {_sender_state(agent)}",
                file=sys.stderr,
                flush=True,
            )
        await agent.stop()
        print(f"vehicle {agent.prefix}: last_seq={agent.spool.last_seq}", flush=True)
    stopper.cancel()
    return 1 if failed is not None else 0


def _sender_state(agent: Agent) -> str:
    """What the sender is waiting for (the bench prints it for a vehicle that did not drain)."""
    ep = agent.endpoint
    if ep is None:
        return "no session"
    now = asyncio.get_running_loop().time()
    return f"{ep.describe(now)}; spool last seq {agent.spool.last_seq}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of one simulated vehicle."""
    ap = argparse.ArgumentParser(prog="python -m simulator.vehicle", description=__doc__)
    ap.add_argument("--config", required=True, nargs="+", help="one edge YAML per vehicle")
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument(
        "--drain", type=float, default=0.0, help="then wait up to N s for the spool to empty"
    )
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except SquallError as exc:
        print(f"vehicle: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""A simulated vehicle: an edge agent publishing a drive's telemetry, faults and logs.

Usable as a program (one or several vehicles per process, for crash tests):
``python -m simulator.vehicle --config a.yaml [b.yaml ...] --rate 50 --duration 30``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import time

from edge.agent import Agent
from edge.config import load_edge_config
from simulator.telemetry import Drive
from transport.errors import SquallError
from transport.wire import Lane

FAULT_CODES = ("P0A80", "P0AA6", "U0100", "B1342")


async def drive(
    agent: Agent, rate: float, duration: float, rng: random.Random, attacked: bool = False
) -> int:
    """Publish at ``rate`` records/s for ``duration`` s; returns how many were staged."""
    car = Drive(rng)
    period = 1.0 / rate
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < duration:
        body = car.step()
        agent.publish_nowait("telemetry.gps", body, {"unit": "si"}, Lane.TELEMETRY)
        n += 1
        roll = rng.random()
        if roll < 0.002:
            code = rng.choice(FAULT_CODES)
            agent.publish_nowait("fault", {"code": code}, {"severity": 2}, Lane.CRITICAL)
            n += 1
        elif roll < 0.05 or attacked:
            line = (
                f"Failed password for root from 203.0.113.{rng.randint(1, 254)} port 22 ssh2"
                if attacked
                else "session opened for user ubuntu"
            )
            agent.publish_nowait(
                "log.auth", line, {"severity": 4 if attacked else 6, "app": "sshd"}, Lane.BULK
            )
            n += 1
        target = start + n * period
        await asyncio.sleep(max(0.0, target - time.monotonic()))
    return n


async def _main(args: argparse.Namespace) -> int:
    agents = [
        Agent(load_edge_config(path), seed=args.seed + i) for i, path in enumerate(args.config)
    ]
    for agent in agents:
        agent.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    drives = [
        loop.create_task(drive(a, args.rate, args.duration, random.Random(args.seed + i)))
        for i, a in enumerate(agents)
    ]
    stopper = loop.create_task(stop.wait())
    await asyncio.wait(
        [stopper, loop.create_task(asyncio.wait(drives))], return_when="FIRST_COMPLETED"
    )
    for task in drives:
        task.cancel()
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
    return 0


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

"""The simulated vehicles of one process publish from one timer (simulator.vehicle).

Every vehicle keeps its own schedule (``rate`` records/s, faults and log lines counted),
all are served by one sleep per tick, and a vehicle whose publish is refused stops alone.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, cast

from edge.agent import Agent
from simulator.vehicle import TICK_S, drive, drive_fleet
from transport.errors import SpoolFullError


class FakeAgent:
    """Records what is published, and when; refuses after ``refuse_after`` records."""

    def __init__(self, name: str, refuse_after: int | None = None) -> None:
        self.prefix = f"acme.{name}"
        self.refuse_after = refuse_after
        self.published: list[tuple[float, str, int]] = []

    def publish_nowait(self, subject: str, body: Any, attrs: Any, lane: Any) -> int:
        if self.refuse_after is not None and len(self.published) >= self.refuse_after:
            raise SpoolFullError("spool full (test)")
        self.published.append((time.monotonic(), subject, int(lane)))
        return len(self.published)


def _fleet(agents: list[FakeAgent], attacked: int = -1) -> list[tuple[Agent, random.Random, bool]]:
    return [(cast(Agent, a), random.Random(i), i == attacked) for i, a in enumerate(agents)]


def test_every_vehicle_keeps_its_rate_from_one_timer() -> None:
    agents = [FakeAgent(f"v{i}") for i in range(40)]
    rate, duration = 50.0, 0.6
    sleeps = 0
    real_sleep = asyncio.sleep

    async def counting_sleep(delay: float) -> None:
        nonlocal sleeps
        sleeps += 1
        await real_sleep(delay)

    async def run() -> list[int]:
        asyncio.sleep = counting_sleep  # type: ignore[assignment]
        try:
            return await drive_fleet(_fleet(agents, attacked=3), rate, duration)
        finally:
            asyncio.sleep = real_sleep

    start = time.monotonic()
    counts = asyncio.run(run())
    assert counts == [len(a.published) for a in agents]
    # One timer for all 40: a sleep per tick, not one per record (there are ~1,200 records).
    assert sleeps <= duration / TICK_S + 2
    assert sum(counts) > 10 * sleeps
    for a in agents:
        # the schedule: a GPS fix after k records is due at start + k / rate, never sooner
        # (a fault or log line goes with the fix before it, and takes its place in the rate)
        for k, (at, subject, _) in enumerate(a.published):
            if subject == "telemetry.gps":
                assert at >= start + k / rate - 0.002
        assert len(a.published) <= duration * rate + 1
    # an attacked vehicle spends every other record on an SSH log line, within the same rate
    logs = [s for _, s, _ in agents[3].published if s == "log.auth"]
    assert len(logs) >= len(agents[3].published) // 2 - 1


def test_a_refused_vehicle_stops_and_the_others_go_on(capsys: Any) -> None:
    agents = [FakeAgent("v0"), FakeAgent("v1", refuse_after=3), FakeAgent("v2")]
    counts = asyncio.run(drive_fleet(_fleet(agents), 100.0, 1.0))
    assert counts[1] == 3 and len(agents[1].published) == 3
    assert counts[0] > 20 and counts[2] > 20  # ~100 each; a loaded machine catches up late
    assert "acme.v1: stopped publishing: spool full (test)" in capsys.readouterr().err


def test_drive_is_a_fleet_of_one() -> None:
    agent = FakeAgent("solo")
    n = asyncio.run(drive(cast(Agent, agent), 200.0, 0.5, random.Random(1)))
    assert n == len(agent.published) and 10 < n <= 101

"""``squall edge --config edge.yaml``: run an edge agent until SIGTERM (clean, loses nothing)."""

from __future__ import annotations

import asyncio
import signal

from edge.config import EdgeConfig, load_edge_config
from transport.cli import run_service


def cli_edge(argv: list[str]) -> int:
    """Entry point; exit 0 after a clean shutdown, 2 on a configuration error."""
    return run_service(argv, "edge", __doc__, load_edge_config, _run)


async def _run(cfg: EdgeConfig) -> int:
    from edge.agent import Agent
    from edge.inputs import start_inputs
    from edge.metrics import start_metrics

    agent = Agent(cfg)
    agent.start()
    inputs = await start_inputs(agent, cfg.inputs)
    metrics = (
        await start_metrics(agent, cfg.metrics_host, cfg.metrics_port) if cfg.metrics_port else None
    )
    print(f"squall edge: {agent.prefix} -> {', '.join(cfg.hubs)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await inputs.stop()
    await agent.stop()
    if metrics is not None:
        await metrics.cleanup()
    print("squall edge: stopped cleanly", flush=True)
    return 0

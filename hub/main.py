"""``squall hub --config hub.yaml``: run a hub until SIGTERM; SIGHUP reloads the deny list."""

from __future__ import annotations

import asyncio
import logging
import signal

from hub.config import load_hub_config
from transport.cli import run_service


def cli_hub(argv: list[str]) -> int:
    """Entry point; exit 0 after a clean shutdown, 2 on a configuration error."""
    return run_service(argv, "hub", __doc__, load_hub_config, _run)


async def _run(cfg: object) -> int:
    from hub.http import start_http
    from hub.server import Hub

    hub = Hub(cfg)  # type: ignore[arg-type]
    await hub.start()
    runner = None
    if hub.config.http.enabled:
        runner, port = await start_http(hub)
        logging.getLogger("squall.hub").info("HTTP API on port %d", port)
    logging.getLogger("squall.hub").info("listening on UDP port %d", hub.port)
    print(f"squall hub: listening on {hub.config.listen} (udp port {hub.port})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hub.reload_deny_list)
    await stop.wait()
    await hub.stop()
    if runner is not None:
        await runner.cleanup()
    print("squall hub: stopped cleanly", flush=True)
    return 0

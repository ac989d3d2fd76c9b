"""The "REST queue" peer of bench/peers.py: an aiohttp HTTPS server with an in-memory queue.

``POST /v1/publish/<device>`` appends the body to the queue and answers 204 (the
publisher's acknowledgement).  ``GET /v1/consume?after=N&max=M`` long-polls (up to 1 s)
for the messages after offset N, one per line as ``offset<TAB>device<TAB>body``;
asking for what follows N acknowledges everything up to N, which the queue then
forgets.  TLS with client certificates required (the same CA as every other system);
keep-alive connections.  The queue lives in memory: it is not durable, and nothing
bounds it (the slow-subscriber test shows what that costs).

Run: ``python bench/_peers_https.py [--host H] --port P --cert C --key K --ca CA``; prints
``ready <port>`` when listening, stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
from collections import deque

from aiohttp import web

LONG_POLL_S = 1.0


class Queue:
    """Messages with offsets from 1; what a consumer acknowledged is dropped."""

    def __init__(self) -> None:
        self.items: deque[tuple[int, str, str]] = deque()
        self.next_offset = 1
        self.arrived = asyncio.Event()

    def append(self, device: str, body: str) -> None:
        """Add one message."""
        self.items.append((self.next_offset, device, body))
        self.next_offset += 1
        self.arrived.set()

    def after(self, offset: int, limit: int) -> list[tuple[int, str, str]]:
        """Drop what is at or before ``offset``; return up to ``limit`` messages after it."""
        while self.items and self.items[0][0] <= offset:
            self.items.popleft()
        out: list[tuple[int, str, str]] = []
        for item in self.items:
            if len(out) >= limit:
                break
            out.append(item)
        return out


def make_app(queue: Queue) -> web.Application:
    """Routes: health, publish, consume."""

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def publish(request: web.Request) -> web.Response:
        body = await request.text()
        if "\n" in body or "\t" in body or not body:
            return web.Response(status=400, text="one JSON object per request, no tabs")
        queue.append(request.match_info["device"], body)
        return web.Response(status=204)

    async def consume(request: web.Request) -> web.Response:
        after = int(request.query.get("after", "0"))
        limit = min(10_000, max(1, int(request.query.get("max", "1000"))))
        items = queue.after(after, limit)
        if not items:
            queue.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queue.arrived.wait(), LONG_POLL_S)
            items = queue.after(after, limit)
        text = "".join(f"{o}\t{d}\t{b}\n" for o, d, b in items)
        return web.Response(text=text)

    app = web.Application(client_max_size=1 << 20)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/publish/{device}", publish)
    app.router.add_get("/v1/consume", consume)
    return app


async def serve(host: str, port: int, cert: str, key: str, ca: str) -> None:
    """Listen on ``host``:``port`` until SIGTERM."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    runner = web.AppRunner(make_app(Queue()), access_log=None, keepalive_timeout=300)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ctx, backlog=1024)
    await site.start()
    print(f"ready {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = ap.parse_args()
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(args.host, args.port, args.cert, args.key, args.ca))


if __name__ == "__main__":
    main()

"""Transport benchmark: records/s into the hub application, wire bytes per record, handshakes/s.

The hub runs in its own process pinned to one core (CPU 0); the edge load runs in this
process pinned to the other.  Records are ~200-byte GPS fixes from a simulated drive.
Run: ``.venv/bin/python bench/transport.py [--records N] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine, machine_line, pin
from aioquic import tls

from simulator.telemetry import Drive
from transport import certs
from transport.aio import open_driver
from transport.batchcodec import Record
from transport.events import BatchAccepted
from transport.memoutbox import MemoryOutbox
from transport.quic import (
    Connected,
    ConnectionLost,
    DeviceEvent,
    EdgeEndpoint,
    EdgeTls,
    HubConnection,
    HubEndpoint,
    HubTls,
)
from transport.session import (
    DeviceLedger,
    EdgeSession,
    HubSession,
    HubSessionConfig,
    SenderConfig,
)
from transport.wire import Lane


def pin_to(cpu: int) -> None:
    """Pin this process to one CPU when the machine has it."""
    if cpu < (os.cpu_count() or 1):
        pin({cpu})


# --- hub process ------------------------------------------------------------------


async def hub_main(ca_dir: Path) -> None:
    """A hub that commits in memory and prints its port, then counts until stdin closes."""
    pin_to(0)
    ca = certs.load_cert(ca_dir / "ca.pem")
    files = HubTls(certs.load_cert(ca_dir / "hub.pem"), certs.load_key(ca_dir / "hub.key"), [ca])
    ledgers: dict[tuple[str, int], DeviceLedger] = {}
    received = {"records": 0}

    def make_session(conn: HubConnection, now: float) -> HubSession:
        ident = conn.identity
        assert ident is not None
        cfg = HubSessionConfig(window_records=20_000)
        return HubSession(
            ident.tenant,
            ident.device,
            lambda inc: ledgers.setdefault((ident.device, inc), DeviceLedger(inc)),
            now,
            cfg,
        )

    endpoint = HubEndpoint(files, make_session, lambda ident: None)
    loop = asyncio.get_running_loop()

    def after() -> None:
        touched: set[HubConnection] = set()
        while (ev := endpoint.next_event()) is not None:
            if isinstance(ev, DeviceEvent) and isinstance(ev.event, BatchAccepted):
                b = ev.event
                session = ev.conn.session
                assert session is not None and session.ledger is not None
                received["records"] += b.count
                session.ledger.lanes[b.lane].committed = b.last_seq
                touched.add(ev.conn)
        now = loop.time()
        for conn in touched:
            assert conn.session is not None
            conn.session.on_committed(now)
            endpoint.touch(conn, now)

    driver = await open_driver(endpoint, ("127.0.0.1", 0), after)
    assert driver.transport is not None
    port = driver.transport.get_extra_info("sockname")[1]
    print(json.dumps({"port": port}), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip() == b"stats":
            cpu = time.process_time()
            print(json.dumps({"records": received["records"], "cpu": cpu}), flush=True)


# --- edge side ----------------------------------------------------------------------


def make_records(n: int, prefix: str) -> list[Record]:
    drive = Drive(random.Random(7))
    t0 = 1_700_000_000_000_000
    return [
        Record(i, t0 + i * 1_000_000, f"{prefix}.telemetry.gps", {}, drive.step())
        for i in range(1, n + 1)
    ]


class HubProc:
    """The hub subprocess and a way to ask it for its counters."""

    def __init__(self, ca_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--role", "hub", "--ca", str(ca_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(json.loads(self.proc.stdout.readline())["port"])

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


async def run_edge(
    port: int,
    files: EdgeTls,
    records: list[Record],
    batch: int,
    ticket: tls.SessionTicket | None = None,
) -> dict[str, Any]:
    """Send ``records`` in batches of ``batch``; return timing and wire bytes."""
    loop = asyncio.get_running_loop()
    outbox = MemoryOutbox()
    for r in records:
        outbox.add(Lane.TELEMETRY, r, 0.0)
    cfg = SenderConfig(batch_max_records=batch, linger_s=0.0, window_records=max(4 * batch, 2000))
    session = EdgeSession(outbox, random.getrandbits(62), loop.time(), cfg)
    tickets: list[tls.SessionTicket] = []
    endpoint = EdgeEndpoint(
        files, session, ("127.0.0.1", port), loop.time(), ticket, tickets.append
    )
    done = loop.create_future()
    first_ack: list[float] = []
    start = loop.time()

    def after() -> None:
        while (ev := endpoint.next_event()) is not None:
            if isinstance(ev, ConnectionLost) and not done.done():
                done.set_exception(RuntimeError(f"connection lost: {ev.reason}"))
            if not first_ack and type(ev).__name__ == "Acked":
                first_ack.append(loop.time())
            if isinstance(ev, Connected):
                pass
        if outbox.depth(Lane.TELEMETRY) == 0 and not done.done():
            done.set_result(loop.time())

    driver = await open_driver(endpoint, ("127.0.0.1", 0), after)
    driver.flush()
    end = await asyncio.wait_for(done, 120)
    for _ in range(300):  # keep the session until the hub's new ticket is in (for the next resume)
        if tickets or ticket is None:
            break
        await asyncio.sleep(0.01)
    endpoint.close()
    driver.flush()
    await asyncio.sleep(0.05)
    driver.close()
    return {
        "seconds": end - start,
        "wire_bytes": driver.sent_bytes + driver.received_bytes,
        "first_ack_s": (first_ack[0] - start) if first_ack else None,
        "tickets": tickets,
    }


async def connect_once(port: int, files: EdgeTls, ticket: tls.SessionTicket | None) -> Any:
    """One handshake to completion; returns the newest ticket the hub issued."""
    loop = asyncio.get_running_loop()
    session = EdgeSession(MemoryOutbox(), 1, loop.time(), SenderConfig())
    tickets: list[tls.SessionTicket] = []
    endpoint = EdgeEndpoint(
        files, session, ("127.0.0.1", port), loop.time(), ticket, tickets.append
    )
    done = loop.create_future()
    welcomed: list[bool] = []

    def after() -> None:
        while (ev := endpoint.next_event()) is not None:
            if type(ev).__name__ == "Welcomed":
                welcomed.append(True)
            if isinstance(ev, ConnectionLost) and not done.done():
                done.set_exception(RuntimeError(ev.reason))
        if welcomed and tickets and not done.done():
            done.set_result(True)

    driver = await open_driver(endpoint, ("127.0.0.1", 0), after)
    driver.flush()
    await asyncio.wait_for(done, 10)
    endpoint.close()
    driver.flush()
    driver.close()
    return tickets[-1]


async def handshakes(port: int, files: EdgeTls, n: int, resumed: bool) -> float:
    """Sequential handshakes (to WELCOME) per second, fresh or resumed with 0-RTT."""
    ticket = await connect_once(port, files, None)
    t0 = time.perf_counter()
    for _ in range(n):
        new = await connect_once(port, files, ticket if resumed else None)
        ticket = new
    return n / (time.perf_counter() - t0)


async def reconnect_rtts(port: int, files: EdgeTls, rtt_ms: float = 300.0) -> float:
    """Through `squall link` at ``rtt_ms``: resumed reconnect to first ACK, in RTTs (median)."""
    from simulator.linkmodel import LinkParams
    from simulator.proxy import start_proxy

    proxy = await start_proxy(
        ("127.0.0.1", port), listen=("127.0.0.1", 0), profile=LinkParams(delay_ms=rtt_ms / 2)
    )
    try:
        link_port = proxy.listen_addr[1]
        ticket = await connect_once(link_port, files, None)
        samples = []
        for i in range(5):
            recs = make_records(1, "acme.bench-0")
            res = await run_edge(link_port, files, recs, 1, ticket)
            assert res["tickets"], "no ticket to resume with"
            ticket = res["tickets"][-1]
            samples.append(res["first_ack_s"] * 1000 / rtt_ms)
            del i
        return round(sorted(samples)[len(samples) // 2], 2)
    finally:
        await proxy.close()


async def bench(records_n: int) -> dict[str, Any]:
    pin_to(1)
    with tempfile.TemporaryDirectory() as tmp:
        ca_dir = Path(tmp)
        certs.init_dir(ca_dir)
        cert_path, key_path = certs.issue_device(ca_dir, "acme", "bench-0")
        files = EdgeTls(
            [certs.load_cert(ca_dir / "ca.pem")],
            certs.load_cert(cert_path),
            certs.load_key(key_path),
        )
        hub = HubProc(ca_dir)
        try:
            out: dict[str, Any] = {}
            for batch in (1, 10, 100):
                n = records_n if batch > 1 else max(records_n // 10, 2000)
                recs = make_records(n, "acme.bench-0")
                before = hub.stats()
                res = await run_edge(hub.port, files, recs, batch)
                after = hub.stats()
                got = after["records"] - before["records"]
                assert got == n, f"hub got {got} of {n}"
                out[f"records_per_s_batch{batch}"] = round(n / res["seconds"])
                out[f"hub_cpu_s_per_100k_batch{batch}"] = round(
                    (after["cpu"] - before["cpu"]) / n * 100_000, 3
                )
                if batch == 100:
                    out["wire_bytes_per_record"] = round(res["wire_bytes"] / n, 1)
            out["handshakes_per_s_fresh"] = round(await handshakes(hub.port, files, 40, False), 1)
            out["handshakes_per_s_resumed"] = round(await handshakes(hub.port, files, 40, True), 1)
            out["reconnect_first_ack_rtts"] = await reconnect_rtts(hub.port, files)
        finally:
            hub.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--role", choices=["bench", "hub"], default="bench")
    ap.add_argument("--ca", type=Path)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.role == "hub":
        asyncio.run(hub_main(args.ca))
        return 0
    res = asyncio.run(bench(args.records))
    if args.json:
        print(json.dumps(res))
    else:
        print(machine_line(machine()))
        for k, v in res.items():
            print(f"{k:32} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

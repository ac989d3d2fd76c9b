"""1,000 device sessions against one hub process on loopback: every record once, memory per session.

The hub runs as a real subprocess (``python -m transport.cli hub``) so that its resident
memory can be read from /proc before and after the sessions connect: the difference
divided by the session count is the honest figure for what an idle device connection
costs the hub (Python objects, aioquic state, allocator overhead, all of it).
The devices are EdgeEndpoint + EdgeSession pairs with in-memory outboxes, one UDP socket
each, all in this process; their certificates are issued in memory from the CA.
All 1,000 first Initials leave in one burst, so the hub (``max_handshakes`` 100 here,
so that the busy path shows even where the kernel's UDP queue is small and drops most of
such a burst) refuses many of them with "busy; retry-after-ms=..."; those devices come
back after the hinted delay and get in.  Like real agents, devices whose handshake was
lost in the burst (the edge's own WELCOME timeout, or the hub's handshake timeout) try
again; any other loss is a failure.  The figures are printed in any run (capture off).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aioquic.quic.packet import QuicErrorCode
from cryptography import x509

from hub.config import HubConfig, load_hub_config
from hub.log import Log
from transport import certs
from transport.aio import UdpDriver, open_driver
from transport.batchcodec import Record
from transport.certs import PrivateKey
from transport.errors import ErrorCode
from transport.events import Acked
from transport.memoutbox import MemoryOutbox
from transport.quic import ConnectionLost, EdgeEndpoint, EdgeTls
from transport.session import EdgeSession, SenderConfig
from transport.wire import Lane

from .conftest import scrape, write_hub_config

pytestmark = pytest.mark.integration

DEVICES = 1000
RECORDS = 3  # per device
RETRY_AFTER_MS = 300  # the hub's busy hint; short, so the refused devices come back quickly
MAX_HANDSHAKES = 100
RETRY_LOST_S = 0.2  # a device whose handshake got lost tries again after this
LANE = int(Lane.TELEMETRY)


@dataclass(eq=False)
class Device:
    """One simulated device: its certificate, its outbox and its current connection."""

    name: str
    files: EdgeTls
    outbox: MemoryOutbox
    endpoint: EdgeEndpoint | None = None
    driver: UdpDriver | None = None
    attempts: int = 0
    busy_reasons: list[str] = field(default_factory=list)
    lost_handshakes: list[ConnectionLost] = field(default_factory=list)
    failure: ConnectionLost | None = None
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # acked, or failed for good


def make_device(ca: x509.Certificate, ca_key: PrivateKey, name: str) -> Device:
    cert, key = certs.make_device_cert(ca, ca_key, "acme", name)
    outbox = MemoryOutbox()
    for seq in range(1, RECORDS + 1):
        record = Record(seq, seq * 1_000_000, f"acme.{name}.telemetry.temp", {}, {"c": 20 + seq})
        outbox.add(LANE, record, 0.0)
    return Device(name, EdgeTls([ca], cert, key), outbox)


class Fleet:
    """Connects devices, brings back the ones refused as busy, notes ACKs and failures."""

    def __init__(self, hub_addr: tuple[str, int]) -> None:
        self.hub_addr = hub_addr
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()

    async def prepare(self, dev: Device) -> UdpDriver:
        """A fresh connection and socket for ``dev``; nothing leaves before the driver flushes."""
        if dev.driver is not None:
            dev.driver.close()
        now = self.loop.time()
        session = EdgeSession(dev.outbox, 1, now, SenderConfig(linger_s=0.0))
        endpoint = EdgeEndpoint(dev.files, session, self.hub_addr, now)
        endpoint.poll(now)  # the records follow the handshake at once
        dev.endpoint, dev.attempts = endpoint, dev.attempts + 1
        dev.driver = await open_driver(endpoint, ("127.0.0.1", 0), lambda: self.on_events(dev))
        return dev.driver

    async def connect(self, dev: Device) -> None:
        (await self.prepare(dev)).flush()

    def on_events(self, dev: Device) -> None:
        assert dev.endpoint is not None
        while (ev := dev.endpoint.next_event()) is not None:
            if isinstance(ev, Acked) and dev.outbox.depth(LANE) == 0:
                dev.acked.set()
                dev.settled.set()
            elif isinstance(ev, ConnectionLost) and not dev.acked.is_set():
                if ev.retry_after_ms and not ev.handshake_done:  # busy: come back as told
                    dev.busy_reasons.append(ev.reason)
                    self.loop.call_later(ev.retry_after_ms / 1000, self.reconnect, dev)
                elif handshake_lost(ev):
                    dev.lost_handshakes.append(ev)
                    self.loop.call_later(RETRY_LOST_S, self.reconnect, dev)
                else:
                    dev.failure = ev
                    dev.settled.set()

    def reconnect(self, dev: Device) -> None:
        task = self.loop.create_task(self.connect(dev))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def handshake_lost(lost: ConnectionLost) -> bool:
    """The edge gave up waiting for WELCOME, or the hub for the end of the handshake."""
    if lost.code == ErrorCode.IDLE_TIMEOUT:
        return True
    # the hub's handshake timeout, sent before 1-RTT keys: aioquic makes it a bare transport
    # APPLICATION_ERROR
    return lost.code == QuicErrorCode.APPLICATION_ERROR and not lost.handshake_done


def fleet_summary(devices: list[Device], metrics: dict[str, float]) -> str:
    """Where the fleet stands (for a failure message)."""
    acked = sum(d.acked.is_set() for d in devices)
    attempts = Counter(d.attempts for d in devices)
    failures = Counter(f"{d.failure.code}:{d.failure.reason}" for d in devices if d.failure)
    return f"acked {acked}/{len(devices)}; attempts {dict(attempts)}; {failures}; hub {metrics}"


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size of a process in KiB (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def until_metric(cfg: HubConfig, name: str, value: float, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while (m := await scrape(cfg.http.listen, cfg.http.token)).get(name) != value:
        if loop.time() > end:
            raise AssertionError(f"{name} is {m.get(name)}, not {value}, after {timeout} s")
        await asyncio.sleep(0.1)


def start_hub(cfg_path: Path, tmp_path: Path) -> subprocess.Popen[str]:
    with (tmp_path / "hub.stderr").open("w") as errlog:
        proc = subprocess.Popen(
            [sys.executable, "-m", "transport.cli", "hub", "--config", str(cfg_path)],
            stdout=subprocess.PIPE,
            stderr=errlog,
            text=True,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "squall hub: listening on ..." once the port is bound
    assert "listening" in line, (tmp_path / "hub.stderr").read_text()[-2000:]
    return proc


def stop_hub(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def stored_records(db: Path) -> Counter[tuple[str, int]]:
    """(device, seq) -> how often the hub log holds it (the hub's presence records left out)."""
    log = Log(str(db))
    try:
        seen: Counter[tuple[str, int]] = Counter()
        offset = log.first_offset()
        while batch := log.read(offset, 10_000):
            seen.update((e.device, e.seq) for e in batch if e.incarnation != 0)
            offset = batch[-1].offset + 1
        return seen
    finally:
        log.close()


def test_thousand_devices_every_record_once_and_memory_per_idle_session(
    tmp_path: Path, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_path = write_hub_config(
        tmp_path,
        pki,
        server={"busy_retry_after_ms": RETRY_AFTER_MS, "max_handshakes": MAX_HANDSHAKES},
        log={"group_commit_ms": 20},
        presence={"stale_after_s": 600, "offline_after_s": 1200},
    )
    cfg = load_hub_config(cfg_path)
    host, _, port = cfg.listen.rpartition(":")
    ca, ca_key = certs.load_cert(pki / "ca.pem"), certs.load_key(pki / "ca.key")
    devices = [make_device(ca, ca_key, f"d{i:04d}") for i in range(DEVICES)]
    warm = make_device(ca, ca_key, "warmup")
    fig: dict[str, float] = {}
    proc = start_hub(cfg_path, tmp_path)
    try:

        async def main() -> None:
            fleet = Fleet((host, int(port)))
            # One device first, then gone: the hub has imported and set up everything a
            # session needs, so the baseline below carries no first-use costs.
            await fleet.connect(warm)
            await asyncio.wait_for(warm.acked.wait(), 20)
            assert warm.endpoint is not None and warm.driver is not None
            warm.endpoint.close()
            warm.driver.flush()
            await until_metric(cfg, "squall_hub_sessions", 0, 20)
            await asyncio.sleep(0.5)
            fig["rss_before"], fig["edge_rss_before"] = rss_kib(proc.pid), rss_kib()
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()

            drivers = [await fleet.prepare(dev) for dev in devices]
            for driver in drivers:  # 1,000 Initials in one burst: 10x the handshake slots
                driver.flush()
            settled = asyncio.gather(*(d.settled.wait() for d in devices))
            try:
                await asyncio.wait_for(settled, 75)
            except TimeoutError:
                metrics = await scrape(cfg.http.listen, cfg.http.token)
                raise AssertionError(fleet_summary(devices, metrics)) from None
            fig["seconds"], fig["hub_cpu"] = time.monotonic() - t0, cpu_seconds(proc.pid) - cpu0
            assert all(d.acked.is_set() for d in devices), fleet_summary(devices, {})
            # all connected, all acknowledged, nothing more to say: idle
            await until_metric(cfg, "squall_hub_sessions", DEVICES, 10)
            await asyncio.sleep(1.0)
            fig["rss_after"], fig["edge_rss_after"] = rss_kib(proc.pid), rss_kib()
            m = await scrape(cfg.http.listen, cfg.http.token)
            fig["busy_refused"] = m["squall_hub_busy_refused_total"]
            fig["committed"] = m["squall_hub_records_committed_total"]
            fig["auth_failed"] = m["squall_hub_auth_failed_total"]
            for dev in [*devices, warm]:
                assert dev.driver is not None
                dev.driver.close()

        asyncio.run(asyncio.wait_for(main(), 100))
    finally:
        assert stop_hub(proc) == 0

    # -- what a user checks ------------------------------------------------------------
    assert fig["committed"] == (DEVICES + 1) * RECORDS and fig["auth_failed"] == 0
    stored = stored_records(tmp_path / "hub.db")
    expected = {(d.name, s) for d in [*devices, warm] for s in range(1, RECORDS + 1)}
    assert set(stored) == expected  # every record of every device ...
    assert set(stored.values()) == {1}  # ... once
    # more devices than handshake slots: the refused ones got the hint and came back
    busy = [d for d in devices if d.busy_reasons]
    assert busy and fig["busy_refused"] >= sum(len(d.busy_reasons) for d in busy)
    reasons = {r for d in busy for r in d.busy_reasons}
    assert reasons == {f"busy; retry-after-ms={RETRY_AFTER_MS}"}

    retried = sum(len(d.lost_handshakes) for d in devices)
    per_session = (fig["rss_after"] - fig["rss_before"]) / DEVICES
    edge_per_session = (fig["edge_rss_after"] - fig["edge_rss_before"]) / DEVICES
    with capsys.disabled():  # the figures show in a plain pytest run, not only with -s
        print(
            f"\n[hub scale] {DEVICES} devices connected, {DEVICES * RECORDS} records acknowledged "
            f"in {fig['seconds']:.1f} s (hub CPU {fig['hub_cpu']:.1f} s); {len(busy)} devices "
            f"refused busy at first (at most {max(d.attempts for d in devices)} attempts; "
            f"hub busy_refused={fig['busy_refused']:.0f}; {retried} handshakes lost and retried)"
            f"\n[hub scale] hub RSS {fig['rss_before'] / 1024:.1f} MiB -> "
            f"{fig['rss_after'] / 1024:.1f} MiB = {per_session:.1f} KiB per idle session"
            f"\n[hub scale] (edge side, this process: {edge_per_session:.1f} KiB per connection)",
            flush=True,
        )
    assert 0 < per_session < 500  # sanity only: tests never assert tight performance figures

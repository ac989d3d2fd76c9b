"""Link proxy benchmark: packets/s forwarded on one core, and delay accuracy at 50 ms.

Run: ``.venv/bin/python bench/link.py`` (``--json`` for one JSON object, ``--no-uvloop``
to measure asyncio's own loop).

Three processes, so that only the proxy is measured:

- the proxy: ``python -m simulator.linkcli`` (what ``squall link`` runs), pinned to
  CPU 0 when the machine has two or more;
- a sender and a sink (the upstream), pinned to the other CPUs. Flat out, both use the
  batched calls of :mod:`simulator.mmsg` (the sender sendmmsg + UDP GSO, the sink
  recvmmsg copying 16 bytes a datagram) so that they stay far cheaper per datagram than
  the proxy they measure; the proxy still receives and sends every datagram on its own.

**Throughput** (``proxy_pps_200``, ``proxy_pps_1200``): the sender offers far more
datagrams than the proxy can take, through the ``lan`` profile of config/links.yaml
(0.5 ms delay, 0.1 ms jitter). The figure is what the proxy sent on per second in a
steady window, read from its own counters (``GET /status``; the sink's count is
printed beside it as a check), together with the proxy's CPU use in that window
(from /proc) so that a starved proxy shows. ``*_per_cpu_s`` is packets per CPU-second
of the proxy: the single-core figure a dedicated core would give.

**Delay accuracy** (``delay_err_p50_ms``, ``delay_err_p99_ms``): a profile of exactly
50 ms delay, the sender paced at 20,000 packets/s of 200 bytes, each carrying its
send time (CLOCK_MONOTONIC, shared by all processes); the sink takes arrival minus
send minus 50 ms. Percentiles are of the absolute error; the signed mean and the
loopback baseline (the same path at 0 ms) are printed to show where it comes from. At
20,000 packets/s arrivals wake the proxy every 50 us and it sends what is due then;
the same measurement at 200 packets/s shows the timer-driven case (uvloop's timers
have millisecond resolution).

On a shared machine other tenants' processes preempt sender, proxy and sink now and
then: compare with the 0 ms baseline before blaming the proxy for a p99.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STAMP = struct.Struct("!Q")  # send time, CLOCK_MONOTONIC nanoseconds
DELAY_PROFILES = """\
profiles:
  fixed-50ms: {delay_ms: 50}
  fixed-0ms: {}
"""


def _pin(cpus: set[int]) -> None:
    if hasattr(os, "sched_setaffinity") and cpus:
        os.sched_setaffinity(0, cpus)


def _cpu_sets() -> tuple[set[int], set[int]]:
    """(proxy CPUs, sender and sink CPUs)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return set(), set()
    return {cpus[0]}, set(cpus[1:])


# -- peers (child processes) ----------------------------------------------------------------


def sink(conn: Connection, cpus: set[int], mode: str, expect_delay_s: float) -> None:
    """The upstream: counts datagrams per 100 ms, or records delay errors; reports on a pipe."""
    _pin(cpus)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    conn.send(sock.getsockname()[1])
    buckets: dict[int, int] = {}
    errors: list[float] = []
    if mode == "count":
        buckets = _count_arrivals(sock)
    else:
        sock.settimeout(0.5)
        started = False
        while True:
            try:
                data = sock.recv(65535)
            except TimeoutError:
                if started:
                    break
                continue
            started = True
            (sent,) = STAMP.unpack_from(data)
            errors.append((time.monotonic_ns() - sent) / 1e6 - expect_delay_s * 1000)
    conn.send({"buckets": buckets, "errors": errors})


def _count_arrivals(sock: socket.socket) -> dict[int, int]:
    """Datagrams per 100 ms until 0.5 s of silence, read in batches (recvmmsg) so that the
    sink stays far cheaper than the proxy it measures; only the first bytes are copied."""
    from simulator.mmsg import DatagramReader

    reader = DatagramReader(64, 16)
    sock.setblocking(False)
    buckets: dict[int, int] = {}
    started = False
    idle_since = time.monotonic()
    while True:
        n = len(reader.recv(sock))
        now = time.monotonic()
        if n:
            started = True
            idle_since = now
            key = int(now * 10)
            buckets[key] = buckets.get(key, 0) + n
        elif now - idle_since > 0.5 and started:
            return buckets
        else:
            select.select([sock], [], [], 0.05)


def sender(
    cpus: set[int], port: int, size: int, rate: float, seconds: float, start_at: float
) -> None:
    """Offer ``rate`` datagrams/s (bursts every >= 0.5 ms; 0 = flat out) of ``size`` bytes."""
    _pin(cpus)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.connect(("127.0.0.1", port))
    pad = bytes(size - STAMP.size)
    interval = max(0.0005, 1.0 / rate) if rate > 0 else 0.0  # a burst every interval
    per_tick = max(1, round(rate * interval))
    while time.monotonic() < start_at:
        time.sleep(0.001)
    end = time.monotonic() + seconds
    if rate <= 0:  # as fast as it can: batches of 64 (sendmmsg + GSO), far cheaper than the proxy
        from simulator.mmsg import DatagramWriter

        writer = DatagramWriter()
        payloads = [bytes(size)] * 64
        while time.monotonic() < end:
            for _ in range(4):
                writer.send(sock, payloads)
        return
    tick = time.monotonic()
    send, stamp, clock = sock.send, STAMP.pack, time.monotonic_ns
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if now < tick:
            time.sleep(tick - now)  # not a spin: the sink may share this CPU
            continue
        tick += interval
        with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
            for _ in range(per_tick):
                send(stamp(clock()) + pad)


# -- the proxy process -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Proxy:
    """``squall link`` in a child process, with its control API."""

    def __init__(self, upstream: int, profile: str, profiles: Path | None, uvloop: bool) -> None:
        self.control = _free_port()
        cmd = [sys.executable, "-m", "simulator.linkcli", "--listen", "127.0.0.1:0"]
        cmd += ["--upstream", f"127.0.0.1:{upstream}", "--profile", profile]
        cmd += ["--control-port", str(self.control)]
        if profiles is not None:
            cmd += ["--profiles", str(profiles)]
        if not uvloop:
            cmd.append("--no-uvloop")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        banner = self.proc.stdout.readline()  # "squall link: 127.0.0.1:PORT -> ..."
        self.port = int(banner.split(" -> ")[0].rsplit(":", 1)[1])

    def pin(self, cpus: set[int]) -> None:
        if cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(self.proc.pid, cpus)

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.control}/status"
        with urllib.request.urlopen(url, timeout=5) as r:
            body: dict[str, Any] = json.load(r)
            return body

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> str:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return out.strip()


# -- the measurements ------------------------------------------------------------------------


def measure_throughput(size: int, seconds: float, uvloop: bool) -> dict[str, Any]:
    """Offer far more than the proxy can take; its forwarded rate in a steady window."""
    proxy_cpus, peer_cpus = _cpu_sets()
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    sink_proc = ctx.Process(target=sink, args=(child, peer_cpus, "count", 0.0))
    sink_proc.start()
    proxy = Proxy(parent.recv(), "lan", None, uvloop)
    proxy.pin(proxy_cpus)
    start_at = time.monotonic() + 0.3
    send_proc = ctx.Process(target=sender, args=(peer_cpus, proxy.port, size, 0, seconds, start_at))
    send_proc.start()
    time.sleep(0.3 + seconds * 0.3)  # warm up
    s0, c0, t0 = proxy.status(), proxy.cpu_seconds(), time.monotonic()
    time.sleep(seconds * 0.5)
    s1, c1, t1 = proxy.status(), proxy.cpu_seconds(), time.monotonic()
    send_proc.join()
    result = parent.recv()
    sink_proc.join()
    proxy.stop()
    wall = t1 - t0
    sent = s1["up"]["sent"] - s0["up"]["sent"]
    offered = (s1["up"]["packets"]["passed"] + s1["up"]["dropped"]) - (
        s0["up"]["packets"]["passed"] + s0["up"]["dropped"]
    )
    buckets = sorted(result["buckets"].items())[2:-2]  # steady part only
    sink_pps = statistics.median(n for _, n in buckets) * 10 if buckets else 0.0
    cpu = (c1 - c0) / wall
    return {
        "io": s1.get("io", ""),
        "pps": sent / wall,
        "offered_pps": offered / wall,
        "sink_pps": sink_pps,
        "cpu": cpu,
        "per_cpu_s": sent / (c1 - c0) if c1 > c0 else 0.0,
    }


def measure_delay(profile: str, delay_s: float, rate: float, seconds: float, uvloop: bool) -> Any:
    """Errors (ms) of arrival - send - ``delay_s`` at ``rate`` packets/s of 200 bytes."""
    proxy_cpus, peer_cpus = _cpu_sets()
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    sink_proc = ctx.Process(target=sink, args=(child, peer_cpus, "delay", delay_s))
    sink_proc.start()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(DELAY_PROFILES)
    try:
        proxy = Proxy(parent.recv(), profile, Path(f.name), uvloop)
        proxy.pin(proxy_cpus)
        start_at = time.monotonic() + 0.3
        send_proc = ctx.Process(
            target=sender, args=(peer_cpus, proxy.port, 200, rate, seconds, start_at)
        )
        send_proc.start()
        send_proc.join()
        result = parent.recv()
        sink_proc.join()
        proxy.stop()
    finally:
        os.unlink(f.name)
    errors: list[float] = result["errors"]
    return errors[len(errors) // 10 :]  # skip the first tenth (warm-up)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement (4)")
    parser.add_argument("--no-uvloop", action="store_true", help="asyncio's own event loop")
    args = parser.parse_args()
    uvloop = not args.no_uvloop
    out: dict[str, Any] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loop": "uvloop" if uvloop else "asyncio",
    }
    for size in (200, 1200):
        r = measure_throughput(size, args.seconds, uvloop)
        out[f"proxy_pps_{size}"] = round(r["pps"])
        out[f"proxy_pps_{size}_per_cpu_s"] = round(r["per_cpu_s"])
        out[f"proxy_cpu_{size}"] = round(r["cpu"], 2)
        out[f"offered_pps_{size}"] = round(r["offered_pps"])
        out[f"sink_pps_{size}"] = round(r["sink_pps"])
        out["proxy_io"] = r["io"]
    errors = measure_delay("fixed-50ms", 0.050, 20_000, args.seconds, uvloop)
    base = measure_delay("fixed-0ms", 0.0, 20_000, args.seconds, uvloop)
    slow = [abs(e) for e in measure_delay("fixed-50ms", 0.050, 200, args.seconds, uvloop)]
    out["delay_err_p50_ms"] = round(_pct([abs(e) for e in errors], 0.50), 3)
    out["delay_err_p99_ms"] = round(_pct([abs(e) for e in errors], 0.99), 3)
    out["delay_err_mean_ms"] = round(statistics.fmean(errors), 3) if errors else None
    out["delay_err_max_ms"] = round(max(map(abs, errors)), 3) if errors else None
    out["delay_samples"] = len(errors)
    out["baseline_0ms_p50_ms"] = round(_pct(base, 0.50), 3)
    out["baseline_0ms_p99_ms"] = round(_pct(base, 0.99), 3)
    out["delay_err_200pps_p50_ms"] = round(_pct(slow, 0.50), 3)
    out["delay_err_200pps_p99_ms"] = round(_pct(slow, 0.99), 3)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"machine: {out['platform']}, {out['cpus']} CPUs, Python {out['python']}")
    print(
        f"loop: {out['loop']}, proxy I/O {out['proxy_io']}; proxy pinned to one CPU, "
        "sender and sink on the others"
    )
    for size in (200, 1200):
        print(
            f"{size:>5} B: {out[f'proxy_pps_{size}']:>9,} pps forwarded at "
            f"{out[f'proxy_cpu_{size}']:.0%} CPU = {out[f'proxy_pps_{size}_per_cpu_s']:,} "
            f"per CPU-second (offered {out[f'offered_pps_{size}']:,}/s, "
            f"sink saw {out[f'sink_pps_{size}']:,}/s)"
        )
    print(
        f"delay 50 ms at 20,000 pps: |error| p50 {out['delay_err_p50_ms']} ms, "
        f"p99 {out['delay_err_p99_ms']} ms, max {out['delay_err_max_ms']} ms, "
        f"mean signed {out['delay_err_mean_ms']} ms ({out['delay_samples']} packets); "
        f"loopback path at 0 ms: p50 {out['baseline_0ms_p50_ms']} ms, "
        f"p99 {out['baseline_0ms_p99_ms']} ms"
    )
    print(
        f"delay 50 ms at 200 pps (each delivery waits for the timer): |error| p50 "
        f"{out['delay_err_200pps_p50_ms']} ms, p99 {out['delay_err_200pps_p99_ms']} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

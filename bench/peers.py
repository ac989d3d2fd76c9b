"""Peer benchmark: one telemetry workload through Squall, MQTT, NATS JetStream and HTTPS.

Run: ``.venv/bin/python bench/peers.py [--quick] [--json] [--systems ...] [--devices ...]``
(``make bench`` runs it with the defaults: ~20 min, half of it the 3g-poor part, which
``--bridge-records 0`` leaves out; ``--quick``: ~7 min).  It installs what it lacks
first: Debian ``mosquitto`` / ``nats-server`` (apt-get, as root) and the Python clients
(pip), saying so on stderr.

Each system runs in turn on loopback, encrypted, with device client certificates
(one throwaway CA for all, ``transport.certs``):

- **squall**: edge agents (on-disk spool, ``durability: batch``, shipped sender
  defaults) -> QUIC -> ``squall hub --config`` (durable SQLite log) -> a durable consumer
  (``hub.consumer.LogCursor`` over the hub's log file, in its own process);
- **mqtt**: Mosquitto with TLS, QoS 1 publishers, one QoS 1 subscriber in a persistent
  session; the broker is told to keep every queued message (``max_queued_messages 0``,
  1,000 in flight).  **mqtt_stock** is the same on Mosquitto's stock limits and shows
  what it drops (reported inside ``mqtt`` as ``stock``);
- **jetstream**: nats-server with JetStream (file storage) and TLS; publishes with
  acknowledgements (``publish_async``), one durable pull consumer with explicit acks;
- **https**: ``POST`` per record on keep-alive connections to a small aiohttp server
  whose in-memory queue the subscriber long-polls (the "REST queue").

Workload: P simulated devices (P = 1, 8, 100) publish ~190-byte GPS fixes
(``simulator.telemetry``) at least once, at most ``--window`` records unacknowledged per
device (HTTPS: one request at a time), and one subscriber receives everything.  Per
system and P, two runs, each on a fresh server: *saturated* (every device as fast as
its window allows, for ``--seconds``) and *fixed rate* (2,000 records/s over all
devices).  Measured:

- records/s end to end: distinct records received / (last receipt - first publish);
- server CPU s per 100,000 records: utime+stime of the server process (/proc) from the
  first publish until the subscriber has everything, over the distinct records received;
  the publishers' and the subscriber's CPU are reported beside it;
- p50/p99 publish-to-receive latency at the fixed rate (publish = the client call, so
  Squall's includes its 50 ms group commit and 1 s batching linger);
- wire bytes per record, device side: a relay process in front of the server's port
  counts the bytes both ways (TCP payload incl. TLS; UDP payload for QUIC), over the
  records the server acknowledged;
- received, unique, duplicates, lost (acknowledged to the publisher, never received).

Then a slow subscriber (1 ms per message) for ``--slow-seconds`` (20) while 100 devices
publish 3,000 records/s; afterwards it runs at full speed until it has caught up (or
received nothing for ``--stall`` s): records lost, the server's peak RSS, and whether
the publishers were slowed (achieved < 95% of 3,000/s).

Then the delivery test through ``squall link --bridge`` on ``3g-poor`` (needs root; the
devices live in the bridge's namespace a, server and subscriber in b): ``--bridge-devices``
(20) devices deliver ``--bridge-records`` (10,000) records as fast as the link takes
them; time from the first publish to the last receipt, lost, duplicated, and the frame
bytes per record the link carried (headers and retransmissions included).  Mosquitto's
stock config is left out there.

Processes: the server is pinned to the first CPU; publishers (``--procs`` processes),
the subscriber and the relay run as separate processes on every CPU (``--pin split``:
on the others only).  Fairness: every client is Python (paho-mqtt, nats-py, aiohttp,
Squall's own edge agent) on uvloop, while Mosquitto is C and nats-server Go; on a small
machine the Python clients, not the brokers, often set the end-to-end rate, and they
share cores with the server.  Mosquitto writes its persistence at an autosave interval,
JetStream's file store and Squall's log (``synchronous: normal``) do not fsync each
message either, and the HTTPS queue is memory only.  Squall's durable consumer decodes
the log in its own process, so that work is in the subscriber's CPU, not the hub's,
whereas a broker's delivery work is in its own.

``--json`` prints one object keyed by system (squall, mqtt, jetstream, https), each with
``records_per_s_p100``, ``server_cpu_s_per_100k`` (saturated, P = 100),
``server_cpu_s_per_100k_2k`` and ``latency_p99_ms_2k`` (2,000 records/s, P = 100),
``wire_bytes_per_record`` (saturated, P = 100), ``lost`` and ``duplicates`` (all runs
at saturation and fixed rate), then per-P details, client CPU, ``slow_*`` and
``bridge_*``; ``mqtt`` holds the stock-config run as ``stock``.  Every run's details
and a PNG plot (records/s and bytes per record per system) go to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # first: it puts the repo first on sys.path
    BenchError,
    apt_install,
    cpu_seconds,
    machine,
    machine_line,
    print_json,
    status_kb,
    watchdog,
)
from _peers_bridge import PROFILE as BRIDGE_PROFILE
from _peers_bridge import LinkBridge, bridge_name, server_address
from _peers_bridge import unavailable as bridge_unavailable
from _peers_clients import SUBSCRIBER, TENANT, Endpoint
from _peers_procs import Proc, start_publishers, start_relay, start_subscriber
from _peers_relay import ByteCounts
from _peers_results import (
    Run,
    bridge_seconds,
    find,
    publishers_slowed,
    system_summary,
    tally,
    targets,
)
from _peers_servers import start_server, version_of, which

from transport import certs

SYSTEMS = ("squall", "mqtt", "mqtt_stock", "jetstream", "https")
JSON_SYSTEMS = ("squall", "mqtt", "jetstream", "https")
LABELS = {
    "squall": "Squall",
    "mqtt": "MQTT QoS 1 (Mosquitto, no-drop config)",
    "mqtt_stock": "MQTT QoS 1 (Mosquitto, stock config)",
    "jetstream": "NATS JetStream",
    "https": "HTTPS POST (aiohttp)",
}
FIXED_RATE = 2000.0
SLOW_RATE = 3000.0
SLOW_DEVICES = 100
PY_DEPS = (
    ("paho", "paho-mqtt>=2.0,<3"),
    ("nats", "nats-py>=2.9,<3"),
    ("matplotlib", "matplotlib>=3.8,<4"),
)


# --- what the bench needs ----------------------------------------------------------------


def ensure_deps(systems: list[str]) -> None:
    """Install missing servers (apt) and Python clients (pip), saying so on stderr."""
    apt = []
    if {"mqtt", "mqtt_stock"} & set(systems) and which("mosquitto") is None:
        apt.append("mosquitto")
    if "jetstream" in systems and which("nats-server") is None:
        apt.append("nats-server")
    apt_install(apt, "bench/peers.py")
    if any(which(p) is None for p in apt):
        raise BenchError(f"cannot install {' '.join(apt)}: needs root and the Debian archive")
    pip = [pkg for mod, pkg in PY_DEPS if importlib.util.find_spec(mod) is None]
    if pip:
        print(f"bench/peers.py: installing Python packages {' '.join(pip)}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", *pip]
        if subprocess.run(cmd, check=False, stdout=sys.stderr).returncode != 0:
            raise BenchError(f"cannot pip install {' '.join(pip)}")
        importlib.invalidate_caches()


def client_versions() -> dict[str, str]:
    """Versions of the Python clients."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("paho-mqtt", "nats-py", "aiohttp", "aioquic", "uvloop"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


# --- one run ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """The load of one run."""

    mode: str  # saturated, rate, slow, bridge
    seconds: float  # publishing time (bridge: the bound)
    rate: float  # records/s over all devices (0: as fast as acknowledged)
    slow: float  # s of 1 ms per message at the subscriber
    count: int  # records per device (0: no limit)
    drain: float  # s to collect outstanding acknowledgements


class Bench:
    """Everything shared by the runs: options, the PKI, CPUs, where files go."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.bridge_why = None if args.bridge_records else "skipped (--bridge-records 0)"
        if self.bridge_why is None:
            self.bridge_why = bridge_unavailable()
        self.bridge_name = bridge_name()
        hosts = ["localhost", "127.0.0.1"]
        if self.bridge_why is None:
            hosts.append(server_address(self.bridge_name))
        self.pki = tmp / "pki"
        certs.init_dir(self.pki, hosts)
        names = device_names(max([*args.devices, SLOW_DEVICES, args.bridge_devices]))
        for name in [*names, SUBSCRIBER]:
            certs.issue_device(self.pki, TENANT, name)
        cpus = sorted(os.sched_getaffinity(0))
        self.server_cpus = {cpus[0]} if len(cpus) > 1 and args.pin != "none" else set()
        if args.pin == "split" and len(cpus) > 1:
            self.client_cpus = set(cpus[1:])
        else:
            self.client_cpus = set(cpus)
        self.runs: list[Run] = []
        self.errors: list[str] = []
        self.serial = 0

    def log(self, text: str) -> None:
        """Progress on stderr (stdout stays for the report or the JSON)."""
        print(text, file=sys.stderr, flush=True)

    def run(self, system: str, devices: int, mode: str) -> Run | None:
        """One run on a fresh server; None (and an error noted) when it could not be made."""
        a = self.args
        count, drain = 0, a.drain
        if mode == "saturated":
            seconds, rate, slow = a.seconds, 0.0, 0.0
        elif mode == "rate":
            seconds, rate, slow = a.seconds, FIXED_RATE, 0.0
        elif mode == "slow":
            seconds, rate, slow = a.slow_seconds, SLOW_RATE, a.slow_seconds
        else:  # "bridge": a fixed number of records as fast as the link takes them
            seconds, rate, slow = a.bridge_timeout, 0.0, 0.0
            count, drain = -(-a.bridge_records // devices), a.bridge_timeout
        self.serial += 1
        work = self.tmp / f"{self.serial:02d}-{system}-{mode}-p{devices}"
        self.log(f"  {system:10} P={devices:<3} {mode:9} ...")
        try:
            shape = Shape(mode, seconds, rate, slow, count, drain)
            if mode == "bridge":
                run = self._through_bridge(system, devices, shape, work)
            else:
                run = self._measure(system, devices, shape, work)
        except BenchError as exc:
            self.errors.append(f"{system} P={devices} {mode}: {exc}")
            self.log(f"    FAILED: {exc}")
            return None
        finally:
            if not a.keep:
                shutil.rmtree(work, ignore_errors=True)
        self.runs.append(run)
        t = run.tally
        self.log(
            f"    {fmt(run.records_per_s)} rec/s, CPU {fmt(run.server_cpu_s_per_100k, 2)} s/100k, "
            f"{fmt(run.wire_bytes_per_record, 1)} B/rec, p99 {fmt(run.latency_p99_ms, 1)} ms, "
            f"acked {run.acked:,} unique {t.unique:,} dup {t.duplicates:,} lost {t.lost:,}"
        )
        return run

    def _measure(self, system: str, devices: int, shape: Shape, work: Path) -> Run:
        a = self.args
        server = start_server(system, work, self.pki, self.server_cpus, python_uvloop=a.uvloop)
        procs: list[Proc] = []
        try:
            relay, relay_port = start_relay(server.kind, server.port, self.client_cpus)
            procs.append(relay)
            extra = {"log": server.extra.get("log", ""), "workdir": str(work)}
            sub_ep = Endpoint(system, server.port, str(self.pki), a.window, extra)
            sub = start_subscriber(sub_ep, self.client_cpus)
            procs.insert(0, sub)
            dev_ep = Endpoint(system, relay_port, str(self.pki), a.window, extra)
            names = device_names(devices)
            pubs = start_publishers(dev_ep, names, a.procs, self.client_cpus, 180)
            procs[:0] = pubs

            def wire() -> ByteCounts:
                return ByteCounts(**relay.ask("stats"))

            return self._go(system, devices, shape, server.pid, pubs, sub, wire)
        finally:
            for p in procs:
                p.stop()
            server.stop()

    def _through_bridge(self, system: str, devices: int, shape: Shape, work: Path) -> Run:
        """Devices in the bridge's namespace a, server and subscriber in b; no relay."""
        a = self.args
        bridge = LinkBridge(self.bridge_name, work)
        procs: list[Proc] = []
        server = None
        try:
            host, ns = bridge.host, bridge.ns_server
            server = start_server(
                system,
                work,
                self.pki,
                self.server_cpus,
                python_uvloop=a.uvloop,
                host=host,
                netns=ns,
            )
            extra = {"log": server.extra.get("log", ""), "workdir": str(work)}
            ep = Endpoint(system, server.port, str(self.pki), a.window, extra, host)
            procs.append(start_subscriber(ep, self.client_cpus, ns))
            names = device_names(devices)
            pubs = start_publishers(ep, names, a.procs, self.client_cpus, 300, bridge.ns_devices)
            procs[:0] = pubs
            return self._go(system, devices, shape, server.pid, pubs, procs[-1], bridge.counts)
        finally:
            for p in procs:
                p.stop()
            if server is not None:
                server.stop()
            bridge.stop()

    def _go(
        self,
        system: str,
        devices: int,
        shape: Shape,
        server_pid: int,
        pubs: list[Proc],
        sub: Proc,
        wire_counts: Callable[[], ByteCounts],
    ) -> Run:
        start_at = time.time() + 1.0
        sub.send("go", start_at + shape.slow if shape.slow else 0.0)
        stop_at = start_at + shape.seconds
        for p in pubs:
            p.send("go", start_at, stop_at, shape.rate / devices, shape.drain, shape.count)
        time.sleep(max(0.0, start_at - 0.02 - time.time()))  # idle before the start: not counted
        cpu0, sub0 = cpu_seconds(server_pid), cpu_seconds(sub.pid)
        pub0 = sum(cpu_seconds(p.pid) for p in pubs)
        wire0 = wire_counts()
        rss = [status_kb(server_pid)]
        reports: list[dict[str, Any]] = []
        for p in pubs:
            reports += self._wait(p, "done", shape.seconds + shape.drain + 60, server_pid, rss)
        acked = sum(r["acked"] for r in reports)
        self._catch_up(sub, acked, server_pid, rss)
        cpu1, sub1 = cpu_seconds(server_pid), cpu_seconds(sub.pid)
        pub1 = sum(cpu_seconds(p.pid) for p in pubs)
        wire = wire_counts().minus(wire0)
        rep = sub.ask("report", 120)
        expected = {
            r["name"]: (r["first_seq"], r["first_seq"] + r["published"] - 1) for r in reports
        }
        unacked = {r["name"]: r["unacked_seqs"] for r in reports}
        t = tally(expected, rep["seen"], rep["received"], rep["duplicates"], unacked)
        published = sum(r["published"] for r in reports)
        firsts = [r["first_publish"] for r in reports if r["first_publish"]]
        lasts = [r["last_publish"] for r in reports if r["last_publish"]]
        notes = []
        retries = sum(p.retries for p in pubs)
        if retries:
            notes.append(f"{retries} device connections needed a second try")
        errors = sum(r["errors"] for r in reports)
        if errors:
            notes.append(f"{errors} publish errors")
        if published > acked:
            notes.append(f"{published - acked} published records never acknowledged")
        if t.unexpected:
            notes.append(f"{t.unexpected} received that were never acknowledged")
        span = shape.seconds if shape.count == 0 else max(lasts, default=0) - min(firsts, default=0)
        return Run(
            system=system,
            devices=devices,
            mode=shape.mode,
            target_rate=shape.rate,
            publish_s=shape.seconds,
            published=published,
            acked=acked,
            unacked=published - acked,
            first_publish=min(firsts) if firsts else 0.0,
            tally=t,
            last_recv=float(rep["last_recv"]),
            server_cpu_s=cpu1 - cpu0,
            server_rss_max_kb=max(rss),
            wire_up_bytes=wire.up_bytes,
            wire_down_bytes=wire.down_bytes,
            wire_up_chunks=wire.up_chunks,
            wire_down_chunks=wire.down_chunks,
            latency_p50_ms=rep["latency_ms"]["p50"],
            latency_p99_ms=rep["latency_ms"]["p99"],
            subscriber_cpu_s=sub1 - sub0,
            publisher_cpu_s=pub1 - pub0,
            publish_rate=published / span if span > 0 else 0.0,
            notes=notes,
        )

    def _wait(self, p: Proc, kind: str, timeout: float, server_pid: int, rss: list[int]) -> Any:
        """``p``'s next ``kind`` payload, sampling the server's RSS meanwhile."""
        deadline = time.monotonic() + timeout
        while not p.conn.poll(0.2):
            with contextlib.suppress(OSError, BenchError):
                rss.append(status_kb(server_pid))
            if time.monotonic() > deadline:
                break
        return p.expect(kind, max(1.0, deadline - time.monotonic()))

    def _catch_up(self, sub: Proc, acked: int, server_pid: int, rss: list[int]) -> None:
        """Until the subscriber has ``acked`` distinct records, or got nothing for --stall s."""
        stall = self.args.stall
        last_unique, since = -1, time.monotonic()
        deadline = time.monotonic() + self.args.catch_up
        while time.monotonic() < deadline:
            _received, unique, _last = sub.ask("progress")
            with contextlib.suppress(OSError, BenchError):
                rss.append(status_kb(server_pid))
            if unique >= acked:
                return
            if unique != last_unique:
                last_unique, since = unique, time.monotonic()
            elif time.monotonic() - since > stall:
                return
            time.sleep(0.1)


def device_names(n: int) -> list[str]:
    """dev-000, dev-001, ..."""
    return [f"dev-{i:03d}" for i in range(n)]


def fmt(value: float | None, digits: int = 0) -> str:
    """A figure for the tables ("-" when missing)."""
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


# --- the plan -----------------------------------------------------------------------------


def run_all(b: Bench) -> None:
    """The loopback matrix, then the slow subscriber."""
    a = b.args
    for system in a.systems:
        b.log(f"{LABELS[system]}:")
        for p in a.devices:
            b.run(system, p, "saturated")
            if not a.skip_rate:
                b.run(system, p, "rate")
    if a.slow_seconds > 0:
        b.log("slow subscriber:")
        for system in a.systems:
            b.run(system, SLOW_DEVICES, "slow")
    if b.bridge_why is None:
        b.log(f"through squall link --bridge on {BRIDGE_PROFILE}:")
        for system in bridge_systems(a):
            b.run(system, a.bridge_devices, "bridge")
    else:
        b.log(f"through squall link --bridge: not run: {b.bridge_why}")


def bridge_systems(a: argparse.Namespace) -> list[str]:
    """The systems the bridge test runs (Mosquitto's stock config only on loopback)."""
    return [s for s in a.systems if s != "mqtt_stock"]


def summary(b: Bench) -> dict[str, Any]:
    """The ``--json`` object."""
    top = max(b.args.devices)
    out: dict[str, Any] = {}
    for system in JSON_SYSTEMS:
        if system not in b.args.systems:
            continue
        s = system_summary(b.runs, system, top)
        s["server"] = version_of(system)
        if system == "mqtt" and "mqtt_stock" in b.args.systems:
            s["stock"] = system_summary(b.runs, "mqtt_stock", top)
        out[system] = s
    if top != 100:
        for s in out.values():
            s.setdefault("records_per_s_p100", None)
    return out


def report(b: Bench, out: dict[str, Any], m: dict[str, Any]) -> None:
    """The human-readable tables."""
    a = b.args
    print(machine_line(m))
    print("clients: " + ", ".join(f"{k} {v}" for k, v in client_versions().items()))
    for system in a.systems:
        print(f"{system}: {version_of(system)}")
    print(
        f"\nloopback, TLS everywhere; window {a.window} unacknowledged records per device; "
        f"{a.seconds:g} s per run; fixed rate {FIXED_RATE:,.0f} records/s over all devices"
    )
    head = (
        f"{'system':11} {'P':>3} {'rec/s':>9} {'CPU/100k':>9} {'@2k':>7} "
        f"{'p50@2k':>8} {'p99@2k':>8} {'B/rec':>7} {'@2k':>7} {'received':>9} "
        f"{'unique':>9} {'dup':>6} {'lost':>7}"
    )
    print(head)
    for system in a.systems:
        for p in a.devices:
            s, r = find(b.runs, system, "saturated", p), find(b.runs, system, "rate", p)
            recv = (s.tally.received if s else 0) + (r.tally.received if r else 0)
            uniq = (s.tally.unique if s else 0) + (r.tally.unique if r else 0)
            dup = (s.tally.duplicates if s else 0) + (r.tally.duplicates if r else 0)
            lost = (s.tally.lost if s else 0) + (r.tally.lost if r else 0)
            print(
                f"{system:11} {p:>3} {fmt(s.records_per_s if s else None):>9} "
                f"{fmt(s.server_cpu_s_per_100k if s else None, 2):>9} "
                f"{fmt(r.server_cpu_s_per_100k if r else None, 2):>7} "
                f"{fmt(r.latency_p50_ms if r else None, 1):>8} "
                f"{fmt(r.latency_p99_ms if r else None, 1):>8} "
                f"{fmt(s.wire_bytes_per_record if s else None, 1):>7} "
                f"{fmt(r.wire_bytes_per_record if r else None, 1):>7} {recv:>9,} {uniq:>9,} "
                f"{dup:>6,} {lost:>7,}"
            )
    top = max(a.devices)
    print(f"\nclient side, saturated, P = {top}: CPU s per 100k records")
    for system in a.systems:
        s = find(b.runs, system, "saturated", top)
        if s is not None:
            print(
                f"  {system:11} publishers {fmt(s.per_100k(s.publisher_cpu_s), 2):>7}   "
                f"subscriber {fmt(s.per_100k(s.subscriber_cpu_s), 2):>7}   "
                f"server {fmt(s.server_cpu_s_per_100k, 2):>7}"
            )
    slow = [r for r in b.runs if r.mode == "slow"]
    if slow:
        print(
            f"\nslow subscriber: 1 ms per message for {a.slow_seconds:g} s, {SLOW_DEVICES} devices "
            f"at {SLOW_RATE:,.0f} records/s, then full speed until caught up"
        )
        print(
            f"{'system':11} {'acked':>8} {'lost':>8} {'dup':>6} {'server RSS max':>15} "
            f"{'publish rate':>13} slowed"
        )
        for r in slow:
            print(
                f"{r.system:11} {r.acked:>8,} {r.tally.lost:>8,} {r.tally.duplicates:>6,} "
                f"{r.server_rss_max_kb / 1024:>12.1f} MB {r.publish_rate:>13,.0f} "
                f"{'yes' if publishers_slowed(r) else 'no'}"
            )
    bridged = [r for r in b.runs if r.mode == "bridge"]
    if bridged:
        print(
            f"\nthrough squall link --bridge on {BRIDGE_PROFILE}: {a.bridge_records:,} records "
            f"from {a.bridge_devices} devices, as fast as the link takes them"
        )
        print(
            f"{'system':11} {'acked':>8} {'unique':>8} {'lost':>6} {'dup':>6} "
            f"{'time to deliver':>16} {'link B/rec':>11}"
        )
        for r in bridged:
            took = bridge_seconds(r)
            print(
                f"{r.system:11} {r.acked:>8,} {r.tally.unique:>8,} {r.tally.lost:>6,} "
                f"{r.tally.duplicates:>6,} {fmt(took, 1) + ' s' if took else 'not all':>16} "
                f"{fmt(r.wire_bytes_per_record, 1):>11}"
            )
        print("  (link bytes: whole frames both ways, headers and retransmissions included)")
    elif b.bridge_why:
        print(f"\nthrough squall link --bridge: not run: {b.bridge_why}")
    print("\ntargets (ratios from this run):")
    for what, value, ok in targets(out):
        print(f"  {what:52} {fmt(value, 2):>7}  {'✔' if ok else '✘'}")
    print(
        "\ncaveats: all clients are Python (paho-mqtt, nats-py, aiohttp, Squall's edge agent) "
        "while Mosquitto is C and nats-server Go; on a small machine the clients, not the "
        "brokers, may set the end-to-end rate.  Mosquitto persists at its autosave interval, "
        "JetStream and Squall's log do not fsync per message, the HTTPS queue is memory only.  "
        "Squall's consumer decodes the log in its own process (subscriber CPU), a broker's "
        "delivery work is in the server's CPU.  Loopback bytes are TCP/UDP payload (TLS/QUIC "
        "included, IP/TCP/UDP headers not); HTTPS sends one request at a time per device."
    )
    for e in b.errors:
        print(f"ERROR: {e}")


def plot(b: Bench, path: Path) -> Path | None:
    """records/s per system and P, and wire bytes per record per system, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [s for s in b.args.systems if find(b.runs, s, "saturated", max(b.args.devices))]
    if not systems:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(b.args.devices))
    for i, p in enumerate(b.args.devices):
        vals = []
        for s in systems:
            r = find(b.runs, s, "saturated", p)
            vals.append((r.records_per_s or 0.0) if r else 0.0)
        xs = [j + (i - (len(b.args.devices) - 1) / 2) * width for j in range(len(systems))]
        ax1.bar(xs, vals, width, label=f"P = {p}")
    ax1.set_xticks(range(len(systems)), systems)
    ax1.set_ylabel("records/s end to end (saturated)")
    ax1.legend()
    top = max(b.args.devices)
    for k, (mode, label) in enumerate((("saturated", "saturated"), ("rate", "2,000 rec/s"))):
        vals = []
        for s in systems:
            r = find(b.runs, s, mode, top)
            vals.append((r.wire_bytes_per_record or 0.0) if r else 0.0)
        ax2.bar([j + (k - 0.5) * 0.4 for j in range(len(systems))], vals, 0.4, label=label)
    ax2.set_xticks(range(len(systems)), systems)
    ax2.set_ylabel(f"wire bytes per record, device side (P = {top})")
    ax2.legend()
    fig.suptitle("bench/peers.py: loopback, TLS, one subscriber")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs (development, CI)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated")
    ap.add_argument("--devices", default="1,8,100", help="device counts P (1,8,100)")
    ap.add_argument("--seconds", type=float, default=10.0, help="publishing time per run (10)")
    ap.add_argument("--slow-seconds", type=float, default=20.0, help="slow subscriber (20; 0 off)")
    ap.add_argument("--skip-rate", action="store_true", help="no fixed-rate runs")
    ap.add_argument("--window", type=int, default=1000, help="unacked records per device")
    ap.add_argument("--procs", type=int, default=4, help="publisher processes (4)")
    ap.add_argument("--drain", type=float, default=60.0, help="max s to collect acks (60)")
    ap.add_argument("--stall", type=float, default=10.0, help="s without receipts = done (10)")
    ap.add_argument("--catch-up", type=float, default=300.0, help="max s to catch up (300)")
    ap.add_argument("--bridge-records", type=int, default=10_000, help="0: no bridge test")
    ap.add_argument("--bridge-devices", type=int, default=20, help="(20)")
    ap.add_argument("--bridge-timeout", type=float, default=600.0, help="per system, s (600)")
    ap.add_argument("--pin", choices=["server", "split", "none"], default="server")
    ap.add_argument("--uvloop", action="store_true", help="run the Python servers on uvloop")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs (configs, logs)")
    args = ap.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    args.devices = sorted({int(x) for x in args.devices.split(",")})
    if args.quick:
        args.seconds, args.slow_seconds, args.stall = 3.0, 5.0, 5.0
        args.bridge_records, args.bridge_timeout = min(args.bridge_records, 1000), 240.0
    if args.window < 1 or args.procs < 1 or min(args.devices) < 1:
        ap.error("--window, --procs and --devices must be positive")
    return args


def bound_s(a: argparse.Namespace) -> float:
    """The watchdog's bound for the whole bench."""
    runs = len(a.systems) * len(a.devices) * (1 if a.skip_rate else 2)
    per_run = a.seconds + 90 + a.stall
    slow = len(a.systems) * (a.slow_seconds * 3 + 120 + a.stall) if a.slow_seconds else 0
    bridge = len(bridge_systems(a)) * (2 * a.bridge_timeout + 500) if a.bridge_records else 0
    return float(120 + runs * per_run + slow + bridge)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        ensure_deps(a.systems)
    except BenchError as exc:
        print(f"bench/peers.py: {exc}", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="squall-peers-"))
    try:
        with watchdog(bound_s(a)):
            b = Bench(a, tmp)
            run_all(b)
    except BenchError as exc:
        print(f"bench/peers.py: {exc}", file=sys.stderr)
        return 1
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    m = machine()
    out = summary(b)
    details = {
        "machine": m,
        "clients": client_versions(),
        "servers": {s: version_of(s) for s in a.systems},
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "summary": out,
        "runs": [r.row() for r in b.runs],
        "errors": b.errors,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "peers.json").write_text(json.dumps(details, indent=1) + "\n")
    png = plot(b, a.out / "peers.png")
    if a.json:
        print_json(out)
    else:
        report(b, out, m)
        print(f"\ndetails: {a.out / 'peers.json'}; plot: {png}")
    return 1 if b.errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""Scale-out benchmark: hub CPU per 100,000 committed records, SQLite log vs JetStream log,
one hub process vs two.

Run: ``.venv/bin/python bench/scaleout.py [--quick] [--json]``.

**Whole hubs under real edge load** (the issue 7 figures).  ``squall hub`` processes
(what ``python -m transport.cli hub`` runs) pinned to the first CPU; ``--devices``
devices (100) in ``--procs`` load processes (4) pinned to the other CPU, as in
bench/hub_ingest.py: real QUIC, TLS 1.3 and device certificates, each device sending
an endless stream of GPS fixes in 100-record batches (encoded once, replayed with
advancing seqs) as fast as CREDIT and a 2,000-record window allow.  After a warm-up,
each hub's ``squall_hub_records_committed_total`` and utime+stime are read at the
start and end of a steady window:

- ``cpu_s_per_100k_sqlite``: one hub, ``log.backend: sqlite`` (the shipped defaults);
- ``cpu_s_per_100k_jetstream_1hub`` / ``records_per_s_jetstream_1hub``: one hub,
  ``log.backend: jetstream`` against a real ``nats-server -js`` (file storage, a temp
  dir, ``max_payload: 2MB``) started here and pinned to the other CPU;
- ``cpu_s_per_100k_jetstream_2hubs``: two hub processes on that stream, each device
  sending to its home hub by rendezvous placement (``edge.placement``) -- the sum of
  both hubs' CPU over the sum of what they committed.  Both share the first CPU: this
  machine has 2 cores, so per-record cost, not wall throughput, shows whether scaling
  out is free.

``--rate R`` offers each hub the same load instead: every device sends R records/s (in
full 100-record batches), and each hub gets ``--devices`` devices of its own (names are
drawn until rendezvous places that many on each; ``--procs`` must divide ``--devices``),
so the two-hub run has twice the devices and twice the records of the one-hub runs.  Flat
out, two hubs on one core are two saturated processes taking turns; at a set rate neither
is saturated and the per-record cost is compared at the same per-hub load.  ``--spread`` puts the
second hub on the other CPU (beside the load and nats-server) instead of beside the
first; ``per_hub_cpu_s_per_100k_jetstream_2hubs`` gives each hub's own figure.

``--matched`` (with ``--rate``) asks what the second hub costs apart from where it has to
run: the two hubs on different CPUs (as ``--spread``), and the one-hub figure they are
compared with measured in both of those places, one hub at a time (``jetstream_1hub`` on
the first CPU, ``jetstream_1hub_beside_load`` on the other, beside the load processes and
nats-server); ``cpu_s_per_100k_jetstream_1hub_matched`` is the two together per record and
``two_hubs_over_one`` is taken against it.

``--instructions`` (with ``--rate``) runs every hub under valgrind's callgrind and counts
the instructions it executes per committed record (``instructions_per_record_*``,
``two_hubs_over_one_instructions``, ``jetstream_over_sqlite_instructions``).  CPU seconds
on this 2-core machine move by +-15% between runs of one configuration, with the load,
nats-server and the hubs taking turns on the cores; a count of instructions does not
depend on who else runs.  What still moves it is timing the hubs react to (how many
records a commit group gathers), so it is a few per cent, not zero.  It is the hub's
user-space instructions only: the kernel's work for its sockets is not counted.  The
devices are paused and every batch sent is acknowledged before the count is zeroed and
again before it is read, so the window holds the hub's work for its records from their
first datagram to their commit ACK (and a second or more of idle timers); a device that
reconnects in the window fails the run.  A hub under callgrind runs ~50x slower, so the
rate must be low (``--rate 50 --devices 20``: 1,000 records/s per hub); valgrind is
installed if missing.

``nats_server_cpu_s_per_100k_*`` is what the JetStream server spent meanwhile on its
own core (not the hub's, but a machine's).  Targets: JetStream within 1.3x of SQLite's
per-record hub CPU; two hubs no more per record than one.

**The log alone** (``log_cpu_s_per_100k_sqlite``, ``log_cpu_s_per_100k_jetstream``):
the same batches handed straight to ``hub.log.Log.append_group`` and
``hub.jslog.JetStreamLog.append_group`` in this process (groups of ``--group`` batches,
one in flight), so the difference the backend makes is seen without QUIC around it.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _common import (
    BenchError,
    Hub,
    apt_install,
    cpu_seconds,
    cpu_split,
    die_with_parent,
    free_port,
    machine,
    machine_line,
    make_pki,
    pin,
    print_json,
    raise_fd_limit,
    watchdog,
    write_hub_config,
)
from hub_ingest import HANDSHAKES_IN_FLIGHT, Load, Workers, install_replay, total

# hub_ingest put bench/ first again, where bench/edge.py would shadow the edge package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge.placement import home_hub
from hub.jslog import JetStreamLog, JetStreamSettings
from hub.log import Log, PendingBatch
from simulator.telemetry import Drive
from transport.batchcodec import Record, encode_batch

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
CALLGRIND = shutil.which("valgrind") or "/usr/bin/valgrind"
TARGET_RATIO = 1.3  # issue 7: JetStream within 1.3x of SQLite's per-record hub CPU
COMMITTED = "squall_hub_records_committed_total"
COMMITS = "squall_hub_commits_total"


def device_batches(devices: int, size: int) -> list[tuple[str, int, bytes]]:
    """(device, codec, payload) per device: one encoded batch of ``size`` GPS fixes."""
    out = []
    for d in range(devices):
        name = f"truck-{d:04d}"
        drive = Drive(random.Random(d))
        records = [
            Record(
                seq,
                1_700_000_000_000_000 + seq * 1_000_000,
                f"acme.{name}.telemetry.gps",
                {"fix": "3d"},
                drive.step(),
            )
            for seq in range(1, size + 1)
        ]
        codec, payload = encode_batch(records)
        out.append((name, codec, payload))
    return out


def groups(
    templates: list[tuple[str, int, bytes]], size: int, group: int, total: int
) -> list[list[PendingBatch]]:
    """Groups of ``group`` batches, round-robin over devices, ``total`` records in all."""
    next_seq = dict.fromkeys((t[0] for t in templates), 1)
    batches: list[PendingBatch] = []
    i = 0
    while len(batches) * size < total:
        name, codec, payload = templates[i % len(templates)]
        first = next_seq[name]
        next_seq[name] = first + size
        batches.append(
            PendingBatch(
                "acme",
                name,
                1,
                1,
                None,
                codec,
                payload,
                int(time.time() * 1e6),
                first,
                first + size - 1,
                size,
            )
        )
        i += 1
    return [batches[k : k + group] for k in range(0, len(batches), group)]


def measure_sqlite(work: list[list[PendingBatch]], tmp: Path) -> dict[str, Any]:
    log = Log(tmp / "hub.db", synchronous="normal")
    try:
        warm, rest = work[:5], work[5:]
        for g in warm:
            log.append_group(g, time.time())
        records = sum(b.count for g in rest for b in g)
        c0, t0 = time.process_time(), time.perf_counter()
        for g in rest:
            log.append_group(g, time.time())
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    finally:
        log.close()
    return {
        "log_cpu_s_per_100k_sqlite": round(cpu / records * 1e5, 3),
        "log_records_per_s_sqlite": int(records / wall),
    }


def _child_setup(cpus: set[int]) -> None:
    die_with_parent()
    pin(cpus)


class NatsServer:
    """nats-server with JetStream in ``root``, on a free loopback port, pinned to ``cpus``.

    ``max_payload: 2MB`` as the README recipe says: a hub with the default 1 MiB
    ``limits.max_frame_bytes`` refuses to start on the server's 1 MiB default.
    """

    def __init__(self, root: Path, cpus: set[int]) -> None:
        self.port = free_port(socket.SOCK_STREAM)
        self.url = f"nats://127.0.0.1:{self.port}"
        (root / "js").mkdir()
        (root / "nats.conf").write_text("max_payload: 2MB\n")
        argv = [NATS_SERVER, "-js", "-sd", str(root / "js"), "-c", str(root / "nats.conf")]
        self.proc = subprocess.Popen(
            [*argv, "-a", "127.0.0.1", "-p", str(self.port)],
            stdout=(root / "nats.log").open("wb"),
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: _child_setup(cpus),
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"nats-server exited, see {root / 'nats.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise BenchError("nats-server did not start in 20 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _jetstream_run(
    work: list[list[PendingBatch]], settings: JetStreamSettings, server_pid: int
) -> dict[str, Any]:
    log = JetStreamLog(settings)
    await log.open()
    try:
        warm, rest = work[:5], work[5:]
        for g in warm:
            await log.append_group(g, time.time())
        records = sum(b.count for g in rest for b in g)
        s0 = cpu_seconds(server_pid)
        c0, t0 = time.process_time(), time.perf_counter()
        for g in rest:
            await log.append_group(g, time.time())
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        server_cpu = cpu_seconds(server_pid) - s0
        want = sum(b.count for g in work for b in g)
        if log.stats.records != want:
            raise BenchError(f"JetStream stored {log.stats.records} records, not {want}")
    finally:
        await log.close()
    return {
        "log_cpu_s_per_100k_jetstream": round(cpu / records * 1e5, 3),
        "log_records_per_s_jetstream": int(records / wall),
        "log_nats_server_cpu_s_per_100k": round(server_cpu / records * 1e5, 3),
    }


def measure_jetstream_log(work: list[list[PendingBatch]], server: NatsServer) -> dict[str, Any]:
    settings = JetStreamSettings(servers=[server.url], stream="SQUALLBENCH", max_bytes=-1)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dev dependency
        runner = asyncio.run
    return dict(runner(_jetstream_run(work, settings, server.proc.pid)))


# --- whole hubs under real edge load -----------------------------------------------------


class PlacedLoad(Load):
    """bench/hub_ingest.py's load process, each device sending to its rendezvous home hub."""

    def __init__(self, conn: Connection, worker: int, plan: dict[str, Any]) -> None:
        super().__init__(conn, worker, plan)
        self.hub_ports = {f"127.0.0.1:{p}": int(p) for p in plan["ports"]}
        self.homes = list(self.hub_ports)
        # at a set rate every hub gets the same number of devices (the one-hub run's
        # load each): names are drawn until each hub has its share by rendezvous
        self.even = float(plan.get("rate", 0.0)) > 0
        self.per_home: dict[str, int] = dict.fromkeys(self.homes, 0)
        self.candidate = 0

    def device_name(self, i: int) -> str:
        if not self.even:
            return super().device_name(i)
        share = min(self.per_home.values())
        while True:
            name = f"load{self.worker}-{self.candidate:05d}"
            self.candidate += 1
            home = home_hub(self.homes, name)
            if self.per_home[home] == share:
                self.per_home[home] += 1
                return name

    async def _handshake(self, d: Any, timeout: float) -> bool:
        # Load._handshake reads self.port before its first await: set it per device
        self.port = self.hub_ports[home_hub(list(self.hub_ports), d.name)]
        return bool(await super()._handshake(d, timeout))


def placed_load_main(conn: Connection, worker: int, plan: dict[str, Any]) -> None:
    """Entry point of a load process (forked), as hub_ingest.load_main with placement."""
    die_with_parent()
    pin(set(plan["cpus"]))
    raise_fd_limit()
    install_replay()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.run(PlacedLoad(conn, worker, plan).run())


class PlacedWorkers(Workers):
    """The load processes of hub_ingest.Workers, running PlacedLoad."""

    def __init__(self, n: int, plan: dict[str, Any]) -> None:
        ctx = mp.get_context("fork")
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=placed_load_main, args=(child, i, plan), daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self.gather("hello", 30)


def callgrind_argv(directory: Path) -> list[str]:
    """valgrind's callgrind before a hub: it counts the instructions the hub executes.

    Counted instructions do not depend on what else the machine runs or how the
    scheduler slices the CPUs, which the CPU seconds of two hubs on two shared cores
    do.  Collection starts with the hub but is zeroed at the window's start.
    """
    return [
        CALLGRIND,
        "--tool=callgrind",
        "--quiet",
        f"--callgrind-out-file={directory / 'callgrind.out'}",
    ]


def callgrind_control(what: str, pid: int) -> None:
    """``callgrind_control --zero|--dump PID``; BenchError if it fails.

    callgrind_control prints "OK." whatever vgdb answered, so a failure shows only in what
    vgdb printed on stderr.
    """
    tool = shutil.which("callgrind_control") or "/usr/bin/callgrind_control"
    try:
        r = subprocess.run([tool, what, str(pid)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"callgrind_control {what} {pid}: no answer in 120 s") from exc
    sent = f"sending command {what.lstrip('-')} to pid {pid}"
    if r.returncode != 0 or "OK" not in r.stdout or sent not in r.stderr or "error" in r.stderr:
        raise BenchError(f"callgrind_control {what} {pid} failed: {r.stdout}{r.stderr}")


def callgrind_dump(hub: Hub) -> int:
    """Dump ``hub``'s counters; the instructions executed since they were last zeroed.

    That is the dump's closing ``totals:`` line, the sum of every cost line in it (and
    written last, so a dump still being written is not read).  The header's ``summary:``
    is not: in a dump taken mid-run it is less than the sum of the cost lines (1.9M
    against 14.3M for two idle seconds of a hub, seen with valgrind 3.19).
    """
    before = set(hub.files.config.parent.glob("callgrind.out.*"))
    callgrind_control("--dump", hub.pid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = set(hub.files.config.parent.glob("callgrind.out.*")) - before
        for path in new:
            for line in reversed(path.read_text(errors="replace").splitlines()):
                if line.startswith("totals:"):
                    return int(line.split()[1])
        time.sleep(0.2)
    raise BenchError(f"no callgrind dump of hub {hub.pid} within 60 s")


def drained(workers: Workers, timeout: float = 300.0) -> dict[str, int]:
    """After a pause: until no live session has a record on the wire unacknowledged and
    the acknowledged count has stood still for a second; returns the load's counters."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        workers.send("stats")
        stats = workers.gather("stats", 30)
        acked, unacked = total(stats, "acked"), total(stats, "unacked")
        now = time.monotonic()
        if acked != last:
            last, since = acked, now
        elif unacked == 0 and now - since >= 1.0:
            return {k: total(stats, k) for k in ("acked", "up", "lost_after_up")}
        time.sleep(0.5)
    raise BenchError(f"the hubs did not acknowledge every batch sent within {timeout:.0f} s")


def measure_hubs(
    args: argparse.Namespace,
    tmp: Path,
    pki: Path,
    placement: list[set[int]],
    server: NatsServer | None,
    stream: str,
) -> dict[str, Any]:
    """Committed records and CPU of one hub process per entry of ``placement`` (the CPUs
    each is pinned to) over a steady window."""
    _, load_cpus = cpu_split()
    n_hubs = len(placement)
    hubs: list[Hub] = []
    workers: PlacedWorkers | None = None
    try:
        for i in range(n_hubs):
            d = tmp / f"hub{i}"
            d.mkdir()
            over: dict[str, Any] = {}
            if server is not None:
                over = {
                    "log": {"backend": "jetstream"},
                    "jetstream": {
                        "servers": [server.url],
                        "stream": stream,
                        "subject_prefix": f"{stream.lower()}.log",  # streams may not overlap
                        "max_bytes": -1,
                    },
                    "name": f"hub{i}",
                }
            wrapper = callgrind_argv(d) if args.instructions else None
            hubs.append(Hub(write_hub_config(d, pki, **over), placement[i], d, wrapper=wrapper))
        for h in hubs:
            h.wait_ready(600 if args.instructions else 30)
        ports = [h.files.udp_port for h in hubs]
        plan = {
            "port": ports[0],
            "ports": ports,
            "pki": str(pki),
            "cpus": sorted(load_cpus),
            "replay": True,
            "in_flight": HANDSHAKES_IN_FLIGHT,
        }
        plan["rate"] = args.rate
        # flat out, the devices share the hubs; at a set rate each hub gets --devices of
        # its own, so every configuration offers each hub the same load
        devices = args.devices * (n_hubs if args.rate > 0 else 1)
        per_proc = devices // args.procs
        workers = PlacedWorkers(args.procs, plan)
        slow = 10 if args.instructions else 1  # a hub under callgrind is ~50x slower
        workers.send("connect", per_proc, 60.0 * slow)
        up = total(workers.gather("connected", 90 * slow), "up")
        if up != per_proc * args.procs:
            raise BenchError(f"only {up} of {per_proc * args.procs} devices connected")
        workers.send("go")
        time.sleep(args.warmup)
        for h in hubs:
            h.check_alive()
        before: dict[str, int] = {}
        if args.instructions:
            # the records of the window, from their first datagram to their commit ACK,
            # and no others: paused and drained at both ends
            workers.send("pause")
            before = drained(workers)
        g0 = [h.metrics() for h in hubs]
        m0 = [g.get(COMMITTED, 0.0) for g in g0]
        if args.instructions:
            for h in hubs:
                callgrind_control("--zero", h.pid)
            workers.send("go")
        c0 = [cpu_seconds(h.pid) for h in hubs]
        s0 = cpu_seconds(server.proc.pid) if server is not None else 0.0
        t0 = time.monotonic()
        time.sleep(args.window)
        if args.instructions:
            workers.send("pause")
            after = drained(workers)
            if (after["up"], after["lost_after_up"]) != (before["up"], before["lost_after_up"]):
                # a new handshake would count millions of instructions in the window
                raise BenchError(f"devices reconnected during the window: {before} -> {after}")
        c1 = [cpu_seconds(h.pid) for h in hubs]
        s1 = cpu_seconds(server.proc.pid) if server is not None else 0.0
        t1 = time.monotonic()
        instructions = [callgrind_dump(h) for h in hubs] if args.instructions else []
        g1 = [h.metrics() for h in hubs]
        m1 = [g.get(COMMITTED, 0.0) for g in g1]
        workers.send("pause")
        workers.stop()
        workers = None
        for h in hubs:
            h.stop_clean(60)
    finally:
        if workers is not None:
            workers.stop()
        for h in hubs:
            h.stop()
    per_hub = [b - a for a, b in zip(m0, m1, strict=True)]
    committed = sum(per_hub)
    if committed <= 0:
        raise BenchError(f"{n_hubs} hub(s) committed nothing in the window")
    cpu = sum(c1) - sum(c0)
    commits = sum(b.get(COMMITS, 0.0) - a.get(COMMITS, 0.0) for a, b in zip(g0, g1, strict=True))

    def datagrams(direction: str) -> float:
        key = f"squall_hub_udp_datagrams_total{{direction={direction}}}"
        return sum(b.get(key, 0.0) - a.get(key, 0.0) for a, b in zip(g0, g1, strict=True))

    extra: dict[str, Any] = {}
    if instructions:
        extra = {
            "instructions": sum(instructions),
            "instructions_per_record": round(sum(instructions) / committed),
            "per_hub_instructions_per_record": [
                round(n / max(1.0, r)) for n, r in zip(instructions, per_hub, strict=True)
            ],
        }
    return {
        **extra,
        "cpu_s": cpu,
        "committed": committed,
        "cpu_s_per_100k": round(cpu / committed * 1e5, 3),
        "records_per_s": round(committed / (t1 - t0)),
        "per_hub_records": [int(x) for x in per_hub],
        "per_hub_cpu_s_per_100k": [
            round((b - a) / max(1.0, r) * 1e5, 3) for a, b, r in zip(c0, c1, per_hub, strict=True)
        ],
        "hub_cpu_util": round(cpu / (t1 - t0), 2),  # summed over the hubs (they share one CPU)
        "records_per_commit": round(committed / commits) if commits else None,
        "datagrams_in_per_100_records": round(datagrams("in") / committed * 100, 2),
        "datagrams_out_per_100_records": round(datagrams("out") / committed * 100, 2),
        "nats_cpu_s_per_100k": round((s1 - s0) / committed * 1e5, 3) if server else None,
    }


def measure_whole_hubs(args: argparse.Namespace, tmp: Path, server: NatsServer) -> dict[str, Any]:
    raise_fd_limit()
    pki = make_pki(tmp / "certs")
    out: dict[str, Any] = {}
    first, other = cpu_split()
    second = other if args.spread or args.matched or args.instructions else first
    runs: list[tuple[str, list[set[int]], NatsServer | None, str]] = [
        ("sqlite", [first], None, ""),
        ("jetstream_1hub", [first], server, "SQUALLB1"),
    ]
    if args.matched:  # the second hub's place, taken by one hub alone
        runs.append(("jetstream_1hub_beside_load", [other], server, "SQUALLB3"))
    runs.append(("jetstream_2hubs", [first, second], server, "SQUALLB2"))
    raw: dict[str, dict[str, Any]] = {}
    for key, placement, srv, stream in runs:
        (tmp / key).mkdir()
        r = raw[key] = measure_hubs(args, tmp / key, pki, placement, srv, stream)
        out[f"cpu_s_per_100k_{key}"] = r["cpu_s_per_100k"]
        out[f"records_per_s_{key}"] = r["records_per_s"]
        out[f"hub_cpu_util_{key}"] = r["hub_cpu_util"]
        out[f"records_per_commit_{key}"] = r["records_per_commit"]
        if "instructions_per_record" in r:
            out[f"instructions_per_record_{key}"] = r["instructions_per_record"]
        out[f"datagrams_in_per_100_records_{key}"] = r["datagrams_in_per_100_records"]
        out[f"datagrams_out_per_100_records_{key}"] = r["datagrams_out_per_100_records"]
        if srv is not None:
            out[f"nats_server_cpu_s_per_100k_{key}"] = r["nats_cpu_s_per_100k"]
        if len(placement) > 1:
            out[f"per_hub_records_{key}"] = r["per_hub_records"]
            out[f"per_hub_cpu_s_per_100k_{key}"] = r["per_hub_cpu_s_per_100k"]
            if "per_hub_instructions_per_record" in r:
                out[f"per_hub_instructions_per_record_{key}"] = r["per_hub_instructions_per_record"]
    if args.matched:
        # one hub in each place the two hubs take, one at a time: per record, what the
        # same placements cost without a second hub running
        one = [raw["jetstream_1hub"], raw["jetstream_1hub_beside_load"]]
        per = sum(r["cpu_s"] for r in one) / sum(r["committed"] for r in one) * 1e5
        out["cpu_s_per_100k_jetstream_1hub_matched"] = round(per, 3)
        if args.instructions:
            per = sum(r["instructions"] for r in one) / sum(r["committed"] for r in one)
            out["instructions_per_record_jetstream_1hub_matched"] = round(per)
    return out


def bench(args: argparse.Namespace) -> dict[str, Any]:
    need = [] if Path(NATS_SERVER).exists() else ["nats-server"]
    if args.instructions and not Path(CALLGRIND).exists():
        need.append("valgrind")
    apt_install(need, "bench/scaleout.py")  # what `make bench` needs and the venv lacks
    if not Path(NATS_SERVER).exists() or (args.instructions and not Path(CALLGRIND).exists()):
        raise BenchError(f"cannot install {' '.join(need)}: needs root and the Debian archive")
    mine, others = cpu_split()
    templates = device_batches(args.devices, args.batch)
    work = groups(templates, args.batch, args.group, args.records)
    out: dict[str, Any] = {
        "machine": machine(),
        "devices": args.devices,
        "load_procs": args.procs,
        "window_s": args.window,
        "placement": (
            "hubs on different CPUs, one beside the load and nats-server"
            if args.spread or args.matched or args.instructions
            else "hubs on one CPU, load and nats-server on the other"
        ),
        "batch_records": args.batch,
        "group_batches": args.group,
        "log_records": sum(b.count for g in work[5:] for b in g),
        "bytes_per_record": round(len(templates[0][2]) / args.batch, 1),
    }
    tmp = Path(tempfile.mkdtemp(prefix="squall-bench-scaleout-"))
    try:
        for d in ("sqlite", "nats", "hubs"):
            (tmp / d).mkdir()
        server = NatsServer(tmp / "nats", others)
        try:
            if not args.skip_hubs:
                out.update(measure_whole_hubs(args, tmp / "hubs", server))
            pin(mine)  # the log-only loops run in this process, on the hub's CPU
            out.update(measure_sqlite(work, tmp / "sqlite"))
            out.update(measure_jetstream_log(work, server))
        finally:
            server.stop()
    finally:
        if args.keep_callgrind is not None:  # the dumps, for callgrind_annotate
            for dump in (tmp / "hubs").glob("*/hub*/callgrind.out.*"):
                dest = args.keep_callgrind / f"{dump.parent.parent.name}-{dump.parent.name}"
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy(dump, dest / dump.name)
        shutil.rmtree(tmp, ignore_errors=True)
    sq, js = out["log_cpu_s_per_100k_sqlite"], out["log_cpu_s_per_100k_jetstream"]
    out["log_jetstream_over_sqlite"] = round(js / sq, 2) if sq else None
    if not args.skip_hubs:
        sq, one = out["cpu_s_per_100k_sqlite"], out["cpu_s_per_100k_jetstream_1hub"]
        two = out["cpu_s_per_100k_jetstream_2hubs"]
        out["jetstream_over_sqlite"] = round(one / sq, 2) if sq else None
        base = out.get("cpu_s_per_100k_jetstream_1hub_matched", one)
        out["two_hubs_over_one"] = round(two / base, 2) if base else None
        if args.instructions:
            sq = out["instructions_per_record_sqlite"]
            one = out["instructions_per_record_jetstream_1hub"]
            two = out["instructions_per_record_jetstream_2hubs"]
            base = out.get("instructions_per_record_jetstream_1hub_matched", one)
            out["jetstream_over_sqlite_instructions"] = round(one / sq, 3)
            out["two_hubs_over_one_instructions"] = round(two / base, 3)
    return out


def report(out: dict[str, Any]) -> None:
    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    print(machine_line(out["machine"]))
    if "cpu_s_per_100k_sqlite" in out:
        print(
            f"whole hubs: {out['devices']} devices in {out['load_procs']} load processes, "
            f"{out['window_s']} s window, {out['placement']}"
        )
        for key, label in (
            ("sqlite", "1 hub,  SQLite   "),
            ("jetstream_1hub", "1 hub,  JetStream"),
            ("jetstream_1hub_beside_load", "1 hub beside the load, JetStream"),
            ("jetstream_2hubs", "2 hubs, JetStream"),
        ):
            if f"cpu_s_per_100k_{key}" not in out:
                continue
            nats = out.get(f"nats_server_cpu_s_per_100k_{key}")
            extra = f"; nats-server {nats} CPU-s per 100k" if nats is not None else ""
            print(
                f"  {label}: {out[f'cpu_s_per_100k_{key}']} hub CPU-s per 100k records, "
                f"{out[f'records_per_s_{key}']:,} records/s (hub CPU {out[f'hub_cpu_util_{key}']}, "
                f"{out[f'records_per_commit_{key}']} records per commit){extra}"
            )
        if "per_hub_records_jetstream_2hubs" in out:
            print(
                f"  2 hubs' shares of the window: {out['per_hub_records_jetstream_2hubs']}, "
                f"hub CPU-s per 100k each: {out['per_hub_cpu_s_per_100k_jetstream_2hubs']}"
            )
        if "cpu_s_per_100k_jetstream_1hub_matched" in out:
            print(
                "  1 hub in each of the 2 hubs' places, one at a time: "
                f"{out['cpu_s_per_100k_jetstream_1hub_matched']} hub CPU-s per 100k records"
            )
        if "two_hubs_over_one_instructions" in out:
            print("  instructions per committed record (callgrind):")
            for key in ("sqlite", "jetstream_1hub", "jetstream_1hub_beside_load"):
                if f"instructions_per_record_{key}" in out:
                    print(f"    {key}: {out[f'instructions_per_record_{key}']:,}")
            print(
                f"    jetstream_2hubs: {out['instructions_per_record_jetstream_2hubs']:,} "
                f"(each: {out['per_hub_instructions_per_record_jetstream_2hubs']})"
            )
            ratio = out["jetstream_over_sqlite_instructions"]
            two = out["two_hubs_over_one_instructions"]
            print(
                f"    JetStream / SQLite: {ratio}x ({mark(ratio <= TARGET_RATIO)}), "
                f"2 hubs / 1 hub: {two}x ({mark(two <= 1.0)})"
            )
        ratio, two = out["jetstream_over_sqlite"], out["two_hubs_over_one"]
        print(
            f"  JetStream / SQLite per record: {ratio}x   target <= {TARGET_RATIO}x: "
            f"{mark(ratio is not None and ratio <= TARGET_RATIO)}"
        )
        print(
            f"  2 hubs / 1 hub per record: {two}x   target <= 1.0x: "
            f"{mark(two is not None and two <= 1.0)} (a few % either way is noise here)"
        )
    print(
        f"log alone, {out['log_records']:,} records ({out['batch_records']}-record batches, "
        f"{out['bytes_per_record']} bytes/record, {out['group_batches']} batches per group):"
    )
    print(
        f"  SQLite:    {out['log_cpu_s_per_100k_sqlite']} CPU-s per 100k, "
        f"{out['log_records_per_s_sqlite']:,} records/s"
    )
    print(
        f"  JetStream: {out['log_cpu_s_per_100k_jetstream']} CPU-s per 100k (hub side), "
        f"{out['log_records_per_s_jetstream']:,} records/s; nats-server "
        f"{out['log_nats_server_cpu_s_per_100k']} CPU-s per 100k"
    )
    print(f"  JetStream / SQLite (log only): {out['log_jetstream_over_sqlite']}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--procs", type=int, default=4, help="load processes (4)")
    ap.add_argument("--warmup", type=float, default=5.0, help="s before each window (5)")
    ap.add_argument("--window", type=float, default=15.0, help="steady window, s (15)")
    ap.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="records/s per device (0: as fast as the hubs take them); with a rate, "
        "each hub gets --devices devices of its own",
    )
    ap.add_argument(
        "--spread",
        action="store_true",
        help="the second hub on the other CPU (with the load) instead of beside the first",
    )
    ap.add_argument(
        "--matched",
        action="store_true",
        help="with --rate: the hubs on different CPUs (as --spread), and the one-hub figure "
        "they are compared with measured in both of those places, one hub at a time",
    )
    ap.add_argument(
        "--instructions",
        action="store_true",
        help="with --rate: run each hub under valgrind's callgrind and count the "
        "instructions it executes per committed record (repeatable; ~50x slower hubs)",
    )
    ap.add_argument(
        "--keep-callgrind",
        type=Path,
        metavar="DIR",
        help="with --instructions: copy each hub's callgrind dumps to DIR/<run>-<hub>/",
    )
    ap.add_argument("--batch", type=int, default=100, help="records per batch (log alone)")
    ap.add_argument("--group", type=int, default=10, help="batches per group (log alone)")
    ap.add_argument("--records", type=int, default=1_000_000, help="records (log alone)")
    ap.add_argument("--skip-hubs", action="store_true", help="only the log-alone figures")
    ap.add_argument("--quick", action="store_true", help="short windows, 200,000 records")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--timeout", type=float, default=900.0, help="bound on the whole run (s)")
    args = ap.parse_args()
    if args.quick:
        args.records, args.warmup, args.window = 200_000, 3.0, 8.0
    if args.procs < 1 or args.devices < args.procs:
        ap.error("--devices must be at least --procs >= 1")
    if args.rate > 0 and args.devices % args.procs:
        ap.error("with --rate, --procs must divide --devices (each hub gets exactly --devices)")
    if args.instructions and args.rate <= 0:
        ap.error("--instructions needs --rate (a hub under callgrind is ~50x slower)")
    if args.matched and args.rate <= 0:
        ap.error("--matched needs --rate (flat out, the hubs' loads differ by placement)")
    try:
        with watchdog(args.timeout):
            out = bench(args)
    except BenchError as exc:
        print(f"scaleout: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print_json(out)
    else:
        report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

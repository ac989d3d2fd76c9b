"""Scale-out benchmark: hub-side CPU per 100,000 committed records, SQLite log vs JetStream log.

Run: ``.venv/bin/python bench/scaleout.py [--quick] [--json]``.

Both backends get the same batches: ``--devices`` devices (100) each send
``--batch`` records (100 GPS-like fixes, ~200 bytes of JSON each) per batch, encoded
once per device as the edge would (msgpack + zstd columns) and replayed with advancing
seqs -- the log stores a batch as received, so replaying the bytes costs each backend
what a real batch costs.  Groups of ``--group`` batches (10: what 5 ms of group commit
holds at ~200,000 records/s) go to

- ``hub.log.Log.append_group`` (SQLite, WAL, ``synchronous: normal``, a temp dir), and
- ``hub.jslog.JetStreamLog.append_group`` against a real ``nats-server -js`` (file
  storage, a temp dir, loopback) that this program starts, pinned to the other CPU.

``cpu_s_per_100k_*`` is this process's CPU time (``time.process_time``: the work the
hub's own core would do) per 100,000 records stored; the bench process is pinned to
one CPU.  ``nats_server_cpu_s_per_100k`` is what the JetStream server spent on its own
core meanwhile (it is not the hub's, but it is a machine's).  ``records_per_s_*`` is
wall-clock throughput of the loop (one group in flight at a time, as the hub commits).
The whole hub costs more per record than its log (QUIC, sessions, decoding checks:
about 0.6 s per 100k in bench/hub_ingest.py); the difference between the two log
figures is what moving to JetStream adds to it.  Two hub processes on one JetStream
(``cpu_s_per_100k_jetstream_2hubs``) come with the hub integration.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _common import (
    BenchError,
    cpu_seconds,
    cpu_split,
    die_with_parent,
    free_port,
    machine,
    machine_line,
    pin,
    print_json,
    watchdog,
)

from hub.jslog import JetStreamLog, JetStreamSettings
from hub.log import Log, PendingBatch
from simulator.telemetry import Drive
from transport.batchcodec import Record, encode_batch

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
TARGET_RATIO = 1.3  # issue 7: JetStream within 1.3x of SQLite's per-record hub CPU


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
        "cpu_s_per_100k_sqlite": round(cpu / records * 1e5, 3),
        "records_per_s_sqlite": int(records / wall),
    }


def _child_setup(cpus: set[int]) -> None:
    die_with_parent()
    pin(cpus)


class NatsServer:
    """nats-server with JetStream in ``root``, on a free loopback port, pinned to ``cpus``."""

    def __init__(self, root: Path, cpus: set[int]) -> None:
        self.port = free_port(socket.SOCK_STREAM)
        (root / "js").mkdir()
        self.proc = subprocess.Popen(
            [NATS_SERVER, "-js", "-sd", str(root / "js"), "-a", "127.0.0.1", "-p", str(self.port)],
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
        "cpu_s_per_100k_jetstream_1hub": round(cpu / records * 1e5, 3),
        "records_per_s_jetstream_1hub": int(records / wall),
        "nats_server_cpu_s_per_100k": round(server_cpu / records * 1e5, 3),
    }


def measure_jetstream(work: list[list[PendingBatch]], tmp: Path, cpus: set[int]) -> dict[str, Any]:
    if not Path(NATS_SERVER).exists():
        raise BenchError("nats-server is not installed: run `make system-deps`")
    server = NatsServer(tmp, cpus)
    try:
        settings = JetStreamSettings(
            servers=[f"nats://127.0.0.1:{server.port}"], stream="SQUALLBENCH", max_bytes=-1
        )
        try:
            import uvloop

            runner: Any = uvloop.run
        except ImportError:  # pragma: no cover - uvloop is a dev dependency
            runner = asyncio.run
        return dict(runner(_jetstream_run(work, settings, server.proc.pid)))
    finally:
        server.stop()


def bench(args: argparse.Namespace) -> dict[str, Any]:
    mine, others = cpu_split()
    pin(mine)
    templates = device_batches(args.devices, args.batch)
    work = groups(templates, args.batch, args.group, args.records)
    out: dict[str, Any] = {
        "machine": machine(),
        "devices": args.devices,
        "batch_records": args.batch,
        "group_batches": args.group,
        "records": sum(b.count for g in work[5:] for b in g),
        "bytes_per_record": round(len(templates[0][2]) / args.batch, 1),
    }
    tmp = Path(tempfile.mkdtemp(prefix="squall-bench-scaleout-"))
    try:
        (tmp / "sqlite").mkdir()
        (tmp / "nats").mkdir()
        out.update(measure_sqlite(work, tmp / "sqlite"))
        out.update(measure_jetstream(work, tmp / "nats", others))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sq, js = out["cpu_s_per_100k_sqlite"], out["cpu_s_per_100k_jetstream_1hub"]
    out["jetstream_over_sqlite"] = round(js / sq, 2) if sq else None
    out["cpu_s_per_100k_jetstream_2hubs"] = None  # needs the hub integration (issue 7)
    return out


def report(out: dict[str, Any]) -> None:
    print(machine_line(out["machine"]))
    print(
        f"{out['records']:,} records: {out['devices']} devices, {out['batch_records']}-record "
        f"batches ({out['bytes_per_record']} bytes/record on the wire), "
        f"{out['group_batches']} batches per group"
    )
    print(
        f"  SQLite log:    {out['cpu_s_per_100k_sqlite']} CPU-s per 100k records, "
        f"{out['records_per_s_sqlite']:,} records/s"
    )
    print(
        f"  JetStream log: {out['cpu_s_per_100k_jetstream_1hub']} CPU-s per 100k records "
        f"(hub side), {out['records_per_s_jetstream_1hub']:,} records/s; nats-server "
        f"{out['nats_server_cpu_s_per_100k']} CPU-s per 100k on its own core"
    )
    print(f"  JetStream / SQLite (log only): {out['jetstream_over_sqlite']}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--batch", type=int, default=100, help="records per batch")
    ap.add_argument("--group", type=int, default=10, help="batches per group commit")
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="200,000 records")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--timeout", type=float, default=600.0, help="bound on the whole run (s)")
    args = ap.parse_args()
    if args.quick:
        args.records = 200_000
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

"""SIGKILL the edge or the hub mid-stream over a lossy link: nothing accepted is lost or doubled.

Everything runs as real processes on loopback: `squall hub`, `squall link` (the impairment
proxy) and simulated vehicles (`python -m simulator.vehicle`).
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edge.spool import Spool
from hub.log import Log
from transport.wire import LANES

from .conftest import free_port, write_edge_config, write_hub_config

pytestmark = pytest.mark.integration

LOSSY = {"profiles": {"lossy": {"loss": {"model": "random", "loss_pct": 10}, "delay_ms": 15}}}


def spawn(*args: str, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT)


def start_hub(cfg: Path, tmp: Path) -> subprocess.Popen[bytes]:
    proc = spawn("-m", "transport.cli", "hub", "--config", str(cfg), log=tmp / "hub.out")
    time.sleep(1.0)
    assert proc.poll() is None, (tmp / "hub.out").read_text()
    return proc


def start_link(tmp: Path, listen: int, upstream: str) -> subprocess.Popen[bytes]:
    profiles = tmp / "links.yaml"
    profiles.write_text(yaml.safe_dump(LOSSY))
    args = ["--listen", f"127.0.0.1:{listen}", "--upstream", upstream]
    args += ["--profile", "lossy", "--profiles", str(profiles), "--seed", "7"]
    return spawn("-m", "transport.cli", "link", *args, log=tmp / "link.out")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def logged(db: Path) -> dict[tuple[str, int], list[int]]:
    """(device, incarnation) -> seqs in log order (presence records left out)."""
    out: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    log = Log(str(db))
    try:
        offset = log.first_offset()
        while batch := log.read(offset, 20_000):
            for e in batch:
                if not e.subject.endswith(".presence"):
                    out[(e.device, e.incarnation)].append(e.seq)
            offset = batch[-1].offset + 1
    finally:
        log.close()
    return out


def spooled(path: Path) -> tuple[int, set[int]]:
    """(incarnation, seqs still in the spool) of a spool file."""
    spool = Spool(str(path), max_bytes=1 << 30, durability="batch", now=time.monotonic())
    try:
        seqs = {r.seq for lane in LANES for r in spool.pending(lane, 0, 1 << 30)}
        return spool.incarnation, seqs
    finally:
        spool.close()


def wait_log(db: Path, want: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if db.exists() and sum(len(v) for v in logged(db).values()) >= want:
            return
        time.sleep(0.5)


def test_edge_sigkill_over_lossy_link_loses_and_doubles_nothing(tmp_path: Path, pki: Path) -> None:
    hub_cfg = write_hub_config(tmp_path, pki)
    hub_addr = yaml.safe_load(hub_cfg.read_text())["listen"]
    link_port = free_port()
    edge_cfg = write_edge_config(tmp_path, pki, "t1", [f"127.0.0.1:{link_port}"])
    hub = start_hub(hub_cfg, tmp_path)
    link = start_link(tmp_path, link_port, hub_addr)
    try:
        args = ["-m", "simulator.vehicle", "--config", str(edge_cfg), "--rate", "300"]
        car = spawn(*args, "--duration", "60", log=tmp_path / "car.out")
        time.sleep(4.0)
        car.send_signal(signal.SIGKILL)  # mid-send, mid-batch, mid-commit: wherever it is
        car.wait()
        time.sleep(1.0)  # whatever was in flight has landed or is gone
        before = logged(tmp_path / "hub.db")
        incarnation, in_spool = spooled(tmp_path / "t1.spool.db")
        assert in_spool, "the kill left nothing unsent: the test proves nothing"
        car = spawn(*args, "--duration", "2", "--drain", "60", log=tmp_path / "car.out")
        assert car.wait(timeout=90) == 0, (tmp_path / "car.out").read_text()
        time.sleep(0.5)
        after = logged(tmp_path / "hub.db")
    finally:
        stop(link)
        stop(hub)
    seqs = after[("t1", incarnation)]
    assert len(seqs) == len(set(seqs)), "a record was stored twice"
    assert in_spool <= set(seqs), f"lost {len(in_spool - set(seqs))} accepted records"
    assert set(before.get(("t1", incarnation), [])) <= set(seqs)
    assert len(seqs) > 1000


def test_hub_sigkill_during_ingest_from_20_devices(tmp_path: Path, pki: Path) -> None:
    """...and the hub's own archive consumer, killed with it, writes each record once."""
    # two tenants, and files small enough that the archive rotates around the kill
    archive = {"name": "archive", "directory": str(tmp_path / "archive"), "rotate_bytes": 20000}
    hub_cfg = write_hub_config(tmp_path, pki, archives=[archive])
    hub_addr = yaml.safe_load(hub_cfg.read_text())["listen"]
    link_port = free_port()
    configs = [
        str(
            write_edge_config(
                tmp_path,
                pki,
                f"t{i:02d}",
                [f"127.0.0.1:{link_port}"],
                tenant="globex" if i % 4 == 0 else "acme",
            )
        )
        for i in range(20)
    ]
    hub = start_hub(hub_cfg, tmp_path)
    link = start_link(tmp_path, link_port, hub_addr)
    fleet = None
    try:
        fleet = spawn(
            "-m",
            "simulator.vehicle",
            "--config",
            *configs,
            "--rate",
            "20",
            "--duration",
            "12",
            "--drain",
            "90",
            log=tmp_path / "fleet.out",
        )
        wait_log(tmp_path / "hub.db", 500, 20)
        hub.send_signal(signal.SIGKILL)  # during ingest
        hub.wait()
        time.sleep(2.0)  # the edges keep spooling while the hub is gone
        hub = start_hub(hub_cfg, tmp_path)
        assert fleet.wait(timeout=150) == 0, (tmp_path / "fleet.out").read_text()
    finally:
        if fleet is not None:
            stop(fleet)
        stop(link)
        stop(hub)
    out = (tmp_path / "fleet.out").read_text()
    last = {
        line.split()[1].split(".")[1].rstrip(":"): int(line.rsplit("=", 1)[1])
        for line in out.splitlines()
        if line.startswith("vehicle ")
    }
    assert len(last) == 20, out
    got = logged(tmp_path / "hub.db")
    for device, last_seq in last.items():
        streams = [v for (d, _), v in got.items() if d == device]
        assert len(streams) == 1, f"{device}: {len(streams)} incarnations"
        seqs = streams[0]
        assert len(seqs) == len(set(seqs)), f"{device}: duplicates in the log"
        assert sorted(seqs) == list(range(1, last_seq + 1)), f"{device}: records missing"
    tenant_lines = [
        (path.name, json.loads(line))
        for path in sorted((tmp_path / "archive").glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    lines = [r for _, r in tenant_lines]
    files = {path.name for path in (tmp_path / "archive").glob("*.jsonl")}
    # a tenant's current file is opened with its next record: right after a rotation only
    # the numbered ones may exist
    assert "acme.1.jsonl" in files, f"no rotation: {files}"
    assert any(f.startswith("globex.") for f in files), f"no second tenant: {files}"
    assert all(r["subject"].split(".")[0] == p.split(".")[0] for p, r in tenant_lines), "mixed"
    archived = collections.Counter(
        (r["device"], r["seq"]) for r in lines if not r["subject"].endswith(".presence")
    )
    assert max(archived.values()) == 1, "the archive wrote a record twice"
    assert set(archived) == {(d, s) for d, last_seq in last.items() for s in range(1, last_seq + 1)}


def test_a_restarted_hub_resets_the_agents_session_and_it_reconnects_at_once(
    tmp_path: Path, pki: Path
) -> None:
    """SIGKILL the hub and start it again on the same port and key: the agent's next packet
    gets a stateless reset and it reconnects at once, not after its hub-silence timeout
    (3 heartbeats of 20 s here)."""
    import asyncio

    from edge.agent import Agent
    from edge.config import load_edge_config
    from edge.metrics import AgentCollector

    hub_cfg = write_hub_config(tmp_path, pki)
    hub_addr = yaml.safe_load(hub_cfg.read_text())["listen"]
    edge_cfg = write_edge_config(
        tmp_path, pki, "t1", [hub_addr], sender={"linger_ms": 10, "heartbeat_s": 20.0}
    )
    hub = start_hub(hub_cfg, tmp_path)

    async def main() -> float:
        agent = Agent(load_edge_config(edge_cfg))
        agent.start()
        try:
            await agent.publish("telemetry.x", {"i": 0})
            await asyncio.wait_for(agent.connected.wait(), 10)
            while agent.stats.acked < 1:
                await asyncio.sleep(0.05)
            nonlocal hub
            hub.send_signal(signal.SIGKILL)
            hub.wait()
            hub = start_hub(hub_cfg, tmp_path)  # the same port and TLS key
            t0 = time.monotonic()
            await agent.publish("telemetry.x", {"i": 1})
            while agent.stats.acked < 2:
                assert time.monotonic() - t0 < 20, "not delivered before the silence timeout"
                await asyncio.sleep(0.05)
            took = time.monotonic() - t0
            assert agent.stats.stateless_resets == 1 and agent.stats.reconnects == 1
            metrics = {m.name: m for m in AgentCollector(agent).collect()}
            assert metrics["squall_edge_stateless_resets"].samples[0].value == 1
            return took
        finally:
            await agent.stop()

    try:
        took = asyncio.run(main())
    finally:
        stop(hub)
    assert took < 5.0, f"the second record took {took:.1f} s"
    got = logged(tmp_path / "hub.db")
    assert [seqs for (d, _), seqs in got.items() if d == "t1"] == [[1, 2]]

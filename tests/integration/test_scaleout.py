"""Many hub processes on one JetStream log: a hub SIGKILLed, nats-server restarted, nothing lost.

Everything is a real process on loopback: nats-server (JetStream in a temp dir, started
here), `squall hub` on `log.backend: jetstream`, `squall link` impairment proxies,
simulated vehicles (`python -m simulator.vehicle`, real edge agents listing every hub
and ordering them by rendezvous placement) and `squall consume` archiving the shared
log.  The archive must hold every record the vehicles accepted, each exactly once.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.placement import home_hub
from tests.integration.realpeers import NATS_SERVER, NatsServer

from .conftest import free_port, write_edge_config, write_hub_config

pytestmark = pytest.mark.integration

TOKEN = "s3cret"
# The edges find a dead hub fast: 1 s heartbeats (3 silent ones: the hub is gone) and
# the next hub after one failure; short backoff so the test stays bounded.
EDGE = {
    "sender": {"linger_ms": 100, "heartbeat_s": 1.0, "idle_timeout_s": 10.0},
    "backoff": {"base_s": 0.2, "cap_s": 1.0, "failover_after": 1},
}


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    if not Path(NATS_SERVER).exists():
        pytest.fail("nats-server is not installed: run `make system-deps`")
    root = tmp_path / "nats"
    root.mkdir()
    server = NatsServer(root, max_payload=2 << 20)  # the recipe: max_payload 2MB
    server.start()
    try:
        yield server
    finally:
        server.stop()


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *args], stdout=log.open("ab"), stderr=subprocess.STDOUT
    )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


class HubProc:
    """One `squall hub` on the jetstream backend, in its own folder."""

    def __init__(self, root: Path, pki: Path, nats: NatsServer, name: str) -> None:
        self.dir = root / name
        self.dir.mkdir()
        self.name = name
        self.config = write_hub_config(
            self.dir,
            pki,
            name=name,
            log={"backend": "jetstream", "group_commit_ms": 5},
            jetstream={
                "servers": [nats.url],
                "stream": "SQUALL",
                "publish_timeout_s": 2.0,
                "reconnect_wait_s": 0.2,
            },
        )
        cfg = yaml.safe_load(self.config.read_text())
        self.listen: str = cfg["listen"]
        self.http = int(cfg["http"]["listen"].rsplit(":", 1)[1])
        self.proc = spawn(["-m", "transport.cli", "hub", "--config", str(self.config)], self.out)

    @property
    def out(self) -> Path:
        return self.dir / "hub.out"

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.out.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
        return out


def start_link(root: Path, listen: int, upstream: str, profile: str, seed: int) -> Any:
    args = ["-m", "transport.cli", "link", "--listen", f"127.0.0.1:{listen}"]
    args += ["--upstream", upstream, "--profile", profile, "--seed", str(seed)]
    return spawn(args, root / f"link-{listen}.out")


def start_consume(root: Path, nats: NatsServer) -> subprocess.Popen[bytes]:
    config = root / "consume.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "jetstream": {"servers": [nats.url], "stream": "SQUALL", "reconnect_wait_s": 0.2},
                "archives": [{"name": "archive", "directory": "archive"}],
            }
        )
    )
    return spawn(["-m", "transport.cli", "consume", "--config", str(config)], root / "consume.out")


def archived(directory: Path) -> collections.Counter[tuple[str, int]]:
    """(device, seq) -> lines in the archive (presence and alert records left out)."""
    seen: collections.Counter[tuple[str, int]] = collections.Counter()
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            x = json.loads(line)
            if not x["subject"].endswith(".presence") and x["device"] != "_alerts":
                seen[(x["device"], x["seq"])] += 1
    return seen


def presence_lines(directory: Path) -> list[dict[str, Any]]:
    return [
        x
        for path in sorted(directory.glob("*.jsonl"))
        for x in map(json.loads, path.read_text().splitlines())
        if x["subject"].endswith(".presence")
    ]


def last_seqs(out: str) -> dict[str, int]:
    """What each vehicle accepted into its spool, from `vehicle acme.tNN: last_seq=K` lines."""
    return {
        line.split()[1].split(".")[1].rstrip(":"): int(line.rsplit("=", 1)[1])
        for line in out.splitlines()
        if line.startswith("vehicle ")
    }


def drive(
    root: Path, configs: list[Path], per_proc: int, rate: float, duration: float
) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(0, len(configs), per_proc):
        group = [str(c) for c in configs[i : i + per_proc]]
        args = ["-m", "simulator.vehicle", "--config", *group, "--rate", str(rate)]
        args += ["--duration", str(duration), "--drain", "90", "--seed", str(i)]
        procs.append(spawn(args, root / f"fleet-{i:02d}.out"))
    return procs


def check_exactly_once(archive: Path, last: dict[str, int]) -> None:
    got = archived(archive)
    dup = [k for k, n in got.items() if n > 1]
    assert not dup, f"archived twice: {sorted(dup)[:10]}"
    want = {(d, s) for d, n in last.items() for s in range(1, n + 1)}
    missing = want - set(got)
    assert not missing, f"{len(missing)} accepted records missing, e.g. {sorted(missing)[:10]}"
    assert set(got) == want, "the archive holds records no vehicle accepted"


def test_three_hubs_one_sigkilled_mid_run_50_devices_over_3g_poor(
    tmp_path: Path, pki: Path, nats: NatsServer
) -> None:
    hubs = [HubProc(tmp_path, pki, nats, f"hub{i}") for i in range(3)]
    procs: list[subprocess.Popen[bytes]] = [h.proc for h in hubs]
    try:
        wait_for(lambda: all(h.ready() for h in hubs), 30, "three hubs ready")
        ports = [free_port() for _ in hubs]
        procs += [
            start_link(tmp_path, p, h.listen, "3g-poor", seed=i)
            for i, (p, h) in enumerate(zip(ports, hubs, strict=True))
        ]
        addresses = [f"127.0.0.1:{p}" for p in ports]
        devices = [f"t{i:02d}" for i in range(50)]
        configs = [
            write_edge_config(tmp_path, pki, d, addresses, **EDGE)  # type: ignore[arg-type]
            for d in devices
        ]
        homes = {d: addresses.index(home_hub(addresses, d)) for d in devices}
        victim = collections.Counter(homes.values()).most_common(1)[0][0]
        moved = sorted(d for d, h in homes.items() if h == victim)
        consume = start_consume(tmp_path, nats)
        procs.append(consume)
        fleet = drive(tmp_path, configs, per_proc=10, rate=4, duration=20)
        procs += fleet

        # mid-run, once the victim has stored some of its devices' records: SIGKILL
        wait_for(
            lambda: hubs[victim].metrics().get("squall_hub_records_committed_total", 0) > 200,
            40,
            "the victim hub committing",
        )
        time.sleep(2.0)
        hubs[victim].proc.send_signal(signal.SIGKILL)
        hubs[victim].proc.wait()

        for f in fleet:
            assert f.wait(timeout=150) == 0, "a vehicle process failed"
        out = "".join(p.read_text() for p in sorted(tmp_path.glob("fleet-*.out")))
        last = last_seqs(out)
        assert set(last) == set(devices), out[-2000:]
        total = sum(last.values())
        archive = tmp_path / "archive"
        wait_for(lambda: len(archived(archive)) >= total, 60, "squall consume catching up")
        time.sleep(1.0)  # anything doubled would be in by now
        assert stop(consume) == 0, (tmp_path / "consume.out").read_text()[-2000:]
    finally:
        for p in reversed(procs):
            stop(p)
    check_exactly_once(tmp_path / "archive", last)
    assert total > 50 * 4 * 15
    # the victim's devices moved on to their next hub, and every hub saw it (shared presence)
    killed = hubs[victim].name
    elsewhere = {
        x["device"]
        for x in presence_lines(tmp_path / "archive")
        if x["body"]["state"] == "online" and x["attrs"]["hub"] != killed
    }
    assert set(moved) <= elsewhere, sorted(set(moved) - elsewhere)
    for i, h in enumerate(hubs):
        if i != victim:
            assert "stopped cleanly" in h.out.read_text()


def test_nats_server_restart_during_ingest_stops_acks_then_loses_nothing(
    tmp_path: Path, pki: Path, nats: NatsServer
) -> None:
    hubs = [HubProc(tmp_path, pki, nats, f"hub{i}") for i in range(2)]
    procs: list[subprocess.Popen[bytes]] = [h.proc for h in hubs]
    try:
        wait_for(lambda: all(h.ready() for h in hubs), 30, "two hubs ready")
        addresses = [h.listen for h in hubs]
        devices = [f"n{i:02d}" for i in range(10)]
        configs = [
            write_edge_config(tmp_path, pki, d, addresses, **EDGE)  # type: ignore[arg-type]
            for d in devices
        ]
        consume = start_consume(tmp_path, nats)
        procs.append(consume)
        fleet = drive(tmp_path, configs, per_proc=5, rate=20, duration=20)
        procs += fleet

        def committed() -> float:
            return sum(h.metrics().get("squall_hub_records_committed_total", 0) for h in hubs)

        wait_for(lambda: committed() > 500, 30, "ingest under way")
        nats.stop()  # mid-ingest
        failed = "squall_hub_errors_total{code=COMMIT_FAILED}"
        wait_for(lambda: all(h.metrics().get(failed, 0) > 0 for h in hubs), 30, "commits failing")
        # while JetStream cannot confirm, nothing is acknowledged (edges keep spooling)
        before = committed()
        time.sleep(3.0)
        assert committed() == before
        nats.start()
        wait_for(lambda: committed() > before + 500, 60, "ingest resumed")
        for f in fleet:
            assert f.wait(timeout=150) == 0, "a vehicle process failed"
        out = "".join(p.read_text() for p in sorted(tmp_path.glob("fleet-*.out")))
        last = last_seqs(out)
        assert set(last) == set(devices), out[-2000:]
        archive = tmp_path / "archive"
        wait_for(
            lambda: len(archived(archive)) >= sum(last.values()), 60, "squall consume catching up"
        )
        time.sleep(1.0)
        assert stop(consume) == 0, (tmp_path / "consume.out").read_text()[-2000:]
    finally:
        for p in reversed(procs):
            stop(p)
    check_exactly_once(tmp_path / "archive", last)
    for h in hubs:
        assert "stopped cleanly" in h.out.read_text(), h.out.read_text()[-2000:]

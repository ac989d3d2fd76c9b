"""A real ``squall hub`` process and its signals: SIGHUP reloads the deny list, SIGTERM ends
cleanly (what is accepted gets committed and acknowledged, then GOING_AWAY).

The hub runs as ``python -m transport.cli hub``; the devices are EdgeEndpoint + EdgeSession
pairs in this process (tests/integration/quicharness.py).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from transport import certs
from transport.batchcodec import Record
from transport.errors import ErrorCode
from transport.events import Acked, PeerError, Welcomed
from transport.wire import Lane

from .conftest import device_seqs, scrape, until, write_hub_config
from .quicharness import Edge, connect_edge, edge_tls

pytestmark = pytest.mark.integration

TELEMETRY = int(Lane.TELEMETRY)


class HubProcess:
    """``squall hub --config <path>`` in a subprocess, its stderr in a file."""

    def __init__(self, cfg_path: Path, tmp_path: Path) -> None:
        self.cfg = yaml.safe_load(cfg_path.read_text())
        self.errlog = tmp_path / "hub.stderr"
        with self.errlog.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "transport.cli", "hub", "--config", str(cfg_path)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # printed once the UDP port is bound
        assert "listening" in line, self.errlog.read_text()[-2000:]

    @property
    def addr(self) -> tuple[str, int]:
        host, _, port = self.cfg["listen"].rpartition(":")
        return host, int(port)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self) -> tuple[int, str]:
        """Exit code and what the hub printed after its first line."""
        out, _ = self.proc.communicate(timeout=30)
        return self.proc.returncode, out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def hubs() -> Iterator[list[HubProcess]]:
    """Hub processes a test starts; whatever is still running at the end is killed."""
    started: list[HubProcess] = []
    yield started
    for hub in started:
        hub.kill()


async def connected(hub: HubProcess, pki: Path, device: str) -> Edge:
    edge = await connect_edge(hub.addr, edge_tls(pki, "acme", device))
    await until(lambda: any(isinstance(e, Welcomed) for e in edge.events), 10, f"{device} up")
    return edge


def send(edge: Edge, device: str, first: int, n: int) -> None:
    now = asyncio.get_running_loop().time()
    for seq in range(first, first + n):
        edge.outbox.add(TELEMETRY, Record(seq, seq, f"acme.{device}.telemetry.x", {}, seq), now)
    edge.endpoint.poll(now)
    edge.driver.flush()


def acked(edge: Edge) -> int:
    return max((e.upto for e in edge.events if isinstance(e, Acked)), default=0)


def test_sighup_reloads_the_deny_list_by_exact_device_id_and_by_serial(
    tmp_path: Path, pki: Path, hubs: list[HubProcess]
) -> None:
    deny = tmp_path / "deny.txt"
    deny.write_text("# nobody yet\n")
    hub = HubProcess(write_hub_config(tmp_path, pki, deny_list=str(deny)), tmp_path)
    hubs.append(hub)
    outcome: dict[str, Any] = {}

    async def main() -> None:
        by_id = await connected(hub, pki, "Truck-7")
        by_serial = await connected(hub, pki, "serialdev")
        lookalike = await connected(hub, pki, "truck-7")  # another device: ids are exact
        serial = certs.load_cert(pki / "devices" / "acme" / "serialdev.pem").serial_number
        deny.write_text(f"Truck-7\n{serial:#X}  # the serial, in capitals\n")
        hub.signal(signal.SIGHUP)
        revoked = {"Truck-7": by_id, "serialdev": by_serial}
        for name, edge in revoked.items():
            await until(lambda e=edge: e.lost() is not None, 10, f"{name} revoked")  # type: ignore[misc]
            lost = edge.lost()
            assert lost is not None
            outcome[name] = (lost.code, lost.reason)
        # the look-alike carries on: it still delivers and gets its ACK
        send(lookalike, "truck-7", 1, 5)
        await until(lambda: acked(lookalike) == 5, 10, "look-alike acked")
        outcome["lookalike"] = lookalike.lost()
        # and a revoked device cannot come back
        again = await connect_edge(hub.addr, edge_tls(pki, "acme", "Truck-7"))
        await until(lambda: again.lost() is not None, 10, "Truck-7 refused")
        outcome["again"] = any(isinstance(e, Welcomed) for e in again.events)
        for edge in (by_id, by_serial, lookalike, again):
            edge.driver.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    hub.signal(signal.SIGTERM)
    code, _ = hub.wait()
    assert code == 0, hub.errlog.read_text()[-2000:]
    assert outcome["Truck-7"] == (ErrorCode.REVOKED, "device acme/Truck-7 is revoked")
    assert outcome["serialdev"] == (ErrorCode.REVOKED, "device acme/serialdev is revoked")
    assert outcome["lookalike"] is None and outcome["again"] is False
    assert device_seqs(tmp_path / "hub.db", "truck-7") == [1, 2, 3, 4, 5]


def test_sigterm_commits_an_unacked_batch_then_says_going_away(
    tmp_path: Path, pki: Path, hubs: list[HubProcess]
) -> None:
    # a group commit that waits a minute: the batch is accepted and held uncommitted until
    # the hub is told to stop
    cfg_path = write_hub_config(tmp_path, pki, log={"group_commit_ms": 60_000})
    hub = HubProcess(cfg_path, tmp_path)
    hubs.append(hub)
    records = 50
    outcome: dict[str, Any] = {}

    async def main() -> None:
        edge = await connected(hub, pki, "t1")
        send(edge, "t1", 1, records)
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        http = hub.cfg["http"]
        while (m := await scrape(http["listen"], http["token"]))[
            "squall_hub_records_in_total"
        ] < records:
            assert loop.time() < end, m
            await asyncio.sleep(0.05)
        # accepted by the hub, not yet committed, so not acknowledged: the device holds it
        assert m["squall_hub_records_committed_total"] == 0
        assert acked(edge) == 0 and edge.outbox.depth(TELEMETRY) == records
        hub.signal(signal.SIGTERM)
        await until(lambda: edge.lost() is not None, 20, "told to go away")
        lost = edge.lost()
        assert lost is not None
        outcome["lost"] = (lost.code, lost.reason)
        outcome["errors"] = [(e.code, e.reason) for e in edge.events if isinstance(e, PeerError)]
        outcome["acked"] = acked(edge), edge.outbox.depth(TELEMETRY)
        edge.driver.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    code, out = hub.wait()
    assert code == 0 and "stopped cleanly" in out, hub.errlog.read_text()[-2000:]
    assert outcome["acked"] == (records, 0)  # the ACK came before the close
    assert outcome["lost"] == (ErrorCode.GOING_AWAY, "hub shutting down")
    assert outcome["errors"] == [(ErrorCode.GOING_AWAY, "hub shutting down")]
    assert device_seqs(tmp_path / "hub.db", "t1") == list(range(1, records + 1))

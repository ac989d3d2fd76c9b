"""Fixtures for loopback tests: certificates, hub and edge configs on disk."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from hub.log import Log
from transport import certs

if TYPE_CHECKING:
    from tests.integration.realpeers import NatsServer, Rsyslog


async def until(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Wait (polling every 10 ms) until ``cond()`` holds; AssertionError after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"{what}: not met in {timeout} s")
        await asyncio.sleep(0.01)


async def scrape(listen: str, token: str) -> dict[str, float]:
    """The hub's unlabelled counter and gauge samples from /metrics, as {name: value}."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    url, auth = f"http://{listen}/metrics", {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http, http.get(url, headers=auth) as r:
        text = await r.text()
    return {
        s.name: s.value
        for fam in text_string_to_metric_families(text)
        if fam.type in ("counter", "gauge")
        for s in fam.samples
        if not s.labels
    }


def device_seqs(db: Path, device: str) -> list[int]:
    """Seqs of ``device``'s own records in the hub log at ``db``, in log order (the hub's
    presence records left out)."""
    log = Log(str(db))
    try:
        out: list[int] = []
        offset = log.first_offset()
        while batch := log.read(offset, 10_000):
            out.extend(e.seq for e in batch if e.device == device and e.incarnation != 0)
            offset = batch[-1].offset + 1
        return out
    finally:
        log.close()


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A free loopback port (UDP by default)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, hub certificate and key in tmp_path/certs."""
    d = tmp_path / "certs"
    certs.init_dir(d)
    return d


def write_hub_config(tmp_path: Path, pki: Path, **overrides: object) -> Path:
    """A hub.yaml on a free UDP port and a free HTTP port; returns its path."""
    cfg: dict[str, object] = {
        "tls": {
            "cert": str(pki / "hub.pem"),
            "key": str(pki / "hub.key"),
            "device_ca": str(pki / "ca.pem"),
        },
        "listen": f"127.0.0.1:{free_port()}",
        "log": {"path": str(tmp_path / "hub.db")},
        "http": {"listen": f"127.0.0.1:{free_port(socket.SOCK_STREAM)}", "token": "s3cret"},
        "presence": {"stale_after_s": 3, "offline_after_s": 6},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}  # type: ignore[dict-item]
        else:
            cfg[key] = value
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_edge_config(
    tmp_path: Path,
    pki: Path,
    device: str,
    hubs: list[str],
    tenant: str = "acme",
    **overrides: object,
) -> Path:
    """An edge.yaml for ``tenant/device`` with a fresh device certificate."""
    cert, key = certs.issue_device(pki, tenant, device)
    cfg: dict[str, object] = {
        "device": {"cert": str(cert), "key": str(key), "ca": str(pki / "ca.pem")},
        "hubs": hubs,
        "spool": {"path": str(tmp_path / f"{device}.spool.db")},
        "sender": {"linger_ms": 10, "heartbeat_s": 1.0},
        "backoff": {"base_s": 0.1, "cap_s": 1.0},
    }
    for key_, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key_), dict):
            cfg[key_] = {**cfg[key_], **value}  # type: ignore[dict-item]
        else:
            cfg[key_] = value
    path = tmp_path / f"{device}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    """A real rsyslogd on a loopback TCP port (imtcp), writing what it receives as JSON lines."""
    from tests.integration.realpeers import Rsyslog

    server = Rsyslog(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream in ``tmp_path``, on a free loopback port."""
    from tests.integration.realpeers import NATS_SERVER, NatsServer

    if not Path(NATS_SERVER).exists():
        pytest.fail("nats-server is not installed: run `make system-deps`")
    server = NatsServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()

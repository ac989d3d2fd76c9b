"""The servers of bench/peers.py, each its own process on loopback with TLS and client certs.

- Squall: ``python -m transport.cli hub --config hub.yaml`` (what ``squall hub`` runs),
  durable SQLite log in the run's directory, shipped defaults otherwise.
- MQTT: ``mosquitto -c mosquitto.conf``; a TLS listener that requires a client
  certificate (its CN is the username).  ``tuned`` keeps every queued message
  (``max_queued_messages 0``, no byte limit) and lets 1,000 QoS 1 messages be in flight
  per client; ``stock`` leaves Mosquitto's defaults (1,000 queued + 20 in flight per
  client; beyond that QoS 1 messages for a subscriber are dropped).  Persistence on,
  in the run's directory (Mosquitto writes it at its autosave interval, not per message).
- JetStream: ``nats-server -c nats.conf`` with JetStream (file storage in the run's
  directory) and TLS with ``verify: true``.
- HTTPS: ``python bench/_peers_https.py`` (aiohttp, in-memory queue).

Each is pinned to the CPUs the bench gives it and dies with the bench.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from _common import BenchError, Child, Hub, free_port, write_hub_config

BENCH = Path(__file__).resolve().parent
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def which(name: str) -> str | None:
    """The path of a program, looking in the sbin directories too."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN)
    return shutil.which(name, path=path)


@dataclass
class Server:
    """One running server: its process, port, transport and what clients need to know."""

    system: str
    child: Child
    port: int
    kind: str  # "tcp" or "udp": what the relay in front of it speaks
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The server process (for /proc CPU and memory)."""
        return self.child.pid

    def stop(self) -> None:
        """SIGTERM, then SIGKILL."""
        self.child.stop(20)


def wait_tcp(host: str, port: int, child: Child, netns: str | None, timeout: float = 30.0) -> None:
    """Until ``host``:``port`` accepts a TCP connection (BenchError if the child died)."""
    deadline = time.monotonic() + timeout
    while True:
        if netns:
            probe = f"import socket; socket.create_connection(({host!r}, {port}), 0.5).close()"
            argv = ["ip", "netns", "exec", netns, sys.executable, "-c", probe]
            done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
            if done.returncode == 0:
                return
        else:
            with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
                return
        child.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"{child.name}: port {port} not accepting within {timeout:.0f} s")
        time.sleep(0.05)


def version_of(system: str) -> str:
    """The server's version string, for the report."""
    try:
        if system in ("mqtt", "mqtt_stock"):
            exe = which("mosquitto") or "mosquitto"
            out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).splitlines()[0].strip()
        if system == "jetstream":
            exe = which("nats-server") or "nats-server"
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
            return out.stdout.strip()
    except (OSError, IndexError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    from importlib.metadata import version

    if system == "https":
        return f"aiohttp {version('aiohttp')} on Python {sys.version.split()[0]}"
    return f"squall {version('squall')}, aioquic {version('aioquic')}"


def _mosquitto_conf(tmp: Path, pki: Path, host: str, port: int, tuned: bool) -> Path:
    persist = tmp / "mosquitto"
    persist.mkdir(parents=True, exist_ok=True)
    lines = [
        # as root Mosquitto would switch to user "mosquitto", who cannot read the temp dir
        *(["user root"] if os.geteuid() == 0 else []),
        "per_listener_settings false",
        "persistence true",
        f"persistence_location {persist}/",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        f"listener {port} {host}",
        f"cafile {pki / 'ca.pem'}",
        f"certfile {pki / 'hub.pem'}",
        f"keyfile {pki / 'hub.key'}",
        "require_certificate true",
        "use_identity_as_username true",
    ]
    if tuned:
        lines += [
            "max_queued_messages 0",  # no limit: never drop what a subscriber has not taken
            "max_queued_bytes 0",
            "max_inflight_messages 1000",
            "set_tcp_nodelay true",
        ]
    path = tmp / "mosquitto.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def _nats_conf(tmp: Path, pki: Path, host: str, port: int) -> Path:
    store = tmp / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    text = f"""
listen: "{host}:{port}"
server_name: "bench"
jetstream {{
  store_dir: "{store}"
  max_file_store: 8GB
  max_memory_store: 256MB
}}
tls {{
  cert_file: "{pki / "hub.pem"}"
  key_file: "{pki / "hub.key"}"
  ca_file: "{pki / "ca.pem"}"
  verify: true
  timeout: 10
}}
"""
    path = tmp / "nats.conf"
    path.write_text(text)
    return path


def start_server(
    system: str,
    tmp: Path,
    pki: Path,
    cpus: set[int],
    *,
    python_uvloop: bool = False,
    host: str = "127.0.0.1",
    netns: str | None = None,
) -> Server:
    """Start ``system``'s server in ``tmp`` (on ``host``, in network namespace ``netns`` when
    given) and wait until it accepts connections."""
    tmp.mkdir(parents=True, exist_ok=True)
    prefix = ["ip", "netns", "exec", netns] if netns else []
    if system == "squall":
        return _start_hub(tmp, pki, cpus, python_uvloop, host, netns)
    port = free_port(socket.SOCK_STREAM)
    if system in ("mqtt", "mqtt_stock"):
        conf = _mosquitto_conf(tmp, pki, host, port, tuned=system == "mqtt")
        argv = [*prefix, which("mosquitto") or "mosquitto", "-c", str(conf)]
        child = Child("mosquitto", argv, cpus, tmp, stdout=subprocess.DEVNULL)
    elif system == "jetstream":
        conf = _nats_conf(tmp, pki, host, port)
        argv = [*prefix, which("nats-server") or "nats-server", "-c", str(conf)]
        child = Child("nats-server", argv, cpus, tmp, stdout=subprocess.DEVNULL)
    elif system == "https":
        child = _start_https(tmp, pki, cpus, python_uvloop, host, port, prefix)
    else:
        raise BenchError(f"unknown system {system!r}")
    try:
        wait_tcp(host, port, child, netns)
    except BaseException:
        child.stop()
        raise
    return Server(system, child, port, "tcp")


def _start_hub(
    tmp: Path, pki: Path, cpus: set[int], python_uvloop: bool, host: str, netns: str | None
) -> Server:
    port = free_port()
    files = replace(write_hub_config(tmp, pki, listen=f"{host}:{port}"), udp_port=port)
    extra = {"log": str(tmp / "hub.db")}
    if netns is None:
        hub = Hub(files, cpus, tmp, uvloop=python_uvloop)
        try:
            hub.wait_ready(60)
        except BaseException:
            hub.stop()
            raise
        return Server("squall", hub, port, "udp", extra)
    # In another namespace the hub's HTTP API is out of reach: its banner must do.
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "transport.cli", "hub"]
    child = Child(
        "hub", [*argv, "--config", str(files.config), "--log-level", "warning"], cpus, tmp
    )
    try:
        line = child.readline(60)
        if "listening" not in line:
            raise BenchError(f"hub: unexpected first line {line!r}{child.tail()}")
    except BaseException:
        child.stop()
        raise
    return Server("squall", child, port, "udp", extra)


def _start_https(
    tmp: Path,
    pki: Path,
    cpus: set[int],
    python_uvloop: bool,
    host: str,
    port: int,
    prefix: list[str],
) -> Child:
    argv = [*prefix, sys.executable, str(BENCH / "_peers_https.py"), "--host", host]
    argv += ["--port", str(port), "--cert", str(pki / "hub.pem"), "--key", str(pki / "hub.key")]
    argv += ["--ca", str(pki / "ca.pem")]
    if python_uvloop:
        argv.append("--uvloop")
    child = Child("https", argv, cpus, tmp)
    try:
        line = child.readline(30)
        if not line.startswith("ready"):
            raise BenchError(f"https server: unexpected first line {line!r}{child.tail()}")
    except BaseException:
        child.stop()
        raise
    return child

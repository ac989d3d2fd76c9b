"""``squall link --bridge`` for bench/peers.py: devices in one namespace, the server in the other.

The bridge joins namespaces ``N-a`` (devices) and ``N-b`` (server and subscriber) through
the link model on a profile (``3g-poor``: ~9% loss in bursts, 150 ms +- 40 ms each way,
384 kbit/s up, 768 kbit/s down, 64 KiB queue).  Every protocol crosses the same seeded
impairment, TCP and QUIC alike.  Needs root, ``ip`` and ``ethtool`` (make system-deps).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from _common import BenchError, Child, free_port
from _peers_relay import ByteCounts

SUBNET = "10.79.0.0/24"
PROFILE = "3g-poor"
SEED = 1


def bridge_name() -> str:
    """A name of our own (the bench's pid), so concurrent runs never meet."""
    return f"pb{os.getpid() % 1_000_000}"


def server_address(name: str, subnet: str = SUBNET) -> str:
    """The address side b (the server's namespace) gets."""
    from simulator.netns import Topology

    return str(Topology.make(name, subnet, 1400).addr_b.ip)


def unavailable() -> str | None:
    """Why the bridge cannot run here, or None when it can."""
    import importlib.util

    if importlib.util.find_spec("simulator.bridge") is None:
        return "simulator/bridge.py is not available"
    if os.geteuid() != 0:
        return "needs root (network namespaces, veths, packet sockets)"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [t for t in ("ip", "ethtool") if shutil.which(t, path=path) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (make system-deps)"
    return None


class LinkBridge:
    """A running ``squall link --bridge`` child; ``stop`` tears its namespaces down."""

    def __init__(self, name: str, workdir: Path, profile: str = PROFILE, seed: int = SEED) -> None:
        self.name = name
        self.ns_devices = f"{name}-a"
        self.ns_server = f"{name}-b"
        self.host = server_address(name)
        argv = [sys.executable, "-m", "transport.cli", "link", "--bridge", "--name", name]
        argv += ["--subnet", SUBNET, "--profile", profile, "--seed", str(seed)]
        self.metrics_port = free_port(socket.SOCK_STREAM)
        argv += ["--metrics", f"127.0.0.1:{self.metrics_port}"]
        workdir.mkdir(parents=True, exist_ok=True)
        self.child = Child(f"bridge-{name}", argv, set(), workdir)
        try:
            line = self.child.readline(60)
            if not line.startswith("squall link --bridge:"):
                raise BenchError(f"bridge: unexpected first line {line!r}{self.child.tail()}")
        except BaseException:
            self.stop()
            raise

    def counts(self) -> ByteCounts:
        """Frame bytes the link carried so far: up = devices -> server (a to b), down = back.

        Whole Ethernet frames read from each side (IP, TCP/UDP headers and retransmissions
        included), as the bridge's ``squall_bridge_offered_bytes`` and ``_frames`` count them.
        """
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                text = r.read().decode()
        except OSError as exc:
            raise BenchError(f"bridge: cannot scrape /metrics: {exc}{self.child.tail()}") from exc
        c = ByteCounts()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                up = sample.labels.get("direction") == "a_to_b"
                if sample.name == "squall_bridge_offered_bytes_total":
                    if up:
                        c.up_bytes += int(sample.value)
                    else:
                        c.down_bytes += int(sample.value)
                elif sample.name == "squall_bridge_frames_total":
                    if up:
                        c.up_chunks += int(sample.value)
                    else:
                        c.down_chunks += int(sample.value)
        return c

    def stop(self) -> None:
        """SIGTERM (the bridge removes its namespaces); ``--cleanup`` if it could not."""
        self.child.stop(30)
        leftovers = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=False
        ).stdout
        if f"{self.name}-a" in leftovers or f"{self.name}-b" in leftovers:
            argv = [sys.executable, "-m", "transport.cli", "link", "--bridge", "--cleanup"]
            subprocess.run([*argv, "--name", self.name], capture_output=True, check=False)

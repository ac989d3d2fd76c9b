"""Edge agent configuration: typed, strict (unknown keys are errors), defaults in one place.

The commented example with every default is config/edge.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edge.placement import placement_order
from transport.configload import build, load_yaml
from transport.errors import ConfigError


@dataclass(slots=True)
class DeviceFiles:
    """The device's certificate, key, and the CA that signs the hub's certificate."""

    cert: str
    key: str
    ca: str


@dataclass(slots=True)
class SpoolConfig:
    """The on-disk spool: where, how big, how durable."""

    path: str = "spool.db"
    max_bytes: int = 256 * 1024 * 1024
    durability: Literal["always", "batch"] = "batch"
    group_commit_ms: int = 50

    def validate(self) -> None:
        """Reject impossible values."""
        if self.max_bytes < 64 * 1024:
            raise ValueError("spool.max_bytes must be at least 65536")
        if not 1 <= self.group_commit_ms <= 10_000:
            raise ValueError("spool.group_commit_ms must be within 1..10000")


@dataclass(slots=True)
class SenderSettings:
    """Batching and windows."""

    batch_max_records: int = 100
    linger_ms: int = 1000  # telemetry and bulk; the critical lane never waits
    window_records: int = 2000
    small_batches_in_flight: int = 2  # see transport.session.SenderConfig; 0: off
    heartbeat_s: float = 10.0
    idle_timeout_s: float = 60.0

    def validate(self) -> None:
        """Reject impossible values."""
        if not 1 <= self.batch_max_records <= 4096:
            raise ValueError("sender.batch_max_records must be within 1..4096")
        if not 0 <= self.small_batches_in_flight <= 64:
            raise ValueError("sender.small_batches_in_flight must be within 0..64 (0: off)")
        if self.heartbeat_s <= 0 or self.heartbeat_s >= self.idle_timeout_s:
            raise ValueError("sender.heartbeat_s must be positive and below idle_timeout_s")


@dataclass(slots=True)
class BackoffSettings:
    """Reconnect backoff (full jitter) and failover."""

    base_s: float = 0.5
    cap_s: float = 60.0
    failover_after: int = 2


@dataclass(slots=True)
class SyslogInput:
    """Syslog listener addresses ("host:port"; empty = off)."""

    udp: str = ""
    tcp: str = ""
    max_message_bytes: int = 8192
    max_tcp_clients: int = 64


@dataclass(slots=True)
class JsonlInput:
    """JSON-lines input: stdin and/or tailed files."""

    stdin: bool = False
    files: list[str] = field(default_factory=list)
    max_line_bytes: int = 65536


@dataclass(slots=True)
class Inputs:
    """Local inputs."""

    syslog: SyslogInput = field(default_factory=SyslogInput)
    jsonl: JsonlInput = field(default_factory=JsonlInput)


@dataclass(slots=True)
class EdgeConfig:
    """Everything the edge agent reads from its YAML file."""

    device: DeviceFiles
    hubs: list[str] = field(default_factory=lambda: ["127.0.0.1:4433"])
    # rendezvous: hubs ordered by rendezvous hashing of the device id (home first);
    # listed: in the order written (an explicit primary, then standbys)
    placement: Literal["rendezvous", "listed"] = "rendezvous"
    server_name: str = "localhost"
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    sender: SenderSettings = field(default_factory=SenderSettings)
    backoff: BackoffSettings = field(default_factory=BackoffSettings)
    inputs: Inputs = field(default_factory=Inputs)
    ticket_path: str = ""  # default: next to the spool
    metrics_port: int = 0  # 0: no /metrics listener
    metrics_host: str = "127.0.0.1"

    def validate(self) -> None:
        """Reject impossible values."""
        if not self.hubs:
            raise ValueError("hubs: at least one hub address is needed")
        for h in self.hubs:
            parse_hostport(h)
        if len(set(self.hubs)) != len(self.hubs):
            raise ValueError("hubs: an address is listed twice")

    def hub_order(self, device: str) -> list[str]:
        """The hubs in the order ``device`` tries them: home first, then failover."""
        if self.placement == "listed":
            return list(self.hubs)
        return placement_order(self.hubs, device)


def parse_hostport(text: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' to a tuple; ValueError says what was expected."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def load_edge_config(path: str | Path) -> EdgeConfig:
    """Load and check an edge config; relative paths are taken from the file's folder."""
    p = Path(path)
    cfg = build(EdgeConfig, load_yaml(p), path=str(p))
    base = p.parent
    for key in ("cert", "key", "ca"):
        value = getattr(cfg.device, key)
        full = (base / value) if not Path(value).is_absolute() else Path(value)
        if not full.is_file():
            raise ConfigError(str(p), f"device.{key}", f"file not found: {full}")
        setattr(cfg.device, key, str(full))
    if not Path(cfg.spool.path).is_absolute():
        cfg.spool.path = str(base / cfg.spool.path)
    if cfg.ticket_path and not Path(cfg.ticket_path).is_absolute():
        cfg.ticket_path = str(base / cfg.ticket_path)
    return cfg

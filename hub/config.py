"""Hub configuration: typed, strict (unknown keys are errors), defaults in one place.

The commented example with every default is config/hub.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transport.configload import build, load_yaml
from transport.errors import ConfigError


@dataclass(slots=True)
class TlsFiles:
    """The hub's certificate and key, and the CA that signs device certificates."""

    cert: str
    key: str
    device_ca: str


@dataclass(slots=True)
class DeviceLimits:
    """Per-device limits; over a rate limit the hub withholds CREDIT (the device slows)."""

    records_per_s: float = 0.0  # 0: unlimited
    bytes_per_s: float = 0.0
    burst_s: float = 2.0
    window_records: int = 8000
    max_frame_bytes: int = 1 << 20

    def validate(self) -> None:
        """Reject impossible values."""
        if self.window_records < 100:
            raise ValueError("limits.window_records must be at least 100")
        if not 1024 <= self.max_frame_bytes <= 1 << 20:
            raise ValueError("limits.max_frame_bytes must be within 1024..1048576")


@dataclass(slots=True)
class ServerLimits:
    """Bounds of the QUIC server."""

    max_connections: int = 10_000
    max_handshakes: int = 200
    busy_retry_after_ms: int = 5_000
    idle_timeout_s: float = 90.0
    handshake_timeout_s: float = 10.0
    max_tickets: int = 100_000
    udp_receive_buffer_bytes: int = 4 << 20


@dataclass(slots=True)
class LogSettings:
    """The durable log (SQLite, WAL)."""

    path: str = "hub.db"
    synchronous: Literal["full", "normal"] = "normal"
    group_commit_ms: float = 5.0
    group_commit_records: int = 20_000
    retention_max_age_s: float = 7 * 24 * 3600.0
    retention_max_bytes: int = 10 * 1024**3
    retention_hard_max_bytes: int = 0  # 0: none; above it, unread data goes too (counted)

    def validate(self) -> None:
        """Reject impossible values."""
        hard = self.retention_hard_max_bytes
        if hard and hard < self.retention_max_bytes:
            raise ValueError("log.retention_hard_max_bytes must not be below retention_max_bytes")


@dataclass(slots=True)
class PresenceSettings:
    """Presence thresholds."""

    stale_after_s: float = 30.0
    offline_after_s: float = 120.0
    max_devices: int = 100_000


@dataclass(slots=True)
class HttpSettings:
    """The HTTP API: bound to loopback unless told otherwise; token for all but health."""

    listen: str = "127.0.0.1:8080"
    token: str = ""  # empty: every /v1 and /metrics request is refused (401)
    enabled: bool = True


@dataclass(slots=True)
class HubConfig:
    """Everything the hub reads from its YAML file."""

    tls: TlsFiles
    listen: str = "127.0.0.1:4433"
    limits: DeviceLimits = field(default_factory=DeviceLimits)
    server: ServerLimits = field(default_factory=ServerLimits)
    log: LogSettings = field(default_factory=LogSettings)
    presence: PresenceSettings = field(default_factory=PresenceSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    deny_list: str = ""  # file: one device id or certificate serial (hex or decimal) per line


def load_hub_config(path: str | Path) -> HubConfig:
    """Load and check a hub config; relative paths are taken from the file's folder."""
    p = Path(path)
    cfg = build(HubConfig, load_yaml(p), path=str(p))
    base = p.parent
    for key in ("cert", "key", "device_ca"):
        value = getattr(cfg.tls, key)
        full = Path(value) if Path(value).is_absolute() else base / value
        if not full.is_file():
            raise ConfigError(str(p), f"tls.{key}", f"file not found: {full}")
        setattr(cfg.tls, key, str(full))
    if not Path(cfg.log.path).is_absolute():
        cfg.log.path = str(base / cfg.log.path)
    if cfg.deny_list and not Path(cfg.deny_list).is_absolute():
        cfg.deny_list = str(base / cfg.deny_list)
    return cfg

"""Hub configuration: typed, strict (unknown keys are errors), defaults in one place.

The commented example with every default is config/hub.yaml.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hub.alerts import load_rules
from hub.alertsinks import AlertSettings
from hub.archive import ArchiveSettings
from hub.filters import compile_filter
from hub.jslog import JetStreamSettings
from hub.subjects import validate_pattern
from hub.syslogfwd import SyslogForwardSettings
from transport.configload import build, load_yaml
from transport.errors import ConfigError, SquallError
from transport.quic import DEFAULT_MAX_STREAMS

MAX_STREAMS_CEILING = 128  # aioquic's stream credit per direction: more could never be opened


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
    # streams a device may open (control + one per lane it uses); one more: PROTOCOL_VIOLATION
    max_streams: int = DEFAULT_MAX_STREAMS

    def validate(self) -> None:
        """Reject impossible values."""
        if self.window_records < 100:
            raise ValueError("limits.window_records must be at least 100")
        if not 1024 <= self.max_frame_bytes <= 1 << 20:
            raise ValueError("limits.max_frame_bytes must be within 1024..1048576")
        if not 2 <= self.max_streams <= MAX_STREAMS_CEILING:
            raise ValueError(
                f"limits.max_streams must be within 2..{MAX_STREAMS_CEILING} (the control "
                f"stream and at least one lane; {DEFAULT_MAX_STREAMS} carries all three lanes)"
            )


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
    stateless_resets_per_s: int = 1000  # answers to packets of unknown connections; 0: none

    def validate(self) -> None:
        """Reject bounds that would refuse every device or never time out."""
        if self.max_connections < 1 or self.max_handshakes < 1:
            raise ValueError("server.max_connections and server.max_handshakes must be at least 1")
        if not 1 <= self.busy_retry_after_ms <= 3_600_000:
            raise ValueError("server.busy_retry_after_ms must be within 1..3600000")
        if self.idle_timeout_s <= 0 or self.handshake_timeout_s <= 0:
            raise ValueError(
                "server.idle_timeout_s and server.handshake_timeout_s must be positive"
            )
        if self.max_tickets < 0:
            raise ValueError("server.max_tickets must not be negative")
        if self.udp_receive_buffer_bytes < 65_536:
            raise ValueError("server.udp_receive_buffer_bytes must be at least 65536")
        if self.stateless_resets_per_s < 0:
            raise ValueError("server.stateless_resets_per_s must not be negative")


@dataclass(slots=True)
class LogSettings:
    """The durable log: SQLite (WAL) in this process, or JetStream shared by many hubs."""

    backend: Literal["sqlite", "jetstream"] = "sqlite"  # jetstream: see the jetstream section
    path: str = "hub.db"  # sqlite only
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


_TENANT = re.compile(r"[A-Za-z0-9_-]{1,64}")
_QUEUE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MIN_TOKEN_CHARS = 16


@dataclass(slots=True)
class HttpSettings:
    """The HTTP API: bound to loopback unless told otherwise; token for all but health."""

    listen: str = "127.0.0.1:8080"
    token: str = ""  # empty: every /v1 and /metrics request is refused (401)
    enabled: bool = True
    # tenant -> bearer token: /v1/subscribe and /v1/subscriptions, that tenant's subjects only
    tenant_tokens: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        """Tenant names are subject tokens; every token is long and used once."""
        seen = {self.token} if self.token else set()
        for tenant, token in self.tenant_tokens.items():
            if not _TENANT.fullmatch(tenant):
                raise ValueError(f"http.tenant_tokens: {tenant!r} is not a tenant name")
            if len(token) < MIN_TOKEN_CHARS:
                raise ValueError(
                    f"http.tenant_tokens.{tenant}: a token needs at least {MIN_TOKEN_CHARS} chars"
                )
            if token in seen:
                raise ValueError(f"http.tenant_tokens.{tenant}: token already used elsewhere")
            seen.add(token)


@dataclass(slots=True)
class KernelSettings:
    """The kernel (selective pub-sub): queue bounds, idle times, subscriber windows."""

    max_pending: int = 10_000  # default and ceiling of a queue's bound (subscribe may ask less)
    default_policy: Literal["block", "drop-oldest"] = "block"
    queue_idle_s: float = 300.0  # a named queue with no subscriber this long is removed
    durable_idle_s: float = 86_400.0  # the same for durable queues made by subscribe (offset too)
    max_queues: int = 10_000
    max_queues_per_tenant: int = 1_000
    max_subscribers: int = 1_000
    subscriber_window: int = 256  # entries a subscriber holds unsent (durable: unacked)
    catchup_batch: int = 1_000  # records per catch-up read of the log
    match_cache: int = 65_536  # subjects whose match results are cached

    def validate(self) -> None:
        """Reject impossible values."""
        for name in ("max_pending", "max_queues", "max_queues_per_tenant", "max_subscribers"):
            if getattr(self, name) < 1:
                raise ValueError(f"kernel.{name} must be at least 1")
        if not 1 <= self.subscriber_window <= 100_000:
            raise ValueError("kernel.subscriber_window must be within 1..100000")
        if not 1 <= self.catchup_batch <= 100_000:
            raise ValueError("kernel.catchup_batch must be within 1..100000")
        if self.match_cache < 0:
            raise ValueError("kernel.match_cache must not be negative")
        if self.queue_idle_s <= 0 or self.durable_idle_s <= 0:
            raise ValueError("kernel.queue_idle_s and kernel.durable_idle_s must be positive")


@dataclass(slots=True)
class SubscriptionSettings:
    """A named queue the hub creates at start (durable by default); removed only by DELETE."""

    queue: str
    subject: str  # NATS pattern; its first token is the tenant (a wildcard: every tenant)
    filter: str = ""
    durable: bool = True
    policy: Literal["block", "drop-oldest", ""] = ""  # "": kernel.default_policy (durable: block)
    max_pending: int = 0  # 0: kernel.max_pending
    start: Literal["now", "earliest"] | int = "now"  # used only while no offset is committed

    def validate(self) -> None:
        """The queue name's syntax; pattern and filter are checked when the kernel compiles them."""
        if not _QUEUE.fullmatch(self.queue):
            raise ValueError(f"queue {self.queue!r} is not 1-64 of [A-Za-z0-9_-]")
        if self.max_pending < 0:
            raise ValueError(f"queue {self.queue!r}: max_pending must not be negative")
        if isinstance(self.start, int) and self.start < 1:
            raise ValueError(f"queue {self.queue!r}: start offset must be at least 1")
        if self.durable and self.policy == "drop-oldest":
            raise ValueError(f"queue {self.queue!r}: a durable queue's policy is block")
        try:
            validate_pattern(self.subject)
            if self.filter.strip():
                compile_filter(self.filter)
        except SquallError as exc:
            raise ValueError(f"queue {self.queue!r}: {exc}") from exc


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
    kernel: KernelSettings = field(default_factory=KernelSettings)
    subscriptions: list[SubscriptionSettings] = field(default_factory=list)
    archives: list[ArchiveSettings] = field(default_factory=list)
    syslog_forwarders: list[SyslogForwardSettings] = field(default_factory=list)
    alerts: AlertSettings | None = None  # null: no alert consumer
    deny_list: str = ""  # file: one device id or certificate serial (hex or decimal) per line
    jetstream: JetStreamSettings = field(default_factory=JetStreamSettings)
    name: str = ""  # this hub in shared presence (jetstream); "": <hostname>:<udp port>

    def validate(self) -> None:
        """Queue names are unique per tenant; the jetstream backend runs no consumers here."""
        if self.log.backend == "jetstream":
            self._validate_jetstream()
        seen: set[tuple[str, str]] = set()
        for sub in self.subscriptions:
            key = (sub.subject.split(".", 1)[0], sub.queue)
            if key in seen:
                raise ValueError(f"subscriptions: queue {sub.queue!r} is listed twice")
            seen.add(key)
        # durable consumers share the log's consumer table: one name, one offset
        names = [a.name for a in self.archives] + [f.name for f in self.syslog_forwarders]
        names += [self.alerts.name] if self.alerts else []
        names += [f"sub:{s.subject.split('.', 1)[0]}:{s.queue}" for s in self.subscriptions]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(
                f"consumer name {dup[0]!r} is used twice (archives, syslog_forwarders, alerts)"
            )

    def _validate_jetstream(self) -> None:
        given = [
            key
            for key, value in (
                ("archives", self.archives),
                ("syslog_forwarders", self.syslog_forwarders),
                ("alerts", self.alerts),
            )
            if value
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)}: with log.backend jetstream the hub runs no durable "
                "consumers; run them against the shared log with `squall consume --config "
                "consume.yaml` (see config/consume.yaml)"
            )
        if self.subscriptions:
            raise ValueError(
                "subscriptions: live subscriptions read the local log, which log.backend "
                "jetstream does not have; use a JetStream consumer or `squall consume`"
            )


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
    for arc in cfg.archives:
        arc.directory = _under(base, arc.directory)
    if cfg.alerts is not None:
        cfg.alerts.rules = _under(base, cfg.alerts.rules)
        if cfg.alerts.state_path:
            cfg.alerts.state_path = _under(base, cfg.alerts.state_path)
        if not Path(cfg.alerts.rules).is_file():
            raise ConfigError(str(p), "alerts.rules", f"file not found: {cfg.alerts.rules}")
        load_rules(cfg.alerts.rules)  # a bad rule fails now (ConfigError naming its file and key)
    return cfg


def _under(base: Path, value: str) -> str:
    """``value`` taken from the config file's folder unless it is absolute."""
    return value if Path(value).is_absolute() else str(base / value)

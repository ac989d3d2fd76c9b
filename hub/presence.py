"""Device presence (sans-I/O): online / stale / offline from traffic and heartbeats.

A device is *online* while it has a live session and was heard from within
``stale_after_s``; *stale* when its session lives but has been silent longer; *offline*
when its session has ended (or it was silent for ``offline_after_s``).  Each change is
returned as a ``PresenceChange`` for the hub to publish on ``<tenant>.<device>.presence``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class State(Enum):
    """Presence states."""

    ONLINE = "online"
    STALE = "stale"
    OFFLINE = "offline"


@dataclass(slots=True)
class DeviceInfo:
    """What the hub knows about one device (exported by GET /v1/devices)."""

    tenant: str
    device: str
    state: State = State.OFFLINE
    since: float = 0.0
    last_seen: float = 0.0
    sessions: int = 0  # live sessions (0 or 1 normally)
    last_seq: int = 0
    address: str = ""
    heartbeat: dict[str, Any] = field(default_factory=dict)
    records: int = 0
    duplicates: int = 0

    def as_json(self, now: float) -> dict[str, Any]:
        """The API view of this device."""
        hb = self.heartbeat
        return {
            "tenant": self.tenant,
            "device": self.device,
            "presence": self.state.value,
            "since_s": round(now - self.since, 1),
            "last_seen_s_ago": round(now - self.last_seen, 1) if self.last_seen else None,
            "last_seq": self.last_seq,
            "spool_depth": hb.get("d", {}),
            "drops": hb.get("drop", {}),
            "rtt_ms": hb.get("rtt_ms"),
            "loss": hb.get("loss"),
            "oldest_unsent_s": hb.get("age", {}),
            "address": self.address,
            "records": self.records,
            "duplicates": self.duplicates,
        }


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """A device moved from one state to another."""

    tenant: str
    device: str
    old: State
    new: State
    at: float
    heartbeat: dict[str, Any]


class Presence:
    """Tracks every device seen; bounded by ``max_devices`` (oldest offline forgotten first)."""

    def __init__(
        self,
        stale_after_s: float = 30.0,
        offline_after_s: float = 120.0,
        max_devices: int = 100_000,
    ) -> None:
        self.stale_after_s = stale_after_s
        self.offline_after_s = offline_after_s
        self.max_devices = max_devices
        self.devices: dict[tuple[str, str], DeviceInfo] = {}
        self._changes: list[PresenceChange] = []
        self.forgotten = 0

    def _get(self, tenant: str, device: str) -> DeviceInfo:
        key = (tenant, device)
        info = self.devices.get(key)
        if info is None:
            if len(self.devices) >= self.max_devices:
                self._forget_one()
            info = self.devices[key] = DeviceInfo(tenant, device)
        return info

    def _forget_one(self) -> None:
        offline = [i for i in self.devices.values() if i.state is State.OFFLINE]
        victim = min(offline or self.devices.values(), key=lambda i: i.last_seen)
        del self.devices[(victim.tenant, victim.device)]
        self.forgotten += 1

    def _set(self, info: DeviceInfo, state: State, now: float) -> None:
        if info.state is not state:
            self._changes.append(
                PresenceChange(
                    info.tenant, info.device, info.state, state, now, dict(info.heartbeat)
                )
            )
            info.state = state
            info.since = now

    def connected(self, tenant: str, device: str, address: str, now: float) -> None:
        """A session for the device began."""
        info = self._get(tenant, device)
        info.sessions += 1
        info.address = address
        info.last_seen = now
        self._set(info, State.ONLINE, now)

    def disconnected(self, tenant: str, device: str, now: float) -> None:
        """A session for the device ended."""
        info = self._get(tenant, device)
        info.sessions = max(0, info.sessions - 1)
        if info.sessions == 0:
            self._set(info, State.OFFLINE, now)

    def heard(
        self, tenant: str, device: str, now: float, last_seq: int = 0, records: int = 0
    ) -> None:
        """Traffic from the device."""
        info = self._get(tenant, device)
        info.last_seen = now
        info.last_seq = max(info.last_seq, last_seq)
        info.records += records
        if info.sessions:
            self._set(info, State.ONLINE, now)

    def heartbeat(self, tenant: str, device: str, stats: dict[str, Any], now: float) -> None:
        """A heartbeat from the device."""
        info = self._get(tenant, device)
        info.heartbeat = stats
        self.heard(tenant, device, now)

    def tick(self, now: float) -> None:
        """Move silent devices to stale or offline."""
        for info in self.devices.values():
            silent = now - info.last_seen
            if info.state is State.ONLINE and silent > self.stale_after_s:
                self._set(info, State.STALE, now)
            elif info.state is State.STALE and silent > self.offline_after_s:
                self._set(info, State.OFFLINE, now)

    def take_changes(self) -> list[PresenceChange]:
        """Changes since the last call, in order."""
        out, self._changes = self._changes, []
        return out

    def counts(self) -> dict[str, int]:
        """Devices per state."""
        out = {s.value: 0 for s in State}
        for info in self.devices.values():
            out[info.state.value] += 1
        return out

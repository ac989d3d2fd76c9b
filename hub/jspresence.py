"""Presence shared by many hubs through a JetStream key-value bucket.

Each hub keeps its own ``hub.presence.Presence`` core for the devices connected to
it and writes every ``PresenceChange`` to the bucket under ``<tenant>.<device>``
(a JSON value naming the hub).  An alert consumer in its own process reads the
bucket and so sees devices on every hub.

A device that moves from hub A to hub B is online at B before A notices that its
old session ended.  So the last writer must not simply win: *online* from any hub is
written as it comes (the device's newest session speaks), while *stale* and
*offline* are written only if the entry still names the hub that reports them -- a
compare-and-set on the entry's revision, retried once if another hub wrote in
between.  An A's late "stale" or "offline" for a device now on B is dropped (counted).

The same changes also go into the shared log as ``<tenant>.<device>.presence``
records (``publish(changes, log)``), under the same rule, checked against the
device's last presence record in the stream (``hub.jslog.publish_local``'s
compare-and-set).  That is where alert consumers (``squall consume``) read presence:
in the log, in time order with the data, exactly as the embedded alert consumer
reads the SQLite log's presence records.  The bucket is the current view for people
and tools (``GET /v1/presence/shared`` on any hub).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.kv import KeyValue

from hub.jslog import NATS_FAILURES, JetStreamLog, JetStreamLogError, JetStreamSettings, connect
from hub.log import LogEntry
from hub.presence import PresenceChange, State

LIST_TIMEOUT_S = 2.0  # one listing of the bucket's keys
LIST_TRIES = 3  # listings tried before current() gives up

DEFAULT_BUCKET = "squall_presence"


@dataclass(frozen=True, slots=True)
class SharedPresence:
    """One device's presence as the bucket holds it."""

    tenant: str
    device: str
    state: State
    hub: str
    at: float
    heartbeat: dict[str, Any]


def presence_key(tenant: str, device: str) -> str:
    """The bucket key of a device."""
    return f"{tenant}.{device}"


def encode_presence(change: PresenceChange, hub: str) -> bytes:
    """The bucket value for one change reported by ``hub``."""
    return json.dumps(
        {
            "state": change.new.value,
            "previous": change.old.value,
            "hub": hub,
            "at": change.at,
            "heartbeat": change.heartbeat,
        },
        separators=(",", ":"),
    ).encode()


def decode_presence(key: str, value: bytes) -> SharedPresence:
    """A bucket entry back; JetStreamLogError if it is not one of ours."""
    tenant, _, device = key.partition(".")
    try:
        doc = json.loads(value)
        return SharedPresence(
            tenant, device, State(doc["state"]), str(doc["hub"]), float(doc["at"]), doc["heartbeat"]
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise JetStreamLogError(f"presence entry {key!r} is not Squall's: {exc}") from exc


def may_write(change: PresenceChange, owner: str | None, hub: str) -> bool:
    """Whether ``hub`` may write ``change`` over an entry last written by ``owner``."""
    return change.new is State.ONLINE or owner in (None, hub)


def presence_record(change: PresenceChange, hub: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(subject, body, attrs) of the log record of one change (attrs name the hub)."""
    body = {"state": change.new.value, "previous": change.old.value, "heartbeat": change.heartbeat}
    return f"{change.tenant}.{change.device}.presence", body, {"hub": hub}


def record_owner(last: LogEntry | None) -> str | None:
    """The hub that wrote a presence record (None: no record)."""
    if last is None:
        return None
    hub = last.attrs.get("hub")
    return str(hub) if hub is not None else ""


@dataclass(slots=True)
class SharedPresenceStats:
    """Counters (for metrics)."""

    written: int = 0
    superseded: int = 0  # stale/offline reports dropped: the device is on another hub now
    errors: int = 0
    logged: int = 0  # presence records stored in the shared log


class JetStreamPresence:
    """Writes this hub's presence changes to the shared bucket; reads everybody's."""

    def __init__(
        self, settings: JetStreamSettings, hub: str, *, bucket: str = DEFAULT_BUCKET
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.bucket = bucket
        self.stats = SharedPresenceStats()
        self._nc: NATS | None = None
        self._kv: KeyValue | None = None

    async def open(self, nc: NATS | None = None) -> None:
        """Connect and create the bucket if it is missing."""
        self._nc = nc or await connect(self.settings, f"squall-presence-{self.hub}")
        js = self._nc.jetstream(timeout=self.settings.publish_timeout_s)
        try:
            self._kv = await js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            file = self.settings.storage == "file"
            self._kv = await js.create_key_value(
                bucket=self.bucket,
                history=1,
                replicas=self.settings.replicas,
                storage=api.StorageType.FILE if file else api.StorageType.MEMORY,
            )
        except (*NATS_FAILURES, nats.js.errors.Error) as exc:
            raise JetStreamLogError(f"presence bucket {self.bucket}: {exc!r}") from exc

    def _bucket(self) -> KeyValue:
        if self._kv is None:
            raise JetStreamLogError("shared presence is not open")
        return self._kv

    async def publish(
        self, changes: Iterable[PresenceChange], log: JetStreamLog | None = None
    ) -> None:
        """Write each change (stale and offline only over this hub's own entry).

        With ``log``, each change also becomes a presence record in the shared log
        (first, under the same rule); JetStreamLogError leaves the rest unwritten.
        """
        kv = self._bucket()
        for ch in changes:
            try:
                if log is not None:
                    await self._log_change(log, ch)
                await self._write(kv, ch)
            except (*NATS_FAILURES, nats.js.errors.Error, JetStreamLogError) as exc:
                self.stats.errors += 1
                raise JetStreamLogError(f"presence of {ch.tenant}/{ch.device}: {exc!r}") from exc

    async def _log_change(self, log: JetStreamLog, ch: PresenceChange) -> None:
        subject, body, attrs = presence_record(ch, self.hub)

        def allowed(last: LogEntry | None) -> bool:
            return may_write(ch, record_owner(last), self.hub)

        stored = await log.append_local(ch.tenant, ch.device, subject, body, attrs, ch.at, allowed)
        if stored is not None:
            self.stats.logged += 1

    async def _write(self, kv: KeyValue, ch: PresenceChange) -> None:
        key = presence_key(ch.tenant, ch.device)
        value = encode_presence(ch, self.hub)
        if ch.new is State.ONLINE:
            await kv.put(key, value)
            self.stats.written += 1
            return
        for _ in range(2):
            try:
                if not await self._offline_over(kv, key, ch, value):
                    self.stats.superseded += 1
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another hub wrote in between: look again
        self.stats.superseded += 1

    async def _offline_over(self, kv: KeyValue, key: str, ch: PresenceChange, value: bytes) -> bool:
        """Compare-and-set a stale/offline report; False when another hub owns the entry."""
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            await kv.create(key, value)
            self.stats.written += 1
            return True
        if not may_write(ch, decode_presence(key, entry.value or b"").hub, self.hub):
            return False
        await kv.update(key, value, last=entry.revision)
        self.stats.written += 1
        return True

    async def current(self) -> dict[tuple[str, str], SharedPresence]:
        """Every device's presence as the bucket holds it now."""
        kv = self._bucket()
        out: dict[tuple[str, str], SharedPresence] = {}
        keys: list[str] = []
        # nats-py lists keys through a watcher that waits for an end-of-snapshot marker; a
        # listing that races a hub's rewrite of a key can wait for it forever.  Each try is
        # bounded; after LIST_TRIES the caller gets JetStreamLogError (HTTP: 503).
        for attempt in range(1, LIST_TRIES + 1):
            try:
                keys = await asyncio.wait_for(kv.keys(), LIST_TIMEOUT_S)
                break
            except nats.js.errors.NoKeysError:
                return out
            except TimeoutError as exc:
                if attempt == LIST_TRIES:
                    raise JetStreamLogError(
                        f"presence bucket {self.bucket}: listing its keys timed out "
                        f"{LIST_TRIES} times ({LIST_TIMEOUT_S} s each)"
                    ) from exc
            except (*NATS_FAILURES, nats.js.errors.Error) as exc:
                raise JetStreamLogError(f"presence bucket {self.bucket}: {exc!r}") from exc
        for key in keys:
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                entry = await kv.get(key)
                p = decode_presence(key, entry.value or b"")
                out[(p.tenant, p.device)] = p
        return out

    async def close(self) -> None:
        """Close the connection."""
        nc, self._nc, self._kv = self._nc, None, None
        if nc is not None:
            with contextlib.suppress(*NATS_FAILURES):
                await nc.close()

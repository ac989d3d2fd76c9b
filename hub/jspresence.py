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

Listing (``current()``) reads the bucket's stream (``KV_<bucket>``) itself, not
through nats-py's key watcher: one ephemeral pull consumer (newest message per key,
no acks, removed by the server after ``LIST_INACTIVE_S`` if the lister dies) is
drained until the last message says nothing is pending or every key the stream holds
has been seen (``BucketSnapshot``), and deleted afterwards.  A key rewritten meanwhile
is still delivered (its newest value seen wins); deleted and purged keys are left out.
The whole listing has one deadline (``LIST_DEADLINE_S``) and a size cap
(``MAX_LISTED``); beyond either, and on any NATS failure, it raises
``JetStreamLogError`` (HTTP 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, JetStreamManager, api
from nats.js.kv import KeyValue

from hub.jslog import NATS_FAILURES, JetStreamLog, JetStreamLogError, JetStreamSettings, connect
from hub.log import LogEntry
from hub.presence import PresenceChange, State

# Listing the bucket (current()).  At a limit the listing fails with JetStreamLogError
# (HTTP 503) and leaves nothing behind on the server.
LIST_DEADLINE_S = 10.0  # one whole listing: consumer created, snapshot drained
LIST_FETCH_WAIT_S = 0.5  # longest wait of one fetch (an empty one may end the snapshot)
LIST_BATCH = 512  # messages asked for per fetch
LIST_INACTIVE_S = 5.0  # the server deletes a lister's consumer idle this long (lister died)
LIST_CLEANUP_S = 2.0  # deleting the consumer afterwards (beyond: LIST_INACTIVE_S does it)
# Keys (deleted ones included) one listing reads at most: the hub's presence.max_devices
# is per hub and not known here, so a fixed cap -- one hub's default -- bounds memory and
# the HTTP answer; at ~25,000 keys/s (measured on 2 shared cores) it also fits the
# deadline.  A bigger bucket fails the listing rather than answering a part of it.
MAX_LISTED = 100_000

KV_OPERATION = "KV-Operation"  # header of JetStream KV markers
KV_REMOVED = frozenset({"DEL", "PURGE"})  # markers of a deleted or purged key

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


@dataclass(frozen=True, slots=True)
class StreamCount:
    """What the bucket's stream info says about its keys."""

    messages: int
    expires: bool  # max_age set: keys may vanish, a count proves nothing
    history: int  # messages kept per key (max_msgs_per_subject)

    @property
    def exact(self) -> bool:
        """Whether ``messages`` is the number of keys (one message each, none expiring)."""
        return self.history == 1 and not self.expires


class BucketSnapshot:
    """Folds the bucket stream's newest-per-key messages into the current entries (no I/O).

    Messages come in stream order; a later message of a key replaces the earlier one, a
    DEL/PURGE marker removes it.  The snapshot is complete (``done``) when the last
    message of a fetch says the consumer holds nothing more (``fetched``), or -- so that
    a listing does not chase other hubs' rewrites to the stream's tail -- when every key
    the stream holds has been seen once: a key that existed when the listing began keeps
    at least one message (its value or its marker) as long as the stream expires
    nothing, so once the stream holds no more messages than keys seen, none is missing
    (``covered_by``).
    """

    def __init__(self, bucket: str, limit: int | None = None) -> None:
        self.bucket = bucket
        self.prefix = f"$KV.{bucket}."
        self.limit = MAX_LISTED if limit is None else limit
        self.entries: dict[tuple[str, str], SharedPresence] = {}
        self.seen: set[str] = set()  # every key delivered, deleted ones included
        self.messages = 0
        self.floor = 0  # keys the stream held when the listing began (consumer's pending)
        self.done = False

    def start(self, pending: int) -> None:
        """The consumer's first pending count: zero is an empty bucket."""
        self.floor = pending
        self.done = pending == 0

    def add(self, subject: str, headers: dict[str, str] | None, value: bytes) -> None:
        """Take one message; JetStreamLogError if it is foreign or the cap is passed."""
        if not subject.startswith(self.prefix):
            raise JetStreamLogError(f"presence bucket {self.bucket}: stray subject {subject!r}")
        key = subject[len(self.prefix) :]
        self.messages += 1
        self.seen.add(key)
        if len(self.seen) > self.limit:
            raise JetStreamLogError(
                f"presence bucket {self.bucket}: more than {self.limit} keys "
                "(MAX_LISTED); not listing a part of them"
            )
        if headers is not None and headers.get(KV_OPERATION) in KV_REMOVED:
            tenant, _, device = key.partition(".")
            self.entries.pop((tenant, device), None)
        else:
            p = decode_presence(key, value)
            self.entries[(p.tenant, p.device)] = p

    def fetched(self, pending: int) -> None:
        """A fetch's messages are in; ``pending``: what its last one says the consumer holds."""
        if pending == 0:
            self.done = True

    def wants_count(self) -> bool:
        """Whether asking the stream's message count may end the listing now."""
        return not self.done and len(self.seen) >= self.floor

    def covered_by(self, count: StreamCount) -> None:
        """Done if the stream holds no key unseen (``count`` taken after a fetch returned)."""
        if not count.expires and count.messages <= len(self.seen):
            self.done = True

    def nothing_fetched(self, count: StreamCount) -> None:
        """An empty fetch ends the listing, unless ``count`` proves a key is still unseen.

        (A slow server answers a fetch late: that must not pass for the snapshot's end.)
        """
        self.covered_by(count)
        if not (count.exact and count.messages > len(self.seen)):
            self.done = True


async def count_keys(jsm: JetStreamManager, stream: str) -> StreamCount:
    """The bucket stream's message count and the limits that say what it means."""
    si = await jsm.stream_info(stream)
    return StreamCount(si.state.messages, bool(si.config.max_age), si.config.max_msgs_per_subject)


def pending_of(msg: Msg) -> int:
    """Messages the consumer still holds after ``msg`` (JetStreamLogError: not a JS message)."""
    try:
        return msg.metadata.num_pending
    except (nats.errors.Error, ValueError, IndexError) as exc:
        raise JetStreamLogError(f"not a JetStream message: {msg.subject!r}") from exc


@dataclass(slots=True)
class SharedPresenceStats:
    """Counters (for metrics)."""

    written: int = 0
    superseded: int = 0  # stale/offline reports dropped: the device is on another hub now
    errors: int = 0
    logged: int = 0  # presence records stored in the shared log
    listings: int = 0  # current() calls answered
    list_failures: int = 0  # current() calls that raised JetStreamLogError


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
        """Every device's presence as the bucket holds it now (JetStreamLogError: unknown)."""
        if self._nc is None or self._kv is None:
            raise JetStreamLogError("shared presence is not open")
        nc = self._nc
        js = nc.jetstream(timeout=self.settings.publish_timeout_s)
        jsm = nc.jsm(timeout=self.settings.publish_timeout_s)
        stream = f"KV_{self.bucket}"
        consumer = f"squall-list-{secrets.token_hex(8)}"  # ours to delete, even if unanswered
        snapshot = BucketSnapshot(self.bucket)
        deadline = asyncio.timeout(LIST_DEADLINE_S)
        try:
            async with deadline:
                await self._replay(js, jsm, stream, consumer, snapshot)
        except (*NATS_FAILURES, nats.js.errors.Error, ValueError) as exc:
            self.stats.list_failures += 1
            if deadline.expired():
                raise JetStreamLogError(
                    f"presence bucket {self.bucket}: listing unfinished after "
                    f"{LIST_DEADLINE_S} s ({snapshot.messages} entries read)"
                ) from exc
            raise JetStreamLogError(f"presence bucket {self.bucket}: listing: {exc!r}") from exc
        except JetStreamLogError:
            self.stats.list_failures += 1
            raise
        finally:
            await self._drop_consumer(nc, jsm, stream, consumer)
        self.stats.listings += 1
        return snapshot.entries

    async def _replay(
        self,
        js: JetStreamContext,
        jsm: JetStreamManager,
        stream: str,
        consumer: str,
        snapshot: BucketSnapshot,
    ) -> None:
        """Drain a newest-per-key consumer of the bucket's stream into ``snapshot``."""
        config = api.ConsumerConfig(
            name=consumer,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=api.AckPolicy.NONE,
            filter_subject=f"{snapshot.prefix}>",
            inactive_threshold=LIST_INACTIVE_S,
            mem_storage=True,
            num_replicas=1,
        )
        info = await jsm.add_consumer(stream, config)
        snapshot.start(info.num_pending or 0)
        if snapshot.done:
            return
        sub = await js.pull_subscribe_bind(consumer=consumer, stream=stream)
        try:
            while not snapshot.done:
                try:
                    batch = await sub.fetch(LIST_BATCH, timeout=LIST_FETCH_WAIT_S)
                except nats.errors.TimeoutError:
                    snapshot.nothing_fetched(await count_keys(jsm, stream))
                    continue
                for msg in batch:
                    snapshot.add(msg.subject, msg.headers, msg.data)
                if batch:  # (parsing each message's metadata would cost a third of the time)
                    snapshot.fetched(pending_of(batch[-1]))
                if snapshot.wants_count():  # other hubs keep writing: are all keys seen?
                    snapshot.covered_by(await count_keys(jsm, stream))
        finally:
            with contextlib.suppress(*NATS_FAILURES, ValueError):
                await sub.unsubscribe()

    async def _drop_consumer(
        self, nc: NATS, jsm: JetStreamManager, stream: str, consumer: str
    ) -> None:
        """Delete a lister consumer; if that fails the server drops it after LIST_INACTIVE_S."""
        if not nc.is_connected:
            return
        with contextlib.suppress(*NATS_FAILURES, nats.js.errors.Error):
            await asyncio.wait_for(jsm.delete_consumer(stream, consumer), LIST_CLEANUP_S)

    async def close(self) -> None:
        """Close the connection."""
        nc, self._nc, self._kv = self._nc, None, None
        if nc is not None:
            with contextlib.suppress(*NATS_FAILURES):
                await nc.close()

"""The hub's log on NATS JetStream: the shared log of many hub processes (scale-out).

One JetStream message per batch, kept whole as the hub received it (like a row of
``hub.log``): subject ``<prefix>.<tenant>.<device>.<incarnation>.<lane>``, a 40-byte
envelope (codec, lane, count, incarnation, first/last seq, received-at) and the
batch payload as it came off the wire.

Writing (``JetStreamLog.append_group``): a group of batches is published (different
devices in parallel, one device's batches in order) and the call returns only when
JetStream acknowledged every one
(stored, and replicated to a quorum with ``replicas`` > 1); only then may the hub ACK
the edges.  Any failure -- server down, timeout, stream full -- raises
``JetStreamLogError`` (a ``hub.log.LogError``) and the hub must not ACK: the edges
keep the records in their spools and send them again.

Stored once.  Each message carries ``Nats-Msg-Id: <tenant>.<device>.<incarnation>.
<lane>.<first_seq>-<last_seq>``: JetStream drops a second message with the same id
within the stream's ``duplicate_window_s`` (the same batch retransmitted after a lost
ACK, or published by a second hub).  The window is a time-bounded memory, so this
module also checks ranges: before it publishes the first batch of a (device,
incarnation, lane) it has not seen lately it reads the last message JetStream holds on
that subject and skips or trims what is already stored, exactly as the SQLite log's
marks do.  So a retransmit after an outage longer than the window -- or cut into
different batches -- is still stored once, as long as the device's earlier records
are still in the stream (not removed by ``max_age_s`` / ``max_bytes``).  The marks
are cached per hub (bounded, LRU); the hub must call ``forget_device`` when a device
connects, because the device may have been on another hub meanwhile.

Reading (``JetStreamConsumer``): a durable pull consumer with explicit acks yields
``hub.log.LogEntry`` records; ``JetStreamLogView`` wraps one in the synchronous
``read`` / ``consumer_offset`` / ``commit_consumer_offset`` / ``first_offset`` calls
that ``hub.archive.JsonArchive`` and ``hub.consumer.LogCursor`` make on ``hub.log.Log``,
so those consumers run unchanged against the shared log.  Record offsets are
``stream_seq * OFFSET_STRIDE + index in the batch``: strictly increasing and never
reused, but not contiguous: the view says so (``contiguous``), and readers then count
no gap in them as retention's or a corrupt batch's.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from hub.log import LOCAL_INCARNATION, LOCAL_LANE, LogEntry, LogError, PendingBatch
from transport.batchcodec import Body, Record, Scalar, decode_batch, encode_batch
from transport.errors import ProtocolError
from transport.limits import MAX_BATCH_RECORDS
from transport.wire import LANES

T = TypeVar("T")

OFFSET_STRIDE = 1 << 16  # > MAX_BATCH_RECORDS: room for every record of a batch
ENVELOPE = struct.Struct("!BBBxIQQQq")  # version, codec, lane, count, inc, first, last, recv_us
ENVELOPE_VERSION = 1
MSG_ID_HEADER = "Nats-Msg-Id"
_WRONG_LAST_SUBJECT_SEQ = 10071  # JetStream's error code: another writer got there first
LOCAL_ATTEMPTS = 5  # a hub-published record retried this often when other writers get first

assert MAX_BATCH_RECORDS < OFFSET_STRIDE

# what nats-py raises when the server is away, slow or refuses (mapped to JetStreamLogError)
NATS_FAILURES = (nats.errors.Error, TimeoutError, OSError)


class JetStreamLogError(LogError):
    """JetStream did not confirm a write or a read: nothing may be acknowledged."""


@dataclass(slots=True)
class JetStreamSettings:
    """Where the shared log lives and how the stream is set up."""

    servers: list[str] = field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    stream: str = "SQUALL"
    subject_prefix: str = "squall.log"  # the stream holds <prefix>.>
    replicas: int = 1  # 3 on a cluster: a batch is ACKed once a quorum stored it
    storage: Literal["file", "memory"] = "file"
    duplicate_window_s: float = 120.0  # same Nats-Msg-Id within it: stored once
    max_age_s: float = 7 * 24 * 3600.0  # 0: no age limit
    max_bytes: int = 10 * 1024**3  # -1: no size limit
    discard: Literal["old", "new"] = "old"  # new: a full stream refuses writes (edges spool)
    publish_timeout_s: float = 5.0  # a group not acknowledged by then fails (no ACK)
    connect_timeout_s: float = 2.0
    reconnect_wait_s: float = 0.5
    max_marks: int = 200_000  # (device, incarnation, lane) marks cached; beyond, LRU
    client_name: str = "squall-hub"

    def validate(self) -> None:
        """Reject impossible values."""
        if not self.servers:
            raise ValueError("jetstream.servers: at least one server is needed")
        if not self.stream or any(c in self.stream for c in ".*> \t"):
            raise ValueError("jetstream.stream: a name without '.', '*', '>' or spaces")
        tokens = self.subject_prefix.split(".")
        if not all(t and not set(t) & set("*> \t") for t in tokens):
            raise ValueError("jetstream.subject_prefix: dot-separated tokens, no wildcards")
        if not 1 <= self.replicas <= 5:
            raise ValueError("jetstream.replicas must be within 1..5")
        if self.duplicate_window_s <= 0 or self.publish_timeout_s <= 0:
            raise ValueError("jetstream: duplicate_window_s and publish_timeout_s must be > 0")
        if self.max_marks < 1000:
            raise ValueError("jetstream.max_marks must be at least 1000")

    def stream_config(self) -> api.StreamConfig:
        """The JetStream stream this log needs."""
        return api.StreamConfig(
            name=self.stream,
            subjects=[f"{self.subject_prefix}.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE if self.storage == "file" else api.StorageType.MEMORY,
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window_s,
            max_age=self.max_age_s or None,
            max_bytes=self.max_bytes,
            discard=api.DiscardPolicy.OLD if self.discard == "old" else api.DiscardPolicy.NEW,
        )


# -- encoding (pure) -----------------------------------------------------------------------


MarkKey = tuple[str, str, int, int]  # tenant, device, incarnation, lane


def batch_subject(prefix: str, key: MarkKey) -> str:
    """The subject one (device, incarnation, lane) publishes on."""
    tenant, device, incarnation, lane = key
    return f"{prefix}.{tenant}.{device}.{incarnation}.{lane}"


def msg_id(key: MarkKey, first_seq: int, last_seq: int) -> str:
    """The JetStream message id of a batch: its (device, incarnation, lane, seq range)."""
    tenant, device, incarnation, lane = key
    return f"{tenant}.{device}.{incarnation}.{lane}.{first_seq}-{last_seq}"


def encode_message(item: PendingBatch) -> bytes:
    """Envelope + payload (encoded here if the session trimmed the batch)."""
    codec, payload = item.codec, item.payload
    if payload is None:
        codec, payload = encode_batch(item.decoded())
    head = ENVELOPE.pack(
        ENVELOPE_VERSION,
        codec,
        item.lane,
        item.count,
        item.incarnation,
        item.first_seq,
        item.last_seq,
        item.received_us,
    )
    return head + payload


@dataclass(frozen=True, slots=True)
class Envelope:
    """The fixed head of a stored batch."""

    codec: int
    lane: int
    count: int
    incarnation: int
    first_seq: int
    last_seq: int
    received_us: int


def decode_envelope(data: bytes) -> Envelope:
    """The head of a stored batch; JetStreamLogError if it is not one of ours."""
    if len(data) < ENVELOPE.size:
        raise JetStreamLogError(f"stored message of {len(data)} bytes is no Squall batch")
    version, codec, lane, count, inc, first, last, recv = ENVELOPE.unpack_from(data)
    if version != ENVELOPE_VERSION or not 0 < count <= MAX_BATCH_RECORDS:
        raise JetStreamLogError(f"stored batch has version {version}, count {count}")
    return Envelope(codec, lane, count, inc, first, last, recv)


def decode_entries(subject: str, stream_seq: int, data: bytes) -> list[LogEntry]:
    """The LogEntries of one stored batch (offsets from its stream sequence)."""
    env = decode_envelope(data)
    parts = subject.split(".")
    if len(parts) < 4:
        raise JetStreamLogError(f"stored batch on unexpected subject {subject!r}")
    tenant, device = parts[-4], parts[-3]
    try:
        records = decode_batch(env.codec, data[ENVELOPE.size :], env.first_seq, env.count)
    except ProtocolError as exc:
        raise JetStreamLogError(f"stored batch {stream_seq} is corrupt: {exc}") from exc
    base = stream_seq * OFFSET_STRIDE
    return [
        LogEntry(
            base + i,
            tenant,
            device,
            env.incarnation,
            env.lane,
            r.seq,
            r.ts,
            r.subject,
            r.attrs,
            r.body,
            env.received_us,
        )
        for i, r in enumerate(records)
    ]


def trim_to_mark(item: PendingBatch, mark: int) -> PendingBatch | None:
    """``item`` without the records at or below ``mark`` (None if nothing is left)."""
    if item.last_seq <= mark:
        return None
    if item.first_seq > mark:
        return item
    fresh = [r for r in item.decoded() if r.seq > mark]
    codec, payload = encode_batch(fresh)
    return PendingBatch(
        item.tenant,
        item.device,
        item.incarnation,
        item.lane,
        fresh,
        codec,
        payload,
        item.received_us,
    )


# -- connection ------------------------------------------------------------------------------


async def connect(settings: JetStreamSettings, name: str = "") -> NATS:
    """A NATS connection that reconnects forever and never buffers publishes while away.

    With no reconnect buffer a write during an outage fails at once (the hub does not
    ACK) instead of reaching the stream later behind the hub's back.  The first
    connection is bounded: nats-py would otherwise retry it forever, and a hub or a
    consumer that cannot reach NATS at start should say so and exit.
    """
    nc = NATS()
    first = max(1.0, settings.connect_timeout_s) * 2 * len(settings.servers) + 1.0
    try:
        await asyncio.wait_for(
            nc.connect(
                servers=settings.servers,
                name=name or settings.client_name,
                connect_timeout=max(1, int(settings.connect_timeout_s)),
                reconnect_time_wait=settings.reconnect_wait_s,  # type: ignore[arg-type]  # a float works
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                pending_size=0,
                error_cb=_quiet,
                disconnected_cb=_quiet0,
                reconnected_cb=_quiet0,
                closed_cb=_quiet0,
            ),
            first,
        )
    except NATS_FAILURES as exc:
        with contextlib.suppress(*NATS_FAILURES):
            await nc.close()
        raise JetStreamLogError(f"cannot reach NATS at {settings.servers}: {exc!r}") from exc
    return nc


async def _quiet(exc: Exception) -> None:
    """nats-py reports connection trouble here; the next call's error says it."""


async def _quiet0() -> None:
    """Connection state changes need no action: calls fail or succeed on their own."""


async def _guard(what: str, call: Awaitable[T]) -> T:
    try:
        return await call
    except NATS_FAILURES as exc:
        raise JetStreamLogError(f"{what}: {exc!r}") from exc


# -- writing ---------------------------------------------------------------------------------


@dataclass(slots=True)
class JetStreamLogStats:
    """Counters since this JetStreamLog was opened (for metrics)."""

    commits: int = 0
    commit_failures: int = 0
    published: int = 0  # messages JetStream acknowledged as new
    records: int = 0  # records in them
    duplicates_window: int = 0  # messages JetStream dropped by Nats-Msg-Id
    duplicates_skipped: int = 0  # records the range check found already stored
    mark_lookups: int = 0  # last-message reads for marks not cached


@dataclass(slots=True)
class _Mark:
    """What the stream holds for one (device, incarnation, lane)."""

    last_seq: int  # highest record seq stored (0: none)
    subject_seq: int  # stream sequence of the last message on its subject (0: none)


class JetStreamLog:
    """Appends the hub's groups of batches to a JetStream stream.

    Within a group, the batches of one (device, incarnation, lane) are published one
    after the other, each once JetStream acknowledged the one before, and each with
    ``Nats-Expected-Last-Subject-Sequence``; different devices go in parallel.  So a
    failure can never leave a gap (a later batch stored, an earlier one not), and a
    hub whose cached mark is stale -- another hub stored more of the device since --
    is told so by JetStream, re-reads the mark and trims, instead of storing twice.
    """

    def __init__(self, settings: JetStreamSettings) -> None:
        self.settings = settings
        self.stats = JetStreamLogStats()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._marks: OrderedDict[MarkKey, _Mark] = OrderedDict()
        self._lock = asyncio.Lock()  # one group in flight: per-device order in the stream

    async def open(self) -> None:
        """Connect and create (or update) the stream."""
        self._nc = await connect(self.settings)
        self._js = self._nc.jetstream(timeout=self.settings.publish_timeout_s)
        await ensure_stream(self._js, self.settings)

    def _context(self) -> JetStreamContext:
        if self._js is None:
            raise JetStreamLogError("the JetStream log is not open")
        return self._js

    @property
    def max_batch_bytes(self) -> int:
        """The largest batch payload the server takes (its max_payload less the envelope).

        The hub must refuse to start when ``limits.max_frame_bytes`` is above it: such a
        batch could never be stored and its device would retry it forever.
        """
        if self._nc is None:
            raise JetStreamLogError("the JetStream log is not open")
        return int(self._nc.max_payload) - ENVELOPE.size - 1024  # headers and subject

    async def append_group(
        self, items: Sequence[PendingBatch], now: float
    ) -> list[tuple[int, int]]:
        """Store the group; returns (base offset, stored count) per item once all are acked.

        A batch already stored gets count 0 (partly stored: the rest is stored and
        counted).  On any failure JetStreamLogError is raised -- the hub must not ACK
        -- and the cached marks of the group's devices are dropped, so the retry
        re-reads them from the stream.
        """
        del now  # JetStream stamps its own time; received_us travels in the envelope
        js = self._context()
        per_key: dict[MarkKey, list[int]] = {}
        for i, item in enumerate(items):
            per_key.setdefault((item.tenant, item.device, item.incarnation, item.lane), []).append(
                i
            )
        result: list[tuple[int, int]] = [(0, 0)] * len(items)
        async with self._lock:
            if self._nc is None or not self._nc.is_connected:
                self.stats.commit_failures += 1
                raise JetStreamLogError("not connected to NATS: the group is not stored")
            try:
                await asyncio.wait_for(
                    asyncio.gather(
                        *(
                            self._append_key(js, k, [items[i] for i in ix], ix, result)
                            for k, ix in per_key.items()
                        )
                    ),
                    timeout=self.settings.publish_timeout_s,
                )
            except (JetStreamLogError, *NATS_FAILURES, nats.js.errors.Error) as exc:
                self.stats.commit_failures += 1
                for key in per_key:
                    self._marks.pop(key, None)
                if isinstance(exc, JetStreamLogError):
                    raise
                raise JetStreamLogError(f"JetStream did not store the group: {exc!r}") from exc
        self.stats.commits += 1
        return result

    async def _append_key(
        self,
        js: JetStreamContext,
        key: MarkKey,
        batches: list[PendingBatch],
        index: list[int],
        result: list[tuple[int, int]],
    ) -> None:
        """Publish one key's batches in order, each after the previous one's ack."""
        mark = await self._mark(js, key)
        subject = batch_subject(self.settings.subject_prefix, key)
        for i, item in zip(index, batches, strict=True):
            for attempt in (1, 2):
                kept = trim_to_mark(item, mark.last_seq)
                if kept is None:
                    self.stats.duplicates_skipped += item.count
                    break
                try:
                    ack = await self._publish_one(js, subject, key, kept, mark.subject_seq)
                except nats.js.errors.APIError as exc:
                    if exc.err_code != _WRONG_LAST_SUBJECT_SEQ or attempt == 2:
                        raise
                    mark = await self._mark(js, key, refresh=True)  # another hub wrote
                    continue
                self.stats.duplicates_skipped += item.count - kept.count
                if ack.duplicate:
                    self.stats.duplicates_window += 1
                    result[i] = (ack.seq * OFFSET_STRIDE, 0)
                    mark = await self._mark(js, key, refresh=True)
                else:
                    self.stats.published += 1
                    self.stats.records += kept.count
                    result[i] = (ack.seq * OFFSET_STRIDE, kept.count)
                    mark = _Mark(kept.last_seq, ack.seq)
                    self._remember(key, mark)
                break

    async def _publish_one(
        self, js: JetStreamContext, subject: str, key: MarkKey, kept: PendingBatch, after: int
    ) -> api.PubAck:
        headers = {
            MSG_ID_HEADER: msg_id(key, kept.first_seq, kept.last_seq),
            api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(after),
        }
        # js.publish (a request), not publish_async: nats-py 2.16's async reply handler
        # raises an API error (wrong last sequence, stream full) instead of setting it
        # on the future, which then never completes
        return await js.publish(
            subject, encode_message(kept), timeout=self.settings.publish_timeout_s, headers=headers
        )

    async def _mark(self, js: JetStreamContext, key: MarkKey, refresh: bool = False) -> _Mark:
        """What the stream holds for ``key``: cached, else read from its last message."""
        cached = None if refresh else self._marks.get(key)
        if cached is not None:
            self._marks.move_to_end(key)
            return cached
        self.stats.mark_lookups += 1
        subject = batch_subject(self.settings.subject_prefix, key)
        try:
            raw = await js._jsm.get_last_msg(self.settings.stream, subject)
        except nats.js.errors.NotFoundError:
            mark = _Mark(0, 0)
        except (*NATS_FAILURES, nats.js.errors.Error) as exc:
            raise JetStreamLogError(f"cannot read the mark of {subject}: {exc!r}") from exc
        else:
            mark = _Mark(decode_envelope(raw.data or b"").last_seq, raw.seq or 0)
        self._remember(key, mark)
        return mark

    def _remember(self, key: MarkKey, mark: _Mark) -> None:
        self._marks[key] = mark
        self._marks.move_to_end(key)
        while len(self._marks) > self.settings.max_marks:
            self._marks.popitem(last=False)

    def forget_device(self, tenant: str, device: str) -> None:
        """Drop the cached marks of a device (when it connects: it may come from a peer).

        Not needed for correctness -- a stale mark is caught by JetStream's
        expected-last-subject-sequence check -- but it saves that round trip.
        """
        for key in [k for k in self._marks if k[0] == tenant and k[1] == device]:
            del self._marks[key]

    async def load_marks(self, tenant: str, device: str, incarnation: int) -> dict[int, int]:
        """Highest stored seq per lane of one device incarnation, read from the stream.

        For the hub's ledger of a device that may have been on another hub.
        """
        js = self._context()
        lanes = [int(lane) for lane in LANES]
        marks = await asyncio.gather(
            *(self._mark(js, (tenant, device, incarnation, lane), refresh=True) for lane in lanes)
        )
        return {lane: m.last_seq for lane, m in zip(lanes, marks, strict=True) if m.last_seq}

    async def append_local(
        self,
        tenant: str,
        device: str,
        subject: str,
        body: Body,
        attrs: Mapping[str, Scalar],
        now: float,
        condition: WriteCondition | None = None,
    ) -> int | None:
        """Store one hub-published record (see ``publish_local``); None if ``condition`` refused."""
        try:
            return await publish_local(
                self._context(), self.settings, tenant, device, subject, body, attrs, now, condition
            )
        except JetStreamLogError:
            self.stats.commit_failures += 1
            raise

    @property
    def connection(self) -> NATS | None:
        """The NATS connection (to share with ``JetStreamPresence``), None while closed."""
        return self._nc

    async def close(self) -> None:
        """Close the connection (pending publishes are abandoned: they were never ACKed)."""
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            with contextlib.suppress(*NATS_FAILURES):
                await nc.close()


# -- hub-published records (presence, alerts) ------------------------------------------------

# Decides, from the last record on the subject (None: none yet), whether to write.
WriteCondition = Callable[[LogEntry | None], bool]


async def last_local(
    js: JetStreamContext, settings: JetStreamSettings, tenant: str, device: str
) -> tuple[int, LogEntry | None]:
    """(stream sequence, last record) of a device's hub-published records ((0, None): none)."""
    key = (tenant, device, LOCAL_INCARNATION, LOCAL_LANE)
    subject = batch_subject(settings.subject_prefix, key)
    try:
        raw = await js._jsm.get_last_msg(settings.stream, subject)
    except nats.js.errors.NotFoundError:
        return 0, None
    except (*NATS_FAILURES, nats.js.errors.Error) as exc:
        raise JetStreamLogError(f"cannot read the last record of {subject}: {exc!r}") from exc
    sseq = raw.seq or 0
    entries = decode_entries(subject, sseq, raw.data or b"")
    return sseq, entries[-1] if entries else None


async def publish_local(
    js: JetStreamContext,
    settings: JetStreamSettings,
    tenant: str,
    device: str,
    subject: str,
    body: Body,
    attrs: Mapping[str, Scalar],
    now: float,
    condition: WriteCondition | None = None,
) -> int | None:
    """Store one hub-published record (incarnation 0, telemetry lane, next local seq).

    The same contract as ``hub.log.Log.append_local``, for many writers: the record is
    published with the stream sequence of the subject's last message as the expected
    one, so two hubs never store the same seq and ``condition`` -- evaluated against
    that last record -- is a compare-and-set.  Returns the record's offset, or None when
    ``condition`` said no.
    """
    if not subject.startswith(f"{tenant}.{device}."):
        raise JetStreamLogError(f"subject {subject!r} is not under {tenant}.{device}")
    key = (tenant, device, LOCAL_INCARNATION, LOCAL_LANE)
    stream_subject = batch_subject(settings.subject_prefix, key)
    now_us = int(now * 1e6)
    for _ in range(LOCAL_ATTEMPTS):
        after, last = await last_local(js, settings, tenant, device)
        if condition is not None and not condition(last):
            return None
        seq = (last.seq if last is not None else 0) + 1
        record = Record(seq, now_us, subject, dict(attrs), body)
        codec, payload = encode_batch([record], compress=False)  # zstd only adds bytes here
        item = PendingBatch(
            tenant, device, LOCAL_INCARNATION, LOCAL_LANE, [record], codec, payload, now_us
        )
        headers = {
            MSG_ID_HEADER: msg_id(key, seq, seq),
            api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(after),
        }
        try:
            ack = await js.publish(
                stream_subject,
                encode_message(item),
                timeout=settings.publish_timeout_s,
                headers=headers,
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == _WRONG_LAST_SUBJECT_SEQ:
                continue  # another writer got there first: look again
            raise JetStreamLogError(f"cannot store a record on {subject}: {exc!r}") from exc
        except NATS_FAILURES as exc:
            raise JetStreamLogError(f"cannot store a record on {subject}: {exc!r}") from exc
        return int(ack.seq) * OFFSET_STRIDE
    raise JetStreamLogError(f"{subject}: other writers kept getting there first")


async def ensure_stream(
    js: JetStreamContext, settings: JetStreamSettings, *, update: bool = True
) -> api.StreamInfo:
    """Create the stream, or bring an existing one's limits to the settings (``update``)."""
    config = settings.stream_config()
    try:
        info = await js.stream_info(settings.stream)
    except nats.js.errors.NotFoundError:
        return await _guard("cannot create the stream", js.add_stream(config))
    except (*NATS_FAILURES, nats.js.errors.Error) as exc:
        raise JetStreamLogError(f"cannot read stream {settings.stream}: {exc!r}") from exc
    if not update:
        return info
    try:
        return await js.update_stream(config)
    except (*NATS_FAILURES, nats.js.errors.Error) as exc:
        raise JetStreamLogError(f"cannot update stream {settings.stream}: {exc!r}") from exc


# -- reading ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Held:
    """A fetched batch not yet acknowledged."""

    seq: int
    msg: Msg
    entries: list[LogEntry]

    @property
    def last_offset(self) -> int:
        return self.seq * OFFSET_STRIDE + OFFSET_STRIDE - 1


@dataclass(slots=True)
class ConsumerStats:
    """What a JetStream consumer read."""

    fetched: int = 0  # messages (batches)
    records: int = 0
    redelivered_ignored: int = 0
    resets: int = 0  # consumer recreated at its ack floor (restart with pending, gap)


class JetStreamConsumer:
    """A durable pull consumer (explicit ack) over the log stream, yielding LogEntries.

    Position: everything up to the consumer's ack floor is done.  A batch is acked
    when ``commit`` covers its last record, so a crash between a sink's write and its
    commit redelivers the batch (the sink skips what it holds, as ``JsonArchive``
    does).  Deliveries that went astray -- to the pull request of a consumer process
    that died, or out of order after a redelivery -- are detected by the consumer
    sequence and repaired by recreating the durable at the first unacked batch.
    """

    def __init__(
        self,
        settings: JetStreamSettings,
        name: str,
        *,
        filter_subject: str = "",
        ack_wait_s: float = 60.0,
        max_ack_pending: int = 1000,
        fetch_batches: int = 64,
    ) -> None:
        self.settings = settings
        self.name = name
        self.filter_subject = filter_subject or f"{settings.subject_prefix}.>"
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending
        self.fetch_batches = fetch_batches
        self.stats = ConsumerStats()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._held: list[_Held] = []
        self._committed = 0  # record offset: everything up to it is done
        self._next_dseq = 1  # the consumer sequence the next delivery must carry
        self._next_sseq = 1  # the stream sequence to restart from after a reset
        self._delivered_end = 0  # highest record offset delivered to this process
        self._more = True  # the stream may hold batches not yet delivered (unknown at start)

    @property
    def delivered_end(self) -> int:
        """The highest record offset fetched so far (or committed, if higher)."""
        return max(self._delivered_end, self._committed)

    @property
    def may_have_more(self) -> bool:
        """False once a fetch found nothing left to deliver (until the stream grows)."""
        return self._more

    @property
    def committed(self) -> int:
        """The last record offset committed as done (0: nothing yet)."""
        return self._committed

    async def open(self, nc: NATS | None = None) -> None:
        """Bind to the durable consumer (created at the start of the stream if new).

        A missing stream is created (consumers may start before any hub); an existing
        one is left as the hubs set it up.
        """
        self._nc = nc or await connect(self.settings, f"squall-consumer-{self.name}")
        self._js = self._nc.jetstream(timeout=self.settings.publish_timeout_s)
        await ensure_stream(self._js, self.settings, update=False)
        jsm = self._js._jsm
        try:
            info = await jsm.consumer_info(self.settings.stream, self.name)
        except nats.js.errors.NotFoundError:
            await self._create(None)
            return
        except (*NATS_FAILURES, nats.js.errors.Error) as exc:
            raise JetStreamLogError(f"consumer {self.name}: {exc!r}") from exc
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        self._committed = floor * OFFSET_STRIDE + OFFSET_STRIDE - 1 if floor else 0
        self._next_sseq = floor + 1
        if info.num_ack_pending or info.num_waiting:
            # a previous process left batches delivered but unacked, or a pull request
            # that may still take some: start clean at the first unacked batch
            await self._reset()
        else:
            self._next_dseq = (info.delivered.consumer_seq if info.delivered else 0) + 1
            await self._bind()

    async def _create(self, start_seq: int | None) -> None:
        js = self._ready()
        config = api.ConsumerConfig(
            durable_name=self.name,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE
            if start_seq
            else api.DeliverPolicy.ALL,
            opt_start_seq=start_seq,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_ack_pending=self.max_ack_pending,
            filter_subject=self.filter_subject,
        )
        await _guard(
            f"cannot create consumer {self.name}",
            js._jsm.add_consumer(self.settings.stream, config),
        )
        self._next_dseq = 1
        await self._bind()

    async def _bind(self) -> None:
        js = self._ready()
        if self._sub is not None:
            with contextlib.suppress(*NATS_FAILURES):
                await self._sub.unsubscribe()
        self._sub = await _guard(
            f"cannot bind consumer {self.name}",
            js.pull_subscribe_bind(durable=self.name, stream=self.settings.stream),
        )

    async def _reset(self) -> None:
        """Recreate the durable at the first batch not acked; drop what is held."""
        js = self._ready()
        self.stats.resets += 1
        self._held.clear()
        self._delivered_end = 0
        self._more = True
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await _guard(
                "cannot reset consumer", js._jsm.delete_consumer(self.settings.stream, self.name)
            )
        await self._create(self._next_sseq)

    def _ready(self) -> JetStreamContext:
        if self._js is None:
            raise JetStreamLogError(f"consumer {self.name} is not open")
        return self._js

    async def read(self, from_offset: int, max_records: int, wait_s: float = 0.2) -> list[LogEntry]:
        """Up to ``max_records`` entries at or after ``from_offset``, in offset order.

        Waits up to ``wait_s`` for new batches when none are held.
        """
        out = self._from_held(from_offset, max_records)
        if len(out) < max_records:
            await self._fetch(wait_s if not out else 0.05)
            out = self._from_held(from_offset, max_records)
        return out

    def _from_held(self, from_offset: int, max_records: int) -> list[LogEntry]:
        out: list[LogEntry] = []
        for held in self._held:
            if held.last_offset < from_offset:
                continue
            for e in held.entries:
                if e.offset >= from_offset:
                    out.append(e)
                    if len(out) >= max_records:
                        return out
        return out

    async def _fetch(self, wait_s: float) -> None:
        if self._sub is None:
            raise JetStreamLogError(f"consumer {self.name} is not open")
        room = self.max_ack_pending - len(self._held)
        if room <= 0:
            return
        try:
            msgs = await self._sub.fetch(min(room, self.fetch_batches), timeout=wait_s)
        except (nats.errors.TimeoutError, TimeoutError):
            self._more = False  # nothing arrived while we waited: caught up
            return
        except (*NATS_FAILURES, nats.js.errors.Error) as exc:
            raise JetStreamLogError(f"consumer {self.name}: fetch failed: {exc!r}") from exc
        for msg in msgs:
            if not await self._take(msg):
                await self._reset()
                return
        if msgs:
            self._more = msgs[-1].metadata.num_pending > 0

    async def _take(self, msg: Msg) -> bool:
        """Hold one delivery; False when a delivery went astray (the caller resets)."""
        meta = msg.metadata
        sseq, dseq = meta.sequence.stream, meta.sequence.consumer
        if dseq > self._next_dseq:
            return False  # deliveries we never saw: they went to a dead pull request
        self._next_dseq = max(self._next_dseq, dseq + 1)
        if sseq < self._next_sseq:  # acked before; the ack was lost: ack it again
            self.stats.redelivered_ignored += 1
            await msg.ack()
            return True
        if self._held and sseq <= self._held[-1].seq:
            self.stats.redelivered_ignored += 1
            for held in self._held:
                if held.seq == sseq:
                    held.msg = msg  # a redelivery of a held batch: ack the latest delivery
            return True
        self._held.append(_Held(sseq, msg, decode_entries(msg.subject, sseq, msg.data)))
        self._delivered_end = max(self._delivered_end, _last_entry(self._held[-1]))
        self.stats.fetched += 1
        self.stats.records += len(self._held[-1].entries)
        return True

    async def commit(self, offset: int) -> None:
        """Everything up to record ``offset`` is done: ack the batches it covers."""
        if offset <= self._committed:
            return
        done = [h for h in self._held if _last_entry(h) <= offset]
        self._held = [h for h in self._held if h not in done]
        try:
            for held in done:
                await held.msg.ack()
            if done and self._nc is not None:
                await self._nc.flush(timeout=max(1, int(self.settings.publish_timeout_s)))
        except (*NATS_FAILURES, nats.js.errors.Error) as exc:
            raise JetStreamLogError(f"consumer {self.name}: ack failed: {exc!r}") from exc
        if done:
            self._next_sseq = max(self._next_sseq, done[-1].seq + 1)
        self._committed = offset

    async def first_offset(self) -> int:
        """The offset of the oldest batch the stream still holds."""
        js = self._ready()
        info = await _guard("stream info", js.stream_info(self.settings.stream))
        return max(1, info.state.first_seq) * OFFSET_STRIDE

    async def close(self) -> None:
        """Unbind (the durable and its position stay in JetStream)."""
        nc, self._nc, self._js, self._sub = self._nc, None, None, None
        if nc is not None:
            with contextlib.suppress(*NATS_FAILURES):
                await nc.close()


def _last_entry(held: _Held) -> int:
    return held.entries[-1].offset if held.entries else held.last_offset


class JetStreamLogView:
    """The ``hub.log.Log`` calls a durable consumer makes, served by one JetStreamConsumer.

    Synchronous, for ``JsonArchive`` / ``LogCursor``-style consumers: it runs its
    own event loop in a thread, so it must not be called from inside another
    running event loop's thread if that loop must stay responsive (run consumers
    in their own process, as ``squall consume`` does).
    """

    contiguous = False  # offsets skip (stream_seq * OFFSET_STRIDE): no gap means no loss here

    def __init__(self, settings: JetStreamSettings, consumer: str, **options: Any) -> None:
        self.settings = settings
        self.name = consumer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"jsview-{consumer}", daemon=True
        )
        self._thread.start()
        self.consumer = JetStreamConsumer(settings, consumer, **options)
        self._stream_end = 0
        try:
            self._call(self.consumer.open())
            self._stream_end = self._call(self._end_of_stream())
        except BaseException:
            self.close()
            raise

    async def _end_of_stream(self) -> int:
        js = self.consumer._ready()
        info = await _guard("stream info", js.stream_info(self.settings.stream))
        return (info.state.last_seq + 1) * OFFSET_STRIDE

    @property
    def path(self) -> str:
        """A name for files kept next to this consumer (``<stream>.<consumer>``)."""
        return f"{self.settings.stream}.{self.name}"

    @property
    def next_offset(self) -> int:
        """Beyond the last record this consumer can read now (no I/O).

        Offsets are not contiguous, so this is not "last offset + 1" of the stream: once
        a fetch found nothing left, it is just past the last record delivered (a reader
        whose position reached ``next_offset - 1`` is caught up); until then it lies
        beyond everything the stream held at open, so any offset read so far is below it.
        """
        done = self.consumer.delivered_end + 1
        if self.consumer.may_have_more:
            return max(done + 1, self._stream_end)
        return done

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _check(self, name: str) -> None:
        if name != self.name:
            raise JetStreamLogError(f"this view serves consumer {self.name!r}, not {name!r}")

    def read(self, from_offset: int, max_records: int) -> list[LogEntry]:
        """Entries at or after ``from_offset`` (what the durable consumer delivers next)."""
        if max_records < 1:
            return []
        return self._call(self.consumer.read(from_offset, max_records))

    def first_offset(self) -> int:
        """Offset of the oldest batch the stream holds."""
        return self._call(self.consumer.first_offset())

    def read_with_first(self, from_offset: int, max_records: int) -> tuple[int, list[LogEntry]]:
        """``first_offset()``, then what the consumer delivers from there or ``from_offset``
        (a stream's offsets skip: its readers count no gaps, so one moment is not needed)."""
        first = self.first_offset()
        return first, self.read(max(from_offset, first), max_records)

    def consumer_offset(self, name: str) -> int:
        """The last offset ``name`` committed (its durable consumer's ack floor)."""
        self._check(name)
        return self.consumer.committed

    def commit_consumer_offset(self, name: str, offset: int) -> None:
        """Ack the batches up to ``offset``."""
        self._check(name)
        self._call(self.consumer.commit(offset))

    def append_local(
        self,
        tenant: str,
        device: str,
        subject: str,
        body: Body,
        attrs: Mapping[str, Scalar],
        now: float,
    ) -> int:
        """Store one record published by a consumer (an alert), as ``Log.append_local`` does."""
        js = self.consumer._ready()
        offset = self._call(
            publish_local(js, self.settings, tenant, device, subject, body, attrs, now)
        )
        assert offset is not None  # no condition: always written
        return offset

    def close(self) -> None:
        """Close the connection and stop the loop thread."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self.consumer.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> JetStreamLogView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "OFFSET_STRIDE",
    "JetStreamConsumer",
    "JetStreamLog",
    "JetStreamLogError",
    "JetStreamLogView",
    "JetStreamSettings",
    "connect",
    "decode_entries",
    "encode_message",
    "ensure_stream",
    "msg_id",
    "publish_local",
]

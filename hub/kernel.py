"""The kernel (sans-I/O): routes committed log entries to bounded subscriber queues.

Vocabulary:

- A **queue** holds one subscription: a subject pattern (NATS ``*`` / ``>``) and an
  optional filter, both compiled when the queue is made. Queues are named per tenant
  (``(tenant, name)``); a subscribe without a name gets a private queue that lives as
  long as its one subscriber.
- A **subscriber** (a WebSocket, a server-side consumer) is attached to one queue.
  Several subscribers on one queue compete for its entries (round robin among those
  with room); several queues matching one subject each get every entry (fanout).
- A queue's **tenant** is fixed when it is made. A tenant's queue never receives an
  entry of another tenant: the pattern must start with the tenant, and ``route``
  checks ``entry.tenant`` too. Only the admin may make a queue whose pattern starts
  with a wildcard: it sees every tenant (tenant ``*``).

Flow: the shell calls ``route(entries)`` with each group commit's entries, in offset
order. A *live* queue takes the entries that match into ``pending`` (bounded by its
``max_pending``), and ``pending`` is handed out to subscribers' outboxes as they have
room (``subscriber_window``, or the credit a subscriber granted). At the bound:

- ``drop-oldest``: the oldest pending entry is dropped, counted for the queue, and
  each of its subscribers is told the count with its next delivery;
- ``block``: the queue stops being live. Its cursor stays at the entry it could not
  take and it catches up later by reading the log itself (``wants_reads`` /
  ``feed_catchup``) once its subscribers drained it. A slow subscriber thus holds
  back its own reads, never the hub's ingest nor another queue.

Durable queues (``block`` only) start at their committed offset (``sub:<tenant>:<queue>``
in the log's consumers table) in catch-up. Their subscribers acknowledge each entry;
an entry stays in flight until acked and goes back to the queue if its subscriber
leaves first. The committed offset is the highest offset below which everything is
acked or did not match (``commits_due``); the shell persists it. After a crash the
entries acked since the last persisted commit come again: remote subscribers dedup
by offset.

A change of pattern or filter applies from the queue's cursor on (the next entry it
has not looked at): what is pending was chosen before and is still delivered, so a
durable subscriber neither loses nor sees twice an entry around the change.

The kernel never touches the log or a clock: times and offsets are arguments.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, TypeAlias

from hub.config import KernelSettings
from hub.consumer import entry_message, skipped_by_cause
from hub.filters import Filter, compile_filter
from hub.log import LogEntry
from hub.subjects import STAR, TAIL, SubjectError, SubjectTrie, validate_pattern
from transport.errors import SquallError

ALL_TENANTS = "*"  # the tenant of an admin queue whose pattern starts with a wildcard
MAX_CREDIT = 1_000_000  # credit a subscriber may hold beyond what it has been given
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

QueueKey: TypeAlias = tuple[str, str]  # (tenant, queue name)
Start: TypeAlias = Literal["now", "earliest"] | int


class Policy(StrEnum):
    """What a full queue does with the next entry."""

    BLOCK = "block"
    DROP_OLDEST = "drop-oldest"


# --- errors ------------------------------------------------------------------------------


class KernelError(SquallError):
    """A subscription request the kernel refuses; the subclass says why."""


class RequestError(KernelError):
    """The request is malformed or contradicts itself (HTTP 400)."""


class ForbiddenError(KernelError):
    """The request reaches outside the caller's tenant (HTTP 403)."""


class NotFoundError(KernelError):
    """No such queue or subscriber (HTTP 404)."""


class ConflictError(KernelError):
    """The queue exists with another subscription, or already exists (HTTP 409)."""


class LimitError(KernelError):
    """A configured bound (queues, subscribers) is reached (HTTP 429)."""


# --- data --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """What a subscribe or a create asks for; None fields take the queue's or config's value."""

    subject: str  # "": the named queue's (joining an existing queue of the caller's tenant)
    filter: str | None = None  # None: the queue's when joining one, else no filter
    queue: str = ""  # "": a private queue for one subscriber
    tenant: str | None = None  # the caller's tenant; None: the admin (tenant from subject)
    policy: Policy | None = None
    durable: bool | None = None
    max_pending: int | None = None
    start: Start | None = None  # None: "now" (a durable queue resumes at its offset anyway)


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """The shell should read ``count`` log records from ``start`` for queue ``key``."""

    key: QueueKey
    start: int
    count: int


@dataclass(frozen=True, slots=True)
class Delivery:
    """What ``take`` hands a subscriber: entries, drops since last time, or a close reason."""

    entries: list[LogEntry]
    dropped: int = 0  # entries its queue dropped (drop-oldest) since its last delivery
    dropped_total: int = 0
    closed: str | None = None  # the queue is gone: the shell closes the subscriber


@dataclass(frozen=True, slots=True)
class Commit:
    """A durable queue's committed offset to persist under ``name``."""

    key: QueueKey
    name: str
    offset: int


@dataclass(frozen=True, slots=True)
class Attached:
    """A subscribe's result: the subscriber id and the queue it joined."""

    subscriber: int
    key: QueueKey
    created: bool


@dataclass(slots=True)
class KernelCounters:
    """Totals since start, for metrics."""

    routed: int = 0  # entries offered to route()
    matches: int = 0  # (entry, queue) pairs that passed pattern, tenant and filter
    delivered: int = 0  # entries handed to subscribers
    dropped_overflow: int = 0  # drop-oldest: entries pushed out of a full queue
    skipped_retention: int = 0  # entries retention removed before a catching-up queue read them
    skipped_corrupt: int = 0  # entries of stored batches that no longer decode (the log skips them)
    blocked: int = 0  # times a block queue fell behind (stopped taking live entries)
    catchup_reads: int = 0
    catchup_records: int = 0
    expired_queues: int = 0
    redelivered: int = 0  # durable entries returned to their queue by a leaving subscriber


@dataclass(slots=True)
class QueueStats:
    """One queue's counters (besides ``matched``, kept on the queue for route's sake)."""

    delivered: int = 0
    dropped: int = 0
    skipped: int = 0
    acked: int = 0


def durable_name(key: QueueKey) -> str:
    """The consumers-table name of a durable queue's committed offset."""
    return f"sub:{key[0]}:{key[1]}"


def tenant_of(pattern: str) -> str:
    """The tenant a pattern lies in: its first token, or ``*`` when that is a wildcard."""
    first = pattern.split(".", 1)[0]
    return ALL_TENANTS if first in (STAR, TAIL) else first


def subject_matcher(pattern: str) -> Callable[[str], bool]:
    """A fast predicate for one valid pattern (used by queues reading the log themselves)."""
    tokens = pattern.split(".")
    tail = tokens[-1] == TAIL
    if tail:
        tokens.pop()
    if not tokens:
        return lambda subject: True
    if STAR not in tokens:
        exact = ".".join(tokens)
        if tail:
            prefix = exact + "."
            return lambda subject: subject.startswith(prefix)
        return lambda subject: subject == exact
    n = len(tokens)
    pairs = [(i, t) for i, t in enumerate(tokens) if t != STAR]

    def match(subject: str) -> bool:
        parts = subject.split(".")
        if (len(parts) <= n) if tail else (len(parts) != n):
            return False
        return all(parts[i] == t for i, t in pairs)

    return match


@dataclass(slots=True)
class _Selection:
    """A compiled subscription: pattern, filter and the pattern's own matcher."""

    pattern: str
    filter: Filter | None
    matches_subject: Callable[[str], bool]

    @classmethod
    def compile(cls, pattern: str, filter_text: str) -> _Selection:
        validate_pattern(pattern)
        flt = compile_filter(filter_text) if filter_text.strip() else None
        return cls(pattern, flt, subject_matcher(pattern))

    @property
    def filter_text(self) -> str:
        return self.filter.text if self.filter is not None else ""


@dataclass(slots=True)
class _Subscriber:
    id: int
    key: QueueKey
    window: int
    credit: int | None  # None: no credit mode (the shell's send pace is the limit)
    outbox: deque[LogEntry] = field(default_factory=deque)
    holding: int = 0  # entries counted against the window: outbox, plus unacked if durable
    unacked: dict[int, LogEntry] = field(default_factory=dict)  # durable: offset -> entry
    dropped_seen: int = 0
    closed: str | None = None

    def room(self) -> int:
        free = self.window - self.holding
        return free if self.credit is None else min(free, self.credit)


@dataclass(slots=True, eq=False)  # hashed by identity: the trie holds the queues themselves
class _Queue:
    key: QueueKey
    selection: _Selection
    policy: Policy
    max_pending: int
    durable: bool
    pinned: bool  # configured or created through the API: never expires
    private: bool
    cursor: int  # next offset to look at; meaningful while not live (live: the kernel's head)
    live: bool
    committed: int  # last persisted committed offset (-1: not yet persisted)
    created_at: float
    filter: Filter | None = None  # selection.filter, one attribute closer for route()
    matched: int = 0  # entries taken (route's counter; the others are in stats)
    pending: deque[LogEntry] = field(default_factory=deque)
    subscribers: list[int] = field(default_factory=list)
    rr: int = 0
    reading: bool = False
    stats: QueueStats = field(default_factory=QueueStats)

    @property
    def tenant(self) -> str:
        return self.key[0]

    @property
    def name(self) -> str:
        return self.key[1]


# --- the kernel --------------------------------------------------------------------------


class Kernel:
    """Subscriptions, queues and subscribers; every entry point is a pure state change."""

    def __init__(self, settings: KernelSettings, head: int) -> None:
        self.settings = settings
        self.head = head  # the next offset route() expects: the log's next_offset
        self.counters = KernelCounters()
        self._trie: SubjectTrie[_Queue] = SubjectTrie(settings.match_cache)
        self._queues: dict[QueueKey, _Queue] = {}
        self._subscribers: dict[int, _Subscriber] = {}
        self._per_tenant: dict[str, int] = {}
        self._behind: set[QueueKey] = set()  # not live: they read the log themselves
        self._durable: set[QueueKey] = set()
        self._idle: dict[QueueKey, float] = {}  # named queue -> since when it has no subscriber
        self._orphans: dict[str, float] = {}  # durable offsets in the log with no queue yet
        self._ready: set[int] = set()
        self._next_id = 1

    # -- queues -----------------------------------------------------------------------

    def create(
        self, spec: QueueSpec, now: float, *, committed: int | None = None, pinned: bool = True
    ) -> QueueKey:
        """Make a named queue with no subscriber (configured, or POST); ConflictError if taken.

        ``committed`` is a durable queue's offset in the log (None: it has none yet).
        """
        if not spec.queue:
            raise RequestError("a queue made without a subscriber needs a name")
        selection, key = self._resolve(spec)
        if selection is None:
            raise RequestError("subject is required")
        if key in self._queues:
            raise ConflictError(f"queue {key[1]!r} of tenant {key[0]!r} already exists")
        self._make_queue(key, selection, spec, now, committed, pinned=pinned)
        return key

    def subscribe(
        self,
        spec: QueueSpec,
        now: float,
        *,
        committed: int | None = None,
        credit: int | None = None,
    ) -> Attached:
        """Attach a new subscriber, making its queue if needed (private when unnamed)."""
        if len(self._subscribers) >= self.settings.max_subscribers:
            raise LimitError(f"this hub serves at most {self.settings.max_subscribers} subscribers")
        if credit is not None and not 0 <= credit <= MAX_CREDIT:
            raise RequestError(f"credit must be within 0..{MAX_CREDIT}")
        selection, key = self._resolve(spec)
        created = False
        queue = self._queues.get(key)
        if queue is None:
            if selection is None:
                raise NotFoundError(f"no queue {key[1]!r} of tenant {key[0]!r} to join")
            queue = self._make_queue(key, selection, spec, now, committed, pinned=False)
            created = True
        else:
            self._check_same(queue, selection, spec)
        sid = self._take_id()
        sub = _Subscriber(sid, key, self.settings.subscriber_window, credit)
        self._subscribers[sid] = sub
        queue.subscribers.append(sid)
        self._idle.pop(key, None)
        self._dispatch(queue)
        return Attached(sid, key, created)

    def unsubscribe(self, subscriber: int, now: float) -> None:
        """Detach a subscriber; what it held and did not finish goes back to its queue."""
        sub = self._subscribers.pop(subscriber, None)
        if sub is None:
            return
        self._ready.discard(subscriber)
        queue = self._queues.get(sub.key)
        if queue is None or sub.closed is not None:  # its queue is gone (maybe made anew)
            return
        queue.subscribers.remove(subscriber)
        back = sorted({**sub.unacked, **{e.offset: e for e in sub.outbox}}.items())
        if back:
            queue.pending.extendleft(e for _, e in reversed(back))
            if queue.durable:
                self.counters.redelivered += len(sub.unacked)
        if queue.private:
            self._remove(queue)
            return
        if not queue.subscribers and not queue.pinned:
            self._idle[queue.key] = now
        self._dispatch(queue)

    def change(
        self, key: QueueKey, subject: str | None, filter_text: str | None, tenant: str | None
    ) -> int:
        """Replace a queue's pattern and/or filter; returns the offset it applies from."""
        queue = self._get(key, tenant)
        pattern = queue.selection.pattern if subject is None else subject
        text = queue.selection.filter_text if filter_text is None else filter_text
        selection = _Selection.compile(pattern, text)
        if queue.tenant != ALL_TENANTS:
            self._check_tenant(pattern, queue.tenant)
        if pattern != queue.selection.pattern:
            self._trie.remove(queue.selection.pattern, queue)
            self._trie.add(pattern, queue)
        queue.selection = selection
        queue.filter = selection.filter
        return self.head if queue.live else queue.cursor

    def delete(self, key: QueueKey, tenant: str | None) -> str | None:
        """Remove a queue; its subscribers are told to close. Returns its durable name."""
        queue = self._get(key, tenant)
        for sid in queue.subscribers:
            sub = self._subscribers[sid]
            sub.closed = "queue deleted"
            sub.outbox.clear()
            sub.unacked.clear()
            self._ready.add(sid)
        queue.subscribers.clear()
        self._remove(queue)
        return durable_name(key) if queue.durable else None

    def expire(self, now: float) -> list[str]:
        """Remove queues idle past their time; returns durable names whose offsets can go."""
        forget: list[str] = []
        s = self.settings
        for key, since in list(self._idle.items()):
            queue = self._queues[key]
            if now - since >= (s.durable_idle_s if queue.durable else s.queue_idle_s):
                self._remove(queue)
                self.counters.expired_queues += 1
                if queue.durable:
                    forget.append(durable_name(key))
        for name, since in list(self._orphans.items()):
            if now - since >= s.durable_idle_s:
                del self._orphans[name]
                forget.append(name)
        return forget

    def note_orphans(self, names: Iterable[str], now: float) -> None:
        """Durable offsets found in the log at start with no queue: forgotten unless reclaimed."""
        known = {durable_name(k) for k in self._durable}
        for name in names:
            if name.startswith("sub:") and name not in known:
                self._orphans.setdefault(name, now)

    # -- the data path ----------------------------------------------------------------

    def candidates(self, subject: str) -> int:
        """How many queues' patterns match ``subject``, before tenant and filter (a trie lookup)."""
        return len(self._trie.match(subject))

    def match_cache(self) -> tuple[int, int]:
        """The subject match cache's hits and misses since start."""
        return self._trie.hits, self._trie.misses

    def has_behind(self) -> bool:
        """True when some queue reads the log itself (the shell should ask ``wants_reads``)."""
        return bool(self._behind)

    def route_failed(self, next_offset: int) -> None:
        """The shell could not read ``[head, next_offset)`` back: live queues read it themselves."""
        for key, queue in self._queues.items():
            if queue.live:
                queue.live = False
                queue.cursor = self.head
                self._behind.add(key)
        self.advance(next_offset)

    def has_live(self) -> bool:
        """True when some queue takes live entries (else the shell need not read them back)."""
        return len(self._queues) > len(self._behind)

    def advance(self, next_offset: int) -> None:
        """The log grew with nothing live to route: move the head past it."""
        self.head = max(self.head, next_offset)

    def route(self, entries: Sequence[LogEntry]) -> None:
        """Offer newly committed entries (offset order, from ``head`` on) to the live queues."""
        # The hot loop of the hub's fanout: locals, and the common case (room) inline.
        match = self._trie.match
        head = self.head
        touched: set[_Queue] = set()
        matches = 0
        for entry in entries:
            offset = entry.offset
            if offset < head:
                continue
            head = offset + 1
            try:
                found = match(entry.subject)
            except SubjectError:  # the session checks subjects; an odd one matches nothing
                continue
            if not found:
                continue
            message: dict[str, Any] | None = None
            entry_tenant = entry.tenant
            for queue in found:
                tenant = queue.key[0]
                if not queue.live or (tenant != entry_tenant and tenant != ALL_TENANTS):
                    continue
                flt = queue.filter
                if flt is not None:
                    if message is None:
                        message = entry_message(entry)
                    if not flt.matches(message):
                        continue
                pending = queue.pending
                if len(pending) < queue.max_pending:
                    pending.append(entry)
                    queue.matched += 1
                    matches += 1
                else:
                    self._push_full(queue, entry)
                if queue.subscribers:
                    touched.add(queue)
        self.counters.routed += len(entries)
        self.counters.matches += matches
        self.head = head
        for queue in touched:
            self._dispatch(queue)

    def wants_reads(self) -> list[ReadRequest]:
        """Catch-up reads for queues behind the head that have room; marks them as reading."""
        out = []
        batch = self.settings.catchup_batch
        for key in self._behind:
            queue = self._queues[key]
            room = queue.max_pending - len(queue.pending)
            if queue.reading or room * 2 < queue.max_pending:
                continue
            queue.reading = True
            out.append(ReadRequest(key, queue.cursor, min(room, batch)))
        return out

    def feed_catchup(
        self,
        request: ReadRequest,
        entries: Sequence[LogEntry],
        end: int,
        first: int | None,
    ) -> None:
        """The log's answer to ``request``; ``end`` is the log's next_offset before the read.

        ``first`` is the log's first offset before the read: a gap in the offsets up to it
        is retention's, one past it a batch the log skipped as corrupt.  None for a log
        whose offsets are not contiguous (a JetStream view): its gaps are counted as neither.
        """
        queue = self._queues.get(request.key)
        if queue is None or not queue.reading:
            return
        queue.reading = False
        if queue.live or queue.cursor != request.start:
            return  # the queue changed meanwhile; its next request starts afresh
        self.counters.catchup_reads += 1
        head = self.head
        taken = [e for e in entries if queue.cursor <= e.offset < head]
        if taken:
            retained, corrupt = (
                (0, 0) if first is None else skipped_by_cause(queue.cursor, first, taken)
            )
            queue.stats.skipped += retained + corrupt
            self.counters.skipped_retention += retained
            self.counters.skipped_corrupt += corrupt
            self.counters.catchup_records += len(taken)
            for entry in taken:
                if self._selects(queue, entry):
                    queue.pending.append(entry)
                    queue.matched += 1
                    self.counters.matches += 1
            queue.cursor = taken[-1].offset + 1
        else:
            queue.cursor = min(max(queue.cursor, end), head)
        if queue.cursor >= head:
            queue.live = True
            self._behind.discard(queue.key)
        self._dispatch(queue)

    def read_failed(self, request: ReadRequest) -> None:
        """The shell could not read for ``request``; the queue asks again later."""
        queue = self._queues.get(request.key)
        if queue is not None:
            queue.reading = False

    # -- subscribers ------------------------------------------------------------------

    def take(self, subscriber: int, max_entries: int) -> Delivery:
        """Up to ``max_entries`` entries for a subscriber to send, with any drop notice."""
        sub = self._subscribers.get(subscriber)
        if sub is None:
            raise NotFoundError(f"no subscriber {subscriber}")
        self._ready.discard(subscriber)
        if sub.closed is not None:
            return Delivery([], closed=sub.closed)
        queue = self._queues[sub.key]
        n = min(max_entries, len(sub.outbox))
        entries = [sub.outbox.popleft() for _ in range(n)]
        if not queue.durable:
            sub.holding -= n
        dropped = queue.stats.dropped - sub.dropped_seen
        sub.dropped_seen = queue.stats.dropped
        queue.stats.delivered += n
        self.counters.delivered += n
        if n:
            self._dispatch(queue)
        if sub.outbox:
            self._ready.add(subscriber)
        return Delivery(entries, dropped, queue.stats.dropped)

    def ack(self, subscriber: int, offset: int) -> None:
        """A durable subscriber has finished with ``offset``; RequestError if it was not owed."""
        sub = self._subscribers.get(subscriber)
        if sub is None:
            raise NotFoundError(f"no subscriber {subscriber}")
        queue = self._queues.get(sub.key)
        if queue is None or sub.closed is not None:
            return
        if not queue.durable:
            raise RequestError("this queue is not durable: nothing is waiting for an ack")
        if sub.unacked.pop(offset, None) is None:
            raise RequestError(f"offset {offset} is not waiting for an ack from this subscriber")
        sub.holding -= 1
        queue.stats.acked += 1
        self._dispatch(queue)

    def grant(self, subscriber: int, credit: int) -> None:
        """A subscriber allows ``credit`` more entries (switches it to credit mode)."""
        sub = self._subscribers.get(subscriber)
        if sub is None:
            raise NotFoundError(f"no subscriber {subscriber}")
        if not 0 < credit <= MAX_CREDIT:
            raise RequestError(f"credit must be within 1..{MAX_CREDIT}")
        sub.credit = min(MAX_CREDIT, (sub.credit or 0) + credit)
        queue = self._queues.get(sub.key)
        if queue is not None and sub.closed is None:
            self._dispatch(queue)

    def take_ready(self) -> set[int]:
        """Subscribers with something new to take (entries, drops, a close) since last asked."""
        ready, self._ready = self._ready, set()
        return ready

    # -- durable offsets -----------------------------------------------------------------

    def commits_due(self) -> list[Commit]:
        """Durable queues whose committed offset moved since it was last persisted."""
        out = []
        for key in self._durable:
            queue = self._queues[key]
            offset = self._position(queue) - 1
            if offset != queue.committed:
                out.append(Commit(key, durable_name(key), offset))
        return out

    def committed(self, commit: Commit) -> None:
        """The shell persisted ``commit``."""
        queue = self._queues.get(commit.key)
        if queue is not None:
            queue.committed = commit.offset

    # -- views ----------------------------------------------------------------------------

    def queue_keys(self, tenant: str | None = None) -> list[QueueKey]:
        """Keys of every queue (of ``tenant`` only when given), sorted."""
        return sorted(k for k in self._queues if tenant is None or k[0] == tenant)

    def describe(self, key: QueueKey) -> dict[str, Any]:
        """A queue as the API shows it."""
        q = self._queues.get(key)
        if q is None:
            raise NotFoundError(f"no queue {key[1]!r} of tenant {key[0]!r}")
        pending = len(q.pending) + sum(len(self._subscribers[s].outbox) for s in q.subscribers)
        inflight = sum(len(self._subscribers[s].unacked) for s in q.subscribers)
        return {
            "tenant": q.tenant,
            "queue": q.name,
            "subject": q.selection.pattern,
            "filter": q.selection.filter_text,
            "durable": q.durable,
            "policy": q.policy.value,
            "max_pending": q.max_pending,
            "private": q.private,
            "pinned": q.pinned,
            "subscribers": len(q.subscribers),
            "pending": pending,
            "unacked": inflight if q.durable else 0,
            "live": q.live,
            "position": self._position(q),
            "committed": q.committed if q.durable else None,
            "matched": q.matched,
            "delivered": q.stats.delivered,
            "dropped": q.stats.dropped,
            "skipped": q.stats.skipped,
            "acked": q.stats.acked,
        }

    def queue_policy(self, key: QueueKey) -> Policy:
        """The policy of an existing queue."""
        return self._queues[key].policy

    def subscriber_queue(self, subscriber: int) -> QueueKey:
        """The queue a subscriber is attached to."""
        sub = self._subscribers.get(subscriber)
        if sub is None:
            raise NotFoundError(f"no subscriber {subscriber}")
        return sub.key

    def dropped_by_queue(self) -> list[tuple[QueueKey, Policy, int]]:
        """Queues that dropped entries, with their counts (bounded by max_queues)."""
        return [(k, q.policy, q.stats.dropped) for k, q in self._queues.items() if q.stats.dropped]

    def gauges(self) -> dict[str, int]:
        """Current sizes: queues (by kind), subscribers, subscriptions, pending, behind."""
        private = sum(1 for q in self._queues.values() if q.private)
        pending = sum(len(q.pending) for q in self._queues.values())
        pending += sum(len(s.outbox) for s in self._subscribers.values())
        return {
            "queues_private": private,
            "queues_durable": len(self._durable),
            "queues_named": len(self._queues) - private - len(self._durable),
            "subscriptions": len(self._trie),
            "subscribers": len(self._subscribers),
            "pending": pending,
            "unacked": sum(len(s.unacked) for s in self._subscribers.values()),
            "behind": len(self._behind),
            "orphans": len(self._orphans),
        }

    # -- internals --------------------------------------------------------------------

    def _take_id(self) -> int:
        n = self._next_id
        self._next_id += 1
        return n

    def _resolve(self, spec: QueueSpec) -> tuple[_Selection | None, QueueKey]:
        """Compile the selection (None: no subject given) and find the queue's key."""
        if not spec.subject:
            if not spec.queue:
                raise RequestError("subject is required, e.g. subject=acme.*.telemetry.>")
            if spec.tenant is None:
                raise RequestError("the admin names a queue with its subject (tenant first)")
            selection = None
            tenant = spec.tenant
        else:
            selection = _Selection.compile(spec.subject, spec.filter or "")
            if spec.tenant is None:
                tenant = tenant_of(spec.subject)
            else:
                self._check_tenant(spec.subject, spec.tenant)
                tenant = spec.tenant
        if spec.queue and not _NAME.fullmatch(spec.queue):
            raise RequestError(f"queue name {spec.queue!r} is not 1-64 of [A-Za-z0-9_-]")
        if spec.max_pending is not None and not 1 <= spec.max_pending <= self.settings.max_pending:
            raise RequestError(f"max_pending must be within 1..{self.settings.max_pending}")
        if spec.durable and not spec.queue:
            raise RequestError("a durable subscription needs a queue name")
        if spec.durable and spec.policy is Policy.DROP_OLDEST:
            raise RequestError("a durable queue loses nothing: its policy is block")
        if isinstance(spec.start, int) and not 1 <= spec.start <= self.head:
            raise RequestError(f"from={spec.start} is outside the log (1..{self.head})")
        return selection, (tenant, spec.queue or f"~{self._next_id}")

    @staticmethod
    def _check_tenant(pattern: str, tenant: str) -> None:
        if pattern.split(".", 1)[0] != tenant:
            raise ForbiddenError(
                f"subject {pattern!r} is outside tenant {tenant!r}: it must start with '{tenant}.'"
            )

    def _check_same(self, queue: _Queue, selection: _Selection | None, spec: QueueSpec) -> None:
        """A subscriber joining a queue asks for its subscription, or leaves it out."""
        sel = queue.selection
        if (selection is not None and selection.pattern != sel.pattern) or (
            spec.filter is not None and spec.filter.strip() != sel.filter_text.strip()
        ):
            raise ConflictError(
                f"queue {queue.name!r} exists with subject {sel.pattern!r} and filter "
                f"{sel.filter_text!r}; change it with PATCH /v1/subscriptions"
            )
        if spec.durable is not None and spec.durable != queue.durable:
            raise ConflictError(f"queue {queue.name!r} exists with durable={queue.durable}")
        if spec.policy is not None and spec.policy is not queue.policy:
            raise ConflictError(f"queue {queue.name!r} exists with policy {queue.policy.value}")

    def _get(self, key: QueueKey, tenant: str | None) -> _Queue:
        if tenant is not None and key[0] != tenant:
            raise ForbiddenError(f"queue {key[1]!r} is outside tenant {tenant!r}")
        queue = self._queues.get(key)
        if queue is None or queue.private:
            raise NotFoundError(f"no queue {key[1]!r} of tenant {key[0]!r}")
        return queue

    def _make_queue(
        self,
        key: QueueKey,
        selection: _Selection,
        spec: QueueSpec,
        now: float,
        committed: int | None,
        *,
        pinned: bool,
    ) -> _Queue:
        s = self.settings
        if len(self._queues) >= s.max_queues:
            raise LimitError(f"this hub holds at most {s.max_queues} queues")
        if self._per_tenant.get(key[0], 0) >= s.max_queues_per_tenant:
            raise LimitError(f"tenant {key[0]!r} holds at most {s.max_queues_per_tenant} queues")
        durable = bool(spec.durable)
        policy = spec.policy or (Policy.BLOCK if durable else Policy(s.default_policy))
        start = "now" if spec.start is None else spec.start
        if durable and committed is not None:
            cursor = committed + 1
        else:
            cursor = self.head if start == "now" else 1 if start == "earliest" else int(start)
        queue = _Queue(
            key,
            selection,
            policy,
            spec.max_pending or s.max_pending,
            durable,
            pinned,
            private=not spec.queue,
            cursor=cursor,
            live=cursor >= self.head,
            committed=-1 if committed is None else committed,
            created_at=now,
            filter=selection.filter,
        )
        self._queues[key] = queue
        self._per_tenant[key[0]] = self._per_tenant.get(key[0], 0) + 1
        self._trie.add(selection.pattern, queue)
        if not queue.live:
            self._behind.add(key)
        if durable:
            self._durable.add(key)
            self._orphans.pop(durable_name(key), None)
        if not pinned and not queue.private:
            self._idle[key] = now
        return queue

    def _remove(self, queue: _Queue) -> None:
        key = queue.key
        del self._queues[key]
        self._trie.remove(queue.selection.pattern, queue)
        self._per_tenant[key[0]] -= 1
        if not self._per_tenant[key[0]]:
            del self._per_tenant[key[0]]
        self._behind.discard(key)
        self._durable.discard(key)
        self._idle.pop(key, None)

    def _selects(self, queue: _Queue, entry: LogEntry) -> bool:
        """Pattern, tenant and filter, for an entry a queue read itself."""
        if queue.tenant != ALL_TENANTS and entry.tenant != queue.tenant:
            return False
        sel = queue.selection
        if not sel.matches_subject(entry.subject):
            return False
        return sel.filter is None or sel.filter.matches(entry_message(entry))

    def _push_full(self, queue: _Queue, entry: LogEntry) -> None:
        """One live entry into a queue at its bound: subscribers first, then the policy."""
        pending = queue.pending
        self._dispatch(queue)
        if len(pending) >= queue.max_pending:
            if queue.policy is Policy.BLOCK:
                queue.live = False
                queue.cursor = entry.offset
                self._behind.add(queue.key)
                self.counters.blocked += 1
                return
            pending.popleft()
            queue.stats.dropped += 1
            self.counters.dropped_overflow += 1
            self._ready.update(queue.subscribers)
        pending.append(entry)
        queue.matched += 1
        self.counters.matches += 1

    def _dispatch(self, queue: _Queue) -> None:
        """Hand pending entries to subscribers with room, one at a time, round robin."""
        pending = queue.pending
        sids = queue.subscribers
        if not pending or not sids:
            return
        subs = [self._subscribers[s] for s in sids]
        n = len(subs)
        i = queue.rr % n
        misses = 0
        durable = queue.durable
        while pending and misses < n:
            sub = subs[i]
            i = (i + 1) % n
            if sub.room() <= 0:
                misses += 1
                continue
            misses = 0
            entry = pending.popleft()
            sub.outbox.append(entry)
            sub.holding += 1
            if sub.credit is not None:
                sub.credit -= 1
            if durable:
                sub.unacked[entry.offset] = entry
            self._ready.add(sub.id)
        queue.rr = i

    def _position(self, queue: _Queue) -> int:
        """The lowest offset this queue has not finished with (what it would resume from)."""
        low = self.head if queue.live else queue.cursor
        if queue.pending:
            low = min(low, queue.pending[0].offset)
        for sid in queue.subscribers:
            sub = self._subscribers[sid]
            if sub.unacked:  # durable: includes its outbox
                low = min(low, min(sub.unacked))
            elif sub.outbox:
                low = min(low, min(e.offset for e in sub.outbox))
        return low


__all__ = [
    "ALL_TENANTS",
    "Attached",
    "Commit",
    "ConflictError",
    "Delivery",
    "ForbiddenError",
    "Kernel",
    "KernelCounters",
    "KernelError",
    "LimitError",
    "NotFoundError",
    "Policy",
    "QueueSpec",
    "ReadRequest",
    "RequestError",
    "durable_name",
    "subject_matcher",
    "tenant_of",
]

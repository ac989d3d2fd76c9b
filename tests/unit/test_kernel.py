"""The kernel core with a fake log and a manual clock: routing, queues, policies, durability."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.config import KernelSettings
from hub.consumer import entry_message
from hub.filters import FilterError, compile_filter
from hub.kernel import (
    ALL_TENANTS,
    ConflictError,
    ForbiddenError,
    Kernel,
    LimitError,
    NotFoundError,
    Policy,
    QueueSpec,
    RequestError,
    durable_name,
    subject_matcher,
)
from hub.log import LogEntry
from hub.subjects import SubjectError, match_pattern

SETTINGS = KernelSettings(max_pending=100, subscriber_window=8, catchup_batch=50, match_cache=64)


def make_entry(offset: int, subject: str, tenant: str | None = None, **body: Any) -> LogEntry:
    parts = subject.split(".")
    return LogEntry(
        offset=offset,
        tenant=tenant if tenant is not None else parts[0],
        device=parts[1] if len(parts) > 1 else "-",
        incarnation=1,
        lane=1,
        seq=offset,
        ts=offset * 1000,
        subject=subject,
        attrs={"severity": body.pop("severity", 5)},
        body=dict(body),
        received_us=0,
    )


class FakeLog:
    """Entries in offset order, with retention at the head; reads like ``hub.log.Log.read``."""

    def __init__(self) -> None:
        self.entries: list[LogEntry] = []
        self.next_offset = 1
        self.head = 1

    def append(self, subject: str, tenant: str | None = None, **body: Any) -> LogEntry:
        e = make_entry(self.next_offset, subject, tenant, **body)
        self.entries.append(e)
        self.next_offset += 1
        return e

    def read(self, start: int, count: int) -> list[LogEntry]:
        return [e for e in self.entries if e.offset >= start][:count]

    def first_offset(self) -> int:
        return self.head  # a corrupt batch is still stored: only retention moves this

    def read_with_first(self, start: int, count: int) -> tuple[int, list[LogEntry]]:
        return self.head, self.read(start, count)

    def drop_head(self, upto: int) -> None:
        self.entries = [e for e in self.entries if e.offset >= upto]
        self.head = max(self.head, upto)

    def corrupt(self, lo: int, hi: int) -> None:
        """Offsets lo..hi no longer decode: reads skip them, as ``hub.log.Log.read`` does."""
        self.entries = [e for e in self.entries if not lo <= e.offset <= hi]


class Rig:
    """A kernel driven the way the hub's shell drives it, over a FakeLog."""

    def __init__(self, kernel_settings: KernelSettings = SETTINGS) -> None:
        self.log = FakeLog()
        self.kernel = Kernel(kernel_settings, self.log.next_offset)
        self.now = 0.0

    def publish(self, *subjects: str, tenant: str | None = None, **body: Any) -> list[LogEntry]:
        """Commit entries to the log and route them (as one group commit)."""
        new = [self.log.append(s, tenant, **body) for s in subjects]
        if self.kernel.has_live():
            self.kernel.route(self.log.read(self.kernel.head, len(new)))
        self.kernel.advance(self.log.next_offset)
        return new

    def catch_up(self) -> int:
        """Serve catch-up reads until no queue asks; returns how many reads were served."""
        reads = 0
        while requests := self.kernel.wants_reads():
            for r in requests:
                end = self.log.next_offset
                first, entries = self.log.read_with_first(r.start, r.count)  # as websub does
                self.kernel.feed_catchup(r, entries, end, first)
                reads += 1
        return reads

    def drain(self, sid: int, acks: bool = False, limit: int = 10_000) -> list[LogEntry]:
        """Take everything a subscriber can get (catching up as needed), acking if durable."""
        got: list[LogEntry] = []
        while len(got) < limit:
            self.catch_up()
            d = self.kernel.take(sid, 1000)
            if not d.entries:
                break
            got.extend(d.entries)
            if acks:
                for e in d.entries:
                    self.kernel.ack(sid, e.offset)
        return got


def offsets(entries: list[LogEntry]) -> list[int]:
    return [e.offset for e in entries]


# --- semantics table -------------------------------------------------------------------

SEMANTICS = [
    # (pattern, filter, caller tenant (None: admin), entry subject, entry tenant, delivered)
    ("acme.>", "", "acme", "acme.t1.telemetry.gps", "acme", True),
    ("acme.*.telemetry.*", "", "acme", "acme.t1.telemetry.gps", "acme", True),
    ("acme.*.telemetry.*", "", "acme", "acme.t1.log.auth", "acme", False),
    ("acme.t1.>", "", "acme", "acme.t2.telemetry.gps", "acme", False),
    ("acme.*.log.auth", "attrs.severity <= 3", "acme", "acme.t1.log.auth", "acme", False),
    ("acme.>", "attrs.severity >= 5", "acme", "acme.t1.log.auth", "acme", True),
    ("acme.>", 'device ~ "t*"', "acme", "acme.t1.x", "acme", True),
    ("acme.>", 'device ~ "z*"', "acme", "acme.t1.x", "acme", False),
    ("acme.>", "body.speed > 90", "acme", "acme.t1.x", "acme", True),  # body speed=100 below
    ("acme.>", "body.speed > 190", "acme", "acme.t1.x", "acme", False),
    ("acme.>", "exists body.nothing", "acme", "acme.t1.x", "acme", False),
    # a subject in the tenant's space published under another tenant never reaches it
    ("acme.>", "", "acme", "acme.t1.x", "globex", False),
    # the admin's wildcard-first queue sees every tenant
    ("*.*.x", "", None, "acme.t1.x", "acme", True),
    ("*.*.x", "", None, "globex.g1.x", "globex", True),
    (">", "", None, "globex.g1.x", "globex", True),
    # the admin's tenant-first queue is that tenant's
    ("acme.>", "", None, "acme.t1.x", "globex", False),
]


@pytest.mark.parametrize(("pattern", "flt", "caller", "subject", "tenant", "want"), SEMANTICS)
def test_routing_semantics_table(
    pattern: str, flt: str, caller: str | None, subject: str, tenant: str, want: bool
) -> None:
    for start_behind in (False, True):  # live routing and catch-up reading agree
        rig = Rig()
        rig.publish("acme.t0.warmup")
        spec = QueueSpec(pattern, flt, tenant=caller, start="earliest" if start_behind else None)
        sid = rig.kernel.subscribe(spec, 0.0).subscriber
        rig.publish(subject, tenant=tenant, speed=100)
        got = [e.subject for e in rig.drain(sid) if e.subject != "acme.t0.warmup"]
        assert got == ([subject] if want else []), (start_behind, got)


@settings(max_examples=60, deadline=None)
@given(
    patterns=st.lists(
        st.lists(
            st.sampled_from(["acme", "globex", "t1", "t2", "x", "y", "*"]), min_size=1, max_size=4
        ).map(".".join),
        min_size=1,
        max_size=6,
    ),
    tails=st.lists(st.booleans(), min_size=6, max_size=6),
    filters=st.lists(
        st.sampled_from(["", "attrs.severity <= 3", 'device ~ "t*"']), min_size=6, max_size=6
    ),
    seed=st.integers(0, 10_000),
)
def test_kernel_routing_equals_brute_force(
    patterns: list[str], tails: list[bool], filters: list[str], seed: int
) -> None:
    rng = random.Random(seed)
    rig = Rig(replace(SETTINGS, max_pending=10_000, subscriber_window=10_000))
    subs = []
    for i, p in enumerate(patterns):
        pattern = p + ".>" if tails[i] else p
        sid = rig.kernel.subscribe(QueueSpec(pattern, filters[i], queue=f"q{i}"), 0.0).subscriber
        subs.append((sid, pattern, compile_filter(filters[i]) if filters[i] else None))
    subjects = [
        ".".join(
            rng.choice(["acme", "globex", "t1", "t2", "x", "y"]) for _ in range(rng.randint(1, 5))
        )
        for _ in range(200)
    ]
    published = [
        e
        for s in subjects
        for e in rig.publish(s, tenant=rng.choice(["acme", "globex"]), severity=rng.randint(0, 7))
    ]
    for sid, pattern, flt in subs:
        want = [
            e.offset
            for e in published
            if match_pattern(pattern, e.subject)
            and (pattern.split(".")[0] in ("*", ">") or e.tenant == pattern.split(".")[0])
            and (flt is None or flt.matches(entry_message(e)))
        ]
        assert offsets(rig.drain(sid)) == want, pattern


@pytest.mark.parametrize(
    ("pattern", "subject"),
    [
        ("a.*.c", "a.b.c"),
        ("a.*.c", "a.b.d"),
        ("a.>", "a"),
        ("a.>", "a.b"),
        (">", "x"),
        ("*.b.>", "a.b"),
        ("*.b.>", "a.b.c.d"),
        ("a.b", "a.b"),
        ("a.b", "a.bc"),
    ],
)
def test_subject_matcher_agrees_with_reference(pattern: str, subject: str) -> None:
    assert subject_matcher(pattern)(subject) is match_pattern(pattern, subject)


# --- subscribe errors ------------------------------------------------------------------


def test_bad_requests_are_typed_errors_naming_the_problem() -> None:
    k = Kernel(SETTINGS, 1)
    with pytest.raises(FilterError) as fe:
        k.subscribe(QueueSpec("acme.>", "attrs.x >> 3", tenant="acme"), 0.0)
    assert fe.value.position == 9
    with pytest.raises(SubjectError, match="position"):
        k.subscribe(QueueSpec("acme..x", tenant="acme"), 0.0)
    with pytest.raises(ForbiddenError, match=r"must start with 'acme\.'"):
        k.subscribe(QueueSpec("globex.>", tenant="acme"), 0.0)
    with pytest.raises(ForbiddenError):
        k.subscribe(QueueSpec(">", tenant="acme"), 0.0)
    with pytest.raises(RequestError, match="needs a queue name"):
        k.subscribe(QueueSpec("acme.>", durable=True), 0.0)
    with pytest.raises(RequestError, match="policy is block"):
        k.subscribe(QueueSpec("acme.>", queue="d", durable=True, policy=Policy.DROP_OLDEST), 0.0)
    with pytest.raises(RequestError, match="queue name"):
        k.subscribe(QueueSpec("acme.>", queue="no spaces"), 0.0)
    with pytest.raises(RequestError, match="max_pending"):
        k.subscribe(QueueSpec("acme.>", max_pending=101), 0.0)
    with pytest.raises(RequestError, match="outside the log"):
        k.subscribe(QueueSpec("acme.>", start=5), 0.0)
    k.subscribe(QueueSpec("acme.>", queue="q"), 0.0)
    with pytest.raises(ConflictError, match="PATCH"):
        k.subscribe(QueueSpec("acme.*.x", queue="q"), 0.0)
    with pytest.raises(ConflictError, match="policy"):
        k.subscribe(QueueSpec("acme.>", queue="q", policy=Policy.DROP_OLDEST), 0.0)
    assert k.gauges()["subscribers"] == 1 and k.gauges()["subscriptions"] == 1


def test_limits_on_queues_and_subscribers() -> None:
    k = Kernel(replace(SETTINGS, max_queues=3, max_queues_per_tenant=2, max_subscribers=4), 1)
    k.subscribe(QueueSpec("acme.>", queue="a"), 0.0)
    k.subscribe(QueueSpec("acme.>", queue="b"), 0.0)
    with pytest.raises(LimitError, match="tenant 'acme'"):
        k.subscribe(QueueSpec("acme.>", queue="c"), 0.0)
    k.subscribe(QueueSpec("globex.>"), 0.0)
    with pytest.raises(LimitError, match="3 queues"):
        k.subscribe(QueueSpec("initech.>"), 0.0)
    k.subscribe(QueueSpec("acme.>", queue="a"), 0.0)
    with pytest.raises(LimitError, match="4 subscribers"):
        k.subscribe(QueueSpec("acme.>", queue="a"), 0.0)


# --- queues: competing, fanout, private, expiry ----------------------------------------


def test_competing_subscribers_split_a_queue_and_fanout_queues_each_get_all() -> None:
    rig = Rig()
    k = rig.kernel
    a = k.subscribe(QueueSpec("acme.>", queue="work"), 0.0).subscriber
    b = k.subscribe(QueueSpec("acme.>", queue="work"), 0.0).subscriber
    c = k.subscribe(QueueSpec("acme.*.x", queue="audit"), 0.0).subscriber
    d = k.subscribe(QueueSpec("acme.*.x", queue="map"), 0.0).subscriber
    got_a: list[LogEntry] = []
    got_b: list[LogEntry] = []
    for _ in range(10):
        rig.publish(*["acme.t1.x"] * 9)
        got_a += k.take(a, 5).entries  # a slower reader than b
        got_b += k.take(b, 100).entries
    got_a += rig.drain(a)
    got_b += rig.drain(b)
    all_offsets = list(range(1, 91))
    assert sorted(offsets(got_a) + offsets(got_b)) == all_offsets
    assert got_a and got_b and not set(offsets(got_a)) & set(offsets(got_b))
    assert offsets(got_a) == sorted(offsets(got_a))  # each subscriber sees its share in order
    assert offsets(rig.drain(c)) == all_offsets and offsets(rig.drain(d)) == all_offsets


def test_round_robin_between_subscribers_with_room() -> None:
    rig = Rig()
    k = rig.kernel
    subs = [k.subscribe(QueueSpec("acme.>", queue="w"), 0.0).subscriber for _ in range(3)]
    rig.publish(*["acme.t1.x"] * 6)
    assert [offsets(k.take(s, 10).entries) for s in subs] == [[1, 4], [2, 5], [3, 6]]


def test_named_queue_keeps_entries_between_subscribers_then_expires() -> None:
    rig = Rig()
    k = rig.kernel
    sid = k.subscribe(QueueSpec("acme.>", queue="keep"), 0.0).subscriber
    k.unsubscribe(sid, now=10.0)
    rig.publish("acme.t1.x", "acme.t1.y")
    assert k.expire(10.0 + SETTINGS.queue_idle_s - 1) == []
    sid = k.subscribe(QueueSpec("acme.>", queue="keep"), 20.0).subscriber
    assert offsets(rig.drain(sid)) == [1, 2]  # what came while nobody listened
    k.unsubscribe(sid, now=30.0)
    assert k.expire(30.0 + SETTINGS.queue_idle_s) == []  # removed; not durable: no offset
    assert k.queue_keys() == [] and k.counters.expired_queues == 1


def test_private_queue_goes_with_its_subscriber_and_pinned_queues_never_expire() -> None:
    k = Kernel(SETTINGS, 1)
    att = k.subscribe(QueueSpec("acme.>"), 0.0)
    assert att.key[1].startswith("~")
    k.create(QueueSpec("acme.>", queue="pinned", durable=True), 0.0)
    k.unsubscribe(att.subscriber, 1.0)
    # a worker joins the pinned queue and leaves: the queue stays, and so does its offset
    worker = k.subscribe(QueueSpec("acme.>", queue="pinned", durable=True), 2.0)
    assert worker.key == ("acme", "pinned")
    k.unsubscribe(worker.subscriber, 3.0)
    assert k.queue_keys() == [("acme", "pinned")]
    assert k.expire(1e9) == []
    assert k.queue_keys() == [("acme", "pinned")]
    with pytest.raises(NotFoundError):
        k.change(att.key, "acme.x", None, None)


def test_durable_queue_made_by_subscribe_expires_with_its_offset() -> None:
    k = Kernel(SETTINGS, 1)
    sid = k.subscribe(QueueSpec("acme.>", queue="d", durable=True), 0.0).subscriber
    k.unsubscribe(sid, 5.0)
    assert k.expire(5.0 + SETTINGS.queue_idle_s) == []  # durable queues wait longer
    assert k.expire(5.0 + SETTINGS.durable_idle_s) == [durable_name(("acme", "d"))]


def test_orphan_offsets_are_forgotten_unless_reclaimed() -> None:
    k = Kernel(SETTINGS, 10)
    k.note_orphans(["sub:acme:old", "sub:acme:back", "archive"], 0.0)
    k.subscribe(QueueSpec("acme.>", queue="back", durable=True), 1.0, committed=4)
    assert k.expire(SETTINGS.durable_idle_s) == ["sub:acme:old"]


# --- policies --------------------------------------------------------------------------


def test_drop_oldest_loses_only_its_own_entries_and_counts_them() -> None:
    rig = Rig()
    k = rig.kernel
    slow = k.subscribe(QueueSpec("acme.>", policy=Policy.DROP_OLDEST, max_pending=10), 0.0)
    fast = k.subscribe(QueueSpec("acme.>", policy=Policy.DROP_OLDEST, max_pending=10), 0.0)
    fast_got: list[LogEntry] = []
    for _ in range(20):
        rig.publish(*["acme.t1.x"] * 5)
        fast_got += k.take(fast.subscriber, 1000).entries
    assert offsets(fast_got) == list(range(1, 101))
    d = k.take(slow.subscriber, 1000)
    # its window (8) was handed out first and the newest 10 stayed; the rest were dropped
    assert offsets(d.entries) == list(range(1, 9))
    assert d.dropped == 82 == d.dropped_total
    d = k.take(slow.subscriber, 1000)
    assert offsets(d.entries) == list(range(91, 99)) and d.dropped == 0  # reported once
    assert offsets(rig.drain(slow.subscriber)) == [99, 100]
    assert k.counters.dropped_overflow == 82
    assert k.dropped_by_queue() == [(slow.key, Policy.DROP_OLDEST, 82)]


def test_block_holds_back_only_its_own_reads_and_loses_nothing() -> None:
    rig = Rig()
    k = rig.kernel
    slow = k.subscribe(QueueSpec("acme.>", policy=Policy.BLOCK, max_pending=10), 0.0)
    fast = k.subscribe(QueueSpec("acme.>", policy=Policy.BLOCK, max_pending=10), 0.0)
    fast_got: list[LogEntry] = []
    for i in range(40):
        rig.publish(*["acme.t1.x"] * 5)
        fast_got += k.take(fast.subscriber, 1000).entries
        # the fast queue gets every entry as it is published: the slow one holds back
        # only its own reads, never the kernel's head nor its other queues
        assert len(fast_got) == 5 * (i + 1)
        assert k.head == rig.log.next_offset
    assert offsets(fast_got) == list(range(1, 201))
    assert k.describe(slow.key)["live"] is False and k.counters.blocked == 1
    assert k.describe(slow.key)["position"] == 1  # nothing taken yet: 8 in its window, 10 pending
    # the slow subscriber now reads at its own pace: a few at a time, catching up from the log
    slow_got: list[LogEntry] = []
    while True:
        rig.catch_up()
        batch = k.take(slow.subscriber, 3).entries
        if not batch:
            break
        slow_got += batch
    assert offsets(slow_got) == list(range(1, 201))
    assert k.describe(slow.key)["live"] is True and k.counters.dropped_overflow == 0
    rig.publish("acme.t1.x")  # live again
    assert offsets(k.take(slow.subscriber, 10).entries) == [201]


def test_catch_up_across_retention_counts_what_it_missed() -> None:
    rig = Rig()
    rig.publish(*["acme.t1.x"] * 30)
    rig.log.drop_head(21)
    sid = rig.kernel.subscribe(QueueSpec("acme.>", start="earliest"), 0.0).subscriber
    assert offsets(rig.drain(sid)) == list(range(21, 31))
    assert rig.kernel.counters.skipped_retention == 20


def test_catch_up_tells_corrupt_batches_from_retention() -> None:
    """Past the log's first offset a gap is a stored batch that no longer decodes, whether
    it leads a read or sits inside one; the queue counts both as skipped."""
    rig = Rig()
    rig.publish(*["acme.t1.x"] * 30)
    rig.log.drop_head(6)  # retention: 1-5
    rig.log.corrupt(6, 8)  # leads the first read
    rig.log.corrupt(20, 24)  # inside it
    sub = rig.kernel.subscribe(QueueSpec("acme.>", start="earliest"), 0.0)
    got = offsets(rig.drain(sub.subscriber))
    assert got == [*range(9, 20), *range(25, 31)]
    c = rig.kernel.counters
    assert (c.skipped_retention, c.skipped_corrupt) == (5, 8)
    assert rig.kernel.describe(sub.key)["skipped"] == 13


def test_start_at_an_offset_reads_from_there_then_goes_live() -> None:
    rig = Rig()
    rig.publish(*["acme.t1.x"] * 10)
    sid = rig.kernel.subscribe(QueueSpec("acme.>", start=7), 0.0).subscriber
    rig.publish("acme.t1.x")  # routed while the queue is still behind: read back instead
    assert offsets(rig.drain(sid)) == [7, 8, 9, 10, 11]


def test_credit_paces_a_subscriber() -> None:
    rig = Rig()
    k = rig.kernel
    sid = k.subscribe(QueueSpec("acme.>", queue="c"), 0.0, credit=0).subscriber
    rig.publish(*["acme.t1.x"] * 5)
    assert k.take(sid, 10).entries == []
    k.grant(sid, 2)
    assert offsets(k.take(sid, 10).entries) == [1, 2]
    k.grant(sid, 10)
    assert offsets(k.take(sid, 10).entries) == [3, 4, 5]
    with pytest.raises(RequestError):
        k.grant(sid, 0)


def test_take_ready_names_subscribers_with_something_to_take() -> None:
    rig = Rig()
    k = rig.kernel
    a = k.subscribe(QueueSpec("acme.a.>"), 0.0).subscriber
    b = k.subscribe(QueueSpec("acme.b.>"), 0.0).subscriber
    k.take_ready()
    rig.publish("acme.b.x")
    assert k.take_ready() == {b}
    rig.publish("acme.a.x")
    assert k.take_ready() == {a} and k.take_ready() == set()


# --- durable ---------------------------------------------------------------------------


def test_durable_commit_is_the_highest_contiguous_acked_offset() -> None:
    rig = Rig()
    k = rig.kernel
    att = k.subscribe(QueueSpec("acme.*.x", queue="d", durable=True), 0.0)
    sid = att.subscriber
    (first,) = k.commits_due()  # a new durable queue records where it starts at once
    assert (first.name, first.offset) == ("sub:acme:d", 0)
    k.committed(first)
    rig.publish("acme.t1.x", "acme.t1.y", "acme.t1.x", "acme.t1.x")  # 1 . 3 4 (2 does not match)
    d = k.take(sid, 10)
    assert offsets(d.entries) == [1, 3, 4]
    k.ack(sid, 3)
    assert k.commits_due() == []  # 1 is not acked yet
    k.ack(sid, 1)
    (c,) = k.commits_due()
    assert c.offset == 3  # 2 did not match: done too
    k.committed(c)
    k.ack(sid, 4)
    assert k.commits_due()[0].offset == 4
    with pytest.raises(RequestError, match="not waiting"):
        k.ack(sid, 4)


def test_durable_entries_not_acked_go_to_the_next_subscriber() -> None:
    rig = Rig()
    k = rig.kernel
    a = k.subscribe(QueueSpec("acme.>", queue="d", durable=True), 0.0).subscriber
    rig.publish(*["acme.t1.x"] * 5)
    got = k.take(a, 10).entries
    k.ack(a, got[0].offset)
    k.ack(a, got[2].offset)
    k.unsubscribe(a, 1.0)
    b = k.subscribe(QueueSpec("acme.>", queue="d", durable=True), 2.0).subscriber
    assert offsets(rig.drain(b, acks=True)) == [2, 4, 5]
    assert k.counters.redelivered == 3 and k.commits_due()[0].offset == 5


def test_durable_queue_resumes_at_its_committed_offset_after_a_restart() -> None:
    rig = Rig()
    k = rig.kernel
    sid = k.subscribe(QueueSpec("acme.>", queue="d", durable=True), 0.0).subscriber
    rig.publish(*["acme.t1.x"] * 10)
    for e in k.take(sid, 6).entries:
        k.ack(sid, e.offset)
    (c,) = k.commits_due()
    assert c.offset == 6
    # a new kernel (hub restart) over the same log: the offset persisted is where it resumes
    k2 = Kernel(SETTINGS, rig.log.next_offset)
    rig.kernel = k2
    k2.create(QueueSpec("acme.>", queue="d", durable=True), 0.0, committed=c.offset)
    sid2 = k2.subscribe(QueueSpec("acme.>", queue="d"), 0.0).subscriber
    rig.publish("acme.t1.x")
    assert offsets(rig.drain(sid2, acks=True)) == [7, 8, 9, 10, 11]


def test_filter_changed_mid_stream_applies_from_the_next_entry_without_loss_or_repeat() -> None:
    rng = random.Random(7)
    rig = Rig(replace(SETTINGS, max_pending=16, subscriber_window=4, catchup_batch=7))
    k = rig.kernel
    key = k.create(QueueSpec("acme.>", "attrs.severity <= 3", queue="d", durable=True), 0.0)
    sid = k.subscribe(QueueSpec("acme.>", "attrs.severity <= 3", queue="d"), 0.0).subscriber
    filters = ["attrs.severity <= 3", "attrs.severity > 3", 'device ~ "t1"', ""]
    changes: list[tuple[int, str]] = [(1, filters[0])]
    delivered: list[LogEntry] = []
    for step in range(300):
        rig.publish(f"acme.t{rng.randint(1, 2)}.x", severity=rng.randint(0, 7))  # traffic flows
        if step % 40 == 39:
            text = filters[(step // 40 + 1) % len(filters)]
            changes.append((k.change(key, None, text, "acme"), text))
        if rng.random() < 0.3:  # a slow durable subscriber, so the queue also falls behind
            rig.catch_up()
            got = k.take(sid, rng.randint(1, 3)).entries
            delivered += got
            for e in got:
                k.ack(sid, e.offset)
    delivered += rig.drain(sid, acks=True)
    assert k.counters.blocked > 0  # the changes happened while the queue was behind, too

    def expected(e: LogEntry) -> bool:
        text = [t for start, t in changes if start <= e.offset][-1]
        return not text or compile_filter(text).matches(entry_message(e))

    want = [e.offset for e in rig.log.entries if expected(e)]
    assert offsets(delivered) == want  # in order, none lost, none twice


def test_changing_the_subject_moves_the_queue_in_the_trie() -> None:
    rig = Rig()
    k = rig.kernel
    key = k.create(QueueSpec("acme.a.>", queue="q", durable=False), 0.0)
    sid = k.subscribe(QueueSpec("acme.a.>", queue="q"), 0.0).subscriber
    rig.publish("acme.a.x", "acme.b.x")
    assert k.change(key, "acme.b.>", None, "acme") == 3
    rig.publish("acme.a.x", "acme.b.x")
    assert [e.subject for e in rig.drain(sid)] == ["acme.a.x", "acme.b.x"]
    assert [e.offset for e in rig.drain(sid)] == []
    with pytest.raises(ForbiddenError):
        k.change(key, "globex.>", None, None)  # a queue's tenant is fixed, even for the admin
    with pytest.raises(ForbiddenError):
        k.change(key, "acme.>", None, "globex")
    with pytest.raises(FilterError):
        k.change(key, None, "nope ==", "acme")
    assert k.describe(key)["subject"] == "acme.b.>"


def test_delete_closes_subscribers_and_returns_the_durable_name() -> None:
    k = Kernel(SETTINGS, 1)
    key = k.create(QueueSpec("acme.>", queue="d", durable=True), 0.0)
    sid = k.subscribe(QueueSpec("acme.>", queue="d"), 0.0).subscriber
    assert k.delete(key, "acme") == "sub:acme:d"
    assert k.take(sid, 10).closed == "queue deleted"
    again = k.subscribe(QueueSpec("acme.>", queue="d"), 0.5).subscriber  # made anew meanwhile
    k.ack(sid, 1)  # the old subscriber's late frames touch nothing
    k.unsubscribe(sid, 1.0)
    assert k.gauges()["subscribers"] == 1 and k.queue_keys() == [("acme", "d")]
    k.unsubscribe(again, 1.0)


def test_admin_wildcard_queue_has_the_all_tenants_key() -> None:
    k = Kernel(SETTINGS, 1)
    assert k.subscribe(QueueSpec("*.*.alarm.>", queue="ops"), 0.0).key == (ALL_TENANTS, "ops")
    assert k.queue_keys("acme") == []


def test_route_failure_sends_live_queues_to_the_log() -> None:
    rig = Rig()
    k = rig.kernel
    sid = k.subscribe(QueueSpec("acme.>", queue="d", durable=True), 0.0).subscriber
    rig.publish("acme.t1.x")
    rig.log.append("acme.t1.y")
    k.route_failed(rig.log.next_offset)  # the shell could not read offset 2 back
    assert [e.subject for e in rig.drain(sid, acks=True)] == ["acme.t1.x", "acme.t1.y"]


def test_joining_a_named_queue_may_leave_out_its_subject_and_filter() -> None:
    rig = Rig()
    k = rig.kernel
    k.create(QueueSpec("acme.>", "attrs.severity <= 3", queue="ops", durable=True), 0.0)
    sid = k.subscribe(QueueSpec("", queue="ops", tenant="acme"), 0.0).subscriber
    k.subscribe(QueueSpec("acme.>", queue="ops", tenant="acme"), 0.0)  # filter left out
    with pytest.raises(ConflictError):
        k.subscribe(QueueSpec("acme.>", "", queue="ops", tenant="acme"), 0.0)  # no filter
    with pytest.raises(NotFoundError):
        k.subscribe(QueueSpec("", queue="nope", tenant="acme"), 0.0)
    with pytest.raises(RequestError, match="subject"):
        k.subscribe(QueueSpec("", queue="ops"), 0.0)  # the admin: whose queue?
    rig.publish("acme.t1.x", "acme.t1.x", severity=2)
    assert len(k.take(sid, 10).entries) == 1  # the other went to the second subscriber

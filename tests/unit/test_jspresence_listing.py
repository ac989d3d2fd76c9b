"""Listing the shared presence bucket: the snapshot fold, and the bounded shell over fakes.

``BucketSnapshot`` is pure: stream messages in, entries and ``done`` out.  The shell
(``JetStreamPresence.current()``) runs here against an in-memory JetStream stand-in:
which consumer it asks for, when it stops fetching, that a deadline, the size cap and
NATS failures become ``JetStreamLogError`` and that the consumer is deleted every time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import nats.errors
import pytest
from nats.js import api

from hub import jspresence
from hub.jslog import JetStreamLogError, JetStreamSettings
from hub.jspresence import BucketSnapshot, JetStreamPresence, StreamCount, encode_presence
from hub.presence import PresenceChange, State

PREFIX = "$KV.squall_presence."


def value(device: str, hub: str, at: float, state: State = State.ONLINE) -> bytes:
    return encode_presence(PresenceChange("acme", device, State.OFFLINE, state, at, {}), hub)


# -- the pure fold -------------------------------------------------------------------------


def test_the_newest_value_wins_and_deleted_or_purged_keys_are_absent() -> None:
    snap = BucketSnapshot("squall_presence")
    snap.start(3)
    snap.add(PREFIX + "acme.t1", None, value("t1", "hub-a", 1.0))
    snap.add(PREFIX + "acme.t2", None, value("t2", "hub-a", 2.0))
    snap.add(PREFIX + "acme.t3", None, value("t3", "hub-b", 3.0))
    snap.add(PREFIX + "acme.t1", None, value("t1", "hub-b", 4.0, State.STALE))  # rewritten
    snap.add(PREFIX + "acme.t2", {"KV-Operation": "DEL"}, b"")
    snap.fetched(1)
    assert not snap.done
    snap.add(PREFIX + "acme.t3", {"KV-Operation": "PURGE"}, b"")
    snap.fetched(0)
    assert snap.done
    assert list(snap.entries) == [("acme", "t1")]
    t1 = snap.entries[("acme", "t1")]
    assert (t1.tenant, t1.device, t1.state, t1.hub, t1.at) == (
        "acme",
        "t1",
        State.STALE,
        "hub-b",
        4.0,
    )
    assert snap.seen == {"acme.t1", "acme.t2", "acme.t3"} and snap.messages == 6


def test_a_deleted_key_written_again_is_back() -> None:
    snap = BucketSnapshot("squall_presence")
    snap.add(PREFIX + "acme.t1", {"KV-Operation": "DEL"}, b"")
    snap.add(PREFIX + "acme.t1", None, value("t1", "hub-b", 5.0))
    assert snap.entries[("acme", "t1")].hub == "hub-b"


def test_a_device_id_with_dots_keeps_them() -> None:
    snap = BucketSnapshot("squall_presence")
    snap.add(PREFIX + "acme.gw.7", None, value("gw.7", "hub-a", 1.0))
    snap.add(PREFIX + "acme.gw.8", None, value("gw.8", "hub-a", 1.0))
    snap.add(PREFIX + "acme.gw.8", {"KV-Operation": "DEL"}, b"")
    assert list(snap.entries) == [("acme", "gw.7")]


def test_foreign_messages_are_typed_errors() -> None:
    snap = BucketSnapshot("squall_presence")
    with pytest.raises(JetStreamLogError, match="stray subject"):
        snap.add("$KV.other.acme.t1", None, value("t1", "hub-a", 1.0))
    with pytest.raises(JetStreamLogError, match="is not Squall's"):
        snap.add(PREFIX + "acme.t1", None, b"{not json")


def test_more_keys_than_the_cap_are_refused_deleted_ones_counted() -> None:
    snap = BucketSnapshot("squall_presence", limit=2)
    snap.add(PREFIX + "acme.t1", None, value("t1", "hub-a", 1.0))
    snap.add(PREFIX + "acme.t2", {"KV-Operation": "DEL"}, b"")
    snap.add(PREFIX + "acme.t1", None, value("t1", "hub-a", 2.0))  # a key seen again: no more
    with pytest.raises(JetStreamLogError, match="more than 2 keys"):
        snap.add(PREFIX + "acme.t3", None, value("t3", "hub-a", 1.0))


def test_the_cap_defaults_to_max_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BucketSnapshot("b").limit == jspresence.MAX_LISTED
    monkeypatch.setattr(jspresence, "MAX_LISTED", 3)
    assert BucketSnapshot("b").limit == 3


def test_an_empty_start_is_done() -> None:
    snap = BucketSnapshot("squall_presence")
    snap.start(0)
    assert snap.done and not snap.wants_count()


def test_the_count_is_asked_only_once_the_first_keys_are_all_seen_and_ends_if_it_covers() -> None:
    snap = BucketSnapshot("squall_presence")
    snap.start(2)
    snap.add(PREFIX + "acme.t1", None, value("t1", "hub-a", 1.0))
    snap.fetched(3)
    assert not snap.wants_count()  # fewer keys seen than the stream held at the start
    snap.add(PREFIX + "acme.t2", None, value("t2", "hub-a", 1.0))
    snap.fetched(3)
    assert snap.wants_count()
    snap.covered_by(StreamCount(3, expires=False, history=1))  # a third key, not seen yet
    assert not snap.done
    snap.covered_by(StreamCount(2, expires=True, history=1))  # a seen key may have expired
    assert not snap.done
    snap.covered_by(StreamCount(2, expires=False, history=5))  # more messages than keys
    assert snap.done and not snap.wants_count()


@pytest.mark.parametrize(
    ("count", "done"),
    [
        (StreamCount(2, expires=False, history=1), True),  # both keys seen
        (StreamCount(3, expires=False, history=1), False),  # one key is unseen: fetch again
        (StreamCount(3, expires=True, history=1), True),  # the count proves nothing: the end
        (StreamCount(3, expires=False, history=2), True),
    ],
)
def test_an_empty_fetch_ends_the_listing_unless_a_key_is_provably_unseen(
    count: StreamCount, done: bool
) -> None:
    snap = BucketSnapshot("squall_presence")
    snap.start(3)
    snap.add(PREFIX + "acme.t1", None, value("t1", "hub-a", 1.0))
    snap.add(PREFIX + "acme.t2", None, value("t2", "hub-a", 1.0))
    snap.fetched(1)
    snap.nothing_fetched(count)
    assert snap.done is done


# -- the shell over an in-memory JetStream ----------------------------------------------------


def msg(key: str, pending: int, data: bytes | None = None, op: str | None = None) -> Any:
    device = key.partition(".")[2]
    return SimpleNamespace(
        subject=PREFIX + key,
        headers={"KV-Operation": op} if op else None,
        data=data if data is not None else value(device, "hub-a", 1.0),
        metadata=SimpleNamespace(num_pending=pending),
    )


Fetch = Callable[[int], Any]


class FakeJetStream:
    """The consumer, stream-info and fetch calls current() makes; batches scripted."""

    def __init__(self, pending: int, batches: list[list[Any]], stream_messages: int = 10**9):
        self.pending = pending
        self.batches = batches
        self.stream_messages = stream_messages
        self.max_age = 0.0
        self.history = 1
        self.is_connected = True
        self.configs: list[api.ConsumerConfig] = []
        self.deleted: list[tuple[str, str]] = []
        self.fetches: list[int] = []
        self.infos = 0
        self.bound: list[tuple[str | None, str | None]] = []
        self.unsubscribed = 0
        self.add_error: BaseException | None = None
        self.fetch_error: BaseException | None = None
        self.fetch_hangs = False
        self.delete_error: BaseException | None = None
        self.delete_hangs = False

    # nc
    def jetstream(self, **opts: Any) -> FakeJetStream:
        return self

    def jsm(self, **opts: Any) -> FakeJetStream:
        return self

    # jsm
    async def add_consumer(self, stream: str, config: api.ConsumerConfig) -> Any:
        self.configs.append(config)
        if self.add_error is not None:
            raise self.add_error
        return SimpleNamespace(num_pending=self.pending)

    async def stream_info(self, stream: str) -> Any:
        self.infos += 1
        return SimpleNamespace(
            state=SimpleNamespace(messages=self.stream_messages),
            config=SimpleNamespace(max_age=self.max_age, max_msgs_per_subject=self.history),
        )

    async def delete_consumer(self, stream: str, consumer: str) -> bool:
        if self.delete_hangs:
            await asyncio.Event().wait()
        if self.delete_error is not None:
            raise self.delete_error
        self.deleted.append((stream, consumer))
        return True

    # js
    async def pull_subscribe_bind(
        self, consumer: str | None = None, stream: str | None = None
    ) -> Any:
        self.bound.append((consumer, stream))
        return self

    # subscription
    async def fetch(self, batch: int = 1, timeout: float | None = 5) -> list[Any]:
        self.fetches.append(batch)
        await asyncio.sleep(0)  # a real fetch always waits for the server
        if self.fetch_hangs:
            await asyncio.Event().wait()
        if self.fetch_error is not None:
            raise self.fetch_error
        if not self.batches:
            raise nats.errors.TimeoutError
        return self.batches.pop(0)

    async def unsubscribe(self) -> None:
        self.unsubscribed += 1


def listing(fake: FakeJetStream) -> tuple[JetStreamPresence, dict[tuple[str, str], Any]]:
    presence = on(fake)
    return presence, asyncio.run(presence.current())


def on(fake: FakeJetStream) -> JetStreamPresence:
    presence = JetStreamPresence(JetStreamSettings(), "hub-a")
    presence._nc = fake  # type: ignore[assignment]
    presence._kv = object()  # type: ignore[assignment]
    return presence


def test_the_listing_drains_a_newest_per_key_consumer_and_deletes_it() -> None:
    fake = FakeJetStream(3, [[msg("acme.t1", 2), msg("acme.t2", 1)], [msg("acme.t3", 0)]])
    presence, view = listing(fake)
    assert sorted(view) == [("acme", "t1"), ("acme", "t2"), ("acme", "t3")]
    (config,) = fake.configs
    assert config.deliver_policy is api.DeliverPolicy.LAST_PER_SUBJECT
    assert config.ack_policy is api.AckPolicy.NONE
    assert config.filter_subject == PREFIX + ">"
    assert config.inactive_threshold == jspresence.LIST_INACTIVE_S
    assert not config.headers_only
    assert fake.bound == [(config.name, "KV_squall_presence")]
    assert fake.fetches == [jspresence.LIST_BATCH] * 2
    assert fake.deleted == [("KV_squall_presence", config.name)] and fake.unsubscribed == 1
    assert (presence.stats.listings, presence.stats.list_failures) == (1, 0)


def test_each_listing_uses_its_own_consumer() -> None:
    fake = FakeJetStream(1, [[msg("acme.t1", 0)], [msg("acme.t1", 0)]])
    presence = on(fake)
    asyncio.run(presence.current())
    asyncio.run(presence.current())
    names = [c.name for c in fake.configs]
    assert len(set(names)) == 2 and [n for _, n in fake.deleted] == names


def test_an_empty_bucket_is_listed_without_fetching() -> None:
    fake = FakeJetStream(0, [])
    _, view = listing(fake)
    assert view == {}
    assert fake.fetches == [] and fake.bound == [] and len(fake.deleted) == 1


def test_an_empty_fetch_ends_the_snapshot_when_the_stream_holds_no_unseen_key() -> None:
    fake = FakeJetStream(2, [[msg("acme.t1", 5), msg("acme.t2", 4)]], stream_messages=2)
    _, view = listing(fake)
    assert sorted(view) == [("acme", "t1"), ("acme", "t2")]
    assert len(fake.fetches) == 1 and len(fake.deleted) == 1  # the count ended it already
    fake = FakeJetStream(3, [[msg("acme.t1", 5), msg("acme.t2", 4)]], stream_messages=3)
    fake.history = 4  # more messages than keys: the count cannot tell, the empty fetch ends
    _, view = listing(fake)
    assert sorted(view) == [("acme", "t1"), ("acme", "t2")]
    assert len(fake.fetches) == 2 and fake.infos == 1


def test_an_answer_late_from_a_slow_server_does_not_cut_the_listing_short() -> None:
    # the first fetch gets t1, t2; the next two come back empty (the server is slow),
    # but the stream holds three keys: the listing fetches again and gets t3
    fake = FakeJetStream(3, [[msg("acme.t1", 1), msg("acme.t2", 1)], [], []], stream_messages=3)
    fake.batches.append([msg("acme.t3", 0)])
    real_fetch = fake.fetch

    async def fetch(batch: int = 1, timeout: float | None = 5) -> list[Any]:
        got = await real_fetch(batch, timeout)
        if not got:
            raise nats.errors.TimeoutError
        return got

    fake.fetch = fetch  # type: ignore[method-assign]
    _, view = listing(fake)
    assert sorted(view) == [("acme", "t1"), ("acme", "t2"), ("acme", "t3")]
    assert len(fake.fetches) == 4 and fake.infos == 2


def test_rewrites_by_other_hubs_do_not_keep_the_listing_chasing_the_tail() -> None:
    # every batch ends with more pending (other hubs keep writing); the stream holds
    # three keys: once all three were seen the listing ends without reaching the tail
    endless = [[msg("acme.t1", 9), msg("acme.t2", 9)]] + [[msg("acme.t3", 9)] for _ in range(50)]
    fake = FakeJetStream(3, endless, stream_messages=3)
    _, view = listing(fake)
    assert sorted(view) == [("acme", "t1"), ("acme", "t2"), ("acme", "t3")]
    assert len(fake.fetches) == 2 and fake.infos == 1


def test_a_stream_that_expires_keys_is_read_to_its_tail() -> None:
    batches = [[msg("acme.t1", 1)], [msg("acme.t1", 1)], [msg("acme.t1", 0)]]
    fake = FakeJetStream(1, batches, stream_messages=1)
    fake.max_age = 60.0
    _, view = listing(fake)
    assert list(view) == [("acme", "t1")]
    assert len(fake.fetches) == 3


def test_a_listing_past_its_deadline_is_refused_and_cleaned_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(jspresence, "LIST_DEADLINE_S", 0.05)
    fake = FakeJetStream(2, [])
    fake.fetch_hangs = True  # nats-py's fetch stuck (no answer, no timeout)
    presence = on(fake)
    with pytest.raises(JetStreamLogError, match=r"listing unfinished after 0.05 s \(0 entries"):
        asyncio.run(presence.current())
    assert fake.unsubscribed == 1 and len(fake.deleted) == 1
    assert (presence.stats.listings, presence.stats.list_failures) == (0, 1)


def test_a_listing_over_the_cap_is_refused_and_cleaned_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jspresence, "MAX_LISTED", 2)
    fake = FakeJetStream(3, [[msg("acme.t1", 2), msg("acme.t2", 1), msg("acme.t3", 0)]])
    presence = on(fake)
    with pytest.raises(JetStreamLogError, match="more than 2 keys"):
        asyncio.run(presence.current())
    assert fake.unsubscribed == 1 and len(fake.deleted) == 1
    assert presence.stats.list_failures == 1


@pytest.mark.parametrize(
    ("where", "error"),
    [
        ("add", nats.errors.NoRespondersError()),
        ("add", nats.errors.TimeoutError()),
        ("add", nats.js.errors.APIError(code=404, description="stream not found")),
        ("fetch", nats.errors.ConnectionClosedError()),
        ("fetch", nats.js.errors.APIError(code=409, description="consumer deleted")),
    ],
)
def test_nats_failures_are_typed_errors(where: str, error: BaseException) -> None:
    fake = FakeJetStream(2, [])
    setattr(fake, f"{where}_error", error)
    presence = on(fake)
    with pytest.raises(
        JetStreamLogError, match="presence bucket squall_presence: listing: "
    ) as exc:
        asyncio.run(presence.current())
    assert exc.value.__cause__ is error
    assert len(fake.deleted) == 1  # even a consumer whose creation went unanswered
    assert fake.unsubscribed == (1 if where == "fetch" else 0)


def test_a_foreign_entry_fails_the_listing_typed() -> None:
    fake = FakeJetStream(1, [[msg("acme.t1", 0, data=b"plain text")]])
    with pytest.raises(JetStreamLogError, match="is not Squall's"):
        listing(fake)
    assert len(fake.deleted) == 1


def test_a_failed_or_stuck_cleanup_does_not_spoil_the_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(jspresence, "LIST_CLEANUP_S", 0.05)
    fake = FakeJetStream(1, [[msg("acme.t1", 0)]])
    fake.delete_error = nats.errors.TimeoutError()
    assert list(listing(fake)[1]) == [("acme", "t1")]
    fake = FakeJetStream(1, [[msg("acme.t1", 0)]])
    fake.delete_hangs = True  # the server drops it after LIST_INACTIVE_S
    assert list(listing(fake)[1]) == [("acme", "t1")]


def test_a_disconnected_client_does_not_wait_to_delete() -> None:
    fake = FakeJetStream(2, [])
    fake.add_error = nats.errors.ConnectionClosedError()
    fake.is_connected = False
    fake.delete_hangs = True  # would hang the test if it were asked
    with pytest.raises(JetStreamLogError, match="ConnectionClosedError"):
        listing(fake)


def test_listing_before_open_is_a_typed_error() -> None:
    presence = JetStreamPresence(JetStreamSettings(), "hub-a")
    with pytest.raises(JetStreamLogError, match="not open"):
        asyncio.run(presence.current())

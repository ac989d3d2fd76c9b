"""Listing the shared presence bucket against a real nats-server (Debian's, on loopback).

``JetStreamPresence.current()`` reads the bucket's stream through a short-lived pull
consumer: every key comes back even while other hubs rewrite keys, deleted and purged
keys do not, and no consumer is left on the server afterwards, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from hub import jspresence
from hub.jslog import JetStreamLogError, JetStreamSettings
from hub.jspresence import (
    DEFAULT_BUCKET,
    JetStreamPresence,
    encode_presence,
    presence_key,
)
from hub.presence import PresenceChange, State
from tests.integration.realpeers import NatsServer
from tests.integration.test_jetstream import settings_for

pytestmark = pytest.mark.integration

STREAM = f"KV_{DEFAULT_BUCKET}"


def online(device: str, at: float, tenant: str = "acme") -> PresenceChange:
    return PresenceChange(tenant, device, State.OFFLINE, State.ONLINE, at, {"seq": int(at)})


def offline(device: str, at: float, tenant: str = "acme") -> PresenceChange:
    return PresenceChange(tenant, device, State.ONLINE, State.OFFLINE, at, {"seq": int(at)})


async def opened(settings: JetStreamSettings, hub: str) -> JetStreamPresence:
    p = JetStreamPresence(settings, hub)
    await p.open()
    return p


async def raw_bucket(server: NatsServer) -> tuple[NATS, KeyValue]:
    """A plain nats-py connection and handle on the bucket: another hub's writes."""
    nc = await nats.connect(server.url)
    return nc, await nc.jetstream().key_value(DEFAULT_BUCKET)


async def consumers_on_bucket(nc: NATS) -> tuple[int, list[str]]:
    """(consumer count in the stream info, names listed) of the bucket's stream."""
    jsm = nc.jsm()
    info = await jsm.stream_info(STREAM)
    names = [c.name for c in await jsm.consumers_info(STREAM)]
    return info.state.consumer_count or 0, names


def test_every_hubs_keys_come_back_and_deleted_ones_do_not(nats_server: NatsServer) -> None:
    async def run() -> None:
        s = settings_for(nats_server)
        a, b, reader = [await opened(s, h) for h in ("hub-a", "hub-b", "hub-c")]
        await a.publish([online(f"a{i}", 10.0 + i) for i in range(5)])
        await b.publish([online(f"b{i}", 20.0 + i) for i in range(5)])
        await b.publish([online("x1", 30.0, tenant="globex")])
        await a.publish([offline("a2", 40.0)])  # a's own entry: rewritten, newest wins
        nc, kv = await raw_bucket(nats_server)
        await kv.delete(presence_key("acme", "a3"))
        await kv.purge(presence_key("acme", "b4"))
        view = await reader.current()
        expected = {("acme", f"a{i}") for i in (0, 1, 2, 4)}
        expected |= {("acme", f"b{i}") for i in (0, 1, 2, 3)} | {("globex", "x1")}
        assert set(view) == expected
        assert (view[("acme", "a2")].state, view[("acme", "a2")].hub) == (State.OFFLINE, "hub-a")
        assert view[("acme", "a2")].at == 40.0
        assert (view[("acme", "b1")].state, view[("acme", "b1")].hub) == (State.ONLINE, "hub-b")
        assert view[("acme", "b1")].heartbeat == {"seq": 21}
        assert view[("globex", "x1")].device == "x1"
        await kv.put(presence_key("acme", "a3"), encode_presence(online("a3", 50.0), "hub-b"))
        again = await reader.current()  # a deleted key written again is back
        assert set(again) == expected | {("acme", "a3")}
        assert again[("acme", "a3")].hub == "hub-b"
        assert reader.stats.listings == 2 and reader.stats.list_failures == 0
        for p in (a, b, reader):
            await p.close()
        await nc.close()

    asyncio.run(run())


def test_an_empty_bucket_lists_nothing(nats_server: NatsServer) -> None:
    async def run() -> None:
        reader = await opened(settings_for(nats_server), "hub-a")
        assert await reader.current() == {}
        nc, kv = await raw_bucket(nats_server)
        await kv.put("acme.gone", encode_presence(online("gone", 1.0), "hub-a"))
        await kv.delete("acme.gone")
        assert await reader.current() == {}  # only a delete marker left
        assert await consumers_on_bucket(nc) == (0, [])
        await reader.close()
        await nc.close()

    asyncio.run(run())


def test_keys_rewritten_during_listings_are_never_missing(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [f"t{i}" for i in range(40)]
    calls = 60
    # small fetches: the snapshot spans several, so keys are rewritten (their snapshot
    # message removed, history 1) before the consumer reaches them
    monkeypatch.setattr(jspresence, "LIST_BATCH", 8)

    async def run() -> None:
        s = settings_for(nats_server)
        reader = await opened(s, "hub-c")
        nc, kv = await raw_bucket(nats_server)
        for i, d in enumerate(keys):
            await kv.put(presence_key("acme", d), encode_presence(online(d, float(i)), "hub-a"))
        writes = 0
        stop = asyncio.Event()

        async def rewrite(hub: str, order: list[str]) -> None:
            nonlocal writes
            at = 100.0
            while not stop.is_set():
                for d in order:
                    at += 1.0
                    await kv.put(presence_key("acme", d), encode_presence(online(d, at), hub))
                    writes += 1

        writers = [
            asyncio.create_task(rewrite("hub-a", keys)),
            asyncio.create_task(rewrite("hub-b", keys[::-1])),
            asyncio.create_task(rewrite("hub-a", keys[20:] + keys[:20])),
        ]
        raced = 0
        slowest = 0.0
        try:
            for _ in range(calls):
                before = writes
                started = time.monotonic()
                view = await reader.current()  # a JetStreamLogError (deadline) fails the test
                slowest = max(slowest, time.monotonic() - started)
                raced += writes > before
                missing = {("acme", d) for d in keys} - set(view)
                assert not missing, f"listing missed {sorted(missing)}"
                assert {p.hub for p in view.values()} <= {"hub-a", "hub-b"}
        finally:
            stop.set()
            await asyncio.gather(*writers)
        # the test is about the race: most listings must have had rewrites under them
        assert raced >= calls // 2, f"only {raced} of {calls} listings raced a rewrite"
        assert reader.stats.listings == calls and reader.stats.list_failures == 0
        print(f"\n{calls} listings of {len(keys)} keys, {writes} rewrites, slowest {slowest:.3f} s")
        await reader.close()
        await nc.close()

    asyncio.run(run())


def test_no_consumer_is_left_behind_after_listings_that_end_or_fail(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def run() -> None:
        reader = await opened(settings_for(nats_server), "hub-a")
        await reader.publish([online(f"d{i}", float(i)) for i in range(30)])
        nc, _ = await raw_bucket(nats_server)
        for _ in range(40):
            assert len(await reader.current()) == 30
        assert await consumers_on_bucket(nc) == (0, [])

        monkeypatch.setattr(jspresence, "MAX_LISTED", 10)  # the cap: refused, cleaned up
        with pytest.raises(JetStreamLogError, match="more than 10 keys"):
            await reader.current()
        assert await consumers_on_bucket(nc) == (0, [])
        monkeypatch.undo()

        monkeypatch.setattr(jspresence, "LIST_BATCH", 7)  # many fetches per listing
        assert len(await reader.current()) == 30
        assert await consumers_on_bucket(nc) == (0, [])

        monkeypatch.setattr(jspresence, "LIST_DEADLINE_S", 1e-6)  # the deadline: expired
        with pytest.raises(JetStreamLogError, match="listing unfinished after"):
            await reader.current()
        assert await consumers_on_bucket(nc) == (0, [])
        assert reader.stats.list_failures == 2
        await reader.close()
        await nc.close()

    asyncio.run(run())


def test_a_listing_without_nats_is_a_typed_error(nats_server: NatsServer) -> None:
    async def run() -> None:
        s = settings_for(nats_server, publish_timeout_s=0.5)
        reader = await opened(s, "hub-a")
        await reader.publish([online("d1", 1.0)])
        nats_server.stop()
        with pytest.raises(JetStreamLogError, match="presence bucket squall_presence"):
            await reader.current()
        nats_server.start()
        await reader.close()

    asyncio.run(run())


def test_the_server_drops_the_consumer_of_a_lister_that_died(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def died(*args: object) -> None:  # the hub was killed before it could clean up
        return None

    async def run() -> None:
        reader = await opened(settings_for(nats_server), "hub-a")
        await reader.publish([online("d1", 1.0)])
        nc, _ = await raw_bucket(nats_server)
        monkeypatch.setattr(reader, "_drop_consumer", died)
        assert list(await reader.current()) == [("acme", "d1")]
        count, names = await consumers_on_bucket(nc)
        assert count == 1 and names[0].startswith("squall-list-")
        for _ in range(300):  # inactive_threshold (LIST_INACTIVE_S) is up to the server
            if await consumers_on_bucket(nc) == (0, []):
                break
            await asyncio.sleep(0.1)
        assert await consumers_on_bucket(nc) == (0, [])
        await reader.close()
        await nc.close()

    asyncio.run(run())

"""WebSocket subscribers and /v1/subscriptions on a real hub fed by real edge agents (loopback)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.agent import Agent
from edge.config import load_edge_config
from hub.config import load_hub_config
from hub.http import start_http
from hub.log import LogEntry
from hub.server import Hub
from tests.integration.conftest import until

from .conftest import write_edge_config, write_hub_config

pytestmark = pytest.mark.integration

ADMIN = "s3cret"
ACME = "acme-token-0123456789"
GLOBEX = "globex-token-0123456789"
TOKENS = {"acme": ACME, "globex": GLOBEX}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def run(main: Callable[[], Awaitable[None]], timeout: float = 30) -> None:
    asyncio.run(asyncio.wait_for(main(), timeout))


@dataclass
class Stack:
    """A hub with its HTTP API and one edge agent per (tenant, device)."""

    hub: Hub
    base: str
    http: aiohttp.ClientSession
    agents: dict[str, Agent] = field(default_factory=dict)

    def ws_url(self, **params: str | int) -> str:
        from urllib.parse import urlencode

        return f"{self.base.replace('http', 'ws', 1)}/v1/subscribe?{urlencode(params)}"

    async def publish(
        self, device: str, n: int, kind: str = "telemetry.gps", first: int = 0
    ) -> None:
        """Publish ``n`` records, awaiting the spool's group commit every 10 (traffic flows)."""
        agent = self.agents[device]
        for i in range(first, first + n):
            if (i - first) % 10 == 9 or i == first + n - 1:
                await agent.publish(kind, {"i": i})
            else:
                agent.publish_nowait(kind, {"i": i})

    async def settled(self) -> None:
        """Every agent's spool is empty: all it published is committed (and routed)."""

        def empty() -> bool:
            return all(
                all(d[0] == 0 for d in a.spool.depth().values()) for a in self.agents.values()
            )

        await until(empty, what="spools drained")

    def log_entries(self) -> list[LogEntry]:
        return self.hub.log.read(1, self.hub.log.next_offset)

    async def metrics(self) -> dict[str, float]:
        async with self.http.get(f"{self.base}/metrics", headers=auth(ADMIN)) as r:
            text = await r.text()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
        return out


@asynccontextmanager
async def stack(
    tmp_path: Path, pki: Path, devices: list[tuple[str, str]], **hub_overrides: Any
) -> AsyncIterator[Stack]:
    http_cfg = {"tenant_tokens": TOKENS, **hub_overrides.pop("http", {})}
    cfg = load_hub_config(write_hub_config(tmp_path, pki, http=http_cfg, **hub_overrides))
    hub = Hub(cfg)
    await hub.start()
    runner, port = await start_http(hub)
    session = aiohttp.ClientSession()
    st = Stack(hub, f"http://127.0.0.1:{port}", session)
    try:
        for tenant, device in devices:
            path = write_edge_config(tmp_path, pki, device, [cfg.listen], tenant=tenant)
            agent = Agent(load_edge_config(path))
            agent.start()
            st.agents[device] = agent
        yield st
    finally:
        for agent in st.agents.values():
            await agent.stop()
        await session.close()
        await hub.stop()
        await runner.cleanup()


@dataclass
class Reader:
    """Collects what one WebSocket subscriber receives."""

    ws: aiohttp.ClientWebSocketResponse
    hello: dict[str, Any]
    msgs: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    ack: bool = False
    task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async for msg in self.ws:
            frame = json.loads(msg.data)
            if frame["type"] == "msg":
                self.msgs.append(frame)
                if self.ack:
                    await self.ws.send_json({"type": "ack", "offset": frame["offset"]})
            elif frame["type"] == "dropped":
                self.dropped.append(frame)
            elif frame["type"] == "error":
                self.errors.append(frame)

    def offsets(self) -> list[int]:
        return [m["offset"] for m in self.msgs]

    def data(self) -> list[int]:
        return [m["body"]["i"] for m in self.msgs if m["subject"].endswith("telemetry.gps")]


async def subscribe(st: Stack, token: str, ack: bool = False, **params: str | int) -> Reader:
    ws = await st.http.ws_connect(st.ws_url(**params), headers=auth(token))
    hello = json.loads((await ws.receive()).data)
    assert hello["type"] == "subscribed", hello
    reader = Reader(ws, hello, ack=ack)
    reader.task = asyncio.create_task(reader._run())
    return reader


async def refused(st: Stack, token: str | None, **params: str | int) -> tuple[int, str]:
    """Status and error of a WebSocket subscribe the hub refuses."""
    headers = auth(token) if token else {}
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await st.http.ws_connect(st.ws_url(**params), headers=headers)
    async with st.http.get(
        st.ws_url(**params).replace("ws", "http", 1),
        headers={
            **headers,
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    ) as r:
        body = await r.json()
        assert r.status == exc.value.status
    return exc.value.status, body["error"]


def test_tenant_tokens_see_only_their_tenant_and_bad_requests_get_clear_errors(
    tmp_path: Path, pki: Path
) -> None:
    async def main() -> None:
        async with stack(tmp_path, pki, [("acme", "a1"), ("globex", "g1")]) as st:
            acme = await subscribe(st, ACME, subject="acme.>")
            globex = await subscribe(st, GLOBEX, subject="globex.*.telemetry.>")
            admin = await subscribe(st, ADMIN, subject="*.*.telemetry.gps")
            await st.publish("a1", 40)
            await st.publish("g1", 30)
            await st.settled()
            await until(lambda: len(admin.msgs) == 70 and len(globex.msgs) == 30)
            await until(lambda: len(acme.data()) == 40)
            assert {m["tenant"] for m in acme.msgs} == {"acme"}
            assert all(m["subject"].startswith("acme.") for m in acme.msgs)
            assert {m["tenant"] for m in globex.msgs} == {"globex"} and globex.data() == list(
                range(30)
            )
            assert acme.data() == list(range(40))  # per device order kept
            assert {m["tenant"] for m in admin.msgs} == {"acme", "globex"}
            first = acme.msgs[0]
            assert set(first) == {
                "type",
                "offset",
                "subject",
                "tenant",
                "device",
                "seq",
                "lane",
                "ts_us",
                "attrs",
                "body",
            }

            # 403: outside the token's tenant
            status, error = await refused(st, ACME, subject="globex.>")
            assert status == 403 and "must start with 'acme.'" in error
            assert (await refused(st, ACME, subject=">"))[0] == 403
            assert (await refused(st, ACME, subject="*.*.telemetry.gps"))[0] == 403
            # 401: no token, a wrong token
            status, error = await refused(st, None, subject="acme.>")
            assert status == 401 and "bearer token" in error
            assert (await refused(st, "nope-nope-nope-nope", subject="acme.>"))[0] == 401
            # 400: malformed
            status, error = await refused(st, ACME, subject="acme.>", filter="attrs.x >> 1")
            assert status == 400 and "at position 9" in error
            status, error = await refused(st, ACME, subject="acme..x")
            assert status == 400 and "empty token at position 5" in error
            status, error = await refused(st, ACME, subject="acme.>", **{"from": "yesterday"})
            assert status == 400 and "from must be" in error
            status, error = await refused(st, ACME, subject="acme.>", colour="red")
            assert status == 400 and "unknown parameter 'colour'" in error
            assert (await refused(st, ACME, queue="x y", subject="acme.>"))[0] == 400
            assert (await refused(st, ACME))[0] == 400
            # a tenant token opens nothing else; it lists only its own queues
            for path in ("/metrics", "/v1/devices"):
                async with st.http.get(st.base + path, headers=auth(ACME)) as r:
                    assert r.status == 403
            async with st.http.get(f"{st.base}/v1/subscriptions", headers=auth(GLOBEX)) as r:
                listed = (await r.json())["subscriptions"]
            assert [s["tenant"] for s in listed] == ["globex"]
            async with st.http.get(f"{st.base}/v1/subscriptions", headers=auth(ADMIN)) as r:
                assert len((await r.json())["subscriptions"]) == 3
            async with st.http.delete(
                f"{st.base}/v1/subscriptions/globex/{globex.hello['queue']}", headers=auth(ACME)
            ) as r:
                assert r.status == 403
            # a bad client frame gets an error frame; the subscription goes on
            await acme.ws.send_str("{not json")
            await acme.ws.send_json({"type": "ack", "offset": 1})
            await until(lambda: len(acme.errors) == 2)
            assert (
                acme.errors[1]["code"] == "bad_ack" and "not durable" in acme.errors[1]["message"]
            )
            await st.publish("a1", 1, first=40)
            await until(lambda: acme.data()[-1:] == [40])
            for r_ in (acme, globex, admin):
                await r_.ws.close()

    run(main)


def test_competing_subscribers_split_a_queue_and_fanout_queues_each_get_all(
    tmp_path: Path, pki: Path
) -> None:
    async def main() -> None:
        async with stack(tmp_path, pki, [("acme", "a1"), ("acme", "a2")]) as st:
            subject = "acme.*.telemetry.gps"
            work = [await subscribe(st, ACME, subject=subject, queue="work") for _ in range(2)]
            fans = [await subscribe(st, ACME, subject=subject, queue=f"fan{i}") for i in range(3)]
            await asyncio.gather(st.publish("a1", 150), st.publish("a2", 150))
            await st.settled()
            total = 300
            await until(lambda: sum(len(w.msgs) for w in work) == total, what="work queue")
            await until(lambda: all(len(f.msgs) == total for f in fans), what="fanout")
            logged = [e.offset for e in st.log_entries() if e.subject.endswith("telemetry.gps")]
            a, b = (set(w.offsets()) for w in work)
            assert a and b and not a & b, "competing subscribers share the queue's entries"
            assert sorted(a | b) == logged
            for f in fans:
                assert f.offsets() == logged  # each fanout queue: all, in log order
            await asyncio.sleep(0.2)
            assert sum(len(w.msgs) for w in work) == total  # nothing more came, nothing twice

    run(main)


def test_slow_subscribers_lose_only_their_own_and_the_counter_says_how_many(
    tmp_path: Path, pki: Path
) -> None:
    async def main() -> None:
        async with stack(tmp_path, pki, [("acme", "a1")]) as st:
            subject = "acme.a1.telemetry.gps"
            fast = await subscribe(st, ACME, subject=subject)
            # credit=0: these two take nothing until they grant credit (a subscriber that stalls)
            dropper = await subscribe(
                st, ACME, subject=subject, policy="drop-oldest", max_pending=10, credit=0
            )
            blocker = await subscribe(
                st, ACME, subject=subject, policy="block", max_pending=10, credit=0
            )
            n = 200
            await st.publish("a1", n)
            await st.settled()
            await until(lambda: len(fast.msgs) == n, what="fast subscriber")
            assert fast.data() == list(range(n))
            metrics = await st.metrics()
            name = dropper.hello["queue"]
            key = (
                f"squall_kernel_queue_dropped_total{{policy=drop-oldest,queue={name},tenant=acme}}"
            )
            assert metrics[key] == n - 10
            assert metrics["squall_kernel_dropped_total{reason=drop-oldest}"] == n - 10
            assert metrics["squall_kernel_blocked_total"] == 1
            assert not [k for k in metrics if "queue_dropped" in k and fast.hello["queue"] in k]
            for r in (dropper, blocker):
                await r.ws.send_json({"type": "credit", "n": 1000})
            await until(lambda: len(dropper.msgs) == 10 and len(blocker.msgs) == n)
            # told as it happened, even while it took nothing: the counts add up to the total
            assert sum(d["count"] for d in dropper.dropped) == n - 10
            assert dropper.dropped[-1]["total"] == n - 10
            assert dropper.data() == list(range(n - 10, n))  # the newest stayed
            assert blocker.data() == list(range(n))  # block loses nothing: it read the log
            assert not blocker.dropped

    run(main)


def test_durable_queue_filter_changed_mid_stream_then_survives_a_hub_restart(
    tmp_path: Path, pki: Path
) -> None:
    subs = [{"queue": "ops", "subject": "acme.>", "filter": "body.i < 1000"}]

    async def first_run() -> tuple[list[int], list[tuple[int, str]]]:
        async with stack(tmp_path, pki, [("acme", "a1")], subscriptions=subs) as st:
            reader = await subscribe(st, ACME, ack=True, queue="ops")
            assert reader.hello["durable"] and reader.hello["pinned"]
            changes = [(1, "body.i < 1000")]
            publishing = asyncio.create_task(st.publish("a1", 300))
            await until(lambda: len(reader.data()) >= 50, what="first messages")
            url = f"{st.base}/v1/subscriptions/acme/ops"
            async with st.http.patch(url, json={"filter": "body.i % 2"}, headers=auth(ACME)) as r:
                assert r.status == 400 and "position 7" in (await r.json())["error"]
            async with st.http.patch(
                url, json={"filter": "body.i >= 200 or body.i < 20"}, headers=auth(ACME)
            ) as r:
                assert r.status == 200
                changes.append(((await r.json())["applies_from"], "body.i >= 200 or body.i < 20"))
            await publishing
            await st.settled()
            await until(lambda: reader.data()[-1:] == [299], what="last message")
            described: dict[str, Any] = {}
            for _ in range(100):  # every ack is in and persisted
                async with st.http.get(url, headers=auth(ACME)) as r:
                    described = await r.json()
                if described["committed"] == st.hub.log.next_offset - 1:
                    break
                await asyncio.sleep(0.05)
            assert described["committed"] == st.hub.log.next_offset - 1
            assert described["unacked"] == 0
            await reader.ws.close()
            # 100 more while nobody listens: the durable queue keeps its place
            await st.publish("a1", 100, first=300)
            await st.settled()
            return reader.offsets(), changes

    delivered, changes = asyncio.run(asyncio.wait_for(first_run(), 30))
    assert changes[1][0] > 1

    async def second_run() -> None:
        async with stack(tmp_path, pki, [], subscriptions=subs) as st:
            reader = await subscribe(st, ACME, ack=True, queue="ops")
            entries = st.log_entries()
            data = [e for e in entries if e.subject == "acme.a1.telemetry.gps"]
            await until(lambda: len(reader.data()) == 100, what="resumed messages")
            assert reader.data() == list(range(300, 400))  # the filter was reset by the restart

            def wanted(e: LogEntry) -> bool:
                i = e.body["i"]  # type: ignore[index]
                if e.offset < changes[1][0]:
                    return bool(i < 1000)
                return bool(i >= 200 or i < 20)

            want = [e.offset for e in data if e.offset <= delivered[-1] and wanted(e)]
            got = [o for o in delivered if o in {e.offset for e in data}]
            assert got == want  # in order, nothing lost, nothing twice around the change
            assert len(set(delivered)) == len(delivered)

    run(second_run)


def test_subscriptions_api_creates_changes_and_deletes(tmp_path: Path, pki: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path, pki, [("acme", "a1")]) as st:
            url = f"{st.base}/v1/subscriptions"
            body = {"queue": "alarms", "subject": "acme.*.alarm.>", "filter": "", "durable": True}
            async with st.http.post(url, json=body, headers=auth(ACME)) as r:
                assert r.status == 201
                made = await r.json()
            assert made["durable"] and made["policy"] == "block"
            assert made["committed"] == made["position"] - 1  # starts now, persisted at once
            async with st.http.post(url, json=body, headers=auth(ACME)) as r:
                assert r.status == 409
            async with st.http.post(
                url, json={**body, "subject": "globex.>"}, headers=auth(ACME)
            ) as r:
                assert r.status == 403
            async with st.http.post(url, json={**body, "colour": 1}, headers=auth(ACME)) as r:
                assert r.status == 400 and "colour" in (await r.json())["error"]
            assert "sub:acme:alarms" in st.hub.log.consumer_offsets()
            reader = await subscribe(st, ACME, ack=True, queue="alarms")
            await st.publish("a1", 3, kind="alarm.door")
            await st.settled()
            await until(lambda: len(reader.msgs) == 3)
            async with st.http.patch(
                f"{url}/acme/alarms", json={"subject": "acme.*.telemetry.>"}, headers=auth(ACME)
            ) as r:
                assert r.status == 200 and (await r.json())["subject"] == "acme.*.telemetry.>"
            await st.publish("a1", 2)
            await st.settled()
            await until(lambda: len(reader.msgs) == 5)
            async with st.http.delete(f"{url}/acme/alarms", headers=auth(ACME)) as r:
                assert r.status == 200
            await asyncio.wait_for(reader.task, 5)  # type: ignore[arg-type]
            assert reader.ws.close_code == 4410
            assert "sub:acme:alarms" not in st.hub.log.consumer_offsets()
            async with st.http.get(f"{url}/acme/alarms", headers=auth(ACME)) as r:
                assert r.status == 404

    run(main)

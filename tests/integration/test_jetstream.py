"""The JetStream log backend against a real nats-server (Debian's, started here on loopback)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hub.archive import JsonArchive
from hub.jslog import (
    OFFSET_STRIDE,
    JetStreamConsumer,
    JetStreamLog,
    JetStreamLogError,
    JetStreamLogView,
    JetStreamSettings,
)
from hub.log import LogEntry, PendingBatch
from tests.integration.realpeers import NatsServer
from transport.batchcodec import Record, encode_batch


def settings_for(server: NatsServer, **kw: object) -> JetStreamSettings:
    base: dict[str, object] = {
        "servers": [server.url],
        "stream": "SQUALLTEST",
        "publish_timeout_s": 2.0,
        "reconnect_wait_s": 0.2,
    }
    base.update(kw)
    s = JetStreamSettings(**base)  # type: ignore[arg-type]
    s.validate()
    return s


def batch(device: str, first: int, last: int, lane: int = 1, inc: int = 7) -> PendingBatch:
    """A batch as a session hands it over: payload as received on the wire."""
    records = [
        Record(
            seq,
            1_700_000_000_000_000 + seq,
            f"acme.{device}.telemetry.gps",
            {"n": seq},
            {"speed_kmh": seq % 130, "lat": 52.5 + seq / 1e5},
        )
        for seq in range(first, last + 1)
    ]
    codec, payload = encode_batch(records)
    return PendingBatch(
        "acme",
        device,
        inc,
        lane,
        None,
        codec,
        payload,
        1_700_000_000_000_000,
        first,
        last,
        len(records),
    )


def seqs_by_device(entries: list[LogEntry]) -> dict[tuple[str, int], list[int]]:
    out: dict[tuple[str, int], list[int]] = {}
    for e in entries:
        out.setdefault((e.device, e.lane), []).append(e.seq)
    return out


async def read_all(consumer: JetStreamConsumer, expect: int) -> list[LogEntry]:
    got: list[LogEntry] = []
    for _ in range(200):
        if len(got) >= expect:
            break
        start = got[-1].offset + 1 if got else consumer.committed + 1
        chunk = await consumer.read(start, 5000, wait_s=0.2)
        got.extend(chunk)
    # nothing more arrives
    start = got[-1].offset + 1 if got else consumer.committed + 1
    got.extend(await consumer.read(start, 5000, wait_s=0.3))
    return got


# -- tests ---------------------------------------------------------------------------------------


def test_groups_come_back_in_order_through_a_durable_consumer(nats_server: NatsServer) -> None:
    async def run() -> None:
        s = settings_for(nats_server)
        log = JetStreamLog(s)
        await log.open()
        # nats-server's default max_payload (1 MiB) is below the hub's largest DATA frame
        assert 1_000_000 < log.max_batch_bytes < 1 << 20
        groups = [
            [batch("t1", 1, 50), batch("t2", 1, 10, lane=0), batch("t2", 11, 20, lane=2)],
            [batch("t1", 51, 100), batch("t2", 21, 30, lane=0)],
            [batch("t3", 1, 4000)],  # a large batch: one message, kept whole
        ]
        results = [await log.append_group(g, 0.0) for g in groups]
        assert [c for r in results for _, c in r] == [50, 10, 10, 50, 10, 4000]
        bases = [b for r in results for b, _ in r]
        assert bases == sorted(bases) and len(set(bases)) == len(bases)

        reader = JetStreamConsumer(s, "archive")
        await reader.open()
        got = await read_all(reader, 4130)
        assert len(got) == 4130
        offsets = [e.offset for e in got]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
        assert offsets[0] == bases[0]  # a batch's first record sits at its base offset
        by = seqs_by_device(got)
        assert by[("t1", 1)] == list(range(1, 101))
        assert by[("t2", 0)] == list(range(1, 11)) + list(range(21, 31))
        assert by[("t2", 2)] == list(range(11, 21))
        assert by[("t3", 1)] == list(range(1, 4001))
        first = got[0]
        assert (first.tenant, first.incarnation, first.subject) == (
            "acme",
            7,
            "acme.t1.telemetry.gps",
        )
        assert first.body == {"speed_kmh": 1, "lat": 52.50001} and first.attrs == {"n": 1}

        # commit part of the way, reopen: the durable resumes after what was committed
        cut = got[2999].offset
        await reader.commit(cut)
        await reader.close()
        again = JetStreamConsumer(s, "archive")
        await again.open()
        await log.append_group([batch("t1", 101, 110)], 0.0)
        rest = await read_all(again, 10)
        # the batch holding record 3000 was not fully committed: it comes again, whole
        assert [e.seq for e in rest if e.device == "t1"] == list(range(101, 111))
        assert {e.device for e in rest} == {"t1", "t3"}
        assert min(e.offset for e in rest) <= cut < max(e.offset for e in rest)
        await again.close()
        await log.close()

    asyncio.run(run())


def test_a_retransmit_through_another_hub_is_stored_once(nats_server: NatsServer) -> None:
    async def run() -> None:
        s = settings_for(nats_server)
        hub_a, hub_b = JetStreamLog(s), JetStreamLog(s)
        await hub_a.open()
        await hub_b.open()
        # both hubs know the device has nothing stored, then both get the same batch (a
        # retransmit after a lost ACK landing on another hub): JetStream's duplicate
        # window keeps one by its message id
        assert await hub_a.load_marks("acme", "t1", 7) == {}
        assert await hub_b.load_marks("acme", "t1", 7) == {}
        ra, rb = await asyncio.gather(
            hub_a.append_group([batch("t1", 1, 20)], 0.0),
            hub_b.append_group([batch("t1", 1, 20)], 0.0),
        )
        assert sorted([ra[0][1], rb[0][1]]) == [0, 20]
        assert ra[0][0] == rb[0][0]  # the duplicate's ack names the stored message
        assert hub_a.stats.duplicates_window + hub_b.stats.duplicates_window == 1

        # the device comes back later, cut into other batches (a different message id,
        # as after an outage longer than the duplicate window): the range check trims
        hub_b.forget_device("acme", "t1")
        res = await hub_b.append_group([batch("t1", 11, 30), batch("t1", 31, 35)], 0.0)
        assert [c for _, c in res] == [10, 5]
        assert hub_b.stats.duplicates_skipped == 10
        # hub A's cached mark is stale (20): JetStream refuses its publish (expected last
        # subject sequence), A re-reads the mark and finds everything stored
        lookups = hub_a.stats.mark_lookups
        res = await hub_a.append_group([batch("t1", 1, 35)], 0.0)
        assert res == [(0, 0)]
        assert hub_a.stats.mark_lookups == lookups + 1
        assert await hub_a.load_marks("acme", "t1", 7) == {1: 35}

        reader = JetStreamConsumer(s, "check")
        await reader.open()
        got = await read_all(reader, 35)
        assert [e.seq for e in got] == list(range(1, 36))
        await reader.close()
        await hub_a.close()
        await hub_b.close()

    asyncio.run(run())


def test_nats_restart_mid_ingest_fails_typed_then_resumes_with_nothing_lost(
    nats_server: NatsServer,
) -> None:
    async def run() -> None:
        s = settings_for(nats_server)
        log = JetStreamLog(s)
        await log.open()
        acked: list[tuple[str, int, int]] = []  # what the hub would have ACKed to edges
        failures: list[JetStreamLogError] = []
        devices = [f"d{i}" for i in range(5)]
        next_seq = dict.fromkeys(devices, 1)
        stopped = asyncio.Event()

        async def ingest(rounds: int) -> None:
            for n in range(rounds):
                group = [batch(d, next_seq[d], next_seq[d] + 19) for d in devices]
                while True:  # the edges resend a group that was not ACKed
                    try:
                        await log.append_group(group, 0.0)
                        break
                    except JetStreamLogError as exc:
                        failures.append(exc)
                        await asyncio.sleep(0.1)
                for d in devices:
                    acked.append((d, next_seq[d], next_seq[d] + 19))
                    next_seq[d] += 20
                if n == 10:
                    stopped.set()
                await asyncio.sleep(0)

        task = asyncio.create_task(ingest(40))
        await stopped.wait()
        await asyncio.to_thread(nats_server.stop)  # mid-ingest
        for _ in range(200):
            if failures:
                break
            await asyncio.sleep(0.05)
        assert failures, "appends must fail while nats-server is down"
        acked_while_down = len(acked)
        await asyncio.sleep(0.5)
        assert len(acked) == acked_while_down  # no ACK while JetStream cannot confirm
        await asyncio.to_thread(nats_server.start)
        await asyncio.wait_for(task, timeout=60)
        assert len(acked) == 40 * len(devices)

        reader = JetStreamConsumer(s, "after-restart")
        await reader.open()
        got = await read_all(reader, 40 * 20 * len(devices))
        by = seqs_by_device(got)
        for d in devices:
            assert by[(d, 1)] == list(range(1, 801)), d  # every record once, in order
        await reader.close()
        await log.close()

    asyncio.run(run())


def test_a_consumer_that_died_with_unacked_batches_loses_nothing(nats_server: NatsServer) -> None:
    async def run() -> None:
        s = settings_for(nats_server)
        log = JetStreamLog(s)
        await log.open()
        await log.append_group([batch("t1", 1 + 10 * i, 10 * (i + 1)) for i in range(20)], 0.0)
        first = JetStreamConsumer(s, "sink", fetch_batches=8)
        await first.open()
        got = await first.read(0, 30)  # fetched 8 batches, used 3, committed 2
        assert [e.seq for e in got] == list(range(1, 31))
        await first.commit(got[19].offset)
        await first.close()  # dies holding 6 delivered, unacked batches

        second = JetStreamConsumer(s, "sink")
        await second.open()
        assert second.stats.resets == 1 and second.committed == got[19].offset | (OFFSET_STRIDE - 1)
        rest = await read_all(second, 180)
        assert [e.seq for e in rest] == list(range(21, 201))
        await second.close()
        await log.close()

    asyncio.run(run())


def test_json_archive_runs_unchanged_on_the_shared_log(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    s = settings_for(nats_server)

    async def append(groups: list[list[PendingBatch]]) -> None:
        log = JetStreamLog(s)
        await log.open()
        for g in groups:
            await log.append_group(g, 0.0)
        await log.close()

    asyncio.run(append([[batch("t1", 1, 100), batch("t2", 1, 50)], [batch("t1", 101, 150)]]))
    out = tmp_path / "archive"
    with JetStreamLogView(s, "archive") as view:
        archive = JsonArchive(view, out)  # type: ignore[arg-type]
        assert archive.poll(120) == 120
        archive.close()
        # the commit covered only part of the last batch: like a crash between the
        # write and the commit, that batch comes again whole and nothing is written twice
    with JetStreamLogView(s, "archive") as view:
        again = JsonArchive(view, out)  # type: ignore[arg-type]
        total = 0
        for _ in range(10):
            total += again.poll(1000)
        again.close()
    lines = [json.loads(x) for x in (out / "acme.jsonl").read_text().splitlines()]
    seqs = sorted((x["device"], x["seq"]) for x in lines)
    assert seqs == sorted([("t1", i) for i in range(1, 151)] + [("t2", i) for i in range(1, 51)])
    assert again.stats.skipped_present > 0  # the redelivered batch was recognised
    offsets = [x["offset"] for x in lines]
    assert offsets == sorted(offsets)


def test_presence_is_shared_and_a_late_offline_from_the_old_hub_is_dropped(
    nats_server: NatsServer,
) -> None:
    from hub.jspresence import JetStreamPresence
    from hub.presence import PresenceChange, State

    def change(old: State, new: State, at: float) -> PresenceChange:
        return PresenceChange("acme", "t1", old, new, at, {"seq": 5})

    async def run() -> None:
        s = settings_for(nats_server)
        a, b = JetStreamPresence(s, "hub-a"), JetStreamPresence(s, "hub-b")
        await a.open()
        await b.open()
        await a.publish([change(State.OFFLINE, State.ONLINE, 1.0)])
        await b.publish([change(State.OFFLINE, State.ONLINE, 2.0)])  # the device moved to b
        await a.publish([change(State.ONLINE, State.OFFLINE, 3.0)])  # a notices late
        view = await a.current()
        assert view[("acme", "t1")].state is State.ONLINE and view[("acme", "t1")].hub == "hub-b"
        assert a.stats.superseded == 1
        await b.publish([change(State.ONLINE, State.OFFLINE, 4.0)])  # b's own entry: written
        seen = (await b.current())[("acme", "t1")]
        assert (seen.state, seen.hub, seen.at, seen.heartbeat) == (
            State.OFFLINE,
            "hub-b",
            4.0,
            {"seq": 5},
        )
        await a.close()
        await b.close()

    asyncio.run(run())


# -- pure parts (no server) ---------------------------------------------------------------------


def test_settings_are_strict_config() -> None:
    from transport.configload import build
    from transport.errors import ConfigError

    s = build(
        JetStreamSettings,
        {"servers": ["nats://h:4222"], "replicas": 3},
        path="hub.yaml",
        key="jetstream",
    )
    assert s.replicas == 3 and s.stream == "SQUALL" and s.duplicate_window_s == 120.0
    for bad in (
        {"replicas": 0},
        {"stream": "a.b"},
        {"subject_prefix": "x.>"},
        {"servers": []},
        {"typo": 1},
    ):
        with pytest.raises(ConfigError):
            build(JetStreamSettings, bad, path="hub.yaml", key="jetstream")


def test_a_stored_batch_decodes_to_log_entries_and_trims_by_mark() -> None:
    from hub.jslog import decode_entries, encode_message, msg_id, trim_to_mark

    item = batch("t9", 10, 19, lane=2, inc=3)
    entries = decode_entries("squall.log.acme.t9.3.2", 5, encode_message(item))
    assert [e.offset for e in entries] == [5 * OFFSET_STRIDE + i for i in range(10)]
    assert {(e.tenant, e.device, e.incarnation, e.lane) for e in entries} == {("acme", "t9", 3, 2)}
    assert [e.seq for e in entries] == list(range(10, 20))
    assert msg_id(("acme", "t9", 3, 2), 10, 19) == "acme.t9.3.2.10-19"
    assert trim_to_mark(item, 19) is None and trim_to_mark(item, 9) is item
    rest = trim_to_mark(item, 14)
    assert rest is not None and (rest.first_seq, rest.last_seq, rest.count) == (15, 19, 5)
    with pytest.raises(JetStreamLogError):
        decode_entries("squall.log.acme.t9.3.2", 5, b"junk")


# -- the hub on the jetstream backend (in-process hub and agent) ---------------------------------


def hub_on_jetstream(tmp_path: Path, pki: Path, server: NatsServer, **overrides: object) -> Path:
    from tests.integration.conftest import write_hub_config

    js = {"servers": [server.url], "stream": "SQUALLTEST", "publish_timeout_s": 2.0}
    js.update(overrides.pop("jetstream", {}))  # type: ignore[call-overload]
    return write_hub_config(
        tmp_path,
        pki,
        log={"backend": "jetstream"},
        jetstream=js,
        name=overrides.pop("name", "hub-a"),
        **overrides,
    )


def test_a_hub_on_jetstream_acks_what_the_stream_holds_and_shares_presence(
    tmp_path: Path, pki: Path
) -> None:
    import aiohttp

    from edge.agent import Agent
    from edge.config import load_edge_config
    from hub.config import load_hub_config
    from hub.http import start_http
    from hub.jspresence import JetStreamPresence
    from hub.server import Hub
    from tests.integration.conftest import write_edge_config

    server = NatsServer(tmp_path, max_payload=2 << 20)
    server.start()
    cfg = load_hub_config(hub_on_jetstream(tmp_path, pki, server))

    async def main() -> None:
        hub = Hub(cfg)
        await hub.start()
        runner, http_port = await start_http(hub)
        agent = Agent(load_edge_config(write_edge_config(tmp_path, pki, "t1", [cfg.listen])))
        agent.start()
        for i in range(300):
            agent.publish_nowait("telemetry.gps", {"i": i}, {"unit": "si"})
        await agent.publish("fault", {"code": "P0A80"}, lane="critical")
        assert hub.jspresence is not None
        for _ in range(300):  # presence is shared at the hub's next tick (each second)
            if agent.stats.acked >= 301 and hub.jspresence.stats.written:
                break
            await asyncio.sleep(0.05)
        assert agent.stats.acked == 301
        auth = {"Authorization": "Bearer s3cret"}
        base = f"http://127.0.0.1:{http_port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/v1/presence/shared", headers=auth) as r:
                shared = (await r.json())["devices"]
            async with http.get(f"{base}/metrics", headers=auth) as r:
                metrics = await r.text()
            async with http.get(f"{base}/v1/subscribe", headers=auth) as r:
                assert r.status == 501 and "squall consume" in (await r.json())["error"]
        assert "squall_hub_jetstream_published_total" in metrics
        assert "squall_hub_presence_listings_total 1.0" in metrics
        assert "squall_hub_presence_list_failures_total 0.0" in metrics
        assert [(d["device"], d["presence"], d["hub"]) for d in shared] == [
            ("t1", "online", "hub-a")
        ]
        await agent.stop()
        # every hub sees it go: another hub's view of the bucket says where it was
        other = JetStreamPresence(cfg.jetstream, "hub-b")
        await other.open()
        seen = None
        for _ in range(200):
            # hub-a writes "offline" once it notices the session ended: poll until then
            seen = (await other.current()).get(("acme", "t1"))
            if seen is not None and seen.state.value == "offline":
                break
            await asyncio.sleep(0.05)
        await other.close()
        assert seen is not None
        assert (seen.state.value, seen.hub) == ("offline", "hub-a")
        await hub.stop()
        await runner.cleanup()

        reader = JetStreamConsumer(cfg.jetstream, "check")
        await reader.open()
        got = await read_all(reader, 303)
        await reader.close()
        data = [e for e in got if not e.subject.endswith(".presence")]
        assert sorted(e.seq for e in data) == list(range(1, 302))
        presence = [(e.body, e.attrs) for e in got if e.subject == "acme.t1.presence"]
        states = [b["state"] for b, _ in presence]  # type: ignore[index]
        assert states == ["online", "offline"]
        assert {a["hub"] for _, a in presence} == {"hub-a"}

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        server.stop()


def test_a_hub_refuses_frames_nats_cannot_take_and_an_absent_nats(
    tmp_path: Path, pki: Path
) -> None:
    from hub.config import load_hub_config
    from hub.server import Hub
    from transport.errors import ConfigError

    server = NatsServer(tmp_path)  # nats-server's default max_payload: 1 MiB
    server.start()

    async def start(cfg_path: Path) -> None:
        hub = Hub(load_hub_config(cfg_path))
        await hub.start()
        await hub.stop()

    small = {"max_frame_bytes": 1 << 19}
    try:
        with pytest.raises(ConfigError, match="max_payload") as exc:
            asyncio.run(start(hub_on_jetstream(tmp_path, pki, server)))
        assert exc.value.key == "limits.max_frame_bytes"
        # frames that fit: the hub starts
        asyncio.run(start(hub_on_jetstream(tmp_path, pki, server, limits=small)))
    finally:
        server.stop()
    with pytest.raises(JetStreamLogError, match="cannot reach NATS"):
        asyncio.run(start(hub_on_jetstream(tmp_path, pki, server, limits=small)))


# -- squall consume: the consumers as their own process --------------------------------------------


def spawn_consume(config: Path, out: Path) -> subprocess.Popen[bytes]:
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "transport.cli", "consume", "--config", str(config)],
        stdout=out.open("ab"),
        stderr=subprocess.STDOUT,
    )


def archive_lines(directory: Path) -> list[dict[str, object]]:
    return [
        json.loads(line)
        for path in sorted(directory.glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def wait_for(cond: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_squall_consume_archives_once_and_alerts_on_presence_from_every_hub(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    import yaml

    from hub.jspresence import JetStreamPresence
    from hub.presence import PresenceChange, State

    s = settings_for(nats_server)

    def change(device: str, old: State, new: State, at: float) -> PresenceChange:
        return PresenceChange("acme", device, old, new, at, {})

    async def write(groups: list[list[PendingBatch]], changes: list[tuple[str, PresenceChange]]):
        log = JetStreamLog(s)
        await log.open()
        for g in groups:
            await log.append_group(g, 0.0)
        for hub, ch in changes:  # each hub shares presence through its own connection
            shared = JetStreamPresence(s, hub)
            await shared.open()
            await shared.publish([ch], log)
            await shared.close()
        await log.close()

    now = time.time()
    asyncio.run(
        write(
            [[batch("t1", 1, 100), batch("t2", 1, 50)], [batch("t1", 101, 150)]],
            [
                ("hub-a", change("t1", State.OFFLINE, State.ONLINE, now - 9)),
                ("hub-a", change("t2", State.OFFLINE, State.ONLINE, now - 9)),
                ("hub-b", change("t1", State.OFFLINE, State.ONLINE, now - 8)),  # t1 moved to b
                ("hub-a", change("t1", State.ONLINE, State.OFFLINE, now - 7)),  # a's late word
                ("hub-a", change("t2", State.ONLINE, State.OFFLINE, now - 6)),  # t2 really left
            ],
        )
    )
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        yaml.safe_dump({"rules": [{"name": "device_offline", "kind": "absence", "for": 1}]})
    )
    config = tmp_path / "consume.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "jetstream": {"servers": [nats_server.url], "stream": "SQUALLTEST"},
                "archives": [{"name": "archive", "directory": "archive"}],
                "alerts": {"rules": "rules.yaml", "poll_s": 0.2, "commit_s": 0.2},
            }
        )
    )
    out = tmp_path / "consume.out"
    archive = tmp_path / "archive"

    def data() -> list[tuple[object, object]]:
        return [
            (x["device"], x["seq"])
            for x in archive_lines(archive)
            if str(x["subject"]).endswith(".gps")
        ]

    def alerts() -> list[dict[str, object]]:
        return [x for x in archive_lines(archive) if x["device"] == "_alerts"]

    proc = spawn_consume(config, out)
    try:
        wait_for(lambda: len(data()) >= 200 and alerts(), 40, "archive and alert")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, out.read_text()
        assert "stopped cleanly" in out.read_text()
        # more data while it is down; the next run goes on where this one committed
        asyncio.run(write([[batch("t1", 151, 200), batch("t2", 51, 60)]], []))
        proc = spawn_consume(config, out)
        wait_for(lambda: len(data()) >= 260, 40, "the rest archived")
        time.sleep(1.0)  # nothing more comes
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    got = data()
    assert sorted(got) == sorted(
        [("t1", i) for i in range(1, 201)] + [("t2", i) for i in range(1, 61)]
    )
    presence = [
        (x["device"], x["body"]["state"], x["attrs"]["hub"])  # type: ignore[index]
        for x in archive_lines(archive)
        if str(x["subject"]).endswith(".presence")
    ]
    # hub-a's late "offline" for t1 (then on hub-b) never reached the log
    assert presence == [
        ("t1", "online", "hub-a"),
        ("t2", "online", "hub-a"),
        ("t1", "online", "hub-b"),
        ("t2", "offline", "hub-a"),
    ]
    fired = [a for a in alerts() if a["attrs"]["status"] == "firing"]  # type: ignore[index]
    assert [a["body"]["labels"]["device"] for a in fired] == ["t2"]  # type: ignore[index]

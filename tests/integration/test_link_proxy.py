"""The link proxy (``squall link``) over real UDP on loopback, plus its sans-I/O core."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from simulator.linkcli import cli_link
from simulator.linkmodel import Direction, LinkParams, LossParams
from simulator.pcap import PcapMark
from simulator.profiles import load_profiles
from simulator.proxy import LinkProxy, LinkProxyCore, ProxyLimits, start_proxy

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LOSS20 = LinkParams(loss=LossParams.bernoulli(20))
PROFILES = {
    **load_profiles(),
    "loss20": LOSS20,
    "loss30-mtu300": LinkParams(loss=LossParams.bernoulli(30), mtu=300),
    "slow": LinkParams(delay_ms=200),
}


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


async def wait_for(
    cond: Callable[[], bool], timeout: float = 5.0, why: Callable[[], object] = lambda: ""
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in time {why()}")
        await asyncio.sleep(0.01)


class Echo(asyncio.DatagramProtocol):
    """The upstream: echoes every datagram to where it came from and remembers the sources."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.sources: list[tuple[str, int]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)
        self.sources.append(addr)
        assert self.transport is not None
        self.transport.sendto(data, addr)


class Client(asyncio.DatagramProtocol):
    """A device: sends to the proxy, collects what comes back."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)

    async def send_paced(self, payloads: list[bytes], burst: int = 20) -> None:
        """Send in small bursts so that no socket buffer on loopback overflows."""
        assert self.transport is not None
        for i, data in enumerate(payloads):
            self.transport.sendto(data)
            if i % burst == burst - 1:
                await asyncio.sleep(0.002)


async def echo_server() -> tuple[Echo, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    transport, echo = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    return echo, transport.get_extra_info("sockname")


async def client_for(proxy: LinkProxy) -> Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_datagram_endpoint(
        Client, remote_addr=proxy.listen_addr[:2], local_addr=("127.0.0.1", 0)
    )
    return client


async def setup(profile: str, **kwargs: Any) -> tuple[LinkProxy, Echo, Client]:
    echo, addr = await echo_server()
    proxy = await start_proxy(
        addr, listen=("127.0.0.1", 0), profile=profile, profiles=PROFILES, seed=7, **kwargs
    )
    return proxy, echo, await client_for(proxy)


async def settled(proxy: LinkProxy, echo: Echo, client: Client, offered: int) -> None:
    """Wait until all ``offered`` packets went through the proxy and their echoes came back."""

    def done() -> bool:
        stats = proxy.stats()
        up, down = stats.up, stats.down
        return (
            up.packets["passed"] + up.dropped == offered
            and down.packets["passed"] + down.dropped == len(echo.received)
            and stats.pending == 0
            and up.delay_count == len(echo.received)
            and down.delay_count == len(client.received)
        )

    await wait_for(done, why=lambda: (proxy.stats(), len(echo.received), len(client.received)))


def payloads(n: int, size: int = 100) -> list[bytes]:
    return [i.to_bytes(4, "big") + bytes(size - 4) for i in range(n)]


async def http(method: str, url: str, body: Any = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.request(method, url, json=body) as r:
        return r.status, await r.text()


def control_url(proxy: LinkProxy, path: str) -> str:
    assert proxy.control_addr is not None
    host, port = proxy.control_addr[:2]
    return f"http://{host}:{port}{path}"


# -- forwarding --------------------------------------------------------------------------


def test_lan_passes_everything_both_ways() -> None:
    async def main() -> None:
        proxy, echo, client = await setup("lan")
        sent = [i.to_bytes(4, "big") + bytes(i % 1400) for i in range(500)]
        await client.send_paced(sent)
        await settled(proxy, echo, client, 500)
        assert echo.received == sent  # every byte, in order
        assert client.received == sent
        stats = proxy.stats()
        for tally in (stats.up, stats.down):
            assert tally.packets["passed"] == 500
            assert tally.dropped == 0
            assert tally.bytes_out == sum(map(len, sent))
            assert tally.delay_count == 500
        assert stats.clients == 1
        assert stats.pending == 0
        await proxy.close()

    run(main())


def test_bursts_of_equal_sized_datagrams_arrive_as_sent() -> None:
    """Bursts go out batched (sendmmsg, runs as one GSO send on Linux): same datagrams, order."""

    async def main() -> None:
        proxy, echo, client = await setup("lan")
        for peer in (echo, client):  # they read one datagram per loop pass: room for bursts
            assert peer.transport is not None
            peer_sock = peer.transport.get_extra_info("socket")
            peer_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2 << 20)
        sent = [i.to_bytes(4, "big") + bytes(1196) for i in range(600)]
        sent[99] = sent[99][:300]  # a shorter one ends a run
        sent += [i.to_bytes(4, "big") for i in range(600, 700)]
        await client.send_paced(sent, burst=50)
        await settled(proxy, echo, client, len(sent))
        assert echo.received == sent
        assert client.received == sent
        assert len(set(echo.sources)) == 1
        stats = proxy.stats()
        assert stats.send_errors == {"up": 0, "down": 0}
        on_linux = sys.platform.startswith("linux")
        assert proxy.io_path == ("recvmmsg/sendmmsg+gso" if on_linux else "recvfrom/sendto")
        await proxy.close()

    run(main())


def test_bernoulli_loss_drops_its_share_and_counters_say_so() -> None:
    async def main() -> None:
        proxy, echo, client = await setup("loss20")
        await client.send_paced(payloads(2000))
        await settled(proxy, echo, client, 2000)
        stats = proxy.stats()
        up, down = stats.up, stats.down
        assert up.packets["passed"] + up.packets["dropped_loss"] == 2000
        assert up.packets["passed"] == len(echo.received)
        assert 0.15 <= up.packets["dropped_loss"] / 2000 <= 0.25
        assert down.packets["passed"] + down.packets["dropped_loss"] == len(echo.received)
        assert down.packets["passed"] == len(client.received)
        assert 0.15 <= down.packets["dropped_loss"] / len(echo.received) <= 0.25
        assert up.dropped == up.packets["dropped_loss"]
        await proxy.close()

    run(main())


def test_client_limit_drops_new_clients_and_counts_them() -> None:
    async def main() -> None:
        proxy, echo, first = await setup("lan", limits=ProxyLimits(max_clients=1))
        second = await client_for(proxy)
        await first.send_paced(payloads(5))
        await wait_for(lambda: len(first.received) == 5)
        await second.send_paced(payloads(3))
        await wait_for(lambda: proxy.stats().up.packets["dropped_clients"] == 3)
        assert len(echo.received) == 5 and second.received == []
        await proxy.close()

    run(main())


def test_idle_clients_are_forgotten() -> None:
    async def main() -> None:
        proxy, _, client = await setup("lan", limits=ProxyLimits(client_idle_s=0.2))
        await client.send_paced(payloads(3))
        await wait_for(lambda: len(client.received) == 3)
        assert proxy.stats().clients == 1
        await wait_for(lambda: proxy.stats().clients == 0)
        assert proxy.stats().clients_expired == 1
        await client.send_paced(payloads(1))  # comes back as a new client
        await wait_for(lambda: len(client.received) == 4)
        await proxy.close()

    run(main())


# -- the control API ---------------------------------------------------------------------


def test_outage_from_control_api_drops_everything_during_it() -> None:
    async def main() -> None:
        proxy, echo, client = await setup("lan", control_port=0)
        await client.send_paced(payloads(10))
        await wait_for(lambda: len(client.received) == 10)
        status, text = await http("POST", control_url(proxy, "/outage"), {"seconds": 1.0})
        assert status == 200
        until = json.loads(text)["until_s"]
        await client.send_paced(payloads(50))
        # every one of the 50 is dropped (one offered after the outage would pass instead)
        await wait_for(lambda: proxy.stats().up.packets["dropped_outage"] == 50)
        assert len(echo.received) == 10 and proxy.stats().up.packets["passed"] == 10
        await wait_for(lambda: proxy.now() > until)
        await client.send_paced(payloads(10))
        await wait_for(lambda: len(client.received) == 20)
        status, text = await http("POST", control_url(proxy, "/outage"), {"seconds": "soon"})
        assert status == 400 and "seconds" in json.loads(text)["error"]
        await proxy.close()

    run(main())


def test_rebind_gives_a_new_source_port_and_traffic_still_flows() -> None:
    async def main() -> None:
        proxy, echo, client = await setup("lan", control_port=0)
        await client.send_paced([b"before"])
        await wait_for(lambda: client.received == [b"before"])
        status, text = await http("POST", control_url(proxy, "/rebind"))
        assert status == 200 and json.loads(text) == {"rebound_clients": 1}
        await client.send_paced([b"after"])
        await wait_for(lambda: client.received == [b"before", b"after"])
        (host1, port1), (host2, port2) = echo.sources
        assert host1 == host2 and port1 != port2
        assert proxy.stats().rebinds == 1
        await client.send_paced([b"again"])  # the new binding stays
        await wait_for(lambda: len(client.received) == 3)
        assert echo.sources[2] == echo.sources[1]
        await proxy.close()

    run(main())


def test_profile_switch_status_and_metrics() -> None:
    async def main() -> None:
        proxy, echo, client = await setup("lan", control_port=0)
        await client.send_paced(payloads(100))
        await wait_for(lambda: len(client.received) == 100)
        status, text = await http("POST", control_url(proxy, "/profile"), {"profile": "loss20"})
        assert status == 200
        await client.send_paced(payloads(400))
        await settled(proxy, echo, client, 500)
        assert proxy.stats().up.packets["dropped_loss"] > 0
        status, text = await http("POST", control_url(proxy, "/profile"), {"profile": "nope"})
        assert status == 400 and "unknown link profile 'nope'" in json.loads(text)["error"]

        status, text = await http("GET", control_url(proxy, "/status"))
        body = json.loads(text)
        assert status == 200 and body["profile"] == "loss20" and body["clients"] == 1
        up = body["up"]["packets"]
        assert up["passed"] + up["dropped_loss"] == 500
        assert body["devices"][0]["upstream_port"] == echo.sources[0][1]

        status, text = await http("GET", control_url(proxy, "/metrics"))
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        stats = proxy.stats()
        packets = {
            (s.labels["direction"], s.labels["result"]): s.value
            for s in families["squall_link_packets"].samples
        }
        assert packets[("up", "passed")] == stats.up.packets["passed"]
        assert packets[("up", "dropped_loss")] == stats.up.packets["dropped_loss"]
        assert packets[("down", "passed")] == stats.down.packets["passed"]
        sent = {s.labels["direction"]: s.value for s in families["squall_link_bytes"].samples}
        assert sent["up"] == stats.up.bytes_out
        delay = families["squall_link_delay_seconds"]
        assert delay.type == "histogram"
        count = [s for s in delay.samples if s.name.endswith("_count")]
        assert {s.labels["direction"]: s.value for s in count}["up"] == stats.up.delay_count
        assert families["squall_link_clients"].samples[0].value == 1
        recv, send = proxy.io_path.split("/")
        io = families["squall_link_io_info"].samples[0]
        assert (io.labels, io.value) == ({"recv": recv, "send": send}, 1)
        assert body["io"] == proxy.io_path
        await proxy.close()

    run(main())


# -- capture and decision log ------------------------------------------------------------


def test_pcap_parses_with_scapy_and_marks_dropped_packets(tmp_path: Path) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.utils import rdpcap

    pcap = tmp_path / "link.pcap"

    async def main() -> None:
        proxy, echo, client = await setup("loss30-mtu300", pcap=pcap)
        sent = payloads(300) + payloads(20, size=400)  # the 400-byte ones exceed the mtu
        await client.send_paced(sent)
        await settled(proxy, echo, client, len(sent))
        stats = proxy.stats()
        await proxy.close()
        records = rdpcap(str(pcap))
        assert len(records) == stats.pcap_records
        marks = [p[IP].tos >> 2 for p in records]
        dropped = [p for p, m in zip(records, marks, strict=True) if PcapMark(m).dropped]
        assert len(dropped) == stats.up.dropped + stats.down.dropped
        assert marks.count(PcapMark.DROPPED_MTU) == 20
        assert marks.count(PcapMark.DROPPED_LOSS) == (
            stats.up.packets["dropped_loss"] + stats.down.packets["dropped_loss"]
        )
        delivered = [p for p, m in zip(records, marks, strict=True) if m == PcapMark.DELIVERED]
        assert len(delivered) == stats.up.delay_count + stats.down.delay_count
        up_port = proxy.upstream_addr[1]
        ups = [bytes(p[UDP].payload) for p in delivered if p[UDP].dport == up_port]
        assert ups == echo.received  # the payloads, intact, in the order they were sent on

    run(main())


def test_decision_log_explains_every_packet(tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"

    async def main() -> None:
        proxy, echo, client = await setup("loss20", decision_log=log)
        await client.send_paced(payloads(200))
        await settled(proxy, echo, client, 200)
        stats = proxy.stats()
        await proxy.close()
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        assert lines[0]["event"] == "start" and lines[0]["seed"] == 7
        packets = [x for x in lines if x["event"] == "packet"]
        up = [x for x in packets if x["dir"] == "up"]
        assert len(up) == 200 and len(packets) == 200 + len(echo.received)
        assert sum(x["fate"] == "dropped_loss" for x in up) == stats.up.packets["dropped_loss"]
        assert {x["seed"] for x in packets} == {7}
        assert lines[-1]["event"] == "stop"

    run(main())


def test_capture_files_are_bounded_and_count_what_they_leave_out(tmp_path: Path) -> None:
    from scapy.utils import rdpcap

    pcap, log = tmp_path / "small.pcap", tmp_path / "small.jsonl"

    async def main() -> None:
        proxy, echo, client = await setup(
            "lan", pcap=pcap, pcap_max_bytes=2000, decision_log=log, decision_log_max_bytes=3000
        )
        await client.send_paced(payloads(100))
        await settled(proxy, echo, client, 100)
        stats = proxy.stats()
        await proxy.close()
        assert pcap.stat().st_size <= 2000 and log.stat().st_size <= 3000
        assert stats.pcap_records + stats.pcap_skipped == 200  # both directions
        assert stats.pcap_skipped > 0 and stats.decision_log_skipped > 0
        assert len(rdpcap(str(pcap))) == stats.pcap_records
        assert len(log.read_text().splitlines()) == stats.decision_log_lines

    run(main())


# -- the command line ---------------------------------------------------------------------


def test_cli_unknown_profile_exits_2_with_one_clear_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli_link(["--profile", "3g-awful", "--upstream", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown link profile '3g-awful'" in err[0] and "3g-poor" in err[0]
    assert cli_link(["--listen", "nowhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--listen" in err[0]
    assert cli_link(["--help"]) == 0


def test_cli_runs_until_sigterm_and_prints_a_summary() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator.linkcli", "--listen", "127.0.0.1:0", "--seed", "3"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert "profile lan, seed 3" in banner
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.startswith("squall link: stopped:") and out.count("\n") == 1


# -- the sans-I/O core (no sockets, manual clock) -------------------------------------------

A, B = ("10.0.0.1", 1000), ("10.0.0.2", 2000)


def test_core_delivers_in_due_order_with_reordering() -> None:
    params = LinkParams(delay_ms=10, jitter_ms=5, allow_reorder=True)
    core = LinkProxyCore(params, seed=1)
    for i in range(200):
        core.from_client(A, i.to_bytes(2, "big"), i * 0.001)
    out = []
    now = 0.0
    while (at := core.get_timer()) is not None and at < 10:
        now = at
        out += core.pop_due(now)
    assert len(out) == 200 and sorted(d[2] for d in out) == [
        i.to_bytes(2, "big") for i in range(200)
    ]
    assert [d[2] for d in out] != sorted(d[2] for d in out)  # jitter did reorder some


def test_core_bounds_clients_pending_and_expires_idle_ones() -> None:
    core = LinkProxyCore(
        LinkParams(delay_ms=100),
        limits=ProxyLimits(max_clients=1, client_idle_s=5, max_pending=3),
    )
    assert [core.from_client(A, b"x", 0.0) for _ in range(4)] == ["passed"] * 3 + [
        "dropped_overflow"
    ]
    assert core.from_client(B, b"x", 0.0) == "dropped_clients"
    assert core.get_timer() == pytest.approx(0.1)
    assert len(core.pop_due(0.1)) == 3
    assert core.expire_idle(5.0) == []  # busy until its last delivery at 0.1 s
    assert core.expire_idle(5.2) == [A]
    assert core.from_client(B, b"x", 5.2) == "passed"


def test_core_rebind_moves_the_port_epoch_of_every_client() -> None:
    core = LinkProxyCore(LinkParams())
    core.from_client(A, b"x", 0.0)
    core.from_upstream(A, b"y", 0.0)
    before = core.pop_due(0.0)
    assert [(d[0], d[3]) for d in before] == [(Direction.UP, 0), (Direction.DOWN, 0)]
    assert core.rebind(1.0) == 1
    core.from_client(A, b"x", 1.0)
    assert core.pop_due(1.0)[0][3] == 1


def test_core_names_devices_from_the_mapping_else_host_port() -> None:
    core = LinkProxyCore(LinkParams(), devices={"10.0.0.1": "truck-1", "10.0.0.2:2000": "truck-2"})
    assert core.device_for(A) == "truck-1"
    assert core.device_for(B) == "truck-2"
    assert core.device_for(("10.0.0.2", 2001)) == "10.0.0.2:2001"
    assert core.device_for(("::1", 5, 0, 0)) == "[::1]:5"


def test_core_batch_gives_the_fates_of_one_at_a_time_and_names_what_did_not_pass() -> None:
    params = LinkParams(delay_ms=20, jitter_ms=5, loss=LossParams.bernoulli(30), mtu=150)
    limits = ProxyLimits(max_clients=2)
    one, batch = (LinkProxyCore(params, seed=3, limits=limits) for _ in range(2))
    C = ("10.0.0.3", 3000)
    addrs = [A, A, B, A, C, B, B, C, A] * 20
    datas = [bytes(100 + 10 * (i % 7)) for i in range(len(addrs))]  # 160 bytes > mtu
    expected = [one.from_client(addr, data, 1.0) for addr, data in zip(addrs, datas, strict=True)]
    refused = batch.offer_up(datas, addrs, 1.0)
    assert refused == [(i, r) for i, r in enumerate(expected) if r != "passed"]
    assert {r for _, r in refused} == {"dropped_loss", "dropped_mtu", "dropped_clients"}
    assert one.stats(1.0) == batch.stats(1.0)
    assert one.pop_due(2.0) == batch.pop_due(2.0)
    assert batch.offer_down(C, [b"x"], 2.0) == [(0, "dropped_clients")]  # never admitted
    down = batch.offer_down(A, [b"a", b"b", bytes(200)], 2.0)
    assert down[-1] == (2, "dropped_mtu")


def test_core_runs_group_one_clients_deliveries_with_their_epoch() -> None:
    core = LinkProxyCore(LinkParams(delay_ms=10, duplicate_pct=100))
    core.offer_up([b"1", b"2", b"3"], [A, A, B], 0.0)
    core.offer_down(A, [b"d"], 0.0)
    core.rebind(0.005)
    runs = core.pop_due_runs(0.01)
    assert runs == [
        (Direction.UP, A, 1, [b"1", b"1", b"2", b"2"], []),
        (Direction.UP, B, 1, [b"3", b"3"], []),
        (Direction.DOWN, A, 0, [b"d", b"d"], []),
    ]
    assert core.stats(0.01).pending == 0

"""The peer benchmark's harness: byte-counting relays and how receipts add up."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import cast

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))  # appended: bench/transport.py must not shadow the package

from _peers_relay import (  # noqa: E402
    ByteCounts,
    _TcpSide,
    join,
    start_tcp_relay,
    start_udp_relay,
)
from _peers_results import (  # noqa: E402
    HarnessError,
    Run,
    SeqTracker,
    Tally,
    quantile,
    system_summary,
    tally,
    targets,
)

# --- relays ---------------------------------------------------------------------------


async def _echo_tcp_server(reply_factor: int) -> tuple[asyncio.AbstractServer, int]:
    """Answers every chunk with ``reply_factor`` times its bytes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data * reply_factor)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def _read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), 10)


def test_tcp_relay_forwards_and_counts_both_directions() -> None:
    async def scenario() -> ByteCounts:
        server, port = await _echo_tcp_server(reply_factor=3)
        relay = await start_tcp_relay(("127.0.0.1", port))
        try:
            r1, w1 = await asyncio.open_connection("127.0.0.1", relay.port)
            r2, w2 = await asyncio.open_connection("127.0.0.1", relay.port)
            w1.write(b"a" * 1000)
            w2.write(b"bc" * 50)
            assert await _read_exactly(r1, 3000) == b"a" * 3000
            assert await _read_exactly(r2, 300) == b"bc" * 150
            for w in (w1, w2):
                w.close()
            return relay.counts.snapshot()
        finally:
            await relay.close()
            server.close()

    counts = asyncio.run(scenario())
    assert counts.up_bytes == 1100
    assert counts.down_bytes == 3300
    assert counts.total() == 4400
    assert counts.connections == 2


def test_tcp_relay_passes_a_half_close_on() -> None:
    """A client that shuts down its sending side still gets the server's last answer."""

    async def scenario() -> bytes:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read()  # until EOF: only a forwarded half-close ends this
            writer.write(b"got %d" % len(data))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        relay = await start_tcp_relay(("127.0.0.1", int(server.sockets[0].getsockname()[1])))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(b"x" * 4096)
            writer.write_eof()
            return await asyncio.wait_for(reader.read(), 10)
        finally:
            await relay.close()
            server.close()

    assert asyncio.run(scenario()) == b"got 4096"


class _FakeTransport:
    """Records what a relay side writes to it."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.eof = False
        self.closed = False

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True


def test_what_either_side_read_before_the_pair_was_joined_is_passed_on() -> None:
    """A server that speaks first (NATS's INFO) may be heard before the relay joins the pair."""
    counts = ByteCounts()
    device, server = _TcpSide(counts, upward=True), _TcpSide(counts, upward=False)
    to_device, to_server = _FakeTransport(), _FakeTransport()
    device.connection_made(to_device)  # type: ignore[arg-type]
    server.connection_made(to_server)  # type: ignore[arg-type]
    server.data_received(b"INFO {}\r\n")
    device.data_received(b"hello")
    device.eof_received()
    join(device, server)
    assert to_device.written == [b"INFO {}\r\n"]
    assert to_server.written == [b"hello"] and to_server.eof
    server.data_received(b"+OK")
    assert to_device.written[-1] == b"+OK"
    assert (counts.up_bytes, counts.down_bytes) == (5, 12)
    server.connection_lost(None)
    assert to_device.closed


def test_tcp_relay_with_a_server_that_speaks_first() -> None:
    async def scenario() -> list[bytes]:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"INFO ready\n")
            line = await reader.readline()
            writer.write(b"echo " + line)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(greet, "127.0.0.1", 0)
        relay = await start_tcp_relay(("127.0.0.1", int(server.sockets[0].getsockname()[1])))

        async def client(i: int) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            first = await asyncio.wait_for(reader.readline(), 10)
            writer.write(b"%d\n" % i)
            second = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            return first + second

        try:
            return list(await asyncio.gather(*(client(i) for i in range(40))))
        finally:
            await relay.close()
            server.close()

    assert asyncio.run(scenario()) == [b"INFO ready\necho %d\n" % i for i in range(40)]


class _UdpEcho(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.peers: set[tuple[str, int]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # not a subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.peers.add(addr)
        assert self.transport is not None
        self.transport.sendto(data + b"!", addr)


class _UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.got.put_nowait(data)


def test_udp_relay_keeps_devices_apart_and_counts_datagrams() -> None:
    async def scenario() -> tuple[ByteCounts, int, list[bytes], list[bytes]]:
        loop = asyncio.get_running_loop()
        echo = _UdpEcho()
        server, _ = await loop.create_datagram_endpoint(lambda: echo, local_addr=("127.0.0.1", 0))
        relay = await start_udp_relay(("127.0.0.1", server.get_extra_info("sockname")[1]))
        clients = []
        try:
            for _ in range(2):
                proto = _UdpClient()
                t, _ = await loop.create_datagram_endpoint(
                    lambda p=proto: p, remote_addr=("127.0.0.1", relay.port)
                )
                clients.append((t, proto))
            got: list[list[bytes]] = [[], []]
            for i, (t, proto) in enumerate(clients):
                for k in range(3):
                    t.sendto(b"%d-%d" % (i, k) * 10)
                    got[i].append(await asyncio.wait_for(proto.got.get(), 10))
            return relay.counts.snapshot(), len(echo.peers), got[0], got[1]
        finally:
            for t, _ in clients:
                t.close()
            await relay.close()
            server.close()

    counts, server_peers, first, second = asyncio.run(scenario())
    assert first == [b"0-%d" % k * 10 + b"!" for k in range(3)]
    assert second == [b"1-%d" % k * 10 + b"!" for k in range(3)]
    assert server_peers == 2  # one upstream socket per device address
    assert counts.connections == 2
    assert counts.up_chunks == counts.down_chunks == 6
    assert counts.up_bytes == 6 * 30
    assert counts.down_bytes == 6 * 31


def test_byte_counts_difference() -> None:
    before = ByteCounts(10, 20, 1, 2, 1)
    after = ByteCounts(15, 50, 3, 5, 2)
    assert after.minus(before) == ByteCounts(5, 30, 2, 3, 1)


# --- receipts and tallies ----------------------------------------------------------------


def test_tracker_counts_duplicates_and_latency() -> None:
    t = SeqTracker()
    assert t.add("d1", 1, 1_000_000, 1.010)
    assert t.add("d1", 2, 1_000_000, 1.020)
    assert not t.add("d1", 1, 1_000_000, 1.030)  # a redelivery
    assert t.add("d2", 5000, 1_000_000, 1.040)  # grows its bitmap
    assert (t.received, t.unique, t.duplicates) == (4, 3, 1)
    assert t.first_recv == 1.010 and t.last_recv == 1.040
    rep = t.report()
    assert rep["latency_ms"]["p50"] == pytest.approx(20.0)
    assert rep["latency_ms"]["max"] == pytest.approx(40.0)
    with pytest.raises(HarnessError):
        t.add("d1", 0, 0, 1.0)


def test_tally_finds_lost_duplicates_and_unacked() -> None:
    t = SeqTracker()
    for seq in (1, 2, 3, 5, 5, 6):
        t.add("a", seq, 0, 1.0)
    for seq in (10, 11, 12):
        t.add("b", seq, 0, 1.0)
    rep = t.report()
    result = tally(
        {"a": (1, 7), "b": (10, 12), "c": (1, 2)},
        rep["seen"],
        rep["received"],
        rep["duplicates"],
        unacked={"a": [6, 7]},  # published, never acknowledged: neither lost nor expected
    )
    # a: 1..5 expected, 4 missing; b: complete; c: nothing arrived
    assert result == Tally(
        expected=5 + 3 + 2, received=9, unique=8, duplicates=1, lost=1 + 2, unexpected=1
    )


def test_quantile_is_nearest_rank() -> None:
    values = sorted(float(x) for x in range(1, 101))
    assert quantile(values, 0.5) == 50.0
    assert quantile(values, 0.99) == 99.0
    assert quantile(values, 1.0) == 100.0
    assert quantile([], 0.5) is None


def _run(system: str, devices: int, mode: str, unique: int, cpu: float, span: float) -> Run:
    t = Tally(unique, unique + 2, unique, 2, 1, 0)
    return Run(
        system=system,
        devices=devices,
        mode=mode,
        target_rate=2000.0 if mode == "rate" else 0.0,
        publish_s=span,
        published=unique + 1,
        acked=unique + 1,
        unacked=0,
        first_publish=100.0,
        tally=t,
        last_recv=100.0 + span,
        server_cpu_s=cpu,
        server_rss_max_kb=2048,
        wire_up_bytes=30 * (unique + 1),
        wire_down_bytes=10 * (unique + 1),
        wire_up_chunks=1,
        wire_down_chunks=1,
        latency_p50_ms=5.0,
        latency_p99_ms=50.0,
        subscriber_cpu_s=1.0,
        publisher_cpu_s=1.0,
        publish_rate=float(unique) / span,
    )


def test_summary_has_the_contract_keys() -> None:
    runs = [
        _run("squall", 100, "saturated", 200_000, 1.0, 4.0),
        _run("squall", 100, "rate", 20_000, 0.3, 10.0),
        _run("squall", 1, "saturated", 50_000, 0.5, 10.0),
        _run("mqtt", 100, "saturated", 40_000, 1.2, 4.0),
    ]
    s = system_summary(runs, "squall")
    assert s["records_per_s_p100"] == 50_000
    assert s["server_cpu_s_per_100k"] == 0.5
    assert s["server_cpu_s_per_100k_2k"] == 1.5
    assert s["latency_p99_ms_2k"] == 50.0
    assert s["wire_bytes_per_record"] == 40.0
    assert s["lost"] == 3 and s["duplicates"] == 6  # summed over the three runs
    assert s["records_per_s_p1"] == 5000
    m = system_summary(runs, "mqtt")
    assert m["server_cpu_s_per_100k_2k"] is None  # not measured: missing, not zero
    verdicts = {what: ok for what, _, ok in targets({"squall": s, "mqtt": m})}
    assert verdicts["records/s P=100: Squall / Mosquitto QoS 1 >= 3"] is True
    assert verdicts["records/s P=100: Squall / JetStream >= 2"] is False  # no JetStream figure
    assert verdicts["wire bytes/record: Squall / MQTT <= 0.25"] is False  # 40 vs 40

"""Batched datagram I/O (simulator.mmsg) over real loopback sockets, batched and fallback paths."""

from __future__ import annotations

import select
import socket
import sys
from collections.abc import Iterator

import pytest

from simulator.mmsg import (
    GSO_MAX_SEGMENTS,
    DatagramReader,
    DatagramWriter,
    batched_io_available,
    decode_sockaddr,
    encode_sockaddr,
)

FAMILIES = {"ipv4": (socket.AF_INET, "127.0.0.1"), "ipv6": (socket.AF_INET6, "::1")}


def udp(family: socket.AddressFamily, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[socket.AddressFamily, str]:
    return FAMILIES[request.param]


@pytest.fixture(params=[True, False], ids=["batched", "fallback"])
def batched(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def socks(family: tuple[socket.AddressFamily, str]) -> Iterator[list[socket.socket]]:
    """Four bound sockets of one family: a receiver and three senders."""
    made = [udp(*family) for _ in range(4)]
    yield made
    for sock in made:
        sock.close()


def read_all(reader: DatagramReader, sock: socket.socket, n: int) -> tuple[list[bytes], list]:
    """Everything ``n`` datagrams, waiting (at most 2 s per batch) for them to arrive."""
    datas: list[bytes] = []
    addrs: list = []
    while len(datas) < n:
        got, sources = reader.recv_from(sock)
        if not got:
            assert select.select([sock], [], [], 2.0)[0], f"only {len(datas)} of {n} arrived"
            continue
        assert len(got) <= reader.batch
        datas += got
        addrs += sources
    return datas, addrs


def test_the_batched_calls_are_used_on_linux() -> None:
    on_linux = sys.platform.startswith("linux")
    assert batched_io_available() is on_linux
    assert DatagramReader().path == ("recvmmsg" if on_linux else "recvfrom")
    assert DatagramWriter().path == ("sendmmsg+gso" if on_linux else "sendto")
    assert DatagramWriter(gso=False).path == ("sendmmsg" if on_linux else "sendto")
    assert DatagramReader(batched=False).path == "recvfrom"
    assert DatagramWriter(batched=False).path == "sendto"


def test_empty_socket_gives_nothing_not_an_error(socks: list[socket.socket], batched: bool) -> None:
    reader = DatagramReader(8, batched=batched)
    assert reader.recv_from(socks[0]) == ([], [])
    assert reader.recv(socks[0]) == []


def test_sizes_sources_and_truncation_at_the_buffer_size(
    socks: list[socket.socket], batched: bool
) -> None:
    rx, senders = socks[0], socks[1:]
    sizes = [0, 1, 99, 100, 101, 500, 1200, 9000]
    sent = []
    for i, size in enumerate(sizes * 3):  # 24 datagrams from three sources, interleaved
        src = senders[i % 3]
        data = bytes([i]) * size
        src.sendto(data, rx.getsockname())
        sent.append((data, src.getsockname()))
    reader = DatagramReader(batch=5, size=100, batched=batched)  # several calls needed
    datas, addrs = read_all(reader, rx, len(sent))
    assert datas == [data[:100] for data, _ in sent]
    assert addrs == [src for _, src in sent]  # exactly as the socket module gives them
    assert reader.truncated == 3 * 4  # 101, 500, 1200 and 9000 bytes, three times
    assert reader.recv_from(rx) == ([], [])


def test_one_reader_serves_sockets_of_both_families(batched: bool) -> None:
    reader = DatagramReader(4, batched=batched)
    for _ in range(2):  # a shorter IPv4 address read first must not cut the IPv6 one after
        for family, host in (FAMILIES["ipv4"], FAMILIES["ipv6"]):
            with udp(family, host) as rx, udp(family, host) as tx:
                tx.sendto(b"x" * 10, rx.getsockname())
                tx.sendto(b"y", rx.getsockname())
                assert read_all(reader, rx, 2) == ([b"x" * 10, b"y"], [tx.getsockname()] * 2)


def test_writer_sends_to_several_addresses_with_the_sources_seen(
    socks: list[socket.socket], batched: bool
) -> None:
    tx, receivers = socks[0], socks[1:]
    payloads = [f"datagram {i}".encode() * (1 + i % 4) for i in range(30)]
    dests = [receivers[i % 3].getsockname() for i in range(30)]
    writer = DatagramWriter(batch=4, batched=batched)
    assert writer.send_to(tx, payloads, dests) == []
    reader = DatagramReader(batched=batched)
    for r, rx in enumerate(receivers):
        datas, addrs = read_all(reader, rx, 10)
        assert datas == payloads[r::3]
        assert set(addrs) == {tx.getsockname()}


def test_gso_runs_arrive_as_the_separate_datagrams_in_order(
    socks: list[socket.socket], batched: bool
) -> None:
    rx, tx = socks[0], socks[1]
    tx.connect(rx.getsockname())
    # runs of equal sizes, a shorter one ending a run, a run longer than GSO allows, empty ones
    sizes = [1200] * 10 + [700] + [1200] * 3 + [200] * (GSO_MAX_SEGMENTS + 9) + [0, 0, 5, 5]
    payloads = [
        i.to_bytes(2, "big") * (size // 2) + bytes(size % 2) for i, size in enumerate(sizes)
    ]
    writer = DatagramWriter(batched=batched)
    assert writer.send(tx, payloads) == []
    datas, addrs = read_all(DatagramReader(batched=batched), rx, len(payloads))
    assert datas == payloads
    assert set(addrs) == {tx.getsockname()}
    assert writer.gso_refused == 0


def test_a_socket_that_refuses_gso_gets_the_datagrams_one_by_one() -> None:
    with udp(socket.AF_INET, "127.0.0.1") as rx, udp(socket.AF_INET, "127.0.0.1") as tx:
        # SO_NO_CHECK (IPv4, no UDP checksum): the kernel will not segment for this socket.
        tx.setsockopt(socket.SOL_SOCKET, 11, 1)
        tx.connect(rx.getsockname())
        payloads = [bytes([i]) * 300 for i in range(20)]
        writer = DatagramWriter()
        assert writer.send(tx, payloads) == []
        on_linux = sys.platform.startswith("linux")
        assert (writer.gso_refused, writer.path) == ((1, "sendmmsg") if on_linux else (0, "sendto"))
        datas, _ = read_all(DatagramReader(), rx, 20)
        assert datas == payloads


def test_many_datagrams_through_small_arena_and_batches(socks: list[socket.socket]) -> None:
    rx, tx = socks[0], socks[1]
    payloads = [bytes([i % 256]) * (1000 + i % 3) for i in range(300)]
    writer = DatagramWriter(batch=3, arena_bytes=65535)
    dest = rx.getsockname()
    for start in range(0, 300, 100):  # stay well inside the receive buffer
        assert writer.send_to(tx, payloads[start : start + 100], [dest] * 100) == []
        datas, _ = read_all(DatagramReader(batch=7), rx, 100)
        assert datas == payloads[start : start + 100]


def test_a_datagram_that_cannot_go_is_reported_and_the_rest_still_go(
    socks: list[socket.socket], family: tuple[socket.AddressFamily, str], batched: bool
) -> None:
    rx, tx = socks[0], socks[1]
    wrong = ("10.0.0.1", 9) if family[0] == socket.AF_INET6 else ("::1", 9, 0, 0)
    dests = [rx.getsockname(), wrong, ("not-a-host", 1), rx.getsockname()]
    failed = DatagramWriter(batched=batched).send_to(tx, [b"a", b"b", b"c", b"d"], dests)
    assert failed == [1, 2]
    datas, _ = read_all(DatagramReader(batched=batched), rx, 2)
    assert datas == [b"a", b"d"]


def test_refused_port_raises_once_nothing_was_read(batched: bool) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with udp(socket.AF_INET, "127.0.0.1") as tx:
        tx.connect(("127.0.0.1", port))
        tx.send(b"nobody there")  # ICMP port unreachable comes back
        select.select([tx], [], [], 2.0)
        reader = DatagramReader(batched=batched)
        with pytest.raises(ConnectionRefusedError):
            reader.recv(tx)
        assert reader.recv(tx) == []  # the error is reported once


def test_sockaddr_encoding_round_trips() -> None:
    for addr in [("127.0.0.1", 4434), ("10.1.2.3", 1), ("::1", 5, 0, 0), ("fe80::1", 9, 7, 3)]:
        assert decode_sockaddr(encode_sockaddr(addr)) == addr
    assert decode_sockaddr(encode_sockaddr(("::1", 5))) == ("::1", 5, 0, 0)
    with pytest.raises(OSError):
        encode_sockaddr(("example.org", 1))
    with pytest.raises(ValueError):
        decode_sockaddr(bytes(16))


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="batch"):
        DatagramReader(batch=0)
    with pytest.raises(ValueError, match="size"):
        DatagramReader(size=65536)
    with pytest.raises(ValueError, match="arena_bytes"):
        DatagramWriter(arena_bytes=1000)
    with udp(socket.AF_INET, "127.0.0.1") as tx, pytest.raises(ValueError, match="length"):
        DatagramWriter().send_to(tx, [b"x"], [])

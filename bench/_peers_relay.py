"""Byte-counting relays for bench/peers.py: what devices and a server exchange, both directions.

The harness puts one relay in front of the server's device-facing port and counts the
bytes itself, the same way for every system: TCP payload bytes for MQTT, NATS and
HTTPS (TLS records included; TCP/IP headers are not counted), UDP payload bytes for
Squall's QUIC (UDP/IP headers are not counted either).  ``up`` is device -> server,
``down`` server -> device.

``start_tcp_relay`` / ``start_udp_relay`` run in any asyncio loop (the unit tests use
them in-process); ``relay_main`` is the entry point of the relay process the bench
starts, answering ``stats`` on a pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any, cast

Addr = tuple[str, int]

# A relay stops reading from one side while the other side's send buffer holds more than
# this (the usual asyncio flow control), so a slow server slows its devices, as without it.
_HIGH_WATER = 1 << 20
_UDP_SOCKET_BUFFER = 4 << 20


@dataclass(slots=True)
class ByteCounts:
    """Bytes and chunks (TCP reads or UDP datagrams) per direction, and connections seen."""

    up_bytes: int = 0
    down_bytes: int = 0
    up_chunks: int = 0
    down_chunks: int = 0
    connections: int = 0

    def total(self) -> int:
        """Bytes both directions."""
        return self.up_bytes + self.down_bytes

    def minus(self, before: ByteCounts) -> ByteCounts:
        """What was counted since ``before`` (a snapshot of the same counter)."""
        return ByteCounts(
            self.up_bytes - before.up_bytes,
            self.down_bytes - before.down_bytes,
            self.up_chunks - before.up_chunks,
            self.down_chunks - before.down_chunks,
            self.connections - before.connections,
        )

    def snapshot(self) -> ByteCounts:
        """A copy."""
        return ByteCounts(**asdict(self))


class Relay:
    """A running relay: its listening port, its counters, and how to close it."""

    def __init__(self, port: int, counts: ByteCounts, closers: list[Any]) -> None:
        self.port = port
        self.counts = counts
        self._closers = closers

    async def close(self) -> None:
        """Stop listening and drop every relayed connection."""
        for c in list(self._closers):
            c.close()
            if isinstance(c, asyncio.AbstractServer):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.wait_closed(), 2)
        self._closers.clear()


# --- TCP ------------------------------------------------------------------------------


class _TcpSide(asyncio.Protocol):
    """One socket of a relayed pair; what it reads goes to its peer's transport."""

    def __init__(self, counts: ByteCounts, upward: bool) -> None:
        self.counts = counts
        self.upward = upward  # True: this side faces the device (reads are "up")
        self.transport: asyncio.Transport | None = None
        self.peer: _TcpSide | None = None
        self.pending: list[bytes] = []  # read before the pair was joined
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.transport.set_write_buffer_limits(high=_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        c = self.counts
        if self.upward:
            c.up_bytes += len(data)
            c.up_chunks += 1
        else:
            c.down_bytes += len(data)
            c.down_chunks += 1
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
            return
        peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
        return True  # keep our side open for writing until the peer closes too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def flush_to_peer(self) -> None:
        """Pass on what was read (and an EOF or close seen) before the pair was joined."""
        peer = self.peer
        assert peer is not None and peer.transport is not None
        for chunk in self.pending:
            peer.transport.write(chunk)
        self.pending.clear()
        if self.eof and peer.transport.can_write_eof():
            peer.transport.write_eof()
        if self.lost:
            peer.transport.close()


def join(device_side: _TcpSide, server_side: _TcpSide) -> None:
    """Make two connected sides a relayed pair; either may already have read something
    (a server that speaks first, e.g. NATS's INFO, often has before this runs)."""
    device_side.peer, server_side.peer = server_side, device_side
    device_side.flush_to_peer()
    server_side.flush_to_peer()


async def start_tcp_relay(target: Addr, listen: Addr = ("127.0.0.1", 0)) -> Relay:
    """Relay TCP connections on ``listen`` to ``target``, counting bytes both ways."""
    loop = asyncio.get_running_loop()
    counts = ByteCounts()
    closers: list[Any] = []
    tasks: set[asyncio.Task[None]] = set()  # upstream connects under way

    def accept() -> _TcpSide:
        device_side = _TcpSide(counts, upward=True)
        counts.connections += 1
        task = loop.create_task(_connect_upstream(device_side))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return device_side

    async def _connect_upstream(device_side: _TcpSide) -> None:
        server_side = _TcpSide(counts, upward=False)
        try:
            await loop.create_connection(lambda: server_side, target[0], target[1])
        except OSError:
            if device_side.transport is not None:
                device_side.transport.close()
            return
        closers.append(server_side.transport)
        join(device_side, server_side)

    server = await loop.create_server(accept, listen[0], listen[1])
    closers.append(server)
    port = int(server.sockets[0].getsockname()[1])
    return Relay(port, counts, closers)


# --- UDP ------------------------------------------------------------------------------


class _UdpFront(asyncio.DatagramProtocol):
    """The device-facing socket: one upstream socket per device address."""

    def __init__(self, target: Addr, counts: ByteCounts, closers: list[Any]) -> None:
        self.target = target
        self.counts = counts
        self.closers = closers
        self.transport: asyncio.DatagramTransport | None = None
        self.upstream: dict[Addr, _UdpBack] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        _enlarge_buffers(transport)

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        c = self.counts
        c.up_bytes += len(data)
        c.up_chunks += 1
        back = self.upstream.get(addr)
        if back is None:
            back = self.upstream[addr] = _UdpBack(self, addr)
            c.connections += 1
            asyncio.get_running_loop().create_task(self._open(back))
        back.send(data)

    async def _open(self, back: _UdpBack) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: back, remote_addr=self.target)
        self.closers.append(back.transport)


class _UdpBack(asyncio.DatagramProtocol):
    """The server-facing socket of one device address."""

    def __init__(self, front: _UdpFront, device: Addr) -> None:
        self.front = front
        self.device = device
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.DatagramTransport, transport)
        _enlarge_buffers(transport)
        for data in self.pending:
            t.sendto(data)
        self.pending.clear()

    def send(self, data: bytes) -> None:
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.sendto(data)

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        c = self.front.counts
        c.down_bytes += len(data)
        c.down_chunks += 1
        if self.front.transport is not None:
            self.front.transport.sendto(data, self.device)


def _enlarge_buffers(transport: asyncio.BaseTransport) -> None:
    import socket

    sock = transport.get_extra_info("socket")
    if sock is not None:
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, _UDP_SOCKET_BUFFER)


async def start_udp_relay(target: Addr, listen: Addr = ("127.0.0.1", 0)) -> Relay:
    """Relay UDP datagrams on ``listen`` to ``target`` (a socket per device address)."""
    loop = asyncio.get_running_loop()
    counts = ByteCounts()
    closers: list[Any] = []
    front = _UdpFront(target, counts, closers)
    transport, _ = await loop.create_datagram_endpoint(lambda: front, local_addr=listen)
    closers.insert(0, transport)
    port = int(transport.get_extra_info("sockname")[1])
    return Relay(port, counts, closers)


# --- the relay process ------------------------------------------------------------------


async def _serve(conn: Connection, kind: str, target: Addr) -> None:
    start = start_tcp_relay if kind == "tcp" else start_udp_relay
    relay = await start(target)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def on_command() -> None:
        try:
            msg = conn.recv()
        except EOFError:
            msg = ("stop",)
        if msg[0] == "stats":
            conn.send(("stats", asdict(relay.counts)))
        elif msg[0] == "stop" and not done.done():
            done.set_result(None)

    loop.add_reader(conn.fileno(), on_command)
    conn.send(("ready", relay.port))
    await done
    loop.remove_reader(conn.fileno())
    await relay.close()


def relay_main(conn: Connection, kind: str, target: Addr) -> None:
    """Entry point of the relay process: ``kind`` is "tcp" or "udp"; uvloop when installed."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.run(_serve(conn, kind, target))

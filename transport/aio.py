"""The thin asyncio shell shared by both ends: one UDP socket, one timer, one endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

Address = tuple[Any, ...]


class Endpoint(Protocol):
    """What EdgeEndpoint and HubEndpoint both offer."""

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Feed one datagram."""

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Take datagrams due now."""

    def get_timer(self) -> float | None:
        """Next deadline."""

    def handle_timer(self, now: float) -> None:
        """Run what is due."""


class UdpDriver(asyncio.DatagramProtocol):
    """Pumps one endpoint: datagrams in and out, one timer, ``after`` hook for the app."""

    def __init__(self, endpoint: Endpoint, after: Callable[[], None] | None = None) -> None:
        self.endpoint = endpoint
        self.after = after
        self.transport: asyncio.DatagramTransport | None = None
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.sent_bytes = 0
        self.received_bytes = 0
        self.sent_datagrams = 0
        self.received_datagrams = 0
        self.send_errors = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """asyncio callback."""
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        """asyncio callback: feed the endpoint, then flush."""
        self.received_bytes += len(data)
        self.received_datagrams += 1
        self.endpoint.receive_datagram(data, addr, self._loop.time())
        self.flush()

    def error_received(self, exc: Exception) -> None:
        """asyncio callback: ICMP errors and the like are counted, never fatal."""
        self.send_errors += 1

    def flush(self) -> None:
        """Send what the endpoint has, let the app react, re-arm the timer."""
        if self.after is not None:
            self.after()
        if self.transport is None:
            return
        for data, addr in self.endpoint.datagrams_to_send(self._loop.time()):
            self.sent_bytes += len(data)
            self.sent_datagrams += 1
            self.transport.sendto(data, addr)
        self._arm()

    def _arm(self) -> None:
        at = self.endpoint.get_timer()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = None if at is None else self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        self.endpoint.handle_timer(self._loop.time())
        self.flush()

    def close(self) -> None:
        """Stop the timer and the socket."""
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.close()


async def open_driver(
    endpoint: Endpoint,
    local: Address = ("127.0.0.1", 0),
    after: Callable[[], None] | None = None,
) -> UdpDriver:
    """Bind a UDP socket for ``endpoint`` and start pumping it."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(
        lambda: UdpDriver(endpoint, after), local_addr=local
    )
    return proto

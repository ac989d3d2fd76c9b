"""The virtual network: one seeded link model per device and direction, and each device's NAT.

A datagram offered to a device's link gets its whole fate from ``simulator.linkmodel`` at
once (drop, or arrival time(s) and a flipped bit); arrivals become events on the queue.
Fates depend only on the seed, the device, the packet's size and its order on the link,
never on its bytes.  The NAT gives each (socket port, binding epoch) of a device its own
public port, so the hub sees a new source address when the link rebinds (the profile's
``rebind_every_s``) and when a device reconnects from a new socket; a reply to a binding
that has expired is dropped, as a carrier NAT does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from simulator.linkmodel import Link, LinkParams, LinkStats
from simulator.vclock import EventQueue, Kind
from simulator.vparallel import CausalityError

Address = tuple[Any, ...]
HUB_ADDR: Final[Address] = ("hub.squall.virtual", 4433)
_FIRST_PUBLIC_PORT: Final = 20_000


@dataclass(slots=True)
class NetCounters:
    """Datagrams the network could not hand to anyone (beyond the link model's own drops)."""

    to_unknown_host: int = 0  # the hub answered an address no device has
    nat_expired: int = 0  # a reply to a binding the NAT no longer has
    port_closed: int = 0  # a reply to a socket the device has closed (old session, crash)
    hub_down: int = 0  # arrived while the hub process was down


class DevicePath:
    """One device's link (both directions) and its NAT table."""

    def __init__(self, index: int, name: str, params: LinkParams, seed: int) -> None:
        self.index = index
        self.name = name
        self.owner = 0  # the process (rank) that runs the device and both its link directions
        self.host = f"{name}.virtual"
        self.link = Link(params, seed=seed, device=name)
        self._public: dict[tuple[int, int], int] = {}  # (socket port, epoch) -> public port
        self._private: dict[int, tuple[int, int]] = {}  # public port -> (socket port, epoch)

    def public_addr(self, port: int, now: float) -> Address:
        """The source address the hub sees for the device's socket ``port`` at ``now``."""
        key = (port, self.link.current_port_epoch(now))
        public = self._public.get(key)
        if public is None:
            public = self._public[key] = _FIRST_PUBLIC_PORT + len(self._public)
            self._private[public] = key
        return (self.host, public)

    def socket_port(self, public: int, now: float) -> int | None:
        """The device socket a datagram to ``public`` reaches at ``now`` (None: binding gone)."""
        key = self._private.get(public)
        if key is None or key[1] != self.link.current_port_epoch(now):
            return None
        return key[0]

    def stats(self) -> LinkStats:
        """Both directions' counters."""
        return self.link.stats()


class VirtualNetwork:
    """Every device's path between the devices and the hub, feeding arrivals to the queue."""

    def __init__(
        self,
        queue: EventQueue,
        params_for: Callable[[int, str], LinkParams],
        names: list[str],
        seed: int,
    ) -> None:
        self.queue = queue
        self.paths = [DevicePath(i, n, params_for(i, n), seed) for i, n in enumerate(names)]
        self._by_host = {p.host: p for p in self.paths}
        self.counters = NetCounters()
        # Split runs (``simulator.vparallel``): where datagrams go whose next stop runs in
        # another process (None: everything is local).  The hub runs in rank 0.
        self.remote_up: Callable[[float, DevicePath, tuple[bytes, Address]], None] | None = None
        self.remote_down: Callable[[float, DevicePath, bytes, Address], None] | None = None

    def send_up(self, path: DevicePath, data: bytes, port: int, now: float) -> None:
        """A device sends ``data`` from its socket ``port`` to the hub."""
        fate = path.link.up.submit(now, len(data))
        if fate.drop_cause is not None:
            return
        payload = (fate.apply(data), path.public_addr(port, now))
        for t in fate.deliver_at:
            if self.remote_up is None:
                self.queue.at(t, Kind.TO_HUB, path, payload)
            else:  # the hub runs in rank 0
                self.remote_up(t, path, payload)

    def send_down(self, data: bytes, addr: Address, now: float) -> None:
        """The hub sends ``data`` to ``addr`` (a device's public address)."""
        path = self._by_host.get(addr[0])
        if path is None:
            self.counters.to_unknown_host += 1
            return
        if self.remote_down is not None and path.owner != 0:
            # The device's process owns both directions of its link: it decides the fate
            # there, with the time the hub sent it.
            self.remote_down(now, path, data, addr)
            return
        self.down_from_hub(path, data, addr, now)

    def down_from_hub(
        self, path: DevicePath, data: bytes, addr: Address, now: float, not_before: float = 0.0
    ) -> None:
        """The link's fate for a datagram the hub sent at ``now`` to ``path``'s device.

        ``not_before``: in a split run, the start of the window about to run; an arrival
        before it is a ``CausalityError``.
        """
        fate = path.link.down.submit(now, len(data))
        if fate.drop_cause is not None:
            return
        payload = (fate.apply(data), int(addr[1]))
        for t in fate.deliver_at:
            if t < not_before:
                raise CausalityError(path.name, t, not_before)
            self.queue.at(t, Kind.TO_EDGE, path, payload)

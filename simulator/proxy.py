"""The UDP link-impairment proxy (``squall link``): a sans-I/O scheduling core, an asyncio shell.

Devices talk UDP to the proxy's listen address; the proxy forwards to one upstream (the
hub) and back, putting every datagram through the seeded link model
(:mod:`simulator.linkmodel`) of the client it belongs to.

**Core** (:class:`LinkProxyCore`, no sockets, no clock): one :class:`~simulator.linkmodel.Link`
per client address (device key ``host:port`` or a configured name, seeded from the
proxy's seed). A packet offered at ``now`` gets its whole fate from the model at once;
the copies that survive go into the delivery schedule of their direction. A schedule
is a FIFO while deliveries come in due order (the normal case: fixed delay, or jitter
without reordering on one link) plus a heap for the ones that do not (reordering, or
clients with different queueing delays). The core answers with the deliveries due at
``now`` and the one deadline it needs next (:meth:`LinkProxyCore.get_timer`).

**Shell** (:class:`LinkProxy`, made by :func:`start_proxy`): the model's ``now`` is
seconds since the proxy started (CLOCK_MONOTONIC, read once per batch received: the
batch was all waiting by then); non-blocking sockets read in batches of up to 64 per
system call (``recvmmsg``) and up to 4 calls per wakeup; one upstream socket per client
(a NAT binding: when the model's port epoch for a client moves on, the next packet to
the hub goes out of a new socket, so the hub sees a new source port, and the old
binding is closed); ONE asyncio timer for the earliest deadline; everything due sent
in one pass, batched per socket (``sendmmsg``, runs of equal-sized datagrams to one
destination as one UDP GSO send). :mod:`simulator.mmsg` falls back to one call per
datagram where those calls are missing; ``io_path``, ``/status`` and the
``squall_link_io_info`` metric say which is in use. Optional pcap capture
(:mod:`simulator.pcap`), decision log (JSON lines) and an HTTP control API
(``/status``, ``/metrics``, ``/profile``, ``/outage``, ``/rebind``) bound to 127.0.0.1.

Limits (each with what happens at it): ``max_clients`` (packets from further new
clients are dropped, result ``dropped_clients``), ``client_idle_s`` (a client with no
packet either way and nothing in flight for that long is forgotten, its upstream socket
closed), ``max_pending`` (datagrams in flight inside the proxy; beyond it a packet the
model let through is dropped, result ``dropped_overflow``), pcap and decision-log file
sizes (capture stops, skipped records are counted). The I/O buffers are allocated once:
64 x 64 KiB to receive into (a datagram is never cut), 2 x 256 KiB to send from.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import socket
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final, TextIO

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from simulator.linkmodel import (
    Decision,
    DecisionHook,
    Direction,
    DropCause,
    Link,
    LinkDirection,
    LinkParams,
    LinkStats,
)
from simulator.mmsg import MAX_DATAGRAM, DatagramReader, DatagramWriter
from simulator.pcap import DEFAULT_PCAP_MAX_BYTES, PcapMark, PcapWriter
from simulator.schedule import DueSchedule

__all__ = [
    "DELAY_BUCKETS",
    "RESULTS",
    "Address",
    "ClientInfo",
    "DecisionLog",
    "Delivery",
    "DeliveryRun",
    "DirectionTally",
    "LinkProxy",
    "LinkProxyCore",
    "ProxyLimits",
    "ProxyStats",
    "control_app",
    "decision_record",
    "device_key",
    "start_proxy",
]

Address = tuple[Any, ...]
"""A socket address as the socket module gives it: (host, port) or (host, port, flow, scope)."""

Delivery = tuple[Direction, Address, bytes, int, bool]
"""One datagram to send now: (direction, client address, payload, port epoch, corrupted).

For ``UP`` the port epoch is the client's NAT binding in force at send time; ``DOWN``
deliveries go from the listen socket to the client and carry epoch 0.
"""

DeliveryRun = tuple[Direction, Address, int, list[bytes], list[int]]
"""Consecutive deliveries of one client and direction: (direction, client address, port
epoch, payloads, indexes of the corrupted payloads)."""

RESULTS: Final = (
    "passed",
    "dropped_loss",
    "dropped_queue",
    "dropped_mtu",
    "dropped_outage",
    "dropped_clients",
    "dropped_overflow",
    "duplicated",
    "corrupted",
)
"""Result labels of ``squall_link_packets_total``. Every offered packet is counted once as
``passed`` or one ``dropped_*``; ``duplicated`` and ``corrupted`` count passed packets
that were also delivered twice / with a flipped bit. ``dropped_loss`` .. ``dropped_outage``
come from the link model; ``dropped_clients`` and ``dropped_overflow`` are the proxy's own
limits (client table full, in-flight buffer full)."""

DELAY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
"""Upper bounds (seconds) of the ``squall_link_delay_seconds`` histogram buckets."""

_DROP_RESULT: Final = {cause: f"dropped_{cause.value}" for cause in DropCause}
_PCAP_MARK: Final = {
    "dropped_loss": PcapMark.DROPPED_LOSS,
    "dropped_queue": PcapMark.DROPPED_QUEUE,
    "dropped_mtu": PcapMark.DROPPED_MTU,
    "dropped_outage": PcapMark.DROPPED_OUTAGE,
    "dropped_clients": PcapMark.DROPPED_CLIENTS,
    "dropped_overflow": PcapMark.DROPPED_OVERFLOW,
}
_UP, _DOWN = Direction.UP, Direction.DOWN
_RECV_BATCH: Final = 64  # datagrams per receive call (recvmmsg), into a 64 x 64 KiB arena
_RECV_CALLS: Final = 4  # receive calls per readiness callback before yielding to the loop
_SEND_BATCH: Final = 64  # messages per send call (sendmmsg)
_SEND_ARENA: Final = 256 * 1024  # payload bytes per send call
_LISTEN_BUFFER_BYTES: Final = 4 << 20  # asked for; the kernel caps it at net.core.*mem_max
_STATUS_DEVICES: Final = 100  # clients listed in /status, most recently active first


def device_key(addr: Address) -> str:
    """The default device name of a client address: ``host:port`` (``[host]:port`` for IPv6)."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    """The proxy's own bounds; see the module docstring for what happens at each."""

    max_clients: int = 10_000
    client_idle_s: float = 120.0
    max_pending: int = 100_000

    def validate(self) -> None:
        """Raise ValueError naming the field when a limit makes no sense."""
        if self.max_clients < 1:
            raise ValueError(f"max_clients: must be >= 1, got {self.max_clients}")
        if not (math.isfinite(self.client_idle_s) and self.client_idle_s > 0):
            raise ValueError(f"client_idle_s: must be > 0, got {self.client_idle_s}")
        if self.max_pending < 1:
            raise ValueError(f"max_pending: must be >= 1, got {self.max_pending}")


@dataclass(frozen=True, slots=True)
class DirectionTally:
    """The proxy's counters of one direction, over every client it has had."""

    packets: dict[str, int]  # by result label (RESULTS)
    bytes_in: int  # offered to the link
    bytes_out: int  # sent on, duplicates included
    delay_buckets: tuple[int, ...]  # per DELAY_BUCKETS bound, then +Inf (not cumulative)
    delay_sum_s: float

    @property
    def delay_count(self) -> int:
        """Datagrams sent on (each copy of a duplicate counts)."""
        return sum(self.delay_buckets)

    @property
    def dropped(self) -> int:
        """Packets dropped for any cause."""
        return sum(n for label, n in self.packets.items() if label.startswith("dropped_"))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly view."""
        count = self.delay_count
        return {
            "packets": dict(self.packets),
            "dropped": self.dropped,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "sent": count,
            "delay_mean_s": self.delay_sum_s / count if count else 0.0,
        }


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """One client the proxy currently tracks."""

    addr: Address
    client: str
    device: str
    port_epoch: int
    idle_s: float
    link: LinkStats
    upstream_port: int | None = None  # filled in by the shell

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly view."""
        return {
            "client": self.client,
            "device": self.device,
            "port_epoch": self.port_epoch,
            "upstream_port": self.upstream_port,
            "idle_s": round(self.idle_s, 3),
            "up": asdict(self.link.up),
            "down": asdict(self.link.down),
        }


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """A snapshot of a proxy: profile, clients, per-direction tallies and shell counters."""

    profile: str
    seed: int
    uptime_s: float
    clients: int
    max_clients: int
    clients_expired: int
    pending: int
    up: DirectionTally
    down: DirectionTally
    rebinds: int = 0  # upstream sockets replaced because a client's NAT binding changed
    send_errors: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    socket_errors: int = 0  # upstream sockets that could not be opened (packet dropped)
    pcap_records: int = 0
    pcap_skipped: int = 0
    decision_log_lines: int = 0
    decision_log_skipped: int = 0
    io: str = ""  # the socket calls in use: "recvmmsg/sendmmsg+gso", ... "recvfrom/sendto"

    def direction(self, direction: Direction | str) -> DirectionTally:
        """The tally of ``up`` or ``down``."""
        return self.up if Direction(direction) is Direction.UP else self.down

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (what ``GET /status`` returns, without the device list)."""
        return {
            "profile": self.profile,
            "seed": self.seed,
            "uptime_s": round(self.uptime_s, 3),
            "clients": self.clients,
            "max_clients": self.max_clients,
            "clients_expired": self.clients_expired,
            "pending": self.pending,
            "up": self.up.as_dict(),
            "down": self.down.as_dict(),
            "rebinds": self.rebinds,
            "send_errors": dict(self.send_errors),
            "socket_errors": self.socket_errors,
            "pcap": {"records": self.pcap_records, "skipped": self.pcap_skipped},
            "decision_log": {
                "lines": self.decision_log_lines,
                "skipped": self.decision_log_skipped,
            },
            "io": self.io,
        }

    def summary(self) -> str:
        """One line for the end of a run."""
        parts = []
        for d in (self.up, self.down):
            causes = ", ".join(
                f"{label.removeprefix('dropped_')} {n}"
                for label, n in d.packets.items()
                if label.startswith("dropped_") and n
            )
            offered = d.packets["passed"] + d.dropped
            parts.append(
                f"{offered} in, {d.packets['passed']} passed, {d.dropped} dropped"
                + (f" ({causes})" if causes else "")
            )
        return (
            f"{self.uptime_s:.1f} s, profile {self.profile}, seed {self.seed}: "
            f"up {parts[0]}; down {parts[1]}; {self.clients} clients, {self.rebinds} rebinds"
        )


# -- the core ---------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Client:
    addr: Address
    device: str
    link: Link
    busy_until: float  # latest of: last packet seen, last delivery scheduled


class Tally:
    """Mutable counters of one direction behind DirectionTally (the proxy's and the bridge's)."""

    __slots__ = ("bytes_in", "bytes_out", "delay_buckets", "delay_sum", "packets")

    def __init__(self, results: Iterable[str] = RESULTS) -> None:
        self.packets = dict.fromkeys(results, 0)
        self.bytes_in = 0
        self.bytes_out = 0
        self.delay_buckets = [0] * (len(DELAY_BUCKETS) + 1)
        self.delay_sum = 0.0

    def snapshot(self) -> DirectionTally:
        return DirectionTally(
            dict(self.packets),
            self.bytes_in,
            self.bytes_out,
            tuple(self.delay_buckets),
            self.delay_sum,
        )


# A scheduled delivery: (due, tie-breaking seq, client, payload, offered at, corrupted).
_Entry = tuple[float, int, _Client, bytes, float, bool]


_Schedule = DueSchedule[_Entry]


class LinkProxyCore:
    """Clients, their links and the delivery schedules; bytes and ``now`` in, deliveries out."""

    def __init__(
        self,
        params: LinkParams,
        *,
        profile: str = "custom",
        seed: int = 0,
        limits: ProxyLimits | None = None,
        devices: Mapping[str, str] | None = None,
        on_decision: DecisionHook | None = None,
    ) -> None:
        params.validate()
        self.limits = limits or ProxyLimits()
        self.limits.validate()
        self.seed = seed
        self._params = params
        self._profile = profile
        self._devices = dict(devices or {})
        self._on_decision = on_decision
        self._clients: OrderedDict[Address, _Client] = OrderedDict()  # least recent first
        self._schedules = {_UP: _Schedule(), _DOWN: _Schedule()}
        self._tallies = {_UP: Tally(), _DOWN: Tally()}
        self._seq = itertools.count()
        self._popped: list[_Entry] = []  # reused by pop_due_runs
        self._pending = 0
        self._max_pending = self.limits.max_pending
        self._expired = 0
        self._outage_until = -math.inf

    @property
    def profile(self) -> str:
        """The name of the profile in force."""
        return self._profile

    @property
    def params(self) -> LinkParams:
        """The link parameters in force for every client."""
        return self._params

    def device_for(self, addr: Address) -> str:
        """A client's device name: configured for ``host:port`` or ``host``, else the key."""
        key = device_key(addr)
        return self._devices.get(key) or self._devices.get(str(addr[0])) or key

    # -- packets in ------------------------------------------------------------------

    def from_client(self, addr: Address, data: bytes, now: float) -> str:
        """Offer a datagram from a device (direction up); returns its result label."""
        refused = self.offer_up([data], [addr], now)
        return refused[0][1] if refused else "passed"

    def from_upstream(self, addr: Address, data: bytes, now: float) -> str:
        """Offer a datagram from the hub to client ``addr`` (direction down); returns its result."""
        refused = self.offer_down(addr, [data], now)
        return refused[0][1] if refused else "passed"

    def offer_up(
        self, datas: Sequence[bytes], addrs: Sequence[Address], now: float
    ) -> list[tuple[int, str]]:
        """Offer datagrams from devices (``datas[i]`` from ``addrs[i]``), all at ``now``.

        Returns (index, result label) of each one that did not pass; the rest passed.
        """
        tally = self._tallies[_UP]
        tally.bytes_in += sum(map(len, datas))
        refused: list[tuple[int, str]] = []
        clients = self._clients
        i, n = 0, len(datas)
        while i < n:
            addr = addrs[i]
            j = i + 1  # a run of datagrams from one client: looked up once
            while j < n and (addrs[j] is addr or addrs[j] == addr):
                j += 1
            client = clients.get(addr)
            if client is None:
                client = self._admit(addr, now)
            else:
                clients.move_to_end(addr)
            if client is None:
                tally.packets["dropped_clients"] += j - i
                refused += [(k, "dropped_clients") for k in range(i, j)]
            else:
                self._offer(client, client.link.up, _UP, datas, i, j, now, refused)
            i = j
        return refused

    def offer_down(
        self, addr: Address, datas: Sequence[bytes], now: float
    ) -> list[tuple[int, str]]:
        """Offer datagrams from the hub to client ``addr`` (direction down), all at ``now``.

        Returns (index, result label) of each one that did not pass; the rest passed.
        """
        tally = self._tallies[_DOWN]
        tally.bytes_in += sum(map(len, datas))
        client = self._clients.get(addr)
        if client is None:  # forgotten in the meantime: its NAT binding is gone
            tally.packets["dropped_clients"] += len(datas)
            return [(k, "dropped_clients") for k in range(len(datas))]
        self._clients.move_to_end(addr)
        refused: list[tuple[int, str]] = []
        self._offer(client, client.link.down, _DOWN, datas, 0, len(datas), now, refused)
        return refused

    def _admit(self, addr: Address, now: float) -> _Client | None:
        if len(self._clients) >= self.limits.max_clients:
            return None  # idle ones leave through expire_idle(), which the shell acts on
        device = self.device_for(addr)
        link = Link(self._params, seed=self.seed, device=device, on_decision=self._on_decision)
        if now < self._outage_until:
            link.force_outage(now, self._outage_until - now)
        client = _Client(addr, device, link, now)
        self._clients[addr] = client
        return client

    def _offer(
        self,
        client: _Client,
        model: LinkDirection,
        direction: Direction,
        datas: Sequence[bytes],
        start: int,
        stop: int,
        now: float,
        refused: list[tuple[int, str]],
    ) -> None:
        """Put ``datas[start:stop]`` of one client through its link model and schedule them."""
        # The per-packet path: kept flat, it is most of the proxy's CPU beside the syscalls.
        packets = self._tallies[direction].packets
        schedule = self._schedules[direction]
        push, fifo = schedule.push, schedule.fifo
        submit, seq = model.submit, self._seq
        pending, max_pending = self._pending, self._max_pending
        busy = max(client.busy_until, now)  # a packet seen now
        passed = 0
        for k in range(start, stop):
            data = datas[k]
            fate = submit(now, len(data))
            cause = fate.drop_cause
            if cause is not None:
                label = _DROP_RESULT[cause]
                packets[label] += 1
                refused.append((k, label))
                continue
            times = fate.deliver_at
            copies = len(times)
            if pending + copies > max_pending:
                packets["dropped_overflow"] += 1
                refused.append((k, "dropped_overflow"))
                continue
            passed += 1
            pending += copies
            if copies == 1 and fate.corrupt_bit is None:  # the usual case
                due = times[0]
                if fifo and due >= fifo[-1][0]:  # DueSchedule.push, inlined for its FIFO case
                    fifo.append((due, next(seq), client, data, now, False))
                else:
                    push((due, next(seq), client, data, now, False))
                if due > busy:
                    busy = due
                continue
            corrupt = fate.corrupt_bit is not None
            payload = fate.apply(data) if corrupt else data
            for due in times:
                push((due, next(seq), client, payload, now, corrupt))
                if due > busy:
                    busy = due
            if copies > 1:
                packets["duplicated"] += 1
            if corrupt:
                packets["corrupted"] += 1
        packets["passed"] += passed
        self._pending = pending
        client.busy_until = busy

    # -- deliveries and deadlines ----------------------------------------------------------

    def pop_due(self, now: float) -> list[Delivery]:
        """Take every delivery due at or before ``now``, each direction in due order."""
        return [
            (direction, addr, data, epoch, k in corrupt)
            for direction, addr, epoch, payloads, corrupt in self.pop_due_runs(now)
            for k, data in enumerate(payloads)
        ]

    def pop_due_runs(self, now: float) -> list[DeliveryRun]:
        """Take every delivery due at or before ``now``: runs of one client's datagrams.

        Each direction's runs come in due order; flattened, they are what
        :meth:`pop_due` gives. A run is what one sendmmsg/GSO send can carry.
        """
        out: list[DeliveryRun] = []
        entries = self._popped
        for direction, schedule in self._schedules.items():
            if not schedule.fifo and not schedule.heap:
                continue
            schedule.pop_due(now, entries)
            if not entries:
                continue
            tally = self._tallies[direction]
            buckets = tally.delay_buckets
            delay_sum = 0.0
            sent_bytes = 0
            up = direction is _UP
            last: _Client | None = None  # consecutive entries are often one client's
            payloads: list[bytes] = []
            corrupt: list[int] = []
            offered_at, delay, bucket = math.nan, 0.0, 0
            for _, _, client, data, offered, bad in entries:
                if offered != offered_at:  # a batch read at once shares its arrival time
                    offered_at, delay = offered, now - offered
                    bucket = bisect_left(DELAY_BUCKETS, delay)
                buckets[bucket] += 1
                delay_sum += delay
                sent_bytes += len(data)
                if client is not last:
                    last = client
                    epoch = client.link.current_port_epoch(now) if up else 0
                    payloads, corrupt = [], []
                    out.append((direction, client.addr, epoch, payloads, corrupt))
                if bad:
                    corrupt.append(len(payloads))
                payloads.append(data)
            tally.delay_sum += delay_sum
            tally.bytes_out += sent_bytes
            self._pending -= len(entries)
            entries.clear()
        return out

    def get_timer(self) -> float | None:
        """The next time something is due (a delivery or an idle expiry), or None."""
        at = min(self._schedules[_UP].next_due(), self._schedules[_DOWN].next_due())
        if self._clients:
            oldest = next(iter(self._clients.values()))
            at = min(at, oldest.busy_until + self.limits.client_idle_s)
        return None if at == math.inf else at

    def expire_idle(self, now: float) -> list[Address]:
        """Forget clients idle for ``client_idle_s`` with nothing in flight; returns them."""
        gone: list[Address] = []
        idle = self.limits.client_idle_s
        clients = self._clients
        while clients:
            addr, client = next(iter(clients.items()))
            if client.busy_until + idle > now:
                break
            del clients[addr]
            gone.append(addr)
        self._expired += len(gone)
        return gone

    def port_epoch(self, addr: Address, now: float) -> int | None:
        """The NAT binding of client ``addr`` at ``now``, or None when it is not tracked."""
        client = self._clients.get(addr)
        return None if client is None else client.link.current_port_epoch(now)

    # -- control -----------------------------------------------------------------------

    def set_params(self, params: LinkParams, now: float, *, profile: str = "custom") -> None:
        """Switch every link (and those of future clients) to ``params`` at ``now``."""
        params.validate()
        for client in self._clients.values():
            client.link.set_params(params, now)
        self._params = params
        self._profile = profile

    def force_outage(self, now: float, seconds: float) -> float:
        """Drop everything, both ways, for every client (new ones too) for ``seconds``."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds: must be a finite number >= 0, got {seconds!r}")
        self._outage_until = max(self._outage_until, now + seconds)
        for client in self._clients.values():
            client.link.force_outage(now, seconds)
        return self._outage_until

    def rebind(self, now: float) -> int:
        """Force a NAT rebinding of every client at ``now``; returns how many there are."""
        for client in self._clients.values():
            client.link.rebind(now)
        return len(self._clients)

    def clear(self) -> int:
        """Discard everything in flight (at shutdown); returns how many datagrams that was."""
        n = sum(s.clear() for s in self._schedules.values())
        self._pending = 0
        return n

    # -- observation ------------------------------------------------------------------------

    def stats(self, now: float) -> ProxyStats:
        """A snapshot of the counters at ``now`` (shell counters left at zero)."""
        return ProxyStats(
            profile=self._profile,
            seed=self.seed,
            uptime_s=now,
            clients=len(self._clients),
            max_clients=self.limits.max_clients,
            clients_expired=self._expired,
            pending=self._pending,
            up=self._tallies[_UP].snapshot(),
            down=self._tallies[_DOWN].snapshot(),
        )

    def clients(self, now: float, limit: int | None = None) -> list[ClientInfo]:
        """The tracked clients, most recently active first (at most ``limit``)."""
        out: list[ClientInfo] = []
        for addr in reversed(self._clients):
            if limit is not None and len(out) >= limit:
                break
            c = self._clients[addr]
            info = ClientInfo(
                addr=addr,
                client=device_key(addr),
                device=c.device,
                port_epoch=c.link.current_port_epoch(now),
                idle_s=max(0.0, now - c.busy_until),
                link=c.link.stats(),
            )
            out.append(info)
        return out


# -- the decision log --------------------------------------------------------------------


def decision_record(d: Decision) -> dict[str, Any]:
    """The JSON object the decision log writes for one packet decision."""
    fate = d.fate
    return {
        "event": "packet",
        "t": d.now,
        "seed": d.seed,
        "device": d.device,
        "dir": d.direction.value,
        "seq": d.seq,
        "size": d.size,
        "fate": "passed" if fate.drop_cause is None else _DROP_RESULT[fate.drop_cause],
        "deliver_at": list(fate.deliver_at),
        "corrupt_bit": fate.corrupt_bit,
        "reordered": fate.reordered,
    }


class DecisionLog:
    """JSON lines that explain a run, bounded: one per packet decision and per control action.

    Packet lines: ``{"event": "packet", "t", "seed", "device", "dir", "seq", "size",
    "fate", "deliver_at", "corrupt_bit", "reordered"}`` with ``t`` and ``deliver_at`` in
    seconds since the proxy started (the model's clock) and ``fate`` one of RESULTS'
    ``passed`` / ``dropped_*``. ``proxy_drop`` lines (same fields, no ``seq``) are packets
    the proxy itself dropped (``dropped_clients``; ``dropped_overflow`` after the model's
    own ``passed`` line). Other lines have ``event`` start (wall time of t = 0, seed,
    parameters), profile, outage, rebind or stop. Once the next line would take the file
    past ``max_bytes`` nothing more is written and the lines left out are counted.
    """

    def __init__(self, path: str | Path, *, max_bytes: int = DEFAULT_PCAP_MAX_BYTES) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.lines = 0
        self.skipped = 0
        self.bytes_written = 0
        self.error: OSError | None = None  # the write failure that stopped the log
        self._file: TextIO | None = self.path.open("w", encoding="utf-8", buffering=1 << 20)

    def write(self, record: Mapping[str, Any]) -> bool:
        """Append one line; False when it was left out (file full or closed)."""
        if self._file is None or self.skipped:
            self.skipped += 1
            return False
        line = json.dumps(record, separators=(",", ":")) + "\n"
        if self.bytes_written + len(line) > self.max_bytes:
            self.skipped += 1
            return False
        try:
            self._file.write(line)
        except OSError as exc:  # never let logging break forwarding
            self.error = exc
            self.skipped += 1
            self.close()
            return False
        self.bytes_written += len(line)
        self.lines += 1
        return True

    def on_decision(self, decision: Decision) -> None:
        """A DecisionHook for the link model."""
        self.write(decision_record(decision))

    def close(self) -> None:
        """Flush and close; later lines are counted as skipped."""
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except OSError as exc:
                self.error = exc


# -- the asyncio shell -------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Upstream:
    sock: socket.socket
    epoch: int
    port: int


class LinkProxy:
    """A running proxy; made by :func:`start_proxy`, stopped by :meth:`close`."""

    def __init__(
        self,
        core: LinkProxyCore,
        listen_sock: socket.socket,
        upstream: Address,
        *,
        profiles: Mapping[str, LinkParams],
        pcap: PcapWriter | None = None,
        decision_log: DecisionLog | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        # The model clock. Not loop.time(): uvloop's only ticks in whole milliseconds.
        self._clock = time.monotonic
        self._t0 = self._clock()
        self._wall0 = time.time()
        self._core = core
        self._sock = listen_sock
        self._upstream = upstream
        self._profiles = dict(profiles)
        self._pcap = pcap
        self._decisions = decision_log
        self._ups: dict[Address, _Upstream] = {}
        # Shared by every socket (each call copies out what it read): bounded, made once.
        self._reader = DatagramReader(_RECV_BATCH, MAX_DATAGRAM)
        self._writer = DatagramWriter(_SEND_BATCH, _SEND_ARENA)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._rebinds = 0
        self._send_errors = {"up": 0, "down": 0}
        self._socket_errors = 0
        self._runner: web.AppRunner | None = None
        self._closed = False
        self.listen_addr: Address = listen_sock.getsockname()
        self.upstream_addr: Address = upstream
        self.control_addr: Address | None = None
        self._loop.add_reader(listen_sock.fileno(), self._on_listen_readable)

    # -- public API ------------------------------------------------------------------------

    @property
    def core(self) -> LinkProxyCore:
        """The sans-I/O core (for inspection; drive it through this handle)."""
        return self._core

    @property
    def profile(self) -> str:
        """The name of the profile in force."""
        return self._core.profile

    @property
    def profiles(self) -> dict[str, LinkParams]:
        """The profiles ``set_profile`` can switch to by name."""
        return dict(self._profiles)

    @property
    def io_path(self) -> str:
        """The socket calls in use, receive/send: ``recvmmsg/sendmmsg+gso`` on Linux,
        ``recvfrom/sendto`` where batched calls are missing (GSO is dropped when refused)."""
        return f"{self._reader.path}/{self._writer.path}"

    def now(self) -> float:
        """The model clock: seconds since the proxy started."""
        return self._clock() - self._t0

    def stats(self) -> ProxyStats:
        """Counters of the whole proxy: per direction and result, clients, shell counters."""
        pcap, log = self._pcap, self._decisions
        return replace(
            self._core.stats(self.now()),
            rebinds=self._rebinds,
            send_errors=dict(self._send_errors),
            socket_errors=self._socket_errors,
            pcap_records=pcap.records if pcap else 0,
            pcap_skipped=pcap.skipped if pcap else 0,
            decision_log_lines=log.lines if log else 0,
            decision_log_skipped=log.skipped if log else 0,
            io=self.io_path,
        )

    def clients(self, limit: int | None = None) -> list[ClientInfo]:
        """The tracked clients, most recently active first, with their upstream source port."""
        infos = self._core.clients(self.now(), limit)
        return [replace(info, upstream_port=self.upstream_port(info.addr)) for info in infos]

    def upstream_port(self, client: Address) -> int | None:
        """The source port the hub currently sees for ``client`` (None before its first packet)."""
        up = self._ups.get(client)
        return up.port if up else None

    def set_profile(self, profile: str | LinkParams) -> str:
        """Switch every link to a named profile (or to explicit parameters, named "custom")."""
        if isinstance(profile, LinkParams):
            name, params = "custom", profile
        else:
            try:
                params = self._profiles[profile]
            except KeyError:
                known = ", ".join(sorted(self._profiles))
                raise ValueError(f"unknown link profile {profile!r} (known: {known})") from None
            name = profile
        now = self.now()
        self._core.set_params(params, now, profile=name)
        self._log_event("profile", now, profile=name)
        return name

    def force_outage(self, seconds: float) -> float:
        """Take every link down now for ``seconds``; returns when it ends (model clock)."""
        now = self.now()
        until = self._core.force_outage(now, seconds)
        self._log_event("outage", now, seconds=seconds, until=until)
        return until

    def rebind(self) -> int:
        """Force a NAT rebinding of every client now; returns how many clients there are."""
        now = self.now()
        n = self._core.rebind(now)
        self._log_event("rebind", now, clients=n)
        return n

    async def close(self) -> None:
        """Stop: close sockets, the control API and the capture files (in-flight data is lost)."""
        if self._closed:
            return
        self._closed = True
        if self._runner is not None:
            await self._runner.cleanup()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for up in self._ups.values():
            self._close_upstream(up)
        self._ups.clear()
        if self._timer is not None:
            self._timer.cancel()
        now = self.now()
        lost = self._core.clear()
        self._log_event("stop", now, in_flight_discarded=lost)
        if self._pcap is not None:
            self._pcap.close()
        if self._decisions is not None:
            self._decisions.close()

    # -- control API ---------------------------------------------------------------------

    async def start_control(self, port: int, host: str = "127.0.0.1") -> Address:
        """Serve the HTTP control API on ``host:port`` (0 = any free port); returns the address."""
        runner = web.AppRunner(control_app(self), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        addresses = runner.addresses  # the bound (host, port), port 0 resolved
        self.control_addr = tuple(addresses[0]) if addresses else (host, port)
        return self.control_addr

    # -- I/O ---------------------------------------------------------------------------------

    def _on_listen_readable(self) -> None:
        sock, core, clock, t0, reader = self._sock, self._core, self._clock, self._t0, self._reader
        for _ in range(_RECV_CALLS):
            try:
                datas, addrs = reader.recv_from(sock)
            except OSError:
                continue
            if not datas:
                break
            now = clock() - t0  # one arrival time per batch: all of it was waiting already
            for k, result in core.offer_up(datas, addrs, now):
                self._record_drop(_UP, addrs[k], datas[k], now, result)
            if len(datas) < reader.batch:
                break  # drained
        self._flush()

    def _on_upstream_readable(self, addr: Address, up: _Upstream) -> None:
        sock, core, clock, t0, reader = up.sock, self._core, self._clock, self._t0, self._reader
        for _ in range(_RECV_CALLS):
            try:
                datas = reader.recv(sock)
            except OSError:  # ICMP port unreachable from the hub and the like
                self._send_errors["up"] += 1
                continue
            if not datas:
                break
            now = clock() - t0
            for k, result in core.offer_down(addr, datas, now):
                self._record_drop(_DOWN, addr, datas[k], now, result)
            if len(datas) < reader.batch:
                break
        self._flush()

    def _record_drop(
        self, direction: Direction, addr: Address, data: bytes, now: float, result: str
    ) -> None:
        """Capture a dropped packet; log the proxy's own drops (the model logs its own)."""
        up = direction is _UP
        if self._pcap is not None:
            src, dst = (addr, self._upstream) if up else (self._upstream, addr)
            self._pcap.write_udp(
                self._wall0 + now, src, dst, data, mark=_PCAP_MARK[result], upstream=up
            )
        if result in ("dropped_clients", "dropped_overflow"):
            self._log_event(
                "proxy_drop",
                now,
                seed=self._core.seed,
                device=self._core.device_for(addr),
                dir=direction.value,
                size=len(data),
                fate=result,
            )

    def _flush(self) -> None:
        """Send everything due, forget idle clients, re-arm the one timer."""
        if self._closed:
            return
        now = self._clock() - self._t0
        runs = self._core.pop_due_runs(now)
        if runs:
            self._send(runs, now)
        for addr in self._core.expire_idle(now):
            up = self._ups.pop(addr, None)
            if up is not None:
                self._close_upstream(up)
        self._arm()

    def _send(self, runs: list[DeliveryRun], now: float) -> None:
        """Up: one batch per client on its upstream socket; down: one batch on the listen socket."""
        ups, writer, errors = self._ups, self._writer, self._send_errors
        down: list[DeliveryRun] = []
        for run in runs:
            direction, addr, epoch, payloads, _ = run
            if direction is not _UP:
                down.append(run)
                continue
            up = ups.get(addr)
            if up is None or up.epoch != epoch:
                up = self._open_upstream(addr, epoch)
                if up is None:
                    continue
            failed = writer.send(up.sock, payloads)
            errors["up"] += len(failed)
            if self._pcap is not None:
                self._capture([run], failed, now)
        if not down:
            return
        if len(down) == 1:
            payloads, dests = down[0][3], [down[0][1]] * len(down[0][3])
        else:
            payloads = [data for run in down for data in run[3]]
            dests = [run[1] for run in down for _ in run[3]]
        failed = writer.send_to(self._sock, payloads, dests)
        errors["down"] += len(failed)
        if self._pcap is not None:
            self._capture(down, failed, now)

    def _capture(self, runs: list[DeliveryRun], failed: list[int], now: float) -> None:
        """Write the datagrams of ``runs`` that went out (all but the ``failed`` indexes)."""
        assert self._pcap is not None
        pcap, hub, ts = self._pcap, self._upstream, self._wall0 + now
        skip = set(failed)
        i = 0
        for direction, addr, _, payloads, corrupt in runs:
            for k, data in enumerate(payloads):
                if i + k in skip:
                    continue
                mark = PcapMark.CORRUPTED if k in corrupt else PcapMark.DELIVERED
                if direction is _UP:
                    pcap.write_udp(ts, addr, hub, data, mark=mark)
                else:
                    pcap.write_udp(ts, hub, addr, data, mark=mark, upstream=False)
            i += len(payloads)

    def _open_upstream(self, addr: Address, epoch: int) -> _Upstream | None:
        """A new NAT binding for ``addr``: a fresh socket (new source port), the old one closed."""
        try:
            sock = socket.socket(_family(self._upstream), socket.SOCK_DGRAM)
        except OSError:
            self._socket_errors += 1
            return None
        try:
            sock.setblocking(False)
            sock.connect(self._upstream)
            port = sock.getsockname()[1]
        except OSError:
            sock.close()
            self._socket_errors += 1
            return None
        up = _Upstream(sock, epoch, port)
        old = self._ups.get(addr)
        self._ups[addr] = up
        self._loop.add_reader(sock.fileno(), self._on_upstream_readable, addr, up)
        if old is not None:  # opened before closing the old one, so the port really is new
            self._close_upstream(old)
            self._rebinds += 1
        return up

    def _close_upstream(self, up: _Upstream) -> None:
        self._loop.remove_reader(up.sock.fileno())
        up.sock.close()

    def _arm(self) -> None:
        """Keep ONE timer, for the earliest deadline; moved only when something is due sooner."""
        at = self._core.get_timer()
        if at is None or (self._timer is not None and self._timer_at <= at):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        delay = max(0.0, self._t0 + at - self._clock())
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._flush()

    def _log_event(self, event: str, now: float, **fields: Any) -> None:
        if self._decisions is not None:
            self._decisions.write({"event": event, "t": now, **fields})


def _family(addr: Address) -> socket.AddressFamily:
    return socket.AF_INET6 if len(addr) == 4 else socket.AF_INET


# -- the control API ---------------------------------------------------------------------


def control_app(proxy: LinkProxy) -> web.Application:
    """The aiohttp application of the control API of ``proxy``."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_ProxyCollector(proxy))

    async def status(request: web.Request) -> web.Response:
        body = proxy.stats().as_dict()
        body["listen"] = device_key(proxy.listen_addr)
        body["upstream"] = device_key(proxy.upstream_addr)
        body["profiles"] = sorted(proxy.profiles)
        body["devices"] = [c.as_dict() for c in proxy.clients(_STATUS_DEVICES)]
        return web.json_response(body)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    async def profile(request: web.Request) -> web.Response:
        body = await _json_body(request)
        name = body.get("profile")
        if not isinstance(name, str):
            raise _bad_request('expected {"profile": "<name>"}')
        try:
            proxy.set_profile(name)
        except ValueError as exc:
            raise _bad_request(str(exc)) from None
        return web.json_response({"profile": name})

    async def outage(request: web.Request) -> web.Response:
        body = await _json_body(request)
        seconds = body.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise _bad_request('expected {"seconds": <number>}')
        try:
            until = proxy.force_outage(float(seconds))
        except ValueError as exc:
            raise _bad_request(str(exc)) from None
        return web.json_response({"seconds": seconds, "until_s": until})

    async def rebind(request: web.Request) -> web.Response:
        return web.json_response({"rebound_clients": proxy.rebind()})

    app = web.Application()
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/profile", profile)
    app.router.add_post("/outage", outage)
    app.router.add_post("/rebind", rebind)
    return app


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise _bad_request("the body is not JSON") from None
    if not isinstance(body, dict):
        raise _bad_request("expected a JSON object")
    return body


class _ProxyCollector:
    """Prometheus metrics of one proxy, read from its counters at scrape time."""

    def __init__(self, proxy: LinkProxy) -> None:
        self._proxy = proxy

    def collect(self) -> Iterable[Metric]:
        stats = self._proxy.stats()
        ways = [(name, stats.direction(name), stats.send_errors[name]) for name in ("up", "down")]
        yield from direction_metrics("squall_link", "packets", "the proxy", ways)
        yield GaugeMetricFamily("squall_link_clients", "Clients tracked now", value=stats.clients)
        yield GaugeMetricFamily(
            "squall_link_pending", "Datagrams in flight inside the proxy", value=stats.pending
        )
        yield CounterMetricFamily(
            "squall_link_rebinds", "NAT rebindings (new upstream source port)", value=stats.rebinds
        )
        yield CounterMetricFamily(
            "squall_link_pcap_skipped",
            "Packets not captured: pcap size limit reached",
            value=stats.pcap_skipped,
        )
        yield CounterMetricFamily(
            "squall_link_decision_log_skipped",
            "Decisions not logged: size limit reached",
            value=stats.decision_log_skipped,
        )
        recv, _, send = stats.io.partition("/")
        io = GaugeMetricFamily(
            "squall_link_io_info", "The socket calls in use (value 1)", labels=["recv", "send"]
        )
        io.add_metric([recv, send], 1)
        yield io


def direction_metrics(
    prefix: str, unit: str, who: str, ways: Iterable[tuple[str, DirectionTally, int]]
) -> list[Metric]:
    """Per-direction families of a link: <unit> by result, bytes, offered bytes, delay, errors.

    ``ways`` holds (direction label, its tally, its send errors); shared by ``squall link``
    (``squall_link_packets``...) and the bridge (``squall_bridge_frames``...).
    """
    results = CounterMetricFamily(
        f"{prefix}_{unit}",
        f"{unit.capitalize()} offered to the link, by direction and result",
        labels=["direction", "result"],
    )
    sent = CounterMetricFamily(
        f"{prefix}_bytes", f"Bytes sent on by {who} (duplicates included)", labels=["direction"]
    )
    offered = CounterMetricFamily(
        f"{prefix}_offered_bytes", "Bytes offered to the link", labels=["direction"]
    )
    delay = HistogramMetricFamily(
        f"{prefix}_delay_seconds",
        f"Time from arrival at {who} to sending on",
        labels=["direction"],
    )
    errors = CounterMetricFamily(
        f"{prefix}_send_errors", f"{unit.capitalize()} {who} failed to send", labels=["direction"]
    )
    bounds = [repr(b) for b in DELAY_BUCKETS] + ["+Inf"]
    for name, tally, n_errors in ways:
        for result, n in tally.packets.items():
            results.add_metric([name, result], n)
        sent.add_metric([name], tally.bytes_out)
        offered.add_metric([name], tally.bytes_in)
        cumulative = list(itertools.accumulate(tally.delay_buckets))
        delay.add_metric([name], list(zip(bounds, cumulative, strict=True)), tally.delay_sum_s)
        errors.add_metric([name], n_errors)
    return [results, sent, offered, delay, errors]


# -- starting ------------------------------------------------------------------------------


async def _resolve(host: str, port: int) -> Address:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {host}")
    return infos[0][4]


def _bind_listen(addr: Address) -> socket.socket:
    sock = socket.socket(_family(addr), socket.SOCK_DGRAM)
    try:
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, _LISTEN_BUFFER_BYTES)
        sock.bind(addr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def start_proxy(
    upstream: tuple[str, int],
    *,
    listen: tuple[str, int] = ("127.0.0.1", 4434),
    profile: str | LinkParams = "lan",
    profiles: Mapping[str, LinkParams] | None = None,
    seed: int = 0,
    limits: ProxyLimits | None = None,
    devices: Mapping[str, str] | None = None,
    control_port: int | None = None,
    pcap: str | Path | None = None,
    pcap_max_bytes: int = DEFAULT_PCAP_MAX_BYTES,
    decision_log: str | Path | None = None,
    decision_log_max_bytes: int = DEFAULT_PCAP_MAX_BYTES,
) -> LinkProxy:
    """Start a proxy on ``listen`` forwarding to ``upstream`` through the link model.

    ``profile`` is a name from ``profiles`` (default: ``config/links.yaml``) or explicit
    parameters. ``control_port``: None = no control API, 0 = any free port (see
    ``control_addr``). ``listen`` port 0 binds any free port (see ``listen_addr``).
    Raises ValueError for an unknown profile or bad limits, OSError when a socket fails.
    """
    if profiles is None:
        from simulator.profiles import load_profiles

        profiles = load_profiles()
    if isinstance(profile, LinkParams):
        name, params = "custom", profile
    elif profile in profiles:
        name, params = profile, profiles[profile]
    else:
        known = ", ".join(sorted(profiles))
        raise ValueError(f"unknown link profile {profile!r} (known: {known})")
    upstream_addr = await _resolve(*upstream)
    listen_addr = await _resolve(*listen)
    log = DecisionLog(decision_log, max_bytes=decision_log_max_bytes) if decision_log else None
    core = LinkProxyCore(
        params,
        profile=name,
        seed=seed,
        limits=limits,
        devices=devices,
        on_decision=log.on_decision if log else None,
    )
    try:
        listen_sock = _bind_listen(listen_addr)
    except BaseException:
        if log is not None:
            log.close()
        raise
    writer = PcapWriter(pcap, max_bytes=pcap_max_bytes) if pcap else None
    proxy = LinkProxy(
        core, listen_sock, upstream_addr, profiles=profiles, pcap=writer, decision_log=log
    )
    if log is not None:
        log.write(
            {
                "event": "start",
                "t": 0.0,
                "wall_time": proxy._wall0,
                "seed": seed,
                "profile": name,
                "params": asdict(params),
                "listen": device_key(proxy.listen_addr),
                "upstream": device_key(upstream_addr),
                "io": proxy.io_path,
            }
        )
    if control_port is not None:
        try:
            await proxy.start_control(control_port)
        except BaseException:
            await proxy.close()
            raise
    return proxy

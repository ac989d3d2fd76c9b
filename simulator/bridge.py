"""The packet-level bridge (``squall link --bridge``): two namespaces joined through the link model.

Any protocol (TCP included) between namespace ``N-a`` and ``N-b`` crosses the same seeded
impairment as the UDP proxy's datagrams. Three parts:

- :class:`BridgePorts` (blocking, at start and stop): the lock, the namespaces and veths
  (:mod:`simulator.netns`) and one AF_PACKET socket bound to each root-side veth.
  Sockets are created listening to nothing (protocol 0), bound to their veth with
  ETH_P_ALL, told to skip the frames this process sends (``PACKET_IGNORE_OUTGOING``;
  ``PACKET_OUTGOING`` frames are also skipped by hand) and drained, all before the links
  come up: nothing from another interface is ever read, and nothing loops.
- :class:`~simulator.bridgecore.BridgeCore` (sans-I/O): the frames' fates.
- :class:`Bridge` (asyncio): reads both sockets in batches, offers frames to the core
  with ``now`` (CLOCK_MONOTONIC seconds since start), sends what is due on the other
  side's socket, keeps ONE timer for the next deadline; optional pcap of both directions
  (raw frames, dropped ones included and marked in the DSCP field as in
  :mod:`simulator.pcap`), a decision log (JSON lines, ``dir`` is ``a_to_b``/``b_to_a``)
  and an HTTP endpoint (``/metrics``, ``/status``, ``POST /outage``).

Limits: ``max_pending`` frames held per direction (see :mod:`simulator.bridgecore`),
socket buffers of 4 MiB (frames the kernel drops when they are full are counted as
``squall_bridge_kernel_drops_total``), pcap and decision-log file sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from simulator.bridgecore import BridgeCore, BridgeStats, Way, mark_frame
from simulator.linkmodel import Decision, DecisionHook, LinkParams
from simulator.netns import (
    DEFAULT_LOCK_DIR,
    DEFAULT_SUBNET,
    IP_UDP_OVERHEAD,
    BridgeBusyError,
    BridgeLock,
    BridgeSetupError,
    Netns,
    Topology,
)
from simulator.pcap import DEFAULT_PCAP_MAX_BYTES, PcapMark, PcapWriter
from simulator.proxy import DecisionLog, decision_record, direction_metrics

__all__ = [
    "Bridge",
    "BridgeConfig",
    "BridgePorts",
    "FramePcapWriter",
    "bridge_app",
    "cleanup_bridge",
    "open_packet_socket",
]

# Linux constants Python 3.11's socket module does not name (linux/if_packet.h).
ETH_P_ALL: Final = 0x0003
SOL_PACKET: Final = 263
PACKET_STATISTICS: Final = 6
PACKET_IGNORE_OUTGOING: Final = 23
PACKET_OUTGOING: Final = 4

_RECV_BATCH: Final = 256  # frames read per readiness callback before yielding to the loop
_RECV_SIZE: Final = 65535
_SOCK_BUFFER_BYTES: Final = 4 << 20  # asked for; the kernel caps it at net.core.*mem_max
_STATS = struct.Struct("=II")  # struct tpacket_stats: packets, drops (reset on read)
_SIDES: Final = ("a", "b")
_SOURCE: Final = {"a": Way.A_TO_B, "b": Way.B_TO_A}  # frames read on a side go this way
_TARGET: Final = {Way.A_TO_B: "b", Way.B_TO_A: "a"}  # ... and are sent on this side
_PCAP_MARK: Final = {
    "dropped_loss": PcapMark.DROPPED_LOSS,
    "dropped_queue": PcapMark.DROPPED_QUEUE,
    "dropped_mtu": PcapMark.DROPPED_MTU,
    "dropped_outage": PcapMark.DROPPED_OUTAGE,
    "dropped_overflow": PcapMark.DROPPED_OVERFLOW,
}


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """Everything a bridge needs; ``params`` is the link profile (``mtu`` = UDP payload)."""

    params: LinkParams
    profile: str = "custom"
    name: str = "sq0"
    subnet: str = DEFAULT_SUBNET
    seed: int = 0
    max_pending: int = 10_000
    pcap: Path | None = None
    pcap_max_bytes: int = DEFAULT_PCAP_MAX_BYTES
    decision_log: Path | None = None
    decision_log_max_bytes: int = DEFAULT_PCAP_MAX_BYTES
    lock_dir: Path = DEFAULT_LOCK_DIR

    def topology(self) -> Topology:
        """The namespaces, addresses and IP MTU (profile mtu + 28); ValueError when invalid."""
        self.params.validate()
        if self.max_pending < 1:
            raise ValueError(f"max_pending: must be >= 1, got {self.max_pending}")
        return Topology.make(self.name, self.subnet, self.params.mtu + IP_UDP_OVERHEAD)


class FramePcapWriter(PcapWriter):
    """A :class:`~simulator.pcap.PcapWriter` recording whole Ethernet frames, IP frames marked."""

    def write_marked(self, ts: float, frame: bytes, mark: int = PcapMark.DELIVERED) -> bool:
        """Record ``frame`` at wall-clock ``ts`` with ``mark``; False when skipped."""
        return self.write_frame(ts, mark_frame(frame, mark) if mark else frame)


def open_packet_socket(ifname: str) -> socket.socket:
    """A non-blocking AF_PACKET socket bound to ``ifname``, seeing only frames that arrive there.

    Created with protocol 0 (it receives nothing until bound), then bound to the interface
    with ETH_P_ALL, then drained: no frame of another interface can be in its queue.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUFFER_BYTES)
        with contextlib.suppress(OSError):  # Linux >= 4.20; PACKET_OUTGOING is skipped anyway
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        sock.bind((ifname, ETH_P_ALL))
        sock.setblocking(False)
        while True:
            try:
                sock.recv(_RECV_SIZE)
            except BlockingIOError:
                break
    except BaseException:
        sock.close()
        raise
    return sock


class BridgePorts:
    """The lock, the namespaces and veths, and the two bound packet sockets of one bridge.

    :meth:`open` takes them in that order and undoes what it did when a step fails;
    :meth:`close` removes only what this object created (never another run's namespaces).
    """

    def __init__(self, topo: Topology, lock_dir: Path = DEFAULT_LOCK_DIR) -> None:
        self.topo = topo
        self.netns = Netns(topo)
        self.lock = BridgeLock(topo.name, lock_dir)
        self.socks: dict[str, socket.socket] = {}
        self._created = False
        self._kernel_drops = {"a": 0, "b": 0}

    def open(self) -> None:
        """Lock, check, create, bind, bring up; BridgeSetupError (or Busy) says what failed."""
        self.lock.acquire()
        try:
            left = self.netns.leftovers()
            if left:
                raise BridgeBusyError(
                    f"bridge {self.topo.name!r} is not running but its {', '.join(left)} "
                    f"exist (a crashed run?): remove them with "
                    f"`squall link --bridge --cleanup --name {self.topo.name}`"
                )
            self.netns.check_subnet()
            self._created = True
            self.netns.create()
            for side, ifname in zip(_SIDES, (self.topo.root_a, self.topo.root_b), strict=True):
                try:
                    self.socks[side] = open_packet_socket(ifname)
                except OSError as exc:
                    raise BridgeSetupError(f"packet socket on {ifname}: {exc}") from exc
            self.netns.bring_up()
        except BaseException:
            self.close()
            raise

    def kernel_drops(self) -> dict[str, int]:
        """Frames the kernel dropped per side because a socket buffer was full (cumulative)."""
        for side, sock in self.socks.items():
            with contextlib.suppress(OSError):
                raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS.size)
                self._kernel_drops[side] += _STATS.unpack(raw)[1]
        return dict(self._kernel_drops)

    def close(self) -> list[str]:
        """Close the sockets, remove the namespaces and veths, release the lock."""
        self.kernel_drops()
        for sock in self.socks.values():
            sock.close()
        self.socks.clear()
        removed: list[str] = []
        try:
            if self._created:
                removed = self.netns.remove()
                self._created = False
        finally:
            self.lock.release()
        return removed


def cleanup_bridge(name: str, lock_dir: Path = DEFAULT_LOCK_DIR) -> list[str]:
    """Remove what a crashed bridge called ``name`` left; BridgeBusyError if it still runs."""
    topo = Topology.make(name, DEFAULT_SUBNET, 1500)
    lock = BridgeLock(name, lock_dir)
    lock.acquire()
    try:
        return Netns(topo).remove()
    finally:
        lock.release()


class Bridge:
    """A running bridge over open :class:`BridgePorts`; :meth:`close` stops it (ports stay)."""

    def __init__(
        self,
        core: BridgeCore,
        ports: BridgePorts,
        *,
        pcap: FramePcapWriter | None = None,
        decision_log: DecisionLog | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._clock = time.monotonic
        self._t0 = self._clock()
        self._wall0 = time.time()
        self._core = core
        self._ports = ports
        self._socks = dict(ports.socks)
        self._pcap = pcap
        self._decisions = decision_log
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._send_errors = {way.value: 0 for way in Way}
        self._runner: web.AppRunner | None = None
        self._closed = False
        self.metrics_addr: tuple[str, int] | None = None
        for side, sock in self._socks.items():
            self._loop.add_reader(sock.fileno(), self._on_readable, side)
        self._log_event(
            "start",
            0.0,
            wall_time=self._wall0,
            seed=core.seed,
            name=core.name,
            profile=core.profile,
            frame_params=asdict(core.link.params),
        )

    @classmethod
    def start(cls, config: BridgeConfig, ports: BridgePorts) -> Bridge:
        """A bridge applying ``config`` over ``ports`` (opened); call from the event loop."""
        log = None
        if config.decision_log is not None:
            log = DecisionLog(config.decision_log, max_bytes=config.decision_log_max_bytes)
        core = BridgeCore(
            config.params,
            name=config.name,
            seed=config.seed,
            profile=config.profile,
            max_pending=config.max_pending,
            on_decision=_decision_hook(log) if log else None,
        )
        pcap = None
        if config.pcap is not None:
            pcap = FramePcapWriter(config.pcap, max_bytes=config.pcap_max_bytes)
        return cls(core, ports, pcap=pcap, decision_log=log)

    @property
    def core(self) -> BridgeCore:
        """The sans-I/O core (for inspection)."""
        return self._core

    @property
    def topology(self) -> Topology:
        """Names and addresses of the namespaces."""
        return self._ports.topo

    def now(self) -> float:
        """The model clock: seconds since the bridge started."""
        return self._clock() - self._t0

    def stats(self) -> BridgeStats:
        """Counters of both directions and of the shell."""
        pcap, log = self._pcap, self._decisions
        return replace(
            self._core.stats(self.now()),
            send_errors=dict(self._send_errors),
            kernel_drops=self._ports.kernel_drops(),
            pcap_records=pcap.records if pcap else 0,
            pcap_skipped=pcap.skipped if pcap else 0,
            decision_log_lines=log.lines if log else 0,
            decision_log_skipped=log.skipped if log else 0,
        )

    def force_outage(self, seconds: float) -> float:
        """Drop every IP frame both ways for ``seconds`` from now; returns the end (model clock)."""
        now = self.now()
        self._core.force_outage(now, seconds)
        self._log_event("outage", now, seconds=seconds)
        return now + seconds

    async def start_metrics(self, host: str, port: int) -> tuple[str, int]:
        """Serve ``/metrics``, ``/status`` and ``POST /outage`` on ``host:port`` (0 = any)."""
        runner = web.AppRunner(bridge_app(self), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0] if runner.addresses else (host, port)
        self.metrics_addr = (str(bound[0]), int(bound[1]))
        return self.metrics_addr

    async def close(self) -> None:
        """Stop reading and sending, close the HTTP endpoint and the capture files."""
        if self._closed:
            return
        self._closed = True
        if self._runner is not None:
            await self._runner.cleanup()
        for sock in self._socks.values():
            self._loop.remove_reader(sock.fileno())
        if self._timer is not None:
            self._timer.cancel()
        lost = self._core.clear()
        self._log_event("stop", self.now(), in_flight_discarded=lost)
        if self._pcap is not None:
            self._pcap.close()
        if self._decisions is not None:
            self._decisions.close()

    # -- I/O ---------------------------------------------------------------------------------

    def _on_readable(self, side: str) -> None:
        sock, core, clock, t0 = self._socks[side], self._core, self._clock, self._t0
        way = _SOURCE[side]
        for _ in range(_RECV_BATCH):
            try:
                frame, addr = sock.recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            if addr[2] == PACKET_OUTGOING:  # our own sends, if the kernel did not skip them
                continue
            now = clock() - t0
            result = core.offer(way, frame, now)
            if self._pcap is not None and result.startswith("dropped_"):
                self._pcap.write_marked(self._wall0 + now, frame, _PCAP_MARK[result])
        self._flush()

    def _flush(self) -> None:
        """Send everything due, re-arm the one timer."""
        if self._closed:
            return
        now = self._clock() - self._t0
        pcap, errors = self._pcap, self._send_errors
        for way, frame, corrupt in self._core.pop_due(now):
            try:
                self._socks[_TARGET[way]].send(frame)
            except OSError:  # ENOBUFS, a link gone down: counted, the frame is lost
                errors[way.value] += 1
                continue
            if pcap is not None:
                mark = PcapMark.CORRUPTED if corrupt else PcapMark.DELIVERED
                pcap.write_marked(self._wall0 + now, frame, mark)
        self._arm()

    def _arm(self) -> None:
        """Keep ONE timer, for the earliest deadline; moved only when something is due sooner."""
        at = self._core.get_timer()
        if at is None or (self._timer is not None and self._timer_at <= at):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_later(max(0.0, self._t0 + at - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._flush()

    def _log_event(self, event: str, now: float, **fields: Any) -> None:
        if self._decisions is not None:
            self._decisions.write({"event": event, "t": now, **fields})


def _decision_hook(log: DecisionLog) -> DecisionHook:
    def on_decision(decision: Decision) -> None:
        record = decision_record(decision)
        record["dir"] = "a_to_b" if decision.direction.value == "up" else "b_to_a"
        log.write(record)

    return on_decision


# -- HTTP: metrics, status, outage --------------------------------------------------------


class _BridgeCollector:
    """Prometheus metrics of one bridge, read from its counters at scrape time."""

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    def collect(self) -> Iterable[Metric]:
        stats = self._bridge.stats()
        ways = [(w.value, stats.way(w), stats.send_errors[w.value]) for w in Way]
        yield from direction_metrics("squall_bridge", "frames", "the bridge", ways)
        pending = GaugeMetricFamily(
            "squall_bridge_pending", "Frames held in the bridge now", labels=["direction"]
        )
        for way in Way:
            pending.add_metric([way.value], stats.pending[way.value])
        kernel = CounterMetricFamily(
            "squall_bridge_kernel_drops",
            "Frames the kernel dropped before the bridge read them (socket buffer full)",
            labels=["side"],
        )
        for side, n in stats.kernel_drops.items():
            kernel.add_metric([side], n)
        yield from (pending, kernel)
        yield CounterMetricFamily(
            "squall_bridge_pcap_skipped",
            "Frames not captured: pcap size limit reached",
            value=stats.pcap_skipped,
        )
        yield CounterMetricFamily(
            "squall_bridge_decision_log_skipped",
            "Decisions not logged: size limit reached",
            value=stats.decision_log_skipped,
        )


def bridge_app(bridge: Bridge) -> web.Application:
    """The aiohttp application: ``GET /metrics``, ``GET /status``, ``POST /outage``."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_BridgeCollector(bridge))

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    async def status(request: web.Request) -> web.Response:
        body = bridge.stats().as_dict()
        topo = bridge.topology
        body["namespaces"] = {"a": topo.ns_a, "b": topo.ns_b}
        body["addresses"] = {"a": str(topo.addr_a), "b": str(topo.addr_b)}
        body["ip_mtu"] = topo.ip_mtu
        return web.json_response(body)

    async def outage(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        seconds = body.get("seconds") if isinstance(body, dict) else None
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise _bad_request('expected {"seconds": <number>}')
        try:
            until = bridge.force_outage(float(seconds))
        except ValueError as exc:
            raise _bad_request(str(exc)) from None
        return web.json_response({"seconds": seconds, "until_s": until})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    app.router.add_post("/outage", outage)
    return app


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")

"""``squall fleet --virtual``: hours of a fleet's life in minutes, the same report for a seed.

The real cores of both ends -- edge spool (SQLite), sender session, aioquic connections
through their socket-free API, hub sessions, dedup ledgers, group commit, SQLite log,
presence -- driven by a discrete-event clock (``simulator.vclock``) through one seeded
link model per device and direction (``simulator.vnet``).  Nothing sleeps and nothing
reads a real clock: the run is a function of its configuration and seed, so the JSON
report (counts, latencies in simulated time, per-device results) is bit-identical from
run to run, apart from ``wall_s`` and ``speedup``.  A failure found here is a
reproducible bug report.

Faults: an edge crash kills one agent right after its next sample is staged (so what
``durability: batch`` loses -- the records not yet group-committed -- is exercised every
time), and reboots it ``down_s`` later on the same spool.  A hub crash kills the hub
right after a session hands it a batch (so an uncommitted group is lost every time) and
restarts it on the same log ``down_s`` later; the edges find out and reconnect.  Only
accepted records count: each must reach the durable consumer exactly once.

Two cores (``processes``, default 2): the devices are dealt out to forked worker
processes and every process runs its share in lockstep windows as long as the link's
least one-way delay (``simulator.vparallel``).  The report is the same for the same seed
and process count, and the run ends at the poll a one-process run ends at, record for
record and hub packet for hub packet the same; only the workers' devices run on to the end
of their last window (a few uplink packets more, and the event count).

What differs from the real world, on purpose: the process crash drops memory only (no
power cut: a batch-durable spool keeps every commit); the work directory defaults to a
tmpfs, because the checkpoints' fsyncs would otherwise cost more than all the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

from simulator.linkmodel import DirectionStats, LinkParams, derive_seed
from simulator.profiles import DEFAULT_PROFILES_PATH, get_profile
from simulator.telemetry import Drive
from simulator.vclock import EventQueue, Kind, TimerSlot, datetime_clock
from simulator.vedge import EdgeCounters, EdgeSettings, VirtualEdge
from simulator.vehicle import FAULT_CODES
from simulator.vhub import HubSettings, VirtualHub
from simulator.vnet import DevicePath, NetCounters, VirtualNetwork
from simulator.vparallel import (
    MIN_LOOKAHEAD_S,
    PIPELINE_DEPTH,
    CausalityError,
    Workers,
    assign_ranks,
    lookahead_s,
)
from simulator.vpki import VirtualPki
from simulator.vreport import (
    DeliverySink,
    DeviceOutcome,
    check_device,
    direction_totals,
    latency_summary,
)
from transport.configload import build, load_yaml
from transport.errors import ConfigError, SpoolFullError, SquallError
from transport.wire import LANES, Lane

HUB_CRASH_GRACE_S: Final = 30.0  # a hub crash waits this long at most for a batch to lose
MAX_PROCESSES: Final = 64
_PROGRESS_EVERY_S: Final = 300.0


@dataclass(slots=True)
class EdgeCrash:
    """Kill device ``device`` (index) right after its first sample at or after ``at_s``."""

    at_s: float
    device: int = 0
    down_s: float = 30.0


@dataclass(slots=True)
class HubCrash:
    """Kill the hub right after its first accepted batch at or after ``at_s``."""

    at_s: float
    down_s: float = 10.0


@dataclass(slots=True)
class VirtualFleetConfig:
    """Everything a virtual run depends on (with the seed, it fixes the report)."""

    devices: int = 100
    rate: float = 1.0  # GPS samples per second per vehicle (faults and log lines come on top)
    duration_s: float = 3600.0  # simulated seconds of driving
    drain_s: float = 600.0  # then at most this long for the spools to empty
    profile: str = "3g-poor"
    seed: int = 1
    tenant: str = "acme"
    # the durable consumer reads the log this often: in small steps, so that no moment of
    # the run carries a big read (a split run waits for its slowest process at each window)
    consumer_poll_s: float = 0.25
    outage_at_s: float = 0.0  # one forced outage of every link (0 s long: none)
    outage_s: float = 0.0
    edge_crashes: list[EdgeCrash] = field(default_factory=list)
    hub_crashes: list[HubCrash] = field(default_factory=list)
    edge: EdgeSettings = field(default_factory=EdgeSettings)
    hub: HubSettings = field(default_factory=HubSettings)
    # Processes to split the run over (``simulator.vparallel``): 1 runs everything here.
    # A profile whose least one-way delay is under 5 ms runs in one process regardless.
    processes: int = 2

    def validate(self) -> None:
        """Raise ValueError naming the setting when the run cannot make sense."""
        if self.devices < 1 or self.rate <= 0 or self.duration_s <= 0:
            raise ValueError("devices, rate and duration must be positive")
        if not 1 <= self.processes <= MAX_PROCESSES:
            raise ValueError(f"processes: expected 1..{MAX_PROCESSES}, got {self.processes}")
        if self.drain_s < 0 or self.consumer_poll_s <= 0 or self.outage_s < 0:
            raise ValueError("drain and outage must be >= 0, consumer_poll_s > 0")
        for c in self.edge_crashes:
            if not 0 <= c.device < self.devices:
                raise ValueError(f"edge crash: no device {c.device} (0..{self.devices - 1})")
            self._check_fault("edge crash", c.at_s, c.down_s)
        for h in self.hub_crashes:
            self._check_fault("hub crash", h.at_s, h.down_s)

    def _check_fault(self, what: str, at_s: float, down_s: float) -> None:
        if not (0 < at_s < self.duration_s and down_s > 0):
            raise ValueError(f"{what} at {at_s} s for {down_s} s: must start while vehicles drive")


def load_virtual_config(path: str | Path) -> VirtualFleetConfig:
    """A virtual run's settings from YAML (the keys of ``VirtualFleetConfig``, strictly)."""
    return build(VirtualFleetConfig, load_yaml(path), path=str(path))


class Vehicle:
    """What one simulated vehicle produces at each sample (its own seeded randomness)."""

    FAULT_P: Final = 0.002  # a fault code on the critical lane
    LOG_P: Final = 0.05  # an sshd line on the bulk lane (every sample when attacked)

    def __init__(self, rng: random.Random, attacked: bool) -> None:
        self.rng = rng
        self.car = Drive(rng)
        self.attacked = attacked

    def sample(self) -> list[tuple[Lane, str, Any, dict[str, Any]]]:
        """(lane, subject suffix, body, attrs) of each record of the next sample."""
        rng = self.rng
        out: list[tuple[Lane, str, Any, dict[str, Any]]] = [
            (Lane.TELEMETRY, "telemetry.gps", self.car.step(), {"unit": "si"})
        ]
        roll = rng.random()
        if roll < self.FAULT_P:
            code = rng.choice(FAULT_CODES)
            out.append((Lane.CRITICAL, "fault", {"code": code}, {"severity": 2}))
        elif roll < self.LOG_P or self.attacked:
            if self.attacked:
                line = f"Failed password for root from 203.0.113.{rng.randint(1, 254)} port 22"
                attrs: dict[str, Any] = {"severity": 4, "app": "sshd"}
            else:
                line, attrs = "session opened for user ubuntu", {"severity": 6, "app": "sshd"}
            out.append((Lane.BULK, "log.auth", line, attrs))
        return out


@dataclass(slots=True)
class _DeviceResult:
    """What the report needs of one device, from whichever process ran it (picklable)."""

    index: int
    name: str
    sent: int
    refused: int
    accepted: dict[int, list[int]]
    evicted: dict[str, int]
    counters: EdgeCounters
    held: set[tuple[int, int]]  # (incarnation, seq) still in the spool at the end
    up: DirectionStats
    down: DirectionStats
    timer_nudges: int


@dataclass(slots=True)
class _RankResult:
    """A worker's share of the report, sent to rank 0 at the end (picklable)."""

    devices: list[_DeviceResult]
    events: int
    network: NetCounters
    faults: list[dict[str, Any]]
    cpu_s: float


@dataclass(eq=False, slots=True)
class _Device:
    path: DevicePath
    edge: VirtualEdge
    vehicle: Vehicle
    phase: float  # first sample time; then every 1/rate s
    samples: int = 0
    sent: int = 0
    refused: int = 0
    timer: TimerSlot = field(default_factory=TimerSlot)
    crash_down_s: float | None = None


class VirtualFleet:
    """One virtual-time run: build it, ``run()`` it, read the report it returns."""

    def __init__(
        self,
        config: VirtualFleetConfig,
        workdir: Path,
        *,
        profiles_path: str | Path = DEFAULT_PROFILES_PATH,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        config.validate()
        self.cfg = config
        self.workdir = Path(workdir)
        self.progress = progress
        self.params: LinkParams = get_profile(config.profile, profiles_path)
        self.queue = EventQueue()
        self.clock = datetime_clock(self.queue)
        names = [f"truck-{i:03d}" for i in range(config.devices)]
        self.net = VirtualNetwork(self.queue, lambda i, n: self.params, names, config.seed)
        # A split run (simulator.vparallel): windows as long as the least link delay.
        self.lookahead = lookahead_s(self.params)
        self.processes = config.processes if self.lookahead >= MIN_LOOKAHEAD_S else 1
        self.processes = min(self.processes, config.devices)
        self.rank = 0
        for path, owner in zip(
            self.net.paths, assign_ranks(config.devices, self.processes), strict=True
        ):
            path.owner = owner
        self._up_out: list[tuple[float, int, tuple[bytes, Any]]] = []  # worker -> hub
        self._down_out: dict[int, list[tuple[float, int, bytes, Any]]] = {}  # hub -> rank
        self._remote_status: dict[int, tuple[bool, int, int] | None] = {}  # for progress
        # The end of a split run: a worker's devices drained or not at each of rank 0's
        # consumer polls from the drive's end on (the n-th after it: the same float sums
        # give the same times), and how many of each worker's windows rank 0 has taken.
        self._polls: list[bool] = []  # a worker's, of its current window
        self._remote_polls: dict[int, list[bool]] = {}
        self._polls_at_end = 0  # rank 0's consumer polls from the drive's end on
        self._windows_in: dict[int, int] = {}
        self._workers: Workers | None = None
        self.pki = VirtualPki()
        self.sink = DeliverySink()
        self.faults: list[dict[str, Any]] = []
        self.hub_totals: Counter[str] = Counter()
        self.harness: Counter[str] = Counter()  # the simulator's own interventions
        self.hub: VirtualHub | None = None
        self._hub_timer = TimerSlot()
        self._hub_crash_down_s: float | None = None
        self._period = 1.0 / config.rate
        self._done = False
        self._next_progress = _PROGRESS_EVERY_S
        self.devices = self._make_devices(names)
        self._handlers: dict[Kind, Callable[[Any, Any], None]] = {
            Kind.PUBLISH: self._on_sample,
            Kind.TO_HUB: self._on_to_hub,
            Kind.TO_EDGE: self._on_to_edge,
            Kind.EDGE_TIMER: self._on_edge_timer,
            Kind.HUB_TIMER: self._on_hub_timer,
            Kind.FAULT: self._on_fault,
            Kind.CONSUMER: self._on_consumer,
        }

    def _make_devices(self, names: list[str]) -> list[_Device]:
        cfg = self.cfg
        pick = random.Random(derive_seed(cfg.seed, "fleet", "workload", "attacked"))
        attacked = set(pick.sample(range(cfg.devices), k=max(1, cfg.devices // 25)))
        spools = self.workdir / "spools"
        spools.mkdir(parents=True, exist_ok=True)
        out = []
        for i, name in enumerate(names):
            rng = random.Random(derive_seed(cfg.seed, name, "workload", "drive"))
            edge = VirtualEdge(
                name,
                cfg.tenant,
                self.pki.device(cfg.tenant, name),
                spools / f"{name}.db",
                cfg.edge,
                cfg.seed,
            )
            phase = rng.uniform(0.0, self._period)
            out.append(_Device(self.net.paths[i], edge, Vehicle(rng, i in attacked), phase))
        return out

    # -- the run -------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Simulate until every spool is empty after the drive (or the drain runs out)."""
        started = time.perf_counter()
        # A run allocates millions of short-lived objects (packets, frames, records) and
        # few cycles: the cyclic collector's youngest generation is collected every 20,000
        # allocations (Python's default: 700), and what exists now (certificates,
        # configuration) is left out of its scans.  ~4% of the CPU.
        thresholds = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        try:
            if self.processes > 1:
                return self._run_split(started)
            self._start()
            self._run_events(math.inf)
            if not self._done:
                self.queue.now = self._end
            results = self._finish()
            return self._report(results, [], time.perf_counter() - started)
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()

    @property
    def _end(self) -> float:
        return self.cfg.duration_s + self.cfg.drain_s

    def _run_events(self, before: float) -> None:
        """Run the queue's events due before ``before`` (and by the end), until done."""
        q, handlers, end = self.queue, self._handlers, self._end
        while not self._done:
            t = q.peek_time()
            if t is None or t >= before or t > end:
                return
            ev = q.pop()
            assert ev is not None
            handlers[ev[2]](ev[3], ev[4])

    def _local(self, dev: _Device) -> bool:
        return dev.path.owner == self.rank

    def _start(self) -> None:
        cfg, q = self.cfg, self.queue
        if self.rank == 0:
            self._start_hub()
        for dev in self.devices:
            if self._local(dev):
                dev.edge.boot(0.0)
                self._flush_edge(dev)
                q.at(dev.phase, Kind.PUBLISH, dev)
        for crash in cfg.edge_crashes:
            if self._local(self.devices[crash.device]):
                q.at(crash.at_s, Kind.FAULT, None, ("edge-crash", crash))
        if cfg.outage_s > 0:
            q.at(cfg.outage_at_s, Kind.FAULT, None, ("outage", cfg.outage_s))
        if self.rank == 0:
            for hub_crash in cfg.hub_crashes:
                q.at(hub_crash.at_s, Kind.FAULT, None, ("hub-crash", hub_crash))
            q.at(cfg.consumer_poll_s, Kind.CONSUMER)
        else:  # a worker notes its devices' state at rank 0's polls that may end the run
            t = cfg.consumer_poll_s
            while t < cfg.duration_s:
                t += cfg.consumer_poll_s  # rank 0's sums: its polls come at these very times
            q.at(t, Kind.CONSUMER)

    # -- a split run (simulator.vparallel) ------------------------------------------

    def _run_split(self, started: float) -> dict[str, Any]:
        """Rank 0's side: the hub and its devices, in windows with the workers."""
        workers = self._workers = Workers(self.processes, self._work)
        try:
            self.net.remote_down = self._to_remote_device
            ranks = range(1, self.processes)
            self._down_out = {r: [] for r in ranks}
            self._remote_status = {r: None for r in ranks}
            self._remote_polls = {r: [] for r in ranks}
            self._windows_in = dict.fromkeys(ranks, 0)
            self._start()
            width = self.lookahead / PIPELINE_DEPTH
            k = 0
            while True:
                for r in ranks:  # (a poll that may end the run can have taken it already)
                    while self._windows_in[r] <= k - PIPELINE_DEPTH:
                        self._take_window(r)
                before = (k + 1) * width
                self._run_events(before)
                if self._done or before > self._end:
                    break
                for r, out in self._down_out.items():
                    workers.send(r, out)
                    self._down_out[r] = []
                k += 1
            if not self._done:
                self.queue.now = self._end
            results = self._finish()
            for r in ranks:  # with what the hub sent in its last window: the fates count
                workers.send(r, ("finish", self.queue.now, self._down_out[r]))
            remote: list[_RankResult] = []
            for r in range(1, self.processes):
                msg = workers.recv(r)
                while not isinstance(msg, _RankResult):  # windows it ran ahead
                    msg = workers.recv(r)
                remote.append(msg)
        except BaseException:
            workers.close(kill=True)
            raise
        workers.close()
        return self._report(results, remote, time.perf_counter() - started)

    def _take_window(self, rank: int) -> None:
        """Worker ``rank``'s next window: its datagrams join the queue, its polls are noted.

        Window ``i`` of a worker is due at the start of rank 0's window
        ``i + PIPELINE_DEPTH`` (its datagrams arrive no sooner); a poll that may end the
        run takes it sooner.
        """
        assert self._workers is not None
        i = self._windows_in[rank]
        up, status, polls = self._workers.recv(rank)
        self._windows_in[rank] = i + 1
        start = (i + PIPELINE_DEPTH) * (self.lookahead / PIPELINE_DEPTH)
        if status is not None:
            self._remote_status[rank] = status
        self._remote_polls[rank].extend(polls)
        paths, q = self.net.paths, self.queue
        for t, index, payload in up:
            if t < start:
                raise CausalityError(paths[index].name, t, start)
            q.at(t, Kind.TO_HUB, paths[index], payload)

    def _to_remote_device(self, now: float, path: DevicePath, data: bytes, addr: Any) -> None:
        self._down_out[path.owner].append((now, path.index, data, addr))

    def _to_remote_hub(self, t: float, path: DevicePath, payload: tuple[bytes, Any]) -> None:
        self._up_out.append((t, path.index, payload))

    def _work(self, rank: int, link: Connection) -> None:
        """A worker's whole run: its devices, in windows with rank 0, then its results.

        Window ``k`` runs once rank 0's window ``k - PIPELINE_DEPTH`` is in: what the hub
        sent then arrives no sooner than the lookahead later, at window ``k``'s start.
        """
        self.rank = rank
        self.net.remote_up = self._to_remote_hub
        self._start()
        width = self.lookahead / PIPELINE_DEPTH
        paths = self.net.paths
        k = 0
        while True:
            if k >= PIPELINE_DEPTH:
                msg = link.recv()
                if isinstance(msg, tuple):  # ("finish", now, what the hub sent last)
                    break
                start = k * width
                for sent, index, data, addr in msg:
                    self.net.down_from_hub(paths[index], data, addr, sent, not_before=start)
            before = (k + 1) * width
            self._run_events(before)
            status = self._status() if self._want_status(before, width) else None
            link.send((self._up_out, status, self._polls))
            self._up_out, self._polls = [], []
            k += 1
        for sent, index, data, addr in msg[2]:  # their fates, as a one-process run counts
            self.net.down_from_hub(paths[index], data, addr, sent)
        self.queue.now = max(self.queue.now, msg[1])
        link.send(
            _RankResult(
                self._finish(),
                self.queue.processed,
                self.net.counters,
                self.faults,
                time.process_time(),
            )
        )

    def _want_status(self, before: float, width: float) -> bool:
        """Whether rank 0 needs this worker's counts as of ``before`` for a progress line."""
        every = _PROGRESS_EVERY_S
        return self.progress is not None and before // every != (before - width) // every

    def _status(self) -> tuple[bool, int, int]:
        """(every spool empty, records accepted, records spooled) of this rank's devices."""
        mine = [d for d in self.devices if self._local(d)]
        drained = all(d.edge.up and d.edge.spooled() == 0 for d in mine)
        accepted = sum(len(s) for d in mine for s in d.edge.accepted.values())
        spooled = sum(d.edge.spooled() for d in mine if d.edge.up)
        return drained, accepted, spooled

    def _start_hub(self) -> None:
        now = self.queue.now
        self.hub = VirtualHub(self.pki.hub, self.workdir / "hub.db", self.cfg.hub, self.clock, now)
        self.harness["timer_nudges"] += self._hub_timer.nudges
        self._hub_timer = TimerSlot()
        self._arm_hub()

    # -- event handlers -----------------------------------------------------------

    def _on_sample(self, dev: _Device, _: Any) -> None:
        now = self.queue.now
        edge = dev.edge
        if edge.up:
            for lane, suffix, body, attrs in dev.vehicle.sample():
                dev.sent += 1
                try:
                    edge.publish(now, lane, suffix, body, attrs)
                except SpoolFullError:
                    dev.refused += 1
            if dev.crash_down_s is not None:
                self._crash_edge(dev, dev.crash_down_s)
            else:
                self._flush_edge(dev, touched=False)  # staged only: the commit comes later
        dev.samples += 1
        t = dev.phase + dev.samples * self._period
        if t < self.cfg.duration_s:
            self.queue.at(t, Kind.PUBLISH, dev)

    def _on_to_hub(self, path: DevicePath, payload: tuple[bytes, Any]) -> None:
        hub = self.hub
        if hub is None:
            self.net.counters.hub_down += 1
            return
        hub.receive(payload[0], payload[1], self.queue.now)
        if self._hub_crash_down_s is not None and len(hub.group):
            self._crash_hub(self._hub_crash_down_s)
            return
        self._flush_hub()

    def _on_to_edge(self, path: DevicePath, payload: tuple[bytes, int]) -> None:
        now = self.queue.now
        dev = self.devices[path.index]
        port = path.socket_port(payload[1], now)
        if port is None:
            self.net.counters.nat_expired += 1
        elif not dev.edge.receive(payload[0], port, now):
            self.net.counters.port_closed += 1
        else:
            self._flush_edge(dev)

    def _on_edge_timer(self, dev: _Device, _: Any) -> None:
        now = self.queue.now
        if dev.timer.fire(now):
            self._flush_edge(dev, dev.edge.handle_timer(now))

    def _on_hub_timer(self, hub: VirtualHub, _: Any) -> None:
        now = self.queue.now
        if hub is self.hub and self._hub_timer.fire(now):
            hub.handle_timer(now)
            self._flush_hub()

    def _on_fault(self, _: Any, payload: tuple[str, Any]) -> None:
        kind, arg = payload
        if kind == "edge-crash":
            self.devices[arg.device].crash_down_s = arg.down_s
        elif kind == "edge-boot":
            index, record = arg
            dev = self.devices[index]
            dev.edge.boot(self.queue.now)
            record["restarted_at_s"] = round(self.queue.now, 6)
            self._flush_edge(dev)
        elif kind == "hub-crash":
            self._hub_crash_down_s = arg.down_s
            self.queue.at(self.queue.now + HUB_CRASH_GRACE_S, Kind.FAULT, None, ("hub-kill", arg))
        elif kind == "hub-kill" and self._hub_crash_down_s is not None and self.hub is not None:
            self._crash_hub(self._hub_crash_down_s)  # no batch came in the grace period
        elif kind == "hub-boot":
            self._start_hub()
            arg["restarted_at_s"] = round(self.queue.now, 6)
        elif kind == "outage":
            for path in self.net.paths:
                if path.owner == self.rank:
                    path.link.force_outage(self.queue.now, arg)

    def _on_consumer(self, _: Any, __: Any) -> None:
        now = self.queue.now
        if self.rank != 0:  # a worker: are its devices drained at this poll of rank 0's?
            self._polls.append(self._status()[0])
            self.queue.at(now + self.cfg.consumer_poll_s, Kind.CONSUMER)
            return
        at_end = now >= self.cfg.duration_s
        n = self._polls_at_end  # (counted while the hub is down too: workers count them)
        self._polls_at_end += 1 if at_end else 0
        if self.hub is not None:
            self.hub.poll_consumer(self.sink.take)
            if at_end and self._drained(n):
                self._done = True
                return
        if self.progress is not None and now >= self._next_progress:
            self._next_progress += _PROGRESS_EVERY_S
            self.progress(self._progress_line(now))
        self.queue.at(now + self.cfg.consumer_poll_s, Kind.CONSUMER)

    # -- faults ---------------------------------------------------------------------

    def _crash_edge(self, dev: _Device, down_s: float) -> None:
        now = self.queue.now
        dev.crash_down_s = None
        lost = dev.edge.crash()
        dev.timer.armed = None
        record = {
            "kind": "edge-crash",
            "device": dev.path.name,
            "at_s": round(now, 6),
            "down_s": down_s,
            "unaccepted_records": lost,
        }
        self.faults.append(record)
        self.queue.at(now + down_s, Kind.FAULT, None, ("edge-boot", (dev.path.index, record)))

    def _crash_hub(self, down_s: float) -> None:
        hub = self.hub
        assert hub is not None
        now = self.queue.now
        self._hub_crash_down_s = None
        batches, records = hub.crash()
        self.hub_totals.update(hub.totals())
        self.hub = None
        record = {
            "kind": "hub-crash",
            "at_s": round(now, 6),
            "down_s": down_s,
            "uncommitted_batches": batches,
            "uncommitted_records": records,
        }
        self.faults.append(record)
        self.queue.at(now + down_s, Kind.FAULT, None, ("hub-boot", record))

    # -- pumping ------------------------------------------------------------------------

    def _flush_edge(self, dev: _Device, touched: bool = True) -> None:
        now = self.queue.now
        for data, port in dev.edge.datagrams(now, touched):
            self.net.send_up(dev.path, data, port, now)
        dev.timer.arm(self.queue, dev.edge.get_timer(), Kind.EDGE_TIMER, dev)

    def _flush_hub(self) -> None:
        hub = self.hub
        assert hub is not None
        now = self.queue.now
        for data, addr in hub.datagrams(now):
            self.net.send_down(data, addr, now)
        self._arm_hub()

    def _arm_hub(self) -> None:
        hub = self.hub
        assert hub is not None
        self._hub_timer.arm(self.queue, hub.get_timer(), Kind.HUB_TIMER, hub)

    # -- the end ---------------------------------------------------------------------------

    def _drained(self, n: int) -> bool:
        """Every device drained at this poll, rank 0's ``n``-th from the drive's end on.

        A worker's state at the poll's own time, not at its last window's end: the run
        ends at the poll a one-process run ends at.  Rank 0 takes the worker's windows up
        to this time, sooner than the pipeline would (they were sent, see ``_work``).
        """
        if self._hub_crash_down_s is not None or not self._status()[0]:
            return False
        for r, polls in self._remote_polls.items():
            while len(polls) <= n:
                self._take_window(r)
            if not polls[n]:
                return False
        return True

    def _progress_line(self, now: float) -> str:
        _, accepted, spooled = self._status()
        for status in self._remote_status.values():
            if status is not None:
                accepted += status[1]
                spooled += status[2]
        online = self.hub.presence.counts()["online"] if self.hub is not None else 0
        return (
            f"  t={now:7.0f}s  accepted {accepted:8d}  delivered "
            f"{sum(len(c) for c in self.sink.copies.values()):8d}  in spools {spooled:6d}"
            f"  online {online:3d}/{len(self.devices)}"
        )

    def _finish(self) -> list[_DeviceResult]:
        """Last consumer pass, what each spool still holds, then a clean stop of everyone
        (of this rank: the hub in rank 0, and the devices the rank runs)."""
        now = self.queue.now
        hub = None
        if self.rank == 0:
            if self.hub is None:
                self._start_hub()
            hub = self.hub
            assert hub is not None
            hub.commit_open_group(now)
            hub.poll_consumer(self.sink.take)
        results = [self._close_device(dev, now) for dev in self.devices if self._local(dev)]
        if hub is not None:
            self.hub_totals.update(hub.totals())
            hub.close(now)
        return results

    def _close_device(self, dev: _Device, now: float) -> _DeviceResult:
        edge = dev.edge
        if not edge.up:
            edge.boot(now)
        assert edge.spool is not None
        inc = edge.spool.incarnation
        held = {(inc, r.seq) for lane in LANES for r in edge.spool.pending(lane, 0, 1 << 30)}
        edge.close(now)
        stats = dev.path.stats()
        return _DeviceResult(
            dev.path.index,
            dev.path.name,
            dev.sent,
            dev.refused,
            edge.accepted,
            edge.evicted,
            edge.counters,
            held,
            stats.up,
            stats.down,
            dev.timer.nudges,
        )

    def _report(
        self, results: list[_DeviceResult], remote: list[_RankResult], wall: float
    ) -> dict[str, Any]:
        cfg = self.cfg
        net = self.net.counters
        faults = list(self.faults)
        events = self.queue.processed
        for rank in remote:
            results = results + rank.devices
            for name in ("nat_expired", "port_closed", "hub_down", "to_unknown_host"):
                setattr(net, name, getattr(net, name) + getattr(rank.network, name))
            faults.extend(rank.faults)
            events += rank.events
        results.sort(key=lambda r: r.index)
        faults.sort(key=lambda f: f["at_s"])
        outcomes = [self._outcome(res) for res in results]
        up = direction_totals(r.up for r in results)
        down = direction_totals(r.down for r in results)
        delivered = sum(o.delivered for o in outcomes)
        evicted: dict[str, int] = {}
        for res in results:
            for lane, n in sorted(res.evicted.items()):
                if n:
                    evicted[lane] = evicted.get(lane, 0) + n
        summary: dict[str, Any] = {
            "sent": sum(o.sent for o in outcomes),
            "accepted": sum(o.accepted for o in outcomes),
            "delivered": delivered,
            "duplicates": sum(o.duplicates for o in outcomes),
            "lost": sum(o.lost for o in outcomes),
            "still_spooled": sum(o.still_spooled for o in outcomes),
            "unexpected": sum(o.unexpected for o in outcomes),
            "unaccepted_at_crash": sum(o.unaccepted_at_crash for o in outcomes),
            "refused": sum(o.refused for o in outcomes),
            "evicted": evicted,
            "latency_ms": latency_summary(self.sink.latency_us),
            "wire_bytes_per_record": round((up["bytes"] + down["bytes"]) / max(delivered, 1), 1),
        }
        simulated = round(self.queue.now, 6)
        edge_totals: Counter[str] = Counter()
        for res in results:
            c = res.counters
            for name in ("sessions", "handshakes", "resumed", "early_data", "reconnects"):
                edge_totals[name] += getattr(c, name)
            edge_totals["retransmitted_records"] += c.retransmitted
        return {
            "mode": "virtual",
            "seed": cfg.seed,
            "profile": cfg.profile,
            "devices": cfg.devices,
            "rate_per_device": cfg.rate,
            "duration_s": cfg.duration_s,
            "simulated_s": simulated,
            **summary,
            "link": {"up": up, "down": down},
            "processes": self.processes,
            "network": {
                "nat_expired": net.nat_expired,
                "port_closed": net.port_closed,
                "hub_down": net.hub_down,
                "to_unknown_host": net.to_unknown_host,
            },
            "edge": dict(sorted(edge_totals.items())),
            "hub": dict(sorted(self.hub_totals.items())),
            "faults": faults,
            "presence_records": self.sink.presence,
            "alerts": {"fired": None, "resolved": None, "note": "no alert rules in virtual runs"},
            "events": events,
            "harness": {
                "timer_nudges": self.harness["timer_nudges"]
                + self._hub_timer.nudges
                + sum(r.timer_nudges for r in results)
            },
            "profiles": {cfg.profile: summary},
            "per_device": [o.as_json() for o in outcomes],
            "wall_s": round(wall, 3),
            "speedup": round(simulated / wall, 1) if wall > 0 else 0.0,
            "cpu_s_by_process": [round(time.process_time(), 2)]
            + [round(r.cpu_s, 2) for r in remote],
        }

    def _outcome(self, res: _DeviceResult) -> DeviceOutcome:
        evicted = sum(res.evicted.values())
        got = self.sink.copies.get(res.name, {})
        accepted, delivered, dups, lost, still, unexpected = check_device(
            res.accepted, got, res.held, evicted
        )
        c = res.counters
        return DeviceOutcome(
            res.name,
            res.sent,
            accepted,
            delivered,
            dups,
            lost,
            still,
            evicted,
            unexpected,
            c.unaccepted_at_crash,
            res.refused,
            c.sessions,
            c.reconnects,
            c.retransmitted,
            c.crashes,
        )


# --- command line ---------------------------------------------------------------------


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags ``squall fleet`` takes for virtual runs (the others it shares)."""
    v = ap.add_argument_group("virtual time (--virtual)")
    v.add_argument(
        "--virtual",
        action="store_true",
        help="simulate in virtual time: no sockets, no sleeping; --duration and --drain "
        "are simulated seconds; the same --seed gives the same report",
    )
    v.add_argument("--hours", type=float, help="simulated hours of driving (sets --duration)")
    v.add_argument(
        "--edge-crash",
        action="append",
        default=[],
        metavar="AT[:DEVICE[:DOWN_S]]",
        help="kill device DEVICE (index, default 0) at its first sample from AT s on; "
        "reboot it DOWN_S later (default 30); repeatable",
    )
    v.add_argument(
        "--hub-crash",
        action="append",
        default=[],
        metavar="AT[:DOWN_S]",
        help="kill the hub at its first accepted batch from AT s on; restart it DOWN_S "
        "later (default 10); repeatable",
    )
    v.add_argument(
        "--processes",
        type=int,
        default=2,
        metavar="N",
        help="split the run over N processes, one per core (default 2; 1: one process); "
        "the report is the same for the same --seed and N",
    )
    v.add_argument("--quiet", action="store_true", help="no progress lines")


def config_from_args(args: argparse.Namespace) -> VirtualFleetConfig:
    """The run's configuration from ``squall fleet`` flags; ConfigError names a bad flag."""
    duration = args.hours * 3600.0 if args.hours is not None else args.duration
    cfg = VirtualFleetConfig(
        devices=args.devices,
        rate=args.rate,
        duration_s=duration,
        drain_s=args.drain,
        profile=args.profile,
        seed=args.seed,
        outage_at_s=args.outage_at,
        outage_s=args.outage_s,
        edge_crashes=[_edge_crash(text) for text in args.edge_crash],
        hub_crashes=[_hub_crash(text) for text in args.hub_crash],
        processes=args.processes,
    )
    try:
        cfg.validate()
    except ValueError as exc:
        raise ConfigError("command line", "--virtual", str(exc)) from None
    return cfg


def _numbers(flag: str, text: str, most: int) -> list[float]:
    parts = text.split(":")
    try:
        if not 1 <= len(parts) <= most:
            raise ValueError(text)
        return [float(p) for p in parts]
    except ValueError:
        raise ConfigError(
            "squall fleet", flag, f"expected numbers AT[:...], got {text!r}"
        ) from None


def _edge_crash(text: str) -> EdgeCrash:
    n = _numbers("--edge-crash", text, 3)
    return EdgeCrash(n[0], int(n[1]) if len(n) > 1 else 0, n[2] if len(n) > 2 else 30.0)


def _hub_crash(text: str) -> HubCrash:
    n = _numbers("--hub-crash", text, 2)
    return HubCrash(n[0], n[1] if len(n) > 1 else 10.0)


@contextlib.contextmanager
def work_directory(out: str | None) -> Iterator[Path]:
    """``out`` if given (kept), else a scratch directory on tmpfs when there is one (removed)."""
    if out:
        path = Path(out).resolve()
        if path.exists() and any(path.iterdir()):
            if not (path / "hub.db").exists():  # never wipe a directory that is not ours
                raise ConfigError("command line", "--out", f"{path} is not empty")
            shutil.rmtree(path)  # the previous run's
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and _writable(shm) else None
    scratch = Path(tempfile.mkdtemp(prefix="squall-virtual-", dir=base))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _writable(path: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def run_virtual(
    config: VirtualFleetConfig,
    out: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """One virtual run in ``out`` (or a scratch directory); returns the report."""
    with work_directory(out) as workdir:
        return VirtualFleet(config, workdir, progress=progress).run()


def cli(args: argparse.Namespace) -> int:
    """``squall fleet --virtual``: run, print a summary, write the report; 0 when clean."""
    # aioquic warns once per refused connection (an Initial retransmitted to a hub that
    # already forgot it, after a tunnel or a restart): expected here, and thousands of them
    quic_log = logging.getLogger("quic")
    level = quic_log.level
    quic_log.setLevel(logging.ERROR)
    try:
        cfg = config_from_args(args)
        progress = None if args.quiet else _stderr
        if progress is not None:
            progress(
                f"squall fleet --virtual: {cfg.devices} vehicles on {cfg.profile}, "
                f"{cfg.duration_s:.0f} simulated s, seed {cfg.seed}, "
                f"{cfg.processes} process(es)"
            )
        report = run_virtual(cfg, args.out, progress)
    except SquallError as exc:
        print(f"squall fleet: {exc}", file=sys.stderr)
        return 2
    finally:
        quic_log.setLevel(level)
    print_summary(report)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {args.report}")
    clean = report["lost"] == 0 and report["duplicates"] == 0 and report["unexpected"] == 0
    return 0 if clean else 1


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def print_summary(r: dict[str, Any]) -> None:
    """The human-readable end of a virtual run."""
    lat = r["latency_ms"]
    print("\n=== squall fleet --virtual: result ===")
    print(f"simulated / wall              : {r['simulated_s']:.0f} s / {r['wall_s']:.1f} s "
          f"({r['speedup']}x, {r['processes']} process(es))")  # fmt: skip
    print(f"records sent / accepted       : {r['sent']} / {r['accepted']}")
    print(f"delivered (durable consumer)  : {r['delivered']}")
    print(f"lost / duplicated / unexpected: {r['lost']} / {r['duplicates']} / {r['unexpected']}")
    print(f"still in spools at the end    : {r['still_spooled']}")
    print(f"lost at crashes, unaccepted   : {r['unaccepted_at_crash']} (never accepted)")
    print(f"accept -> hub latency ms      : p50 {lat['p50']}  p99 {lat['p99']}  max {lat['max']}")
    print(f"bytes on the link per record  : {r['wire_bytes_per_record']}")
    for f in r["faults"]:
        print(f"fault                         : {json.dumps(f)}")
    if r["lost"] == 0 and r["duplicates"] == 0 and r["unexpected"] == 0:
        print("\nEvery accepted record was delivered exactly once.")
    else:
        print(f"\nNOT CLEAN: {r['lost']} lost, {r['duplicates']} duplicated.")

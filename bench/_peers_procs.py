"""The client processes of bench/peers.py: publishers, one subscriber, the relay; the pipes to them.

Every client process is forked, dies with the bench (``PR_SET_PDEATHSIG``), runs an
asyncio loop (uvloop when installed, for every system alike) and obeys commands on a
pipe.  A publisher process hosts some of the devices:

    ("go", start_at, stop_at, rate_per_device, drain_s, count) -> ("done", [device reports])
    ("stop",) -> ("stopped", None)

The subscriber answers ("go", slow_until), ("progress",) with (received, unique) and
("report",) with its ``SeqTracker.report()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from _common import BenchError, die_with_parent, pin, raise_fd_limit
from _peers_clients import DEVICES, SUBSCRIBERS, Device, Endpoint, fixes
from _peers_relay import relay_main

CONNECTS_IN_FLIGHT = 16  # per publisher process: TLS handshakes at once
CONNECT_TRIES = 3
CLONE_NEWNET = 0x40000000


def _use_uvloop() -> None:
    # asyncio's "returning true from eof_received() has no effect when using ssl" (aiohttp,
    # nats-py) would otherwise fill the bench's output
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


class Commands:
    """Commands arriving on the pipe, as an asyncio queue."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        asyncio.get_running_loop().add_reader(conn.fileno(), self._on_readable)
        # uvloop made the pipe non-blocking; a large report (every seq seen) must not
        # fail with EAGAIN when the pipe is full: sends block, reads come when readable
        os.set_blocking(conn.fileno(), True)

    def _on_readable(self) -> None:
        try:
            msg = self.conn.recv()
        except EOFError:
            msg = ("stop",)
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
        self.queue.put_nowait(msg)

    async def next(self) -> tuple[Any, ...]:
        """The next command."""
        return await self.queue.get()


# --- publishers ------------------------------------------------------------------------


async def _drive(
    dev: Device, seed: int, start_at: float, stop_at: float, rate: float, count: int
) -> tuple[float, float]:
    """Publish until ``stop_at`` or ``count`` records (0: no limit), at ``rate`` records/s or
    as fast as the window allows.

    Returns (first publish, last publish) wall times.  At a fixed rate a device that fell
    more than a second behind its schedule does not catch up in a burst: it was slowed.
    """
    bodies = fixes(seed)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = start_at + (seed % 997) / 997 * interval  # spread the devices over a tick
    first = last = 0.0
    n = 0
    while True:
        now = time.time()
        if now >= stop_at or (count and n >= count):
            break
        if interval:
            if next_at > now:
                await asyncio.sleep(next_at - now)
                continue
            next_at = max(next_at + interval, now - 1.0)
        await dev.publish(bodies[n % len(bodies)])
        last = time.time()
        if not first:
            first = last
        n += 1
        if not interval and n % 32 == 0:
            await asyncio.sleep(0)  # let acknowledgements in
    return first, last


async def _connect_all(devices: list[Device]) -> int:
    """Connect every device (a few at a time, 3 tries each); returns the retries needed."""
    sem = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
    retries = 0

    async def one(d: Device) -> None:
        nonlocal retries
        for attempt in range(CONNECT_TRIES):
            try:
                async with sem:
                    await d.connect()
                return
            except Exception:
                if attempt == CONNECT_TRIES - 1:
                    raise
                retries += 1
                await asyncio.sleep(0.5 * (attempt + 1))

    await asyncio.gather(*(one(d) for d in devices))
    return retries


async def _publisher(conn: Connection, ep: Endpoint, names: list[str], seeds: list[int]) -> None:
    cmds = Commands(conn)
    devices = [DEVICES[ep.system](n, ep) for n in names]
    try:
        retries = await _connect_all(devices)
    except Exception as exc:
        conn.send(("error", f"connect: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", retries))
    while True:
        msg = await cmds.next()
        if msg[0] == "go":
            _, start_at, stop_at, rate, drain_s, count = msg
            spans = await asyncio.gather(
                *(
                    _drive(d, s, start_at, stop_at, rate, count)
                    for d, s in zip(devices, seeds, strict=True)
                )
            )
            await asyncio.gather(*(d.drain(drain_s) for d in devices))
            reports = [_device_report(d, span) for d, span in zip(devices, spans, strict=True)]
            conn.send(("done", reports))
        elif msg[0] == "stop":
            for d in devices:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(d.close(), 10)
            conn.send(("stopped", None))
            return


def _device_report(d: Device, span: tuple[float, float]) -> dict[str, Any]:
    return {
        "name": d.name,
        "first_seq": d.first_seq,
        "published": d.published,
        "acked": d.acked,
        "errors": d.errors,
        "unacked_seqs": d.unacked_seqs(),
        "first_publish": span[0],
        "last_publish": span[1],
    }


def enter_netns(name: str | None) -> None:
    """Move this (single-threaded, freshly forked) process into network namespace ``name``."""
    if not name:
        return
    import ctypes

    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def publisher_main(
    conn: Connection,
    ep: Endpoint,
    names: list[str],
    seeds: list[int],
    cpus: list[int],
    netns: str | None,
) -> None:
    """Entry point of a publisher process."""
    die_with_parent()
    enter_netns(netns)
    pin(set(cpus))
    raise_fd_limit()
    _use_uvloop()
    asyncio.run(_publisher(conn, ep, names, seeds))


# --- the subscriber ----------------------------------------------------------------------


async def _subscriber(conn: Connection, ep: Endpoint) -> None:
    cmds = Commands(conn)
    sub = SUBSCRIBERS[ep.system](ep)
    try:
        await sub.start()
    except Exception as exc:
        conn.send(("error", f"subscribe: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        msg = await cmds.next()
        t = sub.tracker
        if msg[0] == "go":
            sub.slow_until = float(msg[1])
        elif msg[0] == "progress":
            conn.send(("progress", (t.received, t.unique, t.last_recv)))
        elif msg[0] == "report":
            conn.send(("report", t.report()))
        elif msg[0] == "stop":
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.close(), 15)
            conn.send(("stopped", None))
            return


def subscriber_main(conn: Connection, ep: Endpoint, cpus: list[int], netns: str | None) -> None:
    """Entry point of the subscriber process."""
    die_with_parent()
    enter_netns(netns)
    pin(set(cpus))
    _use_uvloop()
    asyncio.run(_subscriber(conn, ep))


def _relay_entry(conn: Connection, kind: str, port: int, cpus: list[int]) -> None:
    die_with_parent()
    pin(set(cpus))
    raise_fd_limit()
    relay_main(conn, kind, ("127.0.0.1", port))


# --- the bench side ------------------------------------------------------------------


class Proc:
    """One forked client process and its pipe."""

    def __init__(self, name: str, target: Callable[..., None], *args: Any) -> None:
        ctx = mp.get_context("fork")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True, name=name)
        self.proc.start()
        child.close()
        assert self.proc.pid is not None
        self.pid: int = self.proc.pid
        self.retries = 0  # publishers: connection attempts that had to be repeated

    def send(self, *msg: Any) -> None:
        """A command."""
        self.conn.send(msg)

    def expect(self, kind: str, timeout: float) -> Any:
        """The payload of the next ``kind`` message within ``timeout`` s (BenchError else)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.conn.poll(0.1):
                try:
                    msg = self.conn.recv()
                except EOFError:
                    raise BenchError(f"{self.name} died ({self.proc.exitcode})") from None
                if msg[0] == "error":
                    raise BenchError(f"{self.name}: {msg[1]}")
                if msg[0] == kind:
                    return msg[1]
                continue
            if not self.proc.is_alive():
                raise BenchError(f"{self.name} exited ({self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no {kind!r} within {timeout:.0f} s")

    def ask(self, kind: str, timeout: float = 30.0) -> Any:
        """Send ``(kind,)`` and return the reply's payload."""
        self.send(kind)
        return self.expect(kind, timeout)

    def stop(self, timeout: float = 20.0) -> None:
        """Ask it to stop; kill it if it does not.  Never raises."""
        with contextlib.suppress(Exception):
            if self.proc.is_alive():
                self.send("stop")
                self.expect("stopped", timeout)
        self.proc.join(3)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


def start_relay(kind: str, port: int, cpus: set[int]) -> tuple[Proc, int]:
    """The relay process in front of ``port``; returns it and its listening port."""
    p = Proc("relay", _relay_entry, kind, port, sorted(cpus))
    return p, int(p.expect("ready", 30))


def start_subscriber(ep: Endpoint, cpus: set[int], netns: str | None = None) -> Proc:
    """The subscriber process (in ``netns`` if given), subscribed (durably) and ready."""
    p = Proc("subscriber", subscriber_main, ep, sorted(cpus), netns)
    try:
        p.expect("ready", 60)
    except BaseException:
        p.stop(5)
        raise
    return p


def start_publishers(
    ep: Endpoint,
    names: list[str],
    procs: int,
    cpus: set[int],
    timeout: float,
    netns: str | None = None,
) -> list[Proc]:
    """Publisher processes (at most ``procs``, in ``netns`` if given), devices dealt
    round-robin, all connected."""
    n = max(1, min(procs, len(names)))
    out: list[Proc] = []
    try:
        for i in range(n):
            mine = names[i::n]
            seeds = [int(x.rsplit("-", 1)[1]) for x in mine]
            args = (ep, mine, seeds, sorted(cpus), netns)
            out.append(Proc(f"publisher-{i}", publisher_main, *args))
        for p in out:
            p.retries = int(p.expect("ready", timeout))
    except BaseException:
        for p in out:
            p.stop(5)
        raise
    return out

"""A virtual run split over processes: conservative parallel simulation in windows.

The hub is rank 0; the devices are dealt out to ranks 0..N-1 (rank 0 takes a smaller
share, since it also runs the hub, its log and the consumer).  Each rank keeps its own
event queue and runs every device it owns with both directions of that device's link,
so a datagram's fate is decided in the process that owns the link, with the time it was
sent.  Only two things cross between processes: datagrams a device sends to the hub
(with their arrival time, already decided), and datagrams the hub sends to a device of
another rank (with their send time; the owner decides their fate).

No datagram arrives sooner than the link's minimum one-way delay (``lookahead_s``): what
a process sends in the window ``[T, T + lookahead)`` lands at ``T + lookahead`` or later.
Time is cut into windows of ``lookahead / PIPELINE_DEPTH``; a process runs its window
``k`` once it holds the other side's window ``k - PIPELINE_DEPTH`` (rank 0 hears from
every worker, a worker from rank 0): a worker hands over the datagrams its devices sent
to the hub (arrival times decided), rank 0 those the hub sent to the worker's devices
(with their send times).  A process may thus run up to a lookahead ahead of the other,
so one busy window on either side (a burst of handshakes, a big log read) is absorbed
rather than stalling both.  Windows are not skipped when nothing happens: an idle window
costs a message each way.

The run stays a function of its configuration: which rank owns which device, the window
boundaries and the order in which crossing datagrams join a queue depend only on the
seed, the profile and the number of processes, never on timing: a window's datagrams
join the other side's queue at a fixed point (just before the window that needs them).
Reports of runs with different process counts may differ where events of two processes
fall at the very same instant, and in how long the final drain runs: a worker's spool
depths reach rank 0 a lookahead late, so the end of the run can be seen a poll later.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Final

from simulator.linkmodel import LinkParams

# Windows shorter than this cost more in barriers than two cores give back.
MIN_LOOKAHEAD_S: Final = 0.005
# Windows per lookahead: window k waits only for the other side's window k - DEPTH, so
# one process may run up to a lookahead ahead of another and a busy window on one side
# (a burst of handshakes, a big log read) is absorbed instead of stalling the other.
PIPELINE_DEPTH: Final = 2
# Rank 0 runs the hub, the log and the consumer (~40% of a 3g-poor run at 1 record/s)
# and this share of the devices; the workers split the rest evenly.
RANK0_DEVICE_SHARE: Final = 0.10


def lookahead_s(params: LinkParams) -> float:
    """The least one-way delay of any datagram on a link with ``params`` (0: none).

    Uniform jitter stays within ``delay_ms +- jitter_ms``; normal jitter has no bound.
    Serialisation at a rate cap, reordering and outages only ever add delay.
    """
    if params.jitter_ms > 0 and params.jitter_distribution != "uniform":
        return 0.0
    low_ms = params.delay_ms - params.jitter_ms
    if low_ms <= 0:
        return 0.0
    # a margin for float rounding in the link model's arithmetic
    return low_ms / 1000.0 * (1.0 - 1e-9) - 1e-9


def assign_ranks(devices: int, processes: int) -> list[int]:
    """The rank that runs each device: rank 0 every so often, the rest in turn."""
    if processes <= 1:
        return [0] * devices
    k0 = round(devices * RANK0_DEVICE_SHARE)
    out: list[int] = []
    turn = 0
    for i in range(devices):
        if (i + 1) * k0 // devices > i * k0 // devices:
            out.append(0)
        else:
            out.append(1 + turn % (processes - 1))
            turn += 1
    return out


class CausalityError(RuntimeError):
    """A datagram would arrive in a window already run: the lookahead was too long.

    Never expected (``lookahead_s`` is the link model's own bound); raised rather than
    delivered late, since a late delivery would make the run differ from a serial one.
    """

    def __init__(self, device: str, arrives: float, window_start: float) -> None:
        super().__init__(
            f"virtual run: a datagram of {device} arrives at {arrives:.9f} s, before the "
            f"window it belongs to, which starts at {window_start:.9f} s"
        )


class WorkerFailed(RuntimeError):
    """A worker process of a split run died or raised; the message carries its traceback."""


class Workers:
    """The forked worker processes of a split run, seen from rank 0."""

    def __init__(self, processes: int, body: Callable[[int, Connection], None]) -> None:
        """Fork ranks 1..processes-1; each runs ``body(rank, link_to_rank0)`` and exits."""
        self.links: list[Connection] = []
        self.pids: list[int] = []
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            for rank in range(1, processes):
                mine, theirs = socket.socketpair()
                pid = os.fork()
                if pid == 0:  # the worker
                    mine.close()
                    for link in self.links:
                        link.close()
                    _child(rank, Connection(theirs.detach()), body)
                theirs.close()
                self.links.append(Connection(mine.detach()))
                self.pids.append(pid)
        except BaseException:
            self.close(kill=True)
            raise

    def recv(self, rank: int) -> Any:
        """The next message from worker ``rank`` (WorkerFailed when it died or raised)."""
        try:
            msg = self.links[rank - 1].recv()
        except (EOFError, OSError) as exc:
            raise WorkerFailed(f"virtual worker {rank} died: {exc!r}") from None
        if isinstance(msg, tuple) and msg and msg[0] == "error":
            raise WorkerFailed(f"virtual worker {rank} failed:\n{msg[1]}")
        return msg

    def send(self, rank: int, msg: Any) -> None:
        """Send ``msg`` to worker ``rank``."""
        try:
            self.links[rank - 1].send(msg)
        except OSError as exc:
            raise WorkerFailed(f"virtual worker {rank} died: {exc!r}") from None

    def close(self, kill: bool = False) -> None:
        """Close the links and reap the workers (killing them first if ``kill``)."""
        for link in self.links:
            link.close()
        for pid in self.pids:
            if kill:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.links, self.pids = [], []


def _child(rank: int, link: Connection, body: Callable[[int, Connection], None]) -> None:
    """The forked worker's whole life: run ``body``, report a failure, never return."""
    code = 0
    try:
        body(rank, link)
    except BaseException:  # the parent must hear of it, whatever it was
        code = 1
        with contextlib.suppress(OSError):
            link.send(("error", traceback.format_exc()))
    finally:
        try:
            link.close()
        finally:
            os._exit(code)

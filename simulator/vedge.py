"""A virtual-time edge agent: the real spool, sender session, QUIC endpoint and reconnect
policy of one device, pumped by the simulator's clock instead of asyncio.

Like ``edge.agent.Agent`` it owns one SQLite spool and at most one ``EdgeEndpoint`` at a
time, group-commits the spool at ``spool.next_commit_at()``, protects records on the
wire from eviction, keeps the TLS session ticket on "disk" (it survives a crash) and
reconnects with ``edge.backoff.Reconnector``.  It has no socket: the runner moves its
datagrams through the virtual network, and every call takes the simulated ``now``.

A crash (``crash``) drops all memory state: records staged but not yet group-committed
are gone (with ``durability: batch`` they were never accepted), the session dies, the
spool file is released without a commit and reopened by the next ``boot``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aioquic import tls

from edge.agent import session_protect
from edge.backoff import BackoffConfig, Reconnector
from edge.config import BackoffSettings, SenderSettings, SpoolConfig
from edge.spool import Spool
from simulator.linkmodel import derive_seed
from simulator.vclock import wall_us
from simulator.vnet import HUB_ADDR
from transport.auth import decode_ticket, encode_ticket
from transport.batchcodec import Scalar
from transport.errors import ErrorCode
from transport.events import Acked, Welcomed
from transport.quic import Connected, ConnectionLost, EdgeEndpoint, EdgeTls, edge_ack_delay
from transport.session import EdgeSession, SenderConfig

_FIRST_SOCKET_PORT = 40_000
_HUB_NAME = f"{HUB_ADDR[0]}:{HUB_ADDR[1]}"


@dataclass(slots=True)
class EdgeSettings:
    """What every virtual device is configured with (the edge YAML's sections)."""

    spool: SpoolConfig = field(
        default_factory=lambda: SpoolConfig(durability="batch", group_commit_ms=50)
    )
    sender: SenderSettings = field(
        default_factory=lambda: SenderSettings(linger_ms=1000, heartbeat_s=5.0)
    )
    backoff: BackoffSettings = field(default_factory=lambda: BackoffSettings(cap_s=4.0))


@dataclass(slots=True)
class EdgeCounters:
    """What one device did over the whole run (across crashes)."""

    boots: int = 0
    sessions: int = 0
    handshakes: int = 0
    resumed: int = 0
    early_data: int = 0
    welcomed: int = 0
    reconnects: int = 0
    acked: int = 0
    retransmitted: int = 0
    crashes: int = 0
    unaccepted_at_crash: int = 0  # staged, not yet group-committed, when the process died


class VirtualEdge:
    """One device's agent in virtual time (see the module docstring)."""

    def __init__(
        self,
        name: str,
        tenant: str,
        credentials: EdgeTls,
        spool_path: Path,
        settings: EdgeSettings,
        seed: int,
    ) -> None:
        self.name = name
        self.prefix = f"{tenant}.{name}"
        self.tls = credentials
        self.spool_path = spool_path
        self.settings = settings
        self.seed = seed
        self.counters = EdgeCounters()
        self.accepted: dict[int, list[int]] = {}  # incarnation -> seqs, in accept order
        self.evicted: dict[str, int] = {}  # lane name -> records, over every spool opening
        self.spool: Spool | None = None
        self.endpoint: EdgeEndpoint | None = None
        self.session: EdgeSession | None = None
        self.port = 0  # the socket of the current session
        self._next_port = _FIRST_SOCKET_PORT
        self._reconnector: Reconnector | None = None
        self._reconnect_at: float | None = None
        self._staged: list[int] = []  # seqs appended but not yet covered by a commit
        self._ticket: bytes | None = None  # the ticket file: it survives crashes
        self._out: list[tuple[bytes, int]] = []  # datagrams of a session that just ended
        self._conn_timer: float | None = None  # the endpoint's deadline, while untouched
        self._conn_timer_stale = True
        self._now = 0.0

    @property
    def up(self) -> bool:
        """True while the agent process runs."""
        return self.spool is not None

    # -- lifecycle -------------------------------------------------------------------

    def boot(self, now: float) -> None:
        """Start the agent process: open (or reopen) the spool and connect at once."""
        self._now = now
        s = self.settings.spool
        self.spool = Spool(
            self.spool_path,
            max_bytes=s.max_bytes,
            durability=s.durability,
            group_commit_ms=s.group_commit_ms,
            now=now,
        )
        self.counters.boots += 1
        b = self.settings.backoff
        rng = random.Random(
            derive_seed(self.seed, self.name, "edge", f"boot-{self.counters.boots}")
        )
        cfg = BackoffConfig(base_s=b.base_s, cap_s=b.cap_s, failover_after=b.failover_after)
        self._reconnector = Reconnector([_HUB_NAME], rng, cfg)
        self._reconnect_at = now

    def crash(self) -> int:
        """Kill the process: memory state is gone; returns the staged records lost with it."""
        assert self.spool is not None
        lost = len(self._staged)
        self.counters.crashes += 1
        self.counters.unaccepted_at_crash += lost
        self._collect_evictions(self.spool)
        _abandon(self.spool)
        self._drop_session()
        self.spool = None
        self._staged = []
        self._out = []
        self._reconnector = None
        self._reconnect_at = None
        return lost

    def close(self, now: float) -> None:
        """Clean stop at the end of a run: commit, say GOING_AWAY, close the spool."""
        if self.spool is None:
            return
        self._now = now
        self._commit(now)
        if self.endpoint is not None:
            self.endpoint.close(ErrorCode.GOING_AWAY, "simulation over")
        self._drop_session()
        self._collect_evictions(self.spool)
        self.spool.close(now)
        self.spool = None

    # -- publishing ----------------------------------------------------------------

    def publish(
        self, now: float, lane: int, suffix: str, body: Any, attrs: Mapping[str, Scalar]
    ) -> int:
        """Stage one record (accepted at the next group commit); returns its seq.

        Raises SpoolFullError (and the spool's other refusals) like ``Spool.append``.
        """
        assert self.spool is not None
        self._now = now
        seq = self.spool.append(lane, f"{self.prefix}.{suffix}", body, attrs, wall_us(now), now)
        self._staged.append(seq)
        self._settle()
        return seq

    def spooled(self) -> int:
        """Records held in the spool (staged ones included)."""
        assert self.spool is not None
        return sum(depth[0] for depth in self.spool.depth().values())

    # -- the shell's pump ------------------------------------------------------------

    def get_timer(self) -> float | None:
        """The one deadline: group commit, the connection's timers, or the next attempt."""
        if self.spool is None:
            return None
        if self.endpoint is None:
            conn = self._reconnect_at
        else:
            if self._conn_timer_stale:
                self._conn_timer = self.endpoint.get_timer()
                self._conn_timer_stale = False
            conn = self._conn_timer
        spool = self.spool.next_commit_at()
        if spool is None or conn is None:
            return conn if spool is None else spool
        return min(spool, conn)

    def handle_timer(self, now: float) -> bool:
        """Run what is due at ``now``; True when the connection may have datagrams to send."""
        if self.spool is None:
            return False
        self._now = now
        touched = False
        if self.spool.commit_due(now):
            touched = self._commit(now)
        if self.endpoint is not None:
            t = self.endpoint.get_timer() if self._conn_timer_stale else self._conn_timer
            if t is not None and now >= t:
                self.endpoint.handle_timer(now)
                self._after(now)
                touched = True
        elif self._reconnect_at is not None and now >= self._reconnect_at:
            self._connect(now)
            touched = True
        return touched

    def receive(self, data: bytes, port: int, now: float) -> bool:
        """A datagram for socket ``port``; False when no such socket is open."""
        if self.endpoint is None or port != self.port:
            return False
        self._now = now
        self.endpoint.receive_datagram(data, HUB_ADDR, now)
        self._after(now)
        return True

    def datagrams(self, now: float, touched: bool = True) -> list[tuple[bytes, int]]:
        """Datagrams to send now, with the socket port each leaves from.

        ``touched=False`` says the connection saw no input since the last call (only the
        spool was committed): aioquic is not asked then, which costs ~80 us for nothing.
        """
        out, self._out = self._out, []
        if touched:
            self._conn_timer_stale = True
        if touched and self.endpoint is not None:
            port = self.port
            out.extend((data, port) for data, _ in self.endpoint.datagrams_to_send(now))
        return out

    # -- internals -------------------------------------------------------------------

    def _connect(self, now: float) -> None:
        assert self.spool is not None
        self._reconnect_at = None
        s = self.settings.sender
        cfg = SenderConfig(
            batch_max_records=s.batch_max_records,
            linger_s=s.linger_ms / 1000,
            window_records=s.window_records,
            small_batches_in_flight=s.small_batches_in_flight,
            heartbeat_s=s.heartbeat_s,
        )
        self.session = EdgeSession(
            self.spool, self.spool.incarnation, now, cfg, self._heartbeat_stats
        )
        ticket = decode_ticket(self._ticket) if self._ticket is not None else None
        self.port = self._next_port
        self._next_port += 1
        self.endpoint = EdgeEndpoint(
            self.tls,
            self.session,
            HUB_ADDR,
            now,
            ticket,
            self._save_ticket,
            s.idle_timeout_s,
            edge_ack_delay(s.linger_ms / 1000),
        )
        self.counters.sessions += 1
        self._after(now)

    def _after(self, now: float) -> None:
        endpoint, session = self.endpoint, self.session
        assert endpoint is not None and session is not None and self.spool is not None
        lost: ConnectionLost | None = None
        while (ev := endpoint.next_event()) is not None:
            if isinstance(ev, Connected):
                self.counters.handshakes += 1
                self.counters.early_data += int(ev.early_data)
                self.counters.resumed += int(ev.session_resumed)
            elif isinstance(ev, Welcomed):
                assert self._reconnector is not None
                self._reconnector.on_connected()
                self.counters.welcomed += 1
            elif isinstance(ev, Acked):
                self.counters.acked += ev.records
            elif isinstance(ev, ConnectionLost) and lost is None:
                lost = ev
        if lost is None:
            session_protect(self.spool, session)
            return
        if lost.code >= 0x100 and not lost.handshake_done:
            self._ticket = None  # refused by TLS: start afresh, as the agent does
        port = self.port
        self._out.extend((data, port) for data, _ in endpoint.datagrams_to_send(now))
        self._drop_session()
        assert self._reconnector is not None
        self.counters.reconnects += 1
        self._reconnect_at = self._reconnector.on_failure(now, lost.retry_after_ms / 1000)

    def _drop_session(self) -> None:
        if self.session is not None:
            self.counters.retransmitted += self.session.retransmitted
        self.endpoint = None
        self.session = None

    def _commit(self, now: float) -> bool:
        """Group commit; True when it accepted records and that gave the connection work."""
        assert self.spool is not None
        self.spool.commit(now)
        if not self._settle() or self.endpoint is None or self.endpoint.closed:
            return False
        # Newly accepted records: let the session send what it may (the agent does this
        # after every commit; after one that only wrote trims there is nothing new).  Records
        # that joined a lingering batch leave the connection as it was: not touched.
        if not self.endpoint.poll(now):
            return False
        self._after(now)
        return True

    def _settle(self) -> bool:
        """Staged seqs that a commit now covers are accepted; True when there were some."""
        assert self.spool is not None
        staged = self._staged
        done = self.spool.committed_seq
        if not staged or staged[0] > done:
            return False
        cut = next((i for i, seq in enumerate(staged) if seq > done), len(staged))
        self.accepted.setdefault(self.spool.incarnation, []).extend(staged[:cut])
        del staged[:cut]
        return True

    def _save_ticket(self, ticket: tls.SessionTicket) -> None:
        self._ticket = encode_ticket(ticket)

    def _heartbeat_stats(self) -> dict[str, Any]:
        spool, endpoint = self.spool, self.endpoint
        assert spool is not None
        return {
            "d": {str(int(k)): [v[0], v[1]] for k, v in spool.depth().items()},
            "seq": spool.last_seq,
            "drop": spool.drop_totals(),
            "rtt_ms": round(endpoint.rtt() * 1000, 1) if endpoint else None,
            "loss": round(endpoint.loss_estimate(), 3) if endpoint else None,
            "rc": self.counters.reconnects,
        }

    def _collect_evictions(self, spool: Spool) -> None:
        for lane, reasons in spool.evicted.items():
            self.evicted[lane] = self.evicted.get(lane, 0) + sum(reasons.values())


def _abandon(spool: Spool) -> None:
    """Release a spool's file as a killed process would: no commit, no checkpoint.

    ``Spool`` has no public way to die (``close`` commits what is staged), so this reaches
    for its connection; what is staged lives only in memory and is dropped with the object.
    """
    spool._conn.close()

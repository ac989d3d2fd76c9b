"""Local inputs of the edge agent (asyncio shells around the sans-I/O parsers):
syslog over UDP and TCP (RFC 5424 / 3164, RFC 6587 framing) and JSON lines from stdin
or tailed files.  Malformed syslog is counted and kept as a raw record; a malformed JSON
line is counted and dropped with a log line (it has no subject to put it under)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.agent import Agent
from edge.config import Inputs, parse_hostport
from edge.jsonl import JsonInputError, LineSplitter, parse_json_line
from edge.syslog import SyslogFramer, parse_or_raw, to_record_fields
from transport.errors import SquallError
from transport.wire import Lane

log = logging.getLogger("squall.edge.inputs")

_CRITICAL_SEVERITY = 2  # emerg, alert, crit go on the critical lane


@dataclass
class InputStats:
    """Counters of every input."""

    counts: Counter[str] = field(default_factory=Counter)


def publish_syslog(agent: Agent, data: bytes, stats: InputStats) -> None:
    """One syslog message to one record (raw when malformed)."""
    msg, malformed = parse_or_raw(data)
    stats.counts["syslog_messages"] += 1
    if malformed:
        stats.counts["syslog_malformed"] += 1
    suffix, attrs, body = to_record_fields(msg, default_host=agent.device)
    lane = Lane.CRITICAL if msg.severity <= _CRITICAL_SEVERITY else Lane.BULK
    try:
        agent.publish_nowait(suffix, body, attrs, lane)
    except SquallError as exc:
        stats.counts["syslog_refused"] += 1
        log.warning("syslog record refused: %s", exc)


class _SyslogUdp(asyncio.DatagramProtocol):
    def __init__(self, agent: Agent, stats: InputStats, max_bytes: int) -> None:
        self.agent, self.stats, self.max_bytes = agent, stats, max_bytes

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) > self.max_bytes:
            self.stats.counts["syslog_oversized"] += 1
            data = data[: self.max_bytes]
        publish_syslog(self.agent, data, self.stats)


@dataclass
class RunningInputs:
    """Handles to stop the inputs."""

    stats: InputStats
    transports: list[asyncio.BaseTransport] = field(default_factory=list)
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    udp_port: int = 0
    tcp_port: int = 0

    async def stop(self) -> None:
        """Stop listening and reading."""
        for t in self.transports:
            t.close()
        for s in self.servers:
            s.close()
            await s.wait_closed()
        for task in self.tasks:
            task.cancel()


async def start_inputs(agent: Agent, cfg: Inputs) -> RunningInputs:
    """Start every input the config enables."""
    loop = asyncio.get_running_loop()
    running = RunningInputs(InputStats())
    sc = cfg.syslog
    if sc.udp:
        host, port = parse_hostport(sc.udp)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _SyslogUdp(agent, running.stats, sc.max_message_bytes), local_addr=(host, port)
        )
        running.transports.append(transport)
        running.udp_port = transport.get_extra_info("sockname")[1]
    if sc.tcp:
        host, port = parse_hostport(sc.tcp)
        clients = asyncio.Semaphore(sc.max_tcp_clients)

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if clients.locked():
                running.stats.counts["syslog_tcp_refused"] += 1
                writer.close()
                return
            async with clients:
                await _read_syslog_tcp(agent, reader, running.stats, sc.max_message_bytes)
            writer.close()

        server = await asyncio.start_server(on_client, host, port)
        running.servers.append(server)
        running.tcp_port = server.sockets[0].getsockname()[1]
    jc = cfg.jsonl
    if jc.stdin:
        running.tasks.append(loop.create_task(_read_stdin(agent, running.stats, jc.max_line_bytes)))
    for path in jc.files:
        running.tasks.append(
            loop.create_task(_tail(agent, Path(path), running.stats, jc.max_line_bytes))
        )
    return running


async def _read_syslog_tcp(
    agent: Agent, reader: asyncio.StreamReader, stats: InputStats, max_bytes: int
) -> None:
    framer = SyslogFramer(max_bytes)
    while chunk := await reader.read(65536):
        for msg in framer.feed(chunk):
            publish_syslog(agent, msg, stats)
    for msg in framer.close():
        publish_syslog(agent, msg, stats)
    stats.counts["syslog_oversized"] += framer.oversized
    stats.counts["syslog_bad_framing"] += framer.malformed


def publish_json(agent: Agent, line: bytes, stats: InputStats, max_bytes: int) -> None:
    """One JSON line to one record; a bad line is counted and logged."""
    stats.counts["jsonl_lines"] += 1
    try:
        item = parse_json_line(line, max_bytes=max_bytes)
        agent.publish_nowait(item.subject, item.body, dict(item.attrs), item.lane)
    except (JsonInputError, SquallError) as exc:
        stats.counts["jsonl_bad"] += 1
        log.warning("json line refused: %s", exc)


async def _read_stdin(agent: Agent, stats: InputStats, max_bytes: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    splitter = LineSplitter(max_bytes, on_overlong="drop")
    while chunk := await reader.read(65536):
        for line in splitter.feed(chunk):
            publish_json(agent, line, stats, max_bytes)


async def _tail(agent: Agent, path: Path, stats: InputStats, max_bytes: int) -> None:
    """Follow a file like `tail -F` (reopens when it is replaced or truncated)."""
    splitter = LineSplitter(max_bytes, on_overlong="drop")
    pos, inode = 0, None
    while True:
        try:
            st = path.stat()
            if inode is not None and (st.st_ino != inode or st.st_size < pos):
                pos = 0
            inode = st.st_ino
            if st.st_size > pos:
                with path.open("rb") as f:
                    f.seek(pos)
                    data = f.read(1 << 20)
                    pos += len(data)
                for line in splitter.feed(data):
                    publish_json(agent, line, stats, max_bytes)
                continue
        except FileNotFoundError:
            pass
        await asyncio.sleep(0.25)

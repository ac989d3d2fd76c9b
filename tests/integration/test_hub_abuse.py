"""A real hub under abuse on loopback: each bad peer gets a typed close, a good device carries on.

* Authenticated devices that send malformed frames, oversized or foreign batches, or TLS
  messages after the handshake are each closed with their own code (the edge sees it in
  ConnectionLost and in the ERROR frame before it), counted in ``hub.errors``; a real edge
  agent publishing all the while loses nothing and never reconnects.
* UDP junk crafted with scapy (random bytes, cut and corrupted copies of a real client
  Initial, Initials under 1,200 bytes, short headers for no connection, other QUIC
  versions) is counted as ``junk`` / ``unknown_cid``, holds no state and draws no reply
  except Version Negotiation for full-size datagrams; the live device keeps delivering.
* Handshakes that stall (real Initials nobody follows up) fill the handshake slots: new
  devices are refused "busy; retry-after-ms" until the stalled ones expire, then get in.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioquic import tls
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode, pull_quic_header
from cryptography.hazmat.primitives.serialization import Encoding
from scapy.layers.inet import IP, UDP
from scapy.layers.quic import QUIC_1RTT, QUIC_Initial, QUIC_Version
from scapy.packet import Raw
from scapy.sendrecv import send

from edge.agent import Agent
from edge.config import load_edge_config
from hub.config import load_hub_config
from hub.http import start_http
from hub.server import Hub
from transport import certs
from transport.aio import open_driver
from transport.batchcodec import CODEC_NONE, CODEC_ZSTD, Record, pack
from transport.errors import ErrorCode
from transport.events import Acked, PeerError, Welcomed
from transport.limits import ALPN, PROTOCOL_VERSION
from transport.memoutbox import MemoryOutbox
from transport.quic import EdgeEndpoint, EdgeTls
from transport.session import EdgeSession
from transport.wire import (
    Credit,
    Data,
    FrameType,
    Heartbeat,
    Hello,
    Lane,
    encode_frame,
    encode_heartbeat,
)

from .conftest import device_seqs, until, write_edge_config, write_hub_config
from .quicharness import Edge, connect_edge, edge_tls

pytestmark = pytest.mark.integration

CONTROL_STREAM = 0  # the edge opens the control stream first: client bidi stream 0
MAX_FRAME = 4096  # the hub's limits.max_frame_bytes in these tests
MAX_STREAMS = 3  # the hub's limits.max_streams there: the good device uses 2 (control, telemetry)
TELEMETRY = int(Lane.TELEMETRY)


def run(main: Callable[[], Any], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(main(), timeout))


class Publisher:
    """A real edge agent that publishes one record every few milliseconds until stopped."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.seqs: list[int] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            self.seqs.append(await self.agent.publish("telemetry.speed", {"i": i, "kmh": 42.5}))
            i += 1
            await asyncio.sleep(0.003)

    async def acked_up_to_now(self) -> None:
        """Wait until every record published so far (at least one more) is acknowledged."""
        n = len(self.seqs) + 1
        await until(lambda: len(self.seqs) >= n and self.agent.stats.acked >= n, 10, "acked")

    async def finish(self) -> None:
        """Stop publishing and wait until the hub has acknowledged everything."""
        self._stop.set()
        assert self._task is not None
        await self._task
        spool = self.agent.spool
        await until(lambda: all(d[0] == 0 for d in spool.depth().values()), 20, "spool drained")


async def start_good_device(tmp_path: Path, pki: Path, listen: str) -> Publisher:
    agent = Agent(load_edge_config(write_edge_config(tmp_path, pki, "good", [listen])))
    agent.start()
    await asyncio.wait_for(agent.connected.wait(), 10)
    publisher = Publisher(agent)
    publisher.start()
    return publisher


# --- 1. authenticated devices sending bad input ----------------------------------------


def _frame(ftype: int, payload: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    return struct.pack("!BBI", version, ftype, len(payload)) + payload


def _data(codec: int, payload: bytes) -> bytes:
    data = Data(
        lane=TELEMETRY, after=0, first_seq=1, last_seq=1, count=1, codec=codec, payload=payload
    )
    return encode_frame(data)


def _records(device: str, subjects: list[str], body_bytes: int = 16) -> list[Record]:
    rng = random.Random(device)
    return [
        Record(seq, seq * 1000, subject, {}, rng.randbytes(body_bytes))
        for seq, subject in enumerate(subjects, start=1)
    ]


@dataclass(frozen=True)
class Abuse:
    """One misbehaving device: what it does once its session is up, and the close it earns."""

    device: str
    code: int  # what the edge sees in ConnectionLost
    stream_bytes: bytes = b""  # injected on the control stream
    records: tuple[Record, ...] = ()  # sent by its own (well-behaved) session core
    datagram: bytes = b""  # injected as a QUIC DATAGRAM frame
    tls_message: bytes = b""  # injected as a post-handshake TLS message (1-RTT CRYPTO)
    extra_streams: tuple[int, ...] = ()  # client streams opened beside the control stream
    session_error: bool = True  # a Squall session error (ERROR frame + hub.errors) or QUIC-level

    @property
    def counted_as(self) -> str:
        """Its label in hub.errors (QUIC-level closes: QUIC_0x<code>)."""
        return ErrorCode(self.code).name if self.session_error else f"QUIC_0x{self.code:x}"


def _abuses() -> list[Abuse]:
    rng = random.Random(7)
    bad_version = bytearray(encode_frame(Hello(1)))
    bad_version[0] = 7
    return [
        Abuse("garbage", ErrorCode.UNKNOWN_FRAME, b"\x01\xee" + rng.randbytes(300)),
        Abuse("badversion", ErrorCode.BAD_VERSION, bytes(bad_version)),
        Abuse("badhello", ErrorCode.BAD_ENCODING, _frame(FrameType.HELLO, b"\xc1\xc1")),
        Abuse("notzstd", ErrorCode.BAD_COMPRESSION, _data(CODEC_ZSTD, rng.randbytes(64))),
        Abuse("notabatch", ErrorCode.BAD_FIELD, _data(CODEC_NONE, pack(["not", "a", "batch"]))),
        Abuse("shortdata", ErrorCode.TRUNCATED, _frame(FrameType.DATA, b"\x01\x00\x00")),
        Abuse("rehello", ErrorCode.PROTOCOL_VIOLATION, encode_frame(Hello(99))),
        Abuse(
            "oversized",
            ErrorCode.FRAME_TOO_LARGE,
            records=tuple(_records("oversized", ["acme.oversized.log.dump"], 3 * MAX_FRAME)),
        ),
        Abuse(
            "trespasser",
            ErrorCode.SUBJECT_FORBIDDEN,
            records=tuple(
                _records("trespasser", ["acme.trespasser.telemetry.x", "acme.good.telemetry.x"])
            ),
        ),
        Abuse(
            "badgram",
            ErrorCode.PROTOCOL_VIOLATION,
            datagram=encode_frame(Credit(5)),  # only HEARTBEAT may travel as a datagram
        ),
        Abuse(
            "streamhog",  # one stream more than limits.max_streams (MAX_STREAMS here)
            ErrorCode.PROTOCOL_VIOLATION,
            extra_streams=tuple(4 * i for i in range(1, MAX_STREAMS + 1)),
        ),
        Abuse(
            "badbeat",
            ErrorCode.BAD_FIELD,
            datagram=encode_heartbeat(Heartbeat({"seq": 5, "d": {"1": [0, b"\xff"]}})),
        ),
        Abuse(
            "posthandshake",
            QuicErrorCode.CRYPTO_ERROR + tls.AlertDescription.unexpected_message,
            tls_message=b"\x04\x00\x00\x00",  # an empty NewSessionTicket, client to server
            session_error=False,
        ),
    ]


async def abuse(hub_addr: tuple[str, int], files: EdgeTls, a: Abuse) -> Edge:
    edge = await connect_edge(hub_addr, files)
    await until(lambda: any(isinstance(e, Welcomed) for e in edge.events), 10, f"{a.device} up")
    ep = edge.endpoint
    now = asyncio.get_running_loop().time()
    if a.stream_bytes:
        ep.quic.send_stream_data(CONTROL_STREAM, a.stream_bytes)
    for r in a.records:
        edge.outbox.add(TELEMETRY, r, now)
    if a.records:
        ep.poll(now)
    if a.datagram:
        ep.quic.send_datagram_frame(a.datagram)
    if a.tls_message:
        ep.quic._crypto_streams[tls.Epoch.ONE_RTT].sender.write(a.tls_message)
    for sid in a.extra_streams:  # the start of a frame header: nothing the hub can act on yet
        ep.quic.send_stream_data(sid, encode_frame(Hello(1))[:3])
    ep.wrote_to_quic()
    edge.driver.flush()
    await until(lambda: edge.lost() is not None, 10, f"{a.device} closed")
    return edge


def test_misbehaving_devices_get_typed_closes_and_a_good_device_loses_nothing(
    tmp_path: Path, pki: Path
) -> None:
    limits = {"max_frame_bytes": MAX_FRAME, "max_streams": MAX_STREAMS}
    cfg = load_hub_config(write_hub_config(tmp_path, pki, limits=limits))
    abuses = _abuses()
    closes: dict[str, tuple[int, str, list[PeerError]]] = {}
    published: list[int] = []

    async def main() -> None:
        hub = Hub(cfg)
        await hub.start()
        good = await start_good_device(tmp_path, pki, cfg.listen)
        hub_addr = ("127.0.0.1", hub.port)
        for a in abuses:
            edge = await abuse(hub_addr, edge_tls(pki, "acme", a.device), a)
            lost = edge.lost()
            assert lost is not None
            errors = [e for e in edge.events if isinstance(e, PeerError)]
            closes[a.device] = (lost.code, lost.reason, errors)
            edge.driver.close()
            await good.acked_up_to_now()  # and the good device is served in between
        # while all that went on, the good device kept publishing: everything arrives once
        await good.finish()
        published.extend(good.seqs)
        assert good.agent.stats.reconnects == 0 and good.agent.stats.sessions == 1
        # the abusers are gone, the good device is the only connection left
        await until(lambda: len(hub.endpoint.connections) == 1, 10, "abusers forgotten")
        counted = Counter(hub.errors)
        assert hub.endpoint.counters["auth_failed"] == 0
        await good.agent.stop()
        await hub.stop()
        closes["hub.errors"] = (0, repr(counted), [])

    run(main)
    for a in abuses:
        code, reason, errors = closes[a.device]
        assert code == a.code, (a.device, hex(code), reason)
        if a.session_error:  # the reason, and an ERROR frame before the close saying the same
            assert reason, a.device
            assert [(e.code, e.reason) for e in errors] == [(a.code, reason)], a.device
    expected = Counter(a.counted_as for a in abuses)  # QUIC-level closes too (QUIC_0x10a)
    assert closes["hub.errors"][1] == repr(expected)
    assert "outside acme.trespasser.>" in closes["trespasser"][1]
    assert closes["streamhog"][1] == f"unexpected stream {4 * MAX_STREAMS}"
    assert closes["badbeat"][1] == "heartbeat: a bytes value"
    assert sorted(device_seqs(tmp_path / "hub.db", "good")) == published  # all of it, once
    for a in abuses:
        assert device_seqs(tmp_path / "hub.db", a.device) == [], a.device


# --- 2. junk datagrams at the hub's port -----------------------------------------------


class JunkSender:
    """Sends crafted payloads to the hub: scapy's raw IP send, or a UDP socket if that fails.

    Either way the datagrams come from ``sock``'s port, so the hub's replies (if any) land
    in ``sock``.
    """

    def __init__(self, sock: socket.socket, hub_port: int) -> None:
        self.sock = sock
        self.sport = sock.getsockname()[1]
        self.hub_port = hub_port
        self.raw = True

    def send(self, payloads: list[bytes]) -> None:
        if self.raw:
            pkts = [
                IP(dst="127.0.0.1") / UDP(sport=self.sport, dport=self.hub_port) / Raw(load=p)
                for p in payloads
            ]
            try:
                send(pkts, verbose=False)
                return
            except OSError as exc:  # no CAP_NET_RAW: the same bytes through a UDP socket
                print(f"\n[hub abuse] scapy raw send impossible here ({exc}); using a UDP socket")
                self.raw = False
        for p in payloads:
            self.sock.sendto(p, ("127.0.0.1", self.hub_port))

    def replies(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(65536))
            except BlockingIOError:
                return out


def captured_initial(pki: Path, hub_addr: tuple[str, int]) -> bytes:
    """The first datagram of a real edge's connection attempt (never sent)."""
    ca, ca_key = certs.load_cert(pki / "ca.pem"), certs.load_key(pki / "ca.key")
    cert, key = certs.make_device_cert(ca, ca_key, "acme", "captured")
    ep = EdgeEndpoint(EdgeTls([ca], cert, key), EdgeSession(MemoryOutbox(), 1, 0.0), hub_addr, 0.0)
    datagram = ep.datagrams_to_send(0.0)[0][0]
    assert len(datagram) >= 1200 and QUIC_Initial(datagram).LongPacketType == 0
    return datagram


def packet_length(datagram: bytes) -> int:
    """Length of the first QUIC packet in a datagram (the rest is padding)."""
    return int(pull_quic_header(Buffer(data=datagram), host_cid_length=8).packet_length)


def flip(data: bytes, rng: random.Random, lo: int, hi: int, n: int) -> bytes:
    out = bytearray(data)
    for i in rng.sample(range(lo, hi), n):
        out[i] ^= rng.randrange(1, 256)
    return bytes(out)


def with_dcid(datagram: bytes, dcid: bytes) -> bytes:
    pkt = QUIC_Initial(datagram)
    pkt.DstConnID = dcid
    return bytes(pkt)


@dataclass
class Phase:
    """A kind of junk, and which counter each datagram must land in (None: either)."""

    name: str
    payloads: list[bytes]
    counter: str | None


def junk_phases(initial: bytes, rng: random.Random, burst: int) -> list[Phase]:
    end = packet_length(initial)  # aioquic pads the datagram after the Initial packet
    head = len(initial) - len(QUIC_Initial(initial)[Raw].load)  # up to the encrypted part
    sizes = [1, 2, 3, 5, 8, 21, 40, 100, 300, 700, 1199, 1200, 1250, 1350, 1472]
    cut_short = [1, 5, 6, 9, 14, 23, 30, head, end - 1]  # the packet itself is cut
    cut_padding = [end, end + 1, 1000, 1199]  # a whole Initial in a datagram under 1,200
    small_initials = [
        bytes(
            QUIC_Initial(Version=1, DstConnID=rng.randbytes(8), SrcConnID=b"c" * 8, Length=n + 1)
            / Raw(load=rng.randbytes(n))  # Length counts the 1-byte packet number too
        )
        for n in (20, 300, 1100)
    ]

    def other_version(n: int) -> bytes:
        pkt = QUIC_Initial(Version=0x0A0A0A0A, DstConnID=rng.randbytes(8), SrcConnID=b"s" * 8)
        return bytes(pkt / Raw(load=rng.randbytes(n)))

    return [
        Phase("random bytes", [rng.randbytes(n) for n in sizes for _ in range(4)], None),
        Phase("truncated Initial", [initial[:n] for n in cut_short], "junk"),
        Phase(
            "truncated Initial, corrupted",
            [flip(initial[:n], rng, head, n, 1) for n in (head + 1, head + 100, end - 1)],
            "junk",
        ),
        Phase(
            "Initial cut in its padding (< 1200 bytes)",
            [initial[:n] for n in cut_padding],
            "unknown_cid",
        ),
        Phase("Initial under 1200 bytes (scapy)", small_initials, "unknown_cid"),
        # more than max_handshakes of these: none of them may take a handshake slot
        Phase(
            "full-size Initial, corrupted, fresh DCIDs",
            [flip(with_dcid(initial, rng.randbytes(8)), rng, head, end, 4) for _ in range(burst)],
            "junk",
        ),
        Phase(
            "full-size Initial, corrupted",
            [flip(initial, rng, head, end, 1) for _ in range(5)],
            "junk",
        ),
        Phase(
            "short header, random connection id",
            # long enough to hold a hub connection ID (12 bytes); shorter ones are junk
            [bytes(QUIC_1RTT(PacketNumber=7) / Raw(load=rng.randbytes(n))) for n in (16, 60, 1300)],
            "unknown_cid",
        ),
        Phase(
            "version negotiation to the hub",
            [bytes(QUIC_Version(DstConnID=rng.randbytes(8), SupportedVersions=[1]))],
            "unknown_cid",
        ),
        Phase("other QUIC version, small", [other_version(n) for n in (10, 500, 1100)], "junk"),
        Phase("other QUIC version, full size", [other_version(n) for n in (1200, 1300)], "junk"),
    ]


def test_junk_datagrams_are_counted_and_dropped_while_a_device_keeps_delivering(
    tmp_path: Path, pki: Path
) -> None:
    max_handshakes = 20
    cfg = load_hub_config(
        write_hub_config(tmp_path, pki, server={"max_handshakes": max_handshakes})
    )
    rng = random.Random(1234)
    published: list[int] = []
    report: list[str] = []

    async def main() -> None:
        hub = Hub(cfg)
        await hub.start()
        hub_addr = ("127.0.0.1", hub.port)
        good = await start_good_device(tmp_path, pki, cfg.listen)
        counters = hub.endpoint.counters
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        sender = JunkSender(sock, hub.port)
        initial = captured_initial(pki, hub_addr)
        for phase in junk_phases(initial, rng, burst=2 * max_handshakes):
            before = Counter({k: counters[k] for k in ("junk", "unknown_cid")})
            for i in range(0, len(phase.payloads), 20):  # bursts well inside the socket queue
                sender.send(phase.payloads[i : i + 20])
                sent = i + len(phase.payloads[i : i + 20])
                await until(
                    lambda sent=sent, before=before: (  # type: ignore[misc]
                        counters["junk"] + counters["unknown_cid"] - before.total() == sent
                    ),
                    10,
                    f"{phase.name}: every datagram counted",
                )
            delta = {k: counters[k] - before[k] for k in before}
            if phase.counter is not None:
                assert delta[phase.counter] == len(phase.payloads), (phase.name, delta)
            replies = sender.replies()
            big = [p for p in phase.payloads if len(p) >= 1200]
            # no reflection: nothing answers junk but a Version Negotiation, to full-size ones
            assert len(replies) <= len(big), (phase.name, len(replies))
            for r in replies:
                vn = QUIC_Version(r)
                assert vn.Version == 0 and 1 in vn.SupportedVersions, phase.name
            if phase.name == "other QUIC version, full size":
                assert len(replies) == len(big)
            # no state kept for any of it, so no handshake slot taken
            assert len(hub.endpoint.connections) == 1, phase.name
            report.append(f"{phase.name}: {len(phase.payloads)} -> {delta}, {len(replies)} VN")
            await good.acked_up_to_now()  # the live device is served between the bursts
        # the hub still takes new devices at once: no slot is held by junk
        fresh = await connect_edge(hub_addr, edge_tls(pki, "acme", "fresh"))
        fresh.outbox.add(TELEMETRY, Record(1, 1, "acme.fresh.telemetry.x", {}, 1), 0.0)
        fresh.endpoint.poll(asyncio.get_running_loop().time())
        fresh.driver.flush()
        await until(lambda: any(isinstance(e, Acked) for e in fresh.events), 10, "fresh acked")
        assert fresh.lost() is None and counters["busy_refused"] == 0
        fresh.endpoint.close()
        fresh.driver.flush()
        await good.finish()
        published.extend(good.seqs)
        assert good.agent.stats.reconnects == 0 and good.agent.stats.sessions == 1
        assert hub.ready and not hub.errors
        sock.close()
        fresh.driver.close()
        await good.agent.stop()
        await hub.stop()

    run(main, 90)
    print("\n[hub abuse] " + "\n[hub abuse] ".join(report))
    assert sorted(device_seqs(tmp_path / "hub.db", "good")) == published
    assert device_seqs(tmp_path / "hub.db", "fresh") == [1]


# --- 3. handshakes that never finish ---------------------------------------------------


def test_stalled_handshakes_expire_and_free_their_slots(tmp_path: Path, pki: Path) -> None:
    slots = 10
    cfg = load_hub_config(
        write_hub_config(tmp_path, pki, server={"max_handshakes": slots, "busy_retry_after_ms": 50})
    )
    outcome: dict[str, Any] = {}

    async def main() -> None:
        hub = Hub(cfg)
        hub.endpoint.limits.handshake_timeout_s = 1.0  # the default (10 s) makes a slow test
        await hub.start()
        hub_addr = ("127.0.0.1", hub.port)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        # real client Initials, each of its own connection, that nobody ever follows up:
        # a client that went away, or an attacker holding handshakes open
        JunkSender(sock, hub.port).send([captured_initial(pki, hub_addr) for _ in range(slots)])
        await until(lambda: len(hub.endpoint.connections) == slots, 10, "stalled handshakes")
        refused = await connect_edge(hub_addr, edge_tls(pki, "acme", "late"))
        await until(lambda: refused.lost() is not None, 10, "refused")
        lost = refused.lost()
        assert lost is not None
        outcome["refused"] = (lost.reason, lost.retry_after_ms, lost.handshake_done)
        refused.driver.close()
        # the stalled ones expire; their slots come back
        await until(lambda: not hub.endpoint.connections, 10, "stalled handshakes expired")
        outcome["timeouts"] = hub.endpoint.counters["handshake_timeouts"]
        late = await connect_edge(hub_addr, edge_tls(pki, "acme", "late"))
        await until(lambda: any(isinstance(e, Welcomed) for e in late.events), 10, "late in")
        outcome["late_lost"] = late.lost()
        late.driver.close()
        sock.close()
        await hub.stop()

    run(main)
    reason, retry_after_ms, handshake_done = outcome["refused"]
    assert reason == "busy; retry-after-ms=50" and retry_after_ms == 50 and not handshake_done
    assert outcome["timeouts"] == slots
    assert outcome["late_lost"] is None


def test_a_handshake_message_that_never_ends_is_cut_off(tmp_path: Path, pki: Path) -> None:
    cfg = load_hub_config(write_hub_config(tmp_path, pki))
    outcome: dict[str, Any] = {}

    async def main() -> None:
        hub = Hub(cfg)
        await hub.start()
        hub_addr = ("127.0.0.1", hub.port)
        # No certificate needed: after its ClientHello this client announces a 16 MiB
        # handshake message and keeps sending it, never reading the hub's answer (so it
        # stays in the Initial epoch, where nothing authenticates it).
        edge = await connect_edge(hub_addr, edge_tls(pki, "acme", "flooder", key=False))
        edge.endpoint.quic.tls.handle_message = lambda data, out: None  # type: ignore[method-assign]
        stream = edge.endpoint.quic._crypto_streams[tls.Epoch.INITIAL]
        stream.sender.write(b"\x0b\xff\xff\xff")  # a Certificate message of 16 MiB - 1 ...
        for _ in range(100):
            stream.sender.write(random.Random(3).randbytes(10_000))  # ... that never ends
        edge.endpoint.wrote_to_quic()
        edge.driver.flush()
        await until(lambda: edge.lost() is not None, 20, "flooder cut off")
        lost = edge.lost()
        assert lost is not None
        outcome["lost"] = (lost.code, lost.reason)
        outcome["counter"] = hub.endpoint.counters["tls_backlog_exceeded"]
        outcome["connections"] = len(hub.endpoint.connections)
        edge.driver.close()
        await hub.stop()

    run(main)
    assert outcome["lost"] == (QuicErrorCode.CRYPTO_BUFFER_EXCEEDED, "TLS message too large")
    assert outcome["counter"] == 1 and outcome["connections"] == 0


def test_silent_authenticated_devices_are_revoked_and_shut_down_cleanly(
    tmp_path: Path, pki: Path
) -> None:
    deny = tmp_path / "deny.txt"
    deny.write_text("")
    cfg = load_hub_config(write_hub_config(tmp_path, pki, deny_list=str(deny)))
    outcome: dict[str, Any] = {}

    async def silent(hub_addr: tuple[str, int], device: str) -> tuple[QuicConnection, list[Any]]:
        """A device that authenticates and then never opens a stream (no HELLO at all)."""
        files = edge_tls(pki, "acme", device)
        qc = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name="localhost")
        qc.cadata = b"".join(c.public_bytes(Encoding.PEM) for c in files.roots)
        qc.certificate, qc.private_key = files.cert, files.key
        quic = QuicConnection(configuration=qc)
        events: list[Any] = []

        def collect() -> None:
            while (ev := quic.next_event()) is not None:
                events.append(ev)

        quic.connect(hub_addr, asyncio.get_running_loop().time())
        (await open_driver(quic, ("127.0.0.1", 0), collect)).flush()
        return quic, events

    def closed(events: list[Any]) -> tuple[int, str] | None:
        ends = [e for e in events if isinstance(e, qe.ConnectionTerminated)]
        return (ends[0].error_code, ends[0].reason_phrase) if ends else None

    async def main() -> None:
        hub = Hub(cfg)
        await hub.start()
        hub_addr = ("127.0.0.1", hub.port)
        _, mute1 = await silent(hub_addr, "mute1")
        _, mute2 = await silent(hub_addr, "mute2")
        conns = hub.endpoint.connections
        # both authenticated: the hub has a session for each, and no stream from either
        await until(lambda: len(conns) == 2 and all(c.handshake_done for c in conns.values()))
        assert all(c.session is not None for c in conns.values())
        deny.write_text("mute1\n")
        assert hub.reload_deny_list() == 1  # closes mute1 (it must not raise)
        await until(lambda: closed(mute1) is not None, 10, "mute1 revoked")
        outcome["revoked"] = closed(mute1)
        await hub.stop()  # closes mute2 with GOING_AWAY (it must not raise)
        await until(lambda: closed(mute2) is not None, 10, "mute2 told")
        outcome["stopped"] = closed(mute2)

    run(main)
    assert outcome["revoked"] == (ErrorCode.REVOKED, "device acme/mute1 is revoked")
    assert outcome["stopped"] == (ErrorCode.GOING_AWAY, "hub shutting down")


BAD_HEARTBEAT = Heartbeat({"seq": 5, "d": {"1": [0, b"\xff"]}, "drop": b"\x00"})


def test_a_malformed_heartbeat_closes_only_its_sender_and_the_device_api_carries_on(
    tmp_path: Path, pki: Path
) -> None:
    """Heartbeats end up in /v1/devices as JSON: one with bytes in it must not get that far."""
    cfg = load_hub_config(write_hub_config(tmp_path, pki))
    outcome: dict[str, Any] = {}

    async def get_devices(port: int) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{port}/v1/devices"
        auth = {"Authorization": "Bearer s3cret"}
        async with aiohttp.ClientSession() as http, http.get(url, headers=auth) as r:
            return r.status, await r.json() if r.status == 200 else await r.text()

    async def main() -> None:
        hub = Hub(cfg)
        await hub.start()
        runner, port = await start_http(hub)
        good = await start_good_device(tmp_path, pki, cfg.listen)
        devices = hub.presence.devices
        await until(lambda: bool(devices[("acme", "good")].heartbeat), 10, "good heartbeat")
        bad = await abuse(
            ("127.0.0.1", hub.port),
            edge_tls(pki, "acme", "badbeat"),
            Abuse("badbeat", ErrorCode.BAD_FIELD, datagram=encode_heartbeat(BAD_HEARTBEAT)),
        )
        lost = bad.lost()
        assert lost is not None
        outcome["lost"] = (lost.code, lost.reason)
        outcome["api"] = await get_devices(port)
        await good.acked_up_to_now()  # served on
        await good.finish()
        outcome["good"] = (good.agent.stats.sessions, good.agent.stats.reconnects)
        outcome["errors"] = dict(hub.errors)
        bad.driver.close()
        await good.agent.stop()
        await hub.stop()
        await runner.cleanup()

    run(main)
    assert outcome["lost"] == (ErrorCode.BAD_FIELD, "heartbeat: a bytes value")
    status, body = outcome["api"]
    assert status == 200, body
    rows = {d["device"]: d for d in body["devices"]}
    assert rows["good"]["presence"] == "online" and rows["good"]["spool_depth"]
    assert rows["badbeat"]["spool_depth"] == {}  # its heartbeat was never taken
    assert outcome["good"] == (1, 0)
    assert outcome["errors"] == {"BAD_FIELD": 1}


def _welcomed(edge: Edge) -> bool:
    return any(isinstance(e, Welcomed) for e in edge.events)


def test_a_device_cycling_incarnations_holds_only_its_newest_ledgers(
    tmp_path: Path, pki: Path
) -> None:
    """Every HELLO names an incarnation and a new one gets a dedup ledger: a device naming
    one after another must not grow the hub's memory (4 per device, the rest evicted)."""
    cfg = load_hub_config(write_hub_config(tmp_path, pki))
    outcome: dict[str, Any] = {}

    async def main() -> None:
        hub = Hub(cfg)
        await hub.start()
        runner, port = await start_http(hub)
        good = await start_good_device(tmp_path, pki, cfg.listen)
        files = edge_tls(pki, "acme", "flapper")
        for incarnation in range(1, 13):
            edge = await connect_edge(("127.0.0.1", hub.port), files, incarnation=incarnation)
            await until(partial(_welcomed, edge), 10, "welcomed")
            edge.endpoint.close(ErrorCode.GOING_AWAY, "next incarnation")
            edge.driver.flush()
            edge.driver.close()
        outcome["held"] = hub.ledgers.incarnations("acme", "flapper")
        outcome["total"] = (hub.ledgers.held, hub.ledgers.evicted)
        url = f"http://127.0.0.1:{port}/metrics"
        auth = {"Authorization": "Bearer s3cret"}
        async with aiohttp.ClientSession() as http, http.get(url, headers=auth) as r:
            outcome["metrics"] = await r.text()
        await good.acked_up_to_now()  # served on
        await good.finish()
        outcome["good"] = (good.agent.stats.sessions, good.agent.stats.reconnects)
        await good.agent.stop()
        await hub.stop()
        await runner.cleanup()

    run(main)
    assert outcome["held"] == [9, 10, 11, 12]
    assert outcome["total"] == (5, 8)  # the flapper's 4 and the good device's one
    metrics = outcome["metrics"]
    assert "squall_hub_ledgers 5.0" in metrics
    assert "squall_hub_ledgers_evicted_total 8.0" in metrics
    assert outcome["good"] == (1, 0)

"""Transport over real UDP sockets on loopback: auth, batches, 0-RTT and replay, rebinding."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from transport import certs
from transport.events import Acked
from transport.quic import Connected, EdgeTls
from transport.wire import Lane

from .quicharness import add_records, connect_edge, edge_tls, start_hub, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    certs.init_dir(tmp_path)
    return tmp_path


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_batch_acked_and_identity_from_certificate(ca_dir: Path) -> None:
    async def main() -> None:
        hub = await start_hub(ca_dir)
        files = edge_tls(ca_dir, "acme", "truck-042")
        edge = await connect_edge(hub.addr, files)
        # the payload claims to be someone else: the hub refuses, identity is the certificate's
        add_records(edge.outbox, Lane.TELEMETRY, 1, 50, "acme.truck-042")
        edge.endpoint.poll(asyncio.get_running_loop().time())
        edge.driver.flush()
        await wait_for(lambda: edge.outbox.depth(Lane.TELEMETRY) == 0)
        assert len(hub.log) == 50
        assert {(t, d) for t, d, _, _ in hub.log} == {("acme", "truck-042")}
        assert any(isinstance(e, Acked) for e in edge.events)
        assert any(isinstance(e, Connected) for e in edge.events)

    run(main())


def test_payload_cannot_claim_another_identity(ca_dir: Path) -> None:
    async def main() -> None:
        hub = await start_hub(ca_dir)
        edge = await connect_edge(hub.addr, edge_tls(ca_dir, "acme", "truck-1"))
        add_records(edge.outbox, Lane.BULK, 1, 3, "globex.truck-9")
        edge.endpoint.poll(asyncio.get_running_loop().time())
        edge.driver.flush()
        await wait_for(lambda: edge.lost() is not None)
        lost = edge.lost()
        assert lost is not None and "outside acme.truck-1." in lost.reason
        assert hub.log == []

    run(main())


def _refused(ca_dir: Path, files: EdgeTls) -> tuple[str, int]:
    async def main() -> tuple[str, int]:
        hub = await start_hub(ca_dir)
        edge = await connect_edge(hub.addr, files)
        await wait_for(lambda: edge.lost() is not None)
        lost = edge.lost()
        assert lost is not None
        await wait_for(lambda: hub.endpoint.counters["auth_failed"] >= 1)
        assert hub.sessions == []
        return lost.reason, lost.code

    return asyncio.run(asyncio.wait_for(main(), 30))


def test_refused_without_certificate_key(ca_dir: Path) -> None:
    reason, code = _refused(ca_dir, edge_tls(ca_dir, "acme", "t1", key=False))
    assert "no client certificate" in reason
    assert code >= 0x100  # a TLS alert


def test_refused_with_certificate_of_another_ca(ca_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    certs.init_dir(other)
    files = edge_tls(other, "acme", "t1")
    files.roots = [certs.load_cert(ca_dir / "ca.pem")]  # trusts the real hub
    reason, _ = _refused(ca_dir, files)
    assert "not signed by a trusted Squall CA" in reason


def test_refused_with_expired_certificate(ca_dir: Path) -> None:
    ca = certs.load_cert(ca_dir / "ca.pem")
    ca_key = certs.load_key(ca_dir / "ca.key")
    past = datetime.now(UTC) - timedelta(days=30)
    cert, key = certs.make_device_cert(ca, ca_key, "acme", "old", days=10, now=past)
    reason, _ = _refused(ca_dir, EdgeTls([ca], cert, key))
    assert "expired" in reason


def test_refused_with_someone_elses_key(ca_dir: Path) -> None:
    files = edge_tls(ca_dir, "acme", "t1")
    files.key = certs.load_key(certs.issue_device(ca_dir, "acme", "t2")[1])
    _refused(ca_dir, files)


def test_no_certificate_at_all_is_refused(ca_dir: Path) -> None:
    # a client with no certificate configured: aioquic sends an empty Certificate
    files = EdgeTls([certs.load_cert(ca_dir / "ca.pem")], None, None)  # type: ignore[arg-type]
    reason, _ = _refused(ca_dir, files)
    assert "no client certificate" in reason


def test_zero_rtt_resumption_and_replay_stored_once(ca_dir: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        hub = await start_hub(ca_dir)
        files = edge_tls(ca_dir, "acme", "t1")
        first = await connect_edge(hub.addr, files)
        add_records(first.outbox, Lane.TELEMETRY, 1, 5, "acme.t1")
        first.endpoint.poll(loop.time())
        first.driver.flush()
        await wait_for(lambda: len(hub.log) == 5 and first.tickets)
        first.endpoint.close()
        first.driver.flush()
        first.driver.close()

        outbox = first.outbox
        add_records(outbox, Lane.TELEMETRY, 6, 5, "acme.t1")
        second = await connect_edge(hub.addr, files, outbox, first.tickets[-1], record=True)
        await wait_for(lambda: len(hub.log) == 10)
        connected = [e for e in second.events if isinstance(e, Connected)]
        assert connected and connected[0].session_resumed and connected[0].early_data
        # the first flight carried the batch: the records were accepted from early data
        # the hub counts the resumption when the client's Finished arrives (a moment later)
        await wait_for(lambda: hub.endpoint.counters["resumed"] == 1)

        # an attacker replays the captured first flight (ClientHello + 0-RTT DATA) from
        # another address: once while the session lives, once after it has closed
        first_flight = second.sent[:2]
        attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        attacker.bind(("127.0.0.1", 0))
        for d in first_flight:
            attacker.sendto(d, hub.addr)
        await asyncio.sleep(0.3)
        second.endpoint.close()
        second.driver.flush()
        await wait_for(lambda: not hub.endpoint.connections)
        for d in first_flight:
            attacker.sendto(d, hub.addr)
        await asyncio.sleep(0.5)
        attacker.close()
        assert len(hub.log) == 10
        assert len({(t, d, s) for t, d, s, _ in hub.log}) == 10
        assert hub.endpoint.tickets.unknown >= 1  # the single-use ticket was refused

    run(main())


def test_rebinding_keeps_the_session(ca_dir: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        hub = await start_hub(ca_dir)
        edge = await connect_edge(hub.addr, edge_tls(ca_dir, "acme", "t1"))
        add_records(edge.outbox, Lane.TELEMETRY, 1, 20, "acme.t1")
        edge.endpoint.poll(loop.time())
        edge.driver.flush()
        await wait_for(lambda: len(hub.log) == 20)
        assert len(hub.sessions) == 1
        old_addr = hub.sessions[0].peer_addr

        # NAT rebinding: the same connection now speaks from another source port
        old = edge.driver
        new_transport, _ = await loop.create_datagram_endpoint(
            lambda: old, local_addr=("127.0.0.1", 0)
        )
        old_transport = old.transport
        old.transport = new_transport  # type: ignore[assignment]
        assert old_transport is not None
        old_transport.close()
        add_records(edge.outbox, Lane.TELEMETRY, 21, 20, "acme.t1")
        edge.endpoint.poll(loop.time())
        edge.driver.flush()
        await wait_for(lambda: len(hub.log) == 40)
        await wait_for(lambda: hub.sessions[0].peer_addr != old_addr)
        assert len(hub.sessions) == 1
        assert hub.endpoint.counters["handshakes"] == 1
        assert [s for _, _, s, _ in hub.log] == list(range(1, 41))

    run(main())

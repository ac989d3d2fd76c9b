"""A peer's QUIC protocol violation is counted, closes only its connection, and is not an
operator's WARNING (aioquic logs it so; transport/quic.py demotes it to DEBUG).

The case seen in the demo: a device's Initial that carries no CRYPTO frame (a late probe
for a handshake the hub already dropped) arrives as the first packet of a connection.
"""

from __future__ import annotations

import logging
import os

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicFrameType, QuicPacketType, QuicProtocolVersion
from aioquic.quic.packet_builder import QuicPacketBuilder

from transport import certs
from transport.quic import HubConnection, HubEndpoint, HubTls
from transport.session import DeviceLedger, HubSession

DEVICE = ("10.1.0.1", 5000)


def _hub() -> HubEndpoint:
    ca, ca_key = certs.make_ca("test CA")
    cert, key = certs.make_hub_cert(ca, ca_key, ["localhost"])

    def session(conn: HubConnection, now: float) -> HubSession:
        assert conn.identity is not None
        return HubSession(
            conn.identity.tenant, conn.identity.device, lambda inc: DeviceLedger(inc), now
        )

    return HubEndpoint(HubTls(cert, key, [ca]), session, lambda ident: True)


def _initial_without_crypto() -> bytes:
    """A client Initial with a PING and padding only, sealed with real Initial keys."""
    dcid, scid = os.urandom(8), os.urandom(8)
    crypto = CryptoPair()
    crypto.setup_initial(dcid, is_client=True, version=QuicProtocolVersion.VERSION_1)
    builder = QuicPacketBuilder(
        host_cid=scid,
        peer_cid=dcid,
        version=QuicProtocolVersion.VERSION_1,
        is_client=True,
        max_datagram_size=1200,
    )
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    builder.start_frame(QuicFrameType.PING)
    pad = builder.start_frame(QuicFrameType.PADDING)
    pad.push_bytes(bytes(builder.remaining_flight_space - 32))
    datagrams, _ = builder.flush()
    assert len(datagrams) == 1 and len(datagrams[0]) >= 1100
    return datagrams[0]


def test_an_initial_without_crypto_is_counted_closed_and_logged_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = _hub()
    caplog.set_level(logging.WARNING)
    hub.receive_datagram(_initial_without_crypto(), DEVICE, 1000.0)
    replies = hub.datagrams_to_send(1000.0)
    assert replies and all(addr == DEVICE for _, addr in replies)  # CONNECTION_CLOSE to it
    hub.handle_timer(1010.0)
    assert hub.counters["handshake_errors"] == 1
    assert hub.counters["auth_failed"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="quic")
    hub.receive_datagram(_initial_without_crypto(), DEVICE, 1020.0)
    hub.handle_timer(1030.0)
    demoted = [
        r
        for r in caplog.records
        if "Error: 10, reason: Packet contains no CRYPTO" in r.getMessage()
    ]
    assert [r.levelname for r in demoted] == ["DEBUG"]
    assert hub.counters["handshake_errors"] == 2


def test_other_aioquic_warnings_pass_unchanged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    conn = QuicConnection(configuration=QuicConfiguration(is_client=True))
    conn._logger.warning("Could not find a common protocol version")
    assert [r.levelname for r in caplog.records] == ["WARNING"]

"""Pins the aioquic behaviour device auth relies on, and the ticket store's rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aioquic import tls

from transport.auth import TicketStore, check_library, decode_ticket, encode_ticket
from transport.certs import DeviceIdentity


def _ticket(label: bytes) -> tls.SessionTicket:
    now = datetime.now(UTC)
    return tls.SessionTicket(
        age_add=7,
        cipher_suite=tls.CipherSuite.AES_128_GCM_SHA256,
        not_valid_after=now + timedelta(days=1),
        not_valid_before=now,
        resumption_secret=b"s" * 32,
        server_name="localhost",
        ticket=label,
        max_early_data_size=0xFFFFFFFF,
        other_extensions=[(0x39, b"params")],
    )


def test_stock_aioquic_server_does_not_request_client_certificates() -> None:
    # If this ever flips, aioquic started doing part of our job: revisit transport/auth.py.
    ctx = tls.Context(is_client=False)
    assert ctx._request_client_certificate is False
    check_library(ctx)


def test_stock_server_does_not_validate_a_client_chain() -> None:
    # the server-side certificate handler only parses; chain checks happen in verify paths
    # that the server never calls (this is why auth.py hooks _server_handle_certificate_verify)
    import inspect

    src = inspect.getsource(tls.Context._server_handle_certificate_verify)
    assert "verify_certificate(" not in src


def test_ticket_store_is_single_use_and_bounded() -> None:
    store = TicketStore(max_entries=2)
    ident = DeviceIdentity("acme", "t1", 1, datetime.now(UTC))
    for label in (b"a", b"b", b"c"):
        store.add(_ticket(label), ident)
    assert len(store) == 2 and store.evicted == 1
    assert store.take(b"a") is None  # evicted
    got = store.take(b"b")
    assert got is not None and got[1] == ident
    assert store.take(b"b") is None  # single use
    assert store.resumed == 1 and store.unknown == 2


def test_ticket_round_trip_and_damage() -> None:
    t = _ticket(b"x" * 64)
    back = decode_ticket(encode_ticket(t))
    assert back is not None
    assert back.ticket == t.ticket and back.resumption_secret == t.resumption_secret
    assert back.other_extensions == t.other_extensions and back.cipher_suite == t.cipher_suite
    assert decode_ticket(b"\x00garbage") is None

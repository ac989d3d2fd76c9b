"""Real device authentication on top of aioquic's TLS 1.3 (which does not do it by itself).

aioquic 1.7.2's server never requests a client certificate (``_request_client_certificate``
is hard-wired off "for test purposes"), and when forced on it checks only the
CertificateVerify signature (proof that the peer holds the key), never the chain.
This module switches the request on per connection and hooks the two server steps:

* ``_server_handle_certificate``: an empty Certificate (no client certificate) is refused;
* ``_server_handle_certificate_verify``: after aioquic's signature check, the chain is
  verified against the Squall CA with ``transport.certs.verify_device_certificate``
  and the identity (tenant from O, device from CN) is handed to the caller.

Refusals are TLS alerts, so the handshake fails on both sides with the reason.
Resumed sessions carry no certificate: the hub's ``TicketStore`` binds every ticket it
issues to the identity that earned it, and hands a ticket out only once (which also
bounds 0-RTT replay).  ``check_library`` pins the private names this relies on;
tests/unit/test_auth.py pins the behaviour.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgpack
from aioquic import tls
from cryptography import x509

from transport.certs import DeviceIdentity, verify_device_certificate
from transport.errors import AuthError

Clock = Callable[[], datetime]
IdentityCallback = Callable[[DeviceIdentity], None]

_PINNED = (
    "_request_client_certificate",
    "_server_handle_certificate",
    "_server_handle_certificate_verify",
    "_peer_certificate",
    "_peer_certificate_chain",
    "_receive_buffer",  # hub: bounds TLS bytes buffered before auth (transport/quic.py)
)


def wall_clock() -> datetime:
    """The real time, for certificate validity (the virtual-time harness passes its own)."""
    return datetime.now(UTC)


def check_library(ctx: tls.Context) -> None:
    """Fail loudly if aioquic no longer has the internals the device check hooks into."""
    missing = [name for name in _PINNED if not hasattr(ctx, name)]
    if missing:
        raise RuntimeError(f"aioquic changed: tls.Context lacks {missing}; device auth unsafe")


def require_client_certificate(
    ctx: tls.Context,
    roots: list[x509.Certificate],
    on_identity: IdentityCallback,
    authorize: Callable[[DeviceIdentity], None],
    clock: Clock = wall_clock,
) -> None:
    """Make this server TLS context demand and verify a device certificate."""
    check_library(ctx)
    ctx._request_client_certificate = True
    handle_certificate = ctx._server_handle_certificate
    handle_verify = ctx._server_handle_certificate_verify

    def on_certificate(input_buf: Any) -> None:
        handle_certificate(input_buf)
        if ctx._peer_certificate is None:
            raise AuthAlert("no client certificate: a device must present one")

    def on_verify(input_buf: Any) -> None:
        handle_verify(input_buf)  # aioquic: the signature proves the key is held
        if ctx._peer_certificate is None:
            raise AuthAlert("no client certificate")
        try:
            identity = verify_device_certificate(
                ctx._peer_certificate, ctx._peer_certificate_chain, roots, clock()
            )
            authorize(identity)
        except AuthError as exc:
            if "expired" in str(exc) or "not yet valid" in str(exc):
                raise tls.AlertCertificateExpired(str(exc)) from exc
            raise AuthAlert(str(exc)) from exc
        on_identity(identity)

    ctx._server_handle_certificate = on_certificate  # type: ignore[method-assign]
    ctx._server_handle_certificate_verify = on_verify  # type: ignore[method-assign]


class AuthAlert(tls.AlertBadCertificate):
    """A refused device certificate (TLS bad_certificate alert, with the reason)."""


# What aioquic 1.7.2's server reads from a ticket its fetcher returns (tls.py
# _server_handle_hello): is_valid (the two validity times), cipher_suite and
# resumption_secret.  The rest of a SessionTicket (the server's transport parameters, the
# age obfuscation, the server name) is for clients; a hub holds one ticket per device, so it
# keeps only these (~350 bytes a ticket instead of ~1 KB).
_Kept = tuple[tls.CipherSuite, float, float, bytes, DeviceIdentity]


class TicketStore:
    """Hub-side session tickets: bound to an identity, single use, bounded (oldest dropped)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._tickets: OrderedDict[bytes, _Kept] = OrderedDict()
        self.max_entries = max_entries
        self.issued = 0
        self.resumed = 0
        self.unknown = 0
        self.evicted = 0

    def add(self, ticket: tls.SessionTicket, identity: DeviceIdentity) -> None:
        """Remember a ticket the hub just issued to ``identity``."""
        self._tickets[ticket.ticket] = (
            ticket.cipher_suite,
            ticket.not_valid_before.timestamp(),
            ticket.not_valid_after.timestamp(),
            ticket.resumption_secret,
            identity,
        )
        self.issued += 1
        while len(self._tickets) > self.max_entries:
            self._tickets.popitem(last=False)
            self.evicted += 1

    def take(self, label: bytes) -> tuple[tls.SessionTicket, DeviceIdentity] | None:
        """The ticket (what a server reads of it) and its identity, removed so it cannot be
        used again (None if unknown)."""
        entry = self._tickets.pop(label, None)
        if entry is None:
            self.unknown += 1
            return None
        self.resumed += 1
        suite, not_before, not_after, secret, identity = entry
        ticket = tls.SessionTicket(
            age_add=0,
            cipher_suite=suite,
            not_valid_after=datetime.fromtimestamp(not_after, UTC),
            not_valid_before=datetime.fromtimestamp(not_before, UTC),
            resumption_secret=secret,
            server_name="",
            ticket=label,
        )
        return ticket, identity

    def __len__(self) -> int:
        return len(self._tickets)


# --- edge-side ticket persistence ---------------------------------------------------


def encode_ticket(t: tls.SessionTicket) -> bytes:
    """Serialise a client session ticket for the edge's disk (explicit fields, no pickle)."""
    return bytes(
        msgpack.packb(
            [
                t.age_add,
                int(t.cipher_suite),
                t.not_valid_after.timestamp(),
                t.not_valid_before.timestamp(),
                t.resumption_secret,
                t.server_name,
                t.ticket,
                t.max_early_data_size,
                [[k, v] for k, v in t.other_extensions],
            ],
            use_bin_type=True,
        )
    )


def decode_ticket(data: bytes) -> tls.SessionTicket | None:
    """The ticket from ``encode_ticket`` bytes, or None if they are damaged."""
    try:
        f = msgpack.unpackb(data, raw=False, max_bin_len=1 << 16, max_str_len=1 << 12)
        return tls.SessionTicket(
            age_add=int(f[0]),
            cipher_suite=tls.CipherSuite(f[1]),
            not_valid_after=datetime.fromtimestamp(f[2], UTC),
            not_valid_before=datetime.fromtimestamp(f[3], UTC),
            resumption_secret=bytes(f[4]),
            server_name=str(f[5]),
            ticket=bytes(f[6]),
            max_early_data_size=f[7],
            other_extensions=[(int(k), bytes(v)) for k, v in f[8]],
        )
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, msgpack.ExtraData):
        return None

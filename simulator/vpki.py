"""Certificates for the virtual-time fleet, made so that every handshake has the same size.

The link model's fate for a packet depends on its size (serialisation time, MTU, the
corrupted bit), so a run is reproducible only if packet sizes are.  Two things in a TLS
handshake vary in length from run to run with P-256 keys:

* every ECDSA signature is DER: r and s take 32 or 33 bytes each (a leading zero when the
  top bit is set), so a CertificateVerify is 70 to 72 bytes;
* a certificate carries the CA's signature and a random serial number.

``FixedLengthKey`` signs again until the signature has the longest encoding (72 bytes;
on average four tries, each a few tens of microseconds), and ``VirtualPki`` keeps only
certificates whose signature and serial have their longest encodings.  The contents stay
random (keys, nonces); only the lengths are pinned.  Validity starts at the virtual epoch:
the hub checks device certificates against simulated time, while aioquic's client checks
the hub certificate against the real clock, so the CA and hub certificates last a century.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    KeySerializationEncryption,
    PrivateFormat,
)

from simulator.vclock import VIRTUAL_EPOCH
from transport import certs
from transport.quic import EdgeTls, HubTls

_P256_MAX_SIGNATURE: Final = 72  # SEQUENCE(2) + 2 x INTEGER(2 + 33)
_SERIAL_MIN_BITS: Final = 153  # a 159-bit random serial encodes in 20 bytes from here on
_MAX_TRIES: Final = 10_000  # 2**-4000 odds of needing more; a bug if ever reached
_CENTURY_DAYS: Final = 36_500


class FixedLengthKey(ec.EllipticCurvePrivateKey):
    """A P-256 private key whose DER signatures always have the longest encoding."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"FixedLengthKey needs a P-256 key, not {key.curve.name}")
        self._key = key

    def sign(self, data: Any, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """An ECDSA signature of ``data``, re-drawn until it is 72 bytes long."""
        for _ in range(_MAX_TRIES):
            signature = self._key.sign(data, signature_algorithm)
            if len(signature) == _P256_MAX_SIGNATURE:
                return signature
        raise RuntimeError("no 72-byte ECDSA signature in 10,000 tries")  # pragma: no cover

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        """ECDH with the wrapped key."""
        return self._key.exchange(algorithm, peer_public_key)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The wrapped key's public half."""
        return self._key.public_key()

    @property
    def curve(self) -> ec.EllipticCurve:
        """P-256."""
        return self._key.curve

    @property
    def key_size(self) -> int:
        """256."""
        return self._key.key_size

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        """The wrapped key's numbers."""
        return self._key.private_numbers()

    def private_bytes(
        self,
        encoding: Encoding,
        format: PrivateFormat,
        encryption_algorithm: KeySerializationEncryption,
    ) -> bytes:
        """The wrapped key, serialised."""
        return self._key.private_bytes(encoding, format, encryption_algorithm)

    def __copy__(self) -> FixedLengthKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> FixedLengthKey:
        return self


def _canonical(cert: x509.Certificate) -> bool:
    """True when the certificate's variable-length fields have their longest encoding."""
    return (
        len(cert.signature) == _P256_MAX_SIGNATURE
        and cert.serial_number.bit_length() >= _SERIAL_MIN_BITS
    )


class VirtualPki:
    """An in-memory CA, hub certificate and device certificates of fixed encoded sizes."""

    def __init__(self, hub_name: str = "localhost") -> None:
        self.ca_cert, self.ca_key = _retry(
            lambda: certs.make_ca(days=_CENTURY_DAYS, now=VIRTUAL_EPOCH)
        )
        self.hub_name = hub_name
        hub_cert, hub_key = _retry(
            lambda: certs.make_hub_cert(
                self.ca_cert, self.ca_key, [hub_name], days=_CENTURY_DAYS, now=VIRTUAL_EPOCH
            )
        )
        self.hub = HubTls(hub_cert, FixedLengthKey(hub_key), [self.ca_cert])

    def device(self, tenant: str, device: str) -> EdgeTls:
        """Credentials of one device (a new key and certificate each call)."""
        cert, key = _retry(
            lambda: certs.make_device_cert(
                self.ca_cert, self.ca_key, tenant, device, now=VIRTUAL_EPOCH
            )
        )
        return EdgeTls([self.ca_cert], cert, FixedLengthKey(key), self.hub_name)


def _retry(
    make: Callable[[], tuple[x509.Certificate, ec.EllipticCurvePrivateKey]],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """``make()`` again until its certificate is canonical (about four tries)."""
    for _ in range(_MAX_TRIES):
        cert, key = make()
        if _canonical(cert):
            return cert, key
    raise RuntimeError("no canonical certificate in 10,000 tries")  # pragma: no cover

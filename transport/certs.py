"""Development PKI for Squall: make a CA, hub and device certificates, and verify device certs.

What `verify_device_certificate` checks, in order (each failure is an AuthError saying which):

1. the leaf is not a CA certificate (BasicConstraints cA=true is refused);
2. the leaf is valid at ``now`` (expired / not yet valid, with both dates in the message);
3. the leaf's signature verifies against a trusted root (or a supplied intermediate);
4. the leaf carries the clientAuth extended key usage (a hub/server cert is refused);
5. full path validation by ``cryptography.x509.verification`` (webpki rules: signatures,
   validity of every certificate in the path, BasicConstraints, KeyUsage, EKU, key and
   signature algorithms, chain depth);
6. the identity: exactly one CN (device id) and one O (tenant), both valid subject tokens,
   and, if a ``squall://`` URI SAN is present, it names the same tenant and device.

Identity comes only from the certificate the verifier returned, never from anything else.
The library's client verifier refuses end-entity certificates without a SubjectAltName, so
device certificates carry a URI SAN ``squall://<tenant>/<device>``; it is not used as the
identity source, only cross-checked against CN and O.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NoReturn, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from transport.errors import AuthError

PrivateKey = ec.EllipticCurvePrivateKey
TOKEN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
BACKDATE = timedelta(minutes=5)  # tolerate small clock differences between issuer and hub
SAN_SCHEME = "squall://"
DEFAULT_HOSTNAMES = ("localhost", "127.0.0.1", "::1")
_E = TypeVar("_E", bound=x509.ExtensionType)


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Who a verified device certificate says the peer is."""

    tenant: str
    device: str
    serial: int
    not_after: datetime

    @property
    def subject_prefix(self) -> str:
        """The subject prefix this device may publish under, e.g. ``acme.truck-042.``."""
        return f"{self.tenant}.{self.device}."


def check_token(kind: str, value: str) -> None:
    """Raise AuthError unless ``value`` is a valid tenant/device id (one NATS subject token)."""
    if not TOKEN_RE.match(value):
        raise AuthError(
            f"invalid {kind} id {value!r}: use 1-63 letters, digits, '_' or '-', "
            "starting with a letter or digit (no dots, spaces, '*' or '>')"
        )


# --- making certificates -------------------------------------------------------------


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _name(common_name: str, org: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(sign_certs: bool) -> x509.KeyUsage:
    # digital_signature, content_commitment, key_encipherment, data_encipherment,
    # key_agreement, key_cert_sign, crl_sign, encipher_only, decipher_only
    return x509.KeyUsage(True, False, False, False, False, sign_certs, sign_certs, False, False)


def _sign(
    key: PrivateKey,
    subject: x509.Name,
    issuer: tuple[x509.Name, PrivateKey],
    validity: tuple[datetime, datetime],
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> tuple[x509.Certificate, PrivateKey]:
    """Sign a certificate for ``key`` with the issuer's key (SHA-256); return it with ``key``."""
    if validity[1] <= validity[0]:
        raise AuthError(f"certificate would end ({validity[1]}) before it starts ({validity[0]})")
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0])
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical)
    return builder.sign(issuer[1], hashes.SHA256()), key


def _leaf(
    ca: tuple[x509.Certificate, PrivateKey],
    subject: x509.Name,
    validity: tuple[datetime, datetime],
    usage: x509.ObjectIdentifier,
    san: list[x509.GeneralName],
) -> tuple[x509.Certificate, PrivateKey]:
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key())
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_key_usage(sign_certs=False), True),
        (x509.ExtendedKeyUsage([usage]), False),
        (x509.SubjectAlternativeName(san), False),
        (aki, False),
    ]
    key = ec.generate_private_key(ec.SECP256R1())
    return _sign(key, subject, (ca[0].subject, ca[1]), validity, extensions)


def _days_from(now: datetime | None, days: int) -> tuple[datetime, datetime]:
    start = _utc(now) - BACKDATE
    return start, start + timedelta(days=days)


def make_ca(
    common_name: str = "Squall development CA", days: int = 3650, now: datetime | None = None
) -> tuple[x509.Certificate, PrivateKey]:
    """Make a self-signed P-256 CA that may sign leaf certificates only (pathLen 0)."""
    name = _name(common_name, "Squall")
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (_key_usage(sign_certs=True), True),
    ]
    key = ec.generate_private_key(ec.SECP256R1())
    return _sign(key, name, (name, key), _days_from(now, days), extensions)


def _san_entry(hostname: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        pass
    if not hostname or not hostname.isascii() or " " in hostname:
        raise AuthError(f"invalid hub hostname {hostname!r}")
    return x509.DNSName(hostname)


def make_hub_cert(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    hostnames: list[str] | None = None,
    days: int = 825,
    now: datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """Make the hub's TLS server certificate for ``hostnames`` (DNS names and IP addresses)."""
    names = list(hostnames) if hostnames is not None else list(DEFAULT_HOSTNAMES)
    if not names:
        raise AuthError("the hub certificate needs at least one hostname")
    san = [_san_entry(h) for h in names]
    subject = _name(names[0], "Squall")
    validity = _days_from(now, days)
    return _leaf((ca_cert, ca_key), subject, validity, ExtendedKeyUsageOID.SERVER_AUTH, san)


def make_device_cert(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    tenant: str,
    device: str,
    days: int = 397,
    now: datetime | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """Make a device client certificate: CN=device, O=tenant, clientAuth, URI SAN."""
    check_token("tenant", tenant)
    check_token("device", device)
    start = _utc(not_before) if not_before is not None else _utc(now) - BACKDATE
    end = _utc(not_after) if not_after is not None else start + timedelta(days=days)
    san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(_device_uri(tenant, device))]
    subject = _name(device, tenant)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH
    return _leaf((ca_cert, ca_key), subject, (start, end), usage, san)


def _device_uri(tenant: str, device: str) -> str:
    return f"{SAN_SCHEME}{tenant}/{device}"


# --- files ---------------------------------------------------------------------------


def _write_file(path: str | Path, data: bytes, mode: int) -> Path:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        os.fchmod(fd, mode)  # the umask or an older file must not widen the mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except OSError as exc:
        raise AuthError(f"{p}: cannot write: {exc.strerror}") from exc
    return p


def write_pem(path: str | Path, cert: x509.Certificate) -> Path:
    """Write one certificate as PEM (mode 0644)."""
    return _write_file(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def write_key(path: str | Path, key: PrivateKey) -> Path:
    """Write a private key as unencrypted PKCS#8 PEM, readable by the owner only (0600)."""
    pkcs8 = serialization.PrivateFormat.PKCS8
    data = key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())
    return _write_file(path, data, 0o600)


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AuthError(f"{path}: cannot read: {exc.strerror}") from exc


def load_certs(path: str | Path) -> list[x509.Certificate]:
    """Load a PEM bundle of one or more certificates."""
    try:
        return x509.load_pem_x509_certificates(_read(path))
    except ValueError as exc:
        raise AuthError(f"{path}: not a PEM certificate file: {exc}") from exc


def load_cert(path: str | Path) -> x509.Certificate:
    """Load the first certificate of a PEM file."""
    return load_certs(path)[0]


def load_key(path: str | Path) -> PrivateKey:
    """Load an unencrypted PEM EC private key."""
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise AuthError(f"{path}: not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AuthError(f"{path}: expected an EC private key, got {type(key).__name__}")
    return key


def init_dir(
    directory: str | Path,
    hostnames: list[str] | None = None,
    *,
    force: bool = False,
    now: datetime | None = None,
) -> dict[str, Path]:
    """Create ca.pem, ca.key, hub.pem and hub.key in ``directory``; never overwrite a CA key."""
    d = Path(directory)
    ca_key_path = d / "ca.key"
    if ca_key_path.exists() and not force:
        raise AuthError(f"{ca_key_path}: already exists; refusing to replace a CA (use --force)")
    ca_cert, ca_key = make_ca(now=now)
    hub_cert, hub_key = make_hub_cert(ca_cert, ca_key, hostnames, now=now)
    return {
        "ca_key": write_key(ca_key_path, ca_key),
        "ca_cert": write_pem(d / "ca.pem", ca_cert),
        "hub_key": write_key(d / "hub.key", hub_key),
        "hub_cert": write_pem(d / "hub.pem", hub_cert),
    }


def issue_device(
    directory: str | Path, tenant: str, device: str, days: int = 397, now: datetime | None = None
) -> tuple[Path, Path]:
    """Issue devices/<tenant>/<device>.pem and .key signed by the CA in ``directory``."""
    check_token("tenant", tenant)
    check_token("device", device)
    d = Path(directory)
    ca_cert, ca_key = load_cert(d / "ca.pem"), load_key(d / "ca.key")
    cert, key = make_device_cert(ca_cert, ca_key, tenant, device, days=days, now=now)
    base = d / "devices" / tenant
    key_path = write_key(base / f"{device}.key", key)
    return write_pem(base / f"{device}.pem", cert), key_path


# --- verification --------------------------------------------------------------------


def _check_validity(leaf: x509.Certificate, now: datetime) -> None:
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now < start:
        raise AuthError(f"certificate is not yet valid: valid from {_iso(start)}, now {_iso(now)}")
    if now > end:
        raise AuthError(f"certificate expired at {_iso(end)} (now {_iso(now)})")


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="seconds")


def _ext(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _issued_by_any(leaf: x509.Certificate, issuers: list[x509.Certificate]) -> bool:
    for issuer in issuers:
        try:
            leaf.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def _one_attr(cert: x509.Certificate, oid: x509.ObjectIdentifier, what: str) -> str:
    values = [a.value for a in cert.subject.get_attributes_for_oid(oid)]
    if len(values) != 1 or not isinstance(values[0], str):
        raise AuthError(f"certificate subject must have exactly one {what}, found {len(values)}")
    return values[0]


def _identity(cert: x509.Certificate) -> DeviceIdentity:
    device = _one_attr(cert, NameOID.COMMON_NAME, "CN (device id)")
    tenant = _one_attr(cert, NameOID.ORGANIZATION_NAME, "O (tenant)")
    check_token("tenant", tenant)
    check_token("device", device)
    san = _ext(cert, x509.SubjectAlternativeName)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier) if san else []
    ours = [u for u in uris if u.startswith(SAN_SCHEME)]
    if any(u != _device_uri(tenant, device) for u in ours):
        raise AuthError(f"certificate SAN {ours} does not match O={tenant!r} CN={device!r}")
    return DeviceIdentity(tenant, device, cert.serial_number, cert.not_valid_after_utc)


def verify_device_certificate(
    leaf: x509.Certificate,
    chain: list[x509.Certificate],
    roots: list[x509.Certificate],
    now: datetime,
) -> DeviceIdentity:
    """Verify a device certificate path to ``roots`` at ``now`` and return its identity."""
    now = _utc(now)
    if not roots:
        raise AuthError("no trusted Squall CA configured")
    basic = _ext(leaf, x509.BasicConstraints)
    if basic is not None and basic.ca:
        raise AuthError("a CA certificate cannot be used as a device certificate")
    _check_validity(leaf, now)
    if not _issued_by_any(leaf, [*roots, *chain]):
        raise AuthError("certificate is not signed by a trusted Squall CA")
    eku = _ext(leaf, x509.ExtendedKeyUsage)
    if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise AuthError("not a device certificate: it lacks the clientAuth extended key usage")
    verifier = PolicyBuilder().store(Store(roots)).time(now).build_client_verifier()
    try:
        verified = verifier.verify(leaf, chain)
    except VerificationError as exc:
        # "candidates exhausted": no path from the leaf to any root in the store.
        if "candidates exhausted" in str(exc):
            raise AuthError(f"certificate is not signed by a trusted Squall CA ({exc})") from exc
        raise AuthError(f"certificate chain rejected: {exc}") from exc
    return _identity(verified.chain[0])


# --- command line --------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of exiting, so cli_certs can return 2."""

    def error(self, message: str) -> NoReturn:
        raise argparse.ArgumentError(None, message)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of days, got {text!r}")
    return int(text)


def _parser() -> _Parser:
    parser = _Parser(prog="squall certs", description="Development certificates for Squall.")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create a CA and a hub certificate")
    init.add_argument("--dir", required=True, type=Path)
    init.add_argument("--hostname", action="append", dest="hostnames", metavar="H")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    dev = sub.add_parser("device", help="issue a device certificate from the CA in --dir")
    dev.add_argument("--dir", required=True, type=Path)
    dev.add_argument("--tenant", required=True)
    dev.add_argument("--device", required=True)
    dev.add_argument("--days", type=_positive, default=397)
    return parser


def cli_certs(argv: list[str]) -> int:
    """Run ``squall certs init|device``; print written paths, return 0, or 2 on error."""
    try:
        args = _parser().parse_args(argv)
        if args.command == "init":
            paths = list(init_dir(args.dir, args.hostnames, force=args.force).values())
        else:
            paths = list(issue_device(args.dir, args.tenant, args.device, args.days))
    except (argparse.ArgumentError, AuthError) as exc:
        print(f"squall certs: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return 0 if exc.code is None else int(exc.code)
    for path in paths:
        print(path)
    return 0

"""Tests for transport.certs: issuing development certificates and verifying device certs."""

from __future__ import annotations

import dataclasses
import ipaddress
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from transport import certs
from transport.errors import AuthError

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
CA = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


@pytest.fixture(scope="module")
def ca() -> CA:
    return certs.make_ca(now=NOW - timedelta(days=30))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _custom_leaf(ca: CA, subject: x509.Name, san_uri: str) -> x509.Certificate:
    """A clientAuth leaf with an arbitrary subject, to test identity rules after verification."""
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san_uri)]), critical=False
        )
        .sign(ca[1], hashes.SHA256())
    )


# --- verification: accepted ----------------------------------------------------------


def test_valid_device_cert_yields_identity_from_certificate(ca: CA) -> None:
    cert, _ = certs.make_device_cert(ca[0], ca[1], "acme", "truck-042", now=NOW)
    ident = certs.verify_device_certificate(cert, [], [ca[0]], NOW + timedelta(days=1))
    assert (ident.tenant, ident.device) == ("acme", "truck-042")
    assert ident.serial == cert.serial_number
    assert ident.not_after == cert.not_valid_after_utc
    assert ident.subject_prefix == "acme.truck-042."
    with pytest.raises(dataclasses.FrozenInstanceError):
        ident.tenant = "other"  # type: ignore[misc]


def test_device_cert_has_the_documented_shape(ca: CA) -> None:
    cert, key = certs.make_device_cert(ca[0], ca[1], "acme", "t1", days=10, now=NOW)
    subject = cert.subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "t1"
    assert subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "acme"
    ext = cert.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ext.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca[0].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert isinstance(key.curve, ec.SECP256R1)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=10)


def test_explicit_validity_window_is_used(ca: CA) -> None:
    start, end = NOW + timedelta(hours=1), NOW + timedelta(hours=2)
    cert, _ = certs.make_device_cert(ca[0], ca[1], "a", "b", not_before=start, not_after=end)
    assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (start, end)
    with pytest.raises(AuthError, match="before it starts"):
        certs.make_device_cert(ca[0], ca[1], "a", "b", not_before=end, not_after=start)


# --- verification: refused -----------------------------------------------------------


def test_expired_cert_refused(ca: CA) -> None:
    cert, _ = certs.make_device_cert(ca[0], ca[1], "acme", "old", days=30, now=NOW - timedelta(60))
    with pytest.raises(AuthError, match="expired") as info:
        certs.verify_device_certificate(cert, [], [ca[0]], NOW)
    assert cert.not_valid_after_utc.isoformat() in str(info.value)


def test_not_yet_valid_cert_refused(ca: CA) -> None:
    start = NOW + timedelta(days=1)
    cert, _ = certs.make_device_cert(
        ca[0], ca[1], "acme", "early", not_before=start, not_after=start + timedelta(days=5)
    )
    with pytest.raises(AuthError, match="not yet valid") as info:
        certs.verify_device_certificate(cert, [], [ca[0]], NOW)
    assert start.isoformat() in str(info.value)


def test_cert_from_another_ca_refused(ca: CA) -> None:
    other = certs.make_ca(now=NOW - timedelta(days=30))  # same subject name, different key
    cert, _ = certs.make_device_cert(other[0], other[1], "acme", "truck-042", now=NOW)
    with pytest.raises(AuthError, match="not signed by a trusted Squall CA"):
        certs.verify_device_certificate(cert, [], [ca[0]], NOW)
    # Supplying the foreign CA as an "intermediate" must not help.
    with pytest.raises(AuthError, match="not signed by a trusted Squall CA"):
        certs.verify_device_certificate(cert, [other[0]], [ca[0]], NOW)


def test_hub_cert_used_as_device_cert_refused(ca: CA) -> None:
    hub, _ = certs.make_hub_cert(ca[0], ca[1], now=NOW)
    with pytest.raises(AuthError, match="clientAuth"):
        certs.verify_device_certificate(hub, [], [ca[0]], NOW)


def test_ca_cert_used_as_device_cert_refused(ca: CA) -> None:
    with pytest.raises(AuthError, match="CA certificate cannot be used"):
        certs.verify_device_certificate(ca[0], [], [ca[0]], NOW)


def test_no_roots_refuses_everything(ca: CA) -> None:
    cert, _ = certs.make_device_cert(ca[0], ca[1], "acme", "t1", now=NOW)
    with pytest.raises(AuthError, match="no trusted"):
        certs.verify_device_certificate(cert, [ca[0]], [], NOW)


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ([(NameOID.COMMON_NAME, "t1")], "one O"),
        ([(NameOID.ORGANIZATION_NAME, "acme")], "one CN"),
        ([(NameOID.ORGANIZATION_NAME, "acme"), (NameOID.COMMON_NAME, "t.1")], "invalid device"),
        ([(NameOID.ORGANIZATION_NAME, "ac*"), (NameOID.COMMON_NAME, "t1")], "invalid tenant"),
    ],
)
def test_bad_subject_refused_after_verification(
    ca: CA, attrs: list[tuple[x509.ObjectIdentifier, str]], message: str
) -> None:
    subject = x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])
    cert = _custom_leaf(ca, subject, "squall://x/y")
    with pytest.raises(AuthError, match=message):
        certs.verify_device_certificate(cert, [], [ca[0]], NOW)


def test_san_naming_another_device_refused(ca: CA) -> None:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme"),
            x509.NameAttribute(NameOID.COMMON_NAME, "t1"),
        ]
    )
    ok = certs.verify_device_certificate(
        _custom_leaf(ca, subject, "squall://acme/t1"), [], [ca[0]], NOW
    )
    assert ok.device == "t1"
    with pytest.raises(AuthError, match="does not match"):
        certs.verify_device_certificate(
            _custom_leaf(ca, subject, "squall://evil/t1"), [], [ca[0]], NOW
        )


# --- names ---------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["a", "acme", "truck-042", "A_b-9", "x" * 63])
def test_good_tokens_accepted(good: str) -> None:
    certs.check_token("device", good)


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "*", ">", "-lead", "_lead", "x" * 64, "é"])
def test_bad_tokens_refused_at_issue_time(ca: CA, bad: str, tmp_path: Path) -> None:
    with pytest.raises(AuthError, match="invalid device id"):
        certs.make_device_cert(ca[0], ca[1], "acme", bad, now=NOW)
    with pytest.raises(AuthError, match="invalid tenant id"):
        certs.make_device_cert(ca[0], ca[1], bad, "truck", now=NOW)
    certs.init_dir(tmp_path, now=NOW)
    with pytest.raises(AuthError, match="invalid tenant id"):
        certs.issue_device(tmp_path, bad, "truck")
    assert not (tmp_path / "devices").exists()


# --- hub certificate -----------------------------------------------------------------


def test_hub_cert_passes_server_verification_for_each_name(ca: CA) -> None:
    hub, _ = certs.make_hub_cert(ca[0], ca[1], ["hub.example", "10.0.0.7", "::1"], now=NOW)
    san = hub.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hub.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
    ]
    builder = PolicyBuilder().store(Store([ca[0]])).time(NOW)
    for name in (x509.DNSName("hub.example"), x509.IPAddress(ipaddress.ip_address("10.0.0.7"))):
        chain = builder.build_server_verifier(name).verify(hub, [])
        assert chain[0] == hub


def test_hub_cert_needs_a_hostname(ca: CA) -> None:
    with pytest.raises(AuthError, match="at least one hostname"):
        certs.make_hub_cert(ca[0], ca[1], [], now=NOW)


# --- files ---------------------------------------------------------------------------


def test_init_dir_writes_files_and_refuses_to_overwrite(tmp_path: Path) -> None:
    paths = certs.init_dir(tmp_path, ["localhost"], now=NOW)
    names = {p.name for p in paths.values()}
    assert names == {"ca.pem", "ca.key", "hub.pem", "hub.key"}
    first_ca = certs.load_cert(tmp_path / "ca.pem")
    with pytest.raises(AuthError, match=r"ca\.key") as info:
        certs.init_dir(tmp_path, now=NOW)
    assert "exists" in str(info.value)
    assert certs.load_cert(tmp_path / "ca.pem") == first_ca  # untouched
    certs.init_dir(tmp_path, force=True, now=NOW)
    assert certs.load_cert(tmp_path / "ca.pem") != first_ca


def test_key_files_are_owner_only(tmp_path: Path) -> None:
    certs.init_dir(tmp_path, now=NOW)
    _, key_path = certs.issue_device(tmp_path, "acme", "t1")
    for path in (tmp_path / "ca.key", tmp_path / "hub.key", key_path):
        assert _mode(path) == 0o600, path
    assert _mode(tmp_path / "ca.pem") == 0o644
    loose = tmp_path / "loose.key"
    loose.write_text("old")
    loose.chmod(0o644)
    certs.write_key(loose, certs.load_key(key_path))
    assert _mode(loose) == 0o600


def test_issued_device_files_round_trip_and_verify(tmp_path: Path) -> None:
    certs.init_dir(tmp_path, now=NOW)
    cert_path, key_path = certs.issue_device(tmp_path, "acme", "truck-7", days=5, now=NOW)
    assert cert_path == tmp_path / "devices" / "acme" / "truck-7.pem"
    assert key_path == tmp_path / "devices" / "acme" / "truck-7.key"
    cert, key = certs.load_cert(cert_path), certs.load_key(key_path)
    assert cert.public_key() == key.public_key()
    ident = certs.verify_device_certificate(cert, [], certs.load_certs(tmp_path / "ca.pem"), NOW)
    assert (ident.tenant, ident.device) == ("acme", "truck-7")


def test_load_certs_reads_a_bundle(tmp_path: Path, ca: CA) -> None:
    other = certs.make_ca(now=NOW)
    bundle = tmp_path / "bundle.pem"
    certs.write_pem(tmp_path / "a.pem", ca[0])
    certs.write_pem(tmp_path / "b.pem", other[0])
    bundle.write_bytes((tmp_path / "a.pem").read_bytes() + (tmp_path / "b.pem").read_bytes())
    assert certs.load_certs(bundle) == [ca[0], other[0]]


def test_unreadable_and_garbage_files_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(AuthError, match=r"garbage\.pem"):
        certs.load_cert(garbage)
    with pytest.raises(AuthError, match=r"garbage\.pem"):
        certs.load_key(garbage)
    with pytest.raises(AuthError, match=r"missing\.key"):
        certs.load_key(tmp_path / "missing.key")
    with pytest.raises(AuthError, match=r"ca\.pem"):
        certs.issue_device(tmp_path, "acme", "t1")  # no CA in this directory


# --- command line --------------------------------------------------------------------


def test_cli_init_and_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    assert certs.cli_certs(["init", "--dir", d, "--hostname", "hub.local"]) == 0
    printed = capsys.readouterr().out.split()
    assert {Path(p).name for p in printed} == {"ca.pem", "ca.key", "hub.pem", "hub.key"}
    hub = certs.load_cert(Path(d) / "hub.pem")
    san = hub.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hub.local"]

    argv = ["device", "--dir", d, "--tenant", "acme", "--device", "t9", "--days", "3"]
    assert certs.cli_certs(argv) == 0
    cert_path, key_path = (Path(p) for p in capsys.readouterr().out.split())
    assert key_path.exists() and _mode(key_path) == 0o600
    cert = certs.load_cert(cert_path)
    roots = [certs.load_cert(Path(d) / "ca.pem")]
    now = cert.not_valid_before_utc + timedelta(minutes=10)
    assert certs.verify_device_certificate(cert, [], roots, now).device == "t9"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["device", "--tenant", "acme", "--device", "a.b"], "invalid device id"),
        (["device", "--tenant", "acme", "--device", "ok", "--days", "0"], "positive"),
        (["device", "--tenant", "acme"], "--device"),
        (["init"], "ca.key"),
        (["rotate"], "invalid choice"),
    ],
)
def test_cli_errors_return_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    certs.init_dir(tmp_path, now=NOW)
    assert certs.cli_certs([*argv, "--dir", str(tmp_path)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("\n") == 1
    assert message in out.err
    assert not (tmp_path / "devices").exists()

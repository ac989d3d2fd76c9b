"""The hub's deny list: device ids match exactly (case counts), serials in any spelling."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from hub.config import load_hub_config
from hub.server import Hub
from transport import certs
from transport.certs import DeviceIdentity
from transport.errors import AuthError

SERIAL = 0x5A17C0FFEE


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[Hub, Path]]:
    """A hub (not started) with an empty deny list file."""
    pki = tmp_path / "certs"
    certs.init_dir(pki)
    deny = tmp_path / "deny.txt"
    deny.write_text("")
    cfg = {
        "tls": {"cert": "certs/hub.pem", "key": "certs/hub.key", "device_ca": "certs/ca.pem"},
        "log": {"path": "hub.db"},
        "http": {"enabled": False},
        "deny_list": "deny.txt",
    }
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(cfg))
    h = Hub(load_hub_config(path))
    try:
        yield h, deny
    finally:
        h.log.close()


def ident(device: str, serial: int = 1) -> DeviceIdentity:
    return DeviceIdentity("acme", device, serial, datetime(2100, 1, 1, tzinfo=UTC))


def revoked(h: Hub, who: DeviceIdentity) -> bool:
    try:
        h._authorize(who)
    except AuthError:
        return True
    return False


def test_a_device_id_with_capitals_is_revoked_and_only_that_one(hub: tuple[Hub, Path]) -> None:
    h, deny = hub
    deny.write_text("Truck-7   # stolen\n\n# truck-8\n")
    assert h.reload_deny_list() == 1
    assert revoked(h, ident("Truck-7"))
    assert not revoked(h, ident("truck-7"))  # another device
    assert not revoked(h, ident("TRUCK-7"))
    assert not revoked(h, ident("truck-8"))  # commented out


@pytest.mark.parametrize(
    "entry", [str(SERIAL), f"{SERIAL:x}", f"{SERIAL:X}", f"{SERIAL:#x}", f"{SERIAL:#X}"]
)
def test_a_certificate_serial_is_revoked_in_any_spelling(hub: tuple[Hub, Path], entry: str) -> None:
    h, deny = hub
    deny.write_text(f"{entry}\n")
    assert h.reload_deny_list() == 1
    assert revoked(h, ident("any-device", SERIAL))
    assert not revoked(h, ident("any-device", SERIAL + 1))


def test_a_reload_replaces_the_list(hub: tuple[Hub, Path]) -> None:
    h, deny = hub
    deny.write_text("Truck-7\n")
    h.reload_deny_list()
    deny.write_text("")
    assert h.reload_deny_list() == 0
    assert not revoked(h, ident("Truck-7"))

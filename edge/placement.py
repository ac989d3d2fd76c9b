"""Hub placement (sans-I/O): order hub addresses by rendezvous hashing of the device id.

Rendezvous (highest-random-weight) hashing gives every (hub, device) pair a weight
from a stable hash and sorts the hubs by it, heaviest first.  The first hub is the
device's home, the rest its failover order.  Every device computes its own order
from nothing but the hub list, so no coordinator is needed, devices spread evenly,
and adding or removing one hub of N moves only about 1/N of the devices: a device
moves only when the new hub outweighs its old home (or its home is the one removed).

The weight is blake2b of ``"<hub>|<device>"`` -- never Python's ``hash()``, which is
salted per process -- so the order is the same in every process, on every machine
and across releases.  Hubs are identified by the address text as configured: every
device must spell a hub the same way (``10.0.0.5:4433`` and ``hub-a:4433`` are two
different hubs to the hash).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

WEIGHT_BYTES = 8  # a 64-bit weight: ties between distinct hubs are practically impossible


def weight(hub: str, device: str) -> int:
    """The stable rendezvous weight of ``hub`` for ``device`` (a 64-bit integer)."""
    digest = hashlib.blake2b(f"{hub}|{device}".encode(), digest_size=WEIGHT_BYTES).digest()
    return int.from_bytes(digest, "big")


def placement_order(hubs: Iterable[str], device: str) -> list[str]:
    """``hubs`` heaviest first for ``device``: home, then the failover order.

    Duplicates are dropped (first spelling kept); equal weights fall back to the
    address text, so the result never depends on the input order.
    """
    unique = list(dict.fromkeys(h.strip() for h in hubs))
    return sorted(unique, key=lambda h: (-weight(h, device), h))


def home_hub(hubs: Iterable[str], device: str) -> str:
    """The hub ``device`` connects to first."""
    order = placement_order(hubs, device)
    if not order:
        raise ValueError("at least one hub address is needed")
    return order[0]

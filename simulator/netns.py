"""Network namespaces for the packet-level bridge: plan, set up, tear down, lock, clean up.

A bridge called ``N`` (``squall link --bridge --name N``) is this topology::

    netns N-a                  root namespace                  netns N-b
    +-------------+            +-----------------+             +-------------+
    | N 10.77.0.1 |==veth==| N-a  (bridge process)  N-b |==veth==| N 10.77.0.2 |
    +-------------+            +-----------------+             +-------------+

The inner ends (named ``N`` in both namespaces) carry the addresses; the root ends
``N-a`` and ``N-b`` have none (ARP off, IPv6 address generation off, promiscuous) and
are read and written only by the bridge's AF_PACKET sockets. On all four ends checksum
offload, TSO, GSO and GRO are off: a frame taken from a veth by a packet socket must
already carry its real checksums and be no larger than the MTU, and the receiving end
must check checksums itself (a veth with rx checksumming on marks frames from a packet
socket as already verified, so a corrupted frame would be accepted). IPv6 address
generation is off on every end, so the link carries no router solicitations or DAD.

Setup is in two phases so that the bridge binds its sockets before the first frame
flows: :func:`create_commands` ends with the root ends up (a packet socket cannot bind
to a down interface) while their peers are still down (no carrier, so no frame), and
:func:`up_commands` brings up the namespaces' ends. The plan is
pure (lists of argv); :class:`Netns` runs it with ``ip`` and ``ethtool``.

One bridge per name: a lock file (``/run/squall/bridge-N.lock``, ``flock``) held for the
bridge's life refuses a second start while the first runs; namespaces or links of a
crashed run refuse a start until ``squall link --bridge --cleanup --name N`` removes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from transport.errors import SquallError

__all__ = [
    "DEFAULT_LOCK_DIR",
    "DEFAULT_SUBNET",
    "IP_UDP_OVERHEAD",
    "BridgeBusyError",
    "BridgeLock",
    "BridgeSetupError",
    "Netns",
    "Topology",
    "create_commands",
    "subnet_clashes",
    "up_commands",
]

DEFAULT_SUBNET: Final = "10.77.0.0/24"
DEFAULT_LOCK_DIR: Final = Path("/run/squall")
IP_UDP_OVERHEAD: Final = 28
"""IPv4 and UDP header bytes: a profile's ``mtu`` (largest UDP payload) plus this is the
IP MTU the bridge gives its veths."""

_NAME = re.compile(r"[a-z][a-z0-9_]{0,10}")  # N-a must fit IFNAMSIZ (15 characters)
_OFFLOADS: Final = ("tx", "off", "rx", "off", "tso", "off", "gso", "off", "gro", "off")
_TOOL_PATH: Final = "/usr/sbin:/sbin:/usr/bin:/bin"
_COMMAND_TIMEOUT_S: Final = 20.0


class BridgeSetupError(SquallError):
    """The bridge's namespaces or links could not be set up, checked or removed."""


class BridgeBusyError(BridgeSetupError):
    """A bridge of that name is running, or a crashed one left namespaces or links behind."""


@dataclass(frozen=True, slots=True)
class Topology:
    """Names, addresses and MTU of one bridge's namespaces and veths."""

    name: str
    subnet: ipaddress.IPv4Network
    ip_mtu: int

    @classmethod
    def make(cls, name: str, subnet: str, ip_mtu: int) -> Topology:
        """A validated topology; ValueError names what is wrong."""
        if not _NAME.fullmatch(name):
            raise ValueError(
                f"bridge name: 1-11 characters, a lowercase letter then letters, digits "
                f"or _, got {name!r}"
            )
        try:
            net = ipaddress.IPv4Network(subnet, strict=True)
        except ValueError as exc:
            raise ValueError(f"subnet: expected an IPv4 network like 10.77.0.0/24: {exc}") from None
        if net.prefixlen > 30:
            raise ValueError(f"subnet: needs two host addresses, {net} is too small")
        if not net.is_private or net.is_loopback or net.is_link_local:
            raise ValueError(f"subnet: use a private range (RFC 1918), not {net}")
        if not 576 <= ip_mtu <= 65535:
            raise ValueError(f"ip mtu: must be 576..65535, got {ip_mtu}")
        return cls(name, net, ip_mtu)

    @property
    def ns_a(self) -> str:
        """The namespace on side a."""
        return f"{self.name}-a"

    @property
    def ns_b(self) -> str:
        """The namespace on side b."""
        return f"{self.name}-b"

    @property
    def root_a(self) -> str:
        """The root-namespace end of side a's veth (the bridge reads and writes it)."""
        return f"{self.name}-a"

    @property
    def root_b(self) -> str:
        """The root-namespace end of side b's veth."""
        return f"{self.name}-b"

    @property
    def inner(self) -> str:
        """The name of the addressed veth end inside each namespace."""
        return self.name

    @property
    def addr_a(self) -> ipaddress.IPv4Interface:
        """Side a's address with prefix (the subnet's first host)."""
        return ipaddress.IPv4Interface(f"{self.subnet.network_address + 1}/{self.subnet.prefixlen}")

    @property
    def addr_b(self) -> ipaddress.IPv4Interface:
        """Side b's address with prefix (the subnet's second host)."""
        return ipaddress.IPv4Interface(f"{self.subnet.network_address + 2}/{self.subnet.prefixlen}")

    def sides(self) -> tuple[tuple[str, str, ipaddress.IPv4Interface], ...]:
        """(namespace, root end, address) of side a, then side b."""
        return ((self.ns_a, self.root_a, self.addr_a), (self.ns_b, self.root_b, self.addr_b))


def create_commands(topo: Topology) -> list[list[str]]:
    """Phase 1: namespaces, veths, MTU, offloads and addresses; nothing is up yet."""
    mtu = str(topo.ip_mtu)
    inner = topo.inner
    cmds: list[list[str]] = [["ip", "netns", "add", ns] for ns, _, _ in topo.sides()]
    for ns, root, addr in topo.sides():
        in_ns = ["ip", "netns", "exec", ns]
        cmds += [
            ["ip", "link", "add", root, "type", "veth", "peer", "name", inner, "netns", ns],
            ["ip", "link", "set", "dev", root, "mtu", mtu, "arp", "off", "promisc", "on"],
            ["ip", "link", "set", "dev", root, "addrgenmode", "none"],
            ["ip", "-n", ns, "link", "set", "dev", inner, "mtu", mtu, "addrgenmode", "none"],
            ["ip", "-n", ns, "addr", "add", str(addr), "dev", inner],
            ["ethtool", "-K", root, *_OFFLOADS],
            [*in_ns, "ethtool", "-K", inner, *_OFFLOADS],
            # Up, so that a packet socket can bind to it; no frame flows while its peer
            # is down (no carrier).
            ["ip", "link", "set", "dev", root, "up"],
        ]
    return cmds


def up_commands(topo: Topology) -> list[list[str]]:
    """Phase 2, after the bridge's sockets are bound: the namespaces' ends (and lo) up."""
    cmds: list[list[str]] = []
    for ns, _, _ in topo.sides():
        cmds += [
            ["ip", "-n", ns, "link", "set", "dev", "lo", "up"],
            ["ip", "-n", ns, "link", "set", "dev", topo.inner, "up"],
        ]
    return cmds


def subnet_clashes(subnet: ipaddress.IPv4Network, routes: list[dict[str, Any]]) -> list[str]:
    """Routes of ``ip -j -4 route show table all`` that overlap ``subnet`` (default excluded)."""
    out: list[str] = []
    for route in routes:
        dst = route.get("dst")
        if not isinstance(dst, str) or dst == "default":
            continue
        try:
            net = ipaddress.IPv4Network(dst, strict=False)
        except ValueError:
            continue
        if net.prefixlen and net.overlaps(subnet):
            out.append(f"{dst} dev {route.get('dev', '?')}")
    return out


class Netns:
    """Runs the plan with ``ip`` and ``ethtool``; every failure is a BridgeSetupError."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo

    def run(self, argv: list[str]) -> str:
        """Run one command; its stdout, or BridgeSetupError with the command and its stderr."""
        tool = shutil.which(argv[0]) or shutil.which(argv[0], path=_TOOL_PATH)
        if tool is None:
            raise BridgeSetupError(
                f"{argv[0]} not found: install iproute2 and ethtool (make system-deps)"
            )
        try:
            done = subprocess.run(
                [tool, *argv[1:]],
                capture_output=True,
                text=True,
                timeout=_COMMAND_TIMEOUT_S,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BridgeSetupError(f"{' '.join(argv)}: {exc}") from exc
        if done.returncode != 0:
            why = done.stderr.strip() or f"exit code {done.returncode}"
            raise BridgeSetupError(f"{' '.join(argv)}: {why}")
        return done.stdout

    def _json(self, argv: list[str]) -> list[dict[str, Any]]:
        text = self.run(argv).strip()
        if not text:
            return []
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise BridgeSetupError(f"{' '.join(argv)}: unreadable output: {exc}") from None
        return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []

    def namespaces(self) -> set[str]:
        """Every network namespace ``ip netns`` knows."""
        return {str(d.get("name")) for d in self._json(["ip", "-j", "netns", "list"])}

    def links(self) -> dict[str, str]:
        """Root-namespace links: name -> kind (``veth``, ``""`` for a plain device)."""
        out: dict[str, str] = {}
        for d in self._json(["ip", "-j", "-d", "link", "show"]):
            info = d.get("linkinfo")
            kind = info.get("info_kind", "") if isinstance(info, dict) else ""
            out[str(d.get("ifname"))] = str(kind)
        return out

    def leftovers(self) -> list[str]:
        """This bridge's namespaces and root links that exist now, e.g. ``netns sq0-a``."""
        t = self.topo
        spaces, links = self.namespaces(), self.links()
        found = [f"netns {ns}" for ns in (t.ns_a, t.ns_b) if ns in spaces]
        found += [f"link {ln}" for ln in (t.root_a, t.root_b) if ln in links]
        return found

    def check_subnet(self) -> None:
        """BridgeSetupError when a root-namespace route overlaps the bridge's subnet."""
        routes = self._json(["ip", "-j", "-4", "route", "show", "table", "all"])
        clashes = subnet_clashes(self.topo.subnet, routes)
        if clashes:
            raise BridgeSetupError(
                f"subnet {self.topo.subnet} overlaps routes of this host ({'; '.join(clashes)}):"
                " choose another with --subnet"
            )

    def create(self) -> None:
        """Phase 1 of the setup; on failure everything made so far is removed."""
        try:
            for argv in create_commands(self.topo):
                self.run(argv)
        except BaseException:
            with contextlib.suppress(BridgeSetupError):
                self.remove()
            raise

    def bring_up(self) -> None:
        """Phase 2 of the setup (the caller removes everything when it fails)."""
        for argv in up_commands(self.topo):
            self.run(argv)

    def remove(self) -> list[str]:
        """Delete this bridge's root veths and namespaces; returns what was removed.

        Deleting a root end deletes its peer at once; deleting a namespace alone would
        leave the peer's removal to the kernel's background cleanup. A root link of the
        bridge's name that is not a veth is someone else's and is left alone (an error).
        """
        t = self.topo
        removed: list[str] = []
        links = self.links()
        for link in (t.root_a, t.root_b):
            kind = links.get(link)
            if kind is None:
                continue
            if kind != "veth":
                raise BridgeSetupError(f"link {link} exists and is not a veth ({kind or 'plain'})")
            self.run(["ip", "link", "del", "dev", link])
            removed.append(f"link {link}")
        spaces = self.namespaces()
        for ns in (t.ns_a, t.ns_b):
            if ns in spaces:
                self.run(["ip", "netns", "del", ns])
                removed.append(f"netns {ns}")
        return removed


class BridgeLock:
    """An exclusive ``flock`` on ``<lock_dir>/bridge-<name>.lock``, holding the owner's pid."""

    def __init__(self, name: str, lock_dir: Path = DEFAULT_LOCK_DIR) -> None:
        self.name = name
        self.path = Path(lock_dir) / f"bridge-{name}.lock"
        self._fd: int | None = None

    def holder(self) -> str:
        """The pid written by the current holder, or ``?``."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def acquire(self) -> None:
        """Take the lock or raise BridgeBusyError saying which process has it."""
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the directory was removed by a releasing holder
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise BridgeBusyError(
                    f"bridge {self.name!r} is already running (pid {self.holder()}, "
                    f"lock {self.path})"
                ) from None
            # The previous holder may have unlinked the file after we opened it: then
            # our lock is on a dead inode and a third process could lock a new file.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file (and its directory when empty) and let go of the lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(fd)
        with contextlib.suppress(OSError):  # not empty: another bridge's lock is there
            self.path.parent.rmdir()

"""A minimal pcap writer for the link proxy: UDP datagrams as Ethernet/IP/UDP records.

The proxy sees UDP payloads, not packets, so each record is synthesized: an Ethernet
header (made-up, locally administered MACs), an IPv4 or IPv6 header and a UDP header
around the payload, with the device's address on one side and the upstream (hub) on
the other. Any tool that reads pcap (Wireshark, tcpdump, scapy's ``rdpcap``) decodes
it; the file format is the classic one (LINKTYPE_ETHERNET, microsecond timestamps).

What a record means is carried in the IP DSCP field (IPv4 TOS / IPv6 traffic class):

====  ==========================================  =====================================
DSCP  meaning                                     Wireshark display filter
====  ==========================================  =====================================
0     delivered as sent                           ``ip.dsfield.dscp == 0``
1     delivered with one bit flipped (corrupted)  ``ip.dsfield.dscp == 1``
33    dropped: loss model                         ``ip.dsfield.dscp == 33``
34    dropped: bandwidth queue full               ``ip.dsfield.dscp == 34``
35    dropped: larger than the link MTU           ``ip.dsfield.dscp == 35``
36    dropped: outage                             ``ip.dsfield.dscp == 36``
37    dropped: proxy client table full            ``ip.dsfield.dscp == 37``
38    dropped: proxy in-flight buffer full        ``ip.dsfield.dscp == 38``
====  ==========================================  =====================================

Every dropped packet: ``ip.dsfield.dscp >= 32 || ipv6.tclass.dscp >= 32``; only what
was delivered: ``ip.dsfield.dscp < 32``. Dropped packets are written when they were
offered to the link, delivered ones when they left it (so duplicates appear twice).

Writes go through a large buffer. The file is bounded: once the next record would
take it past ``max_bytes`` the writer stops capturing and only counts what it skipped.
"""

from __future__ import annotations

import ipaddress
import struct
from enum import IntEnum
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, Final

__all__ = [
    "DEFAULT_PCAP_MAX_BYTES",
    "LINKTYPE_ETHERNET",
    "PcapMark",
    "PcapWriter",
    "udp_frame",
]

LINKTYPE_ETHERNET: Final = 1
DEFAULT_PCAP_MAX_BYTES: Final = 100_000_000
_SNAPLEN: Final = 65535
_GLOBAL_HEADER: Final = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, _SNAPLEN, LINKTYPE_ETHERNET)
_RECORD = struct.Struct("<IIII")
_DEVICE_MAC: Final = bytes.fromhex("020000000001")
_HUB_MAC: Final = bytes.fromhex("020000000002")
_ETH_IPV4: Final = _HUB_MAC + _DEVICE_MAC + b"\x08\x00"  # device -> hub
_ETH_IPV4_DOWN: Final = _DEVICE_MAC + _HUB_MAC + b"\x08\x00"
_ETH_IPV6: Final = _HUB_MAC + _DEVICE_MAC + b"\x86\xdd"
_ETH_IPV6_DOWN: Final = _DEVICE_MAC + _HUB_MAC + b"\x86\xdd"
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")
_UDP_IN_IPV4_MAX: Final = 65535 - 20 - 8


class PcapMark(IntEnum):
    """The DSCP value that says what happened to a recorded packet (see the module table)."""

    DELIVERED = 0
    CORRUPTED = 1
    DROPPED_LOSS = 33
    DROPPED_QUEUE = 34
    DROPPED_MTU = 35
    DROPPED_OUTAGE = 36
    DROPPED_CLIENTS = 37
    DROPPED_OVERFLOW = 38

    @property
    def dropped(self) -> bool:
        """True for the marks of packets that never arrived."""
        return self >= 32


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@lru_cache(maxsize=4096)
def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address of ``host`` (numeric; scope id ignored, IPv4-mapped IPv6 made IPv4)."""
    addr = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _as_ipv6(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(addr, ipaddress.IPv6Address):
        return addr
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + addr.packed)


def udp_frame(
    src: tuple[Any, ...],
    dst: tuple[Any, ...],
    payload: bytes,
    *,
    mark: int = PcapMark.DELIVERED,
    ip_id: int = 0,
    upstream: bool = True,
) -> bytes:
    """An Ethernet frame carrying ``payload`` from ``src`` to ``dst`` (host, port, ...) over UDP.

    ``mark`` goes into the DSCP field; ``upstream`` picks which made-up MAC is the sender.
    IPv4-mapped IPv6 addresses count as IPv4; when one side is IPv4 and the other IPv6,
    the IPv4 one is written IPv4-mapped. IPv4 UDP checksums are left at 0 ("none",
    which IPv4 allows); IPv6 ones are computed because IPv6 requires them.
    """
    sip, dip = _ip(src[0]), _ip(dst[0])
    udp_len = 8 + len(payload)
    if sip.version != dip.version:  # a dual-stack listener: show both sides as IPv6
        sip, dip = _as_ipv6(sip), _as_ipv6(dip)
    if sip.version == 4 and dip.version == 4:
        if udp_len > _UDP_IN_IPV4_MAX + 8:
            raise ValueError(f"a {len(payload)}-byte payload does not fit in an IPv4 packet")
        tos = (int(mark) << 2) & 0xFF
        header = _IPV4.pack(
            0x45, tos, 20 + udp_len, ip_id & 0xFFFF, 0, 64, 17, 0, sip.packed, dip.packed
        )
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        udp = _UDP.pack(src[1], dst[1], udp_len, 0)
        eth = _ETH_IPV4 if upstream else _ETH_IPV4_DOWN
        return eth + header + udp + payload
    if sip.version == 6 and dip.version == 6:
        first_word = (6 << 28) | ((int(mark) << 2) & 0xFF) << 20
        header = _IPV6.pack(first_word, udp_len, 17, 64, sip.packed, dip.packed)
        pseudo = sip.packed + dip.packed + struct.pack("!IxxxB", udp_len, 17)
        udp = _UDP.pack(src[1], dst[1], udp_len, 0)
        checksum = _checksum(pseudo + udp + payload) or 0xFFFF
        udp = _UDP.pack(src[1], dst[1], udp_len, checksum)
        eth = _ETH_IPV6 if upstream else _ETH_IPV6_DOWN
        return eth + header + udp + payload
    raise AssertionError("unreachable: both addresses are IPv4 or both IPv6")  # pragma: no cover


class PcapWriter:
    """Appends UDP records to a pcap file, buffered; stops capturing at ``max_bytes``."""

    def __init__(self, path: str | Path, *, max_bytes: int = DEFAULT_PCAP_MAX_BYTES) -> None:
        if max_bytes < len(_GLOBAL_HEADER):
            raise ValueError(f"max_bytes must be at least {len(_GLOBAL_HEADER)}, got {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.records = 0
        self.skipped = 0  # records not written: file at max_bytes, closed, or a write failed
        self.error: OSError | None = None  # the write failure that stopped the capture
        self._file: BinaryIO | None = self.path.open("wb", buffering=1 << 20)
        self._file.write(_GLOBAL_HEADER)
        self.bytes_written = len(_GLOBAL_HEADER)
        self._ip_id = 0

    @property
    def full(self) -> bool:
        """True once a record was skipped for the size limit (capture has stopped)."""
        return self.skipped > 0

    def write_udp(
        self,
        ts: float,
        src: tuple[Any, ...],
        dst: tuple[Any, ...],
        payload: bytes,
        *,
        mark: int = PcapMark.DELIVERED,
        upstream: bool = True,
    ) -> bool:
        """Record one datagram at wall-clock ``ts``; False when it was skipped (file full)."""
        if self._file is None or self.skipped:
            self.skipped += 1
            return False
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        frame = udp_frame(src, dst, payload, mark=mark, ip_id=self._ip_id, upstream=upstream)
        return self.write_frame(ts, frame)

    def write_frame(self, ts: float, frame: bytes) -> bool:
        """Record one whole Ethernet frame at wall-clock ``ts``; False when it was skipped."""
        if self._file is None or self.skipped:
            self.skipped += 1
            return False
        stored = frame[:_SNAPLEN]
        size = _RECORD.size + len(stored)
        if self.bytes_written + size > self.max_bytes:
            self.skipped += 1
            return False
        sec = int(ts)
        usec = min(int((ts - sec) * 1_000_000), 999_999)
        try:
            self._file.write(_RECORD.pack(sec, usec, len(stored), len(frame)) + stored)
        except OSError as exc:  # disk full and the like: stop capturing, keep forwarding
            self.error = exc
            self.skipped += 1
            self.close()
            return False
        self.bytes_written += size
        self.records += 1
        return True

    def flush(self) -> None:
        """Push buffered records to the file."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush and close; later writes are counted as skipped."""
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except OSError as exc:
                self.error = exc

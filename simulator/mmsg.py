"""Batched UDP datagram I/O: Linux ``recvmmsg``/``sendmmsg`` (+ UDP GSO) through ctypes.

Python 3.11's socket module makes one system call per datagram. On loopback most of a
datagram's cost is the kernel's own path, and a send pays for the receiver's side too;
batching the calls saves the per-call work, and UDP generic segmentation offload (GSO,
``UDP_SEGMENT``, Linux >= 4.18) saves most of the per-datagram kernel work on the send
side: a run of equal-sized datagrams to one destination goes down the stack as one
buffer and is cut into the same datagrams at the bottom (the receiver sees exactly
what separate sends would give it).

:class:`DatagramReader` and :class:`DatagramWriter` move up to ``batch`` messages per
system call through buffers allocated once (``mmsghdr``, ``iovec``, ``sockaddr`` and
control arrays and one data arena each, reused by every call; nothing is allocated per
call but the returned objects). Where the calls are missing (not Linux, not a 64-bit
ABI, or the kernel answers ENOSYS) they fall back to ``recvfrom``/``sendto`` in a loop
with the same results, and a writer whose GSO the kernel refuses goes on without it;
``path`` says which is in use.

Addresses are what the socket module uses: ``(host, port)`` for IPv4 and
``(host, port, flowinfo, scope_id)`` for IPv6, numeric hosts only. Decoded and encoded
addresses are cached per reader/writer (at most ``ADDRESS_CACHE`` entries; the cache is
emptied when it is full).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any, Final, cast

__all__ = [
    "ADDRESS_CACHE",
    "GSO_MAX_BYTES",
    "GSO_MAX_SEGMENTS",
    "MAX_DATAGRAM",
    "Address",
    "DatagramReader",
    "DatagramWriter",
    "batched_io_available",
    "decode_sockaddr",
    "encode_sockaddr",
]

Address = tuple[Any, ...]
"""A socket address as the socket module gives it: (host, port) or (host, port, flow, scope)."""

MAX_DATAGRAM: Final = 65535
"""The largest UDP payload: a reader of this size never truncates."""
ADDRESS_CACHE: Final = 16384
"""Addresses remembered per reader and per writer (decoding/encoding is skipped for them)."""
GSO_MAX_SEGMENTS: Final = 64
"""Datagrams per GSO send at most (the kernel's UDP_MAX_SEGMENTS before Linux 6.9)."""
GSO_MAX_BYTES: Final = 65000
"""Payload bytes per GSO send at most (under the 64 KiB of one IPv4 or IPv6 packet)."""

_UDP_SEGMENT: Final = 103  # linux/udp.h; not in Python 3.11's socket module
_SOL_UDP: Final = 17
_NAME_SLOT: Final = 32  # bytes per address slot; sockaddr_in6 is 28
_MSG_DONTWAIT: Final = getattr(socket, "MSG_DONTWAIT", 0x40)
_MSG_TRUNC: Final = getattr(socket, "MSG_TRUNC", 0x20)
_AF_INET: Final = int(socket.AF_INET)
_AF_INET6: Final = int(socket.AF_INET6)
_NO_DATA: Final = frozenset({errno.EAGAIN, errno.EWOULDBLOCK})
# What a kernel says when it will not segment a send (no GSO, or not on this path).
_NO_GSO: Final = frozenset({errno.EINVAL, errno.EIO, errno.EOPNOTSUPP, errno.ENOPROTOOPT})


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


class _CMsgHdr(ctypes.Structure):
    _fields_ = [
        ("cmsg_len", ctypes.c_size_t),
        ("cmsg_level", ctypes.c_int),
        ("cmsg_type", ctypes.c_int),
    ]


# Word indexes into one mmsghdr seen as 64-bit words (Q) or 32-bit words (I); _layout_ok()
# checks the LP64 layout they assume before the batched path is used.
_HDR: Final = ctypes.sizeof(_MMsgHdr)
_HQ: Final = _HDR // 8
_HI: Final = _HDR // 4
_Q_NAME: Final = _MsgHdr.msg_name.offset // 8
_Q_IOV: Final = _MsgHdr.msg_iov.offset // 8
_Q_IOVLEN: Final = _MsgHdr.msg_iovlen.offset // 8
_Q_CONTROL: Final = _MsgHdr.msg_control.offset // 8
_Q_CONTROLLEN: Final = _MsgHdr.msg_controllen.offset // 8
_I_NAMELEN: Final = _MsgHdr.msg_namelen.offset // 4
_I_FLAGS: Final = _MsgHdr.msg_flags.offset // 4
_I_LEN: Final = _MMsgHdr.msg_len.offset // 4
_CMSG: Final = ctypes.sizeof(_CMsgHdr)  # the u16 segment size follows the header
_CMSG_SPACE: Final = (_CMSG + 2 + 7) // 8 * 8


def _layout_ok() -> bool:
    """True on the LP64 layout the word indexes assume (x86-64, arm64, ...)."""
    words = ("msg_name", "msg_iov", "msg_iovlen", "msg_control", "msg_controllen")
    return (
        ctypes.sizeof(ctypes.c_void_p) == 8
        and ctypes.sizeof(ctypes.c_size_t) == 8
        and ctypes.sizeof(_IOVec) == 16
        and _HDR % 8 == 0
        and _CMSG == 16
        and all(getattr(_MsgHdr, name).offset % 8 == 0 for name in words)
    )


def _load_calls() -> tuple[Any, Any] | None:
    if not sys.platform.startswith("linux") or not _layout_ok():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    c_int, c_uint, c_void_p = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p
    # recvmmsg(fd, msgvec, vlen, flags, timeout), sendmmsg(fd, msgvec, vlen, flags)
    recvmmsg.argtypes = [c_int, c_void_p, c_uint, c_int, c_void_p]
    recvmmsg.restype = c_int
    sendmmsg.argtypes = [c_int, c_void_p, c_uint, c_int]
    sendmmsg.restype = c_int
    return recvmmsg, sendmmsg


_CALLS: Final = _load_calls()


def batched_io_available() -> bool:
    """True when recvmmsg/sendmmsg can be called here (Linux, 64-bit ABI, found in libc)."""
    return _CALLS is not None


def decode_sockaddr(raw: bytes) -> Address:
    """The socket-module address of a raw ``sockaddr_in`` or ``sockaddr_in6``; else ValueError."""
    family = int.from_bytes(raw[:2], sys.byteorder)
    if family == _AF_INET and len(raw) >= 8:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big")
    if family == _AF_INET6 and len(raw) >= 28:
        host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        port = int.from_bytes(raw[2:4], "big")
        flow = int.from_bytes(raw[4:8], "big")
        return host, port, flow, int.from_bytes(raw[24:28], sys.byteorder)
    raise ValueError(f"not an IPv4 or IPv6 socket address: family {family}")


def encode_sockaddr(addr: Address) -> bytes:
    """The raw ``sockaddr_in`` or ``sockaddr_in6`` (a 4-tuple or an IPv6 host) of an address.

    Raises OSError for a host that is not a numeric address of that family.
    """
    host = str(addr[0])
    port = int(addr[1]).to_bytes(2, "big")
    if len(addr) == 2 and ":" not in host:
        family = _AF_INET.to_bytes(2, sys.byteorder)
        return family + port + socket.inet_pton(socket.AF_INET, host) + bytes(8)
    host = host.split("%", 1)[0]  # the scope travels as scope_id
    flow = int(addr[2] if len(addr) > 2 else 0).to_bytes(4, "big")
    scope = int(addr[3] if len(addr) > 3 else 0).to_bytes(4, sys.byteorder)
    family = _AF_INET6.to_bytes(2, sys.byteorder)
    return family + port + flow + socket.inet_pton(socket.AF_INET6, host) + scope


def _check_batch(batch: int) -> None:
    if not 1 <= batch <= 1024:
        raise ValueError(f"batch: must be 1..1024, got {batch}")


def _address_of(buf: bytearray) -> int:
    # Stable for the buffer's life: a bytearray never moves while a memoryview of it
    # exists (it cannot be resized), and _Buffers keeps one of each for as long as it lives.
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


class _Buffers:
    """``batch`` mmsghdrs, each with one iovec, an address slot and a GSO control slot,
    and one data arena; allocated once."""

    def __init__(self, batch: int, arena_bytes: int, *, named: bool) -> None:
        iov_size = ctypes.sizeof(_IOVec)
        self.batch = batch
        self.arena_bytes = arena_bytes
        self.hdr_raw = bytearray(batch * _HDR)
        iov_raw = bytearray(batch * iov_size)
        name_raw = bytearray(batch * _NAME_SLOT)
        cmsg_raw = bytearray(batch * _CMSG_SPACE)
        arena_raw = bytearray(arena_bytes)
        self.hdr_addr = _address_of(self.hdr_raw)
        self.iov_addr = _address_of(iov_raw)
        self.name_addr = _address_of(name_raw)
        self.cmsg_addr = _address_of(cmsg_raw)
        self.arena_addr = _address_of(arena_raw)
        self.hdr_q = memoryview(self.hdr_raw).cast("Q")
        self.hdr_i = memoryview(self.hdr_raw).cast("I")
        self.iov_q = memoryview(iov_raw).cast("Q")
        self.names = memoryview(name_raw)
        self.names_q = self.names.cast("Q")
        self.cmsg_h = memoryview(cmsg_raw).cast("H")
        self.arena = memoryview(arena_raw)
        cmsg_q, cmsg_i = memoryview(cmsg_raw).cast("Q"), memoryview(cmsg_raw).cast("I")
        for k in range(batch):
            q = k * _HQ
            self.hdr_q[q + _Q_IOV] = self.iov_addr + k * iov_size
            self.hdr_q[q + _Q_IOVLEN] = 1
            if named:
                self.hdr_q[q + _Q_NAME] = self.name_addr + k * _NAME_SLOT
                self.hdr_i[k * _HI + _I_NAMELEN] = _NAME_SLOT
            c = k * _CMSG_SPACE  # a UDP_SEGMENT control message, used when a slot holds a run
            cmsg_q[c // 8] = _CMSG + 2
            cmsg_i[c // 4 + 2], cmsg_i[c // 4 + 3] = _SOL_UDP, _UDP_SEGMENT
        self.template = bytes(self.hdr_raw)  # the headers as set up: restored after a receive


def _os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class DatagramReader:
    """Reads up to ``batch`` datagrams per call; a datagram over ``size`` bytes is cut to it.

    One reader serves any number of sockets (the calls return copies). Each call returns
    what was waiting, ``[]`` when nothing was; an error is raised only when it came before
    any datagram of that call (the kernel keeps a later one for the next call).
    """

    def __init__(self, batch: int = 64, size: int = MAX_DATAGRAM, *, batched: bool = True) -> None:
        _check_batch(batch)
        if not 1 <= size <= MAX_DATAGRAM:
            raise ValueError(f"size: must be 1..{MAX_DATAGRAM}, got {size}")
        self.batch = batch
        self.size = size
        self.truncated = 0  # datagrams cut to ``size`` bytes
        self._cache: dict[int | bytes, Address] = {}
        self._pending: OSError | None = None  # fallback: an error met after some datagrams
        self._offsets = list(range(0, batch * size, size))
        self._buf: _Buffers | None = None
        if batched and _CALLS is not None:
            buf = self._buf = _Buffers(batch, batch * size, named=True)
            for k in range(batch):  # slot k always receives into arena[k * size:][:size]
                buf.iov_q[2 * k] = buf.arena_addr + k * size
                buf.iov_q[2 * k + 1] = size
            buf.template = bytes(buf.hdr_raw)

    @property
    def path(self) -> str:
        """``recvmmsg`` (batched) or ``recvfrom`` (one system call per datagram)."""
        return "recvmmsg" if self._buf is not None else "recvfrom"

    def recv_from(self, sock: socket.socket) -> tuple[list[bytes], list[Address]]:
        """The datagrams waiting on ``sock`` (at most ``batch``) and their source addresses."""
        buf = self._buf
        if buf is None:
            got = self._fallback(sock)
            return [data for data, _ in got], [addr for _, addr in got]
        n = self._call(buf, sock)
        if n == 0:
            return [], []
        datas = self._datas(buf, n)
        # A sockaddr_in fits in its first word (family, port, address): an exact cache key.
        words = buf.names_q[: n * (_NAME_SLOT // 8) : _NAME_SLOT // 8].tolist()
        get = self._cache.get
        known = [get(w) for w in words]
        addrs = cast(list[Address], known)
        if None in known:
            addrs = [a if a is not None else self._decode(buf, k) for k, a in enumerate(known)]
        buf.hdr_raw[: n * _HDR] = buf.template[: n * _HDR]  # msg_namelen is value-result
        return datas, addrs

    def recv(self, sock: socket.socket) -> list[bytes]:
        """The datagrams waiting on ``sock`` (at most ``batch``), for a connected socket."""
        buf = self._buf
        if buf is None:
            return [data for data, _ in self._fallback(sock)]
        n = self._call(buf, sock)
        if n == 0:
            return []
        datas = self._datas(buf, n)
        buf.hdr_raw[: n * _HDR] = buf.template[: n * _HDR]
        return datas

    def _datas(self, buf: _Buffers, n: int) -> list[bytes]:
        lens = buf.hdr_i[_I_LEN : n * _HI : _HI].tolist()
        if self.size in lens:  # only a datagram that filled its slot can have been cut
            flags = buf.hdr_i[_I_FLAGS : n * _HI : _HI].tolist()
            self.truncated += sum(1 for f in flags if f & _MSG_TRUNC)
        arena = buf.arena
        return [arena[o : o + m].tobytes() for o, m in zip(self._offsets, lens, strict=False)]

    def _call(self, buf: _Buffers, sock: socket.socket) -> int:
        assert _CALLS is not None
        recvmmsg = _CALLS[0]
        while True:
            n: int = recvmmsg(sock.fileno(), buf.hdr_addr, self.batch, _MSG_DONTWAIT, None)
            if n >= 0:
                return n
            code = ctypes.get_errno()
            if code in _NO_DATA:
                return 0
            if code == errno.EINTR:
                continue
            if code == errno.ENOSYS:  # seccomp or an old kernel: one at a time from now on
                self._buf = None
                return 0
            raise _os_error(code)

    def _decode(self, buf: _Buffers, slot: int) -> Address:
        """The address in ``slot`` the word cache did not know: IPv6, or IPv4 seen first now."""
        raw = buf.names[slot * _NAME_SLOT : slot * _NAME_SLOT + 28].tobytes()
        key: int | bytes = raw  # an IPv6 address needs the whole sockaddr_in6 as its key
        if int.from_bytes(raw[:2], sys.byteorder) == _AF_INET:
            key = buf.names_q[slot * (_NAME_SLOT // 8)]
        addr = self._cache.get(key)
        if addr is None:
            addr = decode_sockaddr(raw)
            if len(self._cache) >= ADDRESS_CACHE:
                self._cache.clear()
            self._cache[key] = addr
        return addr

    def _fallback(self, sock: socket.socket) -> list[tuple[bytes, Address]]:
        if self._pending is not None:
            exc, self._pending = self._pending, None
            raise exc
        out: list[tuple[bytes, Address]] = []
        size = self.size
        for _ in range(self.batch):
            try:
                data, addr = sock.recvfrom(size + 1)  # one byte more: truncation shows
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if not out:
                    raise
                self._pending = exc
                break
            if len(data) > size:
                self.truncated += 1
                data = data[:size]
            out.append((data, addr))
        return out


class DatagramWriter:
    """Sends datagrams in batches: up to ``batch`` messages and ``arena_bytes`` per call.

    With ``gso`` (Linux >= 4.18), a run of datagrams of one size to one destination (the
    last may be shorter; at most GSO_MAX_SEGMENTS and GSO_MAX_BYTES) travels as one
    message that the kernel cuts back into those datagrams. A datagram that cannot be
    sent (buffer full, ICMP error pending, bad address) is skipped and its index
    returned; the others still go. A run sent as one message fails or goes as a whole.
    """

    def __init__(
        self,
        batch: int = 64,
        arena_bytes: int = 256 * 1024,
        *,
        batched: bool = True,
        gso: bool = True,
    ) -> None:
        _check_batch(batch)
        if arena_bytes < MAX_DATAGRAM:
            raise ValueError(f"arena_bytes: must be >= {MAX_DATAGRAM}, got {arena_bytes}")
        self.batch = batch
        self.gso = gso and batched and _CALLS is not None
        self.gso_refused = 0  # sends the kernel would not segment (GSO is off after the first)
        self._cache: dict[Address, bytes] = {}
        self._first = [0] * batch  # per slot: index of its first payload
        self._count = [0] * batch  # per slot: how many payloads it carries
        self._named: _Buffers | None = None
        self._plain: _Buffers | None = None
        if batched and _CALLS is not None:
            self._named = _Buffers(batch, arena_bytes, named=True)
            self._plain = _Buffers(batch, arena_bytes, named=False)

    @property
    def path(self) -> str:
        """``sendmmsg+gso``, ``sendmmsg`` (batched) or ``sendto`` (one call per datagram)."""
        if self._named is None:
            return "sendto"
        return "sendmmsg+gso" if self.gso else "sendmmsg"

    def send(self, sock: socket.socket, payloads: Sequence[bytes]) -> list[int]:
        """Send ``payloads`` on connected ``sock``; returns the indexes that failed."""
        if self._plain is None or len(payloads) == 1:  # one datagram: a plain send is cheaper
            return self._fallback(sock, payloads, None, 0)
        return self._send(self._plain, sock, payloads, None)

    def send_to(
        self, sock: socket.socket, payloads: Sequence[bytes], addrs: Sequence[Address]
    ) -> list[int]:
        """Send ``payloads[i]`` to ``addrs[i]`` from ``sock``; returns the indexes that failed."""
        if len(addrs) != len(payloads):
            raise ValueError("payloads and addrs differ in length")
        if self._named is None or len(payloads) == 1:
            return self._fallback(sock, payloads, addrs, 0)
        return self._send(self._named, sock, payloads, addrs)

    def _send(
        self,
        buf: _Buffers,
        sock: socket.socket,
        payloads: Sequence[bytes],
        addrs: Sequence[Address] | None,
    ) -> list[int]:
        failed: list[int] = []
        total, i = len(payloads), 0
        while i < total:
            k, after = self._fill(buf, payloads, addrs, i, failed)
            resume = self._call(buf, sock, k, failed) if k else None
            if resume is None:
                i = after
                continue
            failed = [j for j in failed if j < resume]  # the rest is tried again
            if self._named is None:  # ENOSYS: one at a time from here on
                rest = None if addrs is None else addrs[resume:]
                return failed + self._fallback(sock, payloads[resume:], rest, resume)
            i = resume  # GSO refused: again, without it
        failed.sort()  # address failures are found before the kernel's
        return failed

    def _fill(
        self,
        buf: _Buffers,
        payloads: Sequence[bytes],
        addrs: Sequence[Address] | None,
        i: int,
        failed: list[int],
    ) -> tuple[int, int]:
        """Copy payloads from index ``i`` into the slots; returns (slots used, next index)."""
        arena, iov_q, hdr_q, hdr_i, names = buf.arena, buf.iov_q, buf.hdr_q, buf.hdr_i, buf.names
        arena_addr, arena_bytes, slots = buf.arena_addr, buf.arena_bytes, buf.batch
        first, count, gso = self._first, self._count, self.gso
        total, k, off = len(payloads), 0, 0
        while i < total and k < slots:
            data = payloads[i]
            n = len(data)
            if off + n > arena_bytes:
                if k:
                    break  # full: the next call takes it
                failed.append(i)  # larger than any datagram
                i += 1
                continue
            addr = None
            if addrs is not None:
                addr = addrs[i]
                name = self._cache.get(addr)
                if name is None:
                    try:
                        name = self._encode(addr)
                    except (OSError, ValueError, TypeError, IndexError):
                        failed.append(i)
                        i += 1
                        continue
                names[k * _NAME_SLOT : k * _NAME_SLOT + len(name)] = name
                hdr_i[k * _HI + _I_NAMELEN] = len(name)
            j = (
                self._run_end(payloads, addrs, i, n, min(GSO_MAX_BYTES, arena_bytes - off))
                if gso and n
                else i + 1
            )
            q = k * _HQ
            if j == i + 1:
                arena[off : off + n] = data
                hdr_q[q + _Q_CONTROL] = hdr_q[q + _Q_CONTROLLEN] = 0
            else:  # one message, cut by the kernel into datagrams of n bytes
                data = b"".join(payloads[i:j])
                arena[off : off + len(data)] = data
                buf.cmsg_h[k * _CMSG_SPACE // 2 + _CMSG // 2] = n
                hdr_q[q + _Q_CONTROL] = buf.cmsg_addr + k * _CMSG_SPACE
                hdr_q[q + _Q_CONTROLLEN] = _CMSG_SPACE
            iov_q[2 * k] = arena_addr + off
            iov_q[2 * k + 1] = len(data)
            first[k], count[k] = i, j - i
            off += len(data)
            k += 1
            i = j
        return k, i

    @staticmethod
    def _run_end(
        payloads: Sequence[bytes], addrs: Sequence[Address] | None, i: int, n: int, room: int
    ) -> int:
        """The end of the GSO run from ``i``: datagrams of ``n`` bytes to one destination,
        and one shorter one after them, within ``room`` bytes and GSO_MAX_SEGMENTS."""
        total = len(payloads)
        limit = min(total, i + GSO_MAX_SEGMENTS, i + room // n)
        j = i + 1
        if addrs is None:
            while j < limit and len(payloads[j]) == n:
                j += 1
        else:
            addr = addrs[i]
            while j < limit and len(payloads[j]) == n and (addrs[j] is addr or addrs[j] == addr):
                j += 1
        if (  # a shorter last datagram ends a run
            j < total
            and j - i < GSO_MAX_SEGMENTS
            and 0 < len(payloads[j]) < n
            and (j - i) * n + len(payloads[j]) <= room
            and (addrs is None or addrs[j] is addrs[i] or addrs[j] == addrs[i])
        ):
            j += 1
        return j

    def _call(self, buf: _Buffers, sock: socket.socket, k: int, failed: list[int]) -> int | None:
        """Send slots 0..k-1; None when done, else the payload index to go on from
        (after switching to the fallback on ENOSYS, or turning GSO off when refused)."""
        assert _CALLS is not None
        sendmmsg = _CALLS[1]
        fd, sent = sock.fileno(), 0
        first, count = self._first, self._count
        while sent < k:
            n: int = sendmmsg(fd, buf.hdr_addr + sent * _HDR, k - sent, _MSG_DONTWAIT)
            if n > 0:
                sent += n
                continue
            code = ctypes.get_errno()
            if code == errno.EINTR:
                continue
            if code == errno.ENOSYS:
                self._named = self._plain = None
                return first[sent]
            if code in _NO_GSO and count[sent] > 1:
                self.gso = False
                self.gso_refused += 1
                return first[sent]
            failed.extend(range(first[sent], first[sent] + count[sent]))  # the first's error
            sent += 1
        return None

    def _encode(self, addr: Address) -> bytes:
        name = encode_sockaddr(addr)
        if len(self._cache) >= ADDRESS_CACHE:
            self._cache.clear()
        self._cache[addr] = name
        return name

    def _fallback(
        self,
        sock: socket.socket,
        payloads: Sequence[bytes],
        addrs: Sequence[Address] | None,
        first: int,
    ) -> list[int]:
        """One call per datagram; addresses numeric only, as on the batched path."""
        failed: list[int] = []
        for i, data in enumerate(payloads):
            try:
                if addrs is None:
                    sock.send(data)
                else:
                    addr = addrs[i]
                    if addr not in self._cache:
                        self._encode(addr)  # refuses a host name (no resolving here)
                    sock.sendto(data, addr)
            except (OSError, ValueError, TypeError, IndexError):
                failed.append(first + i)
        return failed

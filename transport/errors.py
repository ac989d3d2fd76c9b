"""Squall's one error tree: every failure a user or peer can cause is one of these."""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Typed codes carried in ERROR frames, QUIC application closes and metrics labels."""

    NO_ERROR = 0x00
    # wire decoding (the peer sent bytes we cannot parse)
    TRUNCATED = 0x01
    BAD_VERSION = 0x02
    UNKNOWN_FRAME = 0x03
    FRAME_TOO_LARGE = 0x04
    BAD_FIELD = 0x05
    LIMIT_EXCEEDED = 0x06
    BAD_COMPRESSION = 0x07
    BAD_ENCODING = 0x08
    # protocol (well-formed frames at the wrong time or with bad content)
    PROTOCOL_VIOLATION = 0x10
    SUBJECT_FORBIDDEN = 0x11
    BAD_SEQUENCE = 0x12
    # authentication and policy
    AUTH_FAILED = 0x20
    REVOKED = 0x21
    # load and lifecycle
    BUSY = 0x30
    GOING_AWAY = 0x31
    IDLE_TIMEOUT = 0x32
    INTERNAL = 0x3F


class SquallError(Exception):
    """Base of every error Squall raises on purpose."""


class ProtocolError(SquallError):
    """A protocol rule was broken; carries a typed code and a reason."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code = code
        self.reason = reason


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (our bug or misuse of the API)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class WireError(RemoteProtocolError):
    """Bytes that do not decode: the single decode-failure type of the wire module."""


class AuthError(SquallError):
    """A certificate or identity was refused."""


class ConfigError(SquallError):
    """A configuration file is wrong: names the file, the key and what was expected."""

    def __init__(self, path: str, key: str, message: str) -> None:
        super().__init__(f"{path}: {key}: {message}")
        self.path = path
        self.key = key
        self.message = message


class SpoolFullError(SquallError):
    """The edge spool cannot accept a record (critical lane is never evicted)."""


class NotReadyError(SquallError):
    """A component was used before it was started or after it was closed."""

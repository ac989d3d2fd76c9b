"""How the hub labels connection closes that no Squall session reported (squall_hub_errors)."""

from __future__ import annotations

import pytest
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet import QuicErrorCode, QuicFrameType

from transport.errors import ErrorCode
from transport.quic import uncounted_close_label


@pytest.mark.parametrize(
    ("code", "frame_type", "reason", "label"),
    [
        # aioquic's own errors and the device's TRANSPORT_CLOSE carry a frame type
        (0x10A, QuicFrameType.CRYPTO, "no TLS message is expected", "QUIC_0x10a"),
        (QuicErrorCode.STREAM_LIMIT_ERROR, QuicFrameType.STREAM_BASE, "", "QUIC_0x4"),
        (QuicErrorCode.PROTOCOL_VIOLATION, QuicFrameType.PADDING, "", "QUIC_0xa"),
        # the idle timeout: aioquic says INTERNAL_ERROR, it is a device gone silent
        (QuicErrorCode.INTERNAL_ERROR, QuicFrameType.PADDING, "Idle timeout", "QUIC_IDLE_TIMEOUT"),
        # the device's application close: its Squall code (its goodbye is no error)
        (ErrorCode.IDLE_TIMEOUT, None, "nothing from the hub for 30 s", "EDGE_IDLE_TIMEOUT"),
        (ErrorCode.BAD_FIELD, None, "", "EDGE_BAD_FIELD"),
        (0x7777, None, "", "EDGE_0x7777"),
        (ErrorCode.GOING_AWAY, None, "agent shutting down", ""),
    ],
)
def test_close_labels(code: int, frame_type: int | None, reason: str, label: str) -> None:
    assert uncounted_close_label(ConnectionTerminated(code, frame_type, reason)) == label

"""Named limits of the wire protocol: every length and count a peer can send is bounded here."""

from __future__ import annotations

PROTOCOL_VERSION = 1
ALPN = "squall/1"

FRAME_HEADER_BYTES = 6  # version u8, type u8, length u32
MAX_FRAME_BYTES = 1 << 20  # payload of one frame on a stream; larger is FRAME_TOO_LARGE
MAX_CONTROL_FRAME_BYTES = 16 * 1024  # HELLO, WELCOME, ACK, CREDIT, ERROR
MAX_HEARTBEAT_BYTES = 900  # a DATAGRAM frame must fit one packet with room to spare
MAX_BATCH_RECORDS = 4096
MAX_BATCH_RAW_BYTES = 4 << 20  # a batch once decompressed
MAX_SUBJECT_BYTES = 256
MAX_ATTRS = 32
MAX_ATTR_KEY_BYTES = 64
MAX_ATTR_VALUE_BYTES = 1024
MAX_BODY_BYTES = 256 * 1024
MAX_BODY_KEYS = 64
MAX_REASON_BYTES = 512
MAX_LANES = 3
INITIAL_CREDIT = 1024  # records an edge may send before WELCOME grants more (0-RTT)

"""Wire format: round trips, limits, and that arbitrary bytes only ever raise WireError."""

from __future__ import annotations

import contextlib
import math
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transport.batchcodec import CODEC_NONE, Record, decode_batch, encode_batch
from transport.errors import ErrorCode, WireError
from transport.limits import MAX_BATCH_RECORDS, MAX_FRAME_BYTES
from transport.wire import (
    Ack,
    Credit,
    Data,
    Error,
    FrameReader,
    Heartbeat,
    Hello,
    Welcome,
    decode_datagram,
    decode_frame,
    encode_frame,
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 63), (1 << 63) - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
body_dict = st.dictionaries(st.sampled_from(["lat", "lon", "speed", "n", "s"]), scalars, max_size=5)
bodies = st.one_of(st.binary(max_size=50), st.text(max_size=50), body_dict, st.none())
attrs = st.dictionaries(st.text(min_size=1, max_size=8), scalars, max_size=4)
subjects = st.sampled_from(["acme.t1.telemetry.gps", "acme.t1.log.auth", "acme.t1.x"])


@st.composite
def record_lists(draw: st.DrawFn) -> list[Record]:
    n = draw(st.integers(1, 30))
    gaps = draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))
    first = draw(st.integers(1, 1 << 40))
    ts0 = draw(st.integers(0, 1 << 52))
    seq, out = first, []
    for i, g in enumerate(gaps):
        if i:
            seq += g
        out.append(
            Record(
                seq, ts0 + draw(st.integers(0, 10**7)), draw(subjects), draw(attrs), draw(bodies)
            )
        )
    return out


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and str(a) == str(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@given(record_lists(), st.booleans())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_batch_round_trip_is_identity(records: list[Record], compress: bool) -> None:
    codec, payload = encode_batch(records, compress=compress)
    out = decode_batch(codec, payload, records[0].seq, len(records))
    assert len(out) == len(records)
    for a, b in zip(records, out, strict=True):
        assert (a.seq, a.ts, a.subject) == (b.seq, b.ts, b.subject)
        assert _same(a.attrs, b.attrs)
        assert _same(a.body, b.body)


def test_decimal_floats_are_packed_small() -> None:
    records = [
        Record(
            i + 1,
            1_700_000_000_000_000 + i * 1_000_000,
            "acme.truck-1.telemetry.gps",
            {},
            {
                "lat": round(52.52 + i * 0.00013, 5),
                "lon": round(13.40 + i * 0.00021, 5),
                "speed_kmh": round(60 + (i % 7) * 0.4, 1),
                "heading": 270 + i % 3,
                "battery_pct": round(81.5 - i * 0.01, 2),
            },
        )
        for i in range(100)
    ]
    codec, payload = encode_batch(records)
    assert len(payload) / len(records) < 15, len(payload)
    assert decode_batch(codec, payload, 1, 100) == records


frames = st.one_of(
    st.builds(
        Hello,
        st.integers(0, (1 << 64) - 1),
        st.text(max_size=20),
        st.integers(0, 1 << 31),
        st.dictionaries(st.integers(0, 2), st.integers(0, (1 << 64) - 1)),
    ),
    st.builds(
        Welcome,
        st.integers(0, (1 << 64) - 1),
        st.dictionaries(st.integers(0, 2), st.integers(0, (1 << 64) - 1)),
        st.integers(0, (1 << 64) - 1),
        st.integers(0, 1 << 31),
        st.integers(0, 1 << 62),
    ),
    st.builds(Ack, st.dictionaries(st.integers(0, 2), st.integers(0, (1 << 64) - 1))),
    st.builds(Credit, st.integers(0, (1 << 64) - 1)),
    st.builds(
        Heartbeat,
        st.dictionaries(st.text(max_size=10), st.integers(-(1 << 63), (1 << 64) - 1), max_size=10),
    ),
    st.builds(
        Error, st.sampled_from(list(ErrorCode)), st.text(max_size=100), st.integers(0, 1 << 31)
    ),
    st.builds(
        Data,
        st.integers(0, 2),
        st.integers(0, 1000),
        st.integers(1001, 2000),
        st.integers(10_000, 20_000),
        st.integers(1, MAX_BATCH_RECORDS),
        st.integers(0, 1),
        st.binary(max_size=100),
        st.integers(0, 1 << 40),
    ),
)


@given(frames)
def test_frame_round_trip_is_identity(frame: object) -> None:
    assert decode_frame(encode_frame(frame)) == frame  # type: ignore[arg-type]


@given(st.lists(frames, min_size=1, max_size=8), st.data())
def test_reader_reassembles_any_chunking(fs: list[object], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(f) for f in fs)  # type: ignore[arg-type]
    reader, out, i = FrameReader(), [], 0
    while i < len(stream):
        n = data.draw(st.integers(1, 50))
        out.extend(reader.feed(stream[i : i + n]))
        i += n
    assert out == fs
    assert reader.buffered == 0


@given(st.binary(max_size=2000))
@settings(max_examples=500)
def test_arbitrary_bytes_raise_only_wire_error(blob: bytes) -> None:
    for fn in (decode_frame, decode_datagram, lambda b: FrameReader().feed(b)):
        try:
            fn(blob)
        except WireError as exc:
            assert isinstance(exc.code, ErrorCode)


@given(st.binary(max_size=3000), st.integers(0, 1), st.integers(1, 64))
@settings(max_examples=500)
def test_arbitrary_batch_payload_raises_only_wire_error(blob: bytes, codec: int, n: int) -> None:
    with contextlib.suppress(WireError):
        decode_batch(codec, blob, 1, n)


@given(record_lists(), st.integers(0, 400), st.integers(0, 255))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_corrupted_batches_raise_only_wire_error(records: list[Record], pos: int, xor: int) -> None:
    codec, payload = encode_batch(records)
    bad = bytearray(payload)
    if bad:
        bad[pos % len(bad)] ^= xor or 1
    with contextlib.suppress(WireError):
        decode_batch(codec, bytes(bad), records[0].seq, len(records))


def test_oversized_frame_refused_before_buffering() -> None:
    header = struct.pack("!BBI", 1, 3, MAX_FRAME_BYTES + 1)
    with pytest.raises(WireError) as exc:
        FrameReader().feed(header)
    assert exc.value.code is ErrorCode.FRAME_TOO_LARGE


def test_control_frames_have_a_smaller_limit() -> None:
    with pytest.raises(WireError) as exc:
        FrameReader().feed(struct.pack("!BBI", 1, 1, 100_000))
    assert exc.value.code is ErrorCode.FRAME_TOO_LARGE


def test_bad_version_and_unknown_type() -> None:
    with pytest.raises(WireError) as exc:
        decode_frame(struct.pack("!BBI", 9, 1, 0))
    assert exc.value.code is ErrorCode.BAD_VERSION
    with pytest.raises(WireError) as exc:
        decode_frame(struct.pack("!BBI", 1, 99, 0))
    assert exc.value.code is ErrorCode.UNKNOWN_FRAME


def test_decompression_bomb_is_bounded() -> None:
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(b"\x00" * (64 << 20))
    with pytest.raises(WireError) as exc:
        decode_batch(1, bomb, 1, 1)
    assert exc.value.code in (ErrorCode.BAD_COMPRESSION, ErrorCode.LIMIT_EXCEEDED)


def test_batch_count_mismatch_is_refused() -> None:
    codec, payload = encode_batch([Record(1, 0, "a.b.c"), Record(2, 0, "a.b.c")], compress=False)
    assert codec == CODEC_NONE
    with pytest.raises(WireError) as exc:
        decode_batch(codec, payload, 1, 3)
    assert exc.value.code is ErrorCode.BAD_FIELD


def test_data_header_rules() -> None:
    ok = Data(1, 5, 6, 9, 2, 1, b"x")
    assert decode_frame(encode_frame(ok)) == ok
    bads = (
        Data(1, 6, 6, 7, 2, 1, b""),  # after >= first
        Data(3, 0, 6, 7, 2, 1, b""),  # no lane 3
        Data(0, 0, 0, 0, 1, 1, b""),  # seq 0
        Data(0, 0, 6, 6, 2, 1, b""),  # two records cannot fit in 6..6
    )
    for bad in bads:
        with pytest.raises(WireError):
            decode_frame(encode_frame(bad))


@given(record_lists(), st.integers(0, 400), st.integers(0, 255), st.booleans())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_validate_accepts_exactly_what_decode_accepts(
    records: list[Record], pos: int, xor: int, compress: bool
) -> None:
    from transport.batchcodec import validate_batch

    codec, payload = encode_batch(records, compress=compress)
    bad = bytearray(payload)
    if xor:
        bad[pos % len(bad)] ^= xor
    outcomes = []
    for fn in (validate_batch, decode_batch):
        try:
            fn(codec, bytes(bad), records[0].seq, len(records))
            outcomes.append(None)
        except WireError as exc:
            outcomes.append(exc.code)
    assert (outcomes[0] is None) == (outcomes[1] is None), outcomes


def test_a_forged_zstd_size_is_refused_before_anything_is_allocated() -> None:
    """Found by the property test above: one flipped bit in the frame header turned a
    2-byte stated content size into an 8-byte one of ~10^18 bytes, and zstd raised
    MemoryError (an untyped crash of the hub's ingest) trying to allocate it."""
    import zstandard

    from transport.batchcodec import validate_batch
    from transport.limits import MAX_BATCH_RAW_BYTES

    records = [Record(i, 0, "acme.t1.telemetry.gps", {}, b"") for i in range(1, 40)]
    codec, payload = encode_batch(records, compress=True)
    # magic, then a frame header descriptor saying "single segment, 8-byte content size",
    # then a stated size of 2**60 bytes, then what followed the original header
    forged = payload[:4] + b"\xe0" + (1 << 60).to_bytes(8, "little") + payload[5:]
    assert zstandard.frame_content_size(forged) == 1 << 60 > MAX_BATCH_RAW_BYTES
    for fn in (validate_batch, decode_batch):
        with pytest.raises(WireError) as err:
            fn(codec, bytes(forged), 1, len(records))
        assert err.value.code is ErrorCode.LIMIT_EXCEEDED

"""The batch encoding is a wire format: these exact bytes (uncompressed) must not change.

The hex strings were produced by the encoder before its per-column fast paths; an edge
and a hub of different versions must keep understanding each other, and the bytes per
record are a headline figure, so any change here is a format change, not a refactor.
"""

from __future__ import annotations

import math
import random

import pytest

from transport.batchcodec import (
    CODEC_NONE,
    CODEC_ZSTD,
    Record,
    decode_batch,
    encode_batch,
    validate_batch,
)
from transport.errors import WireError

CASES: dict[str, list[Record]] = {
    "one_gps": [
        Record(
            41,
            1_700_000_000_000_000,
            "acme.t1.telemetry.gps",
            {"unit": "si"},
            {
                "lat": 52.519988,
                "lon": 13.405218,
                "alt_m": 33.5,
                "speed_kmh": 0.0,
                "sats": 12,
                "hdop": 0.81,
            },
        )
    ],
    "mixed": [
        Record(
            7,
            1_000,
            "acme.t1.telemetry.gps",
            {},
            {"a": 1, "b": 1.5, "c": -0.0, "d": "x", "e": 2**63},
        ),
        Record(
            9,
            3_000,
            "acme.t1.log.auth",
            {"severity": 3},
            {"a": 2, "b": 1.25, "c": math.nan, "e": 5},
        ),
        Record(
            10, 2_500, "acme.t1.telemetry.gps", {"app": "sshd"}, {"b": 1e20, "a": -3, "d": None}
        ),
    ],
    "raw": [
        Record(1, 5, "acme.t1.log", {}, "line one"),
        Record(2, 6, "acme.t1.log", {}, b"\x00\xff"),
    ],
    "floats": [
        Record(i + 1, i, "a.b.c", {}, {"v": v, "w": 0.1 * i})
        for i, v in enumerate([0.5, 123.456789, -7.0, 0.001])
    ],
}

GOLDEN = {
    "one_gps": "9691b561636d652e74312e74656c656d657472792e677073910091cf00060a24181e400091009181"
    "a4756e6974a2736992019695a36c6174c0020691ce0321643495a36c6f6ec0020691ce00cc8c2295a5616c74"
    "5f6dc0020191cd014f95a973706565645f6b6d68c00201910095a473617473c00100910c95a468646f70c002"
    "029151",
    "mixed": "9692b561636d652e74312e74656c656d657472792e677073b061636d652e74312e6c6f672e6175746893"
    "00020193cd03e8cd07d0d1fe0c9300010093c081a873657665726974790381a3617070a47373686492019595"
    "a161c00100930101fb95a162c0030093cb3ff8000000000000cb3ff4000000000000cb4415af1d78b58c4095"
    "a16393c3c3c2030092cb8000000000000000cb7ff800000000000095a16493c3c2c3030092a178c095a16593"
    "c3c3c2030092cf800000000000000005",
    "raw": "9691ab61636d652e74312e6c6f6792000192050192000092c0c0920392a86c696e65206f6e65c40200ff",
    "floats": "9691a5612e622e6394000101019400010101940000000094c0c0c0c092019295a176c0020694ce0007"
    "a120ce07542bf5d2f839632bce006ad3a895a177c0030094cb0000000000000000cb3fb999999999999acb3f"
    "c999999999999acb3fd3333333333334",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_encoding_is_byte_for_byte_the_wire_format(name: str) -> None:
    records = CASES[name]
    assert encode_batch(records, compress=False) == (CODEC_NONE, bytes.fromhex(GOLDEN[name]))
    codec, payload = encode_batch(records)
    assert codec == CODEC_ZSTD
    back = decode_batch(codec, payload, records[0].seq, len(records))
    assert same(back, records)
    assert validate_batch(codec, payload, records[0].seq, len(records), records[-1].seq) == sorted(
        {r.subject for r in records}, key=[r.subject for r in records].index
    )


def same(a: list[Record], b: list[Record]) -> bool:
    """Equal records, comparing values by repr (nan != nan; -0.0 must keep its sign) and
    body keys in any order (a column holds a key for every body that has it)."""

    def norm(r: Record) -> tuple[object, ...]:
        body = sorted(r.body.items()) if isinstance(r.body, dict) else r.body
        return (r.seq, r.ts, r.subject, r.attrs, repr(body))

    return [norm(r) for r in a] == [norm(r) for r in b]


def _value(rng: random.Random) -> object:
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randint(-(2**63), 2**64 - 1)
    if kind == 1:
        return rng.choice([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-7, 1e16, True, None])
    if kind == 2:
        return rng.choice(["", "text", b"\x01"])
    if kind == 3:
        return rng.random()
    return round(rng.uniform(-1e4, 1e4), rng.randrange(0, 11))


def test_single_and_multi_record_batches_round_trip_exactly() -> None:
    """Random bodies through the one-record and the many-record paths: what goes in comes out."""
    rng = random.Random(6)
    for _ in range(2000):
        n = rng.choice([1, 1, 2, 7])
        keys = [f"k{i}" for i in range(rng.randrange(0, 6))]
        records = [
            Record(
                10 + i,
                rng.randrange(2**50),
                "a.b.c",
                {},
                {k: _value(rng) for k in keys if rng.random() < 0.9},
            )
            for i in range(n)
        ]
        codec, payload = encode_batch(records)
        assert same(decode_batch(codec, payload, 10, n), records)


def test_a_batch_whose_seq_leaves_u64_is_refused() -> None:
    codec, payload = encode_batch([Record(1, 0, "a.b.c"), Record(3, 0, "a.b.c")])
    with pytest.raises(WireError):
        decode_batch(codec, payload, 2**64 - 2, 2)
    with pytest.raises(WireError):
        validate_batch(codec, payload, 2**64 - 2, 2)


def _column_rule(vals: list[float]) -> tuple[int, list[int]] | None:
    """The scaled-decimal rule value by value, written plainly (the codec does it by column):
    the largest number of decimals of any shortest repr, then every value times 10**scale
    must be an exact integer below 1e15."""
    scale = 0
    for v in vals:
        r = repr(v)
        if "." not in r or "e" in r or r == "-0.0":
            return None
        scale = max(scale, len(r) - r.index(".") - 1)
    if scale > 9:
        return None
    ints = []
    for v in vals:
        n = round(v * 10**scale)
        if not abs(v) < 1e15 / 10**scale or n / 10**scale != v:
            return None
        ints.append(n)
    return scale, ints


def test_float_columns_scale_exactly_as_the_value_by_value_rule() -> None:
    """Every column of floats: the same scale and integers as the plain rule, or plain floats
    when the rule says so (-0.0, inf, nan, exponents, too many decimals, too large)."""
    from transport.batchcodec import _scaled_decimal, _scaled_decimals

    rng = random.Random(11)
    odd = [0.0, -0.0, 1e20, 1e-7, math.inf, -math.inf, math.nan, 1e15, 9.99e14, 0.1 + 0.2]
    scaled = 0
    for _ in range(5000):
        k = rng.randint(2, 12)
        pick = rng.random()
        if pick < 0.4:
            col = [round(rng.uniform(-1e3, 1e3), rng.randint(0, 10)) for _ in range(k)]
        elif pick < 0.6:
            col = [rng.uniform(-1e6, 1e6) for _ in range(k)]
        elif pick < 0.75:
            col = [rng.choice([*odd, 1.5, 2.25, 123456789.123]) for _ in range(k)]
        else:
            col = [
                round(rng.gauss(0, 10 ** rng.randint(0, 16)), rng.randint(0, 10)) for _ in range(k)
            ]
        want = _column_rule(col)
        assert _scaled_decimals(col) == want, col
        # a batch of one record takes the one-value copy of the rule: the same answer
        one = _column_rule(col[:1])
        assert _scaled_decimal(col[0]) == (None if one is None else (one[0], one[1][0])), col
        scaled += want is not None
    assert 1000 < scaled < 4000  # both outcomes were exercised

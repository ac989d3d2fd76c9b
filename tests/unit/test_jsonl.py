"""JSON-lines input: every accepted shape, every refused one with its reason, and line splitting."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.jsonl import (
    MAX_BODY_DEPTH,
    MAX_SUBJECT_SUFFIX_CHARS,
    MAX_SUBJECT_SUFFIX_TOKENS,
    JsonInput,
    JsonInputError,
    LineSplitter,
    parse_json_line,
)
from transport.limits import MAX_ATTR_KEY_BYTES, MAX_ATTR_VALUE_BYTES, MAX_ATTRS
from transport.wire import Lane

LIMIT = 64 * 1024


def line(doc: Any) -> bytes:
    return json.dumps(doc).encode() + b"\n"


def parse(doc: Any) -> JsonInput:
    return parse_json_line(line(doc), max_bytes=LIMIT)


def nested(depth: int) -> dict[str, Any]:
    body: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        body = {"n": body}
    return body


# --- accepted -------------------------------------------------------------------------


def test_minimal_line_gets_defaults() -> None:
    got = parse({"subject": "telemetry.gps", "body": {"lat": 48.1, "lon": 11.5}})
    assert got == JsonInput(
        subject="telemetry.gps",
        body={"lat": 48.1, "lon": 11.5},
        attrs={},
        lane=Lane.TELEMETRY,
    )


def test_full_line_with_text_body_and_scalar_attrs() -> None:
    attrs = {"s": "x", "i": -3, "f": 2.5, "t": True, "n": None, "big": 2**64 - 1}
    got = parse({"subject": "alarm", "body": "door open", "attrs": attrs, "lane": "critical"})
    assert got == JsonInput(subject="alarm", body="door open", attrs=attrs, lane=Lane.CRITICAL)
    assert isinstance(got.attrs["t"], bool)


@pytest.mark.parametrize(("name", "lane"), [(lane.name.lower(), lane) for lane in Lane])
def test_every_lane(name: str, lane: Lane) -> None:
    assert parse({"subject": "a", "body": {}, "lane": name}).lane is lane


def test_nested_body_crlf_and_surrounding_whitespace() -> None:
    raw = b'  {"subject": "can.frame", "body": {"ids": [1, 2, {"x": null}], "ok": false}}  \r\n'
    got = parse_json_line(raw, max_bytes=LIMIT)
    assert got.body == {"ids": [1, 2, {"x": None}], "ok": False}


def test_limits_are_inclusive() -> None:
    subject = ".".join(["t"] * MAX_SUBJECT_SUFFIX_TOKENS)
    assert parse({"subject": subject, "body": ""}).subject == subject
    long_subject = "a" * MAX_SUBJECT_SUFFIX_CHARS
    assert parse({"subject": long_subject, "body": ""}).subject == long_subject
    attrs = {f"k{i}": i for i in range(MAX_ATTRS)}
    assert parse({"subject": "a", "body": "", "attrs": attrs}).attrs == attrs
    attrs = {"k" * MAX_ATTR_KEY_BYTES: "v" * MAX_ATTR_VALUE_BYTES}
    assert parse({"subject": "a", "body": "", "attrs": attrs}).attrs == attrs
    body = nested(MAX_BODY_DEPTH)
    assert parse({"subject": "a", "body": body}).body == body
    exact = line({"subject": "a", "body": ""})
    assert parse_json_line(exact, max_bytes=len(exact)).subject == "a"


def test_subject_tokens_allow_dash_and_underscore() -> None:
    assert parse({"subject": "Log-2.can_bus.X9", "body": ""}).subject == "Log-2.can_bus.X9"


# --- refused --------------------------------------------------------------------------

_OK: dict[str, Any] = {"subject": "telemetry.gps", "body": {"v": 1}}


def with_(**changes: Any) -> bytes:
    return line({**_OK, **changes})


def without(key: str) -> bytes:
    return line({k: v for k, v in _OK.items() if k != key})


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        # the line as a whole
        (b"", None, "empty line"),
        (b"  \r\n", None, "empty line"),
        (b'{"subject": "a", "body": "\xff"}', None, "not valid UTF-8 at byte 26"),
        (b"\xef\xbb\xbf" + line(_OK), None, "not valid JSON"),
        (b'{"subject": "a", "body": }', None, "not valid JSON: Expecting value"),
        (b'{"subject": "a"', None, "not valid JSON"),
        (line(_OK)[:-1] + b" trailing", None, "not valid JSON: Extra data"),
        (b"[1, 2]", None, "expected a JSON object, got array"),
        (b'"text"', None, "expected a JSON object, got string"),
        (b"42", None, "expected a JSON object, got number"),
        (b"null", None, "expected a JSON object, got null"),
        (with_(extra=1), None, "unknown key(s) 'extra'; expected subject, body, attrs, lane"),
        (with_(Subject="x"), None, "unknown key(s) 'Subject'"),
        (b'{"subject": "a", "body": {"v": NaN}}', None, "NaN is not valid JSON"),
        (b'{"subject": "a", "body": {"v": -Infinity}}', None, "-Infinity is not valid JSON"),
        (b'{"subject": "a", "body": {"v": ' + b"9" * 5000 + b"}}", None, "not valid JSON"),
        (b'{"subject": "a", "body": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", None, "nested"),
        (b'{"subject": "a", "subject": "b", "body": {}}', "subject", "key given twice"),
        (b'{"subject": "a", "body": {"k": 1, "k": 2}}', "k", "key given twice"),
        # subject
        (without("subject"), "subject", "missing (required)"),
        (with_(subject=None), "subject", "expected a string, got null"),
        (with_(subject=["a"]), "subject", "expected a string, got array"),
        (with_(subject=""), "subject", "empty"),
        (with_(subject="a" * 201), "subject", "longer than 200 characters"),
        (with_(subject=".".join("t" * 15)), "subject", "more than 14 tokens"),
        (with_(subject="a..b"), "subject", "token 2 is empty"),
        (with_(subject=".a"), "subject", "token 1 is empty"),
        (with_(subject="a."), "subject", "token 2 is empty"),
        (with_(subject="a.*"), "subject", "token '*' may only hold A-Z a-z 0-9 _ -"),
        (with_(subject="a.>"), "subject", "no wildcards"),
        (with_(subject="a b"), "subject", "no wildcards or spaces"),
        (with_(subject="caf\u00e9"), "subject", "may only hold"),
        (with_(subject="a/b"), "subject", "may only hold"),
        # body
        (without("body"), "body", "missing (required)"),
        (with_(body=None), "body", "expected an object or a string, got null"),
        (with_(body=[1, 2]), "body", "expected an object or a string, got array"),
        (with_(body=3.5), "body", "got number"),
        (with_(body=True), "body", "got boolean"),
        (with_(body=nested(MAX_BODY_DEPTH + 1)), "body", "nested deeper than 32 levels"),
        (b'{"subject": "a", "body": {"a": [[[[1e999]]]]}}', "body", "number inf is out of range"),
        (with_(body={"a": 2**64}), "body", "integer outside the 64-bit range"),
        (with_(body={"a": -(2**63) - 1}), "body", "integer outside the 64-bit range"),
        # attrs
        (with_(attrs=None), "attrs", "expected an object, got null"),
        (with_(attrs=[["k", "v"]]), "attrs", "expected an object, got array"),
        (with_(attrs="k=v"), "attrs", "expected an object, got string"),
        (with_(attrs={f"k{i}": i for i in range(33)}), "attrs", "33 attrs, at most 32 allowed"),
        (with_(attrs={"": 1}), "attrs", "empty key"),
        (with_(attrs={"k" * 65: 1}), "attrs." + "k" * 64, "key longer than 64 characters"),
        (with_(attrs={"m": {"x": 1}}), "attrs.m", "expected a string, number, boolean or null"),
        (with_(attrs={"m": [1]}), "attrs.m", "got array"),
        (with_(attrs={"s": "v" * 1025}), "attrs.s", "string longer than 1024 characters"),
        (with_(attrs={"i": 2**64}), "attrs.i", "integer outside the 64-bit range"),
        (b'{"subject": "a", "body": "", "attrs": {"f": -1e999}}', "attrs.f", "number -inf is out"),
        # lane
        (with_(lane="urgent"), "lane", "expected one of critical, telemetry, bulk, got 'urgent'"),
        (with_(lane="CRITICAL"), "lane", "got 'CRITICAL'"),
        (with_(lane=0), "lane", "got 'number'"),
        (with_(lane=None), "lane", "got 'null'"),
    ],
)
def test_refused_with_field_and_reason(raw: bytes, field: str | None, reason: str) -> None:
    with pytest.raises(JsonInputError) as info:
        parse_json_line(raw, max_bytes=1 << 20)
    assert info.value.field == field
    assert reason in info.value.reason
    assert reason in str(info.value)


def test_line_over_the_limit_is_refused_before_decoding() -> None:
    raw = line(_OK)
    with pytest.raises(JsonInputError, match=f"line is {len(raw)} bytes, the limit is 10"):
        parse_json_line(raw, max_bytes=10)


def test_body_string_over_the_wire_limit() -> None:
    raw = line({"subject": "a", "body": "x" * (256 * 1024 + 1)})
    with pytest.raises(JsonInputError, match="body: string longer than 262144 bytes"):
        parse_json_line(raw, max_bytes=1 << 20)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_json_input_error(raw: bytes) -> None:
    try:
        got = parse_json_line(raw, max_bytes=200)
    except JsonInputError as exc:
        assert exc.reason
    else:
        assert isinstance(got.lane, Lane)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500)
@given(
    st.dictionaries(
        st.sampled_from(["subject", "body", "attrs", "lane", "other"]),
        _JSON | st.sampled_from(["a.b", "bulk", "critical"]),
    )
)
def test_arbitrary_json_objects_parse_or_raise_typed(doc: dict[str, Any]) -> None:
    raw = json.dumps(doc).encode()
    try:
        got = parse_json_line(raw, max_bytes=LIMIT)
    except JsonInputError as exc:
        assert exc.reason
        return
    assert set(doc) <= {"subject", "body", "attrs", "lane"}
    assert got.subject == doc["subject"] and got.body == doc["body"]
    assert got.attrs == doc.get("attrs", {})


# --- line splitting -------------------------------------------------------------------


def test_splitter_lines_crlf_blank_and_close() -> None:
    splitter = LineSplitter(100)
    assert splitter.feed(b"one\r\ntwo\n\n\r\nthr") == [b"one", b"two"]
    assert splitter.feed(b"ee\nfour") == [b"three"]
    assert splitter.buffered == 4
    assert splitter.close() == [b"four"]
    assert (splitter.lines, splitter.overlong, splitter.buffered) == (4, 0, 0)


def test_splitter_cuts_overlong_lines_by_default() -> None:
    splitter = LineSplitter(8)
    out = splitter.feed(b"0123456789abc\nok\n" + b"x" * 100)
    assert splitter.buffered <= 9
    out += splitter.feed(b"y" * 100 + b"\nlast\n")
    assert out == [b"01234567", b"ok", b"xxxxxxxx", b"last"]
    assert (splitter.lines, splitter.overlong) == (4, 2)


def test_splitter_can_drop_overlong_lines() -> None:
    splitter = LineSplitter(8, on_overlong="drop")
    assert splitter.feed(b"0123456789abc\nok\n012345678\r\n01234567\r\n") == [b"ok", b"01234567"]
    assert (splitter.lines, splitter.overlong) == (2, 2)
    assert splitter.feed(b"x" * 50) == []
    assert splitter.close() == []


def test_splitter_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        LineSplitter(0)
    with pytest.raises(ValueError, match="on_overlong"):
        LineSplitter(10, on_overlong="keep")  # type: ignore[arg-type]


def _split(data: bytes, cuts: list[int], splitter: LineSplitter) -> list[bytes]:
    out: list[bytes] = []
    start = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        out += splitter.feed(data[start:cut])
        assert splitter.buffered <= 17
        start = cut
    return out + splitter.close()


@settings(max_examples=300)
@given(
    st.lists(st.sampled_from([b"a", b"bb", b"\n", b"\r", b"\r\n", b"x" * 20, b"{}"]), max_size=40),
    st.lists(st.integers(min_value=0, max_value=500), max_size=15),
    st.sampled_from(["truncate", "drop"]),
)
def test_splitter_chunk_boundaries_do_not_change_lines(
    parts: list[bytes], cuts: list[int], policy: str
) -> None:
    data = b"".join(parts)
    one = LineSplitter(16, on_overlong=policy)  # type: ignore[arg-type]
    many = LineSplitter(16, on_overlong=policy)  # type: ignore[arg-type]
    whole = _split(data, [], one)
    assert _split(data, cuts, many) == whole
    assert (many.lines, many.overlong) == (one.lines, one.overlong)
    assert all(0 < len(x) <= 16 and b"\n" not in x for x in whole)

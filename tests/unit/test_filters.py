"""The filter language: every operator, precedence, never-raise semantics and error positions."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.filters import (
    FIELDS,
    MAX_DEPTH,
    MAX_FILTER_CHARS,
    MAX_IN_ITEMS,
    And,
    Compare,
    FilterError,
    Not,
    Or,
    compile_filter,
    parse_filter,
)
from transport.errors import SquallError


def message(**overrides: Any) -> dict[str, Any]:
    """A committed message as the kernel hands it to filters."""
    base: dict[str, Any] = {
        "subject": "acme.truck-00042.telemetry.gps",
        "tenant": "acme",
        "device": "truck-00042",
        "lane": "telemetry",
        "seq": 1234,
        "ts": 1_700_000_000_000_000,
        "offset": 99,
        "attrs": {"severity": 2, "msgid": "m-1", "ratio": 0.5, "ok": True, "none": None},
        "body": {"speed_kmh": 95.5, "battery_pct": 7, "gps": {"lat": 48.1, "fix": "3d"}},
    }
    base.update(overrides)
    return base


MSG = message()

TABLE = [
    # == and != on strings, ints, floats, booleans, null
    ('device == "truck-00042"', True),
    ('device == "truck-00043"', False),
    ('device != "truck-00043"', True),
    ('device != "truck-00042"', False),
    ("seq == 1234", True),
    ("seq != 1234", False),
    ("attrs.severity == 2.0", True),
    ("attrs.ratio == 0.5", True),
    ("attrs.ok == true", True),
    ("attrs.ok != false", True),
    ("attrs.ok == false", False),
    ("attrs.none == null", True),
    ("attrs.none != null", False),
    ("attrs.msgid != null", True),
    ("attrs.msgid == null", False),
    # ordering on numbers and strings
    ("attrs.severity < 3", True),
    ("attrs.severity < 2", False),
    ("attrs.severity <= 2", True),
    ("attrs.severity <= 1", False),
    ("attrs.severity > 1", True),
    ("attrs.severity > 2", False),
    ("attrs.severity >= 2", True),
    ("attrs.severity >= 2.5", False),
    ("body.speed_kmh > 90", True),
    ("body.speed_kmh > 95.5", False),
    ("seq >= -5", True),
    ("ts > 1e15", True),
    ('device < "truck-1"', True),
    ('device >= "truck-00042"', True),
    ('lane > "telemetry"', False),
    # nested body paths
    ("body.gps.lat > 48", True),
    ('body.gps.fix == "3d"', True),
    # in
    ('lane in ["critical", "telemetry"]', True),
    ('lane in ["critical", "bulk"]', False),
    ("lane in []", False),
    ("attrs.severity in [1, 2, 3]", True),
    ("attrs.severity in [1.0, 2.0]", True),
    ("attrs.severity in [4, 5]", False),
    ("attrs.ok in [true]", True),
    ("attrs.ok in [1]", False),
    ("attrs.severity in [true]", False),
    ("attrs.none in [null]", True),
    ('attrs.none in ["x"]', False),
    ('attrs.msgid in ["m-1", 2, null,]', True),
    # glob
    ('device ~ "truck-*"', True),
    ('device ~ "car-*"', False),
    ('device ~ "truck-0004?"', True),
    ('device ~ "truck-0004[0-1]"', False),
    ('device ~ "truck-0004[2]"', True),
    ('device ~ "*42"', True),
    ('device ~ "TRUCK-*"', False),
    ('subject ~ "acme.*.telemetry.gps"', True),
    ('subject ~ "acme.*.log.auth"', False),
    ('device ~ "truck-00042"', True),
    ('device ~ "truck"', False),
    # exists
    ("exists attrs.msgid", True),
    ("exists attrs.nope", False),
    ("exists attrs.none", False),
    ("exists body.gps.lat", True),
    ("exists body.gps.lat.deeper", False),
    ("exists offset", True),
    ("exists attrs", True),
    # not, and, or, parentheses
    ("not (body.battery_pct >= 10)", True),
    ("not body.battery_pct >= 10", True),
    ("not not exists attrs.msgid", True),
    ('attrs.severity <= 3 and device ~ "truck-*"', True),
    ('attrs.severity <= 3 and device ~ "car-*"', False),
    ('attrs.severity > 3 or device ~ "truck-*"', True),
    ("attrs.severity > 3 or seq < 0", False),
    ("seq > 0 and seq > 1 and seq > 2 and seq < 0", False),
    ("seq < 0 or seq < 1 or seq < 2 or seq > 0", True),
    # precedence: and binds tighter than or, not tighter than and
    ("seq < 0 and seq < 1 or seq > 0", True),  # (F and F) or T
    ("seq > 0 or seq < 0 and seq < 1", True),  # T or (F and F)
    ("(seq > 0 or seq < 0) and seq < 1", False),
    ("not seq > 0 or seq > 0", True),  # (not T) or T
    ("not (seq > 0 or seq > 0)", False),
    ("not seq < 0 and seq > 0", True),  # (not F) and T
    # whitespace is free
    ('seq>0and(lane=="telemetry")', True),
    ("\n  seq   >\t0  ", True),
    # string escapes
    ('attrs.msgid == "m\\u002d1"', True),
]


@pytest.mark.parametrize(("text", "expected"), TABLE)
def test_table(text: str, expected: bool) -> None:
    f = compile_filter(text)
    assert f.matches(MSG) is expected
    assert f.text == text


def test_examples_from_the_design() -> None:
    msg = message(subject="acme.truck-00042.log.auth", lane="critical")
    for text in [
        'attrs.severity <= 3 and device ~ "truck-*"',
        "body.speed_kmh > 90",
        'lane in ["critical", "telemetry"]',
        "exists attrs.msgid",
        "not (body.battery_pct >= 10)",
        'subject ~ "acme.*.log.auth"',
    ]:
        assert compile_filter(text).matches(msg), text


@pytest.mark.parametrize(
    "text",
    [
        "attrs.nope == 1",
        "attrs.nope != 1",
        "attrs.nope < 1",
        'attrs.nope ~ "*"',
        "attrs.nope in [1, null]",
        "attrs.nope == null",
        "body.nope.deeper > 1",
        "body.speed_kmh.deeper > 1",
        "attrs.severity.x == 1",
    ],
)
def test_missing_field_is_false(text: str) -> None:
    assert compile_filter(text).matches(MSG) is False


@pytest.mark.parametrize(
    "msg",
    [
        message(attrs={}, body={}),
        message(attrs=None, body=None),
        message(attrs="severity", body="a log line"),
        message(attrs=[1], body=b"\xff\xfe raw"),
        {},
    ],
)
def test_missing_containers_never_raise(msg: dict[str, Any]) -> None:
    for text in ["attrs.severity <= 3", "body.speed_kmh > 90", "exists attrs.msgid"]:
        assert compile_filter(text).matches(msg) is False
    assert compile_filter("not (attrs.severity <= 3)").matches(msg) is True


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("attrs.x < 3", "2"),
        ("attrs.x == 3", "3"),
        ("attrs.x != 3", "3"),
        ('attrs.x == "3"', 3),
        ('attrs.x != "3"', 3),
        ('attrs.x < "b"', 1),
        ("attrs.x == 1", True),
        ("attrs.x != 0", False),
        ("attrs.x >= 0", True),
        ("attrs.x == true", 1),
        ('attrs.x ~ "*"', 5),
        ('attrs.x ~ "*"', None),
        ("attrs.x > 1", [5]),
        ("attrs.x == 1", {"a": 1}),
        ('attrs.x in ["1"]', 1),
        ("attrs.x in [1]", "1"),
        ("attrs.x in [1]", True),
        ("attrs.x < 1", None),
    ],
)
def test_type_mismatch_is_false(text: str, value: object) -> None:
    assert compile_filter(text).matches(message(attrs={"x": value})) is False


def test_body_as_text_and_bytes() -> None:
    f = compile_filter('body ~ "*sshd*"')
    assert f.matches(message(body="Nov 27 sshd[42]: Failed password"))
    assert f.matches(message(body=b"Nov 27 sshd[42]: Failed password"))
    assert not f.matches(message(body=b"kernel: oops"))
    assert not f.matches(message(body={"sshd": 1}))
    assert compile_filter('body == "ok"').matches(message(body=b"ok"))
    assert compile_filter('body in ["ok"]').matches(message(body=b"ok"))
    assert compile_filter('body ~ "bad*"').matches(message(body=b"bad \xff byte"))


def test_glob_is_compiled_once_and_anchored() -> None:
    f = compile_filter('attrs.path ~ "/var/log/*.log"')
    assert f.matches(message(attrs={"path": "/var/log/auth.log"}))
    assert not f.matches(message(attrs={"path": "/var/log/auth.log.1"}))
    assert compile_filter('attrs.p ~ "a*"').matches(message(attrs={"p": "a\nb"}))


@settings(max_examples=200, deadline=None)
@given(
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=5),
        st.binary(max_size=5),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    )
)
def test_any_value_never_raises(value: object) -> None:
    for text in [
        "attrs.x < 3",
        'attrs.x >= "b"',
        "attrs.x == true",
        'attrs.x in [1, "a", true, null]',
        'attrs.x ~ "a*"',
        'attrs.x ~ "[a-c]?"',
        "exists attrs.x.y",
        "attrs.x.y == 1",
    ]:
        result = compile_filter(text).matches(message(attrs={"x": value}))
        assert result is True or result is False


def test_ast_shape_follows_precedence() -> None:
    ast = parse_filter("seq < 1 or not seq < 2 and seq < 3")
    assert isinstance(ast, Or)
    left, right = ast.operands
    assert isinstance(left, Compare)
    assert isinstance(right, And)
    assert isinstance(right.operands[0], Not)


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ("attrs.severity <=", 17, "expected a value after '<='"),
        ("attrs.severity <= and seq > 1", 18, "expected a value after '<='"),
        ("lane == critical", 8, "strings are double-quoted"),
        ("", 0, "expected a condition"),
        ("   ", 3, "expected a condition"),
        ("seq > 1 and", 11, "expected a condition"),
        ("seq > 1 seq < 2", 8, "expected 'and', 'or' or the end"),
        ("seq 5", 4, "expected an operator"),
        ("seq", 3, "expected an operator"),
        ("(seq > 1", 8, "expected ')' to close the '(' at position 0"),
        ("seq > 1)", 7, "expected 'and', 'or' or the end"),
        ("severity < 3", 0, "unknown field 'severity'"),
        ('seq > 1 or devce == "x"', 11, "did you mean 'device'"),
        ("seq.x > 1", 0, "field 'seq' has no sub-fields"),
        ("attrs..x > 1", 6, "empty path segment"),
        ("attrs.x > 'a'", 10, "strings use double quotes"),
        ("attrs.x = 1", 8, "unexpected character '='"),
        ('attrs.x == "abc', 11, "unterminated string"),
        ('attrs.x == "a\\qb"', 13, "unknown escape"),
        ('attrs.x == "\\u12"', 12, "unknown escape"),
        ("attrs.x < true", 10, "'<' compares numbers or strings"),
        ("attrs.x >= null", 11, "'>=' compares numbers or strings"),
        ('seq == "1"', 7, "field 'seq' holds a number"),
        ('seq ~ "1*"', 6, "field 'seq' holds a number"),
        ("lane in [1]", 9, "field 'lane' holds a string"),
        ("device ~ 5", 9, "expected a quoted glob pattern after '~'"),
        ('lane in "bulk"', 8, "expected '[' after 'in'"),
        ('lane in ["a" "b"]', 13, "expected ',' or ']'"),
        ('lane in ["a",', 13, "expected a value after 'in'"),
        ("exists", 6, "expected a field name after 'exists'"),
        ("exists 5", 7, "expected a field name after 'exists'"),
        ("not", 3, "expected a condition"),
        ("5 < seq", 0, "expected a condition"),
    ],
)
def test_syntax_errors_name_the_position(text: str, position: int, fragment: str) -> None:
    with pytest.raises(FilterError) as info:
        compile_filter(text)
    err = info.value
    assert isinstance(err, SquallError)
    assert fragment in str(err)
    assert err.position == position
    assert str(err).endswith(f"at position {position}")


def test_unknown_field_lists_valid_ones() -> None:
    with pytest.raises(FilterError) as info:
        compile_filter("colour == 1")
    for name in FIELDS:
        assert name in info.value.reason


def test_example_error_message() -> None:
    with pytest.raises(
        FilterError, match=r"^expected a value after '<=', got the end at position 17$"
    ):
        compile_filter("attrs.severity <=")


def test_limits() -> None:
    long_text = "seq > 1 and " * 200 + "seq > 1"
    assert len(long_text) > MAX_FILTER_CHARS
    with pytest.raises(FilterError) as info:
        compile_filter(long_text)
    assert info.value.position == MAX_FILTER_CHARS

    assert compile_filter("(" * MAX_DEPTH + "seq > 1" + ")" * MAX_DEPTH).matches(MSG)
    with pytest.raises(FilterError, match="nesting deeper than 32") as info:
        compile_filter("(" * (MAX_DEPTH + 1) + "seq > 1" + ")" * (MAX_DEPTH + 1))
    assert info.value.position == MAX_DEPTH
    assert compile_filter("not " * MAX_DEPTH + "seq > 1").matches(MSG)
    with pytest.raises(FilterError, match="nesting"):
        compile_filter("not " * (MAX_DEPTH + 1) + "seq > 1")

    items = ", ".join(str(i) for i in range(MAX_IN_ITEMS))
    assert compile_filter(f"seq in [{items}, 1234]".replace(", 1234", "")).matches(
        message(seq=MAX_IN_ITEMS - 1)
    )
    with pytest.raises(FilterError, match="longer than 256 items"):
        compile_filter(f"seq in [{items}, 1234]")


def test_long_flat_chains_compile() -> None:
    text = " or ".join(f"seq == {i}" for i in range(150))
    assert len(text) < MAX_FILTER_CHARS
    f = compile_filter(text)
    assert f.matches(message(seq=149))
    assert not f.matches(message(seq=150))

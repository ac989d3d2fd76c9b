"""Sans-I/O JSON-lines input: check one line into a record request; split a stream into lines.

A line is one JSON object::

    {"subject": "telemetry.gps", "body": {"lat": 48.1}, "attrs": {"fix": 3}, "lane": "critical"}

``subject`` (a suffix under the device's ``<tenant>.<device>.`` prefix) and ``body``
(an object or a string) are required; ``attrs`` defaults to ``{}`` and ``lane`` to
``"telemetry"``.  Any other key is an error, so a typo does not pass silently.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from transport.errors import SquallError
from transport.limits import MAX_ATTR_KEY_BYTES, MAX_ATTR_VALUE_BYTES, MAX_ATTRS, MAX_BODY_BYTES
from transport.wire import Lane

Scalar = str | int | float | bool | None

# The hub allows 16 tokens and 256 bytes for the full subject <tenant>.<device>.<suffix>;
# the suffix leaves two tokens and 56 bytes for the prefix.
MAX_SUBJECT_SUFFIX_TOKENS: Final = 14
MAX_SUBJECT_SUFFIX_CHARS: Final = 200
MAX_BODY_DEPTH: Final = 32  # containers nested in a body; deeper is refused
DEFAULT_LANE: Final = Lane.TELEMETRY
DEFAULT_MAX_LINE_BYTES: Final = 64 * 1024

_INT_MIN = -(1 << 63)  # what msgpack can carry on the wire
_INT_MAX = (1 << 64) - 1
_FIELDS: Final = ("subject", "body", "attrs", "lane")
_LANES: Final = {lane.name.lower(): lane for lane in Lane}
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")

OverlongPolicy = Literal["truncate", "drop"]


class JsonInputError(SquallError):
    """A JSON line was refused; ``field`` names the key at fault (None: the whole line)."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason if field is None else f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class JsonInput:
    """One checked JSON line: what the edge needs to append a record to its spool."""

    subject: str  # suffix, e.g. "telemetry.gps"
    body: dict[str, Any] | str
    attrs: dict[str, Scalar]
    lane: Lane


def parse_json_line(line: bytes, *, max_bytes: int) -> JsonInput:
    """Check one line (trailing CR/LF allowed); raise JsonInputError naming the bad field."""
    if len(line) > max_bytes:
        raise JsonInputError(None, f"line is {len(line)} bytes, the limit is {max_bytes}")
    doc = _load(line)
    if not isinstance(doc, dict):
        raise JsonInputError(None, f"expected a JSON object, got {_kind(doc)}")
    unknown = sorted(set(doc) - set(_FIELDS))
    if unknown:
        shown = ", ".join(repr(k[:MAX_ATTR_KEY_BYTES]) for k in unknown[:5])
        raise JsonInputError(None, f"unknown key(s) {shown}; expected {', '.join(_FIELDS)}")
    for required in ("subject", "body"):
        if required not in doc:
            raise JsonInputError(required, "missing (required)")
    return JsonInput(
        subject=_check_subject(doc["subject"]),
        body=_check_body(doc["body"]),
        attrs=_check_attrs(doc.get("attrs", {})),
        lane=_check_lane(doc.get("lane", DEFAULT_LANE.name.lower())),
    )


def _load(line: bytes) -> Any:
    """Decode UTF-8 JSON strictly: no NaN/Infinity, no duplicate keys, bounded nesting."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonInputError(None, f"not valid UTF-8 at byte {exc.start}") from None
    if not text.strip():
        raise JsonInputError(None, "empty line")
    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise JsonInputError(None, f"not valid JSON: {exc.msg} at char {exc.pos}") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise JsonInputError(None, f"not valid JSON: {str(exc).split(':')[0][:100]}") from None
    except RecursionError:
        raise JsonInputError(None, f"nested deeper than {MAX_BODY_DEPTH} levels") from None


def _refuse_constant(name: str) -> Any:
    """Refuse NaN and Infinity, which JSON does not have."""
    raise JsonInputError(None, f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build an object, refusing a key given twice (which value was meant?)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise JsonInputError(key[:MAX_ATTR_KEY_BYTES], "key given twice in one object")
        seen.add(key)
    return dict(pairs)


def _check_subject(value: Any) -> str:
    """A subject suffix: dot-separated tokens of [A-Za-z0-9_-], no wildcards."""
    if not isinstance(value, str):
        raise JsonInputError("subject", f"expected a string, got {_kind(value)}")
    if not value:
        raise JsonInputError("subject", "empty")
    if len(value) > MAX_SUBJECT_SUFFIX_CHARS:
        raise JsonInputError("subject", f"longer than {MAX_SUBJECT_SUFFIX_CHARS} characters")
    tokens = value.split(".")
    if len(tokens) > MAX_SUBJECT_SUFFIX_TOKENS:
        raise JsonInputError("subject", f"more than {MAX_SUBJECT_SUFFIX_TOKENS} tokens")
    for i, token in enumerate(tokens):
        if not token:
            raise JsonInputError("subject", f"token {i + 1} is empty in {value!r}")
        if _TOKEN.fullmatch(token) is None:
            raise JsonInputError(
                "subject",
                f"token {token[:40]!r} may only hold A-Z a-z 0-9 _ - (no wildcards or spaces)",
            )
    return value


def _check_body(value: Any) -> dict[str, Any] | str:
    """A body: a JSON object (nesting and numbers bounded) or a string."""
    if isinstance(value, str):
        if len(value.encode("utf-8")) > MAX_BODY_BYTES:
            raise JsonInputError("body", f"string longer than {MAX_BODY_BYTES} bytes")
        return value
    if not isinstance(value, dict):
        raise JsonInputError("body", f"expected an object or a string, got {_kind(value)}")
    _check_nested(value)
    return value


def _check_nested(body: dict[str, Any]) -> None:
    """Walk a body without recursion: bounded depth, finite floats, 64-bit integers."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_BODY_DEPTH:
                raise JsonInputError("body", f"nested deeper than {MAX_BODY_DEPTH} levels")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
        else:
            _check_number("body", node)


def _check_number(field: str, value: Any) -> None:
    """Refuse floats that are not finite and integers msgpack cannot carry."""
    if isinstance(value, float) and not math.isfinite(value):
        raise JsonInputError(field, f"number {value} is out of range")
    if isinstance(value, int) and not isinstance(value, bool) and not _INT_MIN <= value <= _INT_MAX:
        raise JsonInputError(field, "integer outside the 64-bit range")


def _check_attrs(value: Any) -> dict[str, Scalar]:
    """Attrs: at most MAX_ATTRS keys of at most MAX_ATTR_KEY_BYTES chars, scalar values."""
    if not isinstance(value, dict):
        raise JsonInputError("attrs", f"expected an object, got {_kind(value)}")
    if len(value) > MAX_ATTRS:
        raise JsonInputError("attrs", f"{len(value)} attrs, at most {MAX_ATTRS} allowed")
    for key, item in value.items():
        field = f"attrs.{key[:MAX_ATTR_KEY_BYTES]}"
        if not key:
            raise JsonInputError("attrs", "empty key")
        if len(key) > MAX_ATTR_KEY_BYTES:
            raise JsonInputError(field, f"key longer than {MAX_ATTR_KEY_BYTES} characters")
        if isinstance(item, dict | list):
            raise JsonInputError(
                field, f"expected a string, number, boolean or null, got {_kind(item)}"
            )
        if isinstance(item, str) and len(item) > MAX_ATTR_VALUE_BYTES:
            raise JsonInputError(field, f"string longer than {MAX_ATTR_VALUE_BYTES} characters")
        _check_number(field, item)
    return value


def _check_lane(value: Any) -> Lane:
    """A lane name: critical, telemetry or bulk."""
    if not isinstance(value, str) or value not in _LANES:
        shown = value if isinstance(value, str) else _kind(value)
        raise JsonInputError("lane", f"expected one of {', '.join(_LANES)}, got {shown!r}")
    return _LANES[value]


def _kind(value: Any) -> str:
    """The JSON name of a decoded value's type, for error reasons."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


class LineSplitter:
    """Splits a byte stream (a tailed file, stdin) into lines, bounded.

    Lines end at LF (a CR before it is dropped); blank lines are skipped.  A line
    longer than ``max_line_bytes`` counts in ``overlong`` and is cut to the limit
    (``on_overlong="truncate"``) or left out (``"drop"``, right for JSON, where a cut
    line can only fail to parse).  The buffer never holds more than
    ``max_line_bytes + 1`` bytes.
    """

    def __init__(
        self,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        *,
        on_overlong: OverlongPolicy = "truncate",
    ) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be positive")
        if on_overlong not in ("truncate", "drop"):
            raise ValueError(f"on_overlong must be 'truncate' or 'drop', not {on_overlong!r}")
        self._max = max_line_bytes
        self._truncate = on_overlong == "truncate"
        self._buf = bytearray()
        self._discarding = False  # inside the rest of an overlong line
        self._lines = 0
        self._overlong = 0

    @property
    def lines(self) -> int:
        """Lines returned so far (cut ones included)."""
        return self._lines

    @property
    def overlong(self) -> int:
        """Lines longer than the limit (cut or dropped)."""
        return self._overlong

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished line."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Take the next bytes; return the lines they complete, without terminators."""
        out: list[bytes] = []
        pos = 0
        while pos < len(data):
            newline = data.find(b"\n", pos)
            stop = len(data) if newline < 0 else newline
            if not self._discarding:
                room = self._max + 1 - len(self._buf)  # one octet more, for a CR
                if stop - pos > room:
                    self._buf += data[pos : pos + room]
                    self._cut(out)
                    self._discarding = True
                else:
                    self._buf += data[pos:stop]
            if newline < 0:
                break
            if self._discarding:
                self._discarding = False
            else:
                self._end_line(out)
            pos = newline + 1
        return out

    def close(self) -> list[bytes]:
        """End of stream: return the last line if it had no newline."""
        out: list[bytes] = []
        if not self._discarding:
            self._end_line(out)
        self._discarding = False
        self._buf.clear()
        return out

    def _end_line(self, out: list[bytes]) -> None:
        """Emit the buffered line without its CR; cut or drop it if over the limit."""
        if self._buf.endswith(b"\r"):
            del self._buf[-1]
        if len(self._buf) > self._max:
            self._cut(out)
        elif self._buf:
            out.append(bytes(self._buf))
            self._lines += 1
            self._buf.clear()

    def _cut(self, out: list[bytes]) -> None:
        """Count an overlong line and emit its first max_line_bytes bytes, or nothing."""
        self._overlong += 1
        if self._truncate:
            out.append(bytes(self._buf[: self._max]))
            self._lines += 1
        self._buf.clear()

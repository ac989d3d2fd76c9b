"""The subscription filter language: parsed once into a tree of closures, never eval'ed.

Examples::

    attrs.severity <= 3 and device ~ "truck-*"
    lane in ["critical", "telemetry"] or not (body.battery_pct >= 10)
    exists attrs.msgid

Grammar (``not`` binds tighter than ``and``, which binds tighter than ``or``)::

    filter     := or_expr END
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | primary
    primary    := "(" or_expr ")" | "exists" field
                | field ("==" | "!=" | "<" | "<=" | ">" | ">=") literal
                | field "in" "[" [literal ("," literal)* [","]] "]"
                | field "~" string
    field      := name ("." key)*      top-level names: see FIELDS
    literal    := string | number | "true" | "false" | "null"

Semantics, chosen so that a filter never raises on a message:

- A missing field (or a path through something that is not a mapping) makes every
  comparison, ``in`` and ``~`` false; ``exists f`` is true when ``f`` is present and
  not null. So ``not (attrs.x == 1)`` is true for a message without ``attrs.x``.
- Values compare only with literals of their own kind: numbers (int or float, not
  bool) with numbers, strings with strings, booleans with booleans (``==``/``!=``).
  Any other pairing is false, including ``!=``. ``== null`` / ``!= null`` test a
  present value for being null.
- A bytes value is treated as its UTF-8 text (bad bytes become U+FFFD).
- ``~`` is a case-sensitive fnmatch glob (``*``, ``?``, ``[...]``) over the whole string.
"""

from __future__ import annotations

import difflib
import fnmatch
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from transport.errors import SquallError

MAX_FILTER_CHARS = 2000
MAX_DEPTH = 32
MAX_IN_ITEMS = 256

STRING_FIELDS: Final = frozenset({"subject", "tenant", "device", "lane"})
NUMBER_FIELDS: Final = frozenset({"seq", "ts", "offset"})
MAP_FIELDS: Final = frozenset({"attrs", "body"})
FIELDS: Final = STRING_FIELDS | NUMBER_FIELDS | MAP_FIELDS

Scalar: TypeAlias = str | int | float | bool | None
Predicate: TypeAlias = Callable[[Mapping[str, Any]], bool]


class FilterError(SquallError):
    """A filter expression that does not compile; ``position`` is the 0-based char index."""

    def __init__(self, reason: str, position: int) -> None:
        super().__init__(f"{reason} at position {position}")
        self.reason = reason
        self.position = position


# --- AST -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Field:
    """A dotted field path such as ``attrs.severity``."""

    path: tuple[str, ...]
    position: int


@dataclass(frozen=True, slots=True)
class Compare:
    """``field <op> literal`` with op one of == != < <= > >=."""

    field: Field
    op: str
    value: Scalar


@dataclass(frozen=True, slots=True)
class InList:
    """``field in [literal, ...]``."""

    field: Field
    values: tuple[Scalar, ...]


@dataclass(frozen=True, slots=True)
class Glob:
    """``field ~ "pattern"``."""

    field: Field
    pattern: str


@dataclass(frozen=True, slots=True)
class Exists:
    """``exists field``."""

    field: Field


@dataclass(frozen=True, slots=True)
class Not:
    """``not operand``."""

    operand: Node


@dataclass(frozen=True, slots=True)
class And:
    """All operands hold (evaluated left to right, stopping at the first false)."""

    operands: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    """Some operand holds (evaluated left to right, stopping at the first true)."""

    operands: tuple[Node, ...]


Node: TypeAlias = Compare | InList | Glob | Exists | Not | And | Or


# --- tokenizer -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    """One lexical token: ``kind`` is name/keyword/string/number/op/punct/end."""

    kind: str
    text: str
    position: int
    value: Scalar = None


_KEYWORDS: Final = frozenset({"and", "or", "not", "in", "exists", "true", "false", "null"})
_SCAN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*)*)
  | (?P<op>==|!=|<=|>=|<|>|~)
  | (?P<punct>[()\[\],])
  | (?P<quote>")
    """,
    re.VERBOSE,
)
_ESCAPES: Final = {
    '"': '"',
    "\\": "\\",
    "/": "/",
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "b": "\b",
    "f": "\f",
}
_HEX = re.compile(r"[0-9A-Fa-f]{4}")


def _tokenize(text: str) -> list[_Token]:
    """Split ``text`` into tokens, ending with an ``end`` token at len(text)."""
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        m = _SCAN.match(text, pos)
        if m is None:
            hint = " (strings use double quotes)" if text[pos] == "'" else ""
            raise FilterError(f"unexpected character {text[pos]!r}{hint}", pos)
        kind = m.lastgroup or ""
        if kind == "quote":
            token, pos = _scan_string(text, pos)
            tokens.append(token)
            continue
        word = m.group()
        if kind == "number":
            tokens.append(_Token("number", word, pos, _number(word)))
        elif kind == "name":
            tokens.append(_name_token(word, pos))
        elif kind != "space":
            tokens.append(_Token(kind, word, pos))
        pos = m.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


def _number(word: str) -> int | float:
    """The int or float a number token spells."""
    if "." in word or "e" in word or "E" in word:
        return float(word)
    return int(word)


def _name_token(word: str, pos: int) -> _Token:
    """A keyword, or a field path whose every dotted segment is non-empty."""
    if word in _KEYWORDS:
        value: Scalar = {"true": True, "false": False}.get(word)
        return _Token("keyword", word, pos, value)
    offset = pos
    for segment in word.split("."):
        if not segment:
            raise FilterError(f"empty path segment in field {word!r}", offset)
        offset += len(segment) + 1
    return _Token("name", word, pos)


def _scan_string(text: str, start: int) -> tuple[_Token, int]:
    """Read a double-quoted string at ``start``; return its token and the index after it."""
    out: list[str] = []
    pos = start + 1
    while pos < len(text):
        c = text[pos]
        if c == '"':
            value = "".join(out)
            return _Token("string", text[start : pos + 1], start, value), pos + 1
        if c == "\\":
            pos = _scan_escape(text, pos, out)
            continue
        out.append(c)
        pos += 1
    raise FilterError("unterminated string starting", start)


def _scan_escape(text: str, pos: int, out: list[str]) -> int:
    """Decode the backslash escape at ``pos`` into ``out``; return the index after it."""
    code = text[pos + 1 : pos + 2]
    if code in _ESCAPES:
        out.append(_ESCAPES[code])
        return pos + 2
    if code == "u" and _HEX.fullmatch(text, pos + 2, pos + 6):
        out.append(chr(int(text[pos + 2 : pos + 6], 16)))
        return pos + 6
    shown = "\\" + code if code else "\\"
    raise FilterError(f"unknown escape {shown!r} in string", pos)


# --- parser ----------------------------------------------------------------------------

_COMPARE_OPS: Final = frozenset({"==", "!=", "<", "<=", ">", ">="})
_ORDER_OPS: Final = frozenset({"<", "<=", ">", ">="})
_OPERATOR_LIST: Final = "==, !=, <, <=, >, >=, ~ or in"


class _Parser:
    """Recursive descent over the token list; every error names a position."""

    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens
        self._index = 0
        self._depth = 0

    def parse(self) -> Node:
        """Parse the whole filter."""
        node = self._or()
        token = self._peek()
        if token.kind != "end":
            raise FilterError(
                f"expected 'and', 'or' or the end, got {_show(token)}", token.position
            )
        return node

    def _peek(self) -> _Token:
        return self._tokens[self._index]

    def _next(self) -> _Token:
        token = self._tokens[self._index]
        if token.kind != "end":
            self._index += 1
        return token

    def _accept_keyword(self, word: str) -> _Token | None:
        token = self._peek()
        if token.kind == "keyword" and token.text == word:
            return self._next()
        return None

    def _or(self) -> Node:
        operands = [self._and()]
        while self._accept_keyword("or"):
            operands.append(self._and())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def _and(self) -> Node:
        operands = [self._not()]
        while self._accept_keyword("and"):
            operands.append(self._not())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def _not(self) -> Node:
        token = self._accept_keyword("not")
        if token is None:
            return self._primary()
        self._enter(token)
        node = Not(self._not())
        self._depth -= 1
        return node

    def _enter(self, token: _Token) -> None:
        """Count one level of nesting (a parenthesis or a ``not``) against MAX_DEPTH."""
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise FilterError(f"nesting deeper than {MAX_DEPTH} levels", token.position)

    def _primary(self) -> Node:
        token = self._peek()
        if token.kind == "punct" and token.text == "(":
            return self._group()
        if token.kind == "keyword" and token.text == "exists":
            self._next()
            return Exists(self._field(after="'exists'"))
        if token.kind != "name":
            raise FilterError(
                f"expected a condition (a field, 'not', 'exists' or '('), got {_show(token)}",
                token.position,
            )
        field = self._field(after="")
        op = self._next()
        if op.kind == "op" and op.text in _COMPARE_OPS:
            return Compare(field, op.text, self._literal(op, field))
        if op.kind == "op" and op.text == "~":
            return self._glob(field, op)
        if op.kind == "keyword" and op.text == "in":
            return self._in_list(field, op)
        raise FilterError(
            f"expected an operator ({_OPERATOR_LIST}) after {'.'.join(field.path)!r}, "
            f"got {_show(op)}",
            op.position,
        )

    def _group(self) -> Node:
        opening = self._next()
        self._enter(opening)
        node = self._or()
        closing = self._next()
        if not (closing.kind == "punct" and closing.text == ")"):
            raise FilterError(
                f"expected ')' to close the '(' at position {opening.position}, "
                f"got {_show(closing)}",
                closing.position,
            )
        self._depth -= 1
        return node

    def _field(self, after: str) -> Field:
        token = self._next()
        if token.kind != "name":
            raise FilterError(
                f"expected a field name after {after}, got {_show(token)}", token.position
            )
        path = tuple(token.text.split("."))
        head = path[0]
        if head not in FIELDS:
            raise FilterError(_unknown_field(head), token.position)
        if len(path) > 1 and head not in MAP_FIELDS:
            raise FilterError(f"field {head!r} has no sub-fields", token.position)
        return Field(path, token.position)

    def _literal(self, op: _Token, field: Field) -> Scalar:
        token = self._next()
        if token.kind in ("string", "number") or (
            token.kind == "keyword" and token.text in ("true", "false", "null")
        ):
            _check_kinds(field, op, token)
            return token.value
        hint = " (strings are double-quoted)" if token.kind == "name" else ""
        raise FilterError(
            f"expected a value after {op.text!r}, got {_show(token)}{hint}", token.position
        )

    def _glob(self, field: Field, op: _Token) -> Glob:
        token = self._next()
        if token.kind != "string":
            raise FilterError(
                f"expected a quoted glob pattern after '~', got {_show(token)}", token.position
            )
        _check_kinds(field, op, token)
        return Glob(field, str(token.value))

    def _in_list(self, field: Field, op: _Token) -> InList:
        opening = self._next()
        if not (opening.kind == "punct" and opening.text == "["):
            raise FilterError(f"expected '[' after 'in', got {_show(opening)}", opening.position)
        values: list[Scalar] = []
        while True:
            token = self._peek()
            if token.kind == "punct" and token.text == "]":
                self._next()
                return InList(field, tuple(values))
            if len(values) == MAX_IN_ITEMS:
                raise FilterError(f"'in' list longer than {MAX_IN_ITEMS} items", token.position)
            values.append(self._literal(op, field))
            separator = self._peek()
            if separator.kind == "punct" and separator.text == ",":
                self._next()
            elif not (separator.kind == "punct" and separator.text == "]"):
                raise FilterError(
                    f"expected ',' or ']' in the list opened at position {opening.position}, "
                    f"got {_show(separator)}",
                    separator.position,
                )


def _show(token: _Token) -> str:
    """How a token is named in an error message."""
    return "the end" if token.kind == "end" else repr(token.text)


def _unknown_field(name: str) -> str:
    """Error text for an unknown top-level field, with a suggestion when one fits."""
    valid = ", ".join(sorted(FIELDS))
    close = difflib.get_close_matches(name, sorted(FIELDS), n=1)
    hint = f"; did you mean {close[0]!r}" if close else f"; did you mean 'attrs.{name}'"
    return f"unknown field {name!r} (valid fields: {valid}{hint}?)"


def _check_kinds(field: Field, op: _Token, literal: _Token) -> None:
    """Refuse what can never match: ordering bool/null, or the wrong kind for a typed field."""
    kind = literal.kind if literal.kind in ("number", "string") else "keyword"
    if op.text in _ORDER_OPS and kind == "keyword":
        raise FilterError(
            f"{op.text!r} compares numbers or strings, not {literal.text}", literal.position
        )
    if literal.text == "null" and op.text in ("==", "!="):
        return
    head = field.path[0]
    expected = "number" if head in NUMBER_FIELDS else "string" if head in STRING_FIELDS else kind
    if kind != expected:
        raise FilterError(
            f"field {head!r} holds a {expected}, so {literal.text} can never match",
            literal.position,
        )


# --- compiler --------------------------------------------------------------------------

_MISSING: Final = object()
_OPS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
Getter: TypeAlias = Callable[[Mapping[str, Any]], Any]


def _getter(path: tuple[str, ...]) -> Getter:
    """A function reading ``path`` from a message, or _MISSING."""
    head = path[0]
    if len(path) == 1:
        return lambda message: message.get(head, _MISSING)
    rest = path[1:]

    def get(message: Mapping[str, Any]) -> Any:
        current = message.get(head, _MISSING)
        for key in rest:
            if isinstance(current, Mapping):
                current = current.get(key, _MISSING)
            else:
                return _MISSING
        return current

    return get


_NUMBER_TYPES: Final = (int, float)


def _is_number(value: object) -> bool:
    """True for int and float values, but not bool."""
    return isinstance(value, _NUMBER_TYPES) and type(value) is not bool


def _text(value: object) -> str | None:
    """The string a value stands for in string comparisons, or None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None


def _compile_compare(node: Compare) -> Predicate:
    """Closure for ``field <op> literal`` that is false on missing or mismatched values."""
    get = _getter(node.field.path)
    op = _OPS[node.op]
    literal = node.value
    if literal is None:
        if node.op == "==":
            return lambda m: get(m) is None
        return lambda m: (v := get(m)) is not None and v is not _MISSING
    if isinstance(literal, bool):
        return lambda m: isinstance(v := get(m), bool) and op(v, literal)
    if isinstance(literal, str):

        def compare_text(m: Mapping[str, Any]) -> bool:
            value = get(m)
            if isinstance(value, str):
                return op(value, literal)
            text = _text(value)
            return text is not None and op(text, literal)

        return compare_text
    return lambda m: (
        isinstance(v := get(m), _NUMBER_TYPES) and type(v) is not bool and op(v, literal)
    )


def _compile_in(node: InList) -> Predicate:
    """Closure for ``field in [...]`` with one set per kind so 1 never equals true."""
    get = _getter(node.field.path)
    texts = frozenset(v for v in node.values if isinstance(v, str))
    numbers = frozenset(v for v in node.values if _is_number(v))
    booleans = frozenset(v for v in node.values if isinstance(v, bool))
    has_null = None in node.values

    def member(m: Mapping[str, Any]) -> bool:
        value = get(m)
        if isinstance(value, str):
            return value in texts
        if isinstance(value, bool):
            return value in booleans
        if isinstance(value, _NUMBER_TYPES):
            return value in numbers
        if isinstance(value, bytes):
            return _text(value) in texts
        return value is None and has_null

    return member


def _compile_glob(node: Glob) -> Predicate:
    """Closure for ``field ~ "glob"``; a plain ``prefix*`` becomes startswith."""
    get = _getter(node.field.path)
    pattern = node.pattern
    stem = pattern[:-1]
    if pattern.endswith("*") and not any(c in stem for c in "*?["):

        def starts(m: Mapping[str, Any]) -> bool:
            text = _text(get(m))
            return text is not None and text.startswith(stem)

        return starts
    match = re.compile(fnmatch.translate(pattern)).match

    def globs(m: Mapping[str, Any]) -> bool:
        text = _text(get(m))
        return text is not None and match(text) is not None

    return globs


def _compile_all(predicates: list[Predicate]) -> Predicate:
    """Closure true when every predicate is, stopping at the first false."""
    if len(predicates) == 2:
        a, b = predicates
        return lambda m: a(m) and b(m)
    items = tuple(predicates)

    def every(m: Mapping[str, Any]) -> bool:
        for predicate in items:  # noqa: SIM110 - a plain loop beats all() over a generator
            if not predicate(m):
                return False
        return True

    return every


def _compile_any(predicates: list[Predicate]) -> Predicate:
    """Closure true when some predicate is, stopping at the first true."""
    if len(predicates) == 2:
        a, b = predicates
        return lambda m: a(m) or b(m)
    items = tuple(predicates)

    def some(m: Mapping[str, Any]) -> bool:
        for predicate in items:  # noqa: SIM110 - a plain loop beats any() over a generator
            if predicate(m):
                return True
        return False

    return some


def _compile(node: Node) -> Predicate:
    """Turn an AST node into a predicate closure."""
    if isinstance(node, Compare):
        return _compile_compare(node)
    if isinstance(node, InList):
        return _compile_in(node)
    if isinstance(node, Glob):
        return _compile_glob(node)
    if isinstance(node, Exists):
        get = _getter(node.field.path)
        return lambda m: (v := get(m)) is not None and v is not _MISSING
    if isinstance(node, Not):
        inner = _compile(node.operand)
        return lambda m: not inner(m)
    if isinstance(node, And):
        return _compile_all([_compile(n) for n in node.operands])
    return _compile_any([_compile(n) for n in node.operands])


# --- public ----------------------------------------------------------------------------


class Filter:
    """A compiled filter: ``matches(message)`` answers without raising, ``text`` is the source."""

    __slots__ = ("_predicate", "ast", "text")

    def __init__(self, text: str, ast: Node, predicate: Predicate) -> None:
        self.text = text
        self.ast = ast
        self._predicate = predicate

    def matches(self, message: Mapping[str, Any]) -> bool:
        """True when ``message`` (keys subject, tenant, device, ..., attrs, body) passes."""
        return self._predicate(message)

    def __repr__(self) -> str:
        return f"Filter({self.text!r})"


def parse_filter(text: str) -> Node:
    """Parse ``text`` into an AST; FilterError names the position of the first problem."""
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(
            f"filter is {len(text)} characters, longer than {MAX_FILTER_CHARS}", MAX_FILTER_CHARS
        )
    return _Parser(_tokenize(text)).parse()


def compile_filter(text: str) -> Filter:
    """Parse and compile ``text`` once; FilterError (with ``position``) if it is not valid."""
    ast = parse_filter(text)
    return Filter(text, ast, _compile(ast))

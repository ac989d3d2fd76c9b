"""NATS-style subjects: validation, a brute-force matcher and a wildcard trie for the kernel.

A subject is dot-separated tokens (``acme.truck-042.telemetry.gps``). In a pattern,
``*`` matches exactly one token and ``>`` matches one or more trailing tokens (it must
be the last token). Tokens are non-empty runs of printable, non-space characters other
than ``.``, ``*`` and ``>``; a subject has at most MAX_TOKENS tokens and
MAX_SUBJECT_BYTES bytes of UTF-8.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from itertools import chain
from typing import Generic, TypeVar

from transport.errors import SquallError

MAX_SUBJECT_BYTES = 256
MAX_TOKENS = 16
DEFAULT_CACHE_SIZE = 65536

STAR = "*"
TAIL = ">"

T = TypeVar("T", bound=Hashable)


class SubjectError(SquallError):
    """A subject or pattern breaks the syntax rules; the reason says which rule and where."""

    def __init__(self, text: str, reason: str) -> None:
        shown = text if len(text) <= 80 else text[:77] + "..."
        super().__init__(f"invalid subject {shown!r}: {reason}")
        self.subject = text
        self.reason = reason


def validate_subject(subject: str) -> None:
    """Raise SubjectError unless ``subject`` is a valid concrete subject (no wildcards)."""
    _split_checked(subject, wildcards=False)


def validate_pattern(pattern: str) -> None:
    """Raise SubjectError unless ``pattern`` is a valid subscription pattern."""
    _split_checked(pattern, wildcards=True)


def match_pattern(pattern: str, subject: str) -> bool:
    """Say whether ``subject`` matches ``pattern``, token by token (the reference matcher)."""
    ptokens = _split_checked(pattern, wildcards=True)
    stokens = _split_checked(subject, wildcards=False)
    for i, token in enumerate(ptokens):
        if token == TAIL:
            return len(stokens) > i
        if i >= len(stokens) or (token != STAR and token != stokens[i]):
            return False
    return len(ptokens) == len(stokens)


def _split_checked(text: str, *, wildcards: bool) -> list[str]:
    """Split ``text`` into tokens after checking every syntax rule and limit."""
    if not text:
        raise SubjectError(text, "empty subject")
    # Characters never outnumber UTF-8 bytes, so this bounds the work below.
    if len(text) > MAX_SUBJECT_BYTES:
        raise SubjectError(text, f"longer than {MAX_SUBJECT_BYTES} bytes")
    if not text.isprintable() or " " in text:
        bad = next(i for i, c in enumerate(text) if c == " " or not c.isprintable())
        raise SubjectError(text, f"space or unprintable character at position {bad}")
    if not text.isascii() and len(text.encode("utf-8")) > MAX_SUBJECT_BYTES:
        raise SubjectError(text, f"longer than {MAX_SUBJECT_BYTES} bytes")
    tokens = text.split(".")
    if len(tokens) > MAX_TOKENS:
        raise SubjectError(text, f"more than {MAX_TOKENS} tokens")
    if "" in tokens:
        raise SubjectError(text, f"empty token at position {_offset(tokens, tokens.index(''))}")
    if STAR in text or TAIL in text:
        _check_wildcards(text, tokens, wildcards)
    return tokens


def _check_wildcards(text: str, tokens: list[str], wildcards: bool) -> None:
    """Reject wildcards in subjects, wildcards inside tokens, and a ``>`` that is not last."""
    for i, token in enumerate(tokens):
        position = _offset(tokens, i)
        if token in (STAR, TAIL):
            if not wildcards:
                raise SubjectError(text, f"wildcard {token!r} at position {position} in a subject")
            if token == TAIL and i != len(tokens) - 1:
                raise SubjectError(text, f"'>' at position {position} is not the last token")
        elif STAR in token or TAIL in token:
            raise SubjectError(
                text, f"'*' or '>' inside token {token!r} at position {position} (must stand alone)"
            )


def _offset(tokens: list[str], index: int) -> int:
    """Character position where token ``index`` starts."""
    return sum(len(t) + 1 for t in tokens[:index])


class _Node(Generic[T]):
    """One trie level: literal children, a ``*`` child, and the values ending here."""

    __slots__ = ("children", "star", "tail", "values")

    def __init__(self) -> None:
        # Empty containers are None: a trie of 100,000 patterns has ~150,000 nodes.
        self.children: dict[str, _Node[T]] | None = None
        self.star: _Node[T] | None = None
        self.tail: set[T] | None = None  # values of patterns that end with '>' here
        self.values: set[T] | None = None  # values of patterns that end exactly here

    def is_empty(self) -> bool:
        """True when nothing hangs below or at this node, so it can be pruned."""
        return not (self.children or self.star or self.tail or self.values)


def _walk(node: _Node[T], tokens: list[str], i: int, n: int, found: list[set[T]]) -> None:
    """Append to ``found`` the value sets matching ``tokens[i:]`` below ``node``.

    Loops down the literal path and recurses only into ``*`` branches, so a subject
    visits at most one node per distinct wildcard shape per level.
    """
    while True:
        if i == n:
            if node.values is not None:
                found.append(node.values)
            return
        if node.tail is not None:
            found.append(node.tail)
        if node.star is not None:
            _walk(node.star, tokens, i + 1, n, found)
        children = node.children
        if children is None:
            return
        child = children.get(tokens[i])
        if child is None:
            return
        node = child
        i += 1


class SubjectTrie(Generic[T]):
    """Patterns -> values; ``match(subject)`` returns every value whose pattern matches.

    Matching walks one trie level per subject token, following the literal child, the
    ``*`` child and collecting ``>`` values, so its cost depends on the subject's length
    and the wildcard shapes present, not on the number of patterns.

    Results are kept in an LRU cache of at most ``cache_size`` subjects (0 disables it).
    Invalidation on add/remove: a pattern without wildcards can only change the result
    for the one subject equal to it, so just that entry is dropped; a pattern with a
    wildcard clears the whole cache (only if it holds anything). Clearing costs no more
    than the misses that filled it; targeted invalidation for wildcards would need a scan
    of every cached subject per subscription change.

    Memory: one node per distinct pattern prefix, pruned on removal; the number of
    subscriptions is bounded by the kernel that owns the trie.
    """

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self._root: _Node[T] = _Node()
        self._empty: frozenset[T] = frozenset()
        self._count = 0
        self._cache_size = cache_size
        self._cache: OrderedDict[str, frozenset[T]] | None = (
            OrderedDict() if cache_size > 0 else None
        )
        self.hits = 0
        self.misses = 0
        self.invalidations = 0  # times the whole cache was cleared

    def __len__(self) -> int:
        """Number of distinct (pattern, value) pairs held."""
        return self._count

    @property
    def cache_len(self) -> int:
        """Number of subjects currently cached."""
        return len(self._cache) if self._cache is not None else 0

    def add(self, pattern: str, value: T) -> bool:
        """Register ``value`` under ``pattern``; False if that pair was already there."""
        tokens = _split_checked(pattern, wildcards=True)
        node = self._root
        for token in tokens[:-1] if tokens[-1] == TAIL else tokens:
            if token == STAR:
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                if node.children is None:
                    node.children = {}
                child = node.children.get(token)
                if child is None:
                    child = node.children[token] = _Node()
                node = child
        if tokens[-1] == TAIL:
            if node.tail is None:
                node.tail = set()
            bucket = node.tail
        else:
            if node.values is None:
                node.values = set()
            bucket = node.values
        if value in bucket:
            return False
        bucket.add(value)
        self._count += 1
        self._invalidate(pattern, tokens)
        return True

    def remove(self, pattern: str, value: T) -> bool:
        """Unregister ``value`` from ``pattern``; False if that pair was not there."""
        tokens = _split_checked(pattern, wildcards=True)
        tail = tokens[-1] == TAIL
        path: list[tuple[_Node[T], str]] = []
        node = self._root
        for token in tokens[:-1] if tail else tokens:
            path.append((node, token))
            if token == STAR:
                child = node.star
            else:
                child = node.children.get(token) if node.children is not None else None
            if child is None:
                return False
            node = child
        bucket = node.tail if tail else node.values
        if bucket is None or value not in bucket:
            return False
        bucket.discard(value)
        self._count -= 1
        if not bucket:
            if tail:
                node.tail = None
            else:
                node.values = None
        self._prune(node, path)
        self._invalidate(pattern, tokens)
        return True

    def match(self, subject: str) -> frozenset[T]:
        """Values of every pattern matching ``subject``; SubjectError if it is not valid."""
        cache = self._cache
        if cache is not None:
            hit = cache.get(subject)
            if hit is not None:
                cache.move_to_end(subject)
                self.hits += 1
                return hit
        self.misses += 1
        result = self._collect(_split_checked(subject, wildcards=False))
        if cache is not None:
            cache[subject] = result
            if len(cache) > self._cache_size:
                cache.popitem(last=False)
        return result

    def _collect(self, tokens: list[str]) -> frozenset[T]:
        """Walk the trie for ``tokens`` and merge the matching value sets."""
        found: list[set[T]] = []
        _walk(self._root, tokens, 0, len(tokens), found)
        if not found:
            return self._empty
        if len(found) == 1:
            return frozenset(found[0])
        return frozenset(chain.from_iterable(found))

    def _prune(self, node: _Node[T], path: list[tuple[_Node[T], str]]) -> None:
        """Drop nodes left empty by a removal, bottom-up, so the trie stays bounded."""
        for parent, token in reversed(path):
            if not node.is_empty():
                return
            if token == STAR:
                parent.star = None
            elif parent.children is not None:
                del parent.children[token]
                if not parent.children:
                    parent.children = None
            node = parent

    def _invalidate(self, pattern: str, tokens: list[str]) -> None:
        """Forget cached results that the changed pattern could affect."""
        cache = self._cache
        if not cache:
            return
        if STAR in tokens or TAIL in tokens:
            cache.clear()
            self.invalidations += 1
        else:
            cache.pop(pattern, None)

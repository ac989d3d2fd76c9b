"""Subject syntax, the reference matcher, and the trie checked against it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.subjects import (
    MAX_SUBJECT_BYTES,
    MAX_TOKENS,
    SubjectError,
    SubjectTrie,
    match_pattern,
    validate_pattern,
    validate_subject,
)
from transport.errors import SquallError

MATCH_TABLE = [
    # exact
    ("acme.truck-042.telemetry.gps", "acme.truck-042.telemetry.gps", True),
    ("acme.truck-042.telemetry.gps", "acme.truck-042.telemetry.speed", False),
    ("acme.truck-042.telemetry", "acme.truck-042.telemetry.gps", False),
    ("acme.truck-042.telemetry.gps", "acme.truck-042.telemetry", False),
    ("a", "a", True),
    ("a", "b", False),
    # '*' is exactly one token
    ("acme.*.telemetry.gps", "acme.truck-042.telemetry.gps", True),
    ("acme.*.telemetry.gps", "acme.truck-042.log.auth", False),
    ("acme.*.gps", "acme.truck-042.telemetry.gps", False),
    ("*.*.log.auth", "acme.truck-042.log.auth", True),
    ("*.*.log.auth", "acme.log.auth", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.*", "a", False),
    ("a.*", "a.b", True),
    ("*.*", "a.b", True),
    ("*.*", "a.b.c", False),
    # '>' is one or more trailing tokens
    ("acme.truck-042.>", "acme.truck-042.telemetry.gps", True),
    ("acme.truck-042.>", "acme.truck-042.presence", True),
    ("acme.truck-042.>", "acme.truck-042", False),
    ("acme.truck-042.>", "acme.truck-043.presence", False),
    (">", "a", True),
    (">", "a.b.c.d", True),
    ("a.>", "a", False),
    ("*.>", "a.b", True),
    ("*.>", "a", False),
    ("a.*.>", "a.b.c", True),
    ("a.*.>", "a.b", False),
    # wildcard characters inside a subject's token are literal-free: tokens compare whole
    ("acme.truck", "acme.truck-042", False),
    ("acme.truck-04", "acme.truck-042", False),
]


@pytest.mark.parametrize(("pattern", "subject", "expected"), MATCH_TABLE)
def test_match_pattern_table(pattern: str, subject: str, expected: bool) -> None:
    assert match_pattern(pattern, subject) is expected


@pytest.mark.parametrize(("pattern", "subject", "expected"), MATCH_TABLE)
def test_trie_agrees_with_table(pattern: str, subject: str, expected: bool) -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    trie.add(pattern, "sub")
    assert trie.match(subject) == (frozenset({"sub"}) if expected else frozenset())


BAD_SUBJECTS = [
    ("", "empty subject"),
    ("a..b", "empty token at position 2"),
    (".a", "empty token at position 0"),
    ("a.", "empty token at position 2"),
    ("a.*.b", "wildcard '*' at position 2 in a subject"),
    ("a.>", "wildcard '>' at position 2 in a subject"),
    ("a.b*", "inside token 'b*'"),
    ("a b", "space or unprintable character at position 1"),
    ("a.\tb", "space or unprintable character at position 2"),
    ("a.\x00", "space or unprintable character at position 2"),
    ("x" * (MAX_SUBJECT_BYTES + 1), f"longer than {MAX_SUBJECT_BYTES} bytes"),
    ("é" * (MAX_SUBJECT_BYTES // 2 + 1), f"longer than {MAX_SUBJECT_BYTES} bytes"),
    (".".join(["t"] * (MAX_TOKENS + 1)), f"more than {MAX_TOKENS} tokens"),
]


@pytest.mark.parametrize(("subject", "reason"), BAD_SUBJECTS)
def test_validate_subject_refuses(subject: str, reason: str) -> None:
    with pytest.raises(SubjectError) as info:
        validate_subject(subject)
    assert reason in info.value.reason
    assert isinstance(info.value, SquallError)


BAD_PATTERNS = [
    ("", "empty subject"),
    ("a..>", "empty token at position 2"),
    ("a.>.b", "'>' at position 2 is not the last token"),
    (">.>", "'>' at position 0 is not the last token"),
    ("a.b*", "inside token 'b*'"),
    ("a.>b", "inside token '>b'"),
    ("a.**", "inside token '**'"),
    ("a .b", "space or unprintable character at position 1"),
    (".".join(["*"] * (MAX_TOKENS + 1)), f"more than {MAX_TOKENS} tokens"),
]


@pytest.mark.parametrize(("pattern", "reason"), BAD_PATTERNS)
def test_validate_pattern_refuses(pattern: str, reason: str) -> None:
    with pytest.raises(SubjectError) as info:
        validate_pattern(pattern)
    assert reason in info.value.reason


@pytest.mark.parametrize(
    "text",
    [
        "acme.truck-042.telemetry.gps",
        "a",
        "ünïcode.tökens",
        "x" * MAX_SUBJECT_BYTES,
        ".".join(["t"] * MAX_TOKENS),
        "a-b_c:d/e@f#g!h",
    ],
)
def test_valid_subjects_pass(text: str) -> None:
    validate_subject(text)
    validate_pattern(text)


@pytest.mark.parametrize("pattern", ["*", ">", "*.>", "acme.*.log.*", "a.b.>", "*.*.*"])
def test_valid_patterns_pass(pattern: str) -> None:
    validate_pattern(pattern)
    with pytest.raises(SubjectError):
        validate_subject(pattern)


def test_trie_rejects_bad_pattern_and_subject() -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    with pytest.raises(SubjectError):
        trie.add("a.>.b", 1)
    with pytest.raises(SubjectError):
        trie.match("a.*")
    assert len(trie) == 0


def test_add_remove_report_changes_and_len() -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    assert trie.add("acme.*.log.auth", 1) is True
    assert trie.add("acme.*.log.auth", 1) is False
    assert trie.add("acme.*.log.auth", 2) is True
    assert trie.add("acme.>", 1) is True
    assert len(trie) == 3
    assert trie.match("acme.t1.log.auth") == {1, 2}
    assert trie.remove("acme.*.log.auth", 3) is False
    assert trie.remove("acme.nope.log.auth", 1) is False
    assert trie.remove("acme.*.log.auth", 1) is True
    assert trie.remove("acme.*.log.auth", 1) is False
    assert len(trie) == 2
    assert trie.match("acme.t1.log.auth") == {1, 2}  # 1 still there through acme.>
    assert trie.remove("acme.>", 1) is True
    assert trie.match("acme.t1.log.auth") == {2}


def test_removing_everything_prunes_the_trie() -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    patterns = ["a.b.c", "a.*.c", "a.>", ">", "*.b", "a.b.c.>"]
    for i, p in enumerate(patterns):
        trie.add(p, i)
    for i, p in enumerate(patterns):
        assert trie.remove(p, i)
    assert len(trie) == 0
    assert trie._root.is_empty()
    assert trie.match("a.b.c") == frozenset()


def test_cache_counts_hits_and_misses() -> None:
    trie: SubjectTrie[int] = SubjectTrie(cache_size=8)
    trie.add("a.*", 1)
    assert trie.match("a.b") == {1}
    assert trie.match("a.b") == {1}
    assert trie.match("a.c") == {1}
    assert (trie.hits, trie.misses) == (1, 2)
    assert trie.cache_len == 2


def test_cache_is_bounded_lru() -> None:
    trie: SubjectTrie[int] = SubjectTrie(cache_size=2)
    trie.add(">", 1)
    trie.match("a")
    trie.match("b")
    trie.match("a")  # a is now most recent; b is the eviction candidate
    trie.match("c")
    assert trie.cache_len == 2
    hits = trie.hits
    trie.match("a")
    assert trie.hits == hits + 1
    trie.match("b")
    assert trie.hits == hits + 1  # b was evicted


def test_exact_pattern_drops_only_its_subject() -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    trie.add("a.*", 1)
    trie.match("a.b")
    trie.match("a.c")
    trie.add("a.b", 2)
    assert trie.cache_len == 1
    assert trie.invalidations == 0
    assert trie.match("a.b") == {1, 2}
    assert trie.match("a.c") == {1}
    trie.remove("a.b", 2)
    assert trie.match("a.b") == {1}


def test_wildcard_change_clears_cache() -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    trie.add("a.b", 1)
    assert trie.match("a.b") == {1}
    trie.add("a.>", 2)
    assert trie.cache_len == 0
    assert trie.invalidations == 1
    assert trie.match("a.b") == {1, 2}
    trie.remove("a.>", 2)
    assert trie.match("a.b") == {1}


def test_cache_disabled() -> None:
    trie: SubjectTrie[int] = SubjectTrie(cache_size=0)
    trie.add("a.*", 1)
    assert trie.match("a.b") == {1}
    assert trie.match("a.b") == {1}
    assert trie.hits == 0
    assert trie.cache_len == 0
    with pytest.raises(ValueError):
        SubjectTrie(cache_size=-1)


# --- property: the trie equals brute force under any add/remove/match sequence -----------

TOKENS = ["a", "b", "c"]
subject_st = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=4).map(".".join)
pattern_st = st.builds(
    lambda body, tail: ".".join([*body, ">"] if tail or not body else body),
    st.lists(st.sampled_from([*TOKENS, "*"]), max_size=4),
    st.booleans(),
)
op_st = st.tuples(
    st.sampled_from(["add", "add", "remove", "match", "match"]),
    st.integers(0, 7),  # index into the drawn pattern pool or subject pool
    st.integers(0, 2),  # value
)


def _near_subjects(pattern: str) -> list[str]:
    """Concrete subjects on both sides of ``pattern``'s edge cases."""
    tokens = ["a" if t == "*" else t for t in pattern.split(".")]
    if tokens[-1] != ">":
        return [".".join(tokens)]
    return [".".join(t) for t in (tokens[:-1], [*tokens[:-1], "b"]) if t]


@settings(max_examples=400, deadline=None)
@given(
    patterns=st.lists(st.one_of(subject_st, pattern_st), min_size=1, max_size=5),
    subjects=st.lists(subject_st, min_size=1, max_size=4),
    ops=st.lists(op_st, max_size=50),
    cache_size=st.sampled_from([0, 1, 3, 64]),
)
def test_trie_equals_brute_force(
    patterns: list[str], subjects: list[str], ops: list[tuple[str, int, int]], cache_size: int
) -> None:
    trie: SubjectTrie[int] = SubjectTrie(cache_size=cache_size)
    model: set[tuple[str, int]] = set()
    # Subjects near the patterns: exact ones (an exact add/remove must refresh its cached
    # subject), and each pattern filled in with and without its '>' tail.
    subjects = subjects + [near for p in patterns for near in _near_subjects(p)]
    for op, index, value in ops:
        if op == "match":
            subject = subjects[index % len(subjects)]
            assert trie.match(subject) == {v for p, v in model if match_pattern(p, subject)}
            continue
        pattern = patterns[index % len(patterns)]
        if op == "add":
            assert trie.add(pattern, value) is ((pattern, value) not in model)
            model.add((pattern, value))
        else:
            assert trie.remove(pattern, value) is ((pattern, value) in model)
            model.discard((pattern, value))
        assert len(trie) == len(model)
    assert trie.cache_len <= cache_size
    # After every pattern is removed again no node is left behind (the trie stays bounded).
    for pattern, value in model:
        trie.remove(pattern, value)
    assert trie._root.is_empty()

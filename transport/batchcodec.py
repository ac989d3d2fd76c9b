"""Record batches: the compact columnar encoding inside DATA frames (msgpack + zstd).

A batch of records is transposed into columns before compression: seq and ts as
deltas, subjects as indexes into a small table, and dict bodies split per key, with
decimal-looking floats stored as scaled integer deltas.  Telemetry that changes a
little per record (GPS, temperatures, counters) then costs a byte or two per field.
Every column is checked against the batch's count on decode; every failure is one
``WireError``.
"""

from __future__ import annotations

import itertools
import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zstandard

from transport.errors import ErrorCode, LocalProtocolError, WireError
from transport.limits import (
    MAX_ATTR_KEY_BYTES,
    MAX_ATTR_VALUE_BYTES,
    MAX_ATTRS,
    MAX_BATCH_RAW_BYTES,
    MAX_BATCH_RECORDS,
    MAX_BODY_BYTES,
    MAX_BODY_KEYS,
    MAX_SUBJECT_BYTES,
)

Scalar = str | int | float | bool | None
Body = bytes | str | dict[str, Any] | list[Any] | int | float | bool | None

CODEC_NONE = 0
CODEC_ZSTD = 1

_MISSING_COLUMN = 0  # column kinds
_INT_DELTA = 1
_SCALED_DELTA = 2
_RAW = 3

_MAX_SCALE = 9
_ZSTD_LEVEL = 3
_POW10 = tuple(10**i for i in range(_MAX_SCALE + 1))
_INTS = frozenset((int,))


@dataclass(frozen=True, slots=True)
class Record:
    """One message as the edge accepted it; the hub adds tenant, device and offset."""

    seq: int
    ts: int  # device clock, microseconds since the epoch
    subject: str  # full subject: <tenant>.<device>.<suffix>
    attrs: dict[str, Scalar] = field(default_factory=dict)
    body: Body = None


def encode_batch(records: Sequence[Record], *, compress: bool = True) -> tuple[int, bytes]:
    """Encode records (strictly increasing seq) into (codec, payload)."""
    if not records or len(records) > MAX_BATCH_RECORDS:
        raise WireError(ErrorCode.LIMIT_EXCEEDED, f"batch of {len(records)} records")
    subjects: dict[str, int] = {}
    subject_idx = [subjects.setdefault(r.subject, len(subjects)) for r in records]
    seq_col = _deltas([r.seq for r in records])
    seq_col[0] = 0  # the first seq travels in the DATA header
    doc = [
        list(subjects),
        seq_col,
        _deltas([r.ts for r in records]),  # first element absolute
        subject_idx,
        [r.attrs or None for r in records],
        _encode_bodies([r.body for r in records]),
    ]
    raw = pack(doc)
    if len(raw) > MAX_BATCH_RAW_BYTES:
        raise WireError(ErrorCode.LIMIT_EXCEEDED, f"batch encodes to {len(raw)} bytes")
    if not compress:
        return CODEC_NONE, raw
    return CODEC_ZSTD, _compressor().compress(raw)


def decode_batch(codec: int, payload: bytes, first_seq: int, count: int) -> list[Record]:
    """Decode a batch payload; raises WireError on anything malformed or over a limit."""
    doc = _unpack_doc(codec, payload)
    subjects, seq_d, ts_d, subj_idx, attrs, bodies = doc
    _check_list(subjects, "subjects", max_len=count)
    for col, name in ((seq_d, "seq"), (ts_d, "ts"), (subj_idx, "subject index"), (attrs, "attrs")):
        _check_list(col, name, exact=count)
    for s in subjects:
        _check_subject(s)
    if not seq_d or seq_d[0] != 0:
        raise WireError(ErrorCode.BAD_SEQUENCE, "first seq delta must be 0")
    seqs = _undelta(seq_d, first_seq, "seq", u64=True)
    if any(b <= a for a, b in itertools.pairwise(seqs)):
        raise WireError(ErrorCode.BAD_SEQUENCE, "seq not strictly increasing in batch")
    ts = _undelta(ts_d, 0, "ts")
    body_values = _decode_bodies(bodies, count)
    out: list[Record] = []
    for i in range(count):
        j = subj_idx[i]
        if type(j) is not int or not 0 <= j < len(subjects):
            raise WireError(ErrorCode.BAD_FIELD, f"subject index {j!r} out of range")
        out.append(Record(seqs[i], ts[i], subjects[j], _check_attrs(attrs[i]), body_values[i]))
    return out


def validate_batch(
    codec: int, payload: bytes, first_seq: int, count: int, last_seq: int | None = None
) -> list[str]:
    """Check a batch as thoroughly as ``decode_batch`` without building records; returns
    its subject table.  The hub's hot path: it stores the payload as received."""
    doc = _unpack_doc(codec, payload)
    subjects, seq_d, ts_d, subj_idx, attrs, bodies = doc
    _check_list(subjects, "subjects", max_len=count)
    for col, name in ((seq_d, "seq"), (ts_d, "ts"), (subj_idx, "subject index"), (attrs, "attrs")):
        _check_list(col, name, exact=count)
    for s in subjects:
        _check_subject(s)
    if not _all_ints(seq_d) or not _all_ints(ts_d) or not _all_ints(subj_idx):
        raise WireError(ErrorCode.BAD_FIELD, "seq, ts and subject columns must be integers")
    if seq_d[0] != 0 or (count > 1 and min(seq_d[1:]) <= 0):
        raise WireError(ErrorCode.BAD_SEQUENCE, "seq not strictly increasing in batch")
    last = first_seq + sum(seq_d)
    if last >= 1 << 64:
        raise WireError(ErrorCode.BAD_FIELD, "seq out of range")
    if last_seq is not None and last != last_seq:
        raise WireError(ErrorCode.BAD_SEQUENCE, f"batch ends at seq {last}, header says {last_seq}")
    if min(subj_idx) < 0 or max(subj_idx) >= len(subjects):
        raise WireError(ErrorCode.BAD_FIELD, "subject index out of range")
    kinds = set(map(type, attrs))
    if not kinds <= {type(None), dict}:
        raise WireError(ErrorCode.BAD_FIELD, "attrs must be small maps")
    if dict in kinds:
        for a in attrs:
            if a is not None:
                _check_attrs(a)
    _validate_bodies(bodies, count)
    return list(subjects)


def _all_ints(col: list[Any]) -> bool:
    return set(map(type, col)) <= _INTS


def _validate_bodies(bodies: Any, count: int) -> None:
    if not isinstance(bodies, list) or len(bodies) != 2:
        raise WireError(ErrorCode.BAD_FIELD, "body section malformed")
    kind, data = bodies
    if kind == _RAW:
        _decode_bodies(bodies, count)
        return
    if kind != _INT_DELTA:
        raise WireError(ErrorCode.BAD_FIELD, f"unknown body encoding {kind!r}")
    _check_list(data, "body columns", max_len=MAX_BODY_KEYS)
    for column in data:
        if not isinstance(column, list) or len(column) != 5 or not isinstance(column[0], str):
            raise WireError(ErrorCode.BAD_FIELD, "body column malformed")
        key, present, ckind, scale, values = column
        rows = count
        if present is not None:
            _check_list(present, "presence", exact=count)
            rows = sum(1 for p in present if p)
        _check_list(values, "column", exact=rows, key=key)
        if ckind in (_INT_DELTA, _SCALED_DELTA):
            if not _all_ints(values):
                raise WireError(ErrorCode.BAD_FIELD, f"column {key!r} holds non-integers")
            if ckind == _SCALED_DELTA and (
                not isinstance(scale, int) or not 0 <= scale <= _MAX_SCALE
            ):
                raise WireError(ErrorCode.BAD_FIELD, f"bad scale {scale!r}")
        elif ckind != _RAW:
            raise WireError(ErrorCode.BAD_FIELD, f"unknown column kind {ckind!r}")


def batch_subjects(codec: int, payload: bytes) -> list[str]:
    """Only the subject table of a batch (for cheap prefix checks)."""
    doc = _unpack_doc(codec, payload)
    subjects = doc[0]
    _check_list(subjects, "subjects", max_len=MAX_BATCH_RECORDS)
    for s in subjects:
        _check_subject(s)
    return list(subjects)


# --- columns -----------------------------------------------------------------


def _deltas(values: list[int]) -> list[int]:
    return [values[0], *map(operator.sub, values[1:], values)]


def _undelta(col: list[Any], start: int, name: str, *, u64: bool = False) -> list[int]:
    if len(col) == 1 and type(col[0]) is int and not u64:  # a batch of one record
        return [start + col[0]]
    if not _all_ints(col):
        bad = next(d for d in col if type(d) is not int)
        raise WireError(ErrorCode.BAD_FIELD, f"{name} column holds {type(bad).__name__}")
    out = list(itertools.accumulate(col, initial=start))
    del out[0]
    if u64 and out and (min(out) < 0 or max(out) >= 1 << 64):
        raise WireError(ErrorCode.BAD_FIELD, f"{name} out of range")
    return out


def _encode_bodies(bodies: list[Body]) -> list[Any]:
    """Columnar form when every body is a dict with string keys, else the raw list."""
    dicts = [b for b in bodies if type(b) is dict]
    if len(dicts) != len(bodies):
        return [_RAW, bodies]
    keys: dict[str, None] = {}
    shapes: set[tuple[str, ...]] = set()
    for b in dicts:  # few distinct shapes in practice: one pass of tuple() per body
        shape = tuple(b)
        if shape not in shapes:
            shapes.add(shape)
            keys.update(dict.fromkeys(shape))
    if len(keys) > MAX_BODY_KEYS or not all(type(k) is str for k in keys):
        return [_RAW, bodies]
    columns: list[Any] = []
    if len(dicts) == 1:  # a batch of one record is common at low rates
        for k, v in dicts[0].items():
            columns.append([k, None, *_encode_single(v)])
        return [_INT_DELTA, columns]
    if len(shapes) == 1:  # every body has the same keys in the same order: transpose
        for k, col in zip(keys, zip(*[b.values() for b in dicts], strict=True), strict=True):
            columns.append([k, None, *_encode_column(list(col))])
        return [_INT_DELTA, columns]
    for k in keys:
        flags = [k in b for b in dicts]
        present = None if all(flags) else flags
        vals = [b[k] for b in dicts if k in b]
        columns.append([k, present, *_encode_column(vals)])
    return [_INT_DELTA, columns]


def _encode_column(vals: list[Any]) -> list[Any]:
    if len(vals) == 1:
        return _encode_single(vals[0])
    types = set(map(type, vals))
    if len(types) == 1:
        if int in types and min(vals) > -(1 << 62) and max(vals) < 1 << 62:
            return [_INT_DELTA, 0, _deltas(vals)]
        if float in types:
            scaled = _scaled_decimals(vals)
            if scaled is not None:
                return [_SCALED_DELTA, scaled[0], _deltas(scaled[1])]
    return [_RAW, 0, vals]


def _encode_single(v: Any) -> list[Any]:
    """``_encode_column([v])``, without the list work (a batch of one record is common)."""
    t = type(v)
    if t is int and -(1 << 62) < v < 1 << 62:
        return [_INT_DELTA, 0, [v]]
    if t is float:
        scaled = _scaled_decimal(v)
        if scaled is not None:
            return [_SCALED_DELTA, scaled[0], [scaled[1]]]
    return [_RAW, 0, [v]]


def _scaled_decimal(v: float) -> tuple[int, int] | None:
    """(scale, v times 10**scale) for the fewest decimals that represent ``v`` exactly, or
    None: the rule of ``_scaled_decimals`` for a column of one value."""
    r = repr(v)
    dot = r.find(".")
    if dot < 0 or "e" in r or r == "-0.0":
        return None
    scale = len(r) - dot - 1
    if scale > _MAX_SCALE:
        return None
    f = _POW10[scale]
    if not abs(v) < 1e15 / f:
        return None
    n = round(v * f)
    return (scale, n) if n / f == v else None


def _scaled_decimals(vals: list[float]) -> tuple[int, list[int]] | None:
    """(scale, values times 10**scale) for the fewest decimals that represent every value
    exactly; None when some value is no short decimal.

    The same rule as ``_scaled_decimal`` per value, in whole-column steps (this runs for
    every float column of every batch: a per-value function call was most of its cost).
    """
    reprs = list(map(repr, vals))
    text = "".join(reprs)
    # inf and nan have an "n", exponent forms an "e"; -0.0 would lose its sign
    if "e" in text or "n" in text or "-0.0" in reprs:
        return None
    scale = max([len(r) - r.find(".") for r in reprs]) - 1  # every other repr has a dot
    if scale > _MAX_SCALE:
        return None
    f = _POW10[scale]
    if not max(map(abs, vals)) < 1e15 / f:
        return None
    ints = [round(v * f) for v in vals]
    if [n / f for n in ints] != vals:
        return None
    return scale, ints


def _decode_bodies(bodies: Any, count: int) -> list[Body]:
    if not isinstance(bodies, list) or len(bodies) != 2:
        raise WireError(ErrorCode.BAD_FIELD, "body section malformed")
    kind, data = bodies
    if kind == _RAW:
        _check_list(data, "bodies", exact=count)
        for b in data:
            if isinstance(b, bytes | str) and len(b) > MAX_BODY_BYTES:
                raise WireError(ErrorCode.LIMIT_EXCEEDED, "body too large")
        return list(data)
    if kind != _INT_DELTA:
        raise WireError(ErrorCode.BAD_FIELD, f"unknown body encoding {kind!r}")
    _check_list(data, "body columns", max_len=MAX_BODY_KEYS)
    out: list[dict[str, Any]] = [{} for _ in range(count)]
    for column in data:
        _decode_column(column, out)
    return list(out)


def _decode_column(column: Any, out: list[dict[str, Any]]) -> None:
    if not isinstance(column, list) or len(column) != 5 or not isinstance(column[0], str):
        raise WireError(ErrorCode.BAD_FIELD, "body column malformed")
    key, present, kind, scale, data = column
    if present is None and len(out) == 1 and isinstance(data, list) and len(data) == 1:
        out[0][key] = _decode_single(key, kind, scale, data[0])
        return
    rows: list[int] | None = None  # None: every row has the key
    if present is not None:
        _check_list(present, "presence", exact=len(out))
        rows = [i for i, p in enumerate(present) if p]
    _check_list(data, "column", exact=len(out) if rows is None else len(rows), key=key)
    if kind == _RAW:
        vals = data
    elif kind == _INT_DELTA:
        vals = _undelta(data, 0, key)
    elif kind == _SCALED_DELTA:
        if not isinstance(scale, int) or not 0 <= scale <= _MAX_SCALE:
            raise WireError(ErrorCode.BAD_FIELD, f"bad scale {scale!r}")
        f = _POW10[scale]
        vals = [i / f for i in _undelta(data, 0, key)]
    else:
        raise WireError(ErrorCode.BAD_FIELD, f"unknown column kind {kind!r}")
    if rows is None:
        for body, v in zip(out, vals, strict=True):
            body[key] = v
    else:
        for i, v in zip(rows, vals, strict=True):
            out[i][key] = v


def _decode_single(key: str, kind: Any, scale: Any, value: Any) -> Any:
    """The one value of a one-row column (``_decode_column`` without the list work)."""
    if kind == _RAW:
        return value
    if kind != _INT_DELTA and kind != _SCALED_DELTA:
        raise WireError(ErrorCode.BAD_FIELD, f"unknown column kind {kind!r}")
    if type(value) is not int:
        raise WireError(ErrorCode.BAD_FIELD, f"{key} column holds {type(value).__name__}")
    if kind == _INT_DELTA:
        return value
    if not isinstance(scale, int) or not 0 <= scale <= _MAX_SCALE:
        raise WireError(ErrorCode.BAD_FIELD, f"bad scale {scale!r}")
    return value / _POW10[scale]


# --- checks ------------------------------------------------------------------


def _unpack_doc(codec: int, payload: bytes) -> list[Any]:
    if codec == CODEC_ZSTD:
        try:
            # A frame that states its size is decompressed into a buffer of that size
            # (max_output_size only bounds frames that do not): refuse a stated size over
            # the limit before anything is allocated -- a few forged header bytes could
            # otherwise ask for terabytes.
            stated = zstandard.frame_content_size(payload)
            if stated > MAX_BATCH_RAW_BYTES:
                raise WireError(
                    ErrorCode.LIMIT_EXCEEDED, f"batch states {stated} bytes once decompressed"
                )
            raw = _decompressor().decompress(payload, max_output_size=MAX_BATCH_RAW_BYTES)
        except zstandard.ZstdError as exc:
            raise WireError(ErrorCode.BAD_COMPRESSION, f"zstd: {exc}") from exc
        except MemoryError as exc:  # should zstd still fail to allocate: a typed error too
            raise WireError(ErrorCode.BAD_COMPRESSION, "zstd: frame too large") from exc
    elif codec == CODEC_NONE:
        raw = payload
    else:
        raise WireError(ErrorCode.BAD_FIELD, f"unknown codec {codec}")
    if len(raw) > MAX_BATCH_RAW_BYTES:
        raise WireError(ErrorCode.LIMIT_EXCEEDED, "batch too large once decompressed")
    doc = unpack_limited(raw)
    if not isinstance(doc, list) or len(doc) != 6:
        raise WireError(ErrorCode.BAD_FIELD, "batch document malformed")
    return doc


def pack(obj: Any) -> bytes:
    """msgpack-encode our own data; values msgpack cannot carry are a LocalProtocolError."""
    try:
        out: bytes = msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, TypeError, ValueError) as exc:
        raise LocalProtocolError(ErrorCode.BAD_FIELD, f"cannot encode: {exc}") from exc
    return out


def unpack_limited(raw: bytes, *, max_len: int = MAX_BATCH_RAW_BYTES) -> Any:
    """msgpack-decode with every container and string bounded; one error type."""
    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=max_len,
            max_bin_len=max_len,
            max_array_len=MAX_BATCH_RECORDS * 2,
            max_map_len=max(MAX_BODY_KEYS, MAX_ATTRS) * 4,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise WireError(ErrorCode.BAD_ENCODING, f"msgpack: {exc}"[:200]) from exc
    except (msgpack.StackError, RecursionError) as exc:
        raise WireError(ErrorCode.BAD_ENCODING, "msgpack nesting too deep") from exc


def _check_list(
    col: Any, name: str, *, exact: int | None = None, max_len: int = 0, key: str | None = None
) -> None:
    """``col`` is a list of ``exact`` entries (or at most ``max_len``); ``key`` qualifies
    ``name`` in the error (formatted only then: this runs per column of every batch)."""
    if isinstance(col, list) and (len(col) == exact if exact is not None else len(col) <= max_len):
        return
    what = name if key is None else f"{name} {key!r}"
    if not isinstance(col, list):
        raise WireError(ErrorCode.BAD_FIELD, f"{what} is not a list")
    if exact is not None:
        raise WireError(ErrorCode.BAD_FIELD, f"{what} has {len(col)} entries, expected {exact}")
    raise WireError(ErrorCode.LIMIT_EXCEEDED, f"{what} has {len(col)} entries")


def _check_subject(s: Any) -> None:
    if not isinstance(s, str) or not s or len(s.encode()) > MAX_SUBJECT_BYTES:
        raise WireError(ErrorCode.BAD_FIELD, f"bad subject {str(s)[:60]!r}")


def _check_attrs(a: Any) -> dict[str, Scalar]:
    if a is None:
        return {}
    if not isinstance(a, dict) or len(a) > MAX_ATTRS:
        raise WireError(ErrorCode.BAD_FIELD, "attrs must be a small map")
    for k, v in a.items():
        if len(k) > MAX_ATTR_KEY_BYTES:
            raise WireError(ErrorCode.LIMIT_EXCEEDED, f"attr key {k[:40]!r} too long")
        if isinstance(v, str) and len(v) > MAX_ATTR_VALUE_BYTES:
            raise WireError(ErrorCode.LIMIT_EXCEEDED, f"attr {k!r} value too long")
        if not isinstance(v, str | int | float | bool) and v is not None:
            raise WireError(ErrorCode.BAD_FIELD, f"attr {k!r} is not a scalar")
    return a


# One compression context per thread: a zstandard context is not safe to use from two
# threads at once (the hub validates batches in its event loop while its consumers decode
# the log in worker threads; sharing one context corrupted their output).
_CONTEXTS = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    cctx: zstandard.ZstdCompressor | None = getattr(_CONTEXTS, "cctx", None)
    if cctx is None:
        cctx = _CONTEXTS.cctx = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=False)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_CONTEXTS, "dctx", None)
    if dctx is None:
        dctx = _CONTEXTS.dctx = zstandard.ZstdDecompressor()
    return dctx

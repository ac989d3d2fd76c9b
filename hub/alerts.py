"""Alert rules (sans-I/O): per-device conditions from log entries, held ``for`` a while, fired once.

Rules come from a YAML file (config/alerts.yaml shows every key).  Each rule selects
log entries with a subject pattern and an optional filter (the hub.filters language)
and keeps one *track* per (tenant, device) whose condition holds:

- ``threshold``: the entry's numeric ``field`` compared with ``value`` (``op``).  The
  condition starts with the first entry that satisfies it and ends with the first
  entry of that device that does not; entries without a number there are ignored.
- ``rate``: more than ``more_than`` matching entries of one device within ``window``
  seconds, counted in ``buckets`` fixed buckets per device (bounded memory; the count
  is exact to one bucket width, ``window / buckets``).  It ends when the window slides
  past enough entries (seen at ``tick``).
- ``absence``: the device's presence (the hub's ``<tenant>.<device>.presence`` records,
  ``body.state``) is in ``states`` (default ``[offline]``).  It ends with a presence
  record in any other state.  ``for`` is the "offline for longer than" time.

Time.  An entry's time is the hub's *received* time, not the device clock: one clock
for every device and for ``tick(now)`` (the hub's wall clock), immune to device clock
skew, and a replay of the log after a restart sees the same times.  The price: a
backlog a device flushes after an outage counts as arriving when it arrived (a rate
rule may see it as a burst).  Time never goes back: ``feed`` first ticks the engine up
to the entry's time (every ``resolution_s``), so a replayed backlog is evaluated as it
was lived.

States (``AlertState``, table ``TRANSITIONS``): a track is INACTIVE, PENDING (condition
holds, not yet ``for``), FIRING (one alert sent), GROUPED (ripe, but reported through
its group alert) and RESOLVED (its alert ended; the track is dropped or starts over).
A FIRING track never fires again: the shell re-sends active alerts (``active()``) as
Alertmanager requires, with the same ``startsAt``.  ``startsAt`` is the moment the
condition had held ``for`` (``since + for``), not the tick that noticed it.

Grouping (``group_by: [tenant]``, ``group_min: N``, ``group_wait``).  A track is *ripe*
once its condition has held ``for``.  When N or more tracks of one tenant are ripe at a
tick, ONE group alert fires (labels alertname, tenant, ``scope: group`` and the rule's
labels; annotations ``device_count`` and ``devices``, the first ``group_show`` names in
the order they went bad) and every ripe track of that tenant becomes GROUPED; tracks
that were FIRING on their own are resolved (the group alert replaces them).  While the
group alert fires, every track of the tenant that ripens joins it instead of paging.
It resolves at the first tick at which none of its devices is in the condition any
more; after that the next device pages on its own again.  Without a group, a ripe
track fires on its own only after ``group_wait`` more seconds, which gives a fleet
going into a tunnel one device at a time the chance to form a group first.

Bounds: ``max_devices`` tracks per rule (new devices beyond it are not tracked,
counted in ``devices_dropped``) and ``max_active_alerts`` firing alerts over all rules
(a fire beyond it is held back and counted once per track in ``alerts_dropped``; it
fires when room frees up).  ``tick`` walks every track (O(tracks)).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import operator
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Final, Literal, Self

from hub.consumer import Selection, entry_message
from hub.filters import FIELDS, MAP_FIELDS, FilterError
from hub.log import LogEntry
from hub.subjects import SubjectError, SubjectTrie
from transport.configload import build, load_yaml
from transport.errors import ConfigError, SquallError

Kind = Literal["threshold", "rate", "absence"]
Op = Literal["<", "<=", ">", ">=", "==", "!="]

DEFAULT_MAX_ACTIVE_ALERTS: Final = 10_000
DEFAULT_MAX_DEVICES_PER_RULE: Final = 10_000
DEFAULT_RESOLUTION_S: Final = 1.0
PRESENCE_PATTERN: Final = "*.*.presence"
PRESENCE_STATES: Final = frozenset({"online", "stale", "offline"})
RESERVED_LABELS: Final = frozenset({"alertname", "tenant", "device", "scope"})
SNAPSHOT_VERSION: Final = 1
MAX_BUCKETS: Final = 600

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # Alertmanager's label name syntax
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_OPS: Final[dict[str, Callable[[float, float], bool]]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
_TEMPLATE_KEYS: Final = frozenset(
    {"tenant", "device", "rule", "value", "count", "devices", "threshold", "field", "op"}
    | {"more_than", "window", "for"}
)
_DEFAULT_SUMMARY: Final[dict[str, str]] = {
    "threshold": "{tenant}/{device}: {field} is {value} ({op} {threshold})",
    "rate": "{tenant}/{device}: {count} matching records in {window} s (more than {more_than})",
    "absence": "{tenant}/{device} has been offline for more than {for} s",
}
_DEFAULT_GROUP_SUMMARY: Final = "{count} devices of {tenant} tripped {rule}: {devices}"


class AlertError(SquallError):
    """The alert engine was misused or reached an impossible state (a bug, not bad input)."""


# --- configuration -------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class RuleConfig:
    """One rule as written in YAML (``for`` is read into ``for_``)."""

    name: str
    kind: Kind
    subject: str = ""  # default: ``*.*.presence`` for absence; required otherwise
    filter: str = ""
    field: str = ""  # threshold: dotted path such as body.battery_pct
    op: Op = "<"
    value: float = 0.0
    more_than: int = 0  # rate: fires above this many entries in the window
    window: float | str = 60.0  # rate: seconds, or "90s", "5m", "1h"
    buckets: int = 12  # rate: buckets per device and window
    states: list[str] = dataclasses.field(default_factory=lambda: ["offline"])  # absence
    for_: float | str = 0.0
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)
    group_by: list[str] = dataclasses.field(default_factory=list)
    group_min: int = 0  # 0: no grouping
    group_wait: float | str = 0.0
    group_show: int = 5
    group_annotations: dict[str, str] = dataclasses.field(default_factory=dict)
    max_devices: int = 0  # 0: the file's max_devices_per_rule


@dataclasses.dataclass(slots=True)
class RulesFile:
    """The whole rules file."""

    rules: list[RuleConfig] = dataclasses.field(default_factory=list)
    max_active_alerts: int = DEFAULT_MAX_ACTIVE_ALERTS
    max_devices_per_rule: int = DEFAULT_MAX_DEVICES_PER_RULE


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """A checked, compiled rule."""

    name: str
    kind: Kind
    selection: Selection
    for_s: float = 0.0
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    field_path: tuple[str, ...] = ()
    op: Op = "<"
    value: float = 0.0
    more_than: int = 0
    window_s: float = 60.0
    buckets: int = 12
    states: frozenset[str] = frozenset({"offline"})
    group_min: int = 0
    group_wait_s: float = 0.0
    group_show: int = 5
    group_annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    max_devices: int = DEFAULT_MAX_DEVICES_PER_RULE

    @property
    def grouped(self) -> bool:
        """True when many ripe devices of a tenant become one alert."""
        return self.group_min > 0

    @property
    def bucket_s(self) -> float:
        """Width of one rate bucket."""
        return self.window_s / self.buckets


@dataclasses.dataclass(frozen=True, slots=True)
class RuleSet:
    """Rules and the engine-wide bounds from one file."""

    rules: tuple[Rule, ...]
    max_active_alerts: int = DEFAULT_MAX_ACTIVE_ALERTS


def parse_duration(value: float | str) -> float:
    """Seconds from a number or a string such as ``"250ms"``, ``"90s"``, ``"5m"``, ``"1h"``."""
    if isinstance(value, str):
        m = _DURATION.fullmatch(value.strip())
        if m is None:
            raise ValueError(f"expected seconds or a duration like '90s', '5m', got {value!r}")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected a duration of 0 or more seconds, got {value!r}")
    return seconds


def load_rules(path: str | Path) -> RuleSet:
    """Read and check a rules file; ConfigError names the file, the key and what is wrong."""
    p = str(path)
    return parse_rules(load_yaml(path), path=p)


def parse_rules(data: Mapping[str, Any], *, path: str = "alerts.yaml") -> RuleSet:
    """Check and compile rules from a mapping shaped like the YAML file."""
    raw = dict(data)
    if isinstance(raw.get("rules"), list):
        raw["rules"] = [_rename_for(r, path, i) for i, r in enumerate(raw["rules"])]
    try:
        cfg = build(RulesFile, raw, path=path)
    except ConfigError as exc:
        key = re.sub(r"\.for_(?=$|\.|\[)", ".for", exc.key)
        raise ConfigError(path, key, exc.message.replace("for_", "for")) from exc
    if cfg.max_active_alerts < 1:
        raise ConfigError(path, "max_active_alerts", "must be at least 1")
    if cfg.max_devices_per_rule < 1:
        raise ConfigError(path, "max_devices_per_rule", "must be at least 1")
    names: set[str] = set()
    rules: list[Rule] = []
    for i, rc in enumerate(cfg.rules):
        key = f"rules[{i}]"
        if rc.name in names:
            raise ConfigError(path, f"{key}.name", f"rule {rc.name!r} is defined twice")
        names.add(rc.name)
        rules.append(compile_rule(rc, path=path, key=key, max_devices=cfg.max_devices_per_rule))
    return RuleSet(tuple(rules), cfg.max_active_alerts)


def _rename_for(item: Any, path: str, index: int) -> Any:
    """YAML ``for`` is a Python keyword: carry it as ``for_`` and refuse ``for_`` itself."""
    if not isinstance(item, dict):
        return item
    if "for_" in item:
        raise ConfigError(path, f"rules[{index}].for_", "unknown key (the key is 'for')")
    out = dict(item)
    if "for" in out:
        out["for_"] = out.pop("for")
    return out


def compile_rule(
    rc: RuleConfig, *, path: str, key: str, max_devices: int = DEFAULT_MAX_DEVICES_PER_RULE
) -> Rule:
    """Check one rule's values and compile its selection; ConfigError names the bad key."""

    def fail(sub: str, message: str) -> ConfigError:
        return ConfigError(path, f"{key}.{sub}", message)

    if not _NAME.fullmatch(rc.name):
        raise fail("name", "expected a letter then letters, digits, '_' or '-' (64 at most)")
    subject = rc.subject or (PRESENCE_PATTERN if rc.kind == "absence" else "")
    if not subject:
        raise fail("subject", f"a {rc.kind} rule needs a subject pattern")
    try:
        selection = Selection.parse(subject, rc.filter)
    except SubjectError as exc:
        raise fail("subject", str(exc)) from exc
    except FilterError as exc:
        raise fail("filter", str(exc)) from exc
    durations: dict[str, float] = {}
    for name, raw in (("for", rc.for_), ("window", rc.window), ("group_wait", rc.group_wait)):
        try:
            durations[name] = parse_duration(raw)
        except ValueError as exc:
            raise fail(name, str(exc)) from exc
    kind_fields = _check_kind(rc, durations["window"], fail)
    _check_labels(rc.labels, fail)
    annotations = {"summary": _DEFAULT_SUMMARY[rc.kind], **rc.annotations}
    group_annotations = {"summary": _DEFAULT_GROUP_SUMMARY, **rc.group_annotations}
    for sub, templates in (("annotations", annotations), ("group_annotations", group_annotations)):
        for name, template in templates.items():
            _check_template(template, f"{key}.{sub}.{name}", path)
    _check_grouping(rc, fail)
    if rc.max_devices < 0:
        raise fail("max_devices", "must be 0 (the file's default) or more")
    return Rule(
        name=rc.name,
        kind=rc.kind,
        selection=selection,
        for_s=durations["for"],
        labels=dict(rc.labels),
        annotations=annotations,
        op=rc.op,
        value=rc.value,
        more_than=rc.more_than,
        group_min=rc.group_min,
        group_wait_s=durations["group_wait"],
        group_show=rc.group_show,
        group_annotations=group_annotations,
        max_devices=rc.max_devices or max_devices,
        **kind_fields,
    )


def _check_kind(
    rc: RuleConfig, window_s: float, fail: Callable[[str, str], ConfigError]
) -> dict[str, Any]:
    """The kind-specific fields of a Rule, checked."""
    if rc.kind == "threshold":
        fpath = tuple(rc.field.split(".")) if rc.field else ()
        if not fpath or "" in fpath:
            raise fail("field", "a threshold rule needs a dotted field such as body.battery_pct")
        if fpath[0] not in FIELDS or (len(fpath) > 1 and fpath[0] not in MAP_FIELDS):
            raise fail("field", f"expected body.<key>, attrs.<key> or one of {sorted(FIELDS)}")
        return {"field_path": fpath}
    if rc.kind == "rate":
        if rc.more_than < 0:
            raise fail("more_than", "must be 0 or more")
        if window_s <= 0:
            raise fail("window", "must be more than 0 seconds")
        if not 1 <= rc.buckets <= MAX_BUCKETS:
            raise fail("buckets", f"must be within 1..{MAX_BUCKETS}")
        return {"window_s": window_s, "buckets": rc.buckets}
    states = frozenset(rc.states)
    if not states or not states <= PRESENCE_STATES:
        raise fail("states", f"expected a non-empty list from {sorted(PRESENCE_STATES)}")
    return {"states": states}


def _check_labels(labels: Mapping[str, str], fail: Callable[[str, str], ConfigError]) -> None:
    for name in labels:
        if not _LABEL.fullmatch(name):
            raise fail(f"labels.{name}", "a label name is letters, digits and '_'")
        if name in RESERVED_LABELS:
            raise fail(f"labels.{name}", f"reserved; the engine sets {sorted(RESERVED_LABELS)}")


def _check_grouping(rc: RuleConfig, fail: Callable[[str, str], ConfigError]) -> None:
    if rc.group_by and rc.group_by != ["tenant"]:
        raise fail("group_by", "only [tenant] is supported: an alert never mixes tenants")
    if rc.group_min and not rc.group_by:
        raise fail("group_by", "group_min needs group_by: [tenant]")
    if rc.group_by and rc.group_min < 2:
        raise fail("group_min", "must be at least 2 when group_by is set")
    if rc.group_show < 1:
        raise fail("group_show", "must be at least 1")


def _check_template(template: str, key: str, path: str) -> None:
    """Refuse placeholders the engine does not fill, and format specs that cannot apply."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        for name in names:
            if name not in _TEMPLATE_KEYS:
                raise ConfigError(
                    path, key, f"unknown placeholder {{{name}}} (known: {sorted(_TEMPLATE_KEYS)})"
                )
        template.format_map(_SAMPLE_VARS)
    except (ValueError, IndexError, KeyError) as exc:
        raise ConfigError(path, key, f"bad template: {exc}") from exc


_SAMPLE_VARS: Final[dict[str, object]] = {
    "tenant": "acme",
    "device": "truck-1",
    "rule": "rule",
    "value": 1.5,
    "count": 1,
    "devices": "truck-1",
    "threshold": 1.5,
    "field": "body.x",
    "op": "<",
    "more_than": 1,
    "window": 1.5,
    "for": 1.5,
}


# --- states and events -----------------------------------------------------------------


class AlertState(Enum):
    """Where one device's (or one group's) alert stands."""

    INACTIVE = "inactive"  # condition does not hold
    PENDING = "pending"  # holds, not yet for long enough
    FIRING = "firing"  # fired: one alert, re-sent until it resolves
    GROUPED = "grouped"  # ripe, reported through its tenant's group alert
    RESOLVED = "resolved"  # the alert ended; the track is dropped or starts over


_S = AlertState
TRANSITIONS: Final[Mapping[AlertState, frozenset[AlertState]]] = {
    _S.INACTIVE: frozenset({_S.PENDING}),
    # back to INACTIVE when the condition clears before ``for``
    _S.PENDING: frozenset({_S.INACTIVE, _S.FIRING, _S.GROUPED}),
    # GROUPED: replaced by a group alert (its own alert resolves)
    _S.FIRING: frozenset({_S.RESOLVED, _S.GROUPED}),
    # a group member that recovers: the group counts it out, nothing is sent for it
    _S.GROUPED: frozenset({_S.INACTIVE}),
    # a rate track keeps its buckets and starts over
    _S.RESOLVED: frozenset({_S.INACTIVE}),
}


class AlertStatus(Enum):
    """What a sink is told."""

    FIRING = "firing"
    RESOLVED = "resolved"


@dataclasses.dataclass(frozen=True, slots=True)
class Alert:
    """One alert as sinks see it: a fire or resolve event, or an entry of ``active()``."""

    status: AlertStatus
    rule: str
    tenant: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: float
    ends_at: float | None = None  # set when resolved

    @property
    def fingerprint(self) -> str:
        """Identity of the alert (its labels), as Alertmanager groups and deduplicates."""
        text = "\x00".join(f"{k}\x01{v}" for k, v in sorted(self.labels.items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def event_id(self) -> str:
        """Stable id of this fire or resolve (the same after a replay), for idempotent sinks."""
        return f"{self.fingerprint}-{round(self.starts_at * 1000)}-{self.status.value}"


@dataclasses.dataclass(slots=True)
class EngineStats:
    """What the engine did (plain counters; the shell exports them)."""

    records: int = 0  # entries fed
    matched: int = 0  # (entry, rule) pairs that matched
    ignored: int = 0  # matched, but without a number (threshold) or a state (absence)
    fired: int = 0
    resolved: int = 0
    devices_dropped: int = 0  # new devices not tracked: a rule was at max_devices
    alerts_dropped: int = 0  # fires held back at max_active_alerts (once per track)


@dataclasses.dataclass(slots=True)
class _Track:
    """One device's condition under one rule."""

    tenant: str
    device: str
    state: AlertState = AlertState.INACTIVE
    since: float = 0.0  # when the condition started (meaningful unless INACTIVE)
    starts_at: float = 0.0  # when it fired (FIRING)
    value: float = 0.0  # threshold: last value; rate: last count
    buckets: dict[int, int] = dataclasses.field(default_factory=dict)  # rate: index -> count
    oldest: int = 0  # rate: the smallest bucket index held (meaningless when empty)

    def move(self, new: AlertState) -> None:
        """Change state along the table; anything else is an engine bug."""
        if new not in TRANSITIONS[self.state]:
            raise AlertError(
                f"{self.tenant}/{self.device}: illegal {self.state.value} -> {new.value}"
            )
        self.state = new


@dataclasses.dataclass(slots=True)
class _Group:
    """One tenant's group alert under one rule."""

    tenant: str
    starts_at: float
    members: dict[str, float] = dataclasses.field(default_factory=dict)  # device -> since
    # every device that was a member (what the resolve notice names); bounded like members
    ever: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True)
class _RuleState:
    rule: Rule
    tracks: dict[tuple[str, str], _Track] = dataclasses.field(default_factory=dict)
    groups: dict[str, _Group] = dataclasses.field(default_factory=dict)
    held_back: set[tuple[str, str]] = dataclasses.field(default_factory=set)  # at max_active
    devices_dropped: int = 0


# --- the engine ----------------------------------------------------------------------


class AlertEngine:
    """Feeds log entries and clock ticks through the rules; collects fire/resolve events."""

    def __init__(
        self,
        rules: Sequence[Rule],
        *,
        max_active_alerts: int = DEFAULT_MAX_ACTIVE_ALERTS,
        resolution_s: float = DEFAULT_RESOLUTION_S,
    ) -> None:
        if max_active_alerts < 1 or resolution_s <= 0:
            raise AlertError("max_active_alerts must be >= 1 and resolution_s > 0")
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise AlertError(f"rule names must be unique: {names}")
        self.max_active_alerts = max_active_alerts
        self.resolution_s = resolution_s
        self.stats = EngineStats()
        self.now = -math.inf
        self._rules = [_RuleState(r) for r in rules]
        self._trie: SubjectTrie[int] = SubjectTrie()
        for i, r in enumerate(rules):
            self._trie.add(r.selection.pattern, i)
        self._active = 0
        self._events: list[Alert] = []

    @classmethod
    def from_ruleset(cls, ruleset: RuleSet, resolution_s: float = DEFAULT_RESOLUTION_S) -> Self:
        """An engine for a loaded rules file."""
        return cls(
            ruleset.rules, max_active_alerts=ruleset.max_active_alerts, resolution_s=resolution_s
        )

    @property
    def rules(self) -> list[Rule]:
        """The rules, in file order."""
        return [rs.rule for rs in self._rules]

    @property
    def active_count(self) -> int:
        """Firing alerts (per-device and group)."""
        return self._active

    # -- input --------------------------------------------------------------------------

    def feed(self, entry: LogEntry) -> None:
        """Apply one log entry to every rule it matches (time: the hub's received time)."""
        t = entry.received_us / 1e6
        if t >= self.now + self.resolution_s:
            self.tick(t)
        self.stats.records += 1
        hits = self._trie.match(entry.subject)
        if not hits:
            return
        message = entry_message(entry)
        for i in sorted(hits):
            rs = self._rules[i]
            flt = rs.rule.selection.filter
            if flt is not None and not flt.matches(message):
                continue
            self.stats.matched += 1
            if rs.rule.kind == "threshold":
                self._on_threshold(rs, entry, message, t)
            elif rs.rule.kind == "rate":
                self._on_rate(rs, entry, t)
            else:
                self._on_presence(rs, entry, message, t)

    def _on_threshold(
        self, rs: _RuleState, entry: LogEntry, message: Mapping[str, Any], t: float
    ) -> None:
        value = _lookup(message, rs.rule.field_path)
        if not _is_number(value):
            self.stats.ignored += 1
            return
        holds = _OPS[rs.rule.op](float(value), rs.rule.value)
        self._set_condition(rs, entry, holds, t, float(value))

    def _on_presence(
        self, rs: _RuleState, entry: LogEntry, message: Mapping[str, Any], t: float
    ) -> None:
        state = _lookup(message, ("body", "state"))
        if not isinstance(state, str):
            self.stats.ignored += 1
            return
        self._set_condition(rs, entry, state in rs.rule.states, t, 0.0)

    def _set_condition(
        self, rs: _RuleState, entry: LogEntry, holds: bool, t: float, value: float
    ) -> None:
        key = (entry.tenant, entry.device)
        track = rs.tracks.get(key)
        if not holds:
            if track is not None:
                self._clear(rs, track, t)
                del rs.tracks[key]
            return
        if track is None and (track := self._new_track(rs, key)) is None:
            return
        track.value = value
        self._start(rs, track, t)

    def _on_rate(self, rs: _RuleState, entry: LogEntry, t: float) -> None:
        key = (entry.tenant, entry.device)
        track = rs.tracks.get(key)
        if track is None and (track := self._new_track(rs, key)) is None:
            return
        rule = rs.rule
        index = math.floor(t / rule.bucket_s)
        _count_in(track, index)
        _slide(track, max(index, math.floor(self.now / rule.bucket_s)) - rule.buckets + 1)
        if track.value > rule.more_than:
            self._start(rs, track, t)

    def _new_track(self, rs: _RuleState, key: tuple[str, str]) -> _Track | None:
        if len(rs.tracks) >= rs.rule.max_devices:
            rs.devices_dropped += 1
            self.stats.devices_dropped += 1
            return None
        track = rs.tracks[key] = _Track(*key)
        return track

    def _start(self, rs: _RuleState, track: _Track, t: float) -> None:
        """The condition holds at ``t``: begin PENDING, and fire now if it is already due."""
        if track.state is AlertState.INACTIVE:
            track.move(AlertState.PENDING)
            track.since = t
        due = track.since + rs.rule.for_s
        if track.state is AlertState.PENDING and not rs.rule.grouped and t >= due:
            self._fire(rs, track, due)

    def _clear(self, rs: _RuleState, track: _Track, t: float) -> None:
        """The condition stopped holding at ``t``."""
        key = (track.tenant, track.device)
        rs.held_back.discard(key)
        if track.state is AlertState.FIRING:
            self._resolve(rs, track, t)
            track.move(AlertState.INACTIVE)
        elif track.state is AlertState.GROUPED:
            group = rs.groups.get(track.tenant)
            if group is not None:
                group.members.pop(track.device, None)
            track.move(AlertState.INACTIVE)
        elif track.state is AlertState.PENDING:
            track.move(AlertState.INACTIVE)

    # -- time ---------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Advance the clock: fire what held ``for``, expire rate windows, form/resolve groups."""
        if now <= self.now:
            return
        self.now = now
        for rs in self._rules:
            if rs.rule.kind == "rate":
                self._expire_rates(rs, now)
            if rs.rule.grouped:
                self._tick_grouped(rs, now)
            else:
                for track in list(rs.tracks.values()):
                    if track.state is AlertState.PENDING and now >= track.since + rs.rule.for_s:
                        self._fire(rs, track, track.since + rs.rule.for_s)

    def _expire_rates(self, rs: _RuleState, now: float) -> None:
        rule = rs.rule
        keep_from = math.floor(now / rule.bucket_s) - rule.buckets + 1
        for key, track in list(rs.tracks.items()):
            # the count only falls when a bucket leaves the window: O(1) for the others
            if track.oldest >= keep_from and track.buckets:
                continue
            _slide(track, keep_from)
            if track.value <= rule.more_than and track.state is not AlertState.INACTIVE:
                self._clear(rs, track, now)
            if not track.buckets and track.state is AlertState.INACTIVE:
                del rs.tracks[key]

    def _tick_grouped(self, rs: _RuleState, now: float) -> None:
        rule = rs.rule
        ripe: dict[str, list[_Track]] = {}
        for track in rs.tracks.values():
            if track.state is not AlertState.INACTIVE and now >= track.since + rule.for_s:
                ripe.setdefault(track.tenant, []).append(track)
        for tenant, tracks in ripe.items():
            group = rs.groups.get(tenant)
            if group is None and len(tracks) >= rule.group_min:
                group = self._fire_group(rs, tenant, tracks)
            if group is not None:
                for track in tracks:
                    self._join(rs, group, track, now)
                continue
            for track in tracks:
                due = track.since + rule.for_s + rule.group_wait_s
                if track.state is AlertState.PENDING and now >= due:
                    self._fire(rs, track, due)
        for tenant, group in list(rs.groups.items()):
            if not group.members:
                del rs.groups[tenant]
                self._active -= 1
                self._emit_group(rs, group, AlertStatus.RESOLVED, now)

    def _join(self, rs: _RuleState, group: _Group, track: _Track, now: float) -> None:
        if track.state is AlertState.FIRING:  # replaced by the group alert
            self._end(rs, track, now)
        if track.state in (AlertState.PENDING, AlertState.FIRING):
            rs.held_back.discard((track.tenant, track.device))
            track.move(AlertState.GROUPED)
            group.members[track.device] = track.since
            group.ever[track.device] = track.since

    # -- firing -------------------------------------------------------------------------

    def _room(self, rs: _RuleState, key: tuple[str, str]) -> bool:
        """True if another alert may fire; else count the hold-back once for ``key``."""
        if self._active < self.max_active_alerts:
            return True
        if key not in rs.held_back:
            rs.held_back.add(key)
            self.stats.alerts_dropped += 1
        return False

    def _fire(self, rs: _RuleState, track: _Track, at: float) -> None:
        key = (track.tenant, track.device)
        if not self._room(rs, key):
            return
        rs.held_back.discard(key)
        track.move(AlertState.FIRING)
        track.starts_at = at
        self._active += 1
        self.stats.fired += 1
        self._events.append(self._device_alert(rs.rule, track, AlertStatus.FIRING, None))

    def _resolve(self, rs: _RuleState, track: _Track, t: float) -> None:
        self._end(rs, track, t)
        track.move(AlertState.RESOLVED)

    def _end(self, rs: _RuleState, track: _Track, t: float) -> None:
        """Send the resolve of a FIRING track's alert (the caller moves the track on)."""
        self._active -= 1
        self.stats.resolved += 1
        ends = max(t, track.starts_at)
        self._events.append(self._device_alert(rs.rule, track, AlertStatus.RESOLVED, ends))

    def _fire_group(self, rs: _RuleState, tenant: str, ripe: list[_Track]) -> _Group | None:
        if not self._room(rs, (tenant, "")):
            return None
        rs.held_back.discard((tenant, ""))
        # the moment the group_min-th device had held ``for``: the same on a replay
        ripened = sorted(t.since for t in ripe)[rs.rule.group_min - 1] + rs.rule.for_s
        group = rs.groups[tenant] = _Group(tenant, ripened)
        group.members = {t.device: t.since for t in ripe}  # for the annotation; _join fills too
        group.ever.update(group.members)
        self._active += 1
        self._emit_group(rs, group, AlertStatus.FIRING, None)
        return group

    def _emit_group(
        self, rs: _RuleState, group: _Group, status: AlertStatus, ends: float | None
    ) -> None:
        if status is AlertStatus.FIRING:
            self.stats.fired += 1
        else:
            self.stats.resolved += 1
            ends = max(ends or group.starts_at, group.starts_at)
        self._events.append(self._group_alert(rs.rule, group, status, ends))

    # -- output -------------------------------------------------------------------------

    def take_events(self) -> list[Alert]:
        """Fire and resolve events since the last call, in order."""
        out, self._events = self._events, []
        return out

    def active(self) -> list[Alert]:
        """Every firing alert with its current annotations (what the shell re-sends)."""
        out: list[Alert] = []
        for rs in self._rules:
            for track in rs.tracks.values():
                if track.state is AlertState.FIRING:
                    out.append(self._device_alert(rs.rule, track, AlertStatus.FIRING, None))
            for group in rs.groups.values():
                out.append(self._group_alert(rs.rule, group, AlertStatus.FIRING, None))
        return out

    def devices_dropped(self) -> dict[str, int]:
        """Per rule: devices not tracked because the rule was at max_devices."""
        return {rs.rule.name: rs.devices_dropped for rs in self._rules}

    def tracked(self) -> dict[str, int]:
        """Per rule: devices tracked now."""
        return {rs.rule.name: len(rs.tracks) for rs in self._rules}

    def _device_alert(
        self, rule: Rule, track: _Track, status: AlertStatus, ends: float | None
    ) -> Alert:
        labels = {"alertname": rule.name, "tenant": track.tenant, "device": track.device}
        labels.update(rule.labels)
        count = int(track.value) if rule.kind == "rate" else 1
        value: float = track.value
        if rule.kind == "absence":
            value = round(max(0.0, (ends if ends is not None else self.now) - track.since), 1)
        variables = self._vars(rule, track.tenant, track.device, value, count, track.device)
        annotations = {k: t.format_map(variables) for k, t in rule.annotations.items()}
        return Alert(status, rule.name, track.tenant, labels, annotations, track.starts_at, ends)

    def _group_alert(
        self, rule: Rule, group: _Group, status: AlertStatus, ends: float | None
    ) -> Alert:
        labels = {"alertname": rule.name, "tenant": group.tenant, "scope": "group"}
        labels.update(rule.labels)
        # a resolve names the devices the incident took (none is left by then)
        who = group.members if status is AlertStatus.FIRING else group.ever
        names = [d for d, _ in sorted(who.items(), key=lambda kv: (kv[1], kv[0]))]
        shown = ", ".join(names[: rule.group_show])
        if len(names) > rule.group_show:
            shown += f" and {len(names) - rule.group_show} more"
        variables = self._vars(rule, group.tenant, "", len(names), len(names), shown)
        annotations = {k: t.format_map(variables) for k, t in rule.group_annotations.items()}
        annotations["device_count"] = str(len(names))
        annotations["devices"] = shown
        return Alert(status, rule.name, group.tenant, labels, annotations, group.starts_at, ends)

    @staticmethod
    def _vars(
        rule: Rule, tenant: str, device: str, value: float, count: int, devices: str
    ) -> dict[str, object]:
        return {
            "tenant": tenant,
            "device": device,
            "rule": rule.name,
            "value": _tidy(value),
            "count": count,
            "devices": devices,
            "threshold": _tidy(rule.value),
            "field": ".".join(rule.field_path),
            "op": rule.op,
            "more_than": rule.more_than,
            "window": _tidy(rule.window_s),
            "for": _tidy(rule.for_s),
        }

    # -- persistence --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The engine's state as JSON-able data (tracks, groups, clock), for ``restore``."""
        rules: dict[str, Any] = {}
        for rs in self._rules:
            rules[rs.rule.name] = {
                "kind": rs.rule.kind,
                "tracks": [_track_row(t) for t in rs.tracks.values()],
                "groups": [[g.tenant, g.starts_at, g.members, g.ever] for g in rs.groups.values()],
            }
        now = self.now if math.isfinite(self.now) else None
        return {"version": SNAPSHOT_VERSION, "now": now, "rules": rules}

    def restore(self, data: Mapping[str, Any]) -> None:
        """Take over a ``snapshot()``; rules that are gone or changed kind start empty.

        Raises AlertError when the data is not a snapshot of this version.
        """
        try:
            self._restore(data)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise AlertError(f"alert state snapshot is not usable: {exc!r}") from exc

    def _restore(self, data: Mapping[str, Any]) -> None:
        if data.get("version") != SNAPSHOT_VERSION:
            raise AlertError(f"alert state snapshot version {data.get('version')!r}")
        now = data.get("now")
        self.now = -math.inf if now is None else float(now)
        self._active = 0
        saved = data["rules"]
        for rs in self._rules:
            rs.tracks.clear()
            rs.groups.clear()
            entry = saved.get(rs.rule.name)
            if entry is None or entry["kind"] != rs.rule.kind:
                continue
            for tenant, device, state, since, starts_at, value, buckets in entry["tracks"]:
                if len(rs.tracks) >= rs.rule.max_devices:
                    break
                track = _Track(str(tenant), str(device), AlertState(state), since, starts_at)
                track.value = float(value)
                track.buckets = {int(k): int(n) for k, n in buckets}
                track.oldest = min(track.buckets, default=0)
                rs.tracks[(track.tenant, track.device)] = track
                self._active += track.state is AlertState.FIRING
            for tenant, starts_at, members, *ever in entry["groups"]:
                rs.groups[str(tenant)] = _Group(
                    str(tenant), float(starts_at), dict(members), dict(ever[0] if ever else members)
                )
                self._active += 1


def _track_row(t: _Track) -> list[Any]:
    """A track as one JSON array (the snapshot's row format)."""
    buckets = sorted(t.buckets.items())
    return [t.tenant, t.device, t.state.value, t.since, t.starts_at, t.value, buckets]


def _count_in(track: _Track, index: int) -> None:
    """One more entry in bucket ``index``; ``value`` is the window's running count."""
    if not track.buckets or index < track.oldest:
        track.oldest = index
    track.buckets[index] = track.buckets.get(index, 0) + 1
    track.value += 1


def _slide(track: _Track, keep_from: int) -> None:
    """Drop the buckets before index ``keep_from`` from the window and from its count."""
    if track.oldest >= keep_from:
        return
    for k in [k for k in track.buckets if k < keep_from]:
        track.value -= track.buckets.pop(k)
    track.oldest = min(track.buckets, default=keep_from)


def _lookup(message: Mapping[str, Any], path: Iterable[str]) -> Any:
    """The value at a dotted path of a filter message, or None."""
    current: Any = message
    for key in path:
        if not isinstance(current, Mapping):
            return None
        current = current.get(key)
    return current


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _tidy(value: float) -> float | int:
    """5.0 shows as 5 in annotations; other values as they are."""
    return int(value) if float(value).is_integer() else value


__all__ = [
    "TRANSITIONS",
    "Alert",
    "AlertEngine",
    "AlertError",
    "AlertState",
    "AlertStatus",
    "EngineStats",
    "Rule",
    "RuleConfig",
    "RuleSet",
    "RulesFile",
    "compile_rule",
    "load_rules",
    "parse_duration",
    "parse_rules",
]

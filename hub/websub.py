"""The kernel's asyncio shell and its HTTP face: /v1/subscribe (WebSocket) and /v1/subscriptions.

``SubscriptionService`` pumps the sans-I/O ``hub.kernel.Kernel``: after each commit it
reads the new entries back from the log once (only while some queue is live) and
routes them; a task serves catch-up reads (in a worker thread, so a queue reading old
log never stalls the loop), expires idle queues and persists durable offsets; each
subscriber's send task is woken when the kernel has something for it.

``GET /v1/subscribe`` query: ``subject`` (NATS pattern; a tenant token's must start
with its tenant, else 403), ``filter``, ``queue`` (join or make a named queue; none: a
private one), ``from`` (``now``, ``earliest`` or an offset; where a new queue starts,
a durable one only while it has no committed offset), ``policy`` (``block`` or
``drop-oldest``), ``durable``, ``max_pending``, ``credit`` (start in credit mode with
that much). Joining an existing queue may leave out subject (tenant tokens) and
filter; giving different ones is 409. Errors before the upgrade are plain HTTP:
400 malformed (a bad filter names the position), 401, 403, 404, 409, 429.

WebSocket protocol (JSON text frames):

- server -> client: ``{"type": "subscribed", ...}`` once, then ``{"type": "msg",
  "offset", "subject", "tenant", "device", "seq", "lane", "ts_us", "attrs", "body"}``
  (a bytes body is ``{"base64": ...}``), ``{"type": "dropped", "count", "total"}`` when
  the subscriber's drop-oldest queue dropped entries, ``{"type": "error", "code",
  "message"}`` for a bad client frame (the connection stays).
- client -> server: ``{"type": "ack", "offset": N}`` (or ``"offsets": [...]``) for each
  entry of a durable queue, ``{"type": "credit", "n": N}`` to pace delivery by credit.
- close codes: 1001 hub shutting down, 4410 queue deleted, 1008 too many bad frames.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from hub.config import KernelSettings, SubscriptionSettings
from hub.consumer import lane_name
from hub.filters import FilterError
from hub.kernel import (
    Attached,
    ConflictError,
    ForbiddenError,
    Kernel,
    LimitError,
    NotFoundError,
    Policy,
    QueueKey,
    QueueSpec,
    ReadRequest,
    RequestError,
    Start,
    durable_name,
    tenant_of,
)
from hub.log import Log, LogEntry
from hub.subjects import SubjectError
from transport.errors import ConfigError, SquallError

log = logging.getLogger("squall.hub.subscriptions")

HOUSEKEEPING_S = 0.25  # durable offsets persisted and idle queues expired this often
SEND_BATCH = 256  # entries a send task takes from the kernel at once
MAX_CLIENT_FRAME = 64 * 1024
MAX_NOTES = 64  # error frames queued for one client; beyond, it is closed (1008)
MAX_ACKS_PER_FRAME = 4_096  # fits in MAX_CLIENT_FRAME
HEARTBEAT_S = 30.0
CLOSE_GONE = 4410

_STATUS: dict[type[SquallError], int] = {
    RequestError: 400,
    SubjectError: 400,
    FilterError: 400,
    ForbiddenError: 403,
    NotFoundError: 404,
    ConflictError: 409,
    LimitError: 429,
}


class SubscriptionService:
    """The kernel, driven: routing, catch-up reads, expiry, durable offsets, wake-ups."""

    def __init__(
        self, log_: Log, settings: KernelSettings, configured: list[SubscriptionSettings]
    ) -> None:
        self.log = log_
        self.kernel = Kernel(settings, log_.next_offset)
        self.configured = configured
        self.errors: Counter[str] = Counter()
        self._wakeups: dict[int, asyncio.Event] = {}
        self._sockets: set[web.WebSocketResponse] = set()
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Create the configured queues, note stale durable offsets, start the pump."""
        offsets = self.log.consumer_offsets()
        for i, sub in enumerate(self.configured):
            spec = spec_from_settings(sub)
            key = (tenant_of(sub.subject), sub.queue)
            committed = offsets.get(durable_name(key)) if sub.durable else None
            try:
                self.kernel.create(spec, now, committed=committed)
            except SquallError as exc:
                raise ConfigError("hub.yaml", f"subscriptions[{i}]", str(exc)) from exc
        self.kernel.note_orphans(offsets, now)
        self._persist_commits()
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def stop(self) -> None:
        """Close every subscriber (1001), stop the pump, persist durable offsets."""

        async def close(ws: web.WebSocketResponse) -> None:
            with contextlib.suppress(Exception):  # a peer that went away is closed anyway
                await asyncio.wait_for(ws.close(code=1001, message=b"hub shutting down"), 2.0)

        await asyncio.gather(*(close(ws) for ws in list(self._sockets)))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.on_log_advanced()
        self._persist_commits()

    # -- the data path ----------------------------------------------------------------

    def on_log_advanced(self) -> None:
        """Route what the log committed since last time (read back only if a queue is live)."""
        kernel = self.kernel
        end = self.log.next_offset
        if end <= kernel.head:
            return
        if not kernel.has_live():
            kernel.advance(end)
            return
        start = kernel.head
        try:
            entries = self.log.read(start, end - start)
        except SquallError as exc:
            log.error("cannot read committed entries %d..%d back: %s", start, end - 1, exc)
            self.errors["route_read"] += 1
            kernel.route_failed(end)
        else:
            kernel.route(entries)
            kernel.advance(end)
        self._wake()

    async def _pump(self) -> None:
        """Catch-up reads as queues ask for them; housekeeping every HOUSEKEEPING_S."""
        loop = asyncio.get_running_loop()
        next_housekeeping = loop.time()
        while True:
            requests = self.kernel.wants_reads()
            for request in requests:
                end = self.log.next_offset
                try:
                    first, entries = await asyncio.to_thread(self._catchup_read, request)
                except SquallError as exc:
                    log.error("catch-up read for %s failed: %s", request.key, exc)
                    self.errors["catchup_read"] += 1
                    self.kernel.read_failed(request)
                    await asyncio.sleep(HOUSEKEEPING_S)
                    continue
                self.kernel.feed_catchup(request, entries, end, first)
                self._wake()
            now = loop.time()
            if now >= next_housekeeping:
                self._housekeeping(now)
                next_housekeeping = now + HOUSEKEEPING_S
            if not requests:
                self._work.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), max(0.0, next_housekeeping - now))

    def _catchup_read(self, request: ReadRequest) -> tuple[int | None, list[LogEntry]]:
        """(the log's first offset, the entries asked for), off the event loop, as of one
        moment (``Log.read_with_first``).  A JetStream view's offsets skip, so its gaps are
        neither retention nor damage: no first offset."""
        if not getattr(self.log, "contiguous", True):
            return None, self.log.read(request.start, request.count)
        return self.log.read_with_first(request.start, request.count)

    def _housekeeping(self, now: float) -> None:
        for name in self.kernel.expire(now):
            try:
                self.log.remove_consumer(name)
            except SquallError as exc:
                log.error("cannot forget durable offset %s: %s", name, exc)
                self.errors["offset_remove"] += 1
        self._persist_commits()

    def _persist_commits(self) -> None:
        for commit in self.kernel.commits_due():
            try:
                self.log.commit_consumer_offset(commit.name, commit.offset)
            except SquallError as exc:
                log.error("cannot persist offset of %s: %s", commit.name, exc)
                self.errors["offset_commit"] += 1
                continue
            self.kernel.committed(commit)

    def _wake(self) -> None:
        for sid in self.kernel.take_ready():
            event = self._wakeups.get(sid)
            if event is not None:
                event.set()
        if self.kernel.has_behind():
            self._work.set()

    # -- operations the HTTP handlers call ------------------------------------------------

    def track(self, ws: web.WebSocketResponse) -> None:
        """Remember an open subscriber socket (closed with 1001 at stop)."""
        self._sockets.add(ws)

    def untrack(self, ws: web.WebSocketResponse) -> None:
        """Forget a closed subscriber socket."""
        self._sockets.discard(ws)

    def now(self) -> float:
        """The kernel's clock: the event loop's."""
        return asyncio.get_running_loop().time()

    def _stored_offset(self, spec: QueueSpec) -> int | None:
        if not spec.durable:
            return None
        tenant = spec.tenant if spec.tenant is not None else tenant_of(spec.subject)
        return self.log.consumer_offsets().get(durable_name((tenant, spec.queue)))

    def create(self, spec: QueueSpec) -> QueueKey:
        """A named queue with no subscriber yet (POST /v1/subscriptions)."""
        key = self.kernel.create(spec, self.now(), committed=self._stored_offset(spec))
        self._persist_commits()
        self._wake()
        return key

    def subscribe(self, spec: QueueSpec, credit: int | None) -> tuple[Attached, asyncio.Event]:
        """Attach a subscriber; returns it and the event set when it has something to take."""
        attached = self.kernel.subscribe(
            spec, self.now(), committed=self._stored_offset(spec), credit=credit
        )
        event = self._wakeups[attached.subscriber] = asyncio.Event()
        event.set()  # the first take reports what is already there
        self._persist_commits()
        self._wake()
        return attached, event

    def unsubscribe(self, subscriber: int) -> None:
        """Detach a subscriber (its socket closed)."""
        self._wakeups.pop(subscriber, None)
        self.kernel.unsubscribe(subscriber, self.now())
        self._wake()

    def take(self, subscriber: int) -> Any:
        """The next delivery for a subscriber."""
        delivery = self.kernel.take(subscriber, SEND_BATCH)
        self._wake()
        return delivery

    def ack(self, subscriber: int, offsets: list[int]) -> None:
        """Acknowledge durable entries; RequestError names the first offset not owed."""
        try:
            for offset in offsets:
                self.kernel.ack(subscriber, offset)
        finally:
            self._wake()

    def grant(self, subscriber: int, credit: int) -> None:
        """More credit for a subscriber."""
        self.kernel.grant(subscriber, credit)
        self._wake()

    def change(
        self, key: QueueKey, subject: str | None, filter_text: str | None, tenant: str | None
    ) -> int:
        """PATCH: new pattern and/or filter; returns the offset it applies from."""
        applies_from = self.kernel.change(key, subject, filter_text, tenant)
        self._wake()
        return applies_from

    def delete(self, key: QueueKey, tenant: str | None) -> None:
        """DELETE: remove the queue, close its subscribers, forget its durable offset."""
        name = self.kernel.delete(key, tenant)
        self._wake()
        if name is not None:
            self.log.remove_consumer(name)


def spec_from_settings(sub: SubscriptionSettings) -> QueueSpec:
    """The kernel request for a queue configured in hub.yaml (made by the admin)."""
    return QueueSpec(
        subject=sub.subject,
        filter=sub.filter,
        queue=sub.queue,
        tenant=None,
        policy=Policy(sub.policy) if sub.policy else None,
        durable=sub.durable,
        max_pending=sub.max_pending or None,
        start=sub.start,
    )


# --- callers ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tokens:
    """The bearer tokens this hub accepts: the admin's and one per tenant."""

    admin: str
    tenants: Mapping[str, str]

    def caller(self, header: str) -> tuple[bool, str | None]:
        """(known, tenant) for an Authorization header; tenant None is the admin.

        Every configured token is compared, in constant time, whichever matches.
        """
        given = header.encode()
        found: tuple[bool, str | None] = (False, None)
        if self.admin and hmac.compare_digest(given, f"Bearer {self.admin}".encode()):
            found = (True, None)
        for tenant, token in self.tenants.items():
            if hmac.compare_digest(given, f"Bearer {token}".encode()):
                found = (True, tenant)
        return found


def caller_tenant(request: web.Request) -> str | None:
    """The tenant of the request's token (None: the admin); the auth middleware let it in."""
    known, tenant = request.app[TOKENS_KEY].caller(request.headers.get("Authorization", ""))
    if not known:  # the middleware refuses these first; never serve one as the admin
        raise web.HTTPUnauthorized(text="missing or wrong bearer token")
    return tenant


# --- request parsing -------------------------------------------------------------------


def parse_start(text: str) -> Start:
    """``now``, ``earliest`` or a log offset (>= 1); RequestError otherwise."""
    if text in ("now", "earliest"):
        return text  # type: ignore[return-value]
    if _is_number(text) and int(text) >= 1:
        return int(text)
    raise RequestError(f"from must be now, earliest or an offset >= 1, not {text[:40]!r}")


def _is_number(text: str) -> bool:
    """Plain ASCII digits, at most 18 of them (so int() neither fails nor grows large)."""
    return 0 < len(text) <= 18 and text.isascii() and text.isdigit()


def _parse_bool(name: str, text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise RequestError(f"{name} must be true or false, not {text[:40]!r}")


def _parse_int(name: str, text: str, low: int) -> int:
    if not _is_number(text) or int(text) < low:
        raise RequestError(f"{name} must be an integer >= {low}, not {text[:40]!r}")
    return int(text)


def _parse_policy(text: str) -> Policy:
    try:
        return Policy(text)
    except ValueError:
        raise RequestError(f"policy must be block or drop-oldest, not {text[:40]!r}") from None


_SUBSCRIBE_PARAMS = frozenset(
    {"subject", "filter", "queue", "from", "policy", "durable", "max_pending", "credit"}
)


def parse_subscribe(query: Mapping[str, str], tenant: str | None) -> tuple[QueueSpec, int | None]:
    """The kernel request and initial credit of a ``GET /v1/subscribe`` query."""
    unknown = sorted(set(query) - _SUBSCRIBE_PARAMS)
    if unknown:
        raise RequestError(
            f"unknown parameter {unknown[0]!r} (known: {', '.join(sorted(_SUBSCRIBE_PARAMS))})"
        )
    spec = QueueSpec(
        subject=query.get("subject", ""),
        filter=query.get("filter"),
        queue=query.get("queue", ""),
        tenant=tenant,
        policy=_parse_policy(query["policy"]) if "policy" in query else None,
        durable=_parse_bool("durable", query["durable"]) if "durable" in query else None,
        max_pending=_parse_int("max_pending", query["max_pending"], 1)
        if "max_pending" in query
        else None,
        start=parse_start(query["from"]) if "from" in query else None,
    )
    credit = _parse_int("credit", query["credit"], 0) if "credit" in query else None
    return spec, credit


_CREATE_KEYS = frozenset({"queue", "subject", "filter", "durable", "policy", "max_pending", "from"})


def parse_create(body: Any, tenant: str | None) -> QueueSpec:
    """The kernel request of a ``POST /v1/subscriptions`` JSON body (durable unless told)."""
    data = _json_object(body, _CREATE_KEYS)
    queue, subject = data.get("queue"), data.get("subject")
    if not isinstance(queue, str) or not queue:
        raise RequestError("queue (a name) is required")
    if not isinstance(subject, str) or not subject:
        raise RequestError("subject is required, e.g. acme.*.alarm.>")
    flt = _typed(data, "filter", str, "")
    durable = _typed(data, "durable", bool, True)
    policy = data.get("policy")
    if policy is not None and not isinstance(policy, str):
        raise RequestError("policy must be block or drop-oldest")
    max_pending = data.get("max_pending")
    if max_pending is not None and (type(max_pending) is not int or max_pending < 1):
        raise RequestError("max_pending must be an integer >= 1")
    start = data.get("from")
    return QueueSpec(
        subject=subject,
        filter=flt,
        queue=queue,
        tenant=tenant,
        policy=None if policy is None else _parse_policy(policy),
        durable=durable,
        max_pending=max_pending,
        start=None if start is None else parse_start(str(start)),
    )


def parse_change(body: Any) -> tuple[str | None, str | None]:
    """The new subject and/or filter of a ``PATCH`` JSON body."""
    data = _json_object(body, frozenset({"subject", "filter"}))
    if not data:
        raise RequestError("give subject and/or filter to change")
    subject = data.get("subject")
    flt = data.get("filter")
    if subject is not None and (not isinstance(subject, str) or not subject):
        raise RequestError("subject must be a non-empty string")
    if flt is not None and not isinstance(flt, str):
        raise RequestError("filter must be a string ('' removes it)")
    return subject, flt


def _json_object(body: Any, known: frozenset[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return body


def _typed(data: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = data.get(key, default)
    if type(value) is not kind:
        raise RequestError(f"{key} must be a {kind.__name__}")
    return value


# --- responses and frames --------------------------------------------------------------


def error_response(exc: SquallError) -> web.Response:
    """The HTTP error for a refused request: 4xx with ``{"error": message}``."""
    status = next((s for t, s in _STATUS.items() if isinstance(exc, t)), 500)
    return web.json_response({"error": str(exc)}, status=status)


def message_frame(e: LogEntry) -> str:
    """The ``msg`` frame of one entry."""
    body: Any = e.body
    if isinstance(body, bytes):
        body = {"base64": base64.b64encode(body).decode()}
    return json.dumps(
        {
            "type": "msg",
            "offset": e.offset,
            "subject": e.subject,
            "tenant": e.tenant,
            "device": e.device,
            "seq": e.seq,
            "lane": lane_name(e.lane),
            "ts_us": e.ts,
            "attrs": e.attrs,
            "body": body,
        },
        separators=(",", ":"),
        default=_json_default,
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    raise TypeError(f"{type(value).__name__} is not JSON")


# --- handlers --------------------------------------------------------------------------


class _Session:
    """One WebSocket subscriber: a send task fed by the kernel, a receive loop for acks."""

    def __init__(
        self,
        service: SubscriptionService,
        ws: web.WebSocketResponse,
        attached: Attached,
        wake: asyncio.Event,
    ) -> None:
        self.service = service
        self.ws = ws
        self.sid = attached.subscriber
        self.wake = wake
        self.notes: deque[dict[str, Any]] = deque()

    async def send_loop(self) -> None:
        ws = self.ws
        while not ws.closed:
            await self.wake.wait()
            self.wake.clear()
            while self.notes:
                await ws.send_str(json.dumps(self.notes.popleft()))
            delivery = self.service.take(self.sid)
            if delivery.closed is not None:
                await ws.close(code=CLOSE_GONE, message=delivery.closed.encode())
                return
            if delivery.dropped:
                note = {
                    "type": "dropped",
                    "count": delivery.dropped,
                    "total": delivery.dropped_total,
                }
                await ws.send_str(json.dumps(note))
            for entry in delivery.entries:
                await ws.send_str(message_frame(entry))

    async def receive_loop(self) -> None:
        async for msg in self.ws:
            if msg.type == WSMsgType.TEXT:
                self.on_frame(msg.data)
            elif msg.type == WSMsgType.BINARY:
                self.note("bad_frame", "frames are JSON text")
            if len(self.notes) > MAX_NOTES:
                await self.ws.close(code=1008, message=b"too many bad frames")
                return

    def on_frame(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            self.note("bad_frame", "not JSON")
            return
        kind = frame.get("type") if isinstance(frame, dict) else None
        try:
            if kind == "ack":
                self.service.ack(self.sid, _ack_offsets(frame))
            elif kind == "credit":
                n = frame.get("n")
                if type(n) is not int:
                    raise RequestError("credit needs an integer n")
                self.service.grant(self.sid, n)
            else:
                raise RequestError(f"unknown frame type {str(kind)[:40]!r} (ack, credit)")
        except RequestError as exc:
            self.note("bad_" + (kind if kind in ("ack", "credit") else "frame"), str(exc))

    def note(self, code: str, message: str) -> None:
        self.notes.append({"type": "error", "code": code, "message": message})
        self.wake.set()


def _ack_offsets(frame: dict[str, Any]) -> list[int]:
    if "offsets" in frame:
        offsets = frame["offsets"]
        if not isinstance(offsets, list) or len(offsets) > MAX_ACKS_PER_FRAME:
            raise RequestError(f"offsets must be a list of at most {MAX_ACKS_PER_FRAME}")
    else:
        offsets = [frame.get("offset")]
    if not all(type(o) is int for o in offsets):
        raise RequestError("ack needs integer offsets")
    return offsets


async def subscribe_ws(request: web.Request) -> web.StreamResponse:
    """GET /v1/subscribe: checks the request, attaches a subscriber, then speaks WebSocket."""
    service: SubscriptionService = request.app[SERVICE_KEY]
    tenant: str | None = caller_tenant(request)
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=MAX_CLIENT_FRAME)
    if not ws.can_prepare(request).ok:
        return web.json_response({"error": "this endpoint speaks WebSocket only"}, status=400)
    try:
        spec, credit = parse_subscribe(request.query, tenant)
        attached, wake = service.subscribe(spec, credit)
    except SquallError as exc:
        return error_response(exc)
    session = _Session(service, ws, attached, wake)
    sender: asyncio.Task[None] | None = None
    try:
        await ws.prepare(request)
        service.track(ws)
        hello = {"type": "subscribed", **service.kernel.describe(attached.key)}
        await ws.send_str(json.dumps(hello))
        sender = asyncio.create_task(session.send_loop())
        await session.receive_loop()
    finally:
        service.untrack(ws)
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)  # a closed peer: nothing to do
        service.unsubscribe(attached.subscriber)
    return ws


async def list_subscriptions(request: web.Request) -> web.Response:
    """GET /v1/subscriptions: the caller's tenant's queues (the admin: all)."""
    service: SubscriptionService = request.app[SERVICE_KEY]
    kernel = service.kernel
    keys = kernel.queue_keys(caller_tenant(request))
    return web.json_response({"subscriptions": [kernel.describe(k) for k in keys]})


async def create_subscription(request: web.Request) -> web.Response:
    """POST /v1/subscriptions: a named (durable unless told) queue made now."""
    service: SubscriptionService = request.app[SERVICE_KEY]
    try:
        spec = parse_create(await _json_body(request), caller_tenant(request))
        key = service.create(spec)
    except SquallError as exc:
        return error_response(exc)
    return web.json_response(service.kernel.describe(key), status=201)


async def get_subscription(request: web.Request) -> web.Response:
    """GET /v1/subscriptions/{tenant}/{queue}."""
    service: SubscriptionService = request.app[SERVICE_KEY]
    try:
        key = _path_key(request)
        return web.json_response(service.kernel.describe(key))
    except SquallError as exc:
        return error_response(exc)


async def change_subscription(request: web.Request) -> web.Response:
    """PATCH /v1/subscriptions/{tenant}/{queue}: new subject and/or filter."""
    service: SubscriptionService = request.app[SERVICE_KEY]
    try:
        key = _path_key(request)
        subject, flt = parse_change(await _json_body(request))
        applies_from = service.change(key, subject, flt, caller_tenant(request))
    except SquallError as exc:
        return error_response(exc)
    return web.json_response({"applies_from": applies_from, **service.kernel.describe(key)})


async def delete_subscription(request: web.Request) -> web.Response:
    """DELETE /v1/subscriptions/{tenant}/{queue}."""
    service: SubscriptionService = request.app[SERVICE_KEY]
    try:
        key = _path_key(request)
        service.delete(key, caller_tenant(request))
    except SquallError as exc:
        return error_response(exc)
    return web.json_response({"deleted": {"tenant": key[0], "queue": key[1]}})


def _path_key(request: web.Request) -> QueueKey:
    key = (request.match_info["tenant"], request.match_info["queue"])
    tenant = caller_tenant(request)
    if tenant is not None and key[0] != tenant:
        raise ForbiddenError(f"this token sees only tenant {tenant!r}")
    return key


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise RequestError("the body is not JSON") from None


SERVICE_KEY = web.AppKey("subscriptions", SubscriptionService)
TOKENS_KEY = web.AppKey("tokens", Tokens)


def add_routes(app: web.Application, service: SubscriptionService) -> None:
    """Mount /v1/subscribe and /v1/subscriptions on ``app``."""
    app[SERVICE_KEY] = service
    app.router.add_get("/v1/subscribe", subscribe_ws)
    app.router.add_get("/v1/subscriptions", list_subscriptions)
    app.router.add_post("/v1/subscriptions", create_subscription)
    app.router.add_get("/v1/subscriptions/{tenant}/{queue}", get_subscription)
    app.router.add_patch("/v1/subscriptions/{tenant}/{queue}", change_subscription)
    app.router.add_delete("/v1/subscriptions/{tenant}/{queue}", delete_subscription)

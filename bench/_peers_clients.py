"""The client side of bench/peers.py: one simulated device and one subscriber per system.

Every device publishes the same GPS fixes (``simulator.telemetry.Drive``, ~190 bytes as
JSON) with at-least-once delivery and at most ``window`` records published but not yet
acknowledged by the server (HTTPS: one request at a time per connection).

- Squall: an edge agent (``edge.agent.Agent``, on-disk spool, ``durability: batch``,
  shipped sender defaults); the fix is the record body, seq and time travel in the
  record header, the device in the certificate.  Acknowledged = the hub committed it.
- MQTT: paho-mqtt, QoS 1, one client per device; the payload is the fix as JSON with
  ``seq`` and ``ts`` added, on topic ``bench/<device>/gps``.  Acknowledged = PUBACK.
- JetStream: nats-py, ``publish_async`` on ``bench.<device>``, same payload.
  Acknowledged = the stream's PubAck.
- HTTPS: aiohttp, ``POST /v1/publish/<device>`` on a keep-alive connection, same
  payload.  Acknowledged = the 204.

All connect with TLS and a device client certificate (the servers require one).
The subscribers receive everything and count it in a ``SeqTracker``; with ``slow``
set they sleep 1 ms per message (blocking, like a sink that takes 1 ms) until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _peers_results import SeqTracker

from simulator.telemetry import Drive

SUBSCRIBER = "bench-sub"
STREAM = "BENCH"
TENANT = "acme"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how clients reach one system."""

    system: str
    port: int  # devices: the relay's port; subscribers: the server's own port
    pki: str  # directory with ca.pem and devices/<tenant>/<device>.pem/.key
    window: int
    extra: dict[str, Any] = field(default_factory=dict)  # squall: {"log": path}; workdir
    host: str = "127.0.0.1"

    def cert(self, name: str) -> tuple[str, str]:
        """(certificate, key) paths of device ``name``."""
        base = Path(self.pki) / "devices" / TENANT
        return str(base / f"{name}.pem"), str(base / f"{name}.key")

    def client_tls(self, name: str) -> ssl.SSLContext:
        """A TLS client context: verify the server against the CA, present ``name``'s cert."""
        ctx = ssl.create_default_context(cafile=str(Path(self.pki) / "ca.pem"))
        ctx.load_cert_chain(*self.cert(name))
        return ctx


def fixes(seed: int, n: int = 1000) -> list[dict[str, Any]]:
    """``n`` consecutive GPS fixes of one drive."""
    drive = Drive(random.Random(seed))
    return [drive.step() for _ in range(n)]


def peer_payload(seq: int, ts_us: int, fix: dict[str, Any]) -> bytes:
    """What MQTT, JetStream and HTTPS carry: the fix as compact JSON with seq and ts."""
    return json.dumps({"seq": seq, "ts": ts_us, **fix}, separators=(",", ":")).encode()


def parse_payload(data: bytes) -> tuple[int, int]:
    """(seq, ts_us) of a peer payload."""
    doc = json.loads(data)
    return int(doc["seq"]), int(doc["ts"])


def now_us() -> int:
    """Wall clock in microseconds (publishers and subscribers share the machine's clock)."""
    return int(time.time() * 1_000_000)


# --- devices ---------------------------------------------------------------------------


class Device:
    """One simulated device: publish with a bounded window, count acknowledgements."""

    def __init__(self, name: str, ep: Endpoint) -> None:
        self.name = name
        self.ep = ep
        self.window = ep.window
        self.published = 0
        self.acked = 0
        self.errors = 0
        self.first_seq = 1
        self.pending: dict[int, int] = {}  # client handle (mid, seq) -> seq, unacknowledged
        self._room = asyncio.Event()

    async def connect(self) -> None:
        """Connect (TLS handshake included) and be ready to publish."""
        raise NotImplementedError

    async def publish(self, fix: dict[str, Any]) -> None:
        """Hand one record to the client, waiting for window room first."""
        raise NotImplementedError

    async def close(self) -> None:
        """Disconnect."""

    def unacked_seqs(self) -> list[int]:
        """Seqs handed to the client that the server never acknowledged."""
        return sorted(self.pending.values())

    async def wait_room(self) -> None:
        """Until fewer than ``window`` records await their acknowledgement."""
        while self.published - self.acked - self.errors >= self.window:
            self._room.clear()
            await self._room.wait()

    def on_ack(self, handle: int) -> None:
        """The server acknowledged the record sent with ``handle``."""
        if self.pending.pop(handle, None) is not None:
            self.acked += 1
            self._room.set()

    def on_error(self, handle: int) -> None:
        """The record sent with ``handle`` failed (it stays unacknowledged)."""
        self.errors += 1
        self._room.set()

    async def drain(self, timeout: float) -> None:
        """Until every published record is acknowledged or failed, or ``timeout`` s passed."""
        deadline = time.monotonic() + timeout
        while self.published - self.acked - self.errors > 0 and time.monotonic() < deadline:
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), 0.05)
            self.poll_acks()

    def poll_acks(self) -> None:
        """Refresh ``acked`` from a client that has no acknowledgement callback."""


class SquallDevice(Device):
    """An edge agent with its on-disk spool, talking QUIC to the hub through the relay."""

    def __init__(self, name: str, ep: Endpoint) -> None:
        super().__init__(name, ep)
        self.agent: Any = None

    async def connect(self) -> None:
        from edge.agent import Agent
        from edge.config import DeviceFiles, EdgeConfig, SpoolConfig

        cert, key = self.ep.cert(self.name)
        workdir = Path(self.ep.extra["workdir"])
        cfg = EdgeConfig(
            device=DeviceFiles(cert, key, str(Path(self.ep.pki) / "ca.pem")),
            hubs=[f"{self.ep.host}:{self.ep.port}"],
            spool=SpoolConfig(path=str(workdir / f"{self.name}.spool.db"), durability="batch"),
        )
        self.agent = Agent(cfg, seed=zlib.crc32(self.name.encode()))
        self.agent.start()
        await asyncio.wait_for(self.agent.connected.wait(), 60)

    async def publish(self, fix: dict[str, Any]) -> None:
        while self.published - self.agent.stats.acked >= self.window:
            await asyncio.sleep(0.002)  # the agent has no acknowledgement callback: poll
        seq = self.agent.publish_nowait("telemetry.gps", fix)
        if self.published == 0:
            self.first_seq = seq
        self.published += 1
        self.acked = self.agent.stats.acked

    def poll_acks(self) -> None:
        self.acked = min(self.published, self.agent.stats.acked)

    def unacked_seqs(self) -> list[int]:
        # hub acknowledgements are cumulative: what is missing is the tail
        first = self.first_seq + self.acked
        return list(range(first, self.first_seq + self.published))

    async def close(self) -> None:
        if self.agent is not None:
            await self.agent.stop()
            # Agent.stop's last group commit re-arms the commit timer, which then fires on
            # the closed spool (NotReadyError in the loop); cancel it until edge/agent.py does.
            handle = getattr(self.agent, "_commit_handle", None)
            if handle is not None:
                handle.cancel()


class PahoLoop:
    """Drive a paho-mqtt client from the asyncio loop (its socket callbacks, no thread)."""

    def __init__(self, client: Any) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.misc: asyncio.Task[None] | None = None
        client.on_socket_open = self._open
        client.on_socket_close = self._close
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._no_write

    def _open(self, client: Any, userdata: Any, sock: Any) -> None:
        self.loop.add_reader(sock, self._read)
        self.misc = self.loop.create_task(self._misc())

    def _read(self) -> None:
        self.client.loop_read()
        # TLS may hold whole MQTT packets already read off the socket: select won't say so
        sock = self.client.socket()
        while sock is not None and isinstance(sock, ssl.SSLSocket) and sock.pending():
            if self.client.loop_read() != 0:
                break
            sock = self.client.socket()

    def _close(self, client: Any, userdata: Any, sock: Any) -> None:
        self.loop.remove_reader(sock)
        self.loop.remove_writer(sock)
        if self.misc is not None:
            self.misc.cancel()

    def _want_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self.loop.add_writer(sock, client.loop_write)

    def _no_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self.loop.remove_writer(sock)

    async def _misc(self) -> None:
        while self.client.loop_misc() == 0:
            await asyncio.sleep(1.0)


async def mqtt_connect(
    client_id: str, ep: Endpoint, port: int, tls_name: str, *, clean: bool, inflight: int = 20
) -> tuple[Any, PahoLoop]:
    """A paho client connected over TLS with ``tls_name``'s certificate (CONNACK received)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
    client.tls_set_context(ep.client_tls(tls_name))
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(inflight)
    connected: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not connected.done():
            connected.set_result(int(reason.value) if hasattr(reason, "value") else int(reason))

    client.on_connect = on_connect
    helper = PahoLoop(client)
    client.connect(ep.host, port, keepalive=60)
    code = await asyncio.wait_for(connected, 30)
    if code != 0:
        raise ConnectionError(f"MQTT CONNACK {code} for {client_id}")
    return client, helper


class MqttDevice(Device):
    """A paho-mqtt client publishing QoS 1 (PUBACK = acknowledged)."""

    async def connect(self) -> None:
        self.topic = f"bench/{self.name}/gps"
        self.client, self.helper = await mqtt_connect(
            self.name, self.ep, self.ep.port, self.name, clean=True, inflight=self.window
        )
        self.client.on_publish = lambda c, u, mid, rc, props: self.on_ack(mid)

    async def publish(self, fix: dict[str, Any]) -> None:
        await self.wait_room()
        seq = self.published + 1
        info = self.client.publish(self.topic, peer_payload(seq, now_us(), fix), qos=1)
        if info.rc != 0:
            self.errors += 1
        self.pending[info.mid] = seq
        self.published = seq

    async def close(self) -> None:
        self.client.disconnect()


class JetStreamDevice(Device):
    """A nats-py client publishing to the stream with ``publish_async`` (PubAck = acknowledged)."""

    async def connect(self) -> None:
        import nats

        self.subject = f"bench.{self.name}"
        self.nc = await nats.connect(
            f"tls://{self.ep.host}:{self.ep.port}",
            tls=self.ep.client_tls(self.name),
            name=self.name,
            allow_reconnect=False,
            connect_timeout=30,
        )
        self.js = self.nc.jetstream(publish_async_max_pending=self.window + 16, timeout=30)

    async def publish(self, fix: dict[str, Any]) -> None:
        await self.wait_room()
        seq = self.published + 1
        self.pending[seq] = seq
        self.published = seq
        try:
            fut = await self.js.publish_async(self.subject, peer_payload(seq, now_us(), fix))
        except Exception:  # e.g. the connection closed: the record stays unacknowledged
            self.on_error(seq)
            return
        fut.add_done_callback(lambda f: self._done(f, seq))

    def _done(self, fut: asyncio.Future[Any], seq: int) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.on_error(seq)
        else:
            self.on_ack(seq)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.close(), 10)


class HttpsDevice(Device):
    """An aiohttp client POSTing each record on one keep-alive connection (204 = acknowledged)."""

    async def connect(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=1, ssl=self.ep.client_tls(self.name))
        self.session = aiohttp.ClientSession(connector=connector)
        base = f"https://{self.ep.host}:{self.ep.port}"
        self.url = f"{base}/v1/publish/{self.name}"
        async with self.session.get(f"{base}/healthz") as r:
            await r.read()  # the TLS handshake, before the measured window

    async def publish(self, fix: dict[str, Any]) -> None:
        seq = self.published + 1
        self.pending[seq] = seq
        self.published = seq
        try:
            async with self.session.post(self.url, data=peer_payload(seq, now_us(), fix)) as r:
                await r.read()
                ok = r.status == 204
        except Exception:  # any failure leaves the record unacknowledged, counted
            ok = False
        if ok:
            self.on_ack(seq)
        else:
            self.on_error(seq)

    async def close(self) -> None:
        await self.session.close()


DEVICES: dict[str, type[Device]] = {
    "squall": SquallDevice,
    "mqtt": MqttDevice,
    "mqtt_stock": MqttDevice,
    "jetstream": JetStreamDevice,
    "https": HttpsDevice,
}


# --- subscribers -----------------------------------------------------------------------


class Subscriber:
    """Receives everything one system delivers into a SeqTracker."""

    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep
        self.tracker = SeqTracker()
        self.slow_until = 0.0  # wall time: sleep 1 ms per message until then

    async def start(self) -> None:
        """Connect and subscribe durably (before any device publishes)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Disconnect."""

    def take(self, device: str, seq: int, ts_us: int) -> None:
        """Count one message (after the slow sink's 1 ms when slow)."""
        if self.slow_until:
            if time.time() < self.slow_until:
                time.sleep(0.001)
            else:
                self.slow_until = 0.0
        self.tracker.add(device, seq, ts_us, time.time())


class SquallSubscriber(Subscriber):
    """A durable consumer reading the hub's log (hub.consumer.LogCursor) from another process.

    It polls every 5 ms when the log has nothing new and commits its offset every second
    (a write transaction on the hub's log file, which the hub then waits for).
    """

    async def start(self) -> None:
        from hub.consumer import LogCursor, Selection
        from hub.log import Log

        self.path = str(self.ep.extra["log"])
        self.log = Log(self.path)
        self.cursor = LogCursor(self.log, SUBSCRIBER, Selection.parse("*.*.telemetry.gps"))
        self.after = self.cursor.committed
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        last_commit = time.monotonic()
        while True:
            entries, last = self.cursor.read(self.after, 5000)
            for e in entries:
                self.take(e.device, e.seq, e.ts)
            moved = last != self.after
            self.after = last
            if moved and time.monotonic() - last_commit >= 1.0:
                self._commit()
                last_commit = time.monotonic()
            await asyncio.sleep(0 if moved else 0.005)

    def _commit(self) -> None:
        from hub.log import Log, LogError

        try:
            self.cursor.commit(self.after)
        except LogError:
            # Log checks the offset against the next_offset it saw at open, which another
            # process (the hub) moved on since; reopen to see it, then commit.
            self.log.close()
            self.log = Log(self.path)
            self.cursor.log = self.log
            self.cursor.commit(self.after)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self._commit()
        self.log.close()


class MqttSubscriber(Subscriber):
    """QoS 1 subscription ``bench/+/gps`` in a persistent session (clean_session false)."""

    async def start(self) -> None:
        self.client, self.helper = await mqtt_connect(
            SUBSCRIBER, self.ep, self.ep.port, SUBSCRIBER, clean=False
        )
        subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.client.on_message = self._on_message

        def on_subscribe(*args: Any) -> None:
            if not subscribed.done():
                subscribed.set_result(None)

        self.client.on_subscribe = on_subscribe
        self.client.subscribe("bench/+/gps", qos=1)
        await asyncio.wait_for(subscribed, 30)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        seq, ts = parse_payload(msg.payload)
        self.take(msg.topic.split("/")[1], seq, ts)

    async def close(self) -> None:
        self.client.disconnect()


class JetStreamSubscriber(Subscriber):
    """A durable pull consumer on the stream, explicit ack of every message."""

    async def start(self) -> None:
        import nats
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType

        self.nc = await nats.connect(
            f"tls://{self.ep.host}:{self.ep.port}",
            tls=self.ep.client_tls(SUBSCRIBER),
            name=SUBSCRIBER,
            connect_timeout=30,
        )
        js = self.nc.jetstream(timeout=30)
        await js.add_stream(name=STREAM, subjects=["bench.>"], storage=StorageType.FILE)
        config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=20_000,
        )
        self.psub = await js.pull_subscribe("bench.>", durable=SUBSCRIBER, config=config)
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        import nats.errors

        while True:
            try:
                msgs = await self.psub.fetch(batch=1000, timeout=0.5)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            for m in msgs:
                seq, ts = parse_payload(m.data)
                self.take(m.subject.split(".", 1)[1], seq, ts)
                await m.ack()

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.close(), 10)


class HttpsSubscriber(Subscriber):
    """Long-polls ``GET /v1/consume?after=N``; asking for what follows N acknowledges N."""

    async def start(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=1, ssl=self.ep.client_tls(SUBSCRIBER))
        self.session = aiohttp.ClientSession(connector=connector)
        self.after = 0
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        base = f"https://{self.ep.host}:{self.ep.port}/v1/consume"
        while True:
            async with self.session.get(base, params={"after": self.after, "max": 2000}) as r:
                text = await r.text()
            for line in text.splitlines():
                offset, device, payload = line.split("\t", 2)
                seq, ts = parse_payload(payload.encode())
                self.take(device, seq, ts)
                self.after = int(offset)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        await self.session.close()


SUBSCRIBERS: dict[str, type[Subscriber]] = {
    "squall": SquallSubscriber,
    "mqtt": MqttSubscriber,
    "mqtt_stock": MqttSubscriber,
    "jetstream": JetStreamSubscriber,
    "https": HttpsSubscriber,
}

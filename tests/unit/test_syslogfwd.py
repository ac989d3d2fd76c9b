"""Syslog forwarder: RFC 5424 formatting, octet counting, chunking, the delivery window,
and the asyncio shell against an in-process TCP server that drops the connection."""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.syslog import SyslogFramer, parse_syslog, to_record_fields
from hub.log import Log, LogEntry, PendingBatch
from hub.syslogfwd import (
    SD_ID,
    DeliveryWindow,
    FormatOptions,
    SyslogForwarder,
    SyslogForwardSettings,
    build_chunk,
    format_entry,
    frame_octet_counted,
    parse_facility,
    parse_severity,
    rfc3339_utc,
    sd_escape,
)
from transport.batchcodec import Body, Record, Scalar, encode_batch
from transport.configload import build
from transport.errors import ConfigError
from transport.wire import Lane

OPTS = FormatOptions(facility=16, severity=6, max_message_bytes=2048)
TS = 1_714_564_800_123_456  # 2024-05-01T12:00:00.123456Z


def entry(
    offset: int = 7,
    *,
    device: str = "truck-1",
    subject: str = "",
    attrs: dict[str, Scalar] | None = None,
    body: Body = "hello",
    lane: int = int(Lane.BULK),
    ts: int = TS,
    seq: int = 42,
) -> LogEntry:
    return LogEntry(
        offset,
        "acme",
        device,
        3,
        lane,
        seq,
        ts,
        subject or f"acme.{device}.log.auth",
        attrs or {},
        body,
        ts + 5,
    )


def fmt(e: LogEntry, opts: FormatOptions = OPTS) -> bytes:
    return format_entry(e, opts).message


# --- PRI -------------------------------------------------------------------------------


def test_pri_from_numeric_and_named_attrs() -> None:
    assert fmt(entry(attrs={"facility": 4, "severity": 3})).startswith(b"<35>1 ")
    assert fmt(entry(attrs={"facility": "authpriv", "severity": "warning"})).startswith(b"<84>1 ")
    assert fmt(entry(attrs={"severity": "ERROR"})).startswith(b"<131>1 ")  # local0.err
    assert fmt(entry(attrs={"severity_name": "debug"})).startswith(b"<135>1 ")


def test_pri_defaults_and_bad_values() -> None:
    assert fmt(entry()).startswith(b"<134>1 ")  # local0.info
    assert fmt(entry(lane=int(Lane.CRITICAL))).startswith(b"<130>1 ")  # no severity: crit
    for sev, fac in ((8, 24), (-1, -1), ("bogus", "local8"), (True, True), (2.5, 1.0)):
        assert fmt(entry(attrs={"severity": sev, "facility": fac})).startswith(b"<134>1 ")
    user_notice = FormatOptions(facility=parse_facility("user"), severity=parse_severity(5))
    assert fmt(entry(), user_notice).startswith(b"<13>1 ")


def test_facility_and_severity_names() -> None:
    assert parse_facility("local7") == 23 and parse_facility("0") == 0
    assert parse_severity("emerg") == 0 and parse_severity("warn") == 4
    with pytest.raises(ValueError, match="facility"):
        parse_facility("local8")
    with pytest.raises(ValueError, match="severity"):
        parse_severity(8)


# --- TIMESTAMP ---------------------------------------------------------------------------


def test_timestamp_is_rfc3339_utc_with_microseconds() -> None:
    assert rfc3339_utc(TS) == "2024-05-01T12:00:00.123456Z"
    assert rfc3339_utc(0) == "1970-01-01T00:00:00.000000Z"
    assert rfc3339_utc(1) == "1970-01-01T00:00:00.000001Z"
    assert rfc3339_utc(-5) == "-"
    assert rfc3339_utc(1 << 62) == "-"  # past year 9999
    assert fmt(entry()).split(b" ")[1] == b"2024-05-01T12:00:00.123456Z"


# --- header fields -------------------------------------------------------------------------


def test_header_fields_hostname_app_procid_msgid() -> None:
    e = entry(attrs={"app": "sshd", "procid": 4072, "msgid": "ID47"})
    msg = parse_syslog(fmt(e))
    assert (msg.hostname, msg.app, msg.procid, msg.msgid) == ("truck-1", "sshd", "4072", "ID47")
    # without an app attr the subject's kind names the app
    tele = parse_syslog(fmt(entry(subject="acme.truck-1.telemetry.gps", body={"kmh": 3})))
    assert tele.app == "telemetry.gps" and tele.procid is None and tele.msgid is None


def test_header_fields_are_printable_ascii_and_cut_to_rfc_limits() -> None:
    e = entry(
        device="träck 1",
        subject="acme.x.log",
        attrs={"app": "a" * 60, "procid": "p" * 200, "msgid": "m" * 40 + " x"},
    )
    raw = fmt(e)
    head = raw.split(b" [", 1)[0].split(b" ")
    assert head[2] == b"tr_ck_1"
    assert head[3] == b"a" * 48 and head[4] == b"p" * 128 and head[5] == b"m" * 32
    msg = parse_syslog(raw)  # the edge's strict parser accepts it
    assert msg.hostname == "tr_ck_1"
    long_host = parse_syslog(fmt(entry(device="d" * 300, subject="acme.d.x")))
    assert long_host.hostname == "d" * 255


# --- STRUCTURED-DATA ---------------------------------------------------------------------


def test_structured_data_carries_origin_and_offset() -> None:
    msg = parse_syslog(fmt(entry(offset=1234)))
    assert msg.structured_data == (
        f'[{SD_ID} tenant="acme" device="truck-1" incarnation="3" seq="42" offset="1234" '
        'subject="acme.truck-1.log.auth"]'
    )


def test_sd_escaping_of_quote_backslash_and_bracket() -> None:
    assert sd_escape('a"b\\c]d') == 'a\\"b\\\\c\\]d'
    assert sd_escape("plain é") == "plain é"
    e = entry(device='t"r\\u]k', subject='acme.t"r\\u]k.log')
    msg = parse_syslog(fmt(e))
    assert msg.structured_data is not None
    assert 'device="t\\"r\\\\u\\]k"' in msg.structured_data
    assert msg.message == "hello"  # the escaped ']' did not end the element early


def test_device_sd_is_kept_and_a_forged_squall_sd_dropped() -> None:
    sd = '[timeQuality tzKnown="1"][exampleSDID@32473 iut="3" eventSource="App\\]lication"]'
    msg = parse_syslog(fmt(entry(attrs={"structured_data": sd})))
    assert msg.structured_data is not None and msg.structured_data.endswith(sd)
    forged = f'[{SD_ID} offset="1"][x@1 a="b"]'
    msg = parse_syslog(fmt(entry(offset=9, attrs={"structured_data": forged})))
    assert msg.structured_data is not None
    assert msg.structured_data.count(SD_ID) == 1 and 'offset="9"' in msg.structured_data
    assert msg.structured_data.endswith('[x@1 a="b"]')
    for bad in ('[x a="b"', "junk", '[x a="b"]junk'):
        msg = parse_syslog(fmt(entry(attrs={"structured_data": bad})))
        assert msg.structured_data is not None and msg.structured_data.count("[") == 1
    cut: dict[str, Scalar] = {"structured_data": '[x a="b"]', "structured_data_truncated": True}
    assert b"[x a=" not in fmt(entry(attrs=cut))


# --- MSG ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ("plain text", "plain text"),
        ({"msg": "from body.msg", "n": 1}, "from body.msg"),
        ({"speed_kmh": 91.5, "ok": True}, '{"speed_kmh":91.5,"ok":true}'),
        ([1, "é"], '[1,"é"]'),
        (b"utf8 bytes \xc3\xa9", "utf8 bytes é"),
        (b"\xff\xfe", "base64://4="),
        ({"raw": b"\x00"}, '{"raw":"base64:AA=="}'),
        (17, "17"),
    ],
)
def test_message_text_from_the_body(body: Body, text: str) -> None:
    assert parse_syslog(fmt(entry(body=body))).message == text


def test_no_body_means_no_msg() -> None:
    raw = fmt(entry(body=None))
    assert raw.endswith(b'"]') and parse_syslog(raw).message == ""


# --- size limit and truncation -------------------------------------------------------------


def test_long_message_is_cut_to_the_limit_on_a_character_boundary() -> None:
    opts = replace(OPTS, max_message_bytes=2048)
    short = format_entry(entry(body="x" * 100), opts)
    assert not short.truncated
    f = format_entry(entry(body="é" * 3000), opts)  # 2 bytes a character
    assert f.truncated and len(f.message) in (2047, 2048)
    text = parse_syslog(f.message).message
    assert set(text) == {"é"} and len(text) > 500
    exact = format_entry(entry(body=""), opts).message
    room = 2048 - len(exact) - 1
    fits = format_entry(entry(body="y" * room), opts)
    assert not fits.truncated and len(fits.message) == 2048
    over = format_entry(entry(body="y" * (room + 1)), opts)
    assert over.truncated and len(over.message) == 2048


def test_device_sd_goes_before_the_message_is_cut() -> None:
    sd = '[big@1 v="' + "v" * 900 + '"]'
    f = format_entry(entry(attrs={"structured_data": sd}, body="m" * 1500), OPTS)
    assert f.truncated and b"big@1" not in f.message
    assert parse_syslog(f.message).message == "m" * 1500


# --- octet counting -------------------------------------------------------------------------


def test_octet_counting_frames_decode_back() -> None:
    msgs = [fmt(entry(i, body=f"line {i}\nwith newline")) for i in range(1, 4)]
    framed = b"".join(frame_octet_counted(m) for m in msgs)
    assert framed.startswith(str(len(msgs[0])).encode() + b" <134>1 ")
    framer = SyslogFramer(4096)
    out = [m for i in range(0, len(framed), 7) for m in framer.feed(framed[i : i + 7])]
    assert out == msgs and framer.malformed == 0
    assert frame_octet_counted(b"abc") == b"3 abc"


@settings(max_examples=200, deadline=None)
@given(
    device=st.text(min_size=1, max_size=40),
    body=st.text(
        st.characters(exclude_categories=("Cs",), exclude_characters="\ufeff"), max_size=3000
    ),
    app=st.text(max_size=60),
)
def test_any_entry_formats_to_a_valid_bounded_message(device: str, body: str, app: str) -> None:
    f = format_entry(entry(device=device, subject="acme.x.y", body=body, attrs={"app": app}), OPTS)
    assert len(f.message) <= OPTS.max_message_bytes
    msg = parse_syslog(f.message)  # the edge's strict RFC 5424 parser accepts every one
    assert msg.structured_data is not None and 'offset="7"' in msg.structured_data
    assert body.startswith(msg.message)  # the text, or a cut of it (trailing CR/LF/NUL aside)
    assert f.truncated == (len(body.encode()) > len(msg.message.encode()) + 3)


# --- what came in at the edge goes out the same -------------------------------------------------


def test_edge_syslog_record_goes_out_with_its_original_fields() -> None:
    line = (
        b'<36>1 2026-11-27T18:47:20.468038+00:00 vm sshd 4072 ID47 [timeQuality tzKnown="1"]'
        b" Failed password for root"
    )
    original = parse_syslog(line)
    suffix, attrs, body = to_record_fields(original, default_host="truck-1")
    e = entry(subject=f"acme.truck-1.{suffix}", attrs=attrs, body=body)
    out = parse_syslog(fmt(e))
    assert (out.facility, out.severity) == (original.facility, original.severity)
    assert (out.app, out.procid, out.msgid) == ("sshd", "4072", "ID47")
    assert out.message == "Failed password for root"
    assert out.hostname == "truck-1"
    assert out.structured_data is not None
    assert out.structured_data.endswith('[timeQuality tzKnown="1"]')


# --- chunking -------------------------------------------------------------------------------


def test_chunk_ends_at_last_read_when_everything_fits() -> None:
    es = [entry(o) for o in (3, 5, 8)]
    c = build_chunk(es, 10, 2, 1 << 16, OPTS, high_water=0)
    assert c.messages == 3 and c.end_offset == 10 and c.resent == 0
    framer = SyslogFramer(4096)
    assert [parse_syslog(m).structured_data for m in framer.feed(c.data)] == [
        parse_syslog(fmt(x)).structured_data for x in es
    ]


def test_chunk_stops_at_the_room_and_resumes_after_the_last_message() -> None:
    es = [entry(o) for o in (3, 5, 8)]
    one = len(frame_octet_counted(fmt(es[0])))
    c = build_chunk(es, 10, 2, 2 * one + 5, OPTS, high_water=0)
    assert c.messages == 2 and c.end_offset == 5 and len(c.data) <= 2 * one + 5
    blocked = build_chunk(es, 10, 2, one - 1, OPTS, high_water=0)
    assert blocked.messages == 0 and blocked.end_offset == 2 and blocked.data == b""
    skipped_only = build_chunk([], 10, 2, 100, OPTS, high_water=0)
    assert skipped_only.messages == 0 and skipped_only.end_offset == 10


def test_resends_are_counted_and_truncation_only_on_first_send() -> None:
    es = [entry(o, body="z" * 5000) for o in (3, 5, 8)]
    c = build_chunk(es, 8, 2, 1 << 20, OPTS, high_water=5)
    assert c.resent == 2 and c.truncated == 1


# --- delivery window -------------------------------------------------------------------------


def test_window_confirms_after_ack_plus_confirm_delay_in_order() -> None:
    w = DeliveryWindow(max_inflight_bytes=1000, confirm_s=1.0, ack_timeout_s=30.0)
    w.on_sent(300, end_offset=10, messages=3, now=0.0)
    w.on_sent(200, end_offset=20, messages=2, now=0.1)
    assert w.room() == 500 and w.inflight_messages == 5
    assert w.pop_confirmed(5.0) is None  # nothing acknowledged: nothing confirmed
    w.on_acked(300, now=0.5)
    assert w.deadline() == 1.5
    assert w.pop_confirmed(1.49) is None
    assert w.pop_confirmed(1.5) == (10, 3)
    assert w.room() == 800
    w.on_acked(500, now=2.0)
    assert w.pop_confirmed(2.5) is None and w.pop_confirmed(3.0) == (20, 2)
    assert w.inflight_bytes == 0 and w.deadline() is None


def test_window_reset_forgets_unconfirmed_and_says_how_many() -> None:
    w = DeliveryWindow(1000, 1.0, 30.0)
    w.on_sent(100, 4, 1, 0.0)
    w.on_sent(100, 9, 2, 0.0)
    w.on_acked(200, 0.0)
    assert w.reset() == 3
    assert w.pop_confirmed(100.0) is None and w.room() == 1000 and w.sent_bytes == 0


def test_skipped_entries_commit_with_what_precedes_or_at_once() -> None:
    w = DeliveryWindow(1000, 1.0, 30.0)
    w.on_sent(0, 5, 0, now=0.0)  # nothing in flight: done at once
    assert w.pop_confirmed(0.0) == (5, 0)
    w.on_sent(100, 7, 1, now=1.0)
    w.on_sent(0, 12, 0, now=1.0)  # rides on the chunk before it
    w.on_acked(100, now=1.0)
    assert w.pop_confirmed(1.9) is None
    assert w.pop_confirmed(2.0) == (12, 1)


def test_ack_overdue_only_without_progress() -> None:
    w = DeliveryWindow(10_000, 0.0, ack_timeout_s=5.0)
    w.on_sent(100, 1, 1, now=10.0)
    assert not w.ack_overdue(14.9) and w.ack_overdue(15.0)
    w.on_acked(50, now=14.0)
    assert not w.ack_overdue(18.9) and w.ack_overdue(19.0)
    w.on_acked(100, now=18.0)
    assert not w.ack_overdue(1000.0)
    assert w.pop_confirmed(18.0) == (1, 1)  # confirm_s 0: confirmed on the ack


# --- settings ---------------------------------------------------------------------------------


def test_settings_are_strict_and_checked() -> None:
    s = build(
        SyslogForwardSettings,
        {"target": "127.0.0.1:6514", "subject": "acme.*.log.>", "filter": "attrs.severity <= 3"},
        path="hub.yaml",
        key="syslog",
    )
    assert s.target == "127.0.0.1:6514" and s.facility == "local0"
    with pytest.raises(ConfigError, match="unknown key"):
        build(SyslogForwardSettings, {"tagret": "x:1"}, path="hub.yaml")
    bad: list[dict[str, object]] = [
        {"target": "nohost"},
        {"facility": "local9"},
        {"severity": "loud"},
        {"max_message_bytes": 100},
        {"max_inflight_bytes": 1000},
        {"filter": "attrs.x =="},
        {"subject": "a.>.b"},
        {"confirm_s": -1.0},
        {"backoff_cap_s": 0.1},
    ]
    for values in bad:
        with pytest.raises(ConfigError):
            build(SyslogForwardSettings, values, path="hub.yaml")


# --- the shell against an in-process server that drops the connection ----------------------------


class DroppingServer:
    """A TCP syslog receiver that resets the first connection after ``drop_after`` messages."""

    def __init__(self, drop_after: int) -> None:
        self.drop_after = drop_after
        self.received: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.on_client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        framer = SyslogFramer(8192)
        got = 0
        while data := await reader.read(4096):
            for m in framer.feed(data):
                got += 1
                if first and got > self.drop_after:
                    writer.transport.abort()  # as if killed: what it had not kept is gone
                    return
                self.received.append(m)
        writer.close()


def _offsets(messages: list[bytes]) -> list[int]:
    out = []
    for m in messages:
        found = re.search(rb'offset="(\d+)"', m)
        assert found is not None
        out.append(int(found.group(1)))
    return out


def _fill(log: Log, first: int, n: int) -> None:
    recs = [
        Record(s, TS + s, "acme.t1.log.auth" if s % 3 else "acme.t1.telemetry.x", {}, f"m{s}")
        for s in range(first, first + n)
    ]
    codec, payload = encode_batch(recs)
    log.append_group([PendingBatch("acme", "t1", 1, 2, recs, codec, payload, 0)], 0.0)


def test_forwarder_resends_after_a_dropped_connection_and_loses_nothing(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[int], SyslogForwarder, int]:
        server = DroppingServer(drop_after=40)
        port = await server.start()
        log = Log(tmp_path / "hub.db")
        _fill(log, 1, 300)
        fwd = SyslogForwarder(
            log,
            SyslogForwardSettings(
                target=f"127.0.0.1:{port}",
                subject="acme.*.log.>",
                max_inflight_bytes=32 << 10,
                batch_records=50,
                confirm_s=0.5,  # the drop is noticed well within this
                backoff_base_s=0.01,
                backoff_cap_s=0.05,
                poll_s=0.05,
            ),
            rng=random.Random(1),
        )
        task = asyncio.create_task(fwd.run())
        try:
            async with asyncio.timeout(15):
                while fwd.committed < 300:
                    await asyncio.sleep(0.02)
        finally:
            fwd.close()
            await task
            assert server.server is not None
            server.server.close()
        committed = log.consumer_offset("syslog")
        log.close()
        return _offsets(server.received), fwd, committed

    got, fwd, committed = asyncio.run(scenario())
    wanted = [s for s in range(1, 301) if s % 3]  # offsets = seqs here; telemetry filtered out
    assert committed == 300
    assert sorted(set(got)) == wanted
    duplicated = {o for o in got if got.count(o) > 1}
    assert fwd.stats.reconnects == 1 and fwd.stats.connects == 2
    assert sum(fwd.stats.errors.values()) == 1
    # repeats only of what was unconfirmed when the connection dropped, and counted
    assert len(got) - len(set(got)) <= fwd.stats.resent
    assert all(o > fwd.stats.resumed_from for o in duplicated)
    assert fwd.stats.forwarded == len(wanted) == fwd.stats.confirmed


class _Transport:
    def get_write_buffer_size(self) -> int:
        return 5


class _Writer:
    """What _unacked_bytes reads of a StreamWriter: its transport and its socket."""

    def __init__(self, sock: object) -> None:
        self.transport = _Transport()
        self._sock = sock

    def get_extra_info(self, name: str) -> object:
        assert name == "socket"
        return self._sock


def test_unacked_bytes_of_a_socket_closed_under_the_forwarder() -> None:
    """A reset closes the socket under the forwarder (fileno -1): its send queue is gone,
    what asyncio still buffers is all that is unacknowledged (not a ValueError)."""
    import socket

    from hub.syslogfwd import _unacked_bytes

    a, b = socket.socketpair()
    a.sendall(b"abc")
    assert _unacked_bytes(_Writer(a)) >= 5  # type: ignore[arg-type]
    b.close()
    a.close()
    assert _unacked_bytes(_Writer(a)) == 5  # type: ignore[arg-type]
    assert _unacked_bytes(_Writer(None)) == 5  # type: ignore[arg-type]

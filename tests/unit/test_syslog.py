"""Syslog parsing and RFC 6587 framing, against bytes captured from util-linux logger 2.38."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.syslog import (
    DEFAULT_MAX_MESSAGE_BYTES,
    FACILITY_NAMES,
    SEVERITY_NAMES,
    SyslogFramer,
    SyslogMessage,
    SyslogParseError,
    parse_or_raw,
    parse_syslog,
    raw_message,
    to_record_fields,
)
from transport.limits import MAX_ATTR_VALUE_BYTES

# --- what logger sent (captured with a UDP/TCP listener on 127.0.0.1) -------------

# logger -n 127.0.0.1 -P PORT -d --rfc5424 -p auth.warning -t sshd --msgid ID47
#   --sd-id exampleSDID@32473 --sd-param 'iut="3"' --sd-param 'eventSource="App\]lication"' MSG
UDP_5424 = (
    b'<36>1 2026-11-27T18:47:20.468038+00:00 vm sshd - ID47 [timeQuality tzKnown="1" '
    b'isSynced="0"][exampleSDID@32473 iut="3" eventSource="App\\]lication"] rfc5424 udp hello'
)
# logger ... -d --rfc3164 -p auth.warning -t sshd MSG
UDP_3164 = b"<36>Nov 27 18:47:02 vm sshd: rfc3164 udp hello"
# logger ... -d --rfc3164 -i -t sshd -p auth.info MSG
UDP_3164_PID = b"<38>Nov 27 18:47:06 vm sshd[4074]: with pid 3164"
# logger ... -d --rfc5424 -i -t sshd -p auth.info MSG
UDP_5424_PID = (
    b'<38>1 2026-11-27T18:47:06.574018+00:00 vm sshd 4072 - [timeQuality tzKnown="1" '
    b'isSynced="0"] with pid'
)
# logger ... -d --rfc5424=notq,notime,nohost -p kern.emerg -t k MSG
UDP_5424_BARE = b"<8>1 - - k - - - stripped"
# logger ... -d --rfc5424 -p authpriv.debug MSG (no -t: the user name is the tag)
UDP_5424_NO_TAG = (
    b'<87>1 2026-11-27T18:47:05.963842+00:00 vm root - - [timeQuality tzKnown="1" '
    b'isSynced="0"] no tag'
)
# logger ... -d --rfc5424 -p local7.debug -t sshd $'caf\xc3\xa9 utf8'
UDP_5424_UTF8 = (
    b'<191>1 2026-11-27T18:51:21.854104+00:00 vm sshd - - [timeQuality tzKnown="1" '
    b'isSynced="0"] caf\xc3\xa9 utf8'
)
# logger -u /path/to/dgram-socket -p auth.warning -t sshd MSG (no hostname)
LOCAL_3164 = b"<36>Nov 27 18:47:21 sshd: local socket hello"
# logger -u /path/to/dgram-socket --rfc3164 -p auth.warning -t sshd MSG
LOCAL_3164_HOST = b"<36>Nov 27 18:47:21 vm sshd: local socket 3164"

# logger ... -T --rfc5424 -p auth.warning -t sshd -i --msgid ID47 --sd-id ... MSG
TCP_LF_5424 = (
    b'<36>1 2026-11-27T18:51:18.631892+00:00 vm sshd 5626 ID47 [timeQuality tzKnown="1" '
    b'isSynced="0"][exampleSDID@32473 iut="3" eventSource="App\\]lication"] tcp lf 5424\n'
)
# logger ... -T --rfc3164 -p auth.warning -t sshd --msgid ID47 MSG (msgid is dropped)
TCP_LF_3164 = b"<36>Nov 27 18:51:21 vm sshd: 3164 with msgid\n"
# logger ... -T --octet-count --rfc5424 -p auth.warning -t sshd --msgid ID47 --sd-id ... MSG
TCP_OCTET_5424 = (
    b'134 <36>1 2026-11-27T18:51:19.439234+00:00 vm sshd - ID47 [timeQuality tzKnown="1" '
    b'isSynced="0"][exampleSDID@32473 iut="3"] tcp octet 5424'
)
# logger ... -T --octet-count --rfc3164 -p auth.warning -t sshd -i MSG
TCP_OCTET_3164 = b"49 <36>Nov 27 18:51:20 vm sshd[5630]: tcp octet 3164"
# printf 'line one\nline two\n' | logger ... -T --octet-count -p local7.info -t multi
TCP_OCTET_TWO = (
    b'100 <190>1 2026-11-27T18:47:22.297377+00:00 vm multi - - [timeQuality tzKnown="1" '
    b'isSynced="0"] line one'
    b'100 <190>1 2026-11-27T18:47:22.297460+00:00 vm multi - - [timeQuality tzKnown="1" '
    b'isSynced="0"] line two'
)
# printf 'line one\nline two\n' | logger ... -T -p local7.info -t multi
TCP_LF_TWO = (
    b'<190>1 2026-11-27T18:47:23.102437+00:00 vm multi - - [timeQuality tzKnown="1" '
    b'isSynced="0"] line one\n'
    b'<190>1 2026-11-27T18:47:23.102505+00:00 vm multi - - [timeQuality tzKnown="1" '
    b'isSynced="0"] line two\n'
)

TIME_QUALITY = '[timeQuality tzKnown="1" isSynced="0"]'


def frames(data: bytes, **kwargs: int) -> list[bytes]:
    framer = SyslogFramer(**kwargs)
    return framer.feed(data) + framer.close()


# --- RFC 5424 --------------------------------------------------------------------


def test_logger_rfc5424_udp_with_msgid_and_structured_data() -> None:
    msg = parse_syslog(UDP_5424)
    assert msg == SyslogMessage(
        facility=4,
        severity=4,
        facility_name="auth",
        timestamp="2026-11-27T18:47:20.468038+00:00",
        hostname="vm",
        app="sshd",
        procid=None,
        msgid="ID47",
        structured_data=TIME_QUALITY + '[exampleSDID@32473 iut="3" eventSource="App\\]lication"]',
        message="rfc5424 udp hello",
        format="rfc5424",
        raw=UDP_5424,
    )
    assert msg.severity_name == "warning"


def test_logger_rfc5424_with_pid_and_nilvalues() -> None:
    msg = parse_syslog(UDP_5424_PID)
    assert (msg.facility_name, msg.severity_name) == ("auth", "info")
    assert (msg.app, msg.procid, msg.msgid) == ("sshd", "4072", None)
    assert msg.message == "with pid"

    bare = parse_syslog(UDP_5424_BARE)
    assert (bare.facility_name, bare.severity_name) == ("user", "emerg")
    assert (bare.timestamp, bare.hostname, bare.app) == (None, None, "k")
    assert (bare.procid, bare.msgid, bare.structured_data) == (None, None, None)
    assert bare.message == "stripped"


def test_logger_rfc5424_authpriv_and_local7() -> None:
    msg = parse_syslog(UDP_5424_NO_TAG)
    assert (msg.facility, msg.facility_name, msg.severity_name) == (10, "authpriv", "debug")
    assert msg.app == "root"

    utf8 = parse_syslog(UDP_5424_UTF8)
    assert (utf8.facility, utf8.facility_name, utf8.severity_name) == (23, "local7", "debug")
    assert utf8.message == "café utf8"


def test_rfc5424_bom_is_stripped_and_message_may_be_absent() -> None:
    assert parse_syslog(b"<13>1 - h a - - - \xef\xbb\xbfcaf\xc3\xa9").message == "café"
    assert parse_syslog(b"<13>1 - h a - - -").message == ""
    assert parse_syslog(b"<13>1 - h a - - [x@1]").structured_data == "[x@1]"


def test_rfc5424_structured_data_escapes() -> None:
    sd = b'[a@1 k="q\\"uote" b="back\\\\" c="br\\]acket" d="raw]bracket"][b@2]'
    msg = parse_syslog(b"<13>1 - h a - - " + sd + b" text with [brackets]")
    assert msg.structured_data == sd.decode()
    assert msg.message == "text with [brackets]"


def test_trailing_newline_nul_and_crlf_are_stripped() -> None:
    for tail in (b"\n", b"\r\n", b"\x00", b"\n\n"):
        msg = parse_syslog(UDP_3164 + tail)
        assert msg.message == "rfc3164 udp hello"
        assert msg.raw == UDP_3164 + tail


# --- RFC 3164 --------------------------------------------------------------------


def test_logger_rfc3164_udp() -> None:
    msg = parse_syslog(UDP_3164)
    assert msg == SyslogMessage(
        facility=4,
        severity=4,
        facility_name="auth",
        timestamp="Nov 27 18:47:02",
        hostname="vm",
        app="sshd",
        procid=None,
        msgid=None,
        structured_data=None,
        message="rfc3164 udp hello",
        format="rfc3164",
        raw=UDP_3164,
    )
    pid = parse_syslog(UDP_3164_PID)
    assert (pid.hostname, pid.app, pid.procid, pid.message) == (
        "vm",
        "sshd",
        "4074",
        "with pid 3164",
    )
    assert pid.severity_name == "info"


def test_logger_local_socket_rfc3164_without_hostname() -> None:
    msg = parse_syslog(LOCAL_3164)
    assert (msg.timestamp, msg.hostname, msg.app, msg.procid) == (
        "Nov 27 18:47:21",
        None,
        "sshd",
        None,
    )
    assert msg.message == "local socket hello"
    with_host = parse_syslog(LOCAL_3164_HOST)
    assert (with_host.hostname, with_host.app) == ("vm", "sshd")


@pytest.mark.parametrize(
    ("data", "timestamp", "host", "app", "procid", "message"),
    [
        (b"<13>Oct  1 03:04:05 gw cron[1]: x", "Oct  1 03:04:05", "gw", "cron", "1", "x"),
        (b"<13>Oct 01 03:04:05 gw x y", "Oct 01 03:04:05", "gw", None, None, "x y"),
        (b"<13>Oct 1 03:04:05 gw kernel: x", "Oct 1 03:04:05", "gw", "kernel", None, "x"),
        (
            b"<13>Oct 11 2024 03:04:05 10.0.0.1 a: b",
            "Oct 11 2024 03:04:05",
            "10.0.0.1",
            "a",
            None,
            "b",
        ),
        (b"<13>Oct 11 03:04:05.123 fe80::1 a: b", "Oct 11 03:04:05.123", "fe80::1", "a", None, "b"),
        (
            b"<13>2024-10-11T22:14:15.003Z gw postfix/smtpd[77]: m",
            "2024-10-11T22:14:15.003Z",
            "gw",
            "postfix/smtpd",
            "77",
            "m",
        ),
        (b"<13>Oct 11 03:04:05 sshd[9]: x", "Oct 11 03:04:05", None, "sshd", "9", "x"),
        (b"<13>Oct 11 03:04:05 gw", "Oct 11 03:04:05", "gw", None, None, ""),
        (b"<13>sshd: no timestamp", None, None, "sshd", None, "no timestamp"),
        (b"<13>just text", None, None, None, None, "just text"),
        (b"<13>", None, None, None, None, ""),
        (b"<13>Xyz 11 03:04:05 gw a: b", None, None, None, None, "Xyz 11 03:04:05 gw a: b"),
    ],
)
def test_rfc3164_variants(
    data: bytes,
    timestamp: str | None,
    host: str | None,
    app: str | None,
    procid: str | None,
    message: str,
) -> None:
    msg = parse_syslog(data)
    assert msg.format == "rfc3164"
    assert (msg.timestamp, msg.hostname, msg.app, msg.procid, msg.message) == (
        timestamp,
        host,
        app,
        procid,
        message,
    )


def test_rfc3164_invalid_utf8_is_replaced() -> None:
    assert parse_syslog(b"<13>Oct 11 03:04:05 gw a: \xff\xfe").message == "\ufffd\ufffd"


# --- facility and severity ------------------------------------------------------------


@pytest.mark.parametrize("pri", range(192))
def test_every_pri_decodes(pri: int) -> None:
    for data in (b"<%d>1 - - - - - - m" % pri, b"<%d>Jan  1 00:00:00 h t: m" % pri):
        msg = parse_syslog(data)
        assert (msg.facility, msg.severity) == (pri // 8, pri % 8)
        assert msg.facility_name == FACILITY_NAMES[pri // 8]
        assert msg.severity_name == SEVERITY_NAMES[pri % 8]


@pytest.mark.parametrize(
    ("pri", "facility", "severity"),
    [
        (0, "kern", "emerg"),
        (13, "user", "notice"),
        (22, "mail", "info"),
        (30, "daemon", "info"),
        (36, "auth", "warning"),
        (43, "syslog", "err"),
        (74, "cron", "crit"),
        (81, "authpriv", "alert"),
        (128, "local0", "emerg"),
        (191, "local7", "debug"),
    ],
)
def test_standard_names(pri: int, facility: str, severity: str) -> None:
    msg = parse_syslog(b"<%d>1 - - - - - -" % pri)
    assert (msg.facility_name, msg.severity_name) == (facility, severity)


# --- malformed input ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "does not start with '<PRI>'"),
        (b"hello world", "does not start with '<PRI>'"),
        (b"\x00\xff\xfe garbage", "does not start with '<PRI>'"),
        (b"<>x", "PRI must be 1-3 digits"),
        (b"<1234>x", "PRI must be 1-3 digits"),
        (b"<ab>x", "PRI must be 1-3 digits"),
        (b"<13", "PRI must be 1-3 digits"),
        (b"<192>x", "PRI 192 out of range"),
        (b"<999>1 - - - - - -", "PRI 999 out of range"),
        (b"<13>1 - - -", "header truncated"),
        (b"<13>1 yesterday h a - - - m", "bad RFC 5424 TIMESTAMP"),
        (b"<13>1 2024-01-01 h a - - - m", "bad RFC 5424 TIMESTAMP"),
        (b"<13>1 -  a - - - m", "empty HOSTNAME"),
        (b"<13>1 - h\xc3\xa9 a - - - m", "HOSTNAME must be printable ASCII"),
        (b"<13>1 - h " + b"a" * 49 + b" - - - m", "APP-NAME longer than 48"),
        (b"<13>1 - h a " + b"p" * 129 + b" - - m", "PROCID longer than 128"),
        (b"<13>1 - h a - " + b"m" * 33 + b" - m", "MSGID longer than 32"),
        (b"<13>1 - h a - - x m", "STRUCTURED-DATA must be '-' or [SD-ELEMENT]"),
        (b"<13>1 - h a - - [unterminated m", "STRUCTURED-DATA must be"),
        (b'<13>1 - h a - - [id k="v] m', "STRUCTURED-DATA must be"),
        (b"<13>1 - h a - - [" + b"i" * 33 + b"] m", "STRUCTURED-DATA must be"),
        (b"<13>1 - h a - - [id k=v] m", "STRUCTURED-DATA must be"),
        (b"<13>1 - h a - - [id]m", "expected SP after STRUCTURED-DATA"),
        (b"<13>1 - h a - - [a][b m", "expected SP after STRUCTURED-DATA"),
        (b"<13>1 - h a - - -m", "expected SP after STRUCTURED-DATA"),
    ],
)
def test_malformed_raises_typed_error_and_parse_or_raw_keeps_it(data: bytes, reason: str) -> None:
    with pytest.raises(SyslogParseError) as info:
        parse_syslog(data)
    assert reason in info.value.reason
    msg, malformed = parse_or_raw(data)
    assert malformed is True
    assert msg == raw_message(data)
    assert (msg.format, msg.facility_name, msg.severity_name) == ("raw", "user", "notice")
    assert msg.message == data.decode("utf-8", errors="replace")
    assert msg.raw == data


def test_parse_or_raw_flags_good_messages_as_not_malformed() -> None:
    msg, malformed = parse_or_raw(UDP_5424)
    assert malformed is False
    assert msg == parse_syslog(UDP_5424)


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_parse_or_raw_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    msg, malformed = parse_or_raw(data)
    assert msg.raw == data
    assert 0 <= msg.facility <= 23 and 0 <= msg.severity <= 7
    assert malformed == (msg.format == "raw")


_SYSLOG_ALPHABET = st.sampled_from(
    [
        *(b"<", b">", b"1", b"13", b" ", b"-", b"[", b"]", b'"', b"\\", b"=", b"a", b"\xc3", b"\n"),
        *(b"Nov", b"27", b"18:47:02", b"2026-11-27T18:47:20Z", b"sshd[1]:", b"\xef\xbb\xbf"),
    ]
)


@settings(max_examples=500)
@given(st.sampled_from([b"<13>1 ", b"<36>", b"<191>Nov 27 18:47:02 "]), st.lists(_SYSLOG_ALPHABET))
def test_parse_or_raw_never_raises_on_syslog_shaped_bytes(head: bytes, parts: list[bytes]) -> None:
    data = head + b"".join(parts)
    msg, malformed = parse_or_raw(data)
    if not malformed:
        assert msg.format in ("rfc5424", "rfc3164")
        assert parse_syslog(data) == msg


# --- records --------------------------------------------------------------------------


def test_record_fields_from_rfc5424() -> None:
    suffix, attrs, body = to_record_fields(parse_syslog(TCP_LF_5424), default_host="truck-042")
    assert suffix == "log.auth"
    assert attrs == {
        "severity": 4,
        "severity_name": "warning",
        "facility": 4,
        "host": "vm",
        "app": "sshd",
        "procid": "5626",
        "msgid": "ID47",
        "timestamp": "2026-11-27T18:51:18.631892+00:00",
        "structured_data": TIME_QUALITY
        + '[exampleSDID@32473 iut="3" eventSource="App\\]lication"]',
        "format": "rfc5424",
    }
    assert body == "tcp lf 5424"


def test_record_fields_default_host_and_omitted_nones() -> None:
    suffix, attrs, body = to_record_fields(parse_syslog(LOCAL_3164), default_host="truck-042")
    assert suffix == "log.auth"
    assert attrs == {
        "severity": 4,
        "severity_name": "warning",
        "facility": 4,
        "host": "truck-042",
        "app": "sshd",
        "timestamp": "Nov 27 18:47:21",
        "format": "rfc3164",
    }
    assert body == "local socket hello"

    suffix, attrs, body = to_record_fields(raw_message(b"\xffjunk"), default_host="gw")
    assert suffix == "log.user"
    assert attrs == {
        "severity": 5,
        "severity_name": "notice",
        "facility": 1,
        "host": "gw",
        "format": "raw",
    }
    assert body == "\ufffdjunk"


def test_record_fields_cut_long_structured_data_and_say_so() -> None:
    sd = b"[id k=" + b'"' + b"v" * 2000 + b'"]'
    _, attrs, _ = to_record_fields(parse_syslog(b"<13>1 - h a - - " + sd), default_host="gw")
    assert isinstance(attrs["structured_data"], str)
    assert len(attrs["structured_data"]) == MAX_ATTR_VALUE_BYTES
    assert attrs["structured_data_truncated"] is True


def test_record_attrs_are_scalars() -> None:
    for data in (UDP_5424, UDP_3164_PID, LOCAL_3164, b"junk"):
        msg, _ = parse_or_raw(data)
        _, attrs, body = to_record_fields(msg, default_host="gw")
        assert isinstance(body, str)
        assert all(isinstance(v, str | int | float | bool) for v in attrs.values())


# --- framing: what logger sends over TCP ----------------------------------------------


def test_logger_tcp_newline_framing() -> None:
    framer = SyslogFramer()
    out = framer.feed(TCP_LF_5424 + TCP_LF_3164)
    assert out == [TCP_LF_5424[:-1], TCP_LF_3164[:-1]]
    assert (framer.messages, framer.oversized, framer.malformed, framer.buffered) == (2, 0, 0, 0)
    assert [parse_syslog(m).message for m in out] == ["tcp lf 5424", "3164 with msgid"]
    assert [parse_syslog(m).message for m in frames(TCP_LF_TWO)] == ["line one", "line two"]


def test_logger_tcp_octet_counting() -> None:
    framer = SyslogFramer()
    out = framer.feed(TCP_OCTET_5424 + TCP_OCTET_3164)
    assert out == [TCP_OCTET_5424[4:], TCP_OCTET_3164[3:]]
    assert (framer.messages, framer.malformed, framer.buffered) == (2, 0, 0)
    first, second = (parse_syslog(m) for m in out)
    assert (first.format, first.msgid, first.message) == ("rfc5424", "ID47", "tcp octet 5424")
    assert first.structured_data == TIME_QUALITY + '[exampleSDID@32473 iut="3"]'
    assert (second.format, second.procid, second.message) == ("rfc3164", "5630", "tcp octet 3164")
    assert [parse_syslog(m).message for m in frames(TCP_OCTET_TWO)] == ["line one", "line two"]


def test_framings_mix_per_frame_and_terminators_vary() -> None:
    stream = (
        TCP_OCTET_3164
        + b"\n"  # some senders end counted frames with LF anyway
        + b"<13>crlf\r\n"
        + b"<13>nul\x00"
        + b"\n\r\n\x00"  # blank lines between frames are skipped
        + TCP_OCTET_5424
        + TCP_LF_3164
    )
    assert frames(stream) == [
        TCP_OCTET_3164[3:],
        b"<13>crlf",
        b"<13>nul",
        TCP_OCTET_5424[4:],
        TCP_LF_3164[:-1],
    ]


def test_close_returns_unterminated_line_and_counts_cut_off_frame() -> None:
    framer = SyslogFramer()
    assert framer.feed(b"<13>no newline") == []
    assert framer.close() == [b"<13>no newline"]
    assert framer.messages == 1

    assert framer.feed(b"100 <13>only part") == []
    assert framer.close() == []
    assert framer.malformed == 1
    assert framer.feed(b"5 <13>x") == [b"<13>x"]  # the framer is usable again


# --- framing: limits and bad prefixes -------------------------------------------------


def test_oversized_counted_message_is_cut_and_the_rest_skipped() -> None:
    framer = SyslogFramer()
    big = b"<13>" + b"x" * 10_000
    out = framer.feed(b"%d " % len(big) + big + b"5 <13>y")
    assert out == [big[:DEFAULT_MAX_MESSAGE_BYTES], b"<13>y"]
    assert (framer.messages, framer.oversized, framer.malformed) == (2, 1, 0)


def test_oversized_counted_message_across_feeds_stays_bounded() -> None:
    framer = SyslogFramer(max_message_bytes=100)
    length = 1_000_000
    out = framer.feed(b"%d " % length)
    for _ in range(length // 1000):
        out += framer.feed(b"z" * 1000)
        assert framer.buffered <= 101
    out += framer.feed(b"5 <13>y")
    assert out == [b"z" * 100, b"<13>y"]
    assert framer.oversized == 1


def test_overlong_line_is_cut_and_counted() -> None:
    framer = SyslogFramer(max_message_bytes=64)
    out = framer.feed(b"<13>" + b"a" * 200 + b"\n<13>next\n")
    assert out == [b"<13>" + b"a" * 60, b"<13>next"]
    assert (framer.messages, framer.oversized) == (2, 1)


def test_line_at_the_limit_is_kept_whole_even_with_crlf() -> None:
    line = b"<13>" + b"b" * 60
    for term in (b"\n", b"\r\n"):
        framer = SyslogFramer(max_message_bytes=64)
        out = [m for byte in line + term for m in framer.feed(bytes([byte]))]
        assert out == [line]
        assert framer.oversized == 0
    assert frames(line + b"c\n", max_message_bytes=64) == [line]


@pytest.mark.parametrize(
    "prefix",
    [b"12x hello", b"0 <13>zero", b"007 <13>lead", b"12345678901 <13>eleven digits", b"42"],
)
def test_bad_length_prefix_resynchronises_at_newline(prefix: bytes) -> None:
    framer = SyslogFramer()
    out = framer.feed(prefix + b"\n<13>next\n" + TCP_OCTET_3164)
    assert out == [prefix, b"<13>next", TCP_OCTET_3164[3:]]
    assert framer.malformed == 1
    msg, malformed = parse_or_raw(out[0])
    assert malformed and msg.format == "raw"


def test_framer_rejects_a_tiny_limit() -> None:
    with pytest.raises(ValueError, match="max_message_bytes"):
        SyslogFramer(max_message_bytes=10)


# --- framing: properties --------------------------------------------------------------

_FRAME = st.one_of(
    st.binary(min_size=1, max_size=200).map(lambda b: b"%d " % len(b) + b),
    st.binary(max_size=200)
    .map(lambda b: b.replace(b"\n", b"").replace(b"\x00", b""))
    .flatmap(lambda b: st.sampled_from([b"\n", b"\r\n", b"\x00"]).map(lambda t: b"<13>" + b + t)),
    st.sampled_from(
        [TCP_LF_5424, TCP_LF_3164, TCP_OCTET_5424, TCP_OCTET_3164, b"\n", b"12x\n", b"99 ab"]
    ),
)


def _feed_in_chunks(data: bytes, cuts: list[int], limit: int) -> tuple[list[bytes], SyslogFramer]:
    framer = SyslogFramer(max_message_bytes=limit)
    out: list[bytes] = []
    start = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        out += framer.feed(data[start:cut])
        assert framer.buffered <= limit + 1
        start = cut
    return out + framer.close(), framer


def _counters(framer: SyslogFramer) -> tuple[int, int, int]:
    return framer.messages, framer.oversized, framer.malformed


@settings(max_examples=300)
@given(
    st.lists(_FRAME, max_size=12),
    st.lists(st.integers(min_value=0, max_value=5000), max_size=20),
    st.sampled_from([64, 100, 8192]),
)
def test_chunk_boundaries_do_not_change_frames(
    frame_list: list[bytes], cuts: list[int], limit: int
) -> None:
    data = b"".join(frame_list)
    whole, one = _feed_in_chunks(data, [], limit)
    split, many = _feed_in_chunks(data, cuts, limit)
    assert split == whole
    assert _counters(many) == _counters(one)
    assert all(len(m) <= limit for m in whole)


@settings(max_examples=300)
@given(
    st.binary(max_size=2000),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=20),
)
def test_arbitrary_bytes_frame_the_same_in_any_chunks(data: bytes, cuts: list[int]) -> None:
    whole, one = _feed_in_chunks(data, [], 64)
    split, many = _feed_in_chunks(data, cuts, 64)
    assert split == whole
    assert _counters(many) == _counters(one)


def test_byte_at_a_time_equals_whole() -> None:
    stream = TCP_OCTET_TWO + TCP_LF_TWO + TCP_OCTET_5424 + b"12x bad\n" + TCP_LF_5424
    framer = SyslogFramer()
    one_by_one = [m for i in range(len(stream)) for m in framer.feed(stream[i : i + 1])]
    assert one_by_one == frames(stream)
    assert len(one_by_one) == 7

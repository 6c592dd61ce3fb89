"""Sans-IO tests of the HTTP/1.1 sides: bytes in, events and bytes out, split at every offset."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.core import http1
from edgeproxy.core.http1 import Body, ClientSide, EndOfMessage, RequestHead, ResponseHead, ServerSide
from edgeproxy.errors import RemoteProtocolError


def drain(side, data_chunks):
    """Feed chunks one by one, collecting every event until the stream pauses."""
    events = []
    for chunk in data_chunks:
        if not chunk:
            continue  # b"" means EOF to a sans-IO side
        side.receive_data(chunk)
        for _ in range(10_000):
            event = side.next_event()
            if event is http1.NEED_DATA or event is http1.PAUSED:
                break
            events.append(event)
            if isinstance(event, http1.ConnectionClosed):
                break
    return events


def normalize(events):
    """Merge body chunks so different splits compare equal."""
    out = []
    for event in events:
        if isinstance(event, Body) and out and isinstance(out[-1], Body):
            out[-1] = Body(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def every_split(data: bytes):
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]


CHUNKED_POST = (
    b"POST /upload?x=1 HTTP/1.1\r\nHost: Example.COM:8080\r\nTransfer-Encoding: chunked\r\n"
    b"X-Forwarded-For: 10.0.0.1\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
)


def test_request_head_and_chunked_body_at_every_split():
    whole = normalize(drain(ServerSide(), [CHUNKED_POST]))
    head = whole[0]
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.host, head.path) == (b"POST", b"/upload?x=1", "example.com", "/upload")
    assert head.has_body and not head.websocket
    assert whole[1:] == [Body(b"hello world"), EndOfMessage()]
    for chunks in every_split(CHUNKED_POST):
        assert normalize(drain(ServerSide(), chunks)) == whole
    assert normalize(drain(ServerSide(), [bytes([b]) for b in CHUNKED_POST])) == whole


def test_header_case_is_preserved():
    events = drain(ServerSide(), [b"GET / HTTP/1.1\r\nHost: a\r\nX-CamelCase: v\r\n\r\n"])
    assert (b"X-CamelCase", b"v") in events[0].headers


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\tc\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),  # RFC 9112 6.3
    ],
)
def test_refused_shapes_get_their_status(raw, status):
    for chunks in ([raw], [bytes([b]) for b in raw]):
        side = ServerSide()
        with pytest.raises(RemoteProtocolError) as info:
            drain(side, chunks)
        assert info.value.status_hint == status


def test_header_block_too_large_is_431_even_without_the_end():
    side = ServerSide(max_header_size=1024)
    side.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 2000)
    with pytest.raises(RemoteProtocolError) as info:
        side.next_event()
    assert info.value.status_hint == 431


def test_pipelined_requests_come_one_cycle_at_a_time():
    raw = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n"
    side = ServerSide()
    first = drain(side, [raw])
    assert [type(e) for e in first] == [RequestHead, EndOfMessage]
    side.send_response(ResponseHead(200, b"OK", b"1.1", [(b"Content-Length", b"0")]))
    side.send_end()
    assert side.keep_alive
    side.start_next_cycle()
    # The second request carries obs-fold: it is checked like the first.
    with pytest.raises(RemoteProtocolError) as info:
        side.next_event()
    assert "folding" in str(info.value)


def test_eof_between_requests_is_connection_closed_and_mid_head_is_an_error():
    side = ServerSide()
    side.receive_data(b"")
    assert isinstance(side.next_event(), http1.ConnectionClosed)
    side = ServerSide()
    side.receive_data(b"GET / HT")
    side.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        side.next_event()


def test_websocket_upgrade_is_recognised_and_trailing_frames_kept():
    raw = (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\x81\x80abcd"
    )
    side = ServerSide()
    events = drain(side, [raw])
    assert events[0].websocket
    out = side.send_informational(
        ResponseHead(101, b"Switching Protocols", b"1.1", [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")])
    )
    assert out.startswith(b"HTTP/1.1 101 ")
    assert side.switched_trailing_data() == b"\x81\x80abcd"


def test_forwarded_request_headers_strip_hop_by_hop_and_add_x_forwarded():
    raw = (
        b"GET / HTTP/1.1\r\nHost: app.example\r\nConnection: close, X-Secret\r\nKeep-Alive: 5\r\n"
        b"TE: trailers\r\nProxy-Connection: x\r\nX-Secret: s\r\nX-Forwarded-For: 10.0.0.1\r\n"
        b"X-Forwarded-Proto: evil\r\nCookie: a=b\r\nUpgrade: h2c\r\n\r\n"
    )
    head = drain(ServerSide(), [raw])[0]
    headers = http1.forwarded_request_headers(head, client_ip="127.0.0.9")
    names = [n.lower() for n, _ in headers]
    for gone in (b"connection", b"keep-alive", b"te", b"proxy-connection", b"x-secret", b"upgrade"):
        assert gone not in names
    as_dict = {n.lower(): v for n, v in headers}
    assert as_dict[b"host"] == b"app.example"
    assert as_dict[b"cookie"] == b"a=b"
    assert as_dict[b"x-forwarded-for"] == b"10.0.0.1, 127.0.0.9"
    assert as_dict[b"x-forwarded-proto"] == b"http"
    assert as_dict[b"x-forwarded-host"] == b"app.example"
    assert names.count(b"x-forwarded-proto") == 1


def test_forwarded_websocket_request_keeps_upgrade_pair():
    raw = (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: chat\r\n\r\n"
    )
    head = drain(ServerSide(), [raw])[0]
    headers = dict((n.lower(), v) for n, v in http1.forwarded_request_headers(head, client_ip="::1"))
    assert headers[b"connection"] == b"Upgrade" and headers[b"upgrade"] == b"websocket"
    assert headers[b"sec-websocket-protocol"] == b"chat"
    assert headers[b"x-forwarded-for"] == b"::1"


def test_forwarded_response_headers():
    headers = [(b"Connection", b"keep-alive, X-Internal"), (b"X-Internal", b"1"), (b"Transfer-Encoding", b"chunked"),
               (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")]
    out = http1.forwarded_response_headers(headers)
    assert out == [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")]


def test_send_simple_keeps_alive_only_when_the_request_was_read():
    side = ServerSide()
    drain(side, [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"])
    out = side.send_simple(404, "no route")
    assert out.startswith(b"HTTP/1.1 404 Not Found\r\n") and b"connection: close" not in out.lower()
    assert side.keep_alive


def test_error_response_is_complete_and_closes():
    out = http1.error_response(400, "bad request", extra_headers=[(b"Sec-WebSocket-Version", b"13")])
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 Bad Request")
    assert b"Connection: close" in head and b"Sec-WebSocket-Version: 13" in head
    assert body == b"bad request\n" and b"Content-Length: 12" in head


RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"


def test_client_side_request_and_response_at_every_split():
    request = drain(ServerSide(), [b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"])[0]

    def run(chunks):
        client = ClientSide()
        out = client.send_request(request, [(b"Host", b"a")]) + client.send_end()
        assert out.startswith(b"GET /x HTTP/1.1\r\n")
        return normalize(drain(client, chunks)), client

    whole, client = run([RESPONSE])
    assert whole[0].status == 200 and whole[1:] == [Body(b"abc"), EndOfMessage()]
    assert client.reusable
    for chunks in every_split(RESPONSE):
        assert run(chunks)[0] == whole


def test_client_side_bad_response_is_502():
    request = drain(ServerSide(), [b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"])[0]
    client = ClientSide()
    client.send_request(request, [(b"Host", b"a")])
    client.send_end()
    client.receive_data(b"NOT HTTP\r\n\r\n")
    with pytest.raises(RemoteProtocolError) as info:
        client.next_event()
    assert info.value.status_hint == 502


def test_head_response_has_no_body_even_with_content_length():
    request = drain(ServerSide(), [b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n"])[0]
    client = ClientSide()
    client.send_request(request, [(b"Host", b"a")])
    client.send_end()
    events = drain(client, [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"])
    assert isinstance(events[0], ResponseHead) and isinstance(events[1], EndOfMessage)


def test_chunked_request_body_is_forwarded_chunked():
    head = drain(ServerSide(), [CHUNKED_POST])[0]
    headers = http1.forwarded_request_headers(head, client_ip="127.0.0.1")
    assert [v for n, v in headers if n.lower() == b"transfer-encoding"] == [b"chunked"]
    client = ClientSide()
    out = client.send_request(head, headers) + client.send_data(b"hello") + client.send_end()
    assert out.endswith(b"5\r\nhello\r\n0\r\n\r\n")


# ----------------------------------------------------------------------------
# The WebSocket handshake's fast path equals h11 on every input it accepts.
#
# `ServerSide` parses a plain upgrade request without h11, `ClientSide` writes the
# forwarded upgrade and parses a plain 101 without h11, and the 101 to the client
# is written directly.  These tests hold each against h11 itself: same parsed
# heads, same bytes written, and anything the strict grammar does not accept goes
# to h11 and ends exactly as it would have without the fast path.
# ----------------------------------------------------------------------------

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE = (
    b"GET /ws?room=1 HTTP/1.1\r\nHost: Example.com:8080\r\nUpgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: " + KEY + b"\r\n"
    b"Sec-WebSocket-Version: 13\r\nX-Empty:\r\nX-Spaced: \t a  b \t\r\n\r\n"
)
PLAIN_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)

TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCXYZ", min_size=1, max_size=12)
VALUE = st.binary(max_size=20).map(lambda b: bytes(c for c in b if c not in b"\r\n"))
HEADERS = st.lists(st.tuples(TOKEN.map(str.encode), VALUE), max_size=6)


def h11_request_head(raw: bytes):
    """The RequestHead the proxy builds when h11 does the parsing."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    event = conn.next_event()
    headers = [(bytes(n), bytes(v)) for n, v in event.headers.raw_items()]
    return ServerSide()._make_head(bytes(event.method), bytes(event.target), bytes(event.http_version), headers)


def h11_response(raw: bytes):
    """(status, reason, headers) of a response head parsed by h11, or the error type."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "a"), ("Upgrade", "websocket"), ("Connection", "Upgrade")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return "error"
    if event is h11.NEED_DATA:
        return "need-data"
    return event.status_code, bytes(event.reason), [(bytes(n), bytes(v)) for n, v in event.headers.raw_items()]


# -- the request, client to proxy ----------------------------------------------


def test_plain_upgrade_is_parsed_without_h11_and_equals_h11():
    side = ServerSide()
    head = drain(side, [UPGRADE])[0]
    assert side._fast is not None and side._conn is None  # the fast path took it
    assert head == h11_request_head(UPGRADE)
    assert head.websocket and head.host == "example.com" and head.path == "/ws"


def test_fast_upgrade_events_at_every_split_equal_the_whole():
    trailing = b"\x81\x85abcd\x01\x02\x03\x04\x05"
    data = UPGRADE + trailing
    whole = drain(ServerSide(), [data])
    assert [type(e) for e in whole] == [http1.RequestHead, EndOfMessage]
    for chunks in every_split(data):
        side = ServerSide()
        assert drain(side, chunks) == whole
        assert side.next_event() is http1.PAUSED
        assert side.switched_trailing_data() == trailing


@pytest.mark.parametrize(
    "raw",
    [
        UPGRADE.replace(b"GET", b"POST"),  # not GET
        UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0"),  # not 1.1
        UPGRADE.replace(b"\r\nUpgrade:", b"\nUpgrade:"),  # a bare LF
        UPGRADE.replace(b"Host: Example.com:8080\r\n", b""),  # no Host: h11 refuses it
        UPGRADE.replace(b"Host: Example.com:8080\r\n", b"Host: a\r\nHost: b\r\n"),  # two Hosts
        UPGRADE.replace(b"X-Empty:\r\n", b"Content-Length: 0\r\n"),  # body framing
        UPGRADE.replace(b"X-Empty:\r\n", b"Bad Name: x\r\n"),  # not a token
        UPGRADE.replace(b"X-Empty:\r\n", b"X-Nul: a\x00b\r\n"),  # NUL in a value
    ],
)
def test_unusual_requests_go_to_h11_with_the_same_outcome(raw):
    side = ServerSide()
    try:
        head = drain(side, [raw])[0]
    except RemoteProtocolError:
        with pytest.raises((h11.RemoteProtocolError, RemoteProtocolError)):
            h11_request_head(raw)
        return
    assert side._fast is None  # h11 parsed it
    assert head == h11_request_head(raw)


@settings(max_examples=300, deadline=None)
@given(target=st.sampled_from([b"/", b"/ws", b"/a?b=c&d", b"/%41~!$"]), extra=HEADERS)
def test_fast_parse_equals_h11_on_generated_upgrades(target, extra):
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: h", b"Upgrade: websocket", b"Connection: upgrade"]
    lines += [n + b": " + v for n, v in extra]
    raw = b"\r\n".join(lines) + b"\r\n\r\n"
    try:
        expected = h11_request_head(raw)
    except (h11.RemoteProtocolError, RemoteProtocolError):
        expected = "error"
    side = ServerSide()
    try:
        got = drain(side, [raw])[0]
    except RemoteProtocolError:
        got = "error"
    assert got == expected


def test_refused_fast_upgrade_hands_over_to_h11_and_keeps_the_connection():
    """A 404 for a fast-parsed upgrade is written by h11, then the next request works."""
    pipelined = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    fast = ServerSide()
    events = drain(fast, [UPGRADE + pipelined])
    assert isinstance(events[-1], EndOfMessage)
    reply = fast.send_simple(404, "no route")
    # The same exchange with h11 from the start.
    slow = h11.Connection(h11.SERVER)
    slow.receive_data(UPGRADE)
    slow.next_event(), slow.next_event()
    body = b"no route\n"
    expected = slow.send(h11.Response(status_code=404, reason=b"Not Found", headers=[
        (b"Content-Type", b"text/plain; charset=utf-8"), (b"Content-Length", b"%d" % len(body))]))
    expected += slow.send(h11.Data(data=body)) + slow.send(h11.EndOfMessage())
    assert reply == expected
    assert fast.keep_alive
    fast.start_next_cycle()
    following = fast.next_event()
    assert isinstance(following, http1.RequestHead) and following.target == b"/next"


def test_switching_protocols_is_written_as_h11_writes_it():
    headers = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Accept", b"s3pP="), (b"X-A", b"")]
    side = ServerSide()
    drain(side, [UPGRADE])
    fast = side.send_switching_protocols(b"Switching Protocols", headers)
    slow = h11.Connection(h11.SERVER)
    slow.receive_data(UPGRADE)
    slow.next_event(), slow.next_event()
    assert fast == slow.send(h11.InformationalResponse(status_code=101, reason=b"Switching Protocols", headers=headers))


# -- the forwarded request and the 101, proxy to upstream --------------------------


@settings(max_examples=200, deadline=None)
@given(extra=HEADERS, host_position=st.integers(0, 6))
def test_forwarded_upgrade_bytes_equal_h11s(extra, host_position):
    headers = [n_v for n_v in extra if n_v[0].lower() != b"host"]
    headers.insert(min(host_position, len(headers)), (b"Host", b"example.com"))
    head = drain(ServerSide(), [UPGRADE])[0]
    try:
        expected = h11.Connection(h11.CLIENT).send(h11.Request(method=b"GET", target=head.target, headers=headers))
    except h11.LocalProtocolError:
        return  # values h11 refuses never come out of a parsed request
    client = ClientSide()
    assert client.send_request(head, headers) + client.send_end() == expected


@settings(max_examples=400, deadline=None)
@given(reason=VALUE, extra=HEADERS, crlf=st.booleans())
def test_plain_101_parse_equals_h11(reason, extra, crlf):
    eol = b"\r\n" if crlf else b"\n"
    raw = eol.join([b"HTTP/1.1 101 " + reason] + [n + b": " + v for n, v in extra]) + eol + eol
    parsed = http1.parse_plain_101(raw)
    if parsed is None:
        return  # h11 decides (covered by the fallback tests)
    head, length = parsed
    assert length == len(raw)
    assert h11_response(raw) == (101, head.reason, head.headers)


def upgrade_client():
    head = drain(ServerSide(), [UPGRADE])[0]
    client = ClientSide()
    client.send_request(head, http1.forwarded_request_headers(head, client_ip="127.0.0.1"))
    client.send_end()
    return client


def test_plain_101_at_every_split_with_early_frames():
    early = b"\x81\x02hi"
    for chunks in every_split(PLAIN_101 + early):
        client = upgrade_client()
        events = drain(client, chunks)
        assert len(events) == 1 and events[0].status == 101
        assert (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") in events[0].headers
        assert client.trailing_data() == early
        assert not client.reusable


REFUSAL = b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nnope!\n"


def test_refused_upgrade_falls_back_to_h11_at_every_split():
    for chunks in every_split(REFUSAL):
        events = normalize(drain(upgrade_client(), chunks))
        assert [type(e) for e in events] == [ResponseHead, Body, EndOfMessage]
        assert events[0].status == 403 and events[1] == Body(b"nope!\n")


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 101 Switching Protocols\nUpgrade: websocket\nConnection: Upgrade\n\n",  # bare LF: h11 accepts
        b"HTTP/1.1 101\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n",  # framing header: h11 checks it
        b"HTTP/1.0 101 OK\r\nUpgrade: websocket\r\n\r\n",
    ],
)
def test_unusual_101s_go_to_h11(raw):
    client = upgrade_client()
    event = drain(client, [raw])[0]
    expected = h11_response(raw)
    assert (event.status, event.reason, event.headers) == expected


def test_garbage_from_upstream_is_502_after_fallback():
    client = upgrade_client()
    client.receive_data(b"NOT HTTP\r\n\r\n")
    with pytest.raises(RemoteProtocolError) as info:
        client.next_event()
    assert info.value.status_hint == 502


def test_upstream_eof_before_101_is_connection_closed_or_error_like_h11():
    client = upgrade_client()
    client.receive_data(b"HTTP/1.1 101 Swi")
    assert client.next_event() is http1.NEED_DATA
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_oversized_101_head_is_refused():
    client = upgrade_client()
    client.receive_data(b"HTTP/1.1 101 OK\r\nX: " + b"a" * 70_000)
    with pytest.raises(RemoteProtocolError):
        client.next_event()


# ----------------------------------------------------------------------------
# Request hygiene: the request line's version, the Host and the authority held
# to their grammar, chunk sizes with leading zeros; and what is forwarded reads
# upstream as the request the proxy parsed.
# ----------------------------------------------------------------------------


def refusal_at_every_split(raw: bytes) -> set[int]:
    """The statuses the proxy answers ``raw`` with, fed whole and split at every offset."""
    statuses = set()
    for chunks in [[raw], *every_split(raw)]:
        with pytest.raises(RemoteProtocolError) as info:
            drain(ServerSide(), chunks)
        statuses.add(info.value.status_hint)
    return statuses


@pytest.mark.parametrize("version", [b"0.9", b"0.8", b"2.0", b"1.2", b"3.0", b"9.9"])
@pytest.mark.parametrize("shape", ["origin", "absolute", "upgrade"])
def test_versions_other_than_1_0_and_1_1_are_505(version, shape):
    if shape == "upgrade":
        raw = UPGRADE.replace(b"HTTP/1.1", b"HTTP/" + version)
    else:
        target = b"/x" if shape == "origin" else b"http://a.example/x"
        raw = b"GET " + target + b" HTTP/" + version + b"\r\nHost: a.example\r\n\r\n"
    assert refusal_at_every_split(raw) == {505}


@pytest.mark.parametrize(
    "line", [b"GET / HTTP/1.10", b"GET / HTTP/11", b"GET / http/1.1", b"GET / HTTP/1.1x", b"GET /", b"GET / HTTP/ 1.1"]
)
def test_malformed_versions_are_400(line):
    assert refusal_at_every_split(line + b"\r\nHost: a\r\n\r\n") == {400}


def test_http_1_0_and_1_1_still_pass():
    for version in (b"1.0", b"1.1"):
        head = drain(ServerSide(), [b"GET / HTTP/" + version + b"\r\nHost: a\r\n\r\n"])[0]
        assert head.http_version == version


BAD_HOSTS = [
    b"a\x07b", b"a\tb", b"a b", b"a\x01", b"a\x7f", b"a\x80b",  # control characters, HTAB, SP, non-ASCII
    b"user@a.example", b"a:b:c", b"a:80x", b"a%zz", b"a/b", b"a?b", b"a#b", b"a\\b", b"a\"b", b"<a>",
    b"[::1", b"[zz::1]", b"[::1%eth0]", b"[1.2.3.4]", b"[::1]x", b"[::1]:8x", b"::1",
]
GOOD_HOSTS = [
    b"a.example", b"A.Example:8080", b"127.0.0.1", b"127.0.0.1:1", b"[::1]", b"[::1]:8080",
    b"[2001:db8::ffff:1.2.3.4]", b"[v1.fe:ed]", b"ex%41mple", b"a_b~c!$&'()*+,;=", b"a.example:", b"",
]


@pytest.mark.parametrize("host", BAD_HOSTS)
@pytest.mark.parametrize("shape", ["origin", "absolute", "asterisk", "upgrade"])
def test_host_outside_the_rfc_3986_grammar_is_400_whatever_the_target(host, shape):
    if shape == "upgrade":
        raw = UPGRADE.replace(b"Host: Example.com:8080", b"Host: " + host)
    else:
        line = {"origin": b"GET /x", "absolute": b"GET http://a.example/x", "asterisk": b"OPTIONS *"}[shape]
        raw = line + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    assert refusal_at_every_split(raw) == {400}


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_hosts_inside_the_grammar_pass(host):
    head = drain(ServerSide(), [b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"])[0]
    assert head.host == http1._split_host(host)


@pytest.mark.parametrize("authority", [h for h in BAD_HOSTS if b"/" not in h and b"?" not in h and b"#" not in h]
                         + [b"", b":80", b"u:p@a.example"])
def test_absolute_form_authority_outside_the_grammar_is_400(authority):
    raw = b"GET http://" + authority + b"/x HTTP/1.1\r\nHost: a.example\r\n\r\n"
    assert refusal_at_every_split(raw) == {400}


@pytest.mark.parametrize(
    "target, host, path",
    [
        (b"http://Up.Example:81/p?q=1", "up.example:81", "/p"),
        (b"HTTPS://[::1]:8443", "[::1]", "/"),
        (b"http://up.example?q=1", "up.example", "/"),
    ],
)
def test_absolute_form_authority_is_routed_and_becomes_the_forwarded_host(target, host, path):
    head = drain(ServerSide(), [b"GET " + target + b" HTTP/1.1\r\nHost: other.example\r\n\r\n"])[0]
    assert (head.host, head.path) == (host if host.startswith("[") else host.split(":")[0], path)
    forwarded = http1.forwarded_request_headers(head, client_ip="10.0.0.1")
    hosts = [v for n, v in forwarded if n.lower() == b"host"]
    assert hosts == [head.authority] and forwarded[0][0] == b"Host"
    assert dict(forwarded)[b"X-Forwarded-Host"] == head.authority


def test_absolute_form_gives_http_1_0_without_host_a_host_upstream():
    head = drain(ServerSide(), [b"GET http://up.example/ HTTP/1.0\r\n\r\n"])[0]
    client = ClientSide()
    out = client.send_request(head, http1.forwarded_request_headers(head, client_ip="10.0.0.1"))
    assert b"\r\nHost: up.example\r\n" in out


def chunked(size_lines: list[bytes], payloads: list[bytes]) -> bytes:
    head = b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"".join(size + b"\r\n" + data + b"\r\n" for size, data in zip(size_lines, payloads)) + b"0\r\n\r\n"


def test_chunk_sizes_with_any_number_of_leading_zeros_at_every_split():
    payload = bytes(range(0xE3))
    raw = chunked([b"000000000000000000000000000000000e3", b"0" * 100 + b"1;ext=1"], [payload, b"!"])
    raw = raw[: -len(b"0\r\n\r\n")] + b"0" * 50 + b"\r\n\r\n"  # a last chunk of zeros, too
    expected = [Body(payload + b"!"), EndOfMessage()]
    for chunks in [[raw], *every_split(raw), [bytes([b]) for b in raw]]:
        side = ServerSide()
        assert normalize(drain(side, chunks))[1:] == expected
        assert side.request_complete


def test_leading_zero_chunks_keep_the_pipelined_request_untouched():
    second = b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
    side = ServerSide()
    drain(side, [chunked([b"0003"], [b"abc"]) + second])
    side.send_response(ResponseHead(200, b"OK", b"1.1", [(b"Content-Length", b"0")]))
    side.send_end()
    side.start_next_cycle()
    assert side.next_event().target == b"/2"


@pytest.mark.parametrize(
    "size", [b"8000000000000000", b"0000" + b"8000000000000000", b"ffffffffffffffffffff", b"1" + b"0" * 40]
)
def test_chunk_sizes_that_overflow_63_bits_are_400(size):
    raw = b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nabc"
    assert refusal_at_every_split(raw) == {400}


def test_largest_chunk_size_is_taken():
    side = ServerSide()
    events = drain(side, [b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n00007fffffffffffffff\r\nabc"])
    assert events[1:] == [Body(b"abc")]


def test_chunk_size_line_longer_than_the_header_limit_is_400_even_without_its_end():
    raw = b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0" * 2000
    side = ServerSide(max_header_size=1024)
    with pytest.raises(RemoteProtocolError) as info:
        drain(side, [raw])
    assert info.value.status_hint == 400


@pytest.mark.parametrize("raw", [
    chunked([b"3 junk"], [b"abc"]),  # h11 still judges the rest of the line
    chunked([b"3"], [b"abcd"]),  # the data is longer than the size
    chunked([b"-3"], [b"abc"]),
])
def test_leading_zero_rewrite_leaves_bad_chunks_to_h11(raw):
    assert refusal_at_every_split(raw) == {400}


# -- a forwarded request reads upstream as the request the proxy parsed ----------

_HOST_BYTES = st.lists(st.sampled_from([b"a", b"Z", b"0", b".", b"-", b":", b"8", b"[", b"]", b"%", b"41",
                                        b"@", b" ", b"\t", b"\x07", b"\x00", b"_", b"~", b"!", b"v"]), max_size=8)
_PATHS = st.sampled_from([b"/", b"/p", b"/a/b?c=d&e", b"/%41~!$'()*+,;=:@", b"?q", b""])


@st.composite
def client_requests(draw):
    """A request as a client might write it, valid or not, and the body it carries."""
    host = draw(st.one_of(st.sampled_from([b"up.example", b"Up.Example:8080", b"[::1]:80", b"10.0.0.1"]),
                          _HOST_BYTES.map(b"".join)))
    form = draw(st.sampled_from(["origin", "absolute", "no host"]))
    path = draw(_PATHS)
    target = b"http://" + host + path if form == "absolute" else b"/" + path.lstrip(b"/")
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.1", b"1.0", b"0.9", b"2.0"]))
    headers = [] if form == "no host" else [(b"Host", draw(st.sampled_from([host, b"h.example:8", b"h\x07"])))]
    headers += draw(HEADERS)
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(["length", "chunked", "none"]))
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
        encoded = body
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)]) if b > a]
        zeros = b"0" * draw(st.integers(0, 40))
        encoded = b"".join(zeros + b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces) + zeros + b"0\r\n\r\n"
    else:
        body = encoded = b""
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"OPTIONS"]))
    lines = [method + b" " + target + b" HTTP/" + version] + [n + b": " + v for n, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + encoded, body


@settings(max_examples=500, deadline=None)
@given(request=client_requests(), split=st.integers(0, 400))
def test_a_forwarded_request_parses_in_h11_as_the_proxy_parsed_it(request, split):
    """What the upstream reads is what the proxy routed: one parse, two parsers, no disagreement."""
    raw, body = request
    try:
        events = drain(ServerSide(), [raw[:split], raw[split:]])
    except RemoteProtocolError:
        return  # refused: nothing is forwarded
    head = events[0]
    assert b"".join(e.data for e in events if isinstance(e, Body)) == body and isinstance(events[-1], EndOfMessage)
    forwarded = http1.forwarded_request_headers(head, client_ip="10.0.0.1")
    client = ClientSide()
    try:
        wire = client.send_request(head, forwarded)
    except http1.LocalProtocolError:
        # HTTP/1.0 naming no host at all: the proxy answers 502 and forwards nothing.
        assert head.http_version == b"1.0" and head.header(b"host") is None and head.authority is None
        return
    wire += (client.send_data(body) if body else b"") + client.send_end()
    upstream = h11.Connection(h11.SERVER)
    upstream.receive_data(wire)
    seen = upstream.next_event()
    assert isinstance(seen, h11.Request)
    assert (bytes(seen.method), bytes(seen.target)) == (head.method, head.target)
    host_first = sorted(forwarded, key=lambda n_v: n_v[0].lower() != b"host")  # h11 writes Host first
    assert [(bytes(n), bytes(v)) for n, v in seen.headers.raw_items()] == host_first
    received = b""
    while isinstance(event := upstream.next_event(), h11.Data):
        received += bytes(event.data)
    assert isinstance(event, h11.EndOfMessage) and received == body
    assert upstream.trailing_data == (b"", False)
    # The upstream reads the host the proxy routed on.
    upstream_host = next(bytes(v) for n, v in seen.headers.raw_items() if bytes(n).lower() == b"host")
    assert http1.valid_host(upstream_host) and http1._split_host(upstream_host) == head.host


# -- X-Request-Id and Content-Length (the transport passes randomness in) --------


def _head(extra: bytes = b"") -> RequestHead:
    return drain(ServerSide(), [b"POST / HTTP/1.1\r\nHost: a\r\n" + extra + b"\r\n"])[0]


@pytest.mark.parametrize("value, valid", [
    (b"f81d4fae-7dec-11d0-a765-00a0c91e6bf6", True),
    (b"0" * 128, True),
    (b"a:b+c/d=e_f.g-h", True),
    (b"0" * 129, False),
    (b"", False),
    (b"a b", False),
    (b"a,b", False),
    (b"caf\xc3\xa9", False),
    (b"<script>", False),
    (b'a"b', False),
])
def test_valid_request_id(value, valid):
    assert http1.valid_request_id(value) is valid


def test_request_id_kept_generated_or_replaced():
    fresh = iter(["new1", "new2", "new3"]).__next__
    assert http1.request_id(_head(b"X-Request-Id: abc-123\r\n"), fresh) == ("abc-123", http1.KEPT)
    assert http1.request_id(_head(), fresh) == ("new1", http1.GENERATED)
    assert http1.request_id(_head(b"X-Request-Id: a b\r\n"), fresh) == ("new2", http1.REPLACED)
    # two headers, each valid alone: ambiguous, so replaced
    assert http1.request_id(_head(b"X-Request-Id: a\r\nx-request-id: b\r\n"), fresh) == ("new3", http1.REPLACED)


def test_forwarded_request_headers_carry_exactly_one_request_id():
    head = _head(b"X-Request-Id: a\r\nX-Request-Id: b b\r\n")
    headers = http1.forwarded_request_headers(head, client_ip="127.0.0.1", request_id="0123abcd")
    assert [v for n, v in headers if n.lower() == b"x-request-id"] == [b"0123abcd"]
    untouched = http1.forwarded_request_headers(head, client_ip="127.0.0.1")
    assert [v for n, v in untouched if n.lower() == b"x-request-id"] == [b"a", b"b b"]


def test_content_length_of_a_request():
    assert http1.content_length(_head(b"Content-Length: 42\r\n")) == 42
    assert http1.content_length(_head(b"Content-Length: 0\r\n")) == 0
    assert http1.content_length(_head(b"Transfer-Encoding: chunked\r\n")) is None
    assert http1.content_length(_head()) is None


def test_client_side_reports_the_upstreams_trailers_and_sends_request_trailers_only_chunked():
    from edgeproxy.errors import LocalProtocolError

    chunked = drain(ServerSide(), [b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"])[0]
    client = ClientSide()
    out = client.send_request(chunked, [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")])
    out += client.send_data(b"abc") + client.send_end([(b"X-Sum", b"1")])
    assert out.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n")
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nGrpc-Status: 0\r\n\r\n"
    for chunks in every_split(response):
        client = ClientSide()
        client.send_request(chunked, [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")])
        client.send_end()
        events = normalize(drain(client, chunks))
        assert events[1:] == [Body(b"ok"), EndOfMessage(((b"Grpc-Status", b"0"),))]
    sized = drain(ServerSide(), [b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n"])[0]
    client = ClientSide()
    client.send_request(sized, [(b"Host", b"a"), (b"Content-Length", b"3")])
    client.send_data(b"abc")
    with pytest.raises(LocalProtocolError):
        client.send_end([(b"X-Sum", b"1")])

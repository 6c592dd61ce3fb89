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

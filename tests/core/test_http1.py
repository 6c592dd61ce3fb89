"""Sans-IO tests of the HTTP/1.1 sides: bytes in, events and bytes out, split at every offset."""

from __future__ import annotations

import pytest

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
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
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

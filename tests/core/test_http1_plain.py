"""The upstream client's fast path for body-less GET/HEAD gives what h11 gives, byte for byte and event for event.

`ClientSide` writes a plain GET or HEAD itself and parses a plain response
itself (`plain_request`, `parse_plain_response`); everything else is replayed
into h11.  Each case here runs through `ClientSide` and through h11 alone (the
reference), fed whole and split at every offset, with EOF where the case has
one, and must come out the same: the bytes written, the events (or the error),
and whether the connection may be reused.
"""

from __future__ import annotations

import h11
import pytest

from edgeproxy.core import http1
from edgeproxy.core.http1 import Body, ClientSide, EndOfMessage, RequestHead, ResponseHead
from edgeproxy.errors import LocalProtocolError, RemoteProtocolError
from tests.core.test_http1 import normalize

HEADERS = [(b"Host", b"up:80"), (b"User-Agent", b"x/1"), (b"X-Forwarded-For", b"10.0.0.1")]

RESPONSES = {
    "plain": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
    "keep-alive said": b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
    "no reason": b"HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n",
    "close": b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    "204": b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
    "304 with a length": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nETag: \"v\"\r\n\r\n",
    "informational first": b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
    "until close": b"HTTP/1.1 200 OK\r\n\r\nall of it",
    "http/1.0": b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "bare LF": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "two lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    "bad length": b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    "bad field": b"HTTP/1.1 200 OK\r\nBad Name: 1\r\nContent-Length: 2\r\n\r\nok",
    "folded field": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  more\r\nContent-Length: 2\r\n\r\nok",
    "garbage": b"SSH-2.0-OpenSSH\r\n\r\n",
    "eof before the head": b"HTTP/1.1 200 OK\r\nContent-Le",
    "eof in the body": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    "nothing": b"",
}
#: cases that end with the upstream's EOF
EOF_CASES = {"until close", "eof before the head", "eof in the body", "nothing", "close"}


def _head(method: bytes, target: bytes = b"/p?q=1") -> RequestHead:
    return RequestHead(method=method, target=target, http_version=b"1.1", headers=list(HEADERS), host="up",
                       path="/p", has_body=False)


def _outcome(events_of, feed, chunks, eof):
    events = []
    try:
        for chunk in chunks:
            if chunk:
                feed(chunk)
                events += events_of()
        if eof:
            feed(b"")
            events += events_of()
    except RemoteProtocolError as exc:
        return normalize(events), "RemoteProtocolError", str(exc).split(":")[0]
    return normalize(events), None, None


def _drain(side_next):
    def events():
        out = []
        for _ in range(1000):
            event = side_next()
            if event is http1.NEED_DATA or event is http1.PAUSED:
                break
            out.append(event)
            if isinstance(event, (EndOfMessage, http1.ConnectionClosed)):
                break
        return out
    return events


def run_client_side(method, response, chunks, eof):
    client = ClientSide()
    wrote = client.send_request(_head(method), list(HEADERS)) + client.send_end()
    outcome = _outcome(_drain(client.next_event), client.receive_data, chunks, eof)
    return wrote, outcome, client.reusable if outcome[1] is None else None


def run_h11(method, response, chunks, eof):
    conn = h11.Connection(h11.CLIENT)
    wrote = conn.send(h11.Request(method=method, target=b"/p?q=1", headers=list(HEADERS))) + conn.send(h11.EndOfMessage())

    def next_event():
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise RemoteProtocolError(f"invalid response from upstream: {exc}") from None
        if event is h11.NEED_DATA:
            return http1.NEED_DATA
        if event is h11.PAUSED:
            return http1.PAUSED
        if isinstance(event, h11.Data):
            return Body(bytes(event.data))
        if isinstance(event, (h11.Response, h11.InformationalResponse)):
            return ResponseHead(event.status_code, bytes(event.reason), bytes(event.http_version),
                                [(bytes(n), bytes(v)) for n, v in event.headers.raw_items()])
        if isinstance(event, h11.EndOfMessage):
            trailers = tuple((bytes(n), bytes(v)) for n, v in event.headers.raw_items())
            return EndOfMessage(trailers) if trailers else EndOfMessage()
        return http1.ConnectionClosed()

    outcome = _outcome(_drain(next_event), conn.receive_data, chunks, eof)
    reusable = conn.our_state is h11.DONE and conn.their_state is h11.DONE if outcome[1] is None else None
    return wrote, outcome, reusable


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
@pytest.mark.parametrize("case", sorted(RESPONSES))
def test_the_fast_path_matches_h11_at_every_split(case, method):
    response = RESPONSES[case]
    eof = case in EOF_CASES
    for i in range(len(response) + 1):
        chunks = [response[:i], response[i:]]
        wrote, outcome, reusable = run_h11(method, response, chunks, eof)
        plain = http1.parse_plain_response(response, method)
        if plain is not None and len(response) > plain[1] + plain[2] and reusable:
            reusable = False  # stray bytes after the response: see the test below
        assert run_client_side(method, response, chunks, eof) == (wrote, outcome, reusable), (case, i)


def test_bytes_after_the_response_keep_the_connection_out_of_the_pool():
    # h11 would call this connection reusable and read the stray bytes as the next response
    # (a later request's client would get a 502): the one place the fast path differs.
    client = ClientSide()
    client.send_request(_head(b"GET"), list(HEADERS))
    client.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokSTRAY")
    events = _drain(client.next_event)()
    assert events[1:] == [Body(b"ok"), EndOfMessage()]
    assert not client.reusable


def test_a_pooled_connection_takes_fast_and_h11_exchanges_in_turn():
    client = ClientSide()
    for method, body in [(b"GET", None), (b"POST", b"abc"), (b"GET", None), (b"GET", None)]:
        head = _head(method)
        head.has_body = body is not None
        headers = list(HEADERS) + ([(b"Content-Length", b"3")] if body else [])
        wrote = client.send_request(head, headers)
        if body:
            wrote += client.send_data(body)
        wrote += client.send_end()
        assert wrote.startswith(method + b" /p?q=1 HTTP/1.1\r\nHost: up:80\r\n")
        client.receive_data(RESPONSES["plain"])
        assert normalize(_drain(client.next_event)())[1:] == [Body(b"hello"), EndOfMessage()]
        assert client.reusable
        client.start_next_cycle()


@pytest.mark.parametrize("headers", [
    [(b"Host", b"a"), (b"Bad Name", b"1")],          # not a token
    [(b"Host", b"a"), (b"X", b"line\r\nbreak")],     # not a field value
    [(b"X", b"no host")],
    [(b"Host", b"a"), (b"Host", b"b")],
])
def test_requests_h11_would_refuse_are_still_refused(headers):
    with pytest.raises(LocalProtocolError):
        ClientSide().send_request(_head(b"GET"), headers)
    assert http1.plain_request(b"GET", b"/", headers) is None


def test_a_body_or_trailers_the_plain_request_did_not_announce_are_refused_as_h11_refuses_them():
    client = ClientSide()
    client.send_request(_head(b"GET"), list(HEADERS))
    with pytest.raises(LocalProtocolError):
        client.send_data(b"x")
    client = ClientSide()
    client.send_request(_head(b"GET"), list(HEADERS))
    with pytest.raises(LocalProtocolError):
        client.send_end([(b"X-T", b"1")])

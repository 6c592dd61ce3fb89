"""HTTP/2 streams sharing one connection: the connection window shared out fairly, and trailers both ways.

Real upstreams (the aiohttp backend, a raw HTTP/1.1 one for byte-exact trailers)
behind an h2c listener; the clients are h2 driven by hand (to hold the windows)
and httpx.
"""

from __future__ import annotations

import h2.events
import h2.settings

from tests.integration.test_http2_hostile import H2C, Client, _eventually

MiB = 1024 * 1024


def _connection(p):
    from edgeproxy.transport.http2 import Http2Connection
    (conn,) = [c for c in p.server.connections if isinstance(c, Http2Connection)]
    return conn


def _data(client: Client, sid: int) -> int:
    return sum(e.flow_controlled_length for e in client.events
               if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)


async def test_a_small_response_finishes_while_a_large_one_waits_on_the_connection_window(http_backend, proxy):
    p = await proxy(http_backend, listeners=H2C)
    # Stream windows of 16 MiB: only the connection window (65535, opened by hand below) binds.
    client = await Client.open(p.port, {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16 * MiB})
    await client.until(lambda e: isinstance(e, h2.events.SettingsAcknowledged))
    big = client.request(f"/stream?size={4 * MiB}")
    await client.until(lambda e: _data(client, big) >= 65535)
    conn = _connection(p)
    assert await _eventually(lambda: conn.h2.buffered(big) > 0)  # more of it queued behind the window
    small = client.request("/head")
    await client.until(lambda e: isinstance(e, h2.events.ResponseReceived) and e.stream_id == small)
    assert await _eventually(lambda: conn.h2.buffered(small) == 1234)
    # The client reads on and opens the connection window by two frames' worth.
    client.h2.increment_flow_control_window(16384)
    client.h2.increment_flow_control_window(16384)
    client.flush()
    ended = await client.until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == small)
    assert ended is not None
    assert _data(client, small) == 1234
    assert not any(isinstance(e, h2.events.StreamEnded) and e.stream_id == big for e in client.events)
    assert _data(client, big) <= 65535 + 2 * 16384
    assert conn.h2.buffered(big) > 0  # still blocked on the client's window
    client.close()


# -- trailers ------------------------------------------------------------------------

GRPC_LIKE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\nTransfer-Encoding: chunked\r\n"
             b"Trailer: grpc-status, grpc-message\r\n\r\n"
             b"5\r\nhello\r\n0\r\ngrpc-status: 0\r\ngrpc-message: fine\r\n\r\n")


def _stream_events(client: Client, sid: int, kind) -> list:
    return [e for e in client.events if isinstance(e, kind) and e.stream_id == sid]


async def _ended(client: Client, sid: int) -> None:
    event = await client.until(lambda e: isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))
                               and e.stream_id == sid)
    assert isinstance(event, h2.events.StreamEnded), event


async def test_upstream_trailers_reach_a_client_that_sent_te_trailers(raw_backend, proxy):
    backend = await raw_backend(raw_backend.mini_http(GRPC_LIKE))
    p = await proxy(backend, listeners=H2C)
    client = await Client.open(p.port)
    sid = client.request("/rpc", extra=[(b"te", b"trailers")])
    await _ended(client, sid)
    (head,) = _stream_events(client, sid, h2.events.ResponseReceived)
    assert dict(head.headers)[b":status"] == b"200"
    assert b"".join(e.data for e in _stream_events(client, sid, h2.events.DataReceived)) == b"hello"
    (trailers,) = _stream_events(client, sid, h2.events.TrailersReceived)
    assert trailers.headers == [(b"grpc-status", b"0"), (b"grpc-message", b"fine")]
    assert trailers.stream_ended is not None  # the trailing HEADERS frame carried END_STREAM
    # The upstream was told this hop takes trailers too.
    _, headers, _ = backend.requests[0]
    assert (b"TE", b"trailers") in headers and (b"Connection", b"TE") in headers
    # Without te: trailers, the same response arrives without them.
    sid = client.request("/rpc")
    await _ended(client, sid)
    assert b"".join(e.data for e in _stream_events(client, sid, h2.events.DataReceived)) == b"hello"
    assert not _stream_events(client, sid, h2.events.TrailersReceived)
    _, headers, _ = backend.requests[1]
    assert not any(name.lower() == b"te" for name, _ in headers)
    client.close()


def _post(client: Client, extra=()) -> int:
    sid = client.h2.get_next_available_stream_id()
    client.h2.send_headers(sid, [(b":method", b"POST"), (b":path", b"/up"), (b":scheme", b"http"),
                                 (b":authority", b"localhost"), *extra])
    client.h2.send_data(sid, b"abc")
    client.h2.send_headers(sid, [(b"x-checksum", b"900150983cd2")], end_stream=True)  # trailers
    client.flush()
    return sid


async def test_request_trailers_go_upstream_after_the_chunked_body(raw_backend, proxy):
    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(backend, listeners=H2C)
    client = await Client.open(p.port)
    sid = _post(client)
    await _ended(client, sid)
    assert dict(_stream_events(client, sid, h2.events.ResponseReceived)[0].headers)[b":status"] == b"200"
    _, headers, body = backend.requests[0]
    assert (b"Transfer-Encoding", b"chunked") in headers and body == b"abc"
    assert b"\r\n\r\n3\r\nabc\r\n0\r\nx-checksum: 900150983cd2\r\n\r\n" in backend.received
    client.close()


async def test_request_trailers_on_a_body_with_content_length_are_refused(raw_backend, proxy):
    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(backend, listeners=H2C)
    client = await Client.open(p.port)
    sid = _post(client, [(b"content-length", b"3")])
    await _ended(client, sid)
    status, body = await client.response(sid)
    assert status == 400 and b"trailers" in body and b"Content-Length" in body
    assert b"x-checksum" not in backend.received
    # The connection goes on.
    sid = client.request("/ok")
    assert (await client.response(sid))[0] == 200
    client.close()

"""Errors answered by the proxy itself: small, clear responses; 400s close the connection."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest


async def _assert_backend_clean_then_usable(backend, p, raw_conn) -> None:
    """Nothing reached the backend; a well-formed request afterwards does (so it was reachable)."""
    await asyncio.sleep(0.2)
    assert backend.received == b"", f"backend received {backend.received[:300]!r}"
    assert backend.requests == []
    c = await raw_conn(p.port)
    await c.send(b"GET /fine HTTP/1.1\r\nHost: h\r\n\r\n")
    r = await c.read_response()
    assert (r.status, r.body) == (200, b"ok")
    assert [line for line, _, _ in backend.requests] == [b"GET /fine HTTP/1.1"]


# ------------------------------------------------------------------------ routing


async def test_no_route_404(http_backend, proxy, raw_conn):
    p = await proxy(
        upstreams=[{"name": "app", "servers": [f"127.0.0.1:{http_backend.port}"]}],
        routes=[{"host": "only.example", "path_prefix": "/", "upstream": "app"}],
    )
    c = await raw_conn(p.port)
    await c.send(b"GET /status/200 HTTP/1.1\r\nHost: other.example\r\n\r\n")
    r = await c.read_response()
    assert r.status == 404
    assert len(r.body) < 4096
    assert http_backend.requests == []
    # the same connection still works for a routed host (a 404 is not a protocol error)
    await c.send(b"GET /status/200 HTTP/1.1\r\nHost: only.example\r\n\r\n")
    r = await c.read_response()
    assert (r.status, r.body) == (200, b"status 200\n")


async def test_no_route_404_with_body_does_not_desync(http_backend, proxy, raw_conn):
    p = await proxy(
        upstreams=[{"name": "app", "servers": [f"127.0.0.1:{http_backend.port}"]}],
        routes=[{"host": "only.example", "path_prefix": "/", "upstream": "app"}],
    )
    c = await raw_conn(p.port)
    # the body looks like a request: it must never be parsed as one
    body = b"GET /status/201 HTTP/1.1\r\nHost: only.example\r\n\r\n"
    await c.send(b"POST /x HTTP/1.1\r\nHost: nowhere\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    r = await c.read_response()
    assert r.status == 404
    try:
        more = await asyncio.wait_for(c.reader.read(65536), 1.0)
    except (asyncio.TimeoutError, ConnectionResetError):
        more = b""
    assert b"201" not in more
    assert http_backend.requests == []


# ------------------------------------------------------------------- upstream down


async def test_upstream_refused_502(proxy, raw_conn, refused_port):
    p = await proxy(refused_port, upstream={"connect_timeout": 2.0})
    c = await raw_conn(p.port)
    t0 = time.monotonic()
    await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    r = await c.read_response()
    assert r.status == 502
    assert len(r.body) < 4096
    assert time.monotonic() - t0 < 2.0


async def test_upstream_refused_502_via_aiohttp(proxy, refused_port):
    import aiohttp

    p = await proxy(refused_port)
    async with aiohttp.ClientSession() as s:
        async with s.post(p.url("/x"), data=b"payload" * 1000) as r:
            assert r.status == 502


@pytest.mark.parametrize("dead_server", ["refused_port", "stalled_port"])
async def test_next_server_used_when_first_refuses_or_times_out(http_backend, proxy, raw_conn, request, dead_server):
    dead = request.getfixturevalue(dead_server)
    p = await proxy(dead, http_backend, upstream={"connect_timeout": 0.3})
    for _ in range(4):  # round robin starts on each server twice
        c = await raw_conn(p.port)
        await c.send(b"GET /status/200 HTTP/1.1\r\nHost: h\r\n\r\n")
        r = await c.read_response()
        assert r.status == 200


async def test_upstream_that_never_accepts_is_504_after_connect_timeout(proxy, raw_conn, stalled_port):
    p = await proxy(stalled_port, upstream={"connect_timeout": 0.4})
    c = await raw_conn(p.port)
    t0 = time.monotonic()
    await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    r = await c.read_response()
    elapsed = time.monotonic() - t0
    assert r.status == 504
    assert b"timeout" in r.body
    assert 0.35 <= elapsed < 2.5  # the shared tick enforces it, a tick late at most


async def test_client_leaving_during_a_hanging_connect_is_freed_by_the_timeout(proxy, raw_conn, stalled_port):
    # Reading is paused while a request is in flight (pipelined requests wait
    # unread), so the client's FIN is seen when the connect attempt ends.
    p = await proxy(stalled_port, upstream={"connect_timeout": 0.5})
    c = await raw_conn(p.port)
    await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    await asyncio.sleep(0.1)
    c.close()
    for _ in range(150):
        if not p.server.connections:
            break
        await asyncio.sleep(0.02)
    assert not p.server.connections
    tasks = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "ClientConnection._connect"]
    assert tasks == []


@pytest.mark.timeout(15)
async def test_upstream_silent_504_after_read_timeout(proxy, raw_backend, raw_conn):
    hole = await raw_backend(raw_backend.blackhole())
    p = await proxy(hole, upstream={"read_timeout": 0.5})
    c = await raw_conn(p.port)
    t0 = time.monotonic()
    await c.send(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
    r = await c.read_response(timeout=5)
    elapsed = time.monotonic() - t0
    assert r.status == 504
    assert 0.4 <= elapsed < 3.0, f"504 after {elapsed:.2f}s, read_timeout is 0.5s"
    assert b"GET /slow" in hole.received


@pytest.mark.timeout(15)
async def test_slow_aiohttp_backend_504(http_backend, proxy, raw_conn):
    p = await proxy(http_backend, upstream={"read_timeout": 0.5})
    c = await raw_conn(p.port)
    await c.send(b"GET /slow?delay=3 HTTP/1.1\r\nHost: h\r\n\r\n")
    r = await c.read_response(timeout=5)
    assert r.status == 504
    # and a fast request on a new connection is fine
    c2 = await raw_conn(p.port)
    await c2.send(b"GET /slow?delay=0.1&id=ok HTTP/1.1\r\nHost: h\r\n\r\n")
    r = await c2.read_response()
    assert (r.status, r.body) == (200, b"slow ok")


async def test_upstream_closing_mid_response_is_not_a_complete_response(proxy, raw_backend, raw_conn):
    """Content-Length promises 100 bytes, the upstream sends 10 and closes: the client must not
    see a well-framed complete response (the proxy aborts/closes the client connection)."""

    async def short(conn, reader, writer):
        buf = bytearray()
        await raw_backend.read_head(conn, reader, buf)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()

    backend = await raw_backend(short)
    p = await proxy(backend)
    c = await raw_conn(p.port)
    await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    data = await c.read_all(timeout=5)
    assert data.startswith(b"HTTP/1.1 200")
    head, _, body = data.partition(b"\r\n\r\n")
    assert body == b"0123456789"  # what arrived is relayed, and then the connection ends short


# ---------------------------------------------------------------- malformed input

MALFORMED_REQUEST_LINES = {
    "garbage": b"GARBAGE\r\n\r\n",
    "no-version": b"GET /\r\nHost: h\r\n\r\n",
    "bad-version": b"GET / HTTX/1.1\r\nHost: h\r\n\r\n",
    "spaces-in-method": b"G E T / HTTP/1.1\r\nHost: h\r\n\r\n",
    "too-many-parts": b"GET / / HTTP/1.1\r\nHost: h\r\n\r\n",
    "tls-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n",
    "nul-in-target": b"GET /a\x00b HTTP/1.1\r\nHost: h\r\n\r\n",
    "header-without-colon": b"GET / HTTP/1.1\r\nHost: h\r\nNoColonHere\r\n\r\n",
    # RFC 9112 3.2: a 1.1 request without Host, or with more than one, MUST get a 400
    "missing-host": b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
}


@pytest.mark.parametrize("case", list(MALFORMED_REQUEST_LINES))
async def test_malformed_request_400_and_close(case, proxy, raw_backend, raw_conn):
    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(backend)
    c = await raw_conn(p.port)
    await c.send(MALFORMED_REQUEST_LINES[case])
    r = await c.read_response()
    assert r.status == 400
    assert len(r.body) < 4096
    await c.expect_closed()
    await _assert_backend_clean_then_usable(backend, p, raw_conn)


SMUGGLING = {
    # RFC 9112 6.1: a request with both must be treated as an error (we require 400 + close)
    "cl-and-te": (
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 45\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
    ),
    "te-and-cl": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
    ),
    "two-differing-cl": (
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nContent-Length: 38\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
    ),
    "cl-list-differing": (
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0, 38\r\n\r\n" b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
    ),
    "obs-fold": (
        b"POST / HTTP/1.1\r\nHost: h\r\nX-Folded: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 38\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
    ),
    "obs-fold-tab": (b"GET / HTTP/1.1\r\nHost: h\r\nX-Folded: a\r\n\tcontinued\r\n\r\n"),
    "bad-chunk-size": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
    ),
    "space-before-colon": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\nContent-Length: 38\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
    ),
    "non-numeric-cl": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1e3\r\n\r\n",
    "negative-cl": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
}


@pytest.mark.parametrize("case", list(SMUGGLING))
async def test_smuggling_shapes_rejected_and_never_reach_backend(case, proxy, raw_backend, raw_conn):
    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(backend)
    c = await raw_conn(p.port)
    await c.send(SMUGGLING[case])  # one write: the whole attack is in the proxy's hands at once
    r = await c.read_response()
    assert r.status == 400, r.head
    assert len(r.body) < 4096
    await c.expect_closed()
    await _assert_backend_clean_then_usable(backend, p, raw_conn)


async def test_bad_chunk_size_after_valid_chunk(proxy, raw_backend, raw_conn):
    """The body turns bad after a valid chunk: still 400 + close, and no complete request upstream."""
    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(backend)
    c = await raw_conn(p.port)
    await c.send(
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n"
    )
    r = await c.read_response()
    assert r.status == 400, r.head
    await c.expect_closed()
    await _assert_backend_clean_then_usable(backend, p, raw_conn)


async def test_header_block_over_max_header_size_431(proxy, raw_backend, raw_conn):
    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(backend, http={"max_header_size": 4096})
    c = await raw_conn(p.port)
    await c.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n")
    r = await c.read_response()
    assert r.status == 431
    assert len(r.body) < 4096
    await asyncio.sleep(0.2)
    assert backend.received == b""
    # just under the limit is fine
    c2 = await raw_conn(p.port)
    await c2.send(b"GET /fine HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n")
    r = await c2.read_response()
    assert (r.status, r.body) == (200, b"ok")


async def test_many_headers_over_max_header_size_431(proxy, raw_backend, raw_conn):
    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(backend, http={"max_header_size": 4096})
    c = await raw_conn(p.port)
    head = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(1000)) + b"\r\n"
    await c.send(head)
    r = await c.read_response()
    assert r.status == 431
    assert backend.received == b""


async def test_oversized_head_sent_slowly_still_431(proxy, raw_backend):
    """A client that never finishes its header block is cut off at max_header_size, not buffered forever."""
    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(backend, http={"max_header_size": 4096})
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (p.host, p.port)), 5)
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: h\r\n")
        for _ in range(40):  # 40 x ~510 bytes = 20 KiB, never a blank line
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, b"X-Slow: " + b"b" * 500 + b"\r\n"), 5)
            except (ConnectionResetError, BrokenPipeError):
                break
            await asyncio.sleep(0.005)
        received = bytearray()
        for _ in range(1000):
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    finally:
        sock.close()
    assert received.startswith(b"HTTP/1.1 431 "), bytes(received[:200])
    assert backend.received == b""


@pytest.mark.timeout(15)
async def test_header_timeout_closes_idle_partial_request(proxy, raw_backend, raw_conn):
    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(backend, http={"header_timeout": 0.5})
    c = await raw_conn(p.port)
    t0 = time.monotonic()
    await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n")  # never finished
    data = await c.read_all(timeout=5)
    elapsed = time.monotonic() - t0
    assert elapsed < 3.0
    if data:
        assert data.startswith(b"HTTP/1.1 408"), data[:100]
    assert backend.received == b""


@pytest.mark.timeout(20)
async def test_400_reaches_a_client_that_is_still_sending(proxy, raw_backend, raw_conn):
    """After a 400 the proxy half-closes and drains, so a client still uploading reads the
    answer instead of a reset (a lingering close, as nginx does)."""
    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(backend)
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 8000000\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head)

        async def keep_sending():
            try:
                for _ in range(200):  # bounded: 200 x 40 KiB
                    writer.write(b"x" * 40960)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass

        sender = asyncio.create_task(keep_sending())
        await asyncio.sleep(0.05)
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert response.startswith(b"HTTP/1.1 400 "), response
        sender.cancel()
        writer.transport.abort()
    await _assert_backend_clean_then_usable(backend, p, raw_conn)

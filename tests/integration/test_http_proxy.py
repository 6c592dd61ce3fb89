"""HTTP/1.1 through the proxy, end to end, with aiohttp clients/backends and raw sockets."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import aiohttp
import pytest

MiB = 1024 * 1024

HOP_BY_HOP = ["connection", "keep-alive", "te", "proxy-connection", "upgrade", "transfer-encoding", "trailer"]


def _session(**kw) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), auto_decompress=False, **kw)


def _names(headers) -> set[str]:
    return {k.lower() for k, _ in headers}


# ----------------------------------------------------------------------- basics


async def test_get_and_post_through_aiohttp(http_backend, proxy):
    p = await proxy(http_backend)
    async with _session() as s:
        async with s.get(p.url("/headers?x=1")) as r:
            assert r.status == 200
            data = await r.json()
        assert data["method"] == "GET"
        assert data["path"] == "/headers?x=1"
        async with s.post(p.url("/echo"), data=b"hello body", headers={"Content-Type": "text/x-test"}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/x-test"
            assert await r.read() == b"hello body"
        async with s.get(p.url("/status/418")) as r:
            assert r.status == 418
            assert r.headers["X-Backend-Status"] == "418"
            assert await r.read() == b"status 418\n"


async def test_raw_request_target_forwarded_unchanged(http_backend, proxy, raw_conn):
    p = await proxy(http_backend)
    c = await raw_conn(p.port)
    for target in ["/headers?y=%2F&z=a%20b", "/headers/../headers", "/%68eaders", "/headers;p?q=%E2%82%AC"]:
        await c.send(f"GET {target} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        r = await c.read_response()
        if r.status == 200:
            assert r.json()["path"] == target
        else:
            # aiohttp did not route the odd path; the proxy must still have forwarded it byte for byte
            assert http_backend.requests[-1].path == target


@pytest.mark.parametrize("code", [200, 201, 301, 400, 404, 500, 503])
async def test_custom_status_passes_through(code, http_backend, proxy, raw_conn):
    p = await proxy(http_backend)
    c = await raw_conn(p.port)
    await c.send(f"GET /status/{code} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    r = await c.read_response()
    assert r.status == code
    assert r.body == f"status {code}\n".encode()


@pytest.mark.timeout(30)
async def test_large_upload_content_length(http_backend, proxy, pattern):
    p = await proxy(http_backend)
    size = 8 * MiB + 17
    body = pattern.bytes(size)
    async with _session() as s:
        async with s.post(p.url("/upload"), data=body) as r:
            assert r.status == 200
            got = await r.json()
    assert got["length"] == size
    assert got["sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.timeout(30)
async def test_large_upload_chunked(http_backend, proxy, pattern):
    p = await proxy(http_backend)
    size = 6 * MiB + 5

    async def gen():
        for c in pattern.chunks(size, 100_000):  # odd chunk size on purpose
            yield c

    async with _session() as s:
        async with s.post(p.url("/upload"), data=gen()) as r:
            assert r.status == 200
            got = await r.json()
    assert got["length"] == size
    assert got["sha256"] == pattern.sha256(size)
    # the request was re-framed, not forwarded with conflicting framing
    assert not (got["transfer_encoding"] and got["content_length"])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_large_download(chunked, http_backend, proxy, pattern):
    p = await proxy(http_backend)
    size = 12 * MiB + 3
    q = f"/stream?size={size}&chunked={int(chunked)}&chunk=50000"
    async with _session() as s:
        async with s.get(p.url(q)) as r:
            assert r.status == 200
            if not chunked:
                assert r.headers["Content-Length"] == str(size)
            h = hashlib.sha256()
            n = 0
            async for c in r.content.iter_chunked(256 * 1024):
                h.update(c)
                n += len(c)
    assert n == size
    assert h.hexdigest() == pattern.sha256(size)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunked_reply", [False, True], ids=["cl-reply", "chunked-reply"])
async def test_large_echo_both_ways(chunked_reply, http_backend, proxy, pattern):
    p = await proxy(http_backend)
    body = pattern.bytes(5 * MiB + 1)
    async with _session() as s:
        async with s.put(p.url(f"/echo?chunked={int(chunked_reply)}"), data=body) as r:
            assert r.status == 200
            got = await r.read()
    assert len(got) == len(body)
    assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()


# -------------------------------------------------------------------- keep-alive


async def test_keepalive_several_requests_on_one_connection(http_backend, proxy, raw_conn):
    p = await proxy(http_backend)
    c = await raw_conn(p.port)
    for i in range(5):
        body = f"body-{i}".encode() * (i + 1)
        await c.send(
            f"POST /echo HTTP/1.1\r\nHost: ka\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        r = await c.read_response()
        assert r.status == 200
        assert r.body == body
        assert (r.header("Connection") or "").lower() != "close"
    await c.send(b"GET /headers HTTP/1.1\r\nHost: ka\r\n\r\n")
    r = await c.read_response()
    # X-Forwarded-For is not accumulated across requests on a reused connection
    assert [v for k, v in r.json()["headers"] if k.lower() == "x-forwarded-for"] == ["127.0.0.1"]


async def test_keepalive_with_aiohttp_single_connection(http_backend, proxy):
    p = await proxy(http_backend)
    conn = aiohttp.TCPConnector(limit=1, force_close=False)
    async with _session(connector=conn) as s:
        for i in range(10):
            async with s.get(p.url(f"/slow?delay=0&id={i}")) as r:
                assert r.status == 200
                assert await r.text() == f"slow {i}"


async def test_pipelined_requests_answered_in_order(http_backend, proxy, raw_conn):
    p = await proxy(http_backend)
    c = await raw_conn(p.port)
    reqs = (
        b"GET /slow?delay=0.3&id=1 HTTP/1.1\r\nHost: pipe\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: pipe\r\nContent-Length: 6\r\n\r\nsecond"
        b"GET /slow?delay=0.05&id=3 HTTP/1.1\r\nHost: pipe\r\n\r\n"
        b"HEAD /head HTTP/1.1\r\nHost: pipe\r\n\r\n"
        b"GET /slow?delay=0&id=5 HTTP/1.1\r\nHost: pipe\r\n\r\n"
    )
    await c.send(reqs)
    bodies = []
    for method in ["GET", "POST", "GET", "HEAD", "GET"]:
        r = await c.read_response(method=method)
        assert r.status == 200
        bodies.append(r.body)
    assert bodies == [b"slow 1", b"second", b"slow 3", b"", b"slow 5"]


# ---------------------------------------------------------------- header rewriting


async def test_request_hop_by_hop_stripped_and_forwarded_headers_added(http_backend, proxy, raw_conn):
    p = await proxy(http_backend)
    c = await raw_conn(p.port)
    await c.send(
        b"GET /headers HTTP/1.1\r\n"
        b"Host: original.example:8080\r\n"
        b"Connection: keep-alive, X-Secret\r\n"
        b"X-Secret: do-not-forward\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Upgrade: h2c\r\n"
        b"X-Forwarded-For: 10.1.2.3\r\n"
        b"X-End-To-End: kept\r\n"
        b"\r\n"
    )
    r = await c.read_response()
    assert r.status == 200
    data = r.json()
    fwd = data["headers"]
    names = _names(fwd)
    for h in ["connection", "keep-alive", "te", "proxy-connection", "upgrade", "x-secret"]:
        assert h not in names, f"{h} forwarded to the backend: {fwd}"
    get = lambda n: [v for k, v in fwd if k.lower() == n]  # noqa: E731
    assert get("host") == ["original.example:8080"]
    assert ", ".join(get("x-forwarded-for")) == "10.1.2.3, 127.0.0.1"
    assert get("x-forwarded-proto") == ["http"]
    assert get("x-forwarded-host") == ["original.example:8080"]
    assert get("x-end-to-end") == ["kept"]


async def test_connection_close_from_client_drops_named_header(http_backend, proxy, raw_conn):
    p = await proxy(http_backend)
    c = await raw_conn(p.port)
    await c.send(
        b"GET /headers HTTP/1.1\r\nHost: h\r\nConnection: close, X-Secret\r\nX-Secret: s\r\nX-Other: o\r\n\r\n"
    )
    r = await c.read_response()
    assert r.status == 200
    names = _names(r.json()["headers"])
    assert "x-secret" not in names
    assert "connection" not in names
    assert "x-other" in names
    await c.expect_closed()  # the client asked for close


async def test_request_transfer_encoding_reframed(http_backend, proxy, raw_conn):
    p = await proxy(http_backend)
    c = await raw_conn(p.port)
    await c.send(
        b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\n\r\n"
    )
    r = await c.read_response()
    assert r.status == 200
    assert r.body == b"hello world!"
    rec = http_backend.requests[-1]
    te = rec.header_all("Transfer-Encoding")
    cl = rec.header_all("Content-Length")
    assert not (te and cl), rec.headers
    assert te in ([], ["chunked"]) and len(cl) <= 1


async def test_response_hop_by_hop_stripped(proxy, raw_backend, raw_conn):
    backend = await raw_backend(
        raw_backend.mini_http(
            b"HTTP/1.1 200 OK\r\n"
            b"Connection: keep-alive, X-Backend-Secret\r\n"
            b"X-Backend-Secret: hidden\r\n"
            b"Keep-Alive: timeout=5, max=100\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"TE: trailers\r\n"
            b"Upgrade: foo\r\n"
            b"X-Kept: yes\r\n"
            b"Transfer-Encoding: chunked\r\n"
            b"\r\n"
            b"4\r\nabcd\r\n3;name=val\r\nefg\r\n0\r\n\r\n"
        )
    )
    p = await proxy(backend)
    c = await raw_conn(p.port)
    for _ in range(2):  # twice, to show the framing left the connection usable
        await c.send(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        r = await c.read_response()
        assert r.status == 200
        assert r.body == b"abcdefg"
        names = _names(r.headers)
        for h in ["keep-alive", "proxy-connection", "te", "upgrade", "x-backend-secret"]:
            assert h not in names, f"{h} leaked to the client: {r.head!r}"
        conn_tokens = {t.strip().lower() for v in r.header_all("Connection") for t in v.split(",")}
        assert "x-backend-secret" not in conn_tokens
        assert r.header("X-Kept") == "yes"


async def test_host_and_forwarded_headers_via_aiohttp(http_backend, proxy):
    p = await proxy(http_backend)
    async with _session() as s:
        async with s.get(p.url("/headers")) as r:
            data = await r.json()
    hdrs = {k.lower(): v for k, v in data["headers"]}
    assert hdrs["host"] == p.authority
    assert hdrs["x-forwarded-host"] == p.authority
    assert hdrs["x-forwarded-for"] == "127.0.0.1"
    assert hdrs["x-forwarded-proto"] == "http"


# ------------------------------------------------------------- bodiless responses


async def test_head_keeps_content_length_without_body(http_backend, proxy, raw_conn):
    p = await proxy(http_backend)
    c = await raw_conn(p.port)
    await c.send(b"HEAD /head HTTP/1.1\r\nHost: h\r\n\r\n")
    r = await c.read_response(method="HEAD")
    assert r.status == 200
    assert r.header("Content-Length") == "1234"
    assert r.header("X-Head") == "yes"
    # no body bytes follow: the next response on the connection parses cleanly
    await c.send(b"GET /head HTTP/1.1\r\nHost: h\r\n\r\n")
    r = await c.read_response()
    assert r.status == 200
    assert r.body == b"h" * 1234


async def test_head_via_aiohttp(http_backend, proxy):
    p = await proxy(http_backend)
    async with _session() as s:
        async with s.head(p.url("/head")) as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == "1234"
            assert await r.read() == b""


@pytest.mark.parametrize("path,code", [("/nocontent", 204), ("/notmodified", 304)])
async def test_204_and_304_have_no_body(path, code, http_backend, proxy, raw_conn):
    p = await proxy(http_backend)
    c = await raw_conn(p.port)
    extra = b"If-None-Match: \"v1\"\r\n" if code == 304 else b""
    await c.send(f"GET {path} HTTP/1.1\r\nHost: h\r\n".encode() + extra + b"\r\n")
    r = await c.read_response()
    assert r.status == code
    assert r.header("X-Kind") == str(code)
    assert not r.has("Transfer-Encoding")
    if code == 304:
        assert r.header("ETag") == '"v1"'
    await c.send(b"GET /status/200 HTTP/1.1\r\nHost: h\r\n\r\n")
    r = await c.read_response()
    assert (r.status, r.body) == (200, b"status 200\n")


async def test_expect_100_continue(http_backend, proxy, raw_conn):
    p = await proxy(http_backend)
    c = await raw_conn(p.port)
    await c.send(
        b"POST /continue HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await c.read_response(timeout=5)  # must come before we send the body
    assert interim.status == 100
    await c.send(b"hello there")
    interim_more, final = await c.read_final()
    assert all(r.status == 100 for r in interim_more)
    assert final.status == 200
    assert final.json() == {"length": 11, "body": "hello there"}
    # the connection stays usable
    await c.send(b"GET /status/200 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await c.read_response()).status == 200


async def test_expect_100_continue_via_aiohttp(http_backend, proxy):
    p = await proxy(http_backend)
    async with _session() as s:
        async with s.post(p.url("/continue"), data=b"x" * 1000, expect100=True) as r:
            assert r.status == 200
            assert (await r.json())["length"] == 1000


# ------------------------------------------------------------------------ routing


async def test_routing_by_host_and_longest_prefix(http_backend, proxy, raw_backend, raw_conn):
    other = await raw_backend(
        raw_backend.mini_http(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Who: other\r\n\r\nother")
    )
    p = await proxy(
        upstreams=[
            {"name": "main", "servers": [f"127.0.0.1:{http_backend.port}"]},
            {"name": "other", "servers": [f"127.0.0.1:{other.port}"]},
        ],
        routes=[
            {"path_prefix": "/", "upstream": "main"},
            {"path_prefix": "/api/", "upstream": "other"},
            {"path_prefix": "/api/status/", "upstream": "main"},
            {"path_prefix": "/", "host": "*.wild.test", "upstream": "other"},
            {"path_prefix": "/", "host": "exact.test", "upstream": "other"},
        ],
    )
    c = await raw_conn(p.port)

    async def who(target: str, host: str) -> str:
        await c.send(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        r = await c.read_response()
        if r.header("X-Who") == "other":
            return "other"
        assert http_backend.requests and http_backend.requests[-1].path == target
        return "main"

    assert await who("/status/200", "plain.test") == "main"
    assert await who("/api/x", "plain.test") == "other"
    assert await who("/api/status/201", "plain.test") == "main"  # longest prefix wins
    assert await who("/apix", "plain.test") == "main"
    assert await who("/status/202", "a.wild.test") == "other"
    assert await who("/status/202", "deep.a.wild.test") == "other"
    assert await who("/status/202", "exact.test:8080") == "other"  # the port is not part of the host match
    assert await who("/status/203", "EXACT.test") == "other"  # host names are case-insensitive


# ---------------------------------------------------------------------- concurrency


async def test_many_concurrent_requests(http_backend, proxy):
    p = await proxy(http_backend)
    async with _session(connector=aiohttp.TCPConnector(limit=50)) as s:

        async def one(i: int) -> None:
            body = json.dumps({"i": i, "pad": "p" * (i * 131)}).encode()
            async with s.post(p.url(f"/echo?i={i}"), data=body) as r:
                assert r.status == 200
                assert await r.read() == body

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(100))), 20)


# ------------------------------------------------------------------ framing edge cases


async def test_response_delimited_by_close_is_reframed(proxy, raw_backend, raw_conn):
    """An upstream response with neither Content-Length nor chunked ends at EOF; the client must
    still get a correctly framed response (chunked, or Content-Length, or close-delimited + close)."""

    async def eof_body(conn, reader, writer):
        buf = bytearray()
        await raw_backend.read_head(conn, reader, buf)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"until-close " * 1000)
        await writer.drain()

    backend = await raw_backend(eof_body)
    p = await proxy(backend)
    c = await raw_conn(p.port)
    await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    r = await c.read_response(timeout=5)  # reads to EOF when the proxy sends neither framing header
    assert r.status == 200
    assert r.body == b"until-close " * 1000


async def test_http10_client_gets_unchunked_response(http_backend, proxy, raw_conn, pattern):
    p = await proxy(http_backend)
    c = await raw_conn(p.port)
    await c.send(b"GET /stream?size=100000&chunked=1 HTTP/1.0\r\nHost: h\r\n\r\n")
    data = await c.read_all(timeout=5)  # HTTP/1.0 without keep-alive: the proxy closes after the response
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"200", head
    assert b"chunked" not in head.lower(), "chunked sent to an HTTP/1.0 client"
    assert body == pattern.bytes(100000)


async def test_upstream_connection_close_responses(proxy, raw_backend, raw_conn):
    """The upstream says Connection: close and closes after each response: every request still works."""

    async def one_shot(conn, reader, writer):
        buf = bytearray()
        head = await raw_backend.read_head(conn, reader, buf)
        if head is None:
            return
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 4\r\n\r\nonce")
        await writer.drain()

    backend = await raw_backend(one_shot)
    p = await proxy(backend)
    c = await raw_conn(p.port)
    for _ in range(4):
        await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        r = await c.read_response()
        assert (r.status, r.body) == (200, b"once")
    assert len(backend.connections) == 4


async def test_stale_pooled_upstream_connection_is_not_used(proxy, raw_backend, raw_conn):
    """The upstream closes an idle keep-alive connection; the next request must not get a 502."""

    async def close_when_idle(conn, reader, writer):
        buf = bytearray()
        head = await raw_backend.read_head(conn, reader, buf)
        if head is None:
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.1)  # then drop the (keep-alive) connection, as servers do when idle

    backend = await raw_backend(close_when_idle)
    p = await proxy(backend)
    for _ in range(3):
        c = await raw_conn(p.port)
        await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        r = await c.read_response()
        assert (r.status, r.body) == (200, b"ok")
        await asyncio.sleep(0.3)


async def test_response_header_split_across_writes(proxy, raw_backend, raw_conn):
    async def dribble(conn, reader, writer):
        buf = bytearray()
        await raw_backend.read_head(conn, reader, buf)
        resp = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Dribble: yes\r\n\r\nhello world"
        for i in range(len(resp)):
            writer.write(resp[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0.001)
        for _ in range(100):
            if not await reader.read(65536):
                return

    backend = await raw_backend(dribble)
    p = await proxy(backend)
    c = await raw_conn(p.port)
    await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    r = await c.read_response()
    assert (r.status, r.header("X-Dribble"), r.body) == (200, "yes", b"hello world")


async def test_request_sent_byte_by_byte(http_backend, proxy, raw_conn):
    p = await proxy(http_backend)
    c = await raw_conn(p.port)
    req = b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nabcde"
    for i in range(len(req)):
        await c.send(req[i : i + 1])
        await asyncio.sleep(0.001)
    r = await c.read_response()
    assert (r.status, r.body) == (200, b"abcde")


async def test_informational_103_before_final_response(proxy, raw_backend, raw_conn):
    async def early_hints(conn, reader, writer):
        buf = bytearray()
        await raw_backend.read_head(conn, reader, buf)
        writer.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"
        )
        await writer.drain()
        for _ in range(100):
            if not await reader.read(65536):
                return

    backend = await raw_backend(early_hints)
    p = await proxy(backend)
    c = await raw_conn(p.port)
    await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    interim, final = await c.read_final()
    assert all(r.status == 103 for r in interim)  # forwarding or dropping the 103 are both fine
    assert (final.status, final.body) == (200, b"final")


async def test_chunked_request_with_trailers(http_backend, proxy, raw_conn):
    p = await proxy(http_backend)
    c = await raw_conn(p.port)
    await c.send(
        b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    r = await c.read_response()
    assert (r.status, r.body) == (200, b"abc")
    await c.send(b"GET /status/200 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await c.read_response()).status == 200


async def test_head_to_chunked_upstream_and_304_with_length(proxy, raw_backend, raw_conn):
    """Bodiless responses whose headers announce a body (HEAD + chunked, 304 + Content-Length)."""

    async def odd(conn, reader, writer):
        buf = bytearray()
        for _ in range(10):
            head = await raw_backend.read_head(conn, reader, buf)
            if head is None:
                return
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-R: head\r\n\r\n")
            elif b"/304" in head.split(b"\r\n")[0]:
                writer.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: \"e\"\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget")
            await writer.drain()

    backend = await raw_backend(odd)
    p = await proxy(backend)
    c = await raw_conn(p.port)
    await c.send(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
    r = await c.read_response(method="HEAD")
    assert (r.status, r.header("X-R")) == (200, "head")
    await c.send(b"GET /304 HTTP/1.1\r\nHost: h\r\nIf-None-Match: \"e\"\r\n\r\n")
    r = await c.read_response()
    assert r.status == 304
    await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    r = await c.read_response()
    assert (r.status, r.body) == (200, b"get")


@pytest.mark.timeout(15)
async def test_keepalive_timeout_closes_idle_client(http_backend, proxy, raw_conn):
    p = await proxy(http_backend, http={"keepalive_timeout": 0.5})
    c = await raw_conn(p.port)
    await c.send(b"GET /status/200 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await c.read_response()).status == 200
    t0 = time.monotonic()
    await c.expect_closed(timeout=5)
    elapsed = time.monotonic() - t0
    assert 0.4 <= elapsed < 3.0, f"idle keep-alive connection closed after {elapsed:.2f}s (keepalive_timeout 0.5s)"


async def test_upstream_connections_are_pooled(proxy, raw_backend, raw_conn):
    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(backend)
    for _ in range(4):  # separate client connections, one after the other
        c = await raw_conn(p.port)
        await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (await c.read_response()).status == 200
        c.close()
    assert len(backend.requests) == 4
    assert len(backend.connections) == 1, "idle upstream connections were not reused"


async def test_pool_size_zero_disables_pooling(proxy, raw_backend, raw_conn):
    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(backend, upstream={"pool_size": 0})
    c = await raw_conn(p.port)
    for _ in range(3):
        await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (await c.read_response()).status == 200
    assert len(backend.connections) == 3
    await asyncio.sleep(0.1)
    assert all(conn.closed.is_set() for conn in backend.connections[:2])


@pytest.mark.timeout(15)
async def test_pool_idle_timeout_closes_idle_upstream(proxy, raw_backend, raw_conn):
    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(backend, upstream={"pool_idle_timeout": 0.5})
    c = await raw_conn(p.port)
    await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await c.read_response()).status == 200
    conn = backend.connections[0]
    t0 = time.monotonic()
    await asyncio.wait_for(conn.closed.wait(), 5)
    assert time.monotonic() - t0 < 3.0

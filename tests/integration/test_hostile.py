"""Hostile input, end to end: each gets the RFC's answer, and another client's session goes on.

Every test opens a *bystander* WebSocket session first and checks after the
attack that it still echoes: one connection's garbage must never affect
another's.  Requests the proxy refuses must never reach a backend (a recording
raw backend proves it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import wsproto
import wsproto.events as wse

from edgeproxy.core.frames import encode_frame, encode_header, parse_header

HOST = "127.0.0.1"
KEY = b"\x11\x22\x33\x44"
UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def bystander_ok(ws) -> None:
    stamp = f"bystander {time.monotonic()}"
    await ws.send(stamp)
    assert await asyncio.wait_for(ws.recv(), 5) == stamp


async def server_frames(conn, timeout: float = 5.0) -> tuple[list[tuple[int, bytes]], int | None]:
    """Unmasked frames from the proxy up to its close frame: ([(opcode, payload)...], close code or None).

    Parsed with the proxy's own parse_header rather than wsproto, which reports close
    codes it does not know (1014) as 1002.
    """
    buf, frames = bytearray(), []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        while (header := parse_header(buf)) is not None and len(buf) >= header[5] + header[4]:
            _, _, opcode, key, length, size = header
            assert key is None, "the proxy masked a frame to the client"
            payload = bytes(buf[size : size + length])
            del buf[: size + length]
            if opcode == 8:
                return frames, int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            frames.append((opcode, payload))
        try:
            chunk = await asyncio.wait_for(conn.reader.read(65536), timeout)
        except ConnectionResetError:
            return frames, None
        if not chunk:
            return frames, None
        buf += chunk
    raise AssertionError("no close frame in time")


async def close_code_from(conn, timeout: float = 5.0) -> int | None:
    """The code of the proxy's close frame (None: the connection ended without one)."""
    return (await server_frames(conn, timeout))[1]


# ---------------------------------------------------------------------------
# request smuggling

SMUGGLING = {
    # name: (raw request, expected status)
    "CL.TE": (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG", 400),
    "TE.CL": (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n", 400),
    "TE.TE xchunked": (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    "TE.TE space before colon": (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    "TE.TE chunked, identity": (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    "TE.TE identity, chunked + CL": (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n", 400),
    "TE.TE obs-fold": (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    "TE.TE tab-folded name": (b"POST /x HTTP/1.1\r\nHost: a\r\nX: y\r\n\tTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "duplicate Content-Length": (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde", 400),
    "Content-Length list": (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 5\r\n\r\nabcde", 400),
    "negative Content-Length": (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    "bad chunk size": (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
    "two Hosts": (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "NUL in header": (b"GET /x HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    "HTTP/0.9": (b"GET /x HTTP/0.9\r\nHost: a\r\n\r\n", 505),
    "HTTP/0.8": (b"GET /x HTTP/0.8\r\nHost: a\r\n\r\n", 505),
    "HTTP/2.0 in an HTTP/1 request line": (b"GET /x HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    "malformed version": (b"GET /x HTTP/1.01\r\nHost: a\r\n\r\n", 400),
    "absolute-form, BEL in Host": (b"GET http://a/x HTTP/1.1\r\nHost: a\x07b\r\n\r\n", 400),
    "absolute-form, HTAB in Host": (b"GET http://a/x HTTP/1.1\r\nHost: a\tb\r\n\r\n", 400),
    "absolute-form, SP in Host": (b"GET http://a/x HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    "origin-form, SP in Host": (b"GET /x HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    "userinfo in the authority": (b"GET http://u@a/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "chunk size over 63 bits": (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0008000000000000000\r\nx", 400),
}


@pytest.mark.parametrize("name", list(SMUGGLING))
async def test_request_smuggling_is_refused_and_never_forwarded(name, proxy, raw_backend, raw_conn, ws_backend, ws_connect):
    request, status = SMUGGLING[name]
    recorder = await raw_backend(raw_backend.mini_http())
    p = await proxy(upstreams=[{"name": "app", "servers": [f"{HOST}:{recorder.port}"]},
                               {"name": "ws", "servers": [f"{HOST}:{ws_backend.port}"]}],
                    routes=[{"path_prefix": "/", "upstream": "app"}, {"path_prefix": "/echo", "upstream": "ws"}])
    bystander = await ws_connect(p.ws_url("/echo"))
    c = await raw_conn(p.port)
    await c.send(request)
    resp = await c.read_response()
    assert resp.status == status, (resp.status, resp.body)
    await c.expect_closed()
    assert recorder.received == b"", "a refused request reached the backend"
    await bystander_ok(bystander)


async def test_chunk_sizes_with_leading_zeros_and_absolute_form_reach_the_backend_as_parsed(proxy, raw_backend, raw_conn):
    """The other side of hygiene: what the grammar allows is forwarded, meaning what it says."""
    recorder = await raw_backend(raw_backend.mini_http())
    p = await proxy(upstreams=[{"name": "app", "servers": [f"{HOST}:{recorder.port}"]}],
                    routes=[{"path_prefix": "/", "upstream": "app"}])
    c = await raw_conn(p.port)
    payload = bytes(range(0xE3))
    await c.send(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"000000000000000000000000000000000e3\r\n" + payload + b"\r\n" + b"0" * 40 + b"\r\n\r\n")
    assert (await c.read_response()).status == 200
    await c.send(b"GET http://Up.Example:81/y?z HTTP/1.1\r\nHost: elsewhere\r\n\r\n")
    assert (await c.read_response()).status == 200
    (first_line, _, first_body), (second_line, second_headers, _) = recorder.requests
    assert first_line == b"POST /x HTTP/1.1" and first_body == payload
    assert second_line == b"GET http://Up.Example:81/y?z HTTP/1.1"
    hosts = [v for n, v in second_headers if n.lower() == b"host"]
    assert hosts == [b"Up.Example:81"], "the upstream must read the host the request was routed on"


async def test_http_1_0_without_any_host_is_502_and_the_connection_answers(proxy, raw_backend, raw_conn):
    recorder = await raw_backend(raw_backend.mini_http())
    p = await proxy(upstreams=[{"name": "app", "servers": [f"{HOST}:{recorder.port}"]}],
                    routes=[{"path_prefix": "/", "upstream": "app"}])
    c = await raw_conn(p.port)
    await c.send(b"GET /x HTTP/1.0\r\n\r\n")
    assert (await c.read_response()).status == 502
    assert recorder.requests == []


# ---------------------------------------------------------------------------
# bad frames from the client


def client_frame(opcode, payload=b"", fin=True, rsv=0, masked=True):
    return encode_frame(opcode, payload, fin, rsv, KEY if masked else None)


BAD_CLIENT_FRAMES = {
    "unmasked": (client_frame(1, b"hi", masked=False), 1002),
    "reserved opcode 3": (client_frame(3, b"x"), 1002),
    "reserved opcode 0xB": (client_frame(0xB), 1002),
    "ping over 125": (client_frame(9, b"p" * 126), 1002),
    "close over 125": (client_frame(8, b"\x03\xe8" + b"r" * 200), 1002),
    "fragmented ping": (client_frame(9, b"p", fin=False), 1002),
    "orphan continuation": (client_frame(0, b"x"), 1002),
    "text inside fragmented": (client_frame(1, b"a", fin=False) + client_frame(1, b"b"), 1002),
    "RSV1 without deflate": (client_frame(1, b"x", rsv=4), 1002),
    "64-bit length top bit": (b"\x82\xff\x80" + bytes(7) + KEY, 1002),
    "huge declared length": (encode_header(2, 2**62, mask_key=KEY) + b"tiny", 1009),
}


@pytest.mark.parametrize("name", list(BAD_CLIENT_FRAMES))
async def test_bad_client_frames_get_the_rfc_close_code(name, ws_backend, proxy, raw_conn, ws_connect):
    frame, code = BAD_CLIENT_FRAMES[name]
    p = await proxy(ws_backend)
    bystander = await ws_connect(p.ws_url("/echo"))
    c = await raw_conn(p.port)
    await c.send(UPGRADE.format(path="/sink", host=p.authority).encode())
    assert (await c.read_response()).status == 101
    await c.send(client_frame(1, b"fine before") + frame)
    assert await close_code_from(c) == code
    records = await ws_backend.wait_records(2)
    rec = next(r for r in records if r.path == "/sink")
    await ws_backend.wait_done(rec)
    assert rec.messages == ["fine before"], "the bad frame reached the backend"
    assert rec.close_code == 1001
    await bystander_ok(bystander)


@pytest.mark.parametrize("name", ["RSV1 without deflate", "reserved opcode 3", "unmasked", "64-bit length top bit"])
@pytest.mark.parametrize("split", [False, True], ids=["one write", "header in pieces"])
async def test_a_client_that_breaks_a_rule_still_gets_the_echo_it_is_owed(name, split, ws_backend, proxy, raw_conn):
    """Autobahn 3.4 / 4.1.5: a good message and a bad frame in one write; the echo comes before the 1002.

    A strict endpoint that read the message before the bad frame answers it first; the proxy
    lets the upstream do so (DRAINING) instead of failing the connection at the bad frame.
    With the header in pieces its first byte went upstream already, which is then half-closed.
    """
    frame, code = BAD_CLIENT_FRAMES[name]
    p = await proxy(ws_backend)
    c = await raw_conn(p.port)
    await c.send(UPGRADE.format(path="/echo", host=p.authority).encode())
    assert (await c.read_response()).status == 101
    if split:
        await c.send(client_frame(1, b"fine before") + frame[:1])
        await asyncio.sleep(0.05)
        await c.send(frame[1:])
    else:
        await c.send(client_frame(1, b"fine before") + frame + client_frame(9))
    frames, got = await server_frames(c)
    assert (frames, got) == ([(1, b"fine before")], code)
    await c.expect_closed()
    (rec,) = await ws_backend.wait_records(1)
    await ws_backend.wait_done(rec)
    assert rec.messages == ["fine before"]


# ---------------------------------------------------------------------------
# bad frames from the upstream


@pytest.fixture
async def bad_upstream(raw_backend):
    """A backend that accepts the upgrade, then sends the frame named by the request path."""
    frames = {
        "/masked": encode_frame(1, b"masked by a server", mask_key=KEY),
        "/reserved": encode_frame(4, b"x"),
        "/longping": encode_frame(9, b"p" * 200),
        "/fragping": encode_frame(9, b"p", fin=False),
    }
    received = {}

    async def handler(conn, reader, writer):
        buf = bytearray()
        head = await raw_backend.read_head(conn, reader, buf)
        lines = head.split(b"\r\n")
        path = lines[0].split(b" ")[1].decode()
        key = next(v.strip() for k, _, v in (line.partition(b":") for line in lines[1:]) if k.lower() == b"sec-websocket-key")
        import base64
        import hashlib

        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + encode_frame(1, b"good first") + frames[path])
        await writer.drain()
        data = bytearray(buf)
        with contextlib.suppress(Exception):
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                data += chunk
        received[path] = bytes(data)

    backend = await raw_backend(handler)
    backend.received_by_path = received
    return backend


@pytest.mark.parametrize("path", ["/masked", "/reserved", "/longping", "/fragping"])
async def test_bad_upstream_frames_give_the_client_1014_and_the_upstream_1002(path, bad_upstream, ws_backend, proxy, raw_conn, ws_connect):
    p = await proxy(upstreams=[{"name": "bad", "servers": [f"{HOST}:{bad_upstream.port}"]},
                               {"name": "ws", "servers": [f"{HOST}:{ws_backend.port}"]}],
                    routes=[{"path_prefix": "/", "upstream": "bad"}, {"path_prefix": "/echo", "upstream": "ws"}])
    bystander = await ws_connect(p.ws_url("/echo"))
    c = await raw_conn(p.port)
    await c.send(UPGRADE.format(path=path, host=p.authority).encode())
    assert (await c.read_response()).status == 101
    frames, code = await server_frames(c)
    assert frames == [(1, b"good first")] and code == 1014
    c.close()
    assert await _wait(lambda: path in bad_upstream.received_by_path)
    to_upstream = wsproto.connection.Connection(wsproto.ConnectionType.SERVER)
    to_upstream.receive_data(bad_upstream.received_by_path[path])
    closes = [e.code for e in to_upstream.events() if isinstance(e, wse.CloseConnection)]
    assert closes == [1002]
    await bystander_ok(bystander)


async def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        await asyncio.sleep(0.02)
    return predicate()


# ---------------------------------------------------------------------------
# permessage-deflate end to end keeps RSV1 legal


async def test_permessage_deflate_end_to_end_passes_strict_mode(ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend)
    ws = await ws_connect(p.ws_url("/echo"), compression="deflate")
    assert "permessage-deflate" in (ws.response.headers.get("Sec-WebSocket-Extensions") or "")
    text = "compressible " * 500
    await ws.send(text)
    assert await asyncio.wait_for(ws.recv(), 5) == text


# ---------------------------------------------------------------------------
# slow and half-open clients


async def test_slowloris_gets_408_and_others_go_on(ws_backend, proxy, raw_conn, ws_connect):
    p = await proxy(ws_backend, http={"header_timeout": 0.6})
    bystander = await ws_connect(p.ws_url("/echo"))
    slow = [await raw_conn(p.port) for _ in range(20)]
    for c in slow:
        await c.send(b"GET / HTTP/1.1\r\nHost: a\r\n")  # and never the blank line
    for _ in range(3):
        await asyncio.sleep(0.2)
        for c in slow:
            with contextlib.suppress(ConnectionError):
                await c.send(b"X-Drip: 1\r\n")  # one header at a time, like slowloris
        await bystander_ok(bystander)
    for c in slow:
        data = await c.read_all(timeout=5)
        assert data.startswith(b"HTTP/1.1 408"), data[:60]


async def test_half_open_http_client_is_closed(ws_backend, proxy, raw_conn, ws_connect):
    p = await proxy(ws_backend)
    bystander = await ws_connect(p.ws_url("/echo"))
    c = await raw_conn(p.port)
    await c.send(b"GET / HTTP/1.1\r\nHost: a\r\n")
    c.writer.write_eof()  # the request head will never end
    data = await c.read_all(timeout=5)
    assert data.startswith(b"HTTP/1.1 400"), data[:60]
    await bystander_ok(bystander)


async def test_half_open_websocket_client_ends_the_session_with_1001(ws_backend, proxy, raw_conn, ws_connect):
    p = await proxy(ws_backend)
    bystander = await ws_connect(p.ws_url("/echo"))
    c = await raw_conn(p.port)
    await c.send(UPGRADE.format(path="/sink", host=p.authority).encode())
    assert (await c.read_response()).status == 101
    await c.send(client_frame(1, b"last words"))
    c.writer.write_eof()  # gone without a close frame, socket half-open
    rec = next(r for r in await ws_backend.wait_records(2) if r.path == "/sink")
    await ws_backend.wait_done(rec)
    assert rec.messages == ["last words"] and rec.close_code == 1001
    await c.expect_closed()
    await bystander_ok(bystander)


async def test_silent_websocket_client_is_closed_by_idle_timeout(ws_backend, proxy, raw_conn, ws_connect):
    p = await proxy(ws_backend, websocket={"idle_timeout": 0.5, "close_timeout": 0.5})
    c = await raw_conn(p.port)
    await c.send(UPGRADE.format(path="/silent", host=p.authority).encode())
    assert (await c.read_response()).status == 101
    assert await close_code_from(c) == 1001
    bystander = await ws_connect(p.ws_url("/echo"))
    await bystander_ok(bystander)

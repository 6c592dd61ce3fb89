"""WebSocket through the proxy, end to end, with real websockets clients and backends."""

from __future__ import annotations

import asyncio
import time

import pytest
import wsproto
import wsproto.connection
import wsproto.events as wse
from websockets.exceptions import ConnectionClosed, InvalidStatus

MiB = 1024 * 1024
HOST = "127.0.0.1"

SIZES = [0, 1, 125, 126, 127, 65535, 65536, MiB, 16 * MiB]


def _msg(kind: str, size: int, pattern) -> str | bytes:
    return pattern.text(size) if kind == "text" else pattern.bytes(size)


# --------------------------------------------------------------------------- echo


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", SIZES, ids=[str(s) for s in SIZES])
@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_echo_sizes_match_direct(kind, size, ws_backend, proxy, ws_connect, pattern):
    p = await proxy(ws_backend)
    msg = _msg(kind, size, pattern)

    direct = await ws_connect(ws_backend.url + "/echo")
    await direct.send(msg)
    direct_reply = await asyncio.wait_for(direct.recv(), 20)

    via = await ws_connect(p.ws_url("/echo"))
    await via.send(msg)
    proxied_reply = await asyncio.wait_for(via.recv(), 20)

    assert type(proxied_reply) is type(direct_reply) is type(msg)
    assert len(proxied_reply) == len(direct_reply) == size
    assert proxied_reply == direct_reply == msg
    await asyncio.wait_for(via.close(), 5)
    assert via.close_code == 1000


@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_fragmented_message_reassembles(kind, ws_backend, proxy, ws_connect, pattern):
    p = await proxy(ws_backend)
    ws = await ws_connect(p.ws_url("/echo"))
    sizes = [0, 1, 125, 126, 65536, 70000, 3]
    frags = [_msg(kind, n, pattern) for n in sizes]
    await ws.send(frags)  # an iterable: one frame per fragment
    reply = await asyncio.wait_for(ws.recv(), 10)
    expected = ("" if kind == "text" else b"").join(frags)
    assert reply == expected

    async def agen():
        for f in frags[::-1]:
            yield f

    await ws.send(agen())  # an async iterable, fragments sent as they come
    reply = await asyncio.wait_for(ws.recv(), 10)
    assert reply == ("" if kind == "text" else b"").join(frags[::-1])
    rec = (await ws_backend.wait_records(1))[0]
    assert rec.messages == [expected, reply]


async def test_text_fragments_split_inside_a_utf8_character(ws_backend, proxy, raw_conn, ws_raw):
    """RFC 6455 5.6: UTF-8 validity is per message, a character may straddle fragments."""
    p = await proxy(ws_backend)
    c = await raw_conn(p.port)
    key = ws_raw.key()
    await c.send(
        (
            f"GET /echo HTTP/1.1\r\nHost: {p.authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    resp = await c.read_response()
    assert resp.status == 101
    assert resp.header("Sec-WebSocket-Accept") == ws_raw.accept(key)
    text = "héllo wörld €𝄞 done"
    data = text.encode()
    cut1 = data.index("é".encode()) + 1  # inside the 2-byte é
    cut2 = data.index("𝄞".encode()) + 2  # inside the 4-byte 𝄞
    await c.send(
        ws_raw.frame(0x1, data[:cut1], fin=False)
        + ws_raw.frame(0x0, data[cut1:cut2], fin=False)
        + ws_raw.frame(0x0, data[cut2:], fin=True)
    )
    rec = (await ws_backend.wait_records(1))[0]
    assert await _wait(lambda: rec.messages, 5), "backend never got the message"
    assert rec.messages == [text]
    # The echo comes back as an unmasked text frame (possibly fragmented by the proxy).
    client = wsproto.connection.Connection(wsproto.ConnectionType.CLIENT)
    got = ""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and got != text:
        chunk = await asyncio.wait_for(c.reader.read(65536), 5)
        assert chunk, "proxy closed the connection"
        client.receive_data(chunk)
        for ev in client.events():
            assert isinstance(ev, wse.TextMessage), ev
            got += ev.data
    assert got == text


async def test_client_ping_gets_pong(ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend)
    ws = await ws_connect(p.ws_url("/echo"))
    for i in range(3):
        waiter = await ws.ping(f"ping-{i}".encode())
        latency = await asyncio.wait_for(waiter, 3)
        assert latency >= 0
    await ws.send("still works")
    assert await asyncio.wait_for(ws.recv(), 3) == "still works"


async def test_permessage_deflate_offer_does_not_corrupt_messages(ws_backend, proxy, ws_connect, pattern):
    """Whatever the proxy does with Sec-WebSocket-Extensions, messages must arrive intact."""
    p = await proxy(ws_backend)
    ws = await ws_connect(p.ws_url("/echo"), compression="deflate")
    for msg in [pattern.text(10000), pattern.bytes(200000), "x", b""]:
        await ws.send(msg)
        assert await asyncio.wait_for(ws.recv(), 5) == msg


# ----------------------------------------------------------------- handshake headers


async def test_subprotocol_negotiated_by_backend_reaches_client(ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend)
    ws = await ws_connect(p.ws_url("/echo"), subprotocols=["chat.v1", "chat.v2"])
    assert ws.subprotocol == "chat.v2"
    rec = (await ws_backend.wait_records(1))[0]
    assert rec.subprotocol == "chat.v2"
    offered = ",".join(rec.header_all("Sec-WebSocket-Protocol")).replace(" ", "")
    assert offered == "chat.v1,chat.v2"

    ws2 = await ws_connect(p.ws_url("/echo"), subprotocols=["other"])
    assert ws2.subprotocol is None
    assert ws2.response.headers.get("Sec-WebSocket-Protocol") is None


async def test_cookies_auth_and_forwarded_headers_reach_backend(ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend)
    ws = await ws_connect(
        p.ws_url("/echo?token=abc"),
        additional_headers=[
            ("Cookie", "a=1; b=two"),
            ("Authorization", "Bearer s3cr3t"),
            ("X-Custom", "kept"),
        ],
    )
    await ws.send("hi")
    assert await asyncio.wait_for(ws.recv(), 3) == "hi"
    rec = (await ws_backend.wait_records(1))[0]
    assert rec.path == "/echo?token=abc"
    assert rec.header("Cookie") == "a=1; b=two"
    assert rec.header("Authorization") == "Bearer s3cr3t"
    assert rec.header("X-Custom") == "kept"
    assert rec.header("Host") == p.authority
    assert ", ".join(rec.header_all("X-Forwarded-For")) == "127.0.0.1"
    assert rec.header("X-Forwarded-Proto") in ("http", "ws")
    assert rec.header("X-Forwarded-Host") == p.authority
    assert rec.header("Upgrade").lower() == "websocket"


async def test_forwarded_for_appended_on_upgrade(ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend)
    await ws_connect(p.ws_url("/echo"), additional_headers=[("X-Forwarded-For", "203.0.113.7")])
    rec = (await ws_backend.wait_records(1))[0]
    assert ", ".join(rec.header_all("X-Forwarded-For")) == "203.0.113.7, 127.0.0.1"


async def test_backend_set_cookie_on_101_reaches_client(ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend)
    ws = await ws_connect(p.ws_url("/cookie"))
    assert ws.response.status_code == 101
    assert ws.response.headers.get_all("Set-Cookie") == ["session=abc123; Path=/; HttpOnly"]
    assert ws.response.headers.get("X-Backend") == "cookie"
    await ws.send("ok?")
    assert await asyncio.wait_for(ws.recv(), 3) == "ok?"


# ------------------------------------------------------------------------- closing


@pytest.mark.parametrize("code,reason", [(4001, "bye"), (1000, ""), (3999, "grüße ✓")])
async def test_client_close_code_and_reason_reach_backend(code, reason, ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend)
    ws = await ws_connect(p.ws_url("/echo"))
    await ws.send("before close")
    assert await asyncio.wait_for(ws.recv(), 3) == "before close"
    await asyncio.wait_for(ws.close(code, reason), 5)
    rec = await ws_backend.wait_done((await ws_backend.wait_records(1))[0])
    assert (rec.close_code, rec.close_reason) == (code, reason)
    # the client got a real close frame back (the backend's reply echoes the code)
    assert ws.protocol.close_rcvd is not None
    assert (ws.close_code, ws.close_reason) == (code, reason)


async def test_close_frame_without_status_code(ws_backend, proxy, raw_conn, ws_raw):
    p = await proxy(ws_backend)
    c = await raw_conn(p.port)
    await c.send(_upgrade("/echo", p.authority, {"Sec-WebSocket-Key": ws_raw.key(), "Sec-WebSocket-Version": "13"}))
    assert (await c.read_response()).status == 101
    await c.send(ws_raw.frame(0x8, b""))  # a close frame with no body: "no status" (1005)
    rec = await ws_backend.wait_done((await ws_backend.wait_records(1))[0])
    assert rec.close_code == 1005
    data = await c.read_all(timeout=5)
    assert data[:1] == b"\x88", f"no close frame back: {data[:20]!r}"


async def test_backend_ping_gets_pong(ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend)
    ws = await ws_connect(p.ws_url("/ping-client"))
    assert await asyncio.wait_for(ws.recv(), 6) == "pong received"


async def test_client_gets_the_backends_own_close_reply(proxy, ws_connect):
    """The backend answers the client's close with a *different* code: the client must see that one."""
    seen: list[tuple[int, str]] = []

    async def handle(reader, writer):
        conn = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        for _ in range(1000):
            data = await reader.read(65536)
            if not data:
                break
            conn.receive_data(data)
            for ev in conn.events():
                if isinstance(ev, wse.Request):
                    writer.write(conn.send(wse.AcceptConnection()))
                elif isinstance(ev, wse.CloseConnection):
                    seen.append((ev.code, ev.reason))
                    writer.write(conn.send(wse.CloseConnection(code=4003, reason="ack from backend")))
                    await writer.drain()
                    writer.close()
                    return
                elif isinstance(ev, wse.TextMessage):
                    writer.write(conn.send(wse.Message(data=ev.data)))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    try:
        p = await proxy(server.sockets[0].getsockname()[1])
        ws = await ws_connect(p.ws_url("/any"))
        await ws.send("x")
        assert await asyncio.wait_for(ws.recv(), 3) == "x"
        await asyncio.wait_for(ws.close(4001, "bye"), 5)
        assert seen == [(4001, "bye")]
        assert ws.protocol.close_rcvd is not None
        assert (ws.close_code, ws.close_reason) == (4003, "ack from backend")
    finally:
        server.close()


async def test_backend_close_code_reaches_client(ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend)
    ws = await ws_connect(p.ws_url("/close4002"))
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.protocol.close_rcvd is not None
    assert (ws.close_code, ws.close_reason) == (4002, "server bye")
    rec = await ws_backend.wait_done((await ws_backend.wait_records(1))[0])
    assert rec.close_code == 4002  # the proxy completed the closing handshake with the backend


async def test_upstream_vanishing_gives_client_1014_or_1011(ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend)
    ws = await ws_connect(p.ws_url("/abort"))
    await ws.send("trigger")
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.protocol.close_rcvd is not None, "proxy dropped TCP without sending a close frame"
    assert ws.close_code in (1011, 1014)


async def test_upstream_refusing_upgrade_passes_status_to_client(ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend)
    with pytest.raises(InvalidStatus) as exc_info:
        await ws_connect(p.ws_url("/forbidden"))
    resp = exc_info.value.response
    assert resp.status_code == 403
    assert b"forbidden by backend" in resp.body
    assert resp.headers.get("X-Backend") == "refused"


async def test_upstream_refusing_upgrade_raw(ws_backend, proxy, raw_conn, ws_raw):
    p = await proxy(ws_backend)
    c = await raw_conn(p.port)
    await c.send(
        (
            f"GET /forbidden HTTP/1.1\r\nHost: {p.authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {ws_raw.key()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    resp = await c.read_response()
    assert resp.status == 403
    assert resp.body == b"forbidden by backend\n"


async def test_client_vanishing_gives_backend_1001(ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend)
    ws = await ws_connect(p.ws_url("/sink"))
    await ws.send("hello")
    rec = (await ws_backend.wait_records(1))[0]
    assert await _wait(lambda: rec.messages == ["hello"], 3)
    ws.transport.abort()
    await ws_backend.wait_done(rec, 5)
    assert rec.close_code == 1001, f"backend saw close code {rec.close_code} (None = no close frame)"
    # The proxy let go of the client's connection too (it once stayed half-closed).
    assert await _wait(lambda: not p.server.connections, 3)


async def test_upstream_refused_gives_502(proxy, ws_connect, refused_port):
    p = await proxy(refused_port, upstream={"connect_timeout": 2.0})
    with pytest.raises(InvalidStatus) as exc_info:
        await ws_connect(p.ws_url("/echo"))
    assert exc_info.value.response.status_code == 502


# -------------------------------------------------------------------- bad handshake


def _upgrade(path: str, host: str, extra: dict[str, str]) -> bytes:
    headers = {"Host": host, "Upgrade": "websocket", "Connection": "Upgrade"}
    headers.update(extra)
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items() if v is not None)
    return f"GET {path} HTTP/1.1\r\n{lines}\r\n".encode()


BAD_HANDSHAKES = {
    "missing-key": {"Sec-WebSocket-Version": "13"},
    "key-not-base64": {"Sec-WebSocket-Key": "this is not base64!!", "Sec-WebSocket-Version": "13"},
    "key-wrong-length": {"Sec-WebSocket-Key": "c2hvcnQ=", "Sec-WebSocket-Version": "13"},
    "version-12": {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "12"},
    "version-missing": {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},
}


@pytest.mark.parametrize("case", list(BAD_HANDSHAKES))
async def test_bad_handshake_gets_400_with_version_header(case, ws_backend, proxy, raw_conn):
    p = await proxy(ws_backend)
    c = await raw_conn(p.port)
    await c.send(_upgrade("/echo", p.authority, BAD_HANDSHAKES[case]))
    resp = await c.read_response()
    assert resp.status == 400, resp.head
    assert resp.header("Sec-WebSocket-Version") == "13", resp.head
    await asyncio.sleep(0.1)
    assert ws_backend.records == [], "a bad handshake reached the backend"


# ------------------------------------------------------------------------- limits


async def test_message_over_max_size_closes_1009_and_never_reaches_backend(ws_backend, proxy, ws_connect, pattern):
    p = await proxy(ws_backend, websocket={"max_message_size": 1024})
    ws = await ws_connect(p.ws_url("/sink"))
    await ws.send(pattern.bytes(1024))  # exactly the limit: allowed
    rec = (await ws_backend.wait_records(1))[0]
    assert await _wait(lambda: len(rec.messages) == 1, 3), "message at the limit was not delivered"
    await ws.send(pattern.bytes(2048))
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.close_code == 1009
    await ws_backend.wait_done(rec, 5)
    assert rec.messages == [pattern.bytes(1024)], "the oversized message reached the backend"


async def test_fragmented_message_over_max_size_closes_1009(ws_backend, proxy, ws_connect, pattern):
    p = await proxy(ws_backend, websocket={"max_message_size": 1024})
    ws = await ws_connect(p.ws_url("/sink"))
    await ws.send(["a" * 600, "b" * 600, "c" * 600])
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.close_code == 1009
    rec = (await ws_backend.wait_records(1))[0]
    await ws_backend.wait_done(rec, 5)
    assert rec.messages == []


@pytest.mark.timeout(20)
async def test_max_message_size_zero_means_unlimited(ws_backend, proxy, ws_connect, pattern):
    p = await proxy(ws_backend, websocket={"max_message_size": 0})
    ws = await ws_connect(p.ws_url("/echo"))
    msg = pattern.bytes(2 * MiB + 3)
    await ws.send(msg)
    assert await asyncio.wait_for(ws.recv(), 10) == msg


# ------------------------------------------------------------------------- timeouts


@pytest.mark.timeout(15)
async def test_handshake_timeout_gives_504(proxy, raw_backend, ws_connect):
    hole = await raw_backend(raw_backend.blackhole())
    p = await proxy(hole, upstream={"read_timeout": 30.0}, websocket={"handshake_timeout": 0.5})
    t0 = time.monotonic()
    with pytest.raises(InvalidStatus) as exc_info:
        await ws_connect(p.ws_url("/echo"), open_timeout=8)
    elapsed = time.monotonic() - t0
    assert exc_info.value.response.status_code == 504
    assert 0.4 <= elapsed < 3.0, f"504 after {elapsed:.2f}s, handshake_timeout is 0.5s"
    assert b"upgrade" in hole.received.lower()  # the handshake did reach the silent backend


@pytest.mark.timeout(15)
async def test_idle_session_closed_1001(ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend, websocket={"idle_timeout": 0.5})
    ws = await ws_connect(p.ws_url("/silent"))
    t0 = time.monotonic()
    await asyncio.wait_for(ws.wait_closed(), 5)
    elapsed = time.monotonic() - t0
    assert ws.protocol.close_rcvd is not None, "proxy dropped TCP without a close frame"
    assert ws.close_code == 1001
    assert 0.4 <= elapsed < 3.0, f"closed after {elapsed:.2f}s, idle_timeout is 0.5s"
    rec = (await ws_backend.wait_records(1))[0]
    await ws_backend.wait_done(rec, 5)  # the backend side is closed too


@pytest.mark.timeout(15)
async def test_active_session_is_not_idle(ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend, websocket={"idle_timeout": 0.5})
    ws = await ws_connect(p.ws_url("/echo"))
    for i in range(8):  # 8 x 0.2 s = 1.6 s, well past idle_timeout, with traffic every 0.2 s
        await ws.send(f"m{i}")
        assert await asyncio.wait_for(ws.recv(), 3) == f"m{i}"
        await asyncio.sleep(0.2)
    assert ws.protocol.close_rcvd is None


async def test_many_concurrent_sessions(ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend)

    async def session(i: int) -> None:
        ws = await ws_connect(p.ws_url(f"/echo?s={i}"))
        for j in range(5):
            msg = f"{i}:{j}:" + "x" * (i * 97)
            await ws.send(msg)
            assert await asyncio.wait_for(ws.recv(), 5) == msg
        await asyncio.wait_for(ws.close(), 5)

    await asyncio.wait_for(asyncio.gather(*(session(i) for i in range(30))), 20)
    assert len(ws_backend.records) == 30


async def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.01)
    return bool(pred())


# ------------------------------------------------------------ protocol edge cases


async def _wsproto_backend(on_event, *, greeting: list | None = None):
    """A raw wsproto backend; ``on_event(conn, event)`` returns bytes to send, or None to stop.

    ``greeting`` events are sent in the very same write as the 101 response.
    """
    state = {"closed": asyncio.Event(), "events": []}

    async def handle(reader, writer):
        conn = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        try:
            for _ in range(10000):
                data = await reader.read(65536)
                if not data:
                    break
                conn.receive_data(data)
                for ev in conn.events():
                    state["events"].append(ev)
                    if isinstance(ev, wse.Request):
                        out = conn.send(wse.AcceptConnection())
                        for g in greeting or []:
                            out += conn.send(g)
                        writer.write(out)
                        continue
                    out = on_event(conn, ev)
                    if out is None:
                        return
                    writer.write(out)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            state["closed"].set()
            writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    return server, state


async def test_frame_sent_with_the_101_is_relayed(proxy, ws_connect):
    """The backend's first message shares a TCP write with its 101: it must not be lost."""

    def echo(conn, ev):
        if isinstance(ev, wse.TextMessage):
            return conn.send(wse.Message(data=ev.data))
        if isinstance(ev, wse.CloseConnection):
            return conn.send(ev.response())
        return b""

    server, _ = await _wsproto_backend(echo, greeting=[wse.Message(data="welcome"), wse.Message(data=b"\x00\x01")])
    try:
        p = await proxy(server.sockets[0].getsockname()[1])
        ws = await ws_connect(p.ws_url("/"))
        assert await asyncio.wait_for(ws.recv(), 3) == "welcome"
        assert await asyncio.wait_for(ws.recv(), 3) == b"\x00\x01"
        await ws.send("after")
        assert await asyncio.wait_for(ws.recv(), 3) == "after"
    finally:
        server.close()


async def test_close_timeout_when_backend_ignores_close(proxy, ws_connect):
    """The backend never answers the client's close: the proxy gives up after close_timeout."""

    def ignore_close(conn, ev):
        return b""  # swallow everything, never reply to the close frame

    server, state = await _wsproto_backend(ignore_close)
    try:
        p = await proxy(server.sockets[0].getsockname()[1], websocket={"close_timeout": 0.5})
        ws = await ws_connect(p.ws_url("/"), close_timeout=10)
        t0 = time.monotonic()
        await asyncio.wait_for(ws.close(1000, "done"), 10)
        elapsed = time.monotonic() - t0
        assert elapsed < 3.0, f"client close took {elapsed:.2f}s with close_timeout 0.5s"
        await asyncio.wait_for(state["closed"].wait(), 3)  # and the proxy dropped the backend
        assert any(isinstance(e, wse.CloseConnection) and e.code == 1000 for e in state["events"])
    finally:
        server.close()


async def test_control_frames_interleaved_in_fragmented_message(ws_backend, proxy, raw_conn, ws_raw):
    p = await proxy(ws_backend)
    c = await raw_conn(p.port)
    key = ws_raw.key()
    await c.send(_upgrade("/echo", p.authority, {"Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13"}))
    assert (await c.read_response()).status == 101
    await c.send(
        ws_raw.frame(0x2, b"part1-", fin=False)
        + ws_raw.frame(0x9, b"ping-in-the-middle")
        + ws_raw.frame(0x0, b"part2-", fin=False)
        + ws_raw.frame(0x0, b"part3", fin=True)
    )
    client = wsproto.connection.Connection(wsproto.ConnectionType.CLIENT)
    got_pong = got_msg = None
    data = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (got_pong is None or got_msg is None):
        chunk = await asyncio.wait_for(c.reader.read(65536), 5)
        assert chunk, "proxy closed the connection"
        client.receive_data(chunk)
        for ev in client.events():
            if isinstance(ev, wse.Pong):
                got_pong = bytes(ev.payload)
            elif isinstance(ev, wse.BytesMessage):
                data += ev.data
                if ev.message_finished:
                    got_msg = data
            elif not isinstance(ev, wse.Ping):  # a heartbeat ping from the proxy may come
                raise AssertionError(f"unexpected {ev!r}")
    assert got_pong == b"ping-in-the-middle"
    assert got_msg == b"part1-part2-part3"
    rec = (await ws_backend.wait_records(1))[0]
    assert rec.messages == [b"part1-part2-part3"]


async def test_invalid_utf8_text_ends_with_1007(ws_backend, proxy, raw_conn, ws_raw):
    """Invalid UTF-8 in a text message: the client ends up with close 1007 (from the proxy or relayed)."""
    p = await proxy(ws_backend)
    c = await raw_conn(p.port)
    await c.send(_upgrade("/sink", p.authority, {"Sec-WebSocket-Key": ws_raw.key(), "Sec-WebSocket-Version": "13"}))
    assert (await c.read_response()).status == 101
    await c.send(ws_raw.frame(0x1, b"bad \xff\xfe utf8"))
    client = wsproto.connection.Connection(wsproto.ConnectionType.CLIENT)
    code = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and code is None:
        chunk = await asyncio.wait_for(c.reader.read(65536), 5)
        assert chunk, "connection dropped without a close frame"
        client.receive_data(chunk)
        for ev in client.events():
            if isinstance(ev, wse.CloseConnection):
                code = ev.code
    assert code == 1007
    rec = (await ws_backend.wait_records(1))[0]
    assert rec.messages == []


async def test_unmasked_client_frame_is_refused_1002(ws_backend, proxy, raw_conn, ws_raw):
    """RFC 6455 5.1: a server MUST close the connection on an unmasked client frame."""
    p = await proxy(ws_backend)
    c = await raw_conn(p.port)
    await c.send(_upgrade("/sink", p.authority, {"Sec-WebSocket-Key": ws_raw.key(), "Sec-WebSocket-Version": "13"}))
    assert (await c.read_response()).status == 101
    await c.send(ws_raw.frame(0x1, b"not masked", mask=False))
    client = wsproto.connection.Connection(wsproto.ConnectionType.CLIENT)
    code = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and code is None:
        chunk = await asyncio.wait_for(c.reader.read(65536), 5)
        if not chunk:
            break  # dropping the connection is allowed too (RFC 6455 7.1.7 "Fail the WebSocket Connection")
        client.receive_data(chunk)
        for ev in client.events():
            if isinstance(ev, wse.CloseConnection):
                code = ev.code
    assert code in (None, 1002)
    rec = (await ws_backend.wait_records(1))[0]
    assert rec.messages == [], "an unmasked frame was relayed"


@pytest.mark.parametrize(
    "upgrade,connection",
    [("WebSocket", "keep-alive, Upgrade"), ("websocket", "upgrade"), ("WEBSOCKET", "Upgrade, HTTP2-Settings")],
)
async def test_handshake_header_spellings_accepted(upgrade, connection, ws_backend, proxy, raw_conn, ws_raw):
    p = await proxy(ws_backend)
    c = await raw_conn(p.port)
    key = ws_raw.key()
    await c.send(
        (
            f"GET /echo HTTP/1.1\r\nHost: {p.authority}\r\nUpgrade: {upgrade}\r\nConnection: {connection}\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    resp = await c.read_response()
    assert resp.status == 101, resp.head
    assert resp.header("Sec-WebSocket-Accept") == ws_raw.accept(key)
    await c.send(ws_raw.frame(0x1, b"hi"))
    data = await asyncio.wait_for(c.reader.readexactly(4), 3)
    assert data == b"\x81\x02hi"


@pytest.mark.timeout(30)
async def test_full_duplex_large_transfer_does_not_deadlock(ws_backend, proxy, ws_connect, pattern):
    """Client sends 24 MiB while the echo comes back at the same time: flow control both ways."""
    p = await proxy(ws_backend)
    ws = await ws_connect(p.ws_url("/echo"), max_queue=4)
    msgs = [pattern.slice(i * 7919, 256 * 1024) for i in range(96)]

    async def sender():
        for m in msgs:
            await ws.send(m)

    async def receiver():
        for i, m in enumerate(msgs):
            got = await ws.recv()
            assert got == m, f"message {i} differs"

    await asyncio.wait_for(asyncio.gather(sender(), receiver()), 25)


async def test_server_stop_closes_sessions(ws_backend, proxy, ws_connect, raw_conn):
    p_ws = await proxy(ws_backend)
    port = p_ws.port
    ws = await ws_connect(p_ws.ws_url("/echo"))
    await ws.send("x")
    assert await asyncio.wait_for(ws.recv(), 3) == "x"
    t0 = time.monotonic()
    await asyncio.wait_for(p_ws.server.stop(), 10)
    assert time.monotonic() - t0 < 8
    await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.close_code in (1001, 1006)
    rec = (await ws_backend.wait_records(1))[0]
    await ws_backend.wait_done(rec, 5)
    with pytest.raises(OSError):
        await raw_conn(port)


async def test_two_listeners(ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend, listeners=[{"bind": "127.0.0.1:0"}, {"bind": "127.0.0.1:0"}])
    addrs = p.server.addresses
    assert len(addrs) == 2 and addrs[0] != addrs[1]
    for host, port in addrs:
        ws = await ws_connect(f"ws://{host}:{port}/echo")
        await ws.send(f"via {port}")
        assert await asyncio.wait_for(ws.recv(), 3) == f"via {port}"

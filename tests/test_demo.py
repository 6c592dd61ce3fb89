"""Tests for the built-in demo backend (edgeproxy.demo)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct

import aiohttp
import pytest
import uvloop
import websockets
from websockets.exceptions import ConnectionClosed

from edgeproxy.demo import start_demo_backend


@pytest.fixture
async def backend():
    server = await start_demo_backend(port=0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield host, port
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def base_url(backend) -> str:
    host, port = backend
    return f"http://{host}:{port}"


@pytest.fixture
def ws_url(backend) -> str:
    host, port = backend
    return f"ws://{host}:{port}"


async def test_defaults_bind_loopback_on_given_port() -> None:
    server = await start_demo_backend(port=0)
    try:
        assert isinstance(server, asyncio.AbstractServer)
        host, port = server.sockets[0].getsockname()[:2]
        assert host == "127.0.0.1" and port > 0
        assert server.is_serving()
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------- #
# HTTP
# --------------------------------------------------------------------------- #


async def test_index_page(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(base_url + "/") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/html")
            body = await resp.text()
    assert "edgeproxy demo backend" in body
    assert "<script>" in body and "new WebSocket(" in body
    assert 'new URL("ws", window.location.href)' in body  # /ws on the same host
    assert int(resp.headers["Content-Length"]) == len(body.encode())


async def test_hub_demo_page_loads_the_hub_client_from_the_proxy(base_url: str) -> None:
    from pathlib import Path

    from edgeproxy.config import load_config

    async with aiohttp.ClientSession() as session:
        async with session.get(base_url + "/hub-demo") as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/html")
            body = await resp.text()
    assert 'import { HubClient } from "/.edgeproxy/hub-client.js"' in body and 'new HubClient("/hub"' in body
    # the page's publish command fits the config the README runs it with
    config = load_config(Path(__file__).parent.parent / "examples" / "hub-demo.toml")
    assert [hub.path for hub in config.hubs] == ["/hub"] and config.admin.api_key in body
    assert f"http://{config.admin.bind.host}:{config.admin.bind.port}/v1/publish" in body


async def test_health(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(base_url + "/health") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            assert await resp.text() == "ok"


async def test_headers_echoes_request_info(base_url: str) -> None:
    sent = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https", "X-Custom": "abc"}
    async with aiohttp.ClientSession() as session:
        async with session.get(base_url + "/headers?x=1&y=2", headers=sent) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/json"
            info = json.loads(await resp.text())
    assert info["method"] == "GET"
    assert info["path"] == "/headers"
    assert info["query"] == "x=1&y=2"
    assert info["headers"]["x-forwarded-for"] == "203.0.113.7"
    assert info["headers"]["x-forwarded-proto"] == "https"
    assert info["headers"]["x-custom"] == "abc"
    assert info["headers"]["host"] == base_url.removeprefix("http://")
    assert info["client"].startswith("127.0.0.1:")


async def test_headers_accepts_any_method_and_counts_body(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(base_url + "/headers", data=b"x" * 5000) as resp:
            assert resp.status == 200
            info = await resp.json()
    assert info["method"] == "POST"
    assert info["body_length"] == 5000
    assert info["headers"]["content-length"] == "5000"


async def test_unknown_path_is_404(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(base_url + "/no/such/page") as resp:
            assert resp.status == 404
            assert "/no/such/page" in await resp.text()


async def test_wrong_method_on_page_is_405(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(base_url + "/health", data=b"x") as resp:
            assert resp.status == 405
            assert resp.headers["Allow"] == "GET, HEAD"


async def test_head_has_no_body(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.head(base_url + "/") as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) > 100
            assert await resp.read() == b""


async def test_ws_path_without_upgrade_is_426(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(base_url + "/ws") as resp:
            assert resp.status == 426
            assert resp.headers["Upgrade"].lower() == "websocket"


async def test_keep_alive_reuses_one_connection(base_url: str) -> None:
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        clients = set()
        for _ in range(5):
            async with session.get(base_url + "/headers") as resp:
                assert resp.status == 200
                clients.add((await resp.json())["client"])
            async with session.get(base_url + "/nope") as resp:
                assert resp.status == 404
                await resp.read()
    assert len(clients) == 1  # same client port each time: the connection was kept


async def test_pipelined_requests_on_raw_socket(backend) -> None:
    host, port = backend
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /missing HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = await asyncio.wait_for(reader.read(), 5)  # server closes after the third
    finally:
        writer.close()
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert data.count(b"HTTP/1.1 404 Not Found\r\n") == 1
    assert data.index(b"404") > data.index(b"200")


async def test_malformed_request_gets_400_and_close(backend) -> None:
    host, port = backend
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"THIS IS NOT HTTP\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 400 ")


# --------------------------------------------------------------------------- #
# WebSocket
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("path", ["/ws", "/echo"])
async def test_ws_text_and_binary_echo(ws_url: str, path: str) -> None:
    async with websockets.connect(ws_url + path) as ws:
        await ws.send("hello, edgeproxy ✓")
        assert await ws.recv() == "hello, edgeproxy ✓"
        payload = bytes(range(256)) * 4
        await ws.send(payload)
        echoed = await ws.recv()
        assert isinstance(echoed, bytes) and echoed == payload
        await ws.send("")
        assert await ws.recv() == ""
    assert ws.close_code == 1000


async def test_ws_large_and_fragmented_messages(ws_url: str) -> None:
    async with websockets.connect(ws_url + "/ws", max_size=None) as ws:
        big = os.urandom(3 * 1024 * 1024)
        await ws.send(big)
        assert await ws.recv() == big
        await ws.send(["frag", "mented ", "téxt"])  # one message in three frames
        assert await ws.recv() == "fragmented téxt"
        await ws.send([b"\x00", b"\x01\x02"])
        assert await ws.recv() == b"\x00\x01\x02"


async def test_ws_messages_come_back_in_order(ws_url: str) -> None:
    async with websockets.connect(ws_url + "/ws") as ws:
        for i in range(50):
            await ws.send(f"m{i}")
        assert [await ws.recv() for _ in range(50)] == [f"m{i}" for i in range(50)]


async def test_ws_ping_is_answered(ws_url: str) -> None:
    async with websockets.connect(ws_url + "/ws", ping_interval=None) as ws:
        pong_waiter = await ws.ping(b"are you there")
        latency = await asyncio.wait_for(pong_waiter, 5)
        assert latency >= 0


async def test_ws_close_code_and_reason_are_echoed(ws_url: str) -> None:
    ws = await websockets.connect(ws_url + "/ws")
    await ws.send("before close")
    assert await ws.recv() == "before close"
    await ws.close(code=4001, reason="bye now")
    assert ws.close_code == 4001
    assert ws.close_reason == "bye now"


async def test_ws_upgrade_with_extra_headers(ws_url: str) -> None:
    headers = {"X-Forwarded-For": "198.51.100.1"}
    async with websockets.connect(ws_url + "/echo", additional_headers=headers) as ws:
        assert ws.response.status_code == 101
        assert ws.response.headers["Upgrade"].lower() == "websocket"
        await ws.send("x")
        assert await ws.recv() == "x"


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


async def _raw_handshake(host: str, port: int, extra: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16))
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n" + extra
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 ")
    return reader, writer


async def test_ws_frame_sent_with_the_handshake_is_echoed(backend) -> None:
    reader, writer = await _raw_handshake(*backend, extra=_masked_frame(0x1, b"early"))
    try:
        frame = await asyncio.wait_for(reader.readexactly(2 + 5), 5)
        assert frame == b"\x81\x05early"  # server frames are unmasked
    finally:
        writer.close()


async def test_ws_invalid_utf8_closes_with_1007(backend) -> None:
    reader, writer = await _raw_handshake(*backend)
    try:
        writer.write(_masked_frame(0x1, b"\xff\xfe"))
        header = await asyncio.wait_for(reader.readexactly(2), 5)
        assert header[0] == 0x88  # FIN + close
        body = await reader.readexactly(header[1] & 0x7F)
        assert struct.unpack("!H", body[:2])[0] == 1007
        assert await asyncio.wait_for(reader.read(), 5) == b""  # then TCP close
    finally:
        writer.close()


async def test_ws_bad_version_is_refused(backend) -> None:
    host, port = backend
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 426 ")
    assert b"sec-websocket-version: 13" in head.lower()


async def test_ws_server_answers_close_then_connection_ends(ws_url: str) -> None:
    async with websockets.connect(ws_url + "/ws") as ws:
        await ws.send("a")
        assert await ws.recv() == "a"
    with pytest.raises(ConnectionClosed):
        await ws.recv()
    assert ws.close_code == 1000


def test_runs_on_uvloop() -> None:
    """The proxy runs on uvloop, so must the demo backend (its transports differ)."""

    async def scenario() -> tuple[int, str, str, bytes]:
        server = await start_demo_backend(port=0)
        host, port = server.sockets[0].getsockname()[:2]
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://{host}:{port}/health") as resp:
                    status, text = resp.status, await resp.text()
            async with websockets.connect(f"ws://{host}:{port}/ws") as ws:
                await ws.send("uv")
                echoed_text = await ws.recv()
                await ws.send(b"loop")
                echoed_bytes = await ws.recv()
            return status, text, echoed_text, echoed_bytes
        finally:
            server.close()
            await server.wait_closed()

    assert uvloop.run(scenario()) == (200, "ok", "uv", b"loop")

"""Connection lifecycle with real sockets, real processes and real signals.

Heartbeats find peers that stopped answering (a raw client that reads but never
answers pings, a raw backend that does the same) while a `websockets` peer that
answers stays connected; the age limit closes gracefully; SIGTERM drains a real
`edgeproxy run` process holding 1,000 WebSockets with close frames, lets an HTTP
request in flight finish, and exits 0; a second signal exits at once.
"""

from __future__ import annotations

import asyncio
import base64
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import websockets
from wsproto.utilities import generate_accept_token

from tests.integration.conftest import HOST, build_config

ROOT = Path(__file__).resolve().parents[2]


# -- a raw WebSocket client: sees exactly which frames arrive, answers nothing --------


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, path: str = "/sink") -> RawClient:
        reader, writer = await asyncio.open_connection(HOST, port)
        key = base64.b64encode(os.urandom(16))
        writer.write(
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert generate_accept_token(key) in head
        return cls(reader, writer)

    async def frame(self) -> tuple[int, bytes] | None:
        """The next frame from the proxy (opcode, payload); None at EOF."""
        try:
            b0, b1 = await self.reader.readexactly(2)
            assert not b1 & 0x80, "frames from the proxy to a client are not masked"
            length = b1 & 127
            if length == 126:
                (length,) = struct.unpack(">H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack(">Q", await self.reader.readexactly(8))
            return b0 & 15, await self.reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            assert not exc.partial, "the connection ended inside a frame"
            return None

    async def frames_until_eof(self, timeout: float, answer_close: bool = False) -> list[tuple[int, bytes]]:
        """Every frame until the proxy closes the connection (never answering a ping).

        With `answer_close`, a close frame is answered as a well-behaved client
        does (echoing its code, masked); `close_received_at` records when it came.
        """
        out = []
        async with asyncio.timeout(timeout):
            while (frame := await self.frame()) is not None:
                out.append(frame)
                if frame[0] == 0x8:
                    self.close_received_at = time.monotonic()
                    if answer_close:
                        mask = os.urandom(4)
                        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(frame[1][:2]))
                        self.writer.write(b"\x88\x82" + mask + payload)
        return out

    def close(self) -> None:
        self.writer.close()


def close_code(payload: bytes) -> int:
    return struct.unpack(">H", payload[:2])[0]


async def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


# -- heartbeats -----------------------------------------------------------------------


async def test_client_that_never_answers_pings_is_found_dead_and_freed(proxy, ws_backend) -> None:
    ping_interval, pong_timeout = 0.3, 0.6
    p = await proxy(ws_backend, websocket={"ping_interval": ping_interval, "pong_timeout": pong_timeout})
    server = p.server
    answering = await websockets.connect(p.ws_url("/echo"))  # answers pings by itself
    silent = await RawClient.connect(p.port, "/sink")
    rec = (await ws_backend.wait_records(2))[1]
    started = time.monotonic()
    frames = await silent.frames_until_eof(timeout=5)
    elapsed = time.monotonic() - started
    # It was pinged (8-byte payloads), never answered, and was cut off.  The
    # backend's pongs answer the proxy's own pings and were not relayed to it.
    assert frames and all(op == 0x9 and len(payload) == 8 for op, payload in frames)
    # First ping within one interval (+10% jitter), then pong_timeout, then up to a tick or two.
    assert elapsed < ping_interval * 1.1 + pong_timeout + 1.0, elapsed
    await ws_backend.wait_done(rec, 5)
    assert rec.close_code == 1001  # the backend was told the client went away
    assert await wait_for(lambda: len(server.connections) == 1, 3)
    assert len(server.client_beats) == 1 and len(server.upstream_beats) == 1  # its state is gone
    assert server.metrics.heartbeat_failures == 1
    # The client that answers is still there and still works, and its pongs were timed.
    await asyncio.sleep(ping_interval + pong_timeout)
    await answering.send("still here")
    assert await asyncio.wait_for(answering.recv(), 5) == "still here"
    assert server.metrics.heartbeat_failures == 1
    assert server.metrics.ping_rtt_seconds.count >= 1
    await answering.close()
    silent.close()


async def test_upstream_that_never_answers_pings_gives_the_client_1014(proxy, raw_backend) -> None:
    async def accepts_then_ignores(conn, reader, writer) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n\r\n")
        while chunk := await reader.read(65536):
            conn.data += chunk  # reads the pings, never answers

    backend = await raw_backend(accepts_then_ignores)
    p = await proxy(backend, websocket={"ping_interval": 0.3, "pong_timeout": 0.5})
    client = await websockets.connect(p.ws_url("/"))
    with pytest.raises(websockets.ConnectionClosed) as info:
        await asyncio.wait_for(client.recv(), 5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1014
    assert p.server.metrics.heartbeat_failures == 1
    assert await wait_for(lambda: not p.server.connections, 3)
    assert b"\x89\x88" in backend.connections[0].data  # it was sent masked 8-byte pings


async def test_max_connection_age_closes_gracefully_with_1001(proxy, ws_backend) -> None:
    p = await proxy(ws_backend, websocket={"max_connection_age": 0.5, "ping_interval": 0})
    client = await websockets.connect(p.ws_url("/echo"))
    started = time.monotonic()
    with pytest.raises(websockets.ConnectionClosedOK) as info:
        while True:
            await asyncio.wait_for(client.recv(), 5)
    assert info.value.rcvd.code == 1001 and "age" in info.value.rcvd.reason
    assert 0.4 <= time.monotonic() - started < 2.0
    assert p.server.metrics.heartbeat_failures == 0


# -- graceful shutdown, in a real process ----------------------------------------------------


def _raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


async def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection(HOST, port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


class ProxyProcess:
    """`edgeproxy run` in a subprocess, with its own port and admin port."""

    def __init__(self, tmp_path: Path, backend_port: int, **sections: dict):
        self.port = _free_port()
        self.admin_port = _free_port()
        sections.setdefault("admin", {"bind": f"{HOST}:{self.admin_port}"})
        sections.setdefault("logging", {"access_log": False})
        text = build_config(
            listeners=[{"bind": f"{HOST}:{self.port}", "backlog": 2048}],
            upstreams=[{"name": "app", "servers": [f"{HOST}:{backend_port}"]}],
            routes=[{"path_prefix": "/", "upstream": "app"}],
            sections=sections,
        )
        path = tmp_path / "edgeproxy.toml"
        path.write_text(text)
        _raise_open_files_limit()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeproxy", "run", "--config", str(path)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )

    async def started(self) -> ProxyProcess:
        await _wait_port(self.port)
        return self

    async def wait(self, timeout: float) -> tuple[int, float]:
        started = time.monotonic()
        while self.proc.poll() is None and time.monotonic() - started < timeout:
            await asyncio.sleep(0.05)
        assert self.proc.poll() is not None, f"still running {timeout}s after the signal"
        return self.proc.returncode, time.monotonic() - started

    def kill(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        _, err = self.proc.communicate(timeout=10)
        return err


@pytest.mark.timeout(90)
async def test_sigterm_sends_every_client_a_close_frame_then_exits_0(tmp_path, ws_backend) -> None:
    n = 400  # enough for several batches; 1,000 in pure Python on a busy 2-core machine stalled the loop for seconds
    drain_timeout, grace = 3.0, 0.5
    proc = await ProxyProcess(
        tmp_path, ws_backend.port,
        shutdown={"drain_timeout": drain_timeout, "readiness_grace": grace, "close_code": 1012},
    ).started()
    try:
        clients: list[RawClient] = []
        for start in range(0, n, 100):
            clients += await asyncio.gather(*(RawClient.connect(proc.port, "/sink") for _ in range(start, min(n, start + 100))))
        await ws_backend.wait_records(n, timeout=20)

        async def ending(client: RawClient):
            frames = await client.frames_until_eof(timeout=drain_timeout + grace + 10, answer_close=True)
            return frames, client.close_received_at, time.monotonic()

        endings = [asyncio.ensure_future(ending(c)) for c in clients]
        proc.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # Readiness turns false first, while the listener still accepts.
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{HOST}:{proc.admin_port}/readyz") as resp:
                assert resp.status == 503
        results = await asyncio.gather(*endings)
        code, _ = await proc.wait(timeout=drain_timeout + grace + 5)
        assert code == 0
    finally:
        err = proc.kill()
    for frames, _, _ in results:
        # Every client got a close frame with the configured code before its
        # connection ended (frames_until_eof fails on a reset or a cut frame).
        closes = [payload for op, payload in frames if op == 0x8]
        assert len(closes) == 1, frames
        assert close_code(closes[0]) == 1012 and b"reconnect in" in closes[0]
    closes_at = sorted(t - signalled for _, t, _ in results)
    assert closes_at[0] >= grace * 0.9  # nothing before the readiness grace
    # Paced: batches over the first half of the drain window, not all at once.
    assert closes_at[-1] - closes_at[0] >= 0.4 * drain_timeout, "the close frames were not spread"
    # Clients that answer their close are let go at once, well before the deadline.
    assert max(end for _, _, end in results) - signalled < grace + drain_timeout
    assert "Traceback" not in err


@pytest.mark.timeout(60)
async def test_sigterm_lets_an_http_request_in_flight_finish(tmp_path, http_backend) -> None:
    proc = await ProxyProcess(tmp_path, http_backend.port, shutdown={"drain_timeout": 5, "readiness_grace": 0}).started()
    try:
        async with aiohttp.ClientSession() as session:
            request = asyncio.ensure_future(session.get(f"http://{HOST}:{proc.port}/slow?delay=1&id=x"))
            await asyncio.sleep(0.3)
            proc.proc.send_signal(signal.SIGTERM)
            resp = await asyncio.wait_for(request, 10)
            assert resp.status == 200 and await resp.text() == "slow x"
        code, elapsed = await proc.wait(timeout=6)
        assert code == 0 and elapsed < 5  # done as soon as nothing was left, not at the deadline
    finally:
        proc.kill()


@pytest.mark.timeout(60)
async def test_second_signal_stops_at_once(tmp_path, ws_backend) -> None:
    proc = await ProxyProcess(tmp_path, ws_backend.port, shutdown={"drain_timeout": 30, "readiness_grace": 5}).started()
    try:
        client = await RawClient.connect(proc.port, "/sink")
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        proc.proc.send_signal(signal.SIGTERM)
        code, elapsed = await proc.wait(timeout=5)
        assert code == 1 and elapsed < 3  # 1: the drain was cut short (0 is for a full drain)
        frames = await client.frames_until_eof(timeout=5)
        assert [close_code(p) for op, p in frames if op == 0x8] == [1001]  # still a close frame first
    finally:
        proc.kill()


async def test_a_reload_that_turns_pings_on_reaches_open_sessions(proxy, ws_backend) -> None:
    from edgeproxy.config import parse_config

    p = await proxy(ws_backend, websocket={"ping_interval": 0})
    assert p.server.client_beats is None
    silent = await RawClient.connect(p.port, "/sink")
    text = p.config_text.replace("ping_interval = 0", "ping_interval = 0.3\npong_timeout = 0.5")
    assert text != p.config_text
    result = await p.server.reload(parse_config(text))
    assert "websocket" in result["changed"]
    # The open session is now pinged, and found dead when it does not answer.
    frames = await silent.frames_until_eof(timeout=5)
    assert frames and all(op == 0x9 for op, _ in frames)
    assert p.server.metrics.heartbeat_failures == 1

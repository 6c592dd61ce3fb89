"""Resumable sessions end to end: real sockets, a real backend, real clients, a fault-injecting relay.

The backend streams numbered messages (``s1``, ``s2``, ...) and echoes the
client's (``c1`` -> ``echo:c1``); it records every connection it saw and every
message it got.  `FaultRelay` sits between client and proxy and can black-hole
both directions without closing anything, as a dead network path does.

``test_thirty_second_blip`` (marker ``long_blip``) is the one long test: a
30-second black hole, found by the proxy's heartbeat, parked, resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import weakref

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import connect as ws_client
from websockets.asyncio.server import serve

from edgeproxy.core.resume import CLOSE_NOT_RESUMABLE, SUBPROTOCOL
from edgeproxy.reconnect import Backoff
from edgeproxy.resume_client import ResumableWebSocket
from edgeproxy.transport.resume import CLIENT_JS_PATH, client_js
from tests.integration.conftest import HOST, wait_until

SECRET = "resume-secret-0123456789"


class StreamBackend:
    """Streams ``s<n>`` every `interval` seconds and echoes each client message as ``echo:<msg>``."""

    def __init__(self, interval: float = 0.05, size: int = 0):
        self.interval = interval
        self.pad = "x" * size
        self.connections: list[dict] = []
        self._server = None
        self.port = 0

    async def _handler(self, ws) -> None:
        record = {"offers": ws.request.headers.get_all("Sec-WebSocket-Protocol"),
                  "extensions": ws.request.headers.get_all("Sec-WebSocket-Extensions"),
                  "subprotocol": ws.subprotocol, "got": [], "close": None, "sent": 0}
        self.connections.append(record)

        async def stream() -> None:
            while self.interval:
                record["sent"] += 1
                await ws.send(f"s{record['sent']}{self.pad}")
                await asyncio.sleep(self.interval)

        streamer = asyncio.create_task(stream())
        try:
            async for message in ws:
                record["got"].append(message)
                await ws.send(f"echo:{message}")
        except websockets.ConnectionClosed:
            pass
        finally:
            streamer.cancel()
            record["close"] = ws.close_code

    async def start(self) -> None:
        self._server = await serve(self._handler, HOST, 0, subprotocols=["chat"], compression=None)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)


class FaultRelay:
    """A TCP relay that can black-hole traffic both ways without closing anything.

    While ``blackhole`` is set, bytes read from either side are dropped, a side's
    close is held back until it ends, and new connections are accepted but never
    forwarded (what a client sees through a dead path: nothing at all).
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.blackhole = False
        self._server = None
        self._tasks: set[asyncio.Task] = set()
        self.port = 0
        self.accepted = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_client, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, path: str = "/ws") -> str:
        return f"ws://{HOST}:{self.port}{path}"

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.blackhole:  # doomed: read and drop until the client gives up
            with contextlib.suppress(Exception):
                while await reader.read(65536):
                    pass
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if self.blackhole:
                    continue
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        while self.blackhole:  # a close must not get through a dead path either
            await asyncio.sleep(0.05)
        with contextlib.suppress(Exception):
            dst.close()

    async def stop(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()


async def _started(cls):
    """A fixture body: yields a factory that builds and starts `cls` objects, stops them all after."""
    started = []

    async def factory(*args, **kw):
        obj = cls(*args, **kw)
        await obj.start()
        started.append(obj)
        return obj

    yield factory
    for obj in started:
        await obj.stop()


@pytest.fixture
async def backend():
    """Factory: ``await backend(interval=..., size=...)`` -> a started `StreamBackend`."""
    async for factory in _started(StreamBackend):
        yield factory


@pytest.fixture
async def relay():
    """Factory: ``await relay(proxy_port)`` -> a started `FaultRelay`."""
    async for factory in _started(FaultRelay):
        yield factory


def resume_proxy(proxy, backend, *, window: float = 30.0, buffer: int = 1 << 20, instance: str | None = None,
                 routes: list[dict] | None = None, **ws):
    websocket = {"resume_secret": SECRET, "resume_window": window, "resume_buffer_bytes": buffer, **ws}
    if instance:
        websocket["instance_id"] = instance
    return proxy(backend.port, websocket=websocket, routes=routes)


async def raw_attempt(url: str, offers: list[str]) -> tuple[str | None, int | None, str]:
    """Open a WebSocket with exactly `offers`; the subprotocol answered and the close that came first."""
    async with ws_client(url, subprotocols=offers, compression=None, open_timeout=5) as ws:
        chosen = ws.subprotocol
        with contextlib.suppress(websockets.ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
        return chosen, ws.close_code, ws.close_reason


async def client(url: str, **kw) -> ResumableWebSocket:
    kw.setdefault("backoff", Backoff(0.05, 0.5))
    return await ResumableWebSocket(url, subprotocol="chat", **kw).connect()


async def recv_until(c: ResumableWebSocket, predicate, got: list, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate(got):
            got.append(await c.recv())


def numbered(messages: list[str], prefix: str) -> list[int]:
    return [int(m[len(prefix):]) for m in messages if m.startswith(prefix)]


# -- negotiation ---------------------------------------------------------------------


async def test_plain_clients_are_relayed_unchanged(proxy, backend) -> None:
    b = await backend(interval=0)
    p = await resume_proxy(proxy, b)
    async with ws_client(p.ws_url("/ws"), subprotocols=["chat"]) as ws:
        assert ws.subprotocol == "chat"
        await ws.send("hi")
        assert await ws.recv() == "echo:hi"
    rec = b.connections[0]
    assert rec["offers"] == ["chat"] and rec["extensions"] == ["permessage-deflate; client_max_window_bits"]
    assert p.server.resume.sessions == {}  # never a resumable session


async def test_wrapper_is_stripped_for_the_backend_and_restored_for_the_client(proxy, backend) -> None:
    b = await backend(interval=0)
    p = await resume_proxy(proxy, b)
    c = await client(p.ws_url("/ws"))
    assert c.resumable
    await c.send("one")
    assert await asyncio.wait_for(c.recv(), 5) == "echo:one"
    rec = b.connections[0]
    assert rec["offers"] == ["chat"] and rec["subprotocol"] == "chat" and rec["extensions"] == []
    assert [s.wrapper for s in p.server.resume.sessions.values()] == [f"{SUBPROTOCOL}+chat"]
    await c.close()
    assert await wait_until(lambda: b.connections[0]["close"] == 1000)
    assert await wait_until(lambda: not p.server.resume.sessions)


async def test_resume_is_off_without_a_secret(proxy, backend) -> None:
    b = await backend(interval=0)
    p = await proxy(b.port)
    c = await client(p.ws_url("/ws"))
    assert not c.resumable  # the backend saw the wrapper, chose nothing: a plain WebSocket
    await c.send("x")
    assert await asyncio.wait_for(c.recv(), 5) == "echo:x"
    await c.close()


async def test_client_js_is_served_before_routing(proxy, backend) -> None:
    b = await backend(interval=0)
    p = await proxy(b.port)
    async with aiohttp.ClientSession() as session:
        async with session.get(p.url(CLIENT_JS_PATH)) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/javascript; charset=utf-8"
            assert await resp.read() == client_js()
        async with session.head(p.url(CLIENT_JS_PATH)) as resp:
            assert resp.status == 200 and int(resp.headers["Content-Length"]) == len(client_js())
    assert b"export class ResumableWebSocket" in client_js()


# -- resume after a reset --------------------------------------------------------------


async def test_reset_connection_resumes_with_every_message_once(proxy, backend) -> None:
    b = await backend(interval=0.01)
    p = await resume_proxy(proxy, b)
    c = await client(p.ws_url("/ws"))
    got: list = []
    await recv_until(c, lambda g: len(g) >= 20, got)
    for i in range(1, 6):
        await c.send(f"c{i}")
    c._link.abort()  # the TCP connection is reset under the client
    for i in range(6, 11):
        await c.send(f"c{i}")
    await recv_until(c, lambda g: numbered(g, "echo:c")[-1:] == [10] and len(numbered(g, "s")) >= 80, got)
    await c.close()
    streamed = numbered(got, "s")
    assert streamed == list(range(1, len(streamed) + 1))
    assert numbered(got, "echo:c") == list(range(1, 11))
    assert len(b.connections) == 1 and b.connections[0]["got"] == [f"c{i}" for i in range(1, 11)]
    assert c.resumes == 1 and c.resets == 0


# -- refusals -----------------------------------------------------------------------------


async def parked_session(proxy, backend, **kw):
    """A proxy with one session whose client has just vanished; returns (proxy, backend, token, seen)."""
    b = await backend(interval=kw.pop("interval", 0.02), size=kw.pop("size", 0))
    p = await resume_proxy(proxy, b, **kw)
    c = await client(p.ws_url("/ws"))
    got: list = []
    await recv_until(c, lambda g: len(g) >= 3, got)
    token, seen = c._token, c.last_seq
    c._closing = True
    c._task.cancel()
    c._link.abort()
    assert await wait_until(lambda: p.server.resume.parked())
    return p, b, token, seen


async def test_window_expiry_is_not_resumable(proxy, backend) -> None:
    p, b, token, seen = await parked_session(proxy, backend, window=0.5)
    assert await wait_until(lambda: b.connections[0]["close"] is not None, timeout=5)
    assert b.connections[0]["close"] == 1001  # a normal close for the backend
    assert p.server.resume.sessions == {}
    chosen, code, reason = await raw_attempt(p.ws_url("/ws"), [f"{SUBPROTOCOL}+chat", f"{SUBPROTOCOL}.r.{token}.{seen}"])
    assert (chosen, code) == (f"{SUBPROTOCOL}+chat", CLOSE_NOT_RESUMABLE)
    assert reason == "not resumable: unknown or expired session"


async def test_forged_replayed_and_foreign_tokens_are_refused(proxy, backend) -> None:
    routes = [{"path_prefix": "/", "upstream": "app"}, {"path_prefix": "/other/", "upstream": "app"}]
    p, b, token, seen = await parked_session(proxy, backend, routes=routes)
    url = p.ws_url("/ws")
    wrapper = f"{SUBPROTOCOL}+chat"
    forged = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    assert (await raw_attempt(url, [wrapper, f"{SUBPROTOCOL}.r.{forged}.{seen}"]))[1:] == (
        CLOSE_NOT_RESUMABLE, "not resumable: invalid token")
    # The token is bound to its route: the same proxy refuses it on another one.
    assert (await raw_attempt(p.ws_url("/other/ws"), [wrapper, f"{SUBPROTOCOL}.r.{token}.{seen}"]))[1:] == (
        CLOSE_NOT_RESUMABLE, "not resumable: invalid token")
    # A genuine resume works once...
    async with ws_client(url, subprotocols=[wrapper, f"{SUBPROTOCOL}.r.{token}.{seen}"]) as ws:
        assert ws.subprotocol == wrapper
        first = await asyncio.wait_for(ws.recv(), 5)
        assert first.startswith('C{"t":"session"') and '"resumed":true' in first
        # ...and the spent token is refused after it, without disturbing the session.
        assert (await raw_attempt(url, [wrapper, f"{SUBPROTOCOL}.r.{token}.{seen}"]))[1:] == (
            CLOSE_NOT_RESUMABLE, "not resumable: token already used")
        await ws.send("D1:still here")
        assert await wait_until(lambda: b.connections[0]["got"] == ["still here"])
        assert len(b.connections) == 1 and b.connections[0]["close"] is None
    # Another instance (same secret, another id) refuses at once, naming the owner.
    second = await resume_proxy(proxy, b, instance="edge-2")
    started = asyncio.get_running_loop().time()
    _, code, reason = await raw_attempt(second.ws_url("/ws"), [wrapper, f"{SUBPROTOCOL}.r.{token}.{seen}"])
    assert code == CLOSE_NOT_RESUMABLE and "belongs to instance" in reason
    assert asyncio.get_running_loop().time() - started < 2.0


async def test_buffer_overflow_while_parked_closes_the_backend(proxy, backend) -> None:
    p, b, token, seen = await parked_session(proxy, backend, buffer=4096, size=500, interval=0.01)
    assert await wait_until(lambda: b.connections[0]["close"] is not None, timeout=5)
    assert b.connections[0]["close"] == 1001 and p.server.resume.sessions == {}
    _, code, reason = await raw_attempt(p.ws_url("/ws"), [f"{SUBPROTOCOL}+chat", f"{SUBPROTOCOL}.r.{token}.{seen}"])
    assert (code, reason) == (CLOSE_NOT_RESUMABLE, "not resumable: unknown or expired session")


async def test_a_client_behind_on_acks_pauses_the_backend_and_loses_nothing(proxy) -> None:
    """The replay buffer is the flow-control window: a reader that does not ack holds the backend back."""
    count, size, limit = 4000, 4096, 64 * 1024
    sent = []

    async def bulk(ws) -> None:
        for i in range(1, count + 1):
            await ws.send(f"{i:08d}".ljust(size, "x"))
            sent.append(i)
        await ws.wait_closed()

    server = await serve(bulk, HOST, 0, subprotocols=["chat"], compression=None, max_size=None)
    try:
        bport = server.sockets[0].getsockname()[1]
        p = await proxy(bport, websocket={"resume_secret": SECRET, "resume_buffer_bytes": limit})
        async with ws_client(p.ws_url("/ws"), subprotocols=[f"{SUBPROTOCOL}+chat"], compression=None,
                             max_size=None, max_queue=None) as ws:
            assert (await ws.recv()).startswith('C{"t":"session"')
            [session] = p.server.resume.sessions.values()
            got: list[int] = []

            async def read_for(seconds: float) -> None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(seconds):
                        while True:
                            message = await ws.recv()
                            head, _, body = message.partition(":")
                            got.append(int(body[:8]))
                            assert int(head[1:]) == len(got)  # numbered 1, 2, 3... by the proxy

            await read_for(1.0)  # read all that comes, ack nothing
            assert session.core.upstream_paused and session.upstream._reading_paused
            assert session.core.buffer.size <= limit + 256 * 1024  # the bound, plus at most one read
            stalled = len(got)
            assert stalled < count and len(sent) < count  # the backend is held back, not buffered without end
            await ws.send('C{"t":"ack","seq":%d}' % len(got))
            async with asyncio.timeout(30):
                while len(got) < count:  # now ack as a client should: everything flows
                    message = await ws.recv()
                    got.append(int(message.partition(":")[2][:8]))
                    if len(got) % 8 == 0:
                        await ws.send('C{"t":"ack","seq":%d}' % len(got))
            assert got == list(range(1, count + 1))  # every message once, in order
            assert session.core.buffer.size <= limit + 256 * 1024
    finally:
        server.close()


async def test_idle_timeout_ends_a_quiet_resumable_session_like_a_plain_one(proxy, backend) -> None:
    b = await backend(interval=0)
    p = await resume_proxy(proxy, b, idle_timeout=0.6)
    async with ws_client(p.ws_url("/ws"), subprotocols=[f"{SUBPROTOCOL}+chat"], compression=None) as ws:
        assert (await ws.recv()).startswith('C{"t":"session"')
        started = asyncio.get_running_loop().time()
        with contextlib.suppress(websockets.ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
        assert (ws.close_code, ws.close_reason) == (1001, "idle timeout")
        assert 0.3 < asyncio.get_running_loop().time() - started < 3.0  # 0.54-0.6 s from the session's start
    assert await wait_until(lambda: b.connections[0]["close"] == 1001)
    assert await wait_until(lambda: not p.server.resume.sessions)


async def test_resumable_connections_give_their_admission_slot_back_when_they_close(proxy, backend) -> None:
    """A session's client connection counts against max_connections_per_ip until its socket closes, not forever."""
    b = await backend(interval=0)
    p = await proxy(b.port, websocket={"resume_secret": SECRET}, limits={"max_connections_per_ip": 2})
    wrapper = f"{SUBPROTOCOL}+chat"
    for i in range(5):  # sessions, one after another
        c = await client(p.ws_url("/ws"))
        await c.send(f"x{i}")
        assert await asyncio.wait_for(c.recv(), 5) == f"echo:x{i}"
        await c.close()
        assert await wait_until(lambda: not p.server.resume.sessions)
    for _ in range(4):  # refused resume attempts, one after another
        _, code, _ = await raw_attempt(p.ws_url("/ws"), [wrapper, f"{SUBPROTOCOL}.r.AAAA.0"])
        assert code == CLOSE_NOT_RESUMABLE
    assert await wait_until(lambda: p.server.admission.open == 0)
    c = await client(p.ws_url("/ws"))  # still admitted
    await c.close()


async def test_python_client_resets_when_the_session_is_gone(proxy, backend) -> None:
    b = await backend(interval=0.02)
    p = await resume_proxy(proxy, b, window=0.3)
    class Longest(random.Random):
        def random(self) -> float:
            return 1.0  # the top of every backoff range

    c = await client(p.ws_url("/ws"), backoff=Backoff(1.0, 1.0, rng=Longest()))  # reconnects after the window
    got: list = []
    await recv_until(c, lambda g: len(g) >= 3, got)
    c._link.abort()
    event = None
    async with asyncio.timeout(10):
        while event is None or event[0] != "reset":
            event = await c.events.get()
    assert "unknown or expired session" in event[1]
    await c.send("again")
    fresh: list = []
    await recv_until(c, lambda g: "echo:again" in g, fresh)
    assert len(b.connections) == 2 and b.connections[1]["got"] == ["again"]
    await c.close()


async def test_python_client_send_waits_for_room_while_cut_off_and_loses_nothing(proxy, backend, relay) -> None:
    b = await backend(interval=0)
    p = await resume_proxy(proxy, b, ping_interval=0.5, pong_timeout=0.5)
    r = await relay(p.port)
    c = await client(r.url(), ping_interval=0.3, ping_timeout=0.6, connect_timeout=1.0, max_unacked_bytes=1000)
    await c.send("c0")
    got: list = []
    await recv_until(c, lambda g: "echo:c0" in g, got)
    await asyncio.sleep(0.3)  # the proxy's ack of c0 arrives with its tick
    r.blackhole = True
    for i in range(1, 10):  # 9 x 100 bytes fit in 1000
        await asyncio.wait_for(c.send(f"c{i}".ljust(100, ".")), 1)
    assert 900 <= c.buffered_amount <= 1000
    blocked = asyncio.create_task(c.send("c10".ljust(200, ".")))
    await asyncio.sleep(1.5)  # cut off: no ack can come, the send waits
    assert not blocked.done() and c.buffered_amount <= 1000
    r.blackhole = False
    await asyncio.wait_for(blocked, 15)  # resumed, resent, acknowledged: room again
    await recv_until(c, lambda g: any(m.startswith("echo:c10") for m in g), got, timeout=15)
    await c.close()
    expected = ["c0"] + [f"c{i}".ljust(100, ".") for i in range(1, 10)] + ["c10".ljust(200, ".")]
    assert b.connections[0]["got"] == expected and len(b.connections) == 1  # once each, in order
    assert c.resumes >= 1


async def test_parked_memory_is_bounded_and_freed(proxy, backend) -> None:
    limit, n = 8192, 40
    b = await backend(interval=0.005, size=200)
    p = await resume_proxy(proxy, b, window=1.5, buffer=limit)
    registry = p.server.resume
    clients = [await client(p.ws_url("/ws")) for _ in range(n)]
    for c in clients:
        c._closing = True
        c._task.cancel()
        c._link.abort()
    assert await wait_until(lambda: len(registry.parked()) == n, timeout=5)
    refs = [weakref.ref(s) for s in registry.sessions.values()]
    for _ in range(10):  # the backend keeps streaming into the parked sessions
        assert all(s.core.held_bytes <= limit + 300 for s in registry.sessions.values())
        await asyncio.sleep(0.05)
    assert await wait_until(lambda: not registry.sessions, timeout=5)
    assert all(rec["close"] == 1001 for rec in b.connections)
    del clients
    gc.collect()
    assert all(ref() is None for ref in refs), "parked sessions must be freed"


# -- the 30-second blip ---------------------------------------------------------------------


@pytest.mark.long_blip
@pytest.mark.timeout(90)
async def test_thirty_second_blip(proxy, backend, relay) -> None:
    """The issue's test: 30 s of black hole between client and proxy; nothing lost, nothing twice."""
    b = await backend(interval=0.05)
    p = await resume_proxy(proxy, b, window=60, ping_interval=1.0, pong_timeout=2.0)
    r = await relay(p.port)
    c = await client(r.url(), ping_interval=1.0, ping_timeout=2.0, connect_timeout=2.0, backoff=Backoff(0.2, 2.0))
    got: list = []
    sent = 0

    async def sender() -> None:
        nonlocal sent
        while True:
            sent += 1
            await c.send(f"c{sent}")
            await asyncio.sleep(0.1)

    task = asyncio.create_task(sender())
    await recv_until(c, lambda g: len(numbered(g, "s")) >= 20, got)
    r.blackhole = True
    await asyncio.sleep(30)
    assert p.server.resume.parked_count >= 1, "the proxy's heartbeat should have parked the session"
    r.blackhole = False
    before = len(numbered(got, "s"))
    await recv_until(c, lambda g: len(numbered(g, "s")) >= before + 600 + 20, got, timeout=30)
    task.cancel()
    final = sent
    await recv_until(c, lambda g: numbered(g, "echo:c")[-1:] == [final], got, timeout=15)
    await c.close()

    streamed = numbered(got, "s")
    assert streamed == list(range(1, len(streamed) + 1)), "every streamed message once, in order"
    assert numbered(got, "echo:c") == list(range(1, final + 1)), "every echo once, in order"
    assert len(b.connections) == 1, "the backend saw one continuous connection"
    assert b.connections[0]["got"] == [f"c{i}" for i in range(1, final + 1)]
    assert c.resumes >= 1 and c.resets == 0


# -- the browser client ----------------------------------------------------------------------


BROWSER_SCRIPT = """
async ([url]) => {
  const { ResumableWebSocket } = await import('/.edgeproxy/resume-client.js');
  window.got = []; window.events = []; window.sent = 0;
  const ws = new ResumableWebSocket(url, 'chat', {pingInterval: 500, pingTimeout: 1000, connectTimeout: 1500,
                                                  backoffBase: 100, backoffCap: 1000});
  window.ws = ws;
  ws.onmessage = (e) => window.got.push(e.data);
  for (const t of ['open', 'reconnecting', 'resumed', 'reset', 'close'])
    ws.addEventListener(t, () => window.events.push(t));
  window.timer = setInterval(() => { window.sent += 1; ws.send('c' + window.sent); }, 100);
}
"""


BOUNDED_SCRIPT = """
async ([url]) => {
  const { ResumableWebSocket } = await import('/.edgeproxy/resume-client.js');
  const ws = new ResumableWebSocket(url, 'chat', {maxBufferedBytes: 12});
  ws.send('0123456789');  // queued while connecting: 10 bytes held
  let error = null;
  try { ws.send('abc'); } catch (e) { error = e.name; }
  const held = ws.bufferedAmount;
  const echoOf = () => new Promise((resolve) => {
    ws.onmessage = (e) => { if (e.data.startsWith('echo:')) resolve(e.data); };
  });
  const echoed = echoOf();
  await echoed;  // echo:0123456789
  await new Promise((resolve) => ws.addEventListener('acked', resolve, {once: true}));
  const afterAck = ws.bufferedAmount;
  const later = echoOf();
  ws.send('later');
  const echo = await later;
  ws.close();
  return {error, held, afterAck, echo};
}
"""


async def test_browser_client_survives_a_paused_relay(proxy, backend, relay, external_tool) -> None:
    from playwright.async_api import async_playwright

    chromium = external_tool("chromium", "chromium")
    b = await backend(interval=0.05)
    p = await resume_proxy(proxy, b, ping_interval=1.0, pong_timeout=1.0)
    r = await relay(p.port)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(p.url(CLIENT_JS_PATH))
            await page.evaluate(BROWSER_SCRIPT, [r.url()])
            await page.wait_for_function("window.got.filter(m => m.startsWith('s')).length >= 20", timeout=10000)
            r.blackhole = True
            await asyncio.sleep(4)
            r.blackhole = False
            await page.wait_for_function("window.events.includes('resumed')", timeout=15000)
            before = await page.evaluate("window.got.filter(m => m.startsWith('s')).length")
            await page.wait_for_function(f"window.got.filter(m => m.startsWith('s')).length >= {before + 30}",
                                         timeout=10000)
            final = await page.evaluate("clearInterval(window.timer), window.sent")
            await page.wait_for_function(f"window.got.includes('echo:c{final}')", timeout=10000)
            got = await page.evaluate("window.got")
            events = await page.evaluate("window.events")
            await page.evaluate("window.ws.close()")
            bounded = await page.evaluate(BOUNDED_SCRIPT, [r.url()])
        finally:
            await browser.close()
    assert errors == []
    assert "reconnecting" in events and "resumed" in events and "reset" not in events
    streamed = numbered(got, "s")
    assert streamed == list(range(1, len(streamed) + 1))
    assert numbered(got, "echo:c") == list(range(1, final + 1))
    assert len(b.connections) == 2  # the session, and the second page client's below
    assert b.connections[0]["got"] == [f"c{i}" for i in range(1, final + 1)]
    assert p.server.resume.parked_count >= 1
    # the resend buffer is bounded: an overflowing send throws, acks make room
    assert bounded == {"error": "RangeError", "held": 10, "afterAck": 0, "echo": "echo:later"}
    assert b.connections[1]["got"] == ["0123456789", "later"]

"""End-to-end fixtures: real peers around an in-process edgeproxy.

Everything binds to 127.0.0.1 on an ephemeral port.  Backends are real
libraries (``websockets`` and ``aiohttp``) or small raw asyncio servers where a
test needs byte-exact control (odd responses, a peer that never answers, a
recorder that proves nothing reached it).  The ``proxy`` fixture builds the TOML
text, runs it through ``parse_config`` and starts a real ``ProxyServer``.

Helpers shared by several test modules are handed out through fixtures
(``raw_conn``, ``ws_connect``, ``pattern``, ...), so no test module has to import
this file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import uvloop

try:  # Import hypothesis's plugin package now, at a shallow stack: imported late (from its
    # terminal-summary hook, after failures) pytest's assertion rewriter can hit CPython 3.11's
    # "AST constructor recursion depth mismatch" SystemError (cpython gh-106905) and crash the run.
    import hypothesis  # noqa: F401
except ImportError:  # pragma: no cover
    pass
from aiohttp import web
from websockets.asyncio.client import connect as _ws_client_connect
from websockets.asyncio.server import serve as _ws_serve
from websockets.exceptions import ConnectionClosed

HOST = "127.0.0.1"
MiB = 1024 * 1024


# --------------------------------------------------------------------------
# event loop: the proxy is built for uvloop, so the whole suite runs on it
# --------------------------------------------------------------------------


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


@pytest.fixture
def until() -> Callable[..., Awaitable[bool]]:
    """``await until(predicate, timeout=5.0)``: `wait_until` for the test modules."""
    return wait_until


async def scrape(p: Any) -> dict[tuple[str, frozenset], float]:
    """Every sample of the proxy's /metrics, read from its admin listener: {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    host, port = p.server.admin.address
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{host}:{port}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# --------------------------------------------------------------------------
# deterministic payloads
# --------------------------------------------------------------------------

# A prime period, so chunks of any power-of-two size never line up with it and a
# reordered or duplicated chunk changes the digest.
_PERIOD = 65521
_BASE = bytes(((i * 131) ^ (i >> 7) ^ 0x5A) & 0xFF for i in range(_PERIOD))
_TILE = _BASE * ((4 * MiB) // _PERIOD + 2)  # > 4 MiB, any slice up to 4 MiB is one copy


class Pattern:
    """Deterministic byte streams: ``bytes(n)``, ``chunks(n, size)``, ``sha256(n)``."""

    period = _PERIOD

    @staticmethod
    def slice(offset: int, n: int) -> bytes:
        assert n <= 4 * MiB
        start = offset % _PERIOD
        return _TILE[start : start + n]

    def bytes(self, n: int) -> bytes:
        out = bytearray()
        off = 0
        while off < n:
            take = min(4 * MiB, n - off)
            out += self.slice(off, take)
            off += take
        return bytes(out)

    def chunks(self, n: int, size: int = 65536) -> Iterator[bytes]:
        off = 0
        while off < n:
            take = min(size, n - off)
            yield self.slice(off, take)
            off += take

    def sha256(self, n: int) -> str:
        h = hashlib.sha256()
        for c in self.chunks(n, 4 * MiB):
            h.update(c)
        return h.hexdigest()

    @staticmethod
    def text(n: int) -> str:
        """ASCII text of exactly ``n`` bytes."""
        line = "The quick brown fox jumps over the lazy dog 0123456789.\n"
        reps = n // len(line) + 1
        return (line * reps)[:n]


@pytest.fixture
def pattern() -> Pattern:
    return Pattern()


# --------------------------------------------------------------------------
# TOML / proxy factory
# --------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot render {v!r} as TOML")


def build_config(
    *,
    listeners: list[dict] | None = None,
    upstreams: list[dict],
    routes: list[dict],
    sections: dict[str, dict] | None = None,
    hubs: list[dict] | None = None,
) -> str:
    out: list[str] = []
    for lst in listeners or [{"bind": f"{HOST}:0"}]:
        out.append("[[listeners]]")
        out += [f"{k} = {_toml_value(v)}" for k, v in lst.items()]
        out.append("")
    for up in upstreams:
        out.append("[[upstreams]]")
        out += [f"{k} = {_toml_value(v)}" for k, v in up.items()]
        out.append("")
    for r in routes:
        out.append("[[routes]]")
        out += [f"{k} = {_toml_value(v)}" for k, v in r.items()]
        out.append("")
    for hub in hubs or []:
        out.append("[[hubs]]")
        out += [f"{k} = {_toml_value(v)}" for k, v in hub.items()]
        out.append("")
    for name, body in (sections or {}).items():
        if not body:
            continue
        out.append(f"[{name}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
        out.append("")
    return "\n".join(out)


@dataclasses.dataclass
class Proxy:
    server: Any
    config_text: str

    @property
    def host(self) -> str:
        return self.server.addresses[0][0]

    @property
    def port(self) -> int:
        return self.server.addresses[0][1]

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def ws_url(self, path: str = "/") -> str:
        return f"ws://{self.host}:{self.port}{path}"


def _port_of(b: Any) -> int:
    return b if isinstance(b, int) else b.port


@pytest.fixture
async def proxy():
    """Factory: ``await proxy(backend_or_port, ..., upstream={...}, websocket={...}, ...)``.

    Positional arguments are the servers of a single upstream named "app" routed
    at "/".  ``upstreams=``/``routes=`` replace that default entirely.  Section
    keyword arguments (``http``, ``websocket``, ``limits``, ``logging``,
    ``admin``) become TOML tables; ``admin`` defaults to an ephemeral port.
    ``upstream`` adds keys to the default upstream.
    """
    from edgeproxy.config import parse_config
    from edgeproxy.transport.server import ProxyServer

    started: list[Any] = []

    async def factory(
        *backends: Any,
        upstream: dict | None = None,
        upstreams: list[dict] | None = None,
        routes: list[dict] | None = None,
        listeners: list[dict] | None = None,
        hubs: list[dict] | None = None,
        **sections: dict,
    ) -> Proxy:
        if upstreams is None:
            up = {"name": "app", "servers": [f"{HOST}:{_port_of(b)}" for b in backends]}
            up.update(upstream or {})
            upstreams = [up]
        if routes is None:
            routes = [{"path_prefix": "/", "upstream": upstreams[0]["name"]}]
        # An ephemeral admin port: tests (and other checkouts) run proxies side by side.
        sections.setdefault("admin", {"bind": f"{HOST}:0"})
        # No heartbeat pings unless a test asks: the first ping of a session comes at
        # a random point of its first interval, and tests that read raw frames want
        # exactly the frames they provoke.  test_lifecycle.py tests heartbeats; the
        # real-process tests keep the default (30 s); the Autobahn run has none either.
        sections["websocket"] = {"ping_interval": 0, **sections.get("websocket", {})}
        text = build_config(listeners=listeners, upstreams=upstreams, routes=routes, sections=sections, hubs=hubs)
        server = ProxyServer(parse_config(text))
        await asyncio.wait_for(server.start(), 5)
        started.append(server)
        return Proxy(server, text)

    yield factory
    for server in reversed(started):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.stop(), 10)


# --------------------------------------------------------------------------
# "refused" port: bound but never listening, so connect() gets ECONNREFUSED and
# nobody else can take the port while the test runs.
# --------------------------------------------------------------------------


@pytest.fixture
def refused_port() -> Iterator[int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((HOST, 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.fixture
def stalled_port() -> Iterator[int]:
    """A port whose connects hang: a listener with a full accept queue.

    Linux drops the SYNs of further connects to a listener whose backlog is full,
    so a connect there neither succeeds nor fails until the client gives up:
    the way to exercise `connect_timeout` on loopback.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((HOST, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # backlog 0 still admits one or two; fill it for sure
            f = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            f.setblocking(False)
            f.connect_ex((HOST, port))
            fillers.append(f)
        yield port
    finally:
        for f in fillers:
            f.close()
        listener.close()


# --------------------------------------------------------------------------
# WebSocket backend (websockets library)
# --------------------------------------------------------------------------


@dataclasses.dataclass
class WSRecord:
    path: str
    headers: list[tuple[str, str]]
    subprotocol: str | None
    messages: list[str | bytes] = dataclasses.field(default_factory=list)
    close_code: int | None = None  # code of the close frame received (None: no close frame)
    close_reason: str | None = None
    sent_bytes: int = 0
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class WSBackend:
    """websockets server whose behaviour is chosen by the request path.

    /echo (and anything unknown)  echo every message
    /sink                         record messages, never answer
    /silent                       never send anything, wait for the close
    /close4002                    close at once with 4002 "server bye"
    /abort                        wait for one message, then abort the TCP connection
    /forbidden                    refuse the upgrade: 403 with a text body
    /cookie                       accept, with Set-Cookie on the 101
    /ping-client                  ping the client, then send "pong received" once its pong arrives
    /flood?count=N&size=S         send N binary messages of S bytes as fast as flow control allows:
                                  8-byte big-endian sequence number + Pattern bytes
    """

    def __init__(self) -> None:
        self.records: list[WSRecord] = []
        self.server: Any = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    async def wait_records(self, n: int = 1, timeout: float = 5.0) -> list[WSRecord]:
        await wait_until(lambda: len(self.records) >= n, timeout)
        assert len(self.records) >= n, f"backend saw {len(self.records)} WebSocket sessions, wanted {n}"
        return self.records

    @staticmethod
    async def wait_done(rec: WSRecord, timeout: float = 5.0) -> WSRecord:
        await asyncio.wait_for(rec.done.wait(), timeout)
        return rec

    @staticmethod
    def _process_request(conn, request):
        if urlsplit(request.path).path == "/forbidden":
            resp = conn.respond(403, "forbidden by backend\n")
            resp.headers["X-Backend"] = "refused"
            return resp
        return None

    @staticmethod
    def _process_response(conn, request, response):
        if urlsplit(request.path).path == "/cookie":
            response.headers["Set-Cookie"] = "session=abc123; Path=/; HttpOnly"
            response.headers["X-Backend"] = "cookie"
        return response

    @staticmethod
    def _select_subprotocol(conn, offered):
        for candidate in ("chat.v2", "chat.v1"):
            if candidate in offered:
                return candidate
        return None

    async def _handler(self, ws) -> None:
        rec = WSRecord(
            path=ws.request.path,
            headers=list(ws.request.headers.raw_items()),
            subprotocol=ws.subprotocol,
        )
        self.records.append(rec)
        split = urlsplit(rec.path)
        query = {k: v[0] for k, v in parse_qs(split.query).items()}
        try:
            if split.path == "/sink":
                async for msg in ws:
                    rec.messages.append(msg)
            elif split.path == "/silent":
                await ws.wait_closed()
            elif split.path == "/close4002":
                await ws.close(4002, "server bye")
            elif split.path == "/abort":
                rec.messages.append(await ws.recv())
                ws.transport.abort()
            elif split.path == "/ping-client":
                waiter = await ws.ping(b"from-backend")
                await asyncio.wait_for(waiter, 5)
                await ws.send("pong received")
                await ws.wait_closed()
            elif split.path == "/flood":
                count = int(query.get("count", "1024"))
                size = int(query.get("size", "65536"))
                body = Pattern.slice(0, size - 8)
                for seq in range(count):
                    await ws.send(struct.pack(">Q", seq) + body)
                    rec.sent_bytes += size
                await ws.wait_closed()
            else:
                async for msg in ws:
                    rec.messages.append(msg)
                    await ws.send(msg)
        except ConnectionClosed:
            pass
        finally:
            rcvd = ws.protocol.close_rcvd
            if rcvd is not None:
                rec.close_code, rec.close_reason = rcvd.code, rcvd.reason
            rec.done.set()

    async def start(self, port: int = 0) -> None:
        """Listen on ``port`` (0: a fresh ephemeral one; the old port to come back after ``kill``)."""
        self.server = await _ws_serve(
            self._handler,
            HOST,
            port,
            process_request=self._process_request,
            process_response=self._process_response,
            select_subprotocol=self._select_subprotocol,
            max_size=None,
            ping_interval=None,
            close_timeout=2,
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 5)

    async def stop_listening(self) -> None:
        """Refuse new connections (the port is closed); live sessions go on."""
        self.server.close(close_connections=False)
        await asyncio.sleep(0)  # not wait_closed(): it would wait for the live sessions

    async def kill(self) -> None:
        """Die like a crashed process: stop listening and reset every live connection, no close frames."""
        connections = list(self.server.connections)
        self.server.close(close_connections=False)
        for conn in connections:
            conn.transport.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 1)


@pytest.fixture
async def ws_backend():
    backend = WSBackend()
    await backend.start()
    yield backend
    await backend.stop()


@pytest.fixture
async def ws_backends():
    """Factory: ``await ws_backends(n)`` -> n started WSBackends (stopped at teardown)."""
    started: list[WSBackend] = []

    async def factory(n: int) -> list[WSBackend]:
        backends = [WSBackend() for _ in range(n)]
        for backend in backends:
            await backend.start()
        started.extend(backends)
        return backends

    yield factory
    for backend in started:
        await backend.stop()


@pytest.fixture
async def ws_connect():
    """Factory for websockets clients with test-friendly defaults; aborted at teardown."""
    conns: list[Any] = []

    async def connect(url: str, **kw: Any):
        opts: dict[str, Any] = dict(
            proxy=None,
            compression=None,
            max_size=None,
            ping_interval=None,
            open_timeout=5,
            close_timeout=3,
        )
        opts.update(kw)
        ws = await _ws_client_connect(url, **opts)
        conns.append(ws)
        return ws

    yield connect
    for ws in conns:
        with contextlib.suppress(Exception):
            ws.transport.abort()


# --------------------------------------------------------------------------
# HTTP backend (aiohttp)
# --------------------------------------------------------------------------


@dataclasses.dataclass
class HTTPRecord:
    method: str
    path: str
    version: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


_RECORD_KEY = web.RequestKey("record", HTTPRecord) if hasattr(web, "RequestKey") else "record"


class HTTPBackend:
    """aiohttp app.

    ANY  /headers            JSON {method, path, version, headers: [[k, v], ...]} (raw, in order)
    ANY  /echo[?chunked=1]   the request body back (Content-Length, or chunked with ?chunked=1)
    POST /upload             JSON {length, sha256, transfer_encoding, content_length}, body read as a stream
    GET  /stream?size=N[&chunked=1][&chunk=S]   N Pattern bytes, streamed
    ANY  /status/{code}      that status (with a small body where one is allowed)
    GET  /head               1234 bytes; HEAD gets the same Content-Length and no body
    GET  /nocontent          204
    GET  /notmodified        304 with an ETag
    POST /continue           JSON {length} (aiohttp answers Expect: 100-continue itself)
    GET  /slow?delay=S[&id=X]   answers "slow X" after S seconds
    """

    def __init__(self) -> None:
        self.requests: list[HTTPRecord] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @web.middleware
    async def _record(self, request: web.Request, handler):
        rec = HTTPRecord(
            method=request.method,
            path=request.raw_path,
            version=f"{request.version.major}.{request.version.minor}",
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
        )
        self.requests.append(rec)
        request[_RECORD_KEY] = rec
        return await handler(request)

    @staticmethod
    async def _read_body(request: web.Request) -> bytes:
        buf = bytearray()
        async for chunk in request.content.iter_chunked(256 * 1024):
            buf += chunk
        return bytes(buf)

    async def headers(self, request: web.Request) -> web.Response:
        rec = request[_RECORD_KEY]
        await self._read_body(request)
        return web.json_response(
            {"method": rec.method, "path": rec.path, "version": rec.version, "headers": rec.headers}
        )

    async def echo(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_body(request)
        ctype = request.headers.get("Content-Type", "application/octet-stream")
        if request.query.get("chunked") == "1":
            resp = web.StreamResponse(headers={"Content-Type": ctype})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(body), 65536):
                await resp.write(body[i : i + 65536])
            await resp.write_eof()
            return resp
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def upload(self, request: web.Request) -> web.Response:
        h = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_chunked(256 * 1024):
            h.update(chunk)
            n += len(chunk)
        return web.json_response(
            {
                "length": n,
                "sha256": h.hexdigest(),
                "transfer_encoding": request.headers.get("Transfer-Encoding"),
                "content_length": request.headers.get("Content-Length"),
            }
        )

    async def stream(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        chunk = int(request.query.get("chunk", "65536"))
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("chunked") == "1":
            resp.enable_chunked_encoding()
        else:
            resp.content_length = size
        await resp.prepare(request)
        for c in Pattern().chunks(size, chunk):
            await resp.write(c)
        await resp.write_eof()
        return resp

    async def status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code)
        return web.Response(status=code, text=f"status {code}\n", headers={"X-Backend-Status": str(code)})

    async def head(self, request: web.Request) -> web.Response:
        return web.Response(body=b"h" * 1234, headers={"X-Head": "yes", "Content-Type": "text/plain"})

    async def nocontent(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers={"X-Kind": "204"})

    async def notmodified(self, request: web.Request) -> web.Response:
        return web.Response(status=304, headers={"ETag": '"v1"', "X-Kind": "304"})

    async def cont(self, request: web.Request) -> web.Response:
        body = await self._read_body(request)
        return web.json_response({"length": len(body), "body": body.decode("latin-1")})

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", "1")))
        return web.Response(text=f"slow {request.query.get('id', '')}")

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record], client_max_size=1024**3)
        app.router.add_route("*", "/headers", self.headers)
        app.router.add_route("*", "/echo", self.echo)
        app.router.add_post("/upload", self.upload)
        app.router.add_put("/upload", self.upload)
        app.router.add_get("/stream", self.stream)
        app.router.add_route("*", "/status/{code}", self.status)
        app.router.add_get("/head", self.head)
        app.router.add_get("/nocontent", self.nocontent)
        app.router.add_get("/notmodified", self.notmodified)
        app.router.add_post("/continue", self.cont)
        app.router.add_get("/slow", self.slow)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, HOST, 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.runner.cleanup(), 5)


@pytest.fixture
async def http_backend():
    backend = HTTPBackend()
    await backend.start()
    yield backend
    await backend.stop()


# --------------------------------------------------------------------------
# raw TCP backend: byte-exact responses, recorders, black holes
# --------------------------------------------------------------------------


@dataclasses.dataclass
class RawBackendConn:
    data: bytearray = dataclasses.field(default_factory=bytearray)
    requests: list[tuple[bytes, list[tuple[bytes, bytes]], bytes]] = dataclasses.field(default_factory=list)
    closed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    sent: int = 0


class RawBackend:
    def __init__(self, handler: Callable[[RawBackendConn, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]):
        self.handler = handler
        self.connections: list[RawBackendConn] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._tasks: set[asyncio.Task] = set()

    @property
    def received(self) -> bytes:
        return b"".join(bytes(c.data) for c in self.connections)

    @property
    def requests(self) -> list[tuple[bytes, list[tuple[bytes, bytes]], bytes]]:
        return [r for c in self.connections for r in c.requests]

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = RawBackendConn()
        self.connections.append(conn)
        self._tasks.add(asyncio.current_task())
        try:
            await self.handler(conn, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            conn.closed.set()
            writer.close()
            self._tasks.discard(asyncio.current_task())

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._on_conn, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 3)


async def read_http_head(conn: RawBackendConn, reader: asyncio.StreamReader, buf: bytearray) -> bytes | None:
    """Read until the end of a header block (recording every byte); None on EOF."""
    for _ in range(100000):
        idx = buf.find(b"\r\n\r\n")
        if idx >= 0:
            head = bytes(buf[: idx + 4])
            del buf[: idx + 4]
            return head
        chunk = await reader.read(65536)
        if not chunk:
            return None
        conn.data += chunk
        buf += chunk
    return None


def parse_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    lines = head[:-4].split(b"\r\n")
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers.append((k.strip(), v.strip()))
    return lines[0], headers


async def _read_exact(conn: RawBackendConn, reader: asyncio.StreamReader, buf: bytearray, n: int) -> bytes:
    for _ in range(1000000):
        if len(buf) >= n:
            break
        chunk = await reader.read(65536)
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(buf), n)
        conn.data += chunk
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


async def _read_line(conn: RawBackendConn, reader: asyncio.StreamReader, buf: bytearray) -> bytes:
    for _ in range(100000):
        idx = buf.find(b"\r\n")
        if idx >= 0:
            line = bytes(buf[:idx])
            del buf[: idx + 2]
            return line
        chunk = await reader.read(65536)
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(buf), None)
        conn.data += chunk
        buf += chunk
    raise AssertionError("line too long")


async def read_http_body(conn, reader, buf, headers) -> bytes:
    hmap = {k.lower(): v for k, v in headers}
    if b"chunked" in hmap.get(b"transfer-encoding", b"").lower():
        body = bytearray()
        for _ in range(1000000):
            size = int(await _read_line(conn, reader, buf) or b"0", 16)
            if size == 0:
                for _ in range(1000):  # trailers
                    if not await _read_line(conn, reader, buf):
                        break
                return bytes(body)
            body += await _read_exact(conn, reader, buf, size)
            await _read_line(conn, reader, buf)
        raise AssertionError("too many chunks")
    return await _read_exact(conn, reader, buf, int(hmap.get(b"content-length", b"0")))


def mini_http(response: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"):
    """Handler: parse each request (recorded in conn.requests) and answer ``response``; keep-alive."""

    async def handler(conn: RawBackendConn, reader, writer) -> None:
        buf = bytearray()
        for _ in range(10000):
            head = await read_http_head(conn, reader, buf)
            if head is None:
                return
            line, headers = parse_head(head)
            body = await read_http_body(conn, reader, buf, headers)
            conn.requests.append((line, headers, body))
            writer.write(response)
            await writer.drain()

    return handler


def blackhole():
    """Handler: accept, record everything, never answer."""

    async def handler(conn: RawBackendConn, reader, writer) -> None:
        for _ in range(1000000):
            chunk = await reader.read(65536)
            if not chunk:
                return
            conn.data += chunk

    return handler


@pytest.fixture
async def raw_backend():
    """Factory: ``await raw_backend(handler)`` -> RawBackend (started; stopped at teardown).

    ``raw_backend.mini_http(...)`` and ``raw_backend.blackhole()`` build handlers.
    """
    backends: list[RawBackend] = []

    async def factory(handler) -> RawBackend:
        b = RawBackend(handler)
        await b.start()
        backends.append(b)
        return b

    factory.mini_http = mini_http  # type: ignore[attr-defined]
    factory.blackhole = blackhole  # type: ignore[attr-defined]
    factory.read_head = read_http_head  # type: ignore[attr-defined]
    factory.parse_head = parse_head  # type: ignore[attr-defined]
    factory.read_body = read_http_body  # type: ignore[attr-defined]
    yield factory
    for b in backends:
        await b.stop()


# --------------------------------------------------------------------------
# raw TCP client with a small, strict HTTP/1.1 response reader
# --------------------------------------------------------------------------


@dataclasses.dataclass
class RawResponse:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    head: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def has(self, name: str) -> bool:
        return any(k.lower() == name.lower() for k, _ in self.headers)

    def json(self) -> Any:
        return json.loads(self.body)


class RawConn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _line(self) -> bytes:
        line = await self.reader.readuntil(b"\r\n")
        return line[:-2]

    async def read_response(self, method: str = "GET", timeout: float = 5.0) -> RawResponse:
        return await asyncio.wait_for(self._read_response(method), timeout)

    async def _read_response(self, method: str) -> RawResponse:
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            raise AssertionError(f"connection closed before a full response head; got {e.partial!r}") from None
        lines = head[:-4].split(b"\r\n")
        version, _, rest = lines[0].decode("latin-1").partition(" ")
        code, _, reason = rest.partition(" ")
        assert version in ("HTTP/1.1", "HTTP/1.0"), f"bad status line {lines[0]!r}"
        status = int(code)
        headers: list[tuple[str, str]] = []
        for raw in lines[1:]:
            assert raw[:1] not in (b" ", b"\t"), f"obs-fold in response: {head!r}"
            k, sep, v = raw.decode("latin-1").partition(":")
            assert sep and k == k.strip() and k, f"malformed response header line {raw!r}"
            headers.append((k, v.strip()))
        resp = RawResponse(status, reason, version, headers, b"", head)
        te = [v.lower() for k, v in headers if k.lower() == "transfer-encoding"]
        cl = [v for k, v in headers if k.lower() == "content-length"]
        if method == "HEAD" or 100 <= status < 200 or status in (204, 304):
            return resp
        if te:
            assert not cl, f"response has both Transfer-Encoding and Content-Length: {head!r}"
            assert te[-1].split(",")[-1].strip() == "chunked", f"unframed response: {head!r}"
            body = bytearray()
            for _ in range(10000000):
                size_line = await self._line()
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    for _ in range(1000):
                        if not await self._line():
                            break
                    break
                body += await self.reader.readexactly(size)
                assert await self._line() == b"", "chunk not followed by CRLF"
            resp.body = bytes(body)
        elif cl:
            assert len(set(cl)) == 1, f"conflicting Content-Length in response: {head!r}"
            resp.body = await self.reader.readexactly(int(cl[0]))
        else:
            resp.body = await self.reader.read(-1)
        return resp

    async def read_final(self, method: str = "GET", timeout: float = 5.0) -> tuple[list[RawResponse], RawResponse]:
        """Read interim (1xx) responses and then the final one."""
        interim = []
        for _ in range(10):
            r = await self.read_response(method, timeout)
            if r.status >= 200 or r.status == 101:
                return interim, r
            interim.append(r)
        raise AssertionError("too many interim responses")

    async def expect_closed(self, timeout: float = 3.0) -> None:
        """Assert the peer closes the connection (EOF or reset) within ``timeout``; extra bytes fail."""
        try:
            extra = await asyncio.wait_for(self.reader.read(65536), timeout)
        except (ConnectionResetError, BrokenPipeError):
            return
        except asyncio.TimeoutError:
            raise AssertionError(f"connection still open {timeout}s after the response") from None
        assert extra == b"", f"unexpected bytes after the response: {extra[:200]!r}"

    async def read_all(self, timeout: float = 5.0) -> bytes:
        """Everything until EOF (or reset)."""
        buf = bytearray()

        async def go():
            for _ in range(1000000):
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionResetError:
                    return
                if not chunk:
                    return
                buf.extend(chunk)

        await asyncio.wait_for(go(), timeout)
        return bytes(buf)

    def close(self) -> None:
        self.writer.transport.abort()


@pytest.fixture
async def raw_conn():
    """Factory: ``await raw_conn(port)`` -> RawConn (aborted at teardown)."""
    conns: list[RawConn] = []

    async def connect(port: int, host: str = HOST) -> RawConn:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1024 * 1024), 5)
        c = RawConn(reader, writer)
        conns.append(c)
        return c

    yield connect
    for c in conns:
        with contextlib.suppress(Exception):
            c.close()


# --------------------------------------------------------------------------
# raw WebSocket framing for tests that need frames websockets will not send
# --------------------------------------------------------------------------


def ws_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def ws_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if n < 4096 else _mask_fast(payload, key)
    return head + key + masked


def _mask_fast(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    k = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ k).to_bytes(n, "big")


class _WSHelpers:
    key = staticmethod(ws_key)
    accept = staticmethod(ws_accept)
    frame = staticmethod(ws_frame)


@pytest.fixture
def ws_raw() -> type[_WSHelpers]:
    return _WSHelpers

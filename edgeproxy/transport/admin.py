"""The admin listener: metrics, health, JSON admin endpoints and the live dashboard.

A small HTTP/1.1 server on its own socket (``[admin] bind``, loopback by
default), parsed with h11 like the rest of the proxy and run on the same loop.
Its traffic is a scraper every few seconds and an operator's browser, so it
favours plain code over speed: asyncio streams, one task per connection,
keep-alive, and a short idle timeout so a forgotten connection cannot linger.

What it serves comes from an `AdminSource` (the `ProxyServer`): the `Metrics`,
the ``ready`` flag the lifecycle code flips while draining, snapshots of the
upstreams and the config, and an optional reload handler.

=====================  ======  =============================================
path                   method  answer
=====================  ======  =============================================
/metrics               GET     Prometheus text exposition
/healthz               GET     200 while the process runs
/readyz                GET     200 "ready"; 503 "draining: ..." or "unhealthy: <why>"
/admin/connections     GET     JSON: open connections by route/upstream/server
/admin/upstreams       GET     JSON: upstream servers and their state
/admin/config          GET     JSON: config version (sha256) and load time
/admin/reload          POST    calls the reload handler; 501 without one
/admin/stream          GET     SSE: one JSON snapshot of the signals per second
/dashboard             GET     self-contained HTML charts fed by /admin/stream
=====================  ======  =============================================

Other layers add endpoints that read the request (headers and body) with
`AdminListener.add_route`: the hub's ``POST /v1/publish`` is one.

Who may call what.  The *control* endpoints (every ``/admin/*`` path but
``/admin/stream``: reload, drain, upstream state, connections, config) change or
reveal how the proxy runs; the *read-only* ones (/metrics, /healthz, /readyz,
/dashboard, /admin/stream) carry nothing secret.  With ``[admin] control_key``
set, every endpoint not in ``[admin] open_endpoints`` (by default the
read-only ones) needs ``Authorization: Bearer <key>``; anything else gets 401
with ``WWW-Authenticate: Bearer`` before its handler runs, so nothing happens.
With ``[admin] control_bind`` the control endpoints leave this listener for a
second one (``role = "control"``): a TCP port, or a Unix socket whose
permissions are set before it appears under its name, so a local operator's
``curl --unix-socket`` can reload while the port the backends publish on
(``role = "public"``) cannot.  The configuration refuses control endpoints
without a key on anything but loopback or a Unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import Any, Protocol

import h11

from edgeproxy.config import DEFAULT_OPEN_ENDPOINTS, OPEN_ENDPOINT_CHOICES, Address
from edgeproxy.errors import ConfigError
from edgeproxy.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("edgeproxy")

#: a request head larger than this is refused: admin requests are tiny
MAX_HEAD = 8192
#: a POST body larger than this is refused (reload takes no body)
MAX_BODY = 65536
#: seconds an admin connection may sit without a complete request
IDLE_TIMEOUT = 30.0

_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"


class AdminSource(Protocol):
    """What the admin listener reads; `ProxyServer` provides it."""

    metrics: Metrics
    #: False while draining: /readyz answers 503 so load balancers stop sending.
    ready: bool
    #: called by POST /admin/reload; may return a dict (the JSON answer) or an awaitable of one.
    on_reload: Callable[[], Any] | None

    def upstream_states(self) -> list[dict[str, Any]]: ...

    def readiness(self) -> tuple[str, str]:
        """``(state, why)``: ready, starting, draining or unhealthy, and the /readyz body."""
        ...

    def config_info(self) -> dict[str, Any]: ...


class AdminRequest:
    """A request to an endpoint added with `AdminListener.add_route`.

    ``too_large`` is True when the body passed the route's ``max_body`` (the body is
    then cut there; the handler answers 413).
    """

    __slots__ = ("method", "path", "headers", "body", "too_large")

    def __init__(self, method: bytes, path: str, headers: list[tuple[bytes, bytes]]):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = b""
        self.too_large = False

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def bears(self, key: str) -> bool:
        """Whether the request says ``Authorization: Bearer <key>`` (compared in constant time)."""
        auth = self.header(b"authorization") or b""
        return auth[:7].lower() == b"bearer " and hmac.compare_digest(auth[7:].strip(), key.encode())


#: an added endpoint: it gets the request and answers (status, JSON document)
ApiHandler = Callable[[AdminRequest], Any]


class _Reply:
    __slots__ = ("status", "content_type", "body", "headers")

    def __init__(self, status: int, content_type: str, body: bytes, headers: tuple[tuple[str, str], ...] = ()):
        self.status = status
        self.content_type = content_type
        self.body = body
        self.headers = headers


def _json_reply(status: int, doc: Any) -> _Reply:
    return _Reply(status, _JSON, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")


def _text_reply(status: int, text: str) -> _Reply:
    return _Reply(status, _TEXT, text.encode())


def _is_socket(path: str) -> bool:
    return stat.S_ISSOCK(os.lstat(path).st_mode)


def _is_control(path: str) -> bool:
    """Whether ``path`` is a control endpoint: ``/admin/*`` but the dashboard's feed."""
    return path.startswith("/admin/") and path != "/admin/stream"


@cache
def dashboard_html() -> bytes:
    """The dashboard page, shipped next to this module (read once)."""
    return resources.files("edgeproxy.transport").joinpath("dashboard.html").read_bytes()


class AdminListener:
    """Serves the admin endpoints for ``source`` on ``bind``.

    ``stream_interval`` is the seconds between two /admin/stream snapshots.
    ``bind`` is an Address, or a path for a Unix socket made with ``unix_mode``
    permission bits.  ``role`` is ``"all"`` (every endpoint), ``"public"``
    (all but the control endpoints, which another listener serves) or
    ``"control"`` (the control and read-only endpoints, not the publish API).
    """

    def __init__(self, source: AdminSource, bind: Address | str, *, stream_interval: float = 1.0,
                 control_key: str | None = None, open_endpoints: tuple[str, ...] = DEFAULT_OPEN_ENDPOINTS,
                 role: str = "all", unix_mode: int = 0o600):
        if role not in ("all", "public", "control"):
            raise ValueError(f"role must be all, public or control, got {role!r}")
        self.source = source
        self.bind = bind
        self.stream_interval = stream_interval
        #: the bearer key the endpoints outside `open_endpoints` need (None: all open)
        self.control_key = control_key
        self.open_endpoints = frozenset(open_endpoints)
        self.role = role
        self.unix_mode = unix_mode
        #: (device, inode) of the Unix socket we made, so stop() removes only our own
        self._unix_identity: tuple[int, int] | None = None
        #: bind with SO_REUSEPORT: a supervised worker and its successor in a binary
        #: upgrade serve the same admin port while both run
        self.reuse_port = False
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._routes: dict[str, tuple[str, Callable[[], Any]]] = {
            "/metrics": ("GET", self._metrics),
            "/healthz": ("GET", lambda: _text_reply(200, "ok\n")),
            "/readyz": ("GET", self._readyz),
            "/admin/connections": ("GET", self._connections),
            "/admin/upstreams": ("GET", lambda: _json_reply(200, {"upstreams": self.source.upstream_states()})),
            "/admin/config": ("GET", lambda: _json_reply(200, self.source.config_info())),
            "/admin/reload": ("POST", self._reload),
            "/dashboard": ("GET", lambda: _Reply(200, "text/html; charset=utf-8", dashboard_html())),
        }
        #: endpoints added by other layers: path -> (method, handler, max_body)
        self._api: dict[str, tuple[str, ApiHandler, int]] = {}

    def add_route(self, path: str, method: str, handler: ApiHandler, *, max_body: int = MAX_BODY) -> None:
        """Serve ``method path`` with ``handler(request) -> (status, doc)`` (may be a coroutine)."""
        self._api[path] = (method, handler, max_body)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the real port when ``bind`` asked for port 0; (path, 0) for a Unix socket."""
        if isinstance(self.bind, str):
            return self.bind, 0
        name = self._server.sockets[0].getsockname()
        return name[0], name[1]

    def describe(self) -> str:
        """Where it listens, for logs: ``http://host:port`` or ``unix:/path``."""
        host, port = self.address
        if isinstance(self.bind, str):
            return f"unix:{host}"
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def start(self) -> None:
        if isinstance(self.bind, str):
            self._server = await asyncio.start_unix_server(self._serve, sock=self._unix_socket(), limit=MAX_BODY)
            return
        self._server = await asyncio.start_server(
            self._serve, self.bind.host, self.bind.port, reuse_address=True, limit=MAX_BODY,
            reuse_port=self.reuse_port or None,
        )

    def _unix_socket(self) -> socket.socket:
        """A listening Unix socket at ``bind`` with ``unix_mode``, put in place atomically.

        It is bound under a temporary name, given its permissions, and renamed over
        the path: nobody can connect while the mode is still the umask's, and a
        successor in a binary upgrade takes the name over without a gap.
        """
        path = self.bind
        if os.path.lexists(path) and not _is_socket(path):
            raise OSError(f"[admin] control_bind: {path} exists and is not a socket; refusing to replace it")
        temporary = f"{path}.{os.getpid()}.tmp"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            sock.bind(temporary)
            os.chmod(temporary, self.unix_mode)
            sock.listen(128)
            os.rename(temporary, path)
        except OSError:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        info = os.stat(path)
        self._unix_identity = (info.st_dev, info.st_ino)
        sock.setblocking(False)
        return sock

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        if self._unix_identity is not None:
            with contextlib.suppress(OSError):
                info = os.stat(self.bind)
                if (info.st_dev, info.st_ino) == self._unix_identity:  # not a successor's
                    os.unlink(self.bind)
            self._unix_identity = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None

    # -- connections ------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                request = await self._read_request(conn, reader)
                if request is None:
                    break
                reply = self._gate(request)
                if reply is None and (request.method, request.path) == (b"GET", "/admin/stream"):
                    await self._stream(conn, reader, writer)
                    break
                if reply is None:
                    reply = await self._dispatch(request)
                await self._send(conn, writer, reply)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
                    await self._send(conn, writer, _text_reply(exc.error_status_hint, f"bad request: {exc}\n"))
        except (ConnectionError, TimeoutError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader) -> AdminRequest | None:
        """The next request; its body is kept for added routes, else dropped; None at EOF."""
        request = None
        body = 0
        keep = 0
        async with asyncio.timeout(IDLE_TIMEOUT):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    # MAX_HEAD at a time, so h11 sees an oversized head before it is whole
                    conn.receive_data(await reader.read(MAX_HEAD))
                    continue
                if isinstance(event, h11.Request):
                    target = event.target.decode("latin-1")
                    request = AdminRequest(bytes(event.method), target.split("?", 1)[0],
                                           [(bytes(k), bytes(v)) for k, v in event.headers])
                    api = self._api.get(request.path)
                    keep = api[2] if api is not None else 0
                elif isinstance(event, h11.Data):
                    body += len(event.data)
                    if body <= keep:
                        request.body += event.data
                    elif keep:
                        request.too_large = True  # read on and drop, so the 413 is read
                    elif body > MAX_BODY:
                        raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
                elif isinstance(event, h11.EndOfMessage):
                    return request
                else:  # ConnectionClosed, or PAUSED after a response we closed on
                    return None

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, reply: _Reply) -> None:
        headers = [
            ("Content-Type", reply.content_type),
            ("Content-Length", str(len(reply.body))),
            ("Cache-Control", "no-store"),
            *reply.headers,
        ]
        writer.write(conn.send(h11.Response(status_code=reply.status, headers=headers)))
        writer.write(conn.send(h11.Data(data=reply.body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    def _gate(self, request: AdminRequest) -> _Reply | None:
        """The refusal for a request this listener must not serve, or None to go on."""
        path = request.path
        if not self._serves(path):
            where = "the control listener ([admin] control_bind)" if self.role == "public" else "[admin] bind"
            return _json_reply(404, {"error": f"{path} is not served here: it is on {where}"})
        governed = _is_control(path) or path in OPEN_ENDPOINT_CHOICES
        if (self.control_key is not None and governed and path not in self.open_endpoints
                and not request.bears(self.control_key)):
            reply = _json_reply(401, {"error": "missing or wrong control key (send Authorization: Bearer <[admin] control_key>)"})
            reply.headers = (("WWW-Authenticate", 'Bearer realm="edgeproxy admin"'),)
            return reply
        return None

    async def _dispatch(self, request: AdminRequest) -> _Reply:
        method, path = request.method, request.path
        api = self._api.get(path)
        if api is not None and method.decode("latin-1") == api[0]:
            answer = api[1](request)
            if inspect.isawaitable(answer):
                answer = await answer
            return _json_reply(*answer)
        route = self._routes.get(path) or (api[:2] if api is not None else None)
        if route is None:
            endpoints = sorted(p for p in [*self._routes, *self._api, "/admin/stream"] if self._serves(p))
            return _json_reply(404, {"error": f"no admin endpoint {path}", "endpoints": endpoints})
        allowed, handler = route
        if method.decode("latin-1") != allowed:
            reply = _json_reply(405, {"error": f"{path} takes {allowed}"})
            reply.headers = (("Allow", allowed),)
            return reply
        reply = handler()
        if inspect.isawaitable(reply):
            reply = await reply
        return reply

    def _serves(self, path: str) -> bool:
        if self.role == "public":
            return not _is_control(path)
        if self.role == "control":
            return _is_control(path) or path in OPEN_ENDPOINT_CHOICES
        return True

    # -- endpoints --------------------------------------------------------------

    def _metrics(self) -> _Reply:
        return _Reply(200, CONTENT_TYPE, self.source.metrics.render())

    def _readyz(self) -> _Reply:
        state, why = self.source.readiness()
        return _text_reply(200 if state == "ready" else 503, why + "\n")

    def _connections(self) -> _Reply:
        metrics = self.source.metrics
        series = [
            {"protocol": p, "route": r, "upstream": u, "server": s, "active": n}
            for (p, r, u, s), n in sorted(metrics.active.items())
            if n
        ]
        return _json_reply(200, {
            "total": sum(item["active"] for item in series),
            "by_protocol": metrics.active_by("protocol"),
            "by_route": metrics.active_by("route"),
            "by_upstream": metrics.active_by("upstream"),
            "by_server": metrics.active_by("server"),
            "connections": series,
        })

    async def _reload(self) -> _Reply:
        handler = self.source.on_reload
        if handler is None:
            return _json_reply(501, {"error": "reload is not available: this proxy has no reload handler registered"})
        try:
            result = handler()
            if inspect.isawaitable(result):
                result = await result
        except ConfigError as exc:
            return _json_reply(400, {"error": "the new configuration is invalid; the running one is kept",
                                     "problems": exc.format_lines()})
        except Exception as exc:  # the admin listener must answer, whatever the handler does
            log.exception("reload failed")
            return _json_reply(500, {"error": f"reload failed: {exc}"})
        return _json_reply(200, result if isinstance(result, dict) else {"reloaded": True})

    async def _stream(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Server-sent events: a snapshot now, then one per `stream_interval`, until the client leaves."""
        headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-store")]
        writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
        try:
            while True:
                snapshot = self.source.metrics.snapshot()
                snapshot["time"] = time.time()
                snapshot["ready"] = self.source.ready
                snapshot["ready_state"] = self.source.readiness()[0]
                writer.write(conn.send(h11.Data(data=b"data: " + json.dumps(snapshot).encode() + b"\n\n")))
                await writer.drain()
                try:
                    async with asyncio.timeout(self.stream_interval):
                        if not await reader.read(4096):
                            return  # the client went away
                except TimeoutError:
                    continue
        except asyncio.CancelledError:
            # The listener stops: end the chunked body properly, so the browser sees
            # a finished stream (and reconnects) rather than a broken one.
            writer.write(conn.send(h11.EndOfMessage()))
            raise

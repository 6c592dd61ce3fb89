"""The built-in example backend behind ``edgeproxy demo``.

A small HTTP/1.1 + WebSocket server written with the same runtime pieces as the
proxy itself (an asyncio ``Protocol`` driving h11, then wsproto after an
upgrade) so that a fresh install can be tried end to end without any other
server. ``config.example.toml`` points its ``app`` upstream at it
(127.0.0.1:9001).

Endpoints:

* ``GET /``         an HTML page whose inline script opens a WebSocket to
                    ``ws`` (relative to the page, i.e. ``/ws``) and shows the echo;
* ``GET /health``   ``200 ok`` (text/plain);
* ``GET /hub-demo`` the browser hub client's example page (``static/hub-demo.html``):
                    it loads ``/.edgeproxy/hub-client.js`` from the proxy and
                    subscribes to the proxy's hub at ``/hub``, so open it through
                    the proxy with a config that has that hub
                    (``examples/hub-demo.toml``);
* ``/headers``      any method: JSON with the method, path, query and headers
                    received -- handy to see the X-Forwarded-* the proxy adds;
* ``/ws``, ``/echo`` WebSocket echo: every text/binary message comes back
                    unchanged, pings are answered, close is echoed;
* anything else     ``404``.

HTTP keep-alive is supported (h11 decides when a connection must close).
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
from http import HTTPStatus
from typing import cast
from urllib.parse import urlsplit

import h11
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage
from wsproto.utilities import generate_accept_token

__all__ = ["start_demo_backend"]

WS_PATHS = frozenset({"/ws", "/echo"})
SERVER_HEADER = b"edgeproxy-demo"

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>edgeproxy demo backend</title>
<style>
  body { font: 16px/1.5 system-ui, sans-serif; max-width: 42rem; margin: 2rem auto; padding: 0 1rem; }
  code, pre { background: #f3f3f3; padding: 0 .25em; }
  #log { background: #f3f3f3; padding: .5em; min-height: 4em; white-space: pre-wrap; }
</style>
</head>
<body>
<h1>edgeproxy demo backend</h1>
<p>This page is served by the <strong>edgeproxy demo backend</strong>, a tiny
HTTP/1.1 + WebSocket server built into edgeproxy. If you reached it through the
proxy (for example <code>http://127.0.0.1:8080/</code>), HTTP proxying works.</p>
<p>The script below opens a WebSocket to <code>/ws</code> on the same host and
sends a message; the backend echoes it back.</p>
<pre id="log">connecting&hellip;</pre>
<p>See also: <a href="headers">/headers</a> (the request headers the backend
received, including the <code>X-Forwarded-*</code> headers added by the proxy)
and <a href="health">/health</a>.</p>
<script>
(function () {
  var log = document.getElementById("log");
  function say(line) { log.textContent += "\\n" + line; }
  // Resolve "ws" relative to this page so it also works under a path prefix.
  var url = new URL("ws", window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  log.textContent = "connecting to " + url.href;
  var ws = new WebSocket(url.href);
  ws.onopen = function () {
    var msg = "hello from the browser at " + new Date().toISOString();
    say("open; sent: " + msg);
    ws.send(msg);
  };
  ws.onmessage = function (ev) {
    say("echoed back: " + ev.data);
    say("WebSocket proxying works.");
    ws.close(1000, "done");
  };
  ws.onerror = function () { say("WebSocket error (is the upstream reachable?)"); };
  ws.onclose = function (ev) { say("closed: code " + ev.code); };
})();
</script>
</body>
</html>
"""


class _DemoProtocol(asyncio.Protocol):
    """One client connection: HTTP/1.1 via h11, switching to wsproto on upgrade."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.http = h11.Connection(h11.SERVER)
        self.ws: WSConnection | None = None
        self.request: h11.Request | None = None
        self.body_size = 0
        self.peer: object = None

    # -- asyncio.Protocol --------------------------------------------------- #

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # not an isinstance check: uvloop's transports do not subclass asyncio's
        self.transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            if self.ws.state is not ConnectionState.CLOSED:
                self.ws.receive_data(data)
                self._handle_ws()
        else:
            self.http.receive_data(data)
            self._handle_http()

    def eof_received(self) -> bool:
        if self.ws is not None:
            if self.ws.state is not ConnectionState.CLOSED:
                self.ws.receive_data(None)
                self._handle_ws()
        else:
            self.http.receive_data(b"")
            self._handle_http()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    # Back-pressure: stop reading while the peer does not drain what we echo.
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    # -- HTTP ---------------------------------------------------------------- #

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _handle_http(self) -> None:
        while self.transport is not None and self.ws is None:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(exc.error_status_hint, str(exc))
                return
            if event is h11.NEED_DATA:
                if self.http.they_are_waiting_for_100_continue:
                    self._write(self.http.send(h11.InformationalResponse(status_code=100, headers=[])))
                return
            if event is h11.PAUSED:
                if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
                    self.http.start_next_cycle()
                    continue
                return
            if isinstance(event, h11.Request):
                self.request = event
                self.body_size = 0
            elif isinstance(event, h11.Data):
                self.body_size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch()
                if self.http.our_state is h11.MUST_CLOSE:
                    self._close()
                    return
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return

    def _fail(self, status: int, message: str) -> None:
        """Answer a protocol error (if still possible) and close."""
        if self.http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                self._respond(status, f"{status} {HTTPStatus(status).phrase}: {message}\n".encode(), b"text/plain; charset=utf-8", close=True)
            except h11.LocalProtocolError:
                pass
        self._close()

    def _respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes,
        *,
        extra: list[tuple[bytes, bytes]] | None = None,
        close: bool = False,
    ) -> None:
        headers = [
            (b"server", SERVER_HEADER),
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            *(extra or []),
        ]
        if close:
            headers.append((b"connection", b"close"))
        reason = HTTPStatus(status).phrase.encode()
        out = self.http.send(h11.Response(status_code=status, headers=headers, reason=reason))
        if self.request is None or self.request.method != b"HEAD":
            out += self.http.send(h11.Data(data=body))
        out += self.http.send(h11.EndOfMessage())
        self._write(out)

    def _dispatch(self) -> None:
        request = self.request
        assert request is not None
        target = request.target.decode("ascii", "replace")
        parts = urlsplit(target)
        path = parts.path or "/"
        method = request.method.decode("ascii", "replace")
        text = b"text/plain; charset=utf-8"

        if path in WS_PATHS:
            self._upgrade(request)
        elif path == "/headers":
            headers: dict[str, str] = {}
            for name, value in request.headers:
                key = name.decode("latin-1")
                val = value.decode("latin-1")
                headers[key] = f"{headers[key]}, {val}" if key in headers else val
            info = {
                "method": method,
                "path": path,
                "query": parts.query,
                "http_version": request.http_version.decode("ascii", "replace"),
                "headers": headers,
                "body_length": self.body_size,
                "client": _format_peer(self.peer),
            }
            body = json.dumps(info, indent=2).encode() + b"\n"
            self._respond(200, body, b"application/json")
        elif path in ("/", "/health", "/hub-demo"):
            if method not in ("GET", "HEAD"):
                self._respond(405, b"method not allowed\n", text, extra=[(b"allow", b"GET, HEAD")])
            elif path == "/":
                self._respond(200, PAGE.encode(), b"text/html; charset=utf-8")
            elif path == "/hub-demo":
                page = importlib.resources.files("edgeproxy").joinpath("static/hub-demo.html").read_bytes()
                self._respond(200, page, b"text/html; charset=utf-8")
            else:
                self._respond(200, b"ok", text)
        else:
            self._respond(404, f"not found: {path}\n".encode(), text)

    # -- WebSocket ----------------------------------------------------------- #

    def _upgrade(self, request: h11.Request) -> None:
        """Validate an RFC 6455 opening handshake and switch to wsproto."""
        headers = {name: value for name, value in request.headers}
        connection = {t.strip().lower() for t in headers.get(b"connection", b"").split(b",")}
        text = b"text/plain; charset=utf-8"
        if (
            self.http.their_state is not h11.MIGHT_SWITCH_PROTOCOL
            or headers.get(b"upgrade", b"").lower() != b"websocket"
            or b"upgrade" not in connection
        ):
            self._respond(
                426,
                b"this endpoint is a WebSocket echo; connect with a WebSocket client\n",
                text,
                extra=[(b"upgrade", b"websocket"), (b"connection", b"upgrade")],
            )
            return
        if request.method != b"GET":
            self._respond(405, b"WebSocket upgrade requires GET\n", text, extra=[(b"allow", b"GET")])
            return
        if headers.get(b"sec-websocket-version") != b"13":
            self._respond(426, b"unsupported WebSocket version (need 13)\n", text, extra=[(b"sec-websocket-version", b"13")])
            return
        key = headers.get(b"sec-websocket-key")
        if not key:
            self._respond(400, b"missing Sec-WebSocket-Key\n", text)
            return
        response = h11.InformationalResponse(
            status_code=101,
            reason=b"Switching Protocols",
            headers=[
                (b"upgrade", b"websocket"),
                (b"connection", b"Upgrade"),
                (b"sec-websocket-accept", generate_accept_token(key)),
                (b"server", SERVER_HEADER),
            ],
        )
        self._write(self.http.send(response))
        trailing, _closed = self.http.trailing_data
        self.ws = WSConnection(ConnectionType.SERVER, trailing_data=bytes(trailing))
        self._handle_ws()

    def _handle_ws(self) -> None:
        ws = self.ws
        assert ws is not None
        out = b""
        for event in ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                # Echo fragment by fragment: large messages are streamed back
                # without being buffered whole.
                out += ws.send(Message(data=event.data, message_finished=event.message_finished))
            elif isinstance(event, Ping):
                out += ws.send(event.response())
            elif isinstance(event, CloseConnection):
                if ws.state is ConnectionState.REMOTE_CLOSING:
                    out += ws.send(event.response())  # echo the peer's close
                elif ws.state is ConnectionState.OPEN:
                    # wsproto reports a protocol violation (bad frame, bad
                    # UTF-8...) as a CloseConnection with the code to send.
                    out += ws.send(CloseConnection(code=event.code, reason=event.reason))
                self._write(out)
                self._close()  # the server closes TCP first (RFC 6455 7.1.1)
                return
        if out:
            self._write(out)


def _format_peer(peer: object) -> str | None:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return None if peer is None else str(peer)


async def start_demo_backend(host: str = "127.0.0.1", port: int = 9001) -> asyncio.AbstractServer:
    """Start the demo backend on ``host:port`` and return the listening server.

    Port 0 picks a free port (read it from ``server.sockets[0].getsockname()``).
    Stop it with ``server.close(); await server.wait_closed()``.
    """
    loop = asyncio.get_running_loop()
    return await loop.create_server(_DemoProtocol, host, port)

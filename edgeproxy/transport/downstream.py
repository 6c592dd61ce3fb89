"""The client-facing connection: HTTP exchanges, then possibly a WebSocket relay.

Theory of operation
-------------------
A `ClientConnection` is an asyncio Protocol with two modes.

*HTTP mode.*  Bytes go into the sans-IO `ServerSide`; each request head is
routed, an upstream connection is leased (pooled or new, round robin with
fallback to the next server when one refuses), and the request streams through
`ClientSide` to it.  One request is in flight at a time: pipelined requests wait,
unparsed, with reading paused, so they are answered in order and cannot grow
the buffers.  The response streams back the same way.  Bodies are never held
whole: at most one read's worth waits while the upstream connection is being
set up, and past the high-water mark the sending side stops being read.

*Event streams.*  A ``text/event-stream`` response (`transport.sse`) stays in
HTTP mode but leaves ``read_timeout`` behind: its `ProxiedEventStream` sets the
connection's timer (keepalive comments, upstream idle timeout, a drain's wait for
an event boundary) and ends it cleanly with ``end_event_stream``.  The client is
read again meanwhile, so its close ends the stream; a request pipelined behind it
waits unparsed, as behind any response, and past ``max_header_size`` reading stops.

*WebSocket mode.*  After the upstream's 101, both connections hand their bytes to
one `WebSocketRelay`, which returns what to forward (normally the very same
`bytes` object, written without a copy) and any actions (close frames, closes,
aborts) for this module to carry out.

Backpressure is symmetric: when a transport's write buffer passes
`[limits] buffer_high_water`, the other side's transport stops reading until it
drains.  Timeouts are checked by one shared periodic tick (`check_timers`), not
by a timer per connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from edgeproxy import logs
from edgeproxy.core import http1
from edgeproxy.core.admission import retry_after_header
from edgeproxy.transport.hub_sse import SSE_SUFFIX
from edgeproxy.transport.request_ids import new_request_id
from edgeproxy.core.heartbeat import AGE_EXPIRED, DEAD, PING
from edgeproxy.core.http1 import Body, ConnectionClosed, EndOfMessage, RequestHead, ResponseHead
from edgeproxy.core.http2 import PREFACE
from edgeproxy.core.websocket import (
    ABORT_CLIENT,
    ABORT_UPSTREAM,
    CLOSE_CLIENT,
    CLOSE_UPSTREAM,
    DRAIN_GRACE,
    DRAIN_GRACE_SECONDS,
    PONG_FROM_CLIENT,
    PONG_FROM_UPSTREAM,
    SEND_CLIENT,
    SEND_UPSTREAM,
    SHUTDOWN_CLIENT,
    SHUTDOWN_UPSTREAM,
    RelayState,
    WebSocketRelay,
    frame_rules,
    validate_client_handshake,
    validate_upstream_accept,
)
from edgeproxy.errors import LocalProtocolError, RemoteProtocolError
from edgeproxy.metrics import CLIENT_TO_UPSTREAM, HTTP, UPSTREAM_TO_CLIENT, WEBSOCKET, route_label
from edgeproxy.transport import resume
from edgeproxy.transport.edge import SessionMeters
from edgeproxy.transport.http2 import Http2Connection
from edgeproxy.transport.sse import ProxiedEventStream, wanted as sse_wanted
from edgeproxy.transport.upstream import UpstreamConnection, UpstreamRequest, UpstreamUnavailable, lease

if TYPE_CHECKING:
    from edgeproxy.config import RouteConfig
    from edgeproxy.transport.server import ProxyServer

log = logging.getLogger("edgeproxy")

_WS_VERSION_HEADER = [(b"Sec-WebSocket-Version", b"13")]
#: how long a connection drains after an error response before it is closed
LINGER_SECONDS = 2.0


class _Exchange(UpstreamRequest):
    """One request/response through the proxy (or one WebSocket handshake)."""

    __slots__ = ("pending_bytes", "websocket_key", "resume", "body_active")

    def __init__(self, head: RequestHead, route: RouteConfig, group, started: float):
        super().__init__(head, route, group, started)
        self.pending_bytes = 0
        self.websocket_key: bytes | None = None
        #: the client's resume offer (`core.resume.Offer`) when it asked for a resumable session
        self.resume = None
        #: set on every body read; the timer check turns it into `body_deadline` (0 = none)
        self.body_active = False


class ClientConnection(asyncio.Protocol):
    """One client connection.

    Args:
        server: the `ProxyServer`.
        listener: the `ListenerConfig` it came in on (None: a plain listener).
        real_peer: the client's (host, port) named by a PROXY protocol header
            (or by the worker that handed a resume attempt over).
        admitted_elsewhere: skip admission control (that worker counted it).
    """

    # Slots, not a __dict__: one of these lives as long as its connection, and
    # memory per idle WebSocket is a target (issue #3: at most 8 KiB).
    __slots__ = (
        "server", "listener", "http", "transport", "client_ip", "closed", "exchange", "relay", "upstream",
        "_real_peer", "_admitted_ip", "_refused", "_meters", "_throttled",
        "_paused", "_deadline", "_deadline_kind", "_ws_started", "_ws_route", "_ws_target", "_ws_group",
        "_lingering", "_metrics_key", "_opened_at", "_client_ping", "_upstream_ping", "_admitted_elsewhere",
        "_timer", "request_id", "_sniff",
    )

    def __init__(self, server: ProxyServer, listener=None, real_peer=None, admitted_elsewhere: bool = False):
        self.server = server
        self.listener = listener
        self._real_peer = real_peer
        #: a resume attempt another worker accepted and piped here: admission was its job
        self._admitted_elsewhere = admitted_elsewhere
        #: the address admission control counted this connection under (None: not counted)
        self._admitted_ip: str | None = None
        self._refused = False
        self._meters: SessionMeters | None = None
        #: side (True = client) -> loop time until which its reading is throttled
        self._throttled: dict[bool, float] = {}
        cfg = server.config
        self.http = http1.ServerSide(max_header_size=cfg.http.max_header_size)
        self.transport: asyncio.Transport | None = None
        self.client_ip = "-"
        self.closed = False
        self.exchange: _Exchange | None = None
        self.relay: WebSocketRelay | None = None
        self.upstream: UpstreamConnection | None = None  # the WebSocket's upstream
        self._paused: set[str] = set()
        self._deadline = 0.0
        self._deadline_kind = "header"
        self._ws_started = 0.0
        self._ws_route = ""
        self._ws_target = b""  # the upgrade's request target, for the ws_close log line
        self._ws_group = None  # the UpstreamGroup counting this WebSocket session
        self._lingering = False
        #: the metrics key of what this connection is now (HTTP, then maybe a WebSocket)
        self._metrics_key: tuple[str, str, str, str] | None = None
        self._opened_at = 0.0
        #: heartbeat pings that waited for a frame boundary (payload or None)
        self._client_ping: bytes | None = None
        self._upstream_ping: bytes | None = None
        #: this connection's entry on the server's timer wheel (None: never scheduled)
        self._timer = None
        #: the current request's id (X-Request-Id), kept after an upgrade for the ws_close line
        self.request_id = "-"
        #: on an h2c listener, the first bytes while they may still be the HTTP/2 preface
        self._sniff: bytes | None = None

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.set_write_buffer_limits(high=self.server.config.limits.buffer_high_water)
        peer = self._real_peer or transport.get_extra_info("peername")
        if peer:
            self.client_ip = peer[0]
        if self.server.admission is not None and not self._admitted_elsewhere and not self._admit():
            return
        self.server.connections.add(self)
        self._opened_at = now = self.server.now()
        self._metrics_key = self.server.metrics.connection_opened(HTTP, "", "", "")
        self._deadline = now + self.server.config.http.header_timeout
        self._rearm(now)
        listener = self.listener
        if listener is not None:
            if listener.tls:
                ssl_object = transport.get_extra_info("ssl_object")
                if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                    self._serve_http2(b"")
            elif listener.bind in self.server.h2c_binds:
                self._sniff = b""

    def data_received(self, data: bytes) -> None:
        # HTTP mode only: after the 101 the relay engine hands the bytes to the relay.
        if self._lingering:
            return  # discarded: the connection is being closed after an error
        if self._sniff is not None:
            data = self._sniff_h2c(data)
            if data is None:
                return
        if self.exchange is None and self._deadline_kind == "keepalive":
            self._deadline_kind = "header"
            now = self.server.now()
            self._deadline = now + self.server.config.http.header_timeout
            self._rearm(now)
        self.http.receive_data(data)
        exchange = self.exchange
        if exchange is not None and exchange.sse is not None:
            if self.http.buffered > self.server.config.http.max_header_size:
                self.pause_client_reading("in-flight")  # pipelined behind an event stream: wait, bounded
        self._process_client()

    def eof_received(self) -> bool:
        # Over TLS there is no half-close: the transport closes whatever we return, and
        # asyncio logs a warning for every True, so say False there.
        half_close = self.listener is None or not self.listener.tls
        if self.relay is not None:
            self.relay.client_eof()
            self._run_relay_actions()
            if self.relay.state is RelayState.CLOSED:
                # Nothing more goes to a client that has ended its side: close
                # ours, or the connection would sit half-closed forever.
                self._close()
            return half_close
        if self._lingering:
            self._close()
            return half_close
        exchange = self.exchange
        if exchange is not None and exchange.sse is not None:
            # An event stream never ends by itself: a client that closed its side is gone
            # (nginx's "client prematurely closed connection"); end it and free its upstream.
            self._log_http(exchange.head, exchange.status, exchange.bytes_out, self.server.now(), exchange.upstream,
                           error="client_gone")
            self._drop_exchange(abort_upstream=True)
            self._close()
            return half_close
        self.http.receive_data(b"")
        self._process_client()
        return half_close  # we close when the exchange in flight is done

    def _leave_server(self) -> None:
        """Off the server's books: its connection set, the timer wheel, the admission slot (once)."""
        self.closed = True
        server = self.server
        server.connections.discard(self)
        if self._timer is not None:
            server.timers.cancel(self._timer)
        if self._admitted_ip is not None and not self._refused:
            server.admission.release(self._admitted_ip)
            self._admitted_ip = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave_server()
        if self._refused:
            return  # never counted as open
        relay = self.relay
        if relay is not None:
            if relay.state is not RelayState.CLOSED:
                relay.client_eof()
                self._run_relay_actions()
            self._ws_group.session_closed(self.upstream.server, self)
            self._stop_heartbeats()
            self._log_ws_close()
            self._count_ws_close()
            return
        self.server.metrics.connection_closed(self._metrics_key, self.server.now() - self._opened_at)
        exchange = self.exchange
        if exchange is not None:
            if exchange.head.websocket:
                self.server.metrics.connection_failed(WEBSOCKET, "client_gone")
            if exchange.sse is not None:
                exchange.sse.finish(self.server.now())
            self.exchange = None
            if exchange.task is not None and not exchange.task.done():
                exchange.task.cancel()
            if exchange.upstream is not None:
                exchange.upstream.owner = None
                exchange.upstream.abort()

    def pause_writing(self) -> None:
        if self.exchange is not None and self.exchange.upstream is not None:
            self.exchange.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.exchange is not None and self.exchange.upstream is not None:
            self.exchange.upstream.resume_reading()

    # -- HTTP/2 (issue #16): transport/http2.py takes the connection over -------

    def _sniff_h2c(self, data: bytes) -> bytes | None:
        """On an h2c listener: the HTTP/2 preface hands the connection over; anything else is HTTP/1.1."""
        seen = self._sniff + data
        if seen[:len(PREFACE)] == PREFACE[:len(seen)]:
            if len(seen) < len(PREFACE):
                self._sniff = seen  # maybe the preface, split: wait for the rest
            else:
                self._sniff = None
                self._serve_http2(seen)
            return None
        self._sniff = None
        return seen

    def _serve_http2(self, data: bytes) -> None:
        """The client speaks HTTP/2 (ALPN h2, or the h2c preface): nothing more happens here."""
        server = self.server
        server.connections.discard(self)
        if self._timer is not None:
            server.timers.cancel(self._timer)
            self._timer = None
        self.closed = True
        Http2Connection(server, self.listener, self.transport, self.client_ip, admitted_ip=self._admitted_ip,
                        metrics_key=self._metrics_key, opened_at=self._opened_at, data=data)

    # -- admission control and origins (issue #9) ------------------------------

    def _admit(self) -> bool:
        """Admission control at accept; False after refusing with 503 (nothing is read)."""
        server = self.server
        verdict = server.admission.admit(self.client_ip, server.now())
        if verdict.admitted:
            self._admitted_ip = self.client_ip
            return True
        self._refused = True
        server.metrics.connection_refused(HTTP, "overloaded")
        server.metrics.limit_refused(verdict.reason)
        headers = [(b"Retry-After", retry_after_header(verdict.retry_after))]
        self._write(http1.error_response(503, f"overloaded ({verdict.reason}), retry later", extra_headers=headers))
        if verdict.reason == "max_connections":
            self._close()  # at the cap: spend nothing more on it
        else:
            # A storm of new clients: answer, then a lingering close so the 503 is read, not reset.
            self.server.connections.add(self)
            self._linger_close()
        return False

    def _origin_refused(self, head: RequestHead, route: RouteConfig) -> bool:
        """403 for a WebSocket upgrade whose Origin the route does not allow."""
        policy = self.server.origin_policies.get(id(route)) if head.websocket else None
        if policy is None or policy.allows(head.header(b"origin")):
            return False
        self.server.metrics.connection_refused(WEBSOCKET, "forbidden_origin")
        self.server.metrics.limit_refused("forbidden_origin")
        self._answer_locally(head, 403, "origin not allowed")
        return True

    def _check_rates(self, now: float) -> None:
        """The per-session message and byte rates, from the shared tick (see `SessionMeters`)."""
        relay = self.relay
        cfg = self.server.config.websocket
        if relay.state is not RelayState.OPEN:
            # closing: the close frames must get through, whatever the budget
            for client in list(self._throttled):
                del self._throttled[client]
                self._throttle(client, False)
            return
        for client in (True, False):
            if client:
                over = self._meters.over(now, True, relay.messages_from_client, relay.bytes_from_client)
            else:
                over = self._meters.over(now, False, relay.messages_from_upstream, relay.bytes_from_upstream)
            if not over:
                if client in self._throttled and now >= self._throttled[client]:
                    del self._throttled[client]
                    self._throttle(client, False)
                continue
            if cfg.rate_action == "close":
                self.server.metrics.limit_refused("rate_close")
                relay.fail_sender(client=client, code=1008, reason="message or byte rate exceeded")
                self._run_relay_actions()
                return
            if client not in self._throttled:
                self.server.metrics.limit_refused("rate_throttle")
            self._throttled[client] = now + over
            self._throttle(client, True)

    def _throttle(self, client: bool, pause: bool) -> None:
        """Stop (or resume) reading from one side; never resumes a side held back by backpressure."""
        own, other = (self.transport, self.upstream.transport) if client else (self.upstream.transport, self.transport)
        if own.is_closing():
            return
        if pause:
            own.pause_reading()
        elif other.get_write_buffer_size() <= self.server.config.limits.buffer_high_water:
            own.resume_reading()

    # -- helpers -------------------------------------------------------------

    def pause_client_reading(self, reason: str) -> None:
        if not self._paused and not self.closed:
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume_client_reading(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and not self.closed:
                self.transport.resume_reading()

    def _write(self, data: bytes) -> None:
        if data and not self.closed:
            self.transport.write(data)

    def _send_switching(self, headers: list[tuple[bytes, bytes]], data: bytes = b"", *, relayed: bool = False) -> None:
        """Open the WebSocket the client asked for (transport/resume.py): a 101 with ``headers``, then ``data``.

        Args:
            headers: the answer's fields, in HTTP/1.1 form.
            data: frames that go right after it (a close 4409).
            relayed: the upstream's 101 passed on (h11 takes the switch); else the proxy's own answer
                to an upgrade it did not forward (a resume attempt), ``headers`` complete.

        On an h2 stream `http2_websocket.H2WebSocket` answers ``:status 200`` instead (RFC 8441 section 5).
        """
        if relayed:
            self._write(self.http.send_switching_protocols(b"Switching Protocols", headers) + data)
        else:
            self._write(http1.serialize_head(b"HTTP/1.1 101 Switching Protocols", headers) + data)

    def _switched_early(self) -> bytes:
        """The client's bytes that came after its upgrade's head, for whoever takes the socket over."""
        return self.http.switched_trailing_data()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def _fail_request(self, status: int, message: str, extra_headers=()) -> None:
        """Answer a broken request and close the connection (its framing is lost)."""
        self._write(http1.error_response(status, message, extra_headers=list(extra_headers)))
        self._log_http(self.exchange.head if self.exchange else None, status, 0, self.server.now())
        self._drop_exchange(abort_upstream=True)
        self._linger_close()

    def _linger_close(self) -> None:
        """Half-close after an error response and discard what the client still sends.

        Closing a socket with unread input makes the kernel send a reset, which can
        destroy the response before the client reads it; so, like nginx's
        lingering_close, send FIN, drain for a moment, then close.
        """
        if self.closed:
            return
        if not self.transport.can_write_eof():
            self._close()
            return
        self.transport.write_eof()
        self._lingering = True
        self._paused.clear()
        self.transport.resume_reading()
        self._deadline_kind = "linger"
        now = self.server.now()
        self._deadline = now + min(LINGER_SECONDS, self.server.config.http.header_timeout or LINGER_SECONDS)
        self._rearm(now)

    # -- HTTP mode: the client side -------------------------------------------

    def _process_client(self) -> None:
        while not self.closed and not self._lingering and self.relay is None:
            try:
                event = self.http.next_event()
            except RemoteProtocolError as exc:
                if self.exchange is not None and self.exchange.status:
                    # The response is under way: nothing sane can be sent now.
                    self._cut_response(self.exchange, "client_invalid")
                    return
                self._fail_request(exc.status_hint, f"bad request: {exc}")
                return
            if event is http1.NEED_DATA or event is http1.PAUSED:
                return
            if isinstance(event, RequestHead):
                self._on_request(event)
            elif isinstance(event, Body):
                self._on_body(event.data)
            elif isinstance(event, EndOfMessage):
                self._on_request_end()
            elif isinstance(event, ConnectionClosed):
                if self.exchange is None:
                    self._close()
                return

    def _on_request(self, head: RequestHead) -> None:
        server = self.server
        if server.hubs:
            if head.websocket and head.path in server.hubs:
                server.hubs[head.path].take_over(self, head)  # served by the proxy: transport/hub.py
                return
            if head.path.endswith(SSE_SUFFIX) and head.path[: -len(SSE_SUFFIX)] in server.hubs:
                server.hubs[head.path[: -len(SSE_SUFFIX)]].take_over_sse(self, head)  # transport/hub_sse.py
                return
        now = server.now()
        if server.config.http.request_id:
            self.request_id, outcome = http1.request_id(head, new_request_id)
            server.metrics.request_id(outcome)
        if head.path in resume.CLIENT_SCRIPTS and resume.serve_client_js(self, head):
            return
        route = server.router.match(head.host, head.path)
        if route is None:
            if head.websocket:
                server.metrics.connection_refused(WEBSOCKET, "no_route")
            self._answer_locally(head, 404, f"no route for host {head.host!r} and path {head.path!r}")
            return
        if self._rate_refused(head, route, now) or self._origin_refused(head, route) or self._too_large(head, route):
            return
        exchange = _Exchange(head, route, server.groups[route.upstream], now)
        self.exchange = exchange
        exchange.max_body = self._max_body(route)
        if head.has_body and server.config.http.body_timeout:
            exchange.body_deadline = now + server.config.http.body_timeout
        if head.websocket:
            try:
                exchange.websocket_key = validate_client_handshake(head)
            except RemoteProtocolError as exc:
                server.metrics.connection_refused(WEBSOCKET, "bad_handshake")
                self._fail_request(400, f"bad WebSocket handshake: {exc}", _WS_VERSION_HEADER)
                return
            try:
                if resume.on_upgrade(self, exchange):
                    return  # a resume attempt, answered by the proxy itself
            except RemoteProtocolError as exc:
                server.metrics.connection_refused(WEBSOCKET, "bad_handshake")
                self._fail_request(400, f"bad WebSocket handshake: {exc}", _WS_VERSION_HEADER)
                return
        self._deadline = 0.0
        exchange.task = server.loop.create_task(self._connect(exchange))
        self._rearm(exchange.started)

    def _answer_locally(self, head: RequestHead, status: int, message: str, extra_headers: list = ()) -> None:
        """An error answered by the proxy itself; keeps the connection if it can.

        With a body still to come the answer says `Connection: close` and the
        connection closes (lingering): the unread body must not be parsed as the
        next request.
        """
        if head.has_body:
            self._write(http1.error_response(status, message, extra_headers=list(extra_headers)))
            self._log_http(head, status, 0, self.server.now())
            self._linger_close()
            return
        event = self.http.next_event()  # the EndOfMessage of a body-less request
        if not isinstance(event, EndOfMessage):  # pragma: no cover - h11 yields it at once
            self._close()
            return
        self._write(self.http.send_simple(status, message, extra_headers))
        self._log_http(head, status, 0, self.server.now())
        self._end_cycle()

    def _on_body(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        exchange.body_active = True
        exchange.body_bytes += len(data)
        if exchange.max_body and exchange.body_bytes > exchange.max_body:
            # A chunked body (a Content-Length was judged at the head): whatever
            # reached the upstream stays an unfinished request, its connection is reset.
            self._client_failed(exchange, 413, f"request body over the limit of {exchange.max_body} bytes", "max_body_size")
            return
        up = exchange.upstream
        if up is not None:
            up.write(up.http.send_data(data))
        else:
            exchange.pending.append(data)
            exchange.pending_bytes += len(data)
            if exchange.pending_bytes >= self.server.config.limits.buffer_high_water:
                self.pause_client_reading("connecting")

    def _on_request_end(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        exchange.request_done = True
        # One request in flight: later pipelined requests wait unread.
        self.pause_client_reading("in-flight")
        up = exchange.upstream
        if up is not None and not up.closed:
            up.write(up.http.send_end())
            self._arm_read_deadline(exchange)

    # -- HTTP mode: limits on the client's requests ------------------------------

    def _rate_refused(self, head: RequestHead, route: RouteConfig, now: float) -> bool:
        """429 with Retry-After for a client over its route's ``rate_limit``."""
        buckets = self.server.route_limits.get(id(route))
        if buckets is None:
            return False
        wait = buckets.take(self.client_ip, now)
        if not wait:
            return False
        self.server.metrics.limit_refused("route_rate")
        if head.websocket:
            self.server.metrics.connection_refused(WEBSOCKET, "overloaded")
        self._answer_locally(head, 429, "too many requests from this address, retry later",
                             [(b"Retry-After", retry_after_header(wait))])
        return True

    def _max_body(self, route: RouteConfig) -> int:
        return route.max_body_size if route.max_body_size is not None else self.server.config.http.max_body_size

    def _too_large(self, head: RequestHead, route: RouteConfig) -> bool:
        """413 for a Content-Length over the limit, before anything is forwarded (nginx's client_max_body_size)."""
        limit = self._max_body(route)
        length = http1.content_length(head) if limit else None
        if length is None or length <= limit:
            return False
        self.server.metrics.limit_refused("max_body_size")
        self._answer_locally(head, 413, f"request body of {length} bytes is over the limit of {limit} bytes")
        return True

    def _client_failed(self, exchange: _Exchange, status: int, message: str, reason: str) -> None:
        """The client's body broke a limit: ``status`` if no response began, else the response is cut."""
        self.server.metrics.limit_refused(reason)
        if exchange.status:
            self._cut_response(exchange, reason)
        else:
            self._fail_request(status, message)

    def _cut_response(self, exchange: _Exchange, reason: str) -> None:
        """End a response that has begun: nothing sane can follow, so both connections are reset.

        The client sees the connection end without the last chunk or short of its
        Content-Length, never a complete-looking body; the line is logged and counted.
        """
        self.server.metrics.response_truncated(reason)
        self._log_http(exchange.head, exchange.status, exchange.bytes_out, self.server.now(), exchange.upstream,
                       error=reason)
        self._drop_exchange(abort_upstream=True)
        if not self.closed:
            self.closed = True
            self.transport.abort()

    def _arm_read_deadline(self, exchange: _Exchange) -> None:
        group_cfg = exchange.group.config
        timeout = self.server.config.websocket.handshake_timeout if exchange.head.websocket else group_cfg.read_timeout
        exchange.deadline = self.server.now() + timeout if timeout else 0.0

    # -- HTTP mode: the upstream side -----------------------------------------

    async def _connect(self, exchange: _Exchange) -> None:
        server = self.server
        if exchange.head.websocket:
            # The handshake deadline covers connecting too.
            exchange.deadline = server.now() + (server.config.websocket.handshake_timeout or 1e9)
        try:
            conn = await lease(exchange, self.client_ip, pooled=not exchange.head.websocket, metrics=server.metrics,
                               loop=server.loop, now=server.now)
        except UpstreamUnavailable as exc:
            if self.exchange is exchange and not self.closed:
                self._upstream_failed(exchange, exc.status, exc.message, exc.reason, extra_headers=exc.headers)
            return
        if self.exchange is not exchange or self.closed:
            conn.close()
            return
        try:
            self._attach(exchange, conn)
        except LocalProtocolError as exc:
            log.warning("request cannot be relayed to %s: %s", conn.server, exc)
            self._upstream_failed(exchange, 502, "request cannot be relayed")

    def _attach(self, exchange: _Exchange, conn: UpstreamConnection) -> None:
        exchange.upstream = conn
        conn.owner = self
        head = exchange.head
        headers = http1.forwarded_request_headers(
            head, client_ip=self.client_ip, scheme="https" if self.listener is not None and self.listener.tls else "http",
            request_id=self.request_id if self.server.config.http.request_id else None,
        )
        out = conn.http.send_request(head, headers)
        for chunk in exchange.pending:
            out += conn.http.send_data(chunk)
        exchange.pending.clear()
        exchange.pending_bytes = 0
        if exchange.request_done:
            out += conn.http.send_end()
        conn.write(out)
        if exchange.request_done:
            # The response wait starts once the whole request is out.
            self._arm_read_deadline(exchange)
        self.resume_client_reading("connecting")
        if self.transport.get_write_buffer_size() > self.server.config.limits.buffer_high_water:
            conn.pause_reading()

    def _upstream_failed(
        self, exchange: _Exchange, status: int, message: str, reason: str = "upstream_invalid", extra_headers=()
    ) -> None:
        """No usable answer from the upstream: answer the client ourselves.

        `reason` is the metrics' failure reason when this was a WebSocket handshake.
        """
        if exchange.head.websocket and not exchange.status:
            self.server.metrics.connection_failed(WEBSOCKET, reason)
        if exchange.status:
            # Part of the response is already out: the client must see a broken response.
            self._cut_response(exchange, reason)
            return
        if exchange.request_done:
            self._write(self.http.send_simple(status, message, extra_headers))
            self._log_http(exchange.head, status, 0, self.server.now())
            self._drop_exchange(abort_upstream=True)
            self._end_cycle()
        else:
            self._fail_request(status, message, extra_headers)

    def upstream_events(self, conn: UpstreamConnection) -> None:
        """Called by the upstream Protocol after it received bytes (or EOF)."""
        exchange = self.exchange
        if exchange is None or exchange.upstream is not conn:
            conn.abort()
            return
        while True:
            try:
                event = conn.http.next_event()
            except RemoteProtocolError as exc:
                log.warning("upstream %s: %s", conn.server, exc)
                self._upstream_failed(exchange, 502, "invalid response from upstream")
                return
            if event is http1.NEED_DATA:
                return
            if isinstance(event, ResponseHead):
                if not self._on_response_head(exchange, conn, event):
                    return
            elif isinstance(event, Body):
                sse = exchange.sse
                if sse is None:
                    exchange.bytes_out += len(event.data)
                    self._write(self.http.send_data(event.data))
                    continue
                data, end = sse.relay(event.data, self.server.now())
                exchange.bytes_out += len(data)
                self._write(self.http.send_data(data))
                if end:  # a drain waited for this event boundary
                    self.end_event_stream(sse, sse.retry())
                    return
            elif isinstance(event, EndOfMessage):
                self._on_response_end(exchange, conn)
                return
            elif isinstance(event, ConnectionClosed) or event is http1.PAUSED:
                self._upstream_closed_early(exchange, conn)
                return

    def _on_response_head(self, exchange: _Exchange, conn: UpstreamConnection, head: ResponseHead) -> bool:
        if head.status == 101:
            if exchange.websocket_key is None:
                self._upstream_failed(exchange, 502, "upstream switched protocols unasked")
                return False
            try:
                validate_upstream_accept(exchange.websocket_key, head)
            except RemoteProtocolError as exc:
                log.warning("upstream %s: %s", conn.server, exc)
                self._upstream_failed(exchange, 502, "upstream's WebSocket handshake is invalid")
                return False
            self._start_websocket(exchange, conn, head)
            return False
        if exchange.websocket_key is not None and head.status >= 200:
            self.server.metrics.connection_refused(WEBSOCKET, "upstream_refused")
        headers = http1.forwarded_response_headers(head.headers)
        if head.status >= 200:
            headers += self._balance_response(exchange, conn, head.status)
        informational = ResponseHead(head.status, head.reason, head.http_version, headers)
        try:
            if head.status < 200:
                self._write(self.http.send_informational(informational))
                return True
            exchange.status = head.status
            self._write(self.http.send_response(informational))
        except LocalProtocolError as exc:
            log.warning("upstream %s: response cannot be relayed: %s", conn.server, exc)
            self._upstream_failed(exchange, 502, "upstream's response cannot be relayed")
            return False
        if sse_wanted(exchange.head.method, head.status, head.headers):
            # An event stream: no read_timeout, keepalives, paced end on drain (transport/sse.py).
            now = self.server.now()
            exchange.sse = sse = ProxiedEventStream(self, self.server, exchange.route, exchange.group, conn.server, now,
                                                    head.headers)
            exchange.deadline = 0.0
            self._rearm(now)
            if exchange.request_done:
                # Read the client again, or its close would go unseen for as long as the stream
                # lasts (nothing is parsed: h11 holds what follows until the cycle ends; see data_received).
                self.resume_client_reading("in-flight")
            if self.server.draining:  # its request was in flight when the drain began
                self.end_event_stream(sse, sse.retry())
                return False
        return True

    def end_event_stream(self, stream: ProxiedEventStream, retry: bytes) -> None:
        """End a relayed event stream cleanly from the proxy: `retry` (maybe b""), then the end of the body.

        Chunked: the last chunk, and the connection goes on (or closes while draining);
        close-delimited (an HTTP/1.0 client) or Content-Length framed: the connection closes.
        The upstream connection is closed: its response was not read to the end.
        """
        exchange = self.exchange
        if exchange is None or exchange.sse is not stream:
            return
        try:
            out = self.http.send_data(retry) if retry else b""
            out += self.http.send_end()
        except LocalProtocolError:  # a Content-Length body: nothing more fits; the client sees it short
            out = None
        if out:
            exchange.bytes_out += len(retry)
            self._write(out)
        self._log_http(exchange.head, exchange.status, exchange.bytes_out, self.server.now(), exchange.upstream)
        self._drop_exchange(abort_upstream=True)
        if out is None or not exchange.request_done:
            self._close()
        else:
            self._end_cycle()

    def rearm_event_stream(self, now: float) -> None:
        self._rearm(now)

    def _on_response_end(self, exchange: _Exchange, conn: UpstreamConnection) -> None:
        self._write(self.http.send_end())
        now = self.server.now()
        if exchange.sse is not None:
            exchange.sse.finish(now)
        self._log_http(exchange.head, exchange.status, exchange.bytes_out, now, conn)
        exchange.upstream = None
        if conn.http.reusable and not conn.closed:
            exchange.group.put_idle(conn, now)
        else:
            conn.owner = None
            conn.close()
        self.exchange = None
        self._end_cycle()

    def _upstream_closed_early(self, exchange: _Exchange, conn: UpstreamConnection) -> None:
        """The upstream closed before finishing its response."""
        if (
            not exchange.status
            and conn.reused
            and not exchange.retried
            and not exchange.head.has_body
            and exchange.request_done
        ):
            # A pooled connection the server had just closed: try once more on a fresh one.
            exchange.retried = True
            conn.owner = None
            conn.abort()
            exchange.upstream = None
            exchange.task = self.server.loop.create_task(self._connect(exchange))
            return
        log.warning("upstream %s closed the connection before the response ended", conn.server)
        self._upstream_failed(exchange, 502, "upstream closed the connection")

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        if self.relay is not None:
            if conn is self.upstream:
                self.relay.upstream_eof()
                self._run_relay_actions()
            return
        exchange = self.exchange
        if exchange is not None and exchange.upstream is conn:
            self._upstream_closed_early(exchange, conn)

    def _drop_exchange(self, *, abort_upstream: bool) -> None:
        exchange = self.exchange
        self.exchange = None
        if exchange is None:
            return
        if exchange.sse is not None:
            exchange.sse.finish(self.server.now())
        if exchange.task is not None and not exchange.task.done():
            exchange.task.cancel()
        up = exchange.upstream
        if up is not None:
            up.owner = None
            if abort_upstream:
                up.abort()

    def _end_cycle(self) -> None:
        """The response is complete: go on with the next request or close."""
        self.exchange = None
        if self.closed:
            return
        if not self.http.keep_alive or self.server.draining:
            self._close()
            return
        self.http.start_next_cycle()
        self._deadline_kind = "keepalive"
        now = self.server.now()
        self._deadline = now + self.server.config.http.keepalive_timeout
        self._rearm(now)
        self.resume_client_reading("in-flight")
        self.resume_client_reading("connecting")
        self._process_client()

    # -- balancing hooks (server choice, affinity cookie, passive health) -------

    def _balance_response(self, exchange: _Exchange, conn: UpstreamConnection, status: int) -> list:
        """Passive health for a final response, and the Set-Cookie that pins the client to `conn.server`."""
        exchange.group.response_status(conn.server, status, self.server.now())
        return exchange.group.cookie_header(exchange.choice, conn.server)

    def close_websocket(self, code: int, reason: str) -> None:
        """End a relayed WebSocket from the proxy (rebalancing, its server went down): close frames both ways."""
        relay = self.relay
        if relay is not None and relay.state is RelayState.OPEN:
            relay.close_both(code, reason)
            self._run_relay_actions()

    # -- WebSocket mode ---------------------------------------------------------

    def _start_websocket(self, exchange: _Exchange, conn: UpstreamConnection, head: ResponseHead) -> None:
        headers = http1.forwarded_response_headers(head.headers, switching=True)
        headers += self._balance_response(exchange, conn, 101)
        if exchange.resume is not None and resume.start_session(self, exchange, conn, head, headers):
            return  # a resumable session: transport/resume.py relays it message by message
        self._ws_group = exchange.group
        exchange.group.session_opened(conn.server, self)
        self._write(self.http.send_switching_protocols(head.reason or b"Switching Protocols", headers))
        now = self.server.now()
        relay = self._begin_relay(exchange, conn, head, now)
        client_early = self.http.switched_trailing_data()
        upstream_early = conn.http.trailing_data()
        # Neither side speaks HTTP again: let the parsers' state go (an idle
        # WebSocket should cost as little memory as it can).
        self.http = conn.http = None
        # From here on each socket's bytes go straight to the relay and out to the
        # other socket: no HTTP-mode checks, and no Python at all when compiled (the
        # relay engine reads and writes both sockets below the loop).
        self._paused.discard("in-flight")
        self._paused.discard("connecting")
        server = self.server
        engine = server.relay_engine
        self.transport, conn.transport = engine.relay_pair(
            relay, self.transport, conn.transport, self, conn, self._run_relay_actions)
        if not self._paused:
            self.transport.resume_reading()
        self.register_heartbeats(now)
        self._rearm(now)
        engine.feed(conn.transport, upstream_early)
        engine.feed(self.transport, client_early)
        if server.draining:
            # Opened while the proxy drains (its upgrade was in flight): send it away at once.
            self.close_websocket(server.config.shutdown.close_code, "server shutting down")

    def _begin_relay(self, exchange: _Exchange, conn: UpstreamConnection, head: ResponseHead,
                     now: float) -> WebSocketRelay:
        """The session's relay, meters and signals (the HTTP/1.1 101 and the HTTP/2 200 alike)."""
        cfg = self.server.config.websocket
        self.relay = relay = WebSocketRelay(
            max_message_size=cfg.max_message_size,
            # up to 10% shorter, drawn once: idle sessions opened together do not all end together
            idle_timeout=cfg.idle_timeout * (1.0 - 0.1 * self.server.rng.random()),
            close_timeout=cfg.close_timeout,
            mask_key_source=_mask_key,
            now=now,
            max_frame_size=cfg.max_frame_size,
            rules=frame_rules(cfg.strict, http1.header_value(head.headers, b"sec-websocket-extensions")),
            drain_grace=DRAIN_GRACE_SECONDS,
        )
        if SessionMeters.wanted(cfg):
            self._meters = SessionMeters(cfg, now)
        self._log_http(exchange.head, 101, 0, now, conn, event="ws_open")
        metrics = self.server.metrics
        if self._metrics_key is not None:
            metrics.connection_closed(self._metrics_key, now - self._opened_at)  # its HTTP life ends here
        route = exchange.route
        self._metrics_key = metrics.connection_opened(
            WEBSOCKET, route_label(route.host, route.path_prefix), route.upstream, str(conn.server)
        )
        self.upstream = conn
        conn.websocket = True
        self.exchange = None
        self._deadline = 0.0
        self._ws_started = now
        self._ws_route = exchange.route.upstream
        self._ws_target = exchange.head.target
        return relay

    def register_heartbeats(self, now: float) -> None:
        """Put this session on the heartbeat trackers (at its start, or after a reload rebuilt them)."""
        server = self.server
        if server.client_beats is not None:
            server.client_beats.register(self, now)
        if server.upstream_beats is not None:
            server.upstream_beats.register(self, now)

    def _stop_heartbeats(self) -> None:
        server = self.server
        if server.client_beats is not None:
            server.client_beats.unregister(self)
        if server.upstream_beats is not None:
            server.upstream_beats.unregister(self)

    def heartbeat(self, action: str, client: bool, payload: bytes | None) -> None:
        """Carry out a heartbeat decision (`core.heartbeat`) for the client's or the upstream's side."""
        relay = self.relay
        if relay is None or self.closed:
            return
        if action == PING:
            sent = relay.ping_client(payload) if client else relay.ping_upstream(payload)
            if not sent and relay.state is RelayState.OPEN:
                # Inside a frame: the next tick tries again (check_timers).
                if client:
                    self._client_ping = payload
                else:
                    self._upstream_ping = payload
                self._rearm(self.server.now())
        elif action == DEAD:
            self.server.metrics.heartbeat_failed()
            side = "client" if client else "upstream"
            log.warning("WebSocket %s %s did not answer a ping within pong_timeout: closing the session",
                        side, self.client_ip if client else self.upstream.server)
            if client:
                relay.client_eof()  # the upstream gets 1001 "client went away"
                self._run_relay_actions()
                if not self.closed:
                    self.closed = True
                    self.transport.abort()
            else:
                relay.upstream_eof()  # the client gets 1014 "upstream went away"
                self._run_relay_actions()
                self.upstream.abort()
            return
        elif action == AGE_EXPIRED:
            self.close_websocket(1001, "maximum connection age reached; please reconnect")
            return
        if relay.actions:
            self._run_relay_actions()

    def _retry_pings(self) -> None:
        relay = self.relay
        if self._client_ping is not None and relay.ping_client(self._client_ping):
            self._client_ping = None
        if self._upstream_ping is not None and relay.ping_upstream(self._upstream_ping):
            self._upstream_ping = None
        if relay.state is not RelayState.OPEN:
            self._client_ping = self._upstream_ping = None
        if relay.actions:
            self._run_relay_actions()

    def _pong(self, beats, payload: bytes | None) -> None:
        if beats is None or payload is None:
            return
        rtt = beats.pong_received(self, payload, self.server.now())
        if rtt is not None:
            self.server.metrics.ping_rtt(rtt)

    def drain_http(self) -> None:
        """The proxy drains: an idle HTTP connection closes now; one with a request in flight after it."""
        if self.relay is None and self.exchange is None and not self.http.buffered:
            self._close()

    def _run_relay_actions(self) -> None:
        relay = self.relay
        up = self.upstream
        actions = relay.actions[:]
        relay.actions.clear()
        for kind, data in actions:
            if kind == SEND_CLIENT:
                self._write(data)
            elif kind == SEND_UPSTREAM:
                up.write(data)
            elif kind == CLOSE_CLIENT:
                self._close()
            elif kind == CLOSE_UPSTREAM:
                up.close()
            elif kind == ABORT_CLIENT:
                if not self.closed:
                    self.closed = True
                    self.transport.abort()
            elif kind == ABORT_UPSTREAM:
                up.abort()
            elif kind == SHUTDOWN_CLIENT:
                if not self.closed and self.transport.can_write_eof():
                    self.transport.write_eof()
            elif kind == SHUTDOWN_UPSTREAM:
                up.shutdown()
            elif kind == DRAIN_GRACE:
                # shorter than a tick, and rare (a client broke a rule): a timer of its own
                self.server.loop.call_later(data, self._drain_grace_over)
            elif kind == PONG_FROM_CLIENT:
                self._pong(self.server.client_beats, data)
            elif kind == PONG_FROM_UPSTREAM:
                self._pong(self.server.upstream_beats, data)
        # The actions may have begun a close (a deadline; WAKE_TIMERS says only that) or ended the session.
        self._rearm(self.server.now())

    def _drain_grace_over(self) -> None:
        relay = self.relay
        if relay is not None and relay.state is RelayState.DRAINING:
            relay.end_grace()
            if relay.actions:
                self._run_relay_actions()

    def _count_ws_close(self) -> None:
        """Fold the session's totals into the metrics (see `Metrics`: live to folded at once)."""
        relay = self.relay
        metrics = self.server.metrics
        metrics.add_messages(CLIENT_TO_UPSTREAM, relay.messages_from_client, relay.bytes_from_client)
        metrics.add_messages(UPSTREAM_TO_CLIENT, relay.messages_from_upstream, relay.bytes_from_upstream)
        # The code the client saw: the proxy's own (then the upstream's close, if any,
        # was not relayed: it came after, or in its place, see DRAINING), or the upstream's.
        if relay.proxy_close_code is not None:
            code = relay.proxy_close_code
        elif relay.upstream_close is not None:
            code = relay.upstream_close[0]
        else:
            code = None
        metrics.connection_closed(self._metrics_key, self.server.now() - self._ws_started, code)

    def _log_ws_close(self) -> None:
        relay = self.relay
        now = self.server.now()
        logs.access({
            "event": "ws_close",
            "client": self.client_ip,
            "path": self._ws_target.decode("latin-1"),
            "request_id": self.request_id,
            "upstream": self._ws_route,
            "server": str(self.upstream.server),
            "client_close": relay.client_close[0] if relay.client_close else None,
            "upstream_close": relay.upstream_close[0] if relay.upstream_close else None,
            "proxy_close": relay.proxy_close_code,
            "duration": round(now - self._ws_started, 3),
            "bytes_in": relay.bytes_from_client,
            "bytes_out": relay.bytes_from_upstream,
            "msgs_in": relay.messages_from_client,
            "msgs_out": relay.messages_from_upstream,
        })

    # -- timers (the server's timer wheel calls check_timers when one is due) ----

    def _next_check(self, now: float) -> float:
        """When `check_timers` must run next: 0.0 when nothing can expire before something changes.

        A request in flight (its connect and read deadlines follow the upstream's
        activity) and a session with a ping to retry or rate limits to meter are
        looked at every tick; an idle connection only by its deadline.
        """
        if self.closed:
            return 0.0
        relay = self.relay
        if relay is not None:
            if self._client_ping is not None or self._upstream_ping is not None or self._meters is not None:
                return now
            return relay.next_check(now)
        exchange = self.exchange
        if exchange is not None:
            if exchange.sse is not None and (exchange.request_done or not exchange.body_deadline):
                return exchange.sse.next_check()  # a long-lived stream: only by its own timers
            return now
        return self._deadline

    def _rearm(self, now: float) -> None:
        """Put this connection on the timer wheel for its next check (or take it off)."""
        self._timer = self.server.timers.arm(self._timer, self, self._next_check(now))

    def check_timers(self, now: float) -> None:
        relay = self.relay
        if relay is not None:
            if self._client_ping is not None or self._upstream_ping is not None:
                self._retry_pings()
            relay.check_timers(now)
            if relay.actions:
                self._run_relay_actions()
            if self._meters is not None:
                self._check_rates(now)
            return
        exchange = self.exchange
        if exchange is not None:
            if exchange.body_deadline and not exchange.request_done:
                if exchange.body_active or self._paused:
                    # read from since the last check, or not read at all (backpressure): not the client's stall
                    exchange.body_active = False
                    exchange.body_deadline = now + self.server.config.http.body_timeout
                elif now >= exchange.body_deadline:
                    self._client_failed(exchange, 408, "request body not received in time", "body_timeout")
                    return
            if exchange.sse is not None:  # exempt from read_timeout: keepalives, upstream idle, drain
                data = exchange.sse.check(now)
                if data:
                    self._write(self.http.send_data(data))
                return
            if exchange.connect_deadline and now >= exchange.connect_deadline and not exchange.connect_timed_out:
                exchange.connect_timed_out = True
                exchange.task.cancel()
            up = exchange.upstream
            if up is not None and up.active and not exchange.head.websocket:
                up.active = False
                self._arm_read_deadline(exchange)
            elif exchange.deadline and now >= exchange.deadline:
                if exchange.head.websocket:
                    what = "WebSocket handshake"
                elif exchange.status:
                    what = f"more of the response body after {exchange.bytes_out} bytes"
                else:
                    what = "response"
                log.warning("upstream %s: no %s within the timeout", exchange.group.config.name, what)
                self._upstream_failed(exchange, 504, f"upstream timed out ({what})", "upstream_timeout")
            return
        if self._deadline and now >= self._deadline:
            if self._deadline_kind == "header" and self.http.buffered:
                self._write(http1.error_response(408, "request head not received in time"))
                self._linger_close()
                return
            self._close()

    def shutdown(self) -> None:
        """Close now: a close frame first where one can go, then FIN (see `ProxyServer.drain_and_stop`)."""
        if self.relay is not None and self.relay.state is not RelayState.CLOSED:
            self.relay.close_both(self.server.config.shutdown.close_code, "server shutting down")
            self._run_relay_actions()
        if self.exchange is not None:
            self._drop_exchange(abort_upstream=True)
        self._close()
        if self.upstream is not None:
            self.upstream.close()

    # -- logging -----------------------------------------------------------------

    def _log_http(self, head, status, bytes_out, now, conn=None, event="http", error=None) -> None:
        """Count the request and write its access-log line (the fields `[logging] access_log_fields` names)."""
        exchange = self.exchange
        started = exchange.started if exchange is not None else now
        if event == "http":
            self.server.metrics.request_done(status, now - started)
        if not logs.access_enabled():
            return
        selected = self.server.config.logging.access_log_fields
        fields = {
            "event": event,
            "client": self.client_ip,
            "method": head.method.decode("latin-1") if head else "-",
            "path": head.target.decode("latin-1") if head else "-",
            "host": head.host if head else "-",
            "status": status,
            "bytes": bytes_out,
            "bytes_in": exchange.body_bytes if exchange is not None else 0,
            "duration": round(now - started, 4),
            "upstream": exchange.route.upstream if exchange is not None else "-",
            "server": str(conn.server) if conn is not None else "-",
            "request_id": self.request_id,
            "error": error or "-",
        }
        logs.request_line(selected, head, fields)


def _mask_key() -> bytes:
    return os.urandom(4)


"""WebSocket over HTTP/2 (RFC 8441): one h2 stream relayed to an HTTP/1.1 WebSocket upstream.

Theory of operation
-------------------
With ``[http2] websocket`` on, the connection's SETTINGS carry
``SETTINGS_ENABLE_CONNECT_PROTOCOL`` and `core.http2` turns an extended CONNECT
with ``:protocol = websocket`` into a `WebSocketRequest`: the head of the GET
upgrade the upstream will get (``Host`` from ``:authority``, the client's
fields, no ``Sec-WebSocket-Key``).  `open_websocket` routes it as the HTTP/1.1
path does (`downstream.ClientConnection._on_request`): 404 without a route, the
route's rate limit (429), ``allowed_origins`` (403), and admission control,
which counts each such stream as a connection of its client's address, since on
HTTP/1.1 it would have been one (503 with Retry-After).

Each stream is an `H2WebSocket`: a `ClientConnection` in WebSocket mode whose
client "transport" is its h2 stream (`_StreamTransport`), so the whole
WebSocket mode of the HTTP/1.1 path applies unchanged: `WebSocketRelay` (frame
limits, strict rules, close codes, the drain of a client that broke a rule),
the heartbeat pings and pongs, the idle timeout, the message and byte rates,
rebalancing and the paced drain (``close_websocket``), the five signals (the
session is a ``protocol="websocket"`` connection; ``edgeproxy_http2_websockets``
tells it came on an h2 stream) and the ``ws_open`` / ``ws_close`` log lines.

* **Handshake.**  The upstream gets a fresh HTTP/1.1 upgrade (a key of our own,
  ``Sec-WebSocket-Version: 13``, the client's extensions and subprotocols,
  X-Forwarded-*, X-Request-Id) on a new connection from the route's group
  (balancer, affinity cookie, health).  Its 101 (the accept checked) becomes
  ``:status 200`` with its ``sec-websocket-protocol`` and
  ``sec-websocket-extensions`` and the affinity cookie; any other answer goes to
  the client as it came; a failure is the HTTP/1.1 path's status (502, 503,
  504 after ``handshake_timeout``).
* **Frames.**  The client's DATA (still masked, RFC 8441 section 5) goes through
  ``relay.from_client`` to the upstream socket; the upstream socket's protocol
  becomes a `RelayEndpoint` whose peer is the `_StreamTransport`, so its bytes go
  through ``relay.from_upstream`` into ``send_data`` on the stream.
* **Back-pressure, both ways, through flow control.**  Upstream to client: past
  ``[limits] buffer_high_water`` queued on the stream (the client's windows are
  shut) the upstream socket is not read until `core.http2.Drained`; a client
  socket over its high-water mark pauses every stream's upstream (as for HTTP
  streams).  Client to upstream: while the upstream socket's write buffer is
  full (or the client's send rate is throttled) the client's DATA is not
  acknowledged, so its stream window closes and the client stops sending.
* **Resumable sessions.**  A route with ``resume`` goes through the same hooks
  of `transport.resume` as on HTTP/1.1 (``on_upgrade`` when the stream opens,
  ``start_session`` at the upstream's 101); the session then takes the stream
  over with ``set_protocol`` (`_ProtocolStream`), as it takes a socket over.
  A sibling worker's token gets close 4409 (no hand-off from a stream).
* **Ends.**  A close handshake (or the proxy's close) ends with END_STREAM; if
  the client has not ended its side by then, RST_STREAM NO_ERROR follows once
  the last bytes are out.  The client's END_STREAM is its TCP FIN and its
  RST_STREAM (or the connection's loss) its reset: the upstream gets 1001.  A
  half-close (a client that broke a rule is told why and must answer) is
  END_STREAM with the stream still read.  On drain the connection's GOAWAY
  goes first (`Http2Connection.drain_http`), then the paced close frames; at the
  drain deadline each WebSocket stream gets its close frame before the streams
  are reset and the connection closed.
"""

from __future__ import annotations

import base64
import logging
import os
from typing import TYPE_CHECKING

from edgeproxy.core import _accel, http1
from edgeproxy.core.admission import retry_after_header
from edgeproxy.core.http1 import Body, ConnectionClosed, EndOfMessage, ResponseHead
from edgeproxy.core.websocket import RelayState, validate_upstream_accept
from edgeproxy.errors import LocalProtocolError, RemoteProtocolError
from edgeproxy.metrics import WEBSOCKET
from edgeproxy.transport import resume
from edgeproxy.transport.downstream import ClientConnection, _Exchange
from edgeproxy.transport.hub_sse import SSE_SUFFIX
from edgeproxy.transport.request_ids import new_request_id
from edgeproxy.transport.upstream import UpstreamConnection, UpstreamUnavailable, lease

if TYPE_CHECKING:
    from edgeproxy.transport.http2 import Http2Connection

__all__ = ["H2WebSocket", "open_websocket"]

log = logging.getLogger("edgeproxy")

_CANCEL = 0x8
_HTTP_1_1_REQUIRED = 0xD
_WS_VERSION_HEADER = [(b"sec-websocket-version", b"13")]


def open_websocket(conn: Http2Connection, stream_id: int, head) -> None:
    """An RFC 8441 extended CONNECT arrived on `conn`: refuse it, or start its `H2WebSocket`."""
    server = conn.server
    metrics = server.metrics
    metrics.http2_streams += 1
    if server.hubs:
        if head.path in server.hubs:
            _open_hub(conn, stream_id, head, server.hubs[head.path])
            return
        if head.path.endswith(SSE_SUFFIX) and head.path[: -len(SSE_SUFFIX)] in server.hubs:
            conn.h2.reset(stream_id, _HTTP_1_1_REQUIRED)  # an event stream is a GET, not a WebSocket
            return
    request_id = "-"
    if server.config.http.request_id:
        request_id, outcome = http1.request_id(head, new_request_id)
        metrics.request_id(outcome)

    def refuse(status: int, message: str, reason: str, extra=()) -> None:
        metrics.connection_refused(WEBSOCKET, reason)
        conn._answer(stream_id, head, status, message, extra, request_done=False, request_id=request_id)  # noqa: SLF001

    route = server.router.match(head.host, head.path)
    if route is None:
        refuse(404, f"no route for host {head.host!r} and path {head.path!r}", "no_route")
        return
    now = server.now()
    buckets = server.route_limits.get(id(route))
    wait = buckets.take(conn.client_ip, now) if buckets is not None else 0.0
    if wait:
        metrics.limit_refused("route_rate")
        refuse(429, "too many requests from this address, retry later", "overloaded",
               [(b"retry-after", retry_after_header(wait))])
        return
    policy = server.origin_policies.get(id(route))
    if policy is not None and not policy.allows(head.header(b"origin")):
        metrics.limit_refused("forbidden_origin")
        refuse(403, "origin not allowed", "forbidden_origin")
        return
    admitted = _admit(conn, now, refuse)
    if admitted is False:
        return
    ws = H2WebSocket(conn, stream_id, head, route, now, request_id, admitted)
    conn.streams[stream_id] = ws
    try:
        if resume.on_upgrade(ws, ws.exchange):
            return  # a resume attempt, answered by the proxy itself (transport/resume.py)
    except RemoteProtocolError as exc:
        metrics.connection_refused(WEBSOCKET, "bad_handshake")
        ws._refuse(400, f"bad WebSocket handshake: {exc}", None, _WS_VERSION_HEADER)  # noqa: SLF001
        return
    ws.exchange.task = server.loop.create_task(ws._connect_upstream())  # noqa: SLF001


def _admit(conn: Http2Connection, now: float, refuse) -> str | None | bool:
    """Admission control for one WebSocket stream: the address it counts under, None (off), False (refused)."""
    server = conn.server
    if server.admission is None:
        return None
    verdict = server.admission.admit(conn.client_ip, now)
    if not verdict.admitted:
        server.metrics.limit_refused(verdict.reason)
        refuse(503, f"overloaded ({verdict.reason}), retry later", "overloaded",
               [(b"retry-after", retry_after_header(verdict.retry_after))])
        return False
    return conn.client_ip


def _open_hub(conn: Http2Connection, stream_id: int, head, service) -> None:
    """A hub's WebSocket on an h2 stream: the hub's own `HubConnection` over a `_StreamTransport`."""
    from edgeproxy.transport.hub import HubConnection, connect_token

    server = conn.server
    now = server.now()

    def refuse(status: int, message: str, reason: str, extra=()) -> None:
        server.metrics.connection_refused(WEBSOCKET, reason)
        conn._answer(stream_id, head, status, message, extra, request_done=False)  # noqa: SLF001

    admitted = _admit(conn, now, refuse)
    if admitted is False:
        return
    stream = _HubStream(conn, stream_id)
    conn.streams[stream_id] = stream
    conn.h2.send_response(stream_id, 200, [])
    stream.hub = hub = HubConnection(service, stream.transport, conn.client_ip, head, now, admitted)
    server.metrics.http2_websockets += 1
    server.metrics.http2_websockets_active += 1
    hub.start(connect_token(head))
    if server.draining and not hub.closed:  # its CONNECT was in flight when the drain began
        hub.close_websocket(server.config.shutdown.close_code, "server shutting down")
    conn.flush()


class _StreamTransport:
    """An h2 stream shaped as the client's transport, for the WebSocket-mode code of `ClientConnection`.

    ``write`` is ``send_data`` (flow controlled; a full stream queue stops the upstream being read),
    ``write_eof`` END_STREAM (the stream still read), ``close`` END_STREAM then RST_STREAM NO_ERROR
    if the client has not ended its side, ``abort`` RST_STREAM CANCEL.  ``pause_reading`` holds back
    the acknowledgements of the client's DATA, so its stream window shuts.
    """

    __slots__ = ("conn", "ws", "id", "end_sent", "remote_ended", "paused", "held_flow", "gone", "protocol")

    def __init__(self, conn: Http2Connection, ws: H2WebSocket | _HubStream, stream_id: int):
        self.conn = conn
        self.ws = ws
        self.id = stream_id
        self.end_sent = False
        self.remote_ended = False
        self.paused = False
        self.held_flow = 0
        self.gone = False
        #: the protocol that took the stream over (`set_protocol`), else None
        self.protocol = None

    def write(self, data: bytes) -> None:
        if self.gone or self.end_sent or not data:
            return
        conn = self.conn
        if not conn.h2.send_data(self.id, data):
            ws = self.ws
            ws.window_paused = True
            if ws.upstream is not None:
                ws.upstream.pause_reading()  # until core.Drained (Http2Connection resumes it)
            ws.flow_changed()
        conn.flush()

    def set_protocol(self, protocol) -> None:
        """Hand the stream to an asyncio-style ``protocol``, as a socket's transport is handed over.

        A resumable session (`resume.ClientEnd`) or its 4409 refusal (`resume.Refusal`) takes the
        client's stream over this way: from then on a `_ProtocolStream` stands for the stream in
        `Http2Connection.streams` and passes it the client's DATA, END_STREAM (``eof_received``),
        the stream's end (``connection_lost``) and its send side's flow (``pause_writing`` /
        ``resume_writing``).
        """
        self.protocol = protocol
        if isinstance(self.ws, _ProtocolStream):
            return
        old = self.ws
        conn = self.conn
        if isinstance(old, H2WebSocket) and old._timer is not None:  # noqa: SLF001 - retired by the take-over
            conn.server.timers.cancel(old._timer)  # noqa: SLF001
            old._timer = None  # noqa: SLF001
        # a session counts among the WebSockets on h2 streams; its 4409 refusal (resume.Refusal) does not
        counted = isinstance(protocol, resume.ClientEnd) and not self.gone
        self.ws = stream = _ProtocolStream(self, old.window_paused, counted)
        if not self.gone:
            conn.streams[self.id] = stream
            if counted:
                conn.server.metrics.http2_websockets += 1
                conn.server.metrics.http2_websockets_active += 1
            stream.flow_changed()

    def get_protocol(self):
        return self.protocol

    def writelines(self, chunks) -> None:
        self.write(b"".join(chunks))

    def is_closing(self) -> bool:
        return self.gone

    def can_write_eof(self) -> bool:
        return not self.gone

    def write_eof(self) -> None:
        if not self.gone and not self.end_sent:
            self.end_sent = True
            self.conn.h2.half_close(self.id)
            self.conn.flush()

    def close(self) -> None:
        if self.gone:
            return
        self.write_eof()
        if not self.remote_ended:
            self.conn.h2.reset_when_sent(self.id)  # RFC 9113 section 8.1: the rest of its side is not wanted
        self._gone()

    def abort(self) -> None:
        if not self.gone:
            self.conn.h2.reset(self.id, _CANCEL)
            self._gone()

    def _gone(self) -> None:
        self.gone = True
        conn = self.conn
        conn.h2.open.discard(self.id)  # DATA still coming is acknowledged by the core and dropped
        conn.flush()
        # as a transport calls connection_lost: later, not inside the caller's actions
        conn.server.loop.call_soon(self._dropped)

    def _dropped(self) -> None:
        self.conn._drop(self.id, abort_upstream=False)  # noqa: SLF001

    def get_write_buffer_size(self) -> int:
        return self.conn.h2.buffered(self.id)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            if self.held_flow and not self.gone:
                flow, self.held_flow = self.held_flow, 0
                self.conn.h2.ack(self.id, flow)
                self.conn.flush()

    def take(self, flow: int) -> None:
        """The client's DATA of ``flow`` bytes was relayed: acknowledge it, or hold it while paused."""
        if self.paused:
            self.held_flow += flow
        elif not self.gone:
            self.conn.h2.ack(self.id, flow)


class _ProtocolStream:
    """A stream taken over by a protocol (`_StreamTransport.set_protocol`), as `Http2Connection` sees it.

    The protocol is told what a socket's protocol would be: DATA is ``data_received`` (acknowledged
    once taken, or held while the protocol paused the transport's reading), END_STREAM
    ``eof_received`` (a false answer closes the stream, as asyncio closes a socket), the stream's
    end ``connection_lost``, and ``pause_writing`` / ``resume_writing`` while the stream's queue is
    over ``buffer_high_water`` (until `core.http2.Drained`) or the client's socket over its own.
    """

    __slots__ = ("transport", "window_paused", "writing_paused", "counted", "_lost")

    websocket = True
    task = None
    sse = None
    upstream = None

    def __init__(self, transport: _StreamTransport, window_paused: bool, counted: bool):
        self.transport = transport
        self.window_paused = window_paused
        #: counted in ``http2_websockets_active`` until the stream ends
        self.counted = counted
        #: what the protocol was last told (pause_writing / resume_writing)
        self.writing_paused = False
        self._lost = False

    def client_data(self, data: bytes, flow: int) -> None:
        transport = self.transport
        if not transport.gone:
            transport.protocol.data_received(data)
        transport.take(flow)
        transport.conn.flush()

    def client_ended(self) -> None:
        transport = self.transport
        transport.remote_ended = True
        if transport.gone:
            return  # its close frame came with it and was answered
        if not transport.protocol.eof_received():
            transport.close()
        transport.conn.flush()

    def flow_changed(self) -> None:
        """The stream's queue or the client's socket changed: tell the protocol when it can write again."""
        paused = self.window_paused or self.transport.conn._writing_paused  # noqa: SLF001
        if paused != self.writing_paused and not self._lost:
            self.writing_paused = paused
            if paused:
                self.transport.protocol.pause_writing()
            else:
                self.transport.protocol.resume_writing()

    def stream_lost(self) -> None:
        if not self._lost:
            self._lost = True
            transport = self.transport
            transport.gone = True
            if self.counted:
                transport.conn.server.metrics.http2_websockets_active -= 1
            transport.protocol.connection_lost(None)

    def shutdown(self) -> None:
        """Nothing before the reset: `ResumeRegistry.close_all` ends the sessions next (as on HTTP/1.1,
        where the stop closes a session's client socket without a close frame of its own)."""


class _HubStream:
    """A hub WebSocket on an h2 stream, as `Http2Connection.streams` sees it; `hub` is its `HubConnection`.

    The hub reads each message as it comes, so the client's DATA is acknowledged at once; toward
    the client its fan-out drops a subscriber whose stream queue passes ``subscriber_buffer_limit``
    (it resumes), as it drops one whose socket buffer does on HTTP/1.1.
    """

    __slots__ = ("transport", "hub", "window_paused", "_lost")

    websocket = True
    task = None
    sse = None
    upstream = None

    def __init__(self, conn: Http2Connection, stream_id: int):
        self.transport = _StreamTransport(conn, self, stream_id)
        self.hub = None
        self.window_paused = False
        self._lost = False

    def client_data(self, data: bytes, flow: int) -> None:
        self.hub.data_received(data)
        self.transport.take(flow)
        self.transport.conn.flush()

    def client_ended(self) -> None:
        self.transport.remote_ended = True
        if not self.hub.closed:  # its close frame (answered) may have come with it
            self.hub.eof_received()

    def flow_changed(self) -> None:
        """Nothing: the hub's fan-out reads the stream's queue itself (subscriber_buffer_limit)."""

    def stream_lost(self) -> None:
        if not self._lost:
            self._lost = True
            self.transport.gone = True
            self.transport.conn.server.metrics.http2_websockets_active -= 1
            self.hub.connection_lost(None)

    def shutdown(self) -> None:
        if not self.hub.closed:
            self.hub.close(self.transport.conn.server.config.shutdown.close_code, "proxy shutting down")


class H2WebSocket(ClientConnection):
    """One WebSocket on an h2 stream (see the module docstring): `Http2Connection.streams` holds it too."""

    __slots__ = ("h2conn", "stream_id", "window_paused", "task", "sse", "_lost", "_h2_pending")

    #: `Http2Connection` asks its streams this
    websocket = True

    def __init__(self, conn: Http2Connection, stream_id: int, head, route, now: float, request_id: str,
                 admitted_ip: str | None):
        server = conn.server
        super().__init__(server, conn.listener)
        self.http = None  # no HTTP/1.1 on the client's side
        self.h2conn = conn
        self.stream_id = stream_id
        self.transport = _StreamTransport(conn, self, stream_id)
        self.client_ip = conn.client_ip
        self._admitted_ip = admitted_ip
        self.request_id = request_id
        self._opened_at = now
        #: the client's window for this stream is spent and its queue full (see `_StreamTransport.write`)
        self.window_paused = False
        #: what `Http2Connection._drop` reads of its streams: no task nor event stream of its own
        self.task = None
        self.sse = None
        self._lost = False
        #: (data, flow) from the client before the upstream's 101
        self._h2_pending: list[tuple[bytes, int]] = []
        self.exchange = _Exchange(head, route, server.groups[route.upstream], now)
        server.connections.add(self)
        self._rearm(now)

    # -- the handshake --------------------------------------------------------------

    async def _connect_upstream(self) -> None:
        server = self.server
        exchange = self.exchange
        exchange.deadline = server.now() + (server.config.websocket.handshake_timeout or 1e9)
        try:
            up = await lease(exchange, self.client_ip, pooled=False, metrics=server.metrics, loop=server.loop,
                             now=server.now)
        except UpstreamUnavailable as exc:
            if self.exchange is exchange and not self.closed:
                self._refuse(exc.status, exc.message, exc.reason, exc.headers)
            return
        if self.exchange is not exchange or self.closed:
            up.close()
            return
        exchange.upstream = up
        up.owner = self
        exchange.websocket_key = key = base64.b64encode(os.urandom(16))
        head = exchange.head
        headers = http1.forwarded_request_headers(
            head, client_ip=self.client_ip, scheme=self.h2conn.scheme,
            request_id=self.request_id if server.config.http.request_id else None)
        headers.append((b"Sec-WebSocket-Key", key))
        try:
            up.write(up.http.send_request(head, headers))
        except LocalProtocolError as exc:
            log.warning("WebSocket upgrade cannot be relayed to %s: %s", up.server, exc)
            self._refuse(502, "request cannot be relayed", "upstream_invalid")

    def _refuse(self, status: int, message: str, reason: str | None, extra_headers=()) -> None:
        """No WebSocket: ``status`` on the stream (the HTTP/1.1 path's statuses), the stream ends.

        ``reason`` is the failure counted (None: counted as a refusal by the caller).
        """
        exchange = self.exchange
        if reason is not None:
            self.server.metrics.connection_failed(WEBSOCKET, reason)
        self.h2conn.h2.send_simple(self.stream_id, status, message, extra_headers, request_done=False)
        self._log_http(exchange.head, status, 0, self.server.now(), exchange.upstream)
        self._end_handshake()

    def _end_handshake(self) -> None:
        """The stream is answered (or gone) before any WebSocket: free its upstream and its place."""
        self._drop_exchange(abort_upstream=True)
        self.transport.gone = True
        self.h2conn.flush()
        self.h2conn._drop(self.stream_id, abort_upstream=False)  # noqa: SLF001

    def upstream_events(self, up: UpstreamConnection) -> None:
        exchange = self.exchange
        if exchange is None or exchange.upstream is not up:
            up.abort()
            return
        h2 = self.h2conn.h2
        while True:
            try:
                event = up.http.next_event()
            except RemoteProtocolError as exc:
                log.warning("upstream %s: %s", up.server, exc)
                self._upstream_invalid(502, "invalid response from upstream")
                return
            if event is http1.NEED_DATA:
                break
            if isinstance(event, ResponseHead):
                if not self._on_response_head(exchange, up, event):
                    return
            elif isinstance(event, Body):  # the body of a refusal, passed on
                exchange.bytes_out += len(event.data)
                h2.send_data(self.stream_id, event.data)
            elif isinstance(event, EndOfMessage):
                h2.send_data(self.stream_id, b"", end=True)
                if not self.transport.remote_ended:
                    h2.reset_when_sent(self.stream_id)
                self._log_http(exchange.head, exchange.status, exchange.bytes_out, self.server.now(), up)
                self._end_handshake()
                return
            elif isinstance(event, ConnectionClosed) or event is http1.PAUSED:
                self._upstream_invalid(502, "upstream closed the connection")
                return
        self.h2conn.flush()

    def _upstream_invalid(self, status: int, message: str) -> None:
        if self.exchange.status:  # its refusal was under way: cut
            self.h2conn.h2.reset(self.stream_id, 0x2)
            self.server.metrics.connection_failed(WEBSOCKET, "upstream_invalid")
            self._end_handshake()
        else:
            self._refuse(status, message, "upstream_invalid")

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        if self.relay is not None:
            super().upstream_lost(conn, exc)
        elif self.exchange is not None and self.exchange.upstream is conn:
            self._upstream_invalid(502, "upstream closed the connection")

    def _on_response_head(self, exchange, up: UpstreamConnection, head: ResponseHead) -> bool:
        if head.status == 101:
            try:
                validate_upstream_accept(exchange.websocket_key, head)
            except RemoteProtocolError as exc:
                log.warning("upstream %s: %s", up.server, exc)
                self._refuse(502, "upstream's WebSocket handshake is invalid", "upstream_invalid")
                return False
            self._start_h2_websocket(exchange, up, head)
            return False
        if head.status < 200:
            return True
        self.server.metrics.connection_refused(WEBSOCKET, "upstream_refused")
        exchange.status = head.status
        headers = http1.forwarded_response_headers(head.headers) + self._balance_response(exchange, up, head.status)
        try:
            self.h2conn.h2.send_response(self.stream_id, head.status, headers)
        except Exception as exc:  # h2 refuses a header it cannot carry
            log.warning("upstream %s: response cannot be relayed over HTTP/2: %s", up.server, exc)
            exchange.status = 0
            self._upstream_invalid(502, "upstream's response cannot be relayed")
            return False
        return True

    def _start_h2_websocket(self, exchange, up: UpstreamConnection, head: ResponseHead) -> None:
        """The upstream's 101: ``:status 200`` to the client, then the relay (RFC 8441 section 5)."""
        server = self.server
        headers = [(name, value) for name, value in http1.forwarded_response_headers(head.headers)
                   if name.lower() != b"sec-websocket-accept"]
        headers += self._balance_response(exchange, up, 101)
        if exchange.resume is not None and resume.start_session(self, exchange, up, head, headers):
            # A resumable session took the stream over (transport/resume.py); an END_STREAM that
            # came during the handshake is its now.
            taken = self.h2conn.streams.get(self.stream_id)
            if self.transport.remote_ended and taken is not None and taken is not self:
                taken.client_ended()
            self.h2conn.flush()
            return
        self._ws_group = exchange.group
        exchange.group.session_opened(up.server, self)
        self.h2conn.h2.send_response(self.stream_id, 200, headers)
        now = server.now()
        relay = self._begin_relay(exchange, up, head, now)
        server.metrics.http2_websockets += 1
        server.metrics.http2_websockets_active += 1
        upstream_early = up.http.trailing_data()
        up.http = None
        up.transport.set_protocol(_accel.RelayEndpoint(relay, False, self.transport, up, self._run_relay_actions))
        if self.window_paused or self.h2conn._writing_paused:  # noqa: SLF001
            up.pause_reading()
        self.register_heartbeats(now)
        self._rearm(now)
        if upstream_early:
            up.transport.get_protocol().data_received(upstream_early)
        pending, self._h2_pending = self._h2_pending, []
        for data, flow in pending:
            self.client_data(data, flow)
        if self.transport.remote_ended:
            self.client_ended()
        elif server.draining:
            self.close_websocket(server.config.shutdown.close_code, "server shutting down")
        self.h2conn.flush()

    # -- the client's side: Http2Connection calls these ----------------------------

    def client_data(self, data: bytes, flow: int) -> None:
        """DATA on the stream (``flow``: its flow-controlled size, acknowledged once relayed)."""
        relay = self.relay
        if relay is None:
            if self.exchange is None:
                self.h2conn.h2.ack(self.stream_id, flow)
            else:
                self._h2_pending.append((data, flow))  # bounded by the stream's window: not acknowledged yet
            return
        out = relay.from_client(data)
        if out:
            self.upstream.write(out)
        self.transport.take(flow)
        if relay.actions:
            self._run_relay_actions()
        self.h2conn.flush()

    def client_ended(self) -> None:
        """END_STREAM from the client: its TCP FIN on HTTP/1.1."""
        self.transport.remote_ended = True
        relay = self.relay
        if relay is None:
            return  # during the handshake: the session starts with it (`_start_h2_websocket`)
        if relay.client_close is not None:
            # Its close frame came first: an h2 client (Chromium) ends its side with it, having nothing
            # more to send; unlike a TCP FIN it does not mean it is gone, and the upstream's answer is
            # still relayed (within close_timeout).
            return
        self.eof_received()
        self.h2conn.flush()

    def stream_lost(self) -> None:
        """The stream is gone (reset by the client, the connection lost, or ended here): once."""
        if self._lost:
            return
        self._lost = True
        self.transport.gone = True
        self.connection_lost(None)

    def flow_changed(self) -> None:
        """Nothing: the relay's upstream is paused and resumed by `Http2Connection` itself."""

    # -- ClientConnection's hooks, for a stream -------------------------------------

    def _send_switching(self, headers: list[tuple[bytes, bytes]], data: bytes = b"", *, relayed: bool = False) -> None:
        """RFC 8441 section 5: ``:status 200`` on the stream (no Upgrade, Connection, accept), then ``data``."""
        h2 = self.h2conn.h2
        h2.send_response(self.stream_id, 200, [(n, v) for n, v in headers if n.lower() != b"sec-websocket-accept"])
        if data:
            h2.send_data(self.stream_id, data)
        self.h2conn.flush()

    def _switched_early(self) -> bytes:
        """The client's DATA that came during the handshake, acknowledged as it is handed over."""
        pending, self._h2_pending = self._h2_pending, []
        for _, flow in pending:
            self.transport.take(flow)
        return b"".join(data for data, _ in pending)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.relay is not None:
            super().connection_lost(exc)
            self.server.metrics.http2_websockets_active -= 1
            up, self.upstream = self.upstream, None
            up.close()  # after the close frame the relay gave it, if any (a no-op when closed already)
            return
        self._leave_server()
        if self.exchange is not None:  # gone during its handshake
            self.server.metrics.connection_failed(WEBSOCKET, "client_gone")
            self._drop_exchange(abort_upstream=True)

    def eof_received(self) -> bool:
        relay = self.relay
        relay.client_eof()
        self._run_relay_actions()
        if relay.state is RelayState.CLOSED and not self.closed:
            self._close()
        return False

    def drain_http(self) -> None:
        """Nothing: the connection's GOAWAY is `Http2Connection`'s, the close frame the drain plan's."""

    def _next_check(self, now: float) -> float:
        if self.relay is None:
            return 0.0 if self.closed or self.exchange is None else now
        return super()._next_check(now)

    def check_timers(self, now: float) -> None:
        if self.relay is not None:
            super().check_timers(now)
            return
        exchange = self.exchange
        if exchange is None:
            return
        if exchange.connect_deadline and now >= exchange.connect_deadline and not exchange.connect_timed_out:
            exchange.connect_timed_out = True
            exchange.task.cancel()
        elif exchange.deadline and now >= exchange.deadline and not exchange.status:
            log.warning("upstream %s: no WebSocket handshake within the timeout", exchange.group.config.name)
            self._refuse(504, "upstream timed out (WebSocket handshake)", "upstream_timeout")

    def shutdown(self) -> None:
        """The drain deadline: a close frame both ways where one can go, then the stream ends."""
        if self._lost:
            return
        if self.relay is None:
            self.h2conn.h2.reset(self.stream_id, _CANCEL)
            self.stream_lost()
            return
        super().shutdown()
        self.h2conn.flush()


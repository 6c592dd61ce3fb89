"""The client-facing HTTP/2 connection: each stream is one HTTP/1.1 request upstream.

Theory of operation
-------------------
A `ClientConnection` hands its transport over (``set_protocol``) when TLS
negotiated ``h2`` by ALPN, or when a cleartext listener with ``http2 = true``
sees the client preface.  From then on `Http2Connection` feeds the bytes to
`core.http2.ServerConnection` with the time, and carries out its events:

* a request stream is routed like an HTTP/1.1 request (`Router.match`), gets a
  server from its upstream group (balancer, affinity cookie, health: the
  shared `upstream.lease`), and its head goes out through the pooled
  connection's `ClientSide` with the HTTP/1.1 rules (hop-by-hop stripped,
  X-Forwarded-*); a body without Content-Length goes chunked.  Errors answer
  with the HTTP/1.1 statuses (404, 502, 503, 504) on the stream; a response
  that broke half-way resets its stream (INTERNAL_ERROR) instead of the
  connection.
* each `_Stream` is the `owner` of its upstream connection, so the upstream
  Protocol's callbacks land on the stream, not on the whole connection.
* flow control: response bytes wait in the core until the client's windows
  open; past ``[limits] buffer_high_water`` queued on a stream, or while the
  client's socket is over its own write high-water mark, the stream's upstream
  is not read.  Request bytes are acknowledged to the client only once written
  upstream, and held while that upstream connection is over its high-water
  mark: a slow upstream slows its own stream's sender.
* timeouts come from the shared timer tick, as for HTTP/1.1: connect and read
  deadlines per stream, ``http.keepalive_timeout`` for a connection without
  streams (then GOAWAY and close).
* drain (`drain_http`): GOAWAY NO_ERROR with the last stream taken; streams in
  flight finish, and the connection closes when the last one ends (or at the
  drain deadline, `shutdown`).
* a ``text/event-stream`` response (`transport.sse`) is relayed as it comes,
  exempt from ``read_timeout``, with the ``[sse]`` keepalive comments and
  upstream idle timeout; drains and rebalancing end it in their paced batches
  with a jittered ``retry:`` at an event boundary, then END_STREAM (the
  connection and its other streams go on).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from edgeproxy import logs
from edgeproxy.core import http1
from edgeproxy.core import http2 as core
from edgeproxy.core.http1 import Body, ConnectionClosed, EndOfMessage, ResponseHead
from edgeproxy.errors import LocalProtocolError, RemoteProtocolError
from edgeproxy.core.admission import retry_after_header
from edgeproxy.transport import resume
from edgeproxy.transport.hub_sse import SSE_SUFFIX
from edgeproxy.transport.request_ids import new_request_id
from edgeproxy.transport.sse import ProxiedEventStream, wanted as sse_wanted
from edgeproxy.transport.upstream import UpstreamConnection, UpstreamRequest, UpstreamUnavailable, lease, lease_idle

if TYPE_CHECKING:
    from edgeproxy.transport.server import ProxyServer

log = logging.getLogger("edgeproxy")

_INTERNAL_ERROR = 0x2
_CANCEL = 0x8
_HTTP_1_1_REQUIRED = 0xD


class _Stream(UpstreamRequest):
    """One request stream; the `owner` of its upstream connection while it has one."""

    __slots__ = ("conn", "id", "pending_flow", "held_flow", "holding", "window_paused", "request_id", "trailers")

    #: an RFC 8441 WebSocket stream (`http2_websocket.H2WebSocket`) says True
    websocket = False

    def __init__(self, conn: Http2Connection, stream_id: int, head, route, group, started: float):
        super().__init__(head, route, group, started)
        self.conn = conn
        self.id = stream_id
        #: the flow-controlled size of the body bytes that came before the upstream connection
        self.pending_flow = 0
        #: acknowledgements held back while the upstream's write buffer is full
        self.held_flow = 0
        self.holding = False
        #: the client's window for this stream is spent and its queue full: upstream not read
        self.window_paused = False
        #: X-Request-Id of the request ("-": off), as on HTTP/1.1
        self.request_id = "-"
        #: the request's trailer fields, for the end of its chunked body upstream
        self.trailers: tuple = ()

    # -- the upstream connection's owner interface (see UpstreamConnection) --

    def upstream_events(self, up: UpstreamConnection) -> None:
        self.conn.upstream_events(self, up)

    def upstream_lost(self, up: UpstreamConnection, exc: Exception | None) -> None:
        self.conn.upstream_lost(self, up)

    def pause_client_reading(self, reason: str) -> None:
        self.holding = True

    # -- the event stream's owner interface (see transport/sse.py) --

    def end_event_stream(self, stream: ProxiedEventStream, retry: bytes) -> None:
        self.conn.end_event_stream(self, retry)

    def rearm_event_stream(self, now: float) -> None:
        pass  # the connection's streams are looked at every tick

    def resume_client_reading(self, reason: str) -> None:
        self.holding = False
        if self.held_flow:
            flow, self.held_flow = self.held_flow, 0
            self.conn.h2.ack(self.id, flow)
            self.conn.flush()


class Http2Connection(asyncio.Protocol):
    """One client's HTTP/2 connection (see the module docstring).

    Args:
        server: the `ProxyServer`.
        listener: the `ListenerConfig` it came in on.
        transport: the client's transport, taken over from a `ClientConnection`.
        client_ip: the client's address (the PROXY header's, when there was one).
        admitted_ip: what admission control counted the connection under (None: not counted).
        metrics_key, opened_at: the connection's HTTP metrics entry and when it opened.
        data: bytes already read (the h2c preface and what followed it).
    """

    __slots__ = (
        "server", "listener", "transport", "client_ip", "closed", "relay", "h2", "streams", "scheme",
        "_admitted_ip", "_metrics_key", "_opened_at", "_timer", "_deadline", "_writing_paused", "_flush_due",
    )

    def __init__(self, server: ProxyServer, listener, transport: asyncio.Transport, client_ip: str, *,
                 admitted_ip: str | None, metrics_key, opened_at: float, data: bytes = b""):
        self.server = server
        self.listener = listener
        self.transport = transport
        self.client_ip = client_ip
        self.closed = False
        #: never a WebSocket relay (the server's loops over its connections ask)
        self.relay = None
        self.streams: dict[int, _Stream] = {}
        self.scheme = "https" if listener is not None and listener.tls else "http"
        self._admitted_ip = admitted_ip
        self._metrics_key = metrics_key
        self._opened_at = opened_at
        self._timer = None
        self._writing_paused = False
        #: a write of what the core has to send is due at the end of this loop turn (`flush`)
        self._flush_due = False
        cfg = server.config.http2
        now = server.now()
        self.h2 = core.ServerConnection(
            max_concurrent_streams=cfg.max_concurrent_streams, initial_window_size=cfg.initial_window_size,
            connection_window_size=cfg.connection_window_size, max_header_list_size=cfg.max_header_list_size,
            stream_buffer=server.config.limits.buffer_high_water, flood_window=cfg.flood_window,
            max_resets=cfg.max_resets, max_control_frames=cfg.max_control_frames, websocket=cfg.websocket, now=now,
        )
        self._deadline = now + server.config.http.keepalive_timeout
        transport.set_protocol(self)
        server.connections.add(self)
        server.metrics.http2_connections += 1
        if data:
            self.data_received(data)
        else:
            self.flush()
        self._rearm(now)

    # -- asyncio.Protocol ---------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        for event in self.h2.receive_data(data, self.server.now()):
            kind = type(event)
            if kind is core.Data:
                self._on_data(event)
            elif kind is core.Request:
                self._on_request(event)
            elif kind is core.RequestEnded:
                self._on_request_end(event.stream_id, event.trailers)
            elif kind is core.Reset:
                self._drop(event.stream_id, abort_upstream=True)
            elif kind is core.Drained:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.window_paused = False
                    if stream.websocket:
                        stream.flow_changed()  # a protocol that took the stream over may write again
                    self._resume_upstream(stream)
            elif kind is core.WebSocketRequest:
                from edgeproxy.transport.http2_websocket import open_websocket  # (it imports this module)
                open_websocket(self, event.stream_id, event.head)
            elif kind is core.Refused:
                self._answer(event.stream_id, None, event.status, event.message, event.headers,
                             request_done=event.ended)
            elif kind is core.Terminated:
                self._terminated(event)
                return
        self.flush()
        self._rearm(self.server.now())

    def eof_received(self) -> bool:
        return False  # no half-closed HTTP/2: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        server = self.server
        server.connections.discard(self)
        if self._timer is not None:
            server.timers.cancel(self._timer)
        if self._admitted_ip is not None:
            server.admission.release(self._admitted_ip)
        server.metrics.connection_closed(self._metrics_key, server.now() - self._opened_at)
        for stream_id in list(self.streams):
            self._drop(stream_id, abort_upstream=True)

    def pause_writing(self) -> None:
        self._writing_paused = True
        for stream in list(self.streams.values()):
            if stream.upstream is not None:
                stream.upstream.pause_reading()
            elif stream.websocket:
                stream.flow_changed()

    def resume_writing(self) -> None:
        self._writing_paused = False
        for stream in list(self.streams.values()):
            if stream.websocket:
                stream.flow_changed()
            self._resume_upstream(stream)

    # -- helpers -------------------------------------------------------------

    def flush(self) -> None:
        """Write what the core has to send, once per loop turn.

        The responses of many streams come in on as many upstream connections
        within one turn of the loop: their frames go out in one write (and one
        syscall) after the turn's reads, not one write per stream.
        """
        if not self._flush_due and not self.closed:
            self._flush_due = True
            self.server.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_due = False
        if not self.closed:
            data = self.h2.data_to_send()
            if data:
                self.transport.write(data)

    def _close(self) -> None:
        if not self.closed:
            self._flush_now()
            self.closed = True
            self.transport.close()

    def _resume_upstream(self, stream: _Stream) -> None:
        if stream.upstream is not None and not stream.window_paused and not self._writing_paused:
            stream.upstream.resume_reading()

    def _terminated(self, event: core.Terminated) -> None:
        if event.reason in core.ERROR_REASONS:
            self.server.metrics.http2_error(event.reason)
            log.warning("HTTP/2 connection from %s ended: %s (%s)", self.client_ip, event.reason, event.message)
        for stream_id in list(self.streams):
            self._drop(stream_id, abort_upstream=True)
        self._close()

    def _drop(self, stream_id: int, *, abort_upstream: bool) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        if stream.websocket:
            stream.stream_lost()  # its upstream hears of it (transport/http2_websocket.py)
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()
        if stream.sse is not None:
            stream.sse.finish(self.server.now())
        up = stream.upstream
        if up is not None:
            stream.upstream = None
            up.owner = None
            if abort_upstream:
                up.abort()
        if not self.streams:
            if self.server.draining:
                self._close()
            else:  # idle from now: http.keepalive_timeout, then GOAWAY
                self._deadline = self.server.now() + self.server.config.http.keepalive_timeout

    # -- the client's side -----------------------------------------------------

    def _on_request(self, event: core.Request) -> None:
        server = self.server
        head = event.head
        server.metrics.http2_streams += 1
        if server.hubs and (head.path in server.hubs or (
                head.path.endswith(SSE_SUFFIX) and head.path[: -len(SSE_SUFFIX)] in server.hubs)):
            # A hub takes over a whole connection (its WebSocket, its event stream); an h2
            # stream is not one. HTTP_1_1_REQUIRED makes browsers and curl retry over HTTP/1.1
            # (RFC 9113 section 8.7) instead of the request reaching a route.
            self.h2.reset(event.stream_id, _HTTP_1_1_REQUIRED)
            self._log(head, 0, 0, None, None, error="http_1_1_required")
            return
        if head.path in resume.CLIENT_SCRIPTS and head.method in (b"GET", b"HEAD"):
            body = resume.client_js(head.path)
            self.h2.send_response(event.stream_id, 200, [
                (b"content-type", b"text/javascript; charset=utf-8"), (b"content-length", b"%d" % len(body)),
                (b"cache-control", b"public, max-age=3600")])
            self.h2.send_data(event.stream_id, body if head.method == b"GET" else b"", end=True)
            self._log(head, 200, len(body), None, None)
            return
        request_id = "-"
        if server.config.http.request_id:
            request_id, outcome = http1.request_id(head, new_request_id)
            server.metrics.request_id(outcome)
        route = server.router.match(head.host, head.path)
        if route is None:
            self._answer(event.stream_id, head, 404, f"no route for host {head.host!r} and path {head.path!r}",
                         request_done=event.ended, request_id=request_id)
            return
        now = server.now()
        buckets = server.route_limits.get(id(route))
        wait = buckets.take(self.client_ip, now) if buckets is not None else 0.0
        if wait:
            server.metrics.limit_refused("route_rate")
            self._answer(event.stream_id, head, 429, "too many requests from this address, retry later",
                         [(b"retry-after", retry_after_header(wait))], request_done=event.ended, request_id=request_id)
            return
        limit = route.max_body_size if route.max_body_size is not None else server.config.http.max_body_size
        length = http1.content_length(head) if limit else None
        if length is not None and length > limit:
            server.metrics.limit_refused("max_body_size")
            self._answer(event.stream_id, head, 413, f"request body of {length} bytes is over the limit of {limit} bytes",
                         request_done=event.ended, request_id=request_id)
            return
        stream = _Stream(self, event.stream_id, head, route, server.groups[route.upstream], now)
        stream.request_id = request_id
        stream.max_body = limit
        if not event.ended and server.config.http.body_timeout:
            stream.body_deadline = now + server.config.http.body_timeout
        self.streams[event.stream_id] = stream
        try:
            conn = lease_idle(stream, self.client_ip, now=server.now)
        except UpstreamUnavailable as exc:
            self._failed(stream, exc.status, exc.message, exc.headers)
            return
        if conn is None:  # connect (or fall back) in a task
            stream.task = server.loop.create_task(self._connect(stream, chosen=True))
        else:  # a pooled connection waited: no task, no loop turn
            self._attach_or_fail(stream, conn)

    def _answer(self, stream_id: int, head, status: int, message: str, extra_headers=(), *,
                request_done: bool = True, request_id: str = "-") -> None:
        """A response from the proxy itself, on one stream."""
        self.h2.send_simple(stream_id, status, message, extra_headers,
                            head_request=head is not None and head.method == b"HEAD", request_done=request_done)
        self._log(head, status, 0, None, None, request_id=request_id)

    def _on_data(self, event: core.Data) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            self.h2.ack(event.stream_id, event.flow)
            return
        if stream.websocket:
            stream.client_data(event.data, event.flow)
            return
        stream.body_bytes += len(event.data)
        if stream.max_body and stream.body_bytes > stream.max_body:
            # Not one byte past the limit goes upstream; the upstream request is reset (never complete).
            self.h2.ack(event.stream_id, event.flow)
            self._client_failed(stream, 413, f"request body over the limit of {stream.max_body} bytes", "max_body_size")
            return
        if stream.body_deadline:
            stream.body_deadline = self.server.now() + self.server.config.http.body_timeout
        up = stream.upstream
        if up is None:
            stream.pending.append(event.data)  # bounded by the stream's window: nothing is acknowledged yet
            stream.pending_flow += event.flow
            return
        up.write(up.http.send_data(event.data))
        if stream.holding:
            stream.held_flow += event.flow
        else:
            self.h2.ack(stream.id, event.flow)

    def _client_failed(self, stream: _Stream, status: int, message: str, reason: str) -> None:
        """The client's body broke a limit: ``status`` on the stream if no response began, else a reset."""
        self.server.metrics.limit_refused(reason)
        if stream.status:
            self.h2.reset(stream.id, _CANCEL)
            self._log(stream.head, stream.status, stream.bytes_out, stream, stream.upstream, error=reason)
        else:
            self._answer(stream.id, stream.head, status, message, request_done=stream.request_done,
                         request_id=stream.request_id)
        self._drop(stream.id, abort_upstream=True)
        self.flush()

    def _on_request_end(self, stream_id: int, trailers: tuple = ()) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if stream.websocket:
            stream.client_ended()
            return
        stream.request_done = True
        stream.body_deadline = 0.0
        if trailers:
            if stream.head.header(b"content-length") is not None:
                # HTTP/1.1 carries trailers only after a chunked body; this one is framed by its length.
                self._client_failed(stream, 400, "request trailers cannot be forwarded: the request has a "
                                    "Content-Length, and HTTP/1.1 carries trailers only in chunked bodies",
                                    "request_trailers")
                return
            stream.trailers = tuple(http1.strip_hop_by_hop(list(trailers)))
        up = stream.upstream
        if up is not None and not up.closed:
            up.write(up.http.send_end(stream.trailers))
            self._arm_read_deadline(stream)

    def _arm_read_deadline(self, stream: _Stream) -> None:
        timeout = stream.group.config.read_timeout
        stream.deadline = self.server.now() + timeout if timeout else 0.0

    # -- the upstream's side ------------------------------------------------------

    async def _connect(self, stream: _Stream, chosen: bool = False) -> None:
        server = self.server
        try:
            conn = await lease(stream, self.client_ip, pooled=True, metrics=server.metrics, loop=server.loop,
                               now=server.now, chosen=chosen)
        except UpstreamUnavailable as exc:
            if self.streams.get(stream.id) is stream:
                self._failed(stream, exc.status, exc.message, exc.headers)
            return
        if self.streams.get(stream.id) is not stream or self.closed:
            conn.close()
            return
        self._attach_or_fail(stream, conn)
        self.flush()

    def _attach_or_fail(self, stream: _Stream, conn: UpstreamConnection) -> None:
        try:
            self._attach(stream, conn)
        except LocalProtocolError as exc:
            log.warning("request cannot be relayed to %s: %s", conn.server, exc)
            self._failed(stream, 502, "request cannot be relayed")

    def _attach(self, stream: _Stream, conn: UpstreamConnection) -> None:
        stream.upstream = conn
        conn.owner = stream
        head = stream.head
        headers = http1.forwarded_request_headers(
            head, client_ip=self.client_ip, scheme=self.scheme,
            request_id=stream.request_id if self.server.config.http.request_id else None,
        )
        if head.has_body and head.header(b"content-length") is None:
            headers.append((b"Transfer-Encoding", b"chunked"))  # h11 frames it; HTTP/2 had no length
        if core.wants_trailers(head):  # hop-by-hop: said again for this hop (RFC 9110 section 10.1.4)
            headers += [(b"TE", b"trailers"), (b"Connection", b"TE")]
        out = conn.http.send_request(head, headers)
        for chunk in stream.pending:
            out += conn.http.send_data(chunk)
        stream.pending.clear()
        if stream.request_done:
            out += conn.http.send_end(stream.trailers)
        conn.write(out)
        if stream.pending_flow:
            flow, stream.pending_flow = stream.pending_flow, 0
            if stream.holding:
                stream.held_flow += flow
            else:
                self.h2.ack(stream.id, flow)
        if stream.request_done:
            self._arm_read_deadline(stream)
        if self._writing_paused:
            conn.pause_reading()

    def _failed(self, stream: _Stream, status: int, message: str, extra_headers=()) -> None:
        """No usable answer from the upstream: the HTTP/1.1 status on the stream, or a reset mid-response."""
        if stream.status:
            self.h2.reset(stream.id, _INTERNAL_ERROR)
        else:
            self.h2.send_simple(stream.id, status, message, extra_headers,
                                head_request=stream.head.method == b"HEAD", request_done=stream.request_done)
            self._log(stream.head, status, 0, stream, None)
        self._drop(stream.id, abort_upstream=True)
        self.flush()

    def upstream_events(self, stream: _Stream, up: UpstreamConnection) -> None:
        """The upstream Protocol received bytes (or EOF) for `stream`."""
        if self.streams.get(stream.id) is not stream or stream.upstream is not up:
            up.abort()
            return
        h2 = self.h2
        while True:
            try:
                event = up.http.next_event()
            except RemoteProtocolError as exc:
                log.warning("upstream %s: %s", up.server, exc)
                self._failed(stream, 502, "invalid response from upstream")
                return
            if event is http1.NEED_DATA:
                break
            if isinstance(event, Body):
                data, end = (event.data, False) if stream.sse is None else stream.sse.relay(event.data,
                                                                                           self.server.now())
                stream.bytes_out += len(data)
                if not h2.send_data(stream.id, data):
                    stream.window_paused = True
                    up.pause_reading()
                if end:  # a drain waited for this event boundary
                    self.end_event_stream(stream, stream.sse.retry())
                    return
            elif isinstance(event, ResponseHead):
                if not self._on_response_head(stream, up, event):
                    return
            elif isinstance(event, EndOfMessage):
                self._on_response_end(stream, up, event.trailers)
                break
            elif isinstance(event, ConnectionClosed) or event is http1.PAUSED:
                self._upstream_closed_early(stream, up)
                return
        self.flush()

    def _on_response_head(self, stream: _Stream, up: UpstreamConnection, head: ResponseHead) -> bool:
        if head.status == 101:
            self._failed(stream, 502, "upstream switched protocols unasked")
            return False
        headers = list(head.headers)
        if head.status >= 200:
            stream.group.response_status(up.server, head.status, self.server.now())
            headers += stream.group.cookie_header(stream.choice, up.server)
            stream.status = head.status
        try:
            self.h2.send_response(stream.id, head.status, headers)
        except Exception as exc:  # h2 refuses a header it cannot carry
            log.warning("upstream %s: response cannot be relayed over HTTP/2: %s", up.server, exc)
            stream.status = 0
            self._failed(stream, 502, "upstream's response cannot be relayed")
            return False
        if sse_wanted(stream.head.method, head.status, head.headers):
            # An event stream: no read_timeout, keepalives, paced end on drain (transport/sse.py).
            stream.sse = ProxiedEventStream(stream, self.server, stream.route, stream.group, up.server,
                                            self.server.now(), head.headers)
            stream.deadline = 0.0
            if self.server.draining:  # its request was in flight when the drain began
                self.end_event_stream(stream, stream.sse.retry())
                return False
        return True

    def end_event_stream(self, stream: _Stream, retry: bytes) -> None:
        """End a relayed event stream cleanly: `retry` (maybe b""), END_STREAM; its upstream is closed."""
        if self.streams.get(stream.id) is not stream:
            return
        self.h2.send_data(stream.id, retry, end=True)
        stream.bytes_out += len(retry)
        self._log(stream.head, stream.status, stream.bytes_out, stream, stream.upstream)
        self._drop(stream.id, abort_upstream=True)
        self.flush()

    def _on_response_end(self, stream: _Stream, up: UpstreamConnection, trailers: tuple = ()) -> None:
        # The upstream's trailers go on only to a client that said it takes them (te: trailers).
        self.h2.send_data(stream.id, b"", end=True,
                          trailers=trailers if trailers and core.wants_trailers(stream.head) else ())
        now = self.server.now()
        self._log(stream.head, stream.status, stream.bytes_out, stream, up)
        stream.upstream = None
        up.resume_reading()
        if up.http.reusable and not up.closed:
            stream.group.put_idle(up, now)
        else:
            up.owner = None
            up.close()
        self._drop(stream.id, abort_upstream=False)

    def _upstream_closed_early(self, stream: _Stream, up: UpstreamConnection) -> None:
        if not stream.status and up.reused and not stream.retried and not stream.head.has_body and stream.request_done:
            # A pooled connection the server had just closed: try once more on a fresh one.
            stream.retried = True
            up.owner = None
            up.abort()
            stream.upstream = None
            stream.task = self.server.loop.create_task(self._connect(stream))
            return
        log.warning("upstream %s closed the connection before the response ended", up.server)
        self._failed(stream, 502, "upstream closed the connection")

    def upstream_lost(self, stream: _Stream, up: UpstreamConnection) -> None:
        if self.streams.get(stream.id) is stream and stream.upstream is up:
            self._upstream_closed_early(stream, up)

    # -- timers, drain and shutdown ---------------------------------------------------

    def _next_check(self, now: float) -> float:
        if self.closed:
            return 0.0
        return now if self.streams else self._deadline

    def _rearm(self, now: float) -> None:
        self._timer = self.server.timers.arm(self._timer, self, self._next_check(now))

    def check_timers(self, now: float) -> None:
        if not self.streams:
            if now >= self._deadline:
                self.h2.goaway()
                self._close()
            return
        body_timeout = self.server.config.http.body_timeout
        for stream in list(self.streams.values()):
            if stream.websocket:
                continue  # on the timer wheel itself
            if stream.body_deadline:
                if stream.holding or stream.upstream is None:
                    stream.body_deadline = now + body_timeout  # the proxy is not reading: not the client's time
                elif now >= stream.body_deadline:
                    self._client_failed(stream, 408, "request body not received in time", "body_timeout")
                    continue
            if stream.sse is not None:  # exempt from read_timeout: keepalives, upstream idle, drain
                data = stream.sse.check(now)
                if data:
                    self.h2.send_data(stream.id, data)
                continue
            if stream.connect_deadline and now >= stream.connect_deadline and not stream.connect_timed_out:
                stream.connect_timed_out = True
                stream.task.cancel()
            up = stream.upstream
            if up is not None and up.active:
                up.active = False
                if stream.request_done:
                    self._arm_read_deadline(stream)
            elif stream.deadline and now >= stream.deadline:
                log.warning("upstream %s: no response within the timeout", stream.group.config.name)
                self._failed(stream, 504, "upstream timed out (response)")
        self.flush()

    def drain_http(self) -> None:
        """The proxy drains: GOAWAY now; close when the streams in flight are done."""
        self.h2.goaway()
        if not self.streams:
            self._close()
        else:
            self.flush()

    def shutdown(self) -> None:
        """Close now (the drain deadline): the streams left are cut."""
        for stream_id in list(self.streams):
            if self.streams[stream_id].websocket:
                self.streams[stream_id].shutdown()  # a close frame before the reset
            self.h2.reset(stream_id, _CANCEL)
            self._drop(stream_id, abort_upstream=True)
        self.h2.close()
        self._close()

    def _log(self, head, status: int, bytes_out: int, stream: _Stream | None, conn, *, error: str | None = None,
             request_id: str | None = None) -> None:
        now = self.server.now()
        started = stream.started if stream is not None else now
        if status:
            self.server.metrics.request_done(status, now - started)
        if not logs.access_enabled():
            return
        logs.request_line(self.server.config.logging.access_log_fields, head, {
            "event": "http",
            "client": self.client_ip,
            "method": head.method.decode("latin-1") if head else "-",
            "path": head.target.decode("latin-1") if head else "-",
            "host": head.host if head else "-",
            "status": status,
            "bytes": bytes_out,
            "bytes_in": stream.body_bytes if stream is not None else 0,
            "duration": round(now - started, 4),
            "upstream": stream.route.upstream if stream is not None else "-",
            "server": str(conn.server) if conn is not None else "-",
            "request_id": request_id or (stream.request_id if stream is not None else "-"),
            "error": error or "-",
        })

"""Hub connections: the proxy terminates the WebSocket and serves channels itself.

Theory of operation
-------------------
`ClientConnection` hands over an upgrade whose path is a ``[[hubs]]`` path
(`HubService.take_over`): the handshake is answered here with a 101, and the socket's
protocol becomes a `HubConnection`.  Nothing of it reaches an upstream.

*Inbound.*  Client frames are parsed with wsproto (masking, fragmentation, control
frames, UTF-8); complete messages go to `edgeproxy.hub.protocol.parse_client_message`
and become subscribe / unsubscribe / pong.  A refused command gets an ``error``
message and changes nothing else; an oversized message also closes with 1009.

*Subscribe.*  Authorize (the connection's token, the subscribe's token, the auth
hook), then the three steps of `edgeproxy.hub.channels`: pending, await the
backplane's interest and history, complete.  The frames of ``complete`` (subscribed,
replay, buffered) are written in one go.

*Fan-out.*  The backplane calls `HubService._deliver` with each publication; the
registry frames it once and queues it; one loop callback per channel (``call_soon``,
so a burst is coalesced) takes the queued batches and writes each blob to every
member's transport with ``_accel.write_many``, `HubConfig.fanout_batch` transports
per loop iteration.  ``write_many`` skips a transport whose buffer is above
``subscriber_buffer_limit``: that subscriber is dropped with close 4000 (resume).

*Liveness.*  One timer per hub sends the ``ping`` message to every connection (one
frame, ``write_many`` again), closes connections that sent nothing for two
intervals, and closes with 4002 those whose connect token expired.

*Server-Sent Events.*  ``GET <hub path>/sse`` is served by `transport.hub_sse`
on the same registry, backplane and fan-out: `_flush` writes each channel's SSE
batches (every stream in one go, not in slices, so a stream's event ids never
run ahead of what it was sent) before its WebSocket batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import h11
import orjson
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage
from wsproto.utilities import LocalProtocolError as WSLocalProtocolError
from wsproto.utilities import RemoteProtocolError as WSRemoteProtocolError
from wsproto.utilities import generate_accept_token

from edgeproxy import logs
from edgeproxy.core import _accel
from edgeproxy.core.http1 import EndOfMessage, RequestHead, serialize_head
from edgeproxy.core.websocket import validate_client_handshake
from edgeproxy.errors import RemoteProtocolError
from edgeproxy.hub.backplane import Backplane, MemoryBackplane
from edgeproxy.hub.channels import Channel, ChannelRegistry
from edgeproxy.hub.protocol import (
    CLOSE_BAD_TOKEN,
    CLOSE_RESUME,
    CLOSE_TOKEN_EXPIRED,
    PING,
    HubError,
    Pong,
    Position,
    Subscribe,
    Unsubscribe,
    encode_connected,
    encode_error,
    SSE_KEEPALIVE,
    encode_unsubscribed,
    parse_client_message,
    text_frame,
    valid_channel,
)
from edgeproxy.hub.token import ANONYMOUS, NOTHING, Grants, verify_token
from edgeproxy.metrics import HUB_DELIVERY, WEBSOCKET, route_label
from edgeproxy.transport.backplanes import BackplaneUnavailable
from edgeproxy.transport.hub_sse import HubSseStream, take_over_sse

if TYPE_CHECKING:
    from edgeproxy.config import HubConfig
    from edgeproxy.transport.admin import AdminRequest
    from edgeproxy.transport.downstream import ClientConnection
    from edgeproxy.transport.server import ProxyServer

log = logging.getLogger("edgeproxy")

_PING_FRAME = text_frame(PING)
_HUB_UPSTREAM = "hub"


class HubService:
    """One ``[[hubs]]`` entry at run time: its connections, channels and backplane."""

    def __init__(self, config: HubConfig, server: ProxyServer, backplane: Backplane | None = None):
        self.config = config
        self.server = server
        self.backplane: Backplane = backplane or MemoryBackplane(
            config.history_size, config.history_ttl, clock=time.monotonic
        )
        self.registry = ChannelRegistry()
        self.connections: set[HubConnection] = set()
        #: the event streams of ``GET <path>/sse`` (transport.hub_sse)
        self.sse_streams: set[HubSseStream] = set()
        self.route = route_label(None, config.path)
        self._ping_handle: asyncio.TimerHandle | None = None

    @property
    def anonymous(self) -> bool:
        return self.config.token_secret is None

    async def start(self) -> None:
        await self.backplane.start(self._deliver)
        if self.anonymous:
            log.warning("hub %s has no token_secret: anonymous mode, every client may subscribe to every channel "
                        "(set [[hubs]] token_secret for production)", self.config.path)
        if self.config.ping_interval:
            self._ping_handle = self.server.loop.call_later(self.config.ping_interval, self._ping_all)

    async def stop(self) -> None:
        if self._ping_handle is not None:
            self._ping_handle.cancel()
            self._ping_handle = None
        for conn in list(self.connections):
            conn.close(1001, "proxy shutting down")
        # EventSource comes back after `retry`: spread the returns over [sse] retry_min..retry_max
        for stream in list(self.sse_streams):
            stream.end(retry_ms=stream.jittered_retry_ms())
        await self.backplane.close()

    # -- the upgrade -------------------------------------------------------------

    def take_over_sse(self, client: ClientConnection, head: RequestHead) -> None:
        """Serve ``GET <path>/sse`` (see `transport.hub_sse`)."""
        take_over_sse(self, client, head)

    async def authorize_with_hook(self, channel: str, user: str | None, client_ip: str) -> None:
        """Ask the auth hook, when there is one; raise `HubError` unless it allows ``channel``."""
        hook = self.config.auth_hook
        if hook is not None:
            body = orjson.dumps({"channel": channel, "user": user, "client": client_ip})
            await ask_auth_hook(hook[0], hook[1], body, self.config.auth_hook_timeout, channel)

    def take_over(self, client: ClientConnection, head: RequestHead) -> None:
        """Answer ``client``'s upgrade to this hub and make the socket a `HubConnection`."""
        server = self.server
        try:
            key = validate_client_handshake(head)
        except RemoteProtocolError as exc:
            server.metrics.connection_refused(WEBSOCKET, "bad_handshake")
            client._fail_request(400, f"bad WebSocket handshake: {exc}", [(b"Sec-WebSocket-Version", b"13")])
            return
        if head.has_body or not isinstance(client.http.next_event(), EndOfMessage):
            client._fail_request(400, "a WebSocket upgrade has no body")
            return
        now = server.now()
        transport, admitted_ip = detach_client(client)
        transport.write(serialize_head(b"HTTP/1.1 101 Switching Protocols", [
            (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Accept", generate_accept_token(key)),
        ]))
        conn = HubConnection(self, transport, client.client_ip, head, now, admitted_ip)
        transport.set_protocol(conn)
        trailing = client.http.switched_trailing_data()
        client.transport.resume_reading()
        conn.start(connect_token(head))
        if trailing:
            conn.data_received(trailing)
        if server.draining:  # its upgrade was in flight when the drain began
            conn.close_websocket(server.config.shutdown.close_code, "server shutting down")

    # -- fan-out -----------------------------------------------------------------

    def _deliver(self, pub) -> None:
        """The backplane's callback: one publication for a channel this node listens to."""
        self.server.metrics.backplane_message_received()
        channel = self.registry.publication(pub)
        if channel is not None and not channel.busy:
            channel.busy = True
            self.server.loop.call_soon(self._flush, channel)

    def _flush(self, channel: Channel) -> None:
        while (sse := channel.next_sse_batch()) is not None:
            self._write_sse(*sse)
        batch = channel.next_batch()
        if batch is None:
            channel.busy = False
            if self.registry.prune(channel):
                self._drop_interest(channel.name)
            return
        snapshot, blob, count = batch
        self._write_slice(channel, snapshot, blob, count, 0, 0)

    def _write_slice(self, channel: Channel, snapshot, blob: bytes, count: int, start: int, delivered: int) -> None:
        """Write ``blob`` to the snapshot's transports from ``start``, one `fanout_batch` per loop iteration."""
        subscribers, transports = snapshot
        end = start + self.config.fanout_batch
        part = transports if start == 0 and end >= len(transports) else transports[start:end]
        skipped = _accel.write_many(part, blob, self.config.subscriber_buffer_limit)
        for index in skipped:
            if not part[index].is_closing():
                subscribers[start + index].drop_slow()
        delivered += len(part) - len(skipped)
        if end < len(transports):
            # A huge channel: give the loop back between slices.
            self.server.loop.call_soon(self._write_slice, channel, snapshot, blob, count, end, delivered)
            return
        self.server.metrics.fanout_published(delivered, len(blob), count)
        self._flush(channel)

    def _write_sse(self, snapshot, blob: bytes, events: list, sse_only: int) -> None:
        """One SSE batch: the shared bytes to the one-channel streams, per-stream ids to the others."""
        singles, single_transports, multis, multi_transports = snapshot
        limit = self.config.subscriber_buffer_limit
        delivered, nbytes = 0, 0
        if single_transports:
            skipped = _accel.write_many(single_transports, blob, limit)
            for index in skipped:
                if not single_transports[index].is_closing():
                    singles[index].drop_slow()
            delivered = len(single_transports) - len(skipped)
            nbytes = delivered * len(blob)
        for stream, transport in zip(multis, multi_transports):
            if stream.closed or transport.is_closing():
                continue
            if transport.get_write_buffer_size() > limit:
                stream.drop_slow()
                continue
            nbytes += stream.write_events(events)
            delivered += 1
        self.server.metrics.fanout_written(delivered * len(events), nbytes, sse_only)

    def _drop_interest(self, name: str) -> None:
        task = self.server.loop.create_task(self.backplane.unsubscribe(name))
        task.add_done_callback(_log_failure)

    async def publish(self, channel: str, data: bytes) -> Position:
        position = await self.backplane.publish(channel, data)
        self.server.metrics.backplane_message_sent()
        return position

    # -- liveness ----------------------------------------------------------------

    def _ping_all(self) -> None:
        interval = self.config.ping_interval
        now = self.server.now()
        wall = time.time()
        conns = list(self.connections)
        _accel.write_many([c.transport for c in conns], _PING_FRAME)
        streams = [stream for stream in self.sse_streams if stream.streaming]
        _accel.write_many([stream.transport for stream in streams], SSE_KEEPALIVE)
        for stream in streams:
            if stream.grants.expires is not None and wall >= stream.grants.expires:
                stream.end()  # EventSource reconnects; with an expired token it gets 401
        for conn in conns:
            if now - conn.last_seen > 2 * interval:
                conn.abort("no message from the client for two ping intervals")
            elif conn.grants.expires is not None and wall >= conn.grants.expires:
                conn.fail(HubError("token_expired", "connection token expired"), CLOSE_TOKEN_EXPIRED)
        self._ping_handle = self.server.loop.call_later(interval, self._ping_all)


def detach_client(client: ClientConnection) -> tuple[asyncio.Transport, str | None]:
    """End ``client``'s HTTP life; its socket and admission slot pass to a hub connection or stream.

    Returns the transport and the address the slot is counted under (the new
    owner gives it back when the socket closes).
    """
    server = client.server
    server.connections.discard(client)
    client.closed = True  # nothing of ClientConnection may touch the socket any more
    admitted_ip, client._admitted_ip = client._admitted_ip, None
    server.metrics.connection_closed(client._metrics_key, server.now() - client._opened_at)
    return client.transport, admitted_ip


def connect_token(head: RequestHead) -> str | None:
    """The token of the upgrade: ``Authorization: Bearer``, else the ``token`` query parameter."""
    auth = head.header(b"authorization")
    if auth is not None and auth[:7].lower() == b"bearer ":
        return auth[7:].strip().decode("latin-1")
    query = urlsplit(head.target.decode("latin-1")).query
    values = parse_qs(query).get("token")
    return values[0] if values else None


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("hub backplane call failed: %s", task.exception())


class HubConnection(asyncio.Protocol):
    """One client's hub WebSocket, after the 101."""

    def __init__(self, service: HubService, transport: asyncio.Transport, client_ip: str, head: RequestHead,
                 now: float, admitted_ip: str | None = None):
        self.service = service
        self.transport = transport
        self.client_ip = client_ip
        #: the address admission control counted this socket under (None: not counted)
        self.admitted_ip = admitted_ip
        self.head = head
        self.ws = Connection(ConnectionType.SERVER)
        self.grants: Grants = ANONYMOUS if service.anonymous else NOTHING
        #: channel -> the marker of the subscribe that holds it (pending or live)
        self.subscriptions: dict[str, object] = {}
        self.closed = False
        self.opened = now
        self.last_seen = now
        self.close_code: int | None = None
        self._parts: list[bytes | str] = []
        self._size = 0
        self._tasks: set[asyncio.Task] = set()
        self._abort_handle: asyncio.TimerHandle | None = None
        metrics = service.server.metrics
        self._metrics_key = metrics.connection_opened(WEBSOCKET, service.route, _HUB_UPSTREAM, "")
        self.messages_in = 0
        #: publications written to this connection alone (replays), not by the fan-out
        self.messages_out = 0
        self.bytes_out = 0
        #: the id ``POST /v1/send`` addresses this connection by, and its token's user
        self.client_id = service.server.presence.new_id()
        self.user: str | None = None

    def start(self, token: str | None) -> None:
        service = self.service
        service.connections.add(self)
        logs.access({"event": "ws_open", "client": self.client_ip, "path": self.head.target.decode("latin-1"),
                     "upstream": _HUB_UPSTREAM, "status": 101})
        self.send(encode_connected(service.config.ping_interval, self.client_id))
        if token is not None and not service.anonymous:
            try:
                self.grants = verify_token(token, service.config.token_secret, time.time())
            except HubError as exc:
                self.fail(exc, CLOSE_TOKEN_EXPIRED if exc.code == "token_expired" else CLOSE_BAD_TOKEN)
        if not self.closed:
            self.user = self.grants.subject
            service.server.presence.add(self)

    # -- asyncio.Protocol --------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_seen = self.service.server.now()
        try:
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, Message):
                    self._on_message_part(event)
                elif isinstance(event, Ping):
                    self.transport.write(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self.close_code = event.code
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        self.transport.write(self.ws.send(event.response()))
                    self._close_transport()
                    return
                if self.closed:
                    return
        except (WSRemoteProtocolError, WSLocalProtocolError) as exc:
            code = getattr(exc, "event_hint", None)
            self.close(code.code if isinstance(code, CloseConnection) else 1002, "protocol error")

    def eof_received(self) -> bool:
        self._close_transport()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        service = self.service
        service.connections.discard(self)
        if self.admitted_ip is not None:
            if service.server.admission is not None:
                service.server.admission.release(self.admitted_ip)
            self.admitted_ip = None
        service.server.presence.remove(self)
        if self._abort_handle is not None:
            self._abort_handle.cancel()
        for task in self._tasks:
            task.cancel()
        for channel in self.subscriptions:
            if service.registry.remove(channel, self):
                service._drop_interest(channel)
        self.subscriptions.clear()
        now = service.server.now()
        metrics = service.server.metrics
        metrics.add_messages(HUB_DELIVERY, self.messages_out, self.bytes_out)
        metrics.connection_closed(self._metrics_key, now - self.opened, self.close_code)
        logs.access({"event": "ws_close", "client": self.client_ip, "path": self.head.target.decode("latin-1"),
                     "upstream": _HUB_UPSTREAM, "proxy_close": self.close_code, "duration": round(now - self.opened, 3),
                     "msgs_in": self.messages_in, "msgs_out": self.messages_out})

    # -- sending and closing -------------------------------------------------------

    def send(self, message: bytes) -> None:
        if not self.closed:
            self.transport.write(text_frame(message))

    def error(self, exc: HubError) -> None:
        self.send(encode_error(exc))

    def fail(self, exc: HubError, code: int) -> None:
        """An error message, then close with ``code``."""
        self.error(exc)
        self.close(code, exc.code)

    def close(self, code: int, reason: str) -> None:
        """Send a close frame and close once it is flushed (abort if that takes too long)."""
        if self.closed:
            return
        self.close_code = code
        if self.ws.state is ConnectionState.OPEN:
            with contextlib.suppress(WSLocalProtocolError):
                self.transport.write(self.ws.send(CloseConnection(code=code, reason=reason)))
        self._close_transport()

    def close_websocket(self, code: int, reason: str) -> None:
        """The proxy drains: a close frame with the reconnect hint; the client resumes elsewhere."""
        self.close(code, reason)

    def _close_transport(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()
            timeout = self.service.server.config.websocket.close_timeout or 5.0
            self._abort_handle = self.service.server.loop.call_later(timeout, self.transport.abort)

    def abort(self, why: str) -> None:
        log.info("hub %s: closing the connection from %s: %s", self.service.config.path, self.client_ip, why)
        self.closed = True
        self.transport.abort()

    def drop_slow(self) -> None:
        """Its buffer passed the limit during a fan-out: tell it to resume, stop feeding it."""
        self.service.server.metrics.fanout_subscriber_dropped()
        self.close(CLOSE_RESUME, "resume: fell behind, subscribe again with since")

    # -- messages ------------------------------------------------------------------

    def _on_message_part(self, event: Message) -> None:
        self._parts.append(event.data)
        self._size += len(event.data)
        limit = self.service.config.max_message_size
        if self._size > limit:
            self.fail(HubError("message_too_big", f"message of more than {limit} bytes is over max_message_size {limit}"),
                      1009)
            return
        if not event.message_finished:
            return
        if isinstance(event, TextMessage):
            data: bytes | str = "".join(self._parts)  # type: ignore[arg-type]
        else:
            data = b"".join(self._parts)  # type: ignore[arg-type]
        self._parts.clear()
        self._size = 0
        self.messages_in += 1
        try:
            command = parse_client_message(data, limit)
        except HubError as exc:
            self.error(exc)
            return
        if isinstance(command, Subscribe):
            self._start_subscribe(command)
        elif isinstance(command, Unsubscribe):
            self._unsubscribe(command.channel)
        else:
            assert isinstance(command, Pong)

    def _start_subscribe(self, command: Subscribe) -> None:
        channel = command.channel
        if channel in self.subscriptions:
            self.error(HubError("already_subscribed", f"already subscribed to {channel!r}", channel=channel))
            return
        if len(self.subscriptions) >= self.service.config.max_subscriptions:
            self.error(HubError("too_many_subscriptions", f"at most {self.service.config.max_subscriptions} channels "
                                "per connection (max_subscriptions)", channel=channel))
            return
        marker = object()
        self.subscriptions[channel] = marker
        task = self.service.server.loop.create_task(self._subscribe(command, marker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _subscribe(self, command: Subscribe, marker: object) -> None:
        service = self.service
        channel = command.channel
        try:
            await self._authorize(command)
        except HubError as exc:
            if self.subscriptions.get(channel) is marker:
                del self.subscriptions[channel]
            self.error(exc)
            return
        if self.subscriptions.get(channel) is not marker:
            return  # unsubscribed meanwhile
        registry = service.registry
        if registry.begin(channel, self):
            registry.get(channel).interest = service.server.loop.create_task(service.backplane.subscribe(channel))
        try:
            await asyncio.shield(registry.get(channel).interest)
            result = await service.backplane.history(channel, command.since)
        except Exception as exc:  # the backplane failed: this subscribe fails, nothing else does
            log.warning("hub %s: backplane failed for channel %r: %s", service.config.path, channel, exc)
            service.server.metrics.backplane_failed()
            if self.subscriptions.get(channel) is marker:
                del self.subscriptions[channel]
                if registry.remove(channel, self):
                    service._drop_interest(channel)
            self.error(HubError("unavailable", "the backplane failed; try again", channel=channel))
            return
        if self.subscriptions.get(channel) is not marker or self.closed:
            return
        frames = registry.complete(channel, self, self.transport, result.position, result.missed, result.recovered)
        if frames:
            blob = b"".join(frames)
            self.transport.write(blob)
            self.messages_out += len(frames) - 1  # the publications after `subscribed`
            self.bytes_out += len(blob) - len(frames[0])

    async def _authorize(self, command: Subscribe) -> None:
        """Raise `HubError` unless the channel is granted (token) and allowed (hook)."""
        service = self.service
        channel = command.channel
        if not self.grants.allows(channel):
            granted = False
            if command.token is not None:
                try:
                    granted = verify_token(command.token, service.config.token_secret, time.time()).allows(channel)
                except HubError as exc:
                    exc.channel = channel
                    raise
            if not granted:
                raise HubError("forbidden", f"no token grants channel {channel!r}", channel=channel)
        await service.authorize_with_hook(channel, self.grants.subject, self.client_ip)

    def _unsubscribe(self, channel: str) -> None:
        if self.subscriptions.pop(channel, None) is None:
            self.error(HubError("not_subscribed", f"not subscribed to {channel!r}", channel=channel))
            return
        if self.service.registry.remove(channel, self):
            self.service._drop_interest(channel)
        self.send(encode_unsubscribed(channel))


async def ask_auth_hook(address, path: str, body: bytes, timeout: float, channel: str) -> None:
    """POST ``body`` to the backend's auth hook; return on 2xx, raise `HubError` otherwise."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address.host, address.port)
            try:
                conn = h11.Connection(h11.CLIENT)
                writer.write(conn.send(h11.Request(method="POST", target=path, headers=[
                    ("Host", str(address)), ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))), ("Connection", "close")])))
                writer.write(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
                status = 0
                while not status:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await reader.read(4096))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.ConnectionClosed):
                        break
            finally:
                writer.close()
    except (OSError, TimeoutError, h11.ProtocolError) as exc:
        raise HubError("auth_unavailable", f"auth hook did not answer: {exc or type(exc).__name__}",
                       channel=channel) from None
    if 200 <= status < 300:
        return
    if status == 403:
        raise HubError("forbidden", f"the auth hook denied channel {channel!r}", channel=channel)
    raise HubError("auth_unavailable", f"auth hook answered {status} (expected 2xx or 403)", channel=channel)


# -- the publish API (POST /v1/publish on the admin listener) ---------------------------


class _ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _check_api_key(server: ProxyServer, request: AdminRequest) -> None:
    key = server.config.admin.api_key
    if key is None:
        raise _ApiError(403, "the publish API is off: set [admin] api_key to turn it on")
    if not request.bears(key):
        raise _ApiError(401, "missing or wrong API key (send Authorization: Bearer <[admin] api_key>)")


def _publication(server: ProxyServer, item: Any, where: str) -> tuple[HubService, str, bytes]:
    if not isinstance(item, dict):
        raise _ApiError(400, f"{where}: expected an object {{\"channel\": ..., \"data\": ...}}")
    unknown = set(item) - {"channel", "data", "hub"}
    if unknown:
        raise _ApiError(400, f"{where}: unknown field(s) {', '.join(sorted(unknown))} (expected channel, data, hub)")
    channel = item.get("channel")
    if not valid_channel(channel):
        raise _ApiError(400, f"{where}.channel: expected a channel name (1-255 of A-Z a-z 0-9 _ - . : @ / =), "
                             f"got {str(channel)[:80]!r}")
    if "data" not in item:
        raise _ApiError(400, f"{where}.data: missing (any JSON value)")
    hubs = server.hubs
    path = item.get("hub")
    if path is None:
        if len(hubs) != 1:
            raise _ApiError(400, f"{where}.hub: required when more than one hub is configured ({', '.join(hubs)})")
        hub = next(iter(hubs.values()))
    elif path in hubs:
        hub = hubs[path]
    else:
        raise _ApiError(400, f"{where}.hub: no hub at {str(path)[:80]!r} (hubs: {', '.join(hubs) or 'none'})")
    data = orjson.dumps(item["data"])
    if len(data) > hub.config.max_message_size:
        raise _ApiError(413, f"{where}.data: {len(data)} bytes of JSON is over the hub's max_message_size "
                             f"{hub.config.max_message_size}")
    return hub, channel, data


async def publish_endpoint(server: ProxyServer, request: AdminRequest) -> tuple[int, dict]:
    """``POST /v1/publish``: one ``{"channel", "data"}`` or a batch ``{"publications": [...]}``.

    Answers ``{"seq", "epoch"}`` (or ``{"results": [...]}`` in order) with 200; 400 for
    a malformed body, 401 for a missing or wrong key, 403 when the API is off, 413 for
    a body over ``[admin] max_publish_size`` or data over a hub's ``max_message_size``;
    503 when the backplane is unavailable (``published`` lists what went out before).
    Nothing of a batch is published unless all of it is valid.
    """
    try:
        _check_api_key(server, request)
        if request.too_large:
            raise _ApiError(413, f"request body over [admin] max_publish_size ({server.config.admin.max_publish_size} bytes)")
        if not server.hubs:
            raise _ApiError(400, "no [[hubs]] are configured")
        try:
            doc = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise _ApiError(400, f"body is not JSON: {exc}") from None
        if isinstance(doc, dict) and "publications" in doc:
            items = doc["publications"]
            if set(doc) != {"publications"} or not isinstance(items, list) or not items:
                raise _ApiError(400, 'a batch is {"publications": [{"channel": ..., "data": ...}, ...]} (not empty)')
            checked = [_publication(server, item, f"publications[{i}]") for i, item in enumerate(items)]
        else:
            checked = [_publication(server, doc, "body")]
        results = []
        for hub, channel, data in checked:
            try:
                position = await hub.publish(channel, data)
            except BackplaneUnavailable as exc:
                # Loud, never silent: the caller learns which ones (the first len(published)) went out.
                log.warning("publish API: %s", exc)
                return 503, {"error": f"{exc}; nothing after the published ones was published, retry later",
                             "published": results}
            results.append({"seq": position.seq, "epoch": position.epoch})
    except _ApiError as exc:
        return exc.status, {"error": str(exc)}
    return 200, ({"results": results} if len(checked) > 1 or "publications" in doc else results[0])



async def send_endpoint(server: ProxyServer, request: AdminRequest) -> tuple[int, dict]:
    """``POST /v1/send``: ``{"user": U, "data": ...}`` or ``{"client": C, "data": ...}``, optional ``hub``.

    The message goes only through the instance(s) holding the target (presence, see
    ``edgeproxy.transport.presence``) and reaches its connections as
    ``{"op": "message", "data": ...}``.  Answers 200 ``{"delivered": {instance: [ids]}}``,
    404 when the target is connected nowhere, 503 when the registry is unavailable;
    400/401/403/413 as ``/v1/publish``.
    """
    try:
        _check_api_key(server, request)
        if request.too_large:
            raise _ApiError(413, f"request body over [admin] max_publish_size ({server.config.admin.max_publish_size} bytes)")
        try:
            doc = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise _ApiError(400, f"body is not JSON: {exc}") from None
        if not isinstance(doc, dict) or "data" not in doc or len({"user", "client"} & set(doc)) != 1:
            raise _ApiError(400, 'expected {"user": ..., "data": ...} or {"client": ..., "data": ...} (optional "hub")')
        unknown = set(doc) - {"user", "client", "data", "hub"}
        if unknown:
            raise _ApiError(400, f"unknown field(s) {', '.join(sorted(unknown))} (expected user or client, data, hub)")
        target = {k: doc[k] for k in ("user", "client", "hub") if k in doc}
        if not all(isinstance(v, str) and v for v in target.values()):
            raise _ApiError(400, "user, client and hub are non-empty strings")
        if "hub" in target and target["hub"] not in server.hubs:
            raise _ApiError(400, f"hub: no hub at {target['hub'][:80]!r} (hubs: {', '.join(server.hubs) or 'none'})")
        data = orjson.dumps(doc["data"])
        try:
            where = await server.presence.send(target, data)
        except BackplaneUnavailable as exc:
            log.warning("send API: %s", exc)
            return 503, {"error": f"{exc}; not sent, retry later"}
        if not where:
            name = f"user {target['user']!r}" if "user" in target else f"connection {target['client']!r}"
            raise _ApiError(404, f"{name} is not connected to any live instance")
    except _ApiError as exc:
        return exc.status, {"error": str(exc)}
    return 200, {"delivered": where}

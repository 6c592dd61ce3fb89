"""A hub over Server-Sent Events: ``GET <hub path>/sse?channel=a&channel=b``.

Theory of operation
-------------------
EventSource is what a browser has when WebSockets are blocked or overkill: one
long GET, text events, and an automatic reconnect that sends back the id of the
last event it saw (``Last-Event-ID``).  That id is all the state a reconnect
carries, so every ``subscribed`` and ``pub`` event's id says where the stream is
in each of its channels (`edgeproxy.hub.protocol.sse_event_id`); a reconnect
turns it back into one ``since`` per channel and resumes exactly as a WebSocket
``subscribe`` with ``since`` does: what was missed from history, then live, no
gap and no duplicate; ``recovered: false`` when history no longer covers it.

*Before the 200.*  The channels, the token (``Authorization: Bearer`` or the
``token`` parameter), the ``Last-Event-ID`` (or, from a client that re-opened
the stream itself and so cannot set it, the ``last_event_id`` parameter), the grants and the auth hook are all
checked, and every channel's history is read, before the response starts, so a
refusal is a real status (400, 401, 403, 503) that EventSource reports, not an
event on a stream that looks healthy.  The three steps of
`edgeproxy.hub.channels` run for all channels at once: pending for each, await
every history read, then complete them all in one go (no await in between), so
the stream becomes a member of its channels together and the ids it is sent
are right from the first.

*Live.*  The registry encodes each publication once more as an SSE event and
queues it for the SSE members; a stream of one channel shares the very bytes of
every other (`HubService._write_sse`, ``write_many``); a stream of several
channels gets the shared event behind an id of its own.  The body is delimited
by the connection's end (``Connection: close``, no chunking), so the bytes on the
wire are the events themselves.

*Liveness.*  The hub's ping timer writes a comment line to every stream (NATs
keep the flow); a stream whose buffer passes ``subscriber_buffer_limit`` is ended
(the browser reconnects and resumes); an expired token ends it; a drain ends the
streams in the paced batches of the WebSockets (`close_websocket`), each after a
``retry:`` with a jittered delay, so EventSource reconnects spread out instead of
landing together.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import orjson

from edgeproxy import logs
from edgeproxy.core.http1 import EndOfMessage, RequestHead, error_response, serialize_head
from edgeproxy.hub.protocol import (
    HubError,
    Position,
    Publication,
    encode_connected,
    encode_pub,
    encode_subscribed,
    parse_last_event_id,
    sse_event,
    sse_event_id,
    valid_channel,
)
from edgeproxy.hub.token import ANONYMOUS, Grants, verify_token
from edgeproxy.metrics import HUB_DELIVERY, SSE

if TYPE_CHECKING:
    from edgeproxy.transport.downstream import ClientConnection
    from edgeproxy.transport.hub import HubService

log = logging.getLogger("edgeproxy")

#: path suffix of a hub's SSE endpoint
SSE_SUFFIX = "/sse"
#: the reconnect delay EventSource is told at the start of a stream, in ms
RETRY_MS = 2000
_HUB_UPSTREAM = "hub"
_STATUS_OF = {"bad_token": 401, "token_expired": 401, "forbidden": 403, "auth_unavailable": 503, "unavailable": 503}


def take_over_sse(service: HubService, client: ClientConnection, head: RequestHead) -> None:
    """Serve ``client``'s ``GET <hub>/sse``: check what can be checked now, then stream."""
    from edgeproxy.transport.hub import connect_token, detach_client  # hub imports this module

    server = service.server
    if head.method != b"GET":
        client._fail_request(405, f"{head.path} takes GET", [(b"Allow", b"GET")])
        return
    if head.has_body or not isinstance(client.http.next_event(), EndOfMessage):
        client._fail_request(400, "an event stream request has no body")
        return
    try:
        query = parse_qs(urlsplit(head.target.decode("latin-1")).query, keep_blank_values=True)
        channels = _channels(query, service.config.max_subscriptions)
        since = _since(head, query, len(channels))
        grants = ANONYMOUS
        if not service.anonymous:
            token = connect_token(head)
            if token is None:
                raise HubError("bad_token", "no token: send Authorization: Bearer <JWT> or ?token=")
            grants = verify_token(token, service.config.token_secret, time.time())
        for channel in channels:
            if not grants.allows(channel):
                raise HubError("forbidden", f"no token grants channel {channel!r}", channel=channel)
    except HubError as exc:
        server.metrics.connection_refused(SSE, exc.code)
        client._fail_request(_STATUS_OF.get(exc.code, 400), f"{exc.code}: {exc}")
        return
    transport, admitted_ip = detach_client(client)
    stream = HubSseStream(service, transport, client.client_ip, head, channels, grants, server.now(), admitted_ip)
    transport.set_protocol(stream)
    transport.resume_reading()
    stream.start(since)


def _channels(query: dict[str, list[str]], limit: int) -> tuple[str, ...]:
    channels = query.get("channel", [])
    if not channels:
        raise HubError("bad_message", "no channel: ask for ?channel=NAME (repeat it for several)")
    if len(channels) > limit:
        raise HubError("too_many_subscriptions", f"{len(channels)} channels, at most {limit} (max_subscriptions)")
    for channel in channels:
        if not valid_channel(channel):
            raise HubError("bad_channel", f"invalid channel name {channel[:80]!r}")
    if len(set(channels)) != len(channels):
        raise HubError("bad_message", "a channel is named twice")
    return tuple(channels)


def _since(head: RequestHead, query: dict[str, list[str]], count: int) -> list[Position | None] | None:
    """Where to resume: the ``Last-Event-ID`` header (EventSource's own reconnect) or, when there is
    none, the ``last_event_id`` parameter (a client that re-opened the stream itself cannot set headers)."""
    value = head.header(b"last-event-id")
    text = value.decode("latin-1").strip() if value is not None else ""
    if not text:
        given = query.get("last_event_id", [])
        if len(given) > 1:
            raise HubError("bad_message", "last_event_id is given twice")
        text = given[0].strip() if given else ""
    return parse_last_event_id(text, count) if text else None


class HubSseStream:
    """One client's event stream of a hub's channels (the socket's protocol after the request)."""

    def __init__(self, service: HubService, transport: asyncio.Transport, client_ip: str, head: RequestHead,
                 channels: tuple[str, ...], grants: Grants, now: float, admitted_ip: str | None):
        self.service = service
        self.transport = transport
        self.client_ip = client_ip
        self.head = head
        self.channels = channels
        #: one channel: the stream shares every other one-channel stream's bytes
        self.single = len(channels) == 1
        #: where the stream is in each channel (the id of its last event says so)
        self.positions: list[Position] = []
        self.grants = grants
        self.admitted_ip = admitted_ip
        self.opened = now
        self.closed = False
        self.streaming = False  # the 200 is out
        self.client_id = service.server.presence.new_id()
        self.user = grants.subject
        self.messages_out = 0
        self.bytes_out = 0
        self._metrics_key = None
        self._task: asyncio.Task | None = None
        self._index = {name: i for i, name in enumerate(channels)}

    # -- asyncio.Protocol (the transport was handed over) ------------------------

    def connection_made(self, transport) -> None:  # pragma: no cover - set_protocol does not call it
        pass

    def data_received(self, data: bytes) -> None:
        """A client sends nothing after the request: whatever comes is dropped (the stream closes the connection)."""

    def eof_received(self) -> bool:
        self.end()
        return False

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        service = self.service
        server = service.server
        service.sse_streams.discard(self)
        if self._task is not None:
            self._task.cancel()
        if self.admitted_ip is not None:
            if server.admission is not None:
                server.admission.release(self.admitted_ip)
            self.admitted_ip = None
        for channel in self.channels:
            if service.registry.remove(channel, self):
                service._drop_interest(channel)
        if self.streaming:
            server.presence.remove(self)
            now = server.now()
            server.metrics.add_messages(HUB_DELIVERY, self.messages_out, self.bytes_out)
            server.metrics.connection_closed(self._metrics_key, now - self.opened)
            logs.access({"event": "sse_close", "client": self.client_ip, "path": self.head.target.decode("latin-1"),
                         "upstream": _HUB_UPSTREAM, "duration": round(now - self.opened, 3),
                         "msgs_out": self.messages_out})

    # -- the subscription ----------------------------------------------------------

    def start(self, since: list[Position | None] | None) -> None:
        self.service.sse_streams.add(self)
        self._task = self.service.server.loop.create_task(self._subscribe(since))

    async def _subscribe(self, since: list[Position | None] | None) -> None:
        service = self.service
        registry = service.registry
        try:
            for channel in self.channels:
                await service.authorize_with_hook(channel, self.grants.subject, self.client_ip)
        except HubError as exc:
            self._refuse(exc)
            return
        for channel in self.channels:
            if registry.begin(channel, self):
                registry.get(channel).interest = service.server.loop.create_task(service.backplane.subscribe(channel))
        try:
            results = []
            for i, channel in enumerate(self.channels):
                await asyncio.shield(registry.get(channel).interest)
                results.append(await service.backplane.history(channel, since[i] if since else None))
        except Exception as exc:  # the backplane failed: this stream fails, nothing else does
            log.warning("hub %s: backplane failed for an event stream: %s", service.config.path, exc)
            service.server.metrics.backplane_failed()
            self._refuse(HubError("unavailable", "the backplane failed; try again"))
            return
        if self.closed:
            return
        # Complete every channel in one go (no await from here on), then write it all.
        parts = [b"HTTP/1.1 200 OK\r\n", b"Content-Type: text/event-stream\r\n", b"Cache-Control: no-store\r\n",
                 b"X-Accel-Buffering: no\r\n", b"Connection: close\r\n\r\n", b"retry: %d\n\n" % RETRY_MS,
                 sse_event(b"connected", encode_connected(service.config.ping_interval, self.client_id))]
        replays: list[Publication] = []
        for channel, result in zip(self.channels, results):
            missed = registry.complete_sse(channel, self, self.transport, result.position, result.missed, self.single)
            if missed is None:  # pragma: no cover - nothing removed it while pending but connection_lost
                return
            # before its replay the stream stands just ahead of what it missed
            first = missed[0].seq - 1 if missed and missed[0].epoch == result.position.epoch else result.position.seq
            self.positions.append(Position(first, result.position.epoch))
            replays += missed
        for channel, result in zip(self.channels, results):  # once every position is known
            parts.append(sse_event(b"subscribed", encode_subscribed(channel, result.position, result.recovered),
                                   sse_event_id(self.positions)))
        for pub in replays:
            parts.append(self.event_for(pub))
        self.streaming = True
        server = service.server
        self._metrics_key = server.metrics.connection_opened(SSE, service.route, _HUB_UPSTREAM, "")
        server.presence.add(self)
        logs.access({"event": "sse_open", "client": self.client_ip, "path": self.head.target.decode("latin-1"),
                     "upstream": _HUB_UPSTREAM, "status": 200, "channels": len(self.channels)})
        blob = b"".join(parts)
        self.transport.write(blob)
        self.messages_out += len(replays)

    def _refuse(self, exc: HubError) -> None:
        """An error before the 200: a real status, then the end."""
        if self.closed:
            return
        self.service.server.metrics.connection_refused(SSE, exc.code)
        body = orjson.dumps({"error": exc.code, "message": str(exc)}).decode()
        self.transport.write(error_response(_STATUS_OF.get(exc.code, 400), body))
        self.end()

    # -- writing -------------------------------------------------------------------

    def event_for(self, pub: Publication) -> bytes:
        """The ``pub`` event for this stream, its id moved on in the publication's channel."""
        self.positions[self._index[pub.channel]] = Position(pub.seq, pub.epoch)
        return sse_event(b"pub", encode_pub(pub), sse_event_id(self.positions))

    def write_events(self, events: list[tuple[Publication, bytes]]) -> int:
        """Several-channel streams: the shared events, each behind this stream's id; the bytes written."""
        index, positions = self._index, self.positions
        parts = []
        for pub, body in events:
            positions[index[pub.channel]] = Position(pub.seq, pub.epoch)
            parts.append(b"id: " + sse_event_id(positions) + b"\n")
            parts.append(body)
        blob = b"".join(parts)
        self.transport.write(blob)
        return len(blob)

    def send(self, message: bytes) -> None:
        """A targeted message (``POST /v1/send``): an event of its own, outside every channel."""
        if self.streaming and not self.closed:
            self.transport.write(sse_event(b"message", message))

    def jittered_retry_ms(self) -> int:
        """A reconnect delay drawn from ``[sse] retry_min .. retry_max``, so EventSource returns spread out."""
        sse = self.service.server.config.sse
        return int(self.service.server.rng.uniform(sse.retry_min, sse.retry_max) * 1000)

    def close_websocket(self, code: int, reason: str) -> None:
        """The paced drain's close (as for WebSockets): a jittered ``retry:``, then the end."""
        self.end(retry_ms=self.jittered_retry_ms())

    def drop_slow(self) -> None:
        """Its buffer passed the limit during a fan-out: end it; EventSource reconnects and resumes."""
        self.service.server.metrics.fanout_subscriber_dropped()
        self.end()

    def end(self, retry_ms: int | None = None) -> None:
        """End the stream (after a ``retry:`` telling EventSource when to come back, if given)."""
        if self.closed:
            return
        self.closed = True
        if retry_ms is not None and self.streaming:
            self.transport.write(b"retry: %d\n\n" % retry_ms)
        self.transport.close()
        self.service.server.loop.call_later(self.service.server.config.websocket.close_timeout or 5.0,
                                            self.transport.abort)

"""The hub's JSON protocol: what clients send, what the hub answers, and the close codes.

Theory of operation
===================

A hub connection is a WebSocket the proxy terminates itself (it is never relayed to a
backend).  Every message is one JSON object with an ``op``.  This module turns client
messages into commands (:func:`parse_client_message`) and builds the hub's messages as
bytes (``encode_*``); it never touches a socket or a clock.

Client to hub:

==============  ===============================================================
op              fields
==============  ===============================================================
``subscribe``   ``channel``; optional ``since`` ``{"seq": 41, "epoch": "e1"}``
                (resume after that publication) and ``token`` (a JWT for this
                subscribe, when the connection's own token does not grant it)
``unsubscribe`` ``channel``
``pong``        none: the answer to the hub's ``ping`` (any message will do)
==============  ===============================================================

Hub to client:

================  =============================================================
op                fields
================  =============================================================
``connected``     ``ping_interval`` (seconds, 0 = no pings): the first message;
                  ``client``: the connection's id (for ``POST /v1/send``)
``message``       ``data``: a targeted message (``POST /v1/send``), not on any
                  channel, not stored: no seq, no resume
``subscribed``    ``channel``, ``seq`` and ``epoch`` (the channel's position:
                  the publications that follow have higher seqs), ``recovered``
                  (with ``since``: true when every missed publication follows;
                  false when history no longer covers the gap or the epoch
                  changed, so the application must resync)
``unsubscribed``  ``channel``
``pub``           ``channel``, ``seq``, ``epoch``, ``data`` (any JSON value)
``ping``          none; every ``ping_interval`` seconds.  A client that sees no
                  message for longer than that takes the server for dead
``error``         ``code`` (one of `ERROR_CODES`), ``message``, and ``channel``
                  when the error is about one
================  =============================================================

Within a channel ``seq`` increases by one per publication.  ``epoch`` names one run of
the channel's history: when history restarts (a new backplane, history lost), the
epoch changes and seqs start again, so a position is only meaningful with its epoch.

Close codes (RFC 6455 section 7.4.2 leaves 4000-4999 to applications):

* `CLOSE_RESUME` 4000: the subscriber fell behind (its buffer passed the hub's
  ``subscriber_buffer_limit``).  Nothing is lost within the history window:
  reconnect and subscribe with ``since``.
* `CLOSE_BAD_TOKEN` 4001: the connect token is invalid; do not retry with it.
* `CLOSE_TOKEN_EXPIRED` 4002: the connect token expired; reconnect with a new one.
* 1009 for a message over ``max_message_size``; 1001 when the proxy stops.

Server-Sent Events (``GET <hub path>/sse?channel=a&channel=b``): the same
messages as events, ``event: <op>`` and ``data: <the JSON message>``.  Every
``subscribed`` and ``pub`` event has an ``id`` that says where the stream is in
*each* of its channels, so the ``Last-Event-ID`` a browser sends on reconnect
resumes all of them: ``<epoch>:<seq>`` per channel, joined by ``,`` in the
order of the ``channel`` parameters (one channel: just ``<epoch>:<seq>``).  A
client that re-opens a stream itself (it cannot set the header) passes the same
value as the ``last_event_id`` query parameter; an empty part there is a channel
it has no position in yet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import orjson

from edgeproxy.core import _accel
from edgeproxy.errors import RemoteProtocolError

__all__ = [
    "CLOSE_RESUME",
    "CLOSE_BAD_TOKEN",
    "CLOSE_TOKEN_EXPIRED",
    "ERROR_CODES",
    "HubError",
    "Position",
    "Publication",
    "Subscribe",
    "Unsubscribe",
    "Pong",
    "valid_channel",
    "parse_client_message",
    "encode_connected",
    "encode_subscribed",
    "encode_unsubscribed",
    "encode_pub",
    "encode_error",
    "PING",
    "text_frame",
]

CLOSE_RESUME = 4000
CLOSE_BAD_TOKEN = 4001
CLOSE_TOKEN_EXPIRED = 4002

#: every ``code`` an ``error`` message may carry, with what it means
ERROR_CODES = {
    "bad_json": "the message is not a JSON object",
    "bad_message": "a field is missing or has the wrong type",
    "unknown_op": "the op is not one the hub knows",
    "message_too_big": "the message is over max_message_size (the connection is closed with 1009)",
    "bad_channel": "the channel name is not 1-255 characters of A-Z a-z 0-9 _ - . : @ / =",
    "bad_token": "the token is malformed, not HS256 or its signature does not verify",
    "token_expired": "the token's exp is in the past (or its nbf in the future)",
    "forbidden": "neither the connection's token, the subscribe's token nor the auth hook allow the channel",
    "auth_unavailable": "the auth hook did not answer in time or answered neither allow nor deny",
    "already_subscribed": "the connection is already subscribed to the channel",
    "not_subscribed": "the connection is not subscribed to the channel",
    "too_many_subscriptions": "the connection holds max_subscriptions channels already",
    "unavailable": "the backplane failed; try again",
}

_CHANNEL_RE = re.compile(r"[A-Za-z0-9_\-.:@/=]{1,255}")


class HubError(RemoteProtocolError):
    """A client message the hub refuses; answered with an ``error`` message.

    ``code`` is one of `ERROR_CODES`; ``channel`` names the channel it is about, if any.
    """

    def __init__(self, code: str, message: str, *, channel: str | None = None, close_code: int | None = None):
        assert code in ERROR_CODES, code
        super().__init__(message, close_code=close_code)
        self.code = code
        self.channel = channel


class Position(NamedTuple):
    """Where a subscriber is in a channel: the last seq seen, in an epoch."""

    seq: int
    epoch: str


class Publication(NamedTuple):
    """One publication: ``data`` is the JSON text of the published value, as bytes."""

    channel: str
    seq: int
    epoch: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Subscribe:
    channel: str
    since: Position | None = None
    token: str | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    channel: str


@dataclass(frozen=True, slots=True)
class Pong:
    pass


def valid_channel(name: object) -> bool:
    """True for a channel name the hub accepts (see ``bad_channel`` in `ERROR_CODES`)."""
    return isinstance(name, str) and _CHANNEL_RE.fullmatch(name) is not None


def _channel(message: dict) -> str:
    channel = message.get("channel")
    if not isinstance(channel, str):
        raise HubError("bad_message", '"channel" must be a string')
    if not valid_channel(channel):
        raise HubError("bad_channel", f"invalid channel name {channel[:80]!r}: {ERROR_CODES['bad_channel']}",
                       channel=channel[:255])
    return channel


def _since(message: dict, channel: str) -> Position | None:
    since = message.get("since")
    if since is None:
        return None
    if not isinstance(since, dict):
        raise HubError("bad_message", '"since" must be an object {"seq": N, "epoch": "..."}', channel=channel)
    seq, epoch = since.get("seq"), since.get("epoch")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0 or not isinstance(epoch, str):
        raise HubError("bad_message", '"since" needs an integer "seq" >= 0 and a string "epoch"', channel=channel)
    return Position(seq, epoch)


def parse_client_message(data: bytes | str, max_size: int) -> Subscribe | Unsubscribe | Pong:
    """One complete client message to a command.

    Raises:
        HubError: with the ``error`` to answer; ``message_too_big`` carries close code 1009.
    """
    if len(data) > max_size:
        raise HubError("message_too_big", f"message of {len(data)} bytes is over max_message_size {max_size}",
                       close_code=1009)
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise HubError("bad_json", f"malformed JSON: {exc}") from None
    if not isinstance(message, dict):
        raise HubError("bad_json", "a message must be a JSON object with an \"op\"")
    op = message.get("op")
    if op == "subscribe":
        channel = _channel(message)
        token = message.get("token")
        if token is not None and not isinstance(token, str):
            raise HubError("bad_message", '"token" must be a string', channel=channel)
        return Subscribe(channel, _since(message, channel), token)
    if op == "unsubscribe":
        return Unsubscribe(_channel(message))
    if op == "pong":
        return Pong()
    if not isinstance(op, str):
        raise HubError("bad_message", 'a message needs an "op" string')
    raise HubError("unknown_op", f"unknown op {op[:40]!r} (expected subscribe, unsubscribe or pong)")


# -- the hub's messages ------------------------------------------------------------


def text_frame(message: bytes) -> bytes:
    """One unmasked server TEXT frame: the same bytes for every subscriber."""
    return _accel.encode_frame(_accel.OP_TEXT, message)


def encode_connected(ping_interval: float, client: str | None = None) -> bytes:
    doc: dict = {"op": "connected", "ping_interval": ping_interval}
    if client is not None:
        doc["client"] = client  # the id POST /v1/send addresses the connection by
    return orjson.dumps(doc)


def encode_subscribed(channel: str, position: Position, recovered: bool) -> bytes:
    return orjson.dumps({"op": "subscribed", "channel": channel, "seq": position.seq, "epoch": position.epoch,
                         "recovered": recovered})


def encode_unsubscribed(channel: str) -> bytes:
    return orjson.dumps({"op": "unsubscribed", "channel": channel})


def encode_pub(pub: Publication) -> bytes:
    """The ``pub`` message; ``pub.data`` is spliced in as it is (it is JSON already)."""
    return b"".join((
        b'{"op":"pub","channel":', orjson.dumps(pub.channel), b',"seq":%d,"epoch":' % pub.seq,
        orjson.dumps(pub.epoch), b',"data":', pub.data, b"}",
    ))


def encode_error(error: HubError) -> bytes:
    doc = {"op": "error", "code": error.code, "message": str(error)}
    if error.channel is not None:
        doc["channel"] = error.channel
    return orjson.dumps(doc)


PING = orjson.dumps({"op": "ping"})


# -- Server-Sent Events ------------------------------------------------------------

#: a comment line: keeps NATs and intermediaries from timing the stream out, dispatches nothing
SSE_KEEPALIVE = b":\n\n"
_SSE_NEWLINES = re.compile(rb"\r\n|\r|\n")


def sse_event(event: bytes, data: bytes, event_id: bytes | None = None) -> bytes:
    """One event; a line break inside ``data`` (JSON whitespace) starts another ``data:`` line."""
    if b"\n" in data or b"\r" in data:
        data = _SSE_NEWLINES.sub(b"\ndata: ", data)
    head = b"id: " + event_id + b"\n" if event_id is not None else b""
    return head + b"event: " + event + b"\ndata: " + data + b"\n\n"


def sse_pub_body(pub: Publication) -> bytes:
    """The ``pub`` event without its id line: the part every SSE subscriber shares."""
    return sse_event(b"pub", encode_pub(pub))


def sse_event_id(positions: list[Position]) -> bytes:
    """The ``id`` of an event: ``epoch:seq`` for each channel of the stream, in its order."""
    return b",".join(b"%s:%d" % (p.epoch.encode(), p.seq) for p in positions)


def parse_last_event_id(value: str, channels: int) -> list[Position | None]:
    """A ``Last-Event-ID`` for a stream of ``channels`` channels, back to positions.

    An empty part is a channel without a position (subscribe from now): the hub never
    sends one, but a client that adds a channel to a stream it re-opens needs to say so.

    Raises:
        HubError: ``bad_message`` when it is not ``channels`` comma-separated ``epoch:seq`` (or empty).
    """
    parts = value.split(",")
    if len(parts) != channels:
        raise HubError("bad_message", f"Last-Event-ID {value[:80]!r} has {len(parts)} position(s) for {channels} channel(s)")
    positions: list[Position | None] = []
    for part in parts:
        if not part:
            positions.append(None)
            continue
        epoch, sep, seq = part.rpartition(":")
        if not sep or not epoch or not seq.isdigit() or len(seq) > 19:
            raise HubError("bad_message", f"Last-Event-ID {value[:80]!r}: expected epoch:seq per channel")
        positions.append(Position(int(seq), epoch))
    return positions

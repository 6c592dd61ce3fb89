"""Resumable WebSocket sessions: the wire envelope, tokens, replay buffer and session state machine.

Theory of operation
-------------------
A client that offers the subprotocol ``edgeproxy.resume.v1`` (alone, or as the
wrapper ``edgeproxy.resume.v1+<app subprotocol>``) asks the proxy to keep its
session alive across network blips.  The proxy then stops relaying bytes and
works at the message level (``docs/resume-protocol.md`` is the wire reference):

* every upstream-to-client message gets a sequence number (``D<seq>:`` in front
  of its payload, same opcode) and is kept in a `ReplayBuffer` until the client
  acknowledges it (``C{"t":"ack","seq":N}``);
* every client message carries its own sequence number; the proxy forwards
  each number once, in order, drops numbers it already forwarded (a client
  resending after a resume), and acknowledges what it forwarded;
* the first message of a session is ``C{"t":"session","token":...}``: a
  single-use token, HMAC-signed over the route and the instance (`TokenCodec`).

When the client disappears (TCP close or reset, a close frame other than 1000,
or a missed heartbeat) the session is PARKED: the upstream connection stays
open, its messages keep being numbered and buffered, up to ``buffer_limit``
bytes, for ``window`` seconds.  A reconnect whose subprotocol offer carries
``edgeproxy.resume.v1.r.<token>.<last seq seen>`` is ATTACHED again: the proxy
replays exactly the buffered messages after ``last seq seen``, in order, then
goes live.  Window or buffer exceeded: the upstream gets close 1001 and the
session is forgotten; a later resume attempt gets close `CLOSE_NOT_RESUMABLE`.

The buffer bound is also the flow-control window while a client is attached:
a client behind on its acknowledgements fills it, and then the proxy stops
reading the upstream (``PAUSE_UPSTREAM``) until acks free half of it, so a slow
reader slows the backend down instead of losing the messages a resume would
need.  A session parked with a full buffer keeps its upstream paused.

Most frames take a fast path (`core.envelope`, compiled in ``_speedups``):
whole runs of plain data frames are numbered (into one bytes object per run)
or unwrapped in one call, and the frames to the client are kept exactly as
sent, run by run, so a replay is a join.  Every
other frame goes through `MessageReader` and the rules here, one at a time.

States (all transitions are in `ResumeSession`)::

    ATTACHED  Call: from_client, from_upstream, client_gone, close_both.
              Next: PARKED (client gone), CLOSING (a side closed), CLOSED.
    PARKED    Call: from_upstream, attach, check_timers.
              Next: ATTACHED (attach), CLOSED (window, buffer, upstream closed).
    CLOSING   The close handshake runs; Next: CLOSED (answers or close_timeout).
    CLOSED    Both connections are closed or being closed; nothing more happens.

Like `core.websocket.WebSocketRelay`, a session never reads a clock or draws
randomness: ``now`` and the mask-key source are passed in, and its decisions are
``actions`` for the transport (`transport.resume`) to carry out in order.  The
frames are parsed with the project's codec (`core._accel`: ``parse_header``,
``apply_mask``, ``encode_frame``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import json
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from edgeproxy.core import _accel
from edgeproxy.core.websocket import (
    ABORT_CLIENT,
    ABORT_UPSTREAM,
    CLOSE_CLIENT,
    CLOSE_UPSTREAM,
    PONG_FROM_CLIENT,
    PONG_FROM_UPSTREAM,
    SEND_CLIENT,
    SEND_UPSTREAM,
)
from edgeproxy.errors import EdgeProxyError, RemoteProtocolError

__all__ = [
    "CLOSE_NOT_RESUMABLE",
    "SUBPROTOCOL",
    "NotResumable",
    "Offer",
    "MessageReader",
    "ReplayBuffer",
    "ResumeSession",
    "SessionState",
    "TokenCodec",
    "encode_control",
    "encode_data",
    "parse_offers",
]

SUBPROTOCOL = "edgeproxy.resume.v1"
#: prefix of the offer that carries a resume request: ``edgeproxy.resume.v1.r.<token>.<seq>``
RESUME_OFFER = SUBPROTOCOL + ".r."
#: close code of "this session cannot be resumed: start afresh" (the reason says why)
CLOSE_NOT_RESUMABLE = 4409
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_MESSAGE_TOO_BIG = 1009
#: the proxy acknowledges client messages after this many (and on every tick otherwise)
ACK_EVERY = 16

# Actions beyond those of core.websocket, carried out by the transport.
#: the client is gone: stop its heartbeat, keep the upstream (data: None)
PARKED = "parked"
#: the session is over: forget it (data: None)
ENDED = "ended"
#: the client is behind on acknowledgements and the replay buffer is full: stop reading the upstream
PAUSE_UPSTREAM = "pause_upstream"
#: acknowledgements made room again: read the upstream
RESUME_UPSTREAM = "resume_upstream"


class NotResumable(EdgeProxyError):
    """A resume attempt that must be refused; the client gets `CLOSE_NOT_RESUMABLE` with `reason`."""

    close_code = CLOSE_NOT_RESUMABLE

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- #
# Negotiation: the subprotocol offers
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class Offer:
    """What a client's ``Sec-WebSocket-Protocol`` offers asked for.

    ``wrapped`` maps each wrapper the client offered to the app subprotocol inside
    it (None for the bare ``edgeproxy.resume.v1``), in the client's order;
    ``forward`` is what the backend is offered instead (the app subprotocols);
    ``token``/``last_seq`` are set for a resume attempt.
    """

    wrapped: tuple[tuple[str, str | None], ...]
    forward: tuple[str, ...]
    token: str | None = None
    last_seq: int = 0

    def wrapper_for(self, chosen: str | None) -> str | None:
        """The wrapper to answer the client with when the backend chose `chosen` (None: none fits)."""
        for wrapper, app in self.wrapped:
            if app == chosen:
                return wrapper
        return None


def parse_offers(values: list[bytes]) -> Offer | None:
    """Read the ``Sec-WebSocket-Protocol`` header values; None when no resume wrapper is offered.

    Raises:
        RemoteProtocolError: a malformed resume offer (status 400).
    """
    items = [item.strip().decode("latin-1") for value in values for item in value.split(b",")]
    wrapped: list[tuple[str, str | None]] = []
    forward: list[str] = []
    token = None
    last_seq = 0
    for item in items:
        if not item:
            continue
        if item.startswith(RESUME_OFFER):
            token, sep, seq_text = item[len(RESUME_OFFER):].rpartition(".")
            if not sep or not token or not seq_text.isdigit() or len(seq_text) > 19:
                raise RemoteProtocolError(f"malformed resume offer {item[:60]!r}")
            last_seq = int(seq_text)
        elif item == SUBPROTOCOL:
            wrapped.append((item, None))
        elif item.startswith(SUBPROTOCOL + "+") and len(item) > len(SUBPROTOCOL) + 1:
            app = item[len(SUBPROTOCOL) + 1:]
            wrapped.append((item, app))
            forward.append(app)
        else:
            forward.append(item)
    if not wrapped:
        if token is not None:
            raise RemoteProtocolError("a resume offer needs an edgeproxy.resume.v1 wrapper offer beside it")
        return None
    return Offer(tuple(wrapped), tuple(dict.fromkeys(forward)), token, last_seq)


# --------------------------------------------------------------------------- #
# Tokens
# --------------------------------------------------------------------------- #

_TOKEN_VERSION = 1
_MAC_BYTES = 16
_TOKEN_HEAD = struct.Struct("!BI16sB")  # version, generation, session id, instance id length


class TokenCodec:
    """Single-use resume tokens, HMAC-SHA256 signed, bound to a route and an instance.

    A token is base64url (no padding) of ``version | generation | session id |
    len(instance) | instance | mac``, with ``mac`` the first 16 bytes of
    HMAC-SHA256(secret, "edgeproxy.resume.v1" | route key | the bytes before
    it).  The instance id is readable so another instance can refuse at once;
    the generation makes a token single-use (each attach issues the next one).
    """

    def __init__(self, secret: bytes, instance_id: str):
        if not secret:
            raise ValueError("a resume secret is required")
        self._secret = secret
        self.instance_id = instance_id
        self._instance = instance_id.encode("utf-8")
        if len(self._instance) > 255:
            raise ValueError("instance_id is longer than 255 bytes")

    def _mac(self, route_key: str, body: bytes) -> bytes:
        msg = SUBPROTOCOL.encode() + b"\x00" + route_key.encode("utf-8") + b"\x00" + body
        return hmac.new(self._secret, msg, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, session_id: bytes, generation: int, route_key: str) -> str:
        body = _TOKEN_HEAD.pack(_TOKEN_VERSION, generation, session_id, len(self._instance)) + self._instance
        return base64.urlsafe_b64encode(body + self._mac(route_key, body)).rstrip(b"=").decode("ascii")

    @staticmethod
    def instance_of(token: str) -> str | None:
        """The instance a token names, read without checking its signature (None: malformed).

        Only for routing the attempt to that instance; `verify` there decides.
        """
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) < _TOKEN_HEAD.size + _MAC_BYTES:
            return None
        n = raw[_TOKEN_HEAD.size - 1]
        if len(raw) != _TOKEN_HEAD.size + n + _MAC_BYTES:
            return None
        return raw[_TOKEN_HEAD.size:_TOKEN_HEAD.size + n].decode("utf-8", "replace")

    def verify(self, token: str, route_key: str) -> tuple[bytes, int]:
        """Return ``(session id, generation)`` of a token this instance issued for this route.

        Raises:
            NotResumable: malformed, signed for another instance, or forged (bad signature).
        """
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise NotResumable("malformed token") from None
        if len(raw) < _TOKEN_HEAD.size + _MAC_BYTES:
            raise NotResumable("malformed token")
        version, generation, session_id, n = _TOKEN_HEAD.unpack_from(raw)
        if version != _TOKEN_VERSION or len(raw) != _TOKEN_HEAD.size + n + _MAC_BYTES:
            raise NotResumable("malformed token")
        instance = raw[_TOKEN_HEAD.size:_TOKEN_HEAD.size + n]
        if instance != self._instance:
            raise NotResumable(f"session belongs to instance {instance.decode('utf-8', 'replace')!r}")
        body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(route_key, body)):
            raise NotResumable("invalid token")
        return session_id, generation


# --------------------------------------------------------------------------- #
# The envelope
# --------------------------------------------------------------------------- #


def encode_data(opcode: int, seq: int, payload: bytes, mask_key: bytes | None = None) -> bytes:
    """A whole data frame carrying message `seq` (``D<seq>:`` + payload) with the app's opcode."""
    return _accel.encode_frame(opcode, b"D%d:" % seq + payload, mask_key=mask_key)


def encode_control(fields: dict, mask_key: bytes | None = None) -> bytes:
    """A whole text frame carrying a control message (``C`` + compact JSON)."""
    body = b"C" + json.dumps(fields, separators=(",", ":")).encode("utf-8")
    return _accel.encode_frame(_accel.OP_TEXT, body, mask_key=mask_key)


def _split_data(payload: bytes) -> tuple[int, bytes]:
    """``(seq, app payload)`` of a ``D<seq>:`` message; RemoteProtocolError if malformed."""
    colon = payload.find(b":", 1, 22)
    digits = payload[1:colon]
    if colon < 0 or not digits.isdigit():
        raise RemoteProtocolError("malformed data envelope (expected D<seq>:)", close_code=CLOSE_PROTOCOL_ERROR)
    return int(digits), payload[colon + 1:]


# --------------------------------------------------------------------------- #
# Messages from frames
# --------------------------------------------------------------------------- #


class MessageReader:
    """Whole messages out of one direction's frame stream (reassembled, unmasked).

    `feed(data)` returns a list of ``(opcode, payload)``: data messages (opcode
    1 or 2, fragments joined) and control frames (8, 9, 10) as they come.

    Raises:
        RemoteProtocolError: with ``close_code`` 1002 (bad framing, wrong masking)
            or 1009 (a message over ``max_message_size``).
    """

    __slots__ = ("masked", "max_message_size", "_buf", "_opcode", "_parts", "_size")

    def __init__(self, *, masked: bool, max_message_size: int = 0):
        self.masked = masked
        self.max_message_size = max_message_size
        self._buf = bytearray()
        self._opcode = 0  # of the fragmented message in progress (0: none)
        self._parts: list[bytes] = []
        self._size = 0

    @property
    def buffered(self) -> int:
        """Bytes held: an incomplete frame plus the fragments of an unfinished message."""
        return len(self._buf) + self._size

    @property
    def between_messages(self) -> bool:
        """No fragmented message is in progress: the fast path may take the next frames."""
        return not self._opcode

    def complete(self, data: bytes) -> tuple[bytearray | None, int]:
        """The incomplete frame held, completed from the start of `data`: ``(frame, bytes of data used)``.

        ``(None, 0)`` when `data` does not complete it (then `feed` it as usual,
        which also applies the size limits).  Only the frame is copied, not all
        of `data`.
        """
        buf = self._buf
        probe = bytes(buf[:14]) if len(buf) >= 14 else bytes(buf) + bytes(data[:14 - len(buf)])
        header = _accel.parse_header(probe)
        if header is None:
            return None, 0
        need = header[5] + header[4] - len(buf)
        if need > len(data):
            return None, 0
        buf += memoryview(data)[:need]
        self._buf = bytearray()  # the caller gets this one
        return buf, need

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        if buf:
            buf += data
            view = buf
        else:
            view = data
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(view)
        while True:
            header = _accel.parse_header(view, pos)
            if header is None:
                break
            fin, rsv, opcode, key, length, hl = header
            if (key is not None) != self.masked:
                raise RemoteProtocolError("frame masking is wrong for its direction", close_code=CLOSE_PROTOCOL_ERROR)
            if rsv:
                raise RemoteProtocolError("RSV bits set without a negotiated extension", close_code=CLOSE_PROTOCOL_ERROR)
            limit = self.max_message_size
            if opcode < 8 and limit and self._size + length > limit:
                raise RemoteProtocolError("message too big", close_code=CLOSE_MESSAGE_TOO_BIG)
            if opcode >= 8 and (length > 125 or not fin):
                raise RemoteProtocolError("bad control frame", close_code=CLOSE_PROTOCOL_ERROR)
            if end - pos < hl + length:
                break
            start = pos + hl
            payload = bytes(view[start:start + length])
            pos = start + length
            if key is not None and payload:
                payload = _accel.apply_mask(payload, key)
            if opcode >= 8:
                if opcode > 10:
                    raise RemoteProtocolError(f"reserved opcode {opcode}", close_code=CLOSE_PROTOCOL_ERROR)
                out.append((opcode, payload))
                if opcode == 8:
                    break  # nothing may follow a close frame
                continue
            if opcode == 0:
                if not self._opcode:
                    raise RemoteProtocolError("continuation frame without a message", close_code=CLOSE_PROTOCOL_ERROR)
            elif opcode in (1, 2):
                if self._opcode:
                    raise RemoteProtocolError("new message inside a fragmented one", close_code=CLOSE_PROTOCOL_ERROR)
                if fin:
                    out.append((opcode, payload))
                    continue
                self._opcode = opcode
            else:
                raise RemoteProtocolError(f"reserved opcode {opcode}", close_code=CLOSE_PROTOCOL_ERROR)
            self._parts.append(payload)
            self._size += length
            if fin:
                out.append((self._opcode, b"".join(self._parts)))
                self._opcode = 0
                self._parts = []
                self._size = 0
        if pos == end:
            buf.clear()
        elif view is buf:
            del buf[:pos]
        else:
            buf += memoryview(view)[pos:]
        return out


# --------------------------------------------------------------------------- #
# The replay buffer
# --------------------------------------------------------------------------- #


class ReplayBuffer:
    """The ``D<seq>:`` frames sent to the client and not yet acknowledged, oldest first.

    Frames are kept exactly as they were sent, in the runs they were sent in
    (`core.envelope.number_frames` encodes a whole read's messages into one
    bytes object), so a replay is a join and keeping a message costs no object
    of its own.  ``size`` counts the bytes of the frames not acknowledged
    (against ``limit``); a run's memory is freed when its last message is
    acknowledged, so ``held`` (the memory) can pass ``size`` by at most the
    acknowledged part of one run.  `extend` returns False once the bound is
    passed (the session then pauses the upstream while a client is attached,
    or gives up while parked).
    """

    __slots__ = ("limit", "size", "_runs", "acked", "last", "_head_acked")

    def __init__(self, limit: int):
        self.limit = limit
        self.size = 0
        #: (first seq, frames back to back, little-endian u64 end offsets)
        self._runs: deque[tuple[int, bytes, bytes]] = deque()
        #: every message up to this seq is acknowledged
        self.acked = 0
        #: the seq of the last message kept
        self.last = 0
        #: bytes at the start of the oldest run that are acknowledged (no longer in `size`)
        self._head_acked = 0

    def __len__(self) -> int:
        """Messages sent and not acknowledged."""
        return self.last - self.acked if self._runs else 0

    def extend(self, run: bytes, ends: bytes) -> bool:
        """Keep the frames of the next ``len(ends) // 8`` messages; False when the bound is passed."""
        self._runs.append((self.last + 1, run, ends))
        self.last += len(ends) >> 3
        self.size += len(run)
        return self.size <= self.limit

    @property
    def held(self) -> int:
        """Bytes of memory the runs take."""
        return self.size + self._head_acked

    def ack(self, seq: int) -> None:
        """The client has every message up to `seq`: free the runs it completes, and count the rest out of `size`."""
        if seq <= self.acked:
            return
        self.acked = seq
        runs = self._runs
        while runs:
            first, run, ends = runs[0]
            if first + (len(ends) >> 3) - 1 <= seq:
                runs.popleft()
                self.size -= len(run) - self._head_acked
                self._head_acked = 0
                continue
            if seq >= first:
                (end,) = _END.unpack_from(ends, 8 * (seq - first))
                self.size -= end - self._head_acked
                self._head_acked = end
            return

    def replay_from(self, last_seen: int) -> list[bytes] | None:
        """The frames of the messages after `last_seen`, in order; None when some of them are gone."""
        if last_seen < self.acked:
            return None
        out = []
        for first, run, ends in self._runs:
            if first > last_seen:
                out.append(run)
            elif first + (len(ends) >> 3) - 1 > last_seen:
                (offset,) = _END.unpack_from(ends, 8 * (last_seen - first))
                out.append(run[offset:])
        return out

    def clear(self) -> None:
        self._runs.clear()
        self.size = 0
        self._head_acked = 0


_END = struct.Struct("<Q")


# --------------------------------------------------------------------------- #
# The session
# --------------------------------------------------------------------------- #


class SessionState(Enum):
    #: A client is connected.  Next: PARKED, CLOSING or CLOSED.
    ATTACHED = "attached"
    #: No client; the upstream stays open and is buffered.  Next: ATTACHED or CLOSED.
    PARKED = "parked"
    #: A close handshake runs.  Next: CLOSED.
    CLOSING = "closing"
    #: Both connections are closed or closing.
    CLOSED = "closed"


class ResumeSession:
    """One resumable session: an upstream connection and, while attached, one client.

    Call `from_client(data)` / `from_upstream(data)` with what each side sent,
    `client_gone(now)` when the client's connection ends without a close 1000,
    `attach(last_seen, now)` for a resuming client, and `check_timers(now)` on
    every tick; then carry out `actions` in order and clear it.  The data of a
    ``SEND_CLIENT`` or ``SEND_UPSTREAM`` action is bytes or, for a run of
    frames, a list of them (to write without joining them first).

    Args:
        session_id: 16 random bytes (the transport draws them).
        route_key: what the token is bound to (`route_key`).
        codec: signs the tokens.
        window: seconds a parked session waits for its client.
        buffer_limit: bytes of unacknowledged upstream messages kept.  While a
            client is attached, reading the upstream pauses at the limit until
            acknowledgements make room (nothing is dropped); while parked, passing
            it ends the session.
        idle_timeout: an attached session with no traffic either way for this
            long is closed 1001 on both sides, as a plain WebSocket is (0: never).
        mask_key_source: 4 random bytes per frame sent upstream.
    """

    # Slots: tens of thousands of sessions may be parked at once, and an instance
    # dict this wide would cost more than the session's own state.
    __slots__ = (
        "session_id", "route_key", "codec", "window", "close_timeout", "idle_timeout", "active", "_last_active",
        "upstream_paused", "_mask_key", "max_message_size", "state", "actions", "buffer", "generation", "out_seq",
        "in_seq", "_in_acked", "client_reader", "upstream_reader", "parked_until", "_close_deadline", "end_reason",
        "messages_from_client", "messages_from_upstream", "bytes_from_client", "bytes_from_upstream", "resumes",
        "_client_open", "_upstream_open", "_client_close_after",
    )

    def __init__(
        self,
        *,
        session_id: bytes,
        route_key: str,
        codec: TokenCodec,
        window: float,
        buffer_limit: int,
        max_message_size: int = 0,
        close_timeout: float = 5.0,
        idle_timeout: float = 0.0,
        mask_key_source: Callable[[], bytes],
        now: float,
    ):
        self.session_id = session_id
        self.route_key = route_key
        self.codec = codec
        self.window = window
        self.close_timeout = close_timeout
        self.idle_timeout = idle_timeout
        #: set by every read; the tick turns it into `_last_active`
        self.active = False
        self._last_active = now
        #: reading the upstream is paused because the client is behind on acks
        self.upstream_paused = False
        self._mask_key = mask_key_source
        self.max_message_size = max_message_size
        self.state = SessionState.ATTACHED
        self.actions: list[tuple[str, bytes | None]] = []
        self.buffer = ReplayBuffer(buffer_limit)
        self.generation = 0
        #: seq of the last upstream message numbered (sent or buffered)
        self.out_seq = 0
        #: seq of the last client message forwarded upstream, and the last acknowledged
        self.in_seq = 0
        self._in_acked = 0
        self.client_reader = MessageReader(masked=True, max_message_size=max_message_size)
        self.upstream_reader = MessageReader(masked=False, max_message_size=max_message_size)
        #: when a parked session gives up (0 while attached)
        self.parked_until = 0.0
        self._close_deadline = 0.0
        #: why the session ended, for logs and tests
        self.end_reason = ""
        self.messages_from_client = 0
        self.messages_from_upstream = 0
        self.bytes_from_client = 0
        self.bytes_from_upstream = 0
        self.resumes = 0
        self._client_open = True
        self._upstream_open = True
        #: (code, reason) of a proxy-initiated close the client gets once the
        #: upstream has answered (what it sent before its close still reaches the client)
        self._client_close_after: tuple[int, str] | None = None

    # -- tokens ------------------------------------------------------------------

    def _next_token(self) -> str:
        self.generation += 1
        return self.codec.issue(self.session_id, self.generation, self.route_key)

    def open(self) -> None:
        """A new session: tell the client its token."""
        self.actions.append((SEND_CLIENT, encode_control({"t": "session", "token": self._next_token(), "resumed": False, "ack": 0})))

    # -- client side ---------------------------------------------------------------

    def from_client(self, data: bytes, now: float) -> None:
        if self.state is not SessionState.ATTACHED and self.state is not SessionState.CLOSING:
            return
        self.bytes_from_client += len(data)
        self.active = True
        try:
            if self.state is SessionState.CLOSING:
                self._client_messages(self.client_reader.feed(data), now)
            else:
                self._read(self.client_reader, data, self._unwrap_run, self._client_messages, now)
        except RemoteProtocolError as exc:
            self._fail(exc.close_code, str(exc), client=True)
            return
        if self.state is SessionState.ATTACHED and self.in_seq - self._in_acked >= ACK_EVERY:
            self._send_ack()

    def _read(self, reader: MessageReader, data: bytes, fast: Callable, slow: Callable, now: float) -> None:
        """Feed one read to a direction: runs of plain frames by `fast`, every other frame by `reader` and `slow`.

        `fast(view, pos)` takes what it can and returns where it stopped (the
        end of `view` once the session has ended); the frame there goes through
        the reader alone (so every rule applies), then the fast path goes on.
        `slow(messages, now)` returns False when the session stopped reading
        this direction (a close, a park, an end).
        """
        if not reader.between_messages:
            slow(reader.feed(data), now)
            return
        pos = 0
        if reader.buffered:  # finish the frame a previous read began, without copying this whole read
            frame, pos = reader.complete(data)
            if frame is None:
                slow(reader.feed(data), now)
                return
            if not self._run(reader, frame, 0, fast, slow, now) or pos == len(data):
                return
            if not reader.between_messages:  # that frame began a fragmented message: the reader takes the rest
                slow(reader.feed(memoryview(data)[pos:]), now)
                return
        self._run(reader, data, pos, fast, slow, now)

    def _run(self, reader: MessageReader, view, pos: int, fast: Callable, slow: Callable, now: float) -> bool:
        """`_read` from `pos` of a view that starts on a frame boundary; False when reading stopped."""
        end = len(view)
        while True:
            pos = fast(view, pos)
            if pos == end:
                return True
            header = _accel.parse_header(view, pos)
            if header is None or end - pos < header[5] + header[4]:
                # an incomplete frame: kept (or refused) by the reader
                return slow(reader.feed(memoryview(view)[pos:]), now)
            nxt = pos + header[5] + header[4]
            if not slow(reader.feed(view[pos:nxt]), now):
                return False
            pos = nxt
            if not reader.between_messages:  # a fragmented message began: the reader takes the rest
                return slow(reader.feed(memoryview(view)[pos:]), now)

    def _unwrap_run(self, view, pos: int) -> int:
        pos, in_seq, frames, _, ack = _accel.unwrap_frames(view, pos, self.in_seq, self.max_message_size,
                                                           self._mask_key, self.out_seq)
        if frames:
            self.in_seq = in_seq
            self.messages_from_client += len(frames)
            self.actions.append((SEND_UPSTREAM, frames[0] if len(frames) == 1 else frames))
        if ack >= 0:
            self._acked(ack)
        return pos

    def _acked(self, seq: int) -> None:
        """The client has every message up to `seq`: free them, and read the upstream again if that made room."""
        self.buffer.ack(seq)
        if self.upstream_paused and self.buffer.size <= self.buffer.limit // 2:
            self.upstream_paused = False
            self.actions.append((RESUME_UPSTREAM, None))

    def _client_messages(self, messages: list[tuple[int, bytes]], now: float) -> bool:
        for opcode, payload in messages:
            if opcode == _accel.OP_PING:
                self.actions.append((SEND_CLIENT, _accel.encode_frame(_accel.OP_PONG, payload)))
            elif opcode == _accel.OP_PONG:
                self.actions.append((PONG_FROM_CLIENT, payload))
            elif opcode == _accel.OP_CLOSE:
                self._client_close(payload, now)
                return False
            elif self.state is SessionState.ATTACHED:
                self._client_message(opcode, payload)
        return True

    def _client_message(self, opcode: int, payload: bytes) -> None:
        kind = payload[:1]
        if kind == b"D":
            seq, body = _split_data(payload)
            if seq <= self.in_seq:
                return  # already forwarded before a resume: a duplicate
            if seq != self.in_seq + 1:
                raise RemoteProtocolError(f"client message {seq} after {self.in_seq}: a gap", close_code=CLOSE_PROTOCOL_ERROR)
            self.in_seq = seq
            self.messages_from_client += 1
            self.actions.append((SEND_UPSTREAM, _accel.encode_frame(opcode, body, mask_key=self._mask_key())))
        elif kind == b"C" and opcode == _accel.OP_TEXT:
            try:
                fields = json.loads(payload[1:])
            except ValueError:
                raise RemoteProtocolError("malformed control envelope", close_code=CLOSE_PROTOCOL_ERROR) from None
            if not isinstance(fields, dict):
                raise RemoteProtocolError("malformed control envelope", close_code=CLOSE_PROTOCOL_ERROR)
            kind = fields.get("t")
            if kind == "ack":
                seq = fields.get("seq")
                if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or seq > self.out_seq:
                    raise RemoteProtocolError("ack of a message never sent", close_code=CLOSE_PROTOCOL_ERROR)
                self._acked(seq)
            elif kind == "ping":
                self.actions.append((SEND_CLIENT, encode_control({"t": "pong", "id": fields.get("id")})))
            # other types are ignored: room for later versions
        else:
            raise RemoteProtocolError("message without an envelope", close_code=CLOSE_PROTOCOL_ERROR)

    def _send_ack(self) -> None:
        self._in_acked = self.in_seq
        self.actions.append((SEND_CLIENT, encode_control({"t": "ack", "seq": self.in_seq})))

    def _client_close(self, payload: bytes, now: float) -> None:
        code, reason = _accel.parse_close_payload(payload)
        if self.state is SessionState.CLOSING:
            if self._client_close_after is not None:  # it closed first: answer it
                self._client_close_after = None
                self.actions.append((SEND_CLIENT, _accel.encode_frame(_accel.OP_CLOSE, payload)))
            self._client_open = False
            self.actions.append((CLOSE_CLIENT, None))
            self._maybe_closed()
            return
        if code == CLOSE_NORMAL:
            # The application ends the session: the close goes on to the upstream.
            self.actions.append((SEND_CLIENT, _accel.encode_frame(_accel.OP_CLOSE, payload)))
            self.actions.append((CLOSE_CLIENT, None))
            self._start_closing(CLOSE_NORMAL, reason)
            self._client_open = False
            self.actions.append((SEND_UPSTREAM, self._upstream_close(CLOSE_NORMAL, reason)))
            return
        # Any other close (a page unloading, 1001): the client may come back.
        self.actions.append((SEND_CLIENT, _accel.encode_frame(_accel.OP_CLOSE, payload)))
        self.actions.append((CLOSE_CLIENT, None))
        self._park(now)

    def client_gone(self, now: float) -> None:
        """The client's connection ended (EOF, reset, missed heartbeat) without a close 1000."""
        if self.state is SessionState.ATTACHED:
            self.actions.append((ABORT_CLIENT, None))
            self._park(now)
        elif self.state is SessionState.CLOSING:
            self._client_open = False
            self._client_close_after = None
            self._maybe_closed()

    def _park(self, now: float) -> None:
        self.state = SessionState.PARKED
        self.parked_until = now + self.window
        self.client_reader = MessageReader(masked=True, max_message_size=self.max_message_size)
        self.actions.append((PARKED, None))
        # A full buffer (the upstream paused while the client was behind) stays as it is: the
        # upstream stays paused, and the client can still resume with all of it.

    def attach(self, last_seen: int, now: float) -> None:
        """A client resumes after `last_seen`: replay what it missed, then go live.

        A session still attached (its old connection not yet known dead) must be
        parked first with `client_gone`: the token proves the newcomer is the client.

        Raises:
            NotResumable: the session is not parked, or the messages after
                `last_seen` are no longer all buffered (the session then ends).
        """
        if self.state is not SessionState.PARKED:
            raise NotResumable("session closed")
        if last_seen > self.out_seq:
            raise NotResumable("last seen seq was never sent")
        missed = self.buffer.replay_from(last_seen)
        if missed is None:
            self._give_up("missed messages are no longer buffered")
            raise NotResumable("missed messages are no longer buffered")
        self.state = SessionState.ATTACHED
        self._acked(last_seen)  # may read the upstream again: a full buffer the client had seen is room now
        self.parked_until = 0.0
        self.resumes += 1
        self._in_acked = self.in_seq
        self._last_active = now
        hello = encode_control({"t": "session", "token": self._next_token(), "resumed": True, "ack": self.in_seq,
                                "replayed": self.out_seq - last_seen})
        self.actions.append((SEND_CLIENT, b"".join([hello, *missed])))

    # -- upstream side ---------------------------------------------------------------

    def from_upstream(self, data: bytes) -> None:
        if self.state is SessionState.CLOSED:
            return
        self.bytes_from_upstream += len(data)
        self.active = True
        try:
            if self.state is SessionState.CLOSING:
                self._upstream_messages(self.upstream_reader.feed(data), 0.0)
            else:
                self._read(self.upstream_reader, data, self._number_run, self._upstream_messages, 0.0)
        except RemoteProtocolError as exc:
            self._fail(exc.close_code, str(exc), client=False)

    def _number_run(self, view, pos: int) -> int:
        if self.state is SessionState.CLOSED:  # ended by an earlier frame of this read (a parked overflow)
            return len(view)
        pos, seq, run, ends = _accel.number_frames(view, pos, self.out_seq, self.max_message_size)
        if run:
            self._numbered(seq, run, ends)
            if self.state is SessionState.CLOSED:
                return len(view)
        return pos

    def _upstream_messages(self, messages: list[tuple[int, bytes]], now: float) -> bool:
        for opcode, payload in messages:
            if opcode == _accel.OP_PING:
                self.actions.append((SEND_UPSTREAM, _accel.encode_frame(_accel.OP_PONG, payload, mask_key=self._mask_key())))
            elif opcode == _accel.OP_PONG:
                self.actions.append((PONG_FROM_UPSTREAM, payload))
            elif opcode == _accel.OP_CLOSE:
                self._upstream_close_received(payload)
                return False
            elif self.state is not SessionState.CLOSING or self._client_close_after is not None:
                frame = encode_data(opcode, self.out_seq + 1, payload)
                self._numbered(self.out_seq + 1, frame, _END.pack(len(frame)))
                if self.state is SessionState.CLOSED:
                    return False
        return True

    def _numbered(self, seq: int, run: bytes, ends: bytes) -> None:
        """Upstream messages up to `seq`, framed for the client: send them (attached) and keep them for a replay."""
        self.messages_from_upstream += seq - self.out_seq
        self.out_seq = seq
        within = self.buffer.extend(run, ends)
        if self.state is SessionState.ATTACHED or self._client_close_after is not None:
            self.actions.append((SEND_CLIENT, run))
            if not within and not self.upstream_paused:
                self.upstream_paused = True
                self.actions.append((PAUSE_UPSTREAM, None))
        elif not within:
            self._give_up("buffer overflow")

    def _upstream_close_received(self, payload: bytes) -> None:
        code, reason = _accel.parse_close_payload(payload)
        if self.state is SessionState.CLOSING:
            self._upstream_open = False
            self.actions.append((CLOSE_UPSTREAM, None))
            self._send_pending_client_close()
            self._maybe_closed()
            return
        # The backend ends the session: answer it, and tell the client if there is one.
        self.actions.append((SEND_UPSTREAM, _accel.encode_frame(_accel.OP_CLOSE, payload, mask_key=self._mask_key())))
        self.actions.append((CLOSE_UPSTREAM, None))
        self._upstream_open = False
        if self.state is SessionState.ATTACHED:
            self._start_closing(code or CLOSE_NORMAL, reason)
            self.actions.append((SEND_CLIENT, self._client_close_frame(code, reason)))
        else:
            self._end("upstream closed while parked")

    def upstream_gone(self) -> None:
        """The upstream's TCP connection ended: the client (if any) gets 1014; no resume."""
        if self.state is SessionState.CLOSED:
            return
        self._upstream_open = False
        if self.state is SessionState.ATTACHED:
            self.actions.append((SEND_CLIENT, self._client_close_frame(1014, "upstream went away")))
            self.actions.append((CLOSE_CLIENT, None))
            self._end("upstream went away")
        elif self.state is SessionState.CLOSING:
            self._send_pending_client_close()
            self._maybe_closed()
        else:
            self._end("upstream went away while parked")

    # -- ending -------------------------------------------------------------------------

    def _client_close_frame(self, code: int | None, reason: str) -> bytes:
        return _accel.encode_frame(_accel.OP_CLOSE, _accel.encode_close_payload(code, reason))

    def _upstream_close(self, code: int, reason: str) -> bytes:
        return _accel.encode_frame(_accel.OP_CLOSE, _accel.encode_close_payload(code, reason), mask_key=self._mask_key())

    def _send_pending_client_close(self) -> None:
        if self._client_close_after is not None and self._client_open:
            code, reason = self._client_close_after
            self.actions.append((SEND_CLIENT, self._client_close_frame(code, reason)))
        self._client_close_after = None

    def _start_closing(self, code: int, reason: str) -> None:
        self.state = SessionState.CLOSING
        self._close_deadline = -1.0
        self.end_reason = f"closed {code} {reason}".strip()

    def _maybe_closed(self) -> None:
        if not self._client_open and not self._upstream_open:
            self._end(self.end_reason or "closed")

    def _give_up(self, reason: str) -> None:
        """A parked session cannot go on: a normal close to the upstream, then forget it."""
        self.actions.append((SEND_UPSTREAM, self._upstream_close(CLOSE_GOING_AWAY, f"client did not resume ({reason})")))
        self.actions.append((CLOSE_UPSTREAM, None))
        self._upstream_open = False
        self._end(reason)

    def _end(self, reason: str) -> None:
        self.state = SessionState.CLOSED
        self.end_reason = self.end_reason or reason
        self.buffer.clear()
        self.actions.append((ENDED, None))

    def _fail(self, code: int, reason: str, *, client: bool) -> None:
        """A side broke the protocol: it gets `code`, the other side a normal close."""
        reason = reason[:100]
        if client:
            self.actions.append((SEND_CLIENT, self._client_close_frame(code, reason)))
            self.actions.append((SEND_UPSTREAM, self._upstream_close(CLOSE_GOING_AWAY, "client broke the protocol")))
        else:
            self.actions.append((SEND_UPSTREAM, self._upstream_close(code, reason)))
            if self.state is SessionState.ATTACHED:
                self.actions.append((SEND_CLIENT, self._client_close_frame(1014, "upstream broke the protocol")))
        self.actions.append((CLOSE_CLIENT, None))
        self.actions.append((CLOSE_UPSTREAM, None))
        self._client_open = self._upstream_open = False
        self.end_reason = reason
        self._end(reason)

    def close_both(self, code: int, reason: str) -> None:
        """The proxy ends the session itself (drain, rebalance, age).

        The upstream is closed first, and the client only once the upstream has
        answered: the messages the upstream sent before its close frame are on
        their way, and closing the client at the same moment would drop them
        (nothing resumes a closed session).  Client messages that arrive
        meanwhile are not forwarded (the upstream is closing); they were never
        acknowledged, which the client sees.  ``close_timeout`` bounds the wait.
        """
        if self.state is SessionState.CLOSED or self.state is SessionState.CLOSING:
            return
        if self.state is SessionState.PARKED:
            self._give_up(reason)
            return
        self._start_closing(code, reason)
        self._client_close_after = (code, reason)
        self.actions.append((SEND_UPSTREAM, self._upstream_close(code, reason)))

    def abandon(self, reason: str) -> None:
        """No time left (the proxy stops): close both connections after what is written, and end."""
        if self.state is SessionState.CLOSED:
            return
        self.actions.append((CLOSE_CLIENT, None))
        self.actions.append((CLOSE_UPSTREAM, None))
        self._client_open = self._upstream_open = False
        self._end(reason)

    def check_timers(self, now: float) -> None:
        """Once per tick: the parked window, the idle timeout, the close timeout, and a pending ack."""
        state = self.state
        if state is SessionState.PARKED:
            if now >= self.parked_until:
                self._give_up("resume window expired")
        elif state is SessionState.ATTACHED:
            if self.in_seq != self._in_acked:
                self._send_ack()
            if self.active:
                self.active = False
                self._last_active = now
            elif self.idle_timeout and now - self._last_active >= self.idle_timeout:
                self.close_both(CLOSE_GOING_AWAY, "idle timeout")
        elif state is SessionState.CLOSING:
            if self._close_deadline < 0:
                self._close_deadline = now + self.close_timeout
            elif now >= self._close_deadline:
                if self._client_close_after is not None and self._client_open:
                    # the upstream never answered: the client still gets its close, after what it has
                    self._send_pending_client_close()
                    self.actions.append((CLOSE_CLIENT, None))
                else:
                    self.actions.append((ABORT_CLIENT, None))
                self.actions.append((ABORT_UPSTREAM, None))
                self._client_open = self._upstream_open = False
                self._end(self.end_reason or "close timeout")

    @property
    def held_bytes(self) -> int:
        """Memory this session holds for messages: replay buffer plus partial frames."""
        return self.buffer.held + self.client_reader.buffered + self.upstream_reader.buffered


def route_key(host: str | None, path_prefix: str, upstream: str) -> str:
    """What a token is bound to: the route's host, prefix and upstream."""
    return f"{host or '*'}\x00{path_prefix}\x00{upstream}"

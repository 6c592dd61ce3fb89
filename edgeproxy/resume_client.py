"""An asyncio client for edgeproxy's resumable sessions (``edgeproxy.resume.v1``).

Theory of operation
-------------------
`ResumableWebSocket` looks like one WebSocket that survives network blips.  It
offers ``edgeproxy.resume.v1`` (or ``edgeproxy.resume.v1+<subprotocol>``); the
proxy answers with the wrapper and a first control message carrying a resume
token.  Every message the client sends is numbered and kept until the proxy
acknowledges it; every message it receives is numbered by the proxy, delivered
once and in order (`reconnect.SeqDedupe`), and acknowledged.

A connection is declared dead when it ends, or when nothing arrives within
``ping_timeout`` after an application-level ping (sent every ``ping_interval``
inside the envelope, so a half-open path is noticed even when the OS is not
told).  The client then waits (`reconnect.Backoff`, full jitter) and reconnects
with ``edgeproxy.resume.v1.r.<token>.<last seq received>``.  The proxy replays
what was missed and says which client messages it already forwarded; the client
resends the rest.  Close 4409 means the session is gone: the client starts a new
one and reports ``reset`` (the application should reload its state).

Messages sent wait in a resend buffer until the proxy acknowledges them;
``max_unacked_bytes`` bounds it, and `send` waits for room (as a socket's
drain does) rather than letting a client cut off for long grow without end.

Events (`events`, an asyncio.Queue of ``(name, detail)``): ``("open", None)``,
``("reconnecting", attempt)``, ``("resumed", replayed_count)``,
``("reset", reason)``, ``("closed", (code, reason))``.

Only the standard library and wsproto (a dependency of edgeproxy) are used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from urllib.parse import urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from edgeproxy.reconnect import Backoff, SeqDedupe, SeqGap

__all__ = ["ResumableWebSocket", "SUBPROTOCOL", "CLOSE_NOT_RESUMABLE"]

SUBPROTOCOL = "edgeproxy.resume.v1"
CLOSE_NOT_RESUMABLE = 4409
log = logging.getLogger("edgeproxy.resume_client")


class _Dead(Exception):
    """The current connection is unusable."""


class _Link:
    """One TCP connection with a wsproto client on it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ws: WSConnection):
        self.reader = reader
        self.writer = writer
        self.ws = ws
        self.subprotocol: str | None = None
        self.parts: list[str | bytes] = []
        self.early: list = []

    def send(self, event) -> None:
        self.writer.write(self.ws.send(event))

    def abort(self) -> None:
        transport = self.writer.transport
        if not transport.is_closing():
            transport.abort()


class ResumableWebSocket:
    """A WebSocket to a route of edgeproxy that resumes across blips.

    Args:
        url: ``ws://host:port/path`` (``wss`` is not supported by this client).
        subprotocol: the application's subprotocol, wrapped for the proxy.
        ping_interval / ping_timeout: application-level heartbeat, seconds.
        connect_timeout: per connection attempt (TCP plus handshake).
        backoff: reconnection waits; default `Backoff(0.2, 10.0)`.
        max_attempts: give up (``closed`` event) after this many failed attempts in a row.
        max_unacked_bytes: bytes of sent messages kept for a resend until acknowledged;
            `send` waits while a message would go past it (one message alone always fits).
    """

    def __init__(self, url: str, *, subprotocol: str | None = None, ping_interval: float = 5.0,
                 ping_timeout: float = 10.0, connect_timeout: float = 5.0, backoff: Backoff | None = None,
                 max_attempts: int | None = None, ack_every: int = 16, max_unacked_bytes: int = 1 << 20):
        parts = urlsplit(url)
        if parts.scheme != "ws":
            raise ValueError("only ws:// URLs are supported")
        self.host = parts.hostname or "localhost"
        self.port = parts.port or 80
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.subprotocol = subprotocol
        self.wrapper = f"{SUBPROTOCOL}+{subprotocol}" if subprotocol else SUBPROTOCOL
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.backoff = backoff or Backoff(0.2, 10.0)
        self.max_attempts = max_attempts
        self.ack_every = ack_every
        self.events: asyncio.Queue = asyncio.Queue()
        self._messages: asyncio.Queue = asyncio.Queue()
        self._link: _Link | None = None
        self._token: str | None = None
        #: True while the proxy keeps the session resumable (False: plain WebSocket)
        self.resumable = False
        self._dedupe = SeqDedupe()
        self._acked_in = 0
        self._out_seq = 0
        self.max_unacked_bytes = max_unacked_bytes
        self._unacked: deque[tuple[int, str | bytes, int]] = deque()
        self._unacked_bytes = 0
        self._room = asyncio.Event()
        self._room.set()
        self._closing = False
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ping_id = 0
        self.close_code: int | None = None
        #: counts, for tests and logs
        self.resumes = 0
        self.resets = 0

    @property
    def buffered_amount(self) -> int:
        """Bytes of sent messages not yet acknowledged by the proxy."""
        return self._unacked_bytes

    @property
    def last_seq(self) -> int:
        """The number of the last message delivered to the application."""
        return self._dedupe.last

    # -- public API -----------------------------------------------------------------

    async def connect(self) -> ResumableWebSocket:
        """Open the first connection (raises OSError or TimeoutError if it fails), then keep it alive."""
        link = await self._open(None)
        await self._first_control(link)
        self._task = asyncio.get_running_loop().create_task(self._run(link))
        self.events.put_nowait(("open", None))
        return self

    async def send(self, data: str | bytes) -> None:
        """Queue a message; it reaches the backend exactly once, across resumes.

        Waits while the resend buffer has no room for it (``max_unacked_bytes``).
        """
        if self._closing:
            raise RuntimeError("the WebSocket is closed")
        if not self.resumable:
            await self._ready.wait()
            self._write(data if isinstance(data, str) else bytes(data))
            return
        size = len(data.encode("utf-8")) if isinstance(data, str) else len(data)
        while self._unacked and self._unacked_bytes + size > self.max_unacked_bytes:
            self._room.clear()
            await self._room.wait()
            if self._closing:
                raise ConnectionError(f"closed {self.close_code} while waiting for room to send")
        self._out_seq += 1
        self._unacked.append((self._out_seq, data, size))
        self._unacked_bytes += size
        if self._ready.is_set():
            self._write_data(self._out_seq, data)

    async def recv(self) -> str | bytes:
        """The next message (each exactly once, in order); ConnectionError once closed."""
        item = await self._messages.get()
        if isinstance(item, BaseException):
            self._messages.put_nowait(item)
            raise item
        return item

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """End the session (code 1000 ends it at the backend too)."""
        self._closing = True
        link = self._link
        if link is not None:
            with contextlib.suppress(Exception):
                link.send(CloseConnection(code=code, reason=reason))
                await asyncio.wait_for(link.writer.drain(), 2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(link.reader.read(), 2)
            link.abort()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._finish(code, reason)

    # -- connections -----------------------------------------------------------------

    async def _open(self, resume: tuple[str, int] | None) -> _Link:
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                ws = WSConnection(ConnectionType.CLIENT)
                link = _Link(reader, writer, ws)
                # The bare subprotocol too: a proxy without resume forwards both and the backend picks it.
                offers = [self.wrapper] + ([self.subprotocol] if self.subprotocol else [])
                if resume is not None:
                    offers.append(f"{SUBPROTOCOL}.r.{resume[0]}.{resume[1]}")
                link.send(Request(host=f"{self.host}:{self.port}", target=self.target, subprotocols=offers))
                while True:
                    data = await reader.read(65536)
                    if not data:
                        raise ConnectionError("connection closed during the handshake")
                    ws.receive_data(data)
                    events = ws.events()
                    for event in events:
                        if isinstance(event, AcceptConnection):
                            link.subprotocol = event.subprotocol
                            link.early = list(events)  # frames that came with the 101
                            return link
                        if isinstance(event, RejectConnection):
                            raise ConnectionError(f"upgrade refused with status {event.status_code}")
            except BaseException:
                writer.transport.abort()
                raise

    async def _first_control(self, link: _Link) -> None:
        """Read up to the proxy's session message; set up resumable or plain mode."""
        self._link = link
        if link.subprotocol is None or not link.subprotocol.startswith(SUBPROTOCOL):
            self.resumable = False  # the proxy (or route) does not offer resume: a plain WebSocket
            self._ready.set()
            early, link.early = link.early, []
            for event in early:
                self._on_event(link, event)
            return
        self.resumable = True
        early, link.early = link.early, []
        for event in early:
            self._on_event(link, event)
        async with asyncio.timeout(self.connect_timeout):
            while not self._ready.is_set():
                await self._read_events(link)

    async def _read_events(self, link: _Link) -> None:
        data = await link.reader.read(65536)
        if not data:
            raise _Dead("connection closed")
        link.ws.receive_data(data)
        for event in link.ws.events():
            self._on_event(link, event)

    def _on_event(self, link: _Link, event) -> None:
        """Handle one wsproto event."""
        if isinstance(event, Ping):
            link.send(event.response())
        elif isinstance(event, CloseConnection):
            with contextlib.suppress(Exception):
                link.send(event.response())
            raise _Closed(event.code, event.reason or "")
        elif isinstance(event, (TextMessage, BytesMessage)):
            link.parts.append(event.data)
            if event.message_finished:
                data = "".join(link.parts) if isinstance(event, TextMessage) else b"".join(link.parts)
                link.parts = []
                self._on_message(data)

    def _on_message(self, data: str | bytes) -> None:
        if not self.resumable:
            self._messages.put_nowait(data)
            return
        kind = data[:1]
        if kind in ("C", b"C"):
            fields = json.loads(data[1:])
            t = fields.get("t")
            if t == "session":
                self._token = fields["token"]
                self._on_acked(fields.get("ack", 0))
                if fields.get("resumed"):
                    self.resumes += 1
                    self.events.put_nowait(("resumed", fields.get("replayed", 0)))
                for seq, payload, _ in list(self._unacked):
                    self._write_data(seq, payload)
                self.backoff.reset()
                self._ready.set()
            elif t == "ack":
                self._on_acked(fields["seq"])
            return
        if kind not in ("D", b"D"):
            raise _Dead("message without an envelope")
        sep = ":" if isinstance(data, str) else b":"
        head, _, body = data.partition(sep)
        try:
            fresh = self._dedupe.accept(int(head[1:]))
        except SeqGap as exc:
            raise _Dead(str(exc)) from None
        if fresh:
            self._messages.put_nowait(body)
            if self._dedupe.last - self._acked_in >= self.ack_every:
                self._send_ack()

    def _on_acked(self, seq: int) -> None:
        unacked = self._unacked
        while unacked and unacked[0][0] <= seq:
            self._unacked_bytes -= unacked.popleft()[2]
        self._room.set()

    def _send_ack(self) -> None:
        self._acked_in = self._dedupe.last
        self._write("C" + json.dumps({"t": "ack", "seq": self._dedupe.last}, separators=(",", ":")))

    def _write_data(self, seq: int, data: str | bytes) -> None:
        self._write(f"D{seq}:{data}" if isinstance(data, str) else b"D%d:" % seq + bytes(data))

    def _write(self, data: str | bytes) -> None:
        link = self._link
        if link is None:
            return
        with contextlib.suppress(Exception):
            link.send(TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data))

    # -- the keep-alive loop ----------------------------------------------------------

    async def _run(self, link: _Link) -> None:
        try:
            while not self._closing:
                try:
                    await self._serve(link)
                except _Closed as closed:
                    if closed.code == CLOSE_NOT_RESUMABLE:
                        self._reset(closed.reason)
                    elif not self.resumable or closed.code == 1000:
                        self._finish(closed.code, closed.reason)
                        return
                except (_Dead, OSError, ConnectionError, TimeoutError) as exc:
                    log.debug("connection lost: %s", exc)
                    if not self.resumable:
                        self._finish(1006, str(exc))
                        return
                link.abort()
                self._link = None
                self._ready.clear()
                link = await self._reconnect()
                if link is None:
                    return
        except asyncio.CancelledError:
            if self._link is not None:
                self._link.abort()
            raise

    async def _serve(self, link: _Link) -> None:
        """Read until the connection dies, pinging at the application level."""
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        next_ping = last_heard + self.ping_interval
        ping_sent = None
        while True:
            timeout = max(0.0, (next_ping if ping_sent is None else ping_sent + self.ping_timeout) - loop.time())
            try:
                async with asyncio.timeout(timeout):
                    await self._read_events(link)
                last_heard = loop.time()
                ping_sent = None
                next_ping = last_heard + self.ping_interval
            except TimeoutError:
                now = loop.time()
                if ping_sent is not None:
                    raise _Dead(f"no answer within {self.ping_timeout}s of a ping") from None
                self._ping_id += 1
                self._write("C" + json.dumps({"t": "ping", "id": self._ping_id}, separators=(",", ":")))
                ping_sent = now
            if self._dedupe.last != self._acked_in:
                self._send_ack()

    async def _reconnect(self) -> _Link | None:
        failures = 0
        while not self._closing:
            failures += 1
            if self.max_attempts is not None and failures > self.max_attempts:
                self._finish(1006, "gave up reconnecting")
                return None
            self.events.put_nowait(("reconnecting", failures))
            await asyncio.sleep(self.backoff.next_delay())
            resume = (self._token, self._dedupe.last) if self._token else None
            try:
                link = await self._open(resume)
                await self._first_control(link)
                return link
            except _Closed as closed:
                if closed.code == CLOSE_NOT_RESUMABLE:
                    self._reset(closed.reason)
                    failures = 0
                    continue
                log.debug("reconnect closed: %s", closed)
            except (_Dead, OSError, ConnectionError, TimeoutError) as exc:
                log.debug("reconnect failed: %s", exc)
            if self._link is not None:
                self._link.abort()
                self._link = None
        return None

    def _reset(self, reason: str) -> None:
        """The proxy cannot resume: a new session starts from scratch."""
        self.resets += 1
        self._token = None
        self._dedupe = SeqDedupe()
        self._acked_in = 0
        self._out_seq = 0
        self._unacked.clear()
        self._unacked_bytes = 0
        self._room.set()
        self.backoff.reset()
        self.events.put_nowait(("reset", reason))

    def _finish(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
            self._closing = True
            self._room.set()  # a send waiting for room learns that the WebSocket is closed
            self._messages.put_nowait(ConnectionError(f"closed {code} {reason}".strip()))
            self.events.put_nowait(("closed", (code, reason)))


class _Closed(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason

"""An asyncio client for edgeproxy hubs: subscribe, and get every publication once, in order.

Example (a hub at ``ws://127.0.0.1:8080/hub``; needs ``pip install websockets``)::

    import asyncio
    from edgeproxy.client import HubClient

    async def main():
        async with HubClient("ws://127.0.0.1:8080/hub") as client:
            await client.subscribe("news")
            async for pub in client:
                print(pub.channel, pub.seq, pub.data)

    asyncio.run(main())

What it does for you:

* **Reconnects** with exponential backoff and full jitter: the n-th wait in a row
  (n = 0, 1, ...) is drawn uniformly from ``[backoff_min, min(backoff_max,
  backoff_first * 2**n)]``: 0.5-1 s, 0.5-2 s, 0.5-4 s, ..., at most 30 s by default.
  A connection that got as far as ``connected`` resets the count.
* **Resumes**: after every reconnect it subscribes again to each channel with the
  position (``seq`` and ``epoch``) of the last publication it handed out, so the hub
  replays what was missed.  When the hub answers ``recovered: false`` (history no
  longer covers the gap, or the epoch changed) ``on_unrecovered(channel, position)``
  is called so the application can resync; publications go on from the new position.
* **Drops duplicates** by seq: a publication at or below the channel's position in
  the same epoch is never handed out twice.
* **Detects a dead server**: the hub sends a ``ping`` every ``ping_interval``
  seconds (it says how often in ``connected``); after ``ping_timeout`` seconds
  without any message (default: twice the interval plus one second) the connection
  is dropped and a new one made, even when the network went silent without a close.
* Close code 4000 (the hub dropped a slow subscriber) is a normal reconnect; 4001
  (bad token) and 4002 (expired) reconnect with a fresh token when ``token`` is a
  callable, and otherwise end the iteration with `HubClosed`.

Publications come out of ``async for pub in client`` (or `HubClient.next_publication`)
as `edgeproxy.hub.protocol.Publication` with ``data`` decoded from JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple
from urllib.parse import quote

import orjson

from edgeproxy.hub.protocol import CLOSE_BAD_TOKEN, CLOSE_TOKEN_EXPIRED, Position
from edgeproxy.reconnect import Backoff

__all__ = ["Backoff", "HubClient", "HubClosed", "Publication", "Position", "hub_backoff"]

log = logging.getLogger("edgeproxy.client")

TokenSource = str | Callable[[], str | Awaitable[str]] | None


class Publication(NamedTuple):
    """One publication as the client hands it out (``data`` is decoded JSON)."""

    channel: str
    seq: int
    epoch: str
    data: Any


class HubClosed(Exception):
    """The client stopped for good (closed, or the hub refused its static token)."""


def hub_backoff(first_max: float = 1.0, max_delay: float = 30.0, min_delay: float = 0.5) -> Backoff:
    """The channels client's reconnect policy: 0.5-1 s, 0.5-2 s, ... 0.5-30 s (`reconnect.Backoff`)."""
    return Backoff(first_max, max_delay, floor=min_delay)


class HubClient:
    """A hub connection that survives disconnects (see the module docstring).

    Args:
        url: ``ws://host:port/path`` of the hub.
        token: a JWT, or a callable (sync or async) that returns a fresh one at each connect.
        backoff: the reconnect policy.
        ping_timeout: seconds of silence after which the server is taken for dead
            (None: twice the hub's ``ping_interval`` plus one second).
        open_timeout: seconds a connect and handshake may take.
        on_unrecovered: called with ``(channel, position)`` when a resume answers
            ``recovered: false``.
        on_error: called with each ``error`` message the hub sends (a dict).
        rand: the jitter source (tests pass their own).
    """

    def __init__(self, url: str, *, token: TokenSource = None, backoff: Backoff | None = None,
                 ping_timeout: float | None = None, open_timeout: float = 10.0,
                 on_unrecovered: Callable[[str, Position], None] | None = None,
                 on_error: Callable[[dict], None] | None = None,
                 rand: Callable[[], float] = random.random):
        self.url = url
        self.token = token
        self.backoff = backoff or hub_backoff()
        self.ping_timeout = ping_timeout
        self.open_timeout = open_timeout
        self.on_unrecovered = on_unrecovered
        self.on_error = on_error
        self.rand = rand
        #: channel -> position of the last publication handed out (None: none yet)
        self.positions: dict[str, Position | None] = {}
        #: connections made so far (1 after the first connect)
        self.connects = 0
        #: duplicates dropped by seq
        self.duplicates = 0
        #: the id of the current connection, as the hub said in ``connected`` (what ``POST /v1/send``
        #: addresses as ``client``); it changes at every reconnect
        self.client_id: str | None = None
        self._queue: asyncio.Queue[Publication | BaseException] = asyncio.Queue()
        self._ws: Any = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self.connected = asyncio.Event()

    # -- life cycle ---------------------------------------------------------------

    async def __aenter__(self) -> HubClient:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._ws is not None:
            self._ws.transport.abort()
        self._queue.put_nowait(HubClosed("client closed"))

    # -- subscriptions ------------------------------------------------------------

    async def subscribe(self, channel: str, since: Position | None = None) -> None:
        """Subscribe now and after every reconnect (resuming from ``since`` if given)."""
        if channel not in self.positions or since is not None:
            self.positions[channel] = since
        await self._send_subscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        if self.positions.pop(channel, 0) != 0:
            await self._send({"op": "unsubscribe", "channel": channel})

    async def _send_subscribe(self, channel: str) -> None:
        message: dict[str, Any] = {"op": "subscribe", "channel": channel}
        position = self.positions.get(channel)
        if position is not None:
            message["since"] = {"seq": position.seq, "epoch": position.epoch}
        await self._send(message)

    async def _send(self, message: dict) -> None:
        ws = self._ws
        if ws is not None and self.connected.is_set():
            with contextlib.suppress(Exception):  # a dead connection is noticed by the reader
                await ws.send(orjson.dumps(message).decode())

    # -- publications -------------------------------------------------------------

    def __aiter__(self) -> HubClient:
        return self

    async def __anext__(self) -> Publication:
        try:
            return await self.next_publication()
        except HubClosed:
            raise StopAsyncIteration from None

    async def next_publication(self) -> Publication:
        """The next publication; raises `HubClosed` once the client stopped."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)  # every later call ends the same way
            raise item
        return item

    # -- the connection loop ------------------------------------------------------

    async def _token(self) -> str | None:
        token = self.token
        if callable(token):
            token = token()
            if asyncio.iscoroutine(token) or isinstance(token, Awaitable):
                token = await token
        return token

    async def _run(self) -> None:
        try:
            from websockets.asyncio.client import connect
        except ImportError as exc:  # pragma: no cover - documented requirement
            self._queue.put_nowait(HubClosed(f"edgeproxy.client needs the websockets package: {exc}"))
            return
        attempt = 0
        while not self._closing:
            code = None
            try:
                token = await self._token()
                url = self.url if token is None else f"{self.url}{'&' if '?' in self.url else '?'}token={quote(token)}"
                async with asyncio.timeout(self.open_timeout):
                    ws = await connect(url, ping_interval=None, compression=None, max_size=None, proxy=None,
                                       open_timeout=None, close_timeout=1)
                self._ws = ws
                self.connects += 1
                try:
                    if await self._session(ws):
                        attempt = 0
                finally:
                    self.connected.clear()
                    self._ws = None
                    code = ws.close_code
                    ws.transport.abort()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused, reset, handshake failed, timed out: try again later
                log.debug("hub connection failed: %r", exc)
            if code in (CLOSE_BAD_TOKEN, CLOSE_TOKEN_EXPIRED) and not callable(self.token):
                self._queue.put_nowait(HubClosed(f"the hub refused the token (close code {code})"))
                return
            delay = self.backoff.delay(attempt, self.rand())
            attempt += 1
            await asyncio.sleep(delay)

    async def _session(self, ws: Any) -> bool:
        """Serve one connection until it ends; True if it got as far as ``connected``."""
        timeout = self.ping_timeout or 30.0
        healthy = False
        while True:
            try:
                async with asyncio.timeout(timeout):
                    raw = await ws.recv()
            except TimeoutError:
                log.info("no message from the hub for %.1f s: taking it for dead", timeout)
                return healthy
            except Exception:  # closed (any code) or broken
                return healthy
            message = orjson.loads(raw)
            op = message.get("op")
            if op == "pub":
                self._on_pub(message)
            elif op == "ping":
                with contextlib.suppress(Exception):
                    await ws.send('{"op":"pong"}')
            elif op == "connected":
                healthy = True
                self.client_id = message.get("client")
                if self.ping_timeout is None and message.get("ping_interval"):
                    timeout = 2 * message["ping_interval"] + 1.0
                self.connected.set()
                for channel in list(self.positions):
                    await self._send_subscribe(channel)
            elif op == "subscribed":
                self._on_subscribed(message)
            elif op == "error":
                log.warning("hub error: %s: %s", message.get("code"), message.get("message"))
                if self.on_error is not None:
                    self.on_error(message)

    def _on_subscribed(self, message: dict) -> None:
        channel = message["channel"]
        if channel not in self.positions:
            return
        now = Position(message["seq"], message["epoch"])
        before = self.positions[channel]
        if before is not None and not message["recovered"] and self.on_unrecovered is not None:
            self.on_unrecovered(channel, now)
        if before is None or not message["recovered"]:
            self.positions[channel] = now

    def _on_pub(self, message: dict) -> None:
        channel = message["channel"]
        if channel not in self.positions:
            return  # unsubscribed meanwhile
        seq, epoch = message["seq"], message["epoch"]
        position = self.positions[channel]
        if position is not None and position.epoch == epoch and seq <= position.seq:
            self.duplicates += 1
            return
        self.positions[channel] = Position(seq, epoch)
        self._queue.put_nowait(Publication(channel, seq, epoch, message["data"]))

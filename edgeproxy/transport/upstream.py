"""Connections to upstream servers: the Protocol, round robin and the keep-alive pool.

An `UpstreamConnection` belongs to at most one client connection at a time (its
`owner`); between requests it waits in its group's idle pool.  WebSocket
connections never return to the pool.  While owned, every callback is handed to
the owner, which holds the proxying logic for both sides.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

from edgeproxy.config import Address, UpstreamConfig
from edgeproxy.core.http1 import ClientSide

if TYPE_CHECKING:
    from edgeproxy.transport.downstream import ClientConnection

log = logging.getLogger("edgeproxy")


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to an upstream server."""

    def __init__(self, group: UpstreamGroup, server: Address, high_water: int):
        self.group = group
        self.server = server
        self.high_water = high_water
        self.http = ClientSide()
        self.owner: ClientConnection | None = None
        self.transport: asyncio.Transport | None = None
        self.websocket = False
        self.closed = False
        self.reused = False
        #: set on every read; the owner's timer check turns it into a deadline.
        self.active = False
        self.idle_since = 0.0
        self._reading_paused = False

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.set_write_buffer_limits(high=self.high_water)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            # An idle pooled connection must stay silent; anything else is garbage.
            self.transport.abort()
            return
        # HTTP mode only: after the 101 a RelayEndpoint is the transport's protocol.
        self.active = True
        self.http.receive_data(data)
        owner.upstream_events(self)

    def eof_received(self) -> bool:
        owner = self.owner
        if owner is not None and not self.websocket:
            self.http.receive_data(b"")
            owner.upstream_events(self)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        owner = self.owner
        self.owner = None
        if owner is not None:
            owner.upstream_lost(self, exc)
        else:
            self.group.forget(self)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.pause_client_reading("upstream-buffer")

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.resume_client_reading("upstream-buffer")

    # -- used by the owner --------------------------------------------------

    def write(self, data: bytes) -> None:
        if data and not self.closed:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if not self._reading_paused and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def shutdown(self) -> None:
        """Half-close: send FIN after the buffered bytes, keep reading."""
        if not self.closed and self.transport.can_write_eof():
            self.transport.write_eof()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.abort()


class UpstreamGroup:
    """The servers of one `[[upstreams]]` entry: round robin and an idle pool per server."""

    def __init__(self, config: UpstreamConfig, *, high_water: int):
        self.config = config
        self.high_water = high_water
        self._next = 0
        self._idle: dict[Address, deque[UpstreamConnection]] = {s: deque() for s in config.servers}

    def order(self) -> list[Address]:
        """Servers to try for one request: round robin start, the others as fallbacks."""
        servers = self.config.servers
        start = self._next % len(servers)
        self._next += 1
        return list(servers[start:] + servers[:start])

    def take_idle(self, server: Address, now: float) -> UpstreamConnection | None:
        """A pooled keep-alive connection to `server`, most recently used first."""
        idle = self._idle[server]
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.config.pool_idle_timeout:
                conn.reused = True
                return conn
            conn.close()
        return None

    def put_idle(self, conn: UpstreamConnection, now: float) -> None:
        """Return a finished keep-alive connection to the pool (or close it)."""
        conn.owner = None
        conn.active = False
        conn.resume_reading()  # so a close by the server is noticed while idle
        idle = self._idle[conn.server]
        if conn.closed or len(idle) >= self.config.pool_size:
            conn.close()
            return
        conn.http.start_next_cycle()
        conn.idle_since = now
        idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        try:
            self._idle[conn.server].remove(conn)
        except ValueError:
            pass

    def expire_idle(self, now: float) -> None:
        limit = self.config.pool_idle_timeout
        for idle in self._idle.values():
            while idle and now - idle[0].idle_since >= limit:
                idle.popleft().close()

    def close_all(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()

    async def connect(self, server: Address, loop: asyncio.AbstractEventLoop) -> UpstreamConnection:
        """Open a new connection to `server`.

        The caller enforces `connect_timeout` from the shared timer tick (see
        `ClientConnection.check_timers`): one timer per connect attempt cost
        more than the connect's own Python work.

        Raises:
            OSError: refused or unreachable.
        """
        _, conn = await loop.create_connection(
            lambda: UpstreamConnection(self, server, self.high_water), server.host, server.port
        )
        return conn

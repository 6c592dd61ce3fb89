"""The proxy server: listeners, the connection registry, and one shared timer tick.

Every timeout (request head, keep-alive, upstream response, WebSocket handshake,
idle and close) is checked by a single periodic callback that walks the open
connections, instead of a timer per connection: one loop timer drives them all.
"""

from __future__ import annotations

import asyncio
import logging

from edgeproxy.config import Config
from edgeproxy.core import _accel
from edgeproxy.routing import Router
from edgeproxy.transport.downstream import ClientConnection
from edgeproxy.transport.loop import loop_name
from edgeproxy.transport.upstream import UpstreamGroup

log = logging.getLogger("edgeproxy")


def _tick_interval(config: Config) -> float:
    """A quarter of the shortest timeout, between 50 ms and 1 s."""
    timeouts = [config.http.header_timeout, config.http.keepalive_timeout, config.websocket.handshake_timeout,
                config.websocket.idle_timeout, config.websocket.close_timeout]
    for upstream in config.upstreams:
        timeouts += [upstream.read_timeout, upstream.pool_idle_timeout]
    shortest = min((t for t in timeouts if t > 0), default=4.0)
    return min(1.0, max(0.05, shortest / 4))


class ProxyServer:
    """Runs the proxy described by a `Config` on the running event loop.

    `await start()` binds every listener (`addresses` then gives the bound
    host/port pairs, useful with port 0); `await stop()` closes the listeners and
    every connection.
    """

    def __init__(self, config: Config):
        self.config = config
        self.router = Router(config.routes)
        high_water = config.limits.buffer_high_water
        self.groups = {u.name: UpstreamGroup(u, high_water=high_water) for u in config.upstreams}
        self.connections: set[ClientConnection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._tick = _tick_interval(config)

    def now(self) -> float:
        return self._loop.time()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for server in self._servers:
            sock = server.sockets[0]
            name = sock.getsockname()
            out.append((name[0], name[1]))
        return out

    async def start(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        try:
            for listener in self.config.listeners:
                server = await loop.create_server(
                    lambda: ClientConnection(self),
                    listener.bind.host,
                    listener.bind.port,
                    backlog=listener.backlog,
                    reuse_address=True,
                )
                self._servers.append(server)
        except OSError:
            await self.stop()
            raise
        self._tick_handle = loop.call_later(self._tick, self._on_tick)
        for group in self.groups.values():
            group.start()
        for (host, port) in self.addresses:
            log.info(
                "listening on %s:%d (loop=%s, frames=%s)", host, port, loop_name(), _accel.IMPLEMENTATION
            )

    def _on_tick(self) -> None:
        now = self._loop.time()
        for conn in list(self.connections):
            try:
                conn.check_timers(now)
            except Exception:  # one connection's bug must not stop everyone's timers
                log.exception("timer check failed for a connection from %s", conn.client_ip)
                conn.transport.abort()
        for group in self.groups.values():
            group.expire_idle(now)
        self._tick_handle = self._loop.call_later(self._tick, self._on_tick)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        for conn in list(self.connections):
            conn.shutdown()
        for group in self.groups.values():
            group.stop()
            group.close_all()
        for server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 2.0)
            except TimeoutError:
                pass
        self._servers.clear()
        # Let the transports' close callbacks run.
        await asyncio.sleep(0)

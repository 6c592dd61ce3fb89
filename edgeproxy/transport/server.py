"""The proxy server: listeners, the connection registry, and one shared timer tick.

Every timeout (request head, keep-alive, upstream response, WebSocket handshake,
idle and close) is checked by a single periodic callback that walks the open
connections, instead of a timer per connection: one loop timer drives them all.
The same tick measures event-loop lag: how late it runs is how long the loop
was busy elsewhere.

The server owns the `Metrics` (``server.metrics``) and, unless ``[admin]
enabled = false``, the admin listener (``server.admin``), which reads the
``ready`` flag, ``on_reload`` and the snapshots below.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from typing import Any, Callable

from edgeproxy.config import Config
from edgeproxy.core import _accel
from edgeproxy.core.admission import Admission, AdmissionPolicy
from edgeproxy.core.origin import OriginPolicy
from edgeproxy.metrics import CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT, Metrics
from edgeproxy.routing import Router
from edgeproxy.transport.admin import AdminListener
from edgeproxy.transport.downstream import ClientConnection
from edgeproxy.transport.edge import ProxyProtocolListener, ServerTLS
from edgeproxy.transport.loop import running_loop_name
from edgeproxy.transport.upstream import UpstreamGroup

log = logging.getLogger("edgeproxy")


def _tick_interval(config: Config) -> float:
    """A quarter of the shortest timeout, between 50 ms and 1 s."""
    timeouts = [config.http.header_timeout, config.http.keepalive_timeout, config.websocket.handshake_timeout,
                config.websocket.idle_timeout, config.websocket.close_timeout]
    for upstream in config.upstreams:
        timeouts += [upstream.read_timeout, upstream.pool_idle_timeout, upstream.connect_timeout]
    shortest = min((t for t in timeouts if t > 0), default=4.0)
    return min(1.0, max(0.05, shortest / 4))


class ProxyServer:
    """Runs the proxy described by a `Config` on the running event loop.

    `await start()` binds every listener (`addresses` then gives the bound
    host/port pairs, useful with port 0) and the admin listener; `await stop()`
    closes the listeners and every connection.

    ``ready`` is True between start and stop; lifecycle code sets it False while
    draining so /readyz answers 503. ``on_reload`` is what POST /admin/reload
    calls (None: the endpoint answers 501).
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
        self._tick_due = 0.0
        self.metrics = Metrics()
        self.metrics.live_messages = self._live_messages
        self.metrics.upstream_servers = self.upstream_states
        self.ready = False
        self.on_reload: Callable[[], Any] | None = None
        #: wall-clock time the running config was loaded (reload code updates it with `config`)
        self.config_loaded_at = time.time()
        self.admin: AdminListener | None = AdminListener(self, config.admin.bind) if config.admin.enabled else None
        self._init_edge(config)

    def now(self) -> float:
        return self._loop.time()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, kept: `asyncio.get_running_loop()` costs a getpid() per call."""
        return self._loop

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
                self._servers.append(await self._open_listener(loop, listener))
            if self.admin is not None:
                await self.admin.start()
        except OSError:
            await self.stop()
            raise
        self.metrics.event_loop = running_loop_name(loop)
        self._schedule_tick()
        for group in self.groups.values():
            group.start()
        extension = "compiled extension active" if _accel.SPEEDUPS else "compiled extension NOT active (pure Python)"
        for (host, port) in self.addresses:
            log.info("listening on %s:%d (loop=%s, %s)", host, port, self.metrics.event_loop, extension)
        if self.admin is not None:
            host, port = self.admin.address
            log.info("admin listener on http://%s:%d/ (/metrics, /healthz, /readyz, /dashboard)", host, port)
        self.ready = True

    def _schedule_tick(self) -> None:
        self._tick_due = self._loop.time() + self._tick
        self._tick_handle = self._loop.call_at(self._tick_due, self._on_tick)

    def _on_tick(self) -> None:
        now = self._loop.time()
        self.metrics.loop_lag(max(0.0, now - self._tick_due), now)
        for conn in list(self.connections):
            try:
                conn.check_timers(now)
            except Exception:  # one connection's bug must not stop everyone's timers
                log.exception("timer check failed for a connection from %s", conn.client_ip)
                conn.transport.abort()
        for group in self.groups.values():
            group.expire_idle(now)
        if self.admission is not None:
            self.admission.expire(now)
        self._schedule_tick()

    async def stop(self) -> None:
        self.ready = False
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
        if self.admin is not None:
            await self.admin.stop()
        # Let the transports' close callbacks run.
        await asyncio.sleep(0)

    # -- edge hardening: TLS, admission control, origins, PROXY protocol ---------

    def _init_edge(self, config: Config) -> None:
        limits = config.limits
        policy = AdmissionPolicy(
            max_connections=limits.max_connections, max_connections_per_ip=limits.max_connections_per_ip,
            rate=limits.connection_rate, burst=limits.connection_burst, ip_rate=limits.ip_connection_rate,
            ip_burst=limits.ip_connection_burst, table_size=limits.ip_table_size,
        )
        #: None when no admission limit is configured (nothing is counted then)
        self.admission: Admission | None = Admission(policy) if policy.enabled else None
        #: per route (by identity): the compiled allowed_origins, for routes that have them
        self.origin_policies = {id(r): OriginPolicy(r.allowed_origins) for r in config.routes if r.allowed_origins}
        #: the TLS contexts of each TLS listener, in listener order
        self.tls: list[ServerTLS] = [ServerTLS(listener) for listener in config.listeners if listener.tls]

    async def _open_listener(self, loop: asyncio.AbstractEventLoop, listener) -> Any:
        tls = next((t for t in self.tls if t.listener is listener), None)
        timeout = self.config.http.header_timeout or None
        if listener.proxy_protocol:
            pp = ProxyProtocolListener(
                listener, lambda real: ClientConnection(self, listener, real),
                tls=tls, timeout=timeout, on_refused=self.metrics.limit_refused,
            )
            await pp.start(loop)
            return pp
        return await loop.create_server(
            lambda: ClientConnection(self, listener),
            listener.bind.host,
            listener.bind.port,
            backlog=listener.backlog,
            reuse_address=True,
            ssl=tls.context if tls is not None else None,
            ssl_handshake_timeout=timeout if tls is not None else None,
        )

    def reload_certificates(self) -> int:
        """Re-read every TLS listener's certificates and keys (SIGHUP); returns how many listeners.

        New handshakes use the new certificates; open connections keep theirs.
        All files are read before anything is swapped per listener.

        Raises:
            ssl.SSLError, OSError: a file is unreadable or invalid (that listener keeps its set).
        """
        for tls in self.tls:
            tls.reload()
        if self.tls:
            log.info("reloaded the TLS certificates of %d listener(s)", len(self.tls))
        return len(self.tls)

    # -- what the metrics and the admin listener read ----------------------------

    def _live_messages(self):
        """Per-direction totals of the open WebSocket sessions (not yet folded into metrics)."""
        for conn in self.connections:
            relay = conn.relay
            if relay is not None:
                yield CLIENT_TO_UPSTREAM, relay.messages_from_client, relay.bytes_from_client
                yield UPSTREAM_TO_CLIENT, relay.messages_from_upstream, relay.bytes_from_upstream

    def upstream_states(self) -> list[dict[str, Any]]:
        """Every configured upstream server: its health state and open connections.

        ``state`` is up, slow_start, down or draining (`core.health`); ``up`` is
        True when the server takes new connections (up or slow_start);
        ``websocket_sessions`` counts the sessions the balancer sees on it and
        ``active_connections`` what the metrics count (the same, by two routes).
        """
        by_server = self.metrics.active_by("server")
        now = self._loop.time() if self._loop is not None else 0.0
        out = []
        for group in self.groups.values():
            for entry in group.snapshot(now)["servers"]:
                out.append({
                    "upstream": group.config.name,
                    "server": entry["address"],
                    "up": entry["state"] in ("up", "slow_start"),
                    "state": entry["state"],
                    "weight": entry["weight"],
                    "effective_weight": entry["effective_weight"],
                    "drain": entry["drain"],
                    "ejections": entry["ejections"],
                    "websocket_sessions": entry["connections"],
                    "active_connections": by_server.get(entry["address"], 0),
                })
        return out

    def config_info(self) -> dict[str, Any]:
        """Which configuration is running: its version (sha256 of the file) and load time."""
        config = self.config
        loaded = datetime.datetime.fromtimestamp(self.config_loaded_at, datetime.timezone.utc)
        return {
            "version": config.version,
            "source": config.source,
            "loaded_at": loaded.isoformat(timespec="seconds"),
            "loaded_at_unix": self.config_loaded_at,
            "compiled_extension_active": _accel.SPEEDUPS,
            "implementation": _accel.IMPLEMENTATION,
            "event_loop": self.metrics.event_loop,
            "listeners": [str(listener.bind) for listener in config.listeners],
            "upstreams": [upstream.name for upstream in config.upstreams],
            "routes": len(config.routes),
            "ready": self.ready,
        }

"""The proxy server: listeners, the connection registry, and one shared timer tick.

Every timeout (request head, keep-alive, upstream response, WebSocket handshake,
idle and close) is checked by a single periodic callback that walks the open
connections, instead of a timer per connection: one loop timer drives them all.
The same tick measures event-loop lag: how late it runs is how long the loop
was busy elsewhere.

The server owns the `Metrics` (``server.metrics``) and, unless ``[admin]
enabled = false``, the admin listener (``server.admin``), which reads the
``ready`` flag, ``on_reload`` and the snapshots below.

`reload` applies a new, validated `Config` in place without dropping a
connection (see its docstring for what changes how); `reload_file` is the
SIGHUP and POST /admin/reload path.  Listeners may be handed in as ready
sockets (`start(sockets=...)`): that is how the supervisor's workers get their
SO_REUSEPORT sockets (`edgeproxy.supervisor`).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import random
import socket
import time
from collections.abc import Mapping
from typing import Any, Callable

from edgeproxy.config import Address, Config, ListenerConfig, load_config
from edgeproxy.core import _accel
from edgeproxy.core.drain import Drain
from edgeproxy.core.heartbeat import Heartbeat
from edgeproxy.core.timerwheel import TimerWheel
from edgeproxy.errors import ConfigError
from edgeproxy.core.admission import Admission, AdmissionPolicy
from edgeproxy.core.shared_admission import SharedAdmission
from edgeproxy.core.ratelimit import ClientBuckets
from edgeproxy.core.origin import OriginPolicy
from edgeproxy.metrics import CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT, Metrics
from edgeproxy.routing import Router
from edgeproxy.transport.admin import AdminListener
from edgeproxy.transport.backplanes import instance_id, make_backplane
from edgeproxy.transport.downstream import ClientConnection
from edgeproxy.transport.hub import HubService, publish_endpoint, send_endpoint
from edgeproxy.transport.edge import ProxyProtocolListener, ServerTLS
from edgeproxy.transport.heap import HeapTrimmer
from edgeproxy.transport.loop import running_loop_name
from edgeproxy.transport.resume import ResumeRegistry
from edgeproxy.transport.shared_limits import SharedLimits
from edgeproxy.transport.presence import make_presence
from edgeproxy.transport.upstream import UpstreamGroup

log = logging.getLogger("edgeproxy")


def _heartbeat_settings(config: Config) -> tuple:
    ws = config.websocket
    return ws.ping_interval, ws.pong_timeout, ws.ping_upstream, ws.max_connection_age


def _h2c_binds(config: Config) -> frozenset:
    """The cleartext listeners that take h2c by prior knowledge (read per connection: a reload applies at once)."""
    return frozenset(listener.bind for listener in config.listeners if listener.http2 and not listener.tls)


def _tick_interval(config: Config) -> float:
    """A quarter of the shortest timeout, between 50 ms and 1 s."""
    ws = config.websocket
    timeouts = [config.http.header_timeout, config.http.keepalive_timeout, config.http.body_timeout, ws.handshake_timeout,
                ws.idle_timeout, ws.close_timeout, ws.ping_interval, ws.pong_timeout, ws.max_connection_age]
    for upstream in config.upstreams:
        timeouts += [upstream.read_timeout, upstream.pool_idle_timeout, upstream.connect_timeout]
    timeouts += [config.sse.keepalive_interval, config.sse.upstream_idle_timeout]  # boundary_timeout needs no precision
    shortest = min((t for t in timeouts if t > 0), default=4.0)
    return min(1.0, max(0.05, shortest / 4))


#: identifies a listener across reloads: its bind address, and which occurrence
#: of it (several port-0 listeners on one host are allowed and distinct)
ListenerKey = tuple[Address, int]


def route_limits(
    config: Config, old_routes: dict[int, Any], old: dict[int, ClientBuckets] | None = None
) -> dict[int, ClientBuckets]:
    """The rate-limit buckets of each limited route; a reload keeps those of a route whose limit is unchanged.

    ``old_routes`` maps the previous routes' ids to the routes, ``old`` their buckets.
    """
    kept = {}
    for route_id, buckets in (old or {}).items():
        route = old_routes.get(route_id)
        if route is not None:
            kept[(route.host, route.path_prefix, route.rate_limit)] = buckets
    table_size = config.limits.ip_table_size
    out = {}
    for route in config.routes:
        limit = route.rate_limit
        if limit is None:
            continue
        buckets = kept.get((route.host, route.path_prefix, limit))
        if buckets is None or buckets.table_size != table_size:
            buckets = ClientBuckets(limit.rate, limit.burst, table_size)
        out[id(route)] = buckets
    return out


def listener_keys(listeners: tuple[ListenerConfig, ...]) -> list[ListenerKey]:
    """The key of each listener, in config order."""
    seen: dict[Address, int] = {}
    keys = []
    for listener in listeners:
        n = seen.get(listener.bind, 0)
        seen[listener.bind] = n + 1
        keys.append((listener.bind, n))
    return keys


class ProxyServer:
    """Runs the proxy described by a `Config` on the running event loop.

    `await start()` binds every listener (`addresses` then gives the bound
    host/port pairs, useful with port 0) and the admin listener; `await stop()`
    closes the listeners and every connection.

    ``ready`` is True between start and stop; lifecycle code sets it False while
    draining so /readyz answers 503. ``on_reload`` is what POST /admin/reload
    calls (None: the endpoint answers 501).
    """

    def __init__(self, config: Config, shared_limits: SharedLimits | None = None):
        self.config = config
        #: the admission table of the instance when this is one of its workers (None: this process alone)
        self.shared_limits = shared_limits
        self.admission: Admission | SharedAdmission | None = None
        self.router = Router(config.routes)
        high_water = config.limits.buffer_high_water
        self.groups = {u.name: UpstreamGroup(u, high_water=high_water) for u in config.upstreams}
        for group in self.groups.values():
            group.retire_drain_timeout = config.shutdown.drain_timeout
        self.connections: set[ClientConnection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        #: the ListenerKey of each entry of `_servers`
        self._server_keys: list[ListenerKey] = []
        #: bind listeners with SO_REUSEPORT (set for supervised workers)
        self.reuse_port = False
        #: (supervisor pid, slot) when this process is one worker among several (``workers = N``), else None
        self.worker: tuple[int, int] | None = None
        #: groups of upstreams a reload removed, while their sessions are paced out
        self._retired_groups: list[UpstreamGroup] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._tick = _tick_interval(config)
        self._tick_due = 0.0
        self.metrics = Metrics()
        self.metrics.live_messages = self._live_messages
        self.metrics.upstream_servers = self.upstream_states
        self.metrics.readiness = self.readiness
        self.ready = False
        #: True once `start` has finished: ``ready`` False after that means draining
        self.started = False
        #: POST /admin/reload: re-read the config file, when there is one
        self.on_reload: Callable[[], Any] | None = self.reload_file if os.path.isfile(config.source) else None
        #: wall-clock time the running config was loaded (reload code updates it with `config`)
        self.config_loaded_at = time.time()
        admin = config.admin
        gate = dict(control_key=admin.control_key, open_endpoints=admin.open_endpoints)
        self.admin: AdminListener | None = None
        #: the control endpoints' own listener, with ``[admin] control_bind``
        self.control: AdminListener | None = None
        if admin.enabled:
            self.admin = AdminListener(self, admin.bind, role="all" if admin.control_bind is None else "public", **gate)
            if admin.control_bind is not None:
                self.control = AdminListener(self, admin.control_bind, role="control",
                                             unix_mode=admin.control_socket_mode, **gate)
        self.rng = random.Random()
        #: heartbeats of clients (pings, dead peers, age limit) and of upstreams
        #: (pings only); one timer wheel each, advanced by the shared tick
        self.client_beats: Heartbeat | None = None
        self.upstream_beats: Heartbeat | None = None
        #: set when a graceful drain has begun: no keep-alive, no new sessions
        self.draining = False
        #: the proxied event streams (`transport.sse`), HTTP/1.1 and HTTP/2 alike
        self.sse_streams: set = set()
        #: the ``[[hubs]]`` by path: upgrades to these paths are served by the proxy itself
        #: this process in the backplane (presence, instance-addressed messages)
        self.instance = instance_id(config.backplane)
        self.hubs = {hub.path: HubService(hub, self, make_backplane(config.backplane, hub, self.metrics, self.instance))
                     for hub in config.hubs}
        #: who is connected where, for POST /v1/send (in Redis with kind = "redis")
        self.presence = make_presence(self)
        for listener in self.admin_listeners:  # each serves only what its role allows
            listener.add_route("/v1/publish", "POST", lambda request: publish_endpoint(self, request),
                               max_body=config.admin.max_publish_size)
            listener.add_route("/v1/send", "POST", lambda request: send_endpoint(self, request),
                               max_body=config.admin.max_publish_size)
            listener.add_route("/admin/drain", "POST", self.drain_endpoint, max_body=4096)
        #: resumable sessions (docs/resume-protocol.md), when websocket.resume_secret is set
        self.resume: ResumeRegistry | None = ResumeRegistry(self) if config.websocket.resume_secret else None
        #: gives freed C-heap memory (TLS buffers) back to the kernel, from the tick; started by `start`
        self.heap = HeapTrimmer(0.0, 0.0)
        #: each client connection's next timeout check (`ClientConnection._rearm`); made by `start`
        self.timers: TimerWheel | None = None
        #: relays WebSocket pairs after the 101 (`core._accel.RelayEngine`); made by `start`
        self.relay_engine = None
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

    async def start(self, sockets: Mapping[ListenerKey, socket.socket] | None = None) -> None:
        """Bind every listener (or take its socket from `sockets`) and the admin listener."""
        self._loop = asyncio.get_running_loop()
        self.timers = TimerWheel(self._loop.time(), tick=self._tick)
        self._start_relay_engine()
        try:
            for key, listener in zip(listener_keys(self.config.listeners), self.config.listeners):
                self._servers.append(await self._open_listener(listener, (sockets or {}).get(key)))
                self._server_keys.append(key)
            for admin in self.admin_listeners:
                await admin.start()
            for hub in self.hubs.values():
                await hub.start()
            await self.presence.start()
            fleet_start = getattr(self.admission, "start", None)
            if fleet_start is not None:  # [admission] scope = "cluster": the first lease before the first accept
                await fleet_start()
            if self.resume is not None and self.worker is not None and self.config.workers > 1:
                await self.resume.start_handoff(*self.worker)
        except OSError:
            await self.stop()
            raise
        self.metrics.event_loop = running_loop_name(self._loop)
        self._start_heartbeats(self._loop.time())
        self.heap = HeapTrimmer(self.config.limits.heap_trim_interval, self._loop.time(), on_trim=self.metrics.heap_trimmed)
        self._schedule_tick()
        for group in self.groups.values():
            group.start()
        extension = "compiled extension active" if _accel.SPEEDUPS else "compiled extension NOT active (pure Python)"
        for (host, port) in self.addresses:
            log.info("listening on %s:%d (loop=%s, %s)", host, port, self.metrics.event_loop, extension)
        if self.admin is not None:
            log.info("admin listener on %s/ (/metrics, /healthz, /readyz, /dashboard)", self.admin.describe())
        if self.control is not None:
            log.info("control listener on %s (/admin/*)", self.control.describe())
        self.ready = True
        self.started = True

    def readiness(self) -> tuple[str, str]:
        """``(state, why)`` for /readyz and ``edgeproxy_ready_state``: a state of `metrics.READY_STATES`.

        "draining" (a roll or a stop: the process is going away on purpose) is
        told apart from "unhealthy" (it runs, but traffic sent here would fail:
        a hub's backplane is lost, or no upstream a route uses has a server that
        takes connections), so an operator can tell a roll from an outage.
        """
        if not self.ready:
            return ("draining", "draining") if self.started else ("starting", "starting")
        problems = [f"backplane of hub {path} lost" for path, hub in self.hubs.items()
                    if not getattr(hub.backplane, "up", True)]
        routed = {route.upstream for route in self.config.routes}
        servers = self.upstream_states()
        down = sorted(name for name in routed
                      if not any(s["up"] for s in servers if s["upstream"] == name))
        if down and len(down) == len(routed):
            problems.append("no upstream has a server up (" + ", ".join(down) + ")")
        if problems:
            return "unhealthy", "unhealthy: " + "; ".join(problems)
        return "ready", "ready"

    def _start_heartbeats(self, now: float) -> None:
        ws = self.config.websocket
        # A stall is a tick late by more than a couple of ticks (see core.heartbeat).
        common = dict(rng=self.rng, pong_timeout=ws.pong_timeout, tick=self._tick, stall_grace=max(2.0, 3 * self._tick))
        if ws.ping_interval or ws.max_connection_age:
            self.client_beats = Heartbeat(now, ping_interval=ws.ping_interval, max_connection_age=ws.max_connection_age, **common)
        if ws.ping_interval and ws.ping_upstream:
            self.upstream_beats = Heartbeat(now, ping_interval=ws.ping_interval, **common)

    def _restart_heartbeats(self, now: float) -> None:
        """New heartbeat settings: new trackers, every open session registered again.

        A session's ping schedule and its age limit start over from now (a tracker
        cannot change its settings under peers it already placed on its wheel).
        """
        self.client_beats = self.upstream_beats = None
        self._start_heartbeats(now)
        for conn in self.connections:
            if conn.relay is not None and not conn.closed:
                conn.register_heartbeats(now)

    def _schedule_tick(self) -> None:
        self._tick_due = self._loop.time() + self._tick
        self._tick_handle = self._loop.call_at(self._tick_due, self._on_tick)

    def _on_tick(self) -> None:
        now = self._loop.time()
        self.metrics.loop_lag(max(0.0, now - self._tick_due), now)
        for conn in self.timers.advance(now):
            if conn not in self.connections:
                continue  # handed over (hub, resumable session) or closed since it was armed
            try:
                conn.check_timers(now)
                conn._rearm(now)
            except Exception:  # one connection's bug must not stop everyone's timers
                log.exception("timer check failed for a connection from %s", conn.client_ip)
                conn.transport.abort()
        for group in self.groups.values():
            group.expire_idle(now)
        if self.resume is not None:
            self.resume.check_timers(now)
        for beats, client in ((self.client_beats, True), (self.upstream_beats, False)):
            if beats is not None:
                for action, conn, payload in beats.due(now):
                    try:
                        conn.heartbeat(action, client, payload)
                    except Exception:
                        log.exception("heartbeat action failed for a connection from %s", conn.client_ip)
                        conn.transport.abort()
        if self.admission is not None:
            self.admission.expire(now)
        for buckets in self.route_limits.values():
            buckets.expire(now)
        self.heap.tick(now)
        self._schedule_tick()

    # -- graceful drain ------------------------------------------------------------

    async def drain_and_stop(self) -> None:
        """Graceful shutdown: readiness off, stop accepting, close frames in paced batches, then stop.

        The steps follow ``[shutdown]``: /readyz answers 503 for
        ``readiness_grace`` seconds so load balancers stop sending; the listeners
        close (established connections stay); idle keep-alive connections close
        and requests in flight finish without keep-alive; every open WebSocket
        gets a close frame (code ``close_code``, a reason with a jittered
        reconnect hint) in batches spread by `core.drain.Drain` over the first
        half of ``drain_timeout``, so the reconnect wave lands spread out (a
        proxied event stream, in the same batches, gets a jittered ``retry:`` at
        its next event boundary and a clean end: `transport.sse`); at
        ``drain_timeout`` whatever remains is closed by `stop`.
        """
        cfg = self.config.shutdown
        self.ready = False
        if cfg.readiness_grace:
            await asyncio.sleep(cfg.readiness_grace)
        for server in self._servers:
            server.close()
        self.draining = True
        for conn in list(self.connections):
            conn.drain_http()
        now = self.now()
        sessions = [conn for conn in self.connections if conn.relay is not None]
        if self.resume is not None:  # resumable sessions are paced in the same batches
            sessions += self.resume.sessions.values()
        for hub in self.hubs.values():  # and so are the hubs' subscribers, WebSocket and SSE
            sessions += hub.connections
            sessions += hub.sse_streams
        sessions += self.sse_streams  # and the proxied event streams (a retry: at an event boundary)
        # "immediate": one batch at the start, every close frame at once
        close_window = 0.5 if cfg.drain_policy == "paced" else 0.0
        plan = Drain(now, sessions, cfg.drain_timeout, rng=self.rng, close_code=cfg.close_code, close_window=close_window)
        log.info("draining (%s): %d WebSocket session(s), %d connection(s) in all, for at most %.1fs",
                 cfg.drain_policy, len(sessions), len(self.connections), cfg.drain_timeout)

        def left() -> bool:
            return bool(self.connections or (self.resume is not None and self.resume.sessions)
                        or any(hub.connections or hub.sse_streams for hub in self.hubs.values()))

        while left() and self.now() < plan.deadline:
            for conn, code, reason in plan.due(self.now()):
                conn.close_websocket(code, reason)
            next_batch = plan.next_batch_at
            wake = min(plan.deadline, next_batch if next_batch is not None else plan.deadline, self.now() + 0.05)
            await asyncio.sleep(max(0.0, wake - self.now()))
        if plan.replans:
            log.warning("drain: the event loop stalled past several batches %d time(s); the closes left were "
                        "spread again over the rest of the close window", plan.replans)
        if left():
            log.info("drain deadline: closing the %d connection(s) left", len(self.connections))
        else:
            log.info("drained")
        await self.stop()

    async def stop(self) -> None:
        self.ready = False
        for server in self._servers:
            server.close()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        for conn in list(self.connections):
            conn.shutdown()
        if self.resume is not None:
            self.resume.close_all(self.config.shutdown.close_code, "server shutting down")
        for hub in self.hubs.values():
            await hub.stop()
        await self.presence.stop()
        fleet_close = getattr(self.admission, "close", None)
        if fleet_close is not None:
            await fleet_close()
        for group in [*self.groups.values(), *self._retired_groups]:
            group.stop()
            group.close_all()
        for server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 2.0)
            except TimeoutError:
                pass
        self._servers.clear()
        for listener in self.admin_listeners:
            await listener.stop()
        # Let the transports' close callbacks run.
        await asyncio.sleep(0)
        self._stop_relay_engine()
        await asyncio.sleep(0)

    # -- the relay engine --------------------------------------------------------

    def _start_relay_engine(self) -> None:
        """Relayed WebSockets run below the loop (`core._accel.RelayEngine`); the loop watches one descriptor."""
        self.relay_engine = engine = _accel.RelayEngine(self._loop.call_soon)
        self.metrics.relay_engine = engine.stats
        fd = engine.fileno()
        if fd is not None:
            self._loop.add_reader(fd, engine.run)

    def _stop_relay_engine(self) -> None:
        engine = self.relay_engine
        if engine is None:
            return
        self.relay_engine = None
        self.metrics.relay_engine = None
        fd = engine.fileno()
        if fd is not None:
            self._loop.remove_reader(fd)
        engine.close()

    # -- reload: apply a new config in place ---------------------------------------

    async def reload_file(self, path: str | None = None) -> dict[str, Any]:
        """Re-read the config file (default: the running config's source) and apply it.

        An invalid file is logged, one line per problem with its file and key
        path, and the running config is kept.

        Raises:
            ConfigError: the file is invalid (POST /admin/reload answers 400 with the problems).
            OSError: a new listener could not be bound (nothing was changed).
        """
        try:
            config = load_config(path or self.config.source)
        except ConfigError as exc:
            for line in exc.format_lines():
                log.error("reload: %s", line)
            log.error("reload: the configuration is invalid; the running one is kept")
            raise
        return await self.reload(config)

    async def reload(self, config: Config, sockets: Mapping[ListenerKey, socket.socket] | None = None) -> dict[str, Any]:
        """Apply `config` without dropping an open connection; returns what changed.

        * listeners: new ones are bound first (from `sockets` when given); if one
          cannot be, the reload stops there and nothing has changed.  Removed ones
          stop accepting; their established connections go on.  A kept listener
          whose settings changed gets them here (backlog today; TLS certificates
          will be swapped in `_update_listener`).
        * upstreams: new groups start, removed ones are retired (idle pools closed,
          live WebSockets paced out with close frames), kept ones `reconfigure`
          (servers that stay keep their health state, sessions and pools).
        * routes: the `Router` is swapped; requests already routed finish where
          they were sent.
        * http, websocket, limits, upstream timeouts: read when used, so new
          connections and new requests get the new values; open WebSockets keep
          the values they started with.
        * logging: reconfigured at once.  ``admin`` and ``workers`` take effect on
          a restart (or, for workers, a binary upgrade); a change is logged.

        A config equal to the running one (`Config` equality ignores the file's
        version hash) changes nothing but the version and load time.
        """
        old = self.config
        now = self._loop.time()
        if config == old:
            self.config = config  # the same values, maybe from a file with other comments
            self.config_loaded_at = time.time()
            # Certificates renewed on disk are the usual reason for a SIGHUP.
            renewed = self.reload_certificates()
            log.info("reload: no effective change (version %s)%s", config.version[:12],
                     f"; re-read the certificates of {renewed} TLS listener(s)" if renewed else "")
            return {"reloaded": True, "changed": [], "version": config.version}
        changed = self._reload_edge(old, config)
        changed += await self._reload_listeners(old, config, sockets or {})
        changed += self._reload_upstreams(old, config, now)
        # Always the new route objects, changed or not: the per-route tables
        # (origin policies, rate-limit buckets) are keyed by the new routes' identity.
        self.router = Router(config.routes)
        if config.routes != old.routes:
            changed.append("routes")
        for name in ("http", "websocket", "limits", "shutdown"):
            if getattr(config, name) != getattr(old, name):
                changed.append(name)
        if config.logging != old.logging:
            from edgeproxy.logs import configure_logging

            configure_logging(config.logging)
            changed.append("logging")
        for name in ("admin", "workers", "hubs", "admission"):
            if getattr(config, name) != getattr(old, name):
                log.warning("reload: %s changed; it takes effect on a restart", name)
        self.config = config
        self.config_loaded_at = time.time()
        self._tick = _tick_interval(config)
        self.heap.configure(config.limits.heap_trim_interval, now)
        if _heartbeat_settings(config) != _heartbeat_settings(old):
            self._restart_heartbeats(now)
        log.info("reload: applied version %s (changed: %s)", config.version[:12], ", ".join(changed) or "nothing in effect")
        return {"reloaded": True, "changed": changed, "version": config.version}

    async def _reload_listeners(
        self, old: Config, new: Config, sockets: Mapping[ListenerKey, socket.socket]
    ) -> list[str]:
        current = dict(zip(self._server_keys, self._servers))
        old_by_key = dict(zip(listener_keys(old.listeners), old.listeners))
        new_keys = listener_keys(new.listeners)
        opened: dict[ListenerKey, asyncio.AbstractServer] = {}
        try:
            for key, listener in zip(new_keys, new.listeners):
                if key not in current:
                    opened[key] = await self._open_listener(listener, sockets.get(key))
        except OSError as exc:
            for server in opened.values():
                server.close()
            log.error("reload: cannot bind a new listener (%s); the running configuration is kept", exc)
            raise
        for key, listener in zip(new_keys, new.listeners):
            if key in current and old_by_key[key] != listener:
                self._update_listener(current[key], old_by_key[key], listener)
        removed = [key for key in current if key not in set(new_keys)]
        for key in removed:
            current[key].close()  # stops accepting; established connections are not touched
        self._servers = [opened[key] if key in opened else current[key] for key in new_keys]
        self._server_keys = list(new_keys)
        for key in opened:
            log.info("reload: listening on %s", key[0])
        for key in removed:
            log.info("reload: stopped listening on %s (its connections stay open)", key[0])
        return ["listeners"] if opened or removed or old.listeners != new.listeners else []

    def _update_listener(self, server: asyncio.AbstractServer, old: ListenerConfig, new: ListenerConfig) -> None:
        """A kept listener's settings changed: apply them to its open socket.

        The backlog is set again with listen(2), which Linux applies to a
        listening socket.  This is also where TLS certificates are to be
        reloaded when listeners get them: build the new `ssl.SSLContext` and
        swap it for new handshakes; sessions already established keep theirs.
        """
        if new.backlog != old.backlog:
            for sock in server.sockets:  # the loop's socket views do not offer listen(): use a dup
                with socket.socket(fileno=os.dup(sock.fileno())) as dup:
                    dup.listen(new.backlog)

    def _reload_upstreams(self, old: Config, new: Config, now: float) -> list[str]:
        high_water = new.limits.buffer_high_water
        groups = {}
        changed = []
        for upstream in new.upstreams:
            group = self.groups.get(upstream.name)
            if group is None:
                group = UpstreamGroup(upstream, high_water=high_water)
                group.start()
                changed.append(f"upstream {upstream.name} added")
            elif group.config != upstream or group.high_water != high_water:
                group.retire_drain_timeout = new.shutdown.drain_timeout
                removed = group.reconfigure(upstream, high_water=high_water, now=now)
                changed.append(f"upstream {upstream.name} changed" + (f" ({len(removed)} server(s) removed)" if removed else ""))
            group.retire_drain_timeout = new.shutdown.drain_timeout
            groups[upstream.name] = group
        for name, group in self.groups.items():
            if name not in groups:
                group.retire_drain_timeout = new.shutdown.drain_timeout
                group.retire_all(now)
                group.close_all()
                self._retired_groups.append(group)
                changed.append(f"upstream {name} removed")
        self._retired_groups = [g for g in self._retired_groups if not g.retired]
        self.groups = groups
        return changed

    # -- edge hardening: TLS, admission control, origins, PROXY protocol ---------

    def _init_edge(self, config: Config) -> None:
        self._init_admission(config)
        #: per route (by identity): the compiled allowed_origins, for routes that have them
        self.origin_policies = {id(r): OriginPolicy(r.allowed_origins) for r in config.routes if r.allowed_origins}
        #: per route (by identity): the per-client buckets of its rate_limit, for routes that have one
        self.route_limits: dict[int, ClientBuckets] = route_limits(config, {})
        #: the TLS contexts of each TLS listener, in listener order
        self.tls: list[ServerTLS] = [ServerTLS(listener) for listener in config.listeners if listener.tls]
        self.h2c_binds = _h2c_binds(config)

    def _init_admission(self, config: Config) -> None:
        """Admission control for `config`: per instance (the shared table) with workers, else in process.

        A reload reconfigures the one in place, so the open connections stay
        counted (and are released into it when they close).
        """
        limits = config.limits
        policy = AdmissionPolicy(
            max_connections=limits.max_connections, max_connections_per_ip=limits.max_connections_per_ip,
            rate=limits.connection_rate, burst=limits.connection_burst, ip_rate=limits.ip_connection_rate,
            ip_burst=limits.ip_connection_burst, table_size=limits.ip_table_size,
        )
        now = self._loop.time() if self._loop is not None else 0.0
        fleet = config.admission.scope == "cluster" and policy.rate > 0
        if self.admission is not None:
            self.admission.reconfigure(policy, now)
        elif not policy.enabled:
            pass  # None: nothing is counted
        elif fleet:
            # the rate bucket is the fleet's (in the backplane); caps and per-address limits stay here
            from edgeproxy.transport.fleet_admission import FleetAdmission, local_policy

            mine = local_policy(policy)
            local = (self.shared_limits.admission(mine, self.rng.random, now) if self.shared_limits is not None
                     else Admission(mine, now, rng=self.rng.random))
            self.admission = FleetAdmission(local, policy, config.backplane, self.instance, self.metrics, now,
                                            rng=self.rng.random)
        elif self.shared_limits is not None:
            self.admission = self.shared_limits.admission(policy, self.rng.random, now)
        else:
            self.admission = Admission(policy, now, rng=self.rng.random)

    def _tls_of(self, listener: ListenerConfig) -> ServerTLS | None:
        return next((t for t in self.tls if t.listener.bind == listener.bind), None)

    async def _open_listener(self, listener: ListenerConfig, sock: socket.socket | None) -> Any:
        """Accept clients on `listener`, with TLS and the PROXY protocol when it asks for them.

        On `sock` when given (already bound and listening: a worker's
        SO_REUSEPORT socket from the supervisor), else bound here.
        """
        loop = self._loop
        tls = self._tls_of(listener)
        timeout = self.config.http.header_timeout or None
        if listener.proxy_protocol:
            pp = ProxyProtocolListener(
                listener, lambda real: ClientConnection(self, listener, real),
                tls=tls, timeout=timeout, on_refused=self.metrics.limit_refused,
            )
            await pp.start(loop, sock)
            return pp
        factory = lambda: ClientConnection(self, listener)  # noqa: E731
        ssl_args = {"ssl": tls.context, "ssl_handshake_timeout": timeout} if tls is not None else {}
        if sock is not None:
            return await loop.create_server(factory, sock=sock, backlog=listener.backlog, **ssl_args)
        return await loop.create_server(
            factory, listener.bind.host, listener.bind.port,
            backlog=listener.backlog, reuse_address=True, reuse_port=self.reuse_port or None, **ssl_args,
        )

    def _reload_edge(self, old: Config, new: Config) -> list[str]:
        """Origins, admission limits and TLS for a reload; certificates are re-read from disk.

        Runs before the listeners are reloaded, so a new TLS listener finds its
        context.  A kept TLS listener keeps its context object (the loop's server
        holds it) and only swaps the certificates behind its SNI callback.

        Raises:
            ssl.SSLError, OSError: a certificate or key cannot be read (nothing changes then
            for that listener; the reload is refused).
        """
        changed = []
        self.origin_policies = {id(r): OriginPolicy(r.allowed_origins) for r in new.routes if r.allowed_origins}
        self.route_limits = route_limits(new, {id(r): r for r in old.routes}, self.route_limits)
        self.h2c_binds = _h2c_binds(new)
        if new.limits != old.limits:
            self._init_admission(new)
        kept = []
        for listener in new.listeners:
            if not listener.tls:
                continue
            tls = self._tls_of(listener)
            if tls is None:
                tls = ServerTLS(listener)
            else:
                tls.listener = listener
                tls.reload()
                changed.append(f"certificates of {listener.bind}")
            kept.append(tls)
        self.tls = kept
        return changed

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

    @property
    def admin_listeners(self) -> list[AdminListener]:
        """The admin listener and, with ``[admin] control_bind``, the control one."""
        return [listener for listener in (self.admin, self.control) if listener is not None]

    def _live_messages(self):
        """Per-direction totals of the open WebSocket sessions (not yet folded into metrics)."""
        for conn in self.connections:
            relay = conn.relay
            if relay is not None:
                yield CLIENT_TO_UPSTREAM, relay.messages_from_client, relay.bytes_from_client
                yield UPSTREAM_TO_CLIENT, relay.messages_from_upstream, relay.bytes_from_upstream
        for stream in self.sse_streams:
            yield UPSTREAM_TO_CLIENT, stream.events, stream.bytes

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

    def drain_endpoint(self, request) -> tuple[int, dict[str, Any]]:
        """``POST /admin/drain`` ``{"upstream": NAME, "server": "host:port", "drain": true|false}``.

        A drained server takes no new connections; its live sessions stay, or are
        paced out when the upstream has ``[upstreams.rebalance]``.  Until the next
        reload or restart, which apply the config's own ``drain`` flags.
        """
        try:
            doc = json.loads(request.body or b"null")
        except ValueError as exc:
            return 400, {"error": f"body is not JSON: {exc}"}
        if not isinstance(doc, dict) or set(doc) != {"upstream", "server", "drain"} or not isinstance(doc["drain"], bool):
            return 400, {"error": 'expected {"upstream": NAME, "server": "host:port", "drain": true or false}'}
        group = self.groups.get(doc["upstream"]) if isinstance(doc["upstream"], str) else None
        if group is None:
            return 404, {"error": f"no upstream {doc['upstream']!r}", "upstreams": sorted(self.groups)}
        server = next((s for s in group.config.servers if str(s) == doc["server"]), None)
        if server is None:
            return 404, {"error": f"upstream {group.config.name!r} has no server {doc['server']!r}",
                         "servers": [str(s) for s in group.config.servers]}
        group.set_drain(server, doc["drain"])
        log.warning("admin: upstream %s server %s %s", group.config.name, server, "draining" if doc["drain"] else "no longer draining")
        state = next(s for s in self.upstream_states() if s["upstream"] == group.config.name and s["server"] == str(server))
        return 200, state

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

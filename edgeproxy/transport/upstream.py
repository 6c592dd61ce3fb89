"""Connections to upstream servers: the Protocol, server choice, health and the keep-alive pool.

An `UpstreamConnection` belongs to at most one client connection at a time (its
`owner`); between requests it waits in its group's idle pool.  WebSocket
connections never return to the pool.  While owned, every callback is handed to
the owner, which holds the proxying logic for both sides.

An `UpstreamGroup` carries out the decisions of the sans-IO core for one
``[[upstreams]]`` entry: `choose` asks `core.balance` / `core.affinity` which
server a request goes to, given `core.health`'s verdicts and the live WebSocket
count of each server (tracked here, `session_opened` / `session_closed`).  Two
optional loop tasks per group run the active health checks and the paced
rebalancer (`core.rebalance`), which ends chosen sessions through the client
connection's `close_websocket`.  `snapshot()` gives the per-server counts and
states as plain dicts, for an admin API or metrics.

A reload hands a group its new ``[[upstreams]]`` entry (`reconfigure`): servers
that stay keep their health, sessions and idle pool; new ones start up; removed
ones are *retired*: their idle pool is closed at once and their live WebSocket
sessions are paced out with close frames by a `core.drain.Drain` over
`retire_drain_timeout` seconds (the server sets it to ``[shutdown]
drain_timeout``; a group whose whole upstream was removed is retired with all its
servers, `retire_all`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from edgeproxy.config import Address, UpstreamConfig
from edgeproxy.core import http1
from edgeproxy.core.affinity import AffinityCodec, honour_pin, set_cookie_header
from edgeproxy.core.balance import Balancer, hash_key, least_loaded, parse_hash_source, request_cookies
from edgeproxy.core.drain import Drain
from edgeproxy.core.health import HealthBook, State
from edgeproxy.core.http1 import ClientSide, RequestHead
from edgeproxy.core.rebalance import RebalancePlanner, RebalancePolicy, close_reason
from edgeproxy.transport.edge import upstream_ssl_context

if TYPE_CHECKING:
    from edgeproxy.transport.downstream import ClientConnection
    from edgeproxy.transport.sse import ProxiedEventStream

log = logging.getLogger("edgeproxy")

#: seconds over which the sessions of a server removed by a reload are closed: the
#: closes go out in the first half (batches at least 0.5 s apart), the second half
#: leaves the closing handshakes time, as in `core.drain`
RETIRE_DRAIN_TIMEOUT = 10.0
RETIRE_REASON = "server removed; reconnect in {delay:.1f}s"
#: seconds before a background loop (health check, rebalancer) that failed is restarted
RESTART_DELAY = 1.0


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to an upstream server."""

    # Slots: one of these lives as long as its connection (see ClientConnection).
    __slots__ = (
        "group", "server", "high_water", "http", "owner", "transport", "websocket", "closed", "reused",
        "active", "idle_since", "_reading_paused",
    )

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

    def writelines(self, frames: list[bytes]) -> None:
        if not self.closed:
            self.transport.writelines(frames)

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


@dataclass(slots=True)
class Choice:
    """Where one request goes: `servers` to try in order, and the server its cookie named."""

    servers: list[Address]
    pinned: Address | None


class UpstreamGroup:
    """The servers of one `[[upstreams]]` entry: choice, health, live sessions and an idle pool per server."""

    def __init__(self, config: UpstreamConfig, *, high_water: int, rng: random.Random | None = None):
        self.rng = rng or random.Random()
        self._idle: dict[Address, deque[UpstreamConnection]] = {s: deque() for s in config.servers}
        self.health = HealthBook(config.health.thresholds, config.servers, config.drain)
        #: live WebSocket sessions per server (the client connections relaying them)
        self.sessions: dict[Address, set[ClientConnection]] = {s: set() for s in config.servers}
        #: sessions still open on servers a reload removed, while they are paced out
        self.retiring: dict[Address, set[ClientConnection]] = {}
        self._drains: list[Drain] = []
        self.planner: RebalancePlanner | None = None
        self._tasks: list[asyncio.Task] = []
        self._pacers: set[asyncio.Task] = set()
        self._started = False
        #: seconds over which a removed server's sessions are paced out (see `_retire`)
        self.retire_drain_timeout = RETIRE_DRAIN_TIMEOUT
        #: connects to this upstream in progress (for max_pending_connects)
        self.pending_connects = 0
        self._configure(config, high_water)

    def _configure(self, config: UpstreamConfig, high_water: int) -> None:
        """Everything derived from the config alone (per-server state is kept elsewhere)."""
        old = getattr(self, "config", None)
        self.config = config
        self.high_water = high_water
        self._weights = {s: config.weight(s) for s in config.servers}
        self.balancer = Balancer(config.balance, config.servers, self._weights)
        self._hash_source = parse_hash_source(config.hash_key) if config.balance == "hash" else None
        aff = config.affinity
        self.affinity = AffinityCodec(aff.secret, aff.max_age) if aff is not None else None
        self._tokens = {self.affinity.token(str(s)): s for s in config.servers} if self.affinity else {}
        if old is None or old.rebalance != config.rebalance:
            self.planner = RebalancePlanner(config.rebalance) if config.rebalance is not None else None
        #: close code and reconnect-delay range for sessions the proxy ends
        self._close_policy = config.rebalance or RebalancePolicy()
        #: TLS to the servers (None: plain TCP), and connects in progress (max_pending_connects)
        self.ssl_context = upstream_ssl_context(config)

    def connects_full(self) -> bool:
        """True when ``max_pending_connects`` connects to this upstream are in progress already."""
        limit = self.config.max_pending_connects
        return bool(limit) and self.pending_connects >= limit

    def _tls_args(self, server: Address) -> dict:
        if self.ssl_context is None:
            return {}
        return {"ssl": self.ssl_context, "server_hostname": self.config.tls_server_name or server.host}

    # -- choosing a server ----------------------------------------------------

    def loads(self) -> dict[Address, int]:
        return {server: len(conns) for server, conns in self.sessions.items()}

    def choose(self, head: RequestHead, client_ip: str, now: float) -> Choice | None:
        """The servers to try for `head`, best first; None when every server is down or draining."""
        eligible = self.health.eligible(now, self._weights)
        if not eligible:
            return None
        loads = self.loads()
        pinned = None
        if self.affinity is not None:
            check = self.affinity.verify(request_cookies(head).get(self.config.affinity.cookie), time.time())
            pinned = self._tokens.get(check.token)
        if pinned is not None and honour_pin(
            pinned, eligible, loads,
            threshold=self.config.affinity.rebalance_threshold,
            shedding=self.planner.shedding if self.planner is not None else frozenset(),
        ):
            first = pinned
        elif pinned is not None:
            first = least_loaded(eligible, loads, self.rng)  # give way
        else:
            key = hash_key(head, client_ip, self._hash_source) if self._hash_source else None
            first = self.balancer.pick(eligible, loads, self.rng, key)
        return Choice([first] + [s for s in self.config.servers if s in eligible and s != first], pinned)

    def cookie_header(self, choice: Choice, server: Address) -> list[tuple[bytes, bytes]]:
        """``[("Set-Cookie", ...)]`` when the client is not (validly) pinned to `server` yet, else []."""
        aff = self.config.affinity
        if aff is None or choice.pinned == server:
            return []
        value = self.affinity.issue(self.affinity.token(str(server)), time.time())
        header = set_cookie_header(
            aff.cookie, value, path=aff.path, domain=aff.domain, max_age=aff.max_age,
            secure=aff.secure, http_only=aff.http_only, same_site=aff.same_site,
        )
        return [(b"Set-Cookie", header)]

    def retry_after(self, now: float) -> int:
        """Seconds for the Retry-After of a 503 when no server can take the request."""
        interval = self.config.health.interval if self.config.health.check != "none" else 1.0
        return self.health.retry_after(now, interval)

    # -- passive health -----------------------------------------------------

    def connect_failed(self, server: Address, now: float) -> None:
        health = self.health.servers.get(server)
        if health is not None and health.passive_failure(now):
            log.warning(
                "upstream %s (%s) ejected for %.1fs after %d failures in a row",
                server, self.config.name, health.ejected_until - now,
                self.config.health.thresholds.max_fails,
            )

    def connect_ok(self, server: Address, now: float) -> None:
        health = self.health.servers.get(server)  # None: a reload removed it meanwhile
        if health is not None:
            health.passive_success(now)

    def response_status(self, server: Address, status: int, now: float) -> None:
        """A final response (or 101) from `server`: 5xx counts as a failure."""
        if status >= 500:
            self.connect_failed(server, now)
        else:
            self.connect_ok(server, now)

    # -- live WebSocket sessions ----------------------------------------------

    def session_opened(self, server: Address, conn: ClientConnection) -> None:
        sessions = self.sessions.get(server)
        if sessions is None:
            # Its handshake raced a reload that removed the server: the end of the
            # current pacing sweeps it up (see `_pace_out`).
            sessions = self.retiring.setdefault(server, set())
        sessions.add(conn)

    def session_closed(self, server: Address, conn: ClientConnection) -> None:
        sessions = self.sessions.get(server)
        if sessions is not None:
            sessions.discard(conn)
            return
        retiring = self.retiring.get(server)
        if retiring is not None:
            retiring.discard(conn)
            if not retiring:
                del self.retiring[server]
            for drain in self._drains:
                drain.forget(conn)

    def _close_sessions(self, server: Address, count: int | None = None) -> int:
        """End `count` (default: all) live sessions on `server` with 1012/1013 and a reconnect delay."""
        conns = list(self.sessions[server])
        if count is not None and count < len(conns):
            conns = self.rng.sample(conns, count)
        for conn in conns:
            self.session_closed(server, conn)
            code, reason = close_reason(self._close_policy, self.rng)
            conn.close_websocket(code, reason)
        return len(conns)

    def set_drain(self, server: Address, drain: bool) -> None:
        """Stop (or resume) sending new connections to `server`; for an admin API or a reload."""
        self.health[server].drain = drain

    # -- reload ------------------------------------------------------------------

    def reconfigure(self, config: UpstreamConfig, *, high_water: int, now: float) -> list[Address]:
        """Apply a reloaded ``[[upstreams]]`` entry of the same name; returns the removed servers.

        Servers that stay keep their health state, live sessions and idle pool;
        new servers start up with empty pools; removed ones are retired (idle
        pool closed, live WebSockets paced out).  Balancing, affinity, the
        rebalancer (kept when its policy is unchanged) and the active checks
        follow the new entry; timeouts and pool sizes apply from the next use.
        """
        self._configure(config, high_water)
        removed = self.health.update(config.health.thresholds, config.servers, config.drain)
        for server in config.servers:
            self._idle.setdefault(server, deque())
            self.sessions.setdefault(server, set())
        self._retire(removed, now)
        if self._started:  # the checks and the rebalancer follow the new servers and settings
            self._stop_tasks()
            self.start()
        return removed

    def retire_all(self, now: float) -> None:
        """The whole upstream left the config: stop its tasks and retire every server."""
        self._stop_tasks()
        self._started = False
        self._retire(list(self.sessions), now)

    @property
    def retired(self) -> bool:
        """True once nothing of a retired group is left (no sessions, no pacing)."""
        return not self.sessions and not self.retiring and not self._pacers

    def _retire(self, servers: list[Address], now: float) -> None:
        conns: list[ClientConnection] = []
        for server in servers:
            for conn in self._idle.pop(server, ()):
                conn.close()
            sessions = self.sessions.pop(server, set())
            if sessions:
                self.retiring.setdefault(server, set()).update(sessions)
                conns += sessions
            log.info("upstream %s: server %s removed; pacing out its %d WebSocket sessions", self.config.name, server, len(sessions))
        if not conns:
            return
        policy = self._close_policy
        drain = Drain(
            now, conns, self.retire_drain_timeout, rng=self.rng, close_code=policy.close_code,
            reconnect_hint=(policy.delay_min, policy.delay_max), reason_format=RETIRE_REASON,
        )
        self._drains.append(drain)
        task = asyncio.get_running_loop().create_task(self._pace_out(drain))
        self._pacers.add(task)
        task.add_done_callback(self._pacers.discard)

    async def _pace_out(self, drain: Drain) -> None:
        """Send the drain's close frames as its batches fall due (one task per reload, not per session)."""
        loop = asyncio.get_running_loop()
        try:
            while not drain.done:
                await asyncio.sleep(max(0.0, drain.next_batch_at - loop.time()))
                for conn, code, reason in drain.due(loop.time()):
                    conn.close_websocket(code, reason)
            # Sessions whose handshake finished after the drain was planned: close them now.
            policy = self._close_policy
            for sessions in list(self.retiring.values()):
                for conn in list(sessions):
                    conn.close_websocket(*close_reason(policy, self.rng))
        finally:
            self._drains.remove(drain)

    # -- loop tasks: active checks and the rebalancer ----------------------------

    def start(self) -> None:
        """Start the active checks and the rebalancer, when configured (needs a running loop)."""
        loop = asyncio.get_running_loop()
        self._started = True
        if self.config.health.check != "none":
            self._tasks += [
                loop.create_task(self._supervise(f"the health check of {server}", partial(self._check_loop, server)))
                for server in self.config.servers
            ]
        if self.planner is not None:
            self._tasks.append(loop.create_task(self._supervise("the rebalancer", self._rebalance_loop)))

    async def _supervise(self, what: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run a background loop; a bug in it is logged and the loop restarted, never silently lost."""
        while True:
            try:
                await run()
                return
            except Exception:  # CancelledError is not an Exception: stop() still ends it
                log.exception("upstream %s: %s failed; restarting it in %.0f s", self.config.name, what, RESTART_DELAY)
                await asyncio.sleep(RESTART_DELAY)

    def stop(self) -> None:
        self._stop_tasks()
        for task in self._pacers:
            task.cancel()

    def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()

    async def _check_loop(self, server: Address) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config.health
        health = self.health[server]
        while True:
            ok = await self._probe(server)
            now = loop.time()
            if health.active_result(ok, now):
                if health.active_up:
                    log.warning("upstream %s (%s) is up again (%d checks passed)", server, self.config.name, cfg.thresholds.rise)
                else:
                    closed = self._close_sessions(server)
                    log.warning(
                        "upstream %s (%s) is down (%d checks failed); closed %d WebSocket sessions",
                        server, self.config.name, cfg.thresholds.fall, closed,
                    )
            await asyncio.sleep(cfg.interval)

    async def _probe(self, server: Address) -> bool:
        """One active check: TCP connect, or GET `path` answered with 2xx/3xx, within `timeout`."""
        cfg = self.config.health
        writer = None
        try:
            async with asyncio.timeout(cfg.timeout):
                reader, writer = await asyncio.open_connection(server.host, server.port, **self._tls_args(server))
                if cfg.check == "tcp":
                    return True
                client = ClientSide()
                head = RequestHead(b"GET", cfg.path.encode(), b"1.1", [])
                headers = [(b"Host", str(server).encode()), (b"User-Agent", b"edgeproxy-health"), (b"Connection", b"close")]
                writer.write(client.send_request(head, headers) + client.send_end())
                while True:
                    client.receive_data(await reader.read(65536))
                    event = client.next_event()
                    if isinstance(event, http1.ResponseHead) and event.status >= 200:
                        return event.status < 400
                    if event is not http1.NEED_DATA and not isinstance(event, http1.ResponseHead):
                        return False
        except (OSError, TimeoutError, http1.RemoteProtocolError):  # ssl.SSLError is an OSError
            return False
        finally:
            if writer is not None:
                writer.transport.abort()

    async def _rebalance_loop(self) -> None:
        loop = asyncio.get_running_loop()
        planner = self.planner
        while True:
            await asyncio.sleep(planner.policy.interval)
            now = loop.time()
            draining = {s for s, h in self.health.servers.items() if h.drain}
            plan = planner.plan(now, self.health.eligible(now, self._weights), self.loads(), draining)
            for server, count in plan.items():
                self._close_sessions(server, count)
            if plan:
                log.info(
                    "upstream %s: rebalancing, max/mean %.2f, closed %s",
                    self.config.name, planner.last_ratio, ", ".join(f"{n} on {s}" for s, n in plan.items()),
                )

    # -- visibility ------------------------------------------------------------

    def snapshot(self, now: float | None = None) -> dict:
        """Per-server live connections and state as plain data (for an admin API or metrics)."""
        if now is None:
            now = asyncio.get_running_loop().time()
        servers = []
        for server in self.config.servers:
            health = self.health[server]
            state = health.state(now)
            servers.append({
                "address": str(server),
                "state": state.value,
                "connections": len(self.sessions[server]),
                "weight": self._weights[server],
                "effective_weight": round(self._weights[server] * health.weight_factor(now), 3)
                if state in (State.UP, State.SLOW_START) else 0.0,
                "drain": health.drain,
                "ejections": health.ejections,
            })
        out = {"name": self.config.name, "balance": self.config.balance, "servers": servers}
        if self.planner is not None:
            out["rebalance"] = {
                "ratio": round(self.planner.last_ratio, 3),
                "shedding": sorted(str(s) for s in self.planner.shedding),
                "closed_total": self.planner.closed_total,
            }
        return out

    def take_idle(self, server: Address, now: float) -> UpstreamConnection | None:
        """A pooled keep-alive connection to `server`, most recently used first."""
        idle = self._idle.get(server, ())
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
        idle = self._idle.get(conn.server)  # None: a reload removed the server
        if conn.closed or idle is None or len(idle) >= self.config.pool_size:
            conn.close()
            return
        conn.http.start_next_cycle()
        conn.idle_since = now
        idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        try:
            self._idle[conn.server].remove(conn)
        except (KeyError, ValueError):
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
        self.pending_connects += 1
        try:
            _, conn = await loop.create_connection(
                lambda: UpstreamConnection(self, server, self.high_water), server.host, server.port,
                **self._tls_args(server),
            )
        finally:
            self.pending_connects -= 1
        return conn


class UpstreamUnavailable(Exception):
    """No upstream connection for a request: answer ``status`` (with ``headers``); ``reason`` is for the metrics."""

    def __init__(self, status: int, message: str, reason: str, headers: list[tuple[bytes, bytes]] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.headers = list(headers)


class UpstreamRequest:
    """One client request on its way to an upstream: what `lease` and the timer checks read.

    The HTTP/1.1 exchange and the HTTP/2 stream add their own fields to it.
    """

    __slots__ = (
        "head", "route", "group", "upstream", "pending", "request_done", "status", "bytes_out", "started",
        "deadline", "task", "retried", "connect_deadline", "connect_timed_out", "choice",
        "max_body", "body_bytes", "body_deadline", "sse",
    )

    def __init__(self, head, route, group, started: float):
        self.head = head
        self.route = route
        self.group = group
        self.upstream: UpstreamConnection | None = None
        #: body bytes that came before the upstream connection
        self.pending: list[bytes] = []
        self.request_done = False
        self.status = 0
        self.bytes_out = 0
        self.started = started
        #: when the response must have come (the upstream's read_timeout; 0 = not waiting)
        self.deadline = 0.0
        self.task: asyncio.Task | None = None
        self.retried = False
        #: while a connect attempt runs: when the tick cancels it (0 = never)
        self.connect_deadline = 0.0
        self.connect_timed_out = False
        #: where the balancer sent this request (and the server its cookie named)
        self.choice = None
        #: the largest request body allowed (0 = unlimited), the body bytes so far, and
        #: when the next ones are due (http.body_timeout; 0 = not waiting)
        self.max_body = 0
        self.body_bytes = 0
        self.body_deadline = 0.0
        #: the response is an event stream (`transport.sse`): its own timers, signals and drain
        self.sse: ProxiedEventStream | None = None


def _choose(exchange, client_ip: str, now: Callable[[], float]) -> Choice:
    group = exchange.group
    exchange.choice = choice = group.choose(exchange.head, client_ip, now())
    if choice is None:
        log.warning("upstream %s: no server can take connections (all down or draining)", group.config.name)
        raise UpstreamUnavailable(503, f"upstream {group.config.name!r} has no available server",
                                  "upstream_unreachable", [(b"Retry-After", b"%d" % group.retry_after(now()))])
    return choice


def lease_idle(exchange, client_ip: str, *, now: Callable[[], float]) -> UpstreamConnection | None:
    """`lease`'s first step without a task: the balancer's choice, and its pooled connection if one waits.

    With None, ``lease(..., chosen=True)`` goes on from the same choice (connect, fallbacks).

    Raises:
        UpstreamUnavailable: every server is down or draining (503).
    """
    choice = _choose(exchange, client_ip, now)
    return exchange.group.take_idle(choice.servers[0], now())


async def lease(exchange, client_ip: str, *, pooled: bool, metrics, loop: asyncio.AbstractEventLoop,
                now: Callable[[], float], chosen: bool = False) -> UpstreamConnection:
    """A connection for one request: the balancer's choice, then its fallbacks, pooled ones first.

    Shared by the HTTP/1.1 and HTTP/2 client sides.  ``exchange`` carries the
    request (``head``, ``group``) and the connect deadline the caller's timer
    tick enforces: it sets ``connect_deadline`` here and ``connect_timed_out``
    before cancelling this task, which then goes on with the next server.
    ``chosen``: `lease_idle` made the choice already (and found no pooled connection).

    Raises:
        UpstreamUnavailable: every server is down (503), the group is busy (503),
            or none accepted (502, or 504 after a connect timeout).
    """
    group = exchange.group
    choice = exchange.choice if chosen else _choose(exchange, client_ip, now)
    failure = "refused"
    for address in choice.servers:
        if pooled:
            conn = group.take_idle(address, now())
            if conn is not None:
                return conn
        if group.connects_full():
            metrics.limit_refused("max_pending_connects")
            raise UpstreamUnavailable(503, f"upstream {group.config.name!r} is busy", "overloaded",
                                      [(b"Retry-After", b"1")])
        connect_timeout = group.config.connect_timeout
        exchange.connect_deadline = now() + connect_timeout if connect_timeout else 0.0
        try:
            return await group.connect(address, loop)
        except asyncio.CancelledError:
            if not exchange.connect_timed_out:
                raise  # the client went away, or the exchange was dropped
            # the caller's tick cancelled this attempt: it took longer than connect_timeout
            exchange.connect_timed_out = False
            asyncio.current_task().uncancel()
            failure = "timeout"
            log.warning("upstream %s (%s) did not accept within connect_timeout", address, group.config.name)
        except OSError as exc:
            failure = "refused"
            log.warning("upstream %s (%s) refused or unreachable: %s", address, group.config.name, exc)
        finally:
            exchange.connect_deadline = 0.0
        group.connect_failed(address, now())
    if failure == "timeout":
        raise UpstreamUnavailable(504, f"upstream {group.config.name!r} is unavailable (timeout)", "upstream_timeout")
    raise UpstreamUnavailable(502, f"upstream {group.config.name!r} is unavailable (refused)", "upstream_unreachable")

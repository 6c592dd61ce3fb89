"""Counters, gauges and histograms for the five WebSocket signals, in Prometheus text.

Theory of operation
-------------------
The relay's hot path must not pay for observability, so the transport never
touches prometheus-client objects (each of which takes a lock per update). It
adds to plain ints in dicts keyed by strings or tuples, and observations go into
:class:`Histogram` (a tuple of bounds, a list of counts, one ``bisect``).
Nothing is formatted until a scrape: the registry's collector reads the ints and
builds metric families then, and :meth:`Metrics.render` encodes them with
prometheus-client's ``generate_latest``.

Per-message counting costs nothing extra: the relay already counts messages and
bytes per connection. The transport folds a connection's totals in with
:meth:`Metrics.add_messages` when it closes, and the ``live_messages`` callback
(set by the server, called at scrape time) adds what the open connections have
relayed so far. A counter (folded + live) never goes down, because a
connection's totals move from live to folded in the same callback that removes
it from the open set.

Everything runs on the event-loop thread, so nothing is locked.

Labels are bounded. ``protocol``, ``route``, ``upstream`` and ``server`` come
from the configuration; outcome reasons, close-code classes and status classes
come from the fixed tables below, and anything unknown becomes ``"other"``, so
a caller's bug cannot multiply the series. No label ever names a client.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from edgeproxy import __version__
from edgeproxy.core import _accel

__all__ = [
    "CLIENT_TO_UPSTREAM",
    "CONTENT_TYPE",
    "DIRECTIONS",
    "DURATION_BUCKETS",
    "FAILURE_REASONS",
    "HTTP",
    "HUB_DELIVERY",
    "Histogram",
    "LAG_WINDOW",
    "Metrics",
    "UPSTREAM_TO_CLIENT",
    "WEBSOCKET",
    "close_code_class",
    "route_label",
]

#: The classic text format: every name here is a legacy-valid Prometheus name, so
#: the output is the same in 0.0.4 and 1.0.0, and 0.0.4 is what every scraper reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

HTTP = "http"
WEBSOCKET = "websocket"
#: a Server-Sent Events stream (a hub's ``/sse`` endpoint, or a proxied ``text/event-stream``
#: response, `transport.sse`), counted like a WebSocket session.  Issue #17 calls this label
#: ``transport="sse"``: here it is the ``protocol`` label, as for every other kind.
SSE = "sse"
PROTOCOLS = (HTTP, WEBSOCKET, SSE)
#: the outcome counted by `connection_opened`, per protocol
_OPENED_OUTCOME = {HTTP: "accepted", WEBSOCKET: "upgraded", SSE: "streamed"}

CLIENT_TO_UPSTREAM = "client_to_upstream"
UPSTREAM_TO_CLIENT = "upstream_to_client"
HUB_DELIVERY = "hub_delivery"
DIRECTIONS = (CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT, HUB_DELIVERY)

#: the health states of an upstream server (`core.health.State` values)
UPSTREAM_STATES = ("up", "slow_start", "down", "draining")
#: what /readyz can say (`ProxyServer.readiness`): draining is a roll or a stop, unhealthy an outage
READY_STATES = ("ready", "starting", "draining", "unhealthy")

#: why a connection was refused (the proxy or upstream said no) or failed (it broke)
FAILURE_REASONS = frozenset({
    "no_route",              # no route matched the request
    "bad_handshake",         # the client's upgrade request is invalid (400)
    "upstream_refused",      # the upstream answered the upgrade with a non-101 response
    "upstream_unreachable",  # connect refused or unreachable (502)
    "upstream_timeout",      # no connect or no handshake answer in time (504)
    "upstream_invalid",      # invalid 101 (bad Sec-WebSocket-Accept) or broken response
    "client_gone",           # the client left during the handshake
    "draining",              # the proxy is shutting down
    "overloaded",            # a connection or memory limit was hit
    "forbidden_origin",      # the Origin is not in the route's allowed_origins (403)
    "other",
})

#: what `Metrics.limit_refused` counts: admission, PROXY protocol and per-session limits
LIMIT_REASONS = frozenset({
    "max_connections", "max_connections_per_ip", "rate", "ip_rate",    # admission (503)
    "ip_table_full",                                                   # admission, workers > 1 (503)
    "untrusted_source", "bad_proxy_header", "proxy_header_timeout",    # PROXY protocol (closed)
    "forbidden_origin",                                                # 403
    "max_pending_connects",                                            # 503, per upstream
    "rate_close", "rate_throttle",                                     # WebSocket message/byte rates
    "route_rate", "max_body_size", "body_timeout",                     # HTTP requests: 429, 413, 408
})

#: why an HTTP response that had begun was cut (the client sees a reset, never a complete-looking body)
TRUNCATION_REASONS = frozenset({
    "upstream_timeout",  # the upstream's body stalled for read_timeout
    "upstream_invalid",  # the upstream closed early or sent a broken body
    "max_body_size",     # the client's (chunked) body passed the limit after the response began
    "body_timeout",      # the client's body stalled for body_timeout after the response began
    "client_invalid",    # the client's body framing broke after the response began
})

#: where a request's X-Request-Id came from (`core.http1.request_id`)
REQUEST_ID_OUTCOMES = ("kept", "generated", "replaced")

#: 1 s .. 24 h; dense from 4 to 20 minutes, where NAT and load-balancer idle
#: timeouts sit (Azure LB 240 s, AWS NAT gateway 350 s, many CPEs 5-15 min).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 240, 300, 360, 600, 900, 1200, 1800, 3600, 7200, 21600, 43200, 86400)
PING_RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

#: close codes an operator reads at a glance; 3000-4999 are the application's own
_NAMED_CLOSE_CODES = (1000, 1001, 1002, 1006, 1008, 1009, 1011, 1012, 1014)
_CLOSE_CLASS: dict[int | None, str] = {code: str(code) for code in _NAMED_CLOSE_CODES}
_CLOSE_CLASS[None] = "abnormal"
#: the class of an HTTP connection's end: HTTP has no close codes
_HTTP_CLOSE_CLASS = "none"

#: seconds a loop-lag sample stays visible (at least)
LAG_WINDOW = 10.0

_STATUS_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")

#: why the proxy ended an HTTP/2 connection with an error GOAWAY (`core.http2.ERROR_REASONS`)
HTTP2_ERRORS = ("rapid_reset", "control_flood", "continuation_flood", "header_list_too_large", "too_many_streams",
                "flow_control", "protocol_error")


def close_code_class(code: int | None) -> str:
    """The ``close_code`` label for a WebSocket close code (None: no close frame seen)."""
    named = _CLOSE_CLASS.get(code)
    if named is not None:
        return named
    return "application" if 3000 <= code <= 4999 else "other"


def route_label(host: str | None, path_prefix: str) -> str:
    """The ``route`` label of a configured route: ``host`` (or ``*``) then the prefix."""
    return f"{host or '*'}{path_prefix}"


class Histogram:
    """Counts per bucket, a sum and nothing else: ``observe`` is one bisect and two adds.

    ``counts[i]`` holds observations ``<= bounds[i]`` (and above the bound before
    it); the last slot is ``+Inf``. Prometheus wants cumulative counts, made at
    scrape time by :meth:`cumulative`.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Iterable[float]):
        self.bounds = tuple(sorted(float(b) for b in bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, count <= le), ...]`` ending with ``("+Inf", total count)``."""
        out = []
        running = 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append((_format_bound(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


def _format_bound(bound: float) -> str:
    """``le`` values as Prometheus clients write them: 300.0, 0.005."""
    return repr(float(bound))


class Metrics:
    """The proxy's metrics. The transport calls the methods; a scrape reads them.

    Callbacks the server sets (each called at scrape or snapshot time only):

    * ``live_messages() -> iterable of (direction, messages, bytes)``: what the
      open connections have relayed and not yet folded in with `add_messages`.
    * ``upstream_servers() -> iterable of dicts`` with at least ``upstream``,
      ``server`` and ``up`` (True, False, or None when nothing checks health).
    * ``relay_engine() -> dict``: the relay engine's counters (``RelayEngine.stats``).
    * ``readiness() -> (state, why)``: one of `READY_STATES` and what /readyz says.

    ``event_loop`` names the loop for ``edgeproxy_build_info``.
    """

    def __init__(self, *, event_loop: str = "unknown", process: bool = True):
        self.event_loop = event_loop
        self.live_messages: Callable[[], Iterable[tuple[str, int, int]]] | None = None
        self.upstream_servers: Callable[[], Iterable[dict[str, Any]]] | None = None
        self.relay_engine: Callable[[], dict[str, int]] | None = None
        self.readiness: Callable[[], tuple[str, str]] | None = None
        # worst loop lag of the current and the previous window (see loop_lag)
        self._lag_current = 0.0
        self._lag_previous = 0.0
        self._lag_window_start = 0.0
        # (protocol, route, upstream, server) -> open connections
        self.active: dict[tuple[str, str, str, str], int] = {}
        self.opened: dict[str, int] = dict.fromkeys(PROTOCOLS, 0)
        # (protocol, outcome, reason) -> count, for refused and failed connections
        self.not_opened: dict[tuple[str, str, str], int] = {}
        self.messages: dict[str, int] = dict.fromkeys(DIRECTIONS, 0)
        self.message_bytes: dict[str, int] = dict.fromkeys(DIRECTIONS, 0)
        self.heartbeat_failures = 0
        #: resume attempts handed to the sibling worker that parks their session
        self.resume_handoffs = 0
        self.ping_rtt_seconds = Histogram(PING_RTT_BUCKETS)
        # protocol -> close-code class -> histogram
        self.durations: dict[str, dict[str, Histogram]] = {p: {} for p in PROTOCOLS}
        self.requests = [0] * len(_STATUS_CLASSES)
        self.request_seconds = [Histogram(REQUEST_BUCKETS) for _ in _STATUS_CLASSES]
        self.fanout_publishes = 0
        self.fanout_subscribers_dropped = 0
        self.backplane_sent = 0
        self.backplane_received = 0
        self.backplane_errors = 0
        #: [admission] scope = "cluster": 1 while the fleet's budget is unreachable (local share), and
        #: how many times that began
        self.admission_fallback_active = 0
        self.admission_fallbacks = 0
        #: glibc heap trims (`transport.heap`) and the seconds they took
        self.heap_trims = 0
        self.heap_trim_seconds = 0.0
        #: limit reason -> times it stopped a connection, session or read (LIMIT_REASONS)
        self.limits: dict[str, int] = {}
        #: truncation reason -> HTTP responses cut after they began (TRUNCATION_REASONS)
        self.truncated: dict[str, int] = {}
        #: X-Request-Id outcome -> requests (REQUEST_ID_OUTCOMES)
        self.request_ids: dict[str, int] = dict.fromkeys(REQUEST_ID_OUTCOMES, 0)
        #: HTTP/2 client connections (also counted as "http" connections) and their streams
        self.http2_connections = 0
        self.http2_streams = 0
        #: WebSocket sessions opened on HTTP/2 streams (RFC 8441), and those open now; they
        #: are protocol="websocket" in the connection signals too
        self.http2_websockets = 0
        self.http2_websockets_active = 0
        #: HTTP2_ERRORS reason -> connections the proxy ended with an error GOAWAY
        self.http2_errors: dict[str, int] = dict.fromkeys(HTTP2_ERRORS, 0)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        if process:
            # process_* with our prefix: edgeproxy_process_resident_memory_bytes, cpu, fds
            # (reads /proc, so present on Linux only).
            ProcessCollector(namespace="edgeproxy", registry=self.registry)

    # -- connections ---------------------------------------------------------

    def connection_opened(self, protocol: str, route: str, upstream: str, server: str) -> tuple[str, str, str, str]:
        """Count a connection as open; returns the key to hand to `connection_closed`.

        Args:
            protocol: ``"http"`` (a client connection, at accept; route,
                upstream and server are then ``""``), ``"websocket"`` (a
                session, after the upstream's 101) or ``"sse"`` (an event
                stream: a hub's, or a proxied response as its head goes out;
                the HTTP connection carrying a proxied one stays counted too).
            route: `route_label` of the matched route.
            upstream: the upstream's name.
            server: the upstream server, ``str(Address)``.
        """
        key = (protocol, route, upstream, server)
        active = self.active
        active[key] = active.get(key, 0) + 1
        self.opened[protocol] += 1
        return key

    def connection_closed(self, key: tuple[str, str, str, str], duration: float, close_code: int | None = None) -> None:
        """Count a connection opened with `connection_opened` as closed.

        Args:
            key: what `connection_opened` returned.
            duration: seconds it was open (for a WebSocket: since the 101).
            close_code: the close code the client saw (sent by the upstream or
                by the proxy), None if the session ended without a close
                frame. Ignored for HTTP.
        """
        self.active[key] -= 1
        protocol = key[0]
        label = close_code_class(close_code) if protocol == WEBSOCKET else _HTTP_CLOSE_CLASS
        by_class = self.durations[protocol]
        histogram = by_class.get(label)
        if histogram is None:
            histogram = by_class[label] = Histogram(DURATION_BUCKETS)
        histogram.observe(duration)

    def connection_refused(self, protocol: str, reason: str) -> None:
        """The proxy or the upstream said no (e.g. 404, 400, a non-101 answer)."""
        self._not_opened(protocol, "refused", reason)

    def connection_failed(self, protocol: str, reason: str) -> None:
        """The connection broke before it opened (unreachable, timeout, bad 101)."""
        self._not_opened(protocol, "failed", reason)

    def _not_opened(self, protocol: str, outcome: str, reason: str) -> None:
        key = (protocol, outcome, reason if reason in FAILURE_REASONS else "other")
        self.not_opened[key] = self.not_opened.get(key, 0) + 1

    def limit_refused(self, reason: str) -> None:
        """A limit of the edge hardening stopped something (see `LIMIT_REASONS`)."""
        key = reason if reason in LIMIT_REASONS else "other"
        self.limits[key] = self.limits.get(key, 0) + 1

    def http2_error(self, reason: str) -> None:
        """An HTTP/2 connection ended by the proxy for abuse or a protocol error (`HTTP2_ERRORS`)."""
        key = reason if reason in self.http2_errors else "protocol_error"
        self.http2_errors[key] += 1

    # -- traffic -------------------------------------------------------------

    def add_messages(self, direction: str, count: int, nbytes: int) -> None:
        """Fold in ``count`` messages of ``nbytes`` bytes in all, in one of `DIRECTIONS`."""
        self.messages[direction] += count
        self.message_bytes[direction] += nbytes

    def request_done(self, status: int, seconds: float) -> None:
        """One HTTP exchange answered with ``status`` after ``seconds``."""
        index = status // 100
        if not 1 <= index <= 5:
            index = 0
        self.requests[index] += 1
        self.request_seconds[index].observe(seconds)

    def response_truncated(self, reason: str) -> None:
        """An HTTP response that had begun was cut (see `TRUNCATION_REASONS`)."""
        key = reason if reason in TRUNCATION_REASONS else "other"
        self.truncated[key] = self.truncated.get(key, 0) + 1

    def request_id(self, outcome: str) -> None:
        """A request's X-Request-Id was kept, generated or replaced."""
        self.request_ids[outcome] += 1

    def heartbeat_failed(self) -> None:
        """A peer did not answer a ping in time."""
        self.heartbeat_failures += 1

    def ping_rtt(self, seconds: float) -> None:
        """A pong arrived ``seconds`` after its ping."""
        self.ping_rtt_seconds.observe(seconds)

    def loop_lag(self, seconds: float, now: float) -> None:
        """A periodic callback ran ``seconds`` late at loop time ``now``.

        The gauge shows the worst lag of the last `LAG_WINDOW` to 2 x `LAG_WINDOW`
        seconds, not the last sample: a 300 ms stall between two scrapes must
        still be visible at the next scrape, after later ticks were on time.
        """
        if now - self._lag_window_start >= LAG_WINDOW:
            self._lag_previous = self._lag_current
            self._lag_current = 0.0
            self._lag_window_start = now
        if seconds > self._lag_current:
            self._lag_current = seconds

    @property
    def event_loop_lag(self) -> float:
        """Seconds: the worst loop lag seen recently (see `loop_lag`)."""
        return max(self._lag_current, self._lag_previous)

    # -- fan-out and backplane ------------------------------------------------

    def fanout_published(self, deliveries: int, nbytes: int, publications: int = 1) -> None:
        """``publications`` hub messages, ``nbytes`` in all, written to ``deliveries`` subscribers.

        More than one publication when the hub coalesced a burst into one write.
        """
        self.fanout_publishes += publications
        self.messages[HUB_DELIVERY] += deliveries * publications
        self.message_bytes[HUB_DELIVERY] += deliveries * nbytes

    def fanout_written(self, deliveries: int, nbytes: int, publications: int) -> None:
        """Fan-out totals: ``deliveries`` messages and ``nbytes`` bytes written in all, of
        which ``publications`` were not counted yet (the SSE copy of a publication the
        WebSocket fan-out counted is not counted again)."""
        self.fanout_publishes += publications
        self.messages[HUB_DELIVERY] += deliveries
        self.message_bytes[HUB_DELIVERY] += nbytes

    def fanout_subscriber_dropped(self) -> None:
        """A subscriber passed its buffer high-water mark and was dropped."""
        self.fanout_subscribers_dropped += 1

    def backplane_message_sent(self, count: int = 1) -> None:
        self.backplane_sent += count

    def backplane_message_received(self, count: int = 1) -> None:
        self.backplane_received += count

    def backplane_failed(self) -> None:
        """A backplane operation failed (lost connection, publish error)."""
        self.backplane_errors += 1

    def admission_fallback(self, active: bool) -> None:
        """The fleet's connection budget became unreachable (True) or reachable again (False)."""
        self.admission_fallback_active = int(active)
        self.admission_fallbacks += int(active)

    def heap_trimmed(self, seconds: float) -> None:
        """Freed C-heap memory was given back to the kernel (malloc_trim), in ``seconds``."""
        self.heap_trims += 1
        self.heap_trim_seconds += seconds

    # -- reading -------------------------------------------------------------

    def message_totals(self) -> tuple[dict[str, int], dict[str, int]]:
        """(messages, bytes) per direction: folded totals plus the live connections'."""
        messages = dict(self.messages)
        nbytes = dict(self.message_bytes)
        if self.live_messages is not None:
            for direction, count, size in self.live_messages():
                messages[direction] += count
                nbytes[direction] += size
        return messages, nbytes

    def active_by(self, field: str) -> dict[str, int]:
        """Open connections summed by one of protocol, route, upstream or server."""
        index = ("protocol", "route", "upstream", "server").index(field)
        out: dict[str, int] = {}
        for key, n in self.active.items():
            if n:
                out[key[index]] = out.get(key[index], 0) + n
        return out

    def opened_total(self, protocol: str) -> int:
        """Every connection attempt of ``protocol``: opened, refused or failed."""
        failed = sum(n for (p, _, _), n in self.not_opened.items() if p == protocol)
        return self.opened[protocol] + failed

    def snapshot(self) -> dict[str, Any]:
        """The five signals as plain JSON-able totals (the dashboard derives rates)."""
        messages, _ = self.message_totals()
        lifetimes = [0] * (len(DURATION_BUCKETS) + 1)
        for histogram in [*self.durations[WEBSOCKET].values(), *self.durations[SSE].values()]:
            lifetimes = [a + b for a, b in zip(lifetimes, histogram.counts)]
        active = self.active_by("protocol")
        return {
            "connections_active": {p: active.get(p, 0) for p in PROTOCOLS},
            "connections_opened": {p: self.opened_total(p) for p in PROTOCOLS},
            "messages": messages,
            "heartbeat_failures": self.heartbeat_failures,
            "lifetime_buckets": list(DURATION_BUCKETS),
            "lifetime_counts": lifetimes,
            "implementation": _accel.IMPLEMENTATION,
        }

    def render(self) -> bytes:
        """The Prometheus text exposition (content type `CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _Collector:
    """Turns a `Metrics` into metric families, at scrape time only."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        m = self.metrics
        info = InfoMetricFamily("edgeproxy_build", "edgeproxy version, frame implementation and event loop")
        info.add_metric([], {"version": __version__, "implementation": _accel.IMPLEMENTATION, "event_loop": m.event_loop})
        yield info
        yield GaugeMetricFamily(
            "edgeproxy_compiled_extension_active",
            "1 when the compiled frame code (edgeproxy._speedups) is in use, 0 in pure-Python mode",
            value=1 if _accel.SPEEDUPS else 0,
        )
        if m.readiness is not None:
            current = m.readiness()[0]
            ready = GaugeMetricFamily(
                "edgeproxy_ready_state",
                "1 for what /readyz says: ready, starting, draining (a roll or a stop) or unhealthy (an outage)",
                labels=["state"],
            )
            for state in READY_STATES:
                ready.add_metric([state], 1 if state == current else 0)
            yield ready
        yield from self._connections(m)
        yield from self._traffic(m)
        yield from self._http(m)
        yield from self._fanout(m)
        yield from self._upstreams(m)
        yield from self._http2(m)
        limits = CounterMetricFamily(
            "edgeproxy_limits", "Connections, sessions or reads stopped by a limit, by limit", labels=["limit"],
        )
        for reason, n in sorted(m.limits.items()):
            limits.add_metric([reason], n)
        yield limits
        yield GaugeMetricFamily(
            "edgeproxy_event_loop_lag_seconds",
            "Worst delay of the periodic loop callback over the last 10-20 s: time the loop was busy elsewhere",
            value=m.event_loop_lag,
        )
        yield from self._relay_engine(m)
        yield CounterMetricFamily("edgeproxy_heap_trims", "Times freed C-heap memory was given back to the kernel (malloc_trim)",
                                  value=m.heap_trims)
        yield CounterMetricFamily("edgeproxy_heap_trim_seconds", "Time spent in those heap trims, on the event loop",
                                  value=m.heap_trim_seconds)

    #: RelayEngine.stats() key -> (metric, help); a key the engine in use lacks is not exported
    _ENGINE_COUNTERS = {
        "pairs": ("edgeproxy_relay_engine_sessions", "Relayed WebSocket sessions handed to the relay engine after the 101"),
        "fallbacks": ("edgeproxy_relay_engine_fallbacks",
                      "Of those, sessions the compiled engine left on the event loop (TLS, or bytes still queued)"),
        "turns": ("edgeproxy_relay_engine_turns", "Times the event loop ran the relay engine"),
        "reads": ("edgeproxy_relay_engine_reads", "Reads the relay engine made below the event loop"),
        "writes": ("edgeproxy_relay_engine_writes", "Writes the relay engine made below the event loop"),
    }

    def _relay_engine(self, m: Metrics) -> Iterator[Any]:
        stats = m.relay_engine() if m.relay_engine is not None else None
        if not stats:
            return
        yield GaugeMetricFamily("edgeproxy_relay_engine_sockets",
                                "Sockets the compiled relay engine holds below the event loop (two per session)",
                                value=stats["sockets"])
        for key, (name, text) in self._ENGINE_COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(name, text, value=stats[key])

    @staticmethod
    def _connections(m: Metrics) -> Iterator[Any]:
        active = GaugeMetricFamily(
            "edgeproxy_connections_active", "Open connections",
            labels=["protocol", "route", "upstream", "server"],
        )
        for key, n in m.active.items():
            active.add_metric(list(key), n)
        yield active
        opened = CounterMetricFamily(
            "edgeproxy_connections_opened", "Connection attempts by outcome (accepted, upgraded, refused, failed)",
            labels=["protocol", "outcome", "reason"],
        )
        for protocol, n in m.opened.items():
            opened.add_metric([protocol, _OPENED_OUTCOME[protocol], ""], n)
        for key, n in m.not_opened.items():
            opened.add_metric(list(key), n)
        yield opened
        durations = HistogramMetricFamily(
            "edgeproxy_connection_duration_seconds",
            "How long connections lived, by protocol and close-code class (a ceiling reveals a NAT timeout)",
            labels=["protocol", "close_code"],
        )
        for protocol, by_class in m.durations.items():
            for label, histogram in by_class.items():
                durations.add_metric([protocol, label], histogram.cumulative(), histogram.total)
        yield durations

    @staticmethod
    def _traffic(m: Metrics) -> Iterator[Any]:
        messages, nbytes = m.message_totals()
        for name, doc, values in (
            ("edgeproxy_messages", "WebSocket messages and SSE events relayed, by direction", messages),
            ("edgeproxy_message_bytes", "WebSocket bytes (frames as on the wire) and SSE body bytes relayed, by direction",
             nbytes),
        ):
            family = CounterMetricFamily(name, doc, labels=["direction"])
            for direction, value in values.items():
                family.add_metric([direction], value)
            yield family
        yield CounterMetricFamily(
            "edgeproxy_heartbeat_failures", "Pings a peer did not answer in time", value=m.heartbeat_failures
        )
        yield CounterMetricFamily(
            "edgeproxy_resume_handoffs", "Resume attempts passed to the worker that parks their session",
            value=m.resume_handoffs,
        )
        rtt = HistogramMetricFamily("edgeproxy_ping_rtt_seconds", "Ping to pong round-trip time")
        rtt.add_metric([], m.ping_rtt_seconds.cumulative(), m.ping_rtt_seconds.total)
        yield rtt

    @staticmethod
    def _http(m: Metrics) -> Iterator[Any]:
        requests = CounterMetricFamily("edgeproxy_http_requests", "HTTP requests answered, by status class", labels=["status_class"])
        seconds = HistogramMetricFamily(
            "edgeproxy_http_request_duration_seconds", "HTTP request time, head in to response end", labels=["status_class"]
        )
        for label, n, histogram in zip(_STATUS_CLASSES, m.requests, m.request_seconds):
            if label == "other" and not n:
                continue
            requests.add_metric([label], n)
            seconds.add_metric([label], histogram.cumulative(), histogram.total)
        yield requests
        yield seconds
        truncated = CounterMetricFamily(
            "edgeproxy_http_responses_truncated",
            "HTTP responses cut after they began (the client sees a reset), by reason", labels=["reason"],
        )
        for reason, n in sorted(m.truncated.items()):
            truncated.add_metric([reason], n)
        yield truncated
        ids = CounterMetricFamily(
            "edgeproxy_http_request_ids", "X-Request-Id of HTTP requests: kept, generated (none sent) or replaced (malformed)",
            labels=["outcome"],
        )
        for outcome, n in m.request_ids.items():
            ids.add_metric([outcome], n)
        yield ids

    @staticmethod
    def _http2(m: Metrics) -> Iterator[Any]:
        yield CounterMetricFamily("edgeproxy_http2_connections", "Client connections that spoke HTTP/2 (h2 or h2c)",
                                  value=m.http2_connections)
        yield CounterMetricFamily("edgeproxy_http2_streams", "HTTP/2 request streams served", value=m.http2_streams)
        yield CounterMetricFamily(
            "edgeproxy_http2_websockets",
            "WebSocket sessions opened on HTTP/2 streams (RFC 8441), also counted as protocol=\"websocket\"",
            value=m.http2_websockets)
        yield GaugeMetricFamily("edgeproxy_http2_websockets_active", "WebSocket sessions open on HTTP/2 streams now",
                                value=m.http2_websockets_active)
        errors = CounterMetricFamily(
            "edgeproxy_http2_connection_errors",
            "HTTP/2 connections the proxy ended with an error GOAWAY, by reason (floods, rapid reset, bad frames)",
            labels=["reason"],
        )
        for reason, n in m.http2_errors.items():
            errors.add_metric([reason], n)
        yield errors

    @staticmethod
    def _fanout(m: Metrics) -> Iterator[Any]:
        yield CounterMetricFamily("edgeproxy_fanout_publishes", "Messages published to the hub", value=m.fanout_publishes)
        yield CounterMetricFamily(
            "edgeproxy_fanout_subscribers_dropped", "Subscribers dropped for passing their buffer high-water mark",
            value=m.fanout_subscribers_dropped,
        )
        backplane = CounterMetricFamily("edgeproxy_backplane_messages", "Backplane messages, by direction", labels=["direction"])
        backplane.add_metric(["sent"], m.backplane_sent)
        backplane.add_metric(["received"], m.backplane_received)
        yield backplane
        yield CounterMetricFamily("edgeproxy_backplane_errors", "Failed backplane operations", value=m.backplane_errors)
        yield GaugeMetricFamily("edgeproxy_admission_fallback", "1 while the fleet's connection budget is unreachable "
                                "and this instance admits at its share ([admission] scope = \"cluster\")",
                                value=m.admission_fallback_active)
        yield CounterMetricFamily("edgeproxy_admission_fallbacks", "Times the fleet's connection budget became "
                                  "unreachable", value=m.admission_fallbacks)

    @staticmethod
    def _upstreams(m: Metrics) -> Iterator[Any]:
        family = GaugeMetricFamily(
            "edgeproxy_upstream_server_up", "1 when the upstream server is considered healthy, 0 when not",
            labels=["upstream", "server"],
        )
        states = GaugeMetricFamily(
            "edgeproxy_upstream_server_state",
            "1 for the upstream server's current health state (up, slow_start, down, draining)",
            labels=["upstream", "server", "state"],
        )
        servers = list(m.upstream_servers()) if m.upstream_servers is not None else []
        for server in servers:
            if server.get("up") is not None:  # None: nothing checks this server's health
                family.add_metric([server["upstream"], server["server"]], 1 if server["up"] else 0)
            current = server.get("state")
            if current is not None:
                for name in UPSTREAM_STATES:
                    states.add_metric([server["upstream"], server["server"], name], 1 if name == current else 0)
        yield family
        yield states

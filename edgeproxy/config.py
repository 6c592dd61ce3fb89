"""Load and validate the edgeproxy configuration file (TOML).

Theory of operation
-------------------
The configuration is parsed once, at start-up, with :mod:`tomllib` and turned
into a tree of typed, *frozen* dataclasses (:class:`Config` at the root).
Everything that can be checked without touching the network is checked here,
so the rest of the proxy never has to re-validate or guess: a ``Config`` that
exists is a ``Config`` that is valid.

* **Frozen** (``@dataclass(frozen=True, slots=True)``): the running proxy hands
  the same objects to many connections and tasks; immutability means nobody can
  change a timeout under somebody else's feet, the objects are hashable, and a
  reload is simply "build a new tree and swap the reference".
* **Collect every problem**: validation never stops at the first mistake. Each
  problem is recorded as ``(file, key path, message)`` and one
  :class:`~edgeproxy.errors.ConfigError` listing all of them is raised at the
  end, so an operator fixes a broken file in one pass instead of one error per
  restart.

Key paths name the offending value the way you would write it in Python:
``routes[1].upstream``, ``upstreams[0].servers[2]``,
``websocket.max_message_size``.  **Array indexes are 0-based**: ``routes[0]`` is
the first ``[[routes]]`` table in the file.

Value rules (see ``config.example.toml`` for every option with its default):

* durations (every ``*_timeout``, ``*_interval``, ``*_age``, ``*_grace``) are
  seconds, int or float, finite, ``>= 0``; ``websocket.idle_timeout = 0``,
  ``ping_interval = 0``, ``max_connection_age = 0`` and
  ``limits.heap_trim_interval = 0`` disable what they name;
  ``websocket.pong_timeout`` must be ``> 0``;
* ``shutdown.close_code`` is 1001 (going away) or 1012 (service restart);
* sizes and counts are integers (booleans are never numbers):
  ``websocket.max_message_size`` ``>= 0`` (``0`` = unlimited),
  ``http.max_header_size >= 1024``, ``upstreams[].pool_size >= 0``
  (``0`` = no pooling), ``listeners[].backlog >= 1``,
  ``limits.buffer_high_water >= 1024``;
* addresses are ``host:port`` or ``[ipv6]:port``; hostnames are accepted and
  *not* resolved here; listeners may use port 0 (ephemeral), servers may not;
* ``admin.bind`` is an address like the listeners' (port 0 = ephemeral);
  ``admin.enabled = false`` turns the admin listener off;
* ``workers`` (top level) is an integer 1..1024 or ``"auto"`` (one per CPU,
  resolved here with ``os.cpu_count()``); with N > 1 worker ``i`` serves admin on
  ``admin.bind`` port + ``i``, so those N ports must be free of the listeners;
* ``routes[].host`` is a hostname without port, optionally ``*.``-prefixed,
  normalized to lower case; ``routes[].path_prefix`` starts with ``/``.
  Routes are kept in file order (no sorting happens here);
* ``http.max_body_size`` and ``routes[].max_body_size`` are sizes in bytes
  (``0`` = unlimited; a route's value replaces the ``[http]`` one);
  ``routes[].rate_limit`` is ``{ rate = <requests/s > 0>, burst = <int >= 1> }``
  (burst defaults to ``ceil(rate)``) and is refused with ``workers`` above 1 or
  ``"auto"``: the buckets are per process;
* ``logging.access_log_fields`` is a list of distinct names from
  ``ACCESS_LOG_FIELDS``, in the order the line shows them;
* ``upstreams[].servers`` entries are address strings or tables
  ``{address, weight, drain}``; weights are integers 1..100;
* ``[upstreams.affinity]`` and ``[upstreams.rebalance]`` are opt-in: the table's
  presence turns the feature on.  The affinity secret (``secret`` or
  ``secret_file``, exactly one, at least 16 bytes) is read here, a relative
  ``secret_file`` from the config file's directory.
* ``[[hubs]]`` (optional, any number) are channel hubs the proxy serves itself
  (see :mod:`edgeproxy.hub`): ``path`` is an exact request path, not a prefix,
  and is unique; ``token_secret`` (or ``token_secret_file``) is the JWT HS256
  key, at least 32 bytes (RFC 7518 section 3.2); ``auth_hook`` is an
  ``http://host:port/path`` URL;
* ``admin.api_key`` (at least 16 characters) turns on the publish API;
  ``admin.control_key`` (as long, and not the same) guards ``/admin/*`` and
  the read-only endpoints not in ``admin.open_endpoints``; without it the
  listener serving the control endpoints (``admin.control_bind``, a
  ``host:port`` or ``unix:/path``, else ``admin.bind``) must be loopback or a
  Unix socket.
* ``[backplane]`` (optional) picks where hub publications are ordered, stored and
  spread: ``kind`` is ``memory`` (the default: one process, no service),
  ``redis``, ``redis-cluster`` or ``nats``; the others need ``url`` or ``urls``
  (exactly one; several Redis URLs are shards, redis-cluster URLs are seed nodes
  that agree on TLS and credentials, database 0; ``slot_by`` only there),
  ``redis://``/``rediss://`` or
  ``nats://``/``tls://`` with a host and port.  ``prefix`` names every key,
  channel, subject and stream (``A-Z a-z 0-9 _ -``), so several deployments
  share one server.  ``replicas`` (NATS only, 1..5, at most the servers in
  ``urls``; default 3 with 3 or more, else 1) is the JetStream replica count of
  the history streams and presence buckets.  ``[[hubs]]`` with ``workers`` above 1 (or ``"auto"``)
  need ``redis`` or ``nats``: on ``memory`` every worker would have a hub of
  its own.
* ``[admission] scope = "cluster"`` (optional; default ``"instance"``) shares
  ``[limits] connection_rate`` among the fleet through the backplane; it is
  refused with ``memory`` and without a ``connection_rate``.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import hashlib
import ipaddress
import json
import math
import os
import re
import ssl
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any, Callable
from urllib.parse import urlsplit

from edgeproxy.core.affinity import SAME_SITE
from edgeproxy.core.balance import POLICIES, parse_hash_source
from edgeproxy.core.health import HealthPolicy
from edgeproxy.core.origin import parse_origin_pattern
from edgeproxy.core.rebalance import RebalancePolicy
from edgeproxy.errors import ConfigError

__all__ = [
    "Address",
    "AdminConfig",
    "AffinityConfig",
    "BackplaneConfig",
    "Config",
    "HealthConfig",
    "HttpConfig",
    "HubConfig",
    "LimitsConfig",
    "ListenerConfig",
    "LoggingConfig",
    "RateLimit",
    "RouteConfig",
    "SniCertificate",
    "UpstreamConfig",
    "ShutdownConfig",
    "WebSocketConfig",
    "load_config",
    "parse_address",
    "parse_config",
]


# --------------------------------------------------------------------------- #
# Typed configuration tree
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class Address:
    """A host and a port. ``host`` never carries IPv6 brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SniCertificate:
    """One ``tls_sni`` entry: the certificate served to clients asking for ``host`` (or ``*.domain``)."""

    host: str
    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One ``[[listeners]]`` table: a socket the proxy accepts clients on.

    TLS is on when ``tls_cert`` is set (``tls_key`` with it; paths resolved
    from the config file's directory).  ``proxy_protocol_trusted`` holds
    ``ipaddress`` networks.
    """

    bind: Address
    backlog: int = 1024
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_sni: tuple[SniCertificate, ...] = ()
    proxy_protocol: bool = False
    proxy_protocol_trusted: tuple[Any, ...] = ()
    #: HTTP/2 to clients: by ALPN on a TLS listener, by prior knowledge (h2c) on a
    #: cleartext one; the default (None given) is on with TLS, off without
    http2: bool = False

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class AffinityConfig:
    """``[upstreams.affinity]``: the proxy's sticky cookie (see core.affinity).

    ``secret`` holds the bytes of ``secret`` or of ``secret_file``; it is kept
    out of ``repr`` so a logged config does not leak it.
    """

    cookie: str
    secret: bytes = field(repr=False)
    path: str = "/"
    domain: str | None = None
    max_age: int = 3600
    secure: bool = False
    http_only: bool = True
    same_site: str = "lax"
    #: give way above threshold x mean connections; None = strict affinity
    rebalance_threshold: float | None = None


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """``[upstreams.health]``: active checks plus the state machine's thresholds."""

    #: "none", "http" (GET ``path``, 2xx/3xx is healthy) or "tcp" (connect)
    check: str = "none"
    path: str = "/"
    interval: float = 5.0
    timeout: float = 2.0
    thresholds: HealthPolicy = field(default_factory=HealthPolicy)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One ``[[upstreams]]`` table: a named group of backend servers.

    ``weights`` is empty when every server has weight 1, else one weight per
    server in ``servers`` order; ``drain`` lists the servers marked ``drain``.
    """

    name: str
    servers: tuple[Address, ...]
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    pool_size: int = 32
    pool_idle_timeout: float = 60.0
    balance: str = "round_robin"
    hash_key: str = "ip"
    weights: tuple[int, ...] = ()
    drain: tuple[Address, ...] = ()
    affinity: AffinityConfig | None = None
    rebalance: RebalancePolicy | None = None
    health: HealthConfig = field(default_factory=HealthConfig)
    #: TLS to the servers; tls_ca None = the system's CAs, tls_server_name None = the server's host
    tls: bool = False
    tls_verify: bool = True
    tls_ca: str | None = None
    tls_server_name: str | None = None
    #: connects in progress to this upstream at most (0 = no limit); beyond it 503
    max_pending_connects: int = 0

    def weight(self, server: Address) -> int:
        """The configured weight of ``server`` (1 unless set)."""
        return self.weights[self.servers.index(server)] if self.weights else 1


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    """One ``[[routes]]`` table: requests matching host/prefix go to ``upstream``.

    Keyword-only (``upstream`` has no default but follows defaulted fields).
    ``host`` is ``None`` (any host), ``"example.com"`` or ``"*.example.com"``,
    always lower case.
    """

    path_prefix: str = "/"
    host: str | None = None
    upstream: str
    #: resumable sessions on this route (when ``websocket.resume_secret`` is set)
    resume: bool = True
    #: per-route overrides of ``[websocket]`` resume_window / resume_buffer_bytes
    resume_window: float | None = None
    resume_buffer_bytes: int | None = None
    #: Origin patterns allowed to open a WebSocket here (core.origin); () = any
    allowed_origins: tuple[str, ...] = ()
    #: overrides ``[http] max_body_size`` for this route (0 = unlimited); None = the ``[http]`` value
    max_body_size: int | None = None
    #: requests per client address (429 past it); None = no limit
    rate_limit: RateLimit | None = None


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A route's ``rate_limit = { rate, burst }``: a token bucket per client address."""

    rate: float
    burst: int


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """The ``[http]`` table: HTTP/1.1 limits on the client side."""

    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    max_header_size: int = 16384
    #: largest request body in bytes (413 past it); 0 = unlimited
    max_body_size: int = 0
    #: seconds the client may leave between two reads of its request body (408); 0 = no limit
    body_timeout: float = 60.0
    #: pass a request id upstream as X-Request-Id (the client's, when valid) and log it
    request_id: bool = True


@dataclass(frozen=True, slots=True)
class Http2Config:
    """The ``[http2]`` table: HTTP/2 to clients (``core.http2``), limits per connection.

    The abuse budgets count per connection over ``flood_window`` seconds;
    past one the connection gets GOAWAY ENHANCE_YOUR_CALM (others are untouched).
    """

    max_concurrent_streams: int = 100
    initial_window_size: int = 65535
    connection_window_size: int = 1048576
    max_header_list_size: int = 32768
    flood_window: float = 10.0
    max_resets: int = 200
    max_control_frames: int = 1000
    #: WebSocket over HTTP/2 (RFC 8441): advertise SETTINGS_ENABLE_CONNECT_PROTOCOL and relay
    #: extended CONNECT streams; on by default unless a resumable route exists
    websocket: bool = True


@dataclass(frozen=True, slots=True)
class WebSocketConfig:
    """The ``[websocket]`` table. ``max_message_size`` 0 = unlimited; 0 disables
    ``idle_timeout``, ``ping_interval`` and ``max_connection_age``."""

    max_message_size: int = 67108864
    handshake_timeout: float = 10.0
    idle_timeout: float = 3600.0
    close_timeout: float = 5.0
    ping_interval: float = 30.0
    pong_timeout: float = 60.0
    ping_upstream: bool = True
    max_connection_age: float = 0.0
    #: resumable sessions (docs/resume-protocol.md): on when ``resume_secret`` is set
    resume_window: float = 30.0
    resume_buffer_bytes: int = 1048576
    resume_secret: bytes = field(default=b"", repr=False)
    #: names this proxy in resume tokens; "" = drawn at random when the server starts
    instance_id: str = ""

    #: largest data frame payload (0 = unlimited); close 1009
    max_frame_size: int = 0
    #: enforce RFC 6455 framing rules (masking, control frames, opcodes, RSV) with 1002
    strict: bool = True
    #: per connection and direction; 0 = unlimited; a burst of 0 = one second's worth
    message_rate: float = 0.0
    message_burst: int = 0
    byte_rate: float = 0.0
    byte_burst: int = 0
    #: "close" (1008) or "throttle" (stop reading the sender until its budget refills)
    rate_action: str = "close"

#: close codes a server may send to say "go away, come back later"
SHUTDOWN_CLOSE_CODES = (1001, 1012)


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    """The ``[shutdown]`` table: how SIGTERM drains the proxy."""

    drain_timeout: float = 10.0
    readiness_grace: float = 1.0
    close_code: int = 1001
    #: "paced": close frames in batches over the first half of drain_timeout;
    #: "immediate": every close frame at once (the reconnect wave in one go)
    drain_policy: str = "paced"


@dataclass(frozen=True, slots=True)
class SseConfig:
    """The ``[sse]`` table: proxied ``text/event-stream`` responses (0 = off for the timeouts).

    Such a response is exempt from its upstream's ``read_timeout``; these take its place.
    """

    #: seconds of upstream silence after which the proxy writes a ``:`` comment to the client
    keepalive_interval: float = 15.0
    #: seconds of upstream silence after which the stream is ended (proxy keepalives do not count)
    upstream_idle_timeout: float = 600.0
    #: the jittered ``retry:`` (in seconds, sent as milliseconds) when a drain or rebalance ends a stream
    retry_min: float = 1.0
    retry_max: float = 5.0
    #: seconds a drain waits for the current event to end before it ends the stream anyway
    boundary_timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """The ``[limits]`` table: back-pressure threshold (bytes) and admission control (0 = off)."""

    buffer_high_water: int = 262144
    max_connections: int = 0
    max_connections_per_ip: int = 0
    connection_rate: float = 0.0
    connection_burst: int = 0
    ip_connection_rate: float = 0.0
    ip_connection_burst: int = 0
    ip_table_size: int = 65536
    #: seconds between two checks of glibc's heap for freed memory to give back (0 = never)
    heap_trim_interval: float = 10.0


#: ``[admission] scope``: whose connection-rate budget ``[limits] connection_rate`` is
ADMISSION_SCOPES = ("instance", "cluster")


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    """The ``[admission]`` table: ``scope = "instance"`` (each instance has its own
    ``connection_rate`` bucket) or ``"cluster"`` (one bucket for the fleet, in the
    Redis backplane; see `edgeproxy.core.fleet_admission`)."""

    scope: str = "instance"


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """The ``[logging]`` table."""

    level: str = "info"
    format: str = "text"
    access_log: bool = True
    #: the fields of each request's access-log line, in this order (from `ACCESS_LOG_FIELDS`)
    access_log_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.access_log_fields:
            object.__setattr__(self, "access_log_fields", DEFAULT_ACCESS_LOG_FIELDS)


#: every field a request's access-log line can have (`[logging] access_log_fields`)
ACCESS_LOG_FIELDS = (
    "event", "client", "method", "path", "host", "status", "bytes", "bytes_in", "duration",
    "upstream", "server", "request_id", "error", "user_agent", "referer",
)
DEFAULT_ACCESS_LOG_FIELDS = (
    "event", "client", "method", "path", "host", "status", "bytes", "duration", "upstream", "server",
    "request_id", "error",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class HubConfig:
    """One ``[[hubs]]`` table: a channel hub served by the proxy itself at ``path``.

    ``token_secret`` is None in anonymous mode (every channel allowed, for
    development; the server logs a warning). It is kept out of ``repr``.
    ``auth_hook`` is the backend's allow/deny URL split into address and path.
    """

    path: str
    history_size: int = 1000
    #: seconds a publication stays in history; 0 = until pushed out by history_size
    history_ttl: float = 300.0
    token_secret: bytes | None = field(default=None, repr=False)
    auth_hook: tuple[Address, str] | None = None
    auth_hook_timeout: float = 2.0
    #: bytes buffered for one subscriber before it is dropped (and told to resume)
    subscriber_buffer_limit: int = 1048576
    #: largest client message and largest publication ``data`` (bytes of JSON)
    max_message_size: int = 65536
    max_subscriptions: int = 128
    #: seconds between the hub's pings; 0 = no pings
    ping_interval: float = 25.0
    #: subscribers written per event-loop iteration during one fan-out
    fanout_batch: int = 2000


DEFAULT_ADMIN_BIND = Address("127.0.0.1", 9901)
#: the admin endpoints that may be served without the control key: they only read
OPEN_ENDPOINT_CHOICES = ("/metrics", "/healthz", "/readyz", "/dashboard", "/admin/stream")
DEFAULT_OPEN_ENDPOINTS = OPEN_ENDPOINT_CHOICES


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The ``[admin]`` table: the metrics/health/admin listener, loopback by default.

    Loopback because its endpoints (reload, connection counts) are for operators
    and scrapers on the same host or a private network, never for the public.
    """

    bind: Address = field(default_factory=lambda: DEFAULT_ADMIN_BIND)
    enabled: bool = True
    #: the publish API's bearer key; None = the publish API refuses every call
    api_key: str | None = field(default=None, repr=False)
    #: largest request body POST /v1/publish accepts (413 above)
    max_publish_size: int = 1048576
    #: bearer key every endpoint outside ``open_endpoints`` needs; None = they are open
    control_key: str | None = field(default=None, repr=False)
    #: where the control endpoints (/admin/* but /admin/stream) are served: None = on
    #: ``bind``; an Address (TCP) or a path (a Unix socket) = only there
    control_bind: Address | str | None = None
    #: permission bits of a Unix ``control_bind`` socket (set before it appears)
    control_socket_mode: int = 0o600
    #: the read-only endpoints that need no control_key (the others always do)
    open_endpoints: tuple[str, ...] = DEFAULT_OPEN_ENDPOINTS


BACKPLANE_KINDS = ("memory", "redis", "redis-cluster", "nats")
_URL_SCHEMES = {"redis": ("redis", "rediss"), "redis-cluster": ("redis", "rediss"), "nats": ("nats", "tls")}
#: ``[backplane] slot_by`` (redis-cluster): what a channel's hash tag is made of
SLOT_BY_CHOICES = ("channel", "tenant")


@dataclass(frozen=True, slots=True, kw_only=True)
class BackplaneConfig:
    """The ``[backplane]`` table: how the hubs of several proxies share channels.

    ``urls`` holds one URL per Redis shard (one, or the servers of one NATS
    cluster, or seed nodes of one Redis Cluster); it is empty for ``memory``.  ``instance_id`` None means "generate
    one at start" (host name and random bytes).
    """

    kind: str = "memory"
    urls: tuple[str, ...] = ()
    prefix: str = "edgeproxy"
    instance_id: str | None = None
    #: seconds between presence heartbeats; a dead instance's presence is gone
    #: 1.5 intervals after its last heartbeat
    heartbeat_interval: float = 1.0
    #: seconds one backplane call may take before it counts as failed (publish: 503)
    timeout: float = 2.0
    #: reconnect backoff: the n-th wait is uniform in [0, min(max, min * 2**n)]
    reconnect_min: float = 0.1
    reconnect_max: float = 5.0
    #: NATS only: JetStream replicas of every stream and key-value bucket (history,
    #: presence); default 3 when ``urls`` lists 3 or more servers, else 1
    replicas: int = 1
    #: redis-cluster: a channel's keys and shard channel share the hash tag of the
    #: whole channel name ("channel": channels spread over the cluster) or of its
    #: tenant, the part before the first ``:`` ("tenant": a tenant on one shard)
    slot_by: str = "channel"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration. ``source`` is the file it came from."""

    listeners: tuple[ListenerConfig, ...]
    upstreams: tuple[UpstreamConfig, ...]
    routes: tuple[RouteConfig, ...]
    http: HttpConfig = field(default_factory=HttpConfig)
    http2: Http2Config = field(default_factory=Http2Config)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    #: worker processes (``"auto"`` already resolved to the CPU count); 1 = no supervisor
    workers: int = 1
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    sse: SseConfig = field(default_factory=SseConfig)
    hubs: tuple[HubConfig, ...] = ()
    backplane: BackplaneConfig = field(default_factory=BackplaneConfig)
    source: str = "<string>"
    #: sha256 of the file text: tells operators which file a running proxy loaded.
    #: Not compared, so a reload of an equivalent file (comments changed) compares equal.
    version: str = field(default="", compare=False)

    def upstream(self, name: str) -> UpstreamConfig:
        """Return the upstream called ``name``; ``KeyError`` if there is none."""
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise KeyError(name)


# --------------------------------------------------------------------------- #
# Addresses and host names
# --------------------------------------------------------------------------- #

# One DNS label; underscores are tolerated because container/service names
# (docker-compose, Kubernetes) use them and resolvers accept them.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_ADDRESS_FORMS = "expected host:port or [ipv6]:port"


def _check_hostname(host: str) -> str | None:
    """Return why ``host`` (already lower-cased) is not a hostname/IPv4, or None."""
    if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
        return f"{_quote(host)} is not a valid hostname or IPv4 address"
    if all(label.isdigit() for label in host.split(".")):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{_quote(host)} is not a valid IPv4 address"
    return None


def parse_address(text: str) -> Address:
    """Parse ``host:port`` or ``[ipv6]:port`` into an :class:`Address`.

    Hostnames are lower-cased and not resolved; IP literals are normalized
    (``[0:0::1]`` becomes ``::1``). Port 0 is accepted (callers that need a
    real port check for it). Raises ``ValueError`` with a readable message.
    """
    if not isinstance(text, str):
        raise ValueError(f'expected an address string like "host:port" or "[ipv6]:port", got {_describe(text)}')
    shown = _quote(text)
    if text != text.strip() or not text:
        raise ValueError(f"invalid address {shown}: {_ADDRESS_FORMS} without spaces")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"invalid address {shown}: missing ']' after the IPv6 address ({_ADDRESS_FORMS})")
        host = text[1:close]
        rest = text[close + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"invalid address {shown}: missing ':port' after ']' ({_ADDRESS_FORMS})")
        port_text = rest[1:]
        if not host:
            raise ValueError(f"invalid address {shown}: empty host ({_ADDRESS_FORMS})")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"invalid address {shown}: {_quote(host)} is not a valid IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"invalid address {shown}: missing port ({_ADDRESS_FORMS})")
        if ":" in host:
            raise ValueError(f"invalid address {shown}: IPv6 addresses must be written in brackets, e.g. [::1]:8080")
        if not host:
            raise ValueError(f"invalid address {shown}: empty host ({_ADDRESS_FORMS})")
        host = host.lower()
        problem = _check_hostname(host)
        if problem:
            raise ValueError(f"invalid address {shown}: {problem}")
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            pass
    if not port_text:
        raise ValueError(f"invalid address {shown}: missing port number ({_ADDRESS_FORMS})")
    if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"invalid address {shown}: port must be a number 0..65535, got {_quote(port_text)}")
    return Address(host, int(port_text))


# --------------------------------------------------------------------------- #
# Validation machinery
# --------------------------------------------------------------------------- #


def _quote(text: str) -> str:
    """Show a string the way TOML writes it (double quotes, escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _describe(value: Any) -> str:
    """Short human description of a TOML value, for 'got ...' in messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quote(value if len(value) <= 80 else value[:77] + "...")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return f"a date/time ({value.isoformat()})"
    return type(value).__name__  # pragma: no cover - tomllib yields nothing else


class _Validator:
    """Accumulates (file, key, message) problems while walking the TOML tree."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[tuple[str, str, str]] = []

    def error(self, key: str, message: str) -> None:
        self.problems.append((self.source, key, message))

    # -- structure --------------------------------------------------------- #

    def table(self, data: dict[str, Any], key: str) -> dict[str, Any]:
        """Return the optional sub-table ``data[key]`` ({} if absent or wrong)."""
        if key not in data:
            return {}
        value = data[key]
        if not isinstance(value, dict):
            self.error(key, f"expected a table ([{key}]), got {_describe(value)}")
            return {}
        return value

    def array_of_tables(self, data: dict[str, Any], key: str, *, required: str | None = "") -> list[tuple[str, dict[str, Any]]]:
        """Return ``[(path, table), ...]`` for the ``[[key]]`` array.

        ``required`` None: it may be absent or empty; else at least one table is
        needed, and a non-empty ``required`` says why in the problem.
        """
        if key not in data:
            if required is not None:
                self.error(key, f"at least one [[{key}]] table is required{required}")
            return []
        value = data[key]
        if not isinstance(value, list):
            self.error(key, f"expected an array of tables ([[{key}]]), got {_describe(value)}")
            return []
        if not value:
            if required is not None:
                self.error(key, f"at least one [[{key}]] table is required{required}, got an empty array")
            return []
        items = []
        for index, item in enumerate(value):
            path = f"{key}[{index}]"
            if not isinstance(item, dict):
                self.error(path, f"expected a table, got {_describe(item)}")
                continue
            items.append((path, item))
        return items

    def unknown_keys(self, data: dict[str, Any], path: str, allowed: tuple[str, ...]) -> None:
        for key in data:
            if key in allowed:
                continue
            message = f"unknown key {key!r} (expected one of: {', '.join(allowed)})"
            close = difflib.get_close_matches(key, allowed, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
            self.error(_join(path, key), message)

    # -- scalars ----------------------------------------------------------- #

    def seconds(self, data: dict[str, Any], path: str, key: str, default: float) -> float:
        return self.nonnegative(data, path, key, default, "a number of seconds >= 0")

    def nonnegative(self, data: dict[str, Any], path: str, key: str, default: float, what: str) -> float:
        """A finite int or float >= 0, as a float; ``what`` completes "expected ..."."""
        if key not in data:
            return default
        value = data[key]
        if not _is_number(value) or value < 0:
            self.error(_join(path, key), f"expected {what}, got {_describe(value)}")
            return default
        return float(value)

    def number(self, data: dict[str, Any], path: str, key: str, default: float, *, above: float, what: str) -> float:
        """A finite int or float strictly greater than ``above``."""
        if key not in data:
            return default
        value = data[key]
        if not _is_number(value) or value <= above:
            self.error(_join(path, key), f"expected {what} (a number > {above:g}), got {_describe(value)}")
            return default
        return float(value)

    def integer(
        self, data: dict[str, Any], path: str, key: str, default: int, minimum: int, what: str, maximum: int | None = None
    ) -> int:
        if key not in data:
            return default
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"{minimum}..{maximum}"
            self.error(_join(path, key), f"expected {what} (an integer {bounds}), got {_describe(value)}")
            return default
        return value

    def string(self, data: dict[str, Any], path: str, key: str, default: str | None, what: str) -> str | None:
        """A non-empty string without control characters."""
        if key not in data:
            return default
        value = data[key]
        if not isinstance(value, str) or not value or any(ord(ch) < 0x20 or ch == "\x7f" for ch in value):
            self.error(_join(path, key), f"expected {what}, got {_describe(value)}")
            return default
        return value

    def boolean(self, data: dict[str, Any], path: str, key: str, default: bool) -> bool:
        if key not in data:
            return default
        value = data[key]
        if not isinstance(value, bool):
            self.error(_join(path, key), f"expected true or false, got {_describe(value)}")
            return default
        return value

    def choice(self, data: dict[str, Any], path: str, key: str, default: str, choices: tuple[str, ...]) -> str:
        if key not in data:
            return default
        value = data[key]
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        self.error(_join(path, key), f"expected one of {', '.join(choices)}, got {_describe(value)}")
        return default

    def address(self, value: Any, key: str, *, min_port: int) -> Address | None:
        try:
            address = parse_address(value)
        except ValueError as exc:
            self.error(key, str(exc))
            return None
        if address.port < min_port:
            self.error(key, f"port must be {min_port}..65535, got {address.port} in {_quote(value)}")
            return None
        return address


def _is_number(value: Any) -> bool:
    """A finite int or float (TOML booleans are not numbers)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------- #
# Sections
# --------------------------------------------------------------------------- #

_TOP_KEYS = ("listeners", "upstreams", "routes", "http", "http2", "websocket", "limits", "logging", "admin", "shutdown", "sse", "workers", "hubs",
             "backplane", "admission")
#: an upper bound that catches a typo (workers = 10000), not a tuning limit
MAX_WORKERS = 1024
_LISTENER_KEYS = ("bind", "backlog", "tls_cert", "tls_key", "tls_sni", "proxy_protocol", "proxy_protocol_trusted", "http2")
_SNI_KEYS = ("host", "cert", "key")
_UPSTREAM_KEYS = (
    "name", "servers", "connect_timeout", "read_timeout", "pool_size", "pool_idle_timeout",
    "balance", "hash_key", "affinity", "rebalance", "health",
    "tls", "tls_verify", "tls_ca", "tls_server_name", "max_pending_connects",
)
_SERVER_KEYS = ("address", "weight", "drain")
_AFFINITY_KEYS = (
    "cookie", "secret", "secret_file", "path", "domain", "max_age", "secure", "http_only", "same_site",
    "rebalance_threshold",
)
_REBALANCE_KEYS = (
    "threshold", "sustain", "interval", "max_closes", "close_code", "reconnect_delay_min", "reconnect_delay_max",
)
_HEALTH_KEYS = (
    "check", "path", "interval", "timeout", "rise", "fall", "max_fails", "eject_base", "eject_max", "slow_start",
)
_HEALTH_CHECKS = ("none", "http", "tcp")
#: RFC 6265 cookie-name: an RFC 9110 token.
_COOKIE_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_MIN_SECRET = 16
_ROUTE_KEYS = (
    "path_prefix", "host", "upstream", "resume", "resume_window", "resume_buffer_bytes", "allowed_origins",
    "max_body_size", "rate_limit",
)
_RATE_LIMIT_KEYS = ("rate", "burst")
_HTTP_KEYS = ("header_timeout", "keepalive_timeout", "max_header_size", "max_body_size", "body_timeout", "request_id")
_HTTP2_KEYS = (
    "max_concurrent_streams", "initial_window_size", "connection_window_size", "max_header_list_size",
    "flood_window", "max_resets", "max_control_frames", "websocket",
)
#: RFC 9113 section 6.5.2: a flow-control window is at most 2^31 - 1
_MAX_WINDOW = 2**31 - 1
_WEBSOCKET_KEYS = (
    "max_message_size", "handshake_timeout", "idle_timeout", "close_timeout",
    "ping_interval", "pong_timeout", "ping_upstream", "max_connection_age",
    "resume_window", "resume_buffer_bytes", "resume_secret", "resume_secret_file", "instance_id",
    "max_frame_size", "strict", "message_rate", "message_burst", "byte_rate", "byte_burst", "rate_action",
)
_RATE_ACTIONS = ("close", "throttle")
#: an instance id goes into resume tokens and log lines: keep it short and plain
_INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MIN_RESUME_BUFFER = 1024
_SHUTDOWN_KEYS = ("drain_timeout", "readiness_grace", "close_code", "drain_policy")
_SSE_KEYS = ("keepalive_interval", "upstream_idle_timeout", "retry_min", "retry_max", "boundary_timeout")
#: how a drain hands out its close frames (`core.drain.Drain`'s close window)
DRAIN_POLICIES = ("paced", "immediate")
_LIMITS_KEYS = (
    "buffer_high_water", "max_connections", "max_connections_per_ip", "connection_rate", "connection_burst",
    "ip_connection_rate", "ip_connection_burst", "ip_table_size", "heap_trim_interval",
)
_LOGGING_KEYS = ("level", "format", "access_log", "access_log_fields")
_ADMIN_KEYS = (
    "bind", "enabled", "api_key", "max_publish_size", "control_key", "control_bind", "control_socket_mode",
    "open_endpoints",
)
_HUB_KEYS = (
    "path", "history_size", "history_ttl", "token_secret", "token_secret_file", "auth_hook", "auth_hook_timeout",
    "subscriber_buffer_limit", "max_message_size", "max_subscriptions", "ping_interval", "fanout_batch",
)
_BACKPLANE_KEYS = (
    "kind", "url", "urls", "prefix", "instance_id", "heartbeat_interval", "timeout", "reconnect_min", "reconnect_max",
    "replicas",
    "slot_by",
)
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MIN_TOKEN_SECRET = 32
_MIN_API_KEY = 16
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("text", "json")


def _listeners(v: _Validator, data: dict[str, Any]) -> tuple[ListenerConfig, ...]:
    listeners = []
    seen: dict[Address, str] = {}
    for path, item in v.array_of_tables(data, "listeners"):
        v.unknown_keys(item, path, _LISTENER_KEYS)
        backlog = v.integer(item, path, "backlog", 1024, 1, "a listen backlog")
        if "bind" not in item:
            v.error(_join(path, "bind"), 'missing required key (expected an address like "127.0.0.1:8080")')
            continue
        bind = v.address(item["bind"], _join(path, "bind"), min_port=0)
        if bind is None:
            continue
        if bind.port != 0:  # several ephemeral-port listeners do not collide
            if bind in seen:
                v.error(_join(path, "bind"), f"duplicate listener address {bind} (already used by {seen[bind]})")
            else:
                seen[bind] = path
        tls = _listener_tls(v, item, path)
        # h2 by ALPN costs an HTTP/1.1-only client nothing; h2c by prior knowledge is opt-in
        http2 = v.boolean(item, path, "http2", "tls_cert" in item)
        listeners.append(ListenerConfig(bind=bind, backlog=backlog, **tls,
                                        **_listener_proxy_protocol(v, item, path), http2=http2))
    return tuple(listeners)


def _file(v: _Validator, t: dict[str, Any], path: str, key: str, what: str) -> str | None:
    """An optional file path, resolved from the config file's directory; it must be readable."""
    name = v.string(t, path, key, None, what)
    if name is None:
        return None
    if not os.path.isabs(name) and os.path.isfile(v.source):
        name = os.path.join(os.path.dirname(v.source), name)
    if not os.access(name, os.R_OK) or not os.path.isfile(name):
        v.error(_join(path, key), f"cannot read the file {_quote(name)}")
        return None
    return name


def _check_keypair(v: _Validator, key: str, cert: str, private: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, private)
    except (ssl.SSLError, OSError) as exc:
        v.error(key, f"cannot load the certificate {_quote(cert)} with its key {_quote(private)}: {exc}")


def _listener_tls(v: _Validator, item: dict[str, Any], path: str) -> dict[str, Any]:
    """``tls_cert``, ``tls_key`` and ``tls_sni`` of a listener (each certificate loaded once to check it)."""
    cert = _file(v, item, path, "tls_cert", "a certificate file path (PEM)")
    key = _file(v, item, path, "tls_key", "a private key file path (PEM)")
    if ("tls_cert" in item) != ("tls_key" in item):
        v.error(_join(path, "tls_key" if "tls_cert" in item else "tls_cert"), "tls_cert and tls_key go together")
    elif cert and key:
        _check_keypair(v, _join(path, "tls_cert"), cert, key)
    sni: list[SniCertificate] = []
    raw = item.get("tls_sni", [])
    if "tls_sni" in item and "tls_cert" not in item:
        v.error(_join(path, "tls_sni"), "needs tls_cert and tls_key (the certificate for clients without SNI)")
    if not isinstance(raw, list):
        v.error(_join(path, "tls_sni"), f'expected a list of tables like {{ host = "a.example.com", cert = "...", key = "..." }}, got {_describe(raw)}')
        raw = []
    for index, entry in enumerate(raw):
        key_path = f"{_join(path, 'tls_sni')}[{index}]"
        if not isinstance(entry, dict):
            v.error(key_path, f"expected a table {{ host, cert, key }}, got {_describe(entry)}")
            continue
        v.unknown_keys(entry, key_path, _SNI_KEYS)
        host = _route_host(v, _join(key_path, "host"), entry["host"]) if "host" in entry else None
        if "host" not in entry:
            v.error(_join(key_path, "host"), 'missing required key (expected a hostname like "a.example.com" or "*.example.com")')
        entry_cert = _file(v, entry, key_path, "cert", "a certificate file path (PEM)")
        entry_key = _file(v, entry, key_path, "key", "a private key file path (PEM)")
        for name in ("cert", "key"):
            if name not in entry:
                v.error(_join(key_path, name), "missing required key (expected a file path)")
        if host and entry_cert and entry_key:
            _check_keypair(v, _join(key_path, "cert"), entry_cert, entry_key)
            sni.append(SniCertificate(host, entry_cert, entry_key))
    return {"tls_cert": cert if cert and key else None, "tls_key": key if cert and key else None, "tls_sni": tuple(sni)}


def _listener_proxy_protocol(v: _Validator, item: dict[str, Any], path: str) -> dict[str, Any]:
    enabled = v.boolean(item, path, "proxy_protocol", False)
    key = _join(path, "proxy_protocol_trusted")
    raw = item.get("proxy_protocol_trusted", [])
    networks = []
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        v.error(key, f'expected a list of networks like ["10.0.0.0/8", "127.0.0.1"], got {_describe(raw)}')
        raw = []
    for index, text in enumerate(raw):
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            v.error(f"{key}[{index}]", f'expected an IP network like "10.0.0.0/8" or an address, got {_describe(text)}')
    if enabled and not raw:
        v.error(key, "proxy_protocol = true needs the balancers' addresses here (anyone else could claim any address)")
    if raw and "proxy_protocol" in item and not enabled:
        v.error(key, "only used with proxy_protocol = true")
    return {"proxy_protocol": enabled, "proxy_protocol_trusted": tuple(networks)}


def _hub_only(data: dict[str, Any]) -> bool:
    """A config with [[hubs]] may have no upstreams and no routes: the proxy serves only its hubs."""
    hubs = data.get("hubs")
    return isinstance(hubs, list) and bool(hubs)


def _upstreams(v: _Validator, data: dict[str, Any]) -> tuple[UpstreamConfig, ...]:
    upstreams = []
    seen: dict[str, str] = {}
    needed = None if _hub_only(data) and not data.get("routes") else " (or [[hubs]] alone, for a hub-only proxy)"
    for path, item in v.array_of_tables(data, "upstreams", required=needed):
        v.unknown_keys(item, path, _UPSTREAM_KEYS)
        name_key = _join(path, "name")
        name = item.get("name")
        if "name" not in item:
            v.error(name_key, "missing required key (expected a non-empty string)")
        elif not isinstance(name, str) or not name.strip():
            v.error(name_key, f"expected a non-empty string, got {_describe(name)}")
            name = None
        elif name in seen:
            v.error(name_key, f"duplicate upstream name {name!r} (already defined by {seen[name]})")
        else:
            seen[name] = path

        servers, weights, drain = _servers(v, item, path)
        balance = v.choice(item, path, "balance", "round_robin", POLICIES)
        hash_key = item.get("hash_key", "ip")
        try:
            parse_hash_source(hash_key if isinstance(hash_key, str) else "")
        except ValueError:
            v.error(_join(path, "hash_key"), f'expected "ip", "header:NAME", "cookie:NAME" or "query:NAME", got {_describe(hash_key)}')
            hash_key = "ip"
        if "hash_key" in item and balance != "hash":
            v.error(_join(path, "hash_key"), f'only used with balance = "hash" (balance is {balance!r})')

        upstreams.append(
            UpstreamConfig(
                name=name if isinstance(name, str) else "",
                servers=tuple(servers),
                connect_timeout=v.seconds(item, path, "connect_timeout", 5.0),
                read_timeout=v.seconds(item, path, "read_timeout", 60.0),
                pool_size=v.integer(item, path, "pool_size", 32, 0, "a connection count"),
                pool_idle_timeout=v.seconds(item, path, "pool_idle_timeout", 60.0),
                balance=balance,
                hash_key=hash_key,
                weights=weights if any(w != 1 for w in weights) else (),
                drain=drain,
                affinity=_affinity(v, item, path),
                rebalance=_rebalance(v, item, path),
                health=_health(v, item, path),
                max_pending_connects=v.integer(item, path, "max_pending_connects", 0, 0, "a connection count, 0 = no limit"),
                **_upstream_tls(v, item, path),
            )
        )
    return tuple(upstreams)


def _upstream_tls(v: _Validator, item: dict[str, Any], path: str) -> dict[str, Any]:
    tls = v.boolean(item, path, "tls", False)
    server_name = v.string(item, path, "tls_server_name", None, 'a hostname like "api.internal"')
    if server_name is not None:
        server_name = _route_host(v, _join(path, "tls_server_name"), server_name)
        if server_name and server_name.startswith("*."):
            v.error(_join(path, "tls_server_name"), f"expected a hostname without a wildcard, got {_describe(server_name)}")
    out = {
        "tls": tls,
        "tls_verify": v.boolean(item, path, "tls_verify", True),
        "tls_ca": _file(v, item, path, "tls_ca", "a CA bundle file path (PEM)"),
        "tls_server_name": server_name,
    }
    if not tls:
        for key in ("tls_verify", "tls_ca", "tls_server_name"):
            if key in item:
                v.error(_join(path, key), "only used with tls = true")
    if "tls_ca" in item and out["tls_ca"]:
        try:
            ssl.create_default_context(cafile=out["tls_ca"])
        except (ssl.SSLError, OSError) as exc:
            v.error(_join(path, "tls_ca"), f"cannot load the CA bundle {_quote(out['tls_ca'])}: {exc}")
    return out


def _servers(v: _Validator, item: dict[str, Any], path: str) -> tuple[tuple[Address, ...], tuple[int, ...], tuple[Address, ...]]:
    """``servers``: address strings or ``{address, weight, drain}`` tables."""
    servers_key = _join(path, "servers")
    servers: list[Address] = []
    weights: list[int] = []
    drain: list[Address] = []
    raw = item.get("servers")
    if "servers" not in item:
        v.error(servers_key, 'missing required key (expected a list like ["127.0.0.1:9001"])')
        raw = []
    elif not isinstance(raw, list):
        v.error(servers_key, f'expected a list of addresses like ["127.0.0.1:9001"], got {_describe(raw)}')
        raw = []
    elif not raw:
        v.error(servers_key, "expected at least one server address, got an empty list")
    seen: dict[Address, str] = {}
    for index, entry in enumerate(raw):
        key = f"{servers_key}[{index}]"
        weight, drained = 1, False
        if isinstance(entry, dict):
            v.unknown_keys(entry, key, _SERVER_KEYS)
            weight = v.integer(entry, key, "weight", 1, 1, "a server weight", maximum=100)
            drained = v.boolean(entry, key, "drain", False)
            if "address" not in entry:
                v.error(_join(key, "address"), 'missing required key (expected an address like "127.0.0.1:9001")')
                continue
            address = v.address(entry["address"], _join(key, "address"), min_port=1)
        else:
            address = v.address(entry, key, min_port=1)
        if address is None:
            continue
        if address in seen:
            v.error(key, f"duplicate server {address} (already listed as {seen[address]})")
            continue
        seen[address] = key
        servers.append(address)
        weights.append(weight)
        if drained:
            drain.append(address)
    return tuple(servers), tuple(weights), tuple(drain)


def _subtable(v: _Validator, item: dict[str, Any], path: str, name: str, keys: tuple[str, ...]) -> tuple[str, dict[str, Any]] | None:
    """The optional ``[upstreams.NAME]`` table with its key path, or None when absent."""
    if name not in item:
        return None
    key = _join(path, name)
    table = item[name]
    if not isinstance(table, dict):
        v.error(key, f"expected a table ([upstreams.{name}]), got {_describe(table)}")
        return None
    v.unknown_keys(table, key, keys)
    return key, table


def _affinity(v: _Validator, item: dict[str, Any], path: str) -> AffinityConfig | None:
    found = _subtable(v, item, path, "affinity", _AFFINITY_KEYS)
    if found is None:
        return None
    key, t = found
    cookie = v.string(t, key, "cookie", None, "a cookie name (letters, digits and !#$%&'*+.^_`|~-)")
    if "cookie" not in t:
        v.error(_join(key, "cookie"), 'missing required key (expected a cookie name like "edgeproxy")')
    elif cookie is not None and not _COOKIE_NAME_RE.fullmatch(cookie):
        v.error(_join(key, "cookie"), f"expected a cookie name (letters, digits and !#$%&'*+.^_`|~-), got {_describe(cookie)}")
    secret = _secret(v, t, key, "secret", required=True)
    same_site = v.choice(t, key, "same_site", "lax", SAME_SITE)
    secure = v.boolean(t, key, "secure", False)
    if same_site == "none" and not secure:
        v.error(_join(key, "same_site"), 'same_site = "none" needs secure = true (browsers refuse it otherwise)')
    path_value = v.string(t, key, "path", "/", 'a cookie path starting with "/"')
    if path_value is not None and (not path_value.startswith("/") or ";" in path_value):
        v.error(_join(key, "path"), f'expected a cookie path starting with "/" (no ";"), got {_describe(path_value)}')
    domain = v.string(t, key, "domain", None, 'a domain like "example.com"')
    if domain is not None and _check_hostname(domain.lower().lstrip(".")):
        v.error(_join(key, "domain"), f'expected a domain like "example.com", got {_describe(domain)}')
    threshold = None
    if "rebalance_threshold" in t:
        threshold = v.number(t, key, "rebalance_threshold", 1.5, above=1.0, what="a load ratio like 1.5")
    return AffinityConfig(
        cookie=cookie or "edgeproxy",
        secret=secret,
        path=path_value or "/",
        domain=domain,
        max_age=v.integer(t, key, "max_age", 3600, 0, "seconds, 0 = a session cookie with no limit"),
        secure=secure,
        http_only=v.boolean(t, key, "http_only", True),
        same_site=same_site,
        rebalance_threshold=threshold,
    )


def _secret(
    v: _Validator, t: dict[str, Any], key: str, name: str, *, required: bool, minimum: int = _MIN_SECRET
) -> bytes:
    """The key ``name`` or the contents of the file ``name_file`` (exactly one; b"" when neither and optional).

    A relative file name is taken from the config file's directory; the secret
    must have at least ``minimum`` bytes.
    """
    file_key = name + "_file"
    if (name in t) == (file_key in t):
        if required or name in t:
            v.error(_join(key, name), f"set exactly one of {name} or {file_key}")
        return b""
    if name in t:
        text = v.string(t, key, name, None, "a secret string")
        secret = text.encode("utf-8") if text else b""
        where = _join(key, name)
    else:
        where = _join(key, file_key)
        path = v.string(t, key, file_key, None, "a file path")
        if path is None:
            return b""
        if not os.path.isabs(path) and os.path.isfile(v.source):
            path = os.path.join(os.path.dirname(v.source), path)
        try:
            with open(path, "rb") as fh:
                secret = fh.read().strip()
        except OSError as exc:
            v.error(where, f"cannot read the secret file {_quote(path)}: {exc.strerror or exc}")
            return b""
    if secret and len(secret) < minimum:
        v.error(where, f"the secret must be at least {minimum} bytes, got {len(secret)}")
    return secret


def _rebalance(v: _Validator, item: dict[str, Any], path: str) -> RebalancePolicy | None:
    found = _subtable(v, item, path, "rebalance", _REBALANCE_KEYS)
    if found is None:
        return None
    key, t = found
    default = RebalancePolicy()
    close_code = default.close_code
    if "close_code" in t:
        close_code = t["close_code"]
        if close_code not in (1012, 1013) or isinstance(close_code, bool):
            v.error(_join(key, "close_code"), f"expected 1012 (service restart) or 1013 (try again later), got {_describe(close_code)}")
            close_code = default.close_code
    delay_min = v.seconds(t, key, "reconnect_delay_min", default.delay_min)
    delay_max = v.seconds(t, key, "reconnect_delay_max", default.delay_max)
    if delay_max < delay_min:
        v.error(_join(key, "reconnect_delay_max"), f"must be >= reconnect_delay_min ({delay_min:g}), got {delay_max:g}")
    return RebalancePolicy(
        threshold=v.number(t, key, "threshold", default.threshold, above=1.0, what="a max/mean ratio like 1.2"),
        sustain=v.seconds(t, key, "sustain", default.sustain),
        interval=v.number(t, key, "interval", default.interval, above=0.0, what="seconds"),
        max_closes=v.integer(t, key, "max_closes", default.max_closes, 1, "a connection count"),
        close_code=close_code,
        delay_min=delay_min,
        delay_max=max(delay_min, delay_max),
    )


def _health(v: _Validator, item: dict[str, Any], path: str) -> HealthConfig:
    key, t = _subtable(v, item, path, "health", _HEALTH_KEYS) or (_join(path, "health"), {})
    default = HealthConfig()
    base = HealthPolicy()
    check_path = v.string(t, key, "path", "/", 'a request path starting with "/"')
    if check_path is not None and (not check_path.startswith("/") or " " in check_path):
        v.error(_join(key, "path"), f'expected a request path starting with "/" (no spaces), got {_describe(check_path)}')
        check_path = "/"
    eject_base = v.seconds(t, key, "eject_base", base.eject_base)
    eject_max = v.seconds(t, key, "eject_max", base.eject_max)
    if eject_max < eject_base:
        v.error(_join(key, "eject_max"), f"must be >= eject_base ({eject_base:g}), got {eject_max:g}")
    return HealthConfig(
        check=v.choice(t, key, "check", default.check, _HEALTH_CHECKS),
        path=check_path or "/",
        interval=v.number(t, key, "interval", default.interval, above=0.0, what="seconds"),
        timeout=v.number(t, key, "timeout", default.timeout, above=0.0, what="seconds"),
        thresholds=HealthPolicy(
            rise=v.integer(t, key, "rise", base.rise, 1, "a count of checks"),
            fall=v.integer(t, key, "fall", base.fall, 1, "a count of checks"),
            max_fails=v.integer(t, key, "max_fails", base.max_fails, 0, "a count of failures, 0 = no passive ejection"),
            eject_base=eject_base,
            eject_max=max(eject_base, eject_max),
            slow_start=v.seconds(t, key, "slow_start", base.slow_start),
        ),
    )


def _route_host(v: _Validator, key: str, value: Any) -> str | None:
    if not isinstance(value, str):
        v.error(key, f'expected a hostname like "example.com" or "*.example.com", got {_describe(value)}')
        return None
    host = value.lower()
    if ":" in host:
        v.error(key, f'expected a hostname without port (like "example.com"), got {_describe(value)}')
        return None
    bare = host[2:] if host.startswith("*.") else host
    if host == "*":
        v.error(key, 'a lone "*" is not allowed; omit host to match any host')
        return None
    problem = _check_hostname(bare)
    if problem or "*" in bare:
        v.error(key, f'expected a hostname like "example.com" or "*.example.com", got {_describe(value)}')
        return None
    return host


def _routes(v: _Validator, data: dict[str, Any], upstream_names: list[str] | None) -> tuple[RouteConfig, ...]:
    """Validate ``[[routes]]``; ``upstream_names`` None = unknown (skip the reference check)."""
    routes = []
    seen: dict[tuple[str | None, str], str] = {}
    needed = None if _hub_only(data) and not data.get("upstreams") else " (or [[hubs]] alone, for a hub-only proxy)"
    for path, item in v.array_of_tables(data, "routes", required=needed):
        v.unknown_keys(item, path, _ROUTE_KEYS)

        prefix_key = _join(path, "path_prefix")
        prefix = item.get("path_prefix", "/")
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            v.error(prefix_key, f'expected a path starting with "/", got {_describe(prefix)}')
            prefix = None
        elif any(ch.isspace() or ch in "?#" or ord(ch) < 0x20 for ch in prefix):
            v.error(prefix_key, f"expected a plain path (no spaces, '?' or '#'), got {_describe(prefix)}")
            prefix = None

        host = None
        if "host" in item:
            host = _route_host(v, _join(path, "host"), item["host"])

        upstream_key = _join(path, "upstream")
        upstream = item.get("upstream")
        if "upstream" not in item:
            v.error(upstream_key, "missing required key (expected the name of an upstream)")
        elif not isinstance(upstream, str):
            v.error(upstream_key, f"expected the name of an upstream, got {_describe(upstream)}")
            upstream = None
        elif upstream_names is not None and upstream not in upstream_names:
            defined = ", ".join(upstream_names) or "none"
            v.error(upstream_key, f"route refers to upstream {upstream!r}, which is not defined (defined: {defined})")

        if prefix is not None and (host is not None or "host" not in item):
            match = (host, prefix)
            if match in seen:
                v.error(path, f"duplicate route for host {host or '*'} and path_prefix {prefix!r} (same as {seen[match]}); it could never match")
            else:
                seen[match] = path
        routes.append(
            RouteConfig(
                path_prefix=prefix if prefix is not None else "/",
                host=host,
                upstream=upstream if isinstance(upstream, str) else "",
                resume=v.boolean(item, path, "resume", True),
                resume_window=v.number(item, path, "resume_window", None, above=0, what="seconds"),
                resume_buffer_bytes=v.integer(item, path, "resume_buffer_bytes", None, _MIN_RESUME_BUFFER, "a size in bytes"),
                allowed_origins=_allowed_origins(v, item, path),
                max_body_size=v.integer(item, path, "max_body_size", None, 0, "a size in bytes, 0 = unlimited"),
                rate_limit=_rate_limit(v, item, path),
            )
        )
    return tuple(routes)


def _rate_limit(v: _Validator, item: dict[str, Any], path: str) -> RateLimit | None:
    """``rate_limit = { rate = 10.0, burst = 20 }``: requests a second per client address; burst defaults to ceil(rate)."""
    if "rate_limit" not in item:
        return None
    key = _join(path, "rate_limit")
    table = item["rate_limit"]
    if not isinstance(table, dict):
        v.error(key, f"expected a table like {{ rate = 10.0, burst = 20 }}, got {_describe(table)}")
        return None
    v.unknown_keys(table, key, _RATE_LIMIT_KEYS)
    if "rate" not in table:
        v.error(_join(key, "rate"), "missing required key (requests per second per client address, a number > 0)")
        return None
    rate = v.number(table, key, "rate", 0.0, above=0, what="requests per second per client address")
    if not rate:
        return None
    burst = v.integer(table, key, "burst", max(1, math.ceil(rate)), 1, "a request count")
    return RateLimit(rate=rate, burst=burst)


def _check_rate_limits_per_process(v: _Validator, data: dict[str, Any], config: Config) -> None:
    """Route rate limits with several workers: refused, never a silent multiplication.

    Each worker would keep its own buckets, so a client spread over N workers
    (SO_REUSEPORT hashes connections, not clients) would get up to N times the
    configured rate.  "auto" is refused too, as for hubs.
    """
    value = data.get("workers", 1)
    if config.workers == 1 and value != "auto":
        return
    for index, route in enumerate(config.routes):
        if route.rate_limit is not None:
            v.error(f"routes[{index}].rate_limit", f"workers = {_describe(value)}: each worker would keep its own "
                    "per-client buckets and a client could get up to that many times the rate; "
                    "use workers = 1 with rate_limit, or drop rate_limit")


def _check_resume(v: _Validator, data: dict[str, Any], websocket: WebSocketConfig) -> None:
    """Per-route resume keys mean nothing without the secret that turns resume on."""
    if websocket.resume_secret:
        return
    routes = data.get("routes")
    for index, item in enumerate(routes if isinstance(routes, list) else ()):
        for key in ("resume_window", "resume_buffer_bytes"):
            if isinstance(item, dict) and key in item:
                v.error(f"routes[{index}].{key}", "resumable sessions are off: set websocket.resume_secret or resume_secret_file")


def _allowed_origins(v: _Validator, item: dict[str, Any], path: str) -> tuple[str, ...]:
    key = _join(path, "allowed_origins")
    raw = item.get("allowed_origins", [])
    if not isinstance(raw, list):
        v.error(key, f'expected a list like ["https://app.example.com", "https://*.example.com"], got {_describe(raw)}')
        return ()
    if "allowed_origins" in item and not raw:
        v.error(key, 'an empty list would refuse every browser; omit the key to allow any origin, or use ["*"]')
    out = []
    for index, text in enumerate(raw):
        try:
            parse_origin_pattern(text if isinstance(text, str) else "")
        except ValueError as exc:
            v.error(f"{key}[{index}]", str(exc) if isinstance(text, str) else f"expected an origin string, got {_describe(text)}")
            continue
        out.append(text)
    return tuple(out)


def _section(
    v: _Validator, data: dict[str, Any], name: str, keys: tuple[str, ...], build: Callable[[dict[str, Any]], Any]
) -> Any:
    table = v.table(data, name)
    v.unknown_keys(table, name, keys)
    return build(table)


def _http(v: _Validator, data: dict[str, Any]) -> HttpConfig:
    return _section(v, data, "http", _HTTP_KEYS, lambda t: HttpConfig(
        header_timeout=v.seconds(t, "http", "header_timeout", 10.0),
        keepalive_timeout=v.seconds(t, "http", "keepalive_timeout", 75.0),
        max_header_size=v.integer(t, "http", "max_header_size", 16384, 1024, "a size in bytes"),
        max_body_size=v.integer(t, "http", "max_body_size", 0, 0, "a size in bytes, 0 = unlimited"),
        body_timeout=v.seconds(t, "http", "body_timeout", 60.0),
        request_id=v.boolean(t, "http", "request_id", True),
    ))


def _http2(v: _Validator, data: dict[str, Any]) -> Http2Config:
    def build(t: dict[str, Any]) -> Http2Config:
        stream_window = v.integer(t, "http2", "initial_window_size", 65535, 1, "a window in bytes", _MAX_WINDOW)
        connection_window = v.integer(t, "http2", "connection_window_size", 1048576, 65535,
                                      "a window in bytes", _MAX_WINDOW)
        return Http2Config(
            max_concurrent_streams=v.integer(t, "http2", "max_concurrent_streams", 100, 1, "a number of streams",
                                             _MAX_WINDOW),
            initial_window_size=stream_window,
            connection_window_size=connection_window,
            max_header_list_size=v.integer(t, "http2", "max_header_list_size", 32768, 1024, "a size in bytes",
                                           _MAX_WINDOW),
            flood_window=v.number(t, "http2", "flood_window", 10.0, above=0, what="a number of seconds"),
            max_resets=v.integer(t, "http2", "max_resets", 200, 1, "a number of stream resets"),
            max_control_frames=v.integer(t, "http2", "max_control_frames", 1000, 1, "a number of frames"),
            websocket=v.boolean(t, "http2", "websocket", True),
        )

    return _section(v, data, "http2", _HTTP2_KEYS, build)


def _websocket(v: _Validator, data: dict[str, Any]) -> WebSocketConfig:
    def instance_id(t: dict[str, Any]) -> str:
        value = v.string(t, "websocket", "instance_id", "", "an instance id")
        if value and not _INSTANCE_ID_RE.fullmatch(value):
            v.error("websocket.instance_id", f"expected 1 to 64 letters, digits, '.', '_' or '-', got {_describe(value)}")
            return ""
        return value or ""

    return _section(v, data, "websocket", _WEBSOCKET_KEYS, lambda t: WebSocketConfig(
        max_message_size=v.integer(t, "websocket", "max_message_size", 67108864, 0, "a size in bytes, 0 = unlimited"),
        handshake_timeout=v.seconds(t, "websocket", "handshake_timeout", 10.0),
        idle_timeout=v.seconds(t, "websocket", "idle_timeout", 3600.0),
        close_timeout=v.seconds(t, "websocket", "close_timeout", 5.0),
        ping_interval=v.seconds(t, "websocket", "ping_interval", 30.0),
        pong_timeout=v.number(t, "websocket", "pong_timeout", 60.0, above=0, what="seconds"),
        ping_upstream=v.boolean(t, "websocket", "ping_upstream", True),
        max_connection_age=v.seconds(t, "websocket", "max_connection_age", 0.0),
        resume_window=v.number(t, "websocket", "resume_window", 30.0, above=0, what="seconds"),
        resume_buffer_bytes=v.integer(t, "websocket", "resume_buffer_bytes", 1048576, _MIN_RESUME_BUFFER, "a size in bytes"),
        resume_secret=_secret(v, t, "websocket", "resume_secret", required=False),
        instance_id=instance_id(t),
        max_frame_size=v.integer(t, "websocket", "max_frame_size", 0, 0, "a size in bytes, 0 = unlimited"),
        strict=v.boolean(t, "websocket", "strict", True),
        message_rate=_rate(v, t, "websocket", "message_rate", "messages per second, 0 = unlimited"),
        message_burst=v.integer(t, "websocket", "message_burst", 0, 0, "a message count, 0 = message_rate"),
        byte_rate=_rate(v, t, "websocket", "byte_rate", "bytes per second, 0 = unlimited"),
        byte_burst=v.integer(t, "websocket", "byte_burst", 0, 0, "a size in bytes, 0 = byte_rate"),
        rate_action=v.choice(t, "websocket", "rate_action", "close", _RATE_ACTIONS),
    ))


def _rate(v: _Validator, t: dict[str, Any], path: str, key: str, what: str) -> float:
    """A rate per second: a finite number >= 0 (0 = off)."""
    return v.nonnegative(t, path, key, 0.0, f"{what} (a number >= 0)")


def _shutdown(v: _Validator, data: dict[str, Any]) -> ShutdownConfig:
    def build(t: dict[str, Any]) -> ShutdownConfig:
        code = t.get("close_code", 1001)
        if code not in SHUTDOWN_CLOSE_CODES or isinstance(code, bool):
            v.error("shutdown.close_code", f"expected 1001 (going away) or 1012 (service restart), got {_describe(code)}")
            code = 1001
        return ShutdownConfig(
            drain_timeout=v.seconds(t, "shutdown", "drain_timeout", 10.0),
            readiness_grace=v.seconds(t, "shutdown", "readiness_grace", 1.0),
            close_code=code,
            drain_policy=v.choice(t, "shutdown", "drain_policy", "paced", DRAIN_POLICIES),
        )

    return _section(v, data, "shutdown", _SHUTDOWN_KEYS, build)


def _sse(v: _Validator, data: dict[str, Any]) -> SseConfig:
    def build(t: dict[str, Any]) -> SseConfig:
        retry_min = v.seconds(t, "sse", "retry_min", 1.0)
        retry_max = v.seconds(t, "sse", "retry_max", 5.0)
        if retry_min > retry_max:
            v.error("sse.retry_max", f"expected retry_max >= retry_min ({retry_min:g}), got {retry_max:g}")
            retry_max = retry_min
        return SseConfig(
            keepalive_interval=v.seconds(t, "sse", "keepalive_interval", 15.0),
            upstream_idle_timeout=v.seconds(t, "sse", "upstream_idle_timeout", 600.0),
            retry_min=retry_min,
            retry_max=retry_max,
            boundary_timeout=v.seconds(t, "sse", "boundary_timeout", 2.0),
        )

    return _section(v, data, "sse", _SSE_KEYS, build)


def _limits(v: _Validator, data: dict[str, Any]) -> LimitsConfig:
    return _section(v, data, "limits", _LIMITS_KEYS, lambda t: LimitsConfig(
        buffer_high_water=v.integer(t, "limits", "buffer_high_water", 262144, 1024, "a size in bytes"),
        max_connections=v.integer(t, "limits", "max_connections", 0, 0, "a connection count, 0 = no limit"),
        max_connections_per_ip=v.integer(t, "limits", "max_connections_per_ip", 0, 0, "a connection count, 0 = no limit"),
        connection_rate=_rate(v, t, "limits", "connection_rate", "new connections per second, 0 = no limit"),
        connection_burst=v.integer(t, "limits", "connection_burst", 0, 0, "a connection count, 0 = connection_rate"),
        ip_connection_rate=_rate(v, t, "limits", "ip_connection_rate", "new connections per second, 0 = no limit"),
        ip_connection_burst=v.integer(t, "limits", "ip_connection_burst", 0, 0, "a connection count, 0 = ip_connection_rate"),
        ip_table_size=v.integer(t, "limits", "ip_table_size", 65536, 1, "a count of client addresses"),
        heap_trim_interval=v.seconds(t, "limits", "heap_trim_interval", 10.0),
    ))


def _admission(v: _Validator, data: dict[str, Any]) -> AdmissionConfig:
    return _section(v, data, "admission", ("scope",), lambda t: AdmissionConfig(
        scope=v.choice(t, "admission", "scope", "instance", ADMISSION_SCOPES) or "instance",
    ))


def _check_admission(v: _Validator, config: Config) -> None:
    """``scope = "cluster"`` needs a budget to share and a backplane that can hold it."""
    if config.admission.scope != "cluster":
        return
    kind = config.backplane.kind
    if config.limits.connection_rate <= 0:
        v.error("admission.scope", 'scope = "cluster" shares [limits] connection_rate among the instances, and it '
                "is 0 (no limit): set connection_rate (and connection_burst), or scope = \"instance\"")
    if kind == "memory":
        v.error("admission.scope", 'scope = "cluster" keeps the fleet\'s connection budget in the backplane, and '
                '[backplane] kind = "memory" is this process only: set kind = "redis", "redis-cluster" or "nats"')


def _logging(v: _Validator, data: dict[str, Any]) -> LoggingConfig:
    return _section(v, data, "logging", _LOGGING_KEYS, lambda t: LoggingConfig(
        level=v.choice(t, "logging", "level", "info", _LOG_LEVELS),
        format=v.choice(t, "logging", "format", "text", _LOG_FORMATS),
        access_log=v.boolean(t, "logging", "access_log", True),
        access_log_fields=_access_log_fields(v, t),
    ))


def _access_log_fields(v: _Validator, t: dict[str, Any]) -> tuple[str, ...]:
    key = "logging.access_log_fields"
    raw = t.get("access_log_fields", list(DEFAULT_ACCESS_LOG_FIELDS))
    if not isinstance(raw, list) or not raw:
        v.error(key, f'expected a non-empty list of field names like ["client", "status", "request_id"], got {_describe(raw)}')
        return DEFAULT_ACCESS_LOG_FIELDS
    out: list[str] = []
    for index, name in enumerate(raw):
        if not isinstance(name, str) or name not in ACCESS_LOG_FIELDS:
            message = f"unknown access-log field {_describe(name)} (expected one of: {', '.join(ACCESS_LOG_FIELDS)})"
            close = difflib.get_close_matches(name, ACCESS_LOG_FIELDS, n=1) if isinstance(name, str) else []
            if close:
                message += f"; did you mean {close[0]!r}?"
            v.error(f"{key}[{index}]", message)
        elif name in out:
            v.error(f"{key}[{index}]", f"field {name!r} is listed twice")
        else:
            out.append(name)
    return tuple(out) or DEFAULT_ACCESS_LOG_FIELDS


def _workers(v: _Validator, data: dict[str, Any]) -> int:
    """``workers``: an integer 1..MAX_WORKERS or "auto" (one per CPU)."""
    value = data.get("workers", 1)
    if value == "auto":
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        v.error("workers", f'expected a process count (an integer 1..{MAX_WORKERS}) or "auto" (one per CPU), got {_describe(value)}')
        return 1
    return value


def _admin(v: _Validator, data: dict[str, Any], listeners: tuple[ListenerConfig, ...], workers: int) -> AdminConfig:
    table = v.table(data, "admin")
    v.unknown_keys(table, "admin", _ADMIN_KEYS)
    enabled = v.boolean(table, "admin", "enabled", True)
    bind = DEFAULT_ADMIN_BIND
    if "bind" in table:
        bind = v.address(table["bind"], "admin.bind", min_port=0) or bind
    if enabled and bind.port != 0:
        # With N workers, worker i serves admin on port + i (see edgeproxy.supervisor).
        ports = range(bind.port, bind.port + workers)
        if ports[-1] > 65535:
            v.error("admin.bind", f"with workers = {workers} the admin ports {ports[0]}..{ports[-1]} (one per worker) pass 65535")
        for index, listener in enumerate(listeners):
            if listener.bind.host == bind.host and listener.bind.port in ports:
                used = f"address {bind}" if workers == 1 else f"admin port {listener.bind.port} (worker {listener.bind.port - bind.port})"
                v.error("admin.bind", f"{used} is already used by listeners[{index}].bind")
    api_key = v.string(table, "admin", "api_key", None, "a key string")
    if api_key is not None and len(api_key) < _MIN_API_KEY:
        v.error("admin.api_key", f"the key must be at least {_MIN_API_KEY} characters, got {len(api_key)}")
    control_key = v.string(table, "admin", "control_key", None, "a key string")
    if control_key is not None and len(control_key) < _MIN_API_KEY:
        v.error("admin.control_key", f"the key must be at least {_MIN_API_KEY} characters, got {len(control_key)}")
    elif control_key is not None and control_key == api_key:
        # Backends hold the publish key; they must not be able to reload or drain the proxy.
        v.error("admin.control_key", "must differ from api_key: whoever may publish must not control the proxy")
    control_bind = _control_bind(v, table, bind, listeners, workers) if enabled else None
    mode = 0o600
    if "control_socket_mode" in table:
        raw = table["control_socket_mode"]
        if not isinstance(raw, str) or not re.fullmatch(r"0?[0-7]{3}", raw):
            v.error("admin.control_socket_mode", f'expected octal permission bits as a string like "0600", got {_describe(raw)}')
        else:
            mode = int(raw, 8)
            if mode & 0o007:
                v.error("admin.control_socket_mode", f"{raw} lets every local user call the control endpoints; drop the bits for others")
            if not isinstance(control_bind, str):
                v.error("admin.control_socket_mode", 'applies to a Unix control socket only (control_bind = "unix:/path")')
    open_endpoints = DEFAULT_OPEN_ENDPOINTS
    if "open_endpoints" in table:
        raw = table["open_endpoints"]
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            v.error("admin.open_endpoints", f"expected a list of paths, got {_describe(raw)}")
        else:
            wrong = [item for item in raw if item not in OPEN_ENDPOINT_CHOICES]
            for item in wrong:
                v.error("admin.open_endpoints", f"{_quote(item)} cannot be open: only the read-only endpoints "
                        f"{', '.join(OPEN_ENDPOINT_CHOICES)} can; the control endpoints always follow control_key")
            open_endpoints = tuple(dict.fromkeys(raw))
            closed = [path for path in OPEN_ENDPOINT_CHOICES if path not in open_endpoints]
            if closed and control_key is None and not wrong:
                v.error("admin.open_endpoints", f"{', '.join(closed)} would need the control key, but [admin] "
                        "control_key is not set: set it, or list them")
    if enabled and control_key is None:
        # A control endpoint anyone can call is the worst kind of open door:
        # without a key, the listener that serves them must be loopback or a Unix socket.
        where = control_bind if control_bind is not None else bind
        if isinstance(where, Address) and not _is_loopback(where.host):
            key = "admin.control_bind" if control_bind is not None else "admin.bind"
            v.error(key, f"{where} is not a loopback address and [admin] control_key is not set, so anyone who "
                    "reaches it could reload or drain the proxy: set control_key, or serve the control "
                    'endpoints on loopback or a Unix socket (control_bind = "unix:/path")')
    return AdminConfig(
        bind=bind,
        enabled=enabled,
        api_key=api_key,
        max_publish_size=v.integer(table, "admin", "max_publish_size", 1048576, 1024, "a size in bytes"),
        control_key=control_key,
        control_bind=control_bind,
        control_socket_mode=mode,
        open_endpoints=open_endpoints,
    )


def _is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _control_bind(v: _Validator, table: dict[str, Any], bind: Address, listeners: tuple[ListenerConfig, ...],
                  workers: int) -> Address | str | None:
    """``admin.control_bind``: ``host:port`` or ``unix:/absolute/path``."""
    if "control_bind" not in table:
        return None
    raw = table["control_bind"]
    if isinstance(raw, str) and raw.startswith("unix:"):
        path = raw[5:]
        if not path.startswith("/"):
            v.error("admin.control_bind", f"a Unix socket path must be absolute, got {_quote(raw)}")
            return None
        if len(os.fsencode(path)) + (len(str(workers)) + 1 if workers > 1 else 0) > 107:
            v.error("admin.control_bind", f"the socket path is longer than the 107 bytes a Unix socket address holds: {_quote(raw)}")
            return None
        return path
    address = v.address(raw, "admin.control_bind", min_port=0)
    if address is None:
        return None
    if address.port != 0:
        ports = range(address.port, address.port + workers)
        taken = [(f"listeners[{i}].bind", l.bind) for i, l in enumerate(listeners)] + [("admin.bind", bind)]
        for name, other in taken:
            others = range(other.port, other.port + (workers if name == "admin.bind" else 1))
            if other.host == address.host and set(ports) & set(others):
                v.error("admin.control_bind", f"{address} overlaps {name} ({other}{' and the next ports, one per worker' if workers > 1 and name == 'admin.bind' else ''})")
        if ports[-1] > 65535:
            v.error("admin.control_bind", f"with workers = {workers} the control ports {ports[0]}..{ports[-1]} pass 65535")
    return address


def _hubs(v: _Validator, data: dict[str, Any]) -> tuple[HubConfig, ...]:
    """Validate the optional ``[[hubs]]`` array."""
    if "hubs" not in data:
        return ()
    hubs = []
    seen: dict[str, str] = {}
    for path, item in v.array_of_tables(data, "hubs"):
        v.unknown_keys(item, path, _HUB_KEYS)
        hub_path = item.get("path")
        path_key = _join(path, "path")
        if "path" not in item:
            v.error(path_key, 'missing required key (expected a request path like "/hub")')
            hub_path = "/"
        elif not isinstance(hub_path, str) or not hub_path.startswith("/") or any(
            ch.isspace() or ch in "?#" or ord(ch) < 0x20 for ch in hub_path
        ):
            v.error(path_key, f'expected a plain request path starting with "/" (no spaces, "?" or "#"), got {_describe(hub_path)}')
            hub_path = "/"
        elif hub_path in seen:
            v.error(path_key, f"duplicate hub path {hub_path!r} (already used by {seen[hub_path]})")
        else:
            seen[hub_path] = path
        secret = None
        if "token_secret" in item and "token_secret_file" in item:
            v.error(_join(path, "token_secret"), "set at most one of token_secret or token_secret_file")
        elif "token_secret" in item or "token_secret_file" in item:
            secret = _secret(v, item, path, "token_secret", required=False, minimum=_MIN_TOKEN_SECRET) or None
        hubs.append(HubConfig(
            path=hub_path,
            history_size=v.integer(item, path, "history_size", 1000, 0, "a count of publications per channel"),
            history_ttl=v.seconds(item, path, "history_ttl", 300.0),
            token_secret=secret,
            auth_hook=_hook_url(v, item, path),
            auth_hook_timeout=v.number(item, path, "auth_hook_timeout", 2.0, above=0.0, what="seconds"),
            subscriber_buffer_limit=v.integer(item, path, "subscriber_buffer_limit", 1048576, 1024, "a size in bytes"),
            max_message_size=v.integer(item, path, "max_message_size", 65536, 256, "a size in bytes"),
            max_subscriptions=v.integer(item, path, "max_subscriptions", 128, 1, "a count of channels"),
            ping_interval=v.seconds(item, path, "ping_interval", 25.0),
            fanout_batch=v.integer(item, path, "fanout_batch", 2000, 1, "a count of subscribers"),
        ))
    return tuple(hubs)


def _backplane(v: _Validator, data: dict[str, Any]) -> BackplaneConfig:
    """Validate the optional ``[backplane]`` table."""
    table = v.table(data, "backplane")
    v.unknown_keys(table, "backplane", _BACKPLANE_KEYS)
    kind = v.choice(table, "backplane", "kind", "memory", BACKPLANE_KINDS)
    urls: list[str] = []
    if "url" in table and "urls" in table:
        v.error("backplane.url", "set at most one of url or urls")
    elif "url" in table:
        urls = [table["url"]]
        keys = ["backplane.url"]
    elif "urls" in table:
        value = table["urls"]
        if not isinstance(value, list) or not value:
            v.error("backplane.urls", f"expected a non-empty array of URL strings, got {_describe(value)}")
        else:
            urls = value
        keys = [f"backplane.urls[{i}]" for i in range(len(urls))]
    if kind == "memory":
        if urls:
            v.error("backplane.kind", 'kind "memory" takes no url/urls (set kind = "redis", "redis-cluster" or "nats")')
        urls = []
    elif not urls and "url" not in table and "urls" not in table:
        v.error("backplane.url", f'kind "{kind}" needs url (or urls), e.g. "{_URL_SCHEMES[kind][0]}://127.0.0.1:'
                                 f'{4222 if kind == "nats" else 6379}"')
    for key, url in zip(keys if urls else [], urls):
        _backplane_url(v, key, url, kind)
    if kind in ("redis", "redis-cluster") and len(set(urls)) != len(urls):
        v.error("backplane.urls", "the same shard URL is listed twice" if kind == "redis" else
                "the same seed node URL is listed twice")
    if kind == "redis-cluster" and all(isinstance(u, str) for u in urls):
        _cluster_seeds(v, urls)
    slot_by = v.choice(table, "backplane", "slot_by", "channel", SLOT_BY_CHOICES)
    if "slot_by" in table and kind != "redis-cluster":
        v.error("backplane.slot_by", f'slot_by places channels on Redis Cluster slots; kind "{kind}" has none '
                                     '(set kind = "redis-cluster", or remove slot_by)')
    prefix = v.string(table, "backplane", "prefix", "edgeproxy", "a name")
    if prefix is not None and not _NAME_RE.fullmatch(prefix):
        v.error("backplane.prefix", f"expected 1-64 of A-Z a-z 0-9 _ -, got {_describe(prefix)}")
    instance_id = v.string(table, "backplane", "instance_id", None, "a name")
    if instance_id is not None and not _NAME_RE.fullmatch(instance_id):
        v.error("backplane.instance_id", f"expected 1-64 of A-Z a-z 0-9 _ -, got {_describe(instance_id)}")
    reconnect_min = v.number(table, "backplane", "reconnect_min", 0.1, above=0.0, what="seconds")
    reconnect_max = v.number(table, "backplane", "reconnect_max", 5.0, above=0.0, what="seconds")
    if reconnect_max < reconnect_min:
        v.error("backplane.reconnect_max", f"must be >= reconnect_min ({reconnect_min:g}), got {reconnect_max:g}")
    return BackplaneConfig(
        replicas=_replicas(v, table, kind, urls),
        kind=kind,
        urls=tuple(urls),
        prefix=prefix or "edgeproxy",
        instance_id=instance_id,
        heartbeat_interval=v.number(table, "backplane", "heartbeat_interval", 1.0, above=0.0, what="seconds"),
        timeout=v.number(table, "backplane", "timeout", 2.0, above=0.0, what="seconds"),
        reconnect_min=reconnect_min,
        reconnect_max=reconnect_max,
        slot_by=slot_by or "channel",
    )


#: JetStream's largest replica count
_MAX_REPLICAS = 5


def _replicas(v: _Validator, table: dict[str, Any], kind: str, urls: list) -> int:
    """``[backplane] replicas``: NATS only, 1..5, at most the servers listed in ``urls``."""
    default = 3 if kind == "nats" and len(urls) >= 3 else 1
    if "replicas" not in table:
        return default
    if kind != "nats":
        v.error("backplane.replicas", f'only kind = "nats" has replicas (JetStream); with kind = "{kind}" '
                "replication is the server's own configuration: remove the key")
        return default
    replicas = v.integer(table, "backplane", "replicas", default, 1, "a count of JetStream replicas",
                         maximum=_MAX_REPLICAS)
    if replicas > len(urls):
        v.error("backplane.replicas", f"replicas = {replicas} needs at least {replicas} servers of the NATS cluster "
                f"in urls (JetStream keeps each replica on its own server), {len(urls)} listed")
    return replicas
def _cluster_seeds(v: _Validator, urls: list[str]) -> None:
    """Seed nodes of one Redis Cluster: what one cluster client cannot honour is refused.

    The cluster client opens every node (not only the seeds) with one set of
    connection settings, so the seeds must agree on TLS and credentials; and a
    cluster has database 0 only.
    """
    parts = [urlsplit(u) for u in urls]
    for i, part in enumerate(parts):
        db = part.path.strip("/")
        if db not in ("", "0"):
            v.error(f"backplane.urls[{i}]", f"Redis Cluster has database 0 only, got /{db} in {_describe(urls[i])} "
                                            "(drop the path or write /0)")
        if part.query:
            v.error(f"backplane.urls[{i}]", f"query options are not supported for redis-cluster seeds, got "
                                            f"{_describe(urls[i])}")
    if len({p.scheme for p in parts}) > 1:
        v.error("backplane.urls", "mixes redis:// and rediss://: one cluster client uses TLS for every node "
                                  "or for none")
    if len({(p.username, p.password) for p in parts}) > 1:
        v.error("backplane.urls", "the seeds carry different credentials: one cluster client logs in to every "
                                  "node with the same user and password")


def _backplane_url(v: _Validator, key: str, url: Any, kind: str) -> None:
    schemes = _URL_SCHEMES.get(kind, ())
    example = f"{schemes[0]}://127.0.0.1:{4222 if kind == 'nats' else 6379}" if schemes else ""
    if not isinstance(url, str):
        v.error(key, f'expected a URL string like "{example}", got {_describe(url)}')
        return
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        v.error(key, f'expected a {" or ".join(s + "://" for s in schemes)} URL like "{example}", got {_describe(url)}')
        return
    try:
        port = parts.port
    except ValueError:
        port = None
        v.error(key, f"bad port in {_describe(url)}")
        return
    if not parts.hostname or port is None:
        v.error(key, f'expected host and port, like "{example}", got {_describe(url)}')


def _hook_url(v: _Validator, item: dict[str, Any], path: str) -> tuple[Address, str] | None:
    """``auth_hook = "http://host:port/path"`` split into (address, path)."""
    url = v.string(item, path, "auth_hook", None, 'an URL like "http://127.0.0.1:9000/auth"')
    if url is None:
        return None
    key = _join(path, "auth_hook")
    if not url.startswith("http://"):
        v.error(key, f'expected an http:// URL like "http://127.0.0.1:9000/auth", got {_describe(url)}')
        return None
    authority, slash, rest = url[len("http://"):].partition("/")
    address = v.address(authority, key, min_port=1)
    if address is None:
        return None
    return address, slash + rest if slash else "/"


# --------------------------------------------------------------------------- #
# Entry points
# --------------------------------------------------------------------------- #


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse and validate TOML ``text``; ``source`` names it in problems.

    Raises :class:`~edgeproxy.errors.ConfigError` listing every problem.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([(source, "", f"invalid TOML: {exc}")]) from None

    v = _Validator(source)
    v.unknown_keys(data, "", _TOP_KEYS)
    listeners = _listeners(v, data)
    upstreams = _upstreams(v, data)
    # If an upstream has no usable name, a route "referring to nothing" may just
    # be a consequence of that one mistake: skip the check rather than pile on.
    names = [u.name for u in upstreams]
    routes = _routes(v, data, names if names and all(names) else None)
    workers = _workers(v, data)
    websocket = _websocket(v, data)
    _check_resume(v, data, websocket)
    config = Config(
        listeners=listeners,
        upstreams=upstreams,
        routes=routes,
        http=_http(v, data),
        http2=_http2(v, data),
        websocket=websocket,
        limits=_limits(v, data),
        admission=_admission(v, data),
        logging=_logging(v, data),
        admin=_admin(v, data, listeners, workers),
        workers=workers,
        shutdown=_shutdown(v, data),
        sse=_sse(v, data),
        hubs=_hubs(v, data),
        backplane=_backplane(v, data),
        source=source,
        version=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )
    _check_hubs_reach_every_worker(v, data, config)
    _check_rate_limits_per_process(v, data, config)
    _check_admission(v, config)
    config = _check_h2_resume_across_workers(v, data, config)
    if v.problems:
        raise ConfigError(v.problems)
    return config


def _check_hubs_reach_every_worker(v: _Validator, data: dict[str, Any], config: Config) -> None:
    """Hubs on the in-process backplane with several workers: refused, never a silent split.

    Every worker runs its own hub, so a publication would reach only the
    subscribers of the worker that received it, and still answer 200.  "auto"
    is refused too: it means one worker on this machine and many on the next.
    """
    if not config.hubs or config.backplane.kind != "memory":
        return
    value = data.get("workers", 1)
    if config.workers > 1 or value == "auto":
        v.error("workers", f"workers = {_describe(value)} with [[hubs]] on the in-process \"memory\" backplane: "
                "each worker would run its own hub and a publication would reach only the subscribers of the "
                "worker that received it; set [backplane] kind = \"redis\" or \"nats\" (with url) so the "
                "workers share channels, or workers = 1")


def _check_h2_resume_across_workers(v: _Validator, data: dict[str, Any], config: Config) -> Config:
    """Resumable sessions with several workers: WebSocket over HTTP/2 off, never a lost resume.

    A reconnect lands on any worker; on HTTP/1.1 the worker that does not hold the
    session passes the socket to the sibling that does, but an HTTP/2 stream cannot
    be passed on (it is one of many on its connection), so that resume would get 4409
    and the client would lose what it had not yet received.  With workers above 1 (or
    "auto") and resumable routes, ``[http2] websocket`` is therefore off by default
    (browsers then open their WebSockets over HTTP/1.1) and an explicit true refused.
    """
    resumable = config.websocket.resume_secret and any(route.resume for route in config.routes)
    several = config.workers > 1 or data.get("workers", 1) == "auto"
    if not (resumable and several and config.http2.websocket):
        return config
    table = data.get("http2")
    if isinstance(table, dict) and table.get("websocket") is True:
        v.error("http2.websocket", f"workers = {_describe(data.get('workers'))} with resumable routes: a resume "
                "attempt on an HTTP/2 stream cannot be passed to the worker that holds its session, so it would "
                "get 4409 and the client would lose what it had not received; set http2.websocket = false "
                "(WebSockets then use HTTP/1.1 connections), workers = 1, or resume = false on the routes")
    return replace(config, http2=replace(config.http2, websocket=False))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate the TOML file at ``path``.

    Raises :class:`~edgeproxy.errors.ConfigError` for an unreadable file, a
    file that is not UTF-8, broken TOML, or any invalid value.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([(source, "", f"cannot read config file: {reason}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([(source, "", f"config file is not valid UTF-8: {exc}")]) from None
    return parse_config(text, source=source)

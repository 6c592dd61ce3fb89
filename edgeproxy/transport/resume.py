"""Resumable sessions on the event loop: the glue between sockets and `core.resume`.

Theory of operation
-------------------
`downstream.ClientConnection` calls three hooks and nothing else:

* `serve_client_js` answers ``GET /.edgeproxy/resume-client.js`` (the browser
  client) before routing, and ``/.edgeproxy/hub-client.js`` (the browser client
  of ``[[hubs]]``, which lives here only because it is served the same way);
* `on_upgrade` looks at each upgrade's subprotocol offers.  An offer without the
  ``edgeproxy.resume.v1`` wrapper changes nothing (byte-for-byte passthrough).  A
  new resumable session has the wrapper stripped from the upgrade forwarded to
  the backend (and ``Sec-WebSocket-Extensions`` dropped: a compressed stream can
  not be re-framed or replayed on another connection).  A resume attempt is
  answered here, never forwarded: 101, then the replay, or close 4409;
* `start_session` takes over after the backend's 101 when the client's wrapper
  fits the backend's choice: it answers the client with the wrapper, and from
  then on a `Session` owns both sockets.

A `Session` outlives its client connections: each client connection gets its own
`ClientEnd` protocol, and when it goes the session is parked in the server's
`ResumeRegistry` with the upstream still open.

With ``workers = N`` the kernel hands a reconnect to any worker, but a session
is parked in one.  Each worker then names itself in its tokens (its own
instance id) and listens on an abstract Unix socket named after it; a worker
that gets a resume attempt for a sibling's token connects there, sends one
JSON line (the client's address, the listener) and the request, and from then
on pipes bytes both ways (`_Pipe`), so the sibling serves the attempt as if
the client had come to it, TLS or not.  A sibling that is gone refuses the
connection at once, and the attempt gets close 4409 here.  An attempt on an
HTTP/2 stream (RFC 8441, `http2_websocket.H2WebSocket`) cannot be piped: the
hand-off carries an HTTP/1.1 connection's bytes, so a sibling's token on a
stream gets close 4409 too, and the client starts afresh.

On an h2 stream the same hooks run with the stream for a socket: the answer is
``:status 200`` instead of a 101 (`ClientConnection._send_switching`, which
`H2WebSocket` overrides), the bytes after the head are the DATA of the
handshake (``_switched_early``), and the stream's transport takes the
session's protocols as a socket's does (`_StreamTransport.set_protocol`).  The registry is advanced by the
server's shared tick (window expiry, close timeouts, pending acks); heartbeats
come from the server's timer wheels like every WebSocket's: a `ClientEnd` is the
client's heartbeat key, the `Session` the upstream's.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING

from wsproto.utilities import generate_accept_token

from edgeproxy import logs
from edgeproxy.core import http1
from edgeproxy.core.heartbeat import AGE_EXPIRED, DEAD, PING
from edgeproxy.core.http1 import EndOfMessage, ResponseHead
from edgeproxy.core import _accel
from edgeproxy.core.resume import (
    CLOSE_NOT_RESUMABLE,
    ENDED,
    PARKED,
    PAUSE_UPSTREAM,
    RESUME_UPSTREAM,
    MessageReader,
    NotResumable,
    Offer,
    ResumeSession,
    SessionState,
    TokenCodec,
    parse_offers,
    route_key,
)
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
from edgeproxy.errors import RemoteProtocolError
from edgeproxy.metrics import CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT, WEBSOCKET, route_label

if TYPE_CHECKING:
    from edgeproxy.transport.downstream import ClientConnection, _Exchange
    from edgeproxy.transport.server import ProxyServer
    from edgeproxy.transport.upstream import UpstreamConnection

log = logging.getLogger("edgeproxy")

#: where the proxy serves the browser client itself, before routing
CLIENT_JS_PATH = "/.edgeproxy/resume-client.js"
#: where it serves the hubs' browser client (edgeproxy/static/hub-client.js)
HUB_CLIENT_JS_PATH = "/.edgeproxy/hub-client.js"
#: every script the proxy serves itself: path -> file in edgeproxy/static
CLIENT_SCRIPTS = {CLIENT_JS_PATH: "resume-client.js", HUB_CLIENT_JS_PATH: "hub-client.js"}
_PROTOCOL_HEADER = b"sec-websocket-protocol"


#: frames smaller than this on average are joined before a write (a copy is cheaper than an iovec each)
_JOIN_BELOW = 4096


def _mask_key() -> bytes:
    return os.urandom(4)


def client_js(path: str = CLIENT_JS_PATH) -> bytes:
    """The browser client served at ``path`` (an ES module), as shipped in the package."""
    return importlib.resources.files("edgeproxy").joinpath("static", CLIENT_SCRIPTS[path]).read_bytes()


# --------------------------------------------------------------------------- #
# Hooks called by downstream.ClientConnection
# --------------------------------------------------------------------------- #


def serve_client_js(conn: ClientConnection, head: http1.RequestHead) -> bool:
    """Answer ``GET``/``HEAD`` of a path of `CLIENT_SCRIPTS`; False for any other request."""
    if head.path not in CLIENT_SCRIPTS or head.method not in (b"GET", b"HEAD") or head.has_body or head.websocket:
        return False
    event = conn.http.next_event()  # the EndOfMessage of a body-less request
    if not isinstance(event, EndOfMessage):  # pragma: no cover - h11 yields it at once
        conn._close()
        return True
    body = client_js(head.path)
    headers = [
        (b"Content-Type", b"text/javascript; charset=utf-8"),
        (b"Content-Length", b"%d" % len(body)),
        (b"Cache-Control", b"public, max-age=3600"),
    ]
    out = conn.http.send_response(ResponseHead(200, b"OK", b"1.1", headers))
    if head.method == b"GET":
        out += conn.http.send_data(body)
    conn._write(out + conn.http.send_end())
    conn._log_http(head, 200, len(body), conn.server.now())
    conn._end_cycle()
    return True


def on_upgrade(conn: ClientConnection, exchange: _Exchange) -> bool:
    """Look at an upgrade's subprotocols; True when it was answered here (a resume attempt).

    A new resumable session gets ``exchange.resume`` set and its forwarded
    headers rewritten; anything else is left exactly as it came.

    Raises:
        RemoteProtocolError: a malformed resume offer (400).
    """
    registry = conn.server.resume
    head = exchange.head
    if registry is None or not exchange.route.resume:
        return False
    values = [value for name, value in head.headers if name.lower() == _PROTOCOL_HEADER]
    offer = parse_offers(values)
    if offer is None:
        return False
    if offer.token is not None:
        registry.resume(conn, exchange, offer)
        return True
    headers = [(n, v) for n, v in head.headers
               if n.lower() not in (_PROTOCOL_HEADER, b"sec-websocket-extensions")]
    if offer.forward:
        headers.append((b"Sec-WebSocket-Protocol", ", ".join(offer.forward).encode("latin-1")))
    head.headers = headers
    exchange.resume = offer
    return False


def start_session(conn: ClientConnection, exchange: _Exchange, upstream: UpstreamConnection,
                  head: ResponseHead, headers: list[tuple[bytes, bytes]]) -> bool:
    """After the backend's 101: run the session resumable; False when the wrapper does not fit (plain relay)."""
    offer = exchange.resume
    chosen = None
    for name, value in head.headers:
        if name.lower() == _PROTOCOL_HEADER:
            chosen = value.strip().decode("latin-1")
    wrapper = offer.wrapper_for(chosen)
    if wrapper is None or any(n.lower() == b"sec-websocket-extensions" for n, _ in head.headers):
        return False
    headers = [(n, v) for n, v in headers if n.lower() != _PROTOCOL_HEADER]
    headers.append((b"Sec-WebSocket-Protocol", wrapper.encode("latin-1")))
    conn.server.resume.start(conn, exchange, upstream, wrapper, headers)
    return True


def _http_life_over(conn: ClientConnection, now: float) -> None:
    """The client connection's HTTP metrics entry ends (an h2 stream has none: its connection's goes on)."""
    if conn._metrics_key is not None:
        conn.server.metrics.connection_closed(conn._metrics_key, now - conn._opened_at)
        conn._metrics_key = None


# --------------------------------------------------------------------------- #
# Protocols
# --------------------------------------------------------------------------- #


def _release_admission(admitted: tuple | None) -> None:
    """Give back the admission slot ``(server, ip)`` a taken-over client connection held (None: none).

    It counts until the connection's socket closes; returns None for the holder to keep.
    """
    if admitted is not None:
        server, ip = admitted
        if server.admission is not None:
            server.admission.release(ip)


class ClientEnd:
    """The protocol of one client connection of a session (and its heartbeat key)."""

    __slots__ = ("session", "transport", "client_ip", "admitted", "__weakref__")

    def __init__(self, session: Session | None, transport, client_ip: str, admitted: tuple | None = None):
        self.session = session
        self.transport = transport
        self.client_ip = client_ip
        #: (server, ip) of the admission slot this connection holds, released when it closes
        self.admitted = admitted

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self.session.client_data(self, data)

    def eof_received(self) -> bool:
        if self.session is not None:
            self.session.client_lost(self)
        return False

    def connection_lost(self, exc) -> None:
        self.admitted = _release_admission(self.admitted)
        if self.session is not None:
            self.session.client_lost(self)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.client_write_paused = True
            self.session.update_upstream_reading()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.client_write_paused = False
            self.session.update_upstream_reading()

    def heartbeat(self, action: str, client: bool, payload: bytes | None) -> None:
        if self.session is not None:
            self.session.heartbeat(action, True, payload)


class UpstreamEnd:
    """The protocol of a session's upstream connection."""

    __slots__ = ("session",)

    def __init__(self, session: Session):
        self.session = session

    def data_received(self, data: bytes) -> None:
        self.session.upstream_data(data)

    def eof_received(self) -> bool:
        self.session.upstream_lost()
        return False

    def connection_lost(self, exc) -> None:
        self.session.upstream.closed = True
        self.session.upstream_lost()

    def pause_writing(self) -> None:
        client = self.session.client
        if client is not None and not client.transport.is_closing():
            client.transport.pause_reading()

    def resume_writing(self) -> None:
        client = self.session.client
        if client is not None and not client.transport.is_closing():
            client.transport.resume_reading()


class Refusal:
    """A resume attempt answered with close 4409: waits for the client's close, then closes."""

    __slots__ = ("transport", "reader", "deadline", "admitted")

    def __init__(self, transport, deadline: float, admitted: tuple | None = None):
        self.transport = transport
        self.reader = MessageReader(masked=True)
        self.deadline = deadline
        self.admitted = admitted

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.reader.feed(data)
        except RemoteProtocolError:
            self.transport.abort()
            return
        if any(opcode == _accel.OP_CLOSE for opcode, _ in messages):
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.admitted = _release_admission(self.admitted)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


# --------------------------------------------------------------------------- #
# Hand-off between workers
# --------------------------------------------------------------------------- #

#: the abstract Unix socket of a worker's hand-off ingress, by supervisor pid and instance id (the pid
#: keeps the two generations of workers apart during a binary upgrade, when both run)
_HANDOFF_ADDRESS = "\0edgeproxy.resume.{}.{}"
#: the longest first line of a hand-off (the client's address and the listener, as JSON)
_HANDOFF_LINE_MAX = 1024


class _Pipe:
    """One end of a client connection piped to a sibling worker: what it reads goes to the other end."""

    __slots__ = ("transport", "other", "registry", "pending", "admitted", "writing_paused")

    def __init__(self, registry: ResumeRegistry, admitted: tuple | None = None):
        self.transport = None
        self.other: _Pipe | None = None
        self.registry = registry
        #: bytes read before the other end was connected
        self.pending: list[bytes] = []
        self.admitted = admitted
        #: this end's transport has more to write than its high-water mark
        self.writing_paused = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is None or other.transport is None:
            self.pending.append(data)
        else:
            other.transport.write(data)

    def eof_received(self) -> bool:
        self.close_both()
        return False

    def connection_lost(self, exc) -> None:
        self.admitted = _release_admission(self.admitted)
        self.close_both()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def close_both(self) -> None:
        for end in (self, self.other):
            if end is not None and end.transport is not None and not end.transport.is_closing():
                end.transport.close()
        self.registry.pipes.discard(self)
        if self.other is not None:
            self.registry.pipes.discard(self.other)


def _is_sibling(sock: socket.socket) -> bool:
    """Whether the peer of a Unix socket is a worker of our own supervisor (same user, same parent).

    An abstract socket can be reached by any process on the host, and the
    first line names the client's address, so only a sibling may speak it.
    """
    try:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        with open(f"/proc/{pid}/status") as status:
            ppid = next(int(line.split()[1]) for line in status if line.startswith("PPid:"))
    except (OSError, StopIteration, ValueError, struct.error):
        return False
    return uid == os.getuid() and ppid == os.getppid() and pid != os.getpid()


class _HandoffIngress:
    """A sibling worker's connection carrying a resume attempt: one JSON line, then the client's bytes."""

    __slots__ = ("server", "transport", "buf")

    def __init__(self, server: ProxyServer):
        self.server = server
        self.transport = None
        self.buf = bytearray()

    def connection_made(self, transport) -> None:
        self.transport = transport
        if not _is_sibling(transport.get_extra_info("socket")):
            log.warning("resume hand-off socket: a connection from a process that is not a sibling worker, closed")
            transport.abort()

    def data_received(self, data: bytes) -> None:
        from edgeproxy.transport.downstream import ClientConnection

        if self.transport is None or self.transport.is_closing():
            return
        self.buf += data
        end = self.buf.find(b"\n")
        if end < 0:
            if len(self.buf) > _HANDOFF_LINE_MAX:
                self.transport.abort()
            return
        try:
            meta = json.loads(self.buf[:end])
            listener = self.server.config.listeners[int(meta["listener"])]
            peer = (str(meta["peer"][0]), int(meta["peer"][1]))
        except (ValueError, KeyError, IndexError, TypeError):
            log.warning("resume hand-off from a sibling worker with a bad first line: %r", bytes(self.buf[:80]))
            self.transport.abort()
            return
        rest = bytes(self.buf[end + 1:])
        # admitted already, by the worker the client is connected to
        conn = ClientConnection(self.server, listener, peer, admitted_elsewhere=True)
        self.transport.set_protocol(conn)
        conn.connection_made(self.transport)
        if rest and not conn.closed:
            conn.data_received(rest)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        self.transport = None

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


# --------------------------------------------------------------------------- #
# The session and the registry
# --------------------------------------------------------------------------- #


class Session:
    """One resumable session on the loop: carries out its `ResumeSession`'s actions."""

    def __init__(self, registry: ResumeRegistry, core: ResumeSession, upstream: UpstreamConnection,
                 exchange: _Exchange, wrapper: str, client_ip: str, now: float):
        self.registry = registry
        self.server = registry.server
        self.core = core
        self.upstream = upstream
        self.group = exchange.group
        self.route = exchange.route
        self.path = exchange.head.target.decode("latin-1")
        self.wrapper = wrapper
        self.client_ip = client_ip
        self.client: ClientEnd | None = None
        self.started = now
        self.metrics_key = None
        #: the client's socket buffer is full (one of two reasons to stop reading the upstream)
        self.client_write_paused = False

    @property
    def transport(self):
        """For the server tick's last-resort abort: the upstream's transport."""
        return self.upstream.transport

    # -- clients come and go ------------------------------------------------------

    def attach_client(self, conn: ClientConnection, now: float, admitted: tuple | None) -> ClientEnd:
        end = ClientEnd(self, conn.transport, conn.client_ip, admitted)
        self.client = end
        self.client_ip = conn.client_ip
        beats = self.server.client_beats
        if beats is not None:
            beats.register(end, now)
        return end

    def _detach_client(self) -> None:
        end = self.client
        if end is None:
            return
        self.client = None
        end.session = None
        beats = self.server.client_beats
        if beats is not None:
            beats.unregister(end)
        self.client_write_paused = False
        self.update_upstream_reading()  # unless the buffer is full, a parked upstream fills it now

    def update_upstream_reading(self) -> None:
        """Read the upstream unless the client's socket or the replay buffer is full."""
        if self.client_write_paused or self.core.upstream_paused:
            self.upstream.pause_reading()
        else:
            self.upstream.resume_reading()

    def client_data(self, end: ClientEnd, data: bytes) -> None:
        if end is self.client:
            self.core.from_client(data, self.server.now())
            if self.core.actions:
                self.run_actions()

    def client_lost(self, end: ClientEnd) -> None:
        if end is self.client:
            self.core.client_gone(self.server.now())
            self.run_actions()

    def upstream_data(self, data: bytes) -> None:
        self.core.from_upstream(data)
        if self.core.actions:
            self.run_actions()

    def upstream_lost(self) -> None:
        self.core.upstream_gone()
        self.run_actions()

    # -- heartbeats, timers, the proxy's own closes -------------------------------

    def heartbeat(self, action: str, client: bool, payload: bytes | None) -> None:
        core = self.core
        if action == PING:
            if client and self.client is not None:
                self.client.transport.write(_accel.encode_frame(_accel.OP_PING, payload))
            elif not client and not self.upstream.closed:
                self.upstream.write(_accel.encode_frame(_accel.OP_PING, payload, mask_key=_mask_key()))
            return
        if action == DEAD:
            self.server.metrics.heartbeat_failed()
            if client:
                log.info("resumable WebSocket client %s missed its pong: session parked", self.client_ip)
                core.client_gone(self.server.now())
            else:
                log.warning("WebSocket upstream %s did not answer a ping within pong_timeout", self.upstream.server)
                self.upstream.abort()
                core.upstream_gone()
        elif action == AGE_EXPIRED:
            core.close_both(1001, "maximum connection age reached; please reconnect")
        self.run_actions()

    def close_websocket(self, code: int, reason: str) -> None:
        """The proxy ends the session (rebalancing, drain, shutdown)."""
        self.core.close_both(code, reason)
        self.run_actions()

    def check_timers(self, now: float) -> None:
        self.core.check_timers(now)
        if self.core.actions:
            self.run_actions()

    def _pong(self, beats, key, payload) -> None:
        if beats is not None and payload is not None:
            rtt = beats.pong_received(key, payload, self.server.now())
            if rtt is not None:
                self.server.metrics.ping_rtt(rtt)

    def run_actions(self) -> None:
        """Carry out the core's actions in order; consecutive sends to one side become one write."""
        core = self.core
        actions = core.actions[:]
        core.actions.clear()
        up = self.upstream
        pending: list[bytes] = []
        pending_kind = None
        for kind, data in actions:
            if kind == SEND_CLIENT or kind == SEND_UPSTREAM:
                if kind != pending_kind and pending:
                    self._write(pending_kind, pending)
                    pending = []
                pending_kind = kind
                if type(data) is list:
                    pending += data
                else:
                    pending.append(data)
                continue
            if pending:
                self._write(pending_kind, pending)
                pending = []
            client = self.client
            if kind == CLOSE_CLIENT:
                if client is not None:
                    client.transport.close()
            elif kind == ABORT_CLIENT:
                if client is not None:
                    client.transport.abort()
            elif kind == CLOSE_UPSTREAM:
                up.close()
            elif kind == ABORT_UPSTREAM:
                up.abort()
            elif kind == PAUSE_UPSTREAM or kind == RESUME_UPSTREAM:
                self.update_upstream_reading()
            elif kind == PONG_FROM_CLIENT:
                self._pong(self.server.client_beats, client, data)
            elif kind == PONG_FROM_UPSTREAM:
                self._pong(self.server.upstream_beats, self, data)
            elif kind == PARKED:
                self._detach_client()
                self.registry.parked_count += 1
                log.info("resumable session from %s parked for %.1fs (%d message(s) buffered)",
                         self.client_ip, core.window, len(core.buffer))
            elif kind == ENDED:
                self._ended()
        if pending:
            self._write(pending_kind, pending)

    def _write(self, kind: str, frames: list[bytes]) -> None:
        """One write of the frames: joined when small, else a writev (no copy) on plain sockets."""
        if len(frames) > 1 and len(frames) * _JOIN_BELOW > sum(map(len, frames)):
            frames = [b"".join(frames)]
        if kind == SEND_UPSTREAM:
            if len(frames) == 1:
                self.upstream.write(frames[0])
            else:
                self.upstream.writelines(frames)
        elif self.client is not None:
            if len(frames) == 1:
                self.client.transport.write(frames[0])
            else:
                self.client.transport.writelines(frames)

    def _ended(self) -> None:
        core = self.core
        if self.client is not None:
            client = self.client
            self._detach_client()
            client.transport.close()
        if self.registry.sessions.pop(core.session_id, None) is None:
            return
        self.group.session_closed(self.upstream.server, self)
        beats = self.server.upstream_beats
        if beats is not None:
            beats.unregister(self)
        now = self.server.now()
        metrics = self.server.metrics
        metrics.add_messages(CLIENT_TO_UPSTREAM, core.messages_from_client, core.bytes_from_client)
        metrics.add_messages(UPSTREAM_TO_CLIENT, core.messages_from_upstream, core.bytes_from_upstream)
        metrics.connection_closed(self.metrics_key, now - self.started)
        logs.access({
            "event": "ws_close",
            "client": self.client_ip,
            "path": self.path,
            "upstream": self.route.upstream,
            "server": str(self.upstream.server),
            "resumable": True,
            "resumes": core.resumes,
            "end": core.end_reason,
            "duration": round(now - self.started, 3),
            "bytes_in": core.bytes_from_client,
            "bytes_out": core.bytes_from_upstream,
            "msgs_in": core.messages_from_client,
            "msgs_out": core.messages_from_upstream,
        })


class ResumeRegistry:
    """The server's resumable sessions (attached and parked), by session id.

    Args:
        server: the `ProxyServer`; ``config.websocket.resume_secret`` must be set.
        instance_id: names this proxy in tokens; default ``websocket.instance_id``
            or, when that is empty, 12 random hex digits (a restarted proxy has
            lost its parked sessions, so a new id is right).
    """

    def __init__(self, server: ProxyServer, instance_id: str | None = None):
        cfg = server.config.websocket
        self.server = server
        self.codec = TokenCodec(cfg.resume_secret, instance_id or cfg.instance_id or os.urandom(6).hex())
        self.sessions: dict[bytes, Session] = {}
        self._refusals: list[Refusal] = []
        #: sessions parked since start (a counter for tests and logs)
        self.parked_count = 0
        #: the hand-off ingress (one worker among several) and the attempts piped to siblings
        self._ingress_server = None
        self._supervisor = 0
        self.pipes: set[_Pipe] = set()
        self._connecting: set[asyncio.Task] = set()

    @property
    def instance_id(self) -> str:
        return self.codec.instance_id

    async def start_handoff(self, supervisor: int, worker_index: int) -> None:
        """Be one worker among several: a name of our own in tokens, and an ingress for siblings' hand-offs.

        A configured ``instance_id`` becomes ``<instance_id>.w<index>``; a drawn
        one is unique already.  Without the ingress (its socket cannot be made)
        the worker still runs: resumes that land elsewhere then get 4409.
        """
        cfg = self.server.config.websocket
        if cfg.instance_id and self.codec.instance_id == cfg.instance_id:
            self.codec = TokenCodec(cfg.resume_secret, f"{cfg.instance_id}.w{worker_index}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(_HANDOFF_ADDRESS.format(supervisor, self.instance_id))
            sock.listen(1024)
            sock.setblocking(False)
            self._ingress_server = await asyncio.get_running_loop().create_unix_server(
                lambda: _HandoffIngress(self.server), sock=sock)
        except OSError as exc:
            sock.close()
            log.warning("resume hand-off between workers is off in this worker: %s", exc)
            return
        self._supervisor = supervisor

    def _hand_off(self, conn: ClientConnection, exchange: _Exchange, owner: str) -> bool:
        """Pipe a resume attempt to the sibling worker `owner`; False when there is none to take it."""
        if self._ingress_server is None or owner == self.instance_id:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(_HANDOFF_ADDRESS.format(self._supervisor, owner))  # at once, or not at all
        except OSError:
            sock.close()
            return False
        server = self.server
        head = exchange.head
        bind = conn.listener.bind if conn.listener is not None else None  # kept listeners keep old objects
        index = next((i for i, item in enumerate(server.config.listeners) if item.bind == bind), 0)
        first = json.dumps({"peer": [conn.client_ip, 0], "listener": index}).encode() + b"\n"
        first += http1.serialize_head(b"%s %s HTTP/1.1" % (head.method, head.target), head.headers)
        server.metrics.connection_closed(conn._metrics_key, server.now() - conn._opened_at)
        server.metrics.resume_handoffs += 1
        early, admitted = self._take_over(conn)
        client = _Pipe(self, admitted)
        sibling = _Pipe(self)
        client.other, sibling.other = sibling, client
        client.transport = conn.transport
        conn.transport.pause_reading()  # nothing from the client may pass the request head
        conn.transport.set_protocol(client)
        self.pipes.update((client, sibling))
        log.info("resume attempt from %s handed to worker %s", conn.client_ip, owner)
        task = asyncio.get_running_loop().create_task(self._connect_pipe(client, sibling, sock, first + early))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        return True

    async def _connect_pipe(self, client: _Pipe, sibling: _Pipe, sock: socket.socket, first: bytes) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: sibling, sock)
        except OSError as exc:
            log.warning("resume hand-off to a sibling worker failed: %s", exc)
            sock.close()
            client.close_both()
            return
        if client.transport is None or client.transport.is_closing():  # the client left while we connected
            sibling.transport.close()
            return
        sibling.transport.write(first + b"".join(client.pending))
        client.pending.clear()
        if not sibling.writing_paused:  # that write may have filled the sibling's buffer
            client.transport.resume_reading()

    def parked(self) -> list[Session]:
        return [s for s in self.sessions.values() if s.core.state is SessionState.PARKED]

    def _settings(self, route) -> tuple[float, int]:
        cfg = self.server.config.websocket
        window = route.resume_window if route.resume_window is not None else cfg.resume_window
        limit = route.resume_buffer_bytes if route.resume_buffer_bytes is not None else cfg.resume_buffer_bytes
        return window, limit

    def start(self, conn: ClientConnection, exchange: _Exchange, upstream: UpstreamConnection,
              wrapper: str, headers: list[tuple[bytes, bytes]]) -> None:
        """A new resumable session: answer the client's upgrade and take both sockets over."""
        server = self.server
        now = server.now()
        route = exchange.route
        window, limit = self._settings(route)
        cfg = server.config.websocket
        core = ResumeSession(
            session_id=os.urandom(16), route_key=route_key(route.host, route.path_prefix, route.upstream),
            codec=self.codec, window=window, buffer_limit=limit, max_message_size=cfg.max_message_size,
            close_timeout=cfg.close_timeout, mask_key_source=_mask_key, now=now,
            # jittered as a plain WebSocket's, so sessions opened together do not all end together
            idle_timeout=cfg.idle_timeout * (1.0 - 0.1 * server.rng.random()),
        )
        session = Session(self, core, upstream, exchange, wrapper, conn.client_ip, now)
        self.sessions[core.session_id] = session
        conn._send_switching(headers, relayed=True)
        conn._log_http(exchange.head, 101, 0, now, upstream, event="ws_open")
        metrics = server.metrics
        _http_life_over(conn, now)
        session.metrics_key = metrics.connection_opened(
            WEBSOCKET, route_label(route.host, route.path_prefix), route.upstream, str(upstream.server))
        exchange.group.session_opened(upstream.server, session)
        upstream.websocket = True
        upstream.owner = None
        upstream_early = upstream.http.trailing_data()
        upstream.transport.set_protocol(UpstreamEnd(session))
        if server.upstream_beats is not None:
            server.upstream_beats.register(session, now)
        client_early, admitted = self._take_over(conn)
        end = session.attach_client(conn, now, admitted)
        conn.transport.set_protocol(end)
        conn.transport.resume_reading()
        core.open()
        session.run_actions()
        if upstream_early:
            session.upstream_data(upstream_early)
        if client_early:
            session.client_data(end, client_early)
        if server.draining:
            session.close_websocket(server.config.shutdown.close_code, "server shutting down")

    def _take_over(self, conn: ClientConnection) -> tuple[bytes, tuple | None]:
        """Retire the HTTP connection object whose socket a session now owns.

        Returns the bytes that came after the request head, and the admission
        slot the connection holds (``(server, ip)`` or None), which the new
        protocol must give back when the socket closes.
        """
        conn.exchange = None
        conn.closed = True  # this object no longer writes or closes the socket
        self.server.connections.discard(conn)
        admitted = (self.server, conn._admitted_ip) if conn._admitted_ip is not None else None
        conn._admitted_ip = None
        return conn._switched_early(), admitted

    def resume(self, conn: ClientConnection, exchange: _Exchange, offer: Offer) -> None:
        """A resume attempt: reattach and replay, or answer close 4409 with the reason."""
        server = self.server
        now = server.now()
        route = exchange.route
        session = None
        owner = TokenCodec.instance_of(offer.token)
        if owner is not None and owner != self.instance_id and conn.http is None and self._ingress_server is not None:
            # An h2 stream cannot be piped to the sibling that holds the session (the hand-off carries
            # an HTTP/1.1 connection's bytes): 4409, as when that sibling is gone; the client starts afresh.
            self._refuse(conn, exchange, offer, f"session belongs to worker {owner!r}, which an HTTP/2 stream "
                         "cannot be handed to", now)
            return
        if owner is not None and self._hand_off(conn, exchange, owner):
            return
        try:
            session_id, generation = self.codec.verify(offer.token, route_key(route.host, route.path_prefix, route.upstream))
            session = self.sessions.get(session_id)
            if session is None:
                raise NotResumable("unknown or expired session")
            if generation != session.core.generation:
                raise NotResumable("token already used")
            if session.wrapper not in (wrapper for wrapper, _ in offer.wrapped):
                raise NotResumable("the subprotocol offered differs from the session's")
            if session.core.state is SessionState.ATTACHED:
                # The old connection is not known dead yet: the newcomer holds the token.
                session.core.client_gone(now)
                session.run_actions()
            session.core.attach(offer.last_seq, now)
        except NotResumable as exc:
            if session is not None:
                session.run_actions()
            self._refuse(conn, exchange, offer, exc.reason, now)
            return
        _http_life_over(conn, now)
        conn._send_switching(self._switching_headers(exchange, session.wrapper))
        conn._log_http(exchange.head, 101, 0, now, session.upstream, event="ws_resume")
        client_early, admitted = self._take_over(conn)
        end = session.attach_client(conn, now, admitted)
        conn.transport.set_protocol(end)
        conn.transport.resume_reading()
        log.info("resumable session from %s resumed after %d message(s) seen", conn.client_ip, offer.last_seq)
        session.run_actions()
        if client_early:
            session.client_data(end, client_early)

    def _switching_headers(self, exchange: _Exchange, wrapper: str) -> list[tuple[bytes, bytes]]:
        """The proxy's own answer to a resume attempt: the wrapper, and on HTTP/1.1 the handshake's fields."""
        chosen = [(b"Sec-WebSocket-Protocol", wrapper.encode("latin-1"))]
        if exchange.websocket_key is None:  # an h2 stream: no key, no accept (RFC 8441 section 5)
            return chosen
        return [
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Accept", generate_accept_token(exchange.websocket_key)),
            *chosen,
        ]

    def _refuse(self, conn: ClientConnection, exchange: _Exchange, offer: Offer, reason: str, now: float) -> None:
        """Open the WebSocket only to say 4409 (a browser sees close codes, not HTTP statuses)."""
        server = self.server
        log.info("resume attempt from %s refused: %s", conn.client_ip, reason)
        server.metrics.connection_refused(WEBSOCKET, "not_resumable")
        _http_life_over(conn, now)
        headers = self._switching_headers(exchange, offer.wrapped[0][0])
        frame = _accel.encode_frame(_accel.OP_CLOSE, _accel.encode_close_payload(CLOSE_NOT_RESUMABLE, f"not resumable: {reason}"))
        conn._send_switching(headers, frame)
        conn._log_http(exchange.head, 101, 0, now, event="ws_not_resumable")
        _, admitted = self._take_over(conn)
        refusal = Refusal(conn.transport, now + server.config.websocket.close_timeout, admitted)
        conn.transport.set_protocol(refusal)
        conn.transport.resume_reading()
        self._refusals.append(refusal)

    def check_timers(self, now: float) -> None:
        """Once per server tick: every session's timers, and refusals whose client never answered."""
        for session in list(self.sessions.values()):
            try:
                session.check_timers(now)
            except Exception:  # one session's bug must not stop everyone's timers
                log.exception("timer check failed for a resumable session from %s", session.client_ip)
                session.upstream.abort()
        if self._refusals:
            keep = []
            for refusal in self._refusals:
                if refusal.transport is None:
                    continue
                if now >= refusal.deadline:
                    refusal.transport.close()
                else:
                    keep.append(refusal)
            self._refusals = keep

    def close_all(self, code: int, reason: str) -> None:
        """Shutdown: every session closes (close frames where a side is connected)."""
        for session in list(self.sessions.values()):
            session.close_websocket(code, reason)
        for session in list(self.sessions.values()):
            # No time left for the close handshakes: end what is still open.
            session.core.abandon("proxy stopped")
            session.run_actions()
        for refusal in self._refusals:
            if refusal.transport is not None:
                refusal.transport.close()
        self._refusals.clear()
        if self._ingress_server is not None:
            self._ingress_server.close()
            self._ingress_server = None
        for pipe in list(self.pipes):
            pipe.close_both()

"""Edge duties of the transport: TLS contexts, PROXY-protocol listeners, per-session rate meters.

Theory of operation
-------------------
*TLS.*  A TLS listener is created with one `ssl.SSLContext` whose
``sni_callback`` runs for every ClientHello (also one without SNI: the name is
then None) and points the handshake at the context of the certificate for that
name (``tls_sni``, ``*.domain`` matching one label) or the default one.  The
contexts live in a `ServerTLS`; `ServerTLS.reload` builds a complete new set from
the files first and swaps it in one assignment, so a bad file changes nothing,
and connections that already finished their handshake keep theirs: a reload
never drops a connection.  TLS 1.2 is the minimum, ALPN offers ``h2`` (unless
the listener has ``http2 = false``) and ``http/1.1``.

*PROXY protocol.*  The header must be read before anything else, TLS included,
and nothing after it may be taken from the socket (it may be the ClientHello).
So a PROXY-protocol listener accepts by itself: `ProxyProtocolListener` accepts a
socket, refuses sources outside ``proxy_protocol_trusted`` at once, peeks at
the bytes, consumes exactly the header (`core.proxy_protocol.parse` says how
much; while it says "more", all peeked bytes are header and are consumed), and
then hands the socket to the loop (``connect_accepted_socket``, with TLS when
configured) with the real client address.  All within ``http.header_timeout``.

*Rate meters.*  The relay's scanners already count messages and bytes per
direction; `SessionMeters` compares those totals with token buckets from the
shared timer tick, so the per-read path pays nothing for the message and byte
rate limits.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from typing import Any, Callable

from edgeproxy.config import ListenerConfig, UpstreamConfig, WebSocketConfig
from edgeproxy.core import proxy_protocol
from edgeproxy.core.admission import TokenBucket

log = logging.getLogger("edgeproxy")

__all__ = ["ProxyProtocolListener", "ServerTLS", "SessionMeters", "upstream_ssl_context"]

ALPN = ["http/1.1"]
#: a listener with ``http2`` (the default with TLS) prefers h2 (RFC 9113 section 3.2)
ALPN_H2 = ["h2", "http/1.1"]


# --------------------------------------------------------------------------- #
# TLS
# --------------------------------------------------------------------------- #


def _server_context(cert: str, key: str, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(alpn)
    context.load_cert_chain(cert, key)
    return context


class ServerTLS:
    """The TLS contexts of one listener; `context` goes to the loop, `reload()` re-reads the files."""

    def __init__(self, listener: ListenerConfig):
        self.listener = listener
        self.reloads = 0
        self._default, self._names = self._build()
        #: what the loop's server holds: it only dispatches to the current set in its SNI callback
        self.context = _server_context(listener.tls_cert, listener.tls_key, self._alpn())
        self.context.sni_callback = self._pick

    def _build(self) -> tuple[ssl.SSLContext, dict[str, ssl.SSLContext]]:
        listener = self.listener
        alpn = self._alpn()
        default = _server_context(listener.tls_cert, listener.tls_key, alpn)
        names = {entry.host: _server_context(entry.cert, entry.key, alpn) for entry in listener.tls_sni}
        return default, names

    def _alpn(self) -> list[str]:
        # Every context of the listener offers the same: the SNI callback may switch to any of them.
        return ALPN_H2 if self.listener.http2 else ALPN

    def reload(self) -> None:
        """Re-read every certificate and key; new handshakes use them, open connections are untouched.

        Raises:
            ssl.SSLError, OSError: a file is unreadable or invalid; the current set stays.
        """
        self._default, self._names = self._build()
        self.reloads += 1

    def select(self, server_name: str | None) -> ssl.SSLContext:
        """The context for a ClientHello asking for ``server_name``."""
        if server_name:
            name = server_name.lower().rstrip(".")
            names = self._names
            found = names.get(name)
            if found is None and "." in name:
                found = names.get("*." + name.split(".", 1)[1])
            if found is not None:
                return found
        return self._default

    def _pick(self, ssl_object: Any, server_name: str | None, _context: ssl.SSLContext) -> None:
        ssl_object.context = self.select(server_name)


def upstream_ssl_context(config: UpstreamConfig) -> ssl.SSLContext | None:
    """The client context for an upstream with ``tls = true`` (None without)."""
    if not config.tls:
        return None
    context = ssl.create_default_context(cafile=config.tls_ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not config.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(ALPN)
    return context


# --------------------------------------------------------------------------- #
# PROXY protocol
# --------------------------------------------------------------------------- #


class ProxyProtocolListener:
    """Accepts connections that start with a PROXY header (looks like an asyncio Server to `ProxyServer`).

    Args:
        listener: its configuration (bind, trusted sources, TLS).
        factory: ``factory(real_peer) -> Protocol`` for an accepted connection,
            ``real_peer`` the (host, port) the header named, or None (LOCAL/UNKNOWN).
        tls: the listener's `ServerTLS`, or None.
        timeout: seconds a connection has to send its header (and finish TLS).
        on_refused: called with a short reason for every connection refused here.
    """

    def __init__(self, listener: ListenerConfig, factory: Callable[[Any], asyncio.Protocol], *,
                 tls: ServerTLS | None, timeout: float, on_refused: Callable[[str], None]):
        self.config = listener
        self.factory = factory
        self.tls = tls
        self.timeout = timeout or 10.0
        self.on_refused = on_refused
        self.trusted = listener.proxy_protocol_trusted
        self.sockets: list[socket.socket] = []
        self._task: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()

    async def start(self, loop: asyncio.AbstractEventLoop, sock: socket.socket | None = None) -> None:
        """Accept on `sock` when given (bound and listening: a worker's socket), else bind one."""
        bind = self.config.bind
        if sock is None:
            family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
            sock = socket.create_server((bind.host, bind.port), family=family, backlog=self.config.backlog)
        sock.setblocking(False)
        self.sockets = [sock]
        self._loop = loop
        self._task = loop.create_task(self._accept_loop(sock))

    def _is_trusted(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = self._loop
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and friends: back off a little, like asyncio's servers
                log.warning("accept failed on %s: %s", self.config.bind, exc)
                await asyncio.sleep(0.1)
                continue
            if not self._is_trusted(peer[0]):
                log.warning("PROXY protocol: refused a connection from untrusted %s", peer[0])
                self.on_refused("untrusted_source")
                conn.close()
                continue
            conn.setblocking(False)
            task = loop.create_task(self._serve(conn, peer))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _serve(self, conn: socket.socket, peer: tuple) -> None:
        loop = self._loop
        try:
            async with asyncio.timeout(self.timeout):
                header = await self._read_header(conn)
                real = header.source if header.proxied else (peer[0], peer[1])
                tls = self.tls
                await loop.connect_accepted_socket(
                    lambda: self.factory(real), conn,
                    ssl=tls.context if tls is not None else None,
                    ssl_handshake_timeout=self.timeout if tls is not None else None,
                )
        except proxy_protocol.ProxyProtocolError as exc:
            log.warning("PROXY protocol: %s from %s", exc, peer[0])
            self.on_refused("bad_proxy_header")
            conn.close()
        except TimeoutError:
            log.warning("PROXY protocol: no header from %s within %.1fs", peer[0], self.timeout)
            self.on_refused("proxy_header_timeout")
            conn.close()
        except (OSError, ssl.SSLError) as exc:
            log.info("PROXY protocol: connection from %s failed: %s", peer[0], exc)
            conn.close()
        except asyncio.CancelledError:
            conn.close()
            raise

    async def _read_header(self, conn: socket.socket) -> proxy_protocol.ProxyHeader:
        """Consume exactly the PROXY header from ``conn`` (never a byte past it)."""
        got = bytearray()
        limit = 16 + proxy_protocol.DEFAULT_MAX_V2_LENGTH
        while True:
            await self._readable(conn)
            try:
                peeked = conn.recv(limit - len(got), socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                continue
            if not peeked:
                raise proxy_protocol.ProxyProtocolError("PROXY protocol: connection closed before the header")
            header = proxy_protocol.parse(got + peeked)
            if header is None:
                got += conn.recv(len(peeked))  # all header bytes: consume them
                continue
            rest = header.length - len(got)
            while rest:
                chunk = conn.recv(rest)
                if not chunk:
                    raise proxy_protocol.ProxyProtocolError("PROXY protocol: connection closed inside the header")
                rest -= len(chunk)
            return header

    async def _readable(self, conn: socket.socket) -> None:
        loop = self._loop
        waiter = loop.create_future()
        fd = conn.fileno()
        loop.add_reader(fd, lambda: waiter.done() or waiter.set_result(None))
        try:
            await waiter
        finally:
            loop.remove_reader(fd)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in list(self._pending):
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        tasks = [t for t in [self._task, *self._pending] if t is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------- #
# per-session message and byte rates
# --------------------------------------------------------------------------- #


class SessionMeters:
    """Message and byte buckets for both directions of one relayed session.

    `over(now, client, messages, nbytes)` is given a direction's running totals
    (the relay's counters) and says how many seconds of budget the sender is
    over: 0.0 when within its rate.
    """

    __slots__ = ("_buckets", "_seen")

    def __init__(self, cfg: WebSocketConfig, now: float):
        def bucket(rate: float, burst: int) -> TokenBucket | None:
            return TokenBucket(rate, burst or max(1.0, rate), now) if rate > 0 else None

        self._buckets = {
            side: (bucket(cfg.message_rate, cfg.message_burst), bucket(cfg.byte_rate, cfg.byte_burst))
            for side in (True, False)
        }
        self._seen = {True: (0, 0), False: (0, 0)}

    @staticmethod
    def wanted(cfg: WebSocketConfig) -> bool:
        return cfg.message_rate > 0 or cfg.byte_rate > 0

    def over(self, now: float, client: bool, messages: int, nbytes: int) -> float:
        seen_messages, seen_bytes = self._seen[client]
        self._seen[client] = (messages, nbytes)
        message_bucket, byte_bucket = self._buckets[client]
        debt = 0.0
        if message_bucket is not None:
            debt = message_bucket.charge(now, messages - seen_messages)
        if byte_bucket is not None:
            debt = max(debt, byte_bucket.charge(now, nbytes - seen_bytes))
        return debt

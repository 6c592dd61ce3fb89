"""A proxied ``text/event-stream`` response: its idle policy, signals and paced end (issue #17).

Theory of operation
-------------------
An upstream response whose ``Content-Type`` is ``text/event-stream`` (status
2xx, not HEAD) becomes a `ProxiedEventStream` as its head is forwarded, on an
HTTP/1.1 client connection (`downstream.ClientConnection`) or an HTTP/2 stream
(`http2._Stream`), its *owner*.  The owner still writes every byte; this object
decides what else goes out and when the stream ends:

* the body is relayed chunk by chunk as it arrives (never held), and each chunk
  goes through `core.sse.EventScanner` to count events and know where they end;
* the upstream's ``read_timeout`` does not apply.  Instead, ``[sse]
  keepalive_interval`` after the last byte written to the client a ``:`` comment
  goes out (only where it cannot change an event: `EventScanner.keepalive`), and
  ``upstream_idle_timeout`` after the upstream's last byte the stream ends like a
  drain's late end below (no retry: the client's EventSource reconnects after its
  own delay) and the upstream connection is closed;
* a drain (SIGTERM, a reload that removed the server, paced rebalancing, a
  server found down) reaches it through ``close_websocket(code, reason)``, the
  same call the `core.drain.Drain` batches and the rebalancer make to WebSocket
  sessions: it is registered in its upstream group's ``sessions`` and in the
  server's ``sse_streams``.  At the next event boundary (at once if it stands at
  one) the owner writes ``retry: <ms>`` with a delay drawn uniformly from
  ``[sse] retry_min..retry_max`` and ends the response cleanly (the last chunk on
  HTTP/1.1 chunked, END_STREAM on HTTP/2; a close-delimited or Content-Length
  response closes the connection after the retry).  The client's EventSource
  waits that long and reconnects, so the reconnects spread out.  When no event
  ends within ``boundary_timeout`` it ends anyway, without the retry (which
  would become part of the unfinished event); the browser drops the unfinished
  event, as it does at any end of stream;
* a compressed body (a Content-Encoding other than identity) cannot take
  inserted bytes nor be scanned: it is exempt from ``read_timeout`` and counted
  as a stream, but gets no keepalives, counts no events, and a drain ends it at
  once without a retry;
* signals: the stream is one ``protocol="sse"`` connection in the gauges, the
  opened counter and the lifetime histogram (beside WebSocket sessions; the
  client connection that carries it stays counted as ``http``), and its events
  count as ``upstream_to_client`` messages (live while it is open).

Time comes from the owner (loop time), randomness from the server's rng.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from edgeproxy.core.sse import EventScanner, is_event_stream, retry_field
from edgeproxy.metrics import SSE, UPSTREAM_TO_CLIENT, route_label

if TYPE_CHECKING:
    from edgeproxy.transport.server import ProxyServer

__all__ = ["ProxiedEventStream", "wanted"]

log = logging.getLogger("edgeproxy")


def wanted(method: bytes, status: int, headers) -> bool:
    """True for a response to relay as an event stream."""
    if method == b"HEAD" or not 200 <= status < 300:
        return False
    for name, value in headers:
        if name.lower() == b"content-type":
            return is_event_stream(value)
    return False


def _encoded(headers) -> bool:
    """A Content-Encoding (gzip, br...) other than identity: the body bytes are not the events."""
    return any(name.lower() == b"content-encoding" and value.strip().lower() not in (b"", b"identity")
               for name, value in headers)


class ProxiedEventStream:
    """One relayed event stream; its `owner` has ``end_event_stream(stream, retry)`` and ``rearm_event_stream(now)``."""

    __slots__ = ("owner", "server", "group", "address", "scanner", "key", "started", "last_upstream", "last_write",
                 "end_by", "bytes", "finished")

    def __init__(self, owner, server: ProxyServer, route, group, address, now: float, headers=()):
        self.owner = owner
        self.server = server
        self.group = group
        self.address = address
        #: None for a compressed body: nothing can be inserted, no boundary found, no event counted
        self.scanner: EventScanner | None = None if _encoded(headers) else EventScanner()
        self.key = server.metrics.connection_opened(SSE, route_label(route.host, route.path_prefix), route.upstream,
                                                    str(address))
        self.started = self.last_upstream = self.last_write = now
        #: set when a drain asked for the end: the latest time to wait for an event boundary (0: not ending)
        self.end_by = 0.0
        self.bytes = 0
        self.finished = False
        server.sse_streams.add(self)
        group.session_opened(address, self)

    # -- the body --------------------------------------------------------------

    def relay(self, data: bytes, now: float) -> tuple[bytes, bool]:
        """(what to write of `data`, whether the stream ends after it with the retry)."""
        self.last_upstream = self.last_write = now
        if self.scanner is None:
            self.bytes += len(data)
            return data, False
        cut = self.scanner.feed(data, first_only=bool(self.end_by))
        if self.end_by and cut >= 0:
            data = data[:cut]
            self.bytes += len(data)
            return data, True
        self.bytes += len(data)
        return data, False

    def retry(self) -> bytes:
        """The ``retry:`` block with this stream's jittered delay."""
        cfg = self.server.config.sse
        return retry_field(round(1000 * self.server.rng.uniform(cfg.retry_min, cfg.retry_max)))

    # -- drain, rebalancing (the `Drain` and the rebalancer call this) ------------

    def close_websocket(self, code: int, reason: str) -> None:
        """End the stream at the next event boundary (the code and reason are WebSocket's: unused)."""
        if self.finished or self.end_by:
            return
        now = self.server.now()
        if self.scanner is None:  # compressed: no boundary to wait for, no retry: can be added
            self.owner.end_event_stream(self, b"")
            return
        if self.scanner.at_boundary:
            self.owner.end_event_stream(self, self.retry())
            return
        self.end_by = now + self.server.config.sse.boundary_timeout
        self.owner.rearm_event_stream(now)

    # -- timers ------------------------------------------------------------------

    def next_check(self) -> float:
        cfg = self.server.config.sse
        due = [self.end_by] if self.end_by else []
        if cfg.keepalive_interval:
            due.append(self.last_write + cfg.keepalive_interval)
        if cfg.upstream_idle_timeout:
            due.append(self.last_upstream + cfg.upstream_idle_timeout)
        return min(due) if due else 0.0

    def check(self, now: float) -> bytes | None:
        """Timers due at `now`: bytes to write (a keepalive, maybe b""), or None when the owner ended it."""
        cfg = self.server.config.sse
        if self.end_by and now >= self.end_by:
            self.owner.end_event_stream(self, b"")  # no boundary in time: end without the retry
            return None
        if cfg.upstream_idle_timeout and now >= self.last_upstream + cfg.upstream_idle_timeout:
            log.info("upstream %s: event stream silent for upstream_idle_timeout (%gs): ending it",
                     self.address, cfg.upstream_idle_timeout)
            self.owner.end_event_stream(self, b"")
            return None
        if cfg.keepalive_interval and now >= self.last_write + cfg.keepalive_interval:
            self.last_write = now
            return self.scanner.keepalive() if self.scanner is not None else b""
        return b""

    @property
    def events(self) -> int:
        return self.scanner.events if self.scanner is not None else 0

    # -- the end -------------------------------------------------------------------

    def finish(self, now: float) -> None:
        """Fold the stream into the signals and take it off every list (once)."""
        if self.finished:
            return
        self.finished = True
        metrics = self.server.metrics
        metrics.add_messages(UPSTREAM_TO_CLIENT, self.events, self.bytes)
        metrics.connection_closed(self.key, now - self.started)
        self.server.sse_streams.discard(self)
        self.group.session_closed(self.address, self)

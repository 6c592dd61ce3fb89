"""The per-read hot path of a proxied WebSocket: pure-Python twins of the compiled code.

Theory of operation
-------------------
Once a WebSocket is relayed, every read on either socket does the same thing:
scan the frame headers in it, write it unchanged to the other socket, and only
when something unusual happened (a close frame, a broken frame, a pong that may
answer the proxy's heartbeat, a session the proxy is ending) take the slow
path.  That per-read work is split in two so the
common case can run without executing Python code when the extension is built
(`edgeproxy._speedups` has the compiled twins; `core._accel` picks):

* `RelayCore` is the base of `core.websocket.WebSocketRelay`: `from_client` and
  `from_upstream` scan and return what to forward, and call the subclass's
  `_after_stop` for the slow path.
* `RelayEndpoint` replaces a connection's protocol after the 101 (asyncio's
  `transport.set_protocol`): `data_received` feeds the relay and writes to the
  peer's transport directly; backpressure pauses the peer's reading; EOF and loss
  go back to the connection objects that own the session.

Nothing here imports asyncio: it calls `write`, `pause_reading` and
`resume_reading` on the objects it is given, as `core.fanout.write_many` does.
"""

from __future__ import annotations

from collections.abc import Callable

from edgeproxy.core.frames import FrameScanner


class RelayCore:
    """Hot-path state of one relayed session (the compiled twin has the same fields).

    A subclass provides `_after_stop(scanner, data, n, client)`, the slow path.
    The limits and rules go to the two `FrameScanner` s (``client_rules`` to the
    client's, ``upstream_rules`` to the upstream's; see `core.frames`).
    """

    def __init__(self, max_message_size: int = 0, max_frame_size: int = 0, client_rules: int = 0,
                 upstream_rules: int = 0, allowed_rsv: int = 7):
        self.client_frames = FrameScanner(max_message_size, max_frame_size, client_rules, allowed_rsv)
        self.upstream_frames = FrameScanner(max_message_size, max_frame_size, upstream_rules, allowed_rsv)
        #: False once the session is being failed or closed: data is dropped.
        self.passing = True
        #: set by every read; the shared timer tick turns it into "last active".
        self.active = False
        self.bytes_from_client = 0
        self.bytes_from_upstream = 0

    def from_client(self, data):
        """Bytes from the client; returns what to forward to the upstream."""
        self.active = True
        scanner = self.client_frames
        if scanner.close is not None or scanner.error is not None:
            return None  # nothing may follow a close frame or a broken frame
        pongs = scanner.pongs
        n = scanner.scan(data)
        self.bytes_from_client += n
        if n == len(data) and scanner.close is None and scanner.error is None and self.passing and scanner.pongs == pongs:
            return data
        return self._after_stop(scanner, data, n, True)

    def from_upstream(self, data):
        """Bytes from the upstream; returns what to forward to the client."""
        self.active = True
        scanner = self.upstream_frames
        if scanner.close is not None or scanner.error is not None:
            return None
        pongs = scanner.pongs
        n = scanner.scan(data)
        self.bytes_from_upstream += n
        if n == len(data) and scanner.close is None and scanner.error is None and self.passing and scanner.pongs == pongs:
            return data
        return self._after_stop(scanner, data, n, False)


class RelayEndpoint:
    """The protocol of one side of a relayed WebSocket (an asyncio.Protocol by duck typing).

    Args:
        relay: the session's `RelayCore` (a `WebSocketRelay`).
        from_client: True for the client's connection, False for the upstream's.
        peer: the other side's transport (where this side's bytes go).
        owner: the connection object that owned this transport before the switch;
            its `eof_received` and `connection_lost` are called.
        run_actions: called after a read that left `relay.actions` non-empty.
    """

    __slots__ = ("relay", "from_client", "peer", "owner", "run_actions")

    def __init__(self, relay, from_client: bool, peer, owner, run_actions: Callable[[], None]):
        self.relay = relay
        self.from_client = from_client
        self.peer = peer
        self.owner = owner
        self.run_actions = run_actions

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        out = relay.from_client(data) if self.from_client else relay.from_upstream(data)
        if out:
            self.peer.write(out)
        if relay.actions:
            self.run_actions()

    def eof_received(self):
        return self.owner.eof_received()

    def connection_lost(self, exc) -> None:
        self.owner.connection_lost(exc)

    def pause_writing(self) -> None:
        # This side cannot take more: stop reading the side that feeds it.
        if not self.peer.is_closing():
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.is_closing():
            self.peer.resume_reading()


class RelayEngine:
    """The relay engine's pure-Python twin: both sockets stay on their event-loop transports.

    The compiled engine (`edgeproxy._speedups.RelayEngine`) takes a relayed pair's
    sockets off the loop and relays them in C, below the loop; see its theory of
    operation.  This twin gives each transport a `RelayEndpoint` protocol instead, so
    the loop reads and Python relays: the same bytes out and the same calls to the
    relay and the owners, which is what the compiled engine does for a pair it cannot
    take (TLS).  ``tests/core/test_engine_twins.py`` checks the two against each other.

    Args:
        call_soon: ``loop.call_soon`` (unused here: the loop's transports call
            ``connection_lost`` themselves; taken so both twins are built alike).
    """

    def __init__(self, call_soon: Callable[..., object]):
        self.call_soon = call_soon
        self.pairs = 0

    def fileno(self) -> None:
        """None: nothing for the loop to watch, the transports are the loop's own."""
        return None

    def relay_pair(self, relay, client_transport, upstream_transport, client_owner, upstream_owner,
                   run_actions: Callable[[], None]):
        """Relay `relay`'s session from now on; returns the (client, upstream) transports to use.

        Each owner hears ``eof_received`` and ``connection_lost`` of its socket.  Bytes
        already read past the handshake go in with `feed`, once the owners use the
        returned transports.
        """
        self.pairs += 1
        client_transport.set_protocol(RelayEndpoint(relay, True, upstream_transport, client_owner, run_actions))
        upstream_transport.set_protocol(RelayEndpoint(relay, False, client_transport, upstream_owner, run_actions))
        return client_transport, upstream_transport

    def feed(self, side, data: bytes) -> None:
        """Relay `data` as if `side` (a transport `relay_pair` returned) had just read it."""
        if data and not side.is_closing():
            side.get_protocol().data_received(data)

    def run(self) -> None:
        """Never called: `fileno` gives the loop nothing to watch."""

    def close(self) -> None:
        """Nothing to release: the loop owns the transports and the server closes them."""

    def stats(self) -> dict:
        """Pairs handed over so far; ``sockets`` is 0, since the loop's transports hold them all."""
        return {"sockets": 0, "pairs": self.pairs}

"""WebSocket proxying: the handshake checks and the frame relay state machine.

Theory of operation
-------------------
After the upstream's 101 the proxy holds two streams of frames and relays each
byte for byte: client frames stay masked with the client's key (an attacker can
not predict it, so the upstream keeps RFC 6455 section 10.3's protection) and
upstream frames stay unmasked.  The relay never decodes data payloads; a
`FrameScanner` per direction follows frame boundaries so the proxy can count
messages, enforce the message size limit and see close frames.

The close handshake is relayed, not terminated: a close frame from one side is
forwarded to the other, and once both directions have carried a close frame the
proxy closes both TCP connections.  The proxy only speaks for itself when a side
breaks a rule or disappears, or on a timeout:

==========================  =============================  ==========================
what happened               to the client                  to the upstream
==========================  =============================  ==========================
client frame breaks a rule  close 1002 / 1009, once the    close 1001, after
                            upstream's frames owed have    ``drain_grace``
                            passed (DRAINING)
upstream breaks a rule      close 1014                     close 1002 / 1009
upstream TCP gone           close 1014                     -
client TCP gone             -                              close 1001
idle timeout                close 1001                     close 1001
==========================  =============================  ==========================

**Draining.**  When the client breaks a rule (or a policy: 1008), nothing more of
its stream goes upstream; but the upstream may owe it frames, the echo of the
client's last good message, say, which an endpoint that read the good message
before the bad frame would have sent.  So the client's own close waits (state
DRAINING).  For ``drain_grace`` seconds (`DRAIN_GRACE_SECONDS`, 0.1) the upstream
hears nothing, so it can answer what it read; then it gets its close (1001).
Its frames go to the client until its answering close, which the proxy's
close (1002 / 1009 / 1008) replaces: the client gets what a strict endpoint
would have sent it.  The client cannot prolong this (nothing it sends is
relayed or answered); an upstream that does not answer within
``close_timeout`` is treated as one that did.  Where the bad frame's first
bytes already went upstream (its header came in pieces), no close frame can
follow them: the upstream is half-closed instead, and its EOF ends the drain
as its close would.

A frame can only be injected between frames; when the stream toward a side is in
the middle of a frame, that side's connection is aborted instead (for a close),
or the frame waits (a heartbeat ping: `ping_client` / `ping_upstream` say
whether it went out).  Pongs are noticed by count on the hot path, so the slow
path runs once per pong, not per read.  The relay
gives its decisions as `actions` for the transport to carry out, and never reads
a clock or a random source: `now` and the mask-key source are passed in.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from enum import Enum

from wsproto.utilities import generate_accept_token

from edgeproxy.core import _accel
from edgeproxy.core.http1 import RequestHead, ResponseHead
from edgeproxy.errors import RemoteProtocolError

SUPPORTED_VERSION = b"13"

#: RFC 6455 section 7.4.1 and the IANA registry.
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_BAD_GATEWAY = 1014

# Actions, carried out by the transport in order.
SEND_CLIENT = "send_client"  #: write bytes to the client
SEND_UPSTREAM = "send_upstream"  #: write bytes to the upstream
CLOSE_CLIENT = "close_client"  #: close the client's TCP connection after flushing
CLOSE_UPSTREAM = "close_upstream"  #: close the upstream's TCP connection after flushing
ABORT_CLIENT = "abort_client"  #: reset the client's connection now
ABORT_UPSTREAM = "abort_upstream"  #: reset the upstream's connection now
#: half-close (FIN after flushing) but keep reading, so a peer still sending gets
#: our close frame instead of a reset (a lingering close, as nginx does)
SHUTDOWN_CLIENT = "shutdown_client"
SHUTDOWN_UPSTREAM = "shutdown_upstream"
#: a PONG came from that side (data: its payload, or None if it was too long to
#: read): the transport hands it to the heartbeat.  A pong that answers the
#: proxy's own ping and arrived alone in its read is not relayed; any other is
#: relayed on like any frame (an unsolicited pong is allowed, RFC 6455 5.5.3).
#: a deadline begins (a close frame passed one way): call ``check_timers`` at the next tick
WAKE_TIMERS = "wake_timers"
PONG_FROM_CLIENT = "pong_from_client"
PONG_FROM_UPSTREAM = "pong_from_upstream"
#: data: seconds; call ``end_grace`` after them (a timer of its own: the tick may be coarser)
DRAIN_GRACE = "drain_grace"
#: the default `WebSocketRelay.drain_grace`: an upstream answers what it has read within it
#: (an echo on a loopback takes well under a millisecond; a close handshake is waited for besides)
DRAIN_GRACE_SECONDS = 0.1


def validate_client_handshake(head: RequestHead) -> bytes:
    """Check an upgrade request against RFC 6455 section 4.2.1; return its key.

    Raises:
        RemoteProtocolError: status 400 (the caller adds `Sec-WebSocket-Version: 13`).
    """
    if head.method != b"GET":
        raise RemoteProtocolError("WebSocket upgrade must use GET")
    if head.http_version != b"1.1":
        raise RemoteProtocolError("WebSocket upgrade needs HTTP/1.1")
    if head.header(b"host") is None:
        raise RemoteProtocolError("WebSocket upgrade without Host")
    version = head.header(b"sec-websocket-version")
    if version is None or version.strip() != SUPPORTED_VERSION:
        raise RemoteProtocolError("unsupported or missing Sec-WebSocket-Version (13 is supported)")
    key = head.header(b"sec-websocket-key")
    if key is None:
        raise RemoteProtocolError("missing Sec-WebSocket-Key")
    key = key.strip()
    try:
        decoded = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != 16:
        raise RemoteProtocolError("Sec-WebSocket-Key is not 16 bytes in base64")
    return key


def frame_rules(strict: bool, extensions: bytes | None) -> tuple[int, int, int]:
    """What the relay's scanners enforce: ``(client rules, upstream rules, allowed RSV bits)``.

    ``extensions`` is the upstream 101's Sec-WebSocket-Extensions value (None when
    absent).  permessage-deflate (RFC 7692) gives RSV1 a meaning; an extension the
    proxy does not know may give any RSV bit or reserved opcode one, so those are
    then left to the endpoints.  Masking, control-frame and fragmentation rules
    hold whatever was negotiated.
    """
    if not strict:
        return (0, 0, 7)
    names = [part.split(b";", 1)[0].strip().lower() for part in (extensions or b"").split(b",")]
    names = [name for name in names if name]
    common = _accel.RULES_STRICT
    if any(name != b"permessage-deflate" for name in names):
        common &= ~_accel.RULE_OPCODES
        allowed_rsv = 7
    else:
        allowed_rsv = 4 if names else 0
    return (common | _accel.RULE_MASKED, common | _accel.RULE_UNMASKED, allowed_rsv)


def validate_upstream_accept(key: bytes, response: ResponseHead) -> None:
    """Check the upstream's 101 answers this client's key (RFC 6455 section 4.1).

    Raises:
        RemoteProtocolError: status 502.
    """
    accept = None
    for name, value in response.headers:
        if name.lower() == b"sec-websocket-accept":
            accept = value.strip()
    if accept is None or accept != generate_accept_token(key):
        raise RemoteProtocolError("upstream's Sec-WebSocket-Accept does not match the key", status_hint=502)


#: the longest an open session with an idle timeout goes unchecked (see `WebSocketRelay.next_check`)
IDLE_CHECK_SECONDS = 10.0


class RelayState(Enum):
    #: Frames flow both ways.  Next: CLOSING, FAILING or CLOSED.
    OPEN = "open"
    #: A close frame passed one way; waiting for the answer.  Next: CLOSED.
    CLOSING = "closing"
    #: The client broke a rule: the upstream gets a close after ``drain_grace``; its
    #: frames still go to the client until its answer.  Next: FAILING or CLOSED.
    DRAINING = "draining"
    #: The proxy sent its own close frames; waiting for answers.  Next: CLOSED.
    FAILING = "failing"
    #: Both TCP connections are being closed.
    CLOSED = "closed"


class WebSocketRelay(_accel.RelayCore):
    """Relays one proxied WebSocket session between a client and an upstream.

    Call `from_client(data)` / `from_upstream(data)` (the hot path, inherited from
    `RelayCore`, compiled when the extension is built) with what each side sent:
    they return the bytes to forward to the other side (usually `data` itself).
    Then, if `actions` is non-empty, carry them out in order and clear the list.
    `client_eof()`, `upstream_eof()` and `check_timers(now)` may add actions too.
    """

    def __init__(
        self,
        *,
        max_message_size: int = 0,
        idle_timeout: float = 0.0,
        close_timeout: float = 5.0,
        mask_key_source: Callable[[], bytes],
        now: float = 0.0,
        max_frame_size: int = 0,
        rules: tuple[int, int, int] = (0, 0, 7),
        drain_grace: float = 0.0,
    ):
        # rules: (client rules, upstream rules, allowed RSV bits), see `frame_rules`
        super().__init__(max_message_size, max_frame_size, *rules)
        self.idle_timeout = idle_timeout
        self.close_timeout = close_timeout
        #: seconds the upstream may still answer a client's last good frames before it
        #: hears of the client's broken one (see DRAINING); 0 = it hears at once
        self.drain_grace = drain_grace
        self._mask_key = mask_key_source
        self._state = RelayState.OPEN
        self.actions: list[tuple[str, bytes | float | None]] = []
        #: (code, reason) of the close frame each side sent, once seen.
        self.client_close: tuple[int | None, str] | None = None
        self.upstream_close: tuple[int | None, str] | None = None
        #: the close code the proxy itself sent to the client, if any.
        self.proxy_close_code: int | None = None
        #: in DRAINING: the close the client is owed; whether the stream toward the
        #: upstream ends inside a frame; whether the upstream was told
        self._drain_close: tuple[int, str] = (CLOSE_PROTOCOL_ERROR, "")
        self._drain_cut = False
        self._upstream_told = False
        self._last_active = now
        self._deadline = 0.0
        # In FAILING, the proxy waits for both sides' answers itself.
        self._await_client = False
        self._await_upstream = False
        # PONG frames already reported, per side
        self._client_pongs = 0
        self._upstream_pongs = 0
        # payloads of the proxy's own outstanding pings, per side
        self._client_ping: bytes | None = None
        self._upstream_ping: bytes | None = None

    @property
    def state(self) -> RelayState:
        return self._state

    @state.setter
    def state(self, value: RelayState) -> None:
        self._state = value
        # The hot path only asks "relay data?", as one flag.  In DRAINING each read
        # takes the slow path: the upstream's until its close, the client's to be dropped.
        self.passing = value is RelayState.OPEN or value is RelayState.CLOSING

    def _after_stop(self, scanner, data: bytes, n: int, client: bool):
        """The slow path: a pong, a close frame, a broken frame, or a session being failed."""
        if client:
            if scanner.pongs != self._client_pongs:
                self._client_pongs = scanner.pongs
                self.actions.append((PONG_FROM_CLIENT, scanner.last_pong))
                if self._own_pong_alone(scanner, data, n, self._client_ping, 6):
                    self._client_ping = None
                    return None
        elif scanner.pongs != self._upstream_pongs:
            self._upstream_pongs = scanner.pongs
            self.actions.append((PONG_FROM_UPSTREAM, scanner.last_pong))
            if self._own_pong_alone(scanner, data, n, self._upstream_ping, 2):
                self._upstream_ping = None
                return None
        if self.state is RelayState.DRAINING:
            # nothing more of the client's goes upstream (a rate limit leaves its stream readable)
            return None if client else self._drained(scanner, data, n)
        if scanner.close is None and scanner.error is None:
            # Only a pong brought us here (the scan then took all of data), or the
            # session is FAILING: the proxy ended it, and data is dropped.
            return data if self.passing else None
        forward = data[:n] if n != len(data) else data
        if scanner.error is not None:
            if self.state is RelayState.FAILING or self.state is RelayState.CLOSED:
                return None
            # mid_frame after an error: the bad header began in an earlier read,
            # so its first bytes are already on their way to the other side.
            self._peer_broke_rule(client=client, partial=scanner.mid_frame)
            return forward
        if client:
            self.client_close = scanner.close
        else:
            self.upstream_close = scanner.close
        if self.state is RelayState.FAILING:
            if client:
                self._await_client = False
            else:
                self._await_upstream = False
            self._maybe_finish_failing()
            return None
        self._close_frame_passed()
        return forward

    # -- the rest of the state machine ----------------------------------------

    def _close_frame_passed(self) -> None:
        if self.client_close is not None and self.upstream_close is not None:
            # Both directions carried a close frame: the handshake is complete.
            # The forwarded frame must be written before the TCP close, so the
            # transport carries out these actions after forwarding.
            self._finish()
        elif self.state is RelayState.OPEN:
            self.state = RelayState.CLOSING
            self._deadline = -1.0  # armed by the next check_timers()
            self.actions.append((WAKE_TIMERS, None))

    def _finish(self) -> None:
        self.state = RelayState.CLOSED
        self.actions.append((CLOSE_CLIENT, None))
        self.actions.append((CLOSE_UPSTREAM, None))

    def _client_close_frame(self, code: int, reason: str) -> bytes:
        return _accel.encode_frame(_accel.OP_CLOSE, _accel.encode_close_payload(code, reason))

    def _upstream_close_frame(self, code: int, reason: str) -> bytes:
        return _accel.encode_frame(
            _accel.OP_CLOSE, _accel.encode_close_payload(code, reason), mask_key=self._mask_key()
        )

    def _tell_client(self, code: int, reason: str) -> bool:
        """Send the client a close frame; True if it went out.

        Nothing is sent when the client already has the upstream's close frame;
        when the stream toward it is inside a frame, it is aborted instead.
        """
        if self.upstream_close is not None:
            return False
        if self.upstream_frames.mid_frame:
            self.actions.append((ABORT_CLIENT, None))
            return False
        self.proxy_close_code = code
        self.actions.append((SEND_CLIENT, self._client_close_frame(code, reason)))
        return True

    def _tell_upstream(self, code: int, reason: str) -> bool:
        """The mirror of `_tell_client`, with a masked close frame."""
        if self.client_close is not None:
            return False
        if self.client_frames.mid_frame:
            self.actions.append((ABORT_UPSTREAM, None))
            return False
        self.actions.append((SEND_UPSTREAM, self._upstream_close_frame(code, reason)))
        return True

    def _peer_broke_rule(self, *, client: bool, partial: bool) -> None:
        scanner = self.client_frames if client else self.upstream_frames
        error = scanner.error
        assert error is not None
        self.fail_sender(client=client, code=error.close_code, reason=str(error)[:100], partial=partial)

    def fail_sender(self, *, client: bool, code: int, reason: str, partial: bool = False) -> None:
        """End the session because one side broke a rule or a policy (a rate limit: 1008).

        The offender gets ``code``; the other side 1001 (the client's fault) or
        1014 (the upstream's).  ``partial``: the offender's stream toward the
        other side ends inside a frame, which is then aborted.  A client's
        close waits for the upstream's frames on their way (DRAINING).
        """
        if self.state in (RelayState.DRAINING, RelayState.FAILING, RelayState.CLOSED):
            return
        # The offender's stream cannot be parsed past the bad frame: tell it why,
        # half-close, and wait for its EOF.  The other side gets a normal close.
        if client and self.state is RelayState.OPEN:
            # The upstream may owe the client frames: they go first (DRAINING).
            self._drain_close = (code, reason)
            # the stream toward the upstream ends inside a frame: no close frame can go there
            self._drain_cut = partial or self.client_frames.mid_frame
            self._upstream_told = False
            self.state = RelayState.DRAINING
            if self.drain_grace > 0:
                self.actions.append((DRAIN_GRACE, self.drain_grace))
            else:
                self._tell_drained_upstream()
            self._deadline = -1.0  # armed by the next check_timers()
            self.actions.append((WAKE_TIMERS, None))
            return
        if client:
            if partial:
                self.actions.append((ABORT_UPSTREAM, None))
                await_upstream = False
            else:
                await_upstream = self._tell_upstream(CLOSE_GOING_AWAY, "client broke the protocol")
            await_client = self._tell_client(code, reason)
            if await_client:
                self.actions.append((SHUTDOWN_CLIENT, None))
        else:
            await_upstream = self._tell_upstream(code, reason)
            if await_upstream:
                self.actions.append((SHUTDOWN_UPSTREAM, None))
            if partial:
                self.actions.append((ABORT_CLIENT, None))
                await_client = False
            else:
                await_client = self._tell_client(CLOSE_BAD_GATEWAY, "upstream broke the protocol")
        self._fail(await_client, await_upstream)

    def end_grace(self) -> None:
        """`drain_grace` seconds after a client broke a rule: the upstream gets its close now.

        The transport calls it after a `DRAIN_GRACE` action (a timer of that length).
        """
        if self.state is RelayState.DRAINING and not self._upstream_told:
            self._tell_drained_upstream()

    def _tell_drained_upstream(self) -> None:
        self._upstream_told = True
        if self._drain_cut:
            # A half-close ends the stream; what the upstream sends still comes.
            self.actions.append((SHUTDOWN_UPSTREAM, None))
        else:
            self.actions.append((SEND_UPSTREAM, self._upstream_close_frame(CLOSE_GOING_AWAY, "client broke the protocol")))

    def _drained(self, scanner, data: bytes, n: int) -> bytes | None:
        """A read from the upstream in DRAINING: relayed; its close (or broken frame) ends the drain.

        The frames before the close go to the client, the close does not: the
        proxy's own takes its place, unless the close began in an earlier read
        (its first bytes went out already: the client then gets the upstream's).
        """
        forward = data[:n] if n != len(data) else data
        if scanner.close is None and scanner.error is None:
            return forward
        if scanner.error is not None:
            # The frames before the broken one are owed; the client then gets its close.
            self._end_drain()
            return forward
        self.upstream_close = scanner.close  # (during the grace: a close that crossed the client's breach)
        kept = len(forward) - scanner.close_size
        if kept >= 0:
            self._end_drain()
            return forward[:kept]
        if not self._upstream_told:
            self._tell_drained_upstream()  # the answer to its close
        self.actions.append((SHUTDOWN_CLIENT, None))
        self._fail(True, False)
        return forward

    def _end_drain(self, upstream_gone: bool = False) -> None:
        """The client gets its close now: nothing more is owed to it (or we waited long enough)."""
        code, reason = self._drain_close
        await_upstream = False
        if not self._upstream_told and not upstream_gone:
            # Ended within the grace (a shutdown, say): the upstream's answer is waited for.
            self._tell_drained_upstream()
            await_upstream = True
        if self.upstream_frames.mid_frame:
            # A stalled upstream left the stream toward the client inside a frame.
            self.actions.append((ABORT_CLIENT, None))
            await_client = False
        else:
            self.proxy_close_code = code
            self.actions.append((SEND_CLIENT, self._client_close_frame(code, reason)))
            self.actions.append((SHUTDOWN_CLIENT, None))
            await_client = True
        self._fail(await_client, await_upstream)

    def _fail(self, await_client: bool, await_upstream: bool) -> None:
        self.state = RelayState.FAILING
        self._await_client = await_client and self.client_frames.close is None
        self._await_upstream = await_upstream and self.upstream_frames.close is None
        self._deadline = -1.0
        self._maybe_finish_failing()

    def _maybe_finish_failing(self) -> None:
        if not self._await_client and not self._await_upstream:
            self._finish()

    def client_eof(self) -> None:
        """The client's TCP connection ended (FIN or reset)."""
        if self.state is RelayState.CLOSED:
            return
        if self.state is RelayState.DRAINING:
            # Nobody is left to be owed anything.
            if not self._upstream_told:
                self._tell_drained_upstream()
            self.state = RelayState.CLOSED
            self.actions.append((CLOSE_UPSTREAM, None))
            return
        if self.state is RelayState.FAILING:
            self._await_client = False
            self._maybe_finish_failing()
            return
        if self.client_close is None:
            self._tell_upstream(CLOSE_GOING_AWAY, "client went away")
        self.state = RelayState.CLOSED
        self.actions.append((CLOSE_UPSTREAM, None))

    def upstream_eof(self) -> None:
        """The upstream's TCP connection ended (FIN or reset)."""
        if self.state is RelayState.CLOSED:
            return
        if self.state is RelayState.DRAINING:
            self._end_drain(upstream_gone=True)  # nothing more can come from it
            return
        if self.state is RelayState.FAILING:
            self._await_upstream = False
            self._maybe_finish_failing()
            return
        if self.upstream_close is None:
            self._tell_client(CLOSE_BAD_GATEWAY, "upstream went away")
        self.state = RelayState.CLOSED
        self.actions.append((CLOSE_CLIENT, None))

    def _own_pong_alone(self, scanner, data: bytes, n: int, ping: bytes | None, header: int) -> bool:
        """True when `data` is exactly one PONG answering the proxy's ping: it need not be relayed.

        The pong's payload equals the ping's, so its frame is `header` (2, plus 4
        for a client's mask key) + len(ping) bytes; a read of exactly that length
        that ends at a frame boundary and holds that pong holds nothing else.
        """
        return (
            ping is not None
            and scanner.last_pong == ping
            and n == len(data) == header + len(ping)
            and not scanner.mid_frame
            and scanner.close is None
            and scanner.error is None
            and self.passing
        )

    def ping_client(self, payload: bytes) -> bool:
        """Send the client a heartbeat PING; False when it cannot go now.

        It cannot while the stream toward the client is inside a frame (the
        transport tries again on a later tick) or once the session is closing.
        """
        if self._state is not RelayState.OPEN or self.upstream_frames.mid_frame:
            return False
        self._client_ping = payload
        self.actions.append((SEND_CLIENT, _accel.encode_frame(_accel.OP_PING, payload)))
        return True

    def ping_upstream(self, payload: bytes) -> bool:
        """The mirror of `ping_client`: a masked PING, as a client sends it."""
        if self._state is not RelayState.OPEN or self.client_frames.mid_frame:
            return False
        self._upstream_ping = payload
        self.actions.append((SEND_UPSTREAM, _accel.encode_frame(_accel.OP_PING, payload, mask_key=self._mask_key())))
        return True

    def close_both(self, code: int, reason: str) -> None:
        """The proxy ends the session itself (idle timeout, shutdown)."""
        if self.state is RelayState.CLOSED or self.state is RelayState.FAILING:
            return
        if self.state is RelayState.DRAINING:
            self._end_drain()  # the upstream has its close already; the client gets the one it is owed
            return
        await_client = self._tell_client(code, reason)
        await_upstream = self._tell_upstream(code, reason)
        self._fail(await_client, await_upstream)

    def check_timers(self, now: float) -> None:
        """Called periodically by one shared timer; closes idle or stuck sessions."""
        if self.active:
            self.active = False
            self._last_active = now
        if self.state is RelayState.OPEN:
            if self.idle_timeout and now - self._last_active >= self.idle_timeout:
                self.close_both(CLOSE_GOING_AWAY, "idle timeout")
                self._deadline = now + self.close_timeout
        elif self.state is RelayState.DRAINING:
            if self._deadline < 0:
                self._deadline = now + self.close_timeout
            elif now >= self._deadline:
                self._end_drain()  # the upstream did not answer in time: stop waiting for it
        elif self.state in (RelayState.CLOSING, RelayState.FAILING):
            if self._deadline < 0:
                self._deadline = now + self.close_timeout
            elif now >= self._deadline:
                self.state = RelayState.CLOSED
                self.actions.append((ABORT_CLIENT, None))
                self.actions.append((ABORT_UPSTREAM, None))

    def next_check(self, now: float) -> float:
        """When `check_timers` must run next; 0.0 when no deadline is pending.

        An open session with an idle timeout is looked at every quarter of it (at most
        `IDLE_CHECK_SECONDS`): the hot path only sets `active`, so an idle close comes
        that much late at most, as with a tick of that length.  A close in progress
        is looked at by its deadline (or at once, to arm it).
        """
        state = self._state
        if state is RelayState.OPEN:
            if not self.idle_timeout:
                return 0.0
            return now + min(self.idle_timeout / 4, IDLE_CHECK_SECONDS)
        if state is RelayState.CLOSING or state is RelayState.FAILING or state is RelayState.DRAINING:
            return now if self._deadline < 0 else self._deadline
        return 0.0

    @property
    def messages_from_client(self) -> int:
        return self.client_frames.messages

    @property
    def messages_from_upstream(self) -> int:
        return self.upstream_frames.messages

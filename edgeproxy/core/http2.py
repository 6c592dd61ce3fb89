"""HTTP/2 to clients, over h2, with the policy an edge needs.

Theory of operation
-------------------
`ServerConnection` wraps one server-side `h2.connection.H2Connection`: bytes go
in with the time (`receive_data(data, now)`), our own small events come out,
and `data_to_send()` gives the bytes to write.  Nothing here touches a socket
or a clock; the transport (`transport/http2.py`) turns each request stream into
one HTTP/1.1 request upstream.

* **Requests become `http1.RequestHead`s** (RFC 9113 section 8.3.1): ``:method``
  and ``:path`` give the request line, ``:authority`` becomes ``Host`` (a
  ``Host`` that names another authority is a 400, as is an authority outside
  RFC 3986's grammar), cookie crumbs are joined with "; " (section 8.2.3), so
  routing, balancing, X-Forwarded-* and hop-by-hop rules are the HTTP/1.1 ones.
  h2 itself refuses connection-specific headers and bad pseudo-headers.
* **Flow control both ways.**  Response bytes wait in a per-stream queue until
  the client's stream and connection windows let them out (`send_data`
  reports when a stream's queue passes ``stream_buffer``, so the transport stops
  reading that stream's upstream; `Drained` says when it may read again).
  Request bytes are acknowledged (WINDOW_UPDATE) only when the transport says
  so (`ack`), after the upstream took them: a slow upstream stalls its own
  stream, not the connection.
* **Abuse is counted before h2 parses it.**  `_FrameScanner` reads only frame
  headers (9 bytes each) and keeps, per connection and per ``flood_window``:
  RST_STREAMs received (rapid reset, CVE-2023-44487), control frames that cost
  the server work or an answer (SETTINGS and PING without ACK, PRIORITY, empty
  DATA without END_STREAM: the 2019 flood family and unanswered-ack floods),
  and the size of a header block across CONTINUATION frames (the
  CVE-2024-27316 family).  Past a budget the connection ends with GOAWAY
  ENHANCE_YOUR_CALM, and a `Terminated` event names the reason for the
  metrics.  HPACK bombs stop at ``max_header_list_size`` in h2's decoder
  (GOAWAY ENHANCE_YOUR_CALM); more than ``max_concurrent_streams`` is h2's
  PROTOCOL_ERROR.
* **WebSocket over HTTP/2** (RFC 8441), when ``websocket`` is on: our SETTINGS
  carry ``SETTINGS_ENABLE_CONNECT_PROTOCOL = 1`` and an extended CONNECT with
  ``:protocol = websocket`` (``:scheme``, ``:path`` and ``:authority`` present,
  ``sec-websocket-version: 13``) becomes a `WebSocketRequest` whose head is the
  HTTP/1.1 upgrade the transport sends upstream (`transport/http2_websocket.py`);
  any other ``:protocol``, or any extended CONNECT while it is off, is a 501.
  Such a stream stays `open` after our END_STREAM (`half_close`): the client's
  answering close frame still comes.
* **Graceful shutdown** (`goaway`): a GOAWAY NO_ERROR naming the last stream
  taken; streams the client opens after it are refused (RST_STREAM
  REFUSED_STREAM) while those in flight finish.  h2's own `close_connection`
  would stop them from sending, so that frame is written here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from edgeproxy.core import http1
from edgeproxy.core.http1 import REASONS, Headers, RequestHead, _split_host, strip_hop_by_hop, valid_host

#: the client connection preface (RFC 9113 section 3.4)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types and flags (RFC 9113 section 6)
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS, _PING, _CONTINUATION = 0, 1, 2, 3, 4, 6, 9
_END_STREAM = _ACK = 0x1
_END_HEADERS = 0x4

#: why a connection ended, as counted in the metrics (`Metrics.http2_error`)
RAPID_RESET = "rapid_reset"
CONTROL_FLOOD = "control_flood"
CONTINUATION_FLOOD = "continuation_flood"
HEADER_LIST_TOO_LARGE = "header_list_too_large"
TOO_MANY_STREAMS = "too_many_streams"
FLOW_CONTROL = "flow_control"
PROTOCOL_ERROR = "protocol_error"
CLIENT_GOAWAY = "client_goaway"
ERROR_REASONS = (RAPID_RESET, CONTROL_FLOOD, CONTINUATION_FLOOD, HEADER_LIST_TOO_LARGE, TOO_MANY_STREAMS,
                 FLOW_CONTROL, PROTOCOL_ERROR)


# -- events -------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    """A request head arrived on a new stream (``ended``: it has no body)."""

    stream_id: int
    head: RequestHead
    ended: bool


@dataclass(slots=True)
class WebSocketRequest:
    """An RFC 8441 extended CONNECT for a WebSocket: ``head`` is the upgrade to send upstream (no key yet)."""

    stream_id: int
    head: RequestHead


@dataclass(slots=True)
class Refused:
    """A request that cannot be served as asked: answer ``status`` on its stream."""

    stream_id: int
    status: int
    message: str
    #: the request has no body to come
    ended: bool = True
    #: fields the answer carries (``sec-websocket-version: 13`` for a version not supported, RFC 6455 4.4)
    headers: tuple = ()


@dataclass(slots=True)
class Data:
    """Request body bytes; ``flow`` is what to `ack` once they are taken (padding included)."""

    stream_id: int
    data: bytes
    flow: int


@dataclass(slots=True)
class RequestEnded:
    """The request is complete; ``trailers``: the fields of its trailing HEADERS frame, if it had one."""

    stream_id: int
    trailers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(slots=True)
class Reset:
    """The client reset a stream (or h2 did, for a stream error): forget it."""

    stream_id: int
    error_code: int


@dataclass(slots=True)
class Drained:
    """A stream's queued response bytes fell to ``stream_buffer`` or below: read its upstream again."""

    stream_id: int


@dataclass(slots=True)
class Terminated:
    """The connection is over: write what is left, then close. ``reason`` is one of `ERROR_REASONS` or
    `CLIENT_GOAWAY`."""

    reason: str
    error_code: int
    message: str = ""


# -- the frame scanner ------------------------------------------------------------


class _Abuse(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _FrameScanner:
    """Frame headers only, counted against the per-connection budgets (see the module docstring)."""

    __slots__ = ("window", "max_resets", "max_control", "max_block", "_started", "resets", "control",
                 "_skip", "_head", "_block", "_preface")

    def __init__(self, *, window: float, max_resets: int, max_control: int, max_block: int, now: float):
        self.window = window
        self.max_resets = max_resets
        self.max_control = max_control
        self.max_block = max_block
        self._started = now
        self.resets = 0
        self.control = 0
        self._skip = 0  # payload bytes of the current frame still to pass over
        self._head = b""  # a frame header split between reads
        self._block = -1  # header block bytes so far while CONTINUATIONs are due, else -1
        self._preface = len(PREFACE)

    def feed(self, data: bytes, now: float) -> None:
        """Raises `_Abuse` when a budget is spent."""
        if now - self._started >= self.window:
            self._started = now
            self.resets = self.control = 0
        pos = 0
        end = len(data)
        if self._preface:
            taken = min(self._preface, end)
            self._preface -= taken
            pos = taken
        if self._head:
            data = self._head + data[pos:]
            pos, end = 0, len(data)
            self._head = b""
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            if end - pos < 9:
                self._head = bytes(data[pos:end])
                return
            length_hi, length_lo, kind, flags = struct.unpack_from("!BHBB", data, pos)
            length = (length_hi << 16) | length_lo
            pos += 9
            self._skip = length
            self._frame(kind, flags, length)

    def _frame(self, kind: int, flags: int, length: int) -> None:
        if kind == _HEADERS:
            self._block = -1 if flags & _END_HEADERS else length
        elif kind == _CONTINUATION and self._block >= 0:
            self._block += length
            if self._block > self.max_block:
                raise _Abuse(CONTINUATION_FLOOD, f"header block over {self.max_block} bytes across CONTINUATION frames")
            if flags & _END_HEADERS:
                self._block = -1
        elif kind == _RST_STREAM:
            self.resets += 1
            if self.resets > self.max_resets:
                raise _Abuse(RAPID_RESET, f"more than {self.max_resets} stream resets within {self.window:g}s")
        elif (kind in (_SETTINGS, _PING) and not flags & _ACK) or kind == _PRIORITY or (
            kind == _DATA and length == 0 and not flags & _END_STREAM
        ):
            self.control += 1
            if self.control > self.max_control:
                raise _Abuse(CONTROL_FLOOD, f"more than {self.max_control} control frames within {self.window:g}s")


# -- the connection -----------------------------------------------------------------


class _Outbound:
    """A stream's response bytes waiting for window, and whether END_STREAM follows them."""

    __slots__ = ("chunks", "size", "end", "over", "trailers")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.end = False
        #: fields for a trailing HEADERS frame (with END_STREAM) after the last byte
        self.trailers: list | None = None
        self.over = False  # the transport was told the queue is full (a Drained is owed)


class ServerConnection:
    """One client's HTTP/2 connection, server side.

    Args:
        max_concurrent_streams, initial_window_size, max_header_list_size: our SETTINGS.
        connection_window_size: the connection's receive window (raised from 65535 at start).
        stream_buffer: queued response bytes per stream past which `send_data` says "stop reading".
        websocket: advertise SETTINGS_ENABLE_CONNECT_PROTOCOL and take RFC 8441 WebSockets.
        flood_window, max_resets, max_control_frames: the abuse budgets.
        now: the time, for the budgets' first window.
    """

    def __init__(self, *, max_concurrent_streams: int = 100, initial_window_size: int = 65535,
                 connection_window_size: int = 1048576, max_header_list_size: int = 32768,
                 stream_buffer: int = 262144, flood_window: float = 10.0, max_resets: int = 200,
                 max_control_frames: int = 1000, websocket: bool = False, now: float = 0.0):
        # Outbound fields are built here from heads h11 validated: names lowercased, hop-by-hop
        # fields (RFC 9113 section 8.2.2) stripped, pseudo-header first; h2's own outbound checks
        # (a third of a response's CPU in its per-field generators) would only repeat that.
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_inbound_headers=True, normalize_inbound_headers=True,
                                           validate_outbound_headers=False, normalize_outbound_headers=False)
        self._h2 = conn = h2.connection.H2Connection(config)
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: initial_window_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
            **({SettingCodes.ENABLE_CONNECT_PROTOCOL: 1} if websocket else {}),
        })
        self.websocket = websocket
        # h2 applies these when they are acknowledged; they are in force from our first SETTINGS
        conn.decoder.max_header_list_size = max_header_list_size
        conn._inbound_flow_control_window_manager.max_window_size = initial_window_size  # noqa: SLF001
        conn.initiate_connection()
        if connection_window_size > 65535:
            conn.increment_flow_control_window(connection_window_size - 65535)
        self.stream_buffer = stream_buffer
        self._scanner = _FrameScanner(window=flood_window, max_resets=max_resets,
                                      max_control=max_control_frames, max_block=max_header_list_size, now=now)
        self._out: dict[int, _Outbound] = {}
        #: streams answered before their request ended: reset once the answer is out
        self._reset_when_sent: set[int] = set()
        #: streams the transport is serving (opened, not yet ended or reset)
        self.open: set[int] = set()
        #: request trailers received, until their stream's end is reported
        self._trailers: dict[int, tuple] = {}
        #: the last stream a graceful GOAWAY promised to serve (None: no GOAWAY yet)
        self.last_stream: int | None = None
        self.terminated: Terminated | None = None

    # -- input ---------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list:
        """Feed bytes from the client; returns this module's events."""
        if self.terminated is not None:
            return []
        try:
            self._scanner.feed(data, now)
        except _Abuse as abuse:
            return [self._terminate(abuse.reason, ErrorCodes.ENHANCE_YOUR_CALM, str(abuse))]
        try:
            raw = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 queued its GOAWAY already
            return [self._ended(_reason_of(exc), int(exc.error_code if hasattr(exc, "error_code") else 1), str(exc))]
        events: list = []
        for event in raw:
            self._translate(event, events)
        return events

    def _translate(self, event, events: list) -> None:
        kind = type(event)
        if kind is h2.events.DataReceived:
            if event.stream_id in self.open:
                events.append(Data(event.stream_id, bytes(event.data), event.flow_controlled_length))
            else:
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif kind is h2.events.RequestReceived:
            self._request(event, events)
        elif kind is h2.events.StreamEnded:
            trailers = self._trailers.pop(event.stream_id, ())
            if event.stream_id in self.open:
                events.append(RequestEnded(event.stream_id, trailers))
        elif kind is h2.events.TrailersReceived:
            if event.stream_id in self.open:  # (h2 checked them: no pseudo-header fields)
                self._trailers[event.stream_id] = tuple(event.headers)
        elif kind is h2.events.StreamReset:
            self._forget(event.stream_id)
            if event.stream_id in self.open:
                self.open.discard(event.stream_id)
                events.append(Reset(event.stream_id, int(event.error_code)))
        elif kind is h2.events.WindowUpdated or kind is h2.events.RemoteSettingsChanged:
            self._flush(events)
        elif kind is h2.events.ConnectionTerminated:
            self.terminated = Terminated(CLIENT_GOAWAY, int(event.error_code))
            events.append(self.terminated)

    def _request(self, event, events: list) -> None:
        stream_id = event.stream_id
        ended = event.stream_ended is not None
        if self.last_stream is not None and stream_id > self.last_stream:
            self._h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)  # after our GOAWAY: not served
            return
        self.open.add(stream_id)
        head = _request_head(event.headers, ended, self.websocket)
        if isinstance(head, Refused):
            head.stream_id = stream_id
            head.ended = ended
            events.append(head)
        elif head.websocket:
            events.append(WebSocketRequest(stream_id, head))
        else:
            events.append(Request(stream_id, head, ended))
        # (h2 follows with the StreamEnded of a request without body)

    # -- output ----------------------------------------------------------------

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    def send_response(self, stream_id: int, status: int, headers: Headers, *, end: bool = False) -> None:
        """A response head (1xx included), HTTP/1.1 headers as the upstream sent them."""
        fields = [(b":status", b"%d" % status)]
        fields += [(name.lower(), value) for name, value in strip_hop_by_hop(headers)]
        if end:
            self.open.discard(stream_id)
        try:
            self._h2.send_headers(stream_id, fields, end_stream=end)
        except h2.exceptions.StreamClosedError:
            self._forget(stream_id)  # the client reset it meanwhile: nobody to answer

    def send_data(self, stream_id: int, data: bytes, *, end: bool = False, trailers: Headers | tuple = ()) -> bool:
        """Queue response bytes (and END_STREAM); False when the stream's queue is over `stream_buffer`.

        With ``end``, ``trailers`` (HTTP/1.1 fields) go out as a trailing
        HEADERS frame carrying END_STREAM (RFC 9113 section 8.1), once the
        queued bytes are out; hop-by-hop and framing fields are left out.
        """
        out = self._out.get(stream_id)
        if out is None:
            out = self._out[stream_id] = _Outbound()
        if data:
            out.chunks.append(data)
            out.size += len(data)
        if end and trailers:
            fields = [(name.lower(), value) for name, value in strip_hop_by_hop(trailers)
                      if name.lower() != b"content-length"]
            out.trailers = fields or None
        out.end = out.end or end
        if end:
            self.open.discard(stream_id)
        self._send_queued(stream_id, out)
        if out.size > self.stream_buffer:
            out.over = True
            return False
        return True

    def send_simple(self, stream_id: int, status: int, message: str, extra_headers: Headers = (),
                    *, head_request: bool = False, request_done: bool = True) -> None:
        """A small complete response from the proxy itself.

        With the request body still coming, the stream is reset (NO_ERROR) once
        the response is out: RFC 9113 section 8.1, the rest is not wanted.
        """
        body = (message.rstrip("\n") + "\n").encode("utf-8", "replace")
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(body))]
        headers += list(extra_headers)
        if not request_done:
            self._reset_when_sent.add(stream_id)
        self.send_response(stream_id, status, headers)
        self.send_data(stream_id, b"" if head_request else body, end=True)

    def half_close(self, stream_id: int) -> None:
        """END_STREAM after the queued bytes, the stream staying `open`: a WebSocket's client may still send."""
        out = self._out.get(stream_id)
        if out is None:
            out = self._out[stream_id] = _Outbound()
        out.end = True
        self._send_queued(stream_id, out)

    def reset_when_sent(self, stream_id: int) -> None:
        """RST_STREAM NO_ERROR once the queued bytes and END_STREAM are out (now, if they are)."""
        if stream_id in self._out:
            self._reset_when_sent.add(stream_id)
        else:
            self.reset(stream_id, ErrorCodes.NO_ERROR)

    def buffered(self, stream_id: int) -> int:
        out = self._out.get(stream_id)
        return out.size if out is not None else 0

    def ack(self, stream_id: int, flow: int) -> None:
        """The transport passed on ``flow`` bytes of request body: open the client's windows again."""
        if flow:
            try:
                self._h2.acknowledge_received_data(flow, stream_id)
            except h2.exceptions.ProtocolError:
                pass  # the stream is gone: the connection window was credited by h2

    def reset(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """End a stream from the proxy (its upstream broke mid-response, or it is not wanted)."""
        self.open.discard(stream_id)
        self._forget(stream_id)
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.ProtocolError:
            pass  # already closed both ways

    def goaway(self) -> None:
        """Graceful shutdown: GOAWAY NO_ERROR with the last stream served; later streams are refused."""
        if self.last_stream is not None or self.terminated is not None:
            return
        self.last_stream = last = self._h2.highest_inbound_stream_id
        frame = GoAwayFrame(0)
        frame.last_stream_id = last
        frame.error_code = ErrorCodes.NO_ERROR
        self._h2._data_to_send += frame.serialize()  # noqa: SLF001 - see the module docstring

    def close(self, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """End the connection now (the drain is over, or the proxy stops)."""
        if self.terminated is None:
            self.terminated = Terminated("closed", int(error_code))
            try:
                self._h2.close_connection(error_code)
            except h2.exceptions.ProtocolError:
                pass

    # -- internals -------------------------------------------------------------

    def _terminate(self, reason: str, error_code: int, message: str) -> Terminated:
        try:
            self._h2.close_connection(error_code, additional_data=message.encode()[:128])
        except h2.exceptions.ProtocolError:
            pass
        return self._ended(reason, int(error_code), message)

    def _ended(self, reason: str, error_code: int, message: str) -> Terminated:
        self.terminated = Terminated(reason, error_code, message)
        self.open.clear()
        self._out.clear()
        return self.terminated

    def _forget(self, stream_id: int) -> None:
        self._out.pop(stream_id, None)
        self._trailers.pop(stream_id, None)
        self._reset_when_sent.discard(stream_id)

    def _send_queued(self, stream_id: int, out: _Outbound, budget: int = -1) -> None:
        """Send what the windows allow of a stream's queue (at most ``budget`` bytes when >= 0)."""
        conn = self._h2
        try:
            while out.chunks:
                window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
                if budget >= 0:
                    window = min(window, budget)
                if window <= 0:
                    return
                chunk = out.chunks[0]
                if window < len(chunk):
                    out.chunks[0] = chunk[window:]
                    chunk = chunk[:window]
                else:
                    del out.chunks[0]
                out.size -= len(chunk)
                budget -= len(chunk)
                last = out.end and not out.chunks and out.trailers is None
                conn.send_data(stream_id, chunk, end_stream=last)
                if last:
                    self._finished(stream_id)
                    return
            if out.end:
                if out.trailers is not None:
                    conn.send_headers(stream_id, out.trailers, end_stream=True)
                else:
                    conn.end_stream(stream_id)
                self._finished(stream_id)
        except h2.exceptions.ProtocolError:  # the stream was closed meanwhile (reset)
            self._out.pop(stream_id, None)

    def _finished(self, stream_id: int) -> None:
        """The response's END_STREAM is out."""
        del self._out[stream_id]
        if stream_id in self._reset_when_sent:
            self._reset_when_sent.discard(stream_id)
            self.reset(stream_id, ErrorCodes.NO_ERROR)

    def _flush(self, events: list) -> None:
        """The client's windows opened: share them out, one frame per stream per round.

        Round-robin over the streams with queued bytes, least recently served
        first (a stream that sent goes to the back of `_out`), so a large
        response the connection window holds back cannot starve the small ones
        queued beside it (RFC 9113 section 5.3: without priorities, share).
        """
        conn = self._h2
        quantum = conn.max_outbound_frame_size
        queued = list(self._out.items())
        waiting = [stream_id for stream_id, _ in queued]
        while waiting and conn.outbound_flow_control_window > 0:
            again = []
            for stream_id in waiting:
                out = self._out.get(stream_id)
                if out is None:
                    continue
                size = out.size
                self._send_queued(stream_id, out, quantum)
                if out.size < size and self._out.get(stream_id) is out:
                    del self._out[stream_id]
                    self._out[stream_id] = out  # served: to the back of the line
                    if out.chunks:
                        again.append(stream_id)
            waiting = again
        for stream_id, out in queued:
            if out.over and out.size <= self.stream_buffer:
                out.over = False
                events.append(Drained(stream_id))


def wants_trailers(head: RequestHead) -> bool:
    """The client said it takes trailer fields (``te: trailers``, RFC 9110 section 10.1.4; gRPC sends it)."""
    value = head.header(b"te")
    return value is not None and b"trailers" in value.lower()


def _reason_of(exc: Exception) -> str:
    if isinstance(exc, h2.exceptions.DenialOfServiceError):
        return HEADER_LIST_TOO_LARGE
    if isinstance(exc, h2.exceptions.TooManyStreamsError):
        return TOO_MANY_STREAMS
    if isinstance(exc, h2.exceptions.FlowControlError):
        return FLOW_CONTROL
    return PROTOCOL_ERROR


def _request_head(fields, ended: bool, websocket: bool = False) -> RequestHead | Refused:
    """RFC 9113 section 8.3.1: the pseudo-headers and fields as an HTTP/1.1 request head.

    An RFC 8441 WebSocket (``websocket`` on) gives the head of a GET upgrade (``websocket`` set).
    """
    method = path = authority = protocol = None
    host = None
    cookies: list[bytes] = []
    headers: Headers = []
    for name, value in fields:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":protocol":
                protocol = value
        elif name == b"cookie":
            cookies.append(value)
        elif name == b"host":
            host = value
        else:
            headers.append((name, value))
    if protocol is not None:
        if not websocket:
            return Refused(0, 501, "extended CONNECT is not supported here")
        if protocol.lower() != b"websocket":
            return Refused(0, 501, f"extended CONNECT for protocol {protocol.decode('latin-1')!r} is not supported "
                                   "(only websocket)")
        # RFC 8441 section 5: Sec-WebSocket-Key and -Accept are not used; the proxy makes its own upstream
        headers = [(name, value) for name, value in headers if name != b"sec-websocket-key"]
        if (http1.header_value(headers, b"sec-websocket-version") or b"").strip() != b"13":
            return Refused(0, 400, "unsupported or missing sec-websocket-version (13 is supported)",
                           headers=((b"sec-websocket-version", b"13"),))
    elif method == b"CONNECT":
        return Refused(0, 501, "CONNECT is not supported")
    if authority is None:  # (h2 refused a Host that differs from :authority)
        authority = host
    if not authority or not valid_host(authority) or authority[:1] == b":":
        return Refused(0, 400, f"invalid or missing :authority: {authority!r}")
    if path is None or not (path[:1] == b"/" or (path == b"*" and method == b"OPTIONS")):
        return Refused(0, 400, f"invalid :path: {path!r}")
    if protocol is not None:
        method = b"GET"  # what the upstream's HTTP/1.1 upgrade is
    headers.insert(0, (b"host", authority))
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))  # RFC 9113 section 8.2.3
    return RequestHead(
        method=method,
        target=path,
        http_version=b"2",
        headers=headers,
        host=_split_host(authority),
        path=path.split(b"?", 1)[0].decode("latin-1"),
        has_body=not ended and protocol is None,
        websocket=protocol is not None,
    )


__all__ = [
    "CLIENT_GOAWAY", "Data", "Drained", "ERROR_REASONS", "PREFACE", "REASONS", "Refused", "Request", "RequestEnded",
    "Reset", "ServerConnection", "Terminated", "WebSocketRequest", "wants_trailers",
]

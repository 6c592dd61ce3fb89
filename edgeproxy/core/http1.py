"""HTTP/1.1 for both sides of the proxy, over h11, with the checks a proxy needs.

Theory of operation
-------------------
The proxy speaks HTTP twice per request: as a server to the client
(`ServerSide`) and as a client to the upstream (`ClientSide`).  Both wrap h11 and
add what h11 leaves to the application:

* **Smuggling shapes are refused, never forwarded.**  h11 unfolds obs-fold lines
  and accepts Content-Length beside Transfer-Encoding; a proxy that forwards such
  a request lets two parsers disagree on where it ends (RFC 9112 sections 5.2,
  6.1 and 11.2).  `ServerSide` therefore looks at each raw request head itself
  before handing it to h11, and checks the parsed framing headers after.  To be
  able to look at every head of a pipelined stream, it starts a fresh h11
  connection per request and carries the unread bytes over through h11's public
  `trailing_data`.
* **Hop-by-hop headers are dropped both ways** (RFC 9110 section 7.6.1), including
  every header the `Connection` header names; body framing is re-done by h11 on
  the other side, so a chunked upload can leave as chunked or with a length.
* **The request line and the authority are held to their grammar.**  h11 takes
  any `HTTP/d.d` and any visible bytes in `Host`; a proxy that forwards
  `HTTP/0.9` as 1.1, or a `Host` with a BEL or a space in it, lets the upstream
  read a different request than the one routed.  Only 1.0 and 1.1 pass (else
  505), and `Host` and the authority of an absolute-form target must match RFC
  3986's host grammar with an optional port (else 400), whatever the target's
  form.  With an absolute-form target, the authority is what is routed and what
  the upstream gets as `Host` (RFC 9112 section 3.2.2).
* **Chunk sizes may have any number of leading zeros** (RFC 9112 section 7.1:
  `1*HEXDIG`), which h11 caps at 20 digits.  `ChunkSizeLines` strips them from
  each size line before h11 reads it, and refuses sizes that do not fit in 63
  bits.
* **Every request carries an id** (`X-Request-Id`, as Envoy's and nginx's
  `$request_id`): the client's own when it is a plain token (`valid_request_id`),
  else one the transport draws at random; the upstream and the access log get
  the same id, and a malformed value reaches neither.
* **Errors carry their remedy**: every refusal is a `RemoteProtocolError` with the
  HTTP status to answer.
* **The WebSocket handshake skips h11's event machinery.**  Building and
  validating h11 events for the forwarded upgrade request, the upstream's 101 and
  the 101 to the client cost more CPU than everything else in an upgrade but the
  syscalls.  The request's headers were already validated when h11 parsed them, so
  the forwarded upgrade is written directly (byte for byte what h11 would write),
  and the 101 is parsed by a strict grammar that accepts only a plain 101; any
  other answer (a refusal, anything unusual) goes to h11 as before.  Tests prove
  both equal to h11 on the inputs they accept.

Nothing here touches a socket or a clock: bytes go in, events and bytes come out.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

import h11

from edgeproxy.errors import LocalProtocolError, RemoteProtocolError

NEED_DATA = h11.NEED_DATA
PAUSED = h11.PAUSED

# RFC 9110 section 7.6.1, plus the legacy Proxy-Connection.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade", b"trailer"}
)

_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")

REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    426: b"Upgrade Required",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}

#: the only versions the proxy speaks; h11 would take any `HTTP/<digit>.<digit>`
SUPPORTED_VERSIONS = frozenset({b"1.0", b"1.1"})

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class RequestHead:
    """A parsed request head, header names as the client spelled them."""

    method: bytes
    target: bytes
    http_version: bytes
    headers: Headers
    host: str = ""
    path: str = "/"
    #: True for a request that asks for `Upgrade: websocket`.
    websocket: bool = False
    #: True when a body follows (Content-Length > 0 or chunked).
    has_body: bool = False
    #: The authority of an absolute-form target (RFC 9112 section 3.2.2), else None.
    authority: bytes | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (name in lower case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    http_version: bytes
    headers: Headers


@dataclass(slots=True)
class Body:
    data: bytes


@dataclass(slots=True)
class EndOfMessage:
    #: the trailer fields of a chunked message (only `ClientSide` reports them: the upstream's)
    trailers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(slots=True)
class ConnectionClosed:
    pass


def _check_raw_head(head: bytes) -> None:
    """Refuse what h11 would silently accept but a proxy must not forward."""
    lines = head.split(b"\n")
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise RemoteProtocolError("obsolete line folding in header block", status_hint=400)


# RFC 3986 section 3.2.2: reg-name (which also spells every IPv4address),
# IP-literal (IPv6address or IPvFuture in brackets); section 3.2.3: port.
_REG_NAME = re.compile(rb"(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*")
_IPV_FUTURE = re.compile(rb"[vV][0-9A-Fa-f]+\.[A-Za-z0-9._~!$&'()*+,;=:-]+")
_IPV6_CHARS = re.compile(rb"[0-9A-Fa-f:.]+")
_PORT = re.compile(rb"[0-9]*")


def valid_host(value: bytes) -> bool:
    """Whether ``value`` is `uri-host [ ":" port ]` (RFC 9110 section 7.2, RFC 3986 section 3.2.2).

    Anything else (control characters, HTAB, SP, userinfo, a second colon
    outside brackets) is not a host a proxy may route on or pass on.
    """
    if value[:1] == b"[":
        end = value.find(b"]")
        if end < 0 or not _valid_ip_literal(value[1:end]):
            return False
        rest = value[end + 1:]
    else:
        colon = value.find(b":")
        host, rest = (value, b"") if colon < 0 else (value[:colon], value[colon:])
        if _REG_NAME.fullmatch(host) is None:
            return False
    return rest == b"" or (rest[:1] == b":" and _PORT.fullmatch(rest, 1) is not None)


def _valid_ip_literal(literal: bytes) -> bool:
    if _IPV_FUTURE.fullmatch(literal) is not None:
        return True
    if _IPV6_CHARS.fullmatch(literal) is None:
        return False
    try:
        ipaddress.IPv6Address(literal.decode("ascii"))
    except ValueError:
        return False
    return True


def split_absolute_form(target: bytes) -> tuple[bytes, bytes] | None:
    """(authority, path) of an http or https absolute-form target, None for other forms.

    The authority ends at the first "/", "?" or "#" (RFC 3986 section 3.2); an
    empty path is "/".

    Raises:
        RemoteProtocolError: an empty host or userinfo (RFC 9110 sections 4.2.1
            and 4.2.4), or an authority that is not a host and optional port.
    """
    lowered = target[:8].lower()
    if lowered.startswith(b"http://"):
        rest = target[7:]
    elif lowered == b"https://":
        rest = target[8:]
    else:
        return None
    end = len(rest)
    for delimiter in b"/?#":
        found = rest.find(bytes([delimiter]))
        if 0 <= found < end:
            end = found
    authority, path = rest[:end], rest[end:]
    if b"@" in authority:
        raise RemoteProtocolError("userinfo in the request target's authority", status_hint=400)
    if not valid_host(authority) or authority[:1] in (b"", b":"):
        raise RemoteProtocolError(f"invalid authority in the request target: {authority!r}", status_hint=400)
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    tokens.add(token)
    return tokens


def header_value(headers: Headers, name: bytes) -> bytes | None:
    """The values of header ``name`` (lower case) joined with ", " (RFC 9110 5.3), None when absent."""
    values = [value for key, value in headers if key.lower() == name]
    return b", ".join(values) if values else None


def strip_hop_by_hop(headers: Headers) -> Headers:
    """Drop RFC 9110 hop-by-hop headers and every header that `Connection` names."""
    drop = HOP_BY_HOP | _connection_tokens(headers)
    return [(n, v) for n, v in headers if n.lower() not in drop]


def _split_host(host: bytes) -> str:
    text = host.decode("ascii", "replace").strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[: end + 1] if end >= 0 else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


#: an X-Request-Id kept as the client sent it: 1 to 128 letters, digits and ``- _ . : + / =``
#: (UUIDs, hex, base64, ULIDs and "trace:span" forms; nothing a log line must escape)
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=-]{1,128}")
KEPT, GENERATED, REPLACED = "kept", "generated", "replaced"


def valid_request_id(value: bytes) -> bool:
    """Whether a client's X-Request-Id is passed on as it is (see `_REQUEST_ID`)."""
    return _REQUEST_ID.fullmatch(value) is not None


def request_id(head: RequestHead, fresh: Callable[[], str]) -> tuple[str, str]:
    """The request's id and where it came from: `KEPT`, `GENERATED` (none sent) or `REPLACED`.

    Several X-Request-Id headers count as one malformed value (joined, they hold
    ", "). ``fresh`` draws a new id (the transport's randomness).
    """
    sent = header_value(head.headers, b"x-request-id")
    if sent is None:
        return fresh(), GENERATED
    if valid_request_id(sent):
        return sent.decode("ascii"), KEPT
    return fresh(), REPLACED


def content_length(head: RequestHead) -> int | None:
    """The request's Content-Length (h11 already checked it: digits, equal if repeated), None without one."""
    value = head.header(b"content-length")
    if value is None:
        return None
    return int(value.split(b",", 1)[0].strip() or b"0")


def forwarded_request_headers(
    head: RequestHead, *, client_ip: str, scheme: str = "http", request_id: str | None = None
) -> Headers:
    """Headers to send upstream: hop-by-hop stripped, X-Forwarded-* added, Host kept.

    For a WebSocket upgrade the `Connection: Upgrade` and `Upgrade: websocket`
    pair is put back, since those are hop-by-hop but must reach the upstream.
    With an absolute-form target the upstream gets the target's authority as
    Host, the host the request was routed on (RFC 9112 section 3.2.2).  With a
    ``request_id`` every X-Request-Id the client sent is replaced by that one.
    """
    headers = strip_hop_by_hop(head.headers)
    out: Headers = []
    xff = None
    original_host = head.header(b"host")
    if head.authority is not None:
        original_host = head.authority
        out.append((b"Host", head.authority))
    for name, value in headers:
        lname = name.lower()
        if lname == b"host" and head.authority is not None:
            continue
        if lname == b"x-forwarded-for":
            xff = value if xff is None else xff + b", " + value
            continue
        if lname in (b"x-forwarded-proto", b"x-forwarded-host"):
            continue
        if lname == b"x-request-id" and request_id is not None:
            continue
        out.append((name, value))
    if request_id is not None:
        out.append((b"X-Request-Id", request_id.encode("ascii")))
    ip = client_ip.encode("ascii")
    out.append((b"X-Forwarded-For", xff + b", " + ip if xff else ip))
    out.append((b"X-Forwarded-Proto", scheme.encode("ascii")))
    if original_host is not None:
        out.append((b"X-Forwarded-Host", original_host))
    if head.websocket:
        out.append((b"Connection", b"Upgrade"))
        out.append((b"Upgrade", b"websocket"))
    elif head.header(b"transfer-encoding") is not None:
        # Re-framed by h11 on the way out; only "chunked" gets this far.
        out.append((b"Transfer-Encoding", b"chunked"))
    return out


def forwarded_response_headers(headers: Headers, *, switching: bool = False) -> Headers:
    """Headers to send to the client: hop-by-hop stripped (Upgrade kept on a 101)."""
    out = strip_hop_by_hop(headers)
    if switching:
        out.append((b"Connection", b"Upgrade"))
        out.append((b"Upgrade", b"websocket"))
    return out


def error_response(
    status: int, message: str, *, extra_headers: Headers = (), close: bool = True
) -> bytes:
    """A small, complete HTTP/1.1 error response as raw bytes."""
    body = (message.rstrip("\n") + "\n").encode("utf-8", "replace")
    lines = [b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"Error"))]
    lines.append(b"Content-Type: text/plain; charset=utf-8")
    lines.append(b"Content-Length: %d" % len(body))
    for name, value in extra_headers:
        lines.append(name + b": " + value)
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# RFC 9110 / 9112 grammar, the same as h11's: a token, a field value without
# leading or trailing whitespace, NUL or line breaks, a reason phrase.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_VALUE = rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?"
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _FIELD_VALUE + rb")[ \t]*")
_PLAIN_GET_LINE = re.compile(rb"GET ([\x21-\x7e]+) HTTP/1\.1")
_STATUS_101 = re.compile(rb"HTTP/1\.1 101(?: ((?:[ \t]|[^\x00\s])*))?")
#: headers that make a 101 unusual enough to leave to h11's checks
_NOT_IN_A_PLAIN_101 = frozenset({b"content-length", b"transfer-encoding"})
_TOKEN_RE = re.compile(_TOKEN)
_FIELD_VALUE_RE = re.compile(_FIELD_VALUE)
_REQUEST_TARGET = re.compile(rb"[\x21-\x7e]+")
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([2-5][0-9][0-9])(?: ((?:[ \t]|[^\x00\s])*))?")
_DIGITS = re.compile(rb"[0-9]{1,18}")
#: request headers that leave a body-less GET or HEAD to h11 (framing, connection state, 100-continue)
_NOT_IN_A_PLAIN_REQUEST = frozenset({b"content-length", b"transfer-encoding", b"connection", b"expect", b"upgrade"})


def plain_request(method: bytes, target: bytes, headers: Headers) -> bytes | None:
    """A body-less GET or HEAD serialized as h11 would, or None when h11 should judge it.

    Plain: the target and every field in RFC 9110's grammar (the same test as
    h11's), exactly one Host, nothing about framing or the connection.
    """
    if method not in (b"GET", b"HEAD") or _REQUEST_TARGET.fullmatch(target) is None:
        return None
    hosts = 0
    for name, value in headers:
        if _TOKEN_RE.fullmatch(name) is None or _FIELD_VALUE_RE.fullmatch(value) is None:
            return None
        lname = name.lower()
        if lname == b"host":
            hosts += 1
        elif lname in _NOT_IN_A_PLAIN_REQUEST:
            return None
    if hosts != 1:
        return None
    return serialize_head(method + b" " + target + b" HTTP/1.1", headers)


def _plain_head(data: bytes | bytearray, status_line: re.Pattern) -> tuple[re.Match, list[bytes], int] | None:
    """The status line's match, the field lines and the head's length (without CRLF CRLF), or None."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(data[:end]).split(b"\r\n")
    status = status_line.fullmatch(lines[0])
    return None if status is None else (status, lines[1:], end)


def parse_plain_response(data: bytes | bytearray, method: bytes) -> tuple[ResponseHead, int, int, bool] | None:
    """A complete, plain final response head: (head, its length, body length, keep-alive).

    Plain: `HTTP/1.1` and a status of 200-599, CRLF line ends, fields in the
    strict grammar, a body framed by one plain Content-Length (or none for HEAD,
    204 and 304), no Transfer-Encoding.  Anything else (and an incomplete head)
    is None: the caller hands the exchange to h11, which decides.
    """
    head = _plain_head(data, _STATUS_LINE)
    if head is None:
        return None
    status, lines, end = head
    code = int(status.group(1))
    headers: Headers = []
    length = None
    keep = True
    for line in lines:
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            return None
        name, value = match.group(1), match.group(2)
        lname = name.lower()
        if lname == b"content-length":
            if length is not None or _DIGITS.fullmatch(value) is None:
                return None
            length = int(value)
        elif lname == b"transfer-encoding":
            return None
        elif lname == b"connection" and b"close" in [t.strip() for t in value.lower().split(b",")]:
            keep = False
        headers.append((name, value))
    if method == b"HEAD" or code in (204, 304):
        length = 0
    elif length is None:
        return None  # read until close: h11's
    return ResponseHead(code, status.group(2) or b"", b"1.1", headers), end + 4, length, keep


def serialize_head(start_line: bytes, headers: Headers) -> bytes:
    """A request or response head from headers that are known to be valid.

    Byte for byte what h11 writes: the start line, Host first, then the others
    in order, then the blank line.
    """
    parts = [start_line]
    rest = []
    for name, value in headers:
        if name.lower() == b"host":
            parts.append(name + b": " + value)
        else:
            rest.append(name + b": " + value)
    parts.extend(rest)
    parts.append(b"\r\n")
    return b"\r\n".join(parts)


def _parse_plain_upgrade(raw: bytes) -> tuple[bytes, Headers] | None:
    """Target and headers of a plain WebSocket upgrade head, or None.

    Plain: `GET <target> HTTP/1.1`, CRLF line ends, header lines in the strict
    grammar, exactly one Host, no body framing headers.  Everything else (and
    every request that does not mention "websocket" at all) is None and goes to
    h11, which accepts the same heads with the same result (tests prove it).
    """
    if b"ebsocket" not in raw or not raw.endswith(b"\r\n\r\n"):
        return None
    lines = raw[:-4].split(b"\r\n")
    line = _PLAIN_GET_LINE.fullmatch(lines[0])
    if line is None:
        return None
    headers: Headers = []
    hosts = 0
    for text in lines[1:]:
        match = _HEADER_LINE.fullmatch(text)
        if match is None:
            return None
        name = match.group(1)
        lname = name.lower()
        if lname in _NOT_IN_A_PLAIN_101:
            return None
        if lname == b"host":
            hosts += 1
        headers.append((name, match.group(2)))
    if hosts != 1:
        return None
    return line.group(1), headers


def parse_plain_101(data: bytes | bytearray) -> tuple[ResponseHead, int] | None:
    """Parse a complete, plain `HTTP/1.1 101` head: the head and its length.

    None when the head is incomplete, is not a 101, or is anything this strict
    grammar does not accept (bare LF line ends, Content-Length, a missing
    colon, ...): the caller then hands the bytes to h11, which decides.
    """
    head = _plain_head(data, _STATUS_101)
    if head is None:
        return None
    status, lines, end = head
    headers: Headers = []
    for line in lines:
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            return None
        name = match.group(1)
        if name.lower() in _NOT_IN_A_PLAIN_101:
            return None
        headers.append((name, match.group(2)))
    return ResponseHead(101, status.group(1) or b"", b"1.1", headers), end + 4


_HEX_DIGITS = re.compile(rb"[0-9A-Fa-f]+")
#: the largest chunk size taken (as nginx: what fits in a signed 64-bit offset)
MAX_CHUNK_SIZE = 2**63 - 1


class ChunkSizeLines:
    """Strips the leading zeros of every chunk size in a chunked body, for h11.

    RFC 9112 section 7.1 writes chunk-size as `1*HEXDIG`, so
    `000000000000000000000000000000000e3` is 227 bytes; h11 reads at most 20
    digits and would refuse it.  This follows the framing exactly as h11 does
    (a size line ends at the first CRLF, a chunk is its size in bytes plus
    CRLF) and changes nothing but the zeros, so h11 still judges every line.
    After the last chunk's size line it passes bytes through untouched: the
    trailers and any pipelined request are h11's and the next cycle's.

    Call: `feed(data) -> bytes` for h11; after an `error`, nothing more comes
    out, and the caller raises it once h11 has used up what it got.
    """

    def __init__(self, *, max_line: int):
        self.max_line = max_line
        self._line = bytearray()
        #: bytes of the current chunk (its data and CRLF) still to pass
        self._chunk_left = 0
        self.done = False
        self.error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._line)

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return data
        if self.error is not None:
            return b""
        out = bytearray()
        pos, end = 0, len(data)
        while pos < end and not self.done:
            if self._chunk_left:
                take = min(self._chunk_left, end - pos)
                out += data[pos:pos + take]
                pos += take
                self._chunk_left -= take
                continue
            if self._line[-1:] == b"\r" and data[pos:pos + 1] == b"\n":
                line = bytes(self._line[:-1])  # the CRLF came split over two reads
                pos += 1
            else:
                crlf = data.find(b"\r\n", pos)
                if crlf < 0:
                    self._line += data[pos:]
                    pos = end
                    if len(self._line) > self.max_line + 1:  # + a CR whose LF is still to come
                        self._fail("chunk size line too long")
                    break
                line = bytes(self._line) + data[pos:crlf]
                pos = crlf + 2
            self._line.clear()
            if len(line) > self.max_line:
                self._fail("chunk size line too long")
                break
            rewritten = self._without_leading_zeros(line)
            if self.error is not None:
                break
            out += rewritten + b"\r\n"
        if self.error is not None:
            return bytes(out)
        out += data[pos:]  # after the last size line: not ours to change
        return bytes(out)

    def _fail(self, message: str) -> None:
        self.error = RemoteProtocolError(message, status_hint=400)
        self._line.clear()

    def _without_leading_zeros(self, line: bytes) -> bytes:
        digits = _HEX_DIGITS.match(line)
        if digits is None:
            self.done = True  # not a size line: h11 refuses it, nothing left to follow
            return line
        significant = digits.group().lstrip(b"0") or b"0"
        size = int(significant, 16)
        if size > MAX_CHUNK_SIZE:
            self._fail(f"chunk size {digits.group()[:40].decode()} too large")
        elif size == 0:
            self.done = True
        else:
            self._chunk_left = size + 2
        return significant + line[digits.end():]


def _translate(exc: h11.ProtocolError) -> RemoteProtocolError:
    message = str(exc) or type(exc).__name__
    if exc.error_status_hint == 501 and "Transfer-Encoding" in message:
        # h11 says 501 (an unknown coding, RFC 9112 section 6.1, a SHOULD), but a request
        # whose last coding is not chunked has no knowable length: 400, a MUST (section 6.3).
        return RemoteProtocolError(f"{message}: chunked must be the final transfer coding", status_hint=400)
    return RemoteProtocolError(message, status_hint=exc.error_status_hint)


class ServerSide:
    """The client-facing HTTP/1.1 parser and serializer.

    Call: `receive_data(b)` (b"" for EOF), then `next_event()` until NEED_DATA or
    PAUSED; answer with `send_response`, `send_data`, `send_end`; after a complete
    exchange, `start_next_cycle()` if `keep_alive`.
    """

    def __init__(self, *, max_header_size: int = 16384):
        self.max_header_size = max_header_size
        self._pending = bytearray()
        self._eof = False
        self._conn: h11.Connection | None = None
        self._request: RequestHead | None = None
        #: a WebSocket upgrade parsed without h11: (raw head, bytes after it)
        self._fast: tuple[bytes, bytearray] | None = None
        self._fast_ended = False
        #: the chunk-size rewriter of the current request's chunked body
        self._chunks: ChunkSizeLines | None = None

    def _hand_over_to_h11(self) -> None:
        """Give a fast-parsed upgrade to h11 after all (it was refused, or failed).

        h11 parses the same head to the same request and is moved to where the
        fast path was (the request's end read or not), so the exchange goes on
        as if h11 had had it from the start.
        """
        raw, rest = self._fast
        self._fast = None
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_size)
        conn.receive_data(raw + bytes(rest))
        if self._eof:
            conn.receive_data(b"")
        conn.next_event()  # the Request
        if self._fast_ended:
            conn.next_event()  # its EndOfMessage
        self._conn = conn

    @property
    def request_complete(self) -> bool:
        """True when the current request's body has been read to its end."""
        if self._fast is not None:
            self._hand_over_to_h11()
        return self._conn is not None and self._conn.their_state is not h11.SEND_BODY and self._conn.their_state is not h11.IDLE

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request after this one."""
        if self._fast is not None:
            self._hand_over_to_h11()
        conn = self._conn
        return conn is not None and conn.our_state is h11.DONE and conn.their_state is h11.DONE

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed (for pausing reads on pipelining)."""
        if self._fast is not None:
            return len(self._fast[1])
        if self._conn is None:
            return len(self._pending)
        held = self._chunks.buffered if self._chunks is not None else 0
        return len(self._conn.trailing_data[0]) + held

    def receive_data(self, data: bytes) -> None:
        if self._fast is not None:
            if data:
                self._fast[1].extend(data)
            else:
                self._eof = True
        elif self._conn is None:
            if data:
                self._pending += data
            else:
                self._eof = True
        else:
            if data and self._chunks is not None:
                data = self._chunks.feed(data)
                if not data:
                    return  # all held back (a partial size line, or after an error)
            self._conn.receive_data(data)
            if not data:
                self._eof = True

    def next_event(self):
        """The next parsed event, NEED_DATA, PAUSED or ConnectionClosed.

        Raises:
            RemoteProtocolError: with the status to answer (400, 431, 501, ...).
        """
        if self._fast is not None:
            # What h11 yields after an upgrade request: its end, then PAUSED.
            if not self._fast_ended:
                self._fast_ended = True
                return EndOfMessage()
            return PAUSED
        if self._conn is None:
            return self._start_request()
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _translate(exc) from None
        if isinstance(event, h11.Data):
            return Body(bytes(event.data))
        if isinstance(event, h11.EndOfMessage):
            return EndOfMessage()
        if isinstance(event, h11.ConnectionClosed):
            return ConnectionClosed()
        if event is h11.NEED_DATA and self._chunks is not None and self._chunks.error is not None:
            raise self._chunks.error
        if event is h11.NEED_DATA and self._eof and self._conn.their_state is h11.SEND_BODY:
            raise RemoteProtocolError("client closed the connection in the middle of the request body")
        return event

    def _start_request(self):
        pending = self._pending
        # RFC 9112 section 2.2: ignore empty lines before a request line.
        while pending[:2] == b"\r\n" or pending[:1] == b"\n":
            del pending[: 2 if pending[:1] == b"\r" else 1]
        match = _END_OF_HEAD.search(pending)
        if match is None:
            if len(pending) > self.max_header_size:
                raise RemoteProtocolError("request header block too large", status_hint=431)
            if self._eof:
                if pending:
                    raise RemoteProtocolError("connection closed in the middle of a request head")
                return ConnectionClosed()
            return NEED_DATA
        if match.end() > self.max_header_size:
            raise RemoteProtocolError("request header block too large", status_hint=431)
        raw = bytes(pending[: match.end()])
        _check_raw_head(raw)
        plain = _parse_plain_upgrade(raw)
        if plain is not None:
            target, headers = plain
            self._fast = (raw, bytearray(pending[match.end():]))
            self._fast_ended = False
            pending.clear()
            self._request = head = self._make_head(b"GET", target, b"1.1", headers)
            return head
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_size)
        # The head alone first: whether the body is chunked decides how the rest goes in.
        conn.receive_data(raw)
        rest = bytes(pending[match.end():])
        pending.clear()
        self._conn = conn
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _translate(exc) from None
        if not isinstance(event, h11.Request):  # pragma: no cover - h11 guarantees a request here
            raise RemoteProtocolError("expected a request head")
        headers = [(bytes(n), bytes(v)) for n, v in event.headers.raw_items()]
        self._request = head = self._make_head(
            bytes(event.method), bytes(event.target), bytes(event.http_version), headers
        )
        if head.header(b"transfer-encoding") is not None:  # h11 let only chunked through
            self._chunks = ChunkSizeLines(max_line=self.max_header_size)
            rest = self._chunks.feed(rest)
        if rest:
            conn.receive_data(rest)  # (b"" would mean EOF to h11)
        if self._eof:
            conn.receive_data(b"")
        return head

    def _make_head(self, method: bytes, target: bytes, http_version: bytes, headers: Headers) -> RequestHead:
        # One pass over the headers: framing checks, Host, and the upgrade pair.
        seen_cl = seen_te = has_body = False
        hosts = 0
        host = upgrade = None
        connection_upgrade = False
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-length":
                seen_cl = True
                has_body = has_body or value.strip() not in (b"0", b"")
            elif lname == b"transfer-encoding":
                seen_te = has_body = True
            elif lname == b"host":
                hosts += 1
                host = value
            elif lname == b"upgrade":
                upgrade = value
            elif lname == b"connection":
                connection_upgrade = connection_upgrade or any(
                    t.strip().lower() == b"upgrade" for t in value.split(b",")
                )
        if http_version not in SUPPORTED_VERSIONS:
            raise RemoteProtocolError(f"HTTP/{http_version.decode()} is not supported (only 1.0 and 1.1)", status_hint=505)
        if seen_cl and seen_te:
            raise RemoteProtocolError("Content-Length together with Transfer-Encoding")
        if hosts > 1:
            raise RemoteProtocolError("more than one Host header")
        if host is not None and not valid_host(host):
            # RFC 9112 section 3.2: a Host with an invalid value is a 400, whatever the target.
            raise RemoteProtocolError(f"invalid Host header: {host!r}")
        path = target
        absolute = split_absolute_form(target)
        authority = None
        if absolute is not None:
            # absolute-form (RFC 9112 section 3.2.2): its authority wins over Host.
            authority, path = absolute
            host = authority
        websocket = upgrade is not None and connection_upgrade and any(
            t.strip().lower() == b"websocket" for t in upgrade.split(b",")
        )
        return RequestHead(
            method=method,
            target=target,
            http_version=http_version,
            headers=headers,
            host=_split_host(host or b""),
            path=path.split(b"?", 1)[0].decode("latin-1"),
            websocket=websocket,
            has_body=has_body,
            authority=authority,
        )

    # -- sending -------------------------------------------------------------

    def _send(self, event) -> bytes:
        if self._fast is not None:
            self._hand_over_to_h11()
        assert self._conn is not None
        try:
            return self._conn.send(event) or b""
        except h11.LocalProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None

    def send_informational(self, head: ResponseHead) -> bytes:
        return self._send(h11.InformationalResponse(status_code=head.status, headers=head.headers, reason=head.reason))

    def send_switching_protocols(self, reason: bytes, headers: Headers) -> bytes:
        """The 101 to the client, from headers a strict parse already validated.

        Written directly rather than through h11 (see the module docstring); after
        it the connection speaks WebSocket and this object is used only for
        `switched_trailing_data`.
        """
        return serialize_head(b"HTTP/1.1 101 " + reason, headers)

    def send_response(self, head: ResponseHead) -> bytes:
        return self._send(h11.Response(status_code=head.status, headers=head.headers, reason=head.reason))

    def send_data(self, data: bytes) -> bytes:
        return self._send(h11.Data(data=data))

    def send_end(self) -> bytes:
        return self._send(h11.EndOfMessage())

    def send_simple(self, status: int, message: str, extra_headers: Headers = ()) -> bytes:
        """A complete small response inside the current cycle (keeps keep-alive possible)."""
        body = (message.rstrip("\n") + "\n").encode()
        headers = [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Content-Length", b"%d" % len(body))]
        headers.extend(extra_headers)
        if not self.request_complete:
            # The unread request body would be taken for the next request: close after.
            headers.append((b"Connection", b"close"))
        out = self.send_response(ResponseHead(status, REASONS.get(status, b"Error"), b"1.1", headers))
        if self._request is None or self._request.method != b"HEAD":
            out += self.send_data(body)
        return out + self.send_end()

    def switched_trailing_data(self) -> bytes:
        """Bytes the client sent after its upgrade request (already WebSocket frames)."""
        if self._fast is not None:
            return bytes(self._fast[1])
        assert self._conn is not None
        return bytes(self._conn.trailing_data[0])

    def start_next_cycle(self) -> None:
        """Begin the next request; unread bytes (pipelining) carry over."""
        if self._fast is not None:
            self._hand_over_to_h11()
        assert self._conn is not None
        data, closed = self._conn.trailing_data
        self._pending = bytearray(data)
        self._eof = self._eof or closed
        self._conn = None
        self._request = None
        self._chunks = None


class ClientSide:
    """The upstream-facing HTTP/1.1 client of one pooled upstream connection.

    A WebSocket upgrade takes a fast path: the request is serialized directly and
    a plain 101 is parsed by `parse_plain_101`; h11 is brought in only when the
    answer is something else, and then sees the whole exchange as if it had
    handled it from the start.
    """

    def __init__(self, *, max_header_size: int = 65536):
        self.max_header_size = max_header_size
        #: the h11 connection, made on first use: a WebSocket upgrade on the fast
        #: path never needs one, and it is most of this object's memory (~1 KiB)
        self._h11: h11.Connection | None = None
        self.method = b"GET"
        #: an upgrade request sent on the fast path, waiting for its answer
        self._upgrade: tuple[bytes, Headers] | None = None
        #: a body-less GET/HEAD sent on the fast path: (target, headers) until its response
        #: head is parsed, then () while its body is counted out, then None
        self._plain: tuple | None = None
        #: response body bytes still due on the fast path (-1: no fast-path body; 0: the end is next)
        self._plain_left = -1
        #: the fast-path exchange is over: h11 never saw it; ``_plain_keep``: the response let the
        #: connection stay open; ``_plain_stray``: bytes came after it
        self._plain_done = False
        self._plain_keep = False
        self._plain_stray = False
        self._received = bytearray()
        self._eof = False
        #: after a fast-path 101: the bytes that followed it (WebSocket frames)
        self._switched: bytearray | None = None

    @property
    def reusable(self) -> bool:
        if self._plain_done:
            # (h11 would pool a connection with stray bytes and read them as the next response)
            return self._plain_keep and not self._plain_stray and not self._eof
        conn = self._conn
        return self._plain is None and self._upgrade is None and self._switched is None and conn.our_state is h11.DONE and conn.their_state is h11.DONE

    @property
    def _conn(self) -> h11.Connection:
        conn = self._h11
        if conn is None:
            conn = self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=self.max_header_size)
        return conn

    def _send(self, event) -> bytes:
        try:
            return self._conn.send(event) or b""
        except h11.LocalProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None

    def send_request(self, head: RequestHead, headers: Headers) -> bytes:
        self.method = head.method
        if head.websocket and head.method == b"GET" and not head.has_body and (
            self._h11 is None or self._h11.our_state is h11.IDLE
        ):
            # `headers` came from a request h11 parsed (and validated) plus the
            # proxy's own, so they are valid; h11 would write the same bytes.
            self._upgrade = (head.target, headers)
            return serialize_head(b"GET " + head.target + b" HTTP/1.1", headers)
        if not head.has_body and not head.websocket and not self._plain_done and (
            self._h11 is None or self._h11.our_state is h11.IDLE
        ):
            # The common request of a proxy: h11's bytes without h11's per-event cost; its
            # response too, when it is plain (`parse_plain_response`), else h11 takes over.
            out = plain_request(head.method, head.target, headers)
            if out is not None:
                self._plain = (head.target, headers)
                return out
        try:
            request = h11.Request(method=head.method, target=head.target, headers=headers)
        except h11.LocalProtocolError as exc:  # e.g. HTTP/1.0 naming no host: 1.1 upstream needs one
            raise LocalProtocolError(str(exc)) from None
        return self._send(request)

    def send_data(self, data: bytes) -> bytes:
        if self._plain:
            self._fall_back_to_h11()  # which refuses a body the request did not announce
        return self._send(h11.Data(data=data))

    def send_end(self, trailers: Headers | tuple = ()) -> bytes:
        """The end of the request body, with ``trailers`` when it is chunked.

        Raises:
            LocalProtocolError: trailers on a body framed by Content-Length (HTTP/1.1 cannot carry them).
        """
        if self._upgrade is not None or (self._plain is not None and not trailers):
            return b""  # a GET upgrade has no body; h11 would also write nothing
        if self._plain:
            self._fall_back_to_h11()
        return self._send(h11.EndOfMessage(headers=list(trailers)) if trailers else h11.EndOfMessage())

    def receive_data(self, data: bytes) -> None:
        if self._switched is not None:
            self._switched += data
        elif self._plain is not None:
            if data:
                self._received += data
            else:
                self._eof = True
        elif self._plain_done:
            if data:
                self._plain_stray = True
            else:
                self._eof = True
        elif self._upgrade is None:
            self._conn.receive_data(data)
        elif data:
            self._received += data
        else:
            self._eof = True

    def _fall_back_to_h11(self) -> None:
        """Replay the fast-path upgrade (or plain request) into h11, which handles the rest."""
        if self._plain:
            (target, headers), method = self._plain, self.method
            self._plain = None
        else:
            (target, headers), method = self._upgrade, b"GET"
            self._upgrade = None
        self._send(h11.Request(method=method, target=target, headers=headers))
        self._send(h11.EndOfMessage())
        self._conn.receive_data(bytes(self._received))
        self._received.clear()
        if self._eof:
            self._conn.receive_data(b"")

    def next_event(self):
        """ResponseHead (informational ones too), Body, EndOfMessage, NEED_DATA, PAUSED or ConnectionClosed.

        Raises:
            RemoteProtocolError: the upstream's response is malformed (answer 502).
        """
        if self._switched is not None:
            return PAUSED  # as h11 does after a 101
        if self._plain is not None:
            event = self._next_plain()
            if event is not None:
                return event
        elif self._plain_done:  # what h11 says once the response is complete
            if self._plain_stray:
                if not self._plain_keep:
                    raise RemoteProtocolError("invalid response from upstream: Got data when expecting EOF",
                                              status_hint=502)
                return PAUSED
            return ConnectionClosed() if self._eof else NEED_DATA
        if self._upgrade is not None:
            parsed = parse_plain_101(self._received)
            if parsed is not None:
                head, length = parsed
                self._switched = self._received[length:]
                self._upgrade = None
                self._received = bytearray()
                return head
            if not self._eof and len(self._received) <= self.max_header_size and (
                self._received.find(b"\r\n\r\n") < 0 and self._received.find(b"\n\n") < 0
            ):
                return NEED_DATA
            self._fall_back_to_h11()
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise RemoteProtocolError(f"invalid response from upstream: {exc}", status_hint=502) from None
        if isinstance(event, h11.Data):
            return Body(bytes(event.data))
        if isinstance(event, (h11.Response, h11.InformationalResponse)):
            return ResponseHead(
                status=event.status_code,
                reason=bytes(event.reason),
                http_version=bytes(event.http_version),
                headers=[(bytes(n), bytes(v)) for n, v in event.headers.raw_items()],
            )
        if isinstance(event, h11.EndOfMessage):
            if event.headers:
                return EndOfMessage(tuple((bytes(n), bytes(v)) for n, v in event.headers.raw_items()))
            return EndOfMessage()
        if isinstance(event, h11.ConnectionClosed):
            return ConnectionClosed()
        return event

    def _next_plain(self):
        """The fast path's next event, or None once it handed the exchange to h11."""
        received = self._received
        left = self._plain_left
        if left < 0:  # the head
            parsed = parse_plain_response(received, self.method)
            if parsed is None or parsed[1] > self.max_header_size:
                if not self._eof and len(received) <= self.max_header_size and (
                    received.find(b"\r\n\r\n") < 0 and received.find(b"\n\n") < 0
                ):
                    return NEED_DATA
                self._fall_back_to_h11()
                return None
            head, length, self._plain_left, self._plain_keep = parsed
            self._plain = ()
            del received[:length]
            return head
        if left == 0:
            self._plain_stray = bool(received)
            self._plain = None
            self._plain_left = -1
            self._plain_done = True
            received.clear()
            return EndOfMessage()
        if received:
            data = bytes(received[:left])
            del received[:left]
            self._plain_left = left - len(data)
            return Body(data)
        if self._eof:
            raise RemoteProtocolError("invalid response from upstream: peer closed connection without sending "
                                      f"complete message body ({left} bytes missing)", status_hint=502)
        return NEED_DATA

    def trailing_data(self) -> bytes:
        """Bytes the upstream sent after its 101 (already WebSocket frames)."""
        if self._switched is not None:
            return bytes(self._switched)
        return bytes(self._conn.trailing_data[0])

    def start_next_cycle(self) -> None:
        if self._plain_done:  # h11 never left IDLE
            self._plain_done = self._plain_stray = False
            return
        self._conn.start_next_cycle()

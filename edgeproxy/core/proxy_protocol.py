"""PROXY protocol v1 and v2 (HAProxy's spec, "The PROXY protocol", 2020): the parser.

Theory of operation
-------------------
An L4 balancer in front of edgeproxy (AWS NLB, HAProxy in TCP mode, ...) hides
the client's address: the proxy sees the balancer's.  With the PROXY protocol
the balancer prepends one header to the connection saying who the client is.
The header comes before anything else (before HTTP, before a TLS ClientHello),
and only a trusted balancer may send it: anybody else could claim any address.

`parse(buf)` looks at the start of what a connection sent so far and returns

* None: ``buf`` is a proper prefix of a header; every byte of it belongs to the
  header (the transport may consume them all and read more);
* a `ProxyHeader` whose ``length`` is the exact size of the header: bytes past
  it are the client's own and must be left for HTTP or TLS;

and raises `ProxyProtocolError` as soon as the bytes prove there is no valid
header (wrong signature, bad address, too long).  It is a pure function of the
bytes, so feeding a header split at any offset gives the same answer.

v1 is text, at most 107 bytes: ``PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n``
(TCP6 alike; ``PROXY UNKNOWN ...\\r\\n`` says "no address").  v2 is binary: a
12-byte signature, version/command, family/protocol, a 16-bit length, then
the addresses and optional TLVs (skipped here).  Its ``LOCAL`` command (a
balancer's own health check) carries no client address.  A v2 header longer
than ``max_v2_length`` is refused, so a peer never decides how much is
buffered.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

from edgeproxy.errors import RemoteProtocolError

__all__ = ["V1_MAX", "V2_SIGNATURE", "ProxyHeader", "ProxyProtocolError", "encode_v1", "encode_v2", "parse"]

V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
_V2_HEAD = struct.Struct("!12sBBH")
_V2_TCP4 = struct.Struct("!4s4sHH")
_V2_TCP6 = struct.Struct("!16s16sHH")
DEFAULT_MAX_V2_LENGTH = 4096


class ProxyProtocolError(RemoteProtocolError):
    """Not a valid PROXY protocol header: close the connection (there is no one to answer)."""


class ProxyHeader(NamedTuple):
    version: int
    #: False for v1 UNKNOWN and v2 LOCAL / unsupported families: keep the socket's own addresses
    proxied: bool
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    #: bytes the header takes at the start of the stream
    length: int


def _fail(message: str) -> ProxyProtocolError:
    return ProxyProtocolError(f"PROXY protocol: {message}")


def parse(buf: bytes | bytearray | memoryview, *, max_v2_length: int = DEFAULT_MAX_V2_LENGTH) -> ProxyHeader | None:
    """The header at the start of ``buf``, None when more bytes are needed.

    Raises:
        ProxyProtocolError: the bytes cannot start a valid header.
    """
    data = bytes(buf[: max(V1_MAX, 16 + max_v2_length)])
    if not data:
        return None
    if data[0] == 0x0D:  # "\r": the v2 signature
        return _parse_v2(data, max_v2_length)
    if data[0] == 0x50:  # "P"
        return _parse_v1(data)
    raise _fail("no PROXY header at the start of the connection")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    prefix = data[: len(_V1_PREFIX)]
    if prefix != _V1_PREFIX[: len(prefix)]:
        raise _fail("no PROXY header at the start of the connection")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise _fail("v1 header longer than 107 bytes")
        if b"\n" in data or (b"\r" in data[:-1]):
            raise _fail("v1 header has a bare CR or LF")
        return None
    line = data[len(_V1_PREFIX) : end]
    parts = line.split(b" ")
    if parts[0] == b"UNKNOWN":
        return ProxyHeader(1, False, None, None, end + 2)
    if parts[0] not in (b"TCP4", b"TCP6") or len(parts) != 5:
        raise _fail(f"v1 header is not 'PROXY TCP4|TCP6 src dst sport dport': {data[:end]!r}")
    family = ipaddress.IPv4Address if parts[0] == b"TCP4" else ipaddress.IPv6Address
    try:
        src = str(family(parts[1].decode("ascii")))
        dst = str(family(parts[2].decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        raise _fail(f"v1 header has a bad {parts[0].decode()} address: {data[:end]!r}") from None
    ports = []
    for text in parts[3:]:
        # RFC-less but strict: 0..65535 in decimal, no sign, no leading zeros
        if not text.isdigit() or (len(text) > 1 and text[0:1] == b"0") or int(text) > 65535:
            raise _fail(f"v1 header has a bad port {text!r}")
        ports.append(int(text))
    return ProxyHeader(1, True, (src, ports[0]), (dst, ports[1]), end + 2)


def _parse_v2(data: bytes, max_v2_length: int) -> ProxyHeader | None:
    sig = data[:12]
    if sig != V2_SIGNATURE[: len(sig)]:
        raise _fail("no PROXY header at the start of the connection")
    if len(data) >= 13:
        ver_cmd = data[12]
        if ver_cmd >> 4 != 2:
            raise _fail(f"v2 header with version {ver_cmd >> 4}")
        if ver_cmd & 15 > 1:
            raise _fail(f"v2 header with unknown command {ver_cmd & 15}")
    if len(data) < 16:
        return None
    _, ver_cmd, fam, length = _V2_HEAD.unpack_from(data)
    if length > max_v2_length:
        raise _fail(f"v2 header of {length} bytes is longer than {max_v2_length}")
    total = 16 + length
    if len(data) < total:
        return None
    if ver_cmd & 15 == 0:  # LOCAL: the balancer itself (health checks)
        return ProxyHeader(2, False, None, None, total)
    family, proto = fam >> 4, fam & 15
    if proto not in (0, 1, 2) or family not in (0, 1, 2, 3):
        raise _fail(f"v2 header with unknown family/protocol 0x{fam:02x}")
    if family == 1 and proto == 1:
        if length < _V2_TCP4.size:
            raise _fail("v2 TCP4 header shorter than its addresses")
        src, dst, sport, dport = _V2_TCP4.unpack_from(data, 16)
        return ProxyHeader(2, True, (str(ipaddress.IPv4Address(src)), sport), (str(ipaddress.IPv4Address(dst)), dport), total)
    if family == 2 and proto == 1:
        if length < _V2_TCP6.size:
            raise _fail("v2 TCP6 header shorter than its addresses")
        src, dst, sport, dport = _V2_TCP6.unpack_from(data, 16)
        return ProxyHeader(2, True, (str(ipaddress.IPv6Address(src)), sport), (str(ipaddress.IPv6Address(dst)), dport), total)
    # UNSPEC, UNIX, or UDP: no TCP client address to use (the spec says: accept, ignore the address)
    return ProxyHeader(2, False, None, None, total)


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 header (for tests and for tools that send one)."""
    family = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode("ascii")


def encode_v2(source: tuple[str, int] | None, destination: tuple[str, int] | None = None, tlvs: bytes = b"") -> bytes:
    """A v2 PROXY header; ``source`` None gives a LOCAL header."""
    if source is None:
        return _V2_HEAD.pack(V2_SIGNATURE, 0x20, 0, len(tlvs)) + tlvs
    destination = destination or ("0.0.0.0" if ":" not in source[0] else "::", 0)
    if ":" in source[0]:
        body = _V2_TCP6.pack(ipaddress.IPv6Address(source[0]).packed, ipaddress.IPv6Address(destination[0]).packed,
                             source[1], destination[1])
        fam = 0x21
    else:
        body = _V2_TCP4.pack(ipaddress.IPv4Address(source[0]).packed, ipaddress.IPv4Address(destination[0]).packed,
                             source[1], destination[1])
        fam = 0x11
    body += tlvs
    return _V2_HEAD.pack(V2_SIGNATURE, 0x21, fam, len(body)) + body

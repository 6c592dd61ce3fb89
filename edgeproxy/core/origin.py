"""The per-route Origin allow-list (defence against cross-site WebSocket hijacking).

A browser lets any page open a WebSocket to any site, with that site's cookies;
only the ``Origin`` header (RFC 6454, sent by every browser on a WebSocket
handshake, RFC 6455 section 4.1) says which page asked.  A route with
``allowed_origins`` refuses an upgrade whose Origin is not on its list with
403, before anything reaches a backend.

Patterns are serialized origins, ``scheme://host[:port]``, compared
case-insensitively, with default ports (80 for http/ws, 443 for https/wss)
made explicit on both sides, so ``https://app.example.com`` and
``https://app.example.com:443`` are the same origin.  ``https://*.example.com``
matches any subdomain at any depth (``a.example.com``, ``a.b.example.com``) but
not ``example.com`` itself, as in the Fetch standard's host matching.  ``*``
allows every origin.

A request without an Origin header is not from a browser page (browsers always
send one on a WebSocket handshake), so it is admitted: there is no ambient
authority for a hijacker to abuse.  ``Origin: null`` (sandboxed frames, file:
pages) is refused unless ``null`` is listed.
"""

from __future__ import annotations

__all__ = ["OriginPolicy", "parse_origin_pattern"]

_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def _split(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of a serialized origin, None when it is not one."""
    scheme, sep, rest = origin.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS or not rest or "/" in rest or "@" in rest:
        return None
    host, port = rest.lower(), _DEFAULT_PORTS[scheme]
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None
        host, tail = host[: end + 1], host[end + 1 :]
    else:
        host, colon, tail = host.partition(":")
        tail = colon + tail
    if tail:
        if not tail.startswith(":") or not tail[1:].isdigit() or not 0 < int(tail[1:]) < 65536:
            return None
        port = int(tail[1:])
    if not host:
        return None
    return scheme, host, port


def parse_origin_pattern(text: str) -> tuple[str, str, int] | str:
    """A pattern's ``(scheme, host, port)`` (host may start with ``*.``), ``"*"`` or ``"null"``.

    Raises:
        ValueError: with a readable message, when ``text`` is not a pattern.
    """
    if text in ("*", "null"):
        return text
    parts = _split(text)
    if parts is None:
        raise ValueError(f'expected an origin like "https://app.example.com" or "https://*.example.com", got {text!r}')
    scheme, host, port = parts
    bare = host[2:] if host.startswith("*.") else host
    if "*" in bare or not bare or bare.startswith("."):
        raise ValueError(f'a wildcard may only be the first label ("https://*.example.com"), got {text!r}')
    return scheme, host, port


class OriginPolicy:
    """Compiled ``allowed_origins`` of one route: `allows(origin_header)`."""

    __slots__ = ("any", "null", "exact", "wildcards")

    def __init__(self, patterns: tuple[str, ...] | list[str]):
        self.any = False
        self.null = False
        self.exact: set[tuple[str, str, int]] = set()
        #: (scheme, ".example.com", port)
        self.wildcards: list[tuple[str, str, int]] = []
        for text in patterns:
            parsed = parse_origin_pattern(text)
            if parsed == "*":
                self.any = True
            elif parsed == "null":
                self.null = True
            elif parsed[1].startswith("*."):
                self.wildcards.append((parsed[0], parsed[1][1:], parsed[2]))
            else:
                self.exact.add(parsed)

    def allows(self, origin: bytes | str | None) -> bool:
        """Whether a request with this ``Origin`` header value (None: no header) may pass."""
        if origin is None or self.any:
            return True
        if isinstance(origin, bytes):
            origin = origin.decode("latin-1")
        origin = origin.strip()
        if origin.lower() == "null":
            return self.null
        parts = _split(origin)
        if parts is None:
            return False
        if parts in self.exact:
            return True
        scheme, host, port = parts
        for w_scheme, suffix, w_port in self.wildcards:
            if scheme == w_scheme and port == w_port and host.endswith(suffix) and len(host) > len(suffix):
                return True
        return False

"""The affinity cookie: which server a client was pinned to, signed, and when to give way.

Theory of operation
-------------------
The proxy pins a client to a server with a cookie of its own.  The value is
``TOKEN.ISSUED.SIGNATURE``:

* ``TOKEN`` names the server opaquely: the first 9 bytes of
  HMAC-SHA256(secret, "server:" + address), base64url.  It says nothing about
  the address, stays the same across restarts and config reorderings, and
  changes when the secret does.
* ``ISSUED`` is the wall-clock second the cookie was issued (decimal), so the
  proxy enforces ``max_age`` itself instead of trusting the browser.
* ``SIGNATURE`` is HMAC-SHA256(secret, "TOKEN.ISSUED") truncated to 16 bytes,
  base64url, compared in constant time (`hmac.compare_digest`).

A cookie that is malformed, badly signed, expired, issued in the future or
names a server this upstream does not have is ignored: the request is balanced
as if it had none and a fresh cookie is issued (`CookieCheck.reason` says why,
for the logs).

Giving way to load (`honour_pin`): a pinned server is honoured only while it may
take connections (not down, not draining), the rebalancer is not shedding it,
and, when a ``rebalance_threshold`` is set, it holds no more than threshold x the
mean connections (per unit of weight) of the eligible servers.  Otherwise the
client goes to the least-loaded server and gets a new cookie.

The clock is passed in (``now``, wall-clock seconds: cookies outlive the process).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Hashable, Mapping, Set
from dataclasses import dataclass

SAME_SITE = ("lax", "strict", "none")
#: How far in the future an ``ISSUED`` may be (clock skew between proxies).
FUTURE_SKEW = 60.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class CookieCheck:
    """The verdict on one cookie value: `token` when valid, else the `reason` it is not."""

    token: str | None
    reason: str  #: "ok", "missing", "malformed", "bad-signature", "expired" or "future"


class AffinityCodec:
    """Issues and verifies affinity cookie values with one secret.

    Args:
        secret: the HMAC key (at least 16 bytes is sensible; config checks it).
        max_age: seconds a cookie is honoured after it was issued; 0 = no limit.
    """

    def __init__(self, secret: bytes, max_age: float):
        self._secret = secret
        self.max_age = max_age

    def _mac(self, message: str) -> bytes:
        return hmac.new(self._secret, message.encode("ascii"), hashlib.sha256).digest()

    def token(self, server: str) -> str:
        """The opaque token naming `server` (its address text)."""
        return _b64(hmac.new(self._secret, b"server:" + server.encode(), hashlib.sha256).digest()[:9])

    def issue(self, token: str, now: float) -> str:
        """A signed cookie value pinning to `token`, issued at `now`."""
        body = f"{token}.{int(now)}"
        return f"{body}.{_b64(self._mac(body)[:16])}"

    def verify(self, value: str | None, now: float) -> CookieCheck:
        """Check a cookie value; never raises."""
        if value is None:
            return CookieCheck(None, "missing")
        parts = value.split(".")
        if len(parts) != 3 or not parts[1].isdigit() or len(parts[1]) > 12 or not value.isascii():
            return CookieCheck(None, "malformed")
        token, issued, signature = parts
        expected = _b64(self._mac(f"{token}.{issued}")[:16])
        if not hmac.compare_digest(signature.encode("ascii"), expected.encode("ascii")):
            return CookieCheck(None, "bad-signature")
        age = now - int(issued)
        if age < -FUTURE_SKEW:
            return CookieCheck(None, "future")
        if self.max_age and age > self.max_age:
            return CookieCheck(None, "expired")
        return CookieCheck(token, "ok")


def set_cookie_header(
    name: str,
    value: str,
    *,
    path: str = "/",
    domain: str | None = None,
    max_age: int = 0,
    secure: bool = False,
    http_only: bool = True,
    same_site: str | None = "lax",
) -> bytes:
    """The value of a ``Set-Cookie`` header (RFC 6265 section 4.1); ``max_age`` 0 = session cookie."""
    parts = [f"{name}={value}", f"Path={path}"]
    if domain:
        parts.append(f"Domain={domain}")
    if max_age:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    if http_only:
        parts.append("HttpOnly")
    if same_site:
        parts.append(f"SameSite={same_site.capitalize()}")
    return "; ".join(parts).encode("latin-1")


def honour_pin(
    pin: Hashable,
    eligible: Mapping[Hashable, float],
    loads: Mapping[Hashable, int],
    *,
    threshold: float | None,
    shedding: Set[Hashable] = frozenset(),
) -> bool:
    """Whether a client pinned to `pin` goes there (True) or gives way (False).

    Args:
        pin: the server the cookie names.
        eligible: server -> effective weight of the servers taking connections.
        loads: server -> live connections.
        threshold: give way above threshold x the mean per unit of weight;
            None = strict affinity (only failure, drain or shedding moves a client).
        shedding: servers the rebalancer is closing connections on.

    A server is "holding more" only when it is also at least two connections
    above the mean, so a handful of connections never trips the threshold.
    """
    if pin not in eligible or pin in shedding:
        return False
    if threshold is None:
        return True
    total_weight = sum(eligible.values())
    mean = sum(loads.get(s, 0) for s in eligible) / total_weight
    load = loads.get(pin, 0) / eligible[pin]
    return not (load > threshold * mean and load >= mean + 2)

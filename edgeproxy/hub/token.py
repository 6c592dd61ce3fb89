"""JWT HS256 tokens (RFC 7519, RFC 7515 section 3.1): verify, and sign for tests and backends.

Kept small on purpose, so it can be read whole:

* The token is ``base64url(header) "." base64url(claims) "." base64url(signature)``,
  without padding.  The header must say ``"alg": "HS256"``: nothing else is accepted
  (``none`` in particular), so a token cannot choose a weaker check.
* The signature is HMAC-SHA256 over the first two parts with the hub's
  ``token_secret``, compared in constant time (`hmac.compare_digest`), before the
  claims are even parsed.
* ``exp`` (required when present: a number of seconds since the epoch) must be in the
  future and ``nbf``, if present, in the past, against ``now``: the caller's wall clock,
  passed in.
* ``channels`` is a list of channel patterns the token grants: a channel name in which
  ``*`` stands for any run of characters (``"user.42.*"``, ``"*"``).  ``sub``, if
  present, names the user (it is handed to the auth hook).

Errors are `HubError` ``bad_token`` or ``token_expired``; the message says which part
failed, never the secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass, field

import orjson

from edgeproxy.hub.protocol import HubError

__all__ = ["Grants", "ANONYMOUS", "NOTHING", "sign_token", "verify_token", "compile_patterns"]

_PATTERN_RE = re.compile(r"[A-Za-z0-9_\-.:@/=*]{1,255}")
_HEADER = {"alg": "HS256", "typ": "JWT"}


def _b64encode(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def _b64decode(part: str, what: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", part):
        raise HubError("bad_token", f"token {what} is not base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise HubError("bad_token", f"token {what} is not base64url") from None


def compile_patterns(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex matching any channel the patterns grant; None for no pattern."""
    if not patterns:
        return None
    alternatives = ("|".join(".*".join(re.escape(piece) for piece in p.split("*")) for p in patterns))
    return re.compile(f"(?:{alternatives})")


@dataclass(frozen=True, slots=True)
class Grants:
    """What a token allows: channel ``patterns``, until ``expires`` (None: no expiry)."""

    patterns: tuple[str, ...]
    expires: float | None = None
    subject: str | None = None
    _regex: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", compile_patterns(self.patterns))

    def allows(self, channel: str) -> bool:
        return self._regex is not None and self._regex.fullmatch(channel) is not None


#: anonymous mode (no token_secret): every channel
ANONYMOUS = Grants(("*",))
#: a connection without a token when tokens are required: nothing (a subscribe token may still grant)
NOTHING = Grants(())


def sign_token(claims: dict, secret: bytes) -> str:
    """An HS256 JWT with ``claims`` (for tests, the client's examples and backends)."""
    signing_input = _b64encode(orjson.dumps(_HEADER)) + b"." + _b64encode(orjson.dumps(claims))
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + _b64encode(signature)).decode("ascii")


def verify_token(token: str, secret: bytes, now: float) -> Grants:
    """Check an HS256 JWT and return what it grants.

    Args:
        token: the compact JWT.
        secret: the hub's ``token_secret``.
        now: wall-clock seconds since the epoch (the caller's clock).

    Raises:
        HubError: ``bad_token`` or ``token_expired``.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise HubError("bad_token", "a token has three dot-separated parts")
    header_part, claims_part, signature_part = parts
    try:
        header = orjson.loads(_b64decode(header_part, "header"))
    except orjson.JSONDecodeError:
        raise HubError("bad_token", "token header is not JSON") from None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise HubError("bad_token", 'token header must say "alg": "HS256"')
    expected = hmac.new(secret, f"{header_part}.{claims_part}".encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, _b64decode(signature_part, "signature")):
        raise HubError("bad_token", "token signature does not verify")
    try:
        claims = orjson.loads(_b64decode(claims_part, "claims"))
    except orjson.JSONDecodeError:
        raise HubError("bad_token", "token claims are not JSON") from None
    if not isinstance(claims, dict):
        raise HubError("bad_token", "token claims must be a JSON object")
    exp, nbf = claims.get("exp"), claims.get("nbf")
    for name, value in (("exp", exp), ("nbf", nbf)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise HubError("bad_token", f'token "{name}" must be a number (seconds since the epoch)')
    if exp is not None and now >= exp:
        raise HubError("token_expired", "token expired")
    if nbf is not None and now < nbf:
        raise HubError("token_expired", "token not valid yet (nbf)")
    channels = claims.get("channels", [])
    if not isinstance(channels, list) or not all(isinstance(p, str) and _PATTERN_RE.fullmatch(p) for p in channels):
        raise HubError("bad_token", 'token "channels" must be a list of channel patterns (names, "*" for any run)')
    subject = claims.get("sub")
    return Grants(tuple(channels), float(exp) if exp is not None else None, subject if isinstance(subject, str) else None)

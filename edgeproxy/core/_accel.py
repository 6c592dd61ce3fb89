"""The ONLY place that picks the frame-handling implementation: compiled or pure Python.

Everything else imports ``apply_mask``, ``parse_header``, ``encode_header``,
``FrameScanner``, ``write_many``, the relay cores, the relay engine and the resume envelope's
``number_frames``/``unwrap_frames`` from here.  The compiled twins live in
``edgeproxy._speedups`` (built from ``ext/_speedups.pyx``); the pure-Python references
are :mod:`edgeproxy.core.frames`, :mod:`edgeproxy.core.fanout` (``write_many``),
:mod:`edgeproxy.core.relay` and :mod:`edgeproxy.core.envelope`.
Both behave identically (``tests/core/test_equivalence.py``).

Selection, at import time:

* ``EDGEPROXY_PURE=1`` forces the pure implementation.
* Otherwise the compiled module is used when it imports.
* If it does not import and ``EDGEPROXY_REQUIRE_EXT=1``, ImportError is raised (CI sets
  this so a broken build fails loudly instead of silently falling back).

Flags are true for ``1``, ``true``, ``yes`` or ``on`` (any case).

``SPEEDUPS`` is True when the compiled code is active; ``IMPLEMENTATION`` is
``"compiled"`` or ``"pure"``.  ``encode_frame`` is built on the picked ``encode_header``
and ``apply_mask``; ``encode_close_payload`` and ``parse_close_payload`` exist only in
pure Python (they are not on a hot path) and are re-exported as they are, as are the
``OP_*`` constants.
"""

from __future__ import annotations

import os

from edgeproxy.core import envelope as _pure_envelope
from edgeproxy.core import fanout as _pure_fanout
from edgeproxy.core import frames as _pure
from edgeproxy.core import relay as _pure_relay
from edgeproxy.core.frames import (
    MAX_CONTROL_PAYLOAD,
    MAX_PAYLOAD_LENGTH,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RULE_CONTROL,
    RULE_FRAGMENTS,
    RULE_MASKED,
    RULE_OPCODES,
    RULE_UNMASKED,
    RULES_STRICT,
    encode_close_payload,
    parse_close_payload,
)

__all__ = [
    "SPEEDUPS",
    "IMPLEMENTATION",
    "OP_CONT",
    "OP_TEXT",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "MAX_PAYLOAD_LENGTH",
    "MAX_CONTROL_PAYLOAD",
    "RULE_MASKED",
    "RULE_UNMASKED",
    "RULE_CONTROL",
    "RULE_OPCODES",
    "RULE_FRAGMENTS",
    "RULES_STRICT",
    "apply_mask",
    "parse_header",
    "encode_header",
    "encode_frame",
    "encode_close_payload",
    "parse_close_payload",
    "FrameScanner",
    "write_many",
    "RelayCore",
    "RelayEndpoint",
    "RelayEngine",
    "number_frames",
    "unwrap_frames",
]


def env_flag(name: str) -> bool:
    """True when the environment variable `name` is 1/true/yes/on (any case)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


_impl = _pure
if not env_flag("EDGEPROXY_PURE"):
    try:
        from edgeproxy import _speedups as _impl  # type: ignore[no-redef]
    except ImportError as exc:
        if env_flag("EDGEPROXY_REQUIRE_EXT"):
            raise ImportError(
                f"EDGEPROXY_REQUIRE_EXT=1 but the compiled edgeproxy._speedups does not import: {exc}"
            ) from exc
        _impl = _pure

SPEEDUPS: bool = _impl is not _pure
IMPLEMENTATION: str = "compiled" if SPEEDUPS else "pure"

apply_mask = _impl.apply_mask
parse_header = _impl.parse_header
encode_header = _impl.encode_header
FrameScanner = _impl.FrameScanner
write_many = _impl.write_many if SPEEDUPS else _pure_fanout.write_many
RelayCore = _impl.RelayCore if SPEEDUPS else _pure_relay.RelayCore
RelayEndpoint = _impl.RelayEndpoint if SPEEDUPS else _pure_relay.RelayEndpoint
RelayEngine = _impl.RelayEngine if SPEEDUPS else _pure_relay.RelayEngine
number_frames = _impl.number_frames if SPEEDUPS else _pure_envelope.number_frames
unwrap_frames = _impl.unwrap_frames if SPEEDUPS else _pure_envelope.unwrap_frames
encode_frame = _pure.make_encode_frame(encode_header, apply_mask)

del _impl

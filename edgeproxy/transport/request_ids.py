"""X-Request-Id values the proxy makes (for HTTP/1.1 and HTTP/2 alike)."""

from __future__ import annotations

import os

__all__ = ["new_request_id"]


class _RequestIds:
    """New request ids: 32 hex digits (128 random bits, as nginx's ``$request_id``).

    Drawn from os.urandom 256 at a time (one system call per 256 requests);
    a forked worker starts with a fresh batch, so no two processes share ids.
    """

    __slots__ = ("_hex", "_pos")
    BATCH = 256

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._hex = ""
        self._pos = 0

    def __call__(self) -> str:
        pos = self._pos
        if pos >= len(self._hex):
            self._hex = os.urandom(16 * self.BATCH).hex()
            pos = 0
        self._pos = pos + 32
        return self._hex[pos:pos + 32]


new_request_id = _RequestIds()
os.register_at_fork(after_in_child=new_request_id.reset)

"""One error tree for the whole proxy.

Every error carries the remedy a peer should get: an HTTP status for a bad request
(`status_hint`) or a WebSocket close code for a bad frame (`close_code`).
"""

from __future__ import annotations


class EdgeProxyError(Exception):
    """Root of every error edgeproxy raises on purpose."""


class ConfigError(EdgeProxyError):
    """A configuration file is unusable; `problems` lists every (file, key, message)."""

    def __init__(self, problems: list[tuple[str, str, str]]):
        self.problems = problems
        super().__init__("\n".join(self.format_lines()))

    def format_lines(self) -> list[str]:
        return [f"{path}: {key}: {msg}" if key else f"{path}: {msg}" for path, key, msg in self.problems]


class ProtocolError(EdgeProxyError):
    """A peer broke HTTP or WebSocket rules."""

    status_hint: int = 400
    close_code: int = 1002

    def __init__(self, message: str, *, status_hint: int | None = None, close_code: int | None = None):
        super().__init__(message)
        if status_hint is not None:
            self.status_hint = status_hint
        if close_code is not None:
            self.close_code = close_code


class RemoteProtocolError(ProtocolError):
    """The peer sent something we must refuse (answer with status_hint / close_code)."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow (a bug in our code)."""


class FrameError(RemoteProtocolError):
    """A WebSocket frame that cannot be relayed; close the sender with `close_code`."""

"""Route selection: by host, then by longest path prefix, like an nginx server + location.

A route with a host that matches exactly beats a wildcard host (`*.example.com`),
which beats a route with no host; within the best host class the longest raw path
prefix wins (prefixes are compared as plain strings, as nginx `location /api`
and Envoy `prefix` do: `/api` also matches `/apis`; write `/api/` to avoid that).
Ties keep the order of the config file.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeproxy.config import RouteConfig


@dataclass(frozen=True, slots=True)
class _Entry:
    route: RouteConfig
    index: int


class Router:
    """Answers `match(host, path) -> RouteConfig | None`."""

    def __init__(self, routes: tuple[RouteConfig, ...] | list[RouteConfig]):
        self._exact: dict[str, list[_Entry]] = {}
        self._wildcard: list[tuple[str, _Entry]] = []
        self._any: list[_Entry] = []
        for index, route in enumerate(routes):
            entry = _Entry(route, index)
            if route.host is None:
                self._any.append(entry)
            elif route.host.startswith("*."):
                self._wildcard.append((route.host[1:], entry))  # ".example.com"
            else:
                self._exact.setdefault(route.host, []).append(entry)
        # Longest prefix first, then config order.
        key = lambda e: (-len(e.route.path_prefix), e.index)  # noqa: E731
        for entries in self._exact.values():
            entries.sort(key=key)
        self._any.sort(key=key)
        self._wildcard.sort(key=lambda item: (-len(item[0]), -len(item[1].route.path_prefix), item[1].index))

    def match(self, host: str, path: str) -> RouteConfig | None:
        host = host.lower()
        for entry in self._exact.get(host, ()):
            if path.startswith(entry.route.path_prefix):
                return entry.route
        best: _Entry | None = None
        best_suffix = -1
        for suffix, entry in self._wildcard:
            if len(suffix) < best_suffix:
                break
            if host.endswith(suffix) and len(host) > len(suffix) and path.startswith(entry.route.path_prefix):
                if best is None or len(entry.route.path_prefix) > len(best.route.path_prefix):
                    best, best_suffix = entry, len(suffix)
        if best is not None:
            return best.route
        for entry in self._any:
            if path.startswith(entry.route.path_prefix):
                return entry.route
        return None

"""Picking a server for a new connection: the balancing policies.

Theory of operation
-------------------
A `Balancer` knows the servers of one upstream and their configured weights.
Each `pick` is handed what changes from one connection to the next: the servers
that may take a connection now (with their *effective* weight, lower during slow
start), the live connection count of every server, the hash key of the request
(for ``hash``) and a random source.  It never reads a clock or a socket.

=============  ==============================================================
policy         choice
=============  ==============================================================
round_robin    smooth weighted round robin, as nginx does: every pick adds
               each server's weight to its score, takes the highest score and
               subtracts the total, so weights 5,1,1 give a a b a c a a, not
               a a a a a b c
least_conn     the fewest live connections per unit of weight; ties are broken
               at random so a burst does not pile onto the first server
p2c            power of two choices: two distinct servers drawn at random in
               proportion to their weight, the one with fewer connections per
               unit of weight wins (near least_conn, no herding on one server)
hash           consistent hashing on a ring of virtual nodes (64 per unit of
               weight): the same key lands on the same server, and a server
               that is down only moves its own keys, to the next servers
               clockwise.  A request without a key falls back to round robin.
=============  ==============================================================

Counts are live WebSocket connections (long-lived load), not requests.  Keys
are any hashable value; the transport uses the server's address.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Hashable, Mapping, Sequence
from urllib.parse import parse_qsl

from edgeproxy.core.http1 import RequestHead

POLICIES = ("round_robin", "least_conn", "p2c", "hash")
#: Virtual nodes per unit of weight on the hash ring.
RING_POINTS = 64


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Balancer:
    """Picks one server among the eligible ones, by `policy`.

    Args:
        policy: one of `POLICIES`.
        servers: every configured server, in config order (keys for the ring).
        weights: the configured weight of each server (>= 1); missing = 1.
    """

    def __init__(self, policy: str, servers: Sequence[Hashable], weights: Mapping[Hashable, int] | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown balancing policy {policy!r}")
        self.policy = policy
        self.servers = list(servers)
        self.weights = {s: (weights or {}).get(s, 1) for s in self.servers}
        self._current: dict[Hashable, float] = {s: 0.0 for s in self.servers}
        self._ring: list[int] = []
        self._ring_owner: list[Hashable] = []
        if policy == "hash":
            points = sorted(
                (_hash64(f"{index}#{n}".encode()), index)
                for index, server in enumerate(self.servers)
                for n in range(RING_POINTS * self.weights[server])
            )
            self._ring = [point for point, _ in points]
            self._ring_owner = [self.servers[index] for _, index in points]

    def pick(
        self,
        eligible: Mapping[Hashable, float],
        loads: Mapping[Hashable, int],
        rng: random.Random,
        key: bytes | None = None,
    ) -> Hashable | None:
        """The server for one new connection, or None when nothing is eligible.

        Args:
            eligible: server -> effective weight (> 0) of the servers that may
                take a connection now.
            loads: server -> live connections (missing = 0).
            rng: the random source (least_conn ties, p2c draws).
            key: the request's hash key (``hash`` policy only).
        """
        if not eligible:
            return None
        if self.policy == "least_conn":
            return least_loaded(eligible, loads, rng)
        if self.policy == "p2c":
            return self._two_choices(eligible, loads, rng)
        if self.policy == "hash" and key is not None:
            return self._ring_lookup(eligible, key)
        return self._smooth_round_robin(eligible)

    def _smooth_round_robin(self, eligible: Mapping[Hashable, float]) -> Hashable:
        current = self._current
        total = 0.0
        best = None
        for server, weight in eligible.items():
            current[server] = current.get(server, 0.0) + weight
            total += weight
            if best is None or current[server] > current[best]:
                best = server
        current[best] -= total
        return best

    @staticmethod
    def _two_choices(eligible: Mapping[Hashable, float], loads: Mapping[Hashable, int], rng: random.Random) -> Hashable:
        servers = list(eligible)
        if len(servers) == 1:
            return servers[0]
        weights = [eligible[s] for s in servers]
        first = rng.choices(range(len(servers)), weights)[0]
        del weights[first]
        rest = servers[:first] + servers[first + 1 :]
        second = rest[rng.choices(range(len(rest)), weights)[0]]
        first = servers[first]
        if loads.get(second, 0) / eligible[second] < loads.get(first, 0) / eligible[first]:
            return second
        return first

    def _ring_lookup(self, eligible: Mapping[Hashable, float], key: bytes) -> Hashable | None:
        ring = self._ring
        start = bisect.bisect(ring, _hash64(key))
        for step in range(len(ring)):
            owner = self._ring_owner[(start + step) % len(ring)]
            if owner in eligible:
                return owner
        return None  # pragma: no cover - eligible is a non-empty subset of the ring's servers


def least_loaded(eligible: Mapping[Hashable, float], loads: Mapping[Hashable, int], rng: random.Random) -> Hashable:
    """The eligible server with the fewest connections per unit of weight (ties at random)."""
    best: list[Hashable] = []
    best_score = 0.0
    for server, weight in eligible.items():
        score = loads.get(server, 0) / weight
        if not best or score < best_score:
            best, best_score = [server], score
        elif score == best_score:
            best.append(server)
    return best[0] if len(best) == 1 else rng.choice(best)


def parse_hash_source(text: str) -> tuple[str, str]:
    """Split a hash source: ``"ip"``, ``"header:NAME"``, ``"cookie:NAME"`` or ``"query:NAME"``.

    Raises:
        ValueError: with a readable message.
    """
    if text == "ip":
        return "ip", ""
    kind, sep, name = text.partition(":")
    if not sep or kind not in ("header", "cookie", "query") or not name or name != name.strip():
        raise ValueError(f'expected "ip", "header:NAME", "cookie:NAME" or "query:NAME", got {text!r}')
    return kind, name


def request_cookies(head: RequestHead) -> dict[str, str]:
    """The request's cookies (every ``Cookie`` header), first value of each name wins."""
    out: dict[str, str] = {}
    for name, value in head.headers:
        if name.lower() != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            cname, sep, cvalue = part.strip().partition("=")
            if sep and cname and cname not in out:
                out[cname] = cvalue.strip().strip('"')
    return out


def hash_key(head: RequestHead, client_ip: str, source: tuple[str, str]) -> bytes | None:
    """The bytes to hash for `head` under `source` (from `parse_hash_source`); None when absent."""
    kind, name = source
    if kind == "ip":
        return client_ip.encode()
    if kind == "header":
        return head.header(name.lower().encode("latin-1"))
    if kind == "cookie":
        value = request_cookies(head).get(name)
        return value.encode("latin-1") if value is not None else None
    _, _, query = head.target.partition(b"?")
    for qname, qvalue in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if qname == name:
            return qvalue.encode("latin-1")
    return None

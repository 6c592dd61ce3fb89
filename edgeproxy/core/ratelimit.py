"""Per-client request rate limits of ``[[routes]] rate_limit`` (sans-IO, time passed in).

Theory of operation
-------------------
Each limited route has one `ClientBuckets`: a `TokenBucket` (``rate`` requests
a second, ``burst`` at once) per client address, as Envoy's ``local_ratelimit``
with a per-address descriptor or nginx's ``limit_req zone=$binary_remote_addr``.
A request takes one token or is refused with the seconds until one is there
(the caller answers 429 with ``Retry-After``).

The table is bounded.  Buckets are kept in last-use order; one untouched for
``burst / rate`` seconds has refilled completely and is indistinguishable from
a new one, so `expire` drops it without changing any answer.  Past
``table_size`` addresses the least recently used bucket is dropped: only a
client with more source addresses than that gains by it (a fresh burst), and
the connection admission limits of ``[limits]`` still hold.

The buckets live in one process: with several workers each would count for
itself, which is why the configuration refuses ``rate_limit`` with
``workers`` above 1.
"""

from __future__ import annotations

from collections import OrderedDict

from edgeproxy.core.admission import TokenBucket

__all__ = ["ClientBuckets"]


class ClientBuckets:
    """One token bucket per client address, at most ``table_size`` of them.

    Call `take(ip, now)` per request; `expire(now)` now and then (the server's tick).
    """

    __slots__ = ("rate", "burst", "table_size", "_buckets")

    def __init__(self, rate: float, burst: int, table_size: int):
        if table_size < 1:
            raise ValueError(f"table_size must be >= 1, got {table_size}")
        self.rate = rate
        self.burst = burst
        self.table_size = table_size
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, ip: str, now: float) -> float:
        """One request from ``ip``: 0.0 when allowed, else the seconds until it would be."""
        buckets = self._buckets
        bucket = buckets.get(ip)
        if bucket is None:
            bucket = buckets[ip] = TokenBucket(self.rate, self.burst, now)
            if len(buckets) > self.table_size:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(ip)
        return bucket.take(now)

    def expire(self, now: float) -> int:
        """Forget buckets that have refilled completely; returns how many."""
        buckets = self._buckets
        dropped = 0
        while buckets:
            ip, bucket = next(iter(buckets.items()))
            if now - bucket.stamp < bucket.full_after():
                break  # last-use order: every later one is more recent
            del buckets[ip]
            dropped += 1
        return dropped

    def __len__(self) -> int:
        return len(self._buckets)

"""Admission control: who may open a connection now (sans-IO, time passed in).

Theory of operation
-------------------
A reconnect storm (every client of a restarted fleet coming back at once) is
the moment an edge proxy is most likely to fall over, and the moment a polite
refusal helps most: a client told "503, Retry-After: 3" backs off instead of
hammering a listen queue.  `Admission` decides at accept time, in O(1), and
never waits: a connection is either admitted or refused with a reason and the
number of seconds after which a retry would be admitted.

Four limits, each off when 0:

* ``max_connections``: open client connections of this process;
* ``max_connections_per_ip``: open client connections from one address;
* ``rate`` / ``burst``: a token bucket of new connections for the process;
* ``ip_rate`` / ``ip_burst``: one token bucket per client address.

Per-address state is bounded.  Live counts exist only for addresses with open
connections (so they are bounded by ``max_connections``, or by the open
connections).  Buckets are kept in last-use order; a bucket untouched for
``burst / rate`` seconds has refilled completely and is indistinguishable from
a new one, so `expire` drops it without losing anything.  Past ``table_size``
buckets the least recently used is dropped (only an attacker with more source
addresses than that gains by it, and then the process-wide bucket still holds).

Reasons are the strings ``"max_connections"``, ``"max_connections_per_ip"``,
``"rate"`` and ``"ip_rate"`` (and ``"ip_table_full"`` from the shared table of
`edgeproxy.core.shared_admission`).  The caller answers every refusal with 503
and ``Retry-After: ceil(retry_after)``.

Retry-After spreads the returns
-------------------------------
A storm refused with one and the same ``Retry-After`` comes back as one storm.
So every refusal gets its own value, from randomness passed in (``rng``: a
callable giving a float in [0, 1); None gives the undithered values):

* ``rate``: the refused clients form a queue the bucket will serve at ``rate``
  a second.  Each refusal books the next free ``1/rate`` slot of that queue
  (`book_retry`) and is told to come back within it, so each whole second of
  the window gets about ``rate`` returns: what the bucket can admit.  The queue
  is at most `MAX_RETRY_AFTER` long; past that, refusals are spread uniformly
  over the whole window without booking;
* ``ip_rate``: the wait for the address's next token, plus a jitter of up to
  ``max(1, 1/ip_rate)`` seconds;
* the connection caps (``max_connections``, ``max_connections_per_ip``,
  ``ip_table_full``): no rate says when a slot frees, so the values are spread
  uniformly over 1..`CAP_RETRY_WINDOW` seconds.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "Admission", "AdmissionPolicy", "TokenBucket", "Verdict", "retry_after_header", "book_retry", "cap_retry",
    "ip_rate_retry", "CAP_RETRY_WINDOW", "MAX_RETRY_AFTER",
]

#: a source of floats in [0, 1) (``random.Random().random``); None: no jitter
Rng = Callable[[], float] | None

#: seconds over which refusals by a connection cap are spread (1..this, whole seconds)
CAP_RETRY_WINDOW = 5.0
#: the longest queue of refused clients a rate refusal books into (seconds)
MAX_RETRY_AFTER = 60.0


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` stored; starts full.

    `take` is for admission (refuse when empty); `charge` is for metering
    (spend what was used, possibly going into debt, and say how long the debt
    takes to repay).
    """

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float):
        if rate <= 0 or burst <= 0:
            raise ValueError(f"rate and burst must be > 0, got rate={rate} burst={burst}")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now

    def take(self, now: float, n: float = 1.0) -> float:
        """Take ``n`` tokens: 0.0 when taken, else the seconds until they would be there."""
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate

    def wait(self, now: float, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens are there (0.0: now), without taking them."""
        self._refill(now)
        return 0.0 if self.tokens >= n else (n - self.tokens) / self.rate

    def charge(self, now: float, n: float) -> float:
        """Spend ``n`` tokens unconditionally: 0.0, or the seconds until the debt is repaid."""
        self._refill(now)
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def full_after(self) -> float:
        """Seconds an untouched bucket needs to refill from empty."""
        return self.burst / self.rate


class Verdict(NamedTuple):
    admitted: bool
    reason: str = ""
    #: seconds after which the same connection would be admitted (0 when admitted)
    retry_after: float = 0.0


ADMITTED = Verdict(True)


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    """The ``[limits]`` admission keys; 0 turns a limit off.  A burst of 0 means ``ceil(rate)``."""

    max_connections: int = 0
    max_connections_per_ip: int = 0
    rate: float = 0.0
    burst: int = 0
    ip_rate: float = 0.0
    ip_burst: int = 0
    table_size: int = 65536

    @property
    def enabled(self) -> bool:
        return bool(self.max_connections or self.max_connections_per_ip or self.rate or self.ip_rate)


def _burst(rate: float, burst: int) -> float:
    return float(burst) if burst > 0 else float(max(1, math.ceil(rate)))


def retry_after_header(seconds: float) -> bytes:
    """The ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return b"%d" % max(1, math.ceil(seconds))


def book_retry(queue_end: float, now: float, wait: float, rate: float, rng: Rng) -> tuple[float, float]:
    """A rate refusal's retry delay: the next free ``1/rate`` slot of the queue of refused clients.

    Args:
        queue_end: when the slots booked so far end (absolute time; 0.0: none booked).
        now: the time of the refusal.
        wait: seconds until the bucket has its next token.
        rate: the bucket's tokens per second.
        rng: jitter within the slot (None: its start).

    Returns:
        ``(retry_after, queue_end)``: the seconds to tell the client and the new end of
        the queue.  A queue already `MAX_RETRY_AFTER` long is not extended: the
        refusal is spread uniformly over ``[wait, MAX_RETRY_AFTER]`` instead.
    """
    start = max(queue_end, now + wait)
    slot = 1.0 / rate
    if start + slot - now > max(MAX_RETRY_AFTER, wait + slot):
        return wait + (rng() * (MAX_RETRY_AFTER - wait) if rng is not None and MAX_RETRY_AFTER > wait else 0.0), queue_end
    return start - now + (rng() * slot if rng is not None else 0.0), start + slot


def ip_rate_retry(wait: float, ip_rate: float, rng: Rng) -> float:
    """An ``ip_rate`` refusal's delay: the wait for the token, plus up to ``max(1, 1/ip_rate)`` s of jitter."""
    return wait + rng() * max(1.0, 1.0 / ip_rate) if rng is not None else wait


def cap_retry(rng: Rng) -> float:
    """A connection-cap refusal's delay: uniform over (0, `CAP_RETRY_WINDOW`), i.e. 1..5 whole seconds (1.0 without rng)."""
    return rng() * CAP_RETRY_WINDOW if rng is not None else 1.0


class Admission:
    """Admission decisions for one process; see the module docstring.

    Call `admit(ip, now)` for each new connection; when it says admitted, call
    `release(ip)` exactly once when that connection closes.  Call `expire(now)`
    now and then (the server's tick) to forget refilled buckets.  `reconfigure`
    applies new limits (a reload) and keeps the counts of open connections.

    Args:
        policy: the limits.
        now: the time the buckets start full at.
        rng: jitter for ``Retry-After`` (see the module docstring); None: none.
    """

    def __init__(self, policy: AdmissionPolicy, now: float = 0.0, rng: Rng = None):
        self.rng = rng
        self.open = 0
        self.per_ip: dict[str, int] = {}
        self._ip_buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._bucket: TokenBucket | None = None
        #: when the slots booked by refused clients end (see `book_retry`)
        self._queue_end = 0.0
        #: refusals so far, by reason
        self.refused: dict[str, int] = {}
        self.reconfigure(policy, now)

    def reconfigure(self, policy: AdmissionPolicy, now: float) -> None:
        """New limits; open connections stay counted, buckets keep their tokens (capped at the new burst)."""
        self.policy = policy
        old = self._bucket
        self._bucket = TokenBucket(policy.rate, _burst(policy.rate, policy.burst), now) if policy.rate > 0 else None
        if old is not None and self._bucket is not None:
            old._refill(now)
            self._bucket.tokens = min(self._bucket.burst, old.tokens)
        self._ip_burst = _burst(policy.ip_rate, policy.ip_burst) if policy.ip_rate > 0 else 0.0
        for bucket in self._ip_buckets.values():
            bucket._refill(now)
            bucket.rate, bucket.burst = policy.ip_rate, self._ip_burst
            bucket.tokens = min(bucket.tokens, bucket.burst)
        if not self._ip_burst:
            self._ip_buckets.clear()
        while len(self._ip_buckets) > policy.table_size:
            self._ip_buckets.popitem(last=False)

    def _refuse(self, reason: str, retry_after: float) -> Verdict:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return Verdict(False, reason, retry_after)

    def admit(self, ip: str, now: float) -> Verdict:
        """Admit or refuse one new connection from ``ip``; counts it when admitted."""
        policy = self.policy
        if policy.max_connections and self.open >= policy.max_connections:
            return self._refuse("max_connections", cap_retry(self.rng))
        count = self.per_ip.get(ip, 0)
        if policy.max_connections_per_ip and count >= policy.max_connections_per_ip:
            return self._refuse("max_connections_per_ip", cap_retry(self.rng))
        ip_bucket = None
        if self._ip_burst:
            ip_bucket = self._ip_buckets.get(ip)
            if ip_bucket is None:
                ip_bucket = TokenBucket(policy.ip_rate, self._ip_burst, now)
            # Check without taking first: a refusal by the process-wide bucket
            # must not cost this address a token.
            wait = ip_bucket.wait(now)
            if wait:
                self._remember(ip, ip_bucket)
                return self._refuse("ip_rate", ip_rate_retry(wait, policy.ip_rate, self.rng))
        if self._bucket is not None:
            wait = self._bucket.take(now)
            if wait:
                retry, self._queue_end = book_retry(self._queue_end, now, wait, policy.rate, self.rng)
                return self._refuse("rate", retry)
        if ip_bucket is not None:
            ip_bucket.tokens -= 1  # wait() said there is one
            self._remember(ip, ip_bucket)
        self.open += 1
        self.per_ip[ip] = count + 1
        return ADMITTED

    def _remember(self, ip: str, bucket: TokenBucket) -> None:
        buckets = self._ip_buckets
        buckets[ip] = bucket
        buckets.move_to_end(ip)
        while len(buckets) > self.policy.table_size:
            buckets.popitem(last=False)

    def release(self, ip: str) -> None:
        """A connection admitted for ``ip`` closed."""
        self.open -= 1
        count = self.per_ip.get(ip, 0) - 1
        if count > 0:
            self.per_ip[ip] = count
        else:
            self.per_ip.pop(ip, None)

    def expire(self, now: float) -> int:
        """Forget per-address buckets that have refilled completely; returns how many."""
        buckets = self._ip_buckets
        dropped = 0
        while buckets:
            ip, bucket = next(iter(buckets.items()))
            if now - bucket.stamp < bucket.full_after():
                break  # kept in last-use order: every later one is more recent
            del buckets[ip]
            dropped += 1
        return dropped

    @property
    def tracked_addresses(self) -> int:
        """Per-address entries held now (buckets plus live counts): bounded, see the docstring."""
        return len(self._ip_buckets) + len(self.per_ip)

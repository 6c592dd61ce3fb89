"""Fleet-wide admission: one connection-rate budget for all instances (sans-IO, time passed in).

Theory of operation
===================

With ``[admission] scope = "cluster"`` the ``[limits] connection_rate`` /
``connection_burst`` bucket is the *fleet's*: it lives in the backplane (one Redis
hash, refilled and debited by one script, see
`edgeproxy.transport.fleet_admission`), and every instance spends from it.

**Leases, not a round trip per connection.**  An instance takes tokens from the
shared bucket in small batches (`lease_size`: 10 ms of the rate, at least 1) into a
local pool, and admits from the pool without waiting.  When the pool runs low the
caller starts one lease request in the background (`want_lease`); its answer
(`granted`) tops the pool up.  A connection that finds the pool empty is refused
at once with 503, never held.  Tokens are debited from the fleet bucket when
leased, so the fleet can never admit more than the bucket gives out: its error is
only the tokens that sit leased and unspent when a storm ends (at most one batch
per instance, and a lease older than `LEASE_TTL` is dropped): with N instances at
most N x 10 ms of the rate, against a budget of ``burst + rate x seconds``.  The
cost is one lease round trip per batch: about 100 a second for the fleet under a
storm, whatever the rate.

**The fleet's answer** also carries the seconds until the bucket has a token
again (no lease is asked for before then), how long the fleet's queue of refused
clients already is, and how many instances leased in the last `MEMBER_TTL`
seconds (`active`).  ``Retry-After`` books each refusal into a queue served at
the instance's share ``rate / active`` (`book_retry`), starting where the fleet's
queue ends; refusals are reported with the next lease, so the fleet's queue
grows by every instance's refusals.

**Fallback.**  When the backplane does not answer, `lost` switches to a local
bucket at the instance's share of the fleet's budget: ``rate / active`` and
``burst / active`` with the last ``active`` seen (1 when the fleet was never
reached: one instance's share is then the whole budget, as with ``scope =
"instance"``).  So the fleet stays near its budget while it is split, instead of
admitting ``active`` times more.  A lease is tried again every `PROBE_INTERVAL`
seconds; the first one that succeeds ends the fallback (`back`).  The caller logs
both changes, once each.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from edgeproxy.core.admission import Rng, TokenBucket, _burst, book_retry

__all__ = ["FleetTokens", "LeaseAnswer", "LEASE_TTL", "MEMBER_TTL", "PROBE_INTERVAL", "lease_size"]

#: seconds a leased token may wait unspent in an instance's pool before it is dropped
LEASE_TTL = 1.0
#: seconds an instance counts as a member of the fleet after its last lease
MEMBER_TTL = 10.0
#: seconds between lease attempts while the backplane is unreachable
PROBE_INTERVAL = 1.0


def lease_size(rate: float) -> int:
    """Tokens one lease asks for: 10 ms of the fleet's rate, at least 1."""
    return max(1, math.ceil(rate / 100.0))


class LeaseAnswer(NamedTuple):
    """What the fleet's bucket answered to one lease."""

    #: tokens given to this instance (0..asked)
    granted: int
    #: seconds until the bucket has a token again (0 when it had some)
    wait: float
    #: seconds the fleet's queue of refused clients extends past now
    queue: float
    #: instances that leased within `MEMBER_TTL` (this one included)
    active: int


class FleetTokens:
    """This instance's side of the fleet bucket: the leased pool, or the fallback bucket.

    Args:
        rate: the fleet's connections per second (``connection_rate``, > 0).
        burst: the fleet's burst (``connection_burst``; 0 = ``ceil(rate)``).
        now: the time of creation.
        rng: jitter for ``Retry-After`` (see `edgeproxy.core.admission`).
    """

    def __init__(self, rate: float, burst: int, now: float, rng: Rng = None):
        self.rng = rng
        self.tokens = 0
        #: when the pool's tokens were leased (dropped `LEASE_TTL` after)
        self.leased_at = now
        #: a lease request is on its way (at most one)
        self.in_flight = False
        #: no lease before this time (the fleet said it is empty until then, or a probe interval)
        self.not_before = now
        #: refusals since the last lease request (reported with the next)
        self.unreported = 0
        self.active = 1
        self.queue_end = 0.0
        #: the local bucket while the backplane is unreachable (None: leasing)
        self.fallback: TokenBucket | None = None
        self.reconfigure(rate, burst, now)

    def reconfigure(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = _burst(rate, burst)
        self.lease = lease_size(rate)
        if self.fallback is not None:
            self.fallback = self._share_bucket(now)

    def _share_bucket(self, now: float) -> TokenBucket:
        share = max(1, self.active)
        return TokenBucket(self.rate / share, max(1.0, self.burst / share), now)

    # -- the accept path ---------------------------------------------------------------

    def available(self, now: float) -> bool:
        """Whether one connection may be admitted now (nothing is spent: see `spend`)."""
        if self.fallback is not None:
            return self.fallback.wait(now) == 0.0
        if self.tokens and now - self.leased_at > LEASE_TTL:
            self.tokens = 0  # stale: the fleet has moved on
        return self.tokens > 0

    def spend(self, now: float) -> None:
        """Spend the token `available` said is there."""
        if self.fallback is not None:
            self.fallback.take(now)
        else:
            self.tokens -= 1

    def refuse(self, now: float) -> float:
        """A refusal by the fleet's rate: the seconds to put in ``Retry-After``."""
        self.unreported += 1
        share = self.rate / max(1, self.active)
        if self.fallback is not None:
            wait = self.fallback.wait(now)
        else:
            wait = max(0.0, self.not_before - now) or 1.0 / share
        retry, self.queue_end = book_retry(self.queue_end, now, wait, share, self.rng)
        return retry

    def want_lease(self, now: float) -> int:
        """Tokens to ask the fleet for now (0: do not ask).  The caller then must call
        `granted` or `lost` exactly once."""
        if self.in_flight or now < self.not_before:
            return 0
        if self.fallback is None and self.tokens * 2 > self.lease:
            return 0
        self.in_flight = True
        return self.lease

    def reported(self) -> int:
        """The refusals to report with the lease being sent (and forget them here)."""
        count, self.unreported = self.unreported, 0
        return count

    # -- answers -----------------------------------------------------------------------

    def granted(self, answer: LeaseAnswer, now: float) -> bool:
        """The fleet answered; True when this ends a fallback (the caller logs it)."""
        self.in_flight = False
        was_fallback = self.fallback is not None
        self.fallback = None
        self.active = max(1, answer.active)
        if answer.granted:
            if now - self.leased_at > LEASE_TTL:
                self.tokens = 0
            self.tokens += answer.granted
            self.leased_at = now
        self.not_before = now + answer.wait
        self.queue_end = max(self.queue_end, now + answer.queue)
        return was_fallback

    def lost(self, now: float) -> bool:
        """The lease failed (backplane unreachable); True when this starts a fallback."""
        self.in_flight = False
        self.not_before = now + PROBE_INTERVAL
        if self.fallback is not None:
            return False
        self.tokens = 0
        self.fallback = self._share_bucket(now)
        return True

"""Fleet-wide admission: one connection-rate budget for all instances (sans-IO, time passed in).

Theory of operation
===================

With ``[admission] scope = "cluster"`` the ``[limits] connection_rate`` /
``connection_burst`` bucket is the *fleet's*: it lives in the backplane (one Redis
hash, refilled and debited by one script, see
`edgeproxy.transport.fleet_admission`), and every instance spends from it.

**Leases, not a round trip per connection.**  An instance takes tokens from the
shared bucket in small batches (`lease_size`: 10 ms of the rate, at least 1) into a
local pool, and admits from the pool without waiting.  When the pool runs dry
before the next batch arrives (a storm on a loaded instance: the round trip is
longer than a batch lasts) the batch doubles, up to `MAX_LEASE_SECONDS` of the
rate; a batch that expires unspent halves it again.  When the pool runs low the
caller starts one lease request in the background (`want_lease`); its answer
(`granted`) tops the pool up.  A connection that finds the pool empty is refused
at once with 503, never held.  Tokens are debited from the fleet bucket when
leased, so the fleet can never admit more than the bucket gives out: its error is
only the tokens that sit leased and unspent when a storm ends (at most one batch
per instance: a pool older than `LEASE_TTL` is renewed, from the server's tick
too, and its old tokens are dropped when the new batch arrives): with N instances at
most N x 50 ms of the rate, against a budget of ``burst + rate x seconds``.  The
cost is one lease round trip per batch: at most about 100 a second per instance
under a storm, whatever the rate.  The other way round, the fleet admits less
than its budget when the bucket overflows (stays full while no instance asks):
keep ``connection_burst`` above the longest lease round trip under load (100 ms
of the rate is plenty on a LAN).

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

__all__ = ["FleetTokens", "LeaseAnswer", "LEASE_TTL", "MAX_LEASE_SECONDS", "MEMBER_TTL", "PROBE_INTERVAL", "fleet_lease",
           "lease_size"]

#: seconds a leased batch may wait unspent in an instance's pool before it is renewed (and dropped)
LEASE_TTL = 1.0
#: seconds an instance counts as a member of the fleet after its last lease
MEMBER_TTL = 10.0
#: seconds between lease attempts while the backplane is unreachable
PROBE_INTERVAL = 1.0
#: the largest batch one lease asks for, in seconds of the fleet's rate
MAX_LEASE_SECONDS = 0.05


def lease_size(rate: float) -> int:
    """Tokens one lease asks for: 10 ms of the fleet's rate, at least 1."""
    return max(1, math.ceil(rate / 100.0))


def fleet_lease(state: dict | None, now_ms: float, rate: float, burst: float, want: int, refused: int,
                instance: str, member_ttl_ms: float) -> tuple[dict, tuple[int, int, int, int]]:
    """The fleet bucket's side of one lease, for stores without scripts (NATS key-value).

    The same arithmetic as the Redis script ``LEASE`` in
    `edgeproxy.transport.fleet_admission`: refill, grant up to ``want`` whole
    tokens, extend the queue of refused clients by ``refused / rate``, record the
    member and drop members silent for ``member_ttl_ms``.

    Args:
        state: ``{"t": tokens, "s": stamp_ms, "q": queue_end_ms, "m": {instance: last_ms}}``,
            or None for a new bucket (full).

    Returns:
        ``(new_state, (granted, wait_ms, queue_ms, active))``.
    """
    state = state or {}
    tokens, stamp, queue = float(state.get("t", burst)), float(state.get("s", now_ms)), float(state.get("q", 0.0))
    if now_ms > stamp:
        tokens = min(burst, tokens + (now_ms - stamp) * rate / 1000)
    granted = min(want, math.floor(tokens))
    tokens -= granted
    if refused > 0:
        queue = max(queue, now_ms) + refused * 1000 / rate
    wait = (1 - tokens) * 1000 / rate if tokens < 1 else 0.0
    members = {name: last for name, last in dict(state.get("m", {})).items() if last >= now_ms - member_ttl_ms}
    members[instance] = now_ms
    new = {"t": tokens, "s": max(stamp, now_ms), "q": queue, "m": members}
    return new, (int(granted), math.ceil(wait), math.ceil(max(0.0, queue - now_ms)), len(members))


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
        #: the batch asked for: `lease_size`, doubled (up to `max_lease`) while batches run out
        #: before the next answer, halved back when leases expire unspent
        self.min_lease = self.lease = lease_size(rate)
        self.max_lease = max(self.min_lease, math.ceil(rate * MAX_LEASE_SECONDS))
        #: the pool ran dry while a lease was on its way (demand outran the batch)
        self._starved = False
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
        if not self.tokens and self.in_flight:
            self._starved = True
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
        # A pool older than LEASE_TTL is renewed (its tokens serve until the new batch
        # arrives, then they are dropped): an idle instance asks once a second.
        stale = self.tokens and now - self.leased_at > LEASE_TTL
        if self.fallback is None and self.tokens * 2 > self.lease and not stale:
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
        if self._starved and answer.granted == self.lease:
            self.lease = min(self.max_lease, self.lease * 2)
        self._starved = False
        if self.tokens and now - self.leased_at > LEASE_TTL:
            self.tokens = 0  # stale: the fleet has moved on, and the batch was too big
            self.lease = max(self.min_lease, self.lease // 2)
        if answer.granted:
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

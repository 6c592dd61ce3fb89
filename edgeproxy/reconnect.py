"""Reconnection helpers shared by edgeproxy's clients: backoff with full jitter, and sequence dedupe.

Both are sans-IO: the caller sleeps and the caller passes messages in.  The
JavaScript client (`static/resume-client.js`) implements the same two rules.

* `Backoff`: "full jitter" (Brooker, "Exponential Backoff And Jitter", AWS
  Architecture Blog 2015): attempt n waits a uniform random time in
  ``[floor, min(cap, base * 2**n)]``, so a crowd of clients cut off at once comes
  back spread over the whole interval instead of in waves.  The resume client
  uses ``floor = 0``; the channels client (`edgeproxy.client`) waits at least
  0.5 s (``Backoff(1.0, 30.0, floor=0.5)``: 0.5-1 s, 0.5-2 s, ... 0.5-30 s).
* `SeqDedupe`: messages numbered 1, 2, 3... per session; a number at or below
  the last one delivered is a duplicate (a replay overlapping what arrived),
  a number past the next one is a gap (something was lost: the session must
  be reset rather than continue silently).
"""

from __future__ import annotations

import random

__all__ = ["Backoff", "SeqDedupe", "SeqGap"]


class Backoff:
    """Exponential backoff with full jitter.

    Args:
        base: the first attempt's upper bound, in seconds.
        cap: no wait is ever longer than this.
        rng: the randomness (a `random.Random`; tests pass a seeded one).
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None, *, floor: float = 0.0):
        if base <= 0 or cap < base or not 0 <= floor <= base:
            raise ValueError("need 0 < base <= cap and 0 <= floor <= base")
        self.base = base
        self.cap = cap
        self.floor = floor
        self.rng = rng or random.Random()
        self.attempt = 0

    def ceiling(self, attempt: int) -> float:
        """The upper bound of attempt `attempt` (0-based)."""
        return min(self.cap, self.base * 2 ** min(attempt, 64))

    def delay(self, attempt: int, draw: float) -> float:
        """The wait before attempt `attempt` (0-based) for a uniform `draw` in [0, 1]."""
        return self.floor + (self.ceiling(attempt) - self.floor) * draw

    def next_delay(self) -> float:
        """The wait before the next attempt; each call counts one attempt."""
        delay = self.delay(self.attempt, self.rng.random())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """A connection worked: the next failure starts from `base` again."""
        self.attempt = 0


class SeqGap(Exception):
    """A message number skipped ahead: messages were lost."""


class SeqDedupe:
    """Delivers each sequence number once, in order."""

    __slots__ = ("last",)

    def __init__(self, last: int = 0):
        #: the last number delivered
        self.last = last

    def accept(self, seq: int) -> bool:
        """True when `seq` is the next message (deliver it); False for a duplicate.

        Raises:
            SeqGap: `seq` is past the next number.
        """
        if seq <= self.last:
            return False
        if seq != self.last + 1:
            raise SeqGap(f"message {seq} after {self.last}")
        self.last = seq
        return True

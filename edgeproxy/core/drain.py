"""Graceful drain: when to send each WebSocket its close frame, and what it says.

Theory of operation
===================

On SIGTERM (or a reload that removes a server) every WebSocket client must get a
close frame before its connection ends, and the clients must not all come back at
once: 100,000 closes sent in one loop iteration are 100,000 reconnects landing on
the remaining servers in the same second.  :class:`Drain` plans the closes when the
drain starts and hands them out as time passes; it never sends, reads a clock or
draws its own randomness.

The drain window is ``drain_timeout`` seconds, after which the transport closes
whatever remains (:attr:`Drain.deadline`).  Closes are sent in the first
``close_window`` part of it (0.5 = the first half) and the rest is a tail in which
the closing handshakes complete::

    start                      start + close_window * drain_timeout      deadline
      |-- batch -- batch -- ... -- batch --|---------- tail: handshakes ---------|

The connections are shuffled (so no upstream or listener goes first) and cut into
equal batches, at most one every ``batch_interval`` seconds, spread evenly from the
start to the end of the close window; with few connections there are fewer batches
(one connection each), still spread over the window.

Each close carries a reason with a reconnect hint, ``"server shutting down;
reconnect in 2.3s"``, its delay drawn uniformly from ``reconnect_hint`` per
connection: clients that read it spread their reconnects within each batch too;
clients that do not are still spread by the batches.  The reason must fit a close
frame (123 bytes of UTF-8 after the 2-byte code, RFC 6455 section 5.5): it is
checked for both ends of the range when the drain is created.  The code is 1001
(going away) by default; 1012 (service restart) tells clients the same service will
be back.

The transport calls ``due(now)`` from its loop tick (or ``call_at`` the
:attr:`Drain.next_batch_at` time) and sends a close frame for each
``(key, code, reason)``; ``forget(key)`` drops a connection that ended by itself.

**Stalls.**  When the loop was blocked (or the process stopped) past more than one
batch, the overdue batches are not released together: that would be the burst the
pacing exists to prevent.  The connections still waiting are planned again, from
``now`` over what is left of the close window (at most one batch every
``batch_interval``, the first at once); when the close window is already over, the
rest go at once, since every one of them must get its close before the deadline.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterable

__all__ = ["CLOSE_GOING_AWAY", "CLOSE_SERVICE_RESTART", "Drain"]

CLOSE_GOING_AWAY = 1001
CLOSE_SERVICE_RESTART = 1012
#: codes a server may send: RFC 6455 section 7.4.1 and the IANA registry, plus the
#: ranges for libraries and applications (3000-4999)
_SENDABLE_CODES = frozenset({1000, 1001, 1011, 1012, 1013, 1014}) | frozenset(range(3000, 5000))
#: a close payload is at most 125 bytes, 2 of them the code
MAX_REASON_BYTES = 123


class Drain:
    """The paced closes of one graceful drain.

    Args:
        now: when the drain starts; the first batch is due at once.
        keys: the live WebSocket connections (any hashables).
        drain_timeout: seconds until the transport closes whatever remains.
        rng: shuffles the connections and draws the reconnect hints.
        batch_interval: the least time between two batches, in seconds.
        close_window: the part of the drain window in which closes are sent, in [0, 1).
        close_code: the close frame's code (1001 default, 1012 for a restart).
        reconnect_hint: (least, most) seconds of the reconnect delay in the reason.
        reason_format: the reason, with ``{delay}`` for the hint in seconds.

    Raises:
        ValueError: a setting out of range, a code a server may not send, or a reason
            that does not fit a close frame.
    """

    def __init__(
        self,
        now: float,
        keys: Iterable[Hashable],
        drain_timeout: float,
        *,
        rng: random.Random,
        batch_interval: float = 0.5,
        close_window: float = 0.5,
        close_code: int = CLOSE_GOING_AWAY,
        reconnect_hint: tuple[float, float] = (1.0, 5.0),
        reason_format: str = "server shutting down; reconnect in {delay:.1f}s",
    ):
        if not (drain_timeout > 0 and math.isfinite(drain_timeout)):
            raise ValueError(f"drain_timeout must be a positive number of seconds, got {drain_timeout!r}")
        if not batch_interval > 0:
            raise ValueError(f"batch_interval must be > 0 seconds, got {batch_interval!r}")
        if not 0 <= close_window < 1:
            raise ValueError(f"close_window must be in [0, 1) (the rest is the tail), got {close_window!r}")
        if close_code not in _SENDABLE_CODES:
            raise ValueError(f"close_code {close_code!r} is not one a server may send (1001, 1012, 3000-4999, ...)")
        least, most = reconnect_hint
        if not 0 <= least <= most < math.inf:
            raise ValueError(f"reconnect_hint must be (least, most) with 0 <= least <= most, got {reconnect_hint!r}")
        for delay in (least, most):
            try:
                reason = reason_format.format(delay=delay)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"reason_format {reason_format!r} needs only {{delay}}: {exc}") from None
            if len(reason.encode("utf-8")) > MAX_REASON_BYTES:
                raise ValueError(f"close reason {reason!r} is longer than {MAX_REASON_BYTES} bytes of UTF-8")

        self.close_code = close_code
        self.reconnect_hint = (least, most)
        self.reason_format = reason_format
        self._rng = rng
        self._keys = list(dict.fromkeys(keys))  # each connection once, in a stable order
        rng.shuffle(self._keys)
        #: keys whose close is still to come
        self._waiting = set(self._keys)
        self.started = now
        #: when the transport closes whatever remains
        self.deadline = now + drain_timeout
        #: when the last batch is due (the tail follows)
        self.close_by = now + close_window * drain_timeout
        self.batch_interval = batch_interval
        #: times the pacing was planned again after a stall (see the theory of operation)
        self.replans = 0
        self._plan(now, 0)

    def _plan(self, now: float, first_key: int) -> None:
        """Spread the keys from index `first_key` on evenly over the rest of the close window."""
        self._first_key = first_key
        self._plan_start = now
        self._count = count = len(self._keys) - first_key
        window = max(0.0, self.close_by - now)
        self.batches = min(count, math.floor(window / self.batch_interval) + 1)
        self._spacing = window / (self.batches - 1) if self.batches > 1 else 0.0
        self._next_batch = 0

    @property
    def done(self) -> bool:
        """True once every batch has been handed out."""
        return self._next_batch >= self.batches

    @property
    def next_batch_at(self) -> float | None:
        """When the next batch is due, or None when all were handed out."""
        if self.done:
            return None
        return self._plan_start + self._next_batch * self._spacing

    @property
    def remaining(self) -> int:
        """Connections still waiting for their close (forgotten ones excluded)."""
        return len(self._waiting)

    def forget(self, key: Hashable) -> bool:
        """`key` ended by itself: it gets no close; False if it was not waiting for one."""
        if key in self._waiting:
            self._waiting.remove(key)
            return True
        return False

    def due(self, now: float) -> list[tuple[Hashable, int, str]]:
        """The closes due by `now`, as ``(key, close_code, reason)``: each key once, in batch order."""
        closes: list[tuple[Hashable, int, str]] = []
        waiting = self._waiting
        next_at = self.next_batch_at
        if (next_at is not None and next_at <= now and self._next_batch + 1 < self.batches
                and self._plan_start + (self._next_batch + 1) * self._spacing <= now):
            # a stall: more than one batch is overdue; plan the rest again from now
            self.replans += 1
            self._plan(now, self._batch_start(self._next_batch))
            next_at = self.next_batch_at
        while next_at is not None and next_at <= now:
            start = self._batch_start(self._next_batch)
            self._next_batch += 1
            for key in self._keys[start:self._batch_start(self._next_batch)]:
                if key in waiting:
                    waiting.remove(key)
                    closes.append((key, self.close_code, self._reason()))
            next_at = self.next_batch_at
        if self.done:
            self._keys = []  # nothing refers to them any more
        return closes

    def _batch_start(self, batch: int) -> int:
        """Index in the shuffled keys where `batch` starts: equal batches, sizes differ by one at most."""
        return self._first_key + (batch * self._count // self.batches if self.batches else 0)

    def _reason(self) -> str:
        least, most = self.reconnect_hint
        return self.reason_format.format(delay=self._rng.uniform(least, most))

"""A hashed timer wheel: one per event loop, for 100,000 deadlines at O(1) each.

Theory of operation
===================

Per-connection deadlines (the next ping, a pong timeout, an idle or age limit) are
too many for one event-loop timer each: 100,000 ``call_at`` handles are 100,000
heap entries the loop re-sorts, and each carries a callback closure.  Instead, one
periodic loop callback calls :meth:`TimerWheel.advance` with the loop's time, and
gets back the *keys* whose deadlines have passed.  The wheel never reads a clock:
time is always passed in, so tests drive it with plain numbers.

Time is cut into ticks of ``tick`` seconds.  A deadline ``d`` belongs to tick
``floor(d / tick) + 1``: the first tick boundary strictly after it.  The wheel is a
ring of ``slots`` buckets; tick ``t`` lives in bucket ``t % slots``.  A bucket is a
``dict`` whose keys are the :class:`TimerHandle` objects in it (values unused), so

* ``schedule`` is one division, one ``floor`` and one dict insertion: O(1);
* ``cancel`` is one dict deletion, found through the handle: O(1);
* ``reschedule`` is both, reusing the handle: no per-deadline allocation;
* ``advance(now)`` visits the buckets of the ticks that have passed since the last
  call and returns the keys of the handles in them whose tick has come.

**Deadlines beyond one revolution** (``tick * slots`` seconds) share a bucket with
nearer ones.  Each handle keeps its absolute tick, so a bucket visit fires only the
handles whose tick has come and keeps the others for a later revolution (a "rounds
counter" that needs no decrementing).  A far deadline therefore costs one look per
revolution; size the wheel so the common deadlines fit in one revolution (the
defaults, 0.5 s x 512 = 256 s, cover ``ping_interval + pong_timeout``).

**Guarantees.**  A handle never fires early: the tick rule above makes
``advance(now)`` fire a deadline only when ``now > deadline`` (the same monotonic
float function maps both, so rounding cannot break this).  It fires in the first
``advance`` whose ``now`` reaches its tick boundary, so at most one tick late when
``advance`` is called every tick.  Keys come out in tick order; within one tick, in
the order they were (re)scheduled.  A deadline already in the past when scheduled
fires at the next ``advance``, ahead of the rest.

**Clock jumps.**  A loop's clock is monotonic, but a suspended process (laptop lid,
SIGSTOP, VM migration) wakes up far ahead: an ``advance`` that spans more than one
revolution visits every bucket once (not once per elapsed tick), fires everything
that has come due, in tick order, and costs O(slots + handles).  A clock that goes
*backwards* is not followed: the wheel's time holds still and the step is added to
an offset applied to every later ``now`` and deadline.  So nothing fires early or
all at once, a handle scheduled before the step keeps the time it had left, and a
deadline given on the new clock is measured on the new clock.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from operator import attrgetter

__all__ = ["TimerHandle", "TimerWheel"]


class TimerHandle:
    """One scheduled deadline: the key it gives back, its tick, and the bucket holding it.

    Returned by :meth:`TimerWheel.schedule`; pass it to ``cancel`` and ``reschedule``.
    A handle that has fired or was cancelled may be rescheduled: it is reused as is.
    """

    __slots__ = ("key", "tick", "bucket")

    def __init__(self, key: Hashable):
        self.key = key
        self.tick = 0
        #: the dict holding this handle, or None when it is not scheduled
        self.bucket: dict | None = None

    @property
    def scheduled(self) -> bool:
        return self.bucket is not None

    def __repr__(self) -> str:
        state = f"tick {self.tick}" if self.bucket is not None else "idle"
        return f"<TimerHandle {self.key!r} {state}>"


_by_tick = attrgetter("tick")
_floor = math.floor


class TimerWheel:
    """Deadlines for many keys, expired in batches by :meth:`advance`.

    Args:
        now: the current time (the loop's ``time()``); ticks before it count as done.
        tick: slot granularity in seconds: deadlines fire at most this late.
        slots: buckets in the ring; ``tick * slots`` seconds is one revolution.

    Raises:
        ValueError: a tick that is not a positive finite number, or slots < 1.
    """

    def __init__(self, now: float, *, tick: float = 0.5, slots: int = 512):
        if not (tick > 0 and math.isfinite(tick)):
            raise ValueError(f"tick must be a positive number of seconds, got {tick!r}")
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots!r}")
        self.tick = tick
        self._per_second = 1.0 / tick
        self._slots: list[dict] = [{} for _ in range(slots)]
        self._nslots = slots
        #: handles whose deadline had already passed when scheduled
        self._overdue: dict = {}
        #: added to every time given: grows when the clock steps backwards
        self._offset = 0.0
        self._now = now
        #: the last tick whose bucket has been visited
        self._tick = _floor(now * self._per_second)
        self._count = 0

    def __len__(self) -> int:
        """How many handles are scheduled."""
        return self._count

    @property
    def now(self) -> float:
        """The wheel's time: the latest ``now`` given, never going backwards (offset included)."""
        return self._now

    def schedule(self, key: Hashable, deadline: float) -> TimerHandle:
        """Schedule `key` to come out of :meth:`advance` once `deadline` has passed."""
        return self.reschedule(TimerHandle(key), deadline)

    def cancel(self, handle: TimerHandle) -> bool:
        """Unschedule `handle`; returns False when it was not scheduled (fired or cancelled)."""
        bucket = handle.bucket
        if bucket is None:
            return False
        del bucket[handle]
        handle.bucket = None
        self._count -= 1
        return True

    def reschedule(self, handle: TimerHandle, deadline: float) -> TimerHandle:
        """Move `handle` to a new deadline (schedules it again if it had fired or was cancelled)."""
        bucket = handle.bucket
        if bucket is None:
            self._count += 1
        else:
            del bucket[handle]
        handle.tick = tick = _floor((deadline + self._offset) * self._per_second) + 1
        # A tick whose bucket was visited already goes out at the next advance.
        handle.bucket = bucket = self._overdue if tick <= self._tick else self._slots[tick % self._nslots]
        bucket[handle] = None
        return handle

    def arm(self, handle: TimerHandle | None, key: Hashable, deadline: float) -> TimerHandle | None:
        """Put `key` at `deadline` (0: off the wheel), reusing its `handle`; returns the handle to keep."""
        if not deadline:
            if handle is not None:
                self.cancel(handle)
            return handle
        if handle is None:
            return self.schedule(key, deadline)
        return self.reschedule(handle, deadline)

    def advance(self, now: float) -> list:
        """Move the wheel to `now`; return the keys whose deadlines have passed, in tick order.

        Each returned handle is unscheduled (``reschedule`` it to use it again).  A `now`
        earlier than the wheel's time returns only overdue keys (see "Clock jumps").
        """
        now += self._offset
        if now < self._now:  # the clock stepped back: hold still, remember the step
            self._offset += self._now - now
            now = self._now
        self._now = now
        expired: list = []
        if self._overdue:
            for handle in self._overdue:
                handle.bucket = None
                expired.append(handle.key)
            self._overdue = {}
        target = _floor(now * self._per_second)
        last = self._tick
        if target > last:
            fired: list[TimerHandle] = []
            slots = self._slots
            nslots = self._nslots
            if target - last < nslots:
                for tick in range(last + 1, target + 1):
                    if slots[tick % nslots]:
                        self._expire_bucket(tick % nslots, tick, fired)
            else:  # a revolution or more at once: visit each bucket once, then sort
                for index in range(nslots):
                    if slots[index]:
                        self._expire_bucket(index, target, fired)
                fired.sort(key=_by_tick)  # stable: a tick's handles keep their bucket order
            expired += [handle.key for handle in fired]
            self._tick = target
        self._count -= len(expired)
        return expired

    def _expire_bucket(self, index: int, tick: int, fired: list) -> None:
        """Move the handles of bucket `index` due by `tick` to `fired`; keep the later rounds."""
        bucket = self._slots[index]
        # Swap in a fresh dict rather than delete while iterating.
        kept: dict = {}
        self._slots[index] = kept
        for handle in bucket:
            if handle.tick <= tick:
                handle.bucket = None
                fired.append(handle)
            else:
                handle.bucket = kept
                kept[handle] = None

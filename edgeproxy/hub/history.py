"""Per-channel streams: the seq counter, the epoch and the history ring.

Theory of operation
===================

A :class:`Stream` is one channel's ordered log as a backplane keeps it.  Each
publication gets the next ``seq`` (1, 2, 3, ... within an epoch) and goes into a
:class:`HistoryRing` that keeps at most ``size`` publications, none older than ``ttl``
seconds.  The ``epoch`` is chosen when the stream is created; a stream that is
forgotten (see ``MemoryBackplane``) and created again gets a new epoch, so a client's
old position can never be mistaken for a position in the new run.

:meth:`Stream.read_since` answers a resume: given the client's last position it
returns every publication after it, in order, and ``recovered=True``; or, when the
epoch differs or the ring no longer holds the whole gap, nothing and
``recovered=False``.  A position ahead of the stream is not recovered either.

Time is passed in (``now``); nothing here reads a clock.
"""

from __future__ import annotations

from collections import deque

from edgeproxy.hub.protocol import Position

__all__ = ["HistoryRing", "Stream"]


class HistoryRing:
    """The last ``size`` publications ``(seq, stamp, data)``, each kept at most ``ttl`` seconds (0: no TTL)."""

    __slots__ = ("size", "ttl", "_items")

    def __init__(self, size: int, ttl: float):
        if size < 0 or ttl < 0:
            raise ValueError("size and ttl must be >= 0")
        self.size = size
        self.ttl = ttl
        self._items: deque[tuple[int, float, bytes]] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._items)

    def append(self, seq: int, data: bytes, now: float) -> None:
        if self.size:
            self._items.append((seq, now, data))

    def expire(self, now: float) -> None:
        """Drop what is older than ``ttl``."""
        if self.ttl:
            items = self._items
            horizon = now - self.ttl
            while items and items[0][1] <= horizon:
                items.popleft()

    def after(self, seq: int, top: int, now: float) -> list[tuple[int, bytes]] | None:
        """Every ``(seq, data)`` after ``seq`` up to ``top``, or None when the ring lacks some."""
        if seq == top:
            return []
        if seq > top:
            return None
        self.expire(now)
        items = self._items
        if not items or items[0][0] > seq + 1:
            return None
        start = seq + 1 - items[0][0]  # seqs in the ring are consecutive
        return [(s, data) for s, _, data in (items[i] for i in range(start, len(items)))]


class Stream:
    """One channel's log: ``seq`` (the last assigned), ``epoch`` and the history ring."""

    __slots__ = ("epoch", "seq", "ring", "touched")

    def __init__(self, epoch: str, size: int, ttl: float, now: float):
        self.epoch = epoch
        self.seq = 0
        self.ring = HistoryRing(size, ttl)
        #: when it was last published to (or created): for forgetting idle streams
        self.touched = now

    @property
    def position(self) -> Position:
        return Position(self.seq, self.epoch)

    def append(self, data: bytes, now: float) -> int:
        """Record a publication; return its seq."""
        self.seq += 1
        self.ring.append(self.seq, data, now)
        self.touched = now
        return self.seq

    def read_since(self, since: Position | None, now: float) -> tuple[list[tuple[int, bytes]], bool]:
        """What a subscriber at ``since`` missed, and whether that is all of it.

        Returns ``(publications, recovered)``: ``([], False)`` when ``since`` is None
        (a plain subscribe), when the epoch differs, or when history does not cover
        the gap; otherwise every ``(seq, data)`` after ``since.seq`` and True.
        """
        if since is None or since.epoch != self.epoch:
            return [], False
        missed = self.ring.after(since.seq, self.seq, now)
        if missed is None:
            return [], False
        return missed, True

    def idle(self, now: float, ttl: float) -> bool:
        """True when nothing is left worth keeping: the history expired (or there is none)."""
        self.ring.expire(now)
        return not self.ring and now - self.touched >= ttl

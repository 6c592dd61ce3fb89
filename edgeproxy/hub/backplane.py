"""The backplane: where publications are ordered, stored for resume and spread to nodes.

Theory of operation
===================

A hub node never numbers publications itself.  It asks the backplane to
:meth:`~Backplane.publish`, which assigns the channel's next ``seq`` (within its
``epoch``), appends the publication to the channel's history and then delivers it to
every node that :meth:`~Backplane.subscribe`\\ d to the channel, by calling the
``deliver`` callback given to :meth:`~Backplane.start` with a
:class:`~edgeproxy.hub.protocol.Publication`.

The contract the hub relies on (an adapter for Redis or NATS must keep it):

1. **Per channel, one order.**  ``deliver`` is called for a channel's publications in
   seq order, each once, on the event loop thread.
2. **Stored before delivered.**  A publication is in history before any node receives
   it, so a history read started after a node subscribed misses nothing that the
   node did not receive (see ``edgeproxy.hub.channels``).
3. **Interest is active when subscribe returns.**  After ``await subscribe(channel)``
   every later publication of the channel is delivered to this node.  Calls to
   ``subscribe``/``unsubscribe`` for a channel are applied in call order.
4. **Epochs.**  ``epoch`` changes whenever a channel's history restarts (its state
   was lost or expired); seqs then start again at 1.  ``history`` answers
   ``recovered=False`` when the epoch differs or the gap is not fully stored.

Data is opaque bytes (the JSON text of the published value).  Redis fits with one
Lua script (``INCR`` + ``XADD``/``LPUSH`` trimmed to the size + ``PUBLISH``) and a
SUBSCRIBE per interesting channel; NATS with a JetStream stream per hub (stream
sequence per subject, ``max_msgs_per_subject``/``max_age``) and a core
subscription per channel.

:class:`MemoryBackplane` is the default: one process, no network, every operation
completes without waiting.  It forgets a channel's stream once its history has
expired and nobody here is interested, so a later publication starts a new epoch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple, Protocol

from edgeproxy.hub.history import Stream
from edgeproxy.hub.protocol import Position, Publication

__all__ = ["Backplane", "HistoryResult", "MemoryBackplane", "random_epoch"]


class HistoryResult(NamedTuple):
    """A history read: the channel's ``position`` now, what was ``missed`` after ``since``,
    and whether that is all of it (``recovered``)."""

    position: Position
    missed: list[tuple[int, bytes]]
    recovered: bool


class Backplane(Protocol):
    """What a hub needs from a backplane; every method is a coroutine so that network
    adapters fit."""

    async def start(self, deliver: Callable[[Publication], None]) -> None:
        """Connect; from now on ``deliver`` gets the publications of subscribed channels."""

    async def close(self) -> None:
        """Disconnect; ``deliver`` is not called any more."""

    async def publish(self, channel: str, data: bytes) -> Position:
        """Order, store and spread one publication; return its (seq, epoch)."""

    async def subscribe(self, channel: str) -> None:
        """Receive the channel's publications on this node (the node's interest)."""

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving them."""

    async def history(self, channel: str, since: Position | None) -> HistoryResult:
        """The channel's position and, with ``since``, what came after it."""


def random_epoch() -> str:
    """A fresh epoch: 8 random bytes as hex."""
    return os.urandom(8).hex()


class MemoryBackplane:
    """The in-process backplane (one node).

    Args:
        history_size: publications kept per channel.
        history_ttl: seconds each is kept (0: until pushed out by the size).
        clock: seconds, monotonic (the event loop's ``time``).
        new_epoch: source of epochs (random by default; tests pass their own).
    """

    def __init__(self, history_size: int, history_ttl: float, clock: Callable[[], float],
                 new_epoch: Callable[[], str] = random_epoch):
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.clock = clock
        self.new_epoch = new_epoch
        self.streams: dict[str, Stream] = {}
        self.interest: set[str] = set()
        self._deliver: Callable[[Publication], None] | None = None
        self._next_sweep = 0.0

    async def start(self, deliver: Callable[[Publication], None]) -> None:
        self._deliver = deliver

    async def close(self) -> None:
        self._deliver = None

    def _stream(self, channel: str, now: float) -> Stream:
        stream = self.streams.get(channel)
        if stream is None:
            stream = self.streams[channel] = Stream(self.new_epoch(), self.history_size, self.history_ttl, now)
        return stream

    def _sweep(self, now: float) -> None:
        """Forget streams with nothing left to resume from, at most once per TTL."""
        keep_for = self.history_ttl or 3600.0
        if now < self._next_sweep:
            return
        self._next_sweep = now + keep_for
        for name in [n for n, s in self.streams.items() if n not in self.interest and s.idle(now, keep_for)]:
            del self.streams[name]

    async def publish(self, channel: str, data: bytes) -> Position:
        now = self.clock()
        self._sweep(now)
        stream = self._stream(channel, now)
        seq = stream.append(data, now)
        if channel in self.interest and self._deliver is not None:
            self._deliver(Publication(channel, seq, stream.epoch, data))
        return Position(seq, stream.epoch)

    async def subscribe(self, channel: str) -> None:
        self.interest.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self.interest.discard(channel)

    async def history(self, channel: str, since: Position | None) -> HistoryResult:
        now = self.clock()
        stream = self._stream(channel, now)
        missed, recovered = stream.read_since(since, now)
        return HistoryResult(stream.position, missed, recovered)

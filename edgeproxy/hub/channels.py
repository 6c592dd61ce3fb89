"""The node's channel registry: who is subscribed where, and resume without gap or duplicate.

Theory of operation
===================

The registry is the sans-IO heart of fan-out on one node.  For each channel it keeps
the **members** (subscribers that get publications live) and the **pending**
subscribers (a subscribe whose history read is under way), and it queues each
publication's frame until the transport writes it.

*Encode once.*  :meth:`ChannelRegistry.publication` builds the ``pub`` message and its
WebSocket frame once (server frames are unmasked, RFC 6455 section 5.1, so the bytes
are the same for everyone) and queues ``(snapshot, frame)``.  The transport takes
:meth:`Channel.next_batch` and writes the very same bytes to every transport of the
snapshot with ``_accel.write_many``.

*Snapshots.*  A snapshot is the pair of tuples ``(subscribers, transports)`` of the
members at the moment the publication ARRIVED.  It is rebuilt only after the
membership changed, so a steady channel reuses one snapshot for every publication.
Consecutive queued publications with the same snapshot are joined into one blob, so a
burst costs one ``write`` per subscriber (write coalescing).  Because each publication
carries its own snapshot, a fan-out that is written in slices across several loop
iterations stays exact while subscribers come and go in between.

*Resume without gap or duplicate.*  A subscribe goes in three steps:

1. :meth:`begin`: the subscriber becomes pending.  From now on every publication that
   arrives is also appended to its buffer.  (The caller then makes sure the backplane
   sends this node the channel's publications, and reads history.)
2. The transport reads the channel's history from the backplane (asynchronously).
   That read sees every publication that reached the node before step 1 (a backplane
   stores a publication before it delivers it), and maybe some after.
3. :meth:`complete`: returns the frames for this subscriber - ``subscribed``, then
   the history's publications, then the buffered ones whose seq is above the last
   one sent (the overlap of 2 and the buffer is dropped by seq) - and makes the
   subscriber a member.  Later publications get a snapshot with it.

So every publication after the subscriber's position reaches it exactly once: before
step 1 through history, between 1 and 3 through the buffer (or history, deduplicated),
after 3 live.  Steps 1 and 3 run on the event loop without yielding, so nothing slips
between "buffered" and "member".

Nothing here reads a clock or touches a socket.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from edgeproxy.hub.protocol import Position, Publication, encode_pub, encode_subscribed, text_frame

__all__ = ["Channel", "ChannelRegistry", "Snapshot"]

Snapshot = tuple[tuple[Hashable, ...], tuple[Any, ...]]
_EMPTY: Snapshot = ((), ())


class Channel:
    """One channel on this node.  ``members`` maps subscriber to its transport."""

    __slots__ = ("name", "members", "pending", "queue", "busy", "interest", "_snapshot")

    def __init__(self, name: str):
        self.name = name
        self.members: dict[Hashable, Any] = {}
        self.pending: dict[Hashable, list[tuple[Publication, bytes]]] = {}
        #: ``(snapshot, frame)`` per publication not yet taken by the transport
        self.queue: list[tuple[Snapshot, bytes]] = []
        #: set by the transport while it writes a batch in slices
        self.busy = False
        #: the transport's handle on the backplane subscription (it awaits it before reading history)
        self.interest: Any = None
        self._snapshot: Snapshot | None = _EMPTY

    def snapshot(self) -> Snapshot:
        """The members now, as two parallel tuples (rebuilt only after a change)."""
        snap = self._snapshot
        if snap is None:
            members = self.members
            snap = self._snapshot = (tuple(members), tuple(members.values()))
        return snap

    def next_batch(self) -> tuple[Snapshot, bytes, int] | None:
        """The oldest queued publications that share a snapshot, as one blob.

        Returns ``(snapshot, blob, publications)`` or None when the queue is empty.
        """
        queue = self.queue
        if not queue:
            return None
        snap = queue[0][0]
        n = 1
        while n < len(queue) and queue[n][0] is snap:
            n += 1
        frames = [frame for _, frame in queue[:n]]
        del queue[:n]
        return snap, frames[0] if n == 1 else b"".join(frames), n

    @property
    def empty(self) -> bool:
        return not self.members and not self.pending


class ChannelRegistry:
    """Every channel this node has subscribers for."""

    def __init__(self) -> None:
        self.channels: dict[str, Channel] = {}

    def get(self, name: str) -> Channel | None:
        return self.channels.get(name)

    def begin(self, name: str, subscriber: Hashable) -> bool:
        """Step 1 of a subscribe: ``subscriber`` is pending.  True when the channel is new here.

        A new channel means this node was not interested in it yet: the caller
        subscribes to it on the backplane before reading history.
        """
        channel = self.channels.get(name)
        created = channel is None
        if created:
            channel = self.channels[name] = Channel(name)
        channel.pending[subscriber] = []
        return created

    def complete(
        self, name: str, subscriber: Hashable, transport: Any, position: Position,
        missed: list[tuple[int, bytes]], recovered: bool,
    ) -> list[bytes]:
        """Step 3 of a subscribe: the frames to write to ``subscriber``, in order; it is a member after.

        Args:
            position: the channel's position when history was read.
            missed: ``(seq, data)`` read from history after the subscriber's ``since``.
            recovered: whether ``missed`` is complete (see ``Stream.read_since``).

        Returns an empty list if the subscriber is no longer pending (it left meanwhile).
        """
        channel = self.channels.get(name)
        buffered = channel.pending.pop(subscriber, None) if channel is not None else None
        if buffered is None:
            return []
        frames = [text_frame(encode_subscribed(name, position, recovered))]
        last = position.seq
        for seq, data in missed:
            frames.append(text_frame(encode_pub(Publication(name, seq, position.epoch, data))))
        for pub, frame in buffered:
            if pub.epoch != position.epoch or pub.seq > last:
                frames.append(frame)
        channel.members[subscriber] = transport
        channel._snapshot = None
        return frames

    def remove(self, name: str, subscriber: Hashable) -> bool:
        """Forget ``subscriber`` in channel ``name``; True when the channel has nobody left here.

        The caller then drops the node's interest in it on the backplane.
        """
        channel = self.channels.get(name)
        if channel is None:
            return False
        if channel.members.pop(subscriber, None) is not None:
            channel._snapshot = None
        channel.pending.pop(subscriber, None)
        if channel.empty and not channel.queue and not channel.busy:
            del self.channels[name]
            return True
        return False

    def publication(self, pub: Publication) -> Channel | None:
        """A publication reached this node: frame it once and queue it.

        Returns the channel (for the transport to write its queue), or None when nobody
        here listens to it.
        """
        channel = self.channels.get(pub.channel)
        if channel is None:
            return None
        frame = text_frame(encode_pub(pub))
        for buffered in channel.pending.values():
            buffered.append((pub, frame))
        if channel.members:
            channel.queue.append((channel.snapshot(), frame))
            return channel
        return None

    def prune(self, channel: Channel) -> bool:
        """Drop a channel left empty once its last batch is written; True when dropped."""
        if channel.empty and not channel.queue and not channel.busy and self.channels.get(channel.name) is channel:
            del self.channels[channel.name]
            return True
        return False

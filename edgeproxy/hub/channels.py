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

*Server-Sent Events.*  An SSE stream subscribes to its channels the same three
steps (:meth:`complete_sse` instead of :meth:`complete`), and is kept apart from the
WebSocket members because its bytes differ: a publication is encoded once more, as
an SSE ``pub`` event (:func:`sse_pub_body`), and queued with its own snapshot in
``sse_queue``.  A stream of one channel gets the very same bytes as every other
(the event id is the publication's position); a stream of several gets the shared
event behind an id of its own (its position in each of its channels), which the
transport writes per stream.

Nothing here reads a clock or touches a socket.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from edgeproxy.hub.protocol import Position, Publication, encode_pub, encode_subscribed, sse_pub_body, text_frame

__all__ = ["Channel", "ChannelRegistry", "SseSnapshot", "Snapshot"]

Snapshot = tuple[tuple[Hashable, ...], tuple[Any, ...]]
_EMPTY: Snapshot = ((), ())
#: SSE members: (one-channel subscribers, their transports, several-channel subscribers, their transports)
SseSnapshot = tuple[tuple[Hashable, ...], tuple[Any, ...], tuple[Hashable, ...], tuple[Any, ...]]
_SSE_EMPTY: SseSnapshot = ((), (), (), ())


class Channel:
    """One channel on this node.  ``members`` maps subscriber to its transport."""

    __slots__ = ("name", "members", "pending", "queue", "busy", "interest", "_snapshot",
                 "sse_single", "sse_multi", "sse_queue", "_sse_snapshot")

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
        #: SSE streams of this one channel, and of several: subscriber -> transport
        self.sse_single: dict[Hashable, Any] = {}
        self.sse_multi: dict[Hashable, Any] = {}
        #: ``(snapshot, publication, event, also_websocket)`` per publication not yet written to
        #: the SSE streams (``also_websocket``: it was queued for WebSocket members too)
        self.sse_queue: list[tuple[SseSnapshot, Publication, bytes, bool]] = []
        self._sse_snapshot: SseSnapshot | None = _SSE_EMPTY

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
        snap, n = _same_snapshot_run(queue)
        frames = [frame for _, frame in queue[:n]]
        del queue[:n]
        return snap, frames[0] if n == 1 else b"".join(frames), n

    def sse_snapshot(self) -> SseSnapshot:
        """The SSE members now (rebuilt only after a change)."""
        snap = self._sse_snapshot
        if snap is None:
            single, multi = self.sse_single, self.sse_multi
            snap = self._sse_snapshot = (tuple(single), tuple(single.values()), tuple(multi), tuple(multi.values()))
        return snap

    def next_sse_batch(self) -> tuple[SseSnapshot, bytes, list[tuple[Publication, bytes]], int] | None:
        """The oldest queued SSE publications that share a snapshot.

        Returns ``(snapshot, blob, events, sse_only)``: ``blob`` is what every
        one-channel stream gets (each event behind its ``id``: the publication's
        position), ``events`` the ``(publication, event)`` pairs the
        several-channel streams get behind ids of their own, ``sse_only`` how many
        of them had no WebSocket member (for counting publications once).  None
        when the queue is empty.
        """
        queue = self.sse_queue
        if not queue:
            return None
        snap, n = _same_snapshot_run(queue)
        events = [(pub, body) for _, pub, body, _ in queue[:n]]
        sse_only = sum(1 for *_, also_websocket in queue[:n] if not also_websocket)
        del queue[:n]
        blob = b"".join(b"id: %s:%d\n%s" % (pub.epoch.encode(), pub.seq, body) for pub, body in events) if snap[0] else b""
        return snap, blob, events, sse_only

    @property
    def empty(self) -> bool:
        return not self.members and not self.pending and not self.sse_single and not self.sse_multi

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being written: the channel may be dropped once empty."""
        return not self.queue and not self.sse_queue and not self.busy


def _same_snapshot_run(queue: list) -> tuple[Any, int]:
    """The snapshot of the oldest queued entry, and how many entries in a row share it."""
    snap = queue[0][0]
    n = 1
    while n < len(queue) and queue[n][0] is snap:
        n += 1
    return snap, n


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

    def complete_sse(
        self, name: str, subscriber: Hashable, transport: Any, position: Position,
        missed: list[tuple[int, bytes]], single: bool,
    ) -> list[Publication] | None:
        """Step 3 for an SSE stream: the publications it missed, in order; it is a member after.

        ``single`` says whether the stream has this one channel (it then shares the
        one-channel bytes).  None if the subscriber is no longer pending.
        """
        channel = self.channels.get(name)
        buffered = channel.pending.pop(subscriber, None) if channel is not None else None
        if buffered is None:
            return None
        pubs = [Publication(name, seq, position.epoch, data) for seq, data in missed]
        pubs += [pub for pub, _ in buffered if pub.epoch != position.epoch or pub.seq > position.seq]
        (channel.sse_single if single else channel.sse_multi)[subscriber] = transport
        channel._sse_snapshot = None
        return pubs

    def remove(self, name: str, subscriber: Hashable) -> bool:
        """Forget ``subscriber`` in channel ``name``; True when the channel has nobody left here.

        The caller then drops the node's interest in it on the backplane.
        """
        channel = self.channels.get(name)
        if channel is None:
            return False
        if channel.members.pop(subscriber, None) is not None:
            channel._snapshot = None
        if channel.sse_single.pop(subscriber, None) is not None or channel.sse_multi.pop(subscriber, None) is not None:
            channel._sse_snapshot = None
        channel.pending.pop(subscriber, None)
        if channel.empty and channel.idle:
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
        queued = False
        if channel.members:
            channel.queue.append((channel.snapshot(), frame))
            queued = True
        if channel.sse_single or channel.sse_multi:
            channel.sse_queue.append((channel.sse_snapshot(), pub, sse_pub_body(pub), queued))
            queued = True
        return channel if queued else None

    def prune(self, channel: Channel) -> bool:
        """Drop a channel left empty once its last batch is written; True when dropped."""
        if channel.empty and channel.idle and self.channels.get(channel.name) is channel:
            del self.channels[channel.name]
            return True
        return False

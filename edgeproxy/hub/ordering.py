"""Per-channel delivery order for network backplanes: each publication once, in seq order.

Theory of operation
===================

A network backplane (Redis, NATS) hears a channel's publications on a live feed
(pub/sub, core NATS).  The feed may lose some (the connection dropped and came
back) or, with NATS, bring them out of order (two instances published; each sends
its live copy after its store was acknowledged).  The hub needs contract point 1 of
``edgeproxy.hub.backplane``: per channel one order, each publication once.

:class:`Orderer` keeps, per channel this node is interested in, the position of the
last publication it delivered (``seq`` in ``epoch``).  :meth:`Orderer.offer` takes a
publication from the feed and answers what to deliver now, in order:

* the next seq (``last + 1``): delivered, then any held ones that follow;
* an old seq (``<= last``): dropped (a duplicate: the feed and a history fill
  both brought it);
* a later seq: held, and the channel **needs a fill**: the caller reads history
  after ``last`` (every publication is stored before it is sent on the feed, so
  history has the missing ones) and hands the result to :meth:`Orderer.filled`,
  which may ask for another fill when more publications arrived past a new gap
  meanwhile;
* another epoch: the channel's history restarted: the position becomes
  ``(0, new epoch)`` and the rules above apply (seq 1 is delivered at once).

A channel whose fill is under way is not asked to fill again until it ends.  When
history no longer holds the gap (``recovered`` false), the held publications are
delivered anyway and the loss is counted in ``lost``: the hub's subscribers then see
a jump in seq, which is what a client checks for.

Nothing here reads a clock or touches a socket.
"""

from __future__ import annotations

from edgeproxy.hub.protocol import Position, Publication

__all__ = ["Orderer"]


class _Channel:
    __slots__ = ("epoch", "last", "held", "filling")

    def __init__(self, position: Position | None):
        #: None until `Orderer.place`: everything is held meanwhile
        self.epoch = position.epoch if position is not None else None
        self.last: int | None = position.seq if position is not None else None
        #: seq -> publication, received ahead of a gap
        self.held: dict[int, Publication] = {}
        self.filling = False


class Orderer:
    """Delivery positions of the channels this node listens to."""

    def __init__(self) -> None:
        self.channels: dict[str, _Channel] = {}
        #: publications skipped because history no longer held them
        self.lost = 0

    def start(self, channel: str, position: Position | None = None) -> None:
        """Interest begins: everything after ``position`` is to be delivered.

        Without a position, publications are held until `place` gives it: a
        backplane subscribes to the feed first and reads the channel's position
        after, so that nothing published in between slips through.
        """
        self.channels[channel] = _Channel(position)

    def place(self, channel: str, position: Position) -> tuple[list[Publication], Position | None]:
        """The position of a channel started without one; answers like `offer`."""
        state = self.channels.get(channel)
        if state is None:
            return [], None
        held = state.held
        state.epoch, state.last = position.epoch, position.seq
        if any(pub.epoch != position.epoch for pub in held.values()):
            # history restarted right after the read: follow the newest epoch from its start
            newest = held[max(held)]
            state.epoch, state.last = newest.epoch, 0
            state.held = {s: p for s, p in held.items() if p.epoch == newest.epoch}
        out = self._release(state)
        if state.held and not state.filling:
            state.filling = True
            return out, Position(state.last, state.epoch)
        return out, None

    def stop(self, channel: str) -> None:
        self.channels.pop(channel, None)

    def position(self, channel: str) -> Position | None:
        """Where delivery stands (None: not interested, or not placed yet)."""
        state = self.channels.get(channel)
        return None if state is None or state.last is None else Position(state.last, state.epoch)

    def offer(self, pub: Publication) -> tuple[list[Publication], Position | None]:
        """A publication from the live feed.

        Returns ``(deliver, fill)``: the publications to deliver now, in order, and
        the position to read history after (None: no fill needed, or one is under way).
        """
        state = self.channels.get(pub.channel)
        if state is None:
            return [], None  # not interested (any more)
        if state.last is None:
            state.held[pub.seq] = pub  # not placed yet
            return [], None
        if pub.epoch != state.epoch:
            state.epoch, state.last = pub.epoch, 0
            state.held.clear()
        if pub.seq <= state.last:
            return [], None
        if pub.seq > state.last + 1:
            state.held[pub.seq] = pub
            if state.filling:
                return [], None
            state.filling = True
            return [], Position(state.last, state.epoch)
        state.last = pub.seq
        return [pub, *self._release(state)], None

    def filled(self, channel: str, since: Position, missed: list[tuple[int, bytes]],
               recovered: bool) -> tuple[list[Publication], Position | None]:
        """A fill's history read ended.

        Args:
            since: the position the fill read after (what `offer` returned).
            missed: ``(seq, data)`` after ``since`` (from ``Backplane.history``).
            recovered: whether ``missed`` is complete.

        Returns ``(deliver, fill)`` like `offer`: a recovered fill may still leave a
        gap before publications that arrived after its read, which needs another.
        """
        state = self.channels.get(channel)
        if state is None:
            return [], None
        state.filling = False
        out = []
        if state.epoch == since.epoch:
            if recovered:
                for seq, data in missed:
                    if seq == state.last + 1:
                        state.last = seq
                        state.held.pop(seq, None)
                        out.append(Publication(channel, seq, state.epoch, data))
            elif state.held:
                # History does not hold the gap any more: deliver what we have, count the loss.
                first = min(state.held)
                self.lost += first - state.last - 1
                state.last = first - 1
        out += self._release(state)
        if state.held:
            state.filling = True
            return out, Position(state.last, state.epoch)
        return out, None

    @staticmethod
    def _release(state: _Channel) -> list[Publication]:
        out = []
        held = state.held
        while held and state.last + 1 in held:
            state.last += 1
            out.append(held.pop(state.last))
        # anything at or below last is a duplicate now
        for seq in [s for s in held if s <= state.last]:
            del held[seq]
        return out

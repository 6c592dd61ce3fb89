"""Heartbeats, dead-peer detection, idle and age limits for many connections at once.

Theory of operation
===================

TCP does not say when a path dies, and NATs drop idle flows after minutes, so the
proxy pings every WebSocket peer (clients and upstreams alike) every
``ping_interval`` seconds and declares a peer dead when no pong has come back
``pong_timeout`` seconds after a ping.  It also closes connections that carried no
traffic for ``idle_timeout`` seconds, and connections older than
``max_connection_age`` (so clients reconnect and the balancer can spread them).

:class:`Heartbeat` is the whole policy, sans-IO: it never sends a frame, never reads
a clock and never draws its own randomness.  The transport

* calls ``register(key, now)`` when a WebSocket opens and ``unregister(key)`` when
  it goes away (keys are any hashable: a connection object, ``(conn, "upstream")``);
* calls ``due(now)`` once per loop tick and carries out what it returns, a list of
  ``(action, key, payload)``:

  ===============  ==================================================================
  ``PING``         send a PING frame with ``payload`` (8 bytes) to ``key``
  ``DEAD``         no pong in time: abort ``key``'s transport (count and log it)
  ``IDLE``         no traffic for the idle timeout: close gracefully (1001)
  ``AGE_EXPIRED``  past its maximum age: close gracefully (1001)
  ===============  ==================================================================

  After DEAD, IDLE and AGE_EXPIRED the key is already forgotten: ``unregister`` is
  then a harmless no-op;
* calls ``pong_received(key, payload, now)`` for each PONG frame the peer sends: it
  returns the round-trip time when the pong answers the outstanding ping (to feed a
  histogram), else None - a pong that is not ours (an unsolicited one, a duplicate,
  or the answer to a ping the upstream sent through the proxy) changes nothing;
* calls ``saw_traffic(key, now)`` when data frames arrive (reads that are only
  pongs should not count, or heartbeats would keep idle connections open forever).
  It always postpones the idle limit; with ``traffic_is_liveness=True`` it also
  answers the outstanding ping.  That flag is off by default: a peer whose process
  hangs can keep a half-written stream trickling, while a pong proves it reads.

One ping is outstanding per peer at a time: RFC 6455 section 5.5.3 lets a peer
answer only the latest of several pings, so matching several would be unreliable.
The payload is a 64-bit counter (one per tracker, started at a random value), so a
pong can be matched exactly, and a stale or forged one ignored.

**Timers.**  Each peer has one handle on a :class:`~edgeproxy.core.timerwheel.TimerWheel`,
set to its nearest deadline (next ping, pong deadline, idle limit, age limit).  When
it fires, ``due`` checks the peer's deadlines against ``now`` (the wheel only says
"look at this peer"), emits what is due and re-arms the handle.  Like the wheel's, a
limit counts as passed only once ``now`` is strictly after it, and is acted on at
most one tick late.  The hot calls rarely touch the wheel: ``saw_traffic`` stores a
time (the idle limit is checked lazily when the handle fires), and ``pong_received``
clears a field (the handle already waits for the next ping, unless that is overdue).
Per peer that is two small ``__slots__`` objects.

**Jitter** (``jitter``, 0.1 = 10 %) keeps a crowd of connections from acting in the
same tick.  The first ping of a peer comes at a uniform random point within its first
interval, so 100,000 connections registered at once (a restart's reconnect wave)
ping evenly over a whole interval; each later interval is ``ping_interval`` +/-
jitter, so they stay spread.  Each peer's idle and age limits are drawn once, from
``limit * (1 - jitter)`` to ``limit``: a configured limit is never exceeded (but for
the tick).

**Stalls.**  When the loop was blocked or the process suspended, ``due`` may run
before the transport has read the pongs and data waiting in the socket buffers (uvloop
runs timers before polling I/O).  So when more than ``stall_grace`` seconds passed
since the previous ``due``, DEAD and IDLE verdicts are put off by ``stall_grace``
seconds, once, giving the transport time to read what arrived.  A clock that goes
backwards delays deadlines by the step (the wheel holds still), never hastens them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable
from struct import Struct

from edgeproxy.core.timerwheel import TimerHandle, TimerWheel

__all__ = ["AGE_EXPIRED", "DEAD", "IDLE", "PING", "Heartbeat"]

PING = "ping"  #: send a PING frame with the payload
DEAD = "dead"  #: no pong within pong_timeout: abort the transport
IDLE = "idle"  #: no traffic within the idle limit: close with 1001
AGE_EXPIRED = "age-expired"  #: past max_connection_age: close with 1001

_NEVER = math.inf
_COUNTER = Struct(">Q")
_COUNTER_MASK = 0xFFFF_FFFF_FFFF_FFFF


class _Peer:
    """Heartbeat state of one connection; times are the caller's clock, inf = never."""

    __slots__ = ("handle", "next_ping", "ping_payload", "ping_sent", "pong_deadline",
                 "last_traffic", "idle_limit", "age_deadline")

    def __init__(self, handle: TimerHandle, now: float, next_ping: float, idle_limit: float,
                 age_deadline: float):
        self.handle = handle
        self.next_ping = next_ping
        #: payload of the latest ping until its pong arrives, else None
        self.ping_payload: bytes | None = None
        self.ping_sent = now
        #: when the outstanding ping times out; inf when no ping awaits an answer
        self.pong_deadline = _NEVER
        self.last_traffic = now
        self.idle_limit = idle_limit
        self.age_deadline = age_deadline


class Heartbeat:
    """Pings, pong timeouts, idle and age limits of many connections, on one timer wheel.

    Args:
        now: the current time (the loop's ``time()``).
        rng: the source of jitter and of the first ping payload.
        ping_interval: seconds between pings; 0 disables pings (and dead-peer detection).
        pong_timeout: seconds a ping may wait for its pong.
        idle_timeout: seconds without traffic before IDLE; 0 disables it.
        max_connection_age: seconds a connection may live before AGE_EXPIRED; 0 disables it.
        jitter: relative spread of ping intervals and of the idle and age limits, in [0, 1).
        traffic_is_liveness: count ``saw_traffic`` as an answer to the outstanding ping.
        stall_grace: a gap between two ``due`` calls longer than this is a stall (see
            "Stalls"); call ``due`` more often than that.
        tick, slots: the timer wheel's granularity and size.

    Raises:
        ValueError: a negative duration, a jitter outside [0, 1), a pong_timeout or
            stall_grace that is not positive, or a stall_grace not longer than a tick.
    """

    def __init__(
        self,
        now: float,
        *,
        rng: random.Random,
        ping_interval: float = 30.0,
        pong_timeout: float = 60.0,
        idle_timeout: float = 0.0,
        max_connection_age: float = 0.0,
        jitter: float = 0.1,
        traffic_is_liveness: bool = False,
        stall_grace: float = 2.0,
        tick: float = 0.5,
        slots: int = 512,
    ):
        for name, value in (("ping_interval", ping_interval), ("idle_timeout", idle_timeout),
                            ("max_connection_age", max_connection_age)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0 seconds (0 disables it), got {value!r}")
        for name, value in (("pong_timeout", pong_timeout), ("stall_grace", stall_grace)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
        if not stall_grace > tick:  # due() runs every tick: a tick is not a stall
            raise ValueError(f"stall_grace ({stall_grace!r}) must be longer than a tick ({tick!r})")
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.idle_timeout = idle_timeout
        self.max_connection_age = max_connection_age
        self.jitter = jitter
        self.traffic_is_liveness = traffic_is_liveness
        self.stall_grace = stall_grace
        self._rng = rng
        self._wheel = TimerWheel(now, tick=tick, slots=slots)
        self._peers: dict[Hashable, _Peer] = {}
        self._counter = rng.getrandbits(64)
        self._last_due = now

    def __len__(self) -> int:
        """How many connections are tracked."""
        return len(self._peers)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._peers

    def register(self, key: Hashable, now: float) -> None:
        """Start tracking `key`, a connection that just opened.

        Raises:
            ValueError: `key` is already tracked.
        """
        if key in self._peers:
            raise ValueError(f"{key!r} is already registered")
        random_unit = self._rng.random
        next_ping = now + random_unit() * self.ping_interval if self.ping_interval else _NEVER
        idle_limit = self.idle_timeout * (1 - self.jitter * random_unit()) if self.idle_timeout else _NEVER
        age_deadline = (now + self.max_connection_age * (1 - self.jitter * random_unit())
                        if self.max_connection_age else _NEVER)
        handle = TimerHandle(key)
        peer = _Peer(handle, now, next_ping, idle_limit, age_deadline)
        self._peers[key] = peer
        self._arm(peer, now)

    def unregister(self, key: Hashable) -> bool:
        """Forget `key` and free its state; False when it was not tracked (already expired)."""
        peer = self._peers.pop(key, None)
        if peer is None:
            return False
        self._wheel.cancel(peer.handle)
        return True

    def saw_traffic(self, key: Hashable, now: float) -> None:
        """`key`'s peer sent data: postpone its idle limit (and answer the ping if so configured)."""
        peer = self._peers.get(key)
        if peer is None:
            return
        peer.last_traffic = now
        if self.traffic_is_liveness and peer.pong_deadline != _NEVER and now >= peer.ping_sent:
            self._answered(peer, now)  # the payload stays, so the real pong still matches

    def pong_received(self, key: Hashable, payload: bytes, now: float) -> float | None:
        """A PONG from `key`'s peer: its round-trip time in seconds if it answers our ping, else None."""
        peer = self._peers.get(key)
        if peer is None or payload != peer.ping_payload:
            return None
        peer.ping_payload = None
        peer.pong_deadline = _NEVER  # what _answered does, inlined: one call per pong
        if peer.next_ping <= now:
            self._wheel.reschedule(peer.handle, now)
        rtt = now - peer.ping_sent
        return rtt if rtt > 0.0 else 0.0

    def due(self, now: float) -> list[tuple[str, Hashable, bytes | None]]:
        """Everything due by `now`, as ``(action, key, payload)``; call once per loop tick.

        The payload is the ping's bytes for PING and None otherwise.  Keys reported DEAD,
        IDLE or AGE_EXPIRED are no longer tracked.
        """
        stalled = now - self._last_due > self.stall_grace
        self._last_due = now
        actions: list[tuple[str, Hashable, bytes | None]] = []
        peers = self._peers
        # This loop runs for every ping of every connection: the common case (send a
        # ping, re-arm) is written out here, with its lookups hoisted.
        reschedule = self._wheel.reschedule
        random_unit = self._rng.random
        pack = _COUNTER.pack
        pong_timeout = self.pong_timeout
        shortest_interval = self.ping_interval * (1 - self.jitter)
        interval_spread = 2 * self.ping_interval * self.jitter
        counter = self._counter
        for key in self._wheel.advance(now):
            peer = peers[key]
            pong_deadline = peer.pong_deadline
            age_deadline = peer.age_deadline
            idle_at = peer.last_traffic + peer.idle_limit
            if pong_deadline < now or age_deadline < now or idle_at < now:
                self._judge(key, peer, now, stalled, actions)
            elif pong_deadline == _NEVER and peer.next_ping <= now:
                counter = (counter + 1) & _COUNTER_MASK
                payload = pack(counter)
                peer.ping_payload = payload
                peer.ping_sent = now
                peer.pong_deadline = pong_deadline = now + pong_timeout
                peer.next_ping = next_ping = now + shortest_interval + interval_spread * random_unit()
                actions.append((PING, key, payload))
                wake = next_ping if next_ping < pong_deadline else pong_deadline
                if idle_at < wake:
                    wake = idle_at
                reschedule(peer.handle, age_deadline if age_deadline < wake else wake)
            else:  # woken early: a pong came, traffic moved the idle limit, ...
                self._arm(peer, now)
        self._counter = counter
        return actions

    def _judge(self, key: Hashable, peer: _Peer, now: float, stalled: bool, actions: list) -> None:
        """A limit has passed: report DEAD, AGE_EXPIRED or IDLE (in that order: a dead peer
        cannot close gracefully) and forget the key, unless a stall defers the verdict."""
        if peer.pong_deadline < now:
            verdict = DEAD
        elif peer.age_deadline < now:
            verdict = AGE_EXPIRED
        else:
            verdict = IDLE
        if not stalled or verdict is AGE_EXPIRED:
            del self._peers[key]
            actions.append((verdict, key, None))
            return
        # Pongs or data may wait unread in the socket buffer: judge again shortly.
        later = now + self.stall_grace
        if verdict is DEAD:
            peer.pong_deadline = later
        else:  # IDLE: as if traffic had been seen just in time for `later`
            peer.last_traffic = later - peer.idle_limit
        self._arm(peer, now)

    def _answered(self, peer: _Peer, now: float) -> None:
        """The outstanding ping is answered; if the next ping is overdue, send it next tick."""
        peer.pong_deadline = _NEVER
        if peer.next_ping <= now:
            # The handle waits for the pong deadline: bring it forward.
            self._wheel.reschedule(peer.handle, now)

    def _arm(self, peer: _Peer, now: float) -> None:
        """Point the peer's handle at its nearest deadline (or nowhere if it has none)."""
        wake = min(peer.pong_deadline, peer.last_traffic + peer.idle_limit, peer.age_deadline)
        # While a ping awaits its pong, a next ping that is already due waits too.
        if peer.pong_deadline == _NEVER or peer.next_ping > now:
            wake = min(wake, peer.next_ping)
        if wake != _NEVER:
            self._wheel.reschedule(peer.handle, wake)

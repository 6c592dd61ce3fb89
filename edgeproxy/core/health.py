"""Server health: active checks with rise/fall, passive ejection with backoff, slow start, drain.

Theory of operation
-------------------
Each server has one `ServerHealth`.  Two independent verdicts make it "down":

* **Active** (`active_result`): the transport probes the server every
  ``interval`` (HTTP GET or TCP connect) and reports ok/failed.  ``fall``
  failures in a row take an up server down; ``rise`` successes in a row bring
  a down server back, as in HAProxy.
* **Passive** (`passive_failure` / `passive_success`): real traffic reports
  connect failures and 5xx responses.  ``max_fails`` in a row eject the server
  for ``eject_base`` x 2^(ejections so far) seconds, capped at ``eject_max``.
  ``max_fails = 0`` turns passive ejection off.
  The ejection count is forgotten once the server has served successfully for
  ``eject_max`` seconds after its last ejection ended.

``drain`` is set by the operator (config or admin API): no new connections,
whatever the verdicts say.  A server that comes back (rise reached, or its
ejection ended) starts in slow start: its weight ramps linearly from 10 % to
100 % over ``slow_start`` seconds.  Servers start up, with no slow start.

=========== ====================================  ================================
state       when                                  new connections
=========== ====================================  ================================
draining    ``drain`` is set                      none
down        active verdict down, or ejected       none
slow_start  up, came back < slow_start s ago      weight x ramp (0.1 .. 1)
up          otherwise                             full weight
=========== ====================================  ================================

Every method takes ``now`` (monotonic seconds); nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from enum import Enum


class State(Enum):
    #: Takes connections at full weight.  Next: DOWN, DRAINING.
    UP = "up"
    #: Came back recently; weight ramps up.  Next: UP, DOWN, DRAINING.
    SLOW_START = "slow_start"
    #: Failed its checks or ejected; no new connections.  Next: SLOW_START, DRAINING.
    DOWN = "down"
    #: The operator asked for no new connections.  Next: any, when drain is cleared.
    DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """The knobs of `[upstreams.health]` that the state machine needs."""

    rise: int = 2
    fall: int = 3
    max_fails: int = 3
    eject_base: float = 5.0
    eject_max: float = 60.0
    slow_start: float = 0.0


#: The lowest slow-start weight factor (a server never gets nothing).
SLOW_START_FLOOR = 0.1


class ServerHealth:
    """The health state machine of one server (see the module docstring)."""

    def __init__(self, policy: HealthPolicy, *, drain: bool = False):
        self.policy = policy
        self.drain = drain
        self.active_up = True
        self._ok_streak = 0
        self._fail_streak = 0
        self.passive_fails = 0
        self.ejections = 0
        self.ejected_until = 0.0
        self._ejection_ended = -math.inf
        self._back_since = -math.inf

    def _settle(self, now: float) -> None:
        if self.ejected_until and now >= self.ejected_until:
            self._ejection_ended = self.ejected_until
            self._back_since = max(self._back_since, self.ejected_until)
            self.ejected_until = 0.0

    def state(self, now: float) -> State:
        self._settle(now)
        if self.drain:
            return State.DRAINING
        if not self.active_up or self.ejected_until:
            return State.DOWN
        if now - self._back_since < self.policy.slow_start:
            return State.SLOW_START
        return State.UP

    def weight_factor(self, now: float) -> float:
        """1.0, or the slow-start ramp (0.1 .. 1); only meaningful when eligible."""
        slow = self.policy.slow_start
        elapsed = now - self._back_since
        if not slow or elapsed >= slow:
            return 1.0
        return max(SLOW_START_FLOOR, elapsed / slow)

    def active_result(self, ok: bool, now: float) -> bool:
        """Record one active check; True when it changed the active verdict."""
        if ok:
            self._fail_streak = 0
            self._ok_streak += 1
            if not self.active_up and self._ok_streak >= self.policy.rise:
                self.active_up = True
                self._back_since = now
                return True
        else:
            self._ok_streak = 0
            self._fail_streak += 1
            if self.active_up and self._fail_streak >= self.policy.fall:
                self.active_up = False
                return True
        return False

    def passive_failure(self, now: float) -> bool:
        """A connect failure or a 5xx; True when it ejected the server."""
        self._settle(now)
        if self.ejected_until or not self.policy.max_fails:
            return False  # already out (requests that started before don't count twice), or disabled
        self.passive_fails += 1
        if self.passive_fails < self.policy.max_fails:
            return False
        self.passive_fails = 0
        duration = min(self.policy.eject_max, self.policy.eject_base * 2**self.ejections)
        self.ejections += 1
        self.ejected_until = now + duration
        return True

    def passive_success(self, now: float) -> None:
        """A connection made or a non-5xx response: the failure streak ends."""
        self._settle(now)
        self.passive_fails = 0
        if self.ejections and now - self._ejection_ended >= self.policy.eject_max:
            self.ejections = 0

    def retry_after(self, now: float, check_interval: float) -> float:
        """Seconds until this server could take connections again (a guess for Retry-After)."""
        self._settle(now)
        wait = 0.0
        if self.ejected_until:
            wait = self.ejected_until - now
        if not self.active_up:
            wait = max(wait, check_interval * max(1, self.policy.rise - self._ok_streak))
        return wait


class HealthBook:
    """The `ServerHealth` of every server of one upstream."""

    def __init__(self, policy: HealthPolicy, servers: Iterable[Hashable], drained: Iterable[Hashable] = ()):
        drained = set(drained)
        self.servers = {s: ServerHealth(policy, drain=s in drained) for s in servers}

    def __getitem__(self, server: Hashable) -> ServerHealth:
        return self.servers[server]

    def update(self, policy: HealthPolicy, servers: Iterable[Hashable], drained: Iterable[Hashable] = ()) -> list[Hashable]:
        """Follow a reloaded server list; returns the servers that left, in their old order.

        A server that stays keeps its state (verdicts, streaks, ejections) under
        the new `policy`; a new one starts up, like every server at start-up.
        ``drain`` follows the new config for every server: a reload is the
        operator's statement of intent, so it also ends a drain set at run time.
        """
        drained = set(drained)
        old = self.servers
        self.servers = {}
        for server in servers:
            health = old.get(server)
            if health is None:
                health = ServerHealth(policy)
            health.policy = policy
            health.drain = server in drained
            self.servers[server] = health
        return [s for s in old if s not in self.servers]

    def eligible(self, now: float, weights: dict[Hashable, int]) -> dict[Hashable, float]:
        """server -> effective weight, for the servers that may take a new connection."""
        out = {}
        for server, health in self.servers.items():
            if health.state(now) in (State.UP, State.SLOW_START):
                out[server] = weights.get(server, 1) * health.weight_factor(now)
        return out

    def retry_after(self, now: float, check_interval: float) -> int:
        """Whole seconds (>= 1) until the first non-draining server may be back."""
        waits = [h.retry_after(now, check_interval) for h in self.servers.values() if not h.drain]
        return max(1, math.ceil(min(waits, default=check_interval or 1.0)))

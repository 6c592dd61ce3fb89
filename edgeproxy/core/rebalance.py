"""Paced rebalancing of live WebSocket connections: when, where and how many to close.

Theory of operation
-------------------
Affinity and long-lived connections keep an imbalance long after it appears
(scale-out from 2 to 4 servers leaves the new ones empty).  The planner fixes
it gently: the transport calls `plan` with the live counts, and the planner
answers how many connections to close on which servers, never more than
``max_closes`` per ``interval``, so a rebalance can never become a reconnect
storm.

* **Imbalance** is max/mean of connections per unit of weight over the servers
  taking connections: ``ratio = max(load_i / w_i) / (total / W)``, where
  ``total`` also counts connections still held by draining servers (those are
  all excess: a drain is paced out by the same budget).
* **Trigger**: the ratio has stayed above ``threshold`` (or a draining server
  still holds connections) for ``sustain`` seconds.  A short spike is left alone.
* **Plan**: while triggered, every ``interval`` the budget goes one close at a
  time to the server furthest above its share (draining servers first); a server
  is never taken below its share (``ceil(mean x w)``).  The servers with
  closes form `shedding`: affinity does not send clients back to them, so the
  closed clients' reconnects land on colder servers.
* **Stop**: once the ratio is at or below ``threshold`` and no draining server
  holds connections, the trigger resets.

Each closed client gets close code 1012 (service restart) or 1013 (try again
later) with a reason like ``reconnect after 3.2s``: a delay drawn uniformly in
``[delay_min, delay_max]`` so the reconnects spread out (`close_reason`; also
used when a server goes down under live sessions).

Nothing here reads a clock or a random source: ``now`` and ``rng`` are passed in.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Mapping, Set
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RebalancePolicy:
    """The knobs of `[upstreams.rebalance]`."""

    threshold: float = 1.2
    sustain: float = 30.0
    interval: float = 1.0
    max_closes: int = 10
    close_code: int = 1012
    delay_min: float = 1.0
    delay_max: float = 10.0


def imbalance(eligible: Mapping[Hashable, float], loads: Mapping[Hashable, int], draining: Set[Hashable] = frozenset()) -> float:
    """max/mean connections per unit of weight over `eligible` (1.0 when empty or idle).

    Connections on `draining` servers count toward the mean (they will move).
    """
    total = sum(loads.get(s, 0) for s in eligible) + sum(loads.get(s, 0) for s in draining)
    if not eligible or total == 0:
        return 1.0
    mean = total / sum(eligible.values())
    return max(loads.get(s, 0) / w for s, w in eligible.items()) / mean


class RebalancePlanner:
    """Decides, interval by interval, how many live connections to close where."""

    def __init__(self, policy: RebalancePolicy):
        self.policy = policy
        #: when the imbalance was first seen above the threshold (None: it is not)
        self.above_since: float | None = None
        #: the servers the last plan closed connections on
        self.shedding: frozenset[Hashable] = frozenset()
        self.last_ratio = 1.0
        self.closed_total = 0
        self._last_plan = -math.inf

    @property
    def active(self) -> bool:
        return bool(self.shedding)

    def plan(
        self,
        now: float,
        eligible: Mapping[Hashable, float],
        loads: Mapping[Hashable, int],
        draining: Set[Hashable] = frozenset(),
    ) -> dict[Hashable, int]:
        """server -> connections to close now (empty: nothing to do this time).

        Args:
            now: monotonic seconds.
            eligible: server -> effective weight, servers taking connections.
            loads: server -> live connections.
            draining: servers whose connections should move away entirely.
        """
        policy = self.policy
        ratio = self.last_ratio = imbalance(eligible, loads, draining)
        held = [s for s in draining if loads.get(s, 0) > 0]
        if not eligible or (ratio <= policy.threshold and not held):
            self.above_since = None
            self.shedding = frozenset()
            return {}
        if self.above_since is None:
            self.above_since = now
        if now - self.above_since < policy.sustain or now - self._last_plan < policy.interval:
            return {}
        self._last_plan = now
        total = sum(loads.get(s, 0) for s in eligible) + sum(loads.get(s, 0) for s in held)
        mean = total / sum(eligible.values())
        remaining = {s: loads.get(s, 0) for s in eligible}
        remaining.update({s: loads.get(s, 0) for s in held})
        share = {s: math.ceil(mean * w) for s, w in eligible.items()}
        share.update({s: 0 for s in held})
        plan: dict[Hashable, int] = {}
        for _ in range(policy.max_closes):
            # Draining servers first (infinite priority), then the furthest above share.
            best = max(
                remaining,
                key=lambda s: (s in draining, (remaining[s] - share[s]) / eligible.get(s, 1.0)),
            )
            if remaining[best] <= share[best]:
                break
            remaining[best] -= 1
            plan[best] = plan.get(best, 0) + 1
        self.shedding = frozenset(plan)
        self.closed_total += sum(plan.values())
        return plan



def close_reason(policy: RebalancePolicy, rng: random.Random) -> tuple[int, str]:
    """The close code and a reason carrying a jittered reconnect delay, for one closed client."""
    delay = rng.uniform(policy.delay_min, policy.delay_max)
    return policy.close_code, f"reconnect after {delay:.1f}s"

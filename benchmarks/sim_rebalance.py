"""Scale-out simulation: 2 -> 4 servers under sticky WebSocket load, three affinity strategies.

Run (about 10 s, bounded):

    python benchmarks/sim_rebalance.py            # 10,000 connections, 600 simulated seconds

It drives the real sans-IO modules (`core.balance`, `core.affinity`,
`core.rebalance`) with simulated time, no sockets:

* t < 0: every connection is on server s0 or s1 and pinned there by its cookie.
* t = 0: s2 and s3 join.  Connections end at random (exponential lifetimes,
  mean ``--lifetime`` s) and the client reconnects 1-3 s later with its cookie.
* (a) strict: the cookie is always honoured (only failure would move a client).
* (b) give-way: `honour_pin` with ``rebalance_threshold`` 1.5; a client that
  gives way goes to the least-loaded server and is re-pinned there.
* (c) give-way + paced rebalancing: (b) plus `RebalancePlanner` every
  ``interval``; each closed client waits the delay named in its close reason
  ("reconnect after 3.2s") and reconnects with its (old) cookie.

It prints max/mean connections over time for each strategy, when (c) first
falls below 1.2, and the most connections (c) closed in any one second, which
must not exceed ``max_closes / interval``.
"""

from __future__ import annotations

import argparse
import heapq
import random
import re
from dataclasses import dataclass, field

from edgeproxy.core.affinity import honour_pin
from edgeproxy.core.balance import least_loaded
from edgeproxy.core.rebalance import RebalancePlanner, RebalancePolicy, close_reason, imbalance

SERVERS = ("s0", "s1", "s2", "s3")
STRATEGIES = ("strict", "give-way", "give-way+rebalance")
GIVE_WAY = 1.5
TARGET = 1.2


@dataclass
class Result:
    strategy: str
    #: (time, max/mean) sampled every `sample` seconds
    series: list[tuple[float, float]] = field(default_factory=list)
    #: first time max/mean was below TARGET (None: never)
    below_target_at: float | None = None
    #: connections closed by the rebalancer in each whole simulated second
    closes_per_second: dict[int, int] = field(default_factory=dict)
    rebalance_closes: int = 0
    reconnects: int = 0

    @property
    def final_ratio(self) -> float:
        return self.series[-1][1]

    @property
    def max_closes_in_a_second(self) -> int:
        return max(self.closes_per_second.values(), default=0)


class _Members:
    """The connections of each server, with O(1) add, remove and random sample."""

    def __init__(self) -> None:
        self.lists: dict[str, list[int]] = {s: [] for s in SERVERS}
        self.where: dict[int, tuple[str, int]] = {}

    def add(self, conn: int, server: str) -> None:
        members = self.lists[server]
        self.where[conn] = (server, len(members))
        members.append(conn)

    def remove(self, conn: int) -> str:
        server, index = self.where.pop(conn)
        members = self.lists[server]
        last = members.pop()
        if last != conn:
            members[index] = last
            self.where[last] = (server, index)
        return server

    def loads(self) -> dict[str, int]:
        return {s: len(m) for s, m in self.lists.items()}


def simulate(
    strategy: str,
    *,
    connections: int = 10_000,
    duration: float = 600.0,
    lifetime: float = 1800.0,
    policy: RebalancePolicy | None = None,
    sample: float = 10.0,
    seed: int = 1,
) -> Result:
    """Run one strategy; deterministic for a given seed."""
    if strategy not in STRATEGIES:
        raise ValueError(strategy)
    policy = policy or RebalancePolicy(threshold=1.1, sustain=10.0, interval=1.0, max_closes=50, delay_min=1.0, delay_max=10.0)
    rng = random.Random(seed)
    eligible = {s: 1.0 for s in SERVERS}
    members = _Members()
    pin: dict[int, str] = {}
    events: list[tuple[float, int, str, int, int]] = []  # (time, tiebreak, kind, conn, generation)
    generation: dict[int, int] = {}  # a rebalance close makes the connection's pending "end" stale
    order = 0

    def push(when: float, kind: str, conn: int) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (when, order, kind, conn, generation.get(conn, 0)))

    for conn in range(connections):
        server = SERVERS[conn % 2]
        pin[conn] = server
        members.add(conn, server)
        push(rng.expovariate(1.0 / lifetime), "end", conn)

    planner = RebalancePlanner(policy) if strategy == "give-way+rebalance" else None
    threshold = None if strategy == "strict" else GIVE_WAY
    result = Result(strategy)
    now = 0.0
    next_sample = 0.0
    next_plan = policy.interval

    def record(t: float) -> None:
        ratio = imbalance(eligible, members.loads())
        result.series.append((t, ratio))
        if result.below_target_at is None and ratio < TARGET:
            result.below_target_at = t

    while now <= duration:
        upcoming = min(events[0][0] if events else duration + 1, next_sample, next_plan if planner else duration + 1)
        now = upcoming
        if now > duration:
            break
        if now == next_sample:
            record(now)
            next_sample += sample
            continue
        if planner is not None and now == next_plan:
            next_plan += policy.interval
            plan = planner.plan(now, eligible, members.loads())
            for server, count in plan.items():
                for conn in rng.sample(members.lists[server], count):
                    members.remove(conn)
                    generation[conn] = generation.get(conn, 0) + 1
                    _, reason = close_reason(policy, rng)
                    delay = float(re.fullmatch(r"reconnect after (\d+\.\d)s", reason)[1])
                    push(now + delay, "connect", conn)
                    second = int(now)
                    result.closes_per_second[second] = result.closes_per_second.get(second, 0) + 1
                    result.rebalance_closes += 1
            continue
        _, _, kind, conn, gen = heapq.heappop(events)
        if gen != generation.get(conn, 0):
            continue
        if kind == "end":
            members.remove(conn)
            push(now + rng.uniform(1.0, 3.0), "connect", conn)
            continue
        # a reconnect, with the client's cookie
        loads = members.loads()
        shedding = planner.shedding if planner is not None else frozenset()
        if honour_pin(pin[conn], eligible, loads, threshold=threshold, shedding=shedding):
            server = pin[conn]
        else:
            server = pin[conn] = least_loaded(eligible, loads, rng)
        members.add(conn, server)
        result.reconnects += 1
        push(now + rng.expovariate(1.0 / lifetime), "end", conn)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=600.0, help="simulated seconds after the scale-out")
    parser.add_argument("--lifetime", type=float, default=1800.0, help="mean connection lifetime, seconds")
    parser.add_argument("--max-closes", type=int, default=50, help="rebalancer closes per interval")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    policy = RebalancePolicy(threshold=1.1, sustain=10.0, interval=args.interval, max_closes=args.max_closes,
                             delay_min=1.0, delay_max=10.0)
    results = [
        simulate(s, connections=args.connections, duration=args.duration, lifetime=args.lifetime, policy=policy,
                 sample=5.0, seed=args.seed)
        for s in STRATEGIES
    ]
    print(f"scale-out 2 -> 4 servers, {args.connections} connections, mean lifetime {args.lifetime:g}s, "
          f"rebalance {policy.max_closes} closes / {policy.interval:g}s after {policy.sustain:g}s above {policy.threshold}")
    print(f"{'t (s)':>6}  " + "  ".join(f"{r.strategy:>20}" for r in results))
    for row in zip(*(r.series for r in results)):
        if row[0][0] % 30:
            continue
        print(f"{row[0][0]:6.0f}  " + "  ".join(f"{ratio:20.3f}" for _, ratio in row))
    allowed = policy.max_closes / policy.interval
    for r in results:
        below = f"{r.below_target_at:.0f}s" if r.below_target_at is not None else "never"
        print(f"{r.strategy:>20}: final max/mean {r.final_ratio:.3f}, below {TARGET} at {below}, "
              f"rebalance closes {r.rebalance_closes} (max {r.max_closes_in_a_second}/s, allowed {allowed:g}/s), "
              f"reconnects {r.reconnects}")
    paced = results[-1]
    ok = paced.below_target_at is not None and paced.max_closes_in_a_second <= allowed
    print("paced rebalancing:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

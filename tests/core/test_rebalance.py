"""Unit tests of core.rebalance: trigger, pacing, shares, drain, close reasons."""

from __future__ import annotations

import random
import re

from edgeproxy.core.rebalance import RebalancePlanner, RebalancePolicy, close_reason, imbalance

POLICY = RebalancePolicy(threshold=1.2, sustain=3.0, interval=1.0, max_closes=10, close_code=1013,
                         delay_min=1.0, delay_max=4.0)
FOUR = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}


def test_imbalance() -> None:
    assert imbalance({}, {}) == 1.0
    assert imbalance(FOUR, {}) == 1.0
    assert imbalance(FOUR, {"a": 50, "b": 50}) == 2.0
    assert imbalance({"a": 2.0, "b": 1.0}, {"a": 20, "b": 10}) == 1.0  # weights
    assert imbalance({"a": 1.0}, {"a": 5, "z": 5}, draining={"z"}) == 0.5  # a holds 5 of mean 10


def test_waits_for_the_sustain_period_and_resets_on_a_dip() -> None:
    p = RebalancePlanner(POLICY)
    loads = {"a": 50, "b": 50}
    assert p.plan(0.0, FOUR, loads) == {}
    assert p.plan(2.9, FOUR, loads) == {}
    assert p.plan(3.0, FOUR, loads) == {"a": 5, "b": 5}
    assert p.shedding == {"a", "b"} and p.active
    # balanced: the trigger resets, and must be sustained again
    assert p.plan(4.0, FOUR, {s: 25 for s in FOUR}) == {}
    assert not p.active and p.above_since is None
    assert p.plan(5.0, FOUR, loads) == {}


def test_never_more_than_max_closes_per_interval() -> None:
    p = RebalancePlanner(POLICY)
    loads = {"a": 1000, "b": 0, "c": 0, "d": 0}
    p.plan(0.0, FOUR, loads)
    closed = []
    t = 3.0
    while t < 20.0:
        plan = p.plan(t, FOUR, loads)
        closed.append((t, sum(plan.values())))
        loads["a"] -= plan.get("a", 0)
        t += 0.25  # called four times per interval
    for start in range(len(closed)):
        window = [n for (when, n) in closed if closed[start][0] <= when < closed[start][0] + POLICY.interval]
        assert sum(window) <= POLICY.max_closes
    assert sum(n for _, n in closed) == 10 * 17  # one full budget per interval


def test_closes_toward_the_share_never_below_it() -> None:
    p = RebalancePlanner(RebalancePolicy(threshold=1.1, sustain=0.0, interval=1.0, max_closes=100))
    plan = p.plan(0.0, FOUR, {"a": 40, "b": 28, "c": 16, "d": 16})  # mean 25
    assert plan == {"a": 15, "b": 3}
    assert p.shedding == {"a", "b"}


def test_draining_servers_are_paced_out_first() -> None:
    p = RebalancePlanner(RebalancePolicy(threshold=1.5, sustain=0.0, interval=1.0, max_closes=4))
    eligible = {"a": 1.0, "b": 1.0}
    plan = p.plan(0.0, eligible, {"a": 10, "b": 10, "z": 6}, draining={"z"})
    assert plan == {"z": 4}
    assert p.plan(1.0, eligible, {"a": 12, "b": 12, "z": 2}, draining={"z"}) == {"z": 2}
    assert p.plan(2.0, eligible, {"a": 13, "b": 13}, draining={"z"}) == {}


def test_close_reason_is_jittered_within_range() -> None:
    rng = random.Random(9)
    delays = set()
    for _ in range(50):
        code, reason = close_reason(POLICY, rng)
        assert code == 1013
        match = re.fullmatch(r"reconnect after (\d+\.\d)s", reason)
        assert match, reason
        delays.add(float(match[1]))
    assert min(delays) >= 1.0 and max(delays) <= 4.0 and len(delays) > 10

"""Micro-benchmarks of heartbeating 100,000 simulated WebSocket connections.

Run with ``python3 -m pytest benchmarks/test_micro_heartbeat.py --benchmark-only``, or
``python3 benchmarks/test_micro_heartbeat.py`` for a short report in microseconds per
connection per ping interval (``--connections N`` to change the count).

The simulation is the core alone (``edgeproxy.core.heartbeat``): no sockets, so the
figures are the CPU the heartbeat *policy* costs; the transport adds a PING write and
a PONG read per connection per interval.  Every connection answers each ping 20 ms
later.  Settings are the issue's defaults: ``ping_interval = 30``, ``pong_timeout =
60``, jitter 10 %, a 0.5 s tick.  The fleet is run for one interval before measuring,
so the pings are spread as in a steady state (about 1,667 per tick).

Groups:

* ``one tick``: one ``due(now)`` and the pongs to its pings.  The ``scan all`` row is
  the alternative the wheel replaces: a per-tick walk calling one method per
  connection (what ``ProxyServer._on_tick`` does for the other timeouts).
* ``one interval``: 60 ticks, every connection pinged and answered once.
* ``per call``: the calls the transport makes per read (``saw_traffic``) and per
  connection (``register`` + ``unregister``).
* ``drain``: planning and handing out the closes of 100,000 connections.
"""

from __future__ import annotations

import random
import sys
import time
import tracemalloc

import pytest

from edgeproxy.core.drain import Drain
from edgeproxy.core.heartbeat import DEAD, PING, Heartbeat

N = 100_000
PING_INTERVAL = 30.0
PONG_TIMEOUT = 60.0
TICK = 0.5
RTT = 0.02
TICKS_PER_INTERVAL = round(PING_INTERVAL / TICK)


class Fleet:
    """`count` connections on one Heartbeat, all answering; `tick()` moves time by one tick."""

    def __init__(self, count: int, seed: int = 1):
        self.count = count
        self.now = 1000.0
        self.heartbeat = Heartbeat(self.now, rng=random.Random(seed), ping_interval=PING_INTERVAL,
                                   pong_timeout=PONG_TIMEOUT, tick=TICK)
        for key in range(count):
            self.heartbeat.register(key, self.now)
        self.pings = 0
        self.deaths = 0
        self.run_interval()  # warm up: first pings are spread over this interval

    def tick(self) -> int:
        """One loop tick: due() and the pong of every ping it asked for; returns the pings."""
        self.now += TICK
        heartbeat = self.heartbeat
        answered_at = self.now + RTT
        pings = 0
        for action, key, payload in heartbeat.due(self.now):
            if action is PING:
                heartbeat.pong_received(key, payload, answered_at)
                pings += 1
            elif action is DEAD:
                self.deaths += 1
        self.pings += pings
        return pings

    def run_interval(self) -> int:
        return sum(self.tick() for _ in range(TICKS_PER_INTERVAL))


class Polled:
    """A connection as the scan-all alternative sees it: one method call per tick."""

    __slots__ = ("deadline",)

    def __init__(self, deadline: float):
        self.deadline = deadline

    def check_timers(self, now: float) -> None:
        if now >= self.deadline:
            self.deadline = now + PING_INTERVAL


def scan_all(connections, now):
    for conn in connections:
        conn.check_timers(now)


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return Fleet(N)


def test_one_tick(benchmark, fleet):
    benchmark.group = f"one tick, {N:,} connections"
    benchmark(fleet.tick)
    assert fleet.deaths == 0 and len(fleet.heartbeat) == N
    per_tick = N / TICKS_PER_INTERVAL
    assert 0.5 * per_tick < fleet.pings / (fleet.now - 1000.0 - PING_INTERVAL) * TICK < 1.5 * per_tick


def test_one_tick_scan_all_baseline(benchmark):
    benchmark.group = f"one tick, {N:,} connections"
    rng = random.Random(1)
    connections = [Polled(rng.uniform(0.0, PING_INTERVAL)) for _ in range(N)]
    clock = iter(range(10**9))
    benchmark(lambda: scan_all(connections, next(clock) * TICK))


def test_one_interval(benchmark, fleet):
    benchmark.group = f"one interval ({PING_INTERVAL:.0f} s), {N:,} connections"
    pings = benchmark.pedantic(fleet.run_interval, rounds=5, iterations=1, warmup_rounds=1)
    # Every connection is pinged once per interval, give or take the jitter at the edges.
    assert 0.85 * N < pings < 1.15 * N
    assert fleet.deaths == 0 and len(fleet.heartbeat) == N


def test_saw_traffic(benchmark, fleet):
    benchmark.group = "per call"
    benchmark(fleet.heartbeat.saw_traffic, N // 2, fleet.now)


def test_register_and_unregister(benchmark):
    benchmark.group = "per call"
    heartbeat = Heartbeat(0.0, rng=random.Random(1), idle_timeout=600.0, max_connection_age=3600.0)
    for key in range(N):
        heartbeat.register(key, 0.0)

    def churn():
        heartbeat.register("new", 1.0)
        heartbeat.unregister("new")

    benchmark(churn)
    assert len(heartbeat) == N


def test_drain_plan_and_hand_out(benchmark):
    benchmark.group = f"drain, {N:,} connections"
    keys = range(N)

    def drain_all():
        drain = Drain(0.0, keys, 10.0, rng=random.Random(1))
        return sum(len(drain.due(drain.started + step * 0.5)) for step in range(11))

    assert benchmark.pedantic(drain_all, rounds=3, iterations=1) == N


def report(count: int) -> None:
    """Print CPU per connection per interval, per tick, and memory per connection."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    fleet = Fleet(count)
    setup = time.perf_counter() - started
    per_connection = (tracemalloc.get_traced_memory()[0] - before) / count
    tracemalloc.stop()
    fleet.run_interval()  # second interval, steady state, untraced
    rounds = []
    for _ in range(5):
        started = time.process_time()
        fleet.run_interval()
        rounds.append(time.process_time() - started)
    best = min(rounds)
    ticks = []
    for _ in range(TICKS_PER_INTERVAL):
        started = time.process_time()
        fleet.tick()
        ticks.append(time.process_time() - started)
    ticks.sort()
    print(f"heartbeat of {count:,} connections (ping_interval {PING_INTERVAL:.0f} s, tick {TICK} s, "
          f"{sys.implementation.name} {sys.version.split()[0]})")
    print(f"  CPU per ping interval: {best * 1e3:.1f} ms (best of 5) = "
          f"{best * 1e6 / count:.2f} us per connection per interval")
    print(f"  CPU per tick: median {ticks[len(ticks) // 2] * 1e3:.2f} ms, max {ticks[-1] * 1e3:.2f} ms; "
          f"share of one core: {best / PING_INTERVAL:.2%}")
    print(f"  memory: {per_connection:.0f} bytes per connection (tracemalloc, register + first interval)")
    print(f"  setup (register {count:,} + one interval, traced): {setup:.2f} s; deaths: {fleet.deaths}")


if __name__ == "__main__":
    count = int(sys.argv[sys.argv.index("--connections") + 1]) if "--connections" in sys.argv else N
    report(count)

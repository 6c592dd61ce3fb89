"""TimerWheel: never early, at most one tick late, O(1) cancel, far deadlines, clock jumps.

The property test runs random schedule/cancel/reschedule/advance sequences against a
reference built on a heap, and checks both the exact keys and order (the wheel's
documented tick rule) and the plain bounds (fired after the deadline, at most one tick
after it).
"""

from __future__ import annotations

import heapq
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.core.timerwheel import TimerHandle, TimerWheel


def fire_times(wheel: TimerWheel, deadlines: dict, start: float, stop: float, step: float) -> dict:
    """Advance from start to stop by step; return {key: the now that returned it}."""
    fired = {}
    now = start
    while now <= stop + 1e-12:
        for key in wheel.advance(now):
            assert key not in fired, f"{key!r} fired twice"
            fired[key] = now
        now += step
    return fired


class TestBasics:
    def test_fires_after_the_deadline_and_within_one_tick(self):
        wheel = TimerWheel(0.0, tick=0.5, slots=16)
        deadlines = {f"k{i}": 0.1 + i * 0.37 for i in range(40)}
        for key, deadline in deadlines.items():
            wheel.schedule(key, deadline)
        fired = fire_times(wheel, deadlines, 0.0, 20.0, 0.5)
        assert fired.keys() == deadlines.keys()
        for key, when in fired.items():
            assert deadlines[key] < when <= deadlines[key] + 0.5

    def test_deadline_on_a_tick_boundary_fires_at_the_next_one(self):
        # Never early: at now == deadline the key is not out yet.
        wheel = TimerWheel(0.0, tick=1.0, slots=8)
        wheel.schedule("a", 3.0)
        assert wheel.advance(3.0) == []
        assert wheel.advance(3.999) == []
        assert wheel.advance(4.0) == ["a"]

    def test_keys_come_out_in_tick_order_then_scheduling_order(self):
        wheel = TimerWheel(0.0, tick=1.0, slots=8)
        wheel.schedule("late", 2.5)
        wheel.schedule("early", 0.5)
        wheel.schedule("early-too", 0.7)
        wheel.schedule("middle", 1.2)
        assert wheel.advance(5.0) == ["early", "early-too", "middle", "late"]

    def test_len_counts_scheduled_handles(self):
        wheel = TimerWheel(0.0, tick=1.0, slots=8)
        handles = [wheel.schedule(i, 1.0 + i) for i in range(5)]  # deadlines 1.0 .. 5.0
        assert len(wheel) == 5
        wheel.cancel(handles[0])
        assert len(wheel) == 4
        assert wheel.advance(3.5) == [1]  # 2.0 is out; 3.0 waits for the boundary at 4.0
        assert len(wheel) == 3
        wheel.advance(100.0)
        assert len(wheel) == 0

    def test_rejects_bad_parameters(self):
        for tick in (0, -1.0, math.inf, math.nan):
            with pytest.raises(ValueError, match="tick"):
                TimerWheel(0.0, tick=tick)
        with pytest.raises(ValueError, match="slots"):
            TimerWheel(0.0, slots=0)

    def test_handle_repr_and_state(self):
        wheel = TimerWheel(0.0, tick=1.0, slots=8)
        handle = wheel.schedule("conn", 2.0)
        assert handle.scheduled and "conn" in repr(handle) and "tick 3" in repr(handle)
        wheel.advance(10.0)
        assert not handle.scheduled and "idle" in repr(handle)


class TestCancelAndReschedule:
    def test_cancelled_key_never_fires(self):
        wheel = TimerWheel(0.0, tick=0.5, slots=8)
        keep = wheel.schedule("keep", 1.0)
        drop = wheel.schedule("drop", 1.0)
        assert wheel.cancel(drop) is True
        assert wheel.cancel(drop) is False  # twice is harmless
        assert wheel.advance(10.0) == ["keep"]
        assert wheel.cancel(keep) is False  # already fired

    def test_reschedule_moves_the_deadline_both_ways(self):
        wheel = TimerWheel(0.0, tick=1.0, slots=8)
        later = wheel.schedule("later", 1.5)
        sooner = wheel.schedule("sooner", 6.5)
        wheel.reschedule(later, 5.5)
        assert wheel.reschedule(sooner, 0.5) is sooner
        assert wheel.advance(2.0) == ["sooner"]
        assert wheel.advance(5.9) == []
        assert wheel.advance(6.0) == ["later"]
        assert len(wheel) == 0

    def test_fired_handle_can_be_rescheduled(self):
        wheel = TimerWheel(0.0, tick=1.0, slots=8)
        handle = wheel.schedule("ping", 1.0)
        assert wheel.advance(2.0) == ["ping"]
        wheel.reschedule(handle, 4.0)
        assert len(wheel) == 1
        assert wheel.advance(5.0) == ["ping"]

    def test_cancel_then_reschedule_schedules_again(self):
        wheel = TimerWheel(0.0, tick=1.0, slots=8)
        handle = wheel.schedule("x", 1.0)
        wheel.cancel(handle)
        wheel.reschedule(handle, 2.0)
        assert len(wheel) == 1
        assert wheel.advance(3.0) == ["x"]


class TestFarDeadlines:
    def test_deadlines_many_revolutions_ahead_wait_for_their_round(self):
        wheel = TimerWheel(0.0, tick=1.0, slots=4)  # one revolution = 4 s
        deadlines = {"near": 1.5, "one-rev": 5.5, "ten-revs": 41.5, "same-slot-as-near": 1.5 + 4 * 25}
        for key, deadline in deadlines.items():
            wheel.schedule(key, deadline)
        fired = fire_times(wheel, deadlines, 0.0, 200.0, 1.0)
        assert fired == {key: math.floor(d) + 1 for key, d in deadlines.items()}

    def test_day_long_deadline_in_a_small_wheel(self):
        wheel = TimerWheel(0.0, tick=0.5, slots=512)
        wheel.schedule("age", 86_400.25)
        for step in range(1, 2 * 86_400 + 1):
            assert wheel.advance(step * 0.5) == []
        assert wheel.advance(86_400.5) == ["age"]


class TestClockJumps:
    def test_jump_forward_past_many_revolutions_fires_everything_due_in_order(self):
        wheel = TimerWheel(0.0, tick=1.0, slots=8)
        rng = random.Random(7)
        deadlines = {i: rng.uniform(0.0, 1000.0) for i in range(500)}
        for key, deadline in deadlines.items():
            wheel.schedule(key, deadline)
        out = wheel.advance(600.0)  # 75 revolutions at once
        expected = sorted((k for k, d in deadlines.items() if math.floor(d) + 1 <= 600), key=lambda k: (math.floor(deadlines[k]), k))
        assert out == expected
        assert all(deadlines[k] < 600.0 for k in out)
        rest = fire_times(wheel, deadlines, 601.0, 1001.0, 1.0)
        assert rest.keys() == deadlines.keys() - set(out)

    def test_clock_going_backwards_fires_nothing_early_and_keeps_durations(self):
        wheel = TimerWheel(100.0, tick=1.0, slots=8)
        old = wheel.schedule("scheduled-before-step", 103.5)  # 2.5 s after the step below
        assert wheel.advance(101.0) == []
        # The clock steps back 50 s: nothing fires, the wheel's time holds at 101.
        assert wheel.advance(51.0) == []
        assert wheel.now == 101.0
        # A deadline 4.5 s after the new clock fires 4.5 s later, not at once.
        wheel.schedule("scheduled-after-step", 55.5)
        # The old deadline keeps the 2.5 s it had left: due after new clock 53.5.
        assert wheel.advance(53.9) == []
        assert old.scheduled
        assert wheel.advance(54.0) == ["scheduled-before-step"]
        assert wheel.advance(55.9) == []
        assert wheel.advance(56.0) == ["scheduled-after-step"]

    def test_past_deadline_fires_at_the_next_advance_first(self):
        wheel = TimerWheel(0.0, tick=1.0, slots=8)
        wheel.schedule("future", 10.5)
        wheel.advance(10.2)
        wheel.schedule("past", 3.0)
        wheel.schedule("also-past", 9.0)
        assert wheel.advance(10.3) == ["past", "also-past"]
        assert wheel.advance(11.0) == ["future"]

    def test_cancel_an_overdue_handle(self):
        wheel = TimerWheel(10.0, tick=1.0, slots=8)
        handle = wheel.schedule("past", 1.0)
        assert wheel.cancel(handle)
        assert wheel.advance(11.0) == [] and len(wheel) == 0


def test_100k_entries_fire_once_each_within_one_tick():
    wheel = TimerWheel(0.0, tick=0.5, slots=512)
    rng = random.Random(1)
    deadlines = [rng.uniform(0.0, 60.0) for _ in range(100_000)]
    handles = [wheel.schedule(i, d) for i, d in enumerate(deadlines)]
    for handle in handles[::10]:  # cancel a tenth
        wheel.cancel(handle)
    cancelled = set(range(0, 100_000, 10))
    seen = bytearray(100_000)
    now = 0.0
    while now <= 61.0:
        now += 0.5
        for key in wheel.advance(now):
            assert deadlines[key] < now <= deadlines[key] + 0.5
            seen[key] += 1
    assert len(wheel) == 0
    assert all(seen[i] == (0 if i in cancelled else 1) for i in range(100_000))


# ---------------------------------------------------------------------------
# property test against a heap


class HeapReference:
    """The wheel's contract on a heap: tick = floor(d / tick) + 1, past ticks fire next."""

    def __init__(self, now: float, tick: float):
        self.per_second = 1.0 / tick
        self.done_tick = math.floor(now * self.per_second)
        self.heap: list = []
        self.live: dict = {}  # key -> sequence number of its live entry
        self.seq = 0

    def schedule(self, key, deadline: float) -> None:
        self.seq += 1
        tick = max(math.floor(deadline * self.per_second) + 1, self.done_tick)  # overdue: first
        self.live[key] = self.seq
        heapq.heappush(self.heap, (tick, self.seq, key))

    def cancel(self, key) -> None:
        self.live.pop(key, None)

    def advance(self, now: float) -> list:
        self.done_tick = max(self.done_tick, math.floor(now * self.per_second))
        out = []
        while self.heap and self.heap[0][0] <= self.done_tick:
            _, seq, key = heapq.heappop(self.heap)
            if self.live.get(key) == seq:
                del self.live[key]
                out.append(key)
        return out


operations = st.lists(
    st.one_of(
        st.tuples(st.just("schedule"), st.integers(0, 30), st.floats(-5.0, 300.0)),
        st.tuples(st.just("cancel"), st.integers(0, 30), st.just(0.0)),
        st.tuples(st.just("advance"), st.just(0), st.floats(0.0, 40.0)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(ops=operations, tick=st.sampled_from([0.1, 0.25, 0.5, 1.0, 3.0]), slots=st.integers(1, 16))
def test_matches_a_heap_and_keeps_its_bounds(ops, tick, slots):
    wheel = TimerWheel(0.0, tick=tick, slots=slots)
    reference = HeapReference(0.0, tick)
    handles: dict[int, TimerHandle] = {}
    deadlines: dict[int, float] = {}
    now = 0.0
    for op, key, value in ops:
        if op == "schedule":
            if key in handles:
                wheel.reschedule(handles[key], value)
            else:
                handles[key] = wheel.schedule(key, value)
            reference.schedule(key, value)
            deadlines[key] = value
        elif op == "cancel":
            if key in handles:
                wheel.cancel(handles[key])
            reference.cancel(key)
            deadlines.pop(key, None)
        else:
            now += value  # time only moves forward here (clock jumps are tested above)
            out = wheel.advance(now)
            assert out == reference.advance(now)
            for fired in out:
                assert deadlines.pop(fired) < now  # never early
            assert all(d > now - tick - 1e-9 for d in deadlines.values())  # at most a tick late
        assert len(wheel) == len(reference.live) == len(deadlines)

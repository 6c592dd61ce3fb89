"""Drain: every connection gets one close, in paced batches, before the tail, with a valid reason."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.core.drain import CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART, MAX_REASON_BYTES, Drain
from edgeproxy.core.frames import MAX_CONTROL_PAYLOAD, encode_close_payload, parse_close_payload

HINT = re.compile(r"^server shutting down; reconnect in (\d+\.\d)s$")


def make(keys, now: float = 100.0, drain_timeout: float = 10.0, seed: int = 1, **options) -> Drain:
    return Drain(now, keys, drain_timeout, rng=random.Random(seed), **options)


def play(drain: Drain, step: float, until: float) -> list:
    """Call due() every `step` seconds from the start; return [(time, key, code, reason)]."""
    out = []
    now = drain.started
    while now <= until + 1e-9:
        out += [(now, *close) for close in drain.due(now)]
        now += step
    return out


def batches_of(closes: list) -> list[tuple[float, int]]:
    """[(release time, batch size)] of what `play` returned."""
    return sorted(Counter(t for t, *_ in closes).items())


class TestPlan:
    def test_every_key_gets_exactly_one_close(self):
        keys = [f"ws{i}" for i in range(10_000)]
        drain = make(keys)
        closes = play(drain, 0.1, drain.deadline)
        assert sorted(k for _, k, _, _ in closes) == sorted(keys)
        assert drain.done and drain.remaining == 0 and drain.next_batch_at is None

    def test_batches_are_paced_equal_and_inside_the_close_window(self):
        drain = make(range(10_000), drain_timeout=10.0, batch_interval=0.5, close_window=0.5)
        assert drain.deadline == 110.0 and drain.close_by == 105.0
        assert drain.batches == 11  # at 100.0, 100.5, ..., 105.0
        released = batches_of(play(drain, 0.05, drain.deadline))
        times = [t for t, _ in released]
        assert times[0] == pytest.approx(100.0) and times[-1] == pytest.approx(105.0, abs=0.05)
        assert all(b - a >= 0.5 - 0.05 - 1e-9 for a, b in zip(times, times[1:]))
        sizes = [n for _, n in released]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 10_000

    def test_few_connections_are_still_spread_over_the_window(self):
        drain = make(["a", "b", "c"], drain_timeout=10.0, batch_interval=0.5, close_window=0.6)
        assert drain.batches == 3
        closes = play(drain, 0.5, drain.deadline)
        assert [t for t, *_ in closes] == [100.0, 103.0, 106.0]

    def test_shuffled_so_no_group_goes_first(self):
        keys = list(range(1000))
        first_batch = [k for _, k, _, _ in play(make(keys), 0.5, 100.0)]
        assert len(first_batch) == 1000 // 11  # batch 0 of 11
        assert first_batch != sorted(first_batch)
        assert max(first_batch) > 900 and min(first_batch) < 100

    def test_closes_due_late_come_all_at_once_in_batch_order(self):
        drain = make(range(100))
        assert drain.next_batch_at == 100.0
        closes = drain.due(1000.0)
        assert sorted(k for k, _, _ in closes) == list(range(100)) and drain.done
        assert drain.due(2000.0) == []

    def test_time_before_the_next_batch_gives_nothing(self):
        drain = make(range(100))
        first = drain.due(100.0)
        assert first and drain.due(100.2) == [] and drain.due(50.0) == []
        assert drain.next_batch_at == pytest.approx(100.5)

    def test_no_connections(self):
        drain = make([])
        assert drain.done and drain.batches == 0 and drain.due(200.0) == []
        assert drain.next_batch_at is None and drain.deadline == 110.0

    def test_zero_close_window_sends_everything_at_once(self):
        drain = make(range(500), close_window=0.0)
        assert drain.batches == 1 and len(drain.due(100.0)) == 500

    def test_duplicate_keys_get_one_close(self):
        drain = make(["a", "a", "b"])
        assert sorted(k for k, _, _ in drain.due(1e9)) == ["a", "b"]


class TestForget:
    def test_a_forgotten_connection_gets_no_close(self):
        drain = make(range(100))
        assert drain.forget(42) is True
        assert drain.forget(42) is False
        assert drain.remaining == 99
        keys = [k for k, _, _ in drain.due(1e9)]
        assert 42 not in keys and len(keys) == 99

    def test_forgetting_after_the_close_changes_nothing(self):
        drain = make(range(10))
        closed = [k for k, _, _ in drain.due(1e9)]
        assert drain.forget(closed[0]) is False and drain.remaining == 0
        assert drain.forget("never-there") is False


class TestReason:
    def test_hint_is_jittered_within_bounds(self):
        drain = make(range(2000), reconnect_hint=(1.0, 5.0))
        delays = []
        for _, code, reason in drain.due(1e9):
            assert code == CLOSE_GOING_AWAY
            delays.append(float(HINT.match(reason).group(1)))
        assert min(delays) >= 1.0 and max(delays) <= 5.0
        assert len(set(delays)) > 30  # spread, not one value

    def test_reason_fits_a_close_frame(self):
        for _, code, reason in make(range(50)).due(1e9):
            payload = encode_close_payload(code, reason)
            assert len(payload) <= MAX_CONTROL_PAYLOAD
            assert parse_close_payload(payload) == (code, reason)  # not truncated

    def test_service_restart_code(self):
        closes = make(range(5), close_code=CLOSE_SERVICE_RESTART).due(1e9)
        assert {code for _, code, _ in closes} == {1012}

    def test_custom_reason_is_checked_in_utf8_bytes(self):
        # 40 x "é" is 80 bytes: fits; 62 x "é" with the hint does not.
        ok = make(["a"], reason_format="é" * 40 + " {delay:.0f}", reconnect_hint=(1.0, 9.0))
        assert ok.due(1e9)[0][2].startswith("é" * 40)
        with pytest.raises(ValueError, match="longer than 123 bytes"):
            make(["a"], reason_format="é" * 61 + "{delay:.1f}")
        # The widest delay decides: 123 bytes fit, 124 do not.
        fits = "x" * (MAX_REASON_BYTES - 5) + "{delay:.1f}"  # "100.0" is 5 bytes
        make(["a"], reason_format=fits, reconnect_hint=(1.0, 100.0))
        with pytest.raises(ValueError, match="longer than"):
            make(["a"], reason_format="x" + fits, reconnect_hint=(1.0, 100.0))


class TestSettings:
    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"drain_timeout": 0.0}, "drain_timeout"),
            ({"drain_timeout": float("inf")}, "drain_timeout"),
            ({"batch_interval": 0.0}, "batch_interval"),
            ({"close_window": 1.0}, "close_window"),
            ({"close_window": -0.1}, "close_window"),
            ({"close_code": 1005}, "close_code"),
            ({"close_code": 1006}, "close_code"),
            ({"close_code": 999}, "close_code"),
            ({"reconnect_hint": (5.0, 1.0)}, "reconnect_hint"),
            ({"reconnect_hint": (-1.0, 1.0)}, "reconnect_hint"),
            ({"reason_format": "reconnect in {seconds}s"}, "reason_format"),
        ],
    )
    def test_rejects_bad_settings(self, options, message):
        options = {"drain_timeout": 10.0, **options}
        with pytest.raises(ValueError, match=message):
            Drain(0.0, ["a"], rng=random.Random(0), **options)

    @pytest.mark.parametrize("code", [1000, 1001, 1012, 1013, 3000, 4999])
    def test_accepts_codes_a_server_may_send(self, code):
        assert make(["a"], close_code=code).due(1e9)[0][1] == code


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(0, 3000),
    drain_timeout=st.floats(0.1, 120.0),
    batch_interval=st.floats(0.01, 10.0),
    close_window=st.floats(0.0, 0.95),
    step=st.floats(0.01, 3.0),
    forgotten=st.sets(st.integers(0, 3000), max_size=50),
    seed=st.integers(0, 2**32),
)
def test_plan_invariants(count, drain_timeout, batch_interval, close_window, step, forgotten, seed):
    drain = Drain(50.0, range(count), drain_timeout, rng=random.Random(seed),
                  batch_interval=batch_interval, close_window=close_window)
    for key in forgotten:
        drain.forget(key)
    closes = play(drain, step, drain.deadline + step)
    keys = [k for _, k, _, _ in closes]
    assert sorted(keys) == sorted(set(range(count)) - forgotten)  # each live key once
    assert drain.done and drain.remaining == 0
    times = [t for t, *_ in closes]
    # Before the tail: released by the first due() call at or after close_by.
    assert all(t < drain.close_by + step + 1e-9 for t in times)
    # Planned: the last batch is due by close_by, and batches at least batch_interval apart.
    starts = [drain.started + i * drain._spacing for i in range(drain.batches)]
    assert not starts or starts[-1] <= drain.close_by + 1e-9
    assert all(b - a >= batch_interval - 1e-9 for a, b in zip(starts, starts[1:]))
    assert drain.batches <= max(count, 0) and (count == 0 or drain.batches >= 1)
    for _, _, code, reason in closes:
        assert code == CLOSE_GOING_AWAY
        assert len(reason.encode()) <= MAX_REASON_BYTES
        assert 1.0 <= float(HINT.match(reason).group(1)) <= 5.0


class TestStall:
    """A loop stall past several batches must not release them together (the burst pacing prevents)."""

    def test_a_stall_replans_the_rest_instead_of_bursting(self):
        # 1,100 keys, 11 batches of 100 at 100.0, 100.5, ..., 105.0
        drain = make(range(1100))
        assert len(drain.due(100.0)) == 100
        # the loop stalls 2.1 s: batches at 100.5 .. 102.0 are all overdue
        late = drain.due(102.1)
        assert drain.replans == 1
        # the 1,000 left are spread over the 2.9 s left of the window: 6 batches, ~167 each
        assert len(late) == 1000 // drain.batches
        assert len(late) < 200  # not the 400 of the four overdue batches
        closes = play_from(drain, 102.1, step=0.05, until=105.05)
        times = [t for t, _ in batches_of_times(closes)]
        assert all(b - a >= 0.5 - 1e-9 for a, b in zip([102.1] + times, times))
        assert drain.done and drain.remaining == 0
        assert len(late) + len(closes) == 1000
        assert max(times) <= drain.close_by + 0.05

    def test_one_overdue_batch_is_not_a_stall(self):
        drain = make(range(1100))
        drain.due(100.0)
        assert len(drain.due(100.7)) == 100  # only the 100.5 batch was due
        assert drain.replans == 0

    def test_after_the_close_window_the_rest_goes_at_once(self):
        # every connection must have its close before the deadline
        drain = make(range(1100))
        drain.due(100.0)
        assert len(drain.due(107.0)) == 1000
        assert drain.done

    def test_forgotten_keys_stay_forgotten_across_a_replan(self):
        drain = make(range(1100))
        drain.due(100.0)
        gone = list(range(0, 1100, 3))
        for key in gone:
            drain.forget(key)
        got = [k for k, _, _ in drain.due(103.0)] + [k for _, k, _, _ in play_from(drain, 103.0, 0.1, 106.0)]
        assert not set(got) & set(gone)
        assert len(got) == len(set(got)) == drain.remaining + len(got)


def play_from(drain: Drain, start: float, step: float, until: float) -> list:
    """Like `play`, from `start` (exclusive)."""
    out = []
    now = start + step
    while now <= until + 1e-9:
        out += [(now, *close) for close in drain.due(now)]
        now += step
    return out


def batches_of_times(closes: list) -> list[tuple[float, int]]:
    return sorted(Counter(round(t, 6) for t, *_ in closes).items())

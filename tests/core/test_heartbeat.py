"""Heartbeat: pings with jitter, pong matching, dead peers, idle and age limits, stalls.

Time is simulated: `run` calls due() every tick like the transport's loop callback
and, for peers in `answering`, feeds back a pong `rtt` seconds after each ping.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from edgeproxy.core.heartbeat import AGE_EXPIRED, DEAD, IDLE, PING, Heartbeat

TICK = 0.5


def make(now: float = 0.0, seed: int = 1, **options) -> Heartbeat:
    options.setdefault("tick", TICK)
    return Heartbeat(now, rng=random.Random(seed), **options)


def run(hb: Heartbeat, start: float, stop: float, answering=(), rtt: float = 0.05, busy=()) -> list:
    """Tick from start to stop; return [(time, action, key, payload)].

    Peers in `answering` answer each ping `rtt` seconds later; peers in `busy` send data
    every tick.
    """
    log = []
    pending = []  # (when the pong arrives, key, payload)
    steps = round((stop - start) / TICK)
    for step in range(1, steps + 1):
        now = start + step * TICK
        for key in busy:
            hb.saw_traffic(key, now - TICK / 2)
        for when, key, payload in [p for p in pending if p[0] <= now]:
            pending.remove((when, key, payload))
            assert hb.pong_received(key, payload, when) == pytest.approx(rtt)
        for action, key, payload in hb.due(now):
            log.append((now, action, key, payload))
            if action == PING and key in answering:
                pending.append((now + rtt, key, payload))
    return log


def assert_forgotten(hb: Heartbeat) -> None:
    assert hb._peers == {}
    assert len(hb._wheel) == 0
    assert hb._wheel._overdue == {} and not any(hb._wheel._slots)


class TestPings:
    def test_pings_come_every_interval_with_jitter(self):
        hb = make(ping_interval=30.0, pong_timeout=60.0, jitter=0.1)
        hb.register("c", 0.0)
        times = [t for t, action, key, _ in run(hb, 0.0, 600.0, answering={"c"}) if action == PING]
        assert 0.0 < times[0] <= 30.0 + TICK
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert len(gaps) >= 17
        assert all(27.0 - TICK <= gap <= 33.0 + TICK for gap in gaps), gaps
        assert len(set(gaps)) > 5  # jittered, not a fixed period

    def test_payloads_are_8_bytes_and_unique_across_peers(self):
        hb = make(ping_interval=5.0, pong_timeout=10.0)
        for i in range(200):
            hb.register(i, 0.0)
        payloads = [p for _, action, _, p in run(hb, 0.0, 30.0, answering=set(range(200))) if action == PING]
        assert len(payloads) >= 200 * 5
        assert all(isinstance(p, bytes) and len(p) == 8 for p in payloads)
        assert len(set(payloads)) == len(payloads)

    def test_first_pings_of_a_burst_spread_over_one_interval(self):
        hb = make(ping_interval=30.0, pong_timeout=60.0)
        for i in range(100_000):
            hb.register(i, 0.0)
        first = Counter()
        for now, action, key, _ in run(hb, 0.0, 30.0 + TICK):
            first[now] += action == PING
        assert sum(first.values()) == 100_000  # every peer pinged within its first interval
        per_tick = 100_000 * TICK / 30.0
        assert max(first.values()) < 1.25 * per_tick  # no tick carries more than its share

    def test_zero_interval_disables_pings_and_dead_detection(self):
        hb = make(ping_interval=0.0, idle_timeout=100.0, jitter=0.0)
        hb.register("c", 0.0)
        assert run(hb, 0.0, 99.5) == []
        assert run(hb, 99.5, 101.0) == [(100.5, IDLE, "c", None)]

    def test_nothing_enabled_means_nothing_scheduled(self):
        hb = make(ping_interval=0.0)
        hb.register("c", 0.0)
        assert len(hb._wheel) == 0 and run(hb, 0.0, 50.0) == []
        assert hb.unregister("c") and hb._peers == {}


class TestPongs:
    def test_matching_pong_returns_the_round_trip_time(self):
        hb = make(ping_interval=10.0, pong_timeout=20.0)
        hb.register("c", 0.0)
        (now, action, key, payload), = run(hb, 0.0, 10.0)
        assert hb.pong_received("c", payload, now + 0.125) == pytest.approx(0.125)

    def test_stale_duplicate_foreign_and_unknown_pongs_are_ignored(self):
        hb = make(ping_interval=10.0, pong_timeout=20.0)
        hb.register("c", 0.0)
        (now, _, _, payload), = run(hb, 0.0, 10.0)
        assert hb.pong_received("c", b"upstream", now) is None  # not ours: the ping stays open
        assert hb.pong_received("other", payload, now) is None
        assert hb.pong_received("c", payload, now + 1) == pytest.approx(1.0)
        assert hb.pong_received("c", payload, now + 2) is None  # duplicate
        # The next ping gets a new payload; the old one no longer matches.
        pings = [p for _, action, _, p in run(hb, 10.0, 25.0) if action == PING]
        assert pings and payload not in pings
        assert hb.pong_received("c", payload, 25.0) is None

    def test_late_pong_brings_the_overdue_ping_forward(self):
        hb = make(ping_interval=10.0, pong_timeout=60.0, jitter=0.0)
        hb.register("c", 0.0)
        (first, _, _, payload), = run(hb, 0.0, 10.0)
        assert run(hb, 10.0, 30.0) == []  # the next ping waits while one is unanswered
        assert hb.pong_received("c", payload, 30.0) == pytest.approx(30.0 - first)
        assert [action for _, action, _, _ in run(hb, 30.0, 30.5)] == [PING]


class TestDeadPeers:
    def test_silent_peer_is_dead_one_pong_timeout_after_its_ping(self):
        hb = make(ping_interval=5.0, pong_timeout=8.0)
        hb.register("mute", 0.0)
        log = run(hb, 0.0, 30.0)
        (ping_at, _, _, _), (dead_at, action, key, payload) = log
        assert (action, key, payload) == (DEAD, "mute", None)
        assert ping_at + 8.0 < dead_at <= ping_at + 8.0 + TICK
        assert "mute" not in hb and len(hb) == 0
        assert_forgotten(hb)
        assert hb.unregister("mute") is False  # the transport's later cleanup is harmless

    def test_answering_peer_stays_alive_and_silent_one_dies(self):
        hb = make(ping_interval=5.0, pong_timeout=5.0)
        hb.register("echo", 0.0)
        hb.register("mute", 0.0)
        log = run(hb, 0.0, 300.0, answering={"echo"})
        assert [(a, k) for _, a, k, _ in log if a != PING] == [(DEAD, "mute")]
        assert "echo" in hb
        assert sum(1 for _, a, k, _ in log if a == PING and k == "echo") >= 54

    def test_detected_within_ping_interval_plus_pong_timeout(self):
        # The bound, for every phase of the first ping.
        for seed in range(50):
            hb = make(seed=seed, ping_interval=3.0, pong_timeout=2.0)
            hb.register("mute", 0.0)
            (dead_at, _, _, _), = [e for e in run(hb, 0.0, 20.0) if e[1] == DEAD]
            assert dead_at <= 3.0 + 2.0 + TICK

    def test_traffic_is_not_a_pong_by_default(self):
        hb = make(ping_interval=5.0, pong_timeout=5.0)
        hb.register("c", 0.0)
        (ping_at, _, _, _), = run(hb, 0.0, 5.0)
        hb.saw_traffic("c", ping_at + 1)
        assert [a for _, a, _, _ in run(hb, 5.0, 20.0)] == [DEAD]

    def test_traffic_counts_as_liveness_when_enabled(self):
        hb = make(ping_interval=5.0, pong_timeout=5.0, traffic_is_liveness=True, jitter=0.0)
        hb.register("talker", 0.0)
        hb.register("both", 0.0)
        pings = {key: (at, payload) for at, _, key, payload in run(hb, 0.0, 5.0)}
        for key, (at, _) in pings.items():
            hb.saw_traffic(key, at + 1)
        # Answered by traffic, the ping's real pong still matches and measures the RTT.
        at, payload = pings["both"]
        assert hb.pong_received("both", payload, at + 2) == pytest.approx(2.0)
        # No verdict where the pong deadline was; the talker is then silent, and dies.
        log = run(hb, 5.0, 30.0)
        verdicts = [(a, k) for _, a, k, _ in log if a != PING]
        assert sorted(verdicts) == [(DEAD, "both"), (DEAD, "talker")]
        first_dead = min(t for t, a, _, _ in log if a == DEAD)
        assert first_dead > min(at for at, _ in pings.values()) + 10.0  # a second ping timed out


class TestIdleAndAge:
    def test_idle_limit_is_jittered_down_and_postponed_by_traffic(self):
        for seed in range(20):
            hb = make(seed=seed, ping_interval=0.0, idle_timeout=100.0, jitter=0.1)
            hb.register("c", 0.0)
            hb.saw_traffic("c", 50.0)
            (idle_at, action, _, _), = run(hb, 0.0, 200.0)
            assert action == IDLE
            assert 50.0 + 90.0 < idle_at <= 50.0 + 100.0 + TICK
            assert_forgotten(hb)

    def test_pings_and_pongs_do_not_keep_a_connection_from_idling(self):
        hb = make(ping_interval=10.0, pong_timeout=10.0, idle_timeout=60.0, jitter=0.0)
        hb.register("c", 0.0)
        log = run(hb, 0.0, 100.0, answering={"c"})
        assert [(t, a) for t, a, _, _ in log if a != PING] == [(60.5, IDLE)]

    def test_age_limit_closes_even_a_busy_connection(self):
        for seed in range(20):
            hb = make(seed=seed, ping_interval=10.0, pong_timeout=10.0, max_connection_age=300.0)
            hb.register("c", 1000.0)
            log = run(hb, 1000.0, 1400.0, answering={"c"}, busy={"c"})
            (age_at, action, key, _), = [e for e in log if e[1] != PING]
            assert (action, key) == (AGE_EXPIRED, "c")
            assert 1000.0 + 270.0 < age_at <= 1000.0 + 300.0 + TICK
            assert_forgotten(hb)

    def test_age_limits_of_a_burst_are_spread(self):
        hb = make(ping_interval=0.0, max_connection_age=1000.0, jitter=0.1)
        for i in range(1000):
            hb.register(i, 0.0)
        times = [t for t, _, _, _ in run(hb, 0.0, 1001.0)]
        assert len(times) == 1000 and min(times) > 900.0 and max(times) <= 1000.5
        assert max(Counter(times).values()) < 20


class TestLifecycle:
    def test_unregister_frees_everything(self):
        hb = make(ping_interval=5.0, pong_timeout=5.0, idle_timeout=50.0, max_connection_age=500.0)
        for i in range(1000):
            hb.register(i, 0.0)
        run(hb, 0.0, 7.0, answering=set(range(0, 1000, 2)))
        for i in range(1000):
            if i in hb:
                assert hb.unregister(i)
        assert_forgotten(hb)
        assert hb.unregister(0) is False

    def test_register_twice_is_an_error(self):
        hb = make()
        hb.register("c", 0.0)
        with pytest.raises(ValueError, match="already registered"):
            hb.register("c", 1.0)

    def test_calls_for_unknown_keys_are_no_ops(self):
        hb = make()
        hb.saw_traffic("ghost", 1.0)
        assert hb.pong_received("ghost", b"12345678", 1.0) is None
        assert hb.unregister("ghost") is False
        assert len(hb) == 0

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"ping_interval": -1.0}, "ping_interval"),
            ({"idle_timeout": -1.0}, "idle_timeout"),
            ({"max_connection_age": float("nan")}, "max_connection_age"),
            ({"pong_timeout": 0.0}, "pong_timeout"),
            ({"stall_grace": 0.0}, "stall_grace"),
            ({"jitter": 1.0}, "jitter"),
            ({"jitter": -0.1}, "jitter"),
            ({"stall_grace": 0.5, "tick": 0.5}, "longer than a tick"),
        ],
    )
    def test_rejects_bad_settings(self, options, message):
        with pytest.raises(ValueError, match=message):
            make(**options)


class TestClockTrouble:
    def test_stall_postpones_dead_verdict_so_buffered_pongs_count(self):
        hb = make(ping_interval=5.0, pong_timeout=5.0, stall_grace=2.0)
        hb.register("c", 0.0)
        (ping_at, _, _, payload), = run(hb, 0.0, 5.0)
        # The loop is blocked for 30 s; the pong waits in the socket buffer.
        assert hb.due(35.0) == []
        # The transport reads it in the next loop iteration.
        assert hb.pong_received("c", payload, 35.01) == pytest.approx(35.01 - ping_at)
        assert DEAD not in [a for _, a, _, _ in run(hb, 35.0, 40.0, answering={"c"})]

    def test_stall_postpones_but_does_not_pardon(self):
        hb = make(ping_interval=5.0, pong_timeout=5.0, stall_grace=2.0)
        hb.register("c", 0.0)
        run(hb, 0.0, 5.0)
        assert hb.due(35.0) == []
        log = run(hb, 35.0, 40.0)
        assert [(t, a) for t, a, _, _ in log] == [(37.5, DEAD)]  # 35 + grace, next tick

    def test_stall_postpones_idle_but_not_age(self):
        hb = make(ping_interval=0.0, idle_timeout=10.0, max_connection_age=10.0, jitter=0.0, stall_grace=2.0)
        hb.register("idle-only", 0.0)
        hb2 = make(ping_interval=0.0, idle_timeout=10.0, jitter=0.0, stall_grace=2.0)
        hb2.register("idle", 0.0)
        assert hb.due(30.0) == [(AGE_EXPIRED, "idle-only", None)]
        assert hb2.due(30.0) == []
        hb2.saw_traffic("idle", 30.01)  # buffered data read after the stall
        assert run(hb2, 30.0, 39.5) == []
        assert [a for _, a, _, _ in run(hb2, 39.5, 41.0)] == [IDLE]

    def test_clock_stepping_back_delays_but_never_hastens_or_spins(self):
        hb = make(ping_interval=5.0, pong_timeout=5.0, jitter=0.0)
        for i in range(100):
            hb.register(i, 1000.0)
        assert {a for _, a, _, _ in run(hb, 1000.0, 1004.0)} == {PING}  # most await a pong
        woken = []
        advance = hb._wheel.advance

        def counting_advance(now):
            keys = advance(now)
            woken.extend(keys)
            return keys

        hb._wheel.advance = counting_advance
        assert run(hb, 900.0, 1000.0) == []  # the clock stepped back 106 s: no verdict early
        assert len(woken) <= 100  # each peer looked at once, then re-armed for its deadline
        late = run(hb, 1000.0, 1012.0)
        assert sorted(k for _, a, k, _ in late if a == DEAD) == list(range(100))


# ---------------------------------------------------------------------------
# property test: random traffic, pongs and unregisters; the contract holds


events = st.lists(
    st.tuples(
        # ticks weigh more, so examples reach pong, idle and age deadlines
        st.sampled_from(["register", "unregister", "traffic", "pong", "pong all", "tick", "tick", "tick"]),
        st.integers(0, 5),
        st.floats(0.0, 4.0),
    ),
    min_size=60,
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(events=events, seed=st.integers(0, 2**32), liveness=st.booleans())
def test_contract_under_random_events(events, seed, liveness):
    interval, timeout, idle, age = 4.0, 3.0, 10.0, 14.0
    hb = make(seed=seed, ping_interval=interval, pong_timeout=timeout, idle_timeout=idle,
              max_connection_age=age, traffic_is_liveness=liveness, stall_grace=100.0)
    now = 0.0
    registered_at: dict = {}
    last_traffic: dict = {}
    outstanding: dict = {}  # key -> (payload, sent at)
    answered_at: dict = {}
    seen_payloads = set()
    for key in range(4):  # some peers from the start; events add and remove more
        hb.register(key, now)
        registered_at[key] = last_traffic[key] = now
    for kind, key, value in events:
        if kind == "register" and key not in hb:
            hb.register(key, now)
            registered_at[key] = last_traffic[key] = now
            outstanding.pop(key, None)
        elif kind == "unregister":
            assert hb.unregister(key) == (key in registered_at)
            registered_at.pop(key, None)
            outstanding.pop(key, None)
            answered_at.pop(key, None)
        elif kind == "traffic" and key in registered_at:
            hb.saw_traffic(key, now)
            last_traffic[key] = now
            if liveness and key in outstanding:
                answered_at[key] = now
        elif kind == "pong" or kind == "pong all":
            for k in [key] if kind == "pong" else list(outstanding):
                if k in outstanding:
                    payload, sent = outstanding.pop(k)
                    assert hb.pong_received(k, payload, now) == pytest.approx(now - sent)
                    assert hb.pong_received(k, payload, now) is None
        elif kind == "tick":
            now += value
            for action, k, payload in hb.due(now):
                event(action)
                assert k in registered_at
                if action == PING:
                    assert payload not in seen_payloads and len(payload) == 8
                    seen_payloads.add(payload)
                    assert k not in outstanding or answered_at.get(k, -1) >= outstanding[k][1]
                    outstanding[k] = (payload, now)
                    continue
                assert payload is None
                if action == DEAD:
                    payload_sent = outstanding[k][1]
                    assert now - payload_sent > timeout  # never early
                    assert answered_at.get(k, -1) < payload_sent
                elif action == IDLE:
                    assert now - last_traffic[k] > idle * 0.9
                else:
                    assert action == AGE_EXPIRED and now - registered_at[k] > age * 0.9
                del registered_at[k]
                outstanding.pop(k, None)
        assert set(registered_at) == set(hb._peers)
    for key in list(registered_at):
        assert hb.unregister(key)
    assert_forgotten(hb)

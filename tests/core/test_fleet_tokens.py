"""The instance's side of the fleet bucket (sans-IO): leases, spending, Retry-After, fallback."""

from __future__ import annotations

from edgeproxy.core.fleet_admission import LEASE_TTL, PROBE_INTERVAL, FleetTokens, LeaseAnswer, lease_size


def test_lease_size_is_10_ms_of_the_rate_and_at_least_one() -> None:
    assert lease_size(1) == 1 and lease_size(100) == 1 and lease_size(150) == 2 and lease_size(1000) == 10


def test_admits_from_the_leased_pool_and_asks_again_when_it_runs_low() -> None:
    f = FleetTokens(rate=2000, burst=0, now=0.0)
    assert f.available(0.0) is False
    assert f.want_lease(0.0) == 20
    assert f.want_lease(0.0) == 0  # one lease at a time
    f.granted(LeaseAnswer(20, 0.0, 0.0, 3), 0.001)
    for _ in range(9):
        assert f.available(0.001)
        f.spend(0.001)
    assert f.want_lease(0.001) == 0  # 11 of 20 left
    f.spend(0.001)
    assert f.want_lease(0.001) == 20  # half the batch is gone: top up in the background
    f.granted(LeaseAnswer(5, 0.0, 0.0, 3), 0.002)
    assert f.tokens == 15 and f.active == 3


def test_an_empty_fleet_bucket_is_not_asked_before_it_has_a_token() -> None:
    f = FleetTokens(rate=100, burst=0, now=0.0)
    f.want_lease(0.0)
    f.granted(LeaseAnswer(0, 0.5, 0.0, 2), 0.0)
    assert f.available(0.1) is False and f.want_lease(0.1) == 0
    assert f.want_lease(0.5) == 1


def test_an_unspent_pool_is_renewed_and_serves_until_the_new_batch_arrives() -> None:
    f = FleetTokens(rate=200, burst=0, now=0.0)
    f.want_lease(0.0)
    f.granted(LeaseAnswer(2, 0.0, 0.0, 1), 0.0)
    assert f.want_lease(LEASE_TTL / 2) == 0
    late = LEASE_TTL + 0.01
    assert f.want_lease(late) == 2  # stale: renew (the tick does this on an idle instance)
    assert f.available(late)  # the old batch serves meanwhile: no refusal after an idle second
    f.granted(LeaseAnswer(2, 0.0, 0.0, 1), late)
    assert f.tokens == 2 and f.leased_at == late  # the stale ones are dropped, not added


def test_retry_after_books_the_instances_share_after_the_fleets_queue() -> None:
    f = FleetTokens(rate=100, burst=0, now=0.0)  # 3 instances: this one's share is 33.3/s
    f.want_lease(0.0)
    f.granted(LeaseAnswer(0, 0.01, 4.0, 3), 0.0)  # the fleet's queue already ends 4 s from now
    retries = [f.refuse(0.0) for _ in range(100)]
    assert retries[0] >= 4.0
    assert abs(retries[-1] - (4.0 + 99 * 3 / 100)) < 1e-6  # one 1/share slot each
    assert f.reported() == 100 and f.reported() == 0


def test_fallback_admits_at_the_share_and_ends_with_the_first_lease() -> None:
    f = FleetTokens(rate=90, burst=30, now=0.0)
    f.want_lease(0.0)
    f.granted(LeaseAnswer(2, 0.0, 0.0, 3), 0.0)
    f.want_lease(0.0)
    assert f.lost(0.0) is True and f.lost(0.0) is False  # the first failure starts it, once
    assert f.tokens == 0 and f.fallback.rate == 30 and f.fallback.burst == 10
    admitted = 0
    for i in range(1000):  # 10 s of attempts, 100/s
        now = i / 100
        if f.available(now):
            f.spend(now)
            admitted += 1
        elif f.want_lease(now):
            f.lost(now)
    assert 10 + 30 * 9.99 - 1 <= admitted <= 10 + 30 * 10 + 1  # burst + share * time
    assert f.want_lease(10.0) == 0 and f.want_lease(10.0 + PROBE_INTERVAL) == 1
    assert f.granted(LeaseAnswer(1, 0.0, 0.0, 3), 11.0) is True and f.fallback is None


def test_a_fleet_never_reached_falls_back_to_the_whole_budget() -> None:
    f = FleetTokens(rate=50, burst=0, now=0.0)
    f.want_lease(0.0)
    f.lost(0.0)
    assert f.fallback.rate == 50 and f.fallback.burst == 50


def test_fleet_lease_refills_grants_queues_and_counts_members() -> None:
    from edgeproxy.core.fleet_admission import fleet_lease

    state, answer = fleet_lease(None, 1000.0, rate=10, burst=5, want=3, refused=0, instance="a", member_ttl_ms=10_000)
    assert answer == (3, 0, 0, 1) and state["t"] == 2  # a new bucket is full
    state, answer = fleet_lease(state, 1000.0, 10, 5, 3, 0, "b", 10_000)
    assert answer == (2, 100, 0, 2) and state["t"] == 0  # empty: a token in 100 ms
    state, answer = fleet_lease(state, 1050.0, 10, 5, 3, 4, "a", 10_000)
    assert answer == (0, 50, 400, 2)  # half a token; 4 refusals queue 400 ms at 10/s
    state, answer = fleet_lease(state, 20_000.0, 10, 5, 1, 0, "a", 10_000)
    assert answer == (1, 0, 0, 1) and state["t"] == 4  # refilled to the burst; b went silent
    # a clock behind the stamp (another instance's) refills nothing and keeps the stamp
    state, answer = fleet_lease(state, 19_000.0, 10, 5, 1, 0, "c", 10_000)
    assert answer[0] == 1 and state["t"] == 3 and state["s"] == 20_000.0


def test_the_batch_doubles_while_the_pool_runs_dry_and_halves_when_leases_expire() -> None:
    f = FleetTokens(rate=400, burst=0, now=0.0)  # batches of 4, up to 20
    now = 0.0
    for expected in (4, 8, 16, 20, 20):
        assert f.want_lease(now) == expected
        assert f.available(now) is False  # dry while the lease is on its way
        f.granted(LeaseAnswer(expected, 0.0, 0.0, 1), now)
        while f.available(now):
            f.spend(now)
    f.want_lease(now)
    f.granted(LeaseAnswer(20, 0.0, 0.0, 1), now)  # not starved: stays
    assert f.lease == 20
    later = now + LEASE_TTL + 0.1
    assert f.want_lease(later) == 20  # unspent for a whole LEASE_TTL: renewed ...
    f.granted(LeaseAnswer(20, 0.0, 0.0, 1), later)
    assert f.lease == 10  # ... and the batch halves

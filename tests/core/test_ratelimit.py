"""The per-client buckets of a route's rate_limit: answers, refill, a bounded table."""

from __future__ import annotations

import pytest

from edgeproxy.core.ratelimit import ClientBuckets


def test_burst_then_refusals_with_the_wait_until_a_token():
    buckets = ClientBuckets(rate=2.0, burst=3, table_size=10)
    assert [buckets.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", 0.0) == pytest.approx(0.5)
    assert buckets.take("a", 0.25) == pytest.approx(0.25)
    assert buckets.take("a", 0.5) == 0.0  # one token refilled at 2/s
    assert buckets.take("b", 0.5) == 0.0  # another address: a bucket of its own


def test_refused_requests_take_nothing():
    buckets = ClientBuckets(rate=1.0, burst=1, table_size=10)
    assert buckets.take("a", 0.0) == 0.0
    for _ in range(5):
        assert buckets.take("a", 0.5) == pytest.approx(0.5)
    assert buckets.take("a", 1.0) == 0.0


def test_expire_drops_only_full_buckets():
    buckets = ClientBuckets(rate=1.0, burst=2, table_size=10)
    buckets.take("old", 0.0)
    buckets.take("new", 1.5)
    assert buckets.expire(1.9) == 0  # "old" refills at 2.0 (burst / rate after its last use)
    assert buckets.expire(2.0) == 1 and len(buckets) == 1
    assert buckets.expire(3.5) == 1 and len(buckets) == 0


def test_the_table_is_bounded_least_recently_used_out():
    buckets = ClientBuckets(rate=0.001, burst=1, table_size=3)
    for ip in ("a", "b", "c"):
        assert buckets.take(ip, 0.0) == 0.0
    assert buckets.take("a", 0.0) > 0  # "a" used again: now the most recent
    buckets.take("d", 0.0)  # pushes out "b", the least recently used
    assert len(buckets) == 3
    assert buckets.take("a", 0.0) > 0 and buckets.take("c", 0.0) > 0
    assert buckets.take("b", 0.0) == 0.0  # forgotten: a fresh bucket (the documented cost of the bound)


def test_table_size_must_be_positive():
    with pytest.raises(ValueError):
        ClientBuckets(rate=1.0, burst=1, table_size=0)

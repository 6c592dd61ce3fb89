"""core.admission: token buckets and the admission decisions, with time passed in."""

from __future__ import annotations

import collections
import random

import pytest

from edgeproxy.core.admission import (
    CAP_RETRY_WINDOW, MAX_RETRY_AFTER, Admission, AdmissionPolicy, TokenBucket, book_retry, retry_after_header,
)


def test_bucket_starts_full_and_refills_at_rate():
    b = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(0.0) == pytest.approx(0.5)  # one token in 1/rate seconds
    assert b.take(0.25) == pytest.approx(0.25)
    assert b.take(0.5) == 0.0
    # never above burst, however long it rests
    b.take(100.0)
    assert b.tokens == pytest.approx(2.0)


def test_bucket_charge_goes_into_debt_and_says_how_long():
    b = TokenBucket(rate=10.0, burst=10, now=0.0)
    assert b.charge(0.0, 5) == 0.0
    assert b.charge(0.0, 25) == pytest.approx(2.0)  # 20 tokens of debt at 10/s
    assert b.wait(1.0, 0) == pytest.approx(1.0)
    assert b.wait(2.0, 0) == 0.0


def test_bucket_rejects_nonsense():
    with pytest.raises(ValueError):
        TokenBucket(0, 1, 0.0)


def test_max_connections_and_release():
    a = Admission(AdmissionPolicy(max_connections=2))
    assert a.admit("1.1.1.1", 0).admitted and a.admit("2.2.2.2", 0).admitted
    v = a.admit("3.3.3.3", 0)
    assert (v.admitted, v.reason) == (False, "max_connections")
    a.release("1.1.1.1")
    assert a.admit("3.3.3.3", 0).admitted
    assert a.refused == {"max_connections": 1}


def test_max_connections_per_ip():
    a = Admission(AdmissionPolicy(max_connections_per_ip=1))
    assert a.admit("1.1.1.1", 0).admitted
    assert a.admit("1.1.1.1", 0).reason == "max_connections_per_ip"
    assert a.admit("2.2.2.2", 0).admitted
    a.release("1.1.1.1")
    assert a.per_ip == {"2.2.2.2": 1}
    assert a.admit("1.1.1.1", 0).admitted


def test_instance_rate_gives_a_computed_retry_after():
    a = Admission(AdmissionPolicy(rate=10.0, burst=5))
    assert all(a.admit(f"10.0.0.{i}", 0.0).admitted for i in range(5))
    v = a.admit("10.0.0.9", 0.0)
    assert (v.admitted, v.reason) == (False, "rate")
    assert v.retry_after == pytest.approx(0.1)
    assert retry_after_header(v.retry_after) == b"1"
    assert a.admit("10.0.0.9", 0.1).admitted


def test_storm_is_paced_at_the_rate():
    """1000 connection attempts within one second against rate 100 / burst 10."""
    a = Admission(AdmissionPolicy(rate=100.0, burst=10))
    admitted = sum(a.admit(f"ip{i}", i / 1000).admitted for i in range(1000))
    assert 105 <= admitted <= 111  # burst + rate x 1 s
    for i in range(1000):
        a.release(f"ip{i}") if f"ip{i}" in a.per_ip else None
    assert a.open == 0


def test_ip_rate_is_per_address_and_does_not_spend_on_refusal():
    a = Admission(AdmissionPolicy(ip_rate=1.0, ip_burst=2, rate=100.0, burst=3))
    assert a.admit("1.1.1.1", 0).admitted and a.admit("1.1.1.1", 0).admitted
    v = a.admit("1.1.1.1", 0)
    assert v.reason == "ip_rate" and v.retry_after == pytest.approx(1.0)
    assert a.admit("2.2.2.2", 0).admitted  # another address is not affected
    # the instance bucket (3) is empty now: 4.4.4.4 is refused by it, and its own bucket stays full
    assert a.admit("4.4.4.4", 0).reason == "rate"
    assert a._ip_buckets.get("4.4.4.4") is None or a._ip_buckets["4.4.4.4"].tokens == 2


def test_retry_after_header_rounds_up():
    assert retry_after_header(0.0) == b"1"
    assert retry_after_header(2.01) == b"3"


def test_buckets_expire_once_full_and_the_table_is_bounded():
    a = Admission(AdmissionPolicy(ip_rate=1.0, ip_burst=4, table_size=100))
    for i in range(500):
        assert a.admit(f"10.0.{i // 256}.{i % 256}", i * 0.001).admitted
        a.release(f"10.0.{i // 256}.{i % 256}")
    assert a.tracked_addresses == 100  # bounded by table_size
    assert a.expire(1.0) == 0  # nothing has refilled yet (4 s from one token short)
    assert a.expire(10.0) == 100
    assert a.tracked_addresses == 0


def test_policy_enabled():
    assert not AdmissionPolicy().enabled
    assert AdmissionPolicy(max_connections=1).enabled


# -- Retry-After spread ------------------------------------------------------------------

def _header_values(verdicts) -> collections.Counter:
    return collections.Counter(int(retry_after_header(v.retry_after)) for v in verdicts)


def _assert_spread(values: collections.Counter, window: range, refused: int) -> None:
    """Every whole second of ``window`` is used and none holds more than twice its fair share."""
    assert set(values) == set(window), sorted(values)
    share = refused / len(window)
    assert max(values.values()) <= 2 * share, values


def test_a_rate_storm_is_told_to_come_back_at_the_pace_of_the_bucket():
    """1,000 refused at once by rate 100/s: returns spread over 1..10 s, about 100 a second."""
    a = Admission(AdmissionPolicy(rate=100.0, burst=10), rng=random.Random(1).random)
    verdicts = [a.admit(f"ip{i}", 0.0) for i in range(1010)]
    refused = [v for v in verdicts if not v.admitted]
    assert len(refused) == 1000 and {v.reason for v in refused} == {"rate"}
    values = _header_values(refused)
    # slots of 10 ms from the first token (10 ms away) on: (0.01, 10.01] s, so 1..11 whole seconds
    _assert_spread(values, range(1, 12), 1000)
    assert max(values.values()) <= 101 and values[11] <= 2  # what the bucket admits in a second


def test_a_rate_queue_longer_than_the_cap_spreads_over_the_whole_window():
    a = Admission(AdmissionPolicy(rate=10.0, burst=1), rng=random.Random(2).random)
    refused = [v for v in (a.admit(f"ip{i}", 0.0) for i in range(1001)) if not v.admitted]
    assert len(refused) == 1000
    _assert_spread(_header_values(refused), range(1, int(MAX_RETRY_AFTER) + 1), 1000)


def test_cap_refusals_spread_over_the_cap_window():
    a = Admission(AdmissionPolicy(max_connections=1), rng=random.Random(3).random)
    assert a.admit("first", 0.0).admitted
    refused = [a.admit(f"ip{i}", 0.0) for i in range(1000)]
    assert {v.reason for v in refused} == {"max_connections"}
    _assert_spread(_header_values(refused), range(1, int(CAP_RETRY_WINDOW) + 1), 1000)


def test_ip_rate_refusals_are_jittered_past_the_token_wait():
    a = Admission(AdmissionPolicy(ip_rate=0.25, ip_burst=1), rng=random.Random(4).random)
    assert a.admit("1.1.1.1", 0.0).admitted
    refused = [a.admit("1.1.1.1", 0.0) for _ in range(1000)]
    assert {v.reason for v in refused} == {"ip_rate"}
    assert all(4.0 <= v.retry_after < 8.0 for v in refused)  # the token in 4 s, plus up to 1/ip_rate
    _assert_spread(_header_values(refused), range(5, 9), 1000)


def test_book_retry_books_consecutive_slots_and_caps_the_queue():
    retry, end = book_retry(0.0, 10.0, 0.5, 2.0, None)
    assert (retry, end) == (0.5, 11.0)
    retry, end = book_retry(end, 10.0, 0.5, 2.0, None)
    assert (retry, end) == (1.0, 11.5)  # the next half-second slot
    retry, end2 = book_retry(10.0 + MAX_RETRY_AFTER, 10.0, 0.5, 2.0, lambda: 0.5)
    assert end2 == 10.0 + MAX_RETRY_AFTER and retry == pytest.approx(0.5 + (MAX_RETRY_AFTER - 0.5) / 2)


def test_reconfigure_keeps_the_open_connections_counted():
    a = Admission(AdmissionPolicy(max_connections=3, rate=10.0, burst=2))
    assert a.admit("a", 0.0).admitted and a.admit("a", 0.0).admitted
    a.reconfigure(AdmissionPolicy(max_connections=2, rate=10.0, burst=5), 0.0)
    assert a.open == 2 and a.per_ip == {"a": 2}
    assert a.admit("b", 0.0).reason == "max_connections"
    a.release("a")
    assert a.admit("b", 0.0).reason == "rate"  # the bucket kept its (spent) tokens across the reload
    assert a.admit("b", 0.1).admitted

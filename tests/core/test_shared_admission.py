"""core.shared_admission: the instance-wide table, over a bytearray, with time and randomness passed in.

Two `SharedAdmission` over one buffer are two workers of one instance.
"""

from __future__ import annotations

import collections
import contextlib
import random

import pytest

from edgeproxy.core.admission import Admission, AdmissionPolicy, retry_after_header
from edgeproxy.core.shared_admission import SharedAdmission, SharedLayout, init_table, release_worker

NO_LOCK = contextlib.nullcontext()


def table(workers: int = 2, capacity: int = 1024) -> tuple[bytearray, SharedLayout]:
    layout = SharedLayout(workers, capacity)
    buf = bytearray(layout.size)
    init_table(buf, layout, b"k" * 16)
    return buf, layout


def workers(policy: AdmissionPolicy, n: int = 2, capacity: int = 1024, rng=None):
    buf, layout = table(n, capacity)
    return buf, layout, [SharedAdmission(policy, buf, i, NO_LOCK, rng=rng) for i in range(n)]


def test_max_connections_holds_for_the_instance_not_per_worker():
    _, _, (a, b) = workers(AdmissionPolicy(max_connections=3))
    assert a.admit("1.1.1.1", 0).admitted and b.admit("2.2.2.2", 0).admitted and b.admit("3.3.3.3", 0).admitted
    assert a.admit("4.4.4.4", 0).reason == "max_connections"
    assert b.admit("4.4.4.4", 0).reason == "max_connections"
    assert (a.open, a.open_here, b.open_here) == (3, 1, 2)
    b.release("2.2.2.2")
    assert a.admit("4.4.4.4", 0).admitted
    assert a.refused == {"max_connections": 1} and b.refused == {"max_connections": 1}


def test_max_connections_per_ip_counts_every_worker():
    _, _, (a, b) = workers(AdmissionPolicy(max_connections_per_ip=2))
    assert a.admit("1.1.1.1", 0).admitted and b.admit("1.1.1.1", 0).admitted
    assert a.admit("1.1.1.1", 0).reason == "max_connections_per_ip"
    assert b.admit("1.1.1.1", 0).reason == "max_connections_per_ip"
    assert a.admit("2.2.2.2", 0).admitted
    a.release("1.1.1.1")
    assert b.admit("1.1.1.1", 0).admitted
    assert b.per_ip == {"1.1.1.1": 2} and a.per_ip == {"2.2.2.2": 1}


def test_the_connection_rate_is_one_bucket_for_the_instance():
    _, _, (a, b) = workers(AdmissionPolicy(rate=10.0, burst=4))
    verdicts = [(a if i % 2 else b).admit(f"10.0.0.{i}", 0.0) for i in range(6)]
    assert [v.admitted for v in verdicts] == [True] * 4 + [False] * 2
    assert verdicts[4].reason == "rate" and verdicts[4].retry_after == pytest.approx(0.1)
    assert verdicts[5].retry_after == pytest.approx(0.2)  # the next slot of the shared queue
    assert a.admit("x", 0.1).admitted and b.admit("y", 0.2).admitted


def test_ip_rate_is_per_address_across_workers_and_a_refusal_costs_no_token():
    _, _, (a, b) = workers(AdmissionPolicy(ip_rate=1.0, ip_burst=2, rate=100.0, burst=3))
    assert a.admit("1.1.1.1", 0).admitted and b.admit("1.1.1.1", 0).admitted
    v = a.admit("1.1.1.1", 0)
    assert v.reason == "ip_rate" and v.retry_after == pytest.approx(1.0)
    assert b.admit("2.2.2.2", 0).admitted
    assert a.admit("4.4.4.4", 0).reason == "rate"  # the instance bucket (3) is empty...
    assert b.admit("4.4.4.4", 0.01).admitted and b.admit("4.4.4.4", 0.02).admitted  # ...4.4.4.4 kept its 2


def test_a_dead_worker_gives_its_connections_and_address_shares_back():
    buf, layout, (a, b) = workers(AdmissionPolicy(max_connections=5, max_connections_per_ip=2))
    assert a.admit("1.1.1.1", 0).admitted and a.admit("1.1.1.1", 0).admitted and a.admit("2.2.2.2", 0).admitted
    assert b.admit("3.3.3.3", 0).admitted
    assert b.admit("1.1.1.1", 0).reason == "max_connections_per_ip"
    assert release_worker(buf, layout, 0) == (3, 2)  # worker 0 died holding 3 connections of 2 addresses
    assert b.open == 1
    assert b.admit("1.1.1.1", 0).admitted and b.admit("1.1.1.1", 0).admitted
    assert b.admit("1.1.1.1", 0).reason == "max_connections_per_ip"
    assert b.admit("2.2.2.2", 0).admitted and b.admit("2.2.2.2", 0).admitted
    assert b.admit("4.4.4.4", 0).reason == "max_connections"
    assert release_worker(buf, layout, 0) == (0, 0)  # nothing twice
    fresh = SharedAdmission(AdmissionPolicy(max_connections=5, max_connections_per_ip=2), buf, 0, NO_LOCK)
    fresh.release("1.1.1.1")  # never admitted by this one: nothing happens
    assert fresh.open == 5


def test_addresses_holding_connections_are_never_evicted_and_a_full_window_refuses():
    _, _, (a,) = workers(AdmissionPolicy(max_connections_per_ip=5), n=1, capacity=1)  # one slot in all
    assert a.admit("10.0.0.1", 0).admitted and a.admit("10.0.0.1", 0).admitted
    v = a.admit("10.9.9.9", 0)
    assert (v.admitted, v.reason) == (False, "ip_table_full")
    assert a.admit("10.0.0.1", 0).admitted  # the tracked one goes on
    a.release("10.0.0.1")
    a.release("10.0.0.1")
    assert a.admit("10.9.9.9", 0).reason == "ip_table_full"  # 10.0.0.1 still has one open
    a.release("10.0.0.1")
    assert a.admit("10.9.9.9", 0).admitted  # its slot was free: taken over
    assert a.admit("10.0.0.1", 0).reason == "ip_table_full"
    assert a.refused == {"ip_table_full": 3}


def test_a_small_table_fills_only_to_its_slots():
    _, layout, (a,) = workers(AdmissionPolicy(max_connections_per_ip=1), n=1, capacity=4)
    verdicts = [a.admit(f"10.0.0.{i}", 0) for i in range(50)]
    admitted = sum(v.admitted for v in verdicts)
    assert admitted <= layout.slots == 7 and admitted >= 4
    assert {v.reason for v in verdicts if not v.admitted} == {"ip_table_full"}


def test_with_ip_rate_only_the_fullest_bucket_is_evicted_never_a_refusal():
    buf, layout, (a,) = workers(AdmissionPolicy(ip_rate=1.0, ip_burst=4), n=1, capacity=8)
    for i in range(200):
        ip = f"10.0.{i // 256}.{i % 256}"
        assert a.admit(ip, i * 0.001).admitted
        a.release(ip)
    assert a.tracked_addresses == 0
    # the table holds 8 + 7 slots, no more, whatever the addresses
    assert layout.slots == 15 and len(buf) == layout.size


def test_layout_refuses_a_foreign_buffer():
    with pytest.raises(ValueError, match="not an edgeproxy limits table"):
        SharedLayout.read(bytearray(4096))
    buf, layout = table()
    with pytest.raises(ValueError, match="bytes, its header says"):
        SharedLayout.read(buf[:-1])
    with pytest.raises(ValueError, match="outside the table"):
        SharedAdmission(AdmissionPolicy(max_connections=1), buf, 2, NO_LOCK)


def test_reconfigure_keeps_the_table():
    _, _, (a, b) = workers(AdmissionPolicy(max_connections=3))
    assert a.admit("1", 0).admitted and b.admit("2", 0).admitted
    a.reconfigure(AdmissionPolicy(max_connections=2), 0)
    assert a.admit("3", 0).reason == "max_connections"
    a.reconfigure(AdmissionPolicy(max_connections=3, max_connections_per_ip=1), 0)
    a.release("1")  # admitted before per-address counting: released all the same
    assert a.open == 1 and a.admit("1", 0).admitted and a.per_ip == {"1": 1}
    a.release("1")
    assert a.admit("1", 0).admitted and a.admit("1", 0).reason == "max_connections_per_ip"


@pytest.mark.parametrize("seed", range(4))
def test_one_worker_decides_exactly_as_the_in_process_admission(seed):
    """Same policy, same sequence of admits and releases in time: the same verdicts and Retry-After."""
    rnd = random.Random(seed)
    policy = AdmissionPolicy(max_connections=20, max_connections_per_ip=3, rate=50.0, burst=10, ip_rate=3.0, ip_burst=3)
    local = Admission(policy, rng=random.Random(seed).random)
    _, _, (shared,) = workers(policy, n=1, rng=random.Random(seed).random)
    held: list[str] = []
    now = 1000.0
    for _ in range(3000):
        now += rnd.expovariate(120.0)
        if held and rnd.random() < 0.45:
            ip = held.pop(rnd.randrange(len(held)))
            local.release(ip)
            shared.release(ip)
            continue
        ip = f"10.0.0.{rnd.randrange(25)}"
        expected, got = local.admit(ip, now), shared.admit(ip, now)
        assert got.admitted == expected.admitted and got.reason == expected.reason
        assert got.retry_after == pytest.approx(expected.retry_after)
        if got.admitted:
            held.append(ip)
    assert local.refused == shared.refused and len(local.refused) >= 3, local.refused
    assert shared.open == local.open


def test_a_storm_refused_by_two_workers_is_spread_over_the_shared_queue():
    """1,000 refused, half by each worker: the values cover the window, none above 2x its share."""
    _, _, (a, b) = workers(AdmissionPolicy(rate=100.0, burst=10), rng=random.Random(7).random)
    refused = [v for v in ((a, b)[i % 2].admit(f"ip{i}", 0.0) for i in range(1010)) if not v.admitted]
    assert len(refused) == 1000
    values = collections.Counter(int(retry_after_header(v.retry_after)) for v in refused)
    assert set(values) == set(range(1, 12))
    assert max(values.values()) <= 2 * 1000 / 11

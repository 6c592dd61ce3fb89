"""Unit tests of core.balance: the four policies, weights, hash keys."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from edgeproxy.core.balance import Balancer, hash_key, least_loaded, parse_hash_source, request_cookies
from edgeproxy.core.http1 import RequestHead

ABC = ["a", "b", "c"]


def head(target: bytes = b"/", headers=()) -> RequestHead:
    return RequestHead(b"GET", target, b"1.1", list(headers), host="h", path=target.split(b"?")[0].decode())


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        Balancer("random", ABC)


def test_nothing_eligible_gives_none() -> None:
    for policy in ("round_robin", "least_conn", "p2c", "hash"):
        assert Balancer(policy, ABC).pick({}, {}, random.Random(1), key=b"k") is None


def test_smooth_weighted_round_robin_interleaves_like_nginx() -> None:
    bal = Balancer("round_robin", ABC, {"a": 5, "b": 1, "c": 1})
    eligible = {"a": 5.0, "b": 1.0, "c": 1.0}
    picks = [bal.pick(eligible, {}, random.Random(0)) for _ in range(7)]
    # nginx's documented sequence for weights 5,1,1
    assert picks == ["a", "a", "b", "a", "c", "a", "a"]


def test_round_robin_skips_ineligible_servers() -> None:
    bal = Balancer("round_robin", ABC)
    picks = [bal.pick({"a": 1.0, "c": 1.0}, {}, random.Random(0)) for _ in range(6)]
    assert Counter(picks) == {"a": 3, "c": 3}


def test_least_conn_uses_live_counts_per_weight() -> None:
    bal = Balancer("least_conn", ABC, {"a": 1, "b": 1, "c": 4})
    rng = random.Random(3)
    assert bal.pick({"a": 1.0, "b": 1.0, "c": 4.0}, {"a": 5, "b": 2, "c": 7}, rng) == "c"  # 7/4 < 2
    assert bal.pick({"a": 1.0, "b": 1.0, "c": 4.0}, {"a": 5, "b": 1, "c": 7}, rng) == "b"


def test_least_conn_breaks_ties_at_random() -> None:
    rng = random.Random(7)
    picks = Counter(least_loaded({"a": 1.0, "b": 1.0, "c": 1.0}, {}, rng) for _ in range(300))
    assert set(picks) == set(ABC) and min(picks.values()) > 60


def test_p2c_never_picks_the_most_loaded_of_three() -> None:
    bal = Balancer("p2c", ABC)
    rng = random.Random(11)
    picks = Counter(bal.pick({s: 1.0 for s in ABC}, {"a": 0, "b": 5, "c": 10}, rng) for _ in range(500))
    assert "c" not in picks
    assert picks["a"] > picks["b"] > 0  # a wins whenever drawn; b only against c


def test_p2c_with_one_server() -> None:
    assert Balancer("p2c", ABC).pick({"b": 1.0}, {"b": 99}, random.Random(0)) == "b"


def test_p2c_balances_a_stream_of_connections() -> None:
    bal = Balancer("p2c", ABC)
    rng = random.Random(5)
    loads = Counter()
    for _ in range(3000):
        loads[bal.pick({s: 1.0 for s in ABC}, loads, rng)] += 1
    assert max(loads.values()) - min(loads.values()) <= 3


def test_hash_is_stable_and_moves_only_the_dead_servers_keys() -> None:
    servers = ["s0", "s1", "s2", "s3"]
    bal = Balancer("hash", servers)
    rng = random.Random(0)
    everyone = {s: 1.0 for s in servers}
    keys = [f"user-{i}".encode() for i in range(2000)]
    before = {k: bal.pick(everyone, {}, rng, key=k) for k in keys}
    assert before == {k: bal.pick(everyone, {}, rng, key=k) for k in keys}
    spread = Counter(before.values())
    assert min(spread.values()) > 300, spread  # roughly 500 each
    without_s2 = {s: 1.0 for s in servers if s != "s2"}
    after = {k: bal.pick(without_s2, {}, rng, key=k) for k in keys}
    for k in keys:
        if before[k] != "s2":
            assert after[k] == before[k]
        else:
            assert after[k] != "s2"


def test_hash_weights_shift_the_share() -> None:
    bal = Balancer("hash", ["x", "y"], {"x": 3, "y": 1})
    picks = Counter(bal.pick({"x": 3.0, "y": 1.0}, {}, random.Random(0), key=b"k%d" % i) for i in range(4000))
    assert 0.65 < picks["x"] / 4000 < 0.85


def test_hash_without_key_falls_back_to_round_robin() -> None:
    bal = Balancer("hash", ABC)
    picks = [bal.pick({s: 1.0 for s in ABC}, {}, random.Random(0), key=None) for _ in range(6)]
    assert Counter(picks) == {"a": 2, "b": 2, "c": 2}


@pytest.mark.parametrize("text, parsed", [("ip", ("ip", "")), ("header:X-User", ("header", "X-User")),
                                          ("cookie:sid", ("cookie", "sid")), ("query:room", ("query", "room"))])
def test_parse_hash_source(text, parsed) -> None:
    assert parse_hash_source(text) == parsed


@pytest.mark.parametrize("text", ["", "ip:x", "header:", "body:x", "cookie: sid", "query"])
def test_parse_hash_source_refuses(text) -> None:
    with pytest.raises(ValueError):
        parse_hash_source(text)


def test_hash_key_sources() -> None:
    h = head(b"/chat?room=blue&x=1", [(b"X-User", b"alice"), (b"Cookie", b"a=1; sid=\"s-9\""), (b"Cookie", b"sid=later")])
    assert hash_key(h, "10.0.0.9", ("ip", "")) == b"10.0.0.9"
    assert hash_key(h, "ip", ("header", "x-user")) == b"alice"
    assert hash_key(h, "ip", ("cookie", "sid")) == b"s-9"
    assert hash_key(h, "ip", ("query", "room")) == b"blue"
    assert hash_key(h, "ip", ("query", "nope")) is None
    assert hash_key(h, "ip", ("header", "x-none")) is None
    assert hash_key(h, "ip", ("cookie", "none")) is None


def test_request_cookies_ignores_junk() -> None:
    assert request_cookies(head(headers=[(b"cookie", b"; =x; novalue; k=v ;")])) == {"k": "v"}

"""Unit tests of core.affinity: signing, verification, Set-Cookie, give-way."""

from __future__ import annotations

import pytest

from edgeproxy.core.affinity import AffinityCodec, honour_pin, set_cookie_header

SECRET = b"0123456789abcdef-secret"
NOW = 1_800_000_000.0


@pytest.fixture
def codec() -> AffinityCodec:
    return AffinityCodec(SECRET, max_age=3600)


def test_token_is_opaque_and_stable(codec) -> None:
    token = codec.token("127.0.0.1:9001")
    assert token == AffinityCodec(SECRET, 10).token("127.0.0.1:9001")
    assert token != codec.token("127.0.0.1:9002")
    assert "127" not in token and "9001" not in token
    assert token != AffinityCodec(b"another secret value", 10).token("127.0.0.1:9001")


def test_round_trip(codec) -> None:
    value = codec.issue(codec.token("a:1"), NOW)
    check = codec.verify(value, NOW + 10)
    assert check.reason == "ok" and check.token == codec.token("a:1")
    assert ";" not in value and " " not in value and "," not in value


@pytest.mark.parametrize("mutate, reason", [
    (lambda v: None, "missing"),
    (lambda v: "garbage", "malformed"),
    (lambda v: v + ".x", "malformed"),
    (lambda v: v.replace(".", ".x", 1), "malformed"),
    (lambda v: "AAAAAAAAAAAA" + v[12:], "bad-signature"),  # another token, old signature
    (lambda v: v[:-2] + ("AA" if v[-2:] != "AA" else "BB"), "bad-signature"),
    (lambda v: v.rsplit(".", 2)[0] + "." + str(int(NOW) - 1) + "." + v.rsplit(".", 1)[1], "bad-signature"),
    (lambda v: v + "é", "malformed"),
])
def test_tampered_values_are_refused(codec, mutate, reason) -> None:
    value = codec.issue(codec.token("a:1"), NOW)
    check = codec.verify(mutate(value), NOW)
    assert check.token is None and check.reason == reason


def test_another_secret_does_not_verify(codec) -> None:
    value = AffinityCodec(b"a different secret!!", 3600).issue(codec.token("a:1"), NOW)
    assert codec.verify(value, NOW).reason == "bad-signature"


def test_expiry_and_future(codec) -> None:
    value = codec.issue("tok", NOW)
    assert codec.verify(value, NOW + 3600).reason == "ok"
    assert codec.verify(value, NOW + 3601).reason == "expired"
    assert codec.verify(value, NOW - 120).reason == "future"
    assert AffinityCodec(SECRET, 0).verify(value, NOW + 10**8).reason == "ok"  # no limit


def test_set_cookie_header_attributes() -> None:
    assert set_cookie_header("ep", "v.1.s") == b"ep=v.1.s; Path=/; HttpOnly; SameSite=Lax"
    full = set_cookie_header("ep", "v", path="/app", domain="example.com", max_age=600, secure=True,
                             http_only=False, same_site="none")
    assert full == b"ep=v; Path=/app; Domain=example.com; Max-Age=600; Secure; SameSite=None"
    assert set_cookie_header("ep", "v", http_only=False, same_site=None) == b"ep=v; Path=/"


def test_honour_pin_strict() -> None:
    eligible = {"a": 1.0, "b": 1.0}
    assert honour_pin("a", eligible, {"a": 100, "b": 0}, threshold=None)
    assert not honour_pin("c", eligible, {}, threshold=None)  # down/draining: not eligible
    assert not honour_pin("a", eligible, {}, threshold=None, shedding={"a"})


def test_honour_pin_gives_way_to_load() -> None:
    eligible = {"a": 1.0, "b": 1.0, "c": 1.0}
    assert honour_pin("a", eligible, {"a": 14, "b": 10, "c": 6}, threshold=1.5)  # 14 <= 15
    assert not honour_pin("a", eligible, {"a": 16, "b": 10, "c": 4}, threshold=1.5)  # 16 > 15
    # a handful of connections never trips it: 1 vs mean 0.33
    assert honour_pin("a", eligible, {"a": 1}, threshold=1.5)
    # weights: a has weight 3, so 9 connections is its share
    assert honour_pin("a", {"a": 3.0, "b": 1.0}, {"a": 9, "b": 3}, threshold=1.2)

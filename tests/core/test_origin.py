"""core.origin: the allowed_origins patterns."""

from __future__ import annotations

import pytest

from edgeproxy.core.origin import OriginPolicy, parse_origin_pattern

POLICY = OriginPolicy(["https://app.example.com", "https://*.example.com", "http://localhost:3000"])


@pytest.mark.parametrize(
    "origin,allowed",
    [
        (None, True),  # not a browser
        (b"https://app.example.com", True),
        (b"https://APP.Example.com:443", True),
        (b"https://a.b.example.com", True),
        (b"https://example.com", False),  # the wildcard wants a subdomain
        (b"https://evil-example.com", False),
        (b"https://example.com.evil.net", False),
        (b"http://app.example.com", False),  # another scheme is another origin
        (b"https://app.example.com:8443", False),
        (b"http://localhost:3000", True),
        (b"http://localhost", False),
        (b"null", False),
        (b"https://app.example.com/", False),  # not a serialized origin
        (b"https://user@app.example.com", False),
        (b"", False),
        (b"garbage", False),
    ],
)
def test_allows(origin, allowed):
    assert POLICY.allows(origin) is allowed


def test_star_and_null():
    assert OriginPolicy(["*"]).allows(b"https://anything.test")
    assert OriginPolicy(["null"]).allows(b"null")
    assert not OriginPolicy(["https://a.test"]).allows(b"null")


def test_ipv6_origin():
    assert OriginPolicy(["http://[::1]:8080"]).allows(b"http://[::1]:8080")


@pytest.mark.parametrize("bad", ["app.example.com", "ftp://a.test", "https://a.*.test", "https://*", "https://a.test/path", "https://a.test:0"])
def test_bad_patterns(bad):
    with pytest.raises(ValueError):
        parse_origin_pattern(bad)

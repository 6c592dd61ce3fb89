"""core.proxy_protocol: v1 and v2 headers, split at every offset, and what is refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.core.proxy_protocol import (
    ProxyHeader,
    ProxyProtocolError,
    V2_SIGNATURE,
    encode_v1,
    encode_v2,
    parse,
)

GOOD = [
    (encode_v1(("203.0.113.7", 51000), ("10.0.0.1", 443)), ProxyHeader(1, True, ("203.0.113.7", 51000), ("10.0.0.1", 443), 0)),
    (encode_v1(("2001:db8::1", 1), ("2001:db8::2", 65535)), ProxyHeader(1, True, ("2001:db8::1", 1), ("2001:db8::2", 65535), 0)),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, False, None, None, 0)),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ProxyHeader(1, False, None, None, 0)),
    (encode_v2(("198.51.100.9", 40000), ("10.0.0.1", 80)), ProxyHeader(2, True, ("198.51.100.9", 40000), ("10.0.0.1", 80), 0)),
    (encode_v2(("2001:db8::9", 7), ("::1", 8)), ProxyHeader(2, True, ("2001:db8::9", 7), ("::1", 8), 0)),
    (encode_v2(("198.51.100.9", 1), tlvs=b"\x04\x00\x03abc"), ProxyHeader(2, True, ("198.51.100.9", 1), ("0.0.0.0", 0), 0)),
    (encode_v2(None), ProxyHeader(2, False, None, None, 0)),
]


@pytest.mark.parametrize("header,expected", GOOD, ids=[f"good{i}" for i in range(len(GOOD))])
def test_every_split_offset(header, expected):
    expected = expected._replace(length=len(header))
    stream = header + b"GET / HTTP/1.1\r\n\r\n"
    for cut in range(len(header)):
        assert parse(stream[:cut]) is None, cut  # a proper prefix: need more, never an error
    for cut in range(len(header), len(stream) + 1):
        assert parse(stream[:cut]) == expected


BAD = [
    b"GET / HTTP/1.1\r\n\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # bare LF
    b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    b"PROXY " + b"A" * 120,
    V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
    V2_SIGNATURE + b"\x2f\x11\x00\x0c" + bytes(12),  # command 15
    V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # TCP4 too short
    V2_SIGNATURE + b"\x21\x11\xff\xff",  # longer than the limit
    V2_SIGNATURE + b"\x21\x51\x00\x00",  # family 5
    b"\r\n\r\nX",
]


@pytest.mark.parametrize("data", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_refused_as_soon_as_the_bytes_prove_it(data):
    with pytest.raises(ProxyProtocolError):
        parse(data)
    # and never earlier than that: some prefix is either None or an error, monotonically
    seen_error = False
    for cut in range(len(data) + 1):
        try:
            parse(data[:cut])
        except ProxyProtocolError:
            seen_error = True
        else:
            assert not seen_error, f"prefix {cut} accepted after a shorter one was refused"


def test_unix_and_udp_families_keep_the_socket_address():
    body = bytes(216)
    assert parse(V2_SIGNATURE + b"\x21\x31\x00\xd8" + body) == ProxyHeader(2, False, None, None, 16 + 216)
    assert parse(V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12)).proxied is False


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(data):
    try:
        result = parse(data)
    except ProxyProtocolError:
        return
    if result is not None:
        assert 0 < result.length <= len(data)
    else:
        # None means "all of it is header so far"
        assert len(data) < 16 + 4096


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses(), st.ip_addresses(), st.integers(0, 65535), st.integers(0, 65535), st.booleans())
def test_round_trip(src, dst, sport, dport, v2):
    if src.version != dst.version:
        return
    header = (encode_v2 if v2 else encode_v1)((str(src), sport), (str(dst), dport))
    parsed = parse(header + b"tail")
    assert parsed.source == (str(src), sport) and parsed.destination == (str(dst), dport)
    assert parsed.length == len(header)

"""Fuzzing with hypothesis: the HTTP path, the handshake and the relay, never crashing, never diverging.

* HTTP (``ServerSide``): mutated and random request bytes.  Only
  ``RemoteProtocolError`` may come out, with a 4xx/5xx status, and the result
  (events, or the refusal's status) must not depend on how the bytes were cut.
  The WebSocket fast path and h11 must agree: a plain upgrade head parsed once
  by the fast path and once by h11 (by adding a header that disqualifies the
  fast path only syntactically) gives the same request.
* Handshake: ``validate_client_handshake`` on random header sets raises only
  ``RemoteProtocolError`` (400) and accepts only keys that are 16 bytes of base64.
* Relay: pure and compiled ``RelayEndpoint`` with the strict rules on random
  streams forward the same bytes and stop at the same place.

A failure hypothesis finds is pinned with ``@example`` on its test, so it is
replayed on every run (none so far: no crash, no divergence).
"""

from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgeproxy.core import http1
from edgeproxy.core.frames import RULE_MASKED, RULE_UNMASKED, RULES_STRICT
from edgeproxy.core.websocket import validate_client_handshake
from edgeproxy.errors import RemoteProtocolError
from tests.conftest import load_frame_impl
from tests.core.test_relay_twins import FakeTransport, Owner

FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BASE_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
]
TOKENS = [b"\r\n", b"\n", b" ", b"\t", b":", b"\x00", b"chunked", b"Content-Length: ", b"Transfer-Encoding: ",
          b"0", b"-1", b"ffffffffffffffffff", b",", b"Host: ", b"\r\n\r\n", b"\xff", b"HTTP/1.0", b"websocket"]


@st.composite
def mutated_requests(draw):
    data = bytearray(draw(st.sampled_from(BASE_REQUESTS)))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.integers(0, 2))
        if kind == 0:
            data[pos:pos] = draw(st.sampled_from(TOKENS))
        elif kind == 1 and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


def run_server_side(chunks: list[bytes], eof: bool):
    """Everything a ServerSide yields for ``chunks`` (then EOF): events with bodies merged, or the refusal."""
    side = http1.ServerSide(max_header_size=4096)
    out: list = []
    try:
        for chunk in [*chunks, *([b""] if eof else [])]:
            side.receive_data(chunk)
            for _ in range(1000):
                event = side.next_event()
                if event is http1.NEED_DATA or event is http1.PAUSED:
                    break
                if isinstance(event, http1.Body) and out and isinstance(out[-1], http1.Body):
                    out[-1] = http1.Body(out[-1].data + event.data)
                else:
                    out.append(event)
                if isinstance(event, http1.ConnectionClosed):
                    return out, None
                if isinstance(event, http1.EndOfMessage):
                    # answer so the next pipelined request can be parsed
                    side.send_simple(200, "ok")
                    if not side.keep_alive:
                        return out, None
                    side.start_next_cycle()
    except RemoteProtocolError as exc:
        assert 400 <= exc.status_hint <= 599, exc.status_hint
        return out, exc.status_hint
    return out, None


@FUZZ
@given(data=mutated_requests(), cuts=st.lists(st.integers(0, 400), max_size=5), eof=st.booleans())
def test_http_server_side_never_crashes_and_split_does_not_matter(data, cuts, eof):
    whole = run_server_side([data], eof)
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)]) if b > a]
    split = run_server_side(pieces, eof)
    if whole[1] is None and split[1] is None:
        assert whole[0] == split[0]
    else:
        # a refusal may come earlier or later, but it is the same refusal and the same events before it
        assert whole[1] == split[1] or whole[1] is None or split[1] is None
        shorter = min(len(whole[0]), len(split[0]))
        assert whole[0][:shorter] == split[0][:shorter]


@FUZZ
@given(data=st.binary(max_size=600), eof=st.booleans())
def test_http_server_side_on_random_bytes(data, eof):
    run_server_side([data], eof)


@FUZZ
@given(key=st.binary(min_size=16, max_size=16), path=st.from_regex(rb"/[!-~]{0,30}", fullmatch=True),
       extra=st.lists(st.tuples(st.from_regex(rb"X-[A-Za-z]{1,10}", fullmatch=True), st.from_regex(rb"[!-~]{0,20}", fullmatch=True)), max_size=3))
def test_upgrade_fast_path_agrees_with_h11(key, path, extra):
    """A plain upgrade goes the fast path; the same with 'Content-Length: 0' goes to h11: same request."""
    headers = b"".join(name + b": " + value + b"\r\n" for name, value in extra)
    base = (b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + base64.b64encode(key) + b"\r\nSec-WebSocket-Version: 13\r\n" + headers)
    fast, _ = run_server_side([base + b"\r\n"], False)
    slow, _ = run_server_side([base + b"Content-Length: 0\r\n\r\n"], False)
    assert fast and slow
    f, s = fast[0], slow[0]
    assert (f.method, f.target, f.host, f.path, f.websocket, f.has_body) == (s.method, s.target, s.host, s.path, s.websocket, s.has_body)
    assert f.headers == s.headers[:-1]
    assert validate_client_handshake(f) == base64.b64encode(key)


HEADER_NAMES = [b"Host", b"Upgrade", b"Connection", b"Sec-WebSocket-Key", b"Sec-WebSocket-Version", b"Origin"]


@FUZZ
@given(method=st.sampled_from([b"GET", b"POST", b"get"]), version=st.sampled_from([b"1.1", b"1.0"]),
       headers=st.lists(st.tuples(st.sampled_from(HEADER_NAMES), st.binary(max_size=40)), max_size=8))
@example(method=b"GET", version=b"1.1", headers=[(b"Host", b"a"), (b"Sec-WebSocket-Version", b"13"),
                                                  (b"Sec-WebSocket-Key", b"AAAAAAAAAAAAAAAAAAAAAA==")])
def test_handshake_validation_never_crashes(method, version, headers):
    head = http1.RequestHead(method, b"/", version, headers, websocket=True)
    try:
        key = validate_client_handshake(head)
    except RemoteProtocolError as exc:
        assert exc.status_hint == 400
        return
    assert method == b"GET" and version == b"1.1"
    assert len(base64.b64decode(key, validate=True)) == 16


def test_handshake_key_decoding_errors_are_not_leaked():
    head = http1.RequestHead(b"GET", b"/", b"1.1", [(b"Host", b"a"), (b"Sec-WebSocket-Version", b"13"),
                                                      (b"Sec-WebSocket-Key", b"\xff\xfe==")], websocket=True)
    with pytest.raises(RemoteProtocolError):
        validate_client_handshake(head)
    assert binascii.Error is not None


# ---------------------------------------------------------------------------
# the relay, strict, both twins


def _relay_trace(impl, pieces, client_rules, upstream_rules, rsv):
    class Relay(impl.RelayCore):
        def __init__(self):
            super().__init__(1000, 300, client_rules, upstream_rules, rsv)
            self.actions, self.stops = [], []

        def _after_stop(self, scanner, data, n, client):
            err = scanner.error
            self.stops.append((client, n, scanner.close, None if err is None else (str(err), err.close_code)))
            return data[:n] if n != len(data) else data

    relay = Relay()
    out = {True: FakeTransport(), False: FakeTransport()}
    ends = {side: impl.RelayEndpoint(relay, side, out[not side], Owner(), lambda: None) for side in (True, False)}
    for side, piece in pieces:
        ends[side].data_received(piece)
    return (b"".join(out[False].written), b"".join(out[True].written), relay.stops,
            relay.bytes_from_client, relay.bytes_from_upstream)


@FUZZ
@given(client=st.binary(max_size=400), upstream=st.binary(max_size=400),
       order=st.lists(st.tuples(st.booleans(), st.integers(1, 60)), max_size=20), rsv=st.sampled_from([0, 4, 7]))
def test_strict_relay_twins_agree_on_random_streams(client, upstream, order, rsv):
    streams = {True: client, False: upstream}
    pos = {True: 0, False: 0}
    pieces = []
    for side, size in order + [(True, 400), (False, 400)]:
        chunk = streams[side][pos[side] : pos[side] + size]
        pos[side] += size
        if chunk:
            pieces.append((side, chunk))
    rules = (RULE_MASKED | RULES_STRICT, RULE_UNMASKED | RULES_STRICT, rsv)
    traces = [_relay_trace(load_frame_impl(name), pieces, *rules) for name in ("pure", "compiled")]
    assert traces[0] == traces[1]

"""Sans-IO tests of the WebSocket handshake checks and the relay state machine."""

from __future__ import annotations

import base64
import itertools

import pytest
from wsproto.utilities import generate_accept_token

from edgeproxy.core.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    encode_close_payload,
    encode_frame,
    parse_close_payload,
    parse_header,
    apply_mask,
)
from edgeproxy.core.http1 import RequestHead, ResponseHead
from edgeproxy.core.websocket import (
    ABORT_CLIENT,
    ABORT_UPSTREAM,
    CLOSE_CLIENT,
    CLOSE_UPSTREAM,
    DRAIN_GRACE,
    PONG_FROM_CLIENT,
    PONG_FROM_UPSTREAM,
    SEND_CLIENT,
    SEND_UPSTREAM,
    SHUTDOWN_CLIENT,
    SHUTDOWN_UPSTREAM,
    WAKE_TIMERS,
    RelayState,
    WebSocketRelay,
    frame_rules,
    validate_client_handshake,
    validate_upstream_accept,
)
from edgeproxy.errors import RemoteProtocolError

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
CLIENT_MASK = b"\x37\xfa\x21\x3d"


def make_head(**overrides) -> RequestHead:
    headers = {
        b"Host": b"a",
        b"Connection": b"Upgrade",
        b"Upgrade": b"websocket",
        b"Sec-WebSocket-Key": KEY,
        b"Sec-WebSocket-Version": b"13",
    }
    for name, value in overrides.pop("headers", {}).items():
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    fields = dict(method=b"GET", target=b"/ws", http_version=b"1.1", headers=list(headers.items()), websocket=True)
    fields.update(overrides)
    return RequestHead(**fields)


def test_valid_handshake_returns_the_key():
    assert validate_client_handshake(make_head()) == KEY


@pytest.mark.parametrize(
    "overrides",
    [
        {"method": b"POST"},
        {"http_version": b"1.0"},
        {"headers": {b"Sec-WebSocket-Version": b"12"}},
        {"headers": {b"Sec-WebSocket-Version": None}},
        {"headers": {b"Sec-WebSocket-Key": None}},
        {"headers": {b"Sec-WebSocket-Key": b"not base64!"}},
        {"headers": {b"Sec-WebSocket-Key": base64.b64encode(b"x" * 15)}},
        {"headers": {b"Host": None}},
    ],
)
def test_invalid_handshakes_are_400(overrides):
    with pytest.raises(RemoteProtocolError) as info:
        validate_client_handshake(make_head(**overrides))
    assert info.value.status_hint == 400


def test_upstream_accept_is_checked():
    good = ResponseHead(101, b"", b"1.1", [(b"Sec-WebSocket-Accept", generate_accept_token(KEY))])
    validate_upstream_accept(KEY, good)
    bad = ResponseHead(101, b"", b"1.1", [(b"Sec-WebSocket-Accept", b"nope")])
    with pytest.raises(RemoteProtocolError) as info:
        validate_upstream_accept(KEY, bad)
    assert info.value.status_hint == 502


def new_relay(**kw) -> WebSocketRelay:
    keys = itertools.cycle([b"\x01\x02\x03\x04"])
    kw.setdefault("mask_key_source", lambda: next(keys))
    return WebSocketRelay(**kw)


def client_frame(opcode, payload=b"", fin=True):
    return encode_frame(opcode, payload, fin=fin, mask_key=CLIENT_MASK)


def server_frame(opcode, payload=b"", fin=True):
    return encode_frame(opcode, payload, fin=fin)


def read_close(frame: bytes):
    fin, rsv, opcode, key, length, header = parse_header(frame)
    payload = frame[header : header + length]
    if key is not None:
        payload = apply_mask(payload, key)
    assert opcode == OP_CLOSE
    return parse_close_payload(payload), key is not None


def feed_split(relay, method, data, cut):
    out = b""
    for piece in (data[:cut], data[cut:]):
        if piece:
            got = getattr(relay, method)(piece)
            out += bytes(got or b"")
    return out


def test_data_is_forwarded_unchanged_and_as_the_same_object():
    relay = new_relay()
    frame = client_frame(OP_TEXT, b"hello")
    assert relay.from_client(frame) is frame
    down = server_frame(OP_BINARY, b"\x00" * 300)
    assert relay.from_upstream(down) is down
    assert relay.messages_from_client == 1 and relay.messages_from_upstream == 1
    assert relay.actions == []


def test_client_initiated_close_handshake_at_every_split():
    stream = client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_CONT, b"b") + client_frame(
        OP_CLOSE, encode_close_payload(4001, "bye")
    )
    reply = server_frame(OP_CLOSE, encode_close_payload(4001, "bye"))
    for cut in range(len(stream) + 1):
        relay = new_relay()
        forwarded = feed_split(relay, "from_client", stream, cut)
        assert forwarded == stream
        assert relay.state is RelayState.CLOSING
        assert relay.client_close == (4001, "bye")
        # the close deadline begins: the transport is asked to check the timers
        assert relay.actions == [(WAKE_TIMERS, None)]
        relay.actions.clear()
        assert relay.from_upstream(reply) == reply
        assert relay.state is RelayState.CLOSED
        assert relay.actions == [(CLOSE_CLIENT, None), (CLOSE_UPSTREAM, None)]
        assert relay.messages_from_client == 1


def test_upstream_initiated_close_and_data_after_close_is_dropped():
    relay = new_relay()
    close = server_frame(OP_CLOSE, encode_close_payload(4002, "server bye"))
    assert relay.from_upstream(close + server_frame(OP_TEXT, b"late")) == close
    assert relay.upstream_close == (4002, "server bye")
    assert relay.actions == [(WAKE_TIMERS, None)]
    relay.actions.clear()
    assert relay.from_upstream(server_frame(OP_TEXT, b"later")) is None
    # The client may still send data before it answers the close.
    data = client_frame(OP_TEXT, b"in flight")
    assert relay.from_client(data) is data
    answer = client_frame(OP_CLOSE, encode_close_payload(4002, ""))
    assert relay.from_client(answer) == answer
    assert relay.actions == [(CLOSE_CLIENT, None), (CLOSE_UPSTREAM, None)]


def test_too_big_message_closes_client_with_1009_and_upstream_with_1001():
    relay = new_relay(max_message_size=10)
    ok = client_frame(OP_TEXT, b"x" * 10)
    big = client_frame(OP_BINARY, b"y" * 11)
    forwarded = relay.from_client(ok + big)
    assert forwarded == ok  # nothing of the big message is relayed
    (to_upstream, wake) = relay.actions
    assert to_upstream[0] == SEND_UPSTREAM
    (code, _), masked = read_close(to_upstream[1])
    assert code == 1001 and masked  # frames to the upstream are masked
    assert wake == (WAKE_TIMERS, None)  # the drain is bounded by close_timeout
    assert relay.state is RelayState.DRAINING
    relay.actions.clear()
    # Further client data is dropped; the upstream's close answer ends the drain
    # (the client gets the proxy's 1009 instead) and the client's EOF the session.
    assert relay.from_client(client_frame(OP_TEXT, b"z") + b"y" * 100) is None
    assert relay.from_upstream(server_frame(OP_CLOSE, encode_close_payload(1001))) == b""
    (to_client, shutdown) = relay.actions
    assert to_client[0] == SEND_CLIENT and read_close(to_client[1]) == ((1009, to_client_reason(to_client)), False)
    assert shutdown == (SHUTDOWN_CLIENT, None)  # half-close: the client still gets to read our close
    assert relay.state is RelayState.FAILING and relay.proxy_close_code == 1009
    relay.actions.clear()
    relay.client_eof()
    assert relay.actions == [(CLOSE_CLIENT, None), (CLOSE_UPSTREAM, None)]


def drained_relay(**kw):
    """A relay whose client has just sent a good message, then a broken frame: DRAINING."""
    relay = new_relay(rules=frame_rules(True, None), **kw)
    good = client_frame(OP_TEXT, b"hello")
    bad = encode_frame(OP_TEXT, b"rsv", rsv=3, mask_key=CLIENT_MASK)
    assert relay.from_client(good + bad + client_frame(OP_PING, b"after")) == good
    assert relay.state is RelayState.DRAINING and relay.proxy_close_code is None
    assert [a[0] for a in relay.actions] == [SEND_UPSTREAM, WAKE_TIMERS]
    assert read_close(relay.actions[0][1])[0] == (1001, "client broke the protocol")
    relay.actions.clear()
    return relay


def test_a_client_breaking_a_rule_still_gets_the_echo_of_its_last_good_message():
    """Autobahn 3.4 / 4.1.5 / 4.2.5: the echo comes first, then the proxy's 1002 (a strict endpoint's answer)."""
    echo = server_frame(OP_TEXT, b"hello")
    answer = server_frame(OP_CLOSE, encode_close_payload(1001, "client broke the protocol"))
    stream = echo + answer + server_frame(OP_TEXT, b"after the close")
    for cut in range(len(stream) + 1):
        relay = drained_relay()
        to_client = b""
        for piece in (stream[:cut], stream[cut:]):
            if piece:
                to_client += bytes(relay.from_upstream(piece) or b"")
                for kind, data in relay.actions:
                    if kind == SEND_CLIENT:
                        to_client += data
                relay.actions.clear()
        assert to_client.startswith(echo)
        rest = to_client[len(echo):]
        if len(echo) < cut < len(echo) + len(answer):
            # the upstream's close began in an earlier read, so it went out: it stays the one the client gets
            assert rest == answer and relay.proxy_close_code is None
        else:
            assert read_close(rest)[0][0] == 1002 and len(rest) == 2 + len(read_close(rest)[0][1]) + 2
            assert relay.proxy_close_code == 1002
        assert relay.state is RelayState.FAILING and relay.upstream_close == (1001, "client broke the protocol")
        assert relay.from_client(client_frame(OP_CLOSE, encode_close_payload(1002))) is None
        relay.client_eof()
        assert relay.actions == [(CLOSE_CLIENT, None), (CLOSE_UPSTREAM, None)]
        assert relay.messages_from_upstream == 1 and relay.messages_from_client == 1


def test_a_drain_is_bounded_by_close_timeout_whatever_the_client_does():
    relay = drained_relay(close_timeout=2, now=0.0)
    assert relay.next_check(0.0) == 0.0
    relay.check_timers(0.0)  # arms the deadline
    assert relay.next_check(0.0) == 2.0 and relay.actions == []
    echo = server_frame(OP_BINARY, b"e" * 10)
    assert relay.from_upstream(echo) == echo  # relayed (on the slow path), and the client is not heard
    for t in (0.5, 1.0, 1.5):
        assert relay.from_client(client_frame(OP_TEXT, b"more")) is None
        relay.check_timers(t)
    assert relay.actions == []
    relay.check_timers(2.0)  # the upstream never answered: the client gets its close now
    assert [a[0] for a in relay.actions] == [SEND_CLIENT, SHUTDOWN_CLIENT]
    assert read_close(relay.actions[0][1])[0][0] == 1002
    assert relay.state is RelayState.FAILING
    relay.actions.clear()
    relay.check_timers(2.5)  # FAILING: the client's EOF is waited for, for close_timeout more at most
    relay.check_timers(4.5)
    assert relay.actions == [(ABORT_CLIENT, None), (ABORT_UPSTREAM, None)]


def test_a_drain_that_times_out_inside_an_upstream_frame_aborts_the_client():
    relay = drained_relay(close_timeout=1, now=0.0)
    frame = server_frame(OP_BINARY, b"f" * 50)
    assert relay.from_upstream(frame[:20]) == frame[:20]
    relay.check_timers(0.0)
    relay.check_timers(1.0)
    assert relay.actions == [(ABORT_CLIENT, None), (CLOSE_CLIENT, None), (CLOSE_UPSTREAM, None)]
    assert relay.state is RelayState.CLOSED  # nobody is waited for any more
    assert relay.from_upstream(frame[20:]) is None


@pytest.mark.parametrize("how", ["upstream_eof", "close_both", "upstream_error"])
def test_a_drain_ends_when_nothing_more_can_come_from_the_upstream(how):
    relay = drained_relay()
    before = server_frame(OP_TEXT, b"on its way")
    if how == "upstream_eof":
        assert relay.from_upstream(before) == before
        relay.upstream_eof()
    elif how == "close_both":
        relay.close_both(1001, "server shutting down")
    else:
        bad = b"\x82\x7f\x80" + bytes(7)  # a length the stream cannot be followed past
        assert relay.from_upstream(before + bad) == before
    assert [a[0] for a in relay.actions] == [SEND_CLIENT, SHUTDOWN_CLIENT]  # nothing more to the upstream
    assert read_close(relay.actions[0][1])[0] == (1002, "RSV bits 0x3 set without an extension that defines them")
    assert relay.state is RelayState.FAILING


def test_a_client_gone_while_draining_closes_the_upstream_without_a_second_close_frame():
    relay = drained_relay()
    relay.client_eof()
    assert relay.actions == [(CLOSE_UPSTREAM, None)]
    assert relay.state is RelayState.CLOSED


def graced_relay():
    """A relay draining with a grace: the upstream has not been told yet."""
    relay = new_relay(rules=frame_rules(True, None), drain_grace=0.1)
    good = client_frame(OP_TEXT, b"hello")
    assert relay.from_client(good + client_frame(3, b"reserved")) == good
    assert relay.actions == [(DRAIN_GRACE, 0.1), (WAKE_TIMERS, None)]  # nothing goes upstream yet
    relay.actions.clear()
    return relay


def test_the_upstream_hears_of_the_broken_frame_only_after_the_grace():
    """So it can answer what it read before: an echo it has not even sent yet when the client breaks the rule."""
    relay = graced_relay()
    echo = server_frame(OP_TEXT, b"hello")
    assert relay.from_upstream(echo) == echo and relay.actions == []
    relay.end_grace()
    assert [a[0] for a in relay.actions] == [SEND_UPSTREAM]
    assert read_close(relay.actions[0][1]) == ((1001, "client broke the protocol"), True)
    relay.actions.clear()
    relay.end_grace()  # once only
    assert relay.actions == []
    assert relay.from_upstream(server_frame(OP_CLOSE, encode_close_payload(1001))) == b""
    assert read_close(relay.actions[0][1])[0] == (1002, "reserved opcode 0x3")
    assert relay.state is RelayState.FAILING


@pytest.mark.parametrize("how", ["close_both", "client_eof", "upstream_eof", "upstream_close", "deadline"])
def test_a_drain_ended_within_the_grace_still_tells_both_sides_once(how):
    relay = graced_relay()
    if how == "close_both":
        relay.close_both(1001, "server shutting down")
        kinds = [SEND_UPSTREAM, SEND_CLIENT, SHUTDOWN_CLIENT]
    elif how == "client_eof":
        relay.client_eof()
        kinds = [SEND_UPSTREAM, CLOSE_UPSTREAM]
    elif how == "upstream_eof":
        relay.upstream_eof()
        kinds = [SEND_CLIENT, SHUTDOWN_CLIENT]  # nobody to tell upstream
    elif how == "upstream_close":
        # the upstream's close crossed the client's breach: answered, and replaced by the proxy's
        assert relay.from_upstream(server_frame(OP_CLOSE, encode_close_payload(1000))) == b""
        kinds = [SEND_UPSTREAM, SEND_CLIENT, SHUTDOWN_CLIENT]
    else:
        relay.check_timers(0.0)
        relay.check_timers(relay.close_timeout)  # a transport that never ended the grace
        kinds = [SEND_UPSTREAM, SEND_CLIENT, SHUTDOWN_CLIENT]
    assert [a[0] for a in relay.actions] == kinds
    for kind, data in relay.actions:
        if kind == SEND_UPSTREAM:
            assert read_close(data)[0][0] == 1001
        elif kind == SEND_CLIENT:
            assert read_close(data)[0][0] == 1002
    relay.actions.clear()
    relay.end_grace()  # too late: changes nothing
    assert relay.actions == []


def test_a_client_cut_inside_a_frame_gets_the_upstream_half_closed_after_the_grace():
    relay = new_relay(drain_grace=0.1)
    big = client_frame(OP_BINARY, b"b" * 1000)
    assert relay.from_client(big[:500]) == big[:500]  # the upstream is now inside that frame
    relay.fail_sender(client=True, code=1008, reason="message or byte rate exceeded")
    relay.actions.clear()
    assert relay.from_client(big[500:]) is None  # scanned, not relayed: the stream upstream stays cut
    relay.end_grace()
    assert relay.actions == [(SHUTDOWN_UPSTREAM, None)]


def test_a_rate_limited_client_is_not_relayed_while_draining():
    relay = new_relay()
    relay.fail_sender(client=True, code=1008, reason="message or byte rate exceeded")
    assert relay.state is RelayState.DRAINING
    relay.actions.clear()
    assert relay.from_client(client_frame(OP_TEXT, b"more")) is None  # its stream is still readable, not relayed
    assert relay.from_client(client_frame(OP_CLOSE, encode_close_payload(1000))) is None
    relay.fail_sender(client=True, code=1008, reason="again")  # once is enough
    assert relay.actions == []
    assert relay.from_upstream(server_frame(OP_CLOSE, encode_close_payload(1001))) == b""
    assert read_close(relay.actions[0][1])[0] == (1008, "message or byte rate exceeded")


def to_client_reason(action):
    (_, reason), _ = read_close(action[1])
    return reason


def test_upstream_protocol_error_gives_client_1014():
    relay = new_relay()
    bad = b"\x82\x7f\x80" + bytes(7)  # 64-bit length with the top bit set: the stream cannot be followed
    assert relay.from_upstream(bad) == b""
    kinds = [a[0] for a in relay.actions]
    assert kinds == [SEND_UPSTREAM, SHUTDOWN_UPSTREAM, SEND_CLIENT]
    assert read_close(relay.actions[0][1])[0][0] == 1002
    assert read_close(relay.actions[2][1])[0][0] == 1014


def test_client_close_frame_longer_than_125_bytes_gives_1002():
    relay = new_relay()
    ok = client_frame(OP_TEXT, b"before")
    bad = client_frame(OP_CLOSE, encode_close_payload(1000) + b"x" * 200)
    assert relay.from_client(ok + bad) == ok
    kinds = [a[0] for a in relay.actions]
    assert kinds == [SEND_UPSTREAM, WAKE_TIMERS]
    assert read_close(relay.actions[0][1])[0][0] == 1001
    relay.actions.clear()
    assert relay.from_upstream(server_frame(OP_CLOSE, encode_close_payload(1001))) == b""
    assert read_close(relay.actions[0][1])[0][0] == 1002
    assert relay.state is RelayState.FAILING


@pytest.mark.parametrize(
    "frame",
    [
        client_frame(3, b"reserved data opcode"),
        client_frame(15, b"reserved control opcode"),
        client_frame(11, b"fragmented reserved control", fin=False),
        encode_frame(OP_TEXT, b"rsv bits", rsv=5, mask_key=CLIENT_MASK),
        client_frame(OP_PING, b"p" * 300),
        client_frame(OP_PING, b"fragmented ping", fin=False),
        client_frame(OP_CONT, b"continuation without a message"),
    ],
    ids=["opcode 3", "opcode 15", "opcode 11 FIN=0", "rsv", "long ping", "ping FIN=0", "orphan continuation"],
)
def test_frames_only_the_endpoints_judge_are_relayed_unchanged(frame):
    relay = new_relay()
    assert relay.from_client(frame) is frame
    down = server_frame(OP_TEXT, b"echo")
    assert relay.from_upstream(down) is down
    for cut in range(1, len(frame)):  # also when it arrives in pieces
        assert feed_split(relay, "from_client", frame, cut) == frame
    assert relay.actions == [] and relay.state is RelayState.OPEN
    assert relay.client_frames.error is None and not relay.client_frames.mid_frame


def test_reserved_opcode_from_client_is_forwarded_and_the_echo_still_arrives():
    """Autobahn 4.2.5: text, reserved opcode 15, ping.  The upstream judges, not the proxy."""
    relay = new_relay()
    text = client_frame(OP_TEXT, b"Hello, world!")
    bad = client_frame(15, b"")
    ping = client_frame(OP_PING, b"")
    stream = text + bad + ping
    assert relay.from_client(stream) is stream
    assert relay.state is RelayState.OPEN and relay.actions == []
    # the upstream echoes the text, then fails the connection itself
    echo = server_frame(OP_TEXT, b"Hello, world!")
    close = server_frame(OP_CLOSE, encode_close_payload(1002, "reserved opcode"))
    assert relay.from_upstream(echo + close) == echo + close
    assert relay.upstream_close == (1002, "reserved opcode")
    assert relay.state is RelayState.CLOSING and relay.actions == [(WAKE_TIMERS, None)]
    assert relay.messages_from_upstream == 1


def test_upstream_gone_gives_client_1014_then_close():
    relay = new_relay()
    relay.upstream_eof()
    assert relay.actions[0][0] == SEND_CLIENT and read_close(relay.actions[0][1])[0][0] == 1014
    assert relay.actions[1] == (CLOSE_CLIENT, None)
    assert relay.proxy_close_code == 1014


def test_upstream_gone_mid_frame_aborts_the_client():
    relay = new_relay()
    frame = server_frame(OP_BINARY, b"x" * 1000)
    relay.from_upstream(frame[:500])
    relay.upstream_eof()
    assert relay.actions == [(ABORT_CLIENT, None), (CLOSE_CLIENT, None)]


def test_client_gone_gives_upstream_1001_masked():
    relay = new_relay()
    relay.client_eof()
    (kind, frame), close = relay.actions
    assert kind == SEND_UPSTREAM
    (code, _), masked = read_close(frame)
    assert code == 1001 and masked
    assert close == (CLOSE_UPSTREAM, None)


def test_client_gone_mid_frame_aborts_the_upstream():
    relay = new_relay()
    relay.from_client(client_frame(OP_BINARY, b"x" * 1000)[:100])
    relay.client_eof()
    assert relay.actions == [(ABORT_UPSTREAM, None), (CLOSE_UPSTREAM, None)]


def test_idle_timeout_closes_both_with_1001_and_close_timeout_aborts():
    relay = new_relay(idle_timeout=10, close_timeout=2, now=0.0)
    relay.check_timers(5.0)
    assert relay.actions == []
    relay.from_client(client_frame(OP_PING, b"p"))  # activity resets the idle clock
    relay.check_timers(12.0)
    assert relay.actions == []
    relay.check_timers(22.5)
    kinds = [a[0] for a in relay.actions]
    assert kinds == [SEND_CLIENT, SEND_UPSTREAM]
    assert read_close(relay.actions[0][1])[0] == (1001, "idle timeout")
    relay.actions.clear()
    relay.check_timers(23.0)
    assert relay.actions == []
    relay.check_timers(25.0)
    assert relay.actions == [(ABORT_CLIENT, None), (ABORT_UPSTREAM, None)]
    assert relay.state is RelayState.CLOSED


def test_close_handshake_that_never_completes_is_aborted():
    relay = new_relay(close_timeout=1, now=0.0)
    relay.from_client(client_frame(OP_CLOSE, encode_close_payload(1000)))
    assert relay.actions == [(WAKE_TIMERS, None)] and relay.next_check(0.2) == 0.2  # at the next tick
    relay.actions.clear()
    relay.check_timers(0.5)  # arms the deadline
    assert relay.next_check(0.5) == 1.5
    relay.check_timers(1.0)
    assert relay.actions == []
    relay.check_timers(1.6)
    assert relay.actions == [(ABORT_CLIENT, None), (ABORT_UPSTREAM, None)]


def test_pings_pass_through_in_both_directions():
    relay = new_relay()
    ping = client_frame(OP_PING, b"are you there")
    assert relay.from_client(ping) is ping
    pong = server_frame(0xA, b"are you there")
    assert relay.from_upstream(pong) is pong
    # The pong is relayed and also reported, for the heartbeat to match.
    assert relay.actions == [(PONG_FROM_UPSTREAM, b"are you there")] and relay.state is RelayState.OPEN


def test_pongs_are_reported_once_each_with_their_unmasked_payload():
    relay = new_relay()
    data = client_frame(OP_TEXT, b"hi") + client_frame(0xA, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    for cut in range(len(data) + 1):
        relay = new_relay()
        forwarded = [relay.from_client(data[:cut]), relay.from_client(data[cut:])]
        assert b"".join(f for f in forwarded if f) == data
        assert relay.actions == [(PONG_FROM_CLIENT, b"\x01\x02\x03\x04\x05\x06\x07\x08")]
    relay.actions.clear()
    text = client_frame(OP_TEXT, b"more")
    assert relay.from_client(text) is text and relay.actions == []  # nothing new to report


def test_heartbeat_pings_go_out_only_between_frames():
    relay = new_relay()
    assert relay.ping_client(b"12345678")
    kind, frame = relay.actions.pop()
    assert kind == SEND_CLIENT and frame == server_frame(OP_PING, b"12345678")
    assert relay.ping_upstream(b"abcdefgh")
    kind, frame = relay.actions.pop()
    assert kind == SEND_UPSTREAM and frame[0] == 0x89 and frame[1] == 0x88  # masked, 8 bytes
    # The upstream is half-way through sending a frame: no ping to the client now.
    big = server_frame(OP_BINARY, b"z" * 1000)
    relay.from_upstream(big[:100])
    assert not relay.ping_client(b"12345678") and relay.actions == []
    relay.from_upstream(big[100:])
    assert relay.ping_client(b"12345678")
    # A closing session gets no more pings.
    relay = new_relay()
    relay.close_both(1001, "bye")
    relay.actions.clear()
    assert not relay.ping_client(b"x") and not relay.ping_upstream(b"x") and relay.actions == []


def test_bad_header_split_across_reads_aborts_the_side_that_got_its_first_bytes():
    relay = new_relay(max_message_size=10)
    frame = client_frame(OP_BINARY, b"y" * 256)  # 2-byte extended length: 0x82 0xfe 0x01 0x00 ...
    assert relay.from_client(frame[:2]) == frame[:2]  # relayed as it came, before the length was known
    assert relay.from_client(frame[2:]) == b""
    kinds = [a[0] for a in relay.actions]
    # no close frame can follow the header's first bytes: the upstream is half-closed, and drained
    assert kinds == [SHUTDOWN_UPSTREAM, WAKE_TIMERS] and relay.state is RelayState.DRAINING
    relay.actions.clear()
    echo = server_frame(OP_TEXT, b"owed")
    assert relay.from_upstream(echo) == echo
    relay.upstream_eof()  # the upstream's answer to the half-close
    assert [a[0] for a in relay.actions] == [SEND_CLIENT, SHUTDOWN_CLIENT]
    assert read_close(relay.actions[0][1])[0][0] == 1009
    assert relay.state is RelayState.FAILING


def test_a_pong_answering_the_proxys_own_ping_is_not_relayed_when_alone():
    relay = new_relay()
    assert relay.ping_client(b"12345678") and relay.ping_upstream(b"abcdefgh")
    relay.actions.clear()
    # Each answer arrives alone in its read: reported, not relayed.
    assert relay.from_client(client_frame(0xA, b"12345678")) is None
    assert relay.from_upstream(server_frame(0xA, b"abcdefgh")) is None
    assert relay.actions == [(PONG_FROM_CLIENT, b"12345678"), (PONG_FROM_UPSTREAM, b"abcdefgh")]
    relay.actions.clear()
    # A second copy (no ping outstanding any more) is relayed like any pong.
    again = client_frame(0xA, b"12345678")
    assert relay.from_client(again) is again
    # A pong that shares its read with data is relayed whole, and still reported.
    assert relay.ping_client(b"87654321")
    relay.actions.clear()
    data = client_frame(0xA, b"87654321") + client_frame(OP_TEXT, b"hello")
    assert relay.from_client(data) is data
    assert relay.actions == [(PONG_FROM_CLIENT, b"87654321")]
    # Somebody else's pong (another payload) is relayed.
    relay.actions.clear()
    assert relay.ping_upstream(b"zzzzzzzz")
    relay.actions.clear()
    foreign = server_frame(0xA, b"yyyyyyyy")
    assert relay.from_upstream(foreign) is foreign


def test_next_check_asks_for_no_work_while_nothing_can_expire():
    """The timer wheel calls check_timers only when a deadline may have come (issue #15 item 5)."""
    assert new_relay(idle_timeout=0).next_check(5.0) == 0.0  # open, no idle timeout: never
    relay = new_relay(idle_timeout=3600, now=0.0)
    assert relay.next_check(0.0) == 10.0  # open with an idle timeout: every IDLE_CHECK_SECONDS at most
    assert new_relay(idle_timeout=8, now=0.0).next_check(1.0) == 3.0  # or a quarter of the timeout
    relay.state = RelayState.CLOSED
    assert relay.next_check(1.0) == 0.0

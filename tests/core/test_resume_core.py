"""The sans-IO resume core: offers, tokens, the envelope reader, the replay buffer and the session machine.

Bytes in, actions out: no sockets, no clock (``now`` is passed), mask keys from a
counter.  The reader is fed every input split at every offset.
"""

from __future__ import annotations

import itertools
import json
import struct

import pytest

from edgeproxy.core import _accel
from edgeproxy.core.resume import (
    CLOSE_NOT_RESUMABLE,
    ENDED,
    PARKED,
    PAUSE_UPSTREAM,
    RESUME_UPSTREAM,
    MessageReader,
    NotResumable,
    ReplayBuffer,
    ResumeSession,
    SessionState,
    TokenCodec,
    encode_control,
    encode_data,
    parse_offers,
    route_key,
)
from edgeproxy.core.websocket import (
    ABORT_CLIENT,
    ABORT_UPSTREAM,
    CLOSE_CLIENT,
    CLOSE_UPSTREAM,
    PONG_FROM_CLIENT,
    SEND_CLIENT,
    SEND_UPSTREAM,
)
from edgeproxy.errors import RemoteProtocolError

KEY = b"\x01\x02\x03\x04"
ROUTE = route_key(None, "/", "app")


def masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return _accel.encode_frame(opcode, payload, fin=fin, mask_key=KEY)


def client_data(seq: int, text: str) -> bytes:
    return masked(_accel.OP_TEXT, f"D{seq}:{text}".encode())


def client_control(fields: dict) -> bytes:
    return masked(_accel.OP_TEXT, b"C" + json.dumps(fields).encode())


def upstream_text(text: str) -> bytes:
    return _accel.encode_frame(_accel.OP_TEXT, text.encode())


def frames(data: bytes, masked_frames: bool = False) -> list[tuple[int, bytes]]:
    return MessageReader(masked=masked_frames).feed(data)


# -- offers ------------------------------------------------------------------------


def test_offers_strip_the_wrapper_and_keep_other_protocols() -> None:
    offer = parse_offers([b"edgeproxy.resume.v1+chat, edgeproxy.resume.v1", b"plain"])
    assert offer.forward == ("chat", "plain")
    assert offer.wrapper_for("chat") == "edgeproxy.resume.v1+chat"
    assert offer.wrapper_for(None) == "edgeproxy.resume.v1"
    assert offer.wrapper_for("plain") is None
    assert offer.token is None


def test_offers_without_the_wrapper_are_not_resume() -> None:
    assert parse_offers([]) is None
    assert parse_offers([b"chat, superchat"]) is None


def test_resume_offer_carries_token_and_seq() -> None:
    offer = parse_offers([b"edgeproxy.resume.v1+chat, edgeproxy.resume.v1.r.abc-_DEF.42"])
    assert (offer.token, offer.last_seq, offer.forward) == ("abc-_DEF", 42, ("chat",))


@pytest.mark.parametrize("bad", [b"edgeproxy.resume.v1, edgeproxy.resume.v1.r.tok", b"edgeproxy.resume.v1, edgeproxy.resume.v1.r..5",
                                 b"edgeproxy.resume.v1, edgeproxy.resume.v1.r.tok.x1", b"edgeproxy.resume.v1.r.tok.1"])
def test_malformed_resume_offers_are_refused(bad: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_offers([bad])


# -- tokens ------------------------------------------------------------------------


def test_token_round_trip_and_binding() -> None:
    codec = TokenCodec(b"s" * 16, "edge-1")
    token = codec.issue(b"\x07" * 16, 3, ROUTE)
    assert all(c.isalnum() or c in "-_" for c in token)  # an HTTP token character set
    assert codec.verify(token, ROUTE) == (b"\x07" * 16, 3)
    with pytest.raises(NotResumable, match="invalid token"):
        codec.verify(token, route_key(None, "/other", "app"))  # bound to its route
    with pytest.raises(NotResumable, match="invalid token"):
        TokenCodec(b"t" * 16, "edge-1").verify(token, ROUTE)  # another secret: a forgery
    with pytest.raises(NotResumable, match="instance 'edge-1'"):
        TokenCodec(b"s" * 16, "edge-2").verify(token, ROUTE)


def test_every_flipped_bit_is_refused() -> None:
    codec = TokenCodec(b"s" * 16, "i")
    raw = bytearray(__import__("base64").urlsafe_b64decode(codec.issue(b"\x00" * 16, 1, ROUTE) + "=="))
    import base64

    for i in range(len(raw) * 8):
        forged = bytearray(raw)
        forged[i // 8] ^= 1 << (i % 8)
        with pytest.raises(NotResumable):
            codec.verify(base64.urlsafe_b64encode(bytes(forged)).rstrip(b"=").decode(), ROUTE)
    for junk in ["", "!!!", "AAAA"]:
        with pytest.raises(NotResumable, match="malformed"):
            codec.verify(junk, ROUTE)


# -- the reader --------------------------------------------------------------------


def test_reader_joins_fragments_and_passes_control_frames_at_every_split() -> None:
    stream = (
        masked(_accel.OP_TEXT, b"hel", fin=False)
        + masked(_accel.OP_PING, b"p")
        + masked(_accel.OP_CONT, b"lo", fin=False)
        + masked(_accel.OP_CONT, b"!", fin=True)
        + masked(_accel.OP_BINARY, bytes(300))
        + masked(_accel.OP_CLOSE, _accel.encode_close_payload(1000, "bye"))
    )
    expected = [(9, b"p"), (1, b"hello!"), (2, bytes(300)), (8, _accel.encode_close_payload(1000, "bye"))]
    for cut in range(len(stream) + 1):
        reader = MessageReader(masked=True)
        assert reader.feed(stream[:cut]) + reader.feed(stream[cut:]) == expected, cut
    for a, b in itertools.combinations(range(0, len(stream), 7), 2):
        reader = MessageReader(masked=True)
        assert reader.feed(stream[:a]) + reader.feed(stream[a:b]) + reader.feed(stream[b:]) == expected


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (upstream_text("unmasked from a client"), 1002),
        (masked(_accel.OP_CONT, b"x"), 1002),
        (masked(_accel.OP_TEXT, b"a", fin=False) + masked(_accel.OP_TEXT, b"b"), 1002),
        (masked(_accel.OP_PING, bytes(126)), 1002),
        (masked(3, b"reserved"), 1002),
        (_accel.encode_frame(_accel.OP_TEXT, b"x", rsv=4, mask_key=KEY), 1002),
        (masked(_accel.OP_BINARY, bytes(101)), 1009),
    ],
)
def test_reader_refuses_what_it_cannot_reframe(data: bytes, code: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        MessageReader(masked=True, max_message_size=100).feed(data)
    assert info.value.close_code == code


# -- the buffer --------------------------------------------------------------------


def run_of(*frames: bytes) -> tuple[bytes, bytes]:
    """A run as number_frames gives it: the frames back to back, and where each ends."""
    return b"".join(frames), struct.pack(f"<{len(frames)}Q", *itertools.accumulate(map(len, frames)))


def test_buffer_acks_and_replays_the_frames_as_sent() -> None:
    buf = ReplayBuffer(10)
    assert buf.extend(*run_of(b"f1", b"f2", b"f3")) and buf.extend(*run_of(b"f4", b"f5"))
    assert not buf.extend(*run_of(b"f6"))  # 12 bytes > 10: the caller decides
    assert buf.size == 12 and len(buf) == 6 and buf.last == 6
    assert buf.replay_from(3) == [b"f4f5", b"f6"]
    assert buf.replay_from(1) == [b"f2f3", b"f4f5", b"f6"]  # from inside a run
    buf.ack(2)  # inside the first run: counted out of size, its memory kept until its last message is acked
    assert buf.size == 8 and buf.held == 12 and buf.acked == 2 and len(buf) == 4
    assert buf.replay_from(1) is None  # message 2 is acknowledged: a resume from before it is refused
    assert buf.replay_from(2) == [b"f3", b"f4f5", b"f6"] and buf.replay_from(6) == []
    buf.ack(3)
    assert buf.size == 6 and buf.held == 6 and len(buf) == 3
    buf.ack(1)  # an old ack changes nothing
    assert buf.acked == 3 and buf.size == 6
    buf.ack(6)
    assert buf.size == 0 and len(buf) == 0 and buf.acked == 6


# -- the session -------------------------------------------------------------------


def new_session(window: float = 10.0, limit: int = 1 << 20) -> ResumeSession:
    keys = (i.to_bytes(4, "big") for i in itertools.count(1))
    s = ResumeSession(session_id=b"\x05" * 16, route_key=ROUTE, codec=TokenCodec(b"k" * 16, "me"), window=window,
                      buffer_limit=limit, mask_key_source=lambda: next(keys), now=0.0)
    s.open()
    return s


def take(s: ResumeSession) -> list[tuple[str, bytes | None]]:
    out = s.actions[:]
    s.actions.clear()
    return out


def decoded(actions, kind=SEND_CLIENT) -> list[tuple[int, bytes]]:
    """Messages inside the frames of `kind` actions (upstream frames are masked)."""
    data = b"".join(b"".join(d) if isinstance(d, list) else d for k, d in actions if k == kind)
    return MessageReader(masked=kind == SEND_UPSTREAM).feed(data)


def test_new_session_sends_its_token_first_and_numbers_upstream_messages() -> None:
    s = new_session()
    [(opcode, payload)] = decoded(take(s))
    hello = json.loads(payload[1:])
    assert payload[:1] == b"C" and hello["t"] == "session" and hello["resumed"] is False
    assert s.codec.verify(hello["token"], ROUTE) == (b"\x05" * 16, 1)
    s.from_upstream(upstream_text("a") + _accel.encode_frame(_accel.OP_BINARY, b"\x00b"))
    assert decoded(take(s)) == [(1, b"D1:a"), (2, b"D2:\x00b")]


def test_client_messages_are_forwarded_once_in_order_and_acknowledged() -> None:
    s = new_session()
    take(s)
    s.from_client(client_data(1, "x") + client_data(2, "y") + client_data(1, "x"), 0.0)
    actions = take(s)
    assert decoded(actions, SEND_UPSTREAM) == [(1, b"x"), (1, b"y")]
    s.check_timers(0.1)
    [(_, ack)] = decoded(take(s))
    assert json.loads(ack[1:]) == {"t": "ack", "seq": 2}
    s.from_client(client_data(4, "gap"), 0.2)
    actions = take(s)
    assert (CLOSE_CLIENT, None) in actions and s.state is SessionState.CLOSED
    closes = [p for op, p in decoded(actions) if op == 8]
    assert _accel.parse_close_payload(closes[0])[0] == 1002


def test_client_pings_pongs_and_app_level_ping() -> None:
    s = new_session()
    take(s)
    s.from_client(masked(_accel.OP_PING, b"hb") + masked(_accel.OP_PONG, b"12345678") + client_control({"t": "ping", "id": 7}), 0)
    actions = take(s)
    assert (PONG_FROM_CLIENT, b"12345678") in actions
    assert decoded(actions) == [(10, b"hb"), (1, b'C{"t":"pong","id":7}')]


def test_park_buffer_and_resume_replays_exactly_the_missed_messages() -> None:
    s = new_session()
    take(s)
    s.from_upstream(b"".join(upstream_text(f"m{i}") for i in range(1, 4)))
    s.from_client(client_control({"t": "ack", "seq": 1}) + client_data(1, "c1"), 0)
    take(s)
    s.client_gone(1.0)
    assert [k for k, _ in take(s)] == [ABORT_CLIENT, PARKED]
    assert s.state is SessionState.PARKED and s.parked_until == 11.0
    s.from_upstream(upstream_text("m4"))
    assert take(s) == []  # buffered while parked
    s.attach(2, 2.0)  # the client saw m1 and m2
    messages = decoded(take(s))
    hello = json.loads(messages[0][1][1:])
    assert hello["resumed"] is True and hello["ack"] == 1 and hello["replayed"] == 2
    assert messages[1:] == [(1, b"D3:m3"), (1, b"D4:m4")]
    # the client resends c1 (unacked on its side) and c2: c1 is a duplicate
    s.from_client(client_data(1, "c1") + client_data(2, "c2"), 2.0)
    assert decoded(take(s), SEND_UPSTREAM) == [(1, b"c2")]
    # the old token is spent; the new one names generation 2
    assert s.codec.verify(hello["token"], ROUTE)[1] == s.generation == 2


def test_window_expiry_closes_the_upstream_1001() -> None:
    s = new_session(window=5)
    take(s)
    s.client_gone(0.0)
    take(s)
    s.check_timers(4.9)
    assert take(s) == []
    s.check_timers(5.0)
    actions = take(s)
    [(op, payload)] = decoded(actions, SEND_UPSTREAM)
    assert op == 8 and _accel.parse_close_payload(payload)[0] == 1001
    assert (CLOSE_UPSTREAM, None) in actions and (ENDED, None) in actions
    assert s.end_reason == "resume window expired"
    with pytest.raises(NotResumable):
        s.attach(0, 6.0)


def test_buffer_overflow_while_parked_ends_the_session_and_frees_the_buffer() -> None:
    s = new_session(limit=1024)
    take(s)
    s.client_gone(0.0)
    take(s)
    s.from_upstream(upstream_text("x" * 1000))
    assert take(s) == [] and s.held_bytes == len(encode_data(1, 1, b"x" * 1000))
    s.from_upstream(upstream_text("y" * 100))
    actions = take(s)
    assert (ENDED, None) in actions and s.end_reason == "buffer overflow"
    assert s.held_bytes == 0 and s.state is SessionState.CLOSED


def test_a_parked_overflow_in_a_split_frame_ends_the_session_and_keeps_nothing_after() -> None:
    s = new_session(limit=1024)
    take(s)
    s.client_gone(0.0)
    take(s)
    frames = upstream_text("x" * 1100) + upstream_text("after") + upstream_text("more")
    s.from_upstream(frames[:10])  # the first frame split across two reads
    s.from_upstream(frames[10:])
    assert s.state is SessionState.CLOSED and s.end_reason == "buffer overflow"
    assert s.held_bytes == 0 and s.out_seq == 1 and s.messages_from_upstream == 1


def test_a_full_buffer_while_attached_pauses_the_upstream_until_acks_free_half() -> None:
    s = new_session(limit=1024)
    take(s)
    s.from_upstream(upstream_text("1" * 500))
    assert PAUSE_UPSTREAM not in [k for k, _ in take(s)]
    s.from_upstream(upstream_text("2" * 500) + upstream_text("3" * 500))  # one read past the bound
    actions = take(s)
    assert (PAUSE_UPSTREAM, None) in actions and s.upstream_paused
    assert [p[:3] for _, p in decoded(actions)] == [b"D2:", b"D3:"]  # nothing dropped
    assert s.buffer.acked == 0 and len(s.buffer) == 3
    s.from_client(client_control({"t": "ack", "seq": 1}), 0.0)
    assert RESUME_UPSTREAM not in [k for k, _ in take(s)]  # 2 of 3 still held: more than half
    s.from_client(client_control({"t": "ack", "seq": 2}), 0.0)
    assert (RESUME_UPSTREAM, None) in take(s) and not s.upstream_paused  # 3 alone is under half the bound
    assert s.buffer.held > s.buffer.size  # 2 and 3 came in one read: its memory goes when 3 is acked
    s.from_client(client_control({"t": "ack", "seq": 3}), 0.0)
    assert s.buffer.size == s.buffer.held == 0


def test_a_session_parked_with_a_full_buffer_stays_resumable_with_its_upstream_paused() -> None:
    s = new_session(limit=1024)
    take(s)
    s.from_upstream(upstream_text("1" * 600) + upstream_text("2" * 600))
    assert (PAUSE_UPSTREAM, None) in take(s)
    s.client_gone(1.0)
    assert (ENDED, None) not in take(s) and s.state is SessionState.PARKED and s.upstream_paused
    s.attach(0, 2.0)
    messages = decoded(take(s))
    assert [p[:3] for _, p in messages[1:]] == [b"D1:", b"D2:"]


def test_a_resume_that_saw_everything_reads_a_paused_upstream_again() -> None:
    """The client had every message of a full buffer when it dropped: no later ack would come to un-pause."""
    s = new_session(limit=1024)
    take(s)
    s.from_upstream(upstream_text("1" * 600) + upstream_text("2" * 600))
    assert (PAUSE_UPSTREAM, None) in take(s)
    s.client_gone(1.0)
    take(s)
    s.attach(2, 2.0)  # it saw both
    actions = take(s)
    assert (RESUME_UPSTREAM, None) in actions and not s.upstream_paused and s.buffer.size == 0
    assert [json.loads(p[1:])["replayed"] for _, p in decoded(actions)] == [0]


def test_idle_timeout_closes_an_attached_session_on_both_sides() -> None:
    keys = (i.to_bytes(4, "big") for i in itertools.count(1))
    s = ResumeSession(session_id=b"\x05" * 16, route_key=ROUTE, codec=TokenCodec(b"k" * 16, "me"), window=10,
                      buffer_limit=1 << 20, idle_timeout=60, mask_key_source=lambda: next(keys), now=0.0)
    s.open()
    take(s)
    s.check_timers(30.0)
    s.from_upstream(upstream_text("tick"))
    s.check_timers(59.0)  # traffic at 30-59 s: active
    s.check_timers(100.0)
    assert not [op for op, _ in decoded(take(s)) if op == 8] and s.state is SessionState.ATTACHED  # 41 s idle so far
    s.check_timers(119.5)
    actions = take(s)
    assert s.state is SessionState.CLOSING
    assert [_accel.parse_close_payload(p) for op, p in decoded(actions, SEND_UPSTREAM) if op == 8] == [(1001, "idle timeout")]
    assert not [op for op, _ in decoded(actions) if op == 8]  # the client's close waits for the upstream's answer
    s.from_upstream(_accel.encode_frame(_accel.OP_CLOSE, _accel.encode_close_payload(1001, "idle timeout")))
    assert [_accel.parse_close_payload(p)[0] for op, p in decoded(take(s)) if op == 8] == [1001]
    # parked sessions are not idle-timed: their window rules
    s2 = new_session()
    s2.client_gone(0.0)
    s2.check_timers(9.0)
    assert s2.state is SessionState.PARKED


def test_a_proxy_close_delivers_what_the_upstream_sent_before_its_close() -> None:
    """Drain: the upstream is closed first; its messages in flight reach the client, then the close."""
    s = new_session()
    take(s)
    s.close_both(1012, "restart")
    actions = take(s)
    assert [_accel.parse_close_payload(p) for op, p in decoded(actions, SEND_UPSTREAM) if op == 8] == [(1012, "restart")]
    assert decoded(actions) == []
    s.from_client(masked(_accel.OP_TEXT, b"D1:late"), 0.0)  # the upstream is closing: not forwarded
    assert decoded(take(s), SEND_UPSTREAM) == []
    s.from_upstream(upstream_text("in flight 1") + upstream_text("in flight 2")
                    + _accel.encode_frame(_accel.OP_CLOSE, _accel.encode_close_payload(1012, "restart")))
    got = decoded(take(s))
    assert got[:2] == [(1, b"D1:in flight 1"), (1, b"D2:in flight 2")]
    assert got[2][0] == 8 and _accel.parse_close_payload(got[2][1]) == (1012, "restart") and len(got) == 3
    s.from_client(masked(_accel.OP_CLOSE, _accel.encode_close_payload(1012, "restart")), 0.0)
    assert (ENDED, None) in take(s) and s.state is SessionState.CLOSED


def test_a_proxy_close_the_upstream_never_answers_still_closes_the_client() -> None:
    s = new_session()
    take(s)
    s.close_both(1012, "restart")
    take(s)
    s.check_timers(1.0)
    s.check_timers(1.0 + s.close_timeout)
    actions = take(s)
    assert [_accel.parse_close_payload(p)[0] for op, p in decoded(actions) if op == 8] == [1012]
    assert (CLOSE_CLIENT, None) in actions and (ABORT_UPSTREAM, None) in actions and s.state is SessionState.CLOSED


def test_a_client_that_closes_first_during_a_proxy_close_is_answered_once() -> None:
    s = new_session()
    take(s)
    s.close_both(1012, "restart")
    take(s)
    s.from_client(masked(_accel.OP_CLOSE, _accel.encode_close_payload(1000, "bye")), 0.0)
    assert [_accel.parse_close_payload(p) for op, p in decoded(take(s)) if op == 8] == [(1000, "bye")]
    s.from_upstream(_accel.encode_frame(_accel.OP_CLOSE, _accel.encode_close_payload(1012, "restart")))
    actions = take(s)
    assert not [op for op, _ in decoded(actions) if op == 8] and (ENDED, None) in actions


def test_close_1000_from_the_client_ends_the_session_at_the_upstream() -> None:
    s = new_session()
    take(s)
    s.from_client(masked(_accel.OP_CLOSE, _accel.encode_close_payload(1000, "done")), 0)
    actions = take(s)
    assert s.state is SessionState.CLOSING
    [(op, payload)] = decoded(actions, SEND_UPSTREAM)
    assert op == 8 and _accel.parse_close_payload(payload) == (1000, "done")
    s.from_upstream(_accel.encode_frame(_accel.OP_CLOSE, _accel.encode_close_payload(1000, "done")))
    assert (ENDED, None) in take(s) and s.state is SessionState.CLOSED


def test_other_close_codes_park() -> None:
    s = new_session()
    take(s)
    s.from_client(masked(_accel.OP_CLOSE, _accel.encode_close_payload(1001, "tab hidden")), 3.0)
    actions = take(s)
    assert (PARKED, None) in actions and s.state is SessionState.PARKED and s.parked_until == 13.0


def test_upstream_close_is_forwarded_and_ends_resume() -> None:
    s = new_session()
    take(s)
    s.from_upstream(_accel.encode_frame(_accel.OP_CLOSE, _accel.encode_close_payload(4000, "app done")))
    actions = take(s)
    [(op, payload)] = [m for m in decoded(actions) if m[0] == 8]
    assert _accel.parse_close_payload(payload) == (4000, "app done")
    s.from_client(masked(_accel.OP_CLOSE, _accel.encode_close_payload(4000, "app done")), 0)
    assert (ENDED, None) in take(s)


def test_close_code_is_documented_value() -> None:
    assert CLOSE_NOT_RESUMABLE == 4409
    assert encode_data(1, 7, b"x") == _accel.encode_frame(1, b"D7:x")
    assert encode_control({"t": "ack", "seq": 1}) == _accel.encode_frame(1, b'C{"t":"ack","seq":1}')


# -- the fast path and the slow path give the same session, however the bytes arrive --------


def mixed_client_stream() -> bytes:
    parts = [client_data(1, "a"), client_data(2, "b" * 200), client_control({"t": "ack", "seq": 1}),
             client_data(2, "b" * 200), masked(_accel.OP_PING, b"hb"), client_data(3, "c"),
             masked(_accel.OP_TEXT, b"D4:fr", fin=False), masked(_accel.OP_CONT, b"ag"),
             client_data(5, "e" * 130), client_control({"t": "ping", "id": 3}), client_data(6, "f")]
    return b"".join(parts)


def mixed_upstream_stream() -> bytes:
    return b"".join([upstream_text("1"), upstream_text("2" * 300), _accel.encode_frame(_accel.OP_PING, b"up"),
                     upstream_text("3"), _accel.encode_frame(_accel.OP_TEXT, b"fr", fin=False),
                     _accel.encode_frame(_accel.OP_CONT, b"ag"), upstream_text("5" * 70000), upstream_text("6")])


def run_split(pieces_client, pieces_upstream):
    s = new_session()
    s.from_upstream(upstream_text("0"))  # so that the client's ack of 1 is valid
    take(s)
    for piece in pieces_upstream:
        s.from_upstream(piece)
    for piece in pieces_client:
        s.from_client(piece, 0.0)
    actions = take(s)
    up = b"".join(b"".join(d) if isinstance(d, list) else d for k, d in actions if k == SEND_UPSTREAM)
    to_client = [m for m in decoded(actions) if not m[1].startswith(b'C{"t":"ack"')]
    return up, to_client, s.in_seq, s.out_seq, b"".join(s.buffer.replay_from(s.buffer.acked))


def test_every_split_of_the_client_stream_gives_the_same_bytes_upstream() -> None:
    stream = mixed_client_stream()
    whole = run_split([stream], [])
    assert whole[2] == 6 and MessageReader(masked=True).feed(whole[0]) == [
        (1, b"a"), (1, b"b" * 200), (1, b"c"), (1, b"frag"), (1, b"e" * 130), (1, b"f")]
    assert [p for _, p in whole[1]] == [b"hb", b'C{"t":"pong","id":3}']
    for cut in range(1, len(stream)):
        assert run_split([stream[:cut], stream[cut:]], []) == whole, cut
    assert run_split([stream[i:i + 1] for i in range(len(stream))], []) == whole


def test_every_split_of_the_upstream_stream_gives_the_same_numbered_frames() -> None:
    stream = mixed_upstream_stream()
    whole = run_split([], [stream])
    # message 1 ("0") went out before; the six of the stream are 2..7, the pong to its ping aside
    assert whole[3] == 7 and [p[:3] for _, p in whole[1]] == [b"D2:", b"D3:", b"D4:", b"D5:", b"D6:", b"D7:"]
    first = _accel.encode_frame(_accel.OP_TEXT, b"D1:0")
    assert whole[4] == first + b"".join(_accel.encode_frame(op, p) for op, p in whole[1])  # the replay is what was sent
    assert b"up" in whole[0]  # the upstream's ping got its pong
    for cut in range(1, len(stream), 97):
        assert run_split([], [stream[:cut], stream[cut:]]) == whole, cut
    for cut in range(len(stream) - 300, len(stream)):
        assert run_split([], [stream[:cut], stream[cut:]]) == whole, cut


def test_every_split_of_a_stream_that_breaks_the_rules_gives_the_same_end() -> None:
    """A message inside a fragmented one is refused (1002) however the bytes arrive, and nothing of it leaks."""
    upstream = (upstream_text("ok") + _accel.encode_frame(_accel.OP_TEXT, b"part1", fin=False)
                + upstream_text("intruder") + _accel.encode_frame(_accel.OP_CONT, b"part2"))
    client = (client_data(1, "ok") + masked(_accel.OP_TEXT, b"D2:part1", fin=False)
              + client_control({"t": "ack", "seq": 0}) + masked(_accel.OP_CONT, b"part2"))

    def outcome(pieces, side):
        s = new_session()
        take(s)
        for piece in pieces:
            (s.from_upstream(piece) if side == "upstream" else s.from_client(piece, 0.0))
        actions = take(s)
        sent = [p for _, p in decoded(actions)] + [p for _, p in decoded(actions, SEND_UPSTREAM)]
        return s.state, s.out_seq, s.in_seq, [p for p in sent if b"intruder" in p or b"part" in p]

    for stream, side in ((upstream, "upstream"), (client, "client")):
        whole = outcome([stream], side)
        assert whole[0] is SessionState.CLOSED and whole[3] == []
        for cut in range(1, len(stream)):
            assert outcome([stream[:cut], stream[cut:]], side) == whole, (side, cut)

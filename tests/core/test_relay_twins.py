"""The relay hot path: pure and compiled RelayCore / RelayEndpoint behave the same."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.core.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, encode_close_payload, encode_frame


def make_relay(impl, max_message_size=0):
    class Relay(impl.RelayCore):
        """A minimal slow path that records what reached it."""

        def __init__(self):
            super().__init__(max_message_size)
            self.actions = []
            self.stops = []

        def _after_stop(self, scanner, data, n, client):
            self.stops.append((client, n, scanner.close, type(scanner.error).__name__ if scanner.error else None))
            self.actions.append(("stop", client))
            return data[:n] if n != len(data) else data

    return Relay()


class FakeTransport:
    """An in-memory peer transport that records writes and reading pauses."""

    def __init__(self):
        self.written = []
        self.paused = False
        self.closing = False

    def write(self, data):
        self.written.append(bytes(data))

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def is_closing(self):
        return self.closing


class Owner:
    def __init__(self):
        self.calls = []

    def eof_received(self):
        self.calls.append("eof")
        return True

    def connection_lost(self, exc):
        self.calls.append(("lost", exc))


def test_core_forwards_the_same_object_and_counts(impl):
    relay = make_relay(impl)
    frame = encode_frame(OP_TEXT, b"hi", mask_key=b"abcd")
    assert relay.from_client(frame) is frame
    assert relay.bytes_from_client == len(frame) and relay.active
    assert relay.client_frames.messages == 1


def test_core_takes_the_slow_path_on_close_and_when_not_passing(impl):
    relay = make_relay(impl)
    close = encode_frame(OP_CLOSE, encode_close_payload(1000))
    assert relay.from_upstream(close + b"junk") == close
    assert relay.stops == [(False, len(close), (1000, ""), None)]
    assert relay.from_upstream(b"more") is None  # nothing after a close frame
    relay.passing = False
    data = encode_frame(OP_BINARY, b"x", mask_key=b"abcd")
    relay.from_client(data)
    assert relay.stops[-1] == (True, len(data), None, None)


def test_endpoint_writes_to_the_peer_and_runs_actions(impl):
    relay = make_relay(impl, max_message_size=4)
    peer, owner, ran = FakeTransport(), Owner(), []
    end = impl.RelayEndpoint(relay, True, peer, owner, lambda: ran.append(len(relay.actions)))
    ok = encode_frame(OP_TEXT, b"abc", mask_key=b"abcd")
    end.data_received(ok)
    assert peer.written == [ok] and ran == []
    end.data_received(encode_frame(OP_TEXT, b"too long", mask_key=b"abcd"))
    assert ran == [1] and relay.stops[-1][3] == "FrameError"
    end.pause_writing()
    assert peer.paused
    end.resume_writing()
    assert not peer.paused
    peer.closing = True
    end.pause_writing()
    assert not peer.paused  # a closing transport is left alone
    assert end.eof_received() is True
    end.connection_lost(None)
    assert owner.calls == ["eof", ("lost", None)]


# Reserved opcodes (3, 7 data; 11, 15 control), continuations in any state, FIN=0 and
# payloads over 125 bytes on control frames: all relayed, the endpoints judge them.
frames = st.lists(
    st.tuples(
        st.sampled_from([OP_TEXT, OP_BINARY, OP_PING, OP_CONT, 3, 7, 11, 15]),
        st.binary(max_size=200),
        st.sampled_from([True, True, False]),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(frames=frames, cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=6),
       limit=st.sampled_from([0, 50, 150]), masked=st.booleans(), long_close=st.booleans())
def test_pure_and_compiled_endpoints_agree(frames, cuts, limit, masked, long_close):
    from tests.conftest import load_frame_impl

    close = encode_close_payload(1000) + (b"x" * 200 if long_close else b"")  # > 125 bytes: refused
    stream = b"".join(
        encode_frame(op, payload, fin=fin, mask_key=b"\x01\x02\x03\x04" if masked else None)
        for op, payload, fin in frames
    ) + encode_frame(OP_CLOSE, close, mask_key=b"abcd" if masked else None) + b"tail"
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)]) if b > a]
    results = []
    for name in ("pure", "compiled"):
        impl = load_frame_impl(name)
        relay = make_relay(impl, limit)
        peer = FakeTransport()
        end = impl.RelayEndpoint(relay, True, peer, Owner(), lambda: None)
        for piece in pieces:
            end.data_received(piece)
        results.append((b"".join(peer.written), relay.stops, relay.bytes_from_client, relay.client_frames.messages))
    assert results[0] == results[1]

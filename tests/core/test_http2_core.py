"""core.http2 bytes in, bytes out: an h2 client on one side, `ServerConnection` on the other."""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import PingFrame, RstStreamFrame

from edgeproxy.core import http2 as core


class Pair:
    def __init__(self, **kw):
        self.server = core.ServerConnection(**kw)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        self.now = 0.0

    def to_server(self, data: bytes | None = None, split: int | None = None) -> list:
        data = self.client.data_to_send() if data is None else data
        if split is None:
            return self.server.receive_data(data, self.now)
        return self.server.receive_data(data[:split], self.now) + self.server.receive_data(data[split:], self.now)

    def to_client(self) -> list:
        return self.client.receive_data(self.server.data_to_send())

    def get(self, path=b"/", extra=(), end=True) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, [(b":method", b"GET"), (b":path", path), (b":scheme", b"https"),
                                       (b":authority", b"example.com"), *extra], end_stream=end)
        return sid


def test_request_head_is_an_http11_head():
    pair = Pair()
    sid = pair.get(b"/a/b?q=1", [(b"cookie", b"a=1"), (b"x-y", b"z"), (b"cookie", b"b=2")])
    request, ended = pair.to_server()
    assert isinstance(request, core.Request) and request.ended and ended == core.RequestEnded(sid)
    head = request.head
    assert (head.method, head.target, head.host, head.path, head.has_body) == (b"GET", b"/a/b?q=1", "example.com",
                                                                               "/a/b", False)
    assert head.headers == [(b"host", b"example.com"), (b"x-y", b"z"), (b"cookie", b"a=1; b=2")]


def test_every_split_of_the_preface_and_first_frames_gives_the_same_events():
    whole = Pair()
    whole.get()
    data = whole.client.data_to_send()
    expected = whole.to_server(data)
    for split in range(1, len(data)):
        pair = Pair()
        assert repr(pair.to_server(data, split)) == repr(expected), split


def test_response_waits_for_the_window_and_says_when_the_queue_drains():
    pair = Pair(stream_buffer=1000)
    sid = pair.get()
    pair.to_server()
    pair.server.send_response(sid, 200, [(b"Content-Type", b"x"), (b"Connection", b"close"), (b"Keep-Alive", b"1")])
    assert pair.server.send_data(sid, b"x" * 70000) is False  # 65535 can go, the rest waits
    events = pair.to_client()
    head = next(e for e in events if isinstance(e, h2.events.ResponseReceived))
    assert head.headers == [(b":status", b"200"), (b"content-type", b"x")]  # hop-by-hop gone, names lower case
    got = sum(e.flow_controlled_length for e in events if isinstance(e, h2.events.DataReceived))
    assert got == 65535 and pair.server.buffered(sid) == 70000 - 65535
    assert pair.server.send_data(sid, b"", end=True) is False
    pair.client.acknowledge_received_data(got, sid)
    assert pair.to_server() == [core.Drained(sid)]
    events = pair.to_client()
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)


def test_request_body_credit_comes_back_only_when_acked():
    pair = Pair(initial_window_size=1000)
    pair.to_client()  # our SETTINGS: 1000-byte stream windows
    sid = pair.get(end=False)
    pair.client.send_data(sid, b"x" * 1000)
    events = pair.to_server()
    data = next(e for e in events if isinstance(e, core.Data))
    assert data.flow == 1000
    pair.to_client()
    assert pair.client.local_flow_control_window(sid) == 0
    pair.server.ack(sid, data.flow)
    pair.to_client()
    assert pair.client.local_flow_control_window(sid) == 1000


def test_answer_before_the_body_ended_resets_the_stream_after_it():
    pair = Pair()
    sid = pair.get(end=False)
    pair.to_server()
    pair.server.send_simple(sid, 404, "no route", request_done=False)
    events = pair.to_client()
    kinds = [type(e) for e in events if getattr(e, "stream_id", None) == sid]
    assert kinds[-1] is h2.events.StreamReset and events[-1].error_code == ErrorCodes.NO_ERROR
    assert h2.events.StreamEnded in kinds  # the whole answer first (RFC 9113 section 8.1)


def test_goaway_names_the_last_stream_and_refuses_later_ones():
    pair = Pair()
    first = pair.get()
    pair.to_server()
    pair.server.goaway()
    goaway = next(e for e in pair.to_client() if isinstance(e, h2.events.ConnectionTerminated))
    assert (goaway.error_code, goaway.last_stream_id) == (ErrorCodes.NO_ERROR, first)
    # the first stream can still be answered
    pair.server.send_simple(first, 200, "ok")
    assert pair.server.data_to_send()


def test_budget_window_restarts():
    pair = Pair(max_control_frames=10, flood_window=1.0)
    pair.to_server()
    pings = b"".join(PingFrame(0, struct.pack("!Q", i)).serialize() for i in range(8))
    assert pair.server.receive_data(pings, 0.5) == []
    assert pair.server.receive_data(pings, 1.6) == []  # a new window
    (ended,) = pair.server.receive_data(pings, 1.7)
    assert (ended.reason, ended.error_code) == (core.CONTROL_FLOOD, ErrorCodes.ENHANCE_YOUR_CALM)


@pytest.mark.parametrize("split", [1, 5, 9, 12])
def test_scanner_counts_frames_split_across_reads(split):
    pair = Pair(max_resets=3)
    pair.to_server()
    resets = b"".join(RstStreamFrame(2 * i + 1, error_code=8).serialize() for i in range(4))
    events = pair.server.receive_data(resets[:split], 0.0) + pair.server.receive_data(resets[split:], 0.0)
    assert events[-1].reason == core.RAPID_RESET


def _raw_request(path: bytes) -> list:
    """A request h2's client would not send, straight after the preface and an empty SETTINGS."""
    server = core.ServerConnection()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    block = client.encoder.encode([(b":method", b"GET"), (b":path", path), (b":scheme", b"https"),
                                   (b":authority", b"example.com")])
    frame = struct.pack("!I", len(block))[1:] + bytes([1, 0x5]) + struct.pack("!I", 1) + block
    return server.receive_data(core.PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + frame, 0.0)


def test_a_path_that_is_not_origin_form_is_a_400_on_its_stream():
    refused, ended = _raw_request(b"x")
    assert (refused.stream_id, refused.status, ended) == (1, 400, core.RequestEnded(1))


def test_an_empty_path_is_h2s_protocol_error():
    (ended,) = _raw_request(b"")
    assert (ended.reason, ended.error_code) == (core.PROTOCOL_ERROR, ErrorCodes.PROTOCOL_ERROR)


# -- RFC 8441: WebSocket over HTTP/2 ---------------------------------------------------


def _connect(pair: Pair, protocol: bytes = b"websocket", extra=()) -> int:
    pair.to_client()  # the server's SETTINGS: h2 lets a client send :protocol only once they allow it
    sid = pair.client.get_next_available_stream_id()
    pair.client.send_headers(sid, [(b":method", b"CONNECT"), (b":protocol", protocol), (b":scheme", b"https"),
                                   (b":path", b"/chat?room=1"), (b":authority", b"example.com"),
                                   (b"sec-websocket-version", b"13"), *extra])
    return sid


def test_the_setting_is_advertised_only_when_websocket_is_on():
    from h2.settings import SettingCodes
    for on in (True, False):
        pair = Pair(websocket=on)
        pair.to_client()
        assert pair.client.remote_settings.get(SettingCodes.ENABLE_CONNECT_PROTOCOL, 0) == int(on)


def test_an_extended_connect_is_the_head_of_an_http11_upgrade():
    pair = Pair(websocket=True)
    sid = _connect(pair, extra=[(b"sec-websocket-key", b"ignored"), (b"sec-websocket-protocol", b"chat")])
    (event,) = pair.to_server()
    assert isinstance(event, core.WebSocketRequest) and event.stream_id == sid
    head = event.head
    assert (head.method, head.target, head.host, head.path, head.websocket, head.has_body) == (
        b"GET", b"/chat?room=1", "example.com", "/chat", True, False)
    assert head.headers == [(b"host", b"example.com"), (b"sec-websocket-version", b"13"),
                            (b"sec-websocket-protocol", b"chat")]  # no key: the proxy makes its own
    assert sid in pair.server.open


@pytest.mark.parametrize(("websocket", "protocol", "extra", "status"), [
    (False, b"websocket", (), 501),  # not advertised
    (True, b"connect-udp", (), 501),  # not a WebSocket
])
def test_other_extended_connects_are_refused(websocket, protocol, extra, status):
    pair = Pair(websocket=websocket)
    if not websocket:  # write what h2 would refuse to send without the setting
        from h2.settings import SettingCodes
        pair.to_client()
        pair.client.remote_settings[SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1
    sid = _connect(pair, protocol, extra)
    (event,) = pair.to_server()
    assert isinstance(event, core.Refused) and (event.stream_id, event.status) == (sid, status)
    assert not event.ended


def test_a_half_closed_websocket_stream_still_takes_the_clients_data():
    pair = Pair(websocket=True)
    sid = _connect(pair)
    pair.to_server()
    pair.server.send_response(sid, 200, [])
    pair.server.send_data(sid, b"close frame")
    pair.server.half_close(sid)
    ended = [e for e in pair.to_client() if isinstance(e, h2.events.StreamEnded)]
    assert [e.stream_id for e in ended] == [sid]
    pair.client.send_data(sid, b"answer", end_stream=True)
    events = pair.to_server()
    assert [type(e) for e in events] == [core.Data, core.RequestEnded] and events[0].data == b"answer"
    pair.server.reset_when_sent(sid)  # closed both ways already: nothing to reset
    assert not any(isinstance(e, h2.events.StreamReset) for e in pair.to_client())


def test_a_websocket_stream_ended_while_the_client_still_sends_is_reset_after_the_last_bytes():
    pair = Pair(websocket=True, initial_window_size=65535)
    sid = _connect(pair)
    pair.to_server()
    pair.server.send_response(sid, 200, [])
    pair.server.send_data(sid, b"x" * 70000)  # more than the client's 65535 window: some waits
    pair.server.half_close(sid)
    pair.server.reset_when_sent(sid)
    events = pair.to_client()
    assert not any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) for e in events)
    got = sum(len(e.data) for e in events if isinstance(e, h2.events.DataReceived))
    pair.client.acknowledge_received_data(got, sid)
    pair.to_server()
    events = pair.to_client()
    assert got + sum(len(e.data) for e in events if isinstance(e, h2.events.DataReceived)) == 70000
    kinds = [type(e) for e in events if not isinstance(e, h2.events.DataReceived)]
    assert kinds[-2:] == [h2.events.StreamEnded, h2.events.StreamReset]  # END_STREAM, then RST_STREAM NO_ERROR


def _received(events, sid) -> int:
    return sum(e.flow_controlled_length for e in events if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)


def test_the_connection_window_is_shared_round_robin_between_ready_streams():
    pair = Pair()
    # Stream windows of 16 MiB: only the connection window (65535, never raised by the client) binds.
    pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16 * 1024 * 1024})
    big, small = pair.get(b"/big"), pair.get(b"/small")
    pair.to_server()
    pair.to_client()
    pair.to_server()  # our SETTINGS ACK back
    pair.server.send_response(big, 200, [])
    pair.server.send_data(big, b"b" * 1_000_000, end=True)  # takes the whole connection window
    pair.server.send_response(small, 200, [])
    pair.server.send_data(small, b"s" * 20000, end=True)  # waits behind it
    events = pair.to_client()
    assert _received(events, big) == 65535 and _received(events, small) == 0
    got = {big: 0, small: 0}
    ended = set()
    for _ in range(4):  # the client reads and opens the connection window one frame at a time
        pair.client.increment_flow_control_window(16384)
        pair.to_server()
        events = pair.to_client()
        for sid in got:
            got[sid] += _received(events, sid)
        ended |= {e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)}
    # 64 KiB of credit went out shared: the small response is complete, the big one still waits.
    assert got[small] == 20000 and small in ended
    assert big not in ended and got[big] == 4 * 16384 - 20000
    assert pair.server.buffered(big) == 1_000_000 - 65535 - got[big]

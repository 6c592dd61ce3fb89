"""Malformed and hostile HTTP/2 (RFC 9113), frame by frame, against a real proxy on an h2c listener.

No h2spec can be installed from the registries here, so these are our own:
each attack gets its GOAWAY (with the error code the big proxies answer with)
or a stream reset, is counted in the metrics, and leaves a second client on
the same proxy untouched.  Frames are built with h2 (the client side) where it
will build them, and with hyperframe or raw bytes where it refuses to.
"""

from __future__ import annotations

import asyncio
import struct

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame

HOST = "127.0.0.1"
ENHANCE_YOUR_CALM = ErrorCodes.ENHANCE_YOUR_CALM
H2C = [{"bind": f"{HOST}:0", "http2": True}]


class Client:
    """A raw HTTP/2 client: h2 builds what it will, the test writes what it must."""

    def __init__(self, reader, writer, h2conn):
        self.reader, self.writer, self.h2 = reader, writer, h2conn
        self.events: list = []

    @classmethod
    async def open(cls, port: int, settings: dict | None = None) -> Client:
        reader, writer = await asyncio.open_connection(HOST, port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        if settings:
            conn.update_settings(settings)
        writer.write(conn.data_to_send())
        return cls(reader, writer, conn)

    def request(self, path: str = "/head", *, end: bool = True, extra=(), authority: bytes = b"localhost") -> int:
        sid = self.h2.get_next_available_stream_id()
        headers = [(b":method", b"GET"), (b":path", path.encode()), (b":scheme", b"http"),
                   (b":authority", authority), *extra]
        self.h2.send_headers(sid, headers, end_stream=end)
        self.flush()
        return sid

    def flush(self) -> None:
        self.writer.write(self.h2.data_to_send())

    def raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def until(self, predicate, timeout: float = 5.0):
        """Read (and answer, as h2 does) until an event matches; returns it (None at EOF)."""
        async def run():
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                data = await self.reader.read(65536)
                if not data:
                    return None
                try:
                    self.events += self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    pass
                out = self.h2.data_to_send()
                if out and not self.writer.is_closing():
                    self.writer.write(out)
        return await asyncio.wait_for(run(), timeout)

    async def goaway(self) -> h2.events.ConnectionTerminated:
        event = await self.until(lambda e: isinstance(e, h2.events.ConnectionTerminated))
        assert event is not None, "the proxy closed without a GOAWAY"
        return event

    async def response(self, sid: int) -> tuple[int, bytes]:
        await self.until(lambda e: isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == sid)
        status, body = 0, b""
        for event in self.events:
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
        self.flush()
        return status, body

    def close(self) -> None:
        self.writer.close()


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return struct.pack("!I", len(payload))[1:] + bytes([kind, flags]) + struct.pack("!I", stream_id) + payload


async def bystander_ok(port: int) -> None:
    """Another client on the same proxy is served while (and after) the attack is answered."""
    other = await Client.open(port)
    sid = other.request("/head")
    status, body = await other.response(sid)
    assert (status, len(body)) == (200, 1234)
    other.close()


async def calmed(p, client: Client, reason: str) -> None:
    """The attack got GOAWAY ENHANCE_YOUR_CALM, was counted once, and nobody else noticed."""
    event = await client.goaway()
    assert event.error_code == ENHANCE_YOUR_CALM
    assert p.server.metrics.http2_errors[reason] == 1
    assert f'edgeproxy_http2_connection_errors_total{{reason="{reason}"}} 1.0' in p.server.metrics.render().decode()
    await bystander_ok(p.port)


@pytest.fixture
async def h2c(http_backend, proxy):
    async def start(**http2):
        return await proxy(http_backend, listeners=H2C, http2=http2)
    return start


async def test_rapid_reset_gets_enhance_your_calm(h2c):
    p = await h2c(max_resets=20, flood_window=10)
    client = await Client.open(p.port)
    for _ in range(40):
        sid = client.request("/slow?delay=5", end=True)
        client.h2.reset_stream(sid, ErrorCodes.CANCEL)
    client.flush()
    await calmed(p, client, "rapid_reset")


async def test_continuation_flood_is_bounded_by_the_header_list_size(h2c):
    p = await h2c(max_header_list_size=4096)
    client = await Client.open(p.port)
    block = client.h2.encoder.encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
                                      (b":authority", b"localhost")])
    headers = HeadersFrame(1, block)  # no END_HEADERS: CONTINUATION frames must follow
    client.raw(headers.serialize())
    for _ in range(10):
        client.raw(ContinuationFrame(1, b"\x00" * 1000).serialize())  # never END_HEADERS
    await calmed(p, client, "continuation_flood")


@pytest.mark.parametrize("make", [
    lambda i: PingFrame(0, struct.pack("!Q", i)).serialize(),
    lambda i: SettingsFrame(0, {h2.settings.SettingCodes.ENABLE_PUSH: 0}).serialize(),
    lambda i: DataFrame(1, b"").serialize(),  # empty DATA without END_STREAM (CVE-2019-9518)
], ids=["ping", "settings", "empty-data"])
async def test_control_frame_floods_get_enhance_your_calm(h2c, make):
    p = await h2c(max_control_frames=100)
    client = await Client.open(p.port)
    client.request("/slow?delay=5", end=False)  # a stream for the empty DATA frames
    client.raw(b"".join(make(i) for i in range(300)))
    await calmed(p, client, "control_flood")


async def test_hpack_bomb_stops_at_the_header_list_size(h2c):
    p = await h2c(max_header_list_size=8192)
    client = await Client.open(p.port)
    # One 4000-byte field into the dynamic table, then referenced by index: ~4 KB on the wire, 80 KB decoded.
    client.request("/head", extra=[(b"x-bomb", b"a" * 4000)] * 20)
    await calmed(p, client, "header_list_too_large")


async def test_more_streams_than_advertised_is_a_protocol_error(h2c):
    p = await h2c(max_concurrent_streams=3)
    client = await Client.open(p.port)
    for _ in range(5):  # sent before the proxy's SETTINGS are read, so h2 does not stop us
        client.request("/slow?delay=2")
    event = await client.goaway()
    assert event.error_code == ErrorCodes.PROTOCOL_ERROR
    assert p.server.metrics.http2_errors["too_many_streams"] == 1
    await bystander_ok(p.port)


@pytest.mark.parametrize("data, code", [
    (frame(0, 0x1, 0, b"x"), ErrorCodes.PROTOCOL_ERROR),              # DATA on stream 0 (6.1)
    (frame(4, 0, 0, b"\x00\x04\x80\x00\x00\x00"), ErrorCodes.FLOW_CONTROL_ERROR),  # window > 2^31-1 (6.5.2)
    (frame(4, 0, 0, b"\x00\x02\x00\x00\x00\x07"), ErrorCodes.PROTOCOL_ERROR),  # ENABLE_PUSH = 7 (6.5.2)
    (frame(4, 0, 1, b""), ErrorCodes.PROTOCOL_ERROR),                  # SETTINGS on a stream (6.5)
    (frame(6, 0, 0, b"1234"), ErrorCodes.FRAME_SIZE_ERROR),           # PING of 4 bytes (6.7)
    (frame(8, 0, 0, b"\x00\x00\x00\x00"), ErrorCodes.PROTOCOL_ERROR),  # WINDOW_UPDATE of 0 (6.9)
    (frame(9, 0x4, 1, b""), ErrorCodes.PROTOCOL_ERROR),                # CONTINUATION without HEADERS (6.10)
    (frame(0, 0, 1, b"\x00" * 20000), ErrorCodes.FRAME_SIZE_ERROR),    # DATA over SETTINGS_MAX_FRAME_SIZE (4.2)
    (frame(1, 0x5, 2, b"\x82"), ErrorCodes.PROTOCOL_ERROR),            # a client stream with an even id (5.1.1)
], ids=["data-stream-0", "window-too-big", "enable-push-7", "settings-on-stream", "short-ping",
        "zero-window-update", "naked-continuation", "frame-too-large", "even-stream-id"])
async def test_malformed_frames_get_the_rfc_error_code(h2c, data, code):
    p = await h2c()
    client = await Client.open(p.port)
    client.raw(data)
    event = await client.goaway()
    assert event.error_code == code
    await bystander_ok(p.port)


async def test_bad_authority_and_connect_and_unrouted(http_backend, proxy):
    p = await proxy(http_backend, listeners=H2C, routes=[{"path_prefix": "/head", "upstream": "app"}])
    client = await Client.open(p.port)
    bad = client.request("/head", authority=b"a b")
    unrouted = client.request("/nothing")
    sid = client.h2.get_next_available_stream_id()
    client.h2.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"localhost:443")], end_stream=True)
    client.flush()
    assert (await client.response(bad))[0] == 400
    assert (await client.response(unrouted))[0] == 404
    assert (await client.response(sid))[0] == 501


@pytest.mark.parametrize("extra", [
    [(b"connection", b"keep-alive")],         # connection-specific (RFC 9113 8.2.2)
    [(b"host", b"other.example")],            # Host names another authority than :authority (8.3.1)
    [(b"te", b"gzip")],                       # TE other than "trailers" (8.2.2)
    [(b"X-Upper", b"1")],                     # upper case in a field name (8.2.1)
    [(b":path", b"/again")],                  # a pseudo-header twice (8.3)
], ids=["connection", "host-mismatch", "te-gzip", "uppercase", "duplicate-pseudo"])
async def test_malformed_requests_are_refused(h2c, extra):
    p = await h2c()
    client = await Client.open(p.port)
    block = client.h2.encoder.encode([(b":method", b"GET"), (b":path", b"/head"), (b":scheme", b"http"),
                                      (b":authority", b"localhost"), *extra])
    client.raw(frame(1, 0x5, 1, block))
    event = await client.until(lambda e: isinstance(e, (h2.events.StreamReset, h2.events.ConnectionTerminated)))
    assert event.error_code == ErrorCodes.PROTOCOL_ERROR
    await bystander_ok(p.port)


async def test_client_rst_stream_cancels_the_upstream_request(h2c, http_backend):
    p = await h2c()
    client = await Client.open(p.port)
    sid = client.request("/slow?delay=5")
    assert await _eventually(lambda: _streams(p) == 1)
    client.h2.reset_stream(sid, ErrorCodes.CANCEL)
    client.flush()
    assert await _eventually(lambda: _streams(p) == 0)
    sid = client.request("/head")
    assert (await client.response(sid))[0] == 200


def _streams(p) -> int:
    from edgeproxy.transport.http2 import Http2Connection
    return sum(len(c.streams) for c in p.server.connections if isinstance(c, Http2Connection))


async def _eventually(predicate, timeout: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()

"""WebSocket over HTTP/2 (RFC 8441, issue #16 item 3) with a client built on the `h2` library.

The `websockets` library cannot speak HTTP/2, so `H2WS` is a small client on
h2's client side: extended CONNECT, then WebSocket frames (masked, as RFC 8441
section 5 keeps them) in DATA.  The upstream is the `websockets` backend of
conftest.py, over HTTP/1.1.  Chromium's own RFC 8441 client is
test_http2_browser.py's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import struct

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest

from edgeproxy.metrics import WEBSOCKET
from tests.integration.test_http2_hostile import _eventually

HOST = "127.0.0.1"
H2C = [{"bind": f"{HOST}:0", "http2": True}]
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """One RFC 6455 frame, masked as a client sends it (``masked=False``: a broken client)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def parse_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Take the complete (unmasked, server) frames off the front of ``buf``."""
    out = []
    while len(buf) >= 2:
        opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
        assert not buf[1] & 0x80, "a server frame must not be masked"
        pos = 2
        if n == 126:
            if len(buf) < 4:
                break
            n, pos = struct.unpack_from("!H", buf, 2)[0], 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, pos = struct.unpack_from("!Q", buf, 2)[0], 10
        if len(buf) < pos + n:
            break
        out.append((opcode, bytes(buf[pos:pos + n])))
        del buf[:pos + n]
    return out


def close_code(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


@dataclasses.dataclass
class GoAway:
    last_stream_id: int
    error_code: int


class Stream:
    def __init__(self, client: H2WS, sid: int):
        self.client, self.id = client, sid
        self.headers: dict[bytes, bytes] | None = None
        self.data = bytearray()
        self.frames: asyncio.Queue = asyncio.Queue()
        self.ended = False
        self.reset: int | None = None
        self.changed = asyncio.Event()
        self.unacked = 0
        self.outbox = bytearray()

    @property
    def status(self) -> int:
        return int(self.headers[b":status"])

    def send(self, opcode: int, payload: bytes, **kw) -> None:
        """Queue a frame; it goes out as the stream's windows allow (`H2WS.pump`)."""
        self.outbox += ws_frame(opcode, payload, **kw)
        self.client.pump()

    def end(self) -> None:
        self.client.h2.end_stream(self.id)
        self.client.flush()

    async def recv(self, timeout: float = 5.0) -> tuple[int, bytes]:
        return await asyncio.wait_for(self.frames.get(), timeout)

    async def recv_data(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next frame that is not a ping (pings are answered, as a browser does)."""
        while True:
            opcode, payload = await self.recv(timeout)
            if opcode == PING:
                self.send(PONG, payload)
                continue
            return opcode, payload

    async def until(self, predicate, timeout: float = 5.0) -> None:
        async def wait():
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(wait(), timeout)

    def ack(self) -> None:
        """Open the stream's window for what was held (see `H2WS.hold`)."""
        n, self.unacked = self.unacked, 0
        if n:
            self.client.h2.increment_flow_control_window(n, stream_id=self.id)
            self.client.flush()


class H2WS:
    """An HTTP/2 client (h2, client side) that opens RFC 8441 WebSockets and plain requests."""

    def __init__(self, reader, writer, authority: bytes):
        self.reader, self.writer, self.authority = reader, writer, authority
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.streams: dict[int, Stream] = {}
        self.settings = asyncio.Event()
        self.goaway: GoAway | None = None
        self._buf = bytearray()
        self.closed = asyncio.Event()
        #: stream ids whose DATA is not acknowledged (a slow reader)
        self.hold: set[int] = set()
        self.task: asyncio.Task | None = None

    @classmethod
    async def open(cls, port: int, *, ssl=None, server_hostname=None) -> H2WS:
        reader, writer = await asyncio.open_connection(HOST, port, ssl=ssl, server_hostname=server_hostname)
        client = cls(reader, writer, f"localhost:{port}".encode())
        client.h2.initiate_connection()
        client.flush()
        client.task = asyncio.get_running_loop().create_task(client._read())
        await asyncio.wait_for(client.settings.wait(), 5)
        return client

    def pump(self) -> None:
        """Send each stream's queued bytes as far as its windows go."""
        for stream in self.streams.values():
            while stream.outbox and stream.reset is None:
                try:
                    window = min(self.h2.local_flow_control_window(stream.id), self.h2.max_outbound_frame_size)
                except h2.exceptions.ProtocolError:
                    break
                if window <= 0:
                    break
                piece = bytes(stream.outbox[:window])
                del stream.outbox[:window]
                self.h2.send_data(stream.id, piece)
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    @property
    def connect_protocol(self) -> int:
        return self.h2.remote_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL, 0)

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                self._buf += data
                try:
                    events = self.h2.receive_data(self._frames())
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    self._event(event)
                self.pump()
        finally:
            self.closed.set()
            for stream in self.streams.values():
                stream.changed.set()

    def _frames(self) -> bytes:
        """The whole frames read so far, but a GOAWAY: h2 closes a client connection on one, while
        RFC 9113 section 6.8 keeps the streams up to its last stream id going.  It is noted here."""
        out = bytearray()
        buf = self._buf
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            if buf[3] == 0x7:
                last, code = struct.unpack_from("!II", buf, 9)
                self.goaway = GoAway(last & 0x7FFFFFFF, code)
                for stream in self.streams.values():
                    stream.changed.set()
            else:
                out += buf[:9 + length]
            del buf[:9 + length]
        return bytes(out)

    def _event(self, event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings.set()
            return
        stream = self.streams.get(getattr(event, "stream_id", None))
        if stream is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            stream.headers = dict(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            stream.data += event.data
            if event.stream_id in self.hold:  # the stream's window shuts, not the connection's
                stream.unacked += event.flow_controlled_length
                if event.flow_controlled_length:
                    self.h2.increment_flow_control_window(event.flow_controlled_length)
            else:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if stream.headers is not None and stream.status == 200 and stream.headers.get(b"content-type") is None:
                for item in parse_frames(stream.data):
                    stream.frames.put_nowait(item)
        elif isinstance(event, h2.events.StreamEnded):
            stream.ended = True
        elif isinstance(event, h2.events.StreamReset):
            stream.reset = event.error_code
        stream.changed.set()

    async def websocket(self, path: str = "/echo", *, extra=(), protocol: bytes = b"websocket",
                        version: bytes | None = b"13") -> Stream:
        sid = self.h2.get_next_available_stream_id()
        headers = [(b":method", b"CONNECT"), (b":protocol", protocol), (b":scheme", b"https"),
                   (b":path", path.encode()), (b":authority", self.authority)]
        if version is not None:
            headers.append((b"sec-websocket-version", version))
        headers += list(extra)
        stream = self.streams[sid] = Stream(self, sid)
        self.h2.send_headers(sid, headers)
        self.flush()
        await stream.until(lambda: stream.headers is not None or stream.reset is not None or self.closed.is_set())
        return stream

    async def get(self, path: str) -> tuple[int, bytes]:
        sid = self.h2.get_next_available_stream_id()
        stream = self.streams[sid] = Stream(self, sid)
        self.h2.send_headers(sid, [(b":method", b"GET"), (b":path", path.encode()), (b":scheme", b"https"),
                                   (b":authority", self.authority)], end_stream=True)
        self.flush()
        await stream.until(lambda: stream.ended or stream.reset is not None)
        return stream.status, bytes(stream.data)

    async def close(self) -> None:
        self.writer.close()
        if self.task is not None:
            self.task.cancel()


async def _closed_by_client(stream: Stream, code: int = 1000, *, end: bool = False) -> int | None:
    """The client's close handshake: its close (``end``: with END_STREAM, as Chromium does), the echo
    of it, then END_STREAM."""
    stream.send(CLOSE, struct.pack("!H", code) + b"bye")
    if end:
        stream.end()
    opcode, payload = await stream.recv_data()
    assert opcode == CLOSE
    await stream.until(lambda: stream.ended or stream.reset is not None)
    return close_code(payload)


# -- the handshake ----------------------------------------------------------------------


async def test_extended_connect_relays_to_an_http11_websocket_upstream(ws_backend, proxy):
    p = await proxy(ws_backend, listeners=H2C)
    client = await H2WS.open(p.port)
    try:
        assert client.connect_protocol == 1  # SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441 section 3)
        stream = await client.websocket("/echo?x=1", extra=[(b"sec-websocket-protocol", b"chat.v1, chat.v2"),
                                                             (b"origin", b"https://app.example")])
        assert stream.status == 200  # not 101: RFC 8441 section 5
        assert stream.headers[b"sec-websocket-protocol"] == b"chat.v2"  # negotiated with the upstream
        assert b"sec-websocket-accept" not in stream.headers and b"upgrade" not in stream.headers
        stream.send(TEXT, b"hello over h2")
        assert await stream.recv_data() == (TEXT, b"hello over h2")
        big = os.urandom(200000)  # several DATA frames and window updates each way
        stream.send(BINARY, big)
        assert await stream.recv_data() == (BINARY, big)
        (rec,) = await ws_backend.wait_records(1)
        assert rec.path == "/echo?x=1" and rec.subprotocol == "chat.v2"
        assert rec.header("x-forwarded-for") == HOST and rec.header("host") == f"localhost:{p.port}"
        assert rec.header("x-forwarded-proto") == "http" and rec.header("origin") == "https://app.example"
        assert len(rec.header("sec-websocket-key")) == 24  # the proxy's own key for the HTTP/1.1 upgrade
        metrics = p.server.metrics
        assert metrics.http2_websockets == 1 and metrics.http2_websockets_active == 1
        assert metrics.active_by("protocol").get(WEBSOCKET) == 1
        assert await _closed_by_client(stream, 1000) == 1000
        await ws_backend.wait_done(rec)
        assert rec.close_code == 1000 and rec.messages == ["hello over h2", big]
        assert await _eventually(lambda: metrics.http2_websockets_active == 0)
        assert metrics.active_by("protocol").get(WEBSOCKET, 0) == 0
        # the connection goes on: a plain request on it
        status, body = await client.get("/")
        assert status in (200, 404, 426, 400)  # whatever the WebSocket backend answers a plain GET
    finally:
        await client.close()


async def test_refusals_are_clear(ws_backend, proxy):
    p = await proxy(ws_backend, listeners=H2C, routes=[{"path_prefix": "/ok", "upstream": "app",
                                                        "allowed_origins": ["https://good.example"]}])
    client = await H2WS.open(p.port)
    try:
        other = await client.websocket("/ok", protocol=b"connect-udp")
        assert other.status == 501
        await other.until(lambda: other.ended or other.reset is not None)
        assert b"only websocket" in bytes(other.data)
        unversioned = await client.websocket("/ok", version=b"8")
        assert unversioned.status == 400
        assert unversioned.headers[b"sec-websocket-version"] == b"13"  # the version supported: RFC 6455 4.4
        nowhere = await client.websocket("/nowhere", extra=[(b"origin", b"https://good.example")])
        assert nowhere.status == 404
        forbidden = await client.websocket("/ok", extra=[(b"origin", b"https://evil.example")])
        assert forbidden.status == 403
        good = await client.websocket("/ok/echo", extra=[(b"origin", b"https://good.example")])
        assert good.status == 200
        good.send(TEXT, b"x")
        assert await good.recv_data() == (TEXT, b"x")
    finally:
        await client.close()


async def test_each_websocket_stream_counts_as_a_connection_for_admission(ws_backend, proxy):
    p = await proxy(ws_backend, listeners=H2C, limits={"max_connections_per_ip": 2})
    client = await H2WS.open(p.port)  # the connection itself holds one slot
    try:
        first = await client.websocket("/echo")
        assert first.status == 200
        second = await client.websocket("/echo")
        assert second.status == 503 and b"retry-after" in second.headers
        assert await _closed_by_client(first) == 1000
        assert await _eventually(lambda: p.server.metrics.http2_websockets_active == 0)
        third = await client.websocket("/echo")  # the slot came back with the first one's end
        assert third.status == 200
    finally:
        await client.close()


async def test_an_upstream_refusal_reaches_the_client(ws_backend, proxy, refused_port):
    p = await proxy(ws_backend, listeners=H2C,
                    upstreams=[{"name": "app", "servers": [f"{HOST}:{ws_backend.port}"]},
                               {"name": "gone", "servers": [f"{HOST}:{refused_port}"]}],
                    routes=[{"path_prefix": "/gone", "upstream": "gone"}, {"path_prefix": "/", "upstream": "app"}])
    client = await H2WS.open(p.port)
    try:
        forbidden = await client.websocket("/forbidden")
        assert forbidden.status == 403
        await forbidden.until(lambda: forbidden.ended or forbidden.reset is not None)
        assert bytes(forbidden.data) == b"forbidden by backend\n"
        gone = await client.websocket("/gone/x")
        assert gone.status == 502
        assert p.server.metrics.http2_websockets == 0
    finally:
        await client.close()


async def test_off_means_not_advertised_and_refused(ws_backend, proxy):
    p = await proxy(ws_backend, listeners=H2C, http2={"websocket": False})
    client = await H2WS.open(p.port)
    try:
        assert client.connect_protocol == 0
        # h2 (the client library) would refuse :protocol without the setting: write it anyway
        client.h2.remote_settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1
        stream = await client.websocket("/echo")
        assert stream.status == 501
    finally:
        await client.close()


# -- the relay's rules ------------------------------------------------------------------


@pytest.mark.parametrize(("broken", "code"), [
    ({"opcode": BINARY, "payload": b"b" * 2000}, 1009),  # over max_message_size
    ({"opcode": TEXT, "payload": b"unmasked", "masked": False}, 1002),  # RFC 8441 keeps RFC 6455's masking
])
async def test_a_client_breaking_a_rule_gets_its_close_code_and_the_upstream_1001(ws_backend, proxy, broken, code):
    p = await proxy(ws_backend, listeners=H2C, websocket={"max_message_size": 1000})
    client = await H2WS.open(p.port)
    try:
        stream = await client.websocket("/echo")
        stream.send(TEXT, b"a" * 100)
        assert await stream.recv_data() == (TEXT, b"a" * 100)
        stream.send(broken["opcode"], broken["payload"], masked=broken.get("masked", True))
        opcode, payload = await stream.recv_data()
        assert opcode == CLOSE and close_code(payload) == code
        stream.send(CLOSE, struct.pack("!H", code))  # the answer the proxy waits for
        await stream.until(lambda: stream.ended or stream.reset is not None)
        (rec,) = await ws_backend.wait_records(1)
        await ws_backend.wait_done(rec)
        assert rec.close_code == 1001 and rec.messages == ["a" * 100]
    finally:
        await client.close()


async def test_upstream_close_code_and_client_reset(ws_backend, proxy):
    p = await proxy(ws_backend, listeners=H2C)
    client = await H2WS.open(p.port)
    try:
        closing = await client.websocket("/close4002")
        opcode, payload = await closing.recv_data()
        assert opcode == CLOSE and close_code(payload) == 4002 and payload[2:] == b"server bye"
        closing.send(CLOSE, payload)
        await closing.until(lambda: closing.ended or closing.reset is not None)
        reset = await client.websocket("/sink")
        reset.send(TEXT, b"before reset")
        (_, rec) = await ws_backend.wait_records(2)
        await _eventually(lambda: rec.messages == ["before reset"])
        client.h2.reset_stream(reset.id)  # the client's "TCP reset" of this one WebSocket
        client.flush()
        await ws_backend.wait_done(rec)
        assert rec.close_code == 1001  # "client went away"
        assert await _eventually(lambda: p.server.metrics.http2_websockets_active == 0)
        status, _ = await client.get("/")  # the connection is untouched
        assert status
    finally:
        await client.close()


async def test_heartbeat_pings_reach_the_h2_client_and_its_pongs_count(ws_backend, proxy):
    p = await proxy(ws_backend, listeners=H2C, websocket={"ping_interval": 0.2, "pong_timeout": 5,
                                                          "ping_upstream": False})
    client = await H2WS.open(p.port)
    try:
        stream = await client.websocket("/silent")
        opcode, payload = await stream.recv(timeout=5)
        assert opcode == PING
        before = p.server.metrics.snapshot()
        stream.send(PONG, payload)
        assert await _eventually(lambda: _rtt_count(p) >= 1), (before, p.server.metrics.snapshot())
    finally:
        await client.close()


async def test_idle_timeout_closes_an_h2_websocket_1001(ws_backend, proxy):
    p = await proxy(ws_backend, listeners=H2C, websocket={"idle_timeout": 0.3})
    client = await H2WS.open(p.port)
    try:
        stream = await client.websocket("/silent")
        opcode, payload = await stream.recv_data()
        assert opcode == CLOSE and close_code(payload) == 1001 and b"idle" in payload
        stream.send(CLOSE, payload[:2])
        await stream.until(lambda: stream.ended or stream.reset is not None)
        (rec,) = await ws_backend.wait_records(1)
        await ws_backend.wait_done(rec)
        assert rec.close_code == 1001
    finally:
        await client.close()


def _rtt_count(p) -> int:
    return p.server.metrics.ping_rtt_seconds.count


async def test_drain_sends_goaway_then_close_1001_then_the_stream_ends(ws_backend, proxy):
    p = await proxy(ws_backend, listeners=H2C, shutdown={"drain_timeout": 4, "readiness_grace": 0,
                                                         "drain_policy": "immediate"})
    client = await H2WS.open(p.port)
    try:
        stream = await client.websocket("/echo")
        stream.send(TEXT, b"hi")
        assert await stream.recv_data() == (TEXT, b"hi")
        drain = asyncio.get_running_loop().create_task(p.server.drain_and_stop())
        opcode, payload = await stream.recv_data()
        assert opcode == CLOSE and close_code(payload) == 1001
        assert client.goaway is not None and client.goaway.error_code == 0  # GOAWAY NO_ERROR came first
        stream.send(CLOSE, payload)
        await stream.until(lambda: stream.ended or stream.reset is not None)
        assert stream.ended
        await asyncio.wait_for(drain, 10)
        await asyncio.wait_for(client.closed.wait(), 5)
        (rec,) = await ws_backend.wait_records(1)
        await ws_backend.wait_done(rec)
        assert rec.close_code == 1001
    finally:
        await client.close()


async def test_the_drain_deadline_still_sends_close_frames(ws_backend, proxy):
    p = await proxy(ws_backend, listeners=H2C)
    client = await H2WS.open(p.port)
    try:
        stream = await client.websocket("/silent")
        await ws_backend.wait_records(1)
        await p.server.stop()  # no drain: the deadline's shutdown
        opcode, payload = await stream.recv_data()
        assert opcode == CLOSE and close_code(payload) == 1001
        await asyncio.wait_for(client.closed.wait(), 5)
        assert client.goaway is not None
    finally:
        await client.close()


async def test_many_websockets_and_requests_share_one_connection(ws_backend, proxy):
    p = await proxy(ws_backend, listeners=H2C)
    client = await H2WS.open(p.port)
    try:
        streams = await asyncio.gather(*[client.websocket(f"/echo?n={i}") for i in range(30)])
        assert all(s.status == 200 for s in streams)
        for i, s in enumerate(streams):
            s.send(TEXT, f"message {i}".encode())
        gets = asyncio.gather(*[client.get("/") for _ in range(10)])
        replies = await asyncio.gather(*[s.recv_data() for s in streams])
        assert replies == [(TEXT, f"message {i}".encode()) for i in range(30)]
        assert all(status for status, _ in await gets)
        assert p.server.metrics.http2_websockets == 30 and p.server.metrics.http2_connections == 1
        codes = await asyncio.gather(*[_closed_by_client(s, end=i % 2 == 0) for i, s in enumerate(streams)])
        assert codes == [1000] * 30  # the upstream's answer comes after the client's END_STREAM too
        assert await _eventually(lambda: not _ws_streams(p) and p.server.metrics.http2_websockets_active == 0)
    finally:
        await client.close()


async def test_a_slow_h2_client_stops_the_upstream_being_read(ws_backend, proxy):
    high_water = 65536
    p = await proxy(ws_backend, listeners=H2C, limits={"buffer_high_water": high_water})
    client = await H2WS.open(p.port)
    try:
        count, size = 200, 65536  # 12.5 MiB the backend would send at once
        stream = await client.websocket(f"/flood?count={count}&size={size}")
        client.hold.add(stream.id)  # read nothing more: the stream's window (64 KiB) shuts
        (rec,) = await ws_backend.wait_records(1)
        assert await _eventually(lambda: _ws_streams(p) and _ws_streams(p)[0].window_paused)
        await asyncio.sleep(0.5)
        (ws,) = _ws_streams(p)
        assert ws.h2conn.h2.buffered(stream.id) <= high_water + 2 * size  # one upstream read past the mark
        assert not ws.upstream.transport.is_reading()
        stalled_at = rec.sent_bytes
        assert stalled_at < count * size // 2  # the backend is held back by TCP, not buffered by the proxy
        client.hold.discard(stream.id)
        stream.ack()
        seqs = []
        while len(seqs) < count:
            opcode, payload = await stream.recv_data(timeout=10)
            assert opcode == BINARY and len(payload) == size
            seqs.append(struct.unpack("!Q", payload[:8])[0])
        assert seqs == list(range(count))
    finally:
        await client.close()


def _ws_streams(p):
    from edgeproxy.transport.http2_websocket import H2WebSocket
    return [c for c in p.server.connections if isinstance(c, H2WebSocket) and c.relay is not None]


async def test_a_client_that_sends_faster_than_the_upstream_reads_is_held_by_its_window(proxy, until):
    """Client to upstream: the client's DATA is acknowledged only as the upstream socket takes it."""
    accepted: list = []
    release = asyncio.Event()

    async def slow(reader, writer):  # an HTTP/1.1 WebSocket upstream that stops reading after the 101
        head = await reader.readuntil(b"\r\n\r\n")
        key = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key")][0]
        from wsproto.utilities import generate_accept_token
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n\r\n")
        accepted.append(writer)
        await release.wait()
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(slow, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        p = await proxy(port, listeners=H2C, limits={"buffer_high_water": 65536}, websocket={"max_message_size": 0})
        client = await H2WS.open(p.port)
        stream = await client.websocket("/x")
        assert stream.status == 200
        offered = 400
        for _ in range(offered):  # 24 MB offered
            stream.send(BINARY, b"z" * 60000)
        await asyncio.sleep(0.5)
        taken = offered * 60006 - len(stream.outbox)
        assert client.h2.local_flow_control_window(stream.id) < 16384, \
            "the proxy kept acknowledging a stream whose upstream does not read"
        assert taken < offered * 60006 // 4  # the socket buffers and one window's worth, not the 24 MB
        (ws,) = _ws_streams(p)
        assert ws.transport.paused and ws.transport.held_flow > 0
        release.set()
        await client.close()
    finally:
        release.set()
        server.close()


async def test_rebalancing_closes_the_h2_websockets_of_a_drained_server(ws_backends, proxy):
    first, second = await ws_backends(2)
    p = await proxy(first, second, listeners=H2C,
                    upstream={"rebalance": {"threshold": 1.5, "sustain": 0, "interval": 0.1, "max_closes": 1}})
    client = await H2WS.open(p.port)
    try:
        streams = [await client.websocket(f"/echo?i={i}") for i in range(4)]
        await first.wait_records(2)
        await second.wait_records(2)
        on_first = {int(r.path.split("=")[1]) for r in first.records}
        group = p.server.groups["app"]
        assert sorted(group.loads().values()) == [2, 2]
        from edgeproxy.config import Address
        group.set_drain(Address(HOST, first.port), True)
        for i in sorted(on_first):
            opcode, payload = await streams[i].recv_data()
            assert opcode == CLOSE and close_code(payload) == 1012 and b"reconnect after" in payload
            streams[i].send(CLOSE, payload[:2])
        for i in set(range(4)) - on_first:  # the other server's sessions go on
            streams[i].send(TEXT, b"still here")
            assert await streams[i].recv_data() == (TEXT, b"still here")
    finally:
        await client.close()


# -- configuration -------------------------------------------------------------------------


def test_config_offers_websocket_over_h2_by_default_with_resumable_sessions_too():
    from edgeproxy.config import parse_config
    from edgeproxy.errors import ConfigError

    plain = ('[[listeners]]\nbind = "127.0.0.1:0"\n[[upstreams]]\nname = "a"\nservers = ["127.0.0.1:1"]\n'
             '[[routes]]\nupstream = "a"\n')
    assert parse_config(plain).http2.websocket is True
    assert parse_config(plain + "[http2]\nwebsocket = false\n").http2.websocket is False
    with pytest.raises(ConfigError, match="http2.websocket"):
        parse_config(plain + '[http2]\nwebsocket = "yes"\n')
    hub_only = '[[listeners]]\nbind = "127.0.0.1:0"\n[[hubs]]\npath = "/hub"\n'
    assert parse_config(hub_only + "[http2]\nwebsocket = true\n").http2.websocket is True  # hubs serve h2 streams
    secret = '[websocket]\nresume_secret = "' + "k" * 32 + '"\n'
    # resumable sessions are served on h2 streams (test_http2_resume.py): nothing is turned off for them
    assert parse_config(plain + secret).http2.websocket is True
    assert parse_config(plain + secret + "[http2]\nwebsocket = true\n").http2.websocket is True
    assert parse_config(plain + secret + "[http2]\nwebsocket = false\n").http2.websocket is False


# -- hubs -----------------------------------------------------------------------------------


async def test_a_hub_websocket_on_an_h2_stream(proxy, refused_port):
    import json

    import aiohttp
    api_key = "test-api-key-0123456789"
    p = await proxy(refused_port, listeners=H2C, hubs=[{"path": "/hub", "ping_interval": 0}],
                    admin={"bind": f"{HOST}:0", "api_key": api_key},
                    shutdown={"drain_timeout": 4, "readiness_grace": 0, "drain_policy": "immediate"})
    client = await H2WS.open(p.port)
    try:
        assert client.connect_protocol == 1
        subs = [await client.websocket("/hub") for _ in range(3)]
        for sub in subs:
            assert sub.status == 200
            opcode, payload = await sub.recv_data()
            assert opcode == TEXT and json.loads(payload)["op"] == "connected"
            sub.send(TEXT, b'{"op":"subscribe","channel":"news"}')
            opcode, payload = await sub.recv_data()
            assert json.loads(payload)["op"] == "subscribed"
        host, port = p.server.admin.address
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://{host}:{port}/v1/publish", json={"channel": "news", "data": {"n": 1}},
                                 headers={"Authorization": f"Bearer {api_key}"}) as response:
                assert response.status == 200
        for sub in subs:
            opcode, payload = await sub.recv_data()
            message = json.loads(payload)
            assert (message["op"], message["data"]) == ("pub", {"n": 1})
        metrics = p.server.metrics
        assert metrics.http2_websockets == 3 and metrics.http2_websockets_active == 3
        assert len(p.server.hubs["/hub"].connections) == 3
        assert await _closed_by_client(subs[0], 1000, end=True) == 1000
        assert await _eventually(lambda: len(p.server.hubs["/hub"].connections) == 2
                                 and metrics.http2_websockets_active == 2)
        drain = asyncio.get_running_loop().create_task(p.server.drain_and_stop())
        for sub in subs[1:]:
            opcode, payload = await sub.recv_data()
            assert opcode == CLOSE and close_code(payload) == 1001
            sub.send(CLOSE, payload[:2])
        await asyncio.wait_for(drain, 10)
        assert client.goaway is not None
        assert metrics.http2_websockets_active == 0
    finally:
        await client.close()


async def test_a_hub_subscriber_whose_h2_window_is_shut_is_dropped_not_buffered(proxy, refused_port):
    import aiohttp
    api_key = "test-api-key-0123456789"
    p = await proxy(refused_port, listeners=H2C, limits={"buffer_high_water": 65536},
                    hubs=[{"path": "/hub", "ping_interval": 0, "subscriber_buffer_limit": 65536}],
                    admin={"bind": f"{HOST}:0", "api_key": api_key})
    client = await H2WS.open(p.port)
    try:
        slow, fast = await client.websocket("/hub"), await client.websocket("/hub")
        for sub in (slow, fast):
            await sub.recv_data()  # connected
            sub.send(TEXT, b'{"op":"subscribe","channel":"news"}')
            await sub.recv_data()  # subscribed
        client.hold.add(slow.id)  # reads nothing more: its 64 KiB stream window shuts
        host, port = p.server.admin.address
        payload = "y" * 20000
        async with aiohttp.ClientSession() as http:
            for n in range(20):  # 400 kB to each subscriber
                async with http.post(f"http://{host}:{port}/v1/publish", json={"channel": "news", "data": payload},
                                     headers={"Authorization": f"Bearer {api_key}"}) as response:
                    assert response.status == 200
                opcode, _ = await fast.recv_data()
                assert opcode == TEXT
        assert p.server.metrics.fanout_subscribers_dropped == 1  # the slow one, told to resume
        hub = p.server.hubs["/hub"]
        assert await _eventually(lambda: len(hub.connections) == 1)
        (ws,) = [s for s in p.server.connections if hasattr(s, "streams") for s in s.streams.values()
                 if getattr(s, "hub", None) is not None]
        assert ws.transport.id == fast.id
    finally:
        await client.close()

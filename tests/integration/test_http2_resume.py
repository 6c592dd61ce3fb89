"""Resumable sessions over RFC 8441 WebSocket streams (issue #16 item 3): h2c and TLS h2.

`edgeproxy.resume_client` cannot speak HTTP/2, so `ResumeOverH2` is the resume
protocol's client side (docs/resume-protocol.md) on a stream of
test_http2_websocket.py's `H2WS`: the wrapper offer, the token and the last
sequence number seen, the acknowledgements, and the resend of what the proxy
had not acknowledged.  The backend is test_resume_proxy.py's `StreamBackend`
(``s<n>`` streamed, ``c<n>`` echoed as ``echo:c<n>``), over HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import struct

import pytest

from edgeproxy.core.resume import CLOSE_NOT_RESUMABLE, RESUME_OFFER, SUBPROTOCOL, TokenCodec
from tests.integration.test_http2 import tls_listener
from tests.integration.test_http2_hostile import _eventually
from tests.integration.test_http2_websocket import CLOSE, H2C, H2WS, TEXT, Stream, close_code
from tests.integration.test_resume_proxy import SECRET, backend, numbered  # noqa: F401 - backend is a fixture

WRAPPER = f"{SUBPROTOCOL}+chat"


class ResumeOverH2:
    """One resumable session, its client side, over streams of `H2WS` connections (one at a time)."""

    def __init__(self, ack_every: int = 4):
        self.stream: Stream | None = None
        self.token: str | None = None
        self.hello: dict | None = None
        #: the app messages received, in order, and the sequence number of each
        self.got: list[str] = []
        self.seqs: list[int] = []
        #: (seq, text) sent and not yet acknowledged by the proxy, resent after a resume
        self.unacked: list[tuple[int, str]] = []
        self.out_seq = 0
        self.ack_every = ack_every

    @property
    def last_seq(self) -> int:
        return self.seqs[-1] if self.seqs else 0

    async def open(self, client: H2WS, *, resume: bool = False, path: str = "/ws") -> Stream:
        """Open a stream (a resume attempt with the token when ``resume``); returns it after the 200."""
        offers = WRAPPER if not resume else f"{WRAPPER}, {RESUME_OFFER}{self.token}.{self.last_seq}"
        stream = await client.websocket(path, extra=[(b"sec-websocket-protocol", offers.encode())])
        assert stream.status == 200, stream.headers
        assert stream.headers[b"sec-websocket-protocol"] == WRAPPER.encode()
        assert b"sec-websocket-accept" not in stream.headers  # RFC 8441 section 5
        self.stream = stream
        return stream

    async def start(self, client: H2WS, *, resume: bool = False) -> dict:
        """`open`, then the proxy's ``session`` hello: the new token, and a resend of what it lacks."""
        await self.open(client, resume=resume)
        opcode, payload = await self.stream.recv_data()
        assert opcode == TEXT and payload[:1] == b"C", (opcode, payload[:80])
        self.hello = hello = json.loads(payload[1:])
        assert hello["t"] == "session" and hello["resumed"] is resume
        self.token = hello["token"]
        self._acked(hello["ack"])
        for seq, text in self.unacked:
            self.stream.send(TEXT, b"D%d:%s" % (seq, text.encode()))
        return hello

    async def reset(self, client: H2WS, registry) -> None:
        """RST_STREAM CANCEL (what a closing tab's socket sends), until the proxy has parked the session."""
        client.h2.reset_stream(self.stream.id, 0x8)
        client.flush()
        assert await _eventually(lambda: registry.parked())

    def _acked(self, seq: int) -> None:
        self.unacked = [(n, text) for n, text in self.unacked if n > seq]

    def send(self, text: str) -> None:
        self.out_seq += 1
        self.unacked.append((self.out_seq, text))
        self.stream.send(TEXT, b"D%d:%s" % (self.out_seq, text.encode()))

    async def recv(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next frame that is not an envelope of the protocol's own (acks, pongs) nor a ping."""
        while True:
            opcode, payload = await self.stream.recv_data(timeout)
            if opcode == CLOSE:
                return opcode, payload
            if payload[:1] == b"C":
                fields = json.loads(payload[1:])
                if fields.get("t") == "ack":
                    self._acked(fields["seq"])
                continue
            assert payload[:1] == b"D", payload[:40]
            colon = payload.index(b":")
            self.seqs.append(int(payload[1:colon]))
            self.got.append(payload[colon + 1:].decode())
            if len(self.seqs) % self.ack_every == 0:
                self.stream.send(TEXT, b'C{"t":"ack","seq":%d}' % self.last_seq)
            return opcode, payload

    async def until(self, predicate, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.got):
                opcode, payload = await self.recv(timeout)
                assert opcode != CLOSE, f"closed {close_code(payload)}: {payload[2:]!r}"

    async def close(self) -> int | None:
        """The application's close 1000 (the session ends): the proxy's answer's code."""
        self.stream.send(CLOSE, struct.pack("!H", 1000) + b"done")
        while True:
            opcode, payload = await self.recv()
            if opcode == CLOSE:
                await self.stream.until(lambda: self.stream.ended or self.stream.reset is not None)
                return close_code(payload)


def _listeners(kind: str, certs) -> tuple[list[dict], dict]:
    """The proxy's listener for ``kind`` ("h2c" or "tls") and how `H2WS.open` reaches it."""
    if kind == "h2c":
        return H2C, {}
    ctx = ssl.create_default_context(cafile=certs.ca_cert)
    ctx.set_alpn_protocols(["h2"])
    return [tls_listener(certs)], {"ssl": ctx, "server_hostname": "localhost"}


async def _resume_proxy(proxy, backend_port: int, listeners, **sections):
    websocket = {"resume_secret": SECRET, **sections.pop("websocket", {})}
    return await proxy(backend_port, listeners=listeners, websocket=websocket, **sections)


def _contiguous(seqs: list[int]) -> bool:
    return seqs == list(range(1, len(seqs) + 1))


# -- resume after a drop ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["h2c", "tls"])
async def test_a_session_resumes_on_a_new_h2_connection_with_every_message_once(proxy, backend, certs, kind):
    listeners, how = _listeners(kind, certs)
    b = await backend(interval=0.01)
    p = await _resume_proxy(proxy, b.port, listeners)
    assert p.server.config.http2.websocket is True  # on by default with resume
    registry = p.server.resume
    first = await H2WS.open(p.port, **how)
    second = None
    session = ResumeOverH2()
    try:
        assert first.connect_protocol == 1
        await session.start(first)
        assert [s.wrapper for s in registry.sessions.values()] == [WRAPPER]
        assert p.server.metrics.http2_websockets == 1 and p.server.metrics.http2_websockets_active == 1
        await session.until(lambda g: len(g) >= 20)
        for i in range(1, 6):
            session.send(f"c{i}")
        first.writer.transport.abort()  # the TCP connection is gone under the client
        assert await _eventually(lambda: registry.parked())
        assert await _eventually(lambda: p.server.metrics.http2_websockets_active == 0)
        second = await H2WS.open(p.port, **how)
        hello = await session.start(second, resume=True)
        assert hello["replayed"] >= 0
        for i in range(6, 11):
            session.send(f"c{i}")
        await session.until(lambda g: numbered(g, "echo:c")[-1:] == [10] and len(numbered(g, "s")) >= 80)
        assert await session.close() == 1000
    finally:
        await first.close()
        if second is not None:
            await second.close()
    assert _contiguous(session.seqs)  # nothing lost, nothing twice, over the drop
    streamed = numbered(session.got, "s")
    assert streamed == list(range(1, len(streamed) + 1))
    assert numbered(session.got, "echo:c") == list(range(1, 11))
    assert len(b.connections) == 1 and b.connections[0]["got"] == [f"c{i}" for i in range(1, 11)]
    assert await _eventually(lambda: b.connections[0]["close"] == 1000)
    assert await _eventually(lambda: not registry.sessions)
    assert p.server.metrics.http2_websockets == 2 and p.server.metrics.http2_websockets_active == 0


async def test_a_reset_stream_parks_the_session_and_a_stream_of_the_same_connection_resumes_it(proxy, backend):
    b = await backend(interval=0.01)
    p = await _resume_proxy(proxy, b.port, H2C)
    registry = p.server.resume
    client = await H2WS.open(p.port)
    session = ResumeOverH2()
    try:
        await session.start(client)
        await session.until(lambda g: len(g) >= 10)
        session.send("c1")
        await session.reset(client, registry)
        await session.start(client, resume=True)
        session.send("c2")
        await session.until(lambda g: numbered(g, "echo:c")[-1:] == [2] and len(numbered(g, "s")) >= 40)
        assert await session.close() == 1000
    finally:
        await client.close()
    assert _contiguous(session.seqs)
    assert numbered(session.got, "echo:c") == [1, 2]
    assert b.connections[0]["got"] == ["c1", "c2"] and len(b.connections) == 1


async def test_a_session_parked_past_its_window_gets_4409_over_h2(proxy, backend):
    b = await backend(interval=0.02)
    p = await _resume_proxy(proxy, b.port, H2C, websocket={"resume_window": 0.5})
    registry = p.server.resume
    client = await H2WS.open(p.port)
    session = ResumeOverH2()
    try:
        await session.start(client)
        await session.until(lambda g: len(g) >= 3)
        await session.reset(client, registry)
        assert await _eventually(lambda: b.connections[0]["close"] == 1001)  # the window ran out
        stream = await session.open(client, resume=True)
        opcode, payload = await stream.recv_data()
        assert opcode == CLOSE and close_code(payload) == CLOSE_NOT_RESUMABLE
        assert b"unknown or expired session" in payload
        stream.send(CLOSE, payload[:2])  # the client's answer ends the refusal
        await stream.until(lambda: stream.ended or stream.reset is not None)
        assert stream.ended
    finally:
        await client.close()


async def test_end_stream_without_a_close_parks_and_slots_come_back(proxy, backend):
    """END_STREAM with no close frame is the client's FIN: parked; each stream's admission slot comes back."""
    b = await backend(interval=0)
    p = await _resume_proxy(proxy, b.port, H2C, limits={"max_connections_per_ip": 2})
    registry = p.server.resume
    client = await H2WS.open(p.port)  # the connection holds one slot, each WebSocket stream one more
    session = ResumeOverH2()
    try:
        for i in range(3):  # one after another on the one connection: the slot is given back each time
            await session.start(client, resume=i > 0)
            session.send(f"x{i}")
            await session.until(lambda g, i=i: f"echo:x{i}" in g)
            session.stream.end()
            assert await _eventually(lambda: registry.parked())
            await session.stream.until(lambda: session.stream.reset is not None or session.stream.ended)
            assert await _eventually(lambda: p.server.admission.open == 1)
        for _ in range(3):  # refused attempts give theirs back too
            refusal = ResumeOverH2()
            refusal.token = "AAAA"
            stream = await refusal.open(client, resume=True)
            opcode, payload = await stream.recv_data()
            assert opcode == CLOSE and close_code(payload) == CLOSE_NOT_RESUMABLE
            stream.end()  # no close frame back: END_STREAM, and the refusal ends the stream
            await stream.until(lambda: stream.ended or stream.reset is not None)
        assert await _eventually(lambda: p.server.admission.open == 1)
        await session.start(client, resume=True)
        assert await session.close() == 1000
    finally:
        await client.close()
    assert b.connections[0]["got"] == ["x0", "x1", "x2"] and len(b.connections) == 1
    assert await _eventually(lambda: p.server.admission.open == 0)


# -- refusals -------------------------------------------------------------------------------


async def test_forged_and_foreign_tokens_get_4409_and_a_sibling_workers_token_too(proxy, backend):
    b = await backend(interval=0)
    p = await _resume_proxy(proxy, b.port, H2C)
    registry = p.server.resume

    async def refused(client: H2WS, token: str) -> bytes:
        session = ResumeOverH2()
        session.token = token
        stream = await session.open(client, resume=True)
        opcode, payload = await stream.recv_data()
        assert opcode == CLOSE and close_code(payload) == CLOSE_NOT_RESUMABLE
        stream.send(CLOSE, payload[:2])
        await stream.until(lambda: stream.ended or stream.reset is not None)
        return payload[2:]

    client = await H2WS.open(p.port)
    try:
        live = ResumeOverH2()
        await live.start(client)
        assert b"invalid token" in await refused(client, live.token[:-4] + ("AAAA" if live.token[-4:] != "AAAA" else "BBBB"))
        foreign = TokenCodec(SECRET.encode(), "elsewhere").issue(os.urandom(16), 1, "x")
        assert b"belongs to instance" in await refused(client, foreign)
        # One worker among several: a token of a sibling cannot be piped to it from an h2 stream
        # (the hand-off carries an HTTP/1.1 connection's bytes): 4409, and the client starts afresh.
        await registry.start_handoff(os.getpid(), 0)
        sibling = TokenCodec(SECRET.encode(), "sibling.w1").issue(os.urandom(16), 1, "x")
        assert b"cannot be handed" in await refused(client, sibling)
        metrics = p.server.metrics
        assert metrics.resume_handoffs == 0
        # the refusals are refusals, not WebSockets on h2 streams
        assert metrics.http2_websockets == 1 and metrics.http2_websockets_active == 1
        live.send("still")  # the live session on the same connection is untouched
        await live.until(lambda g: "echo:still" in g)
        malformed = await client.websocket("/ws", extra=[(b"sec-websocket-protocol", f"{RESUME_OFFER}x".encode())])
        assert malformed.status == 400 and malformed.headers[b"sec-websocket-version"] == b"13"
    finally:
        await client.close()


# -- flow control, drain ----------------------------------------------------------------------


async def test_a_client_whose_stream_window_is_shut_pauses_the_backend_and_loses_nothing(proxy, backend):
    high_water = 65536
    b = await backend(interval=0.001, size=16384)
    p = await _resume_proxy(proxy, b.port, H2C, limits={"buffer_high_water": high_water},
                            websocket={"resume_buffer_bytes": 8 << 20})
    registry = p.server.resume
    client = await H2WS.open(p.port)
    session = ResumeOverH2(ack_every=1)
    try:
        await session.start(client)
        await session.until(lambda g: len(g) >= 5)
        client.hold.add(session.stream.id)  # read nothing more: the stream's window shuts
        (live,) = registry.sessions.values()
        assert await _eventually(lambda: live.client_write_paused)
        assert not live.upstream.transport.is_reading()  # the backend is held back by TCP
        (conn,) = [c for c in p.server.connections if getattr(c, "h2", None) is not None]
        assert conn.h2.buffered(session.stream.id) <= high_water + 2 * 16384 + 64  # one read past the mark
        assert live.core.held_bytes < 8 << 20  # nor did the replay buffer take the backend's stream
        client.hold.discard(session.stream.id)
        session.stream.ack()
        await session.until(lambda g: len(g) >= 400, timeout=20)
        assert not live.client_write_paused
        assert await session.close() == 1000
    finally:
        await client.close()
    assert _contiguous(session.seqs)
    assert numbered([m[:m.index("x")] if "x" in m else m for m in session.got], "s") == list(
        range(1, len(session.got) + 1))


async def test_drain_sends_goaway_then_the_sessions_close_frame_then_the_stream_ends(proxy, backend):
    b = await backend(interval=0.02)
    p = await _resume_proxy(proxy, b.port, H2C, shutdown={"drain_timeout": 4, "readiness_grace": 0,
                                                           "drain_policy": "immediate"})
    client = await H2WS.open(p.port)
    session = ResumeOverH2()
    try:
        await session.start(client)
        await session.until(lambda g: len(g) >= 3)
        drain = asyncio.get_running_loop().create_task(p.server.drain_and_stop())
        while True:
            opcode, payload = await session.recv()
            if opcode == CLOSE:
                break
        assert close_code(payload) == 1001
        assert client.goaway is not None and client.goaway.error_code == 0  # GOAWAY NO_ERROR came first
        session.stream.send(CLOSE, payload[:2])
        await session.stream.until(lambda: session.stream.ended or session.stream.reset is not None)
        await asyncio.wait_for(drain, 10)
        await asyncio.wait_for(client.closed.wait(), 5)
        assert await _eventually(lambda: b.connections[0]["close"] == 1001)
    finally:
        await client.close()
    assert _contiguous(session.seqs)


async def test_the_stop_without_a_drain_ends_the_stream_and_the_session(proxy, backend):
    b = await backend(interval=0.02)
    p = await _resume_proxy(proxy, b.port, H2C)
    client = await H2WS.open(p.port)
    session = ResumeOverH2()
    try:
        await session.start(client)
        await session.until(lambda g: len(g) >= 3)
        await p.server.stop()  # no drain: the deadline's shutdown, as on HTTP/1.1 no close frame to the client
        await session.stream.until(lambda: session.stream.reset is not None or client.closed.is_set())
        await asyncio.wait_for(client.closed.wait(), 5)
        assert client.goaway is not None
        assert not p.server.resume.sessions
        assert await _eventually(lambda: b.connections[0]["close"] == 1001)
    finally:
        await client.close()

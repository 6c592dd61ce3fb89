"""Backpressure: a fast upstream and a slow client must not make the proxy buffer.

The proxy runs in this process, so its memory is this process's memory: every
Python allocation is measured with tracemalloc (peak over the whole exchange).
The clients are raw sockets with a small SO_RCVBUF that keep nothing but a
running digest, and the backends only ever hold one chunk, so the growth seen
is the proxy's.  Without backpressure the proxy would hold most of the flood.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import socket
import struct
import time
import tracemalloc

import pytest
import wsproto
import wsproto.connection
import wsproto.events as wse

MiB = 1024 * 1024
HOST = "127.0.0.1"

FLOOD_BYTES = 48 * MiB  # what the backend tries to push, as fast as flow control lets it
STALL_SECONDS = 1.0  # the client reads nothing at all for this long
MEMORY_BUDGET = 16 * MiB  # allowed growth of the whole process's Python heap
SLOW_READ = 64 * 1024  # bytes per recv() while draining
PAUSE_EVERY = 2 * MiB  # the slow reader naps after each PAUSE_EVERY bytes ...
PAUSE_SECONDS = 0.02  # ... for this long


class MemoryWatch:
    """tracemalloc peak relative to a baseline, plus periodic samples while stalled."""

    def __enter__(self) -> "MemoryWatch":
        gc.collect()
        self._was_tracing = tracemalloc.is_tracing()
        if not self._was_tracing:
            tracemalloc.start(1)
        tracemalloc.reset_peak()
        self.baseline = tracemalloc.get_traced_memory()[0]
        self.peak = 0
        return self

    def sample(self) -> int:
        current, peak = tracemalloc.get_traced_memory()
        self.peak = max(self.peak, peak - self.baseline)
        return current - self.baseline

    def __exit__(self, *exc) -> None:
        self.sample()
        if not self._was_tracing:
            tracemalloc.stop()


def _slow_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    s.setblocking(False)
    return s


async def _stall(watch: MemoryWatch, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / 0.05) + 2):
        if time.monotonic() >= deadline:
            break
        watch.sample()
        await asyncio.sleep(0.05)


async def _recv_head(loop, sock: socket.socket) -> tuple[bytes, bytes]:
    buf = b""
    for _ in range(1000):
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
        assert chunk, f"connection closed during the response head: {buf!r}"
        buf += chunk
        if b"\r\n\r\n" in buf:
            head, _, rest = buf.partition(b"\r\n\r\n")
            return head, rest
    raise AssertionError("no response head")


async def _slow_drain(loop, sock, watch: MemoryWatch, consume, deadline_s: float = 40.0) -> None:
    """recv in small pieces with naps until consume() says it is done (bounded in time and count)."""
    deadline = time.monotonic() + deadline_s
    since_pause = 0
    for _ in range(10_000_000):
        if consume(None):
            return
        assert time.monotonic() < deadline, "draining took too long"
        chunk = await asyncio.wait_for(loop.sock_recv(sock, SLOW_READ), 10)
        if not chunk:
            consume(b"")
            return
        consume(chunk)
        since_pause += len(chunk)
        if since_pause >= PAUSE_EVERY:
            since_pause = 0
            watch.sample()
            await asyncio.sleep(PAUSE_SECONDS)


# ------------------------------------------------------------------------- WebSocket


@pytest.mark.timeout(60)
async def test_websocket_flood_to_slow_reader_stays_bounded(ws_backend, proxy, pattern):
    msg_size = 64 * 1024
    count = FLOOD_BYTES // msg_size
    p = await proxy(ws_backend)
    loop = asyncio.get_running_loop()
    sock = _slow_socket()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (p.host, p.port)), 5)
        client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        with MemoryWatch() as watch:
            await loop.sock_sendall(
                sock, client.send(wse.Request(host=p.authority, target=f"/flood?count={count}&size={msg_size}"))
            )
            # the handshake: feed bytes to wsproto until it accepts (frames may follow in the same read)
            accepted = False
            pending: list = []
            for _ in range(1000):
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
                assert data, "closed during the handshake"
                client.receive_data(data)
                for ev in client.events():
                    if isinstance(ev, wse.AcceptConnection):
                        accepted = True
                    else:
                        pending.append(ev)
                if accepted:
                    break
            assert accepted

            rec = (await ws_backend.wait_records(1))[0]
            await _stall(watch, STALL_SECONDS)
            stalled_sent = rec.sent_bytes

            state = {"seq": 0, "cur": bytearray(), "bytes": 0, "closed": False}
            # the ws backend sends: 8-byte big-endian sequence number + Pattern.slice(0, size - 8)
            expected_tail = pattern.slice(0, msg_size - 8)

            def handle(ev) -> None:
                if isinstance(ev, wse.BytesMessage):
                    state["cur"] += ev.data
                    state["bytes"] += len(ev.data)
                    assert len(state["cur"]) <= msg_size, "messages ran together"
                    if ev.message_finished:
                        m = state["cur"]
                        assert len(m) == msg_size, f"message {state['seq']} has {len(m)} bytes"
                        (seq,) = struct.unpack(">Q", m[:8])
                        assert seq == state["seq"], f"got message {seq}, expected {state['seq']}"
                        assert m[8:] == expected_tail, f"message {seq} corrupted"
                        state["seq"] += 1
                        state["cur"] = bytearray()
                elif isinstance(ev, wse.CloseConnection):
                    state["closed"] = True
                elif isinstance(ev, wse.Ping):
                    # The proxy's heartbeat: answer it, as a client does (a few bytes,
                    # which the non-blocking socket takes at once).
                    sock.send(client.send(ev.response()))
                else:
                    raise AssertionError(f"unexpected event {ev!r}")

            for ev in pending:
                handle(ev)

            def consume(chunk):
                if chunk is None:
                    return state["seq"] >= count or state["closed"]
                if chunk == b"":
                    state["closed"] = True
                    return True
                client.receive_data(chunk)
                for ev in client.events():
                    handle(ev)
                return False

            await _slow_drain(loop, sock, watch, consume)
            assert not state["closed"], f"closed after {state['seq']} of {count} messages"
            assert state["seq"] == count
            assert state["bytes"] == count * msg_size
            await loop.sock_sendall(sock, client.send(wse.CloseConnection(code=1000)))
        await ws_backend.wait_done(rec, 5)
        assert rec.close_code == 1000
    finally:
        sock.close()

    assert watch.peak < MEMORY_BUDGET, f"memory grew by {watch.peak / MiB:.1f} MiB (budget {MEMORY_BUDGET / MiB:.0f})"
    assert stalled_sent < FLOOD_BYTES * 0.6, (
        f"backend pushed {stalled_sent / MiB:.1f} MiB while the client read nothing: no backpressure upstream"
    )


# ------------------------------------------------------------------------------ HTTP


def _flood_handler(size: int, chunked: bool, pattern, read_head):
    """Raw backend: answer any request with ``size`` Pattern bytes, pushed as fast as drain() allows."""

    async def handler(conn, reader, writer) -> None:
        buf = bytearray()
        head = await read_head(conn, reader, buf)
        if head is None:
            return
        if chunked:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n\r\n" % size)
        off = 0
        step = 256 * 1024
        while off < size:
            piece = pattern.slice(off, min(step, size - off))
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            off += len(piece)
            conn.sent = off
            await writer.drain()
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        for _ in range(1000):  # keep the connection until the proxy closes it
            if not await reader.read(65536):
                return

    return handler


class _Body:
    """Incremental Content-Length / chunked decoder keeping only a digest."""

    def __init__(self, length: int | None):
        self.length = length
        self.sha = hashlib.sha256()
        self.n = 0
        self.done = False
        self.eof = False
        self._buf = bytearray()
        self._chunk_left = 0
        self._state = "size"  # size | data | crlf | trailer

    def feed(self, data: bytes) -> None:
        if self.length is not None:
            take = data[: self.length - self.n]
            assert len(take) == len(data), "bytes after the end of the Content-Length body"
            self.sha.update(take)
            self.n += len(take)
            self.done = self.n == self.length
            return
        self._buf += data
        for _ in range(1_000_000):
            if self._state == "size":
                i = self._buf.find(b"\r\n")
                if i < 0:
                    assert len(self._buf) < 1024, "chunk-size line too long"
                    return
                size = int(bytes(self._buf[:i]).split(b";")[0], 16)
                del self._buf[: i + 2]
                self._chunk_left = size
                self._state = "data" if size else "trailer"
            elif self._state == "data":
                if not self._buf:
                    return
                take = self._buf[: self._chunk_left]
                self.sha.update(take)
                self.n += len(take)
                self._chunk_left -= len(take)
                del self._buf[: len(take)]
                if self._chunk_left == 0:
                    self._state = "crlf"
            elif self._state == "crlf":
                if len(self._buf) < 2:
                    return
                assert self._buf[:2] == b"\r\n", "chunk data not followed by CRLF"
                del self._buf[:2]
                self._state = "size"
            else:  # trailer section
                i = self._buf.find(b"\r\n")
                if i < 0:
                    return
                line = bytes(self._buf[:i])
                del self._buf[: i + 2]
                if not line:
                    assert not self._buf, "bytes after the end of the chunked body"
                    self.done = True
                    return
        raise AssertionError("decoder loop bound")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_http_flood_to_slow_reader_stays_bounded(chunked, proxy, raw_backend, pattern):
    backend = await raw_backend(_flood_handler(FLOOD_BYTES, chunked, pattern, raw_backend.read_head))
    p = await proxy(backend)
    loop = asyncio.get_running_loop()
    sock = _slow_socket()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (p.host, p.port)), 5)
        with MemoryWatch() as watch:
            await loop.sock_sendall(sock, b"GET /flood HTTP/1.1\r\nHost: h\r\n\r\n")
            await wait_for_connection(backend)
            await _stall(watch, STALL_SECONDS)
            stalled_sent = backend.connections[0].sent

            head, rest = await _recv_head(loop, sock)
            lines = head.split(b"\r\n")
            assert lines[0].startswith(b"HTTP/1.1 200"), head
            hdrs = {k.strip().lower(): v.strip() for k, _, v in (l.partition(b":") for l in lines[1:])}
            if b"content-length" in hdrs:
                assert b"transfer-encoding" not in hdrs
                body = _Body(int(hdrs[b"content-length"]))
                assert body.length == FLOOD_BYTES
            else:
                assert hdrs.get(b"transfer-encoding", b"").lower() == b"chunked", head
                body = _Body(None)
            if rest:
                body.feed(rest)

            def consume(chunk):
                if chunk is None:
                    return body.done
                if chunk == b"":
                    body.eof = True
                    return True
                body.feed(chunk)
                return body.done

            await _slow_drain(loop, sock, watch, consume)
    finally:
        sock.close()

    assert not body.eof or body.done, f"connection closed after {body.n} of {FLOOD_BYTES} bytes"
    assert body.n == FLOOD_BYTES
    assert body.sha.hexdigest() == pattern.sha256(FLOOD_BYTES), "body corrupted or out of order"
    assert watch.peak < MEMORY_BUDGET, f"memory grew by {watch.peak / MiB:.1f} MiB (budget {MEMORY_BUDGET / MiB:.0f})"
    assert stalled_sent < FLOOD_BYTES * 0.6, (
        f"backend pushed {stalled_sent / MiB:.1f} MiB while the client read nothing: no backpressure upstream"
    )


async def wait_for_connection(backend, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not backend.connections:
        await asyncio.sleep(0.01)
    assert backend.connections, "the proxy never connected upstream"


# ------------------------------------------------------------ slow uploads (client -> upstream)


@pytest.mark.timeout(60)
async def test_http_fast_upload_to_slow_backend_stays_bounded(proxy, raw_backend, pattern):
    """The other direction: the client pushes a large body, the backend reads it slowly."""
    size = FLOOD_BYTES
    got: dict = {"body": None, "stalled_at": None}

    async def slow_reader(conn, reader, writer) -> None:
        buf = bytearray()
        head = await raw_backend.read_head(conn, reader, buf)
        assert head is not None
        _, headers = raw_backend.parse_head(head)
        hmap = {k.lower(): v for k, v in headers}
        if b"content-length" in hmap:
            body = _Body(int(hmap[b"content-length"]))
        else:  # the proxy may re-frame the upload as chunked
            assert hmap.get(b"transfer-encoding", b"").lower() == b"chunked", head
            body = _Body(None)
        got["body"] = body
        if buf:
            body.feed(bytes(buf))
        await asyncio.sleep(STALL_SECONDS)
        got["stalled_at"] = True
        since = 0
        for _ in range(10_000_000):
            if body.done:
                break
            chunk = await reader.read(4 * SLOW_READ)
            if not chunk:
                break
            body.feed(chunk)
            since += len(chunk)
            if since >= PAUSE_EVERY:
                since = 0
                await asyncio.sleep(PAUSE_SECONDS)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
        await writer.drain()

    backend = await raw_backend(slow_reader)
    p = await proxy(backend)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sent = 0
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (p.host, p.port)), 5)
        with MemoryWatch() as watch:
            await loop.sock_sendall(sock, b"PUT /up HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size)
            sent_during_stall = None
            t0 = time.monotonic()
            for piece in pattern.chunks(size, 256 * 1024):
                await asyncio.wait_for(loop.sock_sendall(sock, piece), 20)
                sent += len(piece)
                if sent_during_stall is None and got["stalled_at"]:
                    sent_during_stall = sent
                if sent % (4 * MiB) == 0:
                    watch.sample()
                assert time.monotonic() - t0 < 40
            if sent_during_stall is None:  # everything went out before the backend read a byte
                sent_during_stall = sent
            head, rest = await _recv_head(loop, sock)
            assert head.startswith(b"HTTP/1.1 200"), head
    finally:
        sock.close()
    body = got["body"]
    assert body is not None and body.done, "the backend did not get the whole body"
    assert body.n == size
    assert body.sha.hexdigest() == pattern.sha256(size)
    assert watch.peak < MEMORY_BUDGET, f"memory grew by {watch.peak / MiB:.1f} MiB (budget {MEMORY_BUDGET / MiB:.0f})"
    assert sent_during_stall < size * 0.6, (
        f"client pushed {sent_during_stall / MiB:.1f} MiB while the backend read nothing: no backpressure"
    )

"""HTTP/2 streams over time: flow control against a slow client, SSE, graceful drain, an h2load smoke.

The raw client of test_http2_hostile.py drives the windows by hand; httpx and
h2load (nghttp2) are the clients nobody here wrote.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl

import h2.events
import h2.settings
import httpx
import pytest
from aiohttp import web
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, Frame, HeadersFrame, RstStreamFrame

from tests.integration.test_http2_hostile import H2C, Client, _eventually, frame

HOST = "127.0.0.1"
MiB = 1024 * 1024


def _h2_streams(p):
    from edgeproxy.transport.http2 import Http2Connection
    return [s for c in p.server.connections if isinstance(c, Http2Connection) for s in c.streams.values()]


async def test_a_slow_client_does_not_make_the_proxy_buffer_the_upstream_body(http_backend, proxy, pattern):
    high_water = 65536
    p = await proxy(http_backend, listeners=H2C, limits={"buffer_high_water": high_water})
    size = 16 * MiB
    client = await Client.open(p.port, {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16384})
    await client.until(lambda e: isinstance(e, h2.events.SettingsAcknowledged))
    sid = client.request(f"/stream?size={size}")
    # The client reads nothing more: 16 KiB of window on the stream, 64 KiB on the connection.
    assert await _eventually(lambda: any(s.window_paused for s in _h2_streams(p)))
    await asyncio.sleep(0.3)
    (stream,) = _h2_streams(p)
    conn = stream.conn
    queued = conn.h2.buffered(sid)
    assert queued <= high_water + 2 * 65536  # one upstream read past the mark at most
    assert not stream.upstream.transport.is_reading()
    # Now read it all, opening the window as the bytes come.
    digest, got = hashlib.sha256(), 0

    async def drain():
        nonlocal got
        while True:
            data = await client.reader.read(65536)
            assert data
            for event in client.h2.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    digest.update(event.data)
                    got += len(event.data)
                    client.h2.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.StreamEnded):
                    return
            client.flush()

    await asyncio.wait_for(drain(), 30)
    assert got == size and digest.hexdigest() == pattern.sha256(size)


async def test_request_body_acknowledged_only_as_the_upstream_takes_it(http_backend, proxy, pattern):
    p = await proxy(http_backend, listeners=H2C, http2={"initial_window_size": 65535})
    client = await Client.open(p.port)
    size = 4 * MiB
    body = pattern.bytes(size)
    sid = client.h2.get_next_available_stream_id()
    client.h2.send_headers(sid, [(b":method", b"POST"), (b":path", b"/upload"), (b":scheme", b"http"),
                                 (b":authority", b"localhost"), (b"content-length", b"%d" % size)])
    client.flush()
    sent = 0
    while sent < size:  # send as the windows allow, reading WINDOW_UPDATEs
        window = min(client.h2.local_flow_control_window(sid), client.h2.max_outbound_frame_size, size - sent)
        if window <= 0:
            await client.until(lambda e: isinstance(e, h2.events.WindowUpdated))
            client.events.clear()
            continue
        client.h2.send_data(sid, body[sent:sent + window], end_stream=sent + window == size)
        sent += window
        client.flush()
    status, answer = await client.response(sid)
    assert status == 200
    assert f'"length": {size}'.encode() in answer and pattern.sha256(size).encode() in answer


async def sse_backend(release: asyncio.Event, events: int):
    async def handler(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await release.wait()
        for i in range(events):
            await resp.write(b"data: %d\n\n" % i)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/events", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def test_sse_streams_unbuffered_many_on_one_connection(proxy, certs):
    release = asyncio.Event()
    runner, port = await sse_backend(release, 3)
    try:
        leaf = certs.leaf("default", ["DNS:localhost", "IP:127.0.0.1"])
        p = await proxy(port, listeners=[{"bind": f"{HOST}:0", "tls_cert": leaf.cert, "tls_key": leaf.key}])
        ctx = ssl.create_default_context(cafile=certs.ca_cert)
        async with httpx.AsyncClient(http2=True, verify=ctx, base_url=f"https://localhost:{p.port}") as client:
            async def one():
                async with client.stream("GET", "/events") as resp:
                    assert resp.http_version == "HTTP/2"
                    assert resp.headers["content-type"] == "text/event-stream"
                    lines = resp.aiter_lines()
                    first = await anext(lines)
                    return resp, lines, first

            opened = await asyncio.wait_for(asyncio.gather(*[one() for _ in range(10)]), 10)
            # every stream got its first event while the backend still holds the rest: nothing buffered
            assert [first for _, _, first in opened] == ["data: first"] * 10
            assert p.server.metrics.http2_connections == 1
            release.set()
    finally:
        await runner.cleanup()


async def test_sse_streams_deliver_the_rest_after_release(proxy):
    release = asyncio.Event()
    runner, port = await sse_backend(release, 3)
    try:
        p = await proxy(port, listeners=H2C)
        client = await Client.open(p.port)
        sids = [client.request("/events") for _ in range(10)]
        await client.until(lambda e: sum(isinstance(x, h2.events.DataReceived) for x in client.events) >= 10)
        release.set()
        for sid in sids:
            status, body = await client.response(sid)
            assert status == 200 and body == b"data: first\n\ndata: 0\n\ndata: 1\n\ndata: 2\n\n"
    finally:
        await runner.cleanup()


async def test_graceful_drain_sends_goaway_and_lets_streams_finish(http_backend, proxy):
    p = await proxy(http_backend, listeners=H2C, shutdown={"drain_timeout": 5, "readiness_grace": 0})
    client = await Client.open(p.port)
    slow = client.request("/slow?delay=0.5&id=a")
    assert await _eventually(lambda: len(_h2_streams(p)) == 1)
    drain = asyncio.create_task(p.server.drain_and_stop())
    goaway = await client.goaway()
    assert goaway.error_code == ErrorCodes.NO_ERROR and goaway.last_stream_id == slow
    late = client.h2.get_next_available_stream_id()
    # h2 will not open a stream after a GOAWAY: write it by hand, as a racing client would
    block = client.h2.encoder.encode([(b":method", b"GET"), (b":path", b"/head"), (b":scheme", b"http"),
                                      (b":authority", b"localhost")])
    client.raw(frame(1, 0x5, late, block))
    # h2 itself reads nothing after a GOAWAY: the frames are parsed here
    frames = await asyncio.wait_for(frames_until_eof(client), 10)
    assert (RstStreamFrame, late, ErrorCodes.REFUSED_STREAM) in [
        (type(f), f.stream_id, getattr(f, "error_code", None)) for f in frames]
    heads = [client.h2.decoder.decode(f.data, raw=True) for f in frames if isinstance(f, HeadersFrame) and f.stream_id == slow]
    assert heads and dict(heads[0])[b":status"] == b"200"
    assert b"".join(f.data for f in frames if isinstance(f, DataFrame) and f.stream_id == slow) == b"slow a"
    await asyncio.wait_for(drain, 10)
    assert p.server.connections == set()


async def frames_until_eof(client: Client) -> list:
    buf, frames = bytearray(), []
    while data := await client.reader.read(65536):
        buf += data
        while len(buf) >= 9:
            head, length = Frame.parse_frame_header(memoryview(buf[:9]))
            if len(buf) < 9 + length:
                break
            head.parse_body(memoryview(buf[9:9 + length]))
            frames.append(head)
            del buf[:9 + length]
    return frames


async def test_h2load_smoke(http_backend, proxy, external_tool):
    h2load = external_tool("h2load", "nghttp2-client")
    p = await proxy(http_backend, listeners=H2C)
    proc = await asyncio.create_subprocess_exec(
        h2load, "-n", "400", "-c", "2", "-m", "20", f"http://{HOST}:{p.port}/head",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = out.decode()
    assert proc.returncode == 0, text
    assert re.search(r"requests: 400 total, 400 started, 400 done, 400 succeeded, 0 failed", text), text
    assert "status codes: 400 2xx" in text, text

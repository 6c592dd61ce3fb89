"""Proxied Server-Sent Events (issue #17 items 1-2): an aiohttp event-stream backend the test drives byte by byte.

The client is aiohttp (HTTP/1.1, chunked: it tells a clean end from a cut one) or
httpx over h2c (HTTP/2).  Timeouts are shrunk to fractions of a second.
"""

from __future__ import annotations

import asyncio
import re
import time
import zlib

import aiohttp
import h2.events
import pytest
from aiohttp import web

from edgeproxy.metrics import SSE, UPSTREAM_TO_CLIENT

HOST = "127.0.0.1"
H2C = [{"bind": f"{HOST}:0", "http2": True}]


class SseBackend:
    """Each request gets a queue: the test puts bytes (written at once) or None (end of the response)."""

    def __init__(self) -> None:
        self.streams: asyncio.Queue[asyncio.Queue] = asyncio.Queue()
        self.queues: list[asyncio.Queue] = []
        self.ended = 0  # handlers that returned, whatever the reason
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handler(self, request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Backend": str(self.port)}
        if "gzip" in request.query:
            headers["Content-Encoding"] = "gzip"  # the test writes the compressed bytes itself
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        queue: asyncio.Queue = asyncio.Queue()
        self.queues.append(queue)
        self.streams.put_nowait(queue)
        try:
            while (item := await queue.get()) is not None:
                await resp.write(item)
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.ended += 1
        return resp

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/events", self.handler)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, HOST, 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        for queue in self.queues:  # handlers still waiting end now (cleanup waits for them)
            queue.put_nowait(None)
        await self.runner.cleanup()

    async def next_stream(self) -> asyncio.Queue:
        return await asyncio.wait_for(self.streams.get(), 5)


@pytest.fixture
async def sse_backend():
    backend = SseBackend()
    await backend.start()
    yield backend
    await backend.stop()


def _sse_active(p) -> int:
    return p.server.metrics.active_by("protocol").get(SSE, 0)


async def _read_until(content: aiohttp.StreamReader, buf: bytearray, needle: bytes, timeout: float = 3.0) -> None:
    async def run():
        while needle not in buf:
            chunk = await content.readany()
            assert chunk, f"stream ended before {needle!r}; got {bytes(buf)!r}"
            buf.extend(chunk)
    await asyncio.wait_for(run(), timeout)


async def test_quiet_stream_outlives_read_timeout_gets_keepalives_and_each_event_at_once(sse_backend, proxy):
    p = await proxy(sse_backend, upstream={"read_timeout": 0.4}, sse={"keepalive_interval": 0.3})
    metrics = p.server.metrics
    async with aiohttp.ClientSession() as session:
        async with session.get(p.url("/events")) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
            upstream = await sse_backend.next_stream()
            assert _sse_active(p) == 1 and metrics.opened[SSE] == 1
            buf = bytearray()
            # not buffered: each event reaches the client before the next one is sent
            for i in range(5):
                upstream.put_nowait(b"id: %d\ndata: event %d\n\n" % (i, i))
                await _read_until(resp.content, buf, b"data: event %d\n\n" % i, timeout=1.0)
            # quiet for 4 x read_timeout: keepalive comments, and the stream is still open
            buf.clear()
            await asyncio.sleep(1.6)
            upstream.put_nowait(b"data: after the quiet\n\n")
            await _read_until(resp.content, buf, b"data: after the quiet\n\n")
            assert buf.count(b":\n\n") >= 3, bytes(buf)
            assert bytes(buf).replace(b":\n\n", b"") == b"data: after the quiet\n\n"
            # one event split across three writes counts once, and arrives whole
            for part in (b"data: spl", b"it\n", b"\n"):
                upstream.put_nowait(part)
                await asyncio.sleep(0.05)
            await _read_until(resp.content, buf, b"data: split\n\n")
            upstream.put_nowait(None)
            assert await resp.content.read() == b""  # a clean end: the last chunk
    assert metrics.truncated == {}
    await asyncio.sleep(0.05)
    assert _sse_active(p) == 0
    messages, _ = metrics.message_totals()
    assert messages[UPSTREAM_TO_CLIENT] == 7  # five, the one after the quiet, the split one; no keepalives
    assert sum(h.count for h in metrics.durations[SSE].values()) == 1


async def test_a_request_pipelined_behind_a_stream_waits_for_its_end_and_a_rebalanced_stream_keeps_the_connection(
        sse_backend, proxy, raw_conn):
    p = await proxy(sse_backend, sse={"keepalive_interval": 0})
    c = await raw_conn(p.port)
    await c.send(b"GET /events HTTP/1.1\r\nHost: a\r\n\r\nGET /events?second HTTP/1.1\r\nHost: a\r\n\r\n")
    first = await sse_backend.next_stream()
    first.put_nowait(b"data: 1\n\n")
    await asyncio.sleep(0.2)
    assert sse_backend.streams.empty()  # one request in flight at a time, even behind an event stream
    # the proxy ends it (what rebalancing does): a clean end, and the connection carries the next request
    (stream,) = p.server.sse_streams
    stream.close_websocket(1012, "rebalance")
    response = await c.read_response()
    assert response.status == 200 and re.fullmatch(rb"data: 1\n\nretry: \d+\n\n", response.body), response.body
    second = await sse_backend.next_stream()
    second.put_nowait(b"data: 2\n\n")
    second.put_nowait(None)
    response = await c.read_response()
    assert response.status == 200 and response.body == b"data: 2\n\n"
    assert _sse_active(p) == 0 and p.server.metrics.opened[SSE] == 2


async def test_upstream_idle_timeout_ends_the_stream_and_frees_everything(sse_backend, proxy, until):
    p = await proxy(sse_backend, sse={"keepalive_interval": 0.2, "upstream_idle_timeout": 0.7})
    async with aiohttp.ClientSession() as session:
        async with session.get(p.url("/events")) as resp:
            upstream = await sse_backend.next_stream()
            upstream.put_nowait(b"data: one\n\n")
            loop = asyncio.get_running_loop()
            start = loop.time()
            body = await asyncio.wait_for(resp.content.read(), 3)  # ends cleanly (no ClientPayloadError)
            elapsed = loop.time() - start
    assert body.startswith(b"data: one\n\n") and b":\n\n" in body
    assert 0.5 < elapsed < 2.0
    upstream.put_nowait(b"data: late\n\n")  # the backend learns by writing that the proxy closed it
    assert await until(lambda: sse_backend.ended == 1)
    assert _sse_active(p) == 0
    assert p.server.metrics.message_totals()[0][UPSTREAM_TO_CLIENT] == 1


async def test_drain_sends_retry_at_the_next_event_boundary_then_ends(sse_backend, proxy, until):
    p = await proxy(sse_backend, shutdown={"drain_timeout": 4, "readiness_grace": 0},
                    sse={"keepalive_interval": 0, "retry_min": 2, "retry_max": 3})
    async with aiohttp.ClientSession() as session:
        async with session.get(p.url("/events")) as resp:
            upstream = await sse_backend.next_stream()
            upstream.put_nowait(b"data: whole\n\ndata: half")  # the stream now stands inside an event
            buf = bytearray()
            await _read_until(resp.content, buf, b"data: half")
            drain = asyncio.ensure_future(p.server.drain_and_stop())
            await asyncio.sleep(0.3)
            assert not drain.done()
            # the event ends in the middle of this chunk: what follows it never goes out
            upstream.put_nowait(b" done\n\ndata: never\n\n")
            rest = await asyncio.wait_for(resp.content.read(), 3)
    body = bytes(buf) + rest
    match = re.fullmatch(rb"data: whole\n\ndata: half done\n\nretry: (\d+)\n\n", body)
    assert match, body
    assert 2000 <= int(match.group(1)) <= 3000
    await asyncio.wait_for(drain, 5)
    assert _sse_active(p) == 0
    assert p.server.metrics.message_totals()[0][UPSTREAM_TO_CLIENT] == 2


async def test_drain_at_a_boundary_is_immediate_and_a_stuck_event_ends_after_boundary_timeout(sse_backend, proxy):
    p = await proxy(sse_backend, shutdown={"drain_timeout": 4, "readiness_grace": 0, "drain_policy": "immediate"},
                    sse={"keepalive_interval": 0, "boundary_timeout": 0.5},
                    http={"header_timeout": 1.0})  # a 0.25 s timer tick
    async with aiohttp.ClientSession() as session:
        first = await session.get(p.url("/events"))
        second = await session.get(p.url("/events"))
        ups = [await sse_backend.next_stream(), await sse_backend.next_stream()]
        ups[0].put_nowait(b"data: a\n\n")
        ups[1].put_nowait(b"data: a\n\ndata: stuck")
        await _read_until(first.content, bytearray(), b"data: a\n\n")
        await _read_until(second.content, bytearray(), b"data: stuck")
        loop = asyncio.get_running_loop()
        start = loop.time()
        drain = asyncio.ensure_future(p.server.drain_and_stop())
        assert re.fullmatch(rb"retry: \d+\n\n", await asyncio.wait_for(first.content.read(), 1))
        at_boundary = loop.time() - start
        assert await asyncio.wait_for(second.content.read(), 3) == b""  # ended, no retry inside the event
        stuck = loop.time() - start
        first.release()
        second.release()
    assert at_boundary < 0.3 and 0.4 < stuck < 2.0
    await asyncio.wait_for(drain, 5)
    assert _sse_active(p) == 0


async def test_reload_removing_the_server_ends_its_streams_with_retry(sse_backend, proxy, until):
    from edgeproxy.config import parse_config
    other = SseBackend()
    await other.start()
    try:
        p = await proxy(sse_backend, sse={"keepalive_interval": 0}, shutdown={"drain_timeout": 1})
        async with aiohttp.ClientSession() as session:
            async with session.get(p.url("/events")) as resp:
                upstream = await sse_backend.next_stream()
                upstream.put_nowait(b"data: a\n\n")
                await _read_until(resp.content, bytearray(), b"data: a\n\n")
                text = p.config_text.replace(f"{HOST}:{sse_backend.port}", f"{HOST}:{other.port}")
                await p.server.reload(parse_config(text))
                rest = await asyncio.wait_for(resp.content.read(), 3)
        assert re.fullmatch(rb"retry: \d+\n\n", rest), rest
        assert await until(lambda: _sse_active(p) == 0)
    finally:
        await other.stop()


async def test_http2_stream_keepalives_no_read_timeout_and_drain_retry(sse_backend, proxy):
    """h2c: the same idle policy per stream; the drain's GOAWAY, then retry: and END_STREAM on the stream.

    h2 (the library) reads nothing after a GOAWAY, so the frames after it are parsed by hand.
    """
    from hyperframe.frame import DataFrame, GoAwayFrame

    from tests.integration.test_http2_hostile import Client
    from tests.integration.test_http2_streams import frames_until_eof

    p = await proxy(sse_backend, listeners=H2C, upstream={"read_timeout": 0.4},
                    sse={"keepalive_interval": 0.3}, shutdown={"drain_timeout": 4, "readiness_grace": 0})
    client = await Client.open(p.port)
    sid = client.request("/events")
    upstream = await sse_backend.next_stream()

    def body() -> bytes:
        return b"".join(e.data for e in client.events if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)

    upstream.put_nowait(b"data: one\n\n")
    assert await client.until(lambda e: b"data: one\n\n" in body(), timeout=1.0)
    assert _sse_active(p) == 1
    await asyncio.sleep(1.3)  # three read_timeouts: keepalives instead of a 504 or a reset
    upstream.put_nowait(b"data: two\n\n")
    assert await client.until(lambda e: b"data: two\n\n" in body())
    assert not any(isinstance(e, h2.events.StreamReset) for e in client.events)
    assert body().count(b":\n\n") >= 2 and body().replace(b":\n\n", b"") == b"data: one\n\ndata: two\n\n"
    drain = asyncio.ensure_future(p.server.drain_and_stop())
    frames = await asyncio.wait_for(frames_until_eof(client), 5)
    assert any(isinstance(f, GoAwayFrame) for f in frames)
    data = [f for f in frames if isinstance(f, DataFrame) and f.stream_id == sid]
    assert re.fullmatch(rb"retry: \d+\n\n", b"".join(f.data for f in data))
    assert "END_STREAM" in data[-1].flags
    await asyncio.wait_for(drain, 5)
    assert _sse_active(p) == 0
    assert p.server.metrics.message_totals()[0][UPSTREAM_TO_CLIENT] == 2


async def test_a_compressed_stream_gets_no_inserted_bytes_and_ends_at_once_on_drain(sse_backend, proxy):
    p = await proxy(sse_backend, upstream={"read_timeout": 0.3}, sse={"keepalive_interval": 0.2},
                    shutdown={"drain_timeout": 4, "readiness_grace": 0})
    gzip = zlib.compressobj(wbits=31)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.get(p.url("/events?gzip")) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            upstream = await sse_backend.next_stream()
            sent = gzip.compress(b"data: one\n\ndata: half") + gzip.flush(zlib.Z_SYNC_FLUSH)
            upstream.put_nowait(sent)
            got = bytearray()
            await _read_until(resp.content, got, sent)
            await asyncio.sleep(0.9)  # three read_timeouts, four keepalive intervals: neither a cut nor a comment
            drain = asyncio.ensure_future(p.server.drain_and_stop())
            got += await asyncio.wait_for(resp.content.read(), 2)  # ends at once: no boundary can be found
    assert bytes(got) == sent
    assert zlib.decompressobj(wbits=31).decompress(bytes(got)) == b"data: one\n\ndata: half"
    await asyncio.wait_for(drain, 5)
    assert _sse_active(p) == 0


async def test_rebalancing_paces_out_the_streams_of_a_drained_server_with_retry(proxy, until):
    backends = [SseBackend(), SseBackend()]
    for backend in backends:
        await backend.start()
    try:
        p = await proxy(*(b.port for b in backends), sse={"keepalive_interval": 0, "retry_min": 1, "retry_max": 2},
                        upstream={"rebalance": {"threshold": 1.5, "sustain": 0, "interval": 0.15, "max_closes": 1}})
        async with aiohttp.ClientSession() as session:
            streams = []
            for i in range(4):
                resp = await session.get(p.url(f"/events?i={i}"))
                backend = next(b for b in backends if str(b.port) == resp.headers["X-Backend"])
                upstream = await backend.next_stream()
                upstream.put_nowait(b"data: hello\n\n")
                await _read_until(resp.content, bytearray(), b"data: hello\n\n")
                streams.append((resp, backend, upstream))
            assert sorted(backends.index(b) for _, b, _ in streams) == [0, 0, 1, 1]
            group = p.server.groups["app"]
            assert sorted(group.loads().values()) == [2, 2]
            from edgeproxy.config import Address
            group.set_drain(Address(HOST, backends[0].port), True)

            async def ended_at(resp) -> float:
                rest = await asyncio.wait_for(resp.content.read(), 5)
                match = re.fullmatch(rb"retry: (\d+)\n\n", rest)
                assert match and 1000 <= int(match.group(1)) <= 2000, rest
                return time.monotonic()

            times = sorted(await asyncio.gather(*(ended_at(r) for r, b, _ in streams if b is backends[0])))
            assert times[1] - times[0] > 0.1, times  # one per interval (max_closes = 1)
            for resp, backend, upstream in streams:
                if backend is backends[1]:  # the other server's streams go on
                    upstream.put_nowait(b"data: still here\n\n")
                    await _read_until(resp.content, bytearray(), b"data: still here\n\n")
            for resp, _, _ in streams:
                resp.close()
        assert await until(lambda: _sse_active(p) == 0)
    finally:
        for backend in backends:
            await backend.stop()


@pytest.mark.timeout(60)
async def test_sigterm_on_a_real_process_ends_every_stream_at_a_boundary_with_retry_and_exits_0(sse_backend, tmp_path):
    """`edgeproxy run`, 300 streams (half of them inside an event when the drain begins), SIGTERM."""
    import signal

    from tests.integration.test_lifecycle import ProxyProcess

    n, grace, drain_timeout = 300, 0.5, 3.0
    proc = await ProxyProcess(tmp_path, sse_backend.port, shutdown={"drain_timeout": drain_timeout,
                              "readiness_grace": grace}, sse={"retry_min": 1, "retry_max": 5}).started()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            responses = await asyncio.gather(*(session.get(f"http://{HOST}:{proc.port}/events") for _ in range(n)))
            upstreams = [await sse_backend.next_stream() for _ in range(n)]
            for i, upstream in enumerate(upstreams):
                upstream.put_nowait(b"id: %d\ndata: a\n\n" % i + (b"data: b" if i % 2 else b""))

            async def body(resp) -> tuple[bytes, float]:
                data = await asyncio.wait_for(resp.content.read(), drain_timeout + grace + 5)  # a cut raises
                return data, time.monotonic()

            bodies = [asyncio.ensure_future(body(r)) for r in responses]
            await asyncio.sleep(0.3)  # every first event is out
            proc.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(grace + 0.3)  # the drain has begun: the open events end now
            for i, upstream in enumerate(upstreams):
                if i % 2:
                    upstream.put_nowait(b"\n\ndata: never sent\n\n")
            results = await asyncio.gather(*bodies)
        code, _ = await proc.wait(timeout=drain_timeout + grace + 5)
        assert code == 0
    finally:
        err = proc.kill()
    retries, waited = [], 0
    seen = set()
    for data, _ in results:
        i = int(re.match(rb"id: (\d+)\n", data).group(1))  # which upstream stream this response was
        seen.add(i)
        event = b"id: %d\ndata: a\n\n" % i + (b"data: b\n\n" if i % 2 else b"")
        # a stream whose batch came after the upstream's last chunk relayed all of it
        match = re.fullmatch(re.escape(event) + rb"(data: never sent\n\n)?retry: (\d+)\n\n", data)
        assert match, (i, data)
        waited += i % 2 and match.group(1) is None  # its end waited for the boundary, and cut after it
        retries.append(int(match.group(2)))
    assert waited > 0 and seen == set(range(n))
    assert all(1000 <= r <= 5000 for r in retries) and len(set(retries)) > n // 2  # jittered
    ends = sorted(t - signalled for _, t in results)
    assert ends[0] >= grace * 0.9 and ends[-1] - ends[0] >= 0.3 * drain_timeout, "the ends were not paced"
    assert "Traceback" not in err

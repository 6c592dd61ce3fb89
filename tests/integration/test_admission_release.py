"""Every kind of connection gives its admission slot back when its socket closes.

A slot that is never given back turns `max_connections_per_ip` into a lifetime
quota: the client that opens and closes connections politely, one at a time,
is refused for good once it has opened that many.  Each test here opens and
closes ten times the limit (per address and in all), one after another,
through the real proxy; none may be refused, and afterwards nothing is counted
as open, neither by admission control nor by the `edgeproxy_connections_active`
gauges of `/metrics`.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from edgeproxy.resume_client import ResumableWebSocket
from tests.integration.conftest import scrape, wait_until

PER_IP = 3
ROUNDS = 10 * PER_IP
LIMITS = {"max_connections_per_ip": PER_IP, "max_connections": PER_IP}


async def open_gauges(p) -> dict[frozenset, float]:
    """The non-zero samples of `edgeproxy_connections_active`, scraped from the admin listener."""
    return {labels: v for (name, labels), v in (await scrape(p)).items() if name == "edgeproxy_connections_active" and v}


async def assert_nothing_left_open(p) -> None:
    admission = p.server.admission
    assert await wait_until(lambda: admission.open == 0 and not admission.per_ip), (admission.open, admission.per_ip)
    for _ in range(50):  # the gauges drop in connection_lost, maybe just after the client saw the close
        if not (left := await open_gauges(p)):
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"edgeproxy_connections_active still counts {left}")


async def admitted(connecting, i: int):
    """The connection ``connecting`` opens; a refusal (503) fails the test with its number."""
    try:
        return await connecting
    except Exception as exc:  # websockets' InvalidStatus, or its reaction to the 503's early close
        pytest.fail(f"connection {i} of {ROUNDS} was not admitted: {exc!r}")


async def test_http_connections_give_their_slot_back(proxy, http_backend, raw_conn) -> None:
    p = await proxy(http_backend, limits=LIMITS)
    for i in range(ROUNDS):
        c = await raw_conn(p.port)
        await c.send(f"GET /headers?i={i} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
        assert (await c.read_response()).status == 200, f"connection {i} refused"
        await c.expect_closed()
        c.close()
    await assert_nothing_left_open(p)


async def test_relayed_websockets_give_their_slot_back(proxy, ws_backend, ws_connect) -> None:
    p = await proxy(ws_backend, limits=LIMITS)
    for i in range(ROUNDS):
        ws = await admitted(ws_connect(p.ws_url("/echo")), i)
        await ws.send(f"m{i}")
        assert await asyncio.wait_for(ws.recv(), 5) == f"m{i}"
        await ws.close()
    await assert_nothing_left_open(p)


async def test_resumable_sessions_give_their_slot_back(proxy, ws_backend) -> None:
    p = await proxy(ws_backend, limits=LIMITS, websocket={"resume_secret": "resume-secret-0123456789"})
    for i in range(ROUNDS):
        c = await admitted(ResumableWebSocket(p.ws_url("/echo")).connect(), i)
        await c.send(f"m{i}")
        assert await asyncio.wait_for(c.recv(), 5) == f"m{i}"
        await c.close()
        assert await wait_until(lambda: not p.server.resume.sessions)
    await assert_nothing_left_open(p)


async def test_hub_connections_give_their_slot_back(proxy, refused_port, ws_connect) -> None:
    p = await proxy(refused_port, limits=LIMITS, hubs=[{"path": "/hub", "ping_interval": 0}])
    for i in range(ROUNDS):
        ws = await admitted(ws_connect(p.ws_url("/hub")), i)
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["op"] == "connected"
        await ws.send(orjson.dumps({"op": "subscribe", "channel": "news"}).decode())
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["op"] == "subscribed"
        await ws.close()
    await assert_nothing_left_open(p)


async def test_proxied_event_streams_give_their_slot_back(proxy) -> None:
    from tests.integration.test_sse_proxy import SseBackend

    backend = SseBackend()
    await backend.start()
    try:
        p = await proxy(backend, limits=LIMITS)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for i in range(ROUNDS):
                resp = await session.get(p.url(f"/events?i={i}"))
                assert resp.status == 200, f"stream {i} of {ROUNDS} was not admitted: {resp.status}"
                upstream = await backend.next_stream()
                upstream.put_nowait(b"data: %d\n\n" % i)
                assert await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5) == b"data: %d\n\n" % i
                if i % 2:
                    resp.close()  # the client leaves mid-stream
                else:
                    upstream.put_nowait(None)  # the upstream ends it
                    assert await asyncio.wait_for(resp.content.read(), 5) == b""
                    resp.release()
                # the slot comes back when the proxy sees the close, a moment after the client made it
                assert await wait_until(lambda: p.server.admission.open == 0), f"stream {i} kept its slot"
        await assert_nothing_left_open(p)
        assert p.server.sse_streams == set()
        assert p.server.metrics.opened["sse"] == ROUNDS
    finally:
        await backend.stop()


async def test_hub_event_streams_give_their_slot_back(proxy, refused_port) -> None:
    p = await proxy(refused_port, limits=LIMITS, hubs=[{"path": "/hub", "ping_interval": 0}])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for i in range(ROUNDS):
            resp = await session.get(p.url("/hub/sse?channel=news"), headers={"Accept": "text/event-stream"})
            assert resp.status == 200, f"stream {i} of {ROUNDS} was not admitted: {resp.status}"
            head = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
            if head.startswith(b"retry:"):  # the stream's first block sets the reconnect delay
                head = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
            assert head.startswith(b"event: connected"), head
            resp.close()
            assert await wait_until(lambda: p.server.admission.open == 0), f"stream {i} kept its slot"
    await assert_nothing_left_open(p)


async def test_http2_connections_give_their_slot_back(proxy, http_backend) -> None:
    import httpx

    p = await proxy(http_backend, limits=LIMITS, listeners=[{"bind": "127.0.0.1:0", "http2": True}])
    for i in range(ROUNDS):
        async with httpx.AsyncClient(http1=False, http2=True, base_url=p.url(), timeout=5) as client:
            answers = await asyncio.gather(*(client.get(f"/headers?i={i}&s={s}") for s in range(3)))
        assert [a.status_code for a in answers] == [200, 200, 200], f"connection {i} refused"
        assert all(a.http_version == "HTTP/2" for a in answers)
    await assert_nothing_left_open(p)

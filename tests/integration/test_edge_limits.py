"""Admission control, origins, pending connects, frame size and message/byte rates, end to end."""

from __future__ import annotations

import asyncio
import collections
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

HOST = "127.0.0.1"
FAST_TICK = {"close_timeout": 0.4}  # the shared tick runs every 0.1 s


def upgrade_request(authority: str, path: str = "/echo", extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


async def test_max_connections_gives_an_immediate_503_and_existing_sessions_go_on(ws_backend, proxy, ws_connect, raw_conn):
    p = await proxy(ws_backend, limits={"max_connections": 2})
    a = await ws_connect(p.ws_url("/echo"))
    b = await ws_connect(p.ws_url("/echo"))
    c = await raw_conn(p.port)  # nothing sent: the answer comes without reading anything
    resp = await c.read_response()
    assert resp.status == 503 and 1 <= int(resp.header("Retry-After")) <= 5  # spread over the cap window
    assert b"max_connections" in resp.body
    await c.expect_closed()
    for ws in (a, b):
        await ws.send("still here")
        assert await ws.recv() == "still here"
    await a.close()
    assert p.server.admission.open == 1 or await _wait(lambda: p.server.admission.open == 1)
    d = await ws_connect(p.ws_url("/echo"))
    await d.send("room again")
    assert await d.recv() == "room again"
    assert p.server.metrics.limits["max_connections"] == 1
    assert p.server.metrics.not_opened[("http", "refused", "overloaded")] == 1


async def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


async def test_connection_rate_answers_503_with_a_computed_retry_after(ws_backend, proxy, raw_conn, ws_connect):
    p = await proxy(ws_backend, limits={"connection_rate": 0.25, "connection_burst": 2})
    a = await ws_connect(p.ws_url("/echo"))
    b = await ws_connect(p.ws_url("/echo"))
    c = await raw_conn(p.port)
    await c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # a request in flight: the 503 still arrives (lingering close)
    resp = await c.read_response()
    assert resp.status == 503
    # the next token is 4 s away (0.25/s), and this client booked it: told to come back within its 4 s slot
    assert 4 <= int(resp.header("Retry-After")) <= 8
    await c.expect_closed()
    await a.send("x")
    assert await a.recv() == "x"
    # an upgrade gets the same answer (websockets' client trips over a response that comes
    # before its request is out, so this one is raw)
    d = await raw_conn(p.port)
    await d.send(upgrade_request(p.authority))
    resp = await d.read_response()
    assert resp.status == 503 and 7 <= int(resp.header("Retry-After")) <= 12  # the slot after c's
    assert p.server.metrics.limits["rate"] == 2
    await b.send("y")
    assert await b.recv() == "y"


async def test_storm_of_connects_is_paced_and_never_blocks_the_loop(ws_backend, proxy):
    """300 connects at once against rate 50/s, burst 20: ~20 admitted at once, the rest 503."""
    p = await proxy(ws_backend, limits={"connection_rate": 50, "connection_burst": 20})

    async def one():
        reader, writer = await asyncio.open_connection(HOST, p.port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = await asyncio.wait_for(reader.read(200), 5)
        writer.close()
        return head.split(b" ", 2)[1]

    started = time.monotonic()
    statuses = await asyncio.gather(*(one() for _ in range(300)))
    took = time.monotonic() - started
    refused = statuses.count(b"503")
    admitted = len(statuses) - refused
    assert 20 <= admitted <= 20 + 50 * took + 1, (admitted, took)
    assert refused == p.server.metrics.limits["rate"]
    assert p.server.metrics.event_loop_lag < 0.5


async def test_a_refused_storm_gets_retry_after_values_spread_over_the_queue(ws_backend, proxy):
    """200 connects at once against rate 20/s, burst 1: the refused are told 1..~10 s, about 20 per second."""
    p = await proxy(ws_backend, limits={"connection_rate": 20, "connection_burst": 1})

    async def one():
        reader, writer = await asyncio.open_connection(HOST, p.port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        return dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line).get("Retry-After")

    values = [int(v) for v in await asyncio.gather(*(one() for _ in range(200))) if v is not None]
    assert len(values) >= 180
    counts = collections.Counter(values)
    top = max(counts)
    assert set(counts) == set(range(1, top + 1)) and top >= 9, counts  # every second of the window is used
    assert max(counts.values()) <= 2 * 20, counts  # none gets more than twice what the bucket admits in it


async def test_allowed_origins_403_before_the_backend(ws_backend, proxy, raw_conn, ws_connect):
    p = await proxy(ws_backend, routes=[{"path_prefix": "/", "upstream": "app",
                                        "allowed_origins": ["https://app.example.com", "https://*.example.com"]}])
    c = await raw_conn(p.port)
    await c.send(upgrade_request(p.authority, extra="Origin: https://evil.test\r\n"))
    resp = await c.read_response()
    assert resp.status == 403
    # the connection stays usable (a body-less refusal keeps keep-alive)
    await c.send(upgrade_request(p.authority, extra="Origin: https://x.example.com\r\n"))
    assert (await c.read_response()).status == 101
    assert len(await ws_backend.wait_records(1)) == 1
    ws = await ws_connect(p.ws_url("/echo"), origin="https://app.example.com")
    await ws.send("ok")
    assert await ws.recv() == "ok"
    ws = await ws_connect(p.ws_url("/echo"))  # no Origin: not a browser
    await ws.send("ok")
    assert await ws.recv() == "ok"
    with pytest.raises(InvalidStatus):
        await ws_connect(p.ws_url("/echo"), origin="https://example.com")
    assert len(ws_backend.records) == 3  # the refused ones never reached it
    assert p.server.metrics.limits["forbidden_origin"] == 2


async def test_max_pending_connects_gives_503(stalled_port, proxy, raw_conn):
    p = await proxy(stalled_port, upstream={"max_pending_connects": 1, "connect_timeout": 3})
    first = await raw_conn(p.port)
    await first.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.2)  # its connect hangs
    second = await raw_conn(p.port)
    await second.send(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    resp = await second.read_response(timeout=2)
    assert resp.status == 503 and 1 <= int(resp.header("Retry-After")) <= 5  # spread over the cap window
    assert p.server.metrics.limits["max_pending_connects"] == 1
    assert (await first.read_response(timeout=5)).status == 504


async def test_max_frame_size_closes_1009(ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend, websocket={"max_frame_size": 1000})
    ws = await ws_connect(p.ws_url("/echo"))
    await ws.send("a" * 1000)
    assert await ws.recv() == "a" * 1000
    await ws.send("a" * 1001)
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1009
    rec = ws_backend.records[0]
    await ws_backend.wait_done(rec)
    assert rec.close_code == 1001 and rec.messages == ["a" * 1000]


async def test_message_rate_close_1008(ws_backend, proxy, ws_connect):
    p = await proxy(ws_backend, websocket={**FAST_TICK, "message_rate": 20, "message_burst": 10})
    calm = await ws_connect(p.ws_url("/echo"))
    ws = await ws_connect(p.ws_url("/sink"))
    for i in range(200):
        await ws.send(f"m{i}")
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1008
    await calm.send("unaffected")
    assert await calm.recv() == "unaffected"
    assert p.server.metrics.limits["rate_close"] == 1


async def test_byte_rate_throttle_pauses_the_sender_and_loses_nothing(ws_backend, proxy, ws_connect):
    """Rates are metered on the shared tick: a burst passes, then the sender is not read until its debt is paid."""
    p = await proxy(ws_backend, websocket={**FAST_TICK, "byte_rate": 40000, "byte_burst": 10000, "rate_action": "throttle"})
    ws = await ws_connect(p.ws_url("/echo"))
    other = await ws_connect(p.ws_url("/echo"))
    sent = [bytes([i]) * 2000 for i in range(30)]  # 60 kB: 50 kB over the burst, 1.25 s of debt at 40 kB/s
    for message in sent:
        await ws.send(message)
    got = [await asyncio.wait_for(ws.recv(), 10) for _ in sent]
    assert got == sent
    await _wait(lambda: p.server.metrics.limits.get("rate_throttle", 0) >= 1)
    started = time.monotonic()
    await ws.send("next")
    await other.send("another session is not throttled")
    assert await asyncio.wait_for(other.recv(), 1) == "another session is not throttled"
    assert time.monotonic() - started < 0.5
    assert await asyncio.wait_for(ws.recv(), 10) == "next"
    took = time.monotonic() - started
    assert 0.7 <= took <= 3.0, took
    await ws.close()
    assert ws.close_code == 1000


async def test_a_throttled_session_still_closes_promptly(ws_backend, proxy, ws_connect):
    """Once the session is closing, the throttle lets go, so the close handshake is not held up by the debt."""
    p = await proxy(ws_backend, websocket={**FAST_TICK, "byte_rate": 2000, "byte_burst": 1000, "rate_action": "throttle"})
    ws = await ws_connect(p.ws_url("/echo"))
    for i in range(10):
        await ws.send(bytes([i]) * 2000)  # 20 kB: about 10 s of debt at 2 kB/s
    await _wait(lambda: p.server.metrics.limits.get("rate_throttle", 0) >= 1)
    started = time.monotonic()
    conn = next(c for c in p.server.connections if c.relay is not None)
    conn.close_websocket(1012, "restarting")
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1012
    assert time.monotonic() - started < 2.0


async def test_a_reload_that_adds_allowed_origins_enforces_them(ws_backend, proxy, ws_connect):
    """Origin policies follow the routes of a reloaded config (they are keyed by route)."""
    from edgeproxy.config import parse_config

    p = await proxy(ws_backend)
    ws = await ws_connect(p.ws_url("/echo"), origin="https://evil.test")  # any origin for now
    await ws.close()
    text = p.config_text.replace('upstream = "app"\n', 'upstream = "app"\nallowed_origins = ["https://app.example.com"]\n', 1)
    assert text != p.config_text
    assert "routes" in (await p.server.reload(parse_config(text)))["changed"]
    with pytest.raises(InvalidStatus) as info:
        await ws_connect(p.ws_url("/echo"), origin="https://evil.test")
    assert info.value.response.status_code == 403
    ws = await ws_connect(p.ws_url("/echo"), origin="https://app.example.com")
    await ws.send("ok")
    assert await ws.recv() == "ok"


async def test_allowed_origins_still_hold_after_a_reload_that_leaves_the_routes_alone(ws_backend, proxy, ws_connect):
    """The origin policies are keyed by the new routes: the router must route to those, changed or not."""
    from edgeproxy.config import parse_config

    p = await proxy(ws_backend, routes=[{"path_prefix": "/", "upstream": "app", "allowed_origins": ["https://app.example.com"]}])
    text = p.config_text.replace("[admin]", "[http]\nkeepalive_timeout = 30\n\n[admin]")
    assert "routes" not in (await p.server.reload(parse_config(text)))["changed"]
    with pytest.raises(InvalidStatus) as info:
        await ws_connect(p.ws_url("/echo"), origin="https://evil.test")
    assert info.value.response.status_code == 403

"""Scripted traffic through the proxy moves each metric by exactly the expected amount.

Real peers (the `websockets` library on both sides, raw sockets for broken
handshakes); the exposition is read from /metrics on the admin listener and
parsed with prometheus-client's parser.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import websockets

from tests.integration.conftest import scrape

HOST = "127.0.0.1"


def value(samples, name: str, **labels) -> float:
    """The sample with exactly these labels (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples, name: str, **labels) -> float:
    """Sum of the samples whose labels include these."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def settle(p, predicate, timeout: float = 5.0) -> None:
    """Wait until the proxy has noticed every close (connection_lost ran)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    assert predicate()


async def test_sessions_messages_and_close_codes_are_counted_exactly(proxy, ws_backend) -> None:
    p = await proxy(ws_backend)
    before = await scrape(p)
    n_clients, m_each = 4, 7
    # No compression, so the byte counts are exact.
    clients = [await websockets.connect(p.ws_url("/echo"), compression=None) for _ in range(n_clients)]
    mid = await scrape(p)
    assert total(mid, "edgeproxy_connections_active", protocol="websocket") == n_clients
    route_labels = {"protocol": "websocket", "route": "*/", "upstream": "app", "server": f"{HOST}:{ws_backend.port}"}
    assert value(mid, "edgeproxy_connections_active", **route_labels) == n_clients
    for ws in clients:
        for i in range(m_each):
            await ws.send(b"x" * 10)
            assert await ws.recv() == b"x" * 10
    # Two close normally, one with an application code, one drops its TCP connection.
    await clients[0].close(1000)
    await clients[1].close(1000)
    await clients[2].close(4001, "app bye")
    clients[3].transport.abort()
    await settle(p, lambda: not p.server.connections)
    after = await scrape(p)

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("edgeproxy_connections_opened_total", protocol="websocket", outcome="upgraded") == n_clients
    assert delta("edgeproxy_connections_active", protocol="websocket") == 0
    expected_messages = n_clients * m_each
    assert delta("edgeproxy_messages_total", direction="client_to_upstream") == expected_messages
    assert delta("edgeproxy_messages_total", direction="upstream_to_client") == expected_messages
    # Frame bytes, close frames included (they are not messages). From the clients:
    # 10-byte payloads with 2 + 4 (mask) header bytes, then close frames 1000, 1000
    # and 4001 "app bye" (masked); the aborted client sent nothing more.
    assert delta("edgeproxy_message_bytes_total", direction="client_to_upstream") == 28 * 16 + 8 + 8 + 15
    # From the upstream: 2 header bytes each, and the three close frames echoed;
    # its answer to the proxy's 1001 for the aborted client may or may not be read.
    from_upstream = delta("edgeproxy_message_bytes_total", direction="upstream_to_client")
    assert 28 * 12 + 4 + 4 + 11 <= from_upstream <= 28 * 12 + 4 + 4 + 11 + 127
    # Lifetimes by the close code the client saw: the upstream echoes 1000 and
    # 4001 ("application"); the aborted one got no close frame from anybody.
    assert delta("edgeproxy_connection_duration_seconds_count", protocol="websocket", close_code="1000") == 2
    assert delta("edgeproxy_connection_duration_seconds_count", protocol="websocket", close_code="application") == 1
    assert delta("edgeproxy_connection_duration_seconds_count", protocol="websocket") == n_clients


async def test_refused_and_failed_handshakes_are_counted_by_reason(proxy, ws_backend, raw_conn, refused_port) -> None:
    p = await proxy(ws_backend)
    before = await scrape(p)
    # The upstream refuses (403), twice.
    for _ in range(2):
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(p.ws_url("/forbidden"))
    # A broken upgrade request (no key): 400 from the proxy.
    c = await raw_conn(p.port)
    await c.send(b"GET /echo HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert (await c.read_response()).status == 400
    after = await scrape(p)

    def delta(**labels):
        name = "edgeproxy_connections_opened_total"
        return total(after, name, protocol="websocket", **labels) - total(before, name, protocol="websocket", **labels)

    assert delta(outcome="refused", reason="upstream_refused") == 2
    assert delta(outcome="refused", reason="bad_handshake") == 1
    assert delta(outcome="upgraded") == 0

    dead = await proxy(refused_port)
    before = await scrape(dead)
    with pytest.raises(websockets.InvalidStatus):
        await websockets.connect(dead.ws_url("/echo"))
    after = await scrape(dead)
    name = "edgeproxy_connections_opened_total"
    labels = {"protocol": "websocket", "outcome": "failed", "reason": "upstream_unreachable"}
    assert value(after, name, **labels) - value(before, name, **labels) == 1


async def test_http_requests_and_connections_are_counted(proxy, http_backend) -> None:
    p = await proxy(http_backend)
    before = await scrape(p)
    async with aiohttp.ClientSession() as session:  # one keep-alive connection
        for status in (200, 200, 404, 503):
            async with session.get(p.url(f"/status/{status}")) as resp:
                assert resp.status == status
    await settle(p, lambda: not p.server.connections)
    after = await scrape(p)

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("edgeproxy_http_requests_total", status_class="2xx") == 2
    assert delta("edgeproxy_http_requests_total", status_class="4xx") == 1
    assert delta("edgeproxy_http_requests_total", status_class="5xx") == 1
    assert delta("edgeproxy_http_request_duration_seconds_count") == 4
    # The scrape itself goes to the admin listener, not through the proxy.
    assert delta("edgeproxy_connections_opened_total", protocol="http", outcome="accepted") == 1
    assert delta("edgeproxy_connections_active", protocol="http") == 0

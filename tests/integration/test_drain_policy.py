"""A drain paces hub subscribers like every other WebSocket; ``drain_policy`` and readiness states.

Regression (found by the deploy drill): hub connections were left out of the
drain plan and all closed at once by `ProxyServer.stop`, after the paced
sessions were gone, so rolling a hub instance sent its whole reconnect wave in
one go whatever the drain said.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import websockets

from edgeproxy.config import ConfigError, parse_config

from tests.integration.conftest import build_config

N = 40


async def _close_times(p, n: int = N) -> list[float]:
    """Open `n` hub connections, drain the proxy, return when each got its close (seconds after the drain)."""
    port = p.server.addresses[0][1]
    clients = [await websockets.connect(f"ws://127.0.0.1:{port}/hub", ping_interval=None) for _ in range(n)]
    for ws in clients:
        await ws.recv()  # connected

    async def closed_at(ws) -> tuple[float, int | None, str]:
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await ws.recv()
        return time.monotonic(), ws.close_code, ws.close_reason

    waits = [asyncio.ensure_future(closed_at(ws)) for ws in clients]
    start = time.monotonic()
    await asyncio.wait_for(p.server.drain_and_stop(), 10)
    results = await asyncio.gather(*waits)
    for _, code, reason in results:
        assert code == 1012 and "reconnect in" in reason
    return sorted(t - start for t, _, _ in results)


async def test_drain_paces_hub_subscribers(proxy, refused_port) -> None:
    p = await proxy(refused_port, hubs=[{"path": "/hub", "ping_interval": 0}],
                    shutdown={"drain_timeout": 2.0, "readiness_grace": 0, "close_code": 1012})
    times = await _close_times(p)
    # Paced: batches over the first half of the 2 s window, not one burst.
    assert times[-1] - times[0] >= 0.7, times
    assert times[-1] < 2.0


async def test_immediate_drain_closes_every_subscriber_at_once(proxy, refused_port) -> None:
    p = await proxy(refused_port, hubs=[{"path": "/hub", "ping_interval": 0}],
                    shutdown={"drain_timeout": 2.0, "readiness_grace": 0, "close_code": 1012,
                              "drain_policy": "immediate"})
    times = await _close_times(p)
    assert times[-1] - times[0] < 0.3, times


def test_drain_policy_is_validated(refused_port) -> None:
    text = build_config(upstreams=[{"name": "app", "servers": [f"127.0.0.1:{refused_port}"]}],
                        routes=[{"path_prefix": "/", "upstream": "app"}],
                        sections={"shutdown": {"drain_policy": "all-at-once"}})
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert "shutdown.drain_policy" in str(info.value) and "paced, immediate" in str(info.value)


async def _readyz_and_gauge(p) -> tuple[int, str, dict[str, float]]:
    host, port = p.server.admin.address
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{host}:{port}/readyz") as r:
            status, body = r.status, await r.text()
        async with http.get(f"http://{host}:{port}/metrics") as r:
            text = await r.text()
    gauge = {line.split('"')[1]: float(line.rsplit(" ", 1)[1])
             for line in text.splitlines() if line.startswith("edgeproxy_ready_state{")}
    return status, body, gauge


async def test_readyz_tells_draining_from_unhealthy(proxy, refused_port) -> None:
    p = await proxy(refused_port, upstream={"health": {"check": "tcp", "interval": 0.05, "timeout": 0.05, "fall": 1}})
    # The only upstream's only server refuses connections: an outage, not a roll.
    for _ in range(100):
        status, body, gauge = await _readyz_and_gauge(p)
        if status == 503:
            break
        await asyncio.sleep(0.05)
    assert status == 503 and body.startswith("unhealthy: no upstream has a server up (app)"), body
    assert gauge == {"ready": 0, "starting": 0, "draining": 0, "unhealthy": 1}
    p.server.ready = False  # what a drain does first
    status, body, gauge = await _readyz_and_gauge(p)
    assert (status, body) == (503, "draining\n")
    assert gauge == {"ready": 0, "starting": 0, "draining": 1, "unhealthy": 0}


async def test_readyz_ready_state_gauge(proxy, ws_backend) -> None:
    p = await proxy(ws_backend)
    status, body, gauge = await _readyz_and_gauge(p)
    assert (status, body) == (200, "ready\n")
    assert gauge == {"ready": 1, "starting": 0, "draining": 0, "unhealthy": 0}

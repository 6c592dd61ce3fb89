"""Concurrent permessage-deflate sessions, Autobahn 12.x style, through the proxy.

Autobahn's 12.x/13.x cases send one compressed message, wait for its echo, and so
on, 1,000 times, with messages of up to 64 KiB.  With 4 cases at once 40 of the 216
failed through edgeproxy: not a stall, but the proxy's heartbeat.  Autobahn ends a
case that expects no control frame at the first PING (or PONG) it receives, and the
first heartbeat of a session comes at a random point in its first interval.  These
tests run that traffic, 4 sessions at once, and record every frame each client
gets: with heartbeats on, pings come in between the echoes and every echo still
arrives intact (a real client answers them); with the config the conformance run
uses (``run_autobahn.PROXY_CONFIG``: ``ping_interval = 0``) no frame of the
proxy's own reaches a client.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import HOST

SESSIONS = 4
MESSAGES = 250
SIZES = (16, 64, 256, 1024, 4096, 8192, 16384, 32768, 65536)
TEXT = b"".join(b"%d: the quick brown fox jumps over the lazy dog; " % i for i in range(2000))


def _conformance_config() -> str:
    path = Path(__file__).resolve().parent.parent / "conformance" / "run_autobahn.py"
    spec = importlib.util.spec_from_file_location("edgeproxy_run_autobahn_cfg", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.PROXY_CONFIG


async def _lockstep(ws, offset: int, control: list[int], min_seconds: float) -> tuple[int, int]:
    """Autobahn 12.x: one message, its echo, the next; returns (messages sent, echoes that matched).

    At least `MESSAGES`, and on until `min_seconds` passed (bounded: 20 s at most).
    """
    recv_frame = ws.protocol.recv_frame

    def spy(frame):
        # every frame this client gets: a control frame of the proxy's own would end an Autobahn case
        if frame.opcode.value >= 8:
            control.append(frame.opcode.value)
        return recv_frame(frame)

    ws.protocol.recv_frame = spy
    loop = asyncio.get_running_loop()
    until = loop.time() + min_seconds
    matched = i = 0
    while i < MESSAGES or (loop.time() < until and i < 100 * MESSAGES):
        size = SIZES[(i + offset) % len(SIZES)]
        start = (i * 7919) % (len(TEXT) - size)
        message = TEXT[start:start + size].decode()
        await ws.send(message)
        echo = await asyncio.wait_for(ws.recv(), 10)
        matched += echo == message
        i += 1
    ws.protocol.recv_frame = recv_frame  # the closing handshake is not counted
    return i, matched


async def _run(url: str, ws_connect, min_seconds: float = 0.0) -> list[tuple[bool, list[int]]]:
    """Each session's (every echo matched, the control frames it got)."""
    clients = [await ws_connect(url, compression="deflate") for _ in range(SESSIONS)]
    for ws in clients:
        assert ws.protocol.extensions, "permessage-deflate was not negotiated"
    controls: list[list[int]] = [[] for _ in clients]
    counts = await asyncio.gather(*(_lockstep(ws, n, controls[n], min_seconds) for n, ws in enumerate(clients)))
    for ws in clients:
        await ws.close()
    return [(sent >= MESSAGES and matched == sent, control) for (sent, matched), control in zip(counts, controls)]


@pytest.mark.timeout(60)
async def test_heartbeats_come_between_the_echoes_of_concurrent_deflate_sessions(proxy, ws_backend, ws_connect):
    p = await proxy(ws_backend, websocket={"ping_interval": 0.2, "ping_upstream": False})
    # long enough for the first ping (within the first interval, plus a 50 ms tick)
    results = await _run(p.ws_url("/echo"), ws_connect, min_seconds=0.6)
    assert [ok for ok, _ in results] == [True] * SESSIONS  # every echo, intact
    # what ended Autobahn's 12.x/13.x cases: a ping in the middle of the exchange
    assert all(control and set(control) == {9} for _, control in results), results


@pytest.mark.timeout(60)
async def test_the_conformance_proxy_sends_no_frame_of_its_own(ws_backend, ws_connect):
    from edgeproxy.config import parse_config
    from edgeproxy.transport.server import ProxyServer

    text = _conformance_config().format(port=0, upstream_port=ws_backend.port)
    server = ProxyServer(parse_config(text, "run_autobahn.PROXY_CONFIG"))
    await asyncio.wait_for(server.start(), 5)
    try:
        host, port = server.addresses[0][:2]
        assert host == HOST
        results = await _run(f"ws://{host}:{port}/echo", ws_connect)
    finally:
        await asyncio.wait_for(server.stop(), 10)
    assert results == [(True, [])] * SESSIONS

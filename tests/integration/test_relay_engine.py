"""The relay engine: the compiled one (sockets below the loop) and its pure twin give the same results.

Both are driven with real sockets on the running loop: a socketpair stands for the
client's TCP connection and one for the upstream's; the proxy's ends become loop
transports, which `relay_pair` hands to the engine.  Byte streams of frames (good,
broken, over a limit, close handshakes, pings and pongs) are written from both
apps in chunks cut at random offsets, and everything observable is compared: every
byte each app receives, every action the relay raised, every eof/connection_lost
the owners heard, the relay's close codes and counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import socket
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Loaded first, with this run's _accel: `implementation` below re-imports only _accel and
# websocket, so nothing else binds to its private copies.
import edgeproxy.core.websocket  # noqa: F401
from edgeproxy.core.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, encode_close_payload
from tests.conftest import import_compiled
from tests.integration.conftest import wait_until

_MODULES: dict[str, tuple] = {}


def implementation(name: str):
    """(`_accel`, `core.websocket`) built on one implementation, whatever this run's `_accel` picked.

    `WebSocketRelay` subclasses `_accel.RelayCore`, so comparing the engines needs a
    copy of the module for each twin; the process's own modules are put back after.
    """
    if name in _MODULES:
        return _MODULES[name]
    names = ("edgeproxy.core._accel", "edgeproxy.core.websocket")
    saved = {key: sys.modules.get(key) for key in names}
    package = sys.modules["edgeproxy.core"]
    saved_attrs = {attr: getattr(package, attr, None) for attr in ("_accel", "websocket")}
    old_flag = os.environ.get("EDGEPROXY_PURE")
    os.environ["EDGEPROXY_PURE"] = "1" if name == "pure" else "0"
    try:
        for key in names:
            sys.modules.pop(key, None)
        accel = importlib.import_module("edgeproxy.core._accel")
        websocket = importlib.import_module("edgeproxy.core.websocket")
    finally:
        if old_flag is None:
            del os.environ["EDGEPROXY_PURE"]
        else:
            os.environ["EDGEPROXY_PURE"] = old_flag
        for key, module in saved.items():
            if module is not None:
                sys.modules[key] = module
            else:
                sys.modules.pop(key, None)  # imported for the first time here: the next import is fresh
        for attr, value in saved_attrs.items():
            if value is not None:
                setattr(package, attr, value)
            elif hasattr(package, attr):
                delattr(package, attr)
    if name == "compiled" and not accel.SPEEDUPS:
        import_compiled()  # skips, or fails under EDGEPROXY_REQUIRE_EXT=1, naming the missing build
    _MODULES[name] = (accel, websocket)
    return accel, websocket


def _carry_out(websocket) -> dict:
    """Relay action kind -> (side, transport method), as the proxy's connection objects carry them out."""
    return {getattr(websocket, f"{verb}_{side.upper()}"): (side, method)
            for verb, method in (("SEND", "write"), ("CLOSE", "close"), ("ABORT", "abort"), ("SHUTDOWN", "write_eof"))
            for side in ("client", "upstream")}


#: the action kinds are the same strings in every copy of the module
CARRY_OUT = _carry_out(edgeproxy.core.websocket)


class Owner(asyncio.Protocol):
    """A connection object: owns one proxy-side transport, records what it hears."""

    def __init__(self, name: str, events: list):
        self.name = name
        self.events = events
        self.transport = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def eof_received(self):
        self.events.append((self.name, "eof"))
        return True  # half-close: the relay decides when to close

    def connection_lost(self, exc):
        self.events.append((self.name, "lost", type(exc).__name__ if exc else None))
        if not self.lost.done():
            self.lost.set_result(None)


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None, rsv: int = 0) -> bytes:
    from edgeproxy.core.frames import encode_frame

    return encode_frame(opcode, payload, fin=fin, mask_key=mask, rsv=rsv)


async def drain_app(sock: socket.socket, into: bytearray, quiet: float) -> None:
    """Read what the proxy sends this app until it is quiet for `quiet` seconds or closes."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), quiet)
        except (TimeoutError, ConnectionError):
            return
        if not data:
            return
        into += data


async def relay_once(name: str, client_chunks: list[bytes], upstream_chunks: list[bytes], *,
                     max_message_size: int = 0, strict: bool = True, client_eof: bool = False) -> dict:
    """One session through one engine; returns everything observable."""
    accel, websocket = implementation(name)
    loop = asyncio.get_running_loop()
    engine = accel.RelayEngine(loop.call_soon)
    fd = engine.fileno()
    if fd is not None:
        loop.add_reader(fd, engine.run)
    client_app, client_proxy = socket.socketpair()
    upstream_proxy, upstream_app = socket.socketpair()
    for s in (client_app, upstream_app):
        s.setblocking(False)
    events: list = []
    client_owner = Owner("client", events)
    upstream_owner = Owner("upstream", events)
    try:
        ct, _ = await loop.connect_accepted_socket(lambda: client_owner, client_proxy)
        ut, _ = await loop.connect_accepted_socket(lambda: upstream_owner, upstream_proxy)
        keys = iter(bytes([i, i + 1, i + 2, i + 3]) for i in range(0, 250, 4))
        relay = websocket.WebSocketRelay(
            max_message_size=max_message_size, idle_timeout=0.0, close_timeout=5.0,
            mask_key_source=lambda: next(keys), now=0.0,
            rules=websocket.frame_rules(strict, None),
        )
        sides = {}

        def run_actions():
            actions = relay.actions[:]
            relay.actions.clear()
            for kind, data in actions:
                events.append(("action", kind, bytes(data) if isinstance(data, (bytes, bytearray)) else data))
                if kind in CARRY_OUT:
                    side, method = CARRY_OUT[kind]
                    getattr(sides[side], method)(*([data] if method == "write" else []))

        sides["client"], sides["upstream"] = engine.relay_pair(
            relay, ct, ut, client_owner, upstream_owner, run_actions)
        to_client, to_upstream = bytearray(), bytearray()
        # One direction at a time, so the interleaving of the two cannot differ between runs.
        await send_all(client_app, client_chunks)
        await drain_app(upstream_app, to_upstream, 0.03)
        await send_all(upstream_app, upstream_chunks)
        await drain_app(client_app, to_client, 0.03)
        if client_eof:
            with contextlib.suppress(OSError):
                client_app.shutdown(socket.SHUT_WR)
        await drain_app(upstream_app, to_upstream, 0.03)
        await drain_app(client_app, to_client, 0.03)
        return {
            "to_client": bytes(to_client),
            "to_upstream": bytes(to_upstream),
            "events": list(events),  # a copy: the teardown below adds its own
            "state": relay.state.name,
            "client_close": relay.client_close,
            "upstream_close": relay.upstream_close,
            "proxy_close": relay.proxy_close_code,
            "counts": (relay.bytes_from_client, relay.bytes_from_upstream,
                       relay.messages_from_client, relay.messages_from_upstream),
            "engine": engine.stats(),
        }
    finally:
        if fd is not None:
            loop.remove_reader(fd)
        engine.close()
        await asyncio.sleep(0)
        for s in (client_app, upstream_app):
            s.close()


async def send_all(sock: socket.socket, chunks: list[bytes]) -> None:
    """Send the chunks one by one, each given time to be read alone; stop once the proxy closed."""
    loop = asyncio.get_running_loop()
    for chunk in chunks:
        try:
            await loop.sock_sendall(sock, chunk)
        except ConnectionError:
            return
        await asyncio.sleep(0.002)


def cut(data: bytes, offsets: list[int]) -> list[bytes]:
    points = sorted({o % (len(data) + 1) for o in offsets} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


MASK = b"\x11\x22\x33\x44"

client_frames = st.lists(st.one_of(
    st.binary(max_size=300).map(lambda p: frame(OP_BINARY, p, mask=MASK)),
    st.text(max_size=40).map(lambda t: frame(OP_TEXT, t.encode(), mask=MASK)),
    st.binary(max_size=20).map(lambda p: frame(OP_PING, p, mask=MASK)),
    st.binary(max_size=20).map(lambda p: frame(OP_PONG, p, mask=MASK)),
    st.binary(max_size=30).map(lambda p: frame(OP_TEXT, p, fin=False, mask=MASK) + frame(OP_CONT, p, mask=MASK)),
    # rule breakers: unmasked, reserved opcode, RSV bit, stray continuation
    st.just(frame(OP_BINARY, b"unmasked")),
    st.just(frame(0x3, b"reserved", mask=MASK)),
    st.just(frame(OP_BINARY, b"rsv", mask=MASK, rsv=4)),
    st.just(frame(OP_CONT, b"stray", mask=MASK)),
    st.just(frame(OP_CLOSE, encode_close_payload(1000, "bye"), mask=MASK)),
), max_size=8).map(b"".join)

upstream_frames = st.lists(st.one_of(
    st.binary(max_size=300).map(lambda p: frame(OP_BINARY, p)),
    st.binary(max_size=20).map(lambda p: frame(OP_PING, p)),
    st.just(frame(OP_BINARY, b"masked", mask=MASK)),
    st.just(frame(OP_CLOSE, encode_close_payload(1000, "ok"))),
), max_size=6).map(b"".join)


def compare(pure: dict, compiled: dict) -> None:
    for key in ("to_client", "to_upstream", "events", "state", "client_close", "upstream_close",
                "proxy_close", "counts"):
        assert pure[key] == compiled[key], key


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(client=client_frames, upstream=upstream_frames,
       client_cuts=st.lists(st.integers(0, 10_000), max_size=6),
       upstream_cuts=st.lists(st.integers(0, 10_000), max_size=6),
       limit=st.sampled_from([0, 200]), client_eof=st.booleans())
def test_engine_twins_agree_on_random_streams(client, upstream, client_cuts, upstream_cuts, limit, client_eof):
    async def both():
        results = []
        for name in ("pure", "compiled"):
            results.append(await relay_once(name, cut(client, client_cuts), cut(upstream, upstream_cuts),
                                            max_message_size=limit, client_eof=client_eof))
        return results

    pure, compiled = asyncio.run(both())
    compare(pure, compiled)


async def test_engine_takes_the_sockets_off_the_loop():
    """The compiled engine really holds the pair: reads and writes are its own, none fell back."""
    payloads = [frame(OP_BINARY, bytes([i]) * 100, mask=MASK) for i in range(20)]
    result = await relay_once("compiled", payloads, [frame(OP_TEXT, b"hello")])
    stats = result["engine"]
    assert stats["pairs"] == 1 and stats["fallbacks"] == 0
    assert stats["reads"] >= 2 and stats["bytes_written"] == stats["bytes_read"]
    assert result["to_upstream"] == b"".join(payloads)
    assert result["to_client"] == frame(OP_TEXT, b"hello")
    pure = await relay_once("pure", payloads, [frame(OP_TEXT, b"hello")])
    compare(pure, result)


async def test_close_handshake_and_limit_breach_match():
    """A message over the limit: 1009 to the sender and 1001 to the other side, in both twins alike."""
    big = frame(OP_BINARY, b"x" * 500, mask=MASK)
    results = [await relay_once(name, [frame(OP_TEXT, b"fine", mask=MASK), big],
                                [frame(OP_CLOSE, encode_close_payload(1001, ""))], max_message_size=100)
               for name in ("pure", "compiled")]
    compare(*results)
    pure = results[0]
    assert pure["to_upstream"].startswith(frame(OP_TEXT, b"fine", mask=MASK))
    assert pure["proxy_close"] == 1009
    assert pure["to_client"][2:4] == (1009).to_bytes(2, "big")  # the close frame, unmasked
    kinds = [event[1] for event in pure["events"] if event[0] == "action"]
    # the upstream gets its close at once; the client its own once the upstream's answer came (DRAINING)
    assert kinds == ["send_upstream", "wake_timers", "send_client", "shutdown_client"]


@pytest.mark.parametrize("together", [False, True])
async def test_the_echo_of_a_good_message_reaches_a_client_that_then_broke_a_rule(together):
    """Autobahn 3.4: text, then a frame with RSV bits; the echo comes through before the proxy's 1002."""
    echo = frame(OP_TEXT, b"Hello, world!")
    answer = frame(OP_CLOSE, encode_close_payload(1001, "client broke the protocol"))
    upstream = [echo + answer] if together else [echo, answer]
    results = [await relay_once(name, [frame(OP_TEXT, b"Hello, world!", mask=MASK)
                                       + frame(OP_TEXT, b"Hello, world!", mask=MASK, rsv=3)
                                       + frame(OP_PING, b"", mask=MASK)], upstream)
               for name in ("pure", "compiled")]
    compare(*results)
    pure = results[0]
    assert pure["to_upstream"].startswith(frame(OP_TEXT, b"Hello, world!", mask=MASK))
    assert pure["to_client"].startswith(echo)
    assert pure["to_client"][len(echo):][:4] == b"\x88" + bytes([2 + len("RSV bits 0x3 set without an extension that defines them")]) + (1002).to_bytes(2, "big")
    assert pure["proxy_close"] == 1002 and pure["upstream_close"] == (1001, "client broke the protocol")
    kinds = [event[1] for event in pure["events"] if event[0] == "action"]
    assert kinds == ["send_upstream", "wake_timers", "send_client", "shutdown_client"]


async def test_backpressure_pauses_the_feeder_until_the_peer_drains():
    """An upstream that does not read: the client's socket stops being read, nothing is lost."""
    accel, websocket = implementation("compiled")
    loop = asyncio.get_running_loop()
    engine = accel.RelayEngine(loop.call_soon)
    loop.add_reader(engine.fileno(), engine.run)
    client_app, client_proxy = socket.socketpair()
    upstream_proxy, upstream_app = socket.socketpair()
    for s in (client_app, upstream_app):
        s.setblocking(False)
    events: list = []
    try:
        co, uo = Owner("client", events), Owner("upstream", events)
        ct, _ = await loop.connect_accepted_socket(lambda: co, client_proxy)
        ut, _ = await loop.connect_accepted_socket(lambda: uo, upstream_proxy)
        ut.set_write_buffer_limits(high=64 * 1024)
        relay = websocket.WebSocketRelay(mask_key_source=lambda: MASK, rules=websocket.frame_rules(True, None))
        client, upstream = engine.relay_pair(relay, ct, ut, co, uo, lambda: relay.actions.clear())
        message = frame(OP_BINARY, b"z" * 60_000, mask=MASK)
        stream = message * 200  # 12 MB offered; the kernel buffers take a few MB at most
        sent = 0
        while sent < len(stream):
            try:
                sent += client_app.send(stream[sent:sent + 65536])
            except BlockingIOError:
                await asyncio.sleep(0.01)
                if not client.is_reading():
                    break
                continue
            await asyncio.sleep(0)
        assert not client.is_reading(), "the client's socket kept being read past the upstream's high water"
        assert upstream.get_write_buffer_size() > 64 * 1024
        # The upstream reads everything: reading resumes, every byte arrives in order.
        received = bytearray()
        deadline = loop.time() + 20
        while len(received) < sent and loop.time() < deadline:
            try:
                received += await asyncio.wait_for(loop.sock_recv(upstream_app, 1 << 20), 1.0)
            except TimeoutError:
                pass
        assert bytes(received) == stream[:sent]
        assert client.is_reading()
    finally:
        loop.remove_reader(engine.fileno())
        engine.close()
        await asyncio.sleep(0)
        client_app.close()
        upstream_app.close()


async def test_a_proxied_session_runs_in_the_engine_and_shows_in_the_metrics(proxy, ws_backend, ws_connect):
    """Through the real proxy: the session is the engine's (compiled) or the loop's (pure), and /metrics says so."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    from edgeproxy.core import _accel

    p = await proxy(ws_backend)
    ws = await ws_connect(p.ws_url("/echo"))
    for i in range(50):
        await ws.send(f"message {i}")
        assert await ws.recv() == f"message {i}"
    host, port = p.server.admin.address
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{host}:{port}/metrics") as resp:
            text = await resp.text()
    got = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    assert got["edgeproxy_relay_engine_sessions_total"] == 1
    if _accel.SPEEDUPS:
        assert got["edgeproxy_relay_engine_sockets"] == 2
        assert got["edgeproxy_relay_engine_fallbacks_total"] == 0
        # 50 echoes: at least one read each way per message, all of them below the loop
        assert got["edgeproxy_relay_engine_reads_total"] >= 100
        assert got["edgeproxy_relay_engine_writes_total"] >= 100
    else:
        assert got["edgeproxy_relay_engine_sockets"] == 0  # the loop's transports hold them
    await ws.close()
    assert await wait_until(lambda: p.server.relay_engine.stats()["sockets"] == 0)
    assert await wait_until(lambda: not p.server.connections)

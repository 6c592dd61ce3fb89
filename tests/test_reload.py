"""Hot reload of a running proxy process: real sockets, real SIGHUP, real config files."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request

import pytest
from processes import (
    Backend, ProxyProcess, close_all, config_text, echo_once, free_port, http_get_async, open_many, raise_nofile,
    until_closed, wait_for_port,
)

raise_nofile()


@pytest.fixture
def backends():
    started: list[Backend] = []

    def start(tag: str) -> Backend:
        started.append(Backend(tag))
        return started[-1]

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture
def proxy_process(tmp_path):
    started: list[ProxyProcess] = []

    def start(text: str, **kw) -> ProxyProcess:
        started.append(ProxyProcess(tmp_path / f"proxy{len(started)}.toml", text, **kw))
        return started[-1]

    yield start
    for proc in started:
        proc.close()


def two_server_proxy(backends, proxy_process):
    """A proxy process in front of backends a and b (one upstream, round robin); waits until it listens."""
    a, b = backends("a"), backends("b")
    port, admin = free_port(), free_port()
    text = config_text({"app": [a, b]}, {"/": "app"}, port=port, admin_port=admin)
    proxy = proxy_process(text)
    wait_for_port(port)
    return a, b, port, admin, text, proxy


def admin_reload(admin_port: int) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{admin_port}/admin/reload", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


async def keep_echoing(conns, stop: asyncio.Event, counts: list[int]) -> None:
    """Every connection echoes in turn until `stop`; counts[i] = echoes of conns[i]."""

    async def loop(i, ws):
        while not stop.is_set():
            assert await echo_once(ws, f"m{i}-{counts[i]}") == f"m{i}-{counts[i]}"
            counts[i] += 1
            await asyncio.sleep(0.05)

    await asyncio.gather(*(loop(i, ws) for i, ws in enumerate(conns)))


@pytest.mark.timeout(120)
async def test_sighup_adds_a_route_while_1000_websockets_keep_echoing(backends, proxy_process):
    app, other = backends("app"), backends("other")
    port = free_port()
    proxy = proxy_process(config_text({"app": [app]}, {"/": "app"}, port=port))
    wait_for_port(port)
    assert await http_get_async(port, "/other/x") == (200, "backend app\n")  # "/" catches it for now
    conns = await open_many(port, 1000)
    try:
        stop = asyncio.Event()
        counts = [0] * len(conns)
        echoing = asyncio.create_task(keep_echoing(conns, stop, counts))
        while min(counts) == 0:  # every connection is echoing
            await asyncio.sleep(0.05)
        proxy.rewrite(config_text({"app": [app], "other": [other]}, {"/": "app", "/other/": "other"}, port=port))
        proxy.signal(signal.SIGHUP)
        await proxy.wait_log("reload: applied")
        assert await http_get_async(port, "/other/x") == (200, "backend other\n")
        assert await http_get_async(port, "/x") == (200, "backend app\n")
        at_reload = list(counts)
        for _ in range(300):  # until every connection has echoed again since the reload (or 15 s)
            if echoing.done() or all(c > a for c, a in zip(counts, at_reload)):
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(echoing, 30)  # raises if any connection failed or closed
        assert all(ws.close_code is None for ws in conns)
        assert all(c > a for c, a in zip(counts, at_reload)), "every connection echoed after the reload"
        assert "changed: listeners" not in proxy.log() and "routes" in proxy.log()
    finally:
        await close_all(conns)


@pytest.mark.timeout(60)
async def test_an_invalid_reload_changes_nothing(backends, proxy_process, tmp_path):
    app = backends("app")
    port, admin = free_port(), free_port()
    good = config_text({"app": [app]}, {"/": "app"}, port=port, admin_port=admin)
    proxy = proxy_process(good)
    wait_for_port(port)
    conns = await open_many(port, 20)
    try:
        # a route to an undefined upstream, and a listener that is not an address
        proxy.rewrite(good.replace('upstream = "app"\n[admin]', 'upstream = "nope"\n[admin]')
                      .replace(f'bind = "127.0.0.1:{port}"', 'bind = "127.0.0.1:99999"'))
        proxy.signal(signal.SIGHUP)
        log = await proxy.wait_log("the running one is kept")
        assert f"reload: {proxy.path}: routes[0].upstream: route refers to upstream 'nope'" in log
        assert f"reload: {proxy.path}: listeners[0].bind: invalid address" in log
        assert "reload: applied" not in log
        # the old config runs on: old connections, new connections, the route
        for i, ws in enumerate(conns):
            assert await echo_once(ws, f"still {i}") == f"still {i}"
        assert await http_get_async(port, "/x") == (200, "backend app\n")
        late = await open_many(port, 5)
        assert [await echo_once(ws, "late") for ws in late] == ["late"] * 5
        await close_all(late)
        # POST /admin/reload takes the same path and answers 400 with the problems
        request = urllib.request.Request(f"http://127.0.0.1:{admin}/admin/reload", method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 400
        assert any("routes[0].upstream" in p for p in json.loads(info.value.read())["problems"])
    finally:
        await close_all(conns)


@pytest.mark.timeout(60)
async def test_a_removed_upstream_servers_sessions_get_close_frames(backends, proxy_process):
    a, b, port, admin, _, proxy = two_server_proxy(backends, proxy_process)
    conns = await open_many(port, 40)
    try:
        where = [int(await echo_once(ws, "whoami")) for ws in conns]
        on_b = [ws for ws, p in zip(conns, where) if p == b.port]
        on_a = [ws for ws, p in zip(conns, where) if p == a.port]
        assert len(on_b) == len(on_a) == 20  # round robin
        proxy.rewrite(config_text({"app": [a]}, {"/": "app"}, port=port, admin_port=admin))
        result = await asyncio.to_thread(admin_reload, admin)
        assert result["changed"] == ["upstream app changed (1 server(s) removed)"]
        # paced out: every session on b gets a close frame with 1012 and a reconnect hint
        for ws in on_b:
            code, reason = await until_closed(ws)
            assert code == 1012 and reason.startswith("server removed; reconnect in ")
        for i, ws in enumerate(on_a):
            assert await echo_once(ws, f"a{i}") == f"a{i}"
        assert [int(await echo_once(ws, "whoami")) for ws in await open_many(port, 4)] == [a.port] * 4
    finally:
        await close_all(conns)


@pytest.mark.timeout(60)
async def test_a_reload_without_effective_change_is_a_noop(backends, proxy_process):
    _, _, port, admin, text, proxy = two_server_proxy(backends, proxy_process)
    conns = await open_many(port, 10)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/admin/config", timeout=5) as response:
            before = json.loads(response.read())
        # the same settings, written differently: comments, order of equal tables, spacing
        proxy.rewrite("# reformatted\n" + text.replace(" = ", "   =   "))
        proxy.signal(signal.SIGHUP)
        log = await proxy.wait_log("reload: no effective change")
        assert "reload: applied" not in log and "removed" not in log
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/admin/config", timeout=5) as response:
            after = json.loads(response.read())
        assert after["version"] != before["version"] and after["loaded_at_unix"] > before["loaded_at_unix"]
        assert await asyncio.to_thread(admin_reload, admin) == {"reloaded": True, "changed": [], "version": after["version"]}
        for i, ws in enumerate(conns):
            assert await echo_once(ws, f"n{i}") == f"n{i}"
            assert ws.close_code is None
    finally:
        await close_all(conns)


@pytest.mark.timeout(60)
async def test_reload_adds_and_removes_listeners_without_touching_their_connections(backends, proxy_process):
    app = backends("app")
    first, second = free_port(), free_port()
    proxy = proxy_process(config_text({"app": [app]}, {"/": "app"}, port=first))
    wait_for_port(first)
    conns = await open_many(first, 10)
    try:
        text = config_text({"app": [app]}, {"/": "app"}, port=second)
        proxy.rewrite(text)
        proxy.signal(signal.SIGHUP)
        await proxy.wait_log("reload: applied")
        wait_for_port(second)
        assert await http_get_async(second, "/") == (200, "backend app\n")
        with pytest.raises(OSError):
            await http_get_async(first, "/")  # removed: refused
        for i, ws in enumerate(conns):  # established on the removed listener: untouched
            assert await echo_once(ws, f"l{i}") == f"l{i}"
    finally:
        await close_all(conns)

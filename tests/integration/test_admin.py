"""The admin listener over real sockets: status codes, JSON bodies, the SSE stream.

Metrics are driven through the server's own `Metrics` object (the transport's
counter calls are wired separately) and, for the message counters, by real
WebSocket traffic through the proxy.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeproxy.core import _accel
from edgeproxy.errors import ConfigError

HOST = "127.0.0.1"


def admin_url(p, path: str) -> str:
    host, port = p.server.admin.address
    return f"http://{host}:{port}{path}"


async def fetch(p, path: str, method: str = "GET") -> tuple[int, dict, str]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, admin_url(p, path)) as resp:
            return resp.status, dict(resp.headers), await resp.text()


def exposition(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_endpoint_serves_a_parsable_exposition(proxy, ws_backend) -> None:
    p = await proxy(ws_backend)
    status, headers, body = await fetch(p, "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    got = exposition(body)
    build = [labels for (name, labels) in got if name == "edgeproxy_build_info"]
    assert len(build) == 1
    assert dict(build[0])["implementation"] == _accel.IMPLEMENTATION
    assert dict(build[0])["event_loop"] == "uvloop"
    assert got[("edgeproxy_compiled_extension_active", frozenset())] == (1 if _accel.SPEEDUPS else 0)


async def test_metrics_follow_the_api_exactly(proxy, ws_backend) -> None:
    p = await proxy(ws_backend)
    metrics = p.server.metrics
    key = metrics.connection_opened("websocket", "*/", "app", f"{HOST}:{ws_backend.port}")
    metrics.heartbeat_failed()
    metrics.request_done(404, 0.001)
    got = exposition((await fetch(p, "/metrics"))[2])
    labels = frozenset({"protocol": "websocket", "route": "*/", "upstream": "app", "server": f"{HOST}:{ws_backend.port}"}.items())
    assert got[("edgeproxy_connections_active", labels)] == 1
    assert got[("edgeproxy_heartbeat_failures_total", frozenset())] == 1
    assert got[("edgeproxy_http_requests_total", frozenset({("status_class", "4xx")}))] == 1
    metrics.connection_closed(key, 12.0, 1000)
    got = exposition((await fetch(p, "/metrics"))[2])
    assert got[("edgeproxy_connections_active", labels)] == 0
    assert got[("edgeproxy_connection_duration_seconds_count", frozenset({("protocol", "websocket"), ("close_code", "1000")}))] == 1


async def test_real_websocket_traffic_shows_in_the_message_counters(proxy, ws_backend, ws_connect) -> None:
    """Open sessions are counted at scrape time from the relay's own counters."""
    p = await proxy(ws_backend)
    ws = await ws_connect(p.ws_url("/echo"))
    for i in range(5):
        await ws.send(f"message {i}")  # 9 bytes each
        assert await ws.recv() == f"message {i}"
    got = exposition((await fetch(p, "/metrics"))[2])
    assert got[("edgeproxy_messages_total", frozenset({("direction", "client_to_upstream")}))] == 5
    assert got[("edgeproxy_messages_total", frozenset({("direction", "upstream_to_client")}))] == 5
    # a masked client frame of 9 bytes has a 6-byte header; the server's unmasked one 2 bytes
    assert got[("edgeproxy_message_bytes_total", frozenset({("direction", "client_to_upstream")}))] == 5 * (9 + 6)
    assert got[("edgeproxy_message_bytes_total", frozenset({("direction", "upstream_to_client")}))] == 5 * (9 + 2)


async def test_healthz_and_readyz_flip_when_draining(proxy, ws_backend) -> None:
    p = await proxy(ws_backend)
    assert (await fetch(p, "/healthz"))[::2] == (200, "ok\n")
    assert (await fetch(p, "/readyz"))[::2] == (200, "ready\n")
    p.server.ready = False
    assert (await fetch(p, "/readyz"))[::2] == (503, "draining\n")
    assert (await fetch(p, "/healthz"))[0] == 200  # alive while draining
    p.server.ready = True
    assert (await fetch(p, "/readyz"))[0] == 200


async def test_connections_by_route_upstream_and_server(proxy, ws_backend) -> None:
    p = await proxy(ws_backend)
    metrics = p.server.metrics
    metrics.connection_opened("websocket", "*/", "app", "10.0.0.1:80")
    metrics.connection_opened("websocket", "*/", "app", "10.0.0.1:80")
    metrics.connection_opened("websocket", "*/chat", "chat", "10.0.0.2:80")
    metrics.connection_opened("http", "", "", "")
    status, headers, body = await fetch(p, "/admin/connections")
    assert status == 200 and headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert doc["total"] == 4
    assert doc["by_protocol"] == {"websocket": 3, "http": 1}
    assert doc["by_route"] == {"*/": 2, "*/chat": 1, "": 1}
    assert doc["by_upstream"] == {"app": 2, "chat": 1, "": 1}
    assert doc["by_server"] == {"10.0.0.1:80": 2, "10.0.0.2:80": 1, "": 1}
    assert {"protocol": "websocket", "route": "*/", "upstream": "app", "server": "10.0.0.1:80", "active": 2} in doc["connections"]


async def test_upstreams_lists_every_configured_server(proxy, ws_backend, refused_port) -> None:
    p = await proxy(ws_backend, refused_port)
    p.server.metrics.connection_opened("websocket", "*/", "app", f"{HOST}:{ws_backend.port}")
    status, _, body = await fetch(p, "/admin/upstreams")
    assert status == 200
    servers = json.loads(body)["upstreams"]
    assert [(s["upstream"], s["server"], s["state"], s["up"], s["active_connections"]) for s in servers] == [
        ("app", f"{HOST}:{ws_backend.port}", "up", True, 1),
        ("app", f"{HOST}:{refused_port}", "up", True, 0),  # no check configured: assumed up
    ]
    _, _, text = await fetch(p, "/metrics")
    got = exposition(text)
    labels = {"upstream": "app", "server": f"{HOST}:{refused_port}"}
    assert got[("edgeproxy_upstream_server_up", frozenset(labels.items()))] == 1
    assert got[("edgeproxy_upstream_server_state", frozenset({**labels, "state": "up"}.items()))] == 1
    assert got[("edgeproxy_upstream_server_state", frozenset({**labels, "state": "down"}.items()))] == 0


async def test_config_reports_version_and_load_time(proxy, ws_backend) -> None:
    before = time.time()
    p = await proxy(ws_backend)
    status, _, body = await fetch(p, "/admin/config")
    doc = json.loads(body)
    assert status == 200
    assert doc["version"] == hashlib.sha256(p.config_text.encode()).hexdigest()
    assert before - 1 <= doc["loaded_at_unix"] <= time.time()
    assert doc["loaded_at"].endswith("+00:00")
    assert doc["compiled_extension_active"] is _accel.SPEEDUPS
    assert doc["upstreams"] == ["app"] and doc["routes"] == 1


async def test_reload_without_a_handler_is_501(proxy, ws_backend) -> None:
    p = await proxy(ws_backend)
    status, headers, body = await fetch(p, "/admin/reload", "POST")
    assert status == 501 and headers["Content-Type"] == "application/json"
    assert "no reload handler" in json.loads(body)["error"]


async def test_reload_calls_the_handler(proxy, ws_backend) -> None:
    p = await proxy(ws_backend)
    calls = []

    async def reload():
        calls.append(1)
        return {"reloaded": True, "version": "abc"}

    p.server.on_reload = reload
    status, _, body = await fetch(p, "/admin/reload", "POST")
    assert (status, json.loads(body)) == (200, {"reloaded": True, "version": "abc"})
    assert calls == [1]


async def test_reload_with_an_invalid_config_is_400_with_the_problems(proxy, ws_backend) -> None:
    p = await proxy(ws_backend)

    def reload():
        raise ConfigError([("proxy.toml", "routes[0].upstream", "route refers to upstream 'ap'")])

    p.server.on_reload = reload
    status, _, body = await fetch(p, "/admin/reload", "POST")
    doc = json.loads(body)
    assert status == 400
    assert doc["problems"] == ["proxy.toml: routes[0].upstream: route refers to upstream 'ap'"]


async def test_reload_handler_crash_is_500(proxy, ws_backend) -> None:
    p = await proxy(ws_backend)
    p.server.on_reload = lambda: 1 / 0
    status, _, body = await fetch(p, "/admin/reload", "POST")
    assert status == 500 and "division by zero" in json.loads(body)["error"]


async def test_wrong_method_and_unknown_path(proxy, ws_backend) -> None:
    p = await proxy(ws_backend)
    status, headers, _ = await fetch(p, "/admin/reload")
    assert status == 405 and headers["Allow"] == "POST"
    status, headers, _ = await fetch(p, "/metrics", "POST")
    assert status == 405 and headers["Allow"] == "GET"
    status, _, body = await fetch(p, "/nope")
    assert status == 404 and "/metrics" in json.loads(body)["endpoints"]


async def test_keep_alive_serves_several_requests_on_one_connection(proxy, ws_backend, raw_conn) -> None:
    p = await proxy(ws_backend)
    conn = await raw_conn(p.server.admin.address[1])
    for path, status in (("/healthz", 200), ("/readyz", 200), ("/nope", 404)):
        conn.writer.write(f"GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode())
        assert (await conn.read_response()).status == status


async def test_malformed_and_oversized_requests_get_4xx(proxy, ws_backend, raw_conn) -> None:
    p = await proxy(ws_backend)
    conn = await raw_conn(p.server.admin.address[1])
    conn.writer.write(b"NOT HTTP\r\n\r\n")
    assert (await conn.read_response()).status == 400
    conn = await raw_conn(p.server.admin.address[1])
    conn.writer.write(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert (await conn.read_response()).status == 431


async def test_dashboard_page_is_self_contained(proxy, ws_backend) -> None:
    p = await proxy(ws_backend)
    status, headers, body = await fetch(p, "/dashboard")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert 'new EventSource("/admin/stream")' in body
    assert "http://" not in body and "https://" not in body  # nothing fetched from elsewhere


async def test_stream_sends_a_snapshot_per_interval(proxy, ws_backend) -> None:
    p = await proxy(ws_backend)
    p.server.admin.stream_interval = 0.05
    async with aiohttp.ClientSession() as session:
        async with session.get(admin_url(p, "/admin/stream")) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
            first = await _next_event(resp)
            p.server.metrics.connection_opened("websocket", "*/", "app", "x:1")
            p.server.metrics.heartbeat_failed()
            second = await _next_event(resp)
    assert first["connections_active"]["websocket"] == 0 and first["heartbeat_failures"] == 0
    assert second["connections_active"]["websocket"] == 1 and second["heartbeat_failures"] == 1
    assert second["connections_opened"]["websocket"] == 1
    assert second["time"] > first["time"] and second["ready"] is True


async def _next_event(resp: aiohttp.ClientResponse) -> dict:
    async with asyncio.timeout(5):
        while True:
            line = (await resp.content.readline()).decode()
            if line.startswith("data: "):
                return json.loads(line[len("data: "):])


async def test_stop_ends_open_streams_cleanly(proxy, ws_backend) -> None:
    p = await proxy(ws_backend)
    async with aiohttp.ClientSession() as session:
        async with session.get(admin_url(p, "/admin/stream")) as resp:
            await _next_event(resp)
            await asyncio.wait_for(p.server.stop(), 5)
            async with asyncio.timeout(5):
                await resp.content.read()  # raises ClientPayloadError on a cut-off chunked body
            assert resp.content.at_eof()


async def test_event_loop_lag_is_measured_by_the_tick(proxy, ws_backend) -> None:
    # header_timeout 0.2 s makes the shared tick run every 50 ms
    p = await proxy(ws_backend, http={"header_timeout": 0.2})
    await asyncio.sleep(0.1)
    time.sleep(0.3)  # block the loop: the next tick runs late by about this much
    await asyncio.sleep(0.1)
    assert p.server.metrics.event_loop_lag >= 0.2


async def test_disabled_admin_binds_nothing(proxy, ws_backend) -> None:
    p = await proxy(ws_backend, admin={"enabled": False})
    assert p.server.admin is None


async def test_admin_port_in_use_fails_start_and_closes_the_listeners(proxy, ws_backend) -> None:
    p = await proxy(ws_backend)
    taken = p.server.admin.address[1]
    with pytest.raises(OSError):
        await proxy(ws_backend, admin={"bind": f"{HOST}:{taken}"})


async def post_json(p, path: str, doc) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(admin_url(p, path), data=json.dumps(doc)) as resp:
            return resp.status, await resp.json()


async def test_drain_endpoint_sends_new_connections_elsewhere(proxy, ws_backend, http_backend) -> None:
    p = await proxy(ws_backend, http_backend)  # two servers, round robin
    ws_server, http_server = f"{HOST}:{ws_backend.port}", f"{HOST}:{http_backend.port}"
    status, state = await post_json(p, "/admin/drain", {"upstream": "app", "server": http_server, "drain": True})
    assert status == 200 and state["state"] == "draining" and state["drain"] is True
    # Every new request now goes to the other server.
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            async with session.get(p.url("/"), headers={"Connection": "close"}) as resp:
                await resp.read()
    assert http_backend.requests == []
    _, _, body = await fetch(p, "/metrics")
    labels = frozenset({"upstream": "app", "server": http_server, "state": "draining"}.items())
    assert exposition(body)[("edgeproxy_upstream_server_state", labels)] == 1
    status, state = await post_json(p, "/admin/drain", {"upstream": "app", "server": http_server, "drain": False})
    assert status == 200 and state["state"] == "up"
    # Mistakes get clear answers, and change nothing.
    assert (await post_json(p, "/admin/drain", {"upstream": "nope", "server": ws_server, "drain": True}))[0] == 404
    assert (await post_json(p, "/admin/drain", {"upstream": "app", "server": "10.9.9.9:1", "drain": True}))[0] == 404
    assert (await post_json(p, "/admin/drain", {"upstream": "app", "server": ws_server}))[0] == 400
    assert all(s["state"] == "up" for s in (await fetch_json(p, "/admin/upstreams"))["upstreams"])


async def fetch_json(p, path: str) -> dict:
    _, _, body = await fetch(p, path)
    return json.loads(body)


# -- [admin] control_key --------------------------------------------------------------

CONTROL_KEY = "control-key-0123456789"


async def control(p, method: str, path: str, key: str | None, body: bytes | None = None) -> tuple[int, dict, str]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, admin_url(p, path), headers=headers, data=body) as resp:
            return resp.status, dict(resp.headers), await resp.text()


async def test_control_endpoints_need_the_control_key_and_do_nothing_without_it(proxy, ws_backend) -> None:
    p = await proxy(ws_backend, admin={"bind": f"{HOST}:0", "control_key": CONTROL_KEY})
    reloads = []
    p.server.on_reload = lambda: reloads.append(1) or {"reloaded": True}
    server = f"{HOST}:{ws_backend.port}"
    drain = json.dumps({"upstream": "app", "server": server, "drain": True}).encode()

    def draining() -> bool:
        return next(s for s in p.server.upstream_states() if s["server"] == server)["state"] == "draining"

    for key in (None, "wrong-key-0123456789ab", CONTROL_KEY[:-1], "Basic " + CONTROL_KEY):
        for method, path, body in (("POST", "/admin/reload", None), ("POST", "/admin/drain", drain),
                                   ("GET", "/admin/upstreams", None), ("GET", "/admin/connections", None),
                                   ("GET", "/admin/config", None)):
            status, headers, text = await control(p, method, path, key, body)
            assert status == 401, (key, path, status, text)
            assert headers["WWW-Authenticate"].startswith("Bearer"), headers
            assert "control_key" in json.loads(text)["error"]
    assert reloads == [] and not draining(), "a refused control request did something"

    status, _, text = await control(p, "POST", "/admin/reload", CONTROL_KEY)
    assert (status, json.loads(text)) == (200, {"reloaded": True}) and reloads == [1]
    status, _, text = await control(p, "POST", "/admin/drain", CONTROL_KEY, drain)
    assert status == 200 and json.loads(text)["state"] == "draining" and draining()
    status, _, text = await control(p, "GET", "/admin/upstreams", CONTROL_KEY)
    assert status == 200 and json.loads(text)["upstreams"]


async def test_metrics_and_probes_stay_open_with_a_control_key(proxy, ws_backend) -> None:
    p = await proxy(ws_backend, admin={"bind": f"{HOST}:0", "control_key": CONTROL_KEY})
    for path in ("/metrics", "/healthz", "/readyz", "/dashboard"):
        status, _, _ = await fetch(p, path)
        assert status == 200, path


async def test_the_publish_key_is_not_a_control_key(proxy, refused_port) -> None:
    api_key = "publish-key-0123456789"
    p = await proxy(refused_port, hubs=[{"path": "/hub", "ping_interval": 0}],
                    admin={"bind": f"{HOST}:0", "api_key": api_key, "control_key": CONTROL_KEY})
    status, _, _ = await control(p, "POST", "/admin/reload", api_key)
    assert status == 401
    status, _, text = await control(p, "POST", "/v1/publish", api_key,
                                    json.dumps({"channel": "news", "data": 1}).encode())
    assert status == 200, text


async def test_closed_read_only_endpoints_need_the_key(proxy, ws_backend) -> None:
    p = await proxy(ws_backend, admin={"bind": f"{HOST}:0", "control_key": CONTROL_KEY,
                                       "open_endpoints": ["/healthz", "/readyz"]})
    for path in ("/healthz", "/readyz"):
        assert (await control(p, "GET", path, None))[0] == 200, path
    for path in ("/metrics", "/dashboard", "/admin/stream"):
        status, headers, _ = await control(p, "GET", path, None)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
    status, _, text = await control(p, "GET", "/metrics", CONTROL_KEY)
    assert status == 200 and "edgeproxy_connections" in text


# -- [admin] control_bind: the control endpoints on a listener of their own ------------


async def over_unix(path: str, method: str, target: str, key: str | None = None,
                    body: bytes | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as session:
        async with session.request(method, f"http://edgeproxy{target}", headers=headers, data=body) as resp:
            return resp.status, await resp.text()


async def test_unix_control_socket_serves_control_and_the_public_port_does_not(proxy, ws_backend, tmp_path) -> None:
    sock_path = str(tmp_path / "control.sock")
    api_key = "publish-key-0123456789"
    p = await proxy(ws_backend, hubs=[{"path": "/hub", "ping_interval": 0}],
                    admin={"bind": f"{HOST}:0", "control_bind": f"unix:{sock_path}", "api_key": api_key})
    reloads = []
    p.server.on_reload = lambda: reloads.append(1) or {"reloaded": True}
    mode = os.stat(sock_path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
    assert not [name for name in os.listdir(tmp_path) if name != "control.sock"], "the temporary name stayed"

    # The public port: no control endpoint, whatever the method; read-only and publish are there.
    for method, path in (("POST", "/admin/reload"), ("POST", "/admin/drain"), ("GET", "/admin/upstreams"),
                         ("GET", "/admin/connections"), ("GET", "/admin/config")):
        status, _, text = await control(p, method, path, None)
        assert status == 404 and "control_bind" in json.loads(text)["error"], (path, status, text)
    assert reloads == []
    for path in ("/metrics", "/healthz", "/readyz", "/dashboard"):
        assert (await fetch(p, path))[0] == 200, path
    status, _, text = await control(p, "POST", "/v1/publish", api_key, json.dumps({"channel": "c", "data": 1}).encode())
    assert status == 200, text

    # The control socket: control and read-only endpoints, not the publish API.
    status, text = await over_unix(sock_path, "POST", "/admin/reload")
    assert (status, json.loads(text)) == (200, {"reloaded": True}) and reloads == [1]
    status, text = await over_unix(sock_path, "GET", "/admin/upstreams")
    assert status == 200 and json.loads(text)["upstreams"]
    assert (await over_unix(sock_path, "GET", "/metrics"))[0] == 200
    status, text = await over_unix(sock_path, "POST", "/v1/publish", api_key, b'{"channel": "c", "data": 1}')
    assert status == 404 and "[admin] bind" in json.loads(text)["error"]

    await p.server.stop()
    assert not os.path.exists(sock_path), "stop left the control socket behind"


async def test_control_socket_with_a_key_and_a_mode(proxy, ws_backend, tmp_path) -> None:
    sock_path = str(tmp_path / "control.sock")
    p = await proxy(ws_backend, admin={"bind": f"{HOST}:0", "control_bind": f"unix:{sock_path}",
                                       "control_socket_mode": "0660", "control_key": CONTROL_KEY})
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660
    assert (await over_unix(sock_path, "GET", "/admin/config"))[0] == 401
    assert (await over_unix(sock_path, "GET", "/admin/config", CONTROL_KEY))[0] == 200
    await p.server.stop()


async def test_a_successor_takes_the_socket_over_and_the_predecessor_leaves_it(proxy, ws_backend, tmp_path) -> None:
    """A binary upgrade: the new process renames its socket over the path; the old one's stop keeps it."""
    sock_path = str(tmp_path / "control.sock")
    admin = {"bind": f"{HOST}:0", "control_bind": f"unix:{sock_path}"}
    old = await proxy(ws_backend, admin=admin)
    new = await proxy(ws_backend, admin=admin)
    old.server.on_reload = lambda: {"who": "old"}
    new.server.on_reload = lambda: {"who": "new"}
    assert json.loads((await over_unix(sock_path, "POST", "/admin/reload"))[1]) == {"who": "new"}
    await old.server.stop()
    assert json.loads((await over_unix(sock_path, "POST", "/admin/reload"))[1]) == {"who": "new"}
    await new.server.stop()
    assert not os.path.exists(sock_path)


async def test_control_bind_refuses_to_replace_a_file(proxy, ws_backend, tmp_path) -> None:
    victim = tmp_path / "not-a-socket"
    victim.write_text("keep me")
    with pytest.raises(OSError, match="not a socket"):
        await proxy(ws_backend, admin={"bind": f"{HOST}:0", "control_bind": f"unix:{victim}"})
    assert victim.read_text() == "keep me"


async def test_tcp_control_listener(proxy, ws_backend) -> None:
    p = await proxy(ws_backend, admin={"bind": f"{HOST}:0", "control_bind": f"{HOST}:0"})
    p.server.on_reload = lambda: {"reloaded": True}
    host, port = p.server.control.address
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://{host}:{port}/admin/reload") as resp:
            assert resp.status == 200
    assert (await control(p, "POST", "/admin/reload", None))[0] == 404

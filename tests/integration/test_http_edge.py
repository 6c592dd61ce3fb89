"""HTTP edge settings end to end: max_body_size, body_timeout, X-Request-Id, access-log fields, route rate_limit.

Each refusal is checked from three sides: what the client got, what the upstream
received (a recorder, or an aiohttp backend), and that a second client on its
own connection was served meanwhile.  Metric counts are exact.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest

HOST = "127.0.0.1"
HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def access_lines():
    """The access-log lines (their field dicts) written while the test runs."""
    lines: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fields = getattr(record, "fields", None)
            if fields is not None:
                lines.append(dict(fields))

    logger = logging.getLogger("edgeproxy.access")
    handler = Collect(level=logging.INFO)
    saved = (logger.level, logger.disabled)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.disabled = False
    yield lines
    logger.removeHandler(handler)
    logger.level, logger.disabled = saved


async def _get_ok(raw_conn, port: int, path: str = "/") -> None:
    """Another client, on a connection of its own, is served normally."""
    c = await raw_conn(port)
    await c.send(f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    r = await c.read_response()
    assert r.status == 200


async def _closed_short(c) -> bytes:
    """Everything until the proxy ends the connection (FIN or reset)."""
    return await c.read_all(timeout=5)


def _answers(raw_backend, response: bytes, *, then_close: bool):
    """A handler: read the request head, send ``response`` at once, then close or read on until the proxy leaves."""

    async def handler(conn, reader, writer):
        await raw_backend.read_head(conn, reader, bytearray())
        writer.write(response)
        await writer.drain()
        while not then_close and await reader.read(65536):
            pass

    return handler


# ------------------------------------------------------------------ max_body_size


async def test_content_length_over_the_limit_is_413_before_connecting(proxy, raw_backend, raw_conn):
    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(backend, http={"max_body_size": 100})
    c = await raw_conn(p.port)
    await c.send(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\nExpect: 100-continue\r\n\r\n")
    r = await c.read_response()
    assert r.status == 413 and r.header("Connection") == "close"
    assert b"101 bytes is over the limit of 100" in r.body
    await c.send(b"x" * 101)  # the body the client sends anyway is drained, never parsed as a request
    await c.expect_closed()
    assert backend.connections == []  # nothing was forwarded, not even a connect
    await _get_ok(raw_conn, p.port)
    # at the limit exactly: forwarded whole
    c = await raw_conn(p.port)
    await c.send(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n" + b"y" * 100)
    assert (await c.read_response()).status == 200
    assert backend.requests[-1][2] == b"y" * 100
    assert p.server.metrics.limits == {"max_body_size": 1}
    assert p.server.metrics.requests[4] == 1 and p.server.metrics.requests[2] == 2


async def test_chunked_body_past_the_limit_resets_the_upstream_request_and_answers_413(proxy, raw_backend, raw_conn, until):
    hole = await raw_backend(raw_backend.blackhole())
    p = await proxy(hole, http={"max_body_size": 1000})
    c = await raw_conn(p.port)
    await c.send(b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + b"258\r\n" + b"~" * 600 + b"\r\n")
    assert await until(lambda: hole.received.count(b"~") == 600)  # streamed on as it came
    await c.send(b"258\r\n" + b"^" * 600 + b"\r\n0\r\n\r\n")  # 1200 bytes in all
    r = await c.read_response()
    assert r.status == 413 and r.header("Connection") == "close"
    await c.expect_closed()
    assert await until(lambda: hole.connections[0].closed.is_set())
    received = hole.received
    assert b"^" not in received  # the chunk that crossed the limit never left the proxy
    assert not received.endswith(b"0\r\n\r\n")  # the upstream never saw the request end
    assert p.server.metrics.limits == {"max_body_size": 1}


async def test_a_route_overrides_the_http_limit(proxy, raw_backend, raw_conn):
    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(backend, http={"max_body_size": 10},
                    routes=[{"path_prefix": "/big/", "upstream": "app", "max_body_size": 0},
                            {"path_prefix": "/small/", "upstream": "app", "max_body_size": 4},
                            {"path_prefix": "/", "upstream": "app"}])
    c = await raw_conn(p.port)
    await c.send(b"POST /big/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n14\r\n" + b"z" * 20 + b"\r\n0\r\n\r\n")
    assert (await c.read_response()).status == 200  # 0 lifts the [http] limit on this route
    assert backend.requests[-1][2] == b"z" * 20
    for path, status in (("/small/x", 413), ("/x", 200)):
        c = await raw_conn(p.port)
        await c.send(f"POST {path} HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nfive!".encode())
        assert (await c.read_response()).status == status
    assert len(backend.requests) == 2


async def test_body_past_the_limit_after_the_response_began_cuts_it(proxy, raw_backend, raw_conn, access_lines):
    """The upstream answers before reading the body; the client keeps sending past the limit."""
    early = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nearly\r\n"
    backend = await raw_backend(_answers(raw_backend, early, then_close=False))
    p = await proxy(backend, http={"max_body_size": 100})
    c = await raw_conn(p.port)
    await c.send(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    head = await asyncio.wait_for(c.reader.readuntil(b"early\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    await c.send(b"c8\r\n" + b"q" * 200 + b"\r\n")
    rest = await _closed_short(c)
    assert b"0\r\n\r\n" not in rest  # no terminating chunk: the client knows the response is broken
    assert p.server.metrics.truncated == {"max_body_size": 1}
    assert p.server.metrics.limits == {"max_body_size": 1}
    line = [x for x in access_lines if x["event"] == "http"][-1]
    assert (line["status"], line["error"], line["bytes"]) == (200, "max_body_size", 5)


# ------------------------------------------------------------------ body_timeout


async def test_a_stalled_body_gets_408_and_the_upstream_never_sees_a_whole_request(proxy, raw_backend, raw_conn, until):
    hole = await raw_backend(raw_backend.blackhole())
    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(upstreams=[{"name": "hole", "servers": [f"{HOST}:{hole.port}"]},
                               {"name": "ok", "servers": [f"{HOST}:{backend.port}"]}],
                    routes=[{"path_prefix": "/up", "upstream": "hole"}, {"path_prefix": "/", "upstream": "ok"}],
                    http={"body_timeout": 0.3})
    c = await raw_conn(p.port)
    t0 = time.monotonic()
    await c.send(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n" + b"s" * 10)
    await asyncio.sleep(0.1)
    await _get_ok(raw_conn, p.port, "/other")  # served while the first client stalls
    r = await c.read_response()
    elapsed = time.monotonic() - t0
    assert r.status == 408 and r.header("Connection") == "close"
    assert 0.25 <= elapsed < 2.0, f"408 after {elapsed:.2f}s, body_timeout is 0.3s"
    await c.expect_closed()
    assert await until(lambda: hole.connections and hole.connections[0].closed.is_set())
    assert hole.received.endswith(b"\r\n\r\n" + b"s" * 10)  # head and 10 of the 100 bytes, then a reset
    assert p.server.metrics.limits == {"body_timeout": 1}


async def test_body_timeout_is_between_reads_not_for_the_whole_body(http_backend, proxy, raw_conn):
    p = await proxy(http_backend, http={"body_timeout": 0.3})
    c = await raw_conn(p.port)
    await c.send(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 8\r\n\r\n")
    for _ in range(8):  # 8 bytes over ~1.2 s, one every 0.15 s: slow, never quiet for 0.3 s
        await asyncio.sleep(0.15)
        await c.send(b"k")
    r = await c.read_response()
    assert r.status == 200 and r.json()["length"] == 8
    assert p.server.metrics.limits == {}


# ------------------------------------------------------------------ X-Request-Id


@pytest.mark.parametrize("sent, kept", [
    (None, False),
    ("f81d4fae-7dec-11d0-a765-00a0c91e6bf6", True),
    ("trace:AbC+/=_.-9", True),
    ("x" * 128, True),
    ("x" * 129, False),
    ("has space", False),
    ('quote"d', False),
    ("", False),
])
async def test_request_id_kept_when_valid_else_generated(sent, kept, http_backend, proxy, raw_conn, access_lines):
    p = await proxy(http_backend)
    c = await raw_conn(p.port)
    extra = f"X-Request-Id: {sent}\r\n" if sent is not None else ""
    await c.send(f"GET /headers HTTP/1.1\r\nHost: h\r\n{extra}\r\n".encode())
    r = await c.read_response()
    assert r.status == 200
    upstream_ids = [v for k, v in r.json()["headers"] if k.lower() == "x-request-id"]
    assert len(upstream_ids) == 1
    rid = upstream_ids[0]
    if kept:
        assert rid == sent
    else:
        assert HEX32.fullmatch(rid), rid
    line = [x for x in access_lines if x["event"] == "http"][-1]
    assert line["request_id"] == rid
    if sent and not kept:
        assert all(sent not in str(v) for v in line.values())  # the malformed value is logged nowhere
    outcome = "kept" if kept else ("generated" if sent is None else "replaced")
    assert p.server.metrics.request_ids == {"kept": 0, "generated": 0, "replaced": 0, outcome: 1}


async def test_two_request_id_headers_are_replaced_and_fresh_ids_differ(http_backend, proxy, raw_conn):
    p = await proxy(http_backend)
    c = await raw_conn(p.port)
    ids = []
    for _ in range(3):
        await c.send(b"GET /headers HTTP/1.1\r\nHost: h\r\nX-Request-Id: a\r\nX-Request-Id: b\r\n\r\n")
        r = await c.read_response()
        ids += [v for k, v in r.json()["headers"] if k.lower() == "x-request-id"]
    assert len(ids) == 3 and len(set(ids)) == 3 and all(HEX32.fullmatch(i) for i in ids)
    assert p.server.metrics.request_ids["replaced"] == 3


async def test_request_id_off_passes_the_header_through(http_backend, proxy, raw_conn):
    p = await proxy(http_backend, http={"request_id": False})
    c = await raw_conn(p.port)
    await c.send(b"GET /headers HTTP/1.1\r\nHost: h\r\nX-Request-Id: a b\r\n\r\n")
    r = await c.read_response()
    assert [v for k, v in r.json()["headers"] if k.lower() == "x-request-id"] == ["a b"]
    assert sum(p.server.metrics.request_ids.values()) == 0


async def test_request_id_reaches_a_websocket_upstream_and_both_log_lines(
    ws_backend, proxy, ws_connect, access_lines, until
):
    p = await proxy(ws_backend)
    ws = await ws_connect(p.ws_url("/echo"), additional_headers={"X-Request-Id": "ws-123"})
    await ws.send("hi")
    assert await ws.recv() == "hi"
    await ws.close()
    (rec,) = await ws_backend.wait_records(1)
    assert rec.header_all("X-Request-Id") == ["ws-123"]
    assert await until(lambda: any(x["event"] == "ws_close" for x in access_lines))
    by_event = {x["event"]: x for x in access_lines}
    assert by_event["ws_open"]["request_id"] == by_event["ws_close"]["request_id"] == "ws-123"


# ------------------------------------------------------------------ access-log fields


async def test_access_log_fields_are_the_ones_chosen_in_their_order(http_backend, proxy, raw_conn, access_lines):
    fields = ["request_id", "status", "method", "user_agent", "bytes_in", "referer"]
    p = await proxy(http_backend, logging={"access_log_fields": fields})
    c = await raw_conn(p.port)
    await c.send(b"POST /echo HTTP/1.1\r\nHost: h\r\nUser-Agent: probe/1.0\r\nX-Request-Id: r1\r\n"
                 b"Content-Length: 5\r\n\r\nhello")
    assert (await c.read_response()).body == b"hello"
    (line,) = access_lines
    assert list(line) == fields
    assert line == {"request_id": "r1", "status": 200, "method": "POST", "user_agent": "probe/1.0",
                    "bytes_in": 5, "referer": "-"}


# ------------------------------------------------------------------ rate_limit


async def _request(port: int, path: str, source: str = HOST) -> tuple[int, str | None]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port, local_addr=(source, 0)), 5)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    retry = next((line.split(":", 1)[1].strip() for line in head[1:] if line.lower().startswith("retry-after:")), None)
    return int(head[0].split()[1]), retry


async def test_route_rate_limit_is_per_client_address_with_429_and_retry_after(proxy, raw_backend):
    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(backend, routes=[
        {"path_prefix": "/api/", "upstream": "app", "rate_limit": {"rate": 0.5, "burst": 2}},
        {"path_prefix": "/", "upstream": "app"},
    ])
    assert [await _request(p.port, "/api/x") for _ in range(3)] == [(200, None), (200, None), (429, "2")]
    assert len(backend.requests) == 2  # the refused one never reached the upstream
    assert await _request(p.port, "/free") == (200, None)  # another route: no limit
    assert await _request(p.port, "/api/x", source="127.0.0.2") == (200, None)  # another client: its own bucket
    assert p.server.metrics.limits == {"route_rate": 1}
    assert len(p.server.route_limits[id(p.server.config.routes[0])]) == 2


async def test_a_reload_keeps_the_buckets_of_an_unchanged_limit_and_applies_a_new_one(proxy, raw_backend):
    from edgeproxy.config import parse_config

    backend = await raw_backend(raw_backend.mini_http())
    p = await proxy(backend, routes=[{"path_prefix": "/", "upstream": "app", "rate_limit": {"rate": 0.1, "burst": 1}}])
    assert [await _request(p.port, "/") for _ in range(2)] == [(200, None), (429, "10")]
    text = p.config_text.replace("[admin]", "[http]\nkeepalive_timeout = 30\n\n[admin]")
    assert text != p.config_text
    await p.server.reload(parse_config(text))
    assert await _request(p.port, "/") == (429, "10")  # same limit: the spent bucket stays spent
    await p.server.reload(parse_config(text.replace("rate = 0.1", "rate = 0.2")))
    assert await _request(p.port, "/") == (200, None)  # a new limit starts with full buckets
    assert p.server.metrics.limits == {"route_rate": 2}


async def test_route_rate_limit_refuses_websocket_upgrades_too(ws_backend, proxy, ws_connect):
    from websockets.exceptions import InvalidStatus

    p = await proxy(ws_backend, routes=[{"path_prefix": "/", "upstream": "app", "rate_limit": {"rate": 0.1, "burst": 1}}])
    ws = await ws_connect(p.ws_url("/echo"))
    with pytest.raises(InvalidStatus) as info:
        await ws_connect(p.ws_url("/echo"))
    assert info.value.response.status_code == 429
    assert info.value.response.headers["Retry-After"] == "10"
    await ws.send("still open")
    assert await ws.recv() == "still open"
    assert p.server.metrics.not_opened[("websocket", "refused", "overloaded")] == 1


# ------------------------------------------------------------------ a response body that stalls


async def test_upstream_closing_mid_body_is_logged_and_counted(proxy, raw_backend, raw_conn, access_lines):
    short = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"
    p = await proxy(await raw_backend(_answers(raw_backend, short, then_close=True)))
    c = await raw_conn(p.port)
    await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await _closed_short(c)).endswith(b"\r\n\r\n0123456789")
    assert p.server.metrics.truncated == {"upstream_invalid": 1}
    line = [x for x in access_lines if x["event"] == "http"][-1]
    assert (line["status"], line["bytes"], line["error"]) == (200, 10, "upstream_invalid")


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_response_body_stalled_for_read_timeout_is_cut_logged_and_counted(
    framing, proxy, raw_backend, raw_conn, until, access_lines
):
    head = (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789" if framing == "length"
            else b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n")
    backend = await raw_backend(_answers(raw_backend, head, then_close=False))  # then silence
    p = await proxy(backend, upstream={"read_timeout": 0.4})
    c = await raw_conn(p.port)
    t0 = time.monotonic()
    await c.send(b"GET /s HTTP/1.1\r\nHost: h\r\n\r\n")
    data = await _closed_short(c)
    elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 3.0
    response_head, _, body = data.partition(b"\r\n\r\n")
    assert response_head.startswith(b"HTTP/1.1 200")
    if framing == "length":
        assert body == b"0123456789"  # 10 of the 100 promised: short, so plainly incomplete
    else:
        assert body == b"a\r\n0123456789\r\n"  # no terminating chunk
    assert p.server.metrics.truncated == {"upstream_timeout": 1}
    line = [x for x in access_lines if x["event"] == "http"][-1]
    assert (line["status"], line["bytes"], line["error"]) == (200, 10, "upstream_timeout")
    assert await until(lambda: backend.connections[0].closed.is_set())


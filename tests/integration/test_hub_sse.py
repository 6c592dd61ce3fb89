"""The hub over Server-Sent Events: real sockets, the publish API over HTTP, Chromium's EventSource."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import orjson
import pytest
from playwright.async_api import async_playwright

from edgeproxy.hub.token import sign_token

API_KEY = "test-api-key-0123456789"
SECRET = "hub-secret-0123456789-0123456789-abc"


@pytest.fixture
async def hub(proxy, refused_port):
    async def start(admin: dict | None = None, **keys):
        hub_table = {"path": "/hub", "ping_interval": 0, **keys}
        return await proxy(refused_port, hubs=[hub_table],
                           admin={"bind": "127.0.0.1:0", "api_key": API_KEY, **(admin or {})})

    return start


async def publish(p, channel: str, data) -> dict:
    host, port = p.server.admin.address
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://{host}:{port}/v1/publish", data=orjson.dumps({"channel": channel, "data": data}),
                             headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            assert response.status == 200, await response.text()
            return await response.json()


class EventStream:
    """An SSE reader that follows the HTML standard's parsing rules (fields, comments, dispatch)."""

    def __init__(self, response: aiohttp.ClientResponse):
        self.response = response
        self.last_id: str | None = None
        self.retry: int | None = None
        self.comments = 0
        self._buffer = b""

    async def next(self, timeout: float = 5.0) -> tuple[str, dict, str | None]:
        """The next dispatched event: (type, JSON data, last event id)."""
        event, data = "message", []
        async with asyncio.timeout(timeout):
            while True:
                while b"\n" not in self._buffer:
                    chunk = await self.response.content.readany()
                    if not chunk:
                        raise EOFError("the stream ended")
                    self._buffer += chunk
                line, self._buffer = self._buffer.split(b"\n", 1)
                text = line.decode()
                if not text:
                    if data:
                        return event, json.loads("\n".join(data)), self.last_id
                    event = "message"
                    continue
                if text.startswith(":"):
                    self.comments += 1
                    continue
                name, _, value = text.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
                elif name == "id":
                    self.last_id = value
                elif name == "retry" and value.isdigit():
                    self.retry = int(value)

    async def ended(self, timeout: float = 5.0) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while await self.response.content.readany():
                    pass
            return True
        except TimeoutError:
            return False


async def open_stream(session: aiohttp.ClientSession, p, query: str, *, last_id: str | None = None,
                      token: str | None = None) -> aiohttp.ClientResponse:
    headers = {"Accept": "text/event-stream"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    host, port = p.server.addresses[0]
    return await session.get(f"http://{host}:{port}/hub/sse?{query}", headers=headers)


async def subscribed_stream(session, p, query: str, channels: int, **kw) -> tuple[EventStream, list[dict]]:
    response = await open_stream(session, p, query, **kw)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/event-stream"
    stream = EventStream(response)
    kind, connected, _ = await stream.next()
    assert kind == "connected" and connected["op"] == "connected" and connected["client"]
    subs = []
    for _ in range(channels):
        kind, doc, _ = await stream.next()
        assert kind == "subscribed", (kind, doc)
        subs.append(doc)
    return stream, subs


async def test_publications_arrive_as_events_with_positions_as_ids(hub) -> None:
    p = await hub()
    async with aiohttp.ClientSession() as session:
        stream, (sub,) = await subscribed_stream(session, p, "channel=news", 1)
        assert stream.retry is not None and sub["seq"] == 0 and sub["recovered"] is False
        epoch = sub["epoch"]
        for n in range(1, 4):
            await publish(p, "news", {"n": n, "text": "two\nlines"})
        for n in range(1, 4):
            kind, doc, last_id = await stream.next()
            assert kind == "pub" and doc["seq"] == n and doc["data"] == {"n": n, "text": "two\nlines"}
            assert last_id == f"{epoch}:{n}"
        assert p.server.metrics.active_by("protocol").get("sse") == 1
    await asyncio.sleep(0.1)
    assert p.server.metrics.active_by("protocol").get("sse", 0) == 0


async def test_last_event_id_resumes_without_gap_or_duplicate(hub) -> None:
    p = await hub()
    async with aiohttp.ClientSession() as session:
        stream, _ = await subscribed_stream(session, p, "channel=a", 1)
        for n in range(1, 4):
            await publish(p, "a", n)
        for _ in range(3):
            last_id = (await stream.next())[2]
        stream.response.close()
        for n in range(4, 8):  # missed while away
            await publish(p, "a", n)
        again, (sub,) = await subscribed_stream(session, p, "channel=a", 1, last_id=last_id)
        assert sub["recovered"] is True
        got = [(await again.next())[1]["data"] for _ in range(4)]
        await publish(p, "a", 8)
        got.append((await again.next())[1]["data"])
        assert got == [4, 5, 6, 7, 8]


async def test_several_channels_share_one_stream_and_resume_together(hub) -> None:
    p = await hub()
    async with aiohttp.ClientSession() as session:
        stream, subs = await subscribed_stream(session, p, "channel=a&channel=b", 2)
        ea, eb = subs[0]["epoch"], subs[1]["epoch"]
        await publish(p, "a", "a1")
        await publish(p, "b", "b1")
        await publish(p, "a", "a2")
        ids = [(await stream.next())[2] for _ in range(3)]
        assert ids == [f"{ea}:1,{eb}:0", f"{ea}:1,{eb}:1", f"{ea}:2,{eb}:1"]
        stream.response.close()
        await publish(p, "b", "b2")
        await publish(p, "a", "a3")
        again, subs = await subscribed_stream(session, p, "channel=a&channel=b", 2, last_id=ids[-1])
        assert [s["recovered"] for s in subs] == [True, True]
        got = [(await again.next())[1] for _ in range(2)]
        assert sorted((m["channel"], m["data"]) for m in got) == [("a", "a3"), ("b", "b2")]
        assert again.last_id == f"{ea}:3,{eb}:2"
        # a WebSocket-less publication path: the multi-channel stream gets live events too
        await publish(p, "b", "b3")
        kind, doc, last_id = await again.next()
        assert (kind, doc["data"], last_id) == ("pub", "b3", f"{ea}:3,{eb}:3")


async def test_the_last_event_id_parameter_resumes_and_the_header_wins(hub) -> None:
    """A client that re-opens the stream itself passes its positions as ?last_event_id= (an empty part: a new channel)."""
    p = await hub()
    async with aiohttp.ClientSession() as session:
        stream, (sub,) = await subscribed_stream(session, p, "channel=qa", 1)
        epoch = sub["epoch"]
        for n in range(1, 4):
            await publish(p, "qa", n)
        stream.response.close()
        await publish(p, "qb", "b1")  # before the stream asks for qb: not replayed
        again, subs = await subscribed_stream(session, p, f"channel=qa&channel=qb&last_event_id={epoch}:1,", 2)
        assert [s["recovered"] for s in subs] == [True, False]
        assert [(await again.next())[1]["data"] for _ in range(2)] == [2, 3]
        await publish(p, "qb", "b2")
        kind, doc, last_id = await again.next()
        assert (kind, doc["data"]) == ("pub", "b2") and last_id == f"{epoch}:3,{doc['epoch']}:{doc['seq']}"
        again.response.close()
        # both given: the header (EventSource's own reconnect, the newer position) wins
        third, _ = await subscribed_stream(session, p, f"channel=qa&last_event_id={epoch}:0", 1, last_id=f"{epoch}:2")
        assert (await third.next())[1]["data"] == 3


async def test_a_gap_history_no_longer_covers_says_recovered_false(hub) -> None:
    p = await hub(history_size=2)
    async with aiohttp.ClientSession() as session:
        stream, (sub,) = await subscribed_stream(session, p, "channel=a", 1)
        epoch = sub["epoch"]
        stream.response.close()
        for n in range(1, 6):
            await publish(p, "a", n)
        again, (sub,) = await subscribed_stream(session, p, "channel=a", 1, last_id=f"{epoch}:0")
        assert sub["recovered"] is False


@pytest.mark.parametrize(
    ("query", "headers", "status", "words"),
    [
        ("", {}, 400, "no channel"),
        ("channel=a&channel=a", {}, 400, "named twice"),
        ("channel=bad%20name", {}, 400, "invalid channel"),
        ("channel=a", {"Last-Event-ID": "nonsense"}, 400, "epoch:seq"),
        ("channel=a&channel=b", {"Last-Event-ID": "e:1"}, 400, "1 position(s) for 2"),
        ("channel=a&last_event_id=e:x", {}, 400, "epoch:seq"),
        ("channel=a&last_event_id=e:1&last_event_id=e:2", {}, 400, "twice"),
    ],
)
async def test_bad_requests_get_a_status_before_any_event(hub, query, headers, status, words) -> None:
    p = await hub()
    host, port = p.server.addresses[0]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{host}:{port}/hub/sse?{query}", headers=headers) as response:
            assert response.status == status and words in await response.text()
    assert p.server.metrics.active_by("protocol").get("sse", 0) == 0


async def test_tokens_are_checked_and_grants_are_per_channel(hub) -> None:
    p = await hub(token_secret=SECRET)
    token = sign_token({"sub": "u1", "channels": ["news"]}, SECRET.encode())
    async with aiohttp.ClientSession() as session:
        host, port = p.server.addresses[0]
        async with session.get(f"http://{host}:{port}/hub/sse?channel=news") as response:
            assert response.status == 401
        async with session.get(f"http://{host}:{port}/hub/sse?channel=secret&token={token}") as response:
            assert response.status == 403 and "secret" in await response.text()
        stream, _ = await subscribed_stream(session, p, f"channel=news&token={token}", 1)
        await publish(p, "news", "hello")
        assert (await stream.next())[1]["data"] == "hello"


async def test_websocket_and_sse_subscribers_get_every_publication_counted_once(hub, ws_connect) -> None:
    p = await hub()
    ws = await ws_connect(p.ws_url("/hub"))
    assert orjson.loads(await ws.recv())["op"] == "connected"
    await ws.send(orjson.dumps({"op": "subscribe", "channel": "c"}).decode())
    assert orjson.loads(await ws.recv())["op"] == "subscribed"
    async with aiohttp.ClientSession() as session:
        streams = [(await subscribed_stream(session, p, "channel=c", 1))[0] for _ in range(3)]
        multi, _ = await subscribed_stream(session, p, "channel=c&channel=d", 2)
        before = p.server.metrics.fanout_publishes
        for n in range(5):
            await publish(p, "c", n)
        for stream in [*streams, multi]:
            assert [(await stream.next())[1]["data"] for _ in range(5)] == list(range(5))
        assert [orjson.loads(await ws.recv())["data"] for _ in range(5)] == list(range(5))
        assert p.server.metrics.fanout_publishes - before == 5


async def test_stop_ends_streams_with_a_jittered_retry(hub) -> None:
    p = await hub()
    async with aiohttp.ClientSession() as session:
        streams = [(await subscribed_stream(session, p, "channel=a", 1))[0] for _ in range(8)]
        await p.server.stop()
        retries = set()
        for stream in streams:
            with pytest.raises(EOFError):
                await stream.next()
            retries.add(stream.retry)
        assert all(500 <= r <= 5000 for r in retries) and len(retries) > 1


async def test_a_slow_stream_is_ended_and_resumes_where_it_stopped(hub) -> None:
    p = await hub(subscriber_buffer_limit=65536, history_size=1000, max_message_size=300000)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, p.server.addresses[0])
    await loop.sock_sendall(sock, b"GET /hub/sse?channel=c HTTP/1.1\r\nHost: x\r\n\r\n")
    async with aiohttp.ClientSession() as session:
        fast, _ = await subscribed_stream(session, p, "channel=c", 1)
        await asyncio.sleep(0.2)  # the slow client reads nothing from now on
        payload = "x" * 200000
        sent = 0
        for _ in range(300):
            await publish(p, "c", payload)
            sent += 1
            assert (await fast.next())[1]["seq"] == sent  # the fast one keeps up
            if p.server.metrics.fanout_subscribers_dropped:
                break
        assert p.server.metrics.fanout_subscribers_dropped == 1
        data = bytearray()
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 5):
            data += chunk
        sock.close()
        head, _, body = bytes(data).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        events = [line for line in body.split(b"\n\n") if b"event: pub" in line]
        seqs = [json.loads(event.split(b"data: ", 1)[1])["seq"] for event in events]
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < sent
        last_id = events[-1].split(b"\n", 1)[0].removeprefix(b"id: ").decode()
        again, (sub,) = await subscribed_stream(session, p, "channel=c", 1, last_id=last_id)
        assert sub["recovered"] is True
        assert [(await again.next())[1]["seq"] for _ in range(sent - len(seqs))] == list(range(len(seqs) + 1, sent + 1))


async def test_keepalive_comments_keep_an_idle_stream_alive(hub) -> None:
    p = await hub(ping_interval=0.2)
    async with aiohttp.ClientSession() as session:
        stream, _ = await subscribed_stream(session, p, "channel=a", 1)
        await asyncio.sleep(0.5)
        await publish(p, "a", 1)
        await stream.next()
        assert stream.comments >= 1


async def test_hub_only_config_needs_no_upstream(tmp_path) -> None:
    from edgeproxy.config import parse_config
    from edgeproxy.transport.server import ProxyServer

    config = parse_config('[[listeners]]\nbind = "127.0.0.1:0"\n[[hubs]]\npath = "/hub"\nping_interval = 0\n'
                          f'[admin]\nbind = "127.0.0.1:0"\napi_key = "{API_KEY}"\n')
    assert config.upstreams == () and config.routes == ()
    server = ProxyServer(config)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            host, port = server.addresses[0]
            async with session.get(f"http://{host}:{port}/elsewhere") as response:
                assert response.status == 404
            response = await session.get(f"http://{host}:{port}/hub/sse?channel=a")
            stream = EventStream(response)
            assert (await stream.next())[0] == "connected"
            assert (await stream.next())[0] == "subscribed"
            response.close()
    finally:
        await server.stop()


async def test_chromium_eventsource_reconnects_and_resumes_by_itself(hub, external_tool) -> None:
    """The browser's own EventSource: the stream ends, it reconnects with Last-Event-ID, nothing lost or doubled."""
    chromium = external_tool("chromium", "chromium")
    p = await hub()
    host, port = p.server.addresses[0]
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            await page.goto(f"http://{host}:{port}/nothing-here")  # any page of the origin (a 502 here)
            await page.evaluate("""() => {
                window.got = []; window.opens = 0;
                const es = new EventSource('/hub/sse?channel=a&channel=b');
                es.onopen = () => { window.opens += 1; };
                es.addEventListener('pub', (e) => window.got.push(JSON.parse(e.data).data));
            }""")
            await page.wait_for_function("window.opens === 1", timeout=10000)
            for n in range(5):
                await publish(p, "a" if n % 2 else "b", n)
            await page.wait_for_function("window.got.length === 5", timeout=10000)
            # end the stream from the proxy's side; EventSource comes back after `retry`
            for stream in list(next(iter(p.server.hubs.values())).sse_streams):
                if stream.channels == ("a", "b"):
                    stream.end(retry_ms=200)
            await asyncio.sleep(0.05)
            for n in range(5, 10):
                await publish(p, "a" if n % 2 else "b", n)
            await page.wait_for_function("window.opens === 2 && window.got.length >= 10", timeout=10000)
            await asyncio.sleep(0.3)
            got = await page.evaluate("window.got")
            # every publication once; in order within each channel (channels have no common order:
            # the replay after the reconnect gives a's missed ones, then b's)
            assert sorted(got) == list(range(10)) and len(got) == 10
            assert [n for n in got if n % 2] == [1, 3, 5, 7, 9] and [n for n in got if not n % 2] == [0, 2, 4, 6, 8]
        finally:
            await browser.close()


async def test_a_drain_ends_hub_streams_in_paced_batches(proxy, refused_port) -> None:
    p = await proxy(refused_port, hubs=[{"path": "/hub", "ping_interval": 0}],
                    admin={"bind": "127.0.0.1:0", "api_key": API_KEY},
                    shutdown={"drain_timeout": 2.0, "readiness_grace": 0.0})
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        streams = [(await subscribed_stream(session, p, "channel=a", 1))[0] for _ in range(12)]

        async def ended_at(stream: EventStream) -> float:
            with pytest.raises(EOFError):
                await stream.next(timeout=10)
            return loop.time()

        waits = [asyncio.ensure_future(ended_at(s)) for s in streams]
        started = loop.time()
        await p.server.drain_and_stop()
        ends = sorted(await asyncio.gather(*waits))
    assert all(1000 <= s.retry <= 5000 for s in streams)  # [sse] retry_min..retry_max, in ms
    # batches over the first half of the drain window, not all at once
    assert ends[-1] - ends[0] >= 0.4 * 2.0 * 0.5 and ends[-1] - started < 2.0

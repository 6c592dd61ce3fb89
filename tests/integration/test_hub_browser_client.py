"""The browser hub client (edgeproxy/static/hub-client.js) in Chromium, against a real proxy's hub.

Reconnects are made by the proxy (connections closed from the server's side), the
WebSocket is made to fail in the page so the client falls back to EventSource, and
a scripted hub (a `websockets` server) sends duplicates and the token close codes.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

import aiohttp
import pytest
from playwright.async_api import async_playwright
from websockets.asyncio.server import serve

from edgeproxy.demo import start_demo_backend
from edgeproxy.transport.resume import HUB_CLIENT_JS_PATH, client_js
from tests.integration.test_hub_sse import API_KEY, SECRET, publish
FAST = {"min": 300, "first": 400, "max": 800}  # long enough that publications land in the gap

# Loads the module from the proxy, starts a client, records what it hands out and every event.
START = """async (opts) => {
    const { HubClient } = await import('/.edgeproxy/hub-client.js');
    window.got = []; window.events = []; window.tokenCalls = 0;
    if (opts.tokens) {
        const tokens = opts.tokens; delete opts.tokens;
        opts.token = async () => tokens[Math.min(window.tokenCalls++, tokens.length - 1)];
    }
    const hub = new HubClient(opts.url || '/hub', opts);
    window.hub = hub;
    hub.onpublication = (e) => window.got.push([e.detail.channel, e.detail.seq, e.detail.data]);
    if (opts.buggyApp) hub.onconnected = () => { throw new Error('an application bug'); };
    for (const type of ['connected', 'disconnected', 'reconnecting', 'subscribed', 'unrecovered', 'error', 'closed']) {
        hub.addEventListener(type, (e) => window.events.push([type, e.detail]));
    }
}"""


@pytest.fixture
async def hub(proxy, refused_port):
    async def start(backend=refused_port, **keys):
        return await proxy(backend, hubs=[{"path": "/hub", "ping_interval": 0, **keys}],
                           admin={"bind": "127.0.0.1:0", "api_key": API_KEY})

    return start


@pytest.fixture
async def browser(external_tool):
    chromium = external_tool("chromium", "chromium")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            await browser.close()


async def client_page(browser, p, init_script: str | None = None, **opts):
    page = await browser.new_page()
    if init_script:
        await page.add_init_script(init_script)
    await page.goto(f"http://{p.authority}/nothing-here")  # any page of the proxy's origin
    await page.evaluate(START, opts)
    return page


def by_channel(got: list) -> dict[str, list]:
    out = defaultdict(list)
    for channel, seq, data in got:
        out[channel].append((seq, data))
    return dict(out)


def events_of(events: list, kind: str) -> list[dict]:
    return [detail for name, detail in events if name == kind]


async def test_the_script_is_served_before_routing(hub) -> None:
    p = await hub()
    async with aiohttp.ClientSession() as session:
        async with session.get(p.url(HUB_CLIENT_JS_PATH)) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/javascript")
            assert await resp.read() == client_js(HUB_CLIENT_JS_PATH)
        async with session.head(p.url(HUB_CLIENT_JS_PATH)) as resp:
            assert resp.status == 200 and int(resp.headers["Content-Length"]) == len(client_js(HUB_CLIENT_JS_PATH))
    assert b"export class HubClient" in client_js(HUB_CLIENT_JS_PATH)


async def test_websocket_reconnects_with_backoff_and_resumes_both_channels(hub, browser) -> None:
    p = await hub()
    service = p.server.hubs["/hub"]
    page = await client_page(browser, p, channels=["wa", "wb"], backoff=FAST)
    await page.wait_for_function("events.filter(([t]) => t === 'subscribed').length === 2", timeout=5000)
    assert await page.evaluate("hub.transport") == "websocket"
    for n in range(6):
        await publish(p, "wa" if n % 2 else "wb", n)
    await page.wait_for_function("got.length === 6", timeout=5000)

    for conn in list(service.connections):  # the proxy ends the connection
        conn.close(1012, "restart")
    await asyncio.sleep(0.05)
    assert not service.connections
    for n in range(6, 12):  # published while the client waits to reconnect
        await publish(p, "wa" if n % 2 else "wb", n)
    assert not service.connections  # still in the gap
    await page.wait_for_function("hub.connects === 2 && got.length >= 12", timeout=5000)
    await asyncio.sleep(0.2)  # anything doubled would have arrived by now

    got, events = await page.evaluate("[got, events]")
    channels = by_channel(got)
    assert channels["wa"] == [(seq, n) for seq, n in zip(range(1, 7), range(1, 12, 2))]
    assert channels["wb"] == [(seq, n) for seq, n in zip(range(1, 7), range(0, 12, 2))]
    assert events_of(events, "disconnected") == [{"transport": "websocket", "code": 1012, "reason": "restart"}]
    (reconnecting,) = events_of(events, "reconnecting")
    assert reconnecting["next"] == "websocket" and 300 <= reconnecting["delay"] <= 400  # first wait: [min, first]
    resubscribed = events_of(events, "subscribed")[2:]
    assert sorted(s["channel"] for s in resubscribed) == ["wa", "wb"] and all(s["recovered"] for s in resubscribed)
    assert await page.evaluate("[hub.duplicates, hub.position('wa').seq, hub.state]") == [0, 6, "open"]

    # unsubscribed: nothing more from wb; subscribed again from an older position: replayed from there
    await page.evaluate("hub.unsubscribe('wb')")
    await publish(p, "wb", 12)
    await page.evaluate("hub.subscribe('wb', { since: { seq: 4, epoch: events.find(([t, d]) => d.channel === 'wb')[1].epoch } })")
    await page.wait_for_function("got.length === 15", timeout=5000)
    assert by_channel((await page.evaluate("got"))[12:]) == {"wb": [(5, 8), (6, 10), (7, 12)]}


BLOCKED_WEBSOCKETS = {
    # a CSP or a sandbox: the constructor throws
    "throws": "window.WebSocket = function () { throw new DOMException('blocked by the test', 'SecurityError'); };",
    # a proxy that breaks upgrades: the socket fails after a moment
    "fails": """window.WebSocket = class {
        constructor() { this.readyState = 0; setTimeout(() => { this.readyState = 3; this.onerror?.(new Event('error'));
                                                                this.onclose?.({ code: 1006, reason: '' }); }, 20); }
        close() {} send() { throw new Error('not open'); }
    }; window.WebSocket.OPEN = 1;""",
}


@pytest.mark.parametrize("blocked", sorted(BLOCKED_WEBSOCKETS))
async def test_a_websocket_that_cannot_work_falls_back_to_eventsource_and_resumes(hub, browser, blocked) -> None:
    p = await hub()
    service = p.server.hubs["/hub"]
    page = await client_page(browser, p, BLOCKED_WEBSOCKETS[blocked], channels=["fa", "fb"], backoff=FAST)
    await page.wait_for_function("hub.state === 'open'", timeout=5000)
    assert await page.evaluate("hub.transport") == "sse"
    first = events_of(await page.evaluate("events"), "reconnecting")
    assert [(e["transport"], e["delay"], e["next"]) for e in first] == [("websocket", 0, "sse")]  # at once
    for n in range(4):
        await publish(p, "fa" if n % 2 else "fb", n)
    await page.wait_for_function("got.length === 4", timeout=5000)

    for stream in list(service.sse_streams):  # the proxy ends the stream
        stream.end()
    await asyncio.sleep(0.05)
    assert not service.sse_streams
    for n in range(4, 8):
        await publish(p, "fa" if n % 2 else "fb", n)
    assert not service.sse_streams
    await page.wait_for_function("hub.connects === 2 && got.length >= 8", timeout=5000)

    # a channel added to the stream: it is re-opened, the others resume where they were
    await page.evaluate("hub.subscribe('fc')")
    await page.wait_for_function("hub.connects === 3", timeout=5000)
    for n in range(8, 11):
        await publish(p, ("fa", "fb", "fc")[n % 3], n)
    await page.wait_for_function("got.length >= 11", timeout=5000)
    await asyncio.sleep(0.2)

    got, events = await page.evaluate("[got, events]")
    channels = by_channel(got)
    assert [n for _, n in channels["fa"]] == [1, 3, 5, 7, 9] and [s for s, _ in channels["fa"]] == [1, 2, 3, 4, 5]
    assert [n for _, n in channels["fb"]] == [0, 2, 4, 6, 10]
    assert channels["fc"] == [(1, 8)]
    # the reconnect stayed on EventSource (it works where the WebSocket did not) after a backoff wait
    later = events_of(events, "reconnecting")[1:]
    assert [(e["transport"], e["next"]) for e in later] == [("sse", "sse")] and 300 <= later[0]["delay"] <= 400
    assert all(s["recovered"] for s in events_of(events, "subscribed") if s["seq"] > 0)
    assert await page.evaluate("[hub.duplicates, hub.transport, hub.connects]") == [0, "sse", 3]


async def test_a_hub_that_is_down_gets_both_transports_in_turn_with_growing_waits(hub, browser, refused_port) -> None:
    p = await hub()
    page = await client_page(browser, p, url=f"http://127.0.0.1:{refused_port}/hub", channels=["x"],
                             backoff={"min": 20, "first": 40, "max": 160})
    await page.wait_for_function("events.filter(([t]) => t === 'reconnecting').length >= 10", timeout=5000)
    await page.evaluate("hub.close()")
    tries = events_of(await page.evaluate("events"), "reconnecting")[:10]
    # a failed WebSocket: EventSource at once; a failed EventSource: the wait, then a WebSocket again
    assert [(e["transport"], e["next"]) for e in tries] == [("websocket", "sse"), ("sse", "websocket")] * 5
    assert all(e["delay"] == 0 for e in tries[::2])
    waits = [e["delay"] for e in tries[1::2]]
    for n, wait in enumerate(waits):  # full jitter: uniform in [min, min(max, first * 2**n)]
        assert 20 <= wait <= min(160, 40 * 2 ** n), (n, waits)
    assert await page.evaluate("""async () => {
        const { Backoff } = await import('/.edgeproxy/hub-client.js');
        const b = new Backoff({ min: 500, first: 1000, max: 30000 });
        let refused = false;
        try { new Backoff({ min: 2000, first: 1000 }); } catch (e) { refused = e instanceof RangeError; }
        return [b.delay(0, 0), b.delay(0, 1), b.delay(3, 0.5), b.delay(9, 1), refused];
    }""") == [500, 1000, 4250, 30000, True]
    assert await page.evaluate("[hub.state, hub.connects]") == ["closed", 0]


async def test_eventsource_refused_for_a_bad_static_token_ends_the_client(hub, browser) -> None:
    p = await hub(token_secret=SECRET)
    page = await client_page(browser, p, transport="sse", token="not-a-jwt", channels=["x"], backoff=FAST)
    await page.wait_for_function("hub.state === 'closed'", timeout=5000)
    events = await page.evaluate("events")
    (error,) = events_of(events, "error")
    assert error["status"] == 401 and error["code"] == "bad_token" and error["transport"] == "sse"
    assert events_of(events, "closed")[0]["code"] == 4001


async def scripted_hub(scripts):
    """A hub that plays one script per connection; returns (server, request paths, client messages)."""
    paths: list[str] = []
    received: list[dict] = []

    async def handler(ws):
        index = len(paths)
        paths.append(ws.request.path)

        async def recv() -> dict:
            message = json.loads(await asyncio.wait_for(ws.recv(), 5))
            received.append(message)
            return message

        await scripts[index](ws, recv)

    return await serve(handler, "127.0.0.1", 0), paths, received


def op(**fields) -> str:
    return json.dumps(fields)


async def test_duplicates_are_dropped_by_seq_and_a_bad_token_close_ends_the_client(hub, browser) -> None:
    async def first(ws, recv):
        await ws.send(op(op="connected", ping_interval=0, client="c1"))
        assert (await recv()) == {"op": "subscribe", "channel": "a"}
        await ws.send(op(op="ping"))
        assert (await recv()) == {"op": "pong"}
        await ws.send(op(op="subscribed", channel="a", seq=0, epoch="E", recovered=False))
        for seq in (1, 2, 2, 1, 3):
            await ws.send(op(op="pub", channel="a", seq=seq, epoch="E", data=seq))
        await ws.send(op(op="pub", channel="other", seq=9, epoch="E", data="not subscribed"))
        await ws.close(1012)

    async def second(ws, recv):
        await ws.send(op(op="connected", ping_interval=0, client="c2"))
        assert (await recv()) == {"op": "subscribe", "channel": "a", "since": {"seq": 3, "epoch": "E"}}
        await ws.send(op(op="subscribed", channel="a", seq=3, epoch="E", recovered=True))
        for seq in (3, 4):  # a replay that overlaps what was handed out
            await ws.send(op(op="pub", channel="a", seq=seq, epoch="E", data=seq))
        await ws.close(4001)

    server, paths, _ = await scripted_hub([first, second])
    port = server.sockets[0].getsockname()[1]
    p = await hub()
    try:
        page = await client_page(browser, p, url=f"ws://127.0.0.1:{port}/hub", token="t1", channels=["a"],
                                 transport="websocket", backoff=FAST)
        await page.wait_for_function("hub.state === 'closed'", timeout=5000)
        got, events = await page.evaluate("[got, events]")
        assert [data for _, _, data in got] == [1, 2, 3, 4]
        assert await page.evaluate("[hub.duplicates, hub.connects]") == [3, 2]
        assert events_of(events, "closed")[0]["code"] == 4001
        assert paths == ["/hub?token=t1", "/hub?token=t1"]
    finally:
        server.close()


async def test_a_token_function_is_called_again_after_4002_and_silence_means_dead(hub, browser) -> None:
    """Also: an exception in the application's onconnected does not stop the subscribes."""
    async def expires(ws, recv):
        await ws.send(op(op="connected", ping_interval=0, client="c1"))
        await recv()
        await ws.close(4002)

    async def silent(ws, recv):  # says connected, then nothing: the client must give up on it
        await ws.send(op(op="connected", ping_interval=0, client="c2"))
        await recv()
        await asyncio.sleep(3)

    async def works(ws, recv):
        await ws.send(op(op="connected", ping_interval=0, client="c3"))
        await recv()
        await ws.send(op(op="subscribed", channel="a", seq=5, epoch="E", recovered=False))
        await ws.send(op(op="pub", channel="a", seq=6, epoch="E", data="six"))
        await asyncio.sleep(3)

    server, paths, _ = await scripted_hub([expires, silent, works])
    port = server.sockets[0].getsockname()[1]
    p = await hub()
    try:
        page = await client_page(browser, p, url=f"ws://127.0.0.1:{port}/hub", tokens=["tok1", "tok2", "tok3"],
                                 channels=["a"], transport="websocket", pingTimeout=300, buggyApp=True,
                                 backoff={"min": 50, "first": 100, "max": 200})
        await page.wait_for_function("got.length === 1", timeout=5000)
        events = await page.evaluate("events")
        assert paths == ["/hub?token=tok1", "/hub?token=tok2", "/hub?token=tok3"]
        assert [(d["code"], d["reason"]) for d in events_of(events, "disconnected")] == [
            (4002, ""), (1006, "nothing heard for 300 ms")]
        assert await page.evaluate("[got[0], hub.clientId, hub.state]") == [["a", 6, "six"], "c3", "open"]
    finally:
        server.close()


async def test_the_demo_page_shows_publications(hub, browser) -> None:
    backend = await start_demo_backend("127.0.0.1", 0)
    try:
        p = await hub(backend.sockets[0].getsockname()[1])
        page = await browser.new_page()
        await page.goto(p.url("/hub-demo"))
        await page.wait_for_function("window.hub && hub.state === 'open' && hub.position('chat')", timeout=5000)
        await publish(p, "news", {"text": "hello"})
        await page.wait_for_function("document.getElementById('log').textContent.includes('pub news #1')", timeout=5000)
        assert '{"text":"hello"}' in await page.text_content("#log")
        assert await page.text_content("#transport") == "websocket"
    finally:
        backend.close()

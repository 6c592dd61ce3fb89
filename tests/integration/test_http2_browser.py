"""Headless Chromium over TLS: the page, 10 EventSource streams and a WebSocket share one HTTP/2 connection.

Over HTTP/1.1 a browser opens at most 6 connections per origin, so a seventh
EventSource waits forever: the SSE pain HTTP/2 at the edge removes.  Asserted
from the proxy's side: one h2 connection, eleven streams (the page and ten event
streams), every stream's events delivered.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from playwright.async_api import async_playwright

HOST = "127.0.0.1"
STREAMS = 10
PAGE = b"""<!doctype html><meta charset="utf-8"><title>ten streams</title>
<script>
window.got = {};
for (let i = 0; i < %d; i++) {
  const es = new EventSource('/events?i=' + i);
  es.onmessage = (e) => { (window.got[i] = window.got[i] || []).push(e.data); if (e.data === 'last') es.close(); };
}
</script>""" % STREAMS


async def backend() -> tuple[web.AppRunner, int]:
    async def page(request):
        return web.Response(body=PAGE, content_type="text/html")

    async def events(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for n in range(3):
            await resp.write(b"data: %s-%d\n\n" % (request.query["i"].encode(), n))
            await asyncio.sleep(0.05)
        await resp.write(b"data: last\n\n")
        await asyncio.sleep(5)  # the browser closes it after "last"
        return resp

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/events", events)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def test_chromium_runs_ten_event_streams_on_one_h2_connection(proxy, certs, external_tool) -> None:
    chromium = external_tool("chromium", "chromium")
    runner, port = await backend()
    try:
        leaf = certs.leaf("default", ["DNS:localhost", "IP:127.0.0.1"])
        p = await proxy(port, listeners=[{"bind": f"{HOST}:0", "tls_cert": leaf.cert, "tls_key": leaf.key}])
        async with async_playwright() as pw:
            # the test CA is not in Chromium's store: accept the proxy's certificate for this run
            browser = await pw.chromium.launch(executable_path=chromium,
                                               args=["--no-sandbox", "--ignore-certificate-errors"])
            try:
                page = await browser.new_page(ignore_https_errors=True)
                await page.goto(f"https://localhost:{p.port}/")
                await page.wait_for_function(
                    f"Object.keys(window.got).length === {STREAMS} && "
                    "Object.values(window.got).every(g => g[g.length - 1] === 'last')", timeout=15000)
                got = await page.evaluate("window.got")
                protocol = await page.evaluate("performance.getEntriesByType('navigation')[0].nextHopProtocol")
            finally:
                await browser.close()
        assert protocol == "h2"
        for i in range(STREAMS):
            assert got[str(i)] == [f"{i}-0", f"{i}-1", f"{i}-2", "last"]
        metrics = p.server.metrics
        assert metrics.http2_connections == 1, "the page and its event streams did not share one connection"
        assert metrics.http2_streams >= 1 + STREAMS
    finally:
        await runner.cleanup()


async def page_results(chromium: str, port: int, ready: str, *expressions: str) -> list:
    """Load the proxy's page in headless Chromium; once ``ready`` holds, the values of ``expressions``."""
    async with async_playwright() as pw:
        # the test CA is not in Chromium's store: accept the proxy's certificate for this run
        browser = await pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--ignore-certificate-errors"])
        try:
            page = await browser.new_page(ignore_https_errors=True)
            await page.goto(f"https://localhost:{port}/")
            await page.wait_for_function(ready, timeout=15000)
            return [await page.evaluate(expression) for expression in expressions]
        finally:
            await browser.close()


WS_PAGE = b"""<!doctype html><meta charset="utf-8"><title>websocket over h2</title>
<script>
window.msgs = [];
const ws = new WebSocket('wss://' + location.host + '/ws?x=1', ['chat.v1']);
ws.onopen = () => { for (let i = 0; i < 3; i++) ws.send('hello ' + i); ws.send(new Uint8Array(70000).fill(7)); };
ws.onmessage = async (e) => {
  window.msgs.push(typeof e.data === 'string' ? e.data : 'binary ' + (await e.data.arrayBuffer()).byteLength);
  if (window.msgs.length === 4) ws.close(1000, 'done');
};
ws.onclose = (e) => { window.wsClosed = e.code; window.protocol = ws.protocol; };
</script>"""


async def ws_backend() -> tuple[web.AppRunner, int, list]:
    seen: list = []

    async def page(request):
        return web.Response(body=WS_PAGE, content_type="text/html")

    async def echo(request):
        ws = web.WebSocketResponse(protocols=["chat.v1"])
        await ws.prepare(request)
        seen.append(dict(request.headers))
        async for msg in ws:
            if msg.type == web.WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == web.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    return runner, runner.addresses[0][1], seen


async def test_chromium_opens_its_websocket_as_a_stream_of_the_pages_h2_connection(proxy, certs,
                                                                                   external_tool) -> None:
    """RFC 8441: Chromium sees SETTINGS_ENABLE_CONNECT_PROTOCOL and sends an extended CONNECT."""
    chromium = external_tool("chromium", "chromium")
    runner, port, seen = await ws_backend()
    try:
        leaf = certs.leaf("default", ["DNS:localhost", "IP:127.0.0.1"])
        p = await proxy(port, listeners=[{"bind": f"{HOST}:0", "tls_cert": leaf.cert, "tls_key": leaf.key}])
        msgs, closed = await page_results(chromium, p.port, "window.wsClosed !== undefined",
                                          "window.msgs", "[window.wsClosed, window.protocol]")
        assert msgs == ["hello 0", "hello 1", "hello 2", "binary 70000"]
        assert closed == [1000, "chat.v1"]
        metrics = p.server.metrics
        # from the proxy's side: the socket came as an h2 stream of the page's one connection
        assert metrics.http2_websockets == 1, "Chromium did not open the WebSocket over HTTP/2"
        assert metrics.http2_connections == 1
        assert metrics.opened_total("websocket") == 1
        (headers,) = seen
        assert headers["X-Forwarded-Proto"] == "https" and headers["Sec-WebSocket-Version"] == "13"
    finally:
        await runner.cleanup()


HUB_PAGE = b"""<!doctype html><meta charset="utf-8"><title>hub over h2</title>
<script>
window.msgs = [];
const ws = new WebSocket('wss://' + location.host + '/hub');
ws.onopen = () => ws.send(JSON.stringify({op: 'subscribe', channel: 'news'}));
ws.onmessage = (e) => window.msgs.push(JSON.parse(e.data).op);
</script>"""


async def test_chromium_reaches_a_hub_over_an_h2_stream(proxy, certs, external_tool) -> None:
    """A hub's WebSocket too comes as an extended CONNECT once the connection advertised it."""
    chromium = external_tool("chromium", "chromium")

    async def page(request):
        return web.Response(body=HUB_PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, 0).start()
    try:
        leaf = certs.leaf("default", ["DNS:localhost", "IP:127.0.0.1"])
        p = await proxy(runner.addresses[0][1], listeners=[{"bind": f"{HOST}:0", "tls_cert": leaf.cert,
                                                           "tls_key": leaf.key}],
                        hubs=[{"path": "/hub", "ping_interval": 0}])
        (msgs,) = await page_results(chromium, p.port, "window.msgs.length === 2", "window.msgs")
        assert msgs == ["connected", "subscribed"]
        metrics = p.server.metrics
        assert metrics.http2_websockets == 1, "Chromium did not open the hub's WebSocket over HTTP/2"
        assert metrics.http2_connections == 1
    finally:
        await runner.cleanup()

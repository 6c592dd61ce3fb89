"""The /dashboard page in headless Chromium: it loads, and its numbers and charts move.

Playwright drives the system's Chromium (Debian package ``chromium``), so no
browser is downloaded. Traffic is scripted two ways: real WebSocket messages
through the proxy (the message-rate chart) and calls on the server's `Metrics`
(connections, heartbeat failures, lifetimes), which the transport will make
itself once its counter calls are wired.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from playwright.async_api import async_playwright

SHOT_DIR = Path(tempfile.gettempdir()) / "edgeproxy-dashboard"


async def text_becomes(page, element_id: str, expected: str, timeout: float = 10.0) -> None:
    await page.wait_for_function(
        "([id, want]) => document.getElementById(id).textContent === want",
        arg=[element_id, expected], timeout=timeout * 1000,
    )


async def canvas_pixels(page, chart: str) -> str:
    return await page.evaluate(f"document.getElementById('chart-{chart}').toDataURL()")


async def test_dashboard_loads_and_moves_under_traffic(proxy, ws_backend, ws_connect, external_tool) -> None:
    chromium = external_tool("chromium", "chromium")
    p = await proxy(ws_backend)
    p.server.admin.stream_interval = 0.2
    metrics = p.server.metrics
    host, port = p.server.admin.address
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"http://{host}:{port}/dashboard")
            await page.wait_for_function("Number(document.getElementById('updates').textContent) >= 2", timeout=10000)
            assert await page.inner_text("#link") == "live"
            assert await page.inner_text("#ready") == "ready"
            assert await page.inner_text("#value-active") == "0"
            assert await page.inner_text("#value-lifetime") == "0"
            before = {chart: await canvas_pixels(page, chart) for chart in ("active", "messages", "heartbeat", "lifetime")}

            # connections: three sessions open, one closes after 7 minutes with 1006
            keys = [metrics.connection_opened("websocket", "*/", "app", f"127.0.0.1:{ws_backend.port}") for _ in range(3)]
            await text_becomes(page, "value-active", "3")
            metrics.connection_closed(keys[0], 420.0, 1006)
            await text_becomes(page, "value-active", "2")
            await text_becomes(page, "value-lifetime", "1")
            # heartbeats
            metrics.heartbeat_failed()
            metrics.heartbeat_failed()
            await text_becomes(page, "value-heartbeat-total", "2")
            # real messages through the proxy: the message rate leaves zero
            ws = await ws_connect(p.ws_url("/echo"))
            for i in range(50):
                await ws.send(f"tick {i}")
                await ws.recv()
            await page.wait_for_function(
                "Number(document.getElementById('chart-messages').dataset.max) > 0", timeout=10000
            )
            await asyncio.sleep(0.5)  # let the charts take a few more points
            after = {chart: await canvas_pixels(page, chart) for chart in before}
            for chart in before:
                assert after[chart] != before[chart], f"the {chart} chart did not change"
            assert await page.inner_text("#implementation") in ("compiled extension active", "pure Python (no compiled extension)")

            SHOT_DIR.mkdir(exist_ok=True)
            shot = SHOT_DIR / f"dashboard-{os.getpid()}.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            print(f"dashboard screenshot: {shot}")
            assert errors == []
        finally:
            await browser.close()


async def test_dashboard_shows_draining(proxy, ws_backend, external_tool) -> None:
    chromium = external_tool("chromium", "chromium")
    p = await proxy(ws_backend)
    p.server.admin.stream_interval = 0.1
    host, port = p.server.admin.address
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            await page.goto(f"http://{host}:{port}/dashboard")
            await text_becomes(page, "ready", "ready")
            p.server.ready = False
            await text_becomes(page, "ready", "draining")
        finally:
            await browser.close()


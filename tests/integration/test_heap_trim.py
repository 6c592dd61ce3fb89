"""The server runs the heap trimmer from its tick, with the interval of ``[limits] heap_trim_interval``."""

from __future__ import annotations

import asyncio

from edgeproxy.config import parse_config
from edgeproxy.transport import heap


async def test_the_tick_trims_and_a_reload_can_turn_it_off(ws_backend, proxy, monkeypatch):
    trims = []
    monkeypatch.setattr(heap, "_glibc", lambda: (lambda pad: trims.append(pad) or 1, lambda: heap._MallInfo2(fordblks=1 << 30)))
    # short timeouts make the shared tick short (a quarter of the shortest)
    p = await proxy(ws_backend, limits={"heap_trim_interval": 0.2}, http={"header_timeout": 0.4})
    assert p.server.heap.active
    await asyncio.sleep(1.0)
    assert trims and p.server.metrics.heap_trims == len(trims)
    text = p.config_text.replace("heap_trim_interval = 0.2", "heap_trim_interval = 0")
    assert text != p.config_text
    assert "limits" in (await p.server.reload(parse_config(text)))["changed"]
    assert not p.server.heap.active
    done = len(trims)
    await asyncio.sleep(0.5)
    assert len(trims) == done

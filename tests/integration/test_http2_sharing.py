"""HTTP/2 streams sharing one connection: the connection window shared out fairly, and trailers both ways.

Real upstreams (the aiohttp backend, a raw HTTP/1.1 one for byte-exact trailers)
behind an h2c listener; the clients are h2 driven by hand (to hold the windows)
and httpx.
"""

from __future__ import annotations

import h2.events
import h2.settings

from tests.integration.test_http2_hostile import H2C, Client, _eventually

MiB = 1024 * 1024


def _connection(p):
    from edgeproxy.transport.http2 import Http2Connection
    (conn,) = [c for c in p.server.connections if isinstance(c, Http2Connection)]
    return conn


def _data(client: Client, sid: int) -> int:
    return sum(e.flow_controlled_length for e in client.events
               if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)


async def test_a_small_response_finishes_while_a_large_one_waits_on_the_connection_window(http_backend, proxy):
    p = await proxy(http_backend, listeners=H2C)
    # Stream windows of 16 MiB: only the connection window (65535, opened by hand below) binds.
    client = await Client.open(p.port, {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16 * MiB})
    await client.until(lambda e: isinstance(e, h2.events.SettingsAcknowledged))
    big = client.request(f"/stream?size={4 * MiB}")
    await client.until(lambda e: _data(client, big) >= 65535)
    conn = _connection(p)
    assert await _eventually(lambda: conn.h2.buffered(big) > 0)  # more of it queued behind the window
    small = client.request("/head")
    await client.until(lambda e: isinstance(e, h2.events.ResponseReceived) and e.stream_id == small)
    assert await _eventually(lambda: conn.h2.buffered(small) == 1234)
    # The client reads on and opens the connection window by two frames' worth.
    client.h2.increment_flow_control_window(16384)
    client.h2.increment_flow_control_window(16384)
    client.flush()
    ended = await client.until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == small)
    assert ended is not None
    assert _data(client, small) == 1234
    assert not any(isinstance(e, h2.events.StreamEnded) and e.stream_id == big for e in client.events)
    assert _data(client, big) <= 65535 + 2 * 16384
    assert conn.h2.buffered(big) > 0  # still blocked on the client's window
    client.close()

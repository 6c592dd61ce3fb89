"""The 30-second partition: a subscriber cut off at the network level, then resumed.

This test REALLY LASTS about 40 seconds (30 of them black-holed); it is marked
``partition`` so it can be deselected while iterating (``-m "not partition"``).

A small TCP relay sits between the `HubClient` and the proxy.  Black-holing holds
every byte in both directions and every FIN, as a dead link would: neither side
gets a close, so each must notice the silence by itself (the hub by missing pongs,
the client by missing pings).  While it lasts, publications go on; afterwards the
client has every publication exactly once and in order.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from edgeproxy.client import HubClient, hub_backoff

API_KEY = "partition-api-key-0123456789"
PARTITION_SECONDS = 30.0


class _Side(asyncio.Protocol):
    """One socket of a relayed pair; bytes and EOF go to ``peer`` unless black-holed."""

    def __init__(self, relay: Relay):
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.held: list[bytes | None] = []  # None = the EOF/close of this side

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._pass(data)

    def eof_received(self) -> bool:
        self._pass(None)
        return True

    def connection_lost(self, exc) -> None:
        self._pass(None)

    def _pass(self, item: bytes | None) -> None:
        if self.relay.blackholed or self.peer is None or self.held:
            self.held.append(item)
        else:
            self._deliver(item)

    def _deliver(self, item: bytes | None) -> None:
        peer = self.peer.transport
        if peer.is_closing():
            return
        if item is None:
            peer.close()
        else:
            peer.write(item)

    def flush(self) -> None:
        held, self.held = self.held, []
        for item in held:
            self._deliver(item)


class Relay:
    """A TCP relay to ``target`` that can black-hole traffic both ways without closing."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.blackholed = False
        self.sides: list[_Side] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.get_running_loop().create_server(self._accept, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    def _accept(self) -> _Side:
        client = _Side(self)
        self.sides.append(client)
        asyncio.get_running_loop().create_task(self._connect(client))
        return client

    async def _connect(self, client: _Side) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(lambda: _Side(self), *self.target)
        self.sides.append(upstream)
        upstream.peer, client.peer = client, upstream
        if not self.blackholed:
            client.flush()

    def set_blackhole(self, on: bool) -> None:
        self.blackholed = on
        if not on:
            for side in self.sides:
                if side.peer is not None:
                    side.flush()

    async def stop(self) -> None:
        self.server.close()
        for side in self.sides:
            if side.transport is not None:
                side.transport.abort()


@pytest.mark.partition
@pytest.mark.timeout(120)
async def test_subscriber_cut_off_for_30_seconds_gets_everything_once_in_order(proxy, refused_port) -> None:
    p = await proxy(refused_port, hubs=[{"path": "/hub", "ping_interval": 1.0, "history_size": 2000,
                                         "history_ttl": 120}],
                    admin={"bind": "127.0.0.1:0", "api_key": API_KEY})
    relay = Relay((p.host, p.port))
    relay_port = await relay.start()
    admin_host, admin_port = p.server.admin.address
    client = HubClient(f"ws://127.0.0.1:{relay_port}/hub", backoff=hub_backoff(max_delay=2.0), open_timeout=3.0)
    received: list[int] = []
    stop = asyncio.Event()

    async def publisher(http: aiohttp.ClientSession) -> int:
        n = 0
        while not stop.is_set():
            n += 1
            async with http.post(f"http://{admin_host}:{admin_port}/v1/publish", data=orjson.dumps(
                    {"channel": "feed", "data": n}), headers={"Authorization": f"Bearer {API_KEY}"}) as response:
                assert response.status == 200 and (await response.json())["seq"] == n
            await asyncio.sleep(0.05)
        return n

    async def consumer() -> None:
        async for pub in client:
            assert pub.data == pub.seq
            received.append(pub.seq)

    client.start()
    consuming = asyncio.create_task(consumer())
    try:
        await client.subscribe("feed")
        await asyncio.wait_for(client.connected.wait(), 5)
        await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as http:
            publishing = asyncio.create_task(publisher(http))
            await asyncio.sleep(2.0)
            assert received, "publications flow before the partition"

            relay.set_blackhole(True)
            cut = time.monotonic()
            await asyncio.sleep(1.0)  # what the relay wrote before the cut may still land
            before = len(received)
            # The loop's timers have millisecond resolution and may wake a hair early:
            # sleep until the clock itself says the partition lasted long enough.
            while (left := PARTITION_SECONDS - (time.monotonic() - cut)) > 0:
                await asyncio.sleep(left + 0.01)
            partitioned = time.monotonic() - cut
            during = len(received) - before
            relay.set_blackhole(False)

            await asyncio.sleep(3.0)
            stop.set()
            total = await publishing
        deadline = time.monotonic() + 20
        while len(received) < total and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await client.close()
        consuming.cancel()
        await relay.stop()

    assert partitioned >= PARTITION_SECONDS
    assert during == 0, "nothing can arrive through a black hole"
    assert total > 500  # about 20 publications a second kept coming during the partition
    assert received == list(range(1, total + 1)), "every publication exactly once, in order"
    assert client.connects >= 2  # it noticed the dead link and reconnected

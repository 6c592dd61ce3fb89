"""The presence contract (``edgeproxy.transport.presence``): one suite for every engine
with a shared registry - Redis, a Redis Cluster (3 masters, 3 replicas), NATS, and a
3-node NATS cluster (replicas 3).

Each case makes several instances as separate proxies would hold them: a presence
registry, the hub backplane it may ride on (the Redis inbox does), and fake hub
connections that record what they are sent.  To add an engine, add its name to
`ENGINES` and say in `engine_config` how to reach it.  Tests skip when a service is
missing and fail instead under ``EDGEPROXY_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from types import SimpleNamespace

import orjson
import pytest

from edgeproxy.config import BackplaneConfig, HubConfig
from edgeproxy.metrics import Metrics
from edgeproxy.transport.backplanes import make_backplane
from edgeproxy.transport.presence import make_presence

ENGINES = ["redis", "redis-cluster", "nats", "nats-cluster"]
HEARTBEAT = 0.5


def engine_config(request, services, engine: str) -> dict:
    """The `BackplaneConfig` fields that reach ``engine``."""
    if engine == "nats-cluster":
        return {"kind": "nats", "urls": request.getfixturevalue("nats_cluster").urls, "replicas": 3}
    if engine == "redis-cluster":
        return {"kind": "redis-cluster", "urls": tuple(request.getfixturevalue("redis_cluster").urls)}
    return {"kind": engine, "urls": (services.require(engine),)}


class FakeConnection:
    """What presence reads of a hub connection, recording the frames it is sent."""

    def __init__(self, presence, user: str | None, hub: str = "/hub"):
        self.client_id = presence.new_id()
        self.user = user
        self.service = SimpleNamespace(config=SimpleNamespace(path=hub))
        self.got: list = []

    def send(self, frame: bytes) -> None:
        self.got.append(orjson.loads(frame))


class Instance:
    """One proxy's presence (and the hub backplane under it), started and stopped like the server does."""

    def __init__(self, config: BackplaneConfig, name: str):
        hub = HubConfig(path="/hub", history_size=10, history_ttl=60.0)
        self.metrics = Metrics()
        self.backplane = make_backplane(config, hub, self.metrics, name)
        self.server = SimpleNamespace(instance=name, config=SimpleNamespace(backplane=config), metrics=self.metrics,
                                      hubs={"/hub": SimpleNamespace(backplane=self.backplane)})
        self.presence = make_presence(self.server)
        self.name = name

    async def start(self) -> None:
        await self.backplane.start(lambda pub: None)
        await self.presence.start()

    async def stop(self) -> None:
        await self.presence.stop()
        await self.backplane.close()

    def connect(self, user: str | None) -> FakeConnection:
        conn = FakeConnection(self.presence, user)
        self.presence.add(conn)
        return conn

    def close(self, conn: FakeConnection) -> None:
        self.presence.remove(conn)


@pytest.fixture(params=ENGINES)
async def instances(request, services):
    """Factory: ``await instances(n)`` -> n started `Instance`s on the engine under test."""
    fields = engine_config(request, services, request.param)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    config = BackplaneConfig(prefix=prefix, heartbeat_interval=HEARTBEAT, timeout=2.0, reconnect_min=0.05,
                             reconnect_max=0.5, **fields)
    made: list[Instance] = []

    async def make(n: int) -> list[Instance]:
        out = [Instance(config, f"{prefix}-{chr(97 + len(made) + i)}") for i in range(n)]
        made.extend(out)
        for inst in out:
            await inst.start()
        return out

    yield make
    for inst in made:
        await inst.stop()
    urls = fields["urls"]
    await services.cleanup(fields["kind"], urls if fields["kind"] == "redis-cluster" else ",".join(urls), prefix)


async def eventually(check, timeout: float = 5.0):
    """Poll ``await check()`` until it returns something truthy (registry writes are asynchronous)."""
    async with asyncio.timeout(timeout):
        while not (result := await check()):
            await asyncio.sleep(0.02)
    return result


async def test_a_user_on_two_instances_is_found_and_sent_to_on_both(instances) -> None:
    a, b, c = await instances(3)
    alice = [b.connect("alice"), b.connect("alice"), c.connect("alice")]
    bob = a.connect("bob")
    expected = {b.name: sorted(x.client_id for x in alice[:2]), c.name: [alice[2].client_id]}
    await eventually(lambda: _equal(a.presence.lookup({"user": "alice"}), expected))
    assert await a.presence.send({"user": "alice"}, b'{"hi":1}') == expected
    async with asyncio.timeout(5):
        while not all(x.got for x in alice):
            await asyncio.sleep(0.01)
    assert [x.got for x in alice] == [[{"op": "message", "data": {"hi": 1}}]] * 3
    assert bob.got == []
    # the sender's own connections are found and written to as well
    assert await b.presence.send({"user": "bob"}, b"2") == {a.name: [bob.client_id]}
    await eventually(lambda: _true(bob.got))
    assert bob.got == [{"op": "message", "data": 2}]


async def test_a_connection_is_reached_by_id_from_another_instance(instances) -> None:
    a, b = await instances(2)
    anonymous = b.connect(None)  # no user: reachable by its id only
    other = b.connect(None)
    await eventually(lambda: _equal(a.presence.lookup({"client": anonymous.client_id}),
                                    {b.name: [anonymous.client_id]}))
    assert await a.presence.send({"client": anonymous.client_id}, b'"only you"') == {b.name: [anonymous.client_id]}
    await eventually(lambda: _true(anonymous.got))
    assert anonymous.got == [{"op": "message", "data": "only you"}] and other.got == []
    assert await a.presence.send({"client": f"{b.name}.999999"}, b"1") == {}  # a live instance, no such connection


async def test_nobody_and_a_closed_connection_are_not_found(instances) -> None:
    a, b = await instances(2)
    assert await a.presence.lookup({"user": "nobody"}) == {}
    assert await a.presence.send({"user": "nobody"}, b"1") == {}
    assert await a.presence.send({"client": "no-such-instance.1"}, b"1") == {}
    first, second = b.connect("dave"), b.connect("dave")
    await eventually(lambda: _equal(a.presence.lookup({"user": "dave"}),
                                    {b.name: sorted([first.client_id, second.client_id])}))
    b.close(first)
    await eventually(lambda: _equal(a.presence.lookup({"user": "dave"}), {b.name: [second.client_id]}))
    assert await a.presence.send({"client": first.client_id}, b"1") == {}
    b.close(second)
    await eventually(lambda: _equal(a.presence.lookup({"user": "dave"}), {}))
    assert first.got == [] and second.got == []


async def test_a_dead_instance_is_fenced_within_a_heartbeat(instances) -> None:
    """An instance that stops beating (hung, cut off, killed) vanishes from every answer
    once its liveness entry expires - one interval after its last beat - although its
    connections' own entries are still there (and it could still answer)."""
    a, b, c = await instances(3)
    carol_b, carol_c = b.connect("carol"), c.connect("carol")
    await eventually(lambda: _equal(a.presence.lookup({"user": "carol"}),
                                    {b.name: [carol_b.client_id], c.name: [carol_c.client_id]}))
    c.presence._beat.cancel()  # c stops beating; it does not delete anything
    stopped = time.monotonic()
    await eventually(lambda: _equal(a.presence.lookup({"user": "carol"}), {b.name: [carol_b.client_id]}),
                     timeout=HEARTBEAT + 2.0)
    fenced_after = time.monotonic() - stopped
    assert await a.presence.lookup({"client": carol_c.client_id}) == {}
    assert await a.presence.send({"user": "carol"}, b"1") == {b.name: [carol_b.client_id]}
    # within one interval of the last beat (at most half an interval before the cancel), plus slack
    assert fenced_after < HEARTBEAT + 1.0, fenced_after


async def test_an_instance_shut_down_is_gone_at_once(instances) -> None:
    a, b = await instances(2)
    erin = b.connect("erin")
    await eventually(lambda: _equal(a.presence.lookup({"user": "erin"}), {b.name: [erin.client_id]}))
    await b.presence.stop()  # deletes its liveness entry
    assert await a.presence.lookup({"user": "erin"}) == {}
    assert await a.presence.send({"client": erin.client_id}, b"1") == {}


async def test_the_hub_of_a_target_is_respected(instances) -> None:
    a, b = await instances(2)
    frank = b.connect("frank")
    await eventually(lambda: _equal(a.presence.lookup({"user": "frank"}), {b.name: [frank.client_id]}))
    await a.presence.send({"user": "frank", "hub": "/other"}, b"1")
    await a.presence.send({"user": "frank", "hub": "/hub"}, b"2")
    await eventually(lambda: _true(frank.got))
    await asyncio.sleep(0.1)
    assert frank.got == [{"op": "message", "data": 2}]


async def _equal(answer, expected) -> bool:
    return await answer == expected


async def _true(value) -> bool:
    return bool(value)

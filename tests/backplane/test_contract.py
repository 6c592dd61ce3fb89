"""The backplane contract (``edgeproxy.hub.backplane``), one suite for memory, Redis,
Redis Cluster, NATS and a NATS cluster.

Redis and NATS are the real servers of this machine (each test under its own prefix,
removed after); Redis Cluster is a real 6-node cluster on loopback (the session's
``redis_cluster``), "nats-cluster" a private cluster of three nats-server processes
on loopback (``tests/conftest.py`` `NatsCluster`), the streams with 3 replicas.  A
test skips when its service is absent and fails instead under
``EDGEPROXY_REQUIRE_SERVICES=1``.  Tests of several nodes make one adapter per node,
as separate proxies would.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from edgeproxy.config import BackplaneConfig, HubConfig
from edgeproxy.hub.protocol import Position, Publication
from edgeproxy.metrics import Metrics
from edgeproxy.transport.backplanes import BackplaneUnavailable, make_backplane
from tests.conftest import cleanup_backplane

KINDS = ["memory", "redis", "redis-cluster", "nats", "nats-cluster"]
NETWORK = ["redis", "redis-cluster", "nats", "nats-cluster"]


class Node:
    """One backplane as a proxy would hold it, recording what it delivers."""

    def __init__(self, backplane):
        self.backplane = backplane
        self.got: list[Publication] = []

    def seqs(self, channel: str) -> list[int]:
        return [p.seq for p in self.got if p.channel == channel]

    async def wait(self, channel: str, n: int, timeout: float = 5.0) -> list[int]:
        async with asyncio.timeout(timeout):
            while len(self.seqs(channel)) < n:
                await asyncio.sleep(0.005)
        return self.seqs(channel)


@pytest.fixture
async def nodes(request, services):
    """Factory: ``await nodes(n, **hub_keys)`` -> n started `Node`s of the kind under test."""
    kind = request.param
    engine, replicas = kind, 1
    if kind == "nats-cluster":
        engine, replicas = "nats", 3
        url = tuple(request.getfixturevalue("nats_cluster").urls)
    elif kind == "redis-cluster":
        url = tuple(request.getfixturevalue("redis_cluster").urls)
    else:
        url = (services.require(kind),) if kind != "memory" else None
    prefix = f"t{uuid.uuid4().hex[:12]}"
    made: list[Node] = []

    async def make(n: int = 1, *, url_override: str | None = None, **hub_keys) -> list[Node]:
        hub = HubConfig(path="/hub", **{"history_size": 100, "history_ttl": 60.0, **hub_keys})
        urls = tuple(url_override.split(",")) if url_override else (url or ())
        config = BackplaneConfig(kind=engine, urls=urls, replicas=replicas, prefix=prefix, timeout=2.0,
                                 reconnect_min=0.05, reconnect_max=0.5)
        out = []
        for i in range(n):
            node = Node(make_backplane(config, hub, Metrics(), f"node{i}"))
            await node.backplane.start(node.got.append)
            out.append(node)
        made.extend(out)
        return out

    make.kind, make.engine = kind, engine
    yield make
    for node in made:
        await node.backplane.close()
    if url is not None:
        await services.cleanup(engine, url if kind == "redis-cluster" else ",".join(url), prefix)


all_kinds = pytest.mark.parametrize("nodes", KINDS, indirect=True)
network_kinds = pytest.mark.parametrize("nodes", NETWORK, indirect=True)


@all_kinds
async def test_publish_numbers_and_history_answers(nodes) -> None:
    [node] = await nodes(1, history_size=3)
    bp = node.backplane
    first = await bp.history("news", None)
    assert first.position.seq == 0 and first.missed == [] and first.recovered is False
    epoch = first.position.epoch
    assert [await bp.publish("news", b"%d" % i) for i in range(1, 6)] == [Position(i, epoch) for i in range(1, 6)]
    now = await bp.history("news", Position(3, epoch))
    assert now == ((5, epoch), [(4, b"4"), (5, b"5")], True)
    assert await bp.history("news", Position(5, epoch)) == ((5, epoch), [], True)
    assert (await bp.history("news", Position(1, epoch))).recovered is False  # 2 was pushed out (size 3)
    assert (await bp.history("news", Position(3, "another"))).recovered is False
    assert (await bp.history("news", Position(9, epoch))).recovered is False  # ahead of the channel
    assert (await bp.history("news", None)).position == Position(5, epoch)


@network_kinds
async def test_a_burst_beyond_the_connection_pool_waits_instead_of_failing(nodes) -> None:
    # A drain or a reconnect wave makes hundreds of backplane calls at once; with redis-py's
    # default pool (100 connections) the calls beyond it failed at once with "Too many connections".
    [node] = await nodes(1, history_size=1000)
    bp = node.backplane
    epoch = (await bp.history("burst", None)).position.epoch
    n = 350
    positions = await asyncio.gather(*(bp.publish("burst", b"%d" % i) for i in range(n)),
                                     *(bp.history("burst", None) for _ in range(n)))
    assert sorted(p.seq for p in positions[:n]) == list(range(1, n + 1))
    assert all(p.epoch == epoch for p in positions[:n])
    assert (await bp.history("burst", None)).position == Position(n, epoch)


@all_kinds
async def test_interest_order_and_unsubscribe(nodes) -> None:
    [node] = await nodes(1)
    bp = node.backplane
    await bp.publish("a", b"before")  # nobody interested: not delivered
    await bp.subscribe("a")
    for i in range(50):
        await bp.publish("a", b"x")
    await bp.publish("b", b"other channel")
    assert await node.wait("a", 50) == list(range(2, 52))
    assert node.seqs("b") == []
    await bp.unsubscribe("a")
    await bp.publish("a", b"after")
    await asyncio.sleep(0.1)
    assert len(node.seqs("a")) == 50


@all_kinds
async def test_stored_before_delivered(nodes) -> None:
    """Whatever is delivered is already in history (point 2)."""
    [node] = await nodes(1)
    bp = node.backplane
    checks: list[asyncio.Task] = []
    node.backplane._deliver = lambda pub: checks.append(asyncio.ensure_future(bp.history(pub.channel, None)))
    await bp.subscribe("c")
    for _ in range(20):
        await bp.publish("c", b"x")
    async with asyncio.timeout(5):
        while len(checks) < 20:
            await asyncio.sleep(0.005)
    tops = [(await task).position.seq for task in checks]
    assert all(top >= seq for seq, top in zip(range(1, 21), tops))


@all_kinds
async def test_history_ttl_expires(nodes) -> None:
    [node] = await nodes(1, history_ttl=1.0)
    bp = node.backplane
    p1 = await bp.publish("t", b"1")
    await bp.publish("t", b"2")
    assert (await bp.history("t", Position(0, p1.epoch))).missed == [(1, b"1"), (2, b"2")]
    await asyncio.sleep(2.2)
    late = await bp.history("t", Position(1, p1.epoch))
    assert late.recovered is False and late.missed == []


@network_kinds
async def test_every_node_gets_every_publication_once_in_order(nodes) -> None:
    """Three nodes publish concurrently to one channel: one seq order, seen by all."""
    group = await nodes(3)
    for node in group:
        await node.backplane.subscribe("room")
    async def burst(node, n):
        return [await node.backplane.publish("room", b"%s" % node.backplane.instance.encode()) for _ in range(n)]
    results = await asyncio.gather(*(burst(node, 40) for node in group))
    seqs = sorted(p.seq for r in results for p in r)
    assert seqs == list(range(1, 121))  # consistent across instances: no seq twice
    assert len({p.epoch for r in results for p in r}) == 1
    for node in group:
        assert await node.wait("room", 120) == list(range(1, 121))


@network_kinds
async def test_resume_on_another_node(nodes) -> None:
    a, b = await nodes(2)
    await a.backplane.subscribe("feed")
    positions = [await a.backplane.publish("feed", b"%d" % i) for i in range(10)]
    await a.wait("feed", 10)
    # a client saw 4 on node a, then resumes on node b
    answer = await b.backplane.history("feed", positions[3])
    assert answer.recovered and [s for s, _ in answer.missed] == list(range(5, 11))
    assert answer.position == positions[-1]


@network_kinds
async def test_interest_is_per_node(nodes) -> None:
    a, b = await nodes(2)
    await a.backplane.subscribe("only-a")
    await b.backplane.publish("only-a", b"1")
    await a.wait("only-a", 1)
    await asyncio.sleep(0.1)
    assert b.got == []
    name = a.backplane._keys("only-a")[2] if nodes.kind.startswith("redis") else None
    if nodes.kind == "redis":
        client = a.backplane.shards[0].client
        assert (await client.pubsub_numsub(name)) == [(name.encode(), 1)]  # only node a subscribed in Redis
    elif nodes.kind == "redis-cluster":
        # a sharded subscription, on the master owning the channel's slot only
        owner = a.backplane.client.get_node_from_key(name)
        for node in a.backplane.client.get_primaries():
            answer = await a.backplane.client.execute_command("PUBSUB", "SHARDNUMSUB", name, target_nodes=node)
            assert answer == [name.encode(), 1 if node.name == owner.name else 0], node.name


@network_kinds
async def test_lost_state_starts_a_new_epoch(nodes, services) -> None:
    [node] = await nodes(1)
    bp = node.backplane
    await bp.subscribe("e")
    old = await bp.publish("e", b"1")
    await node.wait("e", 1)
    # the channel's state disappears (expired, or a server without persistence restarted)
    if nodes.kind == "redis":
        await bp.shards[0].client.delete(*bp._keys("e")[:2])
    elif nodes.kind == "redis-cluster":
        await bp.client.delete(*bp._keys("e")[:2])
    else:
        await bp.js.purge_stream(bp.stream, subject=bp.history_base + "e")
        bp.last.clear()
    new = await bp.publish("e", b"2")
    assert new.seq == 1 and new.epoch != old.epoch
    async with asyncio.timeout(5):
        while len(node.got) < 2:
            await asyncio.sleep(0.005)
    assert node.got[1] == Publication("e", 1, new.epoch, b"2")
    assert (await bp.history("e", old)).recovered is False


@pytest.mark.parametrize("nodes", ["redis", "nats", "nats-cluster"], indirect=True)  # redis-cluster: test_redis_cluster.py
async def test_unreachable_backplane_fails_loudly(nodes, server_process, private_nats_cluster) -> None:
    server = private_nats_cluster() if nodes.kind == "nats-cluster" else server_process(nodes.kind)
    [node] = await nodes(1, url_override=server.url)
    bp = node.backplane
    assert (await bp.publish("x", b"1")).seq == 1
    server.stop() if nodes.kind == "nats-cluster" else server.kill()
    with pytest.raises(BackplaneUnavailable):
        for _ in range(50):  # the first may still be in flight when the socket breaks
            await bp.publish("x", b"2")
            await asyncio.sleep(0.02)
    assert bp.metrics.backplane_errors >= 1
    assert bp.up is False


async def test_redis_shards_place_each_tenant_on_one_real_server(server_process) -> None:
    """Two private redis-servers as shards: a tenant's channels live on the shard the
    hash names, and subscribers on two nodes get publications of every shard in order."""
    import redis.asyncio as aioredis

    from edgeproxy.hub.shards import shard_of

    shards = [server_process("redis"), server_process("redis")]
    urls = tuple(s.url for s in shards)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    hub = HubConfig(path="/hub", history_size=100, history_ttl=60.0)
    config = BackplaneConfig(kind="redis", urls=urls, prefix=prefix, timeout=2.0, reconnect_min=0.05, reconnect_max=0.5)
    nodes = [Node(make_backplane(config, hub, Metrics(), f"node{i}")) for i in range(2)]
    for node in nodes:
        await node.backplane.start(node.got.append)
    try:
        # Tenants that the hash puts on each shard (the part of the name before ':').
        tenants = {0: None, 1: None}
        for i in range(100):
            tenant = f"tenant{i}"
            tenants[shard_of(f"{tenant}:x", 2)] = tenants[shard_of(f"{tenant}:x", 2)] or tenant
        assert None not in tenants.values()
        channels = [f"{tenants[0]}:orders", f"{tenants[0]}:chat", f"{tenants[1]}:orders"]
        for channel in channels:
            await nodes[1].backplane.subscribe(channel)
        for round_ in range(5):
            for channel in channels:
                await nodes[0].backplane.publish(channel, b"%d" % round_)
        for channel in channels:
            assert await nodes[1].wait(channel, 5) == [1, 2, 3, 4, 5]
        # Each shard holds exactly its tenant's keys.
        for index, shard in enumerate(shards):
            client = aioredis.Redis.from_url(shard.url)
            try:
                keys = [k.decode() for k in await client.keys(f"{prefix}:*:ch:*")]
            finally:
                await client.aclose()
            assert keys and all(tenants[index] + ":" in key for key in keys), (index, keys)
            assert not any(tenants[1 - index] + ":" in key for key in keys)
    finally:
        for node in nodes:
            await node.backplane.close()


async def test_nats_cluster_publisher_fails_over_when_its_server_is_killed(private_nats_cluster) -> None:
    """The server a publishing node is connected to is SIGKILLed: its publishes fail
    (BackplaneUnavailable) until it has reconnected to another server of the cluster,
    then go on in the same epoch; a node on another server gets every seq once."""
    servers = private_nats_cluster()
    prefix = f"t{uuid.uuid4().hex[:12]}"
    hub = HubConfig(path="/hub", history_size=100, history_ttl=60.0)
    config = BackplaneConfig(kind="nats", urls=servers.urls, replicas=3, prefix=prefix, timeout=1.0,
                             reconnect_min=0.05, reconnect_max=0.3)
    made = []
    try:
        for i in range(8):  # until two nodes sit on different servers (nats-py shuffles the urls)
            node = Node(make_backplane(config, hub, Metrics(), f"node{i}"))
            await node.backplane.start(node.got.append)
            made.append(node)
            ports = {n.backplane.nc.connected_url.port for n in made}
            if len(ports) > 1:
                break
        publisher = made[0]
        victim = servers.client_ports.index(publisher.backplane.nc.connected_url.port)
        watcher = next(n for n in made if n.backplane.nc.connected_url.port != servers.client_ports[victim])
        await watcher.backplane.subscribe("ha")
        first = [await publisher.backplane.publish("ha", b"%d" % i) for i in range(10)]
        servers.kill(victim)
        refused, after = 0, []
        async with asyncio.timeout(30):
            while len(after) < 10:
                try:
                    after.append(await publisher.backplane.publish("ha", b"x"))
                except BackplaneUnavailable:
                    refused += 1
                    await asyncio.sleep(0.05)
        assert refused > 0 and publisher.backplane.up
        assert publisher.backplane.nc.connected_url.port != servers.client_ports[victim]
        assert {p.epoch for p in first + after} == {first[0].epoch}
        top = after[-1].seq
        assert sorted({p.seq for p in after}) == [p.seq for p in after]  # increasing
        assert await watcher.wait("ha", top, timeout=20) == list(range(1, top + 1))
    finally:
        for node in made:
            await node.backplane.close()


@pytest.mark.parametrize("slot_by", ["channel", "tenant"])
async def test_redis_cluster_puts_each_channel_on_one_slot(cluster_nodes, slot_by) -> None:
    """The meta, the log and the shard channel of a channel share a slot (so the publish
    script is legal); with slot_by = "tenant" so do all channels of a tenant."""
    from edgeproxy.transport.redis_cluster import key_slot

    a, b = await cluster_nodes(2, slot_by=slot_by)
    channels = [f"tenant{i}:{name}" for i in range(6) for name in ("orders", "chat")] + [":lonely", "plain"]
    slots = {}
    for channel in channels:
        keys = a.backplane._keys(channel)
        assert len({key_slot(k.encode()) for k in keys}) == 1, keys
        assert a.backplane._channel_of(keys[2].encode()) == channel
        slots[channel] = key_slot(keys[0].encode())
    if slot_by == "tenant":
        assert all(slots[f"tenant{i}:orders"] == slots[f"tenant{i}:chat"] for i in range(6))
    assert len(set(slots.values())) > 3  # spread over the cluster either way
    for channel in channels:
        await b.backplane.subscribe(channel)
    for round_ in range(3):
        for channel in channels:
            assert (await a.backplane.publish(channel, b"%d" % round_)).seq == round_ + 1
    for channel in channels:
        assert await b.wait(channel, 3) == [1, 2, 3]
    # the keys are where the names say: the master owning the slot holds them
    for channel in channels:
        meta = a.backplane._keys(channel)[0]
        owner = a.backplane.client.get_node_from_key(meta)
        assert await a.backplane.client.execute_command("EXISTS", meta, target_nodes=owner) == 1


async def test_redis_cluster_manual_failover_moves_the_feed(redis_cluster, cluster_nodes, caplog) -> None:
    """A graceful failover (CLUSTER FAILOVER on the replica): the old master drops the
    sharded subscription (SUNSUBSCRIBE), the node follows the slot to the new master and
    fills what it missed from history: every publication once, in order."""
    a, b = await cluster_nodes(2)
    await b.backplane.subscribe("moving")
    name = a.backplane._keys("moving")[2]
    master = redis_cluster.master_of(name)
    replica = next(int(line.split()[1].split(":")[1].split("@")[0])
                   for line in redis_cluster.cli_call(master, "cluster", "replicas",
                                                      redis_cluster.cli_call(master, "cluster", "myid").strip())
                   .splitlines() if line.strip())
    published = 0

    async def publish_some(n: int) -> None:
        nonlocal published
        for _ in range(n):
            for _ in range(500):
                try:
                    await a.backplane.publish("moving", b"%d" % published)
                    break
                except BackplaneUnavailable:
                    await asyncio.sleep(0.02)
            else:
                raise AssertionError("publishing did not resume")
            published += 1

    await publish_some(10)
    caplog.set_level("WARNING", "edgeproxy")
    await asyncio.to_thread(redis_cluster.cli_call, replica, "cluster", "failover")
    await publish_some(20)
    assert redis_cluster.master_of(name) == replica
    assert await b.wait("moving", 30, timeout=15) == list(range(1, 31))
    await asyncio.sleep(0.2)
    assert b.seqs("moving") == list(range(1, 31))
    assert any("the cluster moved shard channel" in r.getMessage() for r in caplog.records)


async def test_redis_cluster_own_sunsubscribe_is_not_taken_for_a_moved_slot(cluster_nodes) -> None:
    """Interest flapping (unsubscribe, subscribe again before Redis confirmed the first):
    the confirmation of our own SUNSUBSCRIBE is no outage."""
    a, b = await cluster_nodes(2)
    for _ in range(5):
        await b.backplane.subscribe("flap")
        await b.backplane.unsubscribe("flap")
    await b.backplane.subscribe("flap")
    await a.backplane.publish("flap", b"x")
    assert (await b.wait("flap", 1)) == [1]
    await asyncio.sleep(0.2)
    assert b.backplane.up and b.backplane.metrics.backplane_errors == 0 and not b.backplane._leaving


@pytest.fixture
async def cluster_nodes(redis_cluster):
    """Factory: ``await cluster_nodes(n, slot_by=...)`` -> n started `Node`s on the session's Redis Cluster."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    made: list[Node] = []

    async def make(n: int, slot_by: str = "channel") -> list[Node]:
        hub = HubConfig(path="/hub", history_size=100, history_ttl=60.0)
        config = BackplaneConfig(kind="redis-cluster", urls=redis_cluster.urls, prefix=prefix, timeout=2.0,
                                 reconnect_min=0.05, reconnect_max=0.5, slot_by=slot_by)
        for i in range(n):
            node = Node(make_backplane(config, hub, Metrics(), f"node{i}"))
            await node.backplane.start(node.got.append)
            made.append(node)
        return made[-n:]

    yield make
    for node in made:
        await node.backplane.close()
    await cleanup_backplane("redis-cluster", redis_cluster.urls, prefix)

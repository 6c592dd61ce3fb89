"""The Redis Cluster backplane: the Redis scripts on one slot, sharded pub/sub per master.

Theory of operation
===================

``[backplane] kind = "redis-cluster"`` with ``urls`` = seed nodes.  The cluster owns
placement, failover and rebalancing; edgeproxy only makes every operation of one
channel single-slot, so it runs on the one master owning that slot:

=============================  ============================================================
``P:N:ch:{C}:meta``            as on Redis (`edgeproxy.transport.redis_backplane`): epoch
``P:N:ch:{C}:log``             and last seq; the history stream
``P:N:ch:{C}``                 the *shard* channel (``SPUBLISH``/``SSUBSCRIBE``)
=============================  ============================================================

``{C}`` is the Redis Cluster hash tag: only the part in braces is hashed, so the
three names share one slot and the publish script (``HINCRBY`` + ``XADD`` +
``SPUBLISH``) is legal and atomic there.  With ``slot_by = "tenant"`` the tag is the
tenant only (``acme:orders`` -> ``P:N:ch:{acme}:orders``): a tenant's channels share
one slot, as ``urls`` sharding keeps them on one server.  Channel names cannot hold
braces (`edgeproxy.hub.protocol`); a channel whose tenant is empty (``:x``) is tagged
by its whole name.

**Commands** (the two scripts, the position read) go through redis-py's
`RedisCluster`, which routes by slot, follows ``MOVED``/``ASK`` and refreshes its
slot map after a failure.  At most `REDIS_POOL_SIZE` commands are in flight (the
cluster client fails extra ones at once instead of queueing them).

**Feeds.**  Sharded pub/sub is delivered only by the master owning the channel's
slot, so each master gets its own pub/sub connection (a plain redis-py `PubSub`
on that node, the same reader as on Redis), and a channel is ``SSUBSCRIBE``\\ d on the
connection of the node the slot map names.  A publication's traffic touches only
that shard.  Everything that moves a slot ends up as one of: the node's connection
breaks (a master died), Redis ``SUNSUBSCRIBE``\\ s the channel by itself (the slot
moved, or the master became a replica), or ``SSUBSCRIBE`` answers ``MOVED``.  Each is
handled as a lost feed (`NetworkBackplane.lost`): publishes answer 503, the
reconnect loop re-reads the slot map (retrying while the failover is still
running), subscribes every channel again on its new owner and fills each from its
last delivered seq out of history, so subscribers miss nothing history holds and
get nothing twice (the `Orderer` drops seqs already delivered).

The outage is the whole backplane's, not the one shard's: while one master fails
over, this instance answers 503 to publications on every channel (about 3 s with
``cluster-node-timeout 1000``), not only on the channels of the failed slots.

Replication in Redis is asynchronous: a publication that the dying master ran
but had not yet sent to its replica is gone with it (Redis's own guarantee; a
publisher that got its answer had it stored on the master only).  The new master
then numbers the next publication with that seq again, and a subscriber that had
heard the lost one keeps it and takes the new one for a repeat.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot

from edgeproxy.hub.shards import tenant_of
from edgeproxy.transport.redis_backplane import HISTORY, PUBLISH, REDIS_POOL_SIZE, RedisBackplane, _Shard

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from edgeproxy.config import BackplaneConfig, HubConfig
    from edgeproxy.metrics import Metrics

__all__ = ["RedisClusterBackplane", "cluster_client", "hash_tagged", "key_slot", "node_url"]

log = logging.getLogger("edgeproxy")

#: the publish script with the sharded publish: the shard channel is in the script's slot
SHARDED_PUBLISH = PUBLISH.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
assert SHARDED_PUBLISH != PUBLISH


def cluster_client(urls: tuple[str, ...], timeout: float) -> RedisCluster:
    """A cluster client from seed URLs (validated to agree on TLS, credentials, db 0).

    Retries are few and short (a command during a failover fails within about
    `timeout`, and the caller answers 503); each node's pool holds
    `REDIS_POOL_SIZE` connections.
    """
    first = urlsplit(urls[0])
    return RedisCluster(
        startup_nodes=[ClusterNode(urlsplit(u).hostname, urlsplit(u).port) for u in urls],
        username=first.username, password=first.password, ssl=first.scheme == "rediss",
        socket_timeout=timeout, socket_connect_timeout=timeout, max_connections=REDIS_POOL_SIZE,
        retry=Retry(ExponentialBackoff(cap=timeout / 4, base=0.05), 2), decode_responses=False,
    )


def node_url(urls: tuple[str, ...], host: str, port: int) -> str:
    """The URL of one cluster node, with the seeds' scheme and credentials."""
    first = urlsplit(urls[0])
    auth = ""
    if first.username or first.password:
        auth = f"{quote(first.username or '', safe='')}:{quote(first.password or '', safe='')}@"
    return f"{first.scheme}://{auth}{host}:{port}/0"


def hash_tagged(base: str, channel: str, slot_by: str) -> str:
    """``base`` + the channel with its hash tag (see the module doc)."""
    tenant = tenant_of(channel)
    if slot_by == "tenant" and tenant:
        return f"{base}{{{tenant}}}{channel[len(tenant):]}"
    return f"{base}{{{channel}}}"


class _Commands:
    """The scripts on the cluster client, at most `REDIS_POOL_SIZE` calls at once."""

    def __init__(self, client: RedisCluster):
        self.client = client
        self._publish = client.register_script(SHARDED_PUBLISH)
        self._history = client.register_script(HISTORY)
        self._slots = asyncio.Semaphore(REDIS_POOL_SIZE)

    async def publish(self, keys: list[str], args: list) -> list:
        async with self._slots:
            return await self._publish(keys=keys, args=args)

    async def history(self, keys: list[str], args: list) -> list:
        async with self._slots:
            return await self._history(keys=keys, args=args)


class RedisClusterBackplane(RedisBackplane):
    """`Backplane` on a Redis Cluster; see the module doc."""

    kind = "redis-cluster"
    MESSAGE, SUBSCRIBED, UNSUBSCRIBED = "smessage", "ssubscribe", "sunsubscribe"

    def __init__(self, config: BackplaneConfig, hub: HubConfig, metrics: Metrics, instance: str):
        super().__init__(config, hub, metrics, instance, shards=False)
        self.client = cluster_client(config.urls, config.timeout)
        self.commands = _Commands(self.client)
        #: node name ("host:port") -> the pub/sub connection to that master
        self.feeds: dict[str, _Shard] = {}
        #: shard channel -> SUNSUBSCRIBEs this adapter sent and Redis has not confirmed yet
        self._leaving: dict[bytes, int] = {}
        self._started = False

    # -- names -----------------------------------------------------------------------

    def _keys(self, channel: str) -> list[str]:
        name = hash_tagged(self.base, channel, self.config.slot_by)
        return [name + ":meta", name + ":log", name]

    def _channel_of(self, name: bytes) -> str:
        # drop the braces of the hash tag: the first "{" after the base and the first "}"
        rest = name[len(self._base_bytes) + 1:]
        close = rest.index(b"}")
        return (rest[:close] + rest[close + 1:]).decode()

    def shard(self, channel: str) -> _Shard:
        return self._feed_of(self._keys(channel)[2])

    def _feed_of(self, name: str) -> _Shard:
        node = self.client.get_node_from_key(name)
        feed = self.feeds.get(node.name) if node is not None else None
        if feed is None:
            # the slot map changed since the feeds were opened: reconnect against the new one
            raise ConnectionError(f"no pub/sub connection to the owner of {name!r} (the slot map changed)")
        return feed

    def _commands(self, channel: str) -> _Commands:
        return self.commands

    # -- connection ------------------------------------------------------------------

    async def _connect(self) -> None:
        if self._started:
            await self.client.nodes_manager.initialize()  # re-read the slot map (failover, resharding)
        else:
            await self.client.initialize()
            self._started = True
        loop = asyncio.get_running_loop()
        for node in self.client.get_primaries():
            feed = _Shard(node_url(self.config.urls, node.host, node.port), self.config.timeout)
            self.feeds[node.name] = feed
            feed.pubsub = feed.client.pubsub(ignore_subscribe_messages=False)
            await self._confirm(feed, [])
            feed.reader = loop.create_task(self._read(feed))
        for name in self.extra_feeds:
            await self._confirm(self._feed_of(name), [name.encode()])

    async def _disconnect(self) -> None:
        feeds, self.feeds = list(self.feeds.values()), {}
        self._leaving.clear()
        for feed in feeds:  # made again by the next _connect, against the slot map of then
            await self._close_feed(feed)
            await feed.client.aclose()
        if self._closing:
            await self.client.aclose()

    async def _pubsub_subscribe(self, pubsub: aioredis.client.PubSub, names: list[bytes]) -> None:
        for name in names:  # one SSUBSCRIBE per name: several names must share a slot
            await pubsub.ssubscribe(name)

    async def _pubsub_unsubscribe(self, pubsub: aioredis.client.PubSub, name: str) -> None:
        key = name.encode()
        self._leaving[key] = self._leaving.get(key, 0) + 1
        await pubsub.sunsubscribe(name)

    def _unsubscribed(self, shard: _Shard, name: bytes) -> None:
        pending = self._leaving.get(name, 0)
        if pending:
            if pending == 1:
                del self._leaving[name]
            else:
                self._leaving[name] = pending - 1
            return
        wanted = (self._channel_of(name) in self.interest if name.startswith(self._base_bytes)
                  else name.decode() in self.extra_feeds)
        if wanted:
            # Redis dropped the subscription by itself: the slot moved or the node became a replica
            self.lost(ConnectionError(f"the cluster moved shard channel {name.decode()!r} (slot migrated or "
                                      "failover)"))

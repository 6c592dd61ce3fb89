"""Presence: which instance holds which user and connection, for ``POST /v1/send``.

Theory of operation
===================

Every hub connection gets an id, ``<instance>.<n>``, told to the client in
``connected`` (``client``); its user is the ``sub`` of its token, if any.

`LocalPresence` (``[backplane] kind = "memory"``) knows this process only.
`NatsPresence` (``kind = "nats"``, in ``edgeproxy.transport.nats_presence``) keeps
the registry in JetStream key-value buckets (see that module).  `RedisPresence`
(``kind = "redis"``) keeps the registry on the first shard (``P`` = prefix;
`RedisClusterPresence`, ``kind = "redis-cluster"``, the same keys on the cluster,
the liveness keys under one hash tag, ``{P:inst}:I``, read with one ``MGET``):

==========================  ============================================================
``P:inst:I``                the liveness key of instance ``I``: set with a TTL of one
                            heartbeat interval twice per interval, deleted at shutdown
``P:user:U``                hash connection id -> instance, for user ``U``
``P:conn:C``                the instance of connection ``C``
pub/sub ``P:to:I``          the instance's inbox: targeted messages for its connections
==========================  ============================================================

Entries are written when a connection opens (and deleted when it closes) and their
TTL (3 intervals) is refreshed by each heartbeat, in one pipeline.  **Fencing:** a
reader keeps only entries whose instance's liveness key exists, so when an instance
dies its entries vanish from every answer as soon as its liveness key expires -
within one interval of its death - instead of lingering for their own TTL.  (The key
is refreshed every half interval, so a live instance survives one late refresh.)

``POST /v1/send`` looks the target up, then PUBLISHes the message once to each
owning instance's inbox; that instance writes it to its local connections as
``{"op": "message", "data": ...}``.  Targeted messages are not stored: a
connection that is not there when the message arrives does not get it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING, Any

import orjson

from edgeproxy.transport.backplanes import BackplaneUnavailable

if TYPE_CHECKING:
    from edgeproxy.transport.hub import HubConnection
    from edgeproxy.transport.server import ProxyServer

__all__ = ["LocalPresence", "RedisClusterPresence", "RedisPresence", "make_presence"]

log = logging.getLogger("edgeproxy")


class LocalPresence:
    """This process's connections by id and by user."""

    def __init__(self, server: ProxyServer):
        self.server = server
        self.instance = server.instance
        self._ids = itertools.count(1)
        self.by_id: dict[str, HubConnection] = {}
        self.by_user: dict[str, set[str]] = {}

    def new_id(self) -> str:
        return f"{self.instance}.{next(self._ids)}"

    async def start(self) -> None:
        """Nothing to start: this registry lives in the process (the Redis one overrides this)."""

    async def stop(self) -> None:
        """Nothing to stop (see `start`)."""

    def add(self, conn: HubConnection) -> None:
        self.by_id[conn.client_id] = conn
        if conn.user is not None:
            self.by_user.setdefault(conn.user, set()).add(conn.client_id)

    def remove(self, conn: HubConnection) -> None:
        self.by_id.pop(conn.client_id, None)
        if conn.user is not None:
            ids = self.by_user.get(conn.user)
            if ids is not None:
                ids.discard(conn.client_id)
                if not ids:
                    del self.by_user[conn.user]

    def matching(self, target: dict[str, Any]) -> list[HubConnection]:
        """The local connections ``target`` names (in its ``hub``, if it names one)."""
        ids = [target["client"]] if "client" in target else sorted(self.by_user.get(target["user"], ()))
        hub = target.get("hub")
        return [conn for conn in map(self.by_id.get, ids)
                if conn is not None and (hub is None or conn.service.config.path == hub)]

    def deliver_local(self, target: dict[str, Any], frame_data: bytes) -> int:
        """Write ``{"op":"message","data":...}`` to the local connections ``target`` names."""
        conns = self.matching(target)
        for conn in conns:
            conn.send(b'{"op":"message","data":' + frame_data + b"}")
        return len(conns)

    async def lookup(self, target: dict[str, Any]) -> dict[str, list[str]]:
        """instance -> connection ids of ``target`` (``{"user": U}`` or ``{"client": C}``)."""
        if "client" in target:
            return {self.instance: [target["client"]]} if target["client"] in self.by_id else {}
        ids = sorted(self.by_user.get(target["user"], ()))
        return {self.instance: ids} if ids else {}

    async def send(self, target: dict[str, Any], data: bytes) -> dict[str, list[str]]:
        """Deliver to ``target`` wherever it is; answers where it went (instance -> ids)."""
        where = await self.lookup(target)
        if where:
            self.deliver_local(target, data)
        return where

    async def _heartbeats(self) -> None:
        """The beat of a shared registry (Redis, NATS): their ``_heartbeat_once`` every half interval.

        The liveness entry every half interval (it lives one interval: a dead instance is
        fenced within one); with ``entries`` every other beat, this instance's registry
        entries (they live three).
        """
        for beat in itertools.count(1):
            await asyncio.sleep(self.config.heartbeat_interval / 2)
            try:
                await self._heartbeat_once(entries=beat % 2 == 0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.server.metrics.backplane_failed()
                log.warning("presence heartbeat failed: %s", exc)


class RedisPresence(LocalPresence):
    """The registry in Redis, with instance liveness keys (see the module doc)."""

    def __init__(self, server: ProxyServer, url: str):
        super().__init__(server)
        config = server.config.backplane
        self.config = config
        self.client = self._client(url)
        self.prefix = config.prefix
        self.inbox = self._inbox_of(self.instance)
        self.live_ms = int(config.heartbeat_interval * 1000)
        self.entry_ms = int(config.heartbeat_interval * 3000)
        self._beat: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()
        # the inbox rides on the first hub's pub/sub connection (subscribed again after a reconnect)
        for hub in server.hubs.values():
            feeds = getattr(hub.backplane, "extra_feeds", None)
            if feeds is not None:
                feeds[self.inbox] = self._on_inbox
                break

    # -- names and the client (Redis Cluster overrides these) -------------------------

    def _client(self, url: str):
        from edgeproxy.transport.redis_backplane import redis_client

        return redis_client(url, self.config.timeout)

    def _live_key(self, instance: str) -> str:
        return f"{self.prefix}:inst:{instance}"

    def _conn_key(self, client_id: str) -> str:
        return f"{self.prefix}:conn:{client_id}"

    def _user_key(self, user: str) -> str:
        return f"{self.prefix}:user:{user}"

    def _inbox_of(self, instance: str) -> str:
        return f"{self.prefix}:to:{instance}"

    async def _publish(self, name: str, message: bytes) -> None:
        await self.client.publish(name, message)

    async def start(self) -> None:
        try:
            await self._heartbeat_once()
        except Exception as exc:
            log.warning("presence: first heartbeat failed (%s); retrying every %.1f s", exc,
                        self.config.heartbeat_interval)
        self._beat = asyncio.get_running_loop().create_task(self._heartbeats())

    async def stop(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        try:
            await asyncio.wait_for(self.client.delete(self._live_key(self.instance)), self.config.timeout)
        except Exception as exc:
            log.warning("presence: could not delete the liveness key at shutdown: %s", exc)
        await self.client.aclose()

    async def _heartbeat_once(self, entries: bool = True) -> None:
        """Refresh the liveness key, and with `entries` the TTLs of this instance's entries."""
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self._live_key(self.instance), b"1", px=self.live_ms)
        if not entries:
            await asyncio.wait_for(pipe.execute(), self.config.timeout)
            return
        for cid, conn in self.by_id.items():
            pipe.pexpire(self._conn_key(cid), self.entry_ms)
        for user in self.by_user:
            pipe.pexpire(self._user_key(user), self.entry_ms)
        await asyncio.wait_for(pipe.execute(), self.config.timeout)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.server.metrics.backplane_failed()
            log.warning("presence update failed: %s", task.exception())

    def add(self, conn: HubConnection) -> None:
        super().add(conn)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self._conn_key(conn.client_id), self.instance, px=self.entry_ms)
        if conn.user is not None:
            key = self._user_key(conn.user)
            pipe.hset(key, conn.client_id, self.instance)
            pipe.pexpire(key, self.entry_ms)
        self._spawn(pipe.execute())

    def remove(self, conn: HubConnection) -> None:
        super().remove(conn)
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self._conn_key(conn.client_id))
        if conn.user is not None:
            pipe.hdel(self._user_key(conn.user), conn.client_id)
        self._spawn(pipe.execute())

    async def lookup(self, target: dict[str, Any]) -> dict[str, list[str]]:
        try:
            if "client" in target:
                owner = await asyncio.wait_for(self.client.get(self._conn_key(target["client"])),
                                               self.config.timeout)
                entries = {target["client"]: owner} if owner is not None else {}
            else:
                entries = await asyncio.wait_for(self.client.hgetall(self._user_key(target["user"])),
                                                 self.config.timeout)
            entries = {(k.decode() if isinstance(k, bytes) else k): v.decode() for k, v in entries.items()}
            instances = sorted(set(entries.values()))
            if not instances:
                return {}
            alive = await asyncio.wait_for(self.client.mget([self._live_key(i) for i in instances]),
                                           self.config.timeout)
        except Exception as exc:
            self.server.metrics.backplane_failed()
            raise BackplaneUnavailable(f"presence lookup failed: {exc}") from exc
        live = {inst for inst, flag in zip(instances, alive) if flag is not None}
        where: dict[str, list[str]] = {}
        for cid, inst in sorted(entries.items()):
            if inst in live:  # fencing: a dead instance's entries do not count
                where.setdefault(inst, []).append(cid)
        return where

    async def send(self, target: dict[str, Any], data: bytes) -> dict[str, list[str]]:
        where = await self.lookup(target)
        message = orjson.dumps({**target, "data": orjson.Fragment(data)})
        try:
            for inst in where:
                if inst == self.instance:
                    self.deliver_local(target, data)
                else:
                    await asyncio.wait_for(self._publish(self._inbox_of(inst), message), self.config.timeout)
        except Exception as exc:
            self.server.metrics.backplane_failed()
            raise BackplaneUnavailable(f"targeted send failed: {exc}") from exc
        return where

    def _on_inbox(self, raw: bytes) -> None:
        doc = orjson.loads(raw)
        data = orjson.dumps(doc.pop("data"))
        self.deliver_local(doc, data)


class RedisClusterPresence(RedisPresence):
    """`RedisPresence` on a Redis Cluster: the same keys, placed so each read is single-slot.

    The liveness keys of all instances share the hash tag ``{P:inst}``, so the
    fencing ``MGET`` of a lookup is one command on one slot (a handful of small
    keys: one per instance).  A user's hash and a connection's key are read alone,
    so they spread over the cluster by their own names.  The inboxes are shard
    channels (``SPUBLISH``, subscribed by the hub's cluster backplane on the
    owning master).
    """

    def _client(self, url: str):
        from edgeproxy.transport.redis_cluster import cluster_client

        return cluster_client(self.config.urls, self.config.timeout)

    def _live_key(self, instance: str) -> str:
        return f"{{{self.prefix}:inst}}:{instance}"

    async def _publish(self, name: str, message: bytes) -> None:
        await self.client.spublish(name, message)


def make_presence(server: ProxyServer) -> LocalPresence:
    config = server.config.backplane
    if config.kind == "redis" and server.hubs:
        return RedisPresence(server, config.urls[0])
    if config.kind == "nats" and server.hubs:
        from edgeproxy.transport.nats_presence import NatsPresence
        return NatsPresence(server)
    if config.kind == "redis-cluster" and server.hubs:
        return RedisClusterPresence(server, config.urls[0])
    return LocalPresence(server)

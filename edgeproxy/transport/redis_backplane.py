"""The Redis backplane: one Lua script orders, stores and spreads each publication.

Theory of operation
===================

Keys of one hub (``P`` = ``[backplane] prefix``, ``N`` = the hub's namespace, see
``hub_namespace``; ``C`` = the channel name, which may itself contain ``:``):

=======================  =================================================================
``P:N:ch:C:meta``        hash ``e`` (epoch), ``s`` (last seq); expires ``keep`` after the
                         last publication (``history_ttl``, or a day when that is 0)
``P:N:ch:C:log``         stream of the history: auto ids (their ms part is the time
                         of storing), fields ``q`` (seq) and ``d`` (data); trimmed with
                         ``MAXLEN ~ history_size`` and ``MINID ~ now - history_ttl``
``P:N:ch:C``             the pub/sub channel; messages are ``epoch:seq:data``
=======================  =================================================================

**Publish** is one script, atomic on the shard: if ``meta`` has no epoch (a new
channel, or its state expired or was lost with the server), it takes the fresh epoch
the caller passed in and drops any old ``log``; then ``HINCRBY s``, ``XADD``, the
trims and the ``PUBLISH``.  So the seq is consistent across instances, a publication
is stored before anybody hears it (contract point 2), and since a Redis server
sends pub/sub messages in the order it ran the scripts, the live feed comes in seq
order.

**History** is one script too: the position, and with ``since`` in the same epoch
the last ``top - since`` log entries (``XREVRANGE ... COUNT``), with the server's
time so that entries older than ``history_ttl`` count as gone.  Seqs in the log are
consecutive, so the answer is recovered exactly when the oldest entry returned is
``since + 1`` and none has expired.  A history read of a channel without state
creates its epoch (``subscribed`` then names the epoch publications will carry).

**Interest.**  Each shard has one pub/sub connection; ``SUBSCRIBE`` is sent only
for channels with local subscribers, and ``subscribe`` returns when Redis confirmed
it.  The shard of a channel is `edgeproxy.hub.shards.shard_of`.

Commands go through a pool that reconnects by itself on the next call (without
retries: a call during an outage fails, and the publish API answers 503).  The
pub/sub connection is watched: when it breaks, `NetworkBackplane.lost` reconnects
with backoff and fills every channel from history.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from edgeproxy.hub.backplane import HistoryResult, random_epoch
from edgeproxy.hub.protocol import Position, Publication
from edgeproxy.hub.shards import shard_of
from edgeproxy.transport.backplanes import NetworkBackplane

if TYPE_CHECKING:
    from edgeproxy.config import BackplaneConfig, HubConfig
    from edgeproxy.metrics import Metrics

__all__ = ["RedisBackplane", "redis_client"]

log = logging.getLogger("edgeproxy")

PUBLISH = """
local meta, log = KEYS[1], KEYS[2]
local size, ttl_ms, keep_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local epoch = redis.call('HGET', meta, 'e')
if not epoch then
  epoch = ARGV[2]
  redis.call('DEL', log)
  redis.call('HSET', meta, 'e', epoch, 's', 0)
end
local seq = redis.call('HINCRBY', meta, 's', 1)
if size > 0 then
  redis.call('XADD', log, 'MAXLEN', '~', size, '*', 'q', seq, 'd', ARGV[1])
  if ttl_ms > 0 then
    local t = redis.call('TIME')
    local horizon = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - ttl_ms
    redis.call('XTRIM', log, 'MINID', '~', horizon)
  end
  redis.call('PEXPIRE', log, keep_ms)
end
redis.call('PEXPIRE', meta, keep_ms)
redis.call('PUBLISH', KEYS[3], epoch .. ':' .. seq .. ':' .. ARGV[1])
return {seq, epoch}
"""

HISTORY = """
local meta, log = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', log)
  redis.call('HSET', meta, 'e', epoch, 's', 0)
  redis.call('PEXPIRE', meta, tonumber(ARGV[4]))
end
local top = tonumber(redis.call('HGET', meta, 's'))
local since, size = tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if since < 0 or ARGV[5] ~= epoch or since >= top or top - since > size then
  return {epoch, top, now}
end
return {epoch, top, now, redis.call('XREVRANGE', log, '+', '-', 'COUNT', top - since)}
"""


#: connections a client keeps to one Redis server at most; commands beyond wait for one
REDIS_POOL_SIZE = 100


def redis_client(url: str, timeout: float) -> aioredis.Redis:
    """A client for one shard: no retries (a failure is reported, not hidden), bounded waits.

    The pool blocks: a burst of more concurrent commands than it holds
    connections (a drain's or a reconnect wave's presence updates, history
    fetches and publications) waits up to `timeout` for a free one.  The
    default pool of redis-py (since 6: 100 connections) fails the extra
    commands at once with "Too many connections", which dropped presence
    entries and history fetches under the deploy drill's 1,500 clients.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=REDIS_POOL_SIZE, timeout=timeout, socket_timeout=timeout,
        socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0), health_check_interval=0,
        decode_responses=False,
    )
    return aioredis.Redis.from_pool(pool)


class _Shard:
    """One Redis server: a command client and the pub/sub connection with its reader."""

    def __init__(self, url: str, timeout: float):
        self.url = url
        self.client = redis_client(url, timeout)
        self.pubsub: aioredis.client.PubSub | None = None
        self.reader: asyncio.Task | None = None
        #: pub/sub channel -> futures waiting for its subscribe confirmation, in order
        self.waiting: dict[bytes, deque[asyncio.Future]] = {}
        self.publish = self.client.register_script(PUBLISH)
        self.history = self.client.register_script(HISTORY)


class RedisBackplane(NetworkBackplane):
    """`Backplane` on Redis (one or several shards); see the module doc."""

    kind = "redis"

    def __init__(self, config: BackplaneConfig, hub: HubConfig, metrics: Metrics, instance: str, *,
                 shards: bool = True):
        super().__init__(config, hub, metrics, instance)
        #: one per URL; Redis Cluster (``shards=False``) opens its per-node feeds itself
        self.shards = [_Shard(url, config.timeout) for url in config.urls] if shards else []
        self.base = f"{config.prefix}:{self.namespace}:ch:"
        self._base_bytes = self.base.encode()
        self.keep_ms = int((hub.history_ttl or 86400.0) * 1000)
        self.ttl_ms = int(hub.history_ttl * 1000)

    def shard(self, channel: str) -> _Shard:
        """Where the channel's pub/sub feed is."""
        return self.shards[shard_of(channel, len(self.shards))]

    def _commands(self, channel: str) -> _Shard:
        """Where the channel's scripts and keys are (with ``publish``, ``history``, ``client``)."""
        return self.shard(channel)

    def _keys(self, channel: str) -> list[str]:
        name = self.base + channel
        return [name + ":meta", name + ":log", name]

    def _channel_of(self, name: bytes) -> str:
        """The channel a pub/sub name (the third of `_keys`) belongs to."""
        return name[len(self._base_bytes):].decode()

    # -- connection ------------------------------------------------------------------

    async def _connect(self) -> None:
        for shard in self.shards:
            await shard.client.ping()
            shard.pubsub = shard.client.pubsub(ignore_subscribe_messages=False)
            # the first SUBSCRIBE opens the connection; the reader starts after it
            await self._confirm(shard, [])
            shard.reader = asyncio.get_running_loop().create_task(self._read(shard))
        for name in self.extra_feeds:
            await self._confirm(self.shards[0], [name.encode()])

    async def _disconnect(self) -> None:
        for shard in self.shards:
            await self._close_feed(shard)
        if self._closing:
            for shard in self.shards:
                await shard.client.aclose()

    @staticmethod
    async def _close_feed(shard: _Shard) -> None:
        """Stop the shard's reader and close its pub/sub connection (waiters get an error)."""
        if shard.reader is not None:
            shard.reader.cancel()
            shard.reader = None
        for waiters in shard.waiting.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(ConnectionError("pub/sub connection closed"))
        shard.waiting.clear()
        if shard.pubsub is not None:
            pubsub, shard.pubsub = shard.pubsub, None
            try:
                await pubsub.aclose()
            except Exception:  # already broken
                pass

    async def _confirm(self, shard: _Shard, names: list[bytes]) -> None:
        """SUBSCRIBE to ``names`` and wait for Redis to confirm each."""
        if shard.pubsub is None:
            raise ConnectionError("no pub/sub connection")
        if not names:
            await shard.pubsub.subscribe(f"{self.config.prefix}:{self.namespace}:hello")
            await shard.pubsub.get_message(ignore_subscribe_messages=False, timeout=self.config.timeout)
            return
        loop = asyncio.get_running_loop()
        futures = []
        for name in names:
            fut = loop.create_future()
            shard.waiting.setdefault(name, deque()).append(fut)
            futures.append(fut)
        await self._pubsub_subscribe(shard.pubsub, names)
        await asyncio.gather(*futures)

    # the pub/sub verbs: plain here, sharded (SSUBSCRIBE ...) on Redis Cluster
    #: the ``type`` of a message and of a subscribe confirmation, as redis-py names them
    MESSAGE, SUBSCRIBED, UNSUBSCRIBED = "message", "subscribe", "unsubscribe"

    async def _pubsub_subscribe(self, pubsub: aioredis.client.PubSub, names: list[bytes]) -> None:
        await pubsub.subscribe(*names)

    async def _pubsub_unsubscribe(self, pubsub: aioredis.client.PubSub, name: str) -> None:
        await pubsub.unsubscribe(name)

    def _unsubscribed(self, shard: _Shard, name: bytes) -> None:
        """A confirmation of UNSUBSCRIBE: always one this adapter asked for (Redis Cluster overrides)."""

    async def _read(self, shard: _Shard) -> None:
        base, pubsub = self._base_bytes, shard.pubsub
        message_kind, subscribed, unsubscribed = self.MESSAGE, self.SUBSCRIBED, self.UNSUBSCRIBED
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=None)
                if message is None:
                    continue
                kind, name = message["type"], message["channel"]
                if kind == message_kind:
                    data = message["data"]
                    if name.startswith(base):
                        epoch, seq, body = data.split(b":", 2)
                        self.offer(Publication(self._channel_of(name), int(seq), epoch.decode(), body))
                    else:
                        callback = self.extra_feeds.get(name.decode())
                        if callback is not None:
                            callback(data)
                elif kind == unsubscribed:
                    self._unsubscribed(shard, name)
                elif kind == subscribed:
                    waiters = shard.waiting.get(name)
                    if waiters:
                        fut = waiters.popleft()
                        if not waiters:
                            del shard.waiting[name]
                        if not fut.done():
                            fut.set_result(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.lost(exc)

    # -- the feed --------------------------------------------------------------------

    async def _feed_subscribe(self, channel: str) -> None:
        await self._confirm(self.shard(channel), [self._keys(channel)[2].encode()])

    async def _feed_unsubscribe(self, channel: str) -> None:
        shard = self.shard(channel)
        if shard.pubsub is not None:
            await self._pubsub_unsubscribe(shard.pubsub, self._keys(channel)[2])

    async def _position(self, channel: str) -> Position | None:
        epoch, seq = await self._commands(channel).client.hmget(self._keys(channel)[0], "e", "s")
        if epoch is None:
            return Position(0, None)
        return Position(int(seq), epoch.decode())

    # -- publish and history ---------------------------------------------------------

    async def publish(self, channel: str, data: bytes) -> Position:
        self._check_up()
        shard = self._commands(channel)
        try:
            seq, epoch = await asyncio.wait_for(shard.publish(
                keys=self._keys(channel),
                args=[data, random_epoch(), self.hub.history_size, self.ttl_ms, self.keep_ms],
            ), self.config.timeout)
        except Exception as exc:
            raise self._failure("publish", exc) from exc
        return Position(int(seq), epoch.decode())

    async def history(self, channel: str, since: Position | None) -> HistoryResult:
        shard = self._commands(channel)
        args = [random_epoch(), -1 if since is None else since.seq, self.hub.history_size, self.keep_ms,
                "" if since is None else since.epoch]
        try:
            answer = await asyncio.wait_for(shard.history(keys=self._keys(channel), args=args), self.config.timeout)
        except Exception as exc:
            raise self._failure("history read", exc) from exc
        epoch, top, now = answer[0].decode(), int(answer[1]), int(answer[2])
        position = Position(top, epoch)
        if since is None or since.epoch != epoch or since.seq > top:
            return HistoryResult(position, [], False)
        if since.seq == top:
            return HistoryResult(position, [], True)
        if len(answer) < 4:
            return HistoryResult(position, [], False)
        horizon = now - self.ttl_ms if self.ttl_ms else None
        missed = []
        for entry_id, fields in reversed(answer[3]):
            if horizon is not None and int(entry_id.split(b"-", 1)[0]) <= horizon:
                return HistoryResult(position, [], False)
            # a script returns the entry's fields flat, in the order XADD wrote them: q, seq, d, data
            missed.append((int(fields[1]), fields[3]))
        if not missed or missed[0][0] != since.seq + 1 or missed[-1][0] != top:
            return HistoryResult(position, [], False)
        return HistoryResult(position, missed, True)

"""Presence on NATS: JetStream key-value for the registry, request/reply for the inbox.

Theory of operation
===================

Names (``P`` = ``[backplane] prefix``, ``I`` = an instance id, ``U`` = a user as
base64url of its UTF-8, unpadded, so any user is one key token):

==============================  ==============================================================
bucket ``P_live``, key ``I``    the liveness entry of instance ``I``: the bucket's ``max_age``
                                is one heartbeat interval; put every half interval, deleted
                                at shutdown
bucket ``P_presence``,          JSON list of ``I``'s connection ids of user ``U``; the
key ``u.U.I``                   bucket's ``max_age`` is three intervals, each heartbeat (every
                                interval) puts it again
subject ``P.to.I``              the instance's inbox (core NATS request/reply)
==============================  ==============================================================

Both buckets keep their entries in memory, with ``[backplane] replicas`` replicas, and
hold one value per key (``history = 1``).

**One writer per key.**  A user's connections on three instances are three keys, each
written only by the instance it names, so there is no read-modify-write and no
compare-and-set (which a clustered stream does not serialize under races anyway, see
`edgeproxy.transport.nats_backplane`).  Opening or closing a connection marks its user
dirty; one task writes the dirty users' keys (their current list, or a delete when it
is empty), so a burst of one user's connections costs one put.  The heartbeat puts
every key of this instance again: one message per *user* on the instance per interval.

**Connections need no key**: an id ``I.n`` names its instance (instance ids have no
``.``), so the instance of a ``client`` target is read from the target itself.

**Lookup** of a user: an ephemeral consumer on ``u.U.*`` with ``deliver_policy =
last_per_subject`` tells in its ``num_pending`` how many keys there are, and one fetch
reads them (keys deleted since are skipped).  **Fencing:** the instances named are kept
only if their liveness entry exists, so a dead (or cut off) instance's connections
vanish from every answer within one interval of its last heartbeat, instead of
lingering for their own ``max_age``.

**Send** (and lookup, which is a send without data) asks each live owner on its inbox,
in parallel: the owner writes ``{"op": "message", "data": ...}`` to its matching local
connections and answers with their ids, so ``where`` is what was delivered, not what
the registry believed.  A killed instance whose liveness entry has not yet expired has
no inbox subscriber any more: NATS answers "no responders" at once and it counts as
absent.  A live owner that does not answer within ``timeout`` makes the call fail (the
API answers 503).  Targeted messages are not stored: a connection that is not there
when the message arrives does not get it.

The presence connection is a NATS connection of its own, with nats-py's reconnect
(which subscribes the inbox again): nothing here must be ordered with the hub feed.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import TYPE_CHECKING, Any

import nats
import orjson
from nats.errors import NoRespondersError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StorageType
from nats.js.errors import BadRequestError, NotFoundError

from edgeproxy.transport.backplanes import BackplaneUnavailable
from edgeproxy.transport.presence import LocalPresence

if TYPE_CHECKING:
    from edgeproxy.transport.hub import HubConnection
    from edgeproxy.transport.server import ProxyServer

__all__ = ["NatsPresence", "user_token"]

log = logging.getLogger("edgeproxy")

#: writes in flight at once when a heartbeat puts every key again
_WRITE_BATCH = 256


def user_token(user: str) -> str:
    """A user name as one key token: base64url of its UTF-8, without padding."""
    return base64.urlsafe_b64encode(user.encode()).rstrip(b"=").decode()


class NatsPresence(LocalPresence):
    """The registry in JetStream key-value buckets, inboxes on core NATS (see the module doc)."""

    def __init__(self, server: ProxyServer):
        super().__init__(server)
        config = server.config.backplane
        self.config = config
        self.prefix = config.prefix
        self.live_bucket = f"{self.prefix}_live"
        self.entry_bucket = f"{self.prefix}_presence"
        self.nc: nats.NATS | None = None
        self.js = None
        self.live = None
        self.entries = None
        self._dirty: set[str] = set()
        self._writer: asyncio.Task | None = None
        self._beat: asyncio.Task | None = None
        self._refresh: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()

    def inbox(self, instance: str) -> str:
        return f"{self.prefix}.to.{instance}"

    def _key(self, user: str, instance: str | None = None) -> str:
        return f"u.{user_token(user)}.{instance or self.instance}"

    # -- connection and heartbeats -----------------------------------------------------

    async def start(self) -> None:
        try:
            await self._heartbeat_once()
        except Exception as exc:
            log.warning("presence: could not reach NATS at start (%s); retrying every %.1f s", exc,
                        self.config.heartbeat_interval / 2)
        self._beat = asyncio.get_running_loop().create_task(self._heartbeats())

    async def _connect(self) -> None:
        if self.nc is None:
            nc = await nats.connect(
                servers=list(self.config.urls), name=f"edgeproxy {self.instance} presence",
                connect_timeout=max(1, int(self.config.timeout)), max_reconnect_attempts=-1,
                reconnect_time_wait=self.config.reconnect_min, error_cb=self._error,
            )
            await nc.subscribe(self.inbox(self.instance), cb=self._on_inbox)
            self.nc, self.js = nc, nc.jetstream(timeout=self.config.timeout)
        interval = self.config.heartbeat_interval
        self.live = await self._bucket(self.live_bucket, interval)
        self.entries = await self._bucket(self.entry_bucket, 3 * interval)

    async def _error(self, exc: Exception) -> None:
        log.info("presence: NATS connection: %s", exc)

    async def _bucket(self, name: str, ttl: float):
        config = KeyValueConfig(bucket=name, history=1, ttl=ttl, storage=StorageType.MEMORY,
                                replicas=self.config.replicas)
        try:
            return await self.js.create_key_value(config)
        except BadRequestError:  # exists with other limits (heartbeat_interval or replicas changed): take ours
            stream = (await self.js.stream_info(f"KV_{name}")).config
            stream.max_age, stream.num_replicas, stream.duplicate_window = ttl, self.config.replicas, min(ttl, 120.0)
            await self.js.update_stream(stream)
            return await self.js.key_value(name)

    async def stop(self) -> None:
        for task in (self._beat, self._refresh):
            if task is not None:
                task.cancel()
        try:
            if self._writer is not None:
                await asyncio.wait_for(asyncio.shield(self._writer), self.config.timeout)
            if self.live is not None:
                await asyncio.wait_for(self.live.delete(self.instance), self.config.timeout)
        except Exception as exc:
            log.warning("presence: could not delete the liveness entry at shutdown: %s", exc)
        if self.nc is not None:
            try:
                await self.nc.close()
            except Exception:  # already broken
                pass

    async def _heartbeat_once(self, entries: bool = True) -> None:
        """Put the liveness entry and, with `entries`, start putting every registry key of
        this instance again (in a task of its own, so that many users never delay the
        liveness entry; skipped while the previous round is still writing).  Connects first
        when NATS was not reached yet (at start, or it was down then)."""
        if self.entries is None:
            await asyncio.wait_for(self._connect(), self.config.timeout)
        await asyncio.wait_for(self.live.put(self.instance, b"1"), self.config.timeout)
        if entries:
            if self._refresh is not None and not self._refresh.done():
                log.warning("presence: refreshing %d user key(s) takes longer than a heartbeat interval",
                            len(self.by_user))
                return
            self._refresh = asyncio.get_running_loop().create_task(self._refresh_all())

    async def _refresh_all(self) -> None:
        try:
            await self._write(list(self.by_user))
        except Exception as exc:
            self.server.metrics.backplane_failed()
            log.warning("presence: refreshing the registry keys failed: %s", exc)

    # -- registry writes ---------------------------------------------------------------

    def add(self, conn: HubConnection) -> None:
        super().add(conn)
        if conn.user is not None:
            self._mark(conn.user)

    def remove(self, conn: HubConnection) -> None:
        super().remove(conn)
        if conn.user is not None:
            self._mark(conn.user)

    def _mark(self, user: str) -> None:
        self._dirty.add(user)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_dirty())

    async def _write_dirty(self) -> None:
        await asyncio.sleep(0)  # let the rest of a burst of opens and closes mark their users
        while self._dirty:
            users, self._dirty = list(self._dirty), set()
            try:
                await self._write(users)
            except Exception as exc:  # the next heartbeat puts the keys of the live connections again
                self.server.metrics.backplane_failed()
                log.warning("presence update failed: %s", exc)

    async def _write(self, users: list[str]) -> None:
        """Each user's key: the current list of its ids here, or a delete when there are none
        (``_WRITE_BATCH`` at a time, each batch within ``timeout``)."""
        if self.entries is None:
            return
        for start in range(0, len(users), _WRITE_BATCH):
            writes = []
            for user in users[start:start + _WRITE_BATCH]:
                ids = sorted(self.by_user.get(user, ()))
                key = self._key(user)
                writes.append(self.entries.put(key, orjson.dumps(ids)) if ids else self.entries.delete(key))
            await asyncio.wait_for(asyncio.gather(*writes), self.config.timeout)

    # -- lookup and send ---------------------------------------------------------------

    async def lookup(self, target: dict[str, Any]) -> dict[str, list[str]]:
        return await self._ask(target, None)

    async def send(self, target: dict[str, Any], data: bytes) -> dict[str, list[str]]:
        return await self._ask(target, data)

    async def _ask(self, target: dict[str, Any], data: bytes | None) -> dict[str, list[str]]:
        """Ask the owners of ``target`` (delivering ``data`` unless None): instance -> ids."""
        try:
            owners = await asyncio.wait_for(self._live_owners(target), self.config.timeout)
            remote = [inst for inst in owners if inst != self.instance]
            answers = await asyncio.gather(*(self._request(inst, target, data) for inst in remote))
        except Exception as exc:
            self.server.metrics.backplane_failed()
            raise BackplaneUnavailable(f"presence {'lookup' if data is None else 'targeted send'} failed: "
                                       f"{type(exc).__name__}: {exc}") from exc
        where = {inst: ids for inst, ids in zip(remote, answers) if ids}
        if self.instance in owners:
            local = [conn.client_id for conn in self.matching(target)]
            if local:
                if data is not None:
                    self.deliver_local(target, data)
                where[self.instance] = local
        return dict(sorted(where.items()))

    async def _live_owners(self, target: dict[str, Any]) -> list[str]:
        """The instances that may hold ``target``, fenced: only those with a liveness entry."""
        if "client" in target:
            owner = target["client"].rpartition(".")[0]
            instances = [owner] if owner else []
        else:
            instances = [self.instance] if target["user"] in self.by_user else []
            instances += [inst for inst in await self._registered(target["user"]) if inst != self.instance]
        if self.entries is None:
            raise ConnectionError("not connected to NATS yet")
        remote = [inst for inst in instances if inst != self.instance]
        alive = await asyncio.gather(*(self._alive(inst) for inst in remote))
        live = {inst for inst, ok in zip(remote, alive) if ok}
        return [inst for inst in instances if inst == self.instance or inst in live]

    async def _alive(self, instance: str) -> bool:
        try:
            await self.live.get(instance)
        except NotFoundError:  # expired, deleted at shutdown, or never there
            return False
        return True

    async def _registered(self, user: str) -> list[str]:
        """The instances with a registry key for ``user`` (one consumer, one fetch)."""
        if self.entries is None:
            raise ConnectionError("not connected to NATS yet")
        stream = f"KV_{self.entry_bucket}"
        prefix = f"$KV.{self.entry_bucket}.u.{user_token(user)}."
        info = await self.js.add_consumer(stream, ConsumerConfig(
            filter_subject=prefix + "*", deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, ack_policy=AckPolicy.NONE,
            inactive_threshold=5.0, mem_storage=True, num_replicas=1))
        try:
            if not info.num_pending:
                return []
            psub = await self.js.pull_subscribe_bind(consumer=info.name, stream=stream)
            try:
                msgs = await psub.fetch(batch=info.num_pending, timeout=self.config.timeout)
            finally:
                await psub.unsubscribe()
        finally:
            self._spawn(self.js.delete_consumer(stream, info.name))
        return sorted(msg.subject[len(prefix):] for msg in msgs
                      if (msg.headers or {}).get("KV-Operation") not in ("DEL", "PURGE"))

    async def _request(self, instance: str, target: dict[str, Any], data: bytes | None) -> list[str]:
        body = {"target": target} if data is None else {"target": target, "data": orjson.Fragment(data)}
        try:
            reply = await self.nc.request(self.inbox(instance), orjson.dumps(body), timeout=self.config.timeout)
        except NoRespondersError:  # it died: nobody listens on its inbox any more
            return []
        return orjson.loads(reply.data)

    async def _on_inbox(self, msg) -> None:
        doc = orjson.loads(msg.data)
        target = doc["target"]
        ids = [conn.client_id for conn in self.matching(target)]
        if "data" in doc:
            self.deliver_local(target, orjson.dumps(doc["data"]))
        if msg.reply:
            await msg.respond(orjson.dumps(ids))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a consumer left behind expires itself

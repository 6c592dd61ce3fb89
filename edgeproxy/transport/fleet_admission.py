"""Fleet-wide admission on the loop: the lease script in Redis and the wrapper the server admits with.

Theory of operation
===================

`FleetAdmission` wraps the instance's own admission (`Admission`, or the workers'
`SharedAdmission`) built *without* the connection-rate bucket: the connection caps
and the per-address limits stay per instance, the rate bucket is the fleet's
(`edgeproxy.core.fleet_admission`).  ``admit`` is synchronous and never waits on
the network: it checks the leased pool, lets the local limits decide, spends the
token only when they admit, and starts a lease in the background when the pool
runs low.

On Redis the fleet's bucket is one hash, ``{P:admission}:bucket`` (tokens, the time
they were counted, the end of the fleet's queue of refused clients), and the
instances that leased recently are a sorted set ``{P:admission}:members``; the hash
tag keeps both on one slot, so the script works on one Redis, on the first shard of
``urls`` and on a Redis Cluster alike.  The script uses the server's clock
(``TIME``), so the instances' clocks do not matter.  On NATS it is one key of a
JetStream key-value bucket, updated with revision checks (`NatsFleetStore`).

When a lease fails (the backplane is unreachable, or slower than ``[backplane]
timeout``) the instance falls back to its share of the budget, logs one warning
and sets ``edgeproxy_admission_fallback`` to 1; the first lease that succeeds again
logs once more and sets it back to 0.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from edgeproxy.core.admission import AdmissionPolicy, Rng, Verdict
from edgeproxy.core.fleet_admission import MEMBER_TTL, FleetTokens, LeaseAnswer, fleet_lease

if TYPE_CHECKING:
    from edgeproxy.config import BackplaneConfig
    from edgeproxy.metrics import Metrics

__all__ = ["FleetAdmission", "LEASE", "NatsFleetStore", "RedisFleetStore", "fleet_store", "local_policy"]

log = logging.getLogger("edgeproxy")

#: KEYS: bucket, members; ARGV: rate, burst, want, refused, instance, member_ttl_ms
#: -> {granted, wait_ms, queue_ms, active}
LEASE = """
local bucket, members = KEYS[1], KEYS[2]
local rate, burst, want, refused = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local state = redis.call('HMGET', bucket, 't', 's', 'q')
local tokens, stamp, queue = tonumber(state[1]) or burst, tonumber(state[2]) or now, tonumber(state[3]) or 0
if now > stamp then
  tokens = math.min(burst, tokens + (now - stamp) * rate / 1000)
end
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
if refused > 0 then
  queue = math.max(queue, now) + refused * 1000 / rate
end
local wait = 0
if tokens < 1 then
  wait = (1 - tokens) * 1000 / rate
end
local keep = math.ceil(math.max(burst / rate * 1000, tonumber(ARGV[6])) * 2)
redis.call('HSET', bucket, 't', tostring(tokens), 's', tostring(now), 'q', tostring(queue))
redis.call('PEXPIRE', bucket, keep)
redis.call('ZADD', members, now, ARGV[5])
redis.call('ZREMRANGEBYSCORE', members, '-inf', now - tonumber(ARGV[6]))
redis.call('PEXPIRE', members, keep)
return {granted, math.ceil(wait), math.ceil(math.max(0, queue - now)), redis.call('ZCARD', members)}
"""


class RedisFleetStore:
    """The fleet bucket in Redis: the `LEASE` script on one slot (one Redis, its first shard, or a cluster)."""

    def __init__(self, config: BackplaneConfig):
        if config.kind == "redis-cluster":
            from edgeproxy.transport.redis_cluster import cluster_client

            self.client = cluster_client(config.urls, config.timeout)
        else:
            from edgeproxy.transport.redis_backplane import redis_client

            self.client = redis_client(config.urls[0], config.timeout)
        self._lease = self.client.register_script(LEASE)
        base = f"{{{config.prefix}:admission}}"
        self.keys = [base + ":bucket", base + ":members"]

    async def lease(self, rate: float, burst: float, want: int, refused: int, instance: str) -> tuple[int, ...]:
        answer = await self._lease(keys=self.keys, args=[rate, burst, want, refused, instance, int(MEMBER_TTL * 1000)])
        return tuple(int(x) for x in answer)

    async def aclose(self) -> None:
        await self.client.aclose()


class NatsFleetStore:
    """The fleet bucket in a JetStream key-value bucket ``P_admission``, key ``bucket``.

    NATS runs no scripts, so a lease is read, computed (`fleet_lease`) and written
    back with the revision it read (``update(last=revision)``): of instances racing
    for the same revision one wins and the others read again (at most
    `NATS_ATTEMPTS` times per lease; then the lease fails).  Time is this
    instance's wall clock: clocks kept by NTP (within milliseconds) change the
    refill by as much; the stamp never moves back, so a slow clock refills late,
    never twice.
    """

    NATS_ATTEMPTS = 20

    def __init__(self, config: BackplaneConfig):
        self.config = config
        self.bucket = f"{config.prefix}_admission"
        self.nc = None
        self.kv = None

    async def _kv(self):
        if self.kv is None:
            import nats
            from nats.js.api import StorageType

            if self.nc is None or self.nc.is_closed:
                self.nc = await nats.connect(servers=list(self.config.urls), name="edgeproxy admission",
                                             connect_timeout=max(1, int(self.config.timeout)),
                                             reconnect_time_wait=0.5, max_reconnect_attempts=-1)
            js = self.nc.jetstream(timeout=self.config.timeout)
            # one small key, in memory (a bucket lost with the server starts full: what it would be
            # after burst / rate seconds anyway); an hour untouched and it goes.  One replica even
            # with [backplane] replicas > 1, on purpose: the revision check of an update is
            # JetStream's expected-last-subject-sequence, which on a replicated stream does not
            # see updates still being replicated (nats-server issue 4320, see nats_backplane), so
            # two instances could both take the same tokens; while the server holding it is down,
            # the instances fall back to their local share.
            self.kv = await js.create_key_value(bucket=self.bucket, history=1, ttl=3600.0,
                                                storage=StorageType.MEMORY)
        return self.kv

    async def lease(self, rate: float, burst: float, want: int, refused: int, instance: str) -> tuple[int, ...]:
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        try:
            kv = await self._kv()
            for _ in range(self.NATS_ATTEMPTS):
                try:
                    entry = await kv.get("bucket")
                    state, revision = orjson.loads(entry.value), entry.revision
                except KeyNotFoundError:
                    state, revision = None, 0
                new, answer = fleet_lease(state, time.time() * 1000, rate, burst, want, refused, instance,
                                          MEMBER_TTL * 1000)
                try:
                    await kv.update("bucket", orjson.dumps(new), last=revision)
                except KeyWrongLastSequenceError:
                    continue  # another instance took this revision: read again
                return answer
        except BaseException:
            self.kv = None  # made again next time (the server may have lost the bucket)
            raise
        raise TimeoutError(f"the fleet bucket stayed contended for {self.NATS_ATTEMPTS} attempts")

    async def aclose(self) -> None:
        if self.nc is not None:
            await self.nc.close()


def fleet_store(config: BackplaneConfig) -> RedisFleetStore | NatsFleetStore:
    """Where the fleet's bucket lives for ``[backplane] kind``."""
    return NatsFleetStore(config) if config.kind == "nats" else RedisFleetStore(config)


class FleetAdmission:
    """The server's admission with the rate bucket shared by the fleet (see the module doc).

    Args:
        local: the instance's admission, made from `policy` without its rate (caps, per address).
        policy: the full ``[limits]`` policy (its ``rate``/``burst`` are the fleet's).
        backplane: ``[backplane]`` (kind ``redis``, ``redis-cluster`` or ``nats``).
        instance: this instance's id (a member of the fleet).
        metrics: where the fallback state and the lease failures are counted.
        now, rng: as for `Admission`.
    """

    def __init__(self, local: Any, policy: AdmissionPolicy, backplane: BackplaneConfig, instance: str,
                 metrics: Metrics, now: float, rng: Rng = None):
        self.local = local
        self.policy = policy
        self.instance = instance
        self.metrics = metrics
        self.timeout = backplane.timeout
        self.fleet = FleetTokens(policy.rate, policy.burst, now, rng)
        self.store = fleet_store(backplane)
        self._task: asyncio.Task | None = None

    # -- what the server calls ---------------------------------------------------------

    def admit(self, ip: str, now: float) -> Verdict:
        fleet = self.fleet
        self._maybe_lease(now)
        if not fleet.available(now):
            refused = self.local.refused
            refused["rate"] = refused.get("rate", 0) + 1
            return Verdict(False, "rate", fleet.refuse(now))
        verdict = self.local.admit(ip, now)
        if verdict.admitted:
            fleet.spend(now)
            self._maybe_lease(now)
        return verdict

    def release(self, ip: str) -> None:
        self.local.release(ip)

    def expire(self, now: float) -> int:
        self._maybe_lease(now)  # the tick keeps the pool ready between storms
        return self.local.expire(now)

    def reconfigure(self, policy: AdmissionPolicy, now: float) -> None:
        self.policy = policy
        self.fleet.reconfigure(policy.rate, policy.burst, now)
        self.local.reconfigure(local_policy(policy), now)

    def __getattr__(self, name: str) -> Any:  # open, per_ip, refused, tracked_addresses, ...
        return getattr(self.local, name)

    async def start(self) -> None:
        """The first lease, awaited, so the first connections find tokens (or the fallback)."""
        loop = asyncio.get_running_loop()
        want = self.fleet.want_lease(loop.time())
        if want:
            await self._lease_once(want, self.fleet.reported(), loop)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except BaseException:  # cancelled, or the lease failed as it was ending
                pass
        await self.store.aclose()

    # -- leases ------------------------------------------------------------------------

    def _maybe_lease(self, now: float) -> None:
        want = self.fleet.want_lease(now)
        if want:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._lease_once(want, self.fleet.reported(), loop))

    async def _lease_once(self, want: int, refused: int, loop: asyncio.AbstractEventLoop) -> None:
        policy = self.policy
        try:
            answer = await asyncio.wait_for(
                self.store.lease(policy.rate, self.fleet.burst, want, refused, self.instance), self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.fleet.unreported += refused
            self.metrics.backplane_failed()
            if self.fleet.lost(loop.time()):
                self.metrics.admission_fallback(True)
                log.warning("admission: the fleet's connection budget is unreachable (%s); admitting at this "
                            "instance's share, %.1f connections/s, until it is back", exc,
                            self.fleet.fallback.rate)
            return
        granted, wait_ms, queue_ms, active = answer
        if self.fleet.granted(LeaseAnswer(granted, wait_ms / 1000, queue_ms / 1000, active), loop.time()):
            self.metrics.admission_fallback(False)
            log.warning("admission: the fleet's connection budget is reachable again (%d instance(s) share "
                        "%g connections/s)", active, policy.rate)


def local_policy(policy: AdmissionPolicy) -> AdmissionPolicy:
    """The instance's part of `policy` when the fleet holds the rate bucket."""
    return AdmissionPolicy(max_connections=policy.max_connections,
                           max_connections_per_ip=policy.max_connections_per_ip, ip_rate=policy.ip_rate,
                           ip_burst=policy.ip_burst, table_size=policy.table_size)

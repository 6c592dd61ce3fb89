"""Network backplanes: what Redis and NATS share, and the factory that picks one from config.

Theory of operation
===================

`make_backplane` turns ``[backplane] kind`` into the `Backplane` a hub uses:
`MemoryBackplane` (the default), `RedisBackplane`, `RedisClusterBackplane` or
`NatsBackplane`.  Each hub gets
its own, named by the hub's path (`hub_namespace`), so two hubs never share a
channel by accident.

`NetworkBackplane` is the part both network adapters share:

* **Ordering.**  Publications heard on the live feed go through an
  `edgeproxy.hub.ordering.Orderer`; a gap (a lost or late live message) is filled
  from the backplane's own history (`fill`), so the hub sees each publication once,
  in seq order, even across a reconnect.
* **Interest.**  ``subscribe`` starts the channel in the orderer unplaced, makes
  the feed subscription (``_feed_subscribe``, which returns once the server
  confirmed it), then reads the channel's position (``_position``) and places it.
* **Outage.**  When the feed connection is lost the adapter calls `lost`: the
  outage is logged and counted (``backplane_failed``), ``up`` turns False so that
  publishes fail at once with `BackplaneUnavailable` (the publish API answers 503),
  and `_reconnect_loop` tries again with exponential backoff and full jitter.
  Once back, every channel of interest is subscribed again and filled from its
  last delivered position: subscribers connected through the outage miss nothing
  that history still holds.

Adapters implement ``_connect``, ``_feed_subscribe``, ``_feed_unsubscribe``,
``_position``, ``publish`` and ``history``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import asyncio
import logging
import os
import random
import re
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from edgeproxy.errors import EdgeProxyError
from edgeproxy.hub.backplane import Backplane, HistoryResult, MemoryBackplane
from edgeproxy.hub.ordering import Orderer
from edgeproxy.hub.protocol import Position, Publication

if TYPE_CHECKING:
    from edgeproxy.config import BackplaneConfig, HubConfig
    from edgeproxy.metrics import Metrics

__all__ = ["BackplaneUnavailable", "NetworkBackplane", "backoff_delay", "hub_namespace", "instance_id",
           "make_backplane"]

log = logging.getLogger("edgeproxy")


#: client-library errors that mean "the connection is gone" (names: no import of either library here)
_CONNECTION_ERRORS = {"ConnectionError", "ConnectionClosedError", "NoServersError", "StaleConnectionError",
                      "OutboundBufferLimitError", "UnexpectedEOF"}


class BackplaneUnavailable(EdgeProxyError):
    """The backplane cannot take the call now (lost, reconnecting, or too slow): answer 503."""

    status_hint = 503


def backoff_delay(attempt: int, low: float, high: float, rand: Callable[[], float] = random.random) -> float:
    """The wait before reconnect attempt ``attempt`` (0, 1, ...): full jitter, uniform in
    ``[0, min(high, low * 2**attempt)]``."""
    return rand() * min(high, low * (2 ** min(attempt, 30)))


def hub_namespace(path: str) -> str:
    """A hub path as a name usable in keys and NATS subjects: ``/hub`` -> ``hub``."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", path.strip("/"))
    return name or "root"


def instance_id(config: BackplaneConfig) -> str:
    """The configured ``instance_id``, else host name and 4 random bytes."""
    if config.instance_id is not None:
        return config.instance_id
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.urandom(4).hex()}"


def make_backplane(config: BackplaneConfig, hub: HubConfig, metrics: Metrics, instance: str) -> Backplane:
    """The backplane ``[backplane] kind`` asks for, for one hub."""
    if config.kind == "redis":
        from edgeproxy.transport.redis_backplane import RedisBackplane
        return RedisBackplane(config, hub, metrics, instance)
    if config.kind == "redis-cluster":
        from edgeproxy.transport.redis_cluster import RedisClusterBackplane
        return RedisClusterBackplane(config, hub, metrics, instance)
    if config.kind == "nats":
        from edgeproxy.transport.nats_backplane import NatsBackplane
        return NatsBackplane(config, hub, metrics, instance)
    return MemoryBackplane(hub.history_size, hub.history_ttl, clock=time.monotonic)


class NetworkBackplane(ABC):
    """The shared half of the Redis and NATS adapters (see the module doc)."""

    kind = "network"

    def __init__(self, config: BackplaneConfig, hub: HubConfig, metrics: Metrics, instance: str):
        self.config = config
        self.hub = hub
        self.metrics = metrics
        self.instance = instance
        self.namespace = hub_namespace(hub.path)
        self.orderer = Orderer()
        self.interest: set[str] = set()
        self.up = False
        self._deliver: Callable[[Publication], None] | None = None
        self._tasks: set[asyncio.Task] = set()
        self._reconnecting: asyncio.Task | None = None
        self._closing = False
        self._down_since = 0.0
        #: extra feed subscriptions (e.g. the instance-addressed one): name -> callback
        self.extra_feeds: dict[str, Callable[[bytes], None]] = {}

    # -- what adapters implement -----------------------------------------------------

    @abstractmethod
    async def _connect(self) -> None:
        """Implemented by each adapter (Redis, NATS)."""

    @abstractmethod
    async def _disconnect(self) -> None:
        """Implemented by each adapter (Redis, NATS)."""

    @abstractmethod
    async def _feed_subscribe(self, channel: str) -> None:
        """Implemented by each adapter (Redis, NATS)."""

    @abstractmethod
    async def _feed_unsubscribe(self, channel: str) -> None:
        """Implemented by each adapter (Redis, NATS)."""

    @abstractmethod
    async def _position(self, channel: str) -> Position | None:
        """Implemented by each adapter (Redis, NATS)."""

    @abstractmethod
    async def history(self, channel: str, since: Position | None) -> HistoryResult:
        """Implemented by each adapter (Redis, NATS)."""

    # -- the Backplane interface -----------------------------------------------------

    async def start(self, deliver: Callable[[Publication], None]) -> None:
        self._deliver = deliver
        self._closing = False
        try:
            await asyncio.wait_for(self._connect(), self.config.timeout)
        except Exception as exc:
            # Start anyway and keep trying: the proxy serves what it can meanwhile.
            self.lost(exc)
        else:
            self.up = True

    async def close(self) -> None:
        self._closing = True
        self._deliver = None
        self.up = False
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self._disconnect()

    async def subscribe(self, channel: str) -> None:
        self.interest.add(channel)
        self.orderer.start(channel)
        self._check_up()
        try:
            await asyncio.wait_for(self._feed_subscribe(channel), self.config.timeout)
            position = await asyncio.wait_for(self._position(channel), self.config.timeout)
        except Exception as exc:
            raise self._failure("subscribe", exc) from exc
        if position is not None:
            self._run(*self.orderer.place(channel, position), channel)

    async def unsubscribe(self, channel: str) -> None:
        self.interest.discard(channel)
        self.orderer.stop(channel)
        if self.up:
            try:
                await asyncio.wait_for(self._feed_unsubscribe(channel), self.config.timeout)
            except Exception as exc:
                raise self._failure("unsubscribe", exc) from exc

    # -- delivery ------------------------------------------------------------------------

    def offer(self, pub: Publication) -> None:
        """A publication from the live feed (on the loop thread)."""
        if pub.channel in self.interest:
            self._run(*self.orderer.offer(pub), pub.channel)

    def _run(self, deliver: list[Publication], fill: Position | None, channel: str) -> None:
        callback = self._deliver
        if callback is not None:
            for pub in deliver:
                callback(pub)
        if fill is not None:
            self._spawn(self._fill(channel, fill))

    async def _fill(self, channel: str, since: Position) -> None:
        for attempt in range(1000):
            try:
                result = await asyncio.wait_for(self.history(channel, since), self.config.timeout)
            except Exception as exc:
                log.warning("backplane %s: reading %r history to fill a gap after seq %d failed: %s",
                            self.kind, channel, since.seq, exc)
                self.metrics.backplane_failed()
                await asyncio.sleep(backoff_delay(attempt, self.config.reconnect_min, self.config.reconnect_max))
                continue
            lost_before = self.orderer.lost
            self._run(*self.orderer.filled(channel, since, result.missed, result.recovered), channel)
            if self.orderer.lost != lost_before:
                log.warning("backplane %s: %d publication(s) of %r were lost: history no longer holds them",
                            self.kind, self.orderer.lost - lost_before, channel)
            return

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- outage --------------------------------------------------------------------------

    def _check_up(self) -> None:
        if not self.up:
            self.metrics.backplane_failed()
            raise BackplaneUnavailable(f"the {self.kind} backplane is unavailable (reconnecting)")

    def _failure(self, what: str, exc: BaseException) -> BackplaneUnavailable:
        """Count a failed call and say why, as the error to raise."""
        self.metrics.backplane_failed()
        if isinstance(exc, BackplaneUnavailable):
            return exc
        if isinstance(exc, (ConnectionError, OSError)) or type(exc).__name__ in _CONNECTION_ERRORS:
            self.lost(exc)  # evidence the connection is gone: do not wait for the feed to notice
        reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        return BackplaneUnavailable(f"{self.kind} backplane {what} failed: {reason}")

    def lost(self, exc: BaseException | None) -> None:
        """The connection to the backplane is gone: log, count, and reconnect in the background."""
        if self._closing:
            return
        if self.up or self._reconnecting is None:
            self._down_since = time.monotonic()
            log.error("backplane %s lost (%s): publishes fail with 503 until it is back; reconnecting",
                      self.kind, exc or "connection closed")
            self.metrics.backplane_failed()
        self.up = False
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        attempt = 0
        while not self._closing:
            await asyncio.sleep(backoff_delay(attempt, self.config.reconnect_min, self.config.reconnect_max))
            attempt += 1
            try:
                await self._disconnect()
                await asyncio.wait_for(self._connect(), self.config.timeout)
                channels = list(self.interest)
                for channel in channels:
                    await asyncio.wait_for(self._feed_subscribe(channel), self.config.timeout)
            except Exception as exc:
                log.info("backplane %s: reconnect attempt %d failed: %s", self.kind, attempt, exc)
                continue
            self.up = True
            log.warning("backplane %s reconnected after %.1f s (%d attempt(s)); filling %d channel(s) from history",
                        self.kind, time.monotonic() - self._down_since, attempt, len(channels))
            for channel in channels:
                position = self.orderer.position(channel)
                if position is not None and position.epoch is not None:
                    self._spawn(self._fill(channel, position))
                elif channel in self.interest:
                    self._spawn(self._place_later(channel))
            return

    async def _place_later(self, channel: str) -> None:
        try:
            position = await asyncio.wait_for(self._position(channel), self.config.timeout)
        except Exception as exc:
            self.lost(exc)
            return
        if position is not None:
            self._run(*self.orderer.place(channel, position), channel)

"""The NATS backplane: JetStream keeps each channel's history, core NATS spreads it.

Theory of operation
===================

Names of one hub (``P`` = ``[backplane] prefix``, ``N`` = the hub's namespace; ``T``
= the channel as one subject token: ``.`` becomes ``%2E``, ``%`` never occurs in a
channel name):

=======================  =================================================================
stream ``P_N``           subjects ``P.N.h.>``; ``max_msgs_per_subject = history_size + 1``,
                         ``max_age = history_ttl`` (a day when that is 0), file storage,
                         ``[backplane] replicas`` replicas
subject ``P.N.h.T``      the channel's history; each message has the headers
                         ``Edgeproxy-Seq`` and ``Edgeproxy-Epoch``
subject ``P.N.l.T``      the live feed (core NATS), same payload and headers
=======================  =================================================================

**Publish.**  The channel's next seq is the last stored message's seq + 1 (same
epoch).  The message is stored with ``Nats-Expected-Last-Subject-Sequence`` set to
the stream sequence of that last message, so when two instances race, JetStream
takes one and refuses the other (error 10071), which reads the new last message
and tries again: seqs are consistent across instances with no other lock.  Only
after JetStream acknowledged the store is the live copy sent on ``P.N.l.T``, so a
publication is stored before anybody hears it (contract point 2).  When the subject
holds nothing (a new channel, or its history aged out), a new epoch starts at seq 1.
The last message is cached per channel, so a lone publisher pays one round trip.

**Order.**  Live copies of two instances can cross on the way; the
`edgeproxy.hub.ordering.Orderer` of `NetworkBackplane` holds a publication that
arrives early and fills the gap from JetStream.

**History** reads the last message (direct get) for the position and, for a
resume, the subject's retained messages through an ephemeral pull consumer
(``history_size + 1`` at most).  A channel with no message gets a marker message
(seq 0, new epoch; stored only if the subject is still empty) so that the epoch a
subscriber is told is the one publications will carry.

**Cluster.**  ``urls`` lists servers of one NATS cluster; the stream has
``[backplane] replicas`` replicas (3 by default with 3 servers listed), so a
stored publication survives the loss of one server of three.  With more than one
replica the last message is read from the stream leader (``STREAM.MSG.GET``), not
with a direct get, which any replica may answer from a state that lags behind
the last acknowledged store: a resume would then be told ``recovered: false``
for a position it did see.  While the leader of a stream is being elected (a
server was lost) its publishes fail (503) and succeed again once a new leader is
up; a publish that timed out is in doubt (it may have been stored, and then has
its seq like any other).

On a clustered stream ``Nats-Expected-Last-Subject-Sequence`` alone does not
serialize racing publishers: the leader checks it against what is stored, not
against proposals still being replicated, so two stores expecting the same last
message can both be taken (nats-server issue 4320, seen with Debian's 2.9.10:
two publications numbered alike).  Each store therefore also carries
``Nats-Msg-Id: T/<expected stream seq>``: JetStream's duplicate detection does
count proposals in flight, so a second successor of the same message is refused
as a duplicate and its publisher reads the new last message and tries again.  The
``duplicate_window`` is ``min(10 s, max_age)``: the race is with a store still in
flight, and a later one fails the expected-sequence check anyway; a short window
keeps the leader's table of ids small at high publication rates.  A single server
checks the expected sequence under the stream's lock, so there are no ids there.  The first store on an empty
subject (a new epoch: no predecessor to name) checks instead that it is the
subject's first message and, if another got in first, deletes its own and tries
again.

The connection is made without nats-py's own reconnect: `NetworkBackplane` owns the
backoff with jitter, and on a lost connection a publish fails at once instead of
waiting in nats-py's buffer.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import nats
from nats.errors import ConnectionClosedError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from edgeproxy.hub.backplane import HistoryResult, random_epoch
from edgeproxy.hub.protocol import Position, Publication
from edgeproxy.transport.backplanes import NetworkBackplane

if TYPE_CHECKING:
    from edgeproxy.config import BackplaneConfig, HubConfig
    from edgeproxy.metrics import Metrics

__all__ = ["NatsBackplane", "subject_token"]

SEQ = "Edgeproxy-Seq"
EPOCH = "Edgeproxy-Epoch"
EXPECT = "Nats-Expected-Last-Subject-Sequence"
MSG_ID = "Nats-Msg-Id"
#: seconds JetStream remembers a store's Nats-Msg-Id: the refusal it is for is of a
#: store racing one still in flight (a later one fails the expected-sequence check)
DUPLICATE_WINDOW = 10.0
WRONG_LAST_SEQUENCE = 10071


def subject_token(channel: str) -> str:
    """A channel name as one NATS subject token (``.`` separates tokens)."""
    return channel.replace(".", "%2E")


def _channel(token: str) -> str:
    return token.replace("%2E", ".")


class _Last:
    """The last stored message of a channel: its stream sequence, seq and epoch."""

    __slots__ = ("stream_seq", "seq", "epoch")

    def __init__(self, stream_seq: int, seq: int, epoch: str):
        self.stream_seq, self.seq, self.epoch = stream_seq, seq, epoch


class NatsBackplane(NetworkBackplane):
    """`Backplane` on NATS with JetStream; see the module doc."""

    kind = "nats"

    def __init__(self, config: BackplaneConfig, hub: HubConfig, metrics: Metrics, instance: str):
        super().__init__(config, hub, metrics, instance)
        base = f"{config.prefix}.{self.namespace}"
        self.stream = f"{config.prefix}_{self.namespace}"
        self.history_base = base + ".h."
        self.live_base = base + ".l."
        self.nc: nats.NATS | None = None
        self.js = None
        self.subs: dict[str, object] = {}
        self.last: dict[str, _Last] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    # -- connection ------------------------------------------------------------------

    async def _connect(self) -> None:
        async def closed() -> None:
            if self.nc is nc:
                self.lost(ConnectionError("connection to NATS closed"))

        async def error(exc: Exception) -> None:
            pass  # every failure also closes the connection (no reconnect): reported by closed()

        nc = await nats.connect(
            servers=list(self.config.urls), name=f"edgeproxy {self.instance}", allow_reconnect=False,
            connect_timeout=max(1, int(self.config.timeout)), closed_cb=closed, disconnected_cb=closed,
            error_cb=error, ping_interval=max(1, int(self.config.heartbeat_interval * 2)), max_outstanding_pings=2,
        )
        self.nc, self.js = nc, nc.jetstream(timeout=self.config.timeout)
        self.subs.clear()
        self.last.clear()
        stream = StreamConfig(
            name=self.stream, subjects=[self.history_base + ">"],
            max_msgs_per_subject=self.hub.history_size + 1, max_age=self.hub.history_ttl or 86400.0,
            storage=StorageType.FILE, allow_direct=True, num_replicas=self.config.replicas,
            duplicate_window=min(DUPLICATE_WINDOW, self.hub.history_ttl or 86400.0),
        )
        if not await self._stream_is(stream):
            try:
                await self.js.add_stream(stream)
            except BadRequestError:  # exists with other limits (the config changed): take ours
                await self.js.update_stream(stream)
        for name, callback in self.extra_feeds.items():
            await nc.subscribe(name, cb=lambda msg, cb=callback: cb(msg.data))
        await nc.flush(timeout=self.config.timeout)

    async def _stream_is(self, wanted: StreamConfig) -> bool:
        """Whether the stream exists with ``wanted``'s limits.  Asked first because the
        stream's leader answers it, while creating goes through the cluster's meta leader:
        a reconnect after the meta leader's server died need not wait for a new one."""
        try:
            have = (await self.js.stream_info(self.stream)).config
        except NotFoundError:
            return False
        fields = ("subjects", "max_msgs_per_subject", "max_age", "num_replicas", "duplicate_window", "allow_direct")
        return all(getattr(have, name) == getattr(wanted, name) for name in fields)

    async def _disconnect(self) -> None:
        nc, self.nc = self.nc, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()
            except Exception:  # already broken
                pass

    def _nc(self) -> nats.NATS:
        nc = self.nc
        if nc is None or not nc.is_connected:
            raise ConnectionClosedError()
        return nc

    # -- the feed --------------------------------------------------------------------

    async def _on_live(self, msg) -> None:
        headers = msg.headers or {}
        try:
            pub = Publication(_channel(msg.subject[len(self.live_base):]), int(headers[SEQ]), headers[EPOCH], msg.data)
        except (KeyError, ValueError):
            return  # not ours
        self.offer(pub)

    async def _feed_subscribe(self, channel: str) -> None:
        nc = self._nc()
        self.subs[channel] = await nc.subscribe(self.live_base + subject_token(channel), cb=self._on_live)
        await nc.flush(timeout=self.config.timeout)

    async def _feed_unsubscribe(self, channel: str) -> None:
        sub = self.subs.pop(channel, None)
        if sub is not None:
            await sub.unsubscribe()

    async def _position(self, channel: str) -> Position | None:
        last = await self._read_last(channel)
        return Position(0, None) if last is None else Position(last.seq, last.epoch)

    async def _read_last(self, channel: str) -> _Last | None:
        try:
            msg = await self.js.get_last_msg(self.stream, self.history_base + subject_token(channel),
                                             direct=self.config.replicas == 1)
        except NotFoundError:
            self.last.pop(channel, None)
            return None
        last = self.last[channel] = _Last(msg.seq, int(msg.headers[SEQ]), msg.headers[EPOCH])
        return last

    async def _store(self, channel: str, last: _Last | None, data: bytes, seq: int, epoch: str) -> _Last | None:
        """Store ``data`` as ``seq`` after ``last``; None when another instance got there first."""
        subject = self.history_base + subject_token(channel)
        after = last.stream_seq if last is not None else 0
        headers = {EXPECT: str(after), SEQ: str(seq), EPOCH: epoch}
        clustered = self.config.replicas > 1
        if after and clustered:  # one successor per predecessor (see "Cluster" in the module doc)
            headers[MSG_ID] = f"{subject_token(channel)}/{after}"
        try:
            ack = await self.js.publish(subject, data, headers=headers)
        except BadRequestError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                return None
            raise
        if ack.duplicate:
            return None
        if not after and clustered and not await self._first_of_subject(subject, ack.seq):
            return None
        stored = self.last[channel] = _Last(ack.seq, seq, epoch)
        return stored

    async def _first_of_subject(self, subject: str, stream_seq: int) -> bool:
        """Whether the message stored at ``stream_seq`` on an empty subject is the subject's
        first; if another one got in first, ours is deleted."""
        first = await self.js.get_msg(self.stream, seq=1, subject=subject, next=True)
        if first.seq == stream_seq:
            return True
        await self.js.delete_msg(self.stream, stream_seq)
        return False

    # -- publish and history ---------------------------------------------------------

    async def publish(self, channel: str, data: bytes) -> Position:
        self._check_up()
        lock = self.locks.get(channel)
        if lock is None:
            lock = self.locks[channel] = asyncio.Lock()
        try:
            async with lock:
                position = await asyncio.wait_for(self._publish(channel, data), self.config.timeout)
        except Exception as exc:
            raise self._failure("publish", exc) from exc
        finally:
            if not lock.locked() and not lock._waiters:
                self.locks.pop(channel, None)
        return position

    async def _publish(self, channel: str, data: bytes) -> Position:
        self._nc()
        last = self.last.get(channel)
        while True:
            if last is None or last.epoch is None:
                stored = await self._store(channel, last, data, 1, random_epoch())
            else:
                stored = await self._store(channel, last, data, last.seq + 1, last.epoch)
            if stored is not None:
                break
            last = await self._read_last(channel)  # somebody else published: look again
        headers = {SEQ: str(stored.seq), EPOCH: stored.epoch}
        await self.nc.publish(self.live_base + subject_token(channel), data, headers=headers)
        return Position(stored.seq, stored.epoch)

    async def history(self, channel: str, since: Position | None) -> HistoryResult:
        try:
            return await asyncio.wait_for(self._history(channel, since), self.config.timeout)
        except Exception as exc:
            raise self._failure("history read", exc) from exc

    async def _history(self, channel: str, since: Position | None) -> HistoryResult:
        self._nc()
        last = await self._read_last(channel)
        while last is None:  # a new channel: fix its epoch with a marker (seq 0)
            last = await self._store(channel, None, b"", 0, random_epoch()) or await self._read_last(channel)
        position = Position(last.seq, last.epoch)
        if since is None or since.epoch != last.epoch or since.seq > last.seq:
            return HistoryResult(position, [], False)
        if since.seq == last.seq:
            return HistoryResult(position, [], True)
        if last.seq - since.seq > self.hub.history_size:
            return HistoryResult(position, [], False)
        psub = await self.js.pull_subscribe(
            self.history_base + subject_token(channel), stream=self.stream,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
                                  inactive_threshold=2.0, mem_storage=True, num_replicas=1),
        )
        try:
            msgs = await psub.fetch(batch=self.hub.history_size + 1, timeout=self.config.timeout)
        finally:
            await psub.unsubscribe()
        missed = []
        for msg in msgs:
            headers = msg.headers or {}
            if headers.get(EPOCH) != last.epoch:
                continue
            seq = int(headers[SEQ])
            if since.seq < seq <= last.seq:
                missed.append((seq, msg.data))
        if not missed or missed[0][0] != since.seq + 1 or missed[-1][0] != last.seq:
            return HistoryResult(position, [], False)
        return HistoryResult(position, missed, True)


"""History ring, streams, the channel registry's resume merge and the in-memory backplane."""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest

from edgeproxy.core.frames import parse_header
from edgeproxy.hub.backplane import MemoryBackplane
from edgeproxy.hub.channels import ChannelRegistry
from edgeproxy.hub.history import HistoryRing, Stream
from edgeproxy.hub.protocol import Position, Publication


def messages(blob: bytes) -> list[dict]:
    """Every TEXT frame's JSON in a blob of concatenated server frames."""
    out, pos = [], 0
    while pos < len(blob):
        _fin, _rsv, _op, _mask, length, header_len = parse_header(blob, pos)
        out.append(orjson.loads(blob[pos + header_len : pos + header_len + length]))
        pos += header_len + length
    return out


# -- ring and stream ------------------------------------------------------------


def test_ring_keeps_size_and_ttl() -> None:
    ring = HistoryRing(3, 10.0)
    for seq in range(1, 6):
        ring.append(seq, b"%d" % seq, now=float(seq))
    assert ring.after(2, 5, now=5.0) == [(3, b"3"), (4, b"4"), (5, b"5")]
    assert ring.after(1, 5, now=5.0) is None  # seq 2 was pushed out
    assert ring.after(5, 5, now=5.0) == [] and ring.after(6, 5, now=5.0) is None
    assert ring.after(3, 5, now=13.0) == [(4, b"4"), (5, b"5")]  # 3 expired at 13
    assert ring.after(3, 5, now=15.0) is None and len(ring) == 0


def test_zero_size_ring_recovers_only_an_up_to_date_position() -> None:
    stream = Stream("e1", 0, 0.0, now=0.0)
    stream.append(b"1", 0.0)
    assert stream.read_since(Position(1, "e1"), 1.0) == ([], True)
    assert stream.read_since(Position(0, "e1"), 1.0) == ([], False)


def test_stream_epochs() -> None:
    stream = Stream("e1", 10, 0.0, now=0.0)
    assert [stream.append(b"x", 0.0) for _ in range(3)] == [1, 2, 3]
    assert stream.read_since(Position(1, "e1"), 0.0) == ([(2, b"x"), (3, b"x")], True)
    assert stream.read_since(Position(1, "e0"), 0.0) == ([], False)
    assert stream.read_since(None, 0.0) == ([], False)
    assert stream.read_since(Position(9, "e1"), 0.0) == ([], False)


# -- registry ---------------------------------------------------------------------


class Sub:
    def __init__(self, name: str):
        self.name = name
        self.received = bytearray()


def test_batches_coalesce_only_while_the_snapshot_is_the_same() -> None:
    reg = ChannelRegistry()
    a, b = Sub("a"), Sub("b")
    reg.begin("c", a)
    reg.complete("c", a, "ta", Position(0, "e"), [], False)
    reg.publication(Publication("c", 1, "e", b"1"))
    channel = reg.publication(Publication("c", 2, "e", b"2"))
    reg.begin("c", b)
    reg.complete("c", b, "tb", Position(2, "e"), [], True)
    reg.publication(Publication("c", 3, "e", b"3"))
    snap, blob, n = channel.next_batch()
    assert snap == ((a,), ("ta",)) and n == 2 and [m["seq"] for m in messages(blob)] == [1, 2]
    snap, blob, n = channel.next_batch()
    assert snap == ((a, b), ("ta", "tb")) and n == 1 and [m["seq"] for m in messages(blob)] == [3]
    assert channel.next_batch() is None
    assert channel.snapshot() is snap  # not rebuilt without a change


def test_publications_without_members_are_not_queued() -> None:
    reg = ChannelRegistry()
    assert reg.publication(Publication("nobody", 1, "e", b"1")) is None
    sub = Sub("s")
    reg.begin("c", sub)
    assert reg.publication(Publication("c", 1, "e", b"1")) is None  # only buffered for the pending one
    assert reg.remove("c", sub) is True and reg.get("c") is None


def test_complete_after_leaving_gives_nothing() -> None:
    reg = ChannelRegistry()
    sub = Sub("s")
    reg.begin("c", sub)
    reg.begin("c", Sub("other"))
    assert reg.remove("c", sub) is False
    assert reg.complete("c", sub, "t", Position(0, "e"), [], True) == []


@pytest.mark.parametrize("seed", range(40))
def test_resume_is_gapless_and_duplicate_free_under_any_interleaving(seed: int) -> None:
    """Publications, subscribes with `since`, history reads and batch writes in random order.

    Every subscriber must end up with exactly the seqs after its `since`, in order.
    """
    rng = random.Random(seed)
    stream = Stream("e1", 1000, 0.0, now=0.0)
    reg = ChannelRegistry()
    subs: dict[Sub, int] = {}
    in_flight: list[tuple[Sub, Position, list, bool]] = []  # history read but not completed

    def write_batches() -> None:
        channel = reg.get("c")
        while channel is not None and (batch := channel.next_batch()) is not None:
            snap, blob, _ = batch
            for sub in snap[0]:
                sub.received += blob

    for _ in range(300):
        action = rng.random()
        if action < 0.45:
            seq = stream.append(b'"p"', 0.0)
            reg.publication(Publication("c", seq, "e1", b'"p"'))  # stored before delivered
        elif action < 0.6:
            sub = Sub(f"s{len(subs)}")
            since = rng.randint(0, stream.seq)
            subs[sub] = since
            reg.begin("c", sub)
            # the history read may finish later than it started: read now, complete later
            missed, recovered = stream.read_since(Position(since, "e1"), 0.0)
            in_flight.append((sub, stream.position, missed, recovered))
        elif action < 0.8 and in_flight:
            sub, position, missed, recovered = in_flight.pop(rng.randrange(len(in_flight)))
            assert recovered
            for frame in reg.complete("c", sub, sub, position, missed, recovered):
                sub.received += frame
        else:
            write_batches()
    for sub, position, missed, recovered in in_flight:
        for frame in reg.complete("c", sub, sub, position, missed, recovered):
            sub.received += frame
    write_batches()
    for sub, since in subs.items():
        got = messages(bytes(sub.received))
        assert got[0]["op"] == "subscribed" and got[0]["recovered"] is True
        seqs = [m["seq"] for m in got[1:]]
        assert seqs == list(range(since + 1, stream.seq + 1)), (sub.name, since)


# -- memory backplane ---------------------------------------------------------------


def test_memory_backplane_orders_stores_and_delivers_to_interest() -> None:
    clock = [0.0]
    epochs = iter(["e1", "e2"])
    delivered: list[Publication] = []
    bp = MemoryBackplane(history_size=2, history_ttl=10.0, clock=lambda: clock[0], new_epoch=lambda: next(epochs))

    async def scenario() -> None:
        await bp.start(delivered.append)
        assert await bp.publish("c", b"1") == Position(1, "e1")  # nobody interested: stored only
        await bp.subscribe("c")
        assert await bp.publish("c", b"2") == Position(2, "e1")
        assert await bp.publish("c", b"3") == Position(3, "e1")
        assert delivered == [Publication("c", 2, "e1", b"2"), Publication("c", 3, "e1", b"3")]
        assert await bp.history("c", Position(1, "e1")) == (Position(3, "e1"), [(2, b"2"), (3, b"3")], True)
        assert (await bp.history("c", Position(0, "e1"))).recovered is False  # size 2
        await bp.unsubscribe("c")
        clock[0] = 100.0  # history expired and nobody interested: the stream is forgotten
        assert await bp.publish("c", b"4") == Position(1, "e2")
        result = await bp.history("c", Position(3, "e1"))
        assert result.position == Position(1, "e2") and result.recovered is False
        await bp.close()

    asyncio.run(scenario())

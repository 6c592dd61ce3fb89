"""The orderer (sans-IO): each publication once, in seq order, gaps filled from history."""

from __future__ import annotations

import pytest

from edgeproxy.hub.ordering import Orderer
from edgeproxy.hub.protocol import Position, Publication
from edgeproxy.hub.shards import jump_hash, shard_of, tenant_of


def pub(seq: int, epoch: str = "e") -> Publication:
    return Publication("c", seq, epoch, b"%d" % seq)


def seqs(pubs: list[Publication]) -> list[int]:
    return [p.seq for p in pubs]


def test_in_order_and_duplicates() -> None:
    o = Orderer()
    o.start("c", Position(2, "e"))
    assert seqs(o.offer(pub(3))[0]) == [3]
    assert o.offer(pub(3)) == ([], None) and o.offer(pub(1)) == ([], None)
    assert o.offer(Publication("other", 1, "e", b"")) == ([], None)  # not interested


def test_late_arrival_waits_for_a_fill_and_the_fill_dedupes() -> None:
    o = Orderer()
    o.start("c", Position(0, "e"))
    assert o.offer(pub(2)) == ([], Position(0, "e"))
    assert o.offer(pub(3)) == ([], None)  # a fill is under way already
    out, again = o.filled("c", Position(0, "e"), [(1, b"1"), (2, b"2")], True)
    assert seqs(out) == [1, 2, 3] and again is None
    assert o.offer(pub(1)) == ([], None)  # the live copy of 1 comes last: dropped


def test_a_fill_that_ends_before_newer_arrivals_asks_again() -> None:
    o = Orderer()
    o.start("c", Position(5, "e"))
    assert o.offer(pub(7))[1] == Position(5, "e")
    assert o.offer(pub(9)) == ([], None)
    out, again = o.filled("c", Position(5, "e"), [(6, b"6")], True)
    assert seqs(out) == [6, 7] and again == Position(7, "e")
    out, again = o.filled("c", again, [(8, b"8"), (9, b"9")], True)
    assert seqs(out) == [8, 9] and again is None


def test_unrecovered_gap_is_counted_and_skipped() -> None:
    o = Orderer()
    o.start("c", Position(1, "e"))
    o.offer(pub(5))
    out, again = o.filled("c", Position(1, "e"), [], False)
    assert seqs(out) == [5] and again is None and o.lost == 3


def test_new_epoch_starts_from_one() -> None:
    o = Orderer()
    o.start("c", Position(7, "old"))
    assert seqs(o.offer(pub(1, "new"))[0]) == [1]
    assert o.offer(pub(3, "new"))[1] == Position(1, "new")


def test_unplaced_channel_holds_until_placed() -> None:
    o = Orderer()
    o.start("c")
    assert o.position("c") is None
    for s in (4, 5, 3):
        assert o.offer(pub(s)) == ([], None)
    out, fill = o.place("c", Position(3, "e"))
    assert seqs(out) == [4, 5] and fill is None and o.position("c") == Position(5, "e")
    o.stop("c")
    assert o.offer(pub(6)) == ([], None)


def test_shards_place_by_tenant_and_move_little() -> None:
    assert tenant_of("acme:orders:7") == "acme" and tenant_of("news") == "news"
    assert shard_of("acme:a", 5) == shard_of("acme:b", 5)
    assert shard_of("x", 1) == 0
    tenants = [f"t{i}" for i in range(2000)]
    before = [shard_of(t, 4) for t in tenants]
    after = [shard_of(t, 5) for t in tenants]
    moved = sum(a != b for a, b in zip(before, after))
    assert all(b == 4 for a, b in zip(before, after) if a != b)  # moved ones go to the new shard only
    assert 300 < moved < 500  # about 1/5
    assert sorted(set(before)) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        jump_hash(1, 0)

"""The heap trimmer: when it calls malloc_trim, and that the call gives freed heap pages back (glibc)."""

from __future__ import annotations

import pytest

from edgeproxy.metrics import Metrics
from edgeproxy.transport import heap
from edgeproxy.transport.heap import MIN_FREE, HeapTrimmer


class FakeGlibc:
    """Stands in for (malloc_trim, mallinfo2): reports `free` bytes, records the trims."""

    def __init__(self, free: int):
        self.free = free
        self.trims = 0

    def trim(self, pad: int) -> int:
        assert pad == 0
        self.trims += 1
        return 1

    def info(self):
        return heap._MallInfo2(fordblks=self.free)


@pytest.fixture
def fake(monkeypatch) -> FakeGlibc:
    glibc = FakeGlibc(free=MIN_FREE * 4)
    monkeypatch.setattr(heap, "_glibc", lambda: (glibc.trim, glibc.info))
    return glibc


def test_trims_once_per_interval_when_enough_is_free(fake: FakeGlibc) -> None:
    metrics = Metrics(process=False)
    trimmer = HeapTrimmer(10.0, now=100.0, on_trim=metrics.heap_trimmed)
    assert trimmer.active
    trimmer.tick(105.0)
    assert fake.trims == 0  # not due yet
    trimmer.tick(110.0)
    trimmer.tick(115.0)
    assert fake.trims == 1  # the next one is due at 120
    trimmer.tick(120.5)
    assert fake.trims == 2
    assert metrics.heap_trims == 2 and metrics.heap_trim_seconds >= 0.0


def test_little_free_memory_is_not_worth_a_trim(fake: FakeGlibc) -> None:
    fake.free = MIN_FREE - 1
    trimmer = HeapTrimmer(1.0, now=0.0)
    for second in range(1, 6):
        trimmer.tick(float(second))
    assert fake.trims == 0
    fake.free = MIN_FREE
    trimmer.tick(6.0)
    assert fake.trims == 1


def test_interval_zero_never_trims_and_a_reload_can_change_it(fake: FakeGlibc) -> None:
    trimmer = HeapTrimmer(0.0, now=0.0)
    assert not trimmer.active
    trimmer.tick(1e9)
    assert fake.trims == 0
    trimmer.configure(5.0, now=100.0)
    trimmer.tick(104.0)
    assert fake.trims == 0
    trimmer.tick(105.0)
    assert fake.trims == 1
    trimmer.configure(0.0, now=200.0)
    trimmer.tick(1e9)
    assert fake.trims == 1


def test_without_glibc_it_does_nothing(monkeypatch) -> None:
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    trimmer = HeapTrimmer(1.0, now=0.0)
    assert not trimmer.active
    trimmer.tick(100.0)  # no error


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


@pytest.mark.skipif(heap._glibc() is None, reason="needs glibc >= 2.33 (malloc_trim, mallinfo2)")
def test_a_trim_gives_back_chunks_freed_inside_the_heap() -> None:
    """Free every other 64 KiB block (below the mmap threshold, so in the heap): the holes stay resident until a trim."""
    blocks = [bytearray(b"x" * 65536) for _ in range(1024)]  # 64 MiB, every page written
    keep = blocks[1::2]
    del blocks[::2]
    blocks.clear()
    before = _rss_kib()
    trims: list[float] = []
    trimmer = HeapTrimmer(1.0, now=0.0, on_trim=trims.append)
    trimmer.tick(1.0)
    after = _rss_kib()
    assert len(trims) == 1
    # 512 holes of 64 KiB: nearly all of their 32 MiB goes back (a hole's edge pages may stay)
    assert before - after > 16 * 1024, (before, after)
    assert len(keep) == 512

"""Micro-benchmarks of the frame hot paths: compiled vs pure vs wsproto.

Run with ``python3 -m pytest benchmarks/test_micro_frames.py --benchmark-only``
(``--benchmark-group-by=group`` is the default here: one table per operation and size).

* unmask: ``apply_mask`` of a 16 B / 1 KiB / 64 KiB payload; wsproto's
  ``XorMaskerSimple.process`` is the comparable operation.  ``bytes(memoryview)`` of the
  same size is the baseline: the cost of merely copying the payload once.
* scan: follow the frame boundaries of one masked client frame of that payload size
  (what the proxy does per read).  wsproto's ``FrameDecoder`` is the nearest thing, but
  it also unmasks and copies the payload, so it does strictly more work.
* scan many: 64 KiB made of 16-byte masked frames (per-frame overhead dominates).
* encode: a whole unmasked server frame (header + payload: what a fan-out sends) with
  ``encode_frame``; wsproto's server-side ``FrameProtocol._serialize_frame`` does the same.
  ``encode masked``: the same as a client frame; wsproto draws a fresh mask key with
  ``os.urandom(4)`` each time, so its row includes that (ours takes the key as argument).
  ``encode_header``: the header alone (7-, 16- and 64-bit length forms); no wsproto row,
  it has no separate header encoder.

The fan-out benchmarks are in ``test_micro_fanout.py``.
"""

from __future__ import annotations

import os

import pytest

from edgeproxy.core import frames as pure

try:
    from edgeproxy import _speedups as compiled
except ImportError:  # benchmarks just skip the compiled rows
    compiled = None

from wsproto import frame_protocol as wsfp  # a runtime dependency: always there

# encode_frame on the compiled primitives, built exactly as edgeproxy.core._accel does.
compiled_encode_frame = (
    None if compiled is None else pure.make_encode_frame(compiled.encode_header, compiled.apply_mask)
)

KEY = bytes([0x37, 0xFA, 0x21, 0x3D])
SIZES = {"16B": 16, "1KiB": 1024, "64KiB": 65536}
IMPLS = ["compiled", "pure"]


def _module(name):
    if name == "compiled":
        if compiled is None:
            pytest.skip("edgeproxy._speedups is not built")
        return compiled
    return pure


def _payload(n: int) -> bytes:
    return os.urandom(n)


# ---------------------------------------------------------------------------
# unmask


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", IMPLS)
def test_unmask(benchmark, impl, size):
    benchmark.group = f"unmask {size}"
    mod = _module(impl)
    data = _payload(SIZES[size])
    out = benchmark(mod.apply_mask, data, KEY)
    assert len(out) == len(data)


@pytest.mark.parametrize("size", list(SIZES))
def test_unmask_wsproto(benchmark, size):
    benchmark.group = f"unmask {size}"
    data = _payload(SIZES[size])

    def run():
        return wsfp.XorMaskerSimple(KEY).process(data)

    assert len(benchmark(run)) == len(data)


@pytest.mark.parametrize("size", list(SIZES))
def test_copy_baseline(benchmark, size):
    """bytes(memoryview): one copy of the payload, the floor for any unmask that returns bytes."""
    benchmark.group = f"unmask {size}"
    view = memoryview(_payload(SIZES[size]))
    assert len(benchmark(bytes, view)) == SIZES[size]


# ---------------------------------------------------------------------------
# scan one frame


def _frame(n: int) -> bytes:
    return pure.encode_frame(pure.OP_BINARY, _payload(n), mask_key=KEY)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", IMPLS)
def test_scan(benchmark, impl, size):
    benchmark.group = f"scan {size}"
    mod = _module(impl)
    frame = _frame(SIZES[size])

    def run():
        s = mod.FrameScanner()
        return s.scan(frame), s.messages

    assert benchmark(run) == (len(frame), 1)


@pytest.mark.parametrize("size", list(SIZES))
def test_scan_wsproto(benchmark, size):
    """wsproto's FrameDecoder (server side: unmasks and copies too - more work than a scan)."""
    benchmark.group = f"scan {size}"
    frame = _frame(SIZES[size])

    def run():
        dec = wsfp.FrameDecoder(client=False)
        dec.receive_bytes(frame)
        n = 0
        while dec.process_buffer() is not None:
            n += 1
        return n

    assert benchmark(run) == 1


# ---------------------------------------------------------------------------
# scan many small frames


SMALL_FRAMES = b"".join(_frame(16) for _ in range(65536 // 22))  # 22 bytes each on the wire


@pytest.mark.parametrize("impl", IMPLS)
def test_scan_many_small(benchmark, impl):
    benchmark.group = "scan 64KiB of 16B frames"
    mod = _module(impl)

    def run():
        s = mod.FrameScanner()
        s.scan(SMALL_FRAMES)
        return s.frames

    assert benchmark(run) == len(SMALL_FRAMES) // 22


def test_scan_many_small_wsproto(benchmark):
    benchmark.group = "scan 64KiB of 16B frames"

    def run():
        dec = wsfp.FrameDecoder(client=False)
        dec.receive_bytes(SMALL_FRAMES)
        n = 0
        while dec.process_buffer() is not None:
            n += 1
        return n

    assert benchmark(run) == len(SMALL_FRAMES) // 22


# ---------------------------------------------------------------------------
# encode


def _encoder(name):
    if name == "compiled":
        _module(name)  # skips when not built
        return compiled_encode_frame
    return pure.encode_frame


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", IMPLS)
def test_encode(benchmark, impl, size):
    """One unmasked server->client frame: header + payload as bytes."""
    benchmark.group = f"encode {size}"
    encode_frame = _encoder(impl)
    payload = _payload(SIZES[size])
    out = benchmark(encode_frame, pure.OP_BINARY, payload)
    assert out.endswith(payload) and pure.parse_header(out)[4] == len(payload)


@pytest.mark.parametrize("size", list(SIZES))
def test_encode_wsproto(benchmark, size):
    benchmark.group = f"encode {size}"
    proto = wsfp.FrameProtocol(client=False, extensions=[])
    payload = _payload(SIZES[size])
    out = benchmark(proto._serialize_frame, wsfp.Opcode.BINARY, payload)
    assert out.endswith(payload) and pure.parse_header(out)[4] == len(payload)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", IMPLS)
def test_encode_masked(benchmark, impl, size):
    """One masked client->server frame (header + key + masked payload)."""
    benchmark.group = f"encode masked {size}"
    encode_frame = _encoder(impl)
    payload = _payload(SIZES[size])
    out = benchmark(encode_frame, pure.OP_BINARY, payload, True, 0, KEY)
    assert out == pure.encode_frame(pure.OP_BINARY, payload, mask_key=KEY)


@pytest.mark.parametrize("size", list(SIZES))
def test_encode_masked_wsproto(benchmark, size):
    benchmark.group = f"encode masked {size}"
    proto = wsfp.FrameProtocol(client=True, extensions=[])
    payload = _payload(SIZES[size])
    out = benchmark(proto._serialize_frame, wsfp.Opcode.BINARY, payload)
    assert pure.parse_header(out)[3] is not None and pure.parse_header(out)[4] == len(payload)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", IMPLS)
def test_encode_header(benchmark, impl, size):
    benchmark.group = f"encode_header {size}"
    mod = _module(impl)
    out = benchmark(mod.encode_header, pure.OP_BINARY, SIZES[size])
    assert pure.parse_header(out)[4] == SIZES[size]

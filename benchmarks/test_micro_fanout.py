"""Micro-benchmarks of the fan-out: one 100-byte frame to 10,000 in-memory transports.

Run with ``python3 -m pytest benchmarks/test_micro_fanout.py --benchmark-only``.  One
table per transport kind and limit, each with three rows:

* ``bare``: ``for t in transports: t.write(frame)`` - the floor, no checks at all;
* ``compiled``: ``edgeproxy._speedups.write_many``;
* ``pure``: ``edgeproxy.core.fanout.write_many``.

The target is compiled <= 1.5x bare (the table's relative column, bare being the 1.0
row when it is the fastest).  ``write_many`` does strictly more than the bare loop - it
calls ``is_closing()`` on every transport, and ``get_write_buffer_size()`` too with a
limit - so the ratio says what those checks cost next to one cheap ``write``.  Every
transport's ``write`` only adds ``len(data)`` to a counter, the same for every row.

What that costs depends on what the transports' methods are, so there are three kinds:

``cython``
    A Cython ``cdef class`` with ``def`` methods - the same kind of object as uvloop's
    ``TCPTransport``/``UnixTransport``, whose ``write``, ``is_closing`` and
    ``get_write_buffer_size`` are Cython methods too.  This is the production case.  It
    is compiled from ``_CYTHON_TRANSPORT`` below when the session starts (a few
    seconds; its rows are skipped when that is not possible).
``slots``
    A Python class with ``__slots__`` and ``def`` methods.
``dict``
    An ordinary Python class (instances have a ``__dict__``).  The compiled code cannot
    prove that no instance attribute shadows a method, so it does a full
    ``obj.method()`` lookup per call here; the other kinds take its per-type cache.

With Python-level methods (``slots``, ``dict``) each of the extra calls runs Python code
that costs as much as the ``write`` itself, so no implementation can be near 1.5x there;
they are here to show what the compiled and pure code cost on such transports.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from edgeproxy.core import fanout as pure
from edgeproxy.core.frames import OP_TEXT, encode_frame

try:
    from edgeproxy import _speedups as compiled
except ImportError:  # benchmarks just skip the compiled rows
    compiled = None

N = 10_000
FRAME = encode_frame(OP_TEXT, b"x" * 98)
assert len(FRAME) == 100
LIMITS = {"no limit": 0, "limit 64KiB": 64 * 1024}

_CYTHON_TRANSPORT = """
# cython: language_level=3
cdef class Transport:
    '''In-memory transport shaped like uvloop's: a cdef class with def methods.'''
    cdef public Py_ssize_t written
    cdef public object buffered
    cdef public bint closing

    def __init__(self, buffered=0, closing=False):
        self.written = 0
        self.buffered = buffered
        self.closing = closing

    def write(self, data):
        self.written += len(data)

    def is_closing(self):
        return self.closing

    def get_write_buffer_size(self):
        return self.buffered
"""


class SlotsTransport:
    __slots__ = ("written", "buffered", "closing")

    def __init__(self, buffered=0, closing=False):
        self.written = 0
        self.buffered = buffered
        self.closing = closing

    def write(self, data):
        self.written += len(data)

    def is_closing(self):
        return self.closing

    def get_write_buffer_size(self):
        return self.buffered


class DictTransport:
    def __init__(self, buffered=0, closing=False):
        self.written = 0
        self.buffered = buffered
        self.closing = closing

    def write(self, data):
        self.written += len(data)

    def is_closing(self):
        return self.closing

    def get_write_buffer_size(self):
        return self.buffered


@pytest.fixture(scope="session")
def cython_transport(tmp_path_factory):
    """The Transport class of _CYTHON_TRANSPORT, built with `cythonize -i` in a temp dir."""
    where = tmp_path_factory.mktemp("fanout_transport")
    (where / "_bench_transport.pyx").write_text(_CYTHON_TRANSPORT)
    build = subprocess.run(
        [sys.executable, "-m", "Cython.Build.Cythonize", "-i", "-q", "_bench_transport.pyx"],
        cwd=where,
        capture_output=True,
        text=True,
    )
    built = sorted(where.glob("_bench_transport.*.so")) + sorted(where.glob("_bench_transport.*.pyd"))
    if build.returncode != 0 or not built:
        pytest.skip(f"could not build the Cython transport: {build.stderr[-500:]}")
    spec = importlib.util.spec_from_file_location("_bench_transport", built[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Transport


def bare_loop(transports, frame):
    for t in transports:
        t.write(frame)


@pytest.mark.parametrize("limit", list(LIMITS))
@pytest.mark.parametrize("variant", ["bare", "compiled", "pure"])
@pytest.mark.parametrize("kind", ["cython", "slots", "dict"])
def test_fanout(benchmark, request, kind, variant, limit):
    benchmark.group = f"fan-out 100 B to 10k {kind} transports, {limit}"
    cls = {"slots": SlotsTransport, "dict": DictTransport}.get(kind) or request.getfixturevalue("cython_transport")
    # Buffered sizes below the limit: the limited rows check every transport, skip none.
    transports = [cls(buffered=i % 1000) for i in range(N)]
    if variant == "bare":
        benchmark(bare_loop, transports, FRAME)
    else:
        if variant == "compiled" and compiled is None:
            pytest.skip("edgeproxy._speedups is not built")
        write_many = compiled.write_many if variant == "compiled" else pure.write_many
        assert benchmark(write_many, transports, FRAME, LIMITS[limit]) == []
    # Every transport got every frame.
    assert transports[0].written > 0
    assert all(t.written == transports[0].written for t in transports)

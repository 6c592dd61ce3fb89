"""Giving freed C-heap memory back to the kernel: glibc's ``malloc_trim``, from the shared tick.

Theory of operation
-------------------
A TLS connection holds C-heap memory that Python's allocator never sees:
OpenSSL's record buffers, BIOs and handshake state, uvloop's 256 KiB read
buffer, and CPython's 256 KiB result of every ``SSLObject.read``, shrunk to
the bytes read.  glibc's malloc keeps what is freed inside its heap and gives
back only the free top of the heap (``M_TRIM_THRESHOLD``); a free chunk below
one still in use stays resident.  Under connection churn the chunks in use
land at ever different places, so the resident set grows from one wave of
connections to the next while the memory in use does not.  Measured with the
soak test (500 TLS clients, six waves): malloc's bytes in use 6 MB after every
wave, its free bytes 29 MB after the warm-up and 150 MB after the first wave,
the RSS 85, 93, 104, 113, 123, 129 MB (README, "Soak test with faults").

`HeapTrimmer` asks glibc at most every ``interval`` seconds how much it holds
free (``mallinfo2``) and, above `MIN_FREE`, calls ``malloc_trim(0)``, which
also releases the free pages inside the heap (``MADV_DONTNEED``; the address
space stays mapped, so nothing moves).  A trim costs a system call per large
free chunk: 0.3 to 6 ms on the soak's heap, on the event loop.  Without these
functions (musl, macOS) the trimmer does nothing; under jemalloc or another
preloaded allocator glibc's heap stays empty and it does nothing either.
"""

from __future__ import annotations

import ctypes
import logging
import time
from typing import Any, Callable

log = logging.getLogger("edgeproxy")

__all__ = ["MIN_FREE", "HeapTrimmer"]

#: free bytes in glibc's heap below which a trim is not worth its system calls
MIN_FREE = 4 * 1024 * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc() -> tuple[Any, Any] | None:
    """(malloc_trim, mallinfo2) of the C library, or None when it has not both (not glibc >= 2.33)."""
    try:
        libc = ctypes.CDLL(None)
        trim, info = libc.malloc_trim, libc.mallinfo2
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    info.argtypes, info.restype = [], _MallInfo2
    return trim, info


class HeapTrimmer:
    """Trims glibc's heap at most every ``interval`` seconds (0 = never); `tick(now)` from the server's tick.

    ``on_trim(seconds)`` is told of every trim and how long it took.
    """

    def __init__(self, interval: float, now: float, *, on_trim: Callable[[float], None] | None = None,
                 min_free: int = MIN_FREE):
        self.interval = interval
        self.min_free = min_free
        self.on_trim = on_trim
        self._glibc = _glibc() if interval > 0 else None
        self._due = now + interval

    @property
    def active(self) -> bool:
        return self._glibc is not None

    def configure(self, interval: float, now: float) -> None:
        """A reload changed the interval: the next check is ``interval`` from now."""
        if interval != self.interval:
            self.interval = interval
            self._glibc = _glibc() if interval > 0 else None
            self._due = now + interval

    def tick(self, now: float) -> None:
        if self._glibc is None or now < self._due:
            return
        self._due = now + self.interval
        trim, info = self._glibc
        free = info().fordblks
        if free < self.min_free:
            return
        started = time.perf_counter()
        trim(0)
        took = time.perf_counter() - started
        if self.on_trim is not None:
            self.on_trim(took)
        log.debug("heap trim: %.1f MiB free in malloc's heap, released in %.1f ms", free / 1048576, took * 1000)

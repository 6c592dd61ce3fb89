"""The memory the workers of one instance share for admission control (``workers`` > 1).

The table itself (layout, decisions) is `edgeproxy.core.shared_admission`;
this module gives it memory and a lock:

* memory: an anonymous ``memfd`` (Linux), sized and initialised by the
  supervisor before it starts any worker, and inherited by every worker it
  spawns (``pass_fds``; the fd number travels in the worker's spec).  Each
  process maps it ``MAP_SHARED``;
* lock: a POSIX record lock (``fcntl.lockf``) on the memfd's first byte.  Record
  locks belong to a process, so workers sharing one open file description still
  exclude each other, and the kernel drops a lock whose holder dies.  (A process
  loses its record locks when it closes *any* descriptor of the file: only one
  is ever open per process.)

A binary upgrade starts a new supervisor, which makes a new table: the new
workers count from zero while the old ones drain on the old table.
"""

from __future__ import annotations

import fcntl
import mmap
import os

from edgeproxy.core.admission import AdmissionPolicy, Rng
from edgeproxy.core.shared_admission import SharedAdmission, SharedLayout, init_table, release_worker

__all__ = ["SharedLimits", "SharedLimitsError"]


class SharedLimitsError(RuntimeError):
    """Shared memory for the instance-wide limits cannot be had (the instance must not start)."""


class _RecordLock:
    """An exclusive POSIX record lock on byte 0 of ``fd``, as a context manager."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)

    def __exit__(self, *exc) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)


class SharedLimits:
    """One instance's admission table, mapped in this process.

    Create it in the supervisor with `create`; a worker gets it with `attach`
    (the inherited descriptor and its slot).
    """

    def __init__(self, fd: int, worker: int | None = None):
        self.fd = fd
        self.worker = worker
        self.map = mmap.mmap(fd, os.fstat(fd).st_size)
        self.layout, _ = SharedLayout.read(self.map)
        self.lock = _RecordLock(fd)

    @classmethod
    def create(cls, workers: int, capacity: int) -> SharedLimits:
        """A new, empty table for ``workers`` workers and ``capacity`` client addresses.

        Raises:
            SharedLimitsError: no memfd on this system, or the memory cannot be had.
        """
        layout = SharedLayout(workers, capacity)
        if not hasattr(os, "memfd_create"):
            raise SharedLimitsError("shared memory for the limits of workers > 1 needs Linux memfd_create, not available here")
        try:
            fd = os.memfd_create("edgeproxy-limits", os.MFD_CLOEXEC)
        except OSError as exc:
            raise SharedLimitsError(f"cannot create the shared memory for the limits of {workers} workers: {exc}") from exc
        try:
            os.ftruncate(fd, layout.size)
            buf = mmap.mmap(fd, layout.size)
            init_table(buf, layout, os.urandom(16))
            buf.close()
            return cls(fd)
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise SharedLimitsError(f"cannot set up {layout.size} bytes of shared memory for the limits: {exc}") from exc

    @classmethod
    def attach(cls, fd: int, worker: int) -> SharedLimits:
        """The table the supervisor created, from the descriptor a worker inherited.

        Raises:
            SharedLimitsError: the descriptor holds no table this code understands.
        """
        try:
            return cls(fd, worker)
        except (OSError, ValueError) as exc:
            raise SharedLimitsError(f"the shared limits table (fd {fd}) is unusable: {exc}") from exc

    def admission(self, policy: AdmissionPolicy, rng: Rng, now: float) -> SharedAdmission:
        """The admission control of this worker over the table."""
        return SharedAdmission(policy, self.map, self.worker, self.lock, rng=rng, now=now)

    def release_worker(self, index: int) -> tuple[int, int]:
        """Give back what worker ``index`` (gone) held: ``(connections, address slots)``."""
        with self.lock:
            return release_worker(self.map, self.layout, index)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

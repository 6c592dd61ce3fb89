"""Admission control for a whole instance of N workers (sans-IO: buffer, lock and time passed in).

Theory of operation
-------------------
With ``workers = N`` every configured limit must hold for the instance, not
N times over.  So the counts and buckets of `edgeproxy.core.admission` live in
one table, in memory every worker of the instance maps (the supervisor creates
it before the first worker; `edgeproxy.transport.shared_limits` does the
mapping).  This module only reads and writes that buffer: the caller passes the
buffer, a lock that excludes the other processes, the time and the randomness.
Every decision is taken with the lock held, so "check, then count" is exact:
``max_connections = K`` admits K connections in total, never K + 1.

Layout (little-endian; `SharedLayout` computes the offsets)::

    header     magic, version, workers, capacity, window, hash key (16 bytes),
               then the mutable part: open connections of the instance,
               instance bucket tokens and stamp, end of the Retry-After queue
    per worker open connections admitted by that worker               (N x 8)
    keys       64-bit keyed hash of each address, 0 = never used       (S x 8)
    slots      open connections of the address, its bucket's tokens
               and stamp                                              (S x 24)
    journals   per worker, per slot: that worker's share of the slot's
               open connections                                  (N x S x 4)

where ``S = capacity + window - 1``: the per-address table is fixed-size.  An
address hashes (keyed blake2b, the key chosen at random per instance, so
addresses cannot be picked to collide) to a slot ``h`` in ``[0, capacity)`` and
lives in one of the ``window`` slots from ``h`` on; slots never move, so a
slot number is a stable name while the address holds connections.

Bounded, and what happens when full.  A slot is *free* when its address has no
open connection counted and its bucket has refilled (it is then
indistinguishable from a new one).  A new address takes a never-used slot of
its window, else a free one, else (``ip_connection_rate`` only) the slot whose
bucket is fullest, which forgives that address at most ``burst`` tokens.  When
every slot of the window holds open connections of other addresses, the new
address is refused (reason ``"ip_table_full"``): the per-address limit is never
silently dropped.  Only ``max_connections_per_ip`` pins slots; size
``ip_table_size`` to a few times the addresses that hold connections at once.

A worker that dies does not leak slots: the total is also kept per worker, and
each worker's journal says how many of every slot's connections are its own.
The supervisor calls `release_worker` when it reaps a worker (the dead one's
connections are closed by the kernel), which subtracts both.  The lock is a
POSIX record lock, which the kernel drops when its holder dies, so a crash
inside the lock blocks nobody.  The only loss a crash can cause is a worker
killed between two stores of one update, leaving one count off by one; counts
are clamped at 0.

Per-address counts are kept only while ``max_connections_per_ip`` is set: a
reload that turns it on counts the connections admitted from then on (lenient
until the older ones close); the totals are always counted.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any

from edgeproxy.core.admission import (
    ADMITTED, AdmissionPolicy, Rng, Verdict, _burst, book_retry, cap_retry, ip_rate_retry,
)

__all__ = ["SharedAdmission", "SharedLayout", "init_table", "release_worker", "WINDOW"]

MAGIC = b"EPLIMIT1"
LAYOUT_VERSION = 1
#: slots an address may occupy from its hash on
WINDOW = 16
HEADER_SIZE = 128
#: magic, version, workers, capacity, window, hash key
_FIXED = struct.Struct("<8sIIII16s")
#: open connections of the instance, instance bucket (tokens, stamp), end of the Retry-After queue
_STATE = struct.Struct("<qddd")
_STATE_OFF = _FIXED.size
_TOTAL = struct.Struct("<q")
_KEY = struct.Struct("<Q")
#: open connections of the address, its bucket (tokens, stamp)
_SLOT = struct.Struct("<I4xdd")
_COUNT = struct.Struct("<I")
_TOKENS = struct.Struct("<dd")
_FULL = math.inf  # a bucket that has never been used: full whatever the burst


class SharedLayout:
    """Where everything is in a table for ``workers`` workers and ``capacity`` addresses."""

    __slots__ = ("workers", "capacity", "window", "slots", "workers_off", "keys_off", "slots_off", "journal_off",
                 "journal_size", "size", "_window_keys")

    def __init__(self, workers: int, capacity: int, window: int = WINDOW):
        if workers < 1 or capacity < 1:
            raise ValueError(f"workers and capacity must be >= 1, got {workers} and {capacity}")
        self.workers = workers
        self.capacity = capacity
        self.window = min(window, capacity)
        self.slots = capacity + self.window - 1
        self.workers_off = HEADER_SIZE
        self.keys_off = self.workers_off + 8 * workers
        self.slots_off = self.keys_off + _KEY.size * self.slots
        self.journal_off = self.slots_off + _SLOT.size * self.slots
        self.journal_size = _COUNT.size * self.slots
        #: bytes of the whole table
        self.size = self.journal_off + workers * self.journal_size
        self._window_keys = struct.Struct(f"<{self.window}Q")

    @classmethod
    def read(cls, buf: Any) -> tuple[SharedLayout, bytes]:
        """The layout and hash key of the table in ``buf``.

        Raises:
            ValueError: ``buf`` holds no table of this version, or is too small for it.
        """
        magic, version, workers, capacity, window, key = _FIXED.unpack_from(buf, 0)
        if magic != MAGIC or version != LAYOUT_VERSION:
            raise ValueError(f"not an edgeproxy limits table of version {LAYOUT_VERSION} (magic {magic!r}, version {version})")
        layout = cls(workers, capacity, window)
        if len(buf) < layout.size:
            raise ValueError(f"the limits table is {len(buf)} bytes, its header says {layout.size}")
        return layout, key


def init_table(buf: Any, layout: SharedLayout, key: bytes) -> None:
    """Write an empty table into ``buf`` (``layout.size`` zero bytes): nothing open, buckets full."""
    _FIXED.pack_into(buf, 0, MAGIC, LAYOUT_VERSION, layout.workers, layout.capacity, layout.window, key)
    _STATE.pack_into(buf, _STATE_OFF, 0, _FULL, 0.0, 0.0)


def release_worker(buf: Any, layout: SharedLayout, worker: int) -> tuple[int, int]:
    """Give back everything worker ``worker`` holds (call with the lock, once it is gone).

    Returns:
        ``(connections, slots)``: its open connections and the address slots it had a share of.
    """
    own_off = layout.workers_off + 8 * worker
    (mine,) = _TOTAL.unpack_from(buf, own_off)
    (total,) = _TOTAL.unpack_from(buf, _STATE_OFF)
    _TOTAL.pack_into(buf, _STATE_OFF, max(0, total - mine))
    _TOTAL.pack_into(buf, own_off, 0)
    start = layout.journal_off + worker * layout.journal_size
    with memoryview(buf) as whole, whole[start:start + layout.journal_size] as raw, raw.cast("I") as journal:
        shares = [(slot, n) for slot, n in enumerate(journal) if n]
    for slot, n in shares:
        off = layout.slots_off + _SLOT.size * slot
        (count,) = _COUNT.unpack_from(buf, off)
        _COUNT.pack_into(buf, off, max(0, count - n))
    buf[start:start + layout.journal_size] = bytes(layout.journal_size)
    return mine, len(shares)


class SharedAdmission:
    """`edgeproxy.core.admission.Admission` for one worker of an instance, over the shared table.

    Same calls (`admit`, `release`, `expire`, `reconfigure`) and attributes
    (`policy`, `refused`, `open`, `tracked_addresses`); `open` is the
    instance's count.  ``lock`` is a context manager that excludes the other
    processes (and threads) using ``buf``.
    """

    def __init__(self, policy: AdmissionPolicy, buf: Any, worker: int, lock: Any, rng: Rng = None, now: float = 0.0):
        self.layout, key = SharedLayout.read(buf)
        if not 0 <= worker < self.layout.workers:
            raise ValueError(f"worker {worker} outside the table's {self.layout.workers} workers")
        self.buf = buf
        self.worker = worker
        self.lock = lock
        self.rng = rng
        self._hash_key = key
        self._own_off = self.layout.workers_off + 8 * worker
        self._journal_off = self.layout.journal_off + worker * self.layout.journal_size
        #: address -> [slot, connections counted in the slot, connections not counted per address]
        self._mine: dict[str, list[int]] = {}
        #: refusals by this worker, by reason
        self.refused: dict[str, int] = {}
        self.reconfigure(policy, now)

    def reconfigure(self, policy: AdmissionPolicy, now: float) -> None:
        """New limits; the table (counts, buckets, queue) is the instance's and stays as it is."""
        self.policy = policy
        self._burst = _burst(policy.rate, policy.burst) if policy.rate > 0 else 0.0
        self._ip_burst = _burst(policy.ip_rate, policy.ip_burst) if policy.ip_rate > 0 else 0.0

    def _refuse(self, reason: str, retry_after: float) -> Verdict:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return Verdict(False, reason, retry_after)

    def admit(self, ip: str, now: float) -> Verdict:
        """Admit or refuse one new connection from ``ip``; counts it, instance-wide, when admitted."""
        policy, buf = self.policy, self.buf
        per_ip = policy.max_connections_per_ip
        with self.lock:
            total, tokens, stamp, queue_end = _STATE.unpack_from(buf, _STATE_OFF)
            if policy.max_connections and total >= policy.max_connections:
                return self._refuse("max_connections", cap_retry(self.rng))
            slot = -1
            if per_ip or self._ip_burst:
                mine = self._mine.get(ip)
                slot = mine[0] if mine is not None and mine[1] else self._slot_of(ip, now)
                if slot < 0:
                    return self._refuse("ip_table_full", cap_retry(self.rng))
                slot_off = self.layout.slots_off + _SLOT.size * slot
                count, ip_tokens, ip_stamp = _SLOT.unpack_from(buf, slot_off)
                if per_ip and count >= per_ip:
                    return self._refuse("max_connections_per_ip", cap_retry(self.rng))
                if self._ip_burst:
                    if now > ip_stamp:
                        ip_tokens += (now - ip_stamp) * policy.ip_rate
                        ip_stamp = now
                    ip_tokens = min(self._ip_burst, ip_tokens)  # a new slot's bucket is infinite: full
                    if ip_tokens < 1.0:
                        return self._refuse("ip_rate", ip_rate_retry((1.0 - ip_tokens) / policy.ip_rate, policy.ip_rate, self.rng))
            if self._burst:
                if now > stamp:
                    tokens += (now - stamp) * policy.rate
                    stamp = now
                tokens = min(self._burst, tokens)
                if tokens < 1.0:
                    retry, queue_end = book_retry(queue_end, now, (1.0 - tokens) / policy.rate, policy.rate, self.rng)
                    _STATE.pack_into(buf, _STATE_OFF, total, tokens, stamp, queue_end)
                    return self._refuse("rate", retry)
                tokens -= 1.0
            _STATE.pack_into(buf, _STATE_OFF, total + 1, tokens, stamp, queue_end)
            (own,) = _TOTAL.unpack_from(buf, self._own_off)
            _TOTAL.pack_into(buf, self._own_off, own + 1)
            if slot >= 0:
                if self._ip_burst:
                    _TOKENS.pack_into(buf, slot_off + 8, ip_tokens - 1.0, ip_stamp)
                if per_ip:
                    _COUNT.pack_into(buf, slot_off, count + 1)
                    journal = self._journal_off + _COUNT.size * slot
                    (share,) = _COUNT.unpack_from(buf, journal)
                    _COUNT.pack_into(buf, journal, share + 1)
        mine = self._mine.get(ip)
        if mine is None:
            mine = self._mine[ip] = [slot, 0, 0]
        if per_ip:
            mine[0] = slot
            mine[1] += 1
        else:
            mine[2] += 1
        return ADMITTED

    def _slot_of(self, ip: str, now: float) -> int:
        """The slot of ``ip``: found, or claimed in its window (see the module docstring); -1 when full."""
        layout, buf = self.layout, self.buf
        key = int.from_bytes(hashlib.blake2b(ip.encode(), digest_size=8, key=self._hash_key).digest(), "little") or 1
        first = key % layout.capacity
        keys = layout._window_keys.unpack_from(buf, layout.keys_off + _KEY.size * first)
        if key in keys:
            return first + keys.index(key)
        if 0 in keys:
            slot = first + keys.index(0)
        else:
            slot = self._evictable(first, now)
            if slot < 0:
                return -1
        _KEY.pack_into(buf, layout.keys_off + _KEY.size * slot, key)
        _SLOT.pack_into(buf, layout.slots_off + _SLOT.size * slot, 0, _FULL, now)
        return slot

    def _evictable(self, first: int, now: float) -> int:
        """A slot of the window without open connections: a free one, else the fullest bucket; -1: none."""
        best, best_tokens = -1, -1.0
        rate, burst = self.policy.ip_rate, self._ip_burst
        off = self.layout.slots_off + _SLOT.size * first
        for slot in range(first, first + self.layout.window):
            count, tokens, stamp = _SLOT.unpack_from(self.buf, off)
            off += _SLOT.size
            if count:
                continue
            if not burst:
                return slot
            tokens = min(burst, tokens + max(0.0, now - stamp) * rate)
            if tokens >= burst:
                return slot
            if tokens > best_tokens:
                best, best_tokens = slot, tokens
        return best

    def release(self, ip: str) -> None:
        """A connection admitted for ``ip`` (by this worker) closed."""
        mine = self._mine.get(ip)
        if mine is None:
            return
        buf = self.buf
        counted = mine[1] > 0
        with self.lock:
            (total,) = _TOTAL.unpack_from(buf, _STATE_OFF)
            _TOTAL.pack_into(buf, _STATE_OFF, max(0, total - 1))
            (own,) = _TOTAL.unpack_from(buf, self._own_off)
            _TOTAL.pack_into(buf, self._own_off, max(0, own - 1))
            if counted:
                slot_off = self.layout.slots_off + _SLOT.size * mine[0]
                (count,) = _COUNT.unpack_from(buf, slot_off)
                _COUNT.pack_into(buf, slot_off, max(0, count - 1))
                journal = self._journal_off + _COUNT.size * mine[0]
                (share,) = _COUNT.unpack_from(buf, journal)
                _COUNT.pack_into(buf, journal, max(0, share - 1))
        mine[1 if counted else 2] -= 1
        if not mine[1] and not mine[2]:
            del self._mine[ip]

    def expire(self, now: float) -> int:
        """Nothing to do: free slots are taken over when needed (see the module docstring)."""
        return 0

    @property
    def open(self) -> int:
        """Open connections of the whole instance."""
        return _TOTAL.unpack_from(self.buf, _STATE_OFF)[0]

    @property
    def open_here(self) -> int:
        """Open connections this worker admitted."""
        return _TOTAL.unpack_from(self.buf, self._own_off)[0]

    @property
    def per_ip(self) -> dict[str, int]:
        """Open connections this worker admitted, by address."""
        return {ip: mine[1] + mine[2] for ip, mine in self._mine.items()}

    @property
    def tracked_addresses(self) -> int:
        """Addresses with connections open through this worker."""
        return len(self._mine)

"""Encode once, write many: send one prepared frame to many subscribers.

Why this exists
===============

Broadcasting one message to N WebSocket clients is the proxy's widest loop.  A
server-to-client frame is never masked (RFC 6455 section 5.1), so its bytes are the same
for every client: encode it ONCE (``_accel.encode_frame``) and hand the very same
``bytes`` object to every transport.  No per-subscriber copy, no per-subscriber
encoding; what is left per subscriber is the ``write`` call itself, and
:func:`write_many` keeps the loop around it as close to a bare
``for t in transports: t.write(frame)`` as the checks below allow.

Two checks a bare loop would get wrong:

* **Closing transports are skipped.**  A subscriber that hung up or is being closed
  stays in the list until the caller notices; writing to it is wasted work at best, and
  an error once its handle is closed (uvloop raises RuntimeError; asyncio logs
  "socket.send() raised exception").

* **Slow consumers are not fed (back-pressure).**  ``write`` never blocks: what the
  kernel does not take is buffered in user space.  A client that stops reading would
  make the proxy buffer every broadcast for it, without bound.  With ``limit > 0`` a
  transport whose ``get_write_buffer_size()`` is already ABOVE ``limit`` bytes is not
  written to (exactly ``limit`` still is); its index is reported so the caller can
  drop that subscriber from the fan-out and resume it (or disconnect it) once it has
  drained.  The check happens before the write, so one write can take a subscriber past
  the limit by at most ``len(data)`` bytes.  ``limit=0`` (the default; a negative limit
  too) skips the size check, and with it one method call per subscriber.

The function is sans-IO: no asyncio import, no event loop; it only calls the three
methods of the objects it is given (``is_closing()``, ``get_write_buffer_size()`` when
limited, then ``write(data)``), in subscriber order.  An exception raised by any of
them propagates at once: the transports before it have been dealt with (written to or
skipped), the ones after it have not been touched.

This is the pure-Python reference; ``ext/_speedups.pyx`` has a compiled twin with the
same behaviour (``tests/core/test_equivalence.py``).  Import it from
:mod:`edgeproxy.core._accel`, which picks one.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Protocol

__all__ = ["FanoutTransport", "write_many"]


class FanoutTransport(Protocol):
    """What :func:`write_many` needs from a subscriber (any asyncio/uvloop transport)."""

    def write(self, data: bytes, /) -> object: ...

    def is_closing(self) -> bool: ...

    def get_write_buffer_size(self) -> int: ...


def write_many(transports: Iterable[FanoutTransport], data: bytes, limit: int = 0) -> list[int]:
    """Write the complete frame `data` to every transport; return the skipped indexes.

    A transport is skipped when ``is_closing()`` is true or, with ``limit > 0``, when
    ``get_write_buffer_size() > limit``.  The returned list holds the (0-based) indexes of
    the skipped transports in order; it is empty when every transport was written to.
    """
    limit = operator.index(limit)
    skipped = []
    i = -1
    # This is the hot loop, so: two loops rather than one testing `limit` per subscriber,
    # and a plain counter (measured a few % faster than enumerate's tuples).
    if limit > 0:
        for t in transports:
            i += 1
            if t.is_closing() or t.get_write_buffer_size() > limit:
                skipped.append(i)
            else:
                t.write(data)
    else:
        for t in transports:
            i += 1
            if t.is_closing():
                skipped.append(i)
            else:
                t.write(data)
    return skipped

"""Server-Sent Events seen by a proxy: where events end, and what may be inserted where.

Theory of operation
-------------------
A relayed ``text/event-stream`` body is never parsed into events; the proxy only
needs to know where the *event boundaries* are (the blank line that makes a
browser dispatch an event, HTML Living Standard section 9.2.6), for three things:

* counting events per direction (the message-rate signal) without a per-line
  or per-byte Python loop: `EventScanner.feed` finds each run of line
  terminators that holds a blank line with ``bytes.find`` (memchr speed), a few
  Python steps per event;
* the keep-alive comment the proxy writes when the upstream is quiet: ``:\\n\\n``
  between events, ``:\\n`` (a comment line, dispatching nothing) after a complete
  line inside an event, nothing in the middle of a line (`EventScanner.keepalive`);
* the drain close: the ``retry:`` field and the end of the response go out only
  where an event has just ended (`EventScanner.at_boundary`, or the offset `feed`
  returns for the first boundary inside a chunk).

Lines end with CRLF, LF or CR.  A run of terminators holds a blank line unless it
is exactly one terminator (``\\n``, ``\\r`` or ``\\r\\n``), which is the same as
containing one of ``\\n\\n``, ``\\r\\r`` or ``\\n\\r``: those are searched for (only the
first when the chunk has no CR).  A run split between two chunks is joined through the last byte of the first one.  An
event is a block with at least one non-empty line (comments included) ended by a
blank line: extra blank lines between events count nothing.

Nothing here touches a socket or a clock.
"""

from __future__ import annotations

import re

__all__ = ["EventScanner", "is_event_stream", "retry_field"]

#: the run of terminators at a position (maybe empty)
_RUN = re.compile(rb"[\r\n]*")
_CONTENT = re.compile(rb"[^\r\n]")
#: two terminators in a row that make a blank line (a run holds one iff it is not a lone \n, \r or \r\n)
_BLANK_PAIRS = (b"\n\n", b"\r\r", b"\n\r")
_TERMINATOR_CODES = b"\r\n"  # `int in bytes`: the byte values

KEEPALIVE_BETWEEN = b":\n\n"
KEEPALIVE_INSIDE = b":\n"


def is_event_stream(content_type: bytes | None) -> bool:
    """True for a ``Content-Type`` of ``text/event-stream`` (any parameters, any case)."""
    if not content_type:
        return False
    return content_type.split(b";", 1)[0].strip().lower() == b"text/event-stream"


def retry_field(milliseconds: int) -> bytes:
    """A block of its own that sets EventSource's reconnection time and dispatches no event."""
    return b"retry: %d\n\n" % milliseconds


class EventScanner:
    """Follows one relayed event stream: events counted, and whether it now stands between events."""

    __slots__ = ("events", "_open", "_tail")

    def __init__(self) -> None:
        #: events ended so far
        self.events = 0
        #: an event has begun and not ended (a non-empty line since the last boundary)
        self._open = False
        #: while an event is open: the last byte when the stream ends in a terminator, else b""
        self._tail = b""

    @property
    def at_boundary(self) -> bool:
        """True when the bytes so far end between events: something of its own can go out now."""
        return not self._open

    def keepalive(self) -> bytes:
        """What the proxy may write now without changing any event: ``:\\n\\n``, ``:\\n`` or b""."""
        if not self._open:
            return KEEPALIVE_BETWEEN
        # After a CR a following LF from the upstream would make "\r:\n\n"-like blanks: only after LF.
        return KEEPALIVE_INSIDE if self._tail == b"\n" else b""

    def feed(self, data: bytes, *, first_only: bool = False) -> int:
        """Account for relayed bytes; the offset just past the first event boundary in `data`, or -1.

        With `first_only`, only ``data[:offset]`` is accounted for when there is a
        boundary (what a drain writes before it ends the stream).
        """
        if not data:
            return -1
        first = -1
        pos = 0
        if self._open and self._tail:
            if self._tail + data[:1] in _BLANK_PAIRS:
                pos = _RUN.match(data).end()  # the run goes on here and ends the event
                self.events += 1
                self._open = False
                self._tail = b""
                if first_only:
                    return pos
                first = pos
        last = pos
        size = len(data)
        find = data.find
        # The next place of each pair that makes a blank line (bytes.find: memchr speed).  Without
        # a CR in the chunk only LF LF can; with one, each pair is looked for again only once passed.
        if b"\r" in data:
            nn, rr, nr = find(b"\n\n", pos), find(b"\r\r", pos), find(b"\n\r", pos)
        else:
            nn, rr, nr = find(b"\n\n", pos), -1, -1
        while nn >= 0 or rr >= 0 or nr >= 0:
            hit = min(at for at in (nn, rr, nr) if at >= 0)
            run = hit  # where this run of terminators starts
            while run > last and data[run - 1] in _TERMINATOR_CODES:
                run -= 1
            end = hit + 2
            while end < size and data[end] in _TERMINATOR_CODES:
                end += 1
            if run > last or self._open:
                self.events += 1
                if first < 0:
                    first = end
                    if first_only:
                        self._open = False
                        self._tail = b""
                        return first
            self._open = False
            last = end
            if 0 <= nn < end:
                nn = find(b"\n\n", end)
            if 0 <= rr < end:
                rr = find(b"\r\r", end)
            if 0 <= nr < end:
                nr = find(b"\n\r", end)
        if _CONTENT.search(data, last) is not None:
            self._open = True
        if self._open:
            end = data[-1:]
            self._tail = end if end in (b"\r", b"\n") else b""
        else:
            self._tail = b""
        return first

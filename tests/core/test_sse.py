"""core.sse: event boundaries found in relayed bytes, split at every offset, against a line-by-line reference."""

from __future__ import annotations

import random
import re

import pytest

from edgeproxy.core.sse import EventScanner, is_event_stream, retry_field

_LINE = re.compile(rb"\r\n|\r|\n")


def reference(stream: bytes) -> tuple[int, list[int], bool, bytes]:
    """Events, the offsets just past each ending blank line, whether the stream ends between events, last byte.

    Parses the way a browser does (HTML section 9.2.6): line by line, CRLF/LF/CR.
    """
    events, ends = 0, []
    pos = 0
    open_ = False
    for match in _LINE.finditer(stream):
        line = stream[pos:match.start()]  # a CR at the very end ends its line, as it does for a browser
        if line:
            open_ = True
        elif open_:
            events += 1
            ends.append(match.end())
            open_ = False
        pos = match.end()
    if stream[pos:]:
        open_ = True
    return events, ends, not open_, stream[-1:]


CASES = [
    b"data: a\n\n",
    b"data: a\r\n\r\n",
    b"data: a\r\rdata: b\r\r",
    b"data: a\ndata: b\n\nid: 3\ndata: c\n\n",
    b": comment\n\n",
    b"data: a\n\n\n\n\ndata: b\n\n",
    b"\n\n\r\n\r\ndata: late\r\n\r\n",
    b"data: a\r\n\ndata: b\n\r\ndata: c\r\n\r",
    b"data: no end yet\n",
    b"data: mid line",
    b"event: x\r\ndata: 1\r\n\r\nevent: y\rdata: 2\r\r",
    b"data: a\n\rdata: b\r\n\r\n",
]


@pytest.mark.parametrize("stream", CASES)
def test_every_split_offset_counts_like_the_reference(stream: bytes) -> None:
    events, ends, between, _ = reference(stream)
    for cut in range(len(stream) + 1):
        head, rest = stream[:cut], stream[cut:]
        head_events, head_ends, head_between, _ = reference(head)
        scanner = EventScanner()
        first = scanner.feed(head)
        assert (scanner.events, scanner.at_boundary) == (head_events, head_between), (stream, cut)
        if head_events:  # the cut goes after the first blank line, before anything else
            assert first >= head_ends[0] and head[head_ends[0]:first].strip(b"\r\n") == b""
        else:
            assert first == -1
        first = scanner.feed(rest)
        assert (scanner.events, scanner.at_boundary) == (events, between), (stream, cut)
        if events > head_events:
            nxt = ends[head_events]
            assert first >= 0 and cut + first >= nxt and stream[nxt:cut + first].strip(b"\r\n") == b"", (stream, cut)
        else:
            assert first == -1, (stream, cut)


def test_byte_by_byte_and_random_streams() -> None:
    rng = random.Random(7)
    pieces = [b"data: x", b"id: 1", b":", b"", b"\n", b"\r\n", b"\r", b"event: e"]
    for _ in range(300):
        stream = b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 30)))
        events, _, between, _ = reference(stream)
        scanner = EventScanner()
        for i in range(len(stream)):
            scanner.feed(stream[i:i + 1])
        assert (scanner.events, scanner.at_boundary) == (events, between), stream
        scanner = EventScanner()
        pos = 0
        while pos < len(stream):
            step = rng.randrange(1, 6)
            scanner.feed(stream[pos:pos + step])
            pos += step
        assert (scanner.events, scanner.at_boundary) == (events, between), stream


def test_keepalive_never_changes_an_event() -> None:
    """What `keepalive` allows, inserted anywhere, leaves the reference's events as they were."""
    stream = b"data: a\r\ndata: b\n\nid: 2\rdata: c\r\r: c\n\ndata: d"
    base = reference(stream)[0]
    for cut in range(len(stream) + 1):
        scanner = EventScanner()
        scanner.feed(stream[:cut])
        extra = scanner.keepalive()
        spliced = stream[:cut] + extra + stream[cut:]
        events = reference(spliced)[0]
        # ":\n\n" between events is a (comment) event of its own to the reference; nothing else may change
        assert events == base + (extra == b":\n\n"), (cut, extra)
        if extra == b"":
            assert not scanner.at_boundary


def test_content_type_and_retry() -> None:
    assert is_event_stream(b"text/event-stream")
    assert is_event_stream(b"Text/Event-Stream; charset=utf-8")
    assert not is_event_stream(b"text/plain")
    assert not is_event_stream(None)
    assert retry_field(2500) == b"retry: 2500\n\n"
    scanner = EventScanner()
    scanner.feed(b"data: a\n\n")
    assert scanner.at_boundary  # where the drain's retry block may go


@pytest.mark.parametrize("stream", CASES)
def test_first_only_accounts_for_the_bytes_up_to_the_first_boundary(stream: bytes) -> None:
    for cut in range(len(stream) + 1):
        scanner = EventScanner()
        scanner.feed(stream[:cut])
        before = scanner.events
        first = scanner.feed(stream[cut:], first_only=True)
        if first < 0:
            assert scanner.events == reference(stream)[0]
            continue
        # as if only stream[:cut + first] had been relayed
        events, _, between, _ = reference(stream[:cut + first])
        assert (scanner.events, scanner.at_boundary) == (events, between) == (before + 1, True), (stream, cut)

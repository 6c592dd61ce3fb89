"""The SSE side of the hub, sans IO: event encoding, Last-Event-ID, and the registry's SSE members."""

from __future__ import annotations

import json
import random

import pytest

from edgeproxy.hub.channels import ChannelRegistry
from edgeproxy.hub.history import Stream
from edgeproxy.hub.protocol import (
    HubError,
    Position,
    Publication,
    parse_last_event_id,
    sse_event,
    sse_event_id,
    sse_pub_body,
)


def parse_events(blob: bytes) -> list[tuple[str | None, str, str]]:
    """(id, event, data) per dispatched event, following the HTML standard's line rules."""
    out, event_id, event, data = [], None, "message", []
    for line in blob.decode().replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line:
            if data:
                out.append((event_id, event, "\n".join(data)))
            event, data = "message", []
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            event_id = value
        elif name == "event":
            event = value
        elif name == "data":
            data.append(value)
    return out


@pytest.mark.parametrize("data", [b'{"a":1}', b'{\n  "a": 1\n}', b'{"a":\r\n1}', b'{"a":\r1}', b"[\n\n]"])
def test_line_breaks_in_the_data_become_data_lines_that_rejoin_to_the_same_json(data: bytes) -> None:
    ((event_id, event, text),) = parse_events(sse_event(b"pub", data, b"e:1"))
    assert (event_id, event) == ("e:1", "pub") and json.loads(text) == json.loads(data)


def test_event_ids_round_trip_for_one_and_several_channels() -> None:
    for positions in ([Position(7, "ab12")], [Position(0, "e1"), Position(123456789, "ff00"), Position(3, "e:x")]):
        assert parse_last_event_id(sse_event_id(positions).decode(), len(positions)) == positions


def test_an_empty_part_is_a_channel_without_a_position() -> None:
    assert parse_last_event_id(",e2:4", 2) == [None, Position(4, "e2")]
    assert parse_last_event_id("", 1) == [None]


@pytest.mark.parametrize("value", ["e1", "e1:", ":5", "e1:-1", "e1:5,e2", "e1:5,e2:1,e3:1", "e1:99999999999999999999"])
def test_malformed_last_event_ids_are_refused(value: str) -> None:
    with pytest.raises(HubError):
        parse_last_event_id(value, 2 if "," in value else 1)


def test_one_encoding_per_publication_shared_by_every_one_channel_stream() -> None:
    reg = ChannelRegistry()
    for name in ("s1", "s2"):
        reg.begin("c", name)
        assert reg.complete_sse("c", name, f"t-{name}", Position(0, "e"), [], single=True) == []
    reg.begin("c", "multi")
    reg.complete_sse("c", "multi", "t-multi", Position(0, "e"), [], single=False)
    channel = reg.publication(Publication("c", 1, "e", b'"x"'))
    assert channel is not None and not channel.queue  # no WebSocket member: nothing queued for them
    snap, blob, events, sse_only = channel.next_sse_batch()
    assert snap == (("s1", "s2"), ("t-s1", "t-s2"), ("multi",), ("t-multi",)) and sse_only == 1
    assert parse_events(blob) == [("e:1", "pub", '{"op":"pub","channel":"c","seq":1,"epoch":"e","data":"x"}')]
    assert events == [(Publication("c", 1, "e", b'"x"'), sse_pub_body(Publication("c", 1, "e", b'"x"')))]
    assert reg.remove("c", "s1") is False and reg.remove("c", "s2") is False and reg.remove("c", "multi") is True


@pytest.mark.parametrize("seed", range(30))
def test_sse_resume_is_gapless_and_duplicate_free_under_any_interleaving(seed: int) -> None:
    """As the WebSocket test in test_hub_resume.py, for SSE members (the ids must say the last seq sent)."""
    rng = random.Random(seed)
    stream = Stream("e1", 1000, 0.0, now=0.0)
    reg = ChannelRegistry()
    received: dict[str, list[int]] = {}
    since_of: dict[str, int] = {}
    last_id: dict[str, str] = {}
    in_flight = []

    def write_batches() -> None:
        channel = reg.get("c")
        while channel is not None and (batch := channel.next_sse_batch()) is not None:
            snap, blob, _, _ = batch
            for name in snap[0]:
                for event_id, _, data in parse_events(blob):
                    received[name].append(json.loads(data)["seq"])
                    last_id[name] = event_id

    for _ in range(300):
        action = rng.random()
        if action < 0.45:
            seq = stream.append(b'"p"', 0.0)
            reg.publication(Publication("c", seq, "e1", b'"p"'))
        elif action < 0.6:
            name = f"s{len(received)}"
            since_of[name] = rng.randint(0, stream.seq)
            received[name] = []
            reg.begin("c", name)
            missed, recovered = stream.read_since(Position(since_of[name], "e1"), 0.0)
            in_flight.append((name, stream.position, missed))
        elif action < 0.8 and in_flight:
            name, position, missed = in_flight.pop(rng.randrange(len(in_flight)))
            received[name] += [pub.seq for pub in reg.complete_sse("c", name, name, position, missed, single=True)]
        else:
            write_batches()
    for name, position, missed in in_flight:
        received[name] += [pub.seq for pub in reg.complete_sse("c", name, name, position, missed, single=True)]
    write_batches()
    for name, since in since_of.items():
        assert received[name] == list(range(since + 1, stream.seq + 1)), name
        if name in last_id:  # the live id names the last publication sent
            assert last_id[name] == f"e1:{stream.seq}"

"""The resume envelope's fast path: what it produces, where it stops, and compiled == pure.

`number_frames` / `unwrap_frames` must give exactly what the slow path
(`core.resume.MessageReader` plus the ``D<seq>:`` rules) would for the frames
they take, and stop in front of everything else.  The compiled twins must give
the same results, the same exceptions and the same calls to the mask-key source.
"""

from __future__ import annotations

import itertools
import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeproxy.core import envelope as pure
from edgeproxy.core.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    FrameError,
    apply_mask,
    encode_frame,
    parse_header,
)
from edgeproxy.core.resume import MessageReader

try:
    from edgeproxy import _speedups as compiled
except ImportError as exc:  # pragma: no cover - depends on the build
    if os.environ.get("EDGEPROXY_REQUIRE_EXT", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ImportError(f"EDGEPROXY_REQUIRE_EXT=1 but edgeproxy._speedups does not import: {exc}") from exc
    compiled = None

IMPLS = [pytest.param(pure, id="pure"),
         pytest.param(compiled, id="compiled",
                      marks=pytest.mark.skipif(compiled is None, reason="edgeproxy._speedups is not built"))]
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLIENT_KEY = b"\x37\xfa\x21\x3d"


def keys():
    """A deterministic mask-key source that records its calls."""
    counter = itertools.count(1)
    calls = []

    def source():
        key = (next(counter) * 2654435761 % 2**32).to_bytes(4, "big")
        calls.append(key)
        return key

    return source, calls


# -- number_frames -------------------------------------------------------------------


def split_run(run: bytes, ends: bytes) -> list[bytes]:
    """The frames of a run, cut where `ends` says."""
    offsets = [0, *struct.unpack(f"<{len(ends) // 8}Q", ends)]
    assert offsets[-1] == len(run)
    return [run[a:b] for a, b in zip(offsets, offsets[1:])]


@pytest.mark.parametrize("impl", IMPLS)
def test_number_frames_numbers_whole_data_frames_and_stops_at_anything_else(impl) -> None:
    stream = (encode_frame(OP_TEXT, b"a") + encode_frame(OP_BINARY, b"\x00" * 300)
              + encode_frame(OP_PING, b"p") + encode_frame(OP_TEXT, b"later"))
    pos, seq, run, ends = impl.number_frames(stream, 0, 41, 0)
    assert seq == 43 and split_run(run, ends) == [encode_frame(OP_TEXT, b"D42:a"),
                                                   encode_frame(OP_BINARY, b"D43:" + b"\x00" * 300)]
    assert stream[pos:pos + 1] == bytes([0x80 | OP_PING])
    # from the ping on, nothing: the slow path takes the ping
    assert impl.number_frames(stream, pos, 43, 0) == (pos, 43, b"", b"")


@pytest.mark.parametrize("impl", IMPLS)
def test_number_frames_stops_at_fragments_masks_limits_and_partial_frames(impl) -> None:
    whole = encode_frame(OP_TEXT, b"x" * 10)
    for stopper in (encode_frame(OP_TEXT, b"frag", fin=False), encode_frame(OP_CONT, b"c"),
                    encode_frame(OP_TEXT, b"m", mask_key=b"abcd"), encode_frame(OP_TEXT, b"r", rsv=4),
                    encode_frame(OP_TEXT, b"y" * 11), encode_frame(OP_CLOSE, b"\x03\xe8"), whole[:-1]):
        pos, seq, run, ends = impl.number_frames(whole + stopper, 0, 0, 10)
        assert (pos, seq, len(split_run(run, ends))) == (len(whole), 1, 1), stopper


@pytest.mark.parametrize("impl", IMPLS)
def test_number_frames_reads_bytearray_and_memoryview_from_an_offset(impl) -> None:
    data = b"junk" + encode_frame(OP_TEXT, b"z" * 70000)
    for buf in (bytearray(data), memoryview(data)):
        pos, seq, run, ends = impl.number_frames(buf, 4, 9, 0)
        assert pos == len(data) and seq == 10 and split_run(run, ends) == [encode_frame(OP_TEXT, b"D10:" + b"z" * 70000)]


@pytest.mark.parametrize("impl", IMPLS)
def test_a_bad_64_bit_length_is_the_frame_error_of_parse_header(impl) -> None:
    with pytest.raises(FrameError) as info:
        impl.number_frames(b"\x81\x7f\x80" + b"\x00" * 7, 0, 0, 0)
    assert info.value.close_code == 1002
    with pytest.raises(FrameError):
        impl.unwrap_frames(b"\x81\xff\x80" + b"\x00" * 11, 0, 0, 0, keys()[0], 0)


# -- unwrap_frames -------------------------------------------------------------------


def client(payload: bytes, opcode: int = OP_TEXT, fin: bool = True, key: bytes = CLIENT_KEY) -> bytes:
    return encode_frame(opcode, payload, fin=fin, mask_key=key)


@pytest.mark.parametrize("impl", IMPLS)
def test_unwrap_forwards_the_next_numbers_drops_duplicates_and_stops_at_a_gap(impl) -> None:
    stream = client(b"D1:one") + client(b"D2:two", OP_BINARY) + client(b"D1:one") + client(b"D4:gap")
    source, calls = keys()
    pos, in_seq, frames, dups, ack = impl.unwrap_frames(stream, 0, 0, 0, source, 0)
    assert in_seq == 2 and dups == 1 and len(calls) == 2 and ack == -1
    assert frames == [encode_frame(OP_TEXT, b"one", mask_key=calls[0]), encode_frame(OP_BINARY, b"two", mask_key=calls[1])]
    assert stream[pos:] == client(b"D4:gap")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("payload", [b"C{\"t\":\"ack\", \"seq\":1}", b"C{\"t\":\"ack\",\"seq\":9}",
                                     b"C{\"t\":\"ack\",\"seq\":}", b"C{\"t\":\"ack\",\"seq\":-1}", b"C{\"t\":\"ack\",\"seq\":02}",
                                     b"C{\"t\":\"ack\",\"seq\":" + b"1" * 19 + b"}", b"C{\"t\":\"ping\",\"id\":1}",
                                     b"D:x", b"Dx:y", b"D1", b"", b"D", b"D" + b"1" * 19 + b":long", b"X1:y"])
def test_unwrap_leaves_control_messages_and_malformed_envelopes_to_the_slow_path(impl, payload) -> None:
    source, calls = keys()
    assert impl.unwrap_frames(client(payload), 0, 0, 0, source, 5) == (0, 0, [], 0, -1)
    assert calls == []


@pytest.mark.parametrize("impl", IMPLS)
def test_both_refuse_a_negative_position_or_sequence(impl) -> None:
    for call in (lambda: impl.number_frames(b"", -1, 0, 0), lambda: impl.number_frames(b"", 0, -1, 0),
                 lambda: impl.number_frames(b"", 0, 2**63, 0), lambda: impl.unwrap_frames(b"", -4, 0, 0, keys()[0], 0)):
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("impl", IMPLS)
def test_unwrap_reads_plain_acks_between_data_and_reports_the_highest(impl) -> None:
    ack = b'C{"t":"ack","seq":%d}'
    stream = client(ack % 3) + client(b"D1:a") + client(ack % 7) + client(ack % 5) + client(b"D2:b")
    pos, in_seq, frames, _, acked = impl.unwrap_frames(stream, 0, 0, 0, keys()[0], 7)
    assert (pos, in_seq, len(frames), acked) == (len(stream), 2, 2, 7)
    # an ack of a message never sent is the slow path's to refuse; as binary it is not an ack at all
    assert impl.unwrap_frames(client(ack % 8), 0, 0, 0, keys()[0], 7)[0] == 0
    assert impl.unwrap_frames(client(ack % 1, OP_BINARY), 0, 0, 0, keys()[0], 7)[0] == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_unwrap_takes_eighteen_digit_numbers_and_leading_zeros(impl) -> None:
    source, _ = keys()
    big = 10**17 * 5
    pos, in_seq, frames, _, _ = impl.unwrap_frames(client(b"D%d:x" % big), 0, big - 1, 0, source, 0)
    assert in_seq == big and len(frames) == 1
    assert impl.unwrap_frames(client(b"D0007:x"), 0, 6, 0, source, 0)[1] == 7


@pytest.mark.parametrize("impl", IMPLS)
def test_unwrap_stops_at_unmasked_fragmented_control_and_oversized_frames(impl) -> None:
    for stopper in (encode_frame(OP_TEXT, b"D1:x"), client(b"D1:x", fin=False), client(b"", OP_PING),
                    client(b"D1:" + b"x" * 20), client(b"\x03\xe8", OP_CLOSE)):
        assert impl.unwrap_frames(stopper, 0, 0, 20, keys()[0], 0) == (0, 0, [], 0, -1), stopper


# -- against the slow path, and compiled == pure ----------------------------------------

FRAME = st.tuples(
    st.sampled_from(["data", "data", "data", "dup", "gap", "ctl", "ack", "ping", "frag", "big", "plain", "junk"]),
    st.binary(max_size=300),
    st.sampled_from([OP_TEXT, OP_BINARY]),
    st.binary(min_size=4, max_size=4),
)


def build_client_stream(spec) -> bytes:
    out, seq = [], 0
    for kind, body, opcode, key in spec:
        if kind == "data":
            seq += 1
            out.append(client(b"D%d:" % seq + body, opcode, key=key))
        elif kind == "dup":
            out.append(client(b"D%d:" % max(seq, 1) + body, opcode, key=key))
        elif kind == "gap":
            out.append(client(b"D%d:" % (seq + 2) + body, opcode, key=key))
        elif kind == "ctl":
            out.append(client(b"C" + body, OP_TEXT, key=key))
        elif kind == "ack":  # sometimes with a leading zero, which JSON (and so the slow path) refuses
            zero = b"0" if body[:1] == b"0" else b""
            out.append(client(b'C{"t":"ack","seq":%s%d}' % (zero, len(body) % 12), opcode, key=key))
        elif kind == "ping":
            out.append(client(body[:125], OP_PING, key=key))
        elif kind == "frag":
            out.append(client(b"D%d:" % (seq + 1) + body, opcode, fin=False, key=key))
        elif kind == "big":
            out.append(client(b"D%d:" % (seq + 1) + body + b"!" * 400, opcode, key=key))
        elif kind == "plain":
            out.append(encode_frame(opcode, b"D%d:" % (seq + 1) + body))
        else:
            out.append(body[:3])
    return b"".join(out)


@PROPS
@given(spec=st.lists(FRAME, max_size=12), start=st.integers(0, 3), cut=st.integers(0, 2000))
def test_unwrap_matches_the_slow_path_and_the_twins_agree(spec, start, cut) -> None:
    stream = build_client_stream(spec)[:cut]
    results = []
    for impl in (pure, compiled) if compiled is not None else (pure,):
        source, calls = keys()
        try:
            result = impl.unwrap_frames(stream, 0, start, 400, source, 8)
        except FrameError as exc:
            result = ("error", str(exc), exc.close_code)
        results.append((result, calls))
    assert all(r == results[0] for r in results)
    result, calls = results[0]
    if result[0] == "error":
        return
    pos, in_seq, frames, dups, ack = result
    # Whatever was taken, the slow path reads the same way: masked data messages D<n>: in order, and acks.
    taken = MessageReader(masked=True, max_message_size=400).feed(stream[:pos])
    expected, seq, skipped, acks = [], start, 0, [-1]
    for opcode, payload in taken:
        if payload[:1] == b"C":  # json.loads raises on what the slow path would refuse
            assert opcode == OP_TEXT and json.loads(payload[1:])["t"] == "ack"
            acks.append(json.loads(payload[1:])["seq"])
            assert acks[-1] <= 8
            continue
        head, _, body = payload.partition(b":")
        n = int(head[1:])
        if n <= seq:
            skipped += 1
            continue
        assert n == seq + 1
        seq = n
        expected.append((opcode, body))
    assert in_seq == seq and dups == skipped and len(calls) == len(frames) and ack == max(acks)
    assert MessageReader(masked=True).feed(b"".join(frames)) == expected
    assert [parse_header(frame)[3] for frame in frames] == calls  # each frame masked with its own fresh key


@PROPS
@given(frames=st.lists(st.tuples(st.sampled_from([OP_TEXT, OP_BINARY, OP_PING, OP_CONT]), st.binary(max_size=70000 // 64),
                                 st.booleans()), max_size=8),
       seq=st.integers(0, 2**40), cut=st.integers(0, 5000), limit=st.sampled_from([0, 100, 1000]))
def test_number_matches_the_slow_path_and_the_twins_agree(frames, seq, cut, limit) -> None:
    stream = b"".join(encode_frame(op, body, fin=fin) for op, body, fin in frames)[:cut]
    results = []
    for impl in (pure, compiled) if compiled is not None else (pure,):
        results.append(impl.number_frames(bytearray(stream), 0, seq, limit))
    assert all(r == results[0] for r in results)
    pos, last, run, ends = results[0]
    taken = MessageReader(masked=False).feed(stream[:pos])
    out = split_run(run, ends)
    assert [(op, b"D%d:" % (seq + i + 1) + body) for i, (op, body) in enumerate(taken)] \
        == [MessageReader(masked=False).feed(frame)[0] for frame in out]
    assert last == seq + len(taken)
    assert all(op in (OP_TEXT, OP_BINARY) for op, _ in taken)


def test_the_unmask_remask_pass_is_exact_at_every_offset() -> None:
    """The compiled one-pass unmask+remask against plain apply_mask, for every prefix length mod 4."""
    for digits in range(1, 9):
        seq = int("1" * digits)
        body = bytes(range(256)) * 3
        for impl in (pure, compiled) if compiled is not None else (pure,):
            source, calls = keys()
            _, _, [frame], _, _ = impl.unwrap_frames(client(b"D%d:" % seq + body), 0, seq - 1, 0, source, 0)
            header = 4 + 4  # 126-form length + key
            assert apply_mask(frame[header:], calls[0]) == body

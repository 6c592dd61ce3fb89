"""WebSocket framing (RFC 6455 section 5): every test runs on the pure and the compiled implementation."""

from __future__ import annotations

import array
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeproxy.core import frames
from edgeproxy.core.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    encode_close_payload,
    encode_frame,
    make_encode_frame,
    parse_close_payload,
)
from edgeproxy.errors import FrameError

KEY = bytes([0x37, 0xFA, 0x21, 0x3D])  # the key of the RFC 6455 section 5.7 examples
REPO = Path(__file__).resolve().parents[2]


def ref_mask(data: bytes, key: bytes, offset: int = 0) -> bytes:
    """Obviously correct per-byte masking."""
    return bytes(b ^ key[(i + offset) % 4] for i, b in enumerate(data))


def feed(scanner, data: bytes, cuts=()) -> int:
    """Scan `data` split at the offsets in `cuts`; return the total forwarded byte count."""
    total = 0
    bounds = [0, *sorted(cuts), len(data)]
    for a, b in zip(bounds, bounds[1:]):
        total += scanner.scan(data[a:b])
    return total


def outcome(scanner, forwarded: int):
    err = scanner.error
    return (
        forwarded,
        scanner.messages,
        scanner.frames,
        scanner.pongs,
        scanner.last_pong,
        scanner.close,
        None if err is None else (type(err), str(err), err.close_code),
        scanner.mid_frame,
    )


# ---------------------------------------------------------------------------
# RFC 6455 section 5.7 examples

RFC_EXAMPLES = [
    # (name, wire bytes, expected parse_header(), payload as sent, is data FIN frame)
    ("unmasked Hello", bytes.fromhex("810548656c6c6f"), (1, 0, OP_TEXT, None, 5, 2), b"Hello"),
    ("masked Hello", bytes.fromhex("818537fa213d7f9f4d5158"), (1, 0, OP_TEXT, KEY, 5, 6), b"Hello"),
    ("fragment Hel", bytes.fromhex("010348656c"), (0, 0, OP_TEXT, None, 3, 2), b"Hel"),
    ("fragment lo", bytes.fromhex("80026c6f"), (1, 0, OP_CONT, None, 2, 2), b"lo"),
    ("unmasked ping", bytes.fromhex("890548656c6c6f"), (1, 0, OP_PING, None, 5, 2), b"Hello"),
    ("masked pong", bytes.fromhex("8a8537fa213d7f9f4d5158"), (1, 0, OP_PONG, KEY, 5, 6), b"Hello"),
    ("256 bytes binary", bytes.fromhex("827e0100") + bytes(256), (1, 0, OP_BINARY, None, 256, 4), bytes(256)),
    (
        "64 KiB binary",
        bytes.fromhex("827f0000000000010000") + bytes(65536),
        (1, 0, OP_BINARY, None, 65536, 10),
        bytes(65536),
    ),
]


@pytest.mark.parametrize("name, wire, header, payload", RFC_EXAMPLES, ids=[e[0] for e in RFC_EXAMPLES])
def test_rfc_examples_parse(impl, name, wire, header, payload):
    assert impl.parse_header(wire) == header
    fin, rsv, opcode, key, length, hl = header
    assert impl.encode_header(opcode, length, fin=bool(fin), rsv=rsv, mask_key=key) == wire[:hl]
    body = wire[hl:]
    assert (impl.apply_mask(body, key) if key else body) == payload
    assert make_encode_frame(impl.encode_header, impl.apply_mask)(opcode, payload, bool(fin), rsv, key) == wire


def test_rfc_examples_scan(impl):
    s = impl.FrameScanner()
    stream = b"".join(wire for _, wire, _, _ in RFC_EXAMPLES)
    assert s.scan(stream) == len(stream)
    # Hello, Hello, Hel+lo, (ping, pong are not messages), 256 B, 64 KiB
    assert (s.messages, s.frames, s.close, s.error, s.mid_frame) == (5, 8, None, None, False)


# ---------------------------------------------------------------------------
# headers


LENGTHS = [0, 1, 125, 126, 127, 65535, 65536, 2**20, 2**63 - 1]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("key", [None, KEY])
def test_header_round_trip(impl, length, key):
    expected_hl = (2 if length <= 125 else 4 if length <= 0xFFFF else 10) + (4 if key else 0)
    for opcode in (OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, 3, 15):
        for fin in (False, True):
            for rsv in (0, 1, 4, 7):
                raw = impl.encode_header(opcode, length, fin=fin, rsv=rsv, mask_key=key)
                assert type(raw) is bytes and len(raw) == expected_hl
                assert impl.parse_header(raw) == (int(fin), rsv, opcode, key, length, expected_hl)
                # every strict prefix is "need more bytes"
                for cut in range(len(raw)):
                    assert impl.parse_header(raw[:cut]) is None
                # at an offset, with trailing bytes, from other buffer types
                buf = b"xyz" + raw + b"payload"
                for b in (buf, bytearray(buf), memoryview(buf)):
                    assert impl.parse_header(b, 3) == (int(fin), rsv, opcode, key, length, expected_hl)


def test_header_uses_shortest_length_form(impl):
    assert impl.encode_header(OP_BINARY, 125)[1] == 125
    assert impl.encode_header(OP_BINARY, 126)[1:] == b"\x7e\x00\x7e"
    assert impl.encode_header(OP_BINARY, 65535)[1:] == b"\x7e\xff\xff"
    assert impl.encode_header(OP_BINARY, 65536)[1:] == b"\x7f\x00\x00\x00\x00\x00\x01\x00\x00"


def test_parse_header_does_not_require_minimal_lengths(impl):
    # a non-minimal 16-bit length is reported as is (the proxy does not police it)
    assert impl.parse_header(b"\x82\x7e\x00\x05") == (1, 0, OP_BINARY, None, 5, 4)


def test_parse_header_top_bit(impl):
    bad = b"\x82\xff\x80" + bytes(7) + KEY
    for cut in range(3, len(bad) + 1):  # raised as soon as the top bit is visible
        with pytest.raises(FrameError) as info:
            impl.parse_header(bad[:cut])
        assert info.value.close_code == 1002
    assert impl.parse_header(bad[:2]) is None
    assert impl.parse_header(b"\x82\x7f\x7f" + b"\xff" * 7) == (1, 0, OP_BINARY, None, 2**63 - 1, 10)


def test_parse_header_pos(impl):
    assert impl.parse_header(b"\x81\x05", 2) is None
    assert impl.parse_header(b"\x81\x05", 100) is None
    with pytest.raises(ValueError):
        impl.parse_header(b"\x81\x05", -1)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(opcode=16, length=0),
        dict(opcode=-1, length=0),
        dict(opcode=1, length=-1),
        dict(opcode=1, length=2**63),
        dict(opcode=1, length=0, rsv=8),
        dict(opcode=1, length=0, rsv=-1),
        dict(opcode=1, length=0, mask_key=b"abc"),
        dict(opcode=1, length=0, mask_key=b"abcde"),
    ],
)
def test_encode_header_rejects_unrepresentable(impl, kwargs):
    with pytest.raises(ValueError):
        impl.encode_header(**kwargs)


def test_encode_header_types(impl):
    with pytest.raises(TypeError):
        impl.encode_header(1.0, 0)
    with pytest.raises(TypeError):
        impl.encode_header(1, "5")
    with pytest.raises(TypeError):
        impl.encode_header(1, 0, mask_key="abcd")
    assert impl.encode_header(True, 0, fin=0, mask_key=bytearray(KEY)) == b"\x01\x80" + KEY


# ---------------------------------------------------------------------------
# masking


@pytest.mark.parametrize("n", [*range(0, 70), 1000, 65536, 65539])
def test_mask_matches_reference(impl, n):
    data = bytes((i * 7 + 3) & 0xFF for i in range(n))
    for offset in (0, 1, 2, 3):
        out = impl.apply_mask(data, KEY, offset)
        assert type(out) is bytes
        assert out == ref_mask(data, KEY, offset)
        assert impl.apply_mask(out, KEY, offset) == data


def test_mask_piecewise_with_offsets(impl):
    data = os.urandom(300)
    whole = impl.apply_mask(data, KEY)
    for cut in range(len(data) + 1):
        assert impl.apply_mask(data[:cut], KEY) + impl.apply_mask(data[cut:], KEY, cut) == whole
    # three pieces, and offsets only matter modulo 4 (negative ones too)
    pieces = impl.apply_mask(data[:5], KEY), impl.apply_mask(data[5:17], KEY, 5), impl.apply_mask(data[17:], KEY, 17)
    assert b"".join(pieces) == whole
    for offset in (-9, -1, 4, 5, 2**40 + 2, 2**70 + 3):
        assert impl.apply_mask(data, KEY, offset) == ref_mask(data, KEY, offset % 4)


def test_mask_buffer_types(impl):
    data = os.urandom(77)
    expected = ref_mask(data, KEY)
    mv = memoryview(b"??" + data + b"??")[2:-2]
    for d in (data, bytearray(data), memoryview(data), mv):
        for k in (KEY, bytearray(KEY), memoryview(KEY)):
            assert impl.apply_mask(d, k) == expected
    words = array.array("H", [0x1234, 0xABCD])
    assert impl.apply_mask(words, KEY) == ref_mask(words.tobytes(), KEY)
    assert impl.apply_mask(b"", KEY, 3) == b""


def test_mask_bad_arguments(impl):
    for key in (b"", b"abc", b"abcde"):
        with pytest.raises(ValueError):
            impl.apply_mask(b"data", key)
    with pytest.raises(TypeError):
        impl.apply_mask("data", KEY)
    with pytest.raises(TypeError):
        impl.apply_mask(b"data", "abcd")
    with pytest.raises(TypeError):
        impl.apply_mask(b"data", KEY, 1.5)


# ---------------------------------------------------------------------------
# close payloads (pure only)


def test_close_payload_round_trip():
    assert encode_close_payload(None) == b""
    assert encode_close_payload(1000) == b"\x03\xe8"
    assert encode_close_payload(1001, "going away") == b"\x03\xe9going away"
    assert parse_close_payload(b"") == (None, "")
    assert parse_close_payload(b"\x03") == (None, "")
    assert parse_close_payload(b"\x03\xe8") == (1000, "")
    assert parse_close_payload(memoryview(b"\x0f\xa0h\xc3\xa9")) == (4000, "hé")
    assert parse_close_payload(b"\x03\xe8\xff\xfeok") == (1000, "\ufffd\ufffdok")


def test_close_reason_truncated_on_utf8_boundary():
    assert len(encode_close_payload(1000, "a" * 200)) == 125
    # 2 + 61 * 2 = 124 bytes; one more 2-byte char would make 126 -> dropped whole
    payload = encode_close_payload(1000, "é" * 80)
    assert len(payload) == 124
    assert parse_close_payload(payload) == (1000, "é" * 61)
    payload = encode_close_payload(1000, "€" * 50)  # 3-byte chars: 41 fit in 123
    assert len(payload) == 125 and payload[2:].decode() == "€" * 41


def test_close_payload_bad_arguments():
    with pytest.raises(ValueError):
        encode_close_payload(None, "reason without code")
    with pytest.raises(ValueError):
        encode_close_payload(70000)
    with pytest.raises(ValueError):
        encode_close_payload(-1)


# ---------------------------------------------------------------------------
# scanner: basics


def test_scanner_counts_messages_and_frames(impl):
    s = impl.FrameScanner()
    assert (s.messages, s.frames, s.close, s.error, s.mid_frame) == (0, 0, None, None, False)
    stream = (
        encode_frame(OP_TEXT, b"one")
        + encode_frame(OP_BINARY, b"a", fin=False, mask_key=KEY)
        + encode_frame(OP_PING, b"p")
        + encode_frame(OP_CONT, b"b", fin=False)
        + encode_frame(OP_PONG, b"")
        + encode_frame(OP_CONT, b"c", mask_key=KEY)
        + encode_frame(OP_BINARY, b"")
    )
    assert s.scan(stream) == len(stream)
    assert (s.messages, s.frames, s.pongs, s.last_pong) == (3, 7, 1, b"")
    assert s.scan(b"") == 0
    assert s.max_message_size == 0


def test_scanner_mid_frame(impl):
    s = impl.FrameScanner()
    frame = encode_frame(OP_BINARY, b"x" * 300, mask_key=KEY)  # 8-byte header
    assert s.scan(frame[:1]) == 1 and s.mid_frame  # partial header
    assert s.scan(frame[1:8]) == 7 and s.mid_frame  # header done, payload pending
    assert s.scan(frame[8:-1]) == len(frame) - 9 and s.mid_frame
    assert s.scan(frame[-1:]) == 1 and not s.mid_frame
    assert (s.messages, s.frames) == (1, 1)


def test_scanner_buffer_types(impl):
    stream = encode_frame(OP_TEXT, b"hi", mask_key=KEY) + encode_frame(OP_CLOSE, encode_close_payload(1000, "x"))
    for data in (stream, bytearray(stream), memoryview(stream), memoryview(b"#" + stream)[1:]):
        s = impl.FrameScanner()
        assert s.scan(data) == len(stream)
        assert (s.messages, s.frames, s.close) == (1, 2, (1000, "x"))


def test_scanner_constructor(impl):
    assert impl.FrameScanner(5).max_message_size == 5
    with pytest.raises(ValueError):
        impl.FrameScanner(-1)
    with pytest.raises(ValueError):
        impl.FrameScanner(2**63)
    with pytest.raises(TypeError):
        impl.FrameScanner(1.5)


# ---------------------------------------------------------------------------
# scanner: close frames


@pytest.mark.parametrize("key", [None, KEY], ids=["unmasked", "masked"])
@pytest.mark.parametrize(
    "payload, expected",
    [
        (encode_close_payload(1000, "bye"), (1000, "bye")),
        (encode_close_payload(4001, "ü" * 70), (4001, "ü" * 61)),
        (b"", (None, "")),
        (b"\x03", (None, "")),
        (b"\x03\xe8\xff", (1000, "\ufffd")),
    ],
)
def test_scanner_close(impl, key, payload, expected):
    before = encode_frame(OP_TEXT, b"last words", mask_key=key)
    close = encode_frame(OP_CLOSE, payload, mask_key=key)
    after = encode_frame(OP_TEXT, b"ignored") + b"\xff\xff garbage"
    stream = before + close + after
    s = impl.FrameScanner()
    assert s.close_size == 0
    assert s.scan(stream) == len(before) + len(close)
    assert s.close == expected
    assert s.close_size == len(close)  # so the caller knows where the close began
    assert (s.messages, s.frames, s.error, s.mid_frame) == (1, 2, None, False)
    assert s.scan(after) == 0 and s.scan(stream) == 0
    assert (s.messages, s.frames) == (1, 2)
    # the close frame split at every offset, also across the header
    for cut in range(1, len(close)):
        s = impl.FrameScanner()
        assert s.scan(before + close[:cut]) == len(before) + cut
        assert s.close is None and s.mid_frame
        assert s.scan(close[cut:] + after) == len(close) - cut
        assert s.close == expected and s.close_size == len(close)


# ---------------------------------------------------------------------------
# scanner: what the endpoints judge passes through

PREFIX = encode_frame(OP_TEXT, b"ok", mask_key=KEY) + encode_frame(OP_PING, b"")  # 1 message, 2 frames
OPEN = encode_frame(OP_BINARY, b"open", fin=False, mask_key=KEY)  # a fragmented message in progress

PASS_CASES = [
    # (id, stream after PREFIX, messages completed in it, frames in it)
    ("ping FIN=0", encode_frame(OP_PING, b"x", fin=False), 0, 1),
    ("pong FIN=0 masked", encode_frame(OP_PONG, b"xy", fin=False, mask_key=KEY), 0, 1),
    ("ping 126 bytes", encode_frame(OP_PING, b"x" * 126), 0, 1),
    ("pong 64-bit length", encode_frame(OP_PONG, b"y" * 70000, mask_key=KEY), 0, 1),
    ("ping FIN=0 300 bytes rsv", encode_frame(OP_PING, b"z" * 300, fin=False, rsv=5), 0, 1),
    *[(f"reserved data opcode {op}", encode_frame(op, b"x"), 1, 1) for op in (3, 4, 5, 6, 7)],
    *[(f"reserved control opcode {op}", encode_frame(op, b"x", mask_key=KEY), 0, 1) for op in (11, 12, 13, 14, 15)],
    ("reserved opcode 11 FIN=0", encode_frame(11, b"x", fin=False), 0, 1),
    ("reserved opcode 15 200 bytes", encode_frame(15, b"x" * 200, rsv=7), 0, 1),
    ("reserved opcode 12 64-bit length", encode_frame(12, b"x" * 65536), 0, 1),
    (
        "reserved data opcode 3 fragmented",
        encode_frame(3, b"a", fin=False, rsv=4) + encode_frame(11, b"") + encode_frame(OP_CONT, b"b"),
        1,
        3,
    ),
    ("continuation without message", encode_frame(OP_CONT, b"x"), 1, 1),
    (
        "continuation FIN=0 without message",
        encode_frame(OP_CONT, b"x", fin=False) + encode_frame(OP_CONT, b"y", mask_key=KEY),
        1,
        2,
    ),
    ("text during fragmented message", OPEN + encode_frame(OP_PING, b"") + encode_frame(OP_TEXT, b"b"), 1, 3),
    ("binary during fragmented message", OPEN + encode_frame(OP_BINARY, b"b", fin=False), 0, 2),
    ("reserved opcode 7 during fragmented message", OPEN + encode_frame(7, b"b") + encode_frame(OP_CONT, b"c"), 2, 3),
    (
        "continuation after message ended",
        OPEN + encode_frame(OP_CONT, b"b") + encode_frame(OP_CONT, b"c"),
        2,
        3,
    ),
    ("non-minimal 16-bit ping length", b"\x89\x7e\x00\x05hello", 0, 1),
]


@pytest.mark.parametrize("case", PASS_CASES, ids=[c[0] for c in PASS_CASES])
def test_scanner_passes_what_endpoints_judge(impl, case):
    _, body, messages, nframes = case
    after = encode_frame(OP_TEXT, b"after")  # the stream goes on after it
    stream = PREFIX + body + after
    s = impl.FrameScanner()
    assert s.scan(stream) == len(stream)
    assert (s.messages, s.frames, s.close, s.error, s.mid_frame) == (1 + messages + 1, 2 + nframes + 1, None, None, False)
    # split at every offset inside it: everything is forwarded as it comes
    for cut in range(len(PREFIX), min(len(PREFIX) + len(body), len(PREFIX) + 300) + 1):
        s = impl.FrameScanner()
        assert s.scan(stream[:cut]) == cut and s.error is None
        assert s.scan(stream[cut:]) == len(stream) - cut
        assert (s.messages, s.frames, s.error, s.mid_frame) == (2 + messages, 3 + nframes, None, False)


def test_scanner_does_not_check_rsv_or_masking(impl):
    stream = (
        encode_frame(OP_TEXT, b"compressed", rsv=4)
        + encode_frame(OP_BINARY, b"masked", rsv=7, mask_key=KEY)
        + encode_frame(OP_PING, b"", rsv=2)
        + encode_frame(5, b"extension data", rsv=1, mask_key=KEY)
        + encode_frame(13, b"extension control", rsv=3)
    )
    s = impl.FrameScanner()
    assert s.scan(stream) == len(stream)
    assert (s.messages, s.frames, s.error) == (3, 5, None)


@pytest.mark.parametrize("key", [None, KEY], ids=["unmasked", "masked"])
def test_scanner_close_is_recognised_by_opcode_alone(impl, key):
    # FIN=0 and RSV bits do not matter: opcode 8 is a CLOSE, and nothing after it goes
    for fin, rsv in ((False, 0), (True, 5), (False, 7)):
        close = encode_frame(OP_CLOSE, encode_close_payload(1000, "x"), fin=fin, rsv=rsv, mask_key=key)
        s = impl.FrameScanner()
        assert s.scan(PREFIX + close + b"tail") == len(PREFIX) + len(close)
        assert (s.close, s.error, s.messages, s.frames) == ((1000, "x"), None, 1, 3)
    # a reserved control opcode with a close-like payload is not a CLOSE
    other = encode_frame(11, encode_close_payload(1000, "x"), mask_key=key)
    s = impl.FrameScanner()
    assert s.scan(PREFIX + other) == len(PREFIX) + len(other)
    assert (s.close, s.error, s.frames) == (None, None, 3)


def test_scanner_long_control_payload_is_not_buffered(impl):
    # a huge ping is skipped like a data payload: nothing of it is kept
    s = impl.FrameScanner(10)  # and the message size limit does not apply to it
    head = frames.encode_header(OP_PING, 2**40, mask_key=KEY)
    assert s.scan(PREFIX + head) == len(PREFIX) + len(head)
    assert s.error is None and s.mid_frame
    chunk = bytes(1 << 20)
    for _ in range(4):
        assert s.scan(chunk) == len(chunk)
    assert s.error is None and s.mid_frame and s.frames == 2


# ---------------------------------------------------------------------------
# scanner: errors

ERROR_CASES = [
    # (id, stream after PREFIX, offset of the bad header within it, close code, bytes needed to see it)
    ("close 126 bytes", encode_frame(OP_CLOSE, b"\x03\xe8" + b"x" * 124, mask_key=KEY), 0, 1002, 2),
    ("close 126 bytes FIN=0", encode_frame(OP_CLOSE, b"\x03\xe8" + b"x" * 124, fin=False), 0, 1002, 2),
    ("close 64-bit length", frames.encode_header(OP_CLOSE, 70000, rsv=1), 0, 1002, 2),
    ("close non-minimal 16-bit length", b"\x88\x7e\x00\x02\x03\xe8", 0, 1002, 2),
    (
        "close 200 bytes after bad fragmentation",
        encode_frame(OP_CONT, b"a", fin=False) + encode_frame(5, b"b") + encode_frame(OP_CLOSE, b"c" * 200),
        3 + 3,
        1002,
        2,
    ),
    ("64-bit length top bit", b"\x82\x7f\x80" + bytes(7) + b"payload", 0, 1002, 3),
    ("64-bit length top bit masked", b"\x82\xff\xff" + bytes(7) + KEY, 0, 1002, 3),
    ("64-bit length top bit reserved opcode", b"\x0b\x7f\x80" + bytes(7), 0, 1002, 3),
    ("64-bit length top bit ping", b"\x89\xff\xc0" + bytes(7) + KEY, 0, 1002, 3),
    (
        "64-bit length top bit after a fragment",
        encode_frame(OP_TEXT, b"a", fin=False) + encode_frame(OP_PING, b"") + b"\x80\x7f\x80" + bytes(7),
        3 + 2,
        1002,
        3,
    ),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_scanner_errors(impl, case):
    _, bad, at, code, needed = case
    stream = PREFIX + bad + b"trailing"
    s = impl.FrameScanner()
    assert s.scan(stream) == len(PREFIX) + at
    assert isinstance(s.error, FrameError) and s.error.close_code == code
    assert s.close is None and not s.mid_frame
    ref = impl.FrameScanner()  # the good frames before the bad one are all counted
    assert ref.scan(PREFIX + bad[:at]) == len(PREFIX) + at and ref.error is None
    assert (s.messages, s.frames) == (ref.messages, ref.frames) >= (1, 2)
    assert s.scan(b"\x81\x00") == 0 and s.scan(stream) == 0
    # a header split after enough bytes to see the error: not one byte of it goes
    start = len(PREFIX) + at
    s = impl.FrameScanner()
    assert s.scan(stream[: start + needed]) == start
    assert s.error.close_code == code
    # a header split before that: its first bytes were forwarded, the rest is refused
    if needed > 1:
        s = impl.FrameScanner()
        assert s.scan(stream[: start + needed - 1]) == start + needed - 1
        assert s.error is None and s.mid_frame
        assert s.scan(stream[start + needed - 1 :]) == 0
        assert s.error.close_code == code and s.mid_frame


def test_scanner_error_message_text(impl):
    s = impl.FrameScanner()
    s.scan(encode_frame(OP_CLOSE, b"x" * 126))
    assert str(s.error) == "close frame (opcode 0x8) payload longer than 125 bytes"
    assert s.error.close_code == 1002
    s = impl.FrameScanner()
    s.scan(b"\x82\x7f\x80" + bytes(7))
    assert str(s.error) == "64-bit payload length has the most significant bit set"
    assert s.error.close_code == 1002
    s = impl.FrameScanner(3)
    s.scan(encode_frame(OP_TEXT, b"ab", fin=False) + encode_frame(OP_CONT, b"cd"))
    assert str(s.error) == "message too big: 4 bytes > max_message_size 3"
    assert s.error.close_code == 1009


# ---------------------------------------------------------------------------
# scanner: message size limit


@pytest.mark.parametrize("limit", [1, 5, 125, 126, 65536])
def test_message_size_limit_single_frame(impl, limit):
    ok = encode_frame(OP_BINARY, b"x" * limit, mask_key=KEY)
    too_big = encode_frame(OP_TEXT, b"x" * (limit + 1))
    s = impl.FrameScanner(limit)
    assert s.scan(ok + ok) == 2 * len(ok)
    assert s.scan(too_big) == 0
    assert s.error.close_code == 1009
    assert (s.messages, s.frames) == (2, 2)
    # unlimited
    s = impl.FrameScanner(0)
    assert s.scan(too_big) == len(too_big) and s.error is None


def test_message_size_limit_across_fragments(impl):
    limit = 10
    parts = [b"abc", b"defg", b"hij"]  # exactly 10 bytes
    msg = (
        encode_frame(OP_TEXT, parts[0], fin=False)
        + encode_frame(OP_PING, b"control frames do not count")
        + encode_frame(OP_CONT, parts[1], fin=False, mask_key=KEY)
        + encode_frame(OP_CONT, parts[2])
    )
    s = impl.FrameScanner(limit)
    assert s.scan(msg + msg) == 2 * len(msg)  # the count starts again with each message
    assert (s.messages, s.frames, s.error) == (2, 8, None)

    first = encode_frame(OP_BINARY, b"12345", fin=False) + encode_frame(OP_CONT, b"67890", fin=False)
    over = encode_frame(OP_CONT, b"X", mask_key=KEY)  # 11 > 10: refused at its header
    s = impl.FrameScanner(limit)
    assert s.scan(first + over) == len(first)
    assert s.error.close_code == 1009 and (s.messages, s.frames) == (0, 2)
    # a zero-length final fragment at the limit is fine
    s = impl.FrameScanner(limit)
    ok = first + encode_frame(OP_CONT, b"")
    assert s.scan(ok) == len(ok) and (s.messages, s.frames, s.error) == (1, 3, None)


@pytest.mark.parametrize(
    "name, stream, forwarded_frames, messages, error",
    [
        # a continuation frame without a message in progress starts one: it counts
        ("orphan continuation at the limit", [(OP_CONT, 10, True)], 1, 1, None),
        ("orphan continuation over the limit", [(OP_CONT, 11, True)], 0, 0, 1009),
        ("orphan continuations add up", [(OP_CONT, 6, False), (OP_CONT, 5, True)], 1, 0, 1009),
        ("orphan continuations within", [(OP_CONT, 6, False), (OP_CONT, 4, True)], 2, 1, None),
        # after a completed message, an orphan continuation counts from zero
        ("continuation after message ended", [(OP_TEXT, 8, True), (OP_CONT, 8, True)], 2, 2, None),
        # a text/binary frame during a fragmented message restarts the count
        ("new message restarts the count", [(OP_TEXT, 8, False), (OP_BINARY, 8, True)], 2, 1, None),
        (
            "new fragmented message restarts the count",
            [(OP_TEXT, 8, False), (OP_TEXT, 8, False), (OP_CONT, 2, True), (OP_CONT, 3, True)],
            4,
            2,
            None,
        ),
        (
            "restarted message still limited",
            [(OP_TEXT, 8, False), (OP_TEXT, 8, False), (OP_CONT, 3, True)],
            2,
            0,
            1009,
        ),
        # reserved data opcodes 3-7 are messages like text and binary
        ("reserved data opcode over the limit", [(3, 11, True)], 0, 0, 1009),
        ("reserved data opcode fragmented", [(4, 6, False), (OP_CONT, 5, True)], 1, 0, 1009),
        ("reserved data opcode restarts the count", [(OP_BINARY, 9, False), (7, 10, True)], 2, 1, None),
        # control frames, reserved ones and long ones included, never count
        (
            "control frames do not count",
            [(OP_TEXT, 5, False), (OP_PING, 200, True), (11, 300, False), (15, 70000, True), (OP_CONT, 5, True)],
            5,
            1,
            None,
        ),
    ],
)
def test_message_size_limit_with_bad_fragmentation(impl, name, stream, forwarded_frames, messages, error):
    wire = [encode_frame(op, b"x" * n, fin=fin, mask_key=KEY) for op, n, fin in stream]
    s = impl.FrameScanner(10)
    assert s.scan(b"".join(wire)) == sum(len(w) for w in wire[:forwarded_frames])
    assert (s.messages, s.frames) == (messages, forwarded_frames)
    assert (None if s.error is None else s.error.close_code) == error


def test_message_size_limit_checked_before_payload(impl):
    # the header announcing a huge frame is enough; no payload needs to arrive
    s = impl.FrameScanner(1000)
    head = frames.encode_header(OP_BINARY, 2**40, mask_key=KEY)
    assert s.scan(PREFIX + head) == len(PREFIX)
    assert s.error.close_code == 1009
    # and with the header split inside the 64-bit length
    s = impl.FrameScanner(1000)
    assert s.scan(PREFIX + head[:5]) == len(PREFIX) + 5
    assert s.scan(head[5:]) == 0 and s.error.close_code == 1009


# ---------------------------------------------------------------------------
# scanner: splitting at every offset gives the same result


def _mixed_stream() -> bytes:
    return b"".join(
        [
            encode_frame(OP_TEXT, b"hello", mask_key=KEY),
            encode_frame(OP_BINARY, b"a" * 126, fin=False),
            encode_frame(OP_PING, b"ping!", mask_key=KEY),
            encode_frame(OP_CONT, b"b" * 300, fin=False, mask_key=b"\x00\xff\x10\x01"),
            encode_frame(OP_PONG, b""),
            encode_frame(OP_CONT, b"", fin=True),
            encode_frame(OP_BINARY, b"c" * 70000, rsv=4),
            encode_frame(OP_TEXT, b""),
            encode_frame(OP_PING, b"p" * 125),
        ]
    )


SPLIT_STREAMS = {
    "clean": _mixed_stream(),
    "close masked": _mixed_stream()
    + encode_frame(OP_CLOSE, encode_close_payload(1001, "gone"), mask_key=KEY)
    + b"junk",
    "close unmasked": _mixed_stream() + encode_frame(OP_CLOSE, encode_close_payload(3000, "é" * 40)) + b"x",
    "reserved opcodes": _mixed_stream()
    + encode_frame(7, b"ext", fin=False, rsv=2, mask_key=KEY)
    + encode_frame(12, b"c" * 130)
    + encode_frame(OP_CONT, b"more")
    + encode_frame(3, b"")
    + encode_frame(15, b"", fin=False),
    "long control frames": _mixed_stream()
    + encode_frame(OP_PONG, b"x" * 200)
    + encode_frame(OP_PING, b"y" * 300, fin=False, mask_key=KEY),
    "bad fragmentation": _mixed_stream()
    + encode_frame(OP_CONT, b"x")
    + encode_frame(OP_TEXT, b"a" * 200, fin=False)
    + encode_frame(OP_BINARY, b"b" * 200, fin=False, mask_key=KEY)
    + encode_frame(OP_CONT, b"c" * 30)
    + encode_frame(OP_CONT, b"d" * 30, fin=False),
    "close too long": _mixed_stream() + encode_frame(OP_CLOSE, b"\x03\xe8" + b"x" * 200, mask_key=KEY) + b"x",
    "top bit": _mixed_stream() + b"\x82\x7f\x80" + bytes(20),
    "top bit after reserved": _mixed_stream() + encode_frame(6, b"r", fin=False) + b"\x8d\x7f\x80" + bytes(20),
}
PASSING_STREAMS = ("clean", "reserved opcodes", "long control frames", "bad fragmentation")


def _split_points(data: bytes) -> list[int]:
    # every offset near the frame headers; inside the big payload a sparse sample suffices
    points = list(range(len(data) + 1))
    return [p for p in points if p < 600 or p > len(data) - 400 or p % 997 == 0]


def assert_same_outcome(got, expected, where):
    """`got` (split feeding) must equal `expected` (whole feeding), with one allowed difference.

    If the stream was split inside a bad header before the bytes that prove it bad, the
    bytes before the split were forwarded already; the rest of that header is refused
    and the scanner reports mid_frame.  Counts, close and error are always identical.
    """
    if got == expected:
        return
    assert expected[6] is not None, where
    assert got[1:7] == expected[1:7], where
    assert expected[0] < got[0] < expected[0] + 14 and got[7], where


@pytest.mark.parametrize("limit", [0, 70000, 425])
@pytest.mark.parametrize("name", list(SPLIT_STREAMS))
def test_scanner_split_anywhere(impl, name, limit):
    data = SPLIT_STREAMS[name]
    whole = impl.FrameScanner(limit)
    expected = outcome(whole, feed(whole, data))
    for cut in _split_points(data):
        s = impl.FrameScanner(limit)
        got = outcome(s, feed(s, data, [cut]))
        assert_same_outcome(got, expected, cut)
        if got != expected:
            assert got[0] == cut


@pytest.mark.parametrize("name", list(SPLIT_STREAMS))
def test_scanner_byte_by_byte(impl, name):
    data = SPLIT_STREAMS[name]
    whole = impl.FrameScanner()
    expected = outcome(whole, feed(whole, data))
    s = impl.FrameScanner()
    got = outcome(s, sum(s.scan(data[i : i + 1]) for i in range(len(data))))
    assert_same_outcome(got, expected, name)
    # what only the endpoints judge goes through whole, however it is cut
    if name in PASSING_STREAMS:
        assert expected[6] is None and got == expected == (len(data), *expected[1:])


def test_scanner_three_way_splits(impl):
    data = SPLIT_STREAMS["close masked"]
    whole = impl.FrameScanner(1000)
    expected = outcome(whole, feed(whole, data))
    tail = len(data) - 40
    for a in range(0, 140, 3):
        for b in range(a, a + 30):
            for c in (tail, tail + 7, tail + 20):
                s = impl.FrameScanner(1000)
                assert outcome(s, feed(s, data, [a, b, c])) == expected


# ---------------------------------------------------------------------------
# implementation selection


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")}
    full_env.update(env)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, cwd=REPO)


SHOW = "from edgeproxy.core import _accel as a; print(a.IMPLEMENTATION, a.SPEEDUPS, a.FrameScanner.__module__)"
BLOCK_EXT = "import sys; sys.modules['edgeproxy._speedups'] = None\n"


def test_accel_forced_pure():
    r = _run(SHOW, EDGEPROXY_PURE="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["pure", "False", "edgeproxy.core.frames"]


def test_accel_falls_back_without_extension():
    r = _run(BLOCK_EXT + SHOW)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == ["pure", "False"]


def test_accel_require_ext_fails_loudly():
    r = _run(BLOCK_EXT + SHOW, EDGEPROXY_REQUIRE_EXT="1")
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "EDGEPROXY_REQUIRE_EXT" in r.stderr


def test_accel_prefers_compiled():
    try:
        import edgeproxy._speedups  # noqa: F401
    except ImportError:
        pytest.skip("needs the compiled extension (the impl fixture reports why it is missing)")
    r = _run(SHOW, EDGEPROXY_REQUIRE_EXT="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["compiled", "True", "edgeproxy._speedups"]


def test_accel_in_this_process():
    from edgeproxy.core import _accel

    assert _accel.IMPLEMENTATION == ("compiled" if _accel.SPEEDUPS else "pure")
    if os.environ.get("EDGEPROXY_PURE", "").strip().lower() in ("1", "true", "yes", "on"):
        assert not _accel.SPEEDUPS
    assert _accel.encode_frame(OP_TEXT, b"Hello", mask_key=KEY) == bytes.fromhex("818537fa213d7f9f4d5158")
    assert _accel.parse_close_payload(_accel.encode_close_payload(1000, "x")) == (1000, "x")


def test_scanner_keeps_the_latest_pong_payload_unmasked(impl):
    """The heartbeat matches pongs by payload; masked client pongs are unmasked."""
    s = impl.FrameScanner()
    assert s.last_pong is None
    stream = (
        encode_frame(OP_PONG, b"\x00\x01\x02\x03\x04\x05\x06\x07", mask_key=KEY)
        + encode_frame(OP_TEXT, b"between")
        + encode_frame(OP_PONG, b"second", mask_key=KEY)
    )
    for cut in range(len(stream) + 1):
        s = impl.FrameScanner()
        assert s.scan(stream[:cut]) + s.scan(stream[cut:]) == len(stream)
        assert (s.pongs, s.last_pong, s.messages) == (2, b"second", 1)
    # An over-long pong (not a valid control frame) is counted but not read.
    s = impl.FrameScanner()
    s.scan(encode_frame(OP_PONG, b"p" * 126) + encode_frame(OP_TEXT, b"x"))
    assert (s.pongs, s.last_pong, s.messages) == (1, None, 1)

"""Property tests: the compiled twins behave exactly like the pure-Python reference.

Same inputs -> same results AND same exceptions (type, message, close code).  Skipped
when edgeproxy._speedups is not built; a failure instead under EDGEPROXY_REQUIRE_EXT=1.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeproxy.core import fanout as pure_fanout
from edgeproxy.core import frames as pure
from edgeproxy.core.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, encode_close_payload
from tests.conftest import import_compiled

compiled = import_compiled(module_level=True)

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BUFFER_KINDS = st.sampled_from(["bytes", "bytearray", "memoryview", "slice", "words"])


def as_kind(data: bytes, kind: str):
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(data)
    if kind == "slice":
        return memoryview(b"<<" + data + b">>")[2:-2]
    if kind == "words" and len(data) % 2 == 0:  # a non-byte format: read as raw bytes
        return memoryview(data).cast("H")
    return data


NOT_BUFFERS = st.sampled_from(["text", None, 7, 1.5, [1, 2], memoryview(b"abcdef")[::2], bytes(8)[::-1]])


def call(fn, *args):
    """Result, or a comparable signature of the exception raised."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - comparing exceptions is the point
        return ("raised", type(exc), str(exc), getattr(exc, "close_code", None))


def same(fn_name: str, *args):
    expected = call(getattr(pure, fn_name), *args)
    got = call(getattr(compiled, fn_name), *args)
    assert got == expected
    return expected


# ---------------------------------------------------------------------------
# primitives


@PROPS
@given(data=st.binary(max_size=300), key=st.binary(min_size=4, max_size=4), offset=st.integers(), kind=BUFFER_KINDS)
def test_apply_mask(data, key, offset, kind):
    result = same("apply_mask", as_kind(data, kind), key, offset)
    assert result[0] == "ok" and type(result[1]) is bytes and len(result[1]) == len(data)


@PROPS
@given(data=st.binary(max_size=40), key=st.binary(max_size=6), offset=st.one_of(st.integers(), st.floats(), st.none()))
def test_apply_mask_bad_arguments(data, key, offset):
    same("apply_mask", data, key, offset)


@PROPS
@given(
    data=st.binary(min_size=0, max_size=2000),
    key=st.binary(min_size=4, max_size=4),
    cuts=st.lists(st.integers(0, 2000), max_size=5),
)
def test_apply_mask_piecewise(data, key, cuts):
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    for mod in (pure, compiled):
        pieces = [mod.apply_mask(data[a:b], key, a) for a, b in zip(bounds, bounds[1:])]
        assert b"".join(pieces) == pure.apply_mask(data, key)


@PROPS
@given(buf=st.binary(max_size=24), pos=st.integers(-3, 30), kind=BUFFER_KINDS)
def test_parse_header_random_bytes(buf, pos, kind):
    same("parse_header", as_kind(buf, kind), pos)


@settings(deadline=None)
@given(thing=NOT_BUFFERS, key=st.sampled_from([b"abcd", "abcd", memoryview(b"abcdefgh")[::2]]))
def test_not_buffers(thing, key):
    """Non-buffers and non-contiguous views fail the same way everywhere."""
    same("apply_mask", thing, key)
    same("apply_mask", b"data", thing)
    same("parse_header", thing)
    same("encode_header", 1, 0, True, 0, thing)
    expected = call(pure.FrameScanner().scan, thing)
    assert call(compiled.FrameScanner().scan, thing) == expected


LENGTHS = st.one_of(
    st.integers(0, 300),
    st.sampled_from([125, 126, 127, 65535, 65536, 2**32, 2**63 - 1]),
    st.integers(0, 2**63 - 1),
)


@PROPS
@given(
    opcode=st.integers(0, 15),
    length=LENGTHS,
    fin=st.booleans(),
    rsv=st.integers(0, 7),
    key=st.one_of(st.none(), st.binary(min_size=4, max_size=4)),
    cut=st.integers(0, 14),
    prefix=st.binary(max_size=3),
)
def test_header_round_trip(opcode, length, fin, rsv, key, cut, prefix):
    raw = same("encode_header", opcode, length, fin, rsv, key)[1]
    buf = prefix + raw
    assert same("parse_header", buf, len(prefix))[1] == (int(fin), rsv, opcode, key, length, len(raw))
    same("parse_header", buf[: len(prefix) + cut], len(prefix))


@PROPS
@given(
    opcode=st.one_of(st.integers(-3, 18), st.just(2**70), st.floats(0, 3), st.text(max_size=1)),
    length=st.one_of(st.integers(-5, 2**64 + 5), st.sampled_from([-1, 2**63 - 1, 2**63, 2**64])),
    fin=st.one_of(st.booleans(), st.integers(-1, 2), st.none()),
    rsv=st.integers(-2, 9),
    key=st.one_of(st.none(), st.binary(max_size=6), st.text(max_size=4)),
)
def test_encode_header_any_arguments(opcode, length, fin, rsv, key):
    same("encode_header", opcode, length, fin, rsv, key)


@PROPS
@given(limit=st.one_of(st.integers(), st.floats(), st.none()))
def test_scanner_constructor(limit):
    expected = call(pure.FrameScanner, limit)
    got = call(compiled.FrameScanner, limit)
    assert got[0] == expected[0]
    if expected[0] == "raised":
        assert got == expected
    else:
        assert got[1].max_message_size == expected[1].max_message_size


# ---------------------------------------------------------------------------
# the scanner on random frame streams


CONTROL_OPCODES = st.sampled_from([OP_PING, OP_PONG, OP_CLOSE, OP_PING, OP_PONG, 11, 12, 13, 14, 15])
LONG_SIZES = st.one_of(st.integers(126, 300), st.sampled_from([65535, 65536, 70000]))


@st.composite
def frame_streams(draw):
    """A byte stream of frames: random fragmentation, interleaved control frames, masked
    and unmasked, all length forms, any RSV bits; also what only the endpoints judge
    (reserved opcodes, bad fragmentation sequences, fragmented or long control frames);
    sometimes a frame the scanner refuses (long CLOSE, 64-bit length top bit) or junk."""
    out = []
    in_message = False
    for _ in range(draw(st.integers(0, 12))):
        roll = draw(st.integers(0, 99))
        key = draw(st.one_of(st.none(), st.binary(min_size=4, max_size=4)))
        rsv = draw(st.sampled_from([0, 0, 0, 1, 4, 7]))
        if roll < 40:  # data frame that fits the message state
            opcode = OP_CONT if in_message else draw(st.sampled_from([OP_TEXT, OP_BINARY]))
            fin = draw(st.booleans())
            size = draw(st.one_of(st.integers(0, 40), st.sampled_from([125, 126, 127, 65535, 65536])))
            payload = draw(st.binary(min_size=size, max_size=size)) if size <= 40 else b"\xa5" * size
            out.append(pure.encode_frame(opcode, payload, fin, rsv, key))
            in_message = not fin
        elif roll < 55:  # data frame whatever the state: reserved opcodes, bad fragmentation
            opcode = draw(st.sampled_from([OP_CONT, OP_CONT, OP_CONT, OP_TEXT, OP_BINARY, 3, 4, 5, 6, 7]))
            fin = draw(st.booleans())
            size = draw(st.one_of(st.integers(0, 40), st.sampled_from([126, 65536])))
            out.append(pure.encode_frame(opcode, b"\x5a" * size, fin, rsv, key))
            in_message = not fin
        elif roll < 75:  # control frame, reserved ones included, sometimes FIN=0
            opcode = draw(CONTROL_OPCODES)
            fin = draw(st.sampled_from([True, True, True, False]))
            if opcode == OP_CLOSE and draw(st.booleans()):
                payload = encode_close_payload(draw(st.integers(1000, 4999)), draw(st.text(max_size=70)))
            else:
                payload = draw(st.binary(max_size=125))
            out.append(pure.encode_frame(opcode, payload, fin, rsv, key))
        elif roll < 82:  # long control frame (a long CLOSE is refused)
            opcode = draw(CONTROL_OPCODES)
            size = draw(LONG_SIZES)
            out.append(pure.encode_frame(opcode, b"\x3c" * size, draw(st.booleans()), rsv, key))
        elif roll < 92:  # any header at all
            opcode = draw(st.integers(0, 15))
            fin = draw(st.booleans())
            size = draw(st.one_of(st.integers(0, 130), st.sampled_from([65535, 65536, 2**40])))
            head = pure.encode_header(opcode, size, fin, rsv, key)
            out.append(head + b"\x00" * min(size, 70000))
            if opcode < 8:
                in_message = not fin
        elif roll < 96:  # 64-bit length with the top bit set
            b0 = draw(st.sampled_from([0x82, 0x80, 0x01, 0x89, 0x0B]))
            len7 = draw(st.sampled_from([b"\x7f", b"\xff"]))  # unmasked / masked
            out.append(bytes([b0]) + len7 + bytes([draw(st.integers(0x80, 0xFF))]) + bytes(11))
        else:  # junk that desynchronises the framing
            out.append(draw(st.binary(min_size=1, max_size=6)))
    if draw(st.booleans()):
        out.append(draw(st.binary(max_size=8)))  # trailing partial bytes
    return b"".join(out)


LIMITS = st.one_of(st.just(0), st.integers(1, 200), st.sampled_from([125, 126, 65535, 65536, 131072]))


def snapshot(s):
    err = s.error
    return (
        s.messages,
        s.frames,
        s.pongs,
        s.last_pong,
        s.close,
        s.close_size,
        None if err is None else (type(err), str(err), err.close_code),
        s.mid_frame,
    )


def trace(mod, stream: bytes, cuts, limit: int, kind: str):
    s = mod.FrameScanner(limit)
    bounds = [0, *sorted(c for c in cuts if c <= len(stream)), len(stream)]
    steps = []
    for a, b in zip(bounds, bounds[1:]):
        n = s.scan(as_kind(stream[a:b], kind))
        steps.append((n, snapshot(s)))
    return steps


@PROPS
@given(
    stream=frame_streams(),
    cuts=st.lists(st.integers(0, 140_000), max_size=8),
    limit=LIMITS,
    kind=BUFFER_KINDS,
)
def test_scanner_same_as_pure(stream, cuts, limit, kind):
    assert trace(compiled, stream, cuts, limit, kind) == trace(pure, stream, cuts, limit, kind)


@PROPS
@given(stream=st.binary(max_size=64), cuts=st.lists(st.integers(0, 64), max_size=6), limit=LIMITS)
def test_scanner_same_as_pure_on_garbage(stream, cuts, limit):
    assert trace(compiled, stream, cuts, limit, "bytes") == trace(pure, stream, cuts, limit, "bytes")


@PROPS
@given(stream=frame_streams(), cuts=st.lists(st.integers(0, 140_000), max_size=8), limit=LIMITS)
def test_scanner_split_invariance(stream, cuts, limit):
    """However the stream is cut, counts, close and error are those of the whole stream."""
    for mod in (pure, compiled):
        whole = trace(mod, stream, [], limit, "bytes")
        split = trace(mod, stream, cuts, limit, "bytes")
        forwarded_whole, final_whole = sum(n for n, _ in whole), whole[-1][1]
        forwarded_split, final_split = sum(n for n, _ in split), split[-1][1]
        assert final_split[:7] == final_whole[:7]
        if forwarded_split != forwarded_whole or final_split[7] != final_whole[7]:
            # only when cut inside a bad header before its fault was visible
            assert final_whole[6] is not None and final_split[7]
            assert forwarded_whole < forwarded_split < forwarded_whole + 14


# ---------------------------------------------------------------------------
# write_many


class _Recorder:
    """In-memory transport that logs every call (to a log shared by all) in order."""

    def __init__(self, log, name, buffered, closing, fails):
        self.log = log
        self.name = name
        self.buffered = buffered
        self.closing = closing
        self.fails = fails  # None or the name of the method that raises

    def _called(self, method):
        self.log.append((self.name, method))
        if self.fails == method:
            raise ConnectionError(f"{method} failed on {self.name}")

    def write(self, data):
        self._called("write")
        self.log.append((self.name, "wrote", bytes(data)))

    def is_closing(self):
        self._called("is_closing")
        return self.closing

    def get_write_buffer_size(self):
        self._called("get_write_buffer_size")
        return self.buffered


class _SlotRecorder(_Recorder):
    """No instance __dict__: the compiled code takes its per-type method cache path."""

    __slots__ = ("log", "name", "buffered", "closing", "fails")


_RECORDERS = {"dict": _Recorder, "slots": _SlotRecorder}

FANOUT_SPECS = st.lists(
    st.tuples(
        st.one_of(  # buffered bytes
            st.integers(0, 300),
            st.sampled_from([2**63 - 1, 2**63, 2**64, -1, 100.5, True]),
        ),
        st.booleans(),  # closing
        st.sampled_from(list(_RECORDERS)),
        st.sampled_from([None] * 20 + ["write", "is_closing", "get_write_buffer_size"]),
    ),
    max_size=40,
)
FANOUT_LIMITS = st.one_of(
    st.integers(-3, 310),
    st.sampled_from([0, 0, 1, 2**63 - 1, 2**63, 2**80, -(2**70)]),
)


def fan_out(write_many, specs, data, limit, container):
    log = []
    transports = container(
        _RECORDERS[kind](log, i, buffered, closing, fails) for i, (buffered, closing, kind, fails) in enumerate(specs)
    )
    return call(write_many, transports, data, limit), log


@PROPS
@given(
    specs=FANOUT_SPECS,
    data=st.binary(max_size=130),
    limit=FANOUT_LIMITS,
    container=st.sampled_from([list, tuple, iter]),
)
def test_write_many_same_as_pure(specs, data, limit, container):
    """Same skipped indexes, same exception, and the same calls in the same order."""
    expected = fan_out(pure_fanout.write_many, specs, data, limit, container)
    assert fan_out(compiled.write_many, specs, data, limit, container) == expected
    result, log = expected
    if result[0] == "ok":  # every transport was either written to (once) or skipped
        written = [entry[0] for entry in log if entry[1] == "wrote"]
        assert sorted(written + result[1]) == list(range(len(specs)))


@settings(deadline=None)
@given(limit=st.one_of(st.floats(), st.text(max_size=2), st.none(), st.integers()))
def test_write_many_limit_types(limit):
    specs = [(5, False, "dict", None), (500, False, "slots", None)]
    expected = fan_out(pure_fanout.write_many, specs, b"x", limit, list)
    assert fan_out(compiled.write_many, specs, b"x", limit, list) == expected

"""The scanner's optional RFC 6455 rules and max_frame_size, in both twins.

Unit cases run on each implementation (``impl``); the property tests feed the same
random streams, cut at random points, with random rules, to the pure and the
compiled scanner and require the same trace (forwarded counts, counters, close,
error type/message/code, mid_frame) at every step.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeproxy.core import frames as pure
from edgeproxy.core.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    RULE_CONTROL,
    RULE_FRAGMENTS,
    RULE_MASKED,
    RULE_OPCODES,
    RULE_UNMASKED,
    RULES_STRICT,
    encode_frame,
)

KEY = b"\x01\x02\x03\x04"
CLIENT = RULE_MASKED | RULES_STRICT
SERVER = RULE_UNMASKED | RULES_STRICT


def cframe(opcode, payload=b"", fin=True, rsv=0):
    return encode_frame(opcode, payload, fin, rsv, KEY)


def sframe(opcode, payload=b"", fin=True, rsv=0):
    return encode_frame(opcode, payload, fin, rsv)


CASES = [
    # (name, rules, allowed_rsv, max_frame_size, good prefix, bad frame, message, code)
    ("unmasked client frame", CLIENT, 7, 0, cframe(OP_TEXT, b"ok"), sframe(OP_TEXT, b"x"), "client frame is not masked", 1002),
    ("masked server frame", SERVER, 7, 0, sframe(OP_TEXT, b"ok"), cframe(OP_TEXT, b"x"), "server frame is masked", 1002),
    ("reserved data opcode", CLIENT, 7, 0, b"", cframe(3, b"x"), "reserved opcode 0x3", 1002),
    ("reserved control opcode", CLIENT, 7, 0, b"", cframe(0xB), "reserved opcode 0xb", 1002),
    ("fragmented ping", CLIENT, 7, 0, b"", cframe(OP_PING, b"p", fin=False), "fragmented control frame (opcode 0x9)", 1002),
    ("long ping", CLIENT, 7, 0, b"", cframe(OP_PING, b"p" * 126), "control frame (opcode 0x9) payload longer than 125 bytes", 1002),
    ("orphan continuation", CLIENT, 7, 0, cframe(OP_TEXT, b"whole"), cframe(OP_CONT, b"x"), "continuation frame without a message in progress", 1002),
    ("text inside fragmented", CLIENT, 7, 0, cframe(OP_TEXT, b"part", fin=False) + cframe(OP_PING), cframe(OP_TEXT, b"x"),
     "data frame (opcode 0x1) inside a fragmented message", 1002),
    ("rsv without extension", CLIENT, 0, 0, b"", cframe(OP_TEXT, b"x", rsv=4), "RSV bits 0x4 set without an extension that defines them", 1002),
    ("rsv2 with deflate", CLIENT, 4, 0, cframe(OP_TEXT, b"deflated", rsv=4), cframe(OP_TEXT, b"x", rsv=2),
     "RSV bits 0x2 set without an extension that defines them", 1002),
    ("frame too big", 0, 7, 10, cframe(OP_BINARY, b"0123456789"), cframe(OP_BINARY, b"0123456789a"),
     "frame too big: 11 bytes > max_frame_size 10", 1009),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule(impl, case):
    _, rules, rsv, max_frame, good, bad, message, code = case
    stream = good + bad + cframe(OP_TEXT, b"after")
    for cut in range(len(stream) + 1):  # every split point gives the same verdict
        s = impl.FrameScanner(0, max_frame, rules, rsv)
        n = s.scan(stream[:cut])
        if s.error is None:
            n += s.scan(stream[cut:])
        assert str(s.error) == message and s.error.close_code == code
        # nothing of the bad frame is forwarded unless its header began in the first piece
        assert n == len(good) or (len(good) < cut < len(good) + 14 and n == cut and s.mid_frame)


def test_rules_off_is_lenient(impl):
    """Without rules the same bad frames pass (the bare scanner's contract)."""
    s = impl.FrameScanner()
    stream = b"".join(c[5] for c in CASES[:-1])
    assert s.scan(stream) == len(stream) and s.error is None


def test_allowed_things_pass_strict(impl):
    s = impl.FrameScanner(0, 0, CLIENT, 4)
    stream = (
        cframe(OP_TEXT, b"a", fin=False) + cframe(OP_PING, b"p" * 125) + cframe(OP_CONT, b"b", fin=False)
        + cframe(OP_CONT, b"c") + cframe(OP_BINARY, b"deflated", rsv=4) + cframe(OP_CLOSE, b"\x03\xe8")
    )
    assert s.scan(stream) == len(stream)
    assert s.error is None and s.close == (1000, "") and s.messages == 2


def test_max_frame_size_leaves_control_frames_alone(impl):
    s = impl.FrameScanner(0, 4)
    stream = sframe(OP_PING, b"ping payload") + sframe(OP_TEXT, b"1234")
    assert s.scan(stream) == len(stream) and s.error is None


def test_constructor_checks(impl):
    for args in [(0, -1), (0, 0, 32), (0, 0, 0, 8), (0, 2**63)]:
        with pytest.raises(ValueError):
            impl.FrameScanner(*args)
    s = impl.FrameScanner(5, 6, 7, 3)
    assert (s.max_message_size, s.max_frame_size, s.rules, s.allowed_rsv) == (5, 6, 7, 3)


# ---------------------------------------------------------------------------
# both twins, side by side

try:
    from edgeproxy import _speedups as compiled
except ImportError as exc:  # the unit cases above still run on the pure twin
    if os.environ.get("EDGEPROXY_REQUIRE_EXT", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ImportError(f"EDGEPROXY_REQUIRE_EXT=1 but edgeproxy._speedups does not import: {exc}") from exc
    compiled = None

needs_compiled = pytest.mark.skipif(compiled is None, reason="edgeproxy._speedups is not built")


def _snapshot(s):
    err = s.error
    return (s.messages, s.frames, s.pongs, s.close, None if err is None else (type(err), str(err), err.close_code), s.mid_frame)


def _trace(mod, stream, cuts, args):
    s = mod.FrameScanner(*args)
    bounds = [0, *sorted(c for c in cuts if c <= len(stream)), len(stream)]
    return [(s.scan(stream[a:b]), _snapshot(s)) for a, b in zip(bounds, bounds[1:])]


RULES = st.integers(0, 31)
RSV = st.sampled_from([7, 7, 0, 4, 6])
FRAME_LIMITS = st.sampled_from([0, 0, 1, 40, 125, 126, 65536])
PROPS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _streams():
    from tests.core.test_equivalence import frame_streams

    return frame_streams()


@needs_compiled
@PROPS
@given(stream=_streams(), cuts=st.lists(st.integers(0, 140_000), max_size=8), rules=RULES, rsv=RSV,
       max_frame=FRAME_LIMITS, limit=st.sampled_from([0, 100, 65536]))
def test_rules_same_in_both_twins(stream, cuts, rules, rsv, max_frame, limit):
    args = (limit, max_frame, rules, rsv)
    assert _trace(compiled, stream, cuts, args) == _trace(pure, stream, cuts, args)


@needs_compiled
@PROPS
@given(stream=st.binary(max_size=80), cuts=st.lists(st.integers(0, 80), max_size=6), rules=RULES, rsv=RSV,
       max_frame=FRAME_LIMITS)
def test_rules_same_in_both_twins_on_garbage(stream, cuts, rules, rsv, max_frame):
    args = (0, max_frame, rules, rsv)
    assert _trace(compiled, stream, cuts, args) == _trace(pure, stream, cuts, args)


@PROPS
@given(stream=_streams(), cuts=st.lists(st.integers(0, 140_000), max_size=8), rules=RULES, rsv=RSV)
def test_rules_split_invariance(stream, cuts, rules, rsv):
    for mod in (pure, compiled) if compiled is not None else (pure,):
        whole = _trace(mod, stream, [], (0, 0, rules, rsv))[-1][1]
        split = _trace(mod, stream, cuts, (0, 0, rules, rsv))[-1][1]
        assert split[:5] == whole[:5]


def test_flags_match_between_twins():
    assert (RULE_MASKED, RULE_UNMASKED, RULE_CONTROL, RULE_OPCODES, RULE_FRAGMENTS) == (1, 2, 4, 8, 16)

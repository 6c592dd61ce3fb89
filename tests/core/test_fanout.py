"""write_many: one prepared frame to many transports, skipping closing and slow ones.

Every test runs on the pure and the compiled implementation (the ``impl`` fixture) and,
where the transport class matters, on two kinds of in-memory transports: a plain class
(instances have a ``__dict__``: the compiled code does a generic ``obj.method()`` call)
and a ``__slots__`` class (no ``__dict__``: the compiled code calls the methods it
resolved once per type).  The last tests use real uvloop TCP transports.
"""

from __future__ import annotations

import asyncio
import collections

import pytest
import uvloop

from edgeproxy.core import _accel
from edgeproxy.core.frames import OP_TEXT, encode_frame

FRAME = encode_frame(OP_TEXT, b"x" * 98)  # 100 bytes on the wire


class Transport:
    """In-memory transport: records writes, reports a configurable write-buffer size.

    ``calls`` (shared by default) records every method call in order, so tests can check
    what was called on which transport, not only what was written.
    """

    def __init__(self, name="t", buffered=0, closing=False, fail=None, calls=None):
        self.name = name
        self.buffered = buffered
        self.closing = closing
        self.fail = fail  # exception raised by write()
        self.writes = []
        self.calls = [] if calls is None else calls

    def write(self, data):
        self.calls.append((self.name, "write"))
        if self.fail is not None:
            raise self.fail
        self.writes.append(data)

    def is_closing(self):
        self.calls.append((self.name, "is_closing"))
        return self.closing

    def get_write_buffer_size(self):
        self.calls.append((self.name, "get_write_buffer_size"))
        return self.buffered


class SlotTransport:
    """Same behaviour as Transport, without a per-instance __dict__."""

    __slots__ = ("name", "buffered", "closing", "fail", "writes", "calls")

    __init__ = Transport.__init__
    write = Transport.write
    is_closing = Transport.is_closing
    get_write_buffer_size = Transport.get_write_buffer_size


@pytest.fixture(params=[Transport, SlotTransport], ids=["dict", "slots"])
def kind(request):
    return request.param


def make(kind, specs, calls=None):
    """Transports named 0, 1, ... from (buffered, closing) pairs, sharing one call log."""
    calls = [] if calls is None else calls
    return [kind(i, buffered, closing, calls=calls) for i, (buffered, closing) in enumerate(specs)], calls


def written(transports):
    return [i for i, t in enumerate(transports) if t.writes]


# ---------------------------------------------------------------------------
# the contract


def test_limit_zero_writes_to_all_open_transports(impl, kind):
    ts, calls = make(kind, [(0, False), (10**9, False), (5, False)])
    assert impl.write_many(ts, FRAME) == []
    assert [t.writes for t in ts] == [[FRAME]] * 3
    assert all(t.writes[0] is FRAME for t in ts)  # the same object: encoded once, never copied
    # No size check at all with limit 0: get_write_buffer_size is not even called.
    assert calls == [(0, "is_closing"), (0, "write"), (1, "is_closing"), (1, "write"), (2, "is_closing"), (2, "write")]


@pytest.mark.parametrize("limit", [0, -1, -(2**70)])
def test_limit_zero_or_negative_means_unlimited(impl, kind, limit):
    ts, calls = make(kind, [(2**80, False), (1, False)])
    assert impl.write_many(ts, FRAME, limit) == []
    assert written(ts) == [0, 1]
    assert all(c[1] != "get_write_buffer_size" for c in calls)


def test_overflow_is_strictly_above_the_limit(impl, kind):
    sizes = [99, 100, 101, 0, 10**6, 100]
    ts, _ = make(kind, [(s, False) for s in sizes])
    assert impl.write_many(ts, FRAME, 100) == [2, 4]
    assert written(ts) == [0, 1, 3, 5]  # exactly at the limit is still written to


def test_limit_checks_size_before_writing(impl, kind):
    ts, calls = make(kind, [(0, False), (7, False)])
    assert impl.write_many(ts, FRAME, 6) == [1]
    assert calls == [
        (0, "is_closing"),
        (0, "get_write_buffer_size"),
        (0, "write"),
        (1, "is_closing"),
        (1, "get_write_buffer_size"),
    ]


def test_limit_one(impl, kind):
    ts, _ = make(kind, [(0, False), (1, False), (2, False)])
    assert impl.write_many(ts, FRAME, 1) == [2]
    assert impl.write_many(ts, FRAME, True) == [2]  # an int subclass, like any index


@pytest.mark.parametrize("limit", [0, 50])
def test_closing_transports_are_skipped(impl, kind, limit):
    ts, calls = make(kind, [(0, True), (0, False), (10**6, True), (0, False), (0, True)])
    assert impl.write_many(ts, FRAME, limit) == [0, 2, 4]
    assert written(ts) == [1, 3]
    # A closing transport is neither written to nor asked for its buffer size.
    assert [c for c in calls if c[0] in (0, 2, 4)] == [(0, "is_closing"), (2, "is_closing"), (4, "is_closing")]


def test_all_skipped(impl, kind):
    ts, _ = make(kind, [(0, True), (500, False)])
    assert impl.write_many(ts, FRAME, 100) == [0, 1]
    assert written(ts) == []


@pytest.mark.parametrize("empty", [[], (), iter(()), {}], ids=["list", "tuple", "iterator", "dict"])
@pytest.mark.parametrize("limit", [0, 10])
def test_no_transports(impl, empty, limit):
    assert impl.write_many(empty, FRAME, limit) == []


@pytest.mark.parametrize(
    "wrap",
    [list, tuple, iter, collections.deque, lambda ts: (t for t in ts), lambda ts: dict.fromkeys(ts).keys()],
    ids=["list", "tuple", "iterator", "deque", "generator", "dict_keys"],
)
def test_any_iterable_of_transports(impl, kind, wrap):
    ts, _ = make(kind, [(0, False), (0, True), (200, False), (0, False)])
    assert impl.write_many(wrap(ts), FRAME, 100) == [1, 2]
    assert written(ts) == [0, 3]


def test_same_transport_twice_is_written_twice(impl, kind):
    t = kind("t")
    assert impl.write_many([t, t, t], FRAME) == []
    assert t.writes == [FRAME] * 3


def test_data_is_passed_through_untouched(impl, kind):
    ts, _ = make(kind, [(0, False)] * 2)
    payload = bytearray(b"not even a frame")
    assert impl.write_many(ts, payload) == []
    assert all(t.writes[0] is payload for t in ts)


def test_write_return_value_is_ignored(impl):
    class Counting:
        def __init__(self):
            self.n = 0

        def write(self, data):
            self.n += 1
            return True  # must not be mistaken for "skipped"

        def is_closing(self):
            return False

        def get_write_buffer_size(self):
            return 0

    ts = [Counting() for _ in range(3)]
    assert impl.write_many(ts, FRAME, 10) == []
    assert [t.n for t in ts] == [1, 1, 1]


def test_truthiness_of_is_closing_and_number_types_of_buffer_size(impl):
    """Any truthy is_closing() result counts; any number that compares with an int works."""

    class Odd(Transport):
        pass

    ts = [
        Odd(0, closing=1),
        Odd(1, closing=""),
        Odd(2, closing=[0]),
        Odd(3, buffered=100.5),
        Odd(4, buffered=100.0),
        Odd(5, buffered=2**64),
        Odd(6, buffered=-(2**64)),
        Odd(7, buffered=-1),
        Odd(8, buffered=True),
    ]
    assert impl.write_many(ts, FRAME, 100) == [0, 2, 3, 5]
    assert written(ts) == [1, 4, 6, 7, 8]


def test_huge_limits(impl, kind):
    ts, _ = make(kind, [(2**63 - 1, False), (2**63, False), (2**63 + 1, False), (2**70, False)])
    assert impl.write_many(ts, FRAME, 2**63 - 1) == [1, 2, 3]
    assert impl.write_many(ts, FRAME, 2**63) == [2, 3]
    assert impl.write_many(ts, FRAME, 2**80) == []


@pytest.mark.parametrize("limit", [1.5, "10", None, b"1"])
def test_limit_must_be_an_integer(impl, kind, limit):
    ts, calls = make(kind, [(0, False)])
    with pytest.raises(TypeError, match="cannot be interpreted as an integer"):
        impl.write_many(ts, FRAME, limit)
    assert calls == []  # checked before anything is written


def test_not_a_sequence(impl):
    with pytest.raises(TypeError, match="not iterable"):
        impl.write_many(5, FRAME)


# ---------------------------------------------------------------------------
# exceptions propagate, at the transport that raised them


@pytest.mark.parametrize("limit", [0, 100])
def test_write_exception_propagates(impl, kind, limit):
    ts, calls = make(kind, [(0, False), (0, True), (0, False), (0, False)])
    boom = ConnectionResetError("peer went away")
    ts[2].fail = boom
    with pytest.raises(ConnectionResetError) as info:
        impl.write_many(ts, FRAME, limit)
    assert info.value is boom
    assert written(ts) == [0]  # before it: written; after it: untouched
    assert calls[-1] == (2, "write")
    assert not any(c[0] == 3 for c in calls)


@pytest.mark.parametrize("method", ["is_closing", "get_write_buffer_size"])
def test_check_exception_propagates(impl, kind, method):
    class Broken(kind):
        __slots__ = ()

    def broken(self):
        raise RuntimeError(f"{method} broke")

    setattr(Broken, method, broken)
    ts, calls = make(kind, [(0, False)])
    ts.append(Broken(1, calls=calls))
    ts.append(kind(2, calls=calls))
    with pytest.raises(RuntimeError, match=f"{method} broke"):
        impl.write_many(ts, FRAME, 100)
    assert written(ts) == [0]
    assert not any(c[0] == 2 for c in calls)


def test_exception_from_a_raising_index(impl):
    class BadIndex:
        def __index__(self):
            raise OverflowError("no")

    with pytest.raises(OverflowError, match="no"):
        impl.write_many([Transport()], FRAME, BadIndex())


@pytest.mark.parametrize("limit", [0, 100])
def test_missing_methods(impl, limit):
    class NoWrite:
        def is_closing(self):
            return False

        def get_write_buffer_size(self):
            return 0

    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'is_closing'"):
        impl.write_many([None], FRAME, limit)
    with pytest.raises(AttributeError, match="'NoWrite' object has no attribute 'write'"):
        impl.write_many([NoWrite()], FRAME, limit)


def test_keyboard_interrupt_is_not_swallowed(impl, kind):
    ts, _ = make(kind, [(0, False)] * 3)
    ts[1].fail = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        impl.write_many(ts, FRAME)
    assert written(ts) == [0]


# ---------------------------------------------------------------------------
# methods are looked up on every call, exactly like t.write(data) (the compiled code
# caches per type; these check the cache never changes behaviour)


def test_instance_attribute_shadows_the_method(impl):
    calls = []
    ts = [Transport(i, calls=calls) for i in range(3)]
    sink = []
    ts[1].write = sink.append  # instance attribute wins over the class's method
    ts[2].is_closing = lambda: True
    assert impl.write_many(ts, FRAME) == [2]
    assert written(ts) == [0]
    assert sink == [FRAME]


def test_slot_attributes_holding_callables(impl):
    class Callables:
        __slots__ = ("write", "is_closing", "get_write_buffer_size")

        def __init__(self, sink, buffered, closing):
            self.write = sink.append
            self.is_closing = lambda: closing
            self.get_write_buffer_size = lambda: buffered

    sink = []
    ts = [Callables(sink, 0, False), Callables(sink, 0, True), Callables(sink, 99, False)]
    assert impl.write_many(ts, FRAME, 10) == [1, 2]
    assert sink == [FRAME]


def test_getattr_hooks(impl):
    class Dynamic:
        def __init__(self):
            self.writes = []

        def __getattr__(self, name):
            return {"is_closing": lambda: False, "get_write_buffer_size": lambda: 0}[name]

        def write(self, data):
            self.writes.append(data)

    class Redirect(SlotTransport):
        __slots__ = ()

        def __getattribute__(self, name):
            if name == "write":
                return lambda data: object.__getattribute__(self, "writes").append(b"redirected")
            return object.__getattribute__(self, name)

    d, r = Dynamic(), Redirect("r")
    assert impl.write_many([d, r, d, r], FRAME, 10) == []
    assert d.writes == [FRAME, FRAME]
    assert r.writes == [b"redirected", b"redirected"]


def test_mixed_transport_types(impl):
    calls = []
    ts = []
    for i in range(12):
        cls = (Transport, SlotTransport, type("Sub", (SlotTransport,), {"__slots__": ()}))[i % 3]
        ts.append(cls(i, buffered=i * 10, closing=i % 5 == 4, calls=calls))
    assert impl.write_many(ts, FRAME, 75) == [4, 8, 9, 10, 11]
    assert written(ts) == [0, 1, 2, 3, 5, 6, 7]


def test_class_patched_during_the_fan_out(impl):
    class Patched:
        __slots__ = ("log",)

        def __init__(self):
            self.log = []

        def write(self, data):
            self.log.append("old")
            Patched.write = new_write  # later transports of this class must see it

        def is_closing(self):
            return False

        def get_write_buffer_size(self):
            return 0

    def new_write(self, data):
        self.log.append("new")

    ts = [Patched() for _ in range(3)]
    assert impl.write_many(ts, FRAME, 10) == []
    assert [t.log for t in ts] == [["old"], ["new"], ["new"]]


def test_class_patched_between_check_and_write(impl):
    class Sneaky:
        __slots__ = ("log",)

        def __init__(self):
            self.log = []

        def is_closing(self):
            Sneaky.write = lambda self, data: self.log.append("patched")
            return False

        def get_write_buffer_size(self):
            Sneaky.write = lambda self, data: self.log.append("patched again")
            return 0

        def write(self, data):
            self.log.append("original")

    t = Sneaky()
    assert impl.write_many([t], FRAME) == []
    assert t.log == ["patched"]
    assert impl.write_many([t], FRAME, 10) == []
    assert t.log == ["patched", "patched again"]


def test_class_of_instance_reassigned_during_the_fan_out(impl):
    class A:
        __slots__ = ("log",)

        def __init__(self):
            self.log = []

        def is_closing(self):
            self.__class__ = B
            return False

        def get_write_buffer_size(self):
            return 0

        def write(self, data):
            self.log.append("A")

    class B(A):
        __slots__ = ()

        def is_closing(self):
            return False

        def write(self, data):
            self.log.append("B")

    ts = [A(), A(), B()]
    assert impl.write_many(ts, FRAME) == []
    assert [t.log for t in ts] == [["B"], ["B"], ["B"]]


def test_list_mutated_during_the_fan_out(impl, kind):
    """Iteration is over the live list, exactly like a for loop over it."""
    calls = []
    ts = [kind(0, calls=calls), kind(1, calls=calls)]
    late = kind(2, calls=calls)

    class Adder(kind):
        __slots__ = ()

        def write(self, data):
            super().write(data)
            ts.append(late)
            del ts[0]

    ts.insert(1, Adder(9, calls=calls))
    assert impl.write_many(ts, FRAME) == []
    # Visited: 0, then Adder (index 1) which shifts the list left, so transport 1 (now at
    # index 1) is skipped over and `late` (now at index 2) is visited.
    assert [c[0] for c in calls if c[1] == "write"] == [0, 9, 2]


def test_accel_picks_one_write_many():
    from edgeproxy.core import fanout

    if _accel.SPEEDUPS:
        from edgeproxy import _speedups

        assert _accel.write_many is _speedups.write_many
    else:
        assert _accel.write_many is fanout.write_many
    ts, _ = make(Transport, [(0, False), (0, True)])
    assert _accel.write_many(ts, FRAME) == [1]


def test_many_transports(impl, kind):
    n = 10_000
    ts, _ = make(kind, [(i % 300, i % 97 == 0) for i in range(n)])
    expected = [i for i in range(n) if i % 97 == 0 or i % 300 > 250]
    assert impl.write_many(ts, FRAME, 250) == expected
    assert sum(len(t.writes) for t in ts) == n - len(expected)


# ---------------------------------------------------------------------------
# real uvloop transports


class _Collect(asyncio.Protocol):
    """Server side: hand every accepted transport to a queue."""

    def __init__(self, accepted: asyncio.Queue):
        self.accepted = accepted

    def connection_made(self, transport):
        self.accepted.put_nowait(transport)


async def _connected(n: int):
    """A server on 127.0.0.1 and `n` client connections: (server, server transports, streams)."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue = asyncio.Queue()
    server = await loop.create_server(lambda: _Collect(accepted), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transports, streams = [], []
    for _ in range(n):
        # One at a time, so transports[i] is the server side of streams[i].
        streams.append(await asyncio.open_connection("127.0.0.1", port))
        transports.append(await asyncio.wait_for(accepted.get(), 5))
    return server, transports, streams


async def _close(server, transports, streams):
    for t in transports:
        t.abort()
    for _, writer in streams:
        writer.close()
    server.close()
    await server.wait_closed()


def test_uvloop_transports_receive_the_frame(impl):
    async def scenario():
        assert "uvloop" in type(asyncio.get_running_loop()).__module__
        server, transports, streams = await _connected(4)
        try:
            assert type(transports[0]).__module__.startswith("uvloop")
            assert impl.write_many(transports, FRAME, 64 * 1024) == []
            assert impl.write_many(tuple(transports), FRAME) == []
            for reader, _ in streams:
                assert await asyncio.wait_for(reader.readexactly(2 * len(FRAME)), 5) == FRAME * 2
        finally:
            await _close(server, transports, streams)

    uvloop.run(scenario())


def test_uvloop_closing_transport_is_skipped(impl):
    async def scenario():
        server, transports, streams = await _connected(3)
        try:
            transports[1].close()
            assert transports[1].is_closing()
            assert impl.write_many(transports, FRAME) == [1]
            assert await asyncio.wait_for(streams[0][0].readexactly(len(FRAME)), 5) == FRAME
            assert await asyncio.wait_for(streams[2][0].readexactly(len(FRAME)), 5) == FRAME
            assert await asyncio.wait_for(streams[1][0].read(), 5) == b""  # closed, nothing sent
        finally:
            await _close(server, transports, streams)

    uvloop.run(scenario())


def test_uvloop_slow_consumer_is_skipped(impl):
    """A client that does not read: once its server-side buffer is above the limit, it is skipped."""
    limit = 64 * 1024

    async def scenario():
        server, transports, streams = await _connected(3)
        slow = transports[1]
        try:
            for _ in range(64):  # loopback socket buffers are a few MiB at most
                if slow.get_write_buffer_size() > limit:
                    break
                slow.write(bytes(1 << 20))
            assert slow.get_write_buffer_size() > limit
            assert impl.write_many(transports, FRAME, limit) == [1]
            assert impl.write_many(transports, FRAME) == []  # no limit: written to all
            for i in (0, 2):
                assert await asyncio.wait_for(streams[i][0].readexactly(2 * len(FRAME)), 5) == FRAME * 2
        finally:
            await _close(server, transports, streams)

    uvloop.run(scenario())

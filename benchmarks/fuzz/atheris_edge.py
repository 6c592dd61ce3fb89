"""Coverage-guided fuzzing (atheris / libFuzzer) of the frame scanner twins, the HTTP parser and PROXY headers.

Run: ``python benchmarks/fuzz/atheris_edge.py -runs=200000`` (libFuzzer options
apply: ``-max_total_time=60``, a corpus directory, ...).  Each input is split
by its first bytes into a target and its parameters:

* scanner: rules, allowed RSV bits, size limits and cut points from the first
  bytes, the rest is the stream; the pure and the compiled FrameScanner must
  give the same trace (any difference raises, which libFuzzer reports as a crash
  and saves the input);
* http: ServerSide must only ever raise RemoteProtocolError with a 4xx/5xx;
* proxy: core.proxy_protocol.parse must return None, a header no longer than
  the input, or raise ProxyProtocolError.

Needs the compiled extension (``EDGEPROXY_EXT=yes pip install -e .``) and
``pip install atheris``.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from edgeproxy import _speedups as compiled
    from edgeproxy.core import frames as pure
    from edgeproxy.core import http1, proxy_protocol
    from edgeproxy.errors import RemoteProtocolError


def _trace(mod, data: bytes, cuts: list[int], args: tuple) -> list:
    s = mod.FrameScanner(*args)
    out = []
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    for a, b in zip(bounds, bounds[1:]):
        n = s.scan(data[a:b])
        err = s.error
        out.append((n, s.messages, s.frames, s.pongs, s.close, s.mid_frame,
                    None if err is None else (str(err), err.close_code)))
    return out


def fuzz_scanner(data: bytes) -> None:
    if len(data) < 4:
        return
    rules, rsv, limits, ncuts = data[0] & 31, data[1] & 7, data[2], data[3] & 7
    cuts = list(data[4 : 4 + ncuts])
    stream = data[4 + ncuts :]
    args = ((0, 50, 126, 65536)[limits & 3], (0, 10, 125, 70000)[(limits >> 2) & 3], rules, rsv)
    if _trace(pure, stream, cuts, args) != _trace(compiled, stream, cuts, args):
        raise AssertionError(f"twins diverge on {data!r}")


def fuzz_http(data: bytes) -> None:
    side = http1.ServerSide(max_header_size=2048)
    try:
        side.receive_data(data)
        side.receive_data(b"")
        for _ in range(100):
            event = side.next_event()
            if event is http1.NEED_DATA or event is http1.PAUSED or isinstance(event, http1.ConnectionClosed):
                break
    except RemoteProtocolError as exc:
        if not 400 <= exc.status_hint <= 599:
            raise


def fuzz_proxy(data: bytes) -> None:
    try:
        header = proxy_protocol.parse(data)
    except proxy_protocol.ProxyProtocolError:
        return
    if header is not None and not 0 < header.length <= len(data):
        raise AssertionError(f"header length {header.length} for {len(data)} bytes")


TARGETS = (fuzz_scanner, fuzz_http, fuzz_proxy)


def one_input(data: bytes) -> None:
    if data:
        TARGETS[data[0] % 3](data[1:])


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()

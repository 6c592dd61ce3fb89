"""WebSocket load generator for the load benchmark: picows client on uvloop, one process.

    python benchmarks/load/loadgen.py echo      --url ws://127.0.0.1:PORT/ws [--conns 100] [--size 32] [--duration 10] [--warmup 2]
    python benchmarks/load/loadgen.py pipelined --url ... [--conns 10] [--inflight 64] [--size 32] [--duration 10] [--warmup 2]
    python benchmarks/load/loadgen.py upgrades  --url ... [--concurrency 10] [--duration 10] [--warmup 1]
    python benchmarks/load/loadgen.py idle      --url ... [--conns 9000] [--src-addrs 127.0.0.2-127.0.0.11] [--hold 120]

Output: JSON objects, one per line, on stdout. Progress events come first
({"event": "connected"|"measure_start"|"measure_end"|"ready", ...}) so a runner can
sample the proxy at the edges of the measured window; the last line is
{"event": "result", ...}.

echo       N connections, closed loop: each sends one binary message, waits for its
           echo, checks it byte for byte, sends the next. Reports echoed messages/s
           (round trips) and latency percentiles over the measured window.
pipelined  N connections with K messages in flight each: every echo received is
           checked (payload and order) and answered by one new message.
upgrades   C workers, each in a loop: TCP connect, WebSocket handshake, CLOSE,
           wait for the server's CLOSE and TCP close. Reports completed upgrades/s,
           the latency of whole cycles and of the handshakes alone (connect until
           the 101 is read).
idle       Opens N connections over the given source addresses (127.0.0.x, so no
           single address runs short of ports), prints {"event": "ready"} when all are
           up, holds them until a line arrives on stdin (or stdin closes, or --hold
           seconds pass), then closes them all.

Every payload carries the connection id and a sequence number and the rest is a
pattern derived from the connection id, so a reordered, duplicated, truncated or
corrupted echo is counted in "mismatches". Every mode is bounded in time: the
measurement loops stop after their duration and the whole process is killed by
SIGALRM after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import struct
import sys
import time
from array import array
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import uvloop  # noqa: E402
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect  # noqa: E402

from _common import emit, picows_kwargs, raise_nofile_limit  # noqa: E402

HEADER = struct.Struct("<IQ")  # connection id, sequence number
PICOWS_KW = picows_kwargs(ws_connect)

WARMUP, MEASURE, STOP = 0, 1, 2


def make_payload(cid: int, size: int) -> bytearray:
    if size < HEADER.size:
        raise ValueError(f"message size must be >= {HEADER.size} bytes")
    buf = bytearray(size)
    HEADER.pack_into(buf, 0, cid, 0)
    for i in range(HEADER.size, size):
        buf[i] = (cid * 31 + i * 7 + 11) & 0xFF
    return buf


def parse_src_addrs(spec: str) -> list[str]:
    """'127.0.0.2-127.0.0.11' or '127.0.0.1,127.0.0.5' -> list; loopback only."""
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = (ipaddress.IPv4Address(p.strip()) for p in part.split("-", 1))
            if int(hi) < int(lo) or int(hi) - int(lo) > 250:
                raise ValueError(f"bad address range {part!r}")
            out.extend(str(ipaddress.IPv4Address(n)) for n in range(int(lo), int(hi) + 1))
        else:
            out.append(str(ipaddress.IPv4Address(part)))
    for addr in out:
        if not ipaddress.IPv4Address(addr).is_loopback:
            raise ValueError(f"source address {addr} is not loopback (127.0.0.0/8)")
    return out or ["127.0.0.1"]


def percentiles_ms(samples_ns: array) -> dict[str, float]:
    if not samples_ns:
        return {}
    s = sorted(samples_ns)
    n = len(s)

    def pick(q: float) -> float:
        return round(s[min(n - 1, int(q * n))] / 1e6, 4)

    return {
        "p50_ms": pick(0.50),
        "p90_ms": pick(0.90),
        "p99_ms": pick(0.99),
        "p999_ms": pick(0.999),
        "max_ms": round(s[-1] / 1e6, 4),
        "mean_ms": round(sum(s) / n / 1e6, 4),
        "samples": n,
    }


class Stats:
    def __init__(self) -> None:
        self.phase = WARMUP
        self.count = 0  # echoes received inside the measured window
        self.total_received = 0
        self.total_sent = 0
        self.lat = array("q")
        self.mismatches = 0
        self.first_mismatch: str | None = None
        self.fragmented = 0
        self.unexpected_frames = 0
        self.unexpected_disconnects = 0
        self.closing = False
        self.open = 0

    def mismatch(self, detail: str) -> None:
        self.mismatches += 1
        if self.first_mismatch is None:
            self.first_mismatch = detail


class LoadClient(WSListener):
    """Echo / pipelined client: keeps `inflight` messages outstanding, checks every echo."""

    def __init__(self, stats: Stats, cid: int, size: int, inflight: int, record_latency: bool):
        self.stats = stats
        self.cid = cid
        self.inflight = inflight
        self.record_latency = record_latency
        self.sendbuf = make_payload(cid, size)
        self.checkbuf = bytearray(self.sendbuf)
        self.send_seq = 0
        self.recv_seq = 0
        self.sent_at = 0
        self.window_count = 0
        self.transport: WSTransport | None = None
        self.got_close = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.stats.open += 1

    def start(self) -> None:
        for _ in range(self.inflight):
            self._send()

    def _send(self) -> None:
        HEADER.pack_into(self.sendbuf, 0, self.cid, self.send_seq)
        self.send_seq += 1
        self.stats.total_sent += 1
        self.sent_at = time.perf_counter_ns()
        self.transport.send(WSMsgType.BINARY, self.sendbuf)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == WSMsgType.BINARY and frame.fin:
            now = time.perf_counter_ns()
            stats = self.stats
            stats.total_received += 1
            HEADER.pack_into(self.checkbuf, 0, self.cid, self.recv_seq)
            self.recv_seq += 1
            if frame.get_payload_as_bytes() != self.checkbuf:
                got = frame.get_payload_as_bytes()
                want = bytes(self.checkbuf)
                at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
                stats.mismatch(
                    f"conn {self.cid} seq {self.recv_seq - 1}: expected {len(want)} B, got {len(got)} B, "
                    f"first difference at byte {at}: expected {want[at:at + 8].hex()} got {got[at:at + 8].hex()}"
                )
            phase = stats.phase
            if phase == MEASURE:
                stats.count += 1
                self.window_count += 1
                if self.record_latency:
                    stats.lat.append(now - self.sent_at)
            elif phase == STOP:
                return
            self._send()
        elif msg_type == WSMsgType.CLOSE:
            self.got_close = True
            if not self.stats.closing:
                self.stats.unexpected_frames += 1
        elif msg_type in (WSMsgType.BINARY, WSMsgType.CONTINUATION, WSMsgType.TEXT):
            # A 32 B / 1 KiB message split into fragments, or a text frame: not what was sent.
            self.stats.fragmented += 1
            self.stats.mismatch(f"conn {self.cid}: got {msg_type.name} frame fin={frame.fin}")
        elif msg_type != WSMsgType.PONG:
            self.stats.unexpected_frames += 1

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.stats.open -= 1
        if not self.stats.closing:
            self.stats.unexpected_disconnects += 1


class QuietClient(WSListener):
    """Upgrades / idle client: expects nothing but the server's CLOSE."""

    def __init__(self, stats: Stats):
        self.stats = stats
        self.got_close = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.stats.open += 1

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            self.got_close = True
        elif frame.msg_type != WSMsgType.PONG:
            self.stats.unexpected_frames += 1

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.stats.open -= 1
        if not self.stats.closing:
            self.stats.unexpected_disconnects += 1


async def connect_many(url: str, count: int, factory, srcs: list[str], concurrency: int, timeout: float,
                       read_buffer: int, deadline: float) -> tuple[list[tuple[WSTransport, Any]], list[str]]:
    """Open `count` connections, at most `concurrency` handshakes at a time; bounded by `deadline`."""
    sem = asyncio.Semaphore(concurrency)
    errors: list[str] = []

    async def one(i: int):
        async with sem:
            if time.monotonic() > deadline:
                errors.append("deadline passed before connecting")
                return None
            try:
                return await ws_connect(
                    lambda: factory(i),
                    url,
                    websocket_handshake_timeout=timeout,
                    local_addr=(srcs[i % len(srcs)], 0),
                    read_buffer_init_size=read_buffer,
                    max_frame_size=1 << 20,
                    **PICOWS_KW,
                )
            except (OSError, asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {exc}")
                return None

    results = await asyncio.gather(*(one(i) for i in range(count)))
    return [r for r in results if r is not None], errors


async def close_all(transports: list[WSTransport], stats: Stats, timeout: float) -> int:
    """Send CLOSE on every connection, wait (bounded) for them all to go; return how many lingered."""
    stats.closing = True
    for t in transports:
        if not t.is_disconnected:
            t.send_close(WSCloseCode.OK)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(not t.is_disconnected for t in transports):
        await asyncio.sleep(0.02)
    lingering = 0
    for t in transports:
        if not t.is_disconnected:
            lingering += 1
            t.disconnect(graceful=False)
    await asyncio.sleep(0)
    return lingering


def error_summary(errors: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in errors:
        out[e[:160]] = out.get(e[:160], 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:5])


async def run_traffic(args: argparse.Namespace, inflight: int) -> dict[str, Any]:
    stats = Stats()
    srcs = parse_src_addrs(args.src_addrs)
    t0 = time.monotonic()
    clients: dict[int, LoadClient] = {}

    def factory(i: int) -> LoadClient:
        c = LoadClient(stats, i, args.size, inflight, record_latency=(inflight == 1))
        clients[i] = c
        return c

    conns, errors = await connect_many(args.url, args.conns, factory, srcs, 50, args.connect_timeout,
                                       max(4096, args.size * inflight * 2), t0 + args.connect_timeout * 3)
    emit({"event": "connected", "conns": len(conns), "failed": len(errors), "elapsed_s": round(time.monotonic() - t0, 3)})
    listeners = [lst for (_t, lst) in conns]
    transports = [t for (t, _l) in conns]
    for lst in listeners:
        lst.start()

    await asyncio.sleep(args.warmup)
    stats.phase = MEASURE
    w0 = time.perf_counter()
    emit({"event": "measure_start"})
    await asyncio.sleep(args.duration)
    stats.phase = STOP
    w1 = time.perf_counter()
    emit({"event": "measure_end"})
    window = w1 - w0

    # Drain: every message sent must come back before we close (bounded).
    drain_deadline = time.monotonic() + 5.0
    while stats.total_received < stats.total_sent and time.monotonic() < drain_deadline and stats.open > 0:
        await asyncio.sleep(0.01)
    lost = stats.total_sent - stats.total_received
    lingering = await close_all(transports, stats, 5.0)

    per_conn = sorted(lst.window_count for lst in listeners) or [0]
    result: dict[str, Any] = {
        "event": "result",
        "mode": args.mode,
        "url": args.url,
        "conns_requested": args.conns,
        "conns": len(conns),
        "connect_errors": len(errors),
        "connect_error_samples": error_summary(errors),
        "size": args.size,
        "inflight": inflight,
        "warmup_s": args.warmup,
        "duration_s": round(window, 4),
        "messages": stats.count,
        "msgs_per_s": round(stats.count / window, 1) if window > 0 else 0.0,
        "per_conn_min": per_conn[0],
        "per_conn_max": per_conn[-1],
        "stalled_conns": sum(1 for c in per_conn if c == 0) if conns else 0,
        "total_sent": stats.total_sent,
        "total_received": stats.total_received,
        "verified": stats.total_received - stats.mismatches,
        "lost": lost,
        "mismatches": stats.mismatches,
        "first_mismatch": stats.first_mismatch,
        "fragmented": stats.fragmented,
        "unexpected_frames": stats.unexpected_frames,
        "unexpected_disconnects": stats.unexpected_disconnects,
        "close_lingering": lingering,
    }
    if inflight == 1:
        result["latency"] = percentiles_ms(stats.lat)
    return result


async def run_upgrades(args: argparse.Namespace) -> dict[str, Any]:
    stats = Stats()
    srcs = parse_src_addrs(args.src_addrs)
    errors: list[str] = []
    lat = array("q")  # whole cycles: connect, handshake, close
    handshake_lat = array("q")  # connect + handshake: until the 101 is read
    counters = {"done": 0, "window": 0, "no_close_reply": 0, "close_timeouts": 0}
    hard_deadline = time.monotonic() + args.warmup + args.duration + 10

    async def worker(w: int) -> None:
        i = w
        while stats.phase != STOP and time.monotonic() < hard_deadline:
            i += args.concurrency
            start = time.perf_counter_ns()
            try:
                transport, listener = await ws_connect(
                    lambda: QuietClient(stats),
                    args.url,
                    websocket_handshake_timeout=args.connect_timeout,
                    local_addr=(srcs[i % len(srcs)], 0),
                    read_buffer_init_size=1024,
                    **PICOWS_KW,
                )
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.01)
                continue
            handshake_ns = time.perf_counter_ns() - start
            stats.closing = True  # a disconnect after our CLOSE is expected here
            transport.send_close(WSCloseCode.OK)
            try:
                await asyncio.wait_for(transport.wait_disconnected(), 5.0)
            except (asyncio.TimeoutError, TimeoutError):
                counters["close_timeouts"] += 1
                transport.disconnect(graceful=False)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"close: {type(exc).__name__}: {exc}")
            if not listener.got_close:
                counters["no_close_reply"] += 1
            counters["done"] += 1
            if stats.phase == MEASURE:
                counters["window"] += 1
                lat.append(time.perf_counter_ns() - start)
                handshake_lat.append(handshake_ns)

    tasks = [asyncio.ensure_future(worker(w)) for w in range(args.concurrency)]
    await asyncio.sleep(args.warmup)
    stats.phase = MEASURE
    w0 = time.perf_counter()
    emit({"event": "measure_start"})
    await asyncio.sleep(args.duration)
    stats.phase = STOP
    window = time.perf_counter() - w0
    emit({"event": "measure_end"})
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), 15.0)
    except (asyncio.TimeoutError, TimeoutError):
        for t in tasks:
            t.cancel()
    return {
        "event": "result",
        "mode": "upgrades",
        "url": args.url,
        "concurrency": args.concurrency,
        "warmup_s": args.warmup,
        "duration_s": round(window, 4),
        "upgrades": counters["window"],
        "upgrades_per_s": round(counters["window"] / window, 1) if window > 0 else 0.0,
        "total_upgrades": counters["done"],
        "errors": len(errors),
        "error_samples": error_summary(errors),
        "no_close_reply": counters["no_close_reply"],
        "close_timeouts": counters["close_timeouts"],
        "unexpected_frames": stats.unexpected_frames,
        "latency": percentiles_ms(lat),
        "handshake_latency": percentiles_ms(handshake_lat),
    }


async def wait_stdin_line(timeout: float) -> str:
    """Wait (bounded) for a line or EOF on stdin without a blocking thread."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()
    fd = sys.stdin.fileno()
    buf = bytearray()

    def readable() -> None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        if not chunk:
            if not fut.done():
                fut.set_result("eof")
            return
        buf.extend(chunk)
        if b"\n" in buf and not fut.done():
            fut.set_result(buf.split(b"\n", 1)[0].decode(errors="replace"))

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        return await asyncio.wait_for(fut, timeout)
    except (asyncio.TimeoutError, TimeoutError):
        return "timeout"
    finally:
        loop.remove_reader(fd)


async def run_idle(args: argparse.Namespace) -> dict[str, Any]:
    stats = Stats()
    srcs = parse_src_addrs(args.src_addrs)
    t0 = time.monotonic()
    conns, errors = await connect_many(
        args.url, args.conns, lambda i: QuietClient(stats), srcs, args.concurrency, args.connect_timeout,
        1024, t0 + args.open_timeout,
    )
    open_s = time.monotonic() - t0
    transports = [t for (t, _l) in conns]
    emit({
        "event": "ready", "opened": len(conns), "failed": len(errors), "open_s": round(open_s, 3),
        "src_addrs": len(srcs), "error_samples": error_summary(errors),
    })
    why = await wait_stdin_line(args.hold)
    still_open = sum(1 for t in transports if not t.is_disconnected)
    dropped = stats.unexpected_disconnects
    c0 = time.monotonic()
    lingering = await close_all(transports, stats, args.close_timeout)
    return {
        "event": "result",
        "mode": "idle",
        "url": args.url,
        "conns_requested": args.conns,
        "conns": len(conns),
        "connect_errors": len(errors),
        "connect_error_samples": error_summary(errors),
        "src_addrs": srcs,
        "open_s": round(open_s, 3),
        "conns_per_s": round(len(conns) / open_s, 1) if open_s > 0 else 0.0,
        "released_by": why,
        "still_open_at_release": still_open,
        "dropped_while_idle": dropped,
        "unexpected_frames": stats.unexpected_frames,
        "close_s": round(time.monotonic() - c0, 3),
        "close_lingering": lingering,
    }


async def main_async(args: argparse.Namespace) -> None:
    if args.mode == "echo":
        result = await run_traffic(args, 1)
    elif args.mode == "pipelined":
        result = await run_traffic(args, args.inflight)
    elif args.mode == "upgrades":
        result = await run_upgrades(args)
    else:
        result = await run_idle(args)
    emit(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", required=True, help="ws://127.x.x.x:PORT/path (loopback only)")
        p.add_argument("--src-addrs", default="127.0.0.1", help="source addresses, e.g. 127.0.0.2-127.0.0.11")
        p.add_argument("--connect-timeout", type=float, default=10.0)
        p.add_argument("--max-seconds", type=float, default=600.0, help="hard cap: SIGALRM kills the process")

    for name in ("echo", "pipelined"):
        p = sub.add_parser(name)
        common(p)
        p.add_argument("--conns", type=int, default=100 if name == "echo" else 10)
        p.add_argument("--size", type=int, default=32)
        p.add_argument("--duration", type=float, default=10.0)
        p.add_argument("--warmup", type=float, default=2.0)
        if name == "pipelined":
            p.add_argument("--inflight", type=int, default=64)
    p = sub.add_parser("upgrades")
    common(p)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p = sub.add_parser("idle")
    common(p)
    p.add_argument("--conns", type=int, default=9000)
    p.add_argument("--concurrency", type=int, default=200, help="handshakes in progress at once")
    p.add_argument("--open-timeout", type=float, default=120.0)
    p.add_argument("--hold", type=float, default=120.0, help="max seconds to hold before closing anyway")
    p.add_argument("--close-timeout", type=float, default=30.0)
    args = parser.parse_args()

    host = args.url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    if not ipaddress.IPv4Address(host).is_loopback:
        parser.error("the load generator only targets loopback (127.0.0.0/8)")
    raise_nofile_limit()
    signal.alarm(max(1, int(args.max_seconds)))  # default SIGALRM action ends the process
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()

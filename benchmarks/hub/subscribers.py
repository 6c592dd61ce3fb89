"""Subscribers and publisher of the hub benchmark: one process, picows clients on uvloop.

    python benchmarks/hub/subscribers.py --kind hub --url ws://127.0.0.1:P/hub --admin 127.0.0.1:A --key K \
        --conns 2000 [--rounds 20] [--duration 5] [--cpu-pids 123,456]
    python benchmarks/hub/subscribers.py --kind backend --url ws://127.0.0.1:NGINX/ws --control ws://127.0.0.1:B/ \
        --conns 2000 ...

Opens ``--conns`` subscriber connections (``--kind hub``: each subscribes to channel
``bench`` and waits for ``subscribed``), then:

* **latency**: ``--rounds`` times, one ~100-byte message is published (hub: ``POST
  /v1/publish`` on the admin listener; backend: a burst of 1 on the backend's control
  connection) and every subscriber records ``time.monotonic_ns()`` minus the time
  just before the publish call.  Reports p50/p99/max over all deliveries, and the
  per-round time until the LAST subscriber had it (median and max).
* **sustained**: for ``--duration`` seconds, bursts of ``--burst`` messages are
  published with at most ``--window`` bursts not yet fully delivered (closed loop, so
  no buffer grows without bound).  Reports delivered messages per second and, for
  ``--cpu-pids``, the CPU seconds those processes used in the window per delivered
  message.

Prints one JSON line ``{"event": "result", ...}``.  Bounded: every wait has a timeout
and SIGALRM ends the process after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import statistics
import struct
import sys
import time
from array import array

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "load"))

import orjson  # noqa: E402
import uvloop  # noqa: E402
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect  # noqa: E402

from _common import emit, picows_kwargs, raise_nofile_limit  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "loadbench", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "load", "run.py"))
loadbench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loadbench)  # for cpu_seconds (/proc sampling), shared with the load benchmark
cpu_seconds = loadbench.cpu_seconds

PICOWS_KW = picows_kwargs(ws_connect)
#: the hub's pub message is {"op":"pub","channel":"bench","seq":N,"epoch":"<16 hex>","data":"..."}:
#: this much data makes it about 100 bytes (it varies by a byte or two with the seq's digits)
HUB_DATA = "x" * 22
BACKEND_PAYLOAD = b"x" * 100


class Stats:
    def __init__(self) -> None:
        self.ready = 0
        self.received = 0
        self.target = 0
        self.t0 = 0
        self.recording = False
        self.lat = array("q")
        self.done = asyncio.Event()
        self.sample: bytes = b""
        self.disconnects = 0


class Subscriber(WSListener):
    __slots__ = ("stats", "hub", "is_ready")

    def __init__(self, stats: Stats, hub: bool):
        self.stats = stats
        self.hub = hub
        self.is_ready = not hub

    def on_ws_connected(self, transport: WSTransport) -> None:
        if self.hub:
            transport.send(WSMsgType.TEXT, b'{"op":"subscribe","channel":"bench"}')
        else:
            self.stats.ready += 1

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type is WSMsgType.TEXT or msg_type is WSMsgType.BINARY:
            stats = self.stats
            if not self.is_ready:
                if frame.get_payload_as_bytes().startswith(b'{"op":"subscribed"'):
                    self.is_ready = True
                    stats.ready += 1
                return
            if stats.recording:
                stats.lat.append(time.monotonic_ns() - stats.t0)
            if not stats.sample:
                stats.sample = frame.get_payload_as_bytes()
            stats.received += 1
            if stats.received >= stats.target:
                stats.done.set()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.stats.disconnects += 1


class Control(WSListener):
    """The backend's control connection (nginx path)."""


class AdminHTTP:
    """A keep-alive HTTP/1.1 client for POST /v1/publish (the hub path's publisher)."""

    def __init__(self, host: str, port: int, key: str):
        self.host, self.port, self.key = host, port, key
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def publish(self, body: bytes) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(b"POST /v1/publish HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer %s\r\n"
                          b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                          % (self.key.encode(), len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        answer = await self.reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"publish failed: {head[:40]!r} {answer[:200]!r}")


def percentiles_ms(samples: array) -> dict[str, float]:
    ordered = sorted(samples)
    if not ordered:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6  # noqa: E731
    return {"p50": round(pick(0.50), 3), "p99": round(pick(0.99), 3), "max": round(ordered[-1] / 1e6, 3)}


async def main_async(args: argparse.Namespace) -> dict:
    stats = Stats()
    hub = args.kind == "hub"
    sem = asyncio.Semaphore(200)
    errors: list[str] = []

    async def one():
        async with sem:
            try:
                return await ws_connect(lambda: Subscriber(stats, hub), args.url, websocket_handshake_timeout=30,
                                        **PICOWS_KW)
            except Exception as exc:  # noqa: BLE001 - counted
                errors.append(f"{type(exc).__name__}: {exc}")
                return None

    started = time.monotonic()
    conns = [c for c in await asyncio.gather(*(one() for _ in range(args.conns))) if c is not None]
    deadline = time.monotonic() + 30
    while stats.ready < len(conns) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    n = stats.ready
    setup_s = time.monotonic() - started
    if n < args.conns:
        return {"event": "result", "error": f"only {n} of {args.conns} subscribers ready", "errors": errors[:5]}

    if hub:
        host, port = args.admin.rsplit(":", 1)
        admin = AdminHTTP(host, int(port), args.key)

        async def publish(count: int) -> None:
            item = {"channel": "bench", "data": HUB_DATA}
            body = orjson.dumps(item if count == 1 else {"publications": [item] * count})
            await admin.publish(body)
    else:
        control, _ = await ws_connect(Control, args.control, **PICOWS_KW)
        control.send(WSMsgType.BINARY, b"control")

        async def publish(count: int) -> None:
            control.send(WSMsgType.BINARY, b"B" + struct.pack("!I", count) + BACKEND_PAYLOAD)

    await asyncio.sleep(0.3)
    # -- latency: one message at a time --------------------------------------------
    all_delivered = []
    incomplete = 0
    for _ in range(args.rounds):
        stats.received = 0
        stats.target = n
        stats.done.clear()
        stats.recording = True
        mark = len(stats.lat)
        stats.t0 = time.monotonic_ns()
        await publish(1)
        try:
            await asyncio.wait_for(stats.done.wait(), 10)
        except TimeoutError:
            incomplete += 1
        stats.recording = False
        if len(stats.lat) > mark:
            all_delivered.append(max(stats.lat[mark:]) / 1e6)
        await asyncio.sleep(0.15)
    latency = percentiles_ms(stats.lat)
    latency["all_delivered_median"] = round(statistics.median(all_delivered), 3) if all_delivered else None
    latency["all_delivered_max"] = round(max(all_delivered), 3) if all_delivered else None

    # -- sustained: bursts, closed loop ------------------------------------------------
    stats.received = 0
    stats.target = 1 << 62
    pids = [int(p) for p in args.cpu_pids.split(",") if p]
    per_burst = args.burst * n
    bursts = 0
    t_start = time.monotonic()
    cpu_start = cpu_seconds(pids)
    end = t_start + args.duration
    while time.monotonic() < end:
        if bursts * per_burst - stats.received < args.window * per_burst:
            await publish(args.burst)
            bursts += 1
        else:
            await asyncio.sleep(0.0005)
    # let what is in flight arrive (bounded), then close the window
    settle = time.monotonic() + 10
    while stats.received < bursts * per_burst and time.monotonic() < settle:
        await asyncio.sleep(0.001)
    elapsed = time.monotonic() - t_start
    cpu = cpu_seconds(pids) - cpu_start
    delivered = stats.received
    sustained = {
        "delivered": delivered,
        "expected": bursts * per_burst,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(delivered / elapsed),
        "cpu_s": round(cpu, 3),
        "cpu_us_per_msg": round(cpu / delivered * 1e6, 3) if delivered else None,
    }
    for conn in conns:
        conn[0].disconnect()
    return {"event": "result", "kind": args.kind, "conns": n, "setup_s": round(setup_s, 2),
            "message_bytes": len(stats.sample), "latency_ms": latency, "latency_rounds": args.rounds,
            "incomplete_rounds": incomplete, "sustained": sustained, "disconnects": stats.disconnects,
            "errors": errors[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("hub", "backend"), required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--admin", help="hub: host:port of the admin listener")
    parser.add_argument("--key", help="hub: the [admin] api_key")
    parser.add_argument("--control", help="backend: ws:// URL of the backend's control connection")
    parser.add_argument("--conns", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--cpu-pids", default="")
    parser.add_argument("--max-seconds", type=int, default=300)
    args = parser.parse_args()
    raise_nofile_limit()
    signal.alarm(args.max_seconds)
    emit(uvloop.run(main_async(args)))


if __name__ == "__main__":
    main()

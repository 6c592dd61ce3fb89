"""Resume wrapper overhead and parked-session memory (bounded: about a minute in all).

    python benchmarks/resume_bench.py [--messages 20000] [--sizes 64,1024,16384] [--peers websockets,picows]

1. **Throughput.**  One `edgeproxy run` process (its own CPU) with resume on; a
   backend in this process streams N messages of S bytes as fast as it can to
   one client, also in this process, once plainly (byte-for-byte relay) and once
   through the ``edgeproxy.resume.v1`` wrapper (the client acks every 64
   messages; the shipped clients ack every 16, and on every tick).  The same client library reads both,
   so the difference is the proxy's.  Reported: messages/s end to end, and the
   proxy process's CPU microseconds per message (from /proc), the cleaner
   measure on a shared machine.
2. **Proxy-bound throughput** (``--peers picows``, the default runs both):
   the same, but with peers that cost almost nothing per message, so that the
   proxy's own core is what limits the rate.  The backend (picows) writes
   pre-encoded frames in 256 KiB batches, honouring flow control; the client
   (picows, C frame parser) counts messages and, on the resumable session,
   acks every 64.  This is the figure for a proxy saturated by one kind of
   traffic; the websockets run is the figure an application sees.
3. **Memory of 10,000 parked sessions**, measured with tracemalloc on the
   in-process core objects (`core.resume.ResumeSession`, parked, with and
   without buffered messages), not on sockets: the kernel's socket buffers and
   the upstream connections' transports come on top.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import websockets  # noqa: E402
from picows import WSListener, WSMsgType, WSUpgradeResponse, WSUpgradeResponseWithListener  # noqa: E402
from picows import ws_connect as picows_connect  # noqa: E402
from picows import ws_create_server as picows_server  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.asyncio.server import serve  # noqa: E402

from edgeproxy.core.resume import ResumeSession, TokenCodec, route_key  # noqa: E402
from edgeproxy.core import _accel  # noqa: E402

WRAPPER = "edgeproxy.resume.v1+bench"


async def _backend(ws) -> None:
    count, size = map(int, (await ws.recv()).split())
    payload = b"x" * size
    for _ in range(count):
        await ws.send(payload)
    await ws.wait_closed()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _run_once(port: int, pid: int, count: int, size: int, resumable: bool) -> tuple[float, float]:
    offers = [WRAPPER, "bench"] if resumable else ["bench"]
    async with connect(f"ws://127.0.0.1:{port}/", subprotocols=offers, compression=None, max_size=None) as ws:
        if resumable:
            assert ws.subprotocol == WRAPPER, ws.subprotocol
            hello = await ws.recv()
            assert hello.startswith('C{"t":"session"')
            await ws.send("D1:%d %d" % (count, size))
        else:
            await ws.send("%d %d" % (count, size))
        cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
        got = 0
        while got < count:
            message = await ws.recv()
            if resumable:
                if message[:1] != b"D":
                    continue
                got += 1
                if got % 64 == 0:
                    await ws.send('C{"t":"ack","seq":%d}' % got)
            else:
                got += 1
        elapsed, cpu = time.perf_counter() - t0, _cpu_seconds(pid) - cpu0
    return count / elapsed, cpu / count * 1e6


class _BulkSender(WSListener):
    """Backend side of the proxy-bound run: streams ``count`` frames of ``size`` bytes, pre-encoded, in batches."""

    def __init__(self, count: int, size: int):
        self.left = count
        frame = _accel.encode_frame(_accel.OP_BINARY, b"x" * size)
        self.per_batch = max(1, (256 * 1024) // len(frame))
        self.batch = frame * self.per_batch
        self.frame = frame
        self.paused = False
        self.raw = None

    def on_ws_connected(self, transport) -> None:
        self.raw = transport.underlying_transport
        self._pump()

    def _pump(self) -> None:
        while self.left and not self.paused:
            if self.left >= self.per_batch:
                self.raw.write(self.batch)
                self.left -= self.per_batch
            else:
                self.raw.write(self.frame * self.left)
                self.left = 0

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def on_ws_frame(self, transport, frame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:  # answer the close (the session ends; nothing stays parked)
            transport.send_close(frame.get_close_code())
            transport.disconnect()


class _Counter(WSListener):
    """Client side of the proxy-bound run: counts data messages; on a resumable session, acks every 64."""

    def __init__(self, count: int, resumable: bool, done: asyncio.Future):
        self.count = count
        self.resumable = resumable
        self.done = done
        self.got = 0
        self.t0 = 0.0

    def on_ws_frame(self, transport, frame) -> None:
        if frame.msg_type is not WSMsgType.BINARY and frame.msg_type is not WSMsgType.TEXT:
            return
        if self.resumable and frame.get_payload_as_memoryview()[:1] != b"D":
            return  # the session message
        if not self.got:
            self.t0 = time.perf_counter()
        self.got += 1
        if self.resumable and not self.got & 63:
            transport.send(WSMsgType.TEXT, b'C{"t":"ack","seq":%d}' % self.got)
        if self.got == self.count and not self.done.done():
            self.done.set_result(time.perf_counter() - self.t0)


async def _picows_once(port: int, pid: int, count: int, size: int, resumable: bool) -> tuple[float, float]:
    done = asyncio.get_running_loop().create_future()
    offers = f"{WRAPPER}, bench" if resumable else "bench"
    url = f"ws://127.0.0.1:{port}/bulk?count={count}&size={size}"
    cpu0 = _cpu_seconds(pid)
    transport, _ = await picows_connect(lambda: _Counter(count, resumable, done), url,
                                        extra_headers={"Sec-WebSocket-Protocol": offers}, max_frame_size=1 << 26)
    try:
        elapsed = await asyncio.wait_for(done, 120)
    finally:
        transport.send_close(1000)  # a resumable session ends at the backend too, instead of parking
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(transport.wait_disconnected(), 5)
        transport.disconnect()
    cpu = _cpu_seconds(pid) - cpu0
    return count / elapsed, cpu / count * 1e6


def _bulk_backend(request):
    """picows server factory: /bulk?count=N&size=S streams; the offered subprotocol ``bench`` is chosen."""
    query = dict(part.split("=") for part in request.path.decode().partition("?")[2].split("&") if part)
    response = WSUpgradeResponse.create_101_response(extra_headers={"Sec-WebSocket-Protocol": "bench"})
    return WSUpgradeResponseWithListener(response, _BulkSender(int(query["count"]), int(query["size"])))


async def throughput(count: int, sizes: list[int], rounds: int, peers: list[str], raw_bytes: int) -> list[dict]:
    backend = await serve(_backend, "127.0.0.1", 0, subprotocols=["bench"], compression=None, max_size=None)
    bulk = await picows_server(_bulk_backend, "127.0.0.1", 0, max_frame_size=1 << 26)
    bport = backend.sockets[0].getsockname()[1]
    bulk_port = bulk.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "bench.toml"
        cfg.write_text(f"""
[[listeners]]
bind = "127.0.0.1:0"
[[upstreams]]
name = "app"
servers = ["127.0.0.1:{bport}"]
[[upstreams]]
name = "bulk"
servers = ["127.0.0.1:{bulk_port}"]
[[routes]]
path_prefix = "/bulk"
upstream = "bulk"
[[routes]]
upstream = "app"
[websocket]
resume_secret = "benchmark-secret-0123456789"
resume_buffer_bytes = 67108864
[logging]
access_log = false
level = "warning"
[admin]
enabled = false
""")
        # The proxy's port: bind a socket, free it, hand it over (a tiny race, fine for a benchmark).
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        cfg.write_text(cfg.read_text().replace('bind = "127.0.0.1:0"', f'bind = "127.0.0.1:{port}"'))
        proc = subprocess.Popen([sys.executable, "-m", "edgeproxy", "run", "--config", str(cfg)], cwd=ROOT)
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.1).close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            results = []
            for peer in peers:
                for size in sizes:
                    n = count if peer == "websockets" else max(1000, min(raw_bytes // size, 10 * count))
                    run_once = _run_once if peer == "websockets" else _picows_once
                    row = {"peers": peer, "size": size, "messages": n}
                    for _ in range(rounds):  # best of `rounds`, plain and resume interleaved: the machine is shared
                        for mode in ("plain", "resume"):
                            rate, cpu = await run_once(port, proc.pid, n, size, mode == "resume")
                            if mode not in row or rate > row[mode]["msgs_per_s"]:
                                row[mode] = {"msgs_per_s": round(rate), "proxy_cpu_us_per_msg": round(cpu, 2)}
                    row["throughput_overhead_pct"] = round(
                        100 * (1 - row["resume"]["msgs_per_s"] / row["plain"]["msgs_per_s"]), 1)
                    row["cpu_ratio"] = round(row["resume"]["proxy_cpu_us_per_msg"]
                                             / max(row["plain"]["proxy_cpu_us_per_msg"], 0.01), 2)
                    results.append(row)
                    print(json.dumps(row), flush=True)
            return results
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            backend.close()
            bulk.close()


def parked_memory(n: int, buffered: int, size: int) -> float:
    """Bytes per parked session (tracemalloc), each holding `buffered` messages of `size` bytes."""
    codec = TokenCodec(b"k" * 32, "edge-1")
    key = route_key(None, "/", "app")
    frames = b"".join(_accel.encode_frame(_accel.OP_TEXT, bytes([65 + i % 26]) * size) for i in range(buffered))
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    sessions = []
    for i in range(n):
        s = ResumeSession(session_id=i.to_bytes(16, "big"), route_key=key, codec=codec, window=30.0,
                          buffer_limit=1 << 20, mask_key_source=lambda: b"\0\0\0\0", now=0.0)
        s.open()
        s.client_gone(0.0)
        if frames:
            s.from_upstream(frames)
        s.actions.clear()
        sessions.append(s)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--sizes", default="64,1024,16384")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--parked", type=int, default=10000)
    ap.add_argument("--peers", default="websockets,picows",
                    help="websockets: what an application sees; picows: proxy-bound (cheap peers)")
    ap.add_argument("--raw-bytes", type=int, default=256 << 20, help="payload bytes per proxy-bound run")
    args = ap.parse_args()
    print(f"frame code: {_accel.IMPLEMENTATION}")
    asyncio.run(throughput(args.messages, [int(s) for s in args.sizes.split(",")], args.rounds,
                           args.peers.split(","), args.raw_bytes))
    for buffered, size in ((0, 0), (10, 100)):
        per = parked_memory(args.parked, buffered, size)
        print(json.dumps({"parked_sessions": args.parked, "buffered_msgs_each": buffered, "msg_bytes": size,
                          "bytes_per_session": round(per), "total_mib": round(per * args.parked / 2**20, 1)}))


if __name__ == "__main__":
    main()

"""Scale-out benchmark: real edgeproxy instances on one Redis, a Redis Cluster, and NATS.

    python benchmarks/scaleout_bench.py [--engines redis,redis-cluster,nats,nats-cluster]
        [--count 2000] [--concurrency 16] [--subscribers 30] [--instances 1,3,6]
        [--rate 400] [--duration 5] [--json out.json] [--markdown out.md]

Two measures, every engine in the same run, on loopback:

* **delivery** (3 instances): ``--subscribers`` hub WebSocket subscribers on
  *each* instance, all on channel ``bench``.  Throughput: ``--count`` publications
  POSTed to instance 0's ``/v1/publish``, ``--concurrency`` at a time; publications/s
  from the first POST until every subscriber of every instance had the last one.
  Latency: then ``--latency-count`` more at ``--latency-rate`` per second (an open
  loop the instances sustain, so the figure is delivery, not queueing), p50/p99 of
  publish-to-delivery over all deliveries (each message carries the monotonic time
  its POST started; publisher and subscribers share this process and its clock).
  Every subscriber must get every publication exactly once, in order, or the run
  fails.
* **interest** (1, 3, 6 instances): subscribers on instance 0 only, ``--rate``
  publications/s for ``--duration`` s into instance 0.  Reported: CPU seconds per
  publication of instance 0 (the publisher and the only one with subscribers) and
  of the average other instance.  With interest-based subscription the others hear
  nothing, so their cost should not grow with their number.

Clusters are started from Debian's ``redis-server`` and ``nats-server`` on free
loopback ports in a temporary directory and stopped at the end, with the tests'
own launchers (``tests/redis_cluster.py``, `NatsCluster` in ``tests/conftest.py``);
one Redis and one NATS are the machine's (127.0.0.1:6379, 127.0.0.1:4222).
Bounded: fixed counts, a timeout on every wait, every child killed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
import websockets

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import NatsCluster  # noqa: E402
from tests.redis_cluster import RedisClusterProcesses  # noqa: E402

API_KEY = "scaleout-benchmark-api-key-0123456789"
SINGLE_URLS = {"redis": ["redis://127.0.0.1:6379/0"], "nats": ["nats://127.0.0.1:4222"]}
KIND_OF_ENGINE = {"redis": "redis", "redis-cluster": "redis-cluster", "nats": "nats", "nats-cluster": "nats"}


def log(msg: str) -> None:
    print(f"[scaleout] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class Instance:
    """One ``edgeproxy run`` with a hub at /hub on the given backplane."""

    def __init__(self, workdir: Path, name: str, engine: str, urls: list[str], prefix: str, extra: str):
        self.name = name
        self.port, self.admin_port = free_port(), free_port()
        self.config = workdir / f"{name}.toml"
        url_list = ", ".join(f'"{u}"' for u in urls)
        self.config.write_text(f"""
[[listeners]]
bind = "127.0.0.1:{self.port}"
backlog = 4096
[[upstreams]]
name = "unused"
servers = ["127.0.0.1:9"]
[[routes]]
upstream = "unused"
[admin]
bind = "127.0.0.1:{self.admin_port}"
api_key = "{API_KEY}"
[logging]
access_log = false
[[hubs]]
path = "/hub"
ping_interval = 0
history_size = 1000
subscriber_buffer_limit = 4194304
[backplane]
kind = "{KIND_OF_ENGINE[engine]}"
urls = [{url_list}]
prefix = "{prefix}"
instance_id = "{name}"
timeout = 5.0
{extra}
""")
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeproxy", "run", "-c", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"), cwd=REPO)
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{self.admin_port}/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start: {self.log.read_text()[-2000:]}")
                await asyncio.sleep(0.05)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Subscriber:
    """A hub WebSocket subscriber of ``bench`` that records latency and checks order and count."""

    def __init__(self, ws, latencies: list[float]):
        self.ws = ws
        self.latencies = latencies
        self.seqs: list[int] = []

    @classmethod
    async def open(cls, instance: Instance, latencies: list[float]) -> Subscriber:
        ws = await websockets.connect(f"ws://127.0.0.1:{instance.port}/hub", max_size=None, ping_interval=None)
        await ws.send(orjson.dumps({"op": "subscribe", "channel": "bench"}).decode())
        while True:
            msg = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            if msg.get("op") == "subscribed":
                return cls(ws, latencies)

    async def run(self, count: int, timeout: float) -> None:
        """Take ``count`` publications (or fail at the timeout)."""
        deadline = time.monotonic() + timeout
        while len(self.seqs) < count:
            raw = await asyncio.wait_for(self.ws.recv(), max(0.1, deadline - time.monotonic()))
            now = time.monotonic_ns()
            msg = orjson.loads(raw)
            if msg.get("op") != "pub":
                continue
            self.latencies.append((now - int(msg["data"])) / 1e6)
            self.seqs.append(msg["seq"])


async def publish_many(session: aiohttp.ClientSession, instance: Instance, count: int, concurrency: int,
                       rate: float = 0.0) -> int:
    """POST ``count`` publications (``concurrency`` in flight; at ``rate``/s when given); returns refusals."""
    url = f"http://127.0.0.1:{instance.admin_port}/v1/publish"
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    next_index = 0
    refused = 0
    start = time.monotonic()

    async def worker() -> None:
        nonlocal next_index, refused
        while next_index < count:
            i = next_index
            next_index += 1
            if rate:
                wait = start + i / rate - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            body = orjson.dumps({"channel": "bench", "data": str(time.monotonic_ns())})
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    refused += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return refused


@asynccontextmanager
async def engine_urls(engine: str, workdir: Path):
    """The URLs of the engine's servers: the machine's single servers, or a cluster started here."""
    if engine in SINGLE_URLS:
        yield SINGLE_URLS[engine], ""
    elif engine == "redis-cluster":
        directory = workdir / "redis-cluster"
        directory.mkdir()
        cluster = RedisClusterProcesses(shutil.which("redis-server"), shutil.which("redis-cli"), str(directory))
        try:
            cluster.start()
            yield list(cluster.urls), ""
        finally:
            cluster.stop()
    elif engine == "nats-cluster":
        directory = workdir / "nats-cluster"
        directory.mkdir()
        cluster = NatsCluster(str(directory))
        try:
            cluster.start()
            yield list(cluster.urls), "replicas = 3"
        finally:
            cluster.stop()
    else:
        raise SystemExit(f"unknown engine {engine!r}")


@asynccontextmanager
async def instances(workdir: Path, engine: str, urls: list[str], extra: str, n: int):
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    procs = [Instance(workdir, f"{engine}-{n}-{i}", engine, urls, prefix, extra) for i in range(n)]
    try:
        await asyncio.gather(*(p.start() for p in procs))
        yield procs
    finally:
        for p in procs:
            p.stop()


async def delivery_case(workdir: Path, engine: str, urls: list[str], extra: str, args) -> dict:
    """Throughput (closed loop, as fast as the instances deliver), then latency at a rate they sustain."""
    async with instances(workdir, engine, urls, extra, 3) as procs, aiohttp.ClientSession() as session:
        throughput_latencies: list[float] = []
        subs = [await Subscriber.open(p, throughput_latencies) for p in procs for _ in range(args.subscribers)]
        await asyncio.sleep(0.5)  # interest reaches the backplane
        t0 = time.monotonic()
        readers = [asyncio.ensure_future(s.run(args.count, 120)) for s in subs]
        refused = await publish_many(session, procs[0], args.count, args.concurrency)
        await asyncio.gather(*readers)
        elapsed = time.monotonic() - t0
        # latency: an open loop at --latency-rate, each subscriber's list starts again
        latencies: list[float] = []
        for s in subs:
            s.latencies = latencies
        readers = [asyncio.ensure_future(s.run(args.count + args.latency_count, 120)) for s in subs]
        refused += await publish_many(session, procs[0], args.latency_count, args.concurrency, rate=args.latency_rate)
        await asyncio.gather(*readers)
        for s in subs:
            await s.ws.close()
        total = args.count + args.latency_count
        bad = [s for s in subs if s.seqs != list(range(s.seqs[0], s.seqs[0] + total)) or len(s.seqs) != total]
        if refused or bad:
            raise RuntimeError(f"{engine}: {refused} publications refused, {len(bad)} subscribers out of order "
                               "or missing messages")
        latencies.sort()
        return {"engine": engine, "instances": 3, "subscribers": len(subs), "publications": args.count,
                "publications_per_s": round(args.count / elapsed), "deliveries": len(throughput_latencies),
                "latency_rate": args.latency_rate, "latency_publications": args.latency_count,
                "p50_ms": round(statistics.median(latencies), 2),
                "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2)}


async def interest_case(workdir: Path, engine: str, urls: list[str], extra: str, n: int, args) -> dict:
    count = int(args.rate * args.duration)
    async with instances(workdir, engine, urls, extra, n) as procs, aiohttp.ClientSession() as session:
        latencies: list[float] = []
        subs = [await Subscriber.open(procs[0], latencies) for _ in range(args.subscribers)]
        await asyncio.sleep(0.5)
        before = [p.cpu() for p in procs]
        readers = [asyncio.ensure_future(s.run(count, 120)) for s in subs]
        await publish_many(session, procs[0], count, args.concurrency, rate=args.rate)
        await asyncio.gather(*readers)
        used = [p.cpu() - b for p, b in zip(procs, before)]
        for s in subs:
            await s.ws.close()
        others = used[1:]
        return {"engine": engine, "instances": n, "publications": count,
                "publisher_cpu_us_per_pub": round(used[0] / count * 1e6, 1),
                "other_cpu_us_per_pub": round(statistics.mean(others) / count * 1e6, 1) if others else None}


def markdown(delivery: list[dict], interest: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| engine (3 instances) | publications/s | deliveries | p50 ms | p99 ms (at publications/s) |",
             "|---|---|---|---|---|"]
    for r in delivery:
        lines.append(f"| {r['engine']} | {r['publications_per_s']:,} | {r['deliveries']:,} | {r['p50_ms']} | "
                     f"{r['p99_ms']} (at {r['latency_rate']:g}) |")
    lines += ["", "| engine | instances | CPU/pub, instance 0 (us) | CPU/pub, each other instance (us) |",
              "|---|---|---|---|"]
    for r in interest:
        other = "-" if r["other_cpu_us_per_pub"] is None else r["other_cpu_us_per_pub"]
        lines.append(f"| {r['engine']} | {r['instances']} | {r['publisher_cpu_us_per_pub']} | {other} |")
    return "\n".join(lines) + "\n"


async def main_async(args) -> dict:
    delivery, interest = [], []
    with tempfile.TemporaryDirectory(prefix="edgeproxy-scaleout-") as tmp:
        workdir = Path(tmp)
        for engine in args.engines.split(","):
            async with engine_urls(engine, workdir) as (urls, extra):
                log(f"{engine}: delivery, 3 instances")
                delivery.append(await delivery_case(workdir, engine, urls, extra, args))
                log(json.dumps(delivery[-1]))
                for n in (int(x) for x in args.instances.split(",")):
                    log(f"{engine}: interest, {n} instances")
                    interest.append(await interest_case(workdir, engine, urls, extra, n, args))
                    log(json.dumps(interest[-1]))
    return {"delivery": delivery, "interest": interest}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default="redis,redis-cluster,nats,nats-cluster")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--subscribers", type=int, default=10, help="per instance that has subscribers")
    parser.add_argument("--latency-rate", type=float, default=100.0, help="publications/s of the latency phase")
    parser.add_argument("--latency-count", type=int, default=500)
    parser.add_argument("--instances", default="1,3,6")
    parser.add_argument("--rate", type=float, default=400.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args))
    print(json.dumps(result))
    command = "python benchmarks/scaleout_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(result["delivery"], result["interest"], command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

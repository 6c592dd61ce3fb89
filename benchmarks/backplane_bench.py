"""Backplane benchmark: publications/s and publish-to-delivery latency, Redis vs NATS, 1 vs 3 instances.

Run:  python benchmarks/backplane_bench.py [--count 3000] [--concurrency 32]

Each case makes ``instances`` backplane adapters in this process (as that many
proxies would hold them) on the machine's Redis (127.0.0.1:6379) and NATS with
JetStream (127.0.0.1:4222), subscribes every one to one channel, and publishes
``count`` publications from the first, ``concurrency`` at a time (like concurrent
POST /v1/publish calls).  Reported: publications/s (until every instance has
delivered all), and latency from the start of ``publish`` to the delivery callback
on each instance (p50/p99, over all instances).  Memory is the one-process baseline.
Bounded: a few thousand publications per case, well under a minute in all; each
case uses its own prefix and removes what it created.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from edgeproxy.config import BackplaneConfig, HubConfig
from edgeproxy.metrics import Metrics
from edgeproxy.transport.backplanes import make_backplane

URLS = {"redis": "redis://127.0.0.1:6379/0", "nats": "nats://127.0.0.1:4222"}


async def cleanup(kind: str, prefix: str) -> None:
    if kind == "redis":
        import redis.asyncio as aioredis
        client = aioredis.Redis.from_url(URLS[kind])
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    elif kind == "nats":
        import nats
        nc = await nats.connect(URLS[kind])
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name.startswith(prefix + "_"):
                await js.delete_stream(info.config.name)
        await nc.close()


async def case(kind: str, instances: int, count: int, concurrency: int) -> dict:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    hub = HubConfig(path="/hub", history_size=1000, history_ttl=300.0)
    config = BackplaneConfig(kind=kind, urls=(URLS[kind],) if kind != "memory" else (), prefix=prefix, timeout=5.0)
    started: dict[bytes, float] = {}
    latencies: list[float] = []
    remaining = instances * count
    done = asyncio.Event()

    def deliver(pub) -> None:
        nonlocal remaining
        latencies.append(time.perf_counter() - started[pub.data])
        remaining -= 1
        if remaining == 0:
            done.set()

    nodes = []
    for i in range(instances if kind != "memory" else 1):
        bp = make_backplane(config, hub, Metrics(), f"bench{i}")
        await bp.start(deliver)
        await bp.subscribe("bench")
        nodes.append(bp)
    if kind == "memory":
        remaining = count
    # warm up: open the connections the concurrent publishes need, load the scripts
    await asyncio.gather(*(nodes[0].publish("warmup", b"0") for _ in range(concurrency)))
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            data = b"%d" % i
            started[data] = time.perf_counter()
            await nodes[0].publish("bench", data)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await asyncio.wait_for(done.wait(), 60)
    elapsed = time.perf_counter() - t0
    for bp in nodes:
        await bp.close()
    await cleanup(kind, prefix)
    latencies.sort()
    return {
        "kind": kind, "instances": len(nodes), "pubs_per_s": count / elapsed,
        "p50_ms": statistics.median(latencies) * 1000, "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    print(f"{args.count} publications per case, {args.concurrency} concurrent publishes, one channel")
    print(f"{'backplane':<10} {'instances':>9} {'pubs/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for kind, instances in [("memory", 1), ("redis", 1), ("redis", 3), ("nats", 1), ("nats", 3)]:
        r = await case(kind, instances, args.count, args.concurrency)
        print(f"{r['kind']:<10} {r['instances']:>9} {r['pubs_per_s']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}")


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())

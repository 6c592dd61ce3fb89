"""Presence and failover figures for the scale-out engines (README "Scale-out").

Run:  python benchmarks/nats_cluster_bench.py [--calls 200] [--trials 2]

* **Presence**, on the machine's Redis (127.0.0.1:6379), its NATS (127.0.0.1:4222)
  and a private 3-node NATS cluster (replicas 3): three instances (as three proxies
  would hold them, heartbeat 0.5 s), 50 users on one; latency of a user lookup and of
  a send to a connection on another instance (p50/p99 over ``calls``), and how long
  after an instance stops beating it is fenced out of the answers.
* **Failover** on the private cluster: one backplane publishing; the stream's leader,
  or the server it is connected to, is SIGKILLed; time until publishes succeed again
  and how many were refused (BackplaneUnavailable, the API's 503) meanwhile.

The cluster is ``tests/conftest.py`` `NatsCluster` (three nats-server processes with
routes on free loopback ports, stores in a temporary directory). Bounded: about a
minute in all; each case uses its own prefix and removes what it created.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "backplane")]

from conftest import NatsCluster, cleanup_backplane  # noqa: E402
from test_presence_contract import HEARTBEAT, Instance  # noqa: E402

from edgeproxy.config import BackplaneConfig, HubConfig  # noqa: E402
from edgeproxy.metrics import Metrics  # noqa: E402
from edgeproxy.transport.backplanes import BackplaneUnavailable, make_backplane  # noqa: E402


def quantile_ms(values: list[float], q: float) -> float:
    return sorted(values)[max(0, int(len(values) * q) - 1)] * 1000


async def presence(name: str, fields: dict, calls: int, trials: int) -> None:
    prefix = f"b{uuid.uuid4().hex[:10]}"
    config = BackplaneConfig(prefix=prefix, heartbeat_interval=HEARTBEAT, timeout=2.0, reconnect_min=0.05,
                             reconnect_max=0.5, **fields)
    a, b, c = insts = [Instance(config, f"{prefix}-{x}") for x in "abc"]
    try:
        for inst in insts:
            await inst.start()
        conns = [b.connect(f"user{k}") for k in range(50)]
        c.connect("carol")
        await asyncio.sleep(2 * HEARTBEAT)
        lookups, sends = [], []
        for k in range(calls):
            t = time.perf_counter()
            await a.presence.lookup({"user": f"user{k % 50}"})
            lookups.append(time.perf_counter() - t)
            t = time.perf_counter()
            await a.presence.send({"client": conns[k % 50].client_id}, b"1")
            sends.append(time.perf_counter() - t)
        fenced = []
        for _ in range(trials):
            c.presence._beat.cancel()
            stopped = time.monotonic()
            while await a.presence.lookup({"user": "carol"}):
                await asyncio.sleep(0.01)
            fenced.append(time.monotonic() - stopped)
            await c.presence._heartbeat_once()
            c.presence._beat = asyncio.get_running_loop().create_task(c.presence._heartbeats())
            await asyncio.sleep(2 * HEARTBEAT)
        print(f"presence {name:16} lookup(user) p50 {quantile_ms(lookups, .5):5.2f} ms p99 {quantile_ms(lookups, .99):5.2f} ms"
              f" | send(client elsewhere) p50 {quantile_ms(sends, .5):5.2f} ms p99 {quantile_ms(sends, .99):5.2f} ms"
              f" | fenced after {', '.join(f'{f:.2f}' for f in fenced)} s (heartbeat {HEARTBEAT} s)")
    finally:
        for inst in insts:
            await inst.stop()
        await cleanup_backplane(fields["kind"], ",".join(fields["urls"]), prefix)


async def failover(cluster: NatsCluster, victim_is: str) -> None:
    prefix = f"b{uuid.uuid4().hex[:10]}"
    config = BackplaneConfig(kind="nats", urls=cluster.urls, replicas=3, prefix=prefix, timeout=1.0,
                             reconnect_min=0.05, reconnect_max=0.3)
    bp = make_backplane(config, HubConfig(path="/hub", history_size=100, history_ttl=60.0), Metrics(), "bench")
    await bp.start(lambda pub: None)
    try:
        await bp.publish("c", b"1")
        leader = cluster.index_of((await bp.js.stream_info(bp.stream)).cluster.leader)
        own = cluster.client_ports.index(bp.nc.connected_url.port)
        victim = leader if victim_is == "stream leader" else own
        cluster.kill(victim)
        killed, refused = time.monotonic(), 0
        async with asyncio.timeout(60):
            while True:
                try:
                    await bp.publish("c", b"x")
                    break
                except BackplaneUnavailable:
                    refused += 1
                    await asyncio.sleep(0.02)
        print(f"failover: killed the {victim_is} (it led the stream: {victim == leader}, publisher's own server: "
              f"{victim == own}): publishes back after {time.monotonic() - killed:.2f} s, {refused} refused")
    finally:
        await bp.close()
        cluster.start(victim)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()
    cluster = NatsCluster(tempfile.mkdtemp(prefix="nats-cluster-bench-"))
    cluster.start()
    try:
        await presence("redis", {"kind": "redis", "urls": ("redis://127.0.0.1:6379/0",)}, args.calls, args.trials)
        await presence("nats", {"kind": "nats", "urls": ("nats://127.0.0.1:4222",)}, args.calls, args.trials)
        await presence("nats cluster R3", {"kind": "nats", "urls": cluster.urls, "replicas": 3}, args.calls, args.trials)
        for victim_is in ("stream leader", "publisher's server") * args.trials:
            await failover(cluster, victim_is)
    finally:
        cluster.stop()


if __name__ == "__main__":
    asyncio.run(main())

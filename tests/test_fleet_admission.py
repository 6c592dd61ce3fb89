"""Fleet-wide admission (``[admission] scope = "cluster"``) with real processes and a real Redis / NATS.

Three edgeproxy instances share one ``connection_rate`` budget through the Redis
(or NATS) backplane; a storm of 3,000 connection attempts (loopback, 1,000 a second, at most
60 at once) spread over the three is admitted at the fleet's rate, not three times it.  The
expected count is derived from the storm's own measured duration (burst + rate x
duration), so the check holds however fast the machine runs the storm; the rate
is low enough (100/s) that any machine making the attempts offers more than it.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import pytest

from processes import Backend, ProxyProcess, config_text
from test_cli import free_port, wait_for_port

from edgeproxy.config import BackplaneConfig
from edgeproxy.core.admission import AdmissionPolicy, Admission
from edgeproxy.metrics import Metrics
from edgeproxy.transport.fleet_admission import FleetAdmission, local_policy

RATE = 100
BURST = 50


ATTEMPTS = 3000


async def attempt(port: int) -> tuple[int, float | None]:
    """One connection: (status, Retry-After or None)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: storm\r\nConnection: close\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    finally:
        writer.close()
    status = int(head.split(b" ", 2)[1])
    retry = re.search(rb"\r\nretry-after: *(\d+)", head, re.I)
    return status, (float(retry.group(1)) if retry else None)


async def storm(ports: list[int], n: int, pace: float = 1000.0,
                concurrency: int = 60) -> tuple[list[tuple[int, float | None]], float]:
    """``n`` attempts, round robin over ``ports``, started at ``pace`` a second at most (ten
    times the rate: a storm that lasts seconds, so the budget is mostly rate, not burst)."""
    gate = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(i: int):
        await asyncio.sleep(max(0.0, start + i / pace - loop.time()))
        async with gate:
            return await attempt(ports[i % len(ports)])

    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    return results, time.monotonic() - started


@pytest.fixture
def fleet(tmp_path, services):
    """Factory: ``fleet(scope, kind="redis")`` -> the listener ports of 3 started instances on one
    Redis (or NATS)."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    backend = Backend("fleet")
    procs: list[ProxyProcess] = []

    used = set()

    def start(scope: str, kind: str = "redis") -> list[int]:
        used.add(kind)
        url = services.require(kind)
        ports = []
        for i in range(3):
            port = free_port()
            extra = (f"[limits]\nconnection_rate = {RATE}\nconnection_burst = {BURST}\n"
                     f'[admission]\nscope = "{scope}"\n'
                     f'[backplane]\nkind = "{kind}"\nurl = "{url}"\nprefix = "{prefix}"\ninstance_id = "edge-{i}"\n')
            text = config_text({"app": [backend]}, {"/": "app"}, port=port, extra=extra)
            procs.append(ProxyProcess(tmp_path / f"{scope}-{i}.toml", text))
            ports.append(port)
        for port in ports:
            wait_for_port(port)
        return ports

    yield start
    for proc in procs:
        proc.close()
    backend.stop()
    for kind in used:  # (on NATS this removes the key-value buckets under the prefix too)
        asyncio.run(services.cleanup(kind, services.require(kind), prefix))


@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_three_instances_admit_the_fleets_rate_in_a_storm(fleet, kind) -> None:
    ports = fleet("cluster", kind)
    await asyncio.sleep(1.5)  # the leases taken at start expire: the storm meets the bucket alone
    results, seconds = await storm(ports, ATTEMPTS)
    admitted = sum(1 for status, _ in results if status == 200)
    refused = [retry for status, retry in results if status == 503]
    assert admitted + len(refused) == ATTEMPTS
    budget = BURST + RATE * seconds
    print(f"FIGURES {kind}: admitted {admitted}, refused {len(refused)}, budget {budget:.1f}, {seconds:.2f} s, "
          f"Retry-After up to {max(refused):g}")
    assert abs(admitted - budget) <= 0.1 * budget, (admitted, budget, seconds)
    # Retry-After is the fleet's: the refused clients queue for the whole fleet's rate, so
    # the queue is about len(refused) / RATE seconds long less what the storm's own
    # duration served of it, not a third of that (each instance queueing at the full rate)
    assert all(r is not None and r >= 1 for r in refused)
    queue = min(60.0, len(refused) / RATE - seconds)
    assert max(refused) >= 0.8 * queue, (max(refused), len(refused), seconds)


async def test_an_unreachable_backplane_falls_back_to_the_share_and_recovers(server_process, caplog) -> None:
    """The fleet's Redis dies: one warning, the fallback metric, admission at this instance's
    share; Redis back: one more warning, leasing again."""
    server = server_process("redis")
    policy = AdmissionPolicy(rate=RATE, burst=BURST)
    backplane = BackplaneConfig(kind="redis", urls=(server.url,), prefix="fleet", timeout=0.5)
    metrics = Metrics()
    loop = asyncio.get_running_loop()
    admission = FleetAdmission(Admission(local_policy(policy), loop.time()), policy, backplane, "edge-0", metrics,
                               loop.time())
    try:
        await admission.start()
        assert admission.admit("10.0.0.1", loop.time()).admitted
        server.kill()
        caplog.set_level("WARNING", "edgeproxy")
        deadline = loop.time() + 10
        while not metrics.admission_fallback_active:
            admission.admit("10.0.0.1", loop.time())
            assert loop.time() < deadline, "no fallback"
            await asyncio.sleep(0.01)
        assert admission.fleet.fallback.rate == RATE  # the only member it saw: the whole budget
        server.start()
        while metrics.admission_fallback_active:
            admission.admit("10.0.0.1", loop.time())
            assert loop.time() < deadline + 10, "no recovery"
            await asyncio.sleep(0.01)
        lines = [r.getMessage() for r in caplog.records if "admission:" in r.getMessage()]
        assert len(lines) == 2 and "unreachable" in lines[0] and "reachable again" in lines[1], lines
        assert metrics.admission_fallbacks == 1
    finally:
        await admission.close()


@pytest.mark.parametrize("kind", ["redis", "redis-cluster", "nats"])
async def test_two_instances_share_one_bucket_on_every_engine(request, services, kind) -> None:
    """The lease script is single-slot: on a Redis Cluster as on one Redis, two instances
    together get the burst and the rate once; on NATS the revision-checked key does the same."""
    urls = (request.getfixturevalue("redis_cluster").urls if kind == "redis-cluster"
            else (services.require(kind),))
    prefix = f"t{uuid.uuid4().hex[:12]}"
    policy = AdmissionPolicy(rate=1.0, burst=20)  # 20 at once, then one a second
    backplane = BackplaneConfig(kind=kind, urls=urls, prefix=prefix, timeout=2.0)
    loop = asyncio.get_running_loop()
    pair = [FleetAdmission(Admission(local_policy(policy), loop.time()), policy, backplane, f"edge-{i}", Metrics(),
                           loop.time()) for i in range(2)]
    try:
        for admission in pair:
            await admission.start()
        admitted = 0
        for _ in range(200):  # about a second of attempts on both
            for admission in pair:
                admitted += admission.admit("10.0.0.1", loop.time()).admitted
            await asyncio.sleep(0.005)
        assert 20 <= admitted <= 20 + 3, admitted
        assert {a.fleet.active for a in pair} == {2}
        assert all(a.metrics.admission_fallbacks == 0 for a in pair)
    finally:
        for admission in pair:
            await admission.close()
        # (on NATS this removes the key-value buckets under the prefix too)
        await services.cleanup(kind, urls if kind == "redis-cluster" else urls[0], prefix)

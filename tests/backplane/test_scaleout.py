"""Three real edgeproxy processes on one real Redis or NATS: broadcast, resume on another
instance, targeted send, presence of a killed instance, and a backplane killed mid-stream.

Each test uses its own prefix (removed after).  Needs the services of this machine;
skips without them, fails under ``EDGEPROXY_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import aiohttp
import orjson
import pytest
import websockets

from edgeproxy.hub.token import sign_token

pytestmark = pytest.mark.scaleout

API_KEY = "scaleout-api-key-0123456789"
SECRET = "scaleout-secret-0123456789-0123456789"
HEARTBEAT = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProxyProcess:
    """``edgeproxy run`` in a subprocess with a hub and a backplane."""

    def __init__(self, tmp_path, name: str, kind: str, url: str | tuple[str, ...], prefix: str,
                 secret: bool = False):
        self.name = name
        self.port, self.admin_port = free_port(), free_port()
        self.config = tmp_path / f"{name}.toml"
        secret_line = f'token_secret = "{SECRET}"\n' if secret else ""
        self.config.write_text(f"""
[[listeners]]
bind = "127.0.0.1:{self.port}"
[[upstreams]]
name = "app"
servers = ["127.0.0.1:9"]
[[routes]]
upstream = "app"
[admin]
bind = "127.0.0.1:{self.admin_port}"
api_key = "{API_KEY}"
[logging]
access_log = false
[[hubs]]
path = "/hub"
ping_interval = 0
history_size = 1000
{secret_line}
[backplane]
kind = "{kind}"
urls = {orjson.dumps([url] if isinstance(url, str) else list(url)).decode()}
prefix = "{prefix}"
instance_id = "{name}"
heartbeat_interval = {HEARTBEAT}
timeout = 1.0
reconnect_min = 0.05
reconnect_max = 0.5
""")
        self.log = tmp_path / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        exe = shutil.which("edgeproxy", path=os.path.dirname(sys.executable)) or "edgeproxy"
        self.proc = subprocess.Popen([exe, "run", "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "wb"))
        deadline = time.monotonic() + 15
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

    def ws_url(self, token: str | None = None) -> str:
        return f"ws://127.0.0.1:{self.port}/hub" + (f"?token={token}" if token else "")

    async def post(self, path: str, body: dict) -> tuple[int, dict]:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{self.admin_port}{path}", data=orjson.dumps(body),
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as r:
                return r.status, orjson.loads(await r.read())

    async def metric(self, name: str) -> float:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{self.admin_port}/metrics") as r:
                for line in (await r.text()).splitlines():
                    if line.startswith(name + " ") or line.startswith(name + "{"):
                        return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
async def cluster(request, tmp_path, services):
    """Factory: ``await cluster(kind, n=3, url=None, secret=False)`` -> started `ProxyProcess`es."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    made: list[ProxyProcess] = []
    used: list[tuple[str, str]] = []

    async def start(kind: str, n: int = 3, url: str | None = None, secret: bool = False) -> list[ProxyProcess]:
        if url is None and kind == "redis-cluster":  # the session's cluster: clean up after
            url = request.getfixturevalue("redis_cluster").urls
            used.append((kind, url))
        elif url is None:  # the shared server: clean up after; a private one dies with its fixture
            url = services.require(kind)
            used.append((kind, url))
        procs = [ProxyProcess(tmp_path, f"{prefix}-{chr(97 + len(made) + i)}", kind, url, prefix, secret)
                 for i in range(n)]
        made.extend(procs)
        await asyncio.gather(*(p.start() for p in procs))
        return procs

    yield start
    for p in made:
        p.stop()
    for kind, url in used:
        await services.cleanup(kind, url, prefix)


async def recv(ws, timeout: float = 5.0) -> dict:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def subscribe(url: str, channel: str, since: dict | None = None):
    ws = await websockets.connect(url)
    hello = await recv(ws)
    assert hello["op"] == "connected"
    msg = {"op": "subscribe", "channel": channel, **({"since": since} if since else {})}
    await ws.send(orjson.dumps(msg).decode())
    answer = await recv(ws)
    assert answer["op"] == "subscribed", answer
    return ws, hello, answer


KINDS = pytest.mark.parametrize("kind", ["redis", "redis-cluster", "nats"])
#: the engines with presence (targeted send); NATS joins when it has it
PRESENCE = pytest.mark.parametrize("kind", ["redis", "redis-cluster"])


@KINDS
async def test_broadcast_reaches_every_instance(cluster, kind) -> None:
    procs = await cluster(kind)
    subs = [await subscribe(p.ws_url(), "news") for p in procs for _ in range(2)]
    for i in range(20):
        status, doc = await procs[i % 3].post("/v1/publish", {"channel": "news", "data": i})
        assert status == 200 and doc["seq"] == i + 1
    for ws, _, _ in subs:
        got = [await recv(ws) for _ in range(20)]
        assert [m["seq"] for m in got] == list(range(1, 21)) and [m["data"] for m in got] == list(range(20))
        await ws.close()


@KINDS
async def test_disconnect_from_a_resume_on_b_nothing_lost_or_doubled(cluster, kind) -> None:
    a, b, c = await cluster(kind)
    ws, _, answer = await subscribe(a.ws_url(), "feed")
    for i in range(5):
        await c.post("/v1/publish", {"channel": "feed", "data": i})
    seen = [await recv(ws) for _ in range(5)]
    await ws.close()
    last = {"seq": seen[-1]["seq"], "epoch": seen[-1]["epoch"]}
    for i in range(5, 12):  # missed while away
        await c.post("/v1/publish", {"channel": "feed", "data": i})
    ws, _, answer = await subscribe(b.ws_url(), "feed", since=last)
    assert answer["recovered"] is True and answer["seq"] == 12
    replay = [await recv(ws) for _ in range(7)]
    await c.post("/v1/publish", {"channel": "feed", "data": 12})
    live = await recv(ws)
    got = [m["data"] for m in seen + replay + [live]]
    assert got == list(range(13))  # each once, in order
    with pytest.raises(TimeoutError):
        await recv(ws, timeout=0.3)
    await ws.close()


@PRESENCE
async def test_targeted_send_goes_through_the_owning_instance(cluster, kind) -> None:
    a, b, c = await cluster(kind, secret=True)
    token = sign_token({"sub": "alice", "channels": ["x"]}, SECRET.encode())
    alice_b = await websockets.connect(b.ws_url(token))
    hello = await recv(alice_b)
    alice_c = await websockets.connect(c.ws_url(token))
    await recv(alice_c)
    bob = await websockets.connect(a.ws_url(sign_token({"sub": "bob", "channels": ["x"]}, SECRET.encode())))
    await recv(bob)
    await asyncio.sleep(0.2)  # presence writes are fire-and-forget
    status, doc = await a.post("/v1/send", {"user": "alice", "data": {"hi": 1}})
    assert status == 200 and sorted(doc["delivered"]) == sorted([b.name, c.name])
    assert await recv(alice_b) == {"op": "message", "data": {"hi": 1}}
    assert await recv(alice_c) == {"op": "message", "data": {"hi": 1}}
    status, doc = await c.post("/v1/send", {"client": hello["client"], "data": "only b"})
    assert status == 200 and doc["delivered"] == {b.name: [hello["client"]]}
    assert await recv(alice_b) == {"op": "message", "data": "only b"}
    with pytest.raises(TimeoutError):
        await recv(alice_c, timeout=0.3)
    with pytest.raises(TimeoutError):
        await recv(bob, timeout=0.1)
    status, doc = await a.post("/v1/send", {"user": "nobody", "data": 1})
    assert status == 404 and "not connected" in doc["error"]
    await alice_b.close()
    await asyncio.sleep(0.2)
    status, doc = await a.post("/v1/send", {"user": "alice", "data": 2})
    assert status == 200 and list(doc["delivered"]) == [c.name]


@PRESENCE
async def test_killed_instance_presence_is_gone_within_a_heartbeat(cluster, kind) -> None:
    a, b, c = await cluster(kind, secret=True)
    token = sign_token({"sub": "carol", "channels": ["x"]}, SECRET.encode())
    ws = await websockets.connect(c.ws_url(token))
    await recv(ws)
    await asyncio.sleep(0.2)
    assert (await a.post("/v1/send", {"user": "carol", "data": 1}))[0] == 200
    c.kill()
    killed = time.monotonic()
    while (await a.post("/v1/send", {"user": "carol", "data": 1}))[0] != 404:
        assert time.monotonic() - killed < HEARTBEAT + 0.3, "presence of the dead instance lingers"
        await asyncio.sleep(0.02)
    # fencing: the entries themselves are still in Redis (their own TTL is 3 intervals)
    assert time.monotonic() - killed <= HEARTBEAT + 0.3


class Publisher:
    """Publishes ``data`` 0..n-1 to a channel through one instance, retrying each 503 until it is taken."""

    def __init__(self, proc: ProxyProcess, channel: str, n: int = 60):
        self.acked: list[int] = []
        self.refused = 0
        self.task = asyncio.create_task(self._run(proc, channel, n))

    async def _run(self, proc: ProxyProcess, channel: str, n: int) -> None:
        for i in range(n):
            while True:
                status, doc = await proc.post("/v1/publish", {"channel": channel, "data": i})
                if status == 200:
                    self.acked.append(i)
                    break
                assert status == 503 and "unavailable" in doc["error"] or "failed" in doc["error"], doc
                self.refused += 1
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.01)

    async def until_acked(self, n: int) -> None:
        while len(self.acked) < n:
            await asyncio.sleep(0.01)


async def assert_each_once_in_order(subs, n: int = 60) -> None:
    for ws in subs:
        got = []
        async with asyncio.timeout(10):
            while len(got) < n:
                got.append((await recv(ws))["data"])
        assert got == list(range(n))  # nothing lost, nothing twice, in order
        with pytest.raises(TimeoutError):
            await recv(ws, timeout=0.3)
        await ws.close()


@pytest.mark.parametrize("kind", ["redis", "nats"])  # redis-cluster: test_redis_cluster_master_killed_mid_stream
async def test_backplane_killed_and_restarted_mid_stream(cluster, kind, server_process) -> None:
    server = server_process(kind)
    a, b, _ = await cluster(kind, url=server.url)
    subs = [(await subscribe(p.ws_url(), "live"))[0] for p in (a, b)]
    publisher = Publisher(a, "live")
    await publisher.until_acked(20)
    server.kill()
    await asyncio.sleep(1.0)
    server.start()  # same port; Redis comes back empty, NATS with its JetStream files
    await asyncio.wait_for(publisher.task, 30)
    assert publisher.refused > 0  # the outage was loud
    assert await a.metric("edgeproxy_backplane_errors_total") > 0
    await assert_each_once_in_order(subs)
    assert "backplane" in a.log.read_text() and "lost" in a.log.read_text()


async def test_redis_cluster_master_killed_mid_stream(cluster, request) -> None:
    """SIGKILL the master owning the channel's slot while a publisher runs: its replica takes
    over (cluster-node-timeout 1 s); publishing answers 503 meanwhile, then resumes, and the
    subscribers on both instances get every publication once, in order."""
    redis_cluster = request.getfixturevalue("redis_cluster")
    a, b, _ = await cluster("redis-cluster")
    subs = [(await subscribe(p.ws_url(), "live"))[0] for p in (a, b)]
    key = f"{a.name.rsplit('-', 1)[0]}:hub:ch:{{live}}"  # the shard channel: prefix, hub, hash tag
    master = redis_cluster.master_of(key)
    publisher = Publisher(a, "live")
    try:
        await publisher.until_acked(20)
        redis_cluster.kill(master)
        await asyncio.wait_for(publisher.task, 60)
    finally:
        publisher.task.cancel()
        # the killed node rejoins as a replica of its successor: the cluster is whole for the next test
        await asyncio.to_thread(redis_cluster.restart, master)
    assert redis_cluster.master_of(key) != master  # the replica took over
    assert publisher.refused > 0  # the failover was loud, not hidden
    assert await a.metric("edgeproxy_backplane_errors_total") > 0
    await assert_each_once_in_order(subs)
    assert "backplane redis-cluster lost" in a.log.read_text()

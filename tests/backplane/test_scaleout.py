"""Three real edgeproxy processes on one real Redis or NATS, or on a 3-node NATS cluster:
broadcast, resume on another instance, targeted send, presence of a killed instance, a
backplane killed mid-stream, and a NATS cluster node killed mid-stream.

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
urls = {orjson.dumps(url.split(",") if isinstance(url, str) else list(url)).decode()}
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
        if kind == "nats-cluster":  # the test process's 3-node cluster (tests/conftest.py), shared
            kind, url = "nats", request.getfixturevalue("nats_cluster").url
            used.append((kind, url))
        elif url is None and kind == "redis-cluster":  # the session's cluster: clean up after
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


async def send_until(proc: ProxyProcess, body: dict, instances: set[str], timeout: float = 10.0) -> dict[str, int]:
    """POST /v1/send until it is delivered through exactly ``instances`` (presence writes
    are asynchronous); answers how many attempts went through each instance."""
    copies = dict.fromkeys(instances, 0)
    async with asyncio.timeout(timeout):
        while True:
            status, doc = await proc.post("/v1/send", body)
            assert status in (200, 404), doc
            for name in doc.get("delivered", {}):
                copies[name] = copies.get(name, 0) + 1
            if status == 200 and set(doc["delivered"]) == instances:
                return copies
            await asyncio.sleep(0.05)


async def recv_n(ws, n: int) -> list[dict]:
    return [await recv(ws) for _ in range(n)]


#: every engine, a private 3-node NATS cluster included (history and presence with 3 replicas)
ALL_KINDS = pytest.mark.parametrize("kind", ["redis", "redis-cluster", "nats", "nats-cluster"])
#: the engines with presence (targeted send): all of them
PRESENCE = ALL_KINDS


@ALL_KINDS
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


@ALL_KINDS
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
    # presence writes are asynchronous: send until both of alice's instances are in (each
    # answer says where that attempt went, so the copies each connection gets are known)
    copies = await send_until(a, {"user": "alice", "data": {"hi": 1}}, {b.name, c.name})
    assert await recv_n(alice_b, copies[b.name]) == [{"op": "message", "data": {"hi": 1}}] * copies[b.name]
    assert await recv_n(alice_c, copies[c.name]) == [{"op": "message", "data": {"hi": 1}}] * copies[c.name]
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
    copies = await send_until(a, {"user": "alice", "data": 2}, {c.name})
    assert await recv_n(alice_c, copies[c.name]) == [{"op": "message", "data": 2}] * copies[c.name]


@PRESENCE
async def test_killed_instance_presence_is_gone_within_a_heartbeat(cluster, kind) -> None:
    a, b, c = await cluster(kind, secret=True)
    token = sign_token({"sub": "carol", "channels": ["x"]}, SECRET.encode())
    ws = await websockets.connect(c.ws_url(token))
    await recv(ws)
    await send_until(a, {"user": "carol", "data": 1}, {c.name})
    c.kill()
    killed = time.monotonic()
    while (await a.post("/v1/send", {"user": "carol", "data": 1}))[0] != 404:
        assert time.monotonic() - killed < HEARTBEAT + 0.3, "presence of the dead instance lingers"
        await asyncio.sleep(0.02)
    # fencing: the entries themselves are still in Redis or NATS (their own TTL is 3 intervals)
    assert time.monotonic() - killed <= HEARTBEAT + 0.3


class Publisher:
    """Publishes ``data`` 0..n-1 to a channel through one instance, retrying each 503 until it is taken."""

    def __init__(self, proc: ProxyProcess, channel: str, n: int = 60):
        self.acked: list[int] = []
        self.refused = 0
        #: the seq of the last publication taken
        self.last_seq = 0
        self.task = asyncio.create_task(self._run(proc, channel, n))

    async def _run(self, proc: ProxyProcess, channel: str, n: int) -> None:
        for i in range(n):
            while True:
                status, doc = await proc.post("/v1/publish", {"channel": channel, "data": i})
                if status == 200:
                    self.acked.append(i)
                    self.last_seq = doc["seq"]
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


async def test_nats_cluster_node_killed_mid_stream(cluster, private_nats_cluster) -> None:
    """Three nats-servers with routes, the history stream R3 (urls lists 3 servers): the node
    leading the channel's stream is SIGKILLed while a publishes and a and b subscribe.
    Publishing answers 503 while JetStream elects a new leader, then resumes; every
    subscriber gets every seq once, in order."""
    import nats

    servers = private_nats_cluster()
    a, b = await cluster("nats", n=2, url=servers.url)
    stream = a.name.rsplit("-", 1)[0] + "_hub"
    subs = [(await subscribe(p.ws_url(), "live"))[0] for p in (a, b)]
    pub = Publisher(a, "live", 80)
    await pub.until_acked(20)
    nc = await nats.connect(servers=list(servers.urls))
    try:
        info = await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()
    assert info.config.num_replicas == 3 and len(info.cluster.replicas) == 2
    servers.kill(servers.index_of(info.cluster.leader))
    await asyncio.wait_for(pub.task, 60)
    assert pub.refused > 0  # the election was loud, not silent
    last_seq = pub.last_seq
    got_by_sub = []
    for ws in subs:
        got = []
        async with asyncio.timeout(20):
            while not got or got[-1]["seq"] < last_seq:
                got.append(await recv(ws))
        await ws.close()
        assert [m["seq"] for m in got] == list(range(1, last_seq + 1))  # each seq once, in order
        got_by_sub.append([m["data"] for m in got])
    assert got_by_sub[0] == got_by_sub[1]
    data = got_by_sub[0]
    # A publish that timed out while the leader died is in doubt: it may have been stored
    # (then its retry is stored again, right after it). Nothing acknowledged is missing.
    assert [d for k, d in enumerate(data) if k == 0 or data[k - 1] != d] == list(range(80))
    assert len(data) - 80 <= pub.refused


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

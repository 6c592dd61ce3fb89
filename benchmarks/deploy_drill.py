"""The rolling-deploy drill: restart every instance under load, count what was lost or doubled.

Theory of operation
===================

Three (``--instances``) real ``edgeproxy run`` processes share the real Redis
backplane (a prefix of their own per run) and stand behind `Balancer`, a small
TCP load balancer of the drill's own on loopback.  It balances round robin over
the instances whose ``/readyz`` answered 200 at its last poll (every 100 ms) and
leaves established connections alone when an instance turns 503, as kube-proxy
and cloud balancers do; it counts, per instance, the connections it opened and
when (the reconnect rate each instance saw) and those still open.

Through it run:

* ``--clients`` `edgeproxy.client.HubClient` subscribers, client ``i`` on
  channel ``i % channels``, fed by a publisher posting ``--rate`` publications a
  second to ``POST /v1/publish`` of a ready instance (round robin);
* ``--sessions`` `edgeproxy.resume_client.ResumableWebSocket` sessions on a
  proxied route to a backend (`BACKEND`, its own process) that numbers the
  messages it sends on each of its connections, ``--stream-rate`` a second.

The load generator is spread over processes, so that at the full size it is
not the bottleneck: ``--workers`` client processes each run a share of the
subscribers and sessions and send back what they received (a JSON file at the
end; a status line every 0.1 s says how many of their clients are out), the
publisher runs in its own process (following the ready instances as the
coordinator tells it), and the coordinator runs the balancer and the roll.
Every one of them measures its own health: the lag of its event loop, and the
publisher its achieved rate against the asked one.  A run in which the
generator fell behind (`SATURATED_P99_LAG`, `SATURATED_MAX_LAG`,
`SATURATED_RATE_SHARE`) says "generator saturated" and exits 2: its failures
are then the generator's, not evidence against the proxy.  The report also
gives the CPU the generator and the instances used, in cores, and the load
average at the start and the end.

The roll replaces the instances one after another as a Kubernetes Deployment
with ``maxSurge: 1, maxUnavailable: 0`` does: a new process starts and becomes
ready (the balancer adds it), then the old one gets SIGTERM: ``/readyz`` 503 for
``readiness_grace`` (the balancer drops it), listeners closed, close frames by
``[shutdown] drain_policy``, exit.  The kill variant (``--kill``) sends SIGKILL
to one instance instead, and starts its replacement.

What is checked (`Report.failures`; the test asserts it is empty):

* every subscriber got every acknowledged publication of its channel exactly
  once, in order, with the data that was published under that seq; a
  publication whose call failed (the instance died under it) counts as unknown,
  and appears at most once and in its place if it went out;
* every backend connection's messages reached the resumable client exactly once
  and in order with no gap; what a connection sent that never arrived (the
  tail cut by a drain or a kill) is counted as lost, and a graceful roll must
  lose none;
* every client is connected again at the end;
* after a kill: the killed instance's connections leave the presence registry
  (``POST /v1/send`` to them answers 404) within a heartbeat interval and a half.

Run it (figures in ``benchmarks/RESULTS.md``)::

    python benchmarks/deploy_drill.py                        # paced drain (the default)
    python benchmarks/deploy_drill.py --drain-policy immediate
    python benchmarks/deploy_drill.py --kill
    python benchmarks/deploy_drill.py --markdown benchmarks/RESULTS.md   # appends the table
    python benchmarks/deploy_drill.py --small --workdir /tmp/drill      # the test's size; keeps the logs

``tests/test_deploy_drill.py`` runs the same code at a small size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeproxy.client import HubClient, hub_backoff  # noqa: E402
from edgeproxy.resume_client import ResumableWebSocket  # noqa: E402

API_KEY = "deploy-drill-api-key-0123456789"
RESUME_SECRET = "deploy-drill-resume-secret-0123456789"
#: the cap on open files per process on these machines
NOFILE_CAP = 20000


@dataclasses.dataclass(frozen=True)
class Size:
    """How big the drill is and how its instances are configured."""

    instances: int = 3
    clients: int = 1000
    channels: int = 20
    rate: float = 200.0
    sessions: int = 500
    #: messages per second the backend sends on each resumable session
    stream_rate: float = 1.0
    readiness_grace: float = 2.0
    drain_timeout: float = 10.0
    drain_policy: str = "paced"
    #: each instance's [limits] connection_rate (and burst): its admission limit
    connection_rate: int = 400
    #: seconds of steady load before the roll and after it
    settle: float = 3.0
    heartbeat: float = 1.0
    #: seconds the whole drill may take
    budget: float = 240.0
    #: processes the subscribers and sessions are spread over (the publisher has one of its own)
    workers: int = 4

    def toml(self, port: int, admin_port: int, backend: int, redis_url: str, prefix: str, name: str) -> str:
        return f"""
[[listeners]]
bind = "127.0.0.1:{port}"
backlog = 4096
[[upstreams]]
name = "stream"
servers = ["127.0.0.1:{backend}"]
[[routes]]
path_prefix = "/stream"
upstream = "stream"
resume = true
[websocket]
resume_secret = "{RESUME_SECRET}"
ping_interval = 0
[limits]
connection_rate = {self.connection_rate}
connection_burst = {self.connection_rate}
[shutdown]
readiness_grace = {self.readiness_grace}
drain_timeout = {self.drain_timeout}
drain_policy = "{self.drain_policy}"
close_code = 1012
[admin]
bind = "127.0.0.1:{admin_port}"
api_key = "{API_KEY}"
[logging]
access_log = false
[[hubs]]
path = "/hub"
history_size = 5000
history_ttl = 600
ping_interval = 5
[backplane]
kind = "redis"
url = "{redis_url}"
prefix = "{prefix}"
instance_id = "{name}"
heartbeat_interval = {self.heartbeat}
timeout = 2.0
"""


SMALL = Size(instances=3, clients=60, channels=5, rate=50.0, sessions=30, stream_rate=4.0, readiness_grace=0.4,
             drain_timeout=1.6, connection_rate=400, settle=1.0, heartbeat=0.5, budget=60.0, workers=2)

#: the stream backend: numbers what it sends on each connection; GET /stats gives
#: {"sent": {conn id: messages sent}, "lag": its event loop's worst lag in seconds, "cpu": its CPU seconds};
#: GET /stop stops every stream from sending (so the last messages can arrive before the count is taken)
BACKEND = r"""
import asyncio, itertools, json, sys, time
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed
port, rate = int(sys.argv[1]), float(sys.argv[2])
ids = itertools.count(1)
sent = {}
stopped = False
worst_lag = 0.0
def http(conn, request):
    global stopped
    if request.path == "/stats":
        return conn.respond(200, json.dumps({"sent": sent, "lag": worst_lag, "cpu": time.process_time()}))
    if request.path == "/stop":
        stopped = True
        return conn.respond(200, "stopped")
async def stream(ws):
    cid = next(ids)
    sent[cid] = 0
    n = 0
    try:
        while True:
            if stopped:
                await asyncio.sleep(1 / rate)
                continue
            await ws.send(json.dumps({"c": cid, "n": n + 1}))
            n += 1
            sent[cid] = n
            await asyncio.sleep(1 / rate)
    except ConnectionClosed:
        pass
async def lag():
    global worst_lag
    while True:
        t = time.monotonic()
        await asyncio.sleep(0.05)
        worst_lag = max(worst_lag, time.monotonic() - t - 0.05)
async def main():
    async with serve(stream, "127.0.0.1", port, process_request=http, ping_interval=None, backlog=4096):
        task = asyncio.get_running_loop().create_task(lag())
        print("ready", flush=True)
        await asyncio.Future()
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, NOFILE_CAP)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# --------------------------------------------------------------------------- #
# The instances and the backend
# --------------------------------------------------------------------------- #


class Instance:
    """One ``edgeproxy run`` process; its log is ``<name>.log`` in the run's directory."""

    def __init__(self, workdir: Path, name: str, size: Size, backend: int, redis_url: str, prefix: str):
        self.name = name
        self.port, self.admin_port = free_port(), free_port()
        self.config = workdir / f"{name}.toml"
        self.config.write_text(size.toml(self.port, self.admin_port, backend, redis_url, prefix, name))
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    async def start(self, http: aiohttp.ClientSession, timeout: float = 40.0) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgeproxy", "run", "--config", str(self.config)],
                                         cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=raise_nofile)
        deadline = time.monotonic() + timeout
        while (state := await self.readyz(http))[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not become ready in {timeout:g} s (/readyz: {state}):\n"
                                   f"{self.log.read_text()[-2000:]}")
            await asyncio.sleep(0.05)
        self.started_at = time.monotonic()

    async def readyz(self, http: aiohttp.ClientSession) -> tuple[int, str]:
        try:
            async with http.get(f"http://127.0.0.1:{self.admin_port}/readyz",
                                timeout=aiohttp.ClientTimeout(total=1.0)) as r:
                return r.status, (await r.text()).strip()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return 0, "unreachable"

    async def metrics(self, http: aiohttp.ClientSession) -> str:
        async with http.get(f"http://127.0.0.1:{self.admin_port}/metrics") as r:
            return await r.text()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.proc.poll()

    def close(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait()


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    prefix = name + (f"{{{labels}}}" if labels else "")
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def metric_sum(text: str, name: str) -> float:
    """The sum of every sample of `name`, whatever its labels."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


# --------------------------------------------------------------------------- #
# The load balancer
# --------------------------------------------------------------------------- #


class _Side(asyncio.Protocol):
    """One half of a balanced connection: what it reads goes to the other half."""

    def __init__(self, pipe: _Pipe, client: bool):
        self.pipe = pipe
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.early: list[bytes] = []
        self.got_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = self.peer
        if not self.client and peer is not None:  # what the client sent while we connected, in order
            for data in peer.early:
                transport.write(data)
            peer.early.clear()
            if peer.got_eof:
                transport.write_eof()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(data)
        elif not peer.transport.is_closing():
            peer.transport.write(data)

    def eof_received(self) -> bool:
        """A half-close is passed on; once both directions are closed, so is the pair."""
        self.got_eof = True
        peer = self.peer
        if peer is None or peer.transport is None or peer.got_eof:
            return False  # our transport closes, and connection_lost closes the peer
        if not peer.transport.is_closing():
            peer.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            # A reset (the instance was killed) is passed on as a reset, a close as a close.
            peer.transport.abort() if exc is not None else peer.transport.close()
        if not self.client:
            self.pipe.ended()


class _Pipe:
    def __init__(self, balancer: Balancer, backend: Instance):
        self.balancer = balancer
        self.backend = backend
        self.open = True

    def ended(self) -> None:
        if self.open:
            self.open = False
            self.balancer.active[self.backend.name] -= 1


class Balancer:
    """Round robin over the instances whose /readyz said 200 at the last poll."""

    def __init__(self, poll: float = 0.1):
        self.poll = poll
        self.backends: list[Instance] = []
        self.live: list[Instance] = []
        self.port = 0
        self._next = 0
        #: instance -> monotonic times of the connections made to it
        self.opened: dict[str, list[float]] = defaultdict(list)
        self.active: dict[str, int] = defaultdict(int)
        self.refused = 0
        self._server: asyncio.AbstractServer | None = None
        self._poller: asyncio.Task | None = None
        self._http: aiohttp.ClientSession | None = None
        #: called with the live instances whenever they change (the publisher process follows them)
        self.on_change = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, "127.0.0.1", 0, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]
        self._http = aiohttp.ClientSession()
        self._poller = loop.create_task(self._poll_loop())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # it may have failed: stopping anyway
                await self._poller
        if self._server is not None:
            self._server.close()
        if self._http is not None:
            await self._http.close()

    async def refresh(self) -> None:
        states = await asyncio.gather(*(b.readyz(self._http) for b in self.backends))
        live = [b for b, (status, _) in zip(self.backends, states) if status == 200]
        changed = [b.name for b in live] != [b.name for b in self.live]
        self.live = live
        if changed and self.on_change is not None:
            self.on_change(live)

    async def _poll_loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.poll)

    def _accept(self) -> _Side:
        loop = asyncio.get_running_loop()
        live = self.live
        if not live:
            self.refused += 1
            side = _Side(None, True)  # type: ignore[arg-type]
            loop.call_soon(lambda: side.transport and side.transport.abort())
            return side
        backend = live[self._next % len(live)]
        self._next += 1
        pipe = _Pipe(self, backend)
        front = _Side(pipe, True)
        back = _Side(pipe, False)
        front.peer, back.peer = back, front
        self.opened[backend.name].append(time.monotonic())
        self.active[backend.name] += 1
        loop.create_task(self._connect(pipe, front, back))
        return front

    async def _connect(self, pipe: _Pipe, front: _Side, back: _Side) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: back, "127.0.0.1", pipe.backend.port)
        except OSError:
            pipe.ended()
            self.refused += 1
            if front.transport is not None:
                front.transport.abort()
            return
        if front.transport is None or front.transport.is_closing():
            back.transport.close()

    def peak_rate(self, name: str, since: float, window: float = 1.0) -> float:
        """The most connections `name` got in any `window` seconds after `since`, per second."""
        times = [t for t in self.opened[name] if t >= since]
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while times[lo] < t - window:
                lo += 1
            best = max(best, hi - lo + 1)
        return best / window

    def rate_series(self, since: float, until: float, step: float = 0.5) -> list[int]:
        """Connections opened to all instances per `step` seconds from `since` to `until`."""
        bins = [0] * max(1, int((until - since) / step + 0.999))
        for times in self.opened.values():
            for t in times:
                if since <= t < until:
                    bins[int((t - since) / step)] += 1
        return bins


# --------------------------------------------------------------------------- #
# The load: subscribers, publisher, resumable sessions, and the generator's health
# --------------------------------------------------------------------------- #

#: a generator process whose event loop ran callbacks this late (99th percentile, worst) or a publisher
#: that achieved less than this share of the asked rate is saturated: the drill's figures then measure it
SATURATED_P99_LAG = 0.25
SATURATED_MAX_LAG = 1.0
SATURATED_RATE_SHARE = 0.9


class LagMeter:
    """How late this process's event loop wakes a sleeper: the load generator's own health."""

    def __init__(self, step: float = 0.05):
        self.step = step
        self.samples: list[float] = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:  # ends with stop(); at most one sample per step for the run's budget
            t = time.monotonic()
            await asyncio.sleep(self.step)
            self.samples.append(max(0.0, time.monotonic() - t - self.step))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.samples) or [0.0]
        return {"p99": round(ordered[int(0.99 * (len(ordered) - 1))], 3), "max": round(ordered[-1], 3)}


class Subscriber:
    def __init__(self, url: str, channel: str):
        self.channel = channel
        # the proxy's hint says 1-5 s; a real client waits about that long
        self.client = HubClient(url, backoff=hub_backoff(first_max=1.0, max_delay=5.0, min_delay=0.2), open_timeout=5.0)
        self.received: list[tuple[int, str, Any]] = []
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.client.start()
        await self.client.subscribe(self.channel)
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for pub in self.client:
                self.received.append((pub.seq, pub.epoch, pub.data))

    @property
    def subscribed(self) -> bool:
        return self.client.positions.get(self.channel) is not None

    @property
    def back(self) -> bool:
        return self.client.connected.is_set()

    def record(self) -> dict[str, Any]:
        return {"channel": self.channel, "received": self.received, "duplicates": self.client.duplicates}

    async def close(self) -> None:
        await self.client.close()
        if self._task is not None:
            self._task.cancel()


class Session:
    """One resumable session: what each backend connection sent, as it arrived."""

    def __init__(self, url: str):
        self.ws = ResumableWebSocket(url, ping_interval=2.0, ping_timeout=4.0, connect_timeout=5.0)
        #: backend connection id -> the message numbers received, in arrival order
        self.streams: dict[int, list[int]] = defaultdict(list)
        self._task: asyncio.Task | None = None

    async def start(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:  # the first connect may be refused by admission control: try again, as a client would
            try:
                await self.ws.connect()
                break
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(self.ws.backoff.next_delay())
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                msg = orjson.loads(await self.ws.recv())
                self.streams[msg["c"]].append(msg["n"])

    @property
    def back(self) -> bool:
        return self.ws._ready.is_set() and self.ws.close_code is None

    def record(self) -> dict[str, Any]:
        return {"streams": [[cid, numbers] for cid, numbers in self.streams.items()], "resets": self.ws.resets}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 2)


class Publisher:
    """``rate`` publications a second, round robin over the ready instances' publish API.

    Calls overlap (up to `max_in_flight`), so a slow answer does not hold up the
    schedule; a schedule that still falls behind shows as an achieved rate below
    the asked one.
    """

    def __init__(self, channels: list[str], rate: float, max_in_flight: int = 64):
        self.channels = channels
        self.rate = rate
        self.max_in_flight = max_in_flight
        #: the admin ports of the ready instances, as the coordinator last said
        self.live: list[int] = []
        #: channel -> {seq: data} of the acknowledged publications
        self.acked: dict[str, dict[int, Any]] = defaultdict(dict)
        #: data of the calls whose outcome is unknown (the instance failed under them)
        self.unknown: list[Any] = []
        self.errors: list[str] = []
        self.refused = 0
        self.attempted = 0
        self.latencies: list[float] = []
        self.started = self.ended = 0.0
        self._stop = False

    async def run(self, budget: float) -> None:
        gate = asyncio.Semaphore(self.max_in_flight)
        tasks: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.max_in_flight)) as http:
            self.started = time.monotonic()
            while not self._stop and time.monotonic() - self.started < budget:
                delay = self.started + self.attempted / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await gate.acquire()
                n = self.attempted
                self.attempted += 1
                if not self.live:
                    self.refused += 1
                    gate.release()
                    continue
                task = loop.create_task(self._publish(http, self.live[n % len(self.live)],
                                                      self.channels[n % len(self.channels)], {"n": n}))
                tasks.add(task)
                task.add_done_callback(lambda t: (tasks.discard(t), gate.release()))
            self.ended = time.monotonic()
            await asyncio.gather(*tasks)

    async def _publish(self, http: aiohttp.ClientSession, port: int, channel: str, data: Any) -> None:
        began = time.monotonic()
        try:
            async with http.post(f"http://127.0.0.1:{port}/v1/publish",
                                 data=orjson.dumps({"channel": channel, "data": data}),
                                 headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=aiohttp.ClientTimeout(total=3)) as r:
                body = await r.read()
                if r.status == 200:
                    self.acked[channel][orjson.loads(body)["seq"]] = data
                elif r.status == 503:
                    self.refused += 1  # nothing was published: the answer says so
                elif len(self.errors) < 10:
                    self.errors.append(f"publish answered {r.status}: {body[:200]!r}")
        except (aiohttp.ClientError, asyncio.TimeoutError):
            self.unknown.append(data)
        self.latencies.append(time.monotonic() - began)

    def stop(self) -> None:
        self._stop = True

    def health(self) -> dict[str, float]:
        elapsed = max(1e-9, self.ended - self.started)
        ordered = sorted(self.latencies) or [0.0]
        return {"asked": self.rate, "achieved": round(self.attempted / elapsed, 1),
                "latency_p99": round(ordered[int(0.99 * (len(ordered) - 1))], 3), "latency_max": round(ordered[-1], 3)}

    def record(self) -> dict[str, Any]:
        return {"acked": [[ch, [[seq, d] for seq, d in by_seq.items()]] for ch, by_seq in self.acked.items()],
                "unknown": self.unknown, "errors": self.errors, "refused": self.refused, "health": self.health()}


# --------------------------------------------------------------------------- #
# The generator processes
# --------------------------------------------------------------------------- #
#
# A worker is this script run with ``--worker clients|publisher SPEC``.  It reads
# commands as JSON lines on stdin and answers with JSON lines on stdout; a
# clients worker also says every 0.1 s how many of its clients are out (with a
# CLOCK_MONOTONIC time stamp, the same clock in every process).  What a worker
# received goes to a JSON file at the end, named by its SPEC.


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(doc) + b"\n")
    sys.stdout.flush()


async def _commands() -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=1 << 20)
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _next_command(commands: asyncio.StreamReader, deadline: float) -> dict[str, Any] | None:
    """The next command, or None when the coordinator is gone or the budget is spent."""
    try:
        line = await asyncio.wait_for(commands.readline(), max(0.1, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        return None
    return orjson.loads(line) if line else None


async def clients_worker(spec: dict[str, Any]) -> None:
    """A share of the subscribers (one per entry of ``spec["channels"]``) and of the sessions."""
    deadline = time.monotonic() + spec["budget"]
    lag = LagMeter()
    lag.start()
    subscribers = [Subscriber(spec["hub_url"], channel) for channel in spec["channels"]]
    sessions = [Session(spec["stream_url"]) for _ in range(spec["sessions"])]
    commands = await _commands()
    status: asyncio.Task | None = None

    async def report_status() -> None:
        while True:  # cancelled at "finish"; bounded by the worker's budget
            _emit({"status": {"t": time.monotonic(), "subscribers_out": sum(not s.back for s in subscribers),
                              "sessions_out": sum(not s.back for s in sessions)}})
            await asyncio.sleep(0.1)

    try:
        await _gather_bounded([s.start() for s in subscribers] + [s.start() for s in sessions], 50)
        if await _wait(lambda: all(s.subscribed for s in subscribers), 30) is None:
            _emit({"error": f"{sum(not s.subscribed for s in subscribers)} subscriber(s) not subscribed in 30 s"})
            return
        gc.freeze()  # the clients live as long as the worker: no collection needs to walk them again
        _emit({"up": True})
        status = asyncio.get_running_loop().create_task(report_status())
        while (cmd := await _next_command(commands, deadline)) is not None:
            if cmd["cmd"] == "ids":
                _emit({"ids": [s.client.client_id for s in subscribers
                               if s.client.client_id and s.client.client_id.startswith(cmd["prefix"] + ".")]})
            elif cmd["cmd"] == "finish":
                status.cancel()
                Path(spec["out"]).write_bytes(orjson.dumps({
                    "subscribers": [s.record() for s in subscribers], "sessions": [s.record() for s in sessions],
                    "lag": lag.summary(), "cpu": time.process_time()}))
                _emit({"done": spec["out"]})
                break
    finally:
        if status is not None:
            status.cancel()
        await _gather_bounded([s.close() for s in subscribers] + [s.close() for s in sessions], 200)


async def publisher_worker(spec: dict[str, Any]) -> None:
    deadline = time.monotonic() + spec["budget"]
    lag = LagMeter()
    lag.start()
    publisher = Publisher(spec["channels"], spec["rate"])
    commands = await _commands()
    task: asyncio.Task | None = None
    _emit({"up": True})
    try:
        while (cmd := await _next_command(commands, deadline)) is not None:
            if cmd["cmd"] == "live":
                publisher.live = cmd["ports"]
            elif cmd["cmd"] == "start":
                task = asyncio.get_running_loop().create_task(publisher.run(spec["budget"]))
            elif cmd["cmd"] == "stop":
                publisher.stop()
                if task is not None:
                    await asyncio.wait_for(task, 10)
                Path(spec["out"]).write_bytes(orjson.dumps({**publisher.record(), "lag": lag.summary(),
                                                            "cpu": time.process_time()}))
                _emit({"done": spec["out"]})
                break
    finally:
        if task is not None:
            task.cancel()


class Worker:
    """The coordinator's handle on one generator process."""

    def __init__(self, role: str, spec: dict[str, Any], work: Path, name: str):
        self.role = role
        self.name = name
        self.spec = {**spec, "out": str(work / f"{name}.json")}
        self.log = work / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        #: the latest status line of a clients worker
        self.status: dict[str, Any] | None = None
        self._replies: asyncio.Queue = asyncio.Queue()
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), "--worker", self.role, json.dumps(self.spec),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log, cwd=ROOT,
                limit=1 << 20, preexec_fn=raise_nofile)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while line := await self.proc.stdout.readline():
            doc = orjson.loads(line)
            if "status" in doc:
                self.status = doc["status"]
            else:
                self._replies.put_nowait(doc)
        self._replies.put_nowait(None)

    async def reply(self, timeout: float) -> dict[str, Any]:
        doc = await asyncio.wait_for(self._replies.get(), timeout)
        if doc is None or "error" in doc:
            why = doc["error"] if doc else "exited"
            raise RuntimeError(f"{self.name}: {why}\n{self.log.read_text(errors='replace')[-2000:]}")
        return doc

    async def request(self, cmd: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        self.send(cmd)
        return await self.reply(timeout)

    def send(self, cmd: dict[str, Any]) -> None:
        if self.proc.stdin.is_closing():
            raise RuntimeError(f"{self.name} is gone:\n{self.log.read_text(errors='replace')[-2000:]}")
        self.proc.stdin.write(orjson.dumps(cmd) + b"\n")

    async def results(self, timeout: float = 30.0) -> dict[str, Any]:
        """What the worker collected: it writes the file when told to finish (or stop)."""
        done = await self.request({"cmd": "finish" if self.role == "clients" else "stop"}, timeout)
        return orjson.loads(Path(done["done"]).read_bytes())

    def all_back_since(self, t: float) -> bool:
        s = self.status
        return s is not None and s["t"] >= t and s["subscribers_out"] == 0 and s["sessions_out"] == 0

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()


def _shares(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into `parts` contiguous shares whose sizes differ by at most one."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


# --------------------------------------------------------------------------- #
# The drill
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Report:
    size: Size
    kill: bool
    publications: int = 0
    unknown_publications: int = 0
    deliveries: int = 0
    #: publications a subscriber got twice, and resumable messages that arrived twice
    doubled: int = 0
    duplicates_dropped_by_clients: int = 0
    backend_messages: int = 0
    session_messages: int = 0
    session_lost: int = 0
    session_resets: int = 0
    #: per replaced instance: seconds from its SIGTERM (or SIGKILL) until every client was back
    back_after: list[float] = dataclasses.field(default_factory=list)
    #: per surviving instance: the most connections it got in one second during the roll
    peak_rates: dict[str, float] = dataclasses.field(default_factory=dict)
    admission_refused: dict[str, float] = dataclasses.field(default_factory=dict)
    connections_after: dict[str, int] = dataclasses.field(default_factory=dict)
    connections_later: dict[str, int] = dataclasses.field(default_factory=dict)
    #: what each instance itself counts as open (edgeproxy_connections_active) when connections_later is taken
    instance_connections: dict[str, int] = dataclasses.field(default_factory=dict)
    rate_series: list[int] = dataclasses.field(default_factory=list)
    presence_fenced_after: float | None = None
    presence_checked: int = 0
    duration: float = 0.0
    failures: list[str] = dataclasses.field(default_factory=list)
    #: the load generator's own health: publish rate achieved vs asked, event loop lag per process
    generator: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: why the generator was saturated (empty: it kept up, and the checks measure the proxy)
    saturated: list[str] = dataclasses.field(default_factory=list)
    #: the machine's 1-minute load average at the start and at the end
    load_average: list[float] = dataclasses.field(default_factory=list)

    @staticmethod
    def balance(counts: dict[str, int]) -> float:
        values = list(counts.values())
        mean = sum(values) / len(values) if values else 0
        return max(values) / mean if mean else 0.0

    def as_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["size"] = dataclasses.asdict(self.size)
        doc["balance_after"] = round(self.balance(self.connections_after), 2)
        doc["balance_later"] = round(self.balance(self.connections_later), 2)
        return doc


async def _wait(predicate, timeout: float, step: float = 0.05) -> float | None:
    """Seconds until `predicate()` held, or None if it did not within `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        await asyncio.sleep(step)
    return None


async def _gather_bounded(coros, limit: int = 50) -> None:
    gate = asyncio.Semaphore(limit)

    async def one(coro):
        async with gate:
            await coro

    await asyncio.gather(*(one(c) for c in coros))


async def run_drill(size: Size, *, kill: bool = False, redis_url: str = "redis://127.0.0.1:6379/0",
                    workdir: Path | None = None, log=print) -> Report:
    """Run the drill (see the module docstring) and return its `Report`."""
    raise_nofile()
    began = time.monotonic()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # SIGTERM (timeout(1), ^C elsewhere) cleans up too
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    report = Report(size=size, kill=kill, load_average=[os.getloadavg()[0]])
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before, children_before = own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime
    generator_cpu: float | None = None
    prefix = "drill" + uuid.uuid4().hex[:10]
    channels = [f"{prefix}:ch{i}" for i in range(size.channels)]
    tmp = tempfile.TemporaryDirectory(prefix="deploy-drill-") if workdir is None else None
    work = Path(tmp.name) if tmp is not None else workdir
    backend_port = free_port()
    backend = subprocess.Popen([sys.executable, "-c", BACKEND, str(backend_port), str(size.stream_rate)],
                               stdout=subprocess.PIPE, preexec_fn=raise_nofile)
    instances: list[Instance] = []
    balancer = Balancer()
    lag = LagMeter()
    lag.start()
    clients: list[Worker] = []
    publisher = Worker("publisher", {"channels": channels, "rate": size.rate, "budget": size.budget}, work,
                       f"{prefix}-publisher")
    generation = 0
    http = aiohttp.ClientSession()

    def new_instance() -> Instance:
        nonlocal generation
        generation += 1
        return Instance(work, f"{prefix}-i{generation}", size, backend_port, redis_url, prefix)

    def all_back_since(t: float) -> bool:
        return all(w.all_back_since(t) for w in clients)

    try:
        assert backend.stdout.readline().strip() == b"ready"
        await balancer.start()
        hub_url = f"ws://127.0.0.1:{balancer.port}/hub"
        stream_url = f"ws://127.0.0.1:{balancer.port}/stream"
        sub_shares, session_shares = _shares(size.clients, size.workers), _shares(size.sessions, size.workers)
        clients = [Worker("clients", {"hub_url": hub_url, "stream_url": stream_url, "budget": size.budget,
                                      "channels": [channels[i % len(channels)] for i in sub_shares[w]],
                                      "sessions": len(session_shares[w])}, work, f"{prefix}-clients{w}")
                   for w in range(size.workers)]
        # the processes import while the instances start
        await asyncio.gather(publisher.start(), *(w.start() for w in clients))
        instances = [new_instance() for _ in range(size.instances)]
        await asyncio.gather(*(i.start(http) for i in instances))
        balancer.backends = list(instances)
        balancer.on_change = lambda live: publisher.send({"cmd": "live", "ports": [i.admin_port for i in live]})
        await balancer.refresh()
        await publisher.reply(30)
        await asyncio.gather(*(w.reply(90) for w in clients))
        log(f"drill {prefix}: {len(instances)} instances, {size.clients} subscribers, {size.sessions} sessions up "
            f"in {size.workers} processes after {time.monotonic() - began:.1f}s; balancer on :{balancer.port}")
        publisher.send({"cmd": "start"})
        await asyncio.sleep(size.settle)

        roll_start = time.monotonic()
        replaced = instances[:1] if kill else list(instances)
        for old in replaced:
            fresh = new_instance()
            await fresh.start(http)
            instances.append(fresh)
            balancer.backends.append(fresh)
            await balancer.refresh()
            if kill:
                ids = [cid for w in clients for cid in (await w.request({"cmd": "ids", "prefix": old.name}))["ids"]]
                old.signal(signal.SIGKILL)
            else:
                old.signal(signal.SIGTERM)
            t0 = time.monotonic()
            if kill:
                await old.wait_exit(5)
                report.presence_checked = len(ids)
                report.presence_fenced_after = await _presence_fenced(fresh, ids, 3 * size.heartbeat + 2)
            else:
                code = await old.wait_exit(size.readiness_grace + size.drain_timeout + 10)
                if code != 0:
                    report.failures.append(f"{old.name} exited with {code} after SIGTERM (expected 0)")
            balancer.backends.remove(old)
            instances.remove(old)
            # every connection to the old instance has ended; then a status taken since says every client is back
            waited = await _wait(lambda: balancer.active[old.name] == 0, 20)
            t_gone = time.monotonic()
            if waited is not None:
                waited = await _wait(lambda: all_back_since(t_gone), 20)
            if waited is None:
                out = [(w.status or {}) for w in clients]
                report.failures.append(
                    f"not every client was back within 20 s after {old.name} went away: "
                    f"{sum(s.get('subscribers_out', 0) for s in out)} subscriber(s), "
                    f"{sum(s.get('sessions_out', 0) for s in out)} session(s) out, "
                    f"{balancer.active[old.name]} connection(s) still counted on it")
                report.back_after.append(float("nan"))
            else:
                report.back_after.append(round(max(w.status["t"] for w in clients) - t0, 2))
            log(f"  {old.name} {'killed' if kill else 'drained'}; all back after {report.back_after[-1]}s"
                + (f" ({report.failures[-1]})" if waited is None else ""))
        roll_end = time.monotonic()
        for name in balancer.opened:  # every instance that took reconnects, replaced since or not
            report.peak_rates[name] = balancer.peak_rate(name, roll_start)
        report.rate_series = balancer.rate_series(roll_start, roll_end)
        report.connections_after = {i.name: balancer.active[i.name] for i in instances}
        await asyncio.sleep(size.settle)
        report.connections_later = {i.name: balancer.active[i.name] for i in instances}
        for inst in instances:
            text = await inst.metrics(http)
            report.admission_refused[inst.name] = sum(
                metric_value(text, "edgeproxy_limits_total", f'limit="{limit}"')
                for limit in ("rate", "max_connections"))
            report.instance_connections[inst.name] = int(metric_sum(text, "edgeproxy_connections_active"))
        t_end = time.monotonic()
        if await _wait(lambda: all_back_since(t_end), 2) is None:
            report.failures.append("not every client is connected at the end")
        lag.stop()  # what follows parses the results: that stalls the loop, and measures nothing
        balancer.on_change = None  # the publisher process ends with its results
        published = await publisher.results()
        # Stop the streams, then let what is in flight arrive before comparing counts: a count
        # taken while they run would call the messages still on their way lost.
        async with http.get(f"http://127.0.0.1:{backend_port}/stop") as r:
            assert r.status == 200
        await asyncio.sleep(0.5)  # the last publications and stream messages reach their clients
        async with http.get(f"http://127.0.0.1:{backend_port}/stats") as r:
            stats = orjson.loads(await r.read())
        backend_sent = {int(k): v for k, v in stats["sent"].items()}
        received = await asyncio.gather(*(w.results() for w in clients))
        _assess_generator(report, published, received, coordinator=lag.summary(), backend_lag=stats["lag"])
        generator_cpu = stats["cpu"] + published["cpu"] + sum(r["cpu"] for r in received)
        report.failures.extend(published["errors"])
        acked = {ch: {seq: data for seq, data in pairs} for ch, pairs in published["acked"]}
        _check_publications(report, acked, published["unknown"], [s for r in received for s in r["subscribers"]])
        _check_sessions(report, [s for r in received for s in r["sessions"]], backend_sent, lossless=not kill)
        if kill and report.presence_fenced_after is None:
            report.failures.append("presence of the killed instance's connections was not fenced in time")
    finally:
        # the processes first, synchronously: whatever failed above, none of them outlives the drill
        balancer.on_change = None
        for inst in instances:
            inst.close()
        backend.kill()
        backend.wait()
        lag.stop()
        await asyncio.gather(publisher.close(), *(w.close() for w in clients))
        await balancer.stop()
        await http.close()
        await _clean_redis(redis_url, prefix)
        if tmp is not None:
            tmp.cleanup()
    report.duration = round(time.monotonic() - began, 1)
    report.load_average.append(os.getloadavg()[0])
    if generator_cpu is not None:  # every child has been reaped: their CPU time is in RUSAGE_CHILDREN
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = resource.getrusage(resource.RUSAGE_SELF)
        report.generator["cores_used"] = {
            "generator": round((own.ru_utime + own.ru_stime - cpu_before + generator_cpu) / report.duration, 2),
            "edgeproxy instances": round((children.ru_utime + children.ru_stime - children_before - generator_cpu)
                                         / report.duration, 2)}
    return report


def _assess_generator(report: Report, published: dict[str, Any], received: list[dict[str, Any]], *,
                      coordinator: dict[str, float], backend_lag: float) -> None:
    """Fill `Report.generator` and say in `Report.saturated` whether the load generator kept up."""
    health = published["health"]
    lags = {"coordinator (balancer)": coordinator, "publisher": published["lag"],
            **{f"clients{i}": r["lag"] for i, r in enumerate(received)}}
    report.generator = {"publish": health, "loop_lag": lags, "backend_lag_max": round(backend_lag, 3)}
    if health["achieved"] < SATURATED_RATE_SHARE * health["asked"]:
        report.saturated.append(f"published {health['achieved']:g}/s of {health['asked']:g}/s asked")
    for name, lag in lags.items():
        if lag["p99"] > SATURATED_P99_LAG or lag["max"] > SATURATED_MAX_LAG:
            report.saturated.append(f"{name} event loop lag p99 {lag['p99']:g}s, max {lag['max']:g}s")
    if backend_lag > SATURATED_MAX_LAG:
        report.saturated.append(f"stream backend event loop lag max {backend_lag:.2f}s")


async def _presence_fenced(live: Instance, ids: list[str], timeout: float) -> float | None:
    """Seconds until ``POST /v1/send`` (on `live`) answers 404 for every one of `ids`."""
    start = time.monotonic()
    pending = list(ids)
    async def fenced(http: aiohttp.ClientSession, cid: str) -> bool:
        async with http.post(f"http://127.0.0.1:{live.admin_port}/v1/send",
                             data=orjson.dumps({"client": cid, "data": "ping"}),
                             headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            return r.status == 404

    async with aiohttp.ClientSession() as http:
        while pending and time.monotonic() - start < timeout:
            # all at once: a pass takes one round trip, so the time measured is the fencing's, not the probing's
            answers = await asyncio.gather(*(fenced(http, cid) for cid in pending))
            pending = [cid for cid, done in zip(pending, answers) if not done]
            if pending:
                await asyncio.sleep(0.05)
    return None if pending else round(time.monotonic() - start, 2)


def _check_publications(report: Report, acked: dict[str, dict[int, Any]], unknown_data: list[Any],
                        subscribers: list[dict[str, Any]]) -> None:
    """`subscribers`: `Subscriber.record()` of every subscriber, from every worker."""
    report.publications = sum(len(v) for v in acked.values())
    report.unknown_publications = len(unknown_data)
    unknown = {orjson.dumps(d) for d in unknown_data}
    bad = []
    for sub in subscribers:
        channel_acked = acked.get(sub["channel"], {})
        seqs = [seq for seq, _, _ in sub["received"]]
        report.deliveries += len(seqs)
        report.duplicates_dropped_by_clients += sub["duplicates"]
        epochs = {epoch for _, epoch, _ in sub["received"]}
        problems = []
        if len(epochs) > 1:
            problems.append(f"{len(epochs)} epochs")
        if len(set(seqs)) != len(seqs):
            report.doubled += len(seqs) - len(set(seqs))
            problems.append(f"{len(seqs) - len(set(seqs))} duplicate(s)")
        if seqs != sorted(seqs):
            problems.append("out of order")
        missing = sorted(set(channel_acked) - set(seqs))
        if missing:
            problems.append(f"{len(missing)} acknowledged publication(s) missing (first seq {missing[0]})")
        for seq, _, data in sub["received"]:
            if seq in channel_acked:
                if channel_acked[seq] != data:
                    problems.append(f"seq {seq} carries {data!r}, published {channel_acked[seq]!r}")
                    break
            elif orjson.dumps(data) not in unknown:
                problems.append(f"seq {seq} carries {data!r}, which was never published")
                break
        if problems:
            bad.append(f"subscriber of {sub['channel']}: " + "; ".join(problems))
    if bad:
        report.failures.append(f"{len(bad)} subscriber(s) wrong, e.g. " + " | ".join(bad[:3]))


def _check_sessions(report: Report, sessions: list[dict[str, Any]], backend_sent: dict[int, int], *,
                    lossless: bool) -> None:
    """`sessions`: `Session.record()` of every session, from every worker."""
    bad = []
    report.backend_messages = sum(backend_sent.values())
    heard = set()
    for s in sessions:
        report.session_resets += s["resets"]
        for cid, numbers in s["streams"]:
            heard.add(cid)
            report.session_messages += len(numbers)
            if numbers != list(range(1, len(numbers) + 1)):
                report.doubled += len(numbers) - len(set(numbers))
                bad.append(f"connection {cid}: not 1..{len(numbers)} once and in order ({numbers[:8]}...)")
                continue
            lost = backend_sent.get(cid, 0) - len(numbers)
            if lost < 0:
                bad.append(f"connection {cid}: {len(numbers)} received, backend sent {backend_sent.get(cid)}")
            report.session_lost += max(0, lost)
    # backend connections that no client ever heard from (cut before their first message arrived)
    report.session_lost += sum(n for cid, n in backend_sent.items() if cid not in heard)
    if bad:
        report.failures.append(f"{len(bad)} resumable stream(s) wrong, e.g. " + " | ".join(bad[:3]))
    if lossless and report.session_lost:
        report.failures.append(f"{report.session_lost} resumable-session message(s) lost in a graceful roll")


async def _clean_redis(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i:i + 500])
    except Exception:  # cleaning up is best effort: the prefix is unique per run
        pass
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- #
# Output
# --------------------------------------------------------------------------- #


def verdict(report: Report) -> str:
    """OK, FAILED, or "generator saturated": then the checks measured the load generator, not the proxy."""
    if report.saturated:
        return "generator saturated"
    return "OK" if not report.failures else "FAILED"


def summary(report: Report) -> str:
    s = report.size
    kind = "SIGKILL of one instance" if report.kill else f"rolling restart, drain_policy = {s.drain_policy}"
    gen = report.generator
    lines = [
        f"deploy drill: {kind}",
        f"  {s.instances} instances, {s.clients} subscribers on {s.channels} channels, {s.rate:g} pub/s, "
        f"{s.sessions} resumable sessions at {s.stream_rate:g} msg/s in {s.workers} client processes; "
        f"grace {s.readiness_grace:g}s, drain {s.drain_timeout:g}s, admission {s.connection_rate}/s per instance",
        f"  publications acknowledged {report.publications}, unknown {report.unknown_publications}; "
        f"deliveries {report.deliveries}, doubled {report.doubled} "
        f"(duplicates dropped by clients {report.duplicates_dropped_by_clients})",
        f"  resumable: backend sent {report.backend_messages}, received {report.session_messages}, "
        f"lost {report.session_lost}, sessions reset {report.session_resets}",
        f"  all clients back after {report.back_after} s",
        f"  peak reconnects/s per instance {report.peak_rates} (admission {s.connection_rate}/s; "
        f"refused by admission {report.admission_refused})",
        f"  connections after the roll {report.connections_after} (max/mean {Report.balance(report.connections_after):.2f}), "
        f"{s.settle:g}s later {report.connections_later} (max/mean {Report.balance(report.connections_later):.2f}; "
        f"the instances count {report.instance_connections})",
        f"  connections opened per 0.5 s during the roll: {report.rate_series}",
    ]
    if report.kill:
        lines.append(f"  presence of {report.presence_checked} killed connections fenced after "
                     f"{report.presence_fenced_after} s (heartbeat {s.heartbeat:g}s)")
    if gen:
        lines.append(f"  generator: published {gen['publish']['achieved']:g}/s of {gen['publish']['asked']:g}/s "
                     f"(publish latency p99 {gen['publish']['latency_p99']:g}s, max {gen['publish']['latency_max']:g}s); "
                     f"event loop lag p99/max " + ", ".join(f"{name} {lag['p99']:g}/{lag['max']:g}s"
                                                             for name, lag in gen["loop_lag"].items())
                     + f"; backend max {gen['backend_lag_max']:g}s")
        if "cores_used" in gen:
            lines.append(f"  cores used over the run: {gen['cores_used']} (of {os.cpu_count()})")
    lines.append(f"  load average {report.load_average}; took {report.duration}s")
    if report.saturated:
        lines.append("  GENERATOR SATURATED (" + "; ".join(report.saturated) + "): the checks below measured the "
                     "load generator, not the proxy")
    lines.append(f"  {verdict(report)}" + (": " + "; ".join(report.failures) if report.failures else ""))
    return "\n".join(lines)


def markdown_row(report: Report) -> str:
    s = report.size
    kind = "SIGKILL" if report.kill else s.drain_policy
    peak = max(report.peak_rates.values()) if report.peak_rates else 0
    back = max(report.back_after) if report.back_after else float("nan")
    gen = report.generator
    worst_lag = max((lag["max"] for lag in gen["loop_lag"].values()), default=0.0) if gen else float("nan")
    achieved = gen["publish"]["achieved"] if gen else float("nan")
    return (f"| {kind} | {report.publications} / {report.unknown_publications} | {report.deliveries} | "
            f"{report.doubled} | {report.session_messages} / {report.session_lost} | {report.session_resets} | "
            f"{back:.1f} | {peak:.0f} / {s.connection_rate} | {sum(report.admission_refused.values()):.0f} | "
            f"{Report.balance(report.connections_after):.2f} / {Report.balance(report.connections_later):.2f} | "
            f"{'%.2f' % report.presence_fenced_after if report.presence_fenced_after is not None else '-'} | "
            f"{achieved:g} / {s.rate:g} | {worst_lag:.2f} | {report.load_average[0]:.1f} | {verdict(report)} |")


MARKDOWN_HEAD = ("| run | publications acked / unknown | deliveries | doubled | resumable msgs received / lost | "
                 "sessions reset | all back after (s, worst) | peak reconnects/s / admission | refused | "
                 "conns max/mean after / settled | presence fenced (s) | published/s achieved / asked | "
                 "generator worst loop lag (s) | load avg | checks |\n"
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":  # a generator process of a drill (see `Worker`)
        role, spec = sys.argv[2], json.loads(sys.argv[3])
        raise_nofile()
        _run(clients_worker(spec) if role == "clients" else publisher_worker(spec))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    full = Size()
    parser.add_argument("--instances", type=int, default=full.instances)
    parser.add_argument("--clients", type=int, default=full.clients)
    parser.add_argument("--channels", type=int, default=full.channels)
    parser.add_argument("--rate", type=float, default=full.rate, help="publications per second")
    parser.add_argument("--sessions", type=int, default=full.sessions)
    parser.add_argument("--stream-rate", type=float, default=full.stream_rate)
    parser.add_argument("--readiness-grace", type=float, default=full.readiness_grace)
    parser.add_argument("--drain-timeout", type=float, default=full.drain_timeout)
    parser.add_argument("--drain-policy", choices=("paced", "immediate"), default=full.drain_policy)
    parser.add_argument("--connection-rate", type=int, default=full.connection_rate)
    parser.add_argument("--settle", type=float, default=full.settle)
    parser.add_argument("--workers", type=int, default=full.workers,
                        help="processes the subscribers and sessions are spread over")
    parser.add_argument("--kill", action="store_true", help="SIGKILL one instance instead of a rolling restart")
    parser.add_argument("--small", action="store_true", help="the test's size")
    parser.add_argument("--redis", default=os.environ.get("EDGEPROXY_TEST_REDIS", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--workdir", type=Path, help="keep the configs and logs of the instances and workers here")
    parser.add_argument("--json", help="write the report as JSON to this file")
    parser.add_argument("--markdown", help="append the report as a table row to this file")
    args = parser.parse_args()
    if args.small:
        size = dataclasses.replace(SMALL, drain_policy=args.drain_policy)
    else:
        size = Size(instances=args.instances, clients=args.clients, channels=args.channels, rate=args.rate,
                    sessions=args.sessions, stream_rate=args.stream_rate, readiness_grace=args.readiness_grace,
                    drain_timeout=args.drain_timeout, drain_policy=args.drain_policy,
                    connection_rate=args.connection_rate, settle=args.settle, workers=args.workers)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    report = _run(asyncio.wait_for(run_drill(size, kill=args.kill, redis_url=args.redis,
                                                    workdir=args.workdir), size.budget))
    print(summary(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    if args.markdown:
        with open(args.markdown, "a") as out:
            out.write(markdown_row(report) + "\n")
    if report.saturated:
        return 2
    return 0 if not report.failures else 1


def _run(coro):
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    sys.exit(main())

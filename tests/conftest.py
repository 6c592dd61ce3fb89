"""Shared fixtures.

``impl`` runs a test once per implementation: "pure" (edgeproxy.core.frames, plus
write_many from edgeproxy.core.fanout) and "compiled" (edgeproxy._speedups).
"compiled" is skipped when the extension is not built, unless ``EDGEPROXY_REQUIRE_EXT=1``,
which turns the skip into a failure.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import SimpleNamespace

import pytest

FRAME_API = ("apply_mask", "parse_header", "encode_header", "FrameScanner")
FANOUT_API = ("write_many",)
RELAY_API = ("RelayCore", "RelayEndpoint", "RelayEngine")


def env_flag(name: str) -> bool:
    """Same truthiness as edgeproxy.core._accel.env_flag (1/true/yes/on)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def import_compiled(*, module_level: bool = False):
    """edgeproxy._speedups; skips when it is not built, fails instead under EDGEPROXY_REQUIRE_EXT=1.

    Args:
        module_level: called at a test module's top level (skips the whole module).
    """
    try:
        return importlib.import_module("edgeproxy._speedups")
    except ImportError as exc:
        msg = f"compiled edgeproxy._speedups not importable ({exc}); build it with `python3 setup.py build_ext --inplace`"
        if env_flag("EDGEPROXY_REQUIRE_EXT"):
            pytest.fail(f"EDGEPROXY_REQUIRE_EXT=1: {msg}", pytrace=False)
        pytest.skip(msg, allow_module_level=module_level)


def load_frame_impl(name: str) -> SimpleNamespace:
    """The frame primitives and write_many of one implementation; skip/fail if compiled is missing."""
    if name == "pure":
        module = importlib.import_module("edgeproxy.core.frames")
        fanout = importlib.import_module("edgeproxy.core.fanout")
        relay = importlib.import_module("edgeproxy.core.relay")
    else:
        module = fanout = relay = import_compiled()
    return SimpleNamespace(
        name=name,
        module=module,
        **{attr: getattr(module, attr) for attr in FRAME_API},
        **{attr: getattr(fanout, attr) for attr in FANOUT_API},
        **{attr: getattr(relay, attr) for attr in RELAY_API},
    )


@pytest.fixture(params=["pure", "compiled"])
def impl(request) -> SimpleNamespace:
    """Namespace with the frame primitives, write_many, RelayCore and RelayEndpoint (+ name, module)."""
    return load_frame_impl(request.param)


def skip_or_fail(msg: str, flag: str) -> None:
    """Skip the test with ``msg``, or fail it when the environment variable ``flag`` is set."""
    if env_flag(flag):
        pytest.fail(f"{flag}={os.environ[flag]}: {msg}", pytrace=False)
    pytest.skip(msg)


@pytest.fixture
def external_tool():
    """Factory: ``external_tool(command, debian_package)`` -> path of a system tool.

    Without the tool the test is skipped with the install command, except under
    ``CI=true``, where a missing tool is a failure (`.ci/run` installs it).
    """

    def find(command: str, package: str) -> str:
        path = shutil.which(command)
        if path is None:
            skip_or_fail(f"{command} is not installed (Debian: apt-get install -y {package})", "CI")
        return path

    return find


# -- backplane services (Redis, NATS) ---------------------------------------------------

REDIS_URL = os.environ.get("EDGEPROXY_TEST_REDIS", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("EDGEPROXY_TEST_NATS", "nats://127.0.0.1:4222")


def _answers(url: str) -> bool:
    """True when something accepts TCP connections at the URL's host and port."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=1.0):
            return True
    except OSError:
        return False


def require_service(kind: str) -> str:
    """The URL of the shared Redis or NATS server; skip the test without it, fail under
    ``EDGEPROXY_REQUIRE_SERVICES=1`` (set by ``.ci/run``)."""
    url = {"redis": REDIS_URL, "nats": NATS_URL}[kind]
    if not _answers(url):
        skip_or_fail(f"{kind} is not answering at {url} (start it, or point EDGEPROXY_TEST_{kind.upper()} at one; "
                     f"Debian packages redis-server / nats-server)", "EDGEPROXY_REQUIRE_SERVICES")
    return url


def require_binary(command: str, package: str) -> str:
    """A server binary for kill/restart tests: skip without it, fail under EDGEPROXY_REQUIRE_SERVICES=1."""
    path = shutil.which(command) or next(
        (p for p in (f"/usr/sbin/{command}", f"/usr/bin/{command}") if os.access(p, os.X_OK)), None)
    if path is None:
        skip_or_fail(f"{command} is not installed (Debian: apt-get install -y {package})", "EDGEPROXY_REQUIRE_SERVICES")
    return path


class ServerProcess:
    """A private redis-server or nats-server on a free port, to kill and restart in a test."""

    def __init__(self, kind: str, tmpdir: str):
        import socket

        self.kind = kind
        self.tmpdir = tmpdir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = None
        self.binary = require_binary("redis-server" if kind == "redis" else "nats-server",
                                     "redis-server" if kind == "redis" else "nats-server")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0" if self.kind == "redis" else f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        import subprocess
        import time

        if self.kind == "redis":
            # keeps everything in memory only: a restart loses all state (a new epoch everywhere)
            argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", self.tmpdir]
        else:
            argv = [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.tmpdir]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _answers(self.url):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server on port {self.port} did not start")
            time.sleep(0.02)
        if self.kind == "nats":
            time.sleep(0.2)  # JetStream comes up just after the port opens

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


@pytest.fixture
def server_process(tmp_path):
    """Factory: ``server_process("redis"|"nats")`` -> a started `ServerProcess`, killed after the test."""
    started = []

    def start(kind: str) -> ServerProcess:
        d = tmp_path / f"{kind}-{len(started)}"
        d.mkdir()
        server = ServerProcess(kind, str(d))
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class NatsCluster:
    """A private NATS cluster on loopback: ``n`` nats-server processes with JetStream,
    routes between them (``--cluster``/``--routes``), each its own store under ``tmpdir``;
    ports are chosen free at start.  ``kill(i)`` SIGKILLs one node, ``start(i)`` brings
    it back on the same ports and store."""

    def __init__(self, tmpdir: str, n: int = 3):
        self.binary = require_binary("nats-server", "nats-server")
        self.tmpdir = tmpdir
        self.name = "edgeproxy-test"
        ports = _free_ports(3 * n)
        self.client_ports, self.route_ports, self.monitor_ports = ports[:n], ports[n:2 * n], ports[2 * n:]
        self.procs: list = [None] * n

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(f"nats://127.0.0.1:{port}" for port in self.client_ports)

    @property
    def url(self) -> str:
        return ",".join(self.urls)

    def server_name(self, i: int) -> str:
        return f"n{i}"

    def start(self, i: int | None = None) -> None:
        """Start node ``i`` (all nodes when None), then wait until JetStream has a meta leader."""
        import subprocess

        for j in range(len(self.procs)) if i is None else [i]:
            store = os.path.join(self.tmpdir, self.server_name(j))
            os.makedirs(store, exist_ok=True)
            routes = ",".join(f"nats://127.0.0.1:{port}" for k, port in enumerate(self.route_ports) if k != j)
            argv = [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.client_ports[j]),
                    "-m", str(self.monitor_ports[j]), "-sd", store, "--server_name", self.server_name(j),
                    "--cluster_name", self.name, "--cluster", f"nats://127.0.0.1:{self.route_ports[j]}",
                    "--routes", routes]
            self.procs[j] = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                             stderr=open(os.path.join(self.tmpdir, f"n{j}.log"), "ab"))
        self.wait_ready()

    def jsz(self, i: int) -> dict:
        import json
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_ports[i]}/jsz", timeout=1.0) as r:
            return json.loads(r.read())

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Every running node answers and sees a meta leader with the whole cluster."""
        import time

        deadline = time.monotonic() + timeout
        running = [j for j, proc in enumerate(self.procs) if proc is not None]
        while True:
            try:
                if all((self.jsz(j).get("meta_cluster") or {}).get("leader") for j in running):
                    return
            except OSError:
                pass
            for j in running:
                if self.procs[j].poll() is not None:
                    raise RuntimeError(f"nats-server n{j} exited: see {self.tmpdir}/n{j}.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the NATS cluster in {self.tmpdir} has no JetStream meta leader after {timeout} s")
            time.sleep(0.05)

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        self.procs[i] = None

    def index_of(self, server_name: str) -> int:
        return int(server_name[1:])

    def stop(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory):
    """One private 3-node NATS cluster per test process, shared by the tests that only
    use it (each under its own prefix); tests that kill nodes make their own."""
    cluster = NatsCluster(str(tmp_path_factory.mktemp("nats-cluster")))
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture
def private_nats_cluster(tmp_path):
    """Factory: ``private_nats_cluster()`` -> a started `NatsCluster` of this test, stopped after."""
    made = []

    def start() -> NatsCluster:
        cluster = NatsCluster(str(tmp_path / f"nats-cluster-{len(made)}"))
        made.append(cluster)
        cluster.start()
        return cluster

    yield start
    for cluster in made:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A real 3-master, 3-replica Redis Cluster on free loopback ports (one per xdist worker),
    a `tests.redis_cluster.RedisClusterProcesses`; skipped without redis-server/redis-cli,
    failed instead under ``EDGEPROXY_REQUIRE_SERVICES=1``."""
    from tests.redis_cluster import RedisClusterProcesses

    server = require_binary("redis-server", "redis-server")
    cli = require_binary("redis-cli", "redis-tools")
    cluster = RedisClusterProcesses(server, cli, str(tmp_path_factory.mktemp("redis-cluster")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


async def cleanup_backplane(kind: str, url: str | tuple[str, ...], prefix: str) -> None:
    """Remove what a test created under ``prefix`` on a shared server (or cluster: ``url`` = seeds)."""
    if kind == "redis-cluster":
        from edgeproxy.transport.redis_cluster import cluster_client

        client = cluster_client(tuple(url), 5.0)
        try:
            for pattern in (f"{prefix}:*", f"{{{prefix}:*"):  # and the hash-tagged keys: {P:inst}, {P:admission}
                async for key in client.scan_iter(match=pattern, count=1000):
                    await client.delete(key)
        finally:
            await client.aclose()
    elif kind == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url)
        try:
            keys = [key for pattern in (f"{prefix}:*", f"{{{prefix}:*")
                    async for key in client.scan_iter(match=pattern, count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()
    elif kind == "nats":
        import nats

        nc = await nats.connect(servers=url.split(","))
        try:
            js = nc.jetstream()
            for name in await js.streams_info():  # history streams, and the presence buckets' (KV_...)
                if name.config.name.startswith((prefix + "_", f"KV_{prefix}_")):
                    await js.delete_stream(name.config.name)
        finally:
            await nc.close()


@pytest.fixture
def services():
    """``services.require(kind) -> url`` (skip or fail), ``await services.cleanup(kind, url, prefix)``."""
    return SimpleNamespace(require=require_service, cleanup=cleanup_backplane)


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A `tests.certs.CertFactory`: a CA made for this test session, and leaves on demand."""
    if shutil.which("openssl") is None:  # pragma: no cover - openssl is part of the base system here
        pytest.fail("the openssl CLI is needed to make test certificates")
    from tests.certs import CertFactory

    return CertFactory(str(tmp_path_factory.mktemp("certs")))

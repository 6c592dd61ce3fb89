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

        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            for name in await js.streams_info():
                if name.config.name.startswith(prefix + "_"):
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

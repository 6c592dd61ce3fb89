"""Real Redis Cluster and NATS cluster on loopback, for the tests and the scale-out benchmark.

`redis_cluster(dir)` starts 6 ``redis-server --cluster-enabled yes`` (3 masters, 3
replicas, ``redis-cli --cluster create``); `nats_cluster(dir)` starts 3
``nats-server -js`` with routes between them.  Ports are chosen free at run time
(the tests run in parallel), data lives under ``dir``, and every process is killed
when the context ends.  Both wait until the cluster serves (every slot covered and
``cluster_state:ok`` on every node; a JetStream meta leader elected).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, *, with_bus: int = 0) -> list[int]:
    """``n`` free ports; with ``with_bus`` also ``port + with_bus`` free (Redis's cluster bus)."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port in ports or (with_bus and (port + with_bus > 65535 or not _port_free(port + with_bus))):
            continue
        ports.append(port)
    return ports


def _binary(name: str) -> str:
    found = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed")
    return found


@dataclass
class Node:
    port: int
    proc: subprocess.Popen
    log: Path

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Cluster:
    nodes: list[Node]
    scheme: str
    extra: dict = field(default_factory=dict)

    @property
    def urls(self) -> list[str]:
        return [f"{self.scheme}://127.0.0.1:{n.port}" for n in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def _redis_cli(port: int, *args: str, timeout: float = 5.0) -> str:
    out = subprocess.run([_binary("redis-cli"), "-p", str(port), *args], capture_output=True, text=True,
                         timeout=timeout)
    return out.stdout


@contextlib.contextmanager
def redis_cluster(workdir: Path, *, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000,
                  timeout: float = 30.0):
    """A Redis Cluster of ``masters * (1 + replicas)`` nodes on loopback."""
    server = _binary("redis-server")
    workdir.mkdir(parents=True, exist_ok=True)
    ports = free_ports(masters * (1 + replicas), with_bus=10000)
    nodes = []
    try:
        for port in ports:
            d = workdir / str(port)
            d.mkdir(exist_ok=True)
            log = d / "redis.log"
            proc = subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(node_timeout_ms),
                 "--save", "", "--appendonly", "no", "--dir", str(d), "--logfile", str(log)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            nodes.append(Node(port, proc, log))
        deadline = time.monotonic() + timeout
        for node in nodes:
            while _redis_cli(node.port, "ping").strip() != "PONG":
                if time.monotonic() > deadline or not node.alive:
                    raise RuntimeError(f"redis node {node.port} did not start")
                time.sleep(0.05)
        subprocess.run([_binary("redis-cli"), "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", str(replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=timeout)
        for node in nodes:
            while "cluster_state:ok" not in _redis_cli(node.port, "cluster", "info"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis cluster not ok on {node.port}")
                time.sleep(0.1)
        # every replica attached to its master (failover needs it)
        while _redis_cli(ports[0], "cluster", "nodes").count("slave") < masters * replicas:
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster replicas did not attach")
            time.sleep(0.1)
        yield Cluster(nodes, "redis")
    finally:
        for node in nodes:
            node.kill()


def redis_master_of(cluster: Cluster, key: str) -> Node:
    """The node that serves ``key``'s slot now."""
    slot = int(_redis_cli(cluster.nodes[0].port, "cluster", "keyslot", key).strip())
    for line in _redis_cli(cluster.nodes[0].port, "cluster", "nodes").splitlines():
        parts = line.split()
        if "master" not in parts[2] or "fail" in parts[2]:
            continue
        for rng in parts[8:]:
            lo, _, hi = rng.partition("-")
            if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                port = int(parts[1].split(":")[1].split("@")[0])
                return next(n for n in cluster.nodes if n.port == port)
    raise LookupError(f"no master serves slot {slot}")


@contextlib.contextmanager
def nats_cluster(workdir: Path, *, size: int = 3, timeout: float = 30.0):
    """``size`` nats-server processes with JetStream, routed to each other, on loopback."""
    server = _binary("nats-server")
    workdir.mkdir(parents=True, exist_ok=True)
    client_ports = free_ports(size)
    route_ports = free_ports(size)
    monitor_ports = free_ports(size)
    routes = ",".join(f"nats://127.0.0.1:{p}" for p in route_ports)
    nodes = []
    try:
        for i, (port, route, monitor) in enumerate(zip(client_ports, route_ports, monitor_ports)):
            d = workdir / f"n{i}"
            d.mkdir(exist_ok=True)
            log = d / "nats.log"
            proc = subprocess.Popen(
                [server, "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor), "-js", "-sd", str(d),
                 "--server_name", f"n{i}", "--cluster_name", "edgeproxy-test",
                 "--cluster", f"nats://127.0.0.1:{route}", "--routes", routes, "-l", str(log)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            nodes.append(Node(port, proc, log))
        import urllib.request
        deadline = time.monotonic() + timeout
        for node, monitor in zip(nodes, monitor_ports):
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true",
                                                timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or not node.alive:
                    raise RuntimeError(f"nats node {node.port} did not become healthy")
                time.sleep(0.1)
        # a JetStream meta leader (streams with replicas can be made)
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{monitor_ports[0]}/jsz", timeout=2) as r:
                    import json
                    doc = json.loads(r.read())
                if doc.get("meta_cluster", {}).get("leader"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("nats cluster elected no JetStream meta leader")
            time.sleep(0.1)
        yield Cluster(nodes, "nats", {"monitor_ports": monitor_ports})
    finally:
        for node in nodes:
            node.kill()

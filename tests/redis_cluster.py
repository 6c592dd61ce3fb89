"""A real Redis Cluster for tests: 3 masters and 3 replicas of Debian's redis-server on loopback.

`RedisClusterProcesses.start` picks 6 free ports at run time, starts
``redis-server --cluster-enabled yes`` on each (in memory only, node files under
the given directory), joins them with ``redis-cli --cluster create ...
--cluster-replicas 1`` and waits for ``cluster_state:ok``.  ``cluster-node-timeout``
is 1000 ms so a killed master's replica takes over within a few seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

__all__ = ["NODE_TIMEOUT_MS", "RedisClusterProcesses"]

#: cluster-node-timeout: a master silent this long is failed over by its replica
NODE_TIMEOUT_MS = 1000


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports whose cluster bus port (+10000) is free too."""
    ports: list[int] = []
    held = []
    try:
        for _ in range(200):
            if len(ports) == n:
                break
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port + 10000 > 65535 or port in ports:
                s.close()
                continue
            try:
                with socket.socket() as bus:
                    bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                s.close()
                continue
            held.append(s)
            ports.append(port)
    finally:
        for s in held:
            s.close()
    if len(ports) < n:
        raise RuntimeError("could not find free ports for a Redis Cluster")
    return ports


class RedisClusterProcesses:
    """Six redis-server processes forming one cluster (see the module doc)."""

    def __init__(self, server: str, cli: str, directory: str):
        self.server = server
        self.cli = cli
        self.directory = directory
        self.ports = _free_ports(6)
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def urls(self) -> tuple[str, ...]:
        """Seed URLs: the first three nodes (a client finds the rest itself)."""
        return tuple(f"redis://127.0.0.1:{p}/0" for p in self.ports[:3])

    def _spawn(self, port: int) -> None:
        argv = [self.server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--save", "", "--appendonly", "no", "--dir", self.directory, "--protected-mode", "no",
                "--logfile", f"redis-{port}.log",
                # a replica syncs at once (not after the default 5 s): one that never synced cannot take over
                "--repl-diskless-sync-delay", "0"]
        self.procs[port] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cli_call(self, port: int, *args: str, timeout: float = 10.0) -> str:
        return subprocess.run([self.cli, "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True,
                              text=True, timeout=timeout, check=True).stdout

    def _wait_port(self, port: int) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline or self.procs[port].poll() is not None:
                    raise RuntimeError(f"redis-server on port {port} did not start") from None
                time.sleep(0.02)

    def start(self) -> None:
        for port in self.ports:
            self._spawn(port)
        for port in self.ports:
            self._wait_port(port)
        subprocess.run([self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, text=True,
                       timeout=60, check=True)
        self.wait_ok()

    def live_ports(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def _ready(self, port: int) -> bool:
        if "cluster_state:ok" not in self.cli_call(port, "cluster", "info"):
            return False
        replication = self.cli_call(port, "info", "replication")
        return "role:master" in replication or "master_link_status:up" in replication

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and every replica has synced with its master."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if all(self._ready(p) for p in self.live_ports()):
                    return
            except subprocess.SubprocessError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def master_of(self, key: str) -> int:
        """The port of the master that owns ``key``'s slot now."""
        live = self.live_ports()
        slot = int(self.cli_call(live[0], "cluster", "keyslot", key).strip())
        for line in self.cli_call(live[0], "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for part in fields[8:]:
                low, _, high = part.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return int(fields[1].split(":")[1].split("@")[0])
        raise RuntimeError(f"no master owns slot {slot}")

    def kill(self, port: int) -> None:
        """SIGKILL one node (no chance to tell anybody)."""
        proc = self.procs[port]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)

    def restart(self, port: int) -> None:
        """Start a killed node again: its node file makes it rejoin (as a replica, after a failover)."""
        self._spawn(port)
        self._wait_port(port)
        deadline = time.monotonic() + 30
        while "master_link_status:up" not in self.cli_call(port, "info", "replication"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {port} did not rejoin as a replica")
            time.sleep(0.1)
        self.wait_ok()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        self.procs.clear()

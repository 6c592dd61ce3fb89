"""Helpers for the tests that run edgeproxy as real processes and signal it.

A backend is a `websockets` echo server in its own process: a text message
"whoami" is answered with its port, anything else is echoed, and a plain HTTP
GET gets ``backend <tag>``.  `ProxyProcess` runs ``python -m edgeproxy run`` on
a config file it writes, with stderr in a file the test reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from test_cli import ROOT, free_port, wait_for_port

BACKEND = r"""
import asyncio, sys
from websockets.asyncio.server import serve
port, tag = int(sys.argv[1]), sys.argv[2]
def http(conn, request):
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return conn.respond(200, f"backend {tag}\n")
async def echo(ws):
    async for message in ws:
        await ws.send(str(port) if message == "whoami" else message)
async def main():
    async with serve(echo, "127.0.0.1", port, process_request=http, ping_interval=None):
        await asyncio.Future()
asyncio.run(main())
"""


def free_port_range(n: int) -> int:
    """A port p with p .. p+n-1 all free right now (for the per-worker admin ports)."""
    for _ in range(100):
        base = free_port()
        if base + n > 65536:
            continue
        probes = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                probes.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in probes:
                sock.close()
    raise AssertionError(f"no {n} consecutive free ports found")


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (these machines cap it at 20,000)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Backend:
    def __init__(self, tag: str):
        self.tag = tag
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-c", BACKEND, str(self.port), tag], preexec_fn=raise_nofile)
        wait_for_port(self.port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def config_text(upstreams: dict[str, list[Backend]], routes: dict[str, str], *, port: int, admin_port: int = 0,
                workers: int = 1, extra: str = "") -> str:
    out = [f"workers = {workers}", "[[listeners]]", f'bind = "127.0.0.1:{port}"']
    for name, servers in upstreams.items():
        addresses = ", ".join(f'"{b.address}"' for b in servers)
        out += ["[[upstreams]]", f'name = "{name}"', f"servers = [{addresses}]"]
    for prefix, upstream in routes.items():
        out += ["[[routes]]", f'path_prefix = "{prefix}"', f'upstream = "{upstream}"']
    out += ["[admin]", f'bind = "127.0.0.1:{admin_port}"', "[logging]", "access_log = false"]
    return "\n".join(out) + "\n" + extra


class ProxyProcess:
    """``edgeproxy run`` on `path`; its stderr goes to ``<path>.log``."""

    def __init__(self, path: Path, text: str, *, pid_file: Path | None = None):
        self.path = path
        self.port = None
        path.write_text(text)
        self.log_path = path.with_suffix(".log")
        self._log = open(self.log_path, "wb")
        args = [sys.executable, "-m", "edgeproxy", "run", "--config", str(path)]
        if pid_file is not None:
            args += ["--pid-file", str(pid_file)]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=raise_nofile)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rewrite(self, text: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait_log(self, text: str, timeout: float = 10.0, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if log.count(text) >= count:
                return log
            await asyncio.sleep(0.05)
        raise AssertionError(f"{text!r} (x{count}) not in the log after {timeout} s:\n{self.log()[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def http_get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def http_get_async(port: int, path: str = "/") -> tuple[int, str]:
    return await asyncio.to_thread(http_get, port, path)


async def open_many(port: int, n: int, path: str = "/", concurrency: int = 100) -> list:
    """`n` WebSocket connections through the proxy on `port` (client pings off: the test drives traffic)."""
    gate = asyncio.Semaphore(concurrency)

    async def one():
        async with gate:
            return await ws_connect(f"ws://127.0.0.1:{port}{path}", ping_interval=None, open_timeout=20, max_queue=None)

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def echo_once(ws, message: str) -> str:
    await ws.send(message)
    return await asyncio.wait_for(ws.recv(), 10)


async def until_closed(ws, timeout: float = 15.0) -> tuple[int | None, str | None]:
    """Read (and drop) messages until the connection ends; its close code and reason."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    return ws.close_code, ws.close_reason


async def close_all(conns) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True), 10)


def children(pid: int) -> list[int]:
    """The pids of `pid`'s children (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        if stat.read_text().split(") ", 1)[1].startswith("Z"):
            return False  # a zombie waiting for its reaper
    return True


async def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        await asyncio.sleep(0.05)
    return not alive(pid)

"""systemd socket activation, with systemd's own `systemd-socket-activate` as the parent.

`systemd-socket-activate -l ADDR CMD` binds ADDR, waits for the first connection and
execs CMD with LISTEN_FDS/LISTEN_PID set, as systemd does for a .socket unit: so the
first request of each test is one that arrived before the proxy ran.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from processes import Backend, config_text, free_port_range
from test_cli import ROOT, free_port


def activate(tool: str, listen: list[str], config: Path, log: Path) -> subprocess.Popen:
    args = [tool]
    for address in listen:
        args += ["-l", address]
    args += [sys.executable, "-m", "edgeproxy", "run", "--config", str(config)]
    return subprocess.Popen(args, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def wait_listening(port: int, timeout: float = 10.0) -> None:
    """systemd-socket-activate has bound the port (the proxy has not started yet)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def get(port: int, path: str = "/") -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return resp.status, resp.read().decode()


@pytest.fixture
def tool(external_tool) -> str:
    return external_tool("systemd-socket-activate", "systemd")


@pytest.fixture
def backend():
    b = Backend("one")
    yield b
    b.stop()


def test_the_proxy_serves_on_the_socket_it_was_given(tool, backend, tmp_path) -> None:
    port, extra_port = free_port(), free_port()
    text = config_text({"app": [backend]}, {"/": "app"}, port=port) + \
        f'[[listeners]]\nbind = "127.0.0.1:{extra_port}"\n'  # not in the socket unit: bound by the proxy
    (tmp_path / "p.toml").write_text(text)
    proc = activate(tool, [f"127.0.0.1:{port}"], tmp_path / "p.toml", tmp_path / "p.log")
    try:
        wait_listening(port)  # the probe connection triggers the exec, like systemd's first client
        assert get(port) == (200, "backend one\n")
        assert get(extra_port) == (200, "backend one\n")
        log = (tmp_path / "p.log").read_text()
        assert f"socket activation: listener 127.0.0.1:{port} on the socket systemd passed" in log
        assert f"socket activation: listener 127.0.0.1:{extra_port} has no socket from systemd; binding it here" in log
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_socket_no_listener_names_stops_the_start(tool, backend, tmp_path) -> None:
    port, stray = free_port(), free_port()
    (tmp_path / "p.toml").write_text(config_text({"app": [backend]}, {"/": "app"}, port=port))
    proc = activate(tool, [f"127.0.0.1:{port}", f"127.0.0.1:{stray}"], tmp_path / "p.toml", tmp_path / "p.log")
    try:
        wait_listening(port)
        assert proc.wait(timeout=15) == 1
        log = (tmp_path / "p.log").read_text()
        assert f"socket bound to 127.0.0.1:{stray}" in log and "no [[listeners]] bind names that address" in log
    finally:
        proc.kill()
        proc.wait()


def test_workers_share_the_activated_socket(tool, backend, tmp_path) -> None:
    port, admin = free_port(), free_port_range(2)
    (tmp_path / "p.toml").write_text(config_text({"app": [backend]}, {"/": "app"}, port=port, admin_port=admin, workers=2))
    proc = activate(tool, [f"127.0.0.1:{port}"], tmp_path / "p.toml", tmp_path / "p.log")
    try:
        wait_listening(port)
        deadline = time.monotonic() + 20
        while (tmp_path / "p.log").read_text().count("ready; admin on") < 2:
            assert time.monotonic() < deadline, (tmp_path / "p.log").read_text()
            time.sleep(0.1)
        for _ in range(40):
            assert get(port) == (200, "backend one\n")
        # both workers answer their admin port and accept on the one socket (no EADDRINUSE)
        accepted = 0.0
        for i in range(2):
            status, body = get(admin + i, "/admin/config")
            assert status == 200 and json.loads(body)["ready"]
            _, metrics = get(admin + i, "/metrics")
            accepted += sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                            if line.startswith('edgeproxy_connections_opened_total{outcome="accepted",protocol="http"'))
        assert accepted >= 40, accepted  # the 40 requests (and the probe) reached the workers
        assert "Address already in use" not in (tmp_path / "p.log").read_text()
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.wait()

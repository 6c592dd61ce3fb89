"""The `edgeproxy` command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def edgeproxy(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "edgeproxy", *args], capture_output=True, text=True, timeout=30, cwd=kw.pop("cwd", ROOT), **kw
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def test_version_says_which_frame_code_is_active():
    result = edgeproxy("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("edgeproxy ")
    assert "compiled extension" in result.stdout
    pure = edgeproxy("--version", env={**os.environ, "EDGEPROXY_PURE": "1", "EDGEPROXY_REQUIRE_EXT": "0"})
    assert "not active (pure Python)" in pure.stdout


def test_validate_accepts_the_example():
    result = edgeproxy("validate", "--config", "config.example.toml")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_validate_lists_every_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[listeners]]\nbind = "127.0.0.1:99999"\n'
        '[[upstreams]]\nname = "app"\nservers = ["127.0.0.1:9001"]\ntimout = 3\n'
        '[[routes]]\nupstream = "ap"\n'
    )
    result = edgeproxy("validate", "--config", str(bad))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, result.stderr
    assert any("listeners[0].bind" in line for line in lines)
    assert any("upstreams[0].timout" in line for line in lines)
    assert any("routes[0].upstream" in line for line in lines)
    assert all(str(bad) in line for line in lines)
    assert "Traceback" not in result.stderr


def test_validate_refuses_hubs_split_over_workers(tmp_path):
    config = tmp_path / "hubs.toml"
    config.write_text(
        'workers = 3\n[[listeners]]\nbind = "127.0.0.1:8080"\n[[upstreams]]\nname = "app"\n'
        'servers = ["127.0.0.1:9001"]\n[[routes]]\nupstream = "app"\n[[hubs]]\npath = "/hub"\n'
    )
    result = edgeproxy("validate", "--config", str(config))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {config}: workers: workers = 3 with [[hubs]]"), line
    assert '[backplane] kind = "redis" or "nats"' in line


def test_validate_reports_broken_toml_with_its_line(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text('[[listeners]]\nbind = "127.0.0.1:8080\n')
    result = edgeproxy("validate", "--config", str(bad))
    assert result.returncode == 1
    assert "line 2" in result.stderr and "Traceback" not in result.stderr


def test_run_serves_and_stops_cleanly_on_sigterm(tmp_path):
    backend_port, proxy_port = free_port(), free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[[listeners]]\nbind = "127.0.0.1:{proxy_port}"\n'
        f'[[upstreams]]\nname = "app"\nservers = ["127.0.0.1:{backend_port}"]\n'
        '[[routes]]\nupstream = "app"\n[logging]\nformat = "json"\n[admin]\nbind = "127.0.0.1:0"\n'
    )
    backend = subprocess.Popen(
        [sys.executable, "-c", f"import http.server as h; h.ThreadingHTTPServer(('127.0.0.1', {backend_port}), h.SimpleHTTPRequestHandler).serve_forever()"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    (tmp_path / "hello.txt").write_text("hello from the backend\n")
    proxy = subprocess.Popen(
        [sys.executable, "-m", "edgeproxy", "run", "--config", str(config)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for_port(backend_port)
        wait_for_port(proxy_port)
        with urllib.request.urlopen(f"http://127.0.0.1:{proxy_port}/hello.txt", timeout=5) as response:
            assert response.read() == b"hello from the backend\n"
        proxy.send_signal(signal.SIGTERM)
        _, stderr = proxy.communicate(timeout=10)
        assert proxy.returncode == 0
    finally:
        proxy.kill()
        backend.kill()
        backend.wait()
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    access = [r for r in records if r.get("event") == "http"]
    assert access and access[0]["status"] == 200 and access[0]["path"] == "/hello.txt"
    assert any(r.get("msg") == "stopped" for r in records)


def test_run_with_a_bad_config_exits_1(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[listeners]]\n")
    result = edgeproxy("run", "--config", str(bad))
    assert result.returncode == 1
    assert "listeners[0]" in result.stderr


@pytest.mark.timeout(30)
def test_demo_answers_on_the_example_config():
    from edgeproxy.config import load_config

    config = load_config(ROOT / "config.example.toml")
    port = config.listeners[0].bind.port
    backend_port = config.upstreams[0].servers[0].port
    for p in (port, backend_port, config.admin.bind.port):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", p)) == 0:
                pytest.fail(f"port {p} of config.example.toml is already in use on this machine")
    demo = subprocess.Popen([sys.executable, "-m", "edgeproxy", "demo"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/headers", timeout=5) as response:
            seen = json.loads(response.read())
        assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
        demo.send_signal(signal.SIGINT)
        demo.communicate(timeout=10)
        assert demo.returncode == 0
    finally:
        demo.kill()

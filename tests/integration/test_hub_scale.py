"""10,000 subscribers on loopback all receive a publication.

The proxy runs as a subprocess (``python -m edgeproxy run``): 10,000 client sockets in
this process and 10,000 proxy sockets in that one stay under the 20,000 open-file cap
per process.  Both raise their soft RLIMIT_NOFILE to the hard limit.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import connect

SUBSCRIBERS = 10_000
API_KEY = "scale-api-key-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@pytest.fixture
def hub_process(tmp_path: Path, refused_port: int):
    port, admin = _free_port(), _free_port()
    config = tmp_path / "edgeproxy.toml"
    config.write_text(f"""
[[listeners]]
bind = "127.0.0.1:{port}"
backlog = 4096
[[upstreams]]
name = "app"
servers = ["127.0.0.1:{refused_port}"]
[[routes]]
upstream = "app"
[logging]
access_log = false
level = "error"
[admin]
bind = "127.0.0.1:{admin}"
api_key = "{API_KEY}"
[[hubs]]
path = "/hub"
ping_interval = 0
""")
    proc = subprocess.Popen([sys.executable, "-m", "edgeproxy", "run", "--config", str(config)],
                            preexec_fn=_raise_nofile, stderr=subprocess.PIPE, env=dict(os.environ))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", admin), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"the proxy did not start: {proc.stderr.read().decode()[-2000:]}")
    yield port, admin
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


async def test_ten_thousand_subscribers_all_receive(hub_process) -> None:
    _raise_nofile()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft > SUBSCRIBERS + 500, f"needs a soft open-file limit above {SUBSCRIBERS + 500}, have {soft}"
    port, admin = hub_process
    gate = asyncio.Semaphore(200)
    subscribe = b'{"op":"subscribe","channel":"all"}'

    async def subscriber():
        async with gate:
            ws = await connect(f"ws://127.0.0.1:{port}/hub", ping_interval=None, compression=None,
                               open_timeout=30, close_timeout=1, proxy=None)
            assert orjson.loads(await ws.recv())["op"] == "connected"
            await ws.send(subscribe.decode())
            assert orjson.loads(await ws.recv())["op"] == "subscribed"
            return ws

    clients = await asyncio.wait_for(asyncio.gather(*(subscriber() for _ in range(SUBSCRIBERS))), 120)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{admin}/v1/publish", data=b'{"channel":"all","data":"hello all"}',
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as response:
                assert response.status == 200
                seq = (await response.json())["seq"]
        got = await asyncio.wait_for(asyncio.gather(*(ws.recv() for ws in clients)), 60)
        assert len(got) == SUBSCRIBERS
        assert all(orjson.loads(m) == {"op": "pub", "channel": "all", "seq": seq, "epoch": orjson.loads(m)["epoch"],
                                       "data": "hello all"} for m in got)
        assert len({orjson.loads(m)["epoch"] for m in got}) == 1
    finally:
        for ws in clients:
            ws.transport.abort()

"""h2load against edgeproxy: HTTP/2 (h2c, 1 and 100 streams per connection) vs HTTP/1.1, same backend.

    PYTHONPATH=. python benchmarks/http2/h2load_bench.py [--requests 20000] [--clients 4]

Starts a minimal keep-alive HTTP/1.1 backend (uvloop, a fixed 2-byte answer)
and ``python -m edgeproxy run`` with one cleartext listener that takes h2c by
prior knowledge (HTTP/1.1 goes to the same listener), then runs h2load
(Debian's nghttp2-client) three ways and prints one JSON line per run:
requests/s, mean request time, and the proxy's CPU time per request (from
/proc, utime + stime).  Everything on loopback, every run bounded by
``--requests``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

BACKEND = r"""
import asyncio, sys, uvloop
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, d):
        self.buf += d
        while b"\r\n\r\n" in self.buf:
            _, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.t.write(RESPONSE)
async def main():
    server = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
uvloop.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def h2load(args: list[str], pid: int, requests: int) -> dict:
    before = cpu_seconds(pid)
    out = subprocess.run(["h2load", *args], capture_output=True, text=True, timeout=300).stdout
    cpu = cpu_seconds(pid) - before
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    if not (done and rps and mean):
        raise SystemExit(out)
    return {"succeeded": int(done.group(2)), "requests_per_s": float(rps.group(1)), "mean_request_time": mean.group(1),
            "proxy_cpu_us_per_request": round(cpu / max(1, int(done.group(2))) * 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--pool-size", type=int, default=32, help="upstreams[].pool_size (idle connections kept)")
    opts = parser.parse_args()
    backend_port, proxy_port = free_port(), free_port()
    backend = subprocess.Popen([sys.executable, "-c", BACKEND, str(backend_port)])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.toml")
        with open(path, "w") as fh:
            fh.write(f'[[listeners]]\nbind = "127.0.0.1:{proxy_port}"\nhttp2 = true\n'
                     f'[[upstreams]]\nname = "app"\nservers = ["127.0.0.1:{backend_port}"]\n'
                     f'pool_size = {opts.pool_size}\n'
                     f'[[routes]]\nupstream = "app"\n[admin]\nenabled = false\n[logging]\naccess_log = false\n')
        proxy = subprocess.Popen([sys.executable, "-m", "edgeproxy", "run", "--config", path],
                                 stderr=subprocess.DEVNULL)
        try:
            wait_port(backend_port)
            wait_port(proxy_port)
            url = f"http://127.0.0.1:{proxy_port}/"
            n, c = str(opts.requests), str(opts.clients)
            runs = {
                "http1.1 (1 request in flight per connection)": ["--h1", "-n", n, "-c", c, "-m", "1", url],
                "h2c, 1 stream per connection": ["-n", n, "-c", c, "-m", "1", url],
                "h2c, 100 streams per connection": ["-n", n, "-c", c, "-m", "100", url],
            }
            for name, args in runs.items():
                print(json.dumps({"run": name, "clients": opts.clients, **h2load(args, proxy.pid, opts.requests)}))
        finally:
            proxy.terminate()
            proxy.wait(15)
            backend.kill()
            backend.wait()


if __name__ == "__main__":
    main()

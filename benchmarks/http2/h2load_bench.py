"""h2load against edgeproxy and nginx, same HTTP/1.1 upstream, same run.

    PYTHONPATH=. python benchmarks/http2/h2load_bench.py [--requests 20000] [--clients 4] [--rounds 3]
        [--base-tree /tmp/base] [--markdown out.md] [--json out.json]

The upstream is nginx serving a fixed ``200 ok`` (one worker, keep-alive without
a request limit): the cheapest HTTP/1.1 server at hand, so the proxies' CPU is
what the figures show.  The proxies, both cleartext on loopback:

* ``edgeproxy``: this tree, ``python -m edgeproxy run``, one listener taking
  h2c by prior knowledge and HTTP/1.1 on the same port, upstream pool of
  ``--pool-size`` idle connections;
* ``edgeproxy-base`` (with ``--base-tree``): the same, from another checkout
  (built in place), to compare before/after in one run;
* ``nginx``: one worker, h2c (``listen ... http2``: nginx 1.22's spelling of
  ``http2 on``) and HTTP/1.1 on a second port, ``proxy_http_version 1.1`` and an
  upstream ``keepalive`` pool of the same size.

Each is driven by h2load (Debian's nghttp2-client) in these modes: HTTP/1.1 with
one request in flight per connection, h2c with 1 and with 100 concurrent streams
per connection, ``--clients`` connections each, ``--requests`` requests per
measurement.  The rounds are interleaved (every target and mode once, then
again), and each figure is the median over the rounds: requests/s, p99 of the
request times (from h2load's ``--log-file``), and the proxy's CPU per request
(utime + stime from /proc of the proxy's processes, master and workers).
Loopback only; every measurement is bounded by its request count and a timeout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent / "load"))

from _common import child_setup  # noqa: E402
from run import cpu_seconds, process_tree, stop_process  # noqa: E402

#: (mode name, h2load arguments before the URL, which port: "h1" or "h2")
MODES = [
    ("http/1.1", ["--h1", "-m", "1"], "h1"),
    ("h2c 1 stream", ["-m", "1"], "h2"),
    ("h2c 100 streams", ["-m", "100"], "h2"),
]
RUN_TIMEOUT_S = 300


def log(msg: str) -> None:
    print(f"[h2bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process {proc.args[:3]} exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def nginx_conf(prefix: Path, servers: str) -> Path:
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(f"""{user}worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; use epoll; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
{servers}
}}
""")
    return conf


def start_nginx(prefix: Path, servers: str) -> subprocess.Popen:
    conf = nginx_conf(prefix, servers)
    return subprocess.Popen([nginx_binary(), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs" / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=child_setup)


def start_upstream(workdir: Path, port: int) -> subprocess.Popen:
    return start_nginx(workdir / "upstream", f"""
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "ok"; }}
    }}""")


def start_nginx_proxy(workdir: Path, h1_port: int, h2_port: int, upstream_port: int, pool: int) -> subprocess.Popen:
    return start_nginx(workdir / "nginx", f"""
    upstream app {{
        server 127.0.0.1:{upstream_port};
        keepalive {pool};
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{h1_port} backlog=4096;
        listen 127.0.0.1:{h2_port} http2 backlog=4096;
        http2_max_concurrent_streams 128;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}""")


def start_edgeproxy(workdir: Path, name: str, tree: Path, port: int, upstream_port: int, pool: int) -> subprocess.Popen:
    path = workdir / f"{name}.toml"
    path.write_text(f'[[listeners]]\nbind = "127.0.0.1:{port}"\nhttp2 = true\n'
                    f'[[upstreams]]\nname = "app"\nservers = ["127.0.0.1:{upstream_port}"]\npool_size = {pool}\n'
                    f'[[routes]]\nupstream = "app"\n[admin]\nenabled = false\n[logging]\naccess_log = false\n')
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.Popen([sys.executable, "-m", "edgeproxy", "run", "--config", str(path)], cwd=str(tree), env=env,
                            stdout=subprocess.DEVNULL, stderr=open(workdir / f"{name}.log", "wb"),
                            preexec_fn=child_setup)


def h2load(args: list[str], pids: list[int], requests: int, logfile: Path) -> dict:
    """One measurement: h2load's counts and rate, p99 from its per-request log, the proxy's CPU."""
    before = cpu_seconds(pids)
    proc = subprocess.run(["h2load", "--log-file", str(logfile), *args], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    cpu = cpu_seconds(pids) - before
    out = proc.stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    if not (done and rps):
        raise SystemExit(f"h2load {' '.join(args)}: unexpected output\n{out}\n{proc.stderr}")
    times = sorted(int(line.split("\t")[2]) for line in logfile.read_text().splitlines() if line.count("\t") >= 2)
    succeeded = int(done.group(2))
    return {
        "requests": requests, "succeeded": succeeded, "failed": int(done.group(3)) + int(done.group(4)),
        "requests_per_s": float(rps.group(1)),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] / 1000, 2) if times else None,
        "proxy_cpu_us_per_request": round(cpu / max(1, succeeded) * 1e6, 1),
    }


def median_of(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for key in ("requests_per_s", "p99_ms", "proxy_cpu_us_per_request"):
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = round(statistics.median(values), 2) if values else None
    out["succeeded"] = min(r["succeeded"] for r in runs)
    out["failed"] = max(r["failed"] for r in runs)
    out["rounds"] = len(runs)
    return out


def markdown(rows: list[dict], opts, command: str) -> str:
    targets = list(dict.fromkeys(r["target"] for r in rows))
    by = {(r["target"], r["mode"]): r for r in rows}
    lines = [f"Run of {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} on {os.cpu_count()} CPUs, "
             f"load average {[round(x, 2) for x in os.getloadavg()]} at the end; {opts.requests} requests per "
             f"measurement over {opts.clients} connections, medians of {opts.rounds} interleaved rounds"
             f"{', EDGEPROXY_PURE=1' if os.environ.get('EDGEPROXY_PURE') == '1' else ''}.", "",
             f"`{command}`", "",
             "| target | mode | req/s | p99 ms | proxy CPU us/req |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['mode']} | {r['requests_per_s']:,.0f} | {r['p99_ms']} | "
                     f"{r['proxy_cpu_us_per_request']} |")
    pairs = [(t, "nginx") for t in targets if t != "nginx" and "nginx" in targets]
    if "edgeproxy" in targets and "edgeproxy-base" in targets:
        pairs.append(("edgeproxy", "edgeproxy-base"))
    for target, other in pairs:
        lines += ["", f"{target} / {other} (req/s: higher is better; p99, CPU: lower is better):", "",
                  "| mode | req/s | p99 | CPU/req |", "|---|---|---|---|"]
        for mode, _, _ in MODES:
            a, b = by.get((target, mode)), by.get((other, mode))
            if a and b:
                lines.append(f"| {mode} | {ratio(a, b, 'requests_per_s')} | {ratio(a, b, 'p99_ms')} | "
                             f"{ratio(a, b, 'proxy_cpu_us_per_request')} |")
    return "\n".join(lines) + "\n"


def ratio(a: dict, b: dict, key: str) -> str:
    return f"{a[key] / b[key]:.2f}x" if a[key] and b[key] else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests per measurement")
    parser.add_argument("--clients", type=int, default=4, help="h2load connections (-c)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool-size", type=int, default=512,
                        help="idle upstream connections kept: edgeproxy's pool_size, nginx's keepalive")
    parser.add_argument("--targets", default="edgeproxy,nginx", help="of edgeproxy, edgeproxy-base, nginx")
    parser.add_argument("--base-tree", type=Path, help="checkout for the edgeproxy-base target")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()
    command = "python benchmarks/http2/h2load_bench.py " + " ".join(sys.argv[1:])
    targets = [t.strip() for t in opts.targets.split(",") if t.strip()]
    if "edgeproxy-base" in targets and not opts.base_tree:
        parser.error("edgeproxy-base needs --base-tree")
    if shutil.which("h2load") is None or nginx_binary() is None:
        raise SystemExit("needs h2load and nginx: apt-get install -y nghttp2-client nginx")
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="h2bench-") as tmp:
        workdir = Path(tmp)
        try:
            upstream_port = free_port()
            upstream = start_upstream(workdir, upstream_port)
            procs.append(upstream)
            wait_port(upstream_port, upstream)
            ports: dict[str, dict[str, int]] = {}
            pids: dict[str, list[int]] = {}
            for target in targets:
                if target == "nginx":
                    h1, h2 = free_port(), free_port()
                    proc = start_nginx_proxy(workdir, h1, h2, upstream_port, opts.pool_size)
                    wait_port(h2, proc)
                else:
                    tree = REPO if target == "edgeproxy" else opts.base_tree.resolve()
                    h1 = h2 = free_port()
                    proc = start_edgeproxy(workdir, target, tree, h1, upstream_port, opts.pool_size)
                    wait_port(h1, proc)
                procs.append(proc)
                ports[target] = {"h1": h1, "h2": h2}
                deadline = time.monotonic() + 5
                while target == "nginx" and len(process_tree(proc.pid)) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                pids[target] = process_tree(proc.pid)
                # warm up: connections, pools, caches
                h2load(["-n", str(min(2000, opts.requests)), "-c", str(opts.clients), "-m", "10",
                        f"http://127.0.0.1:{ports[target]['h2']}/"], pids[target], opts.requests, workdir / "warm.log")
            results: dict[tuple[str, str], list[dict]] = {}
            for rnd in range(opts.rounds):
                for mode, args, port in MODES:
                    for target in targets:
                        url = f"http://127.0.0.1:{ports[target][port]}/"
                        r = h2load(["-n", str(opts.requests), "-c", str(opts.clients), *args, url], pids[target],
                                   opts.requests, workdir / "req.log")
                        results.setdefault((target, mode), []).append(r)
                        log(f"round {rnd + 1} {target} {mode}: {r}")
            rows = [{"target": t, "mode": m, "clients": opts.clients, **median_of(results[(t, m)])}
                    for m, _, _ in MODES for t in targets]
        finally:
            for proc in reversed(procs):
                stop_process(proc, signal.SIGQUIT if proc.args[0].endswith("nginx") else signal.SIGTERM)
    for row in rows:
        print(json.dumps(row))
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=1))
    text = markdown(rows, opts, command)
    if opts.markdown:
        opts.markdown.write_text(text)
    print(text, file=sys.stderr)


if __name__ == "__main__":
    main()

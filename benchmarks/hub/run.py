"""Hub fan-out benchmark: edgeproxy's encode-once fan-out against a backend fanning out behind nginx.

    python benchmarks/hub/run.py [--quick] [--rounds 20] [--duration 5] [--out benchmarks/hub/results.json]

Side by side, in one run, on loopback:

* ``edgeproxy``: a ``[[hubs]]`` route; subscribers speak the hub protocol, the
  publisher calls ``POST /v1/publish``; edgeproxy frames each message once and
  writes it to every subscriber (``write_many``).
* ``nginx``: nginx (1 worker, generated config in a temp dir) in front of
  ``fanout_backend.py``, a picows server that sends N copies over N connections,
  which is what a backend behind a plain reverse proxy must do.

Measured (see ``subscribers.py``): publish-to-delivery latency p50/p99/max of one
~100-byte message to 2,000 and 10,000 subscribers, the time until the last
subscriber had it, sustained delivered messages/s, and CPU per delivered message of
the proxy (edgeproxy; nginx, and nginx + backend).  nginx runs at 2,000 only: at
10,000 one nginx worker would need 20,000 sockets, the per-process cap here.
Bounded: every child has a timeout and dies with the runner.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("loadbench", REPO / "benchmarks" / "load" / "run.py")
loadbench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loadbench)  # the load benchmark's process helpers and its nginx target

API_KEY = "hub-benchmark-api-key-0123456789"


def log(msg: str) -> None:
    print(f"[hub] {msg}", file=sys.stderr, flush=True)


class HubProxy(loadbench.EdgeProxy):
    """edgeproxy with one hub at /hub (the route to the backend is never used)."""

    name = "edgeproxy"

    def __init__(self, workdir: Path, backend_port: int):
        super().__init__(workdir, backend_port)
        self.admin_port = 0

    def command(self, port: int):
        self.admin_port = loadbench.free_port()
        cfg = self.workdir / "edgeproxy-hub.toml"
        cfg.write_text(f"""[[listeners]]
bind = "127.0.0.1:{port}"
backlog = 4096
[[upstreams]]
name = "unused"
servers = ["127.0.0.1:{self.backend_port}"]
[[routes]]
upstream = "unused"
[logging]
access_log = false
[admin]
bind = "127.0.0.1:{self.admin_port}"
api_key = "{API_KEY}"
[[hubs]]
path = "/hub"
ping_interval = 0
subscriber_buffer_limit = 4194304
""")
        return [sys.executable, "-m", "edgeproxy", "run", "--config", str(cfg)], loadbench.edgeproxy_env(False)


def start_backend(workdir: Path) -> tuple[subprocess.Popen, int]:
    logf = open(workdir / "backend.log", "a")
    proc = subprocess.Popen([sys.executable, str(HERE / "fanout_backend.py")], stdout=subprocess.PIPE,
                            stderr=logf, preexec_fn=loadbench.child_setup, text=True)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the fan-out backend did not start: {loadbench.tail(workdir / 'backend.log')}")
    return proc, json.loads(line)["port"]


def measure(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(HERE / "subscribers.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=loadbench.child_setup)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"subscribers.py exited {proc.returncode}: {proc.stderr[-1500:]}"}
    return json.loads(lines[-1])


def verdict(results: dict) -> list[str]:
    """The issue's targets, measured in this run."""
    out = []
    hub10 = results.get("edgeproxy@10000", {}).get("latency_ms", {})
    nginx2 = results.get("nginx@2000", {}).get("latency_ms", {})
    if hub10.get("p99") and nginx2.get("p99"):
        ratio = nginx2["p99"] / hub10["p99"]
        out.append(f"p99 edgeproxy@10000 {hub10['p99']:.1f} ms vs nginx@2000 {nginx2['p99']:.1f} ms: "
                   f"{ratio:.1f}x faster (target >= 10x: {'met' if ratio >= 10 else 'NOT met'})")
    for key in ("edgeproxy@2000", "edgeproxy@10000"):
        cpu = results.get(key, {}).get("sustained", {}).get("cpu_us_per_msg")
        if cpu is not None:
            out.append(f"{key} proxy CPU per delivered message {cpu:.2f} us (target < 2 us: "
                       f"{'met' if cpu < 2 else 'NOT met'})")
    return out


def table(results: dict) -> str:
    rows = [("run", "msg B", "p50 ms", "p99 ms", "max ms", "all-delivered ms (median)", "msgs/s sustained",
             "proxy CPU us/msg", "proxy+backend CPU us/msg")]
    for key, r in results.items():
        if "error" in r:
            rows.append((key, r["error"][:60], "", "", "", "", "", "", ""))
            continue
        lat, sus = r["latency_ms"], r["sustained"]
        rows.append((key, str(r["message_bytes"]), f"{lat['p50']:.2f}", f"{lat['p99']:.2f}", f"{lat['max']:.2f}",
                     f"{lat['all_delivered_median']:.2f}", f"{sus['msgs_per_s']:,}",
                     f"{sus['cpu_us_per_msg']:.2f}", f"{r.get('cpu_with_backend_us', sus['cpu_us_per_msg']):.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="latency rounds per run (one message each)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of sustained publishing per run")
    parser.add_argument("--quick", action="store_true", help="5 rounds, 1 s sustained, 500 and 2,000 subscribers")
    parser.add_argument("--out", default=str(HERE / "results.json"), help="JSON results ('-' for none)")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.rounds, opts.duration = 5, 1.0
    sizes = (500, 2000) if opts.quick else (2000, 10000)
    loadbench.raise_nofile_limit()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="edgeproxy-hub-bench-") as tmp:
        workdir = Path(tmp)
        backend, backend_port = start_backend(workdir)
        hub = HubProxy(workdir, backend_port)
        nginx = loadbench.Nginx(workdir, backend_port)
        try:
            hub.start()
            nginx_missing = nginx.available()
            if nginx_missing is None:
                nginx.start()
            else:
                log(f"nginx skipped: {nginx_missing}")
            common = ["--rounds", str(opts.rounds), "--duration", str(opts.duration)]
            plan = [("edgeproxy", sizes[0]), ("nginx", sizes[0]), ("edgeproxy", sizes[1])]
            for name, conns in plan:
                if name == "nginx" and nginx_missing is not None:
                    continue
                log(f"{name} with {conns} subscribers ...")
                if name == "edgeproxy":
                    args = ["--kind", "hub", "--url", f"ws://127.0.0.1:{hub.port}/hub",
                            "--admin", f"127.0.0.1:{hub.admin_port}", "--key", API_KEY,
                            "--cpu-pids", ",".join(map(str, hub.pids()))]
                else:
                    nginx_pids = nginx.pids()
                    args = ["--kind", "backend", "--url", f"ws://127.0.0.1:{nginx.port}/ws",
                            "--control", f"ws://127.0.0.1:{backend_port}/control",
                            "--cpu-pids", ",".join(map(str, nginx_pids))]
                    cpu_before = loadbench.cpu_seconds([backend.pid])
                result = measure([*args, "--conns", str(conns), *common], timeout=600)
                if name == "nginx" and "sustained" in result:
                    # backend CPU over the whole run is an upper bound of its window share
                    backend_cpu = loadbench.cpu_seconds([backend.pid]) - cpu_before
                    sus = result["sustained"]
                    result["backend_cpu_s_whole_run"] = round(backend_cpu, 3)
                    result["cpu_with_backend_us"] = (sus["cpu_s"] + backend_cpu) / sus["delivered"] * 1e6
                results[f"{name}@{conns}"] = result
                log(json.dumps(result))
        finally:
            hub.stop()
            nginx.stop()
            loadbench.stop_process(backend)
    print(table(results))
    print()
    for line in verdict(results):
        print(line)
    if opts.out != "-":
        doc = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
               "settings": vars(opts), "results": results, "verdict": verdict(results), "at": time.time()}
        Path(opts.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Proxy CPU spent on heartbeats, with real sockets: N idle WebSockets, pings on and off.

    python benchmarks/heartbeat_real.py                    # 9,000 connections, ~2 minutes
    python benchmarks/heartbeat_real.py --conns 2000 --window 6

The in-memory benchmark (benchmarks/test_micro_heartbeat.py) counts 100,000
simulated connections; this one holds real proxied WebSockets (picows clients,
the picows echo backend of benchmarks/load/, edgeproxy in its own process) and
measures the proxy's CPU time over a window while they sit idle, once with
``ping_interval = 0`` and once with pings every ``--ping-interval`` seconds
(to clients and to the upstream, each answered).  The difference, divided by
connections and ping rounds, is the cost of one heartbeat round per connection:
a ping to each side, the two pongs matched, the timer wheel.  It also reads the
proxy's /metrics to show that no answered ping was counted as a failure.

Bounded: every child has a timeout; the load generator releases its connections
after the window.  Only 127.0.0.0/8 is used.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "load"))

import run as load  # noqa: E402  (benchmarks/load/run.py: process helpers shared with the load benchmark)


class HeartbeatProxy(load.EdgeProxy):
    """edgeproxy with the given ping interval and a known admin port."""

    def __init__(self, workdir: Path, backend_port: int, ping_interval: float):
        self.name = f"edgeproxy-ping-{ping_interval:g}"
        super().__init__(workdir, backend_port)
        self.ping_interval = ping_interval
        self.admin_port = load.free_port()

    def command(self, port: int):
        cmd, env = super().command(port)
        cfg = Path(cmd[-1])
        text = cfg.read_text()
        text = text.replace("idle_timeout = 0\n", f"idle_timeout = 0\nping_interval = {self.ping_interval}\n"
                            f"pong_timeout = {max(5.0, 3 * self.ping_interval)}\n")
        text = text.replace('bind = "127.0.0.1:0"', f'bind = "127.0.0.1:{self.admin_port}"')
        cfg.write_text(text)
        return cmd, env

    def heartbeat_failures(self) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5) as resp:
                body = resp.read().decode()
        except OSError:
            return None
        for line in body.splitlines():
            if line.startswith("edgeproxy_heartbeat_failures_total "):
                return float(line.split()[1])
        return None


def measure(target: HeartbeatProxy, opts: argparse.Namespace, workdir: Path) -> dict:
    pids = target.pids()
    at: dict = {}

    def on_event(msg: dict, proc) -> None:
        if msg.get("event") != "ready":
            return
        time.sleep(1.0)  # let the handshakes' work settle
        t0, c0 = time.monotonic(), load.cpu_seconds(pids)
        time.sleep(opts.window)
        at["cpu_s"] = load.cpu_seconds(pids) - c0
        at["window_s"] = time.monotonic() - t0
        at["opened"] = msg.get("opened")
        at["failures"] = target.heartbeat_failures()
        proc.stdin.write("release\n")
        proc.stdin.flush()

    n_src = max(2, -(-opts.conns // 1000))
    result = load.run_loadgen(
        ["idle", "--url", f"ws://127.0.0.1:{target.port}/ws", "--conns", str(opts.conns),
         "--src-addrs", f"127.0.0.2-127.0.0.{1 + min(n_src, 250)}", "--hold", str(opts.window + 60),
         "--open-timeout", "150"],
        timeout=opts.window + 300, on_event=on_event, logdir=workdir, name=target.name,
    )
    return {**at, "dropped_while_idle": result.get("dropped_while_idle"),
            "unexpected_frames": result.get("unexpected_frames"), "error": result.get("error")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conns", type=int, default=9000, help="idle WebSockets held (at most 9500 on these machines)")
    p.add_argument("--ping-interval", type=float, default=1.0, help="seconds between pings in the measured run")
    p.add_argument("--window", type=float, default=20.0, help="seconds of CPU measured per run")
    opts = p.parse_args(argv)
    load.raise_nofile_limit()
    workdir = Path(tempfile.mkdtemp(prefix="edgeproxy-heartbeat-"))
    backend = load.subprocess.Popen(
        [sys.executable, str(HERE / "load" / "echo_backend.py"), "--port", "0", "--max-lifetime", "900"],
        stdin=load.subprocess.DEVNULL, stdout=load.subprocess.PIPE, stderr=open(workdir / "backend.stderr", "w"),
        text=True, preexec_fn=load.child_setup,
    )
    runs = {}
    try:
        ready = load.JsonLines(backend).get(20)
        if not ready or ready.get("event") != "ready":
            raise RuntimeError(f"echo backend did not start: {ready}")
        for interval in (0.0, opts.ping_interval):
            target = HeartbeatProxy(workdir, ready["port"], interval)
            target.start()
            try:
                runs[interval] = measure(target, opts, workdir)
            finally:
                target.stop()
    finally:
        load.stop_process(backend)
    off, on = runs[0.0], runs[opts.ping_interval]
    print(json.dumps(runs, indent=1))
    if off.get("error") or on.get("error") or not off.get("opened") or not on.get("opened"):
        print("a run failed; see above", file=sys.stderr)
        return 1
    rounds = on["window_s"] / opts.ping_interval
    extra = on["cpu_s"] / on["window_s"] - off["cpu_s"] / off["window_s"]  # CPU seconds per second
    per_conn_round_us = extra * opts.ping_interval / on["opened"] * 1e6
    print(f"{on['opened']} idle WebSockets, pings every {opts.ping_interval:g}s to both sides "
          f"({rounds:.0f} rounds in {on['window_s']:.1f}s):")
    print(f"  proxy CPU without pings: {off['cpu_s'] / off['window_s'] * 100:.2f}% of a core")
    print(f"  proxy CPU with pings:    {on['cpu_s'] / on['window_s'] * 100:.2f}% of a core")
    print(f"  cost of one heartbeat round (ping + pong, both sides): {per_conn_round_us:.1f} us per connection")
    print(f"  at the default 30 s interval that is {per_conn_round_us / 30 * on['opened'] / 1e4:.3f}% of a core "
          f"for these {on['opened']} connections, {per_conn_round_us / 30 * 100_000 / 1e4:.2f}% for 100,000")
    print(f"  heartbeat failures counted: {on['failures']:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

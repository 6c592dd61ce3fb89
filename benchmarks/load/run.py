"""WebSocket load benchmark: edgeproxy against direct, nginx and HAProxy, on loopback.

    python benchmarks/load/run.py [--targets direct,edgeproxy,edgeproxy-w2,nginx-w1,nginx-auto,haproxy-t1,haproxy-default]
                                  [--duration S] [--rounds N] [--idle-conns 9000] [--quick]
                                  [--out benchmarks/load/results.json] [--markdown FILE]

Starts the picows echo backend (echo_backend.py) and every proxy in front of it
(direct = no proxy): edgeproxy with ``workers = 1`` and ``2``, nginx with one worker
and ``worker_processes auto``, HAProxy with ``nbthread 1`` and its default threads.
Per target it measures idle-connection memory and CPU on the fresh proxy, then runs
each traffic measurement in interleaved rounds (one window per target per round;
figures are medians over the rounds), each window being one run of the load
generator (loadgen.py, a separate process) with the CPU time of the proxy's whole
process tree sampled from /proc at the window's edges. Finally it prints the command,
a table, edgeproxy's ratios to the better of nginx-w1 and HAProxy-t1 (the
multi-process targets: of nginx-auto and haproxy-default), how each proxy scales
with more processes, and ratios to direct, nginx-w1 and HAProxy-t1; it writes JSON
(and Markdown with --markdown). See README.md beside this file for what every
figure means. Everything listens on and connects to 127.0.0.0/8 only; every step
is bounded in time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import queue
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from _common import child_setup, raise_nofile_limit  # noqa: E402

#: the default run: edgeproxy, nginx and HAProxy each with one process (thread) and with
#: several, side by side (edgeproxy-pure and edgeproxy-base are there on request)
ALL_TARGETS = ["direct", "edgeproxy", "edgeproxy-w2", "nginx-w1", "nginx-auto", "haproxy-t1", "haproxy-default"]
#: older names, still accepted
ALIASES = {"nginx": "nginx-w1", "haproxy": "haproxy-t1", "edgeproxy-w1": "edgeproxy"}
REFERENCES = ["direct", "nginx-w1", "haproxy-t1"]
#: edgeproxy is compared with the better of these, per figure: one process (thread) each,
#: and the multi-process (multi-thread) ones for the edgeproxy targets with several workers
BEST_SINGLE = ("nginx-w1", "haproxy-t1")
BEST_MULTI = ("nginx-auto", "haproxy-default")
CLK_TCK = os.sysconf("SC_CLK_TCK")
LONG_TIMEOUT_S = 3600  # proxies' read/tunnel timeouts: never the thing that ends a run


def log(msg: str) -> None:
    print(f"[load] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# /proc sampling
# --------------------------------------------------------------------------


def _ppid_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(rest[1]), []).append(int(entry))
    return children


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (nginx: master + worker)."""
    children = _ppid_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the given processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
            total += int(rest[11]) + int(rest[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def memory_kib(pids: list[int]) -> dict[str, int]:
    """Summed VmRSS (status) and Pss (smaps_rollup) of the given processes, in KiB."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                        break
        except OSError:
            pass
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                        break
        except OSError:
            pass
    return {"rss_kib": rss, "pss_kib": pss}


def thread_count(pids: list[int]) -> int:
    """Threads of the given processes together (/proc/PID/status Threads)."""
    n = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                n += next((int(line.split()[1]) for line in f if line.startswith("Threads:")), 0)
        except OSError:
            pass
    return n


def fd_count(pids: list[int]) -> int:
    n = 0
    for pid in pids:
        try:
            n += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return n


def machine_cpu() -> dict[str, float]:
    """Whole-machine CPU seconds from /proc/stat: user+nice+system, irq+softirq, steal."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        fields = []
    fields += [0] * (8 - len(fields))
    return {"task": (fields[0] + fields[1] + fields[2]) / CLK_TCK, "irq": (fields[5] + fields[6]) / CLK_TCK,
            "steal": fields[7] / CLK_TCK}


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


# --------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Stop one process we started, and any of its children still there (by pid)."""
    if proc is None or proc.poll() is not None:
        return
    pids = process_tree(proc.pid)
    try:
        proc.send_signal(sig)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    for pid in pids[1:]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class JsonLines:
    """Reads a child's stdout JSON lines on a thread; `get(timeout)` returns the next one."""

    def __init__(self, proc: subprocess.Popen):
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            line = line.strip()
            if not line:
                continue
            try:
                self.q.put(json.loads(line))
            except ValueError:
                self.q.put({"event": "garbage", "line": line[:300]})
        self.q.put(None)

    def get(self, timeout: float) -> dict | None:
        try:
            return self.q.get(timeout=max(0.01, timeout))
        except queue.Empty:
            return {"event": "timeout"}


def run_loadgen(argv: list[str], timeout: float, on_event: Callable[[dict, subprocess.Popen], None] | None = None,
                logdir: Path | None = None, name: str = "loadgen") -> dict[str, Any]:
    """Run loadgen.py with `argv`; call `on_event` for every progress line; return its result line."""
    cmd = [sys.executable, str(HERE / "loadgen.py"), *argv, "--max-seconds", str(int(timeout) + 5)]
    errpath = (logdir / f"{name}.stderr") if logdir else None
    errf = open(errpath, "w") if errpath else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errf, text=True,
                                preexec_fn=child_setup, cwd=str(HERE))
    finally:
        if errpath:
            errf.close()
    lines = JsonLines(proc)
    deadline = time.monotonic() + timeout
    result: dict[str, Any] | None = None
    try:
        while True:
            msg = lines.get(deadline - time.monotonic())
            if msg is None:
                break
            if msg.get("event") == "timeout":
                result = {"error": f"load generator timed out after {timeout:.0f}s"}
                break
            if msg.get("event") == "result":
                result = msg
                break
            if on_event is not None:
                on_event(msg, proc)
    finally:
        if proc.poll() is None:
            try:
                proc.wait(timeout=10 if result and "error" not in result else 0.1)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        try:
            proc.stdin.close()
        except OSError:
            pass
    if result is None:
        result = {"error": f"load generator exited with code {proc.returncode} without a result"}
    if "error" in result and errpath:
        result["stderr_tail"] = tail(errpath)
    result.pop("event", None)
    return result


# --------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------


#: another checkout of edgeproxy (its extension built in place) for the "edgeproxy-base" target
BASE_TREE: Path | None = None


def edgeproxy_env(pure: bool, tree: Path = REPO) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if pure:
        env["EDGEPROXY_PURE"] = "1"
    else:
        env.pop("EDGEPROXY_PURE", None)
    return env


def binary(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}") if os.access(p, os.X_OK)), None)


def command_output(cmd: list[str], env: dict[str, str] | None = None, cwd: Path = REPO) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, env=env, cwd=str(cwd))
        return (out.stdout + out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"


class Target:
    """One proxy (or none, for direct) in front of the echo backend."""

    name = ""
    #: more than one worker process or thread: compared with BEST_MULTI, not BEST_SINGLE
    multi = False

    def __init__(self, workdir: Path, backend_port: int):
        self.workdir = workdir
        self.backend_port = backend_port
        self.proc: subprocess.Popen | None = None
        self.port = backend_port
        self.logpath = workdir / f"{self.name}.log"

    def available(self) -> str | None:
        """None when it can run, else the reason it is skipped."""
        return None

    def version(self) -> str:
        return ""

    def command(self, port: int) -> tuple[list[str], dict[str, str] | None]:
        """The proxy's command line and environment; every target that starts a process has one."""
        raise TypeError(f"{type(self).__name__} starts no process of its own")

    def start(self) -> None:
        last = ""
        for _attempt in range(3):
            port = free_port()
            cmd, env = self.command(port)
            with open(self.logpath, "a") as logf:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                             env=env, preexec_fn=child_setup, cwd=str(self.workdir))
            if wait_port(port, self.proc, 15.0):
                self.port = port
                self.wait_children()
                return
            last = tail(self.logpath)
            stop_process(self.proc, signal.SIGKILL)
        raise RuntimeError(f"{self.name} did not start listening: {last}")

    def wait_children(self) -> None:
        pass

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc else []

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc)

    def log_problems(self) -> list[str]:
        try:
            text = self.logpath.read_text(errors="replace")
        except OSError:
            return []
        keys = ("error", "traceback", "exception", "critical", "alert", "emerg", "warning", "[warn]")
        return [line for line in text.splitlines() if any(k in line.lower() for k in keys)]


class Direct(Target):
    name = "direct"

    def start(self) -> None:
        self.port = self.backend_port

    def pids(self) -> list[int]:
        return []


class EdgeProxy(Target):
    name = "edgeproxy"
    pure = False
    workers = 1
    _version: str | None = None

    def available(self) -> str | None:
        text = self.version()
        if not text.startswith("edgeproxy"):
            return f"`python -m edgeproxy --version` failed: {text[-300:]}"
        return None

    def version(self) -> str:
        if self._version is None:
            self._version = command_output([sys.executable, "-m", "edgeproxy", "--version"], edgeproxy_env(self.pure))
        return self._version

    def command(self, port: int) -> tuple[list[str], dict[str, str] | None]:
        cfg = self.workdir / f"{self.name}.toml"
        cfg.write_text(
            # (only when not 1: a --base-tree from before the supervisor rejects the key)
            (f"workers = {self.workers}\n\n" if self.workers != 1 else "")
            + "[[listeners]]\n"
            f'bind = "127.0.0.1:{port}"\n'
            "backlog = 4096\n\n"
            "[[upstreams]]\n"
            'name = "echo"\n'
            f'servers = ["127.0.0.1:{self.backend_port}"]\n\n'
            "[[routes]]\n"
            'path_prefix = "/"\n'
            'upstream = "echo"\n\n'
            "[websocket]\n"
            "idle_timeout = 0\n\n"
            "[logging]\n"
            "access_log = false\n\n"
            "[admin]\n"  # enabled, as in production, on a free port
            'bind = "127.0.0.1:0"\n'
        )
        return [sys.executable, "-m", "edgeproxy", "run", "--config", str(cfg)], edgeproxy_env(self.pure)

    def wait_children(self) -> None:
        """With workers, the supervisor listens before its workers accept: wait until each says ready."""
        if self.workers == 1:
            return
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ready = self.logpath.read_text(errors="replace").count(" ready; admin on ")
            if ready >= self.workers and len(self.pids()) >= 1 + self.workers:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: {self.workers} workers not ready within 20 s: {tail(self.logpath)}")


class EdgeProxyW2(EdgeProxy):
    """``workers = 2``: a supervisor and two worker processes on SO_REUSEPORT sockets."""

    name = "edgeproxy-w2"
    workers = 2
    multi = True


class EdgeProxyPure(EdgeProxy):
    name = "edgeproxy-pure"
    pure = True


class EdgeProxyBase(EdgeProxy):
    """edgeproxy from another checkout (`--base-tree`): an A/B of two versions in one run.

    For example, the cost of a change on the hot path: `git worktree add /tmp/base
    <commit>`, build its extension in place, then `--targets edgeproxy,edgeproxy-base
    --base-tree /tmp/base`.
    """

    name = "edgeproxy-base"

    def available(self) -> str | None:
        if BASE_TREE is None:
            return "no --base-tree given"
        return super().available()

    def version(self) -> str:
        if self._version is None:
            # cwd matters: `python -m` puts it first on sys.path
            self._version = command_output([sys.executable, "-m", "edgeproxy", "--version"],
                                           edgeproxy_env(False, BASE_TREE), cwd=BASE_TREE) + f" [{BASE_TREE}]"
        return self._version

    def command(self, port: int) -> tuple[list[str], dict[str, str] | None]:
        cmd, _ = super().command(port)
        cfg = Path(cmd[-1])
        text = cfg.read_text()
        if not (BASE_TREE / "edgeproxy" / "metrics.py").exists():
            # a version from before the admin listener rejects the [admin] table
            text = text[: text.index("[admin]")]
        cfg.write_text(text)
        return cmd, edgeproxy_env(False, BASE_TREE)


class Nginx(Target):
    name = "nginx-w1"
    worker_processes = "1"

    def available(self) -> str | None:
        return None if binary("nginx") else "nginx not installed (apt-get install -y nginx)"

    def version(self) -> str:
        return command_output([binary("nginx"), "-v"])

    def command(self, port: int) -> tuple[list[str], dict[str, str] | None]:
        prefix = self.workdir / self.name  # one prefix (pid file, logs, temp) per nginx target
        for sub in ("logs", "tmp"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = prefix / "nginx.conf"
        conf.write_text(f"""{user}worker_processes {self.worker_processes};
worker_rlimit_nofile 20000;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;

events {{
    worker_connections 19500;
    use epoll;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    upstream echo {{
        server 127.0.0.1:{self.backend_port};
    }}

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout {LONG_TIMEOUT_S}s;
            proxy_send_timeout {LONG_TIMEOUT_S}s;
        }}
    }}
}}
""")
        return [binary("nginx"), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs" / "error.log")], None

    def expected_workers(self) -> int:
        # "auto": one per CPU nginx may run on (its own count, from the affinity mask)
        return len(os.sched_getaffinity(0)) if self.worker_processes == "auto" else int(self.worker_processes)

    def wait_children(self) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(self.pids()) < 1 + self.expected_workers():
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGQUIT)

    def log_problems(self) -> list[str]:
        self.logpath = self.workdir / self.name / "logs" / "error.log"
        problems = super().log_problems()
        # Graceful-shutdown chatter is not a problem.
        return [p for p in problems if "[notice]" not in p]


class NginxAuto(Nginx):
    """``worker_processes auto``: one worker per CPU."""

    name = "nginx-auto"
    worker_processes = "auto"
    multi = True


class HAProxy(Target):
    name = "haproxy-t1"
    #: the global nbthread line; None leaves HAProxy's default (one thread per CPU it may run on)
    nbthread: int | None = 1

    def available(self) -> str | None:
        return None if binary("haproxy") else "haproxy not installed (apt-get install -y haproxy)"

    def version(self) -> str:
        return command_output([binary("haproxy"), "-v"]).splitlines()[0]

    def command(self, port: int) -> tuple[list[str], dict[str, str] | None]:
        cfg = self.workdir / f"{self.name}.cfg"
        # Two sockets per proxied connection: 9,800 x 2 plus listeners stays under 20,000 fds.
        threads = f"    nbthread {self.nbthread}\n" if self.nbthread is not None else ""
        cfg.write_text(f"""global
{threads}    maxconn 9800

defaults
    mode http
    timeout connect 5s
    timeout client {LONG_TIMEOUT_S}s
    timeout server {LONG_TIMEOUT_S}s
    timeout tunnel {LONG_TIMEOUT_S}s
    timeout http-request 10s

frontend ws_in
    bind 127.0.0.1:{port}
    backlog 4096
    maxconn 9800
    default_backend echo

backend echo
    server echo1 127.0.0.1:{self.backend_port} maxconn 9800
""")
        return [binary("haproxy"), "-db", "-f", str(cfg)], None


class HAProxyDefault(HAProxy):
    """No nbthread: HAProxy's default number of threads."""

    name = "haproxy-default"
    nbthread = None
    multi = True


TARGET_CLASSES = {cls.name: cls for cls in (Direct, EdgeProxy, EdgeProxyW2, EdgeProxyPure, EdgeProxyBase, Nginx,
                                            NginxAuto, HAProxy, HAProxyDefault)}


# --------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------


class Sampler:
    """CPU time of proxy, backend and load generator at measure_start / measure_end."""

    def __init__(self, proxy_pids: list[int], backend_pid: int):
        self.proxy_pids = proxy_pids
        self.backend_pid = backend_pid
        self.marks: dict[str, dict[str, float]] = {}

    def __call__(self, msg: dict, proc: subprocess.Popen) -> None:
        event = msg.get("event")
        if event in ("measure_start", "measure_end"):
            self.marks[event] = {
                "t": time.monotonic(),
                "proxy": cpu_seconds(self.proxy_pids),
                "backend": cpu_seconds([self.backend_pid]),
                "loadgen": cpu_seconds([proc.pid]),
                **machine_cpu(),
            }

    def cpu(self) -> dict[str, float] | None:
        a, b = self.marks.get("measure_start"), self.marks.get("measure_end")
        if not a or not b:
            return None
        return {k: b[k] - a[k] for k in a}


def add_cpu(result: dict[str, Any], sampler: Sampler, has_proxy: bool) -> None:
    cpu = sampler.cpu()
    if cpu is None or "error" in result:
        return
    upgrades_mode = result.get("mode") == "upgrades"
    n = result.get("upgrades" if upgrades_mode else "messages", 0)
    wall = cpu["t"]
    result["cpu_window_s"] = round(wall, 3)
    for who in ("proxy", "backend", "loadgen"):
        if who == "proxy" and not has_proxy:
            continue
        result[f"{who}_cpu_s"] = round(cpu[who], 3)
        result[f"{who}_cpu_util"] = round(cpu[who] / wall, 3) if wall > 0 else None
    # CPU used by everything else on the machine during the window (other jobs = noise).
    # (irq/softirq time is reported apart: loopback TCP work of this run's own traffic lands there.)
    others = cpu["task"] - cpu["proxy"] - cpu["backend"] - cpu["loadgen"]
    if wall > 0:
        result["other_cpu_util"] = round(max(0.0, others) / wall, 3)
        result["softirq_util"] = round(cpu["irq"] / wall, 3)
        result["steal_util"] = round(cpu["steal"] / wall, 3)
    if not n:
        return
    if upgrades_mode:
        if has_proxy:
            result["proxy_cpu_us_per_upgrade"] = round(cpu["proxy"] * 1e6 / n, 1)
        result["backend_cpu_us_per_upgrade"] = round(cpu["backend"] * 1e6 / n, 1)
        return
    if has_proxy:
        # One echoed message = 2 frames through the proxy (client->backend, backend->client).
        result["proxy_cpu_us_per_echo"] = round(cpu["proxy"] * 1e6 / n, 2)
        result["proxy_cpu_us_per_frame"] = round(cpu["proxy"] * 1e6 / n / 2, 2)
    result["backend_cpu_us_per_echo"] = round(cpu["backend"] * 1e6 / n, 2)


# measurement key -> (loadgen mode, its extra arguments)
TRAFFIC: dict[str, tuple[str, Callable[[argparse.Namespace], list[str]]]] = {
    "echo_32": ("echo", lambda o: ["--conns", str(o.echo_conns), "--size", "32"]),
    "echo_1k": ("echo", lambda o: ["--conns", str(o.echo_conns), "--size", "1024"]),
    "pipelined": ("pipelined", lambda o: ["--conns", str(o.pipelined_conns), "--inflight", str(o.inflight),
                                          "--size", "32"]),
    "upgrades": ("upgrades", lambda o: ["--concurrency", str(o.upgrade_concurrency),
                                        "--src-addrs", "127.0.0.2-127.0.0.9"]),
}


def window(target: Target, backend_pid: int, mode: str, extra: list[str], duration: float, warmup: float,
           workdir: Path, label: str) -> dict[str, Any]:
    """One load-generator run against `target`, with the proxy's CPU sampled around its window."""
    proxy_pids = target.pids()
    sampler = Sampler(proxy_pids, backend_pid)
    url = f"ws://127.0.0.1:{target.port}/ws"
    result = run_loadgen([mode, "--url", url, "--duration", f"{duration:.3f}", "--warmup", f"{warmup:.3f}", *extra],
                         timeout=duration + warmup + 60, on_event=sampler, logdir=workdir,
                         name=f"{target.name}-{label}")
    add_cpu(result, sampler, bool(proxy_pids))
    return result


def traffic_window(target: Target, backend_pid: int, key: str, opts: argparse.Namespace, workdir: Path,
                   rnd: int) -> dict[str, Any]:
    mode, extra = TRAFFIC[key]
    warmup = min(1.0, opts.warmup) if mode == "upgrades" else opts.warmup
    return window(target, backend_pid, mode, extra(opts), opts.duration / opts.rounds, warmup, workdir,
                  f"{key}-r{rnd}")


SUM_KEYS = ("messages", "total_sent", "total_received", "verified", "lost", "mismatches", "fragmented",
            "unexpected_frames", "unexpected_disconnects", "close_lingering", "connect_errors", "errors",
            "no_close_reply", "close_timeouts", "upgrades", "total_upgrades", "stalled_conns", "duration_s",
            "cpu_window_s", "proxy_cpu_s", "backend_cpu_s", "loadgen_cpu_s")
MEDIAN_KEYS = ("msgs_per_s", "upgrades_per_s", "proxy_cpu_us_per_echo", "proxy_cpu_us_per_frame",
               "backend_cpu_us_per_echo", "proxy_cpu_us_per_upgrade", "backend_cpu_us_per_upgrade", "proxy_cpu_util",
               "backend_cpu_util", "loadgen_cpu_util", "other_cpu_util", "softirq_util", "steal_util")


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One figure set from the interleaved rounds: medians of rates, sums of counts.

    The median keeps one disturbed window (another job on a shared machine) from
    moving the figure; every correctness counter is summed, so a single bad echo in
    any round still shows.
    """
    ok = [r for r in rounds if "error" not in r]
    out: dict[str, Any] = {}
    if ok:
        first = ok[0]
        for k in ("mode", "url", "size", "inflight", "concurrency", "conns_requested", "warmup_s"):
            if k in first:
                out[k] = first[k]
        for k in SUM_KEYS:
            vals = [r[k] for r in ok if isinstance(r.get(k), (int, float))]
            if vals:
                out[k] = round(sum(vals), 3) if any(isinstance(v, float) for v in vals) else sum(vals)
        for k in MEDIAN_KEYS:
            vals = [r[k] for r in ok if isinstance(r.get(k), (int, float))]
            if vals:
                out[k] = round(statistics.median(vals), 3)
        if any("conns" in r for r in ok):
            out["conns"] = min(r.get("conns", 0) for r in ok)
        if any("per_conn_min" in r for r in ok):
            out["per_conn_min"] = min(r.get("per_conn_min", 0) for r in ok)
            out["per_conn_max"] = max(r.get("per_conn_max", 0) for r in ok)
        out["first_mismatch"] = next((r["first_mismatch"] for r in ok if r.get("first_mismatch")), None)
        for k in ("connect_error_samples", "error_samples"):
            merged: dict[str, int] = {}
            for r in ok:
                for msg, cnt in (r.get(k) or {}).items():
                    merged[msg] = merged.get(msg, 0) + cnt
            if any(k in r for r in ok):
                out[k] = merged
        for name in ("latency", "handshake_latency"):
            lats = [r[name] for r in ok if r.get(name)]
            if lats:
                out[name] = {
                    k: (sum(x[k] for x in lats) if k == "samples" else round(statistics.median(x[k] for x in lats), 4))
                    for k in lats[0]
                }
    bad = [f"round {i + 1}: {r['error']}" for i, r in enumerate(rounds) if "error" in r]
    if bad:
        out["error"] = "; ".join(bad)
    out["rounds"] = len(rounds)
    out["per_round"] = rounds
    return out


def idle(target: Target, backend_pid: int, opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Open opts.idle_conns connections, measure the proxy's (and backend's) memory growth."""
    proxy_pids = target.pids()
    n_src = max(2, math.ceil(opts.idle_conns / 1000))
    src = f"127.0.0.2-127.0.0.{1 + min(n_src, 250)}"
    url = f"ws://127.0.0.1:{target.port}/ws"
    before = {"proxy": memory_kib(proxy_pids), "backend": memory_kib([backend_pid]),
              "proxy_fds": fd_count(proxy_pids)}
    at: dict[str, Any] = {}

    def on_event(msg: dict, proc: subprocess.Popen) -> None:
        if msg.get("event") != "ready":
            return
        at["ready"] = msg
        time.sleep(opts.settle)
        at["proxy"] = memory_kib(proxy_pids)
        at["backend"] = memory_kib([backend_pid])
        at["proxy_fds"] = fd_count(proxy_pids)
        # CPU of the proxy (all its processes) while it only holds the idle connections:
        # heartbeats, timers, any per-tick sweep
        t0, cpu0 = time.monotonic(), cpu_seconds(proxy_pids)
        time.sleep(opts.idle_cpu_window)
        at["idle_cpu_s"], at["idle_cpu_window_s"] = cpu_seconds(proxy_pids) - cpu0, time.monotonic() - t0
        at["alive"] = target.alive()
        try:
            proc.stdin.write("release\n")
            proc.stdin.flush()
        except OSError:
            pass

    result = run_loadgen(["idle", "--url", url, "--conns", str(opts.idle_conns), "--src-addrs", src,
                          "--hold", str(60 + opts.settle + opts.idle_cpu_window), "--open-timeout", "150"],
                         timeout=300 + opts.idle_cpu_window, on_event=on_event, logdir=workdir,
                         name=f"{target.name}-idle")
    if "error" in result or "proxy" not in at:
        return result
    opened = result.get("conns", 0)
    result["settle_s"] = opts.settle
    result["backend_rss_kib_before"] = before["backend"]["rss_kib"]
    result["backend_rss_kib_after"] = at["backend"]["rss_kib"]
    if opened:
        result["backend_rss_kib_per_conn"] = round((at["backend"]["rss_kib"] - before["backend"]["rss_kib"]) / opened, 3)
    if proxy_pids:
        result["proxy_rss_kib_before"] = before["proxy"]["rss_kib"]
        result["proxy_rss_kib_after"] = at["proxy"]["rss_kib"]
        result["proxy_pss_kib_before"] = before["proxy"]["pss_kib"]
        result["proxy_pss_kib_after"] = at["proxy"]["pss_kib"]
        result["proxy_fds_before"] = before["proxy_fds"]
        result["proxy_fds_at_peak"] = at["proxy_fds"]
        result["proxy_alive_at_peak"] = at["alive"]
        result["proxy_idle_cpu_s"] = round(at["idle_cpu_s"], 3)
        result["idle_cpu_window_s"] = round(at["idle_cpu_window_s"], 3)
        result["proxy_idle_cpu_pct"] = round(100 * at["idle_cpu_s"] / at["idle_cpu_window_s"], 3)
        if opened:
            result["proxy_rss_kib_per_conn"] = round((at["proxy"]["rss_kib"] - before["proxy"]["rss_kib"]) / opened, 3)
            result["proxy_pss_kib_per_conn"] = round((at["proxy"]["pss_kib"] - before["proxy"]["pss_kib"]) / opened, 3)
        # Wait (bounded) for the proxy to release the sockets before the next measurement.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and fd_count(proxy_pids) > before["proxy_fds"] + 4:
            time.sleep(0.1)
        result["proxy_fds_after_close"] = fd_count(proxy_pids)
        result["proxy_rss_kib_after_close"] = memory_kib(proxy_pids)["rss_kib"]
    return result


def start_targets(targets: list[Target], results: dict[str, Any]) -> list[Target]:
    running = []
    for target in targets:
        reason = target.available()
        if reason:
            log(f"{target.name}: skipped: {reason}")
            results[target.name] = {"status": "skipped", "reason": reason}
            continue
        out: dict[str, Any] = {"status": "ok", "measurements": {}}
        results[target.name] = out
        if isinstance(target, EdgeProxy) and not target.pure and "compiled extension active" not in target.version():
            out["warning"] = (f"{target.version()!r}: measuring the pure-Python frame code; build the extension "
                              "with `python3 setup.py build_ext --inplace`")
        try:
            target.start()
        except Exception as exc:  # noqa: BLE001 - one target failing must not lose the others
            log(f"{target.name}: failed to start: {exc}")
            out.update(status="error", error=f"{type(exc).__name__}: {exc}")
            continue
        out["port"] = target.port
        out["pids"] = target.pids()
        out["processes"] = len(out["pids"])
        out["threads"] = thread_count(out["pids"])
        running.append(target)
    return running


def run_step(target: Target, results: dict[str, Any], label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if not target.alive():
        results[target.name]["status"] = f"proxy exited (code {target.proc.returncode})"
        return {"error": f"{target.name} is no longer running (exit code {target.proc.returncode})"}
    t0 = time.monotonic()
    r = fn()
    r["elapsed_s"] = round(time.monotonic() - t0, 2)
    log(f"{target.name}: {label}: {brief(label, r)}")
    if not target.alive():
        r["proxy_died"] = True
        results[target.name]["status"] = f"proxy exited (code {target.proc.returncode})"
    return r


def measure_all(targets: list[Target], backend: subprocess.Popen, opts: argparse.Namespace, workdir: Path,
                results: dict[str, Any]) -> None:
    """All proxies run side by side (idle ones cost nothing); windows of different targets interleave."""
    running = start_targets(targets, results)
    try:
        # 1. Per target, on the fresh process: a short warm-up, then the idle-connection memory figure.
        for target in running:
            m = results[target.name]["measurements"]
            m["warmup"] = run_step(target, results, "warmup", lambda: window(
                target, backend.pid, "echo", ["--conns", "10", "--size", "32"], min(0.5, opts.duration),
                min(0.2, opts.warmup), workdir, "warmup"))
            m["idle"] = run_step(target, results, "idle", lambda: idle(target, backend.pid, opts, workdir))
            if backend.poll() is not None:
                raise RuntimeError(f"echo backend exited: {tail(workdir / 'backend.stderr')}")
        # 2. Traffic: each measurement in --rounds rounds; every round visits every target (rotated order),
        #    so a disturbance from outside hits all targets alike instead of one.
        for key in TRAFFIC:
            per: dict[str, list[dict[str, Any]]] = {t.name: [] for t in running}
            for rnd in range(opts.rounds):
                shift = rnd % max(1, len(running))
                for target in running[shift:] + running[:shift]:
                    label = key if opts.rounds == 1 else f"{key} round {rnd + 1}/{opts.rounds}"
                    per[target.name].append(run_step(
                        target, results, label, lambda: traffic_window(target, backend.pid, key, opts, workdir, rnd)))
                    if backend.poll() is not None:
                        raise RuntimeError(f"echo backend exited: {tail(workdir / 'backend.stderr')}")
            for target in running:
                results[target.name]["measurements"][key] = combine(per[target.name])
    finally:
        for target in running:
            target.stop()
            out = results[target.name]
            problems = target.log_problems()
            if problems:
                out["log_problems"] = {"count": len(problems), "samples": problems[:10]}
            if target.proc is not None and target.logpath.exists():
                out["log_tail"] = tail(target.logpath, 10)


def brief(label: str, r: dict[str, Any]) -> str:
    key = label.split()[0]
    if "error" in r:
        return "ERROR " + r["error"]
    if key == "idle":
        return (f"{r.get('conns')} conns up in {r.get('open_s')}s, "
                f"proxy {r.get('proxy_rss_kib_per_conn', '-')} KiB/conn and {r.get('proxy_idle_cpu_pct', '-')}% CPU, "
                f"backend {r.get('backend_rss_kib_per_conn')} KiB/conn")
    if key == "upgrades":
        return f"{r.get('upgrades_per_s')} upgrades/s, errors {r.get('errors')}"
    lat = r.get("latency", {})
    return (f"{r.get('msgs_per_s')} msgs/s p50 {lat.get('p50_ms', '-')} ms p99 {lat.get('p99_ms', '-')} ms, "
            f"proxy {r.get('proxy_cpu_us_per_echo', '-')} us/echo, mismatches {r.get('mismatches')}, lost {r.get('lost')}")


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

# (key, header, path into a target's results, format, better: "high", "low" or None = not a figure to rank)
COLUMNS = [
    ("echo32_mps", "echo 32B msgs/s", ("measurements", "echo_32", "msgs_per_s"), "{:,.0f}", "high"),
    ("echo32_p50", "echo 32B p50 ms", ("measurements", "echo_32", "latency", "p50_ms"), "{:.2f}", "low"),
    ("echo32_p99", "echo 32B p99 ms", ("measurements", "echo_32", "latency", "p99_ms"), "{:.2f}", "low"),
    ("echo1k_mps", "echo 1KiB msgs/s", ("measurements", "echo_1k", "msgs_per_s"), "{:,.0f}", "high"),
    ("echo1k_p50", "echo 1KiB p50 ms", ("measurements", "echo_1k", "latency", "p50_ms"), "{:.2f}", "low"),
    ("echo1k_p99", "echo 1KiB p99 ms", ("measurements", "echo_1k", "latency", "p99_ms"), "{:.2f}", "low"),
    ("pipe_mps", "pipelined msgs/s", ("measurements", "pipelined", "msgs_per_s"), "{:,.0f}", "high"),
    ("upgrades", "upgrades/s", ("measurements", "upgrades", "upgrades_per_s"), "{:,.0f}", "high"),
    ("hs_p50", "handshake p50 ms", ("measurements", "upgrades", "handshake_latency", "p50_ms"), "{:.2f}", "low"),
    ("hs_p99", "handshake p99 ms", ("measurements", "upgrades", "handshake_latency", "p99_ms"), "{:.2f}", "low"),
    ("cpu32", "proxy CPU us/echo 32B", ("measurements", "echo_32", "proxy_cpu_us_per_echo"), "{:.1f}", "low"),
    ("cpu1k", "proxy CPU us/echo 1KiB", ("measurements", "echo_1k", "proxy_cpu_us_per_echo"), "{:.1f}", "low"),
    ("cpupipe", "proxy CPU us/echo pipelined", ("measurements", "pipelined", "proxy_cpu_us_per_echo"), "{:.1f}",
     "low"),
    ("cpuupg", "proxy CPU us/upgrade", ("measurements", "upgrades", "proxy_cpu_us_per_upgrade"), "{:.0f}", "low"),
    ("idle_cpu", "proxy CPU % idle conns", ("measurements", "idle", "proxy_idle_cpu_pct"), "{:.2f}", "low"),
    ("rss", "proxy RSS KiB/idle conn", ("measurements", "idle", "proxy_rss_kib_per_conn"), "{:.2f}", "low"),
    ("idle_conns", "idle conns held", ("measurements", "idle", "conns"), "{:,.0f}", None),
    ("processes", "proxy processes", ("processes",), "{:d}", None),
    ("threads", "proxy threads", ("threads",), "{:d}", None),
]
RANKED = {key: better for key, _h, _p, _f, better in COLUMNS if better}


def dig(d: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def summary(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        if r.get("status") == "skipped":
            continue
        out[name] = {key: dig(r, path) for key, _h, path, _f, _b in COLUMNS}
    return out


def _ratio(a: Any, b: Any) -> float | None:
    ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
    return round(a / b, 3) if ok else None


def ratios(summ: dict[str, dict[str, Any]], ref: str) -> dict[str, dict[str, float | None]]:
    """``target / ref`` per figure, for every target but `ref`."""
    if ref not in summ:
        return {}
    return {name: {key: _ratio(row.get(key), summ[ref].get(key)) for key in RANKED}
            for name, row in summ.items() if name != ref}


def best_of(summ: dict[str, dict[str, Any]], names: tuple[str, ...]) -> dict[str, Any]:
    """Per figure, the better value among `names` (the higher rate, the lower latency, CPU or memory)."""
    out: dict[str, Any] = {}
    for key, better in RANKED.items():
        vals = [summ[n][key] for n in names if n in summ and isinstance(summ[n].get(key), (int, float))]
        out[key] = (max(vals) if better == "high" else min(vals)) if vals else None
    return out


def edgeproxy_vs_best(summ: dict[str, dict[str, Any]], multi: set[str]) -> dict[str, dict[str, Any]]:
    """Every edgeproxy target divided by the best of BEST_SINGLE (BEST_MULTI for targets in `multi`)."""
    out: dict[str, dict[str, Any]] = {}
    for refs in (BEST_SINGLE, BEST_MULTI):
        present = [n for n in refs if n in summ]
        names = [n for n in summ if n.startswith("edgeproxy") and (n in multi) == (refs is BEST_MULTI)]
        if not present or not names:
            continue
        best = best_of(summ, tuple(present))
        out[" / ".join(present)] = {n: {key: _ratio(summ[n].get(key), best[key]) for key in RANKED} for n in names}
    return out


#: (multi, single) pairs whose ratio shows how each proxy scales with a second core
SCALING = [("edgeproxy-w2", "edgeproxy"), ("nginx-auto", "nginx-w1"), ("haproxy-default", "haproxy-t1")]


def scaling(summ: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    return {f"{m} / {s}": {key: _ratio(summ[m].get(key), summ[s].get(key)) for key in RANKED}
            for m, s in SCALING if m in summ and s in summ}


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt_row = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt_row(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt_row(r) for r in rows]
    return "\n".join(lines)


def render_markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def tables(summ: dict[str, dict[str, Any]], comparisons: dict[str, dict[str, dict[str, Any]]]
           ) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows): the figures, then one table of ratios per comparison."""
    out = []
    names = list(summ)
    if names:
        rows = [[header] + [fmt.format(summ[n][key]) if summ[n][key] is not None else "-" for n in names]
                for key, header, _path, fmt, _b in COLUMNS]
        out.append(("", ["metric"] + names, rows))
    for title, table in comparisons.items():
        cols = list(table)
        rows = []
        for key, header, _path, _fmt, better in COLUMNS:
            vals = [table[c].get(key) for c in cols] if better else [None]
            if any(v is not None for v in vals):
                rows.append([header] + [f"{v:.2f}x" if v is not None else "-" for v in vals])
        if rows:
            out.append((title, ["metric"] + cols, rows))
    return out


def comparisons_of(summ: dict[str, dict[str, Any]], all_ratios: dict[str, Any], multi: set[str]
                   ) -> dict[str, dict[str, dict[str, Any]]]:
    out = {f"edgeproxy / best of {refs}": table for refs, table in edgeproxy_vs_best(summ, multi).items()}
    out.update({"scaling with more processes or threads (multi / single)": scaling(summ)} if scaling(summ) else {})
    out.update({f"ratio to {ref} (target / {ref})": table for ref, table in all_ratios.items() if table})
    return out


def notes_of(results: dict[str, Any]) -> list[str]:
    notes = []
    for name, r in results.items():
        if r.get("status") == "skipped":
            notes.append(f"{name}: skipped: {r.get('reason')}")
            continue
        if r.get("warning"):
            notes.append(f"{name}: {r['warning']}")
        if r.get("status") not in ("ok", None):
            notes.append(f"{name}: {r.get('status')}: {r.get('error', '')}")
        for key, m in r.get("measurements", {}).items():
            bad = {k: m.get(k) for k in ("error", "mismatches", "lost", "connect_errors", "errors", "unexpected_disconnects",
                                          "dropped_while_idle", "close_lingering", "no_close_reply", "close_timeouts",
                                          "stalled_conns", "fragmented", "unexpected_frames")
                   if m.get(k)}
            if bad:
                notes.append(f"{name} {key}: {bad}")
        busiest = max((w.get("other_cpu_util") or 0.0 for m in r.get("measurements", {}).values()
                       for w in m.get("per_round", [m])), default=0.0)
        if busiest > 0.25:
            notes.append(f"{name}: other processes used up to {busiest:.2f} CPU cores during a measured window "
                         f"(shared machine: treat these figures as noisy)")
        if r.get("log_problems"):
            notes.append(f"{name}: {r['log_problems']['count']} problem line(s) in its log, e.g. "
                         f"{r['log_problems']['samples'][0][:200]}")
    return notes


def report(command: str, summ: dict[str, dict[str, Any]], comparisons: dict[str, Any], results: dict[str, Any],
           markdown: bool = False) -> str:
    """The figures and ratio tables as text (or Markdown), headed by the command that made them."""
    parts = [f"`{command}`" if markdown else f"command: {command}"]
    for title, headers, rows in tables(summ, comparisons):
        if markdown and title.startswith("ratio to "):
            continue  # for RESULTS.md the figures, edgeproxy against the best and the scaling are enough
        body = render_markdown(headers, rows) if markdown else render_table(headers, rows)
        parts.append(f"{title}:{chr(10) * (2 if markdown else 1)}{body}" if title else body)
    notes = notes_of(results)
    if notes:
        parts.append("notes:\n" + ("\n" if markdown else "") + "\n".join(f"  - {n}" for n in notes))
    return "\n\n".join(parts)


def machine_info(targets: list[Target]) -> dict[str, Any]:
    import importlib.metadata as md

    def pkg(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "picows": pkg("picows"),
        "uvloop": pkg("uvloop"),
        "aiofastnet_installed_but_unused": pkg("aiofastnet"),
        "nofile_limit": raise_nofile_limit(),
    }
    for t in targets:
        if t.available() is None and t.name != "direct":
            info[f"{t.name}_version"] = t.version()
    return info


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="WebSocket reverse-proxy load benchmark (loopback only).")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help=f"comma-separated, from {','.join(TARGET_CLASSES)} (default {','.join(ALL_TARGETS)}; "
                        f"also accepted: {', '.join(f'{a} = {n}' for a, n in ALIASES.items())})")
    p.add_argument("--duration", type=float, default=None,
                   help="measured seconds per target and measurement, split over --rounds windows (default 10; --quick 0.6)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved windows per target and measurement; figures are their median (default 3; --quick 1)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of traffic before each window (default 1; --quick 0.2)")
    p.add_argument("--idle-conns", type=int, default=None, help="idle connections for the memory figure (default 9000; --quick 300)")
    p.add_argument("--idle-cpu-window", type=float, default=None,
                   help="seconds the proxy's CPU is measured while it holds the idle connections (default 30, "
                        "one default heartbeat interval; --quick 0.5)")
    p.add_argument("--echo-conns", type=int, default=100)
    p.add_argument("--pipelined-conns", type=int, default=10)
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--upgrade-concurrency", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="a few-second version (for the smoke test)")
    p.add_argument("--out", default=str(HERE / "results.json"), help="JSON output path ('-' = none)")
    p.add_argument("--markdown", default=None, help="also write the tables as Markdown to this file (for RESULTS.md)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir with configs and logs")
    p.add_argument("--base-tree", type=Path, default=None,
                   help="another edgeproxy checkout for the edgeproxy-base target (an A/B of two versions)")
    args = p.parse_args(argv)
    args.targets = list(dict.fromkeys(ALIASES.get(t.strip(), t.strip()) for t in args.targets.split(",") if t.strip()))
    unknown = [t for t in args.targets if t not in TARGET_CLASSES]
    if unknown:
        p.error(f"unknown target(s) {unknown}; choose from {', '.join(TARGET_CLASSES)}")
    if args.base_tree is not None:
        if not (args.base_tree / "edgeproxy" / "__init__.py").is_file():
            p.error(f"--base-tree {args.base_tree}: no edgeproxy package there")
        global BASE_TREE
        BASE_TREE = args.base_tree.resolve()
        args.base_tree = str(BASE_TREE)  # (the JSON report holds the options)
    if args.duration is None:
        args.duration = 0.6 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 0.2 if args.quick else 1.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if not 1 <= args.rounds <= 10:
        p.error("--rounds must be 1..10")
    if args.idle_conns is None:
        args.idle_conns = 300 if args.quick else 9000
    if args.idle_cpu_window is None:
        args.idle_cpu_window = 0.5 if args.quick else 30.0
    if not 0 < args.idle_cpu_window <= 120:
        p.error("--idle-cpu-window must be in (0, 120]")
    if not 1 <= args.idle_conns <= 9500:
        p.error("--idle-conns must be 1..9500 (open files are capped at 20,000 per process)")
    if args.duration <= 0 or args.duration > 120 or args.warmup < 0 or args.warmup > 60:
        p.error("--duration must be in (0, 120] and --warmup in [0, 60]")
    args.settle = 0.3 if args.quick else 1.5
    return args


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    raise_nofile_limit()
    try:
        import picows  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError as exc:
        print(f"error: {exc}; install the dev extras (pip install -e '.[dev]') or `pip install picows uvloop`",
              file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="edgeproxy-load-"))
    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.monotonic()
    backend = None
    results: dict[str, Any] = {}
    machine: dict[str, Any] = {}
    fatal: str | None = None
    try:
        backend = subprocess.Popen(
            [sys.executable, str(HERE / "echo_backend.py"), "--port", "0", "--max-lifetime", "3000"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=open(workdir / "backend.stderr", "w"),
            text=True, preexec_fn=child_setup, cwd=str(HERE),
        )
        ready = JsonLines(backend).get(20)
        if not ready or ready.get("event") != "ready":
            raise RuntimeError(f"echo backend did not start: {ready} {tail(workdir / 'backend.stderr')}")
        backend_port = ready["port"]
        log(f"echo backend on 127.0.0.1:{backend_port} (pid {backend.pid}); work dir {workdir}")

        targets = [TARGET_CLASSES[name](workdir, backend_port) for name in opts.targets]
        machine.update(machine_info(targets))
        machine["loadavg_at_start"] = loadavg()
        measure_all(targets, backend, opts, workdir, results)
        machine["loadavg_at_end"] = loadavg()
    except Exception as exc:  # noqa: BLE001 - report what was measured before the failure
        log(f"run failed: {type(exc).__name__}: {exc}")
        fatal = f"{type(exc).__name__}: {exc}"
    finally:
        stop_process(backend)

    exit_code = 1 if fatal or any(r.get("status") not in ("ok", "skipped") for r in results.values()) else 0
    summ = summary(results)
    all_ratios = {ref: ratios(summ, ref) for ref in REFERENCES}
    multi = {name for name in opts.targets if TARGET_CLASSES[name].multi}
    comparisons = comparisons_of(summ, all_ratios, multi)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    text = report(command, summ, comparisons, results)
    if fatal:
        text += f"\n\nrun failed: {fatal}"
    print(text)
    if opts.markdown:
        Path(opts.markdown).write_text(
            f"Run of {started.isoformat(timespec='seconds')} on {machine.get('nproc')} CPUs "
            f"({machine.get('cpu_model', '')}), load average {machine.get('loadavg_at_start')} at the start; "
            f"medians of {opts.rounds} interleaved rounds.\n\n" + report(command, summ, comparisons, results, True) + "\n")
        log(f"wrote {opts.markdown}")
    doc = {
        "date": started.isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "command": command,
        "machine": machine,
        "fatal_error": fatal,
        "settings": {k: v for k, v in vars(opts).items() if k not in ("out", "keep_tmp")},
        "units": {
            "msgs_per_s": "echoed messages (round trips) completed per second, all connections together",
            "proxy_cpu_us_per_echo": "proxy utime+stime per echoed message; one echo = 2 frames relayed "
                                     "(client->backend and back); proxy_cpu_us_per_frame is half of it",
            "proxy_rss_kib_per_conn": "(proxy VmRSS with the idle connections open - before) / connections, "
                                      "summed over the proxy's processes",
        },
        "summary": summ,
        "ratios": all_ratios,
        "comparisons": comparisons,
        "targets": results,
    }
    if opts.out != "-":
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {opts.out}")
    if opts.keep_tmp:
        log(f"configs and logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())

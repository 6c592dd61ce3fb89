"""Bounded soak test with faults: many WebSocket clients exchanging numbered messages through edgeproxy.

    python benchmarks/soak/soak.py --clients 1000 --duration 120 [--tls] [--workers 2] [--faults backend_kill,...]

What runs:

* edgeproxy as production runs it, ``python -m edgeproxy run --config FILE``:
  with ``--workers 2`` (the default) a supervisor and two worker processes
  sharing the listening port (SO_REUSEPORT), with ``--workers 1`` one process;
  two echo backends (``benchmarks/load/echo_backend.py``) as processes that can
  really be killed;
* ``--clients`` WebSocket clients in this process.  Each sends a numbered text
  message every ``--interval`` seconds and checks that the echoes come back in
  order, complete and once.  A client whose session ends reconnects (backing off
  on a 503) and goes on with a new session;
* faults, each on its own schedule (``--faults``, default all):

  - ``backend_kill``: SIGKILL one backend, restart it on the same port 1.5 s later
    (never both at once);
  - ``client_drop``: a client aborts its TCP connection without a close frame;
  - ``tls_reload``: SIGHUP with the file unchanged (certificates re-read), with ``--tls``;
  - ``config_reload``: the config file changes (the upstream's servers swap places
    and its balancing switches between least_conn and round_robin), then SIGHUP;
  - ``worker_kill`` (``--workers`` > 1): SIGKILL to the worker of the last slot;
    the supervisor must start a replacement, which the harness waits for;
  - ``bad_input``: a hostile input on a fresh connection (request smuggling, an
    unmasked or reserved-opcode frame, a header drip), whose answer is checked.

At the end the clients stop sending, wait for the echoes still in flight, and
close.  The JSON report (stdout) proves, or disproves:

* every message was echoed, or its session ended with a close frame carrying a
  code (the loss was *reported* to its sender), or its own client dropped it, or
  it was on a connection held by the worker the harness killed
  (``lost_with_worker_kill``: a SIGKILLed process sends no close frame; the client
  library reports 1006, abnormal closure).  Which connections the victim held is
  read from /proc while it is stopped (SIGSTOP) just before the SIGKILL, so only
  those are counted there; ``silently_lost`` counts the rest and must be 0;
* no echo came out of order, twice or altered (``corrupt``);
* memory and descriptors, for every process of the proxy (supervisor and
  workers; the tree's totals are reported too): no process's RSS grows from one
  round to the next or ends far above its warm baseline, a replacement worker's
  RSS ends near a warm worker's, and the tree's open descriptors at the end equal
  the warm baseline.  The worker kills always hit the last slot, so the other
  worker and the supervisor live through the run and carry the growth verdict; a
  replacement starts cold and would hide growth in a plain total.  Every
  measurement waits a settle time that covers the proxy's heap trim interval
  (``[limits] heap_trim_interval``), so each one sees memory the proxy holds,
  not what glibc has not been asked to give back yet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import uvloop
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BACKEND = os.path.join(ROOT, "benchmarks", "load", "echo_backend.py")
ALL_FAULTS = ("backend_kill", "client_drop", "tls_reload", "config_reload", "worker_kill", "bad_input")


# --------------------------------------------------------------------------- #
# processes
# --------------------------------------------------------------------------- #


async def start_process(args: list[str], env: dict | None = None) -> tuple[asyncio.subprocess.Process, dict]:
    proc = await asyncio.create_subprocess_exec(sys.executable, *args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                env={**os.environ, **(env or {})})
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    return proc, json.loads(line)


def proc_stats(pid: int) -> tuple[int, int] | None:
    """(RSS in KiB, open file descriptors) of a live process, from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            rss = next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), None)
        return None if rss is None else (rss, len(os.listdir(f"/proc/{pid}/fd")))
    except (FileNotFoundError, ProcessLookupError):
        return None


def peer_ports(pid: int, port: int) -> set[int]:
    """The client-side ports of the TCP connections process `pid` holds on local port `port` (IPv4 loopback)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    peers = set()
    with open(f"/proc/{pid}/net/tcp") as fh:
        next(fh)
        for line in fh:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(local.split(":")[1], 16) == port:
                peers.add(int(remote.split(":")[1], 16))
    return peers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proxy:
    """edgeproxy as production runs it: ``python -m edgeproxy run --config FILE``, its log in a file.

    With ``workers`` > 1 the process is the supervisor; what it and its workers
    log (the supervisor's ``worker N started (pid P)`` and ``... ready`` lines)
    tells which pid serves which slot.
    """

    def __init__(self, config: str, workers: int, env: dict, log_path: str):
        self.config = config
        self.workers = workers
        self.env = env
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        #: slot -> pid of its latest worker, and the pids that said ready
        self.slots: dict[int, int] = {}
        self.ready: set[int] = set()
        self.lines: Counter = Counter()
        self._offset = 0
        self._partial = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edgeproxy", "run", "--config", self.config,
                stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **self.env}, cwd=ROOT)
        deadline = time.monotonic() + 30
        while not self.all_ready():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                with open(self.log_path, errors="replace") as fh:
                    raise RuntimeError(f"edgeproxy did not start; its log ends:\n{fh.read()[-2000:]}")
            await asyncio.sleep(0.1)

    _EVENTS = (
        ("started", re.compile(r"worker (\d+) started \(pid (\d+)\)")),
        ("ready", re.compile(r"worker (\d+) \(pid (\d+)\) ready")),
        ("listening", re.compile(r"listening on \S+ \(")),
        ("config_applied", re.compile(r"reload: applied version \w+ \(changed: (?!nothing)")),
        ("certificates_reread", re.compile(r"re-read the certificates of [1-9]")),
        ("reload_failed", re.compile(r"could not reload|reload failed|reload: the configuration is invalid")),
        ("traceback", re.compile(r"^Traceback")),
    )

    def poll_log(self) -> None:
        """Read what the proxy logged since the last call; count the events in `_EVENTS`, note pids and slots."""
        with open(self.log_path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            for name, pattern in self._EVENTS:
                match = pattern.search(line)
                if match is None:
                    continue
                self.lines[name] += 1
                if name == "started":
                    self.slots[int(match[1])] = int(match[2])
                elif name == "ready":
                    self.ready.add(int(match[2]))
                break

    def all_ready(self) -> bool:
        """Every slot has a worker that said ready (one process: it is listening)."""
        self.poll_log()
        if self.workers == 1:
            return self.lines["listening"] > 0
        return len(self.slots) == self.workers and all(pid in self.ready for pid in self.slots.values())

    def processes(self) -> dict[str, int]:
        """Role -> pid of every process of the proxy: the supervisor (or the one process) and the workers."""
        if self.workers == 1:
            return {"proxy": self.pid}
        return {"supervisor": self.pid, **{f"worker {slot}": pid for slot, pid in sorted(self.slots.items())}}

    def stats(self) -> dict[str, tuple[int, int, int]]:
        """Role -> (pid, RSS KiB, fds) of the live processes."""
        out = {}
        for role, pid in self.processes().items():
            got = proc_stats(pid)
            if got is not None:
                out[role] = (pid, *got)
        return out

    async def wait_all_ready(self, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while not self.all_ready():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def kill_worker(self, slot: int, port: int) -> tuple[int, set[int]] | None:
        """SIGKILL the ready worker of `slot`; (its pid, the client ports of the connections it held), or None.

        It is stopped (SIGSTOP) first, so the connections read from /proc are all
        it held when it died: a stopped process accepts nothing more.
        """
        self.poll_log()
        pid = self.slots.get(slot)
        if pid is None or pid not in self.ready:
            return None
        os.kill(pid, signal.SIGSTOP)
        try:
            peers = peer_ports(pid, port)
        finally:
            os.kill(pid, signal.SIGKILL)
        return pid, peers

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class Backend:
    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.kills = 0
        self.up = False

    async def start(self) -> None:
        self.proc, ready = await start_process([BACKEND, "--port", str(self.port)])
        self.port = ready["port"]
        self.up = True

    async def kill_and_restart(self, downtime: float) -> None:
        self.up = False
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        self.kills += 1
        await asyncio.sleep(downtime)
        for _ in range(50):  # the port may linger a moment
            try:
                await self.start()
                return
            except (json.JSONDecodeError, asyncio.TimeoutError, ValueError):
                await asyncio.sleep(0.1)
        raise RuntimeError("backend did not come back")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


def make_certs(directory: str) -> tuple[str, str, str]:
    """A CA and a certificate for 127.0.0.1/localhost, made with the openssl CLI."""
    sys.path.insert(0, ROOT)
    from tests.certs import CertFactory

    factory = CertFactory(directory)
    leaf = factory.leaf("localhost", ["DNS:localhost", "IP:127.0.0.1"])
    return factory.ca_cert, leaf.cert, leaf.key


def write_config(path: str, args: argparse.Namespace, port: int, backends: list[Backend], tls: tuple[str, str] | None,
                 variant: int = 0) -> None:
    """The proxy's config; `variant` (a config reload) swaps the servers' order and the balancing, both harmless.

    Written to a temporary file and renamed, so a reload never reads half a file.
    """
    listener = f'[[listeners]]\nbind = "127.0.0.1:{port}"\nbacklog = 4096\n'
    if tls:
        listener += f'tls_cert = "{tls[0]}"\ntls_key = "{tls[1]}"\n'
    addresses = [f'"127.0.0.1:{b.port}"' for b in backends]
    if variant % 2:
        addresses.reverse()
    balance = ("least_conn", "round_robin")[variant % 2]
    text = (
        f"workers = {args.workers}\n\n{listener}\n[[upstreams]]\nname = \"echo\"\nservers = [{', '.join(addresses)}]\n"
        f"connect_timeout = 2.0\nbalance = \"{balance}\"\n[upstreams.health]\nmax_fails = 0\n\n"
        f"[[routes]]\nupstream = \"echo\"\n\n[http]\nheader_timeout = {args.header_timeout}\n\n"
        f"[websocket]\nclose_timeout = 2.0\nmax_message_size = 65536\n\n"
        f"[limits]\nip_connection_rate = 0\nheap_trim_interval = {args.heap_trim_interval}\n\n"
        f"[logging]\naccess_log = false\nlevel = \"info\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n"
    )
    with open(path + ".new", "w") as fh:
        fh.write(text)
    os.replace(path + ".new", path)


# --------------------------------------------------------------------------- #
# clients
# --------------------------------------------------------------------------- #


@dataclass
class Totals:
    sent: int = 0
    delivered: int = 0
    reported_lost: int = 0
    dropped_by_client: int = 0
    lost_with_worker_kill: int = 0
    silently_lost: int = 0
    corrupt: int = 0
    sessions: int = 0
    refused_503: int = 0
    connect_errors: int = 0
    close_codes: Counter = field(default_factory=Counter)


class Client:
    def __init__(self, cid: int, url: str, ssl_context, interval: float, totals: Totals, rng: random.Random):
        self.cid = cid
        self.url = url
        self.ssl = ssl_context
        self.interval = interval
        self.t = totals
        self.rng = rng
        self.ws = None
        #: the session whose connection a killed worker held (set by the harness, read when it ends)
        self.killed_ws = None
        self.sending = True
        self.drop_requested = False
        self.session = 0
        self.unacked: list[int] = []

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            try:
                kwargs = {"ssl": self.ssl} if self.ssl else {}
                self.ws = await connect(self.url, compression=None, ping_interval=None, open_timeout=10,
                                        close_timeout=3, max_size=None, proxy=None, **kwargs)
            except InvalidStatus as exc:
                if exc.response.status_code == 503:
                    self.t.refused_503 += 1
                else:
                    self.t.connect_errors += 1
                await asyncio.sleep(backoff * (1 + self.rng.random()))
                backoff = min(backoff * 2, 2.0)
                continue
            except (OSError, asyncio.TimeoutError, ConnectionClosed, InvalidHandshake, ssl.SSLError, EOFError):
                self.t.connect_errors += 1
                await asyncio.sleep(backoff * (1 + self.rng.random()))
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            self.session += 1
            self.t.sessions += 1
            await self._session(stop)

    async def _session(self, stop: asyncio.Event) -> None:
        ws = self.ws
        self.unacked = []
        self.drop_requested = False  # the previous session's receiver has finished counting
        receiver = asyncio.get_running_loop().create_task(self._receive(ws))
        seq = 0
        try:
            await asyncio.sleep(self.rng.random() * self.interval)
            while not stop.is_set() and self.sending and not receiver.done():
                seq += 1
                self.unacked.append(seq)
                self.t.sent += 1
                await ws.send(f"{self.cid}:{self.session}:{seq}")
                await asyncio.sleep(self.interval)
        except ConnectionClosed:
            pass
        if not receiver.done() and not self.drop_requested:
            # drain: wait for the echoes still in flight, then close normally
            deadline = time.monotonic() + 5
            while self.unacked and not receiver.done() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if not receiver.done():
                with contextlib.suppress(Exception):
                    await ws.close()
        await asyncio.gather(receiver, return_exceptions=True)

    async def _receive(self, ws) -> None:
        prefix = f"{self.cid}:{self.session}:"
        try:
            async for message in ws:
                if not isinstance(message, str) or not message.startswith(prefix) or not self.unacked \
                        or int(message[len(prefix):]) != self.unacked[0]:
                    self.t.corrupt += 1
                    continue
                self.unacked.pop(0)
                self.t.delivered += 1
        except ConnectionClosed:
            pass
        code = ws.close_code if ws.protocol.close_rcvd is not None else None
        if self.drop_requested:
            self.t.dropped_by_client += len(self.unacked)
            self.t.close_codes["client_drop"] += 1
        elif code is None and ws is self.killed_ws:
            # no close frame can come from a SIGKILLed process: the library reports 1006 (abnormal closure)
            self.t.lost_with_worker_kill += len(self.unacked)
            self.t.close_codes[f"{ws.close_code} (worker killed)"] += 1
        elif code is None:
            self.t.silently_lost += len(self.unacked)
            self.t.close_codes["no close frame"] += 1
        else:
            self.t.reported_lost += len(self.unacked)
            self.t.close_codes[str(code)] += 1
        self.unacked = []

    def local_port(self) -> int | None:
        """The client-side port of the session's connection (None without one, or once it is closed)."""
        ws = self.ws
        if ws is None or ws.protocol.state.name == "CLOSED":
            return None
        name = ws.transport.get_extra_info("sockname")
        return name[1] if name else None

    def drop(self) -> bool:
        """Abort the TCP connection without a close frame (a client that vanishes)."""
        ws = self.ws
        if ws is None or ws.protocol.state.name != "OPEN":
            return False
        self.drop_requested = True
        ws.transport.abort()
        return True


# --------------------------------------------------------------------------- #
# faults
# --------------------------------------------------------------------------- #

BAD_INPUTS = ("smuggle_cl_te", "smuggle_te_obfuscated", "unmasked_frame", "reserved_opcode", "header_drip")
UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: soak\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


async def bad_input(kind: str, port: int, ssl_context, header_timeout: float) -> str:
    """Send one hostile input; "" when the proxy gave the RFC's answer, else what it gave instead.

    The frame probes need a WebSocket first; when the soak has just killed the
    backends, the upgrade is answered 502/503 (the right answer for a dead
    upstream), and the probe tries again, a bounded number of times.
    """
    for _attempt in range(10):
        verdict = await _bad_input_once(kind, port, ssl_context, header_timeout)
        if not verdict.startswith("no 101: b'HTTP/1.1 50"):
            return verdict
        await asyncio.sleep(0.3)
    return verdict


async def _bad_input_once(kind: str, port: int, ssl_context, header_timeout: float) -> str:
    kwargs = {"ssl": ssl_context, "server_hostname": "localhost"} if ssl_context else {}
    reader, writer = await asyncio.open_connection("127.0.0.1", port, **kwargs)
    try:
        if kind == "smuggle_cl_te":
            writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            expected, data = b"HTTP/1.1 400", await asyncio.wait_for(reader.readexactly(12), 10)
        elif kind == "smuggle_te_obfuscated":
            writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n")
            expected, data = b"HTTP/1.1 400", await asyncio.wait_for(reader.readexactly(12), 10)
        elif kind in ("unmasked_frame", "reserved_opcode"):
            writer.write(UPGRADE)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if not head.startswith(b"HTTP/1.1 101"):
                return f"no 101: {head[:40]!r}"
            writer.write(b"\x81\x02hi" if kind == "unmasked_frame" else b"\x83\x80abcd")
            data = await asyncio.wait_for(reader.readexactly(4), 10)
            expected, data = b"\x88" + (1002).to_bytes(2, "big"), data[:1] + data[2:4]
        else:  # header_drip
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n")
            expected, data = b"HTTP/1.1 408", await asyncio.wait_for(reader.readexactly(12), header_timeout + 10)
        return "" if data == expected else f"got {data!r}"
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
        return f"{type(exc).__name__}: {exc}"[:120]
    finally:
        writer.transport.abort()


# --------------------------------------------------------------------------- #
# the run
# --------------------------------------------------------------------------- #


@dataclass
class Run:
    """What the rounds of one soak share: the processes, the clients' totals, the faults injected."""

    args: argparse.Namespace
    proxy: Proxy
    backends: list[Backend]
    config: str
    tls_files: tuple[str, str] | None
    port: int
    url: str
    client_ssl: ssl.SSLContext | None
    rng: random.Random
    active: list[str]
    totals: Totals = field(default_factory=Totals)
    faults: Counter = field(default_factory=Counter)
    bad_results: Counter = field(default_factory=Counter)
    #: config_reload variants written so far
    variant: int = 0
    #: per worker kill: the connections the victim held, the sessions among them, seconds until its replacement was ready
    killed_connections: int = 0
    sessions_cut: int = 0
    restart_seconds: list[float] = field(default_factory=list)
    restarts_missing: int = 0
    #: the tree's highest RSS (KiB) and descriptor count seen under load
    peak: tuple[int, int] = (0, 0)

    def measure(self) -> dict:
        """The tree's totals, and every process of the proxy: role -> {pid, rss_kib, fds}."""
        stats = self.proxy.stats()
        tree = (sum(v[1] for v in stats.values()), sum(v[2] for v in stats.values()))
        self.peak = (max(self.peak[0], tree[0]), max(self.peak[1], tree[1]))
        return {"tree": {"rss_kib": tree[0], "fds": tree[1]},
                "processes": {role: {"pid": pid, "rss_kib": rss, "fds": fds} for role, (pid, rss, fds) in stats.items()}}

    async def settle(self) -> None:
        """Wait for every worker slot to be served, then for the close handshakes, timers and a heap trim."""
        if not await self.proxy.wait_all_ready():
            raise RuntimeError("a worker slot has no ready worker after 60 s")
        interval = self.args.heap_trim_interval
        await asyncio.sleep(max(3.0, interval + 1.5) if interval > 0 else 3.0)


async def soak(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    tmp = tempfile.mkdtemp(prefix="edgeproxy-soak-")
    backends = [Backend(), Backend()]
    for backend in backends:
        await backend.start()
    client_ssl = None
    tls_files = None
    if args.tls:
        ca, cert, key = make_certs(tmp)
        tls_files = (cert, key)
        client_ssl = ssl.create_default_context(cafile=ca)
    config = os.path.join(tmp, "edgeproxy.toml")
    port = free_port()
    write_config(config, args, port, backends, tls_files)
    # 0 (the default): glibc as production runs it; the proxy gives freed heap memory back itself
    env = {"MALLOC_TRIM_THRESHOLD_": str(args.malloc_trim_threshold)} if args.malloc_trim_threshold else {}
    proxy = Proxy(config, args.workers, env, os.path.join(tmp, "edgeproxy.log"))
    supported = {"backend_kill", "client_drop", "bad_input", "config_reload"}
    supported |= {"tls_reload"} if args.tls else set()
    supported |= {"worker_kill"} if args.workers > 1 else set()
    wanted = set(args.faults.split(",")) if args.faults else set(ALL_FAULTS)
    url = f"{'wss' if args.tls else 'ws'}://{'localhost' if args.tls else '127.0.0.1'}:{port}/ws"
    run = Run(args, proxy, backends, config, tls_files, port, url, client_ssl, rng, sorted(wanted & supported))
    report: dict = {"clients": args.clients, "duration_s": args.duration, "interval_s": args.interval, "tls": args.tls,
                    "workers": args.workers, "heap_trim_interval_s": args.heap_trim_interval,
                    "malloc_trim_threshold": args.malloc_trim_threshold or "glibc default",
                    "faults_active": run.active, "faults_not_available": sorted(wanted - supported),
                    "log": proxy.log_path}
    try:
        await proxy.start()
        cold = run.measure()
        # warm-up round: every client connects once and leaves, so the baseline includes warm allocator arenas
        warm_totals = Totals()
        warm_stop = asyncio.Event()
        warm = [Client(i, url, client_ssl, args.interval, warm_totals, rng) for i in range(args.clients)]
        tasks = [asyncio.create_task(c.run(warm_stop)) for c in warm]
        await wait_for_sessions(warm_totals, args.clients, 60)
        warm_stop.set()
        await asyncio.gather(*tasks)
        await run.settle()
        run.peak = (0, 0)
        baseline = run.measure()

        rounds = []
        started = time.monotonic()
        settled = 0.0
        for _ in range(args.rounds):
            ramp = await one_round(run)
            before = time.monotonic()
            await run.settle()
            settled += time.monotonic() - before
            rounds.append({"ramp_s": round(ramp, 2), **run.measure()})
        elapsed = time.monotonic() - started - settled
        end = rounds[-1]
        t = run.totals
        accounted = t.delivered + t.reported_lost + t.dropped_by_client + t.lost_with_worker_kill + t.silently_lost
        proxy.poll_log()
        memory = memory_verdict(baseline, rounds)
        report.update({
            "rounds": rounds,
            "elapsed_s": round(elapsed, 1),
            "messages_sent": t.sent,
            "messages_delivered": t.delivered,
            "lost_reported_with_close_code": t.reported_lost,
            "dropped_by_their_own_client": t.dropped_by_client,
            "lost_with_worker_kill": t.lost_with_worker_kill,
            "silently_lost": t.silently_lost,
            "unaccounted": t.sent - accounted,
            "corrupt_or_out_of_order": t.corrupt,
            "sessions": t.sessions,
            "reconnect_503": t.refused_503,
            "connect_errors": t.connect_errors,
            "session_end_codes": dict(t.close_codes),
            "echoes_per_second": round(t.delivered / elapsed),
            "faults_injected": dict(run.faults),
            "bad_inputs": dict(run.bad_results),
            "backend_kills": sum(b.kills for b in backends),
            "worker_kills": {"connections_held": run.killed_connections, "sessions_cut": run.sessions_cut,
                             "replacements_ready": len(run.restart_seconds), "replacements_missing": run.restarts_missing,
                             "seconds_to_ready": [round(x, 2) for x in run.restart_seconds]},
            "proxy_log_events": dict(proxy.lines),
            "processes": {"cold": cold, "warm_baseline": baseline, "end": end},
            "proxy_rss_kib": {"cold": cold["tree"]["rss_kib"], "warm_baseline": baseline["tree"]["rss_kib"],
                              "peak": run.peak[0], "end": end["tree"]["rss_kib"]},
            "proxy_fds": {"cold": cold["tree"]["fds"], "warm_baseline": baseline["tree"]["fds"],
                          "peak": run.peak[1], "end": end["tree"]["fds"]},
            "memory": memory,
        })
        report["ok"] = (t.silently_lost == 0 and report["unaccounted"] == 0 and t.corrupt == 0
                        and end["tree"]["fds"] <= baseline["tree"]["fds"] and memory["ok"]
                        and run.restarts_missing == 0 and not proxy.lines["reload_failed"] and not proxy.lines["traceback"]
                        and all(k.endswith(":answered") for k in run.bad_results))
        return report
    finally:
        await proxy.stop()
        report["proxy_exit_code"] = proxy.proc.returncode if proxy.proc is not None else None
        for backend in backends:
            await backend.stop()


#: a process's RSS may end this much above its first round's end (growth) and above its warm baseline
GROWTH, OVER_BASELINE, SLACK_KIB = 1.10, 1.25, 4096


def memory_verdict(baseline: dict, rounds: list[dict]) -> dict:
    """Per process: did its RSS grow from round to round or end far above its warm baseline?

    A process that lived through the run (same pid at the baseline and at the end)
    is held to both; a worker started during the run (a killed worker's
    replacement) to ending near the largest warm baseline of a worker.
    """
    baseline = baseline["processes"]
    warm_workers = [v["rss_kib"] for role, v in baseline.items() if role.startswith("worker") or role == "proxy"]
    out: dict = {"ok": True}
    for role, now in rounds[-1]["processes"].items():
        series = [r["processes"][role]["rss_kib"] if r["processes"].get(role, {}).get("pid") == now["pid"] else None
                  for r in rounds]
        base = baseline.get(role)
        if base is not None and base["pid"] == now["pid"]:
            first = series[0]
            ok = now["rss_kib"] <= first * GROWTH + SLACK_KIB and now["rss_kib"] <= base["rss_kib"] * OVER_BASELINE + SLACK_KIB
            out[role] = {"lived_through": True, "warm_kib": base["rss_kib"], "after_rounds_kib": series, "ok": ok}
        else:
            limit = max(warm_workers) * OVER_BASELINE + SLACK_KIB
            ok = now["rss_kib"] <= limit
            out[role] = {"lived_through": False, "replacement_pid": now["pid"], "after_rounds_kib": series,
                         "limit_kib": round(limit), "ok": ok}
        out["ok"] = out["ok"] and ok
    return out


async def one_round(run: Run) -> float:
    """``--duration`` seconds of load with faults; returns the ramp-up time."""
    args, totals, faults, rng = run.args, run.totals, run.faults, run.rng
    stop = asyncio.Event()
    sessions_before = totals.sessions
    clients = [Client(i, run.url, run.client_ssl, args.interval, totals, rng) for i in range(args.clients)]
    started = time.monotonic()
    tasks = [asyncio.create_task(c.run(stop)) for c in clients]
    await wait_for_sessions(totals, sessions_before + args.clients, 60)
    ramp = time.monotonic() - started
    run.measure()
    end_at = time.monotonic() + args.duration
    schedule = {kind: time.monotonic() + rng.uniform(0.5, 2.0) for kind in run.active}
    period = {"backend_kill": args.duration / 4, "client_drop": 0.25, "tls_reload": args.duration / 5,
              "config_reload": args.duration / 5, "worker_kill": max(3.0, args.duration / 3), "bad_input": 0.5}
    watchers = []
    while time.monotonic() < end_at:
        now = time.monotonic()
        for kind, due in list(schedule.items()):
            if now < due:
                continue
            schedule[kind] = now + period[kind] * rng.uniform(0.7, 1.3)
            if kind == "backend_kill":
                # one backend down at a time: with both down a 502 is right, but then nothing is tested
                if all(b.up for b in run.backends):
                    asyncio.create_task(rng.choice(run.backends).kill_and_restart(1.5))
                    faults[kind] += 1
            elif kind == "client_drop":
                if rng.choice(clients).drop():
                    faults[kind] += 1
            elif kind == "tls_reload":
                run.proxy.reload()
                faults[kind] += 1
            elif kind == "config_reload":
                run.variant += 1
                write_config(run.config, args, run.port, run.backends, run.tls_files, run.variant)
                run.proxy.reload()
                faults[kind] += 1
            elif kind == "worker_kill":
                killed = kill_a_worker(run, clients)
                if killed is not None:
                    faults[kind] += 1
                    watchers.append(asyncio.create_task(watch_restart(run, *killed)))
            elif kind == "bad_input":
                name = BAD_INPUTS[faults[kind] % len(BAD_INPUTS)]
                faults[kind] += 1
                wrong = await bad_input(name, run.port, run.client_ssl, args.header_timeout)
                run.bad_results[f"{name}:{'WRONG ' + wrong if wrong else 'answered'}"] += 1
        run.measure()
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*tasks, *watchers)
    return ramp


def kill_a_worker(run: Run, clients: list[Client]) -> tuple[int, int, float] | None:
    """SIGKILL the last slot's worker and mark the sessions it held; (slot, its pid, when) or None.

    No await between the kill and the marking: no client has seen its connection
    end yet, so each is still found by its local port.
    """
    slot = run.args.workers - 1
    killed = run.proxy.kill_worker(slot, run.port)
    if killed is None:  # its replacement is not ready yet
        return None
    pid, peers = killed
    by_port = {}
    for client in clients:
        local = client.local_port()
        if local is not None:
            by_port[local] = client
    run.killed_connections += len(peers)
    for peer in peers:
        client = by_port.get(peer)
        if client is not None:
            client.killed_ws = client.ws
            run.sessions_cut += 1
    return slot, pid, time.monotonic()


async def watch_restart(run: Run, slot: int, victim: int, killed_at: float) -> None:
    """Wait (60 s at most) for the supervisor's replacement of `victim` to say ready."""
    proxy = run.proxy
    while time.monotonic() < killed_at + 60:
        proxy.poll_log()
        pid = proxy.slots.get(slot)
        if pid != victim and pid in proxy.ready:
            run.restart_seconds.append(time.monotonic() - killed_at)
            return
        await asyncio.sleep(0.05)
    run.restarts_missing += 1


async def wait_for_sessions(totals: Totals, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while totals.sessions < n and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load with faults")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between two messages of a client")
    parser.add_argument("--tls", action="store_true", help="clients use wss:// (and tls_reload becomes available)")
    parser.add_argument("--faults", default="", help=f"comma-separated subset of {','.join(ALL_FAULTS)} (default: all)")
    parser.add_argument("--header-timeout", type=float, default=3.0, help="the proxy's http.header_timeout (also bounds TLS handshakes)")
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--workers", type=int, default=2,
                        help="the proxy's workers: > 1 runs a supervisor and its workers (worker_kill needs it), 1 one process")
    parser.add_argument("--heap-trim-interval", type=float, default=10.0,
                        help="the proxy's [limits] heap_trim_interval (every measurement waits it out)")
    parser.add_argument("--malloc-trim-threshold", type=int, default=0,
                        help="MALLOC_TRIM_THRESHOLD_ for the proxy (0, the default: glibc's own setting, as in production)")
    parser.add_argument("--rounds", type=int, default=2, help="load phases back to back (memory growth shows across them)")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    report = uvloop.run(soak(args))
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()

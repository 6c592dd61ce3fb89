"""Bounded soak test with faults: many WebSocket clients exchanging numbered messages through edgeproxy.

    python benchmarks/soak/soak.py --clients 1000 --duration 120 [--tls] [--faults backend_kill,client_drop,...]

What runs:

* edgeproxy in its own process (``proxy_runner.py``), so its RSS and open file
  descriptors are its own; two echo backends (``benchmarks/load/echo_backend.py``)
  as processes that can really be killed;
* ``--clients`` WebSocket clients in this process.  Each sends a numbered text
  message every ``--interval`` seconds and checks that the echoes come back in
  order, complete and once.  A client whose session ends reconnects (backing off
  on a 503) and goes on with a new session;
* faults, each on its own schedule, only those the proxy build supports
  (``--faults``, default all):

  - ``backend_kill``: SIGKILL one backend, restart it on the same port 1.5 s later
    (never both at once);
  - ``client_drop``: a client aborts its TCP connection without a close frame;
  - ``tls_reload``: SIGHUP to the proxy (certificates re-read), with ``--tls``;
  - ``config_reload``: SIGHUP reload of the configuration, when the build has one;
  - ``worker_kill``: kill one worker process, when the build has workers;
  - ``bad_input``: a hostile input on a fresh connection (request smuggling, an
    unmasked or reserved-opcode frame, a header drip), whose answer is checked.

At the end the clients stop sending, wait for the echoes still in flight, and
close.  The JSON report (stdout) proves, or disproves:

* every message was echoed, or its session ended with a close frame carrying a
  code (the loss was *reported* to its sender), or its own client dropped it;
  ``silently_lost`` counts the rest and must be 0;
* no echo came out of order, twice or altered (``corrupt``);
* the proxy's RSS did not grow from one round to the next (a leak would) and
  stayed near its warm baseline, and no descriptor leaked (open fds at the end
  equal the baseline).  The proxy runs with ``MALLOC_TRIM_THRESHOLD_=1048576``
  (``--malloc-trim-threshold``): with glibc's default the RSS keeps the high-water
  mark of TLS buffers freed long ago, which looks like a leak and is not (gc-tracked
  objects stay flat; with the fixed threshold the RSS stays flat too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
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
RUNNER = os.path.join(HERE, "proxy_runner.py")
ALL_FAULTS = ("backend_kill", "client_drop", "tls_reload", "config_reload", "worker_kill", "bad_input")


# --------------------------------------------------------------------------- #
# processes
# --------------------------------------------------------------------------- #


async def start_process(args: list[str], env: dict | None = None) -> tuple[asyncio.subprocess.Process, dict]:
    proc = await asyncio.create_subprocess_exec(sys.executable, *args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                env={**os.environ, **(env or {})})
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    return proc, json.loads(line)


def proc_stats(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as fh:
        rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


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


def write_config(path: str, backends: list[Backend], tls: tuple[str, str] | None, header_timeout: float) -> None:
    listener = '[[listeners]]\nbind = "127.0.0.1:0"\nbacklog = 4096\n'
    if tls:
        listener += f'tls_cert = "{tls[0]}"\ntls_key = "{tls[1]}"\n'
    servers = ", ".join(f'"127.0.0.1:{b.port}"' for b in backends)
    with open(path, "w") as fh:
        fh.write(
            f"{listener}\n[[upstreams]]\nname = \"echo\"\nservers = [{servers}]\nconnect_timeout = 2.0\n"
            f"balance = \"least_conn\"\n[upstreams.health]\nmax_fails = 0\n\n"
            f"[[routes]]\nupstream = \"echo\"\n\n[http]\nheader_timeout = {header_timeout}\n\n"
            f"[websocket]\nclose_timeout = 2.0\nmax_message_size = 65536\n\n"
            f"[limits]\nip_connection_rate = 0\n\n[logging]\naccess_log = false\nlevel = \"error\"\n\n"
            f"[admin]\nbind = \"127.0.0.1:0\"\n"
        )


# --------------------------------------------------------------------------- #
# clients
# --------------------------------------------------------------------------- #


@dataclass
class Totals:
    sent: int = 0
    delivered: int = 0
    reported_lost: int = 0
    dropped_by_client: int = 0
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
        elif code is None:
            self.t.silently_lost += len(self.unacked)
            self.t.close_codes["no close frame"] += 1
        else:
            self.t.reported_lost += len(self.unacked)
            self.t.close_codes[str(code)] += 1
        self.unacked = []

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
    write_config(config, backends, tls_files, args.header_timeout)
    # glibc keeps freed heap memory (TLS buffers come and go with every connection) up to a
    # threshold it raises by itself; a fixed threshold makes it give memory back, so RSS shows
    # what is really held (0 = glibc's default behaviour)
    env = {"MALLOC_TRIM_THRESHOLD_": str(args.malloc_trim_threshold)} if args.malloc_trim_threshold else {}
    proxy, ready = await start_process([RUNNER, config], env)
    pid, port = ready["pid"], ready["port"]
    supported = set(ready["features"]) | {"backend_kill", "client_drop", "bad_input"}
    wanted = set(args.faults.split(",")) if args.faults else set(ALL_FAULTS)
    active = sorted(wanted & supported)
    skipped = sorted(wanted - supported)
    url = f"{'wss' if args.tls else 'ws'}://{'localhost' if args.tls else '127.0.0.1'}:{port}/ws"
    report: dict = {"malloc_trim_threshold": args.malloc_trim_threshold or "glibc default", "clients": args.clients, "duration_s": args.duration, "interval_s": args.interval,
                    "tls": args.tls, "faults_active": active, "faults_not_available": skipped}
    try:
        cold = proc_stats(pid)
        # warm-up round: every client connects once and leaves, so the baseline includes warm allocator arenas
        warm_totals = Totals()
        warm_stop = asyncio.Event()
        warm = [Client(i, url, client_ssl, args.interval, warm_totals, rng) for i in range(args.clients)]
        tasks = [asyncio.create_task(c.run(warm_stop)) for c in warm]
        await wait_for_sessions(warm_totals, args.clients, 60)
        warm_stop.set()
        await asyncio.gather(*tasks)
        await asyncio.sleep(2)
        baseline = proc_stats(pid)

        totals = Totals()
        faults: Counter = Counter()
        bad_results: Counter = Counter()
        peak = proc_stats(pid)
        rounds = []
        started = time.monotonic()
        for _ in range(args.rounds):
            round_peak, ramp = await one_round(args, url, client_ssl, totals, faults, bad_results, rng, active,
                                               backends, proxy, pid, port)
            peak = (max(peak[0], round_peak[0]), max(peak[1], round_peak[1]))
            await asyncio.sleep(3)  # close handshakes and timers settle
            end = proc_stats(pid)
            rounds.append({"ramp_s": round(ramp, 2), "rss_kib_after": end[0], "fds_after": end[1]})
        elapsed = time.monotonic() - started - 3 * args.rounds
        t = totals
        accounted = t.delivered + t.reported_lost + t.dropped_by_client + t.silently_lost
        report.update({
            "rounds": rounds,
            "elapsed_s": round(elapsed, 1),
            "messages_sent": t.sent,
            "messages_delivered": t.delivered,
            "lost_reported_with_close_code": t.reported_lost,
            "dropped_by_their_own_client": t.dropped_by_client,
            "silently_lost": t.silently_lost,
            "unaccounted": t.sent - accounted,
            "corrupt_or_out_of_order": t.corrupt,
            "sessions": t.sessions,
            "reconnect_503": t.refused_503,
            "connect_errors": t.connect_errors,
            "session_end_codes": dict(t.close_codes),
            "echoes_per_second": round(t.delivered / elapsed),
            "faults_injected": dict(faults),
            "bad_inputs": dict(bad_results),
            "backend_kills": sum(b.kills for b in backends),
            "proxy_rss_kib": {"cold": cold[0], "warm_baseline": baseline[0], "peak": peak[0], "end": end[0]},
            "proxy_fds": {"cold": cold[1], "warm_baseline": baseline[1], "peak": peak[1], "end": end[1]},
        })
        # Memory: Python's and glibc's allocators keep a high-water mark, so the end is compared with the
        # first round's end (a leak grows round after round) and the peak, not with the idle baseline.
        first_end = rounds[0]["rss_kib_after"]
        report["ok"] = (t.silently_lost == 0 and report["unaccounted"] == 0 and t.corrupt == 0
                        and end[1] <= baseline[1] and end[0] <= max(first_end * 1.10, baseline[0] * 1.25) + 4096
                        and all(k.endswith(":answered") for k in bad_results))
        return report
    finally:
        proxy.send_signal(signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proxy.wait(), 10)
        for backend in backends:
            await backend.stop()


async def one_round(args, url, client_ssl, totals: Totals, faults: Counter, bad_results: Counter, rng, active,
                    backends: list[Backend], proxy, pid: int, port: int) -> tuple[tuple[int, int], float]:
    """``--duration`` seconds of load with faults; returns the proxy's peak (RSS, fds) and the ramp-up time."""
    stop = asyncio.Event()
    sessions_before = totals.sessions
    clients = [Client(i, url, client_ssl, args.interval, totals, rng) for i in range(args.clients)]
    started = time.monotonic()
    tasks = [asyncio.create_task(c.run(stop)) for c in clients]
    await wait_for_sessions(totals, sessions_before + args.clients, 60)
    ramp = time.monotonic() - started
    peak = proc_stats(pid)
    end_at = time.monotonic() + args.duration
    schedule = {kind: time.monotonic() + rng.uniform(0.5, 2.0) for kind in active}
    period = {"backend_kill": args.duration / 4, "client_drop": 0.25, "tls_reload": args.duration / 5,
              "config_reload": args.duration / 5, "worker_kill": args.duration / 3, "bad_input": 0.5}
    while time.monotonic() < end_at:
        now = time.monotonic()
        for kind, due in list(schedule.items()):
            if now < due:
                continue
            schedule[kind] = now + period[kind] * rng.uniform(0.7, 1.3)
            if kind == "backend_kill":
                # one backend down at a time: with both down a 502 is right, but then nothing is tested
                if all(b.up for b in backends):
                    asyncio.create_task(rng.choice(backends).kill_and_restart(1.5))
                    faults[kind] += 1
            elif kind == "client_drop":
                if rng.choice(clients).drop():
                    faults[kind] += 1
            elif kind in ("tls_reload", "config_reload"):
                proxy.send_signal(signal.SIGHUP)
                faults[kind] += 1
            elif kind == "bad_input":
                name = BAD_INPUTS[faults[kind] % len(BAD_INPUTS)]
                faults[kind] += 1
                wrong = await bad_input(name, port, client_ssl, args.header_timeout)
                bad_results[f"{name}:{'WRONG ' + wrong if wrong else 'answered'}"] += 1
        stats = proc_stats(pid)
        peak = (max(peak[0], stats[0]), max(peak[1], stats[1]))
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*tasks)
    return peak, ramp


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
    parser.add_argument("--malloc-trim-threshold", type=int, default=1 << 20,
                        help="MALLOC_TRIM_THRESHOLD_ for the proxy process (0 = glibc's default, which retains freed memory)")
    parser.add_argument("--rounds", type=int, default=2, help="load phases back to back (memory growth shows across them)")
    args = parser.parse_args()
    soft, hard = __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)
    __import__("resource").setrlimit(__import__("resource").RLIMIT_NOFILE, (hard, hard))
    report = uvloop.run(soak(args))
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()

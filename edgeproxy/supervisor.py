"""Multi-process mode: a supervisor and N worker processes (``workers = N``).

Theory of operation
-------------------
The **supervisor** owns the listening sockets and runs no proxy code.  For
every ``[[listeners]]`` entry it binds one socket *per worker slot*, each with
SO_REUSEPORT, so the kernel spreads new connections over the workers.  Worker
``i`` inherits slot ``i``'s sockets (``pass_fds``) and gets its configuration
text and later reloads over a private control channel (a SOCK_SEQPACKET
socketpair that can carry file descriptors).  Because the supervisor keeps its
own copy of every socket, a listening socket outlives the worker using it:

* a worker that crashes loses only its own connections; connections waiting in
  its accept queue stay there, and the replacement (started after a backoff of
  `RESTART_DELAY` doubling up to `RESTART_DELAY_MAX`, reset after
  `STABLE_AFTER` seconds of life) accepts them.  The other workers are not
  touched;
* a **binary upgrade** hands the very same sockets to a new supervisor, so no
  connection is refused or reset while the processes change.

Signals (to the supervisor; workers run in their own session, so a terminal's
Ctrl-C reaches only the supervisor):

========  =====================================================================
signal    effect
========  =====================================================================
TERM/INT  every worker gets SIGTERM and drains; the supervisor exits 0 when all
          have exited.  A second TERM/INT: SIGKILL to every worker, exit 1.
HUP       re-read and validate the file.  Invalid: its problems are logged and
          nothing changes.  Valid: sockets for added listeners are bound (one
          per slot), every worker applies the config in place
          (`ProxyServer.reload`) and the sockets of removed listeners are
          closed.  ``workers`` itself changes on a restart or a binary upgrade.
USR2      binary upgrade: start a new supervisor from the code and config now on
          disk, handing it every listening socket.  Once all its workers are
          ready it says so (a pipe), and this supervisor drains its own workers
          (SIGTERM) and exits 0.  If the new one fails or is not ready within
          `UPGRADE_TIMEOUT`, it is killed and this one keeps running.
========  =====================================================================

The new supervisor is first a child of the old one and is re-parented when the
old one exits; ``--pid-file`` always holds the pid of the supervisor in charge
(written once it is ready, removed on exit only by its owner).

Admission limits (``[limits]``) hold for the instance: before the first worker
the supervisor creates one shared table (`edgeproxy.transport.shared_limits`)
that every worker inherits, and when it reaps a worker it gives that worker's
connections back to the table (`SharedLimits.release_worker`) before the
replacement starts.  A binary upgrade's new supervisor makes a new table.

Admin listener: worker ``i`` serves it on ``[admin] bind`` port + ``i`` (port 0:
each worker picks a free port; a ``control_bind`` likewise, and a Unix control
socket at ``path.i`` past worker 0), so ``/metrics`` of each port is that worker's
process; sum the series across the ports (as Prometheus does with one target
per worker).  POST /admin/reload on any worker validates the file and, when it
is valid, sends SIGHUP to the supervisor, which reloads every worker.  A SIGHUP
sent to a worker directly is ignored (logged), as is SIGUSR2.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from edgeproxy.config import Config, ListenerConfig, load_config, parse_config
from edgeproxy.errors import ConfigError
from edgeproxy.transport.server import ListenerKey, listener_keys
from edgeproxy.transport.shared_limits import SharedLimits, SharedLimitsError

log = logging.getLogger("edgeproxy")

#: environment variable through which a worker learns its slot, control channel and sockets
WORKER_ENV = "EDGEPROXY_WORKER"
#: environment variable through which a new supervisor inherits the listening sockets
INHERIT_ENV = "EDGEPROXY_INHERIT"
#: seconds before the first restart of a crashed worker; doubles per quick crash
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
#: a worker that lived this long counts as healthy: its next crash restarts it quickly
STABLE_AFTER = 10.0
#: seconds a new supervisor has to get all its workers ready in a binary upgrade
UPGRADE_TIMEOUT = 60.0
#: largest control message (the config text travels in one)
MAX_MESSAGE = 4 * 1024 * 1024
#: prctl(2) option: signal this process gets when its parent dies
_PR_SET_PDEATHSIG = 1


def worker_config(config: Config, index: int) -> Config:
    """The config as worker `index` runs it: its own admin (and control) port, base + index.

    A Unix control socket gets the suffix ``.index`` past worker 0, since two
    processes cannot listen on one path.
    """
    if index == 0:
        return config
    admin = config.admin
    if admin.bind.port != 0:
        admin = dataclasses.replace(admin, bind=dataclasses.replace(admin.bind, port=admin.bind.port + index))
    control = admin.control_bind
    if isinstance(control, str):
        admin = dataclasses.replace(admin, control_bind=f"{control}.{index}")
    elif control is not None and control.port != 0:
        admin = dataclasses.replace(admin, control_bind=dataclasses.replace(control, port=control.port + index))
    return dataclasses.replace(config, admin=admin)


def bind_listener(listener: ListenerConfig, port: int | None = None) -> socket.socket:
    """A listening SO_REUSEPORT socket for `listener` (on `port` when given: the slot-0 port)."""
    host = listener.bind.host
    port = listener.bind.port if port is None else port
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(listener.backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


# --------------------------------------------------------------------------- #
# Control channel messages: one JSON document per SOCK_SEQPACKET record, with
# file descriptors riding along (SCM_RIGHTS)
# --------------------------------------------------------------------------- #


def send_message(sock: socket.socket, doc: dict[str, Any], fds: list[int] = ()) -> None:
    data = json.dumps(doc).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def recv_message(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """The next message and the descriptors that came with it; (None, []) at EOF."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 64)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), list(fds)


def _encode_key(key: ListenerKey) -> list[Any]:
    return [key[0].host, key[0].port, key[1]]


def _decode_key(item: list[Any], config: Config) -> ListenerKey:
    host, port, n = item
    for key in listener_keys(config.listeners):
        if (key[0].host, key[0].port, key[1]) == (host, port, n):
            return key
    raise KeyError(f"no listener {host}:{port} #{n} in the configuration")


# --------------------------------------------------------------------------- #
# Supervisor
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class _Worker:
    index: int
    proc: subprocess.Popen
    control: socket.socket
    started: float
    ready: bool = False


class Supervisor:
    """Starts, watches and signals the workers of one config file (see the module docstring)."""

    def __init__(self, path: str, config: Config, text: str, *, pid_file: str | None = None):
        self.path = path
        self.config = config
        self.text = text
        self.pid_file = pid_file
        self.count = config.workers
        #: per listener key, one listening socket per worker slot
        self.sockets: dict[ListenerKey, list[socket.socket]] = {}
        self.workers: list[_Worker | None] = [None] * self.count
        self._quick_crashes = [0] * self.count
        self._restarts: dict[int, asyncio.TimerHandle] = {}
        self._stopping = False
        self._forced = False
        self._done: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._upgrade: subprocess.Popen | None = None
        self._upgrade_pipe: int | None = None
        self._upgrade_timer: asyncio.TimerHandle | None = None
        #: written to once all workers are ready (set when this supervisor is an upgrade)
        self._ready_fd: int | None = None
        #: the admission table every worker shares (`edgeproxy.transport.shared_limits`); made by `run_supervisor`
        self.limits: SharedLimits | None = None

    # -- sockets -----------------------------------------------------------------

    def open_sockets(self, inherited: dict[tuple[ListenerKey, int], socket.socket]) -> None:
        """One SO_REUSEPORT socket per listener and slot; inherited ones are reused.

        Raises:
            OSError: a socket could not be bound (those bound so far are closed).
        """
        try:
            for key, listener in zip(listener_keys(self.config.listeners), self.config.listeners):
                self.sockets[key] = self._bind_slots(key, listener, inherited)
        except OSError:
            self.close_sockets()
            raise
        for sock in inherited.values():  # listeners the new config dropped, slots beyond `count`
            sock.close()

    def _bind_slots(self, key: ListenerKey, listener: ListenerConfig, inherited) -> list[socket.socket]:
        slots: list[socket.socket] = []
        port = None
        try:
            for slot in range(self.count):
                sock = inherited.pop((key, slot), None) or bind_listener(listener, port)
                port = sock.getsockname()[1]  # port 0: every slot on the port slot 0 got
                slots.append(sock)
        except OSError:
            for sock in slots:
                sock.close()
            raise
        return slots

    def close_sockets(self) -> None:
        for slots in self.sockets.values():
            for sock in slots:
                sock.close()
        self.sockets.clear()

    @property
    def ports(self) -> dict[str, int]:
        return {str(key[0]): slots[0].getsockname()[1] for key, slots in self.sockets.items()}

    # -- running -------------------------------------------------------------------

    async def run(self) -> int:
        self._loop = loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        loop.add_signal_handler(signal.SIGUSR2, self._start_upgrade)
        log.info("supervisor pid %d: %d workers on %s", os.getpid(), self.count,
                 ", ".join(f"{k}->{p}" for k, p in self.ports.items()))
        for index in range(self.count):
            self._spawn(index)
        self._reap()  # a child that exited before the handler was in place
        try:
            return await self._done
        finally:
            self.close_sockets()
            if self.pid_file and _read_pid(self.pid_file) == os.getpid():
                with contextlib.suppress(OSError):
                    os.unlink(self.pid_file)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        keys = list(self.sockets)
        fds = [theirs.fileno()] + [self.sockets[key][index].fileno() for key in keys]
        spec = {
            "index": index,
            "supervisor": os.getpid(),
            "control": theirs.fileno(),
            "listeners": [_encode_key(key) + [self.sockets[key][index].fileno()] for key in keys],
        }
        if self.limits is not None:
            self.limits.release_worker(index)  # a clean share of the table, whatever came before
            fds.append(self.limits.fd)
            spec["limits"] = self.limits.fd
        env = {**os.environ, WORKER_ENV: json.dumps(spec)}
        env.pop(INHERIT_ENV, None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeproxy", "run", "--config", self.path],
            pass_fds=fds, env=env, start_new_session=True,
        )
        theirs.close()
        ours.setblocking(False)
        worker = _Worker(index, proc, ours, time.monotonic())
        self.workers[index] = worker
        send_message(ours, {"config": self.text})
        self._loop.add_reader(ours.fileno(), self._on_control, worker)
        log.info("worker %d started (pid %d)", index, proc.pid)

    def _on_control(self, worker: _Worker) -> None:
        try:
            doc, fds = recv_message(worker.control)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            doc, fds = None, []
        for fd in fds:
            os.close(fd)
        if doc is None:  # the worker is gone; _reap handles its exit
            self._loop.remove_reader(worker.control.fileno())
            return
        if doc.get("ready"):
            worker.ready = True
            log.info("worker %d (pid %d) ready; admin on %s", worker.index, worker.proc.pid, doc.get("admin") or "-")
            self._check_all_ready()
        elif "reloaded" in doc:
            log.info("worker %d reloaded: %s", worker.index, ", ".join(doc["reloaded"]) or "no effective change")
        elif "reload_failed" in doc:
            log.error("worker %d could not reload: %s", worker.index, doc["reload_failed"])

    def _check_all_ready(self) -> None:
        if self._ready_fd is None or not all(w is not None and w.ready for w in self.workers):
            return
        self._write_pid_file()
        with contextlib.suppress(OSError):
            os.write(self._ready_fd, b"ready\n")
        os.close(self._ready_fd)
        self._ready_fd = None
        log.info("upgrade: all %d workers ready; told the old supervisor", self.count)

    def _write_pid_file(self) -> None:
        if not self.pid_file:
            return
        tmp = f"{self.pid_file}.{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        os.replace(tmp, self.pid_file)

    # -- children exiting ------------------------------------------------------------

    def _reap(self) -> None:
        for worker in list(self.workers):
            if worker is None or worker.proc.poll() is None:
                continue
            self._worker_exited(worker)
        if self._upgrade is not None and self._upgrade.poll() is not None:
            log.error("upgrade: the new supervisor (pid %d) exited with %s before it was ready; this one keeps running",
                      self._upgrade.pid, self._upgrade.returncode)
            self._end_upgrade()
        if self._stopping and all(w is None for w in self.workers) and not self._done.done():
            self._done.set_result(1 if self._forced else 0)

    def _worker_exited(self, worker: _Worker) -> None:
        index = worker.index
        self.workers[index] = None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(worker.control.fileno())
        worker.control.close()
        if self.limits is not None:
            # Its connections died with it: give their admission slots back to the instance now.
            connections, addresses = self.limits.release_worker(index)
            if connections or addresses:
                log.info("worker %d: released %d connection(s) and %d address slot(s) of the shared limits",
                         index, connections, addresses)
        code = worker.proc.returncode
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if self._stopping:
            log.info("worker %d (pid %d) exited (%s)", index, worker.proc.pid, how)
            return
        lived = time.monotonic() - worker.started
        if lived >= STABLE_AFTER:
            self._quick_crashes[index] = 0
        delay = min(RESTART_DELAY_MAX, RESTART_DELAY * 2 ** self._quick_crashes[index])
        self._quick_crashes[index] += 1
        log.error("worker %d (pid %d) died (%s) after %.1fs; restarting it in %.1fs", index, worker.proc.pid, how, lived, delay)
        self._restarts[index] = self._loop.call_later(delay, self._spawn, index)

    # -- signals --------------------------------------------------------------------------

    def _on_stop_signal(self) -> None:
        if self._stopping and not self._forced:
            self._forced = True
            log.warning("second stop signal: killing every worker now")
            self._signal_workers(signal.SIGKILL)
            return
        self._stop("stop signal")

    def _stop(self, why: str) -> None:
        if self._stopping:
            return
        self._stopping = True
        log.info("%s: draining %d workers", why, sum(w is not None for w in self.workers))
        for handle in self._restarts.values():
            handle.cancel()
        self._restarts.clear()
        if self._upgrade is not None:  # an upgrade still starting is abandoned with us
            log.warning("upgrade: abandoned; killing the new supervisor (pid %d)", self._upgrade.pid)
            self._upgrade.kill()
            self._upgrade.wait()
            self._end_upgrade()
        self._signal_workers(signal.SIGTERM)
        self._reap()

    def _signal_workers(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            if worker is not None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)

    def _reload(self) -> None:
        if self._stopping:
            return
        try:
            with open(self.path, "rb") as fh:
                text = fh.read().decode("utf-8")
            config = parse_config(text, source=self.path)
        except (OSError, UnicodeDecodeError) as exc:
            log.error("reload: cannot read %s: %s; the running configuration is kept", self.path, exc)
            return
        except ConfigError as exc:
            for line in exc.format_lines():
                log.error("reload: %s", line)
            log.error("reload: the configuration is invalid; the running one is kept")
            return
        if config.workers != self.count:
            log.warning("reload: workers = %d takes effect on a restart or a binary upgrade (SIGUSR2); still %d",
                        config.workers, self.count)
        if config.limits.ip_table_size != self.config.limits.ip_table_size:
            log.warning("reload: limits.ip_table_size = %d takes effect on a restart or a binary upgrade (SIGUSR2); "
                        "the shared table still holds %d addresses", config.limits.ip_table_size,
                        self.config.limits.ip_table_size)
        old_keys = set(self.sockets)
        new_keys = listener_keys(config.listeners)
        added: dict[ListenerKey, list[socket.socket]] = {}
        try:
            for key, listener in zip(new_keys, config.listeners):
                if key not in old_keys:
                    added[key] = self._bind_slots(key, listener, {})
        except OSError as exc:
            for slots in added.values():
                for sock in slots:
                    sock.close()
            log.error("reload: cannot bind a new listener (%s); the running configuration is kept", exc)
            return
        self.sockets.update(added)
        for worker in self.workers:
            if worker is None:
                continue
            keys = list(added)
            fds = [added[key][worker.index].fileno() for key in keys]
            try:
                send_message(worker.control, {"reload": text, "listeners": [_encode_key(k) for k in keys]}, fds)
            except OSError as exc:  # it is dying: its replacement starts with the new config
                log.warning("reload: worker %d unreachable (%s)", worker.index, exc)
        for key in old_keys - set(new_keys):
            for sock in self.sockets.pop(key):
                sock.close()
        self.config, self.text = config, text
        log.info("reload: sent version %s to the workers", config.version[:12])

    # -- binary upgrade -----------------------------------------------------------------

    def _start_upgrade(self) -> None:
        if self._stopping or self._upgrade is not None:
            log.warning("upgrade: ignored (%s)", "stopping" if self._stopping else "one is already under way")
            return
        read_fd, write_fd = os.pipe()
        fds = [write_fd]
        listeners = []
        for key, slots in self.sockets.items():
            for slot, sock in enumerate(slots):
                listeners.append(_encode_key(key) + [slot, sock.fileno()])
                fds.append(sock.fileno())
        env = {**os.environ, INHERIT_ENV: json.dumps({"ready_fd": write_fd, "listeners": listeners})}
        env.pop(WORKER_ENV, None)
        args = [sys.executable, "-m", "edgeproxy", "run", "--config", self.path]
        if self.pid_file:
            args += ["--pid-file", self.pid_file]
        self._upgrade = subprocess.Popen(args, pass_fds=fds, env=env)
        os.close(write_fd)
        self._upgrade_pipe = read_fd
        self._loop.add_reader(read_fd, self._on_upgrade_pipe)
        self._upgrade_timer = self._loop.call_later(UPGRADE_TIMEOUT, self._upgrade_timed_out)
        log.info("upgrade: started a new supervisor (pid %d) from the code on disk", self._upgrade.pid)

    def _on_upgrade_pipe(self) -> None:
        data = os.read(self._upgrade_pipe, 64)
        if data.startswith(b"ready"):
            pid = self._upgrade.pid
            self._end_upgrade(keep_child=True)
            log.info("upgrade: the new supervisor (pid %d) is ready; draining the old workers", pid)
            self._stop("upgrade")
        elif not data:  # it closed the pipe without saying ready: it is failing; _reap reports it
            self._loop.remove_reader(self._upgrade_pipe)

    def _upgrade_timed_out(self) -> None:
        log.error("upgrade: the new supervisor (pid %d) was not ready within %.0fs; killing it, this one keeps running",
                  self._upgrade.pid, UPGRADE_TIMEOUT)
        self._upgrade.kill()
        self._upgrade.wait()
        self._end_upgrade()

    def _end_upgrade(self, keep_child: bool = False) -> None:
        if self._upgrade_timer is not None:
            self._upgrade_timer.cancel()
            self._upgrade_timer = None
        if self._upgrade_pipe is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._upgrade_pipe)
            os.close(self._upgrade_pipe)
            self._upgrade_pipe = None
        # keep_child: the new supervisor lives on (re-parented when we exit); we stop watching it
        self._upgrade = None


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def run_supervisor(path: str, config: Config, *, pid_file: str | None = None,
                   activated: dict[ListenerKey, socket.socket] | None = None) -> int:
    """Run the supervisor of `config` (read from `path`) until it stops; the exit code.

    ``activated`` holds the listeners systemd passed (socket activation): every
    worker slot gets that one socket (they share its accept queue), since a
    second socket on its address would need SO_REUSEPORT on systemd's.
    """
    with open(path, "rb") as fh:
        text = fh.read().decode("utf-8")
    supervisor = Supervisor(path, config, text, pid_file=pid_file)
    inherited: dict[tuple[ListenerKey, int], socket.socket] = {}
    for key, sock in (activated or {}).items():
        inherited[(key, 0)] = sock
        for slot in range(1, supervisor.count):
            inherited[(key, slot)] = sock.dup()
    spec = os.environ.pop(INHERIT_ENV, None)
    if spec is not None:
        doc = json.loads(spec)
        supervisor._ready_fd = doc["ready_fd"]
        for host, port, n, slot, fd in doc["listeners"]:
            sock = socket.socket(fileno=fd)
            try:
                key = _decode_key([host, port, n], config)
            except KeyError:
                sock.close()  # the new config dropped this listener
                continue
            inherited[(key, slot)] = sock
    try:
        supervisor.limits = SharedLimits.create(supervisor.count, config.limits.ip_table_size)
    except SharedLimitsError as exc:
        for sock in inherited.values():
            sock.close()
        log.error("cannot start: %s", exc)
        return 1
    try:
        supervisor.open_sockets(inherited)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    if spec is None:
        supervisor._write_pid_file()
    return asyncio.run(supervisor.run())


# --------------------------------------------------------------------------- #
# Worker side
# --------------------------------------------------------------------------- #


class WorkerLink:
    """A worker's end of the control channel, and what the supervisor handed it at spawn."""

    def __init__(self, spec: dict[str, Any]):
        self.index: int = spec["index"]
        self.supervisor: int = spec["supervisor"]
        self.control = socket.socket(fileno=spec["control"])
        self._listener_fds = spec["listeners"]
        #: the descriptor of the instance's shared admission table
        self._limits_fd: int | None = spec.get("limits")
        self.server = None

    @classmethod
    def from_environment(cls) -> WorkerLink | None:
        spec = os.environ.pop(WORKER_ENV, None)
        return cls(json.loads(spec)) if spec is not None else None

    def die_with_supervisor(self) -> None:
        """SIGTERM (a drain) when the supervisor dies, even by SIGKILL (Linux prctl)."""
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != self.supervisor:  # it died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    def first_config(self, path: str) -> Config:
        """The config text the supervisor validated (never re-read from disk: it may have changed)."""
        self.control.setblocking(True)
        doc, _ = recv_message(self.control)
        if doc is None or "config" not in doc:
            raise SystemExit("edgeproxy worker: the supervisor sent no configuration")
        return worker_config(parse_config(doc["config"], source=path), self.index)

    def shared_limits(self) -> SharedLimits:
        """The admission table shared by the instance's workers.

        Raises:
            SystemExit: the supervisor handed none, or it is unusable (never run with per-worker limits).
        """
        if self._limits_fd is None:
            raise SystemExit("edgeproxy worker: the supervisor handed no shared limits table")
        try:
            return SharedLimits.attach(self._limits_fd, self.index)
        except SharedLimitsError as exc:
            raise SystemExit(f"edgeproxy worker: {exc}") from exc

    def sockets(self, config: Config) -> dict[ListenerKey, socket.socket]:
        out = {}
        for host, port, n, fd in self._listener_fds:
            out[_decode_key([host, port, n], config)] = socket.socket(fileno=fd)
        return out

    def attach(self, server, loop: asyncio.AbstractEventLoop) -> None:
        """Serve `server`: report ready, take reloads from the supervisor, route admin reloads to it."""
        self.server = server
        self.control.setblocking(False)
        loop.add_reader(self.control.fileno(), self._on_control, loop)
        server.on_reload = self._admin_reload
        admin = server.admin.address if server.admin is not None else None
        send_message(self.control, {"ready": True, "admin": f"{admin[0]}:{admin[1]}" if admin else None})

    def _admin_reload(self) -> dict[str, Any]:
        """POST /admin/reload: validate here (400 with the problems), reload every worker via the supervisor."""
        load_config(self.server.config.source)
        os.kill(self.supervisor, signal.SIGHUP)
        return {"reload": "valid; the supervisor reloads every worker", "supervisor_pid": self.supervisor}

    def _on_control(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            doc, fds = recv_message(self.control)
        except (BlockingIOError, InterruptedError):
            return
        if doc is None:  # the supervisor is gone; PDEATHSIG brings the SIGTERM
            loop.remove_reader(self.control.fileno())
            return
        if "reload" in doc:
            loop.create_task(self._reload(doc, fds))
        else:
            for fd in fds:
                os.close(fd)

    async def _reload(self, doc: dict[str, Any], fds: list[int]) -> None:
        socks = [socket.socket(fileno=fd) for fd in fds]
        try:
            config = worker_config(parse_config(doc["reload"], source=self.server.config.source), self.index)
            sockets = {_decode_key(item, config): sock for item, sock in zip(doc["listeners"], socks)}
            result = await self.server.reload(config, sockets)
        except Exception as exc:  # report, keep serving with the running config
            log.exception("reload from the supervisor failed")
            for sock in socks:
                sock.close()
            with contextlib.suppress(OSError):
                send_message(self.control, {"reload_failed": str(exc)})
            return
        with contextlib.suppress(OSError):
            send_message(self.control, {"reloaded": result["changed"]})


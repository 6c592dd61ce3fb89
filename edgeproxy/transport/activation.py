"""systemd socket activation: take the listening sockets systemd opened for us.

Theory of operation
-------------------
With an ``edgeproxy.socket`` unit, systemd binds the listeners itself and
starts the service with them as file descriptors 3, 4, ... and the
environment ``LISTEN_PID`` (our pid: the variables are for this process, not
for a child that inherited them) and ``LISTEN_FDS`` (how many), as
``sd_listen_fds(3)`` describes.  The point is restarts: systemd keeps the
sockets open while the process is replaced, so connections that arrive
meanwhile wait in the listen queue instead of being refused.

Each inherited socket is matched to the ``[[listeners]]`` entry whose ``bind``
names the same address (host and port; ``0.0.0.0`` and ``::`` stand for
themselves, never for each other).  The matching is strict, because a
silent mismatch would serve one address with another's settings: an
inherited socket no listener names, one that is not a listening TCP socket,
or two listeners for one socket stop the start with an error that says
which.  Listeners without an inherited socket are bound as usual (and
logged), so a socket unit may carry only some of them.

With ``workers = N`` the supervisor hands the one inherited socket to every
worker (they share its accept queue) instead of binding one SO_REUSEPORT
socket per worker, which systemd's socket would refuse.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket

from edgeproxy.config import Config
from edgeproxy.transport.server import ListenerKey, listener_keys

log = logging.getLogger("edgeproxy")

#: the first descriptor systemd passes (SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3


class ActivationError(OSError):
    """The inherited sockets do not fit the configuration; the message says how."""


def activated_sockets(config: Config, environ: dict[str, str] | None = None) -> dict[ListenerKey, socket.socket]:
    """The listeners systemd passed to this process, by listener key; {} without socket activation.

    The ``LISTEN_*`` variables are removed from ``environ`` (``os.environ`` by
    default) so no child process takes them for its own.

    Raises:
        ActivationError: an inherited socket is not a listening TCP socket, or
            no listener (or more than one) names its address.
    """
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if pid is None or count is None:
        return {}
    if not pid.isdigit() or int(pid) != os.getpid():
        return {}  # meant for another process (we inherited the environment)
    if not count.isdigit():
        raise ActivationError(f"socket activation: LISTEN_FDS={count!r} is not a count")
    sockets: list[socket.socket] = []
    by_key: dict[ListenerKey, socket.socket] = {}
    keys = listener_keys(config.listeners)
    try:
        for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
            sockets.append(sock := _listening_socket(fd))
            host, port = sock.getsockname()[:2]
            named = [key for key, listener in zip(keys, config.listeners)
                     if listener.bind.port == port and _same_host(listener.bind.host, host)]
            if not named:
                raise ActivationError(
                    f"socket activation passed a socket bound to {_show(host, port)} (fd {sock.fileno()}), but no "
                    "[[listeners]] bind names that address: add the listener, or remove it from the socket unit")
            if len(named) > 1:
                raise ActivationError(
                    f"socket activation passed one socket for {_show(host, port)}, and {len(named)} [[listeners]] "
                    "entries bind that address: one socket serves one listener")
            by_key[named[0]] = sock
    except ActivationError:
        for sock in sockets:
            sock.close()
        raise
    for key, listener in zip(keys, config.listeners):
        if key in by_key:
            log.info("socket activation: listener %s on the socket systemd passed", listener.bind)
        else:
            log.info("socket activation: listener %s has no socket from systemd; binding it here", listener.bind)
    return by_key


def _listening_socket(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"socket activation: fd {fd} is not a socket ({exc})") from None
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6) \
            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()  # not ours to close
        raise ActivationError(f"socket activation: fd {fd} is not a listening TCP socket (ListenStream= in the unit)")
    sock.setblocking(False)
    return sock


def _same_host(configured: str, bound: str) -> bool:
    """Whether a listener's ``bind`` host is the address a socket is bound to."""
    try:
        return ipaddress.ip_address(configured) == ipaddress.ip_address(bound)
    except ValueError:
        return False  # a host name: the socket's address is numeric and resolving it here would guess


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

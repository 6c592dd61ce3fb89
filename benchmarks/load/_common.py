"""Small helpers shared by the load benchmark's processes (backend, load generator, runner).

Nothing here talks to the network; it only adjusts the current process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import inspect
import json
import resource
import signal
import sys
from typing import Any

_PR_SET_PDEATHSIG = 1


def raise_nofile_limit() -> int:
    """Raise the soft open-file limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent exits (best effort).

    Used as ``preexec_fn`` for every child the runner starts, so an interrupted run
    leaves no backend, load generator or proxy behind.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def child_setup() -> None:
    """``preexec_fn`` for the runner's children: full open-file limit, die with the parent."""
    raise_nofile_limit()
    die_with_parent()


def picows_kwargs(func: Any) -> dict[str, Any]:
    """Extra keyword arguments for picows' ws_connect / ws_create_server.

    picows >= 2.2 may switch to the `aiofastnet` transports when that package is
    installed; the benchmark wants plain uvloop transports on both ends, so it
    asks for them explicitly when the installed picows knows the option.
    """
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_aiofastnet": False} if "use_aiofastnet" in params else {}


def emit(obj: dict[str, Any]) -> None:
    """One JSON object per line on stdout, flushed at once (the runner reads them live)."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()

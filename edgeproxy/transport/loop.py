"""Pick the event loop: uvloop when it is installed, plain asyncio with a warning otherwise."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("edgeproxy")


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def running_loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """Name the loop that is running ("uvloop" or "asyncio"), not just the one installed."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run `main` on uvloop (or asyncio as a fallback) until it returns."""
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed: running on the plain asyncio loop, which is slower")
        return asyncio.run(main)
    return uvloop.run(main)

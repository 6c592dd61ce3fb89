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


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run `main` on uvloop (or asyncio as a fallback) until it returns."""
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed: running on the plain asyncio loop, which is slower")
        return asyncio.run(main)
    return uvloop.run(main)

"""Runs one edgeproxy for the soak test, in its own process, so its memory and descriptors can be measured.

    python benchmarks/soak/proxy_runner.py CONFIG

Prints ``{"event": "ready", "pid": ..., "port": ..., "admin_port": ..., "features": [...]}``
on stdout once listening.  Signals: SIGHUP reloads the TLS certificates and, when
this build has a config reload (``ProxyServer.reload``, built on another branch),
the configuration too; SIGTERM stops.  ``features`` says which of those exist, so
the harness only injects the faults this build supports.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import uvloop

from edgeproxy.config import load_config
from edgeproxy.transport.server import ProxyServer


async def main(path: str) -> None:
    config = load_config(path)
    server = ProxyServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    features = ["tls_reload"] if server.tls else []
    reload_config = getattr(server, "reload", None)
    if callable(reload_config):
        features.append("config_reload")

    def on_hup() -> None:
        server.reload_certificates()
        if callable(reload_config):
            result = reload_config(load_config(path)) if reload_config.__code__.co_argcount > 1 else reload_config()
            if asyncio.iscoroutine(result):
                loop.create_task(result)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    port = server.addresses[0][1]
    admin = server.admin.address[1] if server.admin is not None else None
    print(json.dumps({"event": "ready", "pid": __import__("os").getpid(), "port": port, "admin_port": admin,
                      "features": features}), flush=True)
    await stop.wait()
    await server.stop()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))

"""The `edgeproxy` command: run, validate, demo, --version."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from edgeproxy import __version__
from edgeproxy.config import Config, load_config
from edgeproxy.errors import ConfigError

log = logging.getLogger("edgeproxy")

EXAMPLE_CONFIG = "config.example.toml"


def _version_text() -> str:
    from edgeproxy.core import _accel
    from edgeproxy.transport.loop import loop_name

    state = "active" if _accel.SPEEDUPS else "not active (pure Python)"
    return f"edgeproxy {__version__} (compiled extension {state}; event loop {loop_name()})"


def _load_or_report(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.format_lines():
            print(f"error: {line}", file=sys.stderr)
        return None


async def _serve(config: Config, *, demo: bool = False) -> None:
    from edgeproxy.transport.server import ProxyServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    force = asyncio.Event()

    def on_signal() -> None:
        # The first SIGTERM/SIGINT drains gracefully; a second one means "now".
        if stop.is_set():
            force.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    backends = []
    if demo:
        from edgeproxy.demo import start_demo_backend

        for upstream in config.upstreams:
            for address in upstream.servers:
                backends.append(await start_demo_backend(address.host, address.port))
                log.info("demo backend listening on %s", address)
    server = ProxyServer(config)
    await server.start()
    if demo:
        host, port = server.addresses[0]
        shown = f"[{host}]" if ":" in host else host
        log.info("demo ready: open http://%s:%d/ (WebSocket echo at ws://%s:%d/ws); Ctrl-C stops", shown, port, shown, port)
    await stop.wait()
    log.info("stopping: draining for at most %.1fs (a second signal stops at once)",
             config.shutdown.readiness_grace + config.shutdown.drain_timeout)
    drain = asyncio.ensure_future(server.drain_and_stop())
    forced = asyncio.ensure_future(force.wait())
    await asyncio.wait([drain, forced], return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():
        log.warning("second signal: stopping now")
        drain.cancel()
        await server.stop()
    forced.cancel()
    for backend in backends:
        backend.close()
    log.info("stopped")


def _run(config: Config, *, demo: bool = False) -> int:
    from edgeproxy.logs import configure_logging
    from edgeproxy.transport import loop

    configure_logging(config.logging)
    log.info(_version_text())
    try:
        loop.run(_serve(config, demo=demo))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeproxy", description="HTTP/1.1 and WebSocket edge proxy")
    parser.add_argument("--version", action="store_true", help="print the version and whether the compiled extension is active")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the proxy in the foreground (logs to stderr)")
    run.add_argument("--config", "-c", required=True, help="TOML configuration file")
    check = sub.add_parser("validate", help="check a configuration file; exit 1 listing every error")
    check.add_argument("--config", "-c", required=True, help="TOML configuration file")
    demo = sub.add_parser("demo", help="run the proxy with a built-in example backend (WebSocket echo + HTTP page)")
    demo.add_argument("--config", "-c", default=None, help=f"TOML configuration file (default: {EXAMPLE_CONFIG})")
    args = parser.parse_args(argv)

    if args.version:
        print(_version_text())
        return 0
    if args.command == "validate":
        config = _load_or_report(args.config)
        if config is None:
            return 1
        print(f"{args.config}: ok ({len(config.listeners)} listener(s), {len(config.upstreams)} upstream(s), {len(config.routes)} route(s))")
        return 0
    if args.command == "run":
        config = _load_or_report(args.config)
        return 1 if config is None else _run(config)
    if args.command == "demo":
        path = args.config or _find_example()
        if path is None:
            print(f"error: {EXAMPLE_CONFIG} not found here; pass --config FILE", file=sys.stderr)
            return 1
        config = _load_or_report(path)
        return 1 if config is None else _run(config, demo=True)
    parser.print_help()
    return 2


def _find_example() -> str | None:
    candidate = Path.cwd() / EXAMPLE_CONFIG
    return str(candidate) if candidate.is_file() else None


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""The `edgeproxy` command: run, validate, demo, --version."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
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


async def _reload_on_signal(server) -> None:
    try:
        await server.reload_file()
    except (ConfigError, OSError):
        pass  # logged by reload_file; the running configuration is kept
    except Exception:
        log.exception("reload failed; the running configuration is kept")


async def _serve(config: Config, *, demo: bool = False, link=None, sockets=None) -> bool:
    """Run until SIGTERM/SIGINT, then drain; True when a second signal cut the drain short."""
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
    server = ProxyServer(config, shared_limits=link.shared_limits() if link is not None else None)
    if link is None:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_reload_on_signal(server)))
        await server.start(sockets)  # systemd's sockets, when it activated us
    else:  # a supervised worker: listeners and reloads come from the supervisor
        for sig in (signal.SIGHUP, signal.SIGUSR2):
            loop.add_signal_handler(sig, log.warning, "worker %d: signals go to the supervisor (pid %d)", link.index, link.supervisor)
        server.reuse_port = True
        server.worker = (link.supervisor, link.index)
        for admin in server.admin_listeners:
            admin.reuse_port = True
        await server.start(link.sockets(config))
        link.attach(server, loop)
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
    cut_short = not drain.done()
    if cut_short:
        log.warning("second signal: stopping now")
        drain.cancel()
        await server.stop()
    forced.cancel()
    for backend in backends:
        backend.close()
    log.info("stopped")
    return cut_short


def _run(config: Config, *, demo: bool = False, link=None, sockets=None) -> int:
    from edgeproxy.logs import configure_logging
    from edgeproxy.transport import loop

    configure_logging(config.logging)
    if link is None:
        log.info(_version_text())
    try:
        cut_short = loop.run(_serve(config, demo=demo, link=link, sockets=sockets))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    # 1 when a second signal cut the drain short, as the supervisor does: visible, not an error
    return 1 if cut_short else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeproxy", description="HTTP/1.1 and WebSocket edge proxy")
    parser.add_argument("--version", action="store_true", help="print the version and whether the compiled extension is active")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the proxy in the foreground (logs to stderr)")
    run.add_argument("--config", "-c", required=True, help="TOML configuration file")
    run.add_argument("--pid-file", default=None, help="write the pid of the process in charge here (the supervisor with workers > 1)")
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
        return _run_command(args.config, args.pid_file)
    if args.command == "demo":
        path = args.config or _find_example()
        if path is None:
            print(f"error: {EXAMPLE_CONFIG} not found here; pass --config FILE", file=sys.stderr)
            return 1
        config = _load_or_report(path)
        return 1 if config is None else _run(config, demo=True)
    parser.print_help()
    return 2


def _run_command(path: str, pid_file: str | None) -> int:
    """``run``: one process, a supervisor of workers, or (started by one) a worker."""
    from edgeproxy import supervisor

    link = supervisor.WorkerLink.from_environment()
    if link is not None:
        link.die_with_supervisor()
        return _run(link.first_config(path), link=link)
    config = _load_or_report(path)
    if config is None:
        return 1
    from edgeproxy.logs import configure_logging
    from edgeproxy.transport.activation import ActivationError, activated_sockets

    configure_logging(config.logging)
    try:
        activated = activated_sockets(config)  # systemd socket activation, else {}
    except ActivationError as exc:
        log.error("cannot start: %s", exc)
        return 1
    if config.workers > 1 or supervisor.INHERIT_ENV in os.environ:
        log.info(_version_text())
        return supervisor.run_supervisor(path, config, pid_file=pid_file, activated=activated)
    if pid_file:
        with open(pid_file, "w") as fh:
            fh.write(f"{os.getpid()}\n")
    return _run(config, sockets=activated)


def _find_example() -> str | None:
    candidate = Path.cwd() / EXAMPLE_CONFIG
    return str(candidate) if candidate.is_file() else None


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

#!/usr/bin/env python3
"""Reference WebSocket echo server for the Autobahn|Testsuite comparison.

Built on the ``websockets`` library (asyncio implementation), it echoes every
text/binary message back unchanged.  It is the "known good" peer: the
Autobahn fuzzingclient is run against it directly and through edgeproxy, and
the verdicts are compared.

* ``max_size=None``: Autobahn sends messages of up to 16 MiB (cases 9.x).
* permessage-deflate is negotiated when offered (websockets' default), so the
  12.x/13.x compression groups can run when selected.
* Up to 2**20 fragments per message (``WEBSOCKETS_MAX_FRAGMENTS``): 9.3.x/9.4.x
  send 4 MiB in 64-byte fragments.
* No keepalive pings (``ping_interval=None``): an unsolicited ping would show
  up in the recorded events of slow cases and make verdicts timing-dependent.

Usage::

    python tests/conformance/echo_server.py --port 9001 [--host 127.0.0.1]

Prints ``ready <host>:<port>`` on stdout once listening (``--port 0`` picks a
free port), and runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

# websockets caps a fragmented message at 4096 frames (read at import time);
# Autobahn 9.3.x/9.4.x send 4 MiB in fragments as small as 64 bytes (65536
# frames).  Lift the cap so only real protocol errors end a connection.
os.environ.setdefault("WEBSOCKETS_MAX_FRAGMENTS", str(1 << 20))

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed


async def echo(ws: ServerConnection) -> None:
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass


async def main(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))

    async with serve(
        echo,
        host,
        port,
        max_size=None,
        max_queue=None,
        ping_interval=None,
        ping_timeout=None,
        close_timeout=5,
        compression="deflate",
        server_header="edgeproxy-conformance-echo",
    ) as server:
        sock = next(iter(server.sockets))
        bound_host, bound_port = sock.getsockname()[:2]
        print(f"ready {bound_host}:{bound_port}", flush=True)
        await stop


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9001)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    try:
        asyncio.run(main(args.host, args.port))
    except KeyboardInterrupt:
        pass
    sys.exit(0)

"""WebSocket echo backend for the load benchmark: picows on uvloop, one process.

    python benchmarks/load/echo_backend.py [--host 127.0.0.1] [--port 0] [--max-lifetime 3600]

Every data frame is sent back as it came (same opcode, same FIN bit, same payload),
so fragmented messages come back fragmented the same way. A CLOSE is answered with
a CLOSE carrying the same code, then the server closes the TCP connection (the
server closes first, as RFC 6455 asks, so TIME_WAIT stays on this side). Pings are
answered by picows itself.

When listening it prints one JSON line to stdout: {"event": "ready", "port": N, ...}.
It stops on SIGTERM/SIGINT, when its parent exits (Linux), or after --max-lifetime
seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import uvloop  # noqa: E402
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server  # noqa: E402

from _common import emit, picows_kwargs, raise_nofile_limit  # noqa: E402

_DATA = (WSMsgType.BINARY, WSMsgType.TEXT, WSMsgType.CONTINUATION)


class EchoServerListener(WSListener):
    __slots__ = ("server",)

    def __init__(self, server: "Backend"):
        self.server = server

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.server.open += 1
        self.server.accepted += 1

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type in _DATA:
            transport.send(msg_type, frame.get_payload_as_memoryview(), frame.fin)
        elif msg_type == WSMsgType.CLOSE:
            code = frame.get_close_code() if frame.payload_size >= 2 else WSCloseCode.OK
            if code == WSCloseCode.NO_INFO:
                code = WSCloseCode.OK
            transport.send_close(code, frame.get_close_message() or None)
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.server.open -= 1


class Backend:
    def __init__(self) -> None:
        self.open = 0
        self.accepted = 0


async def main_async(args: argparse.Namespace) -> None:
    backend = Backend()
    server = await ws_create_server(
        lambda request: EchoServerListener(backend),
        args.host,
        args.port,
        backlog=args.backlog,
        websocket_handshake_timeout=10,
        read_buffer_init_size=args.read_buffer,
        **picows_kwargs(ws_create_server),
    )
    port = server.sockets[0].getsockname()[1]
    emit({"event": "ready", "port": port, "pid": os.getpid(), "nofile": raise_nofile_limit()})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), args.max_lifetime)
    except TimeoutError:
        print(f"echo_backend: --max-lifetime {args.max_lifetime}s reached, exiting", file=sys.stderr)
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = pick a free port (reported in the ready line)")
    parser.add_argument("--backlog", type=int, default=4096)
    parser.add_argument("--read-buffer", type=int, default=4096, help="picows initial read buffer per connection")
    parser.add_argument("--max-lifetime", type=float, default=3600.0, help="exit after this many seconds")
    args = parser.parse_args()
    if not args.host.startswith("127."):
        parser.error("the benchmark backend only listens on loopback (127.0.0.0/8)")
    raise_nofile_limit()
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()

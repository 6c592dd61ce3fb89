"""The nginx path's backend: a picows server that does the fan-out itself, N copies over N connections.

    python benchmarks/hub/fanout_backend.py [--port 0]

Every WebSocket connection is a subscriber, except one that sends ``control`` as its
first message.  On the control connection, a binary message ``b"B" + count (4 bytes,
big endian) + payload`` makes the backend send ``payload`` ``count`` times to every
subscriber, one ``send`` per copy, the way a backend behind nginx or HAProxy must.
Prints ``{"event": "ready", "port": ...}`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "load"))

import uvloop  # noqa: E402
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server  # noqa: E402

from _common import emit, picows_kwargs, raise_nofile_limit  # noqa: E402


class Hub:
    def __init__(self) -> None:
        self.subscribers: dict[WSTransport, None] = {}


class Listener(WSListener):
    def __init__(self, hub: Hub):
        self.hub = hub
        self.first = True
        self.control = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.hub.subscribers[transport] = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type not in (WSMsgType.BINARY, WSMsgType.TEXT):
            if frame.msg_type == WSMsgType.CLOSE:
                transport.send_close()
                transport.disconnect()
            return
        data = frame.get_payload_as_bytes()
        if self.first:
            self.first = False
            if data == b"control":
                self.control = True
                self.hub.subscribers.pop(transport, None)
                return
        if self.control and data[:1] == b"B":
            (count,) = struct.unpack_from("!I", data, 1)
            payload = data[5:]
            for sub in self.hub.subscribers:
                for _ in range(count):
                    sub.send(WSMsgType.BINARY, payload)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.hub.subscribers.pop(transport, None)


async def main_async(port: int) -> None:
    hub = Hub()
    server = await ws_create_server(lambda request: Listener(hub), "127.0.0.1", port, backlog=4096,
                                    websocket_handshake_timeout=30, **picows_kwargs(ws_create_server))
    emit({"event": "ready", "port": server.sockets[0].getsockname()[1], "pid": os.getpid()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), 3600)
    except TimeoutError:
        pass
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    raise_nofile_limit()
    uvloop.run(main_async(args.port))


if __name__ == "__main__":
    main()

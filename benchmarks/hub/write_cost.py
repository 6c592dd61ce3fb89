"""What one ``write`` to one loopback TCP socket costs here: the floor under any fan-out latency.

    python benchmarks/hub/write_cost.py [--conns 2000]

Opens N loopback connections in one uvloop process and times ``_accel.write_many`` of
one ~100-byte frame to all N server-side transports (5 rounds).  Every write is one
``send`` system call, so one message to N subscribers cannot be written faster than
N times this, whatever the proxy does in user space.
"""

import argparse
import asyncio
import time

import uvloop

from edgeproxy.core import _accel


async def main(n: int) -> None:
    loop = asyncio.get_running_loop()
    server_transports = []

    class Server(asyncio.Protocol):
        def connection_made(self, transport):
            server_transports.append(transport)

    class Client(asyncio.Protocol):
        def data_received(self, data):
            pass

    srv = await loop.create_server(Server, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    clients = [(await loop.create_connection(Client, "127.0.0.1", port))[0] for _ in range(n)]
    await asyncio.sleep(0.2)
    frame = _accel.encode_frame(_accel.OP_TEXT, b"x" * 98)
    for _ in range(5):
        t0 = time.perf_counter()
        _accel.write_many(server_transports, frame, 1 << 20)
        dt = time.perf_counter() - t0
        print(f"write_many to {n} ({_accel.IMPLEMENTATION}): {dt * 1e3:.2f} ms = {dt / n * 1e6:.2f} us per write")
        await asyncio.sleep(0.2)
    for t in clients:
        t.abort()
    srv.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=2000)
    uvloop.run(main(parser.parse_args().conns))

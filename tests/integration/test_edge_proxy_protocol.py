"""PROXY protocol v1/v2 listeners: real addresses into X-Forwarded-For and limits; untrusted sources refused."""

from __future__ import annotations

import asyncio
import socket
import ssl

from websockets.asyncio.client import connect as ws_client

from edgeproxy.core.proxy_protocol import encode_v1, encode_v2

HOST = "127.0.0.1"


def pp_listener(trusted=("127.0.0.0/8",), **extra) -> list[dict]:
    return [{"bind": f"{HOST}:0", "proxy_protocol": True, "proxy_protocol_trusted": list(trusted), **extra}]


async def ws_via_balancer(port: int, header: bytes, path: str = "/echo", ssl_context=None):
    """A websockets client whose TCP connection starts with a PROXY header, as a balancer's would."""
    sock = socket.create_connection((HOST, port))
    sock.sendall(header)
    sock.setblocking(False)
    return await ws_client(f"{'wss' if ssl_context else 'ws'}://localhost:{port}{path}", sock=sock, ssl=ssl_context,
                           compression=None, open_timeout=5, ping_interval=None, proxy=None)


async def test_v1_and_v2_real_address_reaches_x_forwarded_for(ws_backend, proxy):
    p = await proxy(ws_backend, listeners=pp_listener())
    for header, ip in [(encode_v1(("203.0.113.9", 40000), ("10.0.0.1", 80)), "203.0.113.9"),
                       (encode_v2(("2001:db8::7", 5), ("2001:db8::1", 80)), "2001:db8::7"),
                       (encode_v2(None), "127.0.0.1")]:  # LOCAL: the balancer's own address
        ws = await ws_via_balancer(p.port, header)
        await ws.send(f"from {ip}")
        assert await asyncio.wait_for(ws.recv(), 5) == f"from {ip}"
        rec = ws_backend.records[-1]
        assert rec.header("X-Forwarded-For") == ip
        await ws.close()


async def test_header_in_the_same_segment_as_the_tls_client_hello(ws_backend, proxy, certs):
    """PROXY v2 then TLS: nothing past the header may be taken before TLS starts."""
    leaf = certs.leaf("localhost", ["DNS:localhost"], tag="-pp")
    p = await proxy(ws_backend, listeners=pp_listener(tls_cert=leaf.cert, tls_key=leaf.key))
    ctx = ssl.create_default_context(cafile=certs.ca_cert)
    # the header and the ClientHello arrive together: TLS over a memory BIO, first flight glued to the header
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    reader, writer = await asyncio.open_connection(HOST, p.port)
    writer.write(encode_v2(("198.51.100.4", 1234)) + hello)
    for _ in range(20):
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, "closed during the handshake"
        incoming.write(data)
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        if outgoing.pending:
            writer.write(outgoing.read())
    writer.write(outgoing.read())
    tls.write(b"GET /headers HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    writer.write(outgoing.read())
    response = b""
    while b"\r\n\r\n" not in response:
        incoming.write(await asyncio.wait_for(reader.read(65536), 5))
        try:
            response += tls.read(65536)
        except ssl.SSLWantReadError:
            pass
    assert response.startswith(b"HTTP/1.1 101")
    rec = (await ws_backend.wait_records(1))[0]
    assert rec.header("X-Forwarded-For") == "198.51.100.4"
    assert rec.header("X-Forwarded-Proto") == "https"
    writer.close()


async def test_untrusted_source_and_bad_headers_are_closed(ws_backend, proxy, raw_conn):
    p = await proxy(ws_backend, listeners=pp_listener(trusted=["10.0.0.0/8"]))
    c = await raw_conn(p.port)
    await c.send(encode_v1(("1.2.3.4", 1), ("5.6.7.8", 2)))
    await c.expect_closed()
    q = await proxy(ws_backend, listeners=pp_listener())
    for junk in [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PROXY TCP4 1.2.3.4 nope 1 2\r\n", b"PROXY " + b"9" * 200]:
        c = await raw_conn(q.port)
        await c.send(junk)
        await c.expect_closed()
    assert p.server.metrics.limits["untrusted_source"] == 1
    assert q.server.metrics.limits["bad_proxy_header"] == 3
    ws = await ws_via_balancer(q.port, encode_v1(("192.0.2.1", 9), ("192.0.2.2", 80)))
    await ws.send("fine")
    assert await ws.recv() == "fine"
    await ws.close()


async def test_slow_proxy_header_is_cut(ws_backend, proxy, raw_conn):
    p = await proxy(ws_backend, listeners=pp_listener(), http={"header_timeout": 0.5})
    c = await raw_conn(p.port)
    await c.send(b"PROXY TCP4 1.2.")  # and nothing more
    await c.expect_closed(timeout=3)
    assert p.server.metrics.limits["proxy_header_timeout"] == 1


async def test_per_ip_limits_use_the_real_address(ws_backend, proxy, raw_conn):
    p = await proxy(ws_backend, listeners=pp_listener(), limits={"max_connections_per_ip": 1})
    a = await ws_via_balancer(p.port, encode_v1(("198.51.100.1", 1), ("10.0.0.1", 80)))
    b = await ws_via_balancer(p.port, encode_v1(("198.51.100.2", 1), ("10.0.0.1", 80)))
    c = await raw_conn(p.port)
    await c.send(encode_v1(("198.51.100.1", 2), ("10.0.0.1", 80)))
    resp = await c.read_response()
    assert resp.status == 503 and b"max_connections_per_ip" in resp.body
    for ws in (a, b):
        await ws.send("ok")
        assert await ws.recv() == "ok"
        await ws.close()

"""TLS termination on listeners (SNI, reload) and TLS to upstreams, with real TLS peers."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import warnings

import aiohttp
import pytest
from aiohttp import web

from edgeproxy.core._accel import SPEEDUPS

HOST = "127.0.0.1"


def client_context(ca: str, *, alpn: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if alpn:
        ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def peer_cert_cn(port: int, ca: str, server_name: str | None, verify_name: bool = True) -> tuple[str, str | None, str]:
    """(subject CN, ALPN, TLS version) of what the proxy presents for ``server_name``."""
    ctx = client_context(ca)
    ctx.check_hostname = server_name is not None and verify_name
    reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=server_name or "")
    try:
        sslobj = writer.get_extra_info("ssl_object")
        cert = sslobj.getpeercert()
        cn = dict(x[0] for x in cert["subject"])["commonName"]
        return cn, sslobj.selected_alpn_protocol(), sslobj.version()
    finally:
        writer.close()


@pytest.fixture
def tls_files(certs, tmp_path):
    """Default (127.0.0.1/localhost), a.test and *.b.test certificates, copied where a reload can replace them."""
    out = {}
    for name, sans in [("default", ["DNS:localhost", "IP:127.0.0.1"]), ("a.test", ["DNS:a.test"]), ("*.b.test", ["DNS:*.b.test"])]:
        leaf = certs.leaf(name, sans)
        cert, key = tmp_path / f"{name.replace('*', 'star')}.pem", tmp_path / f"{name.replace('*', 'star')}.key"
        shutil.copy(leaf.cert, cert)
        shutil.copy(leaf.key, key)
        out[name] = (str(cert), str(key))
    return out


def listener_toml(files, sni: bool = False) -> list[dict]:
    listener = {"bind": f"{HOST}:0", "tls_cert": files["default"][0], "tls_key": files["default"][1]}
    if sni:
        listener["tls_sni"] = [{"host": host, "cert": files[host][0], "key": files[host][1]} for host in ("a.test", "*.b.test")]
    return [listener]


async def tls_proxy(proxy, backend, files, **kw):
    """A proxy whose listener has TLS with SNI certificates for a.test and *.b.test."""
    return await proxy(backend, listeners=listener_toml(files, sni=True), **kw)


async def test_wss_through_the_proxy_and_sni_picks_the_certificate(ws_backend, proxy, tls_files, certs, ws_connect):
    p = await tls_proxy(proxy, ws_backend, tls_files)
    ws = await ws_connect(f"wss://localhost:{p.port}/echo", ssl=client_context(certs.ca_cert))
    await ws.send("over tls")
    assert await asyncio.wait_for(ws.recv(), 5) == "over tls"
    rec = (await ws_backend.wait_records(1))[0]
    assert rec.header("X-Forwarded-Proto") == "https"
    # Only the loop's SSL layer can decrypt it: the relay engine leaves the pair there.
    assert p.server.relay_engine.stats()["sockets"] == 0
    if SPEEDUPS:
        assert p.server.relay_engine.stats()["fallbacks"] == 1
    await ws.close()
    assert await peer_cert_cn(p.port, certs.ca_cert, "a.test") == ("a.test", "http/1.1", "TLSv1.3")
    assert (await peer_cert_cn(p.port, certs.ca_cert, "x.b.test"))[0] == "*.b.test"
    assert (await peer_cert_cn(p.port, certs.ca_cert, "deep.x.b.test", verify_name=False))[0] == "default"  # one label only
    assert (await peer_cert_cn(p.port, certs.ca_cert, None))[0] == "default"  # no SNI at all


async def test_tls_1_1_is_refused(ws_backend, proxy, tls_files, certs):
    p = await proxy(ws_backend, listeners=listener_toml(tls_files))
    ctx = client_context(certs.ca_cert)
    ctx.check_hostname = False
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1: the server must say no
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated: that is the point
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await asyncio.wait_for(asyncio.open_connection(HOST, p.port, ssl=ctx), 5)
    # TLS 1.2 works
    ctx12 = client_context(certs.ca_cert)
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    reader, writer = await asyncio.open_connection(HOST, p.port, ssl=ctx12, server_hostname="localhost")
    assert writer.get_extra_info("ssl_object").version() == "TLSv1.2"
    writer.close()


async def test_reload_swaps_certificates_without_dropping_connections(ws_backend, proxy, tls_files, certs, ws_connect):
    p = await tls_proxy(proxy, ws_backend, tls_files)
    ws = await ws_connect(f"wss://localhost:{p.port}/echo", ssl=client_context(certs.ca_cert))
    await ws.send("before")
    assert await ws.recv() == "before"
    # a new certificate for a.test lands where the config points, then the reload
    fresh = certs.leaf("a.test renewed", ["DNS:a.test"], tag="-renewed")
    shutil.copy(fresh.cert, tls_files["a.test"][0])
    shutil.copy(fresh.key, tls_files["a.test"][1])
    assert (await peer_cert_cn(p.port, certs.ca_cert, "a.test"))[0] == "a.test"  # not yet
    assert p.server.reload_certificates() == 1
    assert (await peer_cert_cn(p.port, certs.ca_cert, "a.test"))[0] == "a.test renewed"
    # the session opened before the reload goes on
    await ws.send("after")
    assert await asyncio.wait_for(ws.recv(), 5) == "after"
    # a broken file: the reload fails and the served certificates stay
    with open(tls_files["a.test"][1], "w") as fh:
        fh.write("garbage")
    with pytest.raises((ssl.SSLError, OSError)):
        p.server.reload_certificates()
    assert (await peer_cert_cn(p.port, certs.ca_cert, "a.test"))[0] == "a.test renewed"
    await ws.send("still")
    assert await asyncio.wait_for(ws.recv(), 5) == "still"


async def test_slow_tls_handshake_is_cut(ws_backend, proxy, tls_files, raw_conn, ws_connect, certs):
    """A client that connects and never says hello is closed after http.header_timeout."""
    p = await proxy(ws_backend, listeners=listener_toml(tls_files), http={"header_timeout": 0.5})
    c = await raw_conn(p.port)
    await c.expect_closed(timeout=5)
    ws = await ws_connect(f"wss://localhost:{p.port}/echo", ssl=client_context(certs.ca_cert))
    await ws.send("other client fine")
    assert await ws.recv() == "other client fine"


# ---------------------------------------------------------------------------
# TLS to upstreams


@pytest.fixture
async def tls_backend(certs):
    """An aiohttp HTTPS + WSS backend on 127.0.0.1 with a certificate for app.internal."""
    leaf = certs.leaf("app.internal", ["DNS:app.internal"], tag="-backend")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(leaf.cert, leaf.key)

    async def hello(request):
        return web.Response(text=f"tls backend saw proto={request.headers.get('X-Forwarded-Proto')}")

    async def echo(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield port
    await runner.cleanup()


async def test_upstream_tls_verified(tls_backend, proxy, certs, ws_connect):
    p = await proxy(tls_backend, upstream={"tls": True, "tls_ca": certs.ca_cert, "tls_server_name": "app.internal"})
    async with aiohttp.ClientSession() as session:
        async with session.get(p.url("/hello")) as resp:
            assert resp.status == 200
            assert await resp.text() == "tls backend saw proto=http"
    ws = await ws_connect(p.ws_url("/ws"))
    await ws.send("to a tls upstream")
    assert await asyncio.wait_for(ws.recv(), 5) == "to a tls upstream"
    assert p.server.relay_engine.stats()["sockets"] == 0  # a TLS upstream keeps the pair on the loop


async def test_upstream_tls_verification_fails_on_the_wrong_name(tls_backend, proxy, certs):
    p = await proxy(tls_backend, upstream={"tls": True, "tls_ca": certs.ca_cert, "tls_server_name": "other.internal"})
    async with aiohttp.ClientSession() as session:
        async with session.get(p.url("/hello")) as resp:
            assert resp.status == 502
    # without verification the same upstream is reached
    q = await proxy(tls_backend, upstream={"tls": True, "tls_verify": False})
    async with aiohttp.ClientSession() as session:
        async with session.get(q.url("/hello")) as resp:
            assert resp.status == 200


async def test_upstream_tls_unknown_ca_fails(tls_backend, proxy, tmp_path):
    from tests.certs import CertFactory

    other = CertFactory(str(tmp_path), "another CA")
    p = await proxy(tls_backend, upstream={"tls": True, "tls_ca": other.ca_cert, "tls_server_name": "app.internal"})
    async with aiohttp.ClientSession() as session:
        async with session.get(p.url("/hello")) as resp:
            assert resp.status == 502
    assert os.path.exists(other.ca_cert)


async def test_a_config_reload_rereads_certificates_even_when_nothing_else_changed(ws_backend, proxy, tls_files, certs):
    """SIGHUP's path (`ProxyServer.reload`): renewed certificates on disk are picked up."""
    from edgeproxy.config import parse_config

    p = await tls_proxy(proxy, ws_backend, tls_files)
    fresh = certs.leaf("a.test renewed", ["DNS:a.test"], tag="-renewed2")
    shutil.copy(fresh.cert, tls_files["a.test"][0])
    shutil.copy(fresh.key, tls_files["a.test"][1])
    result = await p.server.reload(parse_config(p.config_text))
    assert result["changed"] == []  # the same settings: a no-op but for the certificates
    assert (await peer_cert_cn(p.port, certs.ca_cert, "a.test"))[0] == "a.test renewed"

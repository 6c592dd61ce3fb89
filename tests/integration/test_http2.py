"""HTTP/2 at the edge (issue #16): h2 over TLS by ALPN and h2c by prior knowledge, with clients nobody here wrote.

curl (Debian's, built with nghttp2) and httpx[http2] are the clients; the
upstreams are the aiohttp backend of conftest.py, speaking HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import json
import ssl

import httpx
import pytest

from edgeproxy.core._accel import SPEEDUPS  # noqa: F401  (the mode under test shows in -v output)

HOST = "127.0.0.1"



@pytest.fixture(autouse=True)
def _curl(external_tool) -> None:
    """curl (Debian's, with nghttp2) is the client: missing, the tests skip, or fail under CI=true."""
    external_tool("curl", "curl")


def tls_listener(certs) -> dict:
    leaf = certs.leaf("default", ["DNS:localhost", "IP:127.0.0.1"])
    return {"bind": f"{HOST}:0", "tls_cert": leaf.cert, "tls_key": leaf.key}


async def curl(*args: str, timeout: float = 10.0) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", str(int(timeout)), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout + 5)
    return proc.returncode, out, err


async def test_curl_http2_over_tls_negotiates_h2_and_forwards_http11(http_backend, proxy, certs):
    p = await proxy(http_backend, listeners=[tls_listener(certs)])
    code, out, err = await curl("--http2", "--cacert", certs.ca_cert, "-w", "\n%{http_version} %{response_code}",
                                f"https://localhost:{p.port}/headers?x=1", "-H", "Cookie: a=1", "-H", "Cookie: b=2")
    assert code == 0, err
    body, _, tail = out.rpartition(b"\n")
    assert tail == b"2 200"
    seen = json.loads(body)
    assert seen["version"] == "1.1" and seen["path"] == "/headers?x=1"
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["host"] == f"localhost:{p.port}"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-for"] == HOST
    assert headers["cookie"] == "a=1; b=2"  # RFC 9113 section 8.2.3: the crumbs joined for HTTP/1.1
    assert p.server.metrics.http2_connections == 1


async def test_curl_h2c_prior_knowledge_and_http11_on_the_same_listener(http_backend, proxy):
    p = await proxy(http_backend, listeners=[{"bind": f"{HOST}:0", "http2": True}])
    code, out, err = await curl("--http2-prior-knowledge", "-w", "%{http_version}", f"http://{HOST}:{p.port}/head")
    assert code == 0, err
    assert out == b"h" * 1234 + b"2"
    code, out, err = await curl("--http1.1", "-w", "%{http_version}", f"http://{HOST}:{p.port}/head")
    assert code == 0 and out.endswith(b"1.1"), err


async def test_h2c_is_off_by_default_on_a_cleartext_listener(http_backend, proxy):
    p = await proxy(http_backend)
    code, out, err = await curl("--http2-prior-knowledge", f"http://{HOST}:{p.port}/head")
    assert code != 0  # the HTTP/1.1 parser refuses the preface (505): no HTTP/2 here
    assert p.server.metrics.http2_connections == 0


async def _pieces(*chunks: bytes):
    for chunk in chunks:
        yield chunk


async def test_httpx_multiplexes_bodies_and_error_statuses_on_one_connection(http_backend, proxy, certs, refused_port):
    p = await proxy(http_backend, listeners=[tls_listener(certs)],
                    upstreams=[{"name": "app", "servers": [f"{HOST}:{http_backend.port}"]},
                               {"name": "gone", "servers": [f"{HOST}:{refused_port}"]}],
                    routes=[{"path_prefix": "/gone", "upstream": "gone"}, {"path_prefix": "/", "upstream": "app"}])
    ctx = ssl.create_default_context(cafile=certs.ca_cert)
    async with httpx.AsyncClient(http2=True, verify=ctx, base_url=f"https://localhost:{p.port}") as client:
        payload = bytes(range(256)) * 1000
        results = await asyncio.gather(
            client.post("/upload", content=payload),
            client.post("/upload", content=_pieces(payload[:1000], payload[1000:])),  # no length: chunked upstream
            client.get("/stream", params={"size": 300000, "chunked": "1"}),
            client.get("/gone/x"),
            client.head("/head"),
            client.get("/nocontent"),
            *[client.get("/slow", params={"delay": "0.2", "id": str(i)}) for i in range(20)],
        )
    assert all(r.http_version == "HTTP/2" for r in results)
    sized, chunked, stream, gone, head, nocontent, *slow = results
    assert sized.json()["length"] == len(payload) and sized.json()["content_length"] == str(len(payload))
    assert chunked.json()["length"] == len(payload) and chunked.json()["transfer_encoding"] == "chunked"
    assert len(stream.content) == 300000
    assert gone.status_code == 502
    assert head.status_code == 200 and head.headers["content-length"] == "1234" and head.content == b""
    assert nocontent.status_code == 204
    assert [r.text for r in slow] == [f"slow {i}" for i in range(20)]
    assert p.server.metrics.http2_connections == 1
    assert p.server.metrics.http2_streams == 26

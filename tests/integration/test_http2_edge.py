"""HTTP/2 streams get the HTTP/1.1 edge rules: route rate limits, body limits, X-Request-Id, hubs stay HTTP/1.1."""

from __future__ import annotations

import asyncio
import re

import httpx

HOST = "127.0.0.1"
H2C = {"bind": f"{HOST}:0", "http2": True}


def h2c(p) -> httpx.AsyncClient:
    return httpx.AsyncClient(http1=False, http2=True, base_url=f"http://{HOST}:{p.port}", timeout=10)


async def test_route_rate_limit_answers_429_on_the_stream(http_backend, proxy) -> None:
    p = await proxy(http_backend, listeners=[H2C],
                    routes=[{"path_prefix": "/", "upstream": "app", "rate_limit": {"rate": 0.5, "burst": 3}}])
    async with h2c(p) as client:
        answers = await asyncio.gather(*(client.get("/head") for _ in range(6)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200, 200, 200, 429, 429, 429] and all(r.http_version == "HTTP/2" for r in answers)
    refused = next(r for r in answers if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert len(http_backend.requests) == 3 and p.server.metrics.limits["route_rate"] == 3


async def test_body_limits_hold_for_a_length_and_for_a_stream(http_backend, proxy) -> None:
    p = await proxy(http_backend, listeners=[H2C], http={"max_body_size": 1000})
    async with h2c(p) as client:
        big = await client.post("/upload", content=b"x" * 1001)
        assert big.status_code == 413 and "1001 bytes" in big.text

        async def pieces():
            for _ in range(10):
                yield b"y" * 300

        streamed = await client.post("/upload", content=pieces())  # no length: counted as it comes
        assert streamed.status_code == 413
        fine = await client.post("/upload", content=b"z" * 1000)
        assert fine.status_code == 200 and fine.json()["length"] == 1000
    # the declared-too-large one never reached the upstream; the streamed one was reset there (its
    # handler never answered), so the only upload the upstream completed is the one within the limit
    lengths = [dict((k.lower(), v) for k, v in r.headers).get("content-length") for r in http_backend.requests]
    assert "1001" not in lengths and lengths.count("1000") == 1 and len(lengths) <= 2
    assert p.server.metrics.limits["max_body_size"] == 2


async def test_request_ids_are_kept_made_and_passed_upstream(http_backend, proxy) -> None:
    p = await proxy(http_backend, listeners=[H2C])
    async with h2c(p) as client:
        kept = (await client.get("/headers", headers={"x-request-id": "abc-123"})).json()
        made = (await client.get("/headers")).json()
        replaced = (await client.get("/headers", headers={"x-request-id": "bad id"})).json()
    ids = [dict((k.lower(), v) for k, v in doc["headers"])["x-request-id"] for doc in (kept, made, replaced)]
    assert ids[0] == "abc-123"
    assert re.fullmatch(r"[0-9a-f]{32}", ids[1]) and re.fullmatch(r"[0-9a-f]{32}", ids[2])


async def test_a_hub_path_makes_the_client_retry_over_http11(proxy, http_backend, certs, external_tool) -> None:
    """curl gets HTTP_1_1_REQUIRED on its h2 stream and retries the event stream over HTTP/1.1 by itself."""
    curl = external_tool("curl", "curl")
    leaf = certs.leaf("default", ["DNS:localhost", "IP:127.0.0.1"])
    p = await proxy(http_backend, listeners=[{"bind": f"{HOST}:0", "tls_cert": leaf.cert, "tls_key": leaf.key}],
                    hubs=[{"path": "/hub", "ping_interval": 0}])
    proc = await asyncio.create_subprocess_exec(
        curl, "-sS", "-N", "--http2", "--max-time", "3", "--cacert", certs.ca_cert, "-w", "\n%{http_version}",
        f"https://localhost:{p.port}/hub/sse?channel=a",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert b"event: connected" in out and b"event: subscribed" in out, (out, err)
    assert out.rstrip().endswith(b"1.1")  # the event stream itself was HTTP/1.1
    assert http_backend.requests == []  # never routed to the upstream


async def test_the_client_scripts_are_served_over_h2(proxy, http_backend) -> None:
    from edgeproxy.transport.resume import CLIENT_SCRIPTS, client_js

    p = await proxy(http_backend, listeners=[H2C])
    async with h2c(p) as client:
        for path in ("/.edgeproxy/resume-client.js", "/.edgeproxy/hub-client.js"):
            script = await client.get(path)
            assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
            assert script.content == client_js(path) and b"export class" in script.content
    assert len(CLIENT_SCRIPTS) == 2 and http_backend.requests == []


async def test_a_body_that_stops_coming_gets_408_on_its_stream(http_backend, proxy) -> None:
    import h2.config
    import h2.connection
    import h2.events

    p = await proxy(http_backend, listeners=[H2C], http={"body_timeout": 0.3})
    reader, writer = await asyncio.open_connection(HOST, p.port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "POST"), (":path", "/upload"), (":scheme", "http"), (":authority", "x")])
    conn.send_data(1, b"part of a body")  # and then nothing more
    writer.write(conn.data_to_send())
    status = None
    async with asyncio.timeout(5):
        while status is None:
            data = await reader.read(65536)
            assert data, "the proxy closed the connection instead of answering the stream"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
            writer.write(conn.data_to_send())
    writer.close()
    assert status == b"408" and p.server.metrics.limits["body_timeout"] == 1

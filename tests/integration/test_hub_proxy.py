"""Hubs end to end: real sockets, `websockets` clients, the publish API over HTTP, no mocks."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import aiohttp
import orjson
import pytest
from aiohttp import web

from edgeproxy.client import HubClient
from edgeproxy.config import parse_config
from edgeproxy.hub.token import sign_token
from edgeproxy.transport.server import ProxyServer

API_KEY = "test-api-key-0123456789"
SECRET = "hub-secret-0123456789-0123456789-abc"


@pytest.fixture
async def hub(proxy, refused_port):
    """Factory: ``await hub(**hub_keys)`` -> a started proxy with one hub at /hub."""

    async def start(admin: dict | None = None, **keys):
        hub_table = {"path": "/hub", "ping_interval": 0, **keys}
        return await proxy(refused_port, hubs=[hub_table],
                           admin={"bind": "127.0.0.1:0", "api_key": API_KEY, **(admin or {})})

    return start


async def publish(p, body, *, key: str | None = API_KEY, raw: bytes | None = None) -> tuple[int, dict]:
    host, port = p.server.admin.address
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with aiohttp.ClientSession() as http:
        data = raw if raw is not None else orjson.dumps(body)
        async with http.post(f"http://{host}:{port}/v1/publish", data=data, headers=headers) as response:
            return response.status, json.loads(await response.text())


async def recv(ws) -> dict:
    return orjson.loads(await asyncio.wait_for(ws.recv(), 5))


async def subscribed(ws_connect, p, channel: str, since: dict | None = None, path: str = "/hub") -> tuple:
    ws = await ws_connect(p.ws_url(path))
    assert (await recv(ws))["op"] == "connected"
    message = {"op": "subscribe", "channel": channel}
    if since is not None:
        message["since"] = since
    await ws.send(orjson.dumps(message).decode())
    answer = await recv(ws)
    assert answer["op"] == "subscribed", answer
    return ws, answer


# -- the basics ---------------------------------------------------------------------


async def test_publish_reaches_every_subscriber_in_order(hub, ws_connect) -> None:
    p = await hub()
    subs = [await subscribed(ws_connect, p, "news") for _ in range(3)]
    assert {answer["seq"] for _, answer in subs} == {0}
    status, doc = await publish(p, {"channel": "news", "data": {"n": 1}})
    assert status == 200 and doc["seq"] == 1 and doc["epoch"] == subs[0][1]["epoch"]
    status, doc = await publish(p, {"publications": [{"channel": "news", "data": n} for n in (2, 3, 4)]})
    assert status == 200 and [r["seq"] for r in doc["results"]] == [2, 3, 4]
    for ws, _ in subs:
        got = [await recv(ws) for _ in range(4)]
        assert [(m["op"], m["seq"]) for m in got] == [("pub", s) for s in (1, 2, 3, 4)]
        assert [m["data"] for m in got] == [{"n": 1}, 2, 3, 4]
    metrics = p.server.metrics
    assert metrics.fanout_publishes == 4 and metrics.messages["hub_delivery"] >= 12
    # a hub path is never proxied: the only upstream refuses connections, and nothing failed
    assert metrics.opened_total("websocket") == 3


async def test_unsubscribe_stops_delivery(hub, ws_connect) -> None:
    p = await hub()
    ws, _ = await subscribed(ws_connect, p, "a")
    await ws.send('{"op":"unsubscribe","channel":"a"}')
    assert await recv(ws) == {"op": "unsubscribed", "channel": "a"}
    await ws.send('{"op":"subscribe","channel":"b"}')
    assert (await recv(ws))["channel"] == "b"
    await publish(p, {"channel": "a", "data": 1})
    await publish(p, {"channel": "b", "data": 2})
    assert (await recv(ws))["data"] == 2  # nothing of "a" came first


async def test_pings_and_dead_client_detection(hub, ws_connect) -> None:
    p = await hub(ping_interval=0.2)
    ws = await ws_connect(p.ws_url("/hub"))
    assert {**await recv(ws), "client": None} == {"op": "connected", "ping_interval": 0.2, "client": None}
    assert await recv(ws) == {"op": "ping"}
    await ws.send('{"op":"pong"}')
    assert await recv(ws) == {"op": "ping"}
    # Silence from the client for two intervals: the hub drops the connection.
    with pytest.raises(Exception):
        while True:
            assert (await recv(ws))["op"] == "ping"


# -- bad input -------------------------------------------------------------------------


async def test_bad_input_gets_a_clear_error_and_leaves_others_alone(hub, ws_connect) -> None:
    p = await hub(max_message_size=1024, token_secret=SECRET)
    good = sign_token({"channels": ["news", "user.7.*"]}, SECRET.encode())
    bystander = await ws_connect(p.ws_url(f"/hub?token={good}"))
    assert (await recv(bystander))["op"] == "connected"
    await bystander.send('{"op":"subscribe","channel":"news"}')
    assert (await recv(bystander))["recovered"] is False

    offender = await ws_connect(p.ws_url("/hub"), additional_headers={"Authorization": f"Bearer {good}"})
    assert (await recv(offender))["op"] == "connected"
    cases = [
        ("{not json", "bad_json", "malformed JSON"),
        ('{"op":"publish","channel":"news"}', "unknown_op", "unknown op 'publish'"),
        ('{"op":"subscribe"}', "bad_message", '"channel" must be a string'),
        ('{"op":"subscribe","channel":"no spaces"}', "bad_channel", "invalid channel name"),
        ('{"op":"subscribe","channel":"secret"}', "forbidden", "no token grants channel 'secret'"),
        ('{"op":"subscribe","channel":"secret","token":"x.y.z"}', "bad_token", "token"),
        ('{"op":"unsubscribe","channel":"other"}', "not_subscribed", "not subscribed"),
    ]
    for raw, code, words in cases:
        await offender.send(raw)
        answer = await recv(offender)
        assert answer["op"] == "error" and answer["code"] == code and words in answer["message"], answer
    # A subscribe token can grant what the connection token does not.
    extra = sign_token({"channels": ["secret"]}, SECRET.encode())
    await offender.send(orjson.dumps({"op": "subscribe", "channel": "secret", "token": extra}).decode())
    assert (await recv(offender))["op"] == "subscribed"
    await offender.send('{"op":"subscribe","channel":"user.7.inbox"}')
    assert (await recv(offender))["op"] == "subscribed"
    # Oversize: an error, then close 1009.
    await offender.send('{"op":"subscribe","channel":"' + "x" * 2000 + '"}')
    answer = await recv(offender)
    assert answer["code"] == "message_too_big" and "max_message_size 1024" in answer["message"]
    await asyncio.wait_for(offender.wait_closed(), 5)
    assert offender.close_code == 1009

    # Publish without or with a wrong key, and malformed publishes.
    assert (await publish(p, {"channel": "news", "data": 1}, key=None))[0] == 401
    status, doc = await publish(p, {"channel": "news", "data": 1}, key="wrong-key-0123456789")
    assert status == 401 and "API key" in doc["error"]
    for body, raw, status_expected, words in [
        (None, b"{nope", 400, "not JSON"),
        ({"channel": "news"}, None, 400, "body.data: missing"),
        ({"channel": "bad channel", "data": 1}, None, 400, "body.channel"),
        ({"channel": "news", "data": 1, "extra": 2}, None, 400, "unknown field(s) extra"),
        ({"publications": []}, None, 400, "not empty"),
        ({"publications": [{"channel": "news", "data": 1}, {"channel": "news"}]}, None, 400, "publications[1].data"),
        ({"channel": "news", "data": "x" * 2000}, None, 413, "over the hub's max_message_size 1024"),
        ({"channel": "news", "data": 1, "hub": "/nope"}, None, 400, "no hub at '/nope'"),
    ]:
        status, doc = await publish(p, body, raw=raw)
        assert status == status_expected and words in doc["error"], (status, doc)
    # The bystander saw none of it, and still gets the next publication (seq 1: nothing
    # of the refused batch was published).
    status, doc = await publish(p, {"channel": "news", "data": "still here"})
    assert status == 200 and doc["seq"] == 1
    assert await recv(bystander) == {"op": "pub", "channel": "news", "seq": 1, "epoch": doc["epoch"],
                                     "data": "still here"}


async def test_bad_connect_token_closes_with_4001_and_expired_with_4002(hub, ws_connect, caplog) -> None:
    p = await hub(token_secret=SECRET)
    assert "anonymous mode" not in caplog.text
    ws = await ws_connect(p.ws_url("/hub?token=not.a.token"))
    assert (await recv(ws))["op"] == "connected"
    answer = await recv(ws)
    assert answer["code"] == "bad_token" and "token header is not JSON" in answer["message"]
    await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.close_code == 4001
    expired = sign_token({"channels": ["*"], "exp": 1}, SECRET.encode())
    ws = await ws_connect(p.ws_url(f"/hub?token={expired}"))
    await recv(ws)
    assert (await recv(ws))["code"] == "token_expired"
    await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.close_code == 4002


async def test_publish_api_is_off_without_a_key_and_bodies_are_bounded(proxy, refused_port, caplog) -> None:
    p = await proxy(refused_port, hubs=[{"path": "/hub"}], admin={"bind": "127.0.0.1:0", "max_publish_size": 1024})
    assert "hub /hub has no token_secret: anonymous mode" in caplog.text
    status, doc = await publish(p, {"channel": "c", "data": 1})
    assert status == 403 and "api_key" in doc["error"]
    q = await proxy(refused_port, hubs=[{"path": "/hub"}],
                    admin={"bind": "127.0.0.1:0", "max_publish_size": 1024, "api_key": API_KEY})
    status, doc = await publish(q, {"channel": "c", "data": "x" * 5000})
    assert status == 413 and "max_publish_size (1024 bytes)" in doc["error"]


async def test_auth_hook_allows_denies_and_fails_closed(hub, ws_connect, aiohttp_hook) -> None:
    port, seen = aiohttp_hook
    p = await hub(auth_hook=f"http://127.0.0.1:{port}/auth", auth_hook_timeout=1.0)
    ws = await ws_connect(p.ws_url("/hub"))
    await recv(ws)
    await ws.send('{"op":"subscribe","channel":"open"}')
    assert (await recv(ws))["op"] == "subscribed"
    await ws.send('{"op":"subscribe","channel":"closed"}')
    assert (await recv(ws))["code"] == "forbidden"
    await ws.send('{"op":"subscribe","channel":"broken"}')
    answer = await recv(ws)
    assert answer["code"] == "auth_unavailable" and "500" in answer["message"]
    assert [s["channel"] for s in seen] == ["open", "closed", "broken"]
    assert seen[0]["client"] == "127.0.0.1"


@pytest.fixture
async def aiohttp_hook():
    seen: list[dict] = []

    async def auth(request: web.Request) -> web.Response:
        doc = await request.json()
        seen.append(doc)
        return web.Response(status={"open": 200, "closed": 403}.get(doc["channel"], 500))

    app = web.Application()
    app.router.add_post("/auth", auth)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield site._server.sockets[0].getsockname()[1], seen
    await runner.cleanup()


# -- resume --------------------------------------------------------------------------


async def test_resume_replays_what_was_missed_exactly_once(hub, ws_connect) -> None:
    p = await hub(history_size=100)
    ws, first = await subscribed(ws_connect, p, "c")
    for n in range(1, 4):
        await publish(p, {"channel": "c", "data": n})
    got = [await recv(ws) for _ in range(3)]
    await ws.close()
    for n in range(4, 9):
        await publish(p, {"channel": "c", "data": n})
    since = {"seq": got[-1]["seq"], "epoch": got[-1]["epoch"]}
    ws, answer = await subscribed(ws_connect, p, "c", since)
    assert answer == {"op": "subscribed", "channel": "c", "seq": 8, "epoch": first["epoch"], "recovered": True}
    assert [(await recv(ws))["data"] for _ in range(5)] == [4, 5, 6, 7, 8]
    await publish(p, {"channel": "c", "data": 9})
    assert (await recv(ws))["seq"] == 9
    # History of 100 no longer covers a gap of 150: recovered false, and no replay.
    await publish(p, {"publications": [{"channel": "c", "data": n} for n in range(150)]})
    ws2, answer = await subscribed(ws_connect, p, "c", {"seq": 9, "epoch": first["epoch"]})
    assert answer["recovered"] is False and answer["seq"] == 159
    await publish(p, {"channel": "c", "data": "live"})
    assert (await recv(ws2))["seq"] == 160


async def test_resume_while_publishing_has_no_gap_and_no_duplicate(hub, ws_connect) -> None:
    """Resubscribe with `since` over and over while a publisher never stops."""
    p = await hub(history_size=10000)
    ws, answer = await subscribed(ws_connect, p, "c")
    epoch = answer["epoch"]
    stop = asyncio.Event()
    seqs: list[int] = []

    async def publisher() -> int:
        sent = 0
        while not stop.is_set():
            await publish(p, {"publications": [{"channel": "c", "data": sent + i} for i in range(5)]})
            sent += 5
            # never more than history (10,000) ahead of the reader, however slow the machine
            while sent - (seqs[-1] if seqs else 0) > 2000 and not stop.is_set():
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.002)
        return sent

    task = asyncio.create_task(publisher())
    for _ in range(15):
        for _ in range(3):
            message = await recv(ws)
            if message["op"] == "pub":
                seqs.append(message["seq"])
        await ws.close()
        ws, answer = await subscribed(ws_connect, p, "c", {"seq": seqs[-1] if seqs else 0, "epoch": epoch})
        assert answer["recovered"] is True, (answer, seqs[-3:], epoch)
    stop.set()
    total = await task
    while len(seqs) < total:
        seqs.append((await recv(ws))["seq"])
    assert seqs == list(range(1, total + 1))


async def test_epoch_change_gives_recovered_false(hub, ws_connect, proxy, refused_port) -> None:
    """A proxy restart loses in-memory history: the same position is not recovered."""
    p = await hub()
    ws, answer = await subscribed(ws_connect, p, "c")
    await publish(p, {"channel": "c", "data": 1})
    pub = await recv(ws)
    await p.server.stop()
    q = await hub()
    ws, answer = await subscribed(ws_connect, q, "c", {"seq": pub["seq"], "epoch": pub["epoch"]})
    assert answer["recovered"] is False and answer["epoch"] != pub["epoch"] and answer["seq"] == 0
    status, doc = await publish(q, {"channel": "c", "data": 2})
    assert (await recv(ws)) == {"op": "pub", "channel": "c", "seq": 1, "epoch": answer["epoch"], "data": 2}


# -- slow consumers --------------------------------------------------------------------


def _raw_hub_socket(port: int) -> socket.socket:
    """A blocking client socket with a tiny receive buffer, upgraded to /hub by hand."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /hub HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    return sock


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos + 2 <= len(data):
        opcode, length = data[pos] & 15, data[pos + 1] & 127
        pos += 2
        if length == 126:
            (length,) = struct.unpack_from("!H", data, pos)
            pos += 2
        elif length == 127:
            (length,) = struct.unpack_from("!Q", data, pos)
            pos += 8
        out.append((opcode, data[pos : pos + length]))
        pos += length
    return out


async def test_slow_consumer_is_dropped_with_4000_and_recovers(hub, ws_connect) -> None:
    p = await hub(subscriber_buffer_limit=65536, history_size=1000, max_message_size=300000)
    fast, answer = await subscribed(ws_connect, p, "c")
    sock = _raw_hub_socket(p.port)
    mask = b"\x00\x00\x00\x00"
    subscribe = b'{"op":"subscribe","channel":"c"}'
    sock.sendall(bytes([0x81, 0x80 | len(subscribe)]) + mask + subscribe)
    await asyncio.sleep(0.2)  # the slow client reads nothing from now on
    payload = "x" * 200000  # loopback socket buffers take megabytes before the proxy buffers any
    seen_fast = 0
    for _ in range(300):
        await publish(p, {"channel": "c", "data": payload})
        seen_fast += 1
        assert (await recv(fast))["seq"] == seen_fast  # the fast subscriber keeps up
        if p.server.metrics.fanout_subscribers_dropped:
            break
    assert p.server.metrics.fanout_subscribers_dropped == 1
    for _ in range(5):  # publications go on for the others
        await publish(p, {"channel": "c", "data": payload})
        seen_fast += 1
        assert (await recv(fast))["seq"] == seen_fast
    # The slow client now reads: what was buffered for it, then close 4000.
    sock.setblocking(False)
    data = bytearray()
    loop = asyncio.get_running_loop()
    while True:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
        if not chunk:
            break
        data += chunk
    sock.close()
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    frames = _frames(rest)
    assert frames[-1][0] == 8 and struct.unpack("!H", frames[-1][1][:2])[0] == 4000
    messages = [orjson.loads(payload) for opcode, payload in frames[:-1] if opcode == 1]
    pubs = [m for m in messages if m["op"] == "pub"]
    last = pubs[-1]
    assert [m["seq"] for m in pubs] == list(range(1, last["seq"] + 1)) and last["seq"] < seen_fast
    # It resumes from its last seq and misses nothing.
    ws, answer = await subscribed(ws_connect, p, "c", {"seq": last["seq"], "epoch": last["epoch"]})
    assert answer["recovered"] is True
    assert [(await recv(ws))["seq"] for _ in range(seen_fast - last["seq"])] == list(range(last["seq"] + 1, seen_fast + 1))


async def test_huge_channel_is_written_in_slices(hub, ws_connect) -> None:
    """fanout_batch = 3 with 10 subscribers: four loop iterations, everyone gets it all, in order."""
    p = await hub(fanout_batch=3)
    subs = [(await subscribed(ws_connect, p, "c"))[0] for _ in range(10)]
    await publish(p, {"publications": [{"channel": "c", "data": n} for n in range(20)]})
    await publish(p, {"channel": "c", "data": 20})
    for ws in subs:
        assert [(await recv(ws))["data"] for _ in range(21)] == list(range(21))
    metrics = p.server.metrics
    assert metrics.fanout_publishes == 21 and metrics.messages["hub_delivery"] == 210


# -- the Python client ---------------------------------------------------------------


async def test_client_resubscribes_and_drops_duplicates(hub) -> None:
    p = await hub(ping_interval=0.5, history_size=100)
    unrecovered: list = []
    async with HubClient(p.ws_url("/hub"), on_unrecovered=lambda c, pos: unrecovered.append((c, pos))) as client:
        await client.subscribe("c")
        await asyncio.wait_for(client.connected.wait(), 5)
        await asyncio.sleep(0.1)
        await publish(p, {"channel": "c", "data": 1})
        first = await asyncio.wait_for(client.next_publication(), 5)
        assert (first.seq, first.data) == (1, 1)
        # Kill its connection under it: it reconnects and resumes.
        client._ws.transport.abort()
        await publish(p, {"channel": "c", "data": 2})
        second = await asyncio.wait_for(client.next_publication(), 10)
        assert (second.seq, second.data) == (2, 2) and client.connects == 2
        assert unrecovered == []


async def test_client_backoff_policy() -> None:
    from edgeproxy.client import HubClient, hub_backoff
    from edgeproxy.reconnect import Backoff

    b = hub_backoff()  # the same Backoff as the resume client's, with a 0.5 s floor
    assert isinstance(b, Backoff) and isinstance(HubClient("ws://127.0.0.1:1/hub").backoff, Backoff)
    assert [b.delay(0, 0.0), b.delay(0, 1.0)] == [0.5, 1.0]
    assert [b.delay(n, 1.0) for n in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert b.delay(100, 0.0) == 0.5
    custom = hub_backoff(min_delay=0.1, first_max=0.2, max_delay=1.0)
    assert custom.delay(3, 1.0) == 1.0


async def test_proxy_restart_on_same_port_is_reported_unrecovered(refused_port) -> None:
    """The client sees the epoch change across a restart and says so."""
    text = (f'[[listeners]]\nbind = "127.0.0.1:0"\n[[upstreams]]\nname = "a"\nservers = ["127.0.0.1:{refused_port}"]\n'
            f'[[routes]]\nupstream = "a"\n[admin]\nenabled = false\n[[hubs]]\npath = "/hub"\nping_interval = 0.5\n')
    first = ProxyServer(parse_config(text))
    await first.start()
    port = first.addresses[0][1]
    hub = first.hubs["/hub"]
    unrecovered: list = []
    client = HubClient(f"ws://127.0.0.1:{port}/hub", on_unrecovered=lambda c, pos: unrecovered.append(pos))
    client.start()
    try:
        await client.subscribe("c")
        await asyncio.wait_for(client.connected.wait(), 5)
        await asyncio.sleep(0.1)
        await hub.publish("c", b'"one"')
        assert (await asyncio.wait_for(client.next_publication(), 5)).data == "one"
        await first.stop()
        second = ProxyServer(parse_config(text.replace("127.0.0.1:0", f"127.0.0.1:{port}", 1)))
        await second.start()
        try:
            await asyncio.wait_for(_until(lambda: unrecovered), 10)
            assert unrecovered[0].epoch != hub.backplane.streams["c"].epoch and unrecovered[0].seq == 0
            await second.hubs["/hub"].publish("c", b'"two"')
            pub = await asyncio.wait_for(client.next_publication(), 5)
            assert (pub.seq, pub.data) == (1, "two")
        finally:
            await second.stop()
    finally:
        await client.close()


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.02)

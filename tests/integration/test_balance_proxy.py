"""Balancing, affinity, health and rebalancing end to end, with several real backends.

Each backend is a real `websockets` server (or a raw HTTP server where a test
needs to switch a health endpoint); which backend served a session is read
from the backends' own records, never from the proxy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
import time

import pytest
from websockets.exceptions import ConnectionClosed

from edgeproxy.config import Address
from edgeproxy.core.affinity import AffinityCodec

HOST = "127.0.0.1"
SECRET = "integration-test-secret-0123"
COOKIE = "ep"
AFFINITY = {"cookie": COOKIE, "secret": SECRET, "max_age": 600}
_ids = itertools.count()


def affinity_toml(**extra) -> str:
    keys = {**AFFINITY, **extra}
    lines = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in keys.items())
    return f"[upstreams.affinity]\n{lines}\n"


@pytest.fixture
async def balanced():
    """Factory: ``await balanced(backends, balance=..., tables=..., servers=...)`` -> a started proxy.

    One upstream "app" routed at "/", with the TOML sub-tables in ``tables``
    (written here because the shared ``proxy`` fixture renders flat keys only).
    """
    from edgeproxy.config import parse_config
    from edgeproxy.transport.server import ProxyServer

    started = []

    async def factory(backends, *, balance="round_robin", tables="", upstream_keys=None, servers=None):
        if servers is None:
            servers = "[" + ", ".join(f'"{HOST}:{b.port}"' for b in backends) + "]"
        keys = "".join(f"{k} = {v}\n" for k, v in (upstream_keys or {}).items())
        text = (
            f'[[listeners]]\nbind = "{HOST}:0"\n\n[[upstreams]]\nname = "app"\nservers = {servers}\n'
            f'balance = "{balance}"\n{keys}{tables}\n[[routes]]\nupstream = "app"\n'
            # an ephemeral admin port, as the shared fixture does: proxies run side by side
            f'\n[admin]\nbind = "{HOST}:0"\n'
        )
        server = ProxyServer(parse_config(text))
        await asyncio.wait_for(server.start(), 5)
        started.append(server)
        return Proxy(server, text)

    yield factory
    for server in started:
        await asyncio.wait_for(server.stop(), 10)


@dataclasses.dataclass
class Proxy:
    server: object
    config_text: str

    @property
    def port(self) -> int:
        return self.server.addresses[0][1]

    def ws_url(self, path: str) -> str:
        return f"ws://{HOST}:{self.port}{path}"


def group_of(handle):
    return handle.server.groups["app"]


def served_by(backends, path: str) -> int:
    """Index of the backend that recorded a session for ``path``."""
    found = [i for i, b in enumerate(backends) for r in b.records if r.path == path]
    assert len(found) == 1, f"{path} seen by backends {found}"
    return found[0]


def cookie_of(ws) -> str | None:
    """The affinity cookie value in the 101's Set-Cookie, or None."""
    header = ws.response.headers.get("Set-Cookie")
    if header is None:
        return None
    assert header.startswith(f"{COOKIE}="), header
    return header.split(";", 1)[0].split("=", 1)[1]


async def open_ws(ws_connect, handle, backends, cookie: str | None = None):
    """Open one session through the proxy; returns (ws, backend index, new cookie or None)."""
    path = f"/echo?c={next(_ids)}"
    headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie else {}
    ws = await ws_connect(handle.ws_url(path), additional_headers=headers)
    await ws.send("hi")
    assert await asyncio.wait_for(ws.recv(), 5) == "hi"
    return ws, served_by(backends, path), cookie_of(ws)


def pin_to(backend) -> str:
    """A valid cookie value naming ``backend``, as the proxy would issue it."""
    codec = AffinityCodec(SECRET.encode(), 600)
    return codec.issue(codec.token(str(Address(HOST, backend.port))), time.time())


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def close_code_of(ws, timeout: float = 5.0) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), timeout)
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason


# --------------------------------------------------------------------------
# affinity
# --------------------------------------------------------------------------


async def test_cookie_keeps_a_client_on_its_server_across_reconnects(balanced, ws_backends, ws_connect) -> None:
    backends = await ws_backends(3)
    handle = await balanced(backends, tables=affinity_toml(path="/", same_site="strict"))
    ws, first, cookie = await open_ws(ws_connect, handle, backends)
    assert cookie is not None
    header = ws.response.headers["Set-Cookie"]
    assert "Path=/" in header and "Max-Age=600" in header and "HttpOnly" in header and "SameSite=Strict" in header
    assert str(backends[first].port) not in cookie  # opaque: no address in it
    await ws.close()
    for _ in range(5):
        ws, where, fresh = await open_ws(ws_connect, handle, backends, cookie)
        assert where == first
        assert fresh is None  # a valid pin is not re-issued
        await ws.close()
    # without the cookie, round robin moves on
    landed = {(await open_ws(ws_connect, handle, backends))[1] for _ in range(3)}
    assert landed == {0, 1, 2}


async def test_cookie_on_http_responses(balanced, http_backend, raw_conn) -> None:
    handle = await balanced([http_backend], tables=affinity_toml())
    conn = await raw_conn(handle.port)
    await conn.send(b"GET /headers HTTP/1.1\r\nHost: x\r\n\r\n")
    response = await conn.read_response()
    assert response.status == 200
    value = response.header("Set-Cookie").split(";")[0].split("=", 1)[1]
    await conn.send(f"GET /headers HTTP/1.1\r\nHost: x\r\nCookie: {COOKIE}={value}\r\n\r\n".encode())
    again = await conn.read_response()
    assert again.status == 200 and not again.has("Set-Cookie")
    # the backend sees the client's cookie untouched
    assert http_backend.requests[-1].header("Cookie") == f"{COOKIE}={value}"


@pytest.mark.parametrize("kind", ["tampered", "expired", "unknown server", "other secret", "garbage"])
async def test_untrusted_cookie_is_balanced_normally_and_replaced(balanced, ws_backends, ws_connect, kind) -> None:
    backends = await ws_backends(2)
    handle = await balanced(backends, tables=affinity_toml())
    codec = AffinityCodec(SECRET.encode(), 600)
    token = codec.token(str(Address(HOST, backends[1].port)))
    good = codec.issue(token, time.time())
    bad = {
        "tampered": codec.token(str(Address(HOST, backends[0].port))) + good[len(token):],
        "expired": codec.issue(token, time.time() - 601),
        "unknown server": codec.issue(codec.token("10.9.9.9:1"), time.time()),
        "other secret": AffinityCodec(b"some-other-secret-value", 600).issue(token, time.time()),
        "garbage": "not-a-cookie",
    }[kind]
    picks = []
    for _ in range(4):
        ws, where, fresh = await open_ws(ws_connect, handle, backends, bad)
        picks.append(where)
        assert fresh is not None and fresh != bad
        assert codec.verify(fresh, time.time()).token == codec.token(str(Address(HOST, backends[where].port)))
        await ws.close()
    assert sorted(picks) == [0, 0, 1, 1]  # round robin, as if there were no cookie


async def test_strict_affinity_holds_under_load(balanced, ws_backends, ws_connect) -> None:
    backends = await ws_backends(2)
    handle = await balanced(backends, tables=affinity_toml())
    cookie = pin_to(backends[0])
    for _ in range(8):
        _, where, fresh = await open_ws(ws_connect, handle, backends, cookie)
        assert where == 0 and fresh is None
    assert group_of(handle).loads() == {Address(HOST, backends[0].port): 8, Address(HOST, backends[1].port): 0}


async def test_gives_way_when_the_pinned_server_holds_far_more_than_its_share(balanced, ws_backends, ws_connect) -> None:
    backends = await ws_backends(2)
    handle = await balanced(backends, tables=affinity_toml(rebalance_threshold=1.5))
    cookie = pin_to(backends[0])
    results = [await open_ws(ws_connect, handle, backends, cookie) for _ in range(6)]
    # 0..3 on backend 0 stay (4 > 1.5 x mean 2 and 2 above it only at the fifth)
    assert [where for _, where, _ in results[:4]] == [0, 0, 0, 0]
    assert all(fresh is None for _, _, fresh in results[:4])
    _, where, fresh = results[4]
    assert where == 1 and fresh is not None  # gave way, re-pinned
    codec = AffinityCodec(SECRET.encode(), 600)
    assert codec.verify(fresh, time.time()).token == codec.token(str(Address(HOST, backends[1].port)))
    # the new cookie is honoured from now on
    _, again, none = await open_ws(ws_connect, handle, backends, fresh)
    assert again == 1 and none is None


# --------------------------------------------------------------------------
# failure, health, drain
# --------------------------------------------------------------------------


async def test_failover_when_a_server_dies_under_live_sessions(balanced, ws_backends, ws_connect) -> None:
    backends = await ws_backends(2)
    handle = await balanced(backends, tables=affinity_toml())
    cookie = pin_to(backends[0])
    sessions = [(await open_ws(ws_connect, handle, backends, cookie))[0] for _ in range(3)]
    await backends[0].kill()
    for ws in sessions:
        code, _ = await close_code_of(ws)
        assert code == 1014  # the upstream vanished
    ws, where, fresh = await open_ws(ws_connect, handle, backends, cookie)
    assert where == 1 and fresh is not None
    codec = AffinityCodec(SECRET.encode(), 600)
    assert codec.verify(fresh, time.time()).token == codec.token(str(Address(HOST, backends[1].port)))


async def test_active_checks_take_a_server_down_close_its_sessions_and_bring_it_back(
    balanced, ws_backends, ws_connect
) -> None:
    backends = await ws_backends(2)
    handle = await balanced(backends, balance="least_conn",
        tables='[upstreams.health]\ncheck = "tcp"\ninterval = 0.05\ntimeout = 0.5\nrise = 3\nfall = 2\nslow_start = 0.3\n'
               "[upstreams.rebalance]\nthreshold = 50.0\nsustain = 100.0\nclose_code = 1013\n"
               "reconnect_delay_min = 0.5\nreconnect_delay_max = 0.9\n",
    )
    group = group_of(handle)
    a = str(Address(HOST, backends[0].port))
    state = lambda: {s["address"]: s["state"] for s in group.snapshot()["servers"]}[a]  # noqa: E731
    live = [await open_ws(ws_connect, handle, backends) for _ in range(4)]
    on_a = [ws for ws, where, _ in live if where == 0]
    assert len(on_a) == 2
    for flap in range(2):  # down and back up, twice
        await backends[0].stop_listening()
        await wait_for(lambda: state() == "down")
        if flap == 0:
            for ws in on_a:  # the proxy ended them itself, with a reconnect hint
                code, reason = await close_code_of(ws)
                assert code == 1013 and re.fullmatch(r"reconnect after 0\.[5-9]s", reason), (code, reason)
        for _ in range(3):
            assert (await open_ws(ws_connect, handle, backends))[1] == 1
        await backends[0].start(port=backends[0].port)
        await wait_for(lambda: state() in ("slow_start", "up"))
        snap = next(s for s in group.snapshot()["servers"] if s["address"] == a)
        assert snap["state"] == "slow_start" and snap["effective_weight"] < 1.0
        await wait_for(lambda: state() == "up")
        assert (await open_ws(ws_connect, handle, backends))[1] == 0  # least_conn: it is the empty one


async def test_http_health_check_follows_a_flapping_endpoint(balanced, raw_backend, raw_conn) -> None:
    healthy = {"ok": True}

    async def handler(conn, reader, writer) -> None:
        buf = bytearray()
        while True:
            head = await raw_backend.read_head(conn, reader, buf)
            if head is None:
                return
            line, headers = raw_backend.parse_head(head)
            conn.requests.append((line, headers, b""))
            if line.startswith(b"GET /healthz"):
                status = b"200 OK" if healthy["ok"] else b"503 Service Unavailable"
            else:
                status = b"200 OK"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    flappy = await raw_backend(handler)
    steady = await raw_backend(raw_backend.mini_http())
    handle = await balanced([flappy, steady],
        tables='[upstreams.health]\ncheck = "http"\npath = "/healthz"\ninterval = 0.05\ntimeout = 0.5\n'
               "rise = 2\nfall = 3\nmax_fails = 0\n",
    )
    group = group_of(handle)
    state = lambda: group.snapshot()["servers"][0]["state"]  # noqa: E731
    await asyncio.sleep(0.3)
    assert state() == "up"
    checks = [r for r in flappy.requests if r[0] == b"GET /healthz HTTP/1.1"]
    assert checks and all((b"Host", f"{HOST}:{flappy.port}".encode()) in r[1] for r in checks)
    healthy["ok"] = False
    await wait_for(lambda: state() == "down")
    failed_checks = len([r for r in flappy.requests if r[0].startswith(b"GET /healthz")]) - len(checks)
    assert failed_checks >= 3  # fall = 3
    conn = await raw_conn(handle.port)
    before = len([r for r in flappy.requests if not r[0].startswith(b"GET /healthz")])
    for _ in range(4):
        await conn.send(b"GET /app HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await conn.read_response()).status == 200
    assert len([r for r in flappy.requests if not r[0].startswith(b"GET /healthz")]) == before
    healthy["ok"] = True
    await wait_for(lambda: state() == "up")


async def test_every_server_down_gives_503_with_retry_after(balanced, raw_conn, refused_port) -> None:
    import socket

    other = socket.socket()
    other.bind((HOST, 0))
    try:
        servers = f'["{HOST}:{refused_port}", "{HOST}:{other.getsockname()[1]}"]'
        handle = await balanced([], servers=servers,
            tables="[upstreams.health]\nmax_fails = 1\neject_base = 7\neject_max = 30\n",
        )
        conn = await raw_conn(handle.port)
        await conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await conn.read_response()).status == 502  # both refused: now both ejected
        await conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await conn.read_response()
        assert response.status == 503
        assert 6 <= int(response.header("Retry-After")) <= 7
        assert [s["state"] for s in group_of(handle).snapshot()["servers"]] == ["down", "down"]
    finally:
        other.close()


async def test_drain_sends_new_connections_elsewhere_and_paces_out_live_ones(balanced, ws_backends, ws_connect) -> None:
    backends = await ws_backends(3)
    servers = (
        f'[{{ address = "{HOST}:{backends[0].port}" }}, "{HOST}:{backends[1].port}", '
        f'{{ address = "{HOST}:{backends[2].port}", drain = true }}]'
    )
    handle = await balanced(backends, servers=servers,
        tables="[upstreams.rebalance]\nthreshold = 1.5\nsustain = 0\ninterval = 0.15\nmax_closes = 1\n"
               "reconnect_delay_min = 1\nreconnect_delay_max = 2\n",
    )
    sessions = [await open_ws(ws_connect, handle, backends) for _ in range(6)]
    assert sorted(where for _, where, _ in sessions) == [0, 0, 0, 1, 1, 1]  # never the drained third server
    group = group_of(handle)
    b0 = Address(HOST, backends[0].port)
    group.set_drain(b0, True)  # what an admin API does
    assert (await open_ws(ws_connect, handle, backends))[1] == 1
    # the sessions on the drained server are paced out, one per interval (max_closes = 1)
    async def closed_at(ws) -> float:
        code, reason = await close_code_of(ws)
        assert code == 1012 and re.fullmatch(r"reconnect after [12]\.\ds", reason), reason
        return time.monotonic()

    times = sorted(await asyncio.gather(*(closed_at(ws) for ws, where, _ in sessions if where == 0)))
    assert len(times) == 3
    assert all(later - earlier > 0.1 for earlier, later in zip(times, times[1:])), times
    for ws, where, _ in sessions:
        if where == 1:  # the other server's sessions are untouched
            await ws.send("still here")
            assert await ws.recv() == "still here"
    snap = {s["address"]: s for s in group.snapshot()["servers"]}
    assert snap[str(b0)]["state"] == "draining" and snap[str(b0)]["connections"] == 0
    assert snap[str(Address(HOST, backends[2].port))]["state"] == "draining"


# --------------------------------------------------------------------------
# distribution policies
# --------------------------------------------------------------------------


async def test_least_conn_fills_the_emptiest_server(balanced, ws_backends, ws_connect) -> None:
    backends = await ws_backends(3)
    handle = await balanced(backends, balance="least_conn")
    sessions = [await open_ws(ws_connect, handle, backends) for _ in range(6)]
    assert sorted(where for _, where, _ in sessions) == [0, 0, 1, 1, 2, 2]
    for ws, where, _ in sessions:
        if where == 1:
            await ws.close()
    await wait_for(lambda: group_of(handle).loads()[Address(HOST, backends[1].port)] == 0)
    assert [(await open_ws(ws_connect, handle, backends))[1] for _ in range(2)] == [1, 1]


async def test_p2c_spreads_sessions(balanced, ws_backends, ws_connect) -> None:
    backends = await ws_backends(3)
    handle = await balanced(backends, balance="p2c")
    picks = [(await open_ws(ws_connect, handle, backends))[1] for _ in range(30)]
    counts = [picks.count(i) for i in range(3)]
    assert max(counts) - min(counts) <= 4, counts


async def test_hash_on_a_header_is_sticky_per_key(balanced, ws_backends, ws_connect) -> None:
    backends = await ws_backends(3)
    handle = await balanced(backends, balance="hash", upstream_keys={"hash_key": '"header:X-User"'})
    homes = {}
    for user in [f"user-{i}" for i in range(12)]:
        seen = set()
        for _ in range(3):
            path = f"/echo?c={next(_ids)}"
            ws = await ws_connect(handle.ws_url(path), additional_headers={"X-User": user})
            await ws.send("x")
            await ws.recv()
            seen.add(served_by(backends, path))
            await ws.close()
        assert len(seen) == 1, (user, seen)
        homes[user] = seen.pop()
    assert len(set(homes.values())) >= 2  # keys spread over the servers


# --------------------------------------------------------------------------
# paced rebalancing of live connections
# --------------------------------------------------------------------------


async def test_paced_rebalancing_after_a_server_is_added(balanced, ws_backends, ws_connect) -> None:
    """Two servers hold 12 sessions; a third one joins (undrained); closes move clients over, paced."""
    backends = await ws_backends(3)
    servers = (
        f'["{HOST}:{backends[0].port}", "{HOST}:{backends[1].port}", '
        f'{{ address = "{HOST}:{backends[2].port}", drain = true }}]'
    )
    max_closes, interval = 2, 0.3
    handle = await balanced(backends, balance="least_conn", servers=servers,
        tables=affinity_toml()
        + f"[upstreams.rebalance]\nthreshold = 1.2\nsustain = 0.2\ninterval = {interval}\nmax_closes = {max_closes}\n"
        "close_code = 1013\nreconnect_delay_min = 0.05\nreconnect_delay_max = 0.1\n",
    )
    group = group_of(handle)
    closes: list[float] = []
    moved_to: list[int] = []

    async def client(ws, cookie) -> None:
        while True:
            try:
                await ws.recv()
            except ConnectionClosed:
                closes.append(time.monotonic())
                assert ws.close_code == 1013
                delay = float(re.fullmatch(r"reconnect after (\d+\.\d)s", ws.close_reason)[1])
                await asyncio.sleep(delay)
                ws, where, fresh = await open_ws(ws_connect, handle, backends, cookie)
                cookie = fresh or cookie
                moved_to.append(where)

    opened = [await open_ws(ws_connect, handle, backends) for _ in range(12)]
    assert sorted(group.loads().values()) == [0, 6, 6]
    tasks = [asyncio.create_task(client(ws, cookie)) for ws, _, cookie in opened]
    try:
        group.set_drain(Address(HOST, backends[2].port), False)  # scale-out: the new server joins
        await wait_for(lambda: sorted(group.loads().values()) == [4, 4, 4], timeout=8)
        await asyncio.sleep(interval * 2)  # and it stays there: nothing more is closed
    finally:
        for task in tasks:
            task.cancel()
    assert set(moved_to) == {2}  # every closed client reconnected to the new server
    assert len(closes) == 4
    # paced: never more than max_closes within one interval
    for first in closes:
        assert sum(1 for t in closes if first <= t < first + interval * 0.9) <= max_closes
    assert group.snapshot()["rebalance"]["closed_total"] == 4


async def test_a_background_loop_that_fails_is_logged_and_restarted(balanced, ws_backends, monkeypatch, caplog) -> None:
    from edgeproxy.transport import upstream as upstream_module

    monkeypatch.setattr(upstream_module, "RESTART_DELAY", 0.01)
    backends = await ws_backends(1)
    group = group_of(await balanced(backends))
    runs = []

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise RuntimeError(f"bug number {len(runs)}")

    await asyncio.wait_for(group._supervise("the test loop", flaky), 5)
    assert runs == [0, 1, 2]  # failed twice, restarted each time, then ended normally
    failures = [r for r in caplog.records if "the test loop failed; restarting" in r.getMessage()]
    assert len(failures) == 2 and failures[0].exc_info[1].args == ("bug number 1",)

"""Admission limits hold for the whole instance with ``workers = N``: real processes and the real shared table."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import urllib.request

import pytest

from edgeproxy.core.admission import AdmissionPolicy
from edgeproxy.transport.shared_limits import SharedLimits
from test_workers import backend, start_workers, supervised, worker_pids  # noqa: F401 (fixtures)
from processes import wait_gone


async def request(port: int, source: str = "127.0.0.1") -> tuple[int, dict[str, str], asyncio.StreamWriter]:
    """A keep-alive GET from `source`: (status, headers, the open connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    status = int(lines[0].split()[1])
    if status == 200:
        await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    return status, headers, writer


async def hold(port: int, n: int, source: str = "127.0.0.1"):
    """Open `n` connections at once: (statuses, the writers of the admitted ones, all writers)."""
    results = await asyncio.gather(*(request(port, source) for _ in range(n)))
    return [r[0] for r in results], [r[2] for r in results if r[0] == 200], results


def close(writers) -> None:
    for writer in writers:
        writer.close()


def active_http(admin_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/admin/connections", timeout=5) as response:
        return json.loads(response.read())["by_protocol"].get("http", 0)


@pytest.mark.timeout(60)
async def test_three_workers_admit_max_connections_for_the_instance_and_give_slots_back(supervised, backend):
    proxy, port, admin, _ = await start_workers(supervised, backend, 3, "[limits]\nmax_connections = 6\n")
    statuses, admitted, everything = await hold(port, 30)
    try:
        assert collections.Counter(statuses) == {200: 6, 503: 24}  # 6 for the instance, not 18
        per_worker = [await asyncio.to_thread(active_http, admin + i) for i in range(3)]
        assert sum(per_worker) == 6
        assert all(r[1].get("retry-after", "").isdigit() for r in everything if r[0] == 503)
    finally:
        close(r[2] for r in everything)
    await asyncio.sleep(0.3)  # the workers see the closes
    for _ in range(60):  # 10x the limit, one after the other: never refused
        status, _, writer = await request(port)
        writer.close()
        await writer.wait_closed()
        assert status == 200
    statuses, admitted, everything = await hold(port, 12)
    close(r[2] for r in everything)
    assert statuses.count(200) == 6


@pytest.mark.timeout(60)
async def test_the_per_address_limit_and_the_cap_are_for_the_instance(supervised, backend):
    extra = "[limits]\nmax_connections = 8\nmax_connections_per_ip = 3\n"
    proxy, port, admin, _ = await start_workers(supervised, backend, 3, extra)
    opened = []
    try:
        counts = []
        for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"):
            statuses, admitted, everything = await hold(port, 10, source)
            opened += [r[2] for r in everything]
            counts.append(statuses.count(200))
        assert counts == [3, 3, 2, 0]  # 3 per address across the workers, 8 in all
    finally:
        close(opened)


@pytest.mark.timeout(60)
async def test_the_connection_rate_is_one_bucket_and_retry_after_spreads_the_returns(supervised, backend):
    extra = "[limits]\nconnection_rate = 2\nconnection_burst = 5\n"
    proxy, port, admin, _ = await start_workers(supervised, backend, 3, extra)
    statuses, admitted, everything = await hold(port, 45)
    close(r[2] for r in everything)
    # the burst of 5 for the instance (not 15), plus what refilled while the 45 connected
    assert 5 <= statuses.count(200) <= 6, statuses
    values = collections.Counter(int(r[1]["retry-after"]) for r in everything if r[0] == 503)
    refused = sum(values.values())
    # 2 a second come back: the queue of ~40 refused spans ~20 s, each second about 2 of them
    assert max(values) >= 18 and len(values) >= 15, values
    assert max(values.values()) <= 2 * 2 + 1, values
    assert refused == statuses.count(503)


@pytest.mark.timeout(60)
async def test_a_killed_worker_gives_its_slots_back_once_reaped(supervised, backend):
    proxy, port, admin, _ = await start_workers(supervised, backend, 3, "[limits]\nmax_connections = 9\n")
    statuses, admitted, everything = await hold(port, 9)
    try:
        assert statuses == [200] * 9
        per_worker = [await asyncio.to_thread(active_http, admin + i) for i in range(3)]
        victim_index = max(range(3), key=per_worker.__getitem__)
        assert per_worker[victim_index] > 0
        victim = worker_pids(proxy.log())[victim_index]
        os.kill(victim, signal.SIGKILL)
        assert await wait_gone(victim, 5)
        log = await proxy.wait_log(f"worker {victim_index}: released {per_worker[victim_index]} connection(s)")
        assert "of the shared limits" in log
        # the survivors' connections still count: exactly the victim's share is admitted again
        statuses2, _, again = await hold(port, 9)
        close(r[2] for r in again)
        assert statuses2.count(200) == per_worker[victim_index]
    finally:
        close(r[2] for r in everything)


@pytest.mark.timeout(60)
async def test_a_reload_keeps_the_instance_counts_and_waits_with_the_table_size(supervised, backend):
    proxy, port, admin, _ = await start_workers(supervised, backend, 2, "[limits]\nmax_connections = 4\n")
    statuses, _, held = await hold(port, 4)
    try:
        assert statuses == [200] * 4
        text = proxy.path.read_text()
        proxy.rewrite(text.replace("max_connections = 4", "max_connections = 6\nip_table_size = 1000"))
        proxy.signal(signal.SIGHUP)
        log = await proxy.wait_log("reloaded:", count=2)
        assert "limits.ip_table_size = 1000 takes effect on a restart or a binary upgrade" in log
        statuses2, _, more = await hold(port, 5)
        close(r[2] for r in more)
        assert statuses2.count(200) == 2  # the 4 open ones still count: 6 in all
    finally:
        close(r[2] for r in held)


def _hammer(fd: int, worker: int, rounds: int, cap: int) -> int:
    """A child process: admit and release `rounds` times; the most open ever seen by the instance."""
    limits = SharedLimits.attach(fd, worker)
    admission = limits.admission(AdmissionPolicy(max_connections=cap, max_connections_per_ip=2), None, 0.0)
    worst = 0
    held = []
    for i in range(rounds):
        ip = f"10.0.0.{i % 7}"
        if admission.admit(ip, 0.0).admitted:
            held.append(ip)
            worst = max(worst, admission.open)
        if len(held) > 2 or (held and i % 3 == 0):
            admission.release(held.pop(0))
    for ip in held:
        admission.release(ip)
    return worst


def test_the_record_lock_keeps_concurrent_processes_exact():
    """4 forked processes admit and release on one table: the cap is never passed, all comes back to 0."""
    limits = SharedLimits.create(4, 64)
    pids = []
    go_read, go_write = os.pipe()  # closed by the parent once all are forked: they start together
    try:
        for worker in range(4):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: report and leave without running the parent's cleanups
                os.close(read)
                os.close(go_write)
                os.read(go_read, 1)
                worst = _hammer(limits.fd, worker, 20000, cap=5)
                os.write(write, str(worst).encode())
                os._exit(0)
            os.close(write)
            pids.append((pid, read))
        os.close(go_write)
        worst = []
        for pid, read in pids:
            with os.fdopen(read) as fh:
                worst.append(int(fh.read()))
            assert os.waitpid(pid, 0)[1] == 0
        assert max(worst) <= 5 and max(worst) >= 3
        check = SharedLimits.attach(limits.fd, 0).admission(AdmissionPolicy(max_connections=5, max_connections_per_ip=2), None, 0.0)
        assert check.open == 0
        assert [check.admit("10.0.0.1", 0.0).admitted for _ in range(3)] == [True, True, False]
    finally:
        limits.close()

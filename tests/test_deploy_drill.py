"""The rolling-deploy drill (``benchmarks/deploy_drill.py``) at a small size, with the same checks.

Three real edgeproxy processes on the real Redis, behind the drill's own load
balancer; 60 hub subscribers on 5 channels at 50 publications/s and 30
resumable sessions, spread over two client processes, with the publisher in a
process of its own (the full-size benchmark uses the same code).  Rolled with the paced drain, and with one instance killed.
`Report.failures` holds every broken promise: a publication missing, doubled,
out of order or with the wrong data; a resumable stream with a gap, a
duplicate or (in a graceful roll) a lost message; a client not back; presence
of a killed instance not fenced.  The figures are the benchmark's business; the
generator's own health (publish rate achieved, each process's event loop lag)
is measured and shown with any failure, so a saturated generator is told from
a proxy fault.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import deploy_drill  # noqa: E402
from tests.conftest import require_service  # noqa: E402


@pytest.fixture
def redis_url() -> str:
    """The shared Redis (skip without it, fail under EDGEPROXY_REQUIRE_SERVICES=1, as every backplane test)."""
    return require_service("redis")


def _assert_report(report: deploy_drill.Report) -> None:
    print(deploy_drill.summary(report))
    assert not report.failures, deploy_drill.summary(report)
    size = report.size
    # The load really ran, through the roll.
    assert report.publications >= size.rate * size.settle
    assert report.deliveries >= report.publications * (size.clients // size.channels)
    assert report.session_messages > size.sessions
    assert all(c > 0 for c in report.connections_after.values())
    # The generator reported on itself: every process's loop lag and the publish rate.
    assert set(report.generator["loop_lag"]) == {"coordinator (balancer)", "publisher"} | {
        f"clients{i}" for i in range(size.workers)}
    assert report.generator["publish"]["achieved"] > 0
    assert report.doubled == 0


@pytest.mark.timeout(90)
async def test_rolling_restart_with_paced_drain_loses_and_doubles_nothing(redis_url, tmp_path) -> None:
    report = await deploy_drill.run_drill(deploy_drill.SMALL, redis_url=redis_url, workdir=tmp_path)
    _assert_report(report)
    assert len(report.back_after) == deploy_drill.SMALL.instances
    # Every session was on a replaced instance once: each was reset (a session is bound to its instance).
    assert report.session_resets >= deploy_drill.SMALL.sessions
    assert report.session_lost == 0


@pytest.mark.timeout(60)
async def test_sigkill_counts_losses_doubles_nothing_and_fences_presence(redis_url, tmp_path) -> None:
    size = dataclasses.replace(deploy_drill.SMALL, settle=1.5)
    report = await deploy_drill.run_drill(size, kill=True, redis_url=redis_url, workdir=tmp_path)
    _assert_report(report)
    assert report.presence_checked > 0
    assert report.presence_fenced_after is not None and report.presence_fenced_after <= 1.5 * size.heartbeat + 0.5

"""Micro-benchmarks of the metrics: what the transport pays per call, and what a scrape costs.

Run with ``python3 -m pytest benchmarks/test_micro_metrics.py --benchmark-only``.

The per-call rows are what a connection pays at open and close, or an HTTP
exchange at its end; nothing is paid per WebSocket message (the relay's own
counters are read at scrape time). The scrape rows show what that reading
costs with 10,000 open sessions: it runs once per scrape, on the loop.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edgeproxy.metrics import CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT, Metrics

KEY = ("websocket", "*/", "app", "10.0.0.1:80")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(process=False)


def test_connection_open_and_close(benchmark, metrics: Metrics) -> None:
    def cycle():
        metrics.connection_closed(metrics.connection_opened(*KEY), 301.0, 1000)

    benchmark(cycle)
    assert metrics.active[KEY] == 0


def test_add_messages(benchmark, metrics: Metrics) -> None:
    benchmark(metrics.add_messages, CLIENT_TO_UPSTREAM, 10, 1000)
    assert metrics.messages[CLIENT_TO_UPSTREAM] > 0


def test_request_done(benchmark, metrics: Metrics) -> None:
    benchmark(metrics.request_done, 200, 0.004)
    assert metrics.requests[2] > 0


@pytest.mark.parametrize("sessions", [0, 10_000])
def test_scrape(benchmark, metrics: Metrics, sessions: int) -> None:
    relays = [
        SimpleNamespace(messages_from_client=i, bytes_from_client=10 * i,
                        messages_from_upstream=i, bytes_from_upstream=10 * i)
        for i in range(sessions)
    ]

    def live():
        for relay in relays:
            yield CLIENT_TO_UPSTREAM, relay.messages_from_client, relay.bytes_from_client
            yield UPSTREAM_TO_CLIENT, relay.messages_from_upstream, relay.bytes_from_upstream

    metrics.live_messages = live
    for server in range(50):
        key = metrics.connection_opened("websocket", "*/", "app", f"10.0.0.{server}:80")
        metrics.connection_closed(key, 60.0 * server, 1000 + server % 3)
    body = benchmark(metrics.render)
    assert b"edgeproxy_messages_total" in body

"""edgeproxy.metrics: every API call moves its metric by exactly what it should.

Values are read back the way Prometheus reads them: from the text exposition,
parsed with prometheus-client's own parser.
"""

from __future__ import annotations

import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeproxy import __version__
from edgeproxy.core import _accel
from edgeproxy.metrics import (
    CLIENT_TO_UPSTREAM,
    DIRECTIONS,
    DURATION_BUCKETS,
    HUB_DELIVERY,
    LAG_WINDOW,
    UPSTREAM_TO_CLIENT,
    Histogram,
    Metrics,
    close_code_class,
    route_label,
)

WS_KEY = ("websocket", "*/", "app", "127.0.0.1:9001")

#: every family the exposition must always carry, whatever has happened
ALWAYS = {
    "edgeproxy_build_info": "gauge",  # an info metric, written as a gauge in the text format
    "edgeproxy_compiled_extension_active": "gauge",
    "edgeproxy_connections_active": "gauge",
    "edgeproxy_connections_opened": "counter",
    "edgeproxy_connection_duration_seconds": "histogram",
    "edgeproxy_messages": "counter",
    "edgeproxy_message_bytes": "counter",
    "edgeproxy_heartbeat_failures": "counter",
    "edgeproxy_resume_handoffs": "counter",
    "edgeproxy_ping_rtt_seconds": "histogram",
    "edgeproxy_http_requests": "counter",
    "edgeproxy_http_request_duration_seconds": "histogram",
    "edgeproxy_upstream_server_up": "gauge",
    "edgeproxy_fanout_publishes": "counter",
    "edgeproxy_fanout_subscribers_dropped": "counter",
    "edgeproxy_backplane_messages": "counter",
    "edgeproxy_backplane_errors": "counter",
    "edgeproxy_admission_fallback": "gauge",
    "edgeproxy_admission_fallbacks": "counter",
    "edgeproxy_event_loop_lag_seconds": "gauge",
    "edgeproxy_heap_trims": "counter",
    "edgeproxy_heap_trim_seconds": "counter",
}


def samples(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset of label items): value} from a parsed exposition."""
    text = metrics.render().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(event_loop="uvloop")


def test_exposition_parses_and_has_every_family(metrics: Metrics) -> None:
    families = {f.name: f.type for f in text_string_to_metric_families(metrics.render().decode())}
    for name, kind in ALWAYS.items():
        assert families.get(name) == kind, (name, families.get(name))


def test_build_info_and_extension_state(metrics: Metrics) -> None:
    labels = {"version": __version__, "implementation": _accel.IMPLEMENTATION, "event_loop": "uvloop"}
    assert value(metrics, "edgeproxy_build_info", **labels) == 1
    assert value(metrics, "edgeproxy_compiled_extension_active") == (1 if _accel.SPEEDUPS else 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process metrics read /proc (Linux only)")
def test_resident_memory_is_reported(metrics: Metrics) -> None:
    assert value(metrics, "edgeproxy_process_resident_memory_bytes") > 1024 * 1024


def test_connection_open_and_close_move_gauge_counter_and_histogram(metrics: Metrics) -> None:
    key = metrics.connection_opened(*WS_KEY)
    assert key == WS_KEY
    metrics.connection_opened(*WS_KEY)
    active = dict(zip(("protocol", "route", "upstream", "server"), WS_KEY))
    assert value(metrics, "edgeproxy_connections_active", **active) == 2
    opened = {"protocol": "websocket", "outcome": "upgraded", "reason": ""}
    assert value(metrics, "edgeproxy_connections_opened_total", **opened) == 2

    metrics.connection_closed(key, 301.0, 1006)
    assert value(metrics, "edgeproxy_connections_active", **active) == 1
    duration = {"protocol": "websocket", "close_code": "1006"}
    assert value(metrics, "edgeproxy_connection_duration_seconds_count", **duration) == 1
    assert value(metrics, "edgeproxy_connection_duration_seconds_sum", **duration) == 301.0
    assert value(metrics, "edgeproxy_connection_duration_seconds_bucket", le="300.0", **duration) == 0
    assert value(metrics, "edgeproxy_connection_duration_seconds_bucket", le="360.0", **duration) == 1
    assert value(metrics, "edgeproxy_connection_duration_seconds_bucket", le="+Inf", **duration) == 1
    assert value(metrics, "edgeproxy_connections_opened_total", **opened) == 2  # closing never un-counts


def test_http_connections_have_their_own_outcome_and_close_class(metrics: Metrics) -> None:
    key = metrics.connection_opened("http", "", "", "")
    assert value(metrics, "edgeproxy_connections_opened_total", protocol="http", outcome="accepted", reason="") == 1
    metrics.connection_closed(key, 2.5, None)
    assert value(metrics, "edgeproxy_connection_duration_seconds_count", protocol="http", close_code="none") == 1
    assert value(metrics, "edgeproxy_connections_active", protocol="http", route="", upstream="", server="") == 0


def test_refused_and_failed_count_by_reason_and_bound_unknown_reasons(metrics: Metrics) -> None:
    metrics.connection_refused("websocket", "upstream_refused")
    metrics.connection_refused("websocket", "upstream_refused")
    metrics.connection_failed("websocket", "upstream_timeout")
    metrics.connection_failed("websocket", "a reason nobody declared")
    got = samples(metrics)
    name = "edgeproxy_connections_opened_total"
    assert got[(name, frozenset({"protocol": "websocket", "outcome": "refused", "reason": "upstream_refused"}.items()))] == 2
    assert got[(name, frozenset({"protocol": "websocket", "outcome": "failed", "reason": "upstream_timeout"}.items()))] == 1
    assert got[(name, frozenset({"protocol": "websocket", "outcome": "failed", "reason": "other"}.items()))] == 1
    assert metrics.opened_total("websocket") == 4


def test_messages_fold_in_per_direction(metrics: Metrics) -> None:
    metrics.add_messages(CLIENT_TO_UPSTREAM, 3, 300)
    metrics.add_messages(CLIENT_TO_UPSTREAM, 2, 20)
    metrics.add_messages(UPSTREAM_TO_CLIENT, 7, 70)
    assert value(metrics, "edgeproxy_messages_total", direction=CLIENT_TO_UPSTREAM) == 5
    assert value(metrics, "edgeproxy_message_bytes_total", direction=CLIENT_TO_UPSTREAM) == 320
    assert value(metrics, "edgeproxy_messages_total", direction=UPSTREAM_TO_CLIENT) == 7
    assert value(metrics, "edgeproxy_message_bytes_total", direction=UPSTREAM_TO_CLIENT) == 70
    # every direction is exported from the start, so rate() sees a zero and not a gap
    assert {d for (n, labels) in samples(metrics) if n == "edgeproxy_messages_total" for _, d in labels} == set(DIRECTIONS)


def test_live_messages_are_added_at_scrape_and_the_sum_never_drops(metrics: Metrics) -> None:
    live = [(CLIENT_TO_UPSTREAM, 10, 1000), (UPSTREAM_TO_CLIENT, 4, 40)]
    metrics.live_messages = lambda: live
    metrics.add_messages(CLIENT_TO_UPSTREAM, 1, 100)
    assert value(metrics, "edgeproxy_messages_total", direction=CLIENT_TO_UPSTREAM) == 11
    assert value(metrics, "edgeproxy_message_bytes_total", direction=CLIENT_TO_UPSTREAM) == 1100
    # the live connection closes: its totals are folded in as it leaves the live set
    live.clear()
    metrics.add_messages(CLIENT_TO_UPSTREAM, 10, 1000)
    metrics.add_messages(UPSTREAM_TO_CLIENT, 4, 40)
    assert value(metrics, "edgeproxy_messages_total", direction=CLIENT_TO_UPSTREAM) == 11
    assert value(metrics, "edgeproxy_messages_total", direction=UPSTREAM_TO_CLIENT) == 4


def test_requests_by_status_class(metrics: Metrics) -> None:
    metrics.request_done(200, 0.004)
    metrics.request_done(204, 0.2)
    metrics.request_done(502, 1.5)
    metrics.request_done(999, 0.1)
    assert value(metrics, "edgeproxy_http_requests_total", status_class="2xx") == 2
    assert value(metrics, "edgeproxy_http_requests_total", status_class="5xx") == 1
    assert value(metrics, "edgeproxy_http_requests_total", status_class="other") == 1
    assert value(metrics, "edgeproxy_http_request_duration_seconds_bucket", status_class="2xx", le="0.005") == 1
    assert value(metrics, "edgeproxy_http_request_duration_seconds_bucket", status_class="2xx", le="0.25") == 2
    assert value(metrics, "edgeproxy_http_request_duration_seconds_sum", status_class="5xx") == 1.5


def test_heartbeats_and_ping_rtt(metrics: Metrics) -> None:
    metrics.heartbeat_failed()
    metrics.heartbeat_failed()
    metrics.ping_rtt(0.003)
    metrics.ping_rtt(0.2)
    assert value(metrics, "edgeproxy_heartbeat_failures_total") == 2
    assert value(metrics, "edgeproxy_ping_rtt_seconds_count") == 2
    assert value(metrics, "edgeproxy_ping_rtt_seconds_bucket", le="0.005") == 1
    assert value(metrics, "edgeproxy_ping_rtt_seconds_bucket", le="0.25") == 2


def test_fanout_and_backplane(metrics: Metrics) -> None:
    metrics.fanout_published(deliveries=3, nbytes=50)
    metrics.fanout_published(deliveries=2, nbytes=10)
    metrics.fanout_subscriber_dropped()
    metrics.backplane_message_sent()
    metrics.backplane_message_received(5)
    metrics.backplane_failed()
    assert value(metrics, "edgeproxy_fanout_publishes_total") == 2
    assert value(metrics, "edgeproxy_messages_total", direction=HUB_DELIVERY) == 5
    assert value(metrics, "edgeproxy_message_bytes_total", direction=HUB_DELIVERY) == 170
    assert value(metrics, "edgeproxy_fanout_subscribers_dropped_total") == 1
    assert value(metrics, "edgeproxy_backplane_messages_total", direction="sent") == 1
    assert value(metrics, "edgeproxy_backplane_messages_total", direction="received") == 5
    assert value(metrics, "edgeproxy_backplane_errors_total") == 1


def test_upstream_server_up_comes_from_the_snapshot(metrics: Metrics) -> None:
    metrics.upstream_servers = lambda: [
        {"upstream": "app", "server": "10.0.0.1:80", "up": True},
        {"upstream": "app", "server": "10.0.0.2:80", "up": False},
        {"upstream": "app", "server": "10.0.0.3:80", "up": None},
    ]
    got = samples(metrics)
    up = {labels: v for (name, labels), v in got.items() if name == "edgeproxy_upstream_server_up"}
    assert up == {
        frozenset({"upstream": "app", "server": "10.0.0.1:80"}.items()): 1,
        frozenset({"upstream": "app", "server": "10.0.0.2:80"}.items()): 0,
    }


def test_event_loop_lag_shows_the_worst_recent_stall(metrics: Metrics) -> None:
    metrics.loop_lag(0.001, now=1000.0)
    metrics.loop_lag(0.25, now=1001.0)
    metrics.loop_lag(0.002, now=1002.0)  # later ticks on time do not hide the stall
    assert value(metrics, "edgeproxy_event_loop_lag_seconds") == 0.25
    metrics.loop_lag(0.003, now=1000.0 + LAG_WINDOW)  # next window: the stall is still shown
    assert metrics.event_loop_lag == 0.25
    metrics.loop_lag(0.004, now=1000.0 + 2 * LAG_WINDOW)  # two windows on: forgotten
    assert value(metrics, "edgeproxy_event_loop_lag_seconds") == 0.004


@pytest.mark.parametrize(("code", "label"), [
    (1000, "1000"), (1001, "1001"), (1006, "1006"), (1011, "1011"), (1014, "1014"),
    (None, "abnormal"), (4002, "application"), (3000, "application"), (1013, "other"), (2000, "other"),
])
def test_close_code_classes(code: int | None, label: str) -> None:
    assert close_code_class(code) == label


def test_histogram_buckets_are_less_or_equal() -> None:
    histogram = Histogram((1, 10))
    for v in (0.5, 1, 1.0001, 10, 11):
        histogram.observe(v)
    assert histogram.counts == [2, 2, 1]
    assert histogram.cumulative() == [("1.0", 2), ("10.0", 4), ("+Inf", 5)]
    assert histogram.count == 5 and histogram.total == pytest.approx(23.5001)


def test_duration_buckets_show_a_nat_ceiling() -> None:
    assert DURATION_BUCKETS[0] == 1 and DURATION_BUCKETS[-1] == 86400
    assert {300, 600, 900} <= set(DURATION_BUCKETS)


def test_route_label() -> None:
    assert route_label(None, "/") == "*/"
    assert route_label("api.example.com", "/v1/") == "api.example.com/v1/"


def test_snapshot_feeds_the_dashboard(metrics: Metrics) -> None:
    key = metrics.connection_opened(*WS_KEY)
    metrics.connection_opened("http", "", "", "")
    metrics.connection_failed("websocket", "upstream_timeout")
    metrics.add_messages(UPSTREAM_TO_CLIENT, 9, 90)
    metrics.heartbeat_failed()
    metrics.connection_closed(key, 700, 1000)
    snap = metrics.snapshot()
    assert snap["connections_active"] == {"websocket": 0, "http": 1, "sse": 0}
    assert snap["connections_opened"] == {"websocket": 2, "http": 1, "sse": 0}
    assert snap["messages"] == {CLIENT_TO_UPSTREAM: 0, UPSTREAM_TO_CLIENT: 9, HUB_DELIVERY: 0}
    assert snap["heartbeat_failures"] == 1
    assert snap["lifetime_buckets"] == list(DURATION_BUCKETS)
    assert sum(snap["lifetime_counts"]) == 1
    assert snap["lifetime_counts"][DURATION_BUCKETS.index(900)] == 1  # 600 < 700 <= 900
    assert snap["implementation"] == _accel.IMPLEMENTATION



def test_snapshot_counts_event_streams_beside_websockets(metrics: Metrics) -> None:
    """A proxied SSE stream is ``sse`` in the gauges and among the lifetimes the dashboard draws."""
    stream = metrics.connection_opened("sse", "*/", "app", "10.0.0.1:80")
    snap = metrics.snapshot()
    assert snap["connections_active"]["sse"] == 1 and snap["connections_opened"]["sse"] == 1
    metrics.connection_closed(stream, 30)
    snap = metrics.snapshot()
    assert snap["connections_active"]["sse"] == 0
    assert snap["lifetime_counts"][DURATION_BUCKETS.index(30)] == 1
    assert value(metrics, "edgeproxy_connection_duration_seconds_count", protocol="sse", close_code="none") == 1

"""Smoke version of the load benchmark (benchmarks/load/run.py --quick).

Runs the real command: picows echo backend, picows load generator and edgeproxy (with
one worker and with ``workers = 2``) as separate processes on loopback, for under a
second per measurement. It checks that every measurement produced sane, non-zero
figures, that every echoed payload came back intact through edgeproxy, and that the
figures of the two-worker target are summed over its whole process tree. No speed
thresholds: the machine is shared. nginx and HAProxy are optional here, so the
"edgeproxy / best of" ratios are checked on figures given to the report functions.

picows is a dev dependency: when it is missing this test fails (it does not skip).
Under EDGEPROXY_PURE=1 it measures the pure-Python proxy (target edgeproxy-pure).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "benchmarks" / "load" / "run.py"
IDLE_CONNS = 200


def _pure_mode() -> bool:
    return os.environ.get("EDGEPROXY_PURE", "").strip().lower() in ("1", "true", "yes", "on")


def _check_traffic(name: str, key: str, r: dict, conns: int, proxied: bool) -> None:
    where = f"{name} {key}: {json.dumps(r)[:1500]}"
    assert "error" not in r, where
    assert r["conns"] == conns and r["connect_errors"] == 0, where
    assert r["messages"] > 0 and r["msgs_per_s"] > 0, where
    # Correctness: every message sent came back, byte for byte, in order, unfragmented.
    assert r["mismatches"] == 0 and r["first_mismatch"] is None, where
    assert r["fragmented"] == 0 and r["unexpected_frames"] == 0, where
    assert r["lost"] == 0 and r["total_received"] == r["total_sent"] == r["verified"] > 0, where
    assert r["unexpected_disconnects"] == 0 and r["close_lingering"] == 0, where
    assert r["stalled_conns"] == 0 and r["per_conn_min"] > 0, where
    assert r["backend_cpu_us_per_echo"] > 0, where
    if "latency" in r:
        lat = r["latency"]
        assert lat["samples"] == r["messages"], where
        assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"] < 10_000, where
    if proxied:
        assert r["proxy_cpu_s"] > 0 and r["proxy_cpu_us_per_echo"] > 0, where
        assert r["proxy_cpu_us_per_frame"] * 2 == r["proxy_cpu_us_per_echo"] or abs(
            r["proxy_cpu_us_per_frame"] * 2 - r["proxy_cpu_us_per_echo"]) < 0.05, where


def test_load_benchmark_quick(tmp_path):
    import picows  # noqa: F401 - a missing dev dependency is a failure, not a skip
    import uvloop  # noqa: F401

    proxy = "edgeproxy-pure" if _pure_mode() else "edgeproxy"
    out = tmp_path / "results.json"
    markdown = tmp_path / "results.md"
    argv = [str(RUN), "--quick", "--targets", f"direct,{proxy},edgeproxy-w2", "--idle-conns", str(IDLE_CONNS),
            "--out", str(out), "--markdown", str(markdown)]
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=150, cwd=str(REPO), stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    doc = json.loads(out.read_text())

    assert doc["machine"]["nproc"] >= 1 and doc["machine"]["picows"]
    assert set(doc["targets"]) == {"direct", proxy, "edgeproxy-w2"}
    # the supervisor and both workers were sampled, and their figures summed
    assert doc["targets"]["edgeproxy-w2"]["processes"] == 3 and doc["targets"][proxy]["processes"] == 1
    for name in ("direct", proxy, "edgeproxy-w2"):
        t = doc["targets"][name]
        assert t["status"] == "ok", (name, t)
        proxied = name != "direct"
        m = t["measurements"]
        assert set(m) >= {"echo_32", "echo_1k", "pipelined", "upgrades", "idle"}, (name, list(m))
        _check_traffic(name, "echo_32", m["echo_32"], 100, proxied)
        _check_traffic(name, "echo_1k", m["echo_1k"], 100, proxied)
        assert m["echo_1k"]["size"] == 1024 and m["echo_32"]["size"] == 32
        _check_traffic(name, "pipelined", m["pipelined"], 10, proxied)
        assert m["pipelined"]["inflight"] == 64

        up = m["upgrades"]
        assert "error" not in up, (name, up)
        assert up["upgrades"] > 0 and up["upgrades_per_s"] > 0, (name, up)
        assert up["errors"] == 0 and up["no_close_reply"] == 0 and up["close_timeouts"] == 0, (name, up)
        assert up["unexpected_frames"] == 0, (name, up)
        hs = up["handshake_latency"]
        assert hs["samples"] == up["upgrades"] and 0 < hs["p50_ms"] <= hs["p99_ms"] <= up["latency"]["max_ms"], (name, up)
        if proxied:
            assert up["proxy_cpu_us_per_upgrade"] > 0, (name, up)

        idle = m["idle"]
        assert "error" not in idle, (name, idle)
        assert idle["conns"] == IDLE_CONNS and idle["connect_errors"] == 0, (name, idle)
        assert idle["still_open_at_release"] == IDLE_CONNS and idle["dropped_while_idle"] == 0, (name, idle)
        assert idle["close_lingering"] == 0, (name, idle)
        assert len(idle["src_addrs"]) >= 2 and all(a.startswith("127.") for a in idle["src_addrs"]), (name, idle)
        if proxied:
            assert idle["proxy_alive_at_peak"], (name, idle)
            # Two sockets per proxied connection were open at the peak ...
            assert idle["proxy_fds_at_peak"] >= idle["proxy_fds_before"] + 2 * IDLE_CONNS, (name, idle)
            # ... and were all released afterwards.
            assert idle["proxy_fds_after_close"] <= idle["proxy_fds_before"] + 4, (name, idle)
            assert 0 < idle["proxy_rss_kib_per_conn"] < 1024, (name, idle)
            assert idle["idle_cpu_window_s"] >= 0.5 and 0 <= idle["proxy_idle_cpu_pct"] < 100 * 3, (name, idle)
            assert not t.get("log_problems"), (name, t.get("log_problems"))

    # The summary table and ratios are produced from the same figures.
    assert doc["summary"][proxy]["echo32_mps"] == doc["targets"][proxy]["measurements"]["echo_32"]["msgs_per_s"]
    assert doc["ratios"]["direct"][proxy]["echo32_mps"] > 0
    assert "ratio to direct" in proc.stdout and "echo 32B msgs/s" in proc.stdout
    scaling = "scaling with more processes or threads (multi / single)"
    if proxy == "edgeproxy":
        assert doc["comparisons"][scaling]["edgeproxy-w2 / edgeproxy"]
    else:  # edgeproxy-pure is no single-process twin of edgeproxy-w2: nothing to scale against
        assert scaling not in doc["comparisons"]
    # the report starts with the exact command that made it, in the JSON, the output and the Markdown
    assert doc["command"].endswith(" ".join(argv)) and proc.stdout.startswith(f"command: {doc['command']}\n")
    text = markdown.read_text()
    assert f"`{doc['command']}`" in text and "| proxy CPU % idle conns |" in text and "| handshake p99 ms |" in text


@pytest.fixture(scope="module")
def run_module():
    spec = importlib.util.spec_from_file_location("load_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_edgeproxy_is_compared_with_the_better_of_nginx_and_haproxy(run_module):
    """Per figure the better of the two: the higher rate, the lower latency, CPU and memory."""
    rows = {
        "edgeproxy": {"echo32_mps": 60, "cpu32": 12.0, "rss": 4.0, "hs_p99": 9.0},
        "edgeproxy-w2": {"echo32_mps": 100, "cpu32": 14.0, "rss": 5.0, "hs_p99": 9.0},
        "nginx-w1": {"echo32_mps": 50, "cpu32": 10.0, "rss": 16.0, "hs_p99": 6.0},
        "haproxy-t1": {"echo32_mps": 40, "cpu32": 15.0, "rss": 3.0, "hs_p99": 12.0},
        "nginx-auto": {"echo32_mps": 80, "cpu32": 11.0, "rss": 16.0, "hs_p99": 5.0},
        "haproxy-default": {"echo32_mps": 90, "cpu32": 16.0, "rss": 3.5, "hs_p99": 10.0},
    }
    summ = {name: {key: row.get(key) for key in run_module.RANKED} for name, row in rows.items()}
    got = run_module.edgeproxy_vs_best(summ, {"edgeproxy-w2"})
    single = got["nginx-w1 / haproxy-t1"]
    assert list(single) == ["edgeproxy"]
    assert single["edgeproxy"]["echo32_mps"] == 1.2 and single["edgeproxy"]["cpu32"] == 1.2
    assert single["edgeproxy"]["rss"] == round(4.0 / 3.0, 3) and single["edgeproxy"]["hs_p99"] == 1.5
    assert single["edgeproxy"]["upgrades"] is None  # no figure: no ratio
    multi = got["nginx-auto / haproxy-default"]
    assert list(multi) == ["edgeproxy-w2"] and multi["edgeproxy-w2"]["echo32_mps"] == round(100 / 90, 3)

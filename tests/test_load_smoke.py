"""Smoke version of the load benchmark (benchmarks/load/run.py --quick).

Runs the real command: picows echo backend, picows load generator and edgeproxy as
separate processes on loopback, for under a second per measurement. It checks that
every measurement produced sane, non-zero figures and that every echoed payload
came back intact through edgeproxy. No speed thresholds: the machine is shared.

picows is a dev dependency: when it is missing this test fails (it does not skip).
Under EDGEPROXY_PURE=1 it measures the pure-Python proxy (target edgeproxy-pure).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--targets", f"direct,{proxy}",
         "--idle-conns", str(IDLE_CONNS), "--out", str(out)],
        capture_output=True, text=True, timeout=100, cwd=str(REPO), stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    doc = json.loads(out.read_text())

    assert doc["machine"]["nproc"] >= 1 and doc["machine"]["picows"]
    assert set(doc["targets"]) == {"direct", proxy}
    for name in ("direct", proxy):
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
            assert not t.get("log_problems"), (name, t.get("log_problems"))

    # The summary table and ratios are produced from the same figures.
    assert doc["summary"][proxy]["echo32_mps"] == doc["targets"][proxy]["measurements"]["echo_32"]["msgs_per_s"]
    assert doc["ratios"]["direct"][proxy]["echo32_mps"] > 0
    assert "ratio to direct" in proc.stdout and "echo 32B msgs/s" in proc.stdout

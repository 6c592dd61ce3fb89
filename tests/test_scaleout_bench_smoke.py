"""Smoke version of the scale-out benchmark (benchmarks/scaleout_bench.py), a few seconds.

Runs the real command with tiny counts on the machine's Redis and NATS: real
edgeproxy instances, hub subscribers, POST /v1/publish.  The benchmark itself
fails unless every subscriber got every publication once and in order; this
checks that the rows are there and add up.  No speed thresholds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_service

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "scaleout_bench.py"


def test_scaleout_bench_produces_rows_that_add_up(tmp_path):
    require_service("redis")
    require_service("nats")
    out, md = tmp_path / "rows.json", tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--engines", "redis,nats", "--count", "40", "--subscribers", "3",
         "--instances", "1,2", "--rate", "40", "--duration", "1",
         "--latency-count", "20", "--latency-rate", "40", "--json", str(out), "--markdown", str(md)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["engine"] for r in result["delivery"]] == ["redis", "nats"]
    for r in result["delivery"]:
        assert (r["instances"], r["subscribers"], r["publications"]) == (3, 9, 40), r
        assert r["deliveries"] == 9 * 40, r  # every subscriber, every publication
        assert r["publications_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"], r
        assert (r["latency_publications"], r["latency_rate"]) == (20, 40), r
    assert [(r["engine"], r["instances"]) for r in result["interest"]] == [
        ("redis", 1), ("redis", 2), ("nats", 1), ("nats", 2)]
    for r in result["interest"]:
        assert r["publications"] == 40 and r["publisher_cpu_us_per_pub"] > 0, r
        assert (r["other_cpu_us_per_pub"] is None) == (r["instances"] == 1), r
    table = md.read_text()
    assert "| redis | " in table and "| nats | 2 | " in table

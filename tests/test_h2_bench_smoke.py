"""Smoke version of the h2load benchmark (benchmarks/http2/h2load_bench.py), a few seconds.

Runs the real command with tiny counts: nginx as the upstream, edgeproxy and
nginx as the proxies, h2load in its three modes.  Checks that every row is
there and sane (all requests succeeded, figures present and positive, the
ratio table written); no speed thresholds, the machine is shared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "http2" / "h2load_bench.py"
MODES = {"http/1.1", "h2c 1 stream", "h2c 100 streams"}


def test_h2load_bench_produces_sane_rows(external_tool, tmp_path):
    external_tool("h2load", "nghttp2-client")
    external_tool("nginx", "nginx")
    out, md = tmp_path / "rows.json", tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--requests", "400", "--clients", "2", "--rounds", "1", "--pool-size", "64",
         "--json", str(out), "--markdown", str(md)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {(r["target"], r["mode"]) for r in rows} == {(t, m) for t in ("edgeproxy", "nginx") for m in MODES}
    for r in rows:
        where = json.dumps(r)
        assert r["succeeded"] == 400 and r["failed"] == 0, where
        assert r["requests_per_s"] > 0 and r["p99_ms"] > 0, where
        assert r["proxy_cpu_us_per_request"] >= 0, where  # nginx may spend under one clock tick
        if r["target"] == "edgeproxy":
            assert r["proxy_cpu_us_per_request"] > 0, where
    table = md.read_text()
    assert "| edgeproxy | h2c 100 streams |" in table and "edgeproxy / nginx" in table
    assert "`python benchmarks/http2/h2load_bench.py --requests 400" in table

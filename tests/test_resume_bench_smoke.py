"""The resume benchmark in its short form: it runs, both kinds of peers, and its rows add up.

Speed is not judged here (the machine is shared); ``benchmarks/resume_bench.py``
with its defaults gives the figures in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resume_bench_smoke():
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "resume_bench.py"), "--messages", "400",
         "--sizes", "64,16384", "--rounds", "1", "--parked", "200", "--raw-bytes", "400000"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    throughput = [r for r in rows if "peers" in r]
    assert {(r["peers"], r["size"]) for r in throughput} == {
        (peers, size) for peers in ("websockets", "picows") for size in (64, 16384)}
    for row in throughput:
        for mode in ("plain", "resume"):
            assert row[mode]["msgs_per_s"] > 0
        expected = 100 * (1 - row["resume"]["msgs_per_s"] / row["plain"]["msgs_per_s"])
        assert abs(row["throughput_overhead_pct"] - expected) < 0.1
    memory = [r for r in rows if "parked_sessions" in r]
    assert [r["buffered_msgs_each"] for r in memory] == [0, 10]
    assert 500 < memory[0]["bytes_per_session"] < memory[1]["bytes_per_session"] < 20000

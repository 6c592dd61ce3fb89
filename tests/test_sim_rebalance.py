"""Smoke version of benchmarks/sim_rebalance.py: a small scale-out, the same properties asserted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from edgeproxy.core.rebalance import RebalancePolicy

SIM = Path(__file__).resolve().parents[1] / "benchmarks" / "sim_rebalance.py"


def _load():
    spec = importlib.util.spec_from_file_location("sim_rebalance", SIM)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_scale_out_simulation_properties() -> None:
    sim = _load()
    policy = RebalancePolicy(threshold=1.1, sustain=5.0, interval=1.0, max_closes=10, delay_min=1.0, delay_max=5.0)
    runs = {s: sim.simulate(s, connections=1000, duration=240.0, lifetime=1800.0, policy=policy, sample=2.0)
            for s in sim.STRATEGIES}
    strict, give_way, paced = runs["strict"], runs["give-way"], runs["give-way+rebalance"]
    # strict stickiness keeps the 2x imbalance; give-way alone only chips at it
    assert strict.final_ratio > 1.9 and strict.below_target_at is None
    assert 1.2 < give_way.final_ratio < strict.final_ratio
    # paced rebalancing gets below 1.2 within a bounded time and stays there...
    assert paced.below_target_at is not None and paced.below_target_at <= 120.0
    assert all(ratio < 1.2 for t, ratio in paced.series if t >= paced.below_target_at + 20)
    # ...never closing more than the configured rate, and not much more than the excess (half)
    assert 0 < paced.max_closes_in_a_second <= policy.max_closes / policy.interval
    assert paced.rebalance_closes <= 0.6 * 1000
    assert strict.rebalance_closes == give_way.rebalance_closes == 0


def test_command_line_reports_ok(capsys) -> None:
    sim = _load()
    assert sim.main(["--connections", "800", "--duration", "120", "--max-closes", "20"]) == 0
    out = capsys.readouterr().out
    assert "paced rebalancing: OK" in out and "give-way+rebalance" in out

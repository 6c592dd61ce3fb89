"""The soak harness in its short form: real processes, real faults, and the accounting must balance.

``benchmarks/soak/soak.py`` with 60 TLS clients, two rounds of 4 seconds: backends killed and
restarted, clients dropping without a close, certificate reloads (SIGHUP), hostile
inputs.  Every message must be echoed or reported lost with a close code, none
silently; no descriptor may leak; every hostile input must get its RFC answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_soak_smoke():
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "soak", "soak.py"),
         "--clients", "60", "--duration", "4", "--rounds", "2", "--interval", "0.2", "--tls"],
        capture_output=True, text=True, timeout=110, cwd=ROOT,
    )
    report = json.loads(run.stdout)
    assert report["messages_sent"] > 500
    assert report["silently_lost"] == 0 and report["unaccounted"] == 0, report
    assert report["corrupt_or_out_of_order"] == 0
    assert report["messages_delivered"] + report["lost_reported_with_close_code"] \
        + report["dropped_by_their_own_client"] == report["messages_sent"]
    assert {"backend_kill", "client_drop", "tls_reload", "bad_input"} <= set(report["faults_active"])
    assert report["faults_injected"]["backend_kill"] >= 1 and report["faults_injected"]["client_drop"] >= 1
    assert report["faults_injected"]["tls_reload"] >= 1
    assert report["bad_inputs"] and all(k.endswith(":answered") for k in report["bad_inputs"]), report["bad_inputs"]
    assert "1014" in report["session_end_codes"]  # the killed backend's sessions were told
    assert report["proxy_fds"]["end"] <= report["proxy_fds"]["warm_baseline"], report["proxy_fds"]
    assert report["ok"] and run.returncode == 0

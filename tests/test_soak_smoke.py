"""The soak harness in its short form: real processes, real faults, and the accounting must balance.

``benchmarks/soak/soak.py`` with 60 TLS clients, two rounds of 4 seconds, the proxy run as
production runs it (``edgeproxy run``, a supervisor and two workers): backends killed and
restarted, clients dropping without a close, certificate and config reloads (SIGHUP),
a worker SIGKILLed (the supervisor must replace it), hostile inputs.  Every message
must be echoed, reported lost with a close code, dropped by its own client, or have
been on a connection the killed worker held; none silently lost; no descriptor may
leak; no process's memory may grow; every hostile input must get its RFC answer.
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
         "--clients", "60", "--duration", "4", "--rounds", "2", "--interval", "0.2", "--tls",
         "--workers", "2", "--heap-trim-interval", "2"],
        capture_output=True, text=True, timeout=110, cwd=ROOT,
    )
    report = json.loads(run.stdout)
    assert report["messages_sent"] > 500
    assert report["silently_lost"] == 0 and report["unaccounted"] == 0, report
    assert report["corrupt_or_out_of_order"] == 0
    assert report["messages_delivered"] + report["lost_reported_with_close_code"] \
        + report["dropped_by_their_own_client"] + report["lost_with_worker_kill"] == report["messages_sent"]
    assert set(report["faults_active"]) == {"backend_kill", "client_drop", "tls_reload", "config_reload", "worker_kill",
                                            "bad_input"}
    faults = report["faults_injected"]
    for kind in report["faults_active"]:
        assert faults.get(kind, 0) >= 1, (kind, faults)
    # the reloads were applied, not only signalled: every worker logs each one it applies
    events = report["proxy_log_events"]
    assert events.get("config_applied", 0) >= faults["config_reload"], events
    assert events.get("certificates_reread", 0) >= 1, events
    assert not events.get("reload_failed") and not events.get("traceback"), events
    # every killed worker was replaced, and the sessions it held ended as 1006, counted apart
    kills = report["worker_kills"]
    assert kills["replacements_ready"] == faults["worker_kill"] and kills["replacements_missing"] == 0, kills
    # (a session told 1014 just before the kill keeps that code)
    assert 1 <= report["session_end_codes"].get("1006 (worker killed)", 0) <= kills["sessions_cut"], report["session_end_codes"]
    assert "1014" in report["session_end_codes"]  # the killed backend's sessions were told
    assert report["bad_inputs"] and all(k.endswith(":answered") for k in report["bad_inputs"]), report["bad_inputs"]
    assert report["proxy_fds"]["end"] <= report["proxy_fds"]["warm_baseline"], report["proxy_fds"]
    assert report["memory"]["ok"], report["memory"]
    assert {"supervisor", "worker 0", "worker 1"} <= set(report["processes"]["end"]["processes"])
    assert report["ok"] and run.returncode == 0 and report["proxy_exit_code"] == 0

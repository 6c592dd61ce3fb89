"""Autobahn|Testsuite: through edgeproxy, the echo server's verdict or OK in every case (`at_least_as_good`).

The real run (``test_autobahn_same_verdicts_through_proxy``) is marked
``conformance``; it runs ``run_autobahn.py`` in a subprocess with a time bound.
When the script exits 77 (neither wstest nor kosoku can be had on this
machine) the test is skipped with the script's reason, unless
``EDGEPROXY_REQUIRE_AUTOBAHN=1`` is set, in which case it fails.

Extra arguments for the script can be given in ``EDGEPROXY_AUTOBAHN_ARGS``
(shell syntax, e.g. ``--with-compression --timeout 3000``).

The parsing/comparison tests below need no network and no runner.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "run_autobahn.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("edgeproxy_run_autobahn", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


ra = _load_script()


# --------------------------------------------------------------------------- #
# fast, offline: parsing and comparison on fabricated index.json files
# --------------------------------------------------------------------------- #


def _index(agent: str, verdicts: dict[str, tuple[str, str]]) -> dict:
    return {
        agent: {
            cid: {
                "behavior": b,
                "behaviorClose": c,
                "duration": 1,
                "remoteCloseCode": 1000,
                "reportfile": f"{agent}_case_{cid.replace('.', '_')}.json",
            }
            for cid, (b, c) in verdicts.items()
        }
    }


def test_parse_and_compare_fabricated_index_pair(tmp_path: Path) -> None:
    direct = {
        "1.1.1": ("OK", "OK"),
        "2.10": ("OK", "OK"),
        "2.9": ("OK", "OK"),
        "3.2": ("NON-STRICT", "OK"),
        "7.1.6": ("INFORMATIONAL", "INFORMATIONAL"),
        "7.1.5": ("FAILED", "WRONG CODE"),
        "9.1.1": ("OK", "OK"),
        "10.1.1": ("OK", "OK"),
    }
    proxied = dict(direct)
    proxied["9.1.1"] = ("FAILED", "FAILED")  # differs
    proxied["3.2"] = ("OK", "OK")  # the proxy is stricter: allowed
    proxied["7.1.5"] = ("OK", "OK")  # the proxy is stricter: allowed
    proxied["2.9"] = ("NON-STRICT", "OK")  # looser than direct: a difference, though both pass
    del proxied["10.1.1"]  # missing through the proxy
    (tmp_path / "d").mkdir()
    (tmp_path / "p").mkdir()
    (tmp_path / "d" / "index.json").write_text(json.dumps(_index("direct", direct)))
    # kosoku names the agent after the Server header: any single agent is fine
    (tmp_path / "p" / "index.json").write_text(json.dumps(_index("some-server/1.0", proxied)))

    d = ra.load_index(tmp_path / "d" / "index.json")
    p = ra.load_index(tmp_path / "p" / "index.json")
    assert d == direct
    assert p == proxied

    counts = ra.count_verdicts(d)
    assert counts["behavior"] == {"OK": 5, "NON-STRICT": 1, "INFORMATIONAL": 1, "UNIMPLEMENTED": 0, "FAILED": 1}
    assert counts["behaviorClose"]["OK"] == 6
    assert counts["behaviorClose"]["WRONG CODE"] == 1
    assert counts["behaviorClose"]["INFORMATIONAL"] == 1

    cmp_ = ra.compare_verdicts(d, p)
    assert cmp_["same"] is False
    assert cmp_["cases_compared"] == 8
    assert [x["case"] for x in cmp_["differences"]] == ["2.9", "9.1.1", "10.1.1"]  # numeric order
    by_case = {x["case"]: x for x in cmp_["differences"]}
    assert by_case["9.1.1"]["direct"] == [["OK", "OK"]]
    assert by_case["9.1.1"]["proxied"] == [["FAILED", "FAILED"]]
    assert by_case["10.1.1"]["reason"] == "missing in proxied run"
    assert by_case["9.1.1"]["both_pass"] is False
    assert by_case["2.9"]["both_pass"] is True  # OK -> NON-STRICT: both pass, still a difference
    assert [x["case"] for x in cmp_["stricter"]] == ["3.2", "7.1.5"]
    assert cmp_["flaky"] == []
    assert ra.mismatched_cases(d, p) == ["2.9", "9.1.1", "10.1.1"]

    assert ra.compare_verdicts(d, d) == {
        "same": True, "cases_compared": 8, "differences": [], "flaky": [], "stricter": []}

    summary = {
        "direct": {"cases": len(d), "seconds": 1.0, "counts": ra.count_verdicts(d)},
        "proxied": {"cases": len(p), "seconds": 1.0, "counts": ra.count_verdicts(p)},
        "comparison": cmp_,
    }
    table = ra.render_table(summary)
    assert "DIFFERENT verdicts in 3 case(s)" in table
    assert "9.1.1" in table and "FAILED/FAILED" in table


def test_compare_reruns_resolve_timing_dependent_cases() -> None:
    direct = {"4.2.5": ("OK", "OK"), "9.1.1": ("OK", "OK")}
    proxied = {"4.2.5": ("NON-STRICT", "OK"), "9.1.1": ("FAILED", "FAILED")}
    # re-runs: 4.2.5 goes NON-STRICT direct too (the reference server races);
    # 9.1.1 keeps failing only through the proxy
    d_re = [{"4.2.5": ("NON-STRICT", "OK"), "9.1.1": ("OK", "OK")}]
    p_re = [{"4.2.5": ("OK", "OK"), "9.1.1": ("FAILED", "FAILED")}]
    cmp_ = ra.compare_verdicts(direct, proxied, d_re, p_re)
    assert [x["case"] for x in cmp_["differences"]] == ["9.1.1"]
    assert [x["case"] for x in cmp_["flaky"]] == ["4.2.5"]
    assert cmp_["same"] is False
    cmp_ok = ra.compare_verdicts(direct, {**proxied, "9.1.1": ("OK", "OK")}, d_re, [{"4.2.5": ("OK", "OK")}])
    assert cmp_ok["same"] is True


def test_the_proxy_may_be_stricter_never_looser() -> None:
    ok, ns, failed = ("OK", "OK"), ("NON-STRICT", "OK"), ("FAILED", "OK")
    assert ra.at_least_as_good(ok, ns) and ra.at_least_as_good(ok, ("FAILED", "WRONG CODE"))
    assert ra.at_least_as_good(("OK", "WRONG CODE"), ("FAILED", "WRONG CODE"))  # better, the close the same
    assert ra.at_least_as_good(ns, ns)
    assert not ra.at_least_as_good(ns, ok)  # "non-strict" through the proxy only
    assert not ra.at_least_as_good(failed, ns)
    assert not ra.at_least_as_good(("OK", "WRONG CODE"), ok)
    assert not ra.at_least_as_good(("INFORMATIONAL", "OK"), ns)
    # with re-runs: every verdict through the proxy must match or beat one seen direct
    cmp_ = ra.compare_verdicts({"3.4": ns}, {"3.4": ok}, [{"3.4": failed}], [{"3.4": ok}])
    assert cmp_["same"] and [x["case"] for x in cmp_["stricter"]] == ["3.4"]
    cmp_ = ra.compare_verdicts({"3.4": ok}, {"3.4": ns}, [{"3.4": ok}], [{"3.4": ns}])
    assert not cmp_["same"] and [x["case"] for x in cmp_["differences"]] == ["3.4"]
    table = ra.render_table({
        "direct": {"cases": 1, "seconds": 1.0, "counts": ra.count_verdicts({"3.4": ns})},
        "proxied": {"cases": 1, "seconds": 1.0, "counts": ra.count_verdicts({"3.4": ok})},
        "comparison": ra.compare_verdicts({"3.4": ns}, {"3.4": ok}),
    })
    assert "NO DIFFERENCE in 1 cases but 1 where the proxy is stricter" in table
    assert "3.4 NON-STRICT/OK -> OK/OK" in table


def test_accept_passing_differences() -> None:
    direct = {"4.2.5": ("OK", "OK"), "9.1.1": ("OK", "OK")}
    proxied = {"4.2.5": ("NON-STRICT", "OK"), "9.1.1": ("OK", "OK")}
    strict = ra.compare_verdicts(direct, proxied)
    assert strict["same"] is False and strict["differences"][0]["accepted"] is False
    lenient = ra.compare_verdicts(direct, proxied, accept_passing=True)
    assert lenient["same"] is True
    assert [(d["case"], d["both_pass"], d["accepted"]) for d in lenient["differences"]] == [("4.2.5", True, True)]
    # a FAILED verdict is never accepted
    failing = ra.compare_verdicts(direct, {**proxied, "9.1.1": ("FAILED", "OK")}, accept_passing=True)
    assert failing["same"] is False
    assert [d["case"] for d in failing["differences"] if not d["accepted"]] == ["9.1.1"]


def test_proxy_config_sends_no_frame_of_its_own() -> None:
    """The proxy under test pings neither side, as the echo server pings nobody.

    Autobahn ends a case that expects no control frame (9.x, 12.x, 13.x) at the first
    PING or PONG it receives, FAILED; the proxy's first heartbeat ping comes at a random
    point in its first interval, so with pings on, long cases failed at random (40 of the
    216 deflate cases with 4 at once, whose cases last longer).
    """
    from edgeproxy.config import parse_config

    cfg = parse_config(ra.PROXY_CONFIG.format(port=1, upstream_port=2), "run_autobahn.PROXY_CONFIG")
    assert cfg.websocket.ping_interval == 0  # no pings to clients nor upstreams (their pongs would be relayed)
    assert cfg.websocket.max_message_size == 0 and cfg.websocket.strict is True


def test_parse_index_rejects_ambiguous_or_empty() -> None:
    with pytest.raises(ValueError):
        ra.parse_index({})
    two = {**_index("a", {"1.1.1": ("OK", "OK")}), **_index("b", {"1.1.1": ("OK", "OK")})}
    with pytest.raises(ValueError):
        ra.parse_index(two)
    assert ra.parse_index(two, agent="b") == {"1.1.1": ("OK", "OK")}


def test_case_selection_defaults() -> None:
    a = ra.parse_args([])
    assert a.cases == ["*"] and a.exclude == ["12.*", "13.*"] and a.timeout == 900 and a.parallel == 1
    a = ra.parse_args(["--parallel", "4", "--cases", "12.*,13.*"])
    assert a.parallel == 4 and a.runner == "kosoku"  # wstest runs cases one by one
    with pytest.raises(SystemExit):
        ra.parse_args(["--parallel", "4", "--runner", "wstest"])
    with pytest.raises(SystemExit):
        ra.parse_args(["--parallel", "0"])
    a = ra.parse_args(["--with-compression"])
    assert a.exclude == []
    a = ra.parse_args(["--cases", "1.*,2.*", "--cases", "9.1.1", "--exclude", "2.3"])
    assert a.cases == ["1.*", "2.*", "9.1.1"] and a.exclude == ["2.3"]
    assert ra.group_counts(["10.1.1", "1.1.1", "2.1", "1.1.2"]) == {"1.*": 2, "2.*": 1, "10.*": 1}


# --------------------------------------------------------------------------- #
# the real run
# --------------------------------------------------------------------------- #

RUN_TIMEOUT = float(os.environ.get("EDGEPROXY_AUTOBAHN_TIMEOUT", "900"))


def _end(proc: subprocess.Popen) -> None:
    """End the script (it ends its own children on SIGTERM), by its process group id."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


@pytest.mark.conformance
@pytest.mark.timeout(RUN_TIMEOUT + 120)
def test_autobahn_same_verdicts_through_proxy() -> None:
    extra = shlex.split(os.environ.get("EDGEPROXY_AUTOBAHN_ARGS", ""))
    # The script's rule: the backend's verdict through the proxy, or OK where the backend's is
    # not. No --accept-passing-differences: a NON-STRICT through the proxy alone fails.
    cmd = [sys.executable, str(SCRIPT), "--timeout", str(RUN_TIMEOUT), *extra]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT + 60)
    except subprocess.TimeoutExpired:
        _end(proc)
        out, err = proc.communicate(timeout=20)
        pytest.fail(f"run_autobahn.py did not finish within {RUN_TIMEOUT + 60:.0f}s\n{out}\n{err[-4000:]}")
    finally:
        _end(proc)  # e.g. interrupted by pytest-timeout

    print(out)
    if proc.returncode == ra.EXIT_SKIP:
        reason = next((ln[len("SKIP: "):] for ln in out.splitlines() if ln.startswith("SKIP: ")), err.strip()[-500:])
        if os.environ.get("EDGEPROXY_REQUIRE_AUTOBAHN") == "1":
            pytest.fail(f"EDGEPROXY_REQUIRE_AUTOBAHN=1 but no Autobahn runner: {reason}")
        pytest.skip(reason)
    assert proc.returncode == 0, f"run_autobahn.py exited {proc.returncode}\n{out}\n--- stderr ---\n{err[-6000:]}"

    workdir = Path(os.environ.get("EDGEPROXY_AUTOBAHN_DIR", ra.DEFAULT_WORKDIR))
    summary = json.loads((workdir / "summary.json").read_text())
    if summary["status"] == "direct-only":
        return
    assert summary["status"] == "same", summary["comparison"]["differences"]
    assert summary["comparison"]["same"] is True
    assert summary["comparison"]["differences"] == [] or "--accept-passing-differences" in extra
    assert summary["direct"]["cases"] == summary["proxied"]["cases"] > 0
    assert set(summary["verdicts"]["direct"]) == set(summary["verdicts"]["proxied"])

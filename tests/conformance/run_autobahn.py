#!/usr/bin/env python3
"""Autobahn|Testsuite comparison: reference echo server direct vs. through edgeproxy.

The Autobahn fuzzingclient (``wstest -m fuzzingclient``) is run twice against
the same reference echo server (``echo_server.py``, the ``websockets``
library): once DIRECT and once THROUGH edgeproxy.  The per-case
``behavior`` / ``behaviorClose`` pairs of the two runs are compared (the rule
is below) and every difference is reported.

Runner, in order of preference (``--runner auto``):

1. ``wstest`` from PyPI ``autobahntestsuite`` (Python 2.7 code) in a
   virtualenv at ``.autobahn/venv``, created with ``virtualenv==20.21.1`` from
   a Python 2.7 found via ``pyenv`` or ``PATH``.
2. ``kosoku`` (PyPI, Python 3, a Rust runner of the same Autobahn case files)
   in ``.autobahn/kosoku-venv``.

Neither can be had -> exit 77 with the reason on stderr (and the last line of
stdout starts with ``SKIP:``).

Exit codes: 0 no case differs by the rule below (or ``--direct-only`` run
completed), 1 some case differs, 2 setup/run error (echo server or proxy would
not start, runner crashed, ``--timeout`` hit), 77 no runner available.

The rule: every case must get the backend's verdict through the proxy, or OK
where the backend's is not OK (`at_least_as_good`: a strict proxy may refuse
what the backend lets through, so it may be stricter, never looser).

Timing-dependent verdicts: a few cases (e.g. 3.4, 4.1.5, 4.2.5) race the
server's echo of a valid message against its failing of the connection on the
following bad frame; ``websockets`` itself yields OK or NON-STRICT from run to
run even direct.  Cases whose verdicts differ are therefore re-run on both
targets (``--retries``, default 2); a case counts as differing only if the set
of verdicts seen direct and the set seen through the proxy never meet.  Cases
that needed a re-run are listed as "flaky" in the output and the summary.

Outputs (under ``.autobahn/``): ``reports/direct`` and ``reports/edgeproxy``
(wstest/kosoku reports, ``index.json``), logs beside them, and
``summary.json``.
"""

from __future__ import annotations

import abc

import argparse
import contextlib
import fcntl
import glob
import json
import os
import re
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DEFAULT_WORKDIR = ROOT / ".autobahn"

EXIT_OK = 0
EXIT_DIFFER = 1
EXIT_ERROR = 2
EXIT_SKIP = 77

BEHAVIORS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
CLOSE_BEHAVIORS = ("OK", "INFORMATIONAL", "UNCLEAN", "WRONG CODE", "FAILED", "FAILED BY CLIENT")
COMPRESSION_GROUPS = ["12.*", "13.*"]
PASSING = ("OK", "NON-STRICT", "INFORMATIONAL")  # what Autobahn (and kosoku) count as a pass
PASSING_CLOSE = ("OK", "INFORMATIONAL")

# --- runner pins -----------------------------------------------------------
VIRTUALENV_PIN = "virtualenv==20.21.1"
AUTOBAHNTESTSUITE_PIN = "autobahntestsuite==25.10.1"
# autobahntestsuite 25.10.1 pins its direct dependencies exactly (Twisted
# 19.10.0, autobahn 0.10.9, txaio 2.1.0, cryptography 3.3.2, ...).  The
# transitive ones below are what pip resolves on CPython 2.7.18; pinning them
# keeps the Python 2 environment reproducible (every one is the last release
# that still supports Python 2.7).
PY27_CONSTRAINTS = """\
Automat==22.10.0
attrs==21.4.0
autobahn==0.10.9
cffi==1.15.1
constantly==15.1.0
cryptography==3.3.2
enum34==1.1.10
hyperlink==21.0.0
idna==2.10
incremental==16.10.1
ipaddress==1.0.23
Jinja2==2.11.3
klein==17.10.0
linecache2==1.0.0
MarkupSafe==1.1.1
pyasn1==0.5.1
pyasn1-modules==0.3.0
pycparser==2.21
PyHamcrest==1.10.1
pyOpenSSL==19.1.0
service-identity==18.1.0
setuptools==44.0.0
six==1.16.0
traceback2==1.4.0
Twisted==19.10.0
txaio==2.1.0
typing==3.10.0.0
ujson==2.0.3
unittest2==1.1.0
Werkzeug==1.0.1
wsaccel==0.6.6
zope.interface==4.6.0
"""
KOSOKU_PIN = "kosoku==0.1.0"


class SetupError(Exception):
    """A step that must work did not (exit 2)."""


class NoRunner(Exception):
    """Neither wstest nor kosoku can be had (exit 77)."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.total = seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def bound(self, want: float) -> float:
        left = self.left()
        if left <= 1:
            raise SetupError(f"overall --timeout of {self.total:.0f}s exhausted")
        return min(want, left)


def log(msg: str) -> None:
    print(f"[autobahn] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- #
# Parsing and comparison (pure; unit-tested on fabricated index.json files)
# --------------------------------------------------------------------------- #

Verdict = tuple[str, str]  # (behavior, behaviorClose)


def case_key(case_id: str) -> tuple[int, ...]:
    """Sort key for Autobahn case ids: ``"9.10.2"`` -> ``(9, 10, 2)``."""
    out = []
    for part in case_id.split("."):
        try:
            out.append(int(part))
        except ValueError:
            out.append(1 << 30)
    return tuple(out)


def parse_index(data: Mapping[str, Any], agent: str | None = None) -> dict[str, Verdict]:
    """Turn an Autobahn ``index.json`` document into ``{case_id: (behavior, behaviorClose)}``.

    ``index.json`` is ``{agent: {case_id: {"behavior": ..., "behaviorClose": ...}}}``.
    With ``agent=None`` the file must hold exactly one agent (each of our runs
    has one; kosoku names the agent after the server's ``Server`` header).
    """
    if not isinstance(data, Mapping) or not data:
        raise ValueError("index.json holds no agent")
    if agent is None:
        if len(data) != 1:
            raise ValueError(f"index.json holds several agents {sorted(data)}; name one")
        (cases,) = data.values()
    else:
        if agent not in data:
            raise ValueError(f"agent {agent!r} not in index.json (has {sorted(data)})")
        cases = data[agent]
    out: dict[str, Verdict] = {}
    for case_id, entry in cases.items():
        out[str(case_id)] = (str(entry.get("behavior", "?")), str(entry.get("behaviorClose", "?")))
    return out


def load_index(path: str | os.PathLike[str], agent: str | None = None) -> dict[str, Verdict]:
    with open(path, encoding="utf-8") as f:
        return parse_index(json.load(f), agent)


def count_verdicts(verdicts: Mapping[str, Verdict]) -> dict[str, dict[str, int]]:
    """Counts of each ``behavior`` and each ``behaviorClose``, known labels first."""
    b = Counter(v[0] for v in verdicts.values())
    c = Counter(v[1] for v in verdicts.values())
    behavior = {k: b.get(k, 0) for k in BEHAVIORS}
    behavior.update({k: n for k, n in sorted(b.items()) if k not in behavior})
    close = {k: c.get(k, 0) for k in CLOSE_BEHAVIORS}
    close.update({k: n for k, n in sorted(c.items()) if k not in close})
    return {"behavior": behavior, "behaviorClose": close}


def at_least_as_good(proxied: Verdict, direct: Verdict) -> bool:
    """The comparison rule: each half of the proxy's verdict is the backend's, or OK.

    A strict proxy may fail a connection the backend lets through (its verdict is
    then OK where the backend's is NON-STRICT, FAILED or WRONG CODE), never the
    other way round.
    """
    return all(p == d or p == "OK" for p, d in zip(proxied, direct))


def compare_verdicts(
    direct: Mapping[str, Verdict],
    proxied: Mapping[str, Verdict],
    direct_reruns: Iterable[Mapping[str, Verdict]] = (),
    proxied_reruns: Iterable[Mapping[str, Verdict]] = (),
    accept_passing: bool = False,
) -> dict[str, Any]:
    """Compare two runs case by case.

    A case is *the same* when its (behavior, behaviorClose) pair is equal in
    both runs.  Re-runs (lists of partial index maps) widen each side to the
    set of verdicts observed; a case whose sets intersect is the same but is
    listed as ``flaky``.  A case where every verdict seen through the proxy
    is `at_least_as_good` as one seen direct (the proxy's OK where the
    backend's is not) is no difference either; it is listed as ``stricter``.
    A case present on one side only is a difference.  With ``accept_passing``
    (manual runs only) a difference between verdicts that all pass (e.g.
    NON-STRICT through the proxy, OK direct) is still listed, marked
    ``accepted``, but does not make the runs differ.
    """
    direct_reruns = list(direct_reruns)
    proxied_reruns = list(proxied_reruns)
    all_ids = sorted(set(direct) | set(proxied), key=case_key)
    differences: list[dict[str, Any]] = []
    flaky: list[dict[str, Any]] = []
    stricter: list[dict[str, Any]] = []
    for cid in all_ids:
        d_seen = [direct[cid]] if cid in direct else []
        p_seen = [proxied[cid]] if cid in proxied else []
        if d_seen and p_seen and d_seen[0] == p_seen[0]:
            continue
        d_seen += [r[cid] for r in direct_reruns if cid in r]
        p_seen += [r[cid] for r in proxied_reruns if cid in r]
        entry = {
            "case": cid,
            "direct": [list(v) for v in d_seen],
            "proxied": [list(v) for v in p_seen],
        }
        if not d_seen or not p_seen:
            entry["reason"] = "missing in " + ("direct run" if not d_seen else "proxied run")
            differences.append(entry)
        elif set(d_seen) & set(p_seen):
            flaky.append(entry)
        elif all(any(at_least_as_good(p, d) for d in d_seen) for p in p_seen):
            stricter.append(entry)
        else:
            entry["reason"] = "verdict differs"
            # both sides only ever got verdicts Autobahn counts as passing?
            entry["both_pass"] = all(b in PASSING and c in PASSING_CLOSE for b, c in d_seen + p_seen)
            entry["accepted"] = bool(accept_passing and entry["both_pass"])
            differences.append(entry)
    return {
        "same": all(d.get("accepted") for d in differences),
        "cases_compared": len(all_ids),
        "differences": differences,
        "flaky": flaky,
        "stricter": stricter,
    }


def close_code_differences(direct_index: Mapping[str, Any], proxied_index: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Cases whose ``remoteCloseCode`` differs (informational; verdicts are what count)."""
    (d,) = direct_index.values() if len(direct_index) == 1 else (direct_index.get("direct", {}),)
    (p,) = proxied_index.values() if len(proxied_index) == 1 else (proxied_index.get("edgeproxy", {}),)
    out = []
    for cid in sorted(set(d) & set(p), key=case_key):
        dc, pc = d[cid].get("remoteCloseCode"), p[cid].get("remoteCloseCode")
        if dc != pc:
            out.append({"case": cid, "direct": dc, "proxied": pc})
    return out


def mismatched_cases(direct: Mapping[str, Verdict], proxied: Mapping[str, Verdict]) -> list[str]:
    """The cases the comparison rule rejects after one run each (the ones worth a re-run)."""
    return [d["case"] for d in compare_verdicts(direct, proxied)["differences"]]


def group_counts(case_ids: Iterable[str]) -> dict[str, int]:
    """``{"1.*": 16, "2.*": 11, ...}`` in numeric order."""
    c = Counter(cid.split(".")[0] for cid in case_ids)
    return {f"{g}.*": c[g] for g in sorted(c, key=lambda g: case_key(g))}


def fmt_verdict(v: Iterable[str]) -> str:
    b, c = v
    return f"{b}/{c}"


def fmt_seen(seen: list[Any]) -> str:
    """``[[OK, OK], [OK, OK], [FAILED, OK]]`` -> ``"OK/OK x2, FAILED/OK"``."""
    if not seen:
        return "-"
    c = Counter(fmt_verdict(v) for v in seen)
    return ", ".join(k if n == 1 else f"{k} x{n}" for k, n in c.items())


def render_table(summary: Mapping[str, Any]) -> str:
    """Human-readable result table (printed on stdout)."""
    lines: list[str] = []
    passes = [p for p in ("direct", "proxied") if summary.get(p)]
    heads = {"direct": "direct", "proxied": "through proxy"}
    w = 18
    lines.append("behavior".ljust(w) + "".join(heads[p].rjust(15) for p in passes))
    for label in BEHAVIORS:
        lines.append(label.ljust(w) + "".join(str(summary[p]["counts"]["behavior"].get(label, 0)).rjust(15) for p in passes))
    extra = sorted({k for p in passes for k in summary[p]["counts"]["behavior"]} - set(BEHAVIORS))
    for label in extra:
        lines.append(label.ljust(w) + "".join(str(summary[p]["counts"]["behavior"].get(label, 0)).rjust(15) for p in passes))
    lines.append("-" * (w + 15 * len(passes)))
    lines.append("behaviorClose".ljust(w) + "".join(heads[p].rjust(15) for p in passes))
    labels = [k for k in CLOSE_BEHAVIORS] + sorted({k for p in passes for k in summary[p]["counts"]["behaviorClose"]} - set(CLOSE_BEHAVIORS))
    for label in labels:
        if not any(summary[p]["counts"]["behaviorClose"].get(label, 0) for p in passes) and label not in ("OK", "FAILED"):
            continue
        lines.append(label.ljust(w) + "".join(str(summary[p]["counts"]["behaviorClose"].get(label, 0)).rjust(15) for p in passes))
    lines.append("-" * (w + 15 * len(passes)))
    lines.append("cases".ljust(w) + "".join(str(summary[p]["cases"]).rjust(15) for p in passes))
    lines.append("seconds".ljust(w) + "".join(f"{summary[p]['seconds']:.1f}".rjust(15) for p in passes))
    cmp_ = summary.get("comparison")
    if cmp_ is not None:
        lines.append("")
        if cmp_["differences"]:
            n_acc = sum(1 for d in cmp_["differences"] if d.get("accepted"))
            head = "SAME verdicts but for" if cmp_["same"] else "DIFFERENT verdicts in"
            lines.append(f"{head} {len(cmp_['differences'])} case(s) (direct -> through proxy)"
                         + (f", {n_acc} accepted by --accept-passing-differences" if n_acc else "") + ":")
            for d in cmp_["differences"]:
                dv = fmt_seen(d["direct"])
                pv = fmt_seen(d["proxied"])
                why = d["reason"] + ("; both verdicts are passing ones" if d.get("both_pass") else "")
                why += "; accepted" if d.get("accepted") else ""
                lines.append(f"  {d['case']:>8}  {dv}  ->  {pv}   ({why})")
        else:
            n_strict = len(cmp_.get("stricter", ()))
            lines.append(f"SAME verdicts in all {cmp_['cases_compared']} cases." if not n_strict else
                         f"NO DIFFERENCE in {cmp_['cases_compared']} cases but {n_strict} where the proxy is stricter.")
        if cmp_.get("stricter"):
            lines.append(
                "proxy OK where direct is not (allowed: the proxy is stricter): "
                + ", ".join(f"{x['case']} {fmt_seen(x['direct'])} -> {fmt_seen(x['proxied'])}" for x in cmp_["stricter"])
            )
        if cmp_["flaky"]:
            lines.append(
                f"timing-dependent (differed once, matched on re-run): "
                + ", ".join(f"{f['case']} [{'|'.join(sorted({fmt_verdict(v) for v in f['direct'] + f['proxied']}))}]" for f in cmp_["flaky"])
            )
        ccd = cmp_.get("close_code_differences")
        if ccd:
            lines.append(
                "note, close codes differ (not a verdict): "
                + ", ".join(f"{x['case']} {x['direct']}->{x['proxied']}" for x in ccd)
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Processes
# --------------------------------------------------------------------------- #


def run(cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command bounded in time; output captured as text."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.STDOUT)
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(cmd, timeout=timeout, text=True, **kw)


def clean_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV"):
        env.pop(k, None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


class Children:
    """Processes we started; each in its own session so its whole tree can be ended by its id."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[Any]]] = []

    def start(self, name: str, cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(cmd, start_new_session=True, **kw)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # the group may outlive its leader (workers): end it by its id
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)

    def stop_all(self) -> None:
        for _name, proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float, what: str) -> None:
    """Wait (bounded) until 127.0.0.1:port accepts a TCP connection."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SetupError(f"{what} exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.1)
    raise SetupError(f"{what} did not accept connections on 127.0.0.1:{port} within {timeout:.0f}s")


def start_echo(children: Children, workdir: Path, timeout: float) -> tuple[subprocess.Popen[Any], int]:
    logf = open(workdir / "reports" / "echo_server.log", "w")
    cmd = [sys.executable, str(HERE / "echo_server.py"), "--host", "127.0.0.1", "--port", "0"]
    proc = children.start("echo", cmd, stdout=subprocess.PIPE, stderr=logf, env=clean_env())
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    end = time.monotonic() + timeout
    buf = b""
    try:
        while time.monotonic() < end and b"\n" not in buf:
            if not sel.select(timeout=max(0.0, min(0.5, end - time.monotonic()))):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
    finally:
        sel.close()
    m = re.search(rb"ready\s+\S*:(\d+)", buf)
    if not m:
        tail = (workdir / "reports" / "echo_server.log").read_text(errors="replace")[-2000:]
        raise SetupError(f"echo server did not report ready within {timeout:.0f}s (stdout {buf!r}); log:\n{tail}")
    port = int(m.group(1))
    wait_port(port, proc, 10, "echo server")
    return proc, port


PROXY_CONFIG = """\
# generated by tests/conformance/run_autobahn.py
[[listeners]]
bind = "127.0.0.1:{port}"

[[upstreams]]
name = "echo"
servers = ["127.0.0.1:{upstream_port}"]

[[routes]]
path_prefix = "/"
upstream = "echo"

[websocket]
max_message_size = 0
# No heartbeats, as the echo server has none: Autobahn ends a case that expects
# no control frame (9.x, 12.x, 13.x) at the first PING or PONG it receives, with
# FAILED, and the proxy's first ping comes at a random point in its first interval.
ping_interval = 0

[logging]
access_log = false

# an ephemeral admin port: several checkouts may run this at once
[admin]
bind = "127.0.0.1:0"
"""


def start_proxy(
    children: Children, workdir: Path, upstream_port: int, proxy_cmd: str | None, timeout: float
) -> tuple[subprocess.Popen[Any], int, list[str]]:
    port = free_port()
    config = workdir / "edgeproxy.toml"
    config.write_text(PROXY_CONFIG.format(port=port, upstream_port=upstream_port))
    env = clean_env()
    if proxy_cmd:
        cmd = shlex.split(
            proxy_cmd.format(
                config=config, port=port, upstream_host="127.0.0.1", upstream_port=upstream_port, python=sys.executable
            )
        )
    else:
        env["PYTHONPATH"] = str(ROOT)
        probe = run([sys.executable, "-c", "import edgeproxy.cli"], timeout=60, cwd=ROOT, env=env)
        if probe.returncode != 0:
            raise SetupError(
                "edgeproxy is not runnable here (`import edgeproxy.cli` failed):\n" + probe.stdout.strip()[-2000:]
            )
        cmd = [sys.executable, "-m", "edgeproxy", "run", "--config", str(config)]
    logpath = workdir / "reports" / "proxy.stderr.log"
    logf = open(logpath, "w")
    log(f"starting proxy: {shlex.join(cmd)}  (log: {logpath})")
    proc = children.start("proxy", cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, timeout, "proxy")
    except SetupError as e:
        logf.flush()
        tail = logpath.read_text(errors="replace")[-3000:]
        raise SetupError(f"{e}; proxy log tail:\n{tail}") from None
    return proc, port, cmd


# --------------------------------------------------------------------------- #
# Runners
# --------------------------------------------------------------------------- #


class Runner(abc.ABC):
    name = "?"
    version = "?"

    #: cases the runner can run at once (`--parallel`); wstest runs them one by one
    max_parallel = 1
    parallel = 1

    @abc.abstractmethod
    def run(self, url: str, agent: str, cases: list[str], exclude: list[str], outdir: Path, timeout: float) -> Path:
        """Run the cases against `url`; return the report directory holding index.json."""


class Wstest(Runner):
    name = "wstest"

    def __init__(self, exe: Path, version: str) -> None:
        self.exe = exe
        self.version = version

    def run(self, url: str, agent: str, cases: list[str], exclude: list[str], outdir: Path, timeout: float) -> Path:
        spec = {
            "outdir": str(outdir),
            "servers": [{"agent": agent, "url": url}],
            "cases": cases,
            "exclude-cases": exclude,
            "exclude-agent-cases": {},
        }
        specpath = outdir.parent / f"{outdir.name}.spec.json"
        specpath.write_text(json.dumps(spec, indent=2))
        logpath = outdir.parent / f"{outdir.name}.runner.log"
        cmd = [str(self.exe), "-m", "fuzzingclient", "-s", str(specpath)]
        with open(logpath, "w") as logf:
            _run_runner(cmd, outdir.parent, logf, logpath, timeout)
        return outdir / "index.json"


class Kosoku(Runner):
    name = "kosoku"
    max_parallel = 64

    def __init__(self, exe: Path, version: str) -> None:
        self.exe = exe
        self.version = version

    def run(self, url: str, agent: str, cases: list[str], exclude: list[str], outdir: Path, timeout: float) -> Path:
        cmd = [str(self.exe), "-m", "fuzzingclient", url, "-o", str(outdir), "-p", str(self.parallel)]
        for c in cases:
            cmd += ["-i", c]
        for c in exclude:
            cmd += ["-x", c]
        logpath = outdir.parent / f"{outdir.name}.runner.log"
        with open(logpath, "w") as logf:
            # exit 1 just means some case did not pass (the reference server has some)
            _run_runner(cmd, outdir.parent, logf, logpath, timeout, ok_codes=(0, 1))
        return outdir / "index.json"


def _run_runner(
    cmd: list[str], cwd: Path, logf: Any, logpath: Path, timeout: float, ok_codes: tuple[int, ...] = (0,)
) -> None:
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=clean_env(), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        Children().stop(proc)
        raise SetupError(f"runner did not finish within {timeout:.0f}s: {shlex.join(cmd)} (log: {logpath})") from None
    except BaseException:
        Children().stop(proc)
        raise
    if rc not in ok_codes:
        tail = logpath.read_text(errors="replace")[-3000:]
        raise SetupError(f"runner exited with code {rc}: {shlex.join(cmd)}\n{tail}")


def _probe_python2(candidate: str) -> str | None:
    """Return the interpreter path if it is a working CPython 2.7."""
    try:
        r = run(
            [candidate, "-c", "import sys; sys.stdout.write('%d.%d %s' % (sys.version_info[0], sys.version_info[1], sys.executable))"],
            timeout=30, env=clean_env(PYENV_VERSION=os.environ.get("PYENV_VERSION", "")), stderr=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    out = (r.stdout or "").strip()
    if r.returncode == 0 and out.startswith("2.7 "):
        return out.split(" ", 1)[1] or candidate
    return None


def find_python2(explicit: str | None) -> tuple[str | None, list[str]]:
    """Find a CPython 2.7: --python2/AUTOBAHN_PYTHON2, pyenv, PATH, usual places."""
    tried: list[str] = []
    cands: list[str] = []
    if explicit is not None:
        cands.append(explicit)
    else:
        pyenv = shutil.which("pyenv")
        if pyenv:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                r = run([pyenv, "prefix", "2.7.18"], timeout=30, stderr=subprocess.DEVNULL)
                if r.returncode == 0 and r.stdout.strip():
                    cands.append(os.path.join(r.stdout.strip().splitlines()[0], "bin", "python"))
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                r = run([pyenv, "versions", "--bare"], timeout=30, stderr=subprocess.DEVNULL)
                root = run([pyenv, "root"], timeout=30, stderr=subprocess.DEVNULL).stdout.strip()
                for v in sorted(r.stdout.split(), reverse=True):
                    if v.startswith("2.7") and root:
                        cands.append(os.path.join(root, "versions", v, "bin", "python"))
        cands += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/2.7*/bin/python")), reverse=True)
        for name in ("python2.7", "python2"):
            p = shutil.which(name)
            if p:
                cands.append(p)
        cands += ["/usr/bin/python2.7", "/usr/local/bin/python2.7"]
    seen = set()
    for c in cands:
        if c in seen:
            continue
        seen.add(c)
        if not os.path.exists(c) and os.sep in c:
            tried.append(f"{c} (missing)")
            continue
        tried.append(c)
        found = _probe_python2(c)
        if found:
            return found, tried
    return None, tried


@contextlib.contextmanager
def file_lock(path: Path, deadline: Deadline) -> Any:
    """Serialise concurrent runs sharing one work directory (bounded wait)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline.left() < 5:
                    raise SetupError(f"another run holds {path}; gave up waiting") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pip(python: Path, args: list[str], timeout: float, logf: Any) -> bool:
    cmd = [str(python), "-m", "pip", "--disable-pip-version-check", "--timeout", "60", "install", *args]
    log(f"  $ {shlex.join(cmd)}")
    try:
        r = subprocess.run(cmd, timeout=timeout, env=clean_env(), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    except subprocess.TimeoutExpired:
        log(f"  pip timed out after {timeout:.0f}s")
        return False
    return r.returncode == 0


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_virtualenv_tool(workdir: Path, deadline: Deadline, logf: Any) -> list[str]:
    """A Python 3 environment holding virtualenv==20.21.1; returns the command prefix to run it."""
    tools = workdir / "tools"
    py = _venv_python(tools)
    marker = tools / ".edgeproxy-ok"
    if py.exists() and marker.exists() and marker.read_text().strip() == VIRTUALENV_PIN:
        return [str(py), "-m", "virtualenv"]
    shutil.rmtree(tools, ignore_errors=True)
    log(f"creating {tools} with {VIRTUALENV_PIN}")
    r = run([sys.executable, "-m", "venv", str(tools)], timeout=deadline.bound(180), env=clean_env())
    if r.returncode != 0:
        raise SetupError(f"python3 -m venv failed:\n{r.stdout[-2000:]}")
    if not _pip(py, [VIRTUALENV_PIN], deadline.bound(600), logf):
        raise SetupError(f"could not install {VIRTUALENV_PIN} (see {logf.name})")
    marker.write_text(VIRTUALENV_PIN + "\n")
    return [str(py), "-m", "virtualenv"]


def _wstest_version(exe: Path) -> str | None:
    try:
        r = run([str(exe), "-a"], timeout=60, env=clean_env())
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"AutobahnTestSuite\s+(\S+)", r.stdout or "")
    return m.group(1) if r.returncode == 0 and m else None


def ensure_wstest(workdir: Path, python2: str | None, deadline: Deadline, logf: Any) -> Wstest:
    venv = workdir / "venv"
    exe = venv / "bin" / "wstest"
    marker = venv / ".edgeproxy-ok"
    if exe.exists() and marker.exists() and marker.read_text().strip() == AUTOBAHNTESTSUITE_PIN:
        v = _wstest_version(exe)
        if v:
            return Wstest(exe, v)
    py2, tried = find_python2(python2)
    if not py2:
        raise NoRunner("no CPython 2.7 found (tried: " + (", ".join(tried) or "nothing") + ")")
    log(f"Python 2.7: {py2}")
    virtualenv = ensure_virtualenv_tool(workdir, deadline, logf)
    shutil.rmtree(venv, ignore_errors=True)
    log(f"creating {venv} (Python 2.7 virtualenv)")
    r = run([*virtualenv, "-p", py2, str(venv)], timeout=deadline.bound(300), env=clean_env())
    logf.write(r.stdout)
    if r.returncode != 0:
        raise NoRunner(f"virtualenv -p {py2} failed:\n{r.stdout[-1500:]}")
    constraints = workdir / "constraints-py27.txt"
    constraints.write_text(PY27_CONSTRAINTS)
    log(f"installing {AUTOBAHNTESTSUITE_PIN} into it (about a minute)")
    if not _pip(_venv_python(venv), ["-c", str(constraints), AUTOBAHNTESTSUITE_PIN], deadline.bound(900), logf):
        raise NoRunner(f"pip install {AUTOBAHNTESTSUITE_PIN} into the Python 2.7 virtualenv failed (see {logf.name})")
    v = _wstest_version(exe)
    if not v:
        raise NoRunner(f"wstest installed but `wstest -a` does not run (see {logf.name})")
    marker.write_text(AUTOBAHNTESTSUITE_PIN + "\n")
    return Wstest(exe, v)


def ensure_kosoku(workdir: Path, deadline: Deadline, logf: Any) -> Kosoku:
    venv = workdir / "kosoku-venv"
    exe = venv / "bin" / "kosoku"
    py = _venv_python(venv)
    marker = venv / ".edgeproxy-ok"
    if not (exe.exists() and marker.exists() and marker.read_text().strip() == KOSOKU_PIN):
        shutil.rmtree(venv, ignore_errors=True)
        log(f"creating {venv} with {KOSOKU_PIN}")
        r = run([sys.executable, "-m", "venv", str(venv)], timeout=deadline.bound(180), env=clean_env())
        if r.returncode != 0:
            raise NoRunner(f"python3 -m venv failed:\n{r.stdout[-1500:]}")
        if not _pip(py, [KOSOKU_PIN], deadline.bound(600), logf):
            raise NoRunner(f"pip install {KOSOKU_PIN} failed (see {logf.name})")
    try:
        r = run([str(exe), "-h"], timeout=60, env=clean_env())
    except (OSError, subprocess.SubprocessError) as e:
        raise NoRunner(f"kosoku does not run: {e}") from None
    if r.returncode != 0:
        raise NoRunner(f"kosoku does not run:\n{r.stdout[-1500:]}")
    marker.write_text(KOSOKU_PIN + "\n")
    return Kosoku(exe, KOSOKU_PIN.split("==")[1])


def get_runner(kind: str, workdir: Path, python2: str | None, deadline: Deadline) -> Runner:
    reasons = []
    logpath = workdir / "setup.log"
    with open(logpath, "a") as logf:
        if kind in ("auto", "wstest"):
            try:
                return ensure_wstest(workdir, python2, deadline, logf)
            except NoRunner as e:
                reasons.append(f"wstest: {e}")
                log(f"wstest unavailable: {e}")
        if kind in ("auto", "kosoku"):
            try:
                return ensure_kosoku(workdir, deadline, logf)
            except NoRunner as e:
                reasons.append(f"kosoku: {e}")
                log(f"kosoku unavailable: {e}")
    raise NoRunner("no Autobahn runner can be had here; " + "; ".join(reasons))


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #


def split_list(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run the Autobahn|Testsuite fuzzingclient against a reference echo server "
        "directly and through edgeproxy, and compare verdicts.",
    )
    p.add_argument("--cases", action="append", metavar="IDS",
                   help='case ids/globs, comma-separated or repeated (default: "*")')
    p.add_argument("--exclude", action="append", metavar="IDS",
                   help="case ids/globs to exclude (default: 12.*,13.* unless --with-compression)")
    p.add_argument("--with-compression", action="store_true",
                   help="do not exclude the 12.x/13.x permessage-deflate groups")
    p.add_argument("--proxy-cmd", metavar="CMD",
                   help="command that starts the proxy instead of `python -m edgeproxy run --config {config}`; "
                   "placeholders: {config} {port} {upstream_host} {upstream_port} {python}")
    p.add_argument("--direct-only", action="store_true", help="only run against the echo server directly")
    p.add_argument("--timeout", type=float, default=None,
                   help="overall bound in seconds, runner installation included (default 900; 3000 with --with-compression)")
    p.add_argument("--runner", choices=("auto", "wstest", "kosoku"), default=os.environ.get("EDGEPROXY_AUTOBAHN_RUNNER", "auto"))
    p.add_argument("--python2", default=os.environ.get("AUTOBAHN_PYTHON2"),
                   help="CPython 2.7 interpreter for wstest (default: search pyenv and PATH)")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="run N cases at once on each target (kosoku's -p; needs kosoku: with --runner auto "
                   "it is chosen when N > 1)")
    p.add_argument("--retries", type=int, default=2,
                   help="re-runs of differing cases on both targets before calling them different (default 2)")
    p.add_argument("--accept-passing-differences", action="store_true",
                   help="do not fail on a case whose verdicts differ but all pass (OK/NON-STRICT/INFORMATIONAL); "
                   "it is still listed")
    p.add_argument("--proxy-start-timeout", type=float, default=30.0)
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("EDGEPROXY_AUTOBAHN_DIR", DEFAULT_WORKDIR)))
    p.add_argument("--setup-only", action="store_true", help="only make sure a runner is installed")
    args = p.parse_args(argv)
    args.cases = split_list(args.cases) or ["*"]
    if args.exclude is None:
        args.exclude = [] if args.with_compression else list(COMPRESSION_GROUPS)
    else:
        args.exclude = split_list(args.exclude)
    if args.timeout is None:
        args.timeout = 3000.0 if args.with_compression else 900.0
    args.retries = max(0, min(args.retries, 5))
    if not 1 <= args.parallel <= Kosoku.max_parallel:
        p.error(f"--parallel must be in 1..{Kosoku.max_parallel}")
    if args.parallel > 1:
        if args.runner == "wstest":
            p.error("--parallel > 1 needs kosoku (wstest runs cases one by one)")
        args.runner = "kosoku"
    return args


def one_pass(runner: Runner, target: str, url: str, cases: list[str], exclude: list[str],
             workdir: Path, deadline: Deadline, timeout_each: float | None = None) -> tuple[dict[str, Verdict], float]:
    outdir = workdir / "reports" / target
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    t0 = time.monotonic()
    index = runner.run(url, target, cases, exclude, outdir, deadline.bound(timeout_each or 1e9))
    secs = time.monotonic() - t0
    if not index.exists():
        raise SetupError(f"{runner.name} wrote no {index}")
    verdicts = load_index(index)
    if not verdicts:
        raise SetupError(f"{index} lists no case: does the selection {cases} minus {exclude} match anything?")
    return verdicts, secs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir: Path = args.workdir.resolve()
    deadline = Deadline(args.timeout)
    children = Children()

    def on_signal(signum: int, _frame: Any) -> None:
        children.stop_all()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    (workdir / "reports").mkdir(parents=True, exist_ok=True)
    summary_path = workdir / "summary.json"
    with contextlib.suppress(FileNotFoundError):
        summary_path.unlink()

    try:
        with file_lock(workdir / ".lock", deadline):
            return _main(args, workdir, deadline, children, summary_path)
    except NoRunner as e:
        msg = f"Autobahn|Testsuite cannot run here: {e}"
        log(msg)
        summary_path.write_text(json.dumps({"status": "skipped", "reason": msg}, indent=2) + "\n")
        print(f"SKIP: {msg}", flush=True)
        return EXIT_SKIP
    except SetupError as e:
        log(f"ERROR: {e}")
        summary_path.write_text(json.dumps({"status": "error", "reason": str(e)}, indent=2) + "\n")
        print(f"ERROR: {e}", flush=True)
        return EXIT_ERROR
    finally:
        children.stop_all()


def _main(args: argparse.Namespace, workdir: Path, deadline: Deadline, children: Children, summary_path: Path) -> int:
    t_start = time.monotonic()
    runner = get_runner(args.runner, workdir, args.python2, deadline)
    runner.parallel = args.parallel
    log(f"runner: {runner.name} {runner.version} ({getattr(runner, 'exe', '')})")
    if args.setup_only:
        print(f"runner ready: {runner.name} {runner.version}")
        return EXIT_OK
    setup_secs = time.monotonic() - t_start

    # fresh reports for this run (stale re-run reports would mislead)
    reports = workdir / "reports"
    for old in reports.iterdir():
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()

    selection = f"cases {args.cases}" + (f" excluding {args.exclude}" if args.exclude else "")
    log(f"selection: {selection}")

    echo, echo_port = start_echo(children, workdir, deadline.bound(30))
    log(f"echo server (websockets) on 127.0.0.1:{echo_port}")

    summary: dict[str, Any] = {
        "status": "running",
        "runner": {"name": runner.name, "version": runner.version},
        "cases": args.cases,
        "exclude_cases": args.exclude,
        "with_compression": args.with_compression,
        "parallel": args.parallel,
        "accept_passing_differences": args.accept_passing_differences,
        "setup_seconds": round(setup_secs, 1),
    }

    log("pass 1/2: DIRECT")
    direct, d_secs = one_pass(runner, "direct", f"ws://127.0.0.1:{echo_port}", args.cases, args.exclude, workdir, deadline)
    summary["direct"] = {"cases": len(direct), "seconds": round(d_secs, 1), "counts": count_verdicts(direct),
                         "report_dir": str(workdir / "reports" / "direct")}
    summary["ran_cases"] = sorted(direct, key=case_key)
    summary["ran_groups"] = group_counts(direct)
    print(f"runner: {runner.name} {runner.version}")
    print(f"selection: {selection}" + (f", {args.parallel} cases at once" if args.parallel > 1 else ""))
    print(f"ran {len(direct)} cases: " + ", ".join(f"{g} {n}" for g, n in summary["ran_groups"].items()))

    if args.direct_only:
        summary["status"] = "direct-only"
        summary["verdicts"] = {"direct": {c: list(v) for c, v in sorted(direct.items(), key=lambda kv: case_key(kv[0]))}}
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(render_table(summary))
        print(f"summary: {summary_path}")
        return EXIT_OK

    proxy, proxy_port, proxy_cmd = start_proxy(children, workdir, echo_port, args.proxy_cmd, deadline.bound(args.proxy_start_timeout))
    summary["proxy_cmd"] = proxy_cmd
    log(f"proxy on 127.0.0.1:{proxy_port} -> echo 127.0.0.1:{echo_port}")
    log("pass 2/2: THROUGH PROXY")
    proxy_url = f"ws://127.0.0.1:{proxy_port}"
    proxied, p_secs = one_pass(runner, "edgeproxy", proxy_url, args.cases, args.exclude, workdir, deadline)
    summary["proxied"] = {"cases": len(proxied), "seconds": round(p_secs, 1), "counts": count_verdicts(proxied),
                          "report_dir": str(workdir / "reports" / "edgeproxy")}

    d_reruns: list[dict[str, Verdict]] = []
    p_reruns: list[dict[str, Verdict]] = []
    todo = mismatched_cases(direct, proxied)
    for attempt in range(1, args.retries + 1):
        # only cases present on both sides can be re-run meaningfully
        todo = [c for c in todo if c in direct and c in proxied]
        if not todo:
            break
        log(f"re-run {attempt}/{args.retries} of {len(todo)} differing case(s): {', '.join(todo)}")
        dr, _ = one_pass(runner, f"direct-rerun{attempt}", f"ws://127.0.0.1:{echo_port}", todo, [], workdir, deadline)
        pr, _ = one_pass(runner, f"edgeproxy-rerun{attempt}", proxy_url, todo, [], workdir, deadline)
        d_reruns.append(dr)
        p_reruns.append(pr)
        cmp_now = compare_verdicts({c: direct[c] for c in todo}, {c: proxied[c] for c in todo}, d_reruns, p_reruns)
        todo = [d["case"] for d in cmp_now["differences"]]

    cmp_ = compare_verdicts(direct, proxied, d_reruns, p_reruns, accept_passing=args.accept_passing_differences)
    with contextlib.suppress(OSError, ValueError):
        cmp_["close_code_differences"] = close_code_differences(
            json.loads((workdir / "reports" / "direct" / "index.json").read_text()),
            json.loads((workdir / "reports" / "edgeproxy" / "index.json").read_text()),
        )
    summary["comparison"] = cmp_
    summary["status"] = "same" if cmp_["same"] else "different"
    summary["total_seconds"] = round(time.monotonic() - t_start, 1)
    summary["verdicts"] = {
        "direct": {c: list(v) for c, v in sorted(direct.items(), key=lambda kv: case_key(kv[0]))},
        "proxied": {c: list(v) for c, v in sorted(proxied.items(), key=lambda kv: case_key(kv[0]))},
    }
    if proxy.poll() is not None:
        log(f"note: the proxy exited (code {proxy.returncode}) during the run")
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(render_table(summary))
    print(f"summary: {summary_path}")
    return EXIT_OK if cmp_["same"] else EXIT_DIFFER


if __name__ == "__main__":
    sys.exit(main())

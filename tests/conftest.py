"""Shared fixtures.

``impl`` runs a test once per implementation: "pure" (edgeproxy.core.frames, plus
write_many from edgeproxy.core.fanout) and "compiled" (edgeproxy._speedups).
"compiled" is skipped when the extension is not built, unless ``EDGEPROXY_REQUIRE_EXT=1``,
which turns the skip into a failure.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import SimpleNamespace

import pytest

FRAME_API = ("apply_mask", "parse_header", "encode_header", "FrameScanner")
FANOUT_API = ("write_many",)
RELAY_API = ("RelayCore", "RelayEndpoint")


def env_flag(name: str) -> bool:
    """Same truthiness as edgeproxy.core._accel.env_flag (1/true/yes/on)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def load_frame_impl(name: str) -> SimpleNamespace:
    """The frame primitives and write_many of one implementation; skip/fail if compiled is missing."""
    if name == "pure":
        module = importlib.import_module("edgeproxy.core.frames")
        fanout = importlib.import_module("edgeproxy.core.fanout")
        relay = importlib.import_module("edgeproxy.core.relay")
    else:
        try:
            module = importlib.import_module("edgeproxy._speedups")
        except ImportError as exc:
            msg = (
                f"compiled edgeproxy._speedups not importable ({exc}); "
                "build it with `python3 setup.py build_ext --inplace`"
            )
            if env_flag("EDGEPROXY_REQUIRE_EXT"):
                pytest.fail(f"EDGEPROXY_REQUIRE_EXT=1: {msg}", pytrace=False)
            pytest.skip(msg)
        fanout = relay = module
    return SimpleNamespace(
        name=name,
        module=module,
        **{attr: getattr(module, attr) for attr in FRAME_API},
        **{attr: getattr(fanout, attr) for attr in FANOUT_API},
        **{attr: getattr(relay, attr) for attr in RELAY_API},
    )


@pytest.fixture(params=["pure", "compiled"])
def impl(request) -> SimpleNamespace:
    """Namespace with the frame primitives, write_many, RelayCore and RelayEndpoint (+ name, module)."""
    return load_frame_impl(request.param)


@pytest.fixture
def external_tool():
    """Factory: ``external_tool(command, debian_package)`` -> path of a system tool.

    Without the tool the test is skipped with the install command, except under
    ``CI=true``, where a missing tool is a failure (`.ci/run` installs it).
    """

    def find(command: str, package: str) -> str:
        path = shutil.which(command)
        if path is None:
            msg = f"{command} is not installed (Debian: apt-get install -y {package})"
            if env_flag("CI"):
                pytest.fail(f"CI=true: {msg}", pytrace=False)
            pytest.skip(msg)
        return path

    return find


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A `tests.certs.CertFactory`: a CA made for this test session, and leaves on demand."""
    if shutil.which("openssl") is None:  # pragma: no cover - openssl is part of the base system here
        pytest.fail("the openssl CLI is needed to make test certificates")
    from tests.certs import CertFactory

    return CertFactory(str(tmp_path_factory.mktemp("certs")))

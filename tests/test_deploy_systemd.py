"""The systemd unit in deploy/systemd/: systemd accepts it, and its stop timeout covers the drain."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

from edgeproxy.config import load_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "edgeproxy.service"
CONFIG = ROOT / "deploy" / "systemd" / "edgeproxy.toml"
INSTALLED = "/opt/edgeproxy/bin/edgeproxy"


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def verify(tmp_path: Path, text: str, analyze: str) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` on `text`, with the installed command pointed at this environment's."""
    command = Path(sys.executable).with_name("edgeproxy")
    assert command.exists()
    unit = tmp_path / "edgeproxy.service"
    unit.write_text(text.replace(INSTALLED, str(command)))
    return subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)


def test_systemd_analyze_verifies_the_unit_and_catches_a_typo(tmp_path: Path, external_tool) -> None:
    analyze = external_tool("systemd-analyze", "systemd")
    text = UNIT.read_text()
    assert INSTALLED in text
    good = verify(tmp_path, text, analyze)
    assert good.returncode == 0 and good.stderr == "", good.stderr
    typo = verify(tmp_path, text.replace("ProtectSystem=", "ProtectSytem="), analyze)
    assert "ProtectSytem" in typo.stderr, typo.stderr


def test_stop_timeout_covers_the_drain_of_the_shipped_config() -> None:
    unit, config = service(), load_config(CONFIG)
    assert unit["ExecStart"] == f"{INSTALLED} run --config /etc/edgeproxy/edgeproxy.toml"
    assert unit["KillSignal"] == "SIGTERM"
    # SIGTERM only to the supervisor (it drains its workers), SIGKILL to all at the timeout
    assert unit["KillMode"] == "mixed"
    assert float(unit["TimeoutStopSec"]) > config.shutdown.readiness_grace + config.shutdown.drain_timeout


def test_reload_is_sighup_and_the_unit_is_hardened() -> None:
    unit = service()
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert unit["ExecStartPre"].endswith("validate --config /etc/edgeproxy/edgeproxy.toml")
    assert int(unit["LimitNOFILE"]) >= 65536
    for key, value in {"NoNewPrivileges": "true", "ProtectSystem": "strict", "ProtectHome": "true",
                       "PrivateTmp": "true", "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
                       "AmbientCapabilities": "CAP_NET_BIND_SERVICE"}.items():
        assert unit[key] == value, key
    assert unit["User"] != "root"
    # workers need AF_UNIX (control channel), clients AF_INET/AF_INET6
    assert set(unit["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}


def test_the_capability_is_what_the_shipped_config_needs() -> None:
    """CAP_NET_BIND_SERVICE is granted because the config binds a port below 1024; nothing else is."""
    config = load_config(CONFIG)
    assert any(listener.bind.port < 1024 for listener in config.listeners)


SOCKET_UNIT = ROOT / "deploy" / "systemd" / "edgeproxy.socket"


def test_socket_unit_verifies_and_names_the_shipped_listeners(tmp_path: Path, external_tool) -> None:
    """Socket activation matches sockets to listeners by address: the unit must use the config's binds."""
    analyze = external_tool("systemd-analyze", "systemd")
    command = Path(sys.executable).with_name("edgeproxy")
    (tmp_path / "edgeproxy.service").write_text(UNIT.read_text().replace(INSTALLED, str(command)))
    (tmp_path / "edgeproxy.socket").write_text(SOCKET_UNIT.read_text())
    result = subprocess.run([analyze, "verify", str(tmp_path / "edgeproxy.socket"), str(tmp_path / "edgeproxy.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read_string(SOCKET_UNIT.read_text())
    streams = [line.split("=", 1)[1] for line in SOCKET_UNIT.read_text().splitlines() if line.startswith("ListenStream=")]
    assert streams and set(streams) <= {str(listener.bind) for listener in load_config(CONFIG).listeners}
    assert parser["Socket"]["ReusePort"] == "false" and parser["Unit"]["PartOf"] == "edgeproxy.service"

"""The resume keys of the configuration: ``[websocket] resume_*``, ``instance_id`` and the route overrides."""

from __future__ import annotations

import pytest

from edgeproxy.config import WebSocketConfig, parse_config
from edgeproxy.errors import ConfigError

BASE = """
[[listeners]]
bind = "127.0.0.1:8080"

[[upstreams]]
name = "app"
servers = ["127.0.0.1:9001"]

[[routes]]
upstream = "app"
{route}
[websocket]
{websocket}
"""
SECRET = 'resume_secret = "0123456789abcdef"'


def config(websocket: str = "", route: str = ""):
    return parse_config(BASE.format(websocket=websocket, route=route), "t.toml")


def problems(websocket: str = "", route: str = "") -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        config(websocket, route)
    return [(key, message) for _, key, message in info.value.problems]


def test_resume_is_off_by_default_and_secret_stays_out_of_repr() -> None:
    ws = config().websocket
    assert ws.resume_secret == b"" and ws.resume_window == 30.0 and ws.resume_buffer_bytes == 1048576
    ws = config(SECRET + '\nresume_window = 2.5\nresume_buffer_bytes = 4096\ninstance_id = "edge-1"').websocket
    assert ws == WebSocketConfig(resume_window=2.5, resume_buffer_bytes=4096, resume_secret=b"0123456789abcdef",
                                 instance_id="edge-1")
    assert "0123456789abcdef" not in repr(ws)


def test_secret_file_is_read_relative_to_the_config(tmp_path) -> None:
    (tmp_path / "resume.key").write_bytes(b"a-secret-of-twenty-bytes\n")
    path = tmp_path / "edge.toml"
    path.write_text(BASE.format(websocket='resume_secret_file = "resume.key"', route=""))
    from edgeproxy.config import load_config

    assert load_config(path).websocket.resume_secret == b"a-secret-of-twenty-bytes"


def test_route_overrides() -> None:
    route = config(SECRET, "resume_window = 5\nresume_buffer_bytes = 2048\n").routes[0]
    assert (route.resume, route.resume_window, route.resume_buffer_bytes) == (True, 5.0, 2048)
    assert config(SECRET, "resume = false\n").routes[0].resume is False


@pytest.mark.parametrize(
    ("websocket", "route", "key", "fragment"),
    [
        (SECRET + "\nresume_window = 0", "", "websocket.resume_window", "a number > 0"),
        (SECRET + '\nresume_window = "30s"', "", "websocket.resume_window", "seconds"),
        (SECRET + "\nresume_buffer_bytes = 100", "", "websocket.resume_buffer_bytes", "an integer >= 1024"),
        (SECRET + '\nresume_secret_file = "x"', "", "websocket.resume_secret", "exactly one of resume_secret or resume_secret_file"),
        ('resume_secret = "short"', "", "websocket.resume_secret", "at least 16 bytes"),
        ('resume_secret_file = "/nonexistent/resume.key"', "", "websocket.resume_secret_file", "cannot read the secret file"),
        (SECRET + '\ninstance_id = "edge 1"', "", "websocket.instance_id", "1 to 64 letters"),
        ("", "resume_window = 3\n", "routes[0].resume_window", "resumable sessions are off"),
        ("", "resume_buffer_bytes = 4096\n", "routes[0].resume_buffer_bytes", "resumable sessions are off"),
        (SECRET, "resume = 1\n", "routes[0].resume", "true or false"),
        (SECRET, "resume_windo = 3\n", "routes[0].resume_windo", "did you mean 'resume_window'"),
        (SECRET + "\nresume_buffer = 3", "", "websocket.resume_buffer", "did you mean 'resume_buffer_bytes'"),
    ],
)
def test_each_mistake_is_named_with_its_key_path(websocket: str, route: str, key: str, fragment: str) -> None:
    found = problems(websocket, route)
    assert len(found) == 1, found
    assert found[0][0] == key
    assert fragment in found[0][1], found


@pytest.mark.parametrize("workers", ["2", '"auto"'])
def test_websocket_over_http2_is_off_with_resume_and_several_workers(workers) -> None:
    """A resume on an h2 stream cannot be handed to the worker holding its session: off, and true refused."""
    text = f"workers = {workers}\n" + BASE.format(websocket=SECRET, route="resume = true")
    assert parse_config(text, "t.toml").http2.websocket is False
    with pytest.raises(ConfigError) as info:
        parse_config(text + "[http2]\nwebsocket = true\n", "t.toml")
    [(_, key, message)] = info.value.problems
    assert key == "http2.websocket" and "4409" in message and "workers = 1" in message
    # one worker, or no resumable route (with a secret, routes resume unless resume = false): on by default
    assert config(SECRET, "resume = true").http2.websocket is True
    text = f"workers = {workers}\n" + BASE.format(websocket=SECRET, route="resume = false")
    assert parse_config(text, "t.toml").http2.websocket is True

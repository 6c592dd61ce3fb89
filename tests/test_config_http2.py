"""Config keys of HTTP/2 at the edge (issue #16): ``[[listeners]] http2`` and the ``[http2]`` table."""

from __future__ import annotations

import pytest

from edgeproxy.config import Http2Config, parse_config
from tests.test_config_edge import conf, problems


def test_http2_defaults_on_with_tls_off_without(certs):
    leaf = certs.leaf("default", ["DNS:localhost"])
    assert parse_config(conf()).listeners[0].http2 is False
    tls = f'tls_cert = "{leaf.cert}"\ntls_key = "{leaf.key}"'
    assert parse_config(conf(listener=tls)).listeners[0].http2 is True
    assert parse_config(conf(listener=tls + "\nhttp2 = false")).listeners[0].http2 is False
    assert parse_config(conf(listener="http2 = true")).listeners[0].http2 is True
    assert parse_config(conf()).http2 == Http2Config()


def test_http2_table_values():
    config = parse_config(conf(sections="""[http2]
max_concurrent_streams = 10
initial_window_size = 1048576
connection_window_size = 16777216
max_header_list_size = 8192
flood_window = 1.5
max_resets = 50
max_control_frames = 500
"""))
    assert config.http2 == Http2Config(10, 1048576, 16777216, 8192, 1.5, 50, 500)


@pytest.mark.parametrize("text, key", [
    ('http2 = "yes"', "listeners[0].http2"),
])
def test_listener_http2_must_be_a_boolean(text, key):
    assert [k for k, _ in problems(conf(listener=text))] == [key]


@pytest.mark.parametrize("line, key", [
    ("max_concurrent_streams = 0", "http2.max_concurrent_streams"),
    ("initial_window_size = 2147483648", "http2.initial_window_size"),  # RFC 9113 6.5.2: at most 2^31-1
    ("connection_window_size = 1000", "http2.connection_window_size"),  # below the 65535 every connection has
    ("max_header_list_size = 100", "http2.max_header_list_size"),
    ("flood_window = 0", "http2.flood_window"),
    ("max_resets = 0", "http2.max_resets"),
    ("max_control_frames = true", "http2.max_control_frames"),
    ("max_streams = 5", "http2.max_streams"),  # unknown key
])
def test_http2_table_problems(line, key):
    assert [k for k, _ in problems(conf(sections=f"[http2]\n{line}"))] == [key]

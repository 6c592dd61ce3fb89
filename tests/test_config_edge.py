"""Config keys of the edge hardening (issue #9): TLS, PROXY protocol, admission, origins, limits."""

from __future__ import annotations

import ipaddress

import pytest

from edgeproxy.config import SniCertificate, parse_config
from edgeproxy.errors import ConfigError

MINIMAL = """
[[listeners]]
bind = "127.0.0.1:8080"
{listener}

[[upstreams]]
name = "app"
servers = ["127.0.0.1:9001"]
{upstream}

[[routes]]
upstream = "app"
{route}

{sections}
"""


def conf(listener: str = "", upstream: str = "", route: str = "", sections: str = ""):
    return MINIMAL.format(listener=listener, upstream=upstream, route=route, sections=sections)


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.toml")
    return [(key, message) for _, key, message in info.value.problems]


def test_defaults_are_off():
    c = parse_config(conf())
    assert not c.listeners[0].tls and not c.listeners[0].proxy_protocol
    assert c.limits.max_connections == 0 and c.limits.connection_rate == 0
    assert c.websocket.strict and c.websocket.rate_action == "close" and c.websocket.max_frame_size == 0
    assert c.upstreams[0].tls is False and c.upstreams[0].max_pending_connects == 0
    assert c.routes[0].allowed_origins == ()


def test_tls_listener_with_sni(certs):
    a = certs.leaf("a.test", ["DNS:a.test"])
    b = certs.leaf("b.test", ["DNS:*.b.test"])
    c = parse_config(conf(listener=f'tls_cert = "{a.cert}"\ntls_key = "{a.key}"\n'
                                    f'tls_sni = [{{ host = "*.b.test", cert = "{b.cert}", key = "{b.key}" }}]'))
    listener = c.listeners[0]
    assert listener.tls and listener.tls_cert == a.cert
    assert listener.tls_sni == (SniCertificate("*.b.test", b.cert, b.key),)


def test_tls_problems(certs, tmp_path):
    a = certs.leaf("a.test", ["DNS:a.test"])
    b = certs.leaf("b.test", ["DNS:b.test"])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    found = problems(conf(listener=f'tls_cert = "{a.cert}"'))
    assert found == [("listeners[0].tls_key", "tls_cert and tls_key go together")]
    found = problems(conf(listener=f'tls_cert = "{a.cert}"\ntls_key = "{b.key}"'))
    assert found[0][0] == "listeners[0].tls_cert" and "cannot load the certificate" in found[0][1]
    found = problems(conf(listener=f'tls_cert = "{garbage}"\ntls_key = "{a.key}"'))
    assert found[0][0] == "listeners[0].tls_cert"
    found = problems(conf(listener='tls_cert = "/nonexistent.pem"\ntls_key = "/nonexistent.key"'))
    assert {k for k, _ in found} == {"listeners[0].tls_cert", "listeners[0].tls_key"}
    found = problems(conf(listener=f'tls_sni = [{{ host = "b.test", cert = "{b.cert}", key = "{b.key}" }}]'))
    assert found == [("listeners[0].tls_sni", "needs tls_cert and tls_key (the certificate for clients without SNI)")]
    found = problems(conf(listener=f'tls_cert = "{a.cert}"\ntls_key = "{a.key}"\ntls_sni = [{{ host = "b.test", cert = "{b.cert}", kee = "x" }}]'))
    assert {k for k, _ in found} == {"listeners[0].tls_sni[0].kee", "listeners[0].tls_sni[0].key"}


def test_relative_paths_resolve_from_the_config_file(certs, tmp_path):
    import shutil

    a = certs.leaf("rel.test", ["DNS:rel.test"])
    shutil.copy(a.cert, tmp_path / "c.pem")
    shutil.copy(a.key, tmp_path / "c.key")
    path = tmp_path / "edge.toml"
    path.write_text(conf(listener='tls_cert = "c.pem"\ntls_key = "c.key"'))
    from edgeproxy.config import load_config

    assert load_config(path).listeners[0].tls_cert == str(tmp_path / "c.pem")


def test_proxy_protocol():
    c = parse_config(conf(listener='proxy_protocol = true\nproxy_protocol_trusted = ["10.0.0.0/8", "127.0.0.1", "::1"]'))
    assert c.listeners[0].proxy_protocol
    assert c.listeners[0].proxy_protocol_trusted == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
    assert problems(conf(listener="proxy_protocol = true")) == [(
        "listeners[0].proxy_protocol_trusted",
        "proxy_protocol = true needs the balancers' addresses here (anyone else could claim any address)")]
    found = problems(conf(listener='proxy_protocol = true\nproxy_protocol_trusted = ["10.0.0.0/33"]'))
    assert found[0][0] == "listeners[0].proxy_protocol_trusted[0]"
    assert problems(conf(listener='proxy_protocol = false\nproxy_protocol_trusted = ["10.0.0.1"]')) == [
        ("listeners[0].proxy_protocol_trusted", "only used with proxy_protocol = true")]


def test_upstream_tls(certs):
    c = parse_config(conf(upstream=f'tls = true\ntls_ca = "{certs.ca_cert}"\ntls_server_name = "App.Internal"\nmax_pending_connects = 5'))
    up = c.upstreams[0]
    assert (up.tls, up.tls_verify, up.tls_ca, up.tls_server_name, up.max_pending_connects) == (True, True, certs.ca_cert, "app.internal", 5)
    assert problems(conf(upstream="tls_verify = false")) == [("upstreams[0].tls_verify", "only used with tls = true")]
    assert problems(conf(upstream='tls = true\ntls_server_name = "*.x.test"'))[0][0] == "upstreams[0].tls_server_name"
    assert problems(conf(upstream="max_pending_connects = -1"))[0][0] == "upstreams[0].max_pending_connects"


def test_allowed_origins():
    c = parse_config(conf(route='allowed_origins = ["https://app.example.com", "https://*.example.com", "null"]'))
    assert c.routes[0].allowed_origins == ("https://app.example.com", "https://*.example.com", "null")
    found = problems(conf(route='allowed_origins = ["https://ok.test", "app.example.com", 3]'))
    assert [k for k, _ in found] == ["routes[0].allowed_origins[1]", "routes[0].allowed_origins[2]"]
    assert problems(conf(route="allowed_origins = []"))[0][0] == "routes[0].allowed_origins"


def test_limits_and_websocket_limits():
    c = parse_config(conf(sections="[limits]\nmax_connections = 10\nmax_connections_per_ip = 2\nconnection_rate = 5.5\n"
                                   "connection_burst = 20\nip_connection_rate = 1\nip_connection_burst = 3\nip_table_size = 100\n"
                                   "[websocket]\nmax_frame_size = 1024\nstrict = false\nmessage_rate = 100\nmessage_burst = 200\n"
                                   "byte_rate = 1e6\nbyte_burst = 2000000\nrate_action = \"throttle\"\n"))
    assert (c.limits.max_connections, c.limits.max_connections_per_ip, c.limits.connection_rate) == (10, 2, 5.5)
    assert (c.limits.ip_connection_rate, c.limits.ip_connection_burst, c.limits.ip_table_size) == (1.0, 3, 100)
    ws = c.websocket
    assert (ws.max_frame_size, ws.strict, ws.message_rate, ws.byte_rate, ws.rate_action) == (1024, False, 100.0, 1e6, "throttle")
    found = problems(conf(sections='[limits]\nconnection_rate = -1\nmax_connections = 1.5\n[websocket]\nrate_action = "drop"\nmessage_rate = "fast"'))
    assert sorted(k for k, _ in found) == ["limits.connection_rate", "limits.max_connections",
                                           "websocket.message_rate", "websocket.rate_action"]

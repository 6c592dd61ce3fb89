"""Tests for edgeproxy.config: loading, defaults, and every validation rule."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeproxy import config as cfgmod
from edgeproxy.config import (
    Address,
    AdminConfig,
    BackplaneConfig,
    Config,
    HttpConfig,
    HubConfig,
    LimitsConfig,
    ListenerConfig,
    LoggingConfig,
    RouteConfig,
    UpstreamConfig,
    WebSocketConfig,
    load_config,
    parse_address,
    parse_config,
)
from edgeproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"

MINIMAL = """
[[listeners]]
bind = "127.0.0.1:8080"

[[upstreams]]
name = "app"
servers = ["127.0.0.1:9001"]

[[routes]]
upstream = "app"
"""


def problems_of(text: str, source: str = "test.toml") -> list[tuple[str, str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source)
    problems = info.value.problems
    assert problems, "ConfigError without problems"
    for problem in problems:
        assert problem[0] == source
    return problems


def keys_of(text: str) -> list[str]:
    return [key for _, key, _ in problems_of(text)]


def only_problem(text: str) -> tuple[str, str]:
    """The single (key, message) reported for ``text``."""
    problems = problems_of(text)
    assert len(problems) == 1, problems
    _, key, message = problems[0]
    return key, message


# --------------------------------------------------------------------------- #
# Loading and defaults
# --------------------------------------------------------------------------- #


def test_example_file_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.source == str(EXAMPLE)
    assert config.listeners == (ListenerConfig(bind=Address("127.0.0.1", 8080), backlog=1024),)
    assert [u.name for u in config.upstreams] == ["app"]
    assert config.upstream("app").servers == (Address("127.0.0.1", 9001),)
    assert config.routes == (RouteConfig(path_prefix="/", host=None, upstream="app"),)


def test_example_file_values_are_the_defaults() -> None:
    config = load_config(EXAMPLE)
    assert config.http == HttpConfig()
    assert config.websocket == WebSocketConfig()
    assert config.limits == LimitsConfig()
    assert config.logging == LoggingConfig()
    assert config.admin == AdminConfig()
    assert config.hubs == (HubConfig(path="/hub"),)
    assert config.backplane == BackplaneConfig()
    assert config.upstream("app") == UpstreamConfig(name="app", servers=(Address("127.0.0.1", 9001),))


def test_example_file_sets_every_option() -> None:
    """The example must document (set) every key the loader knows."""
    text_all = EXAMPLE.read_text("utf-8")
    data = tomllib.loads(text_all)
    assert set(data) == set(cfgmod._TOP_KEYS)
    # TLS needs certificate files and proxy_protocol_trusted needs proxy_protocol = true: shown commented out
    listener_opt_in = {"tls_cert", "tls_key", "tls_sni", "proxy_protocol_trusted"}
    assert set(data["listeners"][0]) == set(cfgmod._LISTENER_KEYS) - listener_opt_in
    listener_text = text_all[: text_all.index("[[upstreams]]")]
    for key in listener_opt_in:
        assert re.search(rf"^# {key} = ", listener_text, re.M), key
    # affinity and rebalance are opt-in and hash_key needs balance = "hash": shown commented out,
    # as are the upstream TLS details that need tls = true
    upstream_opt_in = {"hash_key", "affinity", "rebalance", "tls_verify", "tls_ca", "tls_server_name"}
    assert set(data["upstreams"][0]) == set(cfgmod._UPSTREAM_KEYS) - upstream_opt_in
    assert set(data["upstreams"][0]["health"]) == set(cfgmod._HEALTH_KEYS)
    assert set(data["http"]) == set(cfgmod._HTTP_KEYS)
    assert set(data["http2"]) == set(cfgmod._HTTP2_KEYS)
    # resume is on only with a secret, and instance_id defaults to a random one: shown commented out
    commented = {"resume_secret", "resume_secret_file", "instance_id"}
    assert set(data["websocket"]) == set(cfgmod._WEBSOCKET_KEYS) - commented
    websocket_text = EXAMPLE.read_text("utf-8").split("\n[websocket]\n", 1)[1].split("\n[limits]\n", 1)[0]
    for key in commented:
        assert re.search(rf"^# {key} = ", websocket_text, re.M), key
    assert set(data["limits"]) == set(cfgmod._LIMITS_KEYS)
    assert set(data["admission"]) == {"scope"}
    assert set(data["logging"]) == set(cfgmod._LOGGING_KEYS)
    # api_key, control_key and control_bind have no default (they turn features on), and
    # control_socket_mode needs a Unix control_bind: shown commented out
    admin_opt_in = {"api_key", "control_key", "control_bind", "control_socket_mode"}
    assert set(data["admin"]) == set(cfgmod._ADMIN_KEYS) - admin_opt_in
    admin_text = text_all.split("\n[admin]\n", 1)[1].split("\n[[hubs]]\n", 1)[0]
    for key in admin_opt_in:
        assert re.search(rf"^# {key} = ", admin_text, re.M), key
    # token secrets and the auth hook are opt-in: shown commented out
    assert set(data["hubs"][0]) == set(cfgmod._HUB_KEYS) - {"token_secret", "token_secret_file", "auth_hook"}
    # the servers and the instance name have no default: shown commented out
    # replicas is for NATS only and slot_by for redis-cluster only (both refused on the
    # example's "memory"): shown commented out
    assert set(data["backplane"]) == set(cfgmod._BACKPLANE_KEYS) - {"url", "urls", "instance_id", "replicas", "slot_by"}
    assert re.search(r"^# replicas = ", text_all, re.M)
    text = EXAMPLE.read_text("utf-8")
    # route keys: host is only shown commented out (it is optional)
    for key in cfgmod._ROUTE_KEYS:
        assert re.search(rf"^#? ?{key} = ", text, re.M), key
    upstream_text = text[text.index("[[upstreams]]") : text.index("[[routes]]")]
    for key in cfgmod._UPSTREAM_KEYS + cfgmod._AFFINITY_KEYS + cfgmod._REBALANCE_KEYS:
        if key not in ("affinity", "rebalance", "health"):
            assert re.search(rf"^#? ?{key} = ", upstream_text, re.M), key
    for key in cfgmod._SERVER_KEYS:
        assert re.search(rf"^# servers = \[.*\b{key} = ", upstream_text, re.M), key
    for table in ("affinity", "rebalance"):
        assert f"\n# [upstreams.{table}]\n" in upstream_text
    for key in ("api_key", "control_key", "token_secret", "token_secret_file", "auth_hook", "url", "urls", "instance_id"):
        assert re.search(rf"^# {key} = ", text, re.M), key


def test_example_opt_in_tables_are_valid_when_uncommented() -> None:
    """Uncommenting the affinity and rebalance blocks (one secret) gives a valid config."""
    text = EXAMPLE.read_text("utf-8")
    start = text.index("\n# [upstreams.affinity]")
    end = text.index("\n\n", text.index("# reconnect_delay_max"))
    block = "\n".join(
        line[2:] if re.fullmatch(r"# (\[upstreams\.\w+\]|\w+ = .*)", line) and "secret_file" not in line else line
        for line in text[start:end].splitlines()
    )
    config = parse_config(text[:start] + block + text[end:])
    upstream = config.upstream("app")
    assert upstream.affinity is not None and upstream.affinity.cookie == "edgeproxy"
    assert upstream.affinity.domain == "example.com" and upstream.affinity.rebalance_threshold == 1.5
    assert upstream.rebalance is not None and upstream.rebalance.max_closes == 10


def test_minimal_config_defaults() -> None:
    config = parse_config(MINIMAL)
    assert config.source == "<string>"
    assert config.listeners[0].backlog == 1024
    upstream = config.upstreams[0]
    assert upstream.connect_timeout == 5.0
    assert upstream.read_timeout == 60.0
    assert upstream.pool_size == 32
    assert upstream.pool_idle_timeout == 60.0
    route = config.routes[0]
    assert route.path_prefix == "/" and route.host is None and route.upstream == "app"
    assert config.http == HttpConfig(header_timeout=10.0, keepalive_timeout=75.0, max_header_size=16384)
    assert config.websocket == WebSocketConfig(
        max_message_size=67108864, handshake_timeout=10.0, idle_timeout=3600.0, close_timeout=5.0
    )
    assert config.limits.buffer_high_water == 262144
    assert config.limits.heap_trim_interval == 10.0
    assert config.logging == LoggingConfig(level="info", format="text", access_log=True)
    assert config.admin == AdminConfig(bind=Address("127.0.0.1", 9901), enabled=True)


def test_full_config_values() -> None:
    text = MINIMAL + """
[[upstreams]]
name = "api"
servers = ["api.internal:8000", "[fd00::1]:8001"]
connect_timeout = 2
read_timeout = 0.5
pool_size = 0
pool_idle_timeout = 10

[[routes]]
host = "API.Example.com"
path_prefix = "/v1/"
upstream = "api"

[[routes]]
host = "*.example.com"
upstream = "api"

[http]
header_timeout = 3
keepalive_timeout = 0
max_header_size = 1024

[websocket]
max_message_size = 0
handshake_timeout = 1.5
idle_timeout = 0
close_timeout = 2

[limits]
buffer_high_water = 1024

[logging]
level = "debug"
format = "json"
access_log = false
"""
    config = parse_config(text, "full.toml")
    api = config.upstream("api")
    assert api.servers == (Address("api.internal", 8000), Address("fd00::1", 8001))
    assert (api.connect_timeout, api.read_timeout, api.pool_size, api.pool_idle_timeout) == (2.0, 0.5, 0, 10.0)
    assert isinstance(api.connect_timeout, float)
    assert config.routes[1] == RouteConfig(path_prefix="/v1/", host="api.example.com", upstream="api")
    assert config.routes[2].host == "*.example.com"
    assert config.http == HttpConfig(3.0, 0.0, 1024)
    assert config.websocket == WebSocketConfig(0, 1.5, 0.0, 2.0)
    assert config.limits == LimitsConfig(1024)
    assert config.logging == LoggingConfig("debug", "json", False)
    assert config.source == "full.toml"


def test_logging_choices_are_case_insensitive() -> None:
    config = parse_config(MINIMAL + '[logging]\nlevel = "WARNING"\nformat = "Json"\n')
    assert config.logging.level == "warning"
    assert config.logging.format == "json"


def test_upstream_lookup_raises_keyerror() -> None:
    config = parse_config(MINIMAL)
    assert config.upstream("app").name == "app"
    with pytest.raises(KeyError):
        config.upstream("missing")


def test_config_objects_are_frozen() -> None:
    config = parse_config(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.source = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.http.header_timeout = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listeners[0].bind.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.upstreams[0].name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes[0].upstream = "other"  # type: ignore[misc]
    assert isinstance(config.listeners, tuple)
    assert isinstance(config.upstreams[0].servers, tuple)
    # slots: no stray attributes either
    with pytest.raises((AttributeError, TypeError)):
        config.logging.extra = 1  # type: ignore[attr-defined]
    hash(config)  # frozen dataclasses of tuples are hashable


def test_config_dataclass_defaults_for_programmatic_use() -> None:
    config = Config(
        listeners=(ListenerConfig(Address("127.0.0.1", 0)),),
        upstreams=(UpstreamConfig("app", (Address("127.0.0.1", 1),)),),
        routes=(RouteConfig(upstream="app"),),
    )
    assert config.http == HttpConfig() and config.logging == LoggingConfig()


# --------------------------------------------------------------------------- #
# Addresses
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080, "127.0.0.1:8080"),
        ("0.0.0.0:0", "0.0.0.0", 0, "0.0.0.0:0"),
        ("[::1]:8080", "::1", 8080, "[::1]:8080"),
        ("[::]:443", "::", 443, "[::]:443"),
        ("[0:0:0:0:0:0:0:1]:80", "::1", 80, "[::1]:80"),
        ("[FD00::AB]:65535", "fd00::ab", 65535, "[fd00::ab]:65535"),
        ("localhost:9001", "localhost", 9001, "localhost:9001"),
        ("Backend-1.Example.COM:80", "backend-1.example.com", 80, "backend-1.example.com:80"),
        ("my_service:8000", "my_service", 8000, "my_service:8000"),
    ],
)
def test_parse_address_valid(text: str, host: str, port: int, shown: str) -> None:
    address = parse_address(text)
    assert address == Address(host, port)
    assert str(address) == shown


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "expected host:port"),
        ("127.0.0.1", "missing port"),
        ("127.0.0.1:", "missing port number"),
        (":8080", "empty host"),
        ("[]:8080", "empty host"),
        ("::1:8080", "brackets"),
        ("[::1]8080", "missing ':port'"),
        ("[::1:8080", "missing ']'"),
        ("[::zz]:80", "not a valid IPv6 address"),
        ("[127.0.0.1]:80", "not a valid IPv6 address"),
        ("host:65536", "port must be a number 0..65535"),
        ("host:-1", "port must be a number 0..65535"),
        ("host:http", "port must be a number 0..65535"),
        ("host:+80", "port must be a number 0..65535"),
        ("bad host:80", "not a valid hostname"),
        ("-bad:80", "not a valid hostname"),
        ("256.1.1.1:80", "not a valid IPv4 address"),
        (" 127.0.0.1:80", "without spaces"),
    ],
)
def test_parse_address_invalid(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert fragment in str(info.value)
    assert json.dumps(text) in str(info.value)  # the message quotes the input


@given(
    host=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str),
    port=st.integers(min_value=0, max_value=65535),
)
def test_address_str_round_trips(host: str, port: int) -> None:
    address = Address(host, port)
    assert parse_address(str(address)) == address


def test_parse_address_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="expected an address string"):
        parse_address(8080)  # type: ignore[arg-type]


def test_ipv6_listener_binds() -> None:
    text = MINIMAL.replace('bind = "127.0.0.1:8080"', 'bind = "[::1]:8080"\n[[listeners]]\nbind = "[::]:0"')
    config = parse_config(text)
    assert [listener.bind for listener in config.listeners] == [Address("::1", 8080), Address("::", 0)]
    assert str(config.listeners[0].bind) == "[::1]:8080"


def test_port_zero_allowed_for_listeners_only() -> None:
    text = MINIMAL.replace('"127.0.0.1:8080"', '"127.0.0.1:0"')
    assert parse_config(text).listeners[0].bind.port == 0
    key, message = only_problem(MINIMAL.replace('"127.0.0.1:9001"', '"127.0.0.1:0"'))
    assert key == "upstreams[0].servers[0]"
    assert "port must be 1..65535" in message


def test_several_ephemeral_listeners_do_not_collide() -> None:
    text = MINIMAL.replace('bind = "127.0.0.1:8080"', 'bind = "127.0.0.1:0"\n[[listeners]]\nbind = "127.0.0.1:0"')
    assert len(parse_config(text).listeners) == 2


# --------------------------------------------------------------------------- #
# One rule, one problem, exact key path
# --------------------------------------------------------------------------- #

# (description, toml text, expected key path, expected message fragment)
RULES = [
    # unknown keys at every level
    ("unknown top-level key", "timout = 3\n" + MINIMAL, "timout", "unknown key 'timout' (expected one of: listeners, upstreams, routes"),
    ("unknown listener key", MINIMAL.replace('bind = "127.0.0.1:8080"', 'bind = "127.0.0.1:8080"\nbacklg = 5'), "listeners[0].backlg", "did you mean 'backlog'?"),
    ("unknown upstream key", MINIMAL.replace('name = "app"', 'name = "app"\ntimeout = 5'), "upstreams[0].timeout", "unknown key 'timeout' (expected one of: name, servers, connect_timeout"),
    ("unknown route key", MINIMAL + 'prefix = "/x"\n', "routes[0].prefix", "unknown key 'prefix'"),
    ("unknown http key", MINIMAL + "[http]\nheader_timout = 1\n", "http.header_timout", "did you mean 'header_timeout'?"),
    ("unknown websocket key", MINIMAL + "[websocket]\nmax_size = 1\n", "websocket.max_size", "unknown key 'max_size' (expected one of: max_message_size"),
    ("unknown limits key", MINIMAL + "[limits]\nhigh_water = 1\n", "limits.high_water", "unknown key 'high_water'"),
    ("unknown logging key", MINIMAL + "[logging]\nfile = 'x'\n", "logging.file", "expected one of: level, format, access_log"),
    # workers
    ("workers zero", "workers = 0\n" + MINIMAL, "workers", 'expected a process count (an integer 1..1024) or "auto" (one per CPU), got 0'),
    ("workers as a string", 'workers = "4"\n' + MINIMAL, "workers", 'or "auto" (one per CPU), got "4"'),
    ("workers a boolean", "workers = true\n" + MINIMAL, "workers", "got true"),
    ("workers' admin ports reach a listener", "workers = 3\n" + MINIMAL + '[admin]\nbind = "127.0.0.1:8078"\n',
     "admin.bind", "admin port 8080 (worker 2) is already used by listeners[0].bind"),
    ("workers' admin ports pass 65535", "workers = 3\n" + MINIMAL + '[admin]\nbind = "127.0.0.1:65534"\n',
     "admin.bind", "with workers = 3 the admin ports 65534..65536 (one per worker) pass 65535"),
    # required sections
    ("no listeners", MINIMAL.replace('[[listeners]]\nbind = "127.0.0.1:8080"', ""), "listeners", "at least one [[listeners]]"),
    ("empty listeners array", MINIMAL.replace('[[listeners]]\nbind = "127.0.0.1:8080"', "listeners = []"), "listeners", "at least one [[listeners]]"),
    ("listeners as a table", MINIMAL.replace("[[listeners]]", "[listeners]"), "listeners", "expected an array of tables ([[listeners]]), got a table"),
    ("listener not a table", MINIMAL.replace('[[listeners]]\nbind = "127.0.0.1:8080"', 'listeners = ["127.0.0.1:8080"]'), "listeners[0]", "expected a table"),
    ("section not a table", "http = 5\n" + MINIMAL, "http", "expected a table ([http]), got 5"),
    # listeners
    ("listener without bind", MINIMAL.replace('bind = "127.0.0.1:8080"', "backlog = 5"), "listeners[0].bind", "missing required key"),
    ("bind without port", MINIMAL.replace('"127.0.0.1:8080"', '"127.0.0.1"'), "listeners[0].bind", "missing port"),
    ("bind empty host", MINIMAL.replace('"127.0.0.1:8080"', '":8080"'), "listeners[0].bind", "empty host"),
    ("bind not a string", MINIMAL.replace('"127.0.0.1:8080"', "8080"), "listeners[0].bind", "expected an address string"),
    ("bind port too big", MINIMAL.replace('"127.0.0.1:8080"', '"127.0.0.1:70000"'), "listeners[0].bind", "0..65535"),
    ("backlog zero", MINIMAL.replace('bind = "127.0.0.1:8080"', 'bind = "127.0.0.1:8080"\nbacklog = 0'), "listeners[0].backlog", "integer >= 1), got 0"),
    ("backlog float", MINIMAL.replace('bind = "127.0.0.1:8080"', 'bind = "127.0.0.1:8080"\nbacklog = 10.0'), "listeners[0].backlog", "got 10.0"),
    ("duplicate bind", MINIMAL.replace('bind = "127.0.0.1:8080"', 'bind = "127.0.0.1:8080"\n[[listeners]]\nbind = "127.0.0.1:8080"'), "listeners[1].bind", "duplicate listener address 127.0.0.1:8080 (already used by listeners[0])"),
    ("duplicate ipv6 bind spelled differently", MINIMAL.replace('bind = "127.0.0.1:8080"', 'bind = "[::1]:80"\n[[listeners]]\nbind = "[0::1]:80"'), "listeners[1].bind", "duplicate listener address [::1]:80"),
    # upstreams
    ("upstream without name", MINIMAL.replace('name = "app"\n', ""), "upstreams[0].name", "missing required key"),
    ("upstream empty name", MINIMAL.replace('name = "app"', 'name = ""') + "[[upstreams]]\nname = 'app'\nservers = ['h:1']\n", "upstreams[0].name", 'expected a non-empty string, got ""'),
    ("upstream name not a string", MINIMAL.replace('name = "app"', "name = 1") + "[[upstreams]]\nname = 'app'\nservers = ['h:1']\n", "upstreams[0].name", "expected a non-empty string, got 1"),
    ("duplicate upstream name", MINIMAL + '[[upstreams]]\nname = "app"\nservers = ["h:1"]\n', "upstreams[1].name", "duplicate upstream name 'app' (already defined by upstreams[0])"),
    ("servers missing", MINIMAL.replace('servers = ["127.0.0.1:9001"]', ""), "upstreams[0].servers", "missing required key"),
    ("servers empty", MINIMAL.replace('["127.0.0.1:9001"]', "[]"), "upstreams[0].servers", "at least one server"),
    ("servers not a list", MINIMAL.replace('["127.0.0.1:9001"]', '"127.0.0.1:9001"'), "upstreams[0].servers", "expected a list of addresses"),
    ("server bad entry", MINIMAL.replace('["127.0.0.1:9001"]', '["127.0.0.1:9001", "h:1", "nohost"]'), "upstreams[0].servers[2]", "missing port"),
    ("server port 0", MINIMAL.replace('"127.0.0.1:9001"', '"127.0.0.1:0"'), "upstreams[0].servers[0]", "port must be 1..65535"),
    ("server empty host", MINIMAL.replace('"127.0.0.1:9001"', '":9001"'), "upstreams[0].servers[0]", "empty host"),
    ("server unbracketed ipv6", MINIMAL.replace('"127.0.0.1:9001"', '"::1:9001"'), "upstreams[0].servers[0]", "brackets"),
    ("connect_timeout string", MINIMAL.replace('name = "app"', 'name = "app"\nconnect_timeout = "5s"'), "upstreams[0].connect_timeout", 'expected a number of seconds >= 0, got "5s"'),
    ("read_timeout negative", MINIMAL.replace('name = "app"', 'name = "app"\nread_timeout = -1'), "upstreams[0].read_timeout", "expected a number of seconds >= 0, got -1"),
    ("pool_idle_timeout bool", MINIMAL.replace('name = "app"', 'name = "app"\npool_idle_timeout = true'), "upstreams[0].pool_idle_timeout", "got true"),
    ("pool_size negative", MINIMAL.replace('name = "app"', 'name = "app"\npool_size = -1'), "upstreams[0].pool_size", "integer >= 0), got -1"),
    ("pool_size bool", MINIMAL.replace('name = "app"', 'name = "app"\npool_size = false'), "upstreams[0].pool_size", "got false"),
    # routes
    ("route missing upstream", MINIMAL.replace('upstream = "app"', 'path_prefix = "/"'), "routes[0].upstream", "missing required key"),
    ("route unknown upstream", MINIMAL.replace('upstream = "app"', 'upstream = "ap"'), "routes[0].upstream", "route refers to upstream 'ap', which is not defined (defined: app)"),
    ("route upstream not a string", MINIMAL.replace('upstream = "app"', "upstream = 1"), "routes[0].upstream", "expected the name of an upstream, got 1"),
    ("path_prefix without slash", MINIMAL.replace('upstream = "app"', 'upstream = "app"\npath_prefix = "api"'), "routes[0].path_prefix", 'expected a path starting with "/", got "api"'),
    ("path_prefix not a string", MINIMAL.replace('upstream = "app"', 'upstream = "app"\npath_prefix = 1'), "routes[0].path_prefix", "got 1"),
    ("path_prefix with query", MINIMAL.replace('upstream = "app"', 'upstream = "app"\npath_prefix = "/a?b"'), "routes[0].path_prefix", "no spaces, '?' or '#'"),
    ("route host with port", MINIMAL.replace('upstream = "app"', 'upstream = "app"\nhost = "example.com:80"'), "routes[0].host", "without port"),
    ("route host bad wildcard", MINIMAL.replace('upstream = "app"', 'upstream = "app"\nhost = "foo.*.com"'), "routes[0].host", '"*.example.com"'),
    ("route host lone star", MINIMAL.replace('upstream = "app"', 'upstream = "app"\nhost = "*"'), "routes[0].host", "omit host"),
    ("route host invalid chars", MINIMAL.replace('upstream = "app"', 'upstream = "app"\nhost = "exa mple.com"'), "routes[0].host", "expected a hostname"),
    ("route host empty", MINIMAL.replace('upstream = "app"', 'upstream = "app"\nhost = ""'), "routes[0].host", "expected a hostname"),
    ("route host not a string", MINIMAL.replace('upstream = "app"', 'upstream = "app"\nhost = ["a"]'), "routes[0].host", "got an array"),
    ("duplicate route", MINIMAL + '[[routes]]\nupstream = "app"\npath_prefix = "/"\n', "routes[1]", "duplicate route"),
    # http
    ("header_timeout string", MINIMAL + '[http]\nheader_timeout = "10"\n', "http.header_timeout", 'got "10"'),
    ("keepalive_timeout inf", MINIMAL + "[http]\nkeepalive_timeout = inf\n", "http.keepalive_timeout", "got inf"),
    ("keepalive_timeout nan", MINIMAL + "[http]\nkeepalive_timeout = nan\n", "http.keepalive_timeout", "got nan"),
    ("max_header_size too small", MINIMAL + "[http]\nmax_header_size = 1023\n", "http.max_header_size", "integer >= 1024), got 1023"),
    ("max_header_size float", MINIMAL + "[http]\nmax_header_size = 16384.0\n", "http.max_header_size", "got 16384.0"),
    # websocket
    ("max_message_size negative", MINIMAL + "[websocket]\nmax_message_size = -1\n", "websocket.max_message_size", "integer >= 0), got -1"),
    ("max_message_size string", MINIMAL + '[websocket]\nmax_message_size = "64MB"\n', "websocket.max_message_size", 'got "64MB"'),
    ("handshake_timeout bool", MINIMAL + "[websocket]\nhandshake_timeout = true\n", "websocket.handshake_timeout", "got true"),
    ("idle_timeout negative", MINIMAL + "[websocket]\nidle_timeout = -0.5\n", "websocket.idle_timeout", "got -0.5"),
    ("close_timeout table", MINIMAL + "[websocket]\nclose_timeout = {s = 1}\n", "websocket.close_timeout", "got a table"),
    ("close_timeout date", MINIMAL + "[websocket]\nclose_timeout = 2024-01-01\n", "websocket.close_timeout", "got a date/time"),
    # limits
    ("buffer_high_water too small", MINIMAL + "[limits]\nbuffer_high_water = 100\n", "limits.buffer_high_water", "integer >= 1024), got 100"),
    ("heap_trim_interval negative", MINIMAL + "[limits]\nheap_trim_interval = -1\n", "limits.heap_trim_interval", "expected a number of seconds >= 0, got -1"),
    ("heap_trim_interval string", MINIMAL + '[limits]\nheap_trim_interval = "10s"\n', "limits.heap_trim_interval", 'got "10s"'),
    ("heap_trim_interval bool", MINIMAL + "[limits]\nheap_trim_interval = true\n", "limits.heap_trim_interval", "got true"),
    # logging
    ("logging level", MINIMAL + '[logging]\nlevel = "trace"\n', "logging.level", 'expected one of debug, info, warning, error, got "trace"'),
    ("logging format", MINIMAL + '[logging]\nformat = "xml"\n', "logging.format", 'expected one of text, json, got "xml"'),
    ("logging level not a string", MINIMAL + "[logging]\nlevel = 10\n", "logging.level", "got 10"),
    ("access_log int", MINIMAL + "[logging]\naccess_log = 1\n", "logging.access_log", "expected true or false, got 1"),
    # admin
    ("admin not a table", 'admin = "127.0.0.1:9901"\n' + MINIMAL, "admin", "expected a table ([admin])"),
    ("admin bind without port", MINIMAL + '[admin]\nbind = "127.0.0.1"\n', "admin.bind", "missing port"),
    ("admin bind not a string", MINIMAL + "[admin]\nbind = 9901\n", "admin.bind", "expected an address string"),
    ("admin bind unbracketed ipv6", MINIMAL + '[admin]\nbind = "::1:9901"\n', "admin.bind", "brackets"),
    ("admin bind same as a listener", MINIMAL + '[admin]\nbind = "127.0.0.1:8080"\n', "admin.bind", "127.0.0.1:8080 is already used by listeners[0].bind"),
    ("admin enabled string", MINIMAL + '[admin]\nenabled = "yes"\n', "admin.enabled", 'expected true or false, got "yes"'),
    ("admin unknown key", MINIMAL + '[admin]\nbnd = "127.0.0.1:9901"\n', "admin.bnd", "did you mean 'bind'?"),
]


@pytest.mark.parametrize(("text", "key", "fragment"), [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_rule_reports_exact_key(text: str, key: str, fragment: str) -> None:
    got_key, message = only_problem(text)
    assert got_key == key
    assert fragment in message, message


def test_unknown_key_message_lists_all_expected_keys() -> None:
    _, message = only_problem(MINIMAL + "[websocket]\ntimout = 1\n")
    assert message.startswith("unknown key 'timout' (expected one of: ")
    for key in cfgmod._WEBSOCKET_KEYS:
        assert key in message


def test_error_message_format_includes_file_and_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(MINIMAL.replace('upstream = "app"', 'upstream = "ap"'), "proxy.toml")
    assert str(info.value) == (
        "proxy.toml: routes[0].upstream: route refers to upstream 'ap', which is not defined (defined: app)"
    )


def test_admin_values() -> None:
    config = parse_config(MINIMAL + '[admin]\nbind = "[::1]:0"\nenabled = false\n')
    assert config.admin == AdminConfig(bind=Address("::1", 0), enabled=False)


def test_disabled_admin_may_share_a_listener_address() -> None:
    """Nothing binds a disabled admin listener, so it cannot collide."""
    config = parse_config(MINIMAL + '[admin]\nbind = "127.0.0.1:8080"\nenabled = false\n')
    assert config.admin.enabled is False


def test_version_is_the_sha256_of_the_text_and_not_compared() -> None:
    config = parse_config(MINIMAL)
    commented = parse_config("# a comment changes the file, not the configuration\n" + MINIMAL)
    assert config.version == hashlib.sha256(MINIMAL.encode()).hexdigest()
    assert commented.version != config.version
    assert commented == config


def test_route_host_is_normalized_to_lowercase() -> None:
    config = parse_config(MINIMAL.replace('upstream = "app"', 'upstream = "app"\nhost = "*.Example.COM"'))
    assert config.routes[0].host == "*.example.com"


def test_same_prefix_on_different_hosts_is_fine() -> None:
    text = MINIMAL + '[[routes]]\nhost = "a.example"\nupstream = "app"\n[[routes]]\nhost = "b.example"\nupstream = "app"\n'
    config = parse_config(text)
    assert [r.host for r in config.routes] == [None, "a.example", "b.example"]


def test_routes_keep_file_order() -> None:
    text = MINIMAL + '[[routes]]\npath_prefix = "/api/"\nupstream = "app"\n'
    assert [r.path_prefix for r in parse_config(text).routes] == ["/", "/api/"]


# --------------------------------------------------------------------------- #
# Collecting many problems
# --------------------------------------------------------------------------- #


def test_all_problems_reported_at_once() -> None:
    text = """
colour = "blue"

[[listeners]]
bind = "127.0.0.1"
backlog = 0

[[upstreams]]
name = "app"
servers = ["127.0.0.1:9001", "127.0.0.1:9002", "::1:80"]
connect_timeout = "5s"

[[routes]]
path_prefix = "api"
upstream = "app"

[[routes]]
upstream = "ap"

[websocket]
max_message_size = -5

[logging]
level = "loud"
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "many.toml")
    keys = [key for _, key, _ in info.value.problems]
    assert keys == [
        "colour",
        "listeners[0].backlog",
        "listeners[0].bind",
        "upstreams[0].servers[2]",
        "upstreams[0].connect_timeout",
        "routes[0].path_prefix",
        "routes[1].upstream",
        "websocket.max_message_size",
        "logging.level",
    ]
    lines = str(info.value).splitlines()
    assert len(lines) == len(keys)
    assert all(line.startswith("many.toml: ") for line in lines)


def test_broken_upstreams_do_not_cascade_into_route_errors() -> None:
    # the routes' upstream cannot be judged while the upstreams are unusable
    assert keys_of(MINIMAL.replace("[[upstreams]]", "[upstreams]")) == ["upstreams"]
    assert keys_of(MINIMAL.replace('name = "app"\n', "")) == ["upstreams[0].name"]
    # but a valid upstream list is checked against
    assert keys_of(MINIMAL + '[[routes]]\npath_prefix = "/x"\nupstream = "nope"\n') == ["routes[1].upstream"]


def test_missing_everything_reports_each_section() -> None:
    assert keys_of("") == ["listeners", "upstreams", "routes"]


def test_problems_in_every_array_item_are_reported() -> None:
    text = """
[[listeners]]
bind = "x"
[[listeners]]
bind = "y"
[[upstreams]]
name = "a"
servers = ["h:1", "h", "h:0"]
[[routes]]
upstream = "b"
[[routes]]
path_prefix = "/c/"
upstream = "c"
"""
    assert keys_of(text) == [
        "listeners[0].bind",
        "listeners[1].bind",
        "upstreams[0].servers[1]",
        "upstreams[0].servers[2]",
        "routes[0].upstream",
        "routes[1].upstream",
    ]


# --------------------------------------------------------------------------- #
# Broken TOML and unreadable files
# --------------------------------------------------------------------------- #


def test_broken_toml_reports_line_and_column() -> None:
    text = MINIMAL + "\n[http]\nheader_timeout = \n"
    problems = problems_of(text, "broken.toml")
    assert len(problems) == 1
    source, key, message = problems[0]
    line = text.splitlines().index("header_timeout = ") + 1
    assert (source, key) == ("broken.toml", "")
    assert message.startswith("invalid TOML: ")
    assert f"line {line}" in message
    assert "column" in message


def test_broken_toml_file_via_load_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[listeners]\nbind = "x"\n', "utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (source, key, message), = info.value.problems
    assert source == str(path) and key == ""
    assert "line 1" in message
    assert str(path) in str(info.value)


def test_duplicate_toml_key_is_a_toml_error() -> None:
    problems = problems_of(MINIMAL + "[http]\nheader_timeout = 1\nheader_timeout = 2\n")
    assert problems[0][2].startswith("invalid TOML: ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (source, _, message), = info.value.problems
    assert source == str(path)
    assert "cannot read config file" in message
    assert str(path) in str(info.value)


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems[0][0] == str(tmp_path)
    assert "cannot read config file" in info.value.problems[0][2]


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert "not valid UTF-8" in info.value.problems[0][2]


def test_load_config_accepts_str_and_pathlike(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(MINIMAL, "utf-8")
    assert load_config(str(path)) == load_config(path)
    assert load_config(path).source == str(path)


def test_validation_errors_from_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(MINIMAL.replace('upstream = "app"', 'upstream = "x"'), "utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        (str(path), "routes[0].upstream", "route refers to upstream 'x', which is not defined (defined: app)")
    ]


# --------------------------------------------------------------------------- #
# Balancing, affinity, rebalance and health (issue #4)
# --------------------------------------------------------------------------- #

SECRET_LINE = 'secret = "0123456789abcdef"\n'


def with_upstream(extra: str, servers: str = '["127.0.0.1:9001"]') -> str:
    """MINIMAL with ``extra`` TOML added to the upstream (keys first, then sub-tables)."""
    return MINIMAL.replace('servers = ["127.0.0.1:9001"]\n', f"servers = {servers}\n{extra}\n")


def test_balancing_defaults() -> None:
    upstream = parse_config(MINIMAL).upstreams[0]
    assert upstream.balance == "round_robin" and upstream.hash_key == "ip"
    assert upstream.weights == () and upstream.drain == ()
    assert upstream.affinity is None and upstream.rebalance is None
    assert upstream.health == cfgmod.HealthConfig()
    assert upstream.weight(Address("127.0.0.1", 9001)) == 1


def test_server_tables_weights_and_drain() -> None:
    text = with_upstream(
        'balance = "least_conn"',
        servers='[{ address = "10.0.0.1:80", weight = 3 }, "10.0.0.2:80", { address = "10.0.0.3:80", drain = true }]',
    )
    upstream = parse_config(text).upstreams[0]
    a, b, c = Address("10.0.0.1", 80), Address("10.0.0.2", 80), Address("10.0.0.3", 80)
    assert upstream.servers == (a, b, c)
    assert upstream.weights == (3, 1, 1)
    assert upstream.weight(a) == 3 and upstream.weight(c) == 1
    assert upstream.drain == (c,)
    assert upstream.balance == "least_conn"


def test_full_affinity_rebalance_health(tmp_path) -> None:
    key = tmp_path / "affinity.key"
    key.write_bytes(b"a-secret-from-a-file-0123\n")
    text = with_upstream(
        'balance = "hash"\nhash_key = "cookie:sid"\n'
        '[upstreams.affinity]\ncookie = "ep"\nsecret_file = "affinity.key"\npath = "/app"\ndomain = "Example.com"\n'
        'max_age = 60\nsecure = true\nhttp_only = false\nsame_site = "none"\nrebalance_threshold = 1.5\n'
        '[upstreams.rebalance]\nthreshold = 1.1\nsustain = 0.5\ninterval = 0.2\nmax_closes = 3\nclose_code = 1013\n'
        'reconnect_delay_min = 0.1\nreconnect_delay_max = 0.3\n'
        '[upstreams.health]\ncheck = "http"\npath = "/healthz"\ninterval = 0.1\ntimeout = 0.5\nrise = 1\nfall = 2\n'
        'max_fails = 0\neject_base = 1\neject_max = 2\nslow_start = 3\n'
    )
    config_file = tmp_path / "edge.toml"
    config_file.write_text(text)
    upstream = load_config(config_file).upstreams[0]
    assert upstream.hash_key == "cookie:sid"
    aff = upstream.affinity
    assert aff.cookie == "ep" and aff.secret == b"a-secret-from-a-file-0123"
    assert (aff.path, aff.domain, aff.max_age, aff.secure, aff.http_only, aff.same_site) == (
        "/app", "Example.com", 60, True, False, "none")
    assert aff.rebalance_threshold == 1.5
    assert "a-secret" not in repr(upstream)
    reb = upstream.rebalance
    assert (reb.threshold, reb.sustain, reb.interval, reb.max_closes, reb.close_code, reb.delay_min, reb.delay_max) == (
        1.1, 0.5, 0.2, 3, 1013, 0.1, 0.3)
    health = upstream.health
    assert (health.check, health.path, health.interval, health.timeout) == ("http", "/healthz", 0.1, 0.5)
    t = health.thresholds
    assert (t.rise, t.fall, t.max_fails, t.eject_base, t.eject_max, t.slow_start) == (1, 2, 0, 1.0, 2.0, 3.0)


BALANCE_CASES = [
    ("balance unknown", with_upstream('balance = "random"'), "upstreams[0].balance", "expected one of round_robin, least_conn, p2c, hash"),
    ("hash_key without hash", with_upstream('hash_key = "ip"'), "upstreams[0].hash_key", 'only used with balance = "hash"'),
    ("hash_key bad", with_upstream('balance = "hash"\nhash_key = "body:x"'), "upstreams[0].hash_key", '"header:NAME"'),
    ("hash_key not a string", with_upstream('balance = "hash"\nhash_key = 1'), "upstreams[0].hash_key", "got 1"),
    ("server table without address", with_upstream("", servers="[{ weight = 2 }]"), "upstreams[0].servers[0].address", "missing required key"),
    ("server table unknown key", with_upstream("", servers='[{ address = "h:1", wieght = 2 }]'), "upstreams[0].servers[0].wieght", "did you mean 'weight'"),
    ("server weight zero", with_upstream("", servers='[{ address = "h:1", weight = 0 }]'), "upstreams[0].servers[0].weight", "integer 1..100), got 0"),
    ("server weight too big", with_upstream("", servers='[{ address = "h:1", weight = 101 }]'), "upstreams[0].servers[0].weight", "got 101"),
    ("server drain not bool", with_upstream("", servers='[{ address = "h:1", drain = "yes" }]'), "upstreams[0].servers[0].drain", "expected true or false"),
    ("duplicate server", with_upstream("", servers='["h:1", { address = "h:1" }]'), "upstreams[0].servers[1]", "duplicate server h:1 (already listed as upstreams[0].servers[0])"),
    ("affinity not a table", with_upstream("affinity = 1"), "upstreams[0].affinity", "expected a table ([upstreams.affinity])"),
    ("affinity without cookie", with_upstream("[upstreams.affinity]\n" + SECRET_LINE), "upstreams[0].affinity.cookie", "missing required key"),
    ("affinity bad cookie name", with_upstream('[upstreams.affinity]\ncookie = "a b"\n' + SECRET_LINE), "upstreams[0].affinity.cookie", "expected a cookie name"),
    ("affinity without secret", with_upstream('[upstreams.affinity]\ncookie = "ep"'), "upstreams[0].affinity.secret", "set exactly one of secret or secret_file"),
    ("affinity two secrets", with_upstream('[upstreams.affinity]\ncookie = "ep"\nsecret_file = "x"\n' + SECRET_LINE), "upstreams[0].affinity.secret", "exactly one"),
    ("affinity short secret", with_upstream('[upstreams.affinity]\ncookie = "ep"\nsecret = "short"'), "upstreams[0].affinity.secret", "at least 16 bytes, got 5"),
    ("affinity missing secret file", with_upstream('[upstreams.affinity]\ncookie = "ep"\nsecret_file = "/nonexistent/key"'), "upstreams[0].affinity.secret_file", "cannot read the secret file"),
    ("affinity same_site none insecure", with_upstream('[upstreams.affinity]\ncookie = "ep"\nsame_site = "none"\n' + SECRET_LINE), "upstreams[0].affinity.same_site", "needs secure = true"),
    ("affinity same_site bad", with_upstream('[upstreams.affinity]\ncookie = "ep"\nsame_site = "loose"\n' + SECRET_LINE), "upstreams[0].affinity.same_site", "expected one of lax, strict, none"),
    ("affinity path", with_upstream('[upstreams.affinity]\ncookie = "ep"\npath = "app"\n' + SECRET_LINE), "upstreams[0].affinity.path", 'starting with "/"'),
    ("affinity domain", with_upstream('[upstreams.affinity]\ncookie = "ep"\ndomain = "a b"\n' + SECRET_LINE), "upstreams[0].affinity.domain", "expected a domain"),
    ("affinity max_age negative", with_upstream('[upstreams.affinity]\ncookie = "ep"\nmax_age = -1\n' + SECRET_LINE), "upstreams[0].affinity.max_age", "got -1"),
    ("affinity threshold too low", with_upstream('[upstreams.affinity]\ncookie = "ep"\nrebalance_threshold = 1\n' + SECRET_LINE), "upstreams[0].affinity.rebalance_threshold", "a number > 1), got 1"),
    ("affinity unknown key", with_upstream('[upstreams.affinity]\ncookie = "ep"\nmaxage = 1\n' + SECRET_LINE), "upstreams[0].affinity.maxage", "did you mean 'max_age'"),
    ("rebalance close code", with_upstream("[upstreams.rebalance]\nclose_code = 1001"), "upstreams[0].rebalance.close_code", "expected 1012 (service restart) or 1013"),
    ("rebalance threshold", with_upstream("[upstreams.rebalance]\nthreshold = 0.9"), "upstreams[0].rebalance.threshold", "got 0.9"),
    ("rebalance interval zero", with_upstream("[upstreams.rebalance]\ninterval = 0"), "upstreams[0].rebalance.interval", "a number > 0), got 0"),
    ("rebalance max_closes zero", with_upstream("[upstreams.rebalance]\nmax_closes = 0"), "upstreams[0].rebalance.max_closes", "integer >= 1), got 0"),
    ("rebalance delays reversed", with_upstream("[upstreams.rebalance]\nreconnect_delay_min = 5\nreconnect_delay_max = 1"), "upstreams[0].rebalance.reconnect_delay_max", "must be >= reconnect_delay_min (5)"),
    ("rebalance unknown key", with_upstream("[upstreams.rebalance]\nfor = 5"), "upstreams[0].rebalance.for", "unknown key 'for'"),
    ("health check", with_upstream('[upstreams.health]\ncheck = "icmp"'), "upstreams[0].health.check", "expected one of none, http, tcp"),
    ("health path", with_upstream('[upstreams.health]\npath = "healthz"'), "upstreams[0].health.path", 'starting with "/"'),
    ("health rise zero", with_upstream("[upstreams.health]\nrise = 0"), "upstreams[0].health.rise", "got 0"),
    ("health timeout zero", with_upstream("[upstreams.health]\ntimeout = 0"), "upstreams[0].health.timeout", "got 0"),
    ("health eject reversed", with_upstream("[upstreams.health]\neject_base = 10\neject_max = 1"), "upstreams[0].health.eject_max", "must be >= eject_base (10)"),
    ("health unknown key", with_upstream("[upstreams.health]\nintervall = 1"), "upstreams[0].health.intervall", "did you mean 'interval'"),
]


@pytest.mark.parametrize("name, text, key, fragment", BALANCE_CASES, ids=[c[0] for c in BALANCE_CASES])
def test_balancing_problems(name: str, text: str, key: str, fragment: str) -> None:
    got_key, message = only_problem(text)
    assert got_key == key
    assert fragment in message, message


def test_balancing_problems_are_all_collected() -> None:
    text = with_upstream(
        'balance = "x"\n[upstreams.affinity]\ncookie = "ep"\n[upstreams.rebalance]\nclose_code = 1\n'
        "[upstreams.health]\nfall = 0\n",
        servers='[{ address = "h:1", weight = 0 }]',
    )
    assert set(keys_of(text)) == {
        "upstreams[0].servers[0].weight", "upstreams[0].balance", "upstreams[0].affinity.secret",
        "upstreams[0].rebalance.close_code", "upstreams[0].health.fall",
    }


def test_workers_default_count_and_auto() -> None:
    assert parse_config(MINIMAL).workers == 1
    assert parse_config("workers = 4\n" + MINIMAL).workers == 4
    assert parse_config('workers = "auto"\n' + MINIMAL).workers == max(1, os.cpu_count() or 1)
    # the worker count is part of the config: a reload that changes it is not a no-op
    assert parse_config("workers = 2\n" + MINIMAL) != parse_config(MINIMAL)
    # admin port 0 with workers: each worker takes a free port, nothing to collide with
    assert parse_config("workers = 3\n" + MINIMAL + '[admin]\nbind = "127.0.0.1:0"\n').admin.bind.port == 0
# --------------------------------------------------------------------------- #
# [[hubs]] and the publish API key
# --------------------------------------------------------------------------- #

HUB_SECRET = "k" * 32


def test_hub_values(tmp_path: Path) -> None:
    secret_file = tmp_path / "hub.secret"
    secret_file.write_text("f" * 40 + "\n")
    config_file = tmp_path / "edgeproxy.toml"
    config_file.write_text(MINIMAL + f'''
[admin]
api_key = "0123456789abcdef"
max_publish_size = 4096
[[hubs]]
path = "/hub"
history_size = 50
history_ttl = 30
token_secret = "{HUB_SECRET}"
auth_hook = "http://127.0.0.1:9000/auth?x=1"
auth_hook_timeout = 0.5
subscriber_buffer_limit = 65536
max_message_size = 4096
max_subscriptions = 8
ping_interval = 0
fanout_batch = 100
[[hubs]]
path = "/other"
token_secret_file = "hub.secret"
''')
    config = load_config(config_file)
    assert config.admin.api_key == "0123456789abcdef" and config.admin.max_publish_size == 4096
    assert "0123456789abcdef" not in repr(config.admin)
    first, second = config.hubs
    assert first == HubConfig(
        path="/hub", history_size=50, history_ttl=30.0, token_secret=HUB_SECRET.encode(),
        auth_hook=(Address("127.0.0.1", 9000), "/auth?x=1"), auth_hook_timeout=0.5,
        subscriber_buffer_limit=65536, max_message_size=4096, max_subscriptions=8, ping_interval=0.0,
        fanout_batch=100,
    )
    assert HUB_SECRET not in repr(first)
    assert second.token_secret == b"f" * 40 and second.auth_hook is None and second.history_size == 1000


def test_no_hubs_by_default() -> None:
    assert parse_config(MINIMAL).hubs == ()


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ("[[hubs]]\nhistory_size = 5\n", "hubs[0].path", "missing required key"),
        ('[[hubs]]\npath = "hub"\n', "hubs[0].path", 'starting with "/"'),
        ('[[hubs]]\npath = "/h?x"\n', "hubs[0].path", "plain request path"),
        ('[[hubs]]\npath = "/h"\n[[hubs]]\npath = "/h"\n', "hubs[1].path", "duplicate hub path '/h' (already used by hubs[0])"),
        ('[[hubs]]\npath = "/h"\nhistory_sise = 5\n', "hubs[0].history_sise", "did you mean 'history_size'?"),
        ('[[hubs]]\npath = "/h"\nhistory_size = -1\n', "hubs[0].history_size", "an integer >= 0"),
        ('[[hubs]]\npath = "/h"\nhistory_ttl = "5m"\n', "hubs[0].history_ttl", "number of seconds"),
        ('[[hubs]]\npath = "/h"\ntoken_secret = "short"\n', "hubs[0].token_secret", "at least 32 bytes, got 5"),
        (f'[[hubs]]\npath = "/h"\ntoken_secret = "{HUB_SECRET}"\ntoken_secret_file = "x"\n', "hubs[0].token_secret", "at most one"),
        ('[[hubs]]\npath = "/h"\ntoken_secret_file = "/nonexistent/hub.secret"\n', "hubs[0].token_secret_file", "cannot read"),
        ('[[hubs]]\npath = "/h"\nauth_hook = "https://a:1/x"\n', "hubs[0].auth_hook", "http:// URL"),
        ('[[hubs]]\npath = "/h"\nauth_hook = "http://a/x"\n', "hubs[0].auth_hook", "missing port"),
        ('[[hubs]]\npath = "/h"\nsubscriber_buffer_limit = 10\n', "hubs[0].subscriber_buffer_limit", ">= 1024"),
        ('[[hubs]]\npath = "/h"\nmax_message_size = 10\n', "hubs[0].max_message_size", ">= 256"),
        ('[[hubs]]\npath = "/h"\nmax_subscriptions = 0\n', "hubs[0].max_subscriptions", ">= 1"),
        ('[[hubs]]\npath = "/h"\nfanout_batch = 0\n', "hubs[0].fanout_batch", ">= 1"),
        ('[[hubs]]\npath = "/h"\nauth_hook_timeout = 0\n', "hubs[0].auth_hook_timeout", "a number > 0"),
        ('hubs = "/h"\n', "hubs", "expected an array of tables"),
        ('[admin]\napi_key = "short"\n', "admin.api_key", "at least 16 characters, got 5"),
        ('[admin]\ncontrol_key = "short"\n', "admin.control_key", "at least 16 characters, got 5"),
        ('[admin]\ncontrol_key = 5\n', "admin.control_key", "expected a key string"),
        ('[admin]\napi_key = "0123456789abcdef"\ncontrol_key = "0123456789abcdef"\n', "admin.control_key",
         "must differ from api_key"),
        ("[admin]\napi_key = 5\n", "admin.api_key", "expected a key string"),
        ("[admin]\nmax_publish_size = 10\n", "admin.max_publish_size", ">= 1024"),
        # control endpoints nobody guards
        ('[admin]\nbind = "0.0.0.0:9901"\n', "admin.bind", "not a loopback address and [admin] control_key is not set"),
        ('[admin]\nbind = "[::]:9901"\n', "admin.bind", "not a loopback address"),
        ('[admin]\nbind = "admin.internal:9901"\n', "admin.bind", "not a loopback address"),
        ('[admin]\ncontrol_bind = "10.0.0.5:9902"\n', "admin.control_bind", "not a loopback address"),
        ('[admin]\ncontrol_bind = "unix:relative.sock"\n', "admin.control_bind", "must be absolute"),
        ('[admin]\ncontrol_bind = "unix:/' + "x" * 120 + '"\n', "admin.control_bind", "107 bytes"),
        ('[admin]\ncontrol_bind = "127.0.0.1:9901"\n', "admin.control_bind", "overlaps admin.bind"),
        ('[admin]\ncontrol_bind = "127.0.0.1:8080"\n', "admin.control_bind", "overlaps listeners[0].bind"),
        ('[admin]\ncontrol_bind = "nope"\n', "admin.control_bind", "host:port"),
        ('[admin]\ncontrol_bind = "unix:/run/c.sock"\ncontrol_socket_mode = "0666"\n', "admin.control_socket_mode",
         "every local user"),
        ('[admin]\ncontrol_bind = "unix:/run/c.sock"\ncontrol_socket_mode = 600\n', "admin.control_socket_mode",
         "octal permission bits as a string"),
        ('[admin]\ncontrol_socket_mode = "0600"\n', "admin.control_socket_mode", "Unix control socket only"),
        ('[admin]\nopen_endpoints = ["/admin/reload"]\n', "admin.open_endpoints", "cannot be open"),
        ('[admin]\nopen_endpoints = "/metrics"\n', "admin.open_endpoints", "expected a list of paths"),
        ('[admin]\nopen_endpoints = ["/healthz"]\n', "admin.open_endpoints", "control_key is not set"),
    ],
)
def test_hub_and_api_key_problems(extra: str, key: str, words: str) -> None:
    text = MINIMAL + extra if not extra.startswith("hubs =") else extra + MINIMAL
    got_key, message = only_problem(text)
    assert got_key == key and words in message, message


# --------------------------------------------------------------------------- #
# [backplane]
# --------------------------------------------------------------------------- #


def test_backplane_redis_shards_and_nats() -> None:
    config = parse_config(MINIMAL + '[backplane]\nkind = "redis"\nurls = ["redis://10.0.0.1:6379/0", '
                          '"rediss://r2.internal:6380"]\nprefix = "prod-eu"\ninstance_id = "edge-1"\n')
    assert config.backplane == BackplaneConfig(kind="redis", urls=("redis://10.0.0.1:6379/0", "rediss://r2.internal:6380"),
                                               prefix="prod-eu", instance_id="edge-1")
    cluster = parse_config(MINIMAL + '[backplane]\nkind = "redis-cluster"\nurls = ["rediss://u:p@a:7000/0", '
                           '"rediss://u:p@b:7000"]\nslot_by = "tenant"\n')
    assert cluster.backplane == BackplaneConfig(kind="redis-cluster", urls=("rediss://u:p@a:7000/0", "rediss://u:p@b:7000"),
                                                slot_by="tenant")
    nats_config = parse_config(MINIMAL + '[backplane]\nkind = "NATS"\nurl = "nats://127.0.0.1:4222"\n')
    assert nats_config.backplane.kind == "nats" and nats_config.backplane.urls == ("nats://127.0.0.1:4222",)


def test_nats_replicas_default_to_three_with_a_cluster_of_three() -> None:
    def replicas(table: str) -> int:
        return parse_config(MINIMAL + '[backplane]\nkind = "nats"\n' + table + "\n").backplane.replicas
    three = 'urls = ["nats://a:4222", "nats://b:4222", "nats://c:4222"]'
    assert replicas('url = "nats://a:4222"') == 1
    assert replicas('urls = ["nats://a:4222", "nats://b:4222"]') == 1
    assert replicas(three) == 3
    assert replicas(three + "\nreplicas = 1") == 1
    assert replicas('urls = ["nats://a:4222", "nats://b:4222"]\nreplicas = 2') == 2
    assert parse_config(MINIMAL + '[backplane]\nkind = "redis"\nurl = "redis://a:1"\n').backplane.replicas == 1


@pytest.mark.parametrize("workers", ["2", "16", '"auto"'])
def test_hubs_with_workers_on_the_memory_backplane_are_refused(workers: str) -> None:
    """Each worker would have its own hub: a publish would reach some subscribers and still say 200."""
    text = f"workers = {workers}\n" + MINIMAL + '[[hubs]]\npath = "/hub"\n'
    for backplane in ("", '[backplane]\nkind = "memory"\n'):
        key, message = only_problem(text + backplane)
        assert key == "workers"
        assert f"workers = {workers} with [[hubs]]" in message
        assert 'set [backplane] kind = "redis" or "nats"' in message


def test_hubs_with_workers_on_a_shared_backplane_and_workers_without_hubs_are_fine() -> None:
    hubs = '[[hubs]]\npath = "/hub"\n'
    for kind, url in (("redis", "redis://127.0.0.1:6379/0"), ("nats", "nats://127.0.0.1:4222")):
        shared = f'[backplane]\nkind = "{kind}"\nurl = "{url}"\n'
        assert parse_config("workers = 4\n" + MINIMAL + hubs + shared).workers == 4
    assert parse_config("workers = 4\n" + MINIMAL).workers == 4
    assert parse_config("workers = 1\n" + MINIMAL + hubs).hubs[0].path == "/hub"


def test_admission_scope_cluster_on_every_network_backplane() -> None:
    limits = "[limits]\nconnection_rate = 100\n[admission]\nscope = \"cluster\"\n"
    assert parse_config(MINIMAL).admission.scope == "instance"
    for backplane in ('[backplane]\nkind = "redis"\nurl = "redis://127.0.0.1:6379/0"\n',
                      '[backplane]\nkind = "redis-cluster"\nurls = ["redis://127.0.0.1:7000"]\n',
                      '[backplane]\nkind = "nats"\nurl = "nats://127.0.0.1:4222"\n'):
        assert parse_config(MINIMAL + limits + backplane).admission.scope == "cluster"


@pytest.mark.parametrize("text, needle", [
    ('[limits]\nconnection_rate = 100\n[admission]\nscope = "cluster"\n', 'kind = "memory" is this process only'),
    ('[admission]\nscope = "cluster"\n[backplane]\nkind = "redis"\nurl = "redis://127.0.0.1:6379/0"\n',
     "is 0 (no limit)"),
    ('[admission]\nscope = "fleet"\n', "instance, cluster"),
])
def test_admission_scope_problems(text: str, needle: str) -> None:
    key, message = only_problem(MINIMAL + text)
    assert key == "admission.scope" and needle in message, message


def test_admission_unknown_key() -> None:
    key, message = only_problem(MINIMAL + "[admission]\nrate = 1\n")
    assert key == "admission.rate" and "unknown key" in message, message


@pytest.mark.parametrize("table, key, needle", [
    ('kind = "kafka"', "backplane.kind", "memory, redis, redis-cluster, nats"),
    ('kind = "redis-cluster"', "backplane.url", "needs url"),
    ('kind = "redis-cluster"\nurls = ["redis://a:7000/1"]', "backplane.urls[0]", "database 0 only"),
    ('kind = "redis-cluster"\nurls = ["redis://a:7000", "rediss://b:7000"]', "backplane.urls", "TLS for every node"),
    ('kind = "redis-cluster"\nurls = ["redis://u:p@a:7000", "redis://b:7000"]', "backplane.urls", "same user"),
    ('kind = "redis-cluster"\nurls = ["redis://a:7000", "redis://a:7000"]', "backplane.urls", "seed node URL"),
    ('kind = "redis-cluster"\nurls = ["redis://a:7000?x=1"]', "backplane.urls[0]", "query options"),
    ('kind = "redis-cluster"\nurls = ["nats://a:7000"]', "backplane.urls[0]", "redis://"),
    ('kind = "redis-cluster"\nurls = ["redis://a:7000"]\nslot_by = "slot"', "backplane.slot_by", "channel, tenant"),
    ('kind = "redis"\nurl = "redis://a:1"\nslot_by = "tenant"', "backplane.slot_by", "Redis Cluster slots"),
    ('kind = "redis"', "backplane.url", "needs url"),
    ('kind = "redis"\nurl = "nats://127.0.0.1:4222"', "backplane.url", "redis://"),
    ('kind = "nats"\nurls = ["nats://a:4222", "redis://b:6379"]', "backplane.urls[1]", "nats://"),
    ('kind = "redis"\nurl = "redis://127.0.0.1"', "backplane.url", "host and port"),
    ('kind = "redis"\nurls = []', "backplane.urls", "non-empty array"),
    ('kind = "redis"\nurls = ["redis://a:1", "redis://a:1"]', "backplane.urls", "twice"),
    ('kind = "redis"\nurl = "redis://a:1"\nurls = ["redis://a:1"]', "backplane.url", "at most one"),
    ('url = "redis://127.0.0.1:6379"', "backplane.kind", "takes no url"),
    ('prefix = "a.b"', "backplane.prefix", "A-Z a-z 0-9 _ -"),
    ('instance_id = "x y"', "backplane.instance_id", "A-Z a-z 0-9 _ -"),
    ('reconnect_min = 2\nreconnect_max = 1', "backplane.reconnect_max", ">= reconnect_min"),
    ('heartbeat_interval = 0', "backplane.heartbeat_interval", "a number > 0"),
    ('hosts = 1', "backplane.hosts", "unknown key"),
    ('kind = "redis"\nurl = "redis://a:1"\nreplicas = 3', "backplane.replicas", 'only kind = "nats"'),
    ('kind = "nats"\nurl = "nats://a:1"\nreplicas = 3', "backplane.replicas", "at least 3 servers"),
    ('kind = "nats"\nurls = ["nats://a:1", "nats://b:1"]\nreplicas = 0', "backplane.replicas", "1..5"),
    ('kind = "nats"\nurls = ["nats://a:1", "nats://b:1"]\nreplicas = 6', "backplane.replicas", "1..5"),
])
def test_backplane_problems(table: str, key: str, needle: str) -> None:
    got_key, message = only_problem(MINIMAL + "[backplane]\n" + table + "\n")
    assert got_key == key and needle in message, message


@pytest.mark.parametrize(
    "extra",
    [
        '[admin]\nbind = "0.0.0.0:9901"\ncontrol_key = "0123456789abcdef"\n',
        '[admin]\nbind = "0.0.0.0:9901"\ncontrol_bind = "unix:/run/edgeproxy/control.sock"\n',
        '[admin]\nbind = "0.0.0.0:9901"\ncontrol_bind = "127.0.0.2:9902"\n',
        '[admin]\nbind = "[::1]:9901"\n',
        '[admin]\nbind = "localhost:9901"\n',
        '[admin]\nbind = "0.0.0.0:9901"\nenabled = false\n',
    ],
)
def test_guarded_or_private_control_endpoints_are_accepted(extra: str) -> None:
    parse_config(MINIMAL + extra)


def test_control_bind_per_worker() -> None:
    """Worker i: the control port + i, or the socket path with ".i" past worker 0."""
    from edgeproxy.supervisor import worker_config

    unix = parse_config('workers = 3\n' + MINIMAL + '[admin]\ncontrol_bind = "unix:/run/e/c.sock"\n')
    tcp = parse_config('workers = 3\n' + MINIMAL + '[admin]\ncontrol_bind = "127.0.0.1:9950"\n')
    assert [worker_config(unix, i).admin.control_bind for i in range(3)] == ["/run/e/c.sock", "/run/e/c.sock.1", "/run/e/c.sock.2"]
    assert [worker_config(tcp, i).admin.control_bind.port for i in range(3)] == [9950, 9951, 9952]
    assert [worker_config(tcp, i).admin.bind.port for i in range(3)] == [9901, 9902, 9903]


# --------------------------------------------------------------------------- #
# HTTP edge settings: body limits, request ids, access-log fields, route rate limits
# --------------------------------------------------------------------------- #


def test_http_edge_settings_parse() -> None:
    config = parse_config(MINIMAL.replace('upstream = "app"', 'upstream = "app"\nmax_body_size = 0\nrate_limit = { rate = 2.5 }')
                          + '[http]\nmax_body_size = 1048576\nbody_timeout = 5\nrequest_id = false\n'
                          + '[logging]\naccess_log_fields = ["status", "client"]\n')
    assert (config.http.max_body_size, config.http.body_timeout, config.http.request_id) == (1048576, 5.0, False)
    route = config.routes[0]
    assert route.max_body_size == 0 and route.rate_limit == cfgmod.RateLimit(rate=2.5, burst=3)
    assert config.logging.access_log_fields == ("status", "client")
    defaults = parse_config(MINIMAL)
    assert defaults.routes[0].max_body_size is None and defaults.routes[0].rate_limit is None
    assert defaults.logging.access_log_fields == cfgmod.DEFAULT_ACCESS_LOG_FIELDS


@pytest.mark.parametrize("value, key, fragment", [
    ("5", "routes[0].rate_limit", "expected a table like { rate = 10.0, burst = 20 }"),
    ("{ burst = 3 }", "routes[0].rate_limit.rate", "missing required key"),
    ("{ rate = 0 }", "routes[0].rate_limit.rate", "a number > 0"),
    ("{ rate = 1, burst = 0 }", "routes[0].rate_limit.burst", "an integer >= 1"),
    ("{ rate = 1, bursts = 2 }", "routes[0].rate_limit.bursts", "did you mean 'burst'?"),
])
def test_rate_limit_problems(value: str, key: str, fragment: str) -> None:
    got_key, message = only_problem(MINIMAL.replace('upstream = "app"', f'upstream = "app"\nrate_limit = {value}'))
    assert got_key == key and fragment in message


@pytest.mark.parametrize("workers", ["2", '"auto"'])
def test_rate_limit_is_refused_with_several_workers(workers: str) -> None:
    text = f"workers = {workers}\n" + MINIMAL.replace('upstream = "app"', 'upstream = "app"\nrate_limit = { rate = 5 }')
    key, message = only_problem(text)
    assert key == "routes[0].rate_limit" and "each worker would keep its own" in message


@pytest.mark.parametrize("fields, key, fragment", [
    ('["status", "reqid"]', "logging.access_log_fields[1]", "did you mean 'request_id'?"),
    ('["status", "status"]', "logging.access_log_fields[1]", "listed twice"),
    ("[]", "logging.access_log_fields", "a non-empty list"),
    ('"status"', "logging.access_log_fields", "a non-empty list"),
])
def test_access_log_fields_problems(fields: str, key: str, fragment: str) -> None:
    got_key, message = only_problem(MINIMAL + f"[logging]\naccess_log_fields = {fields}\n")
    assert got_key == key and fragment in message


def test_body_size_problems() -> None:
    assert keys_of(MINIMAL.replace('upstream = "app"', 'upstream = "app"\nmax_body_size = -1')
                   + "[http]\nmax_body_size = 1.5\nbody_timeout = -1\n") == [
        "routes[0].max_body_size", "http.max_body_size", "http.body_timeout"]


# --------------------------------------------------------------------------- #
# [sse]: proxied event streams
# --------------------------------------------------------------------------- #


def test_sse_defaults_and_values() -> None:
    default = parse_config(MINIMAL).sse
    assert (default.keepalive_interval, default.upstream_idle_timeout) == (15.0, 600.0)
    assert (default.retry_min, default.retry_max, default.boundary_timeout) == (1.0, 5.0, 2.0)
    sse = parse_config(MINIMAL + """
[sse]
keepalive_interval = 0
upstream_idle_timeout = 0
retry_min = 3
retry_max = 3
boundary_timeout = 0.5
""").sse
    assert (sse.keepalive_interval, sse.upstream_idle_timeout, sse.retry_min, sse.retry_max, sse.boundary_timeout) == (
        0.0, 0.0, 3.0, 3.0, 0.5)


@pytest.mark.parametrize(("body", "key", "fragment"), [
    ("keepalive_interval = -1", "sse.keepalive_interval", "seconds >= 0"),
    ('upstream_idle_timeout = "10m"', "sse.upstream_idle_timeout", "seconds >= 0"),
    ("retry_min = 6", "sse.retry_max", "retry_max >= retry_min"),
    ("boundary_timeout = true", "sse.boundary_timeout", "seconds >= 0"),
    ("keep_alive = 10", "sse.keep_alive", "keepalive_interval"),
])
def test_sse_bad_values_name_the_key(body: str, key: str, fragment: str) -> None:
    got_key, message = only_problem(MINIMAL + "\n[sse]\n" + body + "\n")
    assert got_key == key and fragment in message, (got_key, message)

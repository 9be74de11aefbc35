"""The mcp_servers spec: stdio or HTTP, the server-name rule, ${VAR} in env and headers, load_servers."""

from __future__ import annotations

import pytest

from fleetlm.config import parse_config
from fleetlm.errors import ConfigError
from fleetlm.mcp.config import McpServerSpec, check_server_name, load_servers, parse_servers

MODELS = {"m": {"remote": "http://127.0.0.1:9/v1"}}


def test_stdio_and_http_servers():
    servers = parse_servers({
        "files": {"command": ["npx", "-y", "server-fs"], "args": ["/srv"], "env": {"A": "1"}, "cwd": "/tmp"},
        "one": {"command": "my-server"},
        "web": {"url": "https://h.example/mcp", "headers": {"X": "y"}, "timeout_s": 5},
    })
    assert servers["files"].transport == "stdio"
    assert servers["files"].argv() == ["npx", "-y", "server-fs", "/srv"]
    assert servers["one"].argv() == ["my-server"]           # a string command is a one-item list
    assert servers["web"].transport == "http" and servers["web"].timeout_s == 5
    assert servers["files"].timeout_s == 30.0
    assert servers["web"].handshake_timeout_s == 5                  # connect_timeout_s defaults to timeout_s
    assert parse_servers({"s": {"command": "x", "connect_timeout_s": 90}})["s"].handshake_timeout_s == 90


@pytest.mark.parametrize("spec, message", [
    ({}, "exactly one of command"),
    ({"command": ["x"], "url": "http://h/mcp"}, "exactly one of command"),
    ({"command": []}, "command is empty"),
    ({"url": "ftp://h/mcp"}, "url must be an http"),
    ({"url": "http://h/mcp", "env": {"A": "1"}}, "args, env and cwd are for a command server"),
    ({"command": ["x"], "headers": {"A": "1"}}, "headers are for a url server"),
    ({"command": ["x"], "timeout_s": 0}, "timeout_s: Input should be greater than 0"),
    ({"command": ["x"], "comand": ["y"]}, "comand: Extra inputs are not permitted"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_servers({"srv": spec})


@pytest.mark.parametrize("name", ["files", "a", "my_server2", "A1_b2"])
def test_good_server_names(name):
    assert check_server_name(name) == name


@pytest.mark.parametrize("name", ["a__b", "a_", "_a", "1a", "a-b", "a.b", "", "x" * 25])
def test_bad_server_names(name):
    with pytest.raises(ValueError, match="prefixes its tools' names"):
        check_server_name(name)
    with pytest.raises(ConfigError, match="prefixes its tools' names"):
        parse_servers({name: {"command": ["x"]}})


def test_environment_variables_in_env_and_headers(monkeypatch):
    monkeypatch.setenv("FLEET_TEST_TOKEN", "s3cret")
    headers = {"Authorization": "Bearer ${FLEET_TEST_TOKEN}", "X": "$NOT"}
    spec = McpServerSpec(url="http://h/mcp", headers=headers)
    assert spec.resolved_headers() == {"Authorization": "Bearer s3cret", "X": "$NOT"}
    stdio = McpServerSpec(command=["x"], env={"T": "${FLEET_TEST_TOKEN}-${FLEET_TEST_TOKEN}"})
    assert stdio.resolved_env() == {"T": "s3cret-s3cret"}
    monkeypatch.delenv("FLEET_TEST_TOKEN")
    with pytest.raises(ConfigError, match="headers.Authorization: environment variable FLEET_TEST_TOKEN"):
        spec.resolved_headers()


def test_fleet_config_has_mcp_servers():
    config = parse_config({"models": MODELS, "mcp_servers": {"echo": {"command": ["python", "s.py"]}}})
    assert config.mcp_servers["echo"].argv() == ["python", "s.py"]
    assert parse_config({"models": MODELS}).mcp_servers == {}
    with pytest.raises(ConfigError, match="mcp_servers.*prefixes its tools"):
        parse_config({"models": MODELS, "mcp_servers": {"bad-name": {"command": ["x"]}}})


def test_load_servers(tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("models:\n  m: {remote: 'http://127.0.0.1:9/v1'}\nmcp_servers:\n  a: {command: [x]}\n")
    assert list(load_servers(fleet)) == ["a"]
    only = tmp_path / "mcp.yaml"
    only.write_text("mcp_servers:\n  b: {url: 'http://h/mcp'}\n")
    assert load_servers(only)["b"].url == "http://h/mcp"
    broken = tmp_path / "broken.yaml"
    broken.write_text("models:\n  m: {}\nmcp_servers:\n  a: {command: [x]}\n")
    with pytest.raises(ConfigError, match="give exactly one of path"):   # a fleet.yaml is validated whole
        load_servers(broken)
    other = tmp_path / "other.yaml"
    other.write_text("servers: {}\n")
    with pytest.raises(ConfigError, match="only an 'mcp_servers' section"):
        load_servers(other)
    with pytest.raises(ConfigError, match="no such config file"):
        load_servers(tmp_path / "missing.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("mcp_servers: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_servers(bad_yaml)

"""`fleet mcp tools`, and `fleet mcp serve`'s argument checks, run in-process (servers are subprocesses)."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from cli_runner import run_main
from mcp_fixtures import ECHO_SERVER, descendants, wait_no_descendants

pytestmark = pytest.mark.timeout(120)


def _write(tmp_path, servers, models=True):
    data = {"mcp_servers": servers}
    if models:
        data["models"] = {"m": {"remote": "http://127.0.0.1:9/v1"}}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


ECHO = {"command": [sys.executable, str(ECHO_SERVER)], "timeout_s": 30}


def test_tools_lists_each_servers_tools(monkeypatch, capsys, tmp_path):
    before = descendants()
    config = _write(tmp_path, {"echo": ECHO, "ghost": {"command": ["/nonexistent/server"]}})
    code, out, err = run_main(monkeypatch, capsys, "mcp", "tools", "--config", str(config))
    assert code == 2  # one server failed; the other's tools are still listed
    assert "echo (" in out and "6 tools" in out
    assert "echo__add " in out and "Add two integers." in out
    assert "echo__dotted_name_tool" in out and "[MCP name: dotted.name-tool]" in out
    assert "error: MCP server ghost: command not found: '/nonexistent/server'" in err
    assert "Traceback" not in err
    assert not wait_no_descendants(before, 2.0)


def test_tools_as_json_for_one_server(monkeypatch, capsys, tmp_path):
    config = _write(tmp_path, {"echo": ECHO, "ghost": {"command": ["/nonexistent/server"]}}, models=False)
    code, out, err = run_main(monkeypatch, capsys, "mcp", "tools", "--config", str(config),
                              "--server", "echo", "--json")
    assert code == 0, err
    entries = json.loads(out)
    assert {e["function"]["name"] for e in entries} >= {"echo__add", "echo__echo"}
    assert all(e["type"] == "function" and e["function"]["parameters"]["type"] == "object" for e in entries)


def test_tools_with_bad_input(monkeypatch, capsys, tmp_path):
    config = _write(tmp_path, {"echo": ECHO})
    code, _, err = run_main(monkeypatch, capsys, "mcp", "tools", "--config", str(config), "--server", "nope")
    assert code == 2 and "no MCP server 'nope' (it has: echo)" in err
    code, _, err = run_main(monkeypatch, capsys, "mcp", "tools", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "no such config file" in err
    bad = _write(tmp_path, {"bad-name": ECHO})
    code, _, err = run_main(monkeypatch, capsys, "mcp", "tools", "--config", str(bad))
    assert code == 2 and "prefixes its tools' names" in err and "Traceback" not in err
    empty = _write(tmp_path, {})
    code, _, err = run_main(monkeypatch, capsys, "mcp", "tools", "--config", str(empty))
    assert code == 0 and "names no mcp_servers" in err


@pytest.mark.parametrize("args, message", [
    (["--transport", "carrier-pigeon"], "--transport must be stdio or http"),
    (["--transport", "http", "--port", "0"], "--port must be 1-65535"),
])
def test_serve_refuses_bad_options(monkeypatch, capsys, args, message):
    code, _, err = run_main(monkeypatch, capsys, "mcp", "serve", *args)
    assert code == 2 and message in err
